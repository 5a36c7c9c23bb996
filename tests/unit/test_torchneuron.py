"""trn2/trn3 through TorchNeuron: the compile's refusal without a device, the artifact it writes
through the TorchNeuron stand-in (a test double), the backend's loading rules, and the two Neuron
toolchains refusing each other's artifacts with messages that name both."""

from __future__ import annotations

import shutil
import sys
import types

import pytest
import torch

from neuronserve import cli
from neuronserve.common import neuron_sdk
from neuronserve.common import torchneuron as tn
from neuronserve.compile.compiler import CompileError, CompileOptions, compile_artifact
from neuronserve.models.artifact import Bucket, load_manifest, save_manifest
from neuronserve.serve.backends.base import BackendError, load_backend
from neuronserve.serve.backends.neuron import NeuronBackend
from neuronserve.serve.backends.torchneuron import TorchNeuronBackend
from tests.fixtures.neuron_standin import build_standin_artifact, standin_installed
from tests.fixtures.tiny_models import make_tiny_model
from tests.fixtures.torchneuron_standin import torchneuron_installed

BUCKETS = [Bucket(1, 8), Bucket(2, 16)]
BOTH = ("neuronserve[neuron]", "neuronserve[trainium]", "torch-neuronx 2.9", "torch-neuronx 2.13.x/2.14.x")


def names_both(message: str) -> bool:
    return all(part in message for part in BOTH)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), family="bert", task="embed")


def compile_native(model_dir, out, **kw):
    opts = dict(model=str(model_dir), task="embed", target="trn2", buckets=list(BUCKETS), out=out, optlevel=1)
    opts.update(kw)
    return compile_artifact(CompileOptions(**opts))


@pytest.fixture(scope="module")
def native_artifact(model_dir, tmp_path_factory):
    with torchneuron_installed(device=True):
        return compile_native(model_dir, tmp_path_factory.mktemp("trn2") / "art").out_dir


