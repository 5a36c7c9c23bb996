"""`neuronserve compile --task generate`: the causal LM is checked, the artifact follows the
encoders' manifest-and-cache scheme, Neuron compiles get exactly the documented configuration
(through stand-ins for vLLM and NxD Inference that record what they are given), and whatever cannot
run here is refused in one line."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from neuronserve import cli
from neuronserve.common import neuron_sdk
from neuronserve.compile.compiler import CompileError
from neuronserve.compile.generation import GenerateOptions, compile_generate
from neuronserve.compile.store import verify_files
from neuronserve.models.artifact import ArtifactError, load_manifest
from neuronserve.models.generation import GenerationOptions, nxdi_neuron_config, vllm_engine_config
from tests.fixtures.tiny_llama import make_tiny_llama
from tests.fixtures.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def compile_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # what building the model printed
    code = cli.main(["compile", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cpu_artifact_holds_the_checked_model_and_its_engine_settings(llama, tmp_path, capsys):
    code, out, _ = compile_cli(capsys, "--model", llama, "--task", "generate", "--out", tmp_path / "a",
                               "--max-model-len", 128, "--max-num-seqs", 4)
    assert code == 0 and out.strip() == str(tmp_path / "a")
    m = load_manifest(tmp_path / "a")
    assert m.task == "generate" and m.target == "cpu" and m.buckets == []
    g = m.generation
    assert (g.engine, g.architecture, g.dtype, g.tp_degree, g.max_model_len, g.max_num_seqs) == (
        "vllm-cpu", "LlamaForCausalLM", "float32", 1, 128, 4)
    config = json.loads((llama / "config.json").read_text())
    # 2 (K and V) x layers x kv heads x head dim x 4 bytes
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert g.kv_cache_bytes_per_token == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    assert g.chat_template is True and g.eos_token_id == config["eos_token_id"]
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= set(m.files)
    assert verify_files(tmp_path / "a", m, "test") > 0  # what a store pull checks
    assert m.tokenizer_dir == "model" and "tokenizer.json" in m.tokenizer_files


def test_a_changed_model_file_fails_the_pull_check(llama, tmp_path):
    result = compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a"))
    weights = tmp_path / "a" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()  # may be a hard link to the source model: replace it, never write through it
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model/model.safetensors does not match its manifest"):
        verify_files(tmp_path / "a", result.manifest, "test")
    assert (llama / "model.safetensors").read_bytes() != bytes(data)


def test_an_unchanged_compile_is_a_cache_hit_and_a_changed_setting_is_not(llama, tmp_path):
    first = compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a"))
    again = compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a"))
    assert not first.cache_hit and again.cache_hit and again.manifest.cache_key == first.manifest.cache_key
    other = compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a",
                                             generation=GenerationOptions("cpu", max_num_seqs=2)))
    assert not other.cache_hit and other.manifest.cache_key != first.manifest.cache_key


def test_a_changed_chat_template_is_a_new_compile(llama, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(llama, model)
    first = compile_generate(GenerateOptions(model=str(model), out=tmp_path / "a"))
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    again = compile_generate(GenerateOptions(model=str(model), out=tmp_path / "a"))
    assert not again.cache_hit and again.manifest.cache_key != first.manifest.cache_key
    assert (tmp_path / "a" / "model" / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    # Small files are copies: editing the source in place leaves the artifact as compiled.
    (model / "chat_template.jinja").write_text("edited again")
    assert (tmp_path / "a" / "model" / "chat_template.jinja").read_text() != "edited again"


def test_large_files_are_hard_linked_small_ones_copied(llama, tmp_path, monkeypatch):
    from neuronserve.compile import generation

    monkeypatch.setattr(generation, "LINK_MIN_BYTES", (llama / "model.safetensors").stat().st_size)
    compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a"))
    art = tmp_path / "a" / "model"
    assert (art / "model.safetensors").stat().st_ino == (llama / "model.safetensors").stat().st_ino
    assert (art / "config.json").stat().st_ino != (llama / "config.json").stat().st_ino


def test_the_engine_arguments_point_at_the_artifacts_copy_of_the_model(llama, tmp_path):
    result = compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a",
                                              generation=GenerationOptions("cpu", max_model_len=64, kv_cache_gib=3)))
    config = vllm_engine_config(result.manifest, tmp_path / "a", cpu_ids=[0, 1])
    assert config.args["model"] == str(tmp_path / "a" / "model") and config.args["max_model_len"] == 64
    assert {k: config.env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "HF_HUB_OFFLINE")} == {
        "VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "HF_HUB_OFFLINE": "1"}
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(config.args["model"]).architectures == ["LlamaForCausalLM"]


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_encoders_are_refused_in_one_line(tmp_path, capsys, task):
    encoder = make_tiny_model(tmp_path / "enc", family="bert", task=task)
    code, _, err = compile_cli(capsys, "--model", encoder, "--task", "generate", "--out", tmp_path / "a")
    assert code == 1
    assert "is not a causal LM" in err and "--task embed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_only_the_models_top_level_files_are_copied(llama, tmp_path):
    import shutil

    model = tmp_path / "with-extras"
    shutil.copytree(llama, model)
    (model / "original").mkdir()
    (model / "original" / "consolidated.00.pth").write_bytes(b"a second copy of the weights")
    (model / ".cache").mkdir()
    (model / "README.md").write_text("card")
    m = compile_generate(GenerateOptions(model=str(model), out=tmp_path / "a")).manifest
    assert not any(rel.startswith("model/original") or rel == "model/README.md" for rel in m.files)
    assert sorted(p.name for p in (tmp_path / "a" / "model").iterdir()) == sorted(
        rel.split("/", 1)[1] for rel in m.files)


def test_an_unknown_architecture_is_refused(llama, tmp_path, capsys):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(llama, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MyOwnForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = compile_cli(capsys, "--model", model, "--task", "generate", "--out", tmp_path / "a")
    assert code == 1 and "MyOwnForCausalLM" in err and "not a causal LM" in err


@pytest.mark.parametrize("argv,message", [
    (["--buckets", "1x32"], "--buckets: encoder options"),
    (["--auto-cast", "bf16"], "--auto-cast: encoder options"),
    (["--num-seqs-buckets", "1,8"], "--num-seqs-buckets does not apply to --target cpu"),
    (["--target", "inf2", "--num-gpu-blocks", "8"], "--num-gpu-blocks does not apply to --target inf2"),
    (["--target", "trn2", "--context-buckets", "128"], "--context-buckets does not apply to --target trn2"),
    (["--max-model-len", "4096"], "longer than the model's 256 positions"),
    (["--num-seqs-buckets", "x"], "bad --num-seqs-buckets"),
])
def test_bad_generate_flags_say_which_and_why(llama, tmp_path, capsys, argv, message):
    code, _, err = compile_cli(capsys, "--model", llama, "--task", "generate", "--out", tmp_path / "a", *argv)
    assert code in (1, 2) and message in err, err


def test_generate_flags_are_refused_for_encoders(tmp_path, capsys):
    code, _, err = compile_cli(capsys, "--model", "default", "--task", "embed", "--tp-degree", 2,
                               "--out", tmp_path / "a")
    assert code == 2 and "--tp-degree: options of --task generate" in err


def test_help_describes_the_generate_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compile", "--help"])
    text = capsys.readouterr().out
    for flag in ("--tp-degree", "--max-model-len", "--max-num-seqs", "--num-batched-tokens-buckets",
                 "--num-seqs-buckets", "--num-gpu-blocks", "--context-buckets", "--token-gen-buckets", "--kv-cache-gib"):
        assert flag in text


# --- Neuron targets: refusals here, and the configuration through recording stand-ins -----------------
@pytest.fixture
def no_device(monkeypatch, tmp_path):
    monkeypatch.setattr(neuron_sdk, "NEURON_DEVICE", tmp_path / "no-neuron0")


@pytest.fixture
def device(monkeypatch, tmp_path):
    dev = tmp_path / "neuron0"
    dev.write_text("")
    monkeypatch.setattr(neuron_sdk, "NEURON_DEVICE", dev)


@pytest.mark.parametrize("target", ["inf2", "trn1"])
def test_inf2_trn1_without_nxd_inference_refuse_in_one_line(llama, tmp_path, capsys, monkeypatch, target):
    monkeypatch.setitem(sys.modules, "neuronx_distributed_inference", None)  # import fails
    code, _, err = compile_cli(capsys, "--model", llama, "--task", "generate", "--target", target,
                               "--out", tmp_path / "a")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "needs NxD Inference (neuronx-distributed-inference" in err and target in err


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_trn2_trn3_without_a_device_refuse_in_one_line(llama, tmp_path, capsys, no_device, target):
    code, _, err = compile_cli(capsys, "--model", llama, "--task", "generate", "--target", target,
                               "--out", tmp_path / "a")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "needs a Neuron device" in err and "vLLM Neuron plugin" in err


def test_trn2_with_a_device_but_no_plugin_refuses(llama, tmp_path, capsys, device, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    code, _, err = compile_cli(capsys, "--model", llama, "--task", "generate", "--target", "trn2",
                               "--out", tmp_path / "a")
    assert code == 1 and "vllm-neuron" in err and "vllm is not installed" in err


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, object]] = []


@pytest.fixture
def fake_nxdi(monkeypatch):
    """Stand-in NxD Inference modules (test double): record the NeuronConfig, the model path and the
    compile directory, and write a file where the compile would put its graphs."""
    rec = Recorder()

    class NeuronConfig:
        def __init__(self, **kwargs):
            rec.calls.append(("NeuronConfig", kwargs))
            self.kwargs = kwargs

    class LlamaInferenceConfig:
        def __init__(self, neuron_config, load_config=None):
            rec.calls.append(("LlamaInferenceConfig", (neuron_config.kwargs, load_config)))

    class NeuronLlamaForCausalLM:
        def __init__(self, model_path, config):
            rec.calls.append(("model", model_path))

        def compile(self, compiled_model_path):
            rec.calls.append(("compile", compiled_model_path))
            Path(compiled_model_path, "model.pt").write_bytes(b"neff")
            Path(compiled_model_path, "neuron_config.json").write_text("{}")

    def load_pretrained_config(path):
        rec.calls.append(("load_pretrained_config", path))
        return f"hf-config-of:{path}"

    pkg = types.ModuleType("neuronx_distributed_inference")
    config = types.ModuleType("neuronx_distributed_inference.models.config")
    config.NeuronConfig = NeuronConfig
    adapter = types.ModuleType("neuronx_distributed_inference.utils.hf_adapter")
    adapter.load_pretrained_config = load_pretrained_config
    llama_mod = types.ModuleType("neuronx_distributed_inference.models.llama.modeling_llama")
    llama_mod.LlamaInferenceConfig = LlamaInferenceConfig
    llama_mod.NeuronLlamaForCausalLM = NeuronLlamaForCausalLM
    for name, mod in {"neuronx_distributed_inference": pkg,
                      "neuronx_distributed_inference.models": types.ModuleType("m"),
                      "neuronx_distributed_inference.models.config": config,
                      "neuronx_distributed_inference.utils": types.ModuleType("u"),
                      "neuronx_distributed_inference.utils.hf_adapter": adapter,
                      "neuronx_distributed_inference.models.llama": types.ModuleType("l"),
                      "neuronx_distributed_inference.models.llama.modeling_llama": llama_mod}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return rec


def test_inf2_compiles_with_the_neuron_config_vllm_is_given_at_serving_time(llama, tmp_path, capsys, fake_nxdi):
    code, _, err = compile_cli(capsys, "--model", llama, "--task", "generate", "--target", "inf2", "--tp-degree", 2,
                               "--max-model-len", 256, "--max-num-seqs", 4, "--context-buckets", "128,256",
                               "--out", tmp_path / "a")
    assert code == 0, err
    m = load_manifest(tmp_path / "a")
    g = m.generation
    assert (g.engine, g.dtype, g.tp_degree, g.context_encoding_buckets, g.token_generation_buckets) == (
        "vllm-nxdi", "bfloat16", 2, [128, 256], [128, 256])
    calls = dict(fake_nxdi.calls)
    assert calls["NeuronConfig"] == {
        "tp_degree": 2, "batch_size": 4, "ctx_batch_size": 1, "max_context_length": 256, "seq_len": 256,
        "torch_dtype": "bfloat16", "enable_bucketing": True, "context_encoding_buckets": [128, 256],
        "token_generation_buckets": [128, 256], "is_continuous_batching": True, "padding_side": "right"}
    assert calls["model"] == str(tmp_path / "a" / "model") == calls["load_pretrained_config"]
    assert calls["compile"] == str(tmp_path / "a" / "neuron-compiled")
    assert {"neuron-compiled/model.pt", "neuron-compiled/neuron_config.json"} <= set(m.files)
    engine = vllm_engine_config(m, tmp_path / "a")
    # Serving gives vLLM the same NeuronConfig, so it loads these graphs instead of compiling others.
    assert engine.args["additional_config"] == {"override_neuron_config": calls["NeuronConfig"]}
    assert engine.args["tensor_parallel_size"] == 2 and engine.args["max_num_seqs"] == 4
    assert engine.env == {"NEURON_COMPILED_ARTIFACTS": str(tmp_path / "a" / "neuron-compiled"),
                          "VLLM_NEURON_FRAMEWORK": "neuronx-distributed-inference",
                          "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
    assert nxdi_neuron_config(g) == calls["NeuronConfig"]


def test_an_nxdi_compile_that_writes_nothing_is_an_error(llama, tmp_path, fake_nxdi, monkeypatch):
    llama_mod = sys.modules["neuronx_distributed_inference.models.llama.modeling_llama"]
    monkeypatch.setattr(llama_mod.NeuronLlamaForCausalLM, "compile", lambda self, path: None)
    with pytest.raises(CompileError, match="wrote nothing"):
        compile_generate(GenerateOptions(model=str(llama), target="trn1", out=tmp_path / "a"))
    assert not (tmp_path / "a" / "manifest.json").exists()


@pytest.fixture
def fake_vllm(monkeypatch):
    """Stand-in `vllm` with the Neuron plugin (test double): `LLM(**kwargs)` records its arguments and
    the NEURON_COMPILED_ARTIFACTS it sees, and writes a graph there as the plugin's warm-up does."""
    import os

    rec = Recorder()

    class LLM:
        def __init__(self, **kwargs):
            where = os.environ.get("NEURON_COMPILED_ARTIFACTS")
            rec.calls.append(("LLM", kwargs))
            rec.calls.append(("env", {k: os.environ.get(k) for k in ("NEURON_COMPILED_ARTIFACTS",
                                                                     "NEURON_LOGICAL_NC_CONFIG")}))
            Path(where, "graph_b1.neff").write_bytes(b"neff")

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm_neuron", types.ModuleType("vllm_neuron"))
    monkeypatch.delenv("NEURON_COMPILED_ARTIFACTS", raising=False)
    return rec


