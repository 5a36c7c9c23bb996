"""The Neuron side of compiling for inf2/trn1: neuronx-cc flags and the `torch_neuronx.trace` call
(the XLA toolchain; trn2/trn3 compile with TorchNeuron, `compile.torchneuron`).

The SDK facts both compile/ and serve/ need (guarded import, versions, device check) live in
`neuronserve.common.neuron_sdk`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from neuronserve.common import neuron_sdk
from neuronserve.common.neuron_sdk import AUTO_CASTS, NATIVE_TARGETS, OPTLEVELS, XLA_TARGETS, import_torch_neuronx

if TYPE_CHECKING:  # pragma: no cover
    import torch


class NeuronCompileError(RuntimeError):
    """`torch_neuronx.trace` (neuronx-cc) failed; the message names the shapes and the work dir."""


def compiler_args(
    target: str,
    auto_cast: str = "none",
    optlevel: int = 2,
    extra: Sequence[str] = (),
    *,
    fast_loading: bool = False,
) -> list[str]:
    """neuronx-cc flags for one model, in a fixed order (they are part of the cache key).

    >>> compiler_args("inf2", "bf16", 1)
    ['--target', 'inf2', '--model-type', 'transformer', '--optlevel', '1', '--auto-cast', 'matmult', '--auto-cast-type', 'bf16']
    >>> compiler_args("trn1")
    ['--target', 'trn1', '--model-type', 'transformer', '--optlevel', '2', '--auto-cast', 'none']
    """
    if target in NATIVE_TARGETS:
        raise ValueError(
            f"{target} is not compiled with torch_neuronx.trace: PyTorch/XLA inference is unsupported on Trn2/Trn3 "
            f"from Neuron SDK 2.34, so {target} artifacts are built with TorchNeuron (compile.torchneuron); "
            f"torch_neuronx.trace targets are {', '.join(XLA_TARGETS)}"
        )
    if target not in XLA_TARGETS:
        hint = " (cpu artifacts are not compiled by neuronx-cc)" if target == "cpu" else ""
        raise ValueError(f"unknown Neuron target {target!r}{hint}: expected one of {', '.join(XLA_TARGETS)}")
    if type(optlevel) is not int or optlevel not in OPTLEVELS:
        raise ValueError(f"optlevel {optlevel!r} is not supported by neuronx-cc: expected 1, 2 or 3 (1 compiles fastest)")
    if auto_cast not in AUTO_CASTS:
        raise ValueError(f"unknown auto_cast {auto_cast!r}: expected 'none' (fp32) or 'bf16' (matmuls in bf16)")
    if isinstance(extra, str):
        raise TypeError("extra compiler flags must be a list of strings, e.g. ['--verbose', 'info'], not one string")
    args = ["--target", target, "--model-type", "transformer", "--optlevel", str(optlevel)]
    if auto_cast == "bf16":
        args += ["--auto-cast", "matmult", "--auto-cast-type", "bf16"]
    else:
        # Explicit although it is the default since SDK 2.27: the flags in the manifest then say
        # what the graph computes, whatever a given compiler release defaults to.
        args += ["--auto-cast", "none"]
    # `--enable-fast-loading-neuron-binaries` stores the NEFF uncompressed so it loads faster. It is
    # off unless asked for: it grows every bucket's file (an artifact holds one NEFF per bucket and
    # every replica pulls all of them), its effect on load time could not be measured without
    # hardware, and a replica loads its buckets once before it reports ready, so load time is not
    # on the request path. Turning it on changes the flags and therefore the cache key.
    if fast_loading:
        args.append("--enable-fast-loading-neuron-binaries")
    args += [str(a) for a in extra]
    return args


def trace_bucket(
    module: "torch.nn.Module",
    example_inputs: tuple["torch.Tensor", ...],
    *,
    compiler_args: list[str],
    workdir: Path,
    inline_weights: bool = True,
) -> "torch.jit.ScriptModule":
    """Compile `module` for the exact shapes of `example_inputs` (one bucket) with neuronx-cc.

    Without a Neuron device the compile runs with `cpu_backend=True`, which needs `--target`; the
    result still only runs on Neuron. Save the result with `torch.jit.save`. `inline_weights=False`
    keeps the weights out of the NEFF (`inline_weights_to_neff=False`): the graph is then given its
    weights at load with `share_weights`, the same copy for every bucket of the model.
    """
    tnx = import_torch_neuronx()
    args = list(compiler_args)
    cpu_backend = not neuron_sdk.neuron_device_present()
    if cpu_backend and "--target" not in args and not any(a.startswith("--target=") for a in args):
        raise ValueError(
            f"no Neuron device ({neuron_sdk.NEURON_DEVICE} absent): compiling here needs a --target flag "
            f"(one of {', '.join(XLA_TARGETS)}); build the flags with compiler_args(target, ...)"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = tuple(example_inputs)
    try:
        return tnx.trace(
            module,
            inputs,
            compiler_workdir=str(workdir),
            compiler_args=args,
            cpu_backend=cpu_backend,
            inline_weights_to_neff=inline_weights,
        )
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise NeuronCompileError(
            f"neuronx-cc failed for input shapes {shapes} with flags {' '.join(args)}: {e}; "
            f"the compiler's logs are in {workdir}"
        ) from e


def share_weights(graph: "torch.jit.ScriptModule", weights: "dict[str, torch.Tensor]") -> None:
    """Give a graph traced with `inline_weights=False` its weights: `torch_neuronx.replace_weights`,
    called with the same state dict for every bucket's graph of a model, so the host holds one copy
    (whether the runtime then keeps one copy on the device was not verified on hardware: README)."""
    tnx = import_torch_neuronx()
    tnx.replace_weights(graph, weights)
