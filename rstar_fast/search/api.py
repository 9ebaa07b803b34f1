"""`search()`: the Python entry point of a whole search run (the CLI calls it too).

It builds what the run needs (engines from their specs, the step executor, the grader),
skips problems an earlier run already finished, appends each finished problem to
`OUT/trees.jsonl` as soon as it is done, shows progress, and closes everything it opened.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, aclosing, suppress
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from tqdm.auto import tqdm

from rstar_fast.aio import Owned
from rstar_fast.engines import EngineUnavailableError, PolicyEngine, PPMEngine, load_policy, load_ppm
from rstar_fast.engines.sim import SimPolicy
from rstar_fast.executor import StepExecutor
from rstar_fast.executor.pool import available_cores
from rstar_fast.files import changed_settings, first_few, hold_lock, shorten, write_json
from rstar_fast.search.config import SearchConfig, load_config
from rstar_fast.search.driver import SearchResult, SearchRunner
from rstar_fast.search.grading import Grader
from rstar_fast.search.problems import Problem, load_problems, problems_from_records
from rstar_fast.search.records import ID_KEY, TreesWriter, read_trees, record_question

log = logging.getLogger(__name__)


class _SharedCounters:
    """The searches counting costs on each engine object now. A run's costs are the difference
    of its engines' counters over the run, which another run on the same object adds to."""

    _lock = threading.Lock()
    _active: dict[int, list[_SharedCounters]] = {}  # id(engine) -> runs on it now

    def __init__(self, engines: list[object]) -> None:
        self.engines = engines
        self.shared = False  # another run used one of them meanwhile

    def __enter__(self) -> _SharedCounters:
        with self._lock:
            for engine in self.engines:
                runs = self._active.setdefault(id(engine), [])
                for run in runs:
                    run.shared = self.shared = True
                runs.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for engine in self.engines:
                runs = self._active[id(engine)]
                runs.remove(self)
                if not runs:
                    del self._active[id(engine)]
P = ParamSpec("P")
T = TypeVar("T")

TREES_FILE = "trees.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"  # the search settings the trees were made with
LOCK_FILE = ".lock"  # held while a search writes into the folder
FAILED_FILE = "failed.jsonl"  # the problems whose search raised in the latest run, and why
# A problem whose search raises is set aside and the run goes on; this many in a row is no
# longer one odd problem but the engine, the executor or the settings: the run stops.
MAX_FAILURES_IN_A_ROW = 8


@dataclass
class RunSummary:
    """What a finished run reports: counts, accuracy, throughput and per-phase timing."""

    finished: bool = False  # the run went through all its problems (False: it stopped early)
    problems: int = 0  # searched by this call
    failed: int = 0  # whose search raised (set aside in failed.jsonl; a resume retries them)
    skipped: int = 0  # asked for, but already in trees.jsonl (resume)
    unusable: int = 0  # problem records skipped as malformed (each warned about with its place)
    # answers: of every problem in trees.jsonl when there is one (a resumed run's earlier
    # problems included), else of this call's problems
    correct: int = 0
    graded: int = 0
    votes: dict[str, int] = field(default_factory=dict)  # vote kind -> problems it got right
    # this call's search
    rollouts: int = 0
    nodes: int = 0
    wall_s: float = 0.0
    driver_s: float = 0.0
    generated_tokens: int = 0
    policy_calls: int = 0  # requests to the policy engine
    ppm_calls: int = 0  # requests to the PPM engine
    engine_busy: float = 0.0
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["accuracy"] = self.accuracy
        return d


