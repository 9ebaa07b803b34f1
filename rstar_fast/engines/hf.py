"""Transformers backend (`hf:PATH`): a policy and a PPM on CPU or GPU.

Concurrent calls run together on a worker thread, so the event loop stays free while the model
runs. `generate` batches continuously: a decode loop of our own over a KV cache (left-padded
prompts, each prompt prefilled once and its cache shared by its n samples) takes in requests
that arrive while it runs between two decode steps, and each request leaves it as soon as its
samples end; every request keeps its own SamplingParams and its own random generator. A prompt
that extends a recent one (a child's prompt in a tree search) reuses its cached keys and values
and prefills only its tail (`rstar_fast.engines.prompt_cache`). `score`
calls in flight together form one batch; those that arrive while it runs form the next. The
sequences of one `score` call (a node's children) run their common prefix once.

Seeds: a request with `seed` draws its uniforms from its own generator seeded with it, only for
its own rows, so the same prompt, params and seed give the same samples whatever else shares the
batch (up to float differences between batched kernels; exact on CPU in float32 in practice).
Each row's token is then picked by inverting its CDF, the whole batch at once.

EOS ends a sample with finish_reason "stop" and stop None; the EOS token is left out of the text
and of token_ids. Generation stops where the model's context (`max_position_embeddings`) ends,
with finish_reason "length"; a prompt that already fills it gets empty completions, which the
search reads as unparsable steps that end the branch. For how token_ids map to the text when a
stop string ends inside a token, see `rstar_fast.engines.stops`.

PPM layouts (picked from the folder's contents):
- a sequence-classification checkpoint with one label (what TRL's reward trainer writes and
  vLLM serves): the backbone plus its `score` head;
- the reference's released layout: a causal LM folder plus `value_head.bin` (or
  `value_head.safetensors`) holding `v_head.summary.weight` [1, hidden] and
  `v_head.summary.bias` [1], TRL's ValueHead. The head runs in float32, as the reference does.
Either way the head reads the hidden state of the last token; the score is `tanh(raw / 5)`
(option `raw=True` returns the raw head output).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import random
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from rstar_fast.engines.base import (
    GREEDY_BELOW,
    BusyClock,
    Completion,
    EngineError,
    EngineSpecError,
    EngineStats,
    EngineUnavailableError,
    PolicyEngine,
    PPMEngine,
    SamplingParams,
    folder_spec,
    serving_loop,
    parse_bool,
)

try:  # before the modules of ours that import torch, so that its absence is said here
    import torch
except ImportError as _exc:
    raise EngineUnavailableError(
        "the hf engine needs torch and transformers: pip install 'rstar-fast[hf]'"
    ) from _exc

from rstar_fast.engines.prompt_cache import BLOCK, Block, PromptCache
from rstar_fast.engines.stops import HFTokenizer, StopMatcher, TextBuilder, token_bytes_table

T = TypeVar("T")
R = TypeVar("R")

VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.bin")


def _no_accelerator_news(record: logging.LogRecord) -> bool:
    return "unable to detect" not in record.getMessage()


def accelerator_available() -> bool:
    """Whether torch sees a GPU or other accelerator (torch 2.6+: CUDA, ROCm, MPS, XPU, ...)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, which transformers imports through accelerate wherever it is installed, warns
    on a machine without an accelerator that it was "unable to detect" one: there that is no
    news. Only the message is dropped; DeepSpeed still picks its device itself. Call before a
    model is built or loaded."""
    if not accelerator_available():
        logging.getLogger("DeepSpeed").addFilter(_no_accelerator_news)  # once: the same filter is not added twice


def _engine_error(name: str, exc: Exception) -> EngineError:
    """`exc` as the EngineError a caller hears: an EngineError as it is, anything else named
    after the engine, with `exc` as its cause."""
    if isinstance(exc, EngineError):
        return exc
    err = EngineError(f"{name}: {exc!r}")
    err.__cause__ = exc
    return err


class Batcher(Generic[T, R]):
    """Collects submitted items and runs them in batches on one worker thread.

    `run(items) -> results` is called on the worker with at most `max_weight` total weight per
    batch (a single heavier item still runs alone). The counter `batches` lets tests and
    benchmarks see that batches formed. A bound method `run` is held weakly: the
    batching task outlives an engine dropped without close() on a long-lived event loop, and
    must not keep its model alive.
    """

    def __init__(
        self, run: Callable[[list[T]], list[R]], weight: Callable[[T], int], max_weight: int, name: str
    ) -> None:
        self._run = weakref.WeakMethod(run) if inspect.ismethod(run) else (lambda: run)
        self._weight = weight
        self._max_weight = max(1, max_weight)
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running: list[tuple[T, asyncio.Future[R]]] = []  # the batch on the worker now
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.batches = 0

    async def submit(self, item: T) -> R:
        if self._closed:
            raise EngineError(f"{self._name}: engine is closed")
        loop = serving_loop(self._name, self._loop, bool(self._pending or self._running))
        if self._loop is not loop or self._task is None or self._task.done():
            # first use, or the engine moved to a new event loop (e.g. one per test)
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._serve(), name=f"{self._name}-batcher")
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _serve(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(0)  # let callers already scheduled join this batch
            self._wakeup.clear()
            while self._pending:
                batch: list[tuple[T, asyncio.Future[R]]] = []
                weight = 0
                while self._pending:
                    item, fut = self._pending[0]
                    w = self._weight(item)
                    if batch and weight + w > self._max_weight:
                        break
                    self._pending.popleft()
                    if fut.done():  # caller cancelled while waiting
                        continue
                    batch.append((item, fut))
                    weight += w
                if not batch:
                    continue
                self._running = batch
                await self._settle(batch)
                self._running = []

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Run a batch and hand each caller its result; a failed batch runs its items alone, so
        that one bad request fails only its own caller."""
        assert self._loop is not None
        self.batches += 1
        try:
            run = self._run()
            if run is None:
                raise EngineError(f"{self._name}: engine dropped")
            results = await self._loop.run_in_executor(self._executor, run, [item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every caller must hear of it
            if len(batch) > 1:
                for one in batch:
                    if not one[1].done():
                        await self._settle([one])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(_engine_error(self._name, exc))
            return
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)

    def abandon(self) -> None:
        """Its engine was dropped without close(): end the batching task on its loop (from
        whatever thread the collector runs in), which asyncio would otherwise destroy while
        pending, with an error in the log, and the worker thread."""
        task, loop = self._task, self._loop
        if task is not None and loop is not None and not task.done() and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        self._executor.shutdown(wait=False)  # its thread ends after the batch it may be running

    async def close(self) -> None:
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for _, fut in [*self._running, *self._pending]:
            if not fut.done():
                fut.set_exception(EngineError(f"{self._name}: engine closed"))
        self._running, self._pending = [], deque()
        # the batch on the worker runs to its end: wait for it off the event loop, which the
        # engine's other users (a policy, a server) still need meanwhile
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineSpecError(f"hf: bad device {device!r}") from exc
    if dev.type == "cpu":
        return dev
    # torch.cuda, torch.mps, torch.xpu, ... each say whether they have a device; asking torch for
    # one it lacks fails later with torch's own error
    backend: Any = getattr(torch, dev.type, None)
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise EngineUnavailableError(
            f"hf: device {device!r} asked for, but this machine or torch build has no {dev.type.upper()} device; "
            "use device='cpu' or 'auto'"
        )
    # "cuda" alone means the loading thread's current GPU; the engine makes its tensors on worker
    # threads, which start on the first one: name the index once, here
    if dev.index is None and hasattr(backend, "current_device"):
        dev = torch.device(dev.type, backend.current_device())
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            # emulated bf16 (GPUs before Ampere) is slow: those run fp16
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise EngineSpecError(f"hf: bad dtype {dtype!r}; expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _check_folder(path: str, what: str) -> Path:
    if not path:
        raise EngineSpecError(f"hf: {what} spec needs a model folder, as in 'hf:/models/my-{what}'")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise EngineSpecError(f"hf: {what} folder {path!r} does not exist (nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise EngineSpecError(f"hf: {what} folder {path!r} has no config.json")
    return folder


def _check_role(folder: Path, role: str) -> None:
    """Refuse a folder whose config.json names a model of the other role (a PPM as the policy, or
    a policy as a PPM without a value head), saying which it holds."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EngineSpecError(f"hf: {folder}/config.json cannot be read as JSON: {exc}") from exc
    archs = config.get("architectures") if isinstance(config, dict) else None
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if role == "policy" and any(a.endswith("ForSequenceClassification") for a in archs):
        raise EngineSpecError(
            f"hf: {folder} holds a sequence classifier ({', '.join(archs)}), a PPM, not a policy: "
            "load it as the PPM, and give the policy a causal LM folder"
        )
    if role == "ppm" and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise EngineSpecError(
            f"hf: {folder} holds a causal LM ({', '.join(archs)}), a policy, not a PPM: a PPM folder holds "
            f"a one-label sequence classifier, or a causal LM plus {' or '.join(VALUE_HEAD_FILES)}"
        )


def _check_ids(ids: Sequence[int], vocab: int, where: str) -> list[int]:
    out = [int(i) for i in ids]
    if not out:
        raise EngineError(f"{where}: empty token sequence")
    bad = [i for i in out if not 0 <= i < vocab]
    if bad:
        raise EngineError(f"{where}: token id {bad[0]} is outside the model vocabulary (size {vocab})")
    return out


class _GenRequest:
    """One `generate` call on its way through the decode loop. The worker thread fills
    `results` and settles `future` on the caller's event loop."""

    __slots__ = ("prompt", "params", "max_new", "abandoned", "loop", "future", "rng", "results", "waited")

    def __init__(self, prompt: list[int], params: SamplingParams, max_new: int,
                 loop: asyncio.AbstractEventLoop, rng: random.Random) -> None:
        self.prompt = prompt
        self.params = params
        self.max_new = max_new  # params.max_tokens, cut to the context left after the prompt
        self.abandoned = False  # set on the event loop when the caller is cancelled; read by the worker
        self.loop = loop
        self.future: asyncio.Future[list[Completion]] = loop.create_future()
        self.rng = rng  # the request's own draws, whoever shares its batch
        self.results: list[Completion | None] = [None] * params.n
        self.waited = 0  # decode steps spent waiting to join the running batch

    def settle(self, error: BaseException | None = None) -> None:
        """Hand the caller its completions (or `error`); from any thread, at most once."""

        def done() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result([c for c in self.results if c is not None])

        try:
            self.loop.call_soon_threadsafe(done)
        except RuntimeError:  # its event loop has closed: nobody is waiting
            pass


class _Row:
    """One sample of a request: a row of the running batch."""

    __slots__ = ("req", "index", "builder")

    def __init__(self, req: _GenRequest, index: int, builder: TextBuilder) -> None:
        self.req = req
        self.index = index  # which of the request's n samples
        self.builder = builder

    @property
    def finished(self) -> bool:
        return self.req.results[self.index] is not None

    def finish(self, comp: Completion) -> bool:
        """Record the row's completion; True when it was its request's last open row."""
        self.req.results[self.index] = comp
        return all(c is not None for c in self.req.results)


class _Batch:
    """The rows being decoded together: their KV cache, padding mask and next positions, their
    sampling settings, and the token each row feeds next. Rows join (`merge`) and leave
    (`select`) between decode steps."""

    def __init__(self, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, rows: list[_Row],
                 logits: torch.Tensor, mergeable: bool) -> None:
        dev = mask.device
        params = [r.req.params for r in rows]
        vocab = logits.shape[-1]
        self.cache = cache
        self.mergeable = mergeable  # rows may join (see `_mergeable`)
        self.mask = mask
        self.next_pos = next_pos
        self.rows = rows
        self.logits = logits  # of the next token, one row each
        self.tokens: list[int] = []
        self.temperature = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
        self.top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        self.top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
        self.filtered = torch.tensor([p.top_k > 0 or p.top_p < 1.0 for p in params], device=dev)

    _PER_ROW = ("mask", "next_pos", "logits", "temperature", "top_k", "top_p", "filtered")

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, in this order."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.reorder_cache(index)
        for name in self._PER_ROW:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.rows = [self.rows[k] for k in keep]
        self.tokens = [self.tokens[k] for k in keep]

    def trim(self) -> None:
        """Drop the leading cache positions that no row attends to (left by rows that left)."""
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start >= 16 and start * 4 >= self.mask.shape[1]:  # worth a copy of the cache
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]
            self.mask = self.mask[:, start:]

    def merge(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter (masked out). Every
        new tensor is built before any is kept, so a failure (out of memory) changes nothing."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def joined(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            pad = [0, 0] * (a.dim() - 1 - dim)
            return torch.cat([torch.nn.functional.pad(a, [*pad, width - a.shape[dim], 0]),
                              torch.nn.functional.pad(b, [*pad, width - b.shape[dim], 0])], dim=0)

        layers = [(mine, joined(mine.keys, theirs.keys, 2), joined(mine.values, theirs.values, 2))
                  for mine, theirs in zip(self.cache.layers, other.cache.layers)]
        mask = joined(self.mask, other.mask, 1)
        per_row = {name: torch.cat([getattr(self, name), getattr(other, name)], dim=0) for name in self._PER_ROW[1:]}
        for layer, keys, values in layers:
            layer.keys, layer.values = keys, values
        self.mask = mask
        for name, value in per_row.items():
            setattr(self, name, value)
        self.rows += other.rows
        self.tokens += other.tokens


def _decode_loop(ref: weakref.ReferenceType[HFPolicy]) -> None:
    """An HFPolicy's worker thread. Between spells of work it holds only a weak reference to
    the engine, so an engine dropped without close() is freed (its model too) and the thread
    ends with it."""
    while True:
        engine = ref()
        if engine is None or not engine._work():
            return
        wake, inbox = engine._wake, engine._inbox
        del engine
        with wake:
            if not inbox:
                wake.wait(timeout=1.0)  # a flush or close() wakes it; the timeout notices a drop


def _mergeable(cache: Any) -> bool:
    """Whether rows can join this cache mid-generation: plain full-attention layers only
    (sliding-window and recurrent layers keep state that left-padding would break)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is _roomy_layer() for layer in layers)


ROOM = 64  # positions of room a roomy cache layer keeps ahead of its keys and values


# the roomy layer class, made once (under the lock, whichever engine thread asks first): a
# cache is mergeable only if its layers are of this very class
_roomy: type | None = None
_roomy_lock = threading.Lock()


def _roomy_layer() -> type:
    """transformers' DynamicLayer, appending in place: its keys and values are views of buffers
    with up to ROOM more positions, so a decode step writes one position instead of copying the
    whole cache (DynamicLayer.update concatenates, which was 40% of a CPU decode step at 128
    rows of 400 positions). Whoever sets keys and values otherwise (merge, trim) leaves no room,
    and the next update makes some."""
    global _roomy
    with _roomy_lock:
        if _roomy is None:
            _roomy = _make_roomy_layer()
    return _roomy


def _make_roomy_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        room: tuple[torch.Tensor, torch.Tensor] | None = None  # the buffers keys and values view

        def _in_room(self) -> bool:
            room, keys = self.room, self.keys
            return room is not None and keys is not None and keys.data_ptr() == room[0].data_ptr() \
                and keys.stride() == room[0].stride() and keys.shape[0] == room[0].shape[0]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            used = self.get_seq_length()
            new = key_states.shape[-2]
            if not self._in_room() or used + new > self.room[0].shape[-2]:  # type: ignore[index]
                rows, heads = key_states.shape[:2]
                size = used + new + ROOM
                keys = key_states.new_empty(rows, heads, size, key_states.shape[-1])
                values = value_states.new_empty(rows, heads, size, value_states.shape[-1])
                if used:
                    keys[:, :, :used] = self.keys  # type: ignore[assignment]  # set once used
                    values[:, :, :used] = self.values  # type: ignore[assignment]
                self.room = (keys, values)
                self.device = key_states.device
                self.is_initialized = True
            keys, values = self.room  # type: ignore[misc]
            keys[:, :, used : used + new] = key_states
            values[:, :, used : used + new] = value_states
            self.keys, self.values = keys[:, :, : used + new], values[:, :, : used + new]
            return self.keys, self.values

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if not self._in_room():
                return super().reorder_cache(beam_idx)
            used = self.get_seq_length()
            index = beam_idx.to(self.room[0].device)  # type: ignore[index]
            self.room = (self.room[0].index_select(0, index), self.room[1].index_select(0, index))  # type: ignore[index]
            self.keys, self.values = self.room[0][:, :, :used], self.room[1][:, :, :used]

    return RoomyLayer


def new_cache(config: Any) -> Any:
    """A DynamicCache for a model of `config`, its full-attention layers roomy."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [_roomy_layer()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _pad(seqs: list[list[int]], pad: int, device: torch.device, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each sequence padded to the longest on the left (or the right)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        at = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, at] = torch.tensor(seq, dtype=torch.long)
        mask[row, at] = 1
    return ids.to(device), mask.to(device)


def _prompt_cache(gib: Any, usable: bool) -> PromptCache | None:
    """An engine's prompt cache of `gib` GiB (`prompt_cache_gib`), or None when it is 0 or the
    model's cache layers cannot take cached columns (`usable`)."""
    try:
        size = float(gib)
    except (TypeError, ValueError):
        size = math.nan
    if not (size >= 0 and math.isfinite(size)):
        raise EngineSpecError(f"hf: prompt_cache_gib must be a finite number >= 0, got {gib!r}")
    return PromptCache(int(size * 2**30)) if size > 0 and usable else None


def _place_cached(cache: Any, found: list[tuple[list[Block], int] | None], device: torch.device) -> torch.Tensor:
    """Put each row's cached prefix (`found`: its blocks in the prompt cache and how many of
    their positions to use, a whole number of blocks; or None) in the empty `cache`,
    left-padded to the longest; the mask of those columns, (rows, longest) and (rows, 0) when
    nothing was found."""
    cached = [f[1] if f is not None else 0 for f in found]
    width = max(cached, default=0)
    head = torch.zeros((len(found), width), dtype=torch.long, device=device)
    if not width:
        return head
    sample = next(f for f in found if f is not None)[0][0].kv
    layers, _, heads, _, dim = sample.shape
    staged = sample.new_zeros(layers, 2, len(found), heads, width, dim)
    for row, f in enumerate(found):
        if f is not None:
            blocks, n = f
            head[row, width - n :] = 1
            staged[:, :, row, :, width - n :] = torch.cat([b.kv for b in blocks[: n // BLOCK]], dim=3)
    for index, layer in enumerate(cache.layers):
        layer.update(staged[index, 0], staged[index, 1])
    return head


def _remember(prompts: PromptCache, seqs: list[list[int]], cache: Any, mask: torch.Tensor) -> None:
    """Put the keys and values of each sequence's whole blocks that `prompts` lacks in it: row
    k of `cache` holds `seqs[k]` in the columns `mask[k]` marks, in order."""
    host_mask: torch.Tensor | None = None
    for row, seq in enumerate(seqs):
        have, blocks = prompts.cached_blocks(seq), len(seq) // BLOCK
        if have >= blocks:
            continue
        if host_mask is None:  # one device sync for the batch, not a nonzero() per row
            host_mask = mask.cpu()
        columns = host_mask[row].nonzero().squeeze(1)[have * BLOCK : blocks * BLOCK].to(mask.device)
        try:
            kv = torch.stack([torch.stack((layer.keys[row].index_select(1, columns),
                                           layer.values[row].index_select(1, columns)))
                              for layer in cache.layers])
            prompts.store(seq, have, kv)
        except RuntimeError:  # out of memory (any device), or layers of unlike shapes: a cache
            prompts.clear()  # must never fail a request
            return


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: CUDA's error, or the CPU allocator's RuntimeError."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _give_way(prompts: PromptCache | None, exc: BaseException) -> None:
    """After a failed allocation, empty the prompt cache: its memory is what a retry needs."""
    if prompts is not None and _out_of_memory(exc):
        prompts.clear()


def _sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: list[float],
    filtered: torch.Tensor,
) -> torch.Tensor:
    """One token per row, by inverting each row's CDF at its uniform draw in [0, 1).

    The draws come from each request's own generator on the CPU, so the whole batch samples in
    a few kernels whatever the number of seeded requests in it. A row with top-k or top-p
    (`filtered`) inverts the CDF of its sorted, cut distribution, any other row the CDF in
    vocabulary order, whatever its batch mates use.
    """
    greedy = temperature < GREEDY_BELOW
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    u = torch.tensor(uniforms, dtype=torch.float64).to(logits.device)[:, None].float()

    def invert(probs: torch.Tensor) -> torch.Tensor:
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        # strictly below the total mass, so the pick is a token of non-zero probability
        at = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, at, right=True).squeeze(1)

    some = bool(filtered.any())
    every = some and bool(filtered.all())
    picks = None if every else invert(scaled.softmax(-1))
    if some:
        ordered, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(ordered.shape[-1], device=ordered.device)
        probs = ordered.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf")).softmax(-1)
        # nucleus: drop a token when the mass before it already reaches top_p; the most likely
        # token always stays, even for a top_p that float32 holds as 0
        probs = probs.masked_fill((probs.cumsum(-1) - probs >= top_p[:, None]) & (ranks[None, :] > 0), 0.0)
        cut = order.gather(1, invert(probs)[:, None]).squeeze(1)
        picks = cut if picks is None else torch.where(filtered, cut, picks)
    assert picks is not None
    # a greedy row of NaN logits picks no token either (argmax would give a valid-looking one)
    best = torch.where(logits.isnan().any(-1), logits.shape[-1], logits.argmax(-1))
    return torch.where(greedy, best, picks)


# spec options (`hf:FOLDER,device=cpu,dtype=bfloat16`), as the constructors' keywords
POLICY_SPEC_KEYS: dict[str, Callable[[str], Any]] = {
    "device": str, "dtype": str, "max_batch_rows": int, "seed": int, "attn_implementation": str,
    "continuous": parse_bool, "prompt_cache_gib": float}
PPM_SPEC_KEYS: dict[str, Callable[[str], Any]] = {
    "device": str, "dtype": str, "raw": parse_bool, "max_batch_seqs": int, "max_batch_tokens": int,
    "share_prefixes": parse_bool, "prompt_cache_gib": float}


class HFPolicy(PolicyEngine):
    """A causal LM served by transformers, decoding concurrent callers together.

    Continuous batching: one worker thread runs the decode loop, and a request joins the
    running batch between two decode steps (its prompt prefilled apart, its cache rows
    appended) instead of waiting for the longest sample of the batch before it to end. A
    request joins at once when the batch is idle, else when half the batch's rows have ended
    or after 16 steps of waiting, so the cache is not copied at every step. `continuous=False`
    (or a model whose cache keeps sliding-window or recurrent state) runs each batch to its
    end instead, as a static batcher does.

    Prompt cache: the keys and values of recent prompts are kept (least recently used out,
    within `prompt_cache_gib`), and a prompt that extends a cached one, as a child's prompt
    extends its parent's in a tree search, prefills only its tail. 0 turns it off.
    """

    tokenizer: HFTokenizer

    WAIT_STEPS = 16  # decode steps a request waits at most before it joins a busy batch

    def __init__(
        self,
        path: str,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_batch_rows: int | None = None,
        seed: int | None = None,
        attn_implementation: str | None = None,
        continuous: bool = True,
        prompt_cache_gib: float = 2.0,
    ) -> None:
        from transformers import AutoModelForCausalLM

        quiet_deepspeed_on_cpu()
        folder = _check_folder(path, "policy")
        _check_role(folder, "policy")
        self.path = str(folder)
        self.name = f"hf-policy:{folder.name}"
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.tokenizer = HFTokenizer.from_path(folder, "hf")
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise EngineSpecError(f"hf: cannot load a causal LM from {path!r}: {exc}") from exc
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' stub
        # transformers >= 5.2x names the KV cache argument `cache`; older ones `past_key_values`
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        # positions past the context are outside what the model was trained on: never generate there
        self.max_model_len: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.eos_ids = self.tokenizer.eos_token_ids
        self._table = token_bytes_table(self.tokenizer)
        self._rng = random.Random(seed)
        self.stats = EngineStats()
        self._clock = BusyClock(self.stats)
        # 256 on CPU too: a decode step's fixed cost (a few ms of Python per forward) is spread
        # over more rows; round 2 of the demo ran in 14-23% less time than at 64
        self.max_batch_rows = max(1, max_batch_rows or 256)
        self.continuous = continuous
        # prompts that extend a cached one prefill only their tail; plain full-attention layers
        # only, as for joining a running batch (the cached keys are placed by column)
        self.prompt_cache = _prompt_cache(prompt_cache_gib, _mergeable(new_cache(self.model.config)))
        self.batches = 0  # prefills run (a test sees coalescing through it)
        self.largest_batch = 0  # most requests decoding together
        # callers stage requests on their event loop; one flush per loop turn hands them all to
        # the worker, so requests made together are prefilled together
        self._staged: dict[asyncio.AbstractEventLoop, list[_GenRequest]] = {}
        self._inbox: deque[_GenRequest] = deque()  # guarded by _wake
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> HFPolicy:
        folder, given = folder_spec(rest, POLICY_SPEC_KEYS, "hf policy")
        return cls(folder, **{**options, **given})

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Completion]:
        prompt = _check_ids(prompt_ids, self.vocab_size, f"hf policy {self.path}")
        if self._closing:
            raise EngineError(f"{self.name}: engine is closed")
        room = params.max_tokens if self.max_model_len is None else self.max_model_len - len(prompt)
        if room <= 0:
            out = [Completion("", [], "length", None) for _ in range(params.n)]
        else:
            loop = asyncio.get_running_loop()
            rng = random.Random(params.seed if params.seed is not None else self._rng.getrandbits(63))
            req = _GenRequest(prompt, params, min(params.max_tokens, room), loop, rng)
            staged = self._staged.get(loop)
            if staged is None:
                staged = self._staged[loop] = []
                loop.call_soon(self._flush, loop)
            staged.append(req)
            try:
                with self._clock:
                    out = await req.future
            except asyncio.CancelledError:
                req.abandoned = True  # its rows stop at the next token; its batch mates go on
                raise
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.generated_tokens += sum(c.sampled_count for c in out)
        return out

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._wake:  # under the lock: close() either sees these requests or they see it
            reqs = self._staged.pop(loop, [])
            if self._closing:
                for req in reqs:
                    req.settle(EngineError(f"{self.name}: engine closed"))
                return
            self._inbox.extend(reqs)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=_decode_loop, args=(weakref.ref(self),),
                                                name=self.name, daemon=True)
                self._worker.start()
            self._wake.notify()

    async def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        worker = self._worker
        if worker is not None:
            await asyncio.to_thread(worker.join)  # it ends the batch in flight after one step
        error = EngineError(f"{self.name}: engine closed")
        with self._wake:
            for reqs in [*self._staged.values(), list(self._inbox)]:
                for req in reqs:
                    req.settle(error)
            self._staged.clear()
            self._inbox.clear()
        self.model = None  # type: ignore[assignment]
        if self.prompt_cache is not None:
            self.prompt_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- worker thread -------------------------------------------------------------------

    @torch.inference_mode()
    def _work(self) -> bool:
        """Decode until nothing is left to do: True then, False once the engine is closing."""
        batch: _Batch | None = None
        try:
            while True:
                with self._wake:
                    if self._closing:
                        return False
                    if not self._inbox and batch is None:
                        return True
                    joining = self._take(batch)
                try:
                    if batch is not None:
                        open_rows = [k for k, row in enumerate(batch.rows) if not row.finished]
                        if not open_rows:
                            batch = None
                        elif len(open_rows) < len(batch.rows) and (joining or len(open_rows) * 2 <= len(batch.rows)):
                            batch.select(open_rows)  # drop ended rows from the cache
                            if batch.mergeable:
                                batch.trim()
                    if joining:
                        batch = self._join(batch, joining)
                    if batch is not None:
                        batch = self._step(batch)
                except Exception as exc:  # noqa: BLE001 - a bug here must not strand the callers
                    err = _engine_error(self.name, exc)
                    running = [row.req for row in batch.rows] if batch is not None else []
                    for req in [*running, *joining]:
                        req.settle(err)
                    batch = None
        finally:
            error = EngineError(f"{self.name}: engine closed")
            for row in batch.rows if batch is not None else []:
                row.req.settle(error)

    def _take(self, batch: _Batch | None) -> list[_GenRequest]:
        """The waiting requests that join the batch now (called holding `_wake`)."""
        if any(req.abandoned for req in self._inbox):  # callers that left: never prefilled
            waiting = [req for req in self._inbox if not req.abandoned]
            self._inbox.clear()  # the same deque: the idle worker watches it
            self._inbox.extend(waiting)
        if not self._inbox:
            return []
        rows = 0
        if batch is not None:
            rows = sum(not row.finished for row in batch.rows)
            ready = rows * 2 <= len(batch.rows) or self._inbox[0].waited >= self.WAIT_STEPS
            if not (self.continuous and batch.mergeable and ready):
                self._inbox[0].waited += 1
                return []
        taken: list[_GenRequest] = []
        while self._inbox:
            req = self._inbox[0]
            if (rows or taken) and rows + req.params.n > self.max_batch_rows:
                break
            taken.append(self._inbox.popleft())
            rows += req.params.n
        if not taken:
            self._inbox[0].waited += 1
        return taken

    def _join(self, batch: _Batch | None, reqs: list[_GenRequest]) -> _Batch | None:
        """Prefill `reqs`, sample their first tokens and append their rows to `batch`. When that
        fails for a group, each request is tried alone, so one bad request fails only itself."""
        states = [req.rng.getstate() for req in reqs]
        try:
            group = self._prefill(reqs)
            settled = self._advance(group)
        except Exception as exc:  # noqa: BLE001 - every caller must hear of it
            _give_way(self.prompt_cache, exc)
            if len(reqs) > 1:
                for req, state in zip(reqs, states):
                    req.rng.setstate(state)
                    req.results = [None] * req.params.n
                    batch = self._join(batch, [req])
                return batch
            reqs[0].settle(_engine_error(self.name, exc))
            return batch
        for req in settled:
            req.settle()
        if all(row.finished for row in group.rows):
            return batch
        if batch is None:
            batch = group
        else:
            try:
                batch.merge(group)
            except Exception as exc:  # noqa: BLE001 - out of memory, say: the newcomers fail, the batch goes on
                err = _engine_error(self.name, exc)
                for row in group.rows:
                    row.req.settle(err)
                return batch
        self.largest_batch = max(self.largest_batch, len({id(r.req) for r in batch.rows if not r.finished}))
        return batch

    def _prefill(self, reqs: list[_GenRequest]) -> _Batch:
        """The batch of `reqs`' rows with their prompts in the cache: each prompt runs once and
        its n samples share its cache rows. Prompts with a cached prefix and prompts without are
        prefilled apart (a whole prompt would widen every tail) and their rows merged."""
        self.batches += 1
        if self.prompt_cache is None:
            return self._prefill_group(reqs, [None] * len(reqs))
        found = [self.prompt_cache.lookup(req.prompt) for req in reqs]
        batch: _Batch | None = None
        for hit in (True, False):
            group = [k for k, f in enumerate(found) if (f is not None) == hit]
            if group:
                part = self._prefill_group([reqs[k] for k in group], [found[k] for k in group])
                if batch is None:
                    batch = part
                else:
                    batch.merge(part)
        assert batch is not None
        return batch

    def _prefill_group(self, reqs: list[_GenRequest], found: list[tuple[list[Block], int] | None]) -> _Batch:
        """Prefill `reqs`' prompts past their cached prefixes (`found`, from the prompt cache):
        the cache columns hold [left-padded cached prefixes | left-padded tails], so every row
        ends at the last column as in a plain left-padded prefill."""
        cached = [f[1] if f is not None else 0 for f in found]
        ids, mask = _pad([r.prompt[n:] for r, n in zip(reqs, cached)], self.tokenizer.pad_token_id, self.device)
        positions = torch.tensor(cached, device=self.device)[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.model.config)
        mask = torch.cat([_place_cached(cache, found, self.device), mask], dim=1)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{self._cache_kw: cache},
        )
        self.stats.cached_prompt_tokens += sum(cached)  # once it ran: a failed group is run again
        if self.prompt_cache is not None:
            _remember(self.prompt_cache, [r.prompt for r in reqs], cache, mask)
        row_req = [i for i, r in enumerate(reqs) for _ in range(r.params.n)]
        expand = torch.tensor(row_req, device=self.device)
        cache.reorder_cache(expand)
        rows: list[_Row] = []
        for req in reqs:
            matcher = StopMatcher(req.params.stop)
            rows += [_Row(req, j, TextBuilder(self.tokenizer, self._table, matcher)) for j in range(req.params.n)]
        return _Batch(
            cache,
            mask.index_select(0, expand),
            positions[:, -1].index_select(0, expand) + 1,
            rows,
            out.logits[:, -1, :].float().index_select(0, expand),
            mergeable=self.continuous and _mergeable(cache),
        )

    def _step(self, batch: _Batch) -> _Batch | None:
        """Feed every row its last token and sample the next; a failure ends the whole batch."""
        try:
            step = torch.tensor(batch.tokens, device=self.device)[:, None]
            batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
            out = self.model(
                input_ids=step, attention_mask=batch.mask, position_ids=self._positions(batch.next_pos)[:, None],
                use_cache=True, **{self._cache_kw: batch.cache},
            )
            batch.logits = out.logits[:, -1, :].float()
            batch.next_pos = batch.next_pos + 1
            settled = self._advance(batch)
        except Exception as exc:  # noqa: BLE001 - every caller in the batch must hear of it
            _give_way(self.prompt_cache, exc)
            err = _engine_error(self.name, exc)
            for row in batch.rows:
                if not row.finished:
                    row.req.settle(err)
            return None
        for req in settled:
            req.settle()
        return batch

    def _positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        """Positions to feed: open rows never pass the context's last position, but ended rows
        stay in the batch until dropped, and must not pass it either (an absolute-position
        embedding would index past its end; dynamic RoPE would rescale for their batch mates)."""
        return next_pos if self.max_model_len is None else next_pos.clamp(max=self.max_model_len - 1)

    def _advance(self, batch: _Batch) -> list[_GenRequest]:
        """Sample each open row's next token from `batch.logits`; returns the requests whose
        last row ended."""
        rows = batch.rows
        # ended rows still in the cache draw nothing, so a request's draws are its own
        uniforms = [0.0 if row.finished else row.req.rng.random() for row in rows]
        tokens = _sample(batch.logits, batch.temperature, batch.top_k, batch.top_p, uniforms, batch.filtered)
        pad = self.tokenizer.pad_token_id  # what ended rows feed: a NaN row's draw is no token
        batch.tokens = [pad if row.finished else tok for row, tok in zip(rows, tokens.tolist())]
        settled: list[_GenRequest] = []
        for k, (row, tok) in enumerate(zip(rows, batch.tokens)):
            if row.finished:
                continue
            b = row.builder
            comp: Completion | None = None
            if not 0 <= tok < self.vocab_size:  # its distribution was NaN: fail it alone
                batch.tokens[k] = pad
                p = row.req.params
                row.req.results = [Completion("", [], "length", None)] * p.n  # its rows end
                row.req.settle(EngineError(
                    f"{self.name}: sampling found no token (temperature {p.temperature}, top_p {p.top_p}, "
                    f"top_k {p.top_k}; or the model gave NaN logits)"
                ))
                continue
            if tok in self.eos_ids:
                comp = Completion(*b.whole(), "stop", None, sampled=len(b.ids))
            else:
                hit = b.push(tok)
                if hit is not None:
                    text, kept = b.cut(hit[0])
                    comp = Completion(text, kept, "stop", hit[1], sampled=len(b.ids))
                elif len(b.ids) >= row.req.max_new:
                    comp = Completion(*b.whole(), "length", None, sampled=len(b.ids))
            if comp is None and row.req.abandoned:  # nobody waits for it: stop it
                comp = Completion(*b.whole(), "length", None, sampled=len(b.ids))
            if comp is not None and row.finish(comp):
                settled.append(row.req)
        # a failed request's other rows were skipped above, holding its out-of-range draw:
        # fed to the embedding next step, it would fail the whole batch
        batch.tokens = [t if 0 <= t < self.vocab_size else pad for t in batch.tokens]
        return settled


class _ValueHead(torch.nn.Module):
    """TRL's ValueHead as the reference saves it: `summary`, a Linear(hidden, 1)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.summary = torch.nn.Linear(hidden, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden)


def load_value_head(folder: Path, hidden: int) -> _ValueHead:
    """The reference's TRL value head in `folder` (value_head.*), in float32."""
    state: dict[str, torch.Tensor] | None = None
    for name in VALUE_HEAD_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        break
    assert state is not None
    state = {k.removeprefix("v_head."): v for k, v in state.items()}
    head = _ValueHead(hidden)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise EngineSpecError(
            f"hf: {folder}/value_head.* does not hold a value head for hidden size {hidden} "
            f"(expected v_head.summary.weight [1, {hidden}] and v_head.summary.bias [1]): {exc}"
        ) from exc
    return head.float()


class HFPPM(PPMEngine):
    """A PPM served by transformers: scalar head on the last token's hidden state, batched."""

    def __init__(
        self,
        path: str,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        raw: bool = False,
        max_batch_seqs: int | None = None,
        max_batch_tokens: int = 65536,
        share_prefixes: bool = True,
        prompt_cache_gib: float = 2.0,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        quiet_deepspeed_on_cpu()
        folder = _check_folder(path, "ppm")
        self.path = str(folder)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.raw = raw
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer = HFTokenizer.from_path(folder, "hf")
        try:
            if any((folder / f).is_file() for f in VALUE_HEAD_FILES):
                self.layout = "value_head"
                config = AutoConfig.from_pretrained(str(folder))
                backbone = AutoModel.from_pretrained(str(folder), dtype=self.dtype)
                head: torch.nn.Module = load_value_head(folder, int(config.hidden_size))
            else:
                self.layout = "sequence_classification"
                _check_role(folder, "ppm")
                model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=self.dtype)
                if model.config.num_labels != 1:
                    raise EngineSpecError(
                        f"hf: PPM {path!r} has {model.config.num_labels} labels; a PPM has one"
                    )
                score = getattr(model, "score", None)
                if score is None:
                    raise EngineSpecError(f"hf: PPM {path!r}: model has no `score` head")
                head, backbone = score, getattr(model, model.base_model_prefix)
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, EngineSpecError):
                raise
            raise EngineSpecError(f"hf: cannot load a PPM from {path!r}: {exc}") from exc
        self.backbone = backbone.to(self.device).eval()
        self.head = head.to(self.device).eval()
        self.vocab_size = int(self.backbone.get_input_embeddings().weight.shape[0])
        # the backbone's cache argument (as in HFPolicy), and whether calls can share a prefix on it
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # False runs every sequence whole (the benchmark's baseline)
        self.share_prefixes = share_prefixes and _mergeable(new_cache(self.backbone.config))
        # every scored sequence is kept: a node's path, scored with its siblings, is the shared
        # prefix of its own children's call when it is expanded
        self.prompt_cache = _prompt_cache(prompt_cache_gib, self.share_prefixes)
        self.stats = EngineStats()
        self._clock = BusyClock(self.stats)
        seqs = max_batch_seqs or (128 if self.device.type == "cuda" else 32)
        self._batcher: Batcher[list[list[int]], list[float]] = Batcher(
            self._score_batch, len, seqs, f"hf-ppm:{folder.name}"
        )
        weakref.finalize(self, self._batcher.abandon)

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> HFPPM:
        folder, given = folder_spec(rest, PPM_SPEC_KEYS, "hf ppm")
        return cls(folder, **{**options, **given})

    @property
    def batches(self) -> int:
        return self._batcher.batches

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        seqs = [_check_ids(s, self.vocab_size, f"hf ppm {self.path}") for s in sequences]
        if not seqs:
            return []
        with self._clock:
            out = await self._batcher.submit(seqs)
        self.stats.requests += 1
        self.stats.prompt_tokens += sum(len(s) for s in seqs)
        return out

    async def close(self) -> None:
        await self._batcher.close()
        self.backbone = self.head = None  # type: ignore[assignment]
        if self.prompt_cache is not None:
            self.prompt_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _score_batch(self, calls: list[list[list[int]]]) -> list[list[float]]:
        """Each call's scores. A call's sequences are usually one node's children: the path to
        the node, then each child's step. On a cache rows can share, the shared part of a
        call runs once and each sequence continues from it (a call of four children of a
        500-token path runs some 650 tokens instead of 2,200)."""
        values: list[list[float]] = [[0.0] * len(call) for call in calls]
        # chunks of calls of similar lengths, each within max_batch_tokens (rows x width)
        order = sorted(range(len(calls)), key=lambda c: max(map(len, calls[c])))
        start = 0
        while start < len(order):
            end = start + 1
            rows = len(calls[order[start]])
            while end < len(order):
                rows += len(calls[order[end]])
                if rows * max(map(len, calls[order[end]])) > self.max_batch_tokens:
                    break
                end += 1
            chunk = [calls[c] for c in order[start:end]]
            try:
                scores = self._score_shared(chunk) if self.share_prefixes else self._score_whole([s for call in chunk for s in call])
            except Exception as exc:  # the batcher runs the calls again one by one
                _give_way(self.prompt_cache, exc)
                raise
            at = 0
            for c in order[start:end]:
                values[c] = scores[at : at + len(calls[c])]
                at += len(calls[c])
            start = end
        return values

    def _score_whole(self, seqs: list[list[int]]) -> list[float]:
        ids, mask = _pad(seqs, self.tokenizer.pad_token_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        return self._head(hidden[:, -1, :])

    def _score_shared(self, calls: list[list[list[int]]]) -> list[float]:
        """Run each call's shared prefix (left-padded, into a cache; the part of it found in the
        prompt cache is not run again), then every sequence's own tokens (right-padded) after
        its call's prefix; read each at its last token."""
        # every sequence keeps at least its last token to run after the prefix
        shared = [min(len(os.path.commonprefix(call)), min(map(len, call)) - 1) for call in calls]
        found: list[tuple[list[Block], int] | None] = [None] * len(calls)
        if self.prompt_cache is not None:
            for c, (call, n) in enumerate(zip(calls, shared)):
                hit = self.prompt_cache.lookup(call[0]) if n >= BLOCK else None
                if hit is not None:
                    found[c] = (hit[0], min(hit[1], n // BLOCK * BLOCK))
        cached = [f[1] if f is not None else 0 for f in found]
        cache = new_cache(self.backbone.config)
        kw = {self._cache_kw: cache, "use_cache": True}
        pad = self.tokenizer.pad_token_id
        mask = _place_cached(cache, found, self.device)
        rest = [call[0][m:n] for call, m, n in zip(calls, cached, shared)]
        if any(rest):
            ids, rest_mask = _pad(rest, pad, self.device)
            positions = torch.tensor(cached, device=self.device)[:, None] + (rest_mask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([mask, rest_mask], dim=1)
            self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, **kw)
        rows = [c for c, call in enumerate(calls) for _ in call]
        if mask.shape[1]:
            index = torch.tensor(rows, device=self.device)  # each sequence's row of its call's prefix
            cache.reorder_cache(index)
            mask = mask.index_select(0, index)
        else:
            mask = torch.zeros((len(rows), 0), dtype=torch.long, device=self.device)
        seqs = [seq for call in calls for seq in call]
        tails = [seq[shared[c]:] for c, seq in zip(rows, seqs)]
        ids, tail_mask = _pad(tails, pad, self.device, left=False)
        width = ids.shape[1]
        starts = torch.tensor([shared[c] for c in rows], device=self.device)
        ends = starts + torch.tensor([len(t) - 1 for t in tails], device=self.device)
        # padding repeats its row's last position: none passes the end of its own sequence,
        # which the search holds within the context
        positions = torch.minimum(starts[:, None] + torch.arange(width, device=self.device)[None, :], ends[:, None])
        mask = torch.cat([mask, tail_mask], 1)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, **kw).last_hidden_state
        # once it ran: a failed batch is run again call by call
        self.stats.cached_prompt_tokens += sum(len(call) * n for call, n in zip(calls, cached))
        if self.prompt_cache is not None:
            _remember(self.prompt_cache, seqs, cache, mask)
        return self._head(hidden[torch.arange(len(tails), device=self.device), ends - starts])

    def _head(self, last: torch.Tensor) -> list[float]:
        raw = self.head(last.to(next(self.head.parameters()).dtype)).squeeze(-1).float()
        scores = raw.tolist()
        if not all(math.isfinite(x) for x in scores):  # the search reads NaN as "not scored"
            raise EngineError(f"the value head gave a score that is not a number ({scores}): "
                              "the model overflowed (float16?) or its weights are broken")
        return scores if self.raw else torch.tanh(raw / 5.0).tolist()
