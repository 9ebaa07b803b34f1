"""SFT and PPM-pair exports: the reference's extraction rules on hand-built trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rstar_fast.search.export import (
    ExportError, edit_distance_at_least, export_pairs, export_sft, pair_records, sft_records,
)
from rstar_fast.search.records import TreesWriter, build_rstar_dict, tree_record
from rstar_fast.search.steps import TOO_MANY_CODE_ERRORS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rstar_format"

S1A = "<code>\n# Step 1: compute the total weight lifted in one go\ntotal = 2 * 20 * 12\n<end_of_step>"
S1B = "<code>\n# Step 1: a different and rather wrong idea about it\nwrong = 2 + 20 + 12\n<end_of_step>"
S2A = "\n# Now print the final answer\nprint(total / 30)\n<end_of_code>\n<output>16.0<end_of_output>"
S2B = "\n# Now print the final answer\nprint(wrong)\n<end_of_code>\n<output>34<end_of_output>"
ANS_OK = "\n<answer>\\boxed{16}<end_of_answer>"
ANS_BAD = "\n<answer>\\boxed{34}<end_of_answer>"


def tree(question: str = "How many times?") -> dict:
    #            0
    #     1 (S1A)        2 (S1B)
    #   3 (S2A)        4 (S2B)   5 (code error terminal)
    #  6 ok  7 ok(err)  8 bad
    parents = [-1, 0, 0, 1, 2, 2, 3, 3, 4]
    texts = ["", S1A, S1B, S2A, S2B, S1B + "<end_of_code>\n<output>NameError<end_of_output>", ANS_OK,
             ANS_OK.replace("\\boxed", "error \\boxed"), ANS_BAD]
    q = [0.0, 0.8, -0.5, 0.9, -0.7, -1.0, 1.0, 1.0, -1.0]
    answers = ["", "", "", "", "", TOO_MANY_CODE_ERRORS, "16", "16", "34"]
    return build_rstar_dict(parents, texts, q, q, [9, 5, 4, 3, 2, 1, 1, 1, 1], answers, question)


def record() -> dict:
    return tree_record({"question": "How many times?", "answer": "16"}, "0", tree())


def exact(gold: str, answer: str) -> bool:
    return gold == answer


def test_sft_top_traces_without_errors() -> None:
    recs = sft_records(record(), exact, n=2)
    # two correct traces (0-1-3-6 and 0-1-3-7) tie on mean Q; the one with "error" is dropped
    assert recs == [{"query": "How many times?", "response": (S1A + S2A + ANS_OK).strip()}]
    assert sft_records(record(), exact, n=2)[0]["response"].startswith("<code>")


def test_pairs_rules() -> None:
    pairs = pair_records(record(), min_margin=0.5, min_edit_distance=20, final_pairs=0)
    assert len(pairs) == 1
    p = pairs[0]
    assert p["prompt"] == "<|user|>:\nHow many times?\n<|assistant|>: Let's think step by step and solve the problem with code."
    assert (p["pos"], p["neg"], p["pos_count"], p["neg_count"]) == (S1A, S1B, 1, 1)
    # without the reference's filters the same pair, and no more (children have one kind each)
    assert len(pair_records(record(), min_margin=0.0, min_edit_distance=0, final_pairs=0)) == 1
    assert pair_records(record(), min_margin=2.0, final_pairs=0) == []


def test_final_step_pairs_compare_whole_trajectories() -> None:
    # the answer nodes have no siblings: the final step is paired as whole traces, best correct
    # (by mean step Q) against worst wrong, after the step pairs
    pairs = pair_records(record())
    assert len(pairs) == 3
    prompt = "<|user|>:\nHow many times?\n<|assistant|>: Let's think step by step and solve the problem with code."
    ok, ok_err, bad = S1A + S2A + ANS_OK, S1A + S2A + ANS_OK.replace("\\boxed", "error \\boxed"), S1B + S2B + ANS_BAD
    assert pairs[1:] == [
        {"prompt": prompt, "neg": bad, "pos": ok, "neg_count": 1, "pos_count": 2},
        {"prompt": prompt, "neg": bad, "pos": ok_err, "neg_count": 1, "pos_count": 2},
    ]
    assert [p["pos"] for p in pair_records(record(), final_pairs=1)[1:]] == [ok]
    # the step filters do not apply to them, and a tree with one kind of answer gives none
    assert len(pair_records(record(), min_margin=2.0)) == 2
    only_right = {"question": "Q", "rstar": build_rstar_dict([-1, 0], ["", S1A + S2A + ANS_OK], [0.0, 1.0],
                                                               [0.0, 1.0], [1, 1], ["", "16"], "Q")}
    assert pair_records(only_right) == []
    with pytest.raises(ValueError, match="final_pairs"):
        pair_records(record(), final_pairs=-1)


def test_a_one_step_solution_is_paired_once() -> None:
    # the root's two children are whole solutions: their step pair is the final-step pair
    rstar = build_rstar_dict([-1, 0, 0], ["", S1A + S2A + ANS_OK, S1B + S2B + ANS_BAD], [0.0, 1.0, -1.0],
                             [0.0, 1.0, -1.0], [2, 1, 1], ["", "16", "34"], "Q")
    pairs = pair_records({"question": "Q", "rstar": rstar})
    assert [(p["pos"], p["neg"]) for p in pairs] == [(S1A + S2A + ANS_OK, S1B + S2B + ANS_BAD)]


def test_pairs_recurse_into_mixed_children() -> None:
    # 0 -> 1 ; 1 -> 2 (correct leaf), 3 (wrong leaf): the pair is found one level down
    parents = [-1, 0, 1, 1]
    texts = ["", S1A, S2A + ANS_OK, S2B + ANS_BAD]
    q = [0.0, 0.1, 1.0, -1.0]
    rstar = build_rstar_dict(parents, texts, q, q, [3, 2, 1, 1], ["", "", "16", "34"], "Q")
    pairs = pair_records({"question": "Q", "rstar": rstar}, min_edit_distance=0, final_pairs=0)
    assert len(pairs) == 1 and pairs[0]["prompt"].endswith(S1A) and pairs[0]["pos"] == texts[2]


def test_file_exports_match_reference_formats(tmp_path: Path) -> None:
    trees = tmp_path / "trees.jsonl"
    with TreesWriter(trees) as w:
        w.write(record())
    assert export_sft(trees, tmp_path / "sft.json", judge=exact) == 1
    assert export_pairs(trees, tmp_path / "pairs.json") == 3
    assert export_pairs(trees, tmp_path / "pairs.jsonl", final_pairs=0) == 1
    sft = json.loads((tmp_path / "sft.json").read_text())
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    for name, records in (("sft.json", sft), ("pairs.json", pairs)):  # laid out as the reference's files
        assert (tmp_path / name).read_text() == json.dumps(records, ensure_ascii=False, indent=4)
    ref_sft = json.loads((DATA / "sft_data_examples.json").read_text())
    ref_rm = json.loads((DATA / "rm_data_examples.json").read_text())
    assert set(sft[0]) == set(ref_sft[0]) and set(pairs[0]) == set(ref_rm[0])
    assert json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0]) == pairs[0]
    assert export_sft(trees, tmp_path / "empty.json", judge=lambda g, a: False) == 0
    assert (tmp_path / "empty.json").read_text() == "[]"


def _on_a_full_disk(script: str, *args: Path) -> str:
    """What `script` prints, run where a file size limit of 4 KiB stands in for a full disk
    (a write, or the flush at close, fails)."""
    limited = ("import resource, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n") + script
    done = subprocess.run([sys.executable, "-c", limited, *map(str, args)], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def test_a_full_disk_names_the_output_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    trees = tmp_path / "trees.jsonl"
    with TreesWriter(trees) as w:
        for i in range(30):
            w.write(tree_record({"question": "How many times?", "answer": "16"}, str(i), tree()))
    out = tmp_path / "out" / "pairs.json"
    said = _on_a_full_disk("from rstar_fast.search.export import ExportError, export_pairs\n"
                           "try:\n    export_pairs(sys.argv[1], sys.argv[2])\n"
                           "except ExportError as e:\n    print(e)\n", trees, out)
    assert f"{out}: cannot write the export: File too large" in said, said
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_during_a_search_names_the_file(tmp_path: Path) -> None:
    """trees.jsonl and summary.json: the error says which file could not be written."""
    trees, summary = tmp_path / "trees.jsonl", tmp_path / "summary.json"
    said = _on_a_full_disk("from rstar_fast.files import write_json\n"
                           "from rstar_fast.search.records import ID_KEY, TreesWriter\n"
                           "try:\n    with TreesWriter(sys.argv[1]) as w:\n"
                           "        for i in range(100):\n            w.write({ID_KEY: str(i), 'text': 'x' * 200})\n"
                           "except OSError as e:\n    print(e.filename, e.strerror)\n"
                           "try:\n    write_json(sys.argv[2], {'text': 'x' * 10000})\n"
                           "except OSError as e:\n    print(e.filename, e.strerror)\n", trees, summary)
    assert said.splitlines() == [f"{trees} File too large", f"{summary} File too large"], said


def test_an_export_killed_mid_write_leaves_a_temporary_file_the_next_one_removes(tmp_path: Path) -> None:
    import os

    from rstar_fast.files import try_lock

    trees = tmp_path / "trees.jsonl"
    with TreesWriter(trees) as w:
        w.write(tree_record({"question": "How many times?", "answer": "16"}, "0", tree()))
    stale, busy = tmp_path / ".pairs.json.99999.tmp", tmp_path / ".pairs.json.88888.tmp"
    stale.write_text("[half")
    held = try_lock(busy)  # an export writing into it now
    try:
        assert export_pairs(trees, tmp_path / "pairs.json") == 3
        assert not stale.exists() and busy.exists()
    finally:
        os.close(held)


def test_an_output_through_a_symlink_or_into_a_fifo_stays_what_it_is(tmp_path: Path) -> None:
    """A symlinked output keeps its link and its target gets the records; a FIFO (or a device
    such as /dev/stdout) is written to, not replaced by a regular file."""
    import os
    import stat
    import threading

    from rstar_fast.files import write_json

    trees = tmp_path / "trees.jsonl"
    with TreesWriter(trees) as w:
        w.write(record())
    target, link = tmp_path / "data" / "sft.jsonl", tmp_path / "latest.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    assert export_sft(trees, link, judge=exact) == 1
    assert link.is_symlink() and json.loads(target.read_text())["query"]
    write_json(link, {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert export_sft(trees, fifo, judge=exact) == 1
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and json.loads(got[0])["query"]
    # /dev/stdout is whatever stdout is open on: a pipe, or a log it appends to
    script = ("import sys\nfrom rstar_fast.search.export import export_sft\nfrom rstar_fast.files import write_json\n"
              "export_sft(sys.argv[1], '/dev/stdout', judge=lambda g, a: g == a)\nwrite_json('/dev/stdout', {'b': 2})\n")
    piped = subprocess.run([sys.executable, "-c", script, str(trees)], capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and '"query"' in piped.stdout and '"b": 2' in piped.stdout, piped.stderr
    log = tmp_path / "run.log"
    log.write_text("earlier line\n")
    with open(log, "a") as appended:
        done = subprocess.run([sys.executable, "-c", script, str(trees)], stdout=appended, timeout=60)
    assert done.returncode == 0 and log.read_text().startswith("earlier line\n[") and '"b": 2' in log.read_text()
    with pytest.raises(ExportError, match=r"^/proc/nope/sft\.jsonl: cannot write there: "):
        export_sft(trees, Path("/proc/nope/sft.jsonl"), judge=exact)


def test_default_judge_grades(tmp_path: Path) -> None:
    trees = tmp_path / "trees.jsonl"
    rec = record()
    rec["answer"] = "16.0"
    with TreesWriter(trees) as w:
        w.write(rec)
    assert export_sft(trees, tmp_path / "sft.jsonl") == 1


def test_sft_export_judges_each_distinct_answer_once_on_threads(tmp_path: Path) -> None:
    """math-verify takes ~50 ms an answer: a problem's answers are judged once each, several at
    a time (a tree's two '16' leaves and one '34' leaf: two calls)."""
    import threading

    trees = tmp_path / "trees.jsonl"
    with TreesWriter(trees) as w:
        for i in range(3):
            w.write(tree_record({"question": f"How many times {i}?", "answer": "16"}, str(i), tree(f"How many times {i}?")))
    calls: list[tuple[str, str]] = []
    threads: set[str] = set()

    def judge(gold: str, answer: str) -> bool:
        calls.append((gold, answer))
        threads.add(threading.current_thread().name)
        return gold == answer

    assert export_sft(trees, tmp_path / "sft.jsonl", judge=judge) == 3
    assert sorted(calls) == sorted([("16", "16"), ("16", "34")] * 3)
    assert all(name.startswith("export-judge") for name in threads)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_bound() -> None:
    import random

    rng = random.Random(0)
    letters = "ab\u00e9\U0001f600\ud800"  # code points, a lone surrogate (from JSON) among them
    for _ in range(2000):
        a = "".join(rng.choice(letters) for _ in range(rng.randint(0, 60)))
        b = a[: rng.randint(0, len(a))] + "".join(rng.choice(letters) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.5:
            a, b = b, a
        for k in (0, 1, 2, 3, 5, 20, 40):
            assert edit_distance_at_least(a, b, k) == (levenshtein(a, b) >= k), (a, b, k)
    for k, far in ((2**63 - 1, False), (2**70, False), (-(2**70), True)):  # bounds past any text's length
        assert edit_distance_at_least("abcdef", "abcxyz", k) is far


def test_exports_do_not_depend_on_the_order_problems_finished(tmp_path: Path) -> None:
    """A pipelined search writes problems as they finish; the training data comes out in problem
    order, so the same search gives the same files whatever the timing."""
    outs = []
    for name, order in (("forward", ["2", "10", "x"]), ("finished", ["x", "10", "2"])):
        trees = tmp_path / name / "trees.jsonl"
        with TreesWriter(trees) as w:
            for pid in order:
                question = f"How many times? ({pid})"
                w.write(tree_record({"question": question, "answer": "16"}, pid, tree(question)))
        export_sft(trees, tmp_path / name / "sft.jsonl", judge=exact)
        export_pairs(trees, tmp_path / name / "pairs.jsonl")
        outs.append([(tmp_path / name / f).read_bytes() for f in ("sft.jsonl", "pairs.jsonl")])
    assert outs[0] == outs[1]
    queries = [json.loads(line)["query"] for line in (tmp_path / "forward" / "sft.jsonl").read_text().splitlines()]
    assert "(2)" in queries[0] and "(x)" in queries[-1]


def test_the_shards_of_a_run_export_as_the_whole_run_does(tmp_path: Path, caplog) -> None:
    """Several trees files (one per process of a sharded search) are read as one, in problem
    order across them; a trees file named as the output is refused."""
    def write(path: Path, ids: list[str]) -> Path:
        with TreesWriter(path) as w:
            for pid in ids:
                question = f"How many times? ({pid})"
                w.write(tree_record({"question": question, "answer": "16"}, pid, tree(question)))
        return path

    whole = write(tmp_path / "whole.jsonl", ["2", "10", "x", "3"])
    shards = [write(tmp_path / "s0.jsonl", ["x", "2"]), write(tmp_path / "s1.jsonl", ["10", "3"])]
    for export in (lambda src, out: export_sft(src, out, judge=exact), export_pairs):
        export(whole, tmp_path / "whole.out")
        export(shards, tmp_path / "shards.out")
        assert (tmp_path / "whole.out").read_bytes() == (tmp_path / "shards.out").read_bytes()
    with pytest.raises(ExportError, match="s1.jsonl: is a trees file being exported"):
        export_pairs(shards, shards[1])
    # a problem in two files is read from each (two runs of it), and said: shards never share one
    both = write(tmp_path / "both.jsonl", ["3", "7"])
    with caplog.at_level("WARNING", logger="rstar_fast.search.records"):
        export_pairs([shards[1], both], tmp_path / "two_runs.jsonl")
    assert caplog.text.count("have trees in more than one of the files given") == 1
    assert "1 problem(s)" in caplog.text and "3 (" in caplog.text and "s1.jsonl" in caplog.text
    caplog.clear()
    other = tmp_path / "other.jsonl"  # another problem set numbered alike: no warning
    with TreesWriter(other) as w:
        w.write(tree_record({"question": "Another question", "answer": "16"}, "3", tree("Another question")))
    with caplog.at_level("WARNING", logger="rstar_fast.search.records"):
        export_pairs([shards[1], other], tmp_path / "two_sets.jsonl")
    assert "more than one of the files" not in caplog.text
    with pytest.raises(ExportError, match="missing.jsonl: no such file"):
        export_pairs([shards[0], tmp_path / "missing.jsonl"], tmp_path / "out.jsonl")


def test_sft_reads_the_gold_under_any_alias_the_search_accepts() -> None:
    for key in ("answer", "gt", "ground_truth", "final_answer"):
        rec = tree_record({"question": "How many times?", key: "16"}, "0", tree())
        assert len(sft_records(rec, exact, n=2)) == 1, key
    rec = tree_record({"question": "How many times?", "gt": [16.0]}, "0", tree())  # as the loader reads it
    assert len(sft_records(rec, exact, n=2)) == 1


def test_only_an_answer_makes_a_path_right_or_wrong() -> None:
    """As the reference's extraction counts them: a path that ended too deep or unparsable (-1
    on itself in round 1) is no wrong answer, so its step is no negative."""
    from rstar_fast.search.steps import NO_VALID_CHILD, TOO_MANY_STEPS

    parents = [-1, 0, 0, 1]
    texts = ["", S1A, S1B, S2A + ANS_OK]
    q = [0.0, 1.0, -1.0, 1.0]
    for failed in (TOO_MANY_STEPS, NO_VALID_CHILD):
        rstar = build_rstar_dict(parents, texts, q, q, [2, 1, 1, 1], ["", "", failed, "16"], "Q")
        assert pair_records({"question": "Q", "rstar": rstar}, final_pairs=0) == []
    # the same step, ending in a wrong answer, is one
    rstar = build_rstar_dict(parents, texts[:2] + [S1B + ANS_BAD, texts[3]], q, q, [2, 1, 1, 1],
                             ["", "", "34", "16"], "Q")
    pairs = pair_records({"question": "Q", "rstar": rstar}, final_pairs=0)
    assert [(p["pos"], p["neg"]) for p in pairs] == [(S1A, S1B + ANS_BAD)]


def test_an_empty_completion_is_never_a_pair_side() -> None:
    """An empty completion (-1 on itself) ends its path without an answer: no wrong step, and
    never a pair's side (`train ppm` refuses an empty one); its sibling is paired with the
    wrong answer's step instead."""
    from rstar_fast.search.steps import NO_VALID_CHILD

    parents = [-1, 0, 0, 0, 1]
    texts = ["", S1A, "", S1B, S2A + ANS_OK]
    q = [0.0, 1.0, -1.0, -1.0, 1.0]
    answers = ["", "", NO_VALID_CHILD, "34", "16"]
    rstar = build_rstar_dict(parents, texts, q, q, [3, 1, 1, 1, 1], answers, "Q")
    pairs = pair_records({"question": "Q", "rstar": rstar}, final_pairs=0)
    assert [(p["pos"], p["neg"], p["neg_count"]) for p in pairs] == [(S1A, S1B, 1)]


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update({"0": 5}), "rstar has no root node '0'"),
    (lambda r: r["0.1"].update(text=7), "node 0.1: text must be a string, got 7"),
    (lambda r: r["0.2"].update(q_value=[1]), "node 0.2: q_value must be a number, got [1]"),
    (lambda r: r["0.2"].update(q_value="x"), "node 0.2: q_value must be a number, got 'x'"),
    (lambda r: r["0.1"].update(visit_count=1.5), "node 0.1: visit_count must be an integer, got 1.5"),
    (lambda r: r.update({"0.x": {"text": "a"}}), "node '0.x': not a node tag"),
])
def test_a_malformed_tree_names_the_problem_and_node(tmp_path: Path, change, expected) -> None:
    from rstar_fast.search.export import ExportError

    rec = record()
    change(rec["rstar"])
    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(rec) + "\n")
    for export in (export_sft, export_pairs):
        with pytest.raises(ExportError) as err:
            export(trees, tmp_path / "out.jsonl")
        assert f"{trees}: problem 0: {expected}" in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_text_utf8_cannot_hold_is_named(tmp_path: Path) -> None:
    from rstar_fast.search.export import ExportError

    question = "How many \ud83d times?"
    rec = tree_record({"question": question, "answer": "16"}, "0", tree(question))
    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(rec) + "\n")  # an escaped lone surrogate: valid JSON, ASCII
    with pytest.raises(ExportError, match="problem 0: text that UTF-8 cannot hold"):
        export_sft(trees, tmp_path / "sft.jsonl")


