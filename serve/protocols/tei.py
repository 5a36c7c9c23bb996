"""Text Embeddings Inference's routes: POST /embed, /embed_sparse, /predict (texts or text pairs),
/rerank, /tokenize and /decode (GET /info and /health are built in `serve.app` from the manifest).

Two deliberate differences from TEI: `inputs: ["a", "b"]` is two texts here (TEI reads a list of
two strings as one pair); a pair is always a list of two strings inside the list,
`inputs: [["query", "document"]]`. And the server's `truncate` setting is the default (TEI's is
off). An input too long with truncate=false is TEI's 413 with `error_type` "validation".

The types below declare the protocol (and `/openapi.json`); `parse` checks a decoded body by hand
in the same order, with the same messages, and is tested to accept exactly what they accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from neuronserve.serve.errors import BadRequest, InputError, InputTooLong, PayloadTooLarge, ServeError
from neuronserve.serve.protocols.common import Limits, check_count, check_task, is_int, server_default

Pair = Annotated[list[str], Field(min_length=2, max_length=2)]


class PredictRequest(BaseModel):
    """POST /predict. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True)

    inputs: str | Annotated[list[str | Pair], Field(min_length=1)] = Field(
        description="a text (the answer is one list of labels), or a list of texts and text pairs ([a, b]: "
                    "encoded as the tokenizer encodes pairs), with a list of labels per item")
    truncate: bool = Field(None, description="cut inputs longer than the model takes (default: the server's "
                                             "`truncate` setting); false answers 400 instead", json_schema_extra=server_default)
    raw_scores: bool = Field(False, description="every label's logit, in label order, instead of softmax scores ranked")


class Prediction(BaseModel):
    label: str
    score: float


class PredictResponse(RootModel[list[Prediction] | list[list[Prediction]]]):
    """The labels of one text, best first (or in label order with raw_scores); a list per text for a list."""


class TEIError(BaseModel):
    error: str
    error_type: str


@dataclass(slots=True)
class Predict:
    """A parsed /predict request. `single`: the input was one string (so is the answer)."""

    texts: list  # strings, and (text, text) tuples for pairs
    single: bool
    truncate: bool
    raw_scores: bool


def parse(body: Any, limits: Limits) -> Predict:
    """Check a decoded /predict body; raises the protocol's 400 / 404.

    >>> parse({"inputs": "great film"}, Limits("sst2", "classify"))
    Predict(texts=['great film'], single=True, truncate=True, raw_scores=False)
    """
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadRequest("body must be a JSON object with `inputs`: a string or a list of strings")
    check_task("classify", limits)
    inputs = body["inputs"]
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) or is_pair(t) for t in texts):
        raise BadRequest("`inputs` must be a string or a list of strings and [text, text] pairs")
    check_count(len(texts), limits)
    texts = [t if isinstance(t, str) else tuple(t) for t in texts]
    truncate = body.get("truncate", limits.truncate)
    raw_scores = body.get("raw_scores", False)
    if not isinstance(truncate, bool) or not isinstance(raw_scores, bool):
        raise BadRequest("`truncate` and `raw_scores` must be true or false")
    return Predict(texts, single, truncate, raw_scores)


def is_pair(value: Any) -> bool:
    """A text pair: a list of two strings."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def format(ranked: list[list[tuple[str, float]]], single: bool) -> list:
    """The response body (a `PredictResponse`): (label, score) pairs per text.

    >>> format([[("POSITIVE", 0.9), ("NEGATIVE", 0.1)]], single=True)
    [{'label': 'POSITIVE', 'score': 0.9}, {'label': 'NEGATIVE', 'score': 0.1}]
    """
    result = [[{"label": label, "score": score} for label, score in pairs] for pairs in ranked]
    return result[0] if single else result


# -- POST /embed, POST /embed_sparse --------------------------------------------------------------
class EmbedRequest(BaseModel):
    """POST /embed. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True)

    inputs: str | Annotated[list[str], Field(min_length=1)]
    normalize: bool = Field(True, description="L2-normalise each vector")
    truncate: bool = Field(None, description="cut inputs longer than the model takes (default: the server's "
                                             "`truncate` setting); false answers 413 instead", json_schema_extra=server_default)
    prompt_name: str | None = Field(None, description="a prompt of the model's (config_sentence_transformers.json) "
                                                      "put before each input; default: the model's default prompt")
    dimensions: int | None = Field(None, description="keep the first N dimensions (before normalising)")
    truncation_direction: Literal["Right", "right"] = Field("Right", description="only Right is served")


class EmbedResponse(RootModel[list[list[float]]]):
    """A vector per input (a list even for one string)."""


