"""A generative artifact through the shared store (a real S3-compatible server on loopback):
`compile --task generate --push` uploads the model's files under the cache key, a pull verifies every
one of them, and a changed weight file in the bucket is refused."""

from __future__ import annotations

import os

import pytest

from neuronserve import cli
from neuronserve.compile import store
from neuronserve.models.artifact import MANIFEST_NAME, load_manifest, sha256_file
from tests.fixtures.s3_server import BUCKET, start_s3_server
from tests.fixtures.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def aws(s3, monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for k, v in s3.env("writer").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache"))


def test_push_then_pull_verifies_the_models_files(s3, aws, tmp_path, capsys, monkeypatch):
    model = make_tiny_llama(tmp_path / "llama")
    capsys.readouterr()
    code = cli.main(["compile", "--model", str(model), "--task", "generate", "--out", str(tmp_path / "art"),
                     "--push", f"s3://{BUCKET}/generate"])
    out, err = capsys.readouterr()
    assert code == 0, err
    uri = out.strip()
    manifest = load_manifest(tmp_path / "art")
    assert uri == f"s3://{BUCKET}/generate/{manifest.cache_key}"
    pulled = store.pull(uri)
    assert pulled.downloaded
    for rel in [*manifest.files, MANIFEST_NAME]:
        assert sha256_file(pulled.path / rel) == sha256_file(tmp_path / "art" / rel), rel
    assert load_manifest(pulled.path).generation == manifest.generation

    # A weight file changed in the bucket after the push: the next pull (a fresh cache) refuses it.
    s3_client = store.client()
    key = f"generate/{manifest.cache_key}/model/model.safetensors"
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=b"tampered")
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache2"))
    with pytest.raises(store.StoreError, match="model/model.safetensors does not match its manifest"):
        store.pull(uri)


def test_serve_takes_a_generative_artifact_from_the_store_and_each_node_pulls_it(s3, aws, tmp_path, capsys,
                                                                                monkeypatch):
    from neuronserve.serve.app import build_app
    from neuronserve.serve.generation.deployment import local_engine_config
    from neuronserve.serve.settings import AppArgs

    model = make_tiny_llama(tmp_path / "llama")
    capsys.readouterr()
    assert cli.main(["compile", "--model", str(model), "--task", "generate", "--out", str(tmp_path / "art"),
                     "--push", f"s3://{BUCKET}/generate-serve"]) == 0  # the first test tampered its own copy
    uri = capsys.readouterr().out.strip()

    # The builder reads the manifest alone; nothing is downloaded where the application is built.
    app = build_app(AppArgs(artifacts=uri, model_name="llm"))
    engine_args, env, name, _, _, _, artifact = app._bound_deployment.init_args
    assert artifact["uri"] == uri and name == "llm"
    assert engine_args["model"].startswith(artifact["root"]) and not os.path.exists(artifact["root"])

    # A replica on another node (its own cache): pulls, verifies, and its engine reads its own copy.
    node_cache = tmp_path / "node-cache"
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(node_cache))
    args, env2 = local_engine_config(engine_args, env, artifact)
    assert args["model"].startswith(str(node_cache)) and args["tokenizer"] == args["model"]
    assert os.path.isfile(os.path.join(args["model"], "config.json"))
    assert {k: v for k, v in args.items() if k not in ("model", "tokenizer")} == \
        {k: v for k, v in engine_args.items() if k not in ("model", "tokenizer")}
    assert env2 == env  # the CPU engine's environment names no path

    # A weight file changed in the bucket: a node without a copy refuses to start the engine on it.
    store.client().put_object(Bucket=BUCKET, Key=f"{uri.split(BUCKET + '/', 1)[1]}/model/model.safetensors",
                              Body=b"tampered")
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "third-node"))
    with pytest.raises(store.StoreError, match="model/model.safetensors does not match its manifest"):
        local_engine_config(engine_args, env, artifact)
