"""The per-node metrics exporter: one HTTP endpoint with everything Prometheus scrapes here.

Serves, on `metrics_port` (default 9400):
* the aggregate of every replica's multiprocess files in the directory (`neuronserve.serve.metrics`),
* NeuronCore metrics from `neuron-monitor` when the binary exists (`neuronserve.serve.neuron_monitor`),
* a few exporter self-metrics (`neuronserve_exporter_*`).

It also removes the live-gauge files of writers that died, so gauges such as
`neuronserve_inflight_rows` stop counting them; counters and histograms of dead writers are kept so
totals never go down. A writer is dead when its pid is gone (if we share its pid namespace) or when
its heartbeat file is older than `stale_after_s` (a KubeRay sidecar cannot see the Ray
container's pids).

In-process: `start_exporter(dir, port)` (used by `neuronserve serve`).
Sidecar: `neuronserve metrics-exporter --dir DIR --port 9400`.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from neuronserve.serve.metrics import HEARTBEAT_PREFIX, MULTIPROC_ENV, ensure_multiproc_dir

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400
_DB_PID = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db$")
_LIVE_GAUGE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def _own_pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DeadWriterCleaner:
    """Finds writers of the multiprocess directory that died and drops their live gauges."""

    def __init__(self, directory: str | os.PathLike, stale_after_s: float = 30.0,
                 wall_clock=time.time) -> None:
        self.directory = str(directory)
        self.stale_after_s = stale_after_s
        self._now = wall_clock
        self._own_ns = _own_pid_namespace()
        self.cleaned_total = 0
        self.live_writers = 0

    def _heartbeat(self, pid: int) -> tuple[dict | None, float | None]:
        path = Path(self.directory) / f"{HEARTBEAT_PREFIX}{pid}.json"
        try:
            mtime = path.stat().st_mtime
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return None, None
        return info, mtime

    def is_alive(self, pid: int) -> bool:
        info, mtime = self._heartbeat(pid)
        if info is not None and mtime is not None:
            same_ns = bool(self._own_ns) and info.get("pid_namespace") == self._own_ns
            if same_ns:
                return _pid_alive(pid)
            return self._now() - mtime < self.stale_after_s
        # No heartbeat (a writer that is not a ServeMetrics): the pid is all we have.
        return _pid_alive(pid)

    def run(self) -> list[int]:
        """One pass; returns the pids found dead and cleaned."""
        live_gauge_pids, all_pids = set(), set()
        for name in os.listdir(self.directory):
            m = _DB_PID.match(name)
            if m:
                all_pids.add(int(m.group(1)))
            m = _LIVE_GAUGE.match(name)
            if m:
                live_gauge_pids.add(int(m.group(1)))
        heartbeat_pids = {int(n[len(HEARTBEAT_PREFIX):-5])
                          for n in os.listdir(self.directory)
                          if n.startswith(HEARTBEAT_PREFIX) and n.endswith(".json")
                          and n[len(HEARTBEAT_PREFIX):-5].isdigit()}
        dead = []
        for pid in sorted(live_gauge_pids | heartbeat_pids):
            if not self.is_alive(pid):
                mark_process_dead(pid, self.directory)
                (Path(self.directory) / f"{HEARTBEAT_PREFIX}{pid}.json").unlink(missing_ok=True)
                dead.append(pid)
        self.cleaned_total += len(dead)
        self.live_writers = len((live_gauge_pids | heartbeat_pids) - set(dead))
        if dead:
            log.info("metrics: dropped live gauges of dead writer pid(s) %s",
                     ", ".join(map(str, dead)))
        return dead


class AggregateCollector(Collector):
    """MultiProcessCollector over the directory, with dead-writer cleanup before each read.

    Only families named `prefix*` are served: if PROMETHEUS_MULTIPROC_DIR reaches other Python
    processes of the container (Ray's dashboard and agents use prometheus_client too), their
    values land in the directory as well, and Ray already exports them on its own port.
    """

    def __init__(self, directory: str | os.PathLike, stale_after_s: float = 30.0,
                 cleanup_interval_s: float = 5.0, prefix: str = "neuronserve_") -> None:
        self.directory = str(directory)
        self.prefix = prefix
        self.cleaner = DeadWriterCleaner(directory, stale_after_s)
        self.cleanup_interval_s = cleanup_interval_s
        self._lock = threading.Lock()
        self._last_cleanup = float("-inf")

    def cleanup(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if force or now - self._last_cleanup >= self.cleanup_interval_s:
                self._last_cleanup = now
                try:
                    self.cleaner.run()
                except OSError as e:
                    log.warning("metrics cleanup failed: %s", e)

    def collect(self) -> Iterable:
        self.cleanup()
        started = time.perf_counter()
        files = glob.glob(os.path.join(self.directory, "*.db"))
        for metric in MultiProcessCollector.merge(files, accumulate=True):
            if metric.name.startswith(self.prefix):
                yield metric
        m = GaugeMetricFamily("neuronserve_exporter_live_writers",
                              "Processes writing metrics into the directory that are alive.")
        m.add_metric([], self.cleaner.live_writers)
        yield m
        m = CounterMetricFamily("neuronserve_exporter_dead_writers_total",
                                "Writer processes found dead and their live gauges dropped.")
        m.add_metric([], self.cleaner.cleaned_total)
        yield m
        m = GaugeMetricFamily("neuronserve_exporter_files",
                              "Multiprocess files aggregated (grows with replica restarts).")
        m.add_metric([], len(files))
        yield m
        m = GaugeMetricFamily("neuronserve_exporter_collect_seconds",
                              "Time to merge the multiprocess files for this scrape.")
        m.add_metric([], time.perf_counter() - started)
        yield m


class Exporter:
    """A running exporter. `.port` is the bound port (useful with port=0); `.stop()` ends it."""

    def __init__(self, server, thread: threading.Thread, registry: CollectorRegistry,
                 aggregate: AggregateCollector, monitor=None) -> None:
        self._server = server
        self._thread = thread
        self.registry = registry
        self.aggregate = aggregate
        self.monitor = monitor
        self.host = server.server_address[0]
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def build_registry(multiproc_dir: str | os.PathLike, neuron_monitor: bool = True, *,
                   stale_after_s: float = 30.0, neuron_monitor_period_s: float = 5.0):
    """The exporter's registry (no HTTP): aggregate + neuron-monitor. Returns (registry,
    aggregate collector, monitor or None)."""
    directory = Path(multiproc_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"metrics directory {directory} does not exist; create it (or "
                                f"pass the directory the replicas get as {MULTIPROC_ENV})")
    reg = CollectorRegistry(auto_describe=False)
    aggregate = AggregateCollector(directory, stale_after_s=stale_after_s)
    reg.register(aggregate)
    monitor = None
    if neuron_monitor:
        from neuronserve.serve.neuron_monitor import NeuronMonitorCollector, start_neuron_monitor

        collector = NeuronMonitorCollector()
        monitor = start_neuron_monitor(collector, period_s=neuron_monitor_period_s)
        if monitor is not None:
            reg.register(collector)
    return reg, aggregate, monitor


def start_exporter(multiproc_dir: str | os.PathLike, port: int = DEFAULT_PORT,
                   host: str = "0.0.0.0", neuron_monitor: bool = True, *,
                   stale_after_s: float = 30.0,
                   neuron_monitor_period_s: float = 5.0) -> Exporter:
    """Serve the node's metrics on http://host:port/metrics in a background thread."""
    from prometheus_client.exposition import start_http_server

    reg, aggregate, monitor = build_registry(
        multiproc_dir, neuron_monitor, stale_after_s=stale_after_s,
        neuron_monitor_period_s=neuron_monitor_period_s)
    try:
        server, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as e:
        if monitor is not None:
            monitor.stop()
        raise OSError(e.errno, f"cannot listen on {host}:{port} for metrics ({e.strerror}); "
                               f"pick another metrics_port") from None
    exporter = Exporter(server, thread, reg, aggregate, monitor)
    log.info("metrics exporter on %s (directory %s)", exporter.url, multiproc_dir)
    return exporter


