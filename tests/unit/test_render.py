"""`neuronserve deploy render`: every object validates, sizing follows the artifact and instance,
bad input gives one clear line and exit code 2."""

from __future__ import annotations

import argparse

import pytest
import yaml

from neuronserve.deploy import cli as deploy_cli
from neuronserve.deploy.render import (
    APP_ARG_KEYS,
    DEPLOYMENT_NAME,
    IMAGE_ARTIFACTS_DIR,
    IMPORT_PATH,
    METRICS_DIR,
    NEURON_CORE_RESOURCE,
    ARTIFACT_CACHE_DIR,
    RenderError,
    RenderOptions,
    allocatable,
    get_instance,
    plan,
    render_objects,
    render_yaml,
)
from tests.fixtures.k8s_validate import ManifestInvalid, validate_object, validate_serve_config
from tests.fixtures.manifests import make_artifact

CASES = [  # instance type, artifact target
    ("inf2.xlarge", "inf2"),
    ("inf2.8xlarge", "inf2"),
    ("inf2.24xlarge", "inf2"),
    ("inf2.48xlarge", "inf2"),
    ("trn1.2xlarge", "trn1"),
    ("trn1.32xlarge", "trn1"),
    ("trn2.48xlarge", "trn2"),
    ("c7i.4xlarge", "cpu"),
    ("c7g.2xlarge", "cpu"),
    ("c7i.xlarge", "cpu"),
]


@pytest.fixture
def artifact(tmp_path):
    return lambda target, **kw: str(make_artifact(tmp_path / f"art-{target}", target, **kw))


def opts(artifacts: str, instance_type: str, **kw) -> RenderOptions:
    return RenderOptions(artifacts=artifacts, instance_type=instance_type, image="example.com/neuronserve:1", **kw)


def split(objs):
    rs = [o for o in objs if o["kind"] == "RayService"]
    svc = [o for o in objs if o["kind"] == "Service"]
    assert len(rs) == 1 and len(svc) == 1, [o["kind"] for o in objs]
    return rs[0], svc[0]


def containers(pod_template):
    return {c["name"]: c for c in pod_template["spec"]["containers"]}


