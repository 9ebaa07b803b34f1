"""The worker side of the step executor: sandbox bootstrap, zygote loop, snippet runner.

This file runs as a script (``python -s -P _worker.py`` in a scrubbed environment: isolated mode
but for PYTHONHASHSEED, see pool.py) in every worker process, so it imports
only the standard library (the package's ``__init__`` may pull in heavy modules such as torch,
which must never be loaded into a process we fork from). The parent imports it as a module
only for its pure helpers (output formatting, framing).

Process tree of one worker, with namespaces::

    B  bootstrap: new user (root -> nobody), mount, net, ipc, uts namespaces; users' data
       directories covered (hidden_dirs) and mounts made read-only; a nested
       user+mount+pid namespace locks them; forks Z and waits for it
    └─ Z  zygote, PID 1 of its pid namespace: what cfg['preload'] names imported (math/
          numpy/sympy/scipy, or a light set of standard modules: see pool._LIGHT); reads jobs
       ├─ I  one per snippet: PID 1 of a fresh pid namespace, doing nothing (start_init)
       └─ G  one per snippet (or P for a sibling batch): forked from Z as PID 2 of I's
             namespace, in a mount namespace of its own (its own /proc, a fresh tmpfs as
             cwd) and an IPC namespace of its own, rlimits set, every capability dropped
             before any snippet code runs
             └─ S  one per sibling step: forked from P after the prefix ran, in P's pid
                   and IPC namespaces and working directory (between steps P wipes it and
                   removes every System V IPC object)

Killing a pid namespace's init kills every process in it, so a deadline kill of I takes G
and all of its descendants along, whatever they did (setsid, double fork, signal masks); P
ends a step and all it started with kill(-1), which reaches every process in its namespace
but P and I. Without capabilities a snippet cannot mount, see into or ptrace the zygote or
I, or change what later snippets find; what it leaves in its tmpfs goes with its mount
namespace. It can still write a result frame of its own to fd 3: the runner that frames
its result shares its process, and no fd or memory of a process is hidden from code
running in it; what it forges stays its own result, checked like any other.

Where the time goes (measured on 2 loaded cores, see benchmarks/bench_executor.py): a new
pid namespace (its init I costs ~0.1 ms), mount namespace (its own /proc and tmpfs,
~0.2 ms) and IPC namespace (~0.03 ms) per snippet, next to which capset() is nothing;
fork() of the ~110 MB zygote ~1-2 ms (less with its heap on huge pages, see
collapse_heap), the snippet's exit ~2-3 ms (its teardown is taken off the reply path:
supervise(done=)), and a sympy snippet's writes to objects it shares with the zygote
(refcounts) ~2000 copy-on-write faults, ~10 ms: the price of a clean process per snippet.
Parent-side I/O is well under 1 ms per call.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import io
import math
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------------------------
# Framing: 4-byte big-endian length + JSON. JSON (not pickle) because frames written by
# snippet processes are untrusted: decoding them must never run code.

_HDR = struct.Struct(">I")


def encode_frame(obj: Any) -> bytes:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return _HDR.pack(len(data)) + data


def write_frame(fd: int, obj: Any) -> None:
    view = memoryview(encode_frame(obj))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        b = os.read(fd, n)
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """Blocking read of one frame; None on EOF."""
    hdr = _read_exact(fd, 4)
    if hdr is None:
        return None
    body = _read_exact(fd, _HDR.unpack(hdr)[0])
    return None if body is None else json.loads(body)


def split_frames(buf: bytearray) -> list[Any]:
    """Pop all complete frames from the front of buf (raises ValueError on garbage)."""
    out = []
    while len(buf) >= 4:
        (n,) = _HDR.unpack_from(buf)
        if len(buf) < 4 + n:
            break
        out.append(json.loads(bytes(buf[4 : 4 + n])))
        del buf[: 4 + n]
    return out


# ---------------------------------------------------------------------------------------
# Reference output formatting (rStar-Math's python tool, reimplemented; behaviour only).

_PRINT_ARG = re.compile(r"print\((.*?)\)")


def truncate_text(value: Any, max_chars: int) -> Any:
    """A string that parses as a number is shown rounded to 4 decimals when that is shorter
    (with the reference's trailing newline); anything longer than max_chars keeps its head
    and tail around "..."."""
    if isinstance(value, str):
        try:
            rounded = str(round(float(value), 4)) + "\n"
            if len(value) >= len(rounded):
                value = rounded
        except Exception:
            pass
    text = str(value)
    return cut_middle(text, max_chars) if len(text) > max_chars else value


def cut_middle(text: str, max_chars: int) -> str:
    """text, or its head and tail around "..." when longer than max_chars."""
    if len(text) > max_chars:
        return text[: max_chars // 2] + "..." + text[-(max_chars // 2) :]
    return text


def print_label(source: str) -> str:
    """The label the reference puts before a print's output when several prints run: the
    text inside each `print(...)` up to the first `)`, then a colon."""
    found = _PRINT_ARG.findall(source)
    return " ".join(found) + ":" if found else ""


def is_print_node(node: ast.AST) -> bool:
    if (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "print"
    ):
        return True
    if isinstance(node, (ast.If, ast.While, ast.For, ast.FunctionDef)):
        return any(is_print_node(n) for n in node.body)
    return False


def sanitize(code: str) -> str:
    """The program text the reference runs for `code`, which fixes the line numbers in
    SyntaxError messages: the reference extracts code as the lines after the `<code>` line
    (so one leading newline is dropped here), puts a `# ========` line first, and strips
    whitespace, backticks and a leading `python` word."""
    if code.startswith("\n"):
        code = code[1:]
    code = "# ========\n" + code
    code = re.sub(r"^(\s|`)*(?i:python)?\s*", "", code)
    # the trailing strip by hand: a regex anchored at the end tries every start in a long run
    # of whitespace (quadratic: 20,000 spaces mid-program took 15 s)
    end = len(code)
    while end and (code[end - 1].isspace() or code[end - 1] == "`"):
        end -= 1
    return code[:end]


def exc_line(e: BaseException, max_chars: int) -> str:
    """An exception as the reference shows it ("Type: message", newlines kept), cut like
    an output (the reference keeps all of it, but it goes into the next prompt). When its
    __str__ raises, the reference shows what that raised."""
    for _ in range(3):
        try:
            return cut_middle(f"{type(e).__name__}: {e}", max_chars)
        except Exception as inner:  # noqa: BLE001
            e = inner
        except BaseException:  # noqa: BLE001 - SystemExit and the like, from __str__
            break
    return f"{type(e).__name__}: <exception str() failed>"


def exit_status(e: SystemExit) -> int:
    """The status a process exiting with `e` would have: None is 0, another non-int 1, an
    int past a C long -1, and the low 8 bits of that (sys.exit(-1) is 255)."""
    code = e.code
    if not isinstance(code, int):
        return 0 if code is None else 1
    if not -(1 << 63) <= code < 1 << 63:
        code = -1
    return code & 0xFF


def _timeout_text(timeout_s: float) -> str:
    return f"{timeout_s:g}"


def reference_timeout_output(timeout_s: float) -> str:
    # What the reference's timeout decorator produces (its TimeoutError's str is a repr).
    return (
        "TimeoutError: 'Execution of the code snippet has timed out for exceeding "
        f"{_timeout_text(timeout_s)} seconds.'"
    )


# ---------------------------------------------------------------------------------------
# Snippet side: runs inside G / P / S.


class _Capture(io.TextIOBase):
    """sys.stdout stand-in during a captured statement. The reference shows only the head
    and tail of long output (cut_middle), so past `keep` characters only the first and the
    last `keep` are kept: a print of any size then shows what the reference shows, in
    bounded memory (a print loop runs into the deadline, as it does there)."""

    def __init__(self, keep: int) -> None:
        self._head: list[str] = []
        self._tail: list[str] = []
        self._head_n = self._tail_n = 0
        self._keep = keep

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        room = self._keep - self._head_n
        if room > 0:
            self._head.append(s[:room])
            self._head_n += min(room, n)
        start = max(0, room, n - self._keep)  # what follows the head: at most its last `keep` characters
        if start < n:
            if n - start == self._keep:  # it alone fills the tail that can be shown
                self._tail, self._tail_n = [], 0
            self._tail.append(s[start:])
            self._tail_n += n - start
            if self._tail_n > 2 * self._keep:  # trimmed now and then: amortized O(1) per character
                last = "".join(self._tail)[-self._keep:]
                self._tail, self._tail_n = [last], len(last)
        return n

    def getvalue(self) -> str:
        return "".join(self._head) + "".join(self._tail)


# The reference captures with an io.StringIO: an error about sys.stdout (`.buffer`) names it so,
# and the model reads the same message.
_Capture.__name__ = "_io.StringIO"


class Outcome(Exception):
    """Internal: a statement ended the program (exception or exit)."""

    def __init__(self, kind: str, text: str, code: int = 0) -> None:
        super().__init__(text)
        self.kind, self.text, self.code = kind, text, code


class Program:
    """Executes top-level statements one at a time in one namespace, keeping for each the
    text the reference would show if that statement ended an output segment: an expression
    statement's value (eval), else (or when the value is None) what it printed. Each
    statement runs exactly once. (The reference execs an expression that raised a second
    time; a statement with side effects could then succeed, or take twice as long.)
    Snippets compile with `dont_inherit`: this file's `from __future__ import annotations`
    is not theirs."""

    def __init__(self, max_chars: int, capture_keep: int) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.records: list[str] = []
        self.failure: Outcome | None = None  # first statement that ended the program
        self.max_chars = max_chars
        self.capture_keep = capture_keep

    def run_stmt(self, stmt: ast.stmt) -> None:
        ns = self.ns
        buf = _Capture(self.capture_keep)
        saved = sys.stdout
        sys.stdout = buf
        try:
            ret = None
            if isinstance(stmt, ast.Expr):
                ret = eval(compile(ast.Expression(stmt.value), "<string>", "eval", dont_inherit=True), ns)
            else:
                exec(compile(ast.Module([stmt], type_ignores=[]), "<string>", "exec", dont_inherit=True), ns)
            shown = buf.getvalue() if ret is None else ret
            self.records.append(f"{truncate_text(shown, self.max_chars)}")
        finally:
            sys.stdout = saved

    def run_stmts(self, stmts: list[ast.stmt]) -> None:
        """Run until the first failure, which is remembered with its statement index."""
        for stmt in stmts:
            if self.failure is not None:
                return
            try:
                self.run_stmt(stmt)
            except SystemExit as e:
                code = exit_status(e)
                self.failure = Outcome("exit", f"exited with status {code}", code)
            except MemoryError as e:
                self.failure = Outcome("memory", exc_line(e, self.max_chars))
            except BaseException as e:  # noqa: BLE001 - model code may raise anything
                self.failure = Outcome("error", exc_line(e, self.max_chars))


def reference_output(program: Program, tree: ast.Module, text: str) -> tuple[str, Outcome | None]:
    """Compose the reference's observation from the statement records; program must have
    run the statements this plan needs (or failed on one of them)."""
    body = tree.body
    prints = [i for i, n in enumerate(body) if is_print_node(n)] or [len(body) - 1]
    needed = len(body) if len(prints) == 1 else prints[-1] + 1
    if program.failure is not None and len(program.records) < needed:
        return program.failure.text, program.failure
    if not body:
        return "", None
    if len(prints) == 1:
        return program.records[len(body) - 1].strip(), None
    parts = []
    for i, src in zip(prints, source_segments(text, [body[i] for i in prints])):
        parts.append(f"{print_label(src)} {program.records[i]}")
    return "".join(parts).strip(), None


_LINE_END = re.compile(r"\r\n|\r|\n")  # the line ends the parser (and ast) counts


def source_segments(text: str, nodes: list[ast.stmt]) -> list[str]:
    """ast.get_source_segment of each node, splitting text into lines once: it splits the whole
    text in a Python loop on every call, seconds for each print of a long program."""
    starts = [0, *(m.end() for m in _LINE_END.finditer(text))]
    out = []
    for n in nodes:
        lo = starts[n.lineno - 1]
        hi = starts[n.end_lineno] if n.end_lineno is not None and n.end_lineno < len(starts) else len(text)
        local = ast.Pass(lineno=1, end_lineno=(n.end_lineno or n.lineno) - n.lineno + 1,
                         col_offset=n.col_offset, end_col_offset=n.end_col_offset)
        out.append(ast.get_source_segment(text[lo:hi], local) or "")
    return out


def needed_stmts(tree: ast.Module) -> int:
    body = tree.body
    prints = [i for i, n in enumerate(body) if is_print_node(n)]
    return len(body) if len(prints) <= 1 else prints[-1] + 1


def _stmt_key(n: ast.stmt) -> tuple:
    return (type(n).__name__, n.lineno, n.col_offset, n.end_lineno, n.end_col_offset)


class SnippetContext:
    """Everything a snippet process needs: style, caps. Built in Z from the job request."""

    def __init__(self, job: dict) -> None:
        self.style: str = job["style"]
        self.max_chars: int = job["max_chars"]
        # what a print keeps of its head and of its tail: at least what is shown (cut_middle)
        self.capture_keep: int = max(job["out_cap"], job["max_chars"])


def run_reference(program: Program, tree: ast.Module, text: str, out_cap: int) -> dict:
    """Run what the program `tree` (parsed from text) still needs on top of `program`,
    which may have run its first statements already. Returns the result frame; an output
    of more than out_cap bytes (each print is cut, but thousands of them add up) is the output
    limit, as writing that much is in the plain style."""
    done = len(program.records) + (1 if program.failure else 0)
    need = needed_stmts(tree)
    if done < need:
        program.run_stmts(tree.body[done:need])
    output, failure = reference_output(program, tree, text)
    if len(output) > out_cap // 4 and len(output.encode("utf-8", "surrogatepass")) > out_cap:
        return {"t": "result", "kind": "output_limit", "output": None, "error": None}
    if failure is None:
        return {"t": "result", "kind": "ok", "output": output, "error": None}
    return {"t": "result", "kind": failure.kind, "output": output, "error": failure.text,
            "code": failure.code}


def run_plain(ctx: SnippetContext, program: Program, code: str) -> dict:
    """Plain style: exec the code as is; the output is the raw stdout read by the supervisor."""
    if program.failure is not None:
        f = program.failure
        return {"t": "result", "kind": f.kind, "output": None, "error": f.text, "code": f.code}
    try:
        compiled = compile(code, "<string>", "exec", dont_inherit=True)
    except BaseException as e:  # noqa: BLE001
        return {"t": "result", "kind": "error", "output": None,
                "error": exc_line(e, ctx.max_chars)}
    kind, err, code_ = "ok", None, 0
    try:
        exec(compiled, program.ns)
    except SystemExit as e:
        code_ = exit_status(e)
        kind, err = "exit", f"exited with status {code_}"
    except MemoryError as e:
        kind, err = "memory", exc_line(e, ctx.max_chars)
    except BaseException as e:  # noqa: BLE001
        kind, err = "error", exc_line(e, ctx.max_chars)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        pass
    if kind != "ok":
        program.failure = Outcome(kind, err or "", code_)
    return {"t": "result", "kind": kind, "output": None, "error": err, "code": code_}


# ---------------------------------------------------------------------------------------
# Linux plumbing (ctypes; Python 3.11 has no os.unshare/os.setns).

CLONE_VM = 0x00000100
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 36
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAP_VERSION_3 = 0x20080522
SYS_MOUNT_SETATTR = 442  # same number on every architecture
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(src: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def mount_setattr(path: str, set_: int, clr: int, recursive: bool) -> None:
    attr = _MountAttr(set_, clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags,
                         ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")


MADV_COLLAPSE = 25
_HUGE = 2 << 20
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def collapse_heap() -> int:
    """Back the zygote's anonymous memory (Python's arenas, the malloc heap) with huge
    pages where the kernel can (MADV_COLLAPSE, Linux 6.1+; best effort). fork() then copies
    one page-table entry per 2 MiB instead of 512, and a snippet's exit unmaps as few:
    both on every snippet's critical path. A child's first write into a huge page splits
    it and copies 4 KiB as before. Returns the number of huge pages made."""
    made = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) < 5 or not parts[1].startswith("rw") or parts[4] != "0" or (
                len(parts) > 5 and parts[5] != "[heap]"):
            continue  # only anonymous private memory (not files, stacks, vdso)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        a, b = (lo + _HUGE - 1) & ~(_HUGE - 1), hi & ~(_HUGE - 1)
        if b > a and _libc.madvise(a, b - a, MADV_COLLAPSE) == 0:
            made += (b - a) // _HUGE
    return made


def set_name(name: bytes) -> None:
    """The process name ps and perf show (PR_SET_NAME), so pool processes can be told apart."""
    _libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


# Made here, in the zygote: in each snippet process, building ctypes types and looking up
# symbols would cost more than the system call.
_capset = _libc.capset
_NO_CAPS = (ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), (_CapData * 2)())


def bound_capabilities() -> None:
    """In the zygote, once: no process forked from it can ever gain a capability it does not
    hold, by execve (of anything, even as uid 0) or otherwise: empty bounding and ambient
    sets, no_new_privs. What it holds itself stays (see drop_capabilities)."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:
        cap += 1  # until EINVAL: past the kernel's last capability
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# (audit arch, add_key, request_key, keyctl, unshare, clone, clone3) per machine
_SYSCALLS = {"x86_64": (0xC000003E, 248, 249, 250, 272, 56, 435),
             "aarch64": (0xC00000B7, 217, 218, 219, 97, 220, 435)}


