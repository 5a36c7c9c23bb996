"""The composition root of a replica: its engine, batcher and metrics, built from its settings.

The HTTP layer (`serve.app`) asks for a `Replica` and calls it; nothing here knows HTTP or Ray.
What a backend can do (threads, packing, spread warm-up) comes from the `Backend` protocol.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field

from neuronserve.common.neuron_sdk import NEURON_TARGETS
from neuronserve.serve.batcher import Batcher
from neuronserve.serve.engine import Engine
from neuronserve.serve.errors import NotFound, NotLoaded
from neuronserve.serve.metrics import CostSplit, ServeMetrics
from neuronserve.serve.protocols.common import Limits
from neuronserve.serve.scheduler import DeviceScheduler
from neuronserve.serve.settings import AppArgs

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """What one replica serves with. `batcher` is set by `build_replica` right after construction."""

    args: AppArgs
    engine: Engine
    metrics: ServeMetrics
    model_name: str
    warmup_s: dict[str, float]
    batcher: Batcher = field(init=False)
    limits: Limits = field(init=False)
    # Seconds of each start-up phase (pull, load, warmup, ready) and where the timing table came
    # from ("cached" or "measured"), set by `build_replica`.
    startup_s: dict[str, float] = field(init=False, default_factory=dict)
    timings: str = field(init=False, default="measured")
    # Set by the HTTP layer: requests of several texts tokenize on a thread of this model's own.
    tokenizing: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.limits = limits_of(self.args, self.model_name, self.engine.task)

    def on_batch(self, record) -> None:
        """The batcher's report of each batch: metrics and queue depth."""
        self.metrics.batch(str(record.bucket), record.rows, record.real_tokens, record.padded_tokens,
                           record.inference_s, record.queue_waits_s, record.packed)
        self.metrics.set_queue(self.batcher.queued_rows, self.batcher.inflight_rows)

    def on_failure(self, bucket, rows: int) -> None:
        """The batcher's report of a batch whose forward raised."""
        self.metrics.batch_failed(str(bucket))

    def health_problem(self) -> str | None:
        """Why this replica should be restarted, or None. The rule: `max_consecutive_failed_batches`
        batches in a row raised on the backend (a device that keeps failing does not heal in
        place; Ray replaces the replica). A batch that succeeds resets the count; 0 turns it off."""
        limit = self.args.max_consecutive_failed_batches
        failed = self.batcher.failed_in_a_row
        if limit and failed >= limit:
            return (f"{failed} batches in a row failed on the backend (max_consecutive_failed_batches={limit}); "
                    "see the errors above in this replica's log")
        return None

    def tick(self) -> None:
        """Once a second: accrue allocated cost and publish queue depth."""
        self.metrics.tick()
        self.metrics.set_queue(self.batcher.queued_rows, self.batcher.inflight_rows)

    def configure(self, args: AppArgs) -> None:
        """New settings (Serve user_config): the batching knobs change live."""
        self.args = args
        self.limits = limits_of(args, self.model_name, self.engine.task)
        self.batcher.configure(args.max_batch_tokens, args.batch_wait_ms, args.max_concurrent_batches,
                               args.max_queued_rows, pack=self.engine.packing and args.packing)


async def tick_every_second(models: "Models") -> None:
    """Accrue allocated cost and publish queue depth once a second (a timer, not a sync point),
    for a replica's models until its task is cancelled."""
    import asyncio

    while True:
        await asyncio.sleep(1.0)
        try:
            models.tick()
        except Exception:
            log.exception("metrics tick failed")


