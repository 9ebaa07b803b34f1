"""TensorRT-LLM backend (`trtllm:PATH`), the optional extra `[trtllm]`.

    policy = load_policy("trtllm:/models/qwen2.5-math-7b", gpu_memory_fraction=0.7)
    ppm = load_ppm("trtllm:/models/ppm-7b")

The policy runs on TensorRT-LLM's high-level `LLM` API (PyTorch backend by default, or an
engine folder), with KV-cache block reuse on, since tree prefixes repeat constantly and every
expansion of a node resends the same prefix. Each `generate` is one `generate_async` request
(token-id prompt, n samples, stop strings with `include_stop_str_in_output`); TensorRT-LLM
batches whatever is in flight in its own scheduler (in-flight batching), so nothing is batched
here. Options: `gpu_memory_fraction` (KV cache share of free memory, default 0.85; lower it when
the PPM shares the GPU), `tensor_parallel_size`, `dtype`, `max_batch_size`, `max_num_tokens`,
`max_seq_len`, `backend`, and `llm_kwargs` (a dict passed to `LLM` as is).

The PPM goes through the transformers PPM (`HFPPM`) on the same GPU: TensorRT-LLM's `LLM` API
generates text and has no stable API across releases for running a one-label
sequence-classification head or the reference's `value_head.bin` over a prompt, so the value
model stays in transformers, batched the same way as the `hf:` PPM. Both PPM layouts load.

The stop string is kept (and re-appended from `stop_reason` if a release drops it); EOS ends a
sample with stop None and is left out of the text and ids. `token_ids` are TensorRT-LLM's when
they decode to the text exactly, else the text re-encoded (see `rstar_fast.engines.stops`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rstar_fast.engines.base import (
    BusyClock,
    Completion,
    EngineError,
    EngineSpecError,
    EngineStats,
    EngineUnavailableError,
    PolicyEngine,
    PPMEngine,
    SamplingParams,
)
from rstar_fast.engines.stops import HFTokenizer, StopMatcher

INSTALL_HINT = (
    "the trtllm engine needs TensorRT-LLM: pip install 'rstar-fast[trtllm]' on a machine with an "
    "NVIDIA GPU, or use the image built from docker/Dockerfile"
)


def import_tensorrt_llm() -> Any:
    """The tensorrt_llm module, or EngineUnavailableError naming the extra."""
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise EngineUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a broken install (CUDA libraries, MPI) fails on import too
        raise EngineUnavailableError(f"tensorrt_llm is installed but does not import: {exc!r}") from exc
    return tensorrt_llm


def parse_path(rest: str, role: str) -> Path:
    """The model folder named by a `trtllm:` spec; the folder must exist (nothing is downloaded)."""
    if not rest:
        raise EngineSpecError(f"trtllm: {role} spec needs a model folder, as in 'trtllm:/models/my-{role}'")
    folder = Path(rest).expanduser()
    if not folder.is_dir():
        raise EngineSpecError(f"trtllm: {role} folder {rest!r} does not exist (nothing is downloaded)")
    return folder


def _accepted(cls: Any) -> set[str]:
    """Keyword names a TensorRT-LLM class accepts (fields move between releases)."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    fields = getattr(cls, "model_fields", None)  # pydantic models
    if fields:
        return set(fields)
    return set(inspect.signature(cls).parameters)


def finish_completion(
    text: str,
    token_ids: Sequence[int] | None,
    reason: Any,
    said_stop: Any,
    params: SamplingParams,
    matcher: StopMatcher,
    tokenizer: HFTokenizer,
    eos_id: int,
) -> Completion:
    """A Completion from a backend's raw output, with the stop string kept and ids matching text."""
    hit = matcher.first_in_text(text)
    if hit is not None:
        text, finish, stop = text[: hit[0]], "stop", hit[1]
    elif reason == "stop" and isinstance(said_stop, str) and said_stop in params.stop:
        text, finish, stop = text + said_stop, "stop", said_stop
    elif reason in ("stop", "length"):
        finish, stop = str(reason), None
    else:
        raise EngineError(f"trtllm: request ended with finish_reason {reason!r}")
    ids = [int(i) for i in token_ids or []]
    while ids and ids[-1] == eos_id:
        ids.pop()
    if tokenizer.decode(ids) != text:
        ids = tokenizer.encode(text)
    return Completion(text, ids, finish, stop)  # type: ignore[arg-type]


