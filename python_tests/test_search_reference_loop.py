"""Our search against a line-by-line transcription of the reference's MCTS loop (microsoft/rStar,
branch rStar-math: agents/mcts.py, nodes/mcts_node.py, the sample filter of llms/llms.py and the
rollout loop of solver.py), both driven by the same deterministic fake policy and PPM, whose
steps and scores depend only on the partial solution's text. Every node's text, final answer,
value, Q value and visit count must agree, in round 1, rounds 2-4 and at test time.

The forest's own arithmetic is checked against python_tests/reference_mcts.py (test_forest_golden);
this checks the driver around it: which nodes a rollout expands, how samples are filtered, when a
step's code output is shown, which values are backed up where. The reference wraps a code-error
terminal's output twice where the step closed its code block (a declared difference)."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from rstar_fast.engines.base import Completion, PolicyEngine, PPMEngine
from rstar_fast.engines.tokenizer import ByteTokenizer
from rstar_fast.executor import StepExecutor
from rstar_fast.search.config import load_config
from rstar_fast.search.driver import SearchRunner
from rstar_fast.search.grading import Grader
from rstar_fast.search.problems import problems_from_records
from rstar_fast.search.prompts import prompt_for

QUESTION = "What is 3 + 4?"
GOLD = "7"
STEP_END, CODE_END, OUTPUT_END, ANSWER_END = "<end_of_step>", "<end_of_code>", "<end_of_output>", "<end_of_answer>"


def H(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


def fake_steps(partial: str, n: int, salt: str) -> list[tuple[str, str]]:
    """n (text-with-stop, stop) completions for a partial solution: a function of the text alone."""
    out = []
    k = partial.count("# Step") + 1
    for i in range(n):
        h = H(salt, partial, i)
        if OUTPUT_END in partial:
            ans = ["7", "7", "5", "9"][h % 4]
            body = f"\n<answer>The answer is \\boxed{{{ans}}}"
            out.append((body + ANSWER_END, ANSWER_END))
            continue
        r = h % 12
        pre = "<code>" if partial == "" else ""
        if r <= 4:
            body = f"{pre}\n# Step {k}: compute\nv{k} = {(h >> 8) % 2}\n"
            stop = STEP_END
        elif r == 5:
            body = f"{pre}\n# Step {k}: oops\nzz = undefined_name_{(h >> 8) % 2}\n"
            stop = STEP_END
        elif r <= 8:
            body = f"{pre}\n# Step {k}: Now print the final answer\nprint({(h >> 8) % 3 + 6})\n"
            stop = CODE_END
        elif r == 9:
            body = f"{pre}\n# Step {k}: Now print the final answer\nprint(undefined_thing)\n"
            stop = CODE_END
        elif r == 10 and k >= 3:
            ans = ["7", "5"][(h >> 8) % 2]
            body = f"\n<answer>\\boxed{{{ans}}}"
            stop = ANSWER_END
        elif partial == "":
            body = f"{pre}\n# Step {k}: compute\nv{k} = 1\n"
            stop = STEP_END
        else:
            body = f"{pre}\n# Step {k}: maybe \\boxed{{}} later\nw{k} = 1\n"
            stop = STEP_END
        out.append((body + stop, stop))
    return out


def fake_value(partial: str) -> float:
    return ((H("ppm", partial) % 129) - 64) / 64.0  # exact in float32


# ----------------------------------------------------------------------------- ours
class FakePolicy(PolicyEngine):
    def __init__(self, prompt_text: str, salt: str):
        self.tokenizer = ByteTokenizer()
        self.prompt_text = prompt_text
        self.salt = salt

    async def generate(self, prompt_ids, params):
        text = self.tokenizer.decode(prompt_ids)
        assert text.startswith(self.prompt_text), text[:200]
        partial = text[len(self.prompt_text):]
        res = []
        for t, s in fake_steps(partial, params.n, self.salt):
            res.append(Completion(t, self.tokenizer.encode(t), "stop", s))
        return res


class FakePPM(PPMEngine):
    def __init__(self, prompt_text: str):
        self.tokenizer = ByteTokenizer()
        self.prompt_text = prompt_text

    async def score(self, sequences):
        out = []
        for s in sequences:
            text = self.tokenizer.decode(s)
            assert text.startswith(self.prompt_text)
            out.append(fake_value(text[len(self.prompt_text):]))
        return out


async def run_ours(cfg, executor, grader, salt):
    prompt_text = prompt_for(QUESTION, cfg)
    policy = FakePolicy(prompt_text, salt)
    ppm = FakePPM(prompt_text) if cfg.need_value_func else None
    problems = problems_from_records([{"question": QUESTION, "answer": GOLD}]).problems
    runner = SearchRunner(cfg, policy, executor, grader, ppm=ppm)
    results = [r async for r in runner.run(problems)]
    return results[0]


def _solve(runner: SearchRunner):
    """The runner's result for the one problem, QUESTION."""

    async def run():
        return [r async for r in runner.run(problems_from_records([{"question": QUESTION, "answer": GOLD}]).problems)]

    (result,) = asyncio.run(run())
    return result


