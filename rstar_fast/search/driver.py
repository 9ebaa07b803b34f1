"""The search driver: rStar-Math MCTS over the C++ forest, pipelined across problems.

One simulation is the reference's rollout: select a fresh leaf from the root, expand it
(generate candidate steps, run their code, score them with the PPM, grade answers), then keep
descending from it into its best child until every child below is terminal or the rollout has
taken max_depth steps (the reference's loop; the next leaf then waits for a later rollout). The pipelined
schedule keeps many simulations in flight and never waits for other problems; the lockstep
schedule advances every problem one level at a time, phase by phase, as the reference does.

Heavy per-node work lives in the forest (selection, backprop, prompt assembly); this module
holds only per-expansion bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from rstar_fast._core import NO_NODE, Forest
from rstar_fast.aio import gather_all
from rstar_fast.engines.base import (
    Completion, EngineError, EngineUnavailableError, PolicyEngine, PPMEngine, SamplingParams,
)
from rstar_fast.engines.stops import same_vocabulary
from rstar_fast.executor import ExecResult, StepExecutor
from rstar_fast.search import steps as st
from rstar_fast.search.config import SearchConfig
from rstar_fast.search.grading import Grader, answers_equivalent
from rstar_fast.search.problems import Problem
from rstar_fast.search.prompts import prompt_for
from rstar_fast.search.records import K_NO_PARENT, build_rstar_dict, tree_record
from rstar_fast.search.stats import PhaseClock
from rstar_fast.search.voting import Candidate, best_answer, evaluate

T = TypeVar("T")
log = logging.getLogger(__name__)

OnError = Callable[[Problem, Exception], None]  # a failed problem: go on, or raise to stop the run


def mixed_seed(seed: int, data: bytes) -> int:
    """A 31-bit sampling seed: the config's seed mixed with `data`."""
    return zlib.crc32(data, seed & 0xFFFFFFFF) & 0x7FFFFFFF


def path_seed(seed: int, prompt: Sequence[int] | np.ndarray) -> int:
    """The sampling seed of one expansion: the config's seed mixed with the path's tokens (as
    native int64 bytes), so a seeded search is reproducible whatever order expansions run in,
    and no two paths share their random draws."""
    return mixed_seed(seed, np.asarray(prompt, dtype=np.int64).tobytes())


def _engine_name(engine: object) -> str:
    return str(getattr(engine, "name", type(engine).__name__))


def checked_completions(policy: PolicyEngine, completions: object, n: int) -> list[Completion]:
    """The policy's answer, held to what the search builds on: n completions, each a text and
    the list of its token ids (the next prompt is the path's ids joined with a step's)."""
    if not isinstance(completions, (list, tuple)) or len(completions) != n:
        got = f"{len(completions)} completions" if isinstance(completions, (list, tuple)) else type(completions).__name__
        raise EngineError(f"policy {_engine_name(policy)}: {got} for n={n}")
    for i, c in enumerate(completions):
        text, ids = getattr(c, "text", None), getattr(c, "token_ids", None)
        if not isinstance(text, str) or type(ids) is not list:
            raise EngineError(f"policy {_engine_name(policy)}: completion {i} is not a Completion with a str text "
                              f"and a list of token ids (text: {type(text).__name__}, token_ids: {type(ids).__name__})")
        if text and not ids:
            raise EngineError(f"policy {_engine_name(policy)}: completion {i} has text ({text[:40]!r}) but no token ids")
    return list(completions)


def checked_scores(ppm: PPMEngine, scores: object, n: int) -> list[float]:
    """The PPM's answer as n floats in [-1, 1]: a score out of that range would outweigh the
    terminal rewards (+1 and -1) that Q values average, and NaN would read as "not scored"."""
    if type(scores) is list and len(scores) == n and all(type(s) is float and -1.0 <= s <= 1.0 for s in scores):
        return scores  # what every engine here gives: nothing to convert or name
    name = _engine_name(ppm)
    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__iter__"):
        raise EngineError(f"PPM {name}: scores must be a sequence of floats, not {type(scores).__name__}")
    values: list[float] = []
    for s in scores:
        try:
            if isinstance(s, (str, bytes)):
                raise TypeError
            values.append(float(s))
        except (TypeError, ValueError):
            raise EngineError(f"PPM {name}: score {len(values)} is {type(s).__name__} {str(s)[:40]!r}, "
                              "not a number") from None
        if not -1.0 <= values[-1] <= 1.0:
            raise EngineError(f"PPM {name}: score {len(values) - 1} is {values[-1]!r}, outside [-1, 1] "
                              "(an hf PPM with raw=true gives its head's raw output, which the search cannot use)")
    if len(values) != n:
        raise EngineError(f"PPM {name}: {len(values)} scores for {n} sequences")
    return values


