"""TorchNeuron (trn2/trn3) facts compiling and serving share: the device, the environment the
toolchain reads, and turning a bucket's exported program into a compiled callable.

Everything follows the TorchNeuron documentation for Neuron 2.33/2.34 (links in docs/trainium.md):

- the model and its inputs move to the `neuron` device (`.to("neuron")`), which TorchNeuron registers
  through PyTorch's PrivateUse1 mechanism when torch loads it;
- `torch.compile(module, backend="neuron", dynamic=False, fullgraph=True)`: `dynamic=True` is
  unsupported, `fullgraph=True` turns a graph break into an error (the backend reference recommends
  it), `mode` stays the default (the only one applied) and `options` stays None (the reference
  documents no keys);
- compilation is just-in-time, on the first call with a given input signature, and lands in the
  persistent NEFF cache, `TORCH_NEURONX_NEFF_CACHE_DIR`: a bucket compiled once is a cache hit for a
  later process pointed at the same directory;
- mixed precision is `torch.autocast(device_type="neuron", dtype=torch.bfloat16)`;
- the Logical NeuronCore configuration is the runtime's `NEURON_LOGICAL_NC_CONFIG` (default 2 on
  Trn2 and later), and the compiler must use the same one;
- other neuronx-cc flags go through `NEURON_CC_FLAGS`.

Nothing here imports torch or torch_neuronx at import time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE = "neuron"
BACKEND = "neuron"
NEFF_CACHE_ENV = "TORCH_NEURONX_NEFF_CACHE_DIR"
LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"
CC_FLAGS_ENV = "NEURON_CC_FLAGS"
DEFAULT_LNC = 2  # Trn2 and Trn3: 8 physical cores per chip shown as 4 logical ones
LNC_VALUES = (1, 2)
CACHE_DIR_NAME = "neuron-cache"
NEFF_SUFFIX = ".neff"
# Keyword arguments of every torch.compile call, compile and serve alike (the NEFF cache key
# depends on the graph, so both sides must build the same one).
COMPILE_KWARGS: dict[str, Any] = {"backend": BACKEND, "dynamic": False, "fullgraph": True}


def lnc_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The LNC a compile uses: `NEURON_LOGICAL_NC_CONFIG` when set, else the default 2.

    >>> lnc_from_env({}), lnc_from_env({"NEURON_LOGICAL_NC_CONFIG": "1"})
    (2, 1)
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(LNC_ENV, "").strip()
    if not raw:
        return DEFAULT_LNC
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value not in LNC_VALUES:
        raise ValueError(f"{LNC_ENV}={raw!r} is not a Logical NeuronCore configuration: expected 1 or 2 "
                         f"(2, the default on trn2/trn3, shows 4 logical cores per chip)")
    return value


def cc_flags(optlevel: int, extra: Sequence[str] = ()) -> list[str]:
    """The neuronx-cc flags a TorchNeuron compile passes through `NEURON_CC_FLAGS`, in a fixed order
    (they are part of the cache key). The target and the LNC are not flags here: the compiler takes
    the target from the device and the LNC from `NEURON_LOGICAL_NC_CONFIG`.

    >>> cc_flags(2)
    ['--optlevel', '2']
    >>> cc_flags(1, ['--verbose', 'info'])
    ['--optlevel', '1', '--verbose', 'info']
    """
    if type(optlevel) is not int or optlevel not in (1, 2, 3):
        raise ValueError(f"optlevel {optlevel!r} is not supported by neuronx-cc: expected 1, 2 or 3 (1 compiles fastest)")
    if isinstance(extra, str):
        raise TypeError("extra compiler flags must be a list of strings, e.g. ['--verbose', 'info'], not one string")
    return ["--optlevel", str(optlevel), *(str(a) for a in extra)]


@contextlib.contextmanager
def toolchain_env(cache_dir: str | Path, lnc: int, flags: Sequence[str] | None = None) -> Iterator[None]:
    """Point TorchNeuron at `cache_dir`, LNC `lnc` and `flags` (NEURON_CC_FLAGS) inside the block;
    the previous values come back after it."""
    wanted = {NEFF_CACHE_ENV: str(cache_dir), LNC_ENV: str(lnc)}
    if flags is not None:
        wanted[CC_FLAGS_ENV] = " ".join(flags)
    previous = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def neff_files(cache_dir: str | Path) -> list[Path]:
    """The NEFFs under a cache directory (the cache shards them into subdirectories)."""
    root = Path(cache_dir)
    return sorted(p for p in root.rglob(f"*{NEFF_SUFFIX}") if p.is_file()) if root.is_dir() else []


def autocast(precision: str):
    """bf16 autocast on the neuron device for a bf16 artifact; nothing for fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=DEVICE, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_compiled(program_path: str | Path) -> Any:
    """A bucket's exported program (torch.export), on the neuron device, wrapped in torch.compile.
    Nothing compiles yet: that happens (or hits the cache) on the first call."""
    import torch

    module = torch.export.load(str(program_path)).module()
    module = module.to(DEVICE)
    return torch.compile(module, **COMPILE_KWARGS)


def run(compiled: Any, inputs: Sequence["torch.Tensor"], precision: str) -> "torch.Tensor":
    """One forward: int64 inputs to the device, the output back to the host as float32."""
    import torch

    args = tuple(t.to(device=DEVICE, dtype=torch.int64) for t in inputs)
    with torch.no_grad(), autocast(precision):
        out = compiled(*args)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(device="cpu", dtype=torch.float32)
