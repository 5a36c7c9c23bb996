"""NeuronCore utilisation, device memory and runtime errors from AWS `neuron-monitor`.

`neuron-monitor` (package aws-neuronx-tools) prints one JSON report per line on stdout. We run it
with a config that collects every metric group at one common period, so each report carries a
fresh copy of every group; the execution and ECC counts in a report are per period (not running
totals), so they are summed into our counters. Everything is exported under `neuronserve_` by
`NeuronMonitorCollector`, fed from the latest report; `neuronserve.serve.exporter` registers it.

Without the binary (CPU machines, images without aws-neuronx-tools) `start_neuron_monitor` logs one
info line and returns None.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/opt/aws/neuron/bin/neuron-monitor"
EXECUTION_STATUSES = ("completed", "completed_with_err", "completed_with_num_err", "timed_out",
                      "incorrect_input", "failed_to_queue")
ERROR_TYPES = ("generic", "numerical", "transient", "model", "runtime", "hardware")
_MAX_REPORT_BYTES = 32 << 20


def find_binary() -> str | None:
    found = shutil.which("neuron-monitor")
    if found:
        return found
    if os.path.isfile(DEFAULT_BINARY) and os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return None


def monitor_config(period_s: float) -> dict[str, Any]:
    """All runtime and system metric groups at one period (see the module docstring for why)."""
    return {
        "period": f"{period_s:g}s",
        "neuron_runtimes": [{
            "tag_filter": ".*",
            "metrics": [{"type": t} for t in ("neuroncore_counters", "memory_used",
                                               "neuron_runtime_vcpu_usage", "execution_stats")],
        }],
        "system_metrics": [{"type": t} for t in ("vcpu_usage", "memory_info",
                                                  "neuron_hw_counters")],
    }


# --------------------------------------------------------------------------- parsing

@dataclass
class NeuronReport:
    """What we keep from one neuron-monitor report. Missing sections leave fields empty."""

    instance_type: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)
    runtimes: int = 0
    core_utilization: dict[str, float] = field(default_factory=dict)   # core -> ratio 0..1
    core_flops: dict[str, float] = field(default_factory=dict)         # core -> FLOP/s
    device_memory_bytes: float | None = None                           # summed over runtimes
    host_memory_bytes: float | None = None
    core_memory_bytes: dict[tuple[str, str], float] = field(default_factory=dict)  # (core, category)
    executions: dict[str, float] = field(default_factory=dict)         # status -> count in period
    errors: dict[str, float] = field(default_factory=dict)             # type -> count in period
    latency_seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # (kind, quantile)
    ecc_events: dict[tuple[str, str], float] = field(default_factory=dict)  # (device, event)
    section_errors: dict[str, int] = field(default_factory=dict)       # group -> reports with error


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _obj(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _quantile(key: str) -> str | None:
    # "p50" -> "0.5", "p0" -> "0", "p100" -> "1"
    if not key.startswith("p"):
        return None
    try:
        return f"{float(key[1:]) / 100:g}"
    except ValueError:
        return None


def parse_report(report: Mapping[str, Any] | str | bytes) -> NeuronReport:
    """Parse one neuron-monitor report (dict or JSON text). Tolerates absent or null sections."""
    data = json.loads(report) if isinstance(report, (str, bytes)) else report
    if not isinstance(data, Mapping):
        raise ValueError(f"neuron-monitor report must be a JSON object, got {type(data).__name__}")
    out = NeuronReport()
    out.instance_type = str(_obj(data.get("instance_info")).get("instance_type") or "")
    hw = _obj(data.get("neuron_hardware_info"))
    out.hardware = {k: v for k, v in hw.items() if k != "error"}

    errors: dict[str, int] = defaultdict(int)
    device_mem = host_mem = None
    runtimes = data.get("neuron_runtime_data")
    runtimes = runtimes if isinstance(runtimes, list) else []
    out.runtimes = len(runtimes)
    for rt in runtimes:
        rep = _obj(_obj(rt).get("report"))
        for group_name, group in rep.items():
            if _obj(group).get("error"):
                errors[group_name] += 1

        counters = _obj(rep.get("neuroncore_counters"))
        for core, c in _obj(counters.get("neuroncores_in_use")).items():
            util = _num(_obj(c).get("neuroncore_utilization"))
            if util is not None:
                # A core belongs to one process; max() only guards against duplicates.
                out.core_utilization[str(core)] = max(util / 100.0,
                                                      out.core_utilization.get(str(core), 0.0))
            flops = _num(_obj(c).get("flops"))
            if flops is not None:
                out.core_flops[str(core)] = flops

        used = _obj(_obj(rep.get("memory_used")).get("neuron_runtime_used_bytes"))
        dev, host = _num(used.get("neuron_device")), _num(used.get("host"))
        if dev is not None:
            device_mem = (device_mem or 0.0) + dev
        if host is not None:
            host_mem = (host_mem or 0.0) + host
        per_core = _obj(_obj(used.get("usage_breakdown")).get("neuroncore_memory_usage"))
        for core, cats in per_core.items():
            for cat, v in _obj(cats).items():
                n = _num(v)
                if n is not None:
                    key = (str(core), str(cat))
                    out.core_memory_bytes[key] = out.core_memory_bytes.get(key, 0.0) + n

        stats = _obj(rep.get("execution_stats"))
        for status, v in _obj(stats.get("execution_summary")).items():
            n = _num(v)
            if n is not None:
                out.executions[status] = out.executions.get(status, 0.0) + n
        for etype, v in _obj(stats.get("error_summary")).items():
            n = _num(v)
            if n is not None:
                out.errors[etype] = out.errors.get(etype, 0.0) + n
        for kind_key, kind in (("total_latency", "total"), ("device_latency", "device")):
            # null when nothing ran in the period. With several runtimes, keep the worst.
            for pkey, v in _obj(_obj(stats.get("latency_stats")).get(kind_key)).items():
                q, n = _quantile(pkey), _num(v)
                if q is not None and n is not None:
                    key = (kind, q)
                    out.latency_seconds[key] = max(n, out.latency_seconds.get(key, 0.0))

    system = _obj(data.get("system_data"))
    for group_name, group in system.items():
        if _obj(group).get("error"):
            errors[f"system.{group_name}"] += 1
    devices = _obj(system.get("neuron_hw_counters")).get("neuron_devices")
    for d in devices if isinstance(devices, list) else []:
        d = _obj(d)
        idx = str(d.get("neuron_device_index", ""))
        for k, v in d.items():
            n = _num(v)
            if k != "neuron_device_index" and n is not None:
                out.ecc_events[(idx, k)] = n

    out.device_memory_bytes, out.host_memory_bytes = device_mem, host_mem
    out.section_errors = dict(errors)
    return out


# --------------------------------------------------------------------------- collector

class NeuronMonitorCollector(Collector):
    """Prometheus collector over the latest report, with per-period counts summed into totals."""

    def __init__(self, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._latest: NeuronReport | None = None
        self._latest_at: float | None = None
        self._reports = 0
        self._bad_lines = 0
        self._executions: dict[str, float] = {s: 0.0 for s in EXECUTION_STATUSES}
        self._errors: dict[str, float] = {e: 0.0 for e in ERROR_TYPES}
        self._ecc: dict[tuple[str, str], float] = defaultdict(float)
        self._section_errors: dict[str, float] = defaultdict(float)

    def update(self, report: NeuronReport) -> None:
        with self._lock:
            self._latest = report
            self._latest_at = self._clock()
            self._reports += 1
            for k, v in report.executions.items():
                self._executions[k] = self._executions.get(k, 0.0) + v
            for k, v in report.errors.items():
                self._errors[k] = self._errors.get(k, 0.0) + v
            for k, v in report.ecc_events.items():
                self._ecc[k] += v
            for k, v in report.section_errors.items():
                self._section_errors[k] += v

    def count_bad(self) -> None:
        with self._lock:
            self._bad_lines += 1

    def feed(self, text: str | bytes) -> bool:
        """Parse one report's JSON text; bad input is counted and skipped, never raised."""
        try:
            report = parse_report(text)
        except (ValueError, TypeError) as e:
            with self._lock:
                self._bad_lines += 1
            log.debug("skipping unparsable neuron-monitor output: %s", e)
            return False
        self.update(report)
        return True

    def collect(self) -> Iterable:
        p = "neuronserve"
        with self._lock:
            r = self._latest
            age = None if self._latest_at is None else self._clock() - self._latest_at
            reports, bad = self._reports, self._bad_lines
            executions, errors = dict(self._executions), dict(self._errors)
            ecc, section_errors = dict(self._ecc), dict(self._section_errors)

        m = CounterMetricFamily(f"{p}_neuron_monitor_reports_total",
                                "neuron-monitor reports parsed.")
        m.add_metric([], reports)
        yield m
        m = CounterMetricFamily(f"{p}_neuron_monitor_bad_reports_total",
                                "neuron-monitor output that could not be parsed.")
        m.add_metric([], bad)
        yield m
        if r is None:
            return
        m = GaugeMetricFamily(f"{p}_neuron_monitor_report_age_seconds",
                              "Seconds since the last neuron-monitor report.")
        m.add_metric([], age or 0.0)
        yield m

        hw = r.hardware
        m = GaugeMetricFamily(
            f"{p}_neuron_hardware_info", "Neuron hardware of this node (value 1).",
            labels=["instance_type", "neuron_device_type", "neuroncore_version",
                    "neuron_devices", "neuroncores_per_device"])
        m.add_metric([r.instance_type, str(hw.get("neuron_device_type", "")),
                      str(hw.get("neuroncore_version", "")),
                      str(hw.get("neuron_device_count", "")),
                      str(hw.get("neuroncore_per_device_count", ""))], 1.0)
        yield m
        m = GaugeMetricFamily(f"{p}_neuron_runtimes",
                              "Neuron runtime processes neuron-monitor reports on.")
        m.add_metric([], r.runtimes)
        yield m

        m = GaugeMetricFamily(f"{p}_neuroncore_utilization_ratio",
                              "NeuronCore utilisation over the last period, 0..1.",
                              labels=["neuroncore"])
        for core, v in sorted(r.core_utilization.items(), key=_core_order):
            m.add_metric([core], v)
        yield m
        m = GaugeMetricFamily(f"{p}_neuroncore_flops", "Floating point operations per second "
                              "over the last period.", labels=["neuroncore"])
        for core, v in sorted(r.core_flops.items(), key=_core_order):
            m.add_metric([core], v)
        yield m

        if r.device_memory_bytes is not None:
            m = GaugeMetricFamily(f"{p}_neuron_device_memory_bytes",
                                  "Neuron device memory used by all runtimes.")
            m.add_metric([], r.device_memory_bytes)
            yield m
        if r.host_memory_bytes is not None:
            m = GaugeMetricFamily(f"{p}_neuron_host_memory_bytes",
                                  "Host memory used by all Neuron runtimes.")
            m.add_metric([], r.host_memory_bytes)
            yield m
        m = GaugeMetricFamily(f"{p}_neuroncore_memory_bytes",
                              "Device memory per NeuronCore by use (constants, model_code, ...).",
                              labels=["neuroncore", "category"])
        for (core, cat), v in sorted(r.core_memory_bytes.items()):
            m.add_metric([core, cat], v)
        yield m

        m = CounterMetricFamily(f"{p}_neuron_execution_total",
                                "Neuron runtime executions by outcome.", labels=["status"])
        for k, v in sorted(executions.items()):
            m.add_metric([k], v)
        yield m
        m = CounterMetricFamily(f"{p}_neuron_execution_errors_total",
                                "Neuron runtime execution errors by type.", labels=["error_type"])
        for k, v in sorted(errors.items()):
            m.add_metric([k], v)
        yield m
        m = GaugeMetricFamily(f"{p}_neuron_execution_latency_seconds",
                              "Runtime-measured execution latency percentiles over the last "
                              "period (kind total or device).", labels=["kind", "quantile"])
        for (kind, q), v in sorted(r.latency_seconds.items()):
            m.add_metric([kind, q], v)
        yield m
        m = CounterMetricFamily(f"{p}_neuron_ecc_events_total",
                                "ECC events per Neuron device.", labels=["neuron_device", "event"])
        for (dev, ev), v in sorted(ecc.items()):
            m.add_metric([dev, ev], v)
        yield m
        m = CounterMetricFamily(f"{p}_neuron_monitor_group_errors_total",
                                "Reports whose metric group carried an error string.",
                                labels=["group"])
        for g, v in sorted(section_errors.items()):
            m.add_metric([g], v)
        yield m


