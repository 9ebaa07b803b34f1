"""`rstar-fast evolve`: the rounds of rStar-Math self-evolution, resumable stage by stage.

    from rstar_fast.evolve import EvolveConfig, evolve
    rounds = evolve(EvolveConfig(problems="train.json", work_dir="work", rounds=4,
                                 test_problems="test.json"))

Round 1 searches with the bootstrap policy (preset `round1`: terminal-guided, no PPM); round
k >= 2 with round k-1's policy and PPM (preset `round2`). Every round then exports SFT data
and preference pairs, trains the policy from the base model (as the paper does, not from the
previous round's policy) and trains the PPM from the round's policy weights (as the
reference does). Each stage leaves its outputs in `WORK/round_k/` and is skipped when they
are complete, so a rerun continues where an interrupted one stopped:

    round_k/trees.jsonl      search results (an interrupted search resumes from the file)
    round_k/generate.json    the search's run summary, written when the search finished
    round_k/sft.jsonl        verified trajectories {query, response}
    round_k/pairs.jsonl      preference pairs {prompt, pos, neg, pos_count, neg_count}
    round_k/policy/          the policy checkpoint (done when it holds train_result.json)
    round_k/ppm/             the PPM checkpoint (likewise)
    round_k/eval/NAME/       held-out evaluations (trees.jsonl + row.json when done)
    round_k/settings.json    what the round was run with: a rerun under other settings is
                             refused (its finished stages would be reused as they are)
    round_k/round.json       the round's summary, written last
    summary.json             all rounds' summaries

Without a base model the policy is a tiny transformer trained from scratch (`WORK/base/`): a
random tiny Qwen2 on a small BPE tokenizer trained here on round 1's texts, with numbers and
words as single tokens and the step-format markers as special tokens, so that a few CPU
minutes of SFT teach it to copy the numbers and operations of a question into code.

A round that yields no verified trajectory (or no pair) keeps the previous round's policy (or
PPM); round 1 must yield both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstar_fast.files import changed_settings, first_few, hold_lock, write_json

if TYPE_CHECKING:
    from rstar_fast.search.problems import Problem

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
ROUND_FILE = "round.json"
SETTINGS_FILE = "settings.json"
GENERATE_FILE = "generate.json"
ROW_FILE = "row.json"
BASE_DIR = "base"
LOCK_FILE = ".lock"  # held while an evolve works in the folder
BASE_SOURCE_FILE = "built_from.json"  # in BASE_DIR: the tiny settings and round 1's texts it was built from

# Pre-tokenization of the tiny models' BPE: a word or symbol with at most one space before it,
# runs of other whitespace, and every digit on its own, as Qwen2's and Llama's tokenizers split
# numbers. Digits matter most: with one token per number most numbers are rare tokens whose
# embeddings never become distinct, and a tiny model trained from scratch never learned to copy
# the question's numbers (2% greedy); ten digit tokens seen thousands of times are learned fast
# (97-100% greedy after the same 1000 steps). Byte-level underneath: any text round-trips.
TOKENIZER_PATTERN = r" ?[0-9]| ?[A-Za-z_]+| ?[^\sA-Za-z0-9_]|\s+"


class EvolveError(RuntimeError):
    """A round cannot go on (no training data where some is needed, bad settings); the
    message names the round and the stage."""


# ---------------------------------------------------------------------------- tiny base


@dataclass
class TinyBase:
    """The from-scratch base policy built when no base model is given."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    vocab_size: int = 1000  # BPE vocabulary at most (special tokens and all bytes included)
    max_positions: int = 1024
    seed: int = 0

    def validate(self) -> None:
        if self.heads < 1 or self.hidden_size % self.heads:
            raise EvolveError(f"tiny base: hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")


# Training settings for the from-scratch tiny base (the reference's defaults are for
# fine-tuning a 7B model: lr 7e-6 and batch 128 would teach a random tiny model nothing).
# Copying the question's numbers is learned suddenly, after a plateau: on 2-3 step problems
# around update 500-650 (1000 updates: 97-100% greedy); on 2-6 step problems somewhere between
# updates 500 and 950 depending on the data (one run at 1000 updates: 7% greedy, copying only
# first digits; 1500 updates: 98%). Stopping before the jump leaves a policy that has learned
# the format and nothing else, so the default leaves a margin. At lr 2e-3 one demo run of four
# got stuck halfway (multi-digit numbers copied as their first digit, 15% greedy); at lr 1e-3
# sixteen runs of seventeen since learned the copy (55-75% greedy) and one did not (16.7%).
# group_by_length is off: it made SFT and PPM steps 25-30% faster, but the one demo run with it
# trained a policy that solved 41.7% greedily (68.3% without) and the demo kept the default.
TINY_SFT: dict[str, Any] = {
    "learning_rate": 1e-3, "max_steps": 1500, "batch_size": 8, "per_device_batch_size": 8, "lr_scheduler": "cosine",
    "warmup_ratio": 0.05, "weight_decay": 0.0, "max_length": 320, "logging_steps": 25}
