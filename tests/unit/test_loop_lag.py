"""The replica measures its event loop's lag (the host-saturation signal): a loop kept busy shows
up in `neuronserve_event_loop_lag_seconds`."""

import asyncio
import time

from neuronserve.serve.metrics import registry
from tests.fixtures.inprocess_app import Running, tiny_artifact


def _lag(model: str) -> tuple[float, float]:
    count = total = 0.0
    for metric in registry().collect():
        if metric.name == "neuronserve_event_loop_lag_seconds":
            for s in metric.samples:
                if s.labels.get("model") == model and s.name.endswith("_count"):
                    count += s.value
                elif s.labels.get("model") == model and s.name.endswith("_sum"):
                    total += s.value
    return count, total


def test_a_busy_event_loop_shows_as_lag(tmp_path):
    r = Running(tiny_artifact(tmp_path))
    try:
        model = r.replica.replica.model_name  # the registry is the process's: compare before/after
        r.loop.run_until_complete(asyncio.sleep(0.15))  # the probe's first wake-up, late: this loop was not running
        count0, total0 = _lag(model)
        r.loop.run_until_complete(asyncio.sleep(0.45))
        count, total = _lag(model)
        assert count - count0 >= 3 and total - total0 < 0.2  # a running, idle loop wakes its timer on time

        async def hog():
            time.sleep(0.3)  # what a saturated loop does to everything else on it
            await asyncio.sleep(0.25)

        r.loop.run_until_complete(hog())
        count_after, total_after = _lag(model)
        assert count_after > count and total_after - total >= 0.2
    finally:
        r.close()