def _as_problems(problems: Iterable[Problem | Mapping[str, Any]] | str | Path | None,
                 limit: int | None, seed: int, split: str | None = None) -> tuple[list[Problem], int]:
    """The problems, and how many records were skipped as malformed (each warned about)."""
    if split is not None and not isinstance(problems, (str, Path)):
        raise ValueError(f"split {split!r} chooses among a dataset folder's splits: give the folder as problems "
                         "(--problems DIR); the built-in problems and records in memory have none")
    if problems is None:
        from rstar_fast.synthetic import generate_problems

        return problems_from_records(generate_problems(limit or 100, seed=seed)).problems, 0
    if isinstance(problems, (str, Path)):
        loaded = load_problems(problems, limit=limit, split=split)
        return list(loaded.problems), loaded.skipped
    if isinstance(problems, Mapping) or not isinstance(problems, Iterable):
        one = " (one record: put it in a list)" if isinstance(problems, Mapping) else ""
        raise TypeError(f"problems must be a file or folder path, an iterable of records or Problems, or None "
                        f"(the built-in synthetic problems), got {type(problems).__name__}{one}")
    # read no further than limit needs: the problems may come from an endless generator
    rest = iter(problems)
    items = list(islice(rest, 1))
    if items and isinstance(items[0], Problem):
        items += islice(rest, None if limit is None else limit - 1)
        given = [p for p in items if isinstance(p, Problem)]
        if len(given) == len(items):
            first: dict[str, int] = {}
            for i, p in enumerate(given):  # trees.jsonl and resuming know a problem by its id
                if first.setdefault(p.id, i) != i:
                    raise ValueError(f"problems {first[p.id]} and {i} share the id {p.id!r}; give each problem its own")
            return given, 0
    loaded = problems_from_records(chain(items, rest), limit=limit)
    return loaded.problems, loaded.skipped


def open_engines(policy: PolicyEngine | str, ppm: PPMEngine | str | None, config: SearchConfig,
                 stack: AsyncExitStack) -> tuple[PolicyEngine, PPMEngine | None]:
    """The engines a search with `config` runs on: objects as given, specs built and closed by
    `stack` (the policy also when the PPM then fails to load: it may hold a GPU's memory)."""
    if not config.need_value_func and ppm is not None:
        name = ppm if isinstance(ppm, str) else type(ppm).__name__
        raise ValueError(f"a PPM was given ({name}) but this search scores no step with one (need_value_func "
                         "is false, as in the round1 preset): leave the PPM out, or set need_value_func=true")
    if config.need_value_func and ppm is None:  # before a policy is loaded: that can take minutes
        if isinstance(policy, str) and policy.split(":", 1)[0] == "sim":
            ppm = "sim"
        else:
            raise ValueError("this config scores steps with a PPM (need_value_func, as in the round2 and eval "
                             "presets): give one (--ppm SPEC, or ppm= from Python), e.g. hf:/models/ppm")
    if isinstance(policy, str):
        policy = load_policy(policy)
        stack.push_async_callback(policy.close)
    if isinstance(ppm, str):
        # A simulated PPM reads a real policy's ids with that policy's tokenizer; either way it
        # judges against the gold answers registered below
        if ppm.split(":", 1)[0] == "sim" and not isinstance(policy, SimPolicy):
            ppm = load_ppm(ppm, tokenizer=policy.tokenizer)
        else:
            ppm = load_ppm(ppm)
        stack.push_async_callback(ppm.close)
    return policy, ppm


