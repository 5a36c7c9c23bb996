import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.serve import neuron_monitor as nm
from neuronserve.serve.neuron_monitor import NeuronMonitorCollector, parse_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "neuron_monitor_report.json"


@pytest.fixture
def raw():
    return json.loads(FIXTURE.read_text())


def _runtimes(raw):
    return [rt["report"] for rt in raw["neuron_runtime_data"]]


def _samples(collector) -> dict[tuple[str, tuple], float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_parse_fixture(raw):
    r = parse_report(json.dumps(raw))
    assert r.instance_type == raw["instance_info"]["instance_type"]
    assert r.hardware["neuroncore_per_device_count"] == 2
    assert r.runtimes == len(raw["neuron_runtime_data"])

    expected_util = {}
    for rep in _runtimes(raw):
        for core, c in rep["neuroncore_counters"]["neuroncores_in_use"].items():
            expected_util[core] = c["neuroncore_utilization"] / 100
    assert r.core_utilization == pytest.approx(expected_util)
    assert all(0 <= v <= 1 for v in r.core_utilization.values())

    used = [rep["memory_used"]["neuron_runtime_used_bytes"] for rep in _runtimes(raw)]
    assert r.device_memory_bytes == sum(u["neuron_device"] for u in used)
    assert r.host_memory_bytes == sum(u["host"] for u in used)
    core0 = used[0]["usage_breakdown"]["neuroncore_memory_usage"]["0"]
    assert r.core_memory_bytes[("0", "constants")] == core0["constants"]

    for status in nm.EXECUTION_STATUSES:
        assert r.executions[status] == sum(
            rep["execution_stats"]["execution_summary"][status] for rep in _runtimes(raw))
    for etype in nm.ERROR_TYPES:
        assert r.errors[etype] == sum(
            rep["execution_stats"]["error_summary"][etype] for rep in _runtimes(raw))

    total = _runtimes(raw)[0]["execution_stats"]["latency_stats"]["total_latency"]
    assert r.latency_seconds[("total", "0.5")] == total["p50"]
    assert r.latency_seconds[("total", "0.99")] == total["p99"]
    assert r.latency_seconds[("total", "1")] == total["p100"]
    assert r.latency_seconds[("total", "0.01")] == total["p1"]
    assert ("device", "0.5") in r.latency_seconds

    dev = raw["system_data"]["neuron_hw_counters"]["neuron_devices"][0]
    assert r.ecc_events[("0", "mem_ecc_corrected")] == dev["mem_ecc_corrected"]
    assert r.section_errors == {}


@pytest.mark.parametrize("report", [
    {},
    {"neuron_runtime_data": None, "instance_info": None, "neuron_hardware_info": None},
    {"neuron_runtime_data": [{"pid": 1, "report": None}]},
    {"neuron_runtime_data": [{"report": {"neuroncore_counters": {"neuroncores_in_use": None},
                                         "execution_stats": {"latency_stats": None},
                                         "memory_used": {"neuron_runtime_used_bytes": "n/a"}}}]},
    {"neuron_runtime_data": "garbage", "system_data": {"neuron_hw_counters": {"neuron_devices": 7}}},
])
def test_parse_tolerates_missing_sections(report):
    r = parse_report(report)
    assert r.core_utilization == {} and r.executions == {} and r.errors == {}
    assert r.device_memory_bytes is None and r.instance_type == ""


def test_parse_records_group_errors_and_rejects_non_objects(raw):
    raw["neuron_runtime_data"][0]["report"]["execution_stats"]["error"] = "runtime gone"
    raw["system_data"]["vcpu_usage"]["error"] = "boom"
    r = parse_report(raw)
    assert r.section_errors == {"execution_stats": 1, "system.vcpu_usage": 1}
    with pytest.raises(ValueError):
        parse_report("[1, 2, 3]")


def test_collector_sums_period_counts_and_keeps_latest_gauges(raw):
    clock = [100.0]
    c = NeuronMonitorCollector(clock=lambda: clock[0])
    assert c.feed(json.dumps(raw))
    # Second period: core 0 busier, fewer executions.
    raw2 = json.loads(json.dumps(raw))
    rep0 = raw2["neuron_runtime_data"][0]["report"]
    rep0["neuroncore_counters"]["neuroncores_in_use"]["0"]["neuroncore_utilization"] = 90.0
    rep0["execution_stats"]["execution_summary"]["completed"] = 5
    assert c.feed(json.dumps(raw2))
    assert not c.feed("{truncated")
    clock[0] += 3.5

    s = _samples(c)
    completed = sum(rep["execution_stats"]["execution_summary"]["completed"]
                    for rep in _runtimes(raw) + _runtimes(raw2))
    assert s[("neuronserve_neuron_execution_total", (("status", "completed"),))] == completed
    numerical = 2 * sum(rep["execution_stats"]["error_summary"]["numerical"]
                        for rep in _runtimes(raw))
    assert s[("neuronserve_neuron_execution_errors_total",
              (("error_type", "numerical"),))] == numerical
    assert s[("neuronserve_neuroncore_utilization_ratio", (("neuroncore", "0"),))] == 0.9
    assert s[("neuronserve_neuroncore_utilization_ratio", (("neuroncore", "1"),))] == 0.0725
    assert s[("neuronserve_neuron_monitor_reports_total", ())] == 2
    assert s[("neuronserve_neuron_monitor_bad_reports_total", ())] == 1
    assert s[("neuronserve_neuron_monitor_report_age_seconds", ())] == 3.5
    info = [k for k in s if k[0] == "neuronserve_neuron_hardware_info"]
    assert len(info) == 1 and ("instance_type", "inf2.xlarge") in info[0][1]
    assert s[("neuronserve_neuron_device_memory_bytes", ())] == 700_000_000
    assert s[("neuronserve_neuron_ecc_events_total",
              (("event", "mem_ecc_corrected"), ("neuron_device", "0")))] == 2
    assert s[("neuronserve_neuron_execution_latency_seconds",
              (("kind", "device"), ("quantile", "0.99")))] == 0.0081
    # Every family is ours.
    assert all(name.startswith("neuronserve_") for name, _ in s)


def test_collector_before_any_report_exports_only_counts():
    s = _samples(NeuronMonitorCollector())
    assert set(name for name, _ in s) == {"neuronserve_neuron_monitor_reports_total",
                                          "neuronserve_neuron_monitor_bad_reports_total"}


def test_monitor_config_has_one_period_for_all_groups():
    cfg = nm.monitor_config(2.0)
    assert cfg["period"] == "2s"
    groups = {m["type"] for m in cfg["neuron_runtimes"][0]["metrics"]}
    assert {"neuroncore_counters", "memory_used", "execution_stats"} <= groups
    assert all("period" not in m for m in cfg["neuron_runtimes"][0]["metrics"])


def test_absent_binary_is_logged_not_raised(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(nm, "DEFAULT_BINARY", "/nonexistent/neuron-monitor")
    assert nm.find_binary() is None
    with caplog.at_level(logging.INFO, logger="neuronserve.serve.neuron_monitor"):
        assert nm.start_neuron_monitor(NeuronMonitorCollector()) is None
    assert any("neuron-monitor not found" in r.message for r in caplog.records)
