"""Bucket-aware batching inside one replica.

Rows from all concurrent requests wait in one FIFO per compiled sequence length. Whenever the
device has room (fewer than `max_concurrent_batches` in flight) the batcher cuts a batch at once.
It plans how to run everything waiting in the least device time: the rows, sorted by length, are
split into batches each padded to its longest row's bucket, using the cost of every compiled
(batch, seq_len) from the warm-up, scaled to what served batches take, and every padded token
(beyond a row's own bucket, or an empty row) charged again at `padding_weight` times the cheapest
device time per token. Only the planned batch that holds the oldest waiting row runs now (so
nothing starves); the rest is planned again at the next cut, with whatever has arrived meanwhile.
So a short row is padded to a longer neighbour only when that saves clearly more device time than
the padding costs (small batches are inefficient on CPU), and the batch dimension likewise. While
the device is busy rows pile up and the next batch is fuller by itself; nobody waits for a batch to
fill on an idle device unless `batch_wait_ms` asks for it. A cheap batch on an idle device runs on
the event loop itself, which blocks every other batch until it is done, so it may use all of the
replica's compute (`run_inline`: on CPU every core's thread), which cuts the latency of a lone
request.

Packing (`pack`, CPU artifacts with a packed graph): instead of one row per sequence, a batch may
hold several rows one after another in each sequence, each attending only to itself, so short
rows of different lengths fill one fuller batch with almost no padding instead of several small
batches (a CPU forward pays a fixed ~5-7 ms here for streaming the weights, whatever its size). A
cut runs the cheapest packed batch that holds the oldest row when it costs less device time per
real token than the plan above; a lone row never packs. Measured in process here (2 forwards, 32
closed-loop clients, mixed lengths; paired runs): 6380-6935 real tokens/s against 5311-6107,
padded/real 1.035-1.05 against 1.10, half as many batches.

Forward threads take their next batch themselves: as a batch ends with rows waiting, its thread
cuts the next one (under a lock shared with the event loop) and runs it, and only hands the
finished batch to the event loop to answer. Going back to the loop between batches left each
forward thread idle ~6% of the time at c=32 here (the loop was busy with HTTP), 0.8% this way; on
CPU the cores do other work meanwhile, but a NeuronCore would simply wait.

Rows whose client went away are dropped before execution. The queue is bounded in rows: a
request that does not fit is refused whole (429) before anything of it is queued, so an accepted
request is always answered.
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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from neuronserve.models.artifact import Bucket
from neuronserve.models.packing import pack_rows
from neuronserve.serve.buckets import BucketSet
from neuronserve.serve.errors import BackendFailure, Overloaded

log = logging.getLogger("neuronserve.batcher")

# What a padded token costs in the plan on top of its device time, in units of the cheapest
# device time per token. The warm-up's timings are single noisy samples and make many merges of a
# short row into a longer batch look a few percent cheaper than running it apart; served, those
# merges did not pay: measured here at c=32 on the mixed workload (paired runs), padded/real went
# from 1.16-1.20 to 1.12 with 3 at the same throughput (4736/4885 against 4773 real tokens/s;
# 1.5: 1.135-1.145 with one run at 1.34; 6: the same as 3).
PADDING_WEIGHT = 3.0


@dataclass(eq=False)
class Row:
    ids: list[int]
    future: asyncio.Future
    seq_len: int  # the compiled sequence length this row belongs to
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    started: float = 0.0  # when its batch went to the device
    finished: float = 0.0  # when its batch's outputs came back


@dataclass
class BatchRecord:
    """One executed batch, for metrics and response headers."""

    bucket: Bucket
    rows: int
    real_tokens: int
    padded_tokens: int
    inference_s: float
    queue_waits_s: list[float]
    packed: bool = False  # several rows per sequence


@dataclass
class Cut:
    """The batch to run next: `rows` in `bucket`, one per sequence, or packed as `layout` says
    (per sequence, indices into `rows`)."""

    bucket: Bucket
    rows: list[Row]
    layout: list[list[int]] | None = None


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
        costs_s: dict[Bucket, float] | None = None,
        learn_costs: bool = True,
        inline_max_ms: float = 20.0,
        padding_weight: float = PADDING_WEIGHT,
        run_inline: Callable[[Bucket, list[list[int]]], np.ndarray] | None = None,
        pack: bool = False,
    ):
        self.buckets = buckets
        # Seconds of device time per bucket (the warm-up's timings); unknown buckets cost their
        # padded tokens at a nominal rate until they have run once.
        self.costs_s: dict[Bucket, float] = dict(costs_s or {})
        self.learn_costs = learn_costs
        # Served batches run slower than the warm-up's (other forwards, HTTP and tokenising share
        # the cores and memory bandwidth), and not evenly: learning each bucket's cost from them
        # skewed the table and padded 1.24-1.27x where the warm-up's shape gave 1.17x, at the same
        # throughput (measured here, c=32). So the served timings only scale the whole table.
        self.cost_scale = 1.0
        self.inline_max_s = inline_max_ms / 1000.0
        self.padding_weight = float(padding_weight)
        self._envelope: dict[Bucket, float] = {}
        self._rebuild_envelope()
        self.run_bucket = run_bucket
        # For the batches run on the event loop (see _loop): nothing else runs beside them, so they
        # may use all of the replica's compute (on CPU every core's thread instead of one
        # forward's share). Their timings do not scale the cost table.
        self.run_inline = run_inline or run_bucket
        # With `pack`, a batch may hold several rows per sequence: then `run_bucket` and
        # `run_inline` are called with a third argument, the layout (see `Cut`).
        self.pack = pack
        self.on_batch = on_batch
        self.queues: dict[int, deque[Row]] = {s: deque() for s in buckets.seq_lens}
        # Rows one cut plans over: enough to fill the largest batch, few enough to plan in ~1 ms.
        self.plan_window_rows = max(64, max(b.batch_size for b in buckets.buckets))
        self.queued_rows = 0
        self.inflight_batches = 0
        self.inflight_rows = 0
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tokens_per_s = 0.0  # smoothed real throughput, for Retry-After
        # Forward threads cut their next batch themselves (`_work`): the queues, the counters and
        # the cost table are shared with the event loop under this lock.
        self._lock = threading.RLock()
        self.configure(max_batch_tokens, batch_wait_ms, max_concurrent_batches, max_queued_rows)

    def configure(self, max_batch_tokens: int, batch_wait_ms: float, max_concurrent_batches: int, max_queued_rows: int,
                  pack: bool | None = None) -> None:
        """Live reconfiguration (Serve user_config); takes effect at the next cut. `pack` None
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
            items = [Row(ids, loop.create_future(), self.seq_len_of(ids)) for ids in rows]
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
            self._task = asyncio.get_running_loop().create_task(self._loop())

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
                        break
                    wait_s = self._wait_for_fuller_s(seq_len) if self.batch_wait_s > 0 else 0.0
                    if wait_s <= 0:
                        cut = self._cut()
                        self._begin(cut)
                        # A short batch on an idle device runs right here: handing it to the
                        # forward thread and back costs two thread wake-ups (~1-3 ms on a VM), as
                        # much as a quarter of a batch-1 forward. Nothing else can run meanwhile,
                        # so this is only done for batches cheaper than `inline_max_s`, and with
                        # all of the replica's compute (`run_inline`). Only when nothing else is
                        # running: a wide batch beside a running one would oversubscribe the cores.
                        inline = self.inflight_batches == 1 and self.cost_s(cut.bucket) <= self.inline_max_s
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
                    outcome = self._execute(self.run_inline, cut)
                    with self._lock:
                        self.inflight_batches -= 1
                    self._complete(cut, *outcome, inline=True)
                else:
                    self._executor.submit(self._work, cut, loop)

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
        """With batch_wait_ms set: how much longer to wait for a full batch of `seq_len` (0: cut now)."""
        q = self.queues[seq_len]
        full = self.buckets.allowed_sizes(seq_len, self.max_batch_tokens)[-1]
        if len(q) >= full:
            return 0.0
        return max(0.0, self.batch_wait_s - (time.perf_counter() - q[0].enqueued))

    def cost_s(self, bucket: Bucket) -> float:
        return self._envelope[bucket] * self.cost_scale

    def _rebuild_envelope(self) -> None:
        """Costs made monotone: a bucket never costs less than a smaller one (fewer rows or
        shorter rows). Timings are noisy; without this a lucky 1x24 run would make the batcher pad
        16-token rows to 24. Unmeasured buckets cost their padded tokens at a nominal rate."""
        env: dict[Bucket, float] = {}
        sizes = sorted({b.batch_size for b in self.buckets.buckets})
        shorter = dict.fromkeys(sizes, 0.0)  # max cost over shorter seq_lens with batch <= size
        for seq_len in self.buckets.seq_lens:  # ascending
            below = 0.0
            for size in self.buckets.batch_sizes(seq_len):  # ascending
                b = Bucket(size, seq_len)
                own = self.costs_s.get(b)
                cost = own if own is not None else b.padded_tokens / 5000.0 + 0.002
                env[b] = below = max(cost, below, shorter[size])
            # Costs rise with the batch size within a sequence length, so the largest cost at
            # batch <= size is that of the largest such bucket: a running value over `sizes`.
            running = 0.0
            for size in sizes:
                running = env.get(Bucket(size, seq_len), running)
                shorter[size] = max(shorter[size], running)
        self._envelope = env
        # The least device time per padded token of any bucket: the price of one padded token.
        self._token_s = min(c / b.padded_tokens for b, c in env.items())

    def _count_costs(self, seq_len: int, most: int, pad_s: float) -> list[float]:
        """[0, cost of 1 row, ..., cost of `most` rows] at `seq_len` (each count padded to the
        smallest compiled batch size holding it, its empty rows priced at `pad_s` per token), up
        to the largest size the budget allows."""
        sizes = self.buckets.allowed_sizes(seq_len, self.max_batch_tokens)
        out = [0.0]
        i = 0
        for k in range(1, min(most, sizes[-1]) + 1):
            while sizes[i] < k:
                i += 1
            out.append(self.cost_s(Bucket(sizes[i], seq_len)) + pad_s * (sizes[i] - k) * seq_len)
        return out

    def _cut(self) -> Cut:
        """The batch that holds the oldest row, taken from the cheapest way to run everything queued.

        The oldest `plan_window_rows` live rows are sorted by sequence length and split into
        consecutive runs, each run one batch padded to its longest row's bucket, so that the
        device time to serve them all is least (dynamic programming over the sorted rows with the
        cost table, padding charged again at `padding_weight`). Of that plan only the batch
        holding the oldest row runs now; the rest is planned again at the next cut, when more rows
        may have arrived. So short rows are padded to a longer neighbour when that saves clearly
        more device time than the padding costs (small batches are inefficient), and long rows
        never drag a short majority into a wasteful batch.

        With `pack`, the cheapest packed batch holding the oldest row (`_packed_cut`) runs instead
        when its cost per real token is below that of the whole plan, both counted alike: device
        time plus the padding charge on tokens padded beyond the rows' own buckets."""
        groups = [self.queues[s] for s in self.buckets.seq_lens if self.queues[s]]
        live = (r for r in heapq.merge(*groups, key=lambda r: r.enqueued) if not r.cancelled)
        window = list(islice(live, self.plan_window_rows))
        oldest = window[0]
        rows = sorted(window, key=lambda r: r.seq_len)  # stable: oldest first within a length
        n = len(rows)
        own = [0] * (n + 1)  # own[k]: the first k rows' own sequence lengths, summed
        for k, r in enumerate(rows):
            own[k + 1] = own[k] + r.seq_len
        pad_s = self.padding_weight * self._token_s * self.cost_scale
        costs: dict[int, list[float]] = {}
        best = [0.0] * (n + 1)  # best[j]: least device time for rows[:j]
        start = [0] * (n + 1)  # where the last batch of that plan starts
        for j in range(1, n + 1):
            s = rows[j - 1].seq_len
            table = costs.get(s)
            if table is None:
                table = costs[s] = self._count_costs(s, n, pad_s)
            top = len(table) - 1
            bj, bi = float("inf"), j - 1
            # On ties the shortest last batch wins, so the older rows get the fuller batches.
            for i in range(j - 1, max(0, j - top) - 1, -1):
                # rows[i:j] padded to s: (j - i) * s tokens where the rows' own buckets hold own[j] - own[i]
                c = best[i] + table[j - i] + pad_s * ((j - i) * s - (own[j] - own[i]))
                if c < bj:
                    bj, bi = c, i
            best[j], start[j] = bj, bi
        j = n
        while True:  # walk the plan's batches back to the one holding the oldest row
            i = start[j]
            if any(r is oldest for r in rows[i:j]):
                break
            j = i
        chosen = rows[i:j]
        cut = Cut(self.buckets.bucket_for(len(chosen), chosen[-1].seq_len), chosen)
        if self.pack:
            packed = self._packed_cut(window, oldest, pad_s)
            # Against the plan's charged time per real token.
            if packed is not None and packed[1] < best[n] / sum(len(r.ids) for r in rows):
                cut = packed[0]
        chosen = cut.rows
        picked = {id(r) for r in chosen}
        for s in {r.seq_len for r in chosen}:  # only the groups the batch takes rows from
            q = self.queues[s]
            keep = [r for r in q if not r.cancelled and id(r) not in picked]
            self.queued_rows -= len(q) - len(keep)
            q.clear()
            q.extend(keep)
        if cut.layout is None:
            chosen.sort(key=lambda r: r.enqueued)
        return cut

    def _charged_s(self, cut: Cut, pad_s: float) -> float:
        """A batch's cost as the plan counts it: device time plus `pad_s` per padded token beyond
        its rows' own buckets (none for a packed batch that pads less than they would)."""
        return self.cost_s(cut.bucket) + pad_s * max(0, cut.bucket.padded_tokens - sum(r.seq_len for r in cut.rows))

    def _packed_cut(self, window: list[Row], oldest: Row, pad_s: float) -> tuple[Cut, float] | None:
        """The packed batch holding the oldest row that costs the least per real token (device
        time plus `pad_s` per token padded beyond the rows' own buckets) and that cost, or None
        when no packing holds more than that row.

        Several rows share a sequence of a compiled length L, each attending only to itself
        (`models.tasks.PackedEncoder`), so short rows of different lengths fill one fuller batch
        with little padding instead of several small ones. A packed batch of shape (B, L) costs
        what the bucket BxL costs (the table's timing; measured here within 2.5% of it). Tried
        for the first compiled L that holds the oldest row, then each next L at least twice the
        last tried (a few L, so a cut stays well under a millisecond), and at each L every batch
        size the budget allows until one holds all the rows that fit: the waiting rows no longer
        than L are taken oldest first up to B x L tokens and packed (`pack_rows`); rows the
        packing leaves out wait for the next cut."""
        need = len(oldest.ids)
        best: Cut | None = None
        best_s = float("inf")
        tried = 0
        for seq_len in self.buckets.seq_lens:
            if seq_len < need or seq_len < 2 * tried:
                continue
            tried = seq_len
            fits = [r for r in window if len(r.ids) <= seq_len]
            available = sum(len(r.ids) for r in fits)
            for size in self.buckets.allowed_sizes(seq_len, self.max_batch_tokens):
                if size * seq_len > self.max_batch_tokens:
                    break  # allowed_sizes keeps the smallest size even over the budget; packing never
                room = size * seq_len - need
                take = [oldest]
                for r in fits:
                    n = len(r.ids)
                    if r is not oldest and n <= room:
                        take.append(r)
                        room -= n
                if len(take) >= 2:
                    layout, left = pack_rows([len(r.ids) for r in take], size, seq_len, first=0)
                    if left:
                        keep = sorted(i for seq in layout for i in seq)
                        new_index = {old: new for new, old in enumerate(keep)}
                        take = [take[i] for i in keep]
                        layout = [[new_index[i] for i in seq] for seq in layout]
                    if len(take) >= 2:
                        cut = Cut(self.buckets.bucket_for(len(layout), seq_len), take, layout)
                        per_token = self._charged_s(cut, pad_s) / sum(len(r.ids) for r in take)
                        if per_token < best_s:
                            best, best_s = cut, per_token
                if size * seq_len >= available:
                    break  # a larger size holds no more rows
        return None if best is None else (best, best_s)

    def _learn(self, bucket: Bucket, elapsed: float) -> None:
        """A bucket without a cost gets its first timing; after that timings move only the scale
        of the whole table (a smoothed ratio to the table, each batch's ratio clipped to 1/4..4),
        which changes no choice between buckets, only absolute estimates (inline runs,
        Retry-After)."""
        if bucket not in self.costs_s:
            self.costs_s[bucket] = elapsed / self.cost_scale
            self._rebuild_envelope()
            return
        ratio = min(4.0, max(0.25, elapsed / self._envelope[bucket]))
        self.cost_scale = 0.9 * self.cost_scale + 0.1 * ratio

    def _execute(self, run: Callable, cut: Cut) -> tuple[float, float, np.ndarray | None, Exception | None]:
        """Run `cut` with `run` (`run_bucket` or `run_inline`): (started, finished, out, error)."""
        args = (cut.bucket, [r.ids for r in cut.rows]) + ((cut.layout,) if cut.layout is not None else ())
        started = time.perf_counter()
        try:
            out, error = run(*args), None
        except Exception as e:
            out, error = None, e
        return started, time.perf_counter(), out, error

    def _begin(self, cut: Cut) -> None:
        """`cut` takes a forward slot (under the lock)."""
        self.inflight_batches += 1
        self.inflight_rows += len(cut.rows)

    def _work(self, cut: Cut, loop: asyncio.AbstractEventLoop) -> None:
        """A forward thread: run `cut`, then cut and run the next batch right here while rows wait
        (without batch_wait_ms), handing each finished batch to the event loop to answer. The
        thread never waits for the loop, which may be busy parsing and answering requests: going
        back to it between batches left each forward thread idle ~6% of the time at c=32."""
        while cut is not None:
            outcome = self._execute(self.run_bucket, cut)
            with self._lock:
                self.inflight_batches -= 1
                done, cut = cut, None
                try:
                    if (self.batch_wait_s == 0 and self.inflight_batches < self.max_concurrent_batches
                            and self._oldest_group() is not None):
                        cut = self._cut()
                        self._begin(cut)
                except Exception:  # a bug: leave the rows to the event loop, answer this batch
                    log.exception("cutting the next batch on the forward thread failed")
                    cut = None
            try:
                loop.call_soon_threadsafe(self._complete, done, *outcome)
            except RuntimeError:  # the loop is closed: the replica is gone, nobody to answer
                return

    def _complete(self, cut: Cut, started: float, finished: float, out, error: BaseException | None,
                  inline: bool = False) -> None:
        """On the event loop: answer a finished batch's rows, record it, and wake the loop."""
        bucket, rows = cut.bucket, cut.rows
        try:
            if error is not None:
                log.error("batch %s of %d rows failed", bucket, len(rows), exc_info=error)
                for r in rows:
                    if not r.future.done():
                        r.future.set_exception(BackendFailure("inference failed on the backend; see the server log"))
                return
            for r, vec in zip(rows, out):
                r.started, r.finished = started, finished
                if not r.future.done():
                    r.future.set_result(vec)
            elapsed = finished - started
            real = sum(len(r.ids) for r in rows)
            with self._lock:
                if self.learn_costs and not (inline and self.run_inline is not self.run_bucket):
                    self._learn(bucket, elapsed)
            rate = real / max(elapsed, 1e-6)
            self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
            if self.on_batch is not None:
                try:
                    self.on_batch(BatchRecord(bucket, len(rows), real, bucket.padded_tokens, elapsed,
                                              [started - r.enqueued for r in rows], cut.layout is not None))
                except Exception:
                    log.exception("batch metrics hook failed")
        finally:
            with self._lock:
                self.inflight_rows -= len(rows)
            self._wake.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running (for graceful shutdown)."""
        deadline = time.perf_counter() + timeout_s
        while (self.queued_rows > 0 or self.inflight_rows > 0) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return self.queued_rows == 0 and self.inflight_rows == 0
