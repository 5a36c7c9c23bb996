"""Instance price lookup for the $ per 1M requests column."""

from __future__ import annotations

from deploy.loadtest.config import UsageError

# On-demand us-east-1 $/hour; used only when deploy.pricing is not available.
FALLBACK_PRICES_USD_PER_HOUR = {
    "inf2.xlarge": 0.7582,
    "inf2.8xlarge": 1.96786,
    "inf2.24xlarge": 6.49063,
    "inf2.48xlarge": 12.98127,
    "trn1.2xlarge": 1.34375,
    "trn1.32xlarge": 21.50,
}


def resolve_price(instance_type: str | None, price_per_hour_usd: float | None) -> tuple[float | None, str | None]:
    """(price, source): an explicit price wins; else the project's price table; else the fallback."""
    if price_per_hour_usd is not None:
        return float(price_per_hour_usd), "--price-per-hour-usd"
    if not instance_type:
        return None, None
    try:
        from deploy import pricing  # written separately; optional here
    except ImportError:
        pricing = None
    if pricing is not None and hasattr(pricing, "price_per_hour"):
        try:
            # Honour the project's price overrides (NEURONSERVE_PRICES_JSON) when it has them.
            overrides = pricing.load_overrides() if hasattr(pricing, "load_overrides") else None
            if overrides:
                price = pricing.price_per_hour(instance_type, overrides=overrides)
            else:
                price = pricing.price_per_hour(instance_type)
            return float(price), f"deploy.pricing ({instance_type})"
        except (KeyError, ValueError, LookupError) as exc:
            raise UsageError(f"--instance-type {instance_type!r}: {_message(exc)}") from None
    if instance_type in FALLBACK_PRICES_USD_PER_HOUR:
        return FALLBACK_PRICES_USD_PER_HOUR[instance_type], f"built-in table ({instance_type})"
    known = ", ".join(FALLBACK_PRICES_USD_PER_HOUR)
    raise UsageError(
        f"unknown --instance-type {instance_type!r}; known: {known}; or pass --price-per-hour-usd"
    )


def _message(exc: Exception) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text)
    if "known" not in text.lower():
        text += f" (known here: {', '.join(FALLBACK_PRICES_USD_PER_HOUR)})"
    return text + "; or pass --price-per-hour-usd"