# The tiny PPM trains on every pair: its 80-100 steps end before a first evaluation at the
# reference's 750 would choose among checkpoints, and 5% of a round's 300-500 pairs held out
# would only be fewer pairs.
TINY_PPM: dict[str, Any] = {
    "learning_rate": 1e-3, "epochs": 3, "batch_size": 16, "per_device_batch_size": 16, "lr_scheduler": "cosine",
    "warmup_ratio": 0.05, "max_length": 320, "logging_steps": 5, "eval_fraction": 0.0}


def train_step_tokenizer(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer on `texts` (locally, nothing downloaded) and save it.

    The step-format markers are special tokens (single ids, never split): the reference's
    training set of them, so training never has to add any. EOS is `<|endoftext|>`. Returns
    the transformers tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rstar_fast.engines.tokenizer import EOS_TOKEN
    from rstar_fast.training.common import REFERENCE_SFT_TOKENS

    special = [EOS_TOKEN, *REFERENCE_SFT_TOKENS]

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOKENIZER_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        additional_special_tokens=special[1:],
    )
    tok.padding_side = "left"
    tok.save_pretrained(str(out_dir))
    return tok


def build_tiny_base(texts: Sequence[str], out_dir: str | Path, tiny: TinyBase | None = None) -> Path:
    """A random tiny Qwen2 policy on a tokenizer trained on `texts`, saved to `out_dir`."""
    from rstar_fast.engines.tiny import build_tiny_policy

    tiny = tiny or TinyBase()
    tiny.validate()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    tok_dir = tmp / "tokenizer"
    train_step_tokenizer(texts, tok_dir, tiny.vocab_size)
    build_tiny_policy(tmp, seed=tiny.seed, tokenizer=tok_dir, hidden_size=tiny.hidden_size,
                      layers=tiny.layers, heads=tiny.heads, max_positions=tiny.max_positions)
    _rmtree(tok_dir)
    _replace_dir(tmp, out)
    return out


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place (a crash leaves only the .tmp folder behind)."""
    if final.exists():
        _rmtree(final)
    os.replace(tmp, final)


# ------------------------------------------------------------------------------ config


@dataclass
class EvolveConfig:
    """What `evolve` runs. Search keys layer as preset -> `config_yaml` -> `overrides`
    (every round) -> `round1_overrides` / `later_overrides` -> `round_overrides[k]` (round k's
    own: the paper's round 2 searches without the PPM, {2: {"need_value_func": False,
    "update_leaf_value": False}})."""

    problems: str | Path | list[dict[str, Any]]  # training problems (file or records)
    work_dir: str | Path
    rounds: int = 4
    policy: str = "sim"  # round 1's bootstrap policy (an engine spec)
    base: str | Path | None = None  # policy SFT starts here every round; None: TinyBase from scratch
    ppm_init: str | Path | None = None  # PPM training starts here; None: the round's policy
    test_problems: str | Path | list[dict[str, Any]] | None = None  # held-out set for accuracy
    limit: int | Sequence[int | None] | None = None  # problems per round (one value, or one per round)
    config_yaml: str | Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    round1_overrides: dict[str, Any] = field(default_factory=dict)
    later_overrides: dict[str, Any] = field(default_factory=dict)
    round_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    eval_overrides: dict[str, Any] = field(default_factory=dict)  # the held-out search (preset eval)
    sft: dict[str, Any] = field(default_factory=dict)  # SFTHParams fields (over TINY_SFT with the tiny base)
    ppm: dict[str, Any] = field(default_factory=dict)  # PPMHParams fields (over TINY_PPM likewise)
    round1_ppm: dict[str, Any] = field(default_factory=dict)  # round 1's PPM only, over `ppm`
    sft_top_n: int = 2  # verified trajectories kept per problem (the reference keeps 2)
    pairs_min_margin: float = 0.5
    pairs_min_edit_distance: int = 20
    pairs_final: int = 2  # whole trajectories per side paired for the final answer step
    policy_rounds: int | None = None  # train the policy only in rounds <= this (None: every round)
    tiny: TinyBase = field(default_factory=TinyBase)
    progress: bool = False

    def validate(self) -> None:
        if self.rounds < 1:
            raise EvolveError(f"rounds must be >= 1, got {self.rounds}")
        if self.sft_top_n < 1:
            raise EvolveError(f"sft_top_n must be >= 1, got {self.sft_top_n}")
        if self.pairs_final < 0:
            raise EvolveError(f"pairs_final must be >= 0, got {self.pairs_final}")
        for lim in self._limits():
            if lim is not None and lim < 1:
                raise EvolveError(f"limit must be >= 1, got {lim}")
        self._validate_training()
        # The search keys of every preset used (ConfigError names the key), so that a bad
        # round-2 or held-out key does not surface after round 1 has trained.
        for k in self.round_overrides:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.rounds:
                raise EvolveError(f"round_overrides (--round-set): round {k!r} is not one of the rounds 1-{self.rounds}")
        for k in sorted({*range(1, min(self.rounds, 2) + 1), *self.round_overrides}):
            self.search_config(k, warn=True)  # said here once; the rounds read them again quietly
        self.eval_config(warn=True)  # checked even with no held-out set, where its keys would go unused

    def _validate_training(self) -> None:
        """Check what training would refuse hours in (hyperparameters as the trainers parse
        them, the base and PPM-init models) before round 1 searches."""
        from rstar_fast.training import PPMHParams, SFTHParams, TrainingConfigError
        from rstar_fast.training.common import check_init

        checks = [("sft hyperparameters", lambda: SFTHParams.from_kwargs(**self.sft_hparams())),
                  ("ppm hyperparameters", lambda: PPMHParams.from_kwargs(**self.ppm_hparams(2))),
                  ("round1_ppm hyperparameters", lambda: PPMHParams.from_kwargs(**self.ppm_hparams(1))),
                  ("base", lambda: check_init(self.base)),
                  ("ppm_init", lambda: check_init(self.ppm_init))]
        for what, check in checks:
            try:
                check()
            except TrainingConfigError as e:
                raise EvolveError(f"{what}: {e}") from None
        if self.base is None:
            self.tiny.validate()

    def sft_hparams(self) -> dict[str, Any]:
        """What the policy SFT of every round is given (SFTHParams fields)."""
        defaults = TINY_SFT if self.base is None else {}
        return {**defaults, "progress": self.progress, **self.sft}

    def ppm_hparams(self, k: int) -> dict[str, Any]:
        """What round k's PPM training is given (PPMHParams fields)."""
        defaults = TINY_PPM if self.base is None and self.ppm_init is None else {}
        return {**defaults, "progress": self.progress, **self.ppm, **(self.round1_ppm if k == 1 else {})}

    def _limits(self) -> list[int | None]:
        if self.limit is None or isinstance(self.limit, int):
            return [self.limit] * self.rounds  # type: ignore[list-item]
        limits = list(self.limit)
        if not limits:
            return [None] * self.rounds
        return [limits[min(i, len(limits) - 1)] for i in range(self.rounds)]

    def limit_for(self, k: int) -> int | None:
        return self._limits()[k - 1]

    def search_config(self, k: int, warn: bool = False):
        """Round k's search config; `warn`: say which keys its mode does not read (validate does)."""
        from rstar_fast.search.config import load_config

        extra = self.round1_overrides if k == 1 else self.later_overrides
        return load_config("round1" if k == 1 else "round2", self.config_yaml,
                           {**self.overrides, **extra, **self.round_overrides.get(k, {})}, warn_unread=warn)

    def eval_config(self, warn: bool = False):
        from rstar_fast.search.config import load_config

        return load_config("eval", None, self.eval_overrides, "eval_overrides", warn_unread=warn)


