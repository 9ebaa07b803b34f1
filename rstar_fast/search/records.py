"""`OUT/trees.jsonl`: one line per finished problem, appended as problems finish.

A line is the input record plus `rstar`, the reference's node dictionary keyed by tag
("0", "0.1", "0.1.2": children numbered from 1 in creation order), each node holding the
reference's state keys (`text`, `extra_info`, `action`, `action_input`, `final_answer`) and
its `value` (first value received), `q_value` and `visit_count`, and under the default
error rule `code_error` (the step's code raised, timed out or was killed); plus `problem_id`, the
chosen answer (`pred`), when the gold answer is known `correct`, and `votes` (every answer
selection's answer and correctness). The reference's own extraction scripts read these lines
as they are and extract what `export` does (checked on round 1 and 2 trees: the same records);
they read every *.jsonl of a folder, so a run's `failed.jsonl` lines get a KeyError note each.

Resume: `TreesWriter` reads the ids already in the file, cuts a torn last line (a run killed
mid-write), and refuses to write a problem twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstar_fast._core import NO_NODE
from rstar_fast.files import first_few, naming_errors
from rstar_fast.search.steps import CODE_END, PYTHON_ACTION, STEP_END, TOO_MANY_CODE_ERRORS, is_valid_final_answer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

K_NO_PARENT = NO_NODE  # the root's parent id in the Forest's export arrays
ID_KEY = "problem_id"
QUESTION_INFO = "question: "  # the root's extra_info is this plus the question searched


class TreesFileError(ValueError):
    """A trees.jsonl line that is not a JSON object (other than a torn last line)."""


class DuplicateProblemError(ValueError):
    """A problem id written to trees.jsonl a second time."""


def build_rstar_dict(
    parents: Sequence[int] | np.ndarray,
    texts: Sequence[str],
    values: Sequence[float] | np.ndarray,
    q_values: Sequence[float] | np.ndarray,
    visit_counts: Sequence[int] | np.ndarray,
    final_answers: Sequence[str],
    question: str,
    *,
    code_nodes: Sequence[bool] | None = None,
    extra: Mapping[str, Sequence[Any]] | None = None,
    observations: Mapping[int, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The reference's tree dump from per-node arrays (node 0 is the root, parents first).

    `parents[i]` is the parent id of node i (K_NO_PARENT for the root); children are numbered
    1.. in id order. `code_nodes[i]` marks nodes whose step ran code (their `action` is the
    reference's "python_interpreter" and `action_input` the step text up to its output);
    by default every non-root, non-answer node whose text is not an empty-\\boxed{} step.
    `observations[i]` is the output of node i's code, kept under `observation` as the reference
    keeps it on the nodes whose code ran. `extra` adds more per-node keys. Entries come in the
    reference's breadth-first order.
    """
    n = len(parents)
    for name, arr in (("texts", texts), ("values", values), ("q_values", q_values),
                      ("visit_counts", visit_counts), ("final_answers", final_answers)):
        if len(arr) != n:
            raise ValueError(f"build_rstar_dict: {name} has {len(arr)} entries, parents has {n}")
    if n == 0:
        raise ValueError("build_rstar_dict: a tree needs at least its root")
    par = [int(p) for p in (parents.tolist() if hasattr(parents, "tolist") else parents)]
    if par[0] != K_NO_PARENT:
        raise ValueError(f"build_rstar_dict: node 0 must be the root (parent {K_NO_PARENT}), got {par[0]}")
    vals = values.tolist() if hasattr(values, "tolist") else list(values)
    qs = q_values.tolist() if hasattr(q_values, "tolist") else list(q_values)
    visits = visit_counts.tolist() if hasattr(visit_counts, "tolist") else list(visit_counts)
    tags = ["0"] * n
    depth = [0] * n
    n_children = [0] * n
    for i in range(1, n):
        p = par[i]
        if not 0 <= p < i:
            raise ValueError(f"build_rstar_dict: node {i} has parent {p}; parents must come first")
        n_children[p] += 1
        tags[i] = f"{tags[p]}.{n_children[p]}"
        depth[i] = depth[p] + 1
    order = sorted(range(n), key=lambda i: (depth[i], [int(x) for x in tags[i].split(".")]))
    out: dict[str, dict[str, Any]] = {}
    for i in order:
        text = texts[i]
        answer = final_answers[i] or ""
        if code_nodes is not None:
            is_code = bool(code_nodes[i])
        else:
            is_code = i > 0 and not is_valid_final_answer(answer) and "boxed" not in text and bool(text)
        action_input = ""
        if is_code:
            # the step as generated: up to <end_of_code> when output was appended after it
            cut = text.find(CODE_END)
            action_input = text[: cut + len(CODE_END)] if cut != -1 else text
            if answer == TOO_MANY_CODE_ERRORS and action_input.endswith(STEP_END + CODE_END):
                # the search closed the block to show the error; the step stopped at its
                # <end_of_step> (no step goes on past a stop string) and the reference keeps
                # the step as generated
                action_input = action_input[: -len(CODE_END)]
        node: dict[str, Any] = {
            "text": text,
            "extra_info": QUESTION_INFO + question if i == 0 else "",
            "action": PYTHON_ACTION if is_code else "",
            "action_input": action_input,
            "final_answer": answer,
        }
        if observations is not None and i in observations:
            node["observation"] = observations[i]
        node |= {
            "value": float(vals[i]),
            "q_value": float(qs[i]),
            "visit_count": int(visits[i]),
        }
        if extra:
            for key, arr in extra.items():
                v = arr[i]
                node[key] = v.item() if hasattr(v, "item") else v
        out[tags[i]] = node
    return out


