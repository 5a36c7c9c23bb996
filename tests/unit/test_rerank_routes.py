"""The rerank and TEI routes through the whole application in this process (Edge, FastRoutes,
FastAPI, the routes, the real engine and batcher on tiny random-weight models): answers as
sentence-transformers' CrossEncoder scores them, each route's error shape, and truncation counted
in the header, the body where the protocol has a place, and the metrics."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.inprocess_app import Running, tiny_artifact

QUERY = "how fast is the device"
DOCS = ["the device runs one graph at a time", "a lazy dog sat on the mat", "latency per request on inferentia",
        "hello world"]
LONG = "padding is lost throughput on a static shape device " * 40  # far past the 32-token bucket


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    out = tmp_path_factory.mktemp("rerank-routes")
    running = {task: Running(tiny_artifact(out, task), max_inputs_per_request=8, max_body_bytes=64 * 1024)
               for task in ("rerank", "classify", "embed")}
    running["dir"] = out
    yield running
    for task in ("rerank", "classify", "embed"):
        running[task].close()


@pytest.fixture(scope="module")
def cross_encoder(servers):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(servers["dir"] / "models" / "tiny-bert-rerank"), local_files_only=True, device="cpu")


def post(running, path, body):
    return running.request("POST", path, json=body)


def test_v1_rerank_sorts_by_the_cross_encoders_scores(servers, cross_encoder):
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    r = post(servers["rerank"], "/v1/rerank", {"model": "tiny-bert-rerank", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == list(np.argsort(-want, kind="stable"))
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], np.sort(want)[::-1], atol=2e-6)
    assert all("document" not in x for x in body["results"])
    tokens = int(r.headers["x-tokens"])
    assert body["usage"] == {"total_tokens": tokens, "prompt_tokens": tokens} and tokens > 4 * 5
    assert body["model"] == "tiny-bert-rerank" and body["id"] == r.headers["x-request-id"]
    assert body["meta"]["warnings"] == [] and body["meta"]["truncated_inputs"] == 0
    assert r.headers["x-truncated-inputs"] == "0" and r.headers["x-inputs"] == "4"


def test_v1_rerank_top_n_and_documents_as_given(servers, cross_encoder):
    docs = [{"text": d, "id": f"doc-{i}"} for i, d in enumerate(DOCS[:3])] + [DOCS[3]]
    r = post(servers["rerank"], "/v1/rerank", {"query": QUERY, "documents": docs, "top_n": 2, "return_documents": True})
    body = r.json()
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    best = list(np.argsort(-want, kind="stable")[:2])
    assert [x["index"] for x in body["results"]] == best
    for x in body["results"]:
        expected = docs[x["index"]] if isinstance(docs[x["index"]], dict) else {"text": docs[x["index"]]}
        assert x["document"] == expected
    many = post(servers["rerank"], "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 50}).json()
    assert len(many["results"]) == 4


def test_tei_rerank_raw_scores_and_text(servers, cross_encoder):
    r = post(servers["rerank"], "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    ranks = r.json()
    assert [x["index"] for x in ranks] == list(np.argsort(-want, kind="stable"))
    assert [x["text"] for x in ranks] == [DOCS[x["index"]] for x in ranks]
    np.testing.assert_allclose([x["score"] for x in ranks], np.sort(want)[::-1], atol=2e-6)
    raw = post(servers["rerank"], "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    logits = cross_encoder.predict([(QUERY, d) for d in DOCS], activation_fn=lambda x: x)
    assert set(raw[0]) == {"index", "score"}
    np.testing.assert_allclose([x["score"] for x in sorted(raw, key=lambda x: x["index"])], logits, atol=2e-5)


def test_truncation_is_counted_in_header_body_and_metrics(servers, cross_encoder):
    from neuronserve.serve.metrics import registry

    def counted(route):
        return registry().get_sample_value("neuronserve_truncated_inputs_total",
                                         {"model": "tiny-bert-rerank", "route": route}) or 0.0

    before = counted("/v1/rerank")
    r = post(servers["rerank"], "/v1/rerank", {"query": QUERY, "documents": [LONG, "short", LONG]})
    body = r.json()
    assert r.headers["x-truncated-inputs"] == "2" and body["meta"]["truncated_inputs"] == 2
    assert "2 of 3" in body["meta"]["warnings"][0] and "32 tokens" in body["meta"]["warnings"][0]
    assert counted("/v1/rerank") == before + 2
    # The score is the cross-encoder's on the pair cut as it cuts pairs, at the served length.
    cross_encoder.max_seq_length = 32
    try:
        want = cross_encoder.predict([(QUERY, LONG), (QUERY, "short"), (QUERY, LONG)])
    finally:
        cross_encoder.max_seq_length = 128
    got = sorted(body["results"], key=lambda x: x["index"])
    np.testing.assert_allclose([x["relevance_score"] for x in got], want, atol=2e-6)
    # Every route says it: embeddings (header only), predict (header), v2 (its parameters).
    e = post(servers["embed"], "/v1/embeddings", {"input": [LONG, "x"]})
    assert e.status_code == 200 and e.headers["x-truncated-inputs"] == "1"
    ids = post(servers["embed"], "/v1/embeddings", {"input": [[7] * 100, [7, 8]]})  # token ids are cut too
    assert ids.status_code == 200 and ids.headers["x-truncated-inputs"] == "1"
    p = post(servers["classify"], "/predict", {"inputs": [LONG, ["a", LONG]]})
    assert p.status_code == 200 and p.headers["x-truncated-inputs"] == "2"
    v2 = post(servers["embed"], "/v2/models/tiny-bert-embed/infer",
              {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [LONG]}]})
    assert v2.json()["parameters"] == {"truncated_inputs": 1} and v2.headers["x-truncated-inputs"] == "1"


def test_truncate_false_refuses_in_each_protocols_shape(servers):
    tei = post(servers["rerank"], "/rerank", {"query": QUERY, "texts": ["short", LONG], "truncate": False})
    assert tei.status_code == 413 and tei.json()["error_type"] == "validation"
    assert "input 1 has" in tei.json()["error"] and "32 tokens" in tei.json()["error"]
    cohere = post(servers["rerank"], "/v1/rerank", {"query": QUERY, "documents": [LONG], "truncate": False})
    assert cohere.status_code == 400 and "32 tokens" in cohere.json()["message"]
    predict = post(servers["classify"], "/predict", {"inputs": [LONG], "truncate": False})
    assert predict.status_code == 413 and predict.json()["error_type"] == "validation"


def test_predict_takes_text_pairs(servers):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(servers["dir"] / "models" / "tiny-bert-classify-3"), local_files_only=True, device="cpu")
    pairs = [["a query", "the device runs one graph"], ["hello", "world"]]
    r = post(servers["classify"], "/predict", {"inputs": [*pairs, "one text"]})
    assert r.status_code == 200, r.text
    got = r.json()
    want = ce.predict([tuple(p) for p in pairs], apply_softmax=True)
    for labels, w in zip(got[:2], want):
        scores = {x["label"]: x["score"] for x in labels}
        np.testing.assert_allclose([scores[f"label_{j}"] for j in range(3)], w, atol=2e-6)
    assert len(got[2]) == 3


def test_tokenize_decode_info_health(servers):
    run = servers["embed"]
    tok = post(run, "/tokenize", {"inputs": "hello world"}).json()
    assert [t["text"] for t in tok[0]] == ["[CLS]", "hello", "world", "[SEP]"]
    assert tok[0][1] == {"id": tok[0][1]["id"], "text": "hello", "special": False, "start": 0, "stop": 5}
    assert tok[0][0]["special"] and tok[0][0]["start"] is None
    bare = post(run, "/tokenize", {"inputs": ["hello", "world"], "add_special_tokens": False}).json()
    assert [[t["text"] for t in toks] for toks in bare] == [["hello"], ["world"]]
    ids = [t["id"] for t in tok[0]]
    assert post(run, "/decode", {"ids": ids}).json() == ["hello world"]
    assert post(run, "/decode", {"ids": [ids, ids[1:2]], "skip_special_tokens": False}).json() == [
        "[CLS] hello world [SEP]", "hello"]
    info = run.request("GET", "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 32
    assert info["max_client_batch_size"] == 8 and info["model_id"] == "tiny-bert-embed"
    rerank_info = servers["rerank"].request("GET", "/info").json()
    assert rerank_info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    h = run.request("GET", "/health")
    assert h.status_code == 200 and h.content == b""


# (route, body, status, needle) on the rerank model; the error is in the route's shape.
BAD = [
    ("/v1/rerank", {"documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"query": "q"}, 400, "documents"),
    ("/v1/rerank", {"query": "q", "documents": []}, 400, "empty"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 9}, 400, "the limit is 8"),
    ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 400, "document 0"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}, 400, "return_documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "model": "other"}, 404, "tiny-bert-rerank"),
    ("/rerank", {"query": "q"}, 400, "texts"),
    ("/rerank", {"query": 1, "texts": ["a"]}, 400, "query"),
    ("/rerank", {"query": "q", "texts": ["a", 2]}, 400, "list of strings"),
    ("/rerank", {"query": "q", "texts": ["a"] * 9}, 400, "the limit is 8"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": 1}, 400, "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 400, "Right"),
    ("/predict", {"inputs": "x"}, 404, "/v1/rerank"),
    ("/v1/embeddings", {"input": "x"}, 404, "/v1/rerank"),
    ("/v2/models/tiny-bert-rerank/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                       "data": ["a"]}]}, 404, "/v1/rerank"),
    ("/tokenize", {"inputs": 3}, 400, "inputs"),
    ("/tokenize", {"inputs": ["a"] * 9}, 400, "the limit is 8"),
    ("/decode", {"ids": [5, 100000]}, 400, "100000"),
    ("/decode", {"ids": []}, 400, "ids"),
    ("/decode", {"ids": [[1], []]}, 400, "ids"),
]


def message(path: str, body: dict) -> str:
    if path == "/v1/rerank":
        assert set(body) == {"message"}
        return body["message"]
    if path.startswith("/v2"):
        return body["error"]
    if path == "/v1/embeddings":
        return body["error"]["message"]
    assert set(body) == {"error", "error_type"}
    return body["error"]


@pytest.mark.parametrize("path, body, status, needle", BAD)
def test_bad_input_is_4xx_in_the_routes_shape_and_the_server_still_serves(servers, path, body, status, needle):
    r = post(servers["rerank"], path, body)
    assert r.status_code == status, r.text
    assert needle in message(path, r.json())
    ok = post(servers["rerank"], "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert ok.status_code == 200


def test_openapi_declares_the_new_routes(servers):
    schema = servers["embed"].request("GET", "/openapi.json").json()
    for path, request in (("/v1/rerank", "RerankRequest"), ("/rerank", "TEIRerankRequest"),
                          ("/tokenize", "TokenizeRequest"), ("/decode", "DecodeRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{request}"}
        assert request in schema["components"]["schemas"]
    assert {"/info", "/health"} <= set(schema["paths"])
