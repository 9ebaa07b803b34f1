"""The simulated engine: step format, code that runs, determinism, stops, latency model, PPM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import random
import re
import statistics
from pathlib import Path

import pytest

from rstar_fast.engines import EngineError, EngineSpecError, SamplingParams, load_policy, load_ppm
from rstar_fast.engines.sim import SimPolicy, SimPPM
from rstar_fast.engines.sim_steps import boxed_answer, make_plan, next_piece, parse_solution
from rstar_fast.synthetic import generate_problems

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STOPS = ("<end_of_step>", "<end_of_code>", "<end_of_answer>")
STEP_RE = re.compile(r"^(<code>\n|\n\n)# Step (\d+): [^\n]+\n[^\n]+\n<end_of_step>$")
FINAL_RE = re.compile(
    r"^(<code>\n|\n\n)# Now print the final answer\nprint\([^\n]+\)\n<end_of_code>$"
)
ANSWER_RE = re.compile(r"^\n<answer>[^\n]*\\boxed\{.+\}[^\n]*\n<end_of_answer>$")


def chat_prompt(question: str) -> str:
    return (
        f"<|user|>:\n{question}\n<|assistant|>: "
        "Let's think step by step and solve the problem with code."
    )


def round1_prompt(question: str) -> str:
    """The reference's round-1 prompt: instruction, two few-shots, then the question."""
    fmt = json.loads((SHARED / "rstar_format" / "mcts_prompt.json").read_text())
    shots = json.loads((SHARED / "rstar_format" / "few_shots.json").read_text())
    intro = "The following are 2 demonstration examples."
    head = "\n".join([fmt["pot_format_instructions"], intro, *shots, ""])
    return "\n".join([head, fmt["pot_suffix"].format(input=f"{question}\n")])


def run_code(solution: str) -> tuple[str, bool]:
    """Run the `<code>` block's code with plain exec, as the step executor would."""
    code = solution[solution.index("<code>") + len("<code>") :]
    code = code.split("<end_of_code>")[0].replace("<end_of_step>", "")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {})  # noqa: S102 - the engine's own arithmetic steps
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}", False
    return out.getvalue().strip(), True


async def solve(policy: SimPolicy, prompt: str, sample: int = 0) -> tuple[list[str], str | None]:
    """Drive one trajectory to the end as the search does: returns the pieces and the box."""
    tok = policy.tokenizer
    text, pieces = prompt, []
    for _ in range(12):
        params = SamplingParams(n=sample + 1, stop=STOPS)
        completions = await policy.generate(tok.encode(text), params)
        c = completions[sample]
        assert c.finish_reason == "stop" and c.stop is not None and c.text.endswith(c.stop)
        assert tok.decode(c.token_ids) == c.text
        pieces.append(c.text)
        text += c.text
        if c.stop == "<end_of_code>":
            output, _ = run_code(text[len(prompt) :])
            text += f"\n<output>{output}<end_of_output>"
        if c.stop == "<end_of_answer>":
            return pieces, boxed_answer(c.text)
    raise AssertionError(f"no answer after 12 steps: {pieces}")


def check_format(pieces: list[str]) -> None:
    assert pieces[0].startswith("<code>\n")
    for k, piece in enumerate(pieces[:-2]):
        m = STEP_RE.match(piece)
        assert m, piece
        assert int(m.group(2)) == k + 1
        assert m.group(1) == ("<code>\n" if k == 0 else "\n\n")
    assert FINAL_RE.match(pieces[-2]), pieces[-2]
    assert ANSWER_RE.match(pieces[-1]), pieces[-1]


@pytest.fixture
def problems() -> list[dict]:
    return generate_problems(40, seed=5)


async def test_perfect_policy_solves_synthetic_problems(problems: list[dict]) -> None:
    policy = load_policy("sim:p_correct=1,p_error=0")
    for p in problems[:15]:
        pieces, boxed = await solve(policy, chat_prompt(p["question"]))
        check_format(pieces)
        assert len(pieces) == p["n_steps"] + 2  # steps, the final print, the answer
        assert boxed == p["answer"]
        output, ok = run_code("".join(pieces))
        assert ok and float(output) == int(p["answer"])  # "12.0" after a split's true division


