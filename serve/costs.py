"""The replica's metrics facade, with the instance it runs on (for cost)."""

from __future__ import annotations

import os

from neuronserve.serve.settings import AppArgs


def make_metrics(args: AppArgs, model_name: str, engine):
    """ServeMetrics for this replica. Price and cores per instance come from `deploy.pricing`
    (settings and NEURONSERVE_PRICES_JSON override it); without an instance type, cost is off."""
    from neuronserve.common.pricing import detect_instance_type
    from neuronserve.serve.metrics import ServeMetrics

    kind = engine.backend.kind
    if kind == "neuron":
        cores = args.cores_per_replica
    else:  # each of the replica's concurrent forwards runs on its own threads
        cores = (args.threads_per_replica or os.cpu_count() or 1) * args.max_concurrent_batches
    instance_type = args.instance_type or detect_instance_type()
    return ServeMetrics(model_name, kind, cores, instance_type or "unknown", args.price_per_hour_usd, None)
