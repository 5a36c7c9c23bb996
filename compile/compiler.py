"""Compile a model into an artifact: trace per bucket, check against the eager reference, cache.

On `cpu` one traced graph serves every bucket (the trace is shape-polymorphic for these encoders,
so weights are stored once); a grid of more than 32 buckets is validated on the largest batch of
every sequence length and on every batch size, which covers every bucket (`parity_plan`; the
manifest records how each bucket is covered), a smaller one bucket by bucket. On inf2/trn1 every bucket is
its own `torch_neuronx.trace` (static shapes), so each bucket has its own file. On trn2/trn3 every
bucket is its own exported program, compiled with TorchNeuron on the device into the artifact's
NEFF cache (`compile.torchneuron`), so serving loads NEFFs and never compiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from neuronserve.models.artifact import (
    SCHEMA_VERSION,
    TARGETS,
    Bucket,
    BucketEntry,
    DeviceMemory,
    Manifest,
    ModelInfo,
    PackedGraph,
    Parity,
    load_manifest,
    save_manifest,
    sha256_file,
)
from neuronserve.models.families import graph_inputs
from neuronserve.models.loading import ModelSpec, build_module, inspect_model, load_tokenizer

AUTO_CASTS = ("none", "bf16")
# Parity floors against the eager fp32 reference (min cosine over sample rows). fp32 graphs match
# to rounding; bf16's floor sits below what bf16 graphs reach, so it flags real breakage only.
MIN_COSINE = {"none": 0.9999, "bf16": 0.999}
# Classification: largest allowed difference in class probability.
MAX_PROB_ERR = {"none": 1e-3, "bf16": 2e-2}
# Rerank: largest allowed difference in a score's logit, relative to the largest logit (at least 1).
# A single logit has no direction, so cosine says only its sign: the error is the check.
MAX_LOGIT_ERR = {"none": 1e-3, "bf16": 5e-2}

Log = Callable[[str], None]


class CompileError(Exception):
    """A compile cannot start or did not validate; the message names the cause and the fix."""


@dataclass
class CompileOptions:
    model: str = "default"
    task: str = "embed"
    target: str = "cpu"
    buckets: list[Bucket] | None = None  # None: default_buckets()
    out: Path | None = None  # None: the cache directory
    auto_cast: str = "none"
    optlevel: int = 2
    force: bool = False
    # CPU embedding artifacts also get a graph that runs several short rows per sequence.
    packing: bool = True
    extra_compiler_args: list[str] = field(default_factory=list)


@dataclass
class CompileResult:
    manifest: Manifest
    out_dir: Path
    cache_hit: bool
    seconds: float


def cache_root() -> Path:
    import os

    return Path(os.environ.get("NEURONSERVE_CACHE_DIR", Path.home() / ".cache" / "neuronserve"))


def default_buckets(target: str, max_seq_length: int) -> list[Bucket]:
    """Sensible buckets when none are given.

    CPU: one graph serves all shapes, so the grid is fine (sequence lengths 4 tokens apart up to 32,
    then at most 1.25x apart: a lone row pads by at most 25% from 12 tokens on) and bounded by a
    4096 padded-token batch, past which CPU throughput does not grow.
    Neuron: every bucket is a NEFF that costs minutes to compile and device memory to hold, so a
    small grid of batch 1/4/16 over power-of-two lengths.

    >>> [str(b) for b in default_buckets("inf2", 128)]
    ['1x32', '1x64', '1x128', '4x32', '4x64', '4x128', '16x32', '16x64', '16x128']
    """
    if target == "cpu":
        seq_lens = [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
                    448, 512]
        batch_sizes = [1, 2, 4, 8, 16, 32, 64]
        max_tokens = 4096
    else:
        seq_lens = [32, 64, 128, 256, 512]
        batch_sizes = [1, 4, 16]
        max_tokens = None
    seq_lens = [s for s in seq_lens if s < max_seq_length] + [max_seq_length]
    return sorted(
        Bucket(b, s)
        for b in batch_sizes
        for s in seq_lens
        if b == 1 or max_tokens is None or b * s <= max_tokens
    )


def library_versions(target: str) -> dict[str, str]:
    versions = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ("neuronserve", "torch", "transformers", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    if target != "cpu":
        from neuronserve.common.neuron_sdk import NATIVE_TARGETS, NeuronSDKMissing, sdk_versions, torchneuron_versions

        try:
            versions.update(torchneuron_versions() if target in NATIVE_TARGETS else sdk_versions())
        except NeuronSDKMissing as e:
            raise CompileError(str(e)) from None
    return versions


def native(opts: CompileOptions) -> bool:
    """Whether `opts` compiles with TorchNeuron (trn2/trn3) rather than torch_neuronx.trace."""
    from neuronserve.common.neuron_sdk import NATIVE_TARGETS

    return opts.target in NATIVE_TARGETS


def compiler_args_for(opts: CompileOptions) -> list[str]:
    if opts.target == "cpu":
        return []
    if native(opts):
        from neuronserve.common.torchneuron import cc_flags

        try:
            return cc_flags(opts.optlevel, opts.extra_compiler_args)
        except (ValueError, TypeError) as e:
            raise CompileError(str(e)) from None
    from neuronserve.compile.neuron import compiler_args

    try:
        return compiler_args(opts.target, auto_cast=opts.auto_cast, optlevel=opts.optlevel, extra=opts.extra_compiler_args)
    except ValueError as e:
        raise CompileError(str(e)) from None


def cache_key(spec: ModelSpec, opts: CompileOptions, buckets: list[Bucket], args: list[str], versions: dict,
              lnc: int | None = None) -> str:
    payload = {
        "schema": SCHEMA_VERSION,
        "model": spec.sha256,
        "task": opts.task,
        "target": opts.target,
        "auto_cast": opts.auto_cast,
        "buckets": [str(b) for b in buckets],
        "compiler_args": args,
        "packed": packs(opts),
        "versions": {k: v for k, v in versions.items() if k != "neuronserve"},
    }
    if lnc is not None:  # trn2/trn3 only, so the keys of other artifacts stay as they were
        payload["lnc"] = lnc
    if shares_weights(opts, buckets):  # only then: keys of every other artifact stay as they were
        payload["weights"] = "shared"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


WEIGHTS_FILE = "graphs/weights.pt"


def shares_weights(opts: CompileOptions, buckets: list[Bucket]) -> bool:
    """Whether the bucket graphs are traced with their weights kept out of the NEFF
    (`inline_weights_to_neff=False`) and given one saved copy at load (`torch_neuronx.replace_weights`):
    Neuron artifacts of several buckets, where inlined weights would put a copy in every graph
    (docs/decisions.md, "One copy of the weights for every bucket")."""
    return opts.target != "cpu" and not native(opts) and len(buckets) > 1


def weights_bytes(module) -> int:
    """Bytes of the module's parameters and buffers (each tensor once), as traced."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def packs(opts: CompileOptions) -> bool:
    """Whether the artifact gets a packed graph: CPU embedding models (Neuron targets would need
    the packed signature traced per bucket; not built)."""
    return opts.packing and opts.target == "cpu" and opts.task == "embed"


