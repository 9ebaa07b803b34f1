"""What the simulated policy writes and how the simulated PPM judges it.

Every question gets a *plan*: a chain of integer operations on one variable, with an expected
value after each reasoning step.
- Synthetic questions (`rstar_fast.synthetic`) are parsed back into their exact solution.
- Any other question gets a pseudo-plan derived from a hash of its text and the numbers it
  contains (2-5 steps); when its gold answer is registered, the final step prints the gold
  answer if the chain was computed right and a perturbed answer otherwise.
- A question the engine has never heard of still gets a plan; it prints the chain's value.

The plan depends only on the question text (and the registered gold), never on a seed, so the
policy and the PPM derive the same plan independently. Steps are written in the exact
rStar-Math format and their code is plain Python that really runs:

    <code>\\n# Step 1: Mia starts with 12 apples\\napples = 12\\n<end_of_step>
    \\n\\n# Step 2: Mia buys 5 more apples\\napples = apples + 5\\n<end_of_step>
    \\n\\n# Now print the final answer\\nprint(apples)\\n<end_of_code>
    \\n<output>17<end_of_output>                        (written by the executor, normally)
    \\n<answer>From the result, we can see that the answer is \\\\boxed{17}.\\n<end_of_answer>

The state of a partial solution is re-derived from its text by a tiny evaluator of the
one-line assignments the engine writes (no exec), so the engine also follows paths that other
policies wrote in the same style; a line it cannot follow leaves the state unknown.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from rstar_fast.search.steps import ANSWER, ANSWER_END, CODE, CODE_END, OUTPUT, OUTPUT_END, STEP_END, extract_boxed
from rstar_fast.synthetic import NAMES, OPS, START_COMMENTS, apply_op, parse_question, past_of

FINAL_COMMENT = "# Now print the final answer"

# rounds 2-4 and evaluation
CHAT_USER = "<|user|>:"
CHAT_ASSISTANT = "<|assistant|>:"
# round 1 (mcts_prompt.json's pot_suffix)
ROUND1_SUFFIX = "Now! It's your turn.\nQuestion: "
QUESTION = "Question: "

GENERIC_COMMENTS: dict[str, str] = {
    "=": "Start from the given quantity {n}",
    "+": "Add {n} as the problem states",
    "-": "Subtract {n} as the problem states",
    "*": "Multiply by {n} as the problem states",
}
WRONG_OP: dict[str, str] = {"+": "-", "-": "+", "*": "+", "/": "*", "//": "*"}


@dataclass(frozen=True)
class PlanStep:
    symbol: str  # "=" for the starting assignment, else the Python operator
    operand: int
    comments: tuple[str, ...]  # variants of the "# Step k:" comment (already formatted)
    confusable: tuple[int, ...] = ()  # other amounts of the question a wrong step may use instead


@dataclass(frozen=True)
class Plan:
    """The intended solution of a question: one variable, a chain of operations."""

    var: str
    steps: tuple[PlanStep, ...]
    values: tuple[int, ...]  # expected value after each step
    gold: str | None  # registered gold answer for a non-synthetic question

    @property
    def answer(self) -> str:
        """What a correct solution prints and boxes."""
        return self.gold if self.gold is not None else str(self.values[-1])


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@lru_cache(maxsize=65536)
def make_plan(question: str, gold: str | None) -> Plan:
    """The plan of a question (cached: one entry per distinct question)."""
    problem = parse_question(question)
    if problem is not None:
        fmt = {"N": problem.name, "item": problem.item}
        steps = [PlanStep("=", problem.start,
                          tuple(c.format(n=problem.start, **fmt) for c in START_COMMENTS))]
        pronoun = NAMES.get(problem.name, "They").lower()
        for i, (kind, n) in enumerate(problem.ops):
            op = OPS[kind]
            recalled = problem.recall_of(i)
            if recalled is None:
                comments = tuple(c.format(n=n, **fmt) for c in op.comments)
                confusable: tuple[int, ...] = ()
            else:
                comments = tuple(c.format(n=n, p=pronoun, past=past_of(recalled), **fmt)
                                 for c in op.recall_comments)
                # the other amounts of the question so far: what a misread recall picks up
                earlier = (problem.start, *(m for _, m in problem.ops[:i]))
                confusable = tuple(dict.fromkeys(x for x in earlier if x != n))
            steps.append(PlanStep(op.symbol, n, comments, confusable))
        return Plan(problem.item, tuple(steps), tuple(problem.values()), None)
    rng = random.Random(_digest(question))
    numbers = [int(x) for x in re.findall(r"\d+", question) if len(x) <= 4]
    n_steps = rng.randint(2, 5)
    start = numbers[0] if numbers else rng.randint(2, 20)
    steps = [PlanStep("=", start, (GENERIC_COMMENTS["="].format(n=start),))]
    values = [start]
    for i in range(1, n_steps):
        n = numbers[i % len(numbers)] if numbers else rng.randint(2, 9)
        symbol = rng.choice(("+", "-", "*"))
        if symbol == "*" and (n < 2 or abs(values[-1] * n) > 10**6):
            symbol = "+"
        steps.append(PlanStep(symbol, n, (GENERIC_COMMENTS[symbol].format(n=n),)))
        values.append(int(apply_op(symbol, values[-1], n)))  # +, - and * of ints
    return Plan("value", tuple(steps), tuple(values), gold)


def split_prompt(text: str) -> tuple[str, str]:
    """(question, solution so far) of a prompt in either rStar-Math prompt format.

    Chat format: `<|user|>:\\n{question}\\n<|assistant|>: Let's think ... with code.{steps}`;
    round 1: instruction and few-shots, then
    `Now! It's your turn.\\nQuestion: {question}\\n{steps}`.
    The steps start at the first `<code>` after the question.
    """
    i = text.rfind(CHAT_ASSISTANT)
    if i >= 0:
        u = text.rfind(CHAT_USER, 0, i)
        start = u + len(CHAT_USER) if u >= 0 else 0
        question = text[start:i].removeprefix("\n").removesuffix("\n")
        j = text.find(CODE, i)
        return question, text[j:] if j >= 0 else ""
    i = text.rfind(ROUND1_SUFFIX)
    if i >= 0:
        start = i + len(ROUND1_SUFFIX)
    else:
        i = text.rfind(QUESTION)
        start = i + len(QUESTION) if i >= 0 else 0
    j = text.find(CODE, start)
    if j < 0:
        return text[start:].removesuffix("\n"), ""
    return text[start:j].removesuffix("\n"), text[j:]


# -- the state of a partial solution ------------------------------------------------------

_ASSIGN = re.compile(r"^([A-Za-z_]\w*)\s*(\+|-|\*|//|/)?=\s*(.+?)\s*$")
_BINARY = re.compile(r"^(-?\w+)\s*(\+|-|\*|//|/)\s*(-?\w+)$")
_PRINT = re.compile(r"^print\((.*)\)\s*$")


@dataclass
class PathState:
    """What the code of a partial solution computes, as far as the simple evaluator can tell."""

    steps_done: int = 0  # `<end_of_step>`s written
    env: dict[str, int | float] = field(default_factory=dict)
    error: str | None = None  # the first error the code raises, e.g. "NameError: ..."
    unknown: bool = False  # a line the evaluator does not understand
    code_done: bool = False  # `<end_of_code>` written
    printed: str | None = None  # what the code prints
    output: str | None = None  # the `<output>` text, once it is there
    boxed: str | None = None  # the last `\boxed{}` of the answer part
    answer_done: bool = False
    has_code: bool = False  # `<code>` already written


_INT = re.compile(r"-?[0-9]+")  # ASCII digits only: isdigit() also takes '²', which int() refuses
# values beyond this are left unknown: squaring a number a few dozen times would outgrow memory,
# and str() refuses ints of more than 4300 digits
_MAX_VALUE = 10**300


def _operand(token: str, env: dict[str, int | float]) -> int | float:
    if _INT.fullmatch(token):
        return int(token)
    if token in env:
        return env[token]
    if token.lstrip("-").isidentifier():
        raise NameError(f"name '{token}' is not defined")
    raise ValueError(f"{token!r} is neither a number nor a name")  # e.g. '5²': unknown to the evaluator


def _eval(expr: str, env: dict[str, int | float]) -> int | float:
    m = _BINARY.match(expr)
    if m is None:
        return _operand(expr.strip(), env)
    a, symbol, b = _operand(m.group(1), env), m.group(2), _operand(m.group(3), env)
    if symbol in ("//", "/") and b == 0:
        raise ZeroDivisionError(
            "division by zero" if symbol == "/" else "integer division or modulo by zero"
        )
    return a / b if symbol == "/" else apply_op(symbol, a, b)


def _run_line(line: str, state: PathState) -> None:
    m = _ASSIGN.match(line)
    if m:
        name, aug, expr = m.groups()
        if aug:
            expr = f"{name} {aug} {expr}"
        if _BINARY.match(expr) is None and not re.fullmatch(r"-?\w+", expr):
            state.unknown = True
            return
        value = _eval(expr, state.env)
        if not abs(value) <= _MAX_VALUE:  # NaN too
            raise ValueError(f"{name} is too large for the evaluator")
        state.env[name] = value
        return
    m = _PRINT.match(line)
    if m:
        arg = m.group(1).strip()
        if re.fullmatch(r"-?\w+", arg):
            value = _operand(arg, state.env)
        else:
            value = ast.literal_eval(arg)  # its errors make the line unknown (parse_solution)
        text = str(value)
        state.printed = text if state.printed is None else f"{state.printed}\n{text}"
        return
    state.unknown = True


def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, or None when there is none."""
    return extract_boxed(text) if "\\boxed{" in text else None


