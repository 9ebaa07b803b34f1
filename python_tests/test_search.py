"""Whole searches on the simulated engine: semantics, schedules, output files, resume, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rstar_fast.cli import main as cli_main
from rstar_fast.engines import PolicyEngine, load_policy, load_ppm
from rstar_fast.engines.base import Completion, EngineStats, PPMEngine
from rstar_fast.engines.sim import PPM_GAIN, SimPPM
from rstar_fast.search import steps as st
from rstar_fast.search.api import search, search_sync
from rstar_fast.search.config import load_config
from rstar_fast.search.driver import SearchRunner
from rstar_fast.search.export import rebuild_tree
from rstar_fast.search.problems import Problem, problems_from_records
from rstar_fast.search.prompts import build_prompt
from rstar_fast.search.records import read_trees
from rstar_fast.synthetic import generate_problems

SIM = "sim:profile=instant,seed=3"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _problems(n: int, seed: int = 0) -> list[Problem]:
    return problems_from_records(generate_problems(n, seed=seed)).problems


async def _run(problems, cfg, executor, grader, sim=SIM):
    policy = load_policy(sim)
    ppm = load_ppm(sim, policy=policy) if cfg.need_value_func else None
    policy.register_problems({p.question: p.answer for p in problems})
    runner = SearchRunner(cfg, policy, executor, grader, ppm=ppm)
    results = [r async for r in runner.run(problems)]
    await policy.close()
    if ppm is not None:
        await ppm.close()
    return runner, sorted(results, key=lambda r: int(r.problem.id))


def _nodes(result):
    return result.record["rstar"]


def test_round1_values_follow_the_reference(executor, grader):
    cfg = load_config("round1", overrides=dict(iterations=4, n_generate_sample=4, seed=1))
    runner, results = asyncio.run(_run(_problems(4), cfg, executor, grader))
    assert len(results) == 4
    for r in results:
        nodes = _nodes(r)
        root = nodes["0"]
        answers = [n for t, n in nodes.items() if st.is_valid_final_answer(n["final_answer"])]
        failed = [n for t, n in nodes.items() if n["final_answer"] in st.FAILED_TERMINALS]
        # Every graded answer backs +1/-1 up to the root; nothing else reaches it in round 1.
        assert root["visit_count"] == len(answers)
        for n in failed:  # a failed terminal gets -1 on itself only
            assert n["visit_count"] == 1 and n["q_value"] == pytest.approx(-1.0)
        for n in answers:
            assert n["visit_count"] == 1 and abs(n["q_value"]) == pytest.approx(1.0)
        # Node visits are the sum of their children's answer backups (round 1: no PPM).
        for tag, n in nodes.items():
            kids = [k for t, k in nodes.items() if t.rsplit(".", 1)[0] == tag and t != tag and t.count(".") == tag.count(".") + 1]
            if kids and n["final_answer"] == "":
                backed = sum(k["visit_count"] for k in kids if k["final_answer"] not in st.FAILED_TERMINALS)
                assert n["visit_count"] == backed
    # Simulations end cleanly: nothing left in flight.
    ids = np.arange(runner.forest.num_nodes, dtype=np.int64)
    assert int(runner.forest.in_flight(ids).sum()) == 0


def test_q_values_are_written_in_double_precision(executor, grader):
    """q_value is value_sum / visit_count in double precision, as the reference's: in float32
    2/3 is 0.6666666865, so 5/6 - 1/3 fell below the exports' 0.5 margin."""
    cfg = load_config("round1", overrides=dict(iterations=7, n_generate_sample=3, seed=1))
    _, results = asyncio.run(_run(_problems(3), cfg, executor, grader))
    inexact = 0
    for r in results:
        for n in _nodes(r).values():
            visits, q = n["visit_count"], n["q_value"]
            if visits:  # round 1 backs up +1/-1: value_sum is a whole number
                assert q == round(q * visits) / visits, n
                inexact += q != float(np.float32(q))
    assert inexact  # some Q (k/3, k/5, ...) that float32 cannot hold was checked


def test_pipelined_one_sim_per_tree_equals_lockstep(executor, grader):
    """With one simulation per tree the pipelined schedule makes the reference's choices."""
    problems = _problems(5, seed=7)
    trees = {}
    for schedule in ("pipelined", "lockstep"):
        cfg = load_config("round2", overrides=dict(iterations=3, n_generate_sample=3, seed=2, schedule=schedule))
        _, results = asyncio.run(_run(problems, cfg, executor, grader))
        trees[schedule] = [_nodes(r) for r in results]
    assert trees["pipelined"] == trees["lockstep"]


def test_many_simulations_per_tree(executor, grader):
    cfg = load_config("round2", overrides=dict(iterations=6, n_generate_sample=3, sims_per_tree=3, seed=4))
    runner, results = asyncio.run(_run(_problems(3, seed=1), cfg, executor, grader))
    assert all(r.rollouts == 6 or r.nodes > 1 for r in results)
    ids = np.arange(runner.forest.num_nodes, dtype=np.int64)
    assert int(runner.forest.in_flight(ids).sum()) == 0


def test_a_dead_end_spends_one_rollout_not_the_tree(executor, grader):
    """Without values every child ties and selection follows first children into a node whose
    only child is the answer: a dead end. The reference marks it terminal, spends that rollout
    and selects again from the root on the next one; the tree is not finished."""
    cfg = load_config("eval", overrides=dict(iterations=8, n_generate_sample=4, need_value_func=False,
                                             update_leaf_value=False))
    for schedule in ("pipelined", "lockstep"):
        runner, results = asyncio.run(_run(_problems(3), cfg.replace(schedule=schedule), executor, grader))
        for r in results:
            answers = [n for n in _nodes(r).values() if st.is_valid_final_answer(n["final_answer"])]
            assert r.rollouts > 1 and len(answers) > 1, schedule


def test_round2_children_carry_ppm_values(executor, grader):
    cfg = load_config("round2", overrides=dict(iterations=2, n_generate_sample=3, seed=5))
    _, results = asyncio.run(_run(_problems(2, seed=3), cfg, executor, grader))
    for r in results:
        for tag, n in _nodes(r).items():
            if tag != "0" and n["final_answer"] == "":
                assert -1.0 <= n["value"] <= 1.0 and n["visit_count"] >= 1


def test_terminal_sample_leaves_intermediate_steps_without_a_ppm_value(executor, grader):
    """As the reference's select_next_step, which passes over a non-terminal child when
    terminal_sample is set: its first value comes from rollouts alone."""
    cfg = load_config("round2", overrides=dict(iterations=2, n_generate_sample=3, seed=5, terminal_sample=True))
    runner, results = asyncio.run(_run(_problems(2, seed=3), cfg, executor, grader))
    assert runner.ppm.stats.requests == 0  # round 2 grades answers by the gold answer: nothing to score
    unvisited = [n for r in results for tag, n in _nodes(r).items() if tag != "0" and n["visit_count"] == 0]
    assert unvisited and all(n["value"] == 0.0 for n in unvisited)


class _ForeignPolicy(PolicyEngine):
    """The simulated policy behind another tokenizer (prompts are decoded from its ids, and
    completions carry its ids), as a real model's ids differ from the simulator's."""

    def __init__(self, inner: PolicyEngine, tokenizer) -> None:
        self.inner, self.stats, self.tokenizer = inner, inner.stats, tokenizer
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids, params):
        self.prompts.append(list(prompt_ids))
        text = self.tokenizer.decode(prompt_ids[len(getattr(self.tokenizer, "bos_ids", ())):])
        completions = await self.inner.generate(self.inner.tokenizer.encode(text), params)
        return [replace(c, token_ids=self.tokenizer.encode(c.text)) for c in completions]

    def register_problems(self, problems) -> None:
        self.inner.register_problems(problems)

    async def close(self) -> None:
        await self.inner.close()


