"""docs/deploy-eks.md works as written, as far as it can without a cluster: its `neuronserve`
commands parse, its `deploy render` commands run (on a manifest-only artifact at the paths it names)
and print objects that validate and pass the restricted Pod Security Standard, its offline check
command accepts that output, the overlay of your own builds with a real kustomize, and the requests
name the model as it is served."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuronserve.cli import build_parser, main
from neuronserve.models.artifact import load_manifest
from neuronserve.models.loading import DEFAULT_MODEL_NAME
from tests.fixtures import kustomize, pod_security
from tests.fixtures.k8s_validate import validate_object
from tests.fixtures.manifests import make_artifact

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deploy-eks.md"
EXAMPLE_KEY = "3f9c" + "0" * 60  # the cache key `compile --push` printed, in the page's $ARTIFACT
VARIABLES = {"REPO": "123456789012.dkr.ecr.us-east-1.amazonaws.com/neuronserve",
             "ARTIFACT": f"s3://my-bucket/neuronserve/{EXAMPLE_KEY}"}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def commands() -> list[str]:
    """Every shell command of the page's bash blocks, continuation lines joined."""
    out = []
    for block in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


def neuronserve_commands(prefix: str) -> list[list[str]]:
    found = []
    for line in commands():
        line = line.split(" # ")[0]
        if line.startswith(prefix):
            found.append(shlex.split(re.sub(r"\$(\w+)", lambda m: VARIABLES.get(m[1], m[0]), line)))
    return found


def test_page_has_the_commands():
    assert len(neuronserve_commands("neuronserve deploy render")) == 2
    assert len(neuronserve_commands("neuronserve compile")) == 1


def test_compile_command_parses():
    (argv,) = neuronserve_commands("neuronserve compile")
    args = build_parser().parse_args(argv[1:])
    assert args.target == "inf2"
    assert VARIABLES["ARTIFACT"].startswith(args.push + "/")  # the URI it prints is the one rendered


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The paths the page uses, relative to where the commands run: the compiled artifact (a
    manifest-only copy for inf2) and a local copy of an S3 artifact's manifest."""
    make_artifact(tmp_path / "artifacts" / "minilm-inf2", "inf2")
    manifest = load_manifest(make_artifact(tmp_path / "s3copy", "inf2"))
    (tmp_path / "manifest.json").write_text(manifest.model_copy(update={"cache_key": EXAMPLE_KEY}).model_dump_json())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def rendered(argv: list[str], workdir: Path, capsys) -> list[dict]:
    assert main(argv[1:]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if "--out" in argv:
        out = (workdir / argv[argv.index("--out") + 1]).read_text()
    return [d for d in yaml.safe_load_all(out) if d]


def test_render_commands_run_and_validate(workdir, capsys):
    for argv in neuronserve_commands("neuronserve deploy render"):
        docs = rendered(argv, workdir, capsys)
        kinds = [d["kind"] for d in docs]
        assert kinds == ["RayService", "Service", "PodDisruptionBudget"] + ["NetworkPolicy"] * 4, kinds
        for d in docs:
            validate_object(d)
            for where, template in pod_security.pod_templates(d):
                assert pod_security.violations(template["spec"]) == [], where
        rs = docs[0]
        assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
        images = {c["image"] for _, t in pod_security.pod_templates(rs) for c in t["spec"]["containers"]
                  if "(added by KubeRay)" not in c["name"]}
        assert all(i.startswith(VARIABLES["REPO"] + ":0.1.0-") for i in images), images


def test_api_key_secret_is_the_one_the_page_creates(workdir, capsys):
    (argv,) = [a for a in neuronserve_commands("neuronserve deploy render") if "--api-key-secret" in a]
    secret = argv[argv.index("--api-key-secret") + 1]
    creates = [c for c in commands() if c.startswith("kubectl create secret generic")]
    assert creates and all(f"generic {secret} " in c and "--from-literal=api-keys=" in c for c in creates), creates
    rs = rendered(argv, workdir, capsys)[0]
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert {"name": "NEURONSERVE_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "api-keys"}}} in worker["env"]


def test_offline_check_command_accepts_the_rendering(workdir, capsys):
    (argv,) = [a for a in neuronserve_commands("neuronserve deploy render") if "--out" in a]
    rendered(argv, workdir, capsys)
    (check,) = [c for c in blocks("bash") if c.startswith("python -c")]
    code = shlex.split(check.replace("\n", "\n"))  # python, -c, CODE, FILE
    assert code[:2] == ["python", "-c"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code[2], str(workdir / code[3])], capture_output=True, text=True,
                         env=env, cwd=str(REPO), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7 objects valid, every pod restricted"


def test_overlay_of_your_own_builds(tmp_path):
    if not kustomize.real_kustomize():
        pytest.skip("the page's overlay uses `images:`, which needs a real kustomize (kubectl kustomize)")
    (text,) = [b for b in blocks("yaml") if b.startswith("resources: [../overlays/")]
    tree = tmp_path / "k8s"
    subprocess.run(["cp", "-r", str(REPO / "k8s"), str(tree)], check=True)
    (tree / "local").mkdir()
    (tree / "local" / "kustomization.yaml").write_text(text)
    objs = kustomize.build(tree / "local", use_real=True)
    spec = yaml.safe_load(text)
    for obj in objs:
        validate_object(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == spec["namespace"], obj["metadata"]
        for where, template in pod_security.pod_templates(obj):
            assert pod_security.violations(template["spec"]) == [], where
            for c in template["spec"]["containers"]:
                if "(added by KubeRay)" not in c["name"]:
                    assert c["image"] == f"{spec['images'][0]['newName']}:{spec['images'][0]['newTag']}", c["image"]


def test_ingress_patch_on_the_page_applies():
    (text,) = [b for b in blocks("yaml") if "neuronserve-serve" in b and "patches:" in b]
    patch = yaml.safe_load(re.sub(r"^  ", "", text, flags=re.M))["patches"][0]
    base = kustomize.build_subset(REPO / "k8s" / "overlays" / "inf2-48xlarge")
    (policy,) = [o for o in base if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == patch["target"]["name"]]
    kustomize.apply_json_patch(policy, yaml.safe_load(patch["patch"]))
    validate_object(policy)
    assert policy["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]


def test_requests_name_the_served_model():
    models = re.findall(r'"model":\s*"([^"]+)"', DOC.read_text())
    assert models and set(models) == {DEFAULT_MODEL_NAME}, models
