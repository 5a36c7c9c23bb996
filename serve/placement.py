"""How a deployment looks, decided once: its name, the environment its replicas run in, the live
batching knobs (`user_config`) and how replicas, NeuronCores, CPUs and threads are laid out.

The local server (`neuronserve serve`, `serve run`, KubeRay: all through
`neuronserve.serve.app:build_app`) and `neuronserve deploy render` both ask this module, so a
rendered RayService and a local server given the same settings agree.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

from neuronserve.serve.settings import AppArgs

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "NeuronServe"

# vCPUs of a Kubernetes worker pod kept for the raylet and the Serve proxy; replicas get the rest.
POD_RESERVED_CPUS = 1

# Why 4: docs/decisions.md ("CPU: single-threaded forwards, several per replica").
CPU_FORWARDS_PER_REPLICA = 4

# A multi-threaded forward's OpenMP workers spin briefly between operators instead of sleeping
# (docs/decisions.md, "OpenMP spin").
OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}

# Set for every replica: tokenizers must not start their own thread pool inside a replica that
# already runs forwards on every core, and a serving replica never downloads from the Hub.
REPLICA_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def openmp_env(environ: Mapping[str, str]) -> dict[str, str]:
    """OPENMP_ENV, unless `environ` sets OpenMP's waiting itself (then that is kept).

    >>> openmp_env({})
    {'GOMP_SPINCOUNT': '10000'}
    >>> openmp_env({"OMP_WAIT_POLICY": "PASSIVE"})
    {'OMP_WAIT_POLICY': 'PASSIVE'}
    """
    own = {k: environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in environ}
    return own or dict(OPENMP_ENV)


def replica_env(args: AppArgs, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables every replica gets, given the launching process's `environ`.

    >>> replica_env(AppArgs(artifacts="a", metrics_dir="/m"), {})
    {'GOMP_SPINCOUNT': '10000', 'TOKENIZERS_PARALLELISM': 'false', 'HF_HUB_OFFLINE': '1', 'PROMETHEUS_MULTIPROC_DIR': '/m'}
    >>> replica_env(AppArgs(artifacts="a"), {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_X": ""})["OTEL_TRACES_SAMPLER"]
    'traceidratio'

    """
    env = {**openmp_env(environ), **REPLICA_ENV}
    if args.metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = args.metrics_dir
    if environ.get("NEURONSERVE_EXTRA_PYTHONPATH"):
        env["PYTHONPATH"] = environ["NEURONSERVE_EXTRA_PYTHONPATH"]
    for name in ("NEURONSERVE_LOG_LEVEL", "NEURONSERVE_LOG_FORMAT"):  # neuronserve.common.logs
        if environ.get(name):
            env[name] = environ[name]
    # OpenTelemetry's own settings (sampler, service name, resource attributes, exporter headers):
    # replicas on other nodes of a cluster do not inherit the launching shell's environment.
    env.update({k: v for k, v in environ.items() if k.startswith("OTEL_") and v})
    return env


# Set by `neuronserve serve` in the environment of the local Ray it starts, whose processes all
# inherit `replica_env` from it (but the metrics directory, which the replica sets itself:
# `metrics.use_multiproc_dir`). Replicas then need no runtime environment, so they start in the
# worker processes Ray has started ahead of time instead of waiting for new ones.
REPLICA_ENV_INHERITED = "NEURONSERVE_REPLICA_ENV_INHERITED"


def replica_env_inherited(environ: Mapping[str, str]) -> bool:
    return environ.get(REPLICA_ENV_INHERITED) == "1"