# ----------------------------------------------------------------------------- results


@dataclass
class RoundSummary:
    """One round: what it generated, what it trained, how the result does on held-out."""

    round: int
    problems: int  # searched
    solved: int  # problems with a correct trajectory (pass@n): the ones that yield training data
    trajectories: int  # SFT records exported (verified trajectories)
    pairs: int  # preference pairs exported
    policy: str  # the policy this round ends with (a folder)
    ppm: str  # the PPM this round ends with
    policy_trained: bool  # False: kept from the previous round (no data, or policy_rounds)
    ppm_trained: bool
    policy_loss: float | None = None  # final SFT training loss
    ppm_loss: float | None = None  # final PPM training loss
    ppm_pair_accuracy: float | None = None  # last logged training pair accuracy
    ppm_heldout_accuracy: float | None = None  # the kept PPM on its held-out pairs (none held out: None)
    test_problems: int = 0
    accuracy_greedy: float | None = None  # held-out, policy alone (temperature 0, one trajectory)
    accuracy_search: float | None = None  # held-out, MCTS with the PPM (preset eval)
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage run now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalRow:
    """One held-out evaluation: accuracy and the compute it took."""

    name: str
    accuracy: float | None
    problems: int
    correct: int
    generated_tokens: int
    policy_calls: int
    ppm_calls: int
    rollouts: int
    wall_s: float
    # problems an earlier, interrupted run had finished: the compute above leaves theirs out
    resumed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _problem_records(source: str | Path | list[dict[str, Any]] | None) -> list[Problem] | None:
    """Problems as a list (so that every stage sees the same ones), or None. Records are
    checked here, once, so that unusable ones fail before round 1 and warn only once."""
    if source is None:
        return None
    from rstar_fast.search.problems import load_problems, problems_from_records

    if isinstance(source, (str, Path)):
        return list(load_problems(source).problems)
    return list(problems_from_records(source).problems)


def _count_correct(trees: Path) -> tuple[int, int, int, int]:
    """(problems, graded, correct, solved) in a trees.jsonl file: graded have a gold answer,
    correct chose the right one, solved found it in some trajectory (pass@n; in a search
    graded against the answer, what yields training data)."""
    from rstar_fast.search.api import RunSummary, count_answers
    from rstar_fast.search.records import read_trees

    n, counts = 0, RunSummary()
    if trees.exists():
        for rec in read_trees(trees):
            n += 1
            count_answers(counts, rec)
    return n, counts.graded, counts.correct, counts.votes.get("passn", 0)