class SparseEmbedRequest(BaseModel):
    """POST /embed_sparse. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True)

    inputs: str | Annotated[list[str], Field(min_length=1)]
    truncate: bool = Field(None, description="as for /embed", json_schema_extra=server_default)
    prompt_name: str | None = Field(None, description="as for /embed")
    truncation_direction: Literal["Right", "right"] = Field("Right", description="only Right is served")


class SparseValue(BaseModel):
    index: int = Field(description="vocabulary token id")
    value: float


class SparseEmbedResponse(RootModel[list[list[SparseValue]]]):
    """Per input, its non-zero weights by token id."""


@dataclass(slots=True)
class Embed:
    texts: list[str]
    truncate: bool
    prompt_name: str | None
    normalize: bool = True
    dimensions: int | None = None


def parse_embed(body: Any, limits: Limits, sparse: bool = False) -> Embed:
    """Check a decoded /embed (or, `sparse`, /embed_sparse) body; raises the protocol's 400 / 404.

    >>> parse_embed({"inputs": "hi", "normalize": False, "dimensions": 8}, Limits("m", "embed"))
    Embed(texts=['hi'], truncate=True, prompt_name=None, normalize=False, dimensions=8)
    """
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadRequest("body must be a JSON object with `inputs`: a string or a list of strings")
    check_task("sparse" if sparse else "embed", limits)
    inputs = body["inputs"]
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("`inputs` must be a string or a list of strings")
    check_count(len(texts), limits)
    truncate = body.get("truncate", limits.truncate)
    if not isinstance(truncate, bool):
        raise BadRequest("`truncate` must be true or false")
    prompt_name = body.get("prompt_name")
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise BadRequest("`prompt_name` must be a string")
    direction = body.get("truncation_direction", "Right")
    if direction not in ("Right", "right"):
        raise BadRequest(f"truncation_direction {direction!r} is not served: only Right (the end of the text is cut)")
    if sparse:
        return Embed(texts, truncate, prompt_name)
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise BadRequest("`normalize` must be true or false")
    dimensions = body.get("dimensions")
    if dimensions is not None and not is_int(dimensions):
        raise BadRequest("`dimensions` must be an integer")
    return Embed(texts, truncate, prompt_name, normalize, dimensions)


def format_sparse(rows) -> list:
    """The /embed_sparse body: per input, `{"index", "value"}` for each non-zero weight.

    >>> import numpy as np
    >>> format_sparse([(np.array([3, 9]), np.array([0.5, 1.25], np.float32))])
    [[{'index': 3, 'value': 0.5}, {'index': 9, 'value': 1.25}]]
    """
    return [[{"index": int(i), "value": float(v)} for i, v in zip(idx, values)] for idx, values in rows]


# -- POST /rerank ---------------------------------------------------------------------------------
class TEIRerankRequest(BaseModel):
    """POST /rerank. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True)

    query: str
    texts: Annotated[list[str], Field(min_length=1)]
    truncate: bool = Field(None, description="cut a (query, text) pair longer than the model takes (default: the "
                                             "server's `truncate` setting); false answers 413 instead",
                           json_schema_extra=server_default)
    raw_scores: bool = Field(False, description="the logit, without the model's activation")
    return_text: bool = Field(False, description="include each text in its result")
    truncation_direction: Literal["Right", "right"] = Field("Right", description="only Right is served")


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class RerankResponse(RootModel[list[Rank]]):
    """The texts' scores, best first."""


@dataclass(slots=True)
class RerankTexts:
    query: str
    texts: list[str]
    truncate: bool
    raw_scores: bool
    return_text: bool


def parse_rerank(body: Any, limits: Limits) -> RerankTexts:
    """Check a decoded /rerank body; raises the protocol's 400 / 404.

    >>> parse_rerank({"query": "q", "texts": ["a", "b"], "return_text": True}, Limits("ce", "rerank"))
    RerankTexts(query='q', texts=['a', 'b'], truncate=True, raw_scores=False, return_text=True)
    """
    if not isinstance(body, dict) or "query" not in body or "texts" not in body:
        raise BadRequest("body must be a JSON object with `query` (a string) and `texts` (a list of strings)")
    check_task("rerank", limits)
    query, texts = body["query"], body["texts"]
    if not isinstance(query, str):
        raise BadRequest("`query` must be a string")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("`texts` must be a list of strings")
    check_count(len(texts), limits)
    flags = {}
    for name, default in (("truncate", limits.truncate), ("raw_scores", False), ("return_text", False)):
        flags[name] = body.get(name, default)
        if not isinstance(flags[name], bool):
            raise BadRequest(f"`{name}` must be true or false")
    direction = body.get("truncation_direction", "Right")
    if direction not in ("Right", "right"):
        raise BadRequest(f"truncation_direction {direction!r} is not served: only Right (the end of the text is cut)")
    return RerankTexts(query, texts, flags["truncate"], flags["raw_scores"], flags["return_text"])