def inherited_replica_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a local server puts in its environment before starting Ray: `replica_env` without the
    metrics directory, values already set kept, and the marker.

    >>> sorted(inherited_replica_env({"GOMP_SPINCOUNT": "1"}))
    ['HF_HUB_OFFLINE', 'NEURONSERVE_REPLICA_ENV_INHERITED', 'TOKENIZERS_PARALLELISM']
    """
    env = replica_env(AppArgs(artifacts="."), environ)
    return {**{k: v for k, v in env.items() if k not in environ}, REPLICA_ENV_INHERITED: "1"}


def uses_neuron(args: AppArgs, target: str) -> bool:
    """Whether replicas run on NeuronCores: `--backend`, or with "auto" the artifact's target.

    >>> uses_neuron(AppArgs(artifacts="a"), "inf2"), uses_neuron(AppArgs(artifacts="a", backend="cpu"), "inf2")
    (True, False)
    """
    return args.backend == "neuron" or (args.backend == "auto" and target != "cpu")


def place(args: AppArgs, *, neuron: bool, cpus: int, neuron_cores: int | None = None) -> AppArgs:
    """`args` with the layout filled in, for a cluster of `cpus` CPUs (and `neuron_cores`
    NeuronCores, None when unknown): `num_replicas`, and on CPU `threads_per_replica` and
    `max_concurrent_batches` (`cpu_layout`). Settings the user fixed are kept.

    >>> a = place(AppArgs(artifacts="a"), neuron=False, cpus=2)
    >>> a.num_replicas, a.threads_per_replica, a.max_concurrent_batches
    (1, 1, 2)
    >>> place(AppArgs(artifacts="a", cores_per_replica=2), neuron=True, cpus=4, neuron_cores=24).num_replicas
    12
    >>> a = place(AppArgs(artifacts="a", autoscale="1:2"), neuron=False, cpus=8)  # each of 2 replicas fits
    >>> a.threads_per_replica * a.max_concurrent_batches
    4
    """
    if args.backend == "simulated":  # one device-like replica; it reserves no CPU, like a Neuron one
        return args.model_copy(update={"num_replicas": 1 if args.num_replicas == "auto" else args.num_replicas})
    if neuron:
        replicas = args.num_replicas
        if replicas == "auto":
            replicas = max(1, neuron_cores // args.cores_per_replica) if neuron_cores else 1
        return args.model_copy(update={"num_replicas": replicas})
    layout = args
    if args.autoscale is not None and args.num_replicas == "auto":  # room for MAX replicas at once
        layout = args.model_copy(update={"num_replicas": args.autoscale_range()[1]})
    replicas, threads, forwards = cpu_layout(cpus, layout)
    return args.model_copy(update={"num_replicas": replicas, "threads_per_replica": threads,
                                   "max_concurrent_batches": forwards})


def actor_options(args: AppArgs, *, neuron: bool, env: Mapping[str, str] | None) -> dict:
    """Ray actor options of one replica of placed `args` (see `place`). A Neuron replica is placed by
    its NeuronCores and shares the host's CPUs; a CPU replica reserves the CPUs its forwards use
    (an actor with num_cpus=0 would get 1 thread whatever it runs).

    >>> actor_options(place(AppArgs(artifacts="a"), neuron=False, cpus=8), neuron=False, env={})
    {'num_cpus': 4, 'runtime_env': {'env_vars': {}}}
    """
    if neuron:
        actor: dict = {"num_cpus": 0, "resources": {"neuron_cores": args.cores_per_replica}}
    elif args.backend == "simulated":
        actor = {"num_cpus": 0}
    else:
        actor = {"num_cpus": args.threads_per_replica * args.max_concurrent_batches}
    if env is not None:  # None: the replicas inherit it (`replica_env_inherited`)
        actor["runtime_env"] = {"env_vars": dict(env)}
    return actor


# The input length the default autoscaling target assumes: a sentence or a short passage, the
# common case for embeddings and classification (docs/decisions.md, "Autoscaling").
TYPICAL_INPUT_TOKENS = 128


def target_ongoing_requests(args: AppArgs, max_batch_rows: int) -> float:
    """Requests one replica of placed `args` holds in flight with every batch full: the autoscaler's
    target (`--target-ongoing-requests` when given). A full batch of TYPICAL_INPUT_TOKENS-token rows
    has min(largest compiled batch, max_batch_tokens // TYPICAL_INPUT_TOKENS) rows; the replica runs
    max_concurrent_batches of them at once; a request brings inputs_per_request rows.

    >>> target_ongoing_requests(AppArgs(artifacts="a", max_concurrent_batches=2), max_batch_rows=64)
    32.0
    >>> target_ongoing_requests(AppArgs(artifacts="a", inputs_per_request=4), max_batch_rows=8)
    2.0
    >>> target_ongoing_requests(AppArgs(artifacts="a", target_ongoing_requests=3), max_batch_rows=8)
    3.0
    """
    if args.target_ongoing_requests is not None:
        return float(args.target_ongoing_requests)
    rows_per_batch = max(1, min(max_batch_rows, args.max_batch_tokens // TYPICAL_INPUT_TOKENS))
    return max(1.0, float(args.max_concurrent_batches * rows_per_batch // args.inputs_per_request))


def autoscaling_config(args: AppArgs, max_batch_rows: int) -> dict:
    """Serve's `autoscaling_config` for placed `args` with `autoscale` set.

    A replica starts at once even with MIN 0, so the server proves it loads before saying it is
    ready; it leaves after `downscale_delay_s` of no load.

    >>> c = autoscaling_config(AppArgs(artifacts="a", autoscale="0:2"), max_batch_rows=16)
    >>> c["min_replicas"], c["initial_replicas"], c["max_replicas"], c["target_ongoing_requests"]
    (0, 1, 2, 16.0)
    """
    low, high = args.autoscale_range()
    return {
        "min_replicas": low,
        "initial_replicas": max(low, 1),
        "max_replicas": high,
        "target_ongoing_requests": target_ongoing_requests(args, max_batch_rows),
        # A replica takes tens of seconds to load and warm (a node, minutes): react to load soon,
        # give capacity back only after a lull several warm-ups long.
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
    }


def max_ongoing_requests(args: AppArgs, target: float | None) -> int:
    """Serve's per-replica cap. A replica counts at most this many requests as ongoing (behind
    HAProxy the rest wait for a slot in the replica, uncounted), and the autoscaler sees only that
    count, so with autoscaling the cap stays at least twice the target: load above the target must
    be visible for the application to scale out. A cap the user set lower is refused.

    >>> max_ongoing_requests(AppArgs(artifacts="a"), 600.0)
    1200
    >>> max_ongoing_requests(AppArgs(artifacts="a", max_ongoing_requests=8), None)
    8
    """
    if target is None:
        return args.max_ongoing_requests
    floor = math.ceil(2 * target)
    if "max_ongoing_requests" in args.model_fields_set and args.max_ongoing_requests < floor:
        raise ValueError(
            f"--max-ongoing-requests {args.max_ongoing_requests} is less than twice the autoscaling target "
            f"({target:g} requests per replica): the autoscaler would never see a replica above its target; "
            f"set it to at least {floor}, or lower --target-ongoing-requests")
    return max(args.max_ongoing_requests, floor)


def deployment_config(args: AppArgs, *, neuron: bool, env: Mapping[str, str], max_batch_rows: int | None = None) -> dict:
    """The `NeuronServe` deployment of placed `args`, as Serve config keys: `num_replicas` fixed, or
    with `args.autoscale` an `autoscaling_config` (its target from `max_batch_rows`, the artifact's
    largest compiled batch)."""
    scaling: dict = {"num_replicas": args.num_replicas}
    target = None
    if args.autoscale is not None:
        if max_batch_rows is None:
            raise ValueError("autoscaling needs the artifact's largest compiled batch (max_batch_rows)")
        scaling = {"autoscaling_config": autoscaling_config(args, max_batch_rows)}
        target = scaling["autoscaling_config"]["target_ongoing_requests"]
    return {
        "name": DEPLOYMENT_NAME,
        **scaling,
        "max_ongoing_requests": max_ongoing_requests(args, target),
        # Live-tunable batching knobs (the replica's reconfigure()).
        "user_config": args.user_config(),
        "ray_actor_options": actor_options(args, neuron=neuron, env=env),
        "graceful_shutdown_timeout_s": args.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5.0,
        # Loading and warming every bucket on a NeuronCore takes a while.
        "health_check_timeout_s": 60.0,
        "logging_config": serve_logging_config(access_log=args.access_log),
    }


def serve_logging_config(*, access_log: bool = False, level: str | None = None, fmt: str | None = None) -> dict:
    """Ray Serve's logging config from neuronserve's (--log-level, --log-format; the command exports
    both): the same level and encoding for Serve's own logs and the replicas'. Serve writes its
    access log at INFO, so with `access_log` the level is at most INFO.

    >>> serve_logging_config(access_log=True, level="warning", fmt="json")
    {'log_level': 'INFO', 'encoding': 'JSON', 'enable_access_log': True}
    """
    from neuronserve.common import logs

    level = (level or logs.default_level()).upper()
    fmt = fmt or logs.default_format()
    if access_log and level in ("WARNING", "ERROR"):
        level = "INFO"
    return {"log_level": level, "encoding": "JSON" if fmt == "json" else "TEXT",
            "enable_access_log": access_log}


def deployment_options(args: AppArgs) -> tuple[dict, AppArgs]:
    """Ray Serve options for `NeuronServe` (`Deployment.options`), derived from the artifact and the
    running cluster, and the arguments the replicas get (`place`)."""
    from neuronserve.compile.store import read_manifest

    if args.autoscale is not None and args.num_replicas != "auto":
        raise ValueError(f"--replicas {args.num_replicas} and --autoscale {args.autoscale} both set the replica count: "
                         "give one of them")
    specs = args.artifact_list()
    served = [(name or m.model.name, m) for name, m in ((n, read_manifest(w)) for n, w in specs)]  # s3://: manifest alone
    check_models(served, args, {n: w for (n, _), (_, w) in zip(served, specs) if "://" not in w})
    manifest = served[0][1]
    neuron = uses_neuron(args, manifest.target)
    args = place(args, neuron=neuron, cpus=cluster_cpus(), neuron_cores=cluster_neuron_cores())
    env = None if replica_env_inherited(os.environ) else replica_env(args, os.environ)
    options = deployment_config(args, neuron=neuron, env=env,
                                max_batch_rows=max(b.batch_size for _, m in served for b in m.bucket_list()))
    del options["name"]  # the deployment's own (DEPLOYMENT_NAME)
    if args.host_processes > 1:
        check_host_processes(args, device=neuron or args.backend == "simulated")
    return options, args


def check_host_processes(args: AppArgs, *, device: bool) -> None:
    """`--host-processes N` (N > 1) splits each replica into a device replica and N host processes
    (`serve.remote`): for a device backend only, with a fixed replica count and every model loaded.

    >>> check_host_processes(AppArgs(artifacts="a", host_processes=2), device=False)
    Traceback (most recent call last):
    ...
    ValueError: --host-processes 2 needs a device backend (neuron, or simulated to measure the host path): on the CPU backend the forwards already take the host's CPUs; leave it at 1
    """
    n = args.host_processes
    if not device:
        raise ValueError(f"--host-processes {n} needs a device backend (neuron, or simulated to measure the host "
                         "path): on the CPU backend the forwards already take the host's CPUs; leave it at 1")
    if args.autoscale is not None:
        raise ValueError(f"--host-processes {n} and --autoscale cannot be combined yet: give a fixed --replicas")
    if args.catalog_mode():
        raise ValueError(f"--host-processes {n} and --max-models-per-replica cannot be combined yet: every "
                         "replica must load every model")


def host_process_options(options: dict, args: AppArgs) -> dict:
    """Serve options of the host processes' deployment (`--host-processes`), from the device
    replicas' `options` (`deployment_options`): `host_processes` of them per device replica, on
    no NeuronCore and reserving no CPU (like a Neuron replica, they share the host's vCPUs).

    >>> o = host_process_options({"num_replicas": 2, "ray_actor_options": {"num_cpus": 0,
    ...     "resources": {"neuron_cores": 1}}, "max_ongoing_requests": 1024}, AppArgs(artifacts="a", host_processes=3))
    >>> o["num_replicas"], o["ray_actor_options"]
    (6, {'num_cpus': 0})
    """
    actor = {k: v for k, v in options["ray_actor_options"].items() if k != "resources"}
    actor["num_cpus"] = 0
    return {**options, "num_replicas": options["num_replicas"] * args.host_processes, "ray_actor_options": actor}


def check_models(served: list, args: AppArgs, dirs: dict | None = None) -> None:
    """Several models for one replica, as (name, manifest): each name once, one target, and (on
    Neuron) room for all of them in a replica's NeuronCore memory. Raises ValueError saying which.

    >>> from types import SimpleNamespace as NS
    >>> m = NS(target="cpu")
    >>> check_models([("a", m), ("a", m)], AppArgs(artifacts="x"))
    Traceback (most recent call last):
    ...
    ValueError: two artifacts serve the model name 'a'; name them apart with --artifacts NAME=DIR
    """
    names = [n for n, _ in served]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two artifacts serve the model name {', '.join(map(repr, twice))}; "
                         "name them apart with --artifacts NAME=DIR")
    targets = sorted({m.target for _, m in served})
    if len(targets) > 1:
        listed = ", ".join(f"{n} ({m.target})" for n, m in served)
        raise ValueError(f"the models of one replica must be compiled for one target; got {listed}: "
                         "compile them all for the same target")
    limit = device_memory_limit(targets[0], args)
    if limit is None:
        return
    from neuronserve.models.artifact import device_memory_bytes

    sizes, unknown, notes = [], [], []
    for i, (name, manifest) in enumerate(served):
        size, how = device_memory_bytes(manifest, (dirs or {}).get(name))
        if size is None:
            unknown.append(name)
            continue
        sizes.append((name, size))
        if how != "recorded":
            notes.append(f"{name}'s is {how}")
    if unknown:
        log.warning("device memory of %s is unknown (older manifests of remote artifacts): not counted in the "
                    "start-up check; recompile them to record it", ", ".join(unknown))
    held = args.max_models_per_replica
    if held is not None and held < len(served):
        # A catalog: a replica holds at most `held` models at once; the largest of them must fit.
        sizes = sorted(sizes, key=lambda item: -item[1])[:held]
    total = sum(size for _, size in sizes)
    if total > limit:
        listed = ", ".join(f"{n} {size_text(size)}" for n, size in sizes)
        if held is not None and held < len(served):
            listed = f"the {held} largest, --max-models-per-replica {held}: " + listed
        where = (f"device_memory_gib={args.device_memory_gib:g}" if args.device_memory_gib is not None
                 else f"{args.cores_per_replica} NeuronCore{'s' if args.cores_per_replica > 1 else ''} of "
                      f"{targets[0]} at {NEURONCORE_MEMORY_GIB[targets[0]]:g} GiB each")
        more = max(args.cores_per_replica + 1, math.ceil(total / (limit / args.cores_per_replica)))
        raise ValueError(
            f"the models of one replica need {size_text(total)} of device memory ({listed}"
            + (f"; {'; '.join(notes)}" if notes else "") + f"), more than a replica holds: {size_text(limit)} "
            f"({where}); serve fewer models per replica, give each replica more cores (--cores-per-replica {more}), "
            "or set --device-memory-gib if the limit is wrong")


def size_text(n: int) -> str:
    """Bytes for a message, in GiB from 1 GiB up, else in MiB.

    >>> size_text(17 * 2**30 + 2**29), size_text(3 * 2**20)
    ('17.5 GiB', '3.0 MiB')
    """
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# Device memory of one NeuronCore: inf2/trn1 NeuronCore-v2 16 GiB (32 GiB per chip of 2);
# trn2 a logical NeuronCore-v3 at the default LNC=2, 24 GiB (96 GiB per chip of 4).
NEURONCORE_MEMORY_GIB = {"inf2": 16.0, "trn1": 16.0, "trn2": 24.0}


def device_memory_limit(target: str, args: AppArgs) -> int | None:
    """Bytes of device memory one replica's models may use: `device_memory_gib` when set, else its
    NeuronCores' memory; None on CPU (host memory, not checked unless set)."""
    if args.device_memory_gib is not None:
        return int(args.device_memory_gib * 2 ** 30)
    per_core = NEURONCORE_MEMORY_GIB.get(target)
    return None if per_core is None else int(per_core * args.cores_per_replica * 2 ** 30)


def cluster_neuron_cores() -> int | None:
    """NeuronCores of the Ray cluster (None when no Ray is running)."""
    import ray

    if not ray.is_initialized():
        return None
    return int(ray.cluster_resources().get("neuron_cores", 0))


def cluster_cpus() -> int:
    """CPUs of the Ray cluster, or of this machine when no Ray is running."""
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("CPU", 1))
    return os.cpu_count() or 1


