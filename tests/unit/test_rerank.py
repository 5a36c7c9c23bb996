"""Cross-encoders (`--task rerank`) and text pairs for `classify`: scores as sentence-transformers'
`CrossEncoder.predict` computes them on the same random weights, in every compiled bucket."""

from __future__ import annotations

import numpy as np
import pytest

from neuronserve.compile.compiler import CompileError, CompileOptions, compile_artifact
from neuronserve.models.artifact import load_manifest, parse_buckets
from neuronserve.models.loading import ModelError
from neuronserve.serve.buckets import truncated_count
from neuronserve.serve.engine import Engine, InputTooLong
from tests.fixtures.tiny_models import make_tiny_model

BUCKETS = "1x16,4x16,2x32,4x64,2x128"
QUERIES = ["what is a bucket", "hello", "how fast is the device", "cost per request", "the quick brown fox"]
DOCS = ["a compiled shape that holds a batch of rows", "world", "the device runs one graph at a time " * 3,
        "price per hour divided by requests per hour", "jumps over the lazy dog " * 5]


def pairs_for(n: int, words: int) -> list[tuple[str, str]]:
    """`n` pairs whose documents have about `words` words each (different pairs, different scores)."""
    return [(QUERIES[i % len(QUERIES)], " ".join((DOCS[i % len(DOCS)] + " ").split()[:words] or ["x"]) + f" {i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("ce")


def compiled(root, family: str, task: str = "rerank", **kw) -> tuple[Engine, object]:
    from sentence_transformers import CrossEncoder

    model = make_tiny_model(root / "models", family=family, task=task, **kw)
    name = model.name
    out = compile_artifact(CompileOptions(model=str(model), task=task, buckets=parse_buckets(BUCKETS),
                                          out=root / f"art-{name}")).out_dir
    return Engine(out, "cpu"), CrossEncoder(str(model), local_files_only=True, device="cpu")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_rerank_scores_match_cross_encoder_in_every_bucket(models, family):
    engine, ce = compiled(models, family)
    assert engine.manifest.task == "rerank" and engine.manifest.activation == "sigmoid"
    checked = 0
    for bucket in engine.buckets:
        # Documents as long as the bucket allows (down to a word): the rows fill this bucket.
        words = max(1, bucket.seq_len // 2 - 6)
        pairs = pairs_for(bucket.batch_size, words)
        rows = engine.tokenize(pairs)
        while max(len(r) for r in rows) > bucket.seq_len:
            words -= 1
            pairs = pairs_for(bucket.batch_size, words)
            rows = engine.tokenize(pairs)
        raw = engine.run_bucket(bucket, rows)
        np.testing.assert_allclose(engine.postprocess_scores(raw), ce.predict(pairs), rtol=0, atol=2e-6)
        np.testing.assert_allclose(engine.postprocess_scores(raw, raw_scores=True),
                                   ce.predict(pairs, activation_fn=lambda x: x), rtol=0, atol=2e-5)
        checked += 1
    assert checked == len(engine.buckets) == 5
    for parity in (e.parity for e in engine.manifest.buckets):
        assert parity.passed and parity.max_abs_err < 1e-4


def test_token_types_reach_the_graph(models):
    """BERT's second text is token type 1: without it the scores differ (so the parity above is
    a test of the pair encoding, not only of the ids)."""
    engine, ce = compiled(models, "bert")
    pairs = pairs_for(4, 8)
    rows = engine.tokenize(pairs)
    assert all(1 in r.type_ids for r in rows)
    typed = engine.run_rows(rows)
    untyped = engine.run_rows([list(r) for r in rows])
    assert np.abs(typed - untyped).max() > 1e-4
    np.testing.assert_allclose(engine.postprocess_scores(typed), ce.predict(pairs), atol=2e-6)


def test_long_pairs_are_cut_as_cross_encoder_cuts_them_and_counted(models):
    engine, ce = compiled(models, "bert")
    assert engine.max_len == 128 == ce.max_seq_length
    pairs = [("a long query " * 40, "a long document " * 80), ("short", "a long document " * 80), ("q", "d")]
    rows = engine.tokenize(pairs)
    assert [len(r) for r in rows][:2] == [128, 128] and truncated_count(rows) == 2
    np.testing.assert_allclose(engine.rerank(pairs), ce.predict(pairs), atol=2e-6)
    with pytest.raises(InputTooLong) as e:
        engine.tokenize(pairs, truncate=False)
    assert e.value.index == 0 and e.value.limit == 128 and e.value.tokens > 128


def test_a_saved_activation_is_used(models):
    engine, ce = compiled(models, "bert", activation="torch.nn.modules.linear.Identity")
    assert engine.manifest.activation == "identity"
    pairs = pairs_for(3, 6)
    scores = engine.rerank(pairs)
    np.testing.assert_allclose(scores, ce.predict(pairs), atol=2e-5)
    raw = engine.rerank(pairs, raw_scores=True)
    np.testing.assert_array_equal(scores, raw)  # identity: the logits themselves
    assert np.abs(scores - 1 / (1 + np.exp(-raw))).max() > 0.1  # not what the default sigmoid gives


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_classify_takes_text_pairs_as_cross_encoder_does(models, family):
    engine, ce = compiled(models, family, task="classify", num_labels=3)
    pairs = pairs_for(5, 10)
    mixed = [pairs[0], "a single text", *pairs[1:]]
    ranked = engine.postprocess_labels(engine.run_rows(engine.tokenize(mixed)))
    expected = ce.predict(pairs, apply_softmax=True)
    got = [dict(r) for i, r in enumerate(ranked) if i != 1]
    labels = engine.manifest.labels
    for row, want in zip(got, expected):
        np.testing.assert_allclose([row[labels[j]] for j in range(3)], want, atol=2e-6)


def test_rerank_needs_a_single_score_head(models):
    model = make_tiny_model(models / "models", family="bert", task="classify", num_labels=3)
    with pytest.raises(ModelError, match="3 labels.*--task classify"):
        compile_artifact(CompileOptions(model=str(model), task="rerank", buckets=parse_buckets("1x16"),
                                        out=models / "refused"))


def test_manifest_records_task_and_activation(models):
    engine, _ = compiled(models, "distilbert")
    m = load_manifest(engine.artifact_dir)
    assert (m.task, m.activation, m.model.output_dim, m.labels) == ("rerank", "sigmoid", 1, {0: "LABEL_0"})
