"""The measurement protocol and its statistics, shared by every profiler and benchmark.

Warm-up runs, then several rounds; in each round the candidates run in a freshly shuffled
order (interleaving cancels drift: thermal, frequency, noisy neighbours), each a few times;
the median of each round, then the median of the rounds. p10/p90/mean/std are over all runs.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    rounds: int
    #: each round's median, in round order: candidates measured in one interleaved run can be
    #: compared round by round (drift between rounds cancels); not written to tables
    round_ms: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, float | int]:
        fields = asdict(self)
        del fields["round_ms"]
        return fields


def summarize(rounds: list[list[float]]) -> Timing:
    """Statistics of per-round lists of run times in milliseconds."""
    runs = [t for r in rounds for t in r]
    if not runs:
        raise ValueError("no runs to summarize")
    return Timing(
        median_ms=float(statistics.median(statistics.median(r) for r in rounds if r)),
        p10_ms=float(np.percentile(runs, 10)),
        p90_ms=float(np.percentile(runs, 90)),
        mean_ms=float(np.mean(runs)),
        std_ms=float(np.std(runs)),
        runs=len(runs),
        rounds=sum(1 for r in rounds if r),
        round_ms=tuple(float(statistics.median(r)) if r else math.nan for r in rounds),
    )


def measure_interleaved(
    candidates: Mapping[Hashable, Callable[[], object]],
    *,
    warmup: int = 3,
    rounds: int = 5,
    runs: int = 10,
    min_round_ms: float = 20.0,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
) -> dict[Hashable, Timing]:
    """Time each zero-argument callable with the protocol above; returns one Timing per key.

    Each candidate runs at least ``runs`` times per round, more if that takes under
    ``min_round_ms`` (estimated from its warm-up, at most 10 × ``runs``): sub-millisecond
    parts then get enough samples for a stable median without slowing the large ones.
    """
    rng = random.Random(seed)
    keys = list(candidates)
    per_round: dict[Hashable, int] = {}
    for key in keys:
        warm = []
        for _ in range(max(warmup, 2)):
            start = time.perf_counter()
            candidates[key]()
            warm.append((time.perf_counter() - start) * 1e3)
        estimate = statistics.median(warm[1:])
        per_round[key] = min(10 * runs, max(runs, math.ceil(min_round_ms / max(estimate, 1e-3))))
    times: dict[Hashable, list[list[float]]] = {k: [] for k in keys}
    for r in range(rounds):
        rng.shuffle(keys)
        for key in keys:
            fn, this_round = candidates[key], []
            for _ in range(per_round[key]):
                start = time.perf_counter()
                fn()
                this_round.append((time.perf_counter() - start) * 1e3)
            times[key].append(this_round)
        if on_round is not None:
            on_round(r)
    return {k: summarize(v) for k, v in times.items()}
