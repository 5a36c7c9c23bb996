"""`serve.edge.Edge` in the real application (in this process, a real replica on a tiny model):
API keys on every inference and metadata route, the hot /v1/embeddings shortcut included, 401 in
each route's own error shape; request ids on every response; the net under unhandled errors."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from neuronserve.serve import request_ids
from neuronserve.serve.auth import ApiKeys
from neuronserve.serve.edge import Edge
from neuronserve.serve.metrics import registry
from tests.fixtures.inprocess_app import Running, tiny_artifact

KEYS = "first-key-0001,second-key-0002"
V2_BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def keyed(artifact):
    running = Running(artifact, api_key=KEYS)
    yield running
    running.close()


# (method, path, body, the error shape's keys)
PROTECTED = [
    ("POST", "/v1/embeddings", {"input": "hi"}, "openai"),
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/predict", {"inputs": "hi"}, "tei"),
    ("GET", "/v2", None, "v2"),
    ("GET", "/v2/models/tiny-bert-embed", None, "v2"),
    ("GET", "/v2/models/tiny-bert-embed/ready", None, "v2"),
    ("POST", "/v2/models/tiny-bert-embed/infer", V2_BODY, "v2"),
    ("GET", "/no/such/route", None, "openai"),  # unknown paths are closed too
]


def shape_of(body) -> str:
    if set(body) == {"error"} and isinstance(body["error"], dict):
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return "openai"
    if set(body) == {"error", "error_type"}:
        return "tei"
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return "v2"


@pytest.mark.parametrize("method, path, body, shape", PROTECTED, ids=[f"{m} {p}" for m, p, *_ in PROTECTED])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic Zmlyc3Qta2V5LTAwMDE=", "first-key-0001"])
def test_without_a_valid_key_every_protected_route_answers_401_in_its_shape(keyed, method, path, body, shape, authorization):
    headers = {"authorization": authorization} if authorization else {}
    r = keyed.request(method, path, json=body, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert HEX32.fullmatch(r.headers["x-request-id"])
    answer = r.json()
    assert shape_of(answer) == shape
    text = str(answer)
    assert ("missing API key" if authorization is None else "invalid API key") in text
    assert "first-key" not in text and "wrong-key" not in text


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/embeddings", {"input": "hi"}, 200),
    ("GET", "/v1/models", None, 200),
    ("POST", "/predict", {"inputs": "hi"}, 404),  # an embedding model: the route's own answer, past auth
    ("GET", "/v2", None, 200),
    ("GET", "/v2/models/tiny-bert-embed", None, 200),
    ("POST", "/v2/models/tiny-bert-embed/infer", V2_BODY, 200),
])
@pytest.mark.parametrize("key", ["first-key-0001", "second-key-0002"])
def test_each_key_opens_every_route(keyed, method, path, body, status, key):
    r = keyed.request(method, path, json=body, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == status, r.text


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs"])
def test_health_and_the_api_description_stay_open(keyed, path):
    r = keyed.request("GET", path)
    assert r.status_code == 200 and HEX32.fullmatch(r.headers["x-request-id"])


def test_refused_requests_are_counted_by_route_and_status(keyed):
    def count():
        return registry().get_sample_value("neuronserve_requests_total",
                                           {"model": "tiny-bert-embed", "route": "/v2/infer", "status": "401"}) or 0

    before = count()
    for _ in range(3):
        keyed.request("POST", "/v2/models/anything-at-all/infer", json=V2_BODY)
    assert count() - before == 3


def test_keys_from_the_replicas_environment_and_key_file(artifact, tmp_path, monkeypatch):
    """The contract with the Kubernetes manifests: NEURONSERVE_API_KEY (comma-separated) and the
    file NEURONSERVE_API_KEY_FILE names, read by the replica itself."""
    f = tmp_path / "keys"
    f.write_text("# mounted from a Secret\nfile-key-0003\n")
    monkeypatch.setenv("NEURONSERVE_API_KEY", "env-key-0001, env-key-0002")
    monkeypatch.setenv("NEURONSERVE_API_KEY_FILE", str(f))
    running = Running(artifact)
    try:
        for key, status in (("env-key-0001", 200), ("env-key-0002", 200), ("file-key-0003", 200), ("other", 401)):
            r = running.request("POST", "/v1/embeddings", json={"input": "hi"}, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == status, (key, r.text)
        assert running.request("POST", "/v1/embeddings", json={"input": "hi"}).status_code == 401
    finally:
        running.close()


def test_without_keys_every_route_is_open(artifact):
    running = Running(artifact)
    try:
        assert not running.replica.keys
        assert running.request("POST", "/v1/embeddings", json={"input": "hi"}).status_code == 200
        assert running.request("GET", "/v1/models").status_code == 200
    finally:
        running.close()


# -- request ids ----------------------------------------------------------------------------------
AUTH = {"authorization": "Bearer first-key-0001"}


@pytest.mark.parametrize("method, path, body, headers, status", [
    ("POST", "/v1/embeddings", {"input": "hi"}, AUTH, 200),
    ("POST", "/v1/embeddings", {"input": 5}, AUTH, 400),
    ("POST", "/v1/embeddings", {"input": "hi"}, {}, 401),
    ("GET", "/v2/health/ready", None, {}, 200),
    ("GET", "/v2/models/other", None, AUTH, 404),
])
def test_a_sane_client_request_id_comes_back_on_every_answer(keyed, method, path, body, headers, status):
    r = keyed.request(method, path, json=body, headers={**headers, "x-request-id": "client-req:42/a.b_c"})
    assert r.status_code == status and r.headers.get_list("x-request-id") == ["client-req:42/a.b_c"]


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "quote\"d", "tab\there", "é-accent"])
def test_an_unfit_request_id_is_replaced(keyed, sent):
    r = keyed.request("POST", "/v1/embeddings", json={"input": "hi"},
                      headers={**AUTH, "x-request-id": sent.encode("utf-8")})
    assert r.status_code == 200 and HEX32.fullmatch(r.headers["x-request-id"])


def test_request_ids_are_made_fresh_for_each_request(keyed):
    ids = {keyed.request("GET", "/v2/health/live").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20 and all(HEX32.fullmatch(i) for i in ids)


def test_an_unhandled_error_answers_500_naming_the_request_id_and_logs_it(keyed, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer exploded at 0xdeadbeef")

    monkeypatch.setattr(keyed.replica.engine, "tokenize", broken)
    with caplog.at_level(logging.ERROR, logger="neuronserve.serve.app"):
        r = keyed.request("POST", "/v1/embeddings", json={"input": "hi"}, headers={**AUTH, "x-request-id": "trace-me-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "trace-me-1"
    message = r.json()["error"]["message"]
    assert "internal error" in message and "trace-me-1" in message and "0xdeadbeef" not in message
    assert any("trace-me-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_the_request_id_is_reachable_while_handling_it():
    """For code running under a request (tracing, logs): `request_ids.current()` and
    `request.state.request_id` both give the id the response carries."""
    seen = {}

    async def app(scope, receive, send):
        from starlette.requests import Request

        seen.update(current=request_ids.current(), state=Request(scope).state.request_id,
                    header=dict(scope["headers"])[b"x-request-id"].decode())
        await send({"type": "http.response.start", "status": 204, "headers": [(b"x-request-id", b"inner")]})
        await send({"type": "http.response.body", "body": b""})

    sent = asyncio.run(_call(Edge(app, keys=lambda: None), headers=[(b"x-request-id", b"abc-1")]))
    assert seen == {"current": "abc-1", "state": "abc-1", "header": "abc-1"}
    assert [v for k, v in sent[0]["headers"] if k == b"x-request-id"] == [b"abc-1"]  # one, ours
    assert request_ids.current() is None  # reset once the request is done


@pytest.mark.parametrize("path, shape", [("/v1/embeddings", "openai"), ("/predict", "tei"), ("/v2/models/m", "v2")])
def test_an_exception_escaping_the_app_still_answers_in_shape_with_the_id(path, shape, caplog):
    async def app(scope, receive, send):
        raise ValueError("internal detail 0xfeed")

    with caplog.at_level(logging.ERROR, logger="neuronserve.serve.edge"):
        sent = asyncio.run(_call(Edge(app, keys=lambda: ApiKeys()), path=path, headers=[(b"x-request-id", b"esc-1")]))
    import orjson

    assert sent[0]["status"] == 500 and (b"x-request-id", b"esc-1") in sent[0]["headers"]
    body = orjson.loads(sent[1]["body"])
    assert shape_of(body) == shape and "esc-1" in str(body) and "0xfeed" not in str(body)
    assert any("esc-1" in rec.getMessage() for rec in caplog.records)


async def _call(app, path="/x", headers=()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "root_path": "", "headers": list(headers),
               "query_string": b""}, receive, send)
    return sent


def test_a_replica_run_as_serve_runs_it_installs_its_keys_and_itself_in_the_real_middlewares(artifact):
    """Serve ships the replica's class by value (cloudpickle): its functions' module globals are a
    copy, so state the constructor left in a module global would never reach the middlewares
    (authentication would silently be off). Built the same way here, the constructor must reach
    the real `Edge` and `FastRoutes`."""
    import ray.cloudpickle as cloudpickle

    import neuronserve.serve.app as app_module
    from tests.fixtures.inprocess_app import edge_state, restore_edge, stop

    shipped = cloudpickle.loads(cloudpickle.dumps(app_module.NeuronServe.func_or_class))
    base = next(c for c in shipped.__mro__ if c.__name__ == "NeuronServe" and "__init__" in c.__dict__)
    assert base.__dict__["__init__"].__globals__ is not vars(app_module)  # the copy this guards against

    async def construct():
        replica = object.__new__(type("Shipped", (shipped,), {"__del__": lambda self: None}))
        await base.__init__(replica, {"artifacts": str(artifact), "backend": "cpu", "threads_per_replica": 1,
                                      "instance_type": "inf2.xlarge", "api_key": "shipped-key"})
        await asyncio.wrap_future(replica.loaded)
        await stop(replica)
        return replica

    saved = app_module.FastRoutes.replica, edge_state()
    try:
        replica = asyncio.run(construct())
        assert app_module.FastRoutes.replica is replica
        assert Edge.installed_keys is replica.keys and Edge.installed_keys.allows(b"Bearer shipped-key")
        assert Edge.outer_returns_id  # Serve adds the response's x-request-id
        assert not Edge.installed_keys.allows(None)
    finally:
        app_module.FastRoutes.replica = saved[0]
        restore_edge(saved[1])


@pytest.mark.parametrize("sent", [b"client-id-9", None])
def test_under_serves_request_id_middleware_the_answer_carries_one_id_the_same_the_replica_used(monkeypatch, sent):
    """Ray Serve wraps every replica's application in its RequestIdMiddleware, which passes the
    client's id through (or makes one) and adds it to the response: the edge then adds none."""
    from ray.serve._private.http_util import RequestIdMiddleware

    seen = {}

    async def app(scope, receive, send):
        seen["current"] = request_ids.current()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    monkeypatch.setattr(Edge, "outer_returns_id", True)
    headers = [(b"x-request-id", sent)] if sent else []
    sent_back = asyncio.run(_call(RequestIdMiddleware(Edge(app, keys=lambda: None)), headers=headers))
    ids = [v.decode() for k, v in sent_back[0]["headers"] if k.lower() == b"x-request-id"]
    assert len(ids) == 1 and ids[0] == seen["current"] and (sent is None or ids[0] == sent.decode())
