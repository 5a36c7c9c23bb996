"""Facts about the Neuron SDK that compiling and serving share: the guarded `torch_neuronx` import,
the device check, the SDK release table and the toolchain versions an artifact records.

`torch_neuronx` is imported only inside functions, through `import_torch_neuronx()`, so this module
imports on any machine. Every call follows the torch-neuronx API reference for SDK 2.31; tests run it
against the stand-in in `tests/doubles/torch_neuronx`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType

NEURON_TARGETS: tuple[str, ...] = ("inf2", "trn1", "trn2")
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

# Which Neuron SDK release a (torch-neuronx, neuronx-cc) pair belongs to, from the release notes'
# component index. The pair, not torch-neuronx alone, names the release: the same torch-neuronx
# 2.9.0.2.15.32035 is listed as the current PyTorch NeuronX in more than one release while the
# compiler that writes the NEFF changes. A pair missing here is reported as release "unknown";
# the exact package versions are recorded either way and are what a loader compares.
SDK_RELEASES: dict[tuple[str, str], str] = {
    ("2.9.0.2.15.32035", "2.26.6360.0"): "2.31",
}

# Keys of `sdk_versions()`; the ones a loader compares are the package versions and the double flag.
KEY_TORCH_NEURONX = "torch_neuronx"
KEY_NEURONX_CC = "neuronx_cc"
KEY_SDK = "neuron_sdk"
KEY_TEST_DOUBLE = "neuron_test_double"
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
    if not callable(getattr(torch_neuronx, "trace", None)):
        installed = _dist_version("torch-neuronx") or getattr(torch_neuronx, "__version__", "?")
        raise NeuronSDKMissing(
            f"the installed torch-neuronx {installed} has no `trace`: it is PyPI's empty placeholder, "
            f"not the AWS Neuron SDK; uninstall it and {INSTALL_HINT}"
        )
    return torch_neuronx


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
