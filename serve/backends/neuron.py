"""NeuronBackend: run an artifact's per-bucket Neuron graphs on this process's NeuronCores.

Construct it inside the process that serves (a Ray replica): the Neuron runtime is not fork-safe,
and a loaded graph lands on the cores this process may see (`NEURON_RT_VISIBLE_CORES`, which Ray
sets from the actor's `neuron_cores` resource) by itself. Every bucket is loaded at construction so
that `warmup()` covers all of them before the replica reports ready.

The backend never checks for `/dev/neuron0` itself: whatever the SDK or runtime raises is wrapped in
BackendError naming the file and the bucket. `torch_neuronx` is imported (lazily, here) before any
graph is loaded because importing it registers the Neuron operators the saved graphs call.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from neuronserve.models.artifact import Bucket, Manifest, sha256_file
from neuronserve.models.families import graph_inputs
from neuronserve.serve.backends.base import BackendError, check_bucket_file, check_shape

VISIBLE_CORES_ENV = "NEURON_RT_VISIBLE_CORES"


def parse_visible_cores(value: str | None) -> list[int] | None:
    """Core ids from `NEURON_RT_VISIBLE_CORES` ("0", "0-3", "0,1", "0-1,4"); None when unset (all cores).

    >>> parse_visible_cores("0-2,5")
    [0, 1, 2, 5]
    >>> parse_visible_cores(None) is None
    True
    """
    if value is None or not value.strip():
        return None
    cores: list[int] = []
    try:
        for part in value.split(","):
            lo, sep, hi = part.strip().partition("-")
            cores.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise BackendError(
            f"{VISIBLE_CORES_ENV}={value!r} is not a core list: expected e.g. 0, 0-3 or 0,1"
        ) from None
    return cores


def _pad_inputs(manifest: Manifest, bucket: Bucket) -> tuple[torch.Tensor, ...]:
    shape = (bucket.batch_size, bucket.seq_len)
    # All-ones mask: an all-zero mask is a degenerate input (empty mean-pooling denominators).
    ids = torch.full(shape, manifest.pad_token_id, dtype=torch.int64)
    return graph_inputs(manifest.inputs, ids, torch.ones(shape, dtype=torch.int64))


class NeuronBackend:
    """Backend over an artifact compiled for inf2/trn1 with torch-neuronx's XLA toolchain
    (`torch_neuronx.trace`); trn2/trn3 artifacts are TorchNeuronBackend's."""

    kind = "neuron"
    threads = None  # the NeuronCores run the forward, not host threads
    packing = False  # no packed graph is compiled for Neuron

    def __init__(
        self,
        artifact_dir: str | Path,
        manifest: Manifest,
        *,
        expected_target: str | None = None,
        verify_files: bool = True,
    ) -> None:
        from neuronserve.common.neuron_sdk import (
            STACK_NATIVE,
            STACK_XLA,
            NeuronSDKMissing,
            artifact_stack,
            import_torch_neuronx,
            sdk_mismatch,
            sdk_versions,
            wrong_stack_message,
        )

        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        target = manifest.target
        if target == "cpu":
            raise BackendError(
                f"artifact {self.artifact_dir} was compiled for cpu; serve it with the cpu backend "
                f"(backend auto or cpu), or recompile it with `neuronserve compile --target inf2` (or trn1)"
            )
        if artifact_stack(target, manifest.neuron_stack, manifest.versions) == STACK_NATIVE:
            raise BackendError(wrong_stack_message(
                f"artifact {self.artifact_dir} ({target}, built with torch-neuronx "
                f"{manifest.versions.get('torch_neuronx', 'unknown')})", STACK_NATIVE, STACK_XLA,
            ) + "; serve it with the TorchNeuron backend (backend auto) on a trn2/trn3 instance")
        if expected_target is not None and target != expected_target:
            raise BackendError(
                f"artifact {self.artifact_dir} was compiled for {target} but this machine is {expected_target}; "
                f"recompile with `neuronserve compile --target {expected_target}`"
            )
        try:
            import_torch_neuronx()
            self.sdk = sdk_versions()
        except NeuronSDKMissing as e:
            raise BackendError(f"cannot serve {target} artifact {self.artifact_dir}: {e}") from e
        problem = sdk_mismatch(manifest.versions, self.sdk)
        if problem is not None:
            raise BackendError(
                f"{problem}: compiled Neuron graphs do not load across SDK releases; "
                f"recompile with `neuronserve compile --target {target}` on this toolchain"
            )

        # Read once: the runtime takes its cores from the environment when the first graph loads.
        self.visible_cores_env = os.environ.get(VISIBLE_CORES_ENV)
        self.cores = parse_visible_cores(self.visible_cores_env)
        self.n_inputs = len(manifest.inputs)
        self.errors = 0
        self.load_seconds: dict[str, float] = {}
        self._files: dict[Bucket, Path] = {}
        self._modules: dict[Bucket, torch.jit.ScriptModule] = {}
        loaded: dict[str, torch.jit.ScriptModule] = {}
        for entry in sorted(manifest.buckets, key=lambda e: e.bucket):
            bucket = entry.bucket
            path = self.artifact_dir / entry.file
            if entry.file not in loaded:
                loaded[entry.file] = self._load(bucket, path, entry.sha256 if verify_files else None)
            self._files[bucket] = path
            self._modules[bucket] = loaded[entry.file]
        if not self._modules:
            raise BackendError(f"artifact {self.artifact_dir} lists no buckets; recompile it with --buckets")
        if manifest.weights_file:
            self._share_weights(manifest.weights_file, list(loaded.values()), verify_files)

    def _share_weights(self, file: str, graphs: list, verify: bool) -> None:
        """Graphs traced with their weights kept out of the NEFF get one copy, loaded once and
        given to each (`compile.neuron.share_weights`)."""
        from neuronserve.compile.neuron import share_weights

        path = self.artifact_dir / file
        digest = self.manifest.files.get(file)
        if not path.is_file():
            raise BackendError(f"weights file {path} is missing; recompile the artifact")
        if verify and digest and sha256_file(path) != digest:
            raise BackendError(f"weights file {path} does not match the sha256 in the manifest; copy the artifact "
                               "again or recompile")
        weights = torch.load(str(path), weights_only=True)
        try:
            for graph in graphs:
                share_weights(graph, weights)
        except Exception as e:
            raise BackendError(f"giving the graphs of {self.artifact_dir} their weights ({path}) failed: {e}") from e

    def _load(self, bucket: Bucket, path: Path, sha256: str | None) -> torch.jit.ScriptModule:
        check_bucket_file(bucket, path, sha256, "graph file")
        start = time.perf_counter()
        try:
            module = torch.jit.load(str(path))
        except Exception as e:
            raise BackendError(f"bucket {bucket}: loading {path} onto the NeuronCores failed: {e}") from e
        module.eval()
        self.load_seconds[str(bucket)] = time.perf_counter() - start
        return module

    def buckets(self) -> list[Bucket]:
        return sorted(self._modules)

    def forward(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        module = self._modules.get(bucket)
        if module is None:
            raise BackendError(
                f"bucket {bucket} is not compiled in this artifact; it has {', '.join(map(str, self.buckets()))}"
            )
        check_shape(bucket, inputs, self.n_inputs)
        # Neuron graphs take CPU int64 tensors, exactly as traced.
        args = tuple(t.to(device="cpu", dtype=torch.int64) for t in inputs)
        try:
            with torch.inference_mode():
                out = module(*args)
        except Exception as e:
            self.errors += 1
            raise BackendError(f"bucket {bucket}: running {self._files[bucket]} on Neuron failed: {e}") from e
        if isinstance(out, (tuple, list)):
            out = out[0]
        expected = (bucket.batch_size, self.manifest.model.output_dim)
        if tuple(out.shape) != expected:
            self.errors += 1
            raise BackendError(
                f"bucket {bucket}: graph {self._files[bucket]} returned shape {tuple(out.shape)}, expected {expected}; "
                "the artifact does not match its manifest: recompile it"
            )
        return out.to(device="cpu", dtype=torch.float32)

    def warmup(self, forwards: int = 1, measure: bool = True) -> dict[str, float]:
        """Every bucket in turn, whatever `forwards`: the replica's cores run one graph at a time.
        Each bucket is a graph of its own that the runtime loads on its first execution, so
        `measure=False` runs them all the same and only returns no timings."""
        seconds: dict[str, float] = {}
        for bucket in self.buckets():
            inputs = _pad_inputs(self.manifest, bucket)
            start = time.perf_counter()
            self.forward(bucket, inputs)
            seconds[str(bucket)] = time.perf_counter() - start
        return seconds if measure else {}

    def health(self) -> dict:
        return {
            "ok": True,
            "device": "neuron",
            "target": self.manifest.target,
            "cores": self.cores,
            "visible_cores_env": self.visible_cores_env,
            "pid": os.getpid(),
            "buckets": [str(b) for b in self.buckets()],
            "sdk": dict(self.sdk),
            "errors": self.errors,
        }
