"""`vllm_engine_config` and the planning of a generative artifact's engine settings (pure; no vLLM)."""

from __future__ import annotations

import pytest

from neuronserve.models.artifact import ArtifactError, Generation, Manifest, ModelInfo
from neuronserve.models.generation import (
    GenerationOptions,
    cpu_threads_bind,
    plan_generation,
    vllm_engine_config,
)

CONFIG = {"max_position_embeddings": 2048, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 8,
          "num_key_value_heads": 2}


def manifest(target: str, **opts) -> Manifest:
    gen = plan_generation(GenerationOptions(target, **opts), CONFIG, "LlamaForCausalLM")
    return Manifest(model=ModelInfo(source="m", name="tiny", family="llama", sha256="0", max_position_embeddings=2048,
                                    max_seq_length=gen.max_model_len, hidden_size=64, output_dim=100),
                    task="generate", inputs=[], target=target, buckets=[], generation=gen)


@pytest.mark.parametrize("target,engine", [("cpu", "vllm-cpu"), ("inf2", "vllm-nxdi"), ("trn1", "vllm-nxdi"),
                                           ("trn2", "vllm-neuron"), ("trn3", "vllm-neuron")])
def test_every_target_gets_the_common_arguments(target, engine, tmp_path):
    m = manifest(target, tp_degree=2, max_model_len=512, max_num_seqs=4)
    assert m.generation.engine == engine
    c = vllm_engine_config(m, tmp_path)
    assert {k: c.args[k] for k in ("model", "dtype", "max_model_len", "max_num_seqs", "tensor_parallel_size")} == {
        "model": str(tmp_path / "model"), "dtype": "float32" if target == "cpu" else "bfloat16",
        "max_model_len": 512, "max_num_seqs": 4, "tensor_parallel_size": 2}
    assert all(isinstance(v, str) for v in c.env.values())


def test_cpu_kv_cache_space_fits_every_sequence_and_threads_split_by_rank(tmp_path):
    m = manifest("cpu", max_model_len=2048, max_num_seqs=64)
    # 2 x 4 layers x 2 kv heads x 8 head dim x 4 bytes = 512 B/token; x 2048 x 64 = 64 MiB -> 1 GiB
    assert m.generation.kv_cache_bytes_per_token == 512 and m.generation.kv_cache_space_gib == 1
    big = plan_generation(GenerationOptions("cpu", max_num_seqs=64), {**CONFIG, "num_hidden_layers": 4096},
                          "LlamaForCausalLM")
    assert big.kv_cache_space_gib == 64  # 512 KiB/token x 2048 x 64
    c = vllm_engine_config(manifest("cpu", tp_degree=2), tmp_path, cpu_ids=range(8), kv_cache_space_gib=5)
    assert c.env == {"VLLM_CPU_KVCACHE_SPACE": "5", "VLLM_CPU_OMP_THREADS_BIND": "0-3|4-7", "OMP_NUM_THREADS": "4",
                     "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
    assert "additional_config" not in c.args
    assert c.args["max_num_batched_tokens"] == 2048
    long = manifest("cpu")
    long.generation.max_model_len = 3000  # a whole prompt fits one step
    assert vllm_engine_config(long, tmp_path).args["max_num_batched_tokens"] == 3000


def test_threads_bind_never_gives_two_ranks_one_cpu():
    for ids, tp in (([0, 1, 2], 2), (list(range(16)), 4), ([3, 7, 11], 3)):
        ranks = [r.split(",") for r in cpu_threads_bind(ids, tp).split("|")]
        assert len(ranks) == tp
        used = []
        for rank in ranks:
            for part in rank:
                a, _, b = part.partition("-")
                used += range(int(a), int(b or a) + 1)
        assert len(used) == len(set(used)) and set(used) <= set(ids)
    with pytest.raises(ArtifactError, match="2 CPUs cannot hold 4"):
        cpu_threads_bind([0, 1], 4)


def test_plugin_buckets_default_to_the_documented_grids_and_their_maxima(tmp_path):
    g = manifest("trn2", max_model_len=1024, max_num_seqs=16).generation
    assert g.num_batched_tokens_buckets == [128, 256, 512, 1024] and g.max_num_batched_tokens == 1024
    assert g.num_seqs_buckets == [1, 2, 4, 8, 16]
    assert g.num_gpu_blocks_override == 16 * 1024 // 32
    with pytest.raises(ArtifactError, match="the largest bucket must equal --max-num-seqs"):
        manifest("trn2", max_num_seqs=16, num_seqs_buckets=[1, 8])
    with pytest.raises(ArtifactError, match="cannot hold one sequence"):
        manifest("trn2", max_model_len=1024, num_gpu_blocks=4)


def test_nxdi_buckets_end_at_max_model_len():
    g = manifest("inf2", max_model_len=300).generation
    assert g.context_encoding_buckets == [128, 256, 300] == g.token_generation_buckets
    with pytest.raises(ArtifactError, match="--context-buckets 128,256: the largest bucket must equal --max-model-len"):
        manifest("inf2", max_model_len=300, context_encoding_buckets=[128, 256])


def test_an_encoder_manifest_or_a_foreign_engine_is_refused(tmp_path):
    m = manifest("trn2")
    with pytest.raises(ArtifactError, match="does not run target inf2"):
        vllm_engine_config(m.model_copy(update={"target": "inf2"}), tmp_path)
    with pytest.raises(ArtifactError, match="not generate"):
        vllm_engine_config(m.model_copy(update={"task": "embed"}), tmp_path)


def test_the_manifest_section_round_trips_through_json():
    m = manifest("trn3", tp_degree=4)
    again = Manifest.model_validate_json(m.model_dump_json())
    assert again.generation == m.generation and isinstance(again.generation, Generation)


def test_a_group_too_small_for_the_weights_and_kv_cache_is_refused_naming_one_that_fits():
    nine_billion = 9 * 10**9  # 18 GB (16.8 GiB) in bfloat16: more than one 16 GiB inf2 core holds
    with pytest.raises(ArtifactError, match=r"but tp_degree 1 gives 1 x 16 GiB on inf2: use --tp-degree 2 or more"):
        plan_generation(GenerationOptions("inf2", max_num_seqs=4), CONFIG, "LlamaForCausalLM", parameters=nine_billion)
    g = plan_generation(GenerationOptions("inf2", tp_degree=2, max_num_seqs=4), CONFIG, "LlamaForCausalLM",
                        parameters=nine_billion)
    assert g.weights_bytes == 2 * nine_billion
    # trn2's logical cores hold 24 GiB: one is enough there.
    assert plan_generation(GenerationOptions("trn2", max_num_seqs=4), CONFIG, "LlamaForCausalLM",
                           parameters=nine_billion).tp_degree == 1
    # CPU memory is not checked here (the host's, sized by VLLM_CPU_KVCACHE_SPACE).
    assert plan_generation(GenerationOptions("cpu"), CONFIG, "LlamaForCausalLM", parameters=10**11).weights_bytes
