"""A catalog of three models on a replica with room for two, over real HTTP on a real Ray Serve:
models load on demand and the least recently used is unloaded (Ray Serve model multiplexing),
every answer right, loads and evictions counted."""

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
from tests.integration.test_multi_model import samples

pytestmark = pytest.mark.integration
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    out = {}
    for name, family in zip(NAMES, ("bert", "roberta", "distilbert")):
        model = make_tiny_model(root, family=family, task="embed")
        out[name] = compile_artifact(CompileOptions(model=str(model), buckets=parse_buckets("1x16,4x32"),
                                                    out=root / f"art-{name}")).out_dir
    return out


def loaded(url) -> list[str]:
    r = httpx.get(url + "/v2/health/ready", timeout=30)
    assert r.status_code == 200, (r.status_code, r.text)
    assert "loaded" in r.json(), r.text
    return r.json()["loaded"]


def embed(url, name, texts):
    r = httpx.post(url + "/v1/embeddings", json={"model": name, "input": texts}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name
    return np.array([d["embedding"] for d in r.json()["data"]])


def test_three_models_with_room_for_two_load_on_demand_least_recently_used_out(serve_instance, catalog, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    deploy(serve_instance, AppArgs(artifacts=[f"{n}={catalog[n]}" for n in NAMES], max_models_per_replica=2,
                                   num_replicas=1, threads_per_replica=1, instance_type="inf2.xlarge",
                                   metrics_dir=str(metrics_dir)))
    url = serve_instance
    texts = ["loaded on demand", "hello"]
    want = {n: Engine(catalog[n], "cpu").embed(texts) for n in NAMES}
    assert loaded(url) == ["a", "b"]  # the first two, at start
    assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == NAMES
    assert [m["name"] for m in httpx.get(url + "/v2/models", timeout=30).json()["models"]] == NAMES

    assert np.allclose(embed(url, "c", texts), want["c"], atol=1e-5)  # loads c; a was used least recently
    assert loaded(url) == ["b", "c"]
    assert np.allclose(embed(url, "b", texts), want["b"], atol=1e-5)  # b is now the most recently used
    assert np.allclose(embed(url, "a", texts), want["a"], atol=1e-5)  # loads a; out goes c, not b
    assert sorted(loaded(url)) == ["a", "b"]
    s = samples(metrics_dir)
    assert {n: s.get(("neuronserve_model_loads_total", n)) for n in NAMES} == {"a": 2, "b": 1, "c": 1}
    assert {n: s.get(("neuronserve_model_evictions_total", n), 0) for n in NAMES} == {"a": 1, "b": 0, "c": 1}
    # Unknown names are still a 404 listing the catalog.
    r = httpx.post(url + "/v1/embeddings", json={"model": "d", "input": "x"}, timeout=30)
    assert r.status_code == 404 and "a, b, c" in r.json()["error"]["message"]

    # All three at once from several clients: models come and go under load, nothing fails.
    results, stop = [], threading.Event()

    def client(i):
        with httpx.Client(timeout=120) as c:
            k = i
            while not stop.is_set():
                name = NAMES[k % 3]
                k += 1
                r = c.post(url + "/v1/embeddings", json={"model": name, "input": texts})
                ok = r.status_code == 200 and np.allclose([d["embedding"] for d in r.json()["data"]], want[name], atol=1e-5)
                results.append((name, r.status_code, ok))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(results) < 60:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(120)
    assert len(results) >= 60 and all(ok for _, _, ok in results), [r for r in results if not r[2]][:5]
    assert {n for n, _, _ in results} == set(NAMES)
    assert len(loaded(url)) <= 2
    s = samples(metrics_dir)
    assert sum(s.get(("neuronserve_model_evictions_total", n), 0) for n in NAMES) > 2  # they did come and go


def test_with_two_replicas_each_request_goes_to_a_replica_that_holds_its_model(serve_instance, catalog, tmp_path):
    """Two replicas with room for two of the three models each: once c is loaded on one of them,
    requests for a and c arriving at either replica (HAProxy picks) are answered where their model
    is, through Serve's router, instead of loading it again."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    deploy(serve_instance, AppArgs(artifacts=[f"{n}={catalog[n]}" for n in NAMES], max_models_per_replica=2,
                                   num_replicas=2, threads_per_replica=1, metrics_dir=str(metrics_dir)))
    url = serve_instance
    from neuronserve.serve.serve_cli import wait_ready

    assert wait_ready(url, 120, threading.Event(), replicas=2, settle_polls=10_000)

    def counts():
        s = samples(metrics_dir)
        return (sum(s.get(("neuronserve_model_loads_total", n), 0) for n in NAMES),
                sum(s.get(("neuronserve_model_evictions_total", n), 0) for n in NAMES))

    assert counts() == (4, 0)  # a and b on each replica
    texts = ["which replica holds me"]
    want = {n: Engine(catalog[n], "cpu").embed(texts) for n in NAMES}
    assert np.allclose(embed(url, "c", texts), want["c"], atol=1e-5)
    assert counts() == (5, 1)  # c loaded on one replica, a unloaded there
    # Serve's router learns which replica holds which model within a fraction of a second.
    deadline = time.monotonic() + 30
    quiet = 0
    while time.monotonic() < deadline and quiet < 10:
        before = counts()
        for name in ("a", "c"):
            assert np.allclose(embed(url, name, texts), want[name], atol=1e-5)
        quiet = quiet + 1 if counts() == before else 0
    assert quiet >= 10, counts()
    loads, evictions = counts()
    for _ in range(20):  # twenty more of each, from either replica: no model is loaded again
        for name in ("a", "c", "b"):
            assert np.allclose(embed(url, name, texts), want[name], atol=1e-5)
    assert counts() == (loads, evictions) and loads <= 7, counts()
