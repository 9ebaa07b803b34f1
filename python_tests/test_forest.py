"""rstar_fast._core.Forest through the bindings: semantics, payloads, bad input, save/load and
concurrent use from many Python threads."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import rstar_fast
from rstar_fast import _core
from rstar_fast._core import Forest

NAN = float("nan")


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# ---- semantics ----------------------------------------------------------------------------------

def test_exported_from_package() -> None:
    assert rstar_fast.Forest is Forest
    assert issubclass(_core.ForestError, ValueError)
    assert issubclass(_core.DTypeError, TypeError) and issubclass(_core.DTypeError, _core.ForestError)


def test_defaults_and_node_size() -> None:
    f = Forest()
    assert (f.c_uct, f.max_depth, f.virtual_loss, f.rule) == (2.0, 16, 1.0, "uct")
    assert f.num_threads >= 1
    assert Forest.bytes_per_node <= 64 and _core.BYTES_PER_NODE == Forest.bytes_per_node
    assert f.num_nodes == 0 and f.num_trees == 0


def test_select_expand_backprop_round_trip() -> None:
    f = Forest(num_threads=1)
    roots = f.add_trees(3)
    assert roots.dtype == np.int64 and roots.tolist() == [0, 1, 2]
    leaves = f.select(roots)
    assert leaves.tolist() == roots.tolist()  # fresh roots are their own leaves
    assert f.in_flight(roots).tolist() == [1, 1, 1]
    kids = f.expand(leaves, np.array([2, 1, 0], np.int32), f32(0.5, NAN, 0.25))
    assert kids.tolist() == [3, 4, 5]
    assert f.visits(kids).tolist() == [1, 0, 1]
    assert f.is_terminal([2]).tolist() == [True]  # expanded with no children: a dead end
    assert f.flags([2])[0] & _core.FLAG_DEAD_END
    f.backprop([4], f32(-1.0))        # a child of the pending leaf 0 ends leaf 0's select
    f.backprop([1], f32(1.0))         # the leaf itself
    f.cancel([2])
    assert f.in_flight(np.arange(f.num_nodes)).tolist() == [0] * 6
    assert f.visits(roots).tolist() == [1, 1, 0]
    assert f.q([0, 3, 4, 1]).tolist() == [-1.0, 0.5, -1.0, 1.0]
    assert f.parent(kids).tolist() == [0, 0, 1] and f.parent(0) == -1
    assert f.depth(kids).tolist() == [1, 1, 1] and f.depth(0) == 0
    assert f.children(0).tolist() == [3, 4] and f.children(5).tolist() == []
    assert f.num_children(roots).tolist() == [2, 1, 0]
    assert f.roots_of(kids).tolist() == [0, 0, 1]
    assert f.states([0, 3]).tolist() == [_core.STATE_EXPANDED, _core.STATE_FRESH]
    assert f.select([2]).tolist() == [-1]


def test_uct_matches_formula_and_ties_go_first() -> None:
    f = Forest(c_uct=2.0, virtual_loss=0.0, num_threads=1)
    (root,) = f.add_trees(1)
    kids = f.expand([root], [3], f32(NAN, NAN, NAN))
    assert f.select([root]).tolist() == [kids[0]]  # all scores 0: the first child
    f.cancel([kids[0]])
    f.update_path(kids[:2], f32(0.3, 0.1))          # root N=2; kids N=1
    # scores: 0.3 + 2*sqrt(ln 2 / 1), 0.1 + 2*sqrt(ln 2), 0 (unvisited: exploration 0)
    assert f.select([root]).tolist() == [kids[0]]
    f.cancel([kids[0]])
    f.update_local(kids[2:], f32(0.5))
    expected = max(range(3), key=lambda i: [0.3, 0.1, 0.5][i] + 2 * math.sqrt(math.log(2) / 1))
    assert f.select([root]).tolist() == [kids[expected]]


def test_uct_trades_q_for_exploration_by_the_formula() -> None:
    """Q + c * sqrt(ln N_parent / N_child) with c = 2 decides where Q alone would not: A (N=1,
    Q=-0.75) scores -0.75 + 2 sqrt(ln 5) = 1.79, B (N=4, Q=0.75) 0.75 + sqrt(ln 5) = 2.02.
    log2, no square root or Q = W / (N + 1) would each pick A."""
    f = Forest(c_uct=2.0, virtual_loss=0.0, num_threads=1)
    (root,) = f.add_trees(1)
    a, b = f.expand([root], [2], f32(NAN, NAN))
    f.update_path([a], f32(-0.75))
    for _ in range(4):
        f.update_path([b], f32(0.75))
    assert f.visits([root, a, b]).tolist() == [5, 1, 4]
    assert f.select([root]).tolist() == [b]


def test_virtual_loss_spreads_concurrent_selects() -> None:
    f = Forest(virtual_loss=1.0, num_threads=1)
    (root,) = f.add_trees(1)
    kids = f.expand([root], [3], f32(NAN, NAN, NAN))
    leaves = f.select([root, root, root])
    # 1st: all scores 0 -> kids[0]. 2nd: root N = 1 (ln 1 = 0), kids[0] scores -1 -> kids[1].
    # 3rd: root N = 2, kids[0] and kids[1] score -1 + 2*sqrt(ln 2) > 0 = kids[2]'s -> kids[0].
    assert leaves.tolist() == [kids[0], kids[1], kids[0]]
    assert f.in_flight([root, *kids]).tolist() == [3, 2, 1, 0]
    f.cancel(leaves)
    g = Forest(virtual_loss=0.0, num_threads=1)
    (root,) = g.add_trees(1)
    kids = g.expand([root], [3], f32(NAN, NAN, NAN))
    assert g.select([root, root]).tolist() == [kids[0], kids[0]]  # virtual loss off


def test_terminal_children_and_max_depth() -> None:
    f = Forest(max_depth=1, num_threads=1)
    (root,) = f.add_trees(1)
    kids = f.expand([root], [2], f32(0.9, 0.1))
    f.set_terminal(kids[:1])
    leaf = f.select([root])
    assert leaf.tolist() == [kids[1]]
    grand = f.expand(leaf, [2], f32(NAN, 0.5))
    flags = f.flags(grand)
    assert (flags & _core.FLAG_TOO_DEEP).all() and f.is_terminal(grand).all()
    f.cancel(leaf)
    assert f.select([root]).tolist() == [-1]   # kids[1]'s children are all terminal
    assert f.is_terminal(kids).tolist() == [True, True]
    assert f.select([root]).tolist() == [-1]   # now the root is a dead end too
    assert f.flags([root])[0] & _core.FLAG_DEAD_END
    assert not f.in_flight(np.arange(f.num_nodes)).any()


def test_first_value_and_local_update() -> None:
    f = Forest(num_threads=1)
    (root,) = f.add_trees(1)
    assert math.isnan(f.first_values([root])[0])
    leaf = f.select([root])
    kids = f.expand(leaf, [2], f32(0.25, NAN))
    f.update_local(kids[1:], f32(-1.0))  # a failed step: -1 on itself only
    assert f.visits([root]).tolist() == [0]
    assert f.first_values(kids).tolist() == [0.25, -1.0]
    f.backprop(kids[:1], f32(1.0))
    assert f.first_values([root]).tolist() == [1.0]
    assert f.value_sums(kids).tolist() == [1.25, -1.0]


def test_puct_rule_uses_priors() -> None:
    f = Forest(rule="puct", virtual_loss=0.0, num_threads=1)
    (root,) = f.add_trees(1)
    kids = f.expand([root], [2], f32(NAN, NAN))
    f.update_local([root], f32(0.0))
    f.set_priors(kids, f32(0.2, 0.8))
    assert f.priors(kids).tolist() == pytest.approx([0.2, 0.8])
    assert f.select([root]).tolist() == [kids[1]]


def test_user_flags_and_export() -> None:
    f = Forest(num_threads=1)
    (root,) = f.add_trees(1)
    leaf = f.select([root])
    kids = f.expand(leaf, [2], f32(0.5, NAN))
    grand = f.expand(kids[:1], [1], f32(NAN))
    f.backprop(kids[1:], f32(1.0))
    f.set_flags(kids[:1], [0x10])
    tree = f.export_tree(root)
    assert tree["ids"].tolist() == [root, kids[0], kids[1], grand[0]]  # breadth first
    assert tree["parents"].tolist() == [-1, root, root, kids[0]]
    assert tree["depth"].tolist() == [0, 1, 1, 2]
    assert tree["visits"].tolist() == [1, 1, 1, 0]
    V = _core.FLAG_VALUED
    assert tree["flags"].tolist() == [V, 0x10 | V, V, 0]
    assert tree["num_children"].tolist() == [2, 1, 0, 0]
    assert set(tree) >= {"ids", "parents", "depth", "visits", "q", "value_sum", "first_value", "flags", "terminal"}


# ---- payloads ------------------------------------------------------------------------------------

def test_payloads_and_path_tokens() -> None:
    f = Forest(num_threads=1)
    roots = f.add_trees(2)
    kids = f.expand(roots[:1], [2], f32(NAN, NAN))
    grand = f.expand(kids[1:], [1], f32(NAN))
    f.set_tokens(roots, [np.array([1, 2, 3]), []])                         # prompts
    f.set_tokens(np.r_[kids, grand], np.array([10, 11, 12, 13], np.int32), [0, 1, 3, 4])
    flat, offsets = f.path_tokens([grand[0], kids[0], roots[1], roots[0]])
    assert flat.dtype == np.int32 and offsets.dtype == np.int64
    pieces = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(4)]
    assert pieces == [[1, 2, 3, 11, 12, 13], [1, 2, 3, 10], [], [1, 2, 3]]
    f.set_texts([roots[0], kids[1], grand[0]], ["Q? ", "# Step 1: π\n", "print(1)"])
    assert f.path_texts([grand[0]]) == ["Q? # Step 1: π\nprint(1)"]
    data = "ab".encode() + "é".encode()
    f.set_texts(kids, data, offsets=[0, 2, 4])
    assert f.texts(kids) == ["ab", "é"]
    raw, off = f.texts_bytes(kids)
    assert bytes(raw) == data and off.tolist() == [0, 2, 4]
    tok, off = f.tokens(kids)
    assert tok.tolist() == [10, 11, 12] and off.tolist() == [0, 1, 3]
    f.set_texts(kids[:1], ["replaced"])
    assert f.texts(kids) == ["replaced", "é"]


# ---- bad input -----------------------------------------------------------------------------------

def _snapshot(f: Forest) -> tuple:
    ids = np.arange(f.num_nodes)
    return (f.num_nodes, f.visits(ids).tolist(), f.in_flight(ids).tolist(), f.states(ids).tolist(),
            f.flags(ids).tolist(), f.value_sums(ids).tolist())


def test_bad_input_raises_and_changes_nothing() -> None:
    f = Forest(num_threads=1)
    roots = f.add_trees(2)
    leaves = f.select(roots)
    kids = f.expand(leaves[:1], [1], f32(0.5))
    before = _snapshot(f)
    cases = [
        (_core.UnknownNodeError, lambda: f.select([99])),
        (_core.UnknownNodeError, lambda: f.visits([-1])),
        (_core.UnknownNodeError, lambda: f.backprop([0, 1234], f32(1, 1))),
        (_core.ShapeError, lambda: f.expand(leaves[1:], [2], f32(0.5))),
        (_core.ShapeError, lambda: f.expand(leaves[1:], [1, 1], f32(0.5, 0.5))),
        (_core.ShapeError, lambda: f.backprop(kids, f32(1.0, 2.0))),
        (_core.ShapeError, lambda: f.select(np.zeros((1, 1), np.int64))),
        (_core.InvalidValueError, lambda: f.expand(leaves[1:], [-1], f32())),
        (_core.InvalidValueError, lambda: f.expand([1, 1], [1, 0], f32(0.5))),
        (_core.InvalidValueError, lambda: f.expand(leaves[1:], [1], f32(math.inf))),
        (_core.InvalidValueError, lambda: f.backprop(kids, f32(NAN))),
        (_core.InvalidValueError, lambda: f.update_local(kids, f32(math.inf))),
        (_core.InvalidValueError, lambda: f.set_flags(kids, [_core.FLAG_TERMINAL])),
        (_core.InvalidValueError, lambda: f.set_tokens(kids, [2**40], [0, 1])),
        (_core.InvalidValueError, lambda: f.set_tokens(kids, [1, 2], [0, 3])),
        (_core.InvalidValueError, lambda: Forest(rule="mcts")),
        (_core.InvalidValueError, lambda: Forest(max_depth=-1)),
        (_core.InvalidValueError, lambda: Forest(virtual_loss=-1.0)),
        (_core.NodeStateError, lambda: f.expand(leaves[:1], [1], f32(0.5))),    # already expanded
        (_core.NodeStateError, lambda: f.expand([leaves[1], kids[0], leaves[0]], [1, 1, 1], f32(1, 1, 1))),
        (_core.NodeStateError, lambda: f.select(kids)),                          # not a root
        (_core.NodeStateError, lambda: f.cancel([leaves[1], leaves[1]])),        # one select only
        (_core.NodeStateError, lambda: f.backprop([leaves[1], kids[0], kids[0]], f32(1, 1, 1))),
        (_core.DTypeError, lambda: f.select(np.array([0.0]))),
        (_core.DTypeError, lambda: f.expand(leaves[1:], np.array([1.0]), f32(0.5))),
        (_core.DTypeError, lambda: f.backprop(kids, np.array(["x"]))),
        (_core.DTypeError, lambda: f.set_texts(kids, "one string")),
        (_core.DTypeError, lambda: f.set_texts(kids, [3])),
        # plain lists take the binding's fast path, but keep numpy's rules and errors
        (_core.DTypeError, lambda: f.select([0.5])),
        (_core.DTypeError, lambda: f.select([True])),
        (_core.DTypeError, lambda: f.expand(leaves[1:], [1.0], [0.5])),
        (_core.DTypeError, lambda: f.backprop(kids, ["x"])),
        (_core.InvalidValueError, lambda: f.set_tokens(kids, [[2**40]])),
        (_core.InvalidValueError, lambda: f.expand(leaves[1:], [1], [math.inf])),
        # expand's payloads are checked before any child is created
        (_core.ShapeError, lambda: f.expand(leaves[1:], [1], [0.5], texts=["a", "b"])),
        (_core.DTypeError, lambda: f.expand(leaves[1:], [1], [0.5], texts=[3])),
        (_core.InvalidValueError, lambda: f.expand(leaves[1:], [1], [0.5], tokens=[[2**40]])),
        (_core.ShapeError, lambda: f.expand(leaves[1:], [1], [0.5], terminal=[True, False])),
        # no array at all is a type error, not a shape one
        (_core.DTypeError, lambda: f.visits(None)),
        (_core.DTypeError, lambda: f.visits("0")),
        (_core.InvalidValueError, lambda: f.visits(np.array([2**64 - 1], np.uint64))),
        (_core.InvalidValueError, lambda: f.set_texts(kids, ["\udc80"])),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert _snapshot(f) == before, error
    # A state error on the second leaf also released the first leaf's claim.
    assert f.states([leaves[1]]).tolist() == [_core.STATE_FRESH]
    with pytest.raises(_core.UnknownNodeError, match=r"roots\[0\] = 99"):
        f.select([99])
    with pytest.raises(_core.ShapeError, match=r"sum\(counts\) = 2 but len\(values\) = 1"):
        f.expand(leaves[1:], [2], f32(0.5))
    # the value as given, not wrapped to a negative id
    with pytest.raises(_core.InvalidValueError, match=r"nodes\[1\] = 18446744073709551615 is out of the int64"):
        f.visits(np.array([0, 2**64 - 1], np.uint64))
    with pytest.raises(_core.InvalidValueError, match=r"texts\[1\] cannot be stored as UTF-8"):
        f.set_texts([kids[0], kids[0]], ["ok", "a\udc80"])
    # a finite value past float32's range is named as given, from a list or a float64 array
    for values in ([0.5, 1e39], np.array([0.5, -1e39])):
        with pytest.raises(_core.InvalidValueError, match=r"values\[1\] = -?1e\+39 is outside float32's range"):
            f.update_local([kids[0], kids[0]], values)
    assert _snapshot(f) == before
    f.backprop(kids, f32(1.0))
    f.cancel(leaves[1:])
    assert not f.in_flight(np.arange(f.num_nodes)).any()


def test_expand_with_payloads_equals_separate_calls() -> None:
    texts, tokens, terminal = ["a", "bé", ""], [[1, 2], [], [3]], [False, True, False]
    values = [0.5, NAN, -0.25]
    one, two = Forest(num_threads=1), Forest(num_threads=1)
    (r1,), (r2,) = one.add_trees(1).tolist(), two.add_trees(1).tolist()
    kids = one.expand([r1], [3], values, texts=texts, tokens=tokens, terminal=terminal)
    same = two.expand([r2], [3], values)
    two.set_texts(same, texts)
    two.set_tokens(same, tokens)
    two.set_terminal(same[[1]])
    assert kids.tolist() == same.tolist()
    assert _snapshot(one) == _snapshot(two)
    assert one.texts(kids) == texts
    assert one.is_terminal(kids).tolist() == terminal
    flat, offsets = one.path_tokens(kids)
    assert flat.tolist() == [1, 2, 3] and offsets.tolist() == [0, 2, 2, 3]


def test_empty_batches() -> None:
    f = Forest(num_threads=1)
    assert f.add_trees(0).tolist() == []
    assert f.select([]).tolist() == []
    assert f.expand([], [], []).tolist() == []
    f.backprop([], [])
    f.cancel([])
    flat, offsets = f.path_tokens([])
    assert flat.tolist() == [] and offsets.tolist() == [0]


# ---- save / load ---------------------------------------------------------------------------------

def _build(f: Forest, rng: np.random.Generator, rounds: int = 6) -> None:
    roots = f.add_trees(5)
    f.set_tokens(roots, [rng.integers(0, 300, size=4) for _ in roots])
    for _ in range(rounds):
        leaves = f.select(roots)
        leaves = leaves[leaves >= 0]
        values = rng.uniform(-1, 1, size=3 * len(leaves)).astype(np.float32)
        values[::4] = np.nan
        kids = f.expand(leaves, np.full(len(leaves), 3), values)
        f.set_texts(kids, [f"step {k} é" for k in kids.tolist()])
        f.backprop(kids[::3], np.where(rng.random(len(leaves)) < 0.5, 1.0, -1.0).astype(np.float32))
    f.set_terminal(kids[1:2])


def test_save_load_round_trip(tmp_path: Path) -> None:
    f = Forest(c_uct=1.5, max_depth=3, virtual_loss=0.5, rule="puct", num_threads=1)
    _build(f, np.random.default_rng(0))
    pending = f.select(np.arange(5))  # in flight: not saved
    path = tmp_path / "forest.bin"
    f.save(path)
    g = Forest.load(str(path), num_threads=1)
    assert (g.c_uct, g.max_depth, g.virtual_loss, g.rule) == (1.5, 3, 0.5, "puct")
    assert g.num_nodes == f.num_nodes and g.num_trees == 5
    for root in range(5):
        a, b = f.export_tree(root), g.export_tree(root)
        for key in a:
            if key == "in_flight":
                assert not b[key].any()
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ids = np.arange(f.num_nodes)
    assert g.texts(ids) == f.texts(ids)
    for x, y in zip(g.path_tokens(ids), f.path_tokens(ids)):
        np.testing.assert_array_equal(x, y)
    f.cancel(pending[pending >= 0])
    # The loaded forest goes on searching like the original.
    np.testing.assert_array_equal(g.select(np.arange(5)), f.select(np.arange(5)))


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    f = Forest(num_threads=1)
    _build(f, np.random.default_rng(1), rounds=2)
    path = tmp_path / "forest.bin"
    f.save(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.bin"
    for content, message in [
        (data[: len(data) // 2], "truncated"),
        (data[:20], "truncated"),
        (b"", "truncated"),
        (data[:-1], "truncated"),
        (data + b"x", "unexpected bytes"),
        (b"PK\x03\x04 a zip file" + bytes(100), "not an rstar_fast forest file"),
        (data[:8] + (99).to_bytes(4, "little") + data[12:], "unsupported file version 99"),
        (data[:200] + bytes([data[200] ^ 1]) + data[201:], "checksum mismatch"),
    ]:
        bad.write_bytes(content)
        with pytest.raises(_core.CorruptFileError, match=message):
            Forest.load(bad)
    with pytest.raises(FileNotFoundError):
        Forest.load(tmp_path / "missing.bin")
    with pytest.raises(OSError):
        f.save(tmp_path / "no" / "such" / "dir.bin")


# The file layout of csrc/forest_io.cpp: a 64-byte header (num_nodes at byte 40), one array per
# node field, the payload, and a checksum of everything before it.
_NODE_FIELDS = [("parent", "<u4"), ("depth", "<u2"), ("first_child", "<u4"), ("child_count", "<u2"),
                ("state", "u1"), ("flags", "u1"), ("visits", "<u4"), ("value_sum", "<f8"),
                ("first_value", "<f4"), ("prior", "<f4"), ("text_len", "<u4"), ("token_len", "<u4")]


def _checksum(data: bytes) -> int:
    mask, h = (1 << 64) - 1, 0xCBF29CE484222325
    whole = len(data) // 8 * 8
    for (w,) in np.frombuffer(data[:whole], dtype="<u8").reshape(-1, 1).tolist():
        h = ((h ^ w) * 0x100000001B3) & mask
        h ^= h >> 29
    for b in data[whole:]:
        h = ((h ^ b) * 0x100000001B3) & mask
    return h ^ len(data)


def _with_node_field(data: bytes, field: str, node: int, value: float) -> bytes:
    """A saved forest with one node's field set to `value`, its checksum made anew."""
    n = int.from_bytes(data[40:48], "little")
    at = 64
    for name, dtype in _NODE_FIELDS:
        if name == field:
            arr = np.frombuffer(data, dtype=dtype, count=n, offset=at).copy()
            arr[node] = value
            data = data[:at] + arr.tobytes() + data[at + arr.nbytes:]
            break
        at += np.dtype(dtype).itemsize * n
    body = data[:-8]
    return body + _checksum(body).to_bytes(8, "little")


