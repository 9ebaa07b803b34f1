"""The seeded synthetic word-problem generator."""

from __future__ import annotations

import pytest

from rstar_fast.synthetic import (
    OPS,
    SyntheticError,
    apply_op,
    generate_problems,
    parse_question,
    solution_of,
    split_problems,
    train_test_problems,
)


def _solve(solution: list[list]) -> int:
    value = solution[0][1]
    for kind, n, *_ in solution[1:]:
        value = apply_op(OPS[kind].symbol, value, n)
    assert value == int(value)  # every division of a right path is exact
    return int(value)


def test_records_have_the_shared_data_format_and_right_answers() -> None:
    problems = generate_problems(300, seed=3)
    assert [p["index"] for p in problems] == list(range(300))
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        assert set(p) >= {"index", "question", "answer", "n_steps", "solution"}
        assert isinstance(p["answer"], str)
        assert int(p["answer"]) == _solve(p["solution"]) > 0
        assert p["n_steps"] == len(p["solution"])
        assert 2 <= p["n_steps"] <= 6
        assert len(p["question"]) < 320
    assert {p["n_steps"] for p in problems} == {2, 3, 4, 5, 6}


def test_seeded_and_prefix_stable() -> None:
    assert generate_problems(50, seed=7) == generate_problems(50, seed=7)
    assert generate_problems(20, seed=7) == generate_problems(50, seed=7)[:20]
    assert generate_problems(20, seed=7) != generate_problems(20, seed=8)


@pytest.mark.parametrize(("difficulty", "steps"), [("easy", {2, 3}), ("hard", {5, 6}), (4, {4})])
def test_difficulty(difficulty: str | int, steps: set[int]) -> None:
    assert {p["n_steps"] for p in generate_problems(60, seed=1, difficulty=difficulty)} <= steps


def test_bad_arguments() -> None:
    with pytest.raises(SyntheticError, match="difficulty"):
        generate_problems(3, difficulty="impossible")
    with pytest.raises(SyntheticError, match="2..6"):
        generate_problems(3, difficulty=9)
    with pytest.raises(SyntheticError, match="test_fraction"):
        split_problems(generate_problems(3), test_fraction=1.5)
    # counts: a negative one would have shifted problems from one split to the other
    for call, match in [(lambda: generate_problems(-1), "n "), (lambda: generate_problems("3"), "'3'"),
                        (lambda: train_test_problems(-1, 2), "n_train"), (lambda: train_test_problems(5, -2), "n_test")]:
        with pytest.raises(SyntheticError, match=match):
            call()
    import numpy as np

    assert [len(s) for s in train_test_problems(np.int64(3), 2)] == [3, 2]  # a count from numpy is one


@pytest.mark.parametrize("recall", [0.0, 0.6])
def test_questions_parse_back_to_their_solution(recall: float) -> None:
    for p in generate_problems(200, seed=11, recall=recall):
        problem = parse_question(p["question"])
        assert problem is not None, p["question"]
        assert solution_of(problem) == p["solution"]
        assert str(problem.answer) == p["answer"]
        assert problem.question() == p["question"]
    assert parse_question("What is 2 + 2?") is None
    assert parse_question("Mia has 3 apples. She sings. How many apples does Mia have now?") is None


def test_splits_are_disjoint_and_seeded() -> None:
    problems = generate_problems(100, seed=2)
    train, test = split_problems(problems, test_fraction=0.25, seed=5)
    assert len(test) == 25 and len(train) == 75
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert split_problems(problems, 0.25, seed=5) == (train, test)
    tr, te = train_test_problems(40, 10, seed=4)
    assert len(tr) == 40 and len(te) == 10
    assert not {p["question"] for p in tr} & {p["question"] for p in te}


def test_recalled_amounts_restate_an_earlier_operation() -> None:
    problems = generate_problems(300, seed=4, recall=0.5)
    assert generate_problems(40, seed=4) != problems[:40]  # its own seeded stream
    recalled = [op for p in problems for op in p["solution"][1:] if len(op) == 3]
    assert len(recalled) > 150
    assert {op[2] for op in recalled} == {"start", "buy", "find", "give", "lose"}
    for p in problems:
        _solve(p["solution"])
        for i, op in enumerate(p["solution"][1:], start=1):
            if len(op) == 3:
                earlier = [o for o in p["solution"][:i] if o[0] == op[2]]
                assert len(earlier) == 1 and earlier[0][1] == op[1]  # unambiguous, same amount
    assert all(len(op) == 2 for p in generate_problems(100, seed=4) for op in p["solution"])
    # recall 0 draws nothing extra: the plain family's problems stay what they always were
    assert generate_problems(3, seed=0)[2]["question"] == (
        "Zoe has 50 books. She gives away 13. She finds 25 more. How many books does Zoe have now?")


def test_recall_sentences_parse_only_when_the_amount_is_pinned_down() -> None:
    q = "Mia has 9 apples. She finds 4 more. She gives away as many as she found. How many apples does Mia have now?"
    problem = parse_question(q)
    assert problem is not None and problem.answer == 9
    assert solution_of(problem) == [["start", 9], ["find", 4], ["give", 4, "find"]]
    assert problem.question() == q
    # nothing found yet, or found twice: the sentence names no single amount
    assert parse_question("Mia has 9 apples. She gives away as many as she found. "
                          "How many apples does Mia have now?") is None
    assert parse_question("Mia has 9 apples. She finds 4 more. She finds 2 more. She gives away as many as "
                          "she found. How many apples does Mia have now?") is None
    with pytest.raises(SyntheticError, match="recall"):
        generate_problems(3, recall=1.5)
