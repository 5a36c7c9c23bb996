"""Production hardening on a real Ray Serve, over real HTTP through its HAProxy ingress, with
the CPU backend: API keys (the official OpenAI client, every route's 401, the loadtest command),
request ids through the ingress, and a replica process killed under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from neuronserve.serve.settings import AppArgs
from tests.fixtures.inprocess_app import tiny_artifact
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
KEYS = "integration-key-1,integration-key-2"
MODEL = "tiny-bert-embed"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def keyed(serve_instance, artifact):
    deploy(serve_instance, AppArgs(artifacts=str(artifact), num_replicas=1, threads_per_replica=1, api_key=KEYS))
    return serve_instance


def test_the_openai_client_with_the_right_key_works_and_a_wrong_one_is_an_authentication_error(keyed):
    import openai  # the test extra's
    client = openai.OpenAI(base_url=keyed + "/v1", api_key="integration-key-2", max_retries=0)
    result = client.embeddings.create(model=MODEL, input=["hello world", "a"])
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) == 32
    assert [m.id for m in client.models.list().data] == [MODEL]
    wrong = openai.OpenAI(base_url=keyed + "/v1", api_key="integration-key-3", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.embeddings.create(model=MODEL, input="hello")
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("method, path, body, shape", [
    ("POST", "/v1/embeddings", {"input": "hi"}, "openai"),
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/predict", {"inputs": "hi"}, "tei"),
    ("GET", "/v2", None, "v2"),
    ("GET", f"/v2/models/{MODEL}", None, "v2"),
    ("POST", f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "v2"),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a"]}, "cohere"),
    ("POST", "/rerank", {"query": "q", "texts": ["a"]}, "tei"),
    ("POST", "/tokenize", {"inputs": "hi"}, "tei"),
    ("POST", "/decode", {"ids": [101]}, "tei"),
    ("GET", "/info", None, "tei"),
])
def test_a_missing_key_is_401_in_the_routes_shape_through_the_ingress(keyed, method, path, body, shape):
    r = httpx.request(method, keyed + path, json=body, headers={"x-request-id": "ingress-id-1"}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.headers.get_list("x-request-id") == ["ingress-id-1"]  # one id, the client's, through HAProxy
    answer = r.json()
    message = {"openai": lambda: answer["error"]["message"], "cohere": lambda: answer["message"]}.get(
        shape, lambda: answer["error"])()
    assert "missing API key" in message and (shape != "tei" or answer["error_type"] == "invalid_request_error")
    ok = httpx.request(method, keyed + path, json=body, timeout=30,
                       headers={"authorization": "Bearer integration-key-1"})
    assert ok.status_code != 401, ok.text


def test_health_is_open_and_every_answer_has_one_request_id(keyed):
    for path in ("/v2/health/live", "/v2/health/ready", "/health"):
        r = httpx.get(keyed + path, timeout=30)
        assert r.status_code == 200 and len(r.headers.get_list("x-request-id")) == 1
    r = httpx.post(keyed + "/v1/embeddings", json={"input": "hi"}, timeout=30,
                   headers={"authorization": "Bearer integration-key-1"})
    ids = r.headers.get_list("x-request-id")
    assert r.status_code == 200 and len(ids) == 1 and 32 <= len(ids[0]) <= 36  # Serve makes it: a uuid4


def test_loadtest_without_a_key_says_so_and_with_the_variable_runs(keyed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NEURONSERVE_API_KEY"}
    cmd = [sys.executable, "-m", "neuronserve", "loadtest", "--url", keyed, "--concurrency", "2", "--duration", "1s",
           "--warmup", "0", "--no-progress"]
    no_key = subprocess.run([*cmd, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=120)
    assert no_key.returncode == 1 and "requires an API key (HTTP 401); pass --api-key" in no_key.stderr, no_key.stderr
    keyed_run = subprocess.run([*cmd, "--out", str(tmp_path / "b")], env={**env, "NEURONSERVE_API_KEY": KEYS},
                               capture_output=True, text=True, timeout=120)
    assert keyed_run.returncode == 0, keyed_run.stderr
    assert "integration-key" not in (tmp_path / "b" / "sweep.json").read_text()


# -- a replica process killed under load ------------------------------------------------------------
def replica_pids() -> dict[str, int]:
    """{replica id: pid} of the app's live replicas, from Ray (named actors, asked for their pid)."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if "SERVE_REPLICA" in name and "NeuronServe" in name:
            handle = ray.get_actor(name, namespace=actor["namespace"])
            try:
                pids[name.rsplit("#", 1)[-1]] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
            except Exception:  # a replica going away
                continue
    return pids


def replica_starts(metrics_dir) -> float:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(metrics_dir))
    return sum(s.value for m in reg.collect() if m.name == "neuronserve_replica_starts"
               for s in m.samples if s.name.endswith("_total"))


