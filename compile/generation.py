"""Compile a generative model (`neuronserve compile --task generate`) into an artifact vLLM serves.

The artifact uses the encoders' manifest-and-cache scheme (a content-addressed cache key, every
file hashed in `Manifest.files` so a store pull verifies it, the manifest written last), with a
`generation` section instead of buckets (`neuronserve.models.generation`):

- cpu: the checked model itself (`model/`): vLLM's CPU backend compiles nothing ahead of time.
- inf2/trn1: the model plus NxD Inference's compiled graphs (`neuron-compiled/`), built with
  `NeuronConfig(**nxdi_neuron_config(...))` and `model.compile(...)`, exactly the configuration
  vLLM's NxDI integration is given at serving time (NEURON_COMPILED_ARTIFACTS), so pods never compile.
  Needs neuronx-distributed-inference (Neuron SDK 2.27-2.31) on the compiling host.
- trn2/trn3: the model plus the vLLM Neuron plugin's graphs, compiled by starting the engine once
  with the serving engine arguments and NEURON_COMPILED_ARTIFACTS pointing into the artifact. Needs
  vllm-neuron and a Neuron device.

Without what a Neuron compile needs, the command refuses with one line saying what and where.
Every SDK import is inside a function; tests put stand-ins for `vllm` and NxDI in `sys.modules`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from neuronserve.compile.compiler import CompileError, CompileResult, prepare_compile
from neuronserve.models.artifact import (
    SCHEMA_VERSION,
    ArtifactError,
    Manifest,
    ModelInfo,
    load_manifest,
    save_manifest,
    sha256_file,
)
from neuronserve.models.generation import (
    COMPILED_DIR,
    MODEL_DIR,
    GenerationOptions,
    engine_of,
    nxdi_neuron_config,
    plan_generation,
    vllm_engine_config,
)

Log = Callable[[str], None]

# Files of a model folder that are not the model (never copied into the artifact).
SKIPPED = (".gitattributes", "README.md", "LICENSE", "LICENSE.txt")
LINK_MIN_BYTES = 16 << 20  # model files at least this large are hard-linked, not copied (copy_model)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")

# NxD Inference's model classes by the architecture config.json names: (module, model, config class).
NXDI_MODELS: dict[str, tuple[str, str, str]] = {
    "LlamaForCausalLM": ("neuronx_distributed_inference.models.llama.modeling_llama", "NeuronLlamaForCausalLM",
                         "LlamaInferenceConfig"),
    "Qwen2ForCausalLM": ("neuronx_distributed_inference.models.qwen2.modeling_qwen2", "NeuronQwen2ForCausalLM",
                         "Qwen2InferenceConfig"),
    "Qwen3ForCausalLM": ("neuronx_distributed_inference.models.qwen3.modeling_qwen3", "NeuronQwen3ForCausalLM",
                         "Qwen3InferenceConfig"),
}
NXDI_DOCS = ("https://awsdocs-neuron.readthedocs-hosted.com/en/latest/libraries/nxd-inference/developer_guides/"
             "vllm-user-guide-v1.html")
PLUGIN_DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/vllm-neuron/docs/guides/features-guide.html"


@dataclass
class GenerateOptions:
    model: str
    target: str = "cpu"
    out: Path | None = None
    force: bool = False
    generation: GenerationOptions | None = None  # None: the target's defaults

    def engine_options(self) -> GenerationOptions:
        return self.generation or GenerationOptions(target=self.target)


@dataclass(frozen=True)
class CausalLM:
    path: Path
    name: str
    config: dict = field(repr=False)
    architecture: str
    sha256: str
    files: dict[str, str] = field(default_factory=dict, repr=False)  # top-level file -> sha256


def inspect_causal_lm(model: str) -> CausalLM:
    """The model at `model`, checked to be a causal LM transformers knows: its config loads with
    AutoConfig and names a causal-LM architecture (encoders and unknown architectures are refused)."""
    from neuronserve.models.loading import ModelError, resolve_model_path

    if model == "default":
        raise ModelError("--task generate needs a causal LM directory (--model DIR): the default model is an encoder")
    path, name = resolve_model_path(model)
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as e:  # pragma: no cover - transformers is a core dependency
        raise ModelError(f"--task generate needs transformers: {e}") from None
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path}: config.json does not load with transformers' AutoConfig: "
                         f"{str(e).splitlines()[0]}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    found = [a for a in archs if a in causal]
    if not found:
        named = ", ".join(archs) if archs else "no architectures"
        raise ModelError(f"{path} is not a causal LM: config.json names {named} (model_type "
                         f"{getattr(config, 'model_type', '?')}); --task generate takes a *ForCausalLM model, "
                         "use --task embed|classify|rerank|sparse for encoders")
    files = model_files(path)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return CausalLM(path=path, name=name, config=config.to_dict(), architecture=found[0], sha256=digest, files=files)


def model_files(src: Path) -> dict[str, str]:
    """The model's top-level files with their sha256: what the artifact copies. vLLM reads config,
    weights, tokenizer and chat template from the top level; subfolders (e.g. a Llama checkpoint's
    `original/` copy of the weights) are left out. Every file is in the model's hash, so a changed
    chat template or generation config is a new compile, not a cache hit."""
    return {p.name: sha256_file(p) for p in sorted(src.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in SKIPPED}


def parameter_count(path: Path) -> int | None:
    """Parameters of the model's safetensors files, read from their JSON headers (no weights loaded,
    no torch); None without safetensors (a .bin checkpoint's size is not known without loading it)."""
    total, found = 0, False
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as e:
            raise CompileError(f"{f} is not a readable safetensors file: {e}") from None
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry.get("shape") or [1])
                found = True
    return total if found else None


