"""Self-evolution rounds: a 2-round evolve with tiny settings, its outputs, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("tokenizers")

from rstar_fast import training
from rstar_fast.evolve import (
    EvolveConfig,
    EvolveError,
    TinyBase,
    evolve,
    format_rounds,
    train_step_tokenizer,
)
from rstar_fast.synthetic import train_test_problems

PROBLEMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "GSM8K_test.json"
TINY = TinyBase(hidden_size=32, layers=2, heads=2, vocab_size=600)
SHORT = {"iterations": 2, "n_generate_sample": 2, "max_tokens": 16, "max_depth": 4}


def _config(work: Path, train: list[dict], test: list[dict]) -> EvolveConfig:
    return EvolveConfig(
        problems=train, work_dir=work, rounds=2, policy="sim:profile=instant", test_problems=test,
        round1_overrides={"iterations": 6, "n_generate_sample": 4, "max_depth": 8}, later_overrides=SHORT,
        eval_overrides=SHORT, limit=[len(train), 4], pairs_min_edit_distance=1, tiny=TINY,
        sft={"max_steps": 4, "learning_rate": 3e-3, "batch_size": 8, "per_device_batch_size": 8, "logging_steps": 1,
                 "max_length": 256, "progress": False},
        ppm={"max_steps": 2, "learning_rate": 1e-3, "batch_size": 8, "per_device_batch_size": 8, "logging_steps": 1,
                 "max_length": 256, "progress": False},
        round1_ppm={"max_steps": 1, "eval_fraction": 0.1},  # round 1 holds pairs out, round 2 (TINY_PPM) not
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    train, test = train_test_problems(16, 3, seed=3, difficulty="easy")
    work = tmp_path_factory.mktemp("evolve")
    cfg = _config(work, train, test)
    return cfg, evolve(cfg)


def test_rounds_leave_their_outputs(run):
    cfg, rounds = run
    work = Path(cfg.work_dir)
    assert [r.round for r in rounds] == [1, 2]
    r1 = work / "round_1"
    for name in ("trees.jsonl", "generate.json", "sft.jsonl", "pairs.jsonl", "settings.json", "round.json"):
        assert (r1 / name).is_file(), name
    assert (r1 / "policy" / "train_result.json").is_file()
    assert training.load_train_result(r1 / "ppm").steps == 1  # round1_ppm applies to round 1 only
    assert (work / "base" / "config.json").is_file()  # the tiny from-scratch base model
    one = rounds[0]
    assert one.problems == 16 and one.solved > 0 and one.trajectories > 0 and one.pairs > 0
    assert one.policy_trained and one.ppm_trained and one.policy_loss is not None
    assert one.ppm_heldout_accuracy is not None and training.load_train_result(r1 / "ppm").eval_examples > 0
    assert one.test_problems == 3 and one.accuracy_greedy is not None and one.accuracy_search is not None
    # round 2 searched with round 1's models (preset round2) over its limit of problems
    two = rounds[1]
    assert two.problems == 4
    lines = (work / "round_2" / "trees.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # an untrained tiny policy solves nothing: the round keeps round 1's models
    if two.trajectories == 0:
        assert not two.policy_trained and two.policy == str(r1 / "policy")
    if two.pairs == 0:
        assert not two.ppm_trained and two.ppm == str(r1 / "ppm")
    else:
        assert training.load_train_result(work / "round_2" / "ppm").steps == 2
        assert two.ppm_heldout_accuracy is None
    summary = json.loads((work / "summary.json").read_text())
    assert [s["round"] for s in summary] == [1, 2]
    assert {"solved", "trajectories", "pairs", "policy_loss", "accuracy_greedy", "accuracy_search"} <= set(summary[0])
    assert "| 1 |" in format_rounds(rounds)


def test_second_call_skips_completed_stages(run, monkeypatch):
    cfg, rounds = run

    def boom(*args, **kwargs):
        raise AssertionError("a completed stage ran again")

    monkeypatch.setattr(training, "train_sft", boom)
    monkeypatch.setattr(training, "train_ppm", boom)
    monkeypatch.setattr("rstar_fast.evolve.run_search", boom)
    again = evolve(cfg)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in rounds]


def test_a_second_evolve_in_the_same_folder_is_refused(run):
    """Rerunning the command while the first still runs would train the same checkpoints at once."""
    import os

    from rstar_fast.files import try_lock

    cfg, rounds = run
    held = try_lock(Path(cfg.work_dir) / ".lock")  # as another evolve holds it
    try:
        with pytest.raises(EvolveError, match="another evolve is working in this folder"):
            evolve(cfg)
    finally:
        os.close(held)
    assert [r.to_dict() for r in evolve(cfg)] == [r.to_dict() for r in rounds]


def test_a_missing_training_stack_is_said_before_round_1(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    train, test = train_test_problems(4, 1, seed=3, difficulty="easy")
    with pytest.raises(ModuleNotFoundError, match=r"needs trl, which is not installed: pip install 'rstar-fast\[train\]'"):
        evolve(_config(tmp_path / "w", train, test))
    assert not (tmp_path / "w").exists()  # nothing searched


def test_a_training_that_ended_before_its_first_log_shows_its_mean_loss():
    from types import SimpleNamespace

    from rstar_fast.evolve import _loss

    assert _loss(SimpleNamespace(final_loss=None, mean_loss=6.3)) == 6.3
    assert _loss(SimpleNamespace(final_loss=2.0, mean_loss=6.3)) == 2.0 and _loss(None) is None


def test_interrupted_round_resumes_at_the_missing_stage(run, monkeypatch):
    """Lose round 1's PPM and summary: only the PPM is retrained; nothing is searched again."""
    cfg, _ = run
    work = Path(cfg.work_dir)
    trees_before = (work / "round_1" / "trees.jsonl").read_text()
    (work / "round_1" / "round.json").unlink()
    (work / "round_1" / "ppm" / "train_result.json").unlink()
    (work / "round_1" / "eval" / "mcts_ppm" / "row.json").unlink()
    calls = []
    real_ppm = training.train_ppm

    def no_sft(*args, **kwargs):
        raise AssertionError("the finished policy was retrained")

    def count_ppm(*args, **kwargs):
        calls.append(args)
        return real_ppm(*args, **kwargs)

    monkeypatch.setattr(training, "train_sft", no_sft)
    monkeypatch.setattr(training, "train_ppm", count_ppm)
    rounds = evolve(cfg)
    assert len(calls) == 1
    assert (work / "round_1" / "trees.jsonl").read_text() == trees_before
    assert rounds[0].ppm_trained and (work / "round_1" / "round.json").is_file()