def note_problem(error: BaseException, problem: Problem) -> None:
    """Say in `error` which problem's search raised it."""
    error.add_note(f"while searching problem {problem.id}")


@dataclass
class SearchResult:
    """One finished problem."""

    problem: Problem
    record: dict[str, Any]  # the trees.jsonl line
    pred: str | None  # the chosen answer
    correct: bool | None  # None without a gold answer
    rollouts: int
    nodes: int
    votes: dict[str, Any] = field(default_factory=dict)  # test-time answer selections


@dataclass
class _Tree:
    """Per-problem state the forest does not hold."""

    problem: Problem
    forest: Forest  # the forest the tree lives in (see SearchRunner.forest_nodes)
    root: int
    rollouts_started: int = 0
    rollouts_done: int = 0
    exhausted: bool = False  # the root became terminal: nothing left to search
    failed: bool = False  # its search raised and it was set aside (lockstep)
    errors: dict[int, int] = field(default_factory=dict)  # node -> consecutive code errors
    observations: dict[int, str] = field(default_factory=dict)  # code node -> its code's output
    # node -> texts of the code steps in the `<code>` block still open at it (absent: none);
    # a new step's program is this plus its own text (see steps.open_block)
    open_block: dict[int, str] = field(default_factory=dict)
    # non-terminal node -> depth (root: absent, 0); kept here because reading it from the
    # forest would be the first call after an await, on cold caches (~16 us an expansion)
    depth: dict[int, int] = field(default_factory=dict)
    final: dict[int, str] = field(default_factory=dict)  # terminal node -> answer or failure marker
    answers: dict[int, str] = field(default_factory=dict)  # answer node -> final answer
    answer_rollout: dict[int, int] = field(default_factory=dict)  # answer node -> rollout index
    answer_score: dict[int, float] = field(default_factory=dict)  # answer node -> PPM score
    answer_correct: dict[int, bool] = field(default_factory=dict)
    expanding: dict[int, asyncio.Future[None]] = field(default_factory=dict)


@dataclass
class _Expansion:
    """One leaf being expanded, carried from phase to phase."""

    tree: _Tree
    leaf: int
    rollout: int
    prompt: list[int] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    steps: list[st.ParsedStep] = field(default_factory=list)
    outcomes: list[st.StepOutcome] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # first value of each child (NaN: none)
    tokens: list[list[int]] = field(default_factory=list)  # each child's token ids