def _seccomp_program() -> Any:
    """The classic BPF program of the snippets' seccomp filter, None on another machine.

    It refuses what namespaces and dropped capabilities leave open: the kernel keyrings (a
    session keyring the parent joined carries through every namespace, and one user keyring
    serves all the snippets of a worker) and new user namespaces (in one, a snippet holds every
    capability again, and the kernel's code for mounts and netfilter becomes its to call).
    clone3 says ENOSYS, so the C library falls back to clone, whose flags the filter can read.
    System calls of another ABI (32-bit, x32) are refused, as they would pass under other numbers."""
    import platform
    import sysconfig

    # platform.machine() names the kernel's: a 32-bit or x32 interpreter on it makes calls of
    # another ABI, all of which the filter would refuse (write and exit included)
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or sys.maxsize <= 2**32 or "x32" in (sysconfig.get_config_var("MULTIARCH") or ""):
        return None
    arch, add_key, request_key, keyctl, unshare_nr, clone, clone3 = numbers
    return _assemble([
        (_LD, 4, None, None), (_JEQ, arch, None, "eperm"),  # seccomp_data.arch
        (_LD, 0, None, None),  # seccomp_data.nr
        (_JGE, 0x40000000, "eperm", None),  # x32's numbers
        (_JEQ, add_key, "eperm", None), (_JEQ, request_key, "eperm", None), (_JEQ, keyctl, "eperm", None),
        (_JEQ, clone3, "enosys", None), (_JEQ, unshare_nr, "flags", None), (_JEQ, clone, "flags", "allow"),
        "flags", (_LD, 16, None, None), (_JSET, CLONE_NEWUSER, "eperm", "allow"),  # args[0], low half
        "allow", (_RET, _ALLOW, None, None), "eperm", (_RET, _EPERM, None, None),
        "enosys", (_RET, _ENOSYS, None, None),
    ])


