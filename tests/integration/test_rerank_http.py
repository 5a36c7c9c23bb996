"""A tiny cross-encoder on a real Ray Serve, over real HTTP through its HAProxy ingress: the rerank
routes in the shapes Cohere's, Jina's and TEI's clients send, scores as sentence-transformers'
CrossEncoder gives them, truncation made visible, the TEI tool routes, and bad input answered in
each route's shape with the server still serving."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from neuronserve.serve.settings import AppArgs
from tests.fixtures.inprocess_app import tiny_artifact
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
MODEL = "tiny-bert-rerank"
QUERY = "what does padding cost on a static shape device"
DOCS = ["padding is lost throughput", "a lazy dog sat on the mat", "every batch is padded to a compiled bucket",
        "hello world", "the price per request falls when the device is busy"]
LONG = "padding is lost throughput on a static shape device " * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rerank-http")
    return out, tiny_artifact(out, "rerank")


@pytest.fixture(scope="module")
def server(serve_instance, model_dir):
    deploy(serve_instance, AppArgs(artifacts=str(model_dir[1]), num_replicas=1, threads_per_replica=1,
                                   max_inputs_per_request=8))
    return serve_instance


@pytest.fixture(scope="module")
def cross_encoder(model_dir):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir[0] / "models" / MODEL), local_files_only=True, device="cpu")


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=60)


def test_cohere_and_jina_shaped_requests(server, cross_encoder):
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    order = list(np.argsort(-want, kind="stable"))
    # Cohere's client: documents as strings, top_n, return_documents.
    cohere = post(server, "/v1/rerank", {"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 3,
                                         "return_documents": True})
    assert cohere.status_code == 200, cohere.text
    body = cohere.json()
    assert [r["index"] for r in body["results"]] == order[:3]
    assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in order[:3]]
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], want[order[:3]], atol=2e-6)
    assert body["meta"]["billed_units"] == {"search_units": 1} and body["id"] == cohere.headers["x-request-id"]
    # Jina's: documents as objects, usage.total_tokens.
    jina = post(server, "/v1/rerank", {"model": MODEL, "query": QUERY, "documents": [{"text": d} for d in DOCS]}).json()
    assert [r["index"] for r in jina["results"]] == order and jina["usage"]["total_tokens"] > 5 * 8
    # TEI's: texts, raw_scores, return_text.
    tei = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert [r["index"] for r in tei.json()] == order and tei.json()[0]["text"] == DOCS[order[0]]
    raw = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    logits = cross_encoder.predict([(QUERY, d) for d in DOCS], activation_fn=lambda x: x)
    np.testing.assert_allclose([r["score"] for r in sorted(raw, key=lambda r: r["index"])], logits, atol=2e-5)


def test_the_official_cohere_client(server, cross_encoder):
    import cohere  # the test extra's

    client = cohere.Client(base_url=server, api_key="unused", timeout=60)
    result = client.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    order = list(np.argsort(-want, kind="stable"))
    assert [r.index for r in result.results] == order[:2]
    assert [r.document.text for r in result.results] == [DOCS[i] for i in order[:2]]
    np.testing.assert_allclose([r.relevance_score for r in result.results], want[order[:2]], atol=2e-6)
    assert result.meta.billed_units.search_units == 1
    with pytest.raises(cohere.errors.NotFoundError) as e:
        client.rerank(model="other", query=QUERY, documents=DOCS)
    assert MODEL in e.value.body["message"]
    with pytest.raises(cohere.errors.BadRequestError) as e:
        client.rerank(model=MODEL, query=QUERY, documents=["a"] * 9)
    assert "the limit is 8" in e.value.body["message"]


def test_truncation_is_visible_and_truncate_false_refuses(server):
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": [LONG, "short"]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
    assert r.json()["meta"]["truncated_inputs"] == 1 and "32 tokens" in r.json()["meta"]["warnings"][0]
    tei = post(server, "/rerank", {"query": QUERY, "texts": [LONG], "truncate": False})
    assert tei.status_code == 413 and tei.json()["error_type"] == "validation" and "32 tokens" in tei.json()["error"]
    assert post(server, "/rerank", {"query": QUERY, "texts": ["short"]}).headers["x-truncated-inputs"] == "0"


def test_tei_tool_routes(server):
    assert httpx.get(server + "/health", timeout=30).status_code == 200
    info = httpx.get(server + "/info", timeout=30).json()
    assert info["model_id"] == MODEL and "reranker" in info["model_type"] and info["max_input_length"] == 32
    tokens = post(server, "/tokenize", {"inputs": ["hello world"]}).json()
    ids = [t["id"] for t in tokens[0]]
    assert post(server, "/decode", {"ids": ids}).json() == ["hello world"]


@pytest.mark.parametrize("path, body, status, field", [
    ("/v1/rerank", {"query": "q", "documents": []}, 400, "message"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 9}, 400, "message"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "model": "nope"}, 404, "message"),
    ("/v1/rerank", {"query": "q", "documents": [LONG], "truncate": False}, 400, "message"),
    ("/rerank", {"query": "q", "texts": ["a"] * 9}, 400, "error"),
    ("/rerank", {"query": "q", "texts": [3]}, 400, "error"),
    ("/predict", {"inputs": "x"}, 404, "error"),
    ("/v1/embeddings", {"input": "x"}, 404, "error"),
    ("/decode", {"ids": [10**6]}, 400, "error"),
])
def test_bad_input_is_4xx_in_the_routes_shape_and_the_server_stays_healthy(server, path, body, status, field):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    answer = r.json()
    assert field in answer
    if field == "message":
        assert set(answer) == {"message"}
    if "documents" in body and len(body["documents"]) == 9:
        assert "the limit is 8" in answer["message"]
    assert httpx.get(server + "/v2/health/ready", timeout=30).status_code == 200
    assert post(server, "/v1/rerank", {"query": "q", "documents": ["still fine"]}).status_code == 200


def test_openapi_declares_the_rerank_routes(server):
    schema = httpx.get(server + "/openapi.json", timeout=30).json()
    assert schema["paths"]["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RerankRequest"}
    assert {"/rerank", "/tokenize", "/decode", "/info", "/health"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["RerankRequest"]["required"] == ["query", "documents"]


def test_loadtest_route_rerank(server, tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "neuronserve", "loadtest", "--url", server, "--route", "rerank", "--concurrency", "2",
           "--duration", "1s", "--warmup", "0", "--no-progress", "--inputs-per-request", "3", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    step = sweep["steps"][0]
    assert step["succeeded"] > 0 and step["succeeded"] == step["sent"] and step["tokens_source"] == "server", step
    assert sweep["metadata"]["endpoint"].endswith("/v1/rerank") and sweep["metadata"]["model"] == MODEL


def test_sparse_over_http_matches_sparse_encoder(serve_instance, model_dir, server):
    """Last in this module: it deploys a sparse encoder in place of the reranker."""
    from sentence_transformers import SparseEncoder

    from neuronserve.compile.compiler import CompileOptions, compile_artifact
    from neuronserve.models.artifact import parse_buckets
    from tests.fixtures.tiny_models import make_tiny_model

    model = make_tiny_model(model_dir[0] / "models", family="bert", task="sparse")
    art = compile_artifact(CompileOptions(model=str(model), task="sparse", buckets=parse_buckets("1x16,4x16,2x32"),
                                          out=model_dir[0] / "art-sparse")).out_dir
    deploy(serve_instance, AppArgs(artifacts=str(art), num_replicas=1, threads_per_replica=1))
    texts = ["hello world", "a lazy dog sat on the mat"]
    r = post(serve_instance, "/embed_sparse", {"inputs": texts})
    assert r.status_code == 200, r.text
    dense = SparseEncoder(str(model), local_files_only=True, device="cpu").encode(
        texts, convert_to_tensor=True).to_dense().numpy()
    for got, row in zip(r.json(), dense):
        assert [v["index"] for v in got] == np.flatnonzero(row).tolist()
        np.testing.assert_allclose([v["value"] for v in got], row[row != 0], rtol=1e-5, atol=1e-6)
    assert post(serve_instance, "/embed_sparse", {"inputs": 5}).json()["error_type"] == "invalid_request_error"
    assert httpx.get(serve_instance + "/health", timeout=30).status_code == 200