def test_sft_keeps_a_questions_top_traces_over_all_its_records(tmp_path: Path) -> None:
    """As the reference's sample_sft_data.py groups traces by question: a question searched
    twice gives its n best traces, not n per search."""
    better = tree()
    alt = "<code>\n# Step 1: the better start\ntotal = 480\n<end_of_step>"
    better["0.1"].update(text=alt, q_value=1.0)
    better["0.1.1"]["q_value"] = 1.0  # its correct trace: mean Q 1.0 against 0.9
    recs = [tree_record({"question": "How many times?", "answer": "16"}, "0", tree()),
            tree_record({"question": "Other?", "answer": "16"}, "1", tree("Other?")),
            tree_record({"question": "How many times?", "answer": "16"}, "2", better)]
    trees = tmp_path / "trees.jsonl"
    trees.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert export_sft(trees, tmp_path / "sft.jsonl", n=1, judge=exact) == 2
    out = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [(r["query"], r["response"]) for r in out] == [
        ("How many times?", (alt + S2A + ANS_OK).strip()), ("Other?", (S1A + S2A + ANS_OK).strip())]


def test_sft_export_memory_does_not_grow_with_the_text_it_keeps(tmp_path: Path) -> None:
    """The kept traces wait in a temporary file, not in memory, until every record is read:
    the export's peak memory grows by what it notes per question (where its traces are, their
    scores), not by the 30 KB of each trace. Measured as growth from 100 to 400 questions,
    since the constant part differs between Python versions (1.4 MB on 3.11, 2.6 MB on 3.13)."""
    import tracemalloc

    long_step = "<code>\n# Step 1: " + "a long comment " * 2000 + "\ntotal = 480\n<end_of_step>"  # 30 KB

    def peak_of_export(count: int) -> int:
        trees, out = tmp_path / f"trees{count}.jsonl", tmp_path / f"sft{count}.jsonl"
        with TreesWriter(trees) as w:
            for i in range(count):
                rstar = tree(f"Question {i}?")
                rstar["0.1"]["text"] = long_step
                w.write(tree_record({"question": f"Question {i}?", "answer": "16"}, str(i), rstar))
        tracemalloc.start()
        try:
            assert export_sft(trees, out, n=2, judge=exact) == count
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    grown = peak_of_export(400) - peak_of_export(100)
    assert grown < 1_500_000, grown  # the 300 more kept traces are 9 MB of text
    first = json.loads((tmp_path / "sft400.jsonl").read_text().splitlines()[0])
    assert first == {"query": "Question 0?", "response": (long_step + S2A + ANS_OK).strip()}


