"""Packing several rows per sequence: the packer, the packed inputs and per-row pooling."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.models.artifact import Bucket
from neuronserve.models.tasks import pool, pool_packed
from neuronserve.models.packing import pack_rows, pad_packed


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), bins=st.integers(1, 8),
       capacity=st.integers(1, 64), data=st.data())
def test_pack_rows_places_each_row_once_within_capacity(lengths, bins, capacity, data):
    first = data.draw(st.sampled_from([None] + [i for i, n in enumerate(lengths) if n <= capacity]))
    layout, left = pack_rows(lengths, bins, capacity, first=first)
    placed = [i for seq in layout for i in seq]
    assert sorted(placed + left) == list(range(len(lengths)))  # every row exactly once
    assert len(layout) <= bins and all(seq for seq in layout)
    assert all(sum(lengths[i] for i in seq) <= capacity for seq in layout)
    if first is not None:
        assert layout[0][0] == first
    # A row is left out only when no sequence has room for it and none can be opened.
    for i in left:
        assert lengths[i] > capacity or (len(layout) == bins and all(
            sum(lengths[j] for j in seq) + lengths[i] > capacity for seq in layout))


def test_pack_rows_fills_sequences_best_fit():
    # 6 and 4 share a sequence; 5, 3 and 2 share the other: two sequences of 10, none wasted.
    layout, left = pack_rows([6, 5, 4, 3, 2], bins=2, capacity=10)
    assert left == [] and sorted(sorted(seq) for seq in layout) == [[0, 2], [1, 3, 4]]


def test_pack_rows_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="cannot pack"):
        pack_rows([3], bins=0, capacity=8)


def test_pad_packed_restarts_positions_at_the_offset_and_rejects_overflow():
    ids, pos, seg = pad_packed([[5, 6], [7, 8, 9]], [[0, 1]], Bucket(2, 6), pad_id=1, position_offset=2)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 1], [1] * 6]
    assert pos.tolist() == [[2, 3, 2, 3, 4, 0], [0] * 6]
    assert seg.tolist() == [[1, 1, 2, 2, 2, 0], [0] * 6]
    with pytest.raises(ValueError, match="holds more than 4 tokens"):
        pad_packed([[5, 6], [7, 8, 9]], [[0, 1]], Bucket(1, 4), pad_id=0)
    with pytest.raises(ValueError, match="do not fit bucket"):
        pad_packed([[5], [7]], [[0], [1]], Bucket(1, 4), pad_id=0)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len", "lasttoken"])
def test_pool_packed_pools_each_row_as_pool_does_alone(mode):
    rng = np.random.default_rng(0)
    lengths = [3, 1, 5, 2, 4]
    layout = [[2, 1], [4, 0], [3]]  # rows out of index order; the fourth sequence stays empty
    hidden = torch.from_numpy(rng.normal(size=(4, 8, 6)).astype(np.float32))
    seg = torch.zeros((4, 8), dtype=torch.long)
    want = []
    spans = {}
    for b, members in enumerate(layout):
        at = 0
        for i in members:
            seg[b, at:at + lengths[i]] = i + 1
            spans[i] = (b, at, at + lengths[i])
            at += lengths[i]
    for i in range(len(lengths)):
        b, lo, hi = spans[i]
        alone = hidden[b:b + 1, lo:hi]
        want.append(pool(alone, torch.ones((1, hi - lo), dtype=torch.long), mode)[0])
    got = pool_packed(hidden, seg, len(lengths), mode)
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
