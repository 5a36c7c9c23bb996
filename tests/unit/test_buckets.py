"""neuronserve.serve.buckets: choosing buckets, padding and unpadding (planning: test_planner.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.models.artifact import Bucket
from neuronserve.serve.buckets import (
    BucketSet,
    count_tokens,
    pad_rows,
    truncate,
    unpad,
)
from neuronserve.serve.errors import InputError, InputTooLong

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
    with pytest.raises(InputTooLong) as info:
        GRID.seq_len_for(700)
    err = info.value
    assert isinstance(err, InputError) and isinstance(err, ValueError) and err.status == 400
    assert (err.tokens, err.limit, err.index) == (700, 512, None)
    assert str(err) == ("input has 700 tokens; the largest compiled bucket is 512 tokens; "
                        "send shorter text or set truncate=true")
    again = pickle.loads(pickle.dumps(err))
    assert (again.tokens, again.limit, str(again)) == (700, 512, str(err))
    indexed = pickle.loads(pickle.dumps(InputTooLong(700, 512, index=2)))
    assert indexed.index == 2 and str(indexed).startswith("input 2 has 700 tokens")


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