def test_sft_export_sets_traces_aside_beside_its_output(tmp_path: Path, monkeypatch) -> None:
    """On the output's disk, not in the system's temporary folder (often a small tmpfs); a full
    disk there is said as the export's own write error, naming the output."""
    import errno
    import tempfile

    import rstar_fast.search.export as export

    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(record()) + "\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such folder"))
    assert export_sft(trees, tmp_path / "out" / "sft.jsonl", judge=exact) == 1

    class FullDisk:
        def seek(self, *a: object) -> int:
            return 0

        def write(self, data: bytes = b"") -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        close = write  # closing flushes what is buffered: it fails as well

    monkeypatch.setattr(export.tempfile, "TemporaryFile", lambda **kw: FullDisk())
    with pytest.raises(ExportError, match="sft2.jsonl: cannot write the export: No space left on device"):
        export_sft(trees, tmp_path / "out" / "sft2.jsonl", judge=exact)
    assert not (tmp_path / "out" / "sft2.jsonl").exists()


def test_sft_reads_which_steps_failed_from_the_tree() -> None:
    """A tree that records failures (`code_error` on every node) decides by them, not by the
    word "error" in the text; a malformed flag is named with its node."""
    rstar = build_rstar_dict([-1, 0, 0, 1, 2], ["", S1A, S1B + "\nprint('error')", ANS_OK, ANS_OK], [0.0] * 5,
                             [0.0, 0.5, 0.9, 1.0, 1.0], [1] * 5, ["", "", "", "16", "16"], "How many times?",
                             extra={"code_error": [False, True, False, False, False]})
    rec = tree_record({"question": "How many times?", "answer": "16"}, "0", rstar)
    assert [r["response"] for r in sft_records(rec, exact, n=2)] == [(S1B + "\nprint('error')" + ANS_OK).strip()]
    rec["rstar"]["0.1"]["code_error"] = 1
    with pytest.raises(ExportError, match="node 0.1: code_error must be true or false"):
        sft_records(rec, exact, n=2)


