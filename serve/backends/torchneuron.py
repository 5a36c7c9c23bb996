"""TorchNeuronBackend: run a trn2/trn3 artifact's buckets with TorchNeuron, the native PyTorch backend.

Each bucket is an exported program (`graphs/b<B>_s<S>.pt2`) that this process moves to the `neuron`
device and wraps in `torch.compile(backend="neuron")`, exactly as `neuronserve compile` did. The
compile left the NEFFs in the artifact's `neuron-cache/`; this backend copies that cache somewhere
writable and points `TORCH_NEURONX_NEFF_CACHE_DIR` at it (and `NEURON_CC_FLAGS`,
`NEURON_LOGICAL_NC_CONFIG` at the compile's values) before the first call, so the warm-up loads
NEFFs instead of compiling. If the warm-up still added NEFFs (a cache miss: another toolchain or
LNC than the compile's), `health()["compiled_at_load"]` says so and a warning is logged.

Construct it inside the serving process (a Ray replica). The NeuronCores it runs on are the
logical cores Ray gives the actor (`NEURON_RT_VISIBLE_CORES`, set from its `neuron_cores`); the
Logical NeuronCore configuration is the artifact's (`NEURON_LOGICAL_NC_CONFIG`, default 2), and an
environment that sets another one is refused, as the runtime cannot run graphs compiled for another.
"""

from __future__ import annotations

import hashlib
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
from neuronserve.serve.backends.base import BackendError, check_shape

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
        os.environ[tn.NEFF_CACHE_ENV] = str(self.neff_cache)

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
        """A writable copy of the artifact's NEFF cache (the artifact may sit in a read-only image),
        one per artifact and shared by the replicas of a node: copied whole into a directory of its
        own and renamed into place, so no replica reads a half-copied cache; checked against the
        manifest's hashes."""
        rel = self.manifest.neuron_cache_dir or tn.CACHE_DIR_NAME
        source = self.artifact_dir / rel
        if not tn.neff_files(source):
            raise BackendError(
                f"artifact {self.artifact_dir} has no NEFFs in {rel}/: serving would compile every bucket; "
                f"recompile it with `neuronserve compile --target {self.manifest.target}` on a "
                f"{self.manifest.target} host"
            )
        key = self.manifest.cache_key[:16] or hashlib.sha256(str(self.artifact_dir.resolve()).encode()).hexdigest()[:16]
        dest = _cache_root() / "torchneuron-cache" / key
        if not (dest.is_dir() and self._cache_matches(dest, rel, verify_files)):
            tmp = dest.with_name(f"{key}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            bad = self._mismatched(tmp, rel) if verify_files else None
            if bad is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                raise BackendError(
                    f"NEFF cache file {bad} of artifact {self.artifact_dir} does not match the sha256 in the "
                    f"manifest; the artifact was modified or copied incompletely: copy it again or recompile"
                )
            shutil.rmtree(dest, ignore_errors=True)
            try:
                tmp.rename(dest)
            except OSError:  # another replica put its copy there first: use that one
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _mismatched(self, root: Path, rel: str) -> str | None:
        """The first cache file the manifest lists that `root` lacks or holds changed, else None."""
        for name, digest in sorted(self.manifest.files.items()):
            if name.startswith(rel + "/"):
                path = root / Path(name).relative_to(rel)
                if not path.is_file() or sha256_file(path) != digest:
                    return name
        return None

    def _cache_matches(self, root: Path, rel: str, verify_files: bool) -> bool:
        return not verify_files or self._mismatched(root, rel) is None

    def _load(self, bucket: Bucket, path: Path, sha256: str | None) -> object:
        if not path.is_file():
            raise BackendError(f"bucket {bucket}: program file {path} is missing; recompile the artifact")
        if sha256 and sha256_file(path) != sha256:
            raise BackendError(
                f"bucket {bucket}: program file {path} does not match the sha256 in the manifest; "
                "the artifact was modified or copied incompletely: copy it again or recompile"
            )
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
