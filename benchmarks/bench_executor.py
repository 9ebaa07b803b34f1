"""Step-executor throughput: StepExecutor (isolated, pre-forked) vs the reference style.

The reference style is rStar-Math's: a pebble ProcessPool whose persistent workers `exec`
each snippet in-process (no isolation) and re-run the whole prefix for every sibling.
Workloads: trivial snippets, sympy snippets, and an MCTS-shaped workload (sibling batches
of 8 steps under shared prefixes of depth 1-8, each step solving a small equation).

    python benchmarks/bench_executor.py [--workers N] [--scale S]

Prints a markdown table and the MCTS ratio line (target >= 1.5x, goal 3x).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import time

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


def mcts_batches(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for b in range(n):
        depth = rng.randint(1, 8)
        prefix = "import sympy as sp\n" + "".join(sympy_step(1000 * b + d) for d in range(depth))
        out.append((prefix, [sympy_step(1000 * b + 100 + k) for k in range(8)]))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def bench_reference(pool: ProcessPool, codes: list[str]) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    futs = [pool.schedule(_ref_exec, args=(c,)) for c in codes]
    outs = [f.result() for f in futs]
    return time.perf_counter() - t0, outs


def ref_latencies(pool: ProcessPool, codes: list[str]) -> list[float]:
    lat = []
    for c in codes:
        t = time.perf_counter()
        pool.schedule(_ref_exec, args=(c,)).result()
        lat.append(time.perf_counter() - t)
    return lat


def ours_latencies(ex: StepExecutor, codes: list[str]) -> list[float]:
    lat = []
    for c in codes:
        t = time.perf_counter()
        ex.run(c)
        lat.append(time.perf_counter() - t)
    return lat


async def _ours_mcts(ex: StepExecutor, batches: list[tuple[str, list[str]]]) -> list[str]:
    rs = await asyncio.gather(*(ex.arun_siblings(p, s) for p, s in batches))
    return [r.output for b in rs for r in b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply workload sizes")
    args = ap.parse_args()
    n_triv, n_sym, n_mcts, n_lat = (int(k * args.scale) or 1 for k in (200, 60, 16, 30))
    triv = [trivial(i) for i in range(n_triv)]
    sym = [sympy_snippet(i) for i in range(n_sym)]
    batches = mcts_batches(n_mcts)
    mcts_flat = [p + s for p, steps in batches for s in steps]
    n_steps = len(mcts_flat)

    rows = []
    with ProcessPool(max_workers=args.workers, initializer=_ref_init) as pool:
        bench_reference(pool, triv[:20])  # warm
        rt, _ = bench_reference(pool, triv)
        rs_, _ = bench_reference(pool, sym)
        rm, ref_out = bench_reference(pool, mcts_flat)
        rlat = ref_latencies(pool, sym[:n_lat])
    with StepExecutor(workers=args.workers, timeout_s=30.0) as ex:
        ex.run_many(triv[:20])  # warm
        t = time.perf_counter()
        ex.run_many(triv)
        ot = time.perf_counter() - t
        t = time.perf_counter()
        ex.run_many(sym)
        os_ = time.perf_counter() - t
        t = time.perf_counter()
        our_out = asyncio.run(_ours_mcts(ex, batches))
        om = time.perf_counter() - t
        olat = ours_latencies(ex, sym[:n_lat])
        isolation = "namespaces" if ex.sandboxed else "limits only"
    assert len(our_out) == len(ref_out) == n_steps

    rows.append(("trivial snippets/s", n_triv / rt, n_triv / ot))
    rows.append(("sympy snippets/s", n_sym / rs_, n_sym / os_))
    rows.append(("MCTS-shaped steps/s", n_steps / rm, n_steps / om))
    print(f"workers={args.workers}, isolation={isolation}, MCTS: {n_mcts} batches x 8 steps, "
          "prefix depth 1-8\n")
    print("| workload | reference (pebble, exec in-process) | rstar_fast StepExecutor | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, r, o in rows:
        print(f"| {name} | {r:.1f} | {o:.1f} | {o / r:.2f}x |")
    print(f"| sympy latency p50 / p99 (ms) | {pct(rlat, .5):.1f} / {pct(rlat, .99):.1f} | "
          f"{pct(olat, .5):.1f} / {pct(olat, .99):.1f} | |")
    ratio = (n_steps / om) / (n_steps / rm)
    print(f"\nMCTS-shaped throughput ratio: {ratio:.2f}x the reference "
          f"(target 1.5x, goal 3x){'' if ratio >= 1.5 else '  BELOW TARGET'}")


if __name__ == "__main__":
    main()
