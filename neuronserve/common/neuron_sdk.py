"""Facts about the Neuron SDK that compiling and serving share: the guarded `torch_neuronx` import,
the device check, the SDK release table and the toolchain versions an artifact records.

Two Neuron toolchains share the pip name `torch-neuronx` and the import name `torch_neuronx`:

- the XLA one (PyTorch NeuronX, `torch_neuronx.trace`, torch 2.9, torch-neuronx 2.9.x): inf2 and
  trn1, extra `neuron`, SDK 2.31 (the last release that built it);
- TorchNeuron, the native PyTorch backend (a PrivateUse1 `neuron` device,
  `torch.compile(backend="neuron")`, torch 2.13/2.14, torch-neuronx 2.13.x/2.14.x): trn2 and trn3,
  extra `trainium`, SDK 2.33 on (docs/trainium.md).

They are told apart by the version line (`stack_of_version`), never by what imports: the wrong one
is refused with a message naming both. `torch_neuronx` is imported only inside functions, so this
module imports on any machine. Tests run it against the stand-ins in `tests/doubles/torch_neuronx`
(XLA) and `tests/doubles/torchneuron/torch_neuronx` (TorchNeuron).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType

# Which toolchain compiles and serves which target: inf2/trn1 stay on the XLA path; trn2/trn3 are
# TorchNeuron's (PyTorch/XLA inference on Trn2/Trn3 is unsupported from SDK 2.34).
XLA_TARGETS: tuple[str, ...] = ("inf2", "trn1")
NATIVE_TARGETS: tuple[str, ...] = ("trn2", "trn3")
NEURON_TARGETS: tuple[str, ...] = XLA_TARGETS + NATIVE_TARGETS
STACK_XLA = "xla"
STACK_NATIVE = "torchneuron"
# The torch-neuronx version lines (major.minor) of each toolchain, from the release notes: XLA
# 2.9.0.2.x (PyTorch 2.9); TorchNeuron 2.13.3.0.* and 2.14.3.0.* (PyTorch 2.13 and 2.14).
STACK_VERSION_LINES: dict[str, tuple[str, ...]] = {STACK_XLA: ("2.9",), STACK_NATIVE: ("2.13", "2.14")}
AUTO_CASTS: tuple[str, ...] = ("none", "bf16")
OPTLEVELS: tuple[int, ...] = (1, 2, 3)

# The device node of the first Neuron device; a module constant so tests can point it elsewhere.
NEURON_DEVICE = Path("/dev/neuron0")

SDK_RELEASE = "2.31"
NEURON_INDEX_URL = "https://pip.repos.neuron.amazonaws.com"
INSTALL_HINT = (
    f"install the Neuron SDK {SDK_RELEASE} toolchain: "
    f"pip install --extra-index-url {NEURON_INDEX_URL} 'neuronserve[neuron]'"
)
NATIVE_SDK_RELEASE = "2.33"
NATIVE_INSTALL_HINT = (
    f"install TorchNeuron (Neuron SDK {NATIVE_SDK_RELEASE} or later, Python 3.12+): "
    f"pip install --extra-index-url {NEURON_INDEX_URL} 'neuronserve[trainium]'"
)
# One phrase per toolchain, for messages that must name both.
STACK_NAMES: dict[str, str] = {
    STACK_XLA: "the XLA toolchain (torch-neuronx 2.9.x, torch 2.9, `torch_neuronx.trace`; inf2/trn1; "
               "extra `neuronserve[neuron]`)",
    STACK_NATIVE: "TorchNeuron, the native PyTorch backend (torch-neuronx 2.13.x/2.14.x, torch 2.13/2.14, "
                  "`torch.compile(backend=\"neuron\")`; trn2/trn3; extra `neuronserve[trainium]`)",
}

# Which Neuron SDK release a (torch-neuronx, neuronx-cc) pair belongs to, from the release notes'
# component index. The pair, not torch-neuronx alone, names the release: the same torch-neuronx
# 2.9.0.2.15.32035 is listed as the current PyTorch NeuronX in more than one release while the
# compiler that writes the NEFF changes. A pair missing here is reported as release "unknown";
# the exact package versions are recorded either way and are what a loader compares.
SDK_RELEASES: dict[tuple[str, str], str] = {
    ("2.9.0.2.15.32035", "2.26.6360.0"): "2.31",
}
# TorchNeuron wheels are named by their package family (torch-neuronx 2.14.3.0.*, one wheel per
# PyTorch and Python pair), so the family prefix names the release (release notes, Neuron 2.33.0).
NATIVE_SDK_RELEASES: dict[str, str] = {"2.13.3.0": "2.33", "2.14.3.0": "2.33"}

# Keys of `sdk_versions()`; the ones a loader compares are the package versions and the double flag.
KEY_TORCH_NEURONX = "torch_neuronx"
KEY_NEURONX_CC = "neuronx_cc"
KEY_SDK = "neuron_sdk"
KEY_TEST_DOUBLE = "neuron_test_double"
KEY_STACK = "neuron_stack"
COMPARED_KEYS: tuple[str, ...] = (KEY_TORCH_NEURONX, KEY_NEURONX_CC, KEY_TEST_DOUBLE)
NOT_INSTALLED = "not installed"


class NeuronSDKMissing(RuntimeError):
    """torch-neuronx is not importable here, or what is installed is PyPI's empty placeholder."""


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_torch_neuronx() -> "ModuleType":
    """Import `torch_neuronx` or raise `NeuronSDKMissing` with the install command.

    PyPI's `torch-neuronx` (1.0) is an empty name placeholder: `pip install torch-neuronx` without
    the Neuron repository "succeeds" and leaves either nothing importable or a module without
    `trace`. Both are told apart from a plain absence so the fix is clear.
    """
    try:
        import torch_neuronx
    except ImportError as e:
        installed = _dist_version("torch-neuronx")
        if installed is not None and (e.name in (None, "torch_neuronx")):
            raise NeuronSDKMissing(
                f"torch-neuronx {installed} is installed but has no importable torch_neuronx module: "
                f"it is PyPI's empty placeholder, not the AWS Neuron SDK; uninstall it and {INSTALL_HINT}"
            ) from e
        if e.name not in (None, "torch_neuronx"):
            # torch_neuronx exists but one of its own dependencies does not (e.g. libneuronxla).
            raise NeuronSDKMissing(
                f"torch_neuronx is installed but cannot be imported ({e}); the Neuron toolchain is "
                f"incomplete: {INSTALL_HINT}"
            ) from e
        raise NeuronSDKMissing(f"torch-neuronx is not installed; {INSTALL_HINT}") from e
    version = installed_torch_neuronx_version(torch_neuronx)
    if stack_of_version(version) == STACK_NATIVE:
        raise NeuronSDKMissing(wrong_stack_message(f"the installed torch-neuronx {version}", STACK_NATIVE, STACK_XLA))
    if not callable(getattr(torch_neuronx, "trace", None)):
        installed = _dist_version("torch-neuronx") or getattr(torch_neuronx, "__version__", "?")
        raise NeuronSDKMissing(
            f"the installed torch-neuronx {installed} has no `trace`: it is PyPI's empty placeholder, "
            f"not the AWS Neuron SDK; uninstall it and {INSTALL_HINT}"
        )
    return torch_neuronx