def test_search_stopped_before_its_stage_was_marked_done_resumes(run):
    """Killed after the search wrote its own summary.json, before generate.json: the round
    summary has its own file, so the rerun takes the search's file for what it is."""
    cfg, rounds = run
    rd = Path(cfg.work_dir) / "round_1"
    generated = json.loads((rd / "generate.json").read_text())
    (rd / "generate.json").unlink()
    (rd / "round.json").unlink()
    (rd / "summary.json").write_text(json.dumps({"problems": generated["problems"], "skipped": 0}))
    again = evolve(cfg)
    assert again[0].solved == rounds[0].solved and again[0].pairs == rounds[0].pairs
    assert (rd / "generate.json").is_file() and not (rd / "summary.json").exists()


def test_a_finished_round_redoes_a_stage_whose_output_was_deleted(run, monkeypatch, caplog):
    """round.json is trusted only while what it describes is there: a deleted policy is
    trained again (and round 2 is not run on round 1's policy of another round); what was
    built from the policy before is named, kept."""
    import shutil

    cfg, rounds = run
    r1 = Path(cfg.work_dir) / "round_1"
    shutil.rmtree(r1 / "policy")
    calls = []
    real_sft = training.train_sft

    def count_sft(*args, **kwargs):
        calls.append(args)
        return real_sft(*args, **kwargs)

    def no_search(*args, **kwargs):
        raise AssertionError("a finished search ran again")

    monkeypatch.setattr(training, "train_sft", count_sft)
    monkeypatch.setattr("rstar_fast.evolve.run_search", no_search)
    with caplog.at_level("WARNING"):
        again = evolve(cfg)
    assert len(calls) == 1 and training.load_train_result(r1 / "policy") is not None
    assert again[0].policy == str(r1 / "policy") and again[0].solved == rounds[0].solved
    warned = [r.getMessage() for r in caplog.records if "was trained again" in r.getMessage()]
    assert len(warned) == 1 and str(r1 / "ppm") in warned[0] and str(Path(cfg.work_dir) / "round_2") in warned[0]