def _core_order(item: tuple[str, Any]) -> tuple[int, str]:
    k = item[0]
    return (int(k), k) if k.isdigit() else (1 << 30, k)


# --------------------------------------------------------------------------- subprocess

class NeuronMonitor:
    """Runs `neuron-monitor`, feeds each report to a collector, restarts it if it exits."""

    def __init__(self, collector: NeuronMonitorCollector, binary: str, period_s: float = 5.0,
                 extra_args: Iterable[str] = ()) -> None:
        self.collector = collector
        self.binary = binary
        self.period_s = period_s
        self.extra_args = list(extra_args)
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._config_path: str | None = None

    def start(self) -> "NeuronMonitor":
        fd, self._config_path = tempfile.mkstemp(prefix="neuron-monitor-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(monitor_config(self.period_s), f)
        self._thread = threading.Thread(target=self._run, name="neuron-monitor-reader",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._proc = subprocess.Popen(
                    [self.binary, "-c", self._config_path, *self.extra_args],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            except OSError as e:
                log.warning("cannot start %s: %s", self.binary, e)
            else:
                self._read(self._proc.stdout)
                rc = self._proc.wait()
                if not self._stop.is_set():
                    log.warning("neuron-monitor exited with status %s; restarting in %.0f s",
                                rc, backoff)
            if time.monotonic() - started > 60:
                backoff = 1.0
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, 60.0)

    def _read(self, stream) -> None:
        # neuron-monitor writes one report per line. A report pretty-printed over several lines
        # is reassembled: it starts with "{" in column 0 (nested objects are indented) and is
        # complete when it parses. Anything else is counted as bad and skipped.
        pending = b""
        for line in iter(stream.readline, b""):
            if self._stop.is_set():
                break
            if not line.strip():
                continue
            if line.startswith(b"{"):
                if pending:
                    self.collector.count_bad()
                pending = line
            elif pending:
                pending += line
            else:
                self.collector.count_bad()
                continue
            try:
                data = json.loads(pending)
            except ValueError:
                if len(pending) > _MAX_REPORT_BYTES:
                    self.collector.count_bad()
                    pending = b""
                continue
            pending = b""
            if isinstance(data, dict):
                self.collector.update(parse_report(data))
            else:
                self.collector.count_bad()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        if self._config_path:
            try:
                os.unlink(self._config_path)
            except OSError:
                pass


def start_neuron_monitor(collector: NeuronMonitorCollector, binary: str | None = None,
                         period_s: float = 5.0) -> NeuronMonitor | None:
    """Start neuron-monitor feeding `collector`, or return None (logged) when it is absent."""
    binary = binary or find_binary()
    if binary is None:
        log.info("neuron-monitor not found (PATH, %s): NeuronCore hardware metrics disabled",
                 DEFAULT_BINARY)
        return None
    log.info("starting %s (period %gs)", binary, period_s)
    return NeuronMonitor(collector, binary, period_s).start()
