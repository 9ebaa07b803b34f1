"""Shared fixtures: tiny models built once per session (nothing is downloaded), GPU skipping."""

from __future__ import annotations

from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` on machines without a CUDA device."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def executor():
    """One step executor for every whole-search test (its workers start once)."""
    from rstar_fast.executor import StepExecutor

    with StepExecutor(workers=2, timeout_s=5.0) as ex:
        yield ex


@pytest.fixture(scope="session")
def grader():
    """One answer grader for every whole-search test."""
    from rstar_fast.search.grading import Grader

    with Grader(workers=1) as g:
        yield g


@pytest.fixture
def closed_policies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The specs of the policies closed, of those the search API or evolve loaded by spec (each
    a simulated policy, whatever its spec names)."""
    import rstar_fast.engines as engines
    import rstar_fast.search.api as api

    closed: list[str] = []
    real = engines.load_policy

    def load(spec: str):
        engine = real(spec if spec.startswith("sim") else "sim")
        close = engine.close

        async def counted() -> None:
            closed.append(spec)
            await close()

        engine.close = counted
        return engine

    monkeypatch.setattr(engines, "load_policy", load)
    monkeypatch.setattr(api, "load_policy", load)
    return closed


def _needs_the_hf_extra() -> None:
    """Skip a test that needs a model where the `hf` extra is not installed (the core alone
    runs the rest of the suite)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 causal LM with the byte tokenizer (hf: folder)."""
    _needs_the_hf_extra()
    from rstar_fast.engines.tiny import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def tiny_ppm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 one-label sequence-classification model (a PPM, hf: folder)."""
    _needs_the_hf_extra()
    from rstar_fast.engines.tiny import build_tiny_ppm

    return build_tiny_ppm(tmp_path_factory.mktemp("tiny_ppm"))


def scripted_successors() -> dict[int, int]:
    """Greedy successor of each token in the scripted model: a..y -> next letter,
    z -> <end_of_step>, <end_of_step> -> EOS. A prompt ending in "w" greedily continues
    "xyz<end_of_step>" and then stops on EOS. Prompts must end in a lowercase letter."""
    from rstar_fast.engines.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    end_step = tok.special_ids["<end_of_step>"]
    succ = {c: c + 1 for c in range(ord("a"), ord("z"))}
    succ[ord("z")] = end_step
    succ[end_step] = tok.eos_token_id
    return succ


@pytest.fixture(scope="session")
def scripted_policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM whose greedy output is known (see `scripted_successors`).

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; the untied output layer holds, for each token y, the (scaled) embedding of the
    token whose successor y is (near-orthogonal unit embeddings keep the margin wide). Greedy
    decoding then walks the successor map.
    """
    _needs_the_hf_extra()
    import torch
    from transformers import Qwen2ForCausalLM

    from rstar_fast.engines.tiny import tiny_config
    from rstar_fast.engines.tokenizer import save_hf_tokenizer

    path = tmp_path_factory.mktemp("scripted_policy")
    torch.manual_seed(0)
    config = tiny_config()
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.nn.functional.normalize(torch.randn_like(emb), dim=-1))
        out = torch.zeros_like(model.lm_head.weight)
        for x, y in scripted_successors().items():
            out[y] = emb[x]
        model.lm_head.weight.copy_(out * 50.0)
    model.save_pretrained(str(path))
    save_hf_tokenizer(path)
    return path