def test_a_search_whose_trees_were_deleted_runs_again_and_is_exported_again(run):
    cfg, rounds = run
    rd = Path(cfg.work_dir) / "round_1"
    (rd / "trees.jsonl").unlink()
    (rd / "sft.jsonl").write_text("")  # exports of the lost trees do not outlive them
    again = evolve(cfg)
    assert len((rd / "trees.jsonl").read_text().splitlines()) == again[0].problems == 16
    assert len((rd / "sft.jsonl").read_text().splitlines()) == again[0].trajectories > 0


def test_the_base_is_built_again_when_round_1_texts_or_tiny_settings_change(run, monkeypatch):
    import rstar_fast.evolve as evolve_module

    cfg, _ = run
    base = Path(cfg.work_dir) / "base"
    built = []
    real = evolve_module.build_tiny_base

    def count(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(evolve_module, "build_tiny_base", count)
    evolver = evolve_module.Evolver(cfg)
    assert evolver.base_model() == str(base) and built == []  # as it was built: kept
    source = json.loads((base / "built_from.json").read_text())
    (base / "built_from.json").write_text(json.dumps({**source, "texts": "other texts"}))
    evolver.base_model()
    assert len(built) == 1 and json.loads((base / "built_from.json").read_text()) == source


def test_a_resumed_evaluation_says_its_compute_leaves_out_earlier_problems(tmp_path):
    from rstar_fast.evolve import evaluate, greedy_config
    from rstar_fast.search.config import load_config
    from rstar_fast.search.problems import problems_from_records

    train, _ = train_test_problems(3, 1, seed=5, difficulty="easy")
    problems = list(problems_from_records(train).problems)
    config = greedy_config(load_config(preset="eval"))
    whole = evaluate(problems, config, tmp_path / "whole", policy="sim:profile=instant")
    assert whole.problems == 3 and whole.resumed == 0
    part = tmp_path / "part"
    part.mkdir()
    first = (tmp_path / "whole" / "trees.jsonl").read_text().splitlines()[0]
    (part / "trees.jsonl").write_text(first + "\n")
    resumed = evaluate(problems, config, part, policy="sim:profile=instant")
    assert resumed.problems == 3 and resumed.resumed == 1 and resumed.rollouts < whole.rollouts


@pytest.mark.parametrize("text, expected", [
    ('{"name": "greedy",\n', "cannot read a finished evaluation's row"),
    ('{"extra": 1}', "not an evaluation row"),
])
def test_a_damaged_evaluation_row_is_named_with_how_to_redo_it(tmp_path, text, expected):
    from rstar_fast.evolve import EvolveError, evaluate, greedy_config
    from rstar_fast.search.config import load_config

    (tmp_path / "row.json").write_text(text)
    with pytest.raises(EvolveError, match=f"{tmp_path / 'row.json'}: {expected}.*delete the file to redo it"):
        evaluate([], greedy_config(load_config(preset="eval")), tmp_path, policy="sim:profile=instant")


def test_an_evaluation_counts_compute_and_accuracy_as_it_ran(tmp_path):
    """A `sim` policy's calls are counted like any engine's; problems without a gold answer
    have no accuracy (not 0%)."""
    from rstar_fast.evolve import evaluate, greedy_config
    from rstar_fast.search.config import load_config
    from rstar_fast.search.problems import problems_from_records

    train, _ = train_test_problems(3, 1, seed=5, difficulty="easy")
    config = greedy_config(load_config(preset="eval"))
    row = evaluate(list(problems_from_records(train).problems), config, tmp_path / "a", policy="sim:profile=instant")
    assert row.policy_calls > 0 and row.generated_tokens > 0
    unknown = list(problems_from_records([{"question": r["question"]} for r in train]).problems)
    row = evaluate(unknown, config, tmp_path / "b", policy="sim:profile=instant")
    assert row.problems == 3 and row.accuracy is None


def test_solved_counts_problems_with_a_correct_trajectory(run):
    """What yields training data, even where the vote picked another answer."""
    cfg, rounds = run
    trees = [json.loads(line) for line in (Path(cfg.work_dir) / "round_1" / "trees.jsonl").read_text().splitlines()]
    assert rounds[0].solved == sum(bool(t["votes"].get("passn")) for t in trees)


def test_held_out_problems_that_are_training_problems_are_named(tmp_path, caplog):
    from rstar_fast.evolve import Evolver

    train, test = train_test_problems(6, 2, seed=3, difficulty="easy")
    with caplog.at_level("WARNING"):
        Evolver(_config(tmp_path, train, [*test, train[0]]))
    assert "1 of the 3 held-out problems are training problems too" in caplog.text


def test_rerun_with_other_settings_is_refused(run):
    """Finished stages are reused as they are, so a rerun under other settings would silently
    keep the old results: it is refused, naming what changed, and nothing is touched."""
    import dataclasses

    cfg, _ = run
    work = Path(cfg.work_dir)
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    changed = dataclasses.replace(cfg, round1_overrides={**cfg.round1_overrides, "iterations": 7},
                                  pairs_min_edit_distance=3)
    with pytest.raises(EvolveError) as err:
        evolve(changed)
    message = str(err.value)
    assert "round_1 was made with other settings" in message
    assert "search.config.iterations 6 -> 7" in message and "export.pairs_min_edit_distance 1 -> 3" in message
    assert "delete" in message and "another work folder" in message
    fewer = dataclasses.replace(cfg, test_problems=cfg.test_problems[:2])
    with pytest.raises(EvolveError, match=r"eval.problems '3 problems, sha256 \w+' -> '2 problems"):
        evolve(fewer)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == before


def test_cli_names_the_settings_a_work_dir_was_made_with(run, tmp_path, capsys):
    from rstar_fast.cli import main

    cfg, _ = run
    problems = tmp_path / "train.json"
    problems.write_text(json.dumps(cfg.problems))
    rc = main(["evolve", "--problems", str(problems), "--work", str(cfg.work_dir), "--rounds", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "was made with other settings" in err and "search.policy 'sim:profile=instant' -> 'sim'" in err


def test_cli_reports_a_missing_problems_file(tmp_path, capsys):
    from rstar_fast.cli import main

    rc = main(["evolve", "--problems", str(tmp_path / "nope.json"), "--work", str(tmp_path / "w"), "--quiet"])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(EvolveError, match="rounds"):
        evolve(EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path, rounds=0))
    with pytest.raises(EvolveError, match="no training problems"):
        evolve(EvolveConfig(problems=[], work_dir=tmp_path))
    with pytest.raises(EvolveError, match="pairs_final"):
        evolve(EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path, pairs_final=-1))


def test_a_key_no_round_s_mode_reads_is_said_once(tmp_path, caplog):
    """validate says it; the rounds' own reads of the same configs (several per round) do not."""
    cfg = EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path, rounds=3,
                       overrides={"bon_n": 4}, eval_overrides={"bon_vote": "majority"})
    with caplog.at_level("WARNING", logger="rstar_fast.search.config"):
        cfg.validate()
        for k in (1, 2, 3, 2):
            cfg.search_config(k)
        cfg.eval_config()
    said = [r.getMessage() for r in caplog.records if "does not read it" in r.getMessage()]
    assert sorted(said) == ["eval_overrides bon_vote: mode mcts does not read it (only best_of_n)",
                            "overrides bon_n: mode mcts does not read it (only best_of_n)",
                            "overrides bon_n: mode mcts does not read it (only best_of_n)"], said  # rounds 1 and 2


