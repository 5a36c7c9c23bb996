"""TEST DOUBLE -- this is NOT TorchNeuron (AWS's native PyTorch backend for Trainium).

A stand-in for TorchNeuron's `torch_neuronx` (torch-neuronx 2.14.3.0, the native line; the XLA
toolchain's stand-in is tests/doubles/torch_neuronx), used by neuronserve's tests on machines
without a Neuron device. TorchNeuron registers a `neuron` device through PyTorch's PrivateUse1
mechanism and a `neuron` backend for torch.compile; a CPU-only torch cannot hold tensors on a
device that does not exist, so while the stand-in is installed (`install()`; tests use
tests/fixtures/torchneuron_standin.py) it:

- makes `Tensor.to("neuron")` and `Module.to("neuron")` keep the tensors on the CPU, recording the
  device string asked for; without a device (`DEVICE_PATH` absent) they raise as the real device
  check would;
- makes `torch.autocast(device_type="neuron", ...)` CPU autocast, recording the dtype;
- records every `torch.compile` call (backend, dynamic, fullgraph, mode, options) and passes it on;
- registers the dynamo backend `neuron`, which records the FX graph's input shapes and the
  environment TorchNeuron reads (TORCH_NEURONX_NEFF_CACHE_DIR, NEURON_LOGICAL_NC_CONFIG,
  NEURON_CC_FLAGS, NEURON_RT_VISIBLE_CORES), then looks the graph up in the NEFF cache like the real
  persistent cache (keyed by the graph, its input signature, the LNC and the flags): a hit is
  recorded as `cache: "hit"`, a miss writes a stand-in `.neff` file and is recorded as
  `cache: "miss"` (a compile). The graph then runs eagerly on the CPU.

Records go to `CALLS` and, when `NEURONSERVE_TEST_NEURON_LOG` names a file, to it as JSON lines.
It does not compile anything or cast beyond CPU autocast: outputs are CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

NEURONSERVE_TEST_DOUBLE = True
__version__ = "2.14.3.0"
NEURONX_CC_VERSION = "2.28.7631.0"

LOG_ENV = "NEURONSERVE_TEST_NEURON_LOG"
DEVICE_PATH = "/dev/neuron0"  # tests point this at an existing file to pretend a device exists
DEFAULT_CACHE_DIR = "/tmp/neff_cache"  # TorchNeuron's default when TORCH_NEURONX_NEFF_CACHE_DIR is unset
ENV_KEYS = ("TORCH_NEURONX_NEFF_CACHE_DIR", "NEURON_LOGICAL_NC_CONFIG", "NEURON_CC_FLAGS", "NEURON_RT_VISIBLE_CORES")

CALLS: list[dict[str, Any]] = []
_installed = False
_originals: dict[str, Any] = {}


def _record(name: str, **fields: Any) -> dict[str, Any]:
    entry = {"name": name, "pid": os.getpid(), "time": time.time(), **fields}
    CALLS.append(entry)
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    return entry


def calls(name: str | None = None) -> list[dict[str, Any]]:
    return [c for c in CALLS if name is None or c["name"] == name]


def reset() -> None:
    CALLS.clear()


def _is_neuron(device: Any) -> bool:
    if isinstance(device, torch.device):
        return False  # a CPU-only torch cannot even name a neuron torch.device
    return isinstance(device, str) and (device == "neuron" or device.startswith("neuron:"))


def _split_to_args(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """The device of a `.to(...)` call and the call without it."""
    if "device" in kwargs and _is_neuron(kwargs["device"]):
        device = kwargs.pop("device")
        return device, args, kwargs
    if args and _is_neuron(args[0]):
        return args[0], args[1:], kwargs
    return None, args, kwargs


def _check_device(device: str) -> None:
    if not os.path.exists(DEVICE_PATH):
        raise RuntimeError(f"no Neuron device found ({DEVICE_PATH} absent): cannot move to {device!r}")


def _tensor_to(self, *args, **kwargs):
    device, args, kwargs = _split_to_args(args, dict(kwargs))
    if device is not None:
        _check_device(device)
        _record("tensor.to", device=device, shape=list(self.shape), dtype=str(kwargs.get("dtype", self.dtype)))
        if not args and not kwargs:
            return self
    return _originals["tensor_to"](self, *args, **kwargs)


def _module_to(self, *args, **kwargs):
    device, args, kwargs = _split_to_args(args, dict(kwargs))
    if device is not None:
        _check_device(device)
        _record("module.to", device=device, module=type(self).__name__)
        if not args and not kwargs:
            return self
    return _originals["module_to"](self, *args, **kwargs)


def _autocast(device_type: str, *args, **kwargs):
    if device_type == "neuron":
        dtype = kwargs.get("dtype", args[0] if args else torch.bfloat16)
        _record("autocast", device_type=device_type, dtype=str(dtype))
        return _originals["autocast"]("cpu", *args, **kwargs)
    return _originals["autocast"](device_type, *args, **kwargs)


def _compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None,
             disable=False):
    _record("compile", backend=backend if isinstance(backend, str) else repr(backend), dynamic=dynamic,
            fullgraph=fullgraph, mode=mode, options=options, module=type(model).__name__)
    return _originals["compile"](model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode,
                                 options=options, disable=disable)


def _neuron_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The `neuron` dynamo backend: look the graph up in the NEFF cache, else "compile" it."""
    if not _installed:
        raise RuntimeError("the neuron torch.compile backend needs TorchNeuron (torch-neuronx 2.13/2.14)")
    env = {k: os.environ.get(k) for k in ENV_KEYS}
    signature = [(list(t.shape), str(t.dtype)) for t in example_inputs if isinstance(t, torch.Tensor)]
    key = hashlib.sha256(json.dumps(
        [gm.code, signature, env["NEURON_LOGICAL_NC_CONFIG"], env["NEURON_CC_FLAGS"]], default=str
    ).encode()).hexdigest()
    cache = Path(env["TORCH_NEURONX_NEFF_CACHE_DIR"] or DEFAULT_CACHE_DIR)
    neff = cache / key[:2] / key[2:4] / f"{key}.neff"
    hit = neff.is_file()
    if not hit:
        neff.parent.mkdir(parents=True, exist_ok=True)
        neff.write_bytes(b"NEFF (torchneuron test double) " + key.encode())
    _record("neuron_backend", cache="hit" if hit else "miss", neff=str(neff), env=env, options=kwargs.get("options"),
            input_shapes=[s for s, _ in signature][:4], n_inputs=len(signature),
            autocast=torch.is_autocast_enabled("cpu"))
    return gm.forward


def install() -> None:
    """Patch torch as TorchNeuron's autoload would make it behave (see the module docstring)."""
    global _installed
    if _installed:
        return
    _originals.update(tensor_to=torch.Tensor.to, module_to=torch.nn.Module.to, autocast=torch.autocast,
                      compile=torch.compile)
    torch.Tensor.to = _tensor_to
    torch.nn.Module.to = _module_to
    torch.autocast = _autocast
    torch.compile = _compile
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "neuron" not in _COMPILER_FNS:
        register_backend(_neuron_backend, name="neuron")
    _installed = True
    _record("import", module_file=__file__)


def uninstall() -> None:
    global _installed
    if not _installed:
        return
    torch.Tensor.to = _originals["tensor_to"]
    torch.nn.Module.to = _originals["module_to"]
    torch.autocast = _originals["autocast"]
    torch.compile = _originals["compile"]
    torch._dynamo.reset()
    _installed = False


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# A replica process imports it by name (PYTHONPATH): behave as the autoloaded backend there.
if os.environ.get("NEURONSERVE_TORCHNEURON_STANDIN_AUTOINSTALL") == "1":
    install()