def parse_solution(solution: str) -> PathState:
    """Re-derive the state of a partial solution from its text."""
    state = PathState(has_code=CODE in solution)
    end = solution.find(CODE_END)
    code = solution if end < 0 else solution[:end]
    state.steps_done = code.count(STEP_END)
    for raw in code.replace(CODE, "\n").replace(STEP_END, "\n").split("\n"):
        line = raw.strip()
        if not line or line.startswith(("#", "import ", "from ")):
            continue
        try:
            _run_line(line, state)
        except (NameError, ZeroDivisionError) as e:  # what the code raises when it runs
            state.error = f"{type(e).__name__}: {e}"
            break
        except Exception:  # noqa: BLE001 - text a real policy wrote that the evaluator cannot follow
            state.unknown = True
    if end >= 0:
        state.code_done = True
        rest = solution[end:]
        o = rest.find(OUTPUT)
        oe = rest.find(OUTPUT_END)
        if o >= 0 and oe > o:
            state.output = rest[o + len(OUTPUT) : oe]
        a = rest.find(ANSWER)
        if a >= 0:
            state.boxed = boxed_answer(rest[a:])
            state.answer_done = ANSWER_END in rest[a:]
    return state


def on_track(plan: Plan, state: PathState) -> bool:
    """Whether the steps so far computed exactly the plan's values."""
    if state.error or state.unknown or state.steps_done > len(plan.values):
        return False
    return state.steps_done == 0 or state.env.get(plan.var) == plan.values[state.steps_done - 1]


