"""`--task sparse` (SPLADE from masked-LM heads) as sentence-transformers' SparseEncoder computes
it, prompts as SentenceTransformer applies them, and TEI's /embed and /embed_sparse, on tiny
random-weight models."""

from __future__ import annotations

import numpy as np
import pytest

from neuronserve.compile.compiler import CompileOptions, compile_artifact
from neuronserve.models.artifact import parse_buckets
from neuronserve.models.loading import ModelError
from neuronserve.serve.engine import Engine, InputError
from tests.fixtures.inprocess_app import Running
from tests.fixtures.tiny_models import add_prompts, make_tiny_model

BUCKETS = "1x16,4x16,2x32,2x128"
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "serving encoders on inferentia " * 3]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sparse")


def compiled(root, model, task):
    out = compile_artifact(CompileOptions(model=str(model), task=task, buckets=parse_buckets(BUCKETS),
                                          out=root / f"art-{model.name}")).out_dir
    return Engine(out, "cpu")


@pytest.mark.parametrize("family, pooling, activation", [
    ("bert", "max", "relu"), ("roberta", "sum", "relu"), ("distilbert", "max", "log1p_relu")])
def test_sparse_matches_sparse_encoder_in_every_bucket(root, family, pooling, activation):
    from sentence_transformers import SparseEncoder

    model = make_tiny_model(root / "models", family=family, task="sparse", pooling=pooling, splade_activation=activation)
    engine = compiled(root, model, "sparse")
    assert engine.manifest.splade.pooling_strategy == pooling and engine.output_dim == 1000
    se = SparseEncoder(str(model), local_files_only=True, device="cpu")
    for bucket in engine.buckets:
        texts = [(TEXTS[i % len(TEXTS)] + " ") * (bucket.seq_len // 12) for i in range(bucket.batch_size)]
        rows = [r[: bucket.seq_len - 1] + r[-1:] if len(r) > bucket.seq_len else r for r in engine.tokenize(texts)]
        texts = [engine._tok_full.decode(r, skip_special_tokens=True) for r in rows]
        rows = engine.tokenize(texts)
        assert max(len(r) for r in rows) <= bucket.seq_len
        got = engine.run_bucket(bucket, rows)
        want = se.encode(texts, convert_to_tensor=True).to_dense().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    sparse = engine.sparse(TEXTS[:2])
    dense = se.encode(TEXTS[:2], convert_to_tensor=True).to_dense().numpy()
    for (idx, values), row in zip(sparse, dense):
        assert idx.tolist() == np.flatnonzero(row).tolist()
        np.testing.assert_allclose(values, row[idx], rtol=1e-5, atol=1e-6)


def test_a_sparse_model_needs_splade_modules(root):
    model = make_tiny_model(root / "models", family="bert", task="embed")
    with pytest.raises(ModelError, match="MLMTransformer followed by SpladePooling"):
        compiled(root, model, "sparse")


def test_prompts_are_applied_as_sentence_transformers_applies_them(root):
    from sentence_transformers import SentenceTransformer

    base = make_tiny_model(root / "models", family="bert", task="embed")
    import shutil

    model = root / "models" / "tiny-bert-embed-prompts"
    if not model.exists():
        shutil.copytree(base, model)
        add_prompts(model, {"query": "query: ", "passage": "passage: "}, "passage")
    engine = compiled(root, model, "embed")
    assert engine.manifest.prompts == {"query": "query: ", "passage": "passage: "}
    st = SentenceTransformer(str(model), local_files_only=True, device="cpu")
    texts = TEXTS[:3]
    np.testing.assert_allclose(engine.embed(texts), st.encode(texts), atol=2e-6)  # the default prompt
    np.testing.assert_allclose(engine.embed(texts, prompt_name="query"), st.encode(texts, prompt_name="query"), atol=2e-6)
    assert np.abs(engine.embed(texts, prompt_name="query") - engine.embed(texts)).max() > 1e-3
    with pytest.raises(InputError, match="'nope' is not one of this model's prompts"):
        engine.embed(texts, prompt_name="nope")

    running = Running(engine.artifact_dir, max_inputs_per_request=8)
    try:
        r = running.request("POST", "/embed", json={"inputs": texts, "prompt_name": "query"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json(), st.encode(texts, prompt_name="query"), atol=2e-6)
        openai = running.request("POST", "/v1/embeddings", json={"input": texts}).json()
        np.testing.assert_allclose([d["embedding"] for d in openai["data"]], st.encode(texts), atol=2e-6)
        bad = running.request("POST", "/embed", json={"inputs": "x", "prompt_name": "nope"})
        assert bad.status_code == 400 and "'query', 'passage'" in bad.json()["error"]
    finally:
        running.close()


def test_tei_embed_and_embed_sparse_routes(root):
    from sentence_transformers import SentenceTransformer, SparseEncoder

    embed_model = make_tiny_model(root / "models", family="bert", task="embed")
    sparse_model = make_tiny_model(root / "models", family="bert", task="sparse")
    embed = Running(compiled(root, embed_model, "embed").artifact_dir, max_inputs_per_request=8)
    sparse = Running(compiled(root, sparse_model, "sparse").artifact_dir, max_inputs_per_request=8)
    try:
        st = SentenceTransformer(str(embed_model), local_files_only=True, device="cpu")
        r = embed.request("POST", "/embed", json={"inputs": "hello world"})
        assert r.status_code == 200 and len(r.json()) == 1
        np.testing.assert_allclose(r.json()[0], st.encode("hello world"), atol=2e-6)
        cut = embed.request("POST", "/embed", json={"inputs": TEXTS, "dimensions": 8, "normalize": False}).json()
        raw = st.encode(TEXTS, normalize_embeddings=False)
        # The model ends in Normalize: unnormalised vectors are the pooled ones, before it.
        pooled = SentenceTransformer(modules=[st[0], st[1]], device="cpu").encode(TEXTS)
        np.testing.assert_allclose(cut, pooled[:, :8], atol=2e-6)
        assert not np.allclose(cut, raw[:, :8], atol=1e-3)
        long = embed.request("POST", "/embed", json={"inputs": ["x " * 300], "truncate": False})
        assert long.status_code == 413 and long.json()["error_type"] == "validation" and "128 tokens" in long.json()["error"]
        assert embed.request("POST", "/embed_sparse", json={"inputs": "x"}).status_code == 404

        se = SparseEncoder(str(sparse_model), local_files_only=True, device="cpu")
        s = sparse.request("POST", "/embed_sparse", json={"inputs": TEXTS[:2]})
        assert s.status_code == 200, s.text
        dense = se.encode(TEXTS[:2], convert_to_tensor=True).to_dense().numpy()
        for got, row in zip(s.json(), dense):
            assert [v["index"] for v in got] == np.flatnonzero(row).tolist()
            np.testing.assert_allclose([v["value"] for v in got], row[row != 0], rtol=1e-5, atol=1e-6)
        assert s.headers["x-truncated-inputs"] == "0"
        wrong = sparse.request("POST", "/v1/embeddings", json={"input": "x"})
        assert wrong.status_code == 404 and "/embed_sparse" in wrong.json()["error"]["message"]
        assert sparse.request("GET", "/info").json()["model_type"] == {"embedding": {"pooling": "splade"}}
    finally:
        embed.close()
        sparse.close()
