"""CPU placement: replicas x threads x concurrent forwards never exceed the CPUs; what the user
fixed is kept."""

import pytest

from neuronserve.serve.placement import CPU_FORWARDS_PER_REPLICA, cpu_layout
from neuronserve.serve.settings import AppArgs


def args(**kw) -> AppArgs:
    return AppArgs(artifacts="unused", **kw)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 5, 8, 16, 96])
def test_default_is_single_threaded_forwards_one_per_core(cpus):
    replicas, threads, forwards = cpu_layout(cpus, args())
    assert threads == 1
    assert forwards <= CPU_FORWARDS_PER_REPLICA
    assert replicas * threads * forwards <= cpus
    assert replicas * forwards >= cpus - replicas + 1  # at most one idle core per replica


def test_two_cores_run_one_replica_with_two_forwards():
    assert cpu_layout(2, args()) == (1, 1, 2)
    assert cpu_layout(8, args()) == (2, 1, 4)


@pytest.mark.parametrize(
    "kw, cpus, want",
    [
        ({"threads_per_replica": 2}, 8, (4, 2, 1)),  # threads given: forwards stay at the setting
        ({"threads_per_replica": 1, "max_concurrent_batches": 2}, 8, (4, 1, 2)),
        ({"num_replicas": 2}, 8, (2, 1, 4)),  # replicas given: each gets its share of cores
        ({"num_replicas": 1, "max_concurrent_batches": 2}, 8, (1, 4, 2)),
        ({"max_concurrent_batches": 1}, 4, (4, 1, 1)),  # one forward each: one replica per core
        ({"max_concurrent_batches": 3}, 14, (4, 1, 3)),  # whole replicas of 3 forwards: 12 of 14 cores
        ({"num_replicas": 3}, 2, (3, 1, 1)),  # more replicas than cores: never below 1 thread
    ],
)
def test_what_is_set_is_kept(kw, cpus, want):
    assert cpu_layout(cpus, args(**kw)) == want


def test_application_reserves_the_cpus_its_forwards_use(tmp_path):
    """build_app (what `serve run`, KubeRay and the CLI all run) on CPU: replicas, Ray num_cpus,
    torch threads and the user_config's concurrent batches all follow one layout."""
    import os

    from neuronserve.serve.app import build_app
    from tests.fixtures.manifests import make_artifact

    art = str(make_artifact(tmp_path / "art", "cpu"))
    cpus = os.cpu_count() or 1  # no Ray here: the builder splits this machine's CPUs
    for kw in ({}, {"num_replicas": 1, "max_concurrent_batches": 1}):
        a = args(**kw).model_copy(update={"artifacts": art})
        dep = build_app(a)._bound_deployment
        replicas, threads, forwards = cpu_layout(cpus, a)
        assert dep.num_replicas == replicas
        assert dep.ray_actor_options["num_cpus"] == threads * forwards
        assert dep.user_config["max_concurrent_batches"] == forwards
        assert dep.init_args[0]["threads_per_replica"] == threads
        assert replicas * threads * forwards <= max(cpus, replicas)


def test_replicas_get_a_short_openmp_spin_unless_the_user_set_one(tmp_path, monkeypatch):
    """Multi-threaded forwards (a lone batch runs on all of its replica's cores) need OpenMP's
    workers to spin briefly between operators; PASSIVE waiting made them slower than one thread.
    An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT is passed on instead."""
    from neuronserve.serve.app import build_app
    from neuronserve.serve.placement import OPENMP_ENV
    from tests.fixtures.manifests import make_artifact

    art = str(make_artifact(tmp_path / "art", "cpu"))

    def replica_env() -> dict:
        return build_app(args().model_copy(update={"artifacts": art}))._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    env = replica_env()
    assert {k: env[k] for k in OPENMP_ENV} == OPENMP_ENV and "OMP_WAIT_POLICY" not in env
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = replica_env()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env


@pytest.mark.parametrize("cpus", [2, 3, 5, 8, 14, 16])
@pytest.mark.parametrize("forwards", [1, 2, 3, 4])
def test_fixed_concurrent_batches_never_oversubscribe(cpus, forwards):
    replicas, threads, got = cpu_layout(cpus, args(max_concurrent_batches=forwards))
    assert got == forwards
    assert replicas * threads * forwards <= cpus or replicas == 1
