"""The real application on a real Ray Serve, over real HTTP, with the CPU backend."""

import base64
import concurrent.futures as cf
import json

import httpx
import numpy as np
import pytest

from neuronserve.serve.engine import Engine
from neuronserve.serve.settings import AppArgs
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"
LONG = " ".join(["padding is lost throughput on a static shape device"] * 60)  # ~600 tokens


@pytest.fixture(scope="module")
def server(serve_instance, minilm_artifact):
    args = AppArgs(artifacts=str(minilm_artifact), num_replicas=1, threads_per_replica=1, max_inputs_per_request=16,
                   max_body_bytes=64 * 1024, max_queued_rows=512)
    deploy(serve_instance, args)
    return serve_instance


@pytest.fixture(scope="module")
def engine(minilm_artifact):
    return Engine(minilm_artifact, "cpu")


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def cosine(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_client_works_unchanged(server, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    texts = ["hello world", "Serving encoders on Inferentia", "a"]
    result = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 by default
    assert [d.index for d in result.data] == [0, 1, 2]
    want = engine.embed(texts)
    for d, w in zip(result.data, want):
        assert len(d.embedding) == 384 and cosine(d.embedding, w) > 0.99999
    assert result.usage.prompt_tokens == sum(len(r) for r in engine.tokenize(texts))
    floats = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert cosine(floats.data[0].embedding, want[0]) > 0.99999
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_input_forms_and_response_shape(server, engine):
    ids = engine.tokenize(["hello world"])[0][1:-1]  # without [CLS]/[SEP], as OpenAI clients send ids
    for value, n in (("hello world", 1), (["hello world", "bye"], 2), (ids, 1), ([ids, ids[:1]], 2)):
        r = post(server, "/v1/embeddings", {"model": MODEL, "input": value})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == MODEL and len(body["data"]) == n
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        assert int(r.headers["x-tokens"]) == body["usage"]["prompt_tokens"] and int(r.headers["x-inputs"]) == n
        queue, infer, total = (float(r.headers[h]) for h in ("x-queue-time", "x-inference-time", "x-total-time"))
        assert queue >= 0 and infer > 0 and queue + infer <= total + 0.01
    by_text = post(server, "/v1/embeddings", {"input": "hello world"}).json()["data"][0]["embedding"]
    by_ids = post(server, "/v1/embeddings", {"input": ids}).json()["data"][0]["embedding"]
    assert cosine(by_text, by_ids) > 0.99999
    b64 = post(server, "/v1/embeddings", {"input": "hello world", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert cosine(decoded, by_text) > 0.99999
    short = post(server, "/v1/embeddings", {"input": "hello world", "dimensions": 64}).json()["data"][0]["embedding"]
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-5


def test_long_input_truncates_by_default(server, engine):
    r = post(server, "/v1/embeddings", {"input": LONG})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 256
    assert cosine(r.json()["data"][0]["embedding"], engine.embed([LONG])[0]) > 0.99999


def test_concurrent_clients_each_get_their_own_rows(server, engine):
    texts = [f"request number {i} " + "word " * (i % 40) for i in range(48)]
    want = engine.embed(texts)
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda t: post(server, "/v1/embeddings", {"input": t}).json()["data"][0]["embedding"], texts))
    assert min(cosine(g, w) for g, w in zip(got, want)) > 0.99999


V2_GOOD = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello world", "bye"]}]}


def test_kserve_v2(server, engine):
    assert httpx.get(server + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server + "/v2/health/ready").status_code == 200
    meta = httpx.get(f"{server}/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["inputs"][0]["datatype"] == "BYTES"
    assert httpx.get(f"{server}/v2/models/{MODEL}/ready").json()["ready"] is True
    r = post(server, f"/v2/models/{MODEL}/infer", {**V2_GOOD, "id": "abc"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "abc" and out["outputs"][0]["shape"] == [2, 384]
    vecs = np.array(out["outputs"][0]["data"]).reshape(2, 384)
    want = engine.embed(["hello world", "bye"])
    assert min(cosine(a, b) for a, b in zip(vecs, want)) > 0.99999


def v1_error(r, status, *needles):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], err["message"]


def v2_error(r, status, *needles):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    for n in needles:
        assert n in body["error"], body["error"]


def test_bad_input_gets_4xx_in_the_route_convention_and_server_stays_healthy(server):
    url = server + "/v1/embeddings"
    json_h = {"content-type": "application/json"}
    v1_error(httpx.post(url, content=b"{not json", headers=json_h), 400, "not valid JSON")
    v1_error(httpx.post(url, content=b"input=hi", headers={"content-type": "text/plain"}), 415, "application/json")
    v1_error(post(server, "/v1/embeddings", {"model": MODEL}), 400, "input")
    v1_error(post(server, "/v1/embeddings", {"input": 5}), 400, "input")
    v1_error(post(server, "/v1/embeddings", {"input": [1.5, 2]}), 400, "input")
    v1_error(post(server, "/v1/embeddings", {"input": ["a", 3]}), 400, "input")
    v1_error(post(server, "/v1/embeddings", [1, 2]), 400, "JSON object")
    v1_error(post(server, "/v1/embeddings", {"input": []}), 400, "empty")
    v1_error(post(server, "/v1/embeddings", {"input": ["x"] * 17}), 400, "17 inputs", "16")
    v1_error(post(server, "/v1/embeddings", {"input": [999999]}), 400, "999999", "vocabulary")
    v1_error(post(server, "/v1/embeddings", {"input": "x", "encoding_format": "hex"}), 400, "encoding_format")
    v1_error(post(server, "/v1/embeddings", {"input": "x", "dimensions": 1000}), 400, "dimensions", "384")
    v1_error(post(server, "/v1/embeddings", {"input": "x", "dimensions": "a"}), 400, "dimensions")
    v1_error(post(server, "/v1/embeddings", {"input": LONG, "truncate": False}), 400, "tokens", "256", "truncate")
    v1_error(post(server, "/v1/embeddings", {"input": "x" * 70000}), 413, "65536")
    v1_error(post(server, "/v1/embeddings", {"input": "x", "model": "gpt-4"}), 404, "gpt-4", MODEL)
    wrong_task = post(server, "/predict", {"inputs": "x"})  # TEI's error shape on /predict
    assert wrong_task.status_code == 404 and "/v1/embeddings" in wrong_task.json()["error"]
    # TEI's embedding and tool routes: TEI's shape, a too-long input is TEI's 413 naming the limit
    def tei_error(r, status, *needles):
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error", "error_type"}
        for n in needles:
            assert n in r.json()["error"], r.json()["error"]
    tei_error(post(server, "/embed", {"inputs": LONG, "truncate": False}), 413, "tokens", "256", "truncate")
    tei_error(post(server, "/embed", {"inputs": ["x"] * 17}), 400, "17 inputs", "16")
    tei_error(post(server, "/embed", {"inputs": "x", "dimensions": 1000}), 400, "dimensions", "384")
    tei_error(post(server, "/embed", {"inputs": "x", "prompt_name": "query"}), 400, "query", "none")
    tei_error(post(server, "/embed", {"inputs": "x", "truncation_direction": "Left"}), 400, "Right")
    tei_error(post(server, "/embed_sparse", {"inputs": "x"}), 404, "/v1/embeddings")
    tei_error(post(server, "/rerank", {"query": "q", "texts": ["a"]}), 404, "/v1/embeddings")
    tei_error(post(server, "/tokenize", {"inputs": 5}), 400, "inputs")
    tei_error(post(server, "/decode", {"ids": [999999]}), 400, "999999", "vocabulary")
    r = post(server, "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert r.status_code == 404 and set(r.json()) == {"message"} and "/v1/embeddings" in r.json()["message"]
    # KServe v2 conventions
    infer = f"/v2/models/{MODEL}/infer"
    v2_error(post(server, "/v2/models/nope/infer", V2_GOOD), 404, "nope")
    v2_error(httpx.post(server + infer, content=b"[", headers=json_h), 400, "JSON")
    v2_error(post(server, infer, {"inputs": [{**V2_GOOD["inputs"][0], "name": "ids"}]}), 400, "ids", "text")
    v2_error(post(server, infer, {"inputs": [{**V2_GOOD["inputs"][0], "shape": [3]}]}), 400, "shape")
    v2_error(post(server, infer, {"inputs": [{**V2_GOOD["inputs"][0], "datatype": "FP32"}]}), 400, "BYTES")
    v2_error(post(server, infer, {"inputs": [{**V2_GOOD["inputs"][0], "data": [1, 2]}]}), 400, "strings")
    v2_error(post(server, infer, {"outputs": []}), 400, "inputs")
    v2_error(httpx.get(f"{server}/v2/models/nope"), 404, "nope")
    # never a 5xx, and still serving
    assert httpx.get(server + "/v2/health/ready").status_code == 200
    assert post(server, "/v1/embeddings", {"input": "still fine"}).status_code == 200
    assert post(server, "/embed", {"inputs": "still fine"}).status_code == 200


def test_tei_embed_and_truncation_header(server, engine):
    r = post(server, "/embed", {"inputs": ["hello world", LONG]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
    want = engine.embed(["hello world", LONG])
    assert min(cosine(g, w) for g, w in zip(r.json(), want)) > 0.99999
    v1 = post(server, "/v1/embeddings", {"input": LONG})
    assert v1.headers["x-truncated-inputs"] == "1" and post(server, "/v1/embeddings", {"input": "x"}).headers[
        "x-truncated-inputs"] == "0"


def test_openapi_declares_the_request_bodies_and_docs_are_served(server):
    schema = httpx.get(server + "/openapi.json").json()
    for path, request in (("/v1/embeddings", "EmbeddingsRequest"), ("/predict", "PredictRequest"),
                          ("/v2/models/{name}/infer", "InferRequest"), ("/embed", "EmbedRequest"),
                          ("/embed_sparse", "SparseEmbedRequest"), ("/v1/rerank", "RerankRequest"),
                          ("/rerank", "TEIRerankRequest"), ("/tokenize", "TokenizeRequest"), ("/decode", "DecodeRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{request}"}
        assert request in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["EmbeddingsRequest"]["required"] == ["input"]
    docs = httpx.get(server + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def test_overload_returns_429_with_retry_after_and_loses_no_accepted_request(serve_instance, minilm_artifact, engine):
    args = AppArgs(artifacts=str(minilm_artifact), num_replicas=1, threads_per_replica=1, max_queued_rows=24,
                   max_inputs_per_request=16, max_batch_tokens=256)
    deploy(serve_instance, args, name="neuronserve")
    texts = [[f"burst {i} row {j} " + "text " * 30 for j in range(8)] for i in range(40)]
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64)) as c, cf.ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(lambda t: c.post(serve_instance + "/v1/embeddings", json={"input": t}), texts))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "overloaded" in r.json()["error"]["message"]
    accepted = [(t, r) for t, r in zip(texts, responses) if r.status_code == 200]
    for t, r in accepted[:5]:  # accepted requests came back whole and correct
        got = [d["embedding"] for d in r.json()["data"]]
        assert len(got) == 8
        assert min(cosine(g, w) for g, w in zip(got, engine.embed(t))) > 0.99999
    assert httpx.get(serve_instance + "/v2/health/ready").status_code == 200


def test_a_chunked_body_is_served_within_the_limit_and_refused_past_it(server):
    def chunked(body: bytes, size: int = 4096):
        for i in range(0, len(body), size):
            yield body[i:i + size]  # a generator: httpx sends it without Content-Length

    small = json.dumps({"input": ["sent in chunks"]}).encode()
    r = httpx.post(server + "/v1/embeddings", content=chunked(small, 5), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    # Over the limit of either deployment this module runs (64 KiB, or the 4 MiB default).
    big = json.dumps({"input": "x" * (5 << 20)}).encode()
    r = httpx.post(server + "/v1/embeddings", content=chunked(big), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "without Content-Length" in r.json()["error"]["message"]