async def test_sim_solves_recall_problems_and_misreads_them_plausibly() -> None:
    perfect = load_policy("sim:p_correct=1,p_error=0")
    recall = [p for p in generate_problems(60, seed=6, recall=0.7) if any(len(op) == 3 for op in p["solution"])]
    for p in recall[:10]:
        pieces, boxed = await solve(perfect, chat_prompt(p["question"]))
        assert boxed == p["answer"]
        assert "as many" in "".join(pieces)  # the comment restates the sentence
    # a wrong recall step often uses another amount of the question, as a misreading model would
    rng = random.Random(2)
    misread = 0
    for p in recall:
        plan = make_plan(p["question"], None)
        i = next(i for i, op in enumerate(p["solution"]) if len(op) == 3)
        prefix = ""
        for _ in range(i):
            prefix += next_piece(plan, parse_solution(prefix), rng, p_correct=1, p_error=0)
        others = {op[1] for op in p["solution"][:i]} - {p["solution"][i][1]}
        for _ in range(10):
            step = next_piece(plan, parse_solution(prefix), rng, p_correct=0, p_error=0)
            m = re.search(r"(\d+)\n<end_of_step>$", step)
            misread += bool(m) and int(m.group(1)) in others
    assert misread > len(recall)


async def test_round1_prompt_finds_the_question(problems: list[dict]) -> None:
    policy = load_policy("sim:p_correct=1,p_error=0")
    p = problems[0]
    pieces, boxed = await solve(policy, round1_prompt(p["question"]))
    check_format(pieces)
    assert boxed == p["answer"]


async def test_wrong_and_failing_steps_really_compute_wrong_or_fail(problems: list[dict]) -> None:
    policy = load_policy("sim:p_correct=0.5,p_error=0.2,seed=3")
    outcomes = {"right": 0, "wrong": 0, "error": 0}
    for p in problems:
        for sample in range(3):
            pieces, boxed = await solve(policy, chat_prompt(p["question"]), sample)
            output, ok = run_code("".join(pieces))
            if not ok:
                assert "NameError" in output
                outcomes["error"] += 1
            else:
                assert float(boxed) == float(output)  # the answer boxes what the code printed
                outcomes["right" if float(output) == int(p["answer"]) else "wrong"] += 1
    assert all(count > 5 for count in outcomes.values()), outcomes


async def test_per_step_probabilities_are_honoured(problems: list[dict]) -> None:
    policy = load_policy("sim:p_correct=0.7,p_error=0.1,seed=1")
    tok = policy.tokenizer
    counts = {"right": 0, "error": 0, "other": 0}
    for p in generate_problems(100, seed=9):
        start = p["solution"][0][1]
        prompt = tok.encode(chat_prompt(p["question"]))
        completions = await policy.generate(prompt, SamplingParams(n=10, stop=STOPS))
        for c in completions:
            code = c.text.split("\n")[2]
            var = code.split(" = ")[0]
            if code == f"{var} = {start}":
                counts["right"] += 1
            elif not run_code(c.text)[1]:
                counts["error"] += 1
            else:
                counts["other"] += 1
    total = sum(counts.values())
    assert abs(counts["right"] / total - 0.7) < 0.05, counts
    assert abs(counts["error"] / total - 0.1) < 0.04, counts


async def test_math500_questions_with_registered_gold_answers() -> None:
    records = json.loads((SHARED / "math500_test.json").read_text())[:25]
    policy = load_policy("sim:p_correct=1,p_error=0")
    policy.register_problems({r["question"]: r["answer"] for r in records})
    for r in records:
        pieces, boxed = await solve(policy, chat_prompt(r["question"]))
        check_format(pieces)
        output, ok = run_code("".join(pieces))
        assert ok and output == r["answer"].strip()
        assert boxed == r["answer"].strip()
    wrong = load_policy("sim:p_correct=0,p_error=0")
    wrong.register_problems({r["question"]: r["answer"] for r in records})
    for r in records[:10]:
        _, boxed = await solve(wrong, chat_prompt(r["question"]))
        assert boxed != r["answer"].strip()