def _loss(result: Any) -> float | None:
    """A training run's last logged loss; its mean loss when it ended before the first log."""
    if result is None:
        return None
    return result.final_loss if result.final_loss is not None else result.mean_loss


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvolveError(f"{path}: cannot read {what} ({e}); delete the file to redo it") from None


def _digest(items: Sequence[Any], noun: str) -> str:
    """Which items (JSON values), in one short string: settings compare it, not the items."""
    import hashlib

    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item).encode())
    return f"{len(items)} {noun}, sha256 {h.hexdigest()[:12]}"


def _problems_digest(problems: Sequence | None) -> str | None:
    """Which problems (a rerun on other problems must not reuse results)."""
    return None if problems is None else _digest([[p.id, p.question, p.answer] for p in problems], "problems")


def keep_settings(path: Path, settings: dict[str, Any], fresh: str) -> None:
    """Record what the outputs beside `path` are made with; refuse to go on under other
    settings, since finished stages are reused as they are. `fresh` says how to start over."""
    now = json.loads(json.dumps(settings, default=str))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, now)
        return
    changed = changed_settings(_read_json(path, "the settings a run was made with"), now)
    if changed:
        raise EvolveError(f"{path.parent} was made with other settings ({first_few(changed, 6, '; ')}); its finished stages would be "
                          f"reused as they are. Rerun with the settings it was made with, or {fresh}")


# ------------------------------------------------------------------------------ stages


async def run_search(problems: list, config, out_dir: Path, *, policy, ppm=None, progress: bool = False,
                     name: str = "") -> EvalRow:
    """Search `problems` into `out_dir/trees.jsonl` (resuming it) and return what it cost.

    `policy` / `ppm` are engine specs or engine objects (objects stay open and their counters
    give the compute; specs are opened and closed here). Problems whose search failed raise
    EvolveError once the others are searched: the stage is not done, and a rerun retries them.
    """
    from rstar_fast.search.api import FAILED_FILE, RunSummary, open_engines, search

    summary = RunSummary()
    async with AsyncExitStack() as opened:  # closed on every exit, the policy too when the PPM fails to load
        pol, scorer = open_engines(policy, ppm if config.need_value_func else None, config, opened)
        start = time.perf_counter()
        async for _ in search(problems, config, policy=pol, ppm=scorer, out_dir=out_dir, resume=True,
                              progress=progress, summary=summary):
            pass
    wall = time.perf_counter() - start
    if summary.failed:  # not done: no row or generate.json, so the next run retries them (resume)
        raise EvolveError(f"{out_dir}: {summary.failed} problem(s) failed and were set aside "
                          f"({Path(out_dir) / FAILED_FILE} says why); run the same command again to retry them")
    n, graded, correct, _ = _count_correct(out_dir / "trees.jsonl")
    return EvalRow(
        name=name, accuracy=correct / graded if graded else None, problems=n, correct=correct,
        generated_tokens=summary.generated_tokens, policy_calls=summary.policy_calls, ppm_calls=summary.ppm_calls,
        rollouts=summary.rollouts, wall_s=round(wall, 2), resumed=summary.skipped,
    )


def evaluate(problems: list, config, out_dir: str | Path, *, policy, ppm=None, name: str = "",
             progress: bool = False) -> EvalRow:
    """A held-out evaluation, skipped when `out_dir/row.json` says it finished before."""
    out = Path(out_dir)
    done = out / ROW_FILE
    if done.exists():
        row = _read_json(done, "a finished evaluation's row")
        try:
            return EvalRow(**row)
        except TypeError as e:
            raise EvolveError(f"{done}: not an evaluation row ({e}); delete the file to redo it") from None
    out.mkdir(parents=True, exist_ok=True)
    row = asyncio.run(run_search(problems, config, out, policy=policy, ppm=ppm, progress=progress, name=name))
    write_json(done, row.to_dict())
    return row


def greedy_config(base):
    """The policy alone: one trajectory at temperature 0, no PPM."""
    return base.replace(mode="best_of_n", bon_n=1, bon_vote="majority", temperature=0.0,
                        need_value_func=False, update_leaf_value=False)


