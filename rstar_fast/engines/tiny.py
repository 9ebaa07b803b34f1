"""Tiny randomly initialised Qwen2-style models (on the byte tokenizer unless given another).

Tests, the demo and benchmarks build their models here: nothing is downloaded. Needs the
`hf` extra (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path

from rstar_fast.engines.tokenizer import VOCAB_SIZE, save_hf_tokenizer


def tiny_config(hidden_size: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 4096,
                vocab_size: int | None = None, eos_token_id: int | None = None):
    """A tiny Qwen2 config; vocabulary and EOS default to the byte tokenizer's."""
    from transformers import Qwen2Config

    from rstar_fast.engines.tokenizer import ByteTokenizer

    eos = ByteTokenizer().eos_token_id if eos_token_id is None else eos_token_id
    return Qwen2Config(
        vocab_size=VOCAB_SIZE if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_tiny_policy(path: str | Path, seed: int = 0, tokenizer: str | Path | None = None,
                      **config_kwargs) -> Path:
    """Write a random causal LM and its tokenizer to `path`; return the path.

    `tokenizer`: a Hugging Face tokenizer folder to use instead of the byte tokenizer (e.g. a
    small BPE trained on the task's texts); the vocabulary and EOS follow it.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    from rstar_fast.engines.hf import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()

    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        config_kwargs.setdefault("vocab_size", len(tok))
        config_kwargs.setdefault("eos_token_id", tok.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(**config_kwargs))
    model.save_pretrained(str(path))
    if tok is None:
        save_hf_tokenizer(path)
    else:
        tok.save_pretrained(str(path))
    return Path(path)


def build_tiny_ppm(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a random one-label sequence-classification model (a PPM) and its tokenizer."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    from rstar_fast.engines.hf import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()

    torch.manual_seed(seed)
    config = tiny_config(**config_kwargs)
    config.num_labels = 1
    model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(str(path))
    save_hf_tokenizer(path)
    return Path(path)
