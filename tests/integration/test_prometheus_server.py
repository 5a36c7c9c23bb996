"""A real Prometheus scrapes a real `neuronserve serve` while requests flow at a steady pace.

The request counter must equal the requests sent, and the `$ per 1M requests` recording rule must
equal what price and throughput give: the replica holds 1 core of an inf2.xlarge (2 cores,
$0.7582/h), so it accrues 0.7582 / 3600 / 2 dollars per second, and 1e6 requests at `r` per second
cost that times 1e6 / r. Tolerance 10%: the allocated counter moves once a second and pacing jitters.
"""

import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port, start_server, stop_server
from tests.integration.prom import prometheus_factory, scrape_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
RULES = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "prometheus-rules.yaml"
PRICE, CORES_PER_INSTANCE = 0.7582, 2


def test_prometheus_counts_requests_and_prices_them(minilm_artifact, prometheus_factory):
    port, mport = free_port(), free_port()
    proc, _, _ = start_server(minilm_artifact, port, mport, "--instance-type", "inf2.xlarge", "--replicas", "1")
    try:
        prom = prometheus_factory(scrape_config({"neuronserve": [f"127.0.0.1:{mport}"]}), rule_files=[RULES])
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        sent, pace_s = 0, 0.2
        started = time.monotonic()
        cost = None
        done: list[float] = []
        with httpx.Client(timeout=30) as c:
            while time.monotonic() - started < 60:
                t0 = time.monotonic()
                assert c.post(url, json={"input": f"request {sent}"}).status_code == 200
                sent += 1
                done.append(time.monotonic())
                elapsed = time.monotonic() - started
                if elapsed > 12 and sent % 10 == 0:
                    cost = prom.scalar('sum(neuronserve:cost_per_million_requests_usd{model="all-MiniLM-L6-v2"})')
                    if cost is not None:
                        # The client's steady rate over the last 8 s: Prometheus's samples start
                        # later than the client, so a slow first request must not count only here.
                        rate = sum(1 for t in done if t >= done[-1] - 8) / 8
                        break
                time.sleep(max(0.0, pace_s - (time.monotonic() - t0)))
        assert cost is not None, prom.log_tail()
        expected = PRICE / 3600 / CORES_PER_INSTANCE * 1 / rate * 1e6
        assert abs(cost - expected) / expected < 0.10, (cost, expected, rate)

        def counted():
            v = prom.scalar('sum(neuronserve_requests_total{route="/v1/embeddings",status="200"})')
            return v if v == sent else None

        assert prom.wait_until(counted, timeout_s=15, what=f"request counter == {sent}") == sent
        padding = prom.scalar("sum(neuronserve_tokens_padded_total) / sum(neuronserve_tokens_real_total)")
        assert padding is not None and padding >= 1.0
        assert prom.rule_errors() == []
    finally:
        stop_server(proc)
