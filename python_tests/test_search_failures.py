"""A search when something fails part way: one problem's error, a dead engine, memory over a
long run. Finished work is kept, nothing is left running, and the error names the problem."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import math
import weakref
from pathlib import Path

import numpy as np
import pytest

from rstar_fast.cli import main as cli_main
from rstar_fast.engines import EngineError, EngineSpecError, EngineUnavailableError, PolicyEngine, PPMEngine, load_policy, load_ppm
from rstar_fast.search.api import FAILED_FILE, MAX_FAILURES_IN_A_ROW, RunSummary, search, search_sync
from rstar_fast.search.config import load_config
from rstar_fast.search.driver import SearchRunner
from rstar_fast.search.problems import Problem, problems_from_records
from rstar_fast.search.records import read_trees
from rstar_fast.synthetic import generate_problems

SIM = "sim:profile=instant,seed=3"


def _problems(n: int, seed: int = 0) -> list[Problem]:
    return problems_from_records(generate_problems(n, seed=seed)).problems


class _Faulty(PolicyEngine):
    """The simulated policy, except that generating for a poisoned question raises (after its
    first `spare` calls; only once with `once`), and every call is counted."""

    def __init__(self, poisoned: set[str], spare: int = 0, once: bool = False) -> None:
        self.inner = load_policy(SIM)
        self.tokenizer, self.stats = self.inner.tokenizer, self.inner.stats
        self.poisoned, self.spare, self.once, self.calls = poisoned, spare, once, 0
        self.seen: dict[str, int] = {}

    def register_problems(self, answers):
        self.inner.register_problems(answers)

    async def generate(self, prompt_ids, params):
        self.calls += 1
        text = self.tokenizer.decode(prompt_ids)
        for q in self.poisoned:
            if q in text:
                self.seen[q] = self.seen.get(q, 0) + 1
                if self.seen[q] > self.spare and not (self.once and self.seen[q] > self.spare + 1):
                    raise RuntimeError("engine rejected the request")
        return await self.inner.generate(prompt_ids, params)

    async def close(self):
        await self.inner.close()


def test_a_failing_problem_is_set_aside_and_a_resume_retries_it(tmp_path: Path, executor, grader) -> None:
    problems = _problems(6)
    cfg = load_config("round1", overrides=dict(iterations=3, n_generate_sample=3, seed=1))
    summary = RunSummary()
    faulty = _Faulty({problems[2].question}, spare=1)
    results = search_sync(problems, cfg, policy=faulty, executor=executor, grader=grader, out_dir=tmp_path,
                          summary=summary)
    assert sorted(r.problem.id for r in results) == ["0", "1", "3", "4", "5"]
    assert summary.failed == 1 and summary.problems == 5
    (line,) = (tmp_path / FAILED_FILE).read_text().splitlines()
    assert json.loads(line) == {"problem_id": "2", "error": "RuntimeError: engine rejected the request"}
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == 1
    # the resume searches only the failed problem, and the list then is empty
    again = RunSummary()
    done = search_sync(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=tmp_path,
                       resume=True, summary=again)
    assert [r.problem.id for r in done] == ["2"] and again.skipped == 5 and again.failed == 0
    assert not (tmp_path / FAILED_FILE).exists()
    assert sorted(r["problem_id"] for r in read_trees(tmp_path / "trees.jsonl")) == [str(i) for i in range(6)]


def test_a_lockstep_run_sets_a_failing_problem_aside_too(tmp_path: Path, executor, grader) -> None:
    problems = _problems(5)
    cfg = load_config("round1", overrides=dict(iterations=3, n_generate_sample=2, seed=1, schedule="lockstep"))
    summary = RunSummary()
    results = search_sync(problems, cfg, policy=_Faulty({problems[3].question}, spare=1), executor=executor,
                          grader=grader, out_dir=tmp_path, summary=summary)
    assert sorted(r.problem.id for r in results) == ["0", "1", "2", "4"] and summary.failed == 1
    assert json.loads((tmp_path / FAILED_FILE).read_text())["problem_id"] == "3"


def test_failures_in_a_row_stop_the_run(executor, grader) -> None:
    problems = _problems(MAX_FAILURES_IN_A_ROW + 4)
    faulty = _Faulty({p.question for p in problems})
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2))
    with pytest.raises(RuntimeError, match="engine rejected") as caught:
        search_sync(problems, cfg, policy=faulty, executor=executor, grader=grader)
    assert f"{MAX_FAILURES_IN_A_ROW} problems in a row failed: the run stops" in caught.value.__notes__


class _Unreachable(_Faulty):
    """A server that went down after the first problem finished: its engine has retried already."""

    async def generate(self, prompt_ids, params):
        self.calls += 1
        if self.calls > self.spare:
            raise EngineUnavailableError("openai: cannot reach http://127.0.0.1:9/v1/completions")
        return await self.inner.generate(prompt_ids, params)


def test_an_engine_that_cannot_be_reached_stops_the_run_at_once(tmp_path: Path, executor, grader) -> None:
    """Each problem would fail alike: no warning per problem, one error, finished work kept."""
    problems = _problems(6)
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2, max_in_flight=1))
    summary = RunSummary()
    with pytest.raises(EngineUnavailableError, match="cannot reach") as caught:
        search_sync(problems, cfg, policy=_Unreachable(set(), spare=2), executor=executor, grader=grader,
                    out_dir=tmp_path, summary=summary)
    assert "the engine cannot be reached: the run stops" in caught.value.__notes__
    assert summary.failed == 1 and len((tmp_path / FAILED_FILE).read_text().splitlines()) == 1


class _Hanging(_Faulty):
    """Never answers for a poisoned question (after `spare` calls), as a hung server would."""

    async def generate(self, prompt_ids, params):
        try:
            return await super().generate(prompt_ids, params)
        except RuntimeError:
            await asyncio.Event().wait()
            raise


def test_an_engine_that_does_not_answer_in_time_stops_the_run(tmp_path: Path, executor, grader) -> None:
    """engine_timeout_s: a call that hangs ends the run with one error, the finished problems kept."""
    problems = _problems(6)
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2, max_in_flight=1,
                                               engine_timeout_s=0.5))
    summary = RunSummary()
    with pytest.raises(EngineUnavailableError, match=r"the policy did not answer within engine_timeout_s = 0.5 s"):
        search_sync(problems, cfg, policy=_Hanging({problems[3].question}), executor=executor, grader=grader,
                    out_dir=tmp_path, summary=summary)
    assert summary.failed == 1 and len(list(read_trees(tmp_path / "trees.jsonl"))) == 3


def test_an_engine_s_own_timeout_is_its_own_error(tmp_path: Path, executor, grader) -> None:
    """A TimeoutError the engine raises within the limit is that problem's failure, not the limit's."""

    class OwnTimeout(_Faulty):
        async def generate(self, prompt_ids, params):
            try:
                return await super().generate(prompt_ids, params)
            except RuntimeError:
                raise TimeoutError("upstream read timed out") from None

    problems = _problems(3)
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2, max_in_flight=1,
                                               engine_timeout_s=30))
    summary = RunSummary()
    search_sync(problems, cfg, policy=OwnTimeout({problems[1].question}), executor=executor, grader=grader,
                out_dir=tmp_path, summary=summary)
    assert summary.failed == 1 and len(list(read_trees(tmp_path / "trees.jsonl"))) == 2
    assert "upstream read timed out" in (tmp_path / FAILED_FILE).read_text()


def test_a_run_whose_every_problem_failed_raises(tmp_path: Path, executor, grader) -> None:
    """Fewer problems than MAX_FAILURES_IN_A_ROW, all failing (a broken engine, a server down):
    the run ends with the error, not as a finished run that returned nothing."""
    problems = _problems(3)
    faulty = _Faulty({p.question for p in problems})
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2))
    with pytest.raises(RuntimeError, match="engine rejected") as caught:
        search_sync(problems, cfg, policy=faulty, executor=executor, grader=grader, out_dir=tmp_path)
    assert f"all 3 problems of this run failed (listed in {tmp_path / FAILED_FILE})" in caught.value.__notes__
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 3 and not summary["finished"]


def test_a_run_stopped_early_leaves_a_summary_of_what_the_file_holds(tmp_path: Path, executor, grader) -> None:
    """Interrupted (here: left after its first problem), a resumed run's summary.json counts the
    problems in trees.jsonl then, and says it did not finish; not the earlier run's figures."""
    problems = _problems(5)
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2, seed=1))
    search_sync(problems[:2], cfg, policy=SIM, executor=executor, grader=grader, out_dir=tmp_path)
    first = json.loads((tmp_path / "summary.json").read_text())
    assert first["finished"] and first["graded"] == 2

    async def first_one() -> None:
        async for _ in search(problems, cfg, policy=SIM, executor=executor, grader=grader, out_dir=tmp_path,
                              resume=True):
            break

    asyncio.run(first_one())
    now = json.loads((tmp_path / "summary.json").read_text())
    assert not now["finished"] and now["graded"] == 3 and now["problems"] == 1 and now["skipped"] == 2
    assert len(list(read_trees(tmp_path / "trees.jsonl"))) == 3


