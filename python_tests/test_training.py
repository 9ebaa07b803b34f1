"""PPM and policy training on tiny models: checkpoints, losses, masking, data errors, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from rstar_fast.engines.tiny import build_tiny_policy  # noqa: E402
from rstar_fast.training import (  # noqa: E402
    PPMHParams,
    SFT_TEMPLATE,
    SFTHParams,
    TrainingConfigError,
    TrainingDataError,
    TrainingError,
    load_preference_pairs,
    load_sft_examples,
    load_train_result,
    train_ppm,
    train_sft,
)
from rstar_fast.cli import main as cli_main  # noqa: E402
from rstar_fast.training.cli import register  # noqa: E402
from rstar_fast.training.common import check_init  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rstar_format"
FAST = dict(learning_rate=1e-3, batch_size=8, per_device_batch_size=8, progress=False)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny random causal LM folder, the 'policy' both trainings start from."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy"), seed=0)


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _toy_pairs(n: int = 16) -> list[dict]:
    """Separable pairs: the good step runs clean code, the bad one is visibly broken."""
    return [
        {
            "prompt": SFT_TEMPLATE.replace("{query}", f"What is {i} + 1?"),
            "pos": f"<code>\n# Step 1: add\nx = {i} + 1\n<end_of_step>",
            "neg": f"<code>\n# Step 1: ???\nx = ((( {i} !!\n<end_of_step>",
            "pos_count": "2",
            "neg_count": 1,
        }
        for i in range(n)
    ]


def _toy_sft(n: int = 16) -> list[dict]:
    return [
        {
            "query": f"What is {i} + {i}?",
            "response": f"<code>\n# Step 1: add\nprint({i} + {i})\n<end_of_code><output>{2 * i}<end_of_output>"
            f"<answer>\\boxed{{{2 * i}}}<end_of_answer>",
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------- data files


def test_reference_files_load():
    pairs = load_preference_pairs(REFERENCE / "rm_data_examples.json")
    assert len(pairs) == 5 and pairs[0].pos_count == 2  # counts are strings in the reference file
    sft = load_sft_examples(REFERENCE / "sft_data_examples.json")
    assert len(sft) == 8 and sft[0].response.startswith("<code>")


def test_json_lines_load(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _toy_sft(3)) + "\n\n")
    assert [e.query for e in load_sft_examples(path)] == [r["query"] for r in _toy_sft(3)]
    # JSON strings may hold U+2028, U+2029 and U+0085 unescaped (the exports write them so):
    # they are not line ends; nor is a CRLF's carriage return part of a record
    odd = [{"query": f"Compute{sep} 1+1.", "response": "<code>\nprint(2)"} for sep in ("\u2028", "\u2029", "\x85")]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in odd), encoding="utf-8")
    assert [e.query for e in load_sft_examples(path)] == [r["query"] for r in odd]
    # a file that opens with a byte order mark (Windows' editors), as the problem loader takes it
    path.write_text(json.dumps(_toy_sft(2)), encoding="utf-8-sig")
    assert [e.query for e in load_sft_examples(path)] == [r["query"] for r in _toy_sft(2)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        ("[]", "no records"),
        ('[\n {"query": "q", "response": "r"},\n {"query": "q" "response": "r"}\n]', ":3: bad JSON"),
        ('[\n {"query": "q", "response": "r"},\n {"query": "q"}\n]', ":3: record 2 lacks field(s) response"),
        ('[\n {"query": "q", "response": ""}\n]', ":2: record 1 field 'response' must be a non-empty string"),
        ('[\n {"query": "a\\ud800b", "response": "r"}\n]', ":2: record 1 field 'query' holds '\\ud800' at character 1"),
        ('[\n ["q", "r"]\n]', ":2: record 1 is a list"),
        ('{"query": "q", "response": "r"}\n{"query": "q", "response": "r"\n', ":2: bad JSON"),
        ('[\n {"query": "q", "response": "r"}\n', "not closed"),
    ],
)
def test_bad_sft_files_name_file_and_line(tmp_path, text, expected):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TrainingDataError) as err:
        load_sft_examples(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_bad_pair_count_and_missing_file(tmp_path):
    bad = _write(tmp_path / "pairs.json", [{"prompt": "p", "pos": "a", "neg": "b", "pos_count": "many"}])
    with pytest.raises(TrainingDataError, match=r"pairs.json:1: field 'pos_count'"):
        load_preference_pairs(bad)
    with pytest.raises(TrainingDataError, match="no such data file"):
        train_ppm(tmp_path / "missing.json", "tiny", tmp_path / "out")


@pytest.mark.parametrize("count, expected", [
    ("Infinity", "got inf"), (-1, "got -1"), (2.5, "got 2.5"), ("²", "got '²'"), (True, "got True")])
def test_pair_counts_must_be_non_negative_integers(tmp_path, count, expected):
    text = '[{"prompt": "p", "pos": "a", "neg": "b", "pos_count": %s}]' % (
        count if count == "Infinity" else json.dumps(count))
    bad = tmp_path / "pairs.json"
    bad.write_text(text)
    with pytest.raises(TrainingDataError) as err:
        load_preference_pairs(bad)
    assert "pairs.json:1: field 'pos_count' must be a non-negative integer" in str(err.value)
    assert expected in str(err.value)


def test_bad_options(tmp_path, policy):
    data = _write(tmp_path / "sft.json", _toy_sft(2))
    with pytest.raises(TrainingConfigError, match="unknown SFTHParams option"):
        train_sft(data, policy, tmp_path / "out", learnin_rate=1.0)
    with pytest.raises(TrainingConfigError, match="precision must be one of"):
        train_sft(data, policy, tmp_path / "out", precision="fp8")
    with pytest.raises(TrainingConfigError, match="no such model folder"):
        train_sft(data, tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize("value, expected", [
    (dict(learning_rate="abc"), "learning_rate must be a number, got 'abc'"),
    (dict(batch_size=2.5), "batch_size must be an integer, got 2.5"),
    (dict(batch_size=True), "batch_size must be an integer, got True"),
    (dict(epochs="inf"), "epochs must be a number, got 'inf'"),
    (dict(progress="no"), "progress must be true or false, got 'no'"),
    (dict(optim=3), "optim must be a string, got 3"),
    (dict(tiny_hidden_size=30, tiny_heads=4), "must be a multiple of tiny_heads"),
    (dict(tiny_hidden_size=0), "tiny_hidden_size must be >= 1, got 0"),
    (dict(tiny_layers=0), "tiny_layers must be >= 1, got 0"),
    (dict(seed=-1), "seed must be in [0, 2**32), got -1"),
    (dict(seed=2**32), "seed must be in [0, 2**32)"),
    (dict(deepspeed="/nonexistent/ds.json"), "deepspeed: /nonexistent/ds.json: no such config file"),
    (dict(optim="bogus_opt"), "optim must be a transformers optimizer name, e.g. adamw_torch, adamw_torch_fused"),
    (dict(max_grad_norm=-1), "max_grad_norm must be >= 0 (0: no clipping), got -1.0"),
    (dict(save_steps=-1), "save_steps must be >= 0 (0: final only), got -1"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0 (0: none), got -0.1"),
])
def test_option_types_are_checked_before_any_data_is_read(tmp_path, value, expected):
    with pytest.raises(TrainingConfigError) as err:
        train_sft(tmp_path / "not_read.json", "tiny", tmp_path / "out", **value)
    assert expected in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_negative_reward_centering_is_refused(tmp_path):
    with pytest.raises(TrainingConfigError, match="center_rewards_coefficient must be >= 0"):
        train_ppm(tmp_path / "not_read.json", "tiny", tmp_path / "out", center_rewards_coefficient=-1)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a training gets as far as building or loading a model."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("rstar_fast.training.ppm.resolve_init", boom)
    monkeypatch.setattr("rstar_fast.training.sft.resolve_init", boom)


@pytest.mark.parametrize("out, expected", [
    ("afile", "--out {tmp}/afile: exists and is not a folder"),
    ("afile/sub", "--out {tmp}/afile/sub: {tmp}/afile is not a folder"),
])
def test_out_is_checked_before_any_model_is_loaded(tmp_path, no_model, out, expected):
    (tmp_path / "afile").write_text("keep")
    pairs = _write(tmp_path / "pairs.json", _toy_pairs(2))
    with pytest.raises(TrainingConfigError) as err:
        train_ppm(pairs, "tiny", tmp_path / out, max_steps=1)
    assert str(err.value) == expected.format(tmp=tmp_path)
    assert (tmp_path / "afile").read_text() == "keep"


def test_out_in_an_unwritable_folder_is_refused(tmp_path, no_model):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(TrainingConfigError, match=f"--out {locked}/new/ppm: {locked} is not writable"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(2)), "tiny", locked / "new" / "ppm")


def test_out_that_cannot_be_made_is_refused_before_any_model_is_loaded(tmp_path, no_model):
    """Even where access() says yes (root, under /proc), the folder is made before loading."""
    with pytest.raises(TrainingConfigError, match="--out /proc/rstar-nope/ppm: (cannot make the folder|/proc is)"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(2)), "tiny", "/proc/rstar-nope/ppm")


def test_data_that_is_a_folder_is_named_so(tmp_path, no_model):
    with pytest.raises(TrainingDataError, match="is a folder, not a data file"):
        train_sft(tmp_path, "tiny", tmp_path / "out")


def test_out_may_not_be_the_init_folder(tmp_path, policy, no_model, monkeypatch):
    monkeypatch.chdir(policy.parent)
    same = Path("..") / policy.parent.name / policy.name  # another spelling of the same folder
    with pytest.raises(TrainingConfigError, match=r"--out .*: is the --init model folder; training would overwrite"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(2)), policy, same, overwrite=True)


def test_a_finished_checkpoint_is_overwritten_only_when_asked(tmp_path, no_model):
    out = tmp_path / "ppm"
    out.mkdir()
    (out / "train_result.json").write_text("{}")
    pairs = _write(tmp_path / "pairs.json", _toy_pairs(2))
    with pytest.raises(TrainingConfigError, match=r"--out .*ppm: holds a finished checkpoint \(train_result.json\); "
                                                  "pass --overwrite"):
        train_ppm(pairs, "tiny", out)
    assert (out / "train_result.json").read_text() == "{}"
    with pytest.raises(AssertionError, match="a model was loaded"):  # the checks passed
        train_ppm(pairs, "tiny", out, overwrite=True)
    (out / "train_result.json").unlink()  # an unfinished run (evolve resumes into these): no flag needed
    (out / "config.json").write_text("{}")
    with pytest.raises(AssertionError, match="a model was loaded"):
        train_ppm(pairs, "tiny", out)


def test_numbers_given_as_text_are_converted():
    """A YAML `KEY=VALUE` reads 1e-5 (no dot) as text; a whole float is a valid integer."""
    hp = PPMHParams.from_kwargs(learning_rate="1e-5", max_steps="20", batch_size=64.0, warmup_ratio=0)
    assert (hp.learning_rate, hp.max_steps, hp.batch_size, hp.warmup_ratio) == (1e-5, 20, 64, 0.0)
    assert isinstance(hp.batch_size, int) and isinstance(hp.warmup_ratio, float)


def test_the_warmup_fraction_reaches_the_trainer(tmp_path):
    """transformers 4.x takes it as warmup_ratio (warmup_steps must be whole), 5.x as warmup_steps < 1."""
    from transformers import TrainingArguments

    from rstar_fast.training.common import trainer_kwargs

    hp = SFTHParams.from_kwargs(warmup_ratio=0.1, max_steps=100)
    assert TrainingArguments(**trainer_kwargs(hp, tmp_path)).get_warmup_steps(100) == 10
    hp = SFTHParams.from_kwargs(max_steps=100)
    assert TrainingArguments(**trainer_kwargs(hp, tmp_path)).get_warmup_steps(100) == 0


def test_init_path_typo_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(TrainingConfigError, match="the folder runs exists here"):
        check_init("runs/policy")
    check_init("Qwen/Qwen2.5-Math-7B")  # no local folder Qwen: a Hub id
    check_init("tiny")
    with pytest.raises(TrainingConfigError, match="not a model folder"):
        check_init(tmp_path / "runs")


def test_cli_flags_are_typed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["train", "sft", "--data", "d.json", "--init", "tiny", "--out", str(tmp_path),
                              "--learning-rate", "abc"])
    assert exit_.value.code == 2 and "--learning-rate: invalid float value: 'abc'" in capsys.readouterr().err


# ---------------------------------------------------------------- PPM


def test_ppm_learns_separable_pairs_and_saves_a_loadable_checkpoint(tmp_path, policy):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = _toy_pairs()
    out = tmp_path / "ppm"
    result = train_ppm(_write(tmp_path / "pairs.json", pairs), policy, out, epochs=10, eval_fraction=0, **FAST)

    assert result.kind == "ppm" and result.examples == 16 and result.steps == 20 and result.eval_examples == 0
    # The reference's loss: each pair's -log sigmoid(margin) times 1 / (pos_count * neg_count) = 1/2,
    # summed over the 8 pairs of a batch; the new head starts near zero, so every margin near 0.
    assert result.first_loss == pytest.approx(8 * 0.5 * math.log(2), abs=0.05)
    assert result.final_loss < result.first_loss / 2
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 21)) and "accuracy" in log[0]
    assert load_train_result(out) == result

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id is not None
    # Scored as the engines do: one sequence at a time, the raw value at the last token.
    with torch.no_grad():
        def score(text: str) -> float:
            return model(**tok(text, return_tensors="pt")).logits[0, 0].item()

        margins = [score(p["prompt"] + p["pos"]) - score(p["prompt"] + p["neg"]) for p in pairs[:4]]
    assert all(m > 0 for m in margins)


def test_ppm_on_reference_pairs_drops_overlong(tmp_path):
    pairs = REFERENCE / "rm_data_examples.json"
    result = train_ppm(pairs, "tiny", tmp_path / "ppm", max_length=1000, max_steps=1, eval_fraction=0, **FAST)
    assert result.examples + result.skipped == 5 and result.skipped == 2 and result.steps == 1
    with pytest.raises(TrainingDataError, match="all 5 pairs are longer than max_length=100"):
        train_ppm(pairs, "tiny", tmp_path / "ppm2", max_length=100, eval_fraction=0, **FAST)
    with pytest.raises(TrainingDataError, match=r"all 4 pairs it trains on \(1 held out\) are longer"):
        train_ppm(pairs, "tiny", tmp_path / "ppm3", max_length=100, **FAST)


def test_ppm_holds_out_the_pairs_the_references_script_holds_out():
    from datasets import Dataset

    from rstar_fast.training.ppm import hold_out

    for n in (2, 5, 40, 401):
        records = _toy_pairs(n)
        pairs = load_preference_pairs_from(records)
        # the reference's train_RM.py: shuffle(seed=42), then train_test_split(test_size=0.05, seed=42)
        split = Dataset.from_list(records).shuffle(seed=42).train_test_split(test_size=0.05, seed=42)
        train, held = hold_out(pairs, 0.05, 42)
        assert [p.pos for p in train] == split["train"]["pos"] and [p.pos for p in held] == split["test"]["pos"]
        assert len(held) == math.ceil(0.05 * n)


def load_preference_pairs_from(records: list[dict]):
    from rstar_fast.training.data import PreferencePair

    return [PreferencePair(prompt=r["prompt"], pos=r["pos"], neg=r["neg"]) for r in records]


def test_ppm_keeps_the_weights_of_lowest_held_out_loss(tmp_path, policy):
    pairs = _write(tmp_path / "pairs.json", _toy_pairs(40))
    # held-out pairs the training teaches the wrong way round: their loss is lowest at the first evaluation
    swapped = _write(tmp_path / "swapped.json", [{**p, "pos": p["neg"], "neg": p["pos"]} for p in _toy_pairs(8)])
    out = tmp_path / "ppm"
    result = train_ppm(pairs, policy, out, epochs=4, eval_steps=5, eval_pairs=str(swapped), **FAST)

    assert result.examples == 40 and result.eval_examples == 8 and result.steps == 20  # every pair trains
    evals = [row for row in map(json.loads, (out / "loss_log.jsonl").read_text().splitlines()) if "eval_loss" in row]
    assert [row["step"] for row in evals] == [5, 10, 15, 20]
    assert evals[0]["eval_loss"] < evals[-1]["eval_loss"] and result.best_step == 5
    # the saved model is step 5's: its held-out loss, evaluated again, is the one logged there
    assert result.eval_metrics["eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-4)
    assert not list(out.glob("checkpoint-*"))  # the finished model replaces them

    # by default 5% of the pairs are held out (2 of 40) and the last weights, the best here, are kept
    result = train_ppm(pairs, policy, tmp_path / "default", epochs=4, **FAST)
    assert (result.examples, result.eval_examples, result.best_step) == (38, 2, 20)
    assert result.eval_metrics["eval_accuracy"] == 1.0


def test_an_interrupted_evaluated_ppm_resumes_and_still_keeps_its_best_weights(tmp_path, policy, monkeypatch):
    from rstar_fast.training import ppm

    pairs = _write(tmp_path / "pairs.json", _toy_pairs(40))
    swapped = _write(tmp_path / "swapped.json", [{**p, "pos": p["neg"], "neg": p["pos"]} for p in _toy_pairs(8)])
    out = tmp_path / "ppm"
    hp = dict(epochs=4, eval_steps=5, eval_pairs=str(swapped), **FAST)
    real_logger = ppm.make_loss_logger
    monkeypatch.setattr(ppm, "make_loss_logger", _dying_at(12, "on_step_end"))
    with pytest.raises(KeyboardInterrupt):  # after the checkpoints of steps 5 and 10
        train_ppm(pairs, policy, out, **hp)
    assert sorted(c.name for c in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    monkeypatch.setattr(ppm, "make_loss_logger", real_logger)
    result = train_ppm(pairs, policy, out, **hp)
    evals = [row for row in map(json.loads, (out / "loss_log.jsonl").read_text().splitlines()) if "eval_loss" in row]
    assert [row["step"] for row in evals] == [5, 10, 15, 20] and result.best_step == 5
    assert result.eval_metrics["eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-4)


def test_ppm_held_out_settings_are_checked(tmp_path):
    for bad, message in (({"eval_fraction": 1.0}, "eval_fraction must be in"),
                         ({"eval_steps": 0}, "eval_steps must be >= 1"),
                         ({"eval_pairs": str(tmp_path / "none.json")}, "none.json: no such file"),
                         ({"save_steps": 7, "eval_steps": 5}, "must be a multiple of eval_steps")):
        with pytest.raises(TrainingConfigError, match=message):
            PPMHParams.from_kwargs(**bad)
    PPMHParams.from_kwargs(save_steps=7, eval_steps=5, eval_fraction=0)  # nothing evaluated, nothing to choose
    one = _write(tmp_path / "one.json", _toy_pairs(1))
    with pytest.raises(TrainingDataError, match=r"one.json: 1 pair\(s\) are too few .* --eval-fraction 0"):
        train_ppm(one, "tiny", tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()  # refused before any model is built


def test_a_pair_is_prompt_and_step_without_eos_and_max_length_keeps_a_pair_that_fills_it():
    """As the reference's PPM reads a step: its value at the step's last token, no EOS after."""
    from rstar_fast.training.data import PreferencePair
    from rstar_fast.training.ppm import tokenize_pairs

    class ByteTokenizer:
        eos_token = "#"

        def __call__(self, texts):
            return {"input_ids": [list(t.encode()) for t in texts]}

    pairs = [PreferencePair("pp", "abc", "de", 1, 1), PreferencePair("pp", "abcd", "de", 1, 2)]
    data, dropped = tokenize_pairs(pairs, ByteTokenizer(), max_length=5)
    assert dropped == 1
    assert data["chosen_ids"] == [list(b"ppabc")] and data["rejected_ids"] == [list(b"ppde")]
    assert data["length"] == [5] and data["factor"] == [1.0]


# ---------------------------------------------------------------- SFT


def test_sft_masks_the_prompt(tmp_path, policy):
    from rstar_fast.training.sft import SFTHParams, build_sft_trainer

    examples = load_sft_examples(_write(tmp_path / "sft.json", _toy_sft(3)))
    trainer, _ = build_sft_trainer(examples, policy, tmp_path / "out", SFTHParams(**FAST))
    tok = trainer.processing_class
    # the prompt rounds 2-4 search with, to the character
    assert SFT_TEMPLATE.replace("{query}", "Q?") == \
        "<|user|>:\nQ?\n<|assistant|>: Let's think step by step and solve the problem with code."
    prompt_len = len(tok(SFT_TEMPLATE.replace("{query}", examples[0].query))["input_ids"])
    row = trainer.train_dataset[0]
    labels, ids = row["labels"], row["input_ids"]
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tok.decode(ids[prompt_len:]) == examples[0].response + tok.eos_token

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(3)]
    for i, n in enumerate(lengths):
        assert (batch["labels"][i, :prompt_len] == -100).all()  # prompts of the same shape here
        assert (batch["labels"][i, n:] == -100).all() and batch["attention_mask"][i, n:].sum() == 0
        assert (batch["labels"][i, prompt_len:n] == batch["input_ids"][i, prompt_len:n]).all()


def test_sft_trains_and_saves_a_loadable_policy(tmp_path, policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    result = train_sft(_write(tmp_path / "sft.json", _toy_sft()), policy, out, epochs=4, **FAST)
    assert result.kind == "sft" and result.examples == 16 and result.steps == 8
    assert result.final_loss < result.first_loss
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache and tok.convert_tokens_to_ids("<end_of_step>") != tok.unk_token_id
    assert (out / "train_result.json").is_file() and (out / "loss_log.jsonl").stat().st_size > 0


def _dying_at(step: int, hook: str = "on_log"):
    """A make_loss_logger whose run dies (KeyboardInterrupt) in the logger's `hook` at `step`."""
    from rstar_fast.training import common

    real = common.make_loss_logger

    def make(path):
        logger = real(path)
        inner = getattr(logger, hook)

        def dying(args, state, control, **kw):
            inner(args, state, control, **kw)
            if state.global_step == step:
                raise KeyboardInterrupt
        setattr(logger, hook, dying)
        return logger
    return make


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, policy, monkeypatch):
    """With save_steps, a run killed part way goes on from its last checkpoint when run again
    into the same folder; the loss log keeps the steps before it, and the finished model
    replaces the checkpoints. The tied lm_head the checkpoint saves once is no warning."""
    from rstar_fast.training import common, sft

    data, out = _write(tmp_path / "sft.json", _toy_sft()), tmp_path / "sft"
    real_logger = common.make_loss_logger
    crashing_logger = _dying_at(3)  # the run dies after step 3, its checkpoint at step 2
    settings = dict(max_steps=4, save_steps=2, logging_steps=1, **FAST)
    monkeypatch.setattr(sft, "make_loss_logger", crashing_logger)
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, **settings)
    first = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3] and common.last_checkpoint(out).name == "checkpoint-2"
    monkeypatch.setattr(sft, "make_loss_logger", real_logger)
    said: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("transformers.trainer").addHandler(listener)
    try:
        result = train_sft(data, policy, out, **settings)
    finally:
        logging.getLogger("transformers.trainer").removeHandler(listener)
    assert not [m for m in said if "missing keys" in m]
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == first[:2]
    # the result is the whole run's, as the loss log is, not the resumed part's
    losses = [r["loss"] for r in rows]
    assert result.steps == 4 and (result.first_loss, result.final_loss) == (losses[0], losses[-1])
    assert result.mean_loss == pytest.approx(sum(losses) / 4)
    assert not list(out.glob("checkpoint-*")) and (out / "train_result.json").is_file()
    assert not (out / "train_settings.json").exists()


