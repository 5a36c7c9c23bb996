"""Instance price lookup for the $ per 1M requests column (the one price table:
`neuronserve.common.pricing`, which the replicas' cost metrics read too)."""

from __future__ import annotations

from neuronserve.common import pricing
from neuronserve.deploy.loadtest.config import UsageError


def resolve_price(instance_type: str | None, price_per_hour_usd: float | None) -> tuple[float | None, str | None]:
    """(price, source): an explicit price wins; else the price table, with NEURONSERVE_PRICES_JSON's
    overrides."""
    if price_per_hour_usd is not None:
        return float(price_per_hour_usd), "--price-per-hour-usd"
    if not instance_type:
        return None, None
    try:
        price = pricing.price_per_hour(instance_type, overrides=pricing.load_overrides())
    except ValueError as exc:
        raise UsageError(f"--instance-type {instance_type!r}: {exc}; or pass --price-per-hour-usd") from None
    return float(price), f"price table ({instance_type})"
