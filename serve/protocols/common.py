"""What the protocols share: the served model's limits, reading a JSON body, and the OpenAPI
declarations of request bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

import orjson
from pydantic import BaseModel

from neuronserve.serve.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType

ROUTE_FOR_TASK = {"embed": "/v1/embeddings (or TEI's /embed)", "classify": "/predict",
                  "rerank": "/v1/rerank (or TEI's /rerank)", "sparse": "/embed_sparse"}


@dataclass(frozen=True, slots=True)
class Limits:
    """What a request is checked against: the model served, its task, and the request settings.

    >>> limits = Limits("minilm", "embed", max_inputs=2)
    >>> check_count(3, limits)
    Traceback (most recent call last):
    ...
    neuronserve.serve.errors.BadRequest: 3 inputs in one request; the limit is 2 (max_inputs_per_request)
    """

    model_name: str
    task: str  # "embed", "classify", "rerank" or "sparse" (`neuronserve.models.artifact.TASKS`)
    max_inputs: int = 256
    truncate: bool = True  # for requests that do not say


def check_model(name: Any, limits: Limits) -> None:
    if name is not None and name != limits.model_name:
        raise NotFound(f"model {name!r} is not served here; this server serves {limits.model_name!r}",
                       param="model", code="model_not_found")


def article(word: str) -> str:
    """'an' before a vowel, else 'a'.

    >>> article("embed"), article("rerank")
    ('an', 'a')
    """
    return "an" if word[:1].lower() in "aeiou" else "a"


def check_task(task: str, limits: Limits) -> None:
    if limits.task != task:
        raise NotFound(f"this server runs {article(limits.task)} {limits.task} model; use {ROUTE_FOR_TASK[limits.task]}")


def check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise BadRequest("input is empty: send at least one text", param="input")
    if n > limits.max_inputs:
        raise BadRequest(f"{n} inputs in one request; the limit is {limits.max_inputs} (max_inputs_per_request)", param="input")


def check_headers(content_type: str, content_length: str | None, max_body_bytes: int) -> None:
    """Before the body is read: JSON only (415), and no larger than the limit it declares (413)."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(f"content-type must be application/json, got {content_type or 'none'}")
    if content_length and content_length.isdigit() and int(content_length) > max_body_bytes:
        raise PayloadTooLarge(f"request body is {content_length} bytes; the limit is {max_body_bytes} bytes (max_body_bytes)")


def decode(raw: bytes, max_body_bytes: int) -> Any:
    """The body as JSON values (orjson), or 413 / 400.

    >>> decode(b'{"input": "hi"}', 1024)
    {'input': 'hi'}
    """
    if len(raw) > max_body_bytes:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {max_body_bytes} bytes (max_body_bytes)")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:  # invalid UTF-8 included
        raise BadRequest(f"body is not valid JSON: {e}") from None


async def read_capped(chunks: AsyncIterator[bytes], max_body_bytes: int) -> bytes:
    """A body sent without Content-Length (chunked), read only up to the limit: past it, 413 at
    once, without reading or buffering the rest.

    >>> import asyncio
    >>> async def sent(*parts):
    ...     for p in parts:
    ...         yield p
    >>> asyncio.run(read_capped(sent(b'{"input": ', b'"hi"}'), 1024))
    b'{"input": "hi"}'
    """
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body_bytes:
            raise PayloadTooLarge(f"request body (sent without Content-Length) is over {max_body_bytes} bytes, "
                                  f"the limit (max_body_bytes); it was cut off there")
        parts.append(chunk)
    return b"".join(parts)


def server_version() -> str:
    """neuronserve's installed version (GET /v2, TEI's /info), or "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("neuronserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def is_int(value: Any) -> bool:
    """A JSON integer (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


# -- OpenAPI -------------------------------------------------------------------------------------
COMPONENTS = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra`: its JSON body is `model` (declared only; the route parses it).

    >>> from pydantic import BaseModel
    >>> class Ping(BaseModel):
    ...     text: str
    >>> request_body(Ping)["requestBody"]["content"]["application/json"]["schema"]
    {'$ref': '#/components/schemas/Ping'}
    """
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": COMPONENTS.format(model=model.__name__)}}}}}


def server_default(schema: dict) -> None:
    """`json_schema_extra` of a field whose default is a server setting: the schema shows none."""
    schema.pop("default", None)


def component_schemas(models: list[type[BaseModel]]) -> dict[str, dict]:
    """JSON schemas of `models` and the types they use, keyed by name, for `components.schemas`."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(m, "validation") for m in models], ref_template=COMPONENTS)
    return top.get("$defs", {})
