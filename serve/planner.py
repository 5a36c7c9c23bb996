"""Planning batches: which rows run together, in which compiled bucket, packed or not.

Pure: plain row lengths in, `Batch` descriptions out; no clock, no locks, no futures. The batcher
(serving) and `Engine.run_rows` (offline `infer`) both plan with these functions.

Device time comes from a `TimingTable`: the warm-up's seconds per compiled bucket, made monotone
(the envelope), times one scale that follows what served batches take. A plan splits rows,
sorted by their own sequence length, into consecutive batches each padded to its longest row's
bucket, so that the device time to run them all is least, every padded token (beyond a row's own
bucket, or an empty row) charged again at `padding_weight` times the cheapest device time per
token. `next_batch` runs only the planned batch holding the oldest row (row 0), or a packed batch
(`pack`) when that takes less time per real token.

>>> from neuronserve.models.artifact import parse_buckets
>>> buckets = BucketSet(parse_buckets("1x16,2x16,4x16,1x64,2x64,4x64"))
>>> table = TimingTable(buckets, {b: 0.001 + b.padded_tokens * 1e-4 for b in buckets})
>>> [(str(b.bucket), b.rows) for b in plan([4, 40, 4, 40], table, max_batch_tokens=512)]
[('2x16', (0, 2)), ('2x64', (1, 3))]
>>> next_batch([40, 4, 4], table, max_batch_tokens=512)
Batch(bucket=Bucket(batch_size=1, seq_len=64), rows=(0,), layout=None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from neuronserve.models.artifact import Bucket
from neuronserve.models.packing import pack_rows
from neuronserve.serve.buckets import BucketSet

__all__ = ["PADDING_WEIGHT", "Batch", "BatchRecord", "TimingTable", "charged_s", "next_batch", "pack", "plan"]

# A padded token's charge on top of its device time, in units of the cheapest device time per
# token (why 3: docs/decisions.md, "Padding weight").
PADDING_WEIGHT = 3.0


@dataclass(frozen=True)
class Batch:
    """A planned batch: `rows` (indices into the planned lengths) in `bucket`, one per sequence,
    or packed as `layout` says (per sequence, positions in `rows`)."""

    bucket: Bucket
    rows: tuple[int, ...]
    layout: tuple[tuple[int, ...], ...] | None = None

    @property
    def packed(self) -> bool:
        return self.layout is not None


@dataclass
class BatchRecord:
    """One executed batch, for metrics, response headers and offline statistics.

    >>> BatchRecord(Bucket(2, 8), rows=2, real_tokens=8, padded_tokens=16, inference_s=0.01).padding_ratio
    2.0
    """

    bucket: Bucket
    rows: int
    real_tokens: int
    padded_tokens: int
    inference_s: float
    queue_waits_s: list[float] = field(default_factory=list)
    packed: bool = False  # several rows per sequence

    @property
    def padding_ratio(self) -> float:
        """Padded over real tokens (1.0 means no padding at all)."""
        return self.padded_tokens / self.real_tokens if self.real_tokens else float("inf")


# Below this many padded tokens a batch's time is mostly fixed cost, so the per-token fit uses
# the larger measured buckets when there are at least two.
FIT_FROM_TOKENS = 256


def fitted_estimate(measured_s: dict[Bucket, float]):
    """Seconds for a bucket without a timing: a least-squares line, fixed cost plus a cost per padded
    token, through the measured buckets (those of FIT_FROM_TOKENS padded tokens or more when there
    are two such; device time grows with padded tokens whatever the shape), or a nominal 5,000
    tokens/s plus 2 ms with fewer than two sizes measured.

    >>> est = fitted_estimate({Bucket(1, 256): 0.03, Bucket(4, 256): 0.105, Bucket(1, 8): 0.0021})
    >>> round(est(Bucket(2, 256)), 4), round(est(Bucket(16, 256)), 4)
    (0.055, 0.405)
    >>> round(fitted_estimate({})(Bucket(1, 500)), 6)
    0.102
    """
    import numpy as np

    points = [(b.padded_tokens, t) for b, t in measured_s.items()]
    large = [p for p in points if p[0] >= FIT_FROM_TOKENS]
    if len({p[0] for p in large}) >= 2:
        points = large
    if len({p[0] for p in points}) >= 2:
        x = np.array([p[0] for p in points], dtype=float)
        y = np.array([p[1] for p in points], dtype=float)
        per_token, fixed = np.polyfit(x, y, 1)
        if per_token > 0:
            fixed = max(float(fixed), 0.0)
            return lambda b: fixed + float(per_token) * b.padded_tokens
    return lambda b: b.padded_tokens / 5000.0 + 0.002


class TimingTable:
    """Seconds of device time per compiled bucket, for planning.

    Starts from measured timings (the warm-up's, which on a large CPU grid time a sample); an
    unmeasured bucket is estimated from them (`fitted_estimate`) until `learn` gives it its first
    timing. Made monotone (see `_rebuild`), and
    scaled as a whole by what served batches take (see `learn`).

    >>> from neuronserve.models.artifact import parse_buckets
    >>> t = TimingTable(BucketSet(parse_buckets("1x16,1x64")), {Bucket(1, 16): 0.004, Bucket(1, 64): 0.001})
    >>> t.device_s(Bucket(1, 64))  # never less than a smaller bucket
    0.004
    """

    def __init__(self, buckets: BucketSet, timings_s: dict[Bucket, float] | None = None):
        self.buckets = buckets
        self.measured_s: dict[Bucket, float] = dict(timings_s or {})
        # Served timings scale the whole table, never one bucket (why: docs/decisions.md,
        # "Served timings scale the table").
        self.scale = 1.0
        self._envelope: dict[Bucket, float] = {}
        self._token_s = 0.0
        self._rebuild()

    def device_s(self, bucket: Bucket) -> float:
        """Expected device seconds of one batch in `bucket`."""
        return self._envelope[bucket] * self.scale

    def pad_s(self, padding_weight: float) -> float:
        """The planning charge of one padded token: `padding_weight` x the least device time per
        padded token of any bucket."""
        return padding_weight * self._token_s * self.scale

    def _rebuild(self) -> None:
        """Timings made monotone: a bucket never takes less time than a smaller one (fewer rows or
        shorter rows). Timings are noisy; without this a lucky 1x24 run would make the planner pad
        16-token rows to 24. Unmeasured buckets are estimated (`fitted_estimate`)."""
        estimate = fitted_estimate(self.measured_s)
        env: dict[Bucket, float] = {}
        sizes = sorted({b.batch_size for b in self.buckets.buckets})
        shorter = dict.fromkeys(sizes, 0.0)  # max time over shorter seq_lens with batch <= size
        for seq_len in self.buckets.seq_lens:  # ascending
            below = 0.0
            for size in self.buckets.batch_sizes(seq_len):  # ascending
                b = Bucket(size, seq_len)
                own = self.measured_s.get(b)
                t = own if own is not None else estimate(b)
                env[b] = below = max(t, below, shorter[size])
            # Times rise with the batch size within a sequence length, so the largest time at
            # batch <= size is that of the largest such bucket: a running value over `sizes`.
            running = 0.0
            for size in sizes:
                running = env.get(Bucket(size, seq_len), running)
                shorter[size] = max(shorter[size], running)
        self._envelope = env
        # The least device time per padded token of any bucket: the price of one padded token.
        self._token_s = min(t / b.padded_tokens for b, t in env.items())

    def learn(self, bucket: Bucket, elapsed: float) -> None:
        """A bucket without a timing gets its first one; after that timings move only the scale of
        the whole table (a smoothed ratio to the table, each batch's ratio clipped to 1/4..4),
        which changes no choice between buckets, only absolute estimates (inline runs,
        Retry-After)."""
        if bucket not in self.measured_s:
            self.measured_s[bucket] = elapsed / self.scale
            self._rebuild()
            return
        ratio = min(4.0, max(0.25, elapsed / self._envelope[bucket]))
        self.scale = 0.9 * self.scale + 0.1 * ratio


def _count_times(table: TimingTable, seq_len: int, most: int, pad_s: float, max_batch_tokens: int | None) -> list[float]:
    """[0, time of 1 row, ..., time of `most` rows] at `seq_len` (each count padded to the smallest
    compiled batch size holding it, its empty rows charged `pad_s` per token), up to the largest
    size the budget allows."""
    sizes = table.buckets.allowed_sizes(seq_len, max_batch_tokens)
    out = [0.0]
    i = 0
    for k in range(1, min(most, sizes[-1]) + 1):
        while sizes[i] < k:
            i += 1
        out.append(table.device_s(Bucket(sizes[i], seq_len)) + pad_s * (sizes[i] - k) * seq_len)
    return out


@dataclass
class _Split:
    """The least-time split of rows sorted by sequence length: its last batch is
    order[start[n]:n], the one before order[start[start[n]]:start[n]], and so on."""

    order: list[int]  # row indices, sorted by sequence length (stable: oldest first)
    seq_lens: list[int]  # per row index, its compiled sequence length
    start: list[int]  # start[j]: where the last batch of the best plan for order[:j] starts
    charged_s: float  # device time plus padding charge of the whole plan


def _split(lengths: Sequence[int], table: TimingTable, max_batch_tokens: int | None, pad_s: float) -> _Split:
    """Dynamic programming over the rows sorted by sequence length, with the timing table; the
    padding charge (`pad_s` per token padded beyond a row's own bucket) is counted as time."""
    seq_of = table.buckets.seq_len_for
    seq_lens = [seq_of(n) for n in lengths]
    order = sorted(range(len(lengths)), key=seq_lens.__getitem__)  # stable: oldest first within a length
    n = len(order)
    own = [0] * (n + 1)  # own[k]: the first k rows' own sequence lengths, summed
    for k, r in enumerate(order):
        own[k + 1] = own[k] + seq_lens[r]
    times: dict[int, list[float]] = {}
    best = [0.0] * (n + 1)  # best[j]: least charged time for order[:j]
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        s = seq_lens[order[j - 1]]
        row_times = times.get(s)
        if row_times is None:
            row_times = times[s] = _count_times(table, s, n, pad_s, max_batch_tokens)
        top = len(row_times) - 1
        bj, bi = float("inf"), j - 1
        # On ties the shortest last batch wins, so the older rows get the fuller batches.
        for i in range(j - 1, max(0, j - top) - 1, -1):
            # order[i:j] padded to s: (j - i) * s tokens where the rows' own buckets hold own[j] - own[i]
            c = best[i] + row_times[j - i] + pad_s * ((j - i) * s - (own[j] - own[i]))
            if c < bj:
                bj, bi = c, i
        best[j], start[j] = bj, bi
    return _Split(order, seq_lens, start, best[n])


def _batch(buckets: BucketSet, split: _Split, i: int, j: int) -> Batch:
    chosen = split.order[i:j]
    return Batch(buckets.bucket_for(j - i, split.seq_lens[chosen[-1]]), tuple(sorted(chosen)))


def plan(lengths: Sequence[int], table: TimingTable, *, max_batch_tokens: int | None,
         padding_weight: float = PADDING_WEIGHT) -> list[Batch]:
    """Every row in the least charged time: rows (token counts) split into batches, ordered by
    their oldest row (rows are given oldest first), each batch's rows oldest first.

    A batch of rows of different compiled lengths is padded to its longest row's bucket; its
    batch size is the smallest compiled one that holds it, within `max_batch_tokens` (or the
    smallest compiled size when none fits the budget). `InputTooLong` if a row fits no bucket.
    """
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens is {max_batch_tokens}; it must be >= 1 (or None for no budget)")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"row {i} has {n} tokens; every row needs at least 1 token")
    split = _split(lengths, table, max_batch_tokens, table.pad_s(padding_weight))
    batches = []
    j = len(lengths)
    while j:
        i = split.start[j]
        batches.append(_batch(table.buckets, split, i, j))
        j = i
    return sorted(batches, key=lambda b: b.rows[0])


def next_batch(lengths: Sequence[int], table: TimingTable, *, max_batch_tokens: int | None,
               padding_weight: float = PADDING_WEIGHT, packing: bool = False) -> Batch:
    """The batch to run now: of `plan`'s batches, the one holding the oldest row (row 0), so
    nothing starves; the rest is planned again next time, with what has arrived meanwhile.

    With `packing`, the packed batch of `pack` runs instead when its charged time per real token
    is below that of the whole plan.
    """
    pad_s = table.pad_s(padding_weight)
    split = _split(lengths, table, max_batch_tokens, pad_s)
    j = len(lengths)
    while True:  # walk the plan's batches back to the one holding the oldest row
        i = split.start[j]
        if 0 in split.order[i:j]:
            break
        j = i
    batch = _batch(table.buckets, split, i, j)
    if packing:
        packed = _pack(lengths, split.seq_lens, table, max_batch_tokens, pad_s)
        # Against the plan's charged time per real token.
        if packed is not None and packed[1] < split.charged_s / sum(lengths):
            batch = packed[0]
    return batch


def charged_s(batch: Batch, lengths: Sequence[int], table: TimingTable, pad_s: float) -> float:
    """A batch's time as the planner counts it: device time plus `pad_s` per padded token beyond
    its rows' own buckets (none for a packed batch that pads less than they would)."""
    seq_of = table.buckets.seq_len_for
    return _charged_s(table, batch.bucket, sum(seq_of(lengths[r]) for r in batch.rows), pad_s)


def _charged_s(table: TimingTable, bucket: Bucket, own_tokens: int, pad_s: float) -> float:
    return table.device_s(bucket) + pad_s * max(0, bucket.padded_tokens - own_tokens)


def pack(lengths: Sequence[int], table: TimingTable, *, max_batch_tokens: int | None,
         padding_weight: float = PADDING_WEIGHT) -> tuple[Batch, float] | None:
    """The packed batch holding the oldest row (row 0) that takes the least time per real token
    (device time plus the padding charge on tokens padded beyond the rows' own buckets), and that
    time per token; None when no packing holds more than that row.

    Several rows share a sequence of a compiled length L, each attending only to itself
    (`models.tasks.PackedEncoder`). A packed batch of shape (B, L) takes what the bucket BxL
    takes. Tried for the first compiled L that holds the oldest row, then each next L at least
    twice the last tried (a few L keep it well under a millisecond), and at each L every batch
    size the budget allows until one holds all the rows that fit: the rows no longer than L are
    taken oldest first up to B x L tokens and packed (`pack_rows`); rows the packing leaves out
    wait for the next batch.

    >>> from neuronserve.models.artifact import parse_buckets
    >>> buckets = BucketSet(parse_buckets("1x16,2x16,1x64,2x64"))
    >>> table = TimingTable(buckets, {b: 0.001 + b.padded_tokens * 1e-4 for b in buckets})
    >>> batch, per_token = pack([4, 4, 40, 40], table, max_batch_tokens=512)
    >>> batch
    Batch(bucket=Bucket(batch_size=1, seq_len=64), rows=(0, 1, 2), layout=((0, 2, 1),))
    """
    seq_of = table.buckets.seq_len_for
    return _pack(lengths, [seq_of(n) for n in lengths], table, max_batch_tokens, table.pad_s(padding_weight))


def _pack(lengths: Sequence[int], seq_lens: Sequence[int], table: TimingTable, max_batch_tokens: int | None,
          pad_s: float) -> tuple[Batch, float] | None:
    buckets = table.buckets
    need = lengths[0]
    best: Batch | None = None
    best_s = float("inf")
    tried = 0
    for seq_len in buckets.seq_lens:
        if seq_len < need or seq_len < 2 * tried:
            continue
        tried = seq_len
        fits = [r for r, n in enumerate(lengths) if n <= seq_len]
        available = sum(lengths[r] for r in fits)
        for size in buckets.allowed_sizes(seq_len, max_batch_tokens):
            if max_batch_tokens is not None and size * seq_len > max_batch_tokens:
                break  # allowed_sizes keeps the smallest size even over the budget; packing never
            room = size * seq_len - need
            take = [0]
            for r in fits:
                n = lengths[r]
                if r != 0 and n <= room:
                    take.append(r)
                    room -= n
            if len(take) >= 2:
                layout, left = pack_rows([lengths[r] for r in take], size, seq_len, first=0)
                if left:
                    keep = sorted(i for seq in layout for i in seq)
                    new_index = {old: new for new, old in enumerate(keep)}
                    take = [take[i] for i in keep]
                    layout = [[new_index[i] for i in seq] for seq in layout]
                if len(take) >= 2:
                    batch = Batch(buckets.bucket_for(len(layout), seq_len), tuple(take),
                                  tuple(tuple(seq) for seq in layout))
                    own = sum(seq_lens[r] for r in take)
                    per_token = _charged_s(table, batch.bucket, own, pad_s) / sum(lengths[r] for r in take)
                    if per_token < best_s:
                        best, best_s = batch, per_token
            if size * seq_len >= available:
                break  # a larger size holds no more rows
    return None if best is None else (best, best_s)
