"""Baselines on the search's own machinery: step-level beam search and best-of-N.

Both run on a `SearchRunner` (its policy and PPM engines, step executor, grader, forest and
phase clock) and reuse its expansion phases (`_generate`, `_execute`, `_child_tokens`,
`_commit`), so steps are parsed, executed and made terminal exactly as in MCTS, and every
problem's tree lands in the forest and in `trees.jsonl` like an MCTS tree. Problems are
pipelined: each advances on its own, as many at once as `max_in_flight` allows (a problem
counts `step_beam_width` or `bon_n` simulations).

Step-level beam search (`mode: bs`, the reference's `BS` agent, preset `eval_bs`):
- Level by level from the root, each beam is expanded with `n_generate_sample` samples (one
  request per beam, so a level has up to `step_beam_width * n_generate_sample` candidates;
  duplicates are dropped and an `<end_of_answer>` sample stands alone, as in MCTS).
- Every new non-terminal candidate and every answer is scored by the PPM.
- Candidates are sorted by PPM score (stable: beam order, then sample order, on ties). Each
  answer among them is a finished solution and retires one beam (the reference's
  `current_top_num -= 1`); the next beams are the best `width` non-terminal candidates;
  failed terminals are dropped.
- It stops when no beam is left or after `max_depth` levels (the reference's loop bound).
- The answer is the finished solution with the best PPM score (the reference sorts its
  `solutions` by value); votes over the finished solutions are reported as for MCTS.
  Deviation: the reference's last line of `select_next_step` re-slices the sorted candidates,
  terminal ones included, and then zips the beams with the prompts of only the live ones,
  which attaches children to the wrong (even terminal) nodes and can make the width negative;
  here terminal candidates never take a beam and the width stops at 0.

Best-of-N (`mode: best_of_n`, ours): `bon_n` independent solutions, each generated step by
step with code execution as in the search (the rStar format needs the executor's output
after `<end_of_code>`, so whole completions are not possible). The root is expanded once with
`bon_n` samples, not deduplicated; then each solution continues alone, one sample per step,
with its own sampling seed (so solutions that share a first step still diverge on engines
that sample deterministically per prompt and seed) until it ends. In the tree the root has
`bon_n` children, each the head of a chain. With a PPM only the answers are scored (nothing
ranks intermediate steps). The answer: the best PPM score (`bon_vote: ppm`) or the majority
over all N answers (`bon_vote: majority`, self-consistency; ties to the higher score, then
the earlier solution). Votes (best, majority, PPM-weighted, pass@n) are over all N.

`rollouts` of a result: `step_beam_width` for beam search (each beam is one trajectory),
`bon_n` for best-of-N.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable

import numpy as np

from rstar_fast.aio import gather_all
from rstar_fast.engines.base import SamplingParams
from rstar_fast.search import steps as st
from rstar_fast.search.driver import (
    SearchResult, SearchRunner, _Expansion, _Tree, mixed_seed, pipelined,
)
from rstar_fast.search.problems import Problem
from rstar_fast.search.voting import Candidate


def run_baseline(runner: SearchRunner, problems: Iterable[Problem]) -> AsyncGenerator[SearchResult, None]:
    """Run the runner's config mode (`bs` or `best_of_n`) over problems, pipelined; yield each
    problem as soon as it is finished."""
    mode = runner.config.mode
    if mode == "bs":
        solve: Callable[[Problem], Awaitable[SearchResult]] = BeamSearch(runner).solve
        per_problem = runner.config.step_beam_width
    elif mode == "best_of_n":
        solve = BestOfN(runner).solve
        per_problem = runner.config.bon_n
    else:
        raise ValueError(f"run_baseline: mode {mode!r} is not a baseline (bs, best_of_n)")
    return pipelined(problems, max(1, runner.config.max_in_flight // per_problem), solve, runner.on_error)


class _Baseline:
    """What both baselines share: expansion phases, PPM scoring, and the finished result."""

    def __init__(self, runner: SearchRunner) -> None:
        self.runner = runner
        self.config = runner.config
        self.clock = runner.clock

    async def _score(self, ex: _Expansion, child_tokens: list[list[int]], steps_too: bool) -> None:
        """PPM scores of the answers, and (`steps_too`) of the non-terminal children."""
        ex.values = [math.nan] * len(ex.outcomes)
        wanted = [i for i, o in enumerate(ex.outcomes) if o.is_answer or (steps_too and not o.terminal)]
        await self.runner.score_children(ex, child_tokens, wanted)

    @staticmethod
    def _children(tree: _Tree, node: int) -> list[int]:
        return tree.forest.children(node).tolist()

class BeamSearch(_Baseline):
    """Step-level beam search guided by the PPM (the reference's `bs` mode)."""

    async def _expand(self, ex: _Expansion) -> None:
        r = self.runner
        await r._generate(ex)
        await r._execute(ex)
        tokens = r._child_tokens(ex)
        await self._score(ex, tokens, steps_too=True)  # beams are ranked by their PPM scores
        await r._commit(ex, tokens)

    async def solve(self, problem: Problem) -> SearchResult:
        cfg = self.config
        tree = self.runner._new_tree(problem)
        width = cfg.step_beam_width
        beams = [tree.root]
        finished: list[int] = []  # answer nodes, in the order they were found
        for _level in range(cfg.max_depth):
            if not beams:
                break
            exps = [_Expansion(tree, leaf, rollout=0) for leaf in beams]
            await gather_all(*(self._expand(ex) for ex in exps))
            with self.clock.cpu("selection"):
                nodes: list[int] = []
                values: list[float] = []
                outcomes: list[st.StepOutcome] = []
                for ex in exps:
                    nodes += self._children(tree, ex.leaf)
                    values += [0.0 if math.isnan(v) else v for v in ex.values]  # unscored: 0, as the reference
                    outcomes += ex.outcomes
                order = sorted(range(len(nodes)), key=lambda i: -values[i])  # stable on ties
                live: list[int] = []
                for i in order:
                    if outcomes[i].is_answer:
                        finished.append(nodes[i])
                        width -= 1  # a finished solution retires one beam
                    elif not outcomes[i].terminal:
                        live.append(nodes[i])
                beams = live[: max(width, 0)]
        tree.rollouts_done = cfg.step_beam_width
        self.runner.rollouts_done += tree.rollouts_done
        trajectories: list[Candidate | None] = [
            Candidate(tree.answers[n], tree.answer_score.get(n, 0.0)) for n in finished
        ]
        return await self.runner._result(tree, trajectories, "best")


class BestOfN(_Baseline):
    """`bon_n` independent step-by-step solutions; the answer by PPM score or majority."""

    def __init__(self, runner: SearchRunner) -> None:
        super().__init__(runner)
        self._rng = random.Random()  # without a config seed: fresh seeds per problem

    def _problem_seed(self, problem: Problem) -> int:
        """The first seed of a problem's solutions: from the config's seed and the problem's id,
        so that a problem draws the same solutions whichever problems run before it (a resumed
        run skips some); without a config seed, a fresh random one."""
        if self.config.seed is None:
            return self._rng.getrandbits(31)
        return mixed_seed(self.config.seed, problem.id.encode("utf-8", "surrogatepass"))

    async def _step(self, ex: _Expansion, params: SamplingParams) -> None:
        """One expansion with every sample kept (no deduplication: the samples are solutions)."""
        r = self.runner
        ex.prompt = r._path_tokens(ex.tree, ex.leaf).tolist()
        ex.completions = await r.generate_within_context(ex.prompt, params)
        with self.clock.cpu("parsing"):
            ex.steps = [st.parse_step(c.text, c.stop) for c in ex.completions]
        await r._execute(ex)
        tokens = r._child_tokens(ex)
        await self._score(ex, tokens, steps_too=False)
        await r._commit(ex, tokens)

    @staticmethod
    def _is_terminal(tree: _Tree, node: int) -> bool:
        return bool(tree.forest.is_terminal(np.array([node], dtype=np.int64))[0])

    async def _chain(self, tree: _Tree, index: int, head: int, params: SamplingParams) -> int:
        """Continue solution `index` from its first step to its end; return its last node."""
        node = head
        while not self._is_terminal(tree, node):
            await self._step(_Expansion(tree, node, rollout=index), params)
            kids = self._children(tree, node)
            if not kids:  # the engine gave no sample: the node is a dead end, as in MCTS
                break
            node = kids[0]
        return node

    async def solve(self, problem: Problem) -> SearchResult:
        cfg = self.config
        n = cfg.bon_n
        tree = self.runner._new_tree(problem)
        base_seed = self._problem_seed(problem)
        sampling = self.runner.sampling
        await self._step(_Expansion(tree, tree.root, rollout=0),
                         dataclasses.replace(sampling, n=n, seed=base_seed))
        heads = self._children(tree, tree.root)
        ends = await gather_all(*(
            self._chain(tree, i, head, dataclasses.replace(sampling, n=1, seed=base_seed + 1 + i))
            for i, head in enumerate(heads)
        ))
        tree.rollouts_done = n
        self.runner.rollouts_done += n
        trajectories: list[Candidate | None] = [
            Candidate(tree.answers[e], tree.answer_score.get(e, 0.0)) if e in tree.answers else None
            for e in ends
        ]
        choice = "best" if cfg.bon_vote == "ppm" else "majority"
        return await self.runner._result(tree, trajectories, choice, k=max(1, n))


__all__ = ["BeamSearch", "BestOfN", "pipelined", "run_baseline"]