def test_a_resume_killed_as_it_starts_keeps_the_loss_log_of_the_steps_before(tmp_path, policy, monkeypatch):
    """A resume rewrites the loss log to the rows up to its checkpoint: the rows are on disk
    before it trains a step, so a kill then (no buffer flushed) loses none of them."""
    from rstar_fast.training import common, sft

    data, out = _write(tmp_path / "sft.json", _toy_sft()), tmp_path / "sft"
    settings = dict(max_steps=4, save_steps=2, logging_steps=1, **FAST)
    monkeypatch.setattr(sft, "make_loss_logger", _dying_at(3))
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, **settings)
    real = common.make_loss_logger
    on_disk: list[str] = []

    def killed_as_it_starts(path):
        logger = real(path)
        begin = logger.on_train_begin

        def dying(args, state, control, **kw):
            begin(args, state, control, **kw)
            on_disk.append(path.read_text())  # what a SIGKILL here would leave
            raise KeyboardInterrupt
        logger.on_train_begin = dying
        return logger

    monkeypatch.setattr(sft, "make_loss_logger", killed_as_it_starts)
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, **settings)
    assert [json.loads(line)["step"] for line in on_disk[0].splitlines()] == [1, 2]


def test_only_the_newest_checkpoints_are_kept(tmp_path, policy, monkeypatch):
    """Checkpoints hold the optimizer's state too (tens of GB each for a 7B model): a run keeps
    the newest two by default, enough to resume from when the newest was cut short."""
    from rstar_fast.training import sft

    data, out = _write(tmp_path / "sft.json", _toy_sft()), tmp_path / "sft"
    # the run dies at step 4's log, before its checkpoint
    monkeypatch.setattr(sft, "make_loss_logger", _dying_at(4))
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, max_steps=5, save_steps=1, logging_steps=1, **FAST)
    assert sorted(c.name for c in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_a_run_killed_while_saving_its_last_checkpoint_keeps_its_losses(tmp_path, policy, monkeypatch):
    """Killed after its last checkpoint, as the final model is saved: the rerun trains no step,
    yet its result has the run's losses (they used to be n/a, and evolve showed a loss of 0)."""
    from transformers import Trainer

    data, out = _write(tmp_path / "sft.json", _toy_sft()), tmp_path / "sft"
    settings = dict(max_steps=4, save_steps=2, logging_steps=1, **FAST)
    save = Trainer.save_model

    def killed(self, output_dir=None, _internal_call=False):
        if output_dir == str(out):  # the final save, not a checkpoint's
            raise KeyboardInterrupt
        return save(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, **settings)
    monkeypatch.setattr(Trainer, "save_model", save)
    result = train_sft(data, policy, out, **settings)
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and (result.first_loss, result.final_loss) == (losses[0], losses[-1])
    assert result.mean_loss == pytest.approx(sum(losses) / 4)


def test_a_resumed_run_s_mean_loss_is_the_whole_run_s(tmp_path, policy, monkeypatch):
    """Logged less often than it saves, a run killed after a checkpoint and resumed reports the
    mean loss of all its steps, as an uninterrupted run does: every checkpoint and the last step
    close a logged window, so the windows cover the steps before the resume."""
    from rstar_fast.training import common, sft

    data = _write(tmp_path / "sft.json", _toy_sft())
    settings = dict(max_steps=5, save_steps=2, **FAST)
    every_step = train_sft(data, policy, tmp_path / "every", logging_steps=1, **settings)
    steps = [json.loads(line) for line in (tmp_path / "every" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    whole = train_sft(data, policy, tmp_path / "whole", logging_steps=25, **settings)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # the checkpoints' steps and the last
    mean = sum(r["loss"] for r in steps) / 5
    assert whole.mean_loss == pytest.approx(mean, rel=1e-6) and every_step.mean_loss == pytest.approx(mean, rel=1e-6)

    real_logger = common.make_loss_logger
    crashing_logger = _dying_at(3, "on_step_end")  # the run dies at step 3, its checkpoint at step 2
    out = tmp_path / "resumed"
    monkeypatch.setattr(sft, "make_loss_logger", crashing_logger)
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, logging_steps=25, **settings)
    monkeypatch.setattr(sft, "make_loss_logger", real_logger)
    resumed = train_sft(data, policy, out, logging_steps=25, **settings)
    assert resumed.mean_loss == pytest.approx(whole.mean_loss, rel=1e-6)
    assert (resumed.first_loss, resumed.final_loss) == pytest.approx((whole.first_loss, whole.final_loss), rel=1e-6)


def test_a_full_disk_names_the_run_s_folder(tmp_path, policy, monkeypatch):
    """The write errors of a full disk name no file (torch's) or are safetensors' own: the
    error says which folder could not be written."""
    from safetensors import SafetensorError
    from transformers import Trainer

    data, out = _write(tmp_path / "sft.json", _toy_sft()), tmp_path / "sft"
    for error, kind in ((OSError(28, "No space left on device"), OSError),
                        (SafetensorError("Error while serializing: I/O error: No space left on device"), TrainingError)):
        def full(self, output_dir=None, _internal_call=False, error=error):
            raise error

        monkeypatch.setattr(Trainer, "save_model", full)
        with pytest.raises(kind) as caught:
            train_sft(data, policy, out, max_steps=1, **FAST)
        assert str(out) in str(caught.value) and "No space left on device" in str(caught.value)


def test_a_checkpoint_cut_short_is_passed_over(tmp_path, caplog):
    """A kill or a full disk as trainer_state.json was written leaves it empty or cut: the run
    goes on from the checkpoint before (it used to fail every rerun on the JSON)."""
    from rstar_fast.training.common import last_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # its state not written yet
    with caplog.at_level("WARNING"):
        assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-6/trainer_state.json: cut short" in caplog.text and "checkpoint-8" not in caplog.text


def test_a_resume_under_other_settings_is_refused_and_overwrite_starts_afresh(tmp_path, policy, monkeypatch):
    """An unfinished run's checkpoints go on only under the settings they were trained with:
    another learning rate or other data would be mixed into them unsaid. --overwrite drops them."""
    from transformers import Trainer

    data, out = _write(tmp_path / "sft.json", _toy_sft()), tmp_path / "sft"
    settings = dict(max_steps=4, save_steps=2, logging_steps=1, **FAST)
    save = Trainer.save_model
    monkeypatch.setattr(Trainer, "save_model", lambda self, output_dir=None, _internal_call=False: (
        (_ for _ in ()).throw(KeyboardInterrupt) if output_dir == str(out) else save(self, output_dir, _internal_call)))
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, policy, out, **settings)
    monkeypatch.setattr(Trainer, "save_model", save)
    other = _write(tmp_path / "other.json", _toy_sft(12))
    with pytest.raises(TrainingConfigError, match=r"checkpoints of a run with other settings \(data 'sha256 \w{16}' -> 'sha256 \w{16}'; "
                                                  r"hparams.learning_rate 0.001 -> 0.0001"):
        train_sft(other, policy, out, **dict(settings, learning_rate=1e-4))
    assert (out / "checkpoint-4").is_dir()  # kept: refused, nothing touched
    result = train_sft(other, policy, out, overwrite=True, **dict(settings, learning_rate=1e-4))
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["learning_rate"] == pytest.approx(1e-4)
    assert result.examples == 12 and not list(out.glob("checkpoint-*"))


def test_a_second_training_into_a_busy_out_is_refused(tmp_path, policy):
    """Two launches into one folder: the second would resume the first's checkpoints and save
    over its model; it is refused while the first holds the folder."""
    import os

    from rstar_fast.files import try_lock

    out = tmp_path / "sft"
    out.mkdir()
    held = try_lock(out / ".train.lock")
    try:
        with pytest.raises(TrainingConfigError, match="another training is writing into it"):
            train_sft(_write(tmp_path / "sft.json", _toy_sft(4)), policy, out, max_steps=1, **FAST)
    finally:
        os.close(held)
    assert train_sft(tmp_path / "sft.json", policy, out, max_steps=1, **FAST).steps == 1


def test_a_max_length_refusal_leaves_no_out_folder(tmp_path, policy):
    with pytest.raises(TrainingDataError, match="all 4 prompts are longer than max_length=5"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(4)), policy, tmp_path / "sft", max_length=5, **FAST)
    assert not (tmp_path / "sft").exists()


