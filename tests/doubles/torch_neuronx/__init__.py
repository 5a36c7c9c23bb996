"""TEST DOUBLE -- this is NOT the AWS Neuron SDK.

A stand-in for `torch_neuronx`, used by neuronserve's tests on machines without Neuron hardware
(the real package only comes from AWS's Neuron pip repository and needs a Neuron device to run).
It is importable as `torch_neuronx` when `tests/doubles` is on `sys.path` / `PYTHONPATH`.

What it does:
- implements the documented signatures (SDK 2.31) exactly, keyword-only arguments included;
- `trace` checks the neuronx-cc flags like the compiler's argument parser would, requires
  `--target` with `cpu_backend=True`, refuses `cpu_backend=False` when there is no device, then
  traces on CPU with `torch.jit.trace` and returns a TorchScript module that, like a real Neuron
  graph, raises on any input shape other than the traced one. The result saves and loads with
  plain `torch.jit.save` / `torch.jit.load` and keeps `neuron_input_shapes`, `neuron_compiler_args`
  and `neuron_test_double` as attributes;
- records every call (name, arguments, shapes, compiler args, NEURON_RT_VISIBLE_CORES, pid) in
  `CALLS` and, when the environment variable `NEURONSERVE_TEST_NEURON_LOG` names a file, appends
  each record there as one JSON line, so tests can see calls made in other processes (Ray actors).
  Importing the module is recorded too (name "import"), which shows the process and cores a replica
  imported the SDK in.

It does not compile anything, cast to bf16, or touch a NeuronCore: outputs are plain CPU fp32.
"""

# No `from __future__ import annotations`: TorchScript reads the class attribute annotations below.
import contextlib
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, List

import torch

# How neuronserve's compile/neuron.py tells this double from the real SDK (no distribution metadata
# exists for it, so these attributes stand in for the installed versions it imitates: SDK 2.31).
NEURONSERVE_TEST_DOUBLE = True
__version__ = "2.9.0.2.15.32035"
NEURONX_CC_VERSION = "2.26.6360.0"

LOG_ENV = "NEURONSERVE_TEST_NEURON_LOG"
DEVICE_PATH = "/dev/neuron0"  # tests may point this at an existing file to pretend a device exists

CALLS: list[dict[str, Any]] = []

# neuronx-cc flags this double accepts: flag -> allowed values (None: any value; () : no value).
_FLAGS: dict[str, tuple[str, ...] | None] = {
    "--target": ("inf2", "trn1", "trn1n", "trn2"),
    "--model-type": ("generic", "transformer", "unet-inference"),
    "--auto-cast": ("none", "matmult", "all"),
    "--auto-cast-type": ("bf16", "fp16", "tf32", "fp8_e4m3"),
    "--optlevel": ("1", "2", "3"),
    "--enable-fast-loading-neuron-binaries": (),
    "--verbose": ("debug", "info", "warning", "error", "critical"),
    "--logfile": None,
}
_OPT_ALIASES = {"-O1": ("--optlevel", "1"), "-O2": ("--optlevel", "2"), "-O3": ("--optlevel", "3")}


def _record(name: str, **fields: Any) -> dict[str, Any]:
    entry = {
        "name": name,
        "pid": os.getpid(),
        "visible_cores": os.environ.get("NEURON_RT_VISIBLE_CORES"),
        "time": time.time(),
        **fields,
    }
    CALLS.append(entry)
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    return entry


def calls(name: str | None = None) -> list[dict[str, Any]]:
    """Recorded calls in this process, optionally only those of one function."""
    return [c for c in CALLS if name is None or c["name"] == name]