def test_load_refuses_values_the_api_never_stores(tmp_path: Path) -> None:
    """A file whose checksum is right can still hold what no call stores (crafted, or written by
    a bug): loaded, a NaN sum or a non-terminal node past max_depth would corrupt later calls."""
    f = Forest(max_depth=1, num_threads=1)
    root = f.add_trees(1)
    f.set_tokens(root, [[5, 6]])
    (child,) = f.expand(root, [1], f32(0.5))
    (deep,) = f.expand([child], [1], f32(0.5))  # depth 2 > max_depth: created terminal
    path, bad = tmp_path / "forest.bin", tmp_path / "bad.bin"
    f.save(path)
    data = path.read_bytes()
    assert Forest.load(path).num_nodes == 3  # the helper keeps a good file good
    bad.write_bytes(_with_node_field(data, "visits", 0, 3))
    assert Forest.load(bad).visits([0]).tolist() == [3]
    for field, node, value, message in [
        ("value_sum", child, NAN, f"node {child}: a value that is not finite"),
        ("first_value", child, np.inf, f"node {child}: a value that is not finite"),
        ("prior", child, -5.0, f"node {child}: a prior that is not finite and >= 0"),
        ("flags", deep, 0, f"node {deep}: deeper than max_depth but not terminal"),
    ]:
        bad.write_bytes(_with_node_field(data, field, node, value))
        with pytest.raises(_core.CorruptFileError, match=message):
            Forest.load(bad)
    tokens = data[:-16] + (-7).to_bytes(4, "little", signed=True) + data[-12:-8]
    bad.write_bytes(tokens + _checksum(tokens).to_bytes(8, "little"))
    with pytest.raises(_core.CorruptFileError, match="token id -7"):
        Forest.load(bad)