def test_the_rank_and_the_world_come_from_torchrun_or_mpirun(monkeypatch):
    from rstar_fast.training.common import world_rank, world_size

    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
                 "MV2_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (world_rank(), world_size()) == (0, 1)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert (world_rank(), world_size()) == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (world_rank(), world_size()) == (1, 2)


def test_only_the_first_process_reports(capsys, monkeypatch):
    from rstar_fast.training.cli import _run
    from rstar_fast.training.common import TrainResult

    done = TrainResult(kind="sft", out_dir="o", init="tiny", data_path="d", examples=1, skipped=0, steps=1,
                       epochs=1.0, effective_batch_size=1, first_loss=1.0, final_loss=1.0, mean_loss=1.0,
                       seconds=1.0, loss_log="o/loss_log.jsonl")
    args = argparse.Namespace(init="tiny", out="o", overwrite=False)
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert _run(lambda *a, **k: done, Path("d"), args, SFTHParams) == 0
        assert len(capsys.readouterr().out.splitlines()) == lines


def test_a_model_not_saved_whole_is_not_marked_finished(tmp_path, policy, monkeypatch):
    """FSDP with a sharded state dict, or ZeRO-3 without gathering, saves no loadable model:
    the run fails, saying so, instead of leaving a finished-looking folder."""
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "save_model", lambda self, output_dir=None, _internal_call=False: None)
    with pytest.raises(TrainingError, match="not saved whole .*FULL_STATE_DICT"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(4)), policy, tmp_path / "sft", max_steps=1, **FAST)
    assert not (tmp_path / "sft" / "train_result.json").exists()