def test_the_cli_says_which_problems_failed_and_exits_nonzero(tmp_path: Path, monkeypatch, capsys) -> None:
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in generate_problems(3, seed=0)))
    poisoned = json.loads(problems.read_text().splitlines()[1])["question"]
    import rstar_fast.search.api as api

    real = api.load_policy
    monkeypatch.setattr(api, "load_policy", lambda spec: _Faulty({poisoned}) if spec == "sim" else real(spec))
    rc = cli_main(["generate", "--problems", str(problems), "--out", str(tmp_path / "out"), "--quiet",
                   "--set", "iterations=2"])
    err = capsys.readouterr().err
    assert rc == 1 and "1 problem(s) failed" in err and str(tmp_path / "out" / FAILED_FILE) in err
    assert len(list(read_trees(tmp_path / "out" / "trees.jsonl"))) == 2


def test_a_failed_problem_leaves_no_simulation_running(executor, grader) -> None:
    """With several simulations per tree, the failing one's siblings are cancelled with it:
    nothing calls the engine once the run has raised."""
    problem = _problems(1)
    faulty = _Faulty({problem[0].question}, spare=2, once=True)
    cfg = load_config("round1", overrides=dict(iterations=16, n_generate_sample=2, sims_per_tree=4))
    runner = SearchRunner(cfg, faulty, executor, grader)

    async def go() -> int:
        with pytest.raises(RuntimeError, match="engine rejected"):
            async for _ in runner.run(problem):
                pass
        calls = faulty.calls
        await asyncio.sleep(0.5)
        return faulty.calls - calls

    assert asyncio.run(go()) == 0
    ids = np.arange(runner.forest.num_nodes)
    assert int(runner.forest.in_flight(ids).sum()) == 0


