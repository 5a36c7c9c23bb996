"""How a deployment looks, decided once: its name, the environment its replicas run in, the live
batching knobs (`user_config`) and how replicas, NeuronCores, CPUs and threads are laid out.

The local server (`neuronserve serve`, `serve run`, KubeRay: all through
`neuronserve.serve.app:build_app`) and `neuronserve deploy render` both ask this module, so a
rendered RayService and a local server given the same settings agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from neuronserve.serve.settings import AppArgs

DEPLOYMENT_NAME = "NeuronServe"

# Why 4: docs/decisions.d/placement.md ("CPU: single-threaded forwards, several per replica").
CPU_FORWARDS_PER_REPLICA = 4

# A multi-threaded forward's OpenMP workers spin briefly between operators instead of sleeping
# (docs/decisions.d/placement.md, "OpenMP spin").
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
    """
    env = {**openmp_env(environ), **REPLICA_ENV}
    if args.metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = args.metrics_dir
    if environ.get("NEURONSERVE_EXTRA_PYTHONPATH"):
        env["PYTHONPATH"] = environ["NEURONSERVE_EXTRA_PYTHONPATH"]
    return env


def deployment_options(args: AppArgs) -> tuple[dict, AppArgs]:
    """Ray Serve options for `NeuronServe`, derived from the artifact and the cluster, and the
    arguments the replicas get: on CPU with the layout (`cpu_layout`) filled in."""
    from neuronserve.models.artifact import load_manifest

    manifest = load_manifest(args.artifacts)
    neuron = args.backend == "neuron" or (args.backend == "auto" and manifest.target != "cpu")
    if neuron:
        actor = {"num_cpus": 0, "resources": {"neuron_cores": args.cores_per_replica}}
        replicas = neuron_replicas(args) if args.num_replicas == "auto" else args.num_replicas
    else:
        # A Ray actor with num_cpus=0 would get 1 thread whatever it runs: reserve what it uses.
        replicas, threads, forwards = cpu_layout(cluster_cpus(), args)
        args = args.model_copy(update={"num_replicas": replicas, "threads_per_replica": threads,
                                       "max_concurrent_batches": forwards})
        actor = {"num_cpus": threads * forwards}
    actor["runtime_env"] = {"env_vars": replica_env(args, os.environ)}
    return {
        "num_replicas": replicas,
        "ray_actor_options": actor,
        "max_ongoing_requests": args.max_ongoing_requests,
        "user_config": args.user_config(),
        "graceful_shutdown_timeout_s": args.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5,
        "logging_config": {"enable_access_log": args.access_log},
    }, args


def neuron_replicas(args: AppArgs) -> int:
    """One replica per `cores_per_replica` NeuronCores the cluster has (1 without Ray)."""
    import ray

    if not ray.is_initialized():
        return 1
    return max(1, int(ray.cluster_resources().get("neuron_cores", 0)) // args.cores_per_replica)


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
    from; measurements in docs/decisions.d/placement.md).

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
        per = args.max_concurrent_batches if "max_concurrent_batches" in fixed else CPU_FORWARDS_PER_REPLICA
        replicas = max(1, -(-cpus // per))
    cores = max(1, cpus // replicas)
    forwards = args.max_concurrent_batches if "max_concurrent_batches" in fixed else cores
    return replicas, max(1, cores // forwards), forwards
