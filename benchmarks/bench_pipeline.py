"""Pipelined search against the reference's lockstep schedule, on the simulated engine.

Both schedules search the same synthetic problems of varied difficulty (2 to 6 steps) with
the same policy profile, PPM, executor and grader, in one run. Reported per schedule:
rollouts per second, the fraction of wall time the (simulated) engine had work, and the
driver's own CPU time (its thread's CPU time in selection, parsing, step-code building,
backprop and export) per rollout and as a share of wall time.

    python benchmarks/bench_pipeline.py --problems 2000

The last line reads `pipelined/lockstep rollouts/s ratio: R`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from rstar_fast.engines import load_policy, load_ppm
from rstar_fast.executor import StepExecutor
from rstar_fast.search.config import load_config
from rstar_fast.search.driver import SearchRunner
from rstar_fast.search.grading import Grader
from rstar_fast.search.problems import Problem, problems_from_records
from rstar_fast.synthetic import generate_problems


async def run_schedule(schedule: str, problems: list[Problem], args: argparse.Namespace,
                       executor: StepExecutor, grader: Grader) -> dict[str, float]:
    cfg = load_config(
        preset="round2",
        overrides=dict(
            schedule=schedule,
            iterations=args.iterations,
            n_generate_sample=args.samples,
            max_in_flight=args.in_flight,
            seed=args.seed,
        ),
    )
    spec = f"sim:profile={args.profile},time_scale={args.time_scale},seed={args.seed},reasoning={args.reasoning}"
    policy = load_policy(spec)
    ppm = load_ppm(f"sim:profile={args.profile},time_scale={args.time_scale},seed={args.seed}", policy=policy)
    policy.register_problems({p.question: p.answer for p in problems})
    runner = SearchRunner(cfg, policy, executor, grader, ppm=ppm)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    policy.stats.started_at = time.monotonic()
    policy.stats.busy_seconds = 0.0
    solved = 0
    async for result in runner.run(problems):
        solved += bool(result.correct)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    busy = policy.stats.busy_fraction()
    await policy.close()
    await ppm.close()
    rollouts = max(runner.rollouts_done, 1)
    driver = runner.clock.driver_seconds()
    return {
        "wall_s": wall,
        "rollouts": runner.rollouts_done,
        "rollouts_s": runner.rollouts_done / wall,
        "engine_busy": busy,
        "driver_ms_per_rollout": driver / rollouts * 1e3,
        "driver_share": driver / wall,
        "process_cpu_s": cpu,
        "solved": solved,
    }


async def main_async(args: argparse.Namespace) -> None:
    problems = problems_from_records(generate_problems(args.problems, seed=args.seed, difficulty="mixed")).problems
    results: dict[str, dict[str, float]] = {}
    with StepExecutor(workers=args.workers, timeout_s=10.0) as executor, Grader() as grader:
        for schedule in ("lockstep", "pipelined"):
            print(f"running {schedule} on {len(problems)} problems ...", file=sys.stderr, flush=True)
            results[schedule] = await run_schedule(schedule, problems, args, executor, grader)
    print(f"\n{len(problems)} synthetic problems, profile {args.profile} (time scale {args.time_scale}), "
          f"round2 preset, {args.iterations} rollouts x {args.samples} samples, {args.reasoning} reasoning lines a step, "
          f"{args.in_flight} simulations in flight, {os.cpu_count()} cores\n")
    print("| schedule | wall s | rollouts | rollouts/s | engine busy | driver ms/rollout | driver share of wall | solved |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['rollouts']} | {r['rollouts_s']:.2f} | {r['engine_busy']:.1%} "
              f"| {r['driver_ms_per_rollout']:.3f} | {r['driver_share']:.2%} | {r['solved']} |")
    ratio = results["pipelined"]["rollouts_s"] / results["lockstep"]["rollouts_s"]
    print(f"\npipelined/lockstep rollouts/s ratio: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=2, help="rollouts per problem")
    parser.add_argument("--samples", type=int, default=4, help="candidate steps per expansion")
    parser.add_argument("--in-flight", type=int, default=256, help="simulations in flight (and lockstep batch)")
    parser.add_argument("--profile", default="h100-7b")
    parser.add_argument("--time-scale", type=float, default=1.0, help="run the simulated engine this much faster")
    parser.add_argument("--reasoning", type=int, default=3,
                        help="comment lines of reasoning per simulated step (3: about 90 tokens a step, as in rStar-Math data)")
    parser.add_argument("--workers", type=int, default=0, help="executor workers (0: one per core)")
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
