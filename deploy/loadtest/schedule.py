"""Arrival schedules for open-loop load: when each request is due, relative to the step start."""

from __future__ import annotations

import random
from typing import Iterator

from neuronserve.deploy.loadtest.config import ARRIVALS, UsageError


def iter_arrival_times(rate_per_s: float, horizon_s: float, *, arrival: str = "poisson",
                       seed: int = 0) -> Iterator[float]:
    """Send times in [0, horizon_s), generated lazily (memory stays flat at any rate).

    `poisson` draws exponential inter-arrival gaps (what independent users produce; bursts
    included), `constant` spaces requests exactly 1/rate apart. Finite: about rate x horizon items.
    """
    if arrival not in ARRIVALS:
        raise UsageError(f"arrival {arrival!r} is not one of {', '.join(ARRIVALS)}")
    if rate_per_s <= 0 or horizon_s <= 0:
        return
    if arrival == "constant":
        gap = 1.0 / rate_per_s
        for i in range(int(horizon_s * rate_per_s) + 2):
            t = i * gap
            if t >= horizon_s:
                return
            yield t
        return
    rng = random.Random(f"arrivals:{rate_per_s}:{seed}")
    t = rng.expovariate(rate_per_s)
    while t < horizon_s:
        yield t
        t += rng.expovariate(rate_per_s)


def arrival_times(rate_per_s: float, horizon_s: float, *, arrival: str = "poisson", seed: int = 0,
                  max_count: int = 10_000_000) -> list[float]:
    """The first `max_count` send times in [0, horizon_s) as a list.

    >>> arrival_times(4, 1, arrival="constant")
    [0.0, 0.25, 0.5, 0.75]
    """
    times = iter_arrival_times(rate_per_s, horizon_s, arrival=arrival, seed=seed)
    return [t for _, t in zip(range(max_count), times)]