def test_visits_saturate_short_of_the_pending_count(tmp_path: Path) -> None:
    """Visits and pending selects share one 64-bit word: a visit past the limit is not counted
    (nor its value), and never carries into the pending count."""
    f = Forest(num_threads=1)
    root = f.add_trees(1)
    f.update_local(root, f32(0.5))
    path, near = tmp_path / "forest.bin", tmp_path / "near.bin"
    f.save(path)
    limit = 2**32 - 256
    near.write_bytes(_with_node_field(path.read_bytes(), "visits", 0, limit - 2))
    g = Forest.load(near)
    q = g.q(root)[0]
    g.update_local(np.repeat(root, 300), np.full(300, -1.0, np.float32))
    assert g.visits(root).tolist() == [limit] and g.in_flight(root).tolist() == [0]
    assert g.q(root)[0] < q  # the two visits below the limit counted, with their values
    leaf = g.select(root)
    g.backprop(leaf, f32(1.0))  # a simulation ends: its pending select is removed all the same
    assert g.visits(root).tolist() == [limit] and g.in_flight(root).tolist() == [0]


def test_load_refuses_a_node_its_parent_does_not_list(tmp_path: Path) -> None:
    """Each child points back to its parent, but the parent's range must also hold the child:
    else export and select never reach it, and a parent saved as fresh could be expanded again."""
    f = Forest(num_threads=1)
    root = f.add_trees(1)
    f.expand(root, [2], f32(0.0, 0.0))
    path, bad = tmp_path / "forest.bin", tmp_path / "bad.bin"
    f.save(path)
    data = path.read_bytes()
    bad.write_bytes(_with_node_field(data, "child_count", 0, 1))  # node 2 left out of the range
    with pytest.raises(_core.CorruptFileError, match="node 2: not among its parent's children"):
        Forest.load(bad)
    fresh = _with_node_field(_with_node_field(data, "child_count", 0, 0), "state", 0, 0)
    bad.write_bytes(fresh)  # the root saved as never expanded, its children still pointing at it
    with pytest.raises(_core.CorruptFileError, match="node 1: not among its parent's children"):
        Forest.load(bad)


