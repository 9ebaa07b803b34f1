"""Problems in: a JSON list, JSON lines, or a local Hugging Face dataset folder.

Records need a `question` (aliases: `problem`, `query`) and may carry an `answer` (aliases:
`gt`, `ground_truth`, `final_answer`) and an `index`. A malformed record is reported (file,
line or index, what is wrong) as a warning and skipped, and counted; nothing is dropped
silently. When no record at all is usable the load fails instead (ProblemFileError), since a
run over nothing is a mistake in the input, not a result. Each problem gets a stable id: its
`index` when it has one, else its position in the file (records, malformed ones included), so
a resumed run finds the same ids.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstar_fast.files import first_few

log = logging.getLogger(__name__)

QUESTION_KEYS = ("question", "problem", "query")
ANSWER_KEYS = ("answer", "gt", "ground_truth", "final_answer")


class ProblemFileError(ValueError):
    """Problems that cannot be used at all: a file or folder missing, not UTF-8, not JSON, not
    a list of records, or without one usable record (in-memory records too)."""


class MalformedProblemWarning(UserWarning):
    """A record that was skipped; the message names the file, the line or index, and why."""


# Where the skip warnings say they come from: a name linecache cannot open, so that they print
# as one line. Pointing them at a line of this package would print that line of our source
# under each one, which tells a user nothing about the file they gave.
_WARNING_SOURCE = "<problems>"


@dataclass(frozen=True)
class Problem:
    id: str  # stable across runs over the same file
    question: str
    answer: Gold | None  # the gold answer (a list: any of them is right), None when not given
    record: dict[str, Any]  # the input record as read (written back to trees.jsonl)


@dataclass
class LoadedProblems:
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0  # malformed records reported and left out
    messages: list[str] = field(default_factory=list)  # one per skipped record

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]


def _first(record: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in record:
            return k, record[k]
    return None, None


# A LaTeX command whose backslash JSON read as an escape: "\tfrac" written "\tfrac" in
# the file is a TAB and "frac"
_ESCAPED_COMMAND = re.compile(r"[\t\x08\x0c\r](?=[A-Za-z])")
_ESCAPES = {"\t": "\\t", "\x08": "\\b", "\x0c": "\\f", "\r": "\\r"}


Gold = str | list[str]  # one answer, or several that are each right (MATH's "3" or "-3")


def gold_answer(record: Mapping[str, Any]) -> Gold | None:
    """A record's gold answer as the search grades it: the first alias present, a whole float
    as an integer, a LaTeX command mangled by a JSON escape repaired; a list's non-blank items
    (the reference's lists of golds, any of which is right), one alone as a string; None when
    it has none, or only a blank one (graded, it would make every answer wrong)."""
    _, answer = _first(record, ANSWER_KEYS)
    items = answer if isinstance(answer, list) else [answer]
    golds = [_gold_text(a) for a in items if a is not None and str(a).strip()]
    return None if not golds else golds[0] if len(golds) == 1 else golds


def _gold_text(answer: Any) -> str:
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return _ESCAPED_COMMAND.sub(lambda m: _ESCAPES[m.group()], str(answer))


class _Collector:
    def __init__(self, source: str, limit: int | None) -> None:
        self.out = LoadedProblems()
        self.source = source  # the file named in every message ("" for in-memory records)
        self.limit = limit
        self.ids: set[str] = set()
        self.first_skip = ""  # where and why of the first skipped record, for the all-skipped error

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.out.problems) >= self.limit

    def skip(self, where: str, why: str) -> None:
        self.out.skipped += 1
        self.out.messages.append(f"{self._name(where)}: skipped: {why}")
        self.first_skip = self.first_skip or f"{where}: {why}"

    def _name(self, where: str) -> str:
        return f"{self.source}: {where}" if self.source else where

    def finish(self) -> LoadedProblems:
        """Fail when every record was skipped; else warn once per skipped record.

        The warnings wait until here so that a file with nothing usable gives one error
        instead of a warning per record first."""
        out = self.out
        if out.skipped and not out.problems:
            raise ProblemFileError(
                f"{self.source or 'records'}: no usable problem: all {out.skipped} record(s) were skipped "
                f"(the first: {self.first_skip})"
            )
        for msg in out.messages:
            warnings.warn_explicit(msg, MalformedProblemWarning, _WARNING_SOURCE, 0, module=__name__)
        if out.skipped:
            log.warning("%s: %d malformed record(s) skipped", self.source or "records", out.skipped)
        return out

    def add(self, record: Any, where: str, position: int) -> None:
        if not isinstance(record, dict):
            return self.skip(where, f"a record must be a JSON object, got {type(record).__name__}")
        qkey, question = _first(record, QUESTION_KEYS)
        if qkey is None:
            return self.skip(where, f"no question (expected one of: {', '.join(QUESTION_KEYS)})")
        if not isinstance(question, str) or not question.strip():
            return self.skip(where, f"{qkey!r} must be a non-empty string, got {question!r:.80}")
        akey, answer = _first(record, ANSWER_KEYS)
        if answer is not None and not isinstance(answer, (str, int, float, list)):
            return self.skip(where, f"{akey!r} must be a string or a number, got {type(answer).__name__}")
        # The record goes back out in trees.jsonl: values JSON lacks (a dataset's timestamps)
        # become text, and text that UTF-8 cannot hold (a lone surrogate) is refused here
        # rather than failing the run when the problem is written.
        try:
            text = json.dumps(record, ensure_ascii=False, default=str)
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return self.skip(where, f"not valid Unicode text ({e.reason}: {e.object[e.start:e.end]!r})")
        except (TypeError, ValueError) as e:
            return self.skip(where, f"cannot be written as JSON: {e}")
        record = json.loads(text)
        pid = str(record["index"]) if record.get("index") is not None else str(position)
        if pid in self.ids:
            base, k = pid, 2
            while f"{base}#{k}" in self.ids:
                k += 1
            pid = f"{base}#{k}"
            log.warning("%s: duplicate problem id %r; using %r", self._name(where), base, pid)
        self.ids.add(pid)
        self.out.problems.append(Problem(pid, question, gold_answer(record), record))


def _json_reason(e: json.JSONDecodeError) -> str:
    # json's messages that end in " at" expect the position after them; it comes first here
    return e.msg.removesuffix(" at")


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    """`data` (bytes of `path` from `offset` on) as text, or an error naming the bad byte's offset."""
    try:  # a file's byte order mark (Windows tools write one) is not part of its first record
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        raise ProblemFileError(
            f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {offset + e.start} "
            f"({e.reason}); save the file as UTF-8"
        ) from None


def _load_records(records: list[Any], c: _Collector) -> None:
    for i, rec in enumerate(records):
        if c.full:
            return
        c.add(rec, f"record {i + 1}", i)  # counted from 1, as a person and the training data's errors count


def _load_object(data: dict[str, Any], path: Path, c: _Collector) -> None:
    """A file that is one JSON object: one record, the reference's {"example": [...]}, or a mistake."""
    if isinstance(data.get("example"), list):  # the reference's loader accepts this too
        return _load_records(data["example"], c)
    if _first(data, QUESTION_KEYS)[0] is not None:  # a single record (JSON lines with one line)
        return c.add(data, "record 0", 0)
    lists = [k for k, v in data.items() if isinstance(v, list)]
    hint = (f"; its key {lists[0]!r} holds a list of {len(data[lists[0]])}: make that list the file's content"
            if lists else f" (keys: {', '.join(map(str, list(data)[:8])) or 'none'})")
    raise ProblemFileError(
        f"{path}: expected a JSON list of problem records, or JSON lines (one record per line), "
        f"got one JSON object{hint}"
    )


def _load_lines(lines: Iterable[tuple[int, str]], c: _Collector) -> None:
    """JSON lines: each (line number, text) one record; a bad line is skipped, not fatal."""
    position = 0
    for lineno, line in lines:
        if c.full:
            return
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            c.skip(f"line {lineno}", f"not valid JSON at column {e.colno}: {_json_reason(e)}")
        else:
            c.add(rec, f"line {lineno}", position)
        position += 1


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a JSON lines file, read as they are needed (a limit stops early)."""
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, _decode(raw, path, offset)
            offset += len(raw)


def _load_json_file(path: Path, c: _Collector) -> None:
    """A .json (or other) file: a JSON list, one JSON object, or JSON lines."""
    text = _decode(path.read_bytes(), path)
    head = text.lstrip()
    if head.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProblemFileError(
                f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {_json_reason(e)}"
            ) from None
        return _load_records(data, c)
    if head.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass  # more than one object: JSON lines
        else:
            return _load_object(data, path, c)
    _load_lines(enumerate(text.split("\n"), 1), c)  # not splitlines(): JSON strings may hold U+2028


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


_SPLITS = ("train", "test", "validation", "valid", "dev")


def _split_of(relative: Path) -> str:
    """The split a dataset folder's file belongs to, by the Hugging Face naming: a folder or
    the file name's first word (`test-00000-of-00001.parquet`, `data/validation.jsonl`);
    train when it names none."""
    words = [*relative.parent.parts, re.split(r"[-_.]", relative.name, maxsplit=1)[0]]
    return next((w for w in words if w in _SPLITS), "train")


def _load_hf(path: Path, c: _Collector, split: str | None) -> None:
    try:
        import datasets
    except ImportError as e:
        raise ProblemFileError(f"{path}: reading a Hugging Face dataset needs `pip install datasets`") from e
    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        try:
            ds: Any = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds
            raise ProblemFileError(f"{path}: cannot load this saved dataset: {type(e).__name__}: {e}") from e
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet"))
        if not files:
            raise ProblemFileError(f"{path}: no dataset, .json, .jsonl or .parquet files in this folder")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        by_split: dict[str, list[str]] = {}
        for f in files:
            by_split.setdefault(_split_of(f.relative_to(path)), []).append(str(f))
        try:
            ds = datasets.load_dataset(kind, data_files=by_split)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds
            names = first_few([p.name for p in files], 4)
            raise ProblemFileError(
                f"{path}: a folder is read as one dataset made of all its {kind} files ({names}), which "
                f"must hold records with the same fields, and these do not load together "
                f"({type(e).__name__}: {_first_line(e)}); give one problems file instead") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ProblemFileError(f"{path}: dataset has splits {', '.join(ds)}; choose one with --split NAME "
                                       "(split= from Python)")
            split = next(iter(ds))
        if split not in ds:
            raise ProblemFileError(f"{path}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    for i, rec in enumerate(ds):
        if c.full:
            return
        c.add(dict(rec), f"row {i}", i)


def load_problems(path: str | Path, *, limit: int | None = None, split: str | None = None) -> LoadedProblems:
    """Problems from a .json list, a .jsonl file or a local Hugging Face dataset folder."""
    p = Path(path)
    if not p.exists():
        raise ProblemFileError(f"{p}: no such file or folder")
    if split is not None and not p.is_dir():
        raise ProblemFileError(f"{p}: one file has no splits (split {split!r} chooses among a dataset folder's)")
    c = _Collector(str(p), limit)
    if p.is_dir():
        _load_hf(p, c, split)
    elif p.suffix == ".jsonl":
        _load_lines(_file_lines(p), c)
    else:
        _load_json_file(p, c)
    if not c.out.problems and c.out.skipped == 0 and limit != 0:
        raise ProblemFileError(f"{p}: no problems in it")
    return c.finish()


__all__ = ["Problem", "LoadedProblems", "ProblemFileError", "MalformedProblemWarning", "gold_answer", "load_problems"]


def problems_from_records(records: Iterable[Any], limit: int | None = None) -> LoadedProblems:
    """Problems from in-memory records (`question`, `answer`, optional `index`), checked like
    a file's: a malformed record is reported with its position and skipped, and records of
    which none is usable raise ProblemFileError."""
    c = _Collector("", limit)
    for i, record in enumerate(records):
        if c.full:
            break
        c.add(record, f"records[{i}]", i)
    return c.finish()
