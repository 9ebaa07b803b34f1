"""Seeded multi-step arithmetic word problems with answers.

The search's built-in problem source (no `--problems`) and the miniature run's data. Every
problem follows one person's stock of one kind of item through 1 to 5 operations, one short
sentence each:

    Mia has 12 apples. She buys 5 more. She gives away 3. She splits them into 2 equal
    groups and keeps one group. How many apples does Mia have now?

so a solution has 2 to 6 reasoning steps (the starting amount, then one per operation) plus
the final print. With `recall` > 0 some additions and subtractions restate an earlier amount
instead of giving a number ("She loses as many as she found."), so writing the step means
finding that amount in the question. Splits are written with true division, as a model writes
"split into equal groups": on a right path they are exact, and a wrong amount before a split
shows up as a fraction in the code's output.

Questions are regular enough to be parsed back (`parse_question`), which is how the simulated
engine knows the structured solution of any synthetic question it is shown, and short enough
for a tiny transformer to learn the steps in minutes on a CPU. All values are positive
integers and every division is exact, so the answer is an integer.
"""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# name -> subject pronoun
NAMES: dict[str, str] = {
    "Mia": "She", "Tom": "He", "Ava": "She", "Leo": "He", "Zoe": "She",
    "Sam": "He", "Lily": "She", "Ben": "He", "Emma": "She", "Jack": "He",
}
# plural nouns; each is also the variable name of the solution's code
ITEMS: tuple[str, ...] = (
    "apples", "marbles", "coins", "stickers", "books",
    "cards", "pencils", "shells", "stamps", "cookies",
)


@dataclass(frozen=True)
class OpKind:
    """One kind of operation: its sentence, the Python operator of its step, its comments."""

    name: str
    sentence: str  # {P}: pronoun, {n}: operand
    symbol: str  # operator in the step's code
    comments: tuple[str, ...]  # step comment variants; {N}: name, {n}: operand, {item}
    past: str = ""  # "{p} {past}" names this operation's amount later ("she found")
    recall_sentence: str = ""  # the same operation by an earlier amount; {P}, {p}, {past}
    recall_comments: tuple[str, ...] = ()  # {N}, {n}, {item}, {p}, {past}


OPS: dict[str, OpKind] = {
    op.name: op
    for op in (
        OpKind("buy", "{P} buys {n} more.", "+",
               ("{N} buys {n} more {item}", "Add the {n} {item} {N} buys"), "bought",
               "{P} buys as many more as {p} {past}.",
               ("{N} buys as many more {item} as {p} {past}: {n}", "Add {n} {item}, as many as {N} {past}")),
        OpKind("find", "{P} finds {n} more.", "+",
               ("{N} finds {n} more {item}", "Add the {n} {item} {N} finds"), "found",
               "{P} finds as many more as {p} {past}.",
               ("{N} finds as many more {item} as {p} {past}: {n}", "Add {n} {item}, as many as {N} {past}")),
        OpKind("give", "{P} gives away {n}.", "-",
               ("{N} gives away {n} {item}", "Subtract the {n} {item} {N} gives away"), "gave away",
               "{P} gives away as many as {p} {past}.",
               ("{N} gives away as many {item} as {p} {past}: {n}",
                "Subtract {n} {item}, as many as {N} {past}")),
        OpKind("lose", "{P} loses {n}.", "-",
               ("{N} loses {n} {item}", "Subtract the {n} {item} {N} loses"), "lost",
               "{P} loses as many as {p} {past}.",
               ("{N} loses as many {item} as {p} {past}: {n}", "Subtract {n} {item}, as many as {N} {past}")),
        OpKind("times", "{P} ends up with {n} times as many.", "*",
               ("{N} ends up with {n} times as many {item}", "Multiply the {item} by {n}")),
        OpKind("split", "{P} splits them into {n} equal groups and keeps one group.", "/",
               ("{N} keeps one of {n} equal groups", "Divide the {item} into {n} equal groups")),
    )
}
START_COMMENTS: tuple[str, ...] = ("{N} starts with {n} {item}", "{N} has {n} {item} at first")
START_PAST = "had at first"  # "as many as she had at first" recalls the starting amount

