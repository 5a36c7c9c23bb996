"""Price resolution and the replica's metrics facade."""

from __future__ import annotations

import logging
import os

from serve.settings import AppArgs

log = logging.getLogger("neuronserve.costs")


def make_metrics(args: AppArgs, model_name: str, engine):
    """The replica's metrics facade; None when the metrics module is unavailable."""
    try:
        from serve.metrics import ServeMetrics
    except ImportError:
        return None
    cores = args.cores_per_replica if engine.backend.kind == "neuron" else (args.threads_per_replica or os.cpu_count() or 1)
    price, per_instance = resolve_price(args)
    return ServeMetrics(model_name, engine.backend.kind, cores, args.instance_type or "unknown", price, per_instance)


def resolve_price(args: AppArgs) -> tuple[float | None, int | None]:
    """$/hour and cores per instance from settings, else from the price table; (None, None) if unknown."""
    try:
        from deploy.pricing import get_instance, price_per_hour
    except ImportError:
        return args.price_per_hour_usd, None
    per_instance = None
    price = args.price_per_hour_usd
    if args.instance_type:
        try:
            inst = get_instance(args.instance_type)
            per_instance = getattr(inst, "neuron_cores", None) or getattr(inst, "vcpus", None)
            if price is None:
                price = price_per_hour(args.instance_type)
        except ValueError:
            log.warning("instance type %s is not in the price table; set price_per_hour_usd", args.instance_type)
    return price, per_instance
