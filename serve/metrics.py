"""Every Prometheus metric neuronserve exports, declared once, and the facade replicas call.

Two modes, chosen by the environment when prometheus_client is first imported:

* multiprocess (`PROMETHEUS_MULTIPROC_DIR` set): each replica process writes its values to
  memory-mapped files in that directory; the per-node exporter (`neuronserve.serve.exporter`) serves the sum.
  Counters of processes that died stay in the files, so aggregated counters never go down when a
  replica restarts. Gauges that describe live state use the `livesum` mode and are dropped by the
  exporter once their process is gone (see `write_heartbeat` and `neuronserve.serve.exporter`).
* in-process (variable unset): a private registry in this process, for offline tools and tests;
  `exposition()` renders it.

Names follow `neuronserve_<what>_<unit>`; counters end in `_total`, durations in `_seconds`.
Ray Serve's own `ray_serve_*` metrics are not repeated here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

PREFIX = "neuronserve"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_PREFIX = "heartbeat_"
HEARTBEAT_INTERVAL_S = 2.0


def _geometric_buckets(start: float, stop: float, factor: float) -> tuple[float, ...]:
    """start, start*factor, ... up to the first value >= stop, rounded to 3 significant digits."""
    out = []
    v = start
    while True:
        out.append(float(f"{v:.3g}"))
        if v >= stop:
            break
        v *= factor
    return tuple(out)


# x1.5 steps from 50 us to ~30 s: 34 buckets. Encoders answer in 1-50 ms, so the resolution sits
# where the traffic is (each bucket is 50% wider than the last, a quantile error below 25%), while
# a stuck request still lands below +Inf.
LATENCY_BUCKETS: tuple[float, ...] = _geometric_buckets(50e-6, 30.0, 1.5)
# Rows per batch: bucket batch sizes are usually powers of two; the half-steps show partial fills.
BATCH_ROWS_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192,
                                         256, 384, 512, 1024)
# Generation (LLM) latencies are longer and wider than an encoder's, so they have buckets of their
# own, x1.5 apart like LATENCY_BUCKETS: time to first token from 5 ms (a short prompt on a fast
# device) to ~2 min (a long prompt queued behind others), 25 buckets; the gap between two tokens
# of a sequence from 1 ms to ~30 s (a decode step stalled by prefills), 27 buckets; a whole
# generation from 10 ms to ~20 min (thousands of tokens on CPU), 31 buckets.
TTFT_BUCKETS: tuple[float, ...] = _geometric_buckets(5e-3, 120.0, 1.5)
ITL_BUCKETS: tuple[float, ...] = _geometric_buckets(1e-3, 30.0, 1.5)
GENERATION_BUCKETS: tuple[float, ...] = _geometric_buckets(10e-3, 1200.0, 1.5)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def multiproc_env(directory: str | os.PathLike) -> dict[str, str]:
    """Environment for a process that must write into `directory` (Ray runtime_env env_vars).

    Ray sets these before the worker process starts, so prometheus_client sees them at import.
    """
    return {MULTIPROC_ENV: str(Path(directory).resolve())}


def ensure_multiproc_dir(path: str | os.PathLike, clean: bool) -> Path:
    """Create the multiprocess directory; with `clean`, delete what earlier runs left there.

    Clean only before any writer of this run started (files of a running writer are mapped into
    it: deleting them loses its values). The KubeRay sidecar gets a fresh emptyDir per pod and
    must not clean; `neuronserve serve` cleans once at start-up, before Ray starts replicas.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is not a directory")
    if clean:
        for f in p.iterdir():
            if f.is_file() and (f.suffix == ".db" or f.name.startswith(HEARTBEAT_PREFIX)):
                f.unlink(missing_ok=True)
    return p


def use_multiproc_dir(path: str | os.PathLike | None) -> None:
    """Write this process's metrics into `path` (the exporter's directory), before any metric
    exists here: how a replica that inherited its environment (a local server's, which cannot hold
    the directory: Ray's own processes would write theirs into it too) gets it."""
    if not path or os.environ.get(MULTIPROC_ENV) == str(path):
        return
    with _lock:
        if _metrics is not None:
            log.warning("metrics already kept in this process; %s=%s not applied", MULTIPROC_ENV, path)
            return
        os.environ[MULTIPROC_ENV] = str(path)
        if not getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.MultiProcessValue()