class TRTLLMPolicy(PolicyEngine):
    """A policy on TensorRT-LLM's LLM API with KV-cache block reuse and in-flight batching."""

    def __init__(
        self,
        path: str,
        gpu_memory_fraction: float = 0.85,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        max_seq_len: int | None = None,
        backend: str | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        folder = parse_path(path, "policy")
        trt = import_tensorrt_llm()
        from tensorrt_llm.llmapi import KvCacheConfig

        self.path = str(folder)
        self.tokenizer = HFTokenizer.from_path(folder, "trtllm")
        self._trt = trt
        kwargs: dict[str, Any] = {
            "model": str(folder),
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "kv_cache_config": KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=gpu_memory_fraction),
        }
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_num_tokens", max_num_tokens),
            ("max_seq_len", max_seq_len),
            ("backend", backend),
        ):
            if value is not None:
                kwargs[name] = value
        kwargs.update(llm_kwargs or {})
        try:
            self.llm = trt.LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 - TensorRT-LLM raises many kinds on a bad model
            raise EngineError(f"trtllm: cannot load {path!r}: {exc!r}") from exc
        self._sampling_fields = _accepted(trt.SamplingParams)
        self.stats = EngineStats()
        self._clock = BusyClock(self.stats)

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> TRTLLMPolicy:
        return cls(rest, **options)

    def sampling_params(self, params: SamplingParams) -> Any:
        """Our SamplingParams as TensorRT-LLM's (greedy as top_k=1; -1 top_k as no cut)."""
        greedy = params.temperature == 0
        wanted: dict[str, Any] = {
            "n": params.n,
            "max_tokens": params.max_tokens,
            "temperature": None if greedy else params.temperature,
            "top_k": 1 if greedy else (params.top_k if params.top_k > 0 else None),
            "top_p": None if greedy or params.top_p >= 1.0 else params.top_p,
            "stop": list(params.stop) or None,
            "include_stop_str_in_output": True,
            "seed": params.seed,
            "end_id": self.tokenizer.eos_token_id,
            "pad_id": self.tokenizer.pad_token_id,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "detokenize": True,
        }
        return self._trt.SamplingParams(**{k: v for k, v in wanted.items() if k in self._sampling_fields})

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Completion]:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise EngineError(f"trtllm policy {self.path}: empty prompt")
        request = self.llm.generate_async(prompt, self.sampling_params(params))
        with self._clock:
            try:
                result = await (request.aresult() if hasattr(request, "aresult") else request)
            except asyncio.CancelledError:
                if hasattr(request, "abort"):
                    request.abort()
                raise
            except Exception as exc:  # noqa: BLE001
                raise EngineError(f"trtllm policy {self.path}: request failed: {exc!r}") from exc
        matcher = StopMatcher(params.stop)
        outs = sorted(result.outputs, key=lambda o: getattr(o, "index", 0))
        if len(outs) != params.n:
            raise EngineError(f"trtllm policy {self.path}: {len(outs)} outputs for n={params.n}")
        comps = [
            finish_completion(
                o.text, o.token_ids, o.finish_reason, getattr(o, "stop_reason", None), params, matcher,
                self.tokenizer, self.tokenizer.eos_token_id,
            )
            for o in outs
        ]
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.generated_tokens += sum(len(o.token_ids or []) for o in outs)
        return comps

    async def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and hasattr(llm, "shutdown"):
            await asyncio.to_thread(llm.shutdown)


class TRTLLMPPM(PPMEngine):
    """The PPM beside a TensorRT-LLM policy: the transformers PPM on the same GPU (see above)."""

    def __init__(self, path: str, device: str = "cuda", **options: Any) -> None:
        folder = parse_path(path, "ppm")
        from rstar_fast.engines.hf import HFPPM  # EngineUnavailableError without torch
        self.inner = HFPPM(str(folder), device=device, **options)
        self.stats = self.inner.stats
        self.tokenizer = self.inner.tokenizer  # the search compares it with the policy's

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> TRTLLMPPM:
        return cls(rest, **options)

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        return await self.inner.score(sequences)

    async def close(self) -> None:
        await self.inner.close()