# difficulty name -> allowed numbers of reasoning steps (start + operations)
DIFFICULTIES: dict[str, tuple[int, ...]] = {
    "easy": (2, 3),
    "medium": (3, 4),
    "hard": (5, 6),
    "mixed": (2, 3, 4, 5, 6),
}
MAX_VALUE = 999  # intermediate values stay below this, so the code's numbers stay short


class SyntheticError(ValueError):
    """A bad argument to the problem generator (unknown difficulty, bad split fraction)."""


@dataclass(frozen=True)
class WordProblem:
    """A parsed synthetic problem: who, what, the starting amount and the operations."""

    name: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]  # (op kind name, operand)
    recalls: tuple[str | None, ...] = ()  # per op: the recalled operation ("start", "find", ...) or None

    def recall_of(self, i: int) -> str | None:
        return self.recalls[i] if i < len(self.recalls) else None

    def values(self) -> list[int]:
        """The running amount after each reasoning step (start first)."""
        out = [self.start]
        for kind, n in self.ops:
            out.append(int(apply_op(OPS[kind].symbol, out[-1], n)))  # a right path divides exactly
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def sentences(self) -> list[str]:
        """One sentence per operation, in order."""
        pronoun = NAMES.get(self.name, "They")
        out = []
        for i, (kind, n) in enumerate(self.ops):
            recalled = self.recall_of(i)
            if recalled is None:
                out.append(OPS[kind].sentence.format(P=pronoun, n=n))
            else:
                out.append(OPS[kind].recall_sentence.format(P=pronoun, p=pronoun.lower(), past=past_of(recalled)))
        return out

    def question(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item}.", *self.sentences()]
        parts.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(parts)


def past_of(kind: str) -> str:
    """How a sentence names an earlier amount: "had at first", "found", ..."""
    return START_PAST if kind == "start" else OPS[kind].past


def apply_op(symbol: str, value: int | float, n: int | float) -> int | float:
    """Apply one step's operator as Python would run the step's code."""
    if symbol == "+":
        return value + n
    if symbol == "-":
        return value - n
    if symbol == "*":
        return value * n
    if symbol == "/":
        return value / n
    if symbol == "//":
        return value // n
    raise ValueError(f"unknown operator {symbol!r}")


def _random_op(rng: random.Random, value: int) -> tuple[str, int]:
    """An operation that keeps the amount a positive integer below MAX_VALUE."""
    while True:
        kind = rng.choice(tuple(OPS))
        symbol = OPS[kind].symbol
        if symbol == "+":
            n = rng.randint(1, 30)
            if value + n <= MAX_VALUE:
                return kind, n
        elif symbol == "-":
            if value > 1:
                return kind, rng.randint(1, min(value - 1, 30))
        elif symbol == "*":
            n = rng.randint(2, 5)
            if value * n <= MAX_VALUE:
                return kind, n
        else:
            divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
            if divisors:
                return kind, rng.choice(divisors)