async def search(
    problems: Iterable[Problem | Mapping[str, Any]] | str | Path | None = None,
    config: SearchConfig | str = "round1",
    *,
    policy: PolicyEngine | str = "sim",
    ppm: PPMEngine | str | None = None,
    executor: StepExecutor | None = None,
    grader: Grader | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    limit: int | None = None,
    split: str | None = None,
    shard: tuple[int, int] | None = None,
    exec_workers: int | None = None,
    progress: bool = False,
    summary: RunSummary | None = None,
) -> AsyncGenerator[SearchResult, None]:
    """Search problems and yield each one as soon as it is finished.

    `problems`: a JSON/JSONL file or dataset folder (`split` names which of its splits),
    records with `question` and `answer`, or None for the built-in synthetic arithmetic
    problems. `config`: a SearchConfig or a preset name. Engines are specs (`sim`,
    `hf:PATH`, ...) or engine objects; objects passed in are left open, everything built here
    is closed. With `out_dir`, finished problems are appended to `out_dir/trees.jsonl`;
    `resume` skips the problems already there. `shard=(i, n)` searches the i-th of n disjoint
    shares of the problems (those at positions i, i + n, ... after `limit`), for n processes
    (one per GPU, say), each into its own `out_dir`; `export_sft` and `export_pairs` read
    their trees files together. `exec_workers`: the step-code worker processes of the executor
    made here (default: one per core, and a shard's share of them, as its n processes share the
    machine: every worker keeps a warm interpreter of some 125 MB). `progress`: a bar on stderr
    (none by default). `summary`: a RunSummary to fill with the run's counts and costs as it
    goes (also written to `out_dir/summary.json`). Problems are yielded in the order they
    finish, not the order given.

    A problem whose search raises is set aside and the run goes on: it is logged, counted in
    `summary.failed` and listed with its error in `out_dir/failed.jsonl`, and a resume searches
    it again. MAX_FAILURES_IN_A_ROW failures in a row end the run with the last one's error,
    and so does a run none of whose problems finished.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 (None: every problem), got {limit!r}")
    if shard is not None:
        check_shard(shard)
    if exec_workers is not None and (isinstance(exec_workers, bool) or not isinstance(exec_workers, int)
                                     or exec_workers < 1):
        raise ValueError(f"exec_workers must be a whole number >= 1 (None: one per core), got {exec_workers!r}")
    if exec_workers is not None and executor is not None:
        raise ValueError("exec_workers sizes the executor the search makes: give it or an executor, not both")
    if exec_workers is None and shard is not None:  # else the executor's own default, one per core
        exec_workers = max(1, available_cores() // shard[1])
    if not isinstance(config, (str, SearchConfig)):
        raise TypeError(f"config must be a preset name or a SearchConfig (load_config(preset, overrides=...)), "
                        f"got {type(config).__name__}")
    _check_components(policy=policy, ppm=ppm, executor=executor, grader=grader)
    if resume and out_dir is None:
        raise ValueError("resume=True continues out_dir/trees.jsonl: give out_dir")
    cfg = load_config(preset=config) if isinstance(config, str) else config
    if out_dir is not None and isinstance(problems, (str, Path)) and Path(problems).is_dir():
        folder, out = Path(problems).resolve(), Path(out_dir).resolve()
        if out == folder or folder in out.parents:  # its files would be read as problems next time
            raise ValueError(f"output folder {out_dir} lies in the problems folder {problems}, whose JSON files "
                             "are all read as problems: give an output folder outside it")
    todo, unusable = _as_problems(problems, limit, cfg.seed or 0, split)
    if shard is not None:
        todo = todo[shard[0]::shard[1]]
        if not todo:
            raise ValueError(f"shard {shard[0]}/{shard[1]} holds no problem: there are fewer problems than shards")
    if cfg.is_sampling:
        _check_answers(todo)
    summary = summary if summary is not None else RunSummary()
    summary.unusable = unusable
    lock: int | None = None
    made = out_dir is not None and not Path(out_dir).exists()
    if out_dir is not None:
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder (the search writes its outputs into a folder)",
                                     str(out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        lock = await _lock_out_dir(Path(out_dir))
    try:
        # kept beside the settings: a resume with other engines is said, with another shard refused
        run = {"policy": _engine_name(policy), "ppm": _engine_name(ppm),
               "shard": f"{shard[0]}/{shard[1]}" if shard is not None else None}
        async with aclosing(Owned(_search(todo, cfg, run, policy, ppm, executor, exec_workers, grader, out_dir,
                                          resume, progress, summary))) as results:
            async for result in results:
                yield result
    finally:
        if lock is not None:
            if made:  # a start refused before any search (a model that did not load) leaves nothing
                _remove_if_only(Path(out_dir), {LOCK_FILE, CONFIG_FILE})  # type: ignore[arg-type]
            os.close(lock)  # releases the lock


def check_shard(shard: Any) -> None:
    """A shard is (i, n): the i-th (from 0) of n shares of the problems."""
    ok = (isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in shard))
    if not ok or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n (the i-th of n shares of the problems), got {shard!r}")


def _check_components(**given: Any) -> None:
    """A wrong object is refused at the start: it would fail every problem, each set aside."""
    kinds = {
        "policy": ((str, PolicyEngine), "an engine spec such as 'hf:/models/policy', or a PolicyEngine"),
        "ppm": ((str, PPMEngine, type(None)), "an engine spec such as 'hf:/models/ppm', a PPMEngine, or None"),
        "executor": ((StepExecutor, type(None)), "a StepExecutor, or None"),
        "grader": ((Grader, type(None)), "a Grader, or None"),
    }
    for name, value in given.items():
        types, what = kinds[name]
        if not isinstance(value, types):
            hint = f" (a model folder is given as 'hf:{value}')" if isinstance(value, os.PathLike) else ""
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}{hint}")
    policy = given.get("policy")
    tokenizer = getattr(policy, "tokenizer", None)
    if isinstance(policy, PolicyEngine) and not all(callable(getattr(tokenizer, f, None)) for f in ("encode", "decode")):
        raise TypeError(f"policy {type(policy).__name__} has no tokenizer: a PolicyEngine sets `self.tokenizer`, "
                        "an object with encode(text) -> ids and decode(ids) -> text (prompts reach the engine "
                        "as its ids)")


def _remove_if_only(folder: Path, names: set[str]) -> None:
    """Remove `folder` when it holds nothing but files named in `names`."""
    with suppress(OSError):
        entries = list(folder.iterdir())
        if all(p.name in names and p.is_file() for p in entries):
            for p in entries:
                p.unlink()
            folder.rmdir()


def _check_answers(todo: list[Problem]) -> None:
    """Data generation rewards the terminals from the gold answers: a problem without one
    would be searched for nothing (no value ever backed up, no data exported)."""
    missing = [p.id for p in todo if p.answer is None]
    if not missing:
        return
    named = first_few(missing, 5)
    if len(missing) == len(todo):
        raise ValueError(f"no problem has an answer (problems {named}), and this search (is_sampling, as in the "
                         "round1 and round2 presets) rewards its terminals from the gold answer: give each record "
                         "an `answer`, or search with the eval preset, which needs none")
    log.warning("%d of %d problems have no answer (%s): a search that rewards terminals from the gold answer "
                "learns nothing on them", len(missing), len(todo), named)


def _gold_answers(todo: list[Problem], simulated: bool) -> dict[str, str]:
    """question -> gold answer, for the engines that use it. The simulated policy sees only
    the prompt, so problems sharing a question share the last one's answer: said when their
    answers differ, since its steps then aim at the wrong one for all but that problem."""
    golds: dict[str, str] = {}
    first_id: dict[str, str] = {}
    clashes: list[str] = []
    for p in todo:
        if p.answer is None:
            continue
        answer = p.answer[0] if isinstance(p.answer, list) else p.answer  # the simulator aims at one
        if simulated and p.question in golds and golds[p.question] != answer:
            clashes.append(f"{first_id[p.question]} and {p.id}")
        golds[p.question] = answer
        first_id.setdefault(p.question, p.id)
    if clashes:
        named = first_few(clashes, 3, "; ")
        log.warning("problems %s share a question but not an answer: the simulated policy reads only the "
                    "question and aims all of them at the last one's answer", named)
    return golds


class OutputInUseError(OSError):
    """Another search is writing into the same output folder."""


class OutputHasResultsError(FileExistsError):
    """The output folder holds an earlier run's trees, and this run does not resume it."""


