"""The simulated engine (`sim:`): a policy and a PPM with no model, timed like a GPU server.

    policy = load_policy("sim:profile=h100-7b,p_correct=0.8,p_error=0.05,seed=0")
    policy.register_problems({question: gold_answer, ...})
    ppm = load_ppm("sim:corr=0.8", policy=policy)     # shares the policy's gold answers

The policy writes the next step of the solution its prompt has reached, in the exact rStar-Math
format, with code that really runs (see `sim_steps`): each step is right with probability
`p_correct`, raises a NameError with probability `p_error`, and otherwise computes a wrong value
(a wrong number or operator, or a jump to the final print). Samples are deterministic for a
(seed, prompt ids, sample index, SamplingParams.seed); temperature 0 makes all n samples the
sample of index 0. Without stop strings a completion runs on to the end of the solution,
output and answer included, and ends at EOS (`finish_reason` "stop", `stop` None); token ids
are exactly `tokenizer.encode(text)` (EOS not included).

The PPM knows, for each sequence, whether the partial solution is right so far (`sim_steps.
judge`: +1, -1, or 0 when it cannot tell) and returns
`tanh(1.5 * (corr * t + sqrt(1 - corr**2) * z))` with z a standard normal drawn from a hash of
the sequence and the seed: at `corr=1` right and wrong are told apart perfectly, at 0 the score
is noise. The latent's correlation with t is exactly `corr` when right and wrong are equally
common. Given another policy's tokenizer (`tokenizer=`, as the search passes it for a real
policy), it reads that policy's ids, so a PPM of known quality can guide a real model: how
far search with a better PPM would take it.

Both time themselves with `sim_latency` (profiles `h100-7b`, `a100-7b`, `h100-1.5b`,
`instant`; `time_scale` runs time that many times faster). A PPM scoring pass is a prefill.

Spec keys (`sim:k=v,...`, also accepted as keyword options; the spec wins over an option):
policy: profile, p_correct, p_error, seed, time_scale, max_num_seqs, prefix_cache, reasoning
(extra comment lines of reasoning per step, for realistic step lengths);
PPM: profile, corr, seed, time_scale, max_num_seqs, prefix_cache (and the options `policy=`,
`tokenizer=`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from rstar_fast.engines.base import (
    BusyClock,
    Completion,
    EngineError,
    EngineSpecError,
    EngineStats,
    PolicyEngine,
    PPMEngine,
    SamplingParams,
    Tokenizer,
    parse_bool,
    spec_items,
)
from rstar_fast.engines.sim_latency import (
    PROFILES,
    BatchScheduler,
    LatencyProfile,
    PrefixCache,
    decode_iterations,
    to_raw,
)
from rstar_fast.engines.sim_steps import (
    PathState,
    Plan,
    judge,
    make_plan,
    next_piece,
    parse_solution,
    split_prompt,
)
from rstar_fast.engines.tokenizer import NUM_BYTES, ByteTokenizer

PPM_GAIN = 1.5  # scale of the latent before tanh: a sure +1 scores tanh(1.5) = 0.905

_KEY_TYPES: dict[str, Any] = {
    "profile": str,
    "p_correct": float,
    "p_error": float,
    "corr": float,
    "seed": int,
    "time_scale": float,
    "max_num_seqs": int,
    "prefix_cache": parse_bool,
    "reasoning": int,
}
_POLICY_KEYS = (
    "profile", "p_correct", "p_error", "seed", "time_scale", "max_num_seqs", "prefix_cache", "reasoning",
)
_PPM_KEYS = ("profile", "corr", "seed", "time_scale", "max_num_seqs", "prefix_cache")


def parse_sim_spec(
    rest: str, allowed: Sequence[str], options: Mapping[str, Any], role: str
) -> dict[str, Any]:
    """Spec keys and keyword options as typed values; unknown keys raise EngineSpecError."""
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in allowed:
            raise EngineSpecError(
                f"sim {role}: unknown option {key!r}; expected one of {sorted(allowed)}"
            )
        values[key] = value
    values.update(spec_items(rest, {key: _KEY_TYPES[key] for key in allowed}, f"sim {role} spec {rest!r}",
                             bare=lambda item: {"profile": item} if item in PROFILES else None))  # `sim:h100-7b`
    return values


def _profile(
    name: str, time_scale: float, max_num_seqs: int | None, role: str
) -> tuple[LatencyProfile, float]:
    if name not in PROFILES:
        raise EngineSpecError(f"sim {role}: unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    if not time_scale > 0:
        raise EngineSpecError(f"sim {role}: time_scale must be > 0, got {time_scale}")
    profile = PROFILES[name]
    if max_num_seqs is not None:
        if max_num_seqs < 1:
            raise EngineSpecError(f"sim {role}: max_num_seqs must be >= 1, got {max_num_seqs}")
        profile = replace(profile, max_num_seqs=max_num_seqs)
    return profile, time_scale


class PathRandom:
    """A small splitmix64 generator: seeding it costs nothing, unlike random.Random.

    Offers the three calls the step writer makes (random, randrange, choice); one is made per
    sample, seeded from the prompt, the sample index and the seeds.
    """

    __slots__ = ("_state",)
    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self._state = seed & self._MASK

    def _next(self) -> int:
        self._state = s = (self._state + 0x9E3779B97F4A7C15) & self._MASK
        s = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        s = ((s ^ (s >> 27)) * 0x94D049BB133111EB) & self._MASK
        return s ^ (s >> 31)

    def random(self) -> float:
        return (self._next() >> 11) * (1.0 / (1 << 53))

    def randrange(self, n: int) -> int:
        return self._next() % n

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self._next() % len(seq)]

    def gauss(self) -> float:
        """A standard normal draw (Box-Muller)."""
        u1 = 1.0 - self.random()  # in (0, 1]
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * self.random())


def _seed_of(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little")


def _decoded(decode: Callable[[Sequence[int]], Any], ids: Sequence[int], where: str) -> Any:
    """`decode(ids)`, refusing what the hf engine refuses (an empty sequence, ids outside the
    vocabulary) with an EngineError naming the engine."""
    if not len(ids):
        raise EngineError(f"{where}: empty token sequence")
    try:
        return decode(ids)
    except (ValueError, TypeError, OverflowError) as exc:  # the tokenizer's word for a bad id
        raise EngineError(f"{where}: {exc}") from exc


class _Timing:
    """Stats, prefix cache and scheduler shared by the simulated policy and PPM."""

    def __init__(self, profile: LatencyProfile, time_scale: float, prefix_cache: bool) -> None:
        self.profile = profile
        self.stats = EngineStats()
        bpt = profile.bytes_per_token
        self.cache = PrefixCache(int(profile.cache_tokens * bpt)) if prefix_cache else None
        self.scheduler = (
            None if profile.instant else BatchScheduler(profile, time_scale, self.stats)
        )
        self.busy = BusyClock(self.stats)

    def cached(self, raw: bytes, n_ids: int) -> int:
        return 0 if self.cache is None else self.cache.lookup(raw, n_ids)

    async def wait(self, uncached_ids: int, prompt_ids: int, decode_lens: list[int]) -> None:
        if self.scheduler is None:
            with self.busy:
                await asyncio.sleep(0)
            return
        bpt = self.profile.bytes_per_token
        await self.scheduler.run(uncached_ids / bpt, prompt_ids / bpt, decode_lens)

    @property
    def model_seconds(self) -> float:
        return 0.0 if self.scheduler is None else self.scheduler.model_seconds

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()


class _Decoder:
    """Fast prompt decoding: ids as 2-byte units, bytes and special tokens split in C."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = {i - NUM_BYTES: tok.encode() for tok, i in tokenizer.special_ids.items()}

    def decode(self, ids: Sequence[int]) -> tuple[str, bytes]:
        """(text, 2-byte raw ids); raises ValueError for ids outside the vocabulary."""
        try:
            raw = to_raw(list(ids))
        except (OverflowError, TypeError):
            return self.tokenizer.decode(ids), b""  # raises the tokenizer's error
        lo, hi = raw[0::2], raw[1::2]
        if hi.count(0) == len(hi):
            return lo.decode("utf-8", errors="replace"), raw
        if hi.translate(None, b"\x00\x01"):
            return self.tokenizer.decode(ids), raw  # raises for ids beyond the specials
        out = bytearray()
        pos = 0
        while True:
            j = hi.find(1, pos)
            if j < 0:
                out += lo[pos:]
                break
            special = self.specials.get(lo[j])
            if special is None:
                return self.tokenizer.decode(ids), raw  # raises for ids beyond the specials
            out += lo[pos:j]
            out += special
            pos = j + 1
        return out.decode("utf-8", errors="replace"), raw