def test_a_step_never_expanded_is_no_outcome_whatever_its_ppm_score() -> None:
    """In rounds 2-4 a step never expanded keeps its PPM score as Q, which a saturated PPM makes
    exactly +1 or -1: it is neither a correct nor a wrong leaf (the reference counts answers)."""
    step = "<code>\n# Step 1: a step that was scored and never expanded\nx = 1\n<end_of_step>"
    rstar = build_rstar_dict([-1, 0, 0, 0, 0], ["", ANS_OK, step, step.replace("x = 1", "y = 2"), ANS_BAD],
                             [0.0] * 5, [0.0, 1.0, 1.0, -1.0, -1.0], [4, 1, 1, 1, 1], ["", "16", "", "", "34"],
                             "How many times?")
    rec = tree_record({"question": "How many times?", "answer": "16"}, "0", rstar)
    pairs = pair_records(rec, min_margin=0.5, min_edit_distance=0, final_pairs=0)
    assert [(p["pos"], p["neg"], p["pos_count"], p["neg_count"]) for p in pairs] == [(ANS_OK, ANS_BAD, 1, 1)]


def _step(name: str) -> str:
    """A step far enough (by edit distance) from any other name's."""
    return f"<code>\n# Step: {name} " + name * 25 + f"\n{name} = 1\n<end_of_step>"


