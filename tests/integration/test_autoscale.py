"""Autoscaling on a real Ray Serve, over real HTTP through its HAProxy ingress, with the CPU backend
and a tiny model: one replica to two under load and back without losing a request, and scale to
zero with the first request after it answered."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from neuronserve.serve.settings import AppArgs
from tests.fixtures.inprocess_app import tiny_artifact
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
APP = "neuronserve"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("autoscale"))


def running_replicas(app: str = APP) -> int:
    from ray import serve

    from neuronserve.serve.placement import DEPLOYMENT_NAME

    deployment = serve.status().applications[app].deployments[DEPLOYMENT_NAME]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5) -> float:
    """Poll `predicate` until true; the seconds it took. Fails naming `what` after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


class Load:
    """Client threads posting embeddings until stopped; every outcome kept. A 429 or 503 counts as
    deliberate only with Retry-After (the replica's admission, or the ingress' JSON 503)."""

    def __init__(self, url: str):
        self.url = url
        self.outcomes: Counter = Counter()
        self.unexpected: list = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, clients: int, pause_s: float = 0.0) -> threading.Event:
        stop = threading.Event()

        def loop():
            with httpx.Client(timeout=60) as c:
                while not stop.is_set() and not self.stop.is_set():
                    try:
                        r = c.post(self.url + "/v1/embeddings", json={"input": ["hello autoscaling world"] * 8})
                        if r.status_code == 200:
                            self.outcomes["200"] += 1
                        elif r.status_code in (429, 503) and r.headers.get("retry-after"):
                            self.outcomes[f"{r.status_code} with Retry-After"] += 1
                        else:
                            self.outcomes[f"{r.status_code}"] += 1
                            self.unexpected.append((r.status_code, dict(r.headers), r.text[:200]))
                    except httpx.HTTPError as e:
                        self.outcomes[type(e).__name__] += 1
                        self.unexpected.append(repr(e))
                    if pause_s:
                        stop.wait(pause_s)

        for _ in range(clients):
            t = threading.Thread(target=loop, daemon=True)
            t.start()
            self.threads.append(t)
        return stop

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)


def test_under_load_one_replica_becomes_two_and_back_without_losing_a_request(serve_instance, artifact):
    from ray import serve

    # target 1: six clients keep about six requests in flight, so the autoscaler wants the maximum;
    # one slow client keeps under one in flight, so it wants one again.
    args = AppArgs(artifacts=str(artifact), autoscale="1:2", threads_per_replica=1, max_concurrent_batches=1,
                   target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=3, batch_wait_ms=5)
    deploy(serve_instance, args, name=APP)
    try:
        wait_for(lambda: running_replicas() == 1, 30, "one replica RUNNING")
        load = Load(serve_instance)
        heavy = load.start(clients=6)
        up_s = wait_for(lambda: running_replicas() == 2, 90, "scale out to 2 replicas under load")
        time.sleep(3)  # both replicas serve a while
        heavy.set()
        # Light load goes on through the scale-in: the replica leaving has requests to drain.
        light = load.start(clients=1, pause_s=0.2)
        served_before_down = load.outcomes["200"]
        down_s = wait_for(lambda: running_replicas() == 1, 100, "scale in to 1 replica after the load")
        time.sleep(3)  # requests keep arriving after the replica left
        light.set()
        load.finish()
        print(f"scaled out in {up_s:.1f} s, in {down_s:.1f} s after the load dropped; outcomes {dict(load.outcomes)}")
        assert load.outcomes["200"] > served_before_down > 0
        assert not load.unexpected, load.unexpected[:5]
    finally:
        serve.delete(APP)


def test_scale_to_zero_then_the_first_request_is_answered(serve_instance, artifact):
    from ray import serve

    args = AppArgs(artifacts=str(artifact), autoscale="0:1", threads_per_replica=1, max_concurrent_batches=1,
                   upscale_delay_s=0, downscale_delay_s=5)
    deploy(serve_instance, args, name=APP)  # one replica to start with, so the app is known to load
    try:
        # The replica stays 5 s after the last request (the readiness poll): time to see it.
        # Serve's status may say STARTING a moment after the replica answers: see it RUNNING first,
        # then gone for three polls in a row.
        wait_for(lambda: running_replicas() == 1, 30, "the first replica RUNNING")
        first = httpx.get(serve_instance + "/v2/health/ready", timeout=10).json()["replica"]
        zeros = []
        gone_s = wait_for(lambda: zeros.append(running_replicas() == 0) or zeros[-3:] == [True] * 3, 90,
                          "scale to zero when idle")
        # No replica to answer: HAProxy hands the request to its backup, Serve's own proxy, which
        # holds it while the autoscaler starts a replica.
        t0 = time.monotonic()
        with httpx.Client(timeout=120) as c:
            r = c.post(serve_instance + "/v1/embeddings", json={"input": ["the first request after zero"]})
        first_s = time.monotonic() - t0
        print(f"scaled to zero {gone_s:.1f} s after ready; first response from zero in {first_s:.2f} s "
              f"({r.status_code})")
        assert r.status_code == 200, (r.status_code, r.headers, r.text[:300])
        assert len(r.json()["data"][0]["embedding"]) > 0
        # A new replica answered: the first one had gone.
        assert httpx.get(serve_instance + "/v2/health/ready", timeout=10).json()["replica"] != first
    finally:
        serve.delete(APP)


def test_the_command_autoscales_answers_and_refuses_a_fixed_count_with_it(artifact):
    import subprocess
    import sys

    from tests.fixtures.ports import free_port
    from tests.integration.conftest import start_server, stop_server

    both = subprocess.run([sys.executable, "-m", "neuronserve", "serve", "--artifacts", str(artifact),
                           "--autoscale", "1:2", "--replicas", "2"], capture_output=True, text=True, timeout=60)
    assert both.returncode == 2
    assert "--replicas 2 and --autoscale 1:2" in both.stderr and "Traceback" not in both.stderr

    port = free_port()
    proc, out, stderr = start_server(artifact, port, 0, "--autoscale", "0:2", "--downscale-delay-s", "20")
    try:
        assert any("shorter than a replica's warm-up" in line for line in stderr), stderr[-5:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["autoscaled"]}, timeout=60)
        assert r.status_code == 200, r.text[:300]
    finally:
        stop_server(proc)
    assert proc.returncode == 0