async def test_unknown_question_still_gets_valid_steps() -> None:
    policy = load_policy("sim")
    pieces, boxed = await solve(policy, chat_prompt("What is the meaning of 6 times 7?"))
    output, ok = run_code("".join(pieces))
    assert boxed is not None
    assert not ok or boxed == output


async def test_deterministic_for_seed_and_path(problems: list[dict]) -> None:
    prompt = load_policy("sim").tokenizer.encode(chat_prompt(problems[3]["question"]))
    params = SamplingParams(n=8, stop=STOPS)

    async def texts(spec: str, p: SamplingParams = params) -> list[str]:
        return [c.text for c in await load_policy(spec).generate(prompt, p)]

    first = await texts("sim:seed=4,p_correct=0.5")
    assert first == await texts("sim:seed=4,p_correct=0.5")
    assert first != await texts("sim:seed=5,p_correct=0.5")
    assert first != await texts("sim:seed=4,p_correct=0.5", SamplingParams(n=8, stop=STOPS, seed=1))
    greedy = await texts("sim:seed=4,p_correct=0.5", SamplingParams(n=5, temperature=0, stop=STOPS))
    assert len(set(greedy)) == 1


async def test_n_samples_are_distinct_ish(problems: list[dict]) -> None:
    policy = load_policy("sim")
    completions = await policy.generate(
        policy.tokenizer.encode(chat_prompt(problems[0]["question"])),
        SamplingParams(n=12, stop=STOPS),
    )
    assert len(completions) == 12
    assert len({c.text for c in completions}) >= 3


async def test_stop_strings_length_and_eos(problems: list[dict]) -> None:
    policy = load_policy("sim:p_correct=1,p_error=0")
    tok = policy.tokenizer
    prompt = tok.encode(chat_prompt(problems[0]["question"]))
    # no stop strings: the whole solution, output and answer included, ended by EOS
    (full,) = await policy.generate(prompt, SamplingParams(stop=()))
    assert full.finish_reason == "stop" and full.stop is None
    assert full.text.endswith("<end_of_answer>") and "<output>" in full.text
    assert tok.decode(full.token_ids) == full.text
    # the earliest stop string ends the text and is kept
    (c,) = await policy.generate(prompt, SamplingParams(stop=("<end_of_code>", "\n# Step 2")))
    assert c.stop == "\n# Step 2" and c.text.endswith("<end_of_step>\n\n# Step 2")
    assert c.text == full.text[: len(c.text)]
    (c,) = await policy.generate(prompt, SamplingParams(stop=("<end_of_code>",)))
    assert c.stop == "<end_of_code>" and c.text.endswith("print(" + c.text.split("print(")[-1])
    # max_tokens cuts: "length", no stop string
    (c,) = await policy.generate(prompt, SamplingParams(max_tokens=5, stop=STOPS))
    assert c.finish_reason == "length" and c.stop is None and len(c.token_ids) == 5
    assert c.text == full.text[: len(c.text)]
    # after the answer there is nothing left to write
    finished = tok.encode(chat_prompt(problems[0]["question"]) + full.text)
    (done,) = await policy.generate(finished, SamplingParams())
    assert done.text == "" and done.finish_reason == "stop"


async def test_stats_and_close(problems: list[dict]) -> None:
    policy = load_policy("sim")
    prompt = policy.tokenizer.encode(chat_prompt(problems[0]["question"]) * 3)
    out = await policy.generate(prompt, SamplingParams(n=3, stop=STOPS))
    await policy.generate(prompt, SamplingParams(n=3, stop=STOPS))
    assert policy.stats.requests == 2
    assert policy.stats.prompt_tokens == 2 * len(prompt)
    assert policy.stats.cached_prompt_tokens >= len(prompt) - 64
    assert policy.stats.generated_tokens >= sum(len(c.token_ids) for c in out)
    with pytest.raises(EngineError, match="sim policy: token id 10000 is outside"):
        await policy.generate([10_000], SamplingParams())
    await policy.close()
    with pytest.raises(EngineError):
        await policy.generate(prompt, SamplingParams())


# -- latency model (modeled engine time, so nothing here depends on the machine's speed) ----

