"""Task heads: what a traced graph returns for `embed`, `classify`, `rerank` and `sparse`, and the
post-processing.

A task's shape (head, pairs, scores) is data (`neuronserve.models.artifact.TASKS`); `rerank` and
`classify` share the sequence-classification head (`ClassifyHead`, raw logits) and differ only in
post-processing: `activate` for rerank scores, `softmax` for labels.

The pooling runs inside the compiled graph (a (batch, hidden) result moves off the device instead of
(batch, seq, hidden)); normalisation runs after, so `dimensions` can truncate first.
"""

from __future__ import annotations

import numpy as np
import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool (batch, seq, hidden) to (batch, hidden) over the real tokens of right-padded rows."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0]), last]
    summed = (hidden * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    return summed / count


class EmbedHead(torch.nn.Module):
    """Encoder + pooling, taking positional tensors so it traces to a fixed signature."""

    def __init__(self, encoder: torch.nn.Module, input_names: tuple[str, ...], mode: str):
        super().__init__()
        self.encoder = encoder
        self.input_names = input_names
        self.mode = mode

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        hidden = self.encoder(**kwargs)[0]
        return pool(hidden, kwargs["attention_mask"], self.mode).float()


class PackedEncoder(torch.nn.Module):
    """The encoder run on packed sequences: several rows one after another in each sequence.

    Inputs ``(input_ids, position_ids, segment_ids)``, int64 ``[B, S]`` (`neuronserve.serve.buckets.pad_packed`):
    a token attends only to tokens of its own segment (its row), and positions restart for each
    row, so every row's token states are those it would get alone. Returns the token states
    ``[B, S, hidden]``; `pool_packed` pools them per row. Padding (segment 0) attends to nothing
    real and is never pooled.
    """

    def __init__(self, encoder: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.encoder = encoder
        self.token_types = "token_type_ids" in input_names

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
        # An additive 4D mask: transformers uses a 4D mask as given. Padding rows mask every
        # key, which leaves them finite (a uniform softmax), never NaN.
        blocked = torch.zeros(same.shape, dtype=torch.float32).masked_fill(~same, torch.finfo(torch.float32).min)
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": blocked[:, None]}
        if self.token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        return self.encoder(**kwargs)[0].float()


def pool_packed(hidden: torch.Tensor, segment_ids: torch.Tensor, n_rows: int, mode: str) -> torch.Tensor:
    """Pool packed token states ``[B, S, H]`` to ``[n_rows, H]``: row ``i`` is segment ``i + 1``,
    pooled as `pool` pools a row alone."""
    h = hidden.reshape(-1, hidden.shape[-1])
    seg = segment_ids.reshape(-1)
    real = torch.nonzero(seg > 0).squeeze(1)
    row = seg[real] - 1  # token -> its row, over the real tokens (in order within each row)
    h = h[real]
    counts = torch.bincount(row, minlength=n_rows)
    if mode in ("cls", "lasttoken"):
        # A row's tokens are contiguous in the flattened order: its first one is the least index.
        first = torch.zeros(n_rows, dtype=torch.long).scatter_reduce(
            0, row, torch.arange(len(row)), reduce="amin", include_self=False)
        return h[first if mode == "cls" else first + counts - 1]
    if mode == "max":
        out = torch.full((n_rows, h.shape[1]), torch.finfo(h.dtype).min, dtype=h.dtype)
        return out.scatter_reduce(0, row[:, None].expand_as(h), h, reduce="amax", include_self=True)
    summed = torch.zeros((n_rows, h.shape[1]), dtype=h.dtype).index_add_(0, row, h)
    count = counts.to(h.dtype).clamp(min=1e-9)[:, None]
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    return summed / count


class SpladeHead(torch.nn.Module):
    """Masked-LM logits pooled as sentence-transformers' `SpladePooling` pools them: masked, then
    log(1 + relu(x)) (log1p once more for log1p_relu), then max or sum over the tokens; one weight
    per vocabulary token, mostly zero."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], strategy: str, activation: str):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.strategy = strategy
        self.twice = activation == "log1p_relu"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        logits = self.model(**kwargs)[0].float()
        x = torch.log1p(torch.relu(logits * kwargs["attention_mask"].unsqueeze(-1).to(logits.dtype)))
        if self.twice:
            x = torch.log1p(x)
        return x.max(dim=1).values if self.strategy == "max" else x.sum(dim=1)


class ClassifyHead(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs)))[0].float()


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero).

    >>> normalize_rows(np.array([[3.0, 4.0]])).tolist()
    [[0.6, 0.8]]
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# sentence-transformers stores a CrossEncoder's activation as a dotted path (config.json's
# `sentence_transformers.activation_fn`, or the older `sbert_ce_default_activation_function`).
# Only torch's own functions are loaded without trust_remote_code: those are the ones served.
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
}


def activate(raw: np.ndarray, activation: str | None) -> np.ndarray:
    """A score per row from single-logit rows ``(n, 1)``, through the model's activation.

    >>> activate(np.array([[0.0], [2.0]]), "sigmoid").round(4).tolist()
    [0.5, 0.8808]
    >>> activate(np.array([[-1.5]]), "identity").tolist()
    [-1.5]
    """
    x = raw[:, 0].astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if activation == "tanh":
        return np.tanh(x)
    if activation in (None, "identity"):
        return x
    raise ValueError(f"unknown activation {activation!r}: expected one of sigmoid, identity, tanh")


def sparse_rows(raw: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's non-zero (token index, weight) pairs, by index.

    >>> [(i.tolist(), v.tolist()) for i, v in sparse_rows(np.array([[0.0, 1.5, 0.0, 0.25]]))]
    [([1, 3], [1.5, 0.25])]
    """
    out = []
    for row in raw:
        idx = np.flatnonzero(row)
        out.append((idx, row[idx]))
    return out