def reset() -> None:
    CALLS.clear()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record appended to a `NEURONSERVE_TEST_NEURON_LOG` file, from any process."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse_compiler_args(compiler_args: str | list[str] | tuple[str, ...] | None) -> dict[str, str]:
    if compiler_args is None:
        return {}
    if isinstance(compiler_args, str):
        tokens = shlex.split(compiler_args)
    elif isinstance(compiler_args, (list, tuple)) and all(isinstance(a, str) for a in compiler_args):
        tokens = list(compiler_args)
    else:
        raise TypeError(f"compiler_args must be a str or a list of str, got {compiler_args!r}")
    parsed: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok in _OPT_ALIASES:
            flag, value = _OPT_ALIASES[tok]
        else:
            flag, sep, value = tok.partition("=")
            if flag not in _FLAGS:
                raise RuntimeError(f"neuronx-cc: error: unrecognized arguments: {tok}")
            allowed = _FLAGS[flag]
            if allowed == ():
                if sep:
                    raise RuntimeError(f"neuronx-cc: error: argument {flag}: ignored explicit argument {value!r}")
                value = ""
            elif not sep:
                if i >= len(tokens) or tokens[i].startswith("--"):
                    raise RuntimeError(f"neuronx-cc: error: argument {flag}: expected one argument")
                value = tokens[i]
                i += 1
            if allowed and value not in allowed:
                choices = ", ".join(repr(a) for a in allowed)
                raise RuntimeError(f"neuronx-cc: error: argument {flag}: invalid choice: {value!r} (choose from {choices})")
        parsed[flag] = value
    return parsed


def _check_shape(x: torch.Tensor, expected: List[int], index: int) -> None:
    if x.shape != expected:
        raise RuntimeError(
            "Neuron graph input "
            + str(index)
            + " has shape "
            + str(x.shape)
            + " but the graph was traced with shape "
            + str(expected)
            + "; every input shape is fixed at trace time"
        )


# TorchScript cannot script `*inputs`, so there is one wrapper per input count (encoders take 1-4).
class _Static1(torch.nn.Module):
    neuron_input_shapes: List[List[int]]
    neuron_compiler_args: List[str]
    neuron_test_double: bool
    neuron_separated_weights: bool

    def __init__(self, graph: torch.jit.ScriptModule, shapes: List[List[int]], args: List[str],
                 separated: bool = False) -> None:
        super().__init__()
        self.graph = graph
        self.neuron_input_shapes = shapes
        self.neuron_compiler_args = args
        self.neuron_test_double = True
        self.neuron_separated_weights = separated

    def forward(self, x0: torch.Tensor):
        _check_shape(x0, self.neuron_input_shapes[0], 0)
        return self.graph(x0)


class _Static2(_Static1):
    def forward(self, x0: torch.Tensor, x1: torch.Tensor):
        _check_shape(x0, self.neuron_input_shapes[0], 0)
        _check_shape(x1, self.neuron_input_shapes[1], 1)
        return self.graph(x0, x1)


class _Static3(_Static1):
    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor):
        _check_shape(x0, self.neuron_input_shapes[0], 0)
        _check_shape(x1, self.neuron_input_shapes[1], 1)
        _check_shape(x2, self.neuron_input_shapes[2], 2)
        return self.graph(x0, x1, x2)


class _Static4(_Static1):
    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor):
        _check_shape(x0, self.neuron_input_shapes[0], 0)
        _check_shape(x1, self.neuron_input_shapes[1], 1)
        _check_shape(x2, self.neuron_input_shapes[2], 2)
        _check_shape(x3, self.neuron_input_shapes[3], 3)
        return self.graph(x0, x1, x2, x3)


_WRAPPERS = {1: _Static1, 2: _Static2, 3: _Static3, 4: _Static4}