def stack_of_version(version: str | None) -> str | None:
    """Which toolchain a torch-neuronx version belongs to, by its major.minor line; None if neither.

    >>> stack_of_version("2.9.0.2.15.32035"), stack_of_version("2.14.3.0.1234"), stack_of_version("1.0")
    ('xla', 'torchneuron', None)
    """
    if not version:
        return None
    line = ".".join(str(version).split(".")[:2])
    for stack, lines in STACK_VERSION_LINES.items():
        if line in lines:
            return stack
    return None


def stack_of_target(target: str) -> str | None:
    """The toolchain a target is compiled and served with; None for cpu.

    >>> stack_of_target("inf2"), stack_of_target("trn2"), stack_of_target("cpu")
    ('xla', 'torchneuron', None)
    """
    if target in XLA_TARGETS:
        return STACK_XLA
    if target in NATIVE_TARGETS:
        return STACK_NATIVE
    return None


def artifact_stack(target: str, recorded_stack: str | None, versions: Mapping[str, str]) -> str | None:
    """The toolchain an artifact was built with: what its manifest says, else (manifests written
    before the field existed, all by the XLA path, trn2 included) what its torch-neuronx version says.

    >>> artifact_stack("trn2", None, {"torch_neuronx": "2.9.0.2.15.32035"})
    'xla'
    >>> artifact_stack("trn2", "torchneuron", {})
    'torchneuron'
    """
    if recorded_stack:
        return recorded_stack
    by_version = stack_of_version(versions.get(KEY_TORCH_NEURONX))
    if by_version is not None:
        return by_version
    return STACK_XLA if target in NEURON_TARGETS else None


