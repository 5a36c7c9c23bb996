"""The simulated NeuronCore: device time from its profile, outputs of the right shape, the GIL free
while it 'runs', one graph at a time. Timing checks use wide tolerances (a loaded 2-core machine)."""

import threading
import time

import pytest
import torch

from neuronserve.models.artifact import Bucket, load_manifest
from neuronserve.serve.backends.base import BackendError, load_backend
from neuronserve.serve.backends.simulated import device_seconds, load_profile, profile_names


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from neuronserve.compile.compiler import CompileOptions, compile_artifact
    from neuronserve.models.artifact import parse_buckets
    from tests.fixtures.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("sim")
    model = make_tiny_model(root / "model")
    return compile_artifact(CompileOptions(model=str(model), buckets=parse_buckets("1x16,2x32"), out=root / "art")).out_dir


def _slow_profile(tmp_path, fixed_ms=50.0, per_token_us=0.0):
    path = tmp_path / "slow.json"
    path.write_text(f'{{"name": "slow", "fixed_ms": {fixed_ms}, "per_padded_token_us": {per_token_us}}}')
    return str(path)


def test_every_shipped_profile_loads_and_says_where_its_numbers_come_from():
    assert {"zero", "bert-base-inf2", "distilbert-base-inf2", "minilm-l6-inf2"} <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert p["source"] and p["fixed_ms"] >= 0 and p["per_padded_token_us"] >= 0


def test_profiles_reproduce_the_published_figures_they_were_fitted_to():
    bert = load_profile("bert-base-inf2")
    assert device_seconds(bert, Bucket(1, 128)) == pytest.approx(1.0e-3, rel=0.01)  # p50 batch 1
    assert device_seconds(bert, Bucket(8, 128)) == pytest.approx(5.97e-3, rel=0.01)  # p50 batch 8
    distil = load_profile("distilbert-base-inf2")
    per_instance = 2 * 16 / device_seconds(distil, Bucket(16, 128))  # 2 NeuronCores
    assert per_instance == pytest.approx(5308, rel=0.02)
    assert device_seconds(load_profile("zero"), Bucket(64, 512)) == 0


def test_forward_returns_the_artifacts_output_shape_and_rejects_wrong_shapes(artifact):
    backend = load_backend(artifact, "simulated", profile="zero")
    manifest = load_manifest(artifact)
    bucket = manifest.bucket_list()[0]
    ids = torch.ones((bucket.batch_size, bucket.seq_len), dtype=torch.long)
    out = backend.forward(bucket, tuple(ids for _ in manifest.inputs))
    assert out.shape == (bucket.batch_size, manifest.model.output_dim) and out.dtype == torch.float32
    with pytest.raises(BackendError, match="does not match bucket"):
        backend.forward(bucket, tuple(ids[:, :-1] for _ in manifest.inputs))
    with pytest.raises(BackendError, match="not compiled"):
        backend.forward(Bucket(3, 7), tuple(ids for _ in manifest.inputs))
    assert "SIMULATED" in backend.health()["device"] and backend.health()["simulated"] is True


def test_each_rows_first_value_counts_its_real_tokens_so_answers_can_be_told_apart(artifact):
    from neuronserve.serve.engine import Engine

    engine = Engine(artifact, "simulated", backend_options={"profile": "zero"})
    texts = ["one", "a somewhat longer text than that", "two words"]
    rows = engine.tokenize(texts)
    bucket = engine.buckets.bucket_for(2, 32)
    out = engine.run_batch(bucket, rows[:2])
    assert out[:, 0].tolist() == [len(rows[0]), len(rows[1])]
    assert (out[:, 1:] == 1).all()
    # The backend's cached tensor is not handed out and changed: a second call is independent.
    again = engine.run_batch(bucket, rows[2:])
    assert again[0, 0] == len(rows[2]) and out[0, 0] == len(rows[0])


def test_device_time_is_honoured_and_the_gil_is_free_meanwhile(artifact, tmp_path):
    backend = load_backend(artifact, "simulated", profile=_slow_profile(tmp_path, fixed_ms=200))
    bucket = load_manifest(artifact).bucket_list()[0]
    inputs = tuple(torch.ones((bucket.batch_size, bucket.seq_len), dtype=torch.long) for _ in backend.manifest.inputs)
    done = threading.Event()
    took = []

    def run():
        t0 = time.perf_counter()
        backend.forward(bucket, inputs)
        took.append(time.perf_counter() - t0)
        done.set()

    threading.Thread(target=run).start()
    spins = 0
    while not done.is_set():  # pure Python on this thread while the device 'runs'
        spins += 1
    assert 0.19 < took[0] < 0.5
    assert spins > 10_000  # the forward held the GIL for none of its 200 ms


def test_one_graph_at_a_time_like_a_neuroncore(artifact, tmp_path):
    backend = load_backend(artifact, "simulated", profile=_slow_profile(tmp_path, fixed_ms=100))
    bucket = load_manifest(artifact).bucket_list()[0]
    inputs = tuple(torch.ones((bucket.batch_size, bucket.seq_len), dtype=torch.long) for _ in backend.manifest.inputs)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=backend.forward, args=(bucket, inputs)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.perf_counter() - t0 >= 0.29 and backend.executions == 3


def test_warmup_gives_the_planner_the_profiles_times(artifact):
    backend = load_backend(artifact, "simulated", profile="bert-base-inf2")
    timings = backend.warmup()
    manifest = load_manifest(artifact)
    assert set(timings) == {str(b) for b in manifest.bucket_list()}
    for b in manifest.bucket_list():
        assert timings[str(b)] >= device_seconds(backend.profile, b)


def test_a_bad_profile_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"fixed_ms": 1}')
    with pytest.raises(BackendError, match="needs fixed_ms and per_padded_token_us"):
        load_profile(str(bad))


def test_a_replica_on_a_device_never_runs_a_batch_on_its_event_loop(artifact):
    """On a device the event loop would only wait out the device time: every batch, however cheap,
    goes to a forward thread (the CPU backend runs cheap ones inline, on all its cores)."""
    import asyncio

    from neuronserve.serve.replica import build_replica
    from neuronserve.serve.settings import AppArgs

    replica = build_replica(AppArgs(artifacts=str(artifact), backend="simulated", device_profile="minilm-l6-inf2"))
    assert replica.batcher.inline_max_s < 0.3e-3  # under a NeuronCore's fixed cost per execution
    backend = replica.engine.backend
    threads = []
    forward = backend.forward
    backend.forward = lambda *a, **k: (threads.append(threading.current_thread().name), forward(*a, **k))[1]

    async def main():
        loop_thread = threading.current_thread().name
        for _ in range(5):
            await replica.batcher.submit([[101, 2000, 102]])
        return loop_thread

    loop_thread = asyncio.run(main())
    assert len(threads) == 5 and loop_thread not in threads
    cpu = build_replica(AppArgs(artifacts=str(artifact), backend="cpu", threads_per_replica=1))
    assert cpu.batcher.inline_max_s > 0