def tree_record(record: Mapping[str, Any], problem_id: str, rstar: Mapping[str, Any],
                pred: str | None = None, correct: bool | None = None,
                votes: Mapping[str, Any] | None = None, question: str | None = None,
                answer: str | list[str] | None = None) -> dict[str, Any]:
    """The trees.jsonl line of a finished problem (`votes`: each answer selection's answer and,
    with a gold answer, its correctness; see `voting.evaluate`). `question` and `answer` are
    added under those keys when the input named them otherwise (`problem`, `gt`, ...), as the
    reference's export scripts read them there."""
    out = dict(record)
    if question is not None and "question" not in out and "query" not in out:
        out["question"] = question
    if answer is not None and "answer" not in out:
        out["answer"] = answer
    out[ID_KEY] = problem_id
    out["rstar"] = rstar
    out["pred"] = pred
    out["correct"] = correct  # None without a gold answer, whatever an input field of that name said
    if votes:
        out["votes"] = dict(votes)
    return out


def record_question(record: Mapping[str, Any]) -> str:
    """The question a trees.jsonl record was searched on (its root's extra_info, else its input's)."""
    rstar = record.get("rstar")
    root = rstar.get("0") if isinstance(rstar, Mapping) else None
    info = root.get("extra_info", "") if isinstance(root, Mapping) else ""
    if isinstance(info, str) and info.startswith(QUESTION_INFO):
        return info[len(QUESTION_INFO):]
    return str(record.get("question", record.get("query", "")))


def finished_ids(path: str | Path) -> set[str]:
    """Problem ids already in a trees.jsonl (empty when the file does not exist)."""
    p = Path(path)
    return {str(rec[ID_KEY]) for _, rec in _records(p) if ID_KEY in rec} if p.exists() else set()


TreesPaths = str | Path | Sequence[str | Path]  # one trees.jsonl, or several read as one


