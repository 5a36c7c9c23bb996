"""TTFT, ITL, TPOT, output tokens/s, goodput and $ per 1M output tokens of a generation step, from
synthetic timelines whose expected numbers are computed here independently (numpy, plain loops)."""

from __future__ import annotations

import numpy as np
import pytest

from neuronserve.deploy.loadtest.stats import Generation, StepRecorder, summarize

DURATION_S = 10.0
PRICE = 1.97  # $/hour


def synthetic() -> list[dict]:
    """30 requests: TTFT 40 + 7i ms; i % 5 + 2 output tokens; gaps 15 + i + 3j ms for j-th gap."""
    out = []
    for i in range(30):
        ttft = 40.0 + 7.0 * i
        n = i % 5 + 2
        gaps = [15.0 + i + 3.0 * j for j in range(n - 1)]
        out.append({"ttft": ttft, "gaps": gaps, "n": n, "e2e": ttft + sum(gaps) + 5.0})  # 5 ms to [DONE]
    return out


def recorder(requests: list[dict], *, usage: bool = True) -> StepRecorder:
    rec = StepRecorder()
    for r in requests:
        rec.sent += 1
        rec.generated(Generation(e2e_ms=r["e2e"], ttft_ms=r["ttft"], itls_ms=tuple(r["gaps"]), output_tokens=r["n"],
                                 tokens_from_usage=usage), 12, True)
    rec.sent += 2
    rec.http_error(500)
    rec.transport_error("stream_error")
    rec.last_end_s = 9.0
    return rec


def step(rec: StepRecorder, goodput=None) -> dict:
    return summarize(rec, mode="concurrency", value=4, arrival=None, warmup_s=0, duration_s=DURATION_S,
                     slo_p99_ms=None, price_per_hour_usd=PRICE, client_cpu_s=1, client_wall_s=10,
                     generation=True, goodput=goodput)


def test_ttft_itl_tpot_and_e2e_percentiles():
    reqs = synthetic()
    s = step(recorder(reqs))
    g = s["generation"]
    ttfts = [r["ttft"] for r in reqs]
    itls = [x for r in reqs for x in r["gaps"]]  # every gap of every request, pooled
    tpots = [(r["e2e"] - r["ttft"]) / (r["n"] - 1) for r in reqs]
    for name, values in (("ttft_ms", ttfts), ("itl_ms", itls), ("tpot_ms", tpots)):
        for q in (50, 90, 99):
            assert g[name][f"p{q}"] == pytest.approx(np.percentile(values, q), abs=0.006), (name, q)
        assert g[name]["mean"] == pytest.approx(np.mean(values), abs=0.006)
        assert g[name]["max"] == pytest.approx(max(values), abs=0.006)
    assert s["latency_ms"]["p50"] == pytest.approx(np.percentile([r["e2e"] for r in reqs], 50), abs=0.006)
    assert s["succeeded"] == 30 and s["failed"] == 2 and s["errors_by_kind"] == {"stream_error": 1}


def test_output_tokens_rate_and_cost_per_million_output_tokens():
    reqs = synthetic()
    g = step(recorder(reqs))["generation"]
    tokens = sum(r["n"] for r in reqs)
    per_s = tokens / DURATION_S  # the window (10 s) outlasts the last completion (9 s)
    assert g["output_tokens"] == tokens and g["output_tokens_source"] == "usage"
    assert g["output_tokens_per_s"] == pytest.approx(per_s, abs=0.01)
    assert g["usd_per_1m_output_tokens"] == pytest.approx(PRICE / 3600 / per_s * 1e6, abs=1e-4)
    assert g["output_tokens_mean"] == pytest.approx(tokens / 30, abs=0.01)


@pytest.mark.parametrize("slos", [{"ttft": 120.0}, {"tpot": 30.0}, {"itl": 35.0}, {"e2el": 200.0},
                                  {"ttft": 150.0, "tpot": 32.0}, {"ttft": 1.0}, {"ttft": 1e6, "itl": 1e6}])
def test_goodput_counts_requests_meeting_every_slo(slos):
    reqs = synthetic()
    good = 0
    for r in reqs:
        tpot = (r["e2e"] - r["ttft"]) / (r["n"] - 1)
        ok = ((r["ttft"] <= slos.get("ttft", float("inf"))) and (tpot <= slos.get("tpot", float("inf")))
              and (max(r["gaps"]) <= slos.get("itl", float("inf"))) and (r["e2e"] <= slos.get("e2el", float("inf"))))
        good += ok
    g = step(recorder(reqs), goodput=slos)["generation"]
    assert g["good_requests"] == good
    assert g["goodput_rps"] == pytest.approx(good / DURATION_S, abs=0.01)
    assert g["goodput_slo_ms"] == slos


def test_some_slos_split_the_synthetic_requests():
    """The parametrised SLOs above are not all trivially all-or-nothing."""
    g = step(recorder(synthetic()), goodput={"ttft": 150.0})["generation"]
    assert 0 < g["good_requests"] < 30


def test_one_token_answers_have_no_tpot_and_do_not_fail_a_tpot_slo():
    rec = StepRecorder()
    rec.sent = 2
    rec.generated(Generation(e2e_ms=30.0, ttft_ms=25.0, itls_ms=(), output_tokens=1, tokens_from_usage=True), 3, True)
    rec.generated(Generation(e2e_ms=90.0, ttft_ms=30.0, itls_ms=(20.0, 40.0), output_tokens=3, tokens_from_usage=True),
                  3, True)
    g = step(rec, goodput={"tpot": 25.0})["generation"]
    assert g["tpot_ms"]["p50"] == 30.0 and g["tpot_ms"]["max"] == 30.0  # only the second: (90 - 30) / 2
    assert g["good_requests"] == 1  # the one-token answer; the other's TPOT is 30 > 25


def test_token_counts_from_chunks_are_marked():
    g = step(recorder(synthetic(), usage=False))["generation"]
    assert g["output_tokens_source"] == "chunks"
    rec = recorder(synthetic())
    rec.generated(Generation(e2e_ms=1.0, ttft_ms=0.5, itls_ms=(), output_tokens=1, tokens_from_usage=False), 1, False)
    assert step(rec)["generation"]["output_tokens_source"] == "mixed"


def test_encoder_steps_have_no_generation_block_and_empty_steps_have_none_values():
    assert "generation" not in summarize(StepRecorder(), mode="concurrency", value=1, arrival=None, warmup_s=0,
                                         duration_s=1, slo_p99_ms=None, price_per_hour_usd=None, client_cpu_s=0,
                                         client_wall_s=1)
    g = step(StepRecorder(), goodput={"ttft": 10.0})["generation"]
    assert g["ttft_ms"]["p99"] is None and g["itl_ms"]["mean"] is None and g["output_tokens_per_s"] == 0
    assert g["usd_per_1m_output_tokens"] is None and g["goodput_rps"] == 0.0 and g["output_tokens_source"] == "none"
