"""`neuronserve deploy render` for generative artifacts (task generate): every object validates,
each replica is one tensor-parallel group of tp_degree NeuronCores, the pod asks for whole groups,
uneven splits are refused, and the image's vLLM stack is named."""

from __future__ import annotations

import pytest
import yaml

from neuronserve.deploy import cli as deploy_cli  # noqa: F401  (the command registers the render flags)
from neuronserve.deploy.render import (
    GENERATION_STACKS,
    NEURON_CORE_RESOURCE,
    STACK_ANNOTATION,
    RenderError,
    RenderOptions,
    plan,
    render_objects,
    render_yaml,
)
from neuronserve.models.artifact import Manifest, ModelInfo, save_manifest
from neuronserve.models.generation import GenerationOptions, plan_generation
from tests.fixtures.k8s_validate import validate_object, validate_serve_config
from tests.fixtures.manifests import make_artifact

CONFIG = {"max_position_embeddings": 4096, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 32,
          "num_key_value_heads": 8}


def make_generate_artifact(root, target: str, tp: int, max_num_seqs: int = 8):
    root.mkdir(parents=True, exist_ok=True)
    gen = plan_generation(GenerationOptions(target, tp_degree=tp, max_model_len=1024, max_num_seqs=max_num_seqs),
                          CONFIG, "LlamaForCausalLM")
    save_manifest(Manifest(model=ModelInfo(source="m", name="tiny-llama", family="llama", sha256="0" * 64,
                                           max_position_embeddings=4096, max_seq_length=1024, hidden_size=64,
                                           output_dim=1000),
                           task="generate", inputs=[], target=target, buckets=[], generation=gen,
                           cache_key="a" * 64), root)
    return str(root)


def opts(artifacts: str, instance_type: str, **kw) -> RenderOptions:
    return RenderOptions(artifacts=artifacts, instance_type=instance_type, image="example.com/neuronserve-vllm:1", **kw)