def _ensure_value_class() -> None:
    # prometheus_client picks its value storage when first imported. If the variable was set
    # later (e.g. by code that imported prometheus_client early), switch now, before any metric
    # child exists, rather than silently keeping values in this process where nobody scrapes them.
    if multiprocess_enabled() and not getattr(values.ValueClass, "_multiprocess", False):
        log.warning("%s was set after prometheus_client was imported; switching to multiprocess "
                    "values now. Set it in the process environment before start-up.", MULTIPROC_ENV)
        values.ValueClass = values.MultiProcessValue()


class Metrics:
    """The declarations. One instance per process (`get_metrics()`), or per test registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        p = PREFIX
        self.requests = Counter(
            f"{p}_requests_total", "Requests answered by a replica, by HTTP status.",
            ["model", "route", "status"], registry=r)
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "End-to-end request time inside the replica: parse, tokenize, queue, infer, respond.",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds", "Time a row waited in the batcher before its batch ran.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram(
            f"{p}_inference_seconds", "Backend forward time of one batch, by compiled bucket.",
            ["model", "bucket"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(
            f"{p}_batch_rows", "Real (non-padding) rows per batch.",
            ["model", "bucket"], buckets=BATCH_ROWS_BUCKETS, registry=r)
        self.tokens_real = Counter(
            f"{p}_tokens_real_total", "Tokens of real input the device processed.",
            ["model", "bucket"], registry=r)
        self.tokens_padded = Counter(
            f"{p}_tokens_padded_total",
            "Tokens the device computed including padding (bucket batch x seq_len per batch).",
            ["model", "bucket"], registry=r)
        self.rows = Counter(f"{p}_rows_total", "Rows (inputs) processed.", ["model"], registry=r)
        self.batches = Counter(f"{p}_batches_total", "Batches run.", ["model", "bucket"],
                               registry=r)
        self.truncated_inputs = Counter(
            f"{p}_truncated_inputs_total",
            "Inputs cut to the longest the model serves (the largest compiled bucket or the model's max_seq_length).",
            ["model", "route"], registry=r)
        self.batches_failed = Counter(
            f"{p}_batches_failed_total", "Batches whose forward raised (their requests answered 500).",
            ["model", "bucket"], registry=r)
        self.loop_lag = Histogram(
            f"{p}_event_loop_lag_seconds",
            "How late the replica's event loop ran a 100 ms timer: above a few ms, the host's CPU "
            "(HTTP, tokenizing, responses) holds requests back, not the device.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.replica_starts = Counter(
            f"{p}_replica_starts_total",
            "Replica processes started (each counts once as it loads its model); above the replicas running: restarts.",
            ["model", "backend"], registry=r)
        self.startup = Gauge(
            f"{p}_startup_seconds",
            "Seconds of each phase of the latest replica start: pull (the artifact from its store; 0 "
            "when local), load (graphs and tokenizer), warmup (each graph run; every bucket timed "
            "unless the cached timing table was used), ready (in total, until it takes requests).",
            ["model", "backend", "phase"], multiprocess_mode="livemostrecent", registry=r)
        self.packed_batches = Counter(
            f"{p}_packed_batches_total", "Batches that packed several rows into a sequence (CPU packing).",
            ["model", "bucket"], registry=r)
        self.inflight_rows = Gauge(
            f"{p}_inflight_rows", "Rows in batches running on the device now.", ["model"],
            multiprocess_mode="livesum", registry=r)
        self.queued_rows = Gauge(
            f"{p}_queued_rows", "Rows waiting in the batcher now.", ["model"],
            multiprocess_mode="livesum", registry=r)
        self.replica_info = Gauge(
            f"{p}_replica_info", "Live replicas (value = count) with their placement.",
            ["model", "backend", "instance_type", "cores"], multiprocess_mode="livesum",
            registry=r)
        self.cores_in_use = Gauge(
            f"{p}_cores_in_use",
            "Cores held by live replicas (NeuronCores, or vCPUs/threads on cpu).", ["backend"],
            multiprocess_mode="livesum", registry=r)
        self.price_per_hour = Gauge(
            f"{p}_price_per_hour_usd", "Instance price used for the cost counters, USD/hour.",
            ["instance_type"], multiprocess_mode="mostrecent", registry=r)
        self.cost_allocated = Counter(
            f"{p}_cost_allocated_usd_total",
            "USD of instance time held by replicas: cores x price per core-second x seconds held.",
            ["model"], registry=r)
        self.cost_busy = Counter(
            f"{p}_cost_busy_usd_total",
            "USD of instance time the replica's device was busy: busy seconds x price per "
            "core-second x cores of the replica.", ["model"], registry=r)
        self.device_busy = Counter(
            f"{p}_device_busy_seconds_total",
            "Sum of batch inference times (can exceed wall time when batches overlap).",
            ["model"], registry=r)
        self.model_loads = Counter(
            f"{p}_model_loads_total",
            "Models loaded into a replica (at its start, or on demand when a catalog of models is larger "
            "than the replicas hold).", ["model"], registry=r)
        self.model_evictions = Counter(
            f"{p}_model_evictions_total",
            "Models unloaded from a replica to make room for another (least recently used first).",
            ["model"], registry=r)
        # Generation (causal LMs served through vLLM): per sequence, timed in the replica as the
        # engine hands its output over (so they include the engine's queueing and detokenizing).
        self.time_to_first_token = Histogram(
            f"{p}_time_to_first_token_seconds",
            "From a sequence handed to the generation engine to its first output token.",
            ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between two output tokens of a sequence (one observation per token after the first; "
            "tokens that arrive together share their gap).", ["model"], buckets=ITL_BUCKETS, registry=r)
        self.generation_duration = Histogram(
            f"{p}_generation_duration_seconds",
            "End-to-end time of a sequence in the generation engine: handed over to its last token.",
            ["model"], buckets=GENERATION_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            f"{p}_prompt_tokens_total", "Prompt tokens of the sequences generation finished or aborted.",
            ["model"], registry=r)
        self.output_tokens = Counter(
            f"{p}_output_tokens_total", "Tokens generated (as they are produced).", ["model"], registry=r)
        self.sequences_running = Gauge(
            f"{p}_sequences_running", "Sequences the generation engine is decoding or prefilling now.",
            ["model"], multiprocess_mode="livesum", registry=r)
        self.sequences_waiting = Gauge(
            f"{p}_sequences_waiting", "Sequences waiting for the generation engine to schedule them.",
            ["model"], multiprocess_mode="livesum", registry=r)
        self.kv_cache_usage = Gauge(
            f"{p}_kv_cache_usage_ratio",
            "Share of the KV-cache blocks in use (0..1), of the fullest live replica (vLLM's count).",
            ["model"], multiprocess_mode="livemax", registry=r)
        # Live replicas of this process, so the livesum gauges are set (idempotent) rather than
        # incremented: a process that reuses a dead one's pid reopens its files and would
        # otherwise add to the stale value.
        self.replica_counts: dict[tuple[str, str, str, str], int] = {}
        self.core_counts: dict[str, int] = {}


_lock = threading.Lock()
_metrics: Metrics | None = None
_local_registry: CollectorRegistry | None = None
_heartbeat: "_Heartbeat | None" = None


def get_metrics() -> Metrics:
    """The process-wide declarations (created on first use, not at import)."""
    global _metrics, _local_registry
    with _lock:
        if _metrics is None:
            _ensure_value_class()
            if multiprocess_enabled():
                # Values go to files; the exporter aggregates them. No registry needed here.
                _metrics = Metrics(registry=None)
            else:
                _local_registry = CollectorRegistry(auto_describe=True)
                _metrics = Metrics(registry=_local_registry)
        return _metrics


def registry() -> CollectorRegistry:
    """A registry to render: the directory's aggregate in multiprocess mode, else this process'."""
    if multiprocess_enabled():
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=os.environ[MULTIPROC_ENV])
        return reg
    get_metrics()
    assert _local_registry is not None
    return _local_registry


def exposition() -> bytes:
    """Prometheus text format of `registry()`."""
    return generate_latest(registry())


# --------------------------------------------------------------------------- liveness heartbeat

def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def heartbeat_path(directory: str | os.PathLike, pid: int) -> Path:
    return Path(directory) / f"{HEARTBEAT_PREFIX}{pid}.json"


def write_heartbeat(directory: str | os.PathLike, pid: int | None = None) -> Path:
    """Create or refresh this process' heartbeat file in the multiprocess directory.

    The exporter uses it to tell live writers from dead ones: by pid when it shares the writer's
    pid namespace, else by the file's age (a KubeRay sidecar does not see the Ray container's pids).
    """
    pid = os.getpid() if pid is None else pid
    path = heartbeat_path(directory, pid)
    try:
        os.utime(path)
    except FileNotFoundError:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "pid_namespace": _pid_namespace(),
                                   "host": socket.gethostname()}))
        os.replace(tmp, path)
    return path


class _Heartbeat(threading.Thread):
    # A thread, not an asyncio task: it must keep beating while a long batch blocks the loop.
    def __init__(self, directory: str, interval_s: float) -> None:
        super().__init__(name="neuronserve-metrics-heartbeat", daemon=True)
        self.directory = directory
        self.interval_s = interval_s
        self.pid = os.getpid()

    def run(self) -> None:
        while True:
            try:
                write_heartbeat(self.directory, self.pid)
            except OSError as e:  # the directory vanished; keep serving, say why once a while
                log.warning("metrics heartbeat failed: %s", e)
            time.sleep(self.interval_s)


def _start_heartbeat() -> None:
    global _heartbeat
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    with _lock:
        if _heartbeat is None or _heartbeat.pid != os.getpid() or not _heartbeat.is_alive():
            write_heartbeat(directory)
            _heartbeat = _Heartbeat(directory, HEARTBEAT_INTERVAL_S)
            _heartbeat.start()


# --------------------------------------------------------------------------- the facade

class ServeMetrics:
    """What a replica records. Cheap calls; safe from several threads.

    Cost: the replica holds `cores` of an instance with `cores_per_instance` cores that costs
    `price_per_hour_usd`; one core-second costs price / 3600 / cores_per_instance.
    `price_per_hour_usd=None` looks the price up in `neuronserve.common.pricing` (with
    `NEURONSERVE_PRICES_JSON` overrides); `cores_per_instance=None` takes the table's cores. If
    either stays unknown the cost counters are not written and one warning says what to set.
    """

    def __init__(self, model: str, backend: str, cores: int, instance_type: str,
                 price_per_hour_usd: float | None, cores_per_instance: int | None, *,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None, counts_cores: bool = True, replica_start: bool = True) -> None:
        if cores < 0:
            raise ValueError(f"cores must be >= 0, got {cores}")
        self.model = model
        self.backend = backend
        self.cores = cores
        self.instance_type = instance_type or "unknown"
        self._clock = clock
        self._m = metrics or get_metrics()
        self._lock = threading.Lock()
        self._closed = False
        self._warned_padding = False
        # Several models in one replica: its cores count once (the first model's), and its
        # allocated cost is split between them by device time (`CostSplit`, which sets this).
        self._held_cores = cores if counts_cores else 0
        self.cost_split: "CostSplit | None" = None
        self.busy_s = 0.0  # device seconds of this model's batches, for the split

        self.price_per_hour_usd, self.cores_per_instance = _resolve_price(
            self.instance_type, price_per_hour_usd, cores_per_instance)
        if self.price_per_hour_usd is not None and self.cores_per_instance:
            self.price_per_core_second = self.price_per_hour_usd / 3600.0 / self.cores_per_instance
        else:
            self.price_per_core_second = None

        m = self._m
        self._rows = m.rows.labels(model)
        self._queue_wait = m.queue_wait.labels(model)
        self._queued = m.queued_rows.labels(model)
        self._inflight = m.inflight_rows.labels(model)
        self._device_busy = m.device_busy.labels(model)
        self._cost_alloc = m.cost_allocated.labels(model) if self.price_per_core_second is not None else None
        self._cost_busy = m.cost_busy.labels(model) if self.price_per_core_second is not None else None
        self._per_bucket: dict[str, tuple] = {}
        self._per_route: dict[str, object] = {}

        if self.price_per_hour_usd is not None:
            m.price_per_hour.labels(self.instance_type).set(self.price_per_hour_usd)
        self._info_key = (model, backend, self.instance_type, str(cores))
        with _lock:
            m.replica_counts[self._info_key] = m.replica_counts.get(self._info_key, 0) + 1
            m.core_counts[backend] = m.core_counts.get(backend, 0) + self._held_cores
            m.replica_info.labels(*self._info_key).set(m.replica_counts[self._info_key])
            m.cores_in_use.labels(backend).set(m.core_counts[backend])
        if replica_start:  # not a model loaded on demand into a running replica
            m.replica_starts.labels(model, backend).inc()
        m.model_loads.labels(model).inc()
        _start_heartbeat()
        self._last_tick = self._clock()

    # -- calls from the serving code

    def loop_lag(self, seconds: float) -> None:
        """How late the event loop woke a timer (host saturation)."""
        child = getattr(self, "_loop_lag", None)
        if child is None:
            child = self._loop_lag = self._m.loop_lag.labels(self.model)
        child.observe(max(0.0, seconds))

    def startup(self, phases: dict[str, float]) -> None:
        """The replica's start-up phases (pull, load, warmup, ready), in seconds."""
        for phase, seconds in phases.items():
            self._m.startup.labels(self.model, self.backend, phase).set(max(0.0, seconds))

    def request(self, route: str, status: int, seconds: float) -> None:
        """One answered request. `route` is the route template (e.g. "/v1/embeddings")."""
        self._m.requests.labels(self.model, route, str(int(status))).inc()
        hist = self._per_route.get(route)
        if hist is None:
            hist = self._per_route[route] = self._m.request_duration.labels(self.model, route)
        hist.observe(max(0.0, seconds))

    def truncated(self, route: str, inputs: int) -> None:
        """Inputs of one request on `route` that were cut to the model's length."""
        self._m.truncated_inputs.labels(self.model, route).inc(inputs)

    def batch(self, bucket: str, rows: int, real_tokens: int, padded_tokens: int,
              inference_seconds: float, queue_waits: Sequence[float], packed: bool = False) -> None:
        """One batch ran (`packed`: several rows per sequence). `padded_tokens` counts every token
        the device computed, padding included (bucket batch_size x seq_len), so padded >= real;
        their ratio is the padding overhead."""
        if padded_tokens < real_tokens and not self._warned_padding:
            self._warned_padding = True
            log.warning("batch reported padded_tokens=%d < real_tokens=%d; padded_tokens must "
                        "count all computed tokens, padding included", padded_tokens, real_tokens)
        children = self._per_bucket.get(bucket)
        if children is None:
            m = self._m
            children = self._per_bucket[bucket] = (
                m.inference.labels(self.model, bucket), m.batch_rows.labels(self.model, bucket),
                m.tokens_real.labels(self.model, bucket), m.tokens_padded.labels(self.model, bucket),
                m.batches.labels(self.model, bucket))
        inference, batch_rows, tok_real, tok_padded, batches = children
        seconds = max(0.0, inference_seconds)
        inference.observe(seconds)
        batch_rows.observe(rows)
        tok_real.inc(real_tokens)
        tok_padded.inc(padded_tokens)
        batches.inc()
        if packed:
            self._m.packed_batches.labels(self.model, bucket).inc()
        self._rows.inc(rows)
        for w in queue_waits:
            self._queue_wait.observe(max(0.0, w))
        self._accrue_busy(seconds)
        if self.cost_split is None:  # shared: split once a second by device time (Replica.tick), not per batch
            self.tick()

    def _accrue_busy(self, seconds: float) -> None:
        """`seconds` more of device-busy time, and their busy cost."""
        self._device_busy.inc(seconds)
        self.busy_s += seconds
        if self._cost_busy is not None and seconds > 0:
            self._cost_busy.inc(seconds * self.price_per_core_second * self.cores)

    def batch_failed(self, bucket: str) -> None:
        """One batch's forward raised."""
        self._m.batches_failed.labels(self.model, bucket).inc()

    def set_queue(self, queued_rows: int, inflight_rows: int) -> None:
        self._queued.set(queued_rows)
        self._inflight.set(inflight_rows)

    def tick(self) -> None:
        """Accrue allocated cost for the time since the last tick."""
        if self.cost_split is not None:
            self.cost_split.tick()
            return
        with self._lock:
            now = self._clock()
            elapsed = now - self._last_tick
            if elapsed <= 0 or self._closed:
                return
            self._last_tick = now
        if self._cost_alloc is not None:
            self._cost_alloc.inc(elapsed * self.price_per_core_second * self.cores)

    def allocated(self, usd: float) -> None:
        """This model's share of its replica's allocated cost (from `CostSplit`)."""
        if self._cost_alloc is not None and usd > 0 and not self._closed:
            self._cost_alloc.inc(usd)

    def evicted(self) -> None:
        """This model was unloaded to make room for another."""
        self._m.model_evictions.labels(self.model).inc()

    def close(self) -> None:
        """The replica is shutting down: final tick, and it no longer counts as live."""
        self.tick()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        m = self._m
        with _lock:
            m.replica_counts[self._info_key] -= 1
            m.core_counts[self.backend] -= self._held_cores
            m.replica_info.labels(*self._info_key).set(m.replica_counts[self._info_key])
            m.cores_in_use.labels(self.backend).set(m.core_counts[self.backend])
        self._queued.set(0)
        self._inflight.set(0)


