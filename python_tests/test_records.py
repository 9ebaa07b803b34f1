"""trees.jsonl: the reference's node dictionary, append + resume, torn last lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rstar_fast.files import write_json
from rstar_fast.search.records import (
    DuplicateProblemError, TreesFileError, TreesWriter, build_rstar_dict, finished_ids, read_trees,
    tree_record,
)


def small_tree() -> dict:
    # 0 -> 1, 2 ; 1 -> 3, 4 ; 2 -> 5
    parents = np.array([-1, 0, 0, 1, 1, 2])
    texts = ["", "<code>\nx = 1\n<end_of_step>", "<code>\ny = 2\n<end_of_step>",
             "\nprint(x)\n<end_of_code>\n<output>1<end_of_output>", "\\boxed{2}<end_of_answer>", "\\boxed{3}<end_of_answer>"]
    return build_rstar_dict(parents, texts, np.array([0.0, 0.5, -0.2, 0.1, 1.0, -1.0]),
                            np.array([0.2, 0.6, -0.6, 0.1, 1.0, -1.0], dtype=np.float32),
                            np.array([5, 3, 2, 1, 1, 1]), ["", "", "", "", "2", "3"], "What?")


def test_build_rstar_dict_tags_and_state() -> None:
    rstar = small_tree()
    assert list(rstar) == ["0", "0.1", "0.2", "0.1.1", "0.1.2", "0.2.1"]  # breadth first
    root = rstar["0"]
    assert root["extra_info"] == "question: What?" and root["visit_count"] == 5
    assert rstar["0.1"]["action"] == "python_interpreter" and rstar["0.1"]["action_input"] == rstar["0.1"]["text"]
    assert rstar["0.1.1"]["action_input"].endswith("<end_of_code>")
    assert rstar["0.1.2"]["action"] == "" and rstar["0.1.2"]["final_answer"] == "2"
    assert isinstance(rstar["0.2"]["q_value"], float) and rstar["0.2.1"]["q_value"] == -1.0
    assert set(root) == {"text", "extra_info", "action", "action_input", "final_answer", "value", "q_value", "visit_count"}
    # a code-error terminal keeps the step as generated, not the <end_of_code> added to show the error
    failed = build_rstar_dict([-1, 0], ["", "<code>\n1/0\n<end_of_step><end_of_code>\n<output>ZeroDivisionError<end_of_output>"],
                              [0, -1], [0, -1], [1, 1], ["", "Too many consecutive steps have code errors."], "q")
    assert failed["0.1"]["action_input"] == "<code>\n1/0\n<end_of_step>"
    # a node whose code ran keeps its output as `observation`, in the reference's key order
    ran = build_rstar_dict([-1, 0], ["", "<code>\nprint(1)\n<end_of_step>"], [0, 0], [0, 0], [1, 1], ["", ""], "q",
                           observations={1: "1"})
    assert list(ran["0.1"]) == ["text", "extra_info", "action", "action_input", "final_answer", "observation",
                                "value", "q_value", "visit_count"]
    assert ran["0.1"]["observation"] == "1" and "observation" not in ran["0"]
    with pytest.raises(ValueError, match="parents must come first"):
        build_rstar_dict([-1, 2, 0], ["", "", ""], [0] * 3, [0] * 3, [0] * 3, [""] * 3, "q")


def test_write_resume_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "out" / "trees.jsonl"
    with TreesWriter(path) as w:
        w.write(tree_record({"question": "What?", "answer": "2"}, "p1", small_tree(), pred="2", correct=True))
        w.write(tree_record({"question": "Q2", "answer": "3"}, "p2", small_tree(), pred="2", correct=False))
        with pytest.raises(DuplicateProblemError):
            w.write(tree_record({"question": "Q2"}, "p2", small_tree()))
    with path.open("a") as f:  # a run killed mid-line
        f.write('{"question": "Q3", "problem_id": "p3", "rstar": {"0"')
    assert finished_ids(path) == {"p1", "p2"}
    assert [r["problem_id"] for r in read_trees(path)] == ["p1", "p2"]
    with TreesWriter(path) as w:
        assert w.done == {"p1", "p2"}
        w.write(tree_record({"question": "Q3"}, "p3", small_tree()))
    recs = list(read_trees(path))
    assert [r["problem_id"] for r in recs] == ["p1", "p2", "p3"]
    assert recs[0]["rstar"]["0.1.2"]["final_answer"] == "2" and recs[0]["correct"] is True
    assert all(line.endswith("}") for line in path.read_text().splitlines())


def test_a_problem_met_again_in_its_file_is_read_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two runs that wrote into one folder unguarded, or a file given twice: each problem's
    first record only, in both orders, with a warning naming the repeats. Files of other runs
    (other problem sets, numbered alike) each keep their own."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"problem_id": "2", "n": 1}\n{"problem_id": "1", "n": 2}\n{"problem_id": "2", "n": 3}\n')
    b.write_text('{"problem_id": "1", "n": 4}\n{"problem_id": "3", "n": 5}\n')
    with caplog.at_level("WARNING", logger="rstar_fast.search.records"):
        assert [r["n"] for r in read_trees([a, b])] == [1, 2, 4, 5]
        assert [r["n"] for r in read_trees([a, b], in_problem_order=True)] == [2, 4, 1, 5]
        assert [r["n"] for r in read_trees([a, tmp_path / "." / "a.jsonl"], in_problem_order=True)] == [2, 1]
    said = [r.getMessage() for r in caplog.records]
    assert "1 record(s) repeat a problem met before in their file" in said[0] and "a.jsonl: 2" in said[0], said
    assert any("is given twice: read once" in m for m in said), said


def test_the_writer_syncs_its_lines_to_disk_at_intervals_and_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash of the machine keeps what was synced. A sync between writes runs on a thread of
    its own, off the caller's (the search's event loop); at close the caller syncs."""
    import os
    import threading

    synced: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(threading.current_thread().name))
    with TreesWriter(tmp_path / "a.jsonl", sync_interval_s=3600) as w:
        for pid in ("p1", "p2"):
            w.write(tree_record({"question": "Q"}, pid, small_tree()))
        assert synced == []
    assert synced == [threading.current_thread().name]  # at close
    synced.clear()
    with TreesWriter(tmp_path / "b.jsonl", sync_interval_s=0) as w:
        w.write(tree_record({"question": "Q"}, "p1", small_tree()))
    assert synced == ["trees-fsync", threading.current_thread().name]
    synced.clear()
    with TreesWriter(tmp_path / "c.jsonl", sync_interval_s=None) as w:
        w.write(tree_record({"question": "Q"}, "p1", small_tree()))
    assert synced == []
    write_json(tmp_path / "s.json", {"a": 1})  # the temporary is on disk before it replaces the file
    assert len(synced) == 1


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    path.write_text('{"problem_id": "a"}\nnot json\n{"problem_id": "b"}\n')
    with pytest.raises(TreesFileError, match="line 2"):
        finished_ids(path)
    with pytest.raises(TreesFileError, match="line 2"):
        list(read_trees(path))
    assert json.loads(path.read_text().splitlines()[0]) == {"problem_id": "a"}


