"""`neuronserve loadtest` starts fast: importing its command module, in a fresh interpreter, loads
none of the heavy libraries that only the report or the other commands need."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_cli_module_imports_no_heavy_libraries():
    code = ("import sys, neuronserve.deploy.loadtest.cli; "
            "print(sorted(m for m in ('httpx', 'matplotlib', 'numpy', 'tqdm', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(REPO))
    assert out.stdout.strip() == "[]"
