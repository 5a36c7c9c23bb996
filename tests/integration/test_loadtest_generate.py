"""`neuronserve loadtest --route chat|completions` end to end against a fake OpenAI streaming server
with known delays, on loopback.

The fake server (aiohttp, in a subprocess so its CPU does not count as the client's) is this file
run as a script: `python test_loadtest_generate.py --port N`. Like vLLM's OpenAI server it streams
server-sent events: for chat a role-only first delta, then one content event per token, a finish
event, a usage event with empty `choices` (when `stream_options.include_usage`), then
`data: [DONE]`. The first token comes TTFT_MS after the request, each next one ITL_MS after the
previous; it reports one prompt token per whitespace-separated word and ends the answer (an
end-of-sequence token) after EOS_AFTER tokens unless the request sets `ignore_eos`. Models:
MODEL streams as above, NO_USAGE never sends usage, NO_STREAM answers with plain JSON, any
other name gets OpenAI's 404.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL, NO_USAGE, NO_STREAM = "fake-llama", "fake-no-usage", "fake-no-stream"
TTFT_MS, ITL_MS, EOS_AFTER = 60.0, 25.0, 5


# --- the fake server -----------------------------------------------------------------------

def build_fake_app():
    from aiohttp import web

    def error(status: int, message: str, kind: str):
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                                 status=status)

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"}
                                                             for m in (MODEL, NO_USAGE, NO_STREAM)]})

    async def generate(request):
        chat = request.path.endswith("/chat/completions")
        body = json.loads(await request.read())
        model = body.get("model")
        if model not in (MODEL, NO_USAGE, NO_STREAM):
            return error(404, f"The model `{model}` does not exist.", "NotFoundError")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt.split())
        n = max_tokens if body.get("ignore_eos") else min(max_tokens, EOS_AFTER)
        if model == NO_STREAM or not body.get("stream"):
            text = "".join(f" w{k}" for k in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                      else {"index": 0, "text": text, "finish_reason": "stop"})
            return web.json_response({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                      "model": model, "choices": [choice],
                                      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                "total_tokens": prompt_tokens + n}})
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, role=None):
            if chat:
                delta = {**({"role": role} if role else {}), **({"content": text} if text is not None else {})}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return {"id": "x", "object": obj, "created": 0, "model": model, "choices": [choice]}

        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)

        async def send(payload):
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await resp.write(f"data: {data}\n\n".encode())

        start = time.perf_counter()
        if chat:
            await send(chunk("", role="assistant"))
        for k in range(n):
            # Token k is due at TTFT + k * ITL after the request: sleep to that time, not a fixed
            # gap, so a late wake-up does not push every later token back.
            due = start + (TTFT_MS + k * ITL_MS) / 1000.0
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await send(chunk(f" w{k}"))
        await send(chunk("", finish="length" if n == max_tokens else "stop"))
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and model != NO_USAGE:
            await send({"id": "x", "object": obj, "created": 0, "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                  "total_tokens": prompt_tokens + n}})
        await send("[DONE]")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    return app


if __name__ == "__main__":
    from aiohttp import web

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    web.run_app(build_fake_app(), host="127.0.0.1", port=parser.parse_args().port, print=None,
                access_log=None)
    raise SystemExit(0)


# --- the tests -----------------------------------------------------------------------------

import httpx  # noqa: E402
import pytest  # noqa: E402

from neuronserve.deploy.loadtest.cli import main  # noqa: E402
from tests.fixtures.fake_server import script_server  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fake_llm():
    with script_server(__file__) as url:
        yield url


def test_the_fake_server_streams_as_the_openai_client_expects(fake_llm):
    """The fake's shape is the real one's: the official client reads its stream and usage."""
    import openai

    client = openai.OpenAI(base_url=fake_llm + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one two three"}],
                                            max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " w0 w1 w2"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == 3
    completion = client.completions.create(model=MODEL, prompt="a b", max_tokens=2, stream=True,
                                           stream_options={"include_usage": True})
    assert "".join(c.choices[0].text for c in completion if c.choices) == " w0 w1"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_chat_sweep_reports_the_known_delays(fake_llm, tmp_path, capsys):
    out = tmp_path / "chat"
    n = 8
    assert main(["--url", fake_llm, "--route", "chat", "--concurrency", "1,4", "--duration", "2s",
                 "--warmup", "300ms", "--prompt-tokens", "20", "--output-tokens", str(n), "--ignore-eos",
                 "--goodput", "ttft:2000", "tpot:1000", "--instance-type", "inf2.xlarge", "--out", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "TTFT p50" in captured.out and "| c=4 |" in captured.out
    sweep = json.loads((out / "sweep.json").read_text())
    meta = sweep["metadata"]
    assert meta["model"] == MODEL and meta["endpoint"].endswith("/v1/chat/completions") and meta["ignore_eos"]
    assert meta["workload"]["max_tokens"] == "8" and meta["goodput_slo_ms"] == {"ttft": 2000.0, "tpot": 1000.0}
    for step in sweep["steps"]:
        ok = step["succeeded"]
        assert ok >= 3 and step["failed"] == 0 and step["sent"] == ok
        g = step["generation"]
        # Tokens: exact, from the usage event (ignore_eos: every answer runs to max_tokens).
        assert g["output_tokens_source"] == "usage" and g["output_tokens"] == n * ok
        assert step["tokens_source"] == "server" and step["tokens_per_s"] * step["elapsed_s"] == pytest.approx(20 * ok, rel=0.01)
        assert g["output_tokens_per_s"] == pytest.approx(n * ok / step["elapsed_s"], rel=0.01)
        # Times: the server's delays, plus loopback and scheduling on a shared 2-core machine.
        assert TTFT_MS <= g["ttft_ms"]["p50"] <= TTFT_MS + 60, g["ttft_ms"]
        assert ITL_MS - 8 <= g["itl_ms"]["p50"] <= ITL_MS + 15, g["itl_ms"]
        assert ITL_MS - 8 <= g["tpot_ms"]["p50"] <= ITL_MS + 15, g["tpot_ms"]
        assert step["latency_ms"]["p50"] >= TTFT_MS + (n - 1) * ITL_MS
        assert g["itl_ms"]["p50"] <= g["itl_ms"]["p90"] <= g["itl_ms"]["p99"] <= g["itl_ms"]["max"]
        assert g["good_requests"] == ok and g["goodput_rps"] == pytest.approx(step["achieved_rps"], abs=0.02)
        assert g["usd_per_1m_output_tokens"] == pytest.approx(1e6 / g["output_tokens_per_s"] * 0.7582 / 3600, rel=1e-3)
        raw = json.loads((out / f"step-concurrency-{step['value']}.json").read_text())
        assert len(raw["ttfts_ms"]) == ok and raw["output_tokens"] == [n] * ok
    report = (out / "report.md").read_text()
    assert "TTFT p99" in report and "$/1M out tok" in report and "goodput/s" in report
    for name in ("latency_vs_throughput.png", "latency_cdf.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_completions_without_usage_and_with_eos_count_chunks_and_say_so(fake_llm, tmp_path, capsys):
    out = tmp_path / "noUsage"
    assert main(["--url", fake_llm + "/v1", "--route", "completions", "--model", NO_USAGE, "--rate", "8",
                 "--duration", "1500ms", "--warmup", "0", "--workload", "short", "--output-tokens", "12",
                 "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "carried no usage" in err
    step = json.loads((out / "sweep.json").read_text())["steps"][0]
    g = step["generation"]
    assert step["succeeded"] >= 3 and step["failed"] == 0
    # No ignore_eos: the fake ends each answer after EOS_AFTER tokens, counted as content events.
    assert g["output_tokens_source"] == "chunks" and g["output_tokens"] == EOS_AFTER * step["succeeded"]
    assert step["tokens_source"] == "estimate"  # no usage: prompt tokens estimated from words
    assert TTFT_MS <= g["ttft_ms"]["p50"] <= TTFT_MS + 60
    assert "~" in (out / "report.md").read_text()


def test_a_server_that_does_not_stream_is_one_clear_line(fake_llm, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neuronserve.deploy.loadtest", "--url", fake_llm, "--route", "chat", "--model",
         NO_STREAM, "--concurrency", "1", "--duration", "1s", "--warmup", "0", "--out", str(tmp_path / "x")],
        cwd=str(REPO), capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "not a stream of server-sent events" in proc.stderr and "application/json" in proc.stderr


def test_an_unknown_model_is_counted_by_status_with_the_servers_message(fake_llm, tmp_path, capsys):
    out = tmp_path / "404"
    assert main(["--url", fake_llm, "--route", "chat", "--model", "nope", "--concurrency", "2", "--duration", "1s",
                 "--warmup", "0", "--output-tokens", "4", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "returned HTTP 404: The model `nope` does not exist." in err and "no request succeeded" in err
    step = json.loads((out / "sweep.json").read_text())["steps"][0]
    assert step["succeeded"] == 0 and step["errors_by_status"] == {"404": step["sent"]} and step["sent"] > 0
