"""--autoscale: the Serve deployment gets an autoscaling_config whose target is the replica's batch
capacity, an admission cap the autoscaler can see past, and a CPU layout with room for MAX
replicas; the rendered RayService agrees and scales its worker group (to zero with MIN 0)."""

from __future__ import annotations

import argparse

import pytest
import yaml
from ray.serve.config import AutoscalingConfig

from neuronserve.serve.placement import (TYPICAL_INPUT_TOKENS, deployment_config, deployment_options, place,
                                         target_ongoing_requests)
from neuronserve.serve.settings import AppArgs, parse_autoscale
from neuronserve.serve import serve_cli
from neuronserve.deploy.render import render_objects
from tests.fixtures.k8s_validate import validate_object
from tests.fixtures.manifests import make_artifact
from tests.unit.test_render import opts


@pytest.mark.parametrize("text,expected", [("1:4", (1, 4)), ("0:1", (0, 1)), (" 2:2 ", (2, 2))])
def test_parse_autoscale(text, expected):
    assert parse_autoscale(text) == expected


@pytest.mark.parametrize("text", ["4", "1:0", "-1:2", "3:2", "a:b", "1:2:3"])
def test_parse_autoscale_refuses(text):
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_autoscale(text)


@pytest.mark.parametrize("rows,tokens,batches,inputs,expected", [
    (64, 2048, 1, 1, 16),  # max_batch_tokens bounds the batch: 2048 // 128 rows
    (8, 2048, 1, 1, 8),  # the largest compiled batch bounds it
    (16, 2048, 4, 1, 64),  # concurrent batches multiply
    (16, 2048, 2, 8, 4),  # requests of 8 inputs fill a batch 8 times faster
    (16, 2048, 1, 100, 1),  # never below one request
    (64, 8192, 2, 1, 128),
])
def test_target_is_rows_in_flight_over_inputs_per_request(rows, tokens, batches, inputs, expected):
    args = AppArgs(artifacts="a", max_batch_tokens=tokens, max_concurrent_batches=batches, inputs_per_request=inputs)
    assert target_ongoing_requests(args, rows) == expected
    assert expected == max(1, batches * min(rows, tokens // TYPICAL_INPUT_TOKENS) // inputs)


def test_deployment_config_autoscales_and_validates_with_serve():
    args = place(AppArgs(artifacts="a", autoscale="0:3", upscale_delay_s=2, downscale_delay_s=60),
                 neuron=True, cpus=4, neuron_cores=8)
    config = deployment_config(args, neuron=True, env={}, max_batch_rows=16)
    assert "num_replicas" not in config
    auto = AutoscalingConfig(**config["autoscaling_config"])
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas) == (0, 1, 3)
    assert (auto.upscale_delay_s, auto.downscale_delay_s) == (2, 60)
    assert auto.target_ongoing_requests == 16
    assert config["max_ongoing_requests"] >= 2 * auto.target_ongoing_requests
    assert config["ray_actor_options"]["resources"] == {"neuron_cores": 1}  # each replica keeps its core


def test_admission_cap_is_raised_to_twice_the_target_and_a_lower_one_refused():
    args = AppArgs(artifacts="a", autoscale="1:2", target_ongoing_requests=700)
    assert deployment_config(place(args, neuron=True, cpus=2), neuron=True, env={}, max_batch_rows=16)[
        "max_ongoing_requests"] == 1400
    low = AppArgs(artifacts="a", autoscale="1:2", target_ongoing_requests=10, max_ongoing_requests=15)
    with pytest.raises(ValueError, match="at least 20"):
        deployment_config(place(low, neuron=True, cpus=2), neuron=True, env={}, max_batch_rows=16)


def test_fixed_count_unchanged_without_autoscale():
    config = deployment_config(place(AppArgs(artifacts="a"), neuron=False, cpus=8), neuron=False, env={})
    assert config["num_replicas"] == 2 and "autoscaling_config" not in config
    assert config["max_ongoing_requests"] == 1024


def test_cpu_layout_leaves_room_for_max_replicas():
    fixed = place(AppArgs(artifacts="a"), neuron=False, cpus=8)
    scaled = place(AppArgs(artifacts="a", autoscale="1:4"), neuron=False, cpus=8)
    assert fixed.threads_per_replica * fixed.max_concurrent_batches == 4
    assert scaled.threads_per_replica * scaled.max_concurrent_batches == 2  # 4 replicas x 2 CPUs


def test_replicas_and_autoscale_together_are_refused():
    with pytest.raises(ValueError, match="--replicas 2 and --autoscale 1:3"):
        deployment_options(AppArgs(artifacts="a", autoscale="1:3", num_replicas=2))


def test_serve_flags():
    parser = argparse.ArgumentParser()
    serve_cli.add_subcommand(parser.add_subparsers())
    ns = parser.parse_args(["serve", "--autoscale", "0:2", "--target-ongoing-requests", "3", "--downscale-delay-s", "30"])
    args = serve_cli._app_args(ns, "a", None)
    assert args.autoscale_range() == (0, 2)
    assert (args.target_ongoing_requests, args.downscale_delay_s) == (3, 30)


def test_rendered_scale_to_zero_reaches_the_worker_group(tmp_path):
    artifact = str(make_artifact(tmp_path / "art", "inf2", buckets=((1, 32), (16, 128))))
    objs = render_objects(opts(artifact, "inf2.48xlarge", min_replicas=0, max_replicas=30, cores_per_replica=2,
                               target_ongoing_requests=5, downscale_delay_s=120))
    for obj in objs:
        validate_object(obj)
    (rs,) = [o for o in objs if o["kind"] == "RayService"]
    (dep,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    auto = dep["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (0, 1, 30)
    assert (auto["target_ongoing_requests"], auto["downscale_delay_s"]) == (5, 120)
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    # 30 replicas x 2 NeuronCores / 24 NeuronCores per inf2.48xlarge = 2.5, so 3 nodes; none when idle.
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 3)


def test_rendered_default_target_is_the_formula(tmp_path):
    artifact = str(make_artifact(tmp_path / "art", "inf2", buckets=((1, 32), (8, 128))))
    (rs,) = [o for o in render_objects(opts(artifact, "inf2.xlarge")) if o["kind"] == "RayService"]
    (dep,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    assert dep["autoscaling_config"]["target_ongoing_requests"] == 8  # 1 batch x 8 rows (largest compiled)