async def _lock_out_dir(out: Path, grace_s: float = 2.0) -> int:
    """Hold OUT/.lock for the whole run: two searches appending to one trees.jsonl would write
    every problem twice (resume reads the ids only when it starts). A holder is given
    `grace_s` to let go: a search left early (`break` out of its `async for`) is closed by the
    event loop soon after, not at once."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fd = hold_lock(out / LOCK_FILE)
        except FileNotFoundError:  # the holder made the folder, found nothing to keep and took it away
            out.mkdir(parents=True, exist_ok=True)
            fd = None
        if fd is not None:
            return fd
        if time.monotonic() >= deadline:
            raise OutputInUseError(f"{out}: another search is writing into this folder; wait for it to "
                                   "end, or give another output folder")
        await asyncio.sleep(0.05)


def _engine_name(engine: object) -> str | None:
    """How config.json names an engine: its spec, or an engine object's class."""
    if engine is None or isinstance(engine, str):
        return engine
    return f"{type(engine).__module__}.{type(engine).__qualname__} object"


async def _search(todo: list[Problem], cfg: SearchConfig, run: dict[str, Any], policy, ppm, executor: StepExecutor | None,
                  exec_workers: int | None, grader: Grader | None, out_dir: str | Path | None, resume: bool, progress: bool,
                  summary: RunSummary) -> AsyncGenerator[SearchResult, None]:
    writer: TreesWriter | None = None
    done: set[str] = set()
    asked = todo  # a resume's problems already done included: the simulator aims by all of them
    if out_dir is not None:
        out = Path(out_dir)
        trees_path = out / TREES_FILE
        if trees_path.exists() and not trees_path.is_file():
            raise IsADirectoryError(errno.EISDIR, "is not a file: the search writes its trees there", str(trees_path))
        if trees_path.exists() and not resume and trees_path.stat().st_size > 0:
            raise OutputHasResultsError(f"{trees_path} already holds results: resume it (--resume, resume=True), "
                                        "or choose another output folder")
        _keep_config(out / CONFIG_FILE, cfg, run, resume)
        done = _earlier_problems(trees_path, todo, summary) if resume and trees_path.exists() else set()
        before = len(todo)
        todo = [p for p in todo if p.id not in done]
        summary.skipped = before - len(todo)
    async with AsyncExitStack() as stack:
        policy_engine, ppm_engine = open_engines(policy, ppm, cfg, stack)
        # from every problem asked, so that a resumed run aims each problem as the whole run did
        golds = _gold_answers(asked, simulated=isinstance(policy_engine, SimPolicy))
        policy_engine.register_problems(golds)
        if ppm_engine is not None:
            ppm_engine.register_problems(golds)
        if executor is None:
            # started on a thread: it waits for its workers (seconds), and the event loop may be
            # serving other work meanwhile (a notebook, a second search). Closed in place: that
            # takes milliseconds, and no await in the cleanup that a shutdown may cancel.
            executor = stack.enter_context(
                await asyncio.to_thread(StepExecutor, workers=exec_workers or 0, timeout_s=cfg.exec_timeout_s))
        if grader is None:
            grader = stack.enter_context(Grader())
        if out_dir is not None:
            writer = stack.enter_context(TreesWriter(Path(out_dir) / TREES_FILE, done=done))
        failures = _Failures(Path(out_dir) / FAILED_FILE if out_dir is not None else None, summary)
        runner = SearchRunner(cfg, policy_engine, executor, grader, ppm=ppm_engine, on_error=failures.record)
        # no bar object at all unless asked for: making one (even disabled) fixes the process's
        # multiprocessing start method for good, which a training script may still want to set
        bar = tqdm(total=len(todo), unit="problem", dynamic_ncols=True) if progress and todo else None
        if bar is not None:
            stack.callback(bar.close)
        started = time.perf_counter()
        # engines passed in may have served earlier runs: this run's share of their counts
        counters = stack.enter_context(_SharedCounters([e for e in (policy_engine, ppm_engine) if e is not None]))
        tokens_before, calls_before = policy_engine.stats.generated_tokens, policy_engine.stats.requests
        ppm_before = ppm_engine.stats.requests if ppm_engine is not None else 0

        shown = 0.0  # when show_progress last ran

        def show_progress() -> None:
            nonlocal shown
            shown = time.perf_counter()
            elapsed = max(shown - started, 1e-9)
            stats = policy_engine.stats
            assert bar is not None
            bar.set_postfix(
                rollouts=runner.rollouts_done,
                rollouts_s=f"{runner.rollouts_done / elapsed:.1f}",
                tok_s=f"{(stats.generated_tokens - tokens_before) / elapsed:.0f}",
                engine_busy=f"{stats.busy_fraction():.0%}",
                acc=f"{summary.accuracy:.1%}" if summary.accuracy is not None else "-",
            )

        async def refresh_progress() -> None:
            # every problem in flight advances together, so the first ones can take minutes to
            # finish: the bar moves with the rollouts meanwhile
            while True:
                await asyncio.sleep(1.0)
                if time.perf_counter() - shown >= 1.0:
                    show_progress()

        if progress:
            stack.callback(show_progress)  # the last figures, before the bar closes
            stack.callback(asyncio.get_running_loop().create_task(refresh_progress()).cancel)
        # closed here, before the executor and engines, when the caller stops early
        results = await stack.enter_async_context(aclosing(Owned(runner.run(todo))))
        try:
            async for result in results:
                failures.in_a_row = 0
                if writer is not None:
                    writer.write(result.record)
                summary.problems += 1
                summary.rollouts += result.rollouts
                summary.nodes += result.nodes
                count_answers(summary, result.record)
                if bar is not None:
                    bar.update(1)
                    if time.perf_counter() - shown >= 0.5:
                        show_progress()
                yield result
            failures.raise_if_all_failed()
            summary.finished = True
        finally:  # stopped early too (interrupted, failed): the summary counts what the file holds now
            summary.wall_s = time.perf_counter() - started
            summary.driver_s = runner.clock.driver_seconds()
            summary.generated_tokens = policy_engine.stats.generated_tokens - tokens_before
            summary.policy_calls = policy_engine.stats.requests - calls_before
            summary.ppm_calls = ppm_engine.stats.requests - ppm_before if ppm_engine is not None else 0
            summary.engine_busy = policy_engine.stats.busy_fraction()
            summary.phases = runner.clock.summary()
            if counters.shared:
                log.warning("another search used this run's engine objects meanwhile: the summary's "
                            "generated_tokens, policy_calls and ppm_calls count its calls too")
            if out_dir is not None:
                if not todo:  # a resume with nothing left to search: the costs stay the run's
                    _keep_costs(Path(out_dir) / SUMMARY_FILE, summary)
                try:
                    write_json(Path(out_dir) / SUMMARY_FILE, summary.to_dict())
                except OSError as e:
                    if summary.finished:
                        raise
                    log.warning("%s: the summary of the run so far was not written: %s", out_dir, e)