class GenerationMetrics(ServeMetrics):
    """What a generation replica records: per sequence, its start, its tokens as they arrive and
    its end; per engine step, the scheduler's counts and the KV cache's use (`scheduler`).

    Busy time (`neuronserve_device_busy_seconds_total`, `neuronserve_cost_busy_usd_total`) is the
    wall time in which the engine held at least one sequence: a continuous-batching engine runs
    every sequence it holds in each step, so overlapping sequences do not add up. Allocated cost
    accrues as for encoders (`tick`; the replica calls it once a second).

    Per token this costs one histogram observe and one counter increment (no lock of ours, no
    allocation); the lock is taken per sequence (start, end) and per tick.
    """

    def __init__(self, model: str, backend: str, cores: int, instance_type: str,
                 price_per_hour_usd: float | None, cores_per_instance: int | None, *,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None) -> None:
        super().__init__(model, backend, cores, instance_type, price_per_hour_usd, cores_per_instance,
                         clock=clock, metrics=metrics)
        m = self._m
        self._ttft = m.time_to_first_token.labels(model)
        self._itl = m.inter_token_latency.labels(model)
        self._e2e = m.generation_duration.labels(model)
        self._prompt = m.prompt_tokens.labels(model)
        self._output = m.output_tokens.labels(model)
        self._running = m.sequences_running.labels(model)
        self._waiting = m.sequences_waiting.labels(model)
        self._kv = m.kv_cache_usage.labels(model)
        self._active = 0
        self._busy_since: float | None = None
        self.now = clock

    def _busy(self, sequences: int) -> float:
        """Accrue busy time up to now, then add `sequences` (+1 started, -1 ended); returns now."""
        with self._lock:
            now = self._clock()
            busy = 0.0
            if self._busy_since is not None:
                busy = max(0.0, now - self._busy_since)
            self._active += sequences
            self._busy_since = now if self._active > 0 else None
        if busy > 0:
            self._accrue_busy(busy)
        return now

    def sequence_started(self, prompt_tokens: int) -> float:
        """A sequence was handed to the engine; returns the time its latencies count from."""
        self._prompt.inc(prompt_tokens)
        return self._busy(+1)

    def first_tokens(self, seconds: float, tokens: int) -> None:
        """A sequence's first output, `seconds` after it started, with `tokens` tokens (usually 1;
        the others arrived with it: a gap of 0 each)."""
        self._ttft.observe(max(0.0, seconds))
        for _ in range(tokens - 1):
            self._itl.observe(0.0)
        self._output.inc(tokens)

    def next_tokens(self, gap_s: float, tokens: int) -> None:
        """`tokens` more tokens of a sequence, `gap_s` after its previous ones: each token's
        latency is its share of the gap."""
        each = max(0.0, gap_s) / tokens
        for _ in range(tokens):
            self._itl.observe(each)
        self._output.inc(tokens)

    def sequence_ended(self, started: float, finished: bool) -> None:
        """A sequence finished (its end-to-end time is observed) or was aborted (it is not)."""
        now = self._busy(-1)
        if finished:
            self._e2e.observe(max(0.0, now - started))

    def answered(self, route: str, status: int) -> None:
        """One request answered on `route` (its status; a stream counts when its response starts).
        Its time is in the generation histograms, not `neuronserve_request_duration_seconds`,
        whose buckets are an encoder's."""
        self._m.requests.labels(self.model, route, str(int(status))).inc()

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        """The engine's scheduler after a step: sequences running and waiting, KV cache in use (0..1)."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv.set(kv_cache_usage)

    def tick(self) -> None:
        """Accrue allocated cost, and the busy time of sequences still running, up to now."""
        self._busy(0)
        super().tick()

    def close(self) -> None:
        super().close()
        self.scheduler(0, 0, 0.0)


def hold_cores(backend: str, cores: int, metrics: Metrics | None = None) -> None:
    """A replica whose models come and go (a catalog loaded on demand) holds its cores itself:
    `neuronserve_cores_in_use` counts them once, whichever models are loaded. Negative releases."""
    m = metrics or get_metrics()
    with _lock:
        m.core_counts[backend] = m.core_counts.get(backend, 0) + cores
        m.cores_in_use.labels(backend).set(m.core_counts[backend])


def split_cost(usd: float, busy_s: Sequence[float], total_busy_s: Sequence[float]) -> list[float]:
    """Shares of `usd` (a replica's allocated cost over an interval) for the models it serves: in
    proportion to each model's device-busy seconds in the interval (`busy_s`); an interval in which
    no model was busy, in proportion to their device seconds so far (`total_busy_s`), and equally
    before any. The shares always sum to `usd`.

    >>> split_cost(3.0, [0.5, 0.25], [9.0, 1.0])
    [2.0, 1.0]
    >>> split_cost(1.0, [0.0, 0.0], [3.0, 1.0])
    [0.75, 0.25]
    >>> split_cost(1.0, [0.0, 0.0], [0.0, 0.0])
    [0.5, 0.5]
    """
    for weights in (busy_s, total_busy_s):
        total = sum(max(0.0, w) for w in weights)
        if total > 0:
            return [usd * (max(0.0, w) / total) for w in weights]
    return [usd / len(busy_s)] * len(busy_s)


class CostSplit:
    """The allocated cost of one replica that serves several models, split between them by device
    time (`split_cost`): the models' `neuronserve_cost_allocated_usd_total` sum to what the replica
    costs, however the load is mixed. The first model's `ServeMetrics` gives the price and cores."""

    def __init__(self, members: Sequence[ServeMetrics]) -> None:
        self.members = list(members)
        lead = self.members[0]
        self._clock = lead._clock
        self._lock = threading.Lock()
        self._last = self._clock()
        self._seen = [m.busy_s for m in self.members]
        for m in self.members:
            m.cost_split = self

    def add(self, member: ServeMetrics) -> None:
        """A model loaded into the replica: it shares the cost from now on."""
        self.tick()
        with self._lock:
            self.members.append(member)
            self._seen.append(member.busy_s)
        member.cost_split = self

    def remove(self, member: ServeMetrics) -> None:
        """A model unloaded: the time until now is split with it, later time without it."""
        self.tick()
        with self._lock:
            i = self.members.index(member)
            del self.members[i], self._seen[i]
        member.cost_split = None
        member._last_tick = member._clock()  # closing it later accrues nothing more on its own

    def tick(self) -> None:
        """Accrue the replica's allocated cost since the last tick, split by device time."""
        if not self.members:
            return
        with self._lock:
            lead = self.members[0]
            members = list(self.members)
            now = self._clock()
            elapsed = now - self._last
            if elapsed <= 0:
                return
            self._last = now
            busy = [m.busy_s for m in members]
            delta = [b - s for b, s in zip(busy, self._seen)]
            self._seen = busy
        if lead.price_per_core_second is None:
            return
        usd = elapsed * lead.price_per_core_second * lead.cores
        for m, share in zip(members, split_cost(usd, delta, busy)):
            m.allocated(share)


def _resolve_price(instance_type: str, price: float | None,
                   cores_per_instance: int | None) -> tuple[float | None, int | None]:
    from neuronserve.common import pricing

    if price is not None and (math.isnan(price) or price < 0):
        raise ValueError(f"price_per_hour_usd must be a non-negative number, got {price}")
    if price is None:
        try:
            price = pricing.price_per_hour(instance_type, pricing.load_overrides())
        except (pricing.UnknownInstanceError, pricing.MissingPriceError, ValueError) as e:
            log.warning("cost metrics disabled: %s", e)
            return None, cores_per_instance
    if cores_per_instance is None:
        try:
            cores_per_instance = pricing.get_instance(instance_type).cores
        except pricing.UnknownInstanceError:
            log.warning("cost metrics disabled: instance type %r is not in the table, so the "
                        "price cannot be split per core; set cores_per_instance", instance_type)
            return price, None
    if cores_per_instance <= 0:
        raise ValueError(f"cores_per_instance must be positive, got {cores_per_instance}")
    return price, cores_per_instance
