"""`neuronserve deploy render` with several artifacts: every replica serves them all, its
NeuronCores sized for their combined device memory, and the Serve config names each model."""

from __future__ import annotations

import pytest
import yaml

from neuronserve.deploy import cli as deploy_cli
from neuronserve.deploy.render import IMAGE_ARTIFACTS_DIR, RenderError, RenderOptions, plan, render_objects
from neuronserve.models.artifact import DeviceMemory, load_manifest, save_manifest
from tests.fixtures.k8s_validate import validate_object, validate_serve_config
from tests.fixtures.manifests import make_artifact


def artifact(tmp_path, name, target, gib):
    root = make_artifact(tmp_path / name, target)
    m = load_manifest(root)
    save_manifest(m.model_copy(update={"device_memory": DeviceMemory(weights_bytes=int(gib * 2**30), weight_copies=1,
                                                                     graphs_bytes=0)}), root)
    return str(root)


def opts(artifacts, instance_type, **kw) -> RenderOptions:
    return RenderOptions(artifacts=artifacts, instance_type=instance_type, image="example.com/neuronserve:1", **kw)


def app_of(objs):
    (rs,) = [o for o in objs if o["kind"] == "RayService"]
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return rs, app


def test_two_models_that_need_two_cores_get_replicas_of_two_cores(tmp_path):
    arts = [f"e5={artifact(tmp_path, 'e5', 'inf2', 9.0)}", f"rr={artifact(tmp_path, 'rr', 'inf2', 8.5)}"]
    p = plan(opts(arts, "inf2.xlarge"))
    assert (p.cores_per_replica, p.replicas_per_node) == (2, 1)  # 17.5 GiB: two 16 GiB NeuronCores
    objs = render_objects(opts(arts, "inf2.xlarge"))
    for obj in objs:
        validate_object(obj)
    rs, app = app_of(objs)
    validate_serve_config(rs["spec"]["serveConfigV2"])
    assert app["args"]["artifacts"] == [f"e5={IMAGE_ARTIFACTS_DIR}/e5", f"rr={IMAGE_ARTIFACTS_DIR}/rr"]
    assert app["args"]["cores_per_replica"] == 2
    assert app["deployments"][0]["ray_actor_options"]["resources"] == {"neuron_cores": 2}


def test_models_that_fit_one_core_keep_one_core_per_replica(tmp_path):
    arts = [artifact(tmp_path, "a", "inf2", 3.0), f"b={artifact(tmp_path, 'b', 'inf2', 2.0)}"]
    with pytest.raises(RenderError, match="two artifacts serve the model name 'all-minilm-l6-v2'"):
        plan(opts([arts[0], arts[0]], "inf2.xlarge"))
    p = plan(opts(arts, "inf2.xlarge"))
    assert (p.cores_per_replica, p.replicas_per_node) == (1, 2)
    assert p.args.artifact_list() == [("all-minilm-l6-v2", f"{IMAGE_ARTIFACTS_DIR}/all-minilm-l6-v2"),
                                      ("b", f"{IMAGE_ARTIFACTS_DIR}/b")]


def test_too_few_cores_for_the_models_is_an_error_naming_them(tmp_path):
    arts = [f"e5={artifact(tmp_path, 'e5', 'inf2', 9.0)}", f"rr={artifact(tmp_path, 'rr', 'inf2', 8.5)}"]
    with pytest.raises(RenderError) as e:
        plan(opts(arts, "inf2.xlarge", cores_per_replica=1))
    assert "e5 9.0 GiB, rr 8.5 GiB" in str(e.value) and "--cores-per-replica 2" in str(e.value)
    with pytest.raises(RenderError, match="one target"):
        plan(opts([arts[0], f"c={artifact(tmp_path, 'c', 'trn1', 1.0)}"], "inf2.xlarge"))


def test_the_cli_takes_artifacts_more_than_once(tmp_path, capsys):
    a, b = artifact(tmp_path, "a", "inf2", 1.0), artifact(tmp_path, "b", "inf2", 1.0)
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    deploy_cli.add_subcommand(sub)
    args = parser.parse_args(["deploy", "render", "--artifacts", f"x={a}", "--artifacts", f"y={b}",
                              "--instance-type", "inf2.xlarge", "--image", "example.com/n:1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"x={IMAGE_ARTIFACTS_DIR}/x" in out and f"y={IMAGE_ARTIFACTS_DIR}/y" in out
