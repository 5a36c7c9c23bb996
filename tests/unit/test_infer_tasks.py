"""`neuronserve infer` for every task on tiny models: pairs for rerank (and classify), sparse
weights, prompts, and each input line's other fields kept in its output line."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from neuronserve.compile.compiler import CompileOptions, compile_artifact
from neuronserve.models.artifact import parse_buckets
from neuronserve.serve.engine import Engine
from neuronserve.serve.infer_cli import run_infer
from tests.fixtures.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    arts = {}
    for task in ("embed", "classify", "rerank", "sparse"):
        model = make_tiny_model(root / "models", family="bert", task=task)
        arts[task] = compile_artifact(CompileOptions(model=str(model), task=task, buckets=parse_buckets("1x16,4x32"),
                                                     out=root / f"art-{task}")).out_dir
    return arts


def infer(artifact, tmp_path, lines, *extra):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = argparse.Namespace(artifacts=artifact, input=src, output=out, backend="cpu", no_truncate="--no-truncate" in extra,
                              chunk_size=2, threads=1, prompt_name=None)
    code = run_infer(args)
    return code, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else None


def test_rerank_pairs_keep_their_fields(artifacts, tmp_path):
    lines = [{"id": "a", "query": "what is a bucket", "document": "a compiled shape", "meta": {"k": 1}},
             {"id": "b", "text": ["hello", "world"]}, ["cat", "sat on the mat"]]
    code, out = infer(artifacts["rerank"], tmp_path, lines)
    assert code == 0
    want = Engine(artifacts["rerank"], "cpu").rerank([("what is a bucket", "a compiled shape"), ("hello", "world"),
                                                       ("cat", "sat on the mat")])
    assert [set(o) for o in out] == [{"id", "meta", "score"}, {"id", "score"}, {"score"}]
    assert out[0]["meta"] == {"k": 1} and [o.get("id") for o in out] == ["a", "b", None]
    np.testing.assert_allclose([o["score"] for o in out], want, atol=1e-7)


def test_rerank_refuses_single_texts_naming_the_line(artifacts, tmp_path, capsys):
    code, out = infer(artifacts["rerank"], tmp_path, [{"query": "q", "document": "d"}, "just a text"])
    assert code == 1 and out is None
    assert "scores pairs" in capsys.readouterr().err


def test_sparse_and_embed_and_classify(artifacts, tmp_path):
    code, out = infer(artifacts["sparse"], tmp_path, [{"id": 1, "text": "hello world"}, "the lazy dog"])
    assert code == 0 and out[0]["id"] == 1
    want = Engine(artifacts["sparse"], "cpu").sparse(["hello world", "the lazy dog"])
    for o, (idx, values) in zip(out, want):
        assert [v["index"] for v in o["sparse"]] == idx.tolist()
        np.testing.assert_allclose([v["value"] for v in o["sparse"]], values, atol=1e-6)
    code, out = infer(artifacts["embed"], tmp_path, [{"id": "x", "text": "hello"}])
    assert code == 0 and set(out[0]) == {"id", "embedding"} and len(out[0]["embedding"]) == 32
    code, out = infer(artifacts["classify"], tmp_path, [{"id": 7, "text": "one"}, {"query": "a", "document": "b"}])
    assert code == 0 and [o.get("id") for o in out] == [7, None] and set(out[1]) == {"label", "score"}
    engine = Engine(artifacts["classify"], "cpu")
    assert [o["label"] for o in out] == [label for label, _ in engine.classify(["one", ("a", "b")])]


def test_too_long_with_no_truncate_names_the_line(artifacts, tmp_path, capsys):
    code, _ = infer(artifacts["rerank"], tmp_path, [["q", "d"], ["q", "d"], ["q", "long " * 100]], "--no-truncate")
    assert code == 1 and "line 3 has" in capsys.readouterr().err