async def _batch(spec: str, prompts: list[list[int]], n: int = 1) -> SimPolicy:
    policy = load_policy(spec)
    await asyncio.gather(*(policy.generate(p, SamplingParams(n=n, stop=STOPS)) for p in prompts))
    await policy.close()
    return policy


async def test_concurrent_requests_batch(problems: list[dict]) -> None:
    tok = load_policy("sim").tokenizer
    prompts = [tok.encode(chat_prompt(p["question"])) for p in problems]
    spec = "sim:profile=h100-7b,time_scale=200"
    one = await _batch(spec, prompts[:1])
    many = await _batch(spec, (prompts * 2)[:64])
    assert one.model_seconds > 0
    assert many.model_seconds < 8 * one.model_seconds  # far below 64x: one batch
    assert many.stats.busy_seconds == pytest.approx(many.model_seconds / 200)
    # with a cap of 4 sequences in flight the same work queues and takes much longer
    capped = await _batch(spec + ",max_num_seqs=4", (prompts * 2)[:64])
    assert capped.model_seconds > 4 * many.model_seconds


async def test_prefix_cache_hits_skip_prefill() -> None:
    tok = load_policy("sim").tokenizer
    long_prompt = tok.encode(round1_prompt("What is 1 + 1?"))
    spec = "sim:profile=a100-7b,time_scale=200"
    policy = load_policy(spec)
    await policy.generate(long_prompt, SamplingParams(max_tokens=1))
    cold = policy.model_seconds
    await policy.generate(long_prompt, SamplingParams(max_tokens=1))
    warm = policy.model_seconds - cold
    assert policy.stats.cached_prompt_tokens >= len(long_prompt) - 64
    assert warm < 0.3 * cold
    await policy.close()
    uncached = await _batch(spec + ",prefix_cache=false", [long_prompt, long_prompt])
    assert uncached.stats.cached_prompt_tokens == 0


async def test_instant_profile_has_no_scheduler() -> None:
    policy = load_policy("sim:profile=instant")
    await policy.generate(policy.tokenizer.encode("hello"), SamplingParams())
    assert policy.model_seconds == 0.0


# -- the PPM ---------------------------------------------------------------------------------

async def _scored_prefixes(corr: float, problems: list[dict]) -> tuple[list[float], list[int]]:
    policy = load_policy("sim:p_correct=0.5,p_error=0.1,seed=2")
    ppm = load_ppm(f"sim:corr={corr},seed=1", policy=policy)
    tok = policy.tokenizer
    seqs, labels = [], []
    for p in problems:
        prompt = chat_prompt(p["question"])
        for c in await policy.generate(tok.encode(prompt), SamplingParams(n=6, stop=STOPS)):
            start = p["solution"][0][1]
            code = c.text.split("\n")[2]
            seqs.append(tok.encode(prompt + c.text))
            labels.append(1 if code.endswith(f" = {start}") else -1)
    return await ppm.score(seqs), labels


async def test_ppm_scores_correlate_with_correctness(problems: list[dict]) -> None:
    strong, labels = await _scored_prefixes(0.9, problems)
    noise, _ = await _scored_prefixes(0.0, problems)
    assert all(-1.0 <= s <= 1.0 for s in strong + noise)
    assert 0.8 < statistics.correlation(strong, labels) <= 1.0
    assert abs(statistics.correlation(noise, labels)) < 0.2
    mid, _ = await _scored_prefixes(0.5, problems)
    assert 0.3 < statistics.correlation(mid, labels) < 0.8
    assert strong == (await _scored_prefixes(0.9, problems))[0]  # deterministic


async def test_ppm_judges_answers_with_the_shared_gold() -> None:
    question = "Compute $\\dbinom{8}{4}$."
    policy = load_policy("sim:p_correct=1,p_error=0")
    ppm = load_ppm("sim:corr=1", policy=policy)
    policy.register_problems({question: "70"})  # registered after the PPM was built
    pieces, boxed = await solve(policy, chat_prompt(question))
    assert boxed == "70"
    tok = policy.tokenizer
    right = chat_prompt(question) + "".join(pieces)
    wrong = right.replace("\\boxed{70}", "\\boxed{71}")
    scores = await ppm.score([tok.encode(right), tok.encode(wrong)])
    assert scores[0] > 0.8 and scores[1] < -0.8
    assert isinstance(ppm, SimPPM) and await ppm.score([]) == []


