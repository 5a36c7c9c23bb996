"""`serve.app.FastRoutes`: POST /v1/embeddings goes straight to the replica's handler; everything
else, and anything before the replica exists, goes through FastAPI."""

import asyncio

import pytest
from starlette.responses import Response

import neuronserve.serve.app as app_module
from neuronserve.serve.app import FastRoutes


class FakeReplica:
    def __init__(self):
        self.bodies = []

    async def embeddings(self, request):
        self.bodies.append(await request.body())
        return Response(b'{"ok": true}', media_type="application/json", headers={"x-tokens": "3"})


def call(mw, method, path, body=b"{}", root_path=""):
    """One ASGI request through `mw`: the messages it sent back."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path,
             "headers": [(b"content-type", b"application/json")], "query_string": b""}
    asyncio.run(mw(scope, receive, send))
    return sent


@pytest.fixture
def routed(monkeypatch):
    calls = []

    async def fastapi_app(scope, receive, send):
        calls.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    replica = FakeReplica()
    monkeypatch.setattr(app_module, "_replica", replica)
    return FastRoutes(fastapi_app), replica, calls


def test_embeddings_posts_go_to_the_replica_with_their_body_and_headers(routed):
    mw, replica, calls = routed
    sent = call(mw, "POST", "/v1/embeddings", b'{"input": "hi"}')
    assert replica.bodies == [b'{"input": "hi"}'] and calls == []
    assert sent[0]["status"] == 200 and (b"x-tokens", b"3") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"ok": true}'


def test_a_route_prefix_is_stripped_like_fastapi_does(routed):
    mw, replica, calls = routed
    call(mw, "POST", "/v1/embeddings", root_path="/embed")
    assert len(replica.bodies) == 1 and calls == []


@pytest.mark.parametrize("method, path", [("GET", "/v1/embeddings"), ("POST", "/v1/models"),
                                          ("POST", "/v1/embeddings/"), ("POST", "/predict")])
def test_other_routes_and_methods_take_fastapis_way(routed, method, path):
    mw, replica, calls = routed
    sent = call(mw, method, path)
    assert calls == [(method, path)] and replica.bodies == [] and sent[0]["status"] == 404


def test_before_the_replica_exists_everything_takes_fastapis_way(routed, monkeypatch):
    mw, replica, calls = routed
    monkeypatch.setattr(app_module, "_replica", None)
    call(mw, "POST", "/v1/embeddings")
    assert calls == [("POST", "/v1/embeddings")] and replica.bodies == []


def test_the_app_routes_through_fast_routes():
    assert any(m.cls is FastRoutes for m in app_module.api.user_middleware)
