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
    include_stop_str_in_output: bool = False
    seed: int | None = None
    end_id: int | None = None
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
    finish_reason: str
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
        eos = TOK.eos_token_id
        outs = [
            _Out(0, "ab<end_of_step>", TOK.encode("ab<end_of_step>"), "stop", "<end_of_step>"),  # kept
            _Out(1, "cd", TOK.encode("cd"), "stop", "<end_of_step>"),  # a release that drops it
            _Out(2, "ef", TOK.encode("ef") + [eos], "stop", eos),  # EOS
            _Out(3, "ghij", TOK.encode("ghij"), "length", None),
        ]
        return _Result(outs[: sp.n])

    def shutdown(self) -> None:
        self.closed = True


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> type[_FakeLLM]:
    mod = types.ModuleType("tensorrt_llm")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    mod.LLM = _FakeLLM  # type: ignore[attr-defined]
    mod.SamplingParams = _FakeSampling  # type: ignore[attr-defined]
    llmapi.KvCacheConfig = _FakeKvCacheConfig  # type: ignore[attr-defined]
    mod.llmapi = llmapi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", mod)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    _FakeLLM.instances.clear()
    return _FakeLLM


async def test_request_mapping_and_outputs(fake_trtllm: type[_FakeLLM], tiny_policy_path: Path) -> None:
    policy = load_policy(f"trtllm:{tiny_policy_path}", gpu_memory_fraction=0.5, max_batch_size=64)
    assert isinstance(policy, TRTLLMPolicy)
    llm = fake_trtllm.instances[-1]
    kv = llm.kwargs["kv_cache_config"]
    assert kv.enable_block_reuse is True and kv.free_gpu_memory_fraction == 0.5
    assert llm.kwargs["model"] == str(tiny_policy_path) and llm.kwargs["max_batch_size"] == 64

    params = SamplingParams(n=4, temperature=0.7, top_k=-1, max_tokens=9, stop=("<end_of_step>",), seed=3)
    out = await policy.generate([1, 2, 3], params)
    prompt, sp = llm.requests[-1]
    assert prompt == [1, 2, 3]
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_k, sp.seed) == (4, 9, 0.7, None, 3)
    assert sp.stop == ["<end_of_step>"] and sp.include_stop_str_in_output and sp.end_id == TOK.eos_token_id
    assert [(c.text, c.finish_reason, c.stop) for c in out] == [
        ("ab<end_of_step>", "stop", "<end_of_step>"),
        ("cd<end_of_step>", "stop", "<end_of_step>"),
        ("ef", "stop", None),
        ("ghij", "length", None),
    ]
    assert all(c.token_ids == TOK.encode(c.text) for c in out)

    await policy.generate([5], SamplingParams(temperature=0, max_tokens=2))
    _, sp = llm.requests[-1]
    assert (sp.top_k, sp.temperature) == (1, None)  # greedy
    with pytest.raises(EngineError, match="empty"):
        await policy.generate([], SamplingParams())
    await policy.close()
    assert llm.closed


# ---- on a GPU with TensorRT-LLM --------------------------------------------------------------


@pytest.mark.gpu
async def test_trtllm_on_gpu(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_llm")
    from rstar_fast.engines.tiny import build_tiny_policy

    # head_dim 64: what TensorRT-LLM's attention kernels support everywhere
    path = build_tiny_policy(tmp_path / "policy", hidden_size=256, heads=4)
    policy = load_policy(f"trtllm:{path}", gpu_memory_fraction=0.2)
    prompt = TOK.encode("<|user|>:\nWhat is 1+1?\n<|assistant|>: ")
    out = await policy.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1))
    assert len(out) == 4 and all(len(c.token_ids) <= 16 for c in out)
    again = await policy.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1))
    assert [c.text for c in out] == [c.text for c in again]
    await policy.close()
