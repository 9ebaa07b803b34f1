"""Phase timing: exact counts and totals, percentiles to a bucket, memory that does not grow."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from rstar_fast.search.stats import PhaseClock


def test_percentiles_are_read_to_a_bucket_and_memory_stays_put() -> None:
    clock = PhaseClock()
    rng = np.random.default_rng(0)
    durations = rng.lognormal(mean=-6.0, sigma=1.5, size=200_000).tolist()  # ~2.5 ms, long tail
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for d in durations:
        with clock.cpu("selection"):
            pass
        clock.phases["generation"].add(d)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 50_000, f"{grown} bytes for 400,000 timed calls"  # a float each would be 9.6 MB
    s = clock.summary()["generation"]
    assert s["calls"] == len(durations) and s["total_s"] == pytest.approx(sum(durations))
    for key, q in (("p50_ms", 50), ("p99_ms", 99)):
        assert s[key] == pytest.approx(np.percentile(durations, q) * 1e3, rel=0.025)
    assert clock.summary()["selection"]["calls"] == len(durations)
    assert set(clock.summary()) == {"selection", "generation"}  # phases that never ran are left out


def test_a_block_that_raises_is_timed_and_its_error_goes_on() -> None:
    clock = PhaseClock()
    with pytest.raises(KeyError), clock.cpu("parsing"):
        raise KeyError("x")
    with clock.wall("generation"):
        time.sleep(0.02)
    summary = clock.summary()
    assert summary["parsing"]["calls"] == 1
    assert summary["generation"]["calls"] == 1 and summary["generation"]["total_s"] >= 0.02
    assert clock.driver_seconds() == summary["parsing"]["total_s"]  # generation is a wait, not driver work