def wrong_stack_message(what: str, has: str, needs: str) -> str:
    """`what` is built for / is toolchain `has` where `needs` is required; names both and the fix."""
    fix = NATIVE_INSTALL_HINT if needs == STACK_NATIVE else INSTALL_HINT
    return (f"{what} is {STACK_NAMES[has]}, but this needs {STACK_NAMES[needs]}; the two are different "
            f"toolchains under the same pip name and neither loads the other's artifacts: {fix}")


def installed_torch_neuronx_version(module: "ModuleType") -> str:
    """The installed torch-neuronx version: its distribution's, else the module's `__version__`."""
    return _dist_version("torch-neuronx") or str(getattr(module, "__version__", "unknown"))


def import_torchneuron() -> "ModuleType":
    """Import TorchNeuron (`torch_neuronx` 2.13.x/2.14.x) or raise `NeuronSDKMissing` naming both
    toolchains. TorchNeuron registers the `neuron` device and the `neuron` torch.compile backend
    when torch loads it (autoload); importing it here makes that happen before either is used."""
    try:
        import torch_neuronx
    except ImportError as e:
        installed = _dist_version("torch-neuronx")
        if installed is not None and stack_of_version(installed) == STACK_XLA:
            raise NeuronSDKMissing(wrong_stack_message(f"the installed torch-neuronx {installed}", STACK_XLA,
                                                       STACK_NATIVE)) from e
        if installed is not None and e.name in (None, "torch_neuronx"):
            raise NeuronSDKMissing(
                f"torch-neuronx {installed} is installed but has no importable torch_neuronx module: it is "
                f"PyPI's empty placeholder, not the AWS Neuron SDK; uninstall it and {NATIVE_INSTALL_HINT}"
            ) from e
        if e.name not in (None, "torch_neuronx"):
            raise NeuronSDKMissing(f"torch_neuronx is installed but cannot be imported ({e}); "
                                   f"the TorchNeuron install is incomplete: {NATIVE_INSTALL_HINT}") from e
        raise NeuronSDKMissing(f"TorchNeuron (torch-neuronx 2.13.x/2.14.x) is not installed; {NATIVE_INSTALL_HINT}") from e
    version = installed_torch_neuronx_version(torch_neuronx)
    stack = stack_of_version(version)
    if stack == STACK_XLA:
        raise NeuronSDKMissing(wrong_stack_message(f"the installed torch-neuronx {version}", STACK_XLA, STACK_NATIVE))
    if stack is None:
        raise NeuronSDKMissing(
            f"the installed torch-neuronx {version} is neither TorchNeuron (2.13.x/2.14.x) nor the XLA "
            f"toolchain (2.9.x); it may be PyPI's empty placeholder: uninstall it and {NATIVE_INSTALL_HINT}"
        )
    return torch_neuronx


def torchneuron_versions() -> dict[str, str]:
    """TorchNeuron's toolchain here, for the manifest and the load-time check: torch-neuronx,
    neuronx-cc (when installed), the release, the stack, and the test-double flag as `sdk_versions()`
    sets it (torch itself is pinned by the torch-neuronx package family and recorded with the
    other libraries)."""
    tnx = import_torchneuron()
    version = _dist_version("torch-neuronx")
    test_double = False
    if version is None:
        version = str(getattr(tnx, "__version__", "unknown"))
        test_double = bool(getattr(tnx, "NEURONSERVE_TEST_DOUBLE", False))
    cc = _dist_version("neuronx-cc") or (str(getattr(tnx, "NEURONX_CC_VERSION", NOT_INSTALLED)) if test_double
                                         else NOT_INSTALLED)
    family = ".".join(version.split(".")[:4])
    versions = {
        KEY_TORCH_NEURONX: version,
        KEY_NEURONX_CC: cc,
        KEY_SDK: NATIVE_SDK_RELEASES.get(family, "unknown"),
        KEY_STACK: STACK_NATIVE,
    }
    if test_double:
        versions[KEY_TEST_DOUBLE] = "true"
    return versions