# ----------------------------------------------------------------------------- reference transcription
NO_VALID_CHILD = "Fail to generate parsable text for next step."
TOO_MANY_STEPS = "Fail to sove the problem within limited steps."
TOO_MANY_CODE_ERRORS = "Too many consecutive steps have code errors."


class RNode:
    def __init__(self, parent=None, c_puct=2.0):
        self.parent = parent
        self.children = []
        self.depth = 0
        self.is_terminal = False
        self.value = 0
        self.inited = False
        self.visits = 0
        self.vsum = 0
        self.tag = "0"
        self.consecutive_errors = 0
        self.c_puct = c_puct
        self.state = {"text": "", "extra_info": "", "action": "", "action_input": "", "final_answer": ""}

    def q_value(self):
        return 0 if self.visits == 0 else self.vsum / self.visits

    def update(self, v):
        if self.inited is False:
            self.inited = True
            self.value = v
        self.visits += 1
        self.vsum += v

    def update_recursive(self, v, start):
        self.update(v)
        if self.tag == start.tag:
            return
        self.parent.update_recursive(v, start)

    def puct(self):
        if not self.parent:
            return 0
        q = self.q_value() if self.visits > 0 else 0
        if self.parent.visits == 0 or self.visits == 0:
            u = 0
        else:
            u = self.c_puct * np.sqrt(np.log(self.parent.visits) / self.visits)
        return q + u


def ref_extract_boxed_answer(text):
    start = text.rfind(r"\boxed{")
    if start == -1:
        return text
    end = None
    stack = []
    answer = text[start:]
    for i, c in enumerate(answer):
        if c == "{":
            stack.append(i)
        elif c == "}":
            start = stack.pop()
            if len(stack) == 0:
                end = i
                break
    return answer[start + 1: end]


def ref_extract_math_answer(ans):
    try:
        t = ans.split('.\n')[0].strip()
        e = t[0:-1] if len(t) > 0 and t[-1] == '.' else t
        e = e.strip()
        from rstar_fast.search.steps import remove_text_box
        return remove_text_box(ref_extract_boxed_answer(e))
    except Exception:
        return "[invalid]"


def ref_unwrap(text):
    pr = {"action": "", "action_input": "", "final_answer": ""}
    if "boxed" in text:
        pr["final_answer"] = ref_extract_math_answer(text)
        return text, pr
    pr["action"] = "python_interpreter"
    pr["action_input"] = text
    return text, pr


def ref_extract_program(result, last_only=False):
    program = ""
    start = False
    result = result.replace("<end_of_step>", "")
    for line in result.split("\n"):
        if line.find("<code>") != -1:
            program = "" if last_only else program + "\n# ========\n"
            start = True
        elif line.find("<end_of_code>") != -1:
            start = False
        elif start:
            program += line + "\n"
    if not program:
        program = result
    return program.strip()


def ref_collect_action_inputs(node, action):
    ais = []
    while node:
        if OUTPUT_END in node.state['text'] or CODE_END in node.state['text']:
            break
        if node.state["action"] == action:
            ai = node.state["action_input"]
            if ai and "TimeoutError" not in node.state["text"].split(ai)[-1]:
                ais.append(ai)
        node = node.parent
    return ais[::-1]


