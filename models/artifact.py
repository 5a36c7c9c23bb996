"""The artifact: the contract between `compile/` (which writes it) and `serve/` (which loads it).

An artifact is a directory::

    manifest.json          this module's `Manifest` (`files` lists every other file with its sha256)
    tokenizer/             the tokenizer files, copied from the model
    graphs/<file>.pt       compiled graphs (TorchScript); see `BucketEntry.file`
    graphs/<file>.pt2      trn2/trn3: each bucket's exported program (torch.export), which the
                           serving process compiles with TorchNeuron from the packaged cache
    neuron-cache/          trn2/trn3: TorchNeuron's NEFF cache filled by the compile, so serving never compiles

A generative model (task `generate`, served by vLLM) has no graphs of ours: its artifact holds the
checked model and what vLLM needs to run it without compiling (`Generation`)::

    manifest.json          `Manifest` with `generation` set and no buckets
    model/                 the causal LM's files (config, weights, tokenizer), each hashed in `files`
    neuron-compiled/       inf2/trn1/trn2/trn3: the graphs vLLM loads through NEURON_COMPILED_ARTIFACTS

Nothing here imports torch: the manifest is read by tools (deploy, metrics) that never run a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

Task = Literal["embed", "classify", "rerank", "sparse", "generate"]
Target = Literal["cpu", "inf2", "trn1", "trn2", "trn3"]
Precision = Literal["fp32", "bf16"]
TARGETS: tuple[str, ...] = ("cpu", "inf2", "trn1", "trn2", "trn3")
# The Neuron toolchain that built an artifact (neuronserve.common.neuron_sdk): "xla" for inf2/trn1
# (torch_neuronx.trace), "torchneuron" for trn2/trn3 (TorchNeuron, torch.compile(backend="neuron")).
NeuronStack = Literal["xla", "torchneuron"]


class ArtifactError(Exception):
    """An artifact is missing, unreadable or does not fit the machine or the request."""


class BucketSpecError(ValueError):
    """A bucket list could not be parsed; the message names the bad item and the expected form."""


@dataclass(frozen=True, order=True)
class Bucket:
    """One compiled shape: `batch_size` rows of `seq_len` tokens. Ordered by (batch, seq)."""

    batch_size: int
    seq_len: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise BucketSpecError(f"bucket {self.batch_size}x{self.seq_len}: batch and sequence length must be >= 1")

    @property
    def padded_tokens(self) -> int:
        return self.batch_size * self.seq_len

    def __str__(self) -> str:
        return f"{self.batch_size}x{self.seq_len}"

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        """Parse ``"8x128"`` (batch x seq_len).

        >>> Bucket.parse("8x128")
        Bucket(batch_size=8, seq_len=128)
        """
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise BucketSpecError(f"bad bucket {text!r}: expected BATCHxSEQ_LEN, e.g. 8x128")
        return cls(int(m.group(1)), int(m.group(2)))


def parse_buckets(spec: str) -> list[Bucket]:
    """Parse a comma-separated bucket list into sorted, de-duplicated buckets.

    >>> [str(b) for b in parse_buckets("8x128, 1x32,8x32")]
    ['1x32', '8x32', '8x128']
    """
    items = [s for s in spec.split(",") if s.strip()]
    if not items:
        raise BucketSpecError("empty bucket list: expected e.g. 1x32,8x32,8x128")
    return sorted(set(Bucket.parse(s) for s in items))


def parse_int_list(spec: str, what: str) -> list[int]:
    """Parse ``"1,8,32"``; the error names `what`.

    >>> parse_int_list("32, 8,1", "batch sizes")
    [1, 8, 32]
    """
    try:
        values = sorted(set(int(s) for s in spec.split(",") if s.strip()))
    except ValueError:
        raise BucketSpecError(f"bad {what} {spec!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not values or values[0] < 1:
        raise BucketSpecError(f"bad {what} {spec!r}: expected integers >= 1")
    return values


def bucket_grid(batch_sizes: list[int], seq_lens: list[int]) -> list[Bucket]:
    """Every (batch, seq_len) pair.

    >>> [str(b) for b in bucket_grid([1, 8], [32, 128])]
    ['1x32', '1x128', '8x32', '8x128']
    """
    return sorted(Bucket(b, s) for b in batch_sizes for s in seq_lens)


@dataclass(frozen=True)
class TaskInfo:
    """What a task is, as data: the head its graph ends in and what a row of input is. The serving
    layer reads this, never the task's name, so models of several tasks can share a replica."""

    name: str
    # encoder + pooling (a vector), a sequence-classification head, or a masked-LM head pooled SPLADE's way
    head: Literal["pooled", "logits", "splade"]
    pairs: bool  # takes (text, text) pairs, tokenized as the tokenizer encodes pairs (token type ids)
    singles: bool  # takes single texts
    scores: bool  # one score per input (a single-logit head with an activation), not a label ranking