@pytest.fixture(scope="module")
def xla_artifact(tmp_path_factory):
    return build_standin_artifact(tmp_path_factory.mktemp("inf2") / "art", target="inf2")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (tn.LNC_ENV, tn.NEFF_CACHE_ENV, tn.CC_FLAGS_ENV, "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.delenv(name, raising=False)


# --- compiling without a device ----------------------------------------------------------------


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_compile_refuses_on_a_host_without_a_neuron_device(target, model_dir, tmp_path, monkeypatch, capsys):
    """TorchNeuron compiles just-in-time on the device; on this host the command says so and writes nothing."""
    monkeypatch.setattr(neuron_sdk, "NEURON_DEVICE", tmp_path / "absent-neuron0")
    out = tmp_path / "art"
    code = cli.main(["compile", "--model", str(model_dir), "--target", target, "--buckets", "1x8", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"compiling for {target} needs a Neuron device" in err and "absent-neuron0" in err
    assert "TorchNeuron" in err and "just-in-time" in err and "about-torch-compile" in err
    assert f"on a {target} instance" in err and "inf2/trn1" in err
    assert not (out / "manifest.json").exists()


def test_compile_refusal_comes_before_any_toolchain_lookup(model_dir, tmp_path, monkeypatch):
    # Even with TorchNeuron (the stand-in) importable, no device means no compile.
    with torchneuron_installed(device=False) as tnx:
        with pytest.raises(CompileError, match="needs a Neuron device"):
            compile_native(model_dir, tmp_path / "art")
        assert tnx.calls("compile") == [] and tnx.calls("neuron_backend") == []


# --- the artifact ------------------------------------------------------------------------------


def test_the_artifact_packs_one_program_per_bucket_and_its_neff_cache(native_artifact):
    m = load_manifest(native_artifact)
    assert m.neuron_stack == "torchneuron" and m.lnc == 2 and m.neuron_cache_dir == "neuron-cache"
    assert m.compiler_args == ["--optlevel", "1"] and m.precision == "fp32"
    assert sorted(e.file for e in m.buckets) == ["graphs/b1_s8.pt2", "graphs/b2_s16.pt2"]
    neffs = tn.neff_files(native_artifact / "neuron-cache")
    assert len(neffs) == len(BUCKETS)
    listed = {name for name in m.files if name.startswith("neuron-cache/")}
    assert listed == {p.relative_to(native_artifact).as_posix() for p in neffs}  # what a store push carries
    assert all(e.parity is not None and e.parity.passed for e in m.buckets)


def test_an_unchanged_compile_is_a_cache_hit_without_touching_the_device(model_dir, native_artifact, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(native_artifact, out)
    with torchneuron_installed(device=True) as tnx:
        result = compile_native(model_dir, out)
        assert result.cache_hit and tnx.calls("neuron_backend") == []
        shutil.rmtree(out / "neuron-cache")  # without its NEFFs it is no hit: serving would compile
        result = compile_native(model_dir, out)
    assert not result.cache_hit and len(tn.neff_files(out / "neuron-cache")) == len(BUCKETS)


def test_bf16_maps_to_neuron_autocast_at_compile_and_serve(model_dir, tmp_path, clean_env):
    with torchneuron_installed(device=True) as tnx:
        result = compile_native(model_dir, tmp_path / "bf16", auto_cast="bf16")
        assert result.manifest.precision == "bf16"
        assert [c["dtype"] for c in tnx.calls("autocast")] == ["torch.bfloat16"] * len(BUCKETS)
        assert all(c["autocast"] for c in tnx.calls("neuron_backend"))
        tnx.reset()
        backend = load_backend(result.out_dir)
        backend.warmup()
        assert [c["dtype"] for c in tnx.calls("autocast")] == ["torch.bfloat16"] * len(BUCKETS)
        assert [c["cache"] for c in tnx.calls("neuron_backend")] == ["hit"] * len(BUCKETS)


def test_the_lnc_comes_from_the_environment_and_keys_the_cache(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(tn.LNC_ENV, "1")
    with torchneuron_installed(device=True) as tnx:
        result = compile_native(model_dir, tmp_path / "lnc1")
        assert {c["env"][tn.LNC_ENV] for c in tnx.calls("neuron_backend")} == {"1"}
    assert result.manifest.lnc == 1
    monkeypatch.setenv(tn.LNC_ENV, "3")
    with torchneuron_installed(device=True), pytest.raises(CompileError, match="NEURON_LOGICAL_NC_CONFIG='3'.*1 or 2"):
        compile_native(model_dir, tmp_path / "lnc3")


# --- the backend -------------------------------------------------------------------------------


def test_load_backend_picks_torchneuron_for_trn2_and_places_on_the_neuron_device(native_artifact, clean_env):
    with torchneuron_installed(device=True) as tnx:
        backend = load_backend(native_artifact, expected_target="trn2")
        assert isinstance(backend, TorchNeuronBackend) and backend.kind == "neuron"
        assert {c["device"] for c in tnx.calls("module.to")} == {"neuron"}
        assert len(tnx.calls("compile")) == len(BUCKETS)
        out = backend.forward(BUCKETS[0], tuple(torch.ones(1, 8, dtype=torch.int64) for _ in range(3)))
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        import os

        assert os.environ[tn.LNC_ENV] == "2" and os.environ[tn.NEFF_CACHE_ENV] == str(backend.neff_cache)
        assert backend.neff_cache != native_artifact / "neuron-cache"  # a writable copy


def test_refuses_another_lnc_in_the_environment(native_artifact, clean_env, monkeypatch):
    monkeypatch.setenv(tn.LNC_ENV, "1")
    with torchneuron_installed(device=True), pytest.raises(BackendError, match="NEURON_LOGICAL_NC_CONFIG=1.*LNC 2"):
        load_backend(native_artifact)


def test_refuses_an_artifact_without_its_neffs(native_artifact, tmp_path, clean_env):
    copy = tmp_path / "copy"
    shutil.copytree(native_artifact, copy)
    shutil.rmtree(copy / "neuron-cache")
    with torchneuron_installed(device=True), pytest.raises(BackendError, match="no NEFFs in neuron-cache/.*would compile"):
        load_backend(copy)


def test_refuses_a_changed_neff(native_artifact, tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(native_artifact, copy)
    tn.neff_files(copy / "neuron-cache")[0].write_bytes(b"not the compiled one")
    with torchneuron_installed(device=True), pytest.raises(BackendError, match="NEFF cache file neuron-cache/.*sha256"):
        load_backend(copy)


def test_refuses_another_torchneuron_release(native_artifact, tmp_path, clean_env):
    copy = tmp_path / "copy"
    shutil.copytree(native_artifact, copy)
    m = load_manifest(copy)
    save_manifest(m.model_copy(update={"versions": {**m.versions, "torch_neuronx": "2.13.3.0"}}), copy)
    with torchneuron_installed(device=True), pytest.raises(BackendError, match="2.13.3.0.*2.14.3.0.*do not load across"):
        load_backend(copy)


def test_refuses_a_trn2_artifact_on_a_trn3_machine(native_artifact, clean_env):
    with torchneuron_installed(device=True), pytest.raises(BackendError, match="compiled for trn2 but this machine is trn3"):
        load_backend(native_artifact, expected_target="trn3")


# --- one stack's artifact on the other ------------------------------------------------------------


def test_a_torchneuron_artifact_refuses_the_xla_backend(native_artifact):
    with standin_installed(), pytest.raises(BackendError) as e:
        NeuronBackend(native_artifact, load_manifest(native_artifact))
    assert names_both(str(e.value)) and "TorchNeuron backend" in str(e.value)


def test_an_xla_artifact_refuses_the_torchneuron_backend(xla_artifact, clean_env):
    with torchneuron_installed(device=True), pytest.raises(BackendError) as e:
        TorchNeuronBackend(xla_artifact, load_manifest(xla_artifact))
    assert names_both(str(e.value)) and "inf2" in str(e.value)


def test_an_older_trn2_artifact_built_by_the_trace_is_refused_naming_both(xla_artifact, tmp_path, clean_env):
    """trn2 artifacts written before this change went through torch_neuronx.trace (no stack field,
    torch-neuronx 2.9 in their versions): load_backend sends trn2 to TorchNeuron, which refuses them."""
    copy = tmp_path / "old-trn2"
    shutil.copytree(xla_artifact, copy)
    m = load_manifest(copy)
    assert m.neuron_stack is None
    save_manifest(m.model_copy(update={"target": "trn2"}), copy)
    with torchneuron_installed(device=True), pytest.raises(BackendError) as e:
        load_backend(copy)
    assert names_both(str(e.value)) and "recompile it with `neuronserve compile --target trn2`" in str(e.value)


def test_a_torchneuron_artifact_on_a_host_with_the_xla_toolchain(native_artifact, clean_env):
    with standin_installed(), pytest.raises(BackendError) as e:  # torch-neuronx 2.9.x importable
        load_backend(native_artifact)
    assert names_both(str(e.value)) and "2.9.0.2.15.32035" in str(e.value)


def test_an_xla_artifact_on_a_host_with_torchneuron(xla_artifact, clean_env):
    with torchneuron_installed(device=True), pytest.raises(BackendError) as e:  # torch-neuronx 2.14.x importable
        load_backend(xla_artifact)
    assert names_both(str(e.value)) and "2.14.3.0" in str(e.value)


# --- telling the two toolchains apart ------------------------------------------------------------


@pytest.mark.parametrize(
    "version, stack",
    [("2.9.0.2.15.32035", "xla"), ("2.9.0.2.14.1", "xla"), ("2.13.3.0.123", "torchneuron"),
     ("2.14.3.0", "torchneuron"), ("1.0", None), ("2.10.0", None), (None, None)],
)
def test_stack_of_version(version, stack):
    assert neuron_sdk.stack_of_version(version) == stack


def test_distribution_versions_decide_over_what_imports(monkeypatch):
    """A module with `trace` but a 2.14 distribution is TorchNeuron to the XLA import, and a 2.9
    distribution is the XLA toolchain to the TorchNeuron import: both say so naming both."""
    with standin_installed():
        monkeypatch.setattr(neuron_sdk, "_dist_version", {"torch-neuronx": "2.14.3.0.42"}.get)
        with pytest.raises(neuron_sdk.NeuronSDKMissing) as e:
            neuron_sdk.import_torch_neuronx()
        assert names_both(str(e.value)) and "2.14.3.0.42" in str(e.value)
    with torchneuron_installed(device=False):
        monkeypatch.setattr(neuron_sdk, "_dist_version", {"torch-neuronx": "2.9.0.2.15.32035"}.get)
        with pytest.raises(neuron_sdk.NeuronSDKMissing) as e:
            neuron_sdk.import_torchneuron()
        assert names_both(str(e.value))


def test_torchneuron_missing_or_a_placeholder(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)
    monkeypatch.setattr(neuron_sdk, "_dist_version", lambda name: None)
    with pytest.raises(neuron_sdk.NeuronSDKMissing, match=r"TorchNeuron .* is not installed.*neuronserve\[trainium\]"):
        neuron_sdk.import_torchneuron()
    monkeypatch.setitem(sys.modules, "torch_neuronx", types.ModuleType("torch_neuronx"))
    monkeypatch.setattr(neuron_sdk, "_dist_version", lambda name: "1.0" if name == "torch-neuronx" else None)
    with pytest.raises(neuron_sdk.NeuronSDKMissing, match="1.0 is neither TorchNeuron.*nor the XLA toolchain"):
        neuron_sdk.import_torchneuron()


def test_torchneuron_versions_of_the_standin():
    with torchneuron_installed(device=False):
        assert neuron_sdk.torchneuron_versions() == {
            "torch_neuronx": "2.14.3.0", "neuronx_cc": "2.28.7631.0", "neuron_sdk": "2.33",
            "neuron_stack": "torchneuron", "neuron_test_double": "true",
        }


def test_the_standin_itself_refuses_the_neuron_device_without_one():
    with torchneuron_installed(device=False):
        with pytest.raises(RuntimeError, match="no Neuron device"):
            torch.ones(2).to("neuron")


def test_neffs_go_into_the_cache_the_environment_names(native_artifact, tmp_path, clean_env, monkeypatch):
    """A deployment names the cache for every process of the pod (before torch loads); the backend
    fills that one, and a second backend of the same artifact copies nothing again."""
    cache = tmp_path / "pod-neff-cache"
    monkeypatch.setenv(tn.NEFF_CACHE_ENV, str(cache))
    with torchneuron_installed(device=True) as tnx:
        backend = load_backend(native_artifact)
        assert backend.neff_cache == cache
        names = sorted(p.relative_to(cache) for p in tn.neff_files(cache))
        assert names == sorted(p.relative_to(native_artifact / "neuron-cache")
                               for p in tn.neff_files(native_artifact / "neuron-cache"))
        stamps = {p: p.stat().st_mtime_ns for p in tn.neff_files(cache)}
        backend.warmup()
        assert [c["cache"] for c in tnx.calls("neuron_backend")] == ["hit"] * len(BUCKETS)
        load_backend(native_artifact)
        assert {p: p.stat().st_mtime_ns for p in tn.neff_files(cache)} == stamps
