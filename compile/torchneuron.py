"""The TorchNeuron side of compiling (trn2/trn3): export a bucket, compile it on the device into the
artifact's NEFF cache, and return its output for the parity check.

TorchNeuron compiles just-in-time: `torch.compile(backend="neuron")` lowers a graph the first time it
runs on the `neuron` device, so compiling needs a device. Without one, `compile --target trn2|trn3`
refuses (`require_device`) instead of writing an artifact it could not check or fill with NEFFs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from neuronserve.common import neuron_sdk
from neuronserve.common import torchneuron as tn

if TYPE_CHECKING:  # pragma: no cover
    import torch

COMPILE_DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/compile/about-torch-compile.html"


class TorchNeuronCompileError(RuntimeError):
    """Exporting or compiling a bucket with TorchNeuron failed; the message names the shapes."""


def require_device(target: str) -> None:
    """Refuse a trn2/trn3 compile on a host without a Neuron device, saying why and what to do."""
    if neuron_sdk.neuron_device_present():
        return
    raise TorchNeuronCompileError(
        f"compiling for {target} needs a Neuron device and this host has none ({neuron_sdk.NEURON_DEVICE} "
        f"absent): {target} compiles with TorchNeuron, whose torch.compile(backend=\"neuron\") compiles "
        f"just-in-time on the first call on the neuron device and measures parity there ({COMPILE_DOCS}). "
        f"Run `neuronserve compile --target {target}` on a {target} instance (e.g. as the compile Job, "
        f"k8s/compile-job, on a {target} node), or compile for inf2/trn1, whose XLA toolchain compiles on any host"
    )


def export_bucket(module: "torch.nn.Module", example: tuple["torch.Tensor", ...], path: Path) -> Path:
    """Export `module` for the exact shapes of `example` (static: one program per bucket) and save it."""
    import torch

    shapes = ", ".join(str(tuple(t.shape)) for t in example)
    try:
        program = torch.export.export(module.eval(), tuple(example), strict=False)
        torch.export.save(program, str(path))
    except Exception as e:
        raise TorchNeuronCompileError(f"torch.export failed for input shapes {shapes}: {e}") from e
    return path


def compile_bucket(
    program_path: Path,
    example: tuple["torch.Tensor", ...],
    *,
    precision: str,
    cache_dir: Path,
    lnc: int,
    flags: Sequence[str],
) -> "torch.Tensor":
    """Compile one bucket's exported program on the device (into `cache_dir`) by running it on
    `example`; returns the output on the host for the parity check."""
    neuron_sdk.import_torchneuron()  # registers the neuron device and backend (or says which toolchain is here)
    shapes = ", ".join(str(tuple(t.shape)) for t in example)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tn.toolchain_env(cache_dir, lnc, flags):
        try:
            compiled = tn.load_compiled(program_path)
            return tn.run(compiled, example, precision)
        except Exception as e:
            raise TorchNeuronCompileError(
                f"TorchNeuron failed to compile or run input shapes {shapes} (LNC {lnc}, "
                f"{tn.CC_FLAGS_ENV}={' '.join(flags)!r}): {e}; the compiler's files are under "
                f"TORCH_NEURONX_DEBUG_DIR (default /tmp/neuron_backend)"
            ) from e