def cpu_layout(cpus: int, args: AppArgs) -> tuple[int, int, int]:
    """(replicas, torch threads per forward, concurrent forwards per replica) for the CPU backend,
    so that replicas x threads x forwards never exceed `cpus`. What the arguments fix is kept; by
    default each replica runs up to CPU_FORWARDS_PER_REPLICA single-threaded forwards at once (one
    per core), with as few replicas as that allows (one copy of the weights, one queue to batch
    from; measurements in docs/decisions.md).

    >>> cpu_layout(2, AppArgs(artifacts="a"))
    (1, 1, 2)
    """
    fixed = args.model_fields_set
    replicas = args.num_replicas
    if args.threads_per_replica:
        threads = args.threads_per_replica
        forwards = args.max_concurrent_batches
        if replicas == "auto":
            replicas = max(1, cpus // (threads * forwards))
        return replicas, threads, forwards
    if replicas == "auto":
        if "max_concurrent_batches" in fixed:  # whole replicas of that many forwards
            replicas = max(1, cpus // args.max_concurrent_batches)
        else:  # each replica's forwards follow its share of cores: the last one may run fewer
            replicas = max(1, -(-cpus // CPU_FORWARDS_PER_REPLICA))
    cores = max(1, cpus // replicas)
    forwards = args.max_concurrent_batches if "max_concurrent_batches" in fixed else cores
    return replicas, max(1, cores // forwards), forwards


# --- generative models (task generate, served by vLLM) ---------------------------------------------
def generate_replicas(neuron_cores: int, tp_degree: int) -> int:
    """Replicas of a generative model on `neuron_cores` NeuronCores: each replica is one
    tensor-parallel group of `tp_degree` cores (Ray's `neuron_cores` resource; NxD Inference and the
    vLLM Neuron plugin drive all of a group's cores from one process). Cores that no whole group
    fills would sit idle, so that is refused rather than rounded down.

    >>> generate_replicas(32, 8), generate_replicas(2, 2)
    (4, 1)
    >>> generate_replicas(24, 16)
    Traceback (most recent call last):
    ...
    ValueError: 24 NeuronCores do not split into tensor-parallel groups of 16 (tp_degree): 8 would sit idle; use a tp_degree that divides 24 (1, 2, 3, 4, 6, 8, 12, 24), or another instance type
    """
    if tp_degree < 1:
        raise ValueError(f"tp_degree {tp_degree}: must be >= 1")
    if neuron_cores < 1:
        raise ValueError(f"no NeuronCores to place a tensor-parallel group of {tp_degree} on")
    divisors = ", ".join(str(d) for d in range(1, neuron_cores + 1) if neuron_cores % d == 0)
    if neuron_cores < tp_degree:
        raise ValueError(f"{neuron_cores} NeuronCores cannot hold one tensor-parallel group of {tp_degree} "
                         f"(tp_degree): recompile with a tp_degree of at most {neuron_cores} ({divisors}), or use an "
                         "instance type with more NeuronCores")
    if neuron_cores % tp_degree:
        raise ValueError(f"{neuron_cores} NeuronCores do not split into tensor-parallel groups of {tp_degree} "
                         f"(tp_degree): {neuron_cores % tp_degree} would sit idle; use a tp_degree that divides "
                         f"{neuron_cores} ({divisors}), or another instance type")
    return neuron_cores // tp_degree


def generate_cpu_layout(cpus: int, tp_degree: int) -> tuple[int, int]:
    """(replicas, CPUs per replica) of a generative model on `cpus` CPUs: one replica takes them all
    (vLLM batches continuously inside it; a second replica would hold a second copy of the weights and
    KV cache and halve each one's threads), split among its `tp_degree` ranks by
    VLLM_CPU_OMP_THREADS_BIND (`neuronserve.models.generation.cpu_threads_bind`), so threads never
    outnumber cores.

    >>> generate_cpu_layout(15, 1), generate_cpu_layout(8, 2)
    ((1, 15), (1, 8))
    """
    if cpus < tp_degree:
        raise ValueError(f"{cpus} CPUs cannot hold {tp_degree} tensor-parallel ranks (tp_degree): each rank needs "
                         "at least one CPU; recompile with a smaller --tp-degree or use more CPUs")
    return 1, cpus


def generate_actor_options(tp_degree: int, *, neuron: bool, cpus: int = 0, env: Mapping[str, str] | None = None) -> dict:
    """Ray actor options of one generative replica: a Neuron replica asks for its tensor-parallel
    group (`tp_degree` NeuronCores; Ray sets NEURON_RT_VISIBLE_CORES to them) and shares the host's
    CPUs; a CPU replica reserves the `cpus` its ranks' threads are bound to.

    >>> generate_actor_options(8, neuron=True)
    {'num_cpus': 0, 'resources': {'neuron_cores': 8}}
    >>> generate_actor_options(1, neuron=False, cpus=15, env={"A": "1"})
    {'num_cpus': 15, 'runtime_env': {'env_vars': {'A': '1'}}}
    """
    actor: dict = {"num_cpus": 0, "resources": {"neuron_cores": tp_degree}} if neuron else {"num_cpus": cpus}
    if env is not None:
        actor["runtime_env"] = {"env_vars": dict(env)}
    return actor


def place_generate(target: str, tp_degree: int, *, cpus: int, neuron_cores: int | None,
                   num_replicas: int | str = "auto", env: Mapping[str, str] | None = None) -> tuple[int, dict]:
    """(replicas, Ray actor options of one replica) of a generative artifact compiled for `target`
    with `tp_degree`, on a cluster of `cpus` CPUs and `neuron_cores` NeuronCores (None: unknown, one
    replica): what the local server and `deploy render` both lay out. A fixed `num_replicas` is kept,
    but never more tensor-parallel groups than the cores hold.

    >>> place_generate("trn1", 8, cpus=128, neuron_cores=32)
    (4, {'num_cpus': 0, 'resources': {'neuron_cores': 8}})
    >>> place_generate("cpu", 1, cpus=2, neuron_cores=None)
    (1, {'num_cpus': 2})
    """
    if target == "cpu":
        replicas, per_replica = generate_cpu_layout(cpus, tp_degree)
        if num_replicas != "auto":
            replicas = int(num_replicas)
            per_replica = cpus // replicas
            generate_cpu_layout(per_replica, tp_degree)  # each replica's ranks need a CPU each
        return replicas, generate_actor_options(tp_degree, neuron=False, cpus=per_replica, env=env)
    fits = generate_replicas(neuron_cores, tp_degree) if neuron_cores else 1
    if num_replicas != "auto" and neuron_cores and int(num_replicas) > fits:
        raise ValueError(f"{num_replicas} replicas of tp_degree {tp_degree} need {int(num_replicas) * tp_degree} "
                         f"NeuronCores; the cluster has {neuron_cores}: use at most {fits} replicas")
    replicas = fits if num_replicas == "auto" else int(num_replicas)
    return replicas, generate_actor_options(tp_degree, neuron=True, env=env)