async def test_ppm_latency_is_a_prefill() -> None:
    ppm = load_ppm("sim:profile=h100-7b,time_scale=500")
    tok = load_policy("sim").tokenizer
    seq = tok.encode(round1_prompt("What is 2 + 2?"))
    await ppm.score([seq])
    assert ppm.model_seconds > 0 and ppm.stats.prompt_tokens == len(seq)
    await ppm.close()


# -- specs ----------------------------------------------------------------------------------

def test_specs_and_options() -> None:
    policy = load_policy("sim:profile=h100-7b,p_correct=0.6,p_error=0.1,seed=3,time_scale=2.5")
    assert isinstance(policy, SimPolicy)
    got = (policy.p_correct, policy.p_error, policy.seed, policy.profile.name)
    assert got == (0.6, 0.1, 3, "h100-7b")
    assert load_policy("sim:a100-7b").profile.name == "a100-7b"
    assert load_policy("sim", p_correct=0.9).p_correct == 0.9
    assert load_policy("sim:p_correct=0.3", p_correct=0.9).p_correct == 0.3  # the spec wins
    assert load_ppm("sim:corr=0.4").corr == 0.4


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("sim:temperature=1", {}, "'temperature'"),
        ("sim:p_correct=abc", {}, "'p_correct'"),
        ("sim:profile=b200-70b", {}, "sim policy: unknown profile 'b200-70b'"),
        ("sim:p_correct=0.9,p_error=0.2", {}, "p_correct"),
        ("sim:time_scale=0", {}, "sim policy: time_scale"),
        ("sim:oops", {}, "oops"),
        ("sim", {"bogus": 1}, "'bogus'"),
        ("sim:max_num_seqs=0", {}, "sim policy: max_num_seqs"),
    ],
)
def test_bad_policy_specs(spec: str, options: dict, match: str) -> None:
    with pytest.raises(EngineSpecError, match=match):
        load_policy(spec, **options)


def test_bad_ppm_specs() -> None:
    with pytest.raises(EngineSpecError, match="'p_correct'"):
        load_ppm("sim:p_correct=0.5")
    with pytest.raises(EngineSpecError, match="corr"):
        load_ppm("sim:corr=2")
    with pytest.raises(EngineSpecError, match="SimPolicy"):
        load_ppm("sim", policy=object())
    with pytest.raises(EngineSpecError, match="sim PPM: unknown profile 'instan'"):
        load_ppm("sim:profile=instan")


async def test_close_fails_requests_in_flight() -> None:
    policy = load_policy("sim:profile=h100-7b")  # real time: a step takes ~0.1 s
    prompt = policy.tokenizer.encode("Question: 1 + 1?\n")
    task = asyncio.create_task(policy.generate(prompt, SamplingParams()))
    await asyncio.sleep(0.01)
    await policy.close()
    with pytest.raises(EngineError, match="close"):
        await task


def test_reasoning_lines_lengthen_steps_without_changing_their_code():
    from rstar_fast.engines import SamplingParams, load_policy
    from rstar_fast.synthetic import generate_problems

    problem = generate_problems(1, seed=5)[0]
    prompt = f"<|user|>:\n{problem['question']}\n<|assistant|>: Let's think step by step and solve the problem with code."
    params = SamplingParams(n=1, temperature=0, stop=("<end_of_step>", "<end_of_code>", "<end_of_answer>"))

    async def first_step(spec):
        policy = load_policy(spec)
        out = await policy.generate(policy.tokenizer.encode(prompt), params)
        await policy.close()
        return out[0].text

    plain = asyncio.run(first_step("sim:profile=instant,seed=1"))
    long = asyncio.run(first_step("sim:profile=instant,seed=1,reasoning=3"))
    assert len(long) > len(plain) + 150
    code = lambda t: [l for l in t.splitlines() if l and not l.startswith("#")]  # noqa: E731
    assert code(long) == code(plain)


