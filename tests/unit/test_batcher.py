"""The batcher with a fake device: coalescing, grouping by bucket, budget, cancellation, overload."""

import asyncio
import threading

import numpy as np
import pytest

from neuronserve.models.artifact import Bucket, parse_buckets
from neuronserve.serve.batcher import Batcher
from neuronserve.serve.buckets import BucketSet
from neuronserve.serve.errors import BackendFailure, Overloaded

BUCKETS = BucketSet(parse_buckets("1x16,2x16,4x16,8x16,1x64,2x64,4x64,8x64"))


class FakeDevice:
    """Records each batch; blocks each forward until released, so tests control timing."""

    def __init__(self, gated: bool = False, fail: bool = False, clock: "FakeClock | None" = None,
                 forward_s: float = 0.0):
        self.clock, self.forward_s = clock, forward_s  # each forward moves `clock` on by `forward_s`
        self.calls: list[tuple[Bucket, list[list[int]]]] = []
        self.layouts: list[list[list[int]] | None] = []
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not gated:
            self.gate.set()
        self.fail = fail

    def __call__(self, bucket: Bucket, rows: list[list[int]], layout: list[list[int]] | None = None) -> np.ndarray:
        if layout is None:
            assert len(rows) <= bucket.batch_size and all(len(r) <= bucket.seq_len for r in rows)
        else:  # packed: every row in exactly one sequence, no sequence over the bucket's length
            assert len(layout) <= bucket.batch_size
            assert sorted(i for seq in layout for i in seq) == list(range(len(rows)))
            assert all(sum(len(rows[i]) for i in seq) <= bucket.seq_len for seq in layout)
        self.calls.append((bucket, [list(r) for r in rows]))
        self.layouts.append(layout)
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(10)
        if self.clock is not None:
            self.clock.advance(self.forward_s)
        if self.fail:
            raise RuntimeError("device exploded")
        # Output row = (first token id, length) so each caller can check it got its own row back.
        return np.array([[r[0], len(r)] for r in rows], dtype=np.float32)


