"""The warm-up's timing table kept in the cache (`serve.timing_cache`) and how a replica uses it
(`serve.replica.build_replica`): written after a full warm-up, reused by the next start on the same
artifact and host shape, ignored (saying why) when it does not match or cannot be read."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from prometheus_client import CollectorRegistry

from neuronserve.models.artifact import parse_buckets
from neuronserve.serve import replica as root
from neuronserve.serve.backends.cpu import CpuBackend
from neuronserve.serve.metrics import Metrics, ServeMetrics
from neuronserve.serve.settings import AppArgs
from neuronserve.serve.timing_cache import TimingCache, host_shape
from tests.fixtures.inprocess_app import BUCKETS, tiny_artifact
from tests.fixtures.prom_samples import samples, value


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("timing-cache"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "timings"


@pytest.fixture
def timed(monkeypatch):
    """Counts the CPU backend's timed passes over the buckets (its priming runs are not timed)."""
    calls = []
    real = CpuBackend._time

    def spy(self, ordered, forwards):
        calls.append(len(ordered))
        return real(self, ordered, forwards)

    monkeypatch.setattr(CpuBackend, "_time", spy)
    return calls


def start(artifact, **settings):
    before = torch.get_num_threads()
    try:
        return root.build_replica(AppArgs(artifacts=str(artifact), backend="cpu", threads_per_replica=1,
                                          instance_type="c7i.xlarge", **settings))
    finally:
        torch.set_num_threads(before)


def only_table(cache_dir):
    files = [p for p in cache_dir.iterdir()]
    assert len(files) == 1, files  # no temporary file left beside it
    return files[0]


def test_a_full_warm_up_is_kept_and_the_next_start_reuses_it(artifact, cache_dir, timed, caplog):
    caplog.set_level(logging.INFO, logger="neuronserve.serve")
    first = start(artifact)
    assert first.timings == "measured" and timed and timed[0] == len(parse_buckets(BUCKETS))
    table = only_table(cache_dir)
    kept = json.loads(table.read_text())
    assert kept["timings_s"] == first.warmup_s and kept["artifact"] == first.engine.manifest.cache_key
    assert kept["host_shape"]["threads"] == 1 and kept["host_shape"]["backend"] == "cpu"
    assert table.name.startswith(first.engine.manifest.cache_key[:16] + "-cpu-")

    timed.clear()
    caplog.clear()
    second = start(artifact)
    assert second.timings == "cached" and timed == []  # no bucket timed again
    assert second.warmup_s == first.warmup_s
    assert second.engine.backend.primed  # each graph still ran before the replica was ready
    assert {str(b): t for b, t in second.batcher.timings.measured_s.items()} == first.warmup_s
    assert "(cached timings)" in caplog.text and "ready in" in caplog.text


def test_served_batches_still_refine_a_cached_table(artifact, cache_dir):
    start(artifact)
    replica = start(artifact)
    assert replica.timings == "cached"
    table = replica.batcher.timings
    bucket = min(table.measured_s)
    scale = table.scale
    table.learn(bucket, table.device_s(bucket) * 3)  # as the batcher does after each served batch
    assert table.scale > scale


def test_no_cached_timings_times_every_bucket_and_refreshes_the_table(artifact, cache_dir, timed, caplog):
    start(artifact)
    table = only_table(cache_dir)
    stale = json.loads(table.read_text())
    stale["timings_s"] = {k: 9.0 for k in stale["timings_s"]}
    table.write_text(json.dumps(stale))
    timed.clear()
    caplog.set_level(logging.INFO, logger="neuronserve.serve")
    replica = start(artifact, cached_timings=False)
    assert replica.timings == "measured" and timed
    assert "cached warm-up timings off" in caplog.text
    assert json.loads(table.read_text())["timings_s"] == replica.warmup_s != stale["timings_s"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "other artifact", "other host shape", "foreign bucket",
                                    "no bucket", "bad time"])
