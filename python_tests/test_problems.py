"""Problem loading: JSON list, JSONL, HF dataset folders; malformed records reported."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rstar_fast.search.problems import (
    MalformedProblemWarning,
    ProblemFileError,
    load_problems,
    problems_from_records,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_benchmark_json_list() -> None:
    loaded = load_problems(DATA / "math500_test.json")
    assert len(loaded) == 500 and loaded.skipped == 0
    first = loaded[0]
    assert first.question and first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.id == str(first.record["index"])
    gsm = load_problems(DATA / "GSM8K_test.json", limit=3)
    assert len(gsm) == 3 and all(p.answer is not None for p in gsm)


@pytest.mark.parametrize("name, text", [
    ("p.json", json.dumps([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}], indent=2)),
    ("p.jsonl", '{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n'),
])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Windows tools save UTF-8
    loaded = load_problems(path)
    assert [p.question for p in loaded] == ["a", "b"] and loaded.skipped == 0


def test_jsonl_with_malformed_lines(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join([
        json.dumps({"question": "1+1?", "answer": "2"}),
        "{not json",
        json.dumps({"answer": "3"}),
        json.dumps({"question": "", "answer": "3"}),
        json.dumps(["a"]),
        json.dumps({"problem": "2+2?", "answer": 4}),
        json.dumps({"question": "no gold"}),
    ]) + "\n")
    with pytest.warns(MalformedProblemWarning) as rec:
        loaded = load_problems(p)
    assert [x.question for x in loaded] == ["1+1?", "2+2?", "no gold"]
    assert loaded.skipped == 4 and len(rec) == 4
    assert any("line 2" in m and "not valid JSON" in m for m in loaded.messages)
    assert any("line 3" in m and "no question" in m for m in loaded.messages)
    assert [x.id for x in loaded] == ["0", "5", "6"]  # positions stay stable
    assert loaded[1].answer == "4" and loaded[2].answer is None


def test_json_list_malformed_and_duplicate_ids(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"index": 7, "question": "a", "answer": "1"}, {"index": 7, "question": "b", "answer": "2"},
                             {"index": 8, "question": 5, "answer": "2"}]))
    with pytest.warns(MalformedProblemWarning, match="record 3"):
        loaded = load_problems(p)
    assert [x.id for x in loaded] == ["7", "7#2"] and loaded.skipped == 1


def test_hf_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [p.question for p in load_problems(tmp_path / "ds")] == ["q1", "q2"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text(json.dumps({"question": "q3", "answer": "3"}) + "\n")
    assert [p.answer for p in load_problems(tmp_path / "folder")] == ["3"]


def test_a_dataset_folders_splits_are_kept_apart(tmp_path: Path, capsys) -> None:
    """A downloaded dataset keeps train and test files side by side: never one merged set."""
    datasets = pytest.importorskip("datasets")
    from rstar_fast.cli import main

    repo = tmp_path / "repo" / "main"
    repo.mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"question": f"{split} q{i}", "answer": str(i)} for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(str(repo / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(ProblemFileError, match="splits .*test.*train|splits .*train.*test"):
        load_problems(tmp_path / "repo")
    assert [p.question for p in load_problems(tmp_path / "repo", split="test")] == ["test q0", "test q1"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"question": "a", "answer": "1"}]),
                          "test": datasets.Dataset.from_list([{"question": "b", "answer": "2"}])}).save_to_disk(str(saved))
    assert main(["generate", "--problems", str(saved), "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "--split NAME" in capsys.readouterr().err
    assert main(["generate", "--problems", str(saved), "--split", "test", "--out", str(tmp_path / "o"),
                 "--quiet", "--set", "iterations=1"]) == 0
    lines = (tmp_path / "o" / "trees.jsonl").read_text().splitlines()
    assert [json.loads(line)["question"] for line in lines] == ["b"]


def test_an_output_folder_inside_the_problems_folder_is_refused(tmp_path: Path, capsys) -> None:
    """Its trees.jsonl and summary.json would be read as problems by the next run (--resume)."""
    pytest.importorskip("datasets")
    from rstar_fast.cli import main

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    for out in (folder, folder / "run"):
        assert main(["generate", "--problems", str(folder), "--out", str(out), "--quiet"]) == 2
        assert "lies in the problems folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["a.jsonl"]


def test_quiet_hides_the_datasets_librarys_bars(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "fresh"  # a folder the datasets cache has not seen: it would show a bar
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"question": "What is 2+5?", "answer": "7"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "rstar_fast.cli", "generate", "--problems", str(folder),
                           "--out", str(tmp_path / "out"), "--quiet", "--set", "iterations=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Generating" not in done.stderr, done.stderr


def test_gold_answers_as_graded() -> None:
    from rstar_fast.search.problems import gold_answer

    assert gold_answer({"answer": "  "}) is None  # blank: graded, every answer would be wrong
    assert gold_answer({"answer": ["", "(0,0)"]}) == "(0,0)"  # a list's one real gold
    assert gold_answer({"answer": ["3", None, "-3.0"]}) == ["3", "-3.0"]  # any of them is right
    assert gold_answer({"answer": [" ", None]}) is None
    assert gold_answer({"answer": 3.0}) == "3"
    # "\\tfrac" written "\tfrac" in the JSON file: a TAB then "frac", repaired
    assert gold_answer({"answer": "\tfrac{1}{2}"}) == "\\tfrac{1}{2}"
    assert gold_answer({"answer": "\x0crac{3}{4}"}) == "\\frac{3}{4}"


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ProblemFileError, match="no such"):
        load_problems(tmp_path / "missing.json")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ProblemFileError, match="one file has no splits"):  # not ignored
        load_problems(one, split="test")
    (tmp_path / "bad.json").write_text("[{oops")
    with pytest.raises(ProblemFileError, match="not valid JSON"):
        load_problems(tmp_path / "bad.json")


@pytest.mark.parametrize("name, text, expected", [
    ("ctrl.json", '[{"question": "a\tb"}]', "not valid JSON at line 1, column 17: Invalid control character"),
    ("comma.json", '[\n {"question": "a"},\n {"question": "b"} {"question": "c"}\n]',
     "not valid JSON at line 3, column 20: Expecting ',' delimiter"),
])
def test_bad_json_names_file_line_and_column(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ProblemFileError) as err:
        load_problems(path)
    assert str(err.value) == f"{path}: {expected}"


@pytest.mark.parametrize("name, data, offset", [
    ("latin1.json", b"\xff\xfe[]", 0),
    ("late.jsonl", b'{"question": "q"}\n{"question": "caf\xe9"}\n', 35),  # on line 2, read as it streams
    ("late.json", b'[{"question": "q"},\n {"question": "caf\xe9"}]', 38),
])
def test_non_utf8_names_file_and_byte_offset(tmp_path: Path, name: str, data: bytes, offset: int) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ProblemFileError) as err:
        load_problems(path)
    assert str(err.value).startswith(f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} ")


@pytest.mark.parametrize("name, text, skipped, first", [
    ("str.json", '[{"question": 5, "answer": 2}]', 1, "record 1: 'question' must be a non-empty string, got 5"),
    ("ints.json", "[1, 2, 3]", 3, "record 1: a record must be a JSON object, got int"),
    ("lines.jsonl", '{"q": "a"}\n{"q": "b"}\n', 2, "line 1: no question (expected one of: question, problem, query)"),
    ("garbage.json", "hello\nworld\n", 2, "line 1: not valid JSON at column 1: Expecting value"),
])
def test_no_usable_record_is_an_error(tmp_path: Path, name: str, text: str, skipped: int, first: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error, not a warning per record first
        with pytest.raises(ProblemFileError) as err:
            load_problems(path)
    assert str(err.value) == f"{path}: no usable problem: all {skipped} record(s) were skipped (the first: {first})"


def test_one_json_object_is_not_read_as_lines(tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"question": "q", "answer": 1}], "version": 2}, indent=2))
    with pytest.raises(ProblemFileError) as err:
        load_problems(wrapped)
    assert str(err.value) == (f"{wrapped}: expected a JSON list of problem records, or JSON lines (one record per "
                              "line), got one JSON object; its key 'data' holds a list of 1: make that list the "
                              "file's content")
    flat = tmp_path / "flat.json"
    flat.write_text('{"name": "gsm8k", "size": 3}')
    with pytest.raises(ProblemFileError, match=r"got one JSON object \(keys: name, size\)"):
        load_problems(flat)
    # one record (pretty-printed, or JSON lines of one line) and the reference's {"example": [...]} load
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"question": "q", "answer": 1}, indent=2))
    assert [(p.id, p.question, p.answer) for p in load_problems(one)] == [("0", "q", "1")]
    example = tmp_path / "example.json"
    example.write_text(json.dumps({"example": [{"question": "a"}, {"question": "b"}]}, indent=2))
    assert [p.question for p in load_problems(example)] == ["a", "b"]


def test_skip_warning_prints_as_one_line(tmp_path: Path) -> None:
    """Python prints a warning with the source line it points at; ours point at none, so only the
    message shows (not a line of this package's code)."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question": "q"}, {"answer": 1}]))
    code = f"from rstar_fast.search.problems import load_problems; load_problems({str(path)!r})"
    err = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         check=True).stderr
    assert err.splitlines() == [f"<problems>:0: MalformedProblemWarning: {path}: record 2: skipped: no question "
                                "(expected one of: question, problem, query)",
                                f"{path}: 1 malformed record(s) skipped"]  # the log's count