class FakeClock:
    """The batcher's clock in tests: time moves only when a test (or a FakeDevice) moves it."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def row(tag: int, length: int) -> list[int]:
    return [tag] + [7] * (length - 1)


def linear_timings(overhead_s: float, per_token_s: float) -> dict[Bucket, float]:
    return {b: overhead_s + b.padded_tokens * per_token_s for b in BUCKETS}


# A device where padding is expensive next to the per-batch overhead: rows stay in their groups.
PADDING_BOUND = linear_timings(0.001, 1e-4)


def make(device, **kw) -> Batcher:
    kw.setdefault("max_batch_tokens", 512)
    kw.setdefault("timings_s", PADDING_BOUND)
    kw.setdefault("learn_timings", False)
    kw.setdefault("inline_max_ms", 0)  # gated devices must not block the event loop
    records = []
    b = Batcher(BUCKETS, device, on_batch=records.append, **kw)
    b.records = records
    return b


async def wait_until(pred, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def occupy(b: Batcher, dev: FakeDevice) -> asyncio.Task:
    """Submit one row and wait until the (gated) device is busy with it; returns its task."""
    task = asyncio.create_task(b.submit([row(0, 3)]))
    await wait_until(dev.started.is_set)
    return task


def test_idle_device_dispatches_a_lone_row_at_once():
    async def main():
        dev = FakeDevice()
        b = make(dev, batch_wait_ms=0)
        out = await asyncio.wait_for(b.submit([row(5, 3)]), 2)
        assert out[0].tolist() == [5, 3]
        assert [c[0] for c in dev.calls] == [Bucket(1, 16)]

    asyncio.run(main())


def test_rows_from_concurrent_requests_coalesce_by_bucket_while_busy():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev)
        first = asyncio.create_task(b.submit([row(1, 5)]))
        await wait_until(dev.started.is_set)  # device now busy with the first row
        shorts = [asyncio.create_task(b.submit([row(10 + i, 4)])) for i in range(5)]
        longs = [asyncio.create_task(b.submit([row(20 + i, 40)])) for i in range(3)]
        await wait_until(lambda: b.queued_rows == 8)
        dev.gate.set()
        results = await asyncio.gather(first, *shorts, *longs)
        # every caller gets its own row back
        assert [r[0].tolist() for r in results] == [[1, 5]] + [[10 + i, 4] for i in range(5)] + [[20 + i, 40] for i in range(3)]
        buckets = [c[0] for c in dev.calls]
        assert buckets[0] == Bucket(1, 16)
        # The least device time for the 8 queued rows (PADDING_BOUND timings, in ms): 4x16 + 1x16 for
        # the short rows (7.4 + 2.6; 8x16 would take 13.8), 2x64 + 1x64 for the long ones (13.8 +
        # 7.4; 4x64 would take 26.6), 31.2 in all. Riding the fifth short row in the free slot of
        # a 4x64 would look cheap for that row but take 34.0 in all. Oldest rows go first.
        assert [str(bk) for bk in buckets[1:]] == ["4x16", "1x16", "2x64", "1x64"]
        assert sum(PADDING_BOUND[bk] for bk in buckets[1:]) == pytest.approx(0.0312)
        assert [r[0] for r in dev.calls[1][1]] == [10, 11, 12, 13]
        assert [r[0] for r in dev.calls[3][1]] == [20, 21]
        assert sum(len(rows) for _, rows in dev.calls) == 9

    asyncio.run(main())


def test_batch_never_exceeds_token_budget_and_pads_batch_dimension_minimally():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, max_batch_tokens=128)  # at seq 64 at most 2 rows; at seq 16 at most 8
        blocker = await occupy(b, dev)
        tasks = [asyncio.create_task(b.submit([row(i, 50)])) for i in range(5)]
        tasks += [asyncio.create_task(b.submit([row(i, 10)])) for i in range(9)]
        await wait_until(lambda: b.queued_rows == 14)
        dev.gate.set()
        await asyncio.gather(blocker, *tasks)
        for bucket, rows in dev.calls:
            assert bucket.padded_tokens <= 128
        long_batches = [len(rows) for bucket, rows in dev.calls if bucket.seq_len == 64]
        assert long_batches == [2, 2, 1]
        short_batches = [(str(bk), len(rows)) for bk, rows in dev.calls[1:] if bk.seq_len == 16]
        assert short_batches == [("8x16", 8), ("1x16", 1)]  # 9 rows: 8 + 1, not padded to 16
        rec = b.records
        assert sum(r.rows for r in rec) == 15
        assert sum(r.real_tokens for r in rec) == 3 + 5 * 50 + 9 * 10

    asyncio.run(main())


def test_cancelled_rows_are_dropped_before_execution():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev)
        blocker = await occupy(b, dev)
        gone = asyncio.create_task(b.submit([row(99, 5), row(98, 5)]))
        kept = asyncio.create_task(b.submit([row(1, 5)]))
        await wait_until(lambda: b.queued_rows == 3)
        gone.cancel()
        # Free the device only once the cancellation has reached the batcher: a forward thread
        # cuts its next batch as soon as the device is free, and rows still live then may run.
        await asyncio.wait([gone])
        dev.gate.set()
        assert (await kept)[0].tolist() == [1, 5]
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await gone
        executed = [r[0] for _, rows in dev.calls for r in rows]
        assert 99 not in executed and 98 not in executed
        assert b.queued_rows == 0

    asyncio.run(main())


def test_overload_refuses_whole_requests_and_loses_no_accepted_row():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, max_queued_rows=4)
        blocker = await occupy(b, dev)
        accepted = [asyncio.create_task(b.submit([row(i, 5), row(i, 5)])) for i in (1, 2)]
        await wait_until(lambda: b.queued_rows == 4)
        with pytest.raises(Overloaded) as e:
            await b.submit([row(3, 5)])
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
        assert "4 rows queued" in e.value.message
        assert b.queued_rows == 4  # the refused request left nothing behind
        dev.gate.set()
        results = await asyncio.gather(blocker, *accepted)
        assert [len(r) for r in results] == [1, 2, 2]

    asyncio.run(main())


def test_backend_failure_reaches_every_caller_without_internals():
    async def main():
        b = make(FakeDevice(fail=True))
        with pytest.raises(BackendFailure) as e:
            await b.submit([row(1, 4), row(2, 4)])
        assert "exploded" not in e.value.message
        assert b.inflight_batches == 0 and b.queued_rows == 0
        # the batcher keeps serving after a failure
        b.run_bucket = FakeDevice()
        assert (await b.submit([row(3, 4)]))[0].tolist() == [3, 4]

    asyncio.run(main())


def test_batch_wait_holds_a_partial_batch_until_the_wait_expires_or_it_fills():
    async def main():
        dev = FakeDevice()
        b = make(dev, batch_wait_ms=150, max_batch_tokens=64)  # full batch at seq 16: 4 rows
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = [asyncio.create_task(b.submit([row(i, 5)])) for i in range(2)]
        await asyncio.gather(*tasks)
        assert loop.time() - t0 >= 0.14  # waited for more rows
        assert [(str(bk), len(r)) for bk, r in dev.calls] == [("2x16", 2)]
        dev.calls.clear()
        t0 = loop.time()
        await asyncio.gather(*(b.submit([row(i, 5)]) for i in range(4)))
        assert loop.time() - t0 < 0.14  # a full batch goes at once
        assert [(str(bk), len(r)) for bk, r in dev.calls] == [("4x16", 4)]

    asyncio.run(main())


def test_reconfigure_changes_budget_live():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, max_batch_tokens=512)
        blocker = await occupy(b, dev)
        b.configure(max_batch_tokens=32, batch_wait_ms=0, max_concurrent_batches=1, max_queued_rows=100)
        tasks = [asyncio.create_task(b.submit([row(i, 5)])) for i in range(4)]
        await wait_until(lambda: b.queued_rows == 4)
        dev.gate.set()
        await asyncio.gather(blocker, *tasks)
        assert all(bk.padded_tokens <= 32 for bk, _ in dev.calls[1:])
        assert [len(r) for _, r in dev.calls[1:]] == [2, 2]

    asyncio.run(main())


def run_two_short_two_long(timings_s: dict, **kw) -> list[str]:
    """The buckets run for two 4-token and two 40-token rows queued behind a busy device."""

    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, timings_s=timings_s, **kw)
        blocker = await occupy(b, dev)
        tasks = [asyncio.create_task(b.submit([row(i, 4)])) for i in range(2)]
        tasks += [asyncio.create_task(b.submit([row(10 + i, 40)])) for i in range(2)]
        await wait_until(lambda: b.queued_rows == 4)
        dev.gate.set()
        out = await asyncio.gather(blocker, *tasks)
        assert [o[0].tolist() for o in out[1:]] == [[i, 4] for i in range(2)] + [[10 + i, 40] for i in range(2)]
        return [str(bk) for bk, _ in dev.calls[1:]]

    return asyncio.run(main())


def test_overhead_bound_device_merges_groups_into_one_fuller_batch():
    """Per-batch overhead dominates (small batches on CPU): one padded batch beats two small ones,
    even with the padded tokens charged again."""
    assert run_two_short_two_long(linear_timings(0.050, 1e-5)) == ["4x64"]


@pytest.mark.parametrize("weight, expected", [(0.0, ["4x64"]), (3.0, ["2x16", "2x64"])])
def test_padding_weight_keeps_rows_apart_when_a_merge_saves_little(weight, expected):
    """Merging saves 2 ms of device time here for 96 padded tokens: done when only device time
    counts, not when each padded token is charged again at 3x the cheapest time per token."""
    assert run_two_short_two_long(linear_timings(0.003, 1e-5), padding_weight=weight) == expected


def test_packing_puts_short_rows_of_different_lengths_in_one_sequence():
    """Two 4-token rows and a 40-token row share one 64-token sequence (1x64: 7.4 ms for 48 real
    tokens), the other 40-token row runs next (1x64): 14.8 ms, where the best plan without
    packing takes 18.0 (2x16 + 2x64), and 2x64 packed with all four takes more per real token."""
    runs = run_two_short_two_long(PADDING_BOUND, pack=True)
    assert runs == ["1x64", "1x64"]
    assert run_two_short_two_long(PADDING_BOUND) == ["2x16", "2x64"]


def test_packing_turns_off_and_on_live():
    """`configure(pack=...)` (Serve's user_config `packing`) changes the next cuts; None keeps it."""

    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, pack=True)
        runs = []
        for pack in (False, None, True):
            dev.gate.clear()
            dev.started.clear()
            n = len(dev.calls)
            blocker = await occupy(b, dev)
            b.configure(512, 0, 1, 2048, pack=pack)
            tasks = [asyncio.create_task(b.submit([row(i, 4)])) for i in range(2)]
            tasks += [asyncio.create_task(b.submit([row(10 + i, 40)])) for i in range(2)]
            await wait_until(lambda: b.queued_rows == 4)
            dev.gate.set()
            await asyncio.gather(blocker, *tasks)
            runs.append([str(bk) for bk, _ in dev.calls[n + 1:]])
        assert runs == [["2x16", "2x64"], ["2x16", "2x64"], ["1x64", "1x64"]]

    asyncio.run(main())


