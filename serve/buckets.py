"""Compiled buckets: which compiled shape holds which rows, and padding rows to that shape.

Every compiled graph has a fixed ``(batch_size, seq_len)`` (a `Bucket`). A row of token ids
belongs to the smallest compiled ``seq_len`` that holds it, and a batch of rows is padded to the
smallest compiled batch size that holds them. Which rows run together is `serve.planner`'s
choice. This module is pure (numpy only, no I/O) so it can be tested exhaustively.

>>> bs = BucketSet([Bucket(1, 32), Bucket(8, 32), Bucket(8, 128)])
>>> bs.seq_len_for(100), bs.bucket_for(3, 32)
(128, Bucket(batch_size=8, seq_len=32))
"""

from __future__ import annotations

import bisect
from typing import Iterable, Sequence

import numpy as np

from neuronserve.models.artifact import Bucket
from neuronserve.serve.errors import InputTooLong

__all__ = [
    "BucketSet",
    "Row",
    "pad_types",
    "truncated_count",
    "count_tokens",
    "pad_rows",
    "truncate",
    "unpad",
]


def _check_length(length: int, what: str = "input") -> int:
    n = int(length)
    if n < 1:
        raise ValueError(f"{what} has {n} tokens; every row needs at least 1 token")
    return n


class BucketSet:
    """The compiled buckets of one artifact, and how rows are assigned to them.

    The set need not be a full grid: each sequence length has its own batch sizes.

    >>> bs = BucketSet([Bucket(8, 128), Bucket(1, 32), Bucket(8, 32), Bucket(32, 32)])
    >>> bs.seq_lens, bs.max_seq_len, bs.batch_sizes(32)
    ((32, 128), 128, (1, 8, 32))
    >>> bs.seq_len_for(33), bs.bucket_for(3, 32), bs.bucket_for(50, 32)
    (128, Bucket(batch_size=8, seq_len=32), Bucket(batch_size=32, seq_len=32))
    """

    def __init__(self, buckets: Iterable[Bucket]) -> None:
        unique = set()
        for b in buckets:
            if not isinstance(b, Bucket):
                raise TypeError(f"expected Bucket, got {type(b).__name__} {b!r}")
            unique.add(b)
        if not unique:
            raise ValueError("no buckets: a BucketSet needs at least one compiled bucket, e.g. 1x32")
        self.buckets: tuple[Bucket, ...] = tuple(sorted(unique))
        by_seq: dict[int, list[int]] = {}
        for b in self.buckets:
            by_seq.setdefault(b.seq_len, []).append(b.batch_size)
        self._batch_sizes: dict[int, tuple[int, ...]] = {s: tuple(sorted(v)) for s, v in by_seq.items()}
        self.seq_lens: tuple[int, ...] = tuple(sorted(by_seq))
        self.max_seq_len: int = self.seq_lens[-1]

    def __repr__(self) -> str:
        return f"BucketSet({', '.join(map(str, self.buckets))})"

    def __iter__(self):
        return iter(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def __contains__(self, bucket: object) -> bool:
        return isinstance(bucket, Bucket) and bucket.batch_size in self._batch_sizes.get(bucket.seq_len, ())

    def batch_sizes(self, seq_len: int) -> tuple[int, ...]:
        """Compiled batch sizes at exactly `seq_len`, ascending; ValueError if none is compiled."""
        try:
            return self._batch_sizes[seq_len]
        except KeyError:
            raise ValueError(
                f"no bucket is compiled for seq_len {seq_len}; compiled seq_lens are "
                f"{', '.join(map(str, self.seq_lens))}"
            ) from None

    def max_batch_size(self, seq_len: int) -> int:
        return self.batch_sizes(seq_len)[-1]

    def seq_len_for(self, length: int) -> int:
        """The smallest compiled seq_len >= `length`; `InputTooLong` if there is none."""
        n = _check_length(length)
        i = bisect.bisect_left(self.seq_lens, n)
        if i == len(self.seq_lens):
            raise InputTooLong(n, self.max_seq_len)
        return self.seq_lens[i]

    def bucket_for(self, n_rows: int, seq_len: int) -> Bucket:
        """At exactly `seq_len`: the smallest batch size >= `n_rows`, else the largest.

        When even the largest is too small the caller must split the rows (`serve.planner` does).
        """
        if n_rows < 1:
            raise ValueError(f"n_rows is {n_rows}; a bucket holds at least 1 row")
        sizes = self.batch_sizes(seq_len)
        i = bisect.bisect_left(sizes, n_rows)
        return Bucket(sizes[min(i, len(sizes) - 1)], seq_len)

    def allowed_sizes(self, seq_len: int, max_batch_tokens: int | None) -> tuple[int, ...]:
        """Batch sizes at `seq_len` whose padded tokens fit the budget (always at least the smallest)."""
        sizes = self.batch_sizes(seq_len)
        if max_batch_tokens is None:
            return sizes
        k = bisect.bisect_right(sizes, max_batch_tokens // seq_len)
        return sizes[: max(k, 1)]


def _check_fits(lengths: Sequence[int], bucket: Bucket) -> None:
    if len(lengths) > bucket.batch_size:
        raise ValueError(
            f"{len(lengths)} rows do not fit bucket {bucket} (batch size {bucket.batch_size}); "
            f"split them into batches with serve.planner.plan"
        )
    for i, n in enumerate(lengths):
        _check_length(n, f"row {i}")
        if n > bucket.seq_len:
            raise ValueError(
                f"row {i} has {n} tokens; bucket {bucket} holds {bucket.seq_len} per row: "
                f"choose the bucket with BucketSet.seq_len_for or truncate the row"
            )


class Row(list):
    """One input's token ids, with what the tokenizer said of them beyond the ids: the token type
    ids of a text pair (None for a single text: all zero) and whether the input was cut to fit.
    Plain lists stand for single texts that were not cut (the common case costs nothing).

    >>> r = Row([101, 7, 102, 8, 102], type_ids=[0, 0, 0, 1, 1], truncated=True)
    >>> len(r), r.type_ids, r.truncated
    (5, [0, 0, 0, 1, 1], True)
    """

    __slots__ = ("type_ids", "truncated")

    def __init__(self, ids, type_ids: list[int] | None = None, truncated: bool = False):
        super().__init__(ids)
        self.type_ids = type_ids
        self.truncated = truncated


def truncated_count(rows: Sequence[Sequence[int]]) -> int:
    """How many of `rows` were cut to fit (`Row.truncated`).

    >>> truncated_count([[1, 2], Row([1, 2], truncated=True), Row([3])])
    1
    """
    return sum(1 for r in rows if isinstance(r, Row) and r.truncated)


def pad_types(rows: Sequence[Sequence[int]], bucket: Bucket) -> np.ndarray | None:
    """Token type ids padded to `bucket` (int64 ``[B, S]``, 0 on padding), or None when no row has
    any (single texts: the graph's token types are all zero).

    >>> pad_types([Row([101, 7, 102, 8, 102], type_ids=[0, 0, 0, 1, 1]), [101, 102]], Bucket(2, 6)).tolist()
    [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
    >>> pad_types([[101, 102]], Bucket(1, 4)) is None
    True
    """
    typed = [(i, r.type_ids) for i, r in enumerate(rows) if isinstance(r, Row) and r.type_ids is not None]
    if not typed:
        return None
    types = np.zeros((bucket.batch_size, bucket.seq_len), dtype=np.int64)
    for i, t in typed:
        types[i, : len(t)] = np.asarray(t, dtype=np.int64)
    return types


def pad_rows(rows: Sequence[Sequence[int]], bucket: Bucket, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad token-id rows to `bucket`: ``(input_ids, attention_mask)``, both int64 ``[B, S]``.

    Real rows are right-padded with `pad_id` (mask 1 on real tokens, 0 on padding). Rows added
    to fill the batch are all `pad_id` with a mask of 1 on the first token only: an all-zero mask
    would make mean pooling divide by zero (NaN/inf in the graph's output, which some runtimes
    trap on). Those rows are dropped by `unpad`, so their values never reach a caller.

    >>> ids, mask = pad_rows([[101, 7, 102], [101, 102]], Bucket(3, 4), pad_id=0)
    >>> ids.tolist()
    [[101, 7, 102, 0], [101, 102, 0, 0], [0, 0, 0, 0]]
    >>> mask.tolist()
    [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    """
    _check_fits([len(r) for r in rows], bucket)
    shape = (bucket.batch_size, bucket.seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = np.asarray(row, dtype=np.int64)
        attention_mask[i, :n] = 1
    attention_mask[len(rows) :, 0] = 1
    return input_ids, attention_mask


def unpad(outputs: np.ndarray, n_rows: int) -> np.ndarray:
    """Drop the batch-padding rows: the first `n_rows` rows of `outputs`.

    >>> unpad(np.arange(8).reshape(4, 2), 3).tolist()
    [[0, 1], [2, 3], [4, 5]]
    """
    if not 0 <= n_rows <= len(outputs):
        raise ValueError(f"n_rows is {n_rows}; outputs have {len(outputs)} rows")
    return outputs[:n_rows]


def count_tokens(lengths: Sequence[int], bucket: Bucket) -> tuple[int, int]:
    """``(real, padded)`` tokens when rows of `lengths` run in `bucket`.

    >>> count_tokens([3, 2], Bucket(4, 8))
    (5, 32)
    """
    _check_fits(lengths, bucket)
    return sum(int(n) for n in lengths), bucket.padded_tokens


def truncate(ids: list[int], max_len: int, keep_last: int | None = None) -> list[int]:
    """Cut `ids` to at most `max_len` tokens, keeping the last `keep_last` tokens.

    `keep_last` is a count: the special tokens a tokenizer appends (1 for BERT's ``[SEP]`` or
    RoBERTa's ``</s>``). Like Hugging Face tokenizers with special tokens, the content is cut
    and the trailing specials survive; the leading ones (``[CLS]``) survive because the cut is
    from the right.

    >>> truncate([101, 7, 8, 9, 102], 4, keep_last=1)
    [101, 7, 8, 102]
    >>> truncate([101, 7, 8, 9, 102], 4)
    [101, 7, 8, 9]
    >>> truncate([101, 7, 102], 4, keep_last=1)
    [101, 7, 102]
    """
    if max_len < 1:
        raise ValueError(f"max_len is {max_len}; it must be >= 1")
    keep = keep_last or 0
    if not 0 <= keep <= max_len:
        raise ValueError(f"keep_last is {keep_last}; it must be between 0 and max_len ({max_len})")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    if keep == 0:
        return ids[:max_len]
    return ids[: max_len - keep] + ids[-keep:]