def judge(plan: Plan, state: PathState) -> int:
    """+1 when the partial solution is right so far, -1 when it went wrong, 0 when unknown."""
    if state.error:
        return -1
    if state.unknown and state.boxed is None:
        return 0
    if state.boxed is not None:
        return 1 if _same_answer(state.boxed, plan.answer) else -1
    if state.code_done:
        complete = state.steps_done == len(plan.values) and on_track(plan, state)
        if plan.gold is None:
            return 1 if complete and state.printed is not None and _same_answer(state.printed, plan.answer) else -1
        return 1 if state.printed is not None and _same_answer(state.printed, plan.answer) else -1
    return 1 if on_track(plan, state) else -1


def _same_answer(a: str, b: str) -> bool:
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


# -- writing the next piece -----------------------------------------------------------------

def _step_code(plan: Plan, index: int, symbol: str, operand: int | str) -> str:
    var = plan.var
    if index == 0:
        return f"{var} = {operand}"
    return f"{var} = {var} {symbol} {operand}"


def _typo(var: str) -> str:
    """An undefined name an LLM plausibly writes instead of `var`."""
    if len(var) > 3 and var.endswith("s"):
        return var[:-1]
    return var[:3] if len(var) > 3 else var + "_val"


def _wrong_operand(n: int, symbol: str, rng: Rng) -> int:
    low = 2 if symbol in ("/", "//") else 1
    for _ in range(8):
        candidate = rng.choice((n + 1, n - 1, n + 2, n - 2, n + 10, n * 10))
        if candidate != n and candidate >= low:
            return candidate
    return n + 1


