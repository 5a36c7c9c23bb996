"""Rerank in the shape Cohere and Jina share: POST /v1/rerank.

A query and documents (strings, or objects with a `text`) in; `results` sorted by
`relevance_score`, each with the document's `index`, out, with `usage` (Jina) and `meta` (Cohere).
The score is the cross-encoder's, through the model's own activation (sentence-transformers'
`CrossEncoder`: sigmoid for a single-label head unless the model says otherwise).

The types below declare the protocol (and `/openapi.json`); `parse` checks a decoded body by hand
in the same order, with the same messages, and is tested to accept exactly what they accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from neuronserve.serve.errors import BadRequest, ServeError
from neuronserve.serve.protocols.common import Limits, check_count, check_model, check_task, is_int, server_default


class Document(BaseModel):
    model_config = ConfigDict(strict=True)

    text: str


class RerankRequest(BaseModel):
    """POST /v1/rerank. Unknown fields (e.g. `rank_fields`, `max_chunks_per_doc`) are ignored."""

    model_config = ConfigDict(strict=True)

    query: str
    documents: Annotated[list[str | Document], Field(min_length=1)] = Field(
        description="texts, or objects whose `text` is scored (the object is returned as given)")
    model: str | None = Field(None, description="must name the served model when given")
    top_n: int | None = Field(None, ge=1, description="return the best N (default: every document)")
    return_documents: bool = Field(False, description="include each document in its result")
    truncate: bool = Field(None, description="cut a (query, document) pair longer than the model takes (default: "
                                             "the server's `truncate` setting); false answers 400 instead",
                           json_schema_extra=server_default)


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float
    document: dict | None = Field(None, description="with return_documents: the document, as {\"text\": ...}")


class RerankUsage(BaseModel):
    total_tokens: int = Field(description="tokens of every (query, document) pair, special tokens included")
    prompt_tokens: int


class RerankMeta(BaseModel):
    api_version: dict
    billed_units: dict
    warnings: list[str] = Field(description="e.g. how many documents were cut to the model's length")
    truncated_inputs: int = Field(description="(query, document) pairs cut to the model's length")


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    meta: RerankMeta


class CohereError(BaseModel):
    message: str


@dataclass(slots=True)
class Rerank:
    """A parsed rerank request: the documents' texts, and the documents as given (returned)."""

    query: str
    texts: list[str]
    documents: list
    top_n: int | None
    return_documents: bool
    truncate: bool


def parse(body: Any, limits: Limits) -> Rerank:
    """Check a decoded /v1/rerank body; raises the protocol's 400 / 404.

    >>> parse({"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1}, Limits("ce", "rerank"))
    Rerank(query='q', texts=['a', 'b'], documents=['a', {'text': 'b'}], top_n=1, return_documents=False, truncate=True)
    """
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with `query` and `documents`")
    check_model(body.get("model"), limits)
    check_task("rerank", limits)
    query = body.get("query")
    if not isinstance(query, str):
        raise BadRequest("`query` must be a string", param="query")
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise BadRequest("`documents` must be a list of strings or of {\"text\": ...} objects", param="documents")
    check_count(len(docs), limits)
    texts = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            texts.append(d["text"])
        elif isinstance(d, str):
            texts.append(d)
        else:
            raise BadRequest(f"document {i} must be a string or an object with a string `text`", param="documents")
    top_n = body.get("top_n")
    if top_n is not None and (not is_int(top_n) or top_n < 1):
        raise BadRequest(f"top_n must be an integer >= 1, got {top_n!r}", param="top_n")
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise BadRequest("return_documents must be true or false", param="return_documents")
    truncate = body.get("truncate", limits.truncate)
    if not isinstance(truncate, bool):
        raise BadRequest("truncate must be true or false", param="truncate")
    return Rerank(query, texts, docs, top_n, return_documents, truncate)


def format(req: Rerank, scores, model_name: str, tokens: int, truncated: int, max_len: int, request_id: str) -> dict:
    """The response body (a `RerankResponse`): the best `top_n` documents, best first (ties keep
    the request's order).

    >>> req = parse({"query": "q", "documents": ["a", "b", "c"], "top_n": 2, "return_documents": True},
    ...             Limits("ce", "rerank"))
    >>> body = format(req, [0.1, 0.9, 0.5], "ce", 12, 0, 512, "id-1")
    >>> [(r["index"], r["relevance_score"], r["document"]) for r in body["results"]]
    [(1, 0.9, {'text': 'b'}), (2, 0.5, {'text': 'c'})]
    """
    order = sorted(range(len(req.texts)), key=lambda i: -scores[i])[: req.top_n]
    results = []
    for i in order:
        r = {"index": i, "relevance_score": float(scores[i])}
        if req.return_documents:
            doc = req.documents[i]
            r["document"] = doc if isinstance(doc, dict) else {"text": doc}
        results.append(r)
    warnings = [f"{truncated} of {len(req.texts)} (query, document) pairs were cut to {max_len} tokens, the longest the "
                "model serves; send truncate=false to have them refused instead"] if truncated else []
    return {"id": request_id, "model": model_name, "results": results,
            "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
            "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}, "warnings": warnings,
                     "truncated_inputs": truncated}}


def error_body(e: ServeError) -> dict:
    """A `CohereError` (Cohere's shape: a message).

    >>> error_body(BadRequest("no"))
    {'message': 'no'}
    """
    return {"message": e.message}
