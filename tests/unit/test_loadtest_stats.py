import numpy as np
import pytest

from neuronserve.deploy.loadtest.stats import StepRecorder, cost_per_million, percentile, summarize


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(q):
    rng = np.random.default_rng(3)
    values = sorted(rng.lognormal(1.0, 0.7, size=997).tolist())
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([4.2], 99) == 4.2
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_cost_formula():
    assert cost_per_million(100.0, 0.7582) == pytest.approx(1e6 / 100 * 0.7582 / 3600)
    assert cost_per_million(2674, 0.7582) == pytest.approx(0.0788, abs=1e-4)
    assert cost_per_million(0.0, 1.0) is None
    assert cost_per_million(10.0, None) is None


def _recorder() -> StepRecorder:
    rec = StepRecorder()
    for i in range(1, 101):  # 100 successes, 1..100 ms
        rec.sent += 1
        rec.ok(float(i), 10, True)
    for status in (429, 429, 500, 503):
        rec.sent += 1
        rec.http_error(status)
    rec.sent += 1
    rec.transport_error("connect_error")
    rec.dropped_by_client = 5
    rec.last_end_s = 9.5
    return rec


def test_summarize_counts_rates_and_cost():
    s = summarize(_recorder(), mode="rate", value=11, arrival="poisson", warmup_s=1, duration_s=10,
                  slo_p99_ms=50, price_per_hour_usd=3.6, client_cpu_s=9.0, client_wall_s=10.0)
    assert s["sent"] == 105 and s["succeeded"] == 100 and s["failed"] == 5
    assert s["succeeded"] + s["failed"] == s["sent"]
    assert s["throttled"] == 2 and s["errors_by_status"] == {"500": 1, "503": 1}
    assert s["errors_by_kind"] == {"connect_error": 1}
    assert s["offered_rps"] == pytest.approx(11.0)  # (sent + dropped) / duration
    assert s["achieved_rps"] == pytest.approx(10.0)
    assert s["latency_ms"]["p50"] == pytest.approx(50.5) and s["latency_ms"]["max"] == 100.0
    assert s["goodput_rps"] == pytest.approx(5.0) and s["slo_met"] is False
    assert s["usd_per_1m_requests"] == pytest.approx(1e6 / 10 * 3.6 / 3600)
    assert s["tokens_per_s"] == pytest.approx(100.0) and s["tokens_source"] == "server"
    assert s["client_cpu_percent"] == 90.0 and s["client_saturated"] is True


def test_summarize_uses_completion_time_and_early_stop():
    rec = _recorder()
    rec.last_end_s = 12.0  # a slow request finished after the 10 s window
    s = summarize(rec, mode="concurrency", value=4, arrival="poisson", warmup_s=0, duration_s=10,
                  slo_p99_ms=None, price_per_hour_usd=None, client_cpu_s=1, client_wall_s=10)
    assert s["elapsed_s"] == 12.0 and s["achieved_rps"] == pytest.approx(100 / 12, abs=0.01)
    assert s["arrival"] is None and s["goodput_rps"] is None and s["usd_per_1m_requests"] is None
    rec = _recorder()
    rec.last_end_s = 0.0
    rec.stop_issuing(2.0)  # --max-requests reached after 2 s
    s = summarize(rec, mode="concurrency", value=4, arrival=None, warmup_s=0, duration_s=10,
                  slo_p99_ms=None, price_per_hour_usd=None, client_cpu_s=1, client_wall_s=10)
    assert s["elapsed_s"] == 2.0 and s["achieved_rps"] == pytest.approx(50.0)


def test_tokens_source_estimate_and_mixed():
    rec = StepRecorder()
    rec.ok(1.0, 13.0, False)
    s = summarize(rec, mode="concurrency", value=1, arrival=None, warmup_s=0, duration_s=1,
                  slo_p99_ms=None, price_per_hour_usd=None, client_cpu_s=0, client_wall_s=1)
    assert s["tokens_source"] == "estimate" and s["tokens_per_s"] == 13.0
    rec.ok(1.0, 5, True)
    s = summarize(rec, mode="concurrency", value=1, arrival=None, warmup_s=0, duration_s=1,
                  slo_p99_ms=None, price_per_hour_usd=None, client_cpu_s=0, client_wall_s=1)
    assert s["tokens_source"] == "mixed"


def test_no_success_has_empty_percentiles():
    rec = StepRecorder()
    rec.sent = 3
    for _ in range(3):
        rec.http_error(500)
    s = summarize(rec, mode="concurrency", value=1, arrival=None, warmup_s=0, duration_s=1,
                  slo_p99_ms=10, price_per_hour_usd=1.0, client_cpu_s=0, client_wall_s=1)
    assert s["latency_ms"]["p99"] is None and s["usd_per_1m_requests"] is None
    assert s["slo_met"] is False and s["goodput_rps"] == 0.0
