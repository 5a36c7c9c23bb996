import statistics

import pytest

from neuronserve.deploy.loadtest.config import UsageError
from neuronserve.deploy.loadtest.schedule import arrival_times, iter_arrival_times


def test_poisson_mean_rate_and_gaps():
    rate, horizon = 200.0, 60.0
    times = arrival_times(rate, horizon, arrival="poisson", seed=0)
    assert times == sorted(times) and 0 <= times[0] and times[-1] < horizon
    assert len(times) / horizon == pytest.approx(rate, rel=0.03)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Exponential gaps: mean 1/rate and coefficient of variation close to 1.
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)


def test_poisson_is_deterministic_per_seed():
    assert arrival_times(50, 5, seed=1) == arrival_times(50, 5, seed=1)
    assert arrival_times(50, 5, seed=1) != arrival_times(50, 5, seed=2)


def test_constant_is_evenly_spaced():
    times = arrival_times(10, 2, arrival="constant")
    assert len(times) == 20
    assert all(b - a == pytest.approx(0.1) for a, b in zip(times, times[1:]))


def test_bounds():
    assert arrival_times(0, 10) == [] and arrival_times(10, 0) == []
    assert len(arrival_times(1000, 10, max_count=7)) == 7
    assert sum(1 for _ in iter_arrival_times(100, 1, arrival="constant")) == 100
    with pytest.raises(UsageError):
        arrival_times(1, 1, arrival="gamma")