def test_a_round_s_own_search_keys_reach_that_round_only(tmp_path, capsys):
    """The paper's round 2 searches without the PPM, rounds 3 and 4 with it: --round-set."""
    from rstar_fast.cli import main
    from rstar_fast.evolve import _round_overrides

    overrides = _round_overrides(["2:need_value_func=false", "2:update_leaf_value=false", "3:iterations=4"])
    assert overrides == {2: {"need_value_func": False, "update_leaf_value": False}, 3: {"iterations": 4}}
    cfg = EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path, rounds=4,
                       round_overrides=overrides)
    cfg.validate()
    assert [cfg.search_config(k).need_value_func for k in (1, 2, 3, 4)] == [False, False, True, True]
    assert [cfg.search_config(k).iterations for k in (2, 3)] == [48, 4]
    with pytest.raises(EvolveError, match="round 5 is not one of the rounds 1-4"):
        EvolveConfig(problems=[], work_dir=tmp_path, rounds=4, round_overrides={5: {}}).validate()
    for bad in ("need_value_func=false", "x:iterations=4"):
        with pytest.raises(EvolveError, match="expected K:KEY=VALUE"):
            _round_overrides([bad])
    assert main(["evolve", "--problems", str(tmp_path), "--work", str(tmp_path / "w"),
                 "--round-set", "2:nonsense=1"]) == 2
    assert "--round-set 2: 'nonsense=1': unknown key 'nonsense'" in capsys.readouterr().err