def test_a_replica_killed_under_load_fails_fast_the_others_serve_and_ray_restarts_it(serve_instance, artifact, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    timeout_s = 10.0
    # batch_wait_ms holds rows a while on each replica, so requests are queued there when it dies.
    deploy(serve_instance, AppArgs(artifacts=str(artifact), num_replicas=2, threads_per_replica=1, batch_wait_ms=50,
                                   request_timeout_s=timeout_s, metrics_dir=str(metrics_dir)))
    url = serve_instance
    from neuronserve.serve.serve_cli import wait_ready

    assert wait_ready(url, 120, threading.Event(), replicas=2, settle_polls=10_000)  # both warm
    before = replica_pids()
    assert len(before) == 2, before
    assert replica_starts(metrics_dir) == 2

    results: list[tuple[float, float, object]] = []  # (sent, seconds, status or exception name)
    failures: list[tuple] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client(timeout=timeout_s + 20) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(url + "/v1/embeddings", json={"input": ["hello world"] * 4})
                    outcome: object = r.status_code
                    if r.status_code != 200:  # who answered: our JSON, or the ingress' plain text
                        failures.append((r.status_code, r.headers.get("content-type"), r.text[:300]))
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                results.append((t0, time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim_id, victim_pid = sorted(before.items())[0]
    killed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(timeout_s + 30)

    outcomes = Counter(o for _, _, o in results)
    after_kill = [(t0, s, o) for t0, s, o in results if t0 >= killed_at]
    print("outcomes:", dict(outcomes), "after the kill:", dict(Counter(o for *_, o in after_kill)),
          "answers other than 200:", failures, "failed (since the kill, took):", [(round(t0 - killed_at, 3), round(s, 3), o) for t0, s, o in results if o != 200])
    assert max(s for _, s, _ in results) < timeout_s + 5, "a request hung past request_timeout_s"
    failed = [(t0, s, o) for t0, s, o in results if o != 200]
    # What arrives for a request the dead replica held: HAProxy's 502, which the local server's
    # HAProxy set-up answers as a JSON 503 with Retry-After (Ray's own config: a plain-text 500), or
    # the connection closed without an answer.
    assert {o for *_, o in failed} <= {503, "RemoteProtocolError", "ReadError"}, (outcomes, failures)
    assert all(ct == "application/json" and '"service_unavailable"' in text for code, ct, text in failures), failures
    # Only requests in flight at the kill, or sent in the moment after it on HAProxy's kept-alive
    # connections to the dead replica (not retried: the request was already sent), failed; the
    # rest were unaffected.
    assert all(t0 + s >= killed_at and t0 <= killed_at + 1.0 for t0, s, _ in failed), (killed_at, failed)
    assert len(failed) <= 3 * len(threads), failed
    late = [o for t0, _, o in after_kill if t0 >= killed_at + 2]
    assert late and Counter(late)[200] == len(late), Counter(late)  # the other replica serves everything

    # Ray replaces the replica: a new id, readiness from both, and the start counted.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = replica_pids()
        if len(now) == 2 and victim_id not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and victim_id not in now and victim_pid not in now.values(), now
    seen = set()
    with httpx.Client(timeout=10, headers={"Connection": "close"}) as c:
        while time.monotonic() < deadline and len(seen) < 2:
            r = c.get(url + "/v2/health/ready")
            if r.status_code == 200:
                seen.add(r.json()["replica"])
            time.sleep(0.2)
    assert seen == set(now), (seen, now)
    assert replica_starts(metrics_dir) == 3


def test_no_key_in_what_serve_shows(keyed):
    """Serve's details of the running application (what its dashboard and REST API show): no key."""
    import json

    from ray.serve.context import _get_global_client

    details = json.dumps(_get_global_client().get_serve_details(), default=str)
    assert MODEL in details or "NeuronServe" in details  # it is the keyed application's
    assert "integration-key" not in details


def test_neuronserve_serve_reads_a_key_file(artifact, tmp_path):
    """The command: --api-key-file, read by the replicas it starts."""
    from tests.fixtures.ports import free_port
    from tests.integration.conftest import start_server

    keys = tmp_path / "keys"
    keys.write_text("# one per line\nfile-key-0001\n")
    port = free_port()
    proc, _, _ = start_server(artifact, port, 0, "--api-key-file", str(keys))
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"input": "hello"}
        assert httpx.post(url + "/v1/embeddings", json=body, timeout=30).status_code == 401
        ok = httpx.post(url + "/v1/embeddings", json=body, timeout=30, headers={"authorization": "Bearer file-key-0001"})
        assert ok.status_code == 200, ok.text
        assert httpx.get(url + "/v2/health/ready", timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
