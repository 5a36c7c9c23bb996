import json

import pytest

from neuronserve.deploy.loadtest.config import UsageError
from neuronserve.deploy.loadtest.report import (load_result, markdown_table, plot_latency_cdf, plot_latency_vs_throughput,
                                    render_compare, render_report, step_label, warnings_for)


def _step(value=8, mode="concurrency", achieved=100.0, p99=12.345, failed=0, throttled=0, slo=None,
          price=None, cpu=30.0, tokens_source="server", dropped=0):
    return {
        "mode": mode, "value": value, "arrival": "poisson" if mode == "rate" else None,
        "offered_rps": achieved + failed, "achieved_rps": achieved, "sent": 1000 + failed,
        "succeeded": 1000, "failed": failed, "throttled": throttled,
        "errors_by_status": {"500": failed - throttled} if failed > throttled else {},
        "errors_by_kind": {}, "dropped_by_client": dropped,
        "latency_ms": {"p50": 5.0, "p90": 9.0, "p99": p99, "max": 20.0, "mean": 6.0, "min": 1.0},
        "tokens_per_s": 1300.0, "tokens_source": tokens_source, "slo_p99_ms": slo,
        "goodput_rps": None if slo is None else achieved * 0.99, "slo_met": None if slo is None else p99 <= slo,
        "price_per_hour_usd": price,
        "usd_per_1m_requests": None if price is None else 1e6 / achieved * price / 3600,
        "client_cpu_percent": cpu, "client_saturated": cpu > 80,
    }


def _sweep(steps, **meta):
    return {"metadata": {"url": "http://h:1", "route": "embeddings", "endpoint": "POST http://h:1/v1/embeddings",
                         "model": "m", "workload": {"name": "mixed", "texts": 1024, "words_min": 5,
                                                    "words_median": 14, "words_max": 300},
                         "seed": 0, "mode": "concurrency", "values": [s["value"] for s in steps],
                         "warmup_s": 1.0, "duration_s": 2.0, "started_at": "2026-01-01T00:00:00+0000",
                         "machine": {"platform": "Linux", "cpu_count": 2, "python": "3.11"}, "notes": [], **meta},
            "steps": steps}


def test_table_columns_follow_options():
    plain = markdown_table([_step()])
    assert "goodput/s" not in plain and "$/1M req" not in plain
    assert "| c=8 | 100.00 | 100.00 | 5.00 | 9.00 | 12.35 | 20.00 | 1,300 |" in plain
    full = markdown_table([_step(slo=10, price=0.7582, failed=3, throttled=2, cpu=95)])
    header = full.splitlines()[0]
    assert "goodput/s" in header and "p99 <= SLO" in header and "$/1M req" in header
    row = full.splitlines()[2]
    assert "| NO |" in row and "500:1" in row and "95% (!)" in row and "2.1061" in row


def test_estimated_tokens_are_marked():
    assert "~1,300" in markdown_table([_step(tokens_source="estimate")])


def test_labels_and_warnings():
    assert step_label(_step(value=12.5, mode="rate")) == "rate=12.5/s (poisson)"
    notes = warnings_for([_step(cpu=90, failed=4, throttled=4, dropped=7)])
    assert any("load generator" in n for n in notes)
    assert any("throttled 4" in n for n in notes)
    assert any("dropped by the client" in n for n in notes)
    lagging = dict(_step(mode="rate"), send_lag_ms={"p99": 40.0, "max": 90.0})
    assert any("send lag" in n for n in warnings_for([lagging]))


def test_report_has_metadata_table_and_warnings():
    text = render_report(_sweep([_step(), _step(value=32, cpu=99)], slo_p99_ms=None, price_per_hour_usd=None))
    assert text.startswith("# neuronserve loadtest")
    assert "`http://h:1`" in text and "`m`" in text and "| c=32 |" in text
    assert "## Warnings" in text and "usage.prompt_tokens" in text


def test_compare_ratios_and_unmatched_steps(tmp_path):
    a = _sweep([_step(value=1, achieved=100, p99=10.0), _step(value=8, achieved=400, p99=20.0, price=1.0)])
    b = _sweep([_step(value=8, achieved=600, p99=10.0, price=1.0), _step(value=32, achieved=700, p99=50.0)])
    text = render_compare(a, b, "a.json", "b.json")
    row = next(line for line in text.splitlines() if line.startswith("| c=8 |"))
    assert "| 400.00 | 600.00 | 1.50x |" in row and "| 20.00 | 10.00 | 0.50x |" in row
    assert "0.67x" in row  # $/1M falls as throughput rises
    assert "Only in A: c=1" in text and "Only in B: c=32" in text


def test_load_result_accepts_sweep_and_step_files(tmp_path):
    sweep = _sweep([_step()])
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    (tmp_path / "step.json").write_text(json.dumps({**_step(), "metadata": sweep["metadata"]}))
    assert len(load_result(tmp_path / "sweep.json")["steps"]) == 1
    assert load_result(tmp_path / "step.json")["steps"][0]["value"] == 8
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UsageError, match="not a loadtest JSON"):
        load_result(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="neither"):
        load_result(tmp_path / "other.json")
    with pytest.raises(UsageError, match="cannot read"):
        load_result(tmp_path / "missing.json")


def test_plots_are_valid_pngs(tmp_path):
    steps = [_step(value=1, achieved=100), _step(value=8, achieved=300, p99=30.0, slo=25)]
    plot_latency_vs_throughput(steps, tmp_path / "lt.png", "title")
    plot_latency_cdf(steps, [[1.0, 2.0, 3.0], [2.0, 4.0, 80.0]], tmp_path / "cdf.png", "title")
    empty = [dict(_step(), latency_ms={"p50": None, "p90": None, "p99": None, "max": None})]
    plot_latency_vs_throughput(empty, tmp_path / "empty.png", "title")
    for name in ("lt.png", "cdf.png", "empty.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