def check_options(opts: CompileOptions) -> None:
    if opts.target not in TARGETS:
        raise CompileError(f"unknown target {opts.target!r}: expected one of {', '.join(TARGETS)}")
    if opts.auto_cast not in AUTO_CASTS:
        raise CompileError(f"unknown --auto-cast {opts.auto_cast!r}: expected none (fp32) or bf16")
    if opts.optlevel not in (1, 2, 3):
        raise CompileError(f"--optlevel {opts.optlevel} is not valid: expected 1, 2 or 3 (1 compiles fastest)")


def check_buckets(spec: ModelSpec, buckets: list[Bucket]) -> None:
    too_long = [b for b in buckets if b.seq_len > spec.max_positions]
    if too_long:
        raise CompileError(
            f"bucket {too_long[0]} is longer than the model's max positions ({spec.max_positions} tokens for "
            f"{spec.name}); use sequence lengths <= {spec.max_positions}"
        )
    too_short = [b for b in buckets if b.seq_len < 3]
    if too_short:
        raise CompileError(f"bucket {too_short[0]}: sequence length must be >= 3 (special tokens plus one token)")


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CompileError(f"cannot write to output directory {out}: {e.strerror or e}; choose another --out") from None


def is_cache_hit(out: Path, key: str) -> Manifest | None:
    """The manifest in `out` if it holds the compile `key` names and every graph file still has
    the hash the manifest records. Each file is hashed once: on CPU every bucket names the same
    graph (hashing it per bucket took 7-9 s of a cache hit on the default 121-bucket artifact)."""
    try:
        manifest = load_manifest(out)
    except Exception:
        return None
    if manifest.cache_key != key:
        return None
    wanted: dict[str, set[str]] = {}
    for entry in [*manifest.buckets, *([manifest.packed] if manifest.packed else [])]:
        wanted.setdefault(entry.file, set()).add(entry.sha256)
    for file, hashes in wanted.items():
        f = out / file
        if len(hashes) != 1 or not f.is_file() or sha256_file(f) not in hashes:
            return None
    if manifest.neuron_cache_dir and not any((out / manifest.neuron_cache_dir).rglob("*.neff")):
        return None  # trn2/trn3: without its NEFFs the artifact would compile when served
    return manifest