class Evolver:
    """Runs the rounds of an EvolveConfig; each stage is skipped when its outputs are complete."""

    def __init__(self, cfg: EvolveConfig) -> None:
        cfg.validate()
        from rstar_fast.training.common import require_training_stack

        # every round trains: missing the training stack is said now, not after round 1's search
        require_training_stack()
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        problems = _problem_records(cfg.problems)
        if not problems:
            raise EvolveError("evolve: no training problems")
        self.problems: list[Problem] = problems
        self.test = _problem_records(cfg.test_problems)
        if self.test:
            trained = {p.question.strip() for p in self.problems}
            seen = [p.id for p in self.test if p.question.strip() in trained]
            if seen:  # its held-out accuracy would measure memory, not the method
                log.warning("evolve: %d of the %d held-out problems are training problems too (%s): their "
                            "accuracy is not held-out", len(seen), len(self.test), first_few(seen, 5))

    def round_dir(self, k: int) -> Path:
        return self.work / f"round_{k}"

    def _say(self, k: int, what: str) -> None:
        if self.cfg.progress:
            print(f"[round {k}] {what}", flush=True)
        log.info("round %d: %s", k, what)

    # -- models each round ends with

    def policy_of(self, k: int) -> Path | None:
        """The policy round k ends with: its own, else the latest earlier one."""
        from rstar_fast.training import load_train_result

        for j in range(k, 0, -1):
            if load_train_result(self.round_dir(j) / "policy") is not None:
                return self.round_dir(j) / "policy"
        return None

    def ppm_of(self, k: int) -> Path | None:
        from rstar_fast.training import load_train_result

        for j in range(k, 0, -1):
            if load_train_result(self.round_dir(j) / "ppm") is not None:
                return self.round_dir(j) / "ppm"
        return None

    # -- stages

    def searched(self, k: int) -> bool:
        rd = self.round_dir(k)
        return (rd / GENERATE_FILE).exists() and (rd / "trees.jsonl").exists()

    def generate(self, k: int) -> None:
        rd = self.round_dir(k)
        if self.searched(k):
            return
        # the exports of an earlier search (its trees.jsonl deleted) are made again from this one
        for stale in (GENERATE_FILE, "sft.jsonl", "pairs.jsonl"):
            (rd / stale).unlink(missing_ok=True)
        from rstar_fast.training import load_train_result

        trained = [name for name in ("policy", "ppm") if load_train_result(rd / name) is not None]
        if trained:
            log.warning("round %d: searching again; the %s trained on the earlier search's data %s kept "
                        "(delete %s to train again)", k, " and ".join(trained),
                        "is" if len(trained) == 1 else "are", " and ".join(str(rd / n) for n in trained))
        cfg = self.cfg.search_config(k)
        problems = self.problems[: self.cfg.limit_for(k)]
        if k == 1:
            policy, ppm = self.cfg.policy, None
        else:
            prev_policy, prev_ppm = self.policy_of(k - 1), self.ppm_of(k - 1)
            if prev_policy is None or (cfg.need_value_func and prev_ppm is None):
                raise EvolveError(f"round {k}: generation needs round {k - 1}'s policy and PPM; run round {k - 1} first")
            policy = f"hf:{prev_policy}"
            ppm = f"hf:{prev_ppm}" if cfg.need_value_func and prev_ppm is not None else None
        self._say(k, f"searching {len(problems)} problems with {policy}" + (f" and PPM {ppm}" if ppm else ""))
        row = asyncio.run(run_search(problems, cfg, rd, policy=policy, ppm=ppm, progress=self.cfg.progress,
                                     name=f"round_{k}"))
        # search() wrote its run summary as summary.json: keep it as generate.json, which
        # marks the stage done.
        search_summary = rd / SUMMARY_FILE
        data = _read_json(search_summary, "the search's summary") if search_summary.exists() else {}
        data.update(row.to_dict())
        write_json(rd / GENERATE_FILE, data)
        search_summary.unlink(missing_ok=True)

    def export(self, k: int) -> tuple[int, int]:
        from rstar_fast.search.export import export_pairs, export_sft

        rd = self.round_dir(k)
        trees = rd / "trees.jsonl"
        sft, pairs = rd / "sft.jsonl", rd / "pairs.jsonl"
        if not sft.exists():  # an export replaces its output only once it is complete
            export_sft(trees, sft, n=self.cfg.sft_top_n)
        if not pairs.exists():
            export_pairs(trees, pairs, min_margin=self.cfg.pairs_min_margin,
                         min_edit_distance=self.cfg.pairs_min_edit_distance, final_pairs=self.cfg.pairs_final)
        return _count_lines(sft), _count_lines(pairs)

    def base_model(self) -> str:
        """The base policy: the configured one, or the tiny from-scratch one built from round 1's texts."""
        if self.cfg.base is not None:
            return str(self.cfg.base)
        from rstar_fast.training.sft import SFT_TEMPLATE

        base = self.work / BASE_DIR
        texts = []
        rd = self.round_dir(1)
        with open(rd / "sft.jsonl", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    texts.append(SFT_TEMPLATE.replace("{query}", rec["query"]) + rec["response"])
        with open(rd / "pairs.jsonl", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    texts.extend((rec["prompt"] + rec["pos"], rec["neg"]))
        # what the base is made from: a redone round 1 or other tiny settings build it again
        source = {"tiny": asdict(self.cfg.tiny), "texts": _digest(texts, "texts")}
        marker = base / BASE_SOURCE_FILE
        if (base / "config.json").exists() and marker.exists() and _read_json(marker, "base source") == source:
            return str(base)
        self._say(1, f"building the tiny base model (tokenizer trained on {len(texts)} texts)")
        build_tiny_base(texts, base, self.cfg.tiny)
        write_json(marker, source)
        return str(base)

    def train_policy(self, k: int, n_sft: int) -> bool:
        from rstar_fast.training import load_train_result, train_sft

        out = self.round_dir(k) / "policy"
        if load_train_result(out) is not None:
            return True
        if self.cfg.policy_rounds is not None and k > self.cfg.policy_rounds:
            return False
        if n_sft == 0:
            if k == 1:
                raise EvolveError("round 1: no verified trajectory to train the policy on "
                                  "(more problems, more iterations, or a stronger bootstrap policy)")
            self._say(k, "no verified trajectory: keeping the previous round's policy")
            return False
        base = self.base_model()
        self._say(k, f"training the policy from {base} on {n_sft} trajectories")
        train_sft(self.round_dir(k) / "sft.jsonl", base, out, **self.cfg.sft_hparams())
        self._warn_built_from_before(k, "policy", [self.round_dir(k) / "ppm"])
        return True

    def _warn_built_from_before(self, k: int, model: str, also: list[Path]) -> None:
        """Round k's `model` was trained (again): outputs already built from an earlier one
        (its held-out rows, later rounds, and `also`) are kept, and said to be."""
        from rstar_fast.training import load_train_result

        stale = [p for p in also if load_train_result(p) is not None]
        stale += [p for p in (self.round_dir(k) / "eval",) if p.exists()]
        stale += [self.round_dir(j) for j in range(k + 1, self.cfg.rounds + 1) if self.round_dir(j).exists()]
        if stale:
            log.warning("round %d: the %s was trained again; what was built from the earlier one is kept: %s "
                        "(delete it to build it again from this one)", k, model, ", ".join(map(str, stale)))

    def train_ppm(self, k: int, n_pairs: int) -> bool:
        from rstar_fast.training import load_train_result, train_ppm

        out = self.round_dir(k) / "ppm"
        if load_train_result(out) is not None:
            return True
        if n_pairs == 0:
            if k == 1:
                raise EvolveError("round 1: no preference pair to train the PPM on (more problems or "
                                  "iterations, or a lower --min-edit-distance / --min-margin, "
                                  "pairs_min_edit_distance / pairs_min_margin from Python)")
            self._say(k, "no preference pair: keeping the previous round's PPM")
            return False
        init = self.cfg.ppm_init if self.cfg.ppm_init is not None else self.policy_of(k)
        self._say(k, f"training the PPM from {init} on {n_pairs} pairs")
        train_ppm(self.round_dir(k) / "pairs.jsonl", init, out, **self.cfg.ppm_hparams(k))
        self._warn_built_from_before(k, "PPM", [])
        return True

    def evaluate_round(self, k: int) -> tuple[EvalRow, EvalRow] | None:
        """Held-out accuracy of round k's models: the policy alone, and MCTS with the PPM."""
        if not self.test:
            return None
        policy, ppm = self.policy_of(k), self.ppm_of(k)
        assert policy is not None and ppm is not None
        ev = self.round_dir(k) / "eval"
        search_cfg = self.cfg.eval_config()
        self._say(k, f"evaluating on {len(self.test)} held-out problems")
        greedy = evaluate(self.test, greedy_config(search_cfg), ev / "greedy", policy=f"hf:{policy}",
                          name="policy alone (greedy)", progress=self.cfg.progress)
        search = evaluate(self.test, search_cfg, ev / "mcts_ppm", policy=f"hf:{policy}", ppm=f"hf:{ppm}",
                          name="MCTS with PPM", progress=self.cfg.progress)
        return greedy, search

    def round_settings(self, k: int) -> dict[str, Any]:
        """What round k's outputs depend on, by stage (not how fast or how verbosely it runs)."""
        cfg = self.cfg
        search = {key: v for key, v in cfg.search_config(k).to_dict().items() if key != "max_in_flight"}
        untrained = cfg.base is None
        return {
            "search": {"problems": _problems_digest(self.problems[: cfg.limit_for(k)]), "config": search,
                       "policy": cfg.policy if k == 1 else f"round {k - 1}'s"},
            "export": {"sft_top_n": cfg.sft_top_n, "pairs_min_margin": cfg.pairs_min_margin,
                       "pairs_min_edit_distance": cfg.pairs_min_edit_distance, "pairs_final": cfg.pairs_final},
            "policy": {"base": None if untrained else str(cfg.base), "tiny": asdict(cfg.tiny) if untrained else None,
                       "hparams": {key: v for key, v in cfg.sft_hparams().items() if key != "progress"},
                       "trained": cfg.policy_rounds is None or k <= cfg.policy_rounds},
            "ppm": {"init": None if cfg.ppm_init is None else str(cfg.ppm_init),
                    "hparams": {key: v for key, v in cfg.ppm_hparams(k).items() if key != "progress"}},
            "eval": {"problems": _problems_digest(self.test),
                     "config": cfg.eval_config().to_dict() if self.test else None},
        }

    def _missing(self, k: int, finished: RoundSummary) -> list[str]:
        """The outputs a finished round's summary describes that are no longer there."""
        from rstar_fast.training import load_train_result

        rd = self.round_dir(k)
        wanted = [("trees.jsonl", self.searched(k)), ("sft.jsonl", (rd / "sft.jsonl").exists()),
                  ("pairs.jsonl", (rd / "pairs.jsonl").exists())]
        if finished.policy_trained:
            wanted.append(("policy", load_train_result(rd / "policy") is not None))
        if finished.ppm_trained:
            wanted.append(("ppm", load_train_result(rd / "ppm") is not None))
        if self.test:
            wanted += [(f"eval/{row}", (rd / "eval" / row / ROW_FILE).exists()) for row in ("greedy", "mcts_ppm")]
        return [str(rd / name) for name, there in wanted if not there]

    def run_round(self, k: int) -> RoundSummary:
        from rstar_fast.training import load_train_result

        rd = self.round_dir(k)
        keep_settings(rd / SETTINGS_FILE, self.round_settings(k),
                      f"start afresh: another work folder, or delete {rd} and the rounds after it")
        done = rd / ROUND_FILE
        if done.exists():
            try:
                finished = RoundSummary(**_read_json(done, "round summary"))
            except TypeError as e:
                raise EvolveError(f"{done}: not a round summary ({e}); delete the file to redo it") from None
            missing = self._missing(k, finished)
            if not missing:
                return finished
            self._say(k, f"{', '.join(missing)} missing: redoing {'it' if len(missing) == 1 else 'them'}")
        seconds: dict[str, float] = {}

        def timed(stage: str, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            seconds[stage] = round(time.perf_counter() - t, 2)
            return out

        timed("generate", self.generate, k)
        n_sft, n_pairs = timed("export", self.export, k)
        policy_trained = timed("policy", self.train_policy, k, n_sft)
        ppm_trained = timed("ppm", self.train_ppm, k, n_pairs)
        policy, ppm = self.policy_of(k), self.ppm_of(k)
        if policy is None or ppm is None:
            raise EvolveError(f"round {k}: no policy or PPM to continue with")
        rows = timed("eval", self.evaluate_round, k)
        searched, _, _, solved = _count_correct(rd / "trees.jsonl")
        sft_result = load_train_result(policy) if policy_trained else None
        ppm_result = load_train_result(ppm) if ppm_trained else None
        summary = RoundSummary(
            round=k, problems=searched, solved=solved, trajectories=n_sft, pairs=n_pairs,
            policy=str(policy), ppm=str(ppm), policy_trained=policy_trained, ppm_trained=ppm_trained,
            policy_loss=_loss(sft_result),
            ppm_loss=_loss(ppm_result),
            ppm_pair_accuracy=ppm_result.metrics.get("accuracy") if ppm_result else None,
            ppm_heldout_accuracy=ppm_result.eval_metrics.get("eval_accuracy") if ppm_result else None,
            test_problems=len(self.test or []),
            accuracy_greedy=rows[0].accuracy if rows else None,
            accuracy_search=rows[1].accuracy if rows else None,
            seconds=seconds,
        )
        write_json(done, summary.to_dict())
        return summary

    def run(self) -> list[RoundSummary]:
        self.work.mkdir(parents=True, exist_ok=True)
        # a second evolve here (the command rerun while the first still runs, a requeued job)
        # would train the same checkpoints at once
        lock = hold_lock(self.work / LOCK_FILE)
        if lock is None:
            raise EvolveError(f"{self.work}: another evolve is working in this folder; wait for it to end, "
                              "or give another work folder")
        try:
            summaries: list[RoundSummary] = []
            for k in range(1, self.cfg.rounds + 1):
                summaries.append(self.run_round(k))
                write_json(self.work / SUMMARY_FILE, [s.to_dict() for s in summaries])
                if self.cfg.progress:
                    print(format_rounds(summaries[-1:]), flush=True)
            return summaries
        finally:
            os.close(lock)


def evolve(cfg: EvolveConfig) -> list[RoundSummary]:
    """Run (or resume) the rounds; return one summary per round (also in WORK/summary.json)."""
    return Evolver(cfg).run()


def format_rounds(summaries: Sequence[RoundSummary]) -> str:
    """The per-round summary as a markdown table."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = ["| round | solved | trajectories | pairs | policy loss | PPM loss | held-out greedy | held-out MCTS+PPM |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        pol = num(s.policy_loss) if s.policy_trained else "kept"
        ppm = num(s.ppm_loss) if s.ppm_trained else "kept"
        lines.append(f"| {s.round} | {s.solved}/{s.problems} | {s.trajectories} | {s.pairs} | {pol} | {ppm} | "
                     f"{pct(s.accuracy_greedy)} | {pct(s.accuracy_search)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- CLI


def _kv(items: Sequence[str], where: str) -> dict[str, Any]:
    """`["key=value", ...]` with YAML values to a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise EvolveError(f"{where} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise EvolveError(f"{where} {item!r}: value is not valid YAML: {e}") from e
    return out


def _round_overrides(items: Sequence[str]) -> dict[int, dict[str, Any]]:
    """`["K:key=value", ...]` to {K: {key: value}} (values as --set reads them)."""
    from rstar_fast.search.config import parse_overrides

    out: dict[int, dict[str, Any]] = {}
    for item in items:
        round_text, sep, setting = item.partition(":")
        if not sep or not round_text.strip().isdigit():
            raise EvolveError(f"--round-set {item!r}: expected K:KEY=VALUE, K a round number")
        out.setdefault(int(round_text), {}).update(parse_overrides([setting], f"--round-set {round_text}:"))
    return out


def _run_cli(args: argparse.Namespace) -> int:
    import sys

    from rstar_fast.search.config import ConfigError, parse_overrides

    try:
        if not Path(args.problems).exists():
            raise EvolveError(f"--problems {args.problems}: no such file or folder")
        if args.test and not Path(args.test).exists():
            raise EvolveError(f"--test {args.test}: no such file or folder")
        cfg = EvolveConfig(
            problems=args.problems, work_dir=args.work, rounds=args.rounds, policy=args.policy,
            base=args.base, ppm_init=args.ppm_init, test_problems=args.test, limit=args.limit,
            config_yaml=args.config_yaml, overrides=parse_overrides(args.config_set),
            round_overrides=_round_overrides(args.round_set),
            eval_overrides=parse_overrides(args.eval_set, "--eval-set"), sft=_kv(args.sft_set, "--sft-set"),
            ppm=_kv(args.ppm_set, "--ppm-set"), sft_top_n=args.sft_top,
            pairs_min_margin=args.min_margin, pairs_min_edit_distance=args.min_edit_distance,
            pairs_final=args.final_pairs,
            progress=not args.quiet,
        )
        summaries = evolve(cfg)
    except (EvolveError, ConfigError) as e:
        print(f"rstar-fast evolve: error: {e}", file=sys.stderr)
        return 2
    print(format_rounds(summaries))
    print(f"\nsummary: {Path(args.work) / SUMMARY_FILE}")
    return 0


def _run_cli_safe(args: argparse.Namespace) -> int:
    import sys

    from rstar_fast.training import TrainingError

    try:
        return _run_cli(args)
    except TrainingError as e:
        print(f"rstar-fast evolve: error: {e}", file=sys.stderr)
        return 2


def register(subparsers) -> argparse.ArgumentParser:
    """Add `evolve` to an argparse subparsers object."""
    from rstar_fast.cli import at_least

    p = subparsers.add_parser(
        "evolve", help="run rounds of self-evolution: search, export, train the policy and the PPM",
        description="Round 1 searches with the bootstrap policy (preset round1), rounds 2..N with the "
        "previous round's policy and PPM (preset round2); each round exports SFT data and pairs and "
        "trains the policy (from the base model) and the PPM (from the round's policy). Stages already "
        "complete in WORK/round_k/ are skipped, so rerunning resumes.",
    )
    p.add_argument("--problems", required=True, metavar="FILE", help="training problems (JSON, JSONL or HF dataset)")
    p.add_argument("--work", required=True, metavar="DIR", help="work folder (round_k/ subfolders, summary.json)")
    p.add_argument("--rounds", type=at_least(1, int), default=4, metavar="N", help="rounds to run (default 4)")
    p.add_argument("--policy", default="sim", metavar="SPEC", help="round-1 bootstrap policy (default: sim)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="base model the policy SFT starts from each round (default: a tiny model from scratch)")
    p.add_argument("--ppm-init", default=None, metavar="PATH",
                   help="where PPM training starts (default: the round's policy)")
    p.add_argument("--test", default=None, metavar="FILE", help="held-out problems: accuracy with and without search")
    p.add_argument("--limit", type=at_least(1, int), default=None, metavar="N", help="search only the first N problems per round")
    p.add_argument("--config", dest="config_yaml", default=None, metavar="YAML",
                   help="YAML search config applied on top of each round's preset (round1, round2)")
    p.add_argument("--set", dest="config_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search key in every round (repeatable), e.g. --set iterations=16")
    p.add_argument("--round-set", action="append", default=[], metavar="K:KEY=VALUE",
                   help="override a search key in round K only (repeatable), e.g. the paper's round 2 "
                        "without the PPM: --round-set 2:need_value_func=false --round-set 2:update_leaf_value=false")
    p.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the held-out search (preset eval)")
    p.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy SFT hyperparameter (e.g. learning_rate=1e-5); see rstar-fast train sft -h")
    p.add_argument("--ppm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="PPM hyperparameter; see rstar-fast train ppm -h")
    p.add_argument("--sft-top", type=at_least(1, int), default=2, metavar="N", help="trajectories kept per problem (default 2)")
    p.add_argument("--min-margin", type=at_least(0, float), default=0.5, help="pairs: least Q margin (default 0.5)")
    p.add_argument("--min-edit-distance", type=at_least(0, int), default=20, help="pairs: least edit distance (default 20)")
    p.add_argument("--final-pairs", type=at_least(0, int), default=2, metavar="N",
                   help="pairs: whole trajectories per side paired for the final answer step (default 2, 0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run_cli_safe)
    return p


__all__ = [
    "TINY_PPM", "TINY_SFT", "EvalRow", "EvolveConfig", "EvolveError", "Evolver", "RoundSummary", "TinyBase", "build_tiny_base",
    "evaluate", "evolve", "format_rounds", "greedy_config", "keep_settings", "register", "run_search",
    "train_step_tokenizer",
]
