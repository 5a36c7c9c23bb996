"""The backend contract: run one compiled bucket on one device.

A backend loads the graphs an artifact lists and runs them. It never compiles (that is
`neuronserve compile`'s job) and knows nothing of HTTP, Ray or batching.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from neuronserve.models.artifact import Bucket, Manifest, sha256_file

if TYPE_CHECKING:  # annotations only: the serve command imports this module before Ray starts, torch after
    import torch


class BackendError(Exception):
    """The backend cannot load or run: wrong target, wrong SDK, missing device or file."""


@runtime_checkable
class Backend(Protocol):
    """What the serving layer may ask of any backend; what one can do is declared here (`threads`,
    `packing`, `warmup(forwards)`), so callers never branch on `kind`."""

    kind: str  # "cpu" or "neuron": a label (metrics, model metadata), not a capability
    manifest: Manifest
    # Host threads one forward runs on (CPU), None when a device runs it (Neuron). With threads, a
    # forward may be asked to run wider (`forward(..., threads=n)`, through `Engine.run_batch`).
    threads: int | None
    # Whether batches may pack several rows per sequence (`forward_packed`).
    packing: bool

    def forward(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the graph compiled for `bucket`.

        `inputs` are int64 tensors of shape exactly (bucket.batch_size, bucket.seq_len), in the
        order of `manifest.inputs`. Returns float32 (bucket.batch_size, manifest.model.output_dim)
        on CPU: pooled (not yet normalised) embeddings for `embed`, logits for `classify`.
        A shape other than the bucket's raises BackendError.
        """
        ...

    def warmup(self, forwards: int = 1, measure: bool = True) -> dict[str, float]:
        """Run every bucket once; returns seconds of device time per bucket (keyed by
        str(bucket)), the planner's timing table. `forwards`: how many forwards the replica runs at once, so the timings are
        taken as they will run (a backend whose device runs one graph at a time runs them in turn).
        `measure=False` (the replica has a cached table, `serve.timing_cache`): run only what
        serving needs first, each graph once, and return {}."""
        ...

    def health(self) -> dict:
        """Cheap status for readiness and metrics, e.g. {"ok": True, "device": "cpu", "cores": [..]}."""
        ...


def check_bucket_file(bucket: Bucket, path: Path, sha256: str | None, what: str) -> None:
    """A bucket's `what` file ("graph file", "program file") is there and, when the manifest gives
    its sha256, matches it."""
    if not path.is_file():
        raise BackendError(f"bucket {bucket}: {what} {path} is missing; recompile the artifact")
    if sha256 and sha256_file(path) != sha256:
        raise BackendError(
            f"bucket {bucket}: {what} {path} does not match the sha256 in the manifest; "
            "the artifact was modified or copied incompletely: copy it again or recompile"
        )


def check_shape(bucket: Bucket, inputs: tuple[torch.Tensor, ...], n_inputs: int) -> None:
    if len(inputs) != n_inputs:
        raise BackendError(f"expected {n_inputs} input tensors, got {len(inputs)}")
    for t in inputs:
        if tuple(t.shape) != (bucket.batch_size, bucket.seq_len):
            raise BackendError(
                f"input shape {tuple(t.shape)} does not match bucket {bucket} "
                f"({bucket.batch_size}, {bucket.seq_len}); pad to the bucket first"
            )


def load_backend(artifact_dir: str | Path, kind: str = "auto", **options) -> Backend:
    """Load the backend an artifact's target calls for (`auto`), or the one named."""
    from neuronserve.models.artifact import load_manifest

    manifest = load_manifest(artifact_dir)
    if kind == "auto":
        kind = "cpu" if manifest.target == "cpu" else "neuron"
    if kind == "cpu":
        from neuronserve.serve.backends.cpu import CpuBackend

        return CpuBackend(artifact_dir, manifest, **options)
    if kind == "neuron":
        # Which Neuron toolchain: TorchNeuron for trn2/trn3, torch_neuronx.trace for inf2/trn1. Each
        # refuses the other's artifacts, naming both (an older trn2 artifact built by the trace among them).
        from neuronserve.common.neuron_sdk import NATIVE_TARGETS, STACK_NATIVE

        if manifest.target in NATIVE_TARGETS or manifest.neuron_stack == STACK_NATIVE:
            from neuronserve.serve.backends.torchneuron import TorchNeuronBackend

            return TorchNeuronBackend(artifact_dir, manifest, **options)
        from neuronserve.serve.backends.neuron import NeuronBackend

        return NeuronBackend(artifact_dir, manifest, **options)
    if kind == "simulated":
        from neuronserve.serve.backends.simulated import SimulatedBackend

        return SimulatedBackend(artifact_dir, manifest, **options)
    if kind == "host":  # a host process of a device replica (`--host-processes`): no graph runs here
        from neuronserve.serve.backends.host import HostBackend

        return HostBackend(artifact_dir, manifest, **options)
    raise BackendError(f"unknown backend {kind!r}: expected cpu, neuron, simulated or auto")