def test_a_lockstep_error_names_its_problem_and_ends_every_simulation(executor, grader) -> None:
    problems = _problems(4)
    faulty = _Faulty({problems[2].question}, spare=1)
    cfg = load_config("round1", overrides=dict(iterations=3, n_generate_sample=2, schedule="lockstep"))
    runner = SearchRunner(cfg, faulty, executor, grader)

    async def go() -> None:
        async for _ in runner.run(problems):
            pass

    with pytest.raises(RuntimeError, match="engine rejected") as caught:
        asyncio.run(go())
    assert caught.value.__notes__ == ["while searching problem 2"]
    assert int(runner.forest.in_flight(np.arange(runner.forest.num_nodes)).sum()) == 0


def test_finished_trees_are_freed_with_their_forest(executor, grader) -> None:
    """New trees go to a fresh forest once the current one is full; a full forest is freed when
    its last tree is finished, and the trees are the same as in one forest."""
    problems = _problems(12)
    cfg = load_config("round1", overrides=dict(iterations=3, n_generate_sample=3, seed=1, max_in_flight=2))

    def run(forest_nodes: int) -> tuple[list[dict], int, int]:
        policy = load_policy(SIM)
        policy.register_problems({p.question: p.answer for p in problems})
        runner = SearchRunner(cfg, policy, executor, grader, forest_nodes=forest_nodes)
        forests = [weakref.ref(runner.forest)]
        most_alive = 0

        async def go() -> list[dict]:
            nonlocal most_alive
            records = []
            async for r in runner.run(problems):
                records.append(r.record)
                if forests[-1]() is not runner.forest:
                    forests.append(weakref.ref(runner.forest))
                gc.collect()
                most_alive = max(most_alive, sum(ref() is not None for ref in forests))
            return records

        records = asyncio.run(go())
        return sorted(records, key=lambda r: int(r["problem_id"])), len(forests), most_alive

    whole, one, _ = run(1 << 20)
    rotated, made, most_alive = run(20)
    assert rotated == whole and one == 1
    assert made >= 4 and most_alive <= 3  # two problems in flight: at most three forests hold trees


