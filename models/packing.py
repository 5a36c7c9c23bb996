"""Packing: several rows one after another in each sequence of a bucket, each attending only to
itself (`models.tasks.PackedEncoder`). Pure (numpy only); compile/ uses it to check the packed graph
and serve/ to fill batches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from neuronserve.models.artifact import Bucket

__all__ = ["pack_rows", "pad_packed"]


def pack_rows(lengths: Sequence[int], bins: int, capacity: int, first: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Pack rows (by token count) into at most `bins` sequences of `capacity` tokens each.

    Best fit, longest rows first: each row goes to the fullest sequence it still fits in, or
    opens a new one while fewer than `bins` are open. Row `first`, if given, is placed before all
    others, so it is never the one left out. Returns ``(layout, left_out)``: per sequence the
    indices of its rows in placing order, and the indices that did not fit. Deterministic.

    >>> pack_rows([5, 3, 8, 2], bins=2, capacity=10)
    ([[2, 3], [0, 1]], [])
    >>> pack_rows([9, 9, 4], bins=2, capacity=10, first=2)
    ([[2], [0]], [1])
    """
    if bins < 1 or capacity < 1:
        raise ValueError(f"cannot pack into {bins} sequences of {capacity} tokens")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if first is not None:
        order.remove(first)
        order.insert(0, first)
    layout: list[list[int]] = []
    room: list[int] = []
    left: list[int] = []
    for i in order:
        n = int(lengths[i])
        best = -1
        for b, r in enumerate(room):
            if n <= r and (best < 0 or r < room[best]):
                best = b
        if best < 0 and len(layout) < bins and n <= capacity:
            layout.append([])
            room.append(capacity)
            best = len(layout) - 1
        if best < 0:
            left.append(i)
            continue
        layout[best].append(i)
        room[best] -= n
    return layout, left


def pad_packed(rows: Sequence[Sequence[int]], layout: Sequence[Sequence[int]], bucket: Bucket, pad_id: int,
               position_offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several rows per sequence: ``(input_ids, position_ids, segment_ids)``, int64 ``[B, S]``.

    Sequence ``b`` holds the rows ``layout[b]`` one after another. Positions restart at
    `position_offset` for every row (each row is embedded as if alone); segment ids are the row's
    index + 1, 0 on padding, and tell the graph which tokens may attend to which.

    >>> ids, pos, seg = pad_packed([[7, 8], [9], [5, 6, 4]], [[2, 1], [0]], Bucket(2, 4), pad_id=0)
    >>> ids.tolist(), pos.tolist(), seg.tolist()
    ([[5, 6, 4, 9], [7, 8, 0, 0]], [[0, 1, 2, 0], [0, 1, 0, 0]], [[3, 3, 3, 2], [1, 1, 0, 0]])
    """
    if len(layout) > bucket.batch_size:
        raise ValueError(f"{len(layout)} packed sequences do not fit bucket {bucket}")
    shape = (bucket.batch_size, bucket.seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.zeros(shape, dtype=np.int64)
    for b, members in enumerate(layout):
        at = 0
        for i in members:
            n = len(rows[i])
            if at + n > bucket.seq_len:
                raise ValueError(f"packed sequence {b} holds more than {bucket.seq_len} tokens")
            input_ids[b, at : at + n] = np.asarray(rows[i], dtype=np.int64)
            position_ids[b, at : at + n] = np.arange(position_offset, position_offset + n)
            segment_ids[b, at : at + n] = i + 1
            at += n
    return input_ids, position_ids, segment_ids