def test_saves_to_one_path_from_two_threads_both_succeed(tmp_path: Path) -> None:
    f = Forest(num_threads=1)
    _build(f, np.random.default_rng(2), rounds=2)
    path, errors = tmp_path / "forest.bin", []

    def save_often() -> None:
        for _ in range(20):
            try:
                f.save(path)
            except OSError as e:  # two saves shared one temporary file, and one lost it
                errors.append(e)

    threads = [threading.Thread(target=save_often) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and Forest.load(path).num_nodes == f.num_nodes
    assert [p.name for p in tmp_path.iterdir()] == ["forest.bin"]


def test_a_node_named_twice_in_a_large_call_keeps_its_last_value() -> None:
    """Large calls split across threads; a node named twice must still end with the last value
    it was given, as in a small call."""
    f = Forest(num_threads=2)
    f.add_trees(2)
    for _ in range(20):
        f.set_texts(np.zeros(4096, np.int64), [f"t{i}" for i in range(4096)])
        f.set_priors(np.zeros(1 << 15, np.int64), np.arange(1 << 15, dtype=np.float32))
        f.set_tokens(np.zeros(4096, np.int64), [[i] for i in range(4096)])
        assert f.texts([0]) == ["t4095"] and f.priors([0]).tolist() == [32767.0]
        assert f.path_tokens([0])[0].tolist() == [4095]


def test_payload_arguments_are_named_in_their_errors() -> None:
    f = Forest(num_threads=1)
    root = f.add_trees(1)
    with pytest.raises(_core.ShapeError, match=r"len\(values\) = 2 but len\(texts\) = 1"):
        f.expand(root, [2], f32(0, 0), texts=["a"])
    with pytest.raises(_core.ShapeError, match=r"len\(values\) = 2 but len\(tokens\) = 1"):
        f.expand(root, [2], f32(0, 0), tokens=[[1]])
    for bad, kind in [(5, "int"), ({0: "x"}, "dict"), ((t for t in ["x"]), "generator")]:
        with pytest.raises(_core.DTypeError, match=f"texts must be a sequence of str .*got {kind}"):
            f.set_texts(root, bad)
        with pytest.raises(_core.DTypeError, match=f"tokens must be a sequence of token id .*got {kind}"):
            f.set_tokens(root, bad)
    with pytest.raises(_core.DTypeError, match=r"tokens\[1\] must be .*got NoneType"):
        f.set_tokens(np.array([0, 0]), [[1], None])
    assert f.num_nodes == 1 and f.texts(root) == [""]


# ---- concurrency ---------------------------------------------------------------------------------

def test_concurrent_simulations_from_python_threads() -> None:
    """Many Python threads select/expand/backprop/cancel on the same trees (the GIL released
    in the calls on 64 or more nodes: the selects and path_tokens over all 96 roots run in
    parallel, fanned out over the pool). Afterwards nothing is in flight and every node's
    visits and value sum are exactly those of the backprops through it plus its score."""
    f = Forest(virtual_loss=1.0, max_depth=5, num_threads=2)
    roots = f.add_trees(96)
    n_threads, rounds = 8, 25
    logs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_threads)]
    scored: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            for _ in range(rounds):
                leaves = f.select(roots)
                leaves = leaves[leaves >= 0]
                action = rng.integers(0, 3, size=len(leaves))
                f.cancel(leaves[action == 0])
                direct = leaves[action == 1]
                rewards = np.where(rng.random(len(direct)) < 0.5, 1.0, -1.0).astype(np.float32)
                f.backprop(direct, rewards)
                logs[t].append((direct, rewards))
                for leaf in leaves[action == 2]:
                    values = np.where(rng.random(3) < 0.5, 0.5, np.nan).astype(np.float32)
                    try:
                        kids = f.expand([leaf], [3], values)
                    except _core.NodeStateError:  # another thread expanded it first
                        f.cancel([leaf])
                        continue
                    scored[t].append((kids, values))
                    through = kids[rng.integers(0, 3, size=1)]
                    reward = np.array([rng.choice([1.0, -1.0])], np.float32)
                    f.backprop(through, reward, leaves=[leaf])
                    logs[t].append((through, reward))
                f.path_tokens(roots)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors

    ids = np.arange(f.num_nodes)
    parents = f.parent(ids)
    expected_visits = np.zeros(f.num_nodes, np.int64)
    expected_sum = np.zeros(f.num_nodes, np.float64)
    for t in range(n_threads):
        for nodes, rewards in logs[t]:
            for node, reward in zip(nodes.tolist(), rewards.tolist()):
                while node != -1:
                    expected_visits[node] += 1
                    expected_sum[node] += reward
                    node = int(parents[node])
        for kids, values in scored[t]:
            hit = ~np.isnan(values)
            expected_visits[kids[hit]] += 1
            expected_sum[kids[hit]] += values[hit]
    assert expected_visits[roots].sum() > 0
    assert not f.in_flight(ids).any()
    np.testing.assert_array_equal(f.visits(ids), expected_visits)
    np.testing.assert_allclose(f.value_sums(ids), expected_sum, atol=1e-9)
    for root in roots.tolist():  # every node of every tree is reachable and consistent
        tree = f.export_tree(root)
        assert (tree["depth"][1:] == f.depth(tree["parents"][1:]) + 1).all()
        assert len(np.unique(tree["ids"])) == len(tree["ids"])