def trace(
    func,
    example_inputs,
    *,
    input_output_aliases={},  # noqa: B006 - the documented default
    compiler_workdir=None,
    compiler_args=None,
    partitioner_config=None,
    inline_weights_to_neff=True,
    cpu_backend=False,
) -> torch.jit.ScriptModule:
    """Stand-in for `torch_neuronx.trace`: validate like the SDK, trace on CPU, fix the shapes."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    if len(inputs) not in _WRAPPERS:
        raise NotImplementedError(f"the torch_neuronx test double supports 1-4 inputs, got {len(inputs)}")
    _record(
        "trace",
        shapes=[list(t.shape) for t in inputs],
        dtypes=[str(t.dtype) for t in inputs],
        compiler_args=compiler_args if isinstance(compiler_args, (str, type(None))) else list(compiler_args),
        compiler_workdir=compiler_workdir,
        cpu_backend=cpu_backend,
        inline_weights_to_neff=inline_weights_to_neff,
        input_output_aliases=repr(input_output_aliases),
        partitioner_config=repr(partitioner_config),
    )
    flags = _parse_compiler_args(compiler_args)
    if cpu_backend and "--target" not in flags:
        raise RuntimeError("cpu_backend=True needs a --target compiler flag (inf2, trn1, trn1n or trn2)")
    if not cpu_backend and not os.path.exists(DEVICE_PATH):
        raise RuntimeError(
            f"no Neuron device found ({DEVICE_PATH} absent): nrt_init failed; "
            "compile with cpu_backend=True and a --target flag on a host without a device"
        )
    if compiler_workdir is not None:
        workdir = Path(compiler_workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "command.txt").write_text(
            "neuronx-cc compile (torch_neuronx test double) "
            + " ".join(shlex.quote(a) for a in _flag_list(compiler_args))
            + "\n"
        )
    if isinstance(func, torch.nn.Module):
        func = func.eval()
    with torch.no_grad():
        graph = torch.jit.trace(func, inputs, check_trace=False)
    wrapper = _WRAPPERS[len(inputs)](graph, [list(t.shape) for t in inputs], _flag_list(compiler_args),
                                     not inline_weights_to_neff)
    return torch.jit.script(wrapper)


def replace_weights(neuron_model, weights) -> None:
    """Stand-in for `torch_neuronx.replace_weights(neuron_model, weights)`: `weights` is a module or
    a state dict. Like the SDK, it warns when the model holds no separated weights (traced with
    `inline_weights_to_neff=True`); otherwise it copies each matching tensor into the graph's own,
    in place, and records the call (how many tensors matched, and the ids of the tensors given, so
    tests can see every bucket was given the same copy)."""
    import warnings

    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    separated = bool(getattr(neuron_model, "neuron_separated_weights", False))
    own = {k[len("graph."):] if k.startswith("graph.") else k: v for k, v in neuron_model.state_dict().items()}
    matched = [k for k in state if k in own]
    _record("replace_weights", module=_name(neuron_model), separated=separated, tensors=len(state),
            matched=len(matched), weights_id=id(weights))
    if not separated:
        warnings.warn("replace_weights: the supplied Neuron model does not contain any separated weights")
        return
    with torch.no_grad():
        for k in matched:
            own[k].copy_(state[k])


def _flag_list(compiler_args) -> list[str]:
    if compiler_args is None:
        return []
    return shlex.split(compiler_args) if isinstance(compiler_args, str) else [str(a) for a in compiler_args]


def _name(module: Any) -> str:
    return type(module).__name__


def dynamic_batch(neuron_script):
    """Recorder: the real one splits/pads dim 0 to the traced batch size at run time."""
    _record("dynamic_batch", module=_name(neuron_script))
    return neuron_script


class DataParallel(torch.nn.Module):
    """Recorder: the real one replicates a traced model over the visible cores of one process."""

    def __init__(self, module, device_ids=None, dim=0, set_dynamic_batching=True) -> None:
        super().__init__()
        self.module = module
        self.device_ids = device_ids
        self.dim = dim
        self.dynamic_batching = set_dynamic_batching
        _record("DataParallel", module=_name(module), device_ids=device_ids, dim=dim,
                set_dynamic_batching=set_dynamic_batching)

    def forward(self, *inputs):
        return self.module(*inputs)


def lazy_load(trace, enable_lazy_load=True):
    _record("lazy_load", module=_name(trace), enable_lazy_load=enable_lazy_load)


def async_load(trace, enable_async_load=True):
    _record("async_load", module=_name(trace), enable_async_load=enable_async_load)


def set_neuron_cores(trace, start_nc=-1, nc_count=-1):
    _record("set_neuron_cores", module=_name(trace), start_nc=start_nc, nc_count=nc_count)


def set_multicore(trace):
    _record("set_multicore", module=_name(trace))


@contextlib.contextmanager
def neuron_cores_context(start_nc=-1, nc_count=-1):
    _record("neuron_cores_context", start_nc=start_nc, nc_count=nc_count)
    yield


@contextlib.contextmanager
def multicore_context():
    _record("multicore_context")
    yield


_record("import", module_file=__file__)
