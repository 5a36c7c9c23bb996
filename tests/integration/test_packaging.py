"""The built distribution installs one top-level import name, `neuronserve`, and nothing else."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_the_wheel_holds_only_the_neuronserve_package(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for folder in ("neuronserve", "compile", "models", "serve", "deploy"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("neuronserve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith("top_level.txt"))
        assert z.read(top_level).decode().split() == ["neuronserve"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"neuronserve"}
    for module in ("neuronserve/serve/app.py", "neuronserve/compile/compiler.py", "neuronserve/models/packing.py",
                   "neuronserve/deploy/render.py", "neuronserve/common/pricing.py", "neuronserve/cli.py"):
        assert module in names