class _Wrapped(PolicyEngine):
    """A policy around another; subclasses change generate."""

    def __init__(self, inner: PolicyEngine) -> None:
        self.inner, self.tokenizer, self.stats = inner, inner.tokenizer, inner.stats

    def register_problems(self, answers) -> None:
        self.inner.register_problems(answers)

    async def generate(self, prompt_ids, params):
        return await self.inner.generate(prompt_ids, params)

    async def close(self) -> None:
        await self.inner.close()


def _rotated_policy(inner: PolicyEngine) -> _ForeignPolicy:
    """Byte b is id (b + 1) % 256, so a PPM that read the ids as bytes would misjudge."""
    byte_tok = inner.tokenizer

    class Rotated:
        eos_token_id = byte_tok.eos_token_id

        def encode(self, text: str) -> list[int]:
            return [(i + 1) % 256 if i < 256 else i for i in byte_tok.encode(text)]

        def decode(self, ids) -> str:
            return byte_tok.decode([(i - 1) % 256 if i < 256 else i for i in ids])

    return _ForeignPolicy(inner, Rotated())


def test_a_sim_ppm_judges_a_real_policys_steps(executor, grader):
    """`--ppm sim:corr=1` with a non-simulated policy: it reads the policy's ids with its
    tokenizer and judges against the gold answers the search registers (a MATH question has no
    plan without its gold answer), so every judged node carries the sure score."""
    problems = [p.record for p in _problems(2, seed=8)]
    problems += json.loads((SHARED / "math500_test.json").read_text())[:2]
    cfg = load_config("round2", overrides=dict(iterations=3, n_generate_sample=4, seed=2))
    policy = _rotated_policy(load_policy("sim:profile=instant,seed=3,p_correct=0.6"))
    results = search_sync(problems, cfg, policy=policy, ppm="sim:corr=1", executor=executor, grader=grader)
    judge = SimPPM(corr=1)
    judge.register_problems({r.problem.question: str(r.problem.answer) for r in results})
    judged = 0
    for r in results:
        stack = [(child, build_prompt(r.problem.question)) for child in rebuild_tree(_nodes(r)).children]
        while stack:
            node, prefix = stack.pop()
            text = prefix + node.text
            stack.extend((child, text) for child in node.children)
            truth = judge.correctness(text)
            if truth and not node.final_answer:
                assert node.value == pytest.approx(truth * math.tanh(PPM_GAIN)), node.tag
                judged += 1
    assert judged >= 10


class _RecordingPPM(PPMEngine):
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.stats, self.seen = tokenizer, EngineStats(), []

    async def score(self, sequences):
        self.seen += [list(s) for s in sequences]
        return [0.0] * len(sequences)


def test_prompts_start_with_bos_and_a_ppm_of_another_vocabulary_reads_text(executor, grader):
    """As vLLM does for the reference's text prompts, a prompt starts with the tokenizer's BOS
    where it adds one; a PPM with the policy's vocabulary reads the policy's ids, one with
    another vocabulary reads the text in its own ids (the reference's PPM takes text)."""
    pytest.importorskip("transformers")
    from tokenizers import processors

    from rstar_fast.engines.stops import HFTokenizer
    from rstar_fast.engines.tokenizer import build_hf_tokenizer

    hf = build_hf_tokenizer()
    hf.add_special_tokens({"bos_token": "<s>"})
    bos = hf.bos_token_id
    hf._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    policy_tok, other = HFTokenizer(hf), HFTokenizer(build_hf_tokenizer())
    assert policy_tok.bos_ids == (bos,) and other.bos_ids == ()
    # tokenizers of two kinds agree when they encode the step format alike
    from rstar_fast.engines.stops import same_vocabulary
    from rstar_fast.engines.tokenizer import ByteTokenizer

    assert same_vocabulary(ByteTokenizer(), other) and not same_vocabulary(ByteTokenizer(), policy_tok)
    grown = build_hf_tokenizer()
    grown.add_special_tokens({"additional_special_tokens": ["\n<|assistant|>"]})  # as training adds it
    assert not same_vocabulary(ByteTokenizer(), HFTokenizer(grown)) and not same_vocabulary(other, HFTokenizer(grown))
    problems = _problems(2)
    cfg = load_config("round2", overrides=dict(iterations=2, n_generate_sample=3, seed=1))
    for ppm_tok in (policy_tok, other):
        policy = _ForeignPolicy(load_policy(SIM), policy_tok)
        policy.register_problems({p.question: p.answer for p in problems})
        ppm = _RecordingPPM(ppm_tok)
        runner = SearchRunner(cfg, policy, executor, grader, ppm=ppm)

        async def run() -> None:
            async for _ in runner.run(problems):
                pass

        asyncio.run(run())
        assert policy.prompts and all(p[0] == bos and bos not in p[1:] for p in policy.prompts)
        assert ppm.seen
        for seq in ppm.seen:
            if ppm_tok is policy_tok:
                assert seq[0] == bos
            else:
                assert bos not in seq and other.decode(seq).startswith("<|user|>:")


def test_eval_preset_reports_votes(executor, grader):
    cfg = load_config("eval", overrides=dict(iterations=3, n_generate_sample=4, seed=6))
    _, results = asyncio.run(_run(_problems(3, seed=4), cfg, executor, grader))
    for r in results:
        assert set(r.votes) >= {"best", "majority", "weighted"}
        assert r.correct is not None


def test_search_writes_trees_and_resumes(tmp_path, executor, grader):
    out = tmp_path / "run"
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=3))
    problems = [p.record for p in _problems(6, seed=9)]

    async def first_three():
        got = []
        async for r in search(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out):
            got.append(r)
            if len(got) == 3:
                break  # a run killed after three problems
        return got

    asyncio.run(first_three())
    done = [rec["problem_id"] for rec in read_trees(out / "trees.jsonl")]
    assert len(done) >= 3
    # a torn last line, as a kill in the middle of a write leaves
    with open(out / "trees.jsonl", "a") as f:
        f.write('{"question": "torn')
    with pytest.raises(FileExistsError):
        search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out)
    rest = search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out, resume=True)
    ids = [rec["problem_id"] for rec in read_trees(out / "trees.jsonl")]
    assert sorted(ids, key=int) == [str(i) for i in range(6)]
    assert len(ids) == len(set(ids))
    assert {r.problem.id for r in rest}.isdisjoint(done)
    line = json.loads((out / "trees.jsonl").read_text().splitlines()[0])
    assert {"question", "answer", "rstar", "pred"} <= set(line)
    assert line["rstar"]["0"]["visit_count"] >= 0
    # resumed once more with nothing left to search: the summary keeps the run's costs
    before = json.loads((out / "summary.json").read_text())
    assert search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out, resume=True) == []
    after = json.loads((out / "summary.json").read_text())
    assert before["rollouts"] > 0 and after["rollouts"] == before["rollouts"]
    assert after["generated_tokens"] == before["generated_tokens"] and after["finished"] and after["skipped"] == 6


def test_records_name_question_and_answer_as_the_reference_scripts_read_them(executor, grader):
    """Input under aliases (`problem`, `gt`) still gives trees.jsonl lines with `question` and
    `answer`, the keys the reference's extra_sft_file.py and extra_rm_file.py read."""
    problems = [{"problem": p.question, "gt": p.answer} for p in _problems(2)]
    cfg = load_config("round1", overrides=dict(iterations=1, n_generate_sample=2, seed=1))
    results = search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader)
    for r, given in zip(sorted(results, key=lambda r: int(r.problem.id)), problems):
        assert r.record["question"] == given["problem"] and r.record["answer"] == given["gt"]
        assert r.record["problem"] == given["problem"] and r.record["gt"] == given["gt"]


def test_two_searches_cannot_write_into_one_folder(tmp_path, executor, grader):
    """Each would append every problem: the second is refused while the first runs."""
    from rstar_fast.search.api import OutputInUseError

    out = tmp_path / "run"
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2))
    problems = [p.record for p in _problems(4, seed=2)]

    async def overlapping():
        first = search(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out)
        await first.__anext__()
        with pytest.raises(OutputInUseError, match="another search is writing into this folder"):
            await search(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out,
                         resume=True).__anext__()
        await first.aclose()  # the first one stops: the folder is free again

    asyncio.run(overlapping())
    search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=out, resume=True)
    ids = [rec["problem_id"] for rec in read_trees(out / "trees.jsonl")]
    assert sorted(ids) == ["0", "1", "2", "3"]