def test_api_misuse_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config must be a preset name or a SearchConfig"):
        search_sync(None, {"iterations": 2}, limit=1)
    with pytest.raises(ValueError, match="resume=True continues out_dir/trees.jsonl: give out_dir"):
        search_sync(None, resume=True, limit=1)

    # a wrong object would fail every problem, each set aside: refused at the start
    with pytest.raises(TypeError, match="executor must be a StepExecutor, or None, got str"):
        search_sync(None, limit=1, executor="not an executor")
    with pytest.raises(TypeError, match=r"policy must be .*, got PosixPath \(a model folder is given as 'hf:/models/p"):
        search_sync(None, limit=1, policy=Path("/models/p"))
    with pytest.raises(TypeError, match="policy must be .*, got SimPPM"):
        search_sync(None, limit=1, policy=load_ppm("sim"))
    with pytest.raises(TypeError, match="grader must be a Grader, or None, got dict"):
        search_sync(None, limit=1, grader={})

    async def in_a_loop() -> None:
        search_sync(None, limit=1)

    with pytest.raises(RuntimeError, match="inside a running event loop"):
        asyncio.run(in_a_loop())


def test_an_engine_of_ones_own_needs_no_stats_and_a_policy_without_a_tokenizer_is_named(executor, grader) -> None:
    """The README's custom engines: a subclass that defines only what the search calls runs;
    a policy without a tokenizer is refused before any problem, naming what it lacks."""
    inner = load_policy(SIM)

    class Minimal(PolicyEngine):
        def __init__(self) -> None:  # no super().__init__(), no stats
            self.tokenizer = inner.tokenizer

        def register_problems(self, answers):
            inner.register_problems(answers)

        async def generate(self, prompt_ids, params):
            return await inner.generate(prompt_ids, params)

    class MinimalPPM(PPMEngine):
        async def score(self, sequences):
            return [0.0] * len(sequences)

    cfg = load_config("round2", overrides=dict(iterations=2, n_generate_sample=2, seed=1))
    policy, ppm = Minimal(), MinimalPPM()
    assert len(search_sync(_problems(1), cfg, policy=policy, ppm=ppm, executor=executor, grader=grader)) == 1
    assert policy.stats.requests == 0 and ppm.stats.requests == 0  # counted by engines that count
    with pytest.raises(AttributeError, match="'Minimal' object has no attribute 'other'"):
        policy.other  # noqa: B018

    class NoTokenizer(PolicyEngine):
        async def generate(self, prompt_ids, params):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match=r"policy NoTokenizer has no tokenizer: a PolicyEngine sets `self.tokenizer`"):
        search_sync(_problems(1), cfg, policy=NoTokenizer(), ppm=ppm, executor=executor, grader=grader)