class RefMCTS:
    def __init__(self, cfg, executor, gold, error_fn, salt):
        self.cfg = cfg
        self.salt = salt
        self.executor = executor
        self.gold = gold
        self.root = RNode(c_puct=cfg.c_puct)
        self.current_nodes = []
        self.candidate_nodes = [self.root]
        self.search_node = None
        self.error_fn = error_fn
        self.answers = []  # (rollout, answer, value)
        self.rollout_idx = 0

    def partial(self, node):
        t = []
        while node:
            if node.state['text']:
                t.append(node.state['text'])
            node = node.parent
        return "".join(reversed(t))

    def code_execution(self, node, pr):
        hist = ref_collect_action_inputs(node, pr["action"])
        program = ref_extract_program("".join(hist) + pr["action_input"])
        if program.startswith("# ========"):
            program = program[len("# ========"):]
        r = self.executor.run(program)
        return (r.output if r.ok else (r.output or r.error)).strip(), r

    def select_child(self, node):
        best_value = -float("inf")
        best = []
        for child in node.children:
            if child.is_terminal:
                continue
            p = child.puct()
            if p == best_value:
                best.append(child)
            elif p > best_value:
                best_value = p
                best = [child]
        return best[0] if best else None

    def selection(self, from_root=False):
        node = self.root if from_root else self.search_node
        if node is None:
            return None
        if node.children or node.is_terminal:
            nxt = self.select_child(node)
            if nxt is None:
                node.is_terminal = True
            node = nxt
        return None if (node is None or node.is_terminal) else node

    def eval_final_answer(self, node):
        if node.state["final_answer"] in [NO_VALID_CHILD, TOO_MANY_STEPS, TOO_MANY_CODE_ERRORS]:
            node.update(self.cfg.negative_reward)
            return
        if self.cfg.is_sampling:
            correct = node.state["final_answer"].strip() == self.gold
            node.update_recursive(self.cfg.positive_reward if correct else self.cfg.negative_reward, self.root)
        else:
            self.candidate_nodes.append(node)

    def create_child(self, step_result, pr, node):
        new = RNode(parent=node, c_puct=self.cfg.c_puct)
        new.tag = f"{node.tag}.{len(node.children) + 1}"
        new.depth = node.depth + 1
        if pr["final_answer"]:
            new.is_terminal = True
            new.state["text"] = step_result
            new.state["final_answer"] = pr["final_answer"]
            self.eval_final_answer(new)
        elif pr["action"]:
            observation, r = self.code_execution(node, pr)
            new.state["action"] = pr["action"]
            new.state["action_input"] = pr["action_input"]
            new.state["observation"] = observation
            if CODE_END in pr["action_input"]:
                observation = f"<output>{observation}{OUTPUT_END}"
                new.state["text"] = f"{step_result}\n{observation}"
            else:
                new.state["text"] = step_result
            if self.error_fn(observation, r):
                new.consecutive_errors = node.consecutive_errors + 1
                if new.consecutive_errors >= self.cfg.errors_threshold:
                    observation = f"<output>{observation}{OUTPUT_END}"
                    step_result = step_result + CODE_END if CODE_END not in step_result else step_result
                    new.state["text"] = f"{step_result}\n{observation}"
                    new.is_terminal = True
                    new.state["final_answer"] = TOO_MANY_CODE_ERRORS
                    self.eval_final_answer(new)
        else:
            new.state["text"] = step_result
        if not new.is_terminal and new.depth > self.cfg.max_depth:
            new.is_terminal = True
            new.state["final_answer"] = TOO_MANY_STEPS
            self.eval_final_answer(new)
        node.children.append(new)

    def llm(self, node):
        outs = fake_steps(self.partial(node), self.cfg.n_generate_sample, self.salt)
        seen, filt = set(), []
        for t, s in outs:
            key = t[: -len(s)]
            if key not in seen:
                filt.append((t, s))
                seen.add(key)
        end = [o for o in filt if o[1] == ANSWER_END]
        return end[:1] if end else filt

    def generate_next_step(self):
        self.candidate_nodes = []
        cur = self.current_nodes[0]
        for t, s in self.llm(cur):
            step_result, pr = ref_unwrap(t)
            self.create_child(step_result, pr, cur)
        if self.cfg.update_leaf_value:
            for c in cur.children:
                if c not in self.candidate_nodes and c.visits < 1:
                    self.candidate_nodes.append(c)

    def select_next_step(self, outputs=None, from_root=False):
        self.search_node = self.current_nodes[0] if self.current_nodes else None
        self.current_nodes = []
        if outputs:
            for cand, v in zip(self.candidate_nodes, outputs):
                if cand.is_terminal and self.cfg.is_sampling:
                    continue
                if cand.is_terminal and cand.state["final_answer"]:
                    if cand.state["final_answer"] in [NO_VALID_CHILD, TOO_MANY_STEPS, TOO_MANY_CODE_ERRORS]:
                        cand.update(self.cfg.negative_reward)
                    else:
                        self.answers.append((self.rollout_idx, cand.state["final_answer"], v))
                        cand.update_recursive(v, self.root)
                else:
                    if self.cfg.terminal_sample:
                        pass
                    else:
                        cand.update(v)
        sel = self.selection(from_root=from_root)
        if sel is not None:
            self.current_nodes.append(sel)

    def solve(self):
        cfg = self.cfg
        for rollout in range(cfg.iterations):
            self.select_next_step(from_root=True)
            self.rollout_idx = rollout
            for step in range(cfg.max_depth):
                ok = any(not (n.is_terminal or n.depth > cfg.max_depth) for n in self.current_nodes)
                if not ok:
                    break
                if self.current_nodes[0].children:
                    self.select_next_step(None)
                    continue
                self.generate_next_step()
                if cfg.need_value_func:
                    outs = [fake_value(self.partial(c)) for c in self.candidate_nodes]
                else:
                    outs = None
                self.select_next_step(outs)

    def states(self):
        out = {}
        cands = [self.root]
        while cands:
            n = cands.pop(0)
            out[n.tag] = dict(text=n.state["text"], final_answer=n.state["final_answer"], value=float(n.value),
                              q_value=float(n.q_value()), visit_count=n.visits,
                              observation=n.state.get("observation"))
            cands.extend(n.children)
        return out


