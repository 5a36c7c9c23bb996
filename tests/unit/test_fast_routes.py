"""`serve.app.FastRoutes`: POST /v1/embeddings goes straight to the replica's handler; everything
else, and anything before the replica exists, goes through FastAPI. And the HTTP layer's adapters
on that path (body, protocol, engine, one error handler), and its OpenAPI declarations."""

import asyncio

import pytest
from starlette.responses import Response

import neuronserve.serve.app as app_module
from neuronserve.serve.edge import Edge
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
    monkeypatch.setattr(FastRoutes, "replica", replica)
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
    monkeypatch.setattr(FastRoutes, "replica", None)
    call(mw, "POST", "/v1/embeddings")
    assert calls == [("POST", "/v1/embeddings")] and replica.bodies == []


def test_the_app_routes_through_edge_then_fast_routes_outside_fastapis_middleware():
    stack = app_module.API(title="t").build_middleware_stack()
    assert type(stack) is Edge and type(stack.app) is FastRoutes
    assert type(stack.app.app).__name__ == "ServerErrorMiddleware"  # FastAPI's own stack, inside both


# -- the adapters, on a replica with a stand-in engine and batcher (no Ray, no model) -------------
class StandInEngine:
    task, model_name = "embed", "tiny"

    def tokenize(self, texts, truncate=True):
        from neuronserve.serve.errors import InputTooLong

        if not truncate and any(len(t) > 20 for t in texts):
            raise InputTooLong(30, 16, index=0)
        return [[101, *range(1, len(t) + 1), 102] for t in texts]

    def rows_from_token_ids(self, ids_list, truncate=True):
        return [[101, *ids, 102] for ids in ids_list]

    def with_prompt(self, texts, prompt_name=None):  # a model without prompts
        return texts

    def postprocess_embeddings(self, raw, dimensions=None):
        from neuronserve.serve.errors import InputError

        if dimensions is not None and not 1 <= dimensions <= raw.shape[1]:
            raise InputError(f"dimensions must be between 1 and {raw.shape[1]}, got {dimensions}", "dimensions")
        return raw[:, :dimensions] if dimensions else raw


class StandInBatcher:
    async def submit(self, rows, timing):
        import numpy as np

        timing.update(queue_s=0.001, inference_s=0.002)
        return [np.full(4, len(r), dtype=np.float32) for r in rows]


def standin_replica(**args):
    """A `NeuronServe` as it is once loaded, without Serve: stand-ins for the engine and batcher."""
    import concurrent.futures

    import types

    from neuronserve.serve.replica import Models, limits_of
    from neuronserve.serve.settings import AppArgs

    # No drain at garbage collection (Serve awaits the real replica's async __del__).
    cls = type("StandInReplica", (app_module.NeuronServe.func_or_class,), {"__del__": lambda self: None})
    replica = object.__new__(cls)
    replica.args = AppArgs(artifacts="unused", max_inputs_per_request=4, **args)
    replica.loaded = concurrent.futures.Future()
    replica.loaded.set_result(True)
    replica.warmup_error, replica.metrics, replica.replica = None, None, None
    replica.keys = None
    replica.engine, replica.batcher, replica.model_name = StandInEngine(), StandInBatcher(), "tiny"
    replica.limits = limits_of(replica.args, "tiny", "embed")
    # The one model served, as `serve.replica.build_models` gives it.
    model = types.SimpleNamespace(engine=replica.engine, batcher=replica.batcher, model_name="tiny",
                                  limits=replica.limits, tokenizing=None, metrics=None,
                                  health_problem=lambda: None)
    model.engine.task = "embed"
    replica.replica, replica.served = model, Models([model])
    return replica


def post_embeddings(replica, body: bytes, content_type=b"application/json", headers: dict | None = None):
    """POST /v1/embeddings through FastRoutes to `replica` (with `headers` besides the content
    type): (status, headers, JSON body)."""
    import orjson

    async def fastapi_app(scope, receive, send):
        raise AssertionError("the fast path must not reach FastAPI")

    async def run():
        FastRoutes.replica = replica
        try:
            sent = []

            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "root_path": "",
                     "headers": [(b"content-type", content_type),
                                 *((k.encode(), v.encode()) for k, v in (headers or {}).items())],
                     "query_string": b""}
            await FastRoutes(fastapi_app)(scope, receive, send)
            return sent
        finally:
            FastRoutes.replica = None

    sent = asyncio.run(run())
    return sent[0]["status"], dict(sent[0]["headers"]), orjson.loads(sent[1]["body"])


def test_embeddings_answer_with_the_openai_body_and_timing_headers():
    status, headers, body = post_embeddings(standin_replica(), b'{"input": ["ab", "abcd"], "model": "tiny"}')
    assert status == 200
    assert [d["embedding"] for d in body["data"]] == [[4.0] * 4, [6.0] * 4]
    assert body["usage"] == {"prompt_tokens": 10, "total_tokens": 10} and body["model"] == "tiny"
    assert headers[b"x-tokens"] == b"10" and headers[b"x-inputs"] == b"2"
    assert headers[b"x-queue-time"] == b"1.00" and headers[b"x-inference-time"] == b"2.00" and b"x-total-time" in headers


@pytest.mark.parametrize("body, content_type, status, param, needle", [
    (b'{"input": "x" ', b"application/json", 400, None, "not valid JSON"),
    (b'{"input": "x"}', b"text/plain", 415, None, "application/json"),
    (b'{"input": ["a", "b", "c", "d", "e"]}', b"application/json", 400, "input", "5 inputs"),
    (b'{"input": "x", "model": "other"}', b"application/json", 404, "model", "other"),
    # errors from the engine (InputError) carry their status through the one handler
    (b'{"input": "x", "dimensions": 9}', b"application/json", 400, "dimensions", "between 1 and 4"),
    (b'{"input": "' + b"y" * 30 + b'", "truncate": false}', b"application/json", 400, "input", "truncate=true"),
])
def test_embeddings_errors_answer_in_openais_shape(body, content_type, status, param, needle):
    got, _, answer = post_embeddings(standin_replica(), body, content_type)
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and needle in answer["error"]["message"]


def test_openapi_declares_request_bodies_answers_and_error_shapes():
    schema = app_module.api.openapi()
    components = schema["components"]["schemas"]
    for path, request, answer, error in (
        ("/v1/embeddings", "EmbeddingsRequest", "EmbeddingsResponse", "OpenAIError"),
        ("/predict", "PredictRequest", "PredictResponse", "TEIError"),
        ("/v2/models/{name}/infer", "InferRequest", "InferResponse", "V2Error"),
    ):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{request}"}
        assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
        assert op["responses"]["4XX"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{error}"}
        assert {request, answer, error} <= set(components)
    assert app_module.api.docs_url == "/docs"


def test_a_replica_whose_constructor_failed_early_stops_without_an_error():
    # Serve awaits __del__ even when __init__ raised (e.g. invalid settings): nothing to drain then.
    shipped = app_module.NeuronServe.func_or_class
    ours = next(c for c in shipped.__mro__ if c.__name__ == "NeuronServe" and "__del__" in vars(c))
    replica = object.__new__(type("Failed", (shipped,), {"__del__": lambda self: None}))  # no second, unawaited one
    asyncio.run(ours.__del__(replica))
    assert getattr(replica, "batcher", None) is None
