"""Steps: parse a completion, build the code it runs, compose the node text, decide terminals.

Everything here follows the reference (rstar_deepthink: `rstar_step_result_unwrap`,
`extract_math_answer`, `extract_program`, `collect_action_inputs`, `MCTS.create_child`,
`llm_generate`'s sample filter) and is pure: the driver calls these functions around the
engine, the step executor and the Forest.

A completion is the text the policy wrote for one step, its stop string included (the
reference appends vLLM's `stop_reason` to `output.text`). It is:
- an *answer* when it contains "boxed" and an answer can be extracted from it (terminal);
- *code* otherwise: its code runs together with the code of the ancestors in the same
  `<code>` block; when it holds `<end_of_code>` the output is appended to its text;
- *text* in the reference's corner case of an empty `\\boxed{}`: no code runs, not terminal;
- *unparsable* when nothing was generated at all (ours: the reference would run empty code
  and add a node identical to its parent); terminal with NO_VALID_CHILD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

STEP_END = "<end_of_step>"
CODE = "<code>"
CODE_END = "<end_of_code>"
OUTPUT = "<output>"
OUTPUT_END = "<end_of_output>"
ANSWER = "<answer>"
ANSWER_END = "<end_of_answer>"

# The reference's terminal markers, stored as `final_answer` of failed terminals (verbatim,
# typo included, so trees and exports compare equal with the reference's).
TOO_MANY_CODE_ERRORS = "Too many consecutive steps have code errors."
TOO_MANY_STEPS = "Fail to sove the problem within limited steps."
NO_VALID_CHILD = "Fail to generate parsable text for next step."
FAILED_TERMINALS: frozenset[str] = frozenset({TOO_MANY_CODE_ERRORS, TOO_MANY_STEPS, NO_VALID_CHILD})
INVALID_ANSWER = "[invalid]"  # what the reference's answer extraction returns when it fails

PYTHON_ACTION = "python_interpreter"  # the reference's `action` of a code step

StepKind = Literal["answer", "code", "text", "unparsable"]


@dataclass(frozen=True, slots=True)
class ParsedStep:
    """One completion, parsed (the reference's `step_result, parser_result`)."""

    text: str  # the completion, stop string included
    kind: StepKind
    final_answer: str  # the extracted answer when kind == "answer", else ""
    stop: str | None  # the stop string that ended it, None when it ran to the length limit

    @property
    def ends_code(self) -> bool:
        """True when this step closes the `<code>` block (its output is then shown)."""
        return CODE_END in self.text

    @property
    def ends_solution(self) -> bool:
        """True when generation stopped at `<end_of_answer>`."""
        return self.stop == ANSWER_END

    @property
    def runs_code(self) -> bool:
        return self.kind == "code"


def _closing_brace(text: str, open_at: int) -> int:
    """Index of the `}` that closes the `{` at `open_at` (braces balanced); -1 when unclosed."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def extract_boxed(text: str) -> str:
    """The content of the last `\\boxed{...}` (braces balanced); `text` itself when none.

    An unclosed box (a step cut off by max_tokens) gives what the reference's extraction gives:
    it cuts the box's tail at an index that is either the last `{` a `}` matched inside it or
    the box's position in the whole text. Mostly that leaves "" (no answer: the step becomes a
    plain node), and "1}{2" for a cut-off `\\boxed{\\frac{1}{2`.
    """
    start = text.rfind("\\boxed{")
    if start == -1:
        return text
    tail = text[start:]
    close = _closing_brace(tail, len("\\boxed"))
    if close != -1:
        return tail[len("\\boxed{") : close]
    cut, opened = start, []
    for i, c in enumerate(tail):
        if c == "{":
            opened.append(i)
        elif c == "}" and opened:
            cut = opened.pop()
    return tail[cut + 1 :]


def remove_text_box(text: str) -> str:
    """Unwrap the first `\\text{...}` (drop it when it only says "and"), as the reference does;
    an unclosed one raises ValueError (the reference's fails, and its answer is invalid)."""
    start = text.find("\\text{")
    if start == -1:
        return text
    open_at = start + len("\\text")
    close = _closing_brace(text, open_at)
    if close == -1:
        raise ValueError("unclosed \\text{")
    inner = text[open_at + 1 : close]
    if inner.strip() == "and":
        return (text[:start] + text[close + 1 :]).strip()
    return (text[:start] + inner.strip() + text[close + 1 :]).strip()


def extract_answer(text: str) -> str:
    """The answer of an answer step: the reference's `extract_math_answer`.

    Only the text before the first ".\\n" is searched (the reference's rule), a trailing
    period is dropped, then the last `\\boxed{}` is taken and a `\\text{}` wrapper removed.
    """
    head = text.split(".\n")[0].strip()
    if head.endswith("."):
        head = head[:-1]
    head = head.strip()
    try:
        return remove_text_box(extract_boxed(head))
    except Exception:  # the reference's catch-all; nothing above should raise
        return INVALID_ANSWER


def parse_step(text: str, stop: str | None = None) -> ParsedStep:
    """Parse one completion (text with its stop string) as the reference's step parser does."""
    if stop is None:
        stop = next((s for s in (STEP_END, CODE_END, OUTPUT_END, ANSWER_END) if text.endswith(s)), None)
    if not text.strip():
        return ParsedStep(text, "unparsable", "", stop)
    if "boxed" in text:
        answer = extract_answer(text)
        if answer:
            return ParsedStep(text, "answer", answer, stop)
        return ParsedStep(text, "text", "", stop)  # empty \boxed{}: the reference adds a plain node
    return ParsedStep(text, "code", "", stop)


def sample_key(text: str, stop: str | None) -> str:
    """The text two samples are compared by: the completion without its stop string (vLLM's
    `output.text`, which is what the reference deduplicates)."""
    if stop and text.endswith(stop):
        return text[: -len(stop)]
    return text


def select_samples(samples: Sequence[tuple[str, str | None]]) -> list[int]:
    """Indices of the samples that become children, in order (the reference's `llm_generate`).

    `samples` are (text, stop) pairs. Duplicate texts are dropped (first kept); then, if any
    sample stopped at `<end_of_answer>`, only the first such becomes a child.
    """
    seen: set[str] = set()
    kept: list[int] = []
    for i, (text, stop) in enumerate(samples):
        key = sample_key(text, stop)
        if key not in seen:
            seen.add(key)
            kept.append(i)
    for i in kept:
        if samples[i][1] == ANSWER_END:
            return [i]
    return kept


SECTION = "# ========"  # the line extract_program starts each code block's program with


def extract_program(text: str, last_only: bool = False) -> str:
    """The code in a stretch of step text: the reference's `extract_program`.

    `<end_of_step>` markers are removed; lines between a line holding `<code>` and a line
    holding `<end_of_code>` are kept (the marker lines themselves are dropped); each `<code>`
    line starts a `# ========` section (or resets, with last_only). Text with no code block
    is taken whole.
    """
    text = text.replace(STEP_END, "")
    if not last_only:
        # The search's usual case, without the per-line loop: one `<code>` on the first line
        # and the block still open. Same result as the general scan below.
        head, newline, rest = text.partition("\n")
        if CODE in head and CODE not in rest and CODE_END not in text:
            return ("\n" + SECTION + "\n" + (rest + "\n" if newline else "")).strip()
    return _scan_program(text, last_only)


def executor_code(text: str) -> str:
    """The code the step executor is given for a stretch of step text: `extract_program`'s
    without its leading `# ========` (the newline after it stays), which the executor puts
    back, as it does for any code: error line numbers are then the reference's."""
    program = extract_program(text)
    return program[len(SECTION):] if program.startswith(SECTION) else program


def _scan_program(text: str, last_only: bool) -> str:
    """`extract_program`'s general line scan (on text with `<end_of_step>` removed)."""
    parts: list[str] = []
    inside = False
    for line in text.split("\n"):
        if CODE in line:
            if last_only:
                parts = []
            else:
                parts.append("\n" + SECTION + "\n")
            inside = True
        elif CODE_END in line:
            inside = False
        elif inside:
            parts.append(line + "\n")
    program = "".join(parts)
    if not program:
        program = text
    return program.strip()


def _is_code_node_text(text: str) -> bool:
    # A non-root, non-terminal node ran code unless it is the empty-\boxed{} "text" node;
    # answer nodes are terminal and never ancestors.
    return bool(text) and "boxed" not in text


def open_block(parent_block: str, text: str) -> str:
    """The code-step texts of the `<code>` block still open after a node with `text`, given
    those open at its parent: "" once the node closes the block (its text holds
    `<end_of_output>` or `<end_of_code>`), else the parent's plus the node's own when it is a
    code node. The search keeps this per node so a step's program is one concatenation."""
    if OUTPUT_END in text or CODE_END in text:
        return ""
    return parent_block + text if _is_code_node_text(text) else parent_block


def step_code(ancestor_texts: Sequence[str], step_text: str) -> str:
    """The program that runs for a new code step (the reference's `code_execution`).

    `ancestor_texts` are the node texts from the root (text "") down to the parent. The code
    of the ancestors back to the last node that closed a code block is joined with the step's
    own text, then `extract_program` takes the code out.
    """
    block = ""
    for text in ancestor_texts:
        block = open_block(block, text)
    return extract_program(block + step_text)


def wrap_output(observation: str) -> str:
    """`<output>{observation}<end_of_output>`."""
    return f"{OUTPUT}{observation}{OUTPUT_END}"


def code_failed(observation: str, raised: bool, rule: str = "raised", crashed: bool = False) -> bool:
    """Whether a step's code failed: it raised, timed out or was killed (`raised`), or, under
    the reference's rule, its output contains "error" in any case (`substring`); a process
    that was killed or exited (`crashed`) failed under either rule."""
    if rule == "substring":
        return crashed or "error" in observation.lower()
    if rule == "raised":
        return raised
    raise ValueError(f"error_rule must be 'raised' or 'substring', got {rule!r}")


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What a parsed (and, for code, executed) step becomes in the tree."""

    text: str  # the node's text (step text, plus `<output>...` when shown)
    terminal: bool
    final_answer: str  # the answer, a FAILED_TERMINALS marker, or ""
    consecutive_errors: int  # errors in a row ending at this node (0 after a success)
    code_error: bool  # this step's code failed
    observation: str | None = None  # a code step's output as the executor gave it (None: no code ran)

    @property
    def is_answer(self) -> bool:
        """A terminal holding a real answer (the reference's `is_valid_final_answer_node`)."""
        return self.terminal and is_valid_final_answer(self.final_answer)

    @property
    def is_failed_terminal(self) -> bool:
        return self.terminal and self.final_answer in FAILED_TERMINALS


def is_valid_final_answer(final_answer: str) -> bool:
    return bool(final_answer) and final_answer not in FAILED_TERMINALS


def too_deep(depth: int, max_depth: int) -> bool:
    """The reference's depth rule: a node deeper than max_depth (root = 0) is terminal."""
    return depth > max_depth


def finish_step(
    step: ParsedStep,
    *,
    depth: int,
    max_depth: int,
    parent_consecutive_errors: int = 0,
    errors_threshold: int = 1,
    observation: str | None = None,
    failed: bool = False,
    step_delim: str = "\n",
) -> StepOutcome:
    """The node a step becomes: the reference's `MCTS.create_child`, without side effects.

    For a code step pass the executor's `observation` (already cut and formatted) and whether
    the code `failed` (see `code_failed`). After `<end_of_code>` the output is shown; when the
    errors in a row reach `errors_threshold` the node becomes terminal with the output shown
    (and `<end_of_code>` added if missing); a non-terminal node deeper than `max_depth`
    becomes terminal with TOO_MANY_STEPS.
    """
    text = step.text
    terminal = False
    final_answer = ""
    errors = 0
    if step.kind == "unparsable":
        terminal, final_answer = True, NO_VALID_CHILD
    elif step.kind == "answer":
        terminal, final_answer = True, step.final_answer
    elif step.kind == "code":
        if observation is None:
            raise ValueError("finish_step: a code step needs the executor's observation")
        if step.ends_code:
            text = f"{step.text}{step_delim}{wrap_output(observation)}"
        if failed:
            errors = parent_consecutive_errors + 1
            if errors >= errors_threshold:
                closed = step.text if CODE_END in step.text else step.text + CODE_END
                text = f"{closed}{step_delim}{wrap_output(observation)}"
                terminal, final_answer = True, TOO_MANY_CODE_ERRORS
    if not terminal and too_deep(depth, max_depth):
        terminal, final_answer = True, TOO_MANY_STEPS
    code = step.kind == "code"
    return StepOutcome(text, terminal, final_answer, errors, code and failed, observation if code else None)


def split_solution(response: str, stops: Sequence[str] = (STEP_END, CODE_END, ANSWER_END)) -> list[str]:
    """Cut a whole solution into node texts as generation would have produced them.

    A cut falls after each stop string; the `<output>...<end_of_output>` block that follows
    `<end_of_code>` (with the step delimiter before it) belongs to that step's node. Joining
    the pieces gives the response back.
    """
    pieces: list[str] = []
    pos = 0
    n = len(response)
    while pos < n:
        best = -1
        best_stop = ""
        for s in stops:
            j = response.find(s, pos)
            if j != -1 and (best == -1 or j < best):
                best, best_stop = j, s
        if best == -1:
            pieces.append(response[pos:])
            break
        end = best + len(best_stop)
        if best_stop == CODE_END:
            k = response.find(OUTPUT_END, end)
            nxt = response.find(OUTPUT, end)
            if k != -1 and nxt != -1 and not response[end:nxt].strip():
                end = k + len(OUTPUT_END)
        pieces.append(response[pos:end])
        pos = end
    return pieces


__all__ = [
    "STEP_END", "CODE", "CODE_END", "OUTPUT", "OUTPUT_END", "ANSWER", "ANSWER_END",
    "TOO_MANY_CODE_ERRORS", "TOO_MANY_STEPS", "NO_VALID_CHILD", "FAILED_TERMINALS",
    "INVALID_ANSWER", "PYTHON_ACTION", "ParsedStep", "StepOutcome", "extract_boxed",
    "remove_text_box", "extract_answer", "parse_step", "sample_key", "select_samples",
    "extract_program", "open_block", "step_code", "wrap_output", "code_failed", "finish_step",
    "is_valid_final_answer", "too_deep", "split_solution",
]
