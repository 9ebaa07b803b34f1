"""Test-time voting: best-PPM answer per trajectory, top-K majority and weighted votes."""

from __future__ import annotations

from rstar_fast.search.config import SearchConfig, get_preset
from rstar_fast.search.voting import Candidate, best_answer, evaluate, majority_vote, weighted_vote


def eq(a: str, b: str) -> bool:
    return a.replace(".0", "") == b.replace(".0", "")


def test_best_answer() -> None:
    assert best_answer([Candidate("1", 0.2), Candidate("2", 0.9), Candidate("3", 0.9)]) == Candidate("2", 0.9)
    assert best_answer([]) is None


def test_majority_and_weighted() -> None:
    cands = [Candidate("5", 0.9), Candidate("7", 0.8), Candidate("7.0", 0.3), Candidate("5", 0.1),
             Candidate("7", 0.05)]
    # top 4: 5 (0.9), 7 (0.8), 7.0 (0.3), 5 (0.1): 5 and 7 tie on count; higher score wins
    assert majority_vote(cands, k=4, equiv=eq).answer == "5"
    assert majority_vote(cands, k=5, equiv=eq).answer == "7"  # 7 x3 with the fifth
    w = weighted_vote(cands, k=4, equiv=eq)
    assert w.answer == "7" and abs(w.weight - 1.1) < 1e-9
    assert majority_vote([], equiv=eq) is None


def test_evaluate_with_gold() -> None:
    trajs = [Candidate("5", 0.9), None, Candidate("7", 0.8), Candidate("7", 0.7)]
    r = evaluate("7", trajs, k=4, grade=eq, equiv=eq)
    assert r["best"] == "5" and r["majority"] == "7" and r["weighted"] == "7"
    assert (r["pass1"], r["passn"], r["maj"], r["wmaj"]) == (False, True, True, True)
    assert "pass1" not in evaluate(None, trajs, grade=eq, equiv=eq)


def test_default_equivalence_uses_grade() -> None:
    r = evaluate("\\frac{1}{2}", [Candidate("0.5", 0.4), Candidate("\\frac12", 0.3), Candidate("2", 0.9)])
    assert r["majority"] == "0.5" and r["maj"] is True and r["pass1"] is False


def test_each_pair_of_answers_is_compared_once() -> None:
    """A comparison may take the grader's whole time limit (5 s): four distinct answers cost 6
    comparisons, not the 24 of each ordered pair for each of the two votes."""
    asked: list[tuple[str, str]] = []

    def counting(a: str, b: str) -> bool:
        asked.append((a, b))
        return eq(a, b)

    r = evaluate("7", [Candidate(a, 0.9 - 0.1 * i) for i, a in enumerate(["4", "5", "6", "7.0"])], k=4,
                 grade=eq, equiv=counting)
    assert r["majority"] == "4" and r["weighted"] == "4" and r["pass1"] is False and r["passn"] is True
    assert len(asked) == 6 and len({frozenset(p) for p in asked}) == 6


def test_pass_at_n_counts_every_trajectory_not_only_the_top_k() -> None:
    trajectories = [Candidate("1", 0.9), Candidate("2", 0.8), Candidate("3", 0.7), Candidate("4", 0.6),
                    Candidate("7", 0.1)]
    result = evaluate("7", trajectories, k=4, grade=eq, equiv=eq)
    assert result["passn"] is True and result["maj"] is False


def test_two_answers_are_one_when_either_grades_the_other_right() -> None:
    """grade(r"\\text{(C)} 12", "C") is false, the other way true: the vote groups them."""
    vote = majority_vote([Candidate("\\text{(C)} 12", 0.9), Candidate("C", 0.8), Candidate("D", 0.7)], k=4)
    assert vote.answer == "\\text{(C)} 12" and vote.count == 2


def test_the_vote_takes_the_top_four_as_the_reference_does() -> None:
    assert SearchConfig().top_k_vote == 4 and get_preset("eval").top_k_vote == 4
