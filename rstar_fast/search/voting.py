"""Test-time answer selection, with the reference's evaluation (`eval_maj.py`) rules.

Each trajectory answers with its best-PPM answer. The search's trajectories are the rollouts of
one tree; `eval_maj.py`'s are independent runs, each answering with its tree's best answer (with
one run, that is the `best` vote). Across trajectories the answers are sorted by PPM score and
the top K (4) vote: an answer's count is how many of the K are equivalent to it, its weight the
sum of their scores. Majority voting
picks the highest count, PPM-weighted voting the highest weight. Ties: the reference draws
majority ties at random; here the higher-scored answer wins, so results are reproducible.
Equivalence is `grade` in both directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Equiv = Callable[[str, str], bool]


@dataclass(frozen=True, slots=True)
class Candidate:
    answer: str
    score: float  # PPM score of the answer node


def best_answer(candidates: Iterable[Candidate]) -> Candidate | None:
    """A trajectory's answer: its highest-scored one (the first on ties), None when it has none."""
    best: Candidate | None = None
    for c in candidates:
        if best is None or c.score > best.score:
            best = c
    return best


def _default_equiv() -> Equiv:
    from rstar_fast.search.grading import answers_equivalent

    return answers_equivalent


@dataclass(frozen=True)
class Vote:
    answer: str  # the selected answer
    count: int  # top-K answers equivalent to it
    weight: float  # sum of their scores


def _tally(cands: Sequence[Candidate], equiv: Equiv) -> list[Vote]:
    """Each candidate's votes. Equivalence is symmetric, so each pair of answers is compared
    once (a comparison may take the grader's whole time limit)."""
    seen: dict[tuple[str, str], bool] = {}

    def same_answer(a: str, b: str) -> bool:
        if a == b:
            return True
        key = (a, b) if a < b else (b, a)
        if key not in seen:
            seen[key] = equiv(a, b)
        return seen[key]

    votes = []
    for c in cands:
        same = [o for o in cands if same_answer(c.answer, o.answer)]
        votes.append(Vote(c.answer, len(same), sum(o.score for o in same)))
    return votes


def top_k(candidates: Iterable[Candidate], k: int) -> list[Candidate]:
    """The k highest-scored candidates (stable: earlier first on ties)."""
    return sorted(candidates, key=lambda c: c.score, reverse=True)[:k]


def _top_votes(candidates: Iterable[Candidate], k: int, equiv: Equiv | None) -> list[Vote]:
    """The votes of the top-k answers by score, highest-scored first."""
    return _tally(top_k(candidates, k), equiv or _default_equiv())


def _most_counted(votes: list[Vote]) -> Vote | None:
    return max(votes, key=lambda v: v.count) if votes else None  # max keeps the first (highest-scored) on ties


def _most_weighted(votes: list[Vote]) -> Vote | None:
    return max(votes, key=lambda v: v.weight) if votes else None


def majority_vote(candidates: Iterable[Candidate], k: int = 4, equiv: Equiv | None = None) -> Vote | None:
    """Majority vote over the top-k answers by score."""
    return _most_counted(_top_votes(candidates, k, equiv))


def weighted_vote(candidates: Iterable[Candidate], k: int = 4, equiv: Equiv | None = None) -> Vote | None:
    """PPM-weighted vote over the top-k answers by score."""
    return _most_weighted(_top_votes(candidates, k, equiv))


def evaluate(gold: Any, trajectories: Sequence[Candidate | None], k: int = 4,
             grade: Callable[[Any, Any], bool] | None = None,
             equiv: Equiv | None = None) -> dict[str, Any]:
    """One problem's test-time answers and, with a gold answer, their correctness.

    `trajectories` holds each trajectory's answer (`best_answer`), None when it found none.
    Returns pass@1 (best-scored answer), pass@n (any), majority and weighted votes over the
    top k: `{"best", "majority", "weighted", "pass1", "passn", "maj", "wmaj"}` (the last four
    only when gold is given).
    """
    cands = [c for c in trajectories if c is not None]
    best = top_k(cands, 1)[0].answer if cands else None
    votes = _top_votes(cands, k, equiv)  # one tally for both votes
    maj, wmaj = _most_counted(votes), _most_weighted(votes)
    out: dict[str, Any] = {
        "best": best,
        "majority": maj.answer if maj else None,
        "weighted": wmaj.answer if wmaj else None,
    }
    if gold is not None:
        if grade is None:
            from rstar_fast.search.grading import grade as grade_fn

            grade = grade_fn
        ok = lambda a: a is not None and grade(gold, a)  # noqa: E731
        out.update(pass1=ok(best), passn=any(grade(gold, c.answer) for c in cands),
                   maj=ok(out["majority"]), wmaj=ok(out["weighted"]))
    return out


__all__ = ["Candidate", "Vote", "best_answer", "top_k", "majority_vote", "weighted_vote", "evaluate"]
