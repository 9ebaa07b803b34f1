"""Per-phase timing of a search: how long each phase took, in total and per call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# Phases the driver itself spends CPU on; the others are waits on engines and workers.
DRIVER_PHASES = ("selection", "parsing", "backprop", "export")
PHASES = ("selection", "generation", "execution", "ppm", "grading", "backprop", "parsing", "export")


class PhaseClock:
    """Collects the duration of every call of every phase."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {p: [] for p in PHASES}
        self.started = time.perf_counter()

    @contextmanager
    def wall(self, phase: str) -> Iterator[None]:
        """Time an awaited phase (its wall time, other coroutines run meanwhile)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.samples[phase].append(time.perf_counter() - t)

    @contextmanager
    def cpu(self, phase: str) -> Iterator[None]:
        """Time synchronous driver work by the CPU time of this thread (a busy machine that
        preempts the driver does not inflate it)."""
        t = time.thread_time()
        try:
            yield
        finally:
            self.samples[phase].append(time.thread_time() - t)

    def driver_seconds(self) -> float:
        return float(sum(sum(self.samples[p]) for p in DRIVER_PHASES))

    def summary(self) -> dict[str, dict[str, float]]:
        """phase -> {calls, total_s, p50_ms, p99_ms} for each phase that ran."""
        out: dict[str, dict[str, float]] = {}
        for phase, samples in self.samples.items():
            if not samples:
                continue
            a = np.asarray(samples)
            out[phase] = {
                "calls": int(a.size),
                "total_s": float(a.sum()),
                "p50_ms": float(np.percentile(a, 50) * 1e3),
                "p99_ms": float(np.percentile(a, 99) * 1e3),
            }
        return out

    def table(self) -> str:
        """The summary as a plain-text table."""
        rows = [f"{'phase':<12}{'calls':>9}{'total s':>10}{'p50 ms':>10}{'p99 ms':>10}"]
        for phase, s in self.summary().items():
            rows.append(
                f"{phase:<12}{s['calls']:>9d}{s['total_s']:>10.2f}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}"
            )
        return "\n".join(rows)
