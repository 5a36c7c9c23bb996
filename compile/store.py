"""The shared artifact store: push a compiled artifact to S3 under its content-addressed key, pull
one into the local cache, verified.

Layout in the bucket (`docs/deploy-eks.md`, "S3 layout")::

    s3://bucket/prefix/<cache_key>/tokenizer/...      uploaded first
    s3://bucket/prefix/<cache_key>/graphs/...
    s3://bucket/prefix/<cache_key>/manifest.json      uploaded last: a manifest means a whole artifact

`<cache_key>` is the compile's cache key (`Manifest.cache_key`: model, task, target, buckets,
compiler flags and toolchain versions), so a key names one compile forever: pushing a key that is
already there uploads nothing, and a pulled copy never goes stale.

A pull lands in `cache_root()/artifacts/s3/<bucket>/<prefix>/<cache_key>`: the files are downloaded
into a temporary directory beside it, every file is checked against the manifest's SHA-256, and
only then is the directory renamed into place (one atomic rename), under a file lock so that pulls
racing on one node download once. A cache entry that exists is therefore whole and verified.

boto3 does the S3 calls (`docs/decisions.md`, "boto3 for the artifact store"): the standard AWS
credential chain (environment, profile, IRSA / Pod Identity web identity, instance profile) and
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible stores. It is imported only when an
s3:// URI is used (the `s3` extra).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from neuronserve.models.artifact import MANIFEST_NAME, ArtifactError, Manifest, load_manifest, sha256_file

SCHEME = "s3://"
EXTRA_HINT = "s3:// artifacts need the s3 extra: pip install 'neuronserve[s3]'"
CACHE_KEY_RE = re.compile(r"[0-9a-f]{64}")
PARTIAL = ".partial-"

Log = Callable[[str], None]


class StoreError(Exception):
    """A push or pull failed; the message is one line naming the URI, the cause and the fix."""


def is_remote(artifacts: str | os.PathLike) -> bool:
    """Whether `artifacts` names a store location rather than a local directory.

    >>> is_remote("s3://bucket/models/abc"), is_remote("/data/artifacts"), is_remote("S3://b/k")
    (True, False, True)
    """
    return str(artifacts).lower().startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/key`; `key` has no leading or trailing slash.

    >>> u = S3Uri.parse("s3://models/prod/")
    >>> u.bucket, u.key, str(u.child("abc")), str(u.child("abc").child("manifest.json"))
    ('models', 'prod', 's3://models/prod/abc', 's3://models/prod/abc/manifest.json')
    >>> S3Uri.parse("s3://models").child("k").key
    'k'
    """

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        text = str(uri).strip()
        if not is_remote(text):
            raise StoreError(f"{uri!r} is not an S3 URI: expected s3://bucket/prefix")
        bucket, _, key = text[len(SCHEME):].partition("/")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.\-]{0,61}[a-z0-9])?", bucket):
            raise StoreError(f"{uri!r}: {bucket!r} is not a valid S3 bucket name (lowercase letters, digits, '.' and '-')")
        key = key.strip("/")
        parts = key.split("/") if key else []
        if any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"{uri!r}: the prefix may not have empty, '.' or '..' parts")
        return cls(bucket, key)

    def child(self, name: str) -> "S3Uri":
        return S3Uri(self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


# --- the manifest's files -------------------------------------------------------------------------
def artifact_files(manifest: Manifest) -> dict[str, str]:
    """Every file of an artifact (but the manifest) with its SHA-256, relative to the artifact dir.

    Manifests written by this version list them all in `files`; older ones hash each graph, the
    packed graph and the tokenizer files in their own fields, which this falls back to. Where both
    name a file they must agree.
    """
    derived: dict[str, str] = {}
    for entry in [*manifest.buckets, *([manifest.packed] if manifest.packed else [])]:
        derived[entry.file] = entry.sha256
    for name, digest in manifest.tokenizer_files.items():
        derived[f"{manifest.tokenizer_dir}/{name}"] = digest
    files = dict(manifest.files)
    for rel, digest in derived.items():
        if rel in files and files[rel] != digest:
            raise ArtifactError(f"the manifest is inconsistent: {rel} is listed with two different SHA-256 digests")
        files.setdefault(rel, digest)
    for rel in files:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or rel == MANIFEST_NAME or not p.parts:
            raise ArtifactError(f"the manifest lists {rel!r}, which is not a file inside the artifact")
    return files


def verify_files(root: Path, manifest: Manifest, where: str) -> int:
    """Check every file of the artifact under `root` against the manifest; the total size in bytes.
    Raises ArtifactError naming the first file that is missing or differs."""
    total = 0
    for rel, want in sorted(artifact_files(manifest).items()):
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{where}: {rel} is listed in the manifest but missing: the artifact is partial")
        got = sha256_file(path)
        if got != want:
            raise ArtifactError(
                f"{where}: {rel} does not match its manifest: sha256 {got[:16]}..., the manifest says {want[:16]}...; "
                "the file was changed after the compile (tampered or corrupted): compile and push it again"
            )
        total += path.stat().st_size
    return total


def installed_neuron_sdk() -> dict[str, str] | None:
    """The Neuron toolchain's versions from the installed distributions (no import), or None when
    torch-neuronx is not installed here (then the backend's own check at load time is the one)."""
    from neuronserve.common.neuron_sdk import KEY_NEURONX_CC, KEY_SDK, KEY_TORCH_NEURONX, NOT_INSTALLED, SDK_RELEASES

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    tnx = version("torch-neuronx")
    if tnx is None:
        return None
    cc = version("neuronx-cc") or NOT_INSTALLED
    return {KEY_TORCH_NEURONX: tnx, KEY_NEURONX_CC: cc, KEY_SDK: SDK_RELEASES.get((tnx, cc), "unknown")}


def check_fits_here(manifest: Manifest, uri: str) -> None:
    """Refuse, before downloading its graphs, an artifact this machine's Neuron SDK cannot load."""
    if manifest.target == "cpu":
        return
    installed = installed_neuron_sdk()
    if installed is None:
        return
    from neuronserve.common.neuron_sdk import sdk_mismatch

    problem = sdk_mismatch(manifest.versions, installed)
    if problem:
        raise StoreError(
            f"{uri}: {problem}; compiled Neuron graphs do not load across SDK releases: compile with this "
            f"toolchain (`neuronserve compile --target {manifest.target} --push ...`) and serve that key"
        )


# --- S3 -------------------------------------------------------------------------------------------
def client():
    """A boto3 S3 client: the standard credential chain, AWS_ENDPOINT_URL(_S3) honoured by botocore."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreError(EXTRA_HINT) from None
    config = Config(connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 4})
    # A session of its own: credentials are resolved now, not cached from an earlier call.
    return boto3.session.Session().client("s3", config=config)


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


@contextlib.contextmanager
def s3_errors(uri: str, action: str, missing: str | None = None) -> Iterator[None]:
    """Turn botocore's exceptions into one-line StoreErrors. `missing`: the message for a 404."""
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as bx

    try:
        try:
            yield
        except S3UploadFailedError as e:  # boto3's upload wraps the ClientError in its message
            m = re.search(r"An error occurred \((\w+)\)", str(e))
            if not m:
                raise StoreError(f"cannot {action} {uri}: {str(e).splitlines()[0]}") from None
            raise bx.ClientError({"Error": {"Code": m.group(1), "Message": str(e)}}, "PutObject") from None
    except bx.NoCredentialsError:
        raise StoreError(
            f"cannot {action} {uri}: no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or run with an IAM role (IRSA or EKS Pod Identity on Kubernetes, an instance profile on EC2)"
        ) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as e:
        raise StoreError(f"cannot {action} {uri}: cannot reach {_endpoint()} ({type(e).__name__}); check the network "
                         "and AWS_ENDPOINT_URL") from None
    except bx.ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "AuthFailure"):
            raise StoreError(
                f"cannot {action} {uri}: S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the pod's IAM role"
            ) from None
        if code == "NoSuchBucket":
            raise StoreError(f"cannot {action} {uri}: there is no bucket {S3Uri.parse(uri).bucket!r} at {_endpoint()}") from None
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            raise StoreError(missing or f"cannot {action} {uri}: no such object") from None
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            raise StoreError(
                f"cannot {action} {uri}: access denied; the credentials' IAM policy needs s3:GetObject and "
                "s3:ListBucket to pull, s3:PutObject to push (docs/deploy-eks.md, \"IAM\")"
            ) from None
        message = error.get("Message") or str(e)
        raise StoreError(f"cannot {action} {uri}: {code or status}: {message.splitlines()[0]}") from None
    except bx.BotoCoreError as e:
        raise StoreError(f"cannot {action} {uri}: {str(e).splitlines()[0]}") from None