class SimPolicy(PolicyEngine):
    """A policy that writes rStar-Math steps for known problems, timed like a GPU engine."""

    def __init__(
        self,
        profile: str = "instant",
        p_correct: float = 0.8,
        p_error: float = 0.05,
        seed: int = 0,
        time_scale: float = 1.0,
        max_num_seqs: int | None = None,
        prefix_cache: bool = True,
        reasoning: int = 0,
    ) -> None:
        if reasoning < 0:
            raise EngineSpecError(f"sim policy: reasoning (comment lines per step) must be >= 0, got {reasoning}")
        if not 0 <= p_correct <= 1 or not 0 <= p_error <= 1 or p_correct + p_error > 1:
            raise EngineSpecError(
                f"sim policy: need 0 <= p_correct, p_error and p_correct + p_error <= 1, "
                f"got p_correct={p_correct}, p_error={p_error}"
            )
        lat, scale = _profile(profile, time_scale, max_num_seqs, "policy")
        self.p_correct = p_correct
        self.p_error = p_error
        self.reasoning = reasoning
        self.seed = seed
        self.tokenizer = ByteTokenizer()
        self._decoder = _Decoder(self.tokenizer)
        self._timing = _Timing(lat, scale, prefix_cache)
        self.stats = self._timing.stats
        self.problems: dict[str, str] = {}  # question -> gold answer
        self._closed = False

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> SimPolicy:
        return cls(**parse_sim_spec(rest, _POLICY_KEYS, options, "policy"))

    @property
    def profile(self) -> LatencyProfile:
        return self._timing.profile

    @property
    def model_seconds(self) -> float:
        """Modeled engine time spent so far (busy seconds times time_scale; 0 when instant)."""
        return self._timing.model_seconds

    def register_problems(self, problems: Mapping[str, str]) -> None:
        for question, answer in problems.items():
            self.problems[question] = str(answer)
            self.problems.setdefault(question.strip(), str(answer))

    def plan_for(self, question: str) -> Plan:
        gold = self.problems.get(question)
        if gold is None:
            gold = self.problems.get(question.strip())
        return make_plan(question, gold)

    def write(self, text: str, raw: bytes, params: SamplingParams) -> list[Completion]:
        """The n completions of a decoded prompt (no timing): the engine's pure text part."""
        question, solution = split_prompt(text)
        plan = self.plan_for(question)
        state = parse_solution(solution)
        base = _seed_of(raw or text.encode(), f"|{self.seed}|{params.seed}".encode())
        encode = self.tokenizer.encode
        out: list[Completion] = []
        for i in range(params.n):
            rng = PathRandom(base + (0 if params.greedy else i) * 0xD1B54A32D192ED03)
            out.append(self._complete(plan, solution, state, rng, params, encode))
        return out

    def _complete(
        self,
        plan: Plan,
        solution: str,
        state: PathState,
        rng: PathRandom,
        params: SamplingParams,
        encode: Callable[[str], list[int]],
    ) -> Completion:
        stops = params.stop
        written = ""
        stop: str | None = None
        while True:
            piece = next_piece(plan, state, rng, self.p_correct, self.p_error, self.reasoning)
            if piece is None:
                break
            scan = max(0, len(written) - max((len(s) for s in stops), default=0))
            written += piece
            best = -1
            for s in stops:
                j = written.find(s, scan)
                if j >= 0 and (best < 0 or j + len(s) < best):
                    best, stop = j + len(s), s
            if best >= 0:
                written = written[:best]
                break
            if len(written) > params.max_tokens and len(encode(written)) > params.max_tokens:
                break  # max_tokens cuts here whatever comes next
            state = parse_solution(solution + written)
        ids = encode(written)
        if len(ids) > params.max_tokens:
            ids = ids[: params.max_tokens]
            return Completion(self.tokenizer.decode(ids), ids, "length", None)
        return Completion(written, ids, "stop", stop)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Completion]:
        if self._closed:
            raise EngineError("sim policy: generate() after close()")
        text, raw = _decoded(self._decoder.decode, prompt_ids, "sim policy")
        completions = self.write(text, raw, params)
        timing = self._timing
        stats = self.stats
        n_prompt = len(prompt_ids)
        cached = timing.cached(raw, n_prompt)
        stats.requests += 1
        stats.prompt_tokens += n_prompt
        stats.cached_prompt_tokens += cached
        stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        bpt = timing.profile.bytes_per_token
        lengths = [decode_iterations(len(c.token_ids), bpt) for c in completions]
        await timing.wait(n_prompt - cached, n_prompt, lengths)
        return completions

    async def close(self) -> None:
        self._closed = True
        await self._timing.close()


