"""The outermost ASGI middleware of the HTTP layer: request ids and API keys, for every route.

It wraps the whole application, `serve.app.FastRoutes`' shortcut for /v1/embeddings included, so
no route can skip it. For each HTTP request it:

* takes the client's `x-request-id` when sane or makes one (`serve.request_ids`), puts it in the
  request's headers, in `scope["state"]["request_id"]` (`request.state.request_id`) and in the
  contextvar `request_ids.current()` for the whole handling, and returns it on the response;
* with API keys configured (`serve.auth`), answers 401 before the application sees the request
  unless it carries `Authorization: Bearer <key>`; the body is the route's own error shape
  (OpenAI under /v1, Cohere's for /v1/rerank, TEI for /predict, /rerank, /tokenize, /decode and
  /info, KServe v2 under /v2) and `WWW-Authenticate: Bearer` is set;
* answers an exception that escaped the application (the routes answer their own errors; this is
  the net under them) with a 500 in the route's shape naming the request id, logged with it,
  instead of Starlette's plain-text 500 without the id.

Open without a key: the health routes (/v2/health/*, TEI's /health), which probes and load balancers call without
credentials, and the API's description (`/openapi.json`, `/docs`: the same static text for every
deployment, no model name, no data; a browser loading /docs cannot send a bearer header).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import orjson

from neuronserve.serve import request_ids
from neuronserve.serve.auth import ApiKeys
from neuronserve.serve.errors import ServeError, Unauthorized
from neuronserve.serve.protocols import cohere, kserve, openai, tei

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/health", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect"})
TEI_PATHS = frozenset({"/embed", "/embed_sparse", "/predict", "/rerank", "/tokenize", "/decode", "/info"})
ROUTE_LABELS = frozenset({"/v1/embeddings", "/v1/models", "/v1/rerank", "/v2", "/v1/completions",
                          "/v1/chat/completions", *TEI_PATHS})
_HEADER = request_ids.HEADER.encode()

log = logging.getLogger(__name__)


def route_path(scope) -> str:
    """The path inside the application (the route prefix stripped, as FastAPI does)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path


def error_body_for(path: str) -> Callable[[ServeError], object]:
    """The protocol whose error shape a path answers in.

    >>> error_body_for("/predict") is tei.error_body, error_body_for("/v2/models/m/infer") is kserve.error_body
    (True, True)
    >>> error_body_for("/v1/rerank") is cohere.error_body, error_body_for("/rerank") is tei.error_body
    (True, True)
    """
    if path in TEI_PATHS or path.startswith("/predict/"):
        return tei.error_body
    if path == "/v1/rerank":
        return cohere.error_body
    if path == "/v2" or path.startswith("/v2/"):
        return kserve.error_body
    return openai.error_body


def route_label(path: str) -> str:
    """A bounded metrics label for a path (paths carry model names the client chose).

    >>> route_label("/v2/models/anything/infer"), route_label("/v1/embeddings"), route_label("/x/y")
    ('/v2/infer', '/v1/embeddings', 'other')
    """
    if path in ROUTE_LABELS:
        return path
    if path.startswith("/v2/models/"):
        return "/v2/infer" if path.endswith("/infer") else "/v2/models"
    return "other"


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class Edge:
    """See the module docstring. The keys (None or empty: no authentication) and the counter of
    refused requests (`observe(route, status, seconds)`) are the ones the replica of this process
    installed (`Edge.install`), unless given here (`keys()` / `observe()` getters, for tests)."""

    # Class state, set by the replica's constructor: it runs as a by-value copy whose module
    # globals are its own, while a module-level class is shared by reference (serve.app.FastRoutes).
    installed_keys: ApiKeys | None = None
    installed_observe: Callable | None = None
    # Under Ray Serve, its own RequestIdMiddleware wraps every application (outside this one): it
    # passes the client's x-request-id through (or makes one) and always adds it to the response.
    # A second header from here would duplicate it, so then this one adds none.
    outer_returns_id: bool = False

    @classmethod
    def install(cls, keys: ApiKeys | None, observe: Callable | None = None, *, outer_returns_id: bool = False) -> None:
        Edge.installed_keys, Edge.installed_observe, Edge.outer_returns_id = keys, observe, outer_returns_id

    def __init__(self, app, keys: Callable[[], ApiKeys | None] | None = None,
                 observe: Callable[[], Callable | None] | None = None):
        self.app = app
        self.keys = keys or (lambda: Edge.installed_keys)
        self.observe = observe or (lambda: Edge.installed_observe)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; there are no websocket routes
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_ids.accept(_header(scope, _HEADER))
        raw = rid.encode()
        scope["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k != _HEADER] + [(_HEADER, raw)]
        state = scope.get("state")
        if not isinstance(state, dict):
            state = scope["state"] = {}
        state["request_id"] = rid

        started_response = False

        add_header = not Edge.outer_returns_id

        async def send_with_id(message):
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
            if message["type"] == "http.response.start" and add_header:
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                message = {**message, "headers": [*headers, (_HEADER, raw)]}
            await send(message)

        token = request_ids.set_current(rid)
        try:
            keys = self.keys()
            path = route_path(scope)
            if keys and path not in OPEN_PATHS:
                presented = _header(scope, b"authorization")
                if not keys.allows(presented):
                    await self._refuse(scope, receive, send_with_id, path, presented is not None, started)
                    return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s (request id %s)", scope.get("method"), route_path(scope), rid)
            if started_response:  # nothing left to answer with: the server drops the connection
                raise
            e = ServeError(f"internal error; see the server log (request id {rid})")
            await self._answer(scope, receive, send_with_id, route_path(scope), e)
        finally:
            request_ids.reset(token)

    @staticmethod
    async def _answer(scope, receive, send, path: str, e: ServeError) -> None:
        from starlette.responses import Response

        body = orjson.dumps(error_body_for(path)(e))
        await Response(body, status_code=e.status, media_type="application/json", headers=e.headers)(scope, receive, send)

    async def _refuse(self, scope, receive, send, path: str, presented: bool, started: float) -> None:
        if presented:
            e = Unauthorized("invalid API key: the Authorization header does not carry a key this server accepts")
        else:
            e = Unauthorized("missing API key: send the header `Authorization: Bearer <key>`", code=None)
        await self._answer(scope, receive, send, path, e)
        observe = self.observe()
        if observe is not None:
            observe(route_label(path), e.status, time.perf_counter() - started)