def test_descend_continues_a_simulation_below_its_expanded_leaf():
    f = Forest(virtual_loss=0.0)
    root = f.add_trees(1)
    leaf = f.select(root)
    kids = f.expand(leaf, np.array([3], np.int32), np.array([np.nan, 0.5, np.nan], np.float32))
    nxt = f.descend(leaf)
    assert nxt.tolist() == [kids[1]]  # the scored child beats the unvisited ones
    assert f.in_flight(np.array([root[0], kids[1]])).tolist() == [1, 1]
    assert f.descend(nxt).tolist() == nxt.tolist()  # not expanded yet: it stays the leaf
    f.expand(nxt, np.array([1], np.int32), np.array([np.nan], np.float32))
    f.set_terminal(f.children(int(nxt[0])))
    assert f.descend(nxt).tolist() == [-1]  # dead end: the simulation still ends at nxt
    f.cancel(nxt)
    assert int(f.in_flight(np.arange(f.num_nodes)).sum()) == 0
    with pytest.raises(_core.ForestError, match="no pending simulation"):
        f.descend(nxt)


# ---- argument safety, failed allocations, atomic expand ----------------------------------------

def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter: a crash or a hang there fails one test, not the run."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_set_texts_needs_a_contiguous_buffer() -> None:
    f = Forest(num_threads=1)
    (root,) = f.add_trees(1)
    data = bytes(range(97, 117))
    # Read as one run from the buffer's start, these gave wrong bytes or bytes before the array.
    for strided in (memoryview(data)[::2], np.frombuffer(data, np.uint8)[::-1]):
        with pytest.raises(_core.DTypeError, match="texts with offsets must be C-contiguous"):
            f.set_texts([root], strided, [0, len(strided)])
        assert f.texts([root]) == [""]
    f.set_texts([root], memoryview(data)[3:7], [0, 4])  # a contiguous view at any start
    assert f.texts([root]) == ["defg"]
    f.set_texts([root], np.frombuffer(data, np.uint8)[2:3][::-1], [0, 1])  # one byte: any stride
    assert f.texts([root]) == ["c"]