TASKS: dict[str, TaskInfo] = {
    "embed": TaskInfo("embed", "pooled", pairs=False, singles=True, scores=False),
    "classify": TaskInfo("classify", "logits", pairs=True, singles=True, scores=False),
    "rerank": TaskInfo("rerank", "logits", pairs=True, singles=False, scores=True),
    "sparse": TaskInfo("sparse", "splade", pairs=False, singles=True, scores=False),
}


def task_info(task: str) -> TaskInfo:
    """The `TaskInfo` of a task name.

    >>> task_info("rerank").pairs, task_info("embed").head
    (True, 'pooled')
    """
    try:
        return TASKS[task]
    except KeyError:
        raise ArtifactError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}") from None


class Pooling(BaseModel):
    """How token vectors become one vector, as the model's sentence-transformers config says."""

    mode: Literal["mean", "cls", "max", "mean_sqrt_len", "lasttoken"] = "mean"
    normalize: bool = True


class Splade(BaseModel):
    """A sparse encoder's pooling, as its sentence-transformers `SpladePooling` config says:
    log(1 + relu(MLM logits)) (twice for log1p_relu), masked, then max or sum over the tokens."""

    pooling_strategy: Literal["max", "sum"] = "max"
    activation_function: Literal["relu", "log1p_relu"] = "relu"


class ModelInfo(BaseModel):
    source: str = Field(description="what the user passed: a path, or 'default'")
    name: str = Field(description="the served model name (OpenAI `model` field)")
    family: str = Field(description="model_type from config.json, e.g. bert, roberta, distilbert")
    sha256: str = Field(description="content hash of config, weights and tokenizer files")
    max_position_embeddings: int
    max_seq_length: int = Field(description="the model's own truncation length (sentence-transformers max_seq_length)")
    hidden_size: int
    output_dim: int = Field(description="width of one output row: embedding size or number of labels")


class Parity(BaseModel):
    """A bucket's output against the eager fp32 reference on sample inputs."""

    min_cosine: float
    max_abs_err: float
    samples: int
    passed: bool


class BucketEntry(BaseModel):
    batch_size: int
    seq_len: int
    file: str = Field(description="graph file relative to the artifact dir; buckets may share a file on CPU")
    sha256: str
    compile_seconds: float
    parity: Parity | None = None
    parity_covered_by: list[str] | None = Field(
        default=None,
        description="CPU buckets not run in the parity check: the buckets of the same traced graph, compared "
                    "directly, that cover this one (the largest batch at its sequence length, which holds its "
                    "sample rows, and a bucket of its batch size); None for a bucket compared directly "
                    "(docs/decisions.md, \"CPU parity per sequence length and batch size\")",
    )

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.batch_size, self.seq_len)


class PackedGraph(BaseModel):
    """CPU embedding artifacts: one graph that runs several rows per sequence (`neuronserve.models.tasks.PackedEncoder`)."""

    file: str
    sha256: str
    position_offset: int = Field(default=0, description="first position id of every row (RoBERTa: padding_idx + 1)")
    parity: Parity | None = None


