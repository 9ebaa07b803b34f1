"""Per-phase timing of a search: how long each phase took, in total and per call."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

# Phases the driver itself spends CPU on; the others are waits on engines and workers.
DRIVER_PHASES = ("selection", "parsing", "backprop", "export")
PHASES = ("selection", "generation", "execution", "ppm", "grading", "backprop", "parsing", "export")

# Durations are counted in logarithmic buckets, 100 a decade from 0.1 us to 10^4 s, so that a run
# of millions of rollouts keeps a few kilobytes per phase, not one float per call; percentiles
# are read to within 1.2% (a bucket's geometric middle).
_PER_DECADE = 100
_LOWEST = -7  # log10 of the first bucket's lower edge, in seconds
_BUCKETS = 11 * _PER_DECADE
_SMALLEST = 10.0**_LOWEST


class PhaseTimes:
    """One phase's calls: their count, total and a histogram of their durations."""

    __slots__ = ("calls", "total", "counts")

    def __init__(self) -> None:
        self.calls = 0
        self.total = 0.0
        self.counts = [0] * _BUCKETS

    def add(self, seconds: float) -> None:
        self.calls += 1
        self.total += seconds
        i = int((math.log10(seconds) - _LOWEST) * _PER_DECADE) if seconds > _SMALLEST else 0
        self.counts[min(i, _BUCKETS - 1)] += 1

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in seconds, the middle of the bucket that holds it."""
        rank = max(math.ceil(q / 100 * self.calls), 1)
        i = next(i for i, seen in enumerate(itertools.accumulate(self.counts)) if seen >= rank)
        return 10 ** (_LOWEST + (i + 0.5) / _PER_DECADE)


class _Timed:
    """Adds the time between its enter and exit, read by `read`, to `times`. A class rather
    than a generator context manager: the driver times some ten small blocks per expansion,
    and a generator's resume and suspend would fall inside each block's time."""

    __slots__ = ("times", "read", "start")

    def __init__(self, times: PhaseTimes, read: Callable[[], float]) -> None:
        self.times = times
        self.read = read

    def __enter__(self) -> None:
        self.start = self.read()

    def __exit__(self, *exc: object) -> None:
        self.times.add(self.read() - self.start)


class PhaseClock:
    """Times every call of every phase."""

    def __init__(self) -> None:
        self.phases: dict[str, PhaseTimes] = {p: PhaseTimes() for p in PHASES}

    def wall(self, phase: str) -> _Timed:
        """Time an awaited phase (its wall time, other coroutines run meanwhile)."""
        return _Timed(self.phases[phase], time.perf_counter)

    def cpu(self, phase: str) -> _Timed:
        """Time synchronous driver work by the CPU time of this thread (a busy machine that
        preempts the driver does not inflate it)."""
        return _Timed(self.phases[phase], time.thread_time)

    def driver_seconds(self) -> float:
        return sum(self.phases[p].total for p in DRIVER_PHASES)

    def summary(self) -> dict[str, dict[str, float]]:
        """phase -> {calls, total_s, p50_ms, p99_ms} for each phase that ran."""
        return {phase: {"calls": t.calls, "total_s": t.total, "p50_ms": t.percentile(50) * 1e3,
                        "p99_ms": t.percentile(99) * 1e3}
                for phase, t in self.phases.items() if t.calls}