def trees_files(paths: TreesPaths) -> list[Path]:
    """One trees.jsonl, or several read as one (the shards of a run)."""
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def read_trees(paths: TreesPaths, *, in_problem_order: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a trees.jsonl, or of several in turn (the shards of a run), one at a time;
    a torn last line is skipped with a warning, and so are a problem met again in one file (two
    runs that wrote into one folder unguarded: only its first record counts, or the exports
    would hold its pairs twice) and a file given twice. Files of other runs may share ids
    (ids are positions in a problem file): each keeps its own.

    in_problem_order: by problem id (numeric ids as numbers) instead of file order, across the
    files. A pipelined search writes problems as they finish, so the file's order depends on
    timing; what is derived from it in this order (training data) does not. The files are read
    twice, but each record is parsed once: the first read takes the ids from the lines' heads
    (see `TreesWriter`), and only the ids and offsets are kept in memory.
    """
    files: list[Path] = []
    resolved: set[Path] = set()
    for path in trees_files(paths):
        if path.resolve() in resolved:
            log.warning("%s is given twice: read once", path)
        else:
            resolved.add(path.resolve())
            files.append(path)
    seen: set[tuple[int, str]] = set()
    repeated: list[str] = []
    first_file: dict[tuple[str, str], int] = {}  # (id, question) -> the file it was first read from
    again: list[str] = []  # problems read before from another file: two runs of them (or shards mixed)

    def note(k: int, record: dict[str, Any]) -> dict[str, Any]:
        if len(files) > 1 and ID_KEY in record:
            key = (str(record[ID_KEY]), str(record_question(record)))
            first = first_file.setdefault(key, k)
            if first != k:
                again.append(f"{key[0]} ({files[first]}, {files[k]})")
        return record

    def first_time(k: int, problem_id: Any) -> bool:
        if problem_id is None:
            return True
        key = (k, str(problem_id))
        if key in seen:
            repeated.append(f"{files[k]}: {key[1]}")
            return False
        seen.add(key)
        return True

    if not in_problem_order:
        for k, path in enumerate(files):
            for _, rec in _records(path):
                if first_time(k, rec.get(ID_KEY)):
                    yield note(k, rec)
    else:
        order = sorted((_problem_order(pid, (k, n)), k, offset, lineno, pid)
                       for k, path in enumerate(files) for n, (offset, lineno, pid) in enumerate(_ids(path)))
        handles = [path.open("rb") for path in files]
        try:
            for _, k, offset, lineno, pid in order:
                if not first_time(k, pid):
                    continue
                handles[k].seek(offset)
                record = _checked_record(files[k], lineno, handles[k].readline())
                if record is not None:  # None: a torn last line, which _ids has already skipped
                    yield note(k, record)
        finally:
            for f in handles:
                f.close()
    if repeated:
        log.warning("%d record(s) repeat a problem met before in their file (%s): only each problem's first "
                    "record is read", len(repeated), first_few(sorted(set(repeated)), 5))
    if again:
        log.warning("%d problem(s) have trees in more than one of the files given (%s): each file's are read, "
                    "as for several runs of the same problems; shards of one run never share a problem, so if "
                    "these are shards, one was searched with another's problems", len(again), first_few(again, 3))


def _problem_order(problem_id: Any, position: Any) -> tuple[int, int | str, Any]:
    if problem_id is None:
        return (2, "", position)
    text = str(problem_id)
    return (0, int(text), position) if text.isascii() and text.isdigit() else (1, text, position)


def _lines(p: Path) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, line number, line) of each line of a file that is not blank."""
    with p.open("rb") as f:
        pos = 0
        for lineno, raw in enumerate(f, 1):
            start, pos = pos, pos + len(raw)
            if raw.strip():
                yield start, lineno, raw


def _records(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, record) of each line of a trees.jsonl; a torn last line is skipped with a
    warning (`repair_tail` fixes the file itself)."""
    for start, lineno, raw in _lines(p):
        rec = _checked_record(p, lineno, raw)
        if rec is None:
            return
        yield start, rec


# a line that opens with its record's id, as TreesWriter writes them: the first key of the
# line's top-level object, so no text inside the record can be mistaken for it
_ID_HEAD = re.compile(rb'\{"problem_id": ("(?:[^"\\]|\\.)*")[,}]')


def _ids(p: Path) -> Iterator[tuple[int, int, Any]]:
    """(byte offset, line number, problem id or None) of each record of a trees.jsonl, like
    `_records` but without parsing a whole line that starts with its id: such a line is
    checked when its record is read."""
    for start, lineno, raw in _lines(p):
        head = _ID_HEAD.match(raw) if raw.endswith(b"\n") else None  # a last line may be torn: parse it
        pid = _parse_line(head.group(1)) if head is not None else _NOT_JSON
        if pid is not _NOT_JSON:
            yield start, lineno, pid
            continue
        rec = _checked_record(p, lineno, raw)  # a damaged id (a bad escape, not UTF-8) is named here
        if rec is None:
            return
        yield start, lineno, rec.get(ID_KEY)


def _checked_record(p: Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
    """Line `lineno` of trees file `p` as a record; None for a torn last line (warned about).

    Every line is written whole with its newline last, so a killed run can only leave a last
    line without one: that line is kept when it holds a whole record. A bad line that ends in
    a newline is damage, not a torn write: an error.
    """
    rec = _parse_line(raw)
    if isinstance(rec, dict):
        return rec
    if lineno == 1 and (isinstance(rec, list) or raw.strip() in (b"[", b"{")):  # a JSON document, not lines
        raise TreesFileError(f"{p}: not a trees.jsonl (it is one JSON document: a problems file, or a run's "
                             "summary.json?): export reads the trees.jsonl a search writes into its --out folder")
    if raw.endswith(b"\n") or rec is not _NOT_JSON:  # whole, so damage or another kind of file
        raise TreesFileError(f"{p}: line {lineno} is not a JSON object: a trees.jsonl of a search "
                             "holds one record per line (damaged, as a crash of the machine can leave a "
                             "file: delete that line, and a resume searches its problem again)")
    log.warning("%s: line %d is incomplete (a run was killed while writing it); skipped", p, lineno)
    return None


_NOT_JSON = object()


def _parse_line(raw: bytes) -> Any:
    """A line's JSON value, or _NOT_JSON (a torn line, say)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _NOT_JSON


def repair_tail(path: str | Path) -> None:
    """End the file with a whole line before appending to it: a last line without its newline
    gets one when it holds a whole record, and is cut off (with a warning) when it is torn."""
    p = Path(path)
    with p.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        start = size
        while start > 0:  # back to the last newline, a chunk at a time (lines can be large)
            step = min(start, 1 << 16)
            f.seek(start - step)
            cut = f.read(step).rfind(b"\n")
            if cut != -1:
                start = start - step + cut + 1
                break
            start -= step
        if start == size:
            return
        f.seek(start)
        if isinstance(_parse_line(f.read()), dict):
            f.write(b"\n")
        else:
            log.warning("%s: its last line is incomplete (a run was killed while writing it); dropping it", p)
            f.truncate(start)


class TreesWriter:
    """Appends finished problems to trees.jsonl, one flushed line each, each line opening with
    the record's id (an export sorts the lines by id before parsing them). The lines are synced
    to disk at close and, on a thread of their own (an fsync on a network file system can take
    a tenth of a second, which the search's event loop would wait out), by the first write
    `sync_interval_s` or more after the last sync: a crash of the machine, not only of the
    process, then loses little. None leaves it to the OS.

    Opening an existing file cuts a torn last line and reads the ids in it (see `done`),
    unless the caller has just read them (`done`: a resume reads a large file once).
    """

    def __init__(self, path: str | Path, *, sync_interval_s: float | None = 1.0,
                 done: set[str] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            repair_tail(self.path)
        self.done: set[str] = set(done) if done is not None else finished_ids(self.path)
        self._sync_interval_s = sync_interval_s
        self._synced = time.monotonic()
        self._syncing: threading.Thread | None = None
        self._f = self.path.open("a", encoding="utf-8")
        self.written = 0

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one finished problem's record (`tree_record`); DuplicateProblemError for a
        problem the file already holds."""
        pid = record.get(ID_KEY)
        if pid is None:
            raise ValueError(f"a trees.jsonl record needs {ID_KEY!r} (use tree_record)")
        pid = str(pid)
        if pid in self.done:
            raise DuplicateProblemError(f"{self.path}: problem {pid!r} is already in the file")
        if next(iter(record)) != ID_KEY:  # the id first, where a reader finds it without parsing the line
            record = {ID_KEY: record[ID_KEY], **{k: v for k, v in record.items() if k != ID_KEY}}
        with naming_errors(self.path):
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()
            due = self._sync_interval_s is not None and time.monotonic() - self._synced >= self._sync_interval_s
            if due and (self._syncing is None or not self._syncing.is_alive()):
                self._synced = time.monotonic()
                self._syncing = threading.Thread(target=self._sync, args=(self._f.fileno(),), daemon=True,
                                                 name="trees-fsync")
                self._syncing.start()
        self.done.add(pid)
        self.written += 1

    def close(self) -> None:
        """Flush and sync the lines written, and close the file."""
        if not self._f.closed:
            with naming_errors(self.path):  # its last flush may fail as a write did
                try:
                    if self._syncing is not None:
                        self._syncing.join()  # before the descriptor it syncs is closed
                    if self._sync_interval_s is not None:
                        self._f.flush()
                        os.fsync(self._f.fileno())
                finally:
                    self._f.close()

    def _sync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:  # the next sync (at close at the latest) raises it where it is seen
            log.warning("%s: syncing it to disk failed: %s", self.path, e)

    def __enter__(self) -> TreesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "K_NO_PARENT", "ID_KEY", "TreesFileError", "DuplicateProblemError", "build_rstar_dict",
    "tree_record", "record_question", "finished_ids", "read_trees", "repair_tail", "TreesWriter",
]