class DeviceMemory(BaseModel):
    """What a loaded model holds in its device's memory: its compiled graphs and its weights,
    computed at compile time. Activations and the runtime's own scratch space are not counted."""

    weights_bytes: int = Field(description="one copy of the parameters and buffers, as traced")
    weight_copies: int = Field(description="copies of the weights a replica loads: 1 when every bucket's graph uses "
                               "one (a CPU graph, or Neuron graphs traced with weights kept out of the NEFF), else "
                               "one per graph file")
    graphs_bytes: int = Field(description="the graph files beyond the weights they hold")

    @property
    def total_bytes(self) -> int:
        return self.graphs_bytes + self.weights_bytes * self.weight_copies

    @classmethod
    def of(cls, weights_bytes: int, graph_sizes: list[int], shared: bool) -> "DeviceMemory":
        """From the size of each graph file (each holding one copy of the weights as saved) and
        whether the graphs share one copy once loaded.

        >>> m = DeviceMemory.of(1000, [1300, 1400], shared=False)
        >>> m.graphs_bytes, m.weight_copies, m.total_bytes
        (700, 2, 2700)
        >>> DeviceMemory.of(1000, [1300, 1400], shared=True).total_bytes
        1700
        """
        graphs = sum(max(0, size - weights_bytes) for size in graph_sizes)
        return cls(weights_bytes=weights_bytes, weight_copies=1 if shared else max(1, len(graph_sizes)),
                   graphs_bytes=graphs)


# Which vLLM runs a generative model, chosen from the artifact's target (`models.generation`):
# vLLM's CPU backend; the vLLM Neuron plugin (trn2/trn3); vLLM over NxD Inference (inf2/trn1).
Engine = Literal["vllm-cpu", "vllm-neuron", "vllm-nxdi"]


