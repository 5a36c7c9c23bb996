import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from neuronserve.serve import exporter as exp
from tests.fixtures.prom_samples import samples as _samples
from tests.fixtures.prom_samples import value as _value
from neuronserve.serve import metrics as sm
from neuronserve.serve.metrics import LATENCY_BUCKETS, Metrics, ServeMetrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"


@pytest.fixture
def reg():
    return CollectorRegistry()


@pytest.fixture
def clock():
    now = [1000.0]

    class Clock:
        def __call__(self):
            return now[0]

        def advance(self, s):
            now[0] += s

    return Clock()


# --------------------------------------------------------------------------- declarations

def test_latency_buckets_are_x1_5_from_50us_to_30s():
    b = LATENCY_BUCKETS
    assert b[0] == 50e-6 and b[-2] < 30 <= b[-1]
    assert all(y > x for x, y in zip(b, b[1:]))
    for x, y in zip(b, b[1:]):
        assert y / x == pytest.approx(1.5, rel=0.01)


def test_names_follow_prometheus_conventions(reg):
    m = Metrics(reg)
    for fam in reg.collect():
        assert fam.name.startswith("neuronserve_")
        if fam.type == "counter":
            assert any(s.name.endswith("_total") for s in fam.samples) or not fam.samples
        if fam.type == "histogram" and fam.name != "neuronserve_batch_rows":
            assert fam.name.endswith("_seconds")
    assert m.request_duration._upper_bounds[:-1] == list(LATENCY_BUCKETS)


# --------------------------------------------------------------------------- ServeMetrics

def test_request_batch_and_queue(reg, clock):
    m = ServeMetrics("mini", "cpu", 2, "c7i.xlarge", 0.1785, 4, clock=clock, metrics=Metrics(reg))
    for status, secs in [(200, 0.004), (200, 0.006), (429, 0.0001), (500, 0.002)]:
        m.request("/v1/embeddings", status, secs)
    m.batch("8x128", rows=5, real_tokens=300, padded_tokens=1024, inference_seconds=0.01,
            queue_waits=[0.001, 0.002, 0.003, 0.004, 0.005])
    m.batch("8x128", rows=8, real_tokens=900, padded_tokens=1024, inference_seconds=0.02,
            queue_waits=[0.0] * 8)
    m.batch("1x32", rows=1, real_tokens=20, padded_tokens=32, inference_seconds=0.001,
            queue_waits=[0.5])
    m.batch("2x64", rows=6, real_tokens=120, padded_tokens=128, inference_seconds=0.002,
            queue_waits=[0.0] * 6, packed=True)
    m.set_queue(queued_rows=7, inflight_rows=3)
    s = _samples(reg)

    req = "neuronserve_requests_total"
    assert _value(s, req, model="mini", route="/v1/embeddings", status="200") == 2
    assert _value(s, req, model="mini", route="/v1/embeddings", status="429") == 1
    assert _value(s, "neuronserve_request_duration_seconds_count", model="mini",
                  route="/v1/embeddings") == 4
    assert _value(s, "neuronserve_request_duration_seconds_sum", model="mini",
                  route="/v1/embeddings") == pytest.approx(0.0121)
    assert _value(s, "neuronserve_tokens_real_total", model="mini", bucket="8x128") == 1200
    assert _value(s, "neuronserve_tokens_padded_total", model="mini", bucket="8x128") == 2048
    assert _value(s, "neuronserve_tokens_padded_total", model="mini", bucket="1x32") == 32
    assert _value(s, "neuronserve_batches_total", model="mini", bucket="8x128") == 2
    assert _value(s, "neuronserve_rows_total", model="mini") == 20
    assert _value(s, "neuronserve_packed_batches_total", model="mini", bucket="2x64") == 1
    assert _value(s, "neuronserve_packed_batches_total", model="mini", bucket="8x128") is None
    assert _value(s, "neuronserve_batch_rows_sum", model="mini", bucket="8x128") == 13
    assert _value(s, "neuronserve_batch_rows_bucket", model="mini", bucket="8x128", le="4.0") == 0
    assert _value(s, "neuronserve_batch_rows_bucket", model="mini", bucket="8x128", le="6.0") == 1
    assert _value(s, "neuronserve_queue_wait_seconds_count", model="mini") == 20
    assert _value(s, "neuronserve_queue_wait_seconds_sum", model="mini") == pytest.approx(0.515)
    assert _value(s, "neuronserve_inference_seconds_count", model="mini", bucket="8x128") == 2
    assert _value(s, "neuronserve_device_busy_seconds_total", model="mini") == pytest.approx(0.033)
    assert _value(s, "neuronserve_queued_rows", model="mini") == 7
    assert _value(s, "neuronserve_inflight_rows", model="mini") == 3
    assert _value(s, "neuronserve_replica_info", model="mini", backend="cpu",
                  instance_type="c7i.xlarge", cores="2") == 1
    assert _value(s, "neuronserve_cores_in_use", backend="cpu") == 2
    assert _value(s, "neuronserve_price_per_hour_usd", instance_type="c7i.xlarge") == 0.1785