_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
_ALLOW, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW / ERRNO


def _assemble(code: list[Any]) -> Any:
    """A classic BPF program from instructions (code, k, label when true, label when false;
    None goes on to the next one) and the label names (str) placed between them."""
    labels: dict[str, int] = {}
    ops: list[tuple[int, int, str | None, str | None]] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(ops)
        else:
            ops.append(item)
    filters = (_SockFilter * len(ops))(*(
        _SockFilter(op, labels[t] - i - 1 if t else 0, labels[f] - i - 1 if f else 0, k)
        for i, (op, k, t, f) in enumerate(ops)))
    return _SockFprog(len(ops), filters), filters  # the array must live as long as the program


# (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_send_signal, pidfd_open,
#  pidfd_getfd, ptrace, process_vm_readv, process_vm_writev) per machine
_PROCESS_SYSCALLS = {"x86_64": (62, 200, 234, 129, 297, 424, 434, 438, 101, 310, 311),
                     "aarch64": (129, 130, 131, 138, 240, 424, 434, 438, 117, 270, 271)}


def _own_signals_program(pid: int) -> Any:
    """For a snippet without namespaces (pid: its own, after setsid): signals only to itself
    and its process group, no ptrace, pidfds or other processes' memory. Run as the worker's
    user, it could otherwise signal every process of that user (as root, every process: kill(-1))."""
    import platform

    numbers = _PROCESS_SYSCALLS.get(platform.machine())
    if _SECCOMP is None or numbers is None:
        return None
    kill, tkill, tgkill, sigqueue, tgsigqueue, *refused = numbers
    group = -pid & 0xFFFFFFFF  # kill(-pgid): the low half of args[0]
    return _assemble([
        (_LD, 4, None, None), (_JEQ, _SYSCALLS[platform.machine()][0], None, "eperm"),
        (_LD, 0, None, None),
        (_JEQ, kill, "kill", None), (_JEQ, tgkill, "own", None), (_JEQ, sigqueue, "own", None),
        (_JEQ, tgsigqueue, "own", None), (_JEQ, tkill, "eperm", None),
        *((_JEQ, nr, "eperm", None) for nr in refused[:-1]), (_JEQ, refused[-1], "eperm", "allow"),
        "kill", (_LD, 16, None, None), (_JEQ, 0, "allow", None), (_JEQ, group, "allow", None),
        "own", (_LD, 16, None, None), (_JEQ, pid, "allow", "eperm"),
        "allow", (_RET, _ALLOW, None, None), "eperm", (_RET, _EPERM, None, None),
    ])


_SECCOMP = _seccomp_program()  # made in the zygote, like _NO_CAPS
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def _install(program: Any) -> None:
    if program is not None:
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program[0]), 0, 0),
               "prctl(PR_SET_SECCOMP)")


def refuse_kernel_surface() -> None:
    """In a snippet process, after no_new_privs: the seccomp filter above, for it and all it forks."""
    _install(_SECCOMP)


def refuse_other_processes() -> None:
    """In a snippet process without namespaces, after no_new_privs: _own_signals_program's
    filter, for it and all it forks."""
    _install(_own_signals_program(os.getpid()))


def drop_capabilities() -> None:
    """Give up every capability, for good after bound_capabilities. Root of the sandbox's
    user namespace holds them all over the worker's mount namespace and processes: kept, a
    snippet could mount over files that later snippets use, or ptrace the zygote."""
    _check(_capset(*_NO_CAPS), "capset")


# ---------------------------------------------------------------------------------------
# Bootstrap (B): enter namespaces, then fork the zygote.


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _map_ids(pid: str, uid: int, gid: int, deny_setgroups: bool) -> None:
    if deny_setgroups:
        _write_file(f"/proc/{pid}/setgroups", "deny")
    _write_file(f"/proc/{pid}/uid_map", f"0 {uid} 1")
    _write_file(f"/proc/{pid}/gid_map", f"0 {gid} 1")


def _closed_dir(path: str) -> str | None:
    """The first directory on the way to path (path included) that others cannot search,
    or path itself when they cannot read it; None when all is open to them."""
    import stat

    parts = os.path.realpath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        d = os.sep + os.path.join(*parts[1:i]) if i > 1 else os.sep
        mode = os.stat(d).st_mode
        if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
            return d
    return None