def test_packed_batches_keep_to_the_budget_and_answer_every_caller():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, pack=True, max_batch_tokens=32)  # at most 2x16 or, packed, 32 tokens
        blocker = await occupy(b, dev)
        lengths = [3, 9, 5, 12, 2, 7, 4, 6, 11]
        tasks = [asyncio.create_task(b.submit([row(10 + i, n)])) for i, n in enumerate(lengths)]
        await wait_until(lambda: b.queued_rows == len(lengths))
        dev.gate.set()
        out = await asyncio.gather(blocker, *tasks)
        assert [o[0].tolist() for o in out[1:]] == [[10 + i, n] for i, n in enumerate(lengths)]
        assert all(bk.padded_tokens <= 32 for bk, _ in dev.calls)
        packed = [len(rows) for (bk, rows), lay in zip(dev.calls, dev.layouts) if lay is not None]
        assert packed and max(packed) >= 3
        assert sum(r.packed for r in b.records) == len(packed)
        assert sum(r.real_tokens for r in b.records) == 3 + sum(lengths)

    asyncio.run(main())


@pytest.mark.parametrize("weight, expected", [(0.0, ("1x64", True)), (3.0, ("2x16", False))])
def test_packing_pays_the_padding_charge_like_any_merge(weight, expected):
    """Two 12-token rows: packed into one 64-token sequence they pad 32 tokens beyond their own
    buckets. A lucky timing makes 1x64 look 5% cheaper than 2x16; only device time would pack
    them, the padding charge keeps them in their own bucket."""

    async def main():
        dev = FakeDevice(gated=True)
        timings = dict(PADDING_BOUND)
        timings[Bucket(1, 64)] = 0.0040  # 2x16 takes 0.0042
        b = make(dev, pack=True, timings_s=timings, padding_weight=weight)
        blocker = await occupy(b, dev)
        tasks = [asyncio.create_task(b.submit([row(10 + i, 12)])) for i in range(2)]
        await wait_until(lambda: b.queued_rows == 2)
        dev.gate.set()
        await asyncio.gather(blocker, *tasks)
        (bucket, rows), layout = dev.calls[1], dev.layouts[1]
        return str(bucket), layout is not None

    assert asyncio.run(main()) == expected


