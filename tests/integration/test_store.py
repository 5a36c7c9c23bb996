"""The artifact store against a real S3-compatible server (moto's, in its own process, with
authentication on; tests/fixtures/s3_server.py): push, pull, cache hit, tampered, partial and
interrupted artifacts, wrong credentials, concurrent pulls, and `neuronserve serve --artifacts
s3://...` end to end."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from neuronserve.compile import store
from neuronserve.compile.store import StoreError
from neuronserve.models.artifact import MANIFEST_NAME, load_manifest, save_manifest, sha256_file
from tests.fixtures.inprocess_app import BUCKETS, tiny_artifact
from tests.fixtures.ports import free_port
from tests.fixtures.s3_server import BUCKET, start_s3_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("store-art"))


@pytest.fixture
def aws(s3, monkeypatch):
    """This process talks to the test server as the writer; returns a function to switch user."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)

    def use(user: str = "writer"):
        for k, v in s3.env(user).items():
            monkeypatch.setenv(k, v)

    use()
    return use


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(root))
    return root


class Recorder:
    """Test double around the real boto3 client: records the calls made through it."""

    def __init__(self, inner, calls: list):
        self._inner, self._calls = inner, calls

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._calls.append((name, args, kwargs))
            return attr(*args, **kwargs)
        return call


@pytest.fixture
def calls(monkeypatch):
    made: list = []
    real = store.client
    monkeypatch.setattr(store, "client", lambda: Recorder(real(), made))
    return made


