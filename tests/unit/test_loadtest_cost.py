import sys

import pytest

from deploy.loadtest.config import UsageError
from deploy.loadtest.cost import FALLBACK_PRICES_USD_PER_HOUR, resolve_price


def test_explicit_price_wins():
    assert resolve_price(None, 2.5) == (2.5, "--price-per-hour-usd")
    assert resolve_price(None, None) == (None, None)


def test_instance_type_price():
    price, source = resolve_price("inf2.xlarge", None)
    assert price == pytest.approx(0.7582) and "inf2.xlarge" in source


def test_fallback_table_when_pricing_module_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "deploy.pricing", None)  # makes the import fail
    import deploy

    monkeypatch.delattr(deploy, "pricing", raising=False)
    for name, expected in FALLBACK_PRICES_USD_PER_HOUR.items():
        price, source = resolve_price(name, None)
        assert price == expected and source.startswith("built-in table")
    with pytest.raises(UsageError, match="known: inf2.xlarge"):
        resolve_price("m5.large", None)


def test_unknown_instance_type_lists_known_ones():
    with pytest.raises(UsageError, match="(?i)known"):
        resolve_price("x9.mega", None)
