"""The TensorRT-LLM backend (trtllm:): spec parsing, the missing-extra error, the request mapping
(through a stand-in tensorrt_llm module on CPU), and the real thing on a GPU when there is one."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from rstar_fast.engines import (  # noqa: E402
    EngineError,
    EngineSpecError,
    EngineUnavailableError,
    SamplingParams,
    load_policy,
    load_ppm,
)
from rstar_fast.engines.tokenizer import ByteTokenizer  # noqa: E402
from rstar_fast.engines.trtllm import TRTLLMPolicy, TRTLLMPPM  # noqa: E402

TOK = ByteTokenizer()


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(EngineSpecError, match="needs a model folder"):
        load_policy("trtllm:")
    with pytest.raises(EngineSpecError, match="does not exist"):
        load_policy(f"trtllm:{tmp_path / 'nope'}")
    with pytest.raises(EngineSpecError, match="does not exist"):
        load_ppm(f"trtllm:{tmp_path / 'nope'}")


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, tiny_policy_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails as if not installed
    with pytest.raises(EngineUnavailableError, match=r"rstar-fast\[trtllm\]"):
        load_policy(f"trtllm:{tiny_policy_path}")


async def test_ppm_is_the_transformers_ppm(tiny_ppm_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(EngineUnavailableError, match="CUDA"):
            load_ppm(f"trtllm:{tiny_ppm_path}")
    ppm = load_ppm(f"trtllm:{tiny_ppm_path}", device="cpu")
    assert isinstance(ppm, TRTLLMPPM)
    assert ppm.tokenizer is ppm.inner.tokenizer  # the search compares it with the policy's
    (a, b) = await ppm.score([TOK.encode("abc"), TOK.encode("abcd")])
    assert -1 <= a <= 1 and -1 <= b <= 1
    await ppm.close()


# ---- a stand-in tensorrt_llm: checks what we send and how we read what comes back ------------


@dataclasses.dataclass
class _FakeSampling:
    n: int = 1
    max_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    end_id: int | None = None  # set, it would keep TensorRT-LLM from turning stop strings into ids
    pad_id: int | None = None
    detokenize: bool = True


@dataclasses.dataclass
class _FakeKvCacheConfig:
    enable_block_reuse: bool = False
    free_gpu_memory_fraction: float = 0.9


@dataclasses.dataclass
class _Out:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: Any = None


class _Result:
    def __init__(self, outputs: list[_Out]) -> None:
        self.outputs = outputs

    async def aresult(self) -> _Result:
        return self


class _FakeLLM:
    instances: list[_FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.requests: list[tuple[list[int], _FakeSampling]] = []
        self.closed = False
        _FakeLLM.instances.append(self)

    def generate_async(self, prompt: list[int], sp: _FakeSampling) -> _Result:
        self.requests.append((prompt, sp))
        if sp.n > 1 and sp.top_k == 1:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns")
        if len(prompt) > 100:
            raise ValueError("The sum of prompt length and max_tokens should not exceed max_seq_len")
        eos = TOK.eos_token_id
        raw = [
            (TOK.encode("ab<end_of_step>"), "stop", "<end_of_step>"),  # kept
            (TOK.encode("cd"), "stop", "<end_of_step>"),  # a release that drops it
            (TOK.encode("ef") + [eos], "stop", eos),  # EOS
            (TOK.encode("ghij"), "length", None),
            (TOK.encode("kl") + [eos], None, None),  # ended before the last: no reason given
            (TOK.encode("m" * sp.max_tokens), None, None),  # ... and ran out
            (TOK.encode("no<end_of_step>pq"), "length", None),  # a stop only the text shows
            (TOK.encode("rs"), "stop", "<end_of_step>\n"),  # the newline variant, its text dropped
        ]
        outs = [_Out(i, "" if not sp.detokenize else TOK.decode(ids), ids, reason, stop)
                for i, (ids, reason, stop) in enumerate(raw)]
        return _Result(outs[: sp.n])

    def shutdown(self) -> None:
        self.closed = True


class _FakeEngineLLM(_FakeLLM):
    """1.x's LLM for engine folders (tensorrt_llm._tensorrt_engine)."""


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> type[_FakeLLM]:
    mod = types.ModuleType("tensorrt_llm")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    mod.LLM = _FakeLLM  # type: ignore[attr-defined]
    mod.SamplingParams = _FakeSampling  # type: ignore[attr-defined]
    llmapi.KvCacheConfig = _FakeKvCacheConfig  # type: ignore[attr-defined]
    engine.LLM = _FakeEngineLLM  # type: ignore[attr-defined]
    mod.llmapi = llmapi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", mod)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine)
    _FakeLLM.instances.clear()
    return _FakeLLM