def test_a_search_waiting_for_a_folder_its_maker_took_away_makes_it_again(tmp_path):
    # the holder made the folder, stopped with nothing to keep and removed it, lock file and all
    from rstar_fast.files import hold_lock
    from rstar_fast.search.api import LOCK_FILE, _lock_out_dir

    out = tmp_path / "run"
    out.mkdir()
    held = hold_lock(out / LOCK_FILE)
    assert held is not None

    async def wait_then_take() -> int:
        waiter = asyncio.create_task(_lock_out_dir(out, grace_s=10))
        await asyncio.sleep(0.2)  # polling the lock
        (out / LOCK_FILE).unlink()
        out.rmdir()
        os.close(held)
        return await waiter

    fd = asyncio.run(wait_then_take())
    os.close(fd)
    assert (out / LOCK_FILE).is_file()


def test_two_searches_sharing_an_engine_say_that_their_costs_mix(tmp_path, executor, grader, caplog):
    # each run's costs are its engines' counters over the run, which the other adds to
    policy = load_policy(SIM)
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2))

    async def both():
        async def one(seed):
            return [r async for r in search([p.record for p in _problems(2, seed=seed)], cfg, policy=policy,
                                            executor=executor, grader=grader)]
        return await asyncio.gather(one(1), one(2))

    with caplog.at_level(logging.WARNING, logger="rstar_fast.search.api"):
        asyncio.run(both())
    assert caplog.text.count("another search used this run's engine objects meanwhile") == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rstar_fast.search.api"):
        search_sync([p.record for p in _problems(2, seed=3)], cfg, policy=policy, executor=executor, grader=grader)
    assert "another search" not in caplog.text


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, grader, monkeypatch, caplog):
    """flock fails with ENOSYS on some cluster file systems (Lustre without -o flock): a search
    (its folder's lock, a new executor's work dir) and an export go on, warned, instead of
    failing; what another process left is not taken for abandoned there."""
    import errno
    import logging

    from rstar_fast import files
    from rstar_fast.executor import StepExecutor
    from rstar_fast.search.export import export_pairs

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    monkeypatch.setattr(files, "_UNLOCKED_DEVICES", set())
    out = tmp_path / "run"
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2))
    with caplog.at_level(logging.WARNING, logger="rstar_fast.files"), StepExecutor(workers=1) as executor:
        results = search_sync([p.record for p in _problems(2, seed=2)], cfg, policy=SIM, executor=executor,
                              grader=grader, out_dir=out)
        assert len(results) == 2
        assert export_pairs(out / "trees.jsonl", tmp_path / "pairs.jsonl") >= 0
    # said once for the file system (the folder's lock, the work dir and the export's file share it)
    assert caplog.text.count("does not support file locks (Function not implemented): going on without locks") == 1
    assert "nothing refuses a second run into the same folder" in caplog.text
    stale = tmp_path / ".pairs.jsonl.1.0.tmp"  # an export's, perhaps live: kept, as no lock can tell
    stale.write_text("")
    export_pairs(out / "trees.jsonl", tmp_path / "pairs.jsonl")
    assert stale.exists()


def test_the_cli_says_when_the_figures_are_the_simulated_engines(tmp_path, capsys):
    assert cli_main(["generate", "--out", str(tmp_path / "a"), "--limit", "2", "--quiet", "--set", "iterations=1"]) == 0
    assert "the policy was the simulated engine" in capsys.readouterr().out