def neuron_device_present() -> bool:
    """True when this host has a Neuron device (`/dev/neuron0`)."""
    return NEURON_DEVICE.exists()


def sdk_versions() -> dict[str, str]:
    """The Neuron toolchain installed here, for the manifest and for the load-time check.

    Versions come from the installed distributions (importlib.metadata). A `torch_neuronx` module
    with no distribution behind it is either a source checkout (its `__version__` is used) or the
    test stand-in, which says so with `NEURONSERVE_TEST_DOUBLE = True`; then the result carries
    `neuron_test_double: "true"`, so an artifact built with the stand-in never loads on a real SDK.

    Raises NeuronSDKMissing when torch-neuronx is not importable.
    """
    tnx = import_torch_neuronx()
    torch_neuronx_version = _dist_version("torch-neuronx")
    neuronx_cc_version = _dist_version("neuronx-cc")
    test_double = False
    if torch_neuronx_version is None:
        test_double = bool(getattr(tnx, "NEURONSERVE_TEST_DOUBLE", False))
        torch_neuronx_version = str(getattr(tnx, "__version__", "unknown"))
        if neuronx_cc_version is None and test_double:
            neuronx_cc_version = str(getattr(tnx, "NEURONX_CC_VERSION", "unknown"))
    if neuronx_cc_version is None:
        neuronx_cc_version = NOT_INSTALLED
    versions = {
        KEY_TORCH_NEURONX: torch_neuronx_version,
        KEY_NEURONX_CC: neuronx_cc_version,
        KEY_SDK: SDK_RELEASES.get((torch_neuronx_version, neuronx_cc_version), "unknown"),
    }
    if test_double:
        versions[KEY_TEST_DOUBLE] = "true"
    return versions


def describe_sdk(versions: Mapping[str, str]) -> str:
    """One phrase naming a toolchain, e.g. 'Neuron SDK 2.31 (torch-neuronx 2.9.0.2.15.32035, neuronx-cc 2.26.6360.0)'.

    >>> describe_sdk({"torch_neuronx": "1.2", "neuronx_cc": "3.4", "neuron_sdk": "unknown"})
    'Neuron SDK unknown (torch-neuronx 1.2, neuronx-cc 3.4)'
    """
    text = (
        f"Neuron SDK {versions.get(KEY_SDK, 'unknown')} "
        f"(torch-neuronx {versions.get(KEY_TORCH_NEURONX, 'not recorded')}, "
        f"neuronx-cc {versions.get(KEY_NEURONX_CC, 'not recorded')}"
    )
    if versions.get(KEY_TEST_DOUBLE) == "true":
        text += ", test stand-in"
    return text + ")"


def sdk_mismatch(recorded: Mapping[str, str], installed: Mapping[str, str]) -> str | None:
    """Why an artifact compiled with `recorded` cannot run on `installed`, or None if it can.

    NEFFs are not portable across SDK releases, and a release cannot always be named from the
    versions alone, so the exact package versions must match (and both sides must agree on
    whether the test stand-in compiled it). A host without neuronx-cc is compared on torch-neuronx.

    >>> same = {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "2.26.6360.0", "neuron_sdk": "2.31"}
    >>> sdk_mismatch(same, dict(same)) is None
    True
    >>> sdk_mismatch({}, same)
    'the artifact records no Neuron SDK versions'
    """
    if not any(k in recorded for k in (KEY_TORCH_NEURONX, KEY_NEURONX_CC)):
        return "the artifact records no Neuron SDK versions"
    keys = list(COMPARED_KEYS)
    if installed.get(KEY_NEURONX_CC) == NOT_INSTALLED:
        # A serving image may carry the runtime and torch-neuronx without the compiler; then the
        # compiler version cannot be compared and torch-neuronx (plus the double flag) must do.
        keys.remove(KEY_NEURONX_CC)
    if any(recorded.get(k) != installed.get(k) for k in keys):
        return f"the artifact was compiled with {describe_sdk(recorded)}; this machine has {describe_sdk(installed)}"
    return None
