"""`neuronserve serve` as a user runs it: a subprocess with its own Ray, metrics, and SIGTERM drain."""

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.integration


def _queued_rows(metrics_url: str) -> float:
    """Rows waiting in the replicas' queues, as the server's metrics show them."""
    text = httpx.get(metrics_url, timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "neuronserve_queued_rows")


def _wait_until_rows_are_queued(metrics_url: str, futures, timeout_s: float = 60) -> None:
    """Return once the server shows rows of the submitted requests waiting in a replica's queue.

    The queued-rows gauge, not the in-flight one: the latter can still show the warm-up's row
    until the replica's next once-a-second update."""
    deadline = time.monotonic() + timeout_s
    while _queued_rows(metrics_url) == 0:
        assert not all(f.done() for f in futures), "requests finished before any was seen queued; make them longer"
        assert time.monotonic() < deadline, f"no rows queued after {timeout_s:.0f} s"
        time.sleep(0.05)  # polling interval


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
            _wait_until_rows_are_queued(f"http://127.0.0.1:{mport}/metrics", futures)
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


SHADOWS = ("models", "serve", "compile", "deploy")


def _shadowing_packages(root):
    """Packages named like neuronserve's folders whose import fails, as a user's repository may hold."""
    for name in SHADOWS:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package')\n")
    return root


def test_serve_starts_from_a_directory_whose_packages_shadow_generic_names(minilm_artifact, tmp_path, monkeypatch):
    # Ray puts the driver's working directory first on sys.path in every worker, and PYTHONPATH
    # comes before site-packages: neither may change which code the server runs.
    cwd = _shadowing_packages(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(cwd))
    port, mport = free_port(), free_port()
    proc, out, stderr = start_server(minilm_artifact, port, mport, cwd=cwd)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["hello world"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 384
    finally:
        stop_server(proc)


def test_every_subcommand_loads_with_shadowing_packages_on_the_path(tmp_path):
    cwd = _shadowing_packages(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    for command, expected in (["deploy", "--help"], "render"), (["compile", "--help"], "--model"), (["serve", "--help"], "--artifacts"):
        r = subprocess.run([sys.executable, "-m", "neuronserve", *command], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and expected in r.stdout, (command, r.stdout, r.stderr)


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_is_one_line_naming_the_flag_before_anything_starts(minilm_artifact, flag):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"--port": str(free_port()), "--metrics-port": str(free_port()), flag: str(taken)}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "neuronserve", "serve", "--artifacts", str(minilm_artifact),
                            *[x for kv in ports.items() for x in kv]], capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - t0
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback, nothing from Ray: it never started
    assert lines[0].startswith("error: port") and str(taken) in lines[0] and flag in lines[0]
    assert elapsed < 60


def test_access_log_on_the_console_when_asked(minilm_artifact):
    port = free_port()
    proc, out, stderr = start_server(minilm_artifact, port, 0, "--access-log")
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["hello"]}, timeout=30)
        assert r.status_code == 200
        deadline = time.monotonic() + 15
        while not any("POST /v1/embeddings 200" in line for line in stderr) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("POST /v1/embeddings 200" in line for line in stderr), "".join(stderr[-20:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
