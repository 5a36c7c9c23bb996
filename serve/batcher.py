"""Bucket-aware batching inside one replica: the queue, admission, dispatch and completion.

Rows from all concurrent requests wait in one FIFO per compiled sequence length. Whenever the
device has room (fewer than `max_concurrent_batches` in flight) the batcher takes the next batch
at once, as `serve.planner.next_batch` chooses it over the oldest waiting rows: the batch holding
the oldest row of the least-device-time plan for everything waiting (or a packed batch, with
`pack`, when that is cheaper per real token). While the device is busy rows pile up and the next
batch is fuller by itself; nobody waits for a batch to fill on an idle device unless
`batch_wait_ms` asks for it. A cheap batch on an idle device runs on the event loop itself, which
blocks every other batch until it is done, so it may use all of the replica's compute
(`run_inline`: on CPU every core's thread), which cuts the latency of a lone request.

Forward threads take their next batch themselves: as a batch ends with rows waiting, its thread
takes the next one (under a lock shared with the event loop) and runs it, and only hands the
finished batch to the event loop to answer (why: docs/decisions.md, "Forward threads
take their next batch").

A batch whose forward raises answers its rows' requests with `BackendFailure` (500, no internals;
the log line names the requests' ids) and counts in `failed_in_a_row` until a batch succeeds
(the replica's health rule reads it: `serve.replica.Replica.health_problem`).

Rows whose client went away are dropped before execution. The queue is bounded in rows: a
request that does not fit is refused whole (429) before anything of it is queued, so an accepted
request is always answered. Times come from `clock` (injectable for tests).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections import deque
from itertools import islice
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from neuronserve.models.artifact import Bucket
from neuronserve.serve.buckets import BucketSet
from neuronserve.serve import request_ids
from neuronserve.serve.errors import BackendFailure, Overloaded
from neuronserve.serve.planner import PADDING_WEIGHT, Batch, BatchRecord, TimingTable, next_batch
from neuronserve.serve.scheduler import DeviceScheduler

__all__ = ["Batcher", "BatchRecord", "Row"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    ids: list[int]
    future: asyncio.Future
    seq_len: int  # the compiled sequence length this row belongs to
    enqueued: float  # the batcher's clock when it was queued
    cancelled: bool = False
    started: float = 0.0  # when its batch went to the device
    finished: float = 0.0  # when its batch's outputs came back
    trace: object = None  # its request's span context, when tracing (`request_context`)
    request_id: str | None = None  # of the request it came in (`serve.request_ids`), for log lines


# A batch taken from the queue: the planner's choice and the rows it names (in its order).
Taken = tuple[Batch, list[Row]]


class Batcher:
    def __init__(
        self,
        buckets: BucketSet,
        run_bucket: Callable[[Bucket, list[list[int]]], np.ndarray],
        *,
        max_batch_tokens: int,
        batch_wait_ms: float = 0.0,
        max_concurrent_batches: int = 1,
        max_queued_rows: int = 2048,
        on_batch: Callable[[BatchRecord], None] | None = None,
        on_failure: Callable[[Bucket, int], None] | None = None,
        timings_s: dict[Bucket, float] | None = None,
        learn_timings: bool = True,
        inline_max_ms: float = 20.0,
        padding_weight: float = PADDING_WEIGHT,
        run_inline: Callable[[Bucket, list[list[int]]], np.ndarray] | None = None,
        pack: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        device: DeviceScheduler | None = None,
        name: str = "",
    ):
        self.buckets = buckets
        # Device seconds per bucket (the warm-up's timings), scaled to what served batches take.
        self.timings = TimingTable(buckets, timings_s)
        self.learn_timings = learn_timings
        self.inline_max_s = inline_max_ms / 1000.0
        self.padding_weight = float(padding_weight)
        self.clock = clock
        self.run_bucket = run_bucket
        # Several models in one replica: the device's slots are shared through `device`
        # (serve.scheduler), this batcher asking for one as `name`. None: the device is this
        # batcher's alone and its own slot count is the device's (no extra work per batch).
        self.device = device
        self.name = name
        # For the batches run on the event loop (see _loop): nothing else runs beside them, so they
        # may use all of the replica's compute (on CPU every core's thread instead of one
        # forward's share). Their timings do not scale the timing table.
        self.run_inline = run_inline or run_bucket
        # With `pack`, a batch may hold several rows per sequence: then `run_bucket` and
        # `run_inline` are called with a third argument, the layout (see `planner.Batch`).
        self.pack = pack
        self.on_batch = on_batch
        self.on_failure = on_failure  # (bucket, rows) of a batch whose forward raised
        self.failed_in_a_row = 0  # batches whose forward raised since the last one that did not
        self.queues: dict[int, deque[Row]] = {s: deque() for s in buckets.seq_lens}
        # Rows one batch is planned over: enough to fill the largest batch, few enough to plan in ~1 ms.
        self.plan_window_rows = max(64, max(b.batch_size for b in buckets.buckets))
        self.queued_rows = 0
        self.inflight_batches = 0
        self.inflight_rows = 0
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._tokens_per_s = 0.0  # smoothed real throughput, for Retry-After
        # Forward threads take their next batch themselves (`_work`): the queues, the counters and
        # the timing table are shared with the event loop under this lock.
        self._lock = threading.RLock()
        # Tracing hooks, set by serve.tracing when it is on: the submitting request's span context
        # (kept on its rows), and a callback per finished batch (batch, rows, started, finished, error).
        self.request_context: Callable[[], object] | None = None
        self.on_batch_trace: Callable | None = None
        self.configure(max_batch_tokens, batch_wait_ms, max_concurrent_batches, max_queued_rows)

    def configure(self, max_batch_tokens: int, batch_wait_ms: float, max_concurrent_batches: int, max_queued_rows: int,
                  pack: bool | None = None) -> None:
        """Live reconfiguration (Serve user_config); takes effect at the next batch. `pack` None
        keeps packing as it is."""
        if pack is not None:
            self.pack = bool(pack)
        self.max_batch_tokens = int(max_batch_tokens)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.max_queued_rows = int(max_queued_rows)
        if self._executor is None or max_concurrent_batches != self.max_concurrent_batches:
            old = self._executor
            self._executor = ThreadPoolExecutor(max_workers=max_concurrent_batches, thread_name_prefix="forward")
            if old is not None:
                old.shutdown(wait=False)
        self.max_concurrent_batches = int(max_concurrent_batches)
        if self._wake is not None:
            self._wake.set()

    # -- submission -----------------------------------------------------------------------------
    def seq_len_of(self, ids: list[int]) -> int:
        return self.buckets.seq_len_for(len(ids))

    async def submit(self, rows: list[list[int]], timing: dict | None = None) -> list[np.ndarray]:
        """Queue rows (already known to fit a bucket) and wait for their outputs, in order.

        `timing`, if given, receives `queue_s` (until the first of the rows' batches started) and
        `inference_s` (from then until the last of them finished), for the response headers."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.queued_rows + len(rows) > self.max_queued_rows:
                raise Overloaded(
                    f"server overloaded: {self.queued_rows} rows queued, limit {self.max_queued_rows}; retry later",
                    retry_after_s=self.retry_after_s(),
                )
            clock = self.clock
            rid = request_ids.current()
            items = [Row(ids, loop.create_future(), self.seq_len_of(ids), clock(), request_id=rid) for ids in rows]
            if self.request_context is not None:
                trace = self.request_context()
                for item in items:
                    item.trace = trace
            for item in items:
                self.queues[item.seq_len].append(item)
            self.queued_rows += len(items)
        self._wake.set()
        try:
            outs = list(await asyncio.gather(*(r.future for r in items)))
        except BaseException:
            # Client gone or timed out: drop what has not run yet; running rows finish harmlessly.
            for r in items:
                r.cancelled = True
                if not r.future.done():
                    r.future.cancel()
            self._wake.set()
            raise
        if timing is not None:
            first = min(r.started for r in items)
            timing["queue_s"] = max(0.0, first - min(r.enqueued for r in items))
            timing["inference_s"] = max(r.finished for r in items) - first
        return outs

    def retry_after_s(self) -> int:
        if self._tokens_per_s <= 0:
            return 1
        with self._lock:
            queued_tokens = sum(len(r.ids) for q in self.queues.values() for r in q)
        return int(min(60, max(1, queued_tokens / self._tokens_per_s)))

    # -- the loop -------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._event_loop = asyncio.get_running_loop()
            self._task = self._event_loop.create_task(self._loop())

    def _wake_from_any_thread(self) -> None:
        """The scheduler's call when it hands this batcher a slot (from any thread, never blocking)."""
        loop = self._event_loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: the replica is gone
                pass

    async def _loop(self) -> None:
        """Starts batches when a forward slot is free and nothing is running to take the next batch
        itself (`_work` does that as a batch ends): the first batch on an idle replica, and batches
        held back by `batch_wait_ms`."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if self.inflight_batches >= self.max_concurrent_batches:
                        break
                    seq_len = self._oldest_group()
                    if seq_len is None:
                        if self.device is not None:  # a slot handed over meanwhile goes back
                            self.device.decline(self.name)
                        break
                    wait_s = self._wait_for_fuller_s(seq_len) if self.batch_wait_s > 0 else 0.0
                    if wait_s <= 0:
                        if self.device is not None and not self.device.acquire(self.name, self._wake_from_any_thread):
                            break  # another model's turn on the device: woken when it is ours
                        taken = self._take()
                        self._begin(taken)
                        # A short batch on an idle device runs right here, saving two thread
                        # wake-ups (why: docs/decisions.md, "Cheap batches on an idle
                        # replica"). Nothing else can run meanwhile, so this is only done for
                        # batches expected within `inline_max_s`, and with all of the replica's
                        # compute (`run_inline`). Only when nothing else is running: a wide batch
                        # beside a running one would oversubscribe the cores.
                        inline = (self.inline_max_s > 0 and self.inflight_batches == 1
                                  and (self.device is None or self.device.busy == 1)
                                  and self.timings.device_s(taken[0].bucket) <= self.inline_max_s)
                if wait_s > 0:
                    # batch_wait_ms: wait (up to that long since the oldest row arrived) for a
                    # fuller batch, then look again from the top (other groups may be older).
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
                        self._wake.clear()
                    except asyncio.TimeoutError:
                        pass
                    continue
                if inline:
                    outcome = self._execute(self.run_inline, taken)
                    with self._lock:
                        self.inflight_batches -= 1
                        if self.device is not None:
                            self.device.release(self.name, outcome[1] - outcome[0], False, self._wake_from_any_thread)
                    self._complete(taken, *outcome, inline=True)
                else:
                    self._executor.submit(self._work, taken, loop)

    def _drop_cancelled(self, q: deque[Row]) -> None:
        while q and q[0].cancelled:
            q.popleft()
            self.queued_rows -= 1

    def _oldest_group(self) -> int | None:
        best, best_t = None, None
        for seq_len, q in self.queues.items():
            self._drop_cancelled(q)
            if q and (best_t is None or q[0].enqueued < best_t):
                best, best_t = seq_len, q[0].enqueued
        return best

    def _wait_for_fuller_s(self, seq_len: int) -> float:
        """With batch_wait_ms set: how much longer to wait for a full batch of `seq_len` (0: take it now)."""
        q = self.queues[seq_len]
        full = self.buckets.allowed_sizes(seq_len, self.max_batch_tokens)[-1]
        if len(q) >= full:
            return 0.0
        return max(0.0, self.batch_wait_s - (self.clock() - q[0].enqueued))

    def _take(self) -> Taken:
        """Take the next batch off the queues (under the lock): the planner's `next_batch` over the
        oldest `plan_window_rows` live rows, oldest first."""
        groups = [self.queues[s] for s in self.buckets.seq_lens if self.queues[s]]
        live = (r for r in heapq.merge(*groups, key=lambda r: r.enqueued) if not r.cancelled)
        window = list(islice(live, self.plan_window_rows))
        batch = next_batch([len(r.ids) for r in window], self.timings, max_batch_tokens=self.max_batch_tokens,
                           padding_weight=self.padding_weight, packing=self.pack)
        chosen = [window[i] for i in batch.rows]
        picked = {id(r) for r in chosen}
        for s in {r.seq_len for r in chosen}:  # only the groups the batch takes rows from
            q = self.queues[s]
            keep = [r for r in q if not r.cancelled and id(r) not in picked]
            self.queued_rows -= len(q) - len(keep)
            q.clear()
            q.extend(keep)
        return batch, chosen

    def _execute(self, run: Callable, taken: Taken) -> tuple[float, float, np.ndarray | None, Exception | None]:
        """Run a taken batch with `run` (`run_bucket` or `run_inline`): (started, finished, out, error)."""
        batch, rows = taken
        args = (batch.bucket, [r.ids for r in rows])
        if batch.layout is not None:
            args += ([list(seq) for seq in batch.layout],)
        started = self.clock()
        try:
            out, error = run(*args), None
        except Exception as e:
            out, error = None, e
        return started, self.clock(), out, error

    def _begin(self, taken: Taken) -> None:
        """A taken batch takes a forward slot (under the lock)."""
        self.inflight_batches += 1
        self.inflight_rows += len(taken[1])

    def _work(self, taken: Taken, loop: asyncio.AbstractEventLoop) -> None:
        """A forward thread: run a taken batch, then take and run the next one right here while rows
        wait (without batch_wait_ms), handing each finished batch to the event loop to answer. The
        thread never waits for the loop, which may be busy parsing and answering requests."""
        while taken is not None:
            outcome = self._execute(self.run_bucket, taken)
            with self._lock:
                self.inflight_batches -= 1
                done, taken = taken, None
                kept = False
                try:
                    more = (self.batch_wait_s == 0 and self.inflight_batches < self.max_concurrent_batches
                            and self._oldest_group() is not None)
                    if self.device is not None:
                        # The device's next batch may be another model's (serve.scheduler).
                        more = kept = self.device.release(self.name, outcome[1] - outcome[0], more,
                                                          self._wake_from_any_thread)
                    if more:
                        taken = self._take()
                        self._begin(taken)
                except Exception:  # a bug: leave the rows to the event loop, answer this batch
                    log.exception("taking the next batch on the forward thread failed")
                    if kept and taken is None:
                        self.device.release(self.name, 0.0, False, self._wake_from_any_thread)
                    taken = None
            try:
                loop.call_soon_threadsafe(self._complete, done, *outcome)
            except RuntimeError:  # the loop is closed: the replica is gone, nobody to answer
                return

    def _complete(self, taken: Taken, started: float, finished: float, out, error: BaseException | None,
                  inline: bool = False) -> None:
        """On the event loop: answer a finished batch's rows, record it, and wake the loop."""
        batch, rows = taken
        bucket = batch.bucket
        try:
            if error is not None:
                self.failed_in_a_row += 1
                ids = sorted({r.request_id for r in rows if r.request_id})
                log.error("batch %s of %d rows failed (%d in a row); requests: %s", bucket, len(rows),
                          self.failed_in_a_row, ", ".join(ids) or "-", exc_info=error)
                for r in rows:
                    if not r.future.done():
                        r.future.set_exception(BackendFailure("internal error: inference failed on the backend; "
                                                              "see the server log"))
                if self.on_failure is not None:
                    try:
                        self.on_failure(bucket, len(rows))
                    except Exception:
                        log.exception("batch failure hook failed")
                return
            self.failed_in_a_row = 0
            for r, vec in zip(rows, out):
                r.started, r.finished = started, finished
                if not r.future.done():
                    r.future.set_result(vec)
            elapsed = finished - started
            real = sum(len(r.ids) for r in rows)
            with self._lock:
                if self.learn_timings and not (inline and self.run_inline is not self.run_bucket):
                    self.timings.learn(bucket, elapsed)
            rate = real / max(elapsed, 1e-6)
            self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
            if self.on_batch is not None:
                try:
                    self.on_batch(BatchRecord(bucket, len(rows), real, bucket.padded_tokens, elapsed,
                                              [started - r.enqueued for r in rows], batch.packed))
                except Exception:
                    log.exception("batch metrics hook failed")
        finally:
            if self.on_batch_trace is not None:
                try:
                    self.on_batch_trace(batch, rows, started, finished, error)
                except Exception:
                    log.exception("batch tracing hook failed")
            with self._lock:
                self.inflight_rows -= len(rows)
            self._wake.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running (for graceful shutdown)."""
        deadline = time.perf_counter() + timeout_s
        while (self.queued_rows > 0 or self.inflight_rows > 0) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return self.queued_rows == 0 and self.inflight_rows == 0
