"""A simulated NeuronCore: no model, only device time. For capacity planning and benchmarks of the
host path ("what host CPU do I need per NeuronCore"), never for serving answers.

Each forward blocks for the time its profile gives for the bucket (a fixed cost per execution plus
a cost per padded token), sleeping, so the GIL is free as it is while the Neuron runtime executes,
and returns outputs of the right shape and dtype: ones, but for the first value of each row, its
count of real (unpadded) tokens, so answers to different inputs can be told apart (the values mean
nothing else).
Like a NeuronCore it runs one graph at a time: concurrent forwards queue for the device.

Profiles are JSON files in `serve/backends/profiles/` (name them) or anywhere (give the path):
`fixed_ms`, `per_padded_token_us`, and where the numbers come from (`source`). `zero` measures the
host path alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch

from neuronserve.models.artifact import Bucket, Manifest
from neuronserve.serve.backends.base import BackendError, check_shape

PROFILES_DIR = Path(__file__).parent / "profiles"
LABEL = "SIMULATED NeuronCore"  # said in every output that shows the backend


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> dict:
    """A profile by name (`serve/backends/profiles/<name>.json`) or by path.

    >>> p = load_profile("bert-base-inf2")
    >>> round(device_seconds(p, Bucket(8, 128)) * 1000, 2)
    5.97
    >>> load_profile("nope")
    Traceback (most recent call last):
    ...
    neuronserve.serve.backends.base.BackendError: unknown device profile 'nope': give a JSON file's path or one of bert-base-inf2, distilbert-base-inf2, minilm-l6-inf2, zero
    """
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise BackendError(f"unknown device profile {name_or_path!r}: give a JSON file's path or one of "
                           f"{', '.join(profile_names())}")
    try:
        profile = json.loads(path.read_text())
        fixed, per_token = float(profile["fixed_ms"]), float(profile["per_padded_token_us"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackendError(f"device profile {path}: {e}; it needs fixed_ms and per_padded_token_us") from None
    if fixed < 0 or per_token < 0:
        raise BackendError(f"device profile {path}: times cannot be negative")
    return {**profile, "name": profile.get("name", path.stem), "fixed_ms": fixed, "per_padded_token_us": per_token}


def device_seconds(profile: dict, bucket: Bucket) -> float:
    return (profile["fixed_ms"] / 1e3) + profile["per_padded_token_us"] / 1e6 * bucket.batch_size * bucket.seq_len


class SimulatedBackend:
    kind = "simulated"
    threads = None  # a device runs it, not host threads
    packing = False

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, *, profile: str = "zero"):
        self.manifest = manifest
        self.artifact_dir = Path(artifact_dir)
        self.profile = load_profile(profile)
        self.buckets = set(manifest.bucket_list())
        self._n_inputs = len(manifest.inputs)
        # Which input tells real tokens from padding: the attention mask when the graph takes one.
        self._mask_at = manifest.inputs.index("attention_mask") if "attention_mask" in manifest.inputs else None
        self._pad_id = manifest.pad_token_id
        self._device = threading.Lock()  # one graph at a time, as on a NeuronCore
        self._out = {}
        self.executions = 0
        self.device_s = 0.0

    def forward(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if bucket not in self.buckets:
            raise BackendError(f"bucket {bucket} is not compiled in this artifact")
        check_shape(bucket, inputs, self._n_inputs)
        seconds = device_seconds(self.profile, bucket)
        with self._device:
            if seconds > 0:
                _busy_wait_free(seconds)
            self.executions += 1
            self.device_s += seconds
        out = self._out.get(bucket.batch_size)
        if out is None:
            out = self._out[bucket.batch_size] = torch.ones((bucket.batch_size, self.manifest.model.output_dim))
        out = out.clone()
        real = inputs[self._mask_at] != 0 if self._mask_at is not None else inputs[0] != self._pad_id
        out[:, 0] = real.sum(dim=1)
        return out

    def warmup(self, forwards: int = 1, measure: bool = True) -> dict[str, float]:
        """The profile's time for every bucket (each runs once, as a NeuronCore loads each graph;
        with `measure=False` too, returning {})."""
        timings = {}
        for bucket in sorted(self.buckets):
            t0 = time.perf_counter()
            self.forward(bucket, self._ones(bucket))
            timings[str(bucket)] = max(device_seconds(self.profile, bucket), time.perf_counter() - t0)
        return timings if measure else {}

    def _ones(self, bucket: Bucket) -> tuple[torch.Tensor, ...]:
        return tuple(torch.ones((bucket.batch_size, bucket.seq_len), dtype=torch.long) for _ in range(self._n_inputs))

    def health(self) -> dict:
        return {"ok": True, "backend": self.kind, "device": f"{LABEL} (profile {self.profile['name']})",
                "simulated": True, "buckets": len(self.buckets), "executions": self.executions}


def _busy_wait_free(seconds: float) -> None:
    """Sleep `seconds` with the GIL released; the last stretch by polling the clock, because
    `time.sleep` overshoots sub-millisecond waits by tens of microseconds."""
    deadline = time.perf_counter() + seconds
    if seconds > 0.002:
        time.sleep(seconds - 0.001)
    while time.perf_counter() < deadline:
        time.sleep(0)
