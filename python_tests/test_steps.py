"""Step semantics against the reference's rules and the SFT fixtures."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from rstar_fast.search import prompts
from rstar_fast.search.steps import (
    ANSWER_END,
    CODE_END,
    INVALID_ANSWER,
    NO_VALID_CHILD,
    STEP_END,
    TOO_MANY_CODE_ERRORS,
    TOO_MANY_STEPS,
    _scan_program,
    code_failed,
    extract_answer,
    extract_program,
    finish_step,
    parse_step,
    select_samples,
    split_solution,
    step_code,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rstar_format"


def sft_examples() -> list[dict]:
    return json.loads((DATA / "sft_data_examples.json").read_text())


def test_fixtures_split_and_reassemble() -> None:
    for ex in sft_examples():
        response = ex["response"]
        pieces = split_solution(response)
        assert "".join(pieces) == response
        kinds = [parse_step(p).kind for p in pieces]
        assert kinds[-1] == "answer" and all(k == "code" for k in kinds[:-1])
        assert CODE_END in pieces[-2] and "<end_of_output>" in pieces[-2]
        assert pieces[-1].endswith(ANSWER_END)


def test_fixture_node_text_and_program() -> None:
    # Replay each solution: every code step's program, and the node text with its output,
    # rebuilt from the step alone, equal the fixture.
    for ex in sft_examples():
        pieces = split_solution(ex["response"])
        ancestors = [""]
        for depth, piece in enumerate(pieces, 1):
            gen, sep, out = piece.partition("\n<output>")
            if not sep:
                gen, sep, out = piece.partition("<output>")
            step = parse_step(gen if sep else piece)
            if step.kind == "code":
                program = step_code(ancestors, step.text)
                assert "<end_of_step>" not in program and "<code>" not in program
                observation = out[: -len("<end_of_output>")] if sep else ""
                outcome = finish_step(step, depth=depth, max_depth=16, observation=observation,
                                      failed=False, errors_threshold=1)
                assert outcome.text == piece and not outcome.terminal
                if step.ends_code:
                    assert program.splitlines()[-1].startswith("print")
            else:
                outcome = finish_step(step, depth=depth, max_depth=16)
                assert outcome.is_answer and outcome.text == piece
            ancestors.append(outcome.text)


def test_answer_extraction() -> None:
    assert extract_answer("<answer>so \\boxed{16} times.\n<end_of_answer>") == "16"
    assert extract_answer("\\boxed{\\frac{20}{3}}\n<end_of_answer>") == "\\frac{20}{3}"
    assert extract_answer("first \\boxed{1}, then \\boxed{2}.<end_of_answer>") == "2"  # last box
    assert extract_answer("is \\boxed{\\text{No}}.\n<end_of_answer>") == "No"
    # The reference only searches the text before the first ".\n".
    assert extract_answer("Wrong \\boxed{75}.\nbut \\boxed{76}.\n<end_of_answer>") == "75"
    assert parse_step("we get \\boxed{}<end_of_answer>").kind == "text"
    assert parse_step("").kind == "unparsable"
    assert parse_step("  \n").kind == "unparsable"  # whitespace alone says nothing either


def test_program_of_a_code_block() -> None:
    s1 = "<code>\nimport math\n# Step 1\nx = 2\n<end_of_step>"
    s2 = "\n\n# Step 2\ny = x * 3\n<end_of_step>"
    s3 = "\n\n# Now print the final answer\nprint(y)\n<end_of_code>"
    prog = step_code(["", s1, s2], s3)
    assert prog == "# ========\nimport math\n# Step 1\nx = 2\n\n\n# Step 2\ny = x * 3\n\n\n# Now print the final answer\nprint(y)"
    # a closed block starts over
    closed = s3 + "\n<output>6<end_of_output>"
    assert step_code(["", s1, s2, closed], "<code>\nz = 1\n<end_of_step>") == "# ========\nz = 1"
    assert extract_program("just text") == "just text"


def test_select_samples() -> None:
    a = ("x = 1\n<end_of_step>", STEP_END)
    b = ("x = 2\n<end_of_step>", STEP_END)
    ans1 = ("\\boxed{3}<end_of_answer>", ANSWER_END)
    ans2 = ("\\boxed{4}<end_of_answer>", ANSWER_END)
    assert select_samples([a, b, a]) == [0, 1]
    assert select_samples([a, ans1, b, ans2]) == [1]
    assert select_samples([ans1, ans1]) == [0]
    assert select_samples([("x = 1\n", None), a]) == [0]  # same text without the stop string


def test_terminal_rules() -> None:
    code = parse_step("x = 1/0\n<end_of_step>")
    first = finish_step(code, depth=1, max_depth=16, errors_threshold=2, observation="ZeroDivisionError: division by zero", failed=True)
    assert not first.terminal and first.consecutive_errors == 1 and first.text == code.text
    second = finish_step(code, depth=2, max_depth=16, parent_consecutive_errors=1, errors_threshold=2,
                         observation="ZeroDivisionError: division by zero", failed=True)
    assert second.terminal and second.final_answer == TOO_MANY_CODE_ERRORS and second.is_failed_terminal
    assert second.text == code.text + CODE_END + "\n<output>ZeroDivisionError: division by zero<end_of_output>"
    ok = finish_step(code, depth=17, max_depth=16, observation="", failed=False)
    assert ok.terminal and ok.final_answer == TOO_MANY_STEPS
    assert not finish_step(code, depth=16, max_depth=16, observation="", failed=False).terminal
    assert finish_step(parse_step(""), depth=1, max_depth=16).final_answer == NO_VALID_CHILD
    with pytest.raises(ValueError):
        finish_step(code, depth=1, max_depth=16)


def test_error_rules() -> None:
    assert code_failed("NameError: x", raised=True) and not code_failed("error count: 3", raised=False)
    assert code_failed("error count: 3", raised=False, rule="substring")
    # killed or exited: the texts hold no "error", the step failed all the same
    assert code_failed("killed by signal SIGSEGV", raised=True, rule="substring", crashed=True)
    assert not code_failed("StopIteration: ", raised=True, rule="substring")  # the reference's rule, as it is


def test_prompts() -> None:
    assert prompts.build_prompt("Q?") == "<|user|>:\nQ?\n<|assistant|>: Let's think step by step and solve the problem with code."
    p = prompts.build_prompt("Q?", instructions=prompts.MCTS_FORMAT_INSTRUCTIONS, suffix=prompts.MCTS_SUFFIX,
                             few_shots=prompts.FEW_SHOTS, num_few_shot=2, question_delim="\n")
    expect = "\n".join([prompts.MCTS_FORMAT_INSTRUCTIONS, "The following are 2 demonstration examples.",
                        *prompts.FEW_SHOTS, "", "Now! It's your turn.\nQuestion: Q?\n"])
    assert p == expect
    fs = json.loads((DATA / "few_shots.json").read_text())
    mp = json.loads((DATA / "mcts_prompt.json").read_text())
    assert list(prompts.FEW_SHOTS) == fs and prompts.MCTS_SUFFIX == mp["pot_suffix"]
    assert prompts.MCTS_FORMAT_INSTRUCTIONS == mp["pot_format_instructions"]


def test_extract_program_fast_path_matches_the_line_scan():
    pieces = ["<code>", "<code>\n", "x<code>y\n", "# Step 1: a\nx = 1\n<end_of_step>", "\n\n# s\ny = x + 1\n",
              "<end_of_step>", "print(y)\n<end_of_code>", "\n<output>2<end_of_output>", "\n", "", "z = 3"]
    for n in range(1, 4):
        for combo in itertools.product(pieces, repeat=n):
            text = "".join(combo)
            for last_only in (False, True):
                assert extract_program(text, last_only) == _scan_program(text.replace(STEP_END, ""), last_only), text


@pytest.mark.parametrize("text, kind, answer", [
    ("<answer>From the result, we can see that the answer is \\boxed{12", "text", ""),  # cut by max_tokens
    ("<answer>The value is \\boxed{\\frac{1}{2", "answer", "1}{2"),  # cut inside nested braces
    ("<answer>\\boxed{\\text{yes}} and \\text{done", "answer", "yes"),
    ("<answer>The answer is \\boxed{12}.\n<end_of_answer>", "answer", "12"),
])
def test_a_box_cut_off_is_read_as_the_reference_reads_it(text, kind, answer):
    """The reference cuts an unclosed box's tail at an index into the whole text: mostly no
    answer at all, so the step is a plain node, not a terminal answer."""
    step = parse_step(text)
    assert (step.kind, step.final_answer) == (kind, answer)


def test_the_executor_gets_the_block_without_its_section_line() -> None:
    """The executor puts `# ========` first itself, so the search hands it the code without
    extract_program's: a SyntaxError then names the reference's line (6 here, counted from
    the section line of the block's program)."""
    from rstar_fast.executor import StepExecutor
    from rstar_fast.search.steps import executor_code

    block = "\n<code>\n# Step 1: define x\nx = 1\n<end_of_step>"
    step = "\n# Step 2: bad\ny = (x +\n<end_of_step>"
    assert extract_program(block + step).startswith("# ========\n")
    assert executor_code(block + step) == "\n# Step 1: define x\nx = 1\n\n# Step 2: bad\ny = (x +"
    assert executor_code("") == "" and executor_code("x = 1") == "x = 1"
    with StepExecutor(workers=1, timeout_s=5.0) as ex:
        prefix = executor_code(block)
        program = executor_code(block + step)
        whole = ex.run(program)
        sibling = ex.run_siblings(prefix, [program[len(prefix):]])[0]
        # a block whose first line is blank, run from an empty prefix: the reference's line 4
        first = "<code>\n\n# Step 1: bad\nx = (1,\n<end_of_step>"
        blank = [ex.run(executor_code(first)), ex.run_siblings("", [executor_code(first)])[0]]
    for r in (whole, sibling):
        assert r.output == "SyntaxError: '(' was never closed (<unknown>, line 6)"
    for r in blank:
        assert r.output == "SyntaxError: '(' was never closed (<unknown>, line 4)"


def test_an_unclosed_text_box_is_an_invalid_answer_as_in_the_reference() -> None:
    assert extract_answer("\n<answer>\\boxed{\\text{x} \\text{y<end_of_answer>") == INVALID_ANSWER
    assert extract_answer("\n<answer>\\boxed{3 \\text{ and } 4}<end_of_answer>") == "3  4"