def test_cost_accrual(reg, clock):
    price, cpi, cores = 7.2, 4, 3
    per_core_s = price / 3600 / cpi
    m = ServeMetrics("m", "neuron", cores, "custom", price, cpi, clock=clock, metrics=Metrics(reg))
    clock.advance(10)
    m.tick()
    clock.advance(-5)          # a clock that steps back must not refund
    m.tick()
    clock.advance(7.5)         # 2.5 s past the last accrual
    m.batch("4x64", 4, 100, 256, inference_seconds=0.25, queue_waits=[])
    s = _samples(reg)
    assert _value(s, "neuronserve_cost_allocated_usd_total", model="m") == pytest.approx(
        (10 + 2.5) * cores * per_core_s, rel=1e-12)
    assert _value(s, "neuronserve_cost_busy_usd_total", model="m") == pytest.approx(
        0.25 * cores * per_core_s, rel=1e-12)
    assert m.price_per_core_second == pytest.approx(per_core_s)


def test_price_comes_from_table_and_env_overrides(reg, clock, monkeypatch):
    monkeypatch.delenv("NEURONSERVE_PRICES_JSON", raising=False)
    m = ServeMetrics("a", "neuron", 1, "inf2.xlarge", None, None, clock=clock,
                     metrics=Metrics(reg))
    assert (m.price_per_hour_usd, m.cores_per_instance) == (0.7582, 2)
    monkeypatch.setenv("NEURONSERVE_PRICES_JSON", '{"inf2.xlarge": 1.0}')
    m2 = ServeMetrics("b", "neuron", 1, "inf2.xlarge", None, None, clock=clock,
                      metrics=Metrics(CollectorRegistry()))
    assert m2.price_per_core_second == pytest.approx(1.0 / 3600 / 2)


def test_unknown_price_disables_cost_with_one_warning(reg, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="neuronserve.serve.metrics"):
        m = ServeMetrics("x", "neuron", 1, "trn2.48xlarge", None, None, clock=clock,
                         metrics=Metrics(reg))
        m2 = ServeMetrics("y", "cpu", 1, "laptop", 1.0, None, clock=clock,
                          metrics=Metrics(CollectorRegistry()))
    assert m.price_per_core_second is None and m2.price_per_core_second is None
    assert any("price_per_hour_usd" in r.message for r in caplog.records)
    assert any("cores_per_instance" in r.message for r in caplog.records)
    clock.advance(5)
    m.tick()
    m.batch("1x8", 1, 8, 8, 0.1, [0.0])
    names = {name for name, _ in _samples(reg)}
    assert "neuronserve_cost_allocated_usd_total" not in names
    assert "neuronserve_device_busy_seconds_total" in names
    with pytest.raises(ValueError):
        ServeMetrics("z", "cpu", 1, "c7i.xlarge", -1.0, None, metrics=Metrics(CollectorRegistry()))


def test_close_removes_replica_from_live_gauges(reg, clock):
    metrics = Metrics(reg)
    a = ServeMetrics("m", "neuron", 2, "inf2.xlarge", 0.7582, 2, clock=clock, metrics=metrics)
    b = ServeMetrics("m", "neuron", 2, "inf2.xlarge", 0.7582, 2, clock=clock, metrics=metrics)
    s = _samples(reg)
    info = dict(model="m", backend="neuron", instance_type="inf2.xlarge", cores="2")
    assert _value(s, "neuronserve_replica_info", **info) == 2
    assert _value(s, "neuronserve_cores_in_use", backend="neuron") == 4
    a.close()
    a.close()  # idempotent
    clock.advance(100)
    a.tick()   # closed: no more allocated cost
    s = _samples(reg)
    assert _value(s, "neuronserve_replica_info", **info) == 1
    assert _value(s, "neuronserve_cores_in_use", backend="neuron") == 2
    b.close()
    s = _samples(reg)
    assert _value(s, "neuronserve_cost_allocated_usd_total", model="m") == pytest.approx(
        100 * 2 * 0.7582 / 3600 / 2)