def test_a_lone_row_and_rows_that_fill_their_sequences_never_pack():
    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev, pack=True)
        blocker = await occupy(b, dev)
        tasks = [asyncio.create_task(b.submit([row(10 + i, 16)])) for i in range(2)]
        await wait_until(lambda: b.queued_rows == 2)
        dev.gate.set()
        await asyncio.gather(blocker, *tasks)
        assert [str(bk) for bk, _ in dev.calls] == ["1x16", "2x16"] and dev.layouts == [None, None]

    asyncio.run(main())


def test_timings_are_learned_from_the_batches_that_run():
    """A bucket without a timing takes its first one; later timings scale the whole table, so
    absolute estimates follow the served speed while no choice between buckets changes."""

    async def main():
        clock = FakeClock()
        dev = FakeDevice(clock=clock, forward_s=0.002)
        timings = {b: t for b, t in PADDING_BOUND.items() if b != Bucket(1, 16)}
        b = make(dev, learn_timings=True, timings_s=timings, clock=clock)
        await b.submit([row(1, 5)])
        assert b.timings.measured_s[Bucket(1, 16)] == pytest.approx(0.002) and b.timings.scale == 1.0
        before = {bk: b.timings.device_s(bk) for bk in BUCKETS}
        dev.forward_s = 0.05  # this batch is slow: every estimate must rise, by one factor
        await b.submit([row(2, 5)])
        assert b.timings.measured_s[Bucket(1, 16)] == pytest.approx(0.002)  # the table itself is kept
        assert b.timings.scale == pytest.approx(0.9 + 0.1 * 4)  # the ratio 25 clipped to 4
        for bk in BUCKETS:
            assert b.timings.device_s(bk) == pytest.approx(before[bk] * b.timings.scale)

    asyncio.run(main())


def test_a_lucky_timing_never_pads_rows_to_a_longer_bucket():
    async def main():
        dev = FakeDevice()
        timings = dict(PADDING_BOUND)
        timings[Bucket(1, 64)] = 1e-6  # noise: a 1x64 run that looked faster than 1x16
        b = make(dev, timings_s=timings)
        assert b.timings.device_s(Bucket(1, 64)) >= b.timings.device_s(Bucket(1, 16))  # made monotone
        await b.submit([row(1, 5)])
        assert [str(bk) for bk, _ in dev.calls] == ["1x16"]

    asyncio.run(main())


