"""What the rendered pods expose: the restricted Pod Security Standard on every pod template (every
render variant, every k8s/ overlay and example), Ray token authentication only on a KubeRay that
keeps it, the dashboard off the pods' other interfaces, NetworkPolicies that admit each port from
its one client, the PodDisruptionBudget, the API key from a Secret and no `:latest` image."""

from __future__ import annotations

import argparse
import doctest
import re
from pathlib import Path

import pytest
import yaml

from neuronserve.deploy import cli as deploy_cli
from neuronserve.deploy.render import (
    API_KEY_ENV,
    DASHBOARD_PORT,
    EXAMPLE_API_KEY_SECRET,
    GCS_PORT,
    METRICS_PORT,
    OVERLAYS,
    POD_IP_ENV,
    RAY_METRICS_PORT,
    SERVE_PORT,
    RenderError,
    RenderOptions,
    overlay_options,
    parse_version,
    render_objects,
    render_yaml,
)
from tests.fixtures import kustomize, pod_security
from tests.fixtures.k8s_validate import validate_object
from tests.fixtures.manifests import make_artifact

K8S = Path(__file__).resolve().parents[2] / "k8s"
NEURON_MONITOR = K8S / "monitoring" / "neuron-monitor"


@pytest.fixture
def artifact(tmp_path):
    return lambda target: str(make_artifact(tmp_path / f"art-{target}", target))


def opts(artifacts: str, instance_type: str, **kw) -> RenderOptions:
    return RenderOptions(artifacts=artifacts, instance_type=instance_type, image="example.com/neuronserve:1", **kw)


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def ray_cluster(objs):
    (rs,) = by_kind(objs, "RayService")
    return rs["spec"]["rayClusterConfig"]


# --- the Pod Security Standard checker itself -------------------------------------------------------
def test_checker_examples_run():
    result = doctest.testmod(pod_security)
    assert result.attempted >= 2 and result.failed == 0


GOOD = {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "i:1", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "v", "emptyDir": {}}]}


@pytest.mark.parametrize("change,control", [
    (lambda s: s.update(hostNetwork=True), "Host Namespaces"),
    (lambda s: s.update(hostPID=True), "Host Namespaces"),
    (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "Privileged Containers"),
    (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/dev"}}), "HostPath Volumes"),
    (lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), "Volume Types"),
    (lambda s: s["containers"][0].update(ports=[{"name": "p", "containerPort": 1, "hostPort": 1}]), "Host Ports"),
    (lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "Privilege Escalation"),
    (lambda s: s["securityContext"].update(runAsNonRoot=False), "Running as Non-root"),
    (lambda s: s["securityContext"].update(runAsUser=0), "Running as Non-root user"),
    (lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}), "Seccomp"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "Capabilities"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["CHOWN"]), "Capabilities"),
    (lambda s: s["containers"][0]["securityContext"].update(capabilities={}), "Capabilities"),
    (lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "Sysctls"),
    (lambda s: s["containers"][0]["securityContext"].update(procMount="Unmasked"), "/proc Mount Type"),
    (lambda s: s["securityContext"].update(seLinuxOptions={"type": "spc_t"}), "SELinux"),
    (lambda s: s.setdefault("initContainers", []).append({"name": "i", "image": "i:1"}), "Privilege Escalation"),
])
def test_checker_finds_each_control(change, control):
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    assert pod_security.violations(spec) == []
    change(spec)
    found = pod_security.violations(spec)
    assert any(v.startswith(control + ":") for v in found), found


# --- every pod we render passes "restricted" --------------------------------------------------------
VARIANTS = [
    {},
    {"expose_dashboard": True},
    {"api_key_secret": "keys:primary"},
    {"ray_auth": "disabled", "kuberay_version": "1.4.2"},
    {"network_policy": False},
]
INSTANCES = [("inf2.xlarge", "inf2"), ("inf2.48xlarge", "inf2"), ("trn1.32xlarge", "trn1"), ("c7i.4xlarge", "cpu")]


def assert_restricted(objs):
    templates = [t for o in objs for t in pod_security.pod_templates(o)]
    assert templates, [o["kind"] for o in objs]
    for where, template in templates:
        found = pod_security.violations(template["spec"], template.get("metadata"))
        assert found == [], f"{where}: {found}"
    return templates


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "default")
@pytest.mark.parametrize("instance_type,target", INSTANCES)
def test_rendered_pods_are_restricted(artifact, instance_type, target, variant):
    objs = render_objects(opts(artifact(target), instance_type, **variant))
    assert len(assert_restricted(objs)) == 2  # head and one worker group
    for obj in objs:
        validate_object(obj)


