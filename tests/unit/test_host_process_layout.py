"""`--host-processes N`: which applications may split into a device replica and N host processes,
the two deployments' options, and the command's refusal before anything starts."""

from __future__ import annotations

import argparse

import pytest

from neuronserve.serve import serve_cli
from neuronserve.serve.placement import check_host_processes, deployment_options, host_process_options
from neuronserve.serve.settings import AppArgs
from tests.fixtures.manifests import make_artifact


def test_only_a_device_backend_with_fixed_replicas_and_every_model_loaded_splits():
    check_host_processes(AppArgs(artifacts="a", host_processes=4), device=True)  # accepted
    with pytest.raises(ValueError, match="needs a device backend"):
        check_host_processes(AppArgs(artifacts="a", host_processes=2), device=False)
    with pytest.raises(ValueError, match="--autoscale"):
        check_host_processes(AppArgs(artifacts="a", host_processes=2, autoscale="1:2"), device=True)
    with pytest.raises(ValueError, match="--max-models-per-replica"):
        check_host_processes(AppArgs(artifacts=["a", "b", "c"], host_processes=2, max_models_per_replica=1),
                             device=True)


def test_the_application_refuses_a_cpu_artifact_and_takes_a_neuron_one(tmp_path):
    cpu = make_artifact(tmp_path / "cpu", "cpu")
    with pytest.raises(ValueError, match="needs a device backend"):
        deployment_options(AppArgs(artifacts=str(cpu), host_processes=2))
    inf2 = make_artifact(tmp_path / "inf2", "inf2")
    options, args = deployment_options(AppArgs(artifacts=str(inf2), host_processes=3, num_replicas=2))
    host = host_process_options(options, args)
    assert options["num_replicas"] == 2 and options["ray_actor_options"]["resources"] == {"neuron_cores": 1}
    assert host["num_replicas"] == 6 and "resources" not in host["ray_actor_options"]
    assert host["ray_actor_options"]["num_cpus"] == 0
    # Everything else (drain, health checks, batching knobs, logging) is the device replicas' own.
    same = {k: v for k, v in options.items() if k not in ("num_replicas", "ray_actor_options")}
    assert same == {k: v for k, v in host.items() if k not in ("num_replicas", "ray_actor_options")}


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_the_flag_is_bounded(value):
    parser = argparse.ArgumentParser()
    serve_cli.add_subcommand(parser.add_subparsers())
    try:
        ns = parser.parse_args(["serve", "--host-processes", value])
    except SystemExit:
        return  # argparse refused it (not a number)
    with pytest.raises(Exception, match="host_processes"):
        serve_cli._app_args(ns, "a", None)


def test_the_command_refuses_before_starting_anything(tmp_path, capsys, monkeypatch):
    import ray

    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(a))  # Ray may run already (other tests)
    cpu = make_artifact(tmp_path / "cpu", "cpu")
    parser = argparse.ArgumentParser()
    serve_cli.add_subcommand(parser.add_subparsers())
    from tests.fixtures.ports import free_port

    ns = parser.parse_args(["serve", "--artifacts", str(cpu), "--host-processes", "2", "--port", str(free_port()),
                            "--metrics-port", "0"])
    assert serve_cli.run(ns) == 1
    assert "--host-processes 2 needs a device backend" in capsys.readouterr().err
    assert started == []
