"""neuronserve.serve.buckets: choosing buckets, planning runs, padding and unpadding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.models.artifact import Bucket
from neuronserve.serve.buckets import (
    BucketSet,
    Run,
    TooLongError,
    count_tokens,
    pad_rows,
    split_rows,
    truncate,
    unpad,
)

GRID = BucketSet([Bucket(b, s) for b in (1, 8, 32) for s in (32, 128, 512)])


# --- BucketSet -------------------------------------------------------------------------------


def test_bucket_set_sorts_and_deduplicates():
    bs = BucketSet([Bucket(8, 128), Bucket(1, 32), Bucket(8, 32), Bucket(1, 32)])
    assert bs.buckets == (Bucket(1, 32), Bucket(8, 32), Bucket(8, 128))
    assert bs.seq_lens == (32, 128)
    assert bs.max_seq_len == 128
    assert bs.batch_sizes(32) == (1, 8)
    assert bs.batch_sizes(128) == (8,)
    assert bs.max_batch_size(32) == 8
    assert len(bs) == 3 and list(bs) == list(bs.buckets)
    assert Bucket(8, 32) in bs and Bucket(1, 128) not in bs


def test_bucket_set_accepts_a_generator():
    bs = BucketSet(Bucket(b, 16) for b in (4, 2))
    assert bs.batch_sizes(16) == (2, 4)


def test_empty_bucket_set_is_rejected():
    with pytest.raises(ValueError, match="at least one compiled bucket"):
        BucketSet([])


def test_non_bucket_items_are_rejected():
    with pytest.raises(TypeError, match="8x32"):
        BucketSet(["8x32"])


def test_batch_sizes_of_an_uncompiled_seq_len_names_the_compiled_ones():
    with pytest.raises(ValueError, match=r"seq_len 64; compiled seq_lens are 32, 128, 512"):
        GRID.batch_sizes(64)


@pytest.mark.parametrize(
    "length, seq_len",
    [(1, 32), (31, 32), (32, 32), (33, 128), (128, 128), (129, 512), (512, 512)],
)
def test_seq_len_for_picks_the_smallest_that_holds(length, seq_len):
    assert GRID.seq_len_for(length) == seq_len


def test_too_long_error_carries_length_limit_and_message():
    with pytest.raises(TooLongError) as info:
        GRID.seq_len_for(700)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.length, err.limit) == (700, 512)
    assert str(err) == "input has 700 tokens; largest compiled bucket is 512 tokens"
    again = pickle.loads(pickle.dumps(err))
    assert (again.length, again.limit, str(again)) == (700, 512, str(err))


@pytest.mark.parametrize("length", [0, -3])
def test_seq_len_for_rejects_empty_rows(length):
    with pytest.raises(ValueError, match=f"has {length} tokens"):
        GRID.seq_len_for(length)


@pytest.mark.parametrize("n_rows, batch", [(1, 1), (2, 8), (8, 8), (9, 32), (32, 32), (33, 32), (500, 32)])
def test_bucket_for_picks_the_smallest_batch_or_the_largest(n_rows, batch):
    assert GRID.bucket_for(n_rows, 128) == Bucket(batch, 128)


def test_bucket_for_needs_a_compiled_seq_len_and_a_row():
    with pytest.raises(ValueError, match="seq_len 100"):
        GRID.bucket_for(1, 100)
    with pytest.raises(ValueError, match="n_rows is 0"):
        GRID.bucket_for(0, 32)


# --- plan: examples --------------------------------------------------------------------------


def test_plan_of_nothing_is_empty():
    assert GRID.plan([]) == []


def test_plan_prefers_eight_plus_one_over_thirty_two():
    runs = GRID.plan([20] * 9)
    assert [(r.bucket, r.rows) for r in runs] == [
        (Bucket(8, 32), tuple(range(8))),
        (Bucket(1, 32), (8,)),
    ]
    assert sum(r.padded_tokens for r in runs) == 9 * 32


def test_plan_groups_by_seq_len_and_keeps_arrival_order():
    lengths = [10, 100, 20, 300, 30, 120]
    runs = GRID.plan(lengths)
    groups = {}
    for r in runs:
        groups.setdefault(r.bucket.seq_len, []).extend(r.rows)
    assert groups == {32: [0, 2, 4], 128: [1, 5], 512: [3]}
    assert [r.rows[0] for r in runs] == sorted(r.rows[0] for r in runs)


def test_plan_fills_full_runs_then_the_remainder():
    runs = GRID.plan([5] * 70)
    assert [len(r.rows) for r in runs] == [32, 32, 1, 1, 1, 1, 1, 1]
    assert runs[0].rows == tuple(range(32))
    assert all(r.padded_tokens == r.bucket.padded_tokens for r in runs)


def test_plan_counts_tokens():
    (run,) = BucketSet([Bucket(4, 16)]).plan([3, 5, 7])
    assert run == Run(Bucket(4, 16), (0, 1, 2), real_tokens=15, padded_tokens=64)
    assert run.padding_ratio == pytest.approx(64 / 15)


def test_plan_respects_the_token_budget():
    runs = GRID.plan([100] * 40, max_batch_tokens=8 * 128)
    assert all(r.padded_tokens <= 8 * 128 for r in runs)
    assert [len(r.rows) for r in runs] == [8] * 5


def test_plan_with_a_budget_below_every_bucket_still_serves_each_row():
    bs = BucketSet([Bucket(4, 128), Bucket(16, 128)])
    runs = bs.plan([100] * 6, max_batch_tokens=50)
    assert [r.bucket for r in runs] == [Bucket(4, 128)] * 2
    assert [r.rows for r in runs] == [(0, 1, 2, 3), (4, 5)]


def test_plan_rejects_a_row_that_is_too_long_before_planning():
    with pytest.raises(TooLongError, match="input has 513 tokens; largest compiled bucket is 512 tokens"):
        GRID.plan([10, 513])


def test_plan_rejects_empty_rows_and_bad_budgets():
    with pytest.raises(ValueError, match="row 1 has 0 tokens"):
        GRID.plan([3, 0])
    with pytest.raises(ValueError, match="max_batch_tokens is 0"):
        GRID.plan([3], max_batch_tokens=0)


def test_padding_ratio_of_a_run_without_tokens_is_infinite():
    assert Run(Bucket(1, 8), (), 0, 8).padding_ratio == float("inf")


# --- plan: properties ------------------------------------------------------------------------

bucket_sets = st.lists(
    st.builds(Bucket, st.integers(1, 40), st.sampled_from([1, 3, 8, 16, 32, 64, 100, 128, 512])),
    min_size=1,
    max_size=8,
).map(BucketSet)


@st.composite
def plan_inputs(draw):
    bs = draw(bucket_sets)
    # compiled seq_lens themselves are drawn often, so groups get big enough to fill batches
    length = st.integers(1, bs.max_seq_len) | st.sampled_from(bs.seq_lens)
    lengths = draw(st.lists(length, max_size=150))
    # budgets near bucket sizes are where the cut changes
    near_a_bucket = st.builds(lambda b, k: b.seq_len * b.batch_size + k, st.sampled_from(bs.buckets), st.integers(-1, 1))
    budget = draw(st.none() | st.integers(1, 20_000) | near_a_bucket.filter(lambda t: t >= 1))
    return bs, lengths, budget


def naive_padded_tokens(bs: BucketSet, lengths, budget) -> int:
    """Group by seq_len, cut runs of the largest allowed batch, pad each to the smallest fitting one."""
    groups = {}
    for n in lengths:
        seq_len = min(s for s in bs.seq_lens if s >= n)
        groups[seq_len] = groups.get(seq_len, 0) + 1
    total = 0
    for seq_len, n in groups.items():
        sizes = bs.batch_sizes(seq_len)
        allowed = [b for b in sizes if budget is None or b * seq_len <= budget] or [sizes[0]]
        cap = max(allowed)
        while n:
            take = min(n, cap)
            total += min(b for b in sizes if b >= take) * seq_len
            n -= take
    return total


@settings(max_examples=200, deadline=None)
@given(plan_inputs())
def test_plan_properties(case):
    bs, lengths, budget = case
    runs = bs.plan(lengths, max_batch_tokens=budget)

    # every row is served exactly once
    served = sorted(i for r in runs for i in r.rows)
    assert served == list(range(len(lengths)))

    for run in runs:
        b = run.bucket
        assert b in bs
        assert run.rows and list(run.rows) == sorted(run.rows)
        # the run fits its bucket
        assert len(run.rows) <= b.batch_size
        assert all(lengths[i] <= b.seq_len for i in run.rows)
        # no larger bucket than needed: every row needs this seq_len, no smaller batch holds the run
        assert all(bs.seq_len_for(lengths[i]) == b.seq_len for i in run.rows)
        assert not [s for s in bs.batch_sizes(b.seq_len) if len(run.rows) <= s < b.batch_size]
        # token accounting
        assert run.real_tokens == sum(lengths[i] for i in run.rows)
        assert run.padded_tokens == b.padded_tokens
        assert run.padding_ratio >= 1.0
        # the budget holds whenever some bucket at that seq_len satisfies it
        if budget is not None:
            if bs.batch_sizes(b.seq_len)[0] * b.seq_len <= budget:
                assert run.padded_tokens <= budget
            else:
                assert b.batch_size == bs.batch_sizes(b.seq_len)[0]

    # arrival order within a group, oldest work first overall
    by_seq = {}
    for run in runs:
        by_seq.setdefault(run.bucket.seq_len, []).extend(run.rows)
    for rows in by_seq.values():
        assert rows == sorted(rows)
    assert [r.rows[0] for r in runs] == sorted(r.rows[0] for r in runs)

    # padding never exceeds the naive plan; the plan is deterministic
    assert sum(r.padded_tokens for r in runs) <= naive_padded_tokens(bs, lengths, budget)
    assert bs.plan(list(lengths), max_batch_tokens=budget) == runs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=6), st.integers(0, 400))
def test_split_rows_covers_the_rows_and_never_pads_more_than_naive(sizes, n):
    counts = split_rows(n, sizes)
    top = max(sizes)
    assert sum(counts) == n
    assert all(1 <= c <= top for c in counts)

    def slots(c):
        return min(s for s in sizes if s >= c)

    naive = (n // top) * top + (slots(n % top) if n % top else 0)
    assert sum(slots(c) for c in counts) <= naive


def test_split_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="-1 rows"):
        split_rows(-1, [1])
    with pytest.raises(ValueError, match="batch sizes"):
        split_rows(3, [])


# --- padding ---------------------------------------------------------------------------------


def test_pad_rows_pads_tokens_and_batch():
    ids, mask = pad_rows([[101, 5, 102], [101, 102]], Bucket(4, 5), pad_id=1)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (4, 5)
    assert ids.tolist() == [
        [101, 5, 102, 1, 1],
        [101, 102, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ]
    assert mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0],
    ]


def test_padding_rows_keep_mean_pooling_finite():
    ids, mask = pad_rows([[7, 8]], Bucket(3, 4), pad_id=0)
    hidden = np.ones((3, 4, 2), dtype=np.float32)
    pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    assert np.isfinite(pooled).all()
    assert unpad(pooled, 1).shape == (1, 2)


def test_pad_rows_accepts_numpy_rows():
    ids, mask = pad_rows([np.array([3, 4], dtype=np.int32)], Bucket(1, 3), pad_id=0)
    assert ids.tolist() == [[3, 4, 0]] and mask.tolist() == [[1, 1, 0]]


def test_pad_rows_rejects_a_row_longer_than_the_bucket():
    with pytest.raises(ValueError, match=r"row 1 has 6 tokens; bucket 2x5 holds 5 per row"):
        pad_rows([[1], [1] * 6], Bucket(2, 5), pad_id=0)


def test_pad_rows_rejects_more_rows_than_the_batch():
    with pytest.raises(ValueError, match=r"3 rows do not fit bucket 2x5 \(batch size 2\)"):
        pad_rows([[1]] * 3, Bucket(2, 5), pad_id=0)


def test_pad_rows_rejects_an_empty_row():
    with pytest.raises(ValueError, match="row 0 has 0 tokens"):
        pad_rows([[]], Bucket(2, 5), pad_id=0)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_pad_rows_and_unpad_round_trip(data):
    bucket = data.draw(st.builds(Bucket, st.integers(1, 12), st.integers(1, 40)))
    rows = data.draw(
        st.lists(
            st.lists(st.integers(2, 30_000), min_size=1, max_size=bucket.seq_len),
            max_size=bucket.batch_size,
        )
    )
    ids, mask = pad_rows(rows, bucket, pad_id=0)
    assert ids.shape == mask.shape == (bucket.batch_size, bucket.seq_len)
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row
        assert not ids[i, len(row) :].any()
        assert mask[i].tolist() == [1] * len(row) + [0] * (bucket.seq_len - len(row))
    assert (mask[len(rows) :].sum(axis=1) == 1).all() and (mask[len(rows) :, 0] == 1).all()
    assert not ids[len(rows) :].any()

    kept = unpad(ids, len(rows))
    assert [r[m.astype(bool)].tolist() for r, m in zip(kept, unpad(mask, len(rows)))] == rows
    real, padded = count_tokens([len(r) for r in rows], bucket)
    assert (real, padded) == (int(unpad(mask, len(rows)).sum()), ids.size)


def test_unpad_drops_batch_padding_and_checks_the_count():
    out = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert unpad(out, 2).tolist() == out[:2].tolist()
    assert unpad(out, 0).shape == (0, 3)
    with pytest.raises(ValueError, match="n_rows is 5; outputs have 4 rows"):
        unpad(out, 5)
    with pytest.raises(ValueError, match="n_rows is -1"):
        unpad(out, -1)


def test_count_tokens_and_its_errors():
    assert count_tokens([3, 5], Bucket(4, 8)) == (8, 32)
    assert count_tokens([], Bucket(4, 8)) == (0, 32)
    with pytest.raises(ValueError, match="row 0 has 9 tokens; bucket 4x8 holds 8"):
        count_tokens([9], Bucket(4, 8))
    with pytest.raises(ValueError, match="5 rows do not fit bucket 4x8"):
        count_tokens([1] * 5, Bucket(4, 8))


# --- truncate --------------------------------------------------------------------------------

CLS, SEP = 101, 102


def test_truncate_keeps_the_trailing_special_token():
    ids = [CLS, 1, 2, 3, 4, 5, SEP]
    assert truncate(ids, 5, keep_last=1) == [CLS, 1, 2, 3, SEP]
    assert truncate(ids, 5) == [CLS, 1, 2, 3, 4]
    assert truncate(ids, 7, keep_last=1) == ids
    assert truncate(ids, 1, keep_last=1) == [SEP]
    assert truncate([CLS, 1, 2, 3, SEP, SEP], 4, keep_last=2) == [CLS, 1, SEP, SEP]


def test_truncate_does_not_modify_its_input():
    ids = [CLS, 1, 2, SEP]
    out = truncate(ids, 3, keep_last=1)
    assert ids == [CLS, 1, 2, SEP] and out == [CLS, 1, SEP]
    assert truncate(ids, 10) is not ids


def test_truncate_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_len is 0"):
        truncate([1, 2], 0)
    with pytest.raises(ValueError, match=r"keep_last is 3; it must be between 0 and max_len \(2\)"):
        truncate([1, 2, 3], 2, keep_last=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), max_size=60), st.integers(1, 40), st.integers(0, 3))
def test_truncate_properties(ids, max_len, keep):
    keep = min(keep, max_len)
    out = truncate(ids, max_len, keep_last=keep or None)
    assert len(out) == min(len(ids), max_len)
    if len(ids) <= max_len:
        assert out == ids
    else:
        assert out[: max_len - keep] == ids[: max_len - keep]
        assert out[max_len - keep :] == ids[len(ids) - keep :]


def test_truncated_rows_fit_the_largest_bucket():
    ids = [CLS] + list(range(1000)) + [SEP]
    out = truncate(ids, GRID.max_seq_len, keep_last=1)
    assert GRID.seq_len_for(len(out)) == 512 and out[0] == CLS and out[-1] == SEP
