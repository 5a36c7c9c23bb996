"""`neuronserve loadtest` against a server that requires an API key: the key is sent as a Bearer
token (`--api-key`, else $NEURONSERVE_API_KEY), never written out, and a 401 stops the run with
one line saying what to do (not a sweep of failures)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from neuronserve.deploy.loadtest import cli
from neuronserve.deploy.loadtest.client import Target, discover_model, make_client, preflight
from neuronserve.deploy.loadtest.config import LoadtestError, UsageError, api_key_from, config_from_args

KEY = "lt-key-123"


def keyed_app(seen: list) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "missing API key", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})
        return web.json_response({"object": "list", "data": [], "usage": {"prompt_tokens": 2}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def against_keyed_server(headers: dict, seen: list):
    async with TestServer(keyed_app(seen)) as server:
        url = str(server.make_url("")).rstrip("/")
        async with make_client(2, 5.0, headers) as client:
            model = await discover_model(client, url, 5.0)
            target = Target(url, "embeddings", model)
            return model, await preflight(client, target, target.body("hi"), 5.0)


def test_the_key_is_sent_as_a_bearer_token():
    seen: list = []
    assert asyncio.run(against_keyed_server({"Authorization": f"Bearer {KEY}"}, seen)) == ("m", None)
    assert seen == [f"Bearer {KEY}"] * 2


@pytest.mark.parametrize("headers, needle", [
    ({}, "requires an API key (HTTP 401); pass --api-key or set NEURONSERVE_API_KEY"),
    ({"Authorization": "Bearer wrong"}, "refused the API key (HTTP 401); check --api-key"),
])
def test_a_401_stops_the_run_with_one_clear_line(headers, needle):
    with pytest.raises(LoadtestError, match=r"/v1/models " + needle.replace("(", r"\(").replace(")", r"\)")):
        asyncio.run(against_keyed_server(headers, []))


def test_the_key_comes_from_the_flag_else_the_servers_variable(monkeypatch):
    assert api_key_from(None, {"NEURONSERVE_API_KEY": "a,b"}) == "a"
    assert api_key_from(" flag ", {"NEURONSERVE_API_KEY": "a"}) == "flag"
    with pytest.raises(UsageError, match="--api-key is empty"):
        api_key_from("  ", {})
    monkeypatch.setenv("NEURONSERVE_API_KEY", KEY)
    config = config_from_args(cli.build_parser().parse_args(["--url", "http://h:1", "--out", "o"]))
    assert config.auth_headers() == {"Authorization": f"Bearer {KEY}"} and KEY not in repr(config)


def test_a_key_and_an_authorization_header_together_are_a_usage_error(tmp_path, capsys):
    code = cli.main(["--url", "http://127.0.0.1:9", "--api-key", KEY, "--header", "Authorization: Bearer x",
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "not both" in capsys.readouterr().err


def test_a_run_against_a_keyed_server_without_a_key_exits_1_saying_so(tmp_path, capsys, monkeypatch):
    """The whole command, over real HTTP: no sweep of failures, one line, exit code 1; and with
    the key, the run goes through and the key is in none of the files written."""
    import threading

    monkeypatch.delenv("NEURONSERVE_API_KEY", raising=False)
    seen: list = []
    ready = threading.Event()
    holder = {}

    def serve():
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(keyed_app(seen))
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        holder["port"] = site._server.sockets[0].getsockname()[1]
        holder["loop"], holder["runner"] = loop, runner
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    url = f"http://127.0.0.1:{holder['port']}"
    try:
        code = cli.main(["--url", url, "--concurrency", "1", "--duration", "0.3s", "--warmup", "0",
                         "--out", str(tmp_path / "no-key"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and "requires an API key (HTTP 401); pass --api-key" in err, err
        code = cli.main(["--url", url, "--concurrency", "1", "--duration", "0.3s", "--warmup", "0",
                         "--out", str(tmp_path / "keyed"), "--no-progress", "--api-key", KEY])
        assert code == 0, capsys.readouterr().err
        written = "".join(p.read_text(errors="replace") for p in (tmp_path / "keyed").iterdir() if p.suffix in (".json", ".md"))
        assert json.loads((tmp_path / "keyed" / "sweep.json").read_text())["steps"][0]["succeeded"] > 0
        assert KEY not in written
    finally:
        holder["loop"].call_soon_threadsafe(holder["loop"].stop)
        thread.join(10)