class Models:
    """The models one replica serves, by name, sharing its device (`serve.scheduler`).

    Requests route by model name; a request that names none goes to the first model (in the order
    served) whose task its route serves, so a one-model server answers requests without `model`
    as before. With one model there is no scheduler and no cost split: the one-model path is
    what it was.

    With a `catalog` (name -> (artifact, task) of every model the replica may serve) the replica
    holds only some of them at a time: models come and go (`add`, `remove`), and a model of the
    catalog that is not loaded here is `NotLoaded`, not a 404.
    """

    def __init__(self, replicas: list[Replica], device: DeviceScheduler | None = None,
                 catalog: dict[str, tuple[str, str]] | None = None):
        self.replicas = list(replicas)
        self.by_name = {r.model_name: r for r in replicas}
        self.default = replicas[0] if replicas else None
        self.catalog = catalog
        self.single = len(replicas) == 1 and catalog is None
        self.device = device
        self.names = list(catalog) if catalog is not None else [r.model_name for r in replicas]
        tasks = {n: t for n, (_, t) in catalog.items()} if catalog is not None else {r.model_name: r.engine.task
                                                                                    for r in replicas}
        self._first_for_task: dict[str, str] = {}
        for name, task in tasks.items():
            self._first_for_task.setdefault(task, name)
        self.cost_split = CostSplit([r.metrics for r in replicas]) if not self.single and replicas else None

    def pick(self, name, task: str | None = None) -> Replica:
        """The model a request names (None: the first that serves `task`, else the first), or a 404
        listing those served (`NotLoaded` for a model of the catalog not loaded here)."""
        if name is None:
            name = self._first_for_task.get(task, self.names[0]) if task is not None else self.names[0]
        found = self.by_name.get(name) if isinstance(name, str) else None
        if found is None:
            if self.catalog is not None and isinstance(name, str) and name in self.catalog:
                raise NotLoaded(name)
            raise NotFound(f"model {name!r} is not served here; served models: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return found

    def add(self, replica: Replica) -> None:
        """A model loaded on demand (catalog): it shares the device and the replica's cost."""
        self.replicas.append(replica)
        self.by_name[replica.model_name] = replica
        if self.default is None:
            self.default = replica
        if self.cost_split is None:
            self.cost_split = CostSplit([replica.metrics])
        else:
            self.cost_split.add(replica.metrics)

    def remove(self, name: str) -> Replica | None:
        """A model unloaded (catalog): no new request reaches it; what it has queued still runs."""
        replica = self.by_name.pop(name, None)
        if replica is not None:
            self.replicas.remove(replica)
            if self.cost_split is not None:
                self.cost_split.remove(replica.metrics)
        return replica

    def tick(self) -> None:
        for r in list(self.replicas):
            r.tick()

    def configure(self, args: AppArgs) -> None:
        """New batching knobs for every model, and the device's slots."""
        for r in list(self.replicas):
            r.configure(args.model_copy(update={"artifacts": r.args.artifacts, "model_name": r.args.model_name}))
        if self.device is not None:
            self.device.configure(args.max_concurrent_batches)

    def health_problem(self) -> str | None:
        for r in list(self.replicas):
            problem = r.health_problem()
            if problem:
                return problem if self.single else f"model {r.model_name}: {problem}"
        return None


DEVICE_INLINE_MAX_MS = 0.1


def limits_of(args: AppArgs, model_name: str, task: str) -> Limits:
    return Limits(model_name, task, args.max_inputs_per_request, args.truncate)


def backend_options(kind: str, args: AppArgs) -> dict:
    """Constructor options of the backend `kind` from the settings.

    >>> backend_options("cpu", AppArgs(artifacts="a", threads_per_replica=2))
    {'threads': 2}
    >>> backend_options("neuron", AppArgs(artifacts="a", instance_type="inf2.xlarge"))
    {'expected_target': 'inf2'}
    """
    if kind == "cpu":
        return {"threads": args.threads_per_replica}  # the CPU backend sets its torch threads
    if kind == "simulated":
        return {"profile": args.device_profile}
    family = args.instance_type.split(".")[0] if args.instance_type else None
    return {"expected_target": family} if family in NEURON_TARGETS else {}  # refuse an inf2 artifact on trn1


def make_metrics(args: AppArgs, model_name: str, engine: Engine, counts_cores: bool = True,
                 on_demand: bool = False) -> ServeMetrics:
    """ServeMetrics for this replica. Price and cores per instance come from `common.pricing`
    (settings and NEURONSERVE_PRICES_JSON override it); without an instance type, cost is off."""
    from neuronserve.common.pricing import detect_instance_type

    backend = engine.backend
    if backend.threads is None:  # a device: the replica holds its NeuronCores
        cores = args.cores_per_replica
    else:  # each of the replica's concurrent forwards runs on its own threads
        cores = (args.threads_per_replica or os.cpu_count() or 1) * args.max_concurrent_batches
    instance_type = args.instance_type or detect_instance_type()
    return ServeMetrics(model_name, backend.kind, cores, instance_type or "unknown", args.price_per_hour_usd, None,
                        counts_cores=counts_cores, replica_start=not on_demand)


def timing_cache_for(kind: str, args: AppArgs, engine: Engine):
    """The warm-up timing table this replica may reuse (`serve.timing_cache`): its artifact, on
    its backend and host shape."""
    from neuronserve.compile.compiler import cache_root
    from neuronserve.models.artifact import MANIFEST_NAME
    from neuronserve.serve.timing_cache import TimingCache, artifact_key, host_shape

    if kind == "neuron":
        from neuronserve.common.pricing import detect_instance_type

        instance_type = args.instance_type or detect_instance_type()
    else:
        instance_type = args.instance_type
    shape = host_shape(kind, threads=engine.backend.threads, forwards=args.max_concurrent_batches,
                       instance_type=instance_type, cores_per_replica=args.cores_per_replica,
                       profile=args.device_profile)
    return TimingCache.at(cache_root(), artifact_key(engine.manifest, engine.artifact_dir / MANIFEST_NAME), shape)


def describe_startup(phases: dict[str, float], timings: str) -> str:
    """One line of a replica's start-up phases.

    >>> describe_startup({"pull": 0.0, "load": 1.24, "warmup": 0.61, "ready": 2.0}, "cached")
    'ready in 2.0 s: pull 0.0 s, load 1.2 s, warm-up 0.6 s (cached timings)'
    """
    parts = ", ".join(f"{PHASE_NAMES.get(k, k)} {v:.1f} s" for k, v in phases.items() if k != "ready")
    return f"ready in {phases['ready']:.1f} s: {parts} ({timings} timings)"


PHASE_NAMES = {"warmup": "warm-up"}


def build_models(args: AppArgs, started: float | None = None) -> Models:
    """Every model of `args.artifacts` loaded and warmed up, one after the other, sharing the
    device when there are several (blocking; run it off the event loop)."""
    specs = args.artifact_list()
    if len(specs) == 1:
        # One artifact given as NAME=DIR stays a list of one: the replica gets its DIR and its NAME.
        (name, where), = specs
        return Models([build_replica(args.model_copy(update={"artifacts": where, "model_name": name or args.model_name}),
                                     started)])
    device = DeviceScheduler(args.max_concurrent_batches)
    if args.catalog_mode():
        # More models than a replica holds: none loaded here; the HTTP layer loads them on demand
        # (`load_model`), evicting the least recently used (Ray Serve model multiplexing).
        from neuronserve.compile.store import read_manifest

        catalog: dict[str, tuple[str, str]] = {}
        for name, where in specs:
            manifest = read_manifest(where)
            name = name or manifest.model.name
            if name in catalog:
                raise ValueError(f"two artifacts serve the model name {name!r}; name them apart as NAME=DIR")
            catalog[name] = (where, manifest.task)
        return Models([], device, catalog)
    replicas: list[Replica] = []
    for i, (name, where) in enumerate(specs):
        one = args.model_copy(update={"artifacts": where, "model_name": name})
        replica = build_replica(one, started, device=device, counts_cores=i == 0)
        if replica.model_name in {r.model_name for r in replicas}:
            raise ValueError(f"two artifacts serve the model name {replica.model_name!r} ({where} and "
                             f"{next(r.engine.artifact_dir for r in replicas if r.model_name == replica.model_name)}); "
                             "name them apart as NAME=DIR")
        replicas.append(replica)
    return Models(replicas, device)


def load_model(args: AppArgs, models: Models, name: str) -> Replica:
    """One model of the catalog, loaded and warmed up to share the replica's device (blocking)."""
    where, _ = models.catalog[name]
    one = args.model_copy(update={"artifacts": where, "model_name": name})
    return build_replica(one, device=models.device, counts_cores=False, on_demand=True)


def build_replica(args: AppArgs, started: float | None = None, device: DeviceScheduler | None = None,
                  counts_cores: bool = True, on_demand: bool = False) -> Replica:
    """Load the artifact, warm every bucket up, and wire the batcher and metrics (blocking: seconds
    to minutes; run it off the event loop). `started`: `time.perf_counter()` when the replica
    began starting (default: now), the start of its `ready` phase. `device`: the scheduler this
    model shares the device through with the replica's other models (None: the only one)."""
    from neuronserve.common import logs
    from neuronserve.compile.store import resolve_artifacts
    from neuronserve.models.artifact import Bucket, load_manifest

    logs.configure_from_env()
    started = time.perf_counter() if started is None else started
    # Start-up phases (`neuronserve_startup_seconds{phase}`): pull, load, warmup, ready (in total).
    t0 = time.perf_counter()
    args = args.model_copy(update={"artifacts": str(resolve_artifacts(args.artifacts, log.info))})  # s3:// pulled
    artifacts = args.artifacts
    phases = {"pull": time.perf_counter() - t0}
    t0 = time.perf_counter()
    kind = args.backend
    if kind == "auto":
        kind = "cpu" if load_manifest(artifacts).target == "cpu" else "neuron"
    engine = Engine(artifacts, kind, backend_options=backend_options(kind, args))
    backend = engine.backend
    phases["load"] = time.perf_counter() - t0
    model_name = args.model_name or engine.model_name
    metrics = make_metrics(args, model_name, engine, counts_cores, on_demand)
    forwards = args.max_concurrent_batches
    t0 = time.perf_counter()
    cache = timing_cache_for(kind, args, engine)
    if args.cached_timings:
        warmup_s = cache.load(engine.buckets.buckets)
    else:
        warmup_s = None
        log.info("cached warm-up timings off (cached_timings=false): timing every bucket")
    if warmup_s is not None:
        # Each graph runs once (a NeuronCore loads a graph on its first execution); the batcher
        # refines the cached table from served batches as it would a measured one.
        backend.warmup(forwards=forwards, measure=False)
        timings = "cached"
    else:
        # Warmed up spread over the replica's concurrent forwards, as they run when serving.
        warmup_s = backend.warmup(forwards=forwards)
        cache.save(warmup_s, time.perf_counter() - t0)
        timings = "measured"
    phases["warmup"] = time.perf_counter() - t0
    run_inline = None
    if backend.threads is not None and forwards > 1:
        # The batches the batcher runs on its event loop (cheap ones on an idle replica; nothing
        # runs beside them) use all of the replica's CPUs (threads x concurrent forwards, what Ray
        # reserved): a lone request's forward is faster wide (docs/decisions.md).
        run_inline = functools.partial(engine.run_batch, threads=backend.threads * forwards)
    replica = Replica(args, engine, metrics, model_name, warmup_s)
    replica.batcher = Batcher(
        engine.buckets,
        engine.run_batch,
        max_batch_tokens=args.max_batch_tokens,
        batch_wait_ms=args.batch_wait_ms,
        max_concurrent_batches=forwards,
        max_queued_rows=args.max_queued_rows,
        on_batch=replica.on_batch,
        on_failure=replica.on_failure,
        timings_s={Bucket.parse(k): v for k, v in warmup_s.items()},
        run_inline=run_inline,
        # On a device (Neuron, simulated) a batch runs on the event loop only if it takes less than
        # handing it to a forward thread would (0.1 ms; a NeuronCore execution takes 0.3 ms or
        # more): otherwise the loop would wait out the device's time doing nothing, where a forward
        # thread waits with the GIL free while the loop parses, tokenizes and answers
        # (docs/decisions.md, "Batches on a device leave the event loop").
        inline_max_ms=20.0 if backend.threads is not None else DEVICE_INLINE_MAX_MS,
        pack=engine.packing and args.packing,
        device=device,
        name=model_name,
    )
    phases["ready"] = time.perf_counter() - started
    replica.startup_s, replica.timings = phases, timings
    metrics.startup(phases)
    log.info("%s (%s, %d buckets, %d timed)", describe_startup(phases, timings), kind, len(engine.buckets.buckets),
             len(warmup_s))
    return replica


def build_host_models(args: AppArgs, call, device: dict) -> Models:
    """A host process' models (`--host-processes`, `serve.remote`): each artifact's tokenizer,
    limits and response encoding, with a `RemoteBatcher` that sends its rows to the device replica
    through `call`. `device`: what the device replica said once ready (`serve.device.NeuronDevice.ready`):
    its backend kind and health, and per model its warm-up timings and start-up phases. A host
    process holds no NeuronCore: its metrics count no cores and accrue no cost (the device
    replica's do), only its requests."""
    from neuronserve.compile.store import resolve_artifacts
    from neuronserve.serve.remote import RemoteBatcher

    replicas = []
    for name, where in args.artifact_list():
        one = args.model_copy(update={"model_name": name,
                                      "artifacts": str(resolve_artifacts(where, log.info))})  # the device pulled it
        engine = Engine(one.artifacts, "host", backend_options={"device_kind": device["kind"]})
        engine.backend.device = dict(device["health"])
        model_name = one.model_name or engine.model_name
        info = device["models"][model_name]
        metrics = ServeMetrics(model_name, device["kind"], 0, one.instance_type or "unknown", one.price_per_hour_usd,
                               None, counts_cores=False)
        replica = Replica(one, engine, metrics, model_name, dict(info["warmup_s"]))
        replica.batcher = RemoteBatcher(call, model_name)
        replica.startup_s, replica.timings = dict(info["startup_s"]), info["timings"]
        replicas.append(replica)
    models = Models(replicas)
    models.cost_split = None  # no cost here to split: the device replica's models carry it
    for r in replicas:
        r.metrics.cost_split = None
    return models
