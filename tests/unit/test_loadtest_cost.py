import pytest

from neuronserve.deploy.loadtest.config import UsageError
from neuronserve.deploy.loadtest.cost import resolve_price


def test_explicit_price_wins():
    assert resolve_price(None, 2.5) == (2.5, "--price-per-hour-usd")
    assert resolve_price(None, None) == (None, None)


def test_instance_type_price():
    price, source = resolve_price("inf2.xlarge", None)
    assert price == pytest.approx(0.7582) and "inf2.xlarge" in source


def test_unknown_instance_type_lists_known_ones():
    with pytest.raises(UsageError, match="(?i)known"):
        resolve_price("x9.mega", None)


def test_price_overrides_from_the_environment_are_honoured(monkeypatch):
    monkeypatch.setenv("NEURONSERVE_PRICES_JSON", '{"inf2.xlarge": 0.5}')
    assert resolve_price("inf2.xlarge", None) == (0.5, "price table (inf2.xlarge)")