def test_busy_fraction_counts_the_busy_spell_going_on(monkeypatch) -> None:
    """An engine with requests in flight all along reads busy while it runs, not only after."""
    from rstar_fast.engines import base

    now = [100.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    stats = base.EngineStats(started_at=100.0)
    clock = base.BusyClock(stats)
    now[0] = 110.0
    with clock:  # busy from 110 on
        with clock:
            now[0] = 120.0
            assert stats.busy_fraction() == pytest.approx(0.5)
        now[0] = 130.0
        assert stats.busy_fraction() == pytest.approx(20 / 30)
    now[0] = 140.0  # idle from 130
    assert stats.busy_seconds == pytest.approx(20.0) and stats.busy_since is None
    assert stats.busy_fraction() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "code",
    [
        "area = 5²",  # isdigit() holds for '5²', int() refuses it
        "print({[1]: 2})",  # a literal that raises TypeError
        "x = 10\n" + "x = x * x\n" * 13 + "print(x)",  # an int too long for str()
    ],
)
async def test_lines_the_evaluator_cannot_follow_leave_the_state_unknown(code: str) -> None:
    # text a real policy can write, which the simulated PPM reads when it guides one
    solution = f"<code>\n# Step 1: compute\n{code}\n<end_of_step>"
    state = parse_solution(solution)
    assert state.unknown and state.error is None
    ppm = SimPPM(corr=1.0)
    question = "Tom has 3 apples and buys 4 more. How many?"
    (score,) = await ppm.score([ppm.tokenizer.encode(chat_prompt(question) + solution)])
    assert score == 0.0  # corr 1 and an unknown state: no opinion


async def test_bad_ids_raise_engine_errors_naming_the_engine() -> None:
    policy, ppm = SimPolicy(), SimPPM()
    for call, match in [
        (lambda: policy.generate([70000], SamplingParams()), "sim policy: token id 70000 is outside the vocabulary"),
        (lambda: policy.generate([-1], SamplingParams()), "sim policy: token id -1 is outside the vocabulary"),
        (lambda: policy.generate([], SamplingParams()), "sim policy: empty token sequence"),
        (lambda: ppm.score([[9999]]), "sim PPM: token id 9999 is outside the vocabulary"),
        (lambda: ppm.score([[104], []]), "sim PPM: empty token sequence"),
    ]:
        with pytest.raises(EngineError, match=match):
            await call()
    await policy.close()
    await ppm.close()


async def test_a_cancelled_request_frees_its_batch_slots() -> None:
    # four slots: a request of four long samples fills them, another waits for them; both are
    # cancelled mid-decode, and a small request then takes modeled time as if alone
    spec = "sim:profile=h100-7b,max_num_seqs=4,reasoning=40,prefix_cache=false,time_scale=20"
    prompt = SimPolicy().tokenizer.encode(chat_prompt("What is 3+4?"))
    small = SamplingParams(n=1, max_tokens=2048)

    policy = load_policy(spec)
    await policy.generate(prompt, small)
    alone = policy.model_seconds
    await policy.close()

    policy = load_policy(spec)
    big = [asyncio.create_task(policy.generate(prompt, SamplingParams(n=4, max_tokens=2048))) for _ in range(2)]
    await asyncio.sleep(0.02)  # about 0.4 s modeled: the first decodes, the second queues
    for task in big:
        task.cancel()
    await asyncio.gather(*big, return_exceptions=True)
    before = policy.model_seconds
    await policy.generate(prompt, small)
    assert policy.model_seconds - before < 1.1 * alone  # not waiting for work nobody wants
    await policy.close()


async def test_an_engine_closes_at_the_end_of_an_async_with() -> None:
    """Engines from load_policy / load_ppm, and one's own subclass, are async context managers."""
    from rstar_fast.engines import PPMEngine

    closed: list[str] = []

    class Counting(PPMEngine):
        async def score(self, sequences):  # type: ignore[no-untyped-def]
            return [0.0] * len(sequences)

        async def close(self) -> None:
            closed.append("own")

    async with Counting() as ppm:
        assert await ppm.score([[1]]) == [0.0]
    assert closed == ["own"]
    async with load_policy("sim:profile=instant") as policy, load_ppm("sim") as sim_ppm:
        assert isinstance(policy, SimPolicy) and isinstance(sim_ppm, SimPPM)