class SimPPM(PPMEngine):
    """A PPM whose scores correlate with the correctness of the partial solution (`corr`)."""

    def __init__(
        self,
        profile: str = "instant",
        corr: float = 0.8,
        seed: int = 0,
        time_scale: float = 1.0,
        max_num_seqs: int | None = None,
        prefix_cache: bool = True,
        policy: SimPolicy | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if not 0 <= corr <= 1:
            raise EngineSpecError(f"sim PPM: corr must be in [0, 1], got {corr}")
        if policy is not None and not isinstance(policy, SimPolicy):
            raise EngineSpecError(
                f"sim PPM: policy= must be a SimPolicy, got {type(policy).__name__}"
            )
        lat, scale = _profile(profile, time_scale, max_num_seqs, "PPM")
        self.corr = corr
        self.seed = seed
        self._bytes = ByteTokenizer()
        self._decoder = _Decoder(self._bytes)
        self._foreign = tokenizer  # a real policy's tokenizer, whose ids `score` receives
        self.tokenizer = tokenizer or self._bytes  # the one whose ids `score` reads
        self._timing = _Timing(lat, scale, prefix_cache)
        self.stats = self._timing.stats
        # gold answers: the policy's own dict when given, so later registrations are seen too
        self.problems: dict[str, str] = policy.problems if policy is not None else {}
        self._closed = False

    @classmethod
    def from_spec(cls, rest: str, **options: Any) -> SimPPM:
        policy = options.pop("policy", None)
        tokenizer = options.pop("tokenizer", None)
        return cls(**parse_sim_spec(rest, _PPM_KEYS, options, "PPM"), policy=policy, tokenizer=tokenizer)

    register_problems = SimPolicy.register_problems

    @property
    def model_seconds(self) -> float:
        """Modeled engine time spent so far (busy seconds times time_scale; 0 when instant)."""
        return self._timing.model_seconds

    def correctness(self, text: str) -> int:
        """+1 / -1 / 0: whether the partial solution in this text is right so far."""
        question, solution = split_prompt(text)
        gold = self.problems.get(question)
        if gold is None:
            gold = self.problems.get(question.strip())
        return judge(make_plan(question, gold), parse_solution(solution))

    def score_text(self, text: str, raw: bytes) -> float:
        t = self.correctness(text)
        z = PathRandom(_seed_of(raw or text.encode(), f"|ppm|{self.seed}".encode())).gauss()
        c = self.corr
        return math.tanh(PPM_GAIN * (c * t + math.sqrt(1.0 - c * c) * z))

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        if self._closed:
            raise EngineError("sim PPM: score() after close()")
        if not sequences:
            return []
        timing = self._timing
        scores: list[float] = []
        uncached = total = 0
        for ids in sequences:
            if self._foreign is None:
                text, raw = _decoded(self._decoder.decode, ids, "sim PPM")
                n_ids = len(ids)
            else:  # the same text as byte ids: the same score and timing as from a sim policy
                text = _decoded(self._foreign.decode, ids, "sim PPM")
                byte_ids = self._bytes.encode(text)
                raw, n_ids = to_raw(byte_ids), len(byte_ids)
            scores.append(self.score_text(text, raw))
            cached = timing.cached(raw, n_ids)
            uncached += n_ids - cached
            total += n_ids
            self.stats.cached_prompt_tokens += cached
        self.stats.requests += 1
        self.stats.prompt_tokens += total
        await timing.wait(uncached, total, [])
        return scores

    async def close(self) -> None:
        self._closed = True
        await self._timing.close()


__all__ = ["PROFILES", "LatencyProfile", "SimPPM", "SimPolicy", "parse_sim_spec"]
