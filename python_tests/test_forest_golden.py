"""Golden test: the C++ forest and python_tests/reference_mcts.py make the same choices.

Random forests under random sequences of operations (select, expand, backprop through a leaf or
one of its children, cancel, terminal marks, local and path updates, priors), one thread; every
select's leaves, every expand's ids and, after each step, every node's statistics must agree
exactly (bit for bit for the float64 value sums).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from reference_mcts import ReferenceForest

from rstar_fast._core import Forest


def _f32(rng: random.Random, nan_p: float = 0.0) -> float:
    if rng.random() < nan_p:
        return float("nan")
    return float(np.float32(rng.uniform(-1.0, 1.0)))


def _compare(forest: Forest, ref: ReferenceForest) -> None:
    assert forest.num_nodes == ref.num_nodes
    ids = np.arange(forest.num_nodes, dtype=np.int64)
    assert forest.visits(ids).tolist() == ref.visits(ids)
    assert forest.value_sums(ids).tolist() == ref.value_sums(ids)
    assert forest.in_flight(ids).tolist() == ref.in_flight(ids)
    assert forest.flags(ids).tolist() == ref.flags(ids)
    assert forest.parent(ids).tolist() == ref.parent(ids)
    np.testing.assert_array_equal(forest.first_values(ids), np.array(ref.first_values(ids), np.float32))
    np.testing.assert_array_equal(forest.q(ids), np.array(ref.q(ids), np.float32))


CONFIGS = [
    # (c_uct, max_depth, virtual_loss, rule)
    (2.0, 16, 0.0, "uct"),   # the rStar-Math setting: exactly the reference's choices
    (2.0, 3, 0.0, "uct"),
    (1.0, 4, 1.0, "uct"),
    (0.5, 5, 0.5, "uct"),
    (1.5, 4, 0.0, "puct"),
    (1.0, 3, 1.0, "puct"),
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c[3]}-vl{c[2]}-d{c[1]}-c{c[0]}" for c in CONFIGS])
def test_forest_matches_reference(config: tuple[float, int, float, str], seed: int) -> None:
    c_uct, max_depth, virtual_loss, rule = config
    rng = random.Random(seed * 1000 + CONFIGS.index(config))
    forest = Forest(c_uct=c_uct, max_depth=max_depth, virtual_loss=virtual_loss, num_threads=1, rule=rule)
    ref = ReferenceForest(c_uct=c_uct, max_depth=max_depth, virtual_loss=virtual_loss, rule=rule)
    roots = forest.add_trees(4).tolist()
    assert ref.add_trees(4) == roots
    pending: list[int] = []  # leaves of selects not yet ended

    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not pending:
            batch = [rng.choice(roots) for _ in range(rng.randint(1, 5))]
            got = forest.select(np.array(batch, np.int64)).tolist()
            assert got == ref.select(batch)
            pending.extend(leaf for leaf in got if leaf >= 0)
        elif op < 0.55:
            leaf = rng.choice(pending)
            if ref.expanded([leaf])[0] or ref.is_terminal([leaf])[0]:
                continue
            count = rng.choice([0, 1, 2, 3, 4, 5])
            values = [_f32(rng, nan_p=0.4) for _ in range(count)]
            got = forest.expand([leaf], [count], np.array(values, np.float32)).tolist()
            assert got == ref.expand([leaf], [count], values)
        elif op < 0.8:
            leaf = pending.pop(rng.randrange(len(pending)))
            children = ref.children(leaf)
            node = rng.choice(children) if children and rng.random() < 0.7 else leaf
            reward = rng.choice([1.0, -1.0, _f32(rng)])
            if node == leaf or ref.nodes[node].leaf_pending == 0:
                # Unambiguous: let both infer which select ends (the node's, else its parent's).
                forest.backprop([node], np.array([reward], np.float32))
                ref.backprop([node], [reward])
            else:  # the child is itself a pending leaf: name the select to end
                forest.backprop([node], np.array([reward], np.float32), leaves=[leaf])
                ref.backprop([node], [reward], leaves=[leaf])
        elif op < 0.88:
            leaf = pending.pop(rng.randrange(len(pending)))
            forest.cancel([leaf])
            ref.cancel([leaf])
        elif op < 0.92:
            node = rng.randrange(forest.num_nodes)
            forest.set_terminal([node])
            ref.set_terminal([node])
        elif op < 0.96:
            node = rng.randrange(forest.num_nodes)
            value = _f32(rng)
            if rng.random() < 0.5:
                forest.update_local([node], np.array([value], np.float32))
                ref.update_local([node], [value])
            else:
                forest.update_path([node], np.array([value], np.float32))
                ref.update_path([node], [value])
        else:
            nodes = [rng.randrange(forest.num_nodes) for _ in range(3)]
            priors = [float(np.float32(rng.random())) for _ in nodes]
            forest.set_priors(nodes, np.array(priors, np.float32))
            ref.set_priors(nodes, priors)
        _compare(forest, ref)

    forest.cancel(pending)
    ref.cancel(pending)
    _compare(forest, ref)
    assert not forest.in_flight(np.arange(forest.num_nodes)).any()