def _recallable(start: int, ops: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Earlier amounts a sentence can name unambiguously: the start, and each addition or
    subtraction kind that happened exactly once so far."""
    counts: dict[str, int] = {}
    amounts: dict[str, int] = {}
    for kind, n in ops:
        counts[kind] = counts.get(kind, 0) + 1
        amounts[kind] = n
    out = {"start": start}
    out.update({k: amounts[k] for k, c in counts.items() if c == 1 and OPS[k].past})
    return out


def _recall_op(rng: random.Random, value: int, start: int, ops: Sequence[tuple[str, int]]
               ) -> tuple[str, int, str] | None:
    """An addition or subtraction by an earlier amount that keeps the amount in range, if any."""
    by_recalled: dict[str, list[tuple[str, int, str]]] = {}
    for recalled, n in _recallable(start, ops).items():
        for kind, op in OPS.items():
            if op.recall_sentence and kind != recalled and 1 <= apply_op(op.symbol, value, n) <= MAX_VALUE:
                by_recalled.setdefault(recalled, []).append((kind, n, recalled))
    if not by_recalled:
        return None
    return rng.choice(by_recalled[rng.choice(sorted(by_recalled))])  # each recallable amount alike


def random_problem(rng: random.Random, n_steps: int, recall: float = 0.0) -> WordProblem:
    """One problem with `n_steps` reasoning steps (the start plus n_steps - 1 operations);
    each operation after the first restates an earlier amount with probability `recall`."""
    name = rng.choice(tuple(NAMES))
    item = rng.choice(ITEMS)
    start = rng.randint(2, 50)
    value = start
    ops: list[tuple[str, int]] = []
    recalls: list[str | None] = []
    for _ in range(n_steps - 1):
        # no draw at recall 0: the plain family keeps its historical problems
        chosen = _recall_op(rng, value, start, ops) if ops and recall and rng.random() < recall else None
        if chosen is None:
            kind, n = _random_op(rng, value)
            recalls.append(None)
        else:
            kind, n, recalled = chosen
            recalls.append(recalled)
        ops.append((kind, n))
        value = int(apply_op(OPS[kind].symbol, value, n))
    return WordProblem(name, item, start, tuple(ops), tuple(recalls))


def _steps_choices(difficulty: str | int) -> tuple[int, ...]:
    if isinstance(difficulty, int):
        if not 2 <= difficulty <= 6:
            raise SyntheticError(f"difficulty as a step count must be 2..6, got {difficulty}")
        return (difficulty,)
    if difficulty not in DIFFICULTIES:
        raise SyntheticError(
            f"unknown difficulty {difficulty!r}; expected one of {sorted(DIFFICULTIES)} or 2..6"
        )
    return DIFFICULTIES[difficulty]


def generate_problems(
    n: int, seed: int = 0, difficulty: str | int = "mixed", recall: float = 0.0
) -> list[dict[str, Any]]:
    """`n` distinct problems as records in the format of ../shared/data/*.json.

    Each record has `index`, `question`, `answer` (the integer answer as a string), and the
    structure: `n_steps` (reasoning steps, 2-6) and `solution` (`[["start", 12], ["buy", 5],
    ["give", 12, "start"], ...]`: an operation that restates an earlier amount names it third).
    `recall` is the probability that an operation restates an earlier amount. The same
    arguments always give the same list, and a longer list starts with the shorter one.
    """
    _check_count("n", n)
    if not 0 <= recall <= 1:
        raise SyntheticError(f"recall must be a probability in [0, 1], got {recall}")
    choices = _steps_choices(difficulty)
    # the plain family keeps its historical seed stream
    rng = random.Random(f"rstar_fast.synthetic:{seed}:{difficulty}" + (f":recall={recall}" if recall else ""))
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        problem = random_problem(rng, rng.choice(choices), recall)
        question = problem.question()
        if question in seen:
            continue
        seen.add(question)
        out.append(
            {
                "index": len(out),
                "question": question,
                "answer": str(problem.answer),
                "n_steps": 1 + len(problem.ops),
                "solution": solution_of(problem),
            }
        )
    return out


def solution_of(problem: WordProblem) -> list[list[Any]]:
    """The record's `solution`: `[["start", 12], ["buy", 5], ["give", 12, "start"], ...]`."""
    ops = [[k, n] if problem.recall_of(i) is None else [k, n, problem.recall_of(i)]
           for i, (k, n) in enumerate(problem.ops)]
    return [["start", problem.start], *ops]


def split_problems(
    problems: Sequence[dict[str, Any]], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded train/test split with no question on both sides; records keep their index."""
    if not 0 <= test_fraction <= 1:
        raise SyntheticError(f"test_fraction must be in [0, 1], got {test_fraction}")
    unique: dict[str, dict[str, Any]] = {}
    for record in problems:
        unique.setdefault(record["question"], record)
    records = list(unique.values())
    random.Random(f"rstar_fast.split:{seed}").shuffle(records)
    n_test = round(len(records) * test_fraction)
    test = sorted(records[:n_test], key=lambda r: r["index"])
    train = sorted(records[n_test:], key=lambda r: r["index"])
    return train, test


def _check_count(name: str, n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise SyntheticError(f"{name} (a number of problems) must be a whole number >= 0, got {n!r}")


def train_test_problems(
    n_train: int, n_test: int, seed: int = 0, difficulty: str | int = "mixed", recall: float = 0.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`n_train` training and `n_test` held-out problems, disjoint, from one seeded stream."""
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    problems = generate_problems(n_train + n_test, seed, difficulty, recall)
    return problems[:n_train], problems[n_train:]


# -- parsing a question back -----------------------------------------------------------

# "found" -> "find", "had at first" -> "start": what a recall sentence names
_KIND_OF_PAST = {past_of(k): k for k in ("start", *(k for k, op in OPS.items() if op.past))}


def _sentence_regex(template: str) -> str:
    """A sentence template as a regex: the operand and the recalled amount are its groups."""
    return (re.escape(template)
            .replace(re.escape("{P}"), r"(?:He|She|They)")
            .replace(re.escape("{p}"), r"(?:he|she|they)")
            .replace(re.escape("{n}"), r"(\d+)")
            .replace(re.escape("{past}"), "(" + "|".join(map(re.escape, _KIND_OF_PAST)) + ")"))


# (op kind, whether the sentence recalls an earlier amount, its regex); group 1 is the operand
# of a plain sentence and the recalled amount's name ("found") of a recall sentence
_SENTENCE_PATTERNS: tuple[tuple[str, bool, re.Pattern[str]], ...] = (
    *((op.name, False, re.compile(_sentence_regex(op.sentence))) for op in OPS.values()),
    *((op.name, True, re.compile(_sentence_regex(op.recall_sentence))) for op in OPS.values() if op.recall_sentence),
)
_HEAD = re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+)\.")
_TAIL = re.compile(r" How many ([a-z]+) does ([A-Z][a-z]+) have now\?$")


def parse_question(question: str) -> WordProblem | None:
    """The structured problem behind a synthetic question, or None for any other text
    (including a sentence that recalls an amount the question does not pin down)."""
    question = question.strip()
    head = _HEAD.match(question)
    tail = _TAIL.search(question)
    if head is None or tail is None or head.group(3) != tail.group(1):
        return None
    if head.group(1) != tail.group(2):
        return None
    start = int(head.group(2))
    body = question[head.end() : tail.start()].strip()
    ops: list[tuple[str, int]] = []
    recalls: list[str | None] = []
    pos = 0
    while pos < len(body):
        if body[pos] == " ":
            pos += 1
            continue
        for kind, is_recall, pattern in _SENTENCE_PATTERNS:
            m = pattern.match(body, pos)
            if m:
                break
        else:
            return None
        if is_recall:
            recalled = _KIND_OF_PAST[m.group(1)]
            amount = _recallable(start, ops).get(recalled)
            if amount is None:
                return None
            ops.append((kind, amount))
            recalls.append(recalled)
        else:
            ops.append((kind, int(m.group(1))))
            recalls.append(None)
        pos = m.end()
    if not ops:
        return None
    return WordProblem(head.group(1), head.group(3), start, tuple(ops), tuple(recalls))


__all__ = [
    "SyntheticError",
    "WordProblem",
    "generate_problems",
    "parse_question",
    "solution_of",
    "split_problems",
    "train_test_problems",
]
