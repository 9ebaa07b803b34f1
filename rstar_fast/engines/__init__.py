"""Policy and PPM engines behind one async interface.

    policy = load_policy("hf:PATH[,k=v,...]" | "trtllm:PATH[,k=v,...]" | "openai:URL#MODEL[,k=v,...]" | "sim[:k=v,...]")
    ppm = load_ppm("hf:PATH[,k=v,...]" | "trtllm:PATH[,k=v,...]" | "sim[:k=v,...]")

Options ride in the spec as `k=v` items after commas (sim: `sim:profile=instant,seed=1` for a policy, `sim:corr=0.8` for a PPM; hf and trtllm:
after the folder, `hf:/models/policy,device=cuda:1,dtype=bfloat16`; openai: after the model
name, `openai:http://h:8000/v1#Qwen/Qwen2.5-Math-7B,tokenizer=/models/qwen,timeout=600`; the
keys are the backends' keyword options: POLICY_SPEC_KEYS and PPM_SPEC_KEYS in hf.py, POLICY_SPEC_KEYS
in trtllm.py, whose PPM takes hf's) or as keyword options of load_policy and
load_ppm; the spec wins. Secrets never go in a spec: openai reads its API key from the
environment (OPENAI_API_KEY, or the variable `api_key_env=NAME` names).

Backends are imported only when asked for, so the core install (forest, executor, simulated
engine) needs neither torch nor TensorRT-LLM.
"""

from __future__ import annotations

import importlib
from typing import Any

from rstar_fast.engines.base import (
    BusyClock,
    Completion,
    EngineError,
    EngineInUseError,
    EngineSpecError,
    EngineStats,
    EngineUnavailableError,
    PolicyEngine,
    PPMEngine,
    SamplingParams,
    Tokenizer,
)

# spec prefix -> (module, policy class, ppm class or None)
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "sim": ("rstar_fast.engines.sim", "SimPolicy", "SimPPM"),
    "hf": ("rstar_fast.engines.hf", "HFPolicy", "HFPPM"),
    "trtllm": ("rstar_fast.engines.trtllm", "TRTLLMPolicy", "TRTLLMPPM"),
    "openai": ("rstar_fast.engines.openai", "OpenAIPolicy", None),
}


def _backend_class(spec: str, role: int) -> tuple[Any, str]:
    if not isinstance(spec, str) or not spec:
        raise EngineSpecError(f"engine spec must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind not in _BACKENDS:
        raise EngineSpecError(
            f"unknown engine {kind!r} in spec {spec!r}; expected one of "
            "'sim[:k=v,...]', 'hf:PATH', 'trtllm:PATH', 'openai:URL#MODEL[,k=v,...]'"
        )
    module_name, *classes = _BACKENDS[kind]
    class_name = classes[role]
    if class_name is None:
        raise EngineSpecError(f"engine {kind!r} cannot serve as a PPM (spec {spec!r})")
    module = importlib.import_module(module_name)
    return getattr(module, class_name), rest


def load_policy(spec: str, **options: Any) -> PolicyEngine:
    """Build a policy engine from a spec string; options go to the backend."""
    cls, rest = _backend_class(spec, 0)
    return cls.from_spec(rest, **options)


def load_ppm(spec: str, **options: Any) -> PPMEngine:
    """Build a PPM engine from a spec string; options go to the backend."""
    cls, rest = _backend_class(spec, 1)
    return cls.from_spec(rest, **options)


__all__ = [
    "BusyClock",
    "Completion",
    "EngineError",
    "EngineSpecError",
    "EngineStats",
    "EngineInUseError",
    "EngineUnavailableError",
    "PPMEngine",
    "PolicyEngine",
    "SamplingParams",
    "Tokenizer",
    "load_policy",
    "load_ppm",
]
