"""Question prompts in the reference's two styles.

Rounds 2-4 and evaluation use the SFT prompt (`<|user|>:\\n{question}\\n<|assistant|>: Let's
think step by step and solve the problem with code.`); round 1 uses the instruction prompt with
two few-shot solutions. The texts below are those of the reference's `mcts_prompt.json`,
`few_shots.json` and `sft_prompt.json` (microsoft/rStar, branch rStar-math, MIT License),
embedded so the package needs no data files at run time.

Assembly follows the reference's `rstar_prompt_wrap`: instructions, an example header, the
examples and an empty string are joined with the step delimiter, then the suffix with the
question is appended after one more delimiter. Two deliberate differences, both options:
the reference draws the few-shot order at random on every call (`random.sample`); we keep the
file order so that every prompt of a run shares one prefix (KV-cache reuse). And the reference
formats `{input}` as question + step delimiter, which puts a blank line before
`<|assistant|>` in the SFT prompt; we keep that prompt with a single newline (what the
reference's own SFT training and export scripts use), so `question_delim` is "" for the SFT
prompt and "\\n" for the round-1 prompt, where the few-shots put `<code>` on a new line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rstar_fast.search.config import SearchConfig

# The round-1 instruction prompt (mcts_prompt.json) and its two few-shot solutions.
MCTS_FORMAT_INSTRUCTIONS: str = (
    'You are a powerful agent with broad math knowledge and great python programming skills. You need to use python interpreter to do accurate calculation on math equations.\n'
    '\n'
    '!!! Remember:\n'
    '1. Use code solve the problem step by step. The solution should include three parts: <code>, <output>, and <answer>.\n'
    '2. All calculations should be done in python code. Provide concise reasoning and thinking in the comments of the code.\n'
    '3. The most related python packages include `math`, `sympy`, `scipy`, and `numpy`.\n'
    '4. Please use the following template:\n'
    '\n'
    'Question: the input question\n'
    '<code>Construct the code step by step. Use <end_of_step> to indicate the end of each step. Ensure your code can execute correctly(excluding <end_of_step>) and print the answer. Avoid undefined variables (NameError), unimported packages, or formatting errors (SyntaxError, TypeError). In the last step of the code, print the final answer and add a comment: Now print the final answer.<end_of_code>\n'
    '<output>Execute the code in using the Python interpreter and display the printed results.<end_of_output>\n'
    "<answer>The concise answer without verbose context, put your final answer's numerical part (without unit, only focus on the numerical part if it's a choice question) in \\boxed{}.<end_of_answer>"
)

MCTS_SUFFIX: str = "Now! It's your turn.\nQuestion: {input}"

FEW_SHOTS: tuple[str, ...] = (
    (
        'Question: Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?\n'
        '<code>\n'
        '# Step 1: Calculate the total weight lifted with two 20-pound weights\n'
        'total_weight_20 = 2 * 20 * 12\n'
        '<end_of_step>\n'
        '\n'
        '# Step 2: Calculate the weight lifted per repetition with two 15-pound weights\n'
        'weight_per_rep_15 = 2 * 15\n'
        '<end_of_step>\n'
        '\n'
        '# Step 3: Calculate the number of repetitions needed to lift the same total weight with two 15-pound weights\n'
        'reps_needed = total_weight_20 / weight_per_rep_15\n'
        '<end_of_step>\n'
        '\n'
        '# Now print the final answer\n'
        'print(reps_needed)\n'
        '<end_of_code>\n'
        '<output>16.0<end_of_output><answer>From the result, we can see that Terrell must lift the 15-pound weights \\boxed{16} times to lift the same total weight.\n'
        '<end_of_answer>'
    ),
    (
        'Question: Find the value of $x$ that satisfies $\\frac{\\sqrt{3x+5}}{\\sqrt{6x+5}}=\\frac{\\sqrt{5}}{3}$. Express your answer as a common fraction.\n'
        '<code>\n'
        'from sympy import symbols, Eq, solve, sqrt\n'
        '\n'
        '# Define the variable x\n'
        "x = symbols('x')\n"
        '<end_of_step>\n'
        '\n'
        '# Define the equation\n'
        'equation = Eq(sqrt(3*x + 5) / sqrt(6*x + 5), sqrt(5) / 3)\n'
        '<end_of_step>\n'
        '\n'
        '# Solve the equation for x\n'
        'solution = solve(equation, x)\n'
        '<end_of_step>\n'
        '\n'
        '# Now print the final answer\n'
        'print(solution)\n'
        '<end_of_code>\n'
        '<output>\n'
        '[20/3]\n'
        '<end_of_output><answer>From the result, we can see that the value of x is \\boxed{\\frac{20}{3}}\n'
        '<end_of_answer>'
    ),
)


SFT_FORMAT_INSTRUCTIONS: str = ""

# Prefix the exports put before a trace (the reference's extraction scripts hard-code it).
ASSISTANT_PREFIX: str = "<|assistant|>: Let's think step by step and solve the problem with code."
SFT_SUFFIX: str = "<|user|>:\n{input}\n" + ASSISTANT_PREFIX


class PromptError(ValueError):
    """A prompt template that cannot be filled (no `{input}` slot, too few few-shots)."""


def build_prompt(
    question: str,
    *,
    instructions: str = SFT_FORMAT_INSTRUCTIONS,
    suffix: str = SFT_SUFFIX,
    few_shots: Sequence[str] = (),
    num_few_shot: int = 0,
    step_delim: str = "\n",
    question_delim: str = "",
) -> str:
    """The prompt for a question, before any step text (the reference's `rstar_prompt_wrap`)."""
    if "{input}" not in suffix:
        raise PromptError(f"prompt suffix has no {{input}} slot: {suffix!r}")
    if num_few_shot > len(few_shots):
        raise PromptError(f"num_few_shot={num_few_shot} but only {len(few_shots)} few-shot examples")
    if num_few_shot == 1:
        examples = [few_shots[1] if len(few_shots) > 1 else few_shots[0]]  # the reference's pick
    else:
        examples = list(few_shots[:num_few_shot])
    if len(examples) > 1:
        header = "The following are %d demonstration examples." % len(examples)
        prompt = step_delim.join([instructions, header, *examples, ""])
    elif len(examples) == 1:
        prompt = step_delim.join([instructions, "The following is a demonstration example.", *examples, ""])
    else:
        prompt = step_delim.join([instructions, ""])
    # str.replace, not str.format: a template with other braces (LaTeX) must not break.
    filled = suffix.replace("{input}", question + question_delim)
    if prompt.strip() == "":
        return filled
    return step_delim.join([prompt, filled])


def prompt_for(question: str, cfg: SearchConfig) -> str:
    """`build_prompt` with the prompt fields of a `SearchConfig`."""
    return build_prompt(
        question,
        instructions=cfg.pot_format_instructions,
        suffix=cfg.pot_suffix,
        few_shots=cfg.few_shots,
        num_few_shot=cfg.num_few_shot,
        step_delim=cfg.step_delim,
        question_delim=cfg.question_delim,
    )


def export_question_prompt(question: str) -> str:
    """The question prompt the reference's SFT and pair extraction scripts put before traces."""
    return SFT_SUFFIX.replace("{input}", question)