def _open_to_others(paths: list[str]) -> None:
    """In a mount namespace of this process's own (still real root): cover each closed
    directory on the way to paths (say /root, mode 700) with a tmpfs that others can
    search, holding bind mounts of just those paths. The rest of it (a home directory's
    keys and caches) is then hidden from snippets as well."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    todo: dict[str, list[str]] = {}
    for p in sorted({os.path.realpath(p) for p in paths}, key=len):
        top = _closed_dir(p)
        if top is not None and not any(p.startswith(q + os.sep) for q in todo.get(top, ())):
            todo.setdefault(top, []).append(p)
    _cover(todo)


def _cover(todo: dict[str, list[str]]) -> None:
    """Mount an empty tmpfs on each directory of `todo`, then bind its listed paths (each
    under it) back in place: only those stay visible."""
    old_umask = os.umask(0o022)
    try:
        for top, ps in todo.items():
            fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in ps]  # before it is covered
            try:
                mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
                for p, fd in zip(ps, fds):
                    os.makedirs(p, exist_ok=True)
                    mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        os.umask(old_umask)


# The system's own top-level directories stay as they are. Every other one is where a machine
# may keep its users' files and data (/home, /tmp, /work, /data, /models, /datasets: any name a
# container mounts), hidden from snippets, which could read a problem set's answers or a run's
# trees there, but for the paths the interpreter needs.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/var", "/proc",
               "/dev", "/sys", "/boot", "/nix", "/gnu", "/snap")
HIDDEN_BELOW_SYSTEM = ("/var/tmp",)


def hidden_dirs() -> list[str]:
    """The directories covered in the sandbox (see SYSTEM_DIRS)."""
    tops = [os.path.join("/", name) for name in sorted(os.listdir("/"))]
    return [t for t in tops if t not in SYSTEM_DIRS] + list(HIDDEN_BELOW_SYSTEM)


_CHECKOUT_MARKS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")


def is_checkout(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, mark)) for mark in _CHECKOUT_MARKS)


def importable_parts(path: str) -> list[str]:
    """What of a sys.path entry snippets may see. A project's checkout on sys.path (an
    editable install puts it there) shows only its packages: beside them it holds the runs
    written into it, data and .git. Any other entry (site-packages, a library folder) whole."""
    if not is_checkout(path):
        return [path]
    try:
        names = os.listdir(path)
    except OSError:
        return [path]
    return [os.path.join(path, n) for n in sorted(names) if os.path.isfile(os.path.join(path, n, "__init__.py"))]


def cover_plan(needed: list[str], checkouts: list[str], system: list[str]) -> dict[str, list[str]]:
    """Which directories to cover, each with the needed paths under it to bind back: the
    hidden_dirs(), and a checkout on sys.path outside them (a clone in /ci or /src), which
    would otherwise show its runs and data whole. A checkout in or above the system's Python
    (`system`: its prefixes; a git-managed /usr/local, say) stays open: the libraries beside
    it are needed and on no list."""
    real = sorted({os.path.realpath(p) for p in needed}, key=len)

    def inside(p: str, top: str) -> bool:
        return os.path.commonpath([p, top]) == top

    # a top-level link is covered where it leads (Fedora's /home is /var/home), unless that is
    # the system's; one that leads into another covered directory goes with it
    resolved = {os.path.realpath(t) for t in hidden_dirs() if os.path.isdir(t)} - {"/", *SYSTEM_DIRS}
    tops = sorted(t for t in resolved if not any(u != t and inside(t, u) for u in resolved)
                  and not any(inside(t, p) for p in real))  # the interpreter lives there (or above)
    for c in sorted({os.path.realpath(c) for c in checkouts}, key=len):
        if not any(inside(c, t) for t in tops) and not any(
                inside(s, c) or inside(c, s) for s in map(os.path.realpath, system)):
            tops.append(c)
    todo: dict[str, list[str]] = {}
    for top in tops:
        keep: list[str] = []
        for p in real:
            if p.startswith(top + os.sep) and not any(p.startswith(q + os.sep) for q in keep):
                keep.append(p)
        todo[top] = keep
    return todo


def _hide_host_dirs(needed: list[str], work_dir: str) -> None:
    checkouts = [p for p in sys.path if p and is_checkout(p)]
    _cover(cover_plan(needed, checkouts, [sys.base_prefix, sys.base_exec_prefix]))
    os.makedirs(work_dir, exist_ok=True)  # where each snippet mounts its own tmpfs


def enter_sandbox(missing: list[str], work_dir: str) -> bool:
    """In B: new namespaces, read-only filesystem, locked by a nested user namespace whose
    pid namespace the zygote will be PID 1 of. Returns False (and names what failed) when
    the kernel refuses; the worker then runs with resource limits only."""
    euid, egid = os.geteuid(), os.getegid()
    # Root outside becomes nobody: root-owned files stay unreadable or read-only by
    # permission (/etc/shadow, keys) and the process-count limit applies (the kernel exempts
    # real root from RLIMIT_NPROC). Nobody must be able to read the interpreter, its
    # modules and the work directory's parent: where they are closed to others (a Python
    # under /root), open a way to just them (_open_to_others).
    out_uid, out_gid = euid, egid
    interpreter = [part for p in sys.path if p and os.path.isdir(p) for part in importable_parts(p)]
    # the whole prefixes: a conda build keeps the libraries numpy and scipy load
    # (openblas, gfortran) in PREFIX/lib, which is on no sys.path
    interpreter += [p for p in {sys.prefix, sys.exec_prefix, sys.base_prefix} if os.path.isdir(p)]
    interpreter.append(os.path.dirname(os.path.realpath(sys.executable)))
    if euid == 0:
        needed = interpreter + [os.path.dirname(os.path.abspath(work_dir))]
        closed = [p for p in needed if _closed_dir(p) is not None]
        if closed:
            own = os.open("/proc/self/ns/mnt", os.O_RDONLY)
            try:
                _open_to_others(closed)
            except OSError:  # no CAP_SYS_ADMIN (a plain Docker root), say
                with contextlib.suppress(OSError):  # refused too where the unshare was
                    setns(own, CLONE_NEWNS)  # as it was
            finally:
                os.close(own)
        if all(_closed_dir(p) is None for p in needed):
            out_uid, out_gid = 65534, 65534
        else:
            missing.append("unprivileged user (Python is not readable by user nobody: "
                           "snippets run as root and can read files only root may)")
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:  # writes B's id maps from outside, where it has the privilege to
        os.close(w)
        ok = os.read(r, 1) == b"u"
        try:
            if ok:
                _map_ids(str(os.getppid()), out_uid, out_gid, euid != 0)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    os.close(r)
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    except OSError as e:
        os.close(w)
        os.waitpid(helper, 0)
        missing.append(f"namespaces ({e.strerror})")
        return False
    os.write(w, b"u")
    os.close(w)
    _, status = os.waitpid(helper, 0)
    if status != 0:
        missing.append("user id map")
        # The user namespace exists but has no mapping; nothing else can work in it.
        raise SystemExit("rstar_fast executor: cannot map user ids in the sandbox")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    prctl(PR_SET_DUMPABLE, 1)  # changing ids cleared it; /proc/self must stay ours
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    try:
        _hide_host_dirs(interpreter, work_dir)
    except OSError as e:
        missing.append(f"hidden host directories ({e.strerror})")
    try:
        mount_setattr("/", MOUNT_ATTR_RDONLY, 0, True)
        mount_setattr("/proc", 0, MOUNT_ATTR_RDONLY, False)  # to write the nested id maps
    except OSError as e:
        missing.append(f"read-only filesystem ({e.strerror})")
    # Nested user namespace: mounts copied into it are locked, so nothing inside can turn
    # read-only back into read-write or unmount what covers something.
    unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID)
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", "0 0 1")
    _write_file("/proc/self/gid_map", "0 0 1")
    return True


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies, and exit now if it already has. Set
    again after every change of credentials (a new user namespace, new ids), which clears
    it; a busy worker would otherwise outlive the executor's process."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(1)


def bootstrap(cfg: dict) -> None:
    """Entry point of B. Forks the zygote and mirrors its exit."""
    parent = os.getppid()
    die_with_parent(parent)
    missing: list[str] = []
    # caps on the processes (fork bombs) and the memory of everything this worker will ever start
    for cg in cfg.get("cgroups") or ():
        try:
            _write_file(os.path.join(cg, "cgroup.procs"), str(os.getpid()))
        except OSError:
            missing.append(f"cgroup {os.path.basename(os.path.dirname(cg))}")
    sandboxed = cfg.get("isolation") != "limits" and enter_sandbox(
        missing, cfg.get("work_dir") or "/tmp")
    die_with_parent(parent)
    own_proc = False
    if not sandboxed and cfg.get("isolation") == "namespaces":
        write_frame(1, {"t": "fatal", "error": "namespaces unavailable: " + "; ".join(missing)})
        os._exit(2)
    if sandboxed:
        pid = os.fork()  # the zygote: PID 1 of the nested pid namespace
        if pid:
            os.close(0)
            os.close(1)
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        try:  # a /proc that shows this pid namespace
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            own_proc = True
        except OSError as e:
            missing.append(f"private /proc ({e.strerror})")
    else:
        try:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        except OSError:
            pass
    Zygote(cfg, sandboxed, missing, own_proc).serve()


# ---------------------------------------------------------------------------------------
# Zygote (Z) and supervision.


def _resource_limits(cfg: dict, timeout_s: float) -> None:
    import resource

    cpu = int(timeout_s) + 2
    limits = [
        (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, cfg["file_mb"] << 20),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, cfg["max_procs"]),
        # No POSIX message queues: sibling steps would share P's, which P cannot list to
        # remove (that takes a mount of the mqueue filesystem).
        (resource.RLIMIT_MSGQUEUE, 0),
    ]
    for res, val in limits:
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            val = min(val, hard)
        try:  # soft == hard: nothing left to raise, and lowering hard is irreversible
            resource.setrlimit(res, (val, val))
        except (ValueError, OSError):
            pass


_SAFE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Zygote:
    def __init__(self, cfg: dict, sandboxed: bool, missing: list[str], own_proc: bool) -> None:
        self.cfg = cfg
        self.sandboxed = sandboxed
        self.missing = missing
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY) if sandboxed else -1
        # Sandboxed: where each snippet mounts its own tmpfs to work in (HOME and TMPDIR too);
        # without namespaces, where each gets a directory of its own (homes): what one leaves
        # behind then goes with the executor's work dir on close().
        self.work_dir = cfg.get("work_dir") or "/tmp"
        self.own_proc = own_proc  # a /proc of its pid namespace: snippets mount their own too
        self.pending: list[Supervised] = []  # killed early, reaped after the reply
        self.homes: list[str] = []  # removed once their snippets are gone (remove_homes)

    # -- setup -----------------------------------------------------------------------
    def warm(self) -> None:
        os.environ.clear()
        os.environ.update(_SAFE_ENV)
        os.environ.update(HOME=self.work_dir, TMPDIR=self.work_dir)
        for name in self.cfg["preload"]:
            try:
                __import__(name)
            except Exception:  # noqa: BLE001 - a missing optional package is not fatal
                pass
        if "sympy" in self.cfg["preload"]:
            try:  # first calls import lazily and fill caches: do it once here, not per snippet
                exec(_WARMUP, {"__name__": "__warmup__"})
            except Exception:  # noqa: BLE001
                pass
        import gc

        gc.collect()
        gc.freeze()  # forked children then do not touch (copy) the zygote's objects
        collapse_heap()

    def serve(self) -> None:
        self.warm()
        if self.sandboxed:
            bound_capabilities()
        set_name(b"rstar-zygote")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        write_frame(1, {"t": "ready", "sandboxed": self.sandboxed, "missing": self.missing,
                        "pid": os.getpid()})
        while True:
            job = read_frame(0)
            if job is None or job.get("op") == "exit":
                os._exit(0)
            failed = False
            try:
                reply = self.handle(job)
            except Exception as e:  # noqa: BLE001 - report, stay alive
                reply = {"t": "reply", "error": f"worker error: {exc_line(e, 1024)}"}
                failed = True
            write_frame(1, reply)  # before the snippet's teardown: see supervise(done=)
            self.reap_pending()
            self.reap_strays(failed)
            self.remove_homes()

    def reap_pending(self) -> None:
        for sup in self.pending:
            sup.reap()
        self.pending.clear()

    def handle(self, job: dict) -> dict:
        timeout = float(job["timeout_s"])
        if job["op"] == "run":
            results = [self.run_whole(job, timeout)]
        else:
            results = self.run_siblings(job, timeout)
        return {"t": "reply", "results": results}

    def run_whole(self, job: dict, timeout: float) -> dict:
        """The job's whole program in one snippet process."""
        proc, out_r, res_r = self.spawn(job, None)
        sup = supervise(proc, out_r, res_r, timeout, job["out_cap"], job["style"] == "plain",
                        None, done=has_result)
        self.pending.append(sup)
        return compose(job, sup, timeout, b"")

    def run_step_whole(self, job: dict, step: str, timeout: float) -> dict:
        """One step of a sibling batch run with the whole prefix before it, as its own job."""
        self.reap_pending()  # no child may end while start_init ignores SIGCHLD
        return self.run_whole(dict(job, op="run", code=job["prefix"] + step), timeout)

    def run_siblings(self, job: dict, timeout: float) -> list[dict]:
        steps = job["steps"]
        if not self.sandboxed:
            # Without namespaces P may signal only itself and its group and open no pidfd (a
            # snippet could otherwise reach every process of its user): it could neither watch
            # nor end its steps. Each step runs whole, as the reference runs them.
            return [self.run_step_whole(job, step, timeout) for step in steps]
        proc, out_r, res_r = self.spawn(job, steps)
        n = len(steps)
        # P's stdout carries only the prefix's output (each step has its own): the cap of a
        # whole run, and what is left of it is each step's (ask_count)
        # Each piece of the prefix and each step may take a timeout (plus slack); the whole
        # batch no more than the prefix's and every step's timeout together.
        sup = supervise(proc, out_r, res_r, timeout, job["out_cap"],
                        job["style"] == "plain", timeout + 5.0,
                        done=lambda frames: sum(isinstance(f, dict) and f.get("t") == "step"
                                                for f in frames) >= n, ask_count=True,
                        hard_timeout=(n + 1) * timeout + 5.0)
        self.pending.append(sup)
        prefix_out = b""
        prefix_ran = False
        by_step: dict[int, dict] = {}
        for fr in sup.frames:
            if isinstance(fr, dict) and fr.get("t") == "prefix":
                prefix_out = bytes(sup.out)  # what the prefix printed (plain style)
                prefix_ran = True
            elif isinstance(fr, dict) and fr.get("t") == "step" and isinstance(fr.get("i"), int):
                by_step[fr["i"]] = fr
        results = []
        for i, step in enumerate(steps):
            fr = by_step.get(i)
            if fr is None or fr.get("fallback"):
                # P exited, or was stopped after its prefix ran (by a step, SIGSTOP to its
                # parent): run this one whole.
                if fr is None and not (sup.reason == "exited" or sup.reason == "stopped" and prefix_ran):
                    # The batch died (prefix timed out, output flood, ...): same for all.
                    results.append(compose(job, sup, timeout, b""))
                    continue
                results.append(self.run_step_whole(job, step, timeout))
            else:
                results.append(_clean_result(fr.get("result"), prefix_out, job))
        return results

    # -- snippet processes -------------------------------------------------------------
    def spawn(self, job: dict, steps: list[str] | None) -> tuple[Proc, int, int]:
        home = None
        if not self.sandboxed:
            home = tempfile.mkdtemp(prefix="rstar_exec_", dir=self.work_dir)
            self.homes.append(home)
        out_r, out_w = os.pipe()
        if steps is None:
            res_r, res_w = os.pipe()
        else:  # two-way: P reads back what its prefix wrote to stdout (supervise(ask_count=))
            res_r, res_w = (s.detach() for s in socket.socketpair())
        proc = self.fork_snippet()
        if proc.pid == 0:
            try:
                os.close(out_r)
                os.close(res_r)
                child_setup(self, job, out_w, res_w, home)
                if steps is None:
                    child_run(job)
                else:
                    child_siblings(self, job, steps)
            except BaseException as e:  # noqa: BLE001
                try:
                    write_frame(3, {"t": "result", "kind": "error", "output": None,
                                    "error": "sandbox setup failed: "
                                             + exc_line(e, job["max_chars"])})
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(0)
        os.close(out_w)
        os.close(res_w)
        return proc, out_r, res_r

    def fork_snippet(self) -> Proc:
        """fork(); with namespaces the child is PID 2 of a fresh pid namespace, under an init
        that does nothing (start_init): were the snippet PID 1, the kernel would drop every
        signal it sends itself that it has no handler for (os.kill(os.getpid(), 9), abort(),
        an alarm), and its own namespace's processes could not signal it."""
        if not self.sandboxed:
            return Proc(os.fork(), "tree")
        init, stack = start_init()
        fd = os.pidfd_open(init)
        try:
            setns(fd, CLONE_NEWPID)  # only what this process forks next goes there
            try:
                pid = os.fork()
            except BaseException:  # EAGAIN, ENOMEM: this process's children go back home
                setns(self.pidns_fd, CLONE_NEWPID)
                raise
            if pid != 0:
                setns(self.pidns_fd, CLONE_NEWPID)
        except BaseException:
            os.kill(init, signal.SIGKILL)
            os.waitpid(init, 0)
            raise
        finally:
            os.close(fd)
        return Proc(pid, "ns", init, stack)

    def reap_strays(self, failed: bool = False) -> None:
        """Kill and reap anything left over: without pid namespaces, where the zygote is a
        subreaper and escaped daemons end up as its children; with them, after a job that
        failed half way (it may have left a snippet running, unsupervised)."""
        if not self.sandboxed:
            kill_children(os.getpid())
        elif failed:
            end_group()  # the zygote is PID 1 of its namespace: kill(-1) spares only it
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def remove_homes(self) -> None:
        for home in self.homes:
            with contextlib.suppress(OSError):  # what is left goes with the work dir on close
                wipe_dir(home)
                os.rmdir(home)
        self.homes.clear()