def test_a_table_that_does_not_match_is_ignored_saying_why(artifact, cache_dir, timed, caplog, damage):
    start(artifact)
    table = only_table(cache_dir)
    good = table.read_text()
    data = json.loads(good)
    if damage == "corrupt":
        table.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        table.write_text(good[: len(good) // 2])
    else:
        if damage == "other artifact":
            data["artifact"] = "0" * 64
        elif damage == "other host shape":
            data["host_shape"]["threads"] = 4
        elif damage == "foreign bucket":  # a sample of this artifact's buckets is a table; another's is not
            data["timings_s"]["3x999"] = 0.01
        elif damage == "no bucket":
            data["timings_s"] = {}
        else:
            data["timings_s"][sorted(data["timings_s"])[0]] = -1.0
        table.write_text(json.dumps(data))
    timed.clear()
    caplog.set_level(logging.INFO, logger="neuronserve.serve")
    replica = start(artifact)
    assert replica.timings == "measured" and timed  # every bucket timed again
    assert f"ignoring cached warm-up timings {table}" in caplog.text
    why = {"corrupt": "unreadable", "truncated": "unreadable", "other artifact": "another artifact",
           "other host shape": "threads: 4 there, 1 here", "foreign bucket": "buckets are not this artifact's",
           "no bucket": "buckets are not this artifact's",
           "bad time": "has no valid time"}[damage]
    assert why in caplog.text
    assert json.loads(table.read_text())["timings_s"] == replica.warmup_s  # replaced by a good table


def test_another_host_shape_has_a_table_of_its_own(artifact, cache_dir):
    one = start(artifact)
    two = start(artifact, max_concurrent_batches=2)
    assert one.timings == two.timings == "measured"
    assert len(list(cache_dir.iterdir())) == 2


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failed_start(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory would be")
    cache = TimingCache.at(blocked, "a" * 64, host_shape("cpu", threads=1))
    assert cache.save({"1x16": 0.001}, 0.5) is False
    assert "could not keep the warm-up timings" in caplog.text
    assert cache.load(parse_buckets("1x16")) is None


def test_save_then_load_round_trips(tmp_path):
    shape = host_shape("simulated", profile="zero", forwards=1)
    cache = TimingCache.at(tmp_path, "b" * 64, shape)
    assert cache.save({"1x16": 0.002, "4x16": 0.004}, 1.0)
    assert cache.load(parse_buckets("1x16,4x16")) == {"1x16": 0.002, "4x16": 0.004}
    assert list(cache.path.parent.iterdir()) == [cache.path]


def test_a_table_of_a_sample_of_the_buckets_is_used(tmp_path):
    """A large CPU grid's warm-up times a sample (`timing_sample`); its table is reused as it is."""
    cache = TimingCache.at(tmp_path, "c" * 64, host_shape("cpu", threads=1))
    assert cache.save({"1x16": 0.002}, 0.5)
    assert cache.load(parse_buckets("1x16,4x16,16x16")) == {"1x16": 0.002}


def test_startup_phases_are_exported():
    reg = CollectorRegistry()
    m = ServeMetrics("mini", "cpu", 1, "c7i.xlarge", None, None, metrics=Metrics(reg))
    m.startup({"pull": 0.0, "load": 1.5, "warmup": 0.5, "ready": 2.25})
    got = samples(reg)
    for phase, seconds in {"pull": 0.0, "load": 1.5, "warmup": 0.5, "ready": 2.25}.items():
        assert value(got, "neuronserve_startup_seconds", model="mini", backend="cpu", phase=phase) == seconds


def test_a_replica_exports_its_startup_phases(artifact, cache_dir, monkeypatch):
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    monkeypatch.setattr(root, "ServeMetrics", lambda *a, **kw: ServeMetrics(*a, **kw, metrics=metrics))
    replica = start(artifact)
    got = samples(reg)
    for phase in ("pull", "load", "warmup", "ready"):
        exported = value(got, "neuronserve_startup_seconds", model=replica.model_name, backend="cpu", phase=phase)
        assert exported == replica.startup_s[phase]
    assert replica.startup_s["pull"] < replica.startup_s["ready"]
