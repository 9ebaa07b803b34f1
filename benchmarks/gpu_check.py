"""Check the GPU backends (hf: and trtllm:) on a small model; print PASS or FAIL per check.

    python benchmarks/gpu_check.py                      # tiny random models built locally
    python benchmarks/gpu_check.py --policy /models/p --ppm /models/ppm --backends hf,trtllm

Run it on a machine with an NVIDIA GPU (e.g. in the image from docker/Dockerfile). Exit status
is 1 when any check fails. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from rstar_fast.engines import SamplingParams, load_policy, load_ppm

RESULTS: list[tuple[str, bool, str]] = []


async def check(name: str, fn: Callable[[], Awaitable[str]]) -> None:
    start = time.perf_counter()
    try:
        detail = await fn()
        ok = True
    except Exception as exc:  # noqa: BLE001 - a check reports, it does not stop the run
        ok, detail = False, f"{exc!r}"
        traceback.print_exc(limit=3, file=sys.stderr)
    took = time.perf_counter() - start
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name:<34} {took:6.2f}s  {detail}", flush=True)


def pick_stop(text: str) -> str | None:
    """A 3-character piece of a greedy output to use as a stop string (clean UTF-8 only)."""
    for i in range(2, len(text) - 3):
        piece = text[i : i + 3]
        if "\ufffd" not in piece:
            return piece
    return None


async def policy_checks(tag: str, spec: str, options: dict) -> None:
    policy = None

    async def load() -> str:
        nonlocal policy
        policy = load_policy(spec, **options)
        return type(policy).__name__

    await check(f"{tag}: load policy", load)
    if policy is None:
        return
    tok = policy.tokenizer
    prompt = tok.encode(
        "<|user|>:\nWhat is 12 * 7?\n<|assistant|>: Let's think step by step and solve the problem with code."
    )

    async def n_samples() -> str:
        out = await policy.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=24))
        assert len(out) == 4, f"{len(out)} completions for n=4"
        assert all(len(c.token_ids) <= 24 for c in out), "max_tokens exceeded"
        assert all(tok.decode(c.token_ids) == c.text for c in out), "token_ids do not decode to text"
        return f"lengths {[len(c.token_ids) for c in out]}"

    async def stop_kept() -> str:
        (greedy,) = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=32))
        stop = pick_stop(greedy.text)
        if stop is None:
            return f"skipped: greedy output too short ({greedy.text!r})"
        (c,) = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=32, stop=(stop,)))
        want = greedy.text[: greedy.text.find(stop) + len(stop)]
        assert c.text == want and c.stop == stop and c.finish_reason == "stop", f"{c.text!r} != {want!r}"
        return f"stop {stop!r} kept"

    async def seeds() -> str:
        params = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=1234)
        a = await policy.generate(prompt, params)
        b = await policy.generate(prompt, params)
        assert [c.text for c in a] == [c.text for c in b], "same seed, different samples"
        return "same seed, same samples"

    async def concurrent() -> str:
        start = time.perf_counter()
        outs = await asyncio.gather(
            *[policy.generate(prompt + tok.encode(f" {i}"), SamplingParams(n=4, max_tokens=32)) for i in range(64)]
        )
        took = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outs for c in o)
        batches = getattr(policy, "batches", None)
        extra = f", {batches} batches" if batches is not None else ""
        return f"64 callers x n=4: {tokens} tokens in {took:.2f}s ({tokens / took:.0f} tok/s{extra})"

    async def joins_mid_batch() -> str:
        long = asyncio.ensure_future(policy.generate(prompt, SamplingParams(temperature=0, max_tokens=512)))
        await asyncio.sleep(0.5)
        params = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=7)
        short = await policy.generate(prompt + tok.encode(" Then"), params)
        joined = not long.done()
        (whole,) = await long
        if len(whole.token_ids) < 512:
            return f"skipped: the long request ended early ({len(whole.token_ids)} tokens)"
        assert joined or not getattr(policy, "continuous", False), "the short request waited for the long one"
        alone = await policy.generate(prompt + tok.encode(" Then"), params)
        same = [c.token_ids for c in short] == [c.token_ids for c in alone]
        return f"returned while a 512-token request decoded: {joined}; same tokens as alone: {same}"

    await check(f"{tag}: n samples", n_samples)
    await check(f"{tag}: stop string kept", stop_kept)
    await check(f"{tag}: seeds reproducible", seeds)
    await check(f"{tag}: 64 concurrent callers", concurrent)
    await check(f"{tag}: a request joins a running batch", joins_mid_batch)
    await policy.close()


async def ppm_checks(tag: str, spec: str, options: dict, tok_source: str) -> None:
    from rstar_fast.engines.stops import HFTokenizer

    tok = HFTokenizer.from_path(tok_source)

    async def scores() -> str:
        ppm = load_ppm(spec, **options)
        step = "# Step 1: x = 1<end_of_step>"
        seqs = [tok.encode(f"<|user|>:\nq{i}\n<|assistant|>: " + step * (i % 5)) for i in range(48)]
        outs = await asyncio.gather(*[ppm.score(seqs[i : i + 6]) for i in range(0, 48, 6)])
        flat = [v for o in outs for v in o]
        assert len(flat) == 48 and all(-1 <= v <= 1 for v in flat), "scores outside [-1, 1]"
        (alone,) = await ppm.score([seqs[7]])
        assert abs(alone - flat[7]) < 2e-2, f"batched {flat[7]} vs alone {alone}"
        await ppm.close()
        return f"range [{min(flat):.3f}, {max(flat):.3f}]"

    await check(f"{tag}: PPM scores", scores)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", help="causal LM folder (default: a tiny random one)")
    ap.add_argument("--ppm", help="PPM folder (default: a tiny random one, both layouts)")
    ap.add_argument("--backends", default="hf,trtllm")
    ap.add_argument("--device", default="cuda", help="device of the hf backends (cpu to dry-run the script)")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    import torch

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}", flush=True)
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    elif args.device != "cpu":
        print("no CUDA device here: the checks need a GPU (--device cpu --backends hf dry-runs the script)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="rstar_gpu_check_"))
    try:
        policy, ppms = args.policy, [args.ppm] if args.ppm else []
        if policy is None or not ppms:
            from rstar_fast.engines.tiny import build_tiny_policy, build_tiny_ppm

            # head_dim 64 suits every attention kernel
            if policy is None:
                policy = str(build_tiny_policy(work / "policy", hidden_size=256, heads=4))
            if not ppms:
                ppms.append(str(build_tiny_ppm(work / "ppm", hidden_size=256, heads=4)))
                ref = work / "ppm_value_head"
                shutil.copytree(policy, ref)
                torch.save(
                    {"v_head.summary.weight": torch.randn(1, 256) * 0.1, "v_head.summary.bias": torch.zeros(1)},
                    ref / "value_head.bin",
                )
                ppms.append(str(ref))
        if "hf" in backends:
            await policy_checks("hf", f"hf:{policy}", {"device": args.device})
            for p in ppms:
                await ppm_checks(f"hf {Path(p).name}", f"hf:{p}", {"device": args.device}, p)
        if "trtllm" in backends:
            await policy_checks("trtllm", f"trtllm:{policy}", {"gpu_memory_fraction": 0.3})
            for p in ppms:
                await ppm_checks(f"trtllm {Path(p).name}", f"trtllm:{p}", {"device": args.device}, p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
