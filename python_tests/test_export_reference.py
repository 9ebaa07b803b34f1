"""The pair export against a transcription of the reference's own extraction
(microsoft/rStar, branch rStar-math: `extra_rm_file.py`'s search_all_traces and
build_partial_solution, `eval_output.py`'s prune_node, then `train/sample_rm_data.py`'s
margin and edit-distance filter), on random trees with every kind of leaf."""

from __future__ import annotations

import random
from typing import Any

import pytest

from rstar_fast.search.export import pair_records
from rstar_fast.search.steps import NO_VALID_CHILD, TOO_MANY_CODE_ERRORS, TOO_MANY_STEPS

FAILED = (NO_VALID_CHILD, TOO_MANY_STEPS, TOO_MANY_CODE_ERRORS)
QUESTION = "What is 1 + 1?"


class RefNode:
    def __init__(self, tag: str, state: dict[str, Any], parent: RefNode | None) -> None:
        self.tag, self.parent = tag, parent
        self.text, self.final_answer = state.get("text", ""), state.get("final_answer", "")
        self.q_value, self.extra_info = state.get("q_value", 0), state.get("extra_info", "")
        self.children: list[RefNode] = []
        self.final_correct = self.final_wrong = 0
        self.prune = False


def ref_rebuild(tree: dict[str, dict[str, Any]]) -> RefNode:
    root = RefNode("0", tree["0"], None)
    todo = [root]
    while todo:
        node = todo.pop(0)
        for idx in range(64):
            tag = f"{node.tag}.{idx}"
            if tag in tree:
                node.children.append(RefNode(tag, tree[tag], node))
                todo.append(node.children[-1])
    return root


def ref_valid_answer(node: RefNode) -> bool:
    return not node.children and bool(node.final_answer) and node.final_answer not in FAILED


def ref_prune(node: RefNode) -> bool:
    if node.children:
        if all([ref_prune(c) for c in node.children]):
            node.prune = True
    elif not ref_valid_answer(node):
        node.prune = True
    return node.prune


def ref_prefix(node: RefNode) -> str:
    text = ""
    while node.parent:
        text = node.text + text
        node = node.parent
    return ("<|user|>:\n" + node.extra_info[10:]
            + "\n<|assistant|>: Let's think step by step and solve the problem with code." + text)


def ref_partial_score(node: RefNode, best: bool) -> float:
    path, cur = [], node
    while cur:
        path.append(cur)
        steps = [c for c in cur.children if (c.final_correct > 0 if best else c.final_wrong > 0)]
        if not steps:
            break
        cur = sorted(steps, key=lambda x: x.q_value, reverse=best)[0]
    return sum(n.q_value for n in path) / len(path)


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ref_pairs(tree: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    root = ref_rebuild(tree)
    if ref_prune(root):
        return []

    def count(node: RefNode) -> None:
        for child in node.children:
            count(child)
        if ref_valid_answer(node) or node.final_answer == TOO_MANY_CODE_ERRORS:
            if node.q_value == 1:
                node.final_correct = 1
            elif node.q_value == -1 and node.final_answer != TOO_MANY_CODE_ERRORS:
                node.final_wrong = 1
        for child in node.children:
            node.final_correct += child.final_correct
            node.final_wrong += child.final_wrong

    count(root)
    out, frontier = [], [root]
    while frontier:
        kids = frontier[0].children
        good = sorted([c for c in kids if c.final_correct > 0], key=lambda x: x.q_value, reverse=True)
        bad = sorted([c for c in kids if c.final_wrong > 0], key=lambda x: x.q_value)
        chosen, rejected = good[:2], bad[:2]
        if chosen and rejected:
            if len(chosen) == 1:
                rejected = bad[:4]
            if len(rejected) == 1:
                chosen = good[:4]
            for c in chosen:
                for r in rejected:
                    margin = c.q_value - r.q_value
                    if margin > 0 and ref_partial_score(c, True) > ref_partial_score(r, False):
                        # train/sample_rm_data.py's filter
                        if margin >= 0.5 and levenshtein(r.text, c.text) >= 20:
                            out.append({"prompt": ref_prefix(frontier[0]), "neg": r.text, "pos": c.text,
                                        "neg_count": len(rejected), "pos_count": len(chosen)})
            frontier += [c for c in kids if c.final_correct > 0 and c.final_wrong > 0]
        frontier = frontier[1:]
    return out


def random_tree(rng: random.Random, failures: bool, wide: bool = False) -> dict[str, dict[str, Any]]:
    """A tree of answers right (+1) and wrong (-1) and, with `failures`, paths that ended too
    deep, unparsable or in code errors (-1 on themselves); inner Q values near their leaves' mean.
    `wide` trees have up to 5 children a node (a lone positive takes up to 4 negatives), inner Q
    values anywhere in [-1, 1], and some answers whose Q is short of +-1 (an evaluation's PPM
    values), which are neither right nor wrong. (Random trees almost never reach a pair that the
    continuation rule rejects: test_export.py holds that rule to hand-built trees.)"""
    tree: dict[str, dict[str, Any]] = {"0": {"text": "", "extra_info": "question: " + QUESTION, "q_value": 0.0}}

    def grow(tag: str, depth: int) -> list[float]:
        if depth >= 4 or (depth > 1 and rng.random() < 0.3):
            roll = rng.random()
            if failures and roll < 0.3:
                answer, q = rng.choice(FAILED), -1.0
            else:
                right = rng.random() < 0.5
                answer, q = ("2", 1.0) if right else ("3", -1.0)
                if wide and rng.random() < 0.1:
                    q = round(q * rng.uniform(0.5, 0.99), 3)
            tree[tag] = {"text": f"<answer>{tag} " + "a" * rng.randint(0, 30) + f" \\boxed{{{answer[:3]}}}",
                         "final_answer": answer, "q_value": q}
            return [q]
        leaves: list[float] = []
        for i in range(1, rng.randint(1, 5 if wide else 3) + 1):
            leaves += grow(f"{tag}.{i}", depth + 1)
        if wide and rng.random() < 0.5:
            q = rng.choice([-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, round(rng.uniform(-1, 1), 3)])
        else:
            q = round(sum(leaves) / len(leaves) + rng.choice([0.0, 0.0, 0.05, -0.05]), 6)
        tree[tag] = {"text": f"<code>\n# step {tag} " + "b" * rng.randint(0, 30) + "\n<end_of_step>",
                     "final_answer": "", "q_value": q}
        return leaves

    for i in range(1, rng.randint(2, 4) + 1):
        grow(f"0.{i}", 1)
    return tree


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("failures", [False, True])
def test_the_pairs_are_the_reference_s(failures: bool, wide: bool) -> None:
    rng = random.Random(int(failures) + 2 * int(wide))
    paired = 0
    for _ in range(150):
        tree = random_tree(rng, failures, wide)
        ours = pair_records({"question": QUESTION, "rstar": tree}, final_pairs=0)
        theirs = ref_pairs(tree)
        assert ours == theirs, tree
        paired += bool(ours)
    assert paired > 50  # trees with pairs in them, where the rules can differ
