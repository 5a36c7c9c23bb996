"""The whole application on declared NeuronCores (stand-in SDK): one replica per core, each pinned
to a distinct core, serving the same vectors as the CPU artifact of the same model."""

import time

import httpx
import numpy as np
import pytest

from neuronserve.compile.compiler import CompileOptions, compile_artifact
from neuronserve.models.artifact import parse_buckets
from neuronserve.serve.settings import AppArgs
from tests.fixtures.neuron_standin import standin_installed
from tests.fixtures.tiny_models import make_tiny_model
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration
BUCKETS = parse_buckets("1x16,4x16,2x32")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement-app")
    model = make_tiny_model(root, family="bert", task="embed")
    with standin_installed():
        neuron = compile_artifact(CompileOptions(model=str(model), target="inf2", buckets=BUCKETS, out=root / "inf2"))
    cpu = compile_artifact(CompileOptions(model=str(model), target="cpu", buckets=BUCKETS, out=root / "cpu"))
    return neuron.out_dir, cpu.out_dir


@pytest.fixture
def neuron_app(serve_instance):
    """Deletes the app afterwards: its replicas hold every declared NeuronCore."""
    yield serve_instance
    from ray import serve

    serve.delete("neuronserve")


def test_one_replica_per_neuron_core_each_on_its_own_core(neuron_app, artifacts):
    serve_instance = neuron_app
    neuron_dir, cpu_dir = artifacts
    args = AppArgs(artifacts=str(neuron_dir), instance_type="inf2.xlarge")  # num_replicas auto: 4 declared cores
    deploy(serve_instance, args)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=10) as c:
        while len(seen) < 4 and time.monotonic() < deadline:
            r = c.get(serve_instance + "/v2/health/ready")
            if r.status_code == 200:  # replicas still warming answer 503 until every bucket is warm
                seen[r.json()["replica"]] = r.json()["backend"]
    assert len(seen) == 4, f"replicas seen: {len(seen)}"
    cores = [tuple(h["cores"]) for h in seen.values()]
    assert all(h["target"] == "inf2" and len(cc) == 1 for h, cc in zip(seen.values(), cores))
    assert sorted(cores) == [(0,), (1,), (2,), (3,)]
    texts = ["hello world", "the quick brown fox jumps over the lazy dog"]
    r = httpx.post(serve_instance + "/v1/embeddings", json={"input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    from neuronserve.serve.engine import Engine

    want = Engine(cpu_dir, "cpu").embed(texts)
    assert np.abs(got - want).max() < 1e-4