# --------------------------------------------------------------------------- CLI

def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "metrics-exporter",
        help="serve the node's replica metrics (and neuron-monitor's) for Prometheus",
        description="Aggregate the prometheus_client multiprocess files replicas write and serve "
                    "them, with NeuronCore metrics from neuron-monitor when installed. Run one "
                    "per node, e.g. as a sidecar sharing the metrics emptyDir with the Ray "
                    "container.")
    p.add_argument("--dir", default=os.environ.get(MULTIPROC_ENV),
                   help=f"multiprocess directory (default: ${MULTIPROC_ENV})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to serve /metrics on (default {DEFAULT_PORT})")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--no-neuron-monitor", dest="neuron_monitor", action="store_false",
                   help="do not run neuron-monitor even if installed")
    p.add_argument("--neuron-monitor-period-s", type=float, default=5.0,
                   help="neuron-monitor report period in seconds (default 5)")
    p.add_argument("--stale-after-s", type=float, default=30.0,
                   help="a writer whose heartbeat is older than this is dead (default 30)")
    p.add_argument("--clean", action="store_true",
                   help="delete files left by earlier runs first (only before replicas start)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.dir:
        print(f"error: no metrics directory: pass --dir or set {MULTIPROC_ENV}", file=sys.stderr)
        return 2
    if not (0 <= args.port <= 65535):
        print(f"error: --port {args.port} is not a port number (0-65535)", file=sys.stderr)
        return 2
    try:
        ensure_multiproc_dir(args.dir, clean=args.clean)
        exporter = start_exporter(args.dir, args.port, args.host, args.neuron_monitor,
                                  stale_after_s=args.stale_after_s,
                                  neuron_monitor_period_s=args.neuron_monitor_period_s)
    except OSError as e:
        print(f"error: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"neuronserve metrics exporter: {exporter.url} (directory {args.dir})", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    exporter.stop()
    return 0
