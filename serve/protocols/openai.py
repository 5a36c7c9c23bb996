"""OpenAI embeddings: POST /v1/embeddings and GET /v1/models.

The types below declare the protocol (and `/openapi.json`); `parse` checks a decoded body by hand
in the same order, with the same messages, and is tested to accept exactly what they accept.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from neuronserve.serve.errors import BadRequest, ServeError
from neuronserve.serve.protocols.common import Limits, check_count, check_model, check_task, is_int, server_default

_NonEmpty = Field(min_length=1)


class EmbeddingsRequest(BaseModel):
    """POST /v1/embeddings. Unknown fields (e.g. `user`) are ignored."""

    model_config = ConfigDict(strict=True)

    input: (str | Annotated[list[str], _NonEmpty] | Annotated[list[int], _NonEmpty]
            | Annotated[list[Annotated[list[int], _NonEmpty]], _NonEmpty]) = Field(
        description="a text, a list of texts, a list of token ids, or a list of token id lists (no special tokens)")
    model: str | None = Field(None, description="must name the served model when given")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="keep the first N dimensions, then renormalise")
    truncate: bool = Field(None, description="cut inputs longer than the model takes (default: the server's "
                                             "`truncate` setting); false answers 400 instead", json_schema_extra=server_default)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


@dataclass(slots=True)
class Embeddings:
    """A parsed embeddings request: `texts` or `token_ids` (one of them), and the options."""

    texts: list[str] | None
    token_ids: list[list[int]] | None
    encoding_format: str
    dimensions: int | None
    truncate: bool


def parse(body: Any, limits: Limits) -> Embeddings:
    """Check a decoded /v1/embeddings body; raises the protocol's 400 / 404.

    >>> limits = Limits("minilm", "embed")
    >>> parse({"input": "hi", "model": "minilm"}, limits)
    Embeddings(texts=['hi'], token_ids=None, encoding_format='float', dimensions=None, truncate=True)
    >>> parse({"input": [101, 102], "dimensions": 64, "truncate": False}, limits).token_ids
    [[101, 102]]
    """
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with an `input` field")
    check_model(body.get("model"), limits)
    check_task("embed", limits)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and not is_int(dims):
        raise BadRequest("dimensions must be an integer", param="dimensions")
    truncate = body.get("truncate", limits.truncate)
    if not isinstance(truncate, bool):
        raise BadRequest("truncate must be true or false", param="truncate")
    value = body.get("input")
    if value is None:
        raise BadRequest("missing field `input`: a string, a list of strings, or token ids", param="input")
    if isinstance(value, str):
        return Embeddings([value], None, fmt, dims, truncate)
    if not isinstance(value, list):
        raise BadRequest(f"`input` must be a string, a list of strings, or token ids; got {type(value).__name__}", param="input")
    check_count(len(value), limits)
    if all(isinstance(v, str) for v in value):
        return Embeddings(value, None, fmt, dims, truncate)
    if all(is_int(v) for v in value):
        return Embeddings(None, [value], fmt, dims, truncate)
    if all(isinstance(v, list) and v and all(is_int(t) for t in v) for v in value):
        return Embeddings(None, value, fmt, dims, truncate)
    raise BadRequest("`input` must be a string, a list of strings, a list of token ids, or a list of non-empty token id lists", param="input")


def format(vectors, encoding_format: str, model_name: str, tokens: int) -> dict:
    """The response body (an `EmbeddingsResponse`) for float32 `vectors`, one per input.

    >>> import numpy as np
    >>> format(np.ones((1, 2), np.float32), "base64", "minilm", 3)["data"][0]["embedding"]
    'AACAPwAAgD8='
    """
    if encoding_format == "base64":
        data = [{"object": "embedding", "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode(), "index": i}
                for i, v in enumerate(vectors)]
    else:
        data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models(names: str | list[str], created: int) -> dict:
    """GET /v1/models (a `ModelList`): every model served, in the order served.

    >>> [m["id"] for m in models(["minilm", "reranker"], 0)["data"]]
    ['minilm', 'reranker']
    """
    names = [names] if isinstance(names, str) else names
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "neuronserve"}
                                       for n in names]}


def error_body(e: ServeError) -> dict:
    """An `OpenAIError`.

    >>> error_body(BadRequest("no", param="input"))
    {'error': {'message': 'no', 'type': 'invalid_request_error', 'param': 'input', 'code': None}}
    """
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
