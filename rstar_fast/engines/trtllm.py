"""TensorRT-LLM backend (`trtllm:PATH`), the optional extra `[trtllm]`.

    policy = load_policy("trtllm:/models/qwen2.5-math-7b", gpu_memory_fraction=0.7)
    ppm = load_ppm("trtllm:/models/ppm-7b")

The policy runs on TensorRT-LLM's high-level `LLM` API (its default backend, PyTorch in 1.x;
`backend="tensorrt"` for an engine folder), with KV-cache block reuse on, since tree prefixes
repeat constantly and every expansion of a node resends the same prefix. Each `generate` is one
`generate_async` request (token-id prompt, n samples, stop strings with
`include_stop_str_in_output`); TensorRT-LLM batches whatever is in flight in its own scheduler
(in-flight batching), so nothing is batched here. Options: `gpu_memory_fraction` (KV cache share
of free memory, default 0.85; lower it when the PPM shares the GPU), `tensor_parallel_size`,
`dtype`, `max_batch_size`, `max_num_tokens`, `max_seq_len`, `backend`, and `llm_kwargs` (a dict
passed to `LLM` as is).

The request leaves `end_id` and `pad_id` to TensorRT-LLM: only then does it set itself up from
the model folder's tokenizer, which is what turns stop strings into the ids it stops on. The
model's other end-of-generation ids (Qwen's `<|im_end|>`) go as `stop_token_ids`, as the hf
engine stops on them too. Sampling sends `top_p` even at 1.0 (some releases read top_k and top_p
both unset as greedy); greedy (a temperature below 1e-5, as vLLM and the hf engine) asks for one
sample and repeats it n times (TensorRT-LLM refuses n > 1 greedy). Seeds are honoured as far as
the release's sampler does (the PyTorch sampler of early 1.x releases ignores them).

The PPM goes through the transformers PPM (`HFPPM`) on the same GPU: TensorRT-LLM's `LLM` API
generates text and has no stable API across releases for running a one-label
sequence-classification head or the reference's `value_head.bin` over a prompt, so the value
model stays in transformers, batched the same way as the `hf:` PPM. Both PPM layouts load.

Outputs come back as token ids (`detokenize=False`) and are decoded here with the model's
tokenizer, as the hf engine decodes: the text does not depend on the release's detokenizer, and
a release that checks stop strings in text does not end a whole n > 1 request when its first
sample stops. The stop string is kept (and re-appended from `stop_reason` if a release drops
it); EOS ends a sample with stop None and is left out of the text and ids. A sample a release
returns without a finish reason (n > 1 sequences that ended before the last) ended on EOS, or
at max_tokens when it has that many. `token_ids` are TensorRT-LLM's when they decode to the
text exactly, else the text re-encoded (see `rstar_fast.engines.stops`).
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
    folder_spec,
)
from rstar_fast.engines.stops import HFTokenizer, StopMatcher, finished_text

INSTALL_HINT = (
    "the trtllm engine needs TensorRT-LLM: pip install 'rstar-fast[trtllm]' on a machine with an "
    "NVIDIA GPU, or use the image built from docker/Dockerfile"
)


# spec options (`trtllm:FOLDER,gpu_memory_fraction=0.6`), as the constructor's keywords
POLICY_SPEC_KEYS: dict[str, Any] = {
    "gpu_memory_fraction": float, "tensor_parallel_size": int, "dtype": str, "max_batch_size": int,
    "max_num_tokens": int, "max_seq_len": int, "backend": str}


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
    token_ids: Sequence[int] | None,
    reason: Any,
    said_stop: Any,
    params: SamplingParams,
    matcher: StopMatcher,
    tokenizer: HFTokenizer,
) -> Completion:
    """A Completion from a backend's raw output (ids, finish and stop reasons): EOS dropped, the
    text decoded, cut at its first stop string (which it keeps), and ids matching the text."""
    ids = [int(i) for i in token_ids or []]
    sampled = len(ids)
    while ids and ids[-1] in tokenizer.eos_token_ids:
        ids.pop()
    text = tokenizer.decode(ids)
    if reason is None:  # not reported for this sample: it ended on EOS unless it ran out
        reason = "length" if sampled >= params.max_tokens else "stop"
    if isinstance(said_stop, str) and said_stop.endswith("\n") and said_stop[:-1] in params.stop:
        said_stop = said_stop[:-1]  # the newline variant sent beside each stop (sampling_params)
    text, finish, stop = finished_text(text, reason, said_stop, params.stop, matcher, "trtllm")
    if tokenizer.decode(ids) != text:
        ids = tokenizer.encode(text)
    return Completion(text, ids, finish, stop)


class TRTLLMPolicy(PolicyEngine):
    """A policy on TensorRT-LLM's LLM API with KV-cache block reuse and in-flight batching."""

    tokenizer: HFTokenizer

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
        ):
            if value is not None:
                kwargs[name] = value
        llm_class = trt.LLM
        if backend == "tensorrt":  # 1.x keeps the engine-folder LLM apart from the default one
            try:
                from tensorrt_llm._tensorrt_engine import LLM as engine_llm

                llm_class = engine_llm
            except ImportError:  # earlier releases choose by the argument
                kwargs["backend"] = backend
        elif backend is not None:
            kwargs["backend"] = backend
        kwargs.update(llm_kwargs or {})
        try:
            self.llm = llm_class(**kwargs)
        except Exception as exc:  # noqa: BLE001 - TensorRT-LLM raises many kinds on a bad model
            raise EngineError(f"trtllm: cannot load {path!r}: {exc!r}") from exc
        self._sampling_fields = _accepted(trt.SamplingParams)
        self.stats = EngineStats()
        self._clock = BusyClock(self.stats)

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> TRTLLMPolicy:
        folder, given = folder_spec(rest, POLICY_SPEC_KEYS, "trtllm policy")
        return cls(folder, **{**options, **given})

    def sampling_params(self, params: SamplingParams) -> Any:
        """Our SamplingParams as TensorRT-LLM's (see the module's notes): greedy as top_k=1 and
        one sample, -1 top_k as no cut, ids back undecoded, end_id left to TensorRT-LLM."""
        eos = self.tokenizer.eos_token_id
        wanted: dict[str, Any] = {
            "n": 1 if params.greedy else params.n,
            "max_tokens": params.max_tokens,
            "temperature": None if params.greedy else params.temperature,
            "top_k": 1 if params.greedy else (params.top_k if params.top_k > 0 else None),
            "top_p": None if params.greedy else params.top_p,
            # TensorRT-LLM matches stops as ids: a stop written merged with the newline after
            # it (BPE's ">\n") would not match and the sample would run on to max_tokens; the
            # text is cut at the stop itself here either way
            "stop": [*params.stop, *(f"{stop}\n" for stop in params.stop)] or None,
            "stop_token_ids": sorted(self.tokenizer.eos_token_ids - {eos}) or None,
            "include_stop_str_in_output": True,
            "seed": params.seed,
            "detokenize": False,
        }
        return self._trt.SamplingParams(**{k: v for k, v in wanted.items() if k in self._sampling_fields})

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Completion]:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise EngineError(f"trtllm policy {self.path}: empty prompt")
        with self._clock:
            request = None
            try:  # TensorRT-LLM checks a request as it takes it (lengths, sampling): its errors too
                request = self.llm.generate_async(prompt, self.sampling_params(params))
                result = await (request.aresult() if hasattr(request, "aresult") else request)
            except asyncio.CancelledError:
                abort = getattr(request, "abort", None)
                if abort is not None:
                    abort()
                raise
            except Exception as exc:  # noqa: BLE001
                raise EngineError(f"trtllm policy {self.path}: request failed: {exc!r}") from exc
        matcher = StopMatcher(params.stop)
        outs = sorted(result.outputs, key=lambda o: getattr(o, "index", 0))
        asked = 1 if params.greedy else params.n
        if len(outs) != asked:
            raise EngineError(f"trtllm policy {self.path}: {len(outs)} outputs for n={asked}")
        comps = [
            finish_completion(o.token_ids, o.finish_reason, getattr(o, "stop_reason", None), params, matcher,
                              self.tokenizer)
            for o in outs
        ]
        if params.greedy:  # one greedy sample stands for all n, as n greedy samples would be alike
            comps = [dataclasses.replace(comps[0], token_ids=list(comps[0].token_ids)) for _ in range(params.n)]
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
        from rstar_fast.engines.hf import PPM_SPEC_KEYS

        folder, given = folder_spec(rest, PPM_SPEC_KEYS, "trtllm ppm")
        return cls(folder, **{**options, **given})

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        return await self.inner.score(sequences)

    async def close(self) -> None:
        await self.inner.close()
