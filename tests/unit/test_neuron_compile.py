"""compile/neuron.py and common/neuron_sdk.py against the torch_neuronx stand-in (a test double; no Neuron hardware here)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from neuronserve.common import neuron_sdk as neuron
from neuronserve.common.neuron_sdk import NeuronSDKMissing, describe_sdk, import_torch_neuronx, sdk_mismatch, sdk_versions
from neuronserve.compile.neuron import NeuronCompileError, compiler_args, trace_bucket
from tests.fixtures.neuron_standin import standin_installed, toy_module

INSTALL = "pip install --extra-index-url https://pip.repos.neuron.amazonaws.com 'neuronserve[neuron]'"
SDK_231 = {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "2.26.6360.0", "neuron_sdk": "2.31"}


@pytest.fixture
def tnx():
    with standin_installed() as module:
        yield module


@pytest.fixture
def no_device(monkeypatch, tmp_path):
    monkeypatch.setattr(neuron, "NEURON_DEVICE", tmp_path / "no-such-device")


@pytest.fixture
def fake_device(monkeypatch, tmp_path, tnx):
    dev = tmp_path / "neuron0"
    dev.write_text("")
    monkeypatch.setattr(neuron, "NEURON_DEVICE", dev)
    monkeypatch.setattr(tnx, "DEVICE_PATH", str(dev))
    return dev


def example(batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randint(1, 64, (batch, seq), generator=g),
        torch.ones(batch, seq, dtype=torch.long),
        torch.zeros(batch, seq, dtype=torch.long),
    )


# --- compiler_args ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, auto_cast, optlevel, expected",
    [
        ("inf2", "none", 2, ["--target", "inf2", "--model-type", "transformer", "--optlevel", "2", "--auto-cast", "none"]),
        ("trn1", "none", 1, ["--target", "trn1", "--model-type", "transformer", "--optlevel", "1", "--auto-cast", "none"]),
        (
            "inf2", "bf16", 2,
            ["--target", "inf2", "--model-type", "transformer", "--optlevel", "2",
             "--auto-cast", "matmult", "--auto-cast-type", "bf16"],
        ),
        (
            "trn1", "bf16", 3,
            ["--target", "trn1", "--model-type", "transformer", "--optlevel", "3",
             "--auto-cast", "matmult", "--auto-cast-type", "bf16"],
        ),
    ],
)
def test_compiler_args_exact(target, auto_cast, optlevel, expected):
    assert compiler_args(target, auto_cast, optlevel) == expected


def test_compiler_args_defaults_and_extra():
    assert compiler_args("inf2") == compiler_args("inf2", "none", 2)
    args = compiler_args("inf2", extra=["--verbose", "info"])
    assert args[-2:] == ["--verbose", "info"]
    assert "--enable-fast-loading-neuron-binaries" not in compiler_args("inf2")
    fast = compiler_args("inf2", fast_loading=True)
    assert fast == compiler_args("inf2") + ["--enable-fast-loading-neuron-binaries"]


@pytest.mark.parametrize("target", ["cpu", "inf1", "trn1n", "INF2", ""])
def test_compiler_args_rejects_target(target):
    with pytest.raises(ValueError, match="expected one of inf2, trn1$") as e:
        compiler_args(target)
    assert repr(target) in str(e.value)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_compiler_args_send_trn2_and_trn3_to_torchneuron(target):
    """PyTorch/XLA inference is unsupported on Trn2/Trn3 from SDK 2.34: no trace flags for them."""
    with pytest.raises(ValueError, match=f"{target} is not compiled with torch_neuronx.trace.*TorchNeuron"):
        compiler_args(target)


@pytest.mark.parametrize("optlevel", [0, 4, -1, True, "2", 2.0])
def test_compiler_args_rejects_optlevel(optlevel):
    with pytest.raises(ValueError, match="expected 1, 2 or 3"):
        compiler_args("inf2", optlevel=optlevel)


def test_compiler_args_rejects_auto_cast_and_string_extra():
    with pytest.raises(ValueError, match="'fp16'"):
        compiler_args("inf2", auto_cast="fp16")
    with pytest.raises(TypeError, match="list of strings"):
        compiler_args("inf2", extra="--verbose info")


def test_compiler_args_accepted_by_standin_compiler(tnx, no_device, tmp_path):
    # Every flag we generate must pass the documented flag set the stand-in enforces.
    for target in ("inf2", "trn1"):
        for cast in ("none", "bf16"):
            args = compiler_args(target, cast, 1, fast_loading=True)
            trace_bucket(toy_module(), example(), compiler_args=args, workdir=tmp_path / f"{target}-{cast}")
    assert len(tnx.calls("trace")) == 4


# --- trace_bucket ----------------------------------------------------------------------------


def test_trace_bucket_without_device_uses_cpu_backend_and_target(tnx, no_device, tmp_path, monkeypatch):
    seen = {}
    real_trace = tnx.trace

    def spy(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(tnx, "trace", spy)
    args = compiler_args("inf2", optlevel=1)
    graph = trace_bucket(toy_module(), example(2, 8), compiler_args=args, workdir=tmp_path / "wd")

    # Module and example inputs positional; everything else by keyword, as documented.
    assert len(seen["args"]) == 2
    assert set(seen["kwargs"]) == {"compiler_workdir", "compiler_args", "cpu_backend", "inline_weights_to_neff"}
    (call,) = tnx.calls("trace")
    assert call["cpu_backend"] is True
    assert call["compiler_args"] == args
    assert call["compiler_args"][:2] == ["--target", "inf2"]
    assert call["compiler_workdir"] == str(tmp_path / "wd")
    assert call["shapes"] == [[2, 8], [2, 8], [2, 8]]
    assert call["dtypes"] == ["torch.int64"] * 3
    assert call["inline_weights_to_neff"] is True
    assert (tmp_path / "wd").is_dir()
    assert isinstance(graph, torch.jit.ScriptModule)


def test_trace_bucket_with_device_compiles_for_it(tnx, fake_device, tmp_path):
    trace_bucket(toy_module(), example(), compiler_args=compiler_args("trn1"), workdir=tmp_path)
    (call,) = tnx.calls("trace")
    assert call["cpu_backend"] is False


def test_trace_bucket_without_device_needs_target(tnx, no_device, tmp_path):
    with pytest.raises(ValueError, match="needs a --target flag"):
        trace_bucket(toy_module(), example(), compiler_args=["--model-type", "transformer"], workdir=tmp_path)
    assert tnx.calls("trace") == []


def test_trace_bucket_arguments_are_keyword_only(tnx, no_device, tmp_path):
    with pytest.raises(TypeError):
        trace_bucket(toy_module(), example(), compiler_args("inf2"), tmp_path)  # type: ignore[misc]


def test_trace_bucket_wraps_compiler_failure(tnx, no_device, tmp_path):
    with pytest.raises(NeuronCompileError) as e:
        trace_bucket(toy_module(), example(), compiler_args=compiler_args("inf2", extra=["--bogus"]), workdir=tmp_path / "wd")
    msg = str(e.value)
    assert "unrecognized arguments: --bogus" in msg
    assert "(2, 8)" in msg and str(tmp_path / "wd") in msg


def test_traced_graph_is_static_and_round_trips(tnx, no_device, tmp_path):
    module = toy_module()
    inputs = example(2, 8)
    graph = trace_bucket(module, inputs, compiler_args=compiler_args("inf2"), workdir=tmp_path / "wd")
    path = tmp_path / "g.pt"
    torch.jit.save(graph, str(path))
    loaded = torch.jit.load(str(path))  # plain torch: a TorchScript file
    torch.testing.assert_close(loaded(*inputs), module(*inputs))
    assert loaded.neuron_input_shapes == [[2, 8]] * 3
    assert loaded.neuron_compiler_args == compiler_args("inf2")
    with pytest.raises(Exception, match="fixed at trace time"):
        loaded(*example(1, 8))
    with pytest.raises(Exception, match="fixed at trace time"):
        loaded(*example(2, 16))


# --- the guarded import ----------------------------------------------------------------------


def test_missing_sdk_names_the_install_command(monkeypatch, no_device, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # import fails as if absent
    monkeypatch.setattr(neuron, "_dist_version", lambda name: None)
    with pytest.raises(NeuronSDKMissing) as e:
        import_torch_neuronx()
    assert str(e.value).startswith("torch-neuronx is not installed")
    assert INSTALL in str(e.value) and "2.31" in str(e.value)
    with pytest.raises(NeuronSDKMissing, match="not installed"):
        trace_bucket(toy_module(), example(), compiler_args=compiler_args("inf2"), workdir=tmp_path)
    with pytest.raises(NeuronSDKMissing):
        sdk_versions()


def test_pypi_placeholder_module_without_trace(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", types.ModuleType("torch_neuronx"))
    monkeypatch.setattr(neuron, "_dist_version", lambda name: "1.0" if name == "torch-neuronx" else None)
    with pytest.raises(NeuronSDKMissing) as e:
        import_torch_neuronx()
    msg = str(e.value)
    assert "torch-neuronx 1.0" in msg and "placeholder" in msg and INSTALL in msg


def test_pypi_placeholder_distribution_without_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)
    monkeypatch.setattr(neuron, "_dist_version", lambda name: "1.0" if name == "torch-neuronx" else None)
    with pytest.raises(NeuronSDKMissing, match="torch-neuronx 1.0 is installed.*placeholder"):
        import_torch_neuronx()


def test_import_returns_the_standin(tnx):
    assert import_torch_neuronx() is tnx
    assert tnx.NEURONSERVE_TEST_DOUBLE is True
    assert "TEST DOUBLE" in tnx.__doc__


# --- SDK versions ----------------------------------------------------------------------------


def test_sdk_versions_of_the_standin(tnx):
    assert sdk_versions() == {**SDK_231, "neuron_test_double": "true"}


def test_sdk_versions_from_installed_distributions(tnx, monkeypatch):
    dists = {"torch-neuronx": "2.9.0.2.15.32035", "neuronx-cc": "2.26.6360.0"}
    monkeypatch.setattr(neuron, "_dist_version", dists.get)
    assert sdk_versions() == SDK_231  # real distributions: no test-double flag
    dists["neuronx-cc"] = "2.28.7631.0"  # same torch-neuronx, another compiler: not 2.31
    assert sdk_versions() == {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "2.28.7631.0", "neuron_sdk": "unknown"}


def test_sdk_mismatch():
    assert sdk_mismatch(SDK_231, dict(SDK_231)) is None
    older = {"torch_neuronx": "2.9.0.2.14.1", "neuronx_cc": "2.25.3371.0", "neuron_sdk": "unknown"}
    msg = sdk_mismatch(older, SDK_231)
    assert "2.9.0.2.14.1" in msg and "2.25.3371.0" in msg and "2.9.0.2.15.32035" in msg and "2.26.6360.0" in msg
    assert sdk_mismatch({**SDK_231, "neuron_test_double": "true"}, SDK_231) is not None
    assert "test stand-in" in describe_sdk({**SDK_231, "neuron_test_double": "true"})
    assert sdk_mismatch({"torch": "2.9.0"}, SDK_231) == "the artifact records no Neuron SDK versions"
    # A serving host without the compiler is compared on torch-neuronx alone.
    no_cc = {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "not installed", "neuron_sdk": "unknown"}
    assert sdk_mismatch(SDK_231, no_cc) is None
    assert "2.9.0.2.14.1" in sdk_mismatch(older, no_cc)


def test_sdk_versions_without_compiler(tnx, monkeypatch):
    monkeypatch.setattr(neuron, "_dist_version", {"torch-neuronx": "2.9.0.2.15.32035"}.get)
    assert sdk_versions() == {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "not installed", "neuron_sdk": "unknown"}


def test_neuron_device_present(monkeypatch, tmp_path):
    monkeypatch.setattr(neuron, "NEURON_DEVICE", tmp_path / "neuron0")
    assert neuron.neuron_device_present() is False
    (tmp_path / "neuron0").write_text("")
    assert neuron.neuron_device_present() is True


# --- the stand-in itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--target", "inf1"], "invalid choice: 'inf1'"),
        (["--target=inf2", "--auto-cast", "matmul"], "invalid choice: 'matmul'"),
        (["--target", "inf2", "--auto-cast-type", "int8"], "invalid choice: 'int8'"),
        (["--target", "inf2", "--optlevel"], "expected one argument"),
        (["--target", "inf2", "--fast"], "unrecognized arguments: --fast"),
    ],
)
def test_standin_validates_flags_like_the_compiler(tnx, bad, message):
    with pytest.raises(RuntimeError, match=message):
        tnx.trace(toy_module(), example(), compiler_args=bad, cpu_backend=True)


def test_standin_signature_and_device_rules(tnx, tmp_path, monkeypatch):
    monkeypatch.setattr(tnx, "DEVICE_PATH", str(tmp_path / "none"))
    with pytest.raises(TypeError):
        tnx.trace(toy_module(), example(), None, str(tmp_path))  # keyword-only after example_inputs
    with pytest.raises(RuntimeError, match="needs a --target"):
        tnx.trace(toy_module(), example(), compiler_args="--model-type transformer", cpu_backend=True)
    with pytest.raises(RuntimeError, match="no Neuron device"):
        tnx.trace(toy_module(), example(), compiler_args="--target inf2")
    graph = tnx.trace(toy_module(), example(), compiler_args="--target inf2 -O1", cpu_backend=True)
    assert graph.neuron_compiler_args == ["--target", "inf2", "-O1"]


def test_standin_records_to_log_file(tnx, tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("NEURONSERVE_TEST_NEURON_LOG", str(log))
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "3")
    graph = tnx.trace(toy_module(), example(), compiler_args=["--target", "trn1"], cpu_backend=True)
    tnx.set_neuron_cores(graph, start_nc=3, nc_count=1)
    tnx.lazy_load(graph)
    tnx.async_load(graph)
    tnx.set_multicore(graph)
    assert tnx.dynamic_batch(graph) is graph
    dp = tnx.DataParallel(graph, device_ids=[0, 1], set_dynamic_batching=False)
    torch.testing.assert_close(dp(*example()), graph(*example()))
    with tnx.neuron_cores_context(start_nc=0, nc_count=2):
        pass
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["name"] for r in records] == [
        "trace", "set_neuron_cores", "lazy_load", "async_load", "set_multicore", "dynamic_batch", "DataParallel",
        "neuron_cores_context",
    ]
    assert all(r["visible_cores"] == "3" for r in records)
    assert records[1]["start_nc"] == 3 and records[6]["device_ids"] == [0, 1]
    assert tnx.read_log(log) == records
    assert [c["name"] for c in tnx.calls()] == [r["name"] for r in records]