def read_tokenizer(path: Path) -> tuple[object, bool]:
    """(eos token id, has a chat template) from the model's tokenizer, which must load."""
    from neuronserve.models.loading import ModelError

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path}: the tokenizer does not load: {str(e).splitlines()[0]}") from None
    return tok.eos_token_id, bool(getattr(tok, "chat_template", None))


def sdk_versions(engine: str) -> dict[str, str]:
    """Installed versions of the engine's stack, from package metadata (nothing is imported). The
    compiler and torch-neuronx are recorded under the keys the encoders' artifacts use
    (`neuron_sdk.KEY_TORCH_NEURONX`, `KEY_NEURONX_CC`, `KEY_SDK`), so a store pull refuses graphs
    compiled by another Neuron SDK release the same way (`compile.store.check_fits_here`)."""
    from neuronserve.common.neuron_sdk import KEY_NEURONX_CC, KEY_SDK, KEY_TORCH_NEURONX, NOT_INSTALLED, SDK_RELEASES

    dists = {"vllm-cpu": ("vllm",), "vllm-neuron": ("vllm", "vllm-neuron", "neuronx-cc", "torch-neuronx"),
             "vllm-nxdi": ("vllm", "vllm-neuron", "neuronx-distributed-inference", "neuronx-cc", "torch-neuronx")}
    keys = {"torch-neuronx": KEY_TORCH_NEURONX, "neuronx-cc": KEY_NEURONX_CC}
    versions = {}
    for dist in dists[engine]:
        try:
            versions[keys.get(dist, dist)] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[keys.get(dist, dist)] = NOT_INSTALLED
    if engine != "vllm-cpu":
        versions[KEY_SDK] = SDK_RELEASES.get((versions[KEY_TORCH_NEURONX], versions[KEY_NEURONX_CC]), "unknown")
    return versions