async def test_request_mapping_and_outputs(fake_trtllm: type[_FakeLLM], tiny_policy_path: Path) -> None:
    policy = load_policy(f"trtllm:{tiny_policy_path}", gpu_memory_fraction=0.5, max_batch_size=64)
    assert isinstance(policy, TRTLLMPolicy)
    llm = fake_trtllm.instances[-1]
    assert type(llm) is _FakeLLM and "backend" not in llm.kwargs
    kv = llm.kwargs["kv_cache_config"]
    assert kv.enable_block_reuse is True and kv.free_gpu_memory_fraction == 0.5
    assert llm.kwargs["model"] == str(tiny_policy_path) and llm.kwargs["max_batch_size"] == 64

    params = SamplingParams(n=8, temperature=0.7, top_k=-1, max_tokens=9, stop=("<end_of_step>",), seed=3)
    out = await policy.generate([1, 2, 3], params)
    prompt, sp = llm.requests[-1]
    assert prompt == [1, 2, 3]
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_k, sp.top_p, sp.seed) == (8, 9, 0.7, None, 1.0, 3)
    assert sp.stop == ["<end_of_step>", "<end_of_step>\n"] and sp.include_stop_str_in_output
    assert sp.end_id is None and sp.pad_id is None and not sp.detokenize
    assert [(c.text, c.finish_reason, c.stop) for c in out] == [
        ("ab<end_of_step>", "stop", "<end_of_step>"),
        ("cd<end_of_step>", "stop", "<end_of_step>"),
        ("ef", "stop", None),
        ("ghij", "length", None),
        ("kl", "stop", None),
        ("m" * 9, "length", None),
        ("no<end_of_step>", "stop", "<end_of_step>"),
        ("rs<end_of_step>", "stop", "<end_of_step>"),
    ]
    assert all(c.token_ids == TOK.encode(c.text) for c in out)

    greedy = await policy.generate([5], SamplingParams(n=3, temperature=1e-6, max_tokens=2))
    _, sp = llm.requests[-1]
    assert (sp.n, sp.top_k, sp.temperature, sp.top_p) == (1, 1, None, None)  # one greedy sample for all
    assert [c.text for c in greedy] == ["ab<end_of_step>"] * 3 and greedy[0].token_ids is not greedy[1].token_ids
    with pytest.raises(EngineError, match="empty"):
        await policy.generate([], SamplingParams())
    with pytest.raises(EngineError, match="max_seq_len"):  # refused as it is taken: an engine error too
        await policy.generate([1] * 101, SamplingParams())
    await policy.close()
    assert llm.closed

    load_policy(f"trtllm:{tiny_policy_path},gpu_memory_fraction=0.3,max_batch_size=8", gpu_memory_fraction=0.9)
    spec_kwargs = fake_trtllm.instances[-1].kwargs
    assert spec_kwargs["kv_cache_config"].free_gpu_memory_fraction == 0.3 and spec_kwargs["max_batch_size"] == 8
    load_policy(f"trtllm:{tiny_policy_path}", backend="tensorrt")
    assert type(fake_trtllm.instances[-1]) is _FakeEngineLLM and "backend" not in fake_trtllm.instances[-1].kwargs
    load_policy(f"trtllm:{tiny_policy_path}", backend="pytorch")
    assert fake_trtllm.instances[-1].kwargs["backend"] == "pytorch"


# ---- on a GPU with TensorRT-LLM --------------------------------------------------------------


@pytest.mark.gpu
async def test_trtllm_on_gpu(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_llm")
    from rstar_fast.engines.tiny import build_tiny_policy

    # head_dim 64: what TensorRT-LLM's attention kernels support everywhere
    path = build_tiny_policy(tmp_path / "policy", hidden_size=256, heads=4)
    policy = load_policy(f"trtllm:{path}", gpu_memory_fraction=0.2)
    prompt = TOK.encode("<|user|>:\nWhat is 1+1?\n<|assistant|>: ")
    out = await policy.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1,
                                                       stop=("<end_of_step>",)))
    assert len(out) == 4 and all(c.finish_reason in ("stop", "length") for c in out)
    # greedy is the same every time (seeded sampling is, only where the release's sampler honours seeds)
    greedy = SamplingParams(n=2, temperature=0, max_tokens=16)
    assert [c.text for c in await policy.generate(prompt, greedy)] == [c.text for c in await policy.generate(prompt, greedy)]
    await policy.close()