def _states(record: dict) -> dict:
    return {t: dict(text=n["text"], final_answer=n["final_answer"], value=n["value"], q_value=n["q_value"],
                    visit_count=n["visit_count"], observation=n.get("observation")) for t, n in record["rstar"].items()}


@pytest.fixture(scope="module")
def tools():
    with StepExecutor(workers=1, timeout_s=5.0) as executor, Grader(workers=1) as grader:
        yield executor, grader


@pytest.mark.parametrize("salt", ["s0", "s1", "s2", "s3"])
@pytest.mark.parametrize("preset, sizes", [
    ("round1", dict(iterations=10, n_generate_sample=4, max_depth=5)),
    ("round2", dict(iterations=10, n_generate_sample=4, max_depth=5)),
    ("eval", dict(iterations=8, n_generate_sample=6, max_depth=5)),
])
@pytest.mark.parametrize("error_rule", ["substring", "raised"])
def test_the_search_builds_the_reference_s_tree(tools, salt, preset, sizes, error_rule) -> None:
    executor, grader = tools
    cfg = load_config(preset, overrides=dict(sizes, error_rule=error_rule))
    ours = _states(asyncio.run(run_ours(cfg, executor, grader, salt)).record)
    if error_rule == "substring":
        def failed(obs, r):
            return "error" in obs.lower()
    else:
        def failed(obs, r):
            return not r.ok
    ref = RefMCTS(cfg, executor, GOLD, failed, salt)
    ref.solve()
    theirs = ref.states()
    assert sorted(ours) == sorted(theirs)
    for tag in ours:
        a, b = ours[tag], theirs[tag]
        if "<output><output>" in b["text"]:  # the reference's double wrap of a code-error terminal
            b = dict(b, text=a["text"])
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-9) if isinstance(a[key], float) else a[key] == b[key], \
                (tag, key, a[key], b[key])
    assert len(ours) > 10  # a tree with room for the rules to differ


class CountingPPM(FakePPM):
    """FakePPM that counts the sequences it scores."""

    def __init__(self, prompt_text: str):
        super().__init__(prompt_text)
        self.scored = 0

    async def score(self, sequences):
        self.scored += len(sequences)
        return await super().score(sequences)