_COSTS = ("rollouts", "nodes", "wall_s", "driver_s", "generated_tokens", "policy_calls", "ppm_calls",
          "engine_busy", "phases")


def _keep_costs(path: Path, summary: RunSummary) -> None:
    """The search's costs as the earlier summary at `path` has them (where it can be read)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(earlier, dict):
        for key in _COSTS:
            value, now = earlier.get(key), getattr(summary, key)
            same_kind = isinstance(value, dict) if isinstance(now, dict) else (
                isinstance(value, (int, float)) and not isinstance(value, bool))
            if same_kind:  # a damaged file's other values are left out
                setattr(summary, key, value)


def _error_text(error: BaseException) -> str:
    """The error's type and message, writable as UTF-8 whatever the message holds (an engine's
    text may hold a lone surrogate; a message may fail to be made at all)."""
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - the error's own __str__ failed
        message = "(its message could not be made)"
    return f"{type(error).__name__}: {message}".encode("utf-8", "backslashreplace").decode("utf-8")


class _Failures:
    """A problem whose search raised: logged, counted, and listed in `path` with its error;
    the run goes on, unless MAX_FAILURES_IN_A_ROW problems failed in a row or an engine cannot
    be reached (after its own retries: every problem would fail alike)."""

    def __init__(self, path: Path | None, summary: RunSummary) -> None:
        self.path = path
        self.summary = summary
        self.in_a_row = 0
        self.stopped = False  # the run was stopped: failures drained after it are listed only
        self.last: Exception | None = None
        if path is not None:
            path.unlink(missing_ok=True)  # the list is the latest run's: a resume retries them

    def record(self, problem: Problem, error: Exception) -> None:
        self.summary.failed += 1
        self.in_a_row += 1
        self.last = error
        why = _error_text(error)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({ID_KEY: problem.id, "error": why}, ensure_ascii=False) + "\n")
        if self.stopped:  # failed beside the one that stopped the run: listed only
            return
        if self.in_a_row == MAX_FAILURES_IN_A_ROW or isinstance(error, EngineUnavailableError):
            self.stopped = True
            error.add_note("the engine cannot be reached: the run stops" if isinstance(error, EngineUnavailableError)
                           else f"{self.in_a_row} problems in a row failed: the run stops")
            raise error
        log.warning("problem %s failed and is set aside (%s); the search goes on", problem.id, why,
                    exc_info=error if log.isEnabledFor(logging.INFO) else None)  # -v: where

    def raise_if_all_failed(self) -> None:
        """A run none of whose problems finished, some failing, ends with the last error (a
        broken engine fails them all, fewer than MAX_FAILURES_IN_A_ROW in a short run)."""
        if self.last is not None and self.summary.problems == 0:
            where = f" (listed in {self.path})" if self.path is not None else ""
            self.last.add_note(f"all {self.summary.failed} problems of this run failed{where}")
            raise self.last


def _keep_config(path: Path, cfg: SearchConfig, run: dict[str, Any], resume: bool) -> None:
    """Write the run's settings, engines and shard; a resume keeps the first ones and warns about
    any it changes (the trees already written were searched with those). A resume of another
    shard is refused: its problems would join this shard's, and the exports would read them twice."""
    now = json.loads(json.dumps({**cfg.to_dict(), **run}))
    if resume and path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict):
            shard = before.get("shard", now["shard"])  # (a file written before shards were kept: unchecked)
            if shard != now["shard"]:
                def name(s: str | None) -> str:
                    return f"shard {s} (--shard {s})" if s else "every problem (no --shard)"

                raise ResumeMismatchError(
                    f"{path.parent}: searched {name(shard)}, resumed with {name(now['shard'])}: a resume "
                    "continues the same shard")
            changed = changed_settings(before, now)
            if changed:
                log.warning("%s: resuming with other settings (%s); the problems already searched keep theirs",
                            path, "; ".join(changed))
            return
    write_json(path, now)


