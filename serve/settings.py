"""Serving settings, declared once. Units are in the names. Every field can be set from the
environment (NEURONSERVE_<FIELD>), from `neuronserve serve` flags, or from a Ray Serve config's
application args; the batching knobs also live-update through Serve's `user_config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BATCHING_KNOBS = ("max_batch_tokens", "batch_wait_ms", "max_concurrent_batches", "max_queued_rows", "packing")


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEURONSERVE_", extra="ignore")

    # batching (user_config keys)
    max_batch_tokens: int = Field(2048, ge=1, description="padded-token budget of one batch")
    batch_wait_ms: float = Field(0.0, ge=0, le=10_000, description="extra wait for a fuller batch; 0 dispatches as soon as the device is idle")
    max_concurrent_batches: int = Field(1, ge=1, le=64, description="batches in flight per replica")
    max_queued_rows: int = Field(2048, ge=1, description="rows waiting per replica before 429")
    packing: bool = Field(True, description="pack several short rows per sequence when the artifact has a packed graph (CPU)")
    # requests
    request_timeout_s: float = Field(30.0, gt=0, description="per request, queue + inference")
    max_inputs_per_request: int = Field(256, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    truncate: bool = Field(True, description="default for requests that do not say")
    # placement
    threads_per_replica: int | None = Field(None, ge=1, description="CPU backend torch threads per forward (default: cores / replicas / forwards)")
    # metrics and cost
    metrics_port: int = Field(9400, ge=0, le=65535, description="0: no exporter")
    instance_type: str | None = None
    price_per_hour_usd: float | None = Field(None, ge=0)


class AppArgs(ServeSettings):
    """Typed arguments of the Ray Serve application builder `neuronserve.serve.app:build_app`."""

    artifacts: str
    backend: Literal["auto", "cpu", "neuron"] = "auto"
    model_name: str | None = Field(None, description="served name (default: the artifact's model name)")
    num_replicas: int | Literal["auto"] = "auto"
    cores_per_replica: int = Field(1, ge=1, description="NeuronCores per replica (Neuron backend)")
    max_ongoing_requests: int = Field(1024, ge=1, description="Ray Serve per-replica cap; the replica queues itself")
    metrics_dir: str | None = Field(None, description="PROMETHEUS_MULTIPROC_DIR shared by this node's replicas")
    access_log: bool = Field(False, description="Ray Serve per-request access log (costs ~12% throughput)")

    def user_config(self) -> dict:
        return {k: getattr(self, k) for k in BATCHING_KNOBS}


def __getattr__(name: str):
    # OPENMP_ENV moved to serve.placement (how replicas run); still importable from here for
    # scripts written against the old place.
    if name == "OPENMP_ENV":
        from neuronserve.serve.placement import OPENMP_ENV

        return OPENMP_ENV
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
