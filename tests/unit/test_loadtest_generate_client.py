"""The streaming client of the generation routes against small in-process aiohttp servers: request
bodies, events split across TCP writes, errors by status, errors mid-stream, and a server that
does not stream."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from neuronserve.deploy.loadtest.client import StepRunner, Target, make_client, preflight
from neuronserve.deploy.loadtest.config import LoadtestError
from neuronserve.deploy.loadtest.workload import Workload


def test_generation_bodies_stream_with_usage():
    chat = Target("http://h", "chat", "llama")
    assert chat.endpoint == "http://h/v1/chat/completions"
    assert json.loads(chat.body("hi there", 16)) == {
        "model": "llama", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi there"}]}
    comp = Target("http://h", "completions", "llama", ignore_eos=True)
    assert comp.endpoint == "http://h/v1/completions"
    assert json.loads(comp.body("once upon", 7)) == {
        "model": "llama", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True},
        "prompt": "once upon", "ignore_eos": True}


def test_each_request_carries_its_own_output_length():
    w = Workload(name="t", texts=["a", "b", "c"], word_counts=[1, 1, 1], max_tokens=[5, 9, 2])
    runner = StepRunner(None, Target("http://h", "completions", "m"), w, timeout_s=1, max_requests=3)
    assert [(json.loads(b)["prompt"], json.loads(b)["max_tokens"]) for b in runner._bodies] == [
        ("a", 5), ("b", 9), ("c", 2)]


def event(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def app(mode: str, seen: list) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        seen.append(body)
        if mode == "json":  # ignores "stream": true
            return web.json_response({"choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 1}})
        if mode == "400":
            return web.json_response({"error": {"message": "max_tokens must be at least 1, got 0",
                                                "type": "BadRequestError", "param": None, "code": 400}}, status=400)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(body["max_tokens"]):
            data = event({"choices": [{"index": 0, "text": f" t{k}", "finish_reason": None}]})
            # Each event in two TCP writes, the cut inside the JSON.
            await resp.write(data[:9])
            await asyncio.sleep(0.002)
            await resp.write(data[9:])
            if mode == "error" and k == 1:
                await resp.write(event({"error": {"message": "engine died", "type": "server_error", "code": 500}}))
                break
        else:
            await resp.write(event({"choices": [], "usage": {"prompt_tokens": 4,
                                                             "completion_tokens": body["max_tokens"]}}))
        if mode != "cut":
            await resp.write(event(b"[DONE]"))
        await resp.write_eof()
        return resp

    a = web.Application()
    a.router.add_post("/v1/completions", handle)
    return a


async def run_step(mode: str, seen: list, requests: int = 6):
    async with TestServer(app(mode, seen)) as server:
        url = str(server.make_url("")).rstrip("/")
        target = Target(url, "completions", "m")
        w = Workload(name="t", texts=["p q r"], word_counts=[3], max_tokens=[4])
        async with make_client(2, 5.0, {}) as client:
            runner = StepRunner(client, target, w, timeout_s=5.0, max_requests=requests, progress=False)
            return await runner.closed_loop(2, 0.0, 30.0, "c=2")


def test_a_stream_split_across_writes_is_timed_token_by_token():
    seen: list = []
    rec = asyncio.run(run_step("ok", seen)).recorder
    assert rec.succeeded == 6 and rec.failed == 0 and len(seen) == 6
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True} for b in seen)
    for g in rec.generations:
        assert g.output_tokens == 4 and g.tokens_from_usage and len(g.itls_ms) == 3
        assert g.ttft_ms > 0 and all(x > 0 for x in g.itls_ms)  # each token arrived in a read of its own
        assert g.e2e_ms >= g.ttft_ms + sum(g.itls_ms) - 1e-6
    assert rec.tokens_server == 6 * 4  # prompt tokens from usage


@pytest.mark.parametrize("mode, check", [
    ("error", lambda r: r.errors_by_kind == {"stream_error": 6}),
    ("cut", lambda r: r.errors_by_kind == {"incomplete_stream": 6}),
    ("400", lambda r: r.errors_by_status == {"400": 6}),
    ("json", lambda r: r.errors_by_kind == {"not_streamed": 6}),
])
def test_failed_streams_are_counted_by_kind_or_status(mode, check):
    rec = asyncio.run(run_step(mode, [])).recorder
    assert rec.succeeded == 0 and rec.sent == 6 and check(rec), (rec.errors_by_kind, rec.errors_by_status)


async def run_preflight(mode: str):
    async with TestServer(app(mode, [])) as server:
        url = str(server.make_url("")).rstrip("/")
        target = Target(url, "completions", "m")
        async with make_client(1, 5.0, {}) as client:
            return await preflight(client, target, target.body("hi", 3), 5.0)


def test_preflight_stops_on_a_server_that_does_not_stream():
    with pytest.raises(LoadtestError, match=r"Content-Type 'application/json.*not a stream of server-sent events"):
        asyncio.run(run_preflight("json"))


@pytest.mark.parametrize("mode, needle", [
    ("400", "returned HTTP 400: max_tokens must be at least 1, got 0"),
    ("error", "failed in its stream: engine died (server_error, code 500)"),
    ("cut", "broken stream (incomplete_stream"),
])
def test_preflight_warns_of_an_error_status_or_a_broken_stream(mode, needle):
    assert needle in asyncio.run(run_preflight(mode))


def test_preflight_of_a_good_stream_says_nothing():
    assert asyncio.run(run_preflight("ok")) is None
