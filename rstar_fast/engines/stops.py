"""The text side of generation, shared by the real backends: stop strings, token bytes, tokenizers.

Stop strings are matched on bytes, as tokens arrive: each token id maps to the bytes it adds to
the text (`token_bytes_table`), so matching costs one `bytes.find` over the last few bytes per
token instead of a decode of the whole sequence.

How `token_ids` map to `text` when a stop string ends: the text ends right after the stop string
(kept) and nothing follows. When the stop ends on a token boundary (always so with the byte
tokenizer, and with any special-token stop), `token_ids` are the sampled ids up to that token.
When it ends inside a token, the sampled ids are kept up to the last boundary before the cut and
the few bytes from there to the cut are re-encoded with the tokenizer, so `decode(token_ids)`
equals `text` exactly; those last ids may differ from what the model sampled.
"""

from __future__ import annotations

import json

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rstar_fast.engines.base import EngineError, EngineSpecError, EngineUnavailableError
from rstar_fast.engines.tokenizer import _bytes_to_unicode


class StopMatcher:
    """Finds the earliest stop string in a growing byte buffer."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._encoded = [(s.encode("utf-8"), s) for s in self.stops]
        self._longest = max((len(b) for b, _ in self._encoded), default=0)

    def find(self, buf: bytes | bytearray, new_from: int = 0) -> tuple[int, str] | None:
        """(end offset, stop) of the stop that ends first at or after byte `new_from`, else None.

        Only matches that end in the new bytes are looked for (older ones were seen before);
        ties on the end go to the longer stop.
        """
        if not self._encoded:
            return None
        start = max(0, new_from - self._longest + 1)
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for enc, stop in self._encoded:
            at = buf.find(enc, start)
            while 0 <= at and at + len(enc) <= new_from:  # seen before: look further on
                at = buf.find(enc, at + 1)
            if at >= 0:
                cand = (at + len(enc), -len(enc), stop)
                if best is None or cand < best:
                    best = cand
        return None if best is None else (best[0], best[2])

    def first_in_text(self, text: str) -> tuple[int, str] | None:
        """(end index, stop) of the earliest stop string in a finished text, else None."""
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                cand = (at + len(stop), -len(stop), stop)
                if best is None or cand < best:
                    best = cand
        return None if best is None else (best[0], best[2])


def finished_text(text: str, reason: Any, said_stop: Any, stops: Sequence[str], matcher: StopMatcher,
                  engine: str) -> tuple[str, Literal["stop", "length"], str | None]:
    """A finished sample's (text, finish reason, stop), as a server or engine reported it: the
    text cut after its first stop string (kept); a stop the server named but left out of the
    text appended again; else the reason as given (EOS: "stop" without a stop). Another reason
    (cancelled, timed out) is an EngineError naming `engine`."""
    hit = matcher.first_in_text(text)
    if hit is not None:
        return text[: hit[0]], "stop", hit[1]
    if reason == "stop" and isinstance(said_stop, str) and said_stop in stops:
        return text + said_stop, "stop", said_stop
    if reason in ("stop", "length"):
        return text, reason, None
    raise EngineError(f"{engine}: unexpected finish_reason {reason!r}")


# files any of which holds a Hugging Face tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


class HFTokenizer:
    """A transformers tokenizer seen through the engine's `Tokenizer` protocol.

    encode adds no BOS and keeps special tokens as single ids; decode keeps special tokens and
    does no clean-up, so step-format markers survive a round trip.
    """

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        eos = hf.eos_token_id
        if eos is None:
            raise EngineSpecError(f"tokenizer {getattr(hf, 'name_or_path', '?')!r} has no eos token")
        self.eos_token_id: int = int(eos)
        # every id that ends a generation: the model's generation config may add some (Qwen's
        # <|im_end|> beside <|endoftext|>); the hf and openai engines both stop on these
        self.eos_token_ids: frozenset[int] = frozenset({self.eos_token_id, *_generation_eos(hf)})
        self.pad_token_id: int = int(hf.pad_token_id) if hf.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(hf)
        # what the tokenizer puts before a text of its own accord: BOS for Llama-style ones
        # (vLLM adds it to the reference's text prompts), nothing for Qwen's
        start = list(hf("", add_special_tokens=True)["input_ids"])
        self.bos_ids: tuple[int, ...] = (
            tuple(start) if hf.bos_token_id is not None and start == [hf.bos_token_id] else ())

    @classmethod
    def from_path(cls, path: str | Path, engine: str = "tokenizer") -> HFTokenizer:
        """The tokenizer of a model folder; `engine` names who asks, in error messages."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            extra = engine if engine in ("openai", "trtllm") else "hf"  # openai's holds transformers alone
            raise EngineUnavailableError(
                f"{engine}: loading a Hugging Face tokenizer needs transformers: pip install 'rstar-fast[{extra}]'"
            ) from exc
        if not Path(path).is_dir():
            raise EngineSpecError(f"{engine}: tokenizer folder {str(path)!r} does not exist")
        no_tokenizer = EngineSpecError(
            f"{engine}: {path} holds no tokenizer (no tokenizer.json, tokenizer.model or vocab files): "
            "copy the model's tokenizer files into it"
        )
        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError, ImportError) as exc:
            # transformers 4.x fails in the slow tokenizer's constructor (TypeError) without files,
            # or (4.56 without protobuf) asks for a library to convert one (ImportError)
            if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
                raise no_tokenizer from None
            raise EngineSpecError(f"{engine}: cannot load a tokenizer from {str(path)!r}: {exc}") from exc
        # without tokenizer files, transformers 5 builds one from config.json alone, holding only
        # special tokens, and every text then encodes to nothing
        if len(hf) <= len(hf.added_tokens_decoder):
            raise no_tokenizer
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# A text in the step format, every marker the reference's training adds included: tokenizers
# of two kinds (the simulator's bytes, a Hugging Face one) agree when they encode it alike.
_PROBE = ("<|user|>:\nWhat is 12 + 30?\n<|assistant|>: Let's think step by step.<code>\n# Step 1: add\n"
          "x = 12 + 30\n<end_of_step>\nprint(x)\n<end_of_code>\n<output>42<end_of_output>\n"
          "<answer>\\boxed{42}<end_of_answer><refine><end_of_refine><error_info><end_of_error_info><BACK>")


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers give the search's texts the same ids: the same object, Hugging
    Face tokenizers with equal vocabularies, others that encode the step format alike; and
    the same prompt start either way."""
    if a is b:
        return True
    if getattr(a, "bos_ids", ()) != getattr(b, "bos_ids", ()):
        return False
    if isinstance(a, HFTokenizer) and isinstance(b, HFTokenizer):
        return a.hf.get_vocab() == b.hf.get_vocab()
    return list(a.encode(_PROBE)) == list(b.encode(_PROBE))


def _generation_eos(hf: Any) -> list[int]:
    """The model's end-of-generation ids from the folder the tokenizer came from: those of
    generation_config.json, else config.json's (where transformers takes them from too)."""
    folder = Path(getattr(hf, "name_or_path", "") or "")
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((folder / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            return [int(i) for i in ids if isinstance(i, int)]
    return []


def token_bytes_table(tok: HFTokenizer) -> list[bytes] | None:
    """The bytes each token id adds to the text, or None when they cannot be derived exactly.

    Handles byte-level BPE (GPT-2, Qwen, Llama 3) and SentencePiece with byte fallback (Llama 2,
    Mistral); added tokens map to their content. The table is checked against the tokenizer's own
    decode on a probe text; on any mismatch the caller falls back to decoding.
    """
    hf = tok.hf
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder_kind = type(backend.decoder).__name__ if backend.decoder is not None else ""
    added = {i: t.content for i, t in getattr(hf, "added_tokens_decoder", {}).items()}
    pieces = hf.convert_ids_to_tokens(list(range(tok.vocab_size)))
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added:
            table.append(added[i].encode("utf-8"))
        elif piece is None:
            table.append(b"")
        elif decoder_kind == "ByteLevel":
            if not all(c in byte_of for c in piece):
                return None
            table.append(bytes(byte_of[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    probe = "Step 1: x = 3.5 * (y + 2)\n# 你好 café <end_of_step>\n\tprint(x)"
    ids = tok.encode(probe)
    # SentencePiece decoders drop the leading space of the first piece: compare from the 2nd id.
    if b"".join(table[i] for i in ids[1:]) != tok.decode(ids[1:]).encode("utf-8") and b"".join(
        table[i] for i in ids
    ) != tok.decode(ids).encode("utf-8"):
        return None
    return table


class TextBuilder:
    """Bytes and token boundaries of one generated sequence; finds stop strings as it grows."""

    def __init__(self, tok: HFTokenizer, table: list[bytes] | None, matcher: StopMatcher) -> None:
        self.tok = tok
        self.table = table
        self.matcher = matcher
        self.ids: list[int] = []
        self.ends: list[int] = []  # byte offset at which each token's bytes end
        self.buf = bytearray()

    def push(self, token_id: int) -> tuple[int, str] | None:
        """Append a token; return (cut offset, stop) if a stop string now ends the text."""
        before = len(self.buf)
        self.ids.append(token_id)
        if self.table is not None:
            # ids past the tokenizer (padded model vocabularies) add no text
            self.buf += self.table[token_id] if 0 <= token_id < len(self.table) else b""
        else:  # slow path: re-decode (tokenizers whose bytes per token are not derivable)
            old, self.buf = self.buf, bytearray(self.tok.decode(self.ids).encode("utf-8"))
            # a character completed by this token replaces its U+FFFD: the text changed from
            # where the two first differ, and a stop may end anywhere after that
            before = next((i for i, (a, b) in enumerate(zip(old, self.buf)) if a != b), min(before, len(self.buf)))
        self.ends.append(len(self.buf))
        return self.matcher.find(self.buf, before)

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")

    def whole(self) -> tuple[str, list[int]]:
        """Text and ids of a sample that ended without a stop string (EOS, max_tokens), less a
        character it stopped part way through: decoded, its first bytes would be U+FFFD in the
        tree, the step's code and the exports, while the ids kept them. (Without a byte table the
        text is the tokenizer's own decoding, U+FFFD included.)"""
        try:
            return self.buf.decode("utf-8"), list(self.ids)
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":  # bytes no character has: as decoded
                return self.text(), list(self.ids)
            return self.cut(e.start)

    def cut(self, end: int) -> tuple[str, list[int]]:
        """Text up to byte `end` and token ids that decode to exactly that text."""
        text_bytes = bytes(self.buf[:end])
        k = 0
        while k < len(self.ends) and self.ends[k] <= end:
            k += 1
        if k and self.ends[k - 1] == end:
            return text_bytes.decode("utf-8", errors="replace"), self.ids[:k]
        # The stop ends inside token k: keep whole tokens before it, re-encode the rest. Back off
        # while the boundary splits a UTF-8 character.
        while True:
            start = self.ends[k - 1] if k else 0
            try:
                tail = text_bytes[start:].decode("utf-8")
                break
            except UnicodeDecodeError:
                if k == 0:
                    tail = text_bytes.decode("utf-8", errors="replace")
                    start = 0
                    break
                k -= 1
        return text_bytes.decode("utf-8", errors="replace"), self.ids[:k] + self.tok.encode(tail)
