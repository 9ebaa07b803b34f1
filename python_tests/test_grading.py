"""grade(): math-verify in killable workers, with fast numeric / letter checks."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import rstar_fast
from rstar_fast.search.grading import Grader, GradingError, normalize_answer, parse_number, quick_verdict

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def grader():
    g = Grader(workers=2, timeout_s=20.0)
    yield g
    g.close()


EQUIVALENT = [
    ("\\frac{14}{3}", "14/3"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"), ("90^\\circ", "90"),
    ("\\text{Evelyn}", "Evelyn"), ("x=5", "5"), ("1,-2", "-2, 1"), ("11\\sqrt2", "11\\sqrt{2}"),
    ("3, 5, 7", "7,5,3"), ("16", "16.0"), ("1000", "1,000"), ("50\\%", "50"), ("0.5", "\\frac12"),
    ("4\\sqrt{5}", "8.9443"), ("\\frac{3}{56}", "0.0536"), ("x^2+1", "1+x^2"), ("A", "(A)"),
    ("C", "\\text{(C)} 12"), ("6 - 5i", "6-5i"), ("\\dfrac{9}{7}", "\\frac{9}{7}"),
]
DIFFERENT = [("2220", "2221"), ("13535", "13536"), ("\\pi", "3.14"), ("A", "B"), ("\\frac{1}{2}", "0.6"),
             ("5", ""), ("x=5", "6")]


def test_equivalent(grader: Grader) -> None:
    assert grader.grade_many(EQUIVALENT) == [True] * len(EQUIVALENT)


def test_different(grader: Grader) -> None:
    assert grader.grade_many(DIFFERENT) == [False] * len(DIFFERENT)


def test_math500_gold_against_rewrites(grader: Grader) -> None:
    golds = [r["answer"] for r in json.loads((DATA / "math500_test.json").read_text())[:60]]
    # each gold against itself in $...$, \boxed{} wrappers and respaced: all equivalent
    pairs = [(g, f"${g}$") for g in golds] + [(g, "\\boxed{" + g + "}") for g in golds[:20]]
    assert all(grader.grade_many(pairs))
    # and never against the next problem's gold (when they differ as strings)
    wrong = [(a, b) for a, b in zip(golds, golds[1:])
             if normalize_answer(a) != normalize_answer(b) and "=" not in a + b]  # "5" == "x=5"
    assert sum(grader.grade_many(wrong[:30])) == 0


def test_list_gold_and_none(grader: Grader) -> None:
    assert grader.grade(["7", "8"], "8") and not grader.grade(["7", "8"], "9")
    assert not grader.grade("7", None)


async def test_async(grader: Grader) -> None:
    assert await grader.agrade("\\frac{1}{4}", "0.25")
    assert await grader.agrade("x^2", "x\\cdot x")
    assert not await grader.agrade("1", "2")


def test_hung_comparison_is_killed() -> None:
    with Grader(workers=1, timeout_s=0.5, compare="rstar_fast.search.grading:_sleep_compare_for_tests") as g:
        assert g.grade("60", "x") is False  # overran: worker killed, graded False
        assert g.timeouts == 1
        assert g.grade("0", "y") is True  # a fresh worker answers


def test_fast_checks() -> None:
    assert parse_number(normalize_answer("1,000")) == 1000.0
    assert parse_number(normalize_answer("\\$5.50")) == 5.5
    assert quick_verdict("16", "16.0") is True and quick_verdict("12", "13") is False
    assert quick_verdict("25\\%", "0.25") is True
    assert quick_verdict("\\sqrt{2}", "1.4142") is None  # needs math-verify


def test_public_grade() -> None:
    assert rstar_fast.grade("42", "42.0")


def test_a_slow_worker_start_does_not_count_against_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "slow_compare.py").write_text(
        "import time\ntime.sleep(1.5)  # an import as slow as math-verify's on a loaded machine\n"
        "def compare(gold, pred):\n    return True\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with Grader(workers=1, timeout_s=0.5, compare="slow_compare:compare") as g:
        assert quick_verdict("x+1", "1+x") is None  # the worker decides
        assert g.grade("x+1", "1+x") is True
        assert g.timeouts == 0


def test_a_compare_function_in_the_callers_folder_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker leaves the current folder off the front of its path (a checkout there would
    stand in for the installed package), but a compare module there is still found."""
    (tmp_path / "mine_compare.py").write_text("def compare(gold, pred):\n    return True\n")
    monkeypatch.chdir(tmp_path)
    with Grader(workers=1, timeout_s=30, compare="mine_compare:compare", cache_size=0) as g:
        assert g.grade("x^2+1", "x+7") is True