def test_sampling_params_name_a_value_of_the_wrong_kind() -> None:
    import numpy as np

    for kwargs, match in [({"n": "2"}, "n must be a whole number >= 1, got '2'"), ({"n": True}, "n must"),
                          ({"max_tokens": 0}, "max_tokens"), ({"top_k": -5}, "top_k must be a whole number >= 1"),
                          ({"top_k": 2.5}, "top_k"), ({"seed": "7"}, "seed must be a whole number, got '7'"),
                          ({"temperature": "hot"}, "temperature must be a number"), ({"top_p": None}, "top_p"),
                          ({"stop": "<end_of_step>"}, "stop must be a sequence of strings"),
                          ({"n": 0}, "n must be a whole number >= 1"), ({"top_k": 0}, "top_k must be a whole number >= 1"),
                          ({"top_p": 0.0}, "top_p must be in (0, 1]"), ({"temperature": -0.1}, "temperature")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            SamplingParams(**kwargs)
    # what a config may hold (512.0, numpy numbers) and any iterable of stops are taken, as plain values
    ok = SamplingParams(n=np.int64(2), max_tokens=512.0, top_k=-1.0, seed=-3, temperature=np.float32(0.5),
                        stop=iter(["a"]))
    assert ok.stop == ("a",) and (ok.n, ok.max_tokens, ok.top_k, ok.temperature) == (2, 512, -1, 0.5)
    assert type(ok.n) is int and type(ok.max_tokens) is int and type(ok.temperature) is float
    with pytest.raises(ValueError, match="stop must be"):
        SamplingParams(stop=5)  # type: ignore[arg-type]


def test_with_seed_copies_the_params_with_only_the_seed_changed() -> None:
    params = SamplingParams(n=3, temperature=0.5, top_p=0.9, top_k=7, max_tokens=64, stop=("a", "b"), seed=1)
    seeded = params.with_seed(12345)
    assert seeded == dataclasses.replace(params, seed=12345) and params.seed == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        seeded.seed = 2  # type: ignore[misc]
    for bad in ("7", 7.0, True, None):
        with pytest.raises(ValueError, match="seed must be an int"):
            params.with_seed(bad)  # type: ignore[arg-type]


def test_an_engine_busy_on_one_event_loop_refuses_another_instead_of_hanging() -> None:
    # two threads' searches sharing one engine: the second loop's call would have taken the
    # engine's scheduler over and left the first loop's requests unanswered for ever
    import threading

    from rstar_fast.engines import EngineInUseError

    policy = load_policy("sim:profile=h100-7b,time_scale=5")
    prompt = policy.tokenizer.encode("What is 3 + 4?" * 20)
    params = SamplingParams(n=2, max_tokens=64, stop=("<end_of_step>",))
    first_started, outcome = threading.Event(), {}

    def first() -> None:
        async def call():
            task = asyncio.ensure_future(policy.generate(prompt, params))
            await asyncio.sleep(0)
            first_started.set()
            return await task
        outcome["first"] = len(asyncio.run(call()))

    thread = threading.Thread(target=first, daemon=True)  # (before the fix it hung for good)
    thread.start()
    assert first_started.wait(30)
    with pytest.raises(EngineInUseError, match="another event loop"):
        asyncio.run(policy.generate(prompt, params))
    thread.join(30)
    assert outcome == {"first": 2}
    assert len(asyncio.run(policy.generate(prompt, params))) == 2  # idle again: it moves


async def test_the_simulated_ppm_s_scores_follow_its_seed() -> None:
    policy = load_policy("sim:profile=instant,seed=2")
    sequences = [policy.tokenizer.encode(f"<|user|>:\nWhat is {i} + 1?\n<|assistant|>: step {i}") for i in range(8)]
    first = await load_ppm("sim:corr=0.5,seed=1", policy=policy).score(sequences)
    again = await load_ppm("sim:corr=0.5,seed=1", policy=policy).score(sequences)
    other = await load_ppm("sim:corr=0.5,seed=2", policy=policy).score(sequences)
    assert first == again and first != other
