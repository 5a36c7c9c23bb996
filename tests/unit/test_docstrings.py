"""Every docstring example in the package runs (the doctests of every module of `neuronserve`)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import neuronserve

# Modules that need what the package does not install (locust is an optional tool); `__main__`
# modules run their command when imported.
NOT_IMPORTABLE_HERE = {"neuronserve.deploy.locustfile"}


def _modules() -> list[str]:
    names = ["neuronserve"]
    for sub in ("common", "models", "compile", "serve", "deploy"):
        package = importlib.import_module(f"neuronserve.{sub}")
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]
    names += [m.name for m in pkgutil.iter_modules(neuronserve.__path__, prefix="neuronserve.")]
    return sorted(n for n in set(names) - NOT_IMPORTABLE_HERE if not n.endswith(".__main__"))


MODULES = _modules()


def test_every_package_module_is_found():
    # The walk must see the mapped folders, or the doctests below would pass by finding nothing.
    for name in ("neuronserve.serve.buckets", "neuronserve.models.packing", "neuronserve.common.pricing",
                 "neuronserve.compile.neuron", "neuronserve.deploy.render", "neuronserve.serve.backends.cpu"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"


def test_the_package_has_docstring_examples():
    attempted = sum(doctest.testmod(importlib.import_module(n), verbose=False).attempted for n in MODULES)
    assert attempted >= 20