def test_arrays_changed_by_another_thread_during_a_call() -> None:
    """A call on 64 or more nodes releases the GIL; a thread that changes the caller's array
    meanwhile must not change what the core uses after validating it (here an id beyond the
    forest: a crash while the core used the caller's array itself)."""
    p = _run_python("""
        import threading, time
        import numpy as np
        from rstar_fast import _core
        f = _core.Forest(num_threads=1)
        f.add_trees(1)
        ids = np.zeros(1 << 20, np.int64)
        stop = False
        def flip():
            while not stop:
                ids[-1] = 2**31
                ids[-1] = 0
        t = threading.Thread(target=flip, daemon=True)
        t.start()
        calls = refused = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                f.visits(ids)
            except _core.UnknownNodeError:
                refused += 1
            calls += 1
        stop = True
        t.join()
        print("ok", calls, refused)
    """)
    assert p.returncode == 0 and p.stdout.startswith("ok"), (p.returncode, p.stdout, p.stderr[-3000:])


def test_failed_allocation_leaves_the_forest_as_it_was() -> None:
    """Node chunks are allocated before their ids are published: an add_trees or expand that runs
    out of memory part way leaves num_nodes as it was (no zero-filled nodes: node 0 looked like
    its own parent and roots_of or backprop never returned)."""
    p = _run_python("""
        import resource
        import numpy as np
        from rstar_fast import _core

        def limit(extra):
            vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))

        def unlimit():
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        f = _core.Forest(num_threads=1)
        limit(10 << 20)  # room for one node chunk (~6 MiB mapped) but not for four
        try:
            f.add_trees(1 << 18)
            print("add_trees did not fail")
        except MemoryError as e:
            print("add_trees failed:", e)
        unlimit()
        assert f.num_nodes == 0 and f.num_trees == 0, (f.num_nodes, f.num_trees)
        roots = f.add_trees(4)
        assert roots.tolist() == [0, 1, 2, 3] and f.roots_of(roots).tolist() == [0, 1, 2, 3]
        counts = np.full(4, 65535)
        values = np.full(4 * 65535, np.nan, np.float32)
        limit(10 << 20)
        try:
            f.expand(roots, counts, values)
            print("expand did not fail")
        except MemoryError as e:
            print("expand failed:", e)
        unlimit()
        assert f.num_nodes == 4 and f.states(roots).tolist() == [0] * 4, f.num_nodes
        kids = f.expand(roots, counts, values)
        leaves = f.select(roots)
        f.backprop(leaves, np.ones(4, np.float32))
        assert f.roots_of(leaves).tolist() == roots.tolist() and f.visits(roots).tolist() == [1] * 4
        print("ok", f.num_nodes)
    """)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-3000:])
    assert "add_trees failed" in p.stdout and "expand failed" in p.stdout, p.stdout
    assert "ok 262144" in p.stdout


def test_descend_claims_one_simulation_per_leaf() -> None:
    f = Forest(num_threads=1)
    (root,) = f.add_trees(1)
    leaf = f.select([root])
    kids = f.expand(leaf, [2], f32(NAN, NAN))
    # The same leaf twice would move one simulation twice (in_flight went negative).
    with pytest.raises(_core.NodeStateError, match=r"leaves\[1\] = 0 holds no pending simulation"):
        f.descend([leaf[0], leaf[0]])
    assert f.in_flight([root, *kids]).tolist() == [1, 0, 0]
    nxt = f.descend(leaf)
    assert nxt.tolist() == [kids[0]] and f.in_flight([root, *kids]).tolist() == [1, 1, 0]
    with pytest.raises(_core.NodeStateError, match="no pending simulation"):
        f.descend(leaf)  # moved away: nothing left to claim
    other = f.add_trees(1)
    other_leaf = f.select(other)
    with pytest.raises(_core.NodeStateError):
        f.descend([other_leaf[0], leaf[0]])  # all or nothing: the first claim is given back
    f.cancel(other_leaf)
    f.cancel(nxt)
    assert not f.in_flight(np.arange(f.num_nodes)).any()
    with pytest.raises(_core.NodeStateError):
        f.cancel(nxt)