def cache_key(lm: CausalLM, target: str, gen_fields: dict, versions: dict) -> str:
    payload = {"schema": SCHEMA_VERSION, "model": lm.sha256, "task": "generate", "target": target,
               "generation": gen_fields,
               # A CPU artifact holds no compiled graph, so the vLLM that will serve it is not part of it.
               "versions": {} if target == "cpu" else versions}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def copy_model(src: Path, dest: Path, hashes: dict[str, str]) -> dict[str, str]:
    """The model's files (`hashes`: name -> sha256, from `model_files`) into `dest`; artifact-relative
    path -> sha256. Large files (weights) are hard-linked where the filesystem allows, so a compile
    neither doubles the disk a model takes nor spends minutes copying it; small ones (config,
    tokenizer, chat template: what people edit in place, which would write through a link) are
    copied. Copies are checked against their hash; a weight file changed later in place is caught by
    the artifact's own check (`is_cache_hit`, a push, a pull)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, digest in hashes.items():
        source, target = src / name, dest / name
        linked = False
        if source.stat().st_size >= LINK_MIN_BYTES:
            try:
                os.link(source, target)
                linked = True
            except OSError:
                pass
        if not linked:
            shutil.copy2(source, target)
            if sha256_file(target) != digest:
                raise CompileError(f"{source} changed while it was copied into {dest}: compile again")
        files[f"{dest.name}/{name}"] = digest
    return files


def is_cache_hit(out: Path, key: str) -> Manifest | None:
    try:
        manifest = load_manifest(out)
    except ArtifactError:
        return None
    if manifest.cache_key != key or not manifest.files:
        return None
    for rel, digest in manifest.files.items():
        f = out / rel
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return manifest


# --- Neuron compiles (SDK imported lazily) --------------------------------------------------------
def _import(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise CompileError(f"{what}: {name} is not importable here ({e})") from None


@contextmanager
def environment(env: dict[str, str]):
    """`env` set in os.environ for the block (the Neuron libraries read it when they start)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def require_nxdi(target: str) -> None:
    """Refuse an inf2/trn1 compile on a host without NxD Inference, in one line."""
    try:
        importlib.import_module("neuronx_distributed_inference")
    except ImportError:
        raise CompileError(
            f"compiling a generative model for {target} needs NxD Inference (neuronx-distributed-inference, Neuron "
            f"SDK 2.27-2.31, with neuronx-cc), which is not installed here: run `neuronserve compile --task generate "
            f"--target {target}` in the vLLM+NxDI image (deploy/docker, docs/generation-artifacts.md) or on a Neuron DLAMI; "
            f"{NXDI_DOCS}") from None


