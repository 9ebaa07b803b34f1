"""A byte-level tokenizer with the rStar-Math step-format special tokens.

Ids 0-255 are the bytes; the special tokens follow. The simulated engine uses it as it is, and
`save_hf_tokenizer` writes the same vocabulary as a Hugging Face tokenizer folder, so the tiny
models built for tests see exactly the ids the simulated engine produces, for text in Unicode's
composed form (NFC): transformers loads the folder of a Qwen2-style model as a Qwen2 tokenizer,
which composes "e" + U+0301 into "é" first, as Qwen's own tokenizer does. (The demo's models
use a BPE tokenizer trained on its own problems instead: evolve.train_step_tokenizer.)
Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS_TOKEN,
    "<|user|>",
    "<|assistant|>",
    "<code>",
    "<end_of_step>",
    "<end_of_code>",
    "<output>",
    "<end_of_output>",
    "<answer>",
    "<end_of_answer>",
)
NUM_BYTES = 256
VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)


class ByteTokenizer:
    """Bytes as ids 0-255, the special tokens after them; encode and decode are exact inverses."""

    def __init__(self) -> None:
        self.special_ids = {tok: NUM_BYTES + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok.encode() for tok, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.eos_token_id = self.special_ids[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id
        self.vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            special = self.special_ids.get(piece)
            if special is not None:
                ids.append(special)
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < NUM_BYTES:
                out.append(i)
            elif i in self._special_by_id:
                out += self._special_by_id[i]
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {VOCAB_SIZE})")
        return out.decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-printable-character map that byte-level BPE tokenizers use."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(NUM_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(NUM_BYTES + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_hf_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """The ByteTokenizer's vocabulary as a transformers fast tokenizer (same ids)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(NUM_BYTES)}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tok.padding_side = "left"
    return tok


def save_hf_tokenizer(path: str | Path):  # -> transformers.PreTrainedTokenizerFast
    """Write the byte tokenizer as a Hugging Face tokenizer folder and return it."""
    tok = build_hf_tokenizer()
    tok.save_pretrained(str(path))
    return tok