def test_only_the_first_process_tries_the_out_folder(tmp_path, monkeypatch):
    """Every process of a distributed run checks --out; making and removing the missing
    folders to try them is the first's alone (several at once would trip over each other).
    The folder is one access() calls writable but mkdir refuses, as /proc is to root, for any
    user the tests run as."""
    from rstar_fast.training.common import check_out

    tried = []

    def refuse(folder, *args, **kwargs):
        tried.append(folder)
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "runs" / "out"
    monkeypatch.setenv("RANK", "3")
    check_out(out, None)  # not this process's to try: the first one says it
    assert tried == []
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainingConfigError, match="cannot make the folder: Permission denied"):
        check_out(out, None)
    assert tried == [tmp_path / "runs"]


def test_examples_cut_at_max_length_are_said_and_counted(tmp_path, policy, caplog):
    records = _toy_sft(4)
    records[0]["response"] += " step" * 200  # past max_length=128: its end and EOS are cut off
    with caplog.at_level("WARNING", logger="rstar_fast.training.sft"):
        result = train_sft(_write(tmp_path / "sft.json", records), policy, tmp_path / "sft", max_steps=1,
                           max_length=128, **FAST)
    assert result.cut == 1 and result.examples == 4
    assert "1 of the 4 examples reach max_length=128 tokens and are cut there" in caplog.text