def parts(objs):
    (rs,) = [o for o in objs if o["kind"] == "RayService"]
    config = validate_serve_config(rs["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    (dep,) = app["deployments"]
    (worker,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return rs, app, dep, worker


CASES = [  # instance, target, tp_degree, replicas per node
    ("inf2.xlarge", "inf2", 2, 1),
    ("inf2.xlarge", "inf2", 1, 2),
    ("inf2.24xlarge", "inf2", 4, 3),
    ("inf2.48xlarge", "inf2", 8, 3),
    ("trn1.32xlarge", "trn1", 32, 1),
    ("trn1.32xlarge", "trn1", 8, 4),
    ("trn2.48xlarge", "trn2", 16, 4),
]


@pytest.mark.parametrize("instance_type,target,tp,per_node", CASES)
def test_each_replica_is_one_tensor_parallel_group(tmp_path, instance_type, target, tp, per_node):
    objs = render_objects(opts(make_generate_artifact(tmp_path / "a", target, tp), instance_type))
    for obj in objs:
        validate_object(obj)
    rs, app, dep, worker = parts(objs)
    assert dep["ray_actor_options"]["resources"] == {"neuron_cores": tp} and dep["ray_actor_options"]["num_cpus"] == 0
    assert app["args"]["cores_per_replica"] == tp
    auto = dep["autoscaling_config"]
    assert auto["min_replicas"] == per_node and auto["target_ongoing_requests"] == 8.0
    assert dep["max_ongoing_requests"] >= 2 * auto["target_ongoing_requests"]
    ray = worker["template"]["spec"]["containers"][0]
    # A worker pod asks for every core of its node: whole groups, none idle.
    assert ray["resources"]["limits"][NEURON_CORE_RESOURCE] == str(per_node * tp)
    assert worker["template"]["metadata"]["annotations"][STACK_ANNOTATION] == GENERATION_STACKS[
        "vllm-nxdi" if target in ("inf2", "trn1") else "vllm-neuron"]["stack"]
    if per_node * tp > 1:
        assert worker["template"]["spec"]["schedulerName"] == "my-scheduler"  # contiguous cores
    env = {e["name"] for e in ray["env"]}
    assert "NEURON_COMPILED_ARTIFACTS" not in env  # set per replica from the artifact's own path


def test_the_header_names_the_vllm_stack_the_image_must_carry(tmp_path):
    text = render_yaml(opts(make_generate_artifact(tmp_path / "a", "trn2", 16), "trn2.48xlarge"))
    assert "# generate (vllm-neuron, tp_degree 16): --image must carry the vLLM Neuron plugin" in text
    text = render_yaml(opts(make_generate_artifact(tmp_path / "b", "inf2", 2), "inf2.xlarge"))
    assert "vLLM over NxD Inference" in text
    assert list(yaml.safe_load_all(text))[0]["kind"] == "RayService"


@pytest.mark.parametrize("instance_type,target,tp,message", [
    ("inf2.24xlarge", "inf2", 8, "inf2.24xlarge: 12 NeuronCores do not split into tensor-parallel groups of 8"),
    ("inf2.xlarge", "inf2", 8, "inf2.xlarge: 2 NeuronCores cannot hold one tensor-parallel group of 8"),
    ("inf2.48xlarge", "inf2", 16, "8 would sit idle"),
])
def test_uneven_groups_are_refused(tmp_path, instance_type, target, tp, message):
    with pytest.raises(RenderError) as e:
        plan(opts(make_generate_artifact(tmp_path / "a", target, tp), instance_type))
    assert message in str(e.value)


def test_cores_per_replica_must_be_the_compiled_tp_degree(tmp_path):
    art = make_generate_artifact(tmp_path / "a", "trn1", 8)
    with pytest.raises(RenderError, match="--cores-per-replica 4: .* tp_degree, 8 NeuronCores"):
        plan(opts(art, "trn1.32xlarge", cores_per_replica=4))
    assert plan(opts(art, "trn1.32xlarge", cores_per_replica=8)).replicas_per_node == 4


def test_encoder_batching_knobs_are_refused(tmp_path):
    art = make_generate_artifact(tmp_path / "a", "inf2", 2)
    with pytest.raises(RenderError, match="--max-batch-tokens, --packing: batching options"):
        plan(opts(art, "inf2.xlarge", max_batch_tokens=4096, packing=False))


def test_a_generative_model_is_rendered_alone(tmp_path):
    gen = make_generate_artifact(tmp_path / "g", "inf2", 1)
    enc = str(make_artifact(tmp_path / "e", "inf2"))
    with pytest.raises(RenderError, match="served by vLLM in a replica of its own"):
        plan(opts([f"llm={gen}", f"emb={enc}"], "inf2.xlarge"))


def test_cpu_generate_is_one_replica_with_the_pods_cpus(tmp_path):
    from tests.fixtures.tiny_llama import make_tiny_llama
    from neuronserve.compile.generation import GenerateOptions, compile_generate

    model = make_tiny_llama(tmp_path / "llama")
    out = tmp_path / "art"
    compile_generate(GenerateOptions(model=str(model), out=out))
    p = plan(opts(str(out), "c7i.4xlarge"))
    assert p.replicas_per_node == 1 and p.cpus_per_replica == p.pod_cpus - 1  # the raylet and proxy keep one
    objs = render_objects(opts(str(out), "c7i.4xlarge"))
    for obj in objs:
        validate_object(obj)
    _, app, dep, worker = parts(objs)
    assert dep["ray_actor_options"]["num_cpus"] == p.cpus_per_replica and "resources" not in dep["ray_actor_options"]
    assert NEURON_CORE_RESOURCE not in worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert worker["template"]["metadata"]["annotations"][STACK_ANNOTATION] == GENERATION_STACKS["vllm-cpu"]["stack"]


def test_encoder_artifacts_render_as_before(tmp_path):
    objs = render_objects(opts(str(make_artifact(tmp_path / "e", "inf2")), "inf2.xlarge"))
    _, _, dep, worker = parts(objs)
    assert dep["ray_actor_options"]["resources"] == {"neuron_cores": 1}
    assert "annotations" not in worker["template"]["metadata"]


@pytest.mark.parametrize("instance_type,target,tp,per_node", CASES)
def test_render_lays_out_replicas_as_the_server_does(tmp_path, instance_type, target, tp, per_node):
    from neuronserve.serve.placement import place_generate

    o = opts(make_generate_artifact(tmp_path / "a", target, tp), instance_type)
    p = plan(o)
    _, _, dep, _ = parts(render_objects(o))
    replicas, actor = place_generate(target, tp, cpus=p.pod_cpus - 1, neuron_cores=p.instance.neuron_cores)
    assert p.replicas_per_node == replicas == per_node
    assert {k: v for k, v in dep["ray_actor_options"].items() if k != "runtime_env"} == actor


def render_cli(capsys, *argv) -> tuple[int, str, str]:
    from neuronserve import cli

    capsys.readouterr()
    code = cli.main(["deploy", "render", "--image", "img:1", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_renders_a_generative_artifact_and_refuses_bad_groups_in_one_line(tmp_path, capsys):
    art = make_generate_artifact(tmp_path / "a", "inf2", 4)
    code, out, err = render_cli(capsys, "--artifacts", art, "--instance-type", "inf2.24xlarge")
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs[0]["kind"] == "RayService"
    code, out, err = render_cli(capsys, "--artifacts", art, "--instance-type", "inf2.xlarge")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "2 NeuronCores cannot hold one tensor-parallel group of 4" in err


def test_an_s3_generative_artifact_is_sized_from_its_manifest(tmp_path):
    art = make_generate_artifact(tmp_path / "a", "trn1", 16)
    uri = "s3://models/llm/" + "a" * 64
    p = plan(opts(uri, "trn1.32xlarge", manifest_file=str(tmp_path / "a" / "manifest.json")))
    assert p.s3_uri == uri and p.replicas_per_node == 2 and p.cores_per_replica == 16
    assert art