def test_held_out_settings_are_checked_without_a_held_out_set(tmp_path):
    """--eval-set without --test goes unused, but a bad value there is still a mistake to name."""
    from rstar_fast.search.config import ConfigError

    cfg = EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path / "w",
                       eval_overrides={"temperature": -1})
    with pytest.raises(ConfigError, match="eval_overrides: temperature = -1.0: must be >= 0"):
        evolve(cfg)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("settings, expected", [
    ({"sft": {"learning_rate": "abc"}}, "sft hyperparameters: learning_rate must be a number, got 'abc'"),
    ({"sft": {"template": "no query here"}}, "sft hyperparameters: the SFT template must contain {query}"),
    ({"ppm": {"batch_size": "many"}}, "ppm hyperparameters: batch_size must be an integer, got 'many'"),
    ({"ppm": {"lerning_rate": 1e-5}}, "ppm hyperparameters: unknown PPMHParams option(s): lerning_rate"),
    ({"round1_ppm": {"epochs": -1}}, "round1_ppm hyperparameters: epochs must be > 0"),
    ({"base": "/nonexistent/base"}, "base: /nonexistent/base: no such model folder"),
    ({"ppm_init": "/nonexistent/ppm"}, "ppm_init: /nonexistent/ppm: no such model folder"),
    ({"tiny": TinyBase(hidden_size=30, heads=4)}, "hidden_size 30 is not a multiple of heads 4"),
])
def test_training_settings_are_refused_before_any_search(tmp_path, monkeypatch, settings, expected):
    def boom(*args, **kwargs):
        raise AssertionError("searched before the settings were checked")

    monkeypatch.setattr("rstar_fast.evolve.run_search", boom)
    cfg = EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path / "w", **settings)
    with pytest.raises(EvolveError) as err:
        evolve(cfg)
    assert expected in str(err.value)
    assert not (tmp_path / "w").exists()


