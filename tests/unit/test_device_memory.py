"""Device memory: recorded in the manifest at compile time, one copy of the weights for every
bucket of a Neuron artifact (torch_neuronx test double), and the start-up refusal of a set of
models that does not fit a replica's NeuronCores."""

import shutil

import numpy as np
import pytest

from neuronserve.common import neuron_sdk
from neuronserve.compile.compiler import WEIGHTS_FILE, CompileOptions, compile_artifact
from neuronserve.models.artifact import DeviceMemory, device_memory_bytes, load_manifest, parse_buckets, save_manifest
from neuronserve.serve.engine import Engine
from neuronserve.serve.placement import check_models, device_memory_limit
from neuronserve.serve.settings import AppArgs
from tests.fixtures.neuron_standin import standin_installed
from tests.fixtures.tiny_models import make_tiny_model

TEXTS = ["one copy of the weights", "hello"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), family="bert", task="embed")


@pytest.fixture
def tnx(monkeypatch, tmp_path):
    monkeypatch.setattr(neuron_sdk, "NEURON_DEVICE", tmp_path / "no-device")  # compile with cpu_backend
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    with standin_installed() as module:
        yield module


def test_a_cpu_artifact_records_its_graphs_and_weights(tiny, tmp_path):
    m = compile_artifact(CompileOptions(model=str(tiny), buckets=parse_buckets("1x16,4x32"), out=tmp_path / "a")).manifest
    mem = m.device_memory
    assert mem is not None and m.weights_file is None
    assert mem.weights_bytes > 100_000  # the tiny model's fp32 parameters (vocabulary 1000 x hidden 32, ...)
    files = {e.file for e in m.buckets} | {m.packed.file}
    assert mem.weight_copies == len(files) == 2  # the shape-polymorphic graph and the packed one
    on_disk = sum((tmp_path / "a" / f).stat().st_size for f in files)
    assert mem.total_bytes == pytest.approx(on_disk, rel=0.05)


def test_a_multi_bucket_neuron_artifact_keeps_one_copy_of_the_weights(tnx, tiny, tmp_path):
    out = tmp_path / "inf2"
    m = compile_artifact(CompileOptions(model=str(tiny), target="inf2", buckets=parse_buckets("1x16,2x16,2x32"), out=out)).manifest
    traces = tnx.calls("trace")
    assert len(traces) == 3 and all(c["inline_weights_to_neff"] is False for c in traces)
    assert m.weights_file == WEIGHTS_FILE and (out / WEIGHTS_FILE).is_file() and WEIGHTS_FILE in m.files
    mem = m.device_memory
    assert mem.weight_copies == 1
    inlined = DeviceMemory.of(mem.weights_bytes, [(out / e.file).stat().st_size for e in m.buckets], shared=False)
    assert inlined.total_bytes - mem.total_bytes == 2 * mem.weights_bytes  # what two more copies would cost

    # Serving it: every graph is given the one copy, loaded once, and computes what the CPU graph does.
    tnx.reset()
    engine = Engine(out, "neuron")
    calls = tnx.calls("replace_weights")
    assert len(calls) == 3 and all(c["separated"] and c["matched"] == c["tensors"] > 0 for c in calls)
    assert len({c["weights_id"] for c in calls}) == 1
    cpu = Engine(compile_artifact(CompileOptions(model=str(tiny), buckets=parse_buckets("2x32"), out=tmp_path / "cpu")).out_dir, "cpu")
    assert np.allclose(engine.embed(TEXTS), cpu.embed(TEXTS), atol=1e-5)


def test_a_one_bucket_neuron_artifact_inlines_its_weights(tnx, tiny, tmp_path):
    m = compile_artifact(CompileOptions(model=str(tiny), target="inf2", buckets=parse_buckets("2x32"), out=tmp_path / "one")).manifest
    assert [c["inline_weights_to_neff"] for c in tnx.calls("trace")] == [True]
    assert m.weights_file is None and m.device_memory.weight_copies == 1


def test_an_older_manifest_is_estimated_from_its_files(tiny, tmp_path):
    out = compile_artifact(CompileOptions(model=str(tiny), buckets=parse_buckets("1x16"), out=tmp_path / "old")).out_dir
    m = load_manifest(out)
    recorded, how = device_memory_bytes(m, out)
    assert how == "recorded" and recorded == m.device_memory.total_bytes
    older = m.model_copy(update={"device_memory": None})
    estimated, how = device_memory_bytes(older, out)
    assert "estimated" in how and estimated == sum((out / f).stat().st_size for f in {"graphs/cpu.pt", m.packed.file})
    assert device_memory_bytes(older, None) == (None, "unknown (an older manifest; recompile to record it)")


# -- the start-up check ----------------------------------------------------------------------------
def neuron_manifest(tmp_path, name, gib, target="inf2"):
    src = tmp_path / "src"
    if not (src / "manifest.json").exists():
        tiny = make_tiny_model(tmp_path, family="bert", task="embed")
        compile_artifact(CompileOptions(model=str(tiny), buckets=parse_buckets("1x16"), out=src))
    m = load_manifest(src)
    return name, m.model_copy(update={"target": target, "device_memory": DeviceMemory(
        weights_bytes=int(gib * 2**30), weight_copies=1, graphs_bytes=0)})


def test_limits_per_target_and_the_override():
    assert device_memory_limit("inf2", AppArgs(artifacts="a")) == 16 * 2**30
    assert device_memory_limit("trn1", AppArgs(artifacts="a", cores_per_replica=2)) == 32 * 2**30
    assert device_memory_limit("trn2", AppArgs(artifacts="a")) == 24 * 2**30
    assert device_memory_limit("cpu", AppArgs(artifacts="a")) is None  # host memory: not checked
    assert device_memory_limit("cpu", AppArgs(artifacts="a", device_memory_gib=0.5)) == 2**29


def test_a_set_that_does_not_fit_is_refused_naming_the_models_and_sizes(tmp_path):
    served = [neuron_manifest(tmp_path, "e5", 9.0), neuron_manifest(tmp_path, "bge-reranker", 8.5)]
    with pytest.raises(ValueError) as e:
        check_models(served, AppArgs(artifacts="a"))
    message = str(e.value)
    assert "e5 9.0 GiB" in message and "bge-reranker 8.5 GiB" in message
    assert "17.5 GiB" in message and "16.0 GiB" in message and "--cores-per-replica" in message
    check_models(served, AppArgs(artifacts="a", cores_per_replica=2))  # two NeuronCores hold them
    check_models(served[:1], AppArgs(artifacts="a"))
    with pytest.raises(ValueError, match="device_memory_gib"):
        check_models(served[:1], AppArgs(artifacts="a", device_memory_gib=4))


def test_a_catalog_needs_room_for_its_largest_models_held_at_once(tmp_path):
    served = [neuron_manifest(tmp_path, "a", 9.0), neuron_manifest(tmp_path, "b", 6.0),
              neuron_manifest(tmp_path, "c", 5.0)]
    check_models(served, AppArgs(artifacts="x", max_models_per_replica=2, device_memory_gib=15))  # 9 + 6 fit
    with pytest.raises(ValueError) as e:
        check_models(served, AppArgs(artifacts="x", max_models_per_replica=2, device_memory_gib=14))
    assert "the 2 largest, --max-models-per-replica 2: a 9.0 GiB, b 6.0 GiB" in str(e.value)