def test_last_line_without_newline_is_kept_when_whole(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    path.write_text('{"problem_id": "a"}\n{"problem_id": "b"}')  # e.g. saved by an editor
    assert finished_ids(path) == {"a", "b"}
    with TreesWriter(path) as w:
        assert w.done == {"a", "b"}
        w.write(tree_record({"question": "Q"}, "c", small_tree()))
    assert [r["problem_id"] for r in read_trees(path)] == ["a", "b", "c"]


def test_bad_last_line_with_newline_is_damage_not_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    path.write_text('{"problem_id": "a"}\nnot json\n')
    with pytest.raises(TreesFileError, match="line 2"):
        finished_ids(path)
    with pytest.raises(TreesFileError, match="line 2"):
        TreesWriter(path)
    path.write_text("garbage")  # one torn line and nothing else
    assert list(read_trees(path)) == []


def test_torn_tail_is_cut_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    whole = json.dumps({"problem_id": "a", "pad": "x" * 100_000}) + "\n"
    path.write_text(whole + '{"problem_id": "b", "pad": "' + "y" * 200_000)
    with TreesWriter(path) as w:
        assert w.done == {"a"}
    assert path.read_text() == whole


def test_read_trees_in_problem_order(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    lines = [{"problem_id": "10"}, {"problem_id": "b"}, {"question": "no id"}, {"problem_id": "2"},
             {"problem_id": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"problem_id": "1", "rst')
    assert [r.get("problem_id") for r in read_trees(path)] == ["10", "b", None, "2", "a"]
    assert [r.get("problem_id") for r in read_trees(path, in_problem_order=True)] == ["2", "10", "a", "b", None]


def test_a_json_list_is_not_read_as_a_torn_trees_file(tmp_path: Path) -> None:
    """A problems file given for a trees.jsonl: a whole line that is no object is not a run's
    torn last line, however it ends."""
    for text in ('[{"question": "q", "answer": "1"}]', '[\n  {"question": "q"}\n]\n'):
        path = tmp_path / "problems.json"
        path.write_text(text)
        with pytest.raises(TreesFileError, match=r"problems.json: not a trees.jsonl \(it is one JSON document"):
            list(read_trees(path))


def test_problem_order_takes_only_ascii_digits_for_numbers(tmp_path):
    """'²' is a digit to str.isdigit() but not to int(): it sorts as text."""
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps({"problem_id": pid}) + "\n" for pid in ("²", "10", "9")))
    assert [r["problem_id"] for r in read_trees(path, in_problem_order=True)] == ["9", "10", "²"]


def test_write_json_that_cannot_replace_its_file_leaves_no_tmp(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()  # a folder where the file should go
    with pytest.raises(OSError):
        write_json(tmp_path / "config.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    write_json(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}


def test_a_line_opens_with_its_id_and_an_ordered_read_parses_each_record_once(tmp_path, monkeypatch):
    """Sorting by id reads the ids from the lines' heads: a large run's records are parsed once,
    not twice; a file of another writer (id not first) is still sorted by id."""
    import rstar_fast.search.records as records

    path = tmp_path / "trees.jsonl"
    with TreesWriter(path) as w:
        for pid in ("10", "2", "b"):
            w.write(tree_record({"problem_id": "input's", "question": f"Q{pid}"}, pid, small_tree()))
    assert all(line.startswith('{"problem_id": "') for line in path.read_text().splitlines())
    with path.open("a") as f:
        f.write(json.dumps({"question": "other writer", "problem_id": "1"}) + "\n")
    parsed = []
    real = records._parse_line
    # whole lines parsed (an id read from a line's head is parsed alone, as a JSON string)
    monkeypatch.setattr(records, "_parse_line", lambda raw: (raw.startswith(b"{") and parsed.append(raw)) or real(raw))
    assert [r["problem_id"] for r in read_trees(path, in_problem_order=True)] == ["1", "2", "10", "b"]
    assert [r["question"] for r in read_trees(path, in_problem_order=True)][1:] == ["Q2", "Q10", "Qb"]
    assert len(parsed) == 2 * 5  # per read: each record once, the other writer's twice (its id is not first)


def test_a_damaged_line_that_opens_with_its_id_is_an_error_when_read(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    path.write_text('{"problem_id": "b"}\n{"problem_id": "a", "rstar": {"0": \n')
    with pytest.raises(TreesFileError, match="trees.jsonl: line 2 is not a JSON object"):
        list(read_trees(path, in_problem_order=True))


def test_a_damaged_id_at_a_lines_head_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    for bad in (b'{"problem_id": "a\\q", "rstar": {}}\n', b'{"problem_id": "\xff", "rstar": {}}\n'):
        path.write_bytes(b'{"problem_id": "b"}\n' + bad)
        with pytest.raises(TreesFileError, match="trees.jsonl: line 2 is not a JSON object"):
            list(read_trees(path, in_problem_order=True))


def test_a_record_takes_the_search_s_id_pred_and_verdict_and_keeps_the_input_s_answer() -> None:
    given = {"question": "q", "problem_id": "old", "pred": "old", "correct": True, "answer": "orig"}
    out = tree_record(given, "new", {}, pred="5", correct=None, answer="other")
    assert (out["problem_id"], out["pred"], out["correct"], out["answer"]) == ("new", "5", None, "orig")


def test_node_fields_follow_node_ids_not_tree_order() -> None:
    """Node 3 (a child of the root) comes before node 2 (a grandchild) in the tree's order."""
    d = build_rstar_dict([-1, 0, 1, 0], ["", "s1", "s2", "s3"], [0.0, 0.1, 0.2, 0.3], [0.0, -0.1, -0.2, -0.3],
                         [10, 11, 12, 13], ["", "", "", ""], "q")
    fields = {tag: (n["value"], n["q_value"], n["visit_count"]) for tag, n in d.items() if tag != "0"}
    assert fields == {"0.1": (0.1, -0.1, 11), "0.2": (0.3, -0.3, 13), "0.1.1": (0.2, -0.2, 12)}
