"""Sharing one device between models (serve.scheduler): fair by device time under contention, at
once on an idle device, no credit for idle time; and batchers of several models sharing it."""

import asyncio
import threading

import numpy as np
import pytest

from neuronserve.models.artifact import Bucket
from neuronserve.serve.batcher import Batcher
from neuronserve.serve.errors import Overloaded
from neuronserve.serve.scheduler import DeviceScheduler
from tests.unit.test_batcher import BUCKETS, PADDING_BOUND, FakeClock


class SimDevice:
    """An event-driven device for the scheduler alone: each model always has a batch ready (while
    `backlog` says so) and each of its batches takes `cost[model]` seconds of a fake clock."""

    def __init__(self, scheduler: DeviceScheduler, cost: dict[str, float]):
        self.s, self.cost, self.now = scheduler, cost, 0.0
        self.running: list[tuple[float, str]] = []  # (ends at, model)
        self.ran: list[tuple[float, str, float]] = []  # (started, model, seconds)
        self.active: set[str] = set()
        self.woken: list[str] = []

    def wake(self, model):
        return lambda: self.woken.append(model)

    def start(self, model: str) -> None:
        self.running.append((self.now + self.cost[model], model))
        self.ran.append((self.now, model, self.cost[model]))

    def arrive(self, model: str) -> None:
        """`model` gets a backlog: it asks for a slot (runs at once if granted)."""
        self.active.add(model)
        if self.s.acquire(model, self.wake(model)):
            self.start(model)

    def run_until(self, t_end: float) -> None:
        while self.running:
            self.running.sort()
            ends, model = self.running.pop(0)
            if ends > t_end:
                self.running.insert(0, (ends, model))
                return
            self.now = ends
            if self.s.release(model, self.cost[model], model in self.active, self.wake(model)):
                self.start(model)
            while self.woken:
                m = self.woken.pop(0)
                assert self.s.acquire(m, self.wake(m)), "a woken model finds its slot"
                self.start(m)

    def device_s(self, model: str, since: float = 0.0) -> float:
        return sum(s for t, m, s in self.ran if m == model and t >= since)


def test_contention_shares_device_time_equally_whatever_the_batch_cost():
    s = DeviceScheduler(slots=1)
    dev = SimDevice(s, {"a": 0.001, "b": 0.005, "c": 0.002})
    for m in "abc":
        dev.arrive(m)
    dev.run_until(30.0)
    shares = {m: dev.device_s(m) for m in "abc"}
    assert sum(shares.values()) == pytest.approx(30.0, abs=0.01)  # the device never idles
    for m in "abc":  # each within one batch of the others, not in proportion to batch counts
        assert shares[m] == pytest.approx(10.0, abs=0.006), shares
    counts = {m: sum(1 for _, x, _ in dev.ran if x == m) for m in "abc"}
    assert counts["a"] > 4 * counts["b"]  # cheap batches run more often for the same device time


def test_two_slots_are_shared_fairly_too():
    s = DeviceScheduler(slots=2)
    dev = SimDevice(s, {"a": 0.001, "b": 0.004})
    dev.arrive("a")
    dev.arrive("a")  # a holds both slots while b has nothing
    dev.arrive("b")
    dev.run_until(10.0)
    assert dev.device_s("a") == pytest.approx(dev.device_s("b"), abs=0.01)
    assert dev.device_s("a") + dev.device_s("b") == pytest.approx(20.0, abs=0.01)


def test_a_model_back_from_idle_gets_no_credit_for_its_idle_time():
    s = DeviceScheduler(slots=1)
    dev = SimDevice(s, {"a": 0.002, "b": 0.002})
    dev.arrive("a")
    dev.run_until(10.0)  # a alone for 10 s: every batch at once, nothing held back for b
    assert dev.device_s("a") == pytest.approx(10.0, abs=0.003)
    dev.arrive("b")
    dev.run_until(20.0)
    # From b's arrival the device is split evenly: b does not get the 10 s a used while b was idle.
    assert dev.device_s("b", since=10.0) == pytest.approx(5.0, abs=0.005)
    assert dev.device_s("a", since=10.0) == pytest.approx(5.0, abs=0.005)


def test_an_idle_device_runs_any_model_at_once_even_the_most_served():
    s = DeviceScheduler(slots=1)
    assert s.acquire("a", lambda: None)
    assert not s.release("a", 100.0, more=False, wake=lambda: None)
    assert s.acquire("b", lambda: None)  # b has used nothing, but a's turn does not wait for it
    assert not s.release("b", 0.001, more=False, wake=lambda: None)
    assert s.acquire("a", lambda: None)
    assert s.device_s == {"a": 100.0, "b": 0.001}


