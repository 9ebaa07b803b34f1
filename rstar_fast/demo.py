"""`rstar-fast demo`: the whole method, real models included, in minutes on two CPU cores.

1. Synthetic multi-step arithmetic word problems (`rstar_fast.synthetic`), with a held-out
   test split; half the operations restate an earlier amount ("She loses as many as she
   found."), which a tiny policy gets wrong often enough to leave search something to do.
2. Round 1 (bootstrap): MCTS with the simulated strong policy (`sim`, preset round1,
   terminal-guided, no PPM); export verified trajectories and preference pairs.
3. A tiny transformer policy trained from scratch on those trajectories (its own small BPE
   tokenizer trained on the round's texts) and a tiny PPM trained on the pairs, starting from
   the tiny policy's weights.
4. Round 2: MCTS with the tiny policy and PPM (preset round2, sampling at the held-out
   temperature 0.7) on 200 training problems; export; a new PPM trained on these on-policy
   pairs, final-step pairs of whole trajectories included (by default the policy is kept:
   retraining it from scratch would double the demo's time; `policy_rounds=2` retrains it).
5. On the held-out split: the tiny policy alone (greedy), majority voting over samples,
   MCTS without the PPM and MCTS with the PPM (the PPM guides the search; every rollout's
   answer votes), each with its compute; sampling rows at temperature 0.7. Then the PPM's
   step ranking on the held-out MCTS trees (`ppm_step_ranking`).

Everything is built on `rstar_fast.evolve` (so `OUT/work/` resumes like any evolve run) and
the rows land in `OUT/summary.json` as `[{name, accuracy, problems, ...}]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rstar_fast.evolve import (
    TINY_PPM,
    TINY_SFT,
    EvalRow,
    EvolveConfig,
    SETTINGS_FILE,
    Evolver,
    TinyBase,
    evaluate,
    format_rounds,
    greedy_config,
    keep_settings,
)
from rstar_fast.files import write_json
from rstar_fast.search.api import TREES_FILE

SUMMARY_FILE = "summary.json"
MCTS_PPM_ROW = "mcts_ppm"  # the held-out row (and OUT/eval/ folder) of MCTS with the PPM
# below this held-out greedy accuracy the demo warns that the tiny policy failed to train: in
# measured runs working policies solved 55-83% alone and failed ones 15-17%
BROKEN_POLICY_ACCURACY = 0.3


@dataclass
class DemoConfig:
    """The demo's sizes; the defaults take 10 minutes on two fast CPU cores (572 s measured),
    and 18 (1089 s) where the cores run the same work at half that speed."""

    n_train: int = 1200  # data diversity is what makes the tiny policy copy rather than memorize
    n_test: int = 60
    difficulty: str = "mixed"  # synthetic difficulty: 2-6 reasoning steps
    # share of operations that restate an earlier amount: without them the tiny policy solves
    # ~98% greedily and search has nothing left to add
    recall: float = 0.5
    seed: int = 0
    # training problems searched with the tiny models in round 2: their on-policy pairs are what
    # teach the PPM the tiny policy's mistakes (60 problems gave ~250 pairs and a PPM that made
    # MCTS worse; 240 gave ~900-1000 pairs and MCTS with the PPM 8-13 points above MCTS alone)
    round2_problems: int = 200
    policy_rounds: int = 1  # rounds that (re)train the policy; 2 retrains it in round 2 as well
    tiny: TinyBase = field(default_factory=lambda: TinyBase(hidden_size=128, layers=4, heads=4))
    # round 1: the simulated policy, instant timing
    bootstrap: str = "sim:profile=instant"
    round1: dict[str, Any] = field(default_factory=lambda: {"iterations": 4, "n_generate_sample": 3, "max_depth": 8})
    # rounds >= 2 with the tiny models: short steps, few samples, and the held-out search's
    # temperature, so the PPM learns from the mistakes the policy makes at test time. On six
    # finished runs 0.7 instead of the preset's 1.0 gave fewer pairs (398-583, not 737-1000), a
    # PPM that ranked held-out steps a little better (61.8% -> 65.4% on average) and trained
    # 30-50 s sooner, and the same accuracy (MCTS with the PPM 72.5% -> 73.3% on average)
    round2: dict[str, Any] = field(default_factory=lambda: {
        "iterations": 8, "n_generate_sample": 4, "max_depth": 8, "max_tokens": 40, "temperature": 0.7})
    sft_top_n: int = 4
    pairs_min_edit_distance: int = 1  # the tiny models' mistakes are one-token edits
    sft: dict[str, Any] = field(default_factory=lambda: dict(TINY_SFT))
    ppm: dict[str, Any] = field(default_factory=lambda: dict(TINY_PPM))
    # round 1's PPM (trained on the simulated policy's pairs) ranks the tiny policy's steps near
    # chance whatever its training (47-55% measured), and it only seeds round 2's Q values:
    # one epoch instead of three saves ~95 s of the 15-minute budget
    round1_ppm: dict[str, Any] = field(default_factory=lambda: {"epochs": 1})
    # held-out evaluation. Temperature 0.7 (the eval preset has 1.0): at 1.0 the tiny policy
    # writes many broken steps that the tiny PPM cannot rank, and the search spends its
    # rollouts on them. Every rollout's answer votes (the eval preset's top 4 by PPM score
    # leaves the choice to the tiny PPM's final-answer ranking, near chance), as all samples
    # vote in the majority row. 8 candidates per expansion instead of 4 moved MCTS with the PPM
    # by -6.7 to +5 points on nine finished runs (+0.2 on average) at twice the tokens.
    eval: dict[str, Any] = field(default_factory=lambda: {
        "iterations": 8, "n_generate_sample": 4, "max_depth": 8, "max_tokens": 40, "temperature": 0.7,
        "top_k_vote": 8})
    vote_samples: int = 8  # majority voting: samples per problem
    progress: bool = True


@dataclass(frozen=True)
class StepRanking:
    """How often the PPM scores an on-track step above an off-track sibling (ties count half)."""

    pairs: int
    accuracy: float | None  # None when no node had both kinds of child


def ppm_step_ranking(trees_path: str | Path) -> StepRanking:
    """The PPM's step ranking in searched trees of synthetic problems.

    A synthetic question's plan says whether each partial solution is still right, so every
    on-track node whose children include an on-track and an off-track step gives pairs; each
    child's score is its stored PPM value (nodes the PPM never scored are left out). This is
    the quantity MCTS with a PPM lives on, measured on the held-out trees themselves.
    """
    from rstar_fast.engines.sim_steps import judge, make_plan, parse_solution
    from rstar_fast.search.export import rebuild_tree
    from rstar_fast.synthetic import parse_question

    wins = 0.0
    pairs = 0
    with open(trees_path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if parse_question(record["question"]) is None:
                continue
            plan = make_plan(record["question"], None)
            stack = [(rebuild_tree(record["rstar"]), "")]
            while stack:
                node, prefix = stack.pop()
                labelled: dict[int, list[float]] = {1: [], -1: []}
                for child in node.children:
                    text = prefix + child.text
                    verdict = judge(plan, parse_solution(text))
                    if verdict == 1:
                        stack.append((child, text))
                    if verdict in labelled and child.value != 0.0:
                        labelled[verdict].append(child.value)
                for good in labelled[1]:
                    for bad in labelled[-1]:
                        wins += 1.0 if good > bad else 0.5 if good == bad else 0.0
                        pairs += 1
    return StepRanking(pairs, wins / pairs if pairs else None)


def _rows_table(rows: list[EvalRow]) -> str:
    lines = ["| method | accuracy | problems | generated tokens | policy calls | PPM calls | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        lines.append(f"| {r.name} | {acc} | {r.problems} | {r.generated_tokens} | {r.policy_calls} | "
                     f"{r.ppm_calls} | {r.wall_s:.1f} |")
    for r in rows:
        if r.resumed:
            lines.append(f"\n{r.name}: resumed after an interruption; its compute leaves out the {r.resumed} "
                         "problems finished before it")
    return "\n".join(lines)


def _held_out_rows(evolver: Evolver, test: list[dict[str, Any]], cfg: DemoConfig, out: Path) -> list[EvalRow]:
    """The four test-time rows, on the last round's policy and PPM (engines loaded once)."""
    from rstar_fast.engines import load_policy, load_ppm

    k = evolver.cfg.rounds
    policy_dir, ppm_dir = evolver.policy_of(k), evolver.ppm_of(k)
    base = evolver.cfg.eval_config()
    no_ppm = {"need_value_func": False, "update_leaf_value": False}
    configs = [
        ("greedy", "policy alone (greedy)", greedy_config(base)),
        ("majority", f"majority vote over {cfg.vote_samples} samples",
         base.replace(mode="best_of_n", bon_n=cfg.vote_samples, bon_vote="majority", **no_ppm)),
        ("mcts", "MCTS without PPM (majority over trajectories)", base.replace(**no_ppm)),
        (MCTS_PPM_ROW, "MCTS with PPM", base),
    ]
    policy = load_policy(f"hf:{policy_dir}")
    ppm = load_ppm(f"hf:{ppm_dir}")
    rows = []
    try:
        for key, name, search_cfg in configs:
            if cfg.progress:
                print(f"[eval] {name} on {len(test)} held-out problems", flush=True)
            rows.append(evaluate(test, search_cfg, out / "eval" / key, policy=policy,
                                 ppm=ppm if search_cfg.need_value_func else None, name=name))
    finally:
        import asyncio

        async def close() -> None:
            await policy.close()
            await ppm.close()

        asyncio.run(close())
    return rows


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the demo in `out_dir`; return the rows written to OUT/summary.json."""
    from rstar_fast.synthetic import train_test_problems

    # the demo trains models: a missing training stack is said before anything is written
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    # a rerun resumes: finished stages and rows are reused, so they must come from these settings
    keep_settings(out / SETTINGS_FILE, {k: v for k, v in asdict(cfg).items() if k != "progress"},
                  f"start afresh: another --out folder, or delete {out}")
    start = time.perf_counter()
    train, test = train_test_problems(cfg.n_train, cfg.n_test, seed=cfg.seed, difficulty=cfg.difficulty,
                                      recall=cfg.recall)
    (out / "train.json").write_text(json.dumps(train))
    (out / "test.json").write_text(json.dumps(test))
    evolve_cfg = EvolveConfig(
        problems=train, work_dir=out / "work", rounds=2, policy=cfg.bootstrap,
        limit=[cfg.n_train, min(cfg.n_train, cfg.round2_problems)],
        # the searches with the tiny models sample from seeds, so a run is reproducible
        round1_overrides=dict(cfg.round1), later_overrides={"seed": cfg.seed, **cfg.round2},
        eval_overrides={"seed": cfg.seed, **cfg.eval},
        sft={"progress": cfg.progress, **cfg.sft}, ppm={"progress": cfg.progress, **cfg.ppm},
        round1_ppm=dict(cfg.round1_ppm),
        sft_top_n=cfg.sft_top_n, pairs_min_edit_distance=cfg.pairs_min_edit_distance, policy_rounds=cfg.policy_rounds,
        tiny=cfg.tiny, progress=cfg.progress,
    )
    from rstar_fast.training.common import progress_bars

    evolver = Evolver(evolve_cfg)
    with progress_bars(False):  # no per-load weight bars between the demo's own lines
        rounds = evolver.run()
        rows = _held_out_rows(evolver, test, cfg, out)
    ranking = ppm_step_ranking(out / "eval" / MCTS_PPM_ROW / TREES_FILE)
    wall = time.perf_counter() - start
    records = [r.to_dict() for r in rows]
    write_json(out / SUMMARY_FILE, records)
    write_json(out / "demo.json", {"config": asdict(cfg), "rounds": [r.to_dict() for r in rounds], "rows": records,
                                   "ppm_step_ranking": asdict(ranking), "wall_s": round(wall, 1)})
    if cfg.progress:
        print("\n" + format_rounds(rounds))
        print("\n" + _rows_table(rows))
        if ranking.accuracy is not None:
            print(f"\nthe PPM scores the on-track step above an off-track sibling in "
                  f"{100 * ranking.accuracy:.1f}% of {ranking.pairs} pairs of the held-out MCTS trees")
        greedy = rows[0].accuracy
        if greedy is not None and greedy < BROKEN_POLICY_ACCURACY:
            print(f"\nwarning: the tiny policy alone solved {100 * greedy:.1f}%. In the runs measured so far a policy "
                  "this weak had not learned to copy the question's numbers, which about one tiny model in seventeen "
                  "trained from scratch here fails to do; run again with another --model-seed.")
        print(f"\ndemo finished in {wall:.0f} s; rows in {out / SUMMARY_FILE}")
    return records


def _run_cli(args: argparse.Namespace) -> int:
    from rstar_fast.evolve import EvolveError
    from rstar_fast.training import TrainingError

    cfg = DemoConfig(progress=not args.quiet)
    if args.problems is not None:
        cfg.n_train = args.problems
    if args.test_problems is not None:
        cfg.n_test = args.test_problems
    if args.round2_problems is not None:
        cfg.round2_problems = args.round2_problems
    if args.sft_steps is not None:
        cfg.sft["max_steps"] = args.sft_steps
    if args.model_seed is not None:
        cfg.tiny = replace(cfg.tiny, seed=args.model_seed)
        cfg.sft["seed"] = cfg.ppm["seed"] = args.model_seed
    if args.recall is not None:
        if not 0 <= args.recall <= 1:
            print(f"rstar-fast demo: error: --recall must be in [0, 1], got {args.recall}", file=sys.stderr)
            return 2
        cfg.recall = args.recall
    try:
        records = run_demo(args.out, cfg)
    except (EvolveError, TrainingError) as e:
        print(f"rstar-fast demo: error: {e}", file=sys.stderr)
        return 2
    if args.quiet:  # no progress, but the result
        print(_rows_table([EvalRow(**r) for r in records]))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `demo` to an argparse subparsers object."""
    from rstar_fast.cli import at_least

    p = subparsers.add_parser(
        "demo", help="the whole method with tiny real models on CPU, in minutes",
        description="Bootstrap round with the simulated policy, a tiny policy and PPM trained from "
        "scratch, a round with them, then a held-out table: policy alone, majority voting, MCTS "
        "without and with the PPM.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--problems", type=at_least(1, int), default=None, metavar="N", help="training problems (default 1200)")
    p.add_argument("--test-problems", type=at_least(1, int), default=None, metavar="N", help="held-out problems (default 60)")
    p.add_argument("--round2-problems", type=at_least(1, int), default=None, metavar="N",
                   help="training problems searched in round 2, whose pairs train the final PPM (default 200)")
    p.add_argument("--sft-steps", type=at_least(1, int), default=None, metavar="N", help="policy SFT steps (default 1500)")
    p.add_argument("--model-seed", type=at_least(0, int), default=None, metavar="N",
                   help="seed of the tiny models' initialisation and training data order")
    p.add_argument("--recall", type=float, default=None, metavar="P",
                   help="share of operations that restate an earlier amount (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress output: only the held-out table")
    p.set_defaults(func=_run_cli)
    return p


__all__ = ["DemoConfig", "StepRanking", "ppm_step_ranking", "register", "run_demo"]
