"""The warm-up's timing table (the planner's seconds per bucket), kept in the local cache so a
restart on the same artifact and host need not time every bucket again.

One file per artifact, backend and host shape::

    <cache_root>/timings/<artifact key[:16]>-<backend>-<host shape key>.json

The host shape is what a bucket's time depends on besides the artifact: the backend, the CPU model
and count, the threads of one forward and the forwards running at once, the torch version (CPU);
the instance type and cores per replica (Neuron); the profile (simulated). A file is written
atomically after a full warm-up and used only if it names the same artifact and host shape and
holds a positive time for every bucket; anything else is ignored, saying why, and the warm-up
times every bucket as before (docs/decisions.md, "Warm-up timings are cached").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
SUBDIR = "timings"


def artifact_key(manifest, manifest_path: Path) -> str:
    """The artifact's identity: its compile cache key, or (a hand-made artifact without one) the
    hash of its manifest, which records every graph file's hash."""
    if manifest.cache_key:
        return manifest.cache_key
    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()


def cpu_model() -> str:
    """The CPU's model name ('Intel(R) Xeon(R) ...'), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model Name")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def host_shape(kind: str, *, threads: int | None = None, forwards: int = 1, instance_type: str | None = None,
               cores_per_replica: int = 1, profile: str | None = None) -> dict:
    """What a bucket's time depends on besides the artifact, for the backend `kind`.

    >>> shape = host_shape("neuron", instance_type="inf2.xlarge", cores_per_replica=1)
    >>> shape["backend"], shape["instance_type"], shape["cores_per_replica"]
    ('neuron', 'inf2.xlarge', 1)
    """
    shape: dict = {"backend": kind, "machine": platform.machine()}
    if kind == "cpu":
        shape.update(cpu_model=cpu_model(), cpus=os.cpu_count() or 1, threads=threads, forwards=forwards,
                     torch=_version("torch"))
    elif kind == "neuron":
        shape.update(instance_type=instance_type or "unknown", cores_per_replica=cores_per_replica,
                     torch_neuronx=_version("torch-neuronx"))
    else:
        shape.update(profile=profile, forwards=forwards)
    return shape


def shape_key(shape: dict) -> str:
    """A short, stable name for a host shape.

    >>> shape_key({"backend": "cpu", "cpus": 2}) == shape_key({"cpus": 2, "backend": "cpu"})
    True
    """
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TimingCache:
    """The cached table of one artifact on one host shape."""

    path: Path
    artifact: str
    shape: dict

    @classmethod
    def at(cls, root: Path, artifact: str, shape: dict) -> "TimingCache":
        """The table of `artifact` on `shape` under the cache root `root`."""
        name = f"{artifact[:16]}-{shape['backend']}-{shape_key(shape)}.json"
        return cls(Path(root) / SUBDIR / name, artifact, shape)

    def load(self, buckets) -> dict[str, float] | None:
        """Seconds per bucket (keyed by str(bucket)) for exactly `buckets`, or None, saying why."""
        if not self.path.is_file():
            log.info("no cached warm-up timings at %s: timing the buckets", self.path)
            return None
        why = None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            data, why = None, f"unreadable ({e})"
        if why is None:
            why = self._mismatch(data, {str(b) for b in buckets})
        if why is not None:
            log.warning("ignoring cached warm-up timings %s: %s; timing the buckets", self.path, why)
            return None
        return {k: float(v) for k, v in data["timings_s"].items()}

    def _mismatch(self, data, wanted: set[str]) -> str | None:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return f"not a format {FORMAT} timing table"
        if data.get("artifact") != self.artifact:
            return f"made for another artifact ({str(data.get('artifact'))[:16]}, this one is {self.artifact[:16]})"
        theirs = data.get("host_shape")
        if theirs != self.shape:
            if not isinstance(theirs, dict):
                return "no host shape"
            diff = sorted(k for k in {*theirs, *self.shape} if theirs.get(k) != self.shape.get(k))
            return "made on another host shape (" + ", ".join(
                f"{k}: {theirs.get(k)!r} there, {self.shape.get(k)!r} here" for k in diff) + ")"
        timings = data.get("timings_s")
        # A sample of the buckets is a table too (a large CPU grid's warm-up times a sample).
        if not isinstance(timings, dict) or not timings or not set(timings) <= wanted:
            return "its buckets are not this artifact's"
        bad = [k for k, v in timings.items()
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0]
        if bad:
            return f"bucket {bad[0]} has no valid time ({timings[bad[0]]!r})"
        return None

    def save(self, timings_s: dict[str, float], warmup_s: float) -> bool:
        """Write the table atomically (a reader sees the old file or the new one, never half of
        one); a cache that cannot be written is a warning, never a failed start."""
        body = {"format": FORMAT, "artifact": self.artifact, "host_shape": self.shape,
                "timings_s": {k: float(v) for k, v in sorted(timings_s.items())},
                "warmup_s": round(warmup_s, 3),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=f".{self.path.name}.",
                                             suffix=".tmp", delete=False) as f:
                tmp = Path(f.name)
                json.dump(body, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            log.warning("could not keep the warm-up timings in %s: %s; the next start times every bucket again",
                        self.path, e)
            return False
        log.info("kept the warm-up timings in %s", self.path)
        return True
