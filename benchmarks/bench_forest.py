"""Forest benchmark: MCTS simulations per second, C++ forest vs pure Python, in the same run.

One simulation = select a leaf, expand it with 8 PPM-scored children, back up +1 or -1 through
one of them. Each round does one simulation in every tree (batched for the forest: one select,
one expand and one backprop call per round); 2000 trees x 32 rounds by default. The baseline is
python_tests/reference_mcts.py (one Python object per node, as the rStar-Math reference keeps
its trees), with the same semantics. Prints a markdown table, the bytes per node and the ratio
line (target: >= 100 on one thread, <= 64 bytes per node).

    python benchmarks/bench_forest.py [--trees 2000] [--rounds 32] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

# numpy's BLAS threads would only spin and steal cores from the run being measured.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
from reference_mcts import ReferenceForest  # noqa: E402

from rstar_fast._core import Forest  # noqa: E402

CHILDREN = 8


class Inputs:
    """Per-round random inputs (the PPM scores, which child the reward goes through, the reward),
    drawn before timing and shared by both implementations, so both build the same trees."""

    def __init__(self, trees: int, rounds: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.values = rng.uniform(-1.0, 1.0, size=(rounds, CHILDREN * trees)).astype(np.float32)
        self.pick = rng.integers(0, CHILDREN, size=(rounds, trees))
        self.rewards = np.where(rng.random((rounds, trees)) < 0.5, 1.0, -1.0).astype(np.float32)


def timed(gc_on: bool, fn, *args):  # type: ignore[no-untyped-def]
    """Runs fn after a full collection, with Python's cyclic GC on (the default) or off."""
    gc.collect()
    if not gc_on:
        gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


def run_forest(inputs: Inputs, trees: int, rounds: int, threads: int) -> tuple[int, float, float, Forest]:
    """Returns (simulations, wall seconds, CPU seconds, forest) for the C++ forest."""
    forest = Forest(num_threads=threads)
    roots = forest.add_trees(trees)
    counts = np.full(trees, CHILDREN, np.int64)
    rows = np.arange(trees)
    sims = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for r in range(rounds):
        leaves = forest.select(roots)
        live = leaves >= 0
        leaves = leaves[live]
        k = len(leaves)
        kids = forest.expand(leaves, counts[:k], inputs.values[r, : CHILDREN * k])
        through = kids.reshape(k, CHILDREN)[rows[:k], inputs.pick[r, :k]]
        forest.backprop(through, inputs.rewards[r, :k])
        sims += k
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert not forest.in_flight(roots).any()
    return sims, seconds, cpu, forest


def run_python(inputs: Inputs, trees: int, rounds: int) -> tuple[int, float, float, ReferenceForest]:
    """Returns (simulations, wall seconds, CPU seconds, forest) for the pure-Python reference."""
    values = inputs.values.tolist()
    picks = inputs.pick.tolist()
    rewards = inputs.rewards.tolist()
    ref = ReferenceForest()
    roots = ref.add_trees(trees)
    sims = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for r in range(rounds):
        leaves = [leaf for leaf in ref.select(roots) if leaf >= 0]
        k = len(leaves)
        kids = ref.expand(leaves, [CHILDREN] * k, values[r][: CHILDREN * k])
        through = [kids[CHILDREN * i + picks[r][i]] for i in range(k)]
        ref.backprop(through, rewards[r][:k])
        sims += k
    return sims, time.perf_counter() - start, time.process_time() - cpu_start, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, the best kept (forest and Python)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    inputs = Inputs(args.trees, args.rounds, args.seed)
    # The repeats interleave the two sides, so that a slow phase of a shared machine hits both
    # rather than one; the best run of each setting is kept.
    forest_runs: dict[int, list[tuple[int, float, float]]] = {t: [] for t in args.threads}
    py_runs: dict[bool, list[tuple[int, float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for threads in args.threads:
            sims, wall, cpu, forest = timed(True, run_forest, inputs, args.trees, args.rounds, threads)
            nodes = forest.num_nodes
            forest_visits = forest.visits(np.arange(nodes)).tolist()
            forest_runs[threads].append((sims, wall, cpu))
            del forest  # no forest alive while Python's trees are built (nor the reverse)
        for gc_on in (True, False):
            sims, wall, cpu, ref = timed(gc_on, run_python, inputs, args.trees, args.rounds)
            # Same inputs, same semantics: both must have built the same trees.
            assert ref.visits(range(ref.num_nodes)) == forest_visits, "forest and reference differ"
            del ref
            py_runs[gc_on].append((sims, wall, cpu))

    def best(name: str, runs: list[tuple[int, float, float]]) -> tuple[str, int, float, float]:
        return name, runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)

    forest_rows = [best(f"C++ forest, {t} thread{'s' if t > 1 else ''}", forest_runs[t]) for t in args.threads]
    py_rows = [best(f"pure Python (reference_mcts), GC {'on (default)' if gc_on else 'off'}", py_runs[gc_on])
               for gc_on in (True, False)]

    base_wall, base_cpu = py_rows[0][1] / py_rows[0][2], py_rows[0][1] / py_rows[0][3]
    print(f"Forest benchmark: {args.trees} trees x {args.rounds} rounds; a simulation is select, "
          f"expand {CHILDREN} scored children, backprop +-1 through one; best of "
          f"{args.repeats} runs each; {os.cpu_count()} cores.\n")
    print("| implementation | simulations | wall s | simulations/s | CPU s | simulations per CPU s "
          "| vs Python (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, sims, wall, cpu in py_rows + forest_rows:
        print(f"| {name} | {sims} | {wall:.3f} | {sims / wall:,.0f} | {cpu:.3f} | {sims / cpu:,.0f} | "
              f"{sims / cpu / base_cpu:.1f}x |")
    print(f"\nnodes per forest: {nodes}; bytes per node (payload excluded): {Forest.bytes_per_node} "
          f"(target <= 64)")
    rates = {t: r[1] / r[2] for t, r in zip(args.threads, forest_rows)}
    if 1 in rates and len(rates) > 1:
        top = max(rates)
        print(f"thread scaling (wall): {top} threads = {rates[top] / rates[1]:.2f}x one thread")
    one = forest_rows[args.threads.index(1)] if 1 in args.threads else forest_rows[0]
    no_gc = py_rows[1][1] / py_rows[1][3]
    print(f"ratio ({one[0]} / pure Python): {one[1] / one[3] / base_cpu:.0f}x CPU time, "
          f"{one[1] / one[2] / base_wall:.0f}x wall; {one[1] / one[3] / no_gc:.0f}x against Python with "
          f"GC off (target >= 100)")


if __name__ == "__main__":
    main()
