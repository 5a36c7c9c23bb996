"""Sharing one device between the models of a replica: who runs the next batch.

A replica serving several models (`neuronserve serve --artifacts A --artifacts B`) has one batcher
per model (its own queues, batching plan and admission) and one device: a NeuronCore group, or on
CPU the replica's cores. `DeviceScheduler` owns the device's forward slots (`slots`, the replica's
`max_concurrent_batches`). A batcher with a batch ready asks for a slot:

* a free slot is granted at once, to any model: an idle device never waits for fairness;
* when every slot is busy the model waits; as a slot frees, it goes to the waiting model (or the
  model that just finished, if it has more) that has used the least device time, so under
  contention each model gets an equal share of device seconds, whatever its batches cost
  (start-time fair queueing over measured batch times);
* a model that comes back after having nothing to run starts level with the least-served active
  model, not with the credit of its idle time: it cannot shut the others out afterwards, and a
  model with no traffic costs the others nothing.

The scheduler never waits and never calls into a batcher while holding its lock: a model it picks
is told through its `wake` callback (which must not block: the batcher's event-loop wake-up),
after the lock is released. With one model there is no scheduler (the batcher's own slot count
is the device's), so the one-model path does no extra work.

>>> s = DeviceScheduler(slots=1)
>>> s.acquire("a", wake=lambda: None)                  # an idle device: at once
True
>>> s.acquire("b", wake=lambda: print("b woken"))      # busy: b waits
False
>>> s.release("a", device_s=0.004, more=True, wake=lambda: None)  # a used 4 ms, b none: b's turn
b woken
False
>>> s.acquire("b", wake=lambda: None)                  # the slot handed to b
True
"""

from __future__ import annotations

import threading
from typing import Callable

__all__ = ["DeviceScheduler"]


class DeviceScheduler:
    def __init__(self, slots: int = 1):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = int(slots)
        self.busy = 0  # slots running a batch or handed to a model that has not taken it yet
        self.device_s: dict[str, float] = {}  # measured device seconds per model, ever
        self._vtime: dict[str, float] = {}  # device seconds per model, lifted on return from idle
        self._running: dict[str, int] = {}  # batches each model has on the device
        self._waiting: dict[str, Callable[[], None]] = {}  # model -> its wake, in arrival order
        self._granted: dict[str, int] = {}  # slots handed over to a model, not yet taken
        self._lock = threading.Lock()

    def configure(self, slots: int) -> None:
        """A new slot count (the batching knobs changed live); takes effect as slots free."""
        wakes = []
        with self._lock:
            self.slots = max(1, int(slots))
            while self._waiting and self.busy < self.slots:
                wakes.append(self._hand_over_locked())
        for wake in wakes:
            wake()

    # -- the batchers' calls ----------------------------------------------------------------
    def acquire(self, model: str, wake: Callable[[], None]) -> bool:
        """`model` has a batch ready: True if it may run it now (it then holds a slot until
        `release`); False if it must wait: `wake` is called when a slot is handed to it."""
        with self._lock:
            granted = self._granted.get(model, 0)
            if granted:
                self._granted[model] = granted - 1
                self._running[model] = self._running.get(model, 0) + 1
                return True
            if self.busy < self.slots and not self._waiting:
                self._activate_locked(model)
                self.busy += 1
                self._running[model] = self._running.get(model, 0) + 1
                return True
            if model not in self._waiting:
                self._activate_locked(model)
                self._waiting[model] = wake
            return False

    def release(self, model: str, device_s: float, more: bool, wake: Callable[[], None]) -> bool:
        """`model`'s batch ended after `device_s` device seconds. `more`: it has rows waiting.
        True if it keeps the slot for its next batch; False if the slot went to another model
        (then, with `more`, `model` waits its turn and `wake` is called when it comes)."""
        woken = None
        with self._lock:
            self._charge_locked(model, device_s)
            self._running[model] -= 1
            if more and (not self._waiting or self._vtime[model] <= min(self._vtime[m] for m in self._waiting)):
                self._running[model] += 1
                return True
            self.busy -= 1
            if more and model not in self._waiting:
                self._waiting[model] = wake
            if self._waiting and self.busy < self.slots:
                woken = self._hand_over_locked()
        if woken is not None:
            woken()
        return False

    def decline(self, model: str) -> None:
        """`model` has nothing to run after all (its rows were cancelled): give back what was
        handed to it and stop waiting."""
        wakes = []
        with self._lock:
            self._waiting.pop(model, None)
            self.busy -= self._granted.pop(model, 0)
            while self._waiting and self.busy < self.slots:
                wakes.append(self._hand_over_locked())
        for wake in wakes:
            wake()

    def waiting(self, model: str) -> bool:
        """Whether `model` waits for a slot (or was handed one it has not taken)."""
        with self._lock:
            return model in self._waiting or self._granted.get(model, 0) > 0

    # -- inside the lock --------------------------------------------------------------------
    def _charge_locked(self, model: str, device_s: float) -> None:
        seconds = max(0.0, float(device_s))
        self.device_s[model] = self.device_s.get(model, 0.0) + seconds
        self._vtime[model] = self._vtime.get(model, 0.0) + seconds

    def _activate_locked(self, model: str) -> None:
        """A model with a batch ready: if it had nothing running or waiting, it starts level with
        the least-served model that is active (no credit for idle time)."""
        if self._running.get(model, 0) or model in self._waiting or self._granted.get(model, 0):
            return
        active = [self._vtime[m] for m in set(self._waiting) | {m for m, n in self._running.items() if n}
                  if m in self._vtime]
        floor = min(active) if active else max(self._vtime.values(), default=0.0)
        self._vtime[model] = max(self._vtime.get(model, 0.0), floor)

    def _hand_over_locked(self) -> Callable[[], None]:
        """Give a free slot to the waiting model with the least device time (the earliest
        arrival among equals); returns its wake, to call after the lock is released."""
        model = min(self._waiting, key=lambda m: self._vtime.get(m, 0.0))
        wake = self._waiting.pop(model)
        self._granted[model] = self._granted.get(model, 0) + 1
        self.busy += 1
        return wake
