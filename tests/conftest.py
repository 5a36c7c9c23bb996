import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    """Tests marked `neuron` need a NeuronCore: skip them, saying why, where there is none."""
    if pathlib.Path("/dev/neuron0").exists():
        return
    skip = pytest.mark.skip(reason="no NeuronCore (/dev/neuron0 absent)")
    for item in items:
        if item.get_closest_marker("neuron") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory):
    """The default model compiled for CPU with a few buckets (about 10 s), shared by the session."""
    from neuronserve.compile.compiler import CompileOptions, compile_artifact
    from neuronserve.models.artifact import parse_buckets

    out = tmp_path_factory.mktemp("minilm")
    return compile_artifact(CompileOptions(model="default", buckets=parse_buckets("1x16,4x16,8x16,4x32,4x64,2x128,2x256"), out=out)).out_dir


@pytest.fixture(autouse=True)
def _own_cache_dir(request, tmp_path_factory, monkeypatch):
    """Unit and contract tests that build replicas keep their warm-up timing tables (and any
    compile into the cache) out of the user's cache; integration tests give their servers a HOME
    of their own."""
    if "integration" not in request.node.path.parts and "NEURONSERVE_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "neuronserve-cache"))
