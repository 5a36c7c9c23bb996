"""A real Prometheus scrapes the exporter while two replica-like processes record metrics.

Each writer process drives `ServeMetrics` in multiprocess mode on a virtual clock: per step the
clock advances `DT` seconds, `K` requests succeed (plus one 503 every 10th step), and one batch
runs with known tokens and inference time. Steps are paced over a few seconds of real time so
Prometheus takes several scrapes while the counters grow.

Why the recording rules come out exact here, and the tolerance: within each writer the allocated
dollars and the 2xx request count grow in a fixed proportion per step, so every scrape sees them in
that proportion except for one unfinished step per writer. rate() extrapolates both series by the
same factor (same scrape timestamps, same value-to-zero ratio), so the ratio of rates equals the
ratio of increments. The only error is the unfinished step at the first sample in the window: at
most 2 steps out of the > 150 steps after it, under 1.5%; we allow 2%. Counter totals are checked
exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neuronserve.common.pricing import cost_per_million
from neuronserve.serve.exporter import start_exporter
from neuronserve.serve.metrics import ensure_multiproc_dir, multiproc_env
from tests.integration.prom import prometheus_factory, scrape_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "monitoring" / "prometheus-rules.yaml"

MODEL = "mini"
PRICE = 3.6            # USD per instance-hour
CORES_PER_INSTANCE = 2
CORES = 1              # held by each writer
DT = 0.05              # virtual seconds per step
K = 4                  # successful requests per step
STEPS = 240            # per writer
INFERENCE_S = 0.02     # device time per batch (busy 40% of the virtual time)
REAL_TOKENS = 300      # per batch
PADDED_TOKENS = 512    # per batch (bucket 4 x 128)
PACE_S = 6.0           # real seconds a writer spends on its steps
WRITERS = 2

WRITER = textwrap.dedent("""
    import sys, time
    from neuronserve.serve.metrics import ServeMetrics
    model, price, cpi, cores, dt, k, steps, inf_s, real, padded, pace = sys.argv[1:]
    dt, inf_s, price, pace = float(dt), float(inf_s), float(price), float(pace)
    cpi, cores, k, steps, real, padded = map(int, (cpi, cores, k, steps, real, padded))
    now = [0.0]
    m = ServeMetrics(model, "neuron", cores, "inf2.xlarge", price, cpi, clock=lambda: now[0])
    start = time.monotonic()
    for i in range(steps):
        # pace the load over real time so Prometheus scrapes it while it grows
        while time.monotonic() < start + pace * i / steps:
            time.sleep(0.002)
        now[0] += dt
        for _ in range(k):
            m.request("/v1/embeddings", 200, 0.004)
        if i % 10 == 0:
            m.request("/v1/embeddings", 503, 0.001)
        m.batch("4x128", k, real, padded, inf_s, [0.001] * k)
        m.set_queue(0, 0)
    print("done", flush=True)
""")


def _start_writer(metrics_dir: Path) -> subprocess.Popen:
    env = {**os.environ, **multiproc_env(metrics_dir), "PYTHONPATH": str(REPO)}
    args = [MODEL, PRICE, CORES_PER_INSTANCE, CORES, DT, K, STEPS, INFERENCE_S, REAL_TOKENS,
            PADDED_TOKENS, PACE_S]
    return subprocess.Popen([sys.executable, "-c", WRITER, *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_prometheus_computes_cost_per_million_from_exporter(prometheus_factory, tmp_path):
    metrics_dir = ensure_multiproc_dir(tmp_path / "metrics", clean=True)
    exporter = start_exporter(metrics_dir, port=0, host="127.0.0.1", neuron_monitor=False)
    writers: list[subprocess.Popen] = []
    try:
        prom = prometheus_factory(
            scrape_config({"neuronserve": [f"127.0.0.1:{exporter.port}"]}), rule_files=[RULES])
        prom.wait_until(prom.targets_up, timeout_s=30, what="exporter target up")
        assert prom.rule_errors() == []

        writers = [_start_writer(metrics_dir) for _ in range(WRITERS)]
        for w in writers:
            out, err = w.communicate(timeout=120)
            assert w.returncode == 0, err

        # Exact totals through files -> exporter -> scrape -> TSDB.
        sent_2xx = WRITERS * STEPS * K
        sent_503 = WRITERS * len(range(0, STEPS, 10))
        prom.wait_until(
            lambda: prom.scalar(f'sum(neuronserve_requests_total{{status="200"}})') == sent_2xx,
            timeout_s=30, what=f"{sent_2xx} requests with status 200")
        assert prom.scalar('sum(neuronserve_requests_total{status="503"})') == sent_503

        price_per_core_s = PRICE / 3600 / CORES_PER_INSTANCE
        allocated_usd = WRITERS * STEPS * DT * CORES * price_per_core_s
        busy_usd = WRITERS * STEPS * INFERENCE_S * CORES * price_per_core_s
        assert prom.scalar("sum(neuronserve_cost_allocated_usd_total)") == pytest.approx(
            allocated_usd, rel=1e-9)
        assert prom.scalar("sum(neuronserve_cost_busy_usd_total)") == pytest.approx(
            busy_usd, rel=1e-9)
        assert prom.scalar("sum(neuronserve_tokens_real_total)") == WRITERS * STEPS * REAL_TOKENS
        assert prom.scalar("sum(neuronserve_price_per_hour_usd)") == PRICE

        # Expected from price and throughput alone, by the formula in deploy.pricing.
        rps_per_writer = K / DT                                   # 2xx requests per second
        share_per_hour = PRICE * CORES / CORES_PER_INSTANCE       # each writer's share
        expected_alloc = cost_per_million(WRITERS * rps_per_writer, WRITERS * share_per_hour)
        expected_busy = expected_alloc * INFERENCE_S / DT
        expected_tokens = expected_alloc * K / REAL_TOKENS
        tol = 0.02

        def close_to(expr: str, expected: float):
            def check():
                v = prom.scalar(f'{expr}{{model="{MODEL}"}}')
                return v is not None and abs(v - expected) <= tol * expected and v
            return check

        for expr, expected in [
            ("neuronserve:cost_per_million_requests_usd", expected_alloc),
            ("neuronserve:busy_cost_per_million_requests_usd", expected_busy),
            ("neuronserve:cost_per_million_tokens_usd", expected_tokens),
            ("neuronserve:padding_ratio", PADDED_TOKENS / REAL_TOKENS),
            ("neuronserve:padding_waste_ratio", 1 - REAL_TOKENS / PADDED_TOKENS),
        ]:
            prom.wait_until(close_to(expr, expected), timeout_s=20,
                            what=f"{expr} ~= {expected:.6g} (+-{tol:.0%})")

        # p99 of 4 ms observations lands in the bucket holding 4 ms.
        p99 = prom.scalar(f'neuronserve:request_duration_seconds:p99{{model="{MODEL}"}}')
        assert p99 is not None and 0.00288 < p99 <= 0.00432
        assert prom.rule_errors() == []
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=10)
        exporter.stop()