def test_expand_checks_payload_sizes_before_expanding() -> None:
    f = Forest(num_threads=1)
    (root,) = f.add_trees(1)
    before = _snapshot(f)
    for payload in ({"texts": ["x" * (1 << 24)]}, {"tokens": [np.zeros(1 << 22, np.int32)]}):
        with pytest.raises(_core.InvalidValueError, match="one payload holds at most"):
            f.expand([root], [1], [NAN], **payload)
        assert _snapshot(f) == before  # the leaf still fresh, no child lost
    kids = f.expand([root], [1], [NAN], texts=["x" * ((1 << 24) - 1)])
    assert len(f.texts_bytes(kids)[0]) == (1 << 24) - 1


def test_expand_publishes_children_with_payloads_and_terminal_flags() -> None:
    """A select racing expand(texts=, tokens=, terminal=) never reaches a child before its
    payloads and terminal flag are there (they used to be set after the children were published:
    a select saw children without tokens, and picked the child about to be made terminal)."""
    n, length = 64, 1 << 16
    tokens = [np.arange(1, length + 1, dtype=np.int32) for _ in range(2 * n)]
    texts = ["step"] * (2 * n)
    terminal = [True, False] * n  # the first child of each root
    seen, bad = 0, []
    for trial in range(4):
        f = Forest(virtual_loss=0.0, num_threads=2)
        roots = f.add_trees(n)
        done = threading.Event()

        def watch() -> None:
            nonlocal seen
            last = False
            while not last:
                last = done.is_set()
                leaves = f.select(roots)
                _flat, offsets = f.path_tokens(leaves)
                chars = np.array([len(t) for t in f.path_texts(leaves)])
                kids = leaves != roots
                seen += int(kids.sum())
                if (np.diff(offsets)[kids] != length).any() or (chars[kids] != 4).any():
                    bad.append((trial, "payload"))
                if ((leaves[kids] - n) % 2 == 0).any():
                    bad.append((trial, "terminal child selected"))
                f.cancel(leaves)

        t = threading.Thread(target=watch)
        t.start()
        f.expand(roots, np.full(n, 2), np.full(2 * n, NAN, np.float32), texts=texts, tokens=tokens,
                 terminal=terminal)
        done.set()
        t.join()
    assert seen > 0 and not bad, bad[:5]


def test_save_and_load_refuse_a_path_with_nul(tmp_path: Path) -> None:
    f = Forest(num_threads=1)
    f.add_trees(1)
    bad = str(tmp_path / "forest") + "\x00.bin"  # the C library would see tmp_path / "forest"
    with pytest.raises(ValueError, match="path .* contains a NUL byte"):
        f.save(bad)
    assert list(tmp_path.iterdir()) == []
    f.save(tmp_path / "forest")
    with pytest.raises(ValueError, match="path .* contains a NUL byte"):
        Forest.load(bad)
    with pytest.raises(ValueError, match="NUL"):
        f.save(bad.encode())


def test_token_ids_are_checked_before_any_cast() -> None:
    f = Forest(num_threads=1)
    roots = f.add_trees(2)
    huge = np.array([2**64 - 5], np.uint64)  # numpy's cast to int64 made it -5
    for call in (
        lambda: f.set_tokens(roots[:1], [huge]),
        lambda: f.set_tokens(roots[:1], huge, [0, 1]),
        lambda: f.set_tokens(roots[:1], [[-5]]),
        lambda: f.set_tokens(roots[:1], np.array([3, -1], np.int32), [0, 2]),
        lambda: f.expand(roots[:1], [1], [NAN], tokens=[huge]),
        lambda: f.expand(roots[:1], [1], [NAN], tokens=[[-5]]),
    ):
        with pytest.raises(_core.InvalidValueError, match="token id"):
            call()
    assert f.tokens(roots)[1].tolist() == [0, 0, 0] and f.num_nodes == 2
    f.set_tokens(roots, [np.array([7, 2**31 - 1], np.uint64), np.array([0], np.uint8)])
    assert f.tokens(roots)[0].tolist() == [7, 2**31 - 1, 0]


def test_add_trees_checks_n_before_allocating() -> None:
    f = Forest(num_threads=1)
    with pytest.raises(_core.InvalidValueError, match=r"add_trees: n = 1000000000000"):
        f.add_trees(10**12)  # numpy was asked for 7 TiB first
    assert f.num_nodes == 0 and f.num_trees == 0


def test_scalar_node_ids() -> None:
    f = Forest(num_threads=1)
    (root,) = f.add_trees(1)
    for call in (f.parent, f.depth, f.children, f.export_tree):
        with pytest.raises(_core.UnknownNodeError, match=str(2**70)):
            call(2**70)
        with pytest.raises(_core.DTypeError, match="bool"):
            call(True)
    assert f.parent(0) == -1 and f.depth(0) == 0
    assert f.children(np.int64(root)).tolist() == [] and f.export_tree(np.int64(root))["ids"].tolist() == [0]


def test_load_checks_num_threads_before_the_file(tmp_path: Path) -> None:
    f = Forest(num_threads=1)
    f.add_trees(1)
    f.save(tmp_path / "forest.bin")
    for path in (tmp_path / "forest.bin", tmp_path / "missing.bin"):
        with pytest.raises(_core.InvalidValueError, match="num_threads"):
            Forest.load(path, num_threads=-1)
    assert Forest.load(tmp_path / "forest.bin", num_threads=1).num_nodes == 1


def test_parent_and_depth_take_numpy_integer_scalars() -> None:
    f = Forest()
    roots = f.add_trees(1)
    kids = f.expand(roots, [2], [0.1, 0.2])
    for leaf in kids:  # iterating an id array gives numpy scalars
        assert f.parent(leaf) == int(roots[0]) and f.depth(np.int32(leaf)) == 1
    assert f.parent(np.array([kids[0]])).tolist() == [int(roots[0])]