# Whole objects below 256 MB (one GET each: the default artifact's 90 MB graphs pulled 3-4x faster
# so than in 8 ranged parts), ranged parts above, as large Neuron graphs want; a few files in
# flight at once (docs/decisions.md, "boto3 for the artifact store").
MULTIPART_THRESHOLD_BYTES = 256 << 20
MULTIPART_CHUNK_BYTES = 64 << 20
FILES_IN_FLIGHT = 4


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD_BYTES, multipart_chunksize=MULTIPART_CHUNK_BYTES,
                          max_concurrency=8)


# --- push -----------------------------------------------------------------------------------------
@dataclass
class PushResult:
    uri: str  # what to serve: s3://bucket/prefix/<cache_key>
    uploaded: bool  # False: the key was already in the store
    files: int
    bytes: int
    seconds: float


def artifact_uri(prefix: str, manifest: Manifest) -> str:
    """Where an artifact lives under `prefix`: its cache key's folder."""
    if not CACHE_KEY_RE.fullmatch(manifest.cache_key or ""):
        raise StoreError("the artifact's manifest has no cache key (an old compile): compile it again, then push")
    return str(S3Uri.parse(prefix).child(manifest.cache_key))


def push(artifact_dir: str | Path, prefix: str, log: Log | None = None) -> PushResult:
    """Upload the artifact in `artifact_dir` to `prefix/<cache_key>/`, manifest last. A key that is
    already there is left alone (keys are content-addressed, so it holds the same compile)."""
    log = log or (lambda _m: None)
    start = time.perf_counter()
    root = Path(artifact_dir)
    S3Uri.parse(prefix)  # a bad URI fails before anything is read
    try:
        manifest = load_manifest(root)
        uri = artifact_uri(prefix, manifest)
        size = verify_files(root, manifest, str(root))  # never publish a damaged artifact
    except ArtifactError as e:
        raise StoreError(f"cannot push {root}: {e}") from None
    dest = S3Uri.parse(uri)
    s3 = client()
    with s3_errors(str(dest), "check"):
        if _exists(s3, dest.child(MANIFEST_NAME)):
            log(f"already in the store: {dest} holds this compile (key {manifest.cache_key[:12]}); nothing uploaded")
            return PushResult(uri, False, 0, 0, time.perf_counter() - start)
    files = sorted(artifact_files(manifest))
    transfer = transfer_config()
    for rel in [*files, MANIFEST_NAME]:  # manifest last: a listing never shows a half-pushed artifact
        target = dest.child(rel)
        with s3_errors(str(target), "upload to"):
            s3.upload_file(str(root / rel), target.bucket, target.key, Config=transfer)
    size += (root / MANIFEST_NAME).stat().st_size
    seconds = time.perf_counter() - start
    log(f"pushed {len(files) + 1} files ({size / 1e6:.1f} MB) to {dest} in {seconds:.1f} s")
    return PushResult(uri, True, len(files) + 1, size, seconds)


