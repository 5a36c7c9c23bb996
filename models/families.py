"""The model families neuronserve compiles, and how their inputs differ.

BERT-like models take `token_type_ids`; RoBERTa and XLM-R derive position ids from the padding
token (so right-padding with the model's own pad id is required) and reserve two positions;
DistilBERT takes neither token types nor position offsets.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    model_type: str
    inputs: tuple[str, ...]
    position_offset: int  # positions the model reserves (RoBERTa: padding_idx + 1 = 2)


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", ("input_ids", "attention_mask", "token_type_ids"), 0),
    "roberta": Family("roberta", ("input_ids", "attention_mask"), 2),
    "xlm-roberta": Family("xlm-roberta", ("input_ids", "attention_mask"), 2),
    "distilbert": Family("distilbert", ("input_ids", "attention_mask"), 0),
}


def get_family(model_type: str) -> Family:
    """The family for a config's `model_type`.

    >>> get_family("bert").inputs
    ('input_ids', 'attention_mask', 'token_type_ids')
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))} "
            "(MiniLM and other BERT-architecture models count as bert)"
        ) from None


def max_positions(family: Family, max_position_embeddings: int) -> int:
    """Longest input the model's position table allows.

    >>> max_positions(FAMILIES["roberta"], 514)
    512
    """
    return max_position_embeddings - family.position_offset


def graph_inputs(names, input_ids, attention_mask, token_type_ids=None):
    """The graph's positional inputs, in manifest order, from ids and mask tensors. Token types are
    all zero unless given (text pairs: 1 on the second text's tokens).

    >>> import torch
    >>> [t.tolist() for t in graph_inputs(("input_ids", "attention_mask", "token_type_ids"),
    ...                                    torch.tensor([[5, 6]]), torch.tensor([[1, 1]]))]
    [[[5, 6]], [[1, 1]], [[0, 0]]]
    """
    import torch

    types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": types}
    return tuple(tensors[name] for name in names)