def test_default_registry_in_process_mode(monkeypatch):
    monkeypatch.delenv(sm.MULTIPROC_ENV, raising=False)
    m = ServeMetrics("inproc-test", "cpu", 1, "c7g.xlarge", None, None)
    m.request("/v1/models", 200, 0.001)
    text = sm.exposition().decode()
    assert 'neuronserve_requests_total{model="inproc-test",route="/v1/models",status="200"}' in text


# --------------------------------------------------------------------------- multiprocess

def test_multiproc_env_and_dir(tmp_path):
    env = sm.multiproc_env(tmp_path / "d")
    assert env == {"PROMETHEUS_MULTIPROC_DIR": str((tmp_path / "d").resolve())}
    d = sm.ensure_multiproc_dir(tmp_path / "d", clean=False)
    for name in ["counter_1.db", "gauge_livesum_1.db", "heartbeat_1.json", "keep.txt"]:
        (d / name).write_text("x")
    sm.ensure_multiproc_dir(d, clean=False)
    assert len(list(d.iterdir())) == 4
    sm.ensure_multiproc_dir(d, clean=True)
    assert [p.name for p in d.iterdir()] == ["keep.txt"]


def _aggregate(collector) -> dict[tuple[str, tuple], float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return _samples(reg)


def test_heartbeat_age_decides_across_pid_namespaces(tmp_path):
    d = sm.ensure_multiproc_dir(tmp_path / "hb", clean=True)
    now = [10_000.0]
    cleaner = exp.DeadWriterCleaner(d, stale_after_s=30, wall_clock=lambda: now[0])
    # Two writers in another pid namespace (a sidecar's view): pids we cannot check.
    for pid in (111111, 222222):
        (d / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (d / f"counter_{pid}.db").write_bytes(b"")
        hb = d / f"heartbeat_{pid}.json"
        hb.write_text(json.dumps({"pid": pid, "pid_namespace": "pid:[1]", "host": "ray"}))
    os.utime(d / "heartbeat_111111.json", (now[0] - 5, now[0] - 5))      # fresh
    os.utime(d / "heartbeat_222222.json", (now[0] - 120, now[0] - 120))  # stale
    assert cleaner.run() == [222222]
    names = {p.name for p in d.iterdir()}
    assert "gauge_livesum_111111.db" in names and "heartbeat_111111.json" in names
    assert "gauge_livesum_222222.db" not in names and "heartbeat_222222.json" not in names
    assert "counter_222222.db" in names   # counters of the dead are kept
    now[0] += 100
    assert cleaner.run() == [111111]


def test_write_heartbeat_records_pid_namespace(tmp_path):
    path = sm.write_heartbeat(tmp_path, pid=42)
    info = json.loads(path.read_text())
    assert info["pid"] == 42 and path.name == "heartbeat_42.json"
    before = path.stat().st_mtime
    os.utime(path, (before - 50, before - 50))
    sm.write_heartbeat(tmp_path, pid=42)
    assert path.stat().st_mtime > before - 50


# --------------------------------------------------------------------------- exporter

def test_exporter_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        exp.start_exporter(tmp_path / "missing", port=0, host="127.0.0.1", neuron_monitor=False)
    e = exp.start_exporter(tmp_path, port=0, host="127.0.0.1", neuron_monitor=False)
    try:
        with pytest.raises(OSError) as err:
            exp.start_exporter(tmp_path, port=e.port, host="127.0.0.1", neuron_monitor=False)
        assert "metrics_port" in str(err.value)
    finally:
        e.stop()


def test_cli_subcommand(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(sm.MULTIPROC_ENV, raising=False)
    parser = argparse.ArgumentParser(prog="neuronserve")
    exp.add_subcommand(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["metrics-exporter", "--dir", str(tmp_path), "--port", "9401"])
    assert args.func is exp.run and args.port == 9401 and args.neuron_monitor is True
    assert parser.parse_args(["metrics-exporter"]).port == exp.DEFAULT_PORT
    assert exp.run(parser.parse_args(["metrics-exporter"])) == 2
    assert "PROMETHEUS_MULTIPROC_DIR" in capsys.readouterr().err
    assert exp.run(parser.parse_args(["metrics-exporter", "--dir", str(tmp_path),
                                      "--port", "70000"])) == 2


# --------------------------------------------------------------------------- rules, dashboards

def _known_metric_names() -> set[str]:
    names = set()
    reg = CollectorRegistry()
    m = Metrics(reg)
    for attr in vars(m).values():
        if hasattr(attr, "_type"):
            base = attr._name
            if attr._type == "counter":
                names.add(base + "_total")
            elif attr._type == "histogram":
                names.update({base + "_bucket", base + "_sum", base + "_count"})
            else:
                names.add(base)
    from neuronserve.serve.neuron_monitor import NeuronMonitorCollector, parse_report

    c = NeuronMonitorCollector()
    c.update(parse_report((REPO / "tests/fixtures/neuron_monitor_report.json").read_text()))
    for fam in c.collect():
        names.update(s.name for s in fam.samples)
    names.add("up")
    return names


# Series names in PromQL: a name not followed by "(" (that would be a function).
_SERIES = re.compile(r"\b(neuronserve[:_][a-zA-Z0-9_:]*|up)\b(?!\s*\()")


def _rules():
    return yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())


def test_prometheusrule_is_generated_from_the_rule_file():
    sys.path.insert(0, str(MONITORING))
    try:
        import generate
    finally:
        sys.path.remove(str(MONITORING))
    assert generate.render() == (MONITORING / "prometheusrule.yaml").read_text(), (
        "prometheusrule.yaml is stale: run python k8s/monitoring/generate.py")
    crd = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["spec"]["groups"] == _rules()["groups"]


def test_rules_reference_only_existing_series():
    known = _known_metric_names()
    recorded = set()
    for g in _rules()["groups"]:
        for rule in g["rules"]:
            if "record" in rule:
                recorded.add(rule["record"])
    required = {"neuronserve:cost_per_million_requests_usd", "neuronserve:cost_per_million_tokens_usd",
                "neuronserve:padding_ratio", "neuronserve:busy_cost_per_million_requests_usd",
                "neuronserve:request_duration_seconds:p99", "neuronserve:cost_per_million_output_tokens_usd",
                "neuronserve:busy_cost_per_million_output_tokens_usd"}
    assert required <= recorded
    alerts = {r["alert"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r}
    assert {"NeuronServeHighP99Latency", "NeuronServeHigh5xxRate", "NeuronServeHighShedRate",
            "NeuronServePaddingWasteHigh", "NeuronServeExporterDown"} <= alerts
    for g in _rules()["groups"]:
        for rule in g["rules"]:
            for name in _SERIES.findall(rule["expr"]):
                assert name in known | recorded, f"{name} in {rule.get('record') or rule['alert']}"


def test_cost_rule_divides_dollars_by_successful_requests():
    expr = next(r["expr"] for g in _rules()["groups"] for r in g["rules"]
                if r.get("record") == "neuronserve:cost_per_million_requests_usd")
    num, den = expr.split("/", 1)
    assert "neuronserve_cost_allocated_usd_total" in num
    assert 'neuronserve_requests_total{status=~"2.."}' in den and "1e6" in den


def test_generation_cost_rules_divide_dollars_by_output_tokens():
    rules = {r["record"]: r["expr"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}
    for record, dollars in [("neuronserve:cost_per_million_output_tokens_usd", "neuronserve_cost_allocated_usd_total"),
                            ("neuronserve:busy_cost_per_million_output_tokens_usd", "neuronserve_cost_busy_usd_total")]:
        num, den = rules[record].split("/", 1)
        assert dollars in num
        assert "neuronserve_output_tokens_total" in den and "> 0" in den and "1e6" in den


def test_podmonitor_selects_neuronserve_pods_on_exporter_port():
    pm = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "neuronserve"}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "nserve-metrics" and endpoint["path"] == "/metrics"
    assert len(endpoint["port"]) <= 15  # IANA service name limit for container port names


def test_dashboard_queries_known_series():
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    known = _known_metric_names() | {r["record"] for g in _rules()["groups"] for r in g["rules"]
                                     if "record" in r}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for word in ["requests/s", "p50 / p99", "queue wait", "rows per batch", "padding",
                 "$ per 1m requests", "neuroncore utilisation"]:
        assert word in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for e in exprs:
        names = _SERIES.findall(e)
        assert names, e
        for n in names:
            assert n in known, f"{n} in dashboard query {e}"
