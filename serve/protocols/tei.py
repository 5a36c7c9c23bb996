"""Text Embeddings Inference's classification route: POST /predict.

The types below declare the protocol (and `/openapi.json`); `parse` checks a decoded body by hand
in the same order, with the same messages, and is tested to accept exactly what they accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from neuronserve.serve.errors import BadRequest, ServeError
from neuronserve.serve.protocols.common import Limits, check_count, check_task, server_default


class PredictRequest(BaseModel):
    """POST /predict. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True)

    inputs: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="a text (the answer is one list of labels) or a list of texts (a list per text)")
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

    texts: list[str]
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
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("`inputs` must be a string or a list of strings")
    check_count(len(texts), limits)
    truncate = body.get("truncate", limits.truncate)
    raw_scores = body.get("raw_scores", False)
    if not isinstance(truncate, bool) or not isinstance(raw_scores, bool):
        raise BadRequest("`truncate` and `raw_scores` must be true or false")
    return Predict(texts, single, truncate, raw_scores)


def format(ranked: list[list[tuple[str, float]]], single: bool) -> list:
    """The response body (a `PredictResponse`): (label, score) pairs per text.

    >>> format([[("POSITIVE", 0.9), ("NEGATIVE", 0.1)]], single=True)
    [{'label': 'POSITIVE', 'score': 0.9}, {'label': 'NEGATIVE', 'score': 0.1}]
    """
    result = [[{"label": label, "score": score} for label, score in pairs] for pairs in ranked]
    return result[0] if single else result


def error_body(e: ServeError) -> dict:
    """A `TEIError`.

    >>> error_body(BadRequest("no"))
    {'error': 'no', 'error_type': 'invalid_request_error'}
    """
    return {"error": e.message, "error_type": e.type}
