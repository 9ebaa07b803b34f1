"""StepExecutor: reference output compatibility, sibling runs, and hostile snippets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from rstar_fast import ExecResult, StepExecutor
from rstar_fast.executor import ExecutorClosedError, pool
from rstar_fast.executor._worker import cut_middle

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rstar_format"
TIMEOUT = 1.5
SLACK = 4.0  # a hostile case must end within timeout + SLACK seconds


@pytest.fixture(scope="module")
def ex():
    os.environ["RSTAR_EXECUTOR_TEST_SECRET"] = "s3cret-value"
    with StepExecutor(workers=2, timeout_s=TIMEOUT, memory_mb=1024) as e:
        yield e
    os.environ.pop("RSTAR_EXECUTOR_TEST_SECRET", None)


def skip_unless_sandboxed(e: StepExecutor) -> None:
    """Skip a test of what the executor's namespaces keep out, or of the processes they lay
    out, where the kernel refused them (a container's default seccomp profile, Ubuntu's rule
    on unprivileged user namespaces): without them a hostile snippet does what it tries, and
    one of these would delete this very file."""
    if not e.sandboxed:
        pytest.skip("the kernel refused the executor's namespaces here: " + "; ".join(e.sandbox_missing))


def assert_healthy(ex: StepExecutor) -> None:
    r = ex.run("x = 6\nprint(x * 7)")
    assert r.ok and r.output == "42", r
    rs = ex.run_siblings("a = 2\n", ["print(a + 1)", "print(a * 5)"])
    assert [r.output for r in rs] == ["3", "10"], rs


def code_and_output(text: str) -> tuple[str, str] | None:
    if "<code>" not in text or "<end_of_code>" not in text or "<output>" not in text:
        return None
    code = text.split("<code>", 1)[1].split("<end_of_code>", 1)[0].replace("<end_of_step>", "")
    out = text.split("<output>", 1)[1].split("<end_of_output>", 1)[0].strip()
    return code, out


def reference_cases() -> list[tuple[str, str, str]]:
    cases = []
    sft = json.loads((SHARED / "sft_data_examples.json").read_text())
    for i, rec in enumerate(sft[1:], start=1):  # record 0's output is not what its code prints
        c = code_and_output(rec["response"])
        assert c is not None
        cases.append((f"sft{i}", *c))
    for i, rec in enumerate(json.loads((SHARED / "rm_data_examples.json").read_text())):
        for side in ("pos", "neg"):
            c = code_and_output(rec[side])
            if c is not None:
                cases.append((f"rm{i}{side}", *c))
    return cases


def test_reproduces_reference_outputs(ex: StepExecutor) -> None:
    cases = reference_cases()
    assert len(cases) >= 10
    results = ex.run_many([code for _, code, _ in cases])
    for (name, _, want), r in zip(cases, results):
        assert r.output == want, (name, r)


def test_reference_output_rules(ex: StepExecutor) -> None:
    codes = {
        "print(2/3)": "0.6667",
        "print(84000.0)": "84000.0",
        "x = 10/4\nx": "2.5",  # bare final expression: its value, unrounded as reference
        "y = 1": "",
        "print('a'*2000)": "a" * 512 + "..." + "a" * 511,  # the cut tail held the newline
        # however long (here past output_limit_bytes), a print shows its head and tail
        "print('b' + 'a' * 3_000_000 + 'c')": "b" + "a" * 511 + "..." + "a" * 510 + "c",
        "for i in range(400_000):\n    print(i)": cut_middle("".join(f"{i}\n" for i in range(400_000)), 1024).strip(),
        "print(1)\nprint(2)": "1: 1\n2: 2",
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x))": "[-2, 2]",
        "  \n# only a comment\n": "",
        "print(1)\nprint(2)\n1/0": "1: 1\n2: 2",  # the reference never runs what follows the last print
        "import math\nmath.pi": "3.141592653589793",
        "print(2/3)\nprint(1)": "2/3: 0.6667\n1: 1",  # each labelled value rounded on its own line
        "print('NaN')": "nan",  # rounded where no longer than the text, as the reference does
        "for i in range(2):\n    print(i)\n    print(i+1)\nprint(5)": "i i+1: 0\n1\n1\n2\n5: 5",  # labels: a space
    }
    rs = ex.run_many(list(codes))
    for (code, want), r in zip(codes.items(), rs):
        assert r.output == want, (code, r)
        assert r.ok, (code, r)
    big = "print('b' + 'a' * 3_000_000 + 'c')"
    prefix, steps = "x = 1\n" + big + "\n", ["print(x)", big]
    assert [r.output for r in ex.run_siblings(prefix, steps)] == [r.output for r in ex.run_many([prefix + s for s in steps])]
    r = ex.run("if True:\nprint(1)")
    assert not r.ok and r.output.startswith("IndentationError: expected an indented block")
    assert r.output.endswith("(<unknown>, line 3)")  # the reference's `# ========` line first
    # the reference captures prints in an io.StringIO, which an error about sys.stdout names
    r = ex.run("import sys\nsys.stdout.buffer.write(b'x')")
    assert r.output == "AttributeError: '_io.StringIO' object has no attribute 'buffer'", r


def test_snippets_do_not_inherit_the_workers_future_imports(ex: StepExecutor) -> None:
    """Annotations are evaluated, as in any script (the worker's own `from __future__ import
    annotations` must not reach the snippets), in both styles and in sibling steps."""
    code = "def f(x: Undefined) -> int:\n    return 1\nprint(f(2))"
    assert ex.run(code).output == "NameError: name 'Undefined' is not defined"
    assert ex.run_siblings("y = 1\n", [code])[0].output == "NameError: name 'Undefined' is not defined"
    with StepExecutor(workers=1, timeout_s=5.0, style="plain") as plain:
        assert not plain.run(code).ok


def test_errors_are_one_readable_line(ex: StepExecutor) -> None:
    r = ex.run("1/0")
    assert (r.ok, r.error, r.output) == (False, "ZeroDivisionError: division by zero",
                                         "ZeroDivisionError: division by zero")
    r = ex.run("import sys\nsys.exit(3)")
    assert not r.ok and r.error == "exited with status 3"
    r = ex.run("import os\nos._exit(4)")
    assert not r.ok and r.error == "exited with status 4"
    r = ex.run("import sys\nsys.exit()")
    assert not r.ok and r.error == "exited with status 0"
    r = ex.run("print('no error here')")
    assert r.ok


def test_error_text_rule_option() -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT, fail_on_error_text=True) as e:
        r = e.run("print('Error: none')")
        assert not r.ok and r.output == "Error: none"
        assert e.run("print(1)").ok


def test_plain_style() -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT, style="plain") as e:
        r = e.run("print(2/3)\nprint('b')\n5")
        assert r.ok and r.output == "0.6666666666666666\nb\n"
        rs = e.run_siblings("print('p')\nq = 3\n", ["print(q)", "1/0"])
        assert rs[0].ok and rs[0].output == "p\n3\n"
        assert not rs[1].ok and rs[1].error == "ZeroDivisionError: division by zero"


def test_clean_state_between_snippets(ex: StepExecutor) -> None:
    ex.run("leak = 1\nopen('f.txt', 'w').write('x')")
    r = ex.run("import os\nprint(os.listdir('.'))\nprint(leak)")
    assert not r.ok and "NameError" in r.output
    r = ex.run("import os\nprint(os.listdir('.'))")
    assert r.output == "[]"


def test_siblings_match_whole_runs(ex: StepExecutor) -> None:
    prefix = ("import sympy as sp\nx = sp.symbols('x')\ncount = [0]\ncount[0] += 1\n"
              "open('state.txt', 'w').write('p')\n")
    steps = [
        "print(sp.solve(x - 3, x))",
        "count[0] += 10\nprint(count[0])",  # each step sees the prefix's state once
        "print(open('state.txt').read())\nopen('state.txt', 'w').write('mutated')",
        "print(open('state.txt').read())",  # not the previous sibling's write
        "1/0",
        "undefined_name",
        "    indented = 1",  # not valid after the prefix: a syntax error, as run whole
        "",
        "print(1)\nprint(2)",
    ]
    sib = ex.run_siblings(prefix, steps)
    whole = ex.run_many([prefix + s for s in steps])
    assert [(r.ok, r.output, r.error) for r in sib] == [(r.ok, r.output, r.error) for r in whole]
    assert sib[1].output == "11" and sib[3].output == "p"


def test_siblings_share_one_prefix_run(ex: StepExecutor) -> None:
    skip_unless_sandboxed(ex)
    # Every step continues from the same prefix process: a random draw made by the prefix
    # is the same in all of them (a prefix re-run per step would draw anew each time).
    rs = ex.run_siblings("import random\nr = random.random()\n", ["print(r)"] * 4)
    assert all(r.ok for r in rs) and len({r.output for r in rs}) == 1, rs


def test_workers_zero_means_one_per_core() -> None:
    with StepExecutor(workers=0, timeout_s=TIMEOUT) as e:
        assert e.workers == len(os.sched_getaffinity(0))


def test_siblings_prefix_failure_and_continuation(ex: StepExecutor) -> None:
    rs = ex.run_siblings("x = 1\n1/0\n", ["print(x)", "print(2)"])
    assert all(r.output == "ZeroDivisionError: division by zero" for r in rs)
    # A step that continues the prefix's last block: run whole instead.
    rs = ex.run_siblings("total = 0\nfor i in range(3):\n    total += i\n",
                         ["    total += 100\nprint(total)", "print(total)"])
    assert [r.output for r in rs] == ["303", "3"]
    rs = ex.run_siblings("while True:\n    pass\n", ["print(1)", "print(2)"])
    assert all(r.timed_out and not r.ok for r in rs)
    # the reference's timeout text, which the step's output then shows
    assert rs[0].output == f"TimeoutError: 'Execution of the code snippet has timed out for exceeding {TIMEOUT:g} seconds.'"
    assert_healthy(ex)


async def test_async_api(ex: StepExecutor) -> None:
    r = await ex.arun("print(1+1)")
    assert r.output == "2"
    rs = await asyncio.gather(*(ex.arun_siblings(f"k = {k}\n", ["print(k)", "print(k*2)"])
                                for k in range(4)))
    assert [[r.output for r in b] for b in rs] == [[str(k), str(2 * k)] for k in range(4)]


HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "alarm_disarmed": ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                       "signal.alarm(0)\nwhile True:\n    pass"),
    "signals_ignored_setsid_threads": (
        "import os, signal, threading\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
        "if os.fork() == 0:\n    os.setsid()\n    while True: pass\n"
        "while True:\n    pass"),
    "memory_bomb": "x = bytearray(8 * 1024**3)",
    "memory_growth": "a = []\nwhile True:\n    a.append(' ' * 10**7)",
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n"
                  "    except OSError:\n        pass"),
    "print_flood": "while True:\n    print('x' * 1000)",
    "write_flood": "import os\nwhile True:\n    os.write(1, b'x' * 65536)",
    "stderr_flood": "import os\nwhile True:\n    os.write(2, b'x' * 65536)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "deep_recursion": "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)",
    "input": "x = input()\nprint(x)",
    "raise_limits": ("import resource\n"
                     "resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)"),
    "kill_everything": "import os, signal\nfor p in range(1, 5000):\n    try: os.kill(p, 9)\n    except OSError: pass\nwhile True: pass",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_snippet(ex: StepExecutor, name: str) -> None:
    t0 = time.monotonic()
    r = ex.run(HOSTILE[name])
    assert time.monotonic() - t0 < TIMEOUT + SLACK, r
    assert not r.ok and r.error, r
    assert "\n" not in r.error
    assert_healthy(ex)


def test_hostile_as_sibling(ex: StepExecutor) -> None:
    rs = ex.run_siblings("import os\n", [HOSTILE["fork_bomb"], HOSTILE["write_flood"],
                                         "print(1)", HOSTILE["segfault"]])
    assert [r.ok for r in rs] == [False, False, True, False]
    assert rs[2].output == "1"
    assert_healthy(ex)


def test_environment_is_scrubbed(ex: StepExecutor) -> None:
    r = ex.run("import os\nprint(sorted(os.environ.items()))")
    assert r.ok and "s3cret" not in r.output and "RSTAR_EXECUTOR_TEST_SECRET" not in r.output


def test_no_network(ex: StepExecutor) -> None:
    skip_unless_sandboxed(ex)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    r = ex.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
               "s.sendall(b'hi')\nprint('connected')")
    assert not r.ok and "connected" not in r.output
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()


def test_no_writes_outside_cwd(ex: StepExecutor, tmp_path: Path) -> None:
    skip_unless_sandboxed(ex)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    repo_probe = Path(__file__).resolve().parent / "_executor_probe.txt"
    codes = [
        f"open({str(repo_probe)!r}, 'w').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.remove({str(Path(__file__).resolve())!r})",
        "open('/dev/shm/rstar_probe', 'w').write('x')",
        # Try to undo the read-only mounts first.
        ("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
         "libc.mount(None, b'/', None, 32 | 4096, None)\n"
         "os.system('mount -o remount,rw / 2>/dev/null')\n"
         f"open({str(repo_probe)!r}, 'w').write('x')"),
    ]
    for r in ex.run_many(codes):
        assert not r.ok, r
    assert victim.read_text() == "keep"
    assert Path(__file__).exists() and not repo_probe.exists()
    assert not Path("/dev/shm/rstar_probe").exists()
    r = ex.run("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())")
    assert r.ok and r.output == "ok"


def test_daemon_does_not_outlive_snippet(ex: StepExecutor) -> None:
    marker = "31.41592"
    r = ex.run("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
               "print('parent done')")
    assert r.ok and r.output == "parent done", r
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_close_leaves_nothing_running() -> None:
    e = StepExecutor(workers=2, timeout_s=5.0)
    pids = [w.proc.pid for w in e._all]
    fut = e._submit(e._run_one("while True: pass"))
    time.sleep(0.3)
    e.close()
    with pytest.raises(ExecutorClosedError):
        fut.result(10)
    time.sleep(0.3)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(ExecutorClosedError):
        e.run("print(1)")


def test_close_right_after_a_worker_died_leaves_no_replacement_behind() -> None:
    e = StepExecutor(workers=1, timeout_s=5.0)
    worker = light_worker(e)
    os.kill(worker.proc.pid, signal.SIGKILL)
    for _ in range(200):  # a replacement starts as soon as the loss is seen
        if e._replacing:
            break
        time.sleep(0.01)
    assert e._replacing
    e.close()  # cancels the replacement instead of leaving it pending on a stopped loop
    assert not e._replacing and not e._all


def test_result_type(ex: StepExecutor) -> None:
    r = ex.run("print(1)")
    assert isinstance(r, ExecResult) and r.seconds > 0 and not r.timed_out and r.error is None


# A reply frame as the zygote writes it, for snippets that try to forge one.
FORGED_REPLY = ("import json, os\n"
                "d = json.dumps({'t': 'reply', 'results': [{'ok': True, 'output': 'FORGED', "
                "'error': None, 'timed_out': False, 'seconds': 0}]}).encode()\n"
                "frame = len(d).to_bytes(4, 'big') + d\n")


def test_snippet_cannot_reach_the_zygote() -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        # Every process the snippet can see, other than itself: its fds and memory are closed
        # to it (the zygote's stdout is where replies go).
        r = e.run("import os\nme = str(os.getpid())\nreached = []\n"
                  "for p in os.listdir('/proc'):\n"
                  "    if not p.isdigit() or p == me:\n        continue\n"
                  "    for path, mode in (('fd/1', os.O_WRONLY), ('mem', os.O_RDWR), "
                  "('environ', os.O_RDONLY)):\n"
                  "        try:\n            os.close(os.open(f'/proc/{p}/{path}', mode))\n"
                  "            reached.append(f'{p}/{path}')\n"
                  "        except OSError:\n            pass\n"
                  "print(reached)")
        assert r.ok and r.output == "[]", r
        forge = FORGED_REPLY + (
            "for p in os.listdir('/proc'):\n"
            "    try:\n        fd = os.open(f'/proc/{p}/fd/1', os.O_WRONLY)\n"
            "        os.write(fd, frame)\n    except OSError:\n        pass\n"
            "print('job A')")
        assert e.run(forge).output == "job A"
        assert [e.run(f"print('{c}')").output for c in "BC"] == ["B", "C"]


def test_snippets_have_no_capabilities(ex: StepExecutor) -> None:
    skip_unless_sandboxed(ex)
    r = ex.run("print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')])")
    assert r.ok and r.output == str(["0000000000000000"] * 5), r


MOUNT = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def test_mounts_do_not_outlive_the_snippet(tmp_path: Path) -> None:
    import statistics

    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        wd = e._work_dir
        attempts = [
            # Cover a stdlib module with one that lies.
            "open('evil.py', 'w').write('def mean(xs):\\n    return 42\\n')\n"
            "print(libc.mount(os.path.abspath('evil.py').encode(), "
            f"{statistics.__file__!r}.encode(), None, 4096, None))",
            f"print(libc.umount2({wd!r}.encode(), 2))",  # take the working directory away
            "print(libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None))",
            "os.chmod('.', 0)\nprint(libc.mount(b'tmpfs', b'.', b'tmpfs', 0, None))",
        ]
        for code in attempts:
            r = e.run(MOUNT + code)
            assert r.ok and r.output == "-1", (code, r)
        r = e.run("import statistics, os\nopen('a.txt', 'w').write('x')\n"
                  "print(statistics.mean([1, 2, 3]), os.listdir('.'))")
        assert r.ok and r.output == "2 ['a.txt']", r
        assert_healthy(e)


def test_signals_a_snippet_sends_itself_take_effect(ex: StepExecutor) -> None:
    codes = {
        "import os\nos.kill(os.getpid(), 9)\nprint('alive')": "killed by signal SIGKILL",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nprint('alive')":
            "killed by signal SIGTERM",
        "import signal, time\nsignal.alarm(1)\ntime.sleep(3)\nprint('alive')":
            "killed by signal SIGALRM",
        "import os\nos.abort()": "killed by signal SIGABRT",
    }
    for code, want in codes.items():
        r = ex.run(code)
        assert (r.ok, r.error) == (False, want), (code, r)
        (s,) = ex.run_siblings("import os, signal\n", [code])
        assert (s.ok, s.error) == (False, want), (code, s)


def test_close_ends_every_pending_call() -> None:
    import threading

    e = StepExecutor(workers=1, timeout_s=5.0)
    got: list[BaseException | ExecResult] = []

    def call() -> None:
        try:
            got.append(e.run("import time\ntime.sleep(1)"))
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]  # one runs, two wait
    for t in threads:
        t.start()

    async def waiting() -> list:
        return await asyncio.gather(*(e.arun("print(1)") for _ in range(2)),
                                    return_exceptions=True)

    waiter = threading.Thread(target=lambda: got.extend(asyncio.run(waiting())))
    waiter.start()
    time.sleep(0.3)
    e.close()
    for t in threads + [waiter]:
        t.join(10)
        assert not t.is_alive()
    assert len(got) == 5 and all(isinstance(g, ExecutorClosedError) for g in got), got


def test_each_statement_runs_once(ex: StepExecutor) -> None:
    r = ex.run("vals = iter(['n/a', '5'])\nint(next(vals))\nprint('done')")
    assert r.error == "ValueError: invalid literal for int() with base 10: 'n/a'", r
    r = ex.run("import time\ntime.sleep(0.9) or 1/0\nprint('x')")  # twice: past the deadline
    assert r.error == "ZeroDivisionError: division by zero", r
    r = ex.run("calls = []\ndef f():\n    calls.append(1)\n    raise KeyError(len(calls))\nf()")
    assert r.error == "KeyError: 1", r


def light_worker(e: StepExecutor) -> pool._Worker:
    """The worker (of workers=1) that runs snippets importing only standard modules."""
    (w,) = [w for w in e._all if w.tier == "light"]
    return w


def zygote_pid(e: StepExecutor) -> int:
    skip_unless_sandboxed(e)
    w = light_worker(e)
    with open(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children") as f:
        return int(f.read().split()[0])


def test_a_dying_worker_is_replaced_and_the_job_retried() -> None:
    import threading

    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        os.kill(zygote_pid(e), signal.SIGKILL)  # from outside, while idle: the OOM killer
        time.sleep(0.3)
        r = e.run("print('innocent')")
        assert r.ok and r.output == "innocent", r
        # Killed while a job too large for the pipe is being written to it.
        z = zygote_pid(e)
        os.kill(z, signal.SIGSTOP)
        got: list = []
        big = "s = '" + "a" * (1 << 20) + "'\nprint(len(s))"
        t = threading.Thread(target=lambda: got.append(e.run(big)))
        t.start()
        time.sleep(0.5)
        os.kill(z, signal.SIGKILL)
        t.join(30)
        assert got and got[0].ok and got[0].output == str(1 << 20), got
        assert_healthy(e)


def test_deep_directories_are_cleaned_up(ex: StepExecutor) -> None:
    deep = "import os\nfor i in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
    assert ex.run(deep).output == "deep"
    assert ex.run("import os\nprint(os.listdir('.'))").output == "[]"
    rs = ex.run_siblings("import os\n", [deep, "print(os.listdir('.'))"])
    assert [r.output for r in rs] == ["deep", "[]"], rs
    assert_healthy(ex)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/etc/shadow"), reason="needs root")
def test_snippets_cannot_read_what_only_root_may(ex: StepExecutor) -> None:
    skip_unless_sandboxed(ex)
    r = ex.run("print(open('/etc/shadow').read()[:10])")
    if any(m.startswith("unprivileged user") for m in ex.sandbox_missing):
        return  # said so (and warned): snippets run as root here
    assert not r.ok and r.output.startswith("PermissionError"), r


def test_error_text_is_cut_and_error_is_one_line(ex: StepExecutor) -> None:
    long = "x" * 5000
    for r in (ex.run(f"raise ValueError('{long}')"),
              ex.run_siblings("y = 1\n", [f"raise ValueError('{long}')"])[0]):
        want = ("ValueError: " + long)[:512] + "..." + long[-512:]  # as outputs are cut
        assert (r.ok, r.output, r.error) == (False, want, want), r
    for r in (ex.run("raise ValueError('a\\nb')"),
              ex.run_siblings("y = 1\n", ["raise ValueError('a\\nb')"])[0]):
        # The output is what the reference shows; the error field stays on one line.
        assert (r.output, r.error) == ("ValueError: a\nb", "ValueError: a\\nb"), r
    r = ex.run("raise ValueError('a\\x0bb\\x1cc\\u2028d')")  # other line breaks of splitlines()
    assert r.error == "ValueError: a\\x0bb\\x1cc\\u2028d" and len(r.error.splitlines()) == 1, r


def assert_siblings_run_as_whole(e: StepExecutor, prefix: str, steps: list[str]) -> None:
    sib = e.run_siblings(prefix, steps)
    whole = e.run_many([prefix + s for s in steps])
    assert [(r.ok, r.output, r.error) for r in sib] == \
        [(r.ok, r.output, r.error) for r in whole], (prefix, steps, sib, whole)


def test_siblings_run_as_whole_at_the_seams(ex: StepExecutor) -> None:
    # With several prints the reference runs nothing after the last one: nor does the batch,
    # unless a step adds a print after it.
    assert_siblings_run_as_whole(ex, "print(1)\nprint(2)\nwhile True: pass\n", ["z = 1"])
    assert_siblings_run_as_whole(ex, "print(1)\nprint(2)\nn = [0]\nn[0] += 1\n",
                                 ["z = 1", "print(n)", "n[0] += 5\nprint(n)", "z = 2"])
    # Open files and files with modes: every step would share them; each runs whole.
    assert_siblings_run_as_whole(ex, "f = open('log.txt', 'w')\nf.write('a')\n",
                                 ["f.write('b')\nf.close()\nprint(open('log.txt').read())"] * 3)
    assert_siblings_run_as_whole(ex, "import os\nopen('s.sh', 'w').write('x')\n"
                                     "os.chmod('s.sh', 0o755)\n",
                                 ["print(os.access('s.sh', os.X_OK))"] * 2)
    # The step is appended as it is: it may continue the prefix's last line.
    assert_siblings_run_as_whole(ex, "x = 1", ["0\nprint(x)", "\nprint(x)", "; print(x + 1)"])


def test_plain_siblings_run_as_whole_at_the_seams() -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT, style="plain") as e:
        assert_siblings_run_as_whole(e, "if False:\n", ["print('hi')", "    print('hi')"])
        assert_siblings_run_as_whole(e, "x = 5\ndef f():\n", ["print(x)"])
        assert_siblings_run_as_whole(e, "x = 1", ["0\nprint(x)", "\nprint(x)"])


def test_an_exception_whose_str_raises_is_the_snippets_error(ex: StepExecutor) -> None:
    raises = "class E(Exception):\n    def __str__(self):\n        raise {}\nraise E()"
    r = ex.run(raises.format("RuntimeError('inner')"))
    assert r.error == "RuntimeError: inner", r  # what the reference shows
    r = ex.run(raises.format("SystemExit(7)"))
    assert r.error == "E: <exception str() failed>", r


def run_script(code: str) -> str:
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_retired_workers_leave_no_zombies() -> None:
    # A subreaper (as a container's main process is PID 1) inherits the zygotes of killed
    # workers: they must be reaped, not left as zombies.
    out = run_script(
        "import ctypes, os, time\nctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
        "from rstar_fast import StepExecutor\n"
        "e = StepExecutor(workers=1, timeout_s=5)\n"
        "(w,) = [w for w in e._all if w.tier == 'light']\ne._loop.call_soon_threadsafe(w._stop, 'lost')\n"
        "print(e.run('print(1)').output)\n"  # retires (kills) the worker
        "e.close()\ntime.sleep(0.5)\n"
        "kids = []\nfor t in os.listdir('/proc/self/task'):\n"
        "    kids += open(f'/proc/self/task/{t}/children').read().split()\n"
        "print([open(f'/proc/{k}/stat').read().split()[2] for k in kids])")
    assert out == "1\n[]", out


@pytest.mark.skipif(not os.access("/sys/fs/cgroup/pids", os.W_OK), reason="no pids cgroup")
def test_cgroups_are_removed_without_close() -> None:
    base = Path("/sys/fs/cgroup/pids")
    gone = subprocess.Popen(["true"])  # a pid that is surely not running any more
    gone.wait()
    stale = base / f"rstar_fast_{gone.pid}_1"
    stale.mkdir(exist_ok=True)
    try:
        pid = run_script("import os\nfrom rstar_fast import StepExecutor\n"
                         "e = StepExecutor(workers=2, timeout_s=5)\n"
                         "assert e.run('print(1)').ok\nprint(os.getpid())")  # no close()
        assert not list(base.glob(f"rstar_fast_{pid}_*"))
        assert not stale.exists()  # a dead process's, removed by the next executor
    finally:
        if stale.exists():
            stale.rmdir()


def test_snippets_cannot_read_the_users_files(ex: StepExecutor, tmp_path: Path) -> None:
    if not ex.sandboxed:
        pytest.skip("no namespaces")
    answers = tmp_path / "answers.json"  # under /tmp, readable by anyone
    answers.write_text('{"answer": 42}')
    answers.chmod(0o644)
    tmp_path.chmod(0o755)
    r = ex.run(f"print(open({str(answers)!r}).read())")
    assert not r.ok and "FileNotFoundError" in r.error, r
    # what the interpreter needs stays: heavy imports, and a working directory to write in
    r = ex.run("import sympy, numpy\nopen('f', 'w').write('x')\nprint(sympy.solve('x**2 - 4'))")
    assert r.ok and r.output == "[-2, 2]", r


def test_a_checkout_on_sys_path_shows_only_its_packages(ex: StepExecutor, tmp_path: Path) -> None:
    """An editable install puts its checkout on sys.path; the runs written into the checkout
    (`--out runs/r1`) stay hidden, its packages importable."""
    from rstar_fast.executor._worker import importable_parts

    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "runs").mkdir()
    assert importable_parts(str(tmp_path)) == [str(tmp_path / "mypkg")]
    assert importable_parts(str(tmp_path / "runs")) == [str(tmp_path / "runs")]  # no checkout: whole
    import rstar_fast

    root = Path(rstar_fast.__file__).resolve().parents[1]
    if not ex.sandboxed or not (root / "pyproject.toml").exists():
        pytest.skip("no namespaces, or not installed from a checkout")
    r = ex.run(f"import os\nprint(os.path.exists({str(root / 'pyproject.toml')!r}), "
               f"os.path.isdir({str(root / 'rstar_fast')!r}))")
    assert r.output == "False True", r


def test_a_checkout_outside_the_hidden_dirs_is_covered_too() -> None:
    """A clone in a folder that is not covered (/var/ci/repo: /var is the system's) is covered in
    place, its packages and a venv inside it bound back; one under /tmp is covered with /tmp;
    one in or above the system's Python, / included, is left open."""
    from rstar_fast.executor._worker import cover_plan

    plan = cover_plan(["/usr/lib/python3.11", "/var/ci/repo/.venv/lib/python3.11/site-packages",
                       "/var/ci/repo/.venv", "/var/ci/repo/mypkg", "/tmp/co/pkg"],
                      ["/var/ci/repo", "/var/ci/repo/sub", "/tmp/co", "/usr/lib", "/"], ["/usr"])
    assert "/usr/local" not in cover_plan([], ["/usr/local"], ["/usr/local/python"])
    assert sorted(plan["/var/ci/repo"]) == ["/var/ci/repo/.venv", "/var/ci/repo/mypkg"]
    assert "/var/ci/repo/sub" not in plan  # under a covered checkout: covered with it
    assert "/tmp/co" not in plan and "/tmp/co/pkg" in plan["/tmp"]
    assert "/usr/lib" not in plan and "/" not in plan


def test_a_work_dir_taken_for_abandoned_before_it_is_locked_is_replaced(monkeypatch) -> None:
    """Another process's clean-up may lock a new work dir before its executor does (and remove
    it): the executor makes another, and holds its lock."""
    from rstar_fast.files import try_lock

    taken: list[Path] = []

    def beaten_once(path: Path):
        if not taken:
            taken.append(path)
            return None
        return try_lock(path)

    monkeypatch.setattr(pool, "hold_lock", beaten_once)
    path, fd = pool._locked_work_dir()
    try:
        assert Path(path) != taken[0].parent and try_lock(Path(path) / ".lock") is None
    finally:
        os.close(fd)
        shutil.rmtree(path)
        shutil.rmtree(taken[0].parent)


def test_the_work_dirs_of_killed_executors_are_removed_by_the_next_one(tmp_path: Path) -> None:
    """SIGKILL leaves an executor's work dir behind: the next process's first executor removes
    those whose lock nobody holds, and leaves a live one's (and anything not an executor's)."""
    from rstar_fast.files import try_lock

    dead, live, other = (tmp_path / f"rstar-exec-{name}" for name in ("dead", "live", "other"))
    for d in (dead, live, other):
        d.mkdir()
    (dead / ".lock").touch()
    (dead / "left").mkdir()
    held = try_lock(live / ".lock")
    try:
        env = dict(os.environ, TMPDIR=str(tmp_path))
        subprocess.run([sys.executable, "-c", "from rstar_fast import StepExecutor\nStepExecutor(workers=1).close()"],
                       env=env, check=True, timeout=120)
        assert not dead.exists() and live.is_dir() and other.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rstar-exec-live", "rstar-exec-other"]  # its own went
    finally:
        os.close(held)


def test_another_users_work_dir_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a shared /tmp another user's work dir (mode 700) cannot be looked into: an executor
    starts all the same."""
    (tmp_path / "rstar-exec-theirs").mkdir()

    def refused(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", refused)
    pool._remove_stale_work_dirs(tmp_path)
    assert (tmp_path / "rstar-exec-theirs").is_dir()


MEMORY_CGROUP = Path("/sys/fs/cgroup/memory") if Path("/sys/fs/cgroup/pids").exists() else Path("/sys/fs/cgroup")


@pytest.mark.skipif(not os.access(MEMORY_CGROUP, os.W_OK), reason="no memory cgroup")
def test_memory_is_capped_for_all_the_processes_of_a_snippet() -> None:
    # Each child stays under memory_mb; together they pass what a worker may hold
    # (2 x memory_mb + 1 GiB): the kernel kills some of them, and the host is spared. Each
    # child holds its memory until every other one holds its own or has died (on loaded cores
    # the first could otherwise be gone before the last begins).
    hog = textwrap.dedent("""
        import os, time
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        kids = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                os.close(go_w)
                b = bytearray(200 << 20)
                for i in range(0, len(b), 4096):
                    b[i] = 1
                os.write(ready_w, b"x")
                os.read(go_r, 1)
                os._exit(0)
            kids.append(pid)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        ready, ended, deadline = 0, {}, time.monotonic() + 15
        while ready + len(ended) < 8 and time.monotonic() < deadline:
            try:
                ready += len(os.read(ready_r, 8))
            except BlockingIOError:
                pass
            for p in kids:
                if p not in ended:
                    done, status = os.waitpid(p, os.WNOHANG)
                    if done:
                        ended[p] = status
            time.sleep(0.05)
        os.close(go_w)
        for p in kids:
            if p not in ended:
                ended[p] = os.waitpid(p, 0)[1]
        print(sum(os.waitstatus_to_exitcode(s) == 0 for s in ended.values()))
    """)
    with StepExecutor(workers=1, timeout_s=20, memory_mb=256) as e:
        if not any("memory" in c for w in e._all for c in w.cgroups):
            pytest.skip("the memory cgroup could not be made")
        r = e.run(hog)
        assert r.ok and int(r.output) < 8, r
        assert_healthy(e)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/capsh").exists(), reason="needs root and capsh")
def test_root_without_cap_sys_admin_falls_back_to_limits() -> None:
    # a plain Docker root: the mount tricks for a Python under /root are refused, and the
    # executor must still start (with resource limits only) instead of dying
    script = "from rstar_fast import StepExecutor\ne = StepExecutor(workers=1, timeout_s=5)\nprint(e.run('print(6*7)').output)\ne.close()"
    out = subprocess.run(["/usr/sbin/capsh", "--drop=cap_sys_admin", "--", "-c", f"{sys.executable} -c \"$0\"", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr[-2000:]


def test_a_worker_found_dead_when_taken_is_replaced() -> None:
    # a worker can die just after its reply, while its call still holds it: the next call
    # that takes it from the idle queue replaces it, and the pool keeps its size
    with StepExecutor(workers=1, timeout_s=5) as ex:
        w = light_worker(ex)
        ex._loop.call_soon_threadsafe(w._stop, "died after its reply")
        assert ex.run("print(1)").output == "1"
        new = light_worker(ex)
        assert new is not w and w.killed and len(ex._all) == 2
        w.kill()  # a second kill does nothing (its pid may be another process's by now)


def test_a_tier_whose_workers_cannot_be_restarted_fails_its_calls_and_recovers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS refusing new processes or fds (an OSError from Popen) while a tier has no worker
    left: its calls fail with the reason instead of waiting for good, and the pool keeps
    trying, so that calls work again once a worker starts."""
    import glob
    import subprocess
    import types

    from rstar_fast.executor import pool

    class Refused(types.SimpleNamespace):
        def Popen(self, *args, **kwargs):  # noqa: N802
            raise OSError(24, "Too many open files")

    def own_cgroups() -> list[str]:
        return [p for pattern in ("/sys/fs/cgroup/rstar_fast_{}_*", "/sys/fs/cgroup/*/rstar_fast_{}_*")
                for p in glob.glob(pattern.format(os.getpid()))]

    with StepExecutor(workers=1, timeout_s=5) as ex:
        before = len(own_cgroups())  # this executor's workers' and any other executor's here
        monkeypatch.setattr(pool, "subprocess", Refused(PIPE=subprocess.PIPE, DEVNULL=subprocess.DEVNULL))
        w = light_worker(ex)
        ex._loop.call_soon_threadsafe(w._stop, "killed")
        with concurrent.futures.ThreadPoolExecutor(1) as caller:  # a regression hangs: bound it
            waiting = caller.submit(ex.run, "print(1)")
            with pytest.raises(pool.WorkerStartError, match="Too many open files"):
                waiting.result(timeout=30)
        # where cgroups are made (root), a start that failed leaves none behind
        assert len(own_cgroups()) <= before
        monkeypatch.setattr(pool, "subprocess", subprocess)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert ex.run("print(1)").output == "1"
                break
            except pool.WorkerStartError:
                assert time.monotonic() < deadline
                time.sleep(0.5)


def test_an_executor_dropped_without_close_is_closed() -> None:
    """Nothing but the caller holds it: dropping it ends its workers and its I/O thread."""
    import gc
    import weakref

    ex = StepExecutor(workers=1, timeout_s=5)
    assert ex.run("print(6 * 7)").output == "42"
    procs, thread, ref = [w.proc for w in ex._all], ex._thread, weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None
    thread.join(30)
    assert not thread.is_alive() and all(p.wait(timeout=30) is not None for p in procs)


def test_bad_arguments_are_refused_before_anything_is_sent(ex: StepExecutor) -> None:
    calls = [
        (lambda: ex.run(b"print(1)"), "run: code must be str, not bytes"),
        (lambda: ex.run_many("print(1)"), "run_many: codes must be a sequence of str, not str"),
        (lambda: ex.run_many(["print(1)", 2]), r"run_many: codes\[1\] must be str, not int"),
        (lambda: ex.run_siblings("x = 1\n", "ab"), "run_siblings: steps must be a sequence"),
        (lambda: ex.run_siblings(b"x = 1\n", ["print(x)"]), "run_siblings: prefix must be str"),
        (lambda: asyncio.run(ex.arun(None)), "arun: code must be str, not NoneType"),
        (lambda: asyncio.run(ex.arun_siblings("", [3])), r"arun_siblings: steps\[0\] must"),
        (lambda: asyncio.run(ex.arun_many([b"1"])), r"arun_many: codes\[0\] must be str"),
    ]
    for _ in range(ex.workers + 1):  # more bad calls than workers: none may cost one
        for call, msg in calls:
            with pytest.raises(TypeError, match=msg):
                call()
    assert_healthy(ex)


def test_an_unexpected_error_in_a_call_costs_no_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        for _ in range(2):  # past the public checks: encoding the request fails
            with pytest.raises(TypeError):
                e._submit(e._run_one(b"print(1)")).result(10)  # type: ignore[arg-type]
        w = light_worker(e)

        async def broken(data: bytes | None, timeout: float) -> dict:
            raise RuntimeError("broken")

        monkeypatch.setattr(w, "call", broken)
        with pytest.raises(RuntimeError, match="broken"):
            e.run("print(1)")
        assert e._submit(e._run_one("print(2)")).result(30).output == "2"  # a replacement
        assert w.killed


@pytest.mark.parametrize("kw", [
    {"timeout_s": float("nan")}, {"timeout_s": float("inf")}, {"timeout_s": 1e7},
    {"timeout_s": 0}, {"memory_mb": -1}, {"memory_mb": 0}, {"workers": -3},
    {"output_limit_bytes": 0}, {"output_limit_bytes": -5}, {"max_output_chars": 1},
    {"file_mb": 0}, {"max_processes": 0},
])
def test_bad_numbers_are_refused(kw: dict) -> None:
    (name,) = kw
    with pytest.raises(ValueError, match=f"StepExecutor: {name} must be"):
        StepExecutor(**kw)


@pytest.mark.parametrize("kw", [{"timeout_s": "10"}, {"timeout_s": True}, {"memory_mb": 2048.5},
                                {"workers": "2"}, {"preload": "numpy"}])
def test_bad_types_are_refused(kw: dict) -> None:
    (name,) = kw
    with pytest.raises(TypeError, match=f"{name} must be"):
        StepExecutor(**kw)


def test_a_worker_error_replaces_the_worker_and_is_not_retried(ex: StepExecutor) -> None:
    pids = {w.proc.pid for w in ex._all}
    # past the public checks: the zygote fails on a step that is not a str, and says so
    (r,) = ex._submit(ex._run_siblings("x = 1\n", [5])).result(30)  # type: ignore[list-item]
    assert not r.ok and r.error.startswith("worker error: TypeError"), r
    # that one zygote (and no other: no retry) goes; a fresh one takes its place
    assert len(pids - {w.proc.pid for w in ex._all}) == 1
    assert_healthy(ex)


def test_a_forged_result_frame_is_refused_without_leaking() -> None:
    # JSON nested past the recursion limit, written where the result goes
    forged = ("import os, struct\nd = b'[' * 200000\n"
              "os.write(3, struct.pack('>I', len(d)) + d)\nos._exit(0)\n")
    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        zygote = zygote_pid(e)
        before = len(os.listdir(f"/proc/{zygote}/fd"))
        for _ in range(5):
            r = e.run(forged)
            assert not r.ok and r.error == "killed: malformed result from snippet", r
        assert zygote_pid(e) == zygote and len(os.listdir(f"/proc/{zygote}/fd")) == before
        assert_healthy(e)


def test_lone_surrogates_in_output_become_escapes(ex: StepExecutor) -> None:
    r = ex.run("print(chr(0xd800) + 'x')")
    assert r.ok and r.output == "\\ud800x", r
    r.output.encode("utf-8")


def test_numpy_draws_differ_between_snippets_and_siblings(ex: StepExecutor) -> None:
    draw = "import numpy as np\nprint(np.random.random())"
    assert len({r.output for r in ex.run_many([draw] * 4)}) == 4
    rs = ex.run_siblings("import numpy as np\n", ["print(np.random.random())"] * 3)
    assert all(r.ok for r in rs) and len({r.output for r in rs}) == 3, rs


def test_crashed_tells_a_killed_or_exited_snippet_from_one_that_raised(ex: StepExecutor) -> None:
    crashed = ["import os\nos._exit(3)", "import sys\nsys.exit(2)", "import os, signal\nos.kill(os.getpid(), 11)",
               "import os\nos.write(1, b'a' * 3_000_000)"]  # killed at output_limit_bytes
    for r in ex.run_many(crashed):
        assert not r.ok and r.crashed and "error" not in r.output.lower(), r
    for r in ex.run_many(["x = 1 / 0", "raise StopIteration", "print(1)"]):
        assert not r.crashed, r
    rs = ex.run_siblings("x = 1\n", ["import os\nos._exit(3)", "print(x)"])
    assert [r.crashed for r in rs] == [True, False], rs


def test_a_sibling_times_out_when_a_later_piece_of_its_prefix_uses_up_the_time() -> None:
    """The prefix runs in pieces (one per print); the deadline counts them all, as run whole."""
    prefix = "print(1)\nprint(2)\nimport time\ntime.sleep(1.5)\n"
    with StepExecutor(workers=1, timeout_s=1) as ex:
        (sibling,) = ex.run_siblings(prefix, ["print(3)"])
        whole = ex.run(prefix + "print(3)")
    assert whole.timed_out and sibling.timed_out and (sibling.ok, sibling.output) == (whole.ok, whole.output)


def test_a_set_prints_in_one_order_on_every_worker(ex: StepExecutor) -> None:
    program = "print(list({'apple', 'pear', 'fig', 'plum', 'kiwi', 'lime', 'date'}))"
    assert len({r.output for r in ex.run_many([program] * 8)}) == 1
    with StepExecutor(workers=1, timeout_s=5) as other:  # other zygotes, in another run
        assert other.run(program).output == ex.run(program).output


def test_siblings_continue_the_draws_of_a_seeded_prefix(ex: StepExecutor) -> None:
    """A seed set (or a draw made) by the prefix carries on into each step, as in the whole
    program; an unseeded prefix leaves each step its own draws."""
    for prefix in ("import random\nrandom.seed(42)\n", "import numpy as np\nnp.random.seed(42)\n",
                   "import random\nrandom.seed(7)\nrandom.random()\n"):
        step = "print(random.random())" if "np." not in prefix else "print(np.random.random())"
        whole = ex.run(prefix + step)
        rs = ex.run_siblings(prefix, [step] * 3)
        assert whole.ok and [r.output for r in rs] == [whole.output] * 3, (prefix, whole, rs)
    rs = ex.run_siblings("import random\n", ["print(random.random())"] * 3)
    assert all(r.ok for r in rs) and len({r.output for r in rs}) == 3, rs


def test_a_prefix_that_shares_memory_or_moves_stdout_runs_steps_whole(ex: StepExecutor) -> None:
    # a shared mapping is the same pages in every fork: each step must see only its own writes
    assert_siblings_run_as_whole(ex, "import mmap\nm = mmap.mmap(-1, 4096)\n",
                                 ["m[0] += 1\nprint(m[0])"] * 3)
    # stdout pointed at /dev/null by the prefix stays there for the step, as run whole
    assert_siblings_run_as_whole(ex, "import os\nos.dup2(0, 1)\n",
                                 ["os.write(1, b'x' * 3_000_000)\nprint(1)", "print(2)"])


def test_a_step_that_lowers_or_stops_the_prefix_process_does_not_touch_its_siblings(
        ex: StepExecutor) -> None:
    prefix = "import os, resource, signal\n"
    lower = ("resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (8, 8))\n"
             "print('lowered')")
    use = "fs = [open('/dev/null') for _ in range(20)]\nprint(len(fs))"
    assert_siblings_run_as_whole(ex, prefix, [lower, use, use])
    # (run whole, its parent is outside its pid namespace: it stops its own group)
    stop = "os.kill(os.getppid(), signal.SIGSTOP)\nprint(1)"
    assert_siblings_run_as_whole(ex, prefix, [stop, "print(2)", "print(3)"])
    assert_healthy(ex)


def test_a_prefix_writing_frames_of_its_own_cannot_hold_the_worker() -> None:
    keepalive = ("import json, os, struct, time\nd = json.dumps({'t': 'keepalive'}).encode()\n"
                 "while True:\n    os.write(3, struct.pack('>I', len(d)) + d)\n    time.sleep(0.2)\n")
    with StepExecutor(workers=1, timeout_s=1.0) as e:
        t = time.monotonic()
        rs = e.run_siblings(keepalive, ["print(1)", "print(2)"])
        assert time.monotonic() - t < 15, "held past (steps + 1) x timeout + 5 s"
        assert all(r.timed_out for r in rs), rs


def test_a_busy_worker_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys\nfrom rstar_fast import StepExecutor\n"
        "e = StepExecutor(workers=1, timeout_s=60)\n"
        "print(' '.join(str(w.proc.pid) for w in e._all), flush=True)\n"
        "e.run('while True: pass')\n")
    # killed, the owner leaves its executor's empty work folder in its TMPDIR
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        workers = [int(p) for p in owner.stdout.readline().split()]  # type: ignore[union-attr]
        assert workers
        time.sleep(1.0)  # the snippet is running
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [p for p in workers if Path(f"/proc/{p}").exists()
                 and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
        assert not alive, f"workers {alive} outlived their executor's process"
    finally:
        owner.kill()


IPC = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "rt = ctypes.CDLL('librt.so.1', use_errno=True)\n"
       "m = ctypes.create_string_buffer(b'\\1' + b'\\0' * 7 + b'hi', 16)\n")
IPC_WRITE = ("q = libc.msgget(0x5eed, 0o1666)\n"
             "print(q >= 0, libc.msgsnd(q, m, 8, 0) == 0, "
             "rt.mq_open(b'/rstar', os.O_CREAT | os.O_RDWR, 0o600, None) >= 0)\n")
IPC_READ = "print(libc.msgget(0x5eed, 0) >= 0, rt.mq_open(b'/rstar', os.O_RDONLY) >= 0)"
IPC_RECEIVE = "print(libc.msgrcv(libc.msgget(0x5eed, 0), m, 8, 0, 0o4000))"


def test_ipc_objects_do_not_outlive_the_snippet(ex: StepExecutor) -> None:
    if not ex.sandboxed:
        pytest.skip("no namespaces: snippets share the host's IPC namespace")
    r = ex.run(IPC + IPC_WRITE)
    assert r.ok and r.output == "True True False", r  # no POSIX queues at all
    assert [r.output for r in ex.run_many([IPC + IPC_READ] * 4)] == ["False False"] * 4
    assert_siblings_run_as_whole(ex, IPC, [IPC_WRITE, IPC_READ, IPC_WRITE, IPC_READ])
    # What the prefix made, every step would share: each runs whole (and gets the message).
    assert_siblings_run_as_whole(ex, IPC + IPC_WRITE, [IPC_RECEIVE] * 3)


def test_limits_mode_runs_each_sibling_whole_and_the_prefix_once_for_each(tmp_path: Path) -> None:
    """Without namespaces a prefix process could neither watch nor end the steps it forks (it
    may signal only its own group, and open no pidfd): each step runs whole, and the prefix
    runs once per step, not once more in a prefix process that fails."""
    runs = tmp_path / "prefix_runs"
    prefix = f"import random\nopen({str(runs)!r}, 'a').write('x')\nr = random.random()\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        e = StepExecutor(workers=1, timeout_s=TIMEOUT, isolation="limits")
    with e:
        rs = e.run_siblings(prefix, ["print(r)", "print(r)", "while True:\n    pass", "print(1)"])
        assert [r.ok for r in rs] == [True, True, False, True] and rs[2].timed_out, rs
        assert rs[0].output != rs[1].output and rs[3].output == "1", rs  # two whole runs draw anew
        assert runs.read_text() == "x" * 4


def test_limits_mode_removes_each_snippets_directory() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        e = StepExecutor(workers=1, timeout_s=TIMEOUT, isolation="limits")
    with e:
        code = "import os\nopen('data.txt', 'w').write('x')\nprint(os.getcwd())"
        cwds = [e.run(code).output, *(r.output for r in e.run_siblings("y = 1\n", [code] * 2))]
        e.run("print(1)")  # its zygote removes them before it reads the next job
        for cwd in cwds:
            assert cwd.startswith(e._work_dir + os.sep), cwds
            assert not os.path.exists(cwd), cwds


def test_a_fork_of_the_process_leaves_its_executor_alone() -> None:
    out = run_script(
        "import os, signal, sys, time\nfrom rstar_fast import StepExecutor\n"
        "from rstar_fast.executor import ExecutorClosedError\n"
        "e = StepExecutor(workers=1, timeout_s=5)\nt = time.monotonic()\npid = os.fork()\n"
        "if pid == 0:\n    signal.alarm(10)\n"
        "    try:\n        e.run('print(1)')\n    except ExecutorClosedError:\n"
        "        sys.exit(0)\n"  # atexit closes its copy of the executor
        "    sys.exit(3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), time.monotonic() - t < 5, "
        "os.path.isdir(e._work_dir), e.run('print(2)').output)")
    assert out == "0 True True 2", out


def test_siblings_count_the_prefixs_output_against_each_steps_cap(ex: StepExecutor) -> None:
    # raw writes count against the cap in the reference style too
    assert_siblings_run_as_whole(ex, "import os\nos.write(1, b'x' * 600000)\n",
                                 ["os.write(1, b'y' * 600000)", "print(2)"])
    # the prefix runs on for a step that adds a print: what that part writes counts too
    assert_siblings_run_as_whole(ex, "import os\nprint(1)\nprint(2)\nos.write(1, b'x' * 600000)\n",
                                 ["z = 1", "os.write(1, b'y' * 600000)\nprint(3)"])
    with StepExecutor(workers=1, timeout_s=TIMEOUT, style="plain", output_limit_bytes=1000) as e:
        assert_siblings_run_as_whole(e, "print('x' * 600)\n",
                                     ["print('y' * 600)", "print('y' * 300)"])
        assert_siblings_run_as_whole(e, "print('x' * 1500)\n", ["print('step')"])


def test_a_call_racing_close_ends_with_its_result_or_the_closed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    e = StepExecutor(workers=1, timeout_s=TIMEOUT)
    submit = asyncio.run_coroutine_threadsafe
    checked = threading.Event()

    def slow_submit(coro, loop):  # close() comes between the closed check and the submit
        if threading.current_thread().name == "caller":
            checked.set()
            time.sleep(0.3)
        return submit(coro, loop)

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", slow_submit)
    got: list[BaseException] = []

    def call() -> None:
        try:
            e.run("print(1)")
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    t = threading.Thread(target=call, name="caller")
    t.start()
    assert checked.wait(10)
    e.close()
    t.join(10)
    # the submit holds the lock close() takes: the call was submitted first, and ends with its
    # result or, when close() stopped it, the closed error; never waits for a stopped loop
    assert not t.is_alive() and all(isinstance(x, ExecutorClosedError) for x in got), got


async def test_a_cancelled_call_keeps_its_worker_and_its_result() -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        w = light_worker(e)
        t = asyncio.create_task(e.arun("import time\ntime.sleep(0.5)\nprint('cancelled')"))
        await asyncio.sleep(0.2)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(e.arun("import time\ntime.sleep(0.5)\nprint('late')"), 0.1)
        rs = await asyncio.gather(*(e.arun(f"print('mine{i}')") for i in range(4)))
        assert [r.output for r in rs] == [f"mine{i}" for i in range(4)]
        assert light_worker(e) is w and len(e._all) == 2 and not w.killed  # no restart


def test_a_large_request_is_written_through_an_fd_of_its_own(
        ex: StepExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    # the thread that writes it may outlive the worker, whose fd number is then free for
    # another file
    used: list[int] = []
    write_all = pool._write_all
    monkeypatch.setattr(pool, "_write_all", lambda fd, data: (used.append(fd), write_all(fd, data)))
    big = "s = '" + "a" * (1 << 20) + "'\nprint(len(s))"
    assert ex.run(big).output == str(1 << 20)
    monkeypatch.undo()
    assert used and not set(used) & {w.in_fd for w in ex._all}, used


def test_siblings_of_a_long_program_label_their_prints_at_once():
    """The labels of several prints came from ast.get_source_segment, which splits the whole
    program in a Python loop per print: a 3 MB prefix timed out."""
    prefix = "x = 1\n# " + "a" * 3_000_000 + "\nprint(x)\n"
    with StepExecutor(workers=1, timeout_s=10.0) as ex:
        results = ex.run_siblings(prefix, ["print(2)\n", "print(3)\n"])
    assert [r.output for r in results] == ["x: 1\n2: 2", "x: 1\n3: 3"]  # not two timeouts


@pytest.mark.parametrize("code, light", [
    ("x = 3\nprint(x * 5)\n", True),
    ("import math\nfrom fractions import Fraction\nimport collections.abc as abc, re\n", True),
    ("from sympy import symbols, solve\n", False),
    ("import math, numpy as np\n", False),
    ("import scipy.optimize\n", False),
    ("# import the amounts\nx = 1\n", False),  # a guess from the text: it errs toward False
    ("m = __import__('sympy')\n", False),
    ("import importlib\n", False),
    ("from . import x\n", False),
])
def test_imports_only_reads_the_imports_from_the_text(code: str, light: bool) -> None:
    assert pool.imports_only(code, pool._LIGHT) is light


def test_snippets_importing_only_standard_modules_run_in_a_light_zygote() -> None:
    probe = "import sys\nprint('numpy' in sys.modules)\n"
    with StepExecutor(workers=1, timeout_s=30.0) as e:  # long enough to import sympy
        assert {w.tier for w in e._all} == {"light", "full"}
        assert e.run(probe).output == "False"
        assert e.run("import sympy\n" + probe).output == "True"
        # a sibling batch runs where its most demanding code must: all of it in the full one
        rs = e.run_siblings("import sys\n", [probe, "import numpy\n" + probe])
        assert [r.output for r in rs] == ["True", "True"], rs
        # code that imports a heavy module by other means still runs there, only slower
        r = e.run("import sys\nn = 'numpy' in sys.modules\nsp = eval('__imp' + 'ort__')('sympy')\n"
                  "print(n, sp.Rational(1, 2) + 1)")
        assert r.ok and r.output == "False 3/2", r


def test_a_light_preload_has_one_tier_of_zygotes() -> None:
    with StepExecutor(workers=1, timeout_s=TIMEOUT, preload=("math", "fractions")) as e:
        assert [w.tier for w in e._all] == ["full"]
        assert e.run("import sys\nprint('sympy' in sys.modules, 'fractions' in sys.modules)").output == \
            "False True"


def test_a_preload_module_that_is_not_installed_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="rstar_fast.executor.pool"):
        StepExecutor(workers=1, timeout_s=TIMEOUT, preload=("math", "no_such_module", "scipy.optimize")).close()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["StepExecutor: preload modules not installed, so not preloaded: no_such_module"], said


def test_at_most_workers_snippets_run_at_once_over_both_tiers() -> None:
    nap = "import time\ntime.sleep(0.6)\nprint(1)\n"
    with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
        t = time.perf_counter()
        rs = e.run_many([nap, "import numpy\n" + nap])
        assert all(r.ok for r in rs), rs
        assert time.perf_counter() - t >= 1.2  # one after the other


def test_a_long_run_of_spaces_inside_a_program_costs_its_siblings_nothing(ex: StepExecutor) -> None:
    # degenerate model output; the batch prepares every step's program before running them
    prefix = "a = 1" + " " * 20_000 + "\n"
    rs = ex.run_siblings(prefix, [f"print(a + {k})" for k in range(4)])
    assert [r.output for r in rs] == ["1", "2", "3", "4"], rs


def test_a_prefix_asking_without_reading_the_answers_is_ended_as_malformed() -> None:
    asks = ("import json, os, struct, time\nd = json.dumps({'t': 'prefix', 'seconds': 0}).encode()\n"
            "while True:\n    os.write(3, struct.pack('>I', len(d)) + d)\n    time.sleep(0.001)\n")
    with StepExecutor(workers=1, timeout_s=1.0) as e:
        rs = e.run_siblings(asks, ["print(1)"])
        assert [r.error for r in rs] == ["killed: malformed result from snippet"], rs
        assert_healthy(e)


def test_frames_a_snippet_forges_are_cut_and_cost_no_worker() -> None:
    forge = ("import os, json, struct\n"
             "d = json.dumps({'t': 'result', 'kind': 'error', 'error': 'A' * 100_000}).encode()\n"
             "os.write(3, struct.pack('>I', len(d)) + d)\nos._exit(0)\n")
    huge_seconds = ("import os, struct\n"
                    "d = b'{\"t\": \"step\", \"i\": 0, \"result\": {\"ok\": true, \"seconds\": 1' + b'0' * 400 + b'}}'\n"
                    "os.write(3, struct.pack('>I', len(d)) + d)\n")
    with StepExecutor(workers=1, timeout_s=TIMEOUT, max_output_chars=100) as e:
        failed = e.run(forge)  # an error is one exception's line, cut as the snippet cuts it
        assert not failed.ok and failed.error == "A" * 50 + "..." + "A" * 50, failed
        zygote = zygote_pid(e)
        [step] = e.run_siblings(huge_seconds, ["print(1)"])
        assert step.seconds == 0.0 and zygote_pid(e) == zygote, step
        assert_healthy(e)


def test_snippets_get_no_keyrings_and_no_user_namespaces_yet_threads_and_forks(ex: StepExecutor) -> None:
    # A keyring the parent joined would be readable, a user keyring shared by later snippets;
    # a user namespace of its own gives a snippet every capability over new mount and network
    # namespaces. Threads and processes (clone3 refused, clone used instead) still start.
    code = ("import ctypes, os, subprocess, threading\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def errno(ret): return ctypes.get_errno() if ret == -1 else 0\n"
            "keyctl = errno(libc.syscall(KEYCTL, 0, -3, 0))\n"  # KEYCTL_GET_KEYRING_ID of @s
            "add_key = errno(libc.syscall(ADD_KEY, b'user', b'k', b'v', 1, -4))\n"  # into @u
            "userns = errno(libc.unshare(0x10000000))\n"
            "box = []\nt = threading.Thread(target=box.append, args=(7,))\nt.start()\nt.join()\n"
            "child = subprocess.run(['true']).returncode\n"
            "print(keyctl, add_key, userns, child, box)\n")
    import platform

    numbers = {"x86_64": (250, 248), "aarch64": (219, 217)}.get(platform.machine())
    if numbers is None:
        pytest.skip("the seccomp filter knows x86_64 and aarch64")
    r = ex.run(code.replace("KEYCTL", str(numbers[0])).replace("ADD_KEY", str(numbers[1])))
    assert r.ok and r.output == "1 1 1 0 [7]", r  # EPERM thrice


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user, the ancestors' /proc entries are closed anyway")
def test_in_limits_mode_as_root_a_snippet_cannot_read_its_ancestors_environment(monkeypatch) -> None:
    # as a container's root without CAP_SYS_ADMIN runs it; the process that made the executor
    # was started with a key in its environment
    monkeypatch.setenv("RSTAR_EXECUTOR_TEST_KEY", "sk-in-the-environment")
    walk = ("import os\npid, seen = os.getpid(), []\nwhile pid > 1:\n"
            "    pid = int(open(f'/proc/{pid}/status').read().split('PPid:')[1].split()[0])\n"
            "    try:\n        seen.append(b'sk-in-the' in open(f'/proc/{pid}/environ', 'rb').read())\n"
            "    except PermissionError:\n        seen.append(None)\n"
            "print(any(seen), None in seen)")
    work = "import sympy\nopen('f.txt', 'w').write('7')\nprint(sympy.Integer(open('f.txt').read()) * 6)"
    out = run_script(
        "import warnings\nfrom rstar_fast import StepExecutor\nwarnings.simplefilter('ignore')\n"
        "with StepExecutor(workers=1, timeout_s=5, isolation='limits', style='plain') as e:\n"
        f"    print([r.output.strip() for r in e.run_many([{walk!r}, {work!r}])])")
    assert out == "['False True', '42']", out


@pytest.mark.skipif(not os.access("/", os.W_OK), reason="needs a top-level directory of its own")
def test_any_top_level_directory_but_the_systems_is_hidden() -> None:
    # where a container mounts its models or datasets, under a name no list could foresee
    top = Path(f"/rstar-test-datasets-{os.getpid()}")
    top.mkdir()
    try:
        (top / "answers.json").write_text('{"1": 42}')
        with StepExecutor(workers=1, timeout_s=TIMEOUT) as e:
            if not e.sandboxed:
                pytest.skip("no namespaces here")
            r = e.run(f"import os\nprint(os.listdir({str(top)!r}), os.path.exists('/usr/bin'))")
            assert r.ok and r.output == "[] True", r
    finally:
        shutil.rmtree(top)


def test_a_top_level_link_is_covered_where_it_leads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fedora's /home is a link to /var/home; one that leads into another covered directory
    goes with it, and one that leads to a system directory leaves that open."""
    from rstar_fast.executor import _worker

    links = {"/home": "/var/home", "/data": "/mnt/data", "/sysroot": "/usr"}
    realpath = os.path.realpath
    monkeypatch.setattr(_worker, "hidden_dirs", lambda: ["/data", "/home", "/mnt", "/sysroot", "/tmp", "/var/tmp"])
    monkeypatch.setattr(os.path, "realpath", lambda p: links.get(p, realpath(p)))
    monkeypatch.setattr(os.path, "isdir", lambda p: True)
    plan = _worker.cover_plan(["/usr/lib/python3.11", "/var/home/u/venv"], [], ["/usr"])
    assert plan == {"/mnt": [], "/tmp": [], "/var/home": ["/var/home/u/venv"], "/var/tmp": []}


def test_no_seccomp_filter_for_an_interpreter_of_another_abi(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filter knows the 64-bit calls of the kernel's machine; a 32-bit or x32 interpreter on
    it makes calls of another ABI, which it would refuse every one of (write and exit too)."""
    import sysconfig

    from rstar_fast.executor import _worker

    monkeypatch.setattr(sys, "maxsize", 2**31 - 1)
    assert _worker._seccomp_program() is None
    monkeypatch.undo()
    get = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda k: "x86_64-linux-gnux32" if k == "MULTIARCH" else get(k))
    assert _worker._seccomp_program() is None


def test_limits_mode_signals_only_the_snippet_itself() -> None:
    """Without namespaces a snippet runs as the worker's user: as root it could signal every
    process there is (kill(-1, 9) takes the machine's processes down). Its signals reach only
    itself and its process group; signal 0 probes the others safely here."""
    bystander = subprocess.Popen(["sleep", "60"])
    probe = ("import os, threading\n"
             "def send(pid, sig):\n    try:\n        os.kill(pid, sig)\n        return 'sent'\n"
             "    except PermissionError:\n        return 'refused'\n"
             "    except ProcessLookupError:\n        return 'none'\n"
             f"print(send({bystander.pid}, 15), send(os.getppid(), 0), send(-1, 0), "
             "send(os.getpid(), 0), send(0, 0), send(-os.getpid(), 0))\n"
             "import signal\nsignal.pthread_kill(threading.get_ident(), 0)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            e = StepExecutor(workers=1, timeout_s=5, isolation="limits", style="plain")
        with e:
            r = e.run(probe)
            assert r.ok and r.output.strip() == "refused refused refused sent sent sent", r
            assert e.run("print(42)").output.strip() == "42"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_thousands_of_prints_past_the_output_limit_are_said_so(ex: StepExecutor) -> None:
    """Each print shows at most max_output_chars, but thousands add up: past the output limit
    the result says so (it was a malformed-result error), whole or as a sibling."""
    many = "print('y' * 1000)\n" * 1200
    r = ex.run(many)
    assert not r.ok and r.crashed and r.error == f"killed: output limit ({ex.output_limit_bytes} bytes)", r
    sib = ex.run_siblings("x = 1\n", [many, "print(x)"])
    assert (sib[0].error, sib[1].output) == (r.error, "1")
    assert ex.run("print('y' * 1000)\n" * 300).ok


def test_a_prefix_handler_for_its_children_sees_only_what_a_whole_run_sees(ex: StepExecutor) -> None:
    """The prefix process forks each step; their exits must not run the prefix's SIGCHLD
    handler in it, where the next steps would inherit what the handler changed."""
    prefix = ("import os, signal, time\nhits = []\n"
              "signal.signal(signal.SIGCHLD, lambda s, f: hits.append(s))\n")
    fork = "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\ntime.sleep(0.05)\n"
    assert_siblings_run_as_whole(ex, prefix, ["print(hits)", "print(len(hits))", fork + "print(hits)"])