_WARMUP = """
import resource, shutil, tempfile, math, fractions, itertools, collections, functools, re, json, random, decimal, ast, io
import numpy as np
import sympy as sp
from sympy import symbols, Eq, solve, simplify, expand, factor, Rational, sqrt, pi, N, nsimplify
x, y = sp.symbols('x y')
solve(Eq(2 * x**2 - 3 * x, 1), x); solve([x + y - 3, x - y - 1], [x, y])
simplify(sp.sin(x)**2 + sp.cos(x)**2); expand((x + 1)**5); factor(x**2 - 1)
sp.diff(sp.exp(x) * x, x); sp.integrate(x**2, (x, 0, 1)); sp.limit(sp.sin(x) / x, x, 0)
N(sqrt(2) * pi, 10); nsimplify(0.5); Rational(3, 4) + 1; sp.binomial(10, 3); sp.isprime(97)
sp.Matrix([[1, 2], [3, 4]]).det(); sp.solveset(x**2 - 4, x, sp.S.Reals); sp.summation(x, (x, 1, 10))
sp.latex(x**2); str(sp.sqrt(8)); sp.Poly(x**2 + 1, x).coeffs(); sp.gcd(12, 18); sp.divisors(12)
np.array([1.0, 2.0]).mean(); np.linalg.solve(np.eye(2), np.ones(2)); np.roots([1, -3, 2])
try:
    import scipy.optimize, scipy.special
    scipy.optimize.fsolve(lambda v: v**2 - 2, 1.0); scipy.special.comb(5, 2)
except Exception:
    pass
"""


def kill_children(pid: int) -> None:
    """SIGKILL every descendant of pid (via /proc/<pid>/task/*/children)."""
    for _ in range(50):
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except OSError:
            return
        if not kids:
            return
        for k in kids:
            kill_children(k)
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        for k in kids:
            try:
                os.waitpid(k, 0)
            except ChildProcessError:
                pass


_INIT_STACK = 1 << 16
_libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_PAUSE = ctypes.cast(_libc.pause, ctypes.c_void_p).value


def start_init() -> tuple[int, Any]:
    """Start PID 1 of a fresh pid namespace: a clone of this process that shares its memory
    (nothing is copied: ~0.1 ms) and sleeps in pause() on a small stack of its own, returned
    to be kept alive until it is reaped. It has every signal at its default action, and an
    init receives only signals it handles from its own namespace, so nothing there can end
    it; killing it from outside kills everything in the namespace. It inherits SIGCHLD
    ignored, so the kernel reaps the orphans it adopts."""
    stack = ctypes.create_string_buffer(_INIT_STACK)
    top = (ctypes.addressof(stack) + _INIT_STACK) & ~15
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # this process has no live children now
    try:
        pid = _libc.clone(_PAUSE, top, CLONE_VM | CLONE_NEWPID | signal.SIGCHLD, None)
    finally:
        signal.signal(signal.SIGCHLD, old)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid, stack


