"""`python -m neuronserve compile` as a user runs it: one-line errors with the documented exit
codes, progress on stderr, the artifact path on stdout, and a cache hit on the second run."""

import subprocess
import sys

import pytest

from tests.fixtures.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def test_cli_errors_are_one_line_without_traceback(models_dir, tmp_path):
    model = make_tiny_model(models_dir)
    for argv, code, needle in (
        (["--buckets", "8x"], 2, "expected BATCHxSEQ_LEN"),
        (["--buckets", "1x8", "--seq-lens", "8"], 2, "either --buckets"),
        (["--batch-sizes", "1,8"], 2, "go together"),
        (["--buckets", "1x4096"], 1, "max positions"),
    ):
        proc = subprocess.run([sys.executable, "-m", "neuronserve", "compile", "--model", str(model), "--out",
                               str(tmp_path / "o"), *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_cli_compile_reports_progress_and_cache_hit(models_dir, tmp_path):
    model = make_tiny_model(models_dir)
    argv = [sys.executable, "-m", "neuronserve", "compile", "--model", str(model), "--batch-sizes", "1,2",
            "--seq-lens", "8,16", "--out", str(tmp_path / "o")]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "[4/4] 2x16" in first.stderr and "min cosine" in first.stderr
    assert first.stdout.strip() == str(tmp_path / "o")
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "cache hit" in second.stderr
