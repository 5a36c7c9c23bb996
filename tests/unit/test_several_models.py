"""Several models in one replica, without Ray: the artifacts setting and flag, routing by name,
and the replica's cost split between its models."""

import argparse
import types

import pytest
from hypothesis import given, strategies as st
from prometheus_client import CollectorRegistry

from neuronserve.serve.errors import NotFound
from neuronserve.serve.metrics import CostSplit, Metrics, ServeMetrics, split_cost
from neuronserve.serve.replica import Models
from neuronserve.serve.settings import AppArgs, add_flags, given as given_flags
from tests.fixtures.prom_samples import samples, value
from tests.unit.test_batcher import FakeClock


# -- settings and flags ------------------------------------------------------------------------
def test_one_artifact_stays_a_string_and_several_a_list():
    assert AppArgs(artifacts=["/a"]).artifacts == "/a"
    assert AppArgs(artifacts="/a").artifact_list() == [(None, "/a")]
    assert AppArgs(artifacts=["e=/a", "/b"]).artifact_list() == [("e", "/a"), (None, "/b")]
    assert AppArgs(artifacts=["e=/a"]).artifact_list() == [("e", "/a")]


@pytest.mark.parametrize("artifacts, model_name, says", [
    (["a=/x", "a=/y"], None, "model name 'a' given to more than one artifact"),
    (["/x", "/y"], "m", "name each as NAME=DIR"),
    ([], None, "no artifacts"),
    (["e="], None, "names a model but no DIR or URI"),
])
def test_bad_artifact_lists_say_why(artifacts, model_name, says):
    with pytest.raises(ValueError, match=says):
        AppArgs(artifacts=artifacts, model_name=model_name)


def test_the_artifacts_flag_repeats():
    p = argparse.ArgumentParser()
    add_flags(p, AppArgs, ["artifacts", "max_batch_tokens"])
    ns = p.parse_args(["--artifacts", "e5=/a", "--artifacts", "s3://b/k", "--max-batch-tokens", "64"])
    args = AppArgs(**given_flags(ns, ["artifacts", "max_batch_tokens"]))
    assert args.artifact_list() == [("e5", "/a"), (None, "s3://b/k")]
    one = AppArgs(**given_flags(p.parse_args(["--artifacts", "/a"]), ["artifacts"]))
    assert one.artifacts == "/a"  # a single value as before


def test_several_artifacts_from_the_environment(monkeypatch):
    monkeypatch.setenv("NEURONSERVE_ARTIFACTS", '["e=/a", "c=/b"]')
    assert AppArgs().artifact_list() == [("e", "/a"), ("c", "/b")]
    monkeypatch.setenv("NEURONSERVE_ARTIFACTS", "/a")
    assert AppArgs().artifacts == "/a"


# -- routing -----------------------------------------------------------------------------------
def model(name, task, clock=None, reg=None):
    metrics = ServeMetrics(name, "neuron", 1, "custom", 3.6, 1, clock=clock or FakeClock(),
                           metrics=Metrics(reg or CollectorRegistry()))
    return types.SimpleNamespace(model_name=name, engine=types.SimpleNamespace(task=task), metrics=metrics)


def test_requests_route_by_name_and_unnamed_ones_to_the_first_of_their_task():
    served = Models([model("e5", "embed"), model("sst2", "classify"), model("bge", "embed")])
    assert served.pick("bge", "embed").model_name == "bge"
    assert served.pick(None, "embed").model_name == "e5"
    assert served.pick(None, "classify").model_name == "sst2"
    assert served.pick(None, "rerank").model_name == "e5"  # no model of the task: the first (its route says why)
    for name in ("nope", 7, ["e5"]):
        with pytest.raises(NotFound) as e:
            served.pick(name, "embed")
        assert "served models: e5, sst2, bge" in e.value.message and e.value.code == "model_not_found"


def test_one_model_has_no_cost_split():
    assert Models([model("e5", "embed")]).cost_split is None


# -- cost --------------------------------------------------------------------------------------
@given(st.floats(0, 1e3), st.lists(st.floats(0, 1e3), min_size=1, max_size=6), st.data())
def test_split_cost_always_sums_to_the_replica_cost(usd, busy, data):
    total = data.draw(st.lists(st.floats(0, 1e6), min_size=len(busy), max_size=len(busy)))
    shares = split_cost(usd, busy, total)
    assert len(shares) == len(busy) and all(s >= 0 for s in shares)
    assert sum(shares) == pytest.approx(usd, rel=1e-9, abs=1e-9)


def test_the_replica_cost_is_split_by_device_time_and_cores_count_once():
    reg, clock = CollectorRegistry(), FakeClock()
    m = Metrics(reg)
    price_per_core_s = 3.6 / 3600  # custom instance: 1 core at 3.6 USD/hour
    a = ServeMetrics("a", "neuron", 1, "custom", 3.6, 1, clock=clock, metrics=m)
    b = ServeMetrics("b", "neuron", 1, "custom", 3.6, 1, clock=clock, metrics=m, counts_cores=False)
    CostSplit([a, b])
    # Each tick (once a second when serving) splits the time since the last by device time in it.
    clock.advance(10.0)
    a.batch("1x16", 1, 10, 16, inference_seconds=3.0, queue_waits=[])  # batches do not tick when shared
    b.batch("1x16", 1, 10, 16, inference_seconds=1.0, queue_waits=[])
    a.tick()  # 10 s: a busy 3 s, b 1 s
    clock.advance(6.0)
    b.batch("1x16", 1, 10, 16, inference_seconds=2.0, queue_waits=[])
    b.tick()  # 6 s: b alone
    clock.advance(5.0)
    a.tick()  # 5 s with neither busy: by device time so far, 3 s each
    s = samples(reg)
    got = {n: value(s, "neuronserve_cost_allocated_usd_total", model=n) for n in "ab"}
    assert got["a"] == pytest.approx((7.5 + 2.5) * price_per_core_s)
    assert got["b"] == pytest.approx((2.5 + 6 + 2.5) * price_per_core_s)
    assert got["a"] + got["b"] == pytest.approx(21 * price_per_core_s)  # what the replica cost
    assert value(s, "neuronserve_cores_in_use", backend="neuron") == 1
    assert value(s, "neuronserve_model_loads_total", model="b") == 1


def test_one_named_artifact_is_served_under_its_name(tmp_path):
    """`serve --artifacts NAME=DIR` with nothing else: one model, answering to NAME (the replica
    once got the unparsed list as its artifact directory and failed to load)."""
    from neuronserve.compile.compiler import CompileOptions, compile_artifact
    from neuronserve.models.artifact import parse_buckets
    from neuronserve.serve.replica import build_models
    from tests.fixtures.tiny_models import make_tiny_model

    art = compile_artifact(CompileOptions(model=str(make_tiny_model(tmp_path / "m")), buckets=parse_buckets("1x16"),
                                          out=tmp_path / "art")).out_dir
    served = build_models(AppArgs(artifacts=[f"e5={art}"], backend="simulated", device_profile="zero"))
    assert served.single and served.names == ["e5"]
    assert served.pick("e5", "embed").engine.artifact_dir == art
    unnamed = build_models(AppArgs(artifacts=[str(art)], backend="simulated", device_profile="zero"))
    assert unnamed.names == ["tiny-bert-embed"]
