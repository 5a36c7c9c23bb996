"""A restart of `neuronserve serve` on the same artifact and host starts from the warm-up timing
table the first start kept in the cache (`serve/timing_cache.py`), and says so: in its ready line
and in `neuronserve_startup_seconds`."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.inprocess_app import tiny_artifact
from tests.integration.conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.integration


def _ready_line(out: list[str]) -> str:
    return next(line.strip() for line in out if line.strip().startswith("ready in "))


def _startup_seconds(metrics_url: str, timeout_s: float = 20) -> dict[str, float]:
    """The exported start-up phases, once the exporter shows all four."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(metrics_url, timeout=5).text
        phases = {s.labels["phase"]: s.value for family in text_string_to_metric_families(text)
                  for s in family.samples if s.name == "neuronserve_startup_seconds"}
        if set(phases) >= {"pull", "load", "warmup", "ready"} or time.monotonic() > deadline:
            return phases
        time.sleep(0.2)  # polling interval


def test_a_second_start_uses_the_cached_timing_table(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache"))  # both servers' cache
    artifact = tiny_artifact(tmp_path)

    # One replica: with several, one started after another has kept its table would use it.
    proc, out, stderr = start_server(artifact, free_port(), free_port(), "--replicas", "1")
    try:
        first = _ready_line(out)
    finally:
        stop_server(proc)
    assert "measured timings" in first and "cached" not in first, first
    tables = list((tmp_path / "cache" / "timings").iterdir())
    assert len(tables) == 1 and tables[0].name.endswith(".json")

    port, mport = free_port(), free_port()
    proc, out, stderr = start_server(artifact, port, mport, "--replicas", "1")
    try:
        second = _ready_line(out)
        assert "cached timings" in second and "measured" not in second, second
        phases = _startup_seconds(f"http://127.0.0.1:{mport}/metrics")
        assert set(phases) == {"pull", "load", "warmup", "ready"}, phases
        assert phases["ready"] >= phases["load"] + phases["warmup"] > 0
        body = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).json()
        assert body["timings"] == "cached" and body["startup_s"]["ready"] == pytest.approx(phases["ready"])
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["warm start"]}, timeout=60)
        assert r.status_code == 200
    finally:
        stop_server(proc)