def prepare_compile(opts, key: str, log: Log, started: float,
                    hit: Callable[[Path, str], Manifest | None] = is_cache_hit) -> tuple[Path, "CompileResult | None"]:
    """Where the compile `key` names goes (`opts.out`, or the cache's folder for the key), ready to
    write; and, unless `opts.force`, the result when that folder already holds it (`hit` checks it:
    encoders' graphs by default, a generative artifact's files for `compile.generation`)."""
    out = Path(opts.out) if opts.out else cache_root() / "artifacts" / key[:16]
    prepare_out(out)
    if not opts.force:
        cached = hit(out, key)
        if cached is not None:
            held = f"{len(cached.buckets)} buckets, " if cached.buckets else ""
            log(f"cache hit: {out} already holds this compile ({held}key {key[:12]})")
            return out, CompileResult(cached, out, True, time.perf_counter() - started)
    return out, None


SAMPLE_TEXT = (
    "Inferentia and Trainium serve transformer models at a lower price per request when the software "
    "keeps the device busy. Static shapes mean every batch is padded to a compiled bucket, so the "
    "serving layer groups requests of similar length, cuts batches by a token budget and reports the "
    "padding it could not avoid. Latency, throughput and cost are measured, never assumed; a compile "
    "is checked against the reference model before anything is served from it. "
)


