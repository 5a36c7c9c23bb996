import argparse

import pytest

from neuronserve.deploy.loadtest.cli import build_parser
from neuronserve.deploy.loadtest.config import (UsageError, config_from_args, normalise_url, parse_duration,
                                    parse_values)


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("2m", 120.0), ("500ms", 0.5), ("45", 45.0), ("2.5", 2.5), ("1h", 3600.0),
    ("1.5s", 1.5), (" 10S ", 10.0), ("250MS", 0.25), (".5s", 0.5), (3, 3.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "30x", "-5s", "5 s s", "1e3", "s", "0", "0s"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError, match="duration|> 0"):
        parse_duration(text, name="--duration")


def test_zero_warmup_allowed_only_when_asked():
    assert parse_duration("0", allow_zero=True) == 0.0
    with pytest.raises(UsageError, match="> 0"):
        parse_duration("0")


def test_parse_values():
    assert parse_values("1,8,32", name="--concurrency", integer=True) == [1, 8, 32]
    assert parse_values("12.5, 50", name="--rate", integer=False) == [12.5, 50.0]
    for bad in ("1,x", "0", "-2", ",", "1.5"):
        with pytest.raises(UsageError, match="--concurrency"):
            parse_values(bad, name="--concurrency", integer=True)


def test_normalise_url():
    assert normalise_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert normalise_url("https://api.example.com/v1") == "https://api.example.com"
    for bad in ("ftp://host", "127.0.0.1:8000", "http://", "not a url"):
        with pytest.raises(UsageError, match="http"):
            normalise_url(bad)


def _args(*argv) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_config_defaults_and_modes(tmp_path):
    cfg = config_from_args(_args("--url", "http://h:1", "--out", str(tmp_path)))
    assert cfg.mode == "concurrency" and cfg.values == [1, 8, 32]
    assert cfg.duration_s == 30 and cfg.warmup_s == 5 and cfg.route == "embeddings"
    cfg = config_from_args(_args("--url", "http://h:1", "--rate", "50,100", "--arrival", "constant",
                                 "--out", str(tmp_path)))
    assert cfg.mode == "rate" and cfg.values == [50.0, 100.0] and cfg.arrival == "constant"
    assert cfg.step_name(50.0) == "step-rate-50"


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://h:1", "--instance-type", "inf2.xlarge", "--price-per-hour-usd", "1"], "not both"),
    (["--url", "http://h:1", "--workload", "/no/such/file.jsonl"], "--workload"),
    (["--url", "http://h:1", "--slo-p99-ms", "0"], "--slo-p99-ms"),
    (["--url", "http://h:1", "--max-requests", "0"], "--max-requests"),
    (["--url", "http://h:1", "--timeout-s", "soon"], "--timeout-s"),
    (["--url", "http://h:1", "--warmup=-1s"], "--warmup"),
    (["--model", "m"], "--url is required"),
])
def test_config_usage_errors(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        config_from_args(_args(*argv, "--out", str(tmp_path)))


def test_concurrency_and_rate_are_exclusive_in_argparse():
    with pytest.raises(SystemExit):
        _args("--url", "http://h:1", "--concurrency", "1", "--rate", "5")