def require_plugin(target: str) -> None:
    """Refuse a trn2/trn3 compile without a Neuron device or the vLLM Neuron plugin, in one line."""
    from neuronserve.common import neuron_sdk

    if not neuron_sdk.neuron_device_present():
        raise CompileError(
            f"compiling a generative model for {target} needs a Neuron device and this host has none "
            f"({neuron_sdk.NEURON_DEVICE} absent): the vLLM Neuron plugin compiles its graphs while the engine warms "
            f"up on the device; run `neuronserve compile --task generate --target {target}` on a {target} instance "
            f"(e.g. the compile Job, k8s/compile-job, on a {target} node in the vLLM Neuron image); {PLUGIN_DOCS}")
    for module in ("vllm", "vllm_neuron"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise CompileError(
                f"compiling a generative model for {target} needs vLLM with the vLLM Neuron plugin (vllm-neuron, "
                f"Neuron SDK 2.33+); {module} is not installed here: run the compile in the vLLM Neuron image "
                f"(docs/generation-artifacts.md)") from None


def compile_nxdi(model_dir: Path, compiled_dir: Path, neuron_config: dict, architecture: str) -> None:
    """NxD Inference's documented compile: `NeuronConfig(**kwargs)`, the model's InferenceConfig
    loaded from the Hugging Face checkpoint, `NeuronXxxForCausalLM(path, config).compile(dir)`."""
    if architecture not in NXDI_MODELS:
        raise CompileError(f"NxD Inference has no model class for {architecture} in neuronserve's table; "
                           f"supported: {', '.join(NXDI_MODELS)}")
    module_name, model_cls, config_cls = NXDI_MODELS[architecture]
    what = f"compiling {architecture} with NxD Inference"
    config_mod = _import("neuronx_distributed_inference.models.config", what)
    adapter = _import("neuronx_distributed_inference.utils.hf_adapter", what)
    models = _import(module_name, what)
    config = getattr(models, config_cls)(config_mod.NeuronConfig(**neuron_config),
                                         load_config=adapter.load_pretrained_config(str(model_dir)))
    model = getattr(models, model_cls)(str(model_dir), config)
    compiled_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.compile(str(compiled_dir))
    except Exception as e:
        raise CompileError(f"{what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           f"the compiler's files are under {compiled_dir}") from e


def compile_plugin(engine_args: dict, env: dict[str, str]) -> None:
    """The vLLM Neuron plugin compiles every bucket while the engine warms up and writes the graphs
    to NEURON_COMPILED_ARTIFACTS: start it once with the serving engine arguments, then let it go."""
    with environment(env):
        vllm = _import("vllm", "compiling with the vLLM Neuron plugin")
        try:
            llm = vllm.LLM(**engine_args)
        except Exception as e:
            raise CompileError(f"the vLLM Neuron plugin failed to build the engine: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        del llm


def compiled_files(out: Path, compiled: Path) -> dict[str, str]:
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(compiled.rglob("*")) if p.is_file()}
    if not files:
        raise CompileError(f"the Neuron compile wrote nothing into {compiled}: serving would compile at start-up; "
                           "check the compiler's log above")
    return files


# --- the command ----------------------------------------------------------------------------------
def compile_generate(opts: GenerateOptions, log: Log | None = None) -> CompileResult:
    """Check the causal LM, plan its engine settings for the target, compile what the target needs
    (nothing on CPU) and write the artifact; an unchanged compile is a cache hit."""
    log = log or (lambda _m: None)
    start = time.perf_counter()
    gen_opts = opts.engine_options()
    if gen_opts.target != opts.target:
        gen_opts = GenerationOptions(**{**gen_opts.__dict__, "target": opts.target})
    try:
        engine = engine_of(opts.target)
    except ArtifactError as e:
        raise CompileError(str(e)) from None
    lm = inspect_causal_lm(opts.model)
    eos, chat = read_tokenizer(lm.path)
    try:
        gen = plan_generation(gen_opts, lm.config, lm.architecture, eos_token_id=eos, chat_template=chat,
                              parameters=parameter_count(lm.path))
    except ArtifactError as e:
        raise CompileError(str(e)) from None
    if engine == "vllm-nxdi":
        require_nxdi(opts.target)
    elif engine == "vllm-neuron":
        require_plugin(opts.target)
    versions = sdk_versions(engine)
    lnc = None
    if engine == "vllm-neuron":
        from neuronserve.common.torchneuron import lnc_from_env

        try:
            lnc = lnc_from_env()
        except ValueError as e:
            raise CompileError(str(e)) from None
    key = cache_key(lm, opts.target, {**gen.model_dump(), "lnc": lnc}, versions)
    out, cached = prepare_compile(opts, key, log, start, hit=is_cache_hit)
    if cached is not None:
        return cached
    log(f"checked {lm.name}: {lm.architecture}, {gen.engine}, tp_degree {gen.tp_degree}, max_model_len "
        f"{gen.max_model_len}, max_num_seqs {gen.max_num_seqs}, {gen.dtype} -> {out}")
    (out / "manifest.json").unlink(missing_ok=True)
    for stale in (MODEL_DIR, COMPILED_DIR, "graphs", "tokenizer", "neuron-cache"):
        shutil.rmtree(out / stale, ignore_errors=True)
    files = copy_model(lm.path, out / MODEL_DIR, lm.files)
    manifest = Manifest(
        model=ModelInfo(
            source=opts.model, name=lm.name, family=str(lm.config.get("model_type", "unknown")), sha256=lm.sha256,
            max_position_embeddings=int(lm.config.get("max_position_embeddings") or gen.max_model_len),
            max_seq_length=gen.max_model_len, hidden_size=int(lm.config.get("hidden_size") or 0),
            output_dim=int(lm.config.get("vocab_size") or 0),
        ),
        task="generate",
        inputs=[],
        tokenizer_dir=MODEL_DIR,
        tokenizer_files={Path(rel).name: digest for rel, digest in files.items()
                         if Path(rel).name in TOKENIZER_FILES and rel.count("/") == 1},
        pad_token_id=int(lm.config.get("pad_token_id") or 0),
        target=opts.target,
        precision="bf16" if gen.dtype == "bfloat16" else "fp32",
        neuron_stack=None,
        lnc=lnc,
        versions=versions,
        buckets=[],
        generation=gen,
        cache_key=key,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files={},
    )
    if engine != "vllm-cpu":
        compiled = out / COMPILED_DIR
        compiled.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if engine == "vllm-nxdi":
            compile_nxdi(out / MODEL_DIR, compiled, nxdi_neuron_config(gen), gen.architecture)
        else:
            config = vllm_engine_config(manifest, out)
            compile_plugin(config.args, config.env)
        files.update(compiled_files(out, compiled))
        log(f"compiled {gen.engine} graphs in {time.perf_counter() - t0:.1f}s into {compiled}")
    manifest.files = dict(sorted(files.items()))
    save_manifest(manifest, out)  # written last: a manifest means a complete artifact
    seconds = time.perf_counter() - start
    log(f"wrote {out} in {seconds:.1f}s")
    return CompileResult(manifest, out, False, seconds)
