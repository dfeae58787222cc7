"""The measurement protocol keeps each round's median in round order, so benchmarks can pair
candidates round by round; tables and the board runner's JSON keep their columns."""

from __future__ import annotations

import math

from profilers.protocol import Timing, measure_interleaved, summarize


def test_round_medians_are_kept_in_order_and_left_out_of_tables():
    timing = summarize([[3.0, 1.0, 2.0], [], [10.0, 30.0]])
    assert timing.round_ms[0] == 2.0 and math.isnan(timing.round_ms[1]) and timing.round_ms[2] == 20.0
    assert timing.median_ms == 11.0 and timing.rounds == 2
    fields = timing.as_dict()
    assert "round_ms" not in fields
    assert Timing(**fields).median_ms == timing.median_ms  # what profilers/ssh.py rebuilds from JSON


def test_interleaved_candidates_have_one_median_per_round():
    calls = {"a": lambda: sum(range(200)), "b": lambda: sum(range(400))}
    timing = measure_interleaved(calls, rounds=6, runs=2, min_round_ms=0.0)
    assert [len(t.round_ms) for t in timing.values()] == [6, 6]
    assert all(v > 0 for t in timing.values() for v in t.round_ms)