def test_a_thread_the_os_refuses_raises_instead_of_hanging() -> None:
    """With room for only a few thread stacks, Forest(num_threads=64) raises; before, destroying
    the pool's condition variable under its started workers blocked the interpreter for good."""
    script = textwrap.dedent("""
        import resource
        from rstar_fast._core import Forest
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (40 << 20), resource.RLIM_INFINITY))
        try:
            Forest(num_threads=64)
        except RuntimeError as e:
            print("raised", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("raised"), done.stdout + done.stderr


def test_a_forked_child_uses_and_frees_its_copy_of_a_forest() -> None:
    """A process that forks while holding a Forest (a DataLoader worker, multiprocessing): the
    child's copy has no pool threads, so its batch calls run inline, and freeing it neither
    joins the parent's threads nor destroys what they wait on (the child hung or crashed at
    exit)."""
    script = textwrap.dedent("""
        import os, sys
        from rstar_fast._core import Forest
        f = Forest(num_threads=4)
        roots = f.add_trees(20000)
        f.select(roots)
        pid = os.fork()
        if pid == 0:
            f.cancel(roots)
            assert f.select(roots).tolist() == roots.tolist()
            del f
            g = Forest(num_threads=4)  # a pool made in the child has threads of its own
            g.select(g.add_trees(20000))
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        f.cancel(roots)
        assert f.select(roots).tolist() == roots.tolist()  # the parent's pool still works
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "child exit 0", done.stdout + done.stderr


def test_a_child_forked_during_an_expand_can_save_its_copy(tmp_path: Path) -> None:
    """The expand holds the forest's structure lock in the parent when the fork comes: the
    child's copy must not wait for a thread it does not have (its save hung for good)."""
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        import numpy as np
        from rstar_fast._core import Forest
        f = Forest(num_threads=1)
        roots = f.add_trees(400_000)
        started = threading.Event()
        def grow():
            started.set()
            f.expand(roots, np.full(len(roots), 4), np.full(4 * len(roots), 0.5, dtype=np.float32))
        thread = threading.Thread(target=grow)
        thread.start()
        started.wait()
        time.sleep(0.005)  # the expand takes some 50 ms
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            f.save({str(tmp_path / "child.bin")!r})
            os._exit(0 if Forest.load({str(tmp_path / "child.bin")!r}).num_trees == 400_000 else 3)
        thread.join()
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "child exit 0", done.stdout + done.stderr


def test_another_kind_of_file_is_refused_on_its_first_bytes(tmp_path: Path) -> None:
    """A wrong file is not read whole first: an endless one (/dev/zero) is refused at once. The
    address-space cap keeps a regression from taking the machine's memory."""
    script = textwrap.dedent("""
        import resource
        from rstar_fast._core import CorruptFileError, Forest
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
        try:
            Forest.load("/dev/zero")
        except CorruptFileError as e:
            print("refused:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "refused:" in done.stdout and "bad magic" in done.stdout, done.stdout + done.stderr
    with pytest.raises(OSError, match="Is a directory"):
        Forest.load(str(tmp_path))


def test_a_failed_save_names_its_reason(tmp_path: Path) -> None:
    """A small file fails only when closed (flushed): the error still says why."""
    script = textwrap.dedent("""
        import resource, signal, sys
        from rstar_fast._core import Forest
        f = Forest()
        f.add_trees(3)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        try:
            f.save(sys.argv[1])
        except OSError as e:
            print("errno", e.errno, e)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.bin")], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.startswith("errno 27") and "File too large" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []


def test_file_names_that_are_not_utf8(tmp_path: Path) -> None:
    """A file name's bytes go to the OS as they are, as str (surrogate escapes) or bytes, and
    come back in errors as os.fsdecode gives them."""
    f = Forest()
    f.add_trees(2)
    name = os.fsdecode(bytes(tmp_path) + b"/\xff.forest")
    f.save(name)
    assert Forest.load(os.fsencode(name)).num_nodes == 2
    missing = os.fsdecode(bytes(tmp_path) + b"/\xfe.forest")
    with pytest.raises(FileNotFoundError) as caught:
        Forest.load(missing)
    assert caught.value.filename == missing


def test_a_fifo_is_read_once_its_writer_comes_and_refused_without_one(tmp_path: Path) -> None:
    """`producer > fifo &` may open it a moment after load() does; a FIFO nothing opens for
    writing is refused after a wait, not waited on for good."""
    f = Forest()
    f.add_trees(3)
    f.save(tmp_path / "f.forest")
    data = (tmp_path / "f.forest").read_bytes()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_later() -> None:
        time.sleep(0.5)
        with open(fifo, "wb") as w:
            w.write(data)

    writer = threading.Thread(target=write_later)
    writer.start()
    assert Forest.load(fifo).num_nodes == 3
    writer.join()
    script = textwrap.dedent("""
        import sys
        from rstar_fast._core import Forest
        try:
            Forest.load(sys.argv[1])
        except Exception as e:
            print(type(e).__name__, e)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(fifo)], capture_output=True, text=True, timeout=60)
    assert "nothing wrote to this FIFO within 10 s" in done.stdout, done.stdout + done.stderr


def test_an_id_another_thread_has_reserved_but_not_created_is_no_node_yet() -> None:
    """add_trees publishes num_nodes before it has made the nodes (with the GIL released): an
    expand of such an id, guessed from num_nodes, would be undone when its node is made, its
    child orphaned. It is refused as unknown until the node exists."""
    f = Forest(num_threads=1)
    f.add_trees(1)
    done = threading.Event()

    def grow() -> None:
        for _ in range(20):
            f.add_trees(100_000)
        done.set()

    worker = threading.Thread(target=grow)
    worker.start()
    accepted: list[tuple[int, int]] = []
    while not done.is_set():
        n = f.num_nodes
        try:
            accepted.append((n - 1, int(f.expand([n - 1], [1], [0.0])[0])))
        except _core.ForestError:
            pass
    worker.join()
    assert accepted
    for node, child in accepted:
        assert f.parent([child])[0] == node and list(f.children(node)) == [child], (node, child)


def test_save_refuses_a_path_that_is_no_regular_file(tmp_path: Path) -> None:
    """save writes beside the path and renames over it: a FIFO or device there would be replaced."""
    f = Forest(num_threads=1)
    f.add_trees(1)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="it exists and is not a regular file"):
        f.save(fifo)
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
