"""StepExecutor: a pool of pre-warmed, sandboxed zygote processes that run step code.

The parent side is one I/O thread running a private asyncio loop; it owns every worker
pipe. Public calls hand coroutines to that loop (blocking calls wait on the future, async
calls await it through ``asyncio.wrap_future``), so the executor works from any thread and
any event loop, with no thread or process started per call.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import concurrent.futures
import json
import logging
import numbers
import functools
import importlib.util
import operator
import os
import re
import signal
import subprocess
import sys
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rstar_fast.executor import _worker
from rstar_fast.files import hold_lock, remove_if_abandoned

log = logging.getLogger(__name__)

_WORKER_SCRIPT = str(Path(_worker.__file__).resolve())
_PRELOAD = ("math", "fractions", "itertools", "numpy", "sympy", "scipy", "scipy.optimize",
            "scipy.special")
# What a light zygote imports (sys, os and time are loaded anyway). A snippet forked from it
# instead of the ~110 MB zygote with numpy/sympy/scipy costs about half as much (fewer page
# tables copied at fork and torn down at exit), so snippets that import nothing else (plain
# arithmetic steps) run there.
_LIGHT = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
          "operator", "re", "random", "statistics", "string", "heapq", "bisect", "json",
          "datetime", "sys", "os", "time")
_IMPORT = re.compile(r"\bfrom\s+([\w.]+)\s+import\b"
                     r"|\bimport\s+([\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+(?:\s+as\s+\w+)?)*)")
_warned = False
_cgroup_seq = 0
MAX_TIMEOUT_S = 1e6  # the worker's poll() takes ms as a C int (2**31 ms is ~2.1e6 s)
_BIG = 1 << 50  # rlimits are 64-bit: memory_mb and file_mb are shifted by 20 bits
_live: weakref.WeakSet[StepExecutor] = weakref.WeakSet()  # closed at exit (their cgroups go)
# A tier whose workers all died and whose replacements failed this many times in a row fails
# its calls (with the reason) instead of keeping them waiting; it goes on trying to start one.
_START_TRIES = 3
_NO_WORKER = object()  # in a tier's idle queue: see _START_TRIES
# An error is one line: every character str.splitlines() breaks at is written as its escape.
_ONE_LINE = {c: repr(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}
_WORK_DIR_PREFIX = "rstar-exec-"
_WORK_LOCK = ".lock"  # in an executor's work dir, held while it lives (_remove_stale_work_dirs)
_stale_work_dirs_removed = False


def _installed(module: str) -> bool:
    """Whether the module's top package is installed (a submodule's spec would import its parent
    here, scipy's for scipy.optimize, in a process that never needs it)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):  # a parent package missing, or an invalid name
        return False


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset
    narrow), not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ExecutorError(RuntimeError):
    """Base of the executor's own errors (never raised for what a snippet does)."""


class ExecutorClosedError(ExecutorError):
    """The executor was used after close()."""