class Generation(BaseModel):
    """A generative model's engine settings, fixed at compile time: on Neuron every one of them is
    part of the compiled graphs (shapes, buckets, KV-cache size), so serving must use exactly these.
    `neuronserve.models.generation.vllm_engine_config` turns them into vLLM's engine arguments."""

    engine: Engine
    architecture: str = Field(description="the causal-LM class config.json names, e.g. LlamaForCausalLM")
    model_dir: str = Field(default="model", description="the model's files, relative to the artifact dir")
    dtype: Literal["float32", "bfloat16", "float16"]
    tp_degree: int = Field(ge=1, description="tensor-parallel degree: NeuronCores (Neuron) or CPU ranks per replica")
    max_model_len: int = Field(ge=1, description="longest prompt plus output, in tokens")
    max_num_seqs: int = Field(ge=1, description="sequences decoded together (the largest decode batch)")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="tokens in one prefill step "
                                               "(vllm-neuron: the largest num_batched_tokens bucket)")
    num_batched_tokens_buckets: list[int] | None = Field(default=None, description="vllm-neuron: compiled "
                                                          "prefill token counts")
    num_seqs_buckets: list[int] | None = Field(default=None, description="vllm-neuron: compiled decode batch sizes")
    context_encoding_buckets: list[int] | None = Field(default=None, description="vllm-nxdi: compiled prompt "
                                                        "(context encoding) lengths")
    token_generation_buckets: list[int] | None = Field(default=None, description="vllm-nxdi: compiled decode "
                                                        "(token generation) sequence lengths")
    block_size: int | None = Field(default=None, description="vllm-neuron: tokens per KV-cache block")
    num_gpu_blocks_override: int | None = Field(default=None, description="vllm-neuron: KV-cache blocks, part "
                                                "of the compiled graphs' shapes")
    kv_cache_bytes_per_token: int = Field(ge=0, description="KV-cache bytes one token takes in all layers at dtype")
    kv_cache_space_gib: int | None = Field(default=None, description="vllm-cpu: VLLM_CPU_KVCACHE_SPACE, room for "
                                           "max_num_seqs sequences of max_model_len tokens")
    weights_bytes: int | None = Field(default=None, description="the model's parameters at dtype (from the "
                                      "safetensors headers; None when unknown)")
    compiled_dir: str | None = Field(default=None, description="Neuron targets: the precompiled graphs "
                                     "(NEURON_COMPILED_ARTIFACTS), relative to the artifact dir")
    eos_token_id: int | list[int] | None = None
    chat_template: bool = Field(default=False, description="whether the tokenizer carries a chat template")


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model: ModelInfo
    task: Task
    inputs: list[str] = Field(description="graph input names in call order")
    pooling: Pooling | None = None
    labels: dict[int, str] | None = Field(default=None, description="classify: index -> label")
    splade: Splade | None = Field(default=None, description="sparse: the SPLADE pooling")
    prompts: dict[str, str] = Field(default_factory=dict, description="embed, sparse: name -> text put before an "
                                    "input (config_sentence_transformers.json)")
    default_prompt_name: str | None = Field(default=None, description="the prompt every input gets unless a request "
                                            "names another")
    activation: str | None = Field(
        default=None, description="rerank: the function a score goes through (sentence-transformers CrossEncoder's "
        "activation_fn): sigmoid, identity or tanh")
    tokenizer_dir: str = "tokenizer"
    tokenizer_files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    pad_token_id: int = 0
    target: Target
    precision: Precision = "fp32"
    compiler_args: list[str] = Field(default_factory=list)
    neuron_stack: NeuronStack | None = Field(
        default=None, description="Neuron toolchain that built it: xla (inf2/trn1) or torchneuron (trn2/trn3); "
        "None for cpu and for artifacts written before the field existed (all by the XLA path)")
    lnc: int | None = Field(default=None, description="trn2/trn3: the Logical NeuronCore configuration the graphs "
                            "were compiled for (physical cores per logical core; the runtime must use the same)")
    neuron_cache_dir: str | None = Field(default=None, description="trn2/trn3: TorchNeuron's NEFF cache, relative "
                                         "to the artifact dir")
    versions: dict[str, str] = Field(default_factory=dict, description="library and SDK versions used")
    buckets: list[BucketEntry] = Field(description="compiled encoder shapes; empty for task generate")
    generation: Generation | None = Field(default=None, description="task generate: the vLLM engine settings")
    packed: PackedGraph | None = Field(default=None, description="graph for packed batches (CPU embed), if compiled")
    weights_file: str | None = Field(default=None, description="Neuron graphs traced with their weights kept out of "
                                     "the NEFF: the one copy of the weights every bucket's graph is given at load")
    device_memory: DeviceMemory | None = Field(default=None, description="device memory of the loaded model; "
                                               "absent in manifests written before it was recorded")
    cache_key: str = ""
    created_at: str = ""
    files: dict[str, str] = Field(
        default_factory=dict,
        description="every file of the artifact but the manifest (relative path -> sha256); empty in manifests "
        "written before it existed, whose per-graph and tokenizer hashes list the same files",
    )

    def bucket_list(self) -> list[Bucket]:
        return sorted(e.bucket for e in self.buckets)

    def entry(self, bucket: Bucket) -> BucketEntry:
        for e in self.buckets:
            if e.bucket == bucket:
                return e
        raise ArtifactError(f"bucket {bucket} is not in this artifact; it has {', '.join(map(str, self.bucket_list()))}")


def device_memory_bytes(manifest: Manifest, artifact_dir: str | Path | None = None) -> tuple[int | None, str]:
    """(bytes, how it is known) of a model's device memory: as its manifest records it; for older
    manifests, estimated from the artifact's graph files (each holding its own copy of the
    weights); or (None, "unknown") when neither is at hand (a remote artifact's older manifest)."""
    if manifest.device_memory is not None:
        return manifest.device_memory.total_bytes, "recorded"
    if artifact_dir is not None:
        files = {e.file for e in manifest.buckets} | ({manifest.packed.file} if manifest.packed else set())
        paths = [Path(artifact_dir) / f for f in files]
        if paths and all(p.is_file() for p in paths):
            return sum(p.stat().st_size for p in paths), "estimated from its graph files (an older manifest)"
    return None, "unknown (an older manifest; recompile to record it)"


def load_manifest(artifact_dir: str | Path) -> Manifest:
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"no {MANIFEST_NAME} in {artifact_dir}: not an artifact directory; create one with `neuronserve compile --out {artifact_dir}`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version {version}; this neuronserve reads {SCHEMA_VERSION}: recompile with `neuronserve compile`"
        )
    return Manifest.model_validate(data)


def save_manifest(manifest: Manifest, artifact_dir: str | Path) -> Path:
    path = Path(artifact_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(path)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