def _exists(s3, obj: S3Uri) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=obj.bucket, Key=obj.key)
        return True
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise


# --- pull -----------------------------------------------------------------------------------------
@dataclass
class PullResult:
    path: Path  # the verified local copy
    downloaded: bool  # False: the local cache already held it
    bytes: int
    seconds: float


def cache_dir_for(uri: S3Uri, cache_root: Path | None = None) -> Path:
    """The local cache entry of a store URI.

    >>> cache_dir_for(S3Uri("models", "prod/abc"), Path("/c")).as_posix()
    '/c/artifacts/s3/models/prod/abc'
    """
    if cache_root is None:
        from neuronserve.compile.compiler import cache_root as default_root

        cache_root = default_root()
    return Path(cache_root, "artifacts", "s3", uri.bucket, *uri.key.split("/"))


def lock_path(dest: Path) -> Path:
    """The file lock that serialises pulls of `dest` on this machine."""
    return dest.parent / f".{dest.name}.lock"


@contextlib.contextmanager
def locked(dest: Path, log: Log) -> Iterator[None]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(dest), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another pull of {dest.name} on this machine")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pull(uri: str, log: Log | None = None, cache_root: Path | None = None) -> PullResult:
    """The verified local copy of the artifact at `uri`, downloaded unless the cache has it."""
    log = log or (lambda _m: None)
    start = time.perf_counter()
    src = S3Uri.parse(uri)
    if not src.key:
        raise StoreError(f"{uri}: name the artifact, s3://bucket/prefix/<cache_key> (what `neuronserve compile --push` prints)")
    dest = cache_dir_for(src, cache_root)
    if (dest / MANIFEST_NAME).is_file():  # entries appear by one rename after verification
        return PullResult(dest, False, 0, time.perf_counter() - start)
    try:
        with locked(dest, log):
            if (dest / MANIFEST_NAME).is_file():  # another process pulled it while this one waited
                return PullResult(dest, False, 0, time.perf_counter() - start)
            for stale in dest.parent.glob(f".{dest.name}{PARTIAL}*"):  # left by a pull that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{PARTIAL}", dir=dest.parent))
            try:
                size = _download(src, tmp, log)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        raise StoreError(f"cannot pull {src} into {dest}: {e.strerror or e}; set NEURONSERVE_CACHE_DIR to a writable directory") from None
    return PullResult(dest, True, size, time.perf_counter() - start)


