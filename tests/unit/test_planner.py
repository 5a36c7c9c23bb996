"""neuronserve.serve.planner: the planner the batcher and offline `infer` both use.

Optimality against brute force over every set partition, properties over random bucket sets,
timings, lengths and budgets, and the timing table."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.models.artifact import Bucket, parse_buckets
from neuronserve.serve.buckets import BucketSet
from neuronserve.serve.errors import InputTooLong
from neuronserve.serve.planner import (
    Batch,
    BatchRecord,
    TimingTable,
    charged_s,
    next_batch,
    pack,
    plan,
)

SMALL = BucketSet(parse_buckets(",".join(f"{b}x{s}" for b in (1, 2, 4) for s in (8, 16, 32, 64))))


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]


def brute_force_case(rng: random.Random, weight: float):
    timings = {b: rng.uniform(0.5, 1.5) * (0.004 + b.padded_tokens * rng.choice([1e-5, 1e-4])) for b in SMALL}
    table = TimingTable(SMALL, timings)
    token_s = min(table.device_s(k) / k.padded_tokens for k in SMALL)
    lengths = [rng.choice([3, 8, 12, 16, 20, 33, 60]) for _ in range(rng.randint(1, 7))]

    def time_of(rows):  # a batch of rows (indices) as one bucket: device time + padding charge
        bucket = SMALL.bucket_for(len(rows), max(SMALL.seq_len_for(lengths[r]) for r in rows))
        return table.device_s(bucket) + weight * token_s * (
            bucket.padded_tokens - sum(SMALL.seq_len_for(lengths[r]) for r in rows))

    best = min(sum(time_of(p) for p in parts) for parts in partitions(list(range(len(lengths))))
               if all(len(p) <= 4 for p in parts))
    return table, lengths, time_of, best


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_next_batch_serves_the_queue_in_the_least_time(weight):
    """With nothing new arriving, the batches `next_batch` takes one after another (as the batcher
    takes them) take exactly the optimum over every way of splitting the rows into batches (brute
    force over set partitions), and each holds the oldest row still waiting. The time counted is
    device time plus every padded token (beyond its row's own bucket, or in an empty row) at
    `weight` x the cheapest device time per padded token of the table."""
    rng = random.Random(7)
    for trial in range(60):
        table, lengths, time_of, best = brute_force_case(rng, weight)
        waiting = list(range(len(lengths)))  # oldest first
        spent = 0.0
        while waiting:
            batch = next_batch([lengths[r] for r in waiting], table, max_batch_tokens=4096, padding_weight=weight)
            rows = [waiting[i] for i in batch.rows]
            assert 0 in batch.rows  # the oldest waiting row
            assert batch.bucket == SMALL.bucket_for(len(rows), max(SMALL.seq_len_for(lengths[r]) for r in rows))
            spent += time_of(rows)
            waiting = [r for r in waiting if r not in rows]
        assert spent == pytest.approx(best), (trial, lengths)


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_plan_is_the_least_time_split(weight):
    """`plan` (offline `infer`) returns a split whose time is the brute-force optimum."""
    rng = random.Random(11)
    for trial in range(60):
        table, lengths, time_of, best = brute_force_case(rng, weight)
        batches = plan(lengths, table, max_batch_tokens=4096, padding_weight=weight)
        assert sorted(r for b in batches for r in b.rows) == list(range(len(lengths)))
        assert sum(time_of(list(b.rows)) for b in batches) == pytest.approx(best), (trial, lengths)
        pad_s = table.pad_s(weight)
        assert [charged_s(b, lengths, table, pad_s) for b in batches] == [
            pytest.approx(time_of(list(b.rows))) for b in batches]


# --- properties ------------------------------------------------------------------------------

bucket_sets = st.lists(
    st.builds(Bucket, st.integers(1, 40), st.sampled_from([1, 3, 8, 16, 32, 64, 100, 128, 512])),
    min_size=1,
    max_size=8,
).map(BucketSet)


@st.composite
def plan_inputs(draw):
    bs = draw(bucket_sets)
    # Some buckets measured (noisy: not monotone), the others at the table's nominal rate.
    overhead = draw(st.sampled_from([1e-4, 1e-3, 5e-3, 5e-2]))
    per_token = draw(st.sampled_from([1e-7, 1e-6, 1e-5, 1e-4]))
    noise = draw(st.lists(st.floats(0.5, 1.5) | st.none(), min_size=len(bs), max_size=len(bs)))
    timings = {b: (overhead + b.padded_tokens * per_token) * k for b, k in zip(bs.buckets, noise) if k is not None}
    table = TimingTable(bs, timings)
    table.scale = draw(st.sampled_from([1.0, 0.5, 2.0]))
    # compiled seq_lens themselves are drawn often, so groups get big enough to fill batches
    length = st.integers(1, bs.max_seq_len) | st.sampled_from(bs.seq_lens)
    lengths = draw(st.lists(length, max_size=150))
    # budgets near bucket sizes are where the split changes
    near_a_bucket = st.builds(lambda b, k: b.seq_len * b.batch_size + k, st.sampled_from(bs.buckets), st.integers(-1, 1))
    budget = draw(st.none() | st.integers(1, 20_000) | near_a_bucket.filter(lambda t: t >= 1))
    weight = draw(st.sampled_from([0.0, 1.5, 3.0]))
    return bs, table, lengths, budget, weight


def grouped_plan(bs: BucketSet, lengths, budget) -> list[list[int]]:
    """The plan without merging: rows grouped by their own seq_len (oldest first), cut into runs of
    the largest batch size the budget allows."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(bs.seq_len_for(n), []).append(i)
    runs = []
    for seq_len, rows in groups.items():
        top = bs.allowed_sizes(seq_len, budget)[-1]
        runs += [rows[k:k + top] for k in range(0, len(rows), top)]
    return runs


def check_batch(bs: BucketSet, lengths, budget, batch: Batch) -> None:
    b = batch.bucket
    assert b in bs and batch.rows
    need = max(bs.seq_len_for(lengths[r]) for r in batch.rows)
    if batch.layout is None:
        assert list(batch.rows) == sorted(batch.rows)  # oldest first
        assert len(batch.rows) <= b.batch_size
        # the batch is padded to its longest row's bucket, and to the smallest batch that holds it
        assert b == bs.bucket_for(len(batch.rows), need)
    else:
        assert len(batch.layout) <= b.batch_size and len(batch.rows) >= 2
        assert sorted(i for seq in batch.layout for i in seq) == list(range(len(batch.rows)))
        assert all(sum(lengths[batch.rows[i]] for i in seq) <= b.seq_len for seq in batch.layout)
        assert b == bs.bucket_for(len(batch.layout), b.seq_len)
    assert all(lengths[r] <= b.seq_len for r in batch.rows)
    # the budget holds whenever some bucket at that seq_len satisfies it
    if budget is not None:
        if bs.batch_sizes(b.seq_len)[0] * b.seq_len <= budget:
            assert b.padded_tokens <= budget
        else:
            assert batch.layout is None and b.batch_size == bs.batch_sizes(b.seq_len)[0]


@settings(max_examples=200, deadline=None)
@given(plan_inputs())
def test_plan_properties(case):
    bs, table, lengths, budget, weight = case
    batches = plan(lengths, table, max_batch_tokens=budget, padding_weight=weight)

    # every row is served exactly once, in batches that fit
    assert sorted(r for b in batches for r in b.rows) == list(range(len(lengths)))
    for batch in batches:
        check_batch(bs, lengths, budget, batch)
    # oldest work first; deterministic
    assert [b.rows[0] for b in batches] == sorted(b.rows[0] for b in batches)
    assert plan(list(lengths), table, max_batch_tokens=budget, padding_weight=weight) == batches

    # never more time than keeping every row in its own group (one of the splits the plan weighs)
    pad_s = table.pad_s(weight)
    total = sum(charged_s(b, lengths, table, pad_s) for b in batches)
    grouped = [Batch(bs.bucket_for(len(rows), bs.seq_len_for(lengths[rows[0]])), tuple(rows))
               for rows in grouped_plan(bs, lengths, budget)]
    assert total <= sum(charged_s(b, lengths, table, pad_s) for b in grouped) * (1 + 1e-9) + 1e-12

    # the batch to run now is the plan's batch holding the oldest row
    if lengths:
        now = next_batch(lengths, table, max_batch_tokens=budget, padding_weight=weight)
        assert 0 in now.rows and now in batches


@settings(max_examples=200, deadline=None)
@given(plan_inputs())
def test_pack_properties(case):
    bs, table, lengths, budget, weight = case
    if not lengths:
        return
    packed = pack(lengths, table, max_batch_tokens=budget, padding_weight=weight)
    chosen = next_batch(lengths, table, max_batch_tokens=budget, padding_weight=weight, packing=True)
    assert 0 in chosen.rows
    check_batch(bs, lengths, budget, chosen)
    if packed is None:
        assert chosen.layout is None
        return
    batch, per_token = packed
    check_batch(bs, lengths, budget, batch)
    assert batch.layout[0][0] == batch.rows.index(0)  # the oldest row is placed first
    assert per_token == pytest.approx(
        charged_s(batch, lengths, table, table.pad_s(weight)) / sum(lengths[r] for r in batch.rows))
    assert chosen in (batch, next_batch(lengths, table, max_batch_tokens=budget, padding_weight=weight))


def test_packing_puts_short_rows_of_different_lengths_in_one_sequence():
    bs = BucketSet(parse_buckets("1x16,2x16,1x64,2x64"))
    table = TimingTable(bs, {b: 0.001 + b.padded_tokens * 1e-4 for b in bs})
    assert next_batch([4, 4, 40, 40], table, max_batch_tokens=512) == Batch(Bucket(2, 16), (0, 1))
    chosen = next_batch([4, 4, 40, 40], table, max_batch_tokens=512, packing=True)
    assert chosen.bucket == Bucket(1, 64) and chosen.rows == (0, 1, 2) and chosen.packed
    assert pack([16], table, max_batch_tokens=512) is None  # a lone row never packs


def test_plan_rejects_what_no_bucket_holds():
    table = TimingTable(SMALL)
    with pytest.raises(InputTooLong, match="input has 65 tokens; the largest compiled bucket is 64 tokens") as e:
        plan([10, 65], table, max_batch_tokens=None)
    assert e.value.status == 400 and (e.value.tokens, e.value.limit) == (65, 64)
    with pytest.raises(ValueError, match="row 1 has 0 tokens"):
        plan([3, 0], table, max_batch_tokens=None)
    with pytest.raises(ValueError, match="max_batch_tokens is 0"):
        plan([3], table, max_batch_tokens=0)
    assert plan([], table, max_batch_tokens=None) == []


# --- the timing table ------------------------------------------------------------------------


def test_timing_table_is_monotone_and_prices_unmeasured_buckets_nominally():
    bs = BucketSet(parse_buckets("1x16,2x16,1x64,2x64"))
    table = TimingTable(bs, {Bucket(1, 16): 0.004, Bucket(2, 16): 0.003, Bucket(1, 64): 0.001})
    assert table.device_s(Bucket(2, 16)) == 0.004  # never below fewer rows
    assert table.device_s(Bucket(1, 64)) == 0.004  # never below shorter rows
    assert table.device_s(Bucket(2, 64)) == pytest.approx(128 / 5000 + 0.002)  # nominal
    assert table.pad_s(3.0) == pytest.approx(3 * min(table.device_s(b) / b.padded_tokens for b in bs))


def test_timing_table_learns_a_first_timing_then_only_its_scale():
    bs = BucketSet(parse_buckets("1x16,2x16"))
    table = TimingTable(bs, {Bucket(2, 16): 0.01})
    table.learn(Bucket(1, 16), 0.002)
    assert table.measured_s[Bucket(1, 16)] == 0.002 and table.scale == 1.0
    table.learn(Bucket(2, 16), 0.02)  # twice the table: the whole table moves a tenth of the way
    assert table.scale == pytest.approx(1.1)
    assert table.device_s(Bucket(1, 16)) == pytest.approx(0.0022)
    table.learn(Bucket(2, 16), 100.0)  # one batch's ratio is clipped to 4
    assert table.scale == pytest.approx(0.9 * 1.1 + 0.4)


def test_batch_record_padding_ratio():
    assert BatchRecord(Bucket(4, 16), 3, 15, 64, 0.01).padding_ratio == pytest.approx(64 / 15)
    assert BatchRecord(Bucket(1, 8), 0, 0, 8, 0.0).padding_ratio == float("inf")


def test_a_sampled_table_estimates_the_other_buckets_from_the_measured_ones():
    """The CPU warm-up of a large grid times a sample; the rest follow the fitted cost per padded
    token instead of a nominal rate, and a served batch still gives a bucket its own timing."""
    from neuronserve.compile.compiler import default_buckets
    from neuronserve.serve.backends.cpu import timing_sample

    grid = default_buckets("cpu", 256)
    cost = {b: 0.0015 + b.padded_tokens / 9000 for b in grid}  # what this host takes
    sample = timing_sample(grid)
    table = TimingTable(BucketSet(grid), {b: cost[b] for b in sample})
    for b in set(grid) - set(sample):
        assert abs(table.device_s(b) - cost[b]) <= 0.01 * cost[b], b
    nominal = TimingTable(BucketSet(grid), {sample[0]: cost[sample[0]]})  # one size measured: the nominal rate
    unmeasured = max(set(grid) - set(sample), key=lambda b: b.padded_tokens)
    assert nominal.device_s(unmeasured) == pytest.approx(unmeasured.padded_tokens / 5000 + 0.002)
    table.learn(unmeasured, 0.9)
    assert table.measured_s[unmeasured] == 0.9


def test_the_cpu_warm_up_of_the_default_grid_times_a_third_of_its_tokens():
    from neuronserve.compile.compiler import default_buckets
    from neuronserve.serve.backends.cpu import timing_sample

    grid = default_buckets("cpu", 256)
    sample = timing_sample(grid)
    assert set(sample) < set(grid) and len(grid) == 121
    share = sum(b.padded_tokens for b in sample) / sum(b.padded_tokens for b in grid)
    assert share < 0.4, share
    for size in {b.batch_size for b in grid}:  # the longest rows of every batch size are timed
        assert max((b for b in grid if b.batch_size == size), key=lambda b: b.seq_len) in sample
    assert timing_sample(grid[:20]) == sorted(grid[:20])  # a small grid is timed whole
