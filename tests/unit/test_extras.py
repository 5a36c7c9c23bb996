"""The serving install carries what serving needs: plotting (matplotlib) is the `loadtest` extra's,
manifest validation (jsonschema, kubernetes-validate) the `deploy` extra's; `test` pulls both in,
and a missing extra is one clear message naming it (checked in a fresh interpreter where the module
is made unimportable with a None entry in sys.modules)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def names(requirements):
    return {re.split(r"[<>=!~;\[\s]", r, maxsplit=1)[0].lower() for r in requirements}


def test_serving_install_has_no_plotting_or_validation():
    deps = names(project()["dependencies"])
    assert not deps & {"matplotlib", "jsonschema", "kubernetes-validate"}, deps


def test_extras_and_test_pulls_them_in():
    extras = project()["optional-dependencies"]
    assert names(extras["loadtest"]) == {"matplotlib"}
    assert names(extras["deploy"]) == {"jsonschema", "kubernetes-validate"}
    assert names(extras["s3"]) == {"boto3"}
    test = set(extras["test"])
    assert set(extras["loadtest"]) <= test and set(extras["deploy"]) <= test and set(extras["s3"]) <= test


def test_serving_install_has_no_s3_client():
    assert "boto3" not in names(project()["dependencies"])


def test_constraints_still_pin_the_extras():
    pinned = names(line for line in (REPO / "constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert {"matplotlib", "jsonschema", "kubernetes-validate", "boto3", "moto"} <= pinned


def run_without(module: str, code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=str(REPO),
                          timeout=120)


def test_plots_without_matplotlib_name_the_loadtest_extra(tmp_path):
    code = f"""
from neuronserve.deploy.loadtest.config import LoadtestError
from neuronserve.deploy.loadtest import report
for call in (report.require_plotting,
             lambda: report.plot_latency_vs_throughput([], __import__("pathlib").Path({str(tmp_path / "x.png")!r}), "t")):
    try:
        call()
    except LoadtestError as e:
        print(e)
"""
    out = run_without("matplotlib", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["plots need the loadtest extra: pip install 'neuronserve[loadtest]'"] * 2
    assert not (tmp_path / "x.png").exists()


def test_plots_with_matplotlib_still_draw(tmp_path):
    from neuronserve.deploy.loadtest import report

    report.require_plotting()
    path = tmp_path / "x.png"
    report.plot_latency_vs_throughput([], path, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_loadtest_command_reports_the_missing_extra_in_one_line():
    """The command's own error path (LoadtestError: `neuronserve loadtest: error: ...`, exit 1)."""
    code = """
import argparse
from unittest import mock
from neuronserve.deploy.loadtest import cli, report
with mock.patch.object(cli, "_loadtest", side_effect=lambda *a: report.require_plotting()), \\
     mock.patch.object(cli, "config_from_args", return_value=None):
    raise SystemExit(cli.run(argparse.Namespace(compare=None, header=[])))
"""
    out = run_without("matplotlib", code)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().endswith("error: plots need the loadtest extra: pip install 'neuronserve[loadtest]'")
    assert len(out.stderr.strip().splitlines()) == 1


def test_serving_modules_import_without_the_extras():
    """The serving path (the app, its replica and engine, the exporter) and the commands import with
    matplotlib and kubernetes-validate unimportable. jsonschema stays: Ray itself depends on it."""
    code = """
import sys
sys.modules["matplotlib"] = None
import neuronserve.cli, neuronserve.deploy.render, neuronserve.deploy.cli, neuronserve.deploy.loadtest.cli
import neuronserve.deploy.loadtest.report, neuronserve.serve.exporter, neuronserve.serve.app
import neuronserve.serve.serve_cli, neuronserve.compile.cli
print(sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "kubernetes_validate") and sys.modules[m]))
"""
    out = run_without("kubernetes_validate", code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_manifest_validation_without_the_deploy_extra():
    code = """
from tests.fixtures.k8s_validate import MissingExtraError, validate_object
try:
    validate_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})
except MissingExtraError as e:
    print(e)
"""
    for module in ("jsonschema", "kubernetes_validate"):
        out = run_without(module, code)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "manifest validation needs the deploy extra: pip install 'neuronserve[deploy]'", module


def test_an_s3_uri_without_boto3_names_the_s3_extra(tmp_path):
    """Local artifacts need no boto3; an s3:// one is one line naming the extra."""
    code = f"""
from neuronserve.compile import store
print(store.resolve_artifacts({str(tmp_path)!r}))
try:
    store.pull("s3://bucket-name/prefix/key", cache_root={str(tmp_path / "cache")!r})
except store.StoreError as e:
    print(e)
"""
    out = run_without("boto3", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(tmp_path), "s3:// artifacts need the s3 extra: pip install 'neuronserve[s3]'"]


def test_the_two_neuron_toolchains_are_two_extras_that_cannot_be_confused():
    """`neuron` is the XLA toolchain (torch-neuronx 2.9.x with torch 2.9, inf2/trn1); `trainium` is
    TorchNeuron (torch-neuronx 2.14.x with torch 2.14, trn2/trn3), which needs Python 3.12+: its
    requirements carry that marker, so `pip install -e .[test]` and the extra itself still resolve on
    the Python CI runs (3.11), where they select nothing."""
    from packaging.requirements import Requirement

    extras = project()["optional-dependencies"]
    xla = {r.name: r for r in map(Requirement, extras["neuron"])}
    native = {r.name: r for r in map(Requirement, extras["trainium"])}
    assert set(native) == {"torch-neuronx", "torch"}
    assert xla["torch-neuronx"].specifier.contains("2.9.0.2.15.32035")
    assert not xla["torch-neuronx"].specifier.contains("2.14.3.0")
    assert native["torch-neuronx"].specifier.contains("2.14.3.0.1") and not native["torch-neuronx"].specifier.contains("2.9.0.2.15.32035")
    assert native["torch"].specifier.contains("2.14.0") and not native["torch"].specifier.contains("2.9.0")
    for req in native.values():
        assert req.marker is not None
        assert req.marker.evaluate({"python_version": "3.12"}) and not req.marker.evaluate({"python_version": "3.11"})
    assert not any("torch-neuronx" in r for r in extras["test"]), "the suite runs on the stand-ins, not the SDK"
    # The serving dependency range admits both toolchains' torch.
    (torch_req,) = [Requirement(r) for r in project()["dependencies"] if Requirement(r).name == "torch"]
    assert torch_req.specifier.contains("2.9.0") and torch_req.specifier.contains("2.14.0")


def test_the_toolchain_messages_name_both_extras():
    from neuronserve.common.neuron_sdk import STACK_NAMES

    assert "neuronserve[neuron]" in STACK_NAMES["xla"] and "neuronserve[trainium]" in STACK_NAMES["torchneuron"]
