"""A classifier served over HTTP (TEI-style /predict and KServe v2), and `neuronserve loadtest`
driving the real server for a few seconds."""

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from neuronserve.compile.compiler import CompileOptions, compile_artifact
from neuronserve.models.artifact import parse_buckets
from neuronserve.serve.settings import AppArgs
from tests.fixtures.tiny_models import make_tiny_model
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
TEXTS = ["the quick brown fox", "model serving on inferentia keeps padding low", "hello"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    model = make_tiny_model(root, family="roberta", task="classify", num_labels=3)
    out = compile_artifact(CompileOptions(model=str(model), task="classify", buckets=parse_buckets("1x16,4x16,2x32"), out=root / "art"))
    return model, out.out_dir


def eager_probs(model_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return np.stack([model(**tok(t, return_tensors="pt")).logits[0].softmax(-1).numpy() for t in texts])


def test_predict_and_v2_match_the_eager_classifier(serve_instance, classifier):
    model_dir, artifact = classifier
    deploy(serve_instance, AppArgs(artifacts=str(artifact), num_replicas=1, threads_per_replica=1))
    want = eager_probs(model_dir, TEXTS)
    r = httpx.post(serve_instance + "/predict", json={"inputs": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    ranked = r.json()
    assert len(ranked) == 3 and all(len(row) == 3 for row in ranked)
    for row, p in zip(ranked, want):
        assert row[0]["label"] == f"label_{p.argmax()}" and abs(row[0]["score"] - p.max()) < 1e-4
        assert [x["score"] for x in row] == sorted((x["score"] for x in row), reverse=True)
    single = httpx.post(serve_instance + "/predict", json={"inputs": TEXTS[0]}, timeout=60).json()
    assert single[0]["label"] == ranked[0][0]["label"]
    raw = httpx.post(serve_instance + "/predict", json={"inputs": TEXTS[0], "raw_scores": True}, timeout=60).json()
    assert [x["label"] for x in raw] == ["label_0", "label_1", "label_2"]
    v2 = httpx.post(f"{serve_instance}/v2/models/tiny-roberta-classify-3/infer", timeout=60,
                    json={"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS}]}).json()
    labels = {o["name"]: o for o in v2["outputs"]}
    assert labels["label"]["data"] == [f"label_{i}" for i in want.argmax(1)]
    assert np.allclose(labels["score"]["data"], want.max(1), atol=1e-4)
    wrong = httpx.post(serve_instance + "/v1/embeddings", json={"input": "x"}, timeout=60)
    assert wrong.status_code == 404 and "/predict" in wrong.json()["error"]["message"]
    bad = httpx.post(serve_instance + "/predict", json={"text": "x"}, timeout=60)
    assert bad.status_code == 400 and "inputs" in bad.json()["error"]


def test_loadtest_against_the_real_server(serve_instance, minilm_artifact, tmp_path):
    deploy(serve_instance, AppArgs(artifacts=str(minilm_artifact), num_replicas=1, threads_per_replica=1))
    out = tmp_path / "lt"
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve", "loadtest", "--url", serve_instance, "--concurrency", "1,4",
         "--duration", "3s", "--warmup", "1s", "--workload", "mixed", "--instance-type", "inf2.xlarge",
         "--slo-p99-ms", "2000", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metadata"]["model"] == "all-MiniLM-L6-v2"
    for step in sweep["steps"]:
        assert step["succeeded"] > 0 and step["sent"] == step["succeeded"]
        assert step["tokens_source"] == "server" and step["tokens_per_s"] > 0
        p = step["latency_ms"]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"]
        assert step["usd_per_1m_requests"] == pytest.approx(1e6 / step["achieved_rps"] * 0.7582 / 3600, rel=1e-3)
    for png in ("latency_vs_throughput.png", "latency_cdf.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "| c=4 |" in (out / "report.md").read_text() or "c=4" in (out / "report.md").read_text()
