"""`serve.protocols`: each protocol's parse, format and error body, without Ray or a model; and
each hand-written parse accepts exactly what the protocol's declared request type accepts."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from neuronserve.serve.errors import BadRequest, NotFound, Overloaded, PayloadTooLarge, ServeError, UnsupportedMediaType
from neuronserve.serve.protocols import cohere, kserve, openai, tei
from neuronserve.serve.protocols.common import Limits, check_headers, component_schemas, decode, request_body

MODEL = "all-MiniLM-L6-v2"
EMBED = Limits(MODEL, "embed", max_inputs=16, truncate=True)
CLASSIFY = Limits("sst2", "classify", max_inputs=16, truncate=False)
RERANK = Limits("ce", "rerank", max_inputs=16, truncate=True)


def error_of(fn, *args) -> ServeError:
    with pytest.raises(ServeError) as info:
        fn(*args)
    return info.value


# -- shared ---------------------------------------------------------------------------------------
def test_headers_and_body_are_checked_in_order():
    assert error_of(check_headers, "text/plain", None, 1024).status == 415
    assert "got none" in error_of(check_headers, "", None, 1024).message
    check_headers("Application/JSON; charset=utf-8", "10", 1024)
    e = error_of(check_headers, "application/json", "2048", 1024)
    assert isinstance(e, PayloadTooLarge) and "2048" in e.message and "1024" in e.message
    assert isinstance(error_of(decode, b"x" * 2000, 1024), PayloadTooLarge)
    assert "not valid JSON" in error_of(decode, b"{not json", 1024).message
    assert error_of(decode, b'"\xff"', 1024).status == 400  # invalid UTF-8
    assert decode(b"[1, 2]", 1024) == [1, 2]


def test_error_bodies_keep_each_protocols_shape():
    e = NotFound("model 'x' is not served here", param="model", code="model_not_found")
    assert openai.error_body(e) == {"error": {"message": e.message, "type": "not_found_error", "param": "model",
                                              "code": "model_not_found"}}
    assert tei.error_body(e) == {"error": e.message, "error_type": "not_found_error"}
    assert kserve.error_body(e) == {"error": e.message}
    for body, model in ((openai.error_body(e), openai.OpenAIError), (tei.error_body(e), tei.TEIError),
                        (kserve.error_body(e), kserve.V2Error)):
        model.model_validate(body)
    assert Overloaded("busy", retry_after_s=3).headers == {"Retry-After": "3"}


# -- OpenAI ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, texts, ids", [
    ({"input": "hi"}, ["hi"], None),
    ({"input": ["a", "b"], "model": MODEL}, ["a", "b"], None),
    ({"input": [1, 2, 3]}, None, [[1, 2, 3]]),
    ({"input": [[1], [2, 3]]}, None, [[1], [2, 3]]),
])
def test_openai_input_forms(body, texts, ids):
    req = openai.parse(body, EMBED)
    assert (req.texts, req.token_ids) == (texts, ids)
    assert (req.encoding_format, req.dimensions, req.truncate) == ("float", None, True)


def test_openai_options_and_the_servers_truncate_default():
    req = openai.parse({"input": "x", "encoding_format": "base64", "dimensions": 64, "truncate": False}, EMBED)
    assert (req.encoding_format, req.dimensions, req.truncate) == ("base64", 64, False)
    assert openai.parse({"input": "x"}, Limits(MODEL, "embed", truncate=False)).truncate is False


@pytest.mark.parametrize("body, status, param, needle", [
    ([1, 2], 400, None, "JSON object"),
    ({"input": "x", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ({"model": "gpt-4"}, 404, "model", "gpt-4"),  # the model is checked before the input
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format", "hex"),
    ({"input": "x", "dimensions": "a"}, 400, "dimensions", "integer"),
    ({"input": "x", "dimensions": True}, 400, "dimensions", "integer"),
    ({"input": "x", "truncate": "yes"}, 400, "truncate", "true or false"),
    ({"model": MODEL}, 400, "input", "missing field"),
    ({"input": 5}, 400, "input", "got int"),
    ({"input": []}, 400, "input", "empty"),
    ({"input": ["x"] * 17}, 400, "input", "17 inputs"),
    ({"input": ["a", 3]}, 400, "input", "token id"),
    ({"input": [1.5, 2]}, 400, "input", "token id"),
    ({"input": [[1], []]}, 400, "input", "non-empty"),
    ({"input": [True]}, 400, "input", "token id"),
])
def test_openai_errors(body, status, param, needle):
    e = error_of(openai.parse, body, EMBED)
    assert (e.status, e.param) == (status, param) and needle in e.message


def test_openai_on_a_classifier_points_to_predict():
    e = error_of(openai.parse, {"input": "x"}, CLASSIFY)
    assert e.status == 404 and "/predict" in e.message


def test_openai_format_float_and_base64():
    vectors = np.array([[0.5, -1.0], [0.25, 2.0]], dtype=np.float32)
    body = openai.format(vectors, "float", MODEL, 7)
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    openai.EmbeddingsResponse.model_validate(orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)))
    b64 = openai.format(vectors, "base64", MODEL, 7)
    assert np.array_equal(np.frombuffer(base64.b64decode(b64["data"][1]["embedding"]), "<f4"), vectors[1])
    openai.EmbeddingsResponse.model_validate(b64)
    openai.ModelList.model_validate(openai.models(MODEL, 1700000000))


# -- TEI ------------------------------------------------------------------------------------------
def test_tei_parse_single_and_list():
    one = tei.parse({"inputs": "great"}, CLASSIFY)
    assert (one.texts, one.single, one.truncate, one.raw_scores) == (["great"], True, False, False)
    many = tei.parse({"inputs": ["a", "b"], "raw_scores": True, "truncate": True}, CLASSIFY)
    assert (many.texts, many.single, many.truncate, many.raw_scores) == (["a", "b"], False, True, True)


@pytest.mark.parametrize("body, status, needle", [
    ("x", 400, "JSON object"),
    ({"input": "x"}, 400, "`inputs`"),
    ({"inputs": 3}, 400, "string or a list"),
    ({"inputs": ["a", None]}, 400, "string or a list"),
    ({"inputs": []}, 400, "empty"),
    ({"inputs": ["a"] * 17}, 400, "17 inputs"),
    ({"inputs": "a", "raw_scores": 1}, 400, "true or false"),
])
def test_tei_errors(body, status, needle):
    e = error_of(tei.parse, body, CLASSIFY)
    assert e.status == status and needle in e.message


def test_tei_on_an_embedding_model_points_to_embeddings():
    e = error_of(tei.parse, {"inputs": "x"}, EMBED)
    assert e.status == 404 and "/v1/embeddings" in e.message


def test_tei_format():
    ranked = [[("POSITIVE", 0.9), ("NEGATIVE", 0.1)], [("NEGATIVE", 0.7), ("POSITIVE", 0.3)]]
    assert tei.format(ranked, single=False)[1][0] == {"label": "NEGATIVE", "score": 0.7}
    assert tei.format(ranked[:1], single=True) == [{"label": "POSITIVE", "score": 0.9}, {"label": "NEGATIVE", "score": 0.1}]
    for single in (True, False):
        tei.PredictResponse.model_validate(tei.format(ranked[:1], single))


# -- KServe v2 ------------------------------------------------------------------------------------
def tensor(**kw) -> dict:
    return {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"], **kw}


def test_kserve_parse():
    req = kserve.parse({"id": "r1", "inputs": [tensor()]}, EMBED, MODEL)
    assert (req.texts, req.truncate, req.id) == (["a", "b"], True, "r1")
    req = kserve.parse({"inputs": [tensor(shape=[2, 1])], "parameters": {"truncate": False}}, EMBED, MODEL)
    assert (req.truncate, req.id) == (False, "")
    assert kserve.parse({"inputs": [tensor()]}, CLASSIFY, "sst2").texts == ["a", "b"]  # either task


@pytest.mark.parametrize("name, body, status, needle", [
    ("nope", {"inputs": [tensor()]}, 404, "nope"),
    ("nope", "garbage", 404, "nope"),  # the model is checked first
    (MODEL, {"outputs": []}, 400, "inputs"),
    (MODEL, {"inputs": [tensor(), tensor()]}, 400, "inputs"),
    (MODEL, {"inputs": ["x"]}, 400, "object"),
    (MODEL, {"inputs": [tensor(name="ids")]}, 400, "'ids'"),
    (MODEL, {"inputs": [tensor(datatype="FP32")]}, 400, "BYTES"),
    (MODEL, {"inputs": [tensor(data=[1, 2])]}, 400, "strings"),
    (MODEL, {"inputs": [tensor(shape=[3])]}, 400, "shape"),
    (MODEL, {"inputs": [tensor(shape=[0], data=[])]}, 400, "empty"),
    (MODEL, {"inputs": [tensor(shape=[17], data=["a"] * 17)]}, 400, "17 inputs"),
])
def test_kserve_errors(name, body, status, needle):
    e = error_of(kserve.parse, body, EMBED, name)
    assert e.status == status and needle in e.message


def test_kserve_formats():
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = kserve.format_embeddings(MODEL, "r1", vectors)
    assert body["outputs"][0]["shape"] == [2, 3] and list(body["outputs"][0]["data"]) == [0, 1, 2, 3, 4, 5]
    kserve.InferResponse.model_validate(orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)))
    labels = kserve.format_labels("sst2", "", [("POSITIVE", 0.9), ("NEGATIVE", 0.6)])
    assert [o["data"] for o in labels["outputs"]] == [["POSITIVE", "NEGATIVE"], [0.9, 0.6]]
    kserve.InferResponse.model_validate(labels)
    meta = kserve.model_metadata(MODEL, "abc", "neuronserve-cpu", "embed", 384)
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    kserve.ModelMetadata.model_validate(meta)
    assert [o["name"] for o in kserve.model_metadata("m", "v", "p", "classify", 2)["outputs"]] == ["label", "score"]


# -- the hand-written parse agrees with the declared request types --------------------------------
# Bodies within the server's limits (model name, task, input count): these are checked by parse but
# are not part of the types. Each corpus mixes accepted and rejected bodies.
OPENAI_BODIES = [
    {"input": "hi"}, {"input": ""}, {"input": ["a", "b"]}, {"input": [1, 2]}, {"input": [[1], [2, 3]]},
    {"input": "x", "model": MODEL}, {"input": "x", "model": None}, {"input": "x", "encoding_format": "base64"},
    {"input": "x", "dimensions": 8}, {"input": "x", "dimensions": None}, {"input": "x", "truncate": False},
    {"input": "x", "user": "someone"}, {"input": "x", "encoding_format": None}, {"input": "x", "encoding_format": "hex"},
    {"input": "x", "dimensions": 1.5}, {"input": "x", "dimensions": True}, {"input": "x", "dimensions": "8"},
    {"input": "x", "truncate": None}, {"input": "x", "truncate": 1}, {"input": None}, {}, {"input": 3},
    {"input": []}, {"input": ["a", 1]}, {"input": [1, "a"]}, {"input": [[1], []]}, {"input": [[1], ["a"]]},
    {"input": [True, 2]}, {"input": [[True]]}, {"input": [1.0]}, {"input": {"text": "x"}}, [], "x", None,
]
PREDICT_BODIES = [
    {"inputs": "hi"}, {"inputs": ["a", "b"]}, {"inputs": "x", "raw_scores": True}, {"inputs": "x", "truncate": True},
    {"inputs": "x", "extra": 1}, {"inputs": []}, {"inputs": None}, {"inputs": 1}, {"inputs": ["a", 1]},
    {"inputs": "x", "raw_scores": None}, {"inputs": "x", "truncate": "no"}, {"input": "x"}, {}, ["x"], "x",
    {"inputs": [["q", "d"]]}, {"inputs": [["q", "d"], "x"]}, {"inputs": [["q"]]}, {"inputs": [["q", "d", "e"]]},
    {"inputs": [["q", 1]]}, {"inputs": [[]]}, {"inputs": ["a", ["b", "c"]]},
]
RERANK_BODIES = [
    {"query": "q", "documents": ["a"]}, {"query": "q", "documents": ["a", {"text": "b"}]},
    {"query": "q", "documents": [{"text": "b", "id": 7}]}, {"query": "", "documents": [""]},
    {"query": "q", "documents": ["a"], "top_n": 3}, {"query": "q", "documents": ["a"], "top_n": None},
    {"query": "q", "documents": ["a"], "model": "ce"}, {"query": "q", "documents": ["a"], "model": None},
    {"query": "q", "documents": ["a"], "return_documents": True}, {"query": "q", "documents": ["a"], "truncate": False},
    {"query": "q", "documents": ["a"], "rank_fields": ["text"]},
    {"query": "q", "documents": []}, {"query": "q"}, {"documents": ["a"]}, {"query": 1, "documents": ["a"]},
    {"query": None, "documents": ["a"]}, {"query": "q", "documents": "a"}, {"query": "q", "documents": [1]},
    {"query": "q", "documents": [{"txt": "a"}]}, {"query": "q", "documents": [{"text": 1}]},
    {"query": "q", "documents": ["a"], "top_n": 0}, {"query": "q", "documents": ["a"], "top_n": 1.5},
    {"query": "q", "documents": ["a"], "top_n": True}, {"query": "q", "documents": ["a"], "top_n": "2"},
    {"query": "q", "documents": ["a"], "return_documents": None}, {"query": "q", "documents": ["a"], "truncate": 0},
    [], "x", None,
]
TEI_RERANK_BODIES = [
    {"query": "q", "texts": ["a"]}, {"query": "q", "texts": ["a", "b"], "raw_scores": True, "return_text": True},
    {"query": "q", "texts": ["a"], "truncate": False}, {"query": "q", "texts": ["a"], "truncation_direction": "Right"},
    {"query": "q", "texts": ["a"], "extra": 1},
    {"query": "q", "texts": []}, {"query": "q"}, {"texts": ["a"]}, {"query": 1, "texts": ["a"]},
    {"query": "q", "texts": "a"}, {"query": "q", "texts": [{"text": "a"}]}, {"query": "q", "texts": ["a", 1]},
    {"query": "q", "texts": ["a"], "raw_scores": None}, {"query": "q", "texts": ["a"], "return_text": 1},
    {"query": "q", "texts": ["a"], "truncate": None}, {"query": "q", "texts": ["a"], "truncation_direction": "Left"},
    [], "x",
]
TOKENIZE_BODIES = [
    {"inputs": "a"}, {"inputs": ["a", "b"]}, {"inputs": "a", "add_special_tokens": False},
    {"inputs": []}, {"inputs": 1}, {"inputs": ["a", 1]}, {"inputs": "a", "add_special_tokens": None}, {}, ["a"],
]
EMBED_BODIES = [
    {"inputs": "a"}, {"inputs": ["a", "b"]}, {"inputs": "a", "normalize": False, "dimensions": 8, "prompt_name": "query"},
    {"inputs": "a", "prompt_name": None}, {"inputs": "a", "dimensions": None}, {"inputs": "a", "truncate": False},
    {"inputs": "a", "truncation_direction": "right"}, {"inputs": "a", "extra": 1},
    {"inputs": []}, {"inputs": 1}, {"inputs": ["a", 1]}, {"inputs": "a", "normalize": None}, {"inputs": "a", "dimensions": 1.5},
    {"inputs": "a", "dimensions": True}, {"inputs": "a", "prompt_name": 3}, {"inputs": "a", "truncate": "no"},
    {"inputs": "a", "truncation_direction": "Left"}, {}, ["a"],
]
SPARSE_BODIES = [
    {"inputs": "a"}, {"inputs": ["a", "b"], "prompt_name": "q"}, {"inputs": "a", "truncate": True},
    {"inputs": []}, {"inputs": [1]}, {"inputs": "a", "prompt_name": ["q"]}, {"inputs": "a", "truncate": None}, {},
]
DECODE_BODIES = [
    {"ids": [1, 2]}, {"ids": [[1], [2, 3]]}, {"ids": [1], "skip_special_tokens": False},
    {"ids": []}, {"ids": [[]]}, {"ids": [[1], []]}, {"ids": [1, [2]]}, {"ids": [1.5]}, {"ids": [True]},
    {"ids": "1"}, {"ids": [1], "skip_special_tokens": "no"}, {}, [1],
]
INFER_BODIES = [
    {"inputs": [tensor()]}, {"inputs": [tensor(shape=[2, 1])]}, {"id": "a", "inputs": [tensor()]},
    {"inputs": [tensor()], "parameters": {"truncate": False}}, {"inputs": [tensor()], "parameters": None},
    {"inputs": [tensor()], "parameters": {}}, {"inputs": [tensor(parameters={"x": 1})]},
    {"inputs": []}, {"inputs": [tensor(), tensor()]}, {"inputs": [tensor(name="x")]}, {"inputs": [tensor(datatype="FP32")]},
    {"inputs": [tensor(shape=[3])]}, {"inputs": [tensor(shape=[1, 2])]}, {"inputs": [tensor(shape="2")]},
    {"inputs": [tensor(data=["a", 2])]}, {"inputs": [tensor(data="ab")]}, {"inputs": [tensor(shape=[0], data=[])]},
    {"inputs": ["x"]}, {"inputs": "x"}, {"outputs": []}, [], "x",
]
# What parse accepts beyond the declared types, kept as the server always answered them:
# v2 `parameters` that are not an object are ignored, `truncate` there is read as truthy, and
# a shape is compared by value (2.0 == 2).
LENIENT = [
    ("kserve", {"inputs": [tensor()], "parameters": 5}),
    ("kserve", {"inputs": [tensor()], "parameters": {"truncate": 1}}),
    ("kserve", {"inputs": [tensor(shape=[2.0])]}),
]


def accepts(parse, *args) -> bool:
    try:
        parse(*args)
    except (BadRequest, NotFound):
        return False
    return True


def valid(model, body) -> bool:
    try:
        model.model_validate(body)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("protocol, model, parse, limits, bodies", [
    ("openai", openai.EmbeddingsRequest, openai.parse, EMBED, OPENAI_BODIES),
    ("tei", tei.PredictRequest, tei.parse, CLASSIFY, PREDICT_BODIES),
    ("kserve", kserve.InferRequest, lambda b, lim: kserve.parse(b, lim, MODEL), EMBED, INFER_BODIES),
    ("cohere", cohere.RerankRequest, cohere.parse, RERANK, RERANK_BODIES),
    ("tei-rerank", tei.TEIRerankRequest, tei.parse_rerank, RERANK, TEI_RERANK_BODIES),
    ("tei-tokenize", tei.TokenizeRequest, tei.parse_tokenize, EMBED, TOKENIZE_BODIES),
    ("tei-decode", tei.DecodeRequest, lambda b, lim: tei.parse_decode(b, lim, 10**9), EMBED, DECODE_BODIES),
    ("tei-embed", tei.EmbedRequest, tei.parse_embed, EMBED, EMBED_BODIES),
    ("tei-embed-sparse", tei.SparseEmbedRequest, lambda b, lim: tei.parse_embed(b, lim, sparse=True),
     Limits("splade", "sparse"), SPARSE_BODIES),
], ids=["openai", "tei", "kserve", "cohere", "tei-rerank", "tei-tokenize", "tei-decode", "tei-embed",
        "tei-embed-sparse"])
def test_parse_accepts_exactly_what_the_declared_type_accepts(protocol, model, parse, limits, bodies):
    outcomes = [(accepts(parse, body, limits), valid(model, body)) for body in bodies]
    assert any(a for a, _ in outcomes) and not all(a for a, _ in outcomes)  # the corpus has both kinds
    disagree = [(body, a, v) for body, (a, v) in zip(bodies, outcomes) if a != v]
    assert disagree == []
    # Through JSON too, as requests arrive.
    assert all(valid(model, orjson.loads(orjson.dumps(b))) == v for b, (_, v) in zip(bodies, outcomes))


@pytest.mark.parametrize("protocol, body", LENIENT)
def test_the_known_leniencies_are_only_these(protocol, body):
    assert accepts(kserve.parse, body, EMBED, MODEL) and not valid(kserve.InferRequest, body)


def test_openapi_declarations():
    assert request_body(openai.EmbeddingsRequest)["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsRequest"}
    schemas = component_schemas([openai.EmbeddingsRequest, tei.PredictRequest, kserve.InferRequest])
    assert {"EmbeddingsRequest", "PredictRequest", "InferRequest", "InferInput", "InferParameters"} <= set(schemas)
    assert schemas["EmbeddingsRequest"]["required"] == ["input"]
    assert "default" not in schemas["EmbeddingsRequest"]["properties"]["truncate"]  # the server's setting


def test_a_chunked_body_is_cut_off_at_the_limit_without_reading_the_rest():
    import asyncio

    from neuronserve.serve.errors import PayloadTooLarge
    from neuronserve.serve.protocols.common import read_capped

    read = []

    async def sent():
        for i in range(100):
            read.append(i)
            yield b"x" * 1000

    with pytest.raises(PayloadTooLarge) as e:
        asyncio.run(read_capped(sent(), 4096))
    assert e.value.status == 413 and "4096" in str(e.value)
    assert len(read) == 5  # stopped at the chunk that crossed the limit

    async def small():
        yield b'{"input": '
        yield b'"hi"}'

    assert asyncio.run(read_capped(small(), 4096)) == b'{"input": "hi"}'
