"""Several models in one replica over real HTTP on a real Ray Serve: routing by the request's
`model`, 404s listing the models served, the listings, both models progressing under contention
for the one device, and per-model metrics whose cost split sums to the replica's cost."""

import threading
import time

import httpx
import numpy as np
import pytest

from neuronserve.compile.compiler import CompileOptions, compile_artifact
from neuronserve.models.artifact import parse_buckets
from neuronserve.serve.engine import Engine
from neuronserve.serve.settings import AppArgs
from tests.fixtures.tiny_models import make_tiny_model
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
NAMES = ["emb", "emb2", "cls", "rr"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    out = {}
    for name, family, task in (("emb", "bert", "embed"), ("emb2", "roberta", "embed"), ("cls", "roberta", "classify"),
                               ("rr", "bert", "rerank")):
        model = make_tiny_model(root, family=family, task=task)
        out[name] = compile_artifact(CompileOptions(model=str(model), task=task, buckets=parse_buckets("1x16,4x16,4x32"),
                                                    out=root / f"art-{name}")).out_dir
    return out


@pytest.fixture(scope="module")
def server(serve_instance, artifacts, tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("metrics")
    args = AppArgs(artifacts=[f"{n}={artifacts[n]}" for n in NAMES], num_replicas=1, threads_per_replica=1,
                   instance_type="inf2.xlarge", metrics_dir=str(metrics_dir))
    deploy(serve_instance, args)
    return serve_instance, metrics_dir


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=60)


def samples(metrics_dir) -> dict[tuple[str, str], float]:
    """(sample name, model) -> value summed over the other labels, from the replicas' files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(metrics_dir))
    out: dict[tuple[str, str], float] = {}
    for family in reg.collect():
        for s in family.samples:
            key = (s.name, s.labels.get("model", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_requests_route_by_model_name_on_every_protocol(server, artifacts):
    url, _ = server
    texts = ["routing by model name", "hello"]
    for name in ("emb", "emb2"):
        r = post(url, "/v1/embeddings", {"model": name, "input": texts})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        got = np.array([d["embedding"] for d in r.json()["data"]])
        want = Engine(artifacts[name], "cpu").embed(texts)
        assert np.allclose(got, want, atol=1e-5)
        v2 = post(url, f"/v2/models/{name}/infer",
                  {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]})
        assert v2.status_code == 200 and v2.json()["model_name"] == name
        assert np.allclose(np.array(v2.json()["outputs"][0]["data"]).reshape(2, -1), want, atol=1e-5)
    # The two embedders answer differently: each request reached its own model.
    a = post(url, "/v1/embeddings", {"model": "emb", "input": "x"}).json()["data"][0]["embedding"]
    b = post(url, "/v1/embeddings", {"model": "emb2", "input": "x"}).json()["data"][0]["embedding"]
    assert not np.allclose(a, b)
    # No `model`: the first model served whose task the route serves.
    assert post(url, "/v1/embeddings", {"input": "x"}).json()["model"] == "emb"
    named = post(url, "/predict", {"inputs": texts, "model": "cls"})
    unnamed = post(url, "/predict", {"inputs": texts})
    assert named.status_code == unnamed.status_code == 200 and named.json() == unnamed.json()
    want = Engine(artifacts["cls"], "cpu").classify(texts)
    assert [row[0]["label"] for row in named.json()] == [label for label, _ in want]
    v2 = post(url, "/v2/models/cls/infer", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]})
    assert v2.json()["model_name"] == "cls"
    # The embedder and the reranker of a retrieval stack, side by side: Cohere's shape names the
    # model, TEI's does not (the first reranker served), and both score alike.
    docs = ["a document about serving", "hello", "something else entirely"]
    cohere = post(url, "/v1/rerank", {"model": "rr", "query": "serving", "documents": docs})
    assert cohere.status_code == 200, cohere.text
    tei = post(url, "/rerank", {"query": "serving", "texts": docs})
    assert tei.status_code == 200, tei.text
    by_index = {r["index"]: r["relevance_score"] for r in cohere.json()["results"]}
    assert len(by_index) == 3
    assert all(abs(by_index[r["index"]] - r["score"]) < 1e-5 for r in tei.json())
    assert post(url, "/v1/rerank", {"model": "emb", "query": "q", "documents": docs}).status_code == 404
    # A model of another task on a route: that route's own 404.
    wrong = post(url, "/v1/embeddings", {"model": "cls", "input": "x"})
    assert wrong.status_code == 404 and "/predict" in wrong.json()["error"]["message"]


def test_an_unknown_model_is_a_404_in_the_routes_shape_listing_those_served(server):
    url, _ = server
    r = post(url, "/v1/embeddings", {"model": "nope", "input": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'nope'" in err["message"] and "emb, emb2, cls, rr" in err["message"]
    r = post(url, "/predict", {"model": "nope", "inputs": "x"})
    assert r.status_code == 404 and "emb, emb2, cls, rr" in r.json()["error"] and "error_type" in r.json()
    r = post(url, "/v2/models/nope/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
    assert r.status_code == 404 and "emb, emb2, cls, rr" in r.json()["error"]
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        r = httpx.get(url + path, timeout=30)
        assert r.status_code == 404 and "emb, emb2, cls, rr" in r.json()["error"], path
    # The server is healthy after them.
    assert post(url, "/v1/embeddings", {"model": "emb2", "input": "x"}).status_code == 200


def test_listings_name_every_model(server):
    url, _ = server
    assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == NAMES
    index = httpx.get(url + "/v2/models", timeout=30).json()["models"]
    assert [m["name"] for m in index] == NAMES
    assert [m["outputs"][0]["name"] for m in index] == ["embedding", "embedding", "label", "label"]
    for name in NAMES:
        assert httpx.get(f"{url}/v2/models/{name}", timeout=30).json()["name"] == name
        assert httpx.get(f"{url}/v2/models/{name}/ready", timeout=30).json() == {"name": name, "ready": True}
    assert httpx.get(url + "/v2/health/ready", timeout=30).json()["models"] == NAMES


def test_both_models_progress_under_contention_and_metrics_are_per_model(server):
    url, metrics_dir = server
    before, t_before = samples(metrics_dir), time.monotonic()
    done = {"emb": 0, "emb2": 0}
    failed = []
    stop = threading.Event()

    def client(name):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(url + "/v1/embeddings", json={"model": name, "input": ["a longer text to fill a bucket"] * 4})
                if r.status_code == 200:
                    done[name] += 1
                else:
                    failed.append((name, r.status_code, r.text[:200]))

    # Three clients on emb, one on emb2: emb2 must still progress while emb floods the device.
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in ("emb", "emb", "emb", "emb2")]
    for t in threads:
        t.start()
    # Several of the replica's once-a-second cost ticks fall inside the window.
    started, deadline = time.monotonic(), time.monotonic() + 30
    while time.monotonic() < deadline and (min(done.values()) < 20 or time.monotonic() - started < 4):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(60)
    assert not failed, failed[:3]
    assert min(done.values()) >= 20, done
    after, t_after = samples(metrics_dir), time.monotonic()

    def grew(sample, model):
        return after.get((sample, model), 0.0) - before.get((sample, model), 0.0)

    for name in ("emb", "emb2"):
        assert grew("neuronserve_requests_total", name) >= done[name]
        assert grew("neuronserve_device_busy_seconds_total", name) > 0
        assert grew("neuronserve_rows_total", name) >= 4 * done[name]
        assert after[("neuronserve_model_loads_total", name)] == 1
    assert after[("neuronserve_model_loads_total", "cls")] == 1
    # The replica's allocated cost is split between its models by device time, and the shares
    # add up to what the replica's cores cost for the window (ticks come once a second).
    from neuronserve.common.pricing import get_instance, price_per_hour

    window_s = t_after - t_before
    per_core_s = price_per_hour("inf2.xlarge") / 3600 / get_instance("inf2.xlarge").cores
    cores = after[("neuronserve_cores_in_use", "")]  # the replica's, counted once for its three models
    assert cores >= 1
    grown = sum(grew("neuronserve_cost_allocated_usd_total", n) for n in NAMES)
    assert window_s - 2.5 < grown / (per_core_s * cores) < window_s + 2.5, (grown, window_s, cores)
    busy = {n: grew("neuronserve_device_busy_seconds_total", n) for n in ("emb", "emb2")}
    share = {n: grew("neuronserve_cost_allocated_usd_total", n) for n in ("emb", "emb2")}
    # Seconds with batches running split by their device time; idle seconds of the window (before
    # the load starts and after it ends, within a tick) by the device seconds so far
    # (`metrics.split_cost`). So emb's share lies between its share of the window's device time and
    # its share of all device time up to the window's end.
    total = {n: after[("neuronserve_device_busy_seconds_total", n)] for n in ("emb", "emb2")}
    bounds = sorted((busy["emb"] / sum(busy.values()), total["emb"] / sum(total.values())))
    got = share["emb"] / sum(share.values())
    assert bounds[0] - 0.1 <= got <= bounds[1] + 0.1, (share, busy, total)


def test_loadtest_weighted_mix_reports_each_model(server, tmp_path):
    import json
    import subprocess
    import sys

    url, _ = server
    out = tmp_path / "lt"
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve", "loadtest", "--url", url, "--model", "emb=0.75,emb2=0.25",
         "--concurrency", "2", "--duration", "2s", "--warmup", "0s", "--instance-type", "inf2.xlarge",
         "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metadata"]["mix"] == {"emb": 0.75, "emb2": 0.25}
    (step,) = sweep["steps"]
    models = step["models"]
    assert set(models) == {"emb", "emb2"} and step["failed"] == 0
    assert sum(m["succeeded"] for m in models.values()) == step["succeeded"] > 8
    assert abs(models["emb"]["succeeded"] / step["succeeded"] - 0.75) < 0.1
    assert all(m["latency_ms"]["p50"] > 0 and m["usd_per_1m_requests"] > 0 for m in models.values())
    assert "## Per model" in (out / "report.md").read_text()


def run_serve(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "neuronserve", "serve", *args, "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=120)


def test_serve_refuses_before_starting_ray_a_set_that_does_not_fit_or_shares_a_name(artifacts):
    from neuronserve.models.artifact import load_manifest

    big = run_serve("--artifacts", f"emb={artifacts['emb']}", "--artifacts", f"cls={artifacts['cls']}",
                    "--device-memory-gib", "0.0001")
    assert big.returncode != 0
    line = big.stderr.strip().splitlines()[-1]
    sizes = {n: load_manifest(artifacts[n]).device_memory.total_bytes / 2**20 for n in ("emb", "cls")}
    assert sizes["emb"] > 0.1 and sizes["cls"] > 0.1
    assert f"emb {sizes['emb']:.1f} MiB" in line and f"cls {sizes['cls']:.1f} MiB" in line, line
    assert "device_memory_gib=0.0001" in line and "Ray" not in big.stderr
    same = run_serve("--artifacts", str(artifacts["emb"]), "--artifacts", str(artifacts["emb"]))
    assert same.returncode != 0 and "two artifacts serve the model name 'tiny-bert-embed'" in same.stderr


def test_the_serve_command_serves_several_artifacts(artifacts):
    """`neuronserve serve --artifacts A --artifacts NAME=B`: one unnamed (the manifest's name), one
    named; the banner lists both and each answers by its name."""
    from tests.fixtures.ports import free_port
    from tests.integration.conftest import start_server, stop_server

    port = free_port()
    proc, out, _ = start_server(artifacts["emb"], port, free_port(), "--artifacts", f"cls={artifacts['cls']}")
    try:
        banner = "".join(out)
        assert "2 models (tiny-bert-embed, cls" in banner, banner
        url = f"http://127.0.0.1:{port}"
        r = post(url, "/v1/embeddings", {"model": "tiny-bert-embed", "input": "x"})
        assert r.status_code == 200 and r.json()["model"] == "tiny-bert-embed"
        r = post(url, "/predict", {"model": "cls", "inputs": "x"})
        assert r.status_code == 200 and len(r.json()) == 3
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == ["tiny-bert-embed", "cls"]
    finally:
        stop_server(proc)
    assert proc.returncode == 0