def format_rerank(req: RerankTexts, scores) -> list:
    """The response body (a `RerankResponse`): every text's score, best first.

    >>> format_rerank(RerankTexts("q", ["a", "b"], True, False, True), [0.2, 0.7])
    [{'index': 1, 'score': 0.7, 'text': 'b'}, {'index': 0, 'score': 0.2, 'text': 'a'}]
    """
    order = sorted(range(len(req.texts)), key=lambda i: -scores[i])
    if req.return_text:
        return [{"index": i, "score": float(scores[i]), "text": req.texts[i]} for i in order]
    return [{"index": i, "score": float(scores[i])} for i in order]


# -- POST /tokenize, POST /decode ------------------------------------------------------------------
class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    inputs: str | Annotated[list[str], Field(min_length=1)]
    add_special_tokens: bool = True


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = Field(description="character offset of the token in its text (null for special tokens)")
    stop: int | None


class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
    """Per input, its tokens."""


class DecodeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    ids: Annotated[list[int], Field(min_length=1)] | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    skip_special_tokens: bool = True


class DecodeResponse(RootModel[list[str]]):
    """Per id list, its text."""


@dataclass(slots=True)
class Tokenize:
    texts: list[str]
    add_special_tokens: bool


@dataclass(slots=True)
class Decode:
    ids: list[list[int]]
    skip_special_tokens: bool


def parse_tokenize(body: Any, limits: Limits) -> Tokenize:
    """Check a decoded /tokenize body.

    >>> parse_tokenize({"inputs": "hi"}, Limits("m", "embed"))
    Tokenize(texts=['hi'], add_special_tokens=True)
    """
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadRequest("body must be a JSON object with `inputs`: a string or a list of strings")
    inputs = body["inputs"]
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("`inputs` must be a string or a list of strings")
    check_count(len(texts), limits)
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise BadRequest("`add_special_tokens` must be true or false")
    return Tokenize(texts, special)


def parse_decode(body: Any, limits: Limits, vocab_size: int) -> Decode:
    """Check a decoded /decode body; ids must be in the vocabulary.

    >>> parse_decode({"ids": [101, 102]}, Limits("m", "embed"), 30522)
    Decode(ids=[[101, 102]], skip_special_tokens=True)
    """
    if not isinstance(body, dict) or "ids" not in body:
        raise BadRequest("body must be a JSON object with `ids`: a list of token ids or a list of such lists")
    ids = body["ids"]
    if isinstance(ids, list) and ids and all(is_int(t) for t in ids):
        lists = [ids]
    elif isinstance(ids, list) and ids and all(isinstance(v, list) and v and all(is_int(t) for t in v) for v in ids):
        lists = ids
    else:
        raise BadRequest("`ids` must be a non-empty list of token ids or a non-empty list of non-empty id lists")
    check_count(len(lists), limits)
    for i, row in enumerate(lists):
        bad = next((t for t in row if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise BadRequest(f"ids {i}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    skip = body.get("skip_special_tokens", True)
    if not isinstance(skip, bool):
        raise BadRequest("`skip_special_tokens` must be true or false")
    return Decode(lists, skip)


# -- GET /info ------------------------------------------------------------------------------------
class Info(BaseModel):
    """GET /info: what TEI's /info says, for the served model."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict = Field(description='{"embedding": {"pooling": ...}}, {"classifier": {"id2label", "label2id"}} '
                                         'or {"reranker": {"id2label", "label2id"}}')
    max_input_length: int = Field(description="tokens; longer inputs are cut (truncate) or refused")
    max_client_batch_size: int
    max_batch_tokens: int
    auto_truncate: bool = Field(description="the server's default for requests that do not say `truncate`")
    version: str


def info(manifest, model_name: str, max_input_length: int, limits: Limits, max_batch_tokens: int, version: str) -> dict:
    """The /info body (an `Info`) from the artifact's manifest."""
    if manifest.task == "embed":
        model_type = {"embedding": {"pooling": manifest.pooling.mode if manifest.pooling else "mean"}}
    elif manifest.task == "sparse":
        model_type = {"embedding": {"pooling": "splade"}}
    else:
        id2label = {str(k): v for k, v in (manifest.labels or {}).items()}
        kind = "reranker" if manifest.task == "rerank" else "classifier"
        model_type = {kind: {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}}
    return {"model_id": model_name, "model_sha": manifest.model.sha256, "model_dtype": manifest.precision,
            "model_type": model_type, "max_input_length": max_input_length, "max_client_batch_size": limits.max_inputs,
            "max_batch_tokens": max_batch_tokens, "auto_truncate": limits.truncate, "version": version}


def input_error(e: InputError) -> ServeError:
    """An input the engine cannot serve, in TEI's terms: too long is 413 (`error_type` validation)."""
    if isinstance(e, InputTooLong):
        err = PayloadTooLarge(str(e), param=e.param)
        err.type = "validation"
        return err
    return BadRequest(str(e), param=e.param)


def error_body(e: ServeError) -> dict:
    """A `TEIError`.

    >>> error_body(BadRequest("no"))
    {'error': 'no', 'error_type': 'invalid_request_error'}
    """
    return {"error": e.message, "error_type": e.type}