def _tree(spec: list[tuple[int, str, float, str]]) -> dict:
    """A record from (parent index, text, Q, final answer) per node; index 0 is the root."""
    parents = [-1] + [p for p, *_ in spec]
    q = [0.0] + [x for _, _, x, _ in spec]
    rstar = build_rstar_dict(parents, [""] + [t for _, t, _, _ in spec], q, q, [1] * len(parents),
                             [""] + [a for *_, a in spec], "How many times?")
    return tree_record({"question": "How many times?", "answer": "16"}, "0", rstar)


def test_sft_ranks_traces_by_mean_step_q_then_by_the_lowest() -> None:
    a, b, c, d = (_step(n) for n in "abcd")
    rec = _tree([(0, a, 0.0, ""), (1, ANS_OK, 1.0, "16"),                        # mean 0.5, lowest 0.0
                 (0, b, 0.2, ""), (3, ANS_OK, 0.8, "16"),                        # mean 0.5, lowest 0.2
                 (0, c, 1.0, ""), (5, d, -0.2, ""), (6, ANS_OK, 1.0, "16")])     # mean 0.6
    assert [r["response"] for r in sft_records(rec, exact, n=2)] == [(c + d + ANS_OK).strip(), (b + ANS_OK).strip()]


def test_export_sft_takes_the_top_two_then_drops_those_with_errors(tmp_path: Path) -> None:
    """As the reference: the best two traces, less any with an error (not the best two clean)."""
    a, b, c = _step("a"), _step("b") + "\nprint('error')", _step("c")
    rec = _tree([(0, a, 0.9, ""), (1, ANS_OK, 1.0, "16"), (0, b, 0.8, ""), (3, ANS_OK, 1.0, "16"),
                 (0, c, 0.1, ""), (5, ANS_OK, 1.0, "16")])
    with TreesWriter(tmp_path / "trees.jsonl") as w:
        w.write(rec)
    export_sft(tmp_path / "trees.jsonl", tmp_path / "sft.jsonl", judge=exact)
    got = [json.loads(line)["response"] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert got == [(a + ANS_OK).strip()]
    rec["rstar"]["0.2"]["text"] = _step("b")  # all clean: two by default
    with TreesWriter(tmp_path / "clean.jsonl") as w:
        w.write(rec)
    export_sft(tmp_path / "clean.jsonl", tmp_path / "sft2.jsonl", judge=exact)
    assert len((tmp_path / "sft2.jsonl").read_text().splitlines()) == 2


def _pairs(spec: list[tuple[int, str, float, str]], **kw) -> list[tuple[str, str, int, int]]:
    kw.setdefault("final_pairs", 0)
    return [(p["pos"], p["neg"], p["pos_count"], p["neg_count"]) for p in pair_records(_tree(spec), **kw)]


def test_an_answer_is_correct_only_at_q_exactly_one() -> None:
    """An evaluation's answer holds its PPM value, 0.95 say: neither correct nor wrong."""
    assert _pairs([(0, _step("c") + ANS_OK, 0.95, "16"), (0, _step("r") + ANS_BAD, -1.0, "34")]) == []


def test_a_lone_positive_pairs_with_up_to_four_negatives() -> None:
    spec = [(0, _step("c"), 1.0, ""), (1, ANS_OK, 1.0, "16")]
    for i, name in enumerate("rstuv"):
        spec += [(0, _step(name), -0.5 - 0.1 * i, ""), (len(spec) + 1, ANS_BAD, -1.0, "34")]
    got = _pairs(spec)
    assert [g[1] for g in got] == [_step(n) for n in "vuts"] and {g[3] for g in got} == {4}


def test_no_pair_without_a_positive_q_margin() -> None:
    spec = [(0, _step("c"), 0.0, ""), (1, ANS_OK, 1.0, "16"), (0, _step("r"), 0.0, ""), (3, ANS_BAD, -1.0, "34")]
    assert _pairs(spec, min_margin=0.0) == []


@pytest.mark.parametrize("spec, paired", [
    # continuations -0.125 and -0.125: not strictly better
    ([(0, "c", 0.5, ""), (1, "a", -1.0, ""), (2, "b", -1.0, ""), (3, ANS_OK, 1.0, "16"),
      (0, "r", 0.0, ""), (5, "x", 0.625, ""), (6, ANS_BAD, -1.0, "34")], False),
    # a margin of 0.5, but the continuations are -0.0625 against 0.25
    ([(0, "c", 0.75, ""), (1, "a", -1.0, ""), (2, "b", -1.0, ""), (3, ANS_OK, 1.0, "16"),
      (0, "r", 0.25, ""), (5, "x", 0.875, ""), (6, "y", 0.875, ""), (7, ANS_BAD, -1.0, "34")], False),
    # the best continuation follows the highest Q child: 0.875 > 0.3125 (0.25 through the lowest)
    ([(0, "c", 0.75, ""), (1, ANS_OK, 1.0, "16"), (1, "l", -1.0, ""), (3, ANS_OK, 1.0, "16"),
      (0, "r", 0.25, ""), (5, "x", 1.0, ""), (6, "y", 1.0, ""), (7, ANS_BAD, -1.0, "34")], True),
    # the continuation counts the step itself: 0 > -0.0625 (without it -1/3 < -0.25)
    ([(0, "c", 1.0, ""), (1, "a", -1.0, ""), (2, "b", -1.0, ""), (3, ANS_OK, 1.0, "16"),
      (0, "r", 0.5, ""), (5, "x", 1.0, ""), (6, "y", -0.75, ""), (7, ANS_BAD, -1.0, "34")], True),
])
def test_a_pair_needs_the_positive_s_best_continuation_above_the_negative_s_worst(spec, paired) -> None:
    spec = [(p, _step(t) if len(t) == 1 else t, q, a) for p, t, q, a in spec]
    assert _pairs(spec) == ([(_step("c"), _step("r"), 1, 1)] if paired else [])
