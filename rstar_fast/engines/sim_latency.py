"""The latency model of the simulated engine: a continuously batching GPU server in miniature.

One asyncio task plays the GPU. It runs decode *iterations* over every sequence in flight, as
vLLM, SGLang and TensorRT-LLM do: each iteration emits one token for each decoding sequence
and takes `decode_base_s + decode_s_per_seq * seqs + decode_s_per_ctx_token * context_tokens`
(weights read once per iteration, plus per-sequence overhead, plus the KV cache read), so a
token's latency grows modestly with the batch. Prompt tokens missing from the prefix cache are
prefilled in chunks of at most `max_batched_tokens` per iteration at `prefill_s_per_token`;
a request starts decoding once its prompt is prefilled. At most `max_num_seqs` sequences are
admitted (a request with n samples takes n); later requests queue, first come first served.
The prefix cache keeps hashed blocks of prompt (and generated) tokens, least recently used
out first, so a tree's shared prefixes are prefilled once.

The simulator's ids are bytes, about 3.5 times as many as a BPE tokenizer such as Qwen2.5's
makes of the same math-and-code text, so the model converts with `bytes_per_token` before
charging time: a profile's numbers are per real model token.

The task sleeps until the next sequence finishes, and is woken early when a new request can
join the batch (it then joins at the next iteration boundary). Time runs `time_scale` times
faster than modeled. Blocks are scheduled on an ideal clock, so when the event loop is late the
engine catches up instead of drifting, as a GPU keeps computing while the CPU is busy; a block
due within the event loop's timer resolution (1 ms) finishes at once rather than oversleeping,
so large time scales run as fast as the CPU allows. `model_seconds` and `iterations` count the
modeled work; `stats.busy_seconds` is the same time on the real clock.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import sys
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from rstar_fast.engines.base import EngineError, EngineStats, serving_loop


@dataclass(frozen=True)
class LatencyProfile:
    """Timing of one model on one accelerator, per real (BPE) model token."""

    name: str
    prefill_s_per_token: float
    decode_base_s: float  # one decode iteration at batch 1, short context
    decode_s_per_seq: float  # added per sequence in the batch
    decode_s_per_ctx_token: float  # added per token of KV cache read in the iteration
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192  # prefill tokens per iteration (chunked prefill)
    cache_tokens: int = 900_000  # prefix-cache capacity in model tokens
    bytes_per_token: float = 3.5
    description: str = ""

    @property
    def instant(self) -> bool:
        return self.prefill_s_per_token == 0 and self.decode_base_s == 0 and \
            self.decode_s_per_seq == 0 and self.decode_s_per_ctx_token == 0


# Qwen2.5-Math-7B (bf16, 15.2 GB of weights; KV cache 28 layers x 2 x 4 KV heads x 128 dims x
# 2 bytes = 57 KB per token). Decode is memory bound: the weights are read once per iteration
# (15.2 GB / 3.35 TB/s = 4.5 ms on an H100 SXM, 7.5 ms on an A100 80GB at 2.04 TB/s), plus
# kernel and sampling overheads, which gives the ~150 (H100) and ~95 (A100) tokens/s of one
# stream that vLLM reaches; the KV cache read costs 57 KB / bandwidth at ~60% efficiency. At
# 256 sequences of 1.5k tokens an H100 iteration takes ~22 ms: ~11.6k tokens/s, in line with
# published vLLM throughput for 7B models. Prefill is compute bound: 15 GFLOP per token at
# ~55% of 989 (H100) or 312 (A100) dense bf16 TFLOP/s, i.e. ~33k and ~11k tokens/s. The prefix
# cache holds what is left of 80 GB at 90% utilisation after weights and activations
# (~52 GB / 57 KB ~ 900k tokens).
PROFILES: dict[str, LatencyProfile] = {
    p.name: p
    for p in (
        LatencyProfile(
            "h100-7b", prefill_s_per_token=30e-6, decode_base_s=6.5e-3, decode_s_per_seq=20e-6,
            decode_s_per_ctx_token=28e-9, cache_tokens=900_000,
            description="Qwen2.5-Math-7B bf16 on one H100 SXM 80GB (vLLM / TensorRT-LLM-like)",
        ),
        LatencyProfile(
            "a100-7b", prefill_s_per_token=90e-6, decode_base_s=10.5e-3, decode_s_per_seq=30e-6,
            decode_s_per_ctx_token=47e-9, cache_tokens=900_000,
            description="Qwen2.5-Math-7B bf16 on one A100 SXM 80GB",
        ),
        LatencyProfile(
            # 3.1 GB of weights: per-iteration CPU and launch overheads dominate decode
            "h100-1.5b", prefill_s_per_token=7e-6, decode_base_s=3.5e-3, decode_s_per_seq=10e-6,
            decode_s_per_ctx_token=14e-9, cache_tokens=2_500_000,
            description="Qwen2.5-Math-1.5B bf16 on one H100 SXM 80GB",
        ),
        LatencyProfile(
            "instant", prefill_s_per_token=0.0, decode_base_s=0.0, decode_s_per_seq=0.0,
            decode_s_per_ctx_token=0.0, max_num_seqs=1 << 30,
            description="no latency at all (tests, driver-overhead measurements)",
        ),
    )
}


class PrefixCache:
    """Hashed blocks of token ids, least recently used evicted first (like vLLM's APC).

    A prompt's cached length is the run of leading full blocks already present. Python's hash
    is fine here: the cache lives and dies with the process.
    """

    def __init__(self, capacity_ids: int, block_ids: int = 64) -> None:
        self.block_ids = block_ids
        self.capacity_blocks = max(1, capacity_ids // block_ids)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def _chain(self, raw: bytes, n_ids: int) -> int:
        width = 2 * self.block_ids
        blocks = self._blocks
        hit = True
        cached = 0
        h = 0
        for b in range(n_ids // self.block_ids):
            h = hash((h, raw[b * width : (b + 1) * width]))
            if hit and h in blocks:
                blocks.move_to_end(h)
                cached += self.block_ids
            else:
                hit = False
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
        return cached

    def lookup(self, raw: bytes, n_ids: int) -> int:
        """Cached ids of a prompt (2-byte ids in `raw`); its blocks are cached from now on.

        Generated blocks enter the cache when a later prompt that contains them is looked up
        (a real engine caches them as it decodes): a child's first request re-prefills at
        most one block plus its parent's last step, a small overestimate.
        """
        return self._chain(raw, n_ids)


def to_raw(ids: list[int]) -> bytes:
    """Ids as 2-byte little-endian units (the byte vocabulary fits in 16 bits)."""
    arr = array("H", ids)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


class _Request:
    __slots__ = ("n_seqs", "prefill_left", "prompt_ctx", "decode_lens", "left", "future")

    def __init__(
        self, prefill: float, prompt_ctx: float, decode_lens: list[int], future: asyncio.Future
    ) -> None:
        self.n_seqs = max(1, len(decode_lens))
        self.prefill_left = max(prefill, 1.0)  # the last prompt token is always computed
        self.prompt_ctx = prompt_ctx
        self.decode_lens = decode_lens
        self.left = len(decode_lens)
        self.future = future


_TIMER_RESOLUTION = 1e-3  # asyncio's selector timeouts are rounded up to whole milliseconds


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class BatchScheduler:
    """The GPU of the simulated engine: one task running batched iterations (see module doc)."""

    def __init__(self, profile: LatencyProfile, time_scale: float, stats: EngineStats) -> None:
        self.profile = profile
        self.time_scale = time_scale
        self.stats = stats
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.model_seconds = 0.0  # modeled engine time spent on iterations (busy time x time_scale)
        self.iterations = 0

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[_Request] = deque()  # waiting for a slot
        self._prefilling: deque[_Request] = deque()  # admitted, prompt not yet prefilled
        # decoding sequences: (finish iteration, tiebreak, request, context when finished)
        self._heap: list[tuple[int, int, _Request, float]] = []
        self._counter = 0
        self._iter = 0
        self._n_dec = 0  # sequences decoding
        self._ctx = 0.0  # model tokens of KV cache over decoding sequences
        self._admitted = 0  # sequences holding a slot
        self._live: set[_Request] = set()  # submitted and not finished, wherever they are
        self._cancelled: list[_Request] = []  # callers gone: freed at the next iteration boundary
        self._signal: asyncio.Future | None = None  # what the task awaits (idle or sleeping)
        self._task = loop.create_task(self._run())

    async def run(
        self, prefill_tokens: float, prompt_tokens: float, decode_lens: list[int]
    ) -> None:
        """Wait as long as the modeled engine takes to prefill and decode this request."""
        loop = serving_loop("sim", self._loop, bool(self._task is not None and self._live))
        if self._loop is not loop or self._task is None or self._task.done():
            self._reset(loop)
        fut = loop.create_future()
        request = _Request(prefill_tokens, prompt_tokens, decode_lens, fut)
        self._queue.append(request)
        self._live.add(request)
        if self._signal is not None and self._admissible():
            _wake(self._signal)
        try:
            await fut
        except asyncio.CancelledError:
            # nobody wants its work any more: the task frees its slots between two iterations,
            # where its counters are consistent (as an engine aborts a request)
            self._cancelled.append(request)
            if self._signal is not None:
                _wake(self._signal)
            raise
        finally:
            self._live.discard(request)

    def _admissible(self) -> bool:
        q = self._queue
        if not q:
            return False
        return self._admitted == 0 or self._admitted + q[0].n_seqs <= self.profile.max_num_seqs

    async def close(self) -> None:
        """Stop the task; requests still in flight fail with EngineError instead of hanging."""
        task, self._task = self._task, None
        if task is None:
            return
        for r in self._live:
            if not r.future.done():
                r.future.set_exception(
                    EngineError("sim engine closed while a request was in flight")
                )
        if not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    async def _run(self) -> None:
        p = self.profile
        scale = self.time_scale
        loop = self._loop
        assert loop is not None
        t = loop.time()  # real time at the start of the current block of iterations
        while True:
            if self._cancelled:
                self._drop_cancelled()
            if not (self._queue or self._prefilling or self._heap):
                self._signal = loop.create_future()
                await self._signal
                self._signal = None
                t = max(t, loop.time())
                continue  # what woke it may be a cancellation
            while self._admissible():
                r = self._queue.popleft()
                self._admitted += r.n_seqs
                self._prefilling.append(r)
            # the first iteration of the block carries a chunk of prefill
            budget = float(p.max_batched_tokens)
            prefill = 0.0
            prefilled: list[_Request] = []
            while self._prefilling and budget > 0:
                r = self._prefilling[0]
                take = min(r.prefill_left, budget)
                r.prefill_left -= take
                budget -= take
                prefill += take
                if r.prefill_left > 1e-9:
                    break
                prefilled.append(self._prefilling.popleft())
            n, ctx = self._n_dec, self._ctx
            first = p.decode_base_s + p.decode_s_per_seq * n + p.decode_s_per_ctx_token * ctx
            extra = prefill * p.prefill_s_per_token
            growth = p.decode_s_per_ctx_token * n

            def span(m: int) -> float:  # real seconds of the block's first m iterations
                return (m * first + growth * m * (m - 1) / 2 + extra) / scale

            if self._prefilling or prefilled or not self._heap:
                k = 1
            else:
                k = max(1, self._heap[0][0] - self._iter)
            end = t + span(k)
            while True:
                now = loop.time()
                if now >= end - _TIMER_RESOLUTION:
                    # due, or too close for the event loop's millisecond timers: finish the
                    # block now (at most a millisecond early; the ideal clock stays exact),
                    # letting other tasks run first
                    await asyncio.sleep(0)
                    break
                self._signal = loop.create_future()
                handle = loop.call_at(end, _wake, self._signal)
                await self._signal
                handle.cancel()
                self._signal = None
                if k > 1 and (self._admissible() or self._cancelled):
                    # a new request joins, or a cancelled one leaves, at the end of the
                    # iteration in progress
                    now = loop.time()
                    m = 1
                    while m < k and t + span(m) <= now:
                        m += 1
                    k = m
                    end = t + span(k)
            self._iter += k
            self._ctx += n * k
            self.stats.busy_seconds += end - t
            self.model_seconds += (end - t) * scale
            self.iterations += k
            t = end
            for r in prefilled:
                if not r.decode_lens:  # scoring only (PPM): done once prefilled
                    self._admitted -= r.n_seqs
                    _wake(r.future)
                    continue
                for length in r.decode_lens:
                    self._counter += 1
                    entry = (self._iter + length, self._counter, r, r.prompt_ctx + length)
                    heapq.heappush(self._heap, entry)
                    self._n_dec += 1
                    self._ctx += r.prompt_ctx
            heap = self._heap
            while heap and heap[0][0] <= self._iter:
                _, _, r, final_ctx = heapq.heappop(heap)
                self._n_dec -= 1
                self._ctx -= final_ctx
                self._admitted -= 1
                r.left -= 1
                if r.left == 0:
                    _wake(r.future)

    def _drop_cancelled(self) -> None:
        """Take the cancelled requests out of the queue, the prefill and the decoding batch,
        with their slots, sequences and KV cache (called between two iterations)."""
        gone = set(self._cancelled)
        self._cancelled.clear()
        self._queue = deque(r for r in self._queue if r not in gone)  # queued: no slot held yet
        for r in self._prefilling:
            if r in gone:
                self._admitted -= r.n_seqs
        self._prefilling = deque(r for r in self._prefilling if r not in gone)
        kept = []
        for entry in self._heap:
            finish, _, r, final_ctx = entry
            if r in gone:
                self._n_dec -= 1
                self._ctx -= final_ctx - (finish - self._iter)  # its context so far
                self._admitted -= 1
            else:
                kept.append(entry)
        heapq.heapify(kept)
        self._heap = kept


def decode_iterations(n_ids: int, bytes_per_token: float) -> int:
    """Decode iterations for a completion of `n_ids` byte ids (at least one: EOS)."""
    return max(1, math.ceil(n_ids / bytes_per_token))
