"""Step-executor throughput: StepExecutor (isolated, pre-forked) vs the reference style.

The reference style is rStar-Math's: a pebble ProcessPool whose persistent workers `exec`
each snippet in-process (no isolation) and re-run the whole prefix for every sibling.
Workloads: trivial snippets, sympy snippets, and an MCTS-shaped workload (sibling batches
of 8 steps under shared prefixes of depth 1-8, each step solving a small equation).

Both pools stay up for the whole run and the workloads alternate between them in rounds
(the order flips each round), so a change in machine load hits both sides alike.

    python benchmarks/bench_executor.py [--workers N] [--scale S] [--rounds R]

Prints a markdown table (throughput, ratio, per-snippet latency p50/p99) and a last line
`MCTS-shaped ratio (rstar_fast/reference): R` (target >= 1.5, goal 3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import time
from collections import defaultdict

from pebble import ProcessPool

from rstar_fast import StepExecutor


def _ref_init() -> None:
    import numpy  # noqa: F401  (the reference's workers have these loaded too)
    import sympy  # noqa: F401


def _ref_exec(code: str) -> str:
    """One snippet the reference way: exec in the worker process, stdout captured."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(code, {"__name__": "__main__"})
        return buf.getvalue().strip()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def trivial(i: int) -> str:
    return f"x = {i}\nprint(sum(range(x % 100)))\n"


def sympy_step(i: int) -> str:
    a = i % 7 + 1
    return (f"x{i} = sp.symbols('x{i}')\nsol{i} = sp.solve(sp.Eq({a} * x{i} ** 2 - {a + 3} * x{i}, "
            f"{i % 5}), x{i})\nprint(sol{i})\n")


def sympy_snippet(i: int) -> str:
    return "import sympy as sp\n" + sympy_step(i)


def mcts_batches(n: int, seed: int = 0, base: int = 0) -> list[tuple[str, list[str]]]:
    """n sibling batches; symbol numbers start at base (a new base: nothing cached)."""
    rng = random.Random(seed)
    out = []
    for b in range(n):
        depth = rng.randint(1, 8)
        k0 = base + 1000 * b
        prefix = "import sympy as sp\n" + "".join(sympy_step(k0 + d) for d in range(depth))
        out.append((prefix, [sympy_step(k0 + 100 + k) for k in range(8)]))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


class Reference:
    """The reference style: one pebble task per snippet, the prefix re-run per sibling."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool

    def many(self, codes: list[str]) -> None:
        for f in [self.pool.schedule(_ref_exec, args=(c,)) for c in codes]:
            f.result()

    def mcts(self, batches: list[tuple[str, list[str]]]) -> None:
        self.many([p + s for p, steps in batches for s in steps])

    def one(self, code: str) -> None:
        self.pool.schedule(_ref_exec, args=(code,)).result()


class Ours:
    def __init__(self, ex: StepExecutor) -> None:
        self.ex = ex

    def many(self, codes: list[str]) -> None:
        rs = self.ex.run_many(codes)
        assert all(r.ok for r in rs), next(r for r in rs if not r.ok)

    def mcts(self, batches: list[tuple[str, list[str]]]) -> None:
        async def go() -> list:
            return await asyncio.gather(*(self.ex.arun_siblings(p, s) for p, s in batches))

        rs = [r for b in asyncio.run(go()) for r in b]
        assert all(r.ok for r in rs), next(r for r in rs if not r.ok)

    def one(self, code: str) -> None:
        self.ex.run(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply workload sizes")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    args = ap.parse_args()
    n_triv, n_sym, n_mcts, n_lat = (max(1, int(k * args.scale)) for k in (150, 30, 8, 20))
    load0 = os.getloadavg()

    # name -> side -> [items, seconds]
    tput: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    lat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with ProcessPool(max_workers=args.workers, initializer=_ref_init) as pool, \
            StepExecutor(workers=args.workers, timeout_s=30.0) as ex:
        sides = {"reference": Reference(pool), "rstar_fast": Ours(ex)}
        for side in sides.values():  # warm: workers started, first-call costs paid
            side.many([trivial(i) for i in range(2 * args.workers)])
            side.many([sympy_snippet(i) for i in range(args.workers)])
        isolation = "namespaces" if ex.sandboxed else "limits only"
        for rnd in range(args.rounds):
            off = 10_000 * (rnd + 1)  # fresh symbols each round: no warm sympy cache reuse
            work = {
                "trivial": ([trivial(off + i) for i in range(n_triv)], n_triv, "many"),
                "sympy": ([sympy_snippet(off + i) for i in range(n_sym)], n_sym, "many"),
                "mcts": (mcts_batches(n_mcts, seed=rnd, base=100 * off), 8 * n_mcts, "mcts"),
            }
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for name, (items, n, how) in work.items():
                for s in order:
                    t = time.perf_counter()
                    getattr(sides[s], how)(items)
                    tput[name][s][0] += n
                    tput[name][s][1] += time.perf_counter() - t
            for name, make in (("trivial", trivial), ("sympy", sympy_snippet)):
                for i in range(n_lat // args.rounds or 1):
                    code = make(off + 5000 + i)
                    for s in order:
                        t = time.perf_counter()
                        sides[s].one(code)
                        lat[name][s].append(time.perf_counter() - t)
    load1 = os.getloadavg()

    def rate(name: str, s: str) -> float:
        n, secs = tput[name][s]
        return n / secs

    print(f"workers={args.workers}, isolation={isolation}, rounds={args.rounds}, "
          f"MCTS: {n_mcts} batches x 8 steps per round, prefix depth 1-8; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} cores\n")
    print("| workload | reference (pebble, exec in-process) | rstar_fast StepExecutor | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, label in (("trivial", "trivial snippets/s"), ("sympy", "sympy snippets/s"),
                        ("mcts", "MCTS-shaped steps/s")):
        r, o = rate(name, "reference"), rate(name, "rstar_fast")
        print(f"| {label} | {r:.1f} | {o:.1f} | {o / r:.2f}x |")
    for name in ("trivial", "sympy"):
        r, o = lat[name]["reference"], lat[name]["rstar_fast"]
        print(f"| {name} latency p50 / p99 (ms) | {pct(r, .5):.1f} / {pct(r, .99):.1f} | "
              f"{pct(o, .5):.1f} / {pct(o, .99):.1f} | |")
    ratio = rate("mcts", "rstar_fast") / rate("mcts", "reference")
    print(f"\nMCTS-shaped ratio (rstar_fast/reference): {ratio:.2f}")


if __name__ == "__main__":
    main()