class WorkerStartError(ExecutorError):
    """A worker process failed to start (names the reason it gave, if any)."""


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one snippet did.

    ok: ran to the end without raising, timing out, being killed or exiting on its own.
    output: what it printed, shown the way the reference executor shows it (or raw stdout
        with style="plain"); for a failure in reference style, the reference's error text.
    error: None when ok, else one readable line ("ZeroDivisionError: division by zero",
        "timed out after 10 s", "killed: memory limit", "exited with status 3").
    timed_out: the deadline killed it.
    seconds: wall time of the snippet (for a sibling step: the step's own process).
    crashed: it ended neither by finishing nor by raising nor by its deadline (killed by a
        signal or a limit, or exited on its own).
    """

    ok: bool
    output: str
    error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0
    crashed: bool = False


def _weak_on_lost(ex: StepExecutor) -> Callable[[_Worker], None]:
    """ex._on_lost, held weakly: the I/O loop holds each worker's callbacks, and a strong
    reference from there would keep an executor dropped without close() alive for good
    (its __del__ never run, its zygotes and thread left until the process exits)."""
    ref = weakref.ref(ex)

    def on_lost(w: _Worker) -> None:
        owner = ref()
        if owner is not None:
            owner._on_lost(w)

    return on_lost


class _Worker:
    """One zygote process and the future of its single outstanding request."""

    def __init__(self, proc: subprocess.Popen, loop: asyncio.AbstractEventLoop,
                 on_lost: Callable[[_Worker], None]) -> None:
        self.proc = proc
        self.loop = loop
        self.out_fd = proc.stdout.fileno()  # type: ignore[union-attr]
        self.in_fd = proc.stdin.fileno()  # type: ignore[union-attr]
        os.set_blocking(self.out_fd, False)
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.dead = False
        self.retired = False
        self.killed = False
        self.on_lost = on_lost  # called once it dies, to start a replacement
        self.info: dict = {}
        self.tier = "full"  # which zygotes it belongs to (StepExecutor._preloads)
        self.cgroups: list[str] = []
        self.zygote_fd: int | None = None  # pidfd of the bootstrap's child, once started
        loop.add_reader(self.out_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.out_fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost("worker exited")
            return
        self.buf += data
        try:
            frames = _worker.split_frames(self.buf)
        except ValueError:
            self._lost("worker sent garbage")
            return
        for fr in frames:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(fr)

    def _lost(self, why: str) -> None:
        """It died on its own (end of file, garbage, a failed write)."""
        was_dead = self.dead
        self._stop(why)
        if not was_dead:
            self.on_lost(self)

    def _stop(self, why: str) -> None:
        """Stop reading it; the call waiting on it fails."""
        if not self.dead:
            self.dead = True
            self.loop.remove_reader(self.out_fd)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(WorkerStartError(why))

    async def call(self, data: bytes | None, timeout: float) -> dict:
        """Send a request frame (None: just wait for the next frame) and wait for one reply
        frame, all within timeout."""
        if self.dead:
            raise WorkerStartError("worker exited")
        waiter = self.waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                if data is not None and len(data) > 60000:  # more than the pipe holds
                    # The thread writes to an fd of its own: kill() closes ours, and the
                    # number may then name another file while the thread still writes.
                    fd = os.dup(self.in_fd)
                    await self.loop.run_in_executor(None, _write_and_close, fd, data)
                elif data is not None:
                    _write_all(self.in_fd, data)
                return await waiter
        except TimeoutError:  # an OSError too, but the worker hung rather than died
            raise
        except OSError:  # the worker died before it read the whole request (EPIPE)
            self._lost("worker exited")
            raise WorkerStartError("worker exited") from None
        finally:
            self.waiter = None
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # seen: no "exception was never retrieved" warning

    def kill(self) -> None:
        """Kill the bootstrap; the zygote and every snippet die with it (PDEATHSIG and the
        pid namespace). Once: its pid may be another process's after it is reaped."""
        if self.killed:
            return
        self.killed = True
        self._stop("worker killed")
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.zygote_fd is not None:
            # The zygote may die after the bootstrap: it is then the child of the nearest
            # subreaper, which is this process when it is PID 1 of a container, say.
            try:
                os.waitid(os.P_PIDFD, self.zygote_fd, os.WEXITED)
            except ChildProcessError:
                pass  # not ours: reaped where it belongs
            os.close(self.zygote_fd)
            self.zygote_fd = None
        _remove_cgroups(self.cgroups)


def _remove_cgroups(cgroups: Iterable[str]) -> None:
    """Remove a worker's cgroups, each once it is empty (the kernel reaps a killed sandbox
    within a moment)."""
    for cgroup in cgroups:
        for _ in range(100):
            try:
                os.rmdir(cgroup)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


def _locked_work_dir() -> tuple[str, int]:
    """A new work dir and the descriptor holding its lock (see _remove_stale_work_dirs). Another
    process's clean-up may take a dir for abandoned between its making and its locking, and
    remove it: then another is made."""
    while True:
        path = tempfile.mkdtemp(prefix=_WORK_DIR_PREFIX)
        with contextlib.suppress(FileNotFoundError):  # removed before the lock was made
            fd = hold_lock(Path(path) / _WORK_LOCK)
            if fd is not None:  # else the clean-up holds it, and is removing the dir
                return path, fd


def _remove_stale_work_dirs(base: Path) -> None:
    """Remove the work dirs of executors whose process died without closing them (SIGKILL)."""
    for path in base.glob(_WORK_DIR_PREFIX + "*"):
        with contextlib.suppress(OSError):  # another user's (mode 700): not ours to look into
            if not path.is_symlink() and (path / _WORK_LOCK).is_file():  # else not ours, or an older version's
                remove_if_abandoned(path, path / _WORK_LOCK)


def _remove_stale_cgroups(base: Path) -> None:
    """Remove the (empty) cgroups of executors whose process died without closing them."""
    for path in base.glob("rstar_fast_*_*"):
        try:
            os.kill(int(path.name.split("_")[2]), 0)
        except ProcessLookupError:
            try:
                path.rmdir()
            except OSError:
                pass
        except (ValueError, OSError):
            pass


@atexit.register
def _close_all() -> None:
    for ex in list(_live):
        try:
            ex.close()
        except KeyboardInterrupt:  # Ctrl-C as the interpreter exits: the workers die with it
            pass


def utf8_text(s: str) -> str:
    """`s` as text every consumer can encode: lone surrogates (print(chr(0xd800)) in a
    snippet) become backslash escapes."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _int_arg(name: str, value: object, lo: int, hi: int) -> int:
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"StepExecutor: {name} must be an int, not {type(value).__name__}") \
            from None
    if not lo <= n <= hi:
        bound = f">= {lo}" if n < lo else f"<= {hi}"
        raise ValueError(f"StepExecutor: {name} must be {bound}, got {n}")
    return n


def imports_only(code: str, modules: Iterable[str]) -> bool:
    """Whether code imports nothing outside `modules` (their submodules included), read from
    its text. A guess that errs toward False (an import named in a comment or a string
    counts); a wrong guess costs time, never a different result: every zygote runs any code."""
    if "__import__" in code or "importlib" in code:
        return False
    allowed = set(modules)
    for m in _IMPORT.finditer(code):
        names = [m[1]] if m[1] else [n.split()[0] for n in m[2].split(",")]
        if any(n.split(".")[0] not in allowed for n in names):
            return False
    return True


def _str_arg(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"StepExecutor.{where}: {name} must be str, not {type(value).__name__}")
    return value


def _str_list(where: str, name: str, values: object) -> list[str]:
    # a bare str is iterable too: its characters would run as separate snippets
    if isinstance(values, (str, bytes, bytearray)) or not isinstance(values, Iterable):
        raise TypeError(f"StepExecutor.{where}: {name} must be a sequence of str, "
                        f"not {type(values).__name__}")
    out = list(values)
    for i, v in enumerate(out):
        _str_arg(where, f"{name}[{i}]", v)
    return out


class StepExecutor:
    """Runs model-written step code in a pool of sandboxed, pre-forked processes.

    Each worker slot is a zygote with math/numpy/sympy/scipy imported, and a light one with
    a few standard modules; every snippet runs in a fresh process forked from one of them
    (clean state): from the light one when its code imports nothing else (1.5-1.9x the
    snippets per second: less to fork and tear down). With Linux namespaces where the kernel
    allows (user, pid, mount, net, ipc), as an unprivileged user with no capabilities, a
    read-only filesystem except a private tmpfs working directory, where the directories
    that may hold users' files and data (every top-level one but the system's /usr, /etc,
    /var, ...: _worker.hidden_dirs) show only what the interpreter needs, rlimits (address space, CPU, file size, open
    files, processes, no core), stdin from /dev/null, a scrubbed environment, stdout read
    with a byte cap, and a deadline enforced from outside by killing the snippet's whole
    pid namespace. Where cgroups may be made (root), each worker's processes together are
    held to max_processes and to 2 x memory_mb + 1 GiB of memory, and out of memory the
    kernel kills a snippet before anything else. What is missing where (sandbox_missing)
    is warned about once.

    Args:
        workers: snippets run at once (each tier of zygotes has this many); 0 means one
            per core this process may use.
        timeout_s: wall-clock deadline per snippet (for run_siblings: prefix + step), at
            most 1e6.
        memory_mb: address-space limit per snippet process.
        style: "reference" (rStar-Math's output formatting) or "plain" (raw stdout).
        max_output_chars: output longer than this keeps head and tail around "...".
        output_limit_bytes: a snippet writing more than this to its stdout descriptor is
            killed: any output in the "plain" style, raw writes (os.write) in either. In the
            "reference" style what print writes is captured and, however long, shown cut to
            its head and tail, as the reference shows it.
        fail_on_error_text: also fail a step whose output contains "error" (any case), the
            reference's rule.
        isolation: "auto" (namespaces if possible, else limits only with one warning),
            "namespaces" (fail if unavailable) or "limits".
        file_mb: largest file a snippet may write (the tmpfs holds twice that).
        max_processes: process-count limit inside a worker's sandbox (fork bombs).
        preload: modules the zygotes import before forking; the light zygotes (math,
            fractions, collections, ...) exist only where this names others.
    """

    def __init__(
        self,
        workers: int = 0,
        timeout_s: float = 10.0,
        memory_mb: int = 2048,
        *,
        style: str = "reference",
        max_output_chars: int = 1024,
        output_limit_bytes: int = 1 << 20,
        fail_on_error_text: bool = False,
        isolation: str = "auto",
        file_mb: int = 16,
        max_processes: int = 64,
        preload: Sequence[str] = _PRELOAD,
    ) -> None:
        if style not in ("reference", "plain"):
            raise ValueError(f"StepExecutor: style must be 'reference' or 'plain', not {style!r}")
        if isolation not in ("auto", "namespaces", "limits"):
            raise ValueError(f"StepExecutor: unknown isolation {isolation!r}")
        if isinstance(timeout_s, bool) or not isinstance(cast(object, timeout_s), numbers.Real):
            raise TypeError(f"StepExecutor: timeout_s must be a number, not "
                            f"{type(timeout_s).__name__}")
        # NaN fails both tests; the worker waits in poll(), whose timeout is an int of ms
        if not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"StepExecutor: timeout_s must be > 0 and <= {MAX_TIMEOUT_S:g}, "
                             f"got {timeout_s}")
        workers = _int_arg("workers", workers, 0, 4096)  # a slip must not start 10**6 processes
        self.workers = workers if workers > 0 else available_cores()
        self.timeout_s = float(timeout_s)
        self.style = style
        # cut_middle keeps max_output_chars // 2 chars each side: 0 would keep everything
        self.max_output_chars = _int_arg("max_output_chars", max_output_chars, 2, _BIG)
        self.output_limit_bytes = _int_arg("output_limit_bytes", output_limit_bytes, 1, _BIG)
        self.fail_on_error_text = fail_on_error_text
        self._cfg: dict[str, Any] = {"memory_mb": _int_arg("memory_mb", memory_mb, 1, _BIG >> 20),
                     "file_mb": _int_arg("file_mb", file_mb, 1, _BIG >> 20),
                     "max_procs": _int_arg("max_processes", max_processes, 1, 1 << 22),
                     "isolation": isolation}
        preload = _str_list("__init__", "preload", preload)
        # a name that is not installed here would be skipped in the zygotes without a word
        missing = [m for m in preload if not _installed(m)]
        if missing:
            log.warning("StepExecutor: preload modules not installed, so not preloaded: %s", ", ".join(missing))
        # tier -> what its zygotes import: a light tier beside the full one where the full one
        # imports more than _LIGHT (see imports_only)
        self._preloads = {"full": preload}
        if any(m.split(".")[0] not in _LIGHT for m in preload):
            self._preloads["light"] = list(_LIGHT)
        # The sandbox's one writable place is a tmpfs mounted on this empty directory (not on
        # /tmp, which may hold the Python environment itself); removed on close.
        global _stale_work_dirs_removed
        if not _stale_work_dirs_removed:
            _stale_work_dirs_removed = True
            _remove_stale_work_dirs(Path(tempfile.gettempdir()))
        self._work_dir, lock = _locked_work_dir()
        self._work_lock: int | None = lock
        self._cfg["work_dir"] = self._work_dir
        self._closed = False
        self._pid = os.getpid()  # a fork's copy must not close this process's executor
        self._lock = threading.Lock()  # a submit and close() do not interleave
        self.sandboxed: bool | None = None
        self.sandbox_missing: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="StepExecutor-io",
                                        daemon=True)
        self._thread.start()
        self._all: set[_Worker] = set()
        self._replacing: set[asyncio.Task] = set()  # workers being started in place of dead ones
        self._calls: set[asyncio.Task] = set()  # calls waiting for a worker or running on one
        try:
            self._submit(self._start()).result()
        except BaseException:
            self.close()
            raise
        self._warn_once()
        _live.add(self)

    # -- public API ----------------------------------------------------------------------
    def run(self, code: str) -> ExecResult:
        """Run one snippet in a fresh sandboxed process: its output, or its error."""
        _str_arg("run", "code", code)
        return self._submit(self._run_one(code)).result()

    def run_many(self, codes: Sequence[str]) -> list[ExecResult]:
        """`run` of each snippet, over the workers at once; results in the order given."""
        return self._submit(self._run_many(_str_list("run_many", "codes", codes))).result()

    def run_siblings(self, prefix: str, steps: Sequence[str]) -> list[ExecResult]:
        """What run(prefix + step) gives for each step (the step is appended as it is); the
        prefix runs once and every step continues from a copy of its state. A step runs
        whole instead where that could differ: prefix + step does not split into the
        prefix's statements and then the step's, or the prefix leaves files in its working
        directory or files open (every step would share them). Still different: threads
        the prefix starts do not run in the steps, and processes it starts end with the
        first step."""
        steps = _str_list("run_siblings", "steps", steps)
        _str_arg("run_siblings", "prefix", prefix)
        return self._submit(self._run_siblings(prefix, steps)).result()

    async def arun(self, code: str) -> ExecResult:
        """`run`, awaited: the event loop goes on while the snippet runs."""
        _str_arg("arun", "code", code)
        return await asyncio.wrap_future(self._submit(self._run_one(code)))

    async def arun_many(self, codes: Sequence[str]) -> list[ExecResult]:
        """`run_many`, awaited."""
        codes = _str_list("arun_many", "codes", codes)
        return await asyncio.wrap_future(self._submit(self._run_many(codes)))

    async def arun_siblings(self, prefix: str, steps: Sequence[str]) -> list[ExecResult]:
        """`run_siblings`, awaited."""
        steps = _str_list("arun_siblings", "steps", steps)
        _str_arg("arun_siblings", "prefix", prefix)
        return await asyncio.wrap_future(self._submit(self._run_siblings(prefix, steps)))

    def close(self) -> None:
        """Kill every worker (and with it every snippet) and stop the I/O thread. Does
        nothing in a fork of the process that made the executor: its workers and I/O
        thread are that process's."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
            except Exception:  # noqa: BLE001 - closing must not fail
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._loop.is_running():
            self._loop.close()
        shutil.rmtree(self._work_dir, ignore_errors=True)
        if self._work_lock is not None:
            os.close(self._work_lock)
            self._work_lock = None

    def __enter__(self) -> StepExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if threading.current_thread() is getattr(self, "_thread", None):
            # dropped by the I/O thread's last reference: close() waits on that thread
            threading.Thread(target=self.close, daemon=True).start()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- internals (run on the I/O loop) ---------------------------------------------------
    def _submit(self, coro) -> concurrent.futures.Future:
        if os.getpid() != self._pid:  # no I/O thread here: the call would wait forever
            coro.close()
            raise ExecutorClosedError("StepExecutor belongs to the process that made it, "
                                      "not to a fork of it")
        with self._lock:
            if self._closed:
                coro.close()
                raise ExecutorClosedError("StepExecutor is closed")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self) -> None:
        # None, once closed: each waiter that takes it puts it back for the next (_take).
        self._idle: dict[str, asyncio.Queue[Any]] = {t: asyncio.Queue() for t in self._preloads}
        self._start_failures: dict[str, int] = {}  # tier -> replacements failed in a row
        self._start_error: dict[str, str] = {}  # tier -> why the last one failed
        # Each tier has `workers` zygotes; at most `workers` snippets run at once in all.
        self._slots = asyncio.Semaphore(self.workers)
        ws = await asyncio.gather(*(self._spawn(t) for t in self._preloads for _ in range(self.workers)))
        for w in ws:
            self._idle[w.tier].put_nowait(w)
        info = ws[0].info
        self.sandboxed = bool(info.get("sandboxed"))
        self.sandbox_missing = list(info.get("missing") or [])

    def _warn_once(self) -> None:
        global _warned
        if (not self.sandboxed or self.sandbox_missing) and not _warned:
            _warned = True
            if self.sandboxed:
                msg = "StepExecutor: sandbox incomplete: " + "; ".join(self.sandbox_missing)
            else:
                msg = ("StepExecutor: no Linux namespaces, running snippets with resource "
                       "limits only (" + ("; ".join(self.sandbox_missing) or "disabled") + "): model code "
                       "can read and write what this process's user can and reach the network")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _make_cgroups(self) -> list[str]:
        """A worker's cgroups, where we may create them (root, cgroup v1 or v2): pids caps its
        process count (the kernel does not apply RLIMIT_NPROC to root), memory all its
        processes' memory together (RLIMIT_AS holds each process, not the processes a
        snippet starts): a sibling batch's prefix process and one step, each up to
        memory_mb, and the zygote."""
        global _cgroup_seq
        memory = min((2 * self._cfg["memory_mb"] + 1024) << 20, 1 << 62)
        if Path("/sys/fs/cgroup/pids/cgroup.procs").exists():  # v1: a hierarchy per controller
            wanted = [(Path("/sys/fs/cgroup/pids"), "", {"pids.max": self._cfg["max_procs"]}),
                      (Path("/sys/fs/cgroup/memory"), "", {"memory.limit_in_bytes": memory})]
        else:  # v2: one hierarchy
            wanted = [(Path("/sys/fs/cgroup"), "pids memory",
                       {"pids.max": self._cfg["max_procs"], "memory.max": memory})]
        made = []
        if _cgroup_seq == 0:
            for base, _, _ in wanted:
                _remove_stale_cgroups(base)
        _cgroup_seq += 1
        for base, controllers, limits in wanted:
            if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
                continue
            for c in controllers.split():  # one by one: a missing one does not stop the others
                with contextlib.suppress(OSError):
                    (base / "cgroup.subtree_control").write_text("+" + c)
            path = base / f"rstar_fast_{os.getpid()}_{_cgroup_seq}"
            try:
                path.mkdir()
            except OSError:
                continue
            for name, value in limits.items():
                with contextlib.suppress(OSError):  # a controller this kernel lacks
                    (path / name).write_text(str(value))
            made.append(str(path))
        return made

    async def _spawn(self, tier: str) -> _Worker:
        # One hash seed for every worker: a program that prints a set of strings prints it in
        # the same order whichever worker runs it, and in every run. -s -P with this scrubbed
        # environment is -I (isolated mode), which would ignore PYTHONHASHSEED.
        env = dict(_worker._SAFE_ENV, PYTHONHASHSEED="0")
        cgroups = self._make_cgroups()
        cfg = dict(self._cfg, cgroups=cgroups, preload=self._preloads[tier])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-s", "-P", _WORKER_SCRIPT, json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, cwd="/", start_new_session=True, close_fds=True)
        except BaseException:  # out of processes or fds: the cgroups made for it go (it is retried)
            _remove_cgroups(cgroups)
            raise
        w = _Worker(proc, self._loop, _weak_on_lost(self))
        w.cgroups = cgroups
        w.tier = tier
        self._all.add(w)
        try:
            ready = await w.call(None, 120.0)
        except (WorkerStartError, TimeoutError) as e:
            w.kill()
            self._all.discard(w)
            raise WorkerStartError(f"StepExecutor: worker did not start ({e})") from None
        if ready.get("t") != "ready":
            w.kill()
            self._all.discard(w)
            raise WorkerStartError(f"StepExecutor: worker did not start: {ready.get('error')}")
        w.info = ready
        pid = w.proc.pid
        try:  # the zygote, if the bootstrap forked one (see _Worker.kill)
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                w.zygote_fd = os.pidfd_open(int(kids[0]))
        except OSError:
            pass
        return w

    def _job(self, op: str, **kw: object) -> dict:
        return {"op": op, "timeout_s": self.timeout_s, "style": self.style,
                "max_chars": self.max_output_chars, "out_cap": self.output_limit_bytes, **kw}

    def _tier_for(self, *codes: str) -> str:
        # (not a str: past the public checks, for the zygote to refuse)
        if "light" in self._preloads and all(isinstance(c, str) and imports_only(c, _LIGHT) for c in codes):
            return "light"
        return "full"

    async def _take(self, tier: str) -> _Worker:
        while True:
            w = await self._idle[tier].get()
            if w is None:
                self._idle[tier].put_nowait(None)
                raise ExecutorClosedError("StepExecutor is closed")
            if w is _NO_WORKER:
                why = self._start_error.get(tier)
                if why is None or self._has_worker(tier):
                    continue  # a worker started since
                self._idle[tier].put_nowait(w)  # for the next call too, until one starts
                raise WorkerStartError(f"StepExecutor: no worker could be started ({why})")
            if not w.dead:
                return w
            # one that died idle is replaced already (_on_lost); one that died just after
            # its reply, while its call still held it, is replaced here
            self._retire(w)

    async def _dispatch(self, job: dict, n: int, tier: str) -> list[ExecResult]:
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            if self._closed:
                raise ExecutorClosedError("StepExecutor is closed")
            data = _worker.encode_frame(job)  # before a worker is taken: it may raise
            # Generous: the worker enforces the real deadlines; this only catches a hang.
            limit = self.timeout_s * (2 * n + 2) + 30.0
            retried = False
            # A cancelled caller gives its slot back at once, though its job may still run.
            async with self._slots:
                while True:
                    w = await self._take(tier)
                    # Its own task: a cancelled caller leaves the job to finish (bounded by the
                    # deadlines), and only then is the worker free for another call.
                    call = self._loop.create_task(w.call(data, limit))
                    self._calls.add(call)
                    call.add_done_callback(self._calls.discard)
                    try:
                        reply = await asyncio.shield(call)
                        results = reply.get("results") if isinstance(reply, dict) else None
                        if not isinstance(results, list) or len(results) != n:
                            error = reply.get("error") if isinstance(reply, dict) else None
                            if not isinstance(error, str):
                                raise WorkerStartError("bad reply")
                            # The zygote is alive and said why it failed, which it never
                            # should: no retry, and a fresh one in its place (whatever
                            # failed may have left it with less, open files, say).
                            self._retire(w)
                            return [self._result({"output": error, "error": error})] * n
                    except asyncio.CancelledError:
                        call.add_done_callback(functools.partial(self._reclaim, w))
                        raise
                    except Exception as e:
                        self._retire(w)
                        if self._closed:
                            raise ExecutorClosedError("StepExecutor was closed while the call ran") \
                                from None
                        # A worker that dies under a job (killed from outside, say by the OOM
                        # killer) was most likely not killed by it: once more, on another one.
                        if isinstance(e, WorkerStartError) and not retried:
                            retried = True
                            continue
                        if not isinstance(e, (WorkerStartError, TimeoutError)):
                            raise
                        why = str(e) or "worker hung"
                        return [ExecResult(False, f"killed: {why}", f"killed: {why}", crashed=True)
                                for _ in range(n)]
                    self._idle[w.tier].put_nowait(w)
                    return [self._result(r) for r in results]
        finally:
            self._calls.discard(task)

    def _reclaim(self, w: _Worker, call: asyncio.Task) -> None:
        """The job of a cancelled call ended: its result goes nowhere, the worker back."""
        if call.cancelled() or call.exception() is not None:
            self._retire(w)
        elif not self._closed:
            self._idle[w.tier].put_nowait(w)

    def _on_lost(self, w: _Worker) -> None:
        if w.waiter is None:  # died idle; a call it runs retires it itself
            self._retire(w)

    def _retire(self, w: _Worker) -> None:
        if w.retired:
            return
        w.retired = True
        w.kill()
        self._all.discard(w)
        if not self._closed:
            self._start_replacement(w.tier)

    def _start_replacement(self, tier: str) -> None:
        task = self._loop.create_task(self._replace(tier))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def _has_worker(self, tier: str) -> bool:
        return any(w.tier == tier for w in self._all)

    async def _replace(self, tier: str) -> None:
        try:
            w = await self._spawn(tier)
        except Exception as e:  # WorkerStartError, or the OS out of processes or fds (OSError)
            failures = self._start_failures[tier] = self._start_failures.get(tier, 0) + 1
            self._start_error[tier] = f"{type(e).__name__}: {e}"
            if failures == 1:
                log.warning("StepExecutor: a worker could not be started (%s); trying again", self._start_error[tier])
            if failures >= _START_TRIES and not self._has_worker(tier):
                self._idle[tier].put_nowait(_NO_WORKER)  # wakes the calls waiting: they fail (_take)
            await asyncio.sleep(min(30.0, 0.5 * 2.0 ** failures))
            if not self._closed:
                self._start_replacement(tier)
            return
        self._start_failures[tier] = 0
        self._start_error.pop(tier, None)
        if self._closed:
            w.kill()
            return
        idle = self._idle[tier]  # the outage's markers go: a later one counts its own failures
        for x in [idle.get_nowait() for _ in range(idle.qsize())]:
            if x is not _NO_WORKER:
                idle.put_nowait(x)
        idle.put_nowait(w)

    def _result(self, r: dict) -> ExecResult:
        ok = bool(r.get("ok"))
        out = utf8_text(str(r.get("output") or ""))
        err = r.get("error")
        err = utf8_text(err) if isinstance(err, str) else err
        if ok and self.fail_on_error_text and "error" in out.lower():
            ok, err = False, "output contains 'error'"
        if not ok:  # one line, whatever the exception's message held
            err = str(err or "failed").translate(_ONE_LINE)
        return ExecResult(ok, out, None if ok else err,
                          bool(r.get("timed_out")), float(r.get("seconds") or 0.0), not ok and bool(r.get("crashed")))

    async def _run_one(self, code: str) -> ExecResult:
        return (await self._dispatch(self._job("run", code=code), 1, self._tier_for(code)))[0]

    async def _run_many(self, codes: list[str]) -> list[ExecResult]:
        return list(await asyncio.gather(*(self._run_one(c) for c in codes)))

    async def _run_siblings(self, prefix: str, steps: list[str]) -> list[ExecResult]:
        if not steps:
            return []
        return await self._dispatch(self._job("siblings", prefix=prefix, steps=steps),
                                    len(steps), self._tier_for(prefix, *steps))

    async def _shutdown(self) -> None:
        # Replacements still starting (or waiting to retry) end first, so none is left
        # pending when the loop stops and none starts a worker after this.
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        for w in list(self._all):
            w.kill()  # calls running on it end with ExecutorClosedError
        self._all.clear()
        for idle in self._idle.values():  # and so do calls waiting for a worker
            idle.put_nowait(None)
        if self._calls:
            await asyncio.wait(self._calls, timeout=10)
