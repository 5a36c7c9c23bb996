"""k8s/karpenter/: the NodePools and EC2NodeClass validate against Karpenter's CRDs (k8s/schemas/),
and every Neuron worker pod `deploy render` makes for inf2, trn1 or trn2 fits one of the pools: its
instance type is in the pool, it tolerates the pool's taints, and the pool's NeuronCore limit holds
at least one such node."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from neuronserve.deploy.render import NEURON_TAINT_KEY, get_instance, known_instances, render_objects
from tests.fixtures import kustomize
from tests.fixtures.k8s_validate import ManifestInvalid, validate_object
from tests.fixtures.manifests import make_artifact
from tests.unit.test_render import opts

KARPENTER = Path(__file__).resolve().parents[2] / "k8s" / "karpenter"


def objects():
    return kustomize.build_subset(KARPENTER)


def pools():
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == "NodePool"}


def requirement(pool, key):
    (req,) = [r for r in pool["spec"]["template"]["spec"]["requirements"] if r["key"] == key]
    assert req["operator"] == "In"
    return set(req["values"])


def test_every_object_validates_against_karpenters_crds():
    objs = objects()
    assert sorted(o["kind"] for o in objs) == ["EC2NodeClass", "NodePool", "NodePool", "NodePool"]
    for obj in objs:
        validate_object(obj)
    (node_class,) = [o for o in objs if o["kind"] == "EC2NodeClass"]
    for pool in pools().values():
        ref = pool["spec"]["template"]["spec"]["nodeClassRef"]
        assert (ref["group"], ref["kind"], ref["name"]) == ("karpenter.k8s.aws", "EC2NodeClass", node_class["metadata"]["name"])


def mutated(kind, change):
    (obj,) = [o for o in objects() if o["kind"] == kind][:1]
    obj = copy.deepcopy(obj)
    change(obj["spec"])
    return obj


@pytest.mark.parametrize("kind,change,message", [
    ("NodePool", lambda s: s["disruption"].update(consolidationPolicy="WhenIdle"), "consolidationPolicy"),
    ("NodePool", lambda s: s["template"]["spec"].update(taint=[]), "taint"),
    ("NodePool", lambda s: s["template"]["spec"]["requirements"].append(
        {"key": "karpenter.k8s.aws/instance-famly", "operator": "In", "values": ["inf2"]}), "well-known"),
    ("NodePool", lambda s: s["template"]["spec"]["requirements"].append(
        {"key": "karpenter.sh/nodepool", "operator": "In", "values": ["x"]}), "restricted"),
    ("NodePool", lambda s: s["template"]["spec"]["taints"][0].update(effect="NoSchedulePlease"), "effect"),
    ("EC2NodeClass", lambda s: s.update(instanceProfile="p"), "role and instanceProfile"),
    ("EC2NodeClass", lambda s: s.update(amiSelectorTerms=[{"alias": "al2023"}]), "alias"),
    ("EC2NodeClass", lambda s: s["metadataOptions"].update(httpTokens="sometimes"), "httpTokens"),
])
def test_the_validator_rejects_what_karpenter_would(kind, change, message):
    with pytest.raises(ManifestInvalid, match=message):
        validate_object(mutated(kind, change))


NEURON_INSTANCES = [n for n in known_instances() if get_instance(n).target in ("inf2", "trn1", "trn2")]


@pytest.mark.parametrize("instance_type", NEURON_INSTANCES)
def test_every_rendered_neuron_worker_fits_a_pool(tmp_path, instance_type):
    inst = get_instance(instance_type)
    artifact = str(make_artifact(tmp_path / "art", inst.target))
    (rs,) = [o for o in render_objects(opts(artifact, instance_type, min_replicas=0)) if o["kind"] == "RayService"]
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    fitting = [p for p in pools().values()
               if set(pod["nodeSelector"].items()) <= {("node.kubernetes.io/instance-type", t)
                                                      for t in requirement(p, "node.kubernetes.io/instance-type")}]
    assert len(fitting) == 1, f"{instance_type}: pools {sorted(pools())} hold it {len(fitting)} times"
    (pool,) = fitting
    assert requirement(pool, "karpenter.k8s.aws/instance-family") == {inst.target}
    taints = pool["spec"]["template"]["spec"]["taints"]
    assert [t["key"] for t in taints] == [NEURON_TAINT_KEY]
    for taint in taints:  # the pod tolerates every taint of the pool
        assert any(tol["key"] == taint["key"] and tol["effect"] == taint["effect"] and tol["operator"] == "Exists"
                   for tol in pod["tolerations"]), (taint, pod["tolerations"])
    assert int(pool["spec"]["limits"]["aws.amazon.com/neuroncore"]) >= inst.neuron_cores
    # Scale to zero reaches the nodes: no worker pod, so no node, when idle.
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
