"""KServe Open Inference Protocol v2: POST /v2/models/{name}/infer and the metadata routes.

The types below declare the protocol (and `/openapi.json`); `parse` checks a decoded body by hand
in the same order, with the same messages, and is tested to accept what they accept (and, as
before, a little more: see `LENIENT` in tests/unit/test_protocols.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from neuronserve.serve.errors import BadRequest, ServeError
from neuronserve.serve.protocols.common import Limits, check_count, check_model

TEXT_INPUT = {"name": "text", "datatype": "BYTES", "shape": [-1]}


class InferInput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: Literal["text"]
    datatype: Literal["BYTES"]
    shape: list[int] = Field(description="[N] or [N, 1] for N texts")
    data: Annotated[list[str], Field(min_length=1)]

    @model_validator(mode="after")
    def _shape_matches_data(self):
        if self.shape not in ([len(self.data)], [len(self.data), 1]):
            raise ValueError(f"shape {self.shape} does not match {len(self.data)} data elements")
        return self


class InferParameters(BaseModel):
    model_config = ConfigDict(strict=True)

    truncate: bool | None = Field(None, description="default: the server's `truncate` setting")


class InferRequest(BaseModel):
    """POST /v2/models/{name}/infer: one BYTES tensor named `text`."""

    model_config = ConfigDict(strict=True)

    id: Any = Field("", description="echoed in the response")
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=1)]
    parameters: InferParameters | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: Literal["FP32", "BYTES"]
    shape: list[int]
    data: list[float] | list[str] = Field(description="row-major")


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    id: Any
    outputs: list[OutputTensor]
    parameters: dict | None = Field(None, description="truncated_inputs: inputs cut to the model's length")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelIndex(BaseModel):
    """GET /v2/models: every model served (not in the v2 protocol, which has no listing; each
    entry is what GET /v2/models/{name} answers)."""

    models: list[ModelMetadata]


class V2Error(BaseModel):
    error: str


@dataclass(slots=True)
class Infer:
    """A parsed infer request."""

    texts: list[str]
    truncate: bool
    id: Any


def parse(body: Any, limits: Limits, name: str) -> Infer:
    """Check a decoded infer body for the model `name` of the path; raises the protocol's 400 / 404.

    >>> body = {"id": "a", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    >>> parse(body, Limits("minilm", "embed"), "minilm")
    Infer(texts=['hi'], truncate=True, id='a')
    """
    check_model(name, limits)
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise BadRequest("body must be {\"inputs\": [{\"name\": \"text\", \"shape\": [N], \"datatype\": \"BYTES\", \"data\": [...]}]}")
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict):
        raise BadRequest("each input must be an object with name, shape, datatype and data")
    if tensor.get("name") != "text":
        raise BadRequest(f"unknown input tensor {tensor.get('name')!r}; this model takes one input named 'text'")
    if tensor.get("datatype") != "BYTES":
        raise BadRequest(f"input 'text' must have datatype BYTES, got {tensor.get('datatype')!r}")
    data, shape = tensor.get("data"), tensor.get("shape")
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise BadRequest("input 'text' data must be a list of strings")
    if not (isinstance(shape, list) and shape in ([len(data)], [len(data), 1])):
        raise BadRequest(f"input 'text' shape {shape} does not match its {len(data)} data elements; expected [{len(data)}]")
    check_count(len(data), limits)
    params = body.get("parameters") or {}
    truncate = params.get("truncate", limits.truncate) if isinstance(params, dict) else limits.truncate
    return Infer(data, bool(truncate), body.get("id", ""))


def format_embeddings(model_name: str, request_id: Any, vectors) -> dict:
    """The response body (an `InferResponse`) for float32 `vectors` (rows x dims).

    >>> import numpy as np
    >>> format_embeddings("minilm", "a", np.zeros((2, 3), np.float32))["outputs"][0]["shape"]
    [2, 3]
    """
    outputs = [{"name": "embedding", "datatype": "FP32", "shape": list(vectors.shape), "data": vectors.ravel()}]
    return {"model_name": model_name, "id": request_id, "outputs": outputs}


def format_labels(model_name: str, request_id: Any, best: list[tuple[str, float]]) -> dict:
    """The response body (an `InferResponse`) for each text's best (label, score)."""
    outputs = [
        {"name": "label", "datatype": "BYTES", "shape": [len(best)], "data": [label for label, _ in best]},
        {"name": "score", "datatype": "FP32", "shape": [len(best)], "data": [score for _, score in best]},
    ]
    return {"model_name": model_name, "id": request_id, "outputs": outputs}


def model_metadata(model_name: str, version: str, platform: str, task: str, output_dim: int) -> dict:
    """GET /v2/models/{name} (a `ModelMetadata`)."""
    outputs = (
        [{"name": "embedding", "datatype": "FP32", "shape": [-1, output_dim]}]
        if task == "embed"
        else [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP32", "shape": [-1]}]
    )
    return {"name": model_name, "versions": [version], "platform": platform, "inputs": [dict(TEXT_INPUT)], "outputs": outputs}


def error_body(e: ServeError) -> dict:
    """A `V2Error`.

    >>> error_body(BadRequest("no"))
    {'error': 'no'}
    """
    return {"error": e.message}