def test_containers_kuberay_adds_are_checked(artifact):
    """The autoscaler container KubeRay adds to the head takes autoscalerOptions.securityContext;
    without it the head pod would fail the standard (and be refused in a restricted namespace)."""
    objs = render_objects(opts(artifact("inf2"), "inf2.xlarge"))
    rs = by_kind(objs, "RayService")[0]
    templates = dict(pod_security.pod_templates(rs))
    head = [t for w, t in templates.items() if w.endswith(" head")][0]
    assert any(c["name"].startswith("autoscaler") for c in head["spec"]["containers"])
    del rs["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    head = [t for w, t in pod_security.pod_templates(rs) if w.endswith(" head")][0]
    found = pod_security.violations(head["spec"])
    assert any("autoscaler" in v and v.startswith("Privilege Escalation") for v in found), found


def test_s3_artifacts_render_restricted_pods(tmp_path):
    manifest = make_artifact(tmp_path / "local", "inf2") / "manifest.json"
    objs = render_objects(opts("s3://b-1/p", "inf2.xlarge", manifest_file=str(manifest)))
    templates = assert_restricted(objs)
    assert templates
    for where, template in templates:
        assert any(v["name"] == "artifact-cache" for v in template["spec"]["volumes"]), where


def k8s_builds():
    dirs = [K8S / "overlays" / o for o in sorted(OVERLAYS)] + sorted(p.parent for p in (K8S / "examples").glob("*/kustomization.yaml"))
    return dirs


@pytest.mark.parametrize("path", k8s_builds(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_pods_are_restricted(path):
    objs = kustomize.build_subset(path)
    assert_restricted(objs)
    for obj in objs:
        validate_object(obj)


def test_neuron_monitor_daemonset_is_the_documented_exception():
    """AWS's neuron-monitor needs a privileged container to see every Neuron device of the node:
    it is the one pod of k8s/ outside "restricted", in a namespace labelled for it."""
    objs = kustomize.build_subset(NEURON_MONITOR)
    for obj in objs:
        validate_object(obj)
    (ds,) = by_kind(objs, "DaemonSet")
    ((where, template),) = list(pod_security.pod_templates(ds))
    found = pod_security.violations(template["spec"], template.get("metadata"))
    # Exactly what privileged (root, every capability, unconfined seccomp) implies; no host
    # namespaces, hostPath or host ports.
    controls = {v.split(":")[0] for v in found}
    assert controls == {"Privileged Containers", "Privilege Escalation", "Running as Non-root", "Seccomp",
                        "Capabilities"}, found
    (rule,) = by_kind(objs, "PrometheusRule")
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} == {"NeuronMonitorExecutionErrors",
                                                                               "NeuronMonitorDown"}
    (ns,) = by_kind(objs, "Namespace")
    assert ns["metadata"]["name"] == ds["metadata"]["namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    (c,) = template["spec"]["containers"]
    assert c["securityContext"] == {"privileged": True}
    assert c["image"].rsplit(":", 1)[1] not in ("", "latest")
    assert template["spec"]["automountServiceAccountToken"] is False
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in template["spec"]["tolerations"]


# --- no :latest anywhere in k8s/ --------------------------------------------------------------------
def images(obj):
    for _, template in pod_security.pod_templates(obj):
        for field in ("initContainers", "containers"):
            for c in template["spec"].get(field) or []:
                if "(added by KubeRay)" not in c["name"]:
                    yield c["image"]


def test_no_latest_or_untagged_image_in_k8s():
    text_hits = [str(p.relative_to(K8S)) for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".md")
                 and re.search(r":latest\b", p.read_text())]
    assert text_hits == [], f":latest in {text_hits}"
    seen = []
    for path in k8s_builds() + [NEURON_MONITOR]:
        for obj in kustomize.build_subset(path):
            for image in images(obj):
                name, _, tag = image.rpartition(":")
                assert "@sha256:" in image or (name and tag and "/" not in tag and tag != "latest"), image
                seen.append(image)
    assert seen


def test_latest_check_can_fail(tmp_path):
    obj = render_objects(overlay_options("inf2.xlarge"))[0]
    obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "repo/x"
    bad = [i for i in images(obj) if not i.rpartition(":")[0]]
    assert bad == ["repo/x"]


# --- Ray token authentication and the KubeRay version ----------------------------------------------
def test_token_auth_by_default_on_a_kuberay_that_keeps_it(artifact):
    cluster = ray_cluster(render_objects(opts(artifact("inf2"), "inf2.xlarge")))
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == "2.60.0"
    for version in ("1.5.1", "v1.6.2", "1.7.0-rc.1"):
        assert ray_cluster(render_objects(opts(artifact("inf2"), "inf2.xlarge", kuberay_version=version)))["authOptions"]


@pytest.mark.parametrize("version", ["1.5.0", "1.4.2", "v1.3.0"])
def test_token_auth_refused_where_kuberay_would_drop_it(artifact, version):
    with pytest.raises(RenderError, match=rf"--kuberay-version {re.escape(version)}: KubeRay before 1\.5\.1 has no "
                                          r"authOptions.*silently.*--ray-auth disabled"):
        render_objects(opts(artifact("inf2"), "inf2.xlarge", kuberay_version=version))
    # Without token authentication it renders, says so, and carries no authOptions.
    o = opts(artifact("inf2"), "inf2.xlarge", kuberay_version=version, ray_auth="disabled")
    assert "authOptions" not in ray_cluster(render_objects(o))
    assert "# Ray token authentication: disabled;" in render_yaml(o)


def test_kuberay_version_must_parse(artifact):
    assert parse_version("1.10.3") > parse_version("1.5.1")
    with pytest.raises(RenderError, match="expected a release such as 1.5.1"):
        render_objects(opts(artifact("inf2"), "inf2.xlarge", kuberay_version="latest"))


# --- the dashboard ----------------------------------------------------------------------------------
def test_dashboard_listens_on_the_pod_address_only(artifact):
    objs = render_objects(opts(artifact("inf2"), "inf2.xlarge"))
    head = ray_cluster(objs)["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == f"${POD_IP_ENV}"
    ray = head["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in ray["env"]}
    assert env[POD_IP_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # KubeRay's default head probe asks localhost:8265; ours asks the pod address.
    for probe in (ray["readinessProbe"], ray["livenessProbe"]):
        assert f"http://${POD_IP_ENV}:{DASHBOARD_PORT}/api/gcs_healthz" in probe["exec"]["command"][-1]
        assert f"localhost:{DASHBOARD_PORT}" not in probe["exec"]["command"][-1]
    (policy,) = [p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-dashboard")]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay"}


def test_expose_dashboard(artifact):
    objs = render_objects(opts(artifact("inf2"), "inf2.xlarge", expose_dashboard=True))
    head = ray_cluster(objs)["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ray = head["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in ray and POD_IP_ENV not in {e["name"] for e in ray["env"]}
    (policy,) = [p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-dashboard")]
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]}]


# --- NetworkPolicies: who reaches which port --------------------------------------------------------
def _selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def allowed(policies, pod_labels, port, source_ns, source_labels, own_ns="serving"):
    """Whether a pod in `source_ns` with `source_labels` reaches `port` of a pod with `pod_labels`."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], pod_labels)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and port not in {x["port"] for x in ports}:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (source_ns == own_ns) if ns_sel is None else _selects(ns_sel, {"kubernetes.io/metadata.name": source_ns})
                pod_ok = pod_sel is None or _selects(pod_sel, source_labels)
                if ns_ok and pod_ok and (ns_sel is not None or pod_sel is not None):
                    return True
    return False


def test_each_port_is_reached_by_its_client_only(artifact):
    objs = render_objects(opts(artifact("inf2"), "inf2.xlarge"))
    policies = by_kind(objs, "NetworkPolicy")
    cluster = ray_cluster(objs)
    own = cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    head = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    clients = {
        "ingress": ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
        "prometheus": ("monitoring", {"app.kubernetes.io/name": "prometheus"}),
        "kuberay": ("kuberay", {"app.kubernetes.io/name": "kuberay-operator"}),
        "other app": ("serving", {"app": "other"}),
        "other namespace": ("default", {}),
        "own pod": ("serving", own),
    }
    expected = {
        SERVE_PORT: {"ingress", "own pod"},
        METRICS_PORT: {"prometheus", "own pod"},
        RAY_METRICS_PORT: {"prometheus", "own pod"},
        DASHBOARD_PORT: {"kuberay", "own pod"},
        GCS_PORT: {"own pod"},
        10001: {"own pod"},
        52365: {"own pod"},
    }
    for port, who in expected.items():
        for target in (own, head):
            reach = {name for name, (ns, labels) in clients.items() if allowed(policies, target, port, ns, labels)}
            assert reach == who, (port, target["app.kubernetes.io/component"], reach)


def test_network_policy_namespaces_are_flags(artifact, capsys):
    objs = render_objects(opts(artifact("inf2"), "inf2.xlarge", ingress_namespace="gateway",
                               prometheus_namespace="observability", kuberay_namespace="ray-system"))
    text = yaml.safe_dump(by_kind(objs, "NetworkPolicy"))
    for ns in ("gateway", "observability", "ray-system"):
        assert f"kubernetes.io/metadata.name: {ns}" in text
    assert by_kind(render_objects(opts(artifact("inf2"), "inf2.xlarge", network_policy=False)), "NetworkPolicy") == []
    with pytest.raises(RenderError, match="--ingress-namespace 'Bad_NS'"):
        render_objects(opts(artifact("inf2"), "inf2.xlarge", ingress_namespace="Bad_NS"))


# --- PodDisruptionBudget ----------------------------------------------------------------------------
@pytest.mark.parametrize("instance_type,target,min_replicas,min_available", [
    ("inf2.xlarge", "inf2", None, 1),  # one worker: the drain waits for another
    ("inf2.xlarge", "inf2", 8, 3),  # four workers: one at a time
])
def test_pdb_covers_the_serving_pods(artifact, instance_type, target, min_replicas, min_available):
    objs = render_objects(opts(artifact(target), instance_type, min_replicas=min_replicas,
                               max_replicas=max(min_replicas or 0, 8)))
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    cluster = ray_cluster(objs)
    assert _selects(pdb["spec"]["selector"], cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"])
    assert not _selects(pdb["spec"]["selector"], cluster["headGroupSpec"]["template"]["metadata"]["labels"])
    # KubeRay's RayCluster has no scale subresource: an integer minAvailable is the one form that works.
    assert pdb["spec"]["minAvailable"] == min_available and "maxUnavailable" not in pdb["spec"]


# --- the API key from a Secret ----------------------------------------------------------------------
def test_api_key_from_a_secret(artifact):
    objs = render_objects(opts(artifact("inf2"), "inf2.xlarge", api_key_secret="serving-keys:primary"))
    cluster = ray_cluster(objs)
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        ray, side = template["spec"]["containers"]
        (env,) = [e for e in ray["env"] if e["name"] == API_KEY_ENV]
        assert env == {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "serving-keys", "key": "primary"}}}
        assert API_KEY_ENV not in {e["name"] for e in side["env"]}
    # No key in plain text anywhere, and no env without --api-key-secret.
    plain = render_objects(opts(artifact("inf2"), "inf2.xlarge"))
    assert API_KEY_ENV not in yaml.safe_dump(plain)
    with pytest.raises(RenderError, match="--api-key-secret 'Bad Name'"):
        render_objects(opts(artifact("inf2"), "inf2.xlarge", api_key_secret="Bad Name"))


def test_worker_readiness_asks_the_open_health_route(artifact):
    """The worker probe asks /v2/health/ready, which needs no API key, with or without one set."""
    for kw in ({}, {"api_key_secret": "keys"}):
        worker = ray_cluster(render_objects(opts(artifact("inf2"), "inf2.xlarge", **kw)))["workerGroupSpecs"][0]
        probe = worker["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"][-1]
        assert f"http://localhost:{SERVE_PORT}/v2/health/ready" in probe and "api/local_raylet_healthz" in probe
        assert "Authorization" not in probe and "livenessProbe" not in worker["template"]["spec"]["containers"][0]


def test_api_key_example_overlay_is_the_rendering():
    """k8s/examples/api-key builds to what `deploy render --api-key-secret` prints for inf2.xlarge."""
    built = kustomize.build_subset(K8S / "examples" / "api-key")
    expected = render_objects(overlay_options("inf2.xlarge", api_key_secret=EXAMPLE_API_KEY_SECRET))
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    ours = [o for o in built if o["metadata"]["labels"].get("app.kubernetes.io/component") != "monitoring"]
    assert sorted(ours, key=key) == sorted(expected, key=key)


# --- the command line -------------------------------------------------------------------------------
def run_cli(argv):
    parser = argparse.ArgumentParser(prog="neuronserve")
    deploy_cli.add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_security_flags(capsys, artifact):
    argv = ["deploy", "render", "--artifacts", artifact("inf2"), "--instance-type", "inf2.xlarge", "--image", "i:1"]
    assert run_cli(argv + ["--api-key-secret", "k", "--expose-dashboard", "--kuberay-version", "1.6.0",
                           "--ingress-namespace", "gw", "--no-network-policy"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["RayService", "Service", "PodDisruptionBudget"]
    cluster = docs[0]["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert cluster["authOptions"] == {"mode": "token"}
    assert run_cli(argv + ["--kuberay-version", "1.4.0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --kuberay-version 1.4.0: KubeRay before 1.5.1 has no authOptions")
