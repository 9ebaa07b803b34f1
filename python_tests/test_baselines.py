"""Step-level beam search and best-of-N on the simulated engine: semantics, trees, CLI."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rstar_fast.cli import main as cli_main
from rstar_fast.engines import EngineError, load_policy, load_ppm
from rstar_fast.search import steps as st
from rstar_fast.search.config import ConfigError, load_config
from rstar_fast.search.driver import SearchRunner
from rstar_fast.search.problems import Problem, problems_from_records
from rstar_fast.search.records import read_trees
from rstar_fast.synthetic import generate_problems

# A policy that errs often, so beams, answers and votes have something to choose between.
SIM = "sim:profile=instant,seed=3,p_correct=0.6"
PPM = "sim:profile=instant,seed=3,corr=0.7"


def _problems(n: int, seed: int = 0) -> list[Problem]:
    return problems_from_records(generate_problems(n, seed=seed)).problems


async def _run(problems, cfg, executor, grader, wrap=None):
    policy = load_policy(SIM)
    ppm = load_ppm(PPM, policy=policy) if cfg.need_value_func else None
    policy.register_problems({p.question: p.answer for p in problems})
    runner = SearchRunner(cfg, wrap(policy) if wrap else policy, executor, grader, ppm=ppm)
    try:
        results = [r async for r in runner.run(problems)]
    finally:
        await policy.close()
        if ppm is not None:
            await ppm.close()
    return runner, sorted(results, key=lambda r: int(r.problem.id))


def _tree(result) -> dict[str, dict]:
    return result.record["rstar"]


def _kids(nodes: dict[str, dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in nodes}
    for tag in nodes:
        if tag != "0":
            out[tag.rsplit(".", 1)[0]].append(tag)
    return out


def _check_well_formed(nodes: dict[str, dict]) -> None:
    kids = _kids(nodes)
    for tag, n in nodes.items():
        if tag != "0":
            assert tag.rsplit(".", 1)[0] in nodes, f"{tag} has no parent"
        # children are numbered 1..k
        assert sorted(int(k.rsplit(".", 1)[1]) for k in kids[tag]) == list(range(1, len(kids[tag]) + 1))
        if n["final_answer"]:  # answers and failed terminals are leaves
            assert not kids[tag], f"terminal {tag} has children"


def _depth(tag: str) -> int:
    return tag.count(".")


# ----------------------------------------------------------------------------- beam search


def test_beam_search_keeps_the_best_beams_by_ppm(executor, grader):
    width = 3
    cfg = load_config("eval_bs", overrides=dict(n_generate_sample=4, step_beam_width=width, seed=1))
    runner, results = asyncio.run(_run(_problems(4, seed=2), cfg, executor, grader))
    assert len(results) == 4
    for r in results:
        nodes = _tree(r)
        _check_well_formed(nodes)
        kids = _kids(nodes)
        assert r.rollouts == width
        left = width
        for level in range(1, cfg.max_depth + 1):
            cands = [t for t in nodes if _depth(t) == level]
            if not cands:
                break
            answers = [t for t in cands if st.is_valid_final_answer(nodes[t]["final_answer"])]
            live = [t for t in cands if nodes[t]["final_answer"] == ""]
            left -= len(answers)
            expanded = [t for t in cands if kids[t]]
            # at most `width` beams per level, fewer as answers retire beams
            assert len(expanded) <= width
            assert set(expanded) <= set(live)
            if level < cfg.max_depth:
                assert len(expanded) == min(max(left, 0), len(live))
            # the beams are the best live candidates by PPM score
            if expanded:
                worst_kept = min(nodes[t]["value"] for t in expanded)
                assert all(nodes[t]["value"] <= worst_kept for t in live if t not in expanded)
        # its answer is the finished solution with the best PPM score
        answers = [n for n in nodes.values() if st.is_valid_final_answer(n["final_answer"])]
        if answers:
            assert r.pred == max(answers, key=lambda n: n["value"])["final_answer"]
            assert r.record["pred"] == r.pred and r.correct == r.votes["pass1"]
            assert {"best", "majority", "weighted", "passn"} <= set(r.votes)
        else:
            assert r.pred is None and r.correct is False
    assert any(r.pred is not None for r in results)
    ids = np.arange(runner.forest.num_nodes, dtype=np.int64)
    assert int(runner.forest.in_flight(ids).sum()) == 0


def test_beam_width_one_is_greedy_by_ppm(executor, grader):
    cfg = load_config("eval_bs", overrides=dict(n_generate_sample=3, step_beam_width=1, seed=4))
    _, results = asyncio.run(_run(_problems(3, seed=5), cfg, executor, grader))
    for r in results:
        nodes = _tree(r)
        kids = _kids(nodes)
        for level in range(0, cfg.max_depth):
            assert sum(1 for t in nodes if _depth(t) == level and kids[t]) <= 1
        assert len(nodes) > 1


# ----------------------------------------------------------------------------- best-of-N


@pytest.mark.parametrize("vote", ["ppm", "majority"])
def test_best_of_n_samples_n_solutions_and_chooses(executor, grader, vote):
    n = 6
    cfg = load_config("eval", overrides=dict(mode="best_of_n", bon_n=n, bon_vote=vote, seed=3))
    _, results = asyncio.run(_run(_problems(3, seed=6), cfg, executor, grader))
    for r in results:
        nodes = _tree(r)
        _check_well_formed(nodes)
        kids = _kids(nodes)
        assert len(kids["0"]) == n and r.rollouts == n
        # N chains: below the root every node has at most one child, and each chain ends terminal
        leaves = [t for t in nodes if not kids[t]]
        assert all(len(kids[t]) <= 1 for t in nodes if t != "0")
        assert len(leaves) == n
        answers = [nodes[t] for t in leaves if st.is_valid_final_answer(nodes[t]["final_answer"])]
        if not answers:
            assert r.pred is None
            continue
        if vote == "ppm":
            assert r.pred == max(answers, key=lambda a: a["value"])["final_answer"] == r.votes["best"]
            assert r.correct == r.votes["pass1"]
        else:
            counts = Counter(a["final_answer"] for a in answers)
            assert counts[r.pred] == max(counts.values())
            assert r.pred == r.votes["majority"] and r.correct == r.votes["maj"]
        assert r.record["pred"] == r.pred


def test_best_of_n_choices_share_the_same_solutions(executor, grader):
    """With one seed the solutions do not depend on the vote; only the choice does."""
    problems = _problems(3, seed=8)
    got = {}
    for vote in ("ppm", "majority"):
        cfg = load_config("eval", overrides=dict(mode="best_of_n", bon_n=5, bon_vote=vote, seed=9))
        _, results = asyncio.run(_run(problems, cfg, executor, grader))
        got[vote] = results
    for a, b in zip(got["ppm"], got["majority"]):
        ta, tb = _tree(a), _tree(b)
        assert ta.keys() == tb.keys()
        for tag in ta:
            # the root's first value is whichever answer backed up first: timing, not sampling
            same = ("text", "final_answer", "visit_count") + (("value",) if tag != "0" else ())
            assert all(ta[tag][k] == tb[tag][k] for k in same)
            assert ta[tag]["q_value"] == pytest.approx(tb[tag]["q_value"], abs=1e-5)
        assert a.pred == a.votes["best"] and b.pred == b.votes["majority"]


def test_best_of_n_solutions_do_not_depend_on_the_problems_before(tmp_path, executor, grader):
    """A seeded run resumed after some problems gives each problem the solutions an
    uninterrupted run gives it."""
    from rstar_fast.search.api import search_sync

    problems = _problems(6, seed=8)
    cfg = load_config("eval", overrides=dict(mode="best_of_n", bon_n=3, bon_vote="majority", seed=9,
                                              need_value_func=False, update_leaf_value=False))
    kw = dict(policy=SIM, executor=executor, grader=grader)
    search_sync(problems, cfg, out_dir=tmp_path / "whole", **kw)
    search_sync(problems[1::2], cfg, out_dir=tmp_path / "part", **kw)
    search_sync(problems, cfg, out_dir=tmp_path / "part", resume=True, **kw)
    whole, part = ({r["problem_id"]: r["rstar"] for r in read_trees(tmp_path / d / "trees.jsonl")}
                   for d in ("whole", "part"))
    texts = lambda tree: sorted(n["text"] for n in tree.values())  # noqa: E731
    assert whole.keys() == part.keys() and all(texts(whole[k]) == texts(part[k]) for k in whole)


def test_best_of_n_majority_needs_no_ppm(executor, grader):
    cfg = load_config("round1", overrides=dict(mode="best_of_n", bon_n=4, bon_vote="majority", seed=2))
    runner, results = asyncio.run(_run(_problems(2, seed=1), cfg, executor, grader))
    assert runner.ppm is None
    assert all(len(_kids(_tree(r))["0"]) == 4 for r in results)


def test_best_of_n_step_that_gets_no_sample_is_an_engine_error(executor, grader):
    """An engine that returns fewer than n samples for a step breaks its contract: the problem
    fails with the engine named (it once ended that solution quietly, so a broken engine gave
    finished runs of bare roots)."""

    class SecondStepsEmpty:
        def __init__(self, inner) -> None:
            self.inner, self.tokenizer = inner, inner.tokenizer

        async def generate(self, prompt_ids, params):  # n = 1: a solution's later steps
            return [] if params.n == 1 else await self.inner.generate(prompt_ids, params)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    cfg = load_config("round1", overrides=dict(mode="best_of_n", bon_n=3, bon_vote="majority", seed=2))
    with pytest.raises(EngineError, match="policy SecondStepsEmpty: 0 completions for n=1"):
        asyncio.run(_run(_problems(2, seed=4), cfg, executor, grader, wrap=SecondStepsEmpty))


def test_baseline_config_rules():
    with pytest.raises(ConfigError, match="need_value_func"):
        load_config("round1", overrides=dict(mode="best_of_n"))  # bon_vote ppm without a PPM
    with pytest.raises(ConfigError, match="bon_n"):
        load_config("eval", overrides=dict(mode="best_of_n", bon_n=0))
    with pytest.raises(ConfigError, match="bon_vote"):
        load_config("eval", overrides=dict(mode="best_of_n", bon_vote="best"))
    with pytest.raises(ConfigError, match="schedule"):
        load_config("eval_bs", overrides=dict(schedule="lockstep"))
    cfg = load_config("eval_bs")
    assert (cfg.mode, cfg.n_generate_sample, cfg.step_beam_width) == ("bs", 8, 8)


# ------------------------------------------------------------------------------ pipelining


class _GatedPolicy:
    """Holds every request of one question until the gate opens (other calls pass through)."""

    def __init__(self, inner, question: str) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.key = inner.tokenizer.encode(question)
        self.gate = asyncio.Event()
        self.held = 0

    async def generate(self, prompt_ids, params):
        if _contains(list(prompt_ids), self.key) and not self.gate.is_set():
            self.held += 1
            await self.gate.wait()
        return await self.inner.generate(prompt_ids, params)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("mode", ["bs", "best_of_n"])
def test_problems_advance_on_their_own(executor, grader, mode):
    """A problem whose generation is held does not hold the others (no lockstep)."""
    problems = _problems(4, seed=11)
    over = dict(n_generate_sample=3, step_beam_width=2, seed=1) if mode == "bs" else dict(mode=mode, bon_n=3, seed=1)
    cfg = load_config("eval_bs" if mode == "bs" else "eval", overrides=over)

    async def go() -> list[str]:
        policy = load_policy(SIM)
        ppm = load_ppm(PPM, policy=policy)
        policy.register_problems({p.question: p.answer for p in problems})
        gated = _GatedPolicy(policy, problems[0].question)
        runner = SearchRunner(cfg, gated, executor, grader, ppm=ppm)
        order = []
        async for r in runner.run(problems):
            order.append(r.problem.id)
            if len(order) == len(problems) - 1:
                gated.gate.set()  # every other problem finished while the first was held
        await policy.close()
        await ppm.close()
        assert gated.held >= 1
        return order

    order = asyncio.run(asyncio.wait_for(go(), timeout=120))  # a lockstep schedule would hang here
    assert order[-1] == problems[0].id and sorted(order) == sorted(p.id for p in problems)


# ------------------------------------------------------------------------------------ CLI


def test_cli_eval_with_baselines_and_exports(tmp_path: Path, capsys):
    out = tmp_path / "bs"
    code = cli_main(["eval", "--out", str(out), "--preset", "eval_bs", "--limit", "2", "--quiet",
                     "--policy", SIM, "--set", "n_generate_sample=3", "--set", "step_beam_width=2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "2 problems searched" in text and "accuracy" in text
    lines = list(read_trees(out / "trees.jsonl"))
    assert len(lines) == 2 and all({"rstar", "pred", "correct"} <= set(rec) for rec in lines)
    assert cli_main(["export", "sft", str(out / "trees.jsonl"), "-o", str(tmp_path / "sft.jsonl")]) == 0
    assert cli_main(["export", "pairs", str(out / "trees.jsonl"), "-o", str(tmp_path / "pairs.json")]) == 0

    out = tmp_path / "bon"
    code = cli_main(["eval", "--out", str(out), "--limit", "2", "--quiet", "--policy", SIM,
                     "--set", "mode=best_of_n", "--set", "bon_n=4", "--set", "bon_vote=majority"])
    assert code == 0
    lines = list(read_trees(out / "trees.jsonl"))
    assert len(lines) == 2 and all(len([t for t in rec["rstar"] if t.count(".") == 1]) == 4 for rec in lines)

    # beam search runs pipelined only: a clear error, exit status 2
    assert cli_main(["eval", "--out", str(tmp_path / "x"), "--preset", "eval_bs", "--schedule", "lockstep",
                     "--quiet", "--policy", SIM]) == 2
    assert "pipelined" in capsys.readouterr().err
    # the flag and a --set of the same key: one would be dropped without a word
    assert cli_main(["eval", "--out", str(tmp_path / "y"), "--schedule", "pipelined", "--set", "schedule=lockstep",
                     "--quiet", "--policy", SIM]) == 2
    assert "--schedule and --set schedule=... are both given" in capsys.readouterr().err


def test_a_run_stopped_early_resumes(tmp_path: Path, executor, grader):
    """Leaving the iterator cancels the problems in flight; --resume finishes the rest."""
    from rstar_fast.search.api import search, search_sync

    out = tmp_path / "run"
    cfg = load_config("eval", overrides=dict(mode="best_of_n", bon_n=3, seed=5))
    problems = [p.record for p in _problems(4, seed=12)]

    async def first_one() -> None:
        async for _ in search(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out):
            break

    asyncio.run(first_one())
    rest = search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out, resume=True)
    ids = [rec["problem_id"] for rec in read_trees(out / "trees.jsonl")]
    assert sorted(ids, key=int) == ["0", "1", "2", "3"] and 1 <= len(ids) - len(rest) < 4