def test_limit_reads_no_further_than_it_needs_from_an_iterable(executor, grader) -> None:
    """Problems may come from an endless generator: `limit` of them are read, not all."""
    records = generate_problems(50, seed=0)
    for make in (dict, lambda r: problems_from_records([r]).problems[0]):
        read = []

        def endless():
            for i in itertools.count():
                assert i < 10, "read past the limit"
                read.append(i)
                yield make({**records[i], "index": i})

        results = search_sync(endless(), "round1", policy=SIM, executor=executor, grader=grader, limit=2)
        assert sorted(r.problem.id for r in results) == ["0", "1"] and len(read) <= 3


def test_a_ppm_that_fails_to_load_closes_the_policy_loaded_before_it(closed_policies) -> None:
    """The policy may hold a GPU's memory: it is not left for the garbage collector."""
    with pytest.raises(EngineSpecError, match="unknown engine"):
        search_sync(None, "eval", limit=1, policy=SIM, ppm="nosuch:x")
    assert closed_policies == [SIM]


def test_output_folder_mistakes_are_said_once(tmp_path: Path, capsys) -> None:
    (tmp_path / "a" / "trees.jsonl").mkdir(parents=True)
    assert cli_main(["generate", "--out", str(tmp_path / "a"), "--limit", "1", "--quiet"]) == 2
    assert "trees.jsonl: is not a file" in capsys.readouterr().err
    assert cli_main(["generate", "--out", str(tmp_path / "b"), "--limit", "1", "--quiet",
                     "--set", "iterations=1"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--out", str(tmp_path / "b"), "--limit", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds results: resume it (--resume" in err and err.count("--resume") == 1


def test_an_evolve_stage_with_failed_problems_is_not_done(tmp_path: Path) -> None:
    """Its row (or generate.json) would mark it finished, with the failed problems neither
    counted nor ever searched again."""
    from rstar_fast.evolve import EvolveError, evaluate

    problems = _problems(4)
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=2, seed=1))
    with pytest.raises(EvolveError, match=r"1 problem\(s\) failed and were set aside"):
        evaluate(problems, cfg, tmp_path, policy=_Faulty({problems[1].question}), name="x")
    assert not (tmp_path / "row.json").exists()
    row = evaluate(problems, cfg, tmp_path, policy=SIM, name="x")
    assert row.problems == 4 and row.resumed == 3


class _Answering(PolicyEngine):
    """The simulated policy, its answers passed through `change` first."""

    def __init__(self, change) -> None:
        self.inner, self.change = load_policy(SIM), change
        self.tokenizer, self.stats = self.inner.tokenizer, self.inner.stats

    def register_problems(self, answers):
        self.inner.register_problems(answers)

    async def generate(self, prompt_ids, params):
        return self.change(await self.inner.generate(prompt_ids, params), prompt_ids)

    async def close(self):
        await self.inner.close()


class _Scoring(PPMEngine):
    """The simulated PPM, its scores passed through `change` first."""

    def __init__(self, policy: PolicyEngine, change) -> None:
        self.inner, self.change = load_ppm(SIM, policy=policy), change
        self.stats = self.inner.stats

    def register_problems(self, answers):
        self.inner.register_problems(answers)

    async def score(self, sequences):
        return self.change(await self.inner.score(sequences))


def _with(c, **changes):
    return dataclasses.replace(c, **changes)


def test_any_of_a_list_of_golds_is_right(executor, grader) -> None:
    """A record whose answer lists several golds (four of MATH's: "3" or "-3"): an answer that
    gives the second is right, as the reference's math_equiv takes any of them."""
    import re

    record = generate_problems(1, seed=3)[0]
    gold = str(record["answer"])
    record["answer"] = [gold, "-12345"]

    def second_gold(cs, prompt_ids):
        return [_with(c, text=re.sub(r"\\boxed\{[^}]*\}", r"\\boxed{-12345}", c.text)) for c in cs]

    problems = problems_from_records([record]).problems
    assert problems[0].answer == [gold, "-12345"]
    cfg = load_config("round1", overrides=dict(iterations=4, seed=1))
    policy = _Answering(second_gold)
    (result,) = search_sync(problems, cfg, policy=policy, executor=executor, grader=grader)
    assert result.pred == "-12345" and result.correct is True