def test_the_ppm_scores_each_new_non_terminal_child_once_and_nothing_else(tools) -> None:
    """Rounds 2-4 score a new step once, and never an answer or a failed step (a terminal's
    value comes from the ground truth or is -1): PPM calls are what a user pays for."""
    executor, grader = tools
    cfg = load_config("round2", overrides=dict(iterations=10, n_generate_sample=4, max_depth=5))
    prompt_text = prompt_for(QUESTION, cfg)
    ppm = CountingPPM(prompt_text)
    result = _solve(SearchRunner(cfg, FakePolicy(prompt_text, "s0"), executor, grader, ppm=ppm))
    nodes = result.record["rstar"]
    non_terminal = [t for t, n in nodes.items() if t != "0" and not n["final_answer"]]
    assert len(nodes) > 10 and ppm.scored == len(non_terminal)


class FailingPolicy(PolicyEngine):
    """Every step's code raises."""

    def __init__(self):
        self.tokenizer = ByteTokenizer()

    async def generate(self, prompt_ids, params):
        text = f"<code>\n# Step 1: divide\nx = {len(prompt_ids)} / 0\n<end_of_step>"
        return [Completion(text, self.tokenizer.encode(text), "stop", "<end_of_step>")] * params.n


def test_a_failed_step_is_never_an_answer_to_vote_for(tools) -> None:
    """A failed terminal carries the reference's failure marker as its final_answer: it must
    not become the prediction."""
    executor, grader = tools
    cfg = load_config("round1", overrides=dict(iterations=3, n_generate_sample=2, max_depth=4))
    result = _solve(SearchRunner(cfg, FailingPolicy(), executor, grader))
    assert any(n["final_answer"] == TOO_MANY_CODE_ERRORS for n in result.record["rstar"].values())
    assert result.pred is None and result.correct is False


def test_each_rollout_s_answer_is_its_best_scored_and_the_majority_over_them_is_chosen() -> None:
    """Per rollout, the answer with the highest PPM score (the node's Q only where it has none);
    one candidate per rollout, not per answer node; the majority of them is the answer."""
    from types import SimpleNamespace

    from rstar_fast.search.voting import Candidate

    got = {}

    async def record_vote(tree, trajectories, choice, k=None):
        got.update(trajectories=trajectories, choice=choice, k=k)

    runner = SearchRunner.__new__(SearchRunner)
    runner._result = record_vote
    q = {1: 0.9, 2: -0.5, 3: 0.4}
    forest = SimpleNamespace(q=lambda ids: np.array([q[int(i)] for i in ids]))
    # rollout 0 found two answers: "7" has the higher PPM score, "5" the higher Q
    tree = SimpleNamespace(answers={1: "5", 2: "7", 3: "9"}, answer_score={1: 0.2, 2: 0.6},
                           answer_rollout={1: 0, 2: 0, 3: 1}, forest=forest)
    asyncio.run(SearchRunner._finish(runner, tree))
    assert got == {"trajectories": [Candidate("7", 0.6), Candidate("9", 0.4)], "choice": "majority", "k": None}


class LoopingPolicy(PolicyEngine):
    """A first step whose code never ends, then the answer."""

    STEP = "<code>\nwhile True:\n    pass\nprint(1)\n<end_of_code>"
    ANSWER = "<answer>The answer is \\boxed{7}.\n<end_of_answer>"

    def __init__(self):
        self.tokenizer = ByteTokenizer()

    async def generate(self, prompt_ids, params):
        steps = self.tokenizer.decode(prompt_ids).rpartition(QUESTION)[2]  # (the few-shot prompt has code too)
        text = self.ANSWER if "<code>" in steps else self.STEP
        stop = next(s for s in params.stop if text.endswith(s))
        return [Completion(text, self.tokenizer.encode(text), "stop", stop)] * params.n


def test_a_step_that_timed_out_shows_the_reference_s_timeout_text(grader) -> None:
    cfg = load_config("round1", overrides=dict(iterations=1, n_generate_sample=1, errors_threshold=2))
    with StepExecutor(workers=1, timeout_s=1.0) as executor:
        result = _solve(SearchRunner(cfg, LoopingPolicy(), executor, grader))
    texts = [n["text"] for n in result.record["rstar"].values()]
    want = "<output>TimeoutError: 'Execution of the code snippet has timed out for exceeding 1 seconds.'<end_of_output>"
    assert any(want in t for t in texts), texts
