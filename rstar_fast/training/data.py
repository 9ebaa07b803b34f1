"""Reading training records: PPM preference pairs and policy SFT examples.

Both formats are those the exports write and the reference training scripts read: a JSON
array of objects (as in `../shared/data/rstar_format/*_examples.json`) or JSON lines, one
object per line. Every problem is reported with the file and the line it sits on, so a user
fixing a hand-edited or truncated file can go straight to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class TrainingError(RuntimeError):
    """Base of every training failure this package reports to users (bad data, bad options)."""


class TrainingDataError(TrainingError, ValueError):
    """A data file that is missing, empty, not JSON, or has records without the needed fields."""


class TrainingConfigError(TrainingError, ValueError):
    """A hyperparameter or option with a value training cannot use."""


PPM_KEYS: tuple[str, ...] = ("prompt", "pos", "neg")
SFT_KEYS: tuple[str, ...] = ("query", "response")


@dataclass(frozen=True)
class PreferencePair:
    """One PPM pair: the shared prompt (question plus prefix steps), a better and a worse step."""

    prompt: str
    pos: str
    neg: str
    pos_count: int | None = None  # correct leaves below the positive step, when the export kept it
    neg_count: int | None = None


@dataclass(frozen=True)
class SFTExample:
    query: str
    response: str


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line, element) for each element of the top-level JSON array in `text`."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0) + 1  # past '['
    pos = _skip_ws(text, pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from None
        yield _line_of(text, pos), value
        pos = _skip_ws(text, end)
        if pos >= len(text):
            raise TrainingDataError(f"{path}:{_line_of(text, pos)}: bad JSON: the array is not closed with ']'")
        if text[pos] == "]":
            rest = _skip_ws(text, pos + 1)
            if rest < len(text):
                raise TrainingDataError(f"{path}:{_line_of(text, rest)}: bad JSON: extra data after the array")
            return
        if text[pos] != ",":
            raise TrainingDataError(
                f"{path}:{_line_of(text, pos)}: bad JSON: expected ',' or ']' between records, "
                f"found {text[pos]!r}"
            )
        pos = _skip_ws(text, pos + 1)


def _iter_json_lines(text: str, path: Path) -> Iterator[tuple[int, object]]:
    # not splitlines(): JSON strings may hold U+2028, U+2029 and U+0085 unescaped (the exports do)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(
                f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno}); expected a JSON array of "
                "records or one JSON object per line"
            ) from None


def read_records(path: str | Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """Read a JSON array or JSON-lines file of objects; return (line, record) pairs.

    Raises TrainingDataError naming the file and line for a missing or empty file, bad JSON, a
    record that is not an object, or a required field that is missing or not a non-empty string.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: is a folder, not a data file" if path.is_dir() else f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as the problem loader takes it
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    start = _skip_ws(text, 0)
    if start >= len(text):
        raise TrainingDataError(f"{path}: the file is empty; expected records with {', '.join(required)}")
    rows = _iter_json_array(text, path) if text[start] == "[" else _iter_json_lines(text, path)
    records: list[tuple[int, dict]] = []
    for lineno, record in rows:
        if not isinstance(record, dict):
            raise TrainingDataError(
                f"{path}:{lineno}: record {len(records) + 1} is a {type(record).__name__}, expected an "
                f"object with fields {', '.join(required)}"
            )
        missing = [k for k in required if k not in record]
        if missing:
            raise TrainingDataError(
                f"{path}:{lineno}: record {len(records) + 1} lacks field(s) {', '.join(missing)} "
                f"(has {', '.join(sorted(record)) or 'none'})"
            )
        for k in required:
            if not isinstance(record[k], str) or not record[k]:
                raise TrainingDataError(
                    f"{path}:{lineno}: record {len(records) + 1} field {k!r} must be a non-empty "
                    f"string, got {record[k]!r:.60}"
                )
            if not record[k].isascii():
                try:  # JSON can escape half a surrogate pair ("\ud800"), which no tokenizer takes
                    record[k].encode("utf-8")
                except UnicodeEncodeError as e:
                    raise TrainingDataError(
                        f"{path}:{lineno}: record {len(records) + 1} field {k!r} holds {record[k][e.start]!r} "
                        f"at character {e.start}, half of a surrogate pair, which is no text"
                    ) from None
        records.append((lineno, record))
    if not records:
        raise TrainingDataError(f"{path}: no records; expected objects with fields {', '.join(required)}")
    return records


def _count(value: object, path: Path, lineno: int, key: str) -> int | None:
    """Counts arrive as ints or, in the reference's files, as strings of digits."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    raise TrainingDataError(f"{path}:{lineno}: field {key!r} must be a non-negative integer, got {value!r:.40}")


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Read PPM pairs `{prompt, pos, neg[, pos_count, neg_count]}`."""
    path = Path(path)
    return [
        PreferencePair(
            prompt=r["prompt"],
            pos=r["pos"],
            neg=r["neg"],
            pos_count=_count(r.get("pos_count"), path, line, "pos_count"),
            neg_count=_count(r.get("neg_count"), path, line, "neg_count"),
        )
        for line, r in read_records(path, PPM_KEYS)
    ]


def load_sft_examples(path: str | Path) -> list[SFTExample]:
    """Read policy SFT records `{query, response}`."""
    return [SFTExample(query=r["query"], response=r["response"]) for _, r in read_records(path, SFT_KEYS)]