def test_timing_splits_queue_wait_from_device_time():
    async def main():
        clock = FakeClock()
        dev = FakeDevice(gated=True, clock=clock, forward_s=0.001)
        b = make(dev, clock=clock)
        blocker = await occupy(b, dev)
        timing: dict = {}
        waiting = asyncio.create_task(b.submit([row(1, 5), row(2, 40)], timing))
        await wait_until(lambda: b.queued_rows == 2)
        clock.advance(0.05)  # the queued rows wait behind the blocked batch
        dev.gate.set()
        await asyncio.gather(blocker, waiting)
        # Two rows in two sequence-length groups: the window spans both batches.
        assert len(dev.calls) == 3
        assert timing["queue_s"] == pytest.approx(0.051)  # the wait, then the blocker's forward
        assert timing["inference_s"] == pytest.approx(0.002)  # the two batches, one after the other
        assert [r.inference_s for r in b.records[1:]] == [pytest.approx(0.001)] * 2
        assert b.records[1].queue_waits_s == [pytest.approx(0.051)]

    asyncio.run(main())


def test_cheap_batch_on_idle_device_runs_on_the_event_loop_and_slow_one_on_the_forward_thread():
    async def main():
        dev = FakeDevice()
        b = make(dev, inline_max_ms=5)  # 1x16 takes 2.6 ms, 1x64 7.4 ms in PADDING_BOUND
        loop_thread = threading.current_thread().name
        assert (await b.submit([row(1, 10)]))[0].tolist() == [1, 10]
        assert (await b.submit([row(2, 50)]))[0].tolist() == [2, 50]
        assert dev.threads[0] == loop_thread
        assert dev.threads[1] != loop_thread and dev.threads[1].startswith("forward")
        assert [r.rows for r in b.records] == [1, 1]

    asyncio.run(main())


def test_batches_on_the_event_loop_run_wide_and_their_timings_leave_the_timing_table_alone():
    """A cheap batch on an idle device runs on the event loop (nothing else can run meanwhile), so
    it goes to `run_inline` (on CPU, all of the replica's cores); batches on the forward threads
    run narrow, and only their timings scale the timing table."""

    async def main():
        wide, narrow = FakeDevice(), FakeDevice()
        b = make(narrow, max_concurrent_batches=2, run_inline=wide, learn_timings=True, inline_max_ms=5)
        loop_thread = threading.current_thread().name
        assert (await b.submit([row(1, 10)]))[0].tolist() == [1, 10]  # 1x16: 2.6 ms, cheap
        assert [c[0] for c in wide.calls] == [Bucket(1, 16)] and wide.threads == [loop_thread]
        assert narrow.calls == [] and b.timings.scale == 1.0
        assert (await b.submit([row(2, 50)]))[0].tolist() == [2, 50]  # 1x64: 7.4 ms, not cheap
        assert [c[0] for c in narrow.calls] == [Bucket(1, 64)] and narrow.threads[0].startswith("forward")
        assert b.timings.scale != 1.0  # a fake device: far quicker than the table
        scale = b.timings.scale
        assert (await b.submit([row(3, 12)]))[0].tolist() == [3, 12]
        assert len(wide.calls) == 2 and b.timings.scale == scale

    asyncio.run(main())


def test_a_forward_thread_takes_the_next_batch_without_waiting_for_the_event_loop():
    """When a batch ends while rows wait, its forward thread cuts and starts the next batch
    itself: here the event loop is blocked (as by a burst of requests to parse and answer) from
    before the first batch ends until after the second has started."""

    async def main():
        dev = FakeDevice(gated=True)
        b = make(dev)
        first = asyncio.create_task(b.submit([row(1, 5)]))
        await wait_until(dev.started.is_set)
        second = asyncio.create_task(b.submit([row(2, 40)]))
        await wait_until(lambda: b.queued_rows == 1)
        dev.started.clear()
        dev.gate.set()  # the first batch ends, the second can run, while the loop is blocked:
        started_while_blocked = dev.started.wait(5)
        assert started_while_blocked
        assert [str(c[0]) for c in dev.calls] == ["1x16", "1x64"]
        assert not first.done()  # answering is the event loop's job, once it is free again
        results = await asyncio.gather(first, second)
        assert [r[0].tolist() for r in results] == [[1, 5], [2, 40]]
        assert b.inflight_rows == 0 and b.inflight_batches == 0 and b.queued_rows == 0

    asyncio.run(main())
