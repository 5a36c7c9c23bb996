"""No device: the backend of a host process (`--host-processes`), which tokenizes and encodes but
runs no graph; its rows run on the device replica (`serve.remote`). It holds no device memory and
refuses a forward."""

from __future__ import annotations

from pathlib import Path

import torch

from neuronserve.models.artifact import Bucket, Manifest
from neuronserve.serve.backends.base import BackendError


class HostBackend:
    threads = None  # like a device's: no forward runs on this host process' threads
    packing = False

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, *, device_kind: str = "neuron"):
        self.manifest = manifest
        self.kind = device_kind  # the device replica's, so both processes' metrics carry one label
        self.device: dict = {}  # the device replica's health as it said when this process started

    def forward(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise BackendError("a host process runs no graph: its rows run on the device replica")

    def warmup(self, forwards: int = 1, measure: bool = True) -> dict[str, float]:
        return {}

    def health(self) -> dict:
        return {**self.device, "host_process": True}
