"""k8s/compile-job: the compile Job and the pods' service accounts validate, the pod passes the
"restricted" Pod Security Standard, runs on a CPU node, takes its AWS identity from its service
account (no credentials anywhere), and its command is a `neuronserve compile --push` that parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronserve.cli import build_parser
from neuronserve.compile.store import S3Uri
from tests.fixtures import kustomize, pod_security
from tests.fixtures.k8s_validate import validate_object

JOB_DIR = Path(__file__).resolve().parents[2] / "k8s" / "compile-job"
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"


@pytest.fixture(scope="module")
def objs():
    return kustomize.build_subset(JOB_DIR)


def one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, [(o["kind"], o["metadata"]["name"]) for o in objs]
    return found[0]


def test_objects_validate_and_the_pod_is_restricted(objs):
    assert sorted(o["kind"] for o in objs) == ["Job", "ServiceAccount", "ServiceAccount"]
    for obj in objs:
        validate_object(obj)
    ((where, template),) = list(pod_security.pod_templates(one(objs, "Job")))
    assert pod_security.violations(template["spec"], template.get("metadata")) == [], where


def test_the_job_compiles_and_pushes_with_the_neuronserve_command(objs):
    (c,) = one(objs, "Job")["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["neuronserve"]
    args = build_parser().parse_args(c["args"])
    assert args.target == "inf2" and args.out is None
    S3Uri.parse(args.push)
    name, _, tag = c["image"].rpartition(":")
    assert name and tag and tag != "latest"


def test_aws_identity_comes_from_the_service_account_only(objs):
    spec = one(objs, "Job")["spec"]["template"]["spec"]
    sa = one(objs, "ServiceAccount", spec["serviceAccountName"])
    assert sa["metadata"]["annotations"][ROLE_ANNOTATION].startswith("arn:aws:iam::")
    for c in spec["containers"]:
        names = {e["name"] for e in c.get("env", [])}
        assert not {n for n in names if n.startswith("AWS_")}, names
        assert not any("valueFrom" in e for e in c.get("env", [])) and "envFrom" not in c
    reader = one(objs, "ServiceAccount", "neuronserve-s3-reader")
    assert reader["metadata"]["annotations"][ROLE_ANNOTATION] != sa["metadata"]["annotations"][ROLE_ANNOTATION]


def test_the_job_runs_on_a_cpu_node(objs):
    spec = one(objs, "Job")["spec"]["template"]["spec"]
    assert "tolerations" not in spec  # never lands on a tainted Neuron node
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    for c in spec["containers"]:
        assert not any(k.startswith("aws.amazon.com/") for k in c["resources"]["limits"])
    assert spec["restartPolicy"] == "Never"