class SearchRunner:
    """Runs rStar-Math MCTS for many problems on one policy, one executor, and a forest.

    New trees go into `forest` until it holds `forest_nodes` nodes; then a fresh forest takes
    the new trees, and the old one is freed when its last tree is finished (a finished tree
    is exported, never read again: without this a long run's memory grows with every problem).
    Its forest calls name one node or a few as plain Python lists: the binding converts
    those directly, several times cheaper than building numpy arrays for them."""

    def __init__(
        self,
        config: SearchConfig,
        policy: PolicyEngine,
        executor: StepExecutor,
        grader: Grader,
        ppm: PPMEngine | None = None,
        num_threads: int = 1,
        forest_nodes: int = 1 << 20,
        on_error: OnError | None = None,
    ) -> None:
        if config.need_value_func and ppm is None:
            raise ValueError("this search config scores steps with a PPM (need_value_func), but no PPM was given")
        self.config = config
        self.policy = policy
        self.ppm = ppm if config.need_value_func else None
        self.executor = executor
        self.grader = grader
        self.tokenizer = policy.tokenizer
        self.prompt_start = list(getattr(self.tokenizer, "bos_ids", ()))
        # The PPM reads the policy's ids as they are; one with another vocabulary (a PPM trained
        # elsewhere) reads the text, re-tokenized as the reference's PPM reads it.
        ppm_tokenizer = getattr(self.ppm, "tokenizer", None)
        self.ppm_tokenizer = None
        if ppm_tokenizer is not None and not same_vocabulary(self.tokenizer, ppm_tokenizer):
            log.warning("the PPM's tokenizer differs from the policy's: the PPM's inputs are re-tokenized from text")
            self.ppm_tokenizer = ppm_tokenizer
            self.ppm_start = list(getattr(ppm_tokenizer, "bos_ids", ()))
        if forest_nodes < 1:
            raise ValueError(f"forest_nodes must be >= 1, got {forest_nodes}")
        self.num_threads = num_threads
        self.forest_nodes = forest_nodes
        self.forest = self._new_forest()
        self.on_error = on_error  # a failed problem, set aside: see `pipelined` and `_lockstep_phase`
        self.sampling = SamplingParams(
            n=config.n_generate_sample,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_tokens=config.max_tokens,
            stop=tuple(config.stop),
            seed=config.seed,
        )
        self.clock = PhaseClock()
        self._warned_full_prompt = False
        self.rollouts_done = 0
        self.problems_done = 0

    # ------------------------------------------------------------------ trees

    def _new_forest(self) -> Forest:
        cfg = self.config
        # With one simulation per tree virtual loss only perturbs the reference's choices.
        virtual_loss = cfg.virtual_loss if cfg.sims_per_tree > 1 else 0.0
        return Forest(
            c_uct=cfg.c_puct,
            max_depth=cfg.max_depth,  # children deeper than this are created terminal, as in the reference
            virtual_loss=virtual_loss,
            num_threads=self.num_threads,
            rule=cfg.selection,
        )

    def _new_tree(self, problem: Problem) -> _Tree:
        if self.forest.num_nodes >= self.forest_nodes:  # the old forest goes with its last tree
            self.forest = self._new_forest()
        forest = self.forest
        root = int(forest.add_trees(1)[0])
        prompt = self.prompt_start + self.tokenizer.encode(prompt_for(problem.question, self.config))
        if len(prompt) >= self.config.max_model_len and not self._warned_full_prompt:
            self._warned_full_prompt = True
            log.warning("problem %s: its prompt has %d tokens, which fills max_model_len (%d): no step can be "
                        "generated for it (raise max_model_len; further such problems are not named)",
                        problem.id, len(prompt), self.config.max_model_len)
        forest.set_texts([root], [""])
        forest.set_tokens([root], [prompt])
        return _Tree(problem=problem, forest=forest, root=root)

    def _path_tokens(self, tree: _Tree, leaf: int) -> np.ndarray:
        flat, _offsets = tree.forest.path_tokens([leaf])
        return flat

    # --------------------------------------------------------------- selection

    def _select(self, tree: _Tree) -> int:
        with self.clock.cpu("selection"):
            leaf = int(tree.forest.select([tree.root])[0])
            # NO_NODE is either a dead end the select just found and marked terminal (the
            # reference spends that rollout and searches on) or a terminal root (all done).
            if leaf == NO_NODE and tree.forest.is_terminal([tree.root])[0]:
                tree.exhausted = True
        return leaf

    def _descend(self, tree: _Tree, leaf: int) -> int:
        """After expanding `leaf`, the next leaf of the same rollout below it (or NO_NODE)."""
        with self.clock.cpu("selection"):
            return int(tree.forest.descend([leaf])[0])

    def _end(self, tree: _Tree, leaf: int) -> None:
        with self.clock.cpu("backprop"):
            tree.forest.cancel([leaf])

    # --------------------------------------------------------------- expansion

    async def generate_within_context(self, prompt: list[int], params: SamplingParams) -> list[Completion]:
        """The policy's completions, with prompt and step held to `max_model_len` tokens, as the
        reference's vLLM holds them (a step ends there; a full context gives an empty step,
        which ends the branch), whatever context the engine itself allows."""
        room = self.config.max_model_len - len(prompt)
        if room <= 0:
            return [Completion("", [], "length", None) for _ in range(params.n)]
        if room < params.max_tokens:
            params = dataclasses.replace(params, max_tokens=room)
        with self.clock.wall("generation"):
            completions = await self._answered("policy", self.policy.generate(prompt, params))
        return checked_completions(self.policy, completions, params.n)

    async def _answered(self, engine: str, call: Awaitable[T]) -> T:
        """The engine call's result, within `engine_timeout_s` (0: however long it takes)."""
        limit = self.config.engine_timeout_s
        if not limit:
            return await call
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await call
        except TimeoutError:
            if not deadline.expired():  # the engine's own: raised as it is
                raise
            raise EngineUnavailableError(f"the {engine} did not answer within engine_timeout_s = {limit:g} s") from None

    async def _generate(self, ex: _Expansion) -> None:
        with self.clock.cpu("parsing"):
            path = self._path_tokens(ex.tree, ex.leaf)
            ex.prompt = path.tolist()
            params = self.sampling
            if params.seed is not None:  # from the array: no list to convert back
                params = params.with_seed(path_seed(params.seed, path))
        completions = await self.generate_within_context(ex.prompt, params)
        with self.clock.cpu("parsing"):
            keep = st.select_samples([(c.text, c.stop) for c in completions])
            ex.completions = [completions[i] for i in keep]
            ex.steps = [st.parse_step(c.text, c.stop) for c in ex.completions]

    async def _execute(self, ex: _Expansion) -> None:
        code_steps = [i for i, s in enumerate(ex.steps) if s.runs_code]
        results: dict[int, ExecResult] = {}
        if code_steps:
            with self.clock.cpu("parsing"):
                block = ex.tree.open_block.get(ex.leaf, "")
                prefix = st.executor_code(block)
                programs = [st.executor_code(block + ex.steps[i].text) for i in code_steps]
            with self.clock.wall("execution"):
                if all(p.startswith(prefix) for p in programs):
                    ran = await self.executor.arun_siblings(prefix, [p[len(prefix) :] for p in programs])
                else:  # a step that rewrites the block's start: run each program whole
                    ran = await gather_all(*(self.executor.arun(p) for p in programs))
            results = dict(zip(code_steps, ran))
        with self.clock.cpu("parsing"):
            self._outcomes(ex, results)
            ex.tokens = self._encode_children(ex)

    def _outcomes(self, ex: _Expansion, results: dict[int, ExecResult]) -> None:
        depth = ex.tree.depth.get(ex.leaf, 0) + 1
        parent_errors = ex.tree.errors.get(ex.leaf, 0)
        cfg = self.config
        ex.outcomes = []
        for i, step in enumerate(ex.steps):
            r = results.get(i)
            observation = None if r is None else r.output if r.ok else (r.output or r.error)
            failed = False if r is None else st.code_failed(observation or "", not r.ok, cfg.error_rule, r.crashed)
            ex.outcomes.append(
                st.finish_step(
                    step,
                    depth=depth,
                    max_depth=cfg.max_depth,
                    parent_consecutive_errors=parent_errors,
                    errors_threshold=cfg.errors_threshold,
                    observation=observation,
                    failed=failed,
                    step_delim=cfg.step_delim,
                )
            )

    def _child_tokens(self, ex: _Expansion) -> list[list[int]]:
        """Each child's token ids (encoded by `_execute`)."""
        return ex.tokens

    def _encode_children(self, ex: _Expansion) -> list[list[int]]:
        """Each child's token ids: the completion's own ids, plus the text the search added."""
        tokens = []
        for c, o in zip(ex.completions, ex.outcomes):
            if o.text == c.text:
                tokens.append(c.token_ids)
            elif o.text.startswith(c.text):
                tokens.append(list(c.token_ids) + self.tokenizer.encode(o.text[len(c.text) :]))
            else:
                tokens.append(self.tokenizer.encode(o.text))
        return tokens

    async def _score(self, ex: _Expansion, child_tokens: list[list[int]]) -> None:
        """PPM scores: a new non-terminal child's first value (rounds 2-4 and eval), and an
        answer's value when there is no ground truth (eval)."""
        ex.values = [math.nan] * len(ex.outcomes)
        if self.ppm is None:
            return
        cfg = self.config
        wanted = [
            i
            for i, o in enumerate(ex.outcomes)
            if (not o.terminal and cfg.update_leaf_value and not cfg.terminal_sample)
            or (o.is_answer and not cfg.is_sampling)
        ]
        await self.score_children(ex, child_tokens, wanted)

    async def score_children(self, ex: _Expansion, child_tokens: list[list[int]], wanted: list[int]) -> None:
        """The PPM's scores of the `wanted` children into ex.values. A path longer than the
        context is cut as the reference's prevent_overlength cuts it: its first
        max_model_len - 1 tokens."""
        if not wanted or self.ppm is None:
            return
        limit = self.config.max_model_len
        paths = [ex.prompt + child_tokens[i] for i in wanted]
        if self.ppm_tokenizer is not None:
            skip = len(self.prompt_start)
            paths = [self.ppm_start + self.ppm_tokenizer.encode(self.tokenizer.decode(p[skip:])) for p in paths]
        with self.clock.wall("ppm"):
            scores = await self._answered("PPM", self.ppm.score([p if len(p) < limit else p[: limit - 1] for p in paths]))
        for i, s in zip(wanted, checked_scores(self.ppm, scores, len(wanted)), strict=True):
            ex.values[i] = s

    async def _commit(self, ex: _Expansion, child_tokens: list[list[int]]) -> None:
        """Grade answers, then write the children and their values into the forest."""
        cfg = self.config
        tree = ex.tree
        answers = [i for i, o in enumerate(ex.outcomes) if o.is_answer]
        verdicts: dict[int, bool] = {}
        if answers and cfg.is_sampling and tree.problem.answer is not None:
            with self.clock.wall("grading"):
                got = await gather_all(
                    *(self.grader.agrade(tree.problem.answer, ex.outcomes[i].final_answer) for i in answers)
                )
            verdicts = dict(zip(answers, got))
        with self.clock.cpu("backprop"):
            n = len(ex.outcomes)
            outcomes = ex.outcomes
            children = tree.forest.expand(
                [ex.leaf], [n], [math.nan if o.terminal else v for o, v in zip(outcomes, ex.values)],
                texts=[o.text for o in outcomes], tokens=child_tokens, terminal=[o.terminal for o in outcomes],
            ).tolist()
            if n == 0:
                return
            parent_block = tree.open_block.get(ex.leaf, "")
            depth = tree.depth.get(ex.leaf, 0) + 1
            local_nodes, local_values, path_nodes, path_values = [], [], [], []
            for i, (child, o) in enumerate(zip(children, outcomes)):
                if not o.terminal:
                    tree.depth[child] = depth
                    block = st.open_block(parent_block, o.text)
                    if block:
                        tree.open_block[child] = block
                if o.consecutive_errors:
                    tree.errors[child] = o.consecutive_errors
                if o.observation is not None:
                    tree.observations[child] = o.observation
                if o.final_answer:
                    tree.final[child] = o.final_answer
                if o.is_failed_terminal:
                    local_nodes.append(child)
                    local_values.append(cfg.negative_reward)
                elif o.is_answer:
                    tree.answers[child] = o.final_answer
                    tree.answer_rollout[child] = ex.rollout
                    if not math.isnan(ex.values[i]):
                        tree.answer_score[child] = ex.values[i]
                    if i in verdicts:
                        tree.answer_correct[child] = verdicts[i]
                        path_nodes.append(child)
                        path_values.append(cfg.positive_reward if verdicts[i] else cfg.negative_reward)
                    elif not cfg.is_sampling and not math.isnan(ex.values[i]):
                        path_nodes.append(child)
                        path_values.append(ex.values[i])
            if local_nodes:
                tree.forest.update_local(local_nodes, local_values)
            if path_nodes:
                tree.forest.update_path(path_nodes, path_values)

    async def _expand(self, tree: _Tree, leaf: int, rollout: int) -> None:
        ex = _Expansion(tree=tree, leaf=leaf, rollout=rollout)
        await self._generate(ex)
        await self._execute(ex)
        tokens = self._child_tokens(ex)
        await self._score(ex, tokens)
        await self._commit(ex, tokens)

    # ---------------------------------------------------------------- rollouts

    async def _claim(self, tree: _Tree, leaf: int) -> bool:
        """Take the right to expand `leaf`; False (after waiting) when another simulation had it."""
        other = tree.expanding.get(leaf)
        if other is None:
            tree.expanding[leaf] = asyncio.get_running_loop().create_future()
            return True
        await asyncio.shield(other)
        return False

    def _release(self, tree: _Tree, leaf: int) -> None:
        fut = tree.expanding.pop(leaf, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _rollout(self, tree: _Tree, rollout: int) -> bool:
        """One simulation; False when the select found nothing (a dead end, or the tree is
        exhausted). Like the reference's rollout it takes at most max_depth steps (an expansion,
        or a move below a leaf another simulation expanded) and then ends where it is."""
        leaf = self._select(tree)
        if leaf == NO_NODE:
            return False
        try:
            for _ in range(self.config.max_depth):
                if await self._claim(tree, leaf):
                    try:
                        await self._expand(tree, leaf, rollout)
                    finally:
                        self._release(tree, leaf)
                # else another simulation expanded this leaf meanwhile: continue below it
                nxt = self._descend(tree, leaf)
                if nxt == NO_NODE:
                    break
                leaf = nxt
            # out of steps, the next leaf waits for a later rollout
        finally:  # on every exit (an error, a cancellation too) the simulation ends where it is
            self._end(tree, leaf)
        return True

    async def _search_tree(self, tree: _Tree) -> None:
        iterations = self.config.iterations

        async def worker() -> None:
            while tree.rollouts_started < iterations and not tree.exhausted:
                index = tree.rollouts_started
                tree.rollouts_started += 1
                if await self._rollout(tree, index):
                    tree.rollouts_done += 1
                    self.rollouts_done += 1
                elif tree.exhausted:  # the root is terminal: this rollout never started
                    tree.rollouts_started -= 1

        await gather_all(*(worker() for _ in range(self.config.sims_per_tree)))

    # ------------------------------------------------------------------ results

    async def _finish(self, tree: _Tree) -> SearchResult:
        """The finished MCTS problem: each rollout's answer is its best-scored answer (PPM
        score, else the node's Q), and the majority over them is the chosen answer."""
        q = tree.forest.q(np.fromiter(tree.answers, dtype=np.int64, count=len(tree.answers)))
        per_rollout: dict[int, list[Candidate]] = {}
        for (node, answer), q_value in zip(tree.answers.items(), q.tolist()):
            score = tree.answer_score.get(node, q_value)
            per_rollout.setdefault(tree.answer_rollout[node], []).append(Candidate(answer, score))
        return await self._result(tree, [best_answer(per_rollout[r]) for r in sorted(per_rollout)], "majority")

    async def _result(self, tree: _Tree, trajectories: list[Candidate | None], choice: str,
                      k: int | None = None) -> SearchResult:
        """Export the tree and vote over `trajectories` (one answer per trajectory, None when
        it found none) with the top `k` (default top_k_vote) in the majority; `choice`
        ("majority" or "best") names the vote that is the answer."""
        problem = tree.problem
        with self.clock.cpu("export"):
            arrays = tree.forest.export_tree(tree.root)
            ids = arrays["ids"]
            local = {int(node): i for i, node in enumerate(ids.tolist())}
            parents = [local.get(int(p), K_NO_PARENT) for p in arrays["parents"].tolist()]
            final_answers = [""] * len(ids)
            for node, answer in tree.final.items():
                final_answers[local[node]] = answer
            texts = tree.forest.texts(ids)
            values = np.nan_to_num(arrays["first_value"], nan=0.0)
            # Q in double precision, as the reference's value_sum / visit_count: float32 puts
            # 5/6 - 1/3 below the exports' 0.5 margin and breaks their ties by rounding
            visits = arrays["visits"]
            q = np.divide(arrays["value_sum"], visits, out=np.zeros(len(ids)), where=visits > 0)
            # Under the raised rule a failed step need not say so in its text (its block may
            # stay open), so the tree records which steps failed, for the SFT export's filter.
            extra = None
            if self.config.error_rule == "raised":
                extra = {"code_error": [int(node) in tree.errors for node in ids.tolist()]}
            observations = {local[node]: text for node, text in tree.observations.items() if node in local}
            rstar = build_rstar_dict(parents, texts, values, q, visits, final_answers, problem.question,
                                     extra=extra, observations=observations)
        votes: dict[str, Any] = {}
        pred: str | None = None
        correct: bool | None = None
        if any(t is not None for t in trajectories):
            with self.clock.wall("grading"):
                votes = await asyncio.to_thread(
                    evaluate, problem.answer, trajectories, k or self.config.top_k_vote, grade=self.grader.grade,
                    equiv=self._same_answer,
                )
            pred = votes[choice]
            correct = votes.get("maj" if choice == "majority" else "pass1")
        elif problem.answer is not None:
            correct = False
        record = tree_record(problem.record, problem.id, rstar, pred=pred, correct=correct, votes=votes,
                             question=problem.question, answer=problem.answer)
        self.problems_done += 1
        return SearchResult(problem, record, pred, correct, tree.rollouts_done, len(ids), votes)

    def _same_answer(self, a: str, b: str) -> bool:
        """Two answers that count as one in a vote, by this runner's grader (not a second one)."""
        return answers_equivalent(a, b, self.grader)

    # --------------------------------------------------------------- schedules

    async def _solve(self, problem: Problem) -> SearchResult:
        tree = self._new_tree(problem)
        await self._search_tree(tree)
        return await self._finish(tree)

    def run_pipelined(self, problems: Iterable[Problem]) -> AsyncGenerator[SearchResult, None]:
        """Search every problem, keeping up to `max_in_flight` simulations busy; yield each
        problem as soon as its tree is finished."""
        return pipelined(problems, max(1, self.config.max_in_flight // self.config.sims_per_tree), self._solve,
                         self.on_error)

    async def run_lockstep(self, problems: Iterable[Problem]) -> AsyncGenerator[SearchResult, None]:
        """The reference's schedule: batches of problems advance together, one level at a
        time, and each phase (generation, execution, PPM, grading) waits for all of them."""
        batch_size = max(1, self.config.max_in_flight)
        batch: list[Problem] = []
        for problem in problems:
            batch.append(problem)
            if len(batch) == batch_size:
                for result in await self._lockstep_batch(batch):
                    yield result
                batch = []
        if batch:
            for result in await self._lockstep_batch(batch):
                yield result

    async def _lockstep_batch(self, problems: list[Problem]) -> list[SearchResult]:
        trees = [self._new_tree(p) for p in problems]
        for rollout in range(self.config.iterations):
            live = [(t, self._select(t)) for t in trees if not (t.exhausted or t.failed)]
            live = [(t, leaf) for t, leaf in live if leaf != NO_NODE]
            started = [t for t, _ in live]
            for _ in range(self.config.max_depth):  # the reference's steps per rollout
                if not live:
                    break
                exps = [_Expansion(tree=t, leaf=leaf, rollout=rollout) for t, leaf in live]
                try:
                    exps = await self._lockstep_phase(exps, self._generate)
                    exps = await self._lockstep_phase(exps, self._execute)
                    exps = await self._lockstep_phase(exps, lambda e: self._score(e, self._child_tokens(e)))
                    exps = await self._lockstep_phase(exps, lambda e: self._commit(e, self._child_tokens(e)))
                except BaseException:  # the batch is lost, but no simulation is left in flight
                    for t, leaf in live:
                        if not t.failed:
                            self._end(t, leaf)
                    raise
                nxt = []
                for e in exps:
                    child = self._descend(e.tree, e.leaf)
                    if child == NO_NODE:
                        self._end(e.tree, e.leaf)
                    else:
                        nxt.append((e.tree, child))
                live = nxt
            for t, leaf in live:
                self._end(t, leaf)
            for t in started:
                if not t.failed:
                    t.rollouts_started += 1
                    t.rollouts_done += 1
                    self.rollouts_done += 1
        return [await self._finish(t) for t in trees if not t.failed]

    async def _lockstep_phase(self, exps: list[_Expansion],
                              step: Callable[[_Expansion], Awaitable[None]]) -> list[_Expansion]:
        """One phase of every expansion, all at once. A problem whose phase raises is set aside
        (its simulation ended, its tree dropped from the batch) through `on_error`; without
        one the error is raised."""
        errors: dict[int, Exception] = {}

        async def one(i: int, e: _Expansion) -> None:
            try:
                await step(e)
            except Exception as error:
                note_problem(error, e.tree.problem)
                if self.on_error is None:
                    raise
                errors[i] = error

        await gather_all(*(one(i, e) for i, e in enumerate(exps)))
        for i, error in errors.items():
            e = exps[i]
            e.tree.failed = True
            self._end(e.tree, e.leaf)
            self.on_error(e.tree.problem, error)  # type: ignore[misc]  # it may stop the batch
        return [e for i, e in enumerate(exps) if i not in errors]

    def run(self, problems: Iterable[Problem]) -> AsyncGenerator[SearchResult, None]:
        """Search the problems by the config's mode and schedule; yield each one as it finishes."""
        if self.config.mode != "mcts":  # beam search and best-of-N, on this runner's machinery
            from rstar_fast.search.baselines import run_baseline  # it imports this module

            return run_baseline(self, problems)
        if self.config.schedule == "lockstep":
            return self.run_lockstep(problems)
        return self.run_pipelined(problems)


@dataclass(frozen=True)
class _Fed:
    """Queue marker: the feeder has started this many problems and there are no more."""

    count: int


@dataclass(frozen=True)
class _Failed:
    """Queue item: a problem whose search raised."""

    problem: Problem
    error: Exception


async def pipelined(
    problems: Iterable[Problem], max_problems: int, solve: Callable[[Problem], Awaitable[SearchResult]],
    on_error: OnError | None = None,
) -> AsyncGenerator[SearchResult, None]:
    """Solve up to `max_problems` problems at once, each on its own; yield results as they
    finish. A problem's error (noted with its id) goes to `on_error(problem, error)`, and the
    run goes on unless that raises; without `on_error` it is raised to the consumer. Either
    way, the problems finished before it are handed out first; leaving early cancels the rest.
    A problem holds its slot until the consumer takes its result: a slow consumer slows the
    search rather than have finished problems pile up in memory, unwritten."""
    slots = asyncio.Semaphore(max_problems)
    done: asyncio.Queue[SearchResult | _Failed | BaseException | _Fed] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def one(problem: Problem) -> None:
        try:
            done.put_nowait(await solve(problem))
        except Exception as e:  # surfaced to the consumer below
            note_problem(e, problem)
            done.put_nowait(_Failed(problem, e))
        except BaseException as e:
            done.put_nowait(e)
            raise

    async def feed() -> None:
        count = 0
        try:
            for problem in problems:
                await slots.acquire()
                task = asyncio.create_task(one(problem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                count += 1
        except Exception as e:
            done.put_nowait(e)
        done.put_nowait(_Fed(count))

    feeder = asyncio.create_task(feed())
    total: int | None = None
    handled = 0
    try:
        while total is None or handled < total:
            item = await done.get()
            if isinstance(item, _Fed):
                total = item.count
                continue
            slots.release()  # taken: the next problem may start
            if not isinstance(item, (_Failed, BaseException)):
                handled += 1
                yield item
                continue
            error: BaseException = item.error if isinstance(item, _Failed) else item
            if isinstance(item, _Failed) and on_error is not None:
                try:
                    on_error(item.problem, item.error)
                    handled += 1
                    continue
                except Exception as stop:
                    error = stop
            while not done.empty():  # problems that finished or failed meanwhile are not lost
                other = done.get_nowait()
                if isinstance(other, _Failed) and on_error is not None:
                    with contextlib.suppress(Exception):  # recorded; the run stops with `error` anyway
                        on_error(other.problem, other.error)
                elif not isinstance(other, (_Fed, _Failed, BaseException)):
                    yield other
            raise error
    finally:
        feeder.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(feeder, *tasks, return_exceptions=True)