class ResumeMismatchError(ValueError):
    """--resume on a trees.jsonl whose problems are not the ones asked for."""


def _earlier_problems(trees_path: Path, todo: list[Problem], summary: RunSummary) -> set[str]:
    """Ids already in trees_path, whose answers are counted into `summary`; an id whose
    question differs from the one asked for now means the file holds other problems."""
    asked = {p.id: p.question for p in todo}
    done: set[str] = set()
    for rec in read_trees(trees_path):
        count_answers(summary, rec)
        if ID_KEY not in rec:
            continue
        pid = str(rec[ID_KEY])
        if pid in asked and record_question(rec) != asked[pid]:
            raise ResumeMismatchError(
                f"{trees_path}: problem {pid} there is {shorten(record_question(rec))!r}, but the problems given "
                f"now have {shorten(asked[pid])!r} under that id: the file holds trees of other problems "
                "(search into another output folder, or resume with the problems it was made from)")
        done.add(pid)
    return done


def count_answers(summary: RunSummary, record: Mapping[str, Any]) -> None:
    """Add a trees.jsonl record's answers to `summary`: graded and correct, and each vote that
    got it right."""
    if record.get("correct") is not None:
        summary.graded += 1
        summary.correct += int(bool(record["correct"]))
    votes = record.get("votes") or {}
    for kind in ("pass1", "passn", "maj", "wmaj"):
        if votes.get(kind):
            summary.votes[kind] = summary.votes.get(kind, 0) + 1


def _run_to_end(search_fn: Callable[P, AsyncIterator[T]]) -> Callable[P, list[T]]:
    """A synchronous twin of an async generator function, with its very signature (so that
    type checkers check a script's keywords): it runs to the end and returns every item."""

    @functools.wraps(search_fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> list[T]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("search_sync cannot run inside a running event loop (a notebook, async code): "
                               "use `async for result in rstar_fast.search(...)` there")

        async def collect() -> list[T]:
            return [r async for r in search_fn(*args, **kwargs)]

        return asyncio.run(collect())

    run.__name__ = run.__qualname__ = "search_sync"
    run.__doc__ = ("`search` for scripts, with the same arguments: runs to the end and returns every "
                   "finished problem, in the order they finished.")
    return run


search_sync = _run_to_end(search)