def _final_piece(plan: Plan, state: PathState, prefix: str, expected_ok: bool) -> str:
    if plan.gold is None:
        arg = plan.var
    else:
        answer = plan.gold if expected_ok else perturb_answer(plan.gold, state.env.get(plan.var))
        arg = answer if re.fullmatch(r"-?[0-9]+", answer) else repr(answer)  # a Python int literal
    return f"{prefix}{FINAL_COMMENT}\nprint({arg})\n{CODE_END}"


def perturb_answer(gold: str, value: int | float | None) -> str:
    """A wrong answer near the gold one; which one depends on the (wrong) chain value."""
    delta = 1 + (abs(int(value)) % 7 if isinstance(value, (int, float)) else 0)
    m = re.search(r"\d+", gold)
    if m is None:
        return f"{gold}+{delta}"
    return f"{gold[: m.start()]}{int(m.group()) + delta}{gold[m.end():]}"


class Rng(Protocol):
    def random(self) -> float: ...

    def randrange(self, n: int) -> int: ...

    def choice(self, seq: Sequence[Any]) -> Any: ...


# Reasoning lines a step may carry before its code (real rStar-Math steps explain themselves in
# several comment lines; the `reasoning` option gives simulated steps a realistic length).
REASONING_LINES = (
    "# We keep one running total and update it with what this sentence of the question says.",
    "# The quantity changes by the number given here, so we apply that operation to the total.",
    "# Checking the wording: the change applies to the same object we are counting.",
    "# Nothing else changes at this point, so the other values stay as they were.",
    "# We store the result in the same variable so the next step can build on it.",
)


def next_piece(
    plan: Plan, state: PathState, rng: Rng, p_correct: float, p_error: float, reasoning: int = 0
) -> str | None:
    """The text a policy writes next after this state; None when the solution is complete.

    `reasoning` extra comment lines of explanation go before each step's code."""
    if state.answer_done:
        return None
    if state.code_done:
        if state.output is None:
            shown = state.error if state.error else (state.printed or "")
            return f"\n{OUTPUT}{shown}{OUTPUT_END}"
        boxed = _answer_text(plan, state)
        return (
            f"\n{ANSWER}From the result, we can see that the answer is \\boxed{{{boxed}}}."
            f"\n{ANSWER_END}"
        )
    k = state.steps_done  # 0-based index of the step to write
    prefix = "\n\n" if state.has_code else f"{CODE}\n"
    if k >= len(plan.steps):
        return _final_piece(plan, state, prefix, on_track(plan, state))
    step = plan.steps[k]
    comment = step.comments[rng.randrange(len(step.comments))]
    u = rng.random()
    if u < p_correct:
        code = _step_code(plan, k, step.symbol, step.operand)
    elif u < p_correct + p_error:
        typo = _typo(plan.var)
        if k == 0:
            code = f"{plan.var} = {typo}"
        else:
            code = f"{plan.var} = {typo} {step.symbol} {step.operand}"
    elif k > 0 and rng.random() < 0.2:
        # jumps to the answer too early: the chain stops short
        return _final_piece(plan, state, prefix, False)
    elif k > 0 and rng.random() < 0.5:
        code = _step_code(plan, k, WRONG_OP[step.symbol], step.operand)
    elif step.confusable and rng.random() < 0.5:
        code = _step_code(plan, k, step.symbol, rng.choice(step.confusable))
    else:
        code = _step_code(plan, k, step.symbol, _wrong_operand(step.operand, step.symbol, rng))
    explain = "".join(REASONING_LINES[(k + i) % len(REASONING_LINES)] + "\n" for i in range(reasoning))
    return f"{prefix}# Step {k + 1}: {comment}\n{explain}{code}\n{STEP_END}"


def _answer_text(plan: Plan, state: PathState) -> str:
    shown = (state.output or "").strip()
    if shown and "error" not in shown.lower():
        try:
            number = float(shown)
            if number.is_integer() and "." in shown:
                return str(int(number))
        except ValueError:
            pass
        return shown
    if state.printed is not None:
        return state.printed
    value = state.env.get(plan.var)
    return str(value) if value is not None else "0"