def test_bfloat16_weights_without_deepspeed_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="rstar_fast.training.common"):
        SFTHParams.from_kwargs(model_dtype="bfloat16")
        SFTHParams.from_kwargs()
    assert caplog.text.count("model_dtype bfloat16 without DeepSpeed") == 1


ZERO3_RUN = r"""
import json, sys
from pathlib import Path
import torch
import transformers
from transformers.integrations import is_deepspeed_zero3_enabled
from rstar_fast.training import PPMHParams, train_ppm, train_sft
from rstar_fast.training.common import trainer_kwargs
from rstar_fast.training.ppm import load_ppm_model

work, policy, released, kw = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sharded = []  # whether each model was loaded in shards (ZeRO-3 on as from_pretrained ran)
load = transformers.PreTrainedModel.from_pretrained.__func__
transformers.PreTrainedModel.from_pretrained = classmethod(
    lambda cls, *a, **k: sharded.append(is_deepspeed_zero3_enabled()) or load(cls, *a, **k))
sft = train_sft(work / "sft.json", policy, work / "sft", **kw)
ppm = train_ppm(work / "pairs.json", policy, work / "ppm", **kw)
# a released PPM's value head becomes the score head, whole, though each process holds a shard
args = transformers.TrainingArguments(**trainer_kwargs(PPMHParams.from_kwargs(**kw), work / "x"))
model = load_ppm_model(released, PPMHParams())
import deepspeed
with deepspeed.zero.GatheredParameters([model.score.weight]):
    head = model.score.weight.detach().clone()
print(json.dumps({"sharded": sharded, "sft_loss": sft.first_loss, "ppm_loss": ppm.first_loss,
                  "head": head.flatten().tolist()}))
"""


