"""The hf engines' cache of prompt keys and values across requests (policy and PPM).

A tree search asks for the children of a node whose own prompt was prefilled when its parent
was expanded: the new prompt is an old one plus a step. The cache keeps each prompt's keys and
values (per layer, on the model's device) and finds, for a new prompt, the longest cached
prefix, so that only the tail is prefilled. The PPM keeps every sequence it scores the same
way: a node's path, scored among its siblings, is the shared prefix of its children's call.
Prefixes are matched in blocks of `BLOCK` tokens through chained block hashes, as vLLM's
prefix cache does: a lookup hashes the prompt once per block instead of once per cached
length. Entries are evicted least recently used first, within a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per hashed block: a prefix is reused up to its last whole block


def block_hashes(prompt: list[int], blocks: int) -> list[int]:
    """The chained hashes of the prompt's first `blocks` blocks: entry k names prompt[:(k+1)*BLOCK]."""
    out: list[int] = []
    h = 0
    for k in range(blocks):
        h = hash((h, *prompt[k * BLOCK : (k + 1) * BLOCK]))
        out.append(h)
    return out


@dataclass(eq=False)
class PromptKV:
    """One cached prompt: its first `len(tokens)` tokens' keys and values, per layer, each
    (kv heads, positions, head dim), positions 0 onward."""

    tokens: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    hashes: list[int]
    nbytes: int


class PromptCache:
    """Least-recently-used prompt keys and values within `max_bytes`; one thread uses it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0  # lookups that found a prefix
        self.lookups = 0
        self._entries: OrderedDict[int, PromptKV] = OrderedDict()  # by id, oldest first
        self._by_block: dict[int, PromptKV] = {}  # chained block hash -> newest entry holding it

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[PromptKV, int] | None:
        """The entry holding the longest cached prefix of `prompt` that leaves at least one
        token to prefill (its logits start the generation), and that prefix's length; or None."""
        self.lookups += 1
        blocks = (len(prompt) - 1) // BLOCK
        if not self._by_block or blocks <= 0:
            return None
        hashes = block_hashes(prompt, blocks)
        for k in range(blocks - 1, -1, -1):
            entry = self._by_block.get(hashes[k])
            length = (k + 1) * BLOCK
            if entry is not None and entry.tokens[:length] == prompt[:length]:
                self._entries.move_to_end(id(entry))
                self.hits += 1
                return entry, length
        return None

    def holds(self, prompt: list[int]) -> bool:
        """Whether every whole block of `prompt` is cached already (storing it adds nothing)."""
        blocks = len(prompt) // BLOCK
        if blocks == 0:
            return True
        entry = self._by_block.get(block_hashes(prompt, blocks)[-1])
        return entry is not None and entry.tokens[: blocks * BLOCK] == prompt[: blocks * BLOCK]

    def store(self, prompt: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `layers`, the keys and values of `prompt`'s whole blocks (the entry owns them),
        evicting the oldest entries to stay within the budget."""
        blocks = len(prompt) // BLOCK
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if blocks == 0 or nbytes > self.max_bytes:
            return
        while self.nbytes + nbytes > self.max_bytes:
            self._evict()
        entry = PromptKV(prompt[: blocks * BLOCK], layers, block_hashes(prompt, blocks), nbytes)
        self._entries[id(entry)] = entry
        self.nbytes += nbytes
        for h in entry.hashes:
            self._by_block[h] = entry

    def clear(self) -> None:
        """Drop every entry (an engine's close frees their memory at once)."""
        self._entries.clear()
        self._by_block.clear()
        self.nbytes = 0

    def _evict(self) -> None:
        _, old = self._entries.popitem(last=False)
        self.nbytes -= old.nbytes
        for h in old.hashes:
            if self._by_block.get(h) is old:
                del self._by_block[h]
