"""Seeded multi-step arithmetic word problems with answers.

The search's built-in problem source (no `--problems`) and the miniature run's data. Every
problem follows one person's stock of one kind of item through 1 to 5 operations, one short
sentence each:

    Mia has 12 apples. She buys 5 more. She gives away 3. She splits them into 2 equal
    groups and keeps one group. How many apples does Mia have now?

so a solution has 2 to 6 reasoning steps (the starting amount, then one per operation) plus
the final print. Questions are regular enough to be parsed back (`parse_question`), which is
how the simulated engine knows the structured solution of any synthetic question it is shown,
and short enough for a tiny transformer to learn the steps in minutes on a CPU. All values are
positive integers and every division is exact, so the answer is an integer.
"""

from __future__ import annotations

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


OPS: dict[str, OpKind] = {
    op.name: op
    for op in (
        OpKind("buy", "{P} buys {n} more.", "+",
               ("{N} buys {n} more {item}", "Add the {n} {item} {N} buys")),
        OpKind("find", "{P} finds {n} more.", "+",
               ("{N} finds {n} more {item}", "Add the {n} {item} {N} finds")),
        OpKind("give", "{P} gives away {n}.", "-",
               ("{N} gives away {n} {item}", "Subtract the {n} {item} {N} gives away")),
        OpKind("lose", "{P} loses {n}.", "-",
               ("{N} loses {n} {item}", "Subtract the {n} {item} {N} loses")),
        OpKind("times", "{P} ends up with {n} times as many.", "*",
               ("{N} ends up with {n} times as many {item}", "Multiply the {item} by {n}")),
        OpKind("split", "{P} splits them into {n} equal groups and keeps one group.", "//",
               ("{N} keeps one of {n} equal groups", "Divide the {item} into {n} equal groups")),
    )
}
START_COMMENTS: tuple[str, ...] = ("{N} starts with {n} {item}", "{N} has {n} {item} at first")

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

    def values(self) -> list[int]:
        """The running amount after each reasoning step (start first)."""
        out = [self.start]
        for kind, n in self.ops:
            out.append(apply_op(OPS[kind].symbol, out[-1], n))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        pronoun = NAMES.get(self.name, "They")
        parts = [f"{self.name} has {self.start} {self.item}."]
        parts += [OPS[kind].sentence.format(P=pronoun, n=n) for kind, n in self.ops]
        parts.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(parts)


def apply_op(symbol: str, value: int, n: int) -> int:
    """Apply one step's operator as Python would run the step's code."""
    if symbol == "+":
        return value + n
    if symbol == "-":
        return value - n
    if symbol == "*":
        return value * n
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


def random_problem(rng: random.Random, n_steps: int) -> WordProblem:
    """One problem with `n_steps` reasoning steps (the start plus n_steps - 1 operations)."""
    name = rng.choice(tuple(NAMES))
    item = rng.choice(ITEMS)
    start = rng.randint(2, 50)
    value = start
    ops: list[tuple[str, int]] = []
    for _ in range(n_steps - 1):
        kind, n = _random_op(rng, value)
        ops.append((kind, n))
        value = apply_op(OPS[kind].symbol, value, n)
    return WordProblem(name, item, start, tuple(ops))


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
    n: int, seed: int = 0, difficulty: str | int = "mixed"
) -> list[dict[str, Any]]:
    """`n` distinct problems as records in the format of ../shared/data/*.json.

    Each record has `index`, `question`, `answer` (the integer answer as a string), and the
    structure: `n_steps` (reasoning steps, 2-6) and `solution` (`[["start", 12], ["buy", 5],
    ...]`). The same (n, seed, difficulty) always gives the same list, and a longer list
    starts with the shorter one.
    """
    if n < 0:
        raise SyntheticError(f"number of problems must be >= 0, got {n}")
    choices = _steps_choices(difficulty)
    rng = random.Random(f"rstar_fast.synthetic:{seed}:{difficulty}")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        problem = random_problem(rng, rng.choice(choices))
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
                "solution": [["start", problem.start], *[[k, v] for k, v in problem.ops]],
            }
        )
    return out


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


def train_test_problems(
    n_train: int, n_test: int, seed: int = 0, difficulty: str | int = "mixed"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`n_train` training and `n_test` held-out problems, disjoint, from one seeded stream."""
    problems = generate_problems(n_train + n_test, seed, difficulty)
    return problems[:n_train], problems[n_train:]


# -- parsing a question back -----------------------------------------------------------

def _sentence_regex(template: str) -> str:
    pattern = re.escape(template)
    return pattern.replace(re.escape("{P}"), r"(?:He|She|They)").replace(re.escape("{n}"), r"(\d+)")


_OP_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (op.name, re.compile(_sentence_regex(op.sentence))) for op in OPS.values()
)
_HEAD = re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+)\.")
_TAIL = re.compile(r" How many ([a-z]+) does ([A-Z][a-z]+) have now\?$")


def parse_question(question: str) -> WordProblem | None:
    """The structured problem behind a synthetic question, or None for any other text."""
    question = question.strip()
    head = _HEAD.match(question)
    tail = _TAIL.search(question)
    if head is None or tail is None or head.group(3) != tail.group(1):
        return None
    if head.group(1) != tail.group(2):
        return None
    body = question[head.end() : tail.start()].strip()
    ops: list[tuple[str, int]] = []
    pos = 0
    while pos < len(body):
        if body[pos] == " ":
            pos += 1
            continue
        for kind, pattern in _OP_PATTERNS:
            m = pattern.match(body, pos)
            if m:
                ops.append((kind, int(m.group(1))))
                pos = m.end()
                break
        else:
            return None
    if not ops:
        return None
    return WordProblem(head.group(1), head.group(3), int(head.group(2)), tuple(ops))


__all__ = [
    "SyntheticError",
    "WordProblem",
    "generate_problems",
    "parse_question",
    "split_problems",
    "train_test_problems",
]