@pytest.mark.parametrize("change, said", [
    (lambda cs, p: cs[:-1], r"policy .*: 2 completions for n=3"),
    (lambda cs, p: cs * 2, r"policy .*: 6 completions for n=3"),
    (lambda cs, p: [_with(c, token_ids=np.array(c.token_ids)) for c in cs], r"completion 0 .* token_ids: ndarray"),
    (lambda cs, p: [_with(c, token_ids=[]) for c in cs], r"completion 0 has text .* but no token ids"),
    (lambda cs, p: [_with(c, text=None) for c in cs], r"completion 0 is not a Completion .*text: NoneType"),
])
def test_a_policy_answer_the_search_cannot_build_on_is_an_engine_error(change, said, executor, grader) -> None:
    """A wrong number of completions, or ids the next prompt cannot be joined from (a numpy
    array would add element-wise), fail the problem with the policy named, not silently."""
    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=3, seed=1))
    with pytest.raises(EngineError, match=said):
        search_sync(_problems(2), cfg, policy=_Answering(change), executor=executor, grader=grader)


@pytest.mark.parametrize("change, said", [
    (lambda s: s[:-1], r"PPM .*: \d+ scores for \d+ sequences"),
    (lambda s: s + [0.0], r"PPM .*: \d+ scores for \d+ sequences"),
    (lambda s: [math.nan] * len(s), r"score 0 is nan, outside \[-1, 1\]"),
    (lambda s: [5.0] * len(s), r"score 0 is 5.0, outside \[-1, 1\]"),
    (lambda s: {i: v for i, v in enumerate(s)}, r"scores must be a sequence of floats, not dict"),
    (lambda s: ["0.5"] * len(s), r"score 0 is str '0.5', not a number"),
])
def test_a_ppm_answer_out_of_its_range_or_count_is_an_engine_error(change, said, executor, grader) -> None:
    """NaN read as "not scored", 1e30 outweighing every terminal reward, scores zipped onto the
    wrong children: each fails the problem with the PPM named instead."""
    cfg = load_config("round2", overrides=dict(iterations=2, n_generate_sample=3, seed=1))
    policy = load_policy(SIM)
    with pytest.raises(EngineError, match=said):
        search_sync(_problems(2), cfg, policy=policy, ppm=_Scoring(policy, change), executor=executor, grader=grader)
    # numpy scores, and a tuple, are read as the floats they hold
    for ok in (np.asarray, tuple):
        results = search_sync(_problems(1), cfg, policy=policy, ppm=_Scoring(policy, ok), executor=executor,
                              grader=grader)
        assert len(results) == 1


def test_an_error_whose_message_cannot_be_written_still_sets_only_its_problem_aside(tmp_path: Path, executor,
                                                                                  grader) -> None:
    problems = _problems(4)

    class Garbled(_Faulty):
        async def generate(self, prompt_ids, params):
            if problems[1].question in self.tokenizer.decode(prompt_ids):
                raise RuntimeError("cannot parse '\ud83d'")  # a lone surrogate, as a broken decode leaves
            return await self.inner.generate(prompt_ids, params)

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no message")

    class Mute(_Faulty):
        async def generate(self, prompt_ids, params):
            if problems[2].question in self.tokenizer.decode(prompt_ids):
                raise Unprintable()
            return await self.inner.generate(prompt_ids, params)

    cfg = load_config("round1", overrides=dict(iterations=2, n_generate_sample=3, seed=1))
    for engine, failed, error in ((Garbled(set()), "1", "RuntimeError: cannot parse '\\ud83d'"),
                                  (Mute(set()), "2", "Unprintable: (its message could not be made)")):
        out = tmp_path / failed
        summary = RunSummary()
        results = search_sync(problems, cfg, policy=engine, executor=executor, grader=grader, out_dir=out,
                              summary=summary)
        assert summary.failed == 1 and sorted(r.problem.id for r in results) == sorted({"0", "1", "2", "3"} - {failed})
        (line,) = (out / FAILED_FILE).read_text(encoding="utf-8").splitlines()
        assert json.loads(line) == {"problem_id": failed, "error": error}
