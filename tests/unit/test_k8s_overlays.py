"""k8s/: the checked-in base and overlays are what deploy/render.py generates, every overlay builds,
every object validates, and the monitoring manifests fit the pods we render."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.fixtures import kustomize
from neuronserve.deploy.render import METRICS_PORT_NAME, OVERLAYS, kustomize_tree, overlay_options, render_objects
from tests.fixtures.k8s_validate import validate_object

K8S = Path(__file__).resolve().parents[2] / "k8s"
MONITORING = K8S / "monitoring"
REGENERATE = "regenerate with `python -m neuronserve.deploy.render --write-k8s k8s`"


def key(obj):
    return (obj["kind"], obj["metadata"]["name"])


def test_checked_in_tree_is_generated():
    monitoring = (MONITORING / "kustomization.yaml").is_file()
    for rel, text in kustomize_tree(monitoring).items():
        path = K8S / rel
        assert path.is_file(), f"{path} is missing: {REGENERATE}"
        assert path.read_text() == text, f"{path} differs from deploy/render.py's output: {REGENERATE}"
    assert {p.name for p in (K8S / "overlays").iterdir() if p.is_dir()} == set(OVERLAYS)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_builds_and_validates(overlay):
    objs = kustomize.build_subset(K8S / "overlays" / overlay)
    for obj in objs:
        validate_object(obj)
    ours = [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") != "monitoring"]
    # The overlay is exactly what `deploy render` prints for its instance type.
    expected = render_objects(overlay_options(OVERLAYS[overlay]))
    assert sorted(ours, key=key) == sorted(expected, key=key)


BUILDS = [f"overlays/{o}" for o in sorted(OVERLAYS)] + ["examples/api-key", "monitoring/neuron-monitor"]


@pytest.mark.parametrize("build", BUILDS)
def test_real_kustomize_agrees_with_the_subset(build):
    if not kustomize.real_kustomize():
        pytest.skip("no kustomize or `kubectl kustomize` installed; the built-in subset was tested above")
    real = kustomize.build(K8S / build, use_real=True)
    subset = kustomize.build_subset(K8S / build)
    assert sorted(real, key=key) == sorted(subset, key=key)


def test_subset_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(kustomize.KustomizeError, match="commonLabels"):
        kustomize.build_subset(tmp_path)


def test_subset_namespace_and_prefix(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nnamespace: ns\nnamePrefix: p-\n")
    (obj,) = kustomize.build_subset(tmp_path)
    assert obj["metadata"] == {"name": "p-a", "namespace": "ns"}


def monitoring_objects():
    if not MONITORING.is_dir():
        return []
    objs = []
    for path in sorted(MONITORING.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and "kind" in d)
    return objs


def test_monitoring_objects_validate():
    objs = monitoring_objects()
    assert {o["kind"] for _, o in objs} >= {"PodMonitor", "PrometheusRule"}
    for name, obj in objs:
        validate_object(obj)


def test_podmonitor_scrapes_the_port_we_render():
    pods = [o for _, o in monitoring_objects() if o["kind"] == "PodMonitor"]
    assert pods, "k8s/monitoring must ship a PodMonitor"
    rendered = render_objects(overlay_options("inf2.xlarge"))
    rs = rendered[0]
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    port_names = {p["name"] for c in worker["spec"]["containers"] for p in c.get("ports", [])}
    labels = worker["metadata"]["labels"]
    for pm in pods:
        match = pm["spec"]["selector"].get("matchLabels", {})
        assert all(labels.get(k) == v for k, v in match.items()), f"PodMonitor selector {match} misses pods {labels}"
        ports = {ep.get("port") for ep in pm["spec"]["podMetricsEndpoints"]}
        assert METRICS_PORT_NAME in ports, f"PodMonitor scrapes {ports}; the exporter port is {METRICS_PORT_NAME}"
        assert ports <= port_names


def test_base_includes_monitoring_when_it_is_a_kustomization():
    resources = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert ("../monitoring" in resources) == (MONITORING / "kustomization.yaml").is_file(), REGENERATE
