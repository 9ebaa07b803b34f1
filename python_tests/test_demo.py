"""The miniature run, shortened: a few problems and training steps, end to end."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("tokenizers")

from rstar_fast.demo import DemoConfig, run_demo
from rstar_fast.evolve import TinyBase

SHORT = {"iterations": 2, "n_generate_sample": 2, "max_tokens": 16, "max_depth": 4}


@pytest.mark.slow
def test_shortened_demo_writes_the_table(tmp_path, capsys):
    cfg = DemoConfig(
        n_train=16, n_test=4, difficulty="easy", round2_problems=3, vote_samples=2,
        tiny=TinyBase(hidden_size=32, layers=2, heads=2, vocab_size=600),
        round1={"iterations": 6, "n_generate_sample": 4, "max_depth": 8}, round2=SHORT, eval=SHORT,
    )
    cfg.sft.update(max_steps=4, logging_steps=1)
    cfg.ppm.update(max_steps=2, logging_steps=1)
    rows = run_demo(tmp_path, cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == rows
    assert [r["name"] for r in summary] == [
        "policy alone (greedy)", "majority vote over 2 samples",
        "MCTS without PPM (majority over trajectories)", "MCTS with PPM",
    ]
    for row in summary:
        assert row["problems"] == 4
        assert row["accuracy"] is None or 0.0 <= row["accuracy"] <= 1.0
        assert row["generated_tokens"] > 0 and row["policy_calls"] > 0 and row["wall_s"] >= 0
    assert summary[0]["policy_calls"] <= summary[1]["policy_calls"]  # greedy: one call per step
    # only the last row has a PPM (whether it is called depends on what the untrained policy writes)
    assert summary[0]["ppm_calls"] == summary[1]["ppm_calls"] == summary[2]["ppm_calls"] == 0
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert [r["round"] for r in demo["rounds"]] == [1, 2] and demo["wall_s"] > 0
    assert set(demo["ppm_step_ranking"]) == {"pairs", "accuracy"}
    out = capsys.readouterr().out
    assert "| MCTS with PPM |" in out
    # a few SFT steps leave the policy untrained: the report says so
    assert ("warning: the tiny policy alone solved" in out) == (summary[0]["accuracy"] < 0.3)


def test_demo_and_evolve_are_subcommands():
    from rstar_fast.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--out", "x", "--problems", "20", "--sft-steps", "5", "--recall", "0.2",
                              "--round2-problems", "30", "--model-seed", "7"])
    assert args.command == "demo" and args.problems == 20 and args.sft_steps == 5 and args.recall == 0.2
    assert args.round2_problems == 30 and args.model_seed == 7
    args = parser.parse_args(["evolve", "--problems", "p.json", "--work", "w", "--rounds", "3",
                              "--set", "iterations=4", "--sft-set", "max_steps=10"])
    assert args.command == "evolve" and args.rounds == 3 and args.config_set == ["iterations=4"]


def test_demo_rejects_a_recall_that_is_not_a_probability(tmp_path, capsys):
    from rstar_fast.cli import main

    assert main(["demo", "--out", str(tmp_path / "out"), "--recall", "1.5"]) == 2
    assert "--recall must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started
    for flag, value, expected in (("--round2-problems", "0", "must be >= 1, got 0"),
                                  ("--test-problems", "0", "must be >= 1, got 0"),
                                  ("--problems", "-5", "must be >= 1, got -5"),
                                  ("--model-seed", "-1", "must be >= 0, got -1"),
                                  ("--sft-steps", "many", "'many' is not an integer")):
        with pytest.raises(SystemExit) as exit_:
            main(["demo", "--out", str(tmp_path / "out"), flag, value])
        assert exit_.value.code == 2
        assert f"argument {flag}: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_rerun_with_other_settings_is_refused(tmp_path):
    """A demo folder resumes; under other settings its finished stages would be stale."""
    from rstar_fast.evolve import EvolveError

    (tmp_path / "settings.json").write_text(json.dumps({"n_train": 5}))
    with pytest.raises(EvolveError, match=r"was made with other settings \(n_train 5 -> 1200"):
        run_demo(tmp_path, DemoConfig(progress=False))


def test_ppm_step_ranking_compares_on_track_steps_with_off_track_siblings(tmp_path):
    from rstar_fast.demo import StepRanking, ppm_step_ranking
    from rstar_fast.search.records import K_NO_PARENT, build_rstar_dict

    question = "Mia has 12 apples. She buys 5 more. How many apples does Mia have now?"
    step1 = "<code>\n# Step 1: Mia has {n} apples at first\napples = {n}\n<end_of_step>"
    step2 = "\n\n# Step 2: Mia buys 5 more apples\napples = apples {op} 5\n<end_of_step>"
    nodes = [  # (parent, text, PPM value)
        (K_NO_PARENT, "", 0.0),
        (0, step1.format(n=12), 0.5),  # on track
        (0, step1.format(n=13), 0.7),  # off track, scored higher: a lost pair
        (1, step2.format(op="+"), 0.3),  # on track
        (1, step2.format(op="-"), -0.2),  # off track, scored lower: a won pair
        (1, step2.format(op="*"), 0.0),  # never scored: left out
        (2, step2.format(op="+"), 0.9),  # below an off-track step: not compared
        (2, step2.format(op="-"), 0.8),
    ]
    rstar = build_rstar_dict([p for p, _, _ in nodes], [t for _, t, _ in nodes], [v for _, _, v in nodes],
                             [0.0] * len(nodes), [1] * len(nodes), [""] * len(nodes), question)
    other = build_rstar_dict([K_NO_PARENT, 0, 0], ["", "a", "b"], [0.0, 0.4, 0.1], [0.0] * 3, [1] * 3,
                             [""] * 3, "What is 2 + 2?")  # not a synthetic question: skipped
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps({"question": q, "rstar": r}) + "\n"
                            for q, r in ((question, rstar), ("What is 2 + 2?", other))))
    assert ppm_step_ranking(path) == StepRanking(pairs=2, accuracy=0.5)
    path.write_text(json.dumps({"question": "What is 2 + 2?", "rstar": other}) + "\n")
    assert ppm_step_ranking(path) == StepRanking(pairs=0, accuracy=None)


def test_a_quiet_demo_still_prints_its_table(tmp_path, monkeypatch, capsys):
    import rstar_fast.demo as demo
    from rstar_fast.cli import main
    from rstar_fast.evolve import EvalRow

    row = EvalRow("MCTS with PPM", 0.5, 4, 2, 100, 10, 5, 8, 1.0)
    monkeypatch.setattr(demo, "run_demo", lambda out, cfg: [row.to_dict()])
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert "| MCTS with PPM | 50.0% | 4 |" in capsys.readouterr().out


def test_demo_model_seed_reaches_every_tiny_model(tmp_path, monkeypatch):
    import rstar_fast.demo as demo
    from rstar_fast.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, cfg: seen.append(cfg))
    assert main(["demo", "--out", str(tmp_path), "--model-seed", "7"]) == 0
    (cfg,) = seen
    assert cfg.tiny.seed == cfg.sft["seed"] == cfg.ppm["seed"] == 7
    assert DemoConfig().tiny.seed == 0 and "seed" not in DemoConfig().sft  # defaults untouched