def test_a_slot_handed_to_a_model_with_nothing_left_goes_to_the_next():
    s = DeviceScheduler(slots=1)
    woken = []
    assert s.acquire("a", lambda: woken.append("a"))
    assert not s.acquire("b", lambda: woken.append("b"))
    assert not s.acquire("c", lambda: woken.append("c"))
    assert not s.release("a", 0.01, more=False, wake=lambda: None)
    assert woken == ["b"] and s.waiting("b") and s.busy == 1
    s.decline("b")  # b's client went away before it ran
    assert woken == ["b", "c"] and not s.waiting("b")
    assert s.acquire("c", lambda: None) and s.busy == 1
    assert not s.release("c", 0.01, more=False, wake=lambda: None)
    assert s.busy == 0


# -- batchers of two models sharing one device ------------------------------------------------
class CostlyDevice:
    """One model's forward: moves the shared fake clock on by its cost and records who ran."""

    def __init__(self, name: str, clock: FakeClock, cost_s: float, log: list, lock: threading.Lock,
                 gate: threading.Event):
        self.name, self.clock, self.cost_s, self.log, self.lock, self.gate = name, clock, cost_s, log, lock, gate

    def __call__(self, bucket: Bucket, rows, layout=None) -> np.ndarray:
        assert self.gate.wait(10)
        with self.lock:  # one slot: never two at once; the lock only guards the test's own log
            self.log.append(self.name)
            self.clock.advance(self.cost_s)
        return np.zeros((len(rows), 2), dtype=np.float32)


def two_batchers(costs: dict[str, float], slots: int = 1, **kw):
    clock, log, lock, gate = FakeClock(), [], threading.Lock(), threading.Event()
    device = DeviceScheduler(slots)
    device.gate = gate  # the test opens it: every forward waits until then
    batchers = {name: Batcher(BUCKETS, CostlyDevice(name, clock, cost, log, lock, gate), max_batch_tokens=64,
                              timings_s=PADDING_BOUND, learn_timings=False, inline_max_ms=0,
                              max_concurrent_batches=slots, clock=clock, device=device, name=name, **kw)
                for name, cost in costs.items()}
    return batchers, device, log


def test_two_models_under_contention_get_equal_device_time():
    costs = {"cheap": 1.0, "dear": 3.0}
    batchers, device, log = two_batchers(costs)

    async def main():
        # 60-token rows: one row per batch (bucket 1x64 under a 64-token budget), 150 batches each.
        jobs = [asyncio.ensure_future(batchers[m].submit([[1] * 60])) for _ in range(150) for m in costs]
        # The fake forwards take no real time: hold the first until both models asked for the
        # device, as a real forward's milliseconds would.
        while not device.waiting("dear"):
            await asyncio.sleep(0)
        device.gate.set()
        await asyncio.gather(*jobs)

    asyncio.run(main())
    assert device.device_s == {"cheap": 150.0, "dear": 450.0}  # every batch charged its device time
    # Until the cheap model's queue ran dry, both had work: their device times stay level.
    last_cheap = max(i for i, m in enumerate(log) if m == "cheap")
    used = {m: sum(costs[x] for x in log[:last_cheap + 1] if x == m) for m in costs}
    assert abs(used["cheap"] - used["dear"]) <= 3.0, used
    assert log.count("dear") == 150 and log.count("cheap") == 150


def test_a_full_queue_refuses_only_its_own_model():
    batchers, device, log = two_batchers({"a": 1.0, "b": 1.0}, max_queued_rows=2)

    async def main():
        a, b = batchers["a"], batchers["b"]
        held = asyncio.ensure_future(a.submit([[1] * 60, [1] * 60]))
        while a.inflight_batches == 0:  # a's first row on the (held) device, its second queued
            await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await a.submit([[1] * 60, [1] * 60])  # 1 queued + 2 > 2
        later = asyncio.ensure_future(b.submit([[1] * 60, [1] * 60]))  # b's queue is its own
        while not device.waiting("b"):
            await asyncio.sleep(0)
        device.gate.set()
        assert len(await later) == 2 and len(await held) == 2

    asyncio.run(main())
    assert log.count("a") == 2 and log.count("b") == 2
