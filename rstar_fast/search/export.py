"""Policy SFT data and PPM preference pairs from trees.jsonl.

The rules are the reference's extraction scripts (`extra_sft_file.py` + `train/sample_sft_data.py`,
`extra_rm_file.py` + `train/sample_rm_data.py`), in one pass per problem:

SFT: every root-to-leaf trace whose leaf holds an answer equivalent to the gold one; sorted by
(mean step Q, minimum step Q) descending; the top `n` (2); of those, traces with a failed step
are dropped; records `{query, response}`. A step failed when its node says so (`code_error`,
which the search writes under its default rule, a step fails when its code raises); in trees
without that key (the reference's, or searched with the substring rule) when the trace's text
contains "error" (any case), as the reference decides.

Pairs: an answer leaf is correct when its Q is exactly +1 and wrong when exactly -1, as the
reference's extraction counts them (a path that grew too deep, was unparsable or failed its
code is neither, nor is a step never expanded); counts are
summed up the tree. From the root, breadth first: positives are children with a correct
descendant (top 2 by Q), negatives children with a wrong one (bottom 2 by Q); a side with a
single node lets the other take up to 4. A pair is kept when the Q margin is positive and the
mean Q of the positive's best continuation beats the mean Q of the negative's worst; then only
pairs with margin >= 0.5 and step edit distance >= 20 (options). The walk continues into
children with both kinds of descendant. Records
`{prompt, pos, neg, pos_count, neg_count}`, prompt = question prompt + prefix steps.

The final answer step never has a sibling to pair with (an expansion keeps only the first sample
that ends the solution), so, as the paper does for that step, whole trajectories are paired too:
the 2 correct ones with the highest mean step Q against the 2 wrong ones with the lowest, prompt
= question prompt, pos and neg = the whole traces, with no margin or edit-distance filter (two
solutions a copied number apart are the pair to learn from). The reference's
`rm_data_examples.json` compares whole solutions too, its prompt ending at the question and
pos and neg starting at `\n<|assistant|>:`; here the prompt holds the assistant's opening, as
every step pair's does: prompt + pos is the same text.

Output files: `.jsonl` gets one record per line; any other name a JSON list (the format of the
reference's example files), written as records arrive to a temporary file that replaces the
output at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from rstar_fast._core import edit_distance_at_least
from rstar_fast.files import hold_lock, remove_if_abandoned, replaced_file
from rstar_fast.search.problems import gold_answer
from rstar_fast.search.prompts import ASSISTANT_PREFIX, export_question_prompt
from rstar_fast.search.records import TreesPaths, read_trees, record_question, trees_files
from rstar_fast.search.steps import is_valid_final_answer

Judge = Callable[[str, str], bool]  # (gold, answer) -> correct


class ExportError(ValueError):
    """A trees.jsonl record the exports cannot read (no `rstar`, no root)."""


@dataclass
class Node:
    tag: str
    text: str
    final_answer: str
    q: float
    visits: int
    value: float
    code_error: bool | None = None  # the step's code failed; None when the tree does not say
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None
    n_correct: int = 0  # correct leaves at or below this node
    n_wrong: int = 0  # wrong leaves at or below this node

    @property
    def is_answer_leaf(self) -> bool:
        return not self.children and is_valid_final_answer(self.final_answer)


_TAG_RE = re.compile(r"0(\.[0-9]+)*")


def _node_field(st: Mapping[str, Any], key: str, kind: type, tag: str) -> Any:
    """A node's field, of `kind` (str, float or int), its zero when missing or null."""
    value = st.get(key)
    if value is None:
        return kind()
    ok = isinstance(value, str) if kind is str else (
        isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
    if not ok:
        expected = {str: "a string", float: "a number", int: "an integer"}[kind]
        raise ExportError(f"node {tag}: {key} must be {expected}, got {value!r:.40}")
    return kind(value)


def _code_error(st: Mapping[str, Any], tag: str) -> bool | None:
    value = st.get("code_error")
    if value is not None and not isinstance(value, bool):
        raise ExportError(f"node {tag}: code_error must be true or false, got {value!r:.40}")
    return value


def rebuild_tree(rstar: Mapping[str, Mapping[str, Any]]) -> Node:
    """Nodes linked by tag; children ordered by their number (the reference's order)."""
    if not isinstance(rstar.get("0"), Mapping):
        raise ExportError("rstar has no root node '0'")
    nodes: dict[str, Node] = {}
    for tag, st in rstar.items():
        if not isinstance(st, Mapping):
            continue  # e.g. beam search's "solutions" entry
        if not _TAG_RE.fullmatch(tag):
            raise ExportError(f"node {tag!r}: not a node tag (0, 0.1, 0.1.2, ...)")
        nodes[tag] = Node(tag, _node_field(st, "text", str, tag), _node_field(st, "final_answer", str, tag),
                          _node_field(st, "q_value", float, tag), _node_field(st, "visit_count", int, tag),
                          _node_field(st, "value", float, tag), _code_error(st, tag))
    for tag, node in nodes.items():
        if tag == "0":
            continue
        parent = nodes.get(tag.rpartition(".")[0])
        if parent is None:
            continue  # an orphan: the reference's rebuild never reaches it either
        node.parent = parent
        parent.children.append(node)
    for node in nodes.values():
        node.children.sort(key=lambda c: int(c.tag.rpartition(".")[2]))
    return nodes["0"]


def _rstar(record: Mapping[str, Any]) -> Mapping[str, Any]:
    rstar = record.get("rstar")
    if not isinstance(rstar, Mapping):
        raise ExportError("no 'rstar' tree (not a line of a search's trees.jsonl)")
    return rstar


def _traces(root: Node) -> Iterator[list[Node]]:
    """Root-to-leaf paths in depth-first order."""
    stack: list[tuple[Node, list[Node]]] = [(root, [root])]
    while stack:
        node, path = stack.pop()
        if not node.children:
            yield path
            continue
        for child in reversed(node.children):
            stack.append((child, path + [child]))


# A trace to an answer: (mean step Q, minimum step Q, text, whether a step of it failed).
Trace = tuple[float, float, str, bool]


def _answer_traces(root: Node) -> Iterator[tuple[Node, Trace]]:
    """Root-to-answer traces in depth-first order, with their leaf."""
    flagged = root.code_error is not None  # the search wrote code_error on every node
    for trace in _traces(root):
        leaf = trace[-1]
        if not leaf.is_answer_leaf:
            continue
        steps = trace[1:]
        qs = [node.q for node in steps]
        text = "".join(node.text for node in steps)
        failed = any(node.code_error for node in steps) if flagged else "error" in text.lower()
        yield leaf, (sum(qs) / len(qs) if qs else 0.0, min(qs) if qs else 1.0, text, failed)


_JUDGE_THREADS = 4  # the default grader's workers: math-verify takes ~50 ms an answer


def _correct_traces(record: Mapping[str, Any], judge: Judge,
                    pool: concurrent.futures.Executor | None = None) -> list[Trace]:
    """Each trace to a correct answer, in tree order. Each distinct answer is judged once, on
    `pool`'s threads when one is given."""
    rstar = _rstar(record)  # a record without a tree is an error, gold or not
    gold = gold_answer(record)
    if gold is None:
        return []
    golds = gold if isinstance(gold, list) else [gold]  # any of a list's golds is right
    traces = list(_answer_traces(rebuild_tree(rstar)))
    answers = list(dict.fromkeys(leaf.final_answer for leaf, _ in traces))

    def right(answer: str) -> bool:
        return any(judge(g, answer) for g in golds)

    verdicts = dict(zip(answers, pool.map(right, answers) if pool is not None else map(right, answers)))
    return [trace for leaf, trace in traces if verdicts[leaf.final_answer]]


_Scored = typing.TypeVar("_Scored", bound=tuple[float, float, Any, bool])  # a Trace, or one whose text is set aside


def _best_traces(scored: list[_Scored], n: int) -> list[_Scored]:
    """The top n by mean then minimum Q (stable: ties keep the order given)."""
    return sorted(scored, key=lambda t: (t[0], t[1]), reverse=True)[:n]


def _sft_of(question: str, best: list[Trace]) -> list[dict[str, str]]:
    """The kept traces as `{query, response}`; one with a failed step is dropped after the top n
    are chosen, as the reference does."""
    return [{"query": question, "response": full.replace(ASSISTANT_PREFIX, "").strip()}
            for _, _, full, failed in best if not failed]


def sft_records(record: Mapping[str, Any], judge: Judge, n: int = 2) -> list[dict[str, str]]:
    """SFT records `{query, response}` of one trees.jsonl record."""
    return _sft_of(record_question(record), _best_traces(_correct_traces(record, judge), n))


def _count(root: Node, positive: float, negative: float) -> None:
    order: list[Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    for node in reversed(order):  # children before parents
        node.n_correct = node.n_wrong = 0
        # only an answer tells right from wrong, as in the reference's extra_rm_file.py: a path
        # that ran too deep, was unparsable or failed its code (-1 on itself) says nothing of
        # the steps before it, nor does a step never expanded (its Q is its PPM score)
        if node.is_answer_leaf:
            if node.q == positive:
                node.n_correct = 1
            elif node.q == negative:
                node.n_wrong = 1
        for child in node.children:
            node.n_correct += child.n_correct
            node.n_wrong += child.n_wrong


def _continuation(node: Node, best: bool) -> float:
    """Mean Q along the best (or worst) path below `node`, node included."""
    total, count = 0.0, 0
    cur: Node | None = node
    while cur is not None:
        total += cur.q
        count += 1
        steps = [c for c in cur.children if (c.n_correct > 0 if best else c.n_wrong > 0)]
        if not steps:
            break
        cur = max(steps, key=lambda c: c.q) if best else min(steps, key=lambda c: c.q)
    return total / count


def _trajectory_pairs(root: Node, question_prompt: str, per_side: int) -> list[dict[str, Any]]:
    """Final-step pairs: the best correct whole traces (by mean step Q) against the worst wrong ones."""
    correct: list[tuple[float, str]] = []
    wrong: list[tuple[float, str]] = []
    for leaf, (avg, _, text, _) in _answer_traces(root):
        if leaf.n_correct or leaf.n_wrong:
            (correct if leaf.n_correct else wrong).append((avg, text))
    correct.sort(key=lambda t: t[0], reverse=True)  # stable: ties keep tree order
    wrong.sort(key=lambda t: t[0])
    chosen, rejected = correct[:per_side], wrong[:per_side]
    return [{"prompt": question_prompt, "neg": neg, "pos": pos, "neg_count": len(rejected), "pos_count": len(chosen)}
            for _, pos in chosen for _, neg in rejected]


def pair_records(record: Mapping[str, Any], *, min_margin: float = 0.5, min_edit_distance: int = 20,
                 positive: float = 1.0, negative: float = -1.0, mode: str = "all",
                 final_pairs: int = 2) -> list[dict[str, Any]]:
    """PPM pair records `{prompt, pos, neg, pos_count, neg_count}` of one trees.jsonl record.

    mode "all" (default) walks into every child with both kinds of descendant; "vis_count"
    only into the most visited such child (the reference's two modes). `final_pairs` whole
    trajectories per side are paired for the final answer step (0: none).
    """
    if final_pairs < 0:
        raise ValueError(f"final_pairs must be >= 0, got {final_pairs}")
    rstar = _rstar(record)
    root = rebuild_tree(rstar)
    _count(root, positive, negative)
    question_prompt = export_question_prompt(record_question(record))
    out: list[dict[str, Any]] = []
    queue: list[tuple[Node, str]] = [(root, "")]
    while queue:
        node, prefix = queue.pop(0)
        kids = node.children
        # a child without text is no step to score: never a side
        sides = [c for c in kids if c.text.strip()]
        chosen_all = sorted((c for c in sides if c.n_correct > 0), key=lambda c: c.q, reverse=True)
        rejected_all = sorted((c for c in sides if c.n_wrong > 0), key=lambda c: c.q)
        chosen, rejected = chosen_all[:2], rejected_all[:2]
        if not chosen or not rejected:
            continue
        if len(chosen) == 1:
            rejected = rejected_all[:4]
        if len(rejected) == 1:
            chosen = chosen_all[:4]
        for c in chosen:
            for r in rejected:
                margin = c.q - r.q
                if margin > 0 and _continuation(c, True) > _continuation(r, False):
                    if margin < min_margin or not edit_distance_at_least(r.text, c.text, min_edit_distance):
                        continue
                    out.append({"prompt": question_prompt + prefix, "neg": r.text, "pos": c.text,
                                "neg_count": len(rejected), "pos_count": len(chosen)})
        both = [c for c in kids if c.n_correct > 0 and c.n_wrong > 0]
        if mode == "vis_count":
            ranked = sorted(kids, key=lambda c: c.visits, reverse=True)
            both = [c for c in ranked if c.n_correct > 0 and c.n_wrong > 0][:1]
        elif mode != "all":
            raise ValueError(f"pair mode must be 'all' or 'vis_count', got {mode!r}")
        queue.extend((c, prefix + c.text) for c in both)
    if final_pairs > 0:
        # a one-step solution's whole trace is its root step: that pair is already out
        seen = {(p["prompt"], p["pos"], p["neg"]) for p in out}
        out.extend(p for p in _trajectory_pairs(root, question_prompt, final_pairs)
                   if (p["prompt"], p["pos"], p["neg"]) not in seen)
    return out


def _locked_temporary(target: Path) -> tuple[Path, TextIO]:
    """A new temporary file beside `target`, locked while it is written (so that another
    export's _remove_stale_temporaries leaves it), its name unique across processes and
    containers that share the folder."""
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = hold_lock(tmp, new=True)
        if fd is not None:  # else another export is removing it as abandoned: make another
            return tmp, os.fdopen(fd, "w", encoding="utf-8")


def _remove_stale_temporaries(target: Path) -> None:
    """The temporary files of exports into `target` killed mid-write (SIGKILL)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        remove_if_abandoned(stale, stale)


class _Sink:
    """Writes records as a JSON list (reference format) or JSON lines, by file name.

    Records go to a temporary file beside the output, which replaces it only once every
    record is written: a failed export leaves an existing output as it was. Through a symlink
    the file it points to is replaced; a FIFO or a device (/dev/stdout) is written to directly.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ExportError(f"{self.path}: is a folder; give an output file")
        self.lines = self.path.suffix == ".jsonl"
        self.target = replaced_file(self.path)
        self.tmp: Path | None = None
        try:
            if self.target is None:
                self.f: TextIO = self.path.open("a", encoding="utf-8")
            else:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_temporaries(self.target)
                self.tmp, self.f = _locked_temporary(self.target)
        except OSError as e:  # the output's folder, not the temporary file, is what to fix
            raise ExportError(f"{self.path}: cannot write there: {e.strerror or e}") from None
        self.count = 0
        if not self.lines:
            self.f.write("[")

    def add(self, rec: Mapping[str, Any]) -> None:
        if self.lines:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            # as json.dump(records, f, indent=4, ensure_ascii=False) lays it out (the reference's files): every
            # newline of an item is structural (strings escape theirs), so each gets 4 spaces
            item = json.dumps(rec, ensure_ascii=False, indent=4).replace("\n", "\n    ")
            self.f.write(("\n    " if self.count == 0 else ",\n    ") + item)
        self.count += 1

    def commit(self) -> None:
        if not self.lines:
            self.f.write("\n]" if self.count else "]")
        self.f.flush()
        if self.tmp is not None and self.target is not None:
            os.replace(self.tmp, self.target)  # before close() lets go of the lock
        self.f.close()

    def discard(self) -> None:
        try:  # closing flushes, which fails again on a full disk: the file goes all the same
            self.f.close()
        except OSError:
            pass
        finally:
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)


def _export(trees_path: TreesPaths, out_path: str | Path,
            records_of: Callable[[Mapping[str, Any]], list[dict[str, Any]]],
            last: Callable[[], Iterator[dict[str, Any]]] | None = None) -> int:
    """Write records_of(tree) for every problem of the trees file(s), in problem order, then
    what `last()` gives once all are read; returns how many."""
    files = trees_files(trees_path)
    if not files:
        raise ExportError("no trees file given")
    out = Path(out_path).resolve() if Path(out_path).exists() else None
    for path in files:
        if not path.is_file():
            raise ExportError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
        if out == path.resolve():
            raise ExportError(f"{out_path}: is a trees file being exported; give another output file")
    trees = files[0] if len(files) == 1 else f"the {len(files)} trees files"
    sink = _Sink(out_path)
    try:
        problems = 0
        for rec in read_trees(files, in_problem_order=True):
            problems += 1
            try:
                for r in records_of(rec):
                    sink.add(r)
            except (ExportError, UnicodeEncodeError) as e:
                what = f"text that UTF-8 cannot hold ({e.reason})" if isinstance(e, UnicodeEncodeError) else e
                raise ExportError(f"{trees}: problem {rec.get('problem_id', '?')}: {what}") from None
        if problems == 0:
            raise ExportError(f"{trees}: holds no finished problem")
        for r in last() if last is not None else ():
            sink.add(r)
        sink.commit()
    except OSError as e:  # a full disk, a file size limit: name the file it was writing
        sink.discard()
        raise ExportError(f"{sink.path}: cannot write the export: {e.strerror or e}") from e
    except BaseException:
        sink.discard()
        raise
    return sink.count


def _default_judge() -> Judge:
    from rstar_fast.search.grading import grade

    return lambda gold, answer: grade(gold, answer)


class _Spill:
    """Texts set aside in an unnamed temporary file until an export's end, so that memory holds
    only where they are: a million problems' kept traces are gigabytes of text. The file is
    made beside the output (on its disk, not in a small /tmp) when the first text comes."""

    def __init__(self, out_path: str | Path) -> None:
        target = replaced_file(Path(out_path))  # None: a FIFO or a device, with no folder to use
        self.dir = str(target.parent) if target is not None else None
        self.f: BinaryIO | None = None

    def put(self, text: str) -> tuple[int, int]:
        data = text.encode("utf-8")  # fails here, where the problem is named, not when written
        if self.f is None:
            self.f = tempfile.TemporaryFile(dir=self.dir)  # gone when closed, or when the process dies
        at = self.f.seek(0, os.SEEK_END)
        self.f.write(data)
        return at, len(data)

    def get(self, where: tuple[int, int]) -> str:
        assert self.f is not None
        self.f.seek(where[0])
        return self.f.read(where[1]).decode("utf-8")

    def close(self) -> None:
        # closing flushes, which fails again on a full disk: the error that says so is raised
        with contextlib.suppress(OSError):
            if self.f is not None:
                self.f.close()


def export_sft(trees_path: TreesPaths, out_path: str | Path, *, n: int = 2,
               judge: Judge | None = None) -> int:
    """Write SFT records of every question in trees_path (one trees.jsonl, or several read as one:
    the shards of a run), in problem order; returns how many.

    A question's top n traces are chosen among all its records, as the reference's
    `sample_sft_data.py` groups them (a question searched twice gives n, not 2n); the texts
    wait in a temporary file until every record is read.
    judge(gold, answer) decides correct leaves (default: `grade`, as the reference regrades),
    each distinct answer of a problem once, several at a time from threads.
    An existing output is replaced only when the export succeeds.
    """
    if n < 1:
        raise ExportError(f"traces kept per problem must be >= 1, got {n}")
    j = judge or _default_judge()
    # question digest -> (where its text is, its top n so far with where their texts are)
    best: dict[bytes, tuple[tuple[int, int], list[tuple[float, float, tuple[int, int], bool]]]] = {}
    spill = _Spill(out_path)
    pool = concurrent.futures.ThreadPoolExecutor(_JUDGE_THREADS, thread_name_prefix="export-judge")

    def collect(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
        scored = _correct_traces(rec, j, pool)
        if not scored:
            return []
        question = record_question(rec)
        key = hashlib.blake2b(question.encode("utf-8"), digest_size=16).digest()
        if key not in best:
            best[key] = (spill.put(question), [])
        held = best[key][1]  # a held trace has where its text is in place of the text
        top = _best_traces(held + scored, n)
        held[:] = [t if isinstance(t[2], tuple) else (t[0], t[1], spill.put(t[2]), t[3]) for t in top]
        return []

    def records() -> Iterator[dict[str, Any]]:
        for question, traces in best.values():
            yield from _sft_of(spill.get(question), [(mean, low, spill.get(at), failed) for mean, low, at, failed in traces])

    with contextlib.closing(spill), pool:
        return _export(trees_path, out_path, collect, records)


def export_pairs(trees_path: TreesPaths, out_path: str | Path, *, min_margin: float = 0.5,
                 min_edit_distance: int = 20, positive: float = 1.0, negative: float = -1.0,
                 mode: str = "all", final_pairs: int = 2) -> int:
    """Write PPM pair records of every problem in trees_path (one trees.jsonl, or several read as
    one: the shards of a run), in problem order; returns how many.

    An existing output is replaced only when the export succeeds.
    """
    if not math.isfinite(min_margin) or min_margin < 0:
        raise ExportError(f"min_margin must be a number >= 0, got {min_margin}")
    if min_edit_distance < 0:
        raise ExportError(f"min_edit_distance must be >= 0, got {min_edit_distance}")
    return _export(trees_path, out_path, lambda rec: pair_records(
        rec, min_margin=min_margin, min_edit_distance=min_edit_distance, positive=positive, negative=negative,
        mode=mode, final_pairs=final_pairs))


__all__ = [
    "ExportError", "Node", "rebuild_tree", "sft_records", "pair_records", "edit_distance_at_least",
    "export_sft", "export_pairs",
]
