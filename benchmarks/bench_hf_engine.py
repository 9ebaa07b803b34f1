"""The transformers engines (hf:) with concurrent callers coalesced, against one request at a time.

Many coroutines call `generate` (and `score`) at once, as the search does. The baseline is the
same engine with its batch capped at one request, so each request runs alone; the measured run
lets the engine coalesce whatever is in flight. Then a stream, as a search makes it: each
caller makes several requests in a row, of mixed lengths (8 to twice --max-tokens new tokens),
so requests arrive while others decode; continuous batching (the default) against the same
engine with `continuous=False`, which runs each batch to its end before the next starts. All
runs use the same randomly initialised Qwen2-style model (built locally, nothing downloaded),
the same prompts, seeds and lengths.

    python benchmarks/bench_hf_engine.py                              # small model, CPU
    python benchmarks/bench_hf_engine.py --hidden 1536 --layers 28 --heads 12 --prompt-len 512

Score calls as the search makes them follow: each the children of one node (a path, then each
child's step), the path run once per call against once per sequence (`share_prefixes=False`).

Last, a tree search's shape: each caller expands a node (n samples of a step, then the PPM
scores the children) and descends into one child, --depth times; every prompt extends the one
before, which the engines' prompt caches serve (the default) against the same engines with
`prompt_cache_gib=0`, which prefill every prompt whole.

The last lines read `generate: coalesced/one at a time tokens/s ratio: R`, the same for PPM
sequences scored per second, `children: shared prefix/whole seqs/s ratio: R`,
`stream: continuous/static tokens/s ratio: R` and `tree: prompt cache/no cache expansions/s ratio: R`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from rstar_fast.engines import SamplingParams, load_policy, load_ppm
from rstar_fast.engines.tiny import build_tiny_policy, build_tiny_ppm


def prompts(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed)
    # printable bytes: the byte tokenizer's ids 0-255 are bytes; specials sit above them
    return [[rng.randrange(32, 127) for _ in range(args.prompt_len)] for _ in range(args.callers)]


async def time_policy(path: Path, args: argparse.Namespace, one_at_a_time: bool) -> tuple[float, int, str]:
    options = {"device": args.device, "dtype": args.dtype}
    if one_at_a_time:
        options["max_batch_rows"] = args.n
    policy = load_policy(f"hf:{path}", **options)
    batch = prompts(args)
    params = [SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=args.seed + i)
              for i in range(args.callers)]
    await policy.generate(batch[0][:16], SamplingParams(max_tokens=4))  # warm-up: kernels, allocator
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[policy.generate(p, sp) for p, sp in zip(batch, params)])
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for out in outs for c in out)
    batches = policy.batches - 1
    await policy.close()
    return wall, tokens, f"{batches} batches"


async def time_ppm(path: Path, args: argparse.Namespace, one_at_a_time: bool) -> tuple[float, int, str]:
    options = {"device": args.device, "dtype": args.dtype}
    if one_at_a_time:
        options["max_batch_seqs"] = args.ppm_seqs
    ppm = load_ppm(f"hf:{path}", **options)
    rng = random.Random(args.seed)
    calls = [
        [[rng.randrange(32, 127) for _ in range(rng.randint(args.prompt_len // 2, args.prompt_len))]
         for _ in range(args.ppm_seqs)]
        for _ in range(args.callers)
    ]
    await ppm.score(calls[0][:1])
    t0 = time.perf_counter()
    await asyncio.gather(*[ppm.score(c) for c in calls])
    wall = time.perf_counter() - t0
    batches = ppm.batches - 1
    await ppm.close()
    return wall, args.callers * args.ppm_seqs, f"{batches} batches"


async def time_children(path: Path, args: argparse.Namespace, shared: bool) -> tuple[float, int, str]:
    """Score calls as the search makes them: one node's children each, a path of --prompt-len
    tokens and then each child's step (--max-tokens); its common prefix run once per call
    (`shared`) or with every sequence."""
    ppm = load_ppm(f"hf:{path}", device=args.device, dtype=args.dtype, share_prefixes=shared)
    rng = random.Random(args.seed)
    calls = []
    for _ in range(args.callers):
        node = [rng.randrange(32, 127) for _ in range(args.prompt_len)]
        calls.append([node + [rng.randrange(32, 127) for _ in range(args.max_tokens)] for _ in range(args.ppm_seqs)])
    await ppm.score(calls[0][:1])
    t0 = time.perf_counter()
    await asyncio.gather(*[ppm.score(c) for c in calls])
    wall = time.perf_counter() - t0
    await ppm.close()
    return wall, args.callers * args.ppm_seqs, f"{args.prompt_len}-token path, {args.max_tokens}-token steps"


async def time_stream(path: Path, args: argparse.Namespace, continuous: bool) -> tuple[float, int, str]:
    """Wall time, tokens and mean request latency of the streaming workload."""
    policy = load_policy(f"hf:{path}", device=args.device, dtype=args.dtype, continuous=continuous)
    rng = random.Random(args.seed)
    work = [
        [([rng.randrange(32, 127) for _ in range(rng.randint(args.prompt_len // 4, args.prompt_len))],
          SamplingParams(n=args.n, temperature=1.0, max_tokens=rng.randint(8, 2 * args.max_tokens), seed=rng.randrange(2**31)))
         for _ in range(args.stream_requests)]
        for _ in range(args.callers)
    ]
    latencies: list[float] = []

    async def caller(requests: list) -> int:
        made = 0
        for prompt, params in requests:
            t = time.perf_counter()
            out = await policy.generate(prompt, params)
            latencies.append(time.perf_counter() - t)
            made += sum(len(c.token_ids) for c in out)
        return made

    await policy.generate(work[0][0][0][:16], SamplingParams(max_tokens=4))
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[caller(w) for w in work]))
    wall = time.perf_counter() - t0
    await policy.close()
    return wall, tokens, f"mean latency {sum(latencies) / len(latencies):.2f}s"


async def time_tree(paths: tuple[Path, Path], args: argparse.Namespace, cached: bool) -> tuple[float, int, str]:
    """Expansions per second down --callers paths of a tree, policy and PPM together."""
    gib = {} if cached else {"prompt_cache_gib": 0.0}
    policy = load_policy(f"hf:{paths[0]}", device=args.device, dtype=args.dtype, **gib)
    ppm = load_ppm(f"hf:{paths[1]}", device=args.device, dtype=args.dtype, **gib)
    rng = random.Random(args.seed)
    roots = [[rng.randrange(32, 127) for _ in range(args.prompt_len)] for _ in range(args.callers)]

    async def descend(node: list[int], seed: int) -> None:
        for depth in range(args.depth):
            params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=seed + depth)
            children = [node + c.token_ids for c in await policy.generate(node, params)]
            await ppm.score(children)
            node = children[(seed + depth) % len(children)]

    await policy.generate(roots[0][:16], SamplingParams(max_tokens=4))
    t0 = time.perf_counter()
    await asyncio.gather(*[descend(root, 1000 * i) for i, root in enumerate(roots)])
    wall = time.perf_counter() - t0
    detail = (f"prompt tokens cached: policy {policy.stats.cached_prompt_tokens}/{policy.stats.prompt_tokens}, "
              f"PPM {ppm.stats.cached_prompt_tokens}/{ppm.stats.prompt_tokens}")
    await policy.close()
    await ppm.close()
    return wall, args.callers * args.depth, detail


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--callers", type=int, default=32, help="concurrent generate / score calls")
    ap.add_argument("--n", type=int, default=4, help="samples per generate call")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--ppm-seqs", type=int, default=8, help="sequences per score call")
    ap.add_argument("--stream-requests", type=int, default=4, help="requests each caller makes in a row")
    ap.add_argument("--depth", type=int, default=4, help="expansions down each path of the tree workload")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads; {where}; "
          f"{args.callers} callers, n={args.n}, {args.max_tokens} new tokens, prompts {args.prompt_len} tokens")
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        size = dict(hidden_size=args.hidden, layers=args.layers, heads=args.heads)
        policy = build_tiny_policy(Path(tmp) / "policy", **size)
        ppm = build_tiny_ppm(Path(tmp) / "ppm", **size)
        ratios = []
        # (what, unit, timed, model, (baseline label, its flag), (measured label, its flag))
        comparisons = (
            ("generate", "tokens", time_policy, policy, ("one at a time", True), ("coalesced", False)),
            ("score", "seqs", time_ppm, ppm, ("one at a time", True), ("coalesced", False)),
            ("children", "seqs", time_children, ppm, ("whole", False), ("shared prefix", True)),
            ("stream", "tokens", time_stream, policy, ("static", False), ("continuous", True)),
            ("tree", "expansions", time_tree, (policy, ppm), ("no cache", False), ("prompt cache", True)),
        )
        for what, unit, timed, path, baseline, measured in comparisons:
            rates = {}
            for label, flag in (baseline, measured):
                wall, count, detail = await timed(path, args, flag)
                rates[label] = count / wall
                print(f"{what:<9} {label:<14} {count:>7} {unit:<10} in {wall:7.2f}s  "
                      f"{count / wall:9.1f} {unit}/s  {detail}")
            ratios.append(f"{what}: {measured[0]}/{baseline[0]} {unit}/s ratio: "
                          f"{rates[measured[0]] / rates[baseline[0]]:.2f}")
    print("\n".join(ratios))


if __name__ == "__main__":
    asyncio.run(main())
