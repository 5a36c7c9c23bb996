"""The store's pure parts: URIs, the manifest's file list, local verification and the SDK check
(the S3 side runs against a real server in tests/integration/test_store.py)."""

from __future__ import annotations

import re

import pytest

from neuronserve.compile import store
from neuronserve.compile.store import S3Uri, StoreError
from neuronserve.models.artifact import ArtifactError, BucketEntry, Manifest, ModelInfo, sha256_file


def manifest(**kw) -> Manifest:
    info = ModelInfo(source="m", name="m", family="bert", sha256="0", max_position_embeddings=128, max_seq_length=128,
                     hidden_size=32, output_dim=32)
    entries = [BucketEntry(batch_size=1, seq_len=16, file="graphs/cpu.pt", sha256="a" * 64, compile_seconds=0.1),
               BucketEntry(batch_size=4, seq_len=16, file="graphs/cpu.pt", sha256="a" * 64, compile_seconds=0.1)]
    values = dict(model=info, task="embed", inputs=["input_ids", "attention_mask"], target="cpu", buckets=entries,
                  tokenizer_files={"tokenizer.json": "b" * 64}, cache_key="c" * 64)
    values.update(kw)
    return Manifest(**values)


@pytest.mark.parametrize("uri, needle", [
    ("/local/dir", "not an S3 URI"),
    ("s3://", "not a valid S3 bucket name"),
    ("s3://UPPER/x", "not a valid S3 bucket name"),
    ("s3://bucket/a//x", "empty, '.' or '..' parts"),
    ("s3://bucket/a/../b", "empty, '.' or '..' parts"),
])
def test_bad_uris_name_what_is_wrong(uri, needle):
    with pytest.raises(StoreError, match=re.escape(needle)):
        S3Uri.parse(uri)


def test_a_uri_maps_to_one_cache_entry_per_bucket_and_key(tmp_path):
    a = store.cache_dir_for(S3Uri.parse("s3://models/prod/" + "c" * 64), tmp_path)
    b = store.cache_dir_for(S3Uri.parse("s3://models2/prod/" + "c" * 64), tmp_path)
    assert a != b and a.parent.parent.parent.parent == tmp_path / "artifacts"
    assert store.lock_path(a).parent == a.parent and store.lock_path(a).name.startswith(".")


def test_pull_needs_a_key_under_the_bucket(tmp_path):
    with pytest.raises(StoreError, match="name the artifact"):
        store.pull("s3://models", cache_root=tmp_path)


def test_files_of_an_old_manifest_come_from_its_graph_and_tokenizer_hashes():
    assert store.artifact_files(manifest()) == {"graphs/cpu.pt": "a" * 64, "tokenizer/tokenizer.json": "b" * 64}


def test_the_files_map_adds_files_and_must_agree_with_the_graph_hashes():
    m = manifest(files={"graphs/cpu.pt": "a" * 64, "extra/notes.txt": "d" * 64})
    assert store.artifact_files(m)["extra/notes.txt"] == "d" * 64
    with pytest.raises(ArtifactError, match="graphs/cpu.pt is listed with two different"):
        store.artifact_files(manifest(files={"graphs/cpu.pt": "e" * 64}))


@pytest.mark.parametrize("rel", ["../outside", "/etc/passwd", "manifest.json"])
def test_a_manifest_cannot_name_files_outside_the_artifact(rel):
    with pytest.raises(ArtifactError, match="not a file inside the artifact"):
        store.artifact_files(manifest(files={rel: "d" * 64}))


def test_verify_files_names_a_missing_or_changed_file(tmp_path):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "graphs" / "cpu.pt").write_bytes(b"graph")
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    good = manifest(files={"graphs/cpu.pt": sha256_file(tmp_path / "graphs" / "cpu.pt"),
                           "tokenizer/tokenizer.json": sha256_file(tmp_path / "tokenizer" / "tokenizer.json")},
                    buckets=[], tokenizer_files={})
    assert store.verify_files(tmp_path, good, "here") == len(b"graph") + 2
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes(b"{ }")
    with pytest.raises(ArtifactError, match=r"here: tokenizer/tokenizer.json does not match its manifest: sha256 "):
        store.verify_files(tmp_path, good, "here")
    (tmp_path / "graphs" / "cpu.pt").unlink()
    with pytest.raises(ArtifactError, match="graphs/cpu.pt is listed in the manifest but missing"):
        store.verify_files(tmp_path, good, "here")


SDK_231 = {"torch_neuronx": "2.9.0.2.15.32035", "neuronx_cc": "2.26.6360.0", "neuron_sdk": "2.31"}


def test_the_sdk_check_refuses_a_foreign_toolchain_only_where_one_is_installed(monkeypatch):
    m = manifest(target="inf2", versions=dict(SDK_231))
    monkeypatch.setattr(store, "installed_neuron_sdk", lambda: None)
    store.check_fits_here(m, "s3://b/k")  # no Neuron SDK here: the backend checks when it loads
    monkeypatch.setattr(store, "installed_neuron_sdk", lambda: dict(SDK_231))
    store.check_fits_here(m, "s3://b/k")
    monkeypatch.setattr(store, "installed_neuron_sdk", lambda: {**SDK_231, "neuronx_cc": "2.27.1.0", "neuron_sdk": "unknown"})
    with pytest.raises(StoreError, match=r"s3://b/k: the artifact was compiled with Neuron SDK 2\.31 .* this machine has"):
        store.check_fits_here(m, "s3://b/k")
    store.check_fits_here(manifest(), "s3://b/k")  # CPU artifacts carry no Neuron graphs


def test_push_refuses_a_manifest_without_a_cache_key():
    with pytest.raises(StoreError, match="no cache key"):
        store.artifact_uri("s3://bucket/prefix", manifest(cache_key=""))
    assert store.artifact_uri("s3://bucket/prefix/", manifest()) == "s3://bucket/prefix/" + "c" * 64