def _download(src: S3Uri, tmp: Path, log: Log) -> int:
    s3 = client()
    manifest_obj = src.child(MANIFEST_NAME)
    missing = (f"no artifact at {src}: {manifest_obj} does not exist; push one with `neuronserve compile --push "
               f"s3://bucket/prefix`, which prints the URI to serve")
    with s3_errors(str(src), "pull", missing=missing):
        body = s3.get_object(Bucket=manifest_obj.bucket, Key=manifest_obj.key)["Body"].read()
    (tmp / MANIFEST_NAME).write_bytes(body)
    try:
        json.loads(body)
        manifest = load_manifest(tmp)
    except (ValueError, ArtifactError) as e:
        raise StoreError(f"{src}: {MANIFEST_NAME} is not a neuronserve manifest: {str(e).splitlines()[0]}") from None
    if CACHE_KEY_RE.fullmatch(src.name) and manifest.cache_key != src.name:
        raise StoreError(f"{src}: its {MANIFEST_NAME} is for cache key {manifest.cache_key[:16] or '(none)'}..., "
                         f"not {src.name[:16]}... as the URI says: a foreign artifact under this key; push it again")
    check_fits_here(manifest, str(src))
    try:
        files = artifact_files(manifest)
    except ArtifactError as e:
        raise StoreError(f"{src}: {e}") from None
    from concurrent.futures import ThreadPoolExecutor

    def fetch(rel: str) -> None:
        obj = src.child(rel)
        local = tmp / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        with s3_errors(str(obj), "download", missing=f"{src}: {rel} is listed in the manifest but not in the store: "
                                                        "a partial artifact; push it again"):
            s3.download_file(obj.bucket, obj.key, str(local), Config=transfer_config())

    # A few files at a time (a Neuron artifact has one graph per bucket); the first error wins.
    with ThreadPoolExecutor(max_workers=FILES_IN_FLIGHT, thread_name_prefix="pull") as pool:
        for future in [pool.submit(fetch, rel) for rel in sorted(files)]:
            future.result()
    try:
        return verify_files(tmp, manifest, str(src)) + len(body)
    except ArtifactError as e:
        raise StoreError(str(e)) from None


def read_manifest(artifacts: str | os.PathLike) -> Manifest:
    """The manifest of `artifacts` alone, for decisions made before loading (placement reads the
    target): a local directory's, the cached copy's, or manifest.json fetched by itself, so a Ray
    head that only places replicas never downloads the graphs. The replicas verify what they load."""
    if not is_remote(artifacts):
        return load_manifest(artifacts)
    src = S3Uri.parse(str(artifacts))
    cached = cache_dir_for(src)
    if (cached / MANIFEST_NAME).is_file():
        return load_manifest(cached)
    obj = src.child(MANIFEST_NAME)
    with s3_errors(str(src), "read", missing=f"no artifact at {src}: {obj} does not exist"):
        body = client().get_object(Bucket=obj.bucket, Key=obj.key)["Body"].read()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, MANIFEST_NAME).write_bytes(body)
        return load_manifest(tmp)


def resolve_artifacts(artifacts: str | os.PathLike, log: Log | None = None) -> Path:
    """A local artifact directory for `artifacts`: a local path as it is; an s3:// URI pulled into
    the local cache (a cache hit costs a stat), with the pull's duration logged.

    >>> resolve_artifacts("/data/art")
    PosixPath('/data/art')
    """
    if not is_remote(artifacts):
        return Path(artifacts)
    log = log or (lambda _m: None)
    result = pull(str(artifacts), log)
    if result.downloaded:
        log(f"pulled {artifacts} in {result.seconds:.2f} s ({result.bytes / 1e6:.1f} MB, verified) -> {result.path}")
    else:
        log(f"using {result.path} (cached copy of {artifacts})")
    return result.path
