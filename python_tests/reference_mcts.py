"""A small pure-Python MCTS forest with the semantics of rstar_fast._core.Forest.

One object per node, as the rStar-Math reference (rstar_deepthink's MCTSNode / MCTS.select_child)
keeps its trees. It is the golden model for python_tests/test_forest_golden.py and the baseline
of benchmarks/bench_forest.py; it implements search semantics only (no payloads, no files, no
input validation beyond asserts).

Semantics (mirrors csrc/forest.h):
- select descends from a root through expanded nodes, taking the first non-terminal child with
  the best score; the first node that is not expanded is the leaf. A node whose children are
  all terminal (or that was expanded with none) becomes terminal and the select returns -1.
- UCT: Q + c * sqrt(ln N_parent / N_child), exploration 0 when either count is 0, Q = value_sum
  / visits (0 when unvisited). PUCT: Q + c * prior * sqrt(N_parent) / (1 + N_child).
- Virtual loss v > 0: each pending select counts as a visit of value -v on every node of its
  path (N += in_flight, W -= v * in_flight). v = 0 ignores pending selects.
- A node's first value is the value of its first update (the reference's `inited`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

FLAG_TERMINAL = 1
FLAG_TOO_DEEP = 2
FLAG_DEAD_END = 4
FLAG_VALUED = 8


class Node:
    """One search node (the reference's MCTSNode, reduced to what selection needs)."""

    __slots__ = (
        "id", "parent", "children", "depth", "expanded", "flags", "visits", "value_sum",
        "in_flight", "leaf_pending", "first_value", "prior",
    )

    def __init__(self, node_id: int, parent: Node | None, depth: int) -> None:
        self.id = node_id
        self.parent = parent
        self.children: list[Node] = []
        self.depth = depth
        self.expanded = False
        self.flags = 0
        self.visits = 0
        self.value_sum = 0.0
        self.in_flight = 0
        self.leaf_pending = 0
        self.first_value = math.nan
        self.prior = 1.0

    @property
    def terminal(self) -> bool:
        return bool(self.flags & FLAG_TERMINAL)

    def update(self, value: float) -> None:
        if not self.flags & FLAG_VALUED:
            self.first_value = value
            self.flags |= FLAG_VALUED
        self.visits += 1
        self.value_sum += value

    def q_value(self) -> float:
        return self.value_sum / self.visits if self.visits > 0 else 0.0


class ReferenceForest:
    """Pure-Python twin of rstar_fast._core.Forest (same ids, same choices, same statistics)."""

    def __init__(self, c_uct: float = 2.0, max_depth: int = 16, virtual_loss: float = 1.0,
                 rule: str = "uct") -> None:
        assert rule in ("uct", "puct")
        self.c_uct = c_uct
        self.max_depth = max_depth
        self.virtual_loss = virtual_loss
        self.rule = rule
        self.nodes: list[Node] = []

    # ---- search ---------------------------------------------------------------------------
    def add_trees(self, n: int) -> list[int]:
        first = len(self.nodes)
        self.nodes.extend(Node(first + i, None, 0) for i in range(n))
        return list(range(first, first + n))

    def _score(self, child: Node, parent_n: float) -> float:
        n: float = child.visits
        w = child.value_sum
        if self.virtual_loss > 0:
            n += child.in_flight
            w -= self.virtual_loss * child.in_flight
        q = w / n if n > 0 else 0.0
        if self.rule == "uct":
            if parent_n > 0 and n > 0:
                q += self.c_uct * math.sqrt(math.log(parent_n) / n)
            return q
        return q + self.c_uct * child.prior * math.sqrt(parent_n) / (1 + n)

    def _select_one(self, root: Node) -> int:
        node = root
        while True:
            if node.terminal:
                return -1
            if not node.expanded:
                break
            parent_n = node.visits + (node.in_flight if self.virtual_loss > 0 else 0)
            best: Node | None = None
            best_score = -math.inf
            for child in node.children:
                if child.terminal:
                    continue
                score = self._score(child, parent_n)
                if best is None or score > best_score:  # ties go to the first child
                    best, best_score = child, score
            if best is None:
                node.flags |= FLAG_TERMINAL | FLAG_DEAD_END
                return -1
            node = best
        node.leaf_pending += 1
        walk: Node | None = node
        while walk is not None:
            walk.in_flight += 1
            walk = walk.parent
        return node.id

    def select(self, roots: Iterable[int]) -> list[int]:
        out = []
        for r in roots:
            root = self.nodes[r]
            assert root.parent is None, f"{r} is not a root"
            out.append(self._select_one(root))
        return out

    def expand(self, leaves: Sequence[int], counts: Sequence[int], values: Sequence[float]) -> list[int]:
        assert len(leaves) == len(counts) and sum(counts) == len(values)
        out = []
        j = 0
        for leaf_id, count in zip(leaves, counts):
            leaf = self.nodes[leaf_id]
            assert not leaf.expanded and not leaf.terminal, f"cannot expand {leaf_id}"
            depth = leaf.depth + 1
            for _ in range(count):
                child = Node(len(self.nodes), leaf, depth)
                if depth > self.max_depth:
                    child.flags = FLAG_TERMINAL | FLAG_TOO_DEEP
                value = float(values[j])
                j += 1
                if not math.isnan(value):
                    child.update(value)
                self.nodes.append(child)
                leaf.children.append(child)
                out.append(child.id)
            leaf.expanded = True
            if count == 0:
                leaf.flags |= FLAG_TERMINAL | FLAG_DEAD_END
        return out

    def _end(self, node: Node, leaf: Node | None) -> None:
        """Ends one pending select: at `leaf` if given, else at node, else at its parent."""
        if leaf is None:
            if node.leaf_pending > 0:
                leaf = node
            else:
                assert node.parent is not None and node.parent.leaf_pending > 0, f"no select at {node.id}"
                leaf = node.parent
        assert leaf.leaf_pending > 0, f"no select at {leaf.id}"
        leaf.leaf_pending -= 1
        walk: Node | None = leaf
        while walk is not None:
            walk.in_flight -= 1
            walk = walk.parent

    def backprop(self, nodes: Sequence[int], rewards: Sequence[float],
                 leaves: Sequence[int] | None = None) -> None:
        for i, (node_id, reward) in enumerate(zip(nodes, rewards)):
            node = self.nodes[node_id]
            self._end(node, None if leaves is None else self.nodes[leaves[i]])
            walk: Node | None = node
            value = float(reward)
            while walk is not None:
                walk.update(value)
                walk = walk.parent

    def cancel(self, leaves: Iterable[int]) -> None:
        for leaf_id in leaves:
            self._end(self.nodes[leaf_id], None)

    def update_local(self, nodes: Sequence[int], values: Sequence[float]) -> None:
        for node_id, value in zip(nodes, values):
            self.nodes[node_id].update(float(value))

    def update_path(self, nodes: Sequence[int], values: Sequence[float]) -> None:
        for node_id, value in zip(nodes, values):
            walk: Node | None = self.nodes[node_id]
            while walk is not None:
                walk.update(float(value))
                walk = walk.parent

    def set_terminal(self, nodes: Iterable[int]) -> None:
        for node_id in nodes:
            self.nodes[node_id].flags |= FLAG_TERMINAL

    def set_priors(self, nodes: Sequence[int], priors: Sequence[float]) -> None:
        for node_id, prior in zip(nodes, priors):
            self.nodes[node_id].prior = float(prior)

    # ---- getters --------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def visits(self, nodes: Iterable[int]) -> list[int]:
        return [self.nodes[i].visits for i in nodes]

    def value_sums(self, nodes: Iterable[int]) -> list[float]:
        return [self.nodes[i].value_sum for i in nodes]

    def q(self, nodes: Iterable[int]) -> list[float]:
        return [self.nodes[i].q_value() for i in nodes]

    def in_flight(self, nodes: Iterable[int]) -> list[int]:
        return [self.nodes[i].in_flight for i in nodes]

    def first_values(self, nodes: Iterable[int]) -> list[float]:
        return [self.nodes[i].first_value for i in nodes]

    def flags(self, nodes: Iterable[int]) -> list[int]:
        return [self.nodes[i].flags for i in nodes]

    def is_terminal(self, nodes: Iterable[int]) -> list[bool]:
        return [self.nodes[i].terminal for i in nodes]

    def expanded(self, nodes: Iterable[int]) -> list[bool]:
        return [self.nodes[i].expanded for i in nodes]

    def parent(self, nodes: Iterable[int]) -> list[int]:
        return [-1 if self.nodes[i].parent is None else self.nodes[i].parent.id for i in nodes]

    def children(self, node: int) -> list[int]:
        return [c.id for c in self.nodes[node].children]