def test_a_run_counts_the_malformed_records_it_skipped(tmp_path: Path, capsys) -> None:
    """Warned about one by one as they are read, and counted where the run's figures are:
    summary.json and the CLI's summary line."""
    from rstar_fast.cli import main

    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "What is 1+1?", "answer": "2"}\nnot json\n{"answer": "3"}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedProblemWarning)
        rc = main(["generate", "--problems", str(path), "--out", str(tmp_path / "out"), "--quiet",
                   "--set", "iterations=1"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 malformed problem records skipped, as warned above" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["unusable"] == 2


def test_cli_refuses_a_file_without_usable_problems(tmp_path: Path, capsys) -> None:
    from rstar_fast.cli import main

    path = tmp_path / "bad.json"
    path.write_text("[1, 2, 3]")
    rc = main(["generate", "--problems", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"rstar-fast generate: error: {path}: no usable problem: all 3 record(s)")


def test_in_memory_records_are_checked_like_a_file():
    import warnings as _w

    from rstar_fast.search.problems import MalformedProblemWarning, problems_from_records

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        got = problems_from_records([{"question": "1+1?", "answer": 2}, {"answer": 3}, "nope", {"question": "x", "index": 7}])
    assert [(p.id, p.question, p.answer) for p in got.problems] == [("0", "1+1?", "2"), ("7", "x", None)]
    assert got.skipped == 2
    messages = [str(w.message) for w in caught if issubclass(w.category, MalformedProblemWarning)]
    assert any("records[1]" in m for m in messages) and any("records[2]" in m for m in messages)


def test_in_memory_records_none_usable():
    with pytest.raises(ProblemFileError) as err:
        problems_from_records([{"answer": 3}, "nope"])
    assert str(err.value) == ("records: no usable problem: all 2 record(s) were skipped (the first: records[0]: "
                              "no question (expected one of: question, problem, query))")
    assert problems_from_records([]).problems == []  # nothing given is not an error here


def test_records_become_json_and_unwritable_text_is_skipped():
    """A record goes back out in trees.jsonl: a dataset's timestamp becomes text; a question
    UTF-8 cannot hold (a lone surrogate) is skipped, named, instead of failing the run later."""
    import datetime

    with pytest.warns(MalformedProblemWarning, match=r"records\[1\]: skipped: not valid Unicode text"):
        loaded = problems_from_records([
            {"question": "q1", "answer": 2, "when": datetime.datetime(2024, 1, 2)},
            {"question": "q2 \ud83d", "answer": 3},
        ])
    (p,) = loaded.problems
    assert p.record["when"] == "2024-01-02 00:00:00" and json.dumps(p.record)
    assert loaded.skipped == 1


def test_answer_aliases_and_which_wins() -> None:
    got = problems_from_records([
        {"question": "a", "final_answer": "1"},
        {"question": "b", "gt": "2", "answer": "3"},  # `answer` first, as the reference reads it
        {"question": "c", "ground_truth": "4"},
        {"query": "d", "answer": "5"},
    ]).problems
    assert [(p.question, p.answer) for p in got] == [("a", "1"), ("b", "3"), ("c", "4"), ("d", "5")]
