"""Bucket-aware batching inside one replica.

Rows from all concurrent requests wait in one FIFO per compiled sequence length, so a short
sentence is never padded to a paragraph. Whenever the device has room (fewer than
`max_concurrent_batches` in flight) the batcher cuts a batch at once from the group whose oldest
row has waited longest: as many rows as the padded-token budget and the compiled batch sizes
allow, split so the batch dimension is padded as little as possible. While the device is busy,
rows pile up and the next batch is fuller by itself; nobody waits for a batch to fill on an idle
device unless `batch_wait_ms` asks for it.

Rows whose client went away are dropped before execution. The queue is bounded in rows: a
request that does not fit is refused whole (429) before anything of it is queued, so an accepted
request is always answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from models.artifact import Bucket
from serve.buckets import BucketSet, split_rows
from serve.errors import BackendFailure, Overloaded

log = logging.getLogger("neuronserve.batcher")


@dataclass(eq=False)
class Row:
    ids: list[int]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass
class BatchRecord:
    """One executed batch, for metrics and response headers."""

    bucket: Bucket
    rows: int
    real_tokens: int
    padded_tokens: int
    inference_s: float
    queue_waits_s: list[float]


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
    ):
        self.buckets = buckets
        self.run_bucket = run_bucket
        self.on_batch = on_batch
        self.queues: dict[int, deque[Row]] = {s: deque() for s in buckets.seq_lens}
        self.queued_rows = 0
        self.inflight_batches = 0
        self.inflight_rows = 0
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tokens_per_s = 0.0  # smoothed real throughput, for Retry-After
        self.configure(max_batch_tokens, batch_wait_ms, max_concurrent_batches, max_queued_rows)

    def configure(self, max_batch_tokens: int, batch_wait_ms: float, max_concurrent_batches: int, max_queued_rows: int) -> None:
        """Live reconfiguration (Serve user_config); takes effect at the next cut."""
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

    async def submit(self, rows: list[list[int]]) -> list[np.ndarray]:
        """Queue rows (already known to fit a bucket) and wait for their outputs, in order."""
        self._ensure_started()
        if self.queued_rows + len(rows) > self.max_queued_rows:
            raise Overloaded(
                f"server overloaded: {self.queued_rows} rows queued, limit {self.max_queued_rows}; retry later",
                retry_after_s=self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        items = [Row(ids, loop.create_future()) for ids in rows]
        for item in items:
            self.queues[self.seq_len_of(item.ids)].append(item)
        self.queued_rows += len(items)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(r.future for r in items)))
        except BaseException:
            # Client gone or timed out: drop what has not run yet; running rows finish harmlessly.
            for r in items:
                r.cancelled = True
                if not r.future.done():
                    r.future.cancel()
            self._wake.set()
            raise

    def retry_after_s(self) -> int:
        if self._tokens_per_s <= 0:
            return 1
        queued_tokens = sum(len(r.ids) for q in self.queues.values() for r in q)
        return int(min(60, max(1, queued_tokens / self._tokens_per_s)))

    # -- the loop -------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.inflight_batches < self.max_concurrent_batches:
                seq_len = self._oldest_group()
                if seq_len is None:
                    break
                if self.batch_wait_s > 0 and not await self._worth_waiting(seq_len):
                    continue
                batch = self._cut(seq_len)
                if batch:
                    self.inflight_batches += 1
                    self.inflight_rows += len(batch[1])
                    asyncio.get_running_loop().create_task(self._run(*batch))

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

    async def _worth_waiting(self, seq_len: int) -> bool:
        """With batch_wait_ms set: wait (up to that long since the oldest row arrived) for a full batch."""
        q = self.queues[seq_len]
        full = self.buckets.allowed_sizes(seq_len, self.max_batch_tokens)[-1]
        remaining = self.batch_wait_s - (time.perf_counter() - q[0].enqueued)
        if len(q) >= full or remaining <= 0:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=remaining)
            self._wake.clear()
        except asyncio.TimeoutError:
            pass
        return False  # re-evaluate from the top: other groups may be older now

    def _cut(self, seq_len: int) -> tuple[Bucket, list[Row]] | None:
        q = self.queues[seq_len]
        sizes = self.buckets.allowed_sizes(seq_len, self.max_batch_tokens)
        live = sum(1 for r in q if not r.cancelled) if len(q) <= sizes[-1] else len(q)
        if live == 0:
            self.queued_rows -= len(q)
            q.clear()
            return None
        take = split_rows(min(live, sizes[-1]), sizes)[0]
        rows: list[Row] = []
        while q and len(rows) < take:
            r = q.popleft()
            self.queued_rows -= 1
            if not r.cancelled:
                rows.append(r)
        if not rows:
            return None
        return self.buckets.bucket_for(len(rows), seq_len), rows

    async def _run(self, bucket: Bucket, rows: list[Row]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.run_bucket, bucket, [r.ids for r in rows])
        except Exception:
            log.exception("batch %s of %d rows failed", bucket, len(rows))
            for r in rows:
                if not r.future.done():
                    r.future.set_exception(BackendFailure("inference failed on the backend; see the server log"))
        else:
            for r, vec in zip(rows, out):
                if not r.future.done():
                    r.future.set_result(vec)
            elapsed = time.perf_counter() - started
            real = sum(len(r.ids) for r in rows)
            rate = real / max(elapsed, 1e-6)
            self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
            if self.on_batch is not None:
                try:
                    self.on_batch(BatchRecord(bucket, len(rows), real, bucket.padded_tokens, elapsed, [started - r.enqueued for r in rows]))
                except Exception:
                    log.exception("batch metrics hook failed")
        finally:
            self.inflight_batches -= 1
            self.inflight_rows -= len(rows)
            self._wake.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running (for graceful shutdown)."""
        deadline = time.perf_counter() + timeout_s
        while (self.queued_rows > 0 or self.inflight_batches > 0) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return self.queued_rows == 0 and self.inflight_batches == 0
