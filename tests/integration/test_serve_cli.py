"""`neuronserve serve` as a user runs it: a subprocess with its own Ray, metrics, and SIGTERM drain."""

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest

from tests.integration.conftest import free_port, start_server

pytestmark = pytest.mark.integration


def test_serve_prints_how_to_call_it_exports_metrics_and_drains_on_sigterm(minilm_artifact):
    port, mport = free_port(), free_port()
    proc, out, stderr = start_server(minilm_artifact, port, mport)
    try:
        banner = "".join(out)
        assert f"http://127.0.0.1:{port}" in banner and "curl" in banner and "/v1/embeddings" in banner
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(url + "/v1/embeddings", json={"input": "warm"}, timeout=60).status_code == 200

        # In-flight work at the moment of SIGTERM: 6 requests of 16 long texts (~25k tokens).
        texts = [" ".join(["draining keeps every accepted request"] * 45) + f" {i}" for i in range(16)]
        with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16)) as client, cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client.post, url + "/v1/embeddings", json={"input": texts}) for _ in range(6)]
            time.sleep(0.5)  # let the requests reach the replica
            assert not all(f.done() for f in futures), "requests finished before SIGTERM; make them longer"
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 6
        assert all(len(r.json()["data"]) == 16 for r in responses)
        assert proc.wait(timeout=90) == 0
        assert any("drained" in line for line in stderr), "".join(stderr[-20:])
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_metrics_endpoint_counts_requests(minilm_artifact):
    port, mport = free_port(), free_port()
    proc, out, stderr = start_server(minilm_artifact, port, mport, "--instance-type", "inf2.xlarge")
    try:
        url = f"http://127.0.0.1:{port}"
        for i in range(5):
            assert httpx.post(url + "/v1/embeddings", json={"input": [f"text {i}", "two"]}, timeout=60).status_code == 200
        assert httpx.post(url + "/v1/embeddings", json={"input": []}, timeout=60).status_code == 400
        deadline = time.monotonic() + 20
        while True:
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
            ok = 'neuronserve_requests_total{model="all-MiniLM-L6-v2",route="/v1/embeddings",status="200"} 5.0' in text
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ok, text[:3000]
        assert 'status="400"} 1.0' in text
        for name in ("neuronserve_tokens_real_total", "neuronserve_tokens_padded_total", "neuronserve_batch_rows_bucket",
                     "neuronserve_inference_seconds_bucket", "neuronserve_queue_wait_seconds_bucket",
                     "neuronserve_cost_allocated_usd_total", "neuronserve_cost_busy_usd_total",
                     'neuronserve_price_per_hour_usd{instance_type="inf2.xlarge"} 0.7582'):
            assert name in text, name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
