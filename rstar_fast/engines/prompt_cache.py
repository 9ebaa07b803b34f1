"""The hf engines' cache of prompt keys and values across requests (policy and PPM).

A tree search asks for the children of a node whose own prompt was prefilled when its parent
was expanded: the new prompt is an old one plus a step. The cache keeps prompts' keys and
values (on the model's device) and finds, for a new prompt, the longest cached prefix, so that
only the tail is prefilled. The PPM keeps every sequence it scores the same way: a node's
path, scored among its siblings, is the shared prefix of its children's call.

Storage is paged, as vLLM's prefix cache is: prompts are cut into blocks of `BLOCK` tokens, and
a block is named by the chained hash of the whole prefix it ends, so siblings share their
parent's blocks instead of each holding a copy of them, and a prompt is found by walking its
blocks from the first. Blocks are evicted least recently used first, within a byte budget;
a prefix is always refreshed after its blocks, so a block outlives every block that extends
it and eviction takes the tips of the tree first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per block: a prefix is reused up to its last whole block


@dataclass(eq=False, slots=True)
class Block:
    """One block of a cached prompt: `tokens` after the prefix named `parent` (0 for none)."""

    key: int  # hash((parent, *tokens)): names the whole prefix this block ends
    parent: int
    tokens: tuple[int, ...]
    kv: torch.Tensor  # keys and values of its positions: (layers, 2, kv heads, BLOCK, head dim)


class PromptCache:
    """Least-recently-used prompt blocks within `max_bytes`; one thread uses it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0  # lookups that found a prefix
        self._blocks: OrderedDict[int, Block] = OrderedDict()  # by key, least recently used first

    def __len__(self) -> int:
        """Blocks held."""
        return len(self._blocks)

    def lookup(self, prompt: list[int]) -> tuple[list[Block], int] | None:
        """The longest cached prefix of `prompt` that leaves at least one token to prefill (its
        logits start the generation): its blocks and its length; or None."""
        chain = self._chain(prompt, (len(prompt) - 1) // BLOCK)
        if not chain:
            return None
        self.hits += 1
        return chain, len(chain) * BLOCK

    def cached_blocks(self, prompt: list[int]) -> int:
        """How many of `prompt`'s whole blocks are cached, from the first (refreshed as used)."""
        return len(self._chain(prompt, len(prompt) // BLOCK))

    def store(self, prompt: list[int], first: int, kv: torch.Tensor) -> None:
        """Keep the keys and values of `prompt`'s whole blocks from block `first` on (blocks
        before it are cached): `kv` holds those positions, (layers, 2, kv heads, positions,
        head dim). Evicts the least recently used blocks to stay within the budget."""
        blocks = len(prompt) // BLOCK
        if blocks <= first or kv.nbytes > self.max_bytes:
            return
        chain = self._chain(prompt, first)  # refreshed: not evicted to make room, but as a last resort
        if len(chain) < first:
            return
        while self.nbytes + kv.nbytes > self.max_bytes:
            self._evict()
        # the refresh left the chain's tip its oldest block: if any of it went, the tip did
        if chain and chain[-1].key not in self._blocks:  # (a budget of a few blocks)
            return
        parent = chain[-1].key if chain else 0
        for b in range(first, blocks):
            tokens = tuple(prompt[b * BLOCK : (b + 1) * BLOCK])
            at = (b - first) * BLOCK
            block = Block(hash((parent, *tokens)), parent, tokens, kv[:, :, :, at : at + BLOCK].clone())
            old = self._blocks.pop(block.key, None)  # a colliding key: the newer block wins
            if old is not None:
                self.nbytes -= old.kv.nbytes
            self._blocks[block.key] = block
            self.nbytes += block.kv.nbytes
            chain.append(block)
            parent = block.key
        self._refresh(chain)

    def clear(self) -> None:
        """Drop every block (an engine's close frees their memory at once)."""
        self._blocks.clear()
        self.nbytes = 0

    def _chain(self, prompt: list[int], blocks: int) -> list[Block]:
        """The cached blocks of `prompt`'s first `blocks` blocks, from the first to the first
        one missing, refreshed. Each is checked token by token: a hash never stands in for them."""
        chain: list[Block] = []
        parent = 0
        for b in range(blocks):
            tokens = tuple(prompt[b * BLOCK : (b + 1) * BLOCK])
            block = self._blocks.get(hash((parent, *tokens)))
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            chain.append(block)
            parent = block.key
        self._refresh(chain)
        return chain

    def _refresh(self, chain: list[Block]) -> None:
        # tip first, so that each block is more recent than every block extending it
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self) -> None:
        _, old = self._blocks.popitem(last=False)
        self.nbytes -= old.kv.nbytes
