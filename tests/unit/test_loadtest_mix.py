"""`neuronserve loadtest --model a=0.75,b=0.25`: each request goes to one model in proportion,
each model gets its own latencies and a share of the cost, and the shares add up."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from neuronserve.deploy.loadtest.client import StepRunner, Target, make_client
from neuronserve.deploy.loadtest.config import UsageError, parse_model_mix
from neuronserve.deploy.loadtest.stats import mix_order, model_breakdown, summarize
from neuronserve.deploy.loadtest.workload import Workload

TOKENS = {"a": 10, "b": 30}  # tokens the fake server reports per request, by model


def app(seen: list) -> web.Application:
    async def embeddings(request: web.Request) -> web.Response:
        model = json.loads(await request.read())["model"]
        seen.append(model)
        return web.json_response({"object": "list", "data": [], "model": model,
                                  "usage": {"prompt_tokens": TOKENS[model], "total_tokens": TOKENS[model]}})

    a = web.Application()
    a.router.add_post("/v1/embeddings", embeddings)
    return a


async def run_mix(seen: list):
    async with TestServer(app(seen)) as server:
        url = str(server.make_url("")).rstrip("/")
        async with make_client(2, 5.0, {}) as client:
            runner = StepRunner(client, Target(url, "embeddings", "a"), Workload(name="t", texts=["x y"], word_counts=[2]),
                                timeout_s=5.0, max_requests=40, progress=False, mix=[("a", 0.75), ("b", 0.25)])
            return await runner.closed_loop(1, 0.0, 30.0, "c=1")


def test_requests_follow_the_weights_and_each_model_is_reported_on_its_own():
    seen: list = []
    result = asyncio.run(run_mix(seen))
    assert seen.count("a") == 30 and seen.count("b") == 10  # exactly in proportion: 40 requests, 3:1
    by_model = result.by_model
    assert {m: r.sent for m, r in by_model.items()} == {"a": 30, "b": 10}
    assert {m: len(r.latencies_ms) for m, r in by_model.items()} == {"a": 30, "b": 10}
    step = summarize(result.recorder, mode="concurrency", value=1, arrival=None, warmup_s=0.0, duration_s=30.0,
                     slo_p99_ms=None, price_per_hour_usd=3.6, client_cpu_s=result.cpu_s, client_wall_s=result.wall_s)
    models = model_breakdown(by_model, step, 3.6)
    assert step["succeeded"] == sum(m["succeeded"] for m in models.values()) == 40
    # Cost by token share: a sent 300 tokens, b 300: each pays half the instance.
    assert models["a"]["share_of_tokens"] == models["b"]["share_of_tokens"] == 0.5
    assert sum(m["price_per_hour_usd"] for m in models.values()) == pytest.approx(3.6)
    # Per 1M requests b costs three times a (same share of the price, a third of the requests).
    assert models["b"]["usd_per_1m_requests"] == pytest.approx(3 * models["a"]["usd_per_1m_requests"], rel=1e-3)


def test_mix_order_is_proportional_in_every_window():
    order = mix_order([0.5, 0.3, 0.2], 100)
    for start in range(0, 100, 10):
        window = order[start:start + 10]
        assert [window.count(i) for i in range(3)] == [5, 3, 2]


@pytest.mark.parametrize("text", ["a=0", "a=-1,b=1", "a=x", "=1", "a=1,b"])
def test_bad_mixes_are_usage_errors(text):
    with pytest.raises(UsageError, match="NAME=WEIGHT"):
        parse_model_mix(text)


def test_demand_shares_weigh_requests_by_their_device_time():
    from neuronserve.deploy.loadtest.stats import demand_shares, share_error, shares

    # Nine cheap requests for one of dear ones: the dear model asks for most of the device.
    d = demand_shares({"embed": 0.9, "rerank": 0.1}, {"embed": 0.001, "rerank": 0.018})
    assert d["rerank"] == pytest.approx(0.018 / 0.027) and sum(d.values()) == pytest.approx(1.0)
    # Equal costs: the demand is the request mix.
    assert demand_shares({"a": 0.25, "b": 0.75}, {"a": 0.004, "b": 0.004}) == pytest.approx({"a": 0.25, "b": 0.75})
    assert shares({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}
    assert share_error(0.45, 0.5) == pytest.approx(0.1) and share_error(0.5, 0.5) == 0
    with pytest.raises(ValueError, match="different models: c"):
        demand_shares({"a": 1.0}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="negative"):
        shares({"a": -1.0, "b": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        share_error(0.5, 0.0)