def test_unusable_problem_records_are_refused_before_any_search(tmp_path, monkeypatch):
    from rstar_fast.search.problems import ProblemFileError

    def boom(*args, **kwargs):
        raise AssertionError("searched unusable problems")

    monkeypatch.setattr("rstar_fast.evolve.run_search", boom)
    with pytest.raises(ProblemFileError, match=r"records: no usable problem: all 2 record\(s\) were skipped"):
        evolve(EvolveConfig(problems=[{"answer": 1}, {"question": 5}], work_dir=tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_training_settings_given_as_text_reach_the_trainer_as_numbers(tmp_path, monkeypatch):
    """YAML reads --sft-set learning_rate=1e-5 as the text '1e-5'; the trainers get a float."""
    cfg = EvolveConfig(problems=[{"question": "q", "answer": "1"}], work_dir=tmp_path,
                       base=str(tmp_path), sft={"learning_rate": "1e-5", "max_steps": "3"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    cfg.validate()
    hp = training.SFTHParams.from_kwargs(**cfg.sft_hparams())
    assert hp.learning_rate == 1e-5 and hp.max_steps == 3


def test_cli_refuses_bad_training_flags_before_searching(tmp_path, capsys):
    from rstar_fast.cli import main

    work = tmp_path / "w"
    common = ["evolve", "--problems", str(PROBLEMS), "--work", str(work), "--limit", "2", "--set", "iterations=4",
              "--quiet"]
    rc = main([*common, "--base", "/nonexistent", "--sft-set", "learning_rate=abc"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("rstar-fast evolve: error: sft hyperparameters: learning_rate must be a number, got 'abc'")
    rc = main([*common, "--base", "/nonexistent"])
    assert rc == 2 and "base: /nonexistent: no such model folder" in capsys.readouterr().err
    rc = main([*common, "--ppm-set", "warmup_ratio=2"])
    assert rc == 2 and "ppm hyperparameters: warmup_ratio must be in [0, 1), got 2.0" in capsys.readouterr().err
    rc = main([*common, "--eval-set", "bogus=1"])
    assert rc == 2 and "--eval-set 'bogus=1': unknown key" in capsys.readouterr().err
    assert not work.exists()  # nothing searched, nothing trained


def test_step_tokenizer_splits_digits_and_round_trips(tmp_path):
    text = ("<|user|>:\nMia has 41 apples. She buys 17 more.\n<|assistant|>: ok<code>\n# Step 1: Mia starts"
            " with 41 apples\napples = 41\n<end_of_step><output>58<end_of_output>")
    tok = train_step_tokenizer([text] * 3, tmp_path / "tok", vocab_size=600)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert "<end_of_step>" in pieces and "apples" in pieces and "Ġapples" in pieces  # words stay whole
    # every digit is its own token, so numbers are copied digit by digit
    assert not any(len(p.lstrip("Ġ")) > 1 and p.lstrip("Ġ").isdigit() for p in pieces)
    assert ["Ġ4", "1"] == pieces[pieces.index("Ġhas") + 1 : pieces.index("Ġhas") + 3]
    assert tok.decode(ids) == text
    from rstar_fast.training.common import REFERENCE_SFT_TOKENS

    assert all(t in tok.get_vocab() for t in REFERENCE_SFT_TOKENS)  # so training adds none
    assert "\n<|assistant|>" in pieces  # one token, as in a policy the reference trained
    odd = "Zoë has 12345 ünïcode 你好 tokens"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_interrupted_evolve_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import rstar_fast.evolve as evolve_module
    from rstar_fast.cli import main

    def stopped(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(evolve_module, "evolve", stopped)
    problems = tmp_path / "p.json"
    problems.write_text(json.dumps([{"question": "q", "answer": "1"}]))
    assert main(["evolve", "--problems", str(problems), "--work", str(tmp_path / "w"), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: finished stages are saved; rerun the same command to continue"


def test_a_stage_whose_ppm_fails_to_load_closes_its_policy(tmp_path, closed_policies):
    """The policy, loaded first, may hold a GPU's memory: it is closed, not left behind."""
    import asyncio

    from rstar_fast.engines import EngineSpecError
    from rstar_fast.evolve import run_search
    from rstar_fast.search.config import load_config

    with pytest.raises(EngineSpecError, match="unknown engine"):
        asyncio.run(run_search([], load_config("eval"), tmp_path, policy="hf:/models/p", ppm="nosuch:x"))
    assert closed_policies == ["hf:/models/p"]


class _StopHere(Exception):
    pass


@pytest.fixture
def stubbed_evolver(tmp_path, monkeypatch):
    """An Evolver whose round 1 is trained, with search and training replaced by recorders."""
    from rstar_fast import evolve as ev
    from rstar_fast import training

    cfg = EvolveConfig(problems=[{"question": "1+1?", "answer": "2"}], work_dir=tmp_path, rounds=2,
                       policy="sim:profile=instant", base=tmp_path / "BASE")
    evolver = ev.Evolver.__new__(ev.Evolver)
    evolver.cfg, evolver.work, evolver.problems, evolver.test = cfg, tmp_path, ev._problem_records(cfg.problems), []
    for name in ("policy", "ppm"):
        (tmp_path / "round_1" / name).mkdir(parents=True)
        (tmp_path / "round_1" / name / "train_result.json").write_text("{}")
    monkeypatch.setattr(training, "load_train_result",
                        lambda p: object() if (Path(p) / "train_result.json").exists() else None)
    searched: dict = {}

    async def recorded_search(problems, config, out_dir, *, policy, ppm=None, **kw):
        searched.update(policy=policy, ppm=ppm, scores_steps=config.need_value_func)
        raise _StopHere

    monkeypatch.setattr(ev, "run_search", recorded_search)
    trained: list = []
    monkeypatch.setattr(training, "train_sft", lambda data, base, out, **kw: trained.append(("sft", str(base))))
    monkeypatch.setattr(training, "train_ppm", lambda data, init, out, **kw: trained.append(("ppm", str(init))))
    return evolver, searched, trained, tmp_path


def test_round_1_bootstraps_without_a_ppm_and_round_2_searches_with_round_1_s_models(stubbed_evolver):
    evolver, searched, _, tmp = stubbed_evolver
    with pytest.raises(_StopHere):
        evolver.generate(1)
    assert searched["policy"] == "sim:profile=instant" and searched["ppm"] is None
    with pytest.raises(_StopHere):
        evolver.generate(2)
    assert searched == {"policy": f"hf:{tmp / 'round_1' / 'policy'}", "ppm": f"hf:{tmp / 'round_1' / 'ppm'}",
                        "scores_steps": True}


def test_each_round_s_policy_trains_from_the_base_and_an_unfinished_one_trains_again(stubbed_evolver):
    evolver, _, trained, tmp = stubbed_evolver
    (tmp / "round_2" / "policy").mkdir(parents=True)  # interrupted: no train_result.json
    (tmp / "round_2" / "ppm").mkdir(parents=True)
    assert evolver.train_policy(2, 5)
    assert trained == [("sft", str(tmp / "BASE"))]
    assert evolver.train_ppm(2, 3) and trained[1][0] == "ppm"