def sample_inputs(tokenizer, spec: ModelSpec, bucket: Bucket, pad_id: int):
    """A full batch of real rows whose lengths spread from 2 tokens to the whole bucket. Tasks that
    take text pairs get pairs (as the tokenizer encodes them, with token type ids): every row for
    rerank, every other row for classify (which takes single texts too)."""
    import torch

    from neuronserve.models.artifact import task_info

    info = task_info(spec.task)
    text = SAMPLE_TEXT * (1 + bucket.seq_len // 60)
    ids = torch.full((bucket.batch_size, bucket.seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((bucket.batch_size, bucket.seq_len), dtype=torch.long)
    types = torch.zeros((bucket.batch_size, bucket.seq_len), dtype=torch.long)
    for i in range(bucket.batch_size):
        length = max(2, round(bucket.seq_len * (i + 1) / bucket.batch_size))
        pair = info.pairs and length >= 8 and (not info.singles or i % 2 == 1)
        if pair:  # a short query and a long document, cut as the tokenizer cuts pairs (longest first)
            enc = tokenizer(text[:60], text[60:], truncation="longest_first", max_length=length)
            row, row_types = enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])
            types[i, : len(row)] = torch.tensor(row_types)
        else:
            row = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return graph_inputs(spec.family.inputs, ids, mask, types)


class References:
    """The eager fp32 model's output for each sample row (`sample_inputs`), run alone without padding.

    A row's output does not depend on its batch or its padding (padding is masked; that is what
    serving relies on), so the reference for a row is the model on that row alone, trimmed to its
    tokens: each distinct row runs once, however many buckets hold it, and rows of one length run
    together, with no padded token at all. On the default 121-bucket CPU grid that is 117 distinct
    rows of 8.7k tokens against 49k padded tokens for the largest batch of each sequence length
    (docs/decisions.md, "CPU parity per sequence length and batch size"). Rows must be padded on
    the right, as `sample_inputs` pads them."""

    def __init__(self, module, input_names):
        self.module = module
        self.mask_at = list(input_names).index("attention_mask")
        self.rows: dict[tuple, object] = {}  # a row of every graph input, trimmed -> its output row
        self.runs = 0

    def of(self, example):
        """The reference output of every row of `example` (a batch of graph inputs), in order."""
        import torch

        keys = [self._trimmed(example, i) for i in range(example[0].shape[0])]
        by_length: dict[int, list[tuple]] = {}
        for key in dict.fromkeys(k for k in keys if k not in self.rows):
            by_length.setdefault(len(key[0]), []).append(key)
        for group in by_length.values():
            batch = tuple(torch.tensor([key[j] for key in group]) for j in range(len(example)))
            with torch.inference_mode():
                out = self.module(*batch)
            self.runs += 1
            for key, row in zip(group, out):
                self.rows[key] = row
        return torch.stack([self.rows[k] for k in keys])

    def _trimmed(self, example, i: int) -> tuple:
        """Row `i` of every graph input, cut to its tokens: what its output depends on."""
        mask = example[self.mask_at][i]
        n = int(mask.sum())
        if n and not bool(mask[:n].all()):
            raise ValueError(f"sample row {i} is not padded on the right: {mask.tolist()}")
        return tuple(tuple(t[i, :n].tolist()) for t in example)


# A CPU grid of at most this many buckets runs the graph on every bucket (cheap); a larger one
# on the buckets of `parity_plan`.
PARITY_EVERY_BUCKET_UP_TO = 32


def parity_plan(buckets: list[Bucket], rows: Callable[[Bucket], list[tuple]],
                every_up_to: int = PARITY_EVERY_BUCKET_UP_TO) -> dict[Bucket, tuple[Bucket, ...]]:
    """Which buckets of a CPU artifact the parity check runs the graph on, and how it covers the others.

    On CPU one traced graph serves every bucket: the same operations at every shape, with anything
    the trace fixed from its example's shape a constant of the graph. A shape-dependent mistake
    therefore shows at a sequence length or a batch size, and a masking mistake in a row. So the
    graph runs on (1) the largest batch at every sequence length, which holds the sample rows
    (`rows`) of every smaller bucket at that length whose batch size divides it, and (2) for every
    batch size not already in (1), its shortest bucket; (3) any bucket whose rows are not all rows
    of the largest batch at its length runs too. A grid of at most `every_up_to` buckets runs on
    every bucket. Returns ``{bucket: ()}`` for a bucket the graph
    runs on and ``{bucket: (largest at its length, the run bucket of its batch size)}`` for one it
    covers (docs/decisions.md, "CPU parity per sequence length and batch size").

    >>> from neuronserve.models.artifact import parse_buckets
    >>> by_length = lambda b: [max(2, round(b.seq_len * (i + 1) / b.batch_size)) for i in range(b.batch_size)]
    >>> plan = parity_plan(parse_buckets("1x8,2x8,4x8,1x16,2x16,4x16,3x16"), by_length, every_up_to=0)
    >>> sorted(str(b) for b, via in plan.items() if not via)
    ['1x8', '2x8', '3x16', '4x16', '4x8']
    >>> [str(b) for b in plan[Bucket(2, 16)]]
    ['4x16', '2x8']
    """
    if len(buckets) <= every_up_to:
        return {b: () for b in sorted(buckets)}
    largest: dict[int, Bucket] = {}
    for b in buckets:
        largest[b.seq_len] = max(largest.get(b.seq_len, b), b)
    direct = set(largest.values())
    for b in buckets:
        if b not in direct and not set(rows(b)) <= set(rows(largest[b.seq_len])):
            direct.add(b)
    of_size: dict[int, Bucket] = {}  # the shortest run bucket of each batch size
    for b in sorted(buckets, key=lambda b: (b.seq_len, b.batch_size)):
        if b.batch_size not in of_size and (b in direct or not any(d.batch_size == b.batch_size for d in direct)):
            of_size[b.batch_size] = b
            direct.add(b)
    return {b: () if b in direct else (largest[b.seq_len], of_size[b.batch_size]) for b in sorted(buckets)}


def sample_rows(example) -> list[tuple]:
    """Each row of a batch of graph inputs, as a key (`parity_plan` compares buckets' rows)."""
    return [tuple(tuple(t[i].tolist()) for t in example) for i in range(example[0].shape[0])]


def measure_parity(task: str, got, ref, auto_cast: str) -> Parity:
    import torch

    got, ref = got.float(), ref.float()
    max_abs = (got - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1).min().item()
    passed = cos >= MIN_COSINE[auto_cast]
    if task == "classify":
        prob_err = (got.softmax(-1) - ref.softmax(-1)).abs().max().item()
        passed = passed and prob_err <= MAX_PROB_ERR[auto_cast]
    elif task == "rerank":
        passed = max_abs <= MAX_LOGIT_ERR[auto_cast] * max(1.0, ref.abs().max().item())
    return Parity(min_cosine=round(cos, 7), max_abs_err=max_abs, samples=int(ref.shape[0]), passed=bool(passed))


def compile_artifact(opts: CompileOptions, log: Log | None = None) -> CompileResult:
    """Compile (or find in the cache) the artifact `opts` describes. A cache hit reads the model's
    files and the artifact's graphs to hash them, and imports no torch."""
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    check_options(opts)
    lnc = None
    if native(opts):
        from neuronserve.common.torchneuron import lnc_from_env
        from neuronserve.compile.torchneuron import TorchNeuronCompileError, require_device

        try:
            require_device(opts.target)
            lnc = lnc_from_env()
        except (TorchNeuronCompileError, ValueError) as e:
            raise CompileError(str(e)) from None
    spec = inspect_model(opts.model, opts.task)
    buckets = sorted(set(opts.buckets)) if opts.buckets else default_buckets(opts.target, spec.max_seq_length)
    check_buckets(spec, buckets)
    args = compiler_args_for(opts)
    versions = library_versions(opts.target)
    key = cache_key(spec, opts, buckets, args, versions, lnc)
    out, cached = prepare_compile(opts, key, log, start)
    if cached is not None:
        return cached

    import torch

    log(f"compiling {spec.name} ({spec.family.model_type}, {opts.task}) for {opts.target}: {len(buckets)} buckets -> {out}")
    tokenizer = load_tokenizer(spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    module = build_module(spec)
    for stale in ("graphs", "tokenizer", "neuron-workdir", "neuron-cache"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "manifest.json").unlink(missing_ok=True)
    (out / "graphs").mkdir()
    tokenizer.save_pretrained(str(out / "tokenizer"))

    entries: list[BucketEntry] = []
    shared = shares_weights(opts, buckets)
    if shared:  # the one copy every bucket's graph is given at load
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, str(out / WEIGHTS_FILE))
    references = References(module, spec.family.inputs)
    examples: dict[Bucket, tuple] = {}

    def example_of(b: Bucket) -> tuple:
        if b not in examples:
            examples[b] = sample_inputs(tokenizer, spec, b, pad_id)
        return examples[b]

    # CPU: one graph for every bucket, run on the buckets that cover the rest (`parity_plan`);
    # Neuron: every bucket is a graph of its own, so every bucket runs.
    plan = (parity_plan(buckets, lambda b: sample_rows(example_of(b)), PARITY_EVERY_BUCKET_UP_TO) if opts.target == "cpu"
            else {b: () for b in buckets})
    cpu_graph = None
    for i, bucket in enumerate(buckets, 1):
        t0 = time.perf_counter()
        example = example_of(bucket)
        via = plan[bucket]
        reference = None if via else references.of(example)
        if opts.target == "cpu":
            file = "graphs/cpu.pt"
            if cpu_graph is None:
                largest = max(buckets, key=lambda b: b.padded_tokens)
                with torch.no_grad(), warnings.catch_warnings():
                    # Shape-dependent branches in transformers warn at trace time; the parity
                    # check below (`parity_plan`) is what proves the trace right for every shape.
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    cpu_graph = torch.jit.trace(module, sample_inputs(tokenizer, spec, largest, pad_id), check_trace=False)
                torch.jit.save(cpu_graph, str(out / file))
            graph = cpu_graph
        elif native(opts):
            file = f"graphs/b{bucket.batch_size}_s{bucket.seq_len}.pt2"
            got = compile_native_bucket(module, example, out / file, opts, args, lnc, bucket)
            graph = _Computed(got)
        else:
            from neuronserve.common.neuron_sdk import NeuronSDKMissing
            from neuronserve.compile.neuron import NeuronCompileError, trace_bucket

            file = f"graphs/b{bucket.batch_size}_s{bucket.seq_len}.pt"
            workdir = out / "neuron-workdir" / str(bucket)
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    graph = trace_bucket(module, example, compiler_args=args, workdir=workdir, inline_weights=not shared)
            except (NeuronCompileError, NeuronSDKMissing) as e:
                raise CompileError(f"bucket {bucket}: {e}") from e
            torch.jit.save(graph, str(out / file))
        traced_s = time.perf_counter() - t0
        if via:
            entries.append(BucketEntry(batch_size=bucket.batch_size, seq_len=bucket.seq_len, file=file, sha256="",
                                       compile_seconds=round(traced_s, 3), parity_covered_by=[str(b) for b in via]))
            log(f"[{i}/{len(buckets)}] {bucket}: same graph, covered by {via[0]} (its rows at its length) "
                f"and {via[1]} (its batch size)")
            continue
        parity = run_parity(graph, example, reference, opts, bucket, log)
        if parity is not None and not parity.passed:
            raise CompileError(
                f"bucket {bucket} failed validation against the eager fp32 reference: min cosine "
                f"{parity.min_cosine:.6f} (floor {MIN_COSINE[opts.auto_cast]}), max abs error {parity.max_abs_err:.3g}"
                + (f" (limit {MAX_LOGIT_ERR[opts.auto_cast]} x the largest logit)" if opts.task == "rerank" else "")
                + ("; try --auto-cast none" if opts.auto_cast != "none" else "")
            )
        entries.append(
            BucketEntry(
                batch_size=bucket.batch_size,
                seq_len=bucket.seq_len,
                file=file,
                sha256="",
                compile_seconds=round(traced_s, 3),
                parity=parity,
            )
        )
        if parity is None:
            check = "parity not measured (no NeuronCore here)"
        elif opts.task == "rerank":  # one logit per row: its error is the check (`MAX_LOGIT_ERR`)
            check = f"max logit error {parity.max_abs_err:.3g}"
        else:
            check = f"min cosine {parity.min_cosine:.6f}"
        log(f"[{i}/{len(buckets)}] {bucket}: {traced_s:.2f}s, {check}")
    hashes = {f: sha256_file(out / f) for f in {e.file for e in entries}}
    for e in entries:
        e.sha256 = hashes[e.file]
    if opts.target == "cpu":
        run = sum(1 for via in plan.values() if not via)
        log(f"parity: the graph ran on {run} of {len(buckets)} buckets, covering every sequence length and batch "
            f"size; the eager reference ran {len(references.rows)} distinct sample rows, each alone")
    packed = (compile_packed(module, spec, tokenizer, pad_id, buckets, opts, out, log, references)
              if packs(opts) else None)
    shutil.rmtree(out / "neuron-workdir", ignore_errors=True)
    if native(opts):
        check_neff_cache(out, buckets)
    graph_files = sorted(set(hashes) | ({packed.file} if packed is not None else set()))
    memory = DeviceMemory.of(weights_bytes(module), [(out / f).stat().st_size for f in graph_files], shared)
    log(f"device memory: {memory.total_bytes / 2**20:.1f} MiB ({memory.weight_copies} "
        f"cop{'y' if memory.weight_copies == 1 else 'ies'} of {memory.weights_bytes / 2**20:.1f} MiB of weights, "
        f"{memory.graphs_bytes / 2**20:.1f} MiB of graphs)")

    manifest = Manifest(
        model=ModelInfo(
            source=opts.model,
            name=spec.name,
            family=spec.family.model_type,
            sha256=spec.sha256,
            max_position_embeddings=spec.max_position_embeddings,
            max_seq_length=spec.max_seq_length,
            hidden_size=spec.hidden_size,
            output_dim=spec.output_dim,
        ),
        task=opts.task,
        inputs=list(spec.family.inputs),
        pooling=spec.pooling,
        labels=spec.labels,
        activation=spec.activation,
        splade=spec.splade,
        prompts=spec.prompts,
        default_prompt_name=spec.default_prompt_name,
        tokenizer_files={p.name: sha256_file(p) for p in sorted((out / "tokenizer").iterdir()) if p.is_file()},
        pad_token_id=pad_id,
        target=opts.target,
        precision="bf16" if opts.auto_cast == "bf16" else "fp32",
        compiler_args=args,
        neuron_stack=_stack(opts.target),
        lnc=lnc,
        neuron_cache_dir=NEURON_CACHE_DIR if native(opts) else None,
        versions=versions,
        buckets=entries,
        packed=packed,
        weights_file=WEIGHTS_FILE if shared else None,
        device_memory=memory,
        cache_key=key,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=artifact_file_hashes(out, hashes, packed),
    )
    save_manifest(manifest, out)  # written last: a manifest means a complete artifact
    seconds = time.perf_counter() - start
    log(f"wrote {out} in {seconds:.1f}s")
    return CompileResult(manifest, out, False, seconds)


def artifact_file_hashes(out: Path, graph_hashes: dict[str, str], packed: PackedGraph | None) -> dict[str, str]:
    """Every file the compile wrote but the manifest, with its sha256 (`Manifest.files`): what a
    store pull verifies. Graph hashes are the ones already computed."""
    files = dict(graph_hashes)
    if packed is not None:
        files[packed.file] = packed.sha256
    for sub in ("graphs", "tokenizer", NEURON_CACHE_DIR):
        for path in sorted((out / sub).rglob("*")):
            rel = path.relative_to(out).as_posix()
            if path.is_file() and rel not in files:
                files[rel] = sha256_file(path)
    return dict(sorted(files.items()))


NEURON_CACHE_DIR = "neuron-cache"  # common.torchneuron.CACHE_DIR_NAME; read without importing it


def _stack(target: str) -> str | None:
    from neuronserve.common.neuron_sdk import stack_of_target

    return stack_of_target(target)


class _Computed:
    """A bucket's output already computed on the device (TorchNeuron compiles by running it), in
    the shape `run_parity` calls a graph."""

    def __init__(self, output) -> None:
        self.output = output

    def __call__(self, *_inputs):
        return self.output


def compile_native_bucket(module, example, path: Path, opts: CompileOptions, args: list[str], lnc: int | None,
                          bucket: Bucket):
    """Export and compile one trn2/trn3 bucket into the artifact's NEFF cache; its output on the host."""
    from neuronserve.common.neuron_sdk import NeuronSDKMissing
    from neuronserve.compile.torchneuron import TorchNeuronCompileError, compile_bucket, export_bucket

    precision = "bf16" if opts.auto_cast == "bf16" else "fp32"
    try:
        export_bucket(module, example, path)
        return compile_bucket(path, example, precision=precision, cache_dir=path.parents[1] / NEURON_CACHE_DIR,
                              lnc=lnc, flags=args)
    except (TorchNeuronCompileError, NeuronSDKMissing) as e:
        raise CompileError(f"bucket {bucket}: {e}") from e


def check_neff_cache(out: Path, buckets: list[Bucket]) -> None:
    """The compile must have left NEFFs in the artifact's cache, or serving would compile."""
    from neuronserve.common.torchneuron import NEFF_CACHE_ENV, neff_files

    if not neff_files(out / NEURON_CACHE_DIR):
        raise CompileError(
            f"TorchNeuron compiled {len(buckets)} buckets but wrote no NEFF into {out / NEURON_CACHE_DIR}: it "
            f"read {NEFF_CACHE_ENV} before this compile set it (the cache is configured once per process); run "
            f"`neuronserve compile` in a fresh process without {NEFF_CACHE_ENV} set"
        )


def compile_packed(module, spec: ModelSpec, tokenizer, pad_id: int, buckets: list[Bucket], opts: CompileOptions,
                   out: Path, log: Log, references: References | None = None) -> PackedGraph:
    """Trace the packed graph (`neuronserve.models.tasks.PackedEncoder`) and check it: sample rows of many
    lengths, packed several per sequence, must pool to what the eager model gives each row alone."""
    import torch

    from neuronserve.models.tasks import PackedEncoder, pool_packed
    from neuronserve.models.packing import pack_rows, pad_packed

    t0 = time.perf_counter()
    embeddings = getattr(module.encoder, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    offset = padding_idx + 1 if spec.family.position_offset and padding_idx is not None else 0
    packed = PackedEncoder(module.encoder, spec.family.inputs).eval()
    # Sample rows: a batch whose lengths spread from 2 tokens to the longest bucket's length.
    seq_len = max(b.seq_len for b in buckets)
    sample = sample_inputs(tokenizer, spec, Bucket(16, seq_len), pad_id)
    ids, mask = sample[:2]
    rows = [r[: int(m.sum())].tolist() for r, m in zip(ids, mask)]
    # Each row alone (`References`; the compile's own has them when 16 x seq_len is a bucket).
    reference = (references or References(module, spec.family.inputs)).of(sample)
    layout, _ = pack_rows([len(r) for r in rows], bins=len(rows), capacity=seq_len)  # as many sequences as rows: all fit
    bucket = Bucket(len(layout), seq_len)
    example = tuple(torch.from_numpy(a) for a in pad_packed(rows, layout, bucket, pad_id, offset))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        graph = torch.jit.trace(packed, example, check_trace=False)
    file = "graphs/cpu-packed.pt"
    torch.jit.save(graph, str(out / file))
    with torch.inference_mode(), cpu_autocast(opts):
        got = pool_packed(graph(*example).float(), example[2], len(rows), spec.pooling.mode)
    parity = measure_parity(opts.task, got, reference, opts.auto_cast)
    if not parity.passed:
        raise CompileError(
            f"the packed graph failed validation against the eager fp32 reference: min cosine "
            f"{parity.min_cosine:.6f} (floor {MIN_COSINE[opts.auto_cast]}); compile with packing off"
        )
    log(f"packed graph: {len(rows)} rows in {len(layout)} sequences of {seq_len}, {time.perf_counter() - t0:.2f}s, "
        f"min cosine {parity.min_cosine:.6f}")
    return PackedGraph(file=file, sha256=sha256_file(out / file), position_offset=offset, parity=parity)


def cpu_autocast(opts: CompileOptions):
    """bf16 autocast for a CPU graph compiled with --auto-cast bf16 (as the CPU backend runs it);
    nothing otherwise (Neuron graphs carry their casting in the NEFF)."""
    import torch

    if opts.target == "cpu" and opts.auto_cast == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_parity(graph, example, reference, opts: CompileOptions, bucket: Bucket, log: Log) -> Parity | None:
    """Run the compiled graph on the sample batch and compare; None when it cannot run here."""
    import torch

    try:
        with torch.inference_mode(), cpu_autocast(opts):
            got = graph(*example)
    except Exception as e:
        if opts.target == "cpu":
            raise CompileError(f"bucket {bucket}: the traced graph failed to run: {e}") from e
        from neuronserve.common.neuron_sdk import neuron_device_present

        if neuron_device_present():
            raise CompileError(f"bucket {bucket}: the compiled graph failed on the NeuronCore: {e}") from e
        log(f"bucket {bucket}: compiled without a NeuronCore, so parity was not measured; compile on an inf2/trn1 host to validate")
        return None
    return measure_parity(opts.task, got, reference, opts.auto_cast)