def fresh_prefix(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{time.monotonic_ns()}"


def keys_under(s3, uri: str) -> set[str]:
    parsed = store.S3Uri.parse(uri)
    listing = s3.client().list_objects_v2(Bucket=parsed.bucket, Prefix=parsed.key + "/")
    return {o["Key"][len(parsed.key) + 1:] for o in listing.get("Contents", [])}


def leftovers(cache_root: Path) -> list[str]:
    return [p.name for p in cache_root.rglob("*") if store.PARTIAL in p.name]


def test_the_manifest_lists_every_file_of_the_artifact_with_its_hash(artifact):
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    files = load_manifest(artifact).files
    assert set(files) == on_disk
    assert all(files[rel] == sha256_file(artifact / rel) for rel in on_disk)


# --- push -----------------------------------------------------------------------------------------
def test_push_uploads_every_file_under_the_cache_key_manifest_last(s3, aws, artifact, calls):
    manifest = load_manifest(artifact)
    logs: list[str] = []
    result = store.push(artifact, fresh_prefix("push"), logs.append)
    assert result.uploaded and result.uri.endswith("/" + manifest.cache_key)
    expected = set(manifest.files) | {MANIFEST_NAME}
    assert {"graphs/cpu.pt", "graphs/cpu-packed.pt"} <= set(manifest.files)
    assert any(f.startswith("tokenizer/") for f in manifest.files)
    assert keys_under(s3, result.uri) == expected
    uploads = [c[1][2] for c in calls if c[0] == "upload_file"]
    assert len(uploads) == len(expected) and uploads[-1].endswith("/" + MANIFEST_NAME)
    assert "pushed" in logs[-1] and result.uri in logs[-1]


def test_pushing_a_key_that_is_there_uploads_nothing(s3, aws, artifact, calls):
    prefix = fresh_prefix("again")
    first = store.push(artifact, prefix)
    calls.clear()
    logs: list[str] = []
    second = store.push(artifact, prefix, logs.append)
    assert second.uri == first.uri and not second.uploaded
    assert not [c for c in calls if c[0] == "upload_file"]
    assert "already in the store" in logs[-1] and "nothing uploaded" in logs[-1]


def test_a_damaged_local_artifact_is_not_pushed(s3, aws, artifact, tmp_path):
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    (copy / "graphs" / "cpu-packed.pt").write_bytes(b"not a graph")
    prefix = fresh_prefix("damaged")
    with pytest.raises(StoreError, match="graphs/cpu-packed.pt does not match its manifest"):
        store.push(copy, prefix)
    assert keys_under(s3, str(store.S3Uri.parse(prefix).child(load_manifest(copy).cache_key))) == set()


# --- pull -----------------------------------------------------------------------------------------
def test_pull_verifies_into_the_cache_and_a_second_pull_downloads_nothing(s3, aws, artifact, cache, calls):
    uri = store.push(artifact, fresh_prefix("pull")).uri
    calls.clear()
    logs: list[str] = []
    path = store.resolve_artifacts(uri, logs.append)
    assert path == store.cache_dir_for(store.S3Uri.parse(uri), cache)
    assert path.is_relative_to(cache / "artifacts")
    for rel in [*load_manifest(artifact).files, MANIFEST_NAME]:
        assert sha256_file(path / rel) == sha256_file(artifact / rel), rel
    assert [c for c in calls if c[0] == "download_file"]
    assert logs[-1].startswith(f"pulled {uri} in ") and " s (" in logs[-1]
    assert leftovers(cache) == []

    calls.clear()
    again = store.pull(uri)
    assert again.path == path and not again.downloaded
    assert calls == []  # not even a request: the cache entry exists only once verified


def test_placement_reads_an_s3_artifacts_manifest_alone(s3, aws, artifact, cache, calls):
    """What a Ray head does when it builds the app: it reads the target, downloads no graph."""
    from neuronserve.serve.placement import deployment_options
    from neuronserve.serve.settings import AppArgs

    uri = store.push(artifact, fresh_prefix("placement")).uri
    calls.clear()
    options, placed = deployment_options(AppArgs(artifacts=uri, threads_per_replica=1))
    assert placed.artifacts == uri and "ray_actor_options" in options
    assert [c[0] for c in calls] == ["get_object"]
    assert not store.cache_dir_for(store.S3Uri.parse(uri), cache).exists()
    assert store.read_manifest(uri).cache_key == load_manifest(artifact).cache_key


def test_a_replica_given_an_s3_uri_pulls_it_and_serves(s3, aws, artifact, cache):
    """build_replica resolves the URI itself (a replica on a node where nothing pulled before)."""
    from tests.fixtures.inprocess_app import Running

    uri = store.push(artifact, fresh_prefix("replica")).uri
    running = Running(uri)
    try:
        r = running.request("POST", "/v1/embeddings", json={"input": ["pulled by the replica"]})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == load_manifest(artifact).model.output_dim
        assert (store.cache_dir_for(store.S3Uri.parse(uri), cache) / MANIFEST_NAME).is_file()
    finally:
        running.close()


@pytest.mark.parametrize("rel", ["graphs/cpu.pt", "tokenizer/tokenizer.json"])
def test_an_object_changed_in_the_bucket_is_refused_naming_the_file(s3, aws, artifact, cache, rel):
    uri = store.push(artifact, fresh_prefix("tamper")).uri
    obj = store.S3Uri.parse(uri).child(rel)
    s3.client().put_object(Bucket=obj.bucket, Key=obj.key, Body=(artifact / rel).read_bytes() + b" ")
    with pytest.raises(StoreError) as e:
        store.pull(uri)
    assert f"{rel} does not match its manifest" in str(e.value) and "sha256" in str(e.value)
    assert not store.cache_dir_for(store.S3Uri.parse(uri), cache).exists()
    assert leftovers(cache) == []


def test_an_object_missing_from_the_bucket_is_a_partial_artifact(s3, aws, artifact, cache):
    uri = store.push(artifact, fresh_prefix("partial")).uri
    obj = store.S3Uri.parse(uri).child("graphs/cpu-packed.pt")
    s3.client().delete_object(Bucket=obj.bucket, Key=obj.key)
    with pytest.raises(StoreError, match="graphs/cpu-packed.pt is listed in the manifest but not in the store"):
        store.pull(uri)
    assert not store.cache_dir_for(store.S3Uri.parse(uri), cache).exists() and leftovers(cache) == []


def test_a_manifest_under_another_key_is_refused(s3, aws, artifact, cache):
    other = "0" * 64
    uri = f"s3://{BUCKET}/foreign-{time.monotonic_ns()}/{other}"
    obj = store.S3Uri.parse(uri).child(MANIFEST_NAME)
    s3.client().put_object(Bucket=obj.bucket, Key=obj.key, Body=(artifact / MANIFEST_NAME).read_bytes())
    with pytest.raises(StoreError, match="a foreign artifact under this key"):
        store.pull(uri)


def test_an_artifact_for_another_neuron_sdk_is_refused_before_its_graphs_download(s3, aws, artifact, cache, tmp_path,
                                                                                   monkeypatch, calls):
    copy = Path(shutil.copytree(artifact, tmp_path / "inf2"))
    manifest = load_manifest(copy)
    manifest.target = "inf2"
    manifest.versions.update(torch_neuronx="2.9.0.2.15.32035", neuronx_cc="2.26.6360.0", neuron_sdk="2.31")
    save_manifest(manifest, copy)
    uri = store.push(copy, fresh_prefix("sdk")).uri
    here = {"torch_neuronx": "2.8.0.2.10.1", "neuronx_cc": "2.21.1.0", "neuron_sdk": "2.26"}
    monkeypatch.setattr(store, "installed_neuron_sdk", lambda: dict(here))
    calls.clear()
    with pytest.raises(StoreError) as e:
        store.pull(uri)
    assert "compiled with Neuron SDK 2.31" in str(e.value) and "this machine has Neuron SDK 2.26" in str(e.value)
    assert not [c for c in calls if c[0] == "download_file"]
    assert not store.cache_dir_for(store.S3Uri.parse(uri), cache).exists()


def test_a_manifest_without_the_files_map_still_pulls(s3, aws, artifact, cache, tmp_path):
    """Manifests written before `files` existed: the per-graph and tokenizer hashes are checked."""
    copy = Path(shutil.copytree(artifact, tmp_path / "old"))
    data = json.loads((copy / MANIFEST_NAME).read_text())
    del data["files"]
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_manifest(copy).files == {}
    uri = store.push(copy, fresh_prefix("old")).uri
    path = store.pull(uri).path
    assert sha256_file(path / "graphs" / "cpu.pt") == sha256_file(artifact / "graphs" / "cpu.pt")
    obj = store.S3Uri.parse(uri).child("graphs/cpu.pt")
    s3.client().put_object(Bucket=obj.bucket, Key=obj.key, Body=b"tampered")
    shutil.rmtree(path)
    with pytest.raises(StoreError, match="graphs/cpu.pt does not match its manifest"):
        store.pull(uri)


def test_an_interrupted_download_leaves_no_cache_entry_and_the_next_pull_works(s3, aws, artifact, cache, monkeypatch):
    from botocore.exceptions import ReadTimeoutError

    uri = store.push(artifact, fresh_prefix("interrupted")).uri
    real = store.client

    class Dropping:  # test double: the connection drops halfway through the second file
        def __init__(self):
            self.inner, self.downloads = real(), 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def download_file(self, bucket, key, filename, **kw):
            self.downloads += 1
            if self.downloads == 2:
                Path(filename).write_bytes(b"half a file")
                raise ReadTimeoutError(endpoint_url=s3.endpoint)
            return self.inner.download_file(bucket, key, filename, **kw)

    monkeypatch.setattr(store, "client", Dropping)
    with pytest.raises(StoreError, match="cannot download"):
        store.pull(uri)
    dest = store.cache_dir_for(store.S3Uri.parse(uri), cache)
    assert not dest.exists() and leftovers(cache) == []
    monkeypatch.setattr(store, "client", real)
    assert store.pull(uri).downloaded and (dest / MANIFEST_NAME).is_file()


def pull_in_process(uri: str, env: dict, prelude: str = "") -> subprocess.Popen:
    code = prelude + textwrap.dedent(f"""
        import sys
        from neuronserve.compile import store
        r = store.pull({uri!r}, log=lambda m: print(m, flush=True))
        print("RESULT", r.downloaded, r.path, flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_pull_killed_mid_download_leaves_no_cache_entry(s3, aws, artifact, cache):
    uri = store.push(artifact, fresh_prefix("killed")).uri
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The process dies (SIGKILL, as the OOM killer or a node drain would) with a file half written.
    prelude = textwrap.dedent("""
        import os, signal
        from pathlib import Path
        from neuronserve.compile import store
        real = store.client
        class Dying:
            def __init__(self): self.inner = real()
            def __getattr__(self, name): return getattr(self.inner, name)
            def download_file(self, bucket, key, filename, **kw):
                Path(filename).write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
        store.client = Dying
    """)
    proc = pull_in_process(uri, env, prelude)
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    dest = store.cache_dir_for(store.S3Uri.parse(uri), cache)
    assert not dest.exists() and leftovers(cache)  # only the temporary directory is left ...
    result = store.pull(uri)
    assert result.downloaded and (dest / MANIFEST_NAME).is_file()
    assert leftovers(cache) == []  # ... and the next pull removes it


def test_concurrent_pulls_on_one_machine_download_once(s3, aws, artifact, cache):
    uri = store.push(artifact, fresh_prefix("concurrent")).uri
    dest = store.cache_dir_for(store.S3Uri.parse(uri), cache)
    dest.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(store.lock_path(dest), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # both processes start while a pull holds the lock
        procs = [pull_in_process(uri, env) for _ in range(2)]
        first_lines = [p.stdout.readline() for p in procs]
        assert all("waiting for another pull" in line for line in first_lines), first_lines
        fcntl.flock(held, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == [f"RESULT False {dest}", f"RESULT True {dest}"]
    assert load_manifest(dest).cache_key == load_manifest(artifact).cache_key
    assert [p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")] == [dest.name]


# --- the commands ---------------------------------------------------------------------------------
def run_cli(*argv: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuronserve", *argv], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, cwd=str(REPO), timeout=timeout)


def test_compile_push_prints_the_uri_to_serve(s3, aws, artifact, tmp_path):
    model = tmp_path / "models"
    from tests.fixtures.tiny_models import make_tiny_model

    model = make_tiny_model(model, family="bert")
    prefix = fresh_prefix("cli")
    argv = ["compile", "--model", str(model), "--buckets", BUCKETS, "--out", str(tmp_path / "art"), "--push", prefix]
    first = run_cli(*argv, env=dict(os.environ))
    assert first.returncode == 0, first.stderr
    key = load_manifest(tmp_path / "art").cache_key
    assert first.stdout.strip() == f"{prefix}/{key}"
    assert "pushed" in first.stderr and f"neuronserve serve --artifacts {prefix}/{key}" in first.stderr
    second = run_cli(*argv, env=dict(os.environ))
    assert second.returncode == 0 and second.stdout.strip() == f"{prefix}/{key}"
    assert "cache hit" in second.stderr and "already in the store" in second.stderr


@pytest.mark.parametrize("user, argv, needle", [
    ("wrong-secret", ["serve", "--artifacts", "s3://{bucket}/x/" + "a" * 64], "S3 refused the credentials (SignatureDoesNotMatch)"),
    ("writer", ["serve", "--artifacts", "s3://{bucket}/nothing/" + "a" * 64], "no artifact at s3://"),
    ("writer", ["serve", "--artifacts", "s3://no-such-bucket-here/x/" + "a" * 64], "there is no bucket 'no-such-bucket-here'"),
    ("writer", ["serve", "--artifacts", "s3://Bad_Bucket/x"], "not a valid S3 bucket name"),
    ("none", ["serve", "--artifacts", "s3://{bucket}/x/" + "a" * 64], "no AWS credentials found"),
    ("reader", ["compile", "--model", "{model}", "--buckets", BUCKETS, "--out", "{art}", "--push", "s3://{bucket}/ro"],
     "access denied"),
    ("writer", ["compile", "--push", "http://x/y"], "is not an S3 URI"),
])
def test_store_errors_are_one_line_without_a_traceback(s3, artifact, tmp_path, user, argv, needle):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), NEURONSERVE_CACHE_DIR=str(tmp_path / "cache"))
    if user == "wrong-secret":
        env.update(s3.env("writer"), AWS_SECRET_ACCESS_KEY="not-the-secret")
    elif user == "none":
        env.update(AWS_ENDPOINT_URL=s3.endpoint, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null",
                   AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    else:
        env.update(s3.env(user))
    model = artifact.parent / "models" / "tiny-bert-embed"
    filled = [a.format(bucket=BUCKET, model=model, art=artifact) for a in argv]
    proc = run_cli(*filled, "--port", str(free_port()), "--metrics-port", "0", env=env) if filled[0] == "serve" else run_cli(*filled, env=env)
    assert proc.returncode in (1, 2), proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr


def test_serve_pulls_an_s3_artifact_and_answers(s3, aws, artifact, monkeypatch, serve_instance):
    """`neuronserve serve --artifacts s3://...` on the CPU backend with real Ray: the pull is timed
    and logged, and the pulled artifact answers /v1/embeddings. With the test session's Serve
    running beside it, the server's HAProxy falls back to its own Serve's fallback proxy, never the
    session's (a shared fallback port once had the session's application answer for it)."""
    from tests.integration.conftest import descends_from, haproxy_backup_listeners, start_server, stop_server

    uri = store.push(artifact, fresh_prefix("serve")).uri
    monkeypatch.delenv("NEURONSERVE_CACHE_DIR", raising=False)  # the server's own HOME holds its cache
    port = free_port()
    proc, out, stderr = start_server(uri, port, 0, "--replicas", "1")
    try:
        pulled = [line for line in stderr if line.startswith(f"pulled {uri} in ")]
        assert pulled, "".join(stderr[-40:])
        backups = haproxy_backup_listeners(port)
        assert backups and all(pids and all(descends_from(p, proc.pid) for p in pids) for _, pids in backups), backups
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["hello world", "store"]}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) == load_manifest(artifact).model.output_dim
    finally:
        stop_server(proc)


def test_infer_and_bench_take_an_s3_artifact(s3, aws, artifact, cache, tmp_path):
    """`neuronserve infer` and `bench` pull an s3:// artifact as `serve` does; the vectors are those of
    the local artifact."""
    uri = store.push(artifact, fresh_prefix("infer")).uri
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"id": 7, "text": "hello world"}\n"store"\n')
    env = dict(os.environ)
    for source, out in ((uri, tmp_path / "s3.jsonl"), (str(artifact), tmp_path / "local.jsonl")):
        done = run_cli("infer", "--artifacts", source, "--input", str(texts), "--output", str(out), env=env)
        assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in (tmp_path / "s3.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert got == want and got[0]["id"] == 7 and len(got) == 2
    bench = run_cli("bench", "--artifacts", uri, "--iterations", "1", env=env)
    assert bench.returncode == 0, bench.stderr
    wrong = run_cli("infer", "--artifacts", "s3://Bad_Bucket/x", "--input", str(texts), "--output", str(tmp_path / "x"),
                    env=env)
    assert wrong.returncode != 0 and "not a valid S3 bucket name" in wrong.stderr and "Traceback" not in wrong.stderr
