"""`--host-processes 2` over real HTTP on a real Ray Serve: two host processes answer HTTP and
tokenize, one device replica (a simulated NeuronCore, 40 ms per batch) runs every batch. Each
request gets its own outputs, a full device queue is a 429 for the requests that do not fit (never
a 500), requests are counted where they are answered and batches and cores where they run, and
requests in flight when the application is removed are all answered."""

import concurrent.futures
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

TEXTS = ["a", "two words", "a few more words here", "this text is quite a bit longer than the others are",
         "short one", "and another sentence of middling length"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostproc")
    model = make_tiny_model(root / "model")
    return compile_artifact(CompileOptions(model=str(model), buckets=parse_buckets("1x16,4x16,4x32"),
                                           out=root / "art")).out_dir


@pytest.fixture(scope="module")
def server(serve_instance, artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostproc-run")
    profile = root / "slow.json"
    profile.write_text('{"name": "slow", "fixed_ms": 40, "per_padded_token_us": 0, "source": "test"}')
    metrics_dir = root / "metrics"
    metrics_dir.mkdir()
    args = AppArgs(artifacts=str(artifact), backend="simulated", device_profile=str(profile), host_processes=2,
                   num_replicas=1, max_queued_rows=8, instance_type="inf2.xlarge", metrics_dir=str(metrics_dir))
    deploy(serve_instance, args)
    return serve_instance, metrics_dir


def embed(url: str, text: str) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"input": text}, timeout=60, headers={"Connection": "close"})


def test_two_host_processes_answer_for_one_device_replica(server):
    from ray import serve

    url, _ = server
    deployments = serve.status().applications["neuronserve"].deployments
    assert sum(deployments["NeuronServe"].replica_states.values()) == 2
    assert sum(deployments["NeuronDevice"].replica_states.values()) == 1
    seen = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:  # new connections spread over both
        r = httpx.get(url + "/v2/health/ready", headers={"Connection": "close"}, timeout=10)
        if r.status_code == 503 and r.json()["error"] == "warming up":  # deploy() waited for one of them
            time.sleep(0.2)
            continue
        assert r.status_code == 200, r.text
        seen[r.json()["replica"]] = r.json()
    assert len(seen) == 2
    for body in seen.values():
        assert body["backend"]["host_process"] is True and "SIMULATED" in body["backend"]["device"]


def test_each_request_gets_its_own_outputs_when_many_go_in_one_call(server, artifact):
    url, _ = server
    want = {t: Engine(artifact, "simulated", backend_options={"profile": "zero"}).embed([t])[0] for t in TEXTS}
    texts = TEXTS * 6
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # at most the 8 rows the device queues
        responses = list(pool.map(lambda t: embed(url, t), texts))
    for text, r in zip(texts, responses):
        assert r.status_code == 200, r.text
        got = np.array(r.json()["data"][0]["embedding"])
        assert np.allclose(got, want[text], atol=1e-6), text
        assert float(r.headers["x-inference-time"]) >= 30  # the device replica's batch time came back


def test_a_full_device_queue_is_a_429_for_the_requests_that_do_not_fit(server):
    url, _ = server
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda i: embed(url, TEXTS[i % len(TEXTS)]), range(48)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)][:3]
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["type"] == "overloaded_error"


def test_requests_count_where_answered_and_batches_and_cores_where_they_run(server):
    url, metrics_dir = server
    before = samples(metrics_dir)
    n = 10
    for i in range(n):
        assert embed(url, TEXTS[i % len(TEXTS)]).status_code == 200
    after = samples(metrics_dir)
    model = next(m for (name, m) in after if name == "neuronserve_requests_total")

    def grew(name):
        return after.get((name, model), 0.0) - before.get((name, model), 0.0)

    assert grew("neuronserve_requests_total") == n
    assert grew("neuronserve_batches_total") >= 1
    assert grew("neuronserve_device_busy_seconds_total") >= 0.03
    assert after[("neuronserve_cores_in_use", "")] == 1  # the device replica's; the host processes hold none


def test_requests_in_flight_when_the_app_is_removed_are_all_answered(server):
    from ray import serve

    url, _ = server
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(embed, url, TEXTS[i % len(TEXTS)]) for i in range(6)]
        time.sleep(0.3)  # accepted, waiting for the 40 ms batches
        serve.delete("neuronserve")
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 6
