"""Metrics across processes: replicas' multiprocess files written by real writer processes, the
exporter serving them over HTTP, the exporter command until SIGTERM, and promtool on the rules.
The in-process parts (collectors, the dead-writer cleaner, rules and dashboards) are tested in
tests/unit/test_metrics.py."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.serve import exporter as exp
from tests.fixtures.prom_samples import samples as _samples
from tests.fixtures.prom_samples import value as _value
from neuronserve.serve import metrics as sm

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"


def _aggregate(collector) -> dict[tuple[str, tuple], float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return _samples(reg)


WRITER = textwrap.dedent("""
    import sys
    from neuronserve.serve.metrics import ServeMetrics
    mode, n = sys.argv[1], int(sys.argv[2])
    m = ServeMetrics("m", "neuron", 1, "inf2.xlarge", 0.7582, 2)
    m.set_queue(5, 2)
    for i in range(n):
        m.request("/v1/embeddings", 200, 0.001)
    print("ready", flush=True)
    if mode == "forever":
        while True:
            m.request("/v1/embeddings", 200, 0.001)
    else:
        sys.stdin.read()   # stay alive (live gauges stay) until the test closes stdin
""")


def _writer(directory: Path, mode: str, n: int, extra_env=None) -> subprocess.Popen:
    env = {**os.environ, **sm.multiproc_env(directory), "PYTHONPATH": str(REPO),
           **(extra_env or {})}
    p = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(n)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_counters_survive_writer_death_and_live_gauges_do_not(tmp_path):
    d = sm.ensure_multiproc_dir(tmp_path / "mp", clean=True)
    agg = exp.AggregateCollector(d, stale_after_s=3600, cleanup_interval_s=0)
    req = ("neuronserve_requests_total",
           (("model", "m"), ("route", "/v1/embeddings"), ("status", "200")))
    seen = []

    a = _writer(d, "forever", 100)
    try:
        for _ in range(30):
            seen.append(_aggregate(agg)[req])
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
    finally:
        if a.poll() is None:
            a.kill()
    after_a = _aggregate(agg)
    seen.append(after_a[req])
    assert after_a[req] >= 100
    # A is dead (same pid namespace: found by pid), its live gauges are gone, counters stay.
    assert ("neuronserve_queued_rows", (("model", "m"),)) not in after_a
    assert after_a[("neuronserve_exporter_dead_writers_total", ())] == 1
    assert _aggregate(agg)[req] == after_a[req]

    b = _writer(d, "wait", 500)
    try:
        with_b = _aggregate(agg)
        seen.append(with_b[req])
        assert with_b[req] == after_a[req] + 500
        assert with_b[("neuronserve_queued_rows", (("model", "m"),))] == 5
        assert with_b[("neuronserve_inflight_rows", (("model", "m"),))] == 2
        assert with_b[("neuronserve_cores_in_use", (("backend", "neuron"),))] == 1
        assert with_b[("neuronserve_exporter_live_writers", ())] == 1
    finally:
        b.stdin.close()
        b.wait(timeout=10)
    final = _aggregate(agg)
    seen.append(final[req])
    assert final[req] == after_a[req] + 500
    assert ("neuronserve_cores_in_use", (("backend", "neuron"),)) not in final
    assert all(y >= x for x, y in zip(seen, seen[1:])), seen


def test_multiprocess_env_set_after_import_still_writes_files(tmp_path):
    d = sm.ensure_multiproc_dir(tmp_path / "late", clean=True)
    code = textwrap.dedent(f"""
        import os, prometheus_client
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(d)!r}
        from neuronserve.serve.metrics import ServeMetrics
        ServeMetrics("late", "cpu", 1, "c7g.xlarge", None, None).request("/r", 200, 0.1)
    """)
    env = {k: v for k, v in os.environ.items() if k != sm.MULTIPROC_ENV}
    r = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "switching to multiprocess" in r.stderr
    s = _aggregate(exp.AggregateCollector(d))
    assert _value(s, "neuronserve_requests_total", model="late", route="/r", status="200") == 1


def test_exporter_serves_aggregate_over_http(tmp_path):
    d = sm.ensure_multiproc_dir(tmp_path / "ex", clean=True)
    w = _writer(d, "wait", 7)
    e = exp.start_exporter(d, port=0, host="127.0.0.1", neuron_monitor=False)
    try:
        assert e.port > 0
        body = httpx.get(e.url, timeout=5).text
        s = {(x.name, tuple(sorted(x.labels.items()))): x.value
             for f in text_string_to_metric_families(body) for x in f.samples}
        assert _value(s, "neuronserve_requests_total", model="m", route="/v1/embeddings",
                      status="200") == 7
        assert _value(s, "neuronserve_price_per_hour_usd", instance_type="inf2.xlarge") == 0.7582
    finally:
        e.stop()
        w.stdin.close()
        w.wait(timeout=10)


def test_exporter_serves_only_our_prefix(tmp_path):
    d = sm.ensure_multiproc_dir(tmp_path / "foreign", clean=True)
    code = textwrap.dedent("""
        from prometheus_client import Counter
        from neuronserve.serve.metrics import ServeMetrics
        Counter("ray_dashboard_requests", "someone else's", ["x"]).labels("y").inc()
        ServeMetrics("m", "cpu", 1, "c7g.xlarge", None, None).request("/r", 200, 0.1)
    """)
    env = {**os.environ, **sm.multiproc_env(d), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    names = {name for name, _ in _aggregate(exp.AggregateCollector(d))}
    assert "neuronserve_requests_total" in names
    assert not any(n.startswith("ray_") for n in names)
    assert "ray_dashboard_requests_total" in {
        name for name, _ in _aggregate(exp.AggregateCollector(d, prefix=""))}


def test_cli_runs_until_sigterm(tmp_path):
    d = sm.ensure_multiproc_dir(tmp_path / "cli", clean=True)
    port_probe = __import__("socket").socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    code = ("import argparse, sys; from neuronserve.serve import exporter as e; p = argparse.ArgumentParser();"
            "e.add_subcommand(p.add_subparsers()); a = p.parse_args(sys.argv[1:]);"
            "sys.exit(a.func(a))")
    p = subprocess.Popen([sys.executable, "-c", code, "metrics-exporter", "--dir", str(d),
                          "--port", str(port), "--host", "127.0.0.1", "--no-neuron-monitor"],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert "metrics exporter" in p.stdout.readline()
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200 and "neuronserve_exporter_live_writers" in r.text
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_rule_file():
    r = subprocess.run(["promtool", "check", "rules", str(MONITORING / "prometheus-rules.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
