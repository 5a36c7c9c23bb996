"""The import contracts in pyproject.toml ([tool.importlinter]) hold, checked with import-linter in
the checkout and on the package laid out as it installs (the mapped folders copied under one
`neuronserve/` tree), where the wrong-way cases edit a copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"


def _lay_out(dest: Path) -> Path:
    """Copy the package's sources to `dest/neuronserve/...` following [tool.setuptools.package-dir]."""
    config = tomllib.loads(PYPROJECT.read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):
        target = dest.joinpath(*package.split("."))
        shutil.copytree(REPO / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "docker"))
    shutil.copy(PYPROJECT, dest / "pyproject.toml")
    return dest


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports in `root`, with `root` first on the path so it reads that tree's package."""
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert lint, "lint-imports not found: install the test extra (pip install -e '.[test]')"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([lint, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return _lay_out(tmp_path_factory.mktemp("layout"))


def test_the_import_contracts_hold(layout):
    result = _lint(layout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_lint_imports_runs_as_is_in_the_checkout():
    # `lint-imports` at the repository's root sees the mapped folders through the links in
    # neuronserve/ (import-linter walks the package's own folder).
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_links_in_the_package_folder_match_the_package_dir_mapping():
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        if package == "neuronserve":
            continue
        link = REPO.joinpath(*package.split("."))
        assert link.is_symlink() and link.resolve() == (REPO / folder).resolve(), link


def test_the_layout_holds_every_folder(layout):
    for sub in ("compile", "models", "serve", "deploy", "common"):
        assert (layout / "neuronserve" / sub / "__init__.py").is_file()


@pytest.mark.parametrize("module, imports", [
    ("models/artifact.py", "neuronserve.common.console"),  # models imports nothing of ours
    ("compile/compiler.py", "neuronserve.serve.settings"),  # compile never imports serve
    ("compile/compiler.py", "neuronserve.compile.store"),  # the compiler writes artifacts; the store shares them
    ("serve/engine.py", "neuronserve.deploy.render"),  # serve never imports deploy
    ("common/pricing.py", "neuronserve.models.artifact"),  # common imports nothing of ours
    ("serve/engine.py", "neuronserve.serve.batcher"),  # the engine sits below the batcher
    ("serve/planner.py", "neuronserve.serve.engine"),  # the planner is below the engine
    ("serve/backends/cpu.py", "neuronserve.serve.app"),  # backends never reach the HTTP layer
    ("serve/protocols/openai.py", "neuronserve.serve.batcher"),  # protocols are thin adapters
])
def test_a_contract_fails_when_an_import_goes_the_wrong_way(tmp_path, module, imports):
    root = _lay_out(tmp_path)
    path = root / "neuronserve" / module
    path.write_text(path.read_text() + f"\n\ndef _wrong_way():\n    import {imports}  # noqa\n")
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    assert imports in result.stdout