def child_setup(z: Zygote, job: dict, out_w: int, res_w: int, home: str | None) -> None:
    """In a fresh snippet process: fds, session, private tmpfs cwd (or home, without
    namespaces), env, limits."""
    os.dup2(z.devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(z.devnull, 2)
    os.dup2(res_w, 3)
    os.closerange(4, 65536)
    os.setsid()
    set_name(b"rstar-snippet")
    with contextlib.suppress(OSError):  # out of memory, the kernel kills a snippet first
        _write_file("/proc/self/oom_score_adj", "1000")
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    reseed_numpy()
    if z.sandboxed:
        # A mount namespace of its own, with a /proc that shows only its own pid namespace
        # and a fresh tmpfs as cwd, and an IPC namespace of its own (System V objects, POSIX
        # message queues): nothing it mounts, leaves or changes there outlives it.
        unshare(CLONE_NEWNS | CLONE_NEWIPC)
        if z.own_proc:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("tmpfs", z.work_dir, "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={z.cfg['file_mb'] * 2}m,mode=1777")
        os.chdir(z.work_dir)
    else:
        os.chdir(home)  # type: ignore[arg-type]
    _resource_limits(z.cfg, float(job["timeout_s"]) * (1 + len(job.get("steps") or ())))
    if z.sandboxed:
        drop_capabilities()
        refuse_kernel_surface()
    else:
        # Run as root (a container without CAP_SYS_ADMIN), a snippet with no capability cannot
        # read its ancestors' /proc entries (their environment: keys) nor act as root beyond
        # what root's files allow.
        with contextlib.suppress(OSError):
            drop_capabilities()
        try:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            refuse_kernel_surface()
            refuse_other_processes()
        except OSError:
            pass
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.argv = [""]


def reseed_numpy() -> None:
    """Fresh numpy draws in a forked process, as the random module gets at every fork: one
    zygote's (or one prefix's) frozen state would give every snippet the same numbers."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):  # model code may have replaced it
            # a 32-bit seed: 3 us, where seed() with no argument takes some 200 us per snippet
            numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


class PrefixDraws:
    """P's random and numpy states, so that a step forked from P continues the prefix's draws
    as the whole program would: fork reseeds the random module (and a snippet reseeds numpy),
    which would lose a seed the prefix set. A prefix that never touched either keeps the
    fresh draws each whole program gets. Bound before the prefix runs, which may rebind them."""

    def __init__(self) -> None:
        import random

        self.inst, self.get, self.set = random._inst, random.Random.getstate, random.Random.setstate
        numpy = sys.modules.get("numpy")
        self.np_get = numpy.random.get_state if numpy is not None else None
        self.start, self.np_start = self._states()
        self.now: Any = None
        self.np_now: Any = None

    def _states(self) -> tuple[Any, Any]:
        state = np_state = None
        with contextlib.suppress(Exception):
            state = self.get(self.inst)
        with contextlib.suppress(Exception):
            numpy = sys.modules.get("numpy")  # the prefix may import it
            get = self.np_get or (numpy.random.get_state if numpy is not None else None)
            if get is not None:
                s = get()
                np_state = (s[0], s[1].tobytes(), *s[2:])
        return state, np_state

    def before_fork(self) -> None:
        self.now, self.np_now = self._states()

    def in_step(self) -> None:
        if self.now is not None and self.now != self.start:
            with contextlib.suppress(Exception):
                self.set(self.inst, self.now)
        if self.np_now is None or self.np_now == self.np_start:
            reseed_numpy()  # untouched (or imported by the prefix, unseeded): fresh draws


def child_run(job: dict) -> None:
    ctx = SnippetContext(job)
    program = Program(ctx.max_chars, ctx.capture_keep)
    if ctx.style == "plain":
        res = run_plain(ctx, program, job["code"])
    else:
        text = sanitize(job["code"])
        try:
            tree = ast.parse(text)
        except BaseException as e:  # noqa: BLE001
            err = exc_line(e, ctx.max_chars)
            res = {"t": "result", "kind": "error", "output": err, "error": err}
        else:
            res = run_reference(program, tree, text, job["out_cap"])
    write_frame(3, res)


def plan_steps(prefix: str, steps: list[str], plain: bool,
               ) -> tuple[list[ast.stmt], list[tuple[int, ast.Module, str] | None]]:
    """The prefix's statements and, for each step, how many of them it needs run before it,
    with its whole program (tree and text); None for a step that must run whole: one where
    prefix + step does not split into the prefix's statements and then the step's (the
    step continues the prefix's last statement, or either fails to parse)."""
    prep = (lambda code: code) if plain else sanitize
    try:
        body = ast.parse(prep(prefix)).body
    except BaseException:  # noqa: BLE001 - a step may complete it
        return [], [None] * len(steps)
    plans: list[tuple[int, ast.Module, str] | None] = []
    for step in steps:
        text = prep(prefix + step)
        try:
            tree = ast.parse(text)
        except BaseException:  # noqa: BLE001 - run whole, it gets its own error
            plans.append(None)
            continue
        if len(tree.body) < len(body) or any(
                _stmt_key(a) != _stmt_key(b) for a, b in zip(tree.body, body)):
            plans.append(None)
            continue
        # The reference runs nothing after the last print when there are several.
        plans.append((len(body) if plain else min(needed_stmts(tree), len(body)), tree, text))
    return body, plans


def std_fds() -> list[tuple[int, int]]:
    """What fds 0-2 are (device and inode), to see whether code pointed them elsewhere."""
    out = []
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
            out.append((st.st_dev, st.st_ino))
        except OSError:
            out.append((-1, -1))
    return out


def shared_mappings() -> bool:
    """Whether this process maps writable shared memory (mmap(-1) shared, /dev/shm): forked
    steps would all write the same pages, where runs of the whole program each get their own
    (read-only shared mappings, the C library's gconv cache, say, hold no state). Python
    code makes them with the mmap module (multiprocessing's shared memory too), which no
    zygote loads: only once it is loaded is the map (milliseconds to read) looked at."""
    if "mmap" not in sys.modules:
        return False
    with open("/proc/self/maps", "rb") as f:
        maps = f.read()
    return b" rw-s " in maps or b" rwxs " in maps


def prefix_left_state(home: str, home_mode: int, ipc: bool, fds: list[tuple[int, int]]) -> bool:
    """Whether the prefix left what forked steps would share, unlike runs of the whole
    program: files in the work directory (or a new mode on it), open files (one file
    offset for all), fds 0-2 pointed elsewhere than `fds` (a step's stdout is its own
    pipe), shared memory, or (ipc) System V IPC objects."""
    import stat

    try:
        if os.listdir(home) or stat.S_IMODE(os.stat(home).st_mode) != home_mode:
            return True
        if ipc and sysv_ipc_exist():
            return True
        if std_fds() != fds or shared_mappings():
            return True
        for fd in os.listdir("/proc/self/fd"):
            if int(fd) > 3:
                try:
                    os.fstat(int(fd))
                    return True
                except OSError:
                    pass  # the one listdir read /proc/self/fd with
    except OSError:
        return True
    return False


def child_siblings(z: Zygote, job: dict, steps: list[str]) -> None:
    """P: run the prefix once, then fork one process per step from the resulting state,
    which then runs what it adds. With the reference's style the prefix runs only as far as
    each step needs, steps in that order (a step that adds no print to a prefix with
    several skips the prefix's statements after its last print, as run whole). Steps that
    cannot continue the prefix's state as if run whole run whole (a "fallback" frame)."""
    import stat

    ctx = SnippetContext(job)
    program = Program(ctx.max_chars, ctx.capture_keep)
    plain = ctx.style == "plain"
    prefix = job["prefix"]
    timeout = float(job["timeout_s"])
    # Bind what we need before untrusted code can rebind module attributes.
    pipe, close, fork, monotonic = os.pipe, os.close, os.fork, time.monotonic
    sigmask, sigpending_take, setmask = signal.pthread_sigmask, signal.sigtimedwait, signal.SIG_SETMASK
    # Each step's exit sends P a SIGCHLD: a handler the prefix installed would run in P and
    # change what later steps inherit, which no whole run does. P blocks SIGCHLD except while
    # the prefix runs; a step gets P's own mask back.
    chld = {signal.SIGCHLD}
    own_mask = sigmask(signal.SIG_BLOCK, chld)
    # P has no capabilities left, so no pid namespace per step: a step and all it starts are
    # ended by kill(-1) from P, which reaches everything in P's pid namespace but P and init.
    mode = "group" if z.sandboxed else "tree"
    ipc = z.sandboxed  # P's own IPC namespace; without namespaces it is the host's
    step_cap: int | None = 0  # out_cap less what the prefix printed (supervise(ask_count=))
    home = os.getcwd()
    home_mode = stat.S_IMODE(os.stat(home).st_mode)
    fds = std_fds()
    limits = own_limits()  # a step may lower P's (prlimit): later steps then run whole
    draws = PrefixDraws()
    body, plans = plan_steps(prefix, steps, plain)
    for i, plan in enumerate(plans):
        if plan is None:
            write_frame(3, {"t": "step", "i": i, "fallback": True})
    done = 0  # prefix statements run
    prefix_seconds = 0.0
    started = shared = False
    clean = True  # the work directory holds only what the prefix left
    todo = sorted((plan[0], i, plan[1], plan[2]) for i, plan in enumerate(plans) if plan)
    for need, i, tree, text in todo:
        if not clean and not shared:
            try:  # the previous step's files go
                wipe_dir(home)
                os.chmod(home, home_mode)
                clean = True
            except OSError:
                pass
            if ipc:  # and its System V IPC objects (the namespace is P's, for all steps)
                clean = remove_sysv_ipc() and clean
            shared = not clean
        if not shared and (not started or done < need):
            t = monotonic()
            sigpending_take(chld, 0)  # the steps' exits so far, which are P's, not the prefix's
            sigmask(setmask, own_mask)
            try:
                if plain and not started:
                    run_plain(ctx, program, prefix)
                elif not plain:
                    program.run_stmts(body[done:need])
            finally:
                sigmask(signal.SIG_BLOCK, chld)
            done = need
            try:
                sys.stdout.flush()
            except BaseException:  # noqa: BLE001
                pass
            prefix_seconds += monotonic() - t
            shared = prefix_left_state(home, home_mode, ipc, fds)
            limits = own_limits()
            write_frame(3, {"t": "prefix", "seconds": prefix_seconds})
            step_cap = None  # the zygote's answer comes while the next step is forked
        if prefix_seconds >= timeout:  # the prefix alone outran the deadline, as run whole
            write_frame(3, {"t": "step", "i": i, "result": timed_out_result(
                timeout, job["style"], "", job["max_chars"], prefix_seconds)})
            continue
        if not started:
            started = True
            try:  # steps must not reach into P, which relays their results, through ptrace
                prctl(PR_SET_DUMPABLE, 0)
            except OSError:
                pass
        if shared:  # from here on every step would share it: each runs whole
            write_frame(3, {"t": "step", "i": i, "fallback": True})
            continue
        clean = False
        out_r, out_w = pipe()
        res_r, res_w = pipe()
        draws.before_fork()
        pid = fork()
        if pid == 0:
            try:
                close(out_r)
                close(res_r)
                os.dup2(out_w, 1)
                os.dup2(res_w, 3)
                close(out_w)
                close(res_w)
                sigmask(setmask, own_mask)
                draws.in_step()
                if not plain:
                    res = run_reference(program, tree, text, job["out_cap"])
                else:
                    try:  # it continues the prefix at a statement, but may not start a line
                        compile(steps[i], "<string>", "exec", dont_inherit=True)
                        res = run_plain(ctx, program, steps[i])
                    except SyntaxError:
                        res = {"t": "fallback"}
                write_frame(3, res)
            except BaseException as e:  # noqa: BLE001
                try:
                    write_frame(3, {"t": "result", "kind": "error", "output": None,
                                    "error": "sandbox setup failed: "
                                             + exc_line(e, job["max_chars"])})
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(0)
        close(out_w)
        close(res_w)
        if step_cap is None:
            try:  # what the prefix printed so far counts against each step's cap, as run whole
                step_cap = max(0, job["out_cap"] - read_count(3))
            except (OSError, ValueError):  # the prefix took fd 3: its steps get nothing
                step_cap = 0
        sup = supervise(Proc(pid, mode), out_r, res_r, max(0.05, timeout - prefix_seconds),
                        step_cap, plain, None, done=has_result)
        fr = sup.frames[0] if sup.frames and isinstance(sup.frames[0], dict) else None
        if fr is not None and fr.get("t") == "fallback" and sup.reason == "exited":
            write_frame(3, {"t": "step", "i": i, "fallback": True})
        else:
            write_frame(3, {"t": "step", "i": i, "result": compose(job, sup, timeout, b"")})
        sup.reap()  # before the work dir is wiped for the next step
        if own_limits() != limits:
            shared = True
    os._exit(0)


def own_limits() -> list[tuple[int, int]]:
    """This process's resource limits that a step, running as the same user, could change."""
    import resource

    return [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
                                            resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC,
                                            resource.RLIMIT_STACK, resource.RLIMIT_DATA)]


def read_count(fd: int) -> int:
    """A decimal number ended by a newline, read from fd (see supervise(ask_count=))."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 32)
        if not chunk or len(data) > 32:
            raise ValueError("no count")
        data += chunk
    return int(data)


MSG_INFO, SHM_INFO, SEM_INFO = 12, 14, 19
_IPC_INFO = ctypes.create_string_buffer(256)  # made once here, not in every step's P
_INT = struct.Struct("i")


def sysv_ipc_exist() -> bool:
    """Whether this process's IPC namespace holds a System V IPC object: the number in use
    that MSG_INFO, SHM_INFO and SEM_INFO report (msgpool, used_ids, semusz); far cheaper
    in P, whose every allocation copies pages, than reading /proc."""
    buf = _IPC_INFO
    return (_libc.msgctl(0, MSG_INFO, buf) >= 0 and _INT.unpack_from(buf, 0)[0] > 0
            or _libc.shmctl(0, SHM_INFO, buf) >= 0 and _INT.unpack_from(buf, 0)[0] > 0
            or _libc.semctl(0, 0, SEM_INFO, buf) >= 0 and _INT.unpack_from(buf, 28)[0] > 0)


def sysv_ipc_ids() -> list[tuple[str, int]]:
    """The System V IPC objects of this process's IPC namespace: (kind, id)."""
    found = []
    for kind in ("msg", "sem", "shm"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                found += [(kind, int(line.split()[1])) for line in f.readlines()[1:]]
        except OSError:  # no System V IPC in this kernel
            pass
    return found


IPC_RMID = 0
_IPC_REMOVE = {"msg": lambda i: _libc.msgctl(i, IPC_RMID, None),
               "sem": lambda i: _libc.semctl(i, 0, IPC_RMID),
               "shm": lambda i: _libc.shmctl(i, IPC_RMID, None)}


def remove_sysv_ipc() -> bool:
    """Remove every System V IPC object of this process's IPC namespace (a step's own
    user made them all, so it may). Returns whether all went."""
    if not sysv_ipc_exist():
        return True
    for kind, ident in sysv_ipc_ids():
        _IPC_REMOVE[kind](ident)
    return not sysv_ipc_exist()


def wipe_dir(path: str) -> None:
    """Remove everything under path, without recursion (a step may nest directories
    thousands deep, past PATH_MAX) and without privileges (it may have taken permissions
    away from its own directories). Raises OSError when something cannot be removed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    os.chmod(path, 0o700)  # the caller puts the mode it wants back
    fd = os.open(path, flags)
    down: list[str] = []  # directory names from path to where fd is
    try:
        while True:
            sub = None
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        sub = e.name
                        break
                    os.unlink(e.name, dir_fd=fd)
            if sub is not None:
                os.chmod(sub, 0o700, dir_fd=fd)
                nfd = os.open(sub, flags, dir_fd=fd)
                down.append(sub)
            elif down:
                nfd = os.open("..", flags, dir_fd=fd)
                os.rmdir(down.pop(), dir_fd=nfd)
            else:
                return
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


class Proc:
    """A snippet process, and how to end it with everything it started. mode "ns": PID 2 of
    a pid namespace whose PID 1, `init`, does nothing but exist: killing the init kills
    everything in the namespace; "group" (a step, in P): kill(-1) reaches every process in
    P's namespace but P and the init; "tree" (no namespaces): its descendants, found through
    /proc, and its process group."""

    __slots__ = ("pid", "mode", "init", "stack", "status")

    def __init__(self, pid: int, mode: str, init: int = 0, stack: Any = None) -> None:
        self.pid, self.mode, self.init = pid, mode, init
        self.stack = stack  # the init's stack, in this process's memory: kept until it is reaped
        self.status: int | None = None  # wait status, once reaped

    def kill(self) -> None:
        try:
            if self.mode == "ns":
                os.kill(self.init, signal.SIGKILL)
            elif self.mode == "group":
                os.kill(-1, signal.SIGKILL)
            else:
                kill_children(self.pid)
                os.killpg(self.pid, signal.SIGKILL)
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def wait(self) -> int:
        if self.status is None:
            _, self.status = os.waitpid(self.pid, 0)
        return self.status

    def reap(self) -> None:
        """Wait until it and all it started are gone (after kill)."""
        self.wait()
        if self.mode == "ns":  # the init's exit waits until the process is reaped
            os.waitpid(self.init, 0)
            self.stack = None
        elif self.mode == "group":
            end_group()


def end_group() -> None:
    """In P: kill every other process in its pid namespace (but the init, which reaps them)
    and wait until they are gone."""
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return  # nothing left to signal
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.0005)  # orphans, dying: the init reaps them


class Supervised:
    """What supervise saw of one snippet process."""

    __slots__ = ("proc", "status", "out", "out_total", "frames", "reason", "seconds")

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.status: int | None = None
        self.out = bytearray()
        self.out_total = 0
        self.frames: list[Any] = []
        self.reason = "exited"  # exited | timeout | stopped (at the deadline) | output_limit | protocol
        self.seconds = 0.0

    def reap(self) -> None:
        self.proc.reap()


def stopped(pid: int) -> bool:
    """Whether the child pid is stopped (SIGSTOP from a process it started, say)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except OSError:
        return False
    return info is not None and info.si_code == os.CLD_STOPPED


def has_result(frames: list[Any]) -> bool:
    """A snippet process's last act is writing one of these frames, then _exit(0)."""
    return any(isinstance(f, dict) and f.get("t") in ("result", "fallback") for f in frames)


def supervise(proc: Proc, out_fd: int, res_fd: int, timeout: float, out_cap: int,
              keep_out: bool, progress_timeout: float | None,
              done: Callable[[list[Any]], bool] | None = None,
              ask_count: bool = False, hard_timeout: float | None = None) -> Supervised:
    """Wait for a snippet process: read its stdout (byte cap) and result frames, enforce
    the deadline from outside (each progress frame restarts it when progress_timeout is set,
    up to hard_timeout after the start),
    kill its whole tree when it must end, reap it. Never trusts what it reads.

    With done (and namespaces), the process is killed as soon as done(frames) holds,
    since all it would still do is exit, and the result is ready at once: the exit's
    teardown (unmapping ~100 MB, a few ms) then overlaps whatever the caller does next.
    The caller must sup.reap() before reusing the working directory.

    With ask_count (a sibling batch's P, res_fd a socket), for each "prefix" frame (P ran
    more of the prefix), once stdout is drained, the bytes stdout carried so far (what the
    prefix printed) are written back on res_fd: P waits for them, to cap each step's output
    at what is left of out_cap."""
    sup = Supervised(proc)
    t0 = time.monotonic()
    deadline = t0 + timeout
    hard_deadline = t0 + hard_timeout if hard_timeout is not None else math.inf
    fds = [out_fd, res_fd]  # closed on every way out, an exception included
    try:
        pidfd = os.pidfd_open(proc.pid)
        fds.append(pidfd)
        res_buf = bytearray()
        # a frame holds at most out_cap bytes of output (run_reference), which JSON may escape
        # to six times as many (a control character as \u0000), and a short error
        res_cap = max(out_cap, 1 << 20) * 6 + (1 << 16)
        poller = select.poll()
        for fd in (out_fd, res_fd, pidfd):
            poller.register(fd, select.POLLIN)
        open_fds = {out_fd, res_fd}
        exited = False
        killed_early = False
        early = done is not None and proc.mode != "tree"
        answered = 0  # "prefix" frames answered (ask_count)

        def read_some(fd: int) -> bool:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
                return False
            if fd == out_fd:
                sup.out_total += len(data)
                if keep_out and len(sup.out) < out_cap:
                    sup.out += data[: out_cap - len(sup.out)]
                if sup.out_total > out_cap:
                    sup.reason = "output_limit"
            else:
                res_buf.extend(data)
                if len(res_buf) > res_cap:
                    sup.reason = "protocol"
                try:
                    new = split_frames(res_buf)
                except Exception:  # noqa: BLE001 - garbage, or JSON nested past the recursion limit
                    sup.reason = "protocol"
                    new = []
                if new:
                    sup.frames.extend(new)
                    nonlocal deadline
                    # Only frames that report progress (more of the prefix run, a step done)
                    # move the deadline, never past the hard one: a prefix that writes
                    # frames of its own in a loop cannot hold the worker.
                    if progress_timeout is not None and any(
                            isinstance(f, dict) and f.get("t") in ("prefix", "step") for f in new):
                        deadline = min(time.monotonic() + progress_timeout, hard_deadline)
            return True

        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                sup.reason = "stopped" if stopped(proc.pid) else "timeout"
                proc.kill()
                break
            for fd, _ in poller.poll(remaining * 1000 + 1):
                if fd == pidfd:
                    exited = True
                else:
                    read_some(fd)
            asked = ask_count and sum(isinstance(f, dict) and f.get("t") == "prefix"
                                      for f in sup.frames)
            if asked > answered:
                answered = asked
                os.set_blocking(out_fd, False)
                while out_fd in open_fds and read_some(out_fd):
                    pass
                # Never blocks: a P that asks without reading its answers (forged "prefix"
                # frames) would fill the socket and stop this process past every deadline.
                os.set_blocking(res_fd, False)
                try:
                    os.write(res_fd, b"%d\n" % sup.out_total)
                except BlockingIOError:
                    sup.reason = "protocol"
                except OSError:
                    pass  # P is gone: its end shows
            if sup.reason in ("output_limit", "protocol"):
                proc.kill()
                break
            if early and done(sup.frames):  # type: ignore[misc]
                proc.kill()
                killed_early = True
                break
        fds.remove(pidfd)
        os.close(pidfd)
        if exited and proc.mode != "tree":
            proc.kill()  # what it left running (a daemon) ends with it
        # Drain what is left without blocking: with namespaces everything holding the pipes
        # is dead (or, killed early, wrote all it will before its result frame); without, a
        # stray daemon may still hold them.
        for fd in list(open_fds):
            os.set_blocking(fd, False)
            while fd in open_fds and read_some(fd):
                if sup.reason in ("output_limit", "protocol"):
                    break
        # Killed early, it was about to _exit(0) (the result frame is its last act): no need to
        # wait for its teardown (sup.reap() does). Otherwise (or when the drain hit a limit)
        # judge by its real end.
        sup.status = 0 if killed_early and sup.reason == "exited" else proc.wait()
        sup.seconds = time.monotonic() - t0
        if sup.reason == "exited" and proc.mode == "tree":
            kill_children(proc.pid)
        return sup
    finally:
        for fd in fds:
            os.close(fd)


_SIGNAMES = {s.value: s.name for s in signal.Signals}


def timed_out_result(timeout: float, style: str, plain_out: str, max_chars: int, seconds: float) -> dict:
    """The result of a snippet its deadline ended: the reference's timeout text, or in plain
    style what it printed before."""
    return {"ok": False, "timed_out": True, "seconds": seconds,
            "error": f"timed out after {_timeout_text(timeout)} s",
            "output": reference_timeout_output(timeout) if style != "plain" else cut_middle(plain_out, max_chars)}


def compose(job: dict, sup: Supervised, timeout: float, prefix_out: bytes) -> dict:
    """Turn what the supervisor saw into a result dict for the parent."""
    style = job["style"]
    max_chars = job["max_chars"]
    frame = next((f for f in sup.frames if isinstance(f, dict) and f.get("t") == "result"), None)
    plain_out = (prefix_out + bytes(sup.out)).decode("utf-8", "replace")
    if sup.reason in ("timeout", "stopped"):  # stopped until the deadline
        return timed_out_result(timeout, style, plain_out, max_chars, sup.seconds)
    status = sup.status
    assert status is not None  # supervise() reaps the process before it returns
    res: dict[str, Any] = {"ok": False, "output": "", "error": None, "timed_out": False,
                           "seconds": sup.seconds}
    # crashed: it ended without finishing or raising (the reference's "error" substring rule
    # cannot see that in these texts)
    ended = sup.reason not in ("output_limit", "protocol") and frame is not None \
        and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    kind = frame.get("kind") if frame is not None else None
    res["crashed"] = not ended or kind in ("exit", "memory", "output_limit")
    if sup.reason == "output_limit" or ended and kind == "output_limit":
        res["error"] = f"killed: output limit ({job['out_cap']} bytes)"
    elif sup.reason == "protocol":
        res["error"] = "killed: malformed result from snippet"
    elif ended:
        assert frame is not None
        err = frame.get("error")
        out = frame.get("output")
        if style == "plain":
            out = cut_middle(plain_out, max_chars)
        elif not isinstance(out, str):
            out = str(err or "")
        res["output"] = out  # many prints may each show max_chars: no cap of its own
        if kind == "ok":
            res["ok"] = True
        elif kind == "memory":
            res["error"] = "killed: memory limit"
        else:  # cut again: the snippet's process wrote the frame, and may have forged it
            res["error"] = cut_middle(str(err), max_chars)
        return res
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        res["error"] = f"killed by signal {_SIGNAMES.get(sig, sig)}"
        if sig == signal.SIGXCPU or sig == signal.SIGKILL and sup.seconds < timeout:
            res["error"] = "killed: CPU time limit" if sig == signal.SIGXCPU else res["error"]
    else:
        res["error"] = f"exited with status {os.WEXITSTATUS(status)}"
    res["output"] = cut_middle(plain_out, max_chars) if style == "plain" else res["error"]
    return res


def _clean_result(r: Any, prefix_out: bytes, job: dict) -> dict:
    """Validate a step result relayed by P (whose process ran untrusted prefix code)."""
    if not isinstance(r, dict):
        return {"ok": False, "output": "", "error": "killed: malformed result from snippet",
                "timed_out": False, "seconds": 0.0, "crashed": True}
    max_chars = job["max_chars"]
    out = r.get("output")
    out = out if isinstance(out, str) else ""
    if job["style"] == "plain" and prefix_out:
        out = cut_middle(prefix_out.decode("utf-8", "replace") + out, max_chars)
    err = r.get("error")
    secs = r.get("seconds")
    try:
        seconds = float(secs) if isinstance(secs, (int, float)) and not isinstance(secs, bool) else 0.0
    except OverflowError:  # an int past a float's range
        seconds = 0.0
    return {"ok": r.get("ok") is True, "output": out,
            "error": cut_middle(err, max_chars) if isinstance(err, str) else None,
            "timed_out": r.get("timed_out") is True,
            "seconds": seconds if math.isfinite(seconds) and seconds >= 0 else 0.0,
            "crashed": r.get("crashed") is True}


if __name__ == "__main__":
    bootstrap(json.loads(sys.argv[1]))