def test_deepspeed_zero3_loads_each_model_in_shards_and_starts_the_ppm_head_as_without_it(tmp_path, policy):
    """Under ZeRO-3 the trainer's config exists before a model is loaded, so each process loads
    only its shard (not a whole copy each); the PPM's new head, and a released value head,
    are written whole into the sharded parameter. Run as one process of a launcher would."""
    import importlib.util
    import os
    import shutil
    import socket
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    if importlib.util.find_spec("deepspeed") is None:  # not imported here: the runs are a launcher's processes
        pytest.skip("deepspeed is not installed")
    _write(tmp_path / "sft.json", _toy_sft(16))
    _write(tmp_path / "pairs.json", _toy_pairs(16))
    released = tmp_path / "released"
    shutil.copytree(policy, released)
    hidden = json.loads((released / "config.json").read_text())["hidden_size"]
    weight = torch.linspace(-1, 1, hidden)
    save_file({"v_head.summary.weight": weight.reshape(1, hidden), "v_head.summary.bias": torch.zeros(1)},
              str(released / "value_head.safetensors"))
    config = tmp_path / "ds3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                                  "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                  "gradient_accumulation_steps": "auto"}))
    kw = dict(FAST, max_steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run = subprocess.run([sys.executable, "-c", ZERO3_RUN, str(tmp_path), str(policy), str(released),
                          json.dumps(dict(kw, deepspeed=str(config)))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["sharded"] == [True, True, True], got["sharded"]  # the policy, the PPM, the released PPM
    assert got["head"] == pytest.approx(weight.tolist())
    plain_sft = train_sft(tmp_path / "sft.json", policy, tmp_path / "plain_sft", **kw)
    plain_ppm = train_ppm(tmp_path / "pairs.json", policy, tmp_path / "plain_ppm", **kw)
    assert got["sft_loss"] == pytest.approx(plain_sft.first_loss, rel=1e-5)
    assert got["ppm_loss"] == pytest.approx(plain_ppm.first_loss, rel=1e-5)  # a head near zero: 4 ln 2 here
    for out in ("sft", "ppm"):
        assert load_train_result(tmp_path / out) is not None


def test_training_on_the_cpu_does_not_get_deepspeeds_no_gpu_warning(tmp_path, policy):
    """With DeepSpeed installed, accelerate imports it, and it warned at every training on a
    machine without an accelerator that it was "unable to detect" one."""
    import importlib.util
    import os
    import subprocess
    import sys

    import torch

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without an accelerator")
    _write(tmp_path / "sft.json", _toy_sft(8))
    script = ("import os, sys; from rstar_fast.training import train_sft; "
              "train_sft(sys.argv[1], sys.argv[2], sys.argv[3], max_steps=1, batch_size=8, progress=False); "
              "print('DS_ACCELERATOR', os.environ.get('DS_ACCELERATOR'))")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sft.json"), str(policy), str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unable to detect" not in run.stdout + run.stderr, run.stdout[-3000:]  # DeepSpeed logs to stdout
    assert "DS_ACCELERATOR None" in run.stdout  # only the message goes: DeepSpeed still picks its device


@pytest.mark.timeout(600)
def test_torchrun_on_the_cpu_splits_the_data_between_processes_ddp_and_fsdp(tmp_path, policy):
    """Two processes launched together on a machine without an accelerator train one model
    together (each would otherwise train alone, and one fail on the other's half-written
    folder): the policy with DDP, the PPM with FSDP, each an epoch in two steps of 2 x 4."""
    import shutil
    import socket
    import subprocess
    import sys

    sft = _write(tmp_path / "sft.json", _toy_sft(16))
    pairs = _write(tmp_path / "pairs.json", _toy_pairs(16))
    flags = ["--batch-size", "8", "--per-device-batch-size", "4", "--max-steps", "2", "--learning-rate", "1e-3",
             "--no-progress"]
    runs = {
        "sft": ["train", "sft", "--data", str(sft)],
        "ppm": ["train", "ppm", "--pairs", str(pairs), "--fsdp", "full_shard auto_wrap",
                "--fsdp-layer-cls", "Qwen2DecoderLayer"],
    }
    for name, args in runs.items():
        for _attempt in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            run = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                 "-m", "rstar_fast.cli", *args, "--init", str(policy), "--out", str(tmp_path / name), *flags],
                capture_output=True, text=True, timeout=540)
            # In two full test runs on a loaded machine, one rank of torch's CPU (gloo) DDP aborted
            # inside torch right after its first backward ("terminate called without an active
            # exception"): one more try for that abort alone; any other failure, or the same one
            # twice, fails the test.
            if run.returncode == 0 or "terminate called without an active exception" not in run.stderr:
                break
            shutil.rmtree(tmp_path / name, ignore_errors=True)
        assert run.returncode == 0, run.stderr[-3000:]
        result = load_train_result(tmp_path / name)
        assert result is not None and result.steps == 2 and result.epochs == 1.0, result
    alone = train_sft(sft, policy, tmp_path / "alone", max_steps=2, **dict(FAST, per_device_batch_size=4))
    assert load_train_result(tmp_path / "sft").first_loss == pytest.approx(alone.first_loss, rel=1e-5)


# One process on a machine with 8 GPUs (faked: this machine has none), as `rstar-fast train`
# or evolve runs without a launcher: transformers' Trainer drives them all with DataParallel.
EIGHT_GPUS_RUN = r"""
import json, sys
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 8
torch.cuda.set_device = lambda *a, **k: None
if hasattr(torch, "accelerator"):
    torch.accelerator.is_available = lambda: True
from transformers import TrainingArguments
from rstar_fast.training import PPMHParams
from rstar_fast.training.common import batch_layout, check_devices, trainer_kwargs
from rstar_fast.training.ppm import loss_scale
hp = PPMHParams.from_kwargs(batch_size=128, per_device_batch_size=4, precision="fp32", gradient_checkpointing="off")
args = TrainingArguments(**trainer_kwargs(hp, sys.argv[1]))
check_devices(args, hp)
print(json.dumps({"layout": batch_layout(hp), "n_gpu": args.n_gpu, "scale": loss_scale(hp),
                  "step_batch": args.train_batch_size * args.gradient_accumulation_steps}))
"""


def test_one_process_on_several_gpus_keeps_the_configured_batch(tmp_path):
    """DataParallel gives each GPU a per-device batch: the layout counts them, so a step still
    trains on batch_size examples (not 8x as many), and the PPM's summed loss is that of one
    device's batch, as under DDP."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", EIGHT_GPUS_RUN, str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["n_gpu"] == 8 and got["layout"] == [4, 4, 128] and got["step_batch"] == 128
    assert got["scale"] == pytest.approx(1 / 8)


def test_auto_precision_trains_fp16_where_bf16_is_only_emulated(monkeypatch):
    """Before Ampere torch emulates bf16 (slowly) and says it is supported unless asked for
    native support. (CUDA faked: no GPU here.)"""
    import torch

    from rstar_fast.training.common import precision_flags

    hp = PPMHParams.from_kwargs()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision_flags(hp) == {"bf16": False, "fp16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision_flags(hp) == {"bf16": True, "fp16": False}


def test_a_launcher_s_only_process_trains_on_one_gpu(monkeypatch):
    """`torchrun --nproc_per_node 1` on a machine with 8 GPUs: the Trainer runs DDP on one GPU,
    not DataParallel on all (CUDA faked: no GPU here)."""
    import torch

    from rstar_fast.training.common import batch_layout, gpus_per_process

    hp = PPMHParams.from_kwargs(batch_size=128, per_device_batch_size=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert gpus_per_process(hp) == 8 and batch_layout(hp) == (4, 4, 128)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert gpus_per_process(hp) == 1 and batch_layout(hp) == (4, 32, 128)


def test_a_trainer_on_other_devices_than_the_layout_is_refused():
    from types import SimpleNamespace

    from rstar_fast.training.common import check_devices

    with pytest.raises(TrainingConfigError, match="drives 8 device"):
        check_devices(SimpleNamespace(n_gpu=8), PPMHParams.from_kwargs())
    check_devices(SimpleNamespace(n_gpu=0), PPMHParams.from_kwargs())  # the CPU


def test_the_ppm_loss_keeps_its_scale_when_many_processes_shrink_the_per_device_batch(monkeypatch):
    """The loss is a sum over a device's batch: where batch_layout gives each of many processes
    fewer pairs than configured, each sum is scaled up to the configured batch's."""
    from rstar_fast.training.common import batch_layout
    from rstar_fast.training.ppm import loss_scale

    hp = PPMHParams.from_kwargs(batch_size=512, per_device_batch_size=16)
    for world, per_device, scale in (("8", 16, 1.0), ("64", 8, 2.0), ("512", 1, 16.0)):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert batch_layout(hp)[0] == per_device and loss_scale(hp) == scale


def test_sft_from_scratch_tiny(tmp_path):
    result = train_sft(
        REFERENCE / "sft_data_examples.json", None, tmp_path / "sft", max_steps=2,
        tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, **FAST,
    )
    assert result.init == "tiny" and result.steps == 2
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 1


@pytest.mark.parametrize("kind", ["sft", "ppm"])
def test_group_by_length_batches_similar_lengths(tmp_path, policy, kind):
    """48 examples of 48 lengths in batches of 2: grouped, the sampler sorts groups of 6
    batches by length, so a batch pads far less than a random one; every example still comes
    once per epoch."""
    from rstar_fast.training.ppm import build_ppm_trainer
    from rstar_fast.training.sft import SFTHParams, build_sft_trainer

    hp = {**FAST, "batch_size": 2, "per_device_batch_size": 2}
    if kind == "sft":
        records = _toy_sft(48)
        for i, r in enumerate(records):
            r["response"] = "# more\n" * ((7 * i) % 48) + r["response"]  # lengths shuffled against file order
        examples = load_sft_examples(_write(tmp_path / "data.json", records))

        def build(group: bool):
            return build_sft_trainer(examples, policy, tmp_path / f"out{group}", SFTHParams(**hp, group_by_length=group))[0]
    else:
        records = _toy_pairs(48)
        for i, r in enumerate(records):
            r["prompt"] += "# more\n" * ((7 * i) % 48)
        pairs = load_preference_pairs(_write(tmp_path / "data.json", records))

        def build(group: bool):
            hparams = PPMHParams(**hp, group_by_length=group, eval_fraction=0)
            return build_ppm_trainer(pairs, policy, tmp_path / f"out{group}", hparams)[0]

    def rows(trainer) -> list[list[int]]:
        """Each batch's unpadded lengths; a PPM row's is its pair's longer side's."""
        widths = [batch["attention_mask"].sum(-1).tolist() for batch in trainer.get_train_dataloader()]
        return widths if kind == "sft" else [[max(c, r) for c, r in zip(w[:2], w[2:])] for w in widths]

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * max(b) - sum(b) for b in batches)

    grouped, mixed = rows(build(True)), rows(build(False))
    assert sorted(sum(grouped, [])) == sorted(sum(mixed, [])) and len(set(sum(grouped, []))) == 48
    assert padding(grouped) < padding(mixed) / 3


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rstar-fast")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_train_sft_and_ppm(tmp_path, capsys):
    sft = _write(tmp_path / "sft.json", _toy_sft(4))
    args = _parser().parse_args(
        ["train", "sft", "--data", str(sft), "--init", "tiny", "--out", str(tmp_path / "policy"),
         "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--no-progress"]
    )
    assert args.func(args) == 0
    assert load_train_result(tmp_path / "policy").hparams["learning_rate"] == 1e-3
    pairs = _write(tmp_path / "pairs.json", _toy_pairs(4))
    args = _parser().parse_args(
        ["train", "ppm", "--pairs", str(pairs), "--init", str(tmp_path / "policy"),
         "--out", str(tmp_path / "ppm"), "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    )
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "ppm: 3 pairs" in out and "held out 1: accuracy" in out  # the reference's 5%, at least one
    assert "'loss'" not in out  # --no-progress: the loss goes to loss_log.jsonl, not the Trainer's printer
    assert "Loading weights" not in err and "Writing model shards" not in err  # nor the load's own bars
    assert load_train_result(tmp_path / "ppm").hparams["per_device_batch_size"] == 16  # the default kept
    again = ["train", "ppm", "--pairs", str(pairs), "--init", str(tmp_path / "policy"), "--out", str(tmp_path / "ppm"),
             "--max-steps", "1", "--batch-size", "4", "--no-progress", "--learning-rate", "1e-4"]
    # errors are reported by the top-level CLI
    assert cli_main(again) == 2 and "holds a finished checkpoint" in capsys.readouterr().err
    args = _parser().parse_args([*again, "--overwrite"])
    assert args.func(args) == 0 and load_train_result(tmp_path / "ppm").hparams["learning_rate"] == 1e-4


def test_cli_reports_bad_data_without_traceback(tmp_path, capsys):
    bad = tmp_path / "pairs.json"
    bad.write_text('[{"prompt": "p", "pos": "a"}]')
    assert cli_main(["train", "ppm", "--pairs", str(bad), "--init", "tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: record 1 lacks field(s) neg" in err and "Traceback" not in err


def test_cli_names_the_subcommand_and_out_before_loading_a_model(tmp_path, capsys, no_model):
    from rstar_fast.cli import main

    pairs = _write(tmp_path / "pairs.json", _toy_pairs(2))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    rc = main(["train", "ppm", "--pairs", str(pairs), "--init", "tiny", "--out", str(afile), "--max-steps", "1"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err == f"rstar-fast train ppm: error: --out {afile}: exists and is not a folder\n"
    rc = main(["train", "sft", "--data", str(pairs), "--init", "tiny", "--out", str(tmp_path / "o"),
               "--optim", "bogus_opt"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rstar-fast train sft: error: optim must be a transformers optimizer name")
    assert not (tmp_path / "o").exists()


def test_cli_reports_other_failures_under_the_subcommand(tmp_path, capsys, monkeypatch):
    """An OSError or ValueError from deep in training (a full disk, transformers refusing a
    setting) is reported as the top-level CLI reports it, under `train ppm`/`train sft`."""
    from rstar_fast.cli import main

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "model.safetensors"))

    def bug(*args, **kwargs):
        raise KeyError("x")

    monkeypatch.setattr("rstar_fast.training.ppm.train_ppm", disk_full)
    rc = main(["train", "ppm", "--pairs", "p.json", "--init", "tiny", "--out", str(tmp_path / "o")])
    assert rc == 2 and capsys.readouterr().err == (
        f"rstar-fast train ppm: error: {tmp_path}/o/model.safetensors: No space left on device\n")
    monkeypatch.setattr("rstar_fast.training.sft.train_sft", bug)
    rc = main(["train", "sft", "--data", "d.json", "--init", "tiny", "--out", str(tmp_path / "o")])
    assert rc == 1 and capsys.readouterr().err == "rstar-fast train sft: error: KeyError: 'x' (-v shows where)\n"


def test_cli_overwrite_flag(tmp_path):
    args = _parser().parse_args(["train", "ppm", "--pairs", "p", "--init", "tiny", "--out", "o", "--overwrite"])
    assert args.overwrite is True
    args = _parser().parse_args(["train", "sft", "--data", "d", "--init", "tiny", "--out", "o"])
    assert args.overwrite is False


async def test_trained_checkpoints_load_in_the_hf_engines(tmp_path, policy):
    """The engines read the trained PPM as training scored it: raw value at the last token."""
    import torch
    from transformers import AutoModelForSequenceClassification

    pytest.importorskip("rstar_fast.engines.hf")
    from rstar_fast.engines import load_policy, load_ppm
    from rstar_fast.engines.tokenizer import ByteTokenizer

    pairs = _toy_pairs(8)
    out = tmp_path / "ppm"
    train_ppm(_write(tmp_path / "pairs.json", pairs), policy, out, epochs=3, **FAST)
    tok = ByteTokenizer()
    seqs = [tok.encode(p["prompt"] + s) for p in pairs[:2] for s in (p["pos"], p["neg"])]
    ppm = load_ppm(f"hf:{out}", device="cpu")
    try:
        scores = await ppm.score(seqs)
    finally:
        await ppm.close()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        raw = [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert scores == pytest.approx([float(torch.tanh(torch.tensor(r / 5.0))) for r in raw], abs=1e-4)
    assert scores[0] > scores[1] and scores[2] > scores[3]

    sft_out = tmp_path / "policy"
    train_sft(_write(tmp_path / "sft.json", _toy_sft(4)), policy, sft_out, max_steps=1, **FAST)
    engine = load_policy(f"hf:{sft_out}", device="cpu")
    await engine.close()


def test_a_torn_weights_file_or_unreadable_config_is_named_with_its_folder(tmp_path, policy):
    """A weights file cut short raises safetensors' own error, which used to escape as a bare
    traceback; a config transformers cannot read is refused before any work (evolve checks it
    before round 1's search)."""
    import shutil

    torn = tmp_path / "torn"
    shutil.copytree(policy, torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TrainingConfigError, match=f"{torn}: cannot load as a causal LM"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(2)), torn, tmp_path / "out", max_steps=1, **FAST)
    with pytest.raises(TrainingConfigError, match=f"{torn}: cannot load as a sequence classifier"):
        train_ppm(_write(tmp_path / "pairs.json", _toy_pairs(2)), torn, tmp_path / "out", max_steps=1, **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(TrainingConfigError, match=f"{empty}: cannot read its config.json"):
        check_init(empty)


def test_sft_refuses_to_start_from_a_ppm(tmp_path, policy):
    """A sequence classifier loaded as a causal LM would get a random LM head, silently."""
    ppm = tmp_path / "ppm"
    train_ppm(_write(tmp_path / "pairs.json", _toy_pairs(4)), policy, ppm, max_steps=1, **FAST)
    with pytest.raises(TrainingConfigError, match="is a sequence classifier .* policy SFT starts from a causal LM"):
        train_sft(_write(tmp_path / "sft.json", _toy_sft(2)), ppm, tmp_path / "out", max_steps=1, **FAST)
    assert not (tmp_path / "out").exists()


def test_ppm_starts_from_the_reference_value_head(tmp_path, policy):
    """A released PPM (causal LM + value_head.*) keeps its head's weights as the score head."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from rstar_fast.training.common import TrainHParams
    from rstar_fast.training.ppm import load_ppm_model

    released = tmp_path / "released"
    shutil.copytree(policy, released)
    hidden = json.loads((released / "config.json").read_text())["hidden_size"]
    weight = torch.linspace(-1, 1, hidden).reshape(1, hidden)
    save_file({"v_head.summary.weight": weight, "v_head.summary.bias": torch.zeros(1)},
              str(released / "value_head.safetensors"))
    model = load_ppm_model(released, TrainHParams())
    assert torch.equal(model.score.weight.detach(), weight)
    plain = load_ppm_model(policy, TrainHParams())  # a causal LM alone: a new head
    assert not torch.equal(plain.score.weight.detach(), weight)

    # A PPM folder keeps its head, whatever its config says of its architecture.
    plain.score.weight.data.copy_(weight)
    plain.save_pretrained(tmp_path / "ppm")
    config = json.loads((tmp_path / "ppm" / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "ppm" / "config.json").write_text(json.dumps(config))
    assert torch.equal(load_ppm_model(tmp_path / "ppm", TrainHParams()).score.weight.detach(), weight)


def test_unreadable_train_result_is_named(tmp_path):
    from rstar_fast.training import TrainingError

    (tmp_path / "train_result.json").write_text("")  # torn by a kill mid-write
    with pytest.raises(TrainingError, match=r"train_result.json: not a training result this version reads"):
        load_train_result(tmp_path)
    (tmp_path / "train_result.json").write_text('{"kind": "ppm", "unknown": 1}')
    with pytest.raises(TrainingError, match="delete it to train that model again"):
        load_train_result(tmp_path)


def test_retraining_into_a_finished_folder_unmarks_it_until_done(tmp_path, policy, monkeypatch):
    """Interrupted, a retrain must not leave the old run's result beside its half-written files."""
    from transformers import Trainer

    out = tmp_path / "ppm"
    pairs = _write(tmp_path / "pairs.json", _toy_pairs(4))
    train_ppm(pairs, policy, out, max_steps=1, **FAST)
    assert load_train_result(out) is not None

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_ppm(pairs, policy, out, max_steps=1, overwrite=True, **FAST)
    assert load_train_result(out) is None
    monkeypatch.undo()
    train_ppm(pairs, policy, out, max_steps=1, **FAST)  # unfinished now: rerun without --overwrite
    assert load_train_result(out) is not None


# ------------------------------------------------- the reference's PPM loss and tokens


@pytest.mark.parametrize("pos, neg, weight", [
    (1, 1, 1.0), (2, 2, 0.25), (1, 4, 0.25), (2, 1, 0.5), (0, 3, 1 / 3), (None, None, 1.0)])
def test_pair_weight_is_the_references_factor(pos, neg, weight):
    from rstar_fast.training.data import PreferencePair
    from rstar_fast.training.ppm import pair_weight

    assert pair_weight(PreferencePair("p", "a", "b", pos, neg)) == pytest.approx(weight)


def test_ppm_loss_head_and_dropout_are_the_references(tmp_path, policy):
    """Weighted, summed pairwise loss; a new head starts near zero; dropout on its input
    while training only."""
    import torch
    import torch.nn.functional as F

    from rstar_fast.training.ppm import build_ppm_trainer

    records = _toy_pairs(4)
    for r, (pos, neg) in zip(records, [(1, 1), (2, 2), (1, 4), (2, 1)]):
        r["pos_count"], r["neg_count"] = pos, neg
    pairs = load_preference_pairs(_write(tmp_path / "pairs.json", records))
    trainer, _, _ = build_ppm_trainer(pairs, policy, tmp_path / "ppm", PPMHParams(**FAST, eval_fraction=0))
    model = trainer.model
    assert model.score.weight.abs().max().item() < 1e-4  # normal(5e-7, 1e-6)
    with torch.no_grad():
        model.score.weight.normal_()  # margins far from 0, so a wrong weighting shows
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["factor"].tolist() == [1.0, 0.25, 0.25, 0.5]

    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen, rejected = scores[:4], scores[4:]
    expected = (-F.logsigmoid(chosen - rejected) * torch.tensor([1.0, 0.25, 0.25, 0.5])).sum().item()
    assert loss == pytest.approx(expected, rel=1e-5) and torch.equal(scores, again)

    model.train()
    with torch.no_grad():
        noisy = [model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
                 for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])  # the head's input goes through dropout


def _base_without_step_tokens(folder: Path) -> Path:
    """A tiny causal LM whose tokenizer has none of the step-format tokens (as a base model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["What is 2 + 3?\nx = 2 + 3\nprint(x)\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_base_model_gets_the_references_step_tokens_in_its_order(tmp_path):
    from transformers import AutoTokenizer

    from rstar_fast.training.common import REFERENCE_PPM_TOKENS, REFERENCE_SFT_TOKENS

    base = _base_without_step_tokens(tmp_path / "base")
    size = len(AutoTokenizer.from_pretrained(base))
    train_sft(_write(tmp_path / "sft.json", _toy_sft(2)), base, tmp_path / "sft", max_steps=1, **FAST)
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert [tok.convert_tokens_to_ids(t) for t in REFERENCE_SFT_TOKENS] == list(range(size, size + 15))
    prompt = tok(SFT_TEMPLATE.replace("{query}", "Hi?"))["input_ids"]
    assert tok.convert_tokens_to_ids("\n<|assistant|>") in prompt  # one token, as the reference's

    train_ppm(_write(tmp_path / "pairs.json", _toy_pairs(2)), base, tmp_path / "ppm", max_steps=1, **FAST)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ppm")
    assert [tok.convert_tokens_to_ids(t) for t in REFERENCE_PPM_TOKENS] == list(range(size, size + 12))
    assert "<BACK>" not in tok.get_vocab()


def test_a_missing_training_package_is_named_with_its_extra_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    for train in (train_sft, train_ppm):  # a missing data file would be said second
        with pytest.raises(ModuleNotFoundError, match=r"needs trl, which is not installed: pip install 'rstar-fast\[train\]'"):
            train(tmp_path / "missing.json", "tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_a_weight_that_is_not_tied_is_still_said():
    """Only the weights tied to others are dropped from the Trainer's notice."""
    import logging

    from rstar_fast.training.common import _TiedKeysNotice

    notice = _TiedKeysNotice({"lm_head.weight"})

    def said(keys: list[str]) -> bool:
        message = f"{_TiedKeysNotice.PREFIX}{keys}."
        return notice.filter(logging.LogRecord("transformers.trainer", logging.WARNING, "", 0, message, None, None))

    assert not said(["lm_head.weight"])
    assert said(["score.weight"]) and said(["lm_head.weight", "model.norm.weight"])
    assert notice.filter(logging.LogRecord("t", logging.WARNING, "", 0, "another notice", None, None))