def test_a_missing_optional_package_names_the_extra_to_install(tmp_path, capsys, monkeypatch, tiny_policy_path):
    import sys

    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "torch", None)  # as without the hf extra
    monkeypatch.delitem(sys.modules, "rstar_fast.engines.hf", raising=False)
    code = cli_main(["generate", "--out", str(tmp_path / "o"), "--limit", "1", "--quiet",
                     "--policy", f"hf:{tiny_policy_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "torch" in err and "pip install 'rstar-fast[hf]'" in err and "Traceback" not in err, err
    # the demo says so before it writes anything
    code = cli_main(["demo", "--out", str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'rstar-fast[train]'" in err and not (tmp_path / "d").exists(), err


def test_quiet_silences_the_model_loading_bars(tmp_path, tiny_policy_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    # short steps: the random model seldom stops, and 12 samples of 2048 tokens took minutes on busy cores
    run = [sys.executable, "-m", "rstar_fast.cli", "generate", "--limit", "1", "--set", "iterations=1",
           "--set", "max_tokens=16", "--policy", f"hf:{tiny_policy_path}"]
    # not what an earlier in-process `--quiet` run left in this process's environment
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS")}
    loud = subprocess.run([*run, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, env=env)
    quiet = subprocess.run([*run, "--out", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "it/s]" not in quiet.stderr, quiet.stderr
    if "it/s]" not in loud.stderr:
        pytest.skip("this transformers shows no bar while it loads a model")


def test_the_extra_named_for_a_missing_package_holds_it():
    from rstar_fast.cli import _extra_for

    assert _extra_for("torch", "generate") == "hf" and _extra_for("torch._C", "train") == "train"
    assert _extra_for("aiohttp", "evolve") == "serve" and _extra_for("httpx", "demo") == "openai"
    assert _extra_for("numpy", "generate") is None


def test_a_refused_start_leaves_no_output_folder(tmp_path, capsys):
    """A policy that does not load: no folder with only config.json and .lock is left behind,
    and one that was there before stays."""
    out = tmp_path / "new"
    assert cli_main(["generate", "--out", str(out), "--limit", "1", "--policy", f"hf:{tmp_path / 'nope'}"]) != 0
    assert not out.exists()
    (tmp_path / "kept").mkdir()
    assert cli_main(["generate", "--out", str(tmp_path / "kept"), "--limit", "1",
                     "--policy", f"hf:{tmp_path / 'nope'}"]) != 0
    assert (tmp_path / "kept").is_dir()


def test_a_mistyped_option_is_named_by_its_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--out", "x", "--limt", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: rstar-fast generate")
    assert "rstar-fast generate: error: unrecognized arguments: --limt 3" in err


def test_a_flag_of_the_other_export_or_a_split_of_nothing_is_refused(tmp_path, capsys):
    """Not silently ignored: --top is sft's, --min-margin pairs'; the built-in problems have no splits."""
    for kind, flag in (("pairs", "--top"), ("sft", "--min-margin")):
        with pytest.raises(SystemExit):
            cli_main(["export", kind, "t.jsonl", "-o", "x.jsonl", flag, "3"])
        err = capsys.readouterr().err
        assert f"rstar-fast export {kind}: error: unrecognized arguments: {flag} 3" in err
    assert cli_main(["generate", "--out", str(tmp_path / "g"), "--split", "test", "--limit", "1"]) == 2
    assert "split 'test' chooses among a dataset folder's splits" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_the_cli_runs_on_a_thread_other_than_the_main_one(tmp_path):
    """Signal handlers can only be set from the main thread: a script's worker thread gets none."""
    import threading

    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(cli_main(
        ["generate", "--out", str(tmp_path / "t"), "--limit", "1", "--quiet", "--set", "iterations=1"])))
    worker.start()
    worker.join(timeout=120)
    assert codes == [0] and (tmp_path / "t" / "trees.jsonl").stat().st_size > 0


def test_the_cli_says_log_warnings_as_it_says_other_warnings(tmp_path):
    """One prefix for every warning line, a logged one's ("warning: ...") included."""
    done = subprocess.run([sys.executable, "-m", "rstar_fast", "generate", "--out", str(tmp_path / "t"), "--limit", "1",
                           "--quiet", "--set", "iterations=1", "--set", "tp=2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("warning: --set tp=2: the reference key 'tp' has no effect here"), done.stderr


def test_the_cli_puts_back_the_signal_handlers_and_warning_format_it_set(tmp_path):
    """A script that calls main() keeps its own Ctrl-C, SIGTERM and warning handling after it."""
    import warnings

    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    formatwarning = warnings.formatwarning
    try:
        assert cli_main(["generate", "--out", str(tmp_path / "t"), "--limit", "1", "--quiet",
                         "--set", "iterations=1"]) == 0
        assert cli_main(["generate", "--set", "iteratons=1", "--out", str(tmp_path / "u")]) == 2
        assert all(signal.getsignal(s) is mine for s in before)
        assert warnings.formatwarning is formatwarning
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_an_error_before_the_search_gets_no_advice_to_resume(tmp_path, capsys):
    """The trees there are an earlier run's: nothing of this one is saved to resume."""
    out = tmp_path / "run"
    assert cli_main(["generate", "--out", str(out), "--limit", "2", "--quiet", "--set", "iterations=1"]) == 0
    capsys.readouterr()
    for args in (["--problems", str(tmp_path / "nope.json")], ["--set", "iteratons=2"],
                 ["--config", str(tmp_path / "nope.yaml")]):
        assert cli_main(["generate", "--out", str(out), "--limit", "3", "--quiet", "--resume", *args]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "rerun with --resume" not in err, err


def test_an_interrupt_before_any_problem_finished_says_so(tmp_path, capsys, monkeypatch):
    import rstar_fast.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_search", interrupted)
    assert cli_main(["generate", "--out", str(tmp_path / "new"), "--limit", "2"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: no problem finished in this run"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "trees.jsonl").write_text('{"problem_id": "0"}\n')  # an earlier run's
    assert cli_main(["generate", "--out", str(tmp_path / "old"), "--limit", "2", "--resume"]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: no problem finished in this run; rerun with --resume "
                                               "to continue")


def test_a_busy_folder_gets_no_advice_to_resume(tmp_path, capsys):
    """--resume would be refused alike while another run holds the folder."""
    import fcntl

    out = tmp_path / "busy"
    assert cli_main(["generate", "--out", str(out), "--limit", "2", "--quiet", "--set", "iterations=1"]) == 0
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert cli_main(["generate", "--out", str(out), "--limit", "3", "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another search is writing into this folder" in err and "rerun with --resume" not in err
    # nor a damaged trees file, where --resume is the command that fails
    with open(out / "trees.jsonl", "ab") as f:
        f.write(b"\0\0\0\n")
    assert cli_main(["generate", "--out", str(out), "--limit", "3", "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "delete that line" in err and "rerun with --resume" not in err


def test_problems_given_as_objects_must_have_distinct_ids(tmp_path, executor, grader):
    first, second = _problems(2, seed=4)
    twins = [first, Problem(first.id, second.question, second.answer, second.record)]
    cfg = load_config("round1", overrides=dict(iterations=1, n_generate_sample=2))
    with pytest.raises(ValueError, match="problems 0 and 1 share the id"):
        search_sync(twins, cfg, policy=SIM, executor=executor, grader=grader, out_dir=tmp_path / "twins")
    assert not (tmp_path / "twins" / "trees.jsonl").exists()


def test_an_input_field_named_correct_does_not_grade_a_problem(tmp_path, executor, grader):
    cfg = load_config("round1", overrides=dict(iterations=1, n_generate_sample=2))
    records = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 1 + 1?", "correct": True}]
    results = search_sync(records, cfg.replace(is_sampling=False, need_value_func=False, update_leaf_value=False),
                          policy=SIM, executor=executor, grader=grader, out_dir=tmp_path / "c")
    by_question = {r.record["question"]: r.record for r in results}
    assert by_question["What is 1 + 1?"]["correct"] is None


def test_config_counts_fit_the_core(tmp_path):
    from rstar_fast.search.config import ConfigError

    with pytest.raises(ConfigError, match=r"max_depth = 100000000000: must be < 2\*\*31"):
        load_config("round1", overrides={"max_depth": 10**11})


def test_math500_questions_run_on_the_simulated_engine(executor, grader):
    results = search_sync(
        SHARED / "math500_test.json",
        load_config("round1", overrides=dict(iterations=2, n_generate_sample=3)),
        policy=SIM, executor=executor, grader=grader, limit=2,
    )
    assert len(results) == 2
    assert all(len(r.record["rstar"]) > 1 for r in results)


def test_cli_generate_export_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["generate", "--out", str(out), "--limit", "3", "--quiet", "--policy", SIM,
                     "--set", "iterations=2", "--set", "n_generate_sample=3"])
    assert code == 0
    text = capsys.readouterr().out
    assert "3 problems searched" in text and "phase" in text
    assert len(list(read_trees(out / "trees.jsonl"))) == 3
    assert cli_main(["export", "sft", str(out / "trees.jsonl"), "-o", str(tmp_path / "sft.jsonl")]) == 0
    assert cli_main(["export", "pairs", str(out / "trees.jsonl"), "-o", str(tmp_path / "pairs.json")]) == 0
    assert cli_main(["export", "pairs", str(out / "trees.jsonl"), "-o", str(tmp_path / "vis.json"),
                     "--mode", "vis_count"]) == 0  # the reference's other walk: the most visited child only
    walked = {mode: json.loads((tmp_path / name).read_text()) for mode, name in (("all", "pairs.json"),
                                                                               ("vis_count", "vis.json"))}
    assert all(p in walked["all"] for p in walked["vis_count"])
    capsys.readouterr()
    # nothing passes the filters: said at once, not when training reads an empty file
    assert cli_main(["export", "pairs", str(out / "trees.jsonl"), "-o", str(tmp_path / "none.json"),
                     "--min-edit-distance", "100000", "--final-pairs", "0"]) == 0
    assert "warning: nothing to write" in capsys.readouterr().err
    for flag, value in (("--mode", "best"), ("--final-pairs", "-1"), ("--top", "0"), ("--min-margin", "nan"), ("--min-edit-distance", "-3")):
        with pytest.raises(SystemExit) as exit_:  # argparse: a usage line and status 2
            cli_main(["export", "pairs", str(out / "trees.jsonl"), "-o", str(tmp_path / "p.json"), flag, value])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err
    # bad input: one clear line, exit status 2, never a traceback
    assert cli_main(["generate", "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["generate", "--out", str(tmp_path / "x"), "--problems", "nope.json", "--quiet"]) == 2
    assert cli_main(["generate", "--out", str(tmp_path / "y"), "--set", "bogus=1", "--quiet"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_cli_exports_never_lose_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["generate", "--out", str(out), "--limit", "2", "--quiet", "--set", "iterations=2"]) == 0
    trees = out / "trees.jsonl"
    before = trees.read_bytes()
    # the output is the input: refused, the trees untouched
    assert cli_main(["export", "sft", str(trees), "-o", str(trees)]) == 2
    assert "is a trees file being exported" in capsys.readouterr().err and trees.read_bytes() == before
    # a failed export leaves the earlier output as it was
    keep = tmp_path / "keep.jsonl"
    assert cli_main(["export", "sft", str(trees), "-o", str(keep)]) == 0
    kept = keep.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(before.decode().splitlines()[0] + "\nnot json\n")
    assert cli_main(["export", "sft", str(bad), "-o", str(keep)]) == 2
    assert "bad.jsonl: line 2" in capsys.readouterr().err
    assert keep.read_bytes() == kept and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # files that hold no trees, and paths that are folders: one line each, status 2
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "plain.jsonl").write_text('{"question": "q"}\n')
    (tmp_path / "problems.json").write_text('[\n  {"question": "q"}\n]\n')
    (tmp_path / "none.json").write_text('[]')
    for args, message in ((["empty.jsonl", "-o", "x.jsonl"], "holds no finished problem"),
                          (["problems.json", "-o", "x.jsonl"], "problems.json: not a trees.jsonl (it is one JSON"),
                          (["none.json", "-o", "x.jsonl"], "none.json: not a trees.jsonl"),
                          (["plain.jsonl", "-o", "x.jsonl"], "no 'rstar' tree"),
                          ([".", "-o", "x.jsonl"], "is not a file"),
                          ([str(trees), "-o", "."], "is a folder")):
        args = [a if a.startswith(("-", "/")) or a == "." else str(tmp_path / a) for a in args]
        assert cli_main(["export", "sft", *args]) == 2
        assert message in capsys.readouterr().err
    # an output path under a file: the OS error as one line
    assert cli_main(["generate", "--out", str(keep / "sub"), "--limit", "1", "--quiet"]) == 2
    assert "Not a directory" in capsys.readouterr().err


def test_cli_resume_checks_the_problems_and_reports_the_whole_file(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    gsm, math = str(SHARED / "GSM8K_test.json"), str(SHARED / "math500_test.json")
    base = ["--out", str(out), "--quiet", "--set", "iterations=2"]
    assert cli_main(["generate", "--problems", gsm, "--limit", "3", *base]) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--problems", math, "--limit", "2", "--resume", *base]) == 2
    assert "holds trees of other problems" in capsys.readouterr().err
    assert len(list(read_trees(out / "trees.jsonl"))) == 3
    assert cli_main(["generate", "--problems", gsm, "--limit", "2", "--resume", *base]) == 0
    text = capsys.readouterr().out
    assert "nothing left to search: the 2 problems asked were searched before" in text and "rollouts" not in text
    assert cli_main(["generate", "--problems", gsm, "--limit", "5", "--resume", *base]) == 0
    text = capsys.readouterr().out
    assert "2 problems searched (3 already done)" in text and "answers of the 5 graded problems" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["skipped"] == 3 and summary["graded"] == 5
    records = list(read_trees(out / "trees.jsonl"))
    assert sum(bool(r["correct"]) for r in records) == summary["correct"]
    assert sum(bool(r["votes"]["passn"]) for r in records) == summary["votes"].get("passn", 0)
    # the settings stay those the trees were made with; a resume that changes them says so
    assert "resuming with other settings" not in caplog.text
    assert cli_main(["generate", "--problems", gsm, "--limit", "6", "--resume", *base, "--set", "c_puct=1"]) == 0
    assert "resuming with other settings (c_puct 2.0 -> 1.0)" in caplog.text
    assert json.loads((out / "config.json").read_text())["c_puct"] == 2.0
    # so does one with another policy (a forgotten --policy searches with the default)
    assert cli_main(["generate", "--problems", gsm, "--limit", "7", "--resume", *base,
                     "--policy", "sim:profile=instant"]) == 0
    assert "policy 'sim' -> 'sim:profile=instant'" in caplog.text
    # a PPM the search would never call is a mistake, not silently ignored
    assert cli_main(["generate", "--out", str(tmp_path / "p"), "--ppm", "hf:/nonexistent", "--quiet"]) == 2
    assert "need_value_func" in capsys.readouterr().err


def test_cli_engine_failure_is_one_error_line(tmp_path, capsys, monkeypatch):
    from rstar_fast.engines import EngineError
    from rstar_fast.search import api

    def down(spec, **options):
        raise EngineError(f"openai: http://127.0.0.1:9/v1: connection refused after 3 tries ({spec})")

    monkeypatch.setattr(api, "load_policy", down)
    code = cli_main(["generate", "--out", str(tmp_path / "r"), "--limit", "1", "--quiet", "--policy", "openai:x#m"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: openai: http://127.0.0.1:9/v1: connection refused" in err
    assert "--resume" not in err  # nothing was searched: no finished problem to resume from


def test_cli_refuses_what_cannot_work_before_loading_anything(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli_main(["generate", "--out", str(afile), "--limit", "1", "--quiet"]) == 2
    assert f"{afile}: is a file, not a folder" in capsys.readouterr().err
    # data generation rewards terminals from the gold answers: none given is an error
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"question": "What is 2 + 2?"}\n{"question": "What is 3 + 3?"}\n')
    assert cli_main(["generate", "--problems", str(noans), "--out", str(tmp_path / "g"), "--quiet"]) == 2
    assert "no problem has an answer (problems 0, 1)" in capsys.readouterr().err
    # a missing PPM is named before the policy is loaded (which would fail on this path first)
    assert cli_main(["eval", "--out", str(tmp_path / "e"), "--limit", "1", "--quiet", "--policy", "hf:/nonexistent"]) == 2
    assert "give one (--ppm SPEC" in capsys.readouterr().err


def test_a_folder_of_json_files_that_are_not_one_dataset_names_them(tmp_path, capsys):
    pytest.importorskip("datasets")  # without it the folder is refused for that
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.json").write_text(json.dumps([{"question": "q", "answer": "1"}]))
    (mixed / "b.json").write_text(json.dumps({"x": [1, 2]}))
    code = cli_main(["generate", "--problems", str(mixed), "--out", str(tmp_path / "m"), "--quiet", "-v"])
    err = capsys.readouterr().err
    assert code == 2 and "(a.json, b.json)" in err and "--resume" not in err, err


def test_some_problems_without_an_answer_are_named(tmp_path, caplog):
    records = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "What is 3 + 3?"}]
    with caplog.at_level(logging.WARNING):
        results = search_sync(records, "round1", limit=2)
    assert len(results) == 2 and "1 of 2 problems have no answer (1)" in caplog.text


def test_problems_sharing_a_question_but_not_the_answer_are_named_for_the_simulator(tmp_path, caplog):
    records = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "What is 3 + 3?", "answer": "6"},
               {"question": "What is 2 + 2?", "answer": "5"}, {"question": "What is 3 + 3?", "answer": "6"}]
    with caplog.at_level(logging.WARNING):
        results = search_sync(records, "round1", limit=4)
    assert len(results) == 4
    assert "problems 0 and 2 share a question but not an answer" in caplog.text
    # a run killed once problem 2 was done, then resumed, aims problem 0 as the whole run did
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    search_sync(records, "round1", out_dir=whole)
    resumed.mkdir()
    (resumed / "config.json").write_bytes((whole / "config.json").read_bytes())
    lines = (whole / "trees.jsonl").read_text().splitlines(keepends=True)
    (resumed / "trees.jsonl").write_text("".join(line for line in lines if line.startswith('{"problem_id": "2"')))
    search_sync(records, "round1", out_dir=resumed, resume=True)
    trees = {d: {r["problem_id"]: r["rstar"] for r in read_trees(d / "trees.jsonl")} for d in (whole, resumed)}
    assert trees[resumed] == trees[whole]


def test_the_api_checks_limit_and_the_search_package_is_importable():
    import rstar_fast
    import rstar_fast.search.config as config_module

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit must be a whole number >= 1"):
            search_sync(None, limit=bad)
    assert config_module.load_config is rstar_fast.load_config
    assert callable(rstar_fast.search) and rstar_fast.search.config is config_module
    assert sorted(r.problem.id for r in search_sync(None, "round1", limit=2)) == ["0", "1"]



def test_the_api_names_problems_and_out_dir_of_the_wrong_kind(tmp_path):
    with pytest.raises(TypeError, match="got int"):
        search_sync(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one record: put it in a list"):
        search_sync({"question": "1 + 1?", "answer": "2"})  # type: ignore[arg-type]
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        search_sync(None, limit=1, out_dir=tmp_path / "afile")


def test_a_search_leaves_the_process_as_it_found_it():
    """A library call without a progress bar fixes no multiprocessing start method (a training
    script may set "spawn" after it) and leaves no thread behind; search_sync has search's
    signature, so a type checker checks a script's keywords."""
    import inspect

    script = ("import multiprocessing as mp, threading, rstar_fast\n"
              "rstar_fast.search_sync(None, 'round1', limit=1, exec_workers=1)\n"
              "assert mp.get_start_method(allow_none=True) is None\n"
              "assert threading.active_count() == 1, threading.enumerate()\n"
              "mp.set_start_method('spawn')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert inspect.signature(search_sync).parameters == inspect.signature(search).parameters


def test_a_search_sharded_over_processes_gives_the_whole_run_s_training_data(tmp_path, capsys):
    """`--shard I/N` searches every N-th problem (one process per GPU, each with its own --out);
    the shards' trees, exported together, give what one run over all the problems gives."""
    common = ["--limit", "7", "--quiet", "--set", "iterations=2"]
    assert cli_main(["generate", "--out", str(tmp_path / "whole"), *common]) == 0
    for i in range(3):
        assert cli_main(["generate", "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/3", *common]) == 0
    ids = [sorted(r["problem_id"] for r in read_trees(tmp_path / f"s{i}" / "trees.jsonl")) for i in range(3)]
    assert ids == [["0", "3", "6"], ["1", "4"], ["2", "5"]]
    # a resume of one shard's folder with another shard would add that shard's problems to it
    capsys.readouterr()
    for wrong in (["--shard", "1/3"], []):
        assert cli_main(["generate", "--out", str(tmp_path / "s0"), *wrong, "--resume", *common]) == 2
        err = capsys.readouterr().err
        assert "searched shard 0/3 (--shard 0/3), resumed with " in err and "rerun with --resume" not in err
    assert sorted(r["problem_id"] for r in read_trees(tmp_path / "s0" / "trees.jsonl")) == ["0", "3", "6"]
    shards = [str(tmp_path / f"s{i}" / "trees.jsonl") for i in (2, 0, 1)]
    for kind in ("sft", "pairs"):
        whole = str(tmp_path / "whole" / "trees.jsonl")
        assert cli_main(["export", kind, whole, "-o", str(tmp_path / "whole.out")]) == 0
        assert cli_main(["export", kind, *shards, "-o", str(tmp_path / "shards.out")]) == 0
        assert (tmp_path / "whole.out").read_bytes() == (tmp_path / "shards.out").read_bytes()
    capsys.readouterr()
    for bad in ("3/3", "1", "a/2", "-1/2"):
        with pytest.raises(SystemExit):
            cli_main(["generate", "--out", str(tmp_path / "bad"), f"--shard={bad}", "--limit", "2", "--quiet"])
        assert "is not I/N with 0 <= I < N" in capsys.readouterr().err
    assert cli_main(["generate", "--out", str(tmp_path / "bad"), "--shard", "2/3", "--limit", "2", "--quiet"]) == 2
    assert "shard 2/3 holds no problem" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match=r"shard must be \(i, n\) with 0 <= i < n"):
        search_sync(None, limit=1, shard=(1, 1))


def test_an_interrupt_on_a_hung_up_terminal_still_ends_with_130(monkeypatch):
    """After SIGHUP the terminal takes no more output: saying "interrupted" fails there, and the
    status must still say the command was interrupted, not that it failed."""
    import rstar_fast.cli as cli

    class HungUp:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

    def interrupted(args):
        monkeypatch.setattr(sys, "stderr", HungUp())
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_export", interrupted)
    assert cli_main(["export", "sft", "t.jsonl", "-o", "x.jsonl"]) == 130


@pytest.mark.parametrize("stop, sigint_ignored", [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                                   (signal.SIGHUP, False)],
                         ids=["sigterm", "sigterm-background-job", "sighup"])
def test_sigterm_or_sighup_stops_a_search_as_ctrl_c_does(tmp_path, stop, sigint_ignored):
    """SIGTERM as Slurm or `docker stop` send it, also when started with SIGINT ignored (as a
    script's `rstar-fast generate ... &` is); SIGHUP as a closed ssh session sends it."""
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "rstar_fast.cli", "generate", "--out", str(out), "--limit", "400", "--quiet",
           "--set", "max_in_flight=4"]
    def dispositions() -> None:  # as a terminal's session has them, even when the tests run under nohup
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=dispositions)
    deadline = time.monotonic() + 120
    trees = out / "trees.jsonl"
    while (not trees.exists() or trees.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(stop)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left running after a failure
    # as a shell reports a command a signal ended: 128 + its number (143 for SIGTERM, 129 for SIGHUP)
    assert proc.returncode == 128 + stop and "interrupted: finished problems are saved" in err, err
    lines = trees.read_text().splitlines()
    assert 0 < len(lines) < 400 and all(json.loads(line)["rstar"] for line in lines)


def test_a_failing_problem_is_named_and_set_aside(tmp_path, capsys, caplog, monkeypatch):
    """A failure that is not the engine's (a bug, say) in one problem: one line names the
    problem and its error (the traceback under -v), the others are searched and saved, and
    the command ends with status 1."""
    from rstar_fast.engines import sim

    real = sim.SimPolicy.generate
    problems = generate_problems(6, seed=1)
    doomed = problems[4]["question"]

    async def generate(self, prompt_ids, params):
        if doomed in self.tokenizer.decode(prompt_ids):
            raise KeyError("boom")
        return await real(self, prompt_ids, params)

    monkeypatch.setattr(sim.SimPolicy, "generate", generate)
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(problems))
    out = tmp_path / "r"
    code = cli_main(["generate", "--problems", str(path), "--out", str(out), "--quiet", "--set", "iterations=2",
                     "--set", "max_in_flight=1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "1 problem(s) failed" in err and "--resume" in err
    (warned,) = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert "problem 4 failed and is set aside (KeyError: 'boom')" in warned.getMessage() and not warned.exc_info
    assert [r["problem_id"] for r in read_trees(out / "trees.jsonl")] == ["0", "1", "2", "3", "5"]
    caplog.clear()
    with caplog.at_level(logging.INFO):  # as -v sets it (pytest's own handler keeps -v from doing it here)
        assert cli_main(["-v", "generate", "--problems", str(path), "--out", str(out), "--quiet", "--resume"]) == 1
    (warned,) = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert warned.exc_info  # -v: the traceback


def test_problems_finished_beside_a_failure_are_handed_out_first():
    from rstar_fast.search.driver import pipelined

    async def go():
        gate = asyncio.Event()

        async def solve(problem):
            await gate.wait()
            if problem.id == "bad":
                raise ValueError("boom")
            return problem.id

        got = []
        results = pipelined([Problem("bad", "q1", None, {}), Problem("good", "q2", None, {})], 2, solve)
        asyncio.get_running_loop().call_later(0.01, gate.set)  # both end in the same turn
        with pytest.raises(ValueError, match="boom") as err:
            async for r in results:
                got.append(r)
        return got, err.value.__notes__

    assert asyncio.run(go()) == (["good"], ["while searching problem bad"])


def test_the_executor_a_search_makes_starts_off_the_event_loop(monkeypatch):
    """It waits seconds for its workers: on the loop's thread that would stall whatever else
    the loop serves (a notebook, a second search)."""
    import threading

    from rstar_fast.executor import StepExecutor

    threads: list[str] = []
    start = StepExecutor.__init__

    def recording_start(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        start(self, *args, **kwargs)

    monkeypatch.setattr(StepExecutor, "__init__", recording_start)
    assert len(search_sync(None, "round1", limit=1, exec_workers=1)) == 1
    assert threads and threading.main_thread().name not in threads, threads


def test_a_slow_consumer_holds_the_search_back_and_failures_are_all_recorded():
    """Finished problems count against max_problems until taken, so a slow consumer cannot
    make them pile up in memory unwritten; failures queued when the failure limit stops a run
    still reach on_error (failed.jsonl)."""
    from rstar_fast.search.driver import pipelined

    async def slow_consumer():
        solved: list[str] = []

        async def solve(problem):
            solved.append(problem.id)
            return problem.id

        got = []
        async for r in pipelined([Problem(str(i), "q", None, {}) for i in range(40)], 4, solve):
            got.append(r)
            if len(got) == 2:
                for _ in range(20):  # the consumer dawdles: the search must not run ahead
                    await asyncio.sleep(0)
                return len(solved)

    assert asyncio.run(slow_consumer()) <= 2 + 4

    async def failures():
        recorded: list[str] = []

        async def solve(problem):
            await asyncio.sleep(0)
            raise ValueError("engine down")

        def on_error(problem, error):
            recorded.append(problem.id)
            if len(recorded) >= 2:
                raise RuntimeError("too many failures")

        with pytest.raises(RuntimeError):
            async for _ in pipelined([Problem(str(i), "q", None, {}) for i in range(6)], 6, solve, on_error):
                pass
        return recorded

    assert sorted(asyncio.run(failures())) == [str(i) for i in range(6)]


def test_leaving_a_search_early_closes_it_cleanly(executor, grader):
    async def two_then_stop():
        results = search(None, load_config("round1", overrides=dict(iterations=2)), policy=SIM,
                         executor=executor, grader=grader, limit=20)
        got = []
        async for r in results:
            got.append(r)
            if len(got) == 2:
                break
        await results.aclose()
        return got, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    got, pending = asyncio.run(two_then_stop())
    assert len(got) == 2 and pending == []


BREAK_THEN_END = r"""
import asyncio, sys, tempfile
from rstar_fast.search import load_config, search

async def main():
    cfg = load_config("round2", overrides=eval(sys.argv[1]))
    async for _ in search(None, cfg, policy="sim", limit=12, out_dir=tempfile.mkdtemp(), exec_workers=1):
        break

asyncio.run(main())
"""


@pytest.mark.parametrize("overrides", ["{}", "{'mode': 'best_of_n', 'bon_n': 4}"])
def test_a_break_just_before_asyncio_run_ends_closes_the_search_without_an_error(overrides):
    """asyncio.run then closes every generator it knows at once: the search's inner ones are
    its own to close, and closed twice at once they made asyncio log an error."""
    done = subprocess.run([sys.executable, "-c", BREAK_THEN_END, overrides], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_search_left_by_break_lets_the_next_one_into_its_folder(tmp_path, executor, grader):
    """`break` out of `async for` leaves the search to the event loop's cleanup, which comes a
    moment later: a second search into the same folder waits for it instead of being refused."""
    cfg = load_config("round1", overrides=dict(iterations=2))

    async def break_then_resume() -> int:
        async for _ in search(None, cfg, policy=SIM, executor=executor, grader=grader, limit=8, out_dir=tmp_path):
            break
        return len([r async for r in search(None, cfg, policy=SIM, executor=executor, grader=grader, limit=8,
                                            out_dir=tmp_path, resume=True)])

    assert asyncio.run(break_then_resume()) == 7
    assert len(list(read_trees(tmp_path / "trees.jsonl"))) == 8


def test_a_seeded_search_is_reproducible_whatever_the_schedule(executor, grader, tiny_policy_path):
    """Each expansion samples from the config's seed mixed with its path, so the trees do not
    depend on which expansions share a batch or finish first."""
    pytest.importorskip("torch")
    problems = _problems(3, seed=2)

    async def search(in_flight: int) -> list[dict]:
        cfg = load_config("round1", overrides=dict(iterations=3, n_generate_sample=3, max_tokens=12,
                                                   temperature=1.0, seed=11, max_in_flight=in_flight))
        policy = load_policy(f"hf:{tiny_policy_path}", device="cpu", dtype="float32")
        runner = SearchRunner(cfg, policy, executor, grader)
        results = [r async for r in runner.run(problems)]
        await policy.close()
        return [r.record["rstar"] for r in sorted(results, key=lambda r: int(r.problem.id))]

    one_at_a_time, all_at_once = asyncio.run(search(1)), asyncio.run(search(16))
    assert one_at_a_time == all_at_once
    texts = [n["text"] for tree in one_at_a_time for tag, n in tree.items() if tag != "0"]
    assert len(set(texts)) > len(texts) // 2  # paths do not share their draws


def test_path_seed_mixes_the_seed_with_the_path():
    from rstar_fast.search.driver import path_seed

    assert path_seed(11, [1, 2, 3]) == path_seed(11, [1, 2, 3])
    seeds = {path_seed(11, [1, 2, 3]), path_seed(11, [1, 2, 4]), path_seed(12, [1, 2, 3]), path_seed(11, [])}
    assert len(seeds) == 4 and all(0 <= s < 2**31 for s in seeds)
    # pinned: a seeded search (the demo's) draws the same tokens in every version
    assert (path_seed(11, [1, 2, 3]), path_seed(0, []), path_seed(42, [151643, 7, 99999])) == (567810065, 0, 78565452)
    assert path_seed(11, np.array([1, 2, 3], dtype=np.int32)) == 567810065  # the forest's arrays


def test_paths_and_steps_stay_within_max_model_len(executor, grader):
    """As the reference's vLLM does: a step ends where the context does, and a path that fills
    it gets an empty step (the branch ends), whatever the engine itself would allow."""
    from rstar_fast.search.prompts import prompt_for

    problems = _problems(3)
    cfg = load_config("round1", overrides=dict(iterations=4, n_generate_sample=2, seed=1))
    tokenizer = load_policy(SIM).tokenizer
    limit = max(len(tokenizer.encode(prompt_for(p.question, cfg))) for p in problems) + 150
    cfg = replace(cfg, max_model_len=limit)  # room for a step or two of about 90 tokens
    calls = []

    class Recording(_Wrapped):
        async def generate(self, prompt_ids, params):
            out = await self.inner.generate(prompt_ids, params)
            calls.append((len(prompt_ids), params.max_tokens, [len(c.token_ids) for c in out]))
            return out

    policy = Recording(load_policy(SIM))
    policy.register_problems({p.question: p.answer for p in problems})
    runner = SearchRunner(cfg, policy, executor, grader)

    async def go():
        return [r async for r in runner.run(problems)]

    results = asyncio.run(go())
    assert len(results) == 3 and calls
    assert all(prompt + n <= limit for prompt, _, lengths in calls for n in lengths)
    assert all(prompt < limit and cap == min(cfg.max_tokens, limit - prompt) for prompt, cap, _ in calls)
    assert any(cap < cfg.max_tokens for _, cap, _ in calls)  # some steps were cut by the context
    nodes = [n for r in results for n in _nodes(r).values()]
    assert any(n["final_answer"] in st.FAILED_TERMINALS for n in nodes)  # some branches ended there


def test_a_prompt_that_fills_max_model_len_is_named(executor, grader, caplog):
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2, seed=1, max_model_len=50))
    with caplog.at_level("WARNING"):
        runner, results = asyncio.run(_run(_problems(3), cfg, executor, grader))
    assert len(results) == 3 and not any(r.correct for r in results)
    warnings = [r.getMessage() for r in caplog.records if "fills max_model_len (50)" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("problem 0: its prompt has ")


class _EndlessPolicy(PolicyEngine):
    """Writes one more code step every time, never an answer."""

    def __init__(self) -> None:
        from rstar_fast.engines.tokenizer import ByteTokenizer

        self.tokenizer = ByteTokenizer()
        self.stats = load_policy(SIM).stats
        self.calls = 0

    async def generate(self, prompt_ids, params):
        self.calls += 1
        k = self.tokenizer.decode(prompt_ids).count("<end_of_step>")
        text = ("<code>\n" if k == 0 else "") + f"# Step {k + 1}: keep going\nx{k} = {k}\n<end_of_step>"
        return [Completion(text, self.tokenizer.encode(text), "stop", "<end_of_step>")] * params.n


@pytest.mark.parametrize("schedule", ["pipelined", "lockstep"])
def test_a_rollout_takes_at_most_max_depth_steps(executor, grader, schedule):
    """The reference's rollout is `for step in range(max_depth)`: from a fresh root it expands
    depths 0 to max_depth - 1 and leaves the next leaf for a later rollout, which goes on from
    there until a child is created past max_depth (terminal, too many steps)."""
    cfg = load_config("round1", overrides=dict(iterations=1, n_generate_sample=1, max_depth=3, schedule=schedule))
    problems = problems_from_records([{"question": "What is 1+1?", "answer": "2"}]).problems
    for iterations, calls, deepest in ((1, 3, ""), (2, 4, st.TOO_MANY_STEPS)):
        policy = _EndlessPolicy()
        runner = SearchRunner(cfg.replace(iterations=iterations), policy, executor, grader)

        async def go():
            return [r async for r in runner.run(problems)]

        (result,) = asyncio.run(go())
        nodes = _nodes(result)
        assert policy.calls == calls and max(t.count(".") for t in nodes) == calls
        assert nodes[max(nodes, key=len)]["final_answer"] == deepest
        assert int(runner.forest.in_flight(np.arange(runner.forest.num_nodes)).sum()) == 0


def test_a_path_past_the_context_reaches_the_ppm_cut_as_the_reference_cuts_it(executor, grader):
    """prevent_overlength: a sequence of max_model_len tokens or more keeps its first
    max_model_len - 1 (the question stays; what is cut is the end)."""
    from types import SimpleNamespace

    from rstar_fast.engines.base import EngineStats, PPMEngine

    class Recording(PPMEngine):
        def __init__(self):
            self.stats, self.seen = EngineStats(), []

        async def score(self, sequences):
            self.seen += [list(s) for s in sequences]
            return [0.5] * len(sequences)

    ppm = Recording()
    runner = SearchRunner(load_config("round2", overrides=dict(max_model_len=10)), load_policy(SIM), executor,
                          grader, ppm=ppm)
    ex = SimpleNamespace(prompt=list(range(6)), values=[math.nan] * 3)
    asyncio.run(runner.score_children(ex, [[6, 7, 8], [6, 7, 8, 9], [6, 7, 8, 9, 10, 11]], [0, 1, 2]))
    assert ppm.seen == [list(range(9))] * 3 and ex.values == [0.5] * 3


def test_votes_compare_answers_with_the_runners_grader(executor, grader, monkeypatch):
    """Which answers count as one in a vote is the runner's grader's call: no second,
    process-wide grader is started behind it."""
    import rstar_fast.search.grading as grading

    def second_grader():
        raise AssertionError("a vote started the process-wide grader")

    monkeypatch.setattr(grading, "default_grader", second_grader)
    cfg = load_config("round1", overrides=dict(iterations=6, n_generate_sample=3, seed=1))
    _, results = asyncio.run(_run(_problems(8), cfg, executor, grader, sim="sim:profile=instant,seed=3,p_correct=0.5"))
    assert len(results) == 8
    answers = [{n["final_answer"] for n in _nodes(r).values() if st.is_valid_final_answer(n["final_answer"])}
               for r in results]
    assert any(len(a) > 1 for a in answers)  # some vote weighed answers that differ


class _TwoFirstSteps(PolicyEngine):
    """Offers two first steps, then the answer: one step prints the word "error" and succeeds,
    the other raises without closing its block (so its text never shows the failure)."""

    PRINTS_ERROR = "<code>\nerr = 0.001\nprint('relative error:', err)\nprint(5)\n<end_of_code>"
    RAISES = "<code>\nx = 1/0\n<end_of_step>"
    ANSWER = "<answer>The answer is \\boxed{5}.\n<end_of_answer>"

    def __init__(self) -> None:
        self.tokenizer = load_policy(SIM).tokenizer
        self.stats = EngineStats()

    async def generate(self, prompt_ids, params):
        first = "<code>" not in self.tokenizer.decode(prompt_ids).rpartition("Q?")[2]  # after the question
        texts = [self.PRINTS_ERROR, self.RAISES] if first else [self.ANSWER]
        texts = (texts * params.n)[: params.n]
        return [Completion(t, self.tokenizer.encode(t), "stop", next(s for s in params.stop if t.endswith(s)))
                for t in texts]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("rule", ["raised", "substring"])
def test_sft_drops_the_traces_whose_steps_failed_by_the_searchs_rule(tmp_path, executor, grader, rule):
    """Under the raised rule a step that raised is a failed step though its text does not say so,
    and one that prints the word "error" is not; under the substring rule (and in trees that do
    not record failures) the reference's test of the trace's text decides."""
    from rstar_fast.search.export import export_sft

    cfg = load_config("round1", overrides=dict(iterations=4, n_generate_sample=2, seed=0, error_rule=rule))
    search_sync([{"question": "Q?", "answer": "5"}], cfg, policy=_TwoFirstSteps(), executor=executor,
                grader=grader, out_dir=tmp_path / "run")
    nodes = next(read_trees(tmp_path / "run" / "trees.jsonl"))["rstar"]
    assert export_sft(tmp_path / "run" / "trees.jsonl", tmp_path / "sft.json") == 1
    kept = json.loads((tmp_path / "sft.json").read_text())[0]["response"]
    if rule == "raised":
        assert [n.get("code_error") for n in nodes.values()] == [False, False, True, False, False]
        assert kept.startswith(_TwoFirstSteps.PRINTS_ERROR)
    else:
        assert all("code_error" not in n for n in nodes.values())
        assert kept.startswith(_TwoFirstSteps.RAISES)


def test_the_command_says_its_version_and_runs_as_a_module(capsys):
    import rstar_fast

    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"rstar-fast {rstar_fast.__version__}"
    out = subprocess.run([sys.executable, "-m", "rstar_fast", "export", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "sft" in out.stdout, out.stderr


def test_the_bar_shows_rollouts_before_any_problem_finishes(executor, grader, capsys):
    class Slow(_Wrapped):
        async def generate(self, prompt_ids, params):
            await asyncio.sleep(0.3)
            return await self.inner.generate(prompt_ids, params)

    cfg = load_config("round1", overrides=dict(iterations=6, n_generate_sample=2, seed=0))
    results = search_sync(generate_problems(2, seed=0), cfg, policy=Slow(load_policy(SIM)), executor=executor,
                          grader=grader, progress=True)
    err = capsys.readouterr().err
    assert re.search(r" 0/2 .*rollouts=[1-9]", err), err[-2000:]
    # and it ends on the run's own figures
    accuracy = sum(bool(r.correct) for r in results) / len(results)
    assert re.findall(r"acc=([0-9.]+%)", err)[-1] == f"{accuracy:.1%}", err[-2000:]


def test_a_shard_takes_its_share_of_the_cores_for_step_code(tmp_path, monkeypatch, grader):
    """n shard processes share one machine: each sizes its executor to cores / n (every worker
    keeps a warm interpreter), unless told; --exec-workers tells it from the command line."""
    import rstar_fast.search.api as api
    from rstar_fast.executor.pool import available_cores

    sizes = []

    class Recording(api.StepExecutor):
        def __init__(self, **kw):
            super().__init__(**kw)
            sizes.append(self.workers)

    monkeypatch.setattr(api, "StepExecutor", Recording)
    cfg = load_config("round1", overrides=dict(iterations=1, n_generate_sample=1))
    problems = generate_problems(4, seed=0)
    search_sync(problems, cfg, grader=grader)
    search_sync(problems, cfg, grader=grader, shard=(0, 2))
    search_sync(problems, cfg, grader=grader, shard=(1, 2), exec_workers=3)
    assert cli_main(["generate", "--out", str(tmp_path / "o"), "--limit", "2", "--quiet", "--exec-workers", "1",
                     "--set", "iterations=1"]) == 0
    assert sizes == [available_cores(), max(1, available_cores() // 2), 3, 1]
    with pytest.raises(ValueError, match="give it or an executor, not both"):
        search_sync(problems, cfg, executor=object(), exec_workers=2)
    with pytest.raises(ValueError, match="exec_workers must be a whole number >= 1"):
        search_sync(problems, cfg, exec_workers=0)


def test_an_mcts_answer_is_the_top_four_majority_and_judged_by_it(monkeypatch, executor, grader):
    """The prediction is the majority vote (k = top_k_vote = 4, however many rollouts
    answered), and `correct` is that vote's verdict, not pass@1's."""
    from rstar_fast.search import driver

    seen = []

    def recorded_evaluate(gold, trajectories, k, grade=None, equiv=None):
        seen.append((list(trajectories), k))
        return {"best": "B", "majority": "M", "weighted": "W", "pass1": False, "passn": True, "maj": True,
                "wmaj": False}

    monkeypatch.setattr(driver, "evaluate", recorded_evaluate)
    cfg = load_config("round1", overrides=dict(iterations=8, n_generate_sample=3, seed=1))
    results = search_sync([p.record for p in _problems(4)], cfg, policy=SIM, executor=executor, grader=grader)
    answered = [r for r in results if r.votes]
    assert answered and len(seen) == len(answered)
    assert all(r.pred == "M" and r.correct is True for r in answered)
    assert all(k == 4 for _, k in seen) and any(len(t) != 4 for t, _ in seen)