def test_trn2_compiles_through_the_plugin_with_the_serving_engine_arguments(llama, tmp_path, device, fake_vllm):
    opts = GenerationOptions("trn2", tp_degree=4, max_model_len=256, max_num_seqs=8, num_seqs_buckets=[1, 8])
    result = compile_generate(GenerateOptions(model=str(llama), target="trn2", out=tmp_path / "a", generation=opts))
    calls = dict(fake_vllm.calls)
    g = result.manifest.generation
    assert (g.engine, g.num_batched_tokens_buckets, g.num_seqs_buckets, g.block_size, g.num_gpu_blocks_override) == (
        "vllm-neuron", [128, 256], [1, 8], 32, 8 * 256 // 32)
    assert calls["LLM"] == {
        "model": str(tmp_path / "a" / "model"), "tokenizer": str(tmp_path / "a" / "model"),
        "served_model_name": ["tiny-llama"], "dtype": "bfloat16", "max_model_len": 256, "max_num_seqs": 8,
        "tensor_parallel_size": 4, "max_num_batched_tokens": 256, "block_size": 32, "num_gpu_blocks_override": 64,
        "additional_config": {"neuron_config": {"num_batched_tokens_buckets": [128, 256], "num_seqs_buckets": [1, 8]}},
    }
    assert calls["env"]["NEURON_COMPILED_ARTIFACTS"] == str(tmp_path / "a" / "neuron-compiled")
    assert calls["env"]["NEURON_LOGICAL_NC_CONFIG"] == str(result.manifest.lnc)
    assert "neuron-compiled/graph_b1.neff" in result.manifest.files
    import os

    assert "NEURON_COMPILED_ARTIFACTS" not in os.environ  # the compile's environment is put back
    assert vllm_engine_config(result.manifest, tmp_path / "a").args == calls["LLM"]


def test_tp_degree_must_divide_the_attention_heads_on_neuron(llama, tmp_path, device, fake_vllm):
    with pytest.raises(CompileError, match="--tp-degree 3 does not divide the model's 4 attention heads"):
        compile_generate(GenerateOptions(model=str(llama), target="trn2", out=tmp_path / "a",
                                         generation=GenerationOptions("trn2", tp_degree=3)))
    assert fake_vllm.calls == []


def test_a_pull_refuses_neuron_graphs_of_another_sdk_release(llama, tmp_path, fake_nxdi, monkeypatch):
    from neuronserve.compile import store

    m = compile_generate(GenerateOptions(model=str(llama), target="inf2", out=tmp_path / "a")).manifest
    assert {"torch_neuronx", "neuronx_cc", "neuron_sdk", "neuronx-distributed-inference"} <= set(m.versions)
    installed = {"torch_neuronx": m.versions["torch_neuronx"], "neuronx_cc": m.versions["neuronx_cc"]}
    monkeypatch.setattr(store, "installed_neuron_sdk", lambda: dict(installed))
    store.check_fits_here(m, "s3://b/k")  # the same toolchain: fine
    monkeypatch.setattr(store, "installed_neuron_sdk", lambda: {"torch_neuronx": "2.9.0.2.99", "neuronx_cc": "9.9"})
    with pytest.raises(store.StoreError, match="do not load across SDK releases"):
        store.check_fits_here(m, "s3://b/k")


def test_the_weights_size_is_read_from_the_safetensors_headers(llama, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    m = compile_generate(GenerateOptions(model=str(llama), out=tmp_path / "a")).manifest
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(str(llama)).parameters())
    assert m.generation.weights_bytes == params * 4  # float32
    del torch
