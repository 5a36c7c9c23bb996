"""NeuronBackend over artifacts traced with the torch_neuronx stand-in (a test double)."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from neuronserve.common import neuron_sdk as neuron
from neuronserve.models.artifact import Bucket, load_manifest, save_manifest
from neuronserve.serve.backends.base import Backend, BackendError, load_backend
from neuronserve.serve.backends.neuron import NeuronBackend, parse_visible_cores
from tests.fixtures.neuron_standin import build_standin_artifact, standin_installed, toy_module

B1, B2 = Bucket(1, 8), Bucket(2, 16)
OLDER_SDK = {"torch_neuronx": "2.9.0.2.14.1", "neuronx_cc": "2.25.3371.0", "neuron_sdk": "unknown"}
REAL_231 = {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "2.26.6360.0", "neuron_sdk": "2.31"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_standin_artifact(tmp_path_factory.mktemp("neuron") / "art", target="inf2")


@pytest.fixture
def tnx(monkeypatch):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    with standin_installed() as module:
        yield module


@pytest.fixture
def copy_of(tmp_path, artifact):
    def make(**changes):
        dst = tmp_path / "copy"
        shutil.copytree(artifact, dst)
        manifest = load_manifest(dst).model_copy(update=changes)
        save_manifest(manifest, dst)
        return dst, manifest

    return make


def open_backend(path, **kw) -> NeuronBackend:
    return NeuronBackend(path, load_manifest(path), **kw)


def inputs(bucket: Bucket, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (bucket.batch_size, bucket.seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[:, bucket.seq_len // 2 :] = 0
    return ids, mask, torch.zeros_like(ids)


def test_forward_runs_every_bucket(tnx, artifact):
    backend = open_backend(artifact)
    assert isinstance(backend, Backend) and backend.kind == "neuron"
    ref = toy_module()
    for bucket in (B1, B2):
        x = inputs(bucket)
        out = backend.forward(bucket, x)
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert tuple(out.shape) == (bucket.batch_size, 4)
        torch.testing.assert_close(out, ref(*x))


def test_load_backend_auto_picks_neuron(tnx, artifact):
    assert isinstance(load_backend(artifact), NeuronBackend)


def test_refuses_cpu_artifact(tnx, copy_of):
    path, manifest = copy_of(target="cpu")
    with pytest.raises(BackendError, match="compiled for cpu.*cpu backend.*--target inf2"):
        NeuronBackend(path, manifest)


def test_refuses_artifact_for_another_target(tnx, artifact):
    with pytest.raises(BackendError) as e:
        open_backend(artifact, expected_target="trn1")
    msg = str(e.value)
    assert "compiled for inf2" in msg and "machine is trn1" in msg and "neuronserve compile --target trn1" in msg
    open_backend(artifact, expected_target="inf2")  # the matching target loads


def test_refuses_another_sdk_release(tnx, copy_of):
    path, manifest = copy_of(versions={"torch": "2.9.0", **OLDER_SDK})
    with pytest.raises(BackendError) as e:
        NeuronBackend(path, manifest)
    msg = str(e.value)
    assert "2.9.0.2.14.1" in msg and "2.25.3371.0" in msg  # what compiled it
    assert "2.9.0.2.15.32035" in msg and "2.26.6360.0" in msg  # what is installed
    assert "recompile with `neuronserve compile --target inf2`" in msg


def test_refuses_artifact_without_sdk_versions(tnx, copy_of):
    path, manifest = copy_of(versions={"torch": "2.9.0"})
    with pytest.raises(BackendError, match="records no Neuron SDK versions"):
        NeuronBackend(path, manifest)


def test_standin_artifact_does_not_load_on_the_real_sdk(tnx, artifact, monkeypatch):
    monkeypatch.setattr(neuron, "sdk_versions", lambda: dict(REAL_231))
    with pytest.raises(BackendError, match="test stand-in"):
        open_backend(artifact)


def test_missing_sdk_is_a_backend_error(artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)
    monkeypatch.setattr(neuron, "_dist_version", lambda name: None)
    with pytest.raises(BackendError, match="torch-neuronx is not installed.*pip.repos.neuron.amazonaws.com"):
        open_backend(artifact)


@pytest.mark.parametrize(
    "bad",
    [
        inputs(Bucket(1, 16)),  # wrong batch
        inputs(Bucket(2, 8)),  # wrong length
        inputs(B2)[:2],  # missing token_type_ids
    ],
)
def test_wrong_shape_is_refused(tnx, artifact, bad):
    backend = open_backend(artifact)
    with pytest.raises(BackendError):
        backend.forward(B2, bad)


def test_unknown_bucket_is_refused(tnx, artifact):
    backend = open_backend(artifact)
    with pytest.raises(BackendError, match="4x8 is not compiled.*1x8, 2x16"):
        backend.forward(Bucket(4, 8), inputs(Bucket(4, 8)))


def test_runtime_failure_names_bucket_and_file(tnx, artifact):
    backend = open_backend(artifact)

    def broken(*_):
        raise RuntimeError("nrt_execute status=4")

    backend._modules[B1] = broken
    with pytest.raises(BackendError) as e:
        backend.forward(B1, inputs(B1))
    assert "bucket 1x8" in str(e.value) and "b1_s8.pt" in str(e.value) and "nrt_execute" in str(e.value)
    assert backend.health()["errors"] == 1


def test_missing_or_changed_graph_file(tnx, copy_of):
    path, manifest = copy_of()
    (path / "graphs" / "b2_s16.pt").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="2x16.*does not match the sha256"):
        NeuronBackend(path, manifest)
    with pytest.raises(BackendError, match="bucket 2x16: loading .*b2_s16.pt"):
        NeuronBackend(path, manifest, verify_files=False)
    (path / "graphs" / "b2_s16.pt").unlink()
    with pytest.raises(BackendError, match="2x16.*b2_s16.pt is missing"):
        NeuronBackend(path, manifest)


def test_warmup_covers_every_bucket(tnx, artifact):
    seconds = open_backend(artifact).warmup()
    assert set(seconds) == {"1x8", "2x16"}
    assert all(s >= 0 for s in seconds.values())


def test_health_reports_visible_cores(tnx, artifact, monkeypatch):
    health = open_backend(artifact).health()
    assert health["ok"] is True and health["device"] == "neuron" and health["target"] == "inf2"
    assert health["cores"] is None and health["visible_cores_env"] is None  # unset: all cores
    assert health["buckets"] == ["1x8", "2x16"]
    assert health["sdk"]["neuron_sdk"] == "2.31"
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "2-3")
    health = open_backend(artifact).health()
    assert health["cores"] == [2, 3] and health["visible_cores_env"] == "2-3"


def test_parse_visible_cores():
    assert parse_visible_cores("0") == [0]
    assert parse_visible_cores("0,1") == [0, 1]
    assert parse_visible_cores("4-7") == [4, 5, 6, 7]
    assert parse_visible_cores(" ") is None
    with pytest.raises(BackendError, match="'x'.*0-3"):
        parse_visible_cores("x")