def test_a_worker_that_dies_during_a_comparison_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed from outside (out of memory, say), a worker is replaced and the comparison tried
    again; one that ends every worker it runs on is graded False, and grading goes on."""
    (tmp_path / "dying_compare.py").write_text(
        "import os\n"
        "def compare(gold, pred):\n"
        "    marker = os.path.join(os.environ['DYING_DIR'], 'once')\n"
        "    if pred == 'boom' or (pred == 'once' and not os.path.exists(marker)):\n"
        "        open(marker, 'w').close()\n"
        "        os._exit(9)\n"
        "    return gold == pred\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("DYING_DIR", str(tmp_path))
    with Grader(workers=1, timeout_s=30, compare="dying_compare:compare") as g:
        assert g.grade("once", "once") is True and g.crashes == 0
        assert g.grade("x+1", "boom") is False and g.crashes == 1
        assert g.grade("x+1", "1+x") is False and g.grade("y", "y") is True  # the pool goes on


# A process grading an answer whose comparison never ends; it prints its worker's pid once the
# comparison is under way
GRADING_PARENT = r"""
import sys, threading, time
from rstar_fast.search.grading import Grader
g = Grader(workers=1, timeout_s=600, compare=sys.argv[1])
# the worker starts for a thread that ends: it outlives that thread, and dies with the process
first = threading.Thread(target=g.grade, args=("0", "y"))
first.start()
first.join()
time.sleep(0.5)
proc = g._workers[0]._proc
assert proc.poll() is None, "the worker died with the thread it was started for"
threading.Thread(target=g.grade, args=("1", "x"), daemon=True).start()
time.sleep(1)
print(proc.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for its new parent to reap does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_a_worker_ends_soon_after_its_process_is_killed(tmp_path: Path) -> None:
    """SIGKILLed (the OOM killer), the process never closes the worker's stdin, and the worker
    would go on with a comparison that may never end; here one in C code that holds the GIL
    (a regular expression backtracking), as a huge power in sympy does."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "endless_compare.py").write_text(
        "import re\n"
        "def compare(gold, pred):\n"
        "    return gold == '0' or re.match(r'(a+)+$', 'a' * 60 + 'b') is not None\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    parent = subprocess.Popen([sys.executable, "-c", GRADING_PARENT, "endless_compare:compare"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(parent.stdout.readline())
        assert _running(worker)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


def test_ctrl_c_while_the_workers_stop_at_exit_kills_them_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    from rstar_fast.search import grading

    g = Grader(workers=1)
    assert g.grade("x+1", "1+x") is True  # a worker is running
    (worker,) = g._workers
    proc = worker._proc

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(grading._Worker, "stop", interrupted)
    g.close_at_exit()  # no KeyboardInterrupt out of an atexit callback
    assert proc is not None and proc.poll() is not None


def _run_script(script: str) -> str:
    import subprocess
    import sys
    import textwrap

    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_ctrl_c_while_a_worker_starts_leaves_no_answer_for_the_next_comparison() -> None:
    """Interrupted while its new worker imported math-verify, a grade left that worker's
    "ready" unread, and the next comparison read it as its verdict (x+1 against 1+x: False)."""
    out = _run_script("""
        import signal, threading, time
        from rstar_fast.search import grading
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started from a background job, it is ignored
        g = grading.Grader(workers=1, cache_size=0)
        main = threading.main_thread().ident
        spawn = grading._SPAWNER.popen

        def popen_then_ctrl_c(*args, **kwargs):  # Ctrl-C 50 ms into the first worker's start
            grading._SPAWNER.popen = spawn
            proc = spawn(*args, **kwargs)
            threading.Timer(0.05, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
            return proc

        grading._SPAWNER.popen = popen_then_ctrl_c
        try:
            g.grade("x+1", "1+x")  # the worker's start takes seconds
            print("not interrupted")
        except KeyboardInterrupt:
            pass
        print(g.grade("x+1", "1+x"), g.grade("x+3", "x-3"), g.grade("2x", "x+x"))
        g.close()
    """)
    assert out.split() == ["True", "False", "True"]


def test_a_grader_in_a_fork_of_its_process_is_refused_not_hung() -> None:
    out = _run_script("""
        import os
        from rstar_fast.search.grading import Grader, GradingError
        g = Grader(workers=1)
        assert g.grade("x+1", "1+x")
        pid = os.fork()
        if pid == 0:
            try:
                g.grade_many([("x+2", "2+x")])
                os._exit(3)
            except GradingError as e:
                os._exit(0 if "belongs to the process that made it" in str(e) else 4)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), g.grade("x+2", "2+x"))
        g.close()
    """)
    assert out.split() == ["0", "True"]


def test_a_grader_dropped_without_close_stops_its_workers_which_ignore_the_terminal() -> None:
    import gc
    import time

    g = Grader(workers=1)
    assert g.grade("x+1", "1+x") is True
    proc = g._workers[0]._proc
    assert proc is not None and os.getsid(proc.pid) != os.getsid(0)  # a Ctrl-C is the caller's
    del g
    gc.collect()
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is not None


def test_a_worker_that_cannot_start_says_why() -> None:
    with Grader(workers=1, compare="no_such_module_here:compare") as g:
        why = r"(?s)exited with code 1 before it was ready.*ModuleNotFoundError.*no_such_module_here"
        with pytest.raises(GradingError, match=why):
            g.grade("x+1", "1+x")


def test_an_answer_past_number_limits_is_not_an_error():
    """Digits past int()'s conversion limit: no number, no crash; a quotient past float's range
    stays exact, and against a decimal it is no error either."""
    from fractions import Fraction

    from rstar_fast.search.grading import parse_number

    huge = "1" + "0" * 5000
    assert parse_number(f"\\frac{{1}}{{{huge}}}") is None
    assert parse_number(f"\\frac{{{'9' * 400}}}{{1}}") == Fraction(int("9" * 400))
    assert rstar_fast.grade(f"\\frac{{{'9' * 400}}}{{1}}", "1.5") is False
    assert rstar_fast.grade("5", f"\\frac{{1}}{{{huge}}}") is False


@pytest.mark.parametrize("gold, pred, verdict", [
    # exact values stay exact: off by one is wrong, however large
    ("2^{1009}", "2^{1009}-1", False), ("12345678901234567890", "12345678901234567891", False),
    ("2^{64}", "18446744073709551615", False), ("2^{64}", "18446744073709551616", True),
    # small numbers: relative tolerance only; e-notation is a number, not 6 * e * 23
    ("2.887\\times10^{-6}", "0", False), ("2.887\\times10^{-6}", "2.887e-6", True),
    ("1.76\\times10^{-10}", "5\\times10^{-10}", False), ("6\\times 10^{23}", "6e+23", True), ("10^{-5}", "1e-05", True),
    ("\\frac{1}{3}", "0.3333", True), ("4\\sqrt{5}", "8.9443", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, 1.5708)", True), ("[0, \\frac{\\pi}{4}]", "[0, 0.7854]", True),
    ("[0, \\frac{\\pi}{4}]", "(0, 0.7854)", False), ("(3, \\frac{\\pi}{2})", "(3, 1.6)", False),
    # lists are not thousands
    ("153, 370, 371, 407", "370, 153, 371, 407", True), ("5, 125", "5125", False), ("0,245", "245", False),
    ("1,000", "1000", True),
    # letters: choices, hedges, and e the constant
    ("e", "2.7183", True), ("A", "A or B", False), ("A", "A B C D", False), ("B", "\\textbf{(B)}\\ 12", True),
    ("B", "\\mathrm{(B)}", True), ("C", "D", False),
    # percentages: only the side written with % is divided by 100
    ("50\\%", "0.5", True), ("50\\%", "5000", False), ("25\\%", "2500\\%", False), ("0.25", "25\\%", True),
    # exact values math-verify's rounding takes for equal: tiny ones, a value and its negative,
    # large ones one apart; equal ones written differently stay equal
    ("\\frac{1}{2^{60}}", "\\frac{1}{2^{61}}", False), ("\\frac{1}{2004!}", "\\frac{1}{2005!}", False),
    ("\\frac{3^{59}+1}{4 \\cdot 3^{59}}", "-(\\frac{3^{59}+1}{4 \\cdot 3^{59}})", False),
    ("\\frac{\\sqrt{4009}}{2^{2004}}", "-\\frac{\\sqrt{4009}}{2^{2004}}", False), ("3^{100}", "3^{100}+1", False),
    ("\\frac{2016!}{1953!}- 63! \\cdot 2016", "\\frac{2017!}{1953!}- 63! \\cdot 2016", False),
    ("3^{100}\\sqrt{2}", "3^{100}\\sqrt{2}+1", False), ("1-5051/2^{100}", "1 + 5051/2^{100}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("(1+\\sqrt{2})^2", "3+2\\sqrt{2}", True),
    ("\\tan(\\pi/8)", "\\sqrt2-1", True), ("\\log_2 8", "3", True),
    # lists: each item as often as written, statements each read whole; any order
    ("-1,-1,1,1", "-1, -1, 1", False), ("1,1,2,3", "1,2,3", False), ("-2,-2", "-2", False),
    ("16,3,1,1", "1, 1, 3, 16", True), ("6764,10945", "10945, 6764", True), ("221,8", "(221, 8)", True),
    ("d=\\frac{\\sqrt{37}}{2},M=\\left(\\frac{5}{6},\\frac{7}{4}\\right)",
     "d=\\frac{\\sqrt{38}}{2},M=\\left(\\frac{5}{6},\\frac{7}{4}\\right)", False),
    ("x=-3orx=11", "x=-4orx=11", False), ("x=-3orx=11", "x=11, x=-3", True), ("x=-3orx=11", "x=-3, 11", True),
    ("\\frac{3}{4}, -\\frac{3}{4}", "\\pm\\frac{3}{4}", True),
    ("$\\boxed{f(x)=(x^2+1)^n},n\\in\\mathbb N_0$", "f(x)=(x^2+1)^n", True),
    # golds listed with "and": the items, not their digits run together
    ("19 \\text{ and }43", "19, 43", True), ("19 \\text{ and }43", "1943", False),
    ("2 \\text{ and } 3750", "23750", False), ("7, -2, \\text{ and } -5", "-5, -2, 7", True),
    ("(2, 3) \\text{ and } (6, 15)", "(2, 3), (6, 15)", True), ("(2, 3) \\text{ and } (6, 15)", "(6, 15)", False),
    ("f(x) = x + 1 \\text{ and } g(y) = y + 1", "f(x) = x + 2  g(y) = y + 1", False),
    ("7, -2, \\text{ and } -5", "7, -2,  and  -5", True), ("12\\text{ and }13", "12 and 13", True),
    # an answer wrapped whole, on either side
    ("\\[ y = 0, 1 \\]", "y = 1, 0", True), ("\\((m, n) = (5, 2), (2, 5)\\)", "(m, n) = (2, 5), (5, 2)", True),
    ("20cm^{2}", "$20cm^{2}$", True), ("20cm^{2}", "x = 20cm^{2}", True), ("20cm^{2}", "\\boxed{\\(21cm^{2}\\)}", False),
    # a unit with its power; a vector as a tuple
    ("10", "10 inches^2", True), ("10", "10 cm^2", True), ("26", "10 inches^2", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\\\ -3 \\end{pmatrix}", "(1, 2, -3)", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\\\ -3 \\end{pmatrix}", "(1, 2, 3)", False),
    # Unicode math as a LaTeX writer would type it, and full-width forms (OmniMath's golds)
    ("10000", "10\u2009000", True), ("10000", "10\u00a0000", True), ("45", "45°", True), ("45^\\circ", "45°", True),
    ("\\sqrt{2}", "√2", True), ("\\frac{1}{2}", "½", True), ("x^2", "x²", True), ("x^3", "x²", False),
    ("\\infty", "∞", True), ("-1", "－1", True), ("3", "−3", False),
    ("2", "√12", False), ("2\\sqrt{3}", "√12", True), ("\\sqrt{x+1}", "√(x+1)", True),
    ("（a，b，n，p）=（3，0，3，3）", "(a,b,n,p)=(3,0,3,3)", True),
    # a 2-vector against the pair math-verify reads as an open interval
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 2)", True), ("(-1, 3)", "\\begin{pmatrix} -1 \\\\ 3 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 3)", False), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "[1, 2]", False),
    # a unit under any power goes whole: its power never falls to the number
    ("10000", "10\\mathrm{ cm}^4", False), ("10", "10\\mathrm{ cm}^4", True),
    ("\\frac{1}{25}", "5\\,\\mathrm{ms}^{-2}", False), ("5", "5\\,\\mathrm{ms}^{-2}", True),
    # exact numbers a hair apart are apart
    ("1-\\frac{1}{2^{200}}", "1", False), ("1+10^{-50}", "1", False), ("1+2^{-140}", "1+2^{-141}", False),
    ("\\sqrt{10^{100}+1}", "10^{50}", False), ("\\frac{2^{200}-1}{2^{200}}", "1-2^{-200}", True),
    # two spaces inside one expression are no list
    ("x^2+2x+1", "x^2 +  2x + 1", True), ("2\\pi", "2  \\pi", True), ("3", "x =  3", True),
    ("(x+1)(x-2)", "(x+1)  (x-2)", True), ("(0,0), (1,1)", "(1,1)  (0,0)", True),
    # ... but two fractions or roots are (what extraction leaves of "\\sqrt{2} \\text{ and } -\\sqrt{2}")
    ("0", "\\sqrt{2}  -\\sqrt{2}", False), ("\\sqrt{2}, -\\sqrt{2}", "\\sqrt{2}  -\\sqrt{2}", True),
    ("\\frac{1}{2}, 2", "\\frac{1}{2}  2", True), ("\\frac38", "\\frac{1}{2}  \\frac{3}{4}", False),
    # the tolerances: a relative 1e-4 below 1e-3 too, four decimals, nothing looser
    ("0.0002", "0.00024", False), ("0.0012", "0.0014", False), ("1.2345", "1.2349", False),
    ("\\text{Evelyn.}", "Evelyn", True), ("5..", "5", True), ("1080", "1,080^\\circ", True),
    ("1, 2", "1, 2, 3", False), ("1, 2, 3", "1, 2", False),
    # an upright imaginary unit or e is no decoration to drop
    ("5", "3+2\\mathrm{i}", False), ("3+2\\mathrm{i}", "5", False), ("3+2i", "3+2\\mathrm{i}", True),
    ("2", "2\\text{i}", False), ("2i", "2\\text{i}", True), ("-\\mathrm{i}", "-i", True),
    ("2", "2\\mathrm{e}", False), ("\\mathrm{e}^2", "e^2", True), ("5", "5\\text{ m}", True),
])
def test_verdicts_on_hard_answers(gold, pred, verdict):
    assert rstar_fast.grade(gold, pred) is verdict


@pytest.mark.parametrize("gold, boxed, verdict", [
    # what extraction drops (a \\text{ and }) or unwraps (a unit's \\text{}) still grades right
    ("19 \\text{ and }43", "19 \\text{ and }43", True), ("(0,0) \\text{ and } (1,1)", "(0,0) \\text{ and } (1,1)", True),
    ("19 \\text{ and }43", "1943", False), ("19, 43", "19 \\text{ and } 43", True), ("10 000", "10000", True),
    ("(0,0) \\text{ and } (1,1)", "(1,1) \\text{ and } (0,0)", True), ("(0,0) \\text{ and } (1,1)", "(0,0)", False),
    ("x=-3orx=11", "x=-3 \\text{ or } x=11", True), ("x=-3orx=11", "x=-3 \\text{ or } x=12", False),
    ("(x+1) (x-2)", "(x+1)(x-2)", True), ("10", "10 \\text{ inches}^2", True),
    ("18", "18 \\text{ dollars}", True), ("5", "5 \\text{ people}", True), ("18", "18 \\text{ dozen eggs}", True),
    ("3", "3 \\text{ or } 4", False), ("3\\pi", "3 \\text{ pi}", False),
    # units after a list's numbers: the list, not its first number
    ("30\\mathrm{mph},40\\mathrm{mph}", "30", False), ("30\\mathrm{mph},40\\mathrm{mph}", "30, 40", True),
    ("30\\mathrm{mph},40\\mathrm{mph}", "30\\mathrm{mph},50\\mathrm{mph}", False),
    ("5\\text{ cm}^2", "5", True), ("25", "5\\text{ cm}^2", False), ("3+2\\mathrm{i}", "3", False),
    # a gold's trailing period is no part of it
    ("\\frac{7}{5} + \\frac{1}{5} i.", "\\frac{1}{5}", False), ("\\frac{7}{5} + \\frac{1}{5} i.", "\\frac75+\\frac15i", True),
    ("x = i", "i.", True), ("\\frac{5}{2},-3.", "\\frac{5}{2}", False),
    # brace-less \\frac and \\sqrt, MATH's ",\\!" thousands, a gold the data left unclosed
    ("\\frac \\pi4 + 2 - \\sqrt2", "2", False), ("\\frac \\pi4 + 2 - \\sqrt2", "\\frac{\\pi}{4} + 2 - \\sqrt{2}", True),
    ("111, \\! 111, \\! 111", "111", False), ("111,\\!111,\\!111", "111111111", True),
    ("\\frac{5055}{2^{15}", "\\frac{5055}{2^{15}}", True),
    # an equation is not answered by the value of its right side, nor a list by its first item
    ("x^{2}+4x+20=0", "0", False), ("x=5", "5", True), ("f(x)=0", "0", True),
    ("x=0,\\frac{5\\pm\\sqrt{61}}{18}", "x=0", False), ("R=1,I=(-1,1)", "R=1", False),
    # two equations are one answer when one is a multiple of the other, not when neither has a
    # real solution
    ("x^{2}-2x+10=0", "x^{2}-2x+10=1", False), ("4x^{2}+8x+19=0", "x^2+1=0", False),
    ("\\ln\\left(e^{5}\\right)=5", "\\ln\\left(e^{6}\\right)=5", False), ("2x+3y=6", "4x+6y=12", True),
    ("(x-1)^2+(y+2)^2=9", "x^2-2x+y^2+4y-4=0", True), ("y=2x+3", "2x-y+3=0", True),
    # a whole number written with ".0" is that number exactly
    ("70000", "70001.0", False), ("70000", "70000.0", True), ("57500.0", "57501", False),
    # a number times a variable is not the number; a numeral in one base is not the same digits in another
    ("4t", "4", False), ("6m", "6", False), ("-9.8t", "-9.8", False), ("4", "4t", False), ("6m", "6 m", True),
    ("52_8", "52_9", False), ("4210_{5}", "4210_5", True), ("2516_8", "2516", True),
])
def test_verdicts_on_answers_as_extracted(gold, boxed, verdict):
    """The answer a policy writes in \\boxed{}, as the search extracts it, against the gold."""
    from rstar_fast.search.steps import ANSWER_END, parse_step

    step = f"<answer>From the result, we can see that the answer is \\boxed{{{boxed}}}.\n{ANSWER_END}"
    pred = parse_step(step, ANSWER_END).final_answer
    assert rstar_fast.grade(gold, pred) is verdict


def test_a_timed_out_comparison_is_not_remembered():
    """An overrun grades False this time only: a loaded machine may have slowed it."""
    from rstar_fast.search.grading import Grader

    with Grader(workers=1, timeout_s=0.2, compare="rstar_fast.search.grading:_sleep_compare_for_tests") as g:
        assert g.grade("1.0", "x") is False and g.timeouts == 1
        g.timeout_s = 5.0
        assert g.grade("1.0", "x") is True


def test_grading_works_with_more_than_1024_files_open():
    """select() refuses descriptors past 1023; a search process easily has that many open."""
    import resource

    from rstar_fast.search.grading import Grader

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"RLIMIT_NOFILE {soft}")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with Grader(workers=1) as g:
            assert g.grade("x+1", "1+x") is True
    finally:
        for fd in held:
            os.close(fd)


def test_a_long_reordered_list_is_matched_without_math_verify_per_pair():
    # item by item through math-verify, 30 reordered items took n^2/2 calls: past the time limit
    items = [f"x={i}" for i in range(1, 31)]
    with Grader(workers=1, timeout_s=5.0) as grader:
        assert grader.grade(", ".join(items), ", ".join(reversed(items))) is True
        assert grader.grade(", ".join(items), ", ".join(f"x={i}" for i in range(31, 1, -1))) is False
        assert grader.timeouts == 0


def test_every_way_of_grading_after_close_says_the_grader_is_closed() -> None:
    g = Grader(workers=1)
    g.close()
    with pytest.raises(GradingError, match="Grader is closed"):
        g.grade("x+1", "1+x")
    with pytest.raises(GradingError, match="Grader is closed"):
        g.grade_many([("x+1", "1+x")])
    with pytest.raises(GradingError, match="Grader is closed"):
        asyncio.run(g.agrade("x+2", "2+x"))
