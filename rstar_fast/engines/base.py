"""The engine interface: what the search asks of a policy and of a PPM.

Every backend (simulated, transformers, TensorRT-LLM, OpenAI-compatible server) implements
these two small async classes. Prompts travel as token ids; many coroutines call `generate`
and `score` at once and each backend batches whatever is in flight.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Literal, Protocol, Self, runtime_checkable


class EngineError(RuntimeError):
    """Base of every engine failure (bad spec, unreachable server, malformed answer)."""


class EngineSpecError(EngineError, ValueError):
    """A spec string or an option that names no usable engine."""


class EngineUnavailableError(EngineError):
    """A backend whose optional dependencies are missing, or a server that cannot be reached."""


class EngineInUseError(EngineUnavailableError):
    """An engine called from one event loop while it has requests in flight on another."""


def serving_loop(name: str, bound: asyncio.AbstractEventLoop | None, busy: bool) -> asyncio.AbstractEventLoop:
    """The running event loop, for an engine bound to `bound` that has requests in flight there
    when `busy`. An engine serves one loop at a time and moves to another once idle; moving while
    another loop (another thread's search) waits on it would leave that loop's requests unanswered."""
    loop = asyncio.get_running_loop()
    if busy and bound is not None and bound is not loop and not bound.is_closed():
        raise EngineInUseError(
            f"{name}: the engine has requests in flight on another event loop (another thread's search?); an "
            "engine serves one event loop at a time: load one engine per thread, or run the searches in one loop")
    return loop


def parse_bool(text: str) -> bool:
    """A spec value as a boolean (true/false, yes/no, on/off, 1/0)."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def spec_items(items: str, keys: Mapping[str, Callable[[str], Any]], where: str,
               bare: Callable[[str], dict[str, Any] | None] = lambda item: None) -> dict[str, Any]:
    """The comma-separated `key=value` items of an engine spec, each typed by `keys`;
    EngineSpecError names a bad one, `where` saying which spec. `bare` may take an item
    without '=' (a sim profile's name), returning what it sets."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in items.split(","))):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq:
            taken = bare(item)
            if taken is None:
                raise EngineSpecError(f"{where}: item {item!r} is not key=value")
            values.update(taken)
            continue
        if key not in keys:
            raise EngineSpecError(f"{where}: unknown option {key!r}; expected one of {sorted(keys)}")
        try:
            values[key] = keys[key](text)
        except ValueError as exc:
            raise EngineSpecError(f"{where}: bad value for {key!r}: {exc}") from None
    return values


def folder_spec(rest: str, keys: Mapping[str, Callable[[str], Any]], where: str) -> tuple[str, dict[str, Any]]:
    """`FOLDER[,key=value,...]` (hf:, trtllm:): the folder and its typed options. A folder
    whose own name holds a comma is taken whole."""
    if "," not in rest or os.path.isdir(rest):
        return rest, {}
    folder, _, items = rest.partition(",")
    return folder, spec_items(items, keys, f"{where} spec {rest!r}")


GREEDY_BELOW = 1e-5  # as vLLM: a temperature below this decodes greedily (dividing by it overflows)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    max_tokens: int = 2048
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # Each value is checked and stored as a plain int / float / tuple of str: a config may
        # hold 512.0 or numpy numbers, and a stop may come as any iterable.
        def whole(name: str, low: int | None) -> None:
            value = getattr(self, name)
            ok = not isinstance(value, bool) and (
                isinstance(value, Integral) or (isinstance(value, Real) and float(value).is_integer()))
            if not ok or (low is not None and value < low):
                at_least = f" >= {low}" if low is not None else ""
                raise ValueError(f"SamplingParams.{name} must be a whole number{at_least}, got {value!r}")
            object.__setattr__(self, name, int(value))

        def real(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
            return float(value)

        whole("n", 1)
        whole("max_tokens", 1)
        whole("top_k", None if self.top_k == -1 else 1)  # -1: no cut
        if self.seed is not None:
            whole("seed", None)
        temperature = real("temperature")
        if not (math.isfinite(temperature) and temperature >= 0):  # NaN passes a bare `< 0`
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < real("top_p") <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        try:
            stop = tuple(self.stop) if not isinstance(self.stop, str) else None
        except TypeError:  # not iterable
            stop = None
        if stop is None or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"SamplingParams.stop must be a sequence of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def with_seed(self, seed: int) -> SamplingParams:
        """These params with another seed. The search makes one per expansion: unlike
        dataclasses.replace, this does not check the other fields again."""
        if type(seed) is not int:
            raise ValueError(f"SamplingParams.seed must be an int, got {seed!r}")
        clone = object.__new__(SamplingParams)
        clone.__dict__.update(self.__dict__, seed=seed)
        return clone


@dataclass
class Completion:
    text: str  # decoded text; ends with the stop string when one ended it
    # the generated ids, stop string's tokens included; ids that decode to `text` exactly, so
    # where a stop ends inside a token the rest of the text is encoded again, which can give
    # more ids than were sampled (max_tokens bounds the sampled ones)
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    stop: str | None = None  # the stop string that ended the text, None on "length" or EOS
    sampled: int | None = None  # tokens sampled, where not len(token_ids) (a stop inside a token)

    @property
    def sampled_count(self) -> int:
        """How many tokens the engine sampled for this completion (what `usage` counts)."""
        return len(self.token_ids) if self.sampled is None else self.sampled


@runtime_checkable
class Tokenizer(Protocol):
    """What the search needs of a policy's tokenizer. One may also have `bos_ids`, the ids a
    prompt starts with (a BOS token where the model's tokenizer adds one to a text, as vLLM
    does to the reference's prompts; none when absent)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class EngineStats:
    """Counters a backend keeps so the driver can show throughput and how busy the engine is."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from a prefix cache
    generated_tokens: int = 0
    busy_seconds: float = 0.0  # wall time during which at least one request was in flight
    started_at: float = field(default_factory=time.monotonic)
    busy_since: float | None = None  # start of the busy spell going on now, if one is

    def busy_fraction(self) -> float:
        """The share of wall time since `started_at` with a request in flight, the spell going
        on now included (an engine kept busy all along reads 100%, not 0%, while it runs)."""
        now = time.monotonic()
        wall = now - self.started_at
        busy = self.busy_seconds
        if self.busy_since is not None:
            busy += now - max(self.busy_since, self.started_at)
        return busy / wall if wall > 0 else 0.0


class BusyClock:
    """Accumulates wall time during which at least one request is in flight."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats
        self._in_flight = 0

    def __enter__(self) -> None:
        if self._in_flight == 0:
            self._stats.busy_since = time.monotonic()
        self._in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._stats.busy_since is not None:
            self._stats.busy_seconds += time.monotonic() - max(self._stats.busy_since, self._stats.started_at)
            self._stats.busy_since = None


class _Counted:
    """`stats` for an engine whose class never set it (a user's own subclass need not)."""

    stats: EngineStats

    def __getattr__(self, name: str) -> Any:
        if name == "stats":  # only reached when the instance has none yet
            self.stats = EngineStats()
            return self.stats
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class _Closed:
    """`async with engine:` closes the engine at the end of the block, as `await engine.close()`."""

    async def close(self) -> None:
        """Release what the engine holds."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class PolicyEngine(_Counted, _Closed, ABC):
    """Writes candidate steps: n completions of a token-id prompt. A subclass sets
    `tokenizer` (a `Tokenizer`: the prompts reach it as that tokenizer's ids)."""

    tokenizer: Tokenizer

    @abstractmethod
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Completion]:
        """Return params.n completions of the prompt, in order."""

    def register_problems(self, problems: Mapping[str, str]) -> None:
        """Tell the engine the gold answers of the questions it will see (question -> answer).

        Real models ignore this; the simulated engine uses it to write steps that reach (or
        miss) the known answer.
        """

    async def close(self) -> None:
        """Release the model, the server connection or the worker threads."""


class PPMEngine(_Counted, _Closed, ABC):
    """Scores partial solutions: one float in [-1, 1] per token-id sequence."""

    @abstractmethod
    async def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Return the value of each sequence (question prompt plus steps so far)."""

    def register_problems(self, problems: Mapping[str, str]) -> None:
        """The gold answers of the questions it will see; only the simulated PPM uses them."""

    async def close(self) -> None:
        """Release the model."""