@pytest.mark.parametrize("instance_type,target", CASES)
def test_every_object_validates(artifact, instance_type, target):
    objs = render_objects(opts(artifact(target), instance_type))
    for obj in objs:
        validate_object(obj)
    rs, _ = split(objs)
    config = validate_serve_config(rs["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    optional = {"price_per_hour_usd"} | ({"threads_per_replica"} if target != "cpu" else set())  # None: left out
    assert set(APP_ARG_KEYS) - optional <= set(app["args"]) <= set(APP_ARG_KEYS)
    (dep,) = app["deployments"]
    assert dep["name"] == DEPLOYMENT_NAME


def test_yaml_output_is_the_objects(artifact):
    o = opts(artifact("inf2"), "inf2.24xlarge", namespace="serving")
    docs = [d for d in yaml.safe_load_all(render_yaml(o)) if d]
    assert docs == render_objects(o)
    assert all(d["metadata"]["namespace"] == "serving" for d in docs)
    assert isinstance(docs[0]["spec"]["serveConfigV2"], str)


def test_neuron_worker_asks_for_cores_not_devices(artifact):
    objs = render_objects(opts(artifact("inf2"), "inf2.48xlarge"))
    assert "aws.amazon.com/neuron:" not in yaml.safe_dump(objs).replace("aws.amazon.com/neuron: ", "")
    rs, _ = split(objs)
    cluster = rs["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    ray = pod["containers"][0]
    assert ray["resources"]["limits"][NEURON_CORE_RESOURCE] == "24"
    assert ray["resources"]["requests"] == ray["resources"]["limits"]
    for c in pod["containers"]:
        assert "aws.amazon.com/neuron" not in c["resources"]["limits"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "inf2.48xlarge"}
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["schedulerName"] == "my-scheduler"
    cpus, mem = allocatable(get_instance("inf2.48xlarge"))
    assert ray["resources"]["limits"]["cpu"] == str(cpus) and cpus < 192
    assert ray["resources"]["limits"]["memory"] == f"{mem}Gi" and mem < 768
    assert cluster["enableInTreeAutoscaling"] is True
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)


def test_head_runs_no_replicas(artifact):
    rs, _ = split(render_objects(opts(artifact("trn1"), "trn1.32xlarge")))
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    spec = head["template"]["spec"]
    assert "nodeSelector" not in spec and "tolerations" not in spec and "schedulerName" not in spec
    for c in spec["containers"]:
        assert not any(k.startswith("aws.amazon.com/") for k in c["resources"]["limits"])
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True


def test_serve_config_sizing_from_artifact(artifact):
    rs, _ = split(render_objects(opts(artifact("inf2", buckets=((1, 32), (16, 128))), "inf2.48xlarge",
                                      cores_per_replica=2, max_replicas=30)))
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    (dep,) = app["deployments"]
    assert dep["ray_actor_options"]["resources"] == {"neuron_cores": 2}
    assert app["args"]["cores_per_replica"] == 2
    auto = dep["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (12, 30)  # 24 cores / 2 per replica
    # Serve's default of 5 would starve batching: twice in flight (16 rows x 1 batch) + queue.
    assert dep["max_ongoing_requests"] == 2 * (16 * 1 + app["args"]["max_queued_rows"])
    assert app["args"]["max_ongoing_requests"] == dep["max_ongoing_requests"]
    assert app["args"]["max_batch_tokens"] == 2048  # the server's default
    assert app["args"]["artifacts"] == IMAGE_ARTIFACTS_DIR
    assert app["args"]["instance_type"] == "inf2.48xlarge"
    assert app["args"]["price_per_hour_usd"] == pytest.approx(12.98127)
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["maxReplicas"] == 3  # ceil(30 / 12)


def test_single_core_pod_uses_default_scheduler(artifact):
    rs, _ = split(render_objects(opts(artifact("inf2"), "inf2.xlarge", cores_per_replica=2)))
    pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"][NEURON_CORE_RESOURCE] == "2"
    assert pod["schedulerName"] == "my-scheduler"  # 2 cores in one pod still need contiguity
    p = plan(opts(artifact("inf2"), "inf2.xlarge", cores_per_replica=2))
    assert p.replicas_per_node == 1


def test_cpu_instance_has_no_neuron_anything(artifact):
    objs = render_objects(opts(artifact("cpu"), "c7i.4xlarge", threads_per_replica=3))
    text = yaml.safe_dump(objs)
    assert "neuron" not in text.lower().replace("neuronserve", "")
    rs, _ = split(objs)
    (dep,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    # 3 threads for the one forward the server runs when threads are given (max_concurrent_batches 1)
    assert dep["ray_actor_options"]["num_cpus"] == 3 and "resources" not in dep["ray_actor_options"]
    assert dep["user_config"]["max_concurrent_batches"] == 1
    pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "tolerations" not in pod and "schedulerName" not in pod
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "c7i.4xlarge"}


def test_metrics_sidecar_and_ports(artifact):
    rs, svc = split(render_objects(opts(artifact("inf2"), "inf2.24xlarge")))
    cluster = rs["spec"]["rayClusterConfig"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "neuronserve"
        cs = containers(template)
        ray = template["spec"]["containers"][0]
        side = cs["metrics-exporter"]
        assert side["image"] == ray["image"]
        # No neuron-monitor in the sidecar (it holds no device): the node's DaemonSet exports NeuronCores.
        assert side["command"] == ["neuronserve", "metrics-exporter", "--dir", METRICS_DIR, "--port", "9400",
                                   "--no-neuron-monitor"]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"] == METRICS_DIR
        assert env["NEURONSERVE_INSTANCE_TYPE"] == "inf2.24xlarge"
        for c in (ray, side):
            assert {"name": "metrics", "mountPath": METRICS_DIR} in c["volumeMounts"]
        assert any(v["name"] == "metrics" and "emptyDir" in v for v in template["spec"]["volumes"])
        ports = {p["containerPort"]: p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports[8000] == "serve" and ports[8080] == "metrics" and ports[9400] == "nserve-metrics"
        names = [p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])]
        assert len(names) == len(set(names)), "port names must be unique within a pod"
    head_ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 8000, 8080} <= head_ports
    assert svc["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in svc["spec"]["ports"]} == {9400, 8080}
    assert svc["spec"]["selector"]["app.kubernetes.io/name"] == "neuronserve"
    for obj in (rs, svc):
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "neuronserve"


def test_s3_artifacts_are_pulled_by_the_pods_into_an_emptydir_cache(tmp_path, artifact):
    manifest = make_artifact(tmp_path / "local", "inf2") / "manifest.json"
    o = opts("s3://my-bucket/minilm/inf2", "inf2.xlarge", manifest_file=str(manifest), service_account="reader")
    objs = render_objects(o)
    for obj in objs:
        validate_object(obj)
    rs, _ = split(objs)
    for t in (rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
              rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]):
        assert "initContainers" not in t["spec"]  # nothing but the pods' own pull
        assert t["spec"]["serviceAccountName"] == "reader"
        ray = t["spec"]["containers"][0]
        assert {"name": "artifact-cache", "mountPath": ARTIFACT_CACHE_DIR} in ray["volumeMounts"]
        assert {"name": "NEURONSERVE_CACHE_DIR", "value": ARTIFACT_CACHE_DIR} in ray["env"]
        assert {"name": "artifact-cache", "emptyDir": {}} in t["spec"]["volumes"]
        assert not any(e["name"].startswith("AWS_") for e in ray["env"])  # credentials: the pod's IAM role
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["artifacts"] == "s3://my-bucket/minilm/inf2"
    # --target instead of a manifest: default buckets assumed
    assert plan(opts("s3://b/p", "trn1.32xlarge", target="trn1")).replicas_per_node == 32


def test_a_local_artifact_gets_no_cache_volume(artifact):
    rs, _ = split(render_objects(opts(artifact("inf2"), "inf2.xlarge")))
    t = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    assert all(v["name"] != "artifact-cache" for v in t["spec"]["volumes"])
    assert all(e["name"] != "NEURONSERVE_CACHE_DIR" for e in t["spec"]["containers"][0]["env"])


def test_an_s3_manifest_must_be_the_one_the_uri_names(tmp_path):
    manifest = make_artifact(tmp_path / "local", "inf2") / "manifest.json"
    with pytest.raises(RenderError, match="not the 0000000000000000... that --artifacts names"):
        plan(opts("s3://my-bucket/models/" + "0" * 64, "inf2.xlarge", manifest_file=str(manifest)))
    with pytest.raises(RenderError, match="not a valid S3 bucket name"):
        plan(opts("s3://My_Bucket/models", "inf2.xlarge", target="inf2"))


def test_app_args_match_the_app_contract(artifact):
    from neuronserve.serve import app
    for instance_type, target in (("inf2.xlarge", "inf2"), ("c7i.4xlarge", "cpu")):
        rs, _ = split(render_objects(opts(artifact(target), instance_type)))
        args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
        app.AppArgs.model_validate(args)


def test_validator_rejects_typos(artifact):
    rs, _ = split(render_objects(opts(artifact("inf2"), "inf2.xlarge")))
    bad = yaml.safe_load(yaml.safe_dump(rs))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelecter"] = {}
    with pytest.raises(ManifestInvalid, match="nodeSelecter"):
        validate_object(bad)
    with pytest.raises(ManifestInvalid, match="max_ongoing_request"):
        validate_serve_config(rs["spec"]["serveConfigV2"].replace("max_ongoing_requests", "max_ongoing_request"))
    with pytest.raises(ManifestInvalid, match="autoscaling_config"):
        validate_serve_config(rs["spec"]["serveConfigV2"].replace("max_replicas: 4", "max_replicas: 1"))


# --- the command line ---------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neuronserve")
    deploy_cli.add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def cli_error(capsys, argv: list[str]) -> str:
    assert run_cli(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def base_argv(artifacts: str, instance_type: str) -> list[str]:
    return ["deploy", "render", "--artifacts", artifacts, "--instance-type", instance_type, "--image", "img:1"]


def test_cli_prints_yaml(capsys, artifact):
    assert run_cli(base_argv(artifact("inf2"), "inf2.xlarge") + ["--min-replicas", "1", "--max-replicas", "6"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["RayService", "Service", "PodDisruptionBudget"] + ["NetworkPolicy"] * 4


def test_cli_writes_file(tmp_path, artifact):
    out = tmp_path / "out.yaml"
    assert run_cli(base_argv(artifact("cpu"), "c7i.2xlarge") + ["--out", str(out), "--name", "embed"]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert docs[0]["metadata"]["name"] == "embed"


def test_registered_in_neuronserve():
    from neuronserve.cli import build_parser

    args = build_parser().parse_args(base_argv("x", "inf2.xlarge"))
    assert args.func is deploy_cli.run


@pytest.mark.parametrize(
    "instance_type,target,extra,message",
    [
        ("inf2.96xlarge", "inf2", [], "unknown instance type 'inf2.96xlarge'; known: .*inf2.48xlarge"),
        ("g5.xlarge", "cpu", [], "GPU instance"),
        ("trn1.32xlarge", "inf2", [], "built for inf2 but trn1.32xlarge is a trn1 instance"),
        ("inf2.xlarge", "cpu", [], "built for cpu but inf2.xlarge is a inf2 instance"),
        ("c7i.4xlarge", "inf2", [], "built for inf2 but c7i.4xlarge is a cpu instance"),
        ("inf2.xlarge", "inf2", ["--cores-per-replica", "4"], "more than the 2 NeuronCores of one inf2.xlarge"),
        ("inf2.xlarge", "inf2", ["--cores-per-replica", "0"], "must be >= 1"),
        ("inf2.xlarge", "inf2", ["--min-replicas", "5", "--max-replicas", "2"], "--min-replicas 5 is greater than --max-replicas 2"),
        ("c7i.4xlarge", "cpu", ["--cores-per-replica", "1"], "use --threads-per-replica"),
        ("c7i.xlarge", "cpu", ["--threads-per-replica", "16"], "does not fit c7i.xlarge"),
        ("inf2.xlarge", "inf2", ["--backend", "cpu"], "cannot serve"),
        ("inf2.xlarge", "inf2", ["--name", "Bad_Name"], "--name 'Bad_Name'"),
    ],
)
def test_cli_bad_input(capsys, artifact, instance_type, target, extra, message):
    import re

    line = cli_error(capsys, base_argv(artifact(target), instance_type) + extra)
    assert line.startswith("error: ")
    assert re.search(message, line), line


def test_cli_missing_manifest(capsys, tmp_path):
    line = cli_error(capsys, base_argv(str(tmp_path), "inf2.xlarge"))
    assert "no manifest.json" in line


def test_cli_remote_without_sizing(capsys, tmp_path):
    line = cli_error(capsys, base_argv("s3://b/a", "inf2.xlarge"))
    assert "--manifest" in line and "--target" in line
    line = cli_error(capsys, base_argv("s3://b/a", "inf2.xlarge") + ["--manifest", str(tmp_path / "nope.json")])
    assert "no such file" in line


def test_render_error_is_value_error():
    with pytest.raises(RenderError):
        plan(opts("s3://b/a", "inf2.xlarge", target="trn1"))


# --- the rendered deployment is the local server's -----------------------------------------------
LAYOUTS = [  # instance type, artifact target, render options (the same settings the server gets)
    ("c7i.xlarge", "cpu", {}),
    ("c7i.4xlarge", "cpu", {}),
    ("c7i.4xlarge", "cpu", {"threads_per_replica": 2}),
    ("c7i.4xlarge", "cpu", {"max_concurrent_batches": 3, "batch_wait_ms": 1.5, "packing": False}),
    ("inf2.48xlarge", "inf2", {"cores_per_replica": 2}),
    ("inf2.xlarge", "inf2", {}),
]


def _server(monkeypatch, p, args):
    """What `neuronserve serve` (build_app) deploys for `args` on a machine with the pod's replica
    CPUs and the instance's NeuronCores, in a clean environment."""
    from neuronserve.serve import placement
    from neuronserve.serve.app import build_app

    monkeypatch.setattr(placement, "cluster_cpus", lambda: p.pod_cpus - placement.POD_RESERVED_CPUS)
    monkeypatch.setattr(placement, "cluster_neuron_cores", lambda: p.instance.neuron_cores)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NEURONSERVE_EXTRA_PYTHONPATH", "NEURONSERVE_LOG_LEVEL",
                 "NEURONSERVE_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    return build_app(args)._bound_deployment


@pytest.mark.parametrize("instance_type,target,kw", LAYOUTS)
def test_rendered_deployment_is_what_the_server_builds(artifact, monkeypatch, instance_type, target, kw):
    """The cluster's build_app, given the rendered args, deploys exactly the rendered deployment
    (name, user_config, actor options with the replica environment, in-flight cap)."""
    from neuronserve.serve.settings import AppArgs

    art = artifact(target)
    o = opts(art, instance_type, **kw)
    p = plan(o)
    rs, _ = split(render_objects(o))
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    (dep,) = app["deployments"]
    server = _server(monkeypatch, p, AppArgs.model_validate({**app["args"], "artifacts": art}))
    assert dep["name"] == server.name == DEPLOYMENT_NAME
    assert dep["user_config"] == server.user_config
    assert dep["ray_actor_options"] == {k: server.ray_actor_options[k] for k in dep["ray_actor_options"]}
    assert dep["max_ongoing_requests"] == server.max_ongoing_requests
    assert server.num_replicas == p.replicas_per_node
    # The pod's container environment carries the same replica environment.
    env = {e["name"]: e["value"] for e in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]}
    assert dep["ray_actor_options"]["runtime_env"]["env_vars"].items() <= env.items()


@pytest.mark.parametrize("instance_type,target,kw", LAYOUTS)
def test_render_lays_out_replicas_as_the_server_does_for_the_same_settings(artifact, monkeypatch, instance_type, target, kw):
    """The same settings given to `neuronserve serve` on a machine of the pod's replica CPUs: the
    same replicas per node, threads, concurrent batches, num_cpus and batching knobs (the server's
    defaults: batch_wait_ms 0, max_concurrent_batches from its layout, packing on)."""
    from neuronserve.serve.settings import AppArgs, ServeSettings

    art = artifact(target)
    p = plan(opts(art, instance_type, **kw))
    (dep,) = yaml.safe_load(serve_config_text(p, art, instance_type, kw))["applications"][0]["deployments"]
    server = _server(monkeypatch, p, AppArgs(artifacts=art, **kw))
    assert server.num_replicas == p.replicas_per_node
    assert server.ray_actor_options["num_cpus"] == dep["ray_actor_options"]["num_cpus"] == p.cpus_per_replica
    assert server.ray_actor_options.get("resources") == dep["ray_actor_options"].get("resources")
    live = {k: v for k, v in server.user_config.items()}
    assert live == dep["user_config"]
    assert server.init_args[0]["threads_per_replica"] == (p.threads_per_replica or kw.get("threads_per_replica"))
    defaults = ServeSettings.model_fields
    assert dep["user_config"]["batch_wait_ms"] == kw.get("batch_wait_ms", defaults["batch_wait_ms"].default)
    assert dep["user_config"]["packing"] is kw.get("packing", True)


def serve_config_text(p, art, instance_type, kw) -> str:
    rs, _ = split(render_objects(opts(art, instance_type, **kw)))
    return rs["spec"]["serveConfigV2"]


def test_user_config_is_exactly_the_live_batching_knobs(artifact):
    """Every rendered user_config key is one the replica's reconfigure() takes, and none is missing."""
    from types import SimpleNamespace

    from neuronserve.serve.app import NeuronServe
    from neuronserve.serve.settings import BATCHING_KNOBS, AppArgs

    for instance_type, target in (("inf2.xlarge", "inf2"), ("c7i.4xlarge", "cpu")):
        (dep,) = yaml.safe_load(serve_config_text(None, artifact(target), instance_type, {}))["applications"][0]["deployments"]
        assert list(dep["user_config"]) == list(BATCHING_KNOBS)
        replica = SimpleNamespace(args=AppArgs(artifacts="a"), batcher=None)
        NeuronServe.func_or_class.reconfigure(replica, dep["user_config"])
        assert replica.args.user_config() == dep["user_config"]


def test_header_counts_the_vcpus_a_replica_asks_for(artifact):
    """c7i.xlarge: the header's vCPUs per replica is the replica's num_cpus."""
    o = opts(artifact("cpu"), "c7i.xlarge")
    p = plan(o)
    header = render_yaml(o).splitlines()[0]
    assert f"x {p.cpus_per_replica} vCPU(s)" in header
    (dep,) = yaml.safe_load(serve_config_text(p, o.artifacts, "c7i.xlarge", {}))["applications"][0]["deployments"]
    assert dep["ray_actor_options"]["num_cpus"] == p.cpus_per_replica


def _replica_env(rs):
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    (dep,) = app["deployments"]
    return dep["ray_actor_options"]["runtime_env"]["env_vars"]


def test_trn2_replicas_get_the_artifacts_lnc_and_the_xla_targets_none(artifact, tmp_path):
    """trn2 serves through TorchNeuron: the runtime gets the artifact's Logical NeuronCore
    configuration (default 2, at which the instance table counts 64 cores) before the device is used."""
    from neuronserve.models.artifact import load_manifest, save_manifest

    rs, _ = split(render_objects(opts(artifact("trn2"), "trn2.48xlarge")))
    assert _replica_env(rs)["NEURON_LOGICAL_NC_CONFIG"] == "2"
    validate_object(rs)
    # Every process of a worker pod has the LNC and a writable NEFF cache before torch loads TorchNeuron.
    (worker,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = worker["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NEURON_LOGICAL_NC_CONFIG"] == "2"
    cache = env["TORCH_NEURONX_NEFF_CACHE_DIR"]
    assert _replica_env(rs)["TORCH_NEURONX_NEFF_CACHE_DIR"] == cache
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == cache]
    assert {"name": mount["name"], "emptyDir": {}} in pod["volumes"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert not any(e["name"] == "TORCH_NEURONX_NEFF_CACHE_DIR" for e in head["containers"][0]["env"])
    lnc1 = make_artifact(tmp_path / "lnc1", "trn2")
    save_manifest(load_manifest(lnc1).model_copy(update={"lnc": 1}), lnc1)
    rs, _ = split(render_objects(opts(str(lnc1), "trn2.48xlarge")))
    assert _replica_env(rs)["NEURON_LOGICAL_NC_CONFIG"] == "1"
    for instance, target in (("inf2.xlarge", "inf2"), ("trn1.32xlarge", "trn1"), ("c7i.4xlarge", "cpu")):
        rs, _ = split(render_objects(opts(artifact(target), instance)))
        assert not {"NEURON_LOGICAL_NC_CONFIG", "TORCH_NEURONX_NEFF_CACHE_DIR"} & set(_replica_env(rs))


def test_a_trn2_artifact_does_not_render_for_trn1_nor_an_inf2_one_for_trn2(artifact):
    with pytest.raises(RenderError, match="built for trn2 but trn1.32xlarge is a trn1 instance"):
        plan(opts(artifact("trn2"), "trn1.32xlarge"))
    with pytest.raises(RenderError, match="built for inf2 but trn2.48xlarge is a trn2 instance.*--target trn2"):
        plan(opts(artifact("inf2"), "trn2.48xlarge"))


def test_trn2_overlay_uses_the_torchneuron_image():
    from neuronserve.deploy.render import OVERLAY_IMAGES, overlay_options

    assert overlay_options("trn2.48xlarge").image == OVERLAY_IMAGES["trainium"] != OVERLAY_IMAGES["neuron"]
    assert overlay_options("trn1.32xlarge").image == OVERLAY_IMAGES["neuron"]
