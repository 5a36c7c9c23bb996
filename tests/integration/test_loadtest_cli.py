"""`neuronserve loadtest` end to end against a small fake server on loopback.

The fake server (FastAPI under uvicorn, in a subprocess so its CPU does not count as the
client's) is this same file run as a script: `python test_loadtest_cli.py --port N`. It serves
/v1/models, /v1/embeddings, /predict and /v2/models/{m}/infer, and POST /_control sets the
fraction of requests answered with 429 or 500 (deterministically: every k-th request) and the
simulated work per request.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_MODEL = "fake-minilm"


# --- the fake server -----------------------------------------------------------------------

def build_fake_app():
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"n": 0, "p429": 0.0, "p500": 0.0, "delay_ms": 1.0}

    def failure() -> JSONResponse | None:
        """Deterministic fractions: 429 on every (1/p429)-th request, 500 on every (1/p500)-th,
        so any short run sees both."""
        n = state["n"]
        state["n"] += 1
        if state["p429"] > 0 and n % max(1, round(1 / state["p429"])) == 0:
            return JSONResponse({"error": {"message": "overloaded", "type": "overloaded"}}, status_code=429,
                                headers={"Retry-After": "1"})
        if state["p500"] > 0:
            k = max(1, round(1 / state["p500"]))
            if n % k == k - 1:  # offset from the 429 slots
                return JSONResponse({"error": {"message": "backend failure", "type": "server_error"}},
                                    status_code=500)
        return None

    async def work() -> None:
        if state["delay_ms"] > 0:
            await asyncio.sleep(state["delay_ms"] / 1000.0)

    @app.post("/_control")
    async def control(request: Request):
        body = await request.json()
        state.update({k: float(v) for k, v in body.items() if k in ("p429", "p500", "delay_ms")})
        state["n"] = 0
        return {k: state[k] for k in ("p429", "p500", "delay_ms")}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": FAKE_MODEL, "object": "model", "owned_by": "test"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        if (bad := failure()) is not None:
            return bad
        await work()
        text = body["input"]
        tokens = len(text.split()) + 2
        return {"object": "list", "model": body.get("model"),
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/predict")
    async def predict(request: Request):
        await request.json()
        if (bad := failure()) is not None:
            return bad
        await work()
        return [{"label": "POSITIVE", "score": 0.9}, {"label": "NEGATIVE", "score": 0.1}]

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        await request.json()
        if (bad := failure()) is not None:
            return bad
        await work()
        return {"model_name": model, "outputs": [{"name": "embedding", "shape": [1, 4], "datatype": "FP32",
                                                  "data": [0.1, 0.2, 0.3, 0.4]}]}

    return app


def _serve(port: int) -> None:
    import uvicorn

    uvicorn.run(build_fake_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    _serve(parser.parse_args().port)
    raise SystemExit(0)


# --- the tests -----------------------------------------------------------------------------

import httpx  # noqa: E402
import pytest  # noqa: E402

from neuronserve.deploy.loadtest.cli import build_parser, main, run  # noqa: E402
from tests.fixtures.fake_server import script_server  # noqa: E402
from tests.fixtures.ports import free_port  # noqa: E402

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_server():
    with script_server(__file__) as url:
        yield url


def _control(url: str, **values) -> None:
    httpx.post(url + "/_control", json={"p429": 0.0, "p500": 0.0, "delay_ms": 1.0, **values}, timeout=5.0)


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5_000


def _check_counts(step: dict) -> None:
    assert step["succeeded"] + step["failed"] == step["sent"]
    assert step["failed"] == (step["throttled"] + sum(step["errors_by_status"].values())
                              + sum(step["errors_by_kind"].values()))
    assert "429" not in step["errors_by_status"]


def test_closed_loop_sweep_with_errors(fake_server, tmp_path, capsys):
    _control(fake_server, p429=0.10, p500=0.05)
    out = tmp_path / "run"
    args = build_parser().parse_args([
        "--url", fake_server, "--concurrency", "1,4", "--duration", "2s", "--warmup", "300ms",
        "--workload", "mixed", "--slo-p99-ms", "200", "--instance-type", "inf2.xlarge",
        "--timeout-s", "5", "--out", str(out), "--no-progress",
    ])
    assert run(args) == 0
    stdout = capsys.readouterr().out
    assert "| step |" in stdout and "c=4" in stdout

    sweep = json.loads((out / "sweep.json").read_text())
    meta = sweep["metadata"]
    assert meta["model"] == FAKE_MODEL  # discovered from /v1/models
    assert meta["route"] == "embeddings" and meta["machine"]["cpu_count"] >= 1
    assert [s["value"] for s in sweep["steps"]] == [1, 4]
    for step in sweep["steps"]:
        _check_counts(step)
        assert step["sent"] > 20
        assert step["throttled"] > 0 and step["errors_by_status"].get("500", 0) > 0
        assert step["tokens_source"] == "server"
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert step["goodput_rps"] is not None and step["goodput_rps"] <= step["achieved_rps"]
        assert step["usd_per_1m_requests"] == pytest.approx(1e6 / step["achieved_rps"] * 0.7582 / 3600, rel=1e-2)
        assert 0 <= step["client_cpu_percent"]
        per_step = json.loads((out / f"step-concurrency-{step['value']}.json").read_text())
        assert len(per_step["latencies_ms"]) == step["succeeded"]
    report = (out / "report.md").read_text()
    assert "p99 ms" in report and "throttled" in report and "goodput/s" in report and "$/1M req" in report
    assert _is_png(out / "latency_vs_throughput.png")
    assert _is_png(out / "latency_cdf.png")


def test_open_loop_via_subprocess_classify(fake_server, tmp_path):
    _control(fake_server, p429=0.2)
    out = tmp_path / "open"
    code = "from neuronserve.deploy.loadtest.cli import main; raise SystemExit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--url", fake_server, "--route", "classify", "--rate", "20",
         "--duration", "2s", "--warmup", "0.5", "--workload", "short", "--price-per-hour-usd", "1.0",
         "--out", str(out)],
        cwd=str(REPO), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "rate=20/s (poisson)" in proc.stdout
    step = json.loads((out / "step-rate-20.json").read_text())
    _check_counts(step)
    assert step["target_rps"] == 20 and step["arrival"] == "poisson"
    assert 10 <= step["offered_rps"] <= 35  # Poisson over 2 s
    assert step["throttled"] > 0 and not step["errors_by_status"]
    assert step["tokens_source"] == "estimate"
    assert step["dropped_by_client"] == 0
    assert step["send_lag_ms"]["max"] >= step["send_lag_ms"]["p99"] >= 0
    assert _is_png(out / "latency_cdf.png")


def test_v2_route_and_compare(fake_server, tmp_path, capsys):
    _control(fake_server)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["--url", fake_server + "/", "--route", "v2", "--model", "m1", "--concurrency", "2",
                     "--duration", "1s", "--warmup", "0", "--workload", "long", "--out", str(out),
                     "--no-progress"]) == 0
        runs.append(out / "sweep.json")
    step = json.loads(runs[0].read_text())["steps"][0]
    assert step["failed"] == 0 and step["succeeded"] == step["sent"] > 5
    capsys.readouterr()
    assert main(["--compare", str(runs[0]), str(runs[1])]) == 0
    text = capsys.readouterr().out
    assert "achieved/s A" in text and "| c=2 |" in text and "x |" in text


def test_all_requests_failing_exits_1_with_report(fake_server, tmp_path, capsys):
    _control(fake_server, p500=1.0)
    out = tmp_path / "fail"
    assert main(["--url", fake_server, "--model", FAKE_MODEL, "--concurrency", "2", "--duration", "1s",
                 "--warmup", "0", "--workload", "short", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no request succeeded" in err
    step = json.loads((out / "sweep.json").read_text())["steps"][0]
    assert step["succeeded"] == 0 and step["errors_by_status"]["500"] == step["sent"] > 0
    assert (out / "report.md").exists() and _is_png(out / "latency_vs_throughput.png")
    _control(fake_server)


def test_refused_connection_is_one_clear_line(tmp_path):
    port = free_port()  # nothing listens here
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve.deploy.loadtest", "--url", f"http://127.0.0.1:{port}", "--concurrency", "1",
         "--duration", "1s", "--warmup", "0", "--out", str(tmp_path / "x")],
        cwd=str(REPO), capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "is the server running?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_url_and_bad_duration_are_usage_errors(tmp_path, capsys):
    assert main(["--url", "ftp://example", "--out", str(tmp_path / "y")]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:9", "--duration", "3 parsecs", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "--duration" in err and "Traceback" not in err
    proc = subprocess.run(
        [sys.executable, "-c", "from neuronserve.deploy.loadtest.cli import main; raise SystemExit(main())",
         "--url", "not-a-url"], cwd=str(REPO), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
