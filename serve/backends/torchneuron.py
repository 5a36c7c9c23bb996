"""TorchNeuronBackend: run a trn2/trn3 artifact's buckets with TorchNeuron, the native PyTorch backend.

Each bucket is an exported program (`graphs/b<B>_s<S>.pt2`) that this process moves to the `neuron`
device and wraps in `torch.compile(backend="neuron")`, exactly as `neuronserve compile` did. The
compile left the NEFFs in the artifact's `neuron-cache/`; this backend copies them into the cache
`TORCH_NEURONX_NEFF_CACHE_DIR` names (setting it when unset) and sets `NEURON_CC_FLAGS` and
`NEURON_LOGICAL_NC_CONFIG` to the compile's values before the first call, so the warm-up loads NEFFs
instead of compiling. If the warm-up still added NEFFs (a cache miss: another toolchain or
LNC than the compile's), `health()["compiled_at_load"]` says so and a warning is logged.

Construct it inside the serving process (a Ray replica). The NeuronCores it runs on are the
logical cores Ray gives the actor (`NEURON_RT_VISIBLE_CORES`, set from its `neuron_cores`); the
Logical NeuronCore configuration is the artifact's (`NEURON_LOGICAL_NC_CONFIG`, default 2), and an
environment that sets another one is refused, as the runtime cannot run graphs compiled for another.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from neuronserve.common import neuron_sdk
from neuronserve.common import torchneuron as tn
from neuronserve.models.artifact import Bucket, Manifest, sha256_file
from neuronserve.models.families import graph_inputs
from neuronserve.serve.backends.base import BackendError, check_bucket_file, check_shape

log = logging.getLogger(__name__)

VISIBLE_CORES_ENV = "NEURON_RT_VISIBLE_CORES"


def _cache_root() -> Path:
    # compile.compiler.cache_root's rule, read here so a backend does not import the compiler.
    return Path(os.environ.get("NEURONSERVE_CACHE_DIR", Path.home() / ".cache" / "neuronserve"))


def check_native_artifact(artifact_dir: Path, manifest: Manifest, expected_target: str | None) -> None:
    """Refuse an artifact this backend cannot run: cpu, the XLA toolchain's, another target's."""
    target = manifest.target
    if target == "cpu":
        raise BackendError(
            f"artifact {artifact_dir} was compiled for cpu; serve it with the cpu backend (backend auto or cpu), "
            f"or recompile it with `neuronserve compile --target trn2` (or trn3)"
        )
    stack = neuron_sdk.artifact_stack(target, manifest.neuron_stack, manifest.versions)
    if stack != neuron_sdk.STACK_NATIVE:
        raise BackendError(neuron_sdk.wrong_stack_message(
            f"artifact {artifact_dir} ({target}, built with torch-neuronx "
            f"{manifest.versions.get(neuron_sdk.KEY_TORCH_NEURONX, 'unknown')})",
            neuron_sdk.STACK_XLA, neuron_sdk.STACK_NATIVE,
        ) + (f"; recompile it with `neuronserve compile --target {target}`" if target in neuron_sdk.NATIVE_TARGETS
             else f"; serve it with the XLA backend on an {target} instance"))
    if expected_target is not None and target != expected_target:
        raise BackendError(
            f"artifact {artifact_dir} was compiled for {target} but this machine is {expected_target}; "
            f"recompile with `neuronserve compile --target {expected_target}`"
        )


class TorchNeuronBackend:
    """Backend over an artifact compiled for trn2/trn3 with TorchNeuron."""

    kind = "neuron"
    threads = None  # the NeuronCores run the forward, not host threads
    packing = False

    def __init__(
        self,
        artifact_dir: str | Path,
        manifest: Manifest,
        *,
        expected_target: str | None = None,
        verify_files: bool = True,
    ) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        check_native_artifact(self.artifact_dir, manifest, expected_target)
        target = manifest.target
        try:
            neuron_sdk.import_torchneuron()
            self.sdk = neuron_sdk.torchneuron_versions()
        except neuron_sdk.NeuronSDKMissing as e:
            raise BackendError(f"cannot serve {target} artifact {self.artifact_dir}: {e}") from e
        problem = neuron_sdk.sdk_mismatch(manifest.versions, self.sdk)
        if problem is not None:
            raise BackendError(
                f"{problem}: NEFFs do not load across Neuron SDK releases; "
                f"recompile with `neuronserve compile --target {target}` on this toolchain"
            )
        self.lnc = manifest.lnc or tn.DEFAULT_LNC
        env_lnc = os.environ.get(tn.LNC_ENV, "").strip()
        if env_lnc and env_lnc != str(self.lnc):
            raise BackendError(
                f"{tn.LNC_ENV}={env_lnc} here, but artifact {self.artifact_dir} was compiled for LNC {self.lnc}: "
                f"the runtime cannot run graphs compiled for another Logical NeuronCore configuration; unset "
                f"{tn.LNC_ENV} (or set it to {self.lnc}), or recompile with {tn.LNC_ENV}={env_lnc}"
            )
        os.environ[tn.LNC_ENV] = str(self.lnc)
        # The compile's flags too: a NEFF is cached under the flags it was compiled with.
        os.environ[tn.CC_FLAGS_ENV] = " ".join(manifest.compiler_args)
        self.neff_cache = self._prepare_cache(verify_files)

        self.visible_cores_env = os.environ.get(VISIBLE_CORES_ENV)
        from neuronserve.serve.backends.neuron import parse_visible_cores

        self.cores = parse_visible_cores(self.visible_cores_env)
        self.n_inputs = len(manifest.inputs)
        self.errors = 0
        self.compiled_at_load: list[str] = []
        self.load_seconds: dict[str, float] = {}
        self._files: dict[Bucket, Path] = {}
        self._compiled: dict[Bucket, object] = {}
        for entry in sorted(manifest.buckets, key=lambda e: e.bucket):
            bucket = entry.bucket
            path = self.artifact_dir / entry.file
            self._files[bucket] = path
            self._compiled[bucket] = self._load(bucket, path, entry.sha256 if verify_files else None)
        if not self._compiled:
            raise BackendError(f"artifact {self.artifact_dir} lists no buckets; recompile it with --buckets")

    def _prepare_cache(self, verify_files: bool) -> Path:
        """Put the artifact's NEFFs into the cache TorchNeuron reads: the directory
        `TORCH_NEURONX_NEFF_CACHE_DIR` already names (a deployment sets it for every process of the
        pod, before torch loads), else `<cache root>/torchneuron-cache`, which it then names. The
        artifact may sit in a read-only image, so the files are copied; each is checked against the
        manifest's hash and lands by an atomic rename, so the replicas of a pod can fill one cache at
        once, and caches of several artifacts merge (a NEFF's name is its cache key)."""
        rel = self.manifest.neuron_cache_dir or tn.CACHE_DIR_NAME
        source = self.artifact_dir / rel
        if not tn.neff_files(source):
            raise BackendError(
                f"artifact {self.artifact_dir} has no NEFFs in {rel}/: serving would compile every bucket; "
                f"recompile it with `neuronserve compile --target {self.manifest.target}` on a "
                f"{self.manifest.target} host"
            )
        configured = os.environ.get(tn.NEFF_CACHE_ENV, "").strip()
        dest = Path(configured) if configured else _cache_root() / "torchneuron-cache"
        listed = {name: digest for name, digest in self.manifest.files.items() if name.startswith(rel + "/")}
        present = {p.relative_to(self.artifact_dir).as_posix(): p for p in source.rglob("*") if p.is_file()}
        if verify_files:
            for name in sorted(set(listed) | set(present)):
                if name not in present or name not in listed or sha256_file(present[name]) != listed[name]:
                    raise BackendError(
                        f"NEFF cache file {name} of artifact {self.artifact_dir} does not match the sha256 in the "
                        f"manifest (or is missing from one of them); the artifact was modified or copied "
                        f"incompletely: copy it again or recompile"
                    )
        for name, path in sorted(present.items()):
            target = dest / path.relative_to(source)
            if target.is_file() and target.stat().st_size == path.stat().st_size and (
                    not verify_files or sha256_file(target) == listed[name]):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        os.environ[tn.NEFF_CACHE_ENV] = str(dest)
        return dest

    def _load(self, bucket: Bucket, path: Path, sha256: str | None) -> object:
        check_bucket_file(bucket, path, sha256, "program file")
        start = time.perf_counter()
        try:
            compiled = tn.load_compiled(path)
        except Exception as e:
            raise BackendError(f"bucket {bucket}: loading {path} onto the neuron device failed: {e}") from e
        self.load_seconds[str(bucket)] = time.perf_counter() - start
        return compiled

    def buckets(self) -> list[Bucket]:
        return sorted(self._compiled)

    def forward(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        compiled = self._compiled.get(bucket)
        if compiled is None:
            raise BackendError(
                f"bucket {bucket} is not compiled in this artifact; it has {', '.join(map(str, self.buckets()))}"
            )
        check_shape(bucket, inputs, self.n_inputs)
        try:
            out = tn.run(compiled, inputs, self.manifest.precision)
        except Exception as e:
            self.errors += 1
            raise BackendError(f"bucket {bucket}: running {self._files[bucket]} on the neuron device failed: {e}") from e
        expected = (bucket.batch_size, self.manifest.model.output_dim)
        if tuple(out.shape) != expected:
            self.errors += 1
            raise BackendError(
                f"bucket {bucket}: program {self._files[bucket]} returned shape {tuple(out.shape)}, expected {expected}; "
                "the artifact does not match its manifest: recompile it"
            )
        return out

    def warmup(self, forwards: int = 1, measure: bool = True) -> dict[str, float]:
        """Every bucket in turn (the first call of each loads its NEFF from the cache), whatever
        `forwards`; a bucket whose first call added NEFFs to the cache compiled here and is listed
        in `compiled_at_load`."""
        seconds: dict[str, float] = {}
        for bucket in self.buckets():
            before = len(tn.neff_files(self.neff_cache))
            shape = (bucket.batch_size, bucket.seq_len)
            ids = torch.full(shape, self.manifest.pad_token_id, dtype=torch.int64)
            inputs = graph_inputs(self.manifest.inputs, ids, torch.ones(shape, dtype=torch.int64))
            start = time.perf_counter()
            self.forward(bucket, inputs)
            seconds[str(bucket)] = time.perf_counter() - start
            if len(tn.neff_files(self.neff_cache)) > before and str(bucket) not in self.compiled_at_load:
                self.compiled_at_load.append(str(bucket))
                log.warning("bucket %s was not in the packaged NEFF cache and compiled at load; the serving "
                            "toolchain or LNC differs from the compile's", bucket)
        return seconds if measure else {}

    def health(self) -> dict:
        return {
            "ok": True,
            "device": "neuron",
            "stack": neuron_sdk.STACK_NATIVE,
            "target": self.manifest.target,
            "lnc": self.lnc,
            "cores": self.cores,
            "visible_cores_env": self.visible_cores_env,
            "pid": os.getpid(),
            "buckets": [str(b) for b in self.buckets()],
            "sdk": dict(self.sdk),
            "neff_cache": str(self.neff_cache),
            "compiled_at_load": list(self.compiled_at_load),
            "errors": self.errors,
        }
