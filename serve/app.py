"""The Ray Serve application: one deployment, `NeuronServe`, whose replicas each hold an engine on
their NeuronCore(s) (or CPU threads) and answer HTTP themselves (FastAPI ingress, no second hop).

Routes: OpenAI `/v1/embeddings` and `/v1/models`; rerank as Cohere and Jina shape it, `/v1/rerank`;
TEI's `/embed`, `/embed_sparse`, `/predict` (texts and text pairs), `/rerank`, `/tokenize`, `/decode`, `/info` and `/health`;
KServe Open Inference Protocol v2 under `/v2`. Every answer that ran the model says in
`x-truncated-inputs` how many of its inputs were cut to the longest the model serves. Start it with `neuronserve serve`, or from a Serve config with
`import_path: neuronserve.serve.app:build_app` and `args:` any `serve.settings.AppArgs` field.

Every request passes `serve.edge.Edge` first (request ids, API keys: docs/security.md).

This module is the HTTP and Ray layer only: lifecycle, routes and error mapping. The protocols
(parsing, response bodies, error shapes, declared types) are `serve.protocols`; the engine, batcher
and metrics come from the composition root, `serve.replica`; placement is `serve.placement`.
"""

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from neuronserve.serve import tracing
from neuronserve.serve import request_ids
from neuronserve.serve.auth import ApiKeys, digest, parse_keys
from neuronserve.serve.edge import Edge
from neuronserve.serve.errors import BadRequest, InputError, NotFound, NotLoaded, NotReady, RequestTimeout, ServeError
from neuronserve.serve.metrics import use_multiproc_dir
from neuronserve.serve.placement import DEPLOYMENT_NAME, deployment_options
from neuronserve.serve.protocols import cohere, kserve, openai, tei
from neuronserve.serve.buckets import truncated_count
from neuronserve.serve.protocols.common import (ROUTE_FOR_TASK, article, check_headers, check_model, component_schemas, decode,
                                                read_capped, request_body, server_version)
from neuronserve.serve.settings import AppArgs

log = logging.getLogger(__name__)


class Routed:
    """The model a request was routed to when the replica serves several (`NeuronServe._model`),
    for its metrics and span; unset (None) with one model served, whose request path sets nothing.
    A module-level class, so Serve's by-value copy of the deployment reaches it by reference (a
    context variable itself cannot be pickled)."""

    model: contextvars.ContextVar = contextvars.ContextVar("neuronserve_routed_model", default=None)
    # A request another replica sent on (`NeuronServe.forwarded`): the model it was loaded for.
    pinned: contextvars.ContextVar = contextvars.ContextVar("neuronserve_pinned_model", default=None)


# The POST routes that choose a model from the body: a request for a catalog model not loaded where
# it arrived is answered by the same route on the replica it is sent to (`NeuronServe.forwarded`).
FORWARDED_ROUTES = {"/v1/embeddings": "embeddings", "/predict": "predict", "/embed": "tei_embed",
                    "/embed_sparse": "tei_embed_sparse", "/v1/rerank": "rerank", "/rerank": "tei_rerank",
                    "/tokenize": "tokenize_route", "/decode": "decode_route"}


class Held:
    """A model of the catalog loaded on demand, as Ray Serve's model multiplexing keeps it: when it
    is the least recently used and room is needed, multiplexing calls `__del__` (on a worker
    thread), which retires the model (`NeuronServe._retire`) and returns once it is gone, so the
    next model loads into the memory it held. Later calls (garbage collection) do nothing."""

    def __init__(self, app: "NeuronServe", replica):
        self.app, self.replica, self.gone = app, replica, False

    def __del__(self):
        if self.gone:
            return
        self.gone = True
        self.app._unload(self.replica)

class API(FastAPI):
    """FastAPI with `serve.edge.Edge` and `FastRoutes` outside its own middleware (error pages,
    telemetry, body limit, exception routing): the hot route passes two thin layers instead of five,
    and request ids and API keys still hold for every route. Our routes answer their own errors,
    and Edge answers anything that escapes them (docs/decisions.md, "The embeddings fast path")."""

    def build_middleware_stack(self):
        return Edge(FastRoutes(super().build_middleware_stack()))


api = API(title="neuronserve", docs_url="/docs", redoc_url=None)

# Declared for /openapi.json only: the routes read their bodies themselves (`serve.protocols`).
REQUEST_TYPES = (openai.EmbeddingsRequest, tei.PredictRequest, kserve.InferRequest, cohere.RerankRequest,
                 tei.TEIRerankRequest, tei.TokenizeRequest, tei.DecodeRequest, tei.EmbedRequest, tei.SparseEmbedRequest)


def openapi() -> dict:
    """FastAPI's schema plus the request types the POST routes declare through `openapi_extra`."""
    if api.openapi_schema is None:
        schema = FastAPI.openapi(api)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas(list(REQUEST_TYPES)))
    return api.openapi_schema


api.openapi = openapi


def declared(request: type | None, response: type, error: type) -> dict:
    """A route's OpenAPI declarations: its request body, its answer and its error shape."""
    extra = {"openapi_extra": request_body(request)} if request is not None else {}
    return {**extra, "response_model": response, "responses": {"4XX": {"model": error}, "5XX": {"model": error}}}

class FastRoutes:
    """ASGI middleware: POST /v1/embeddings, the hot route, goes straight to the replica's handler,
    past FastAPI's routing, dependency solving and exception middleware (the handler answers every
    error itself). The same handler and Response as through FastAPI; every other route, and any
    request before the replica exists, takes FastAPI's way. Why: less event-loop CPU per request
    (docs/decisions.md, "The embeddings fast path")."""

    # The replica of this process (Ray runs each replica in a process of its own), set by its
    # constructor. A class attribute, not a module global: Serve runs the replica's class as a
    # by-value copy (cloudpickle) whose functions have module globals of their own, so a global
    # set there never reaches this module; a module-level class is shared by reference.
    replica: "NeuronServe | None" = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        replica = FastRoutes.replica
        if replica is not None and scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if path == "/v1/embeddings":
                response = await replica.embeddings(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def dumps(obj: Any) -> bytes:
    """JSON for responses. float32 arrays go out as the shortest text that reads back to the
    same float32 (as OpenAI's embeddings look): about half the bytes of float64 text, and far
    quicker to encode (docs/decisions.md, "Response JSON")."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(e: ServeError, error_body) -> Response:
    """The one mapping of errors to responses: the error's status and headers, the protocol's body."""
    return Response(dumps(error_body(e)), status_code=e.status, media_type="application/json", headers=e.headers)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class NeuronServe:
    tracing: "tracing.Tracing | None" = None  # set when `otlp_endpoint` is (serve.tracing)
    tokenizing = None  # set once loaded: requests of several texts tokenize off the event loop (serve.tokenizing)

    async def __init__(self, args: dict, key_digests: tuple[str, ...] = (), device=None):
        self.started = time.perf_counter()  # the start of the replica's `ready` start-up phase
        # The replica's environment may add keys (NEURONSERVE_API_KEY, NEURONSERVE_API_KEY_FILE:
        # validating the settings reads them); `key_digests` are those the builder was given.
        self.args = AppArgs.model_validate(args)
        # With `--host-processes`: the device replica's handle (`serve.device`); this process
        # answers HTTP and tokenizes, and its rows run there (`serve.remote`).
        self.device = device
        use_multiproc_dir(self.args.metrics_dir)  # before any metric of this process exists
        self.keys = ApiKeys.from_keys(self.args.api_keys(), key_digests)
        if self.keys:
            log.info("API keys required: %d accepted", len(self.keys))
        # A thread-safe future, not an asyncio.Event: loading runs in a worker thread and, depending
        # on Serve's mode, requests may run on another event loop than __init__.
        self.loaded: concurrent.futures.Future = concurrent.futures.Future()
        self.warmup_error: str | None = None
        # Set once loaded, from the composition root (`serve.replica.build_replica`).
        self.replica = None  # the first model's (`serve.replica.Replica`); `models` holds them all
        self.served = None
        self.engine = None
        self.batcher = None
        self.metrics = None
        self.limits = None
        self.replica_started = time.time()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit use)
            self.replica_id = str(os.getpid())
        self.tracing = tracing.setup(self.args.otlp_endpoint, self.replica_id)
        # Loading and warm-up run in the background so liveness answers at once and readiness
        # can say 503 until every bucket is warm; requests that arrive meanwhile wait for it.
        self._startup = asyncio.get_running_loop().create_task(self._start())
        self._ticker: asyncio.Task | None = None
        self._lag_probe: asyncio.Task | None = None
        # Both are module-level classes, so these reach the real ones (see `FastRoutes.replica`).
        Edge.install(self.keys, self._observe, outer_returns_id=True)  # Serve's RequestIdMiddleware
        FastRoutes.replica = self

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self.loaded.done() and self.warmup_error is None

    async def _start(self) -> None:
        try:
            device = None
            if self.device is not None:  # a host process: the device replica loads and warms up
                from neuronserve.common import logs

                logs.configure_from_env()
                device = await self.device.ready.remote()
            await asyncio.get_running_loop().run_in_executor(None, self._load, device)
            if self.served.catalog is not None:
                await self._preload()
        except Exception as e:  # surfaced through readiness and 503s, and the replica log
            log.exception("replica failed to start")
            self.warmup_error = str(e)
            self.loaded.set_result(False)
            return
        self.loaded.set_result(True)
        from neuronserve.serve.replica import tick_every_second

        self._ticker = asyncio.get_running_loop().create_task(tick_every_second(self.served))
        self._lag_probe = asyncio.get_running_loop().create_task(self._probe_lag())

    async def _probe_lag(self, period_s: float = 0.1) -> None:
        """Event-loop lag, the host-saturation signal: how late a `period_s` timer fires. Ten
        wake-ups a second cost nothing next to the requests; a loop busy with HTTP, tokenizing
        and responses wakes it late (docs/host-sizing.md)."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(period_s)
            try:
                self.metrics.loop_lag(loop.time() - t0 - period_s)
            except Exception:
                log.exception("event-loop lag probe failed")
                return

    def _load(self, device: dict | None = None) -> None:
        """Build what this replica serves (blocking). `device`: a host process' device replica, as
        it described itself once ready (`serve.device.NeuronDevice.ready`)."""
        from neuronserve.serve.replica import build_host_models, build_models
        from neuronserve.serve.tokenizing import Tokenizing

        if device is not None:
            models = build_host_models(self.args, self._device_call, device)
            log.info("host process ready: rows go to the device replica (%s)", ", ".join(models.names))
        else:
            models = build_models(self.args, started=self.started)
        for one in models.replicas:
            if self.tracing is not None and self.device is None:
                self.tracing.attach(one.batcher)
            one.tokenizing = Tokenizing(one.engine.tokenize)
        if models.catalog is not None:  # models load on demand (`_preload`, `_get_model`)
            self.served = models
            return
        self._serving(models)

    async def _device_call(self, model: str, requests: list):
        """One call to the device replica (`serve.remote.RemoteBatcher`): many requests' rows."""
        return await self.device.run.remote(model, requests)

    def _serving(self, models) -> None:
        """The replica serves `models` from now on; its first is the default."""
        replica = self.replica = models.default
        self.engine, self.metrics = replica.engine, replica.metrics
        self.model_name, self.limits = replica.model_name, replica.limits
        self.tokenizing = replica.tokenizing
        self.served = models
        self.batcher = replica.batcher  # last: a set batcher means loaded (`reconfigure`)

    def reconfigure(self, user_config: dict) -> None:
        """Serve user_config: batching knobs change live, without a restart."""
        self.args = self.args.with_user_config(user_config)
        if self.batcher is not None:  # loaded
            self.served.configure(self.args)
            self.limits = self.replica.limits

    def health_problem(self) -> str | None:
        """Why this replica cannot serve, once loaded (`Replica.health_problem`), or None."""
        return self.served.health_problem() if self.served is not None and self.batcher is not None else None

    # -- a catalog larger than a replica holds ------------------------------------------------
    async def _preload(self) -> None:
        """Catalog mode: the first `max_models_per_replica` models, loaded through multiplexing
        (which keeps them, least recently used first, and tells Serve's router which models this
        replica holds)."""
        from ray import serve as ray_serve

        import threading

        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        async def load(model_id: str) -> Held:  # a function: multiplexing keeps its state on it
            return await self._load_model(model_id)

        self._get_model = ray_serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(load)
        for name in self.served.names[: self.args.max_models_per_replica]:
            await self._get_model(name)
        self._serving(self.served)

    async def _load_model(self, name: str) -> Held:
        """Multiplexing's loader: build the model off the event loop, then serve it here."""
        from neuronserve.serve.metrics import hold_cores
        from neuronserve.serve.replica import describe_startup, load_model
        from neuronserve.serve.tokenizing import Tokenizing

        replica = await asyncio.get_running_loop().run_in_executor(None, load_model, self.args, self.served, name)
        if self.tracing is not None:
            self.tracing.attach(replica.batcher)
        replica.tokenizing = Tokenizing(replica.engine.tokenize)
        if not getattr(self, "_cores_held", False):  # the replica's cores, counted once whatever it holds
            self._cores_held = True
            hold_cores(replica.metrics.backend, replica.metrics.cores)
        self.served.add(replica)
        log.info("model %s loaded on demand (%s)", name, describe_startup(replica.startup_s, replica.timings))
        return Held(self, replica)

    def _unload(self, replica) -> None:
        """Multiplexing evicts `replica` (least recently used): retire it on the event loop; from
        another thread, wait until it is gone (its rows answered, its graphs released)."""
        import threading

        loop = getattr(self, "_loop", None)
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:  # garbage collection on the loop: no waiting here
            loop.create_task(self._retire(replica))
            return
        try:
            asyncio.run_coroutine_threadsafe(self._retire(replica), loop).result(self.args.request_timeout_s + 10)
        except Exception:
            log.exception("unloading model %s failed", replica.model_name)

    async def _retire(self, replica) -> None:
        if self.served.remove(replica.model_name) is None:
            return
        replica.metrics.evicted()
        await replica.batcher.drain(self.args.request_timeout_s)
        if replica.tokenizing is not None:
            replica.tokenizing.close()
        replica.metrics.close()
        replica.engine = replica.batcher.run_bucket = replica.batcher.run_inline = None  # the graphs go now
        log.info("model %s unloaded (least recently used)", replica.model_name)

    async def _forward(self, e, route: str, request: Request | None) -> Response:
        """A request for a model of the catalog not loaded here: to a replica that holds it,
        through Serve's router (`multiplexed_model_id`); if none does, one loads it."""
        from ray import serve as ray_serve

        handle = getattr(self, "_self_handle", None)
        if handle is None:
            app = ray_serve.get_replica_context().app_name
            handle = self._self_handle = ray_serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app)
        raw = dumps(e.body) if e.body is not None else await request.body()
        path = request.scope["path"]
        headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-length"]
        status, out_headers, content = await handle.options(multiplexed_model_id=e.name).forwarded.remote(
            path, raw, headers)
        return Response(content, status_code=status, headers=dict(out_headers))

    async def forwarded(self, path: str, raw: bytes, headers: list) -> tuple[int, list, bytes]:
        """A request another replica sent on (`_forward`), for the model Serve's router chose this
        replica for: loaded here if it is not (evicting the least recently used), then answered by
        its route as if it had come in here."""
        from ray import serve as ray_serve

        await self._wait_ready()
        held = await self._get_model(ray_serve.get_multiplexed_model_id())
        Routed.pinned.set(held.replica)
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        request = Request({"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
                           "headers": [(bytes(k), bytes(v)) for k, v in headers]}, receive)
        route = FORWARDED_ROUTES.get(path)
        if route is not None:
            response = await getattr(self, route)(request)
        elif path.startswith("/v2/models/") and path.endswith("/infer"):
            response = await self.v2_infer(path[len("/v2/models/"):-len("/infer")], request)
        else:
            response = error_response(NotFound(f"route {path} does not route by model"), kserve.error_body)
        return response.status_code, [(k, v) for k, v in response.headers.items() if k != "content-length"], response.body

    def check_health(self) -> None:
        if self.warmup_error:
            raise RuntimeError(f"replica failed to start: {self.warmup_error}")
        problem = self.health_problem()
        if problem:  # Serve restarts a replica whose health check keeps failing
            raise RuntimeError(f"replica unhealthy: {problem}")

    async def __del__(self):
        # Serve stops routing to a replica before this; let queued and running rows finish. A
        # constructor that failed early left no batcher (and maybe no settings) behind.
        models = getattr(self, "served", None)
        if models is not None and getattr(self, "batcher", None) is not None:
            await asyncio.gather(*(r.batcher.drain(self.args.request_timeout_s) for r in models.replicas))
            for r in models.replicas:
                if r.tokenizing is not None:
                    r.tokenizing.close()
        if self.tracing is not None:  # export the spans still buffered
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    async def _wait_ready(self) -> None:
        if not self.loaded.done():
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.loaded)), timeout=self.args.request_timeout_s)
            except asyncio.TimeoutError:
                raise NotReady("model is still warming up; retry shortly", headers={"Retry-After": "5"}) from None
        if self.warmup_error:
            raise NotReady("model failed to load on this replica; see the server log")
        if self.health_problem():  # until Ray replaces it: a retry may reach a healthy replica
            raise NotReady("this replica is unhealthy (its backend keeps failing) and is being replaced; retry",
                           headers={"Retry-After": "1"})

    # -- request plumbing -----------------------------------------------------------------------
    async def _body(self, request: Request) -> Any:
        headers = request.headers
        limit = self.args.max_body_bytes
        length = headers.get("content-length")
        check_headers(headers.get("content-type", ""), length, limit)
        if length is None:  # chunked: never buffered whole before the limit is checked
            return decode(await read_capped(request.stream(), limit), limit)
        return decode(await request.body(), limit)

    async def _route(self, name, task: str | None = None, body: Any = None):
        """The model a request names (`model` in its body, or its path), when the replica serves
        several (`serve.replica.Models.pick`; with one, the handlers take `self.replica` without
        calling this, and its protocol's parse checks the name as before). In catalog mode a model
        loaded here counts as used now (least recently used goes first); one that is not raises
        `NotLoaded`, which `_guard` sends on to a replica that holds it."""
        models = self.served
        pinned = Routed.pinned.get()
        if pinned is not None and (name is None or name == pinned.model_name):
            replica = pinned
        else:
            try:
                replica = models.pick(name, task)
            except NotLoaded as e:
                e.body = body
                raise
            if models.catalog is not None:
                replica = (await self._get_model(replica.model_name)).replica
        Routed.model.set(replica)
        return replica

    async def _tokenize(self, texts: list[str], truncate: bool, replica=None) -> list[list[int]]:
        """Token rows of `texts`: one text on the event loop (about 0.1 ms, what a hand-off would
        cost), several on the tokenizing thread with other requests' texts (serve.tokenizing)."""
        replica = replica or self.replica
        with tracing.span("tokenize"):
            if len(texts) == 1 or replica.tokenizing is None:
                return replica.engine.tokenize(texts, truncate)
            return await replica.tokenizing.submit(texts, truncate)

    async def _infer(self, rows: list[list[int]], route: str, replica=None) -> tuple[list, dict]:
        """Run rows through the model's batcher; returns (raw outputs, timing headers). Inputs that
        were cut to the model's length are counted in `x-truncated-inputs` and the metrics."""
        replica = replica or self.replica
        batcher = replica.batcher
        t0 = time.perf_counter()
        timing: dict = {}
        try:
            outs = await asyncio.wait_for(batcher.submit(rows, timing), timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"request took longer than {self.args.request_timeout_s:g} s (request_timeout_s)") from None
        total_ms = (time.perf_counter() - t0) * 1000
        tokens = sum(len(r) for r in rows)
        if self.tracing is not None:
            self.tracing.inferred(t0, timing, len(rows), tokens)
        truncated = truncated_count(rows)
        if truncated:
            self.metrics.truncated(route, truncated)
        return outs, {"x-total-time": f"{total_ms:.2f}", "x-queue-time": f"{timing['queue_s'] * 1000:.2f}",
                      "x-inference-time": f"{timing['inference_s'] * 1000:.2f}", "x-tokens": str(tokens),
                      "x-inputs": str(len(rows)), "x-truncated-inputs": str(truncated)}

    def _observe(self, route: str, status: int, started: float) -> None:
        replica = Routed.model.get()  # the model a request of several served was routed to; else the first
        if replica is None:
            if self.metrics is not None:
                self.metrics.request(route, status, time.perf_counter() - started)
            if self.tracing is not None:
                self.tracing.end(status, getattr(self, "model_name", None))
            return
        replica.metrics.request(route, status, time.perf_counter() - started)
        if self.tracing is not None:
            self.tracing.end(status, replica.model_name)

    async def _guard(self, route: str, error_body, handler, request: Request | None = None,
                     input_error=None) -> Response:
        """The one error handler: every error answers with its status in the route's protocol.
        `input_error` maps an input the engine refused to the protocol's error (default: 400)."""
        started = time.perf_counter()
        if self.tracing is not None:  # ended in _observe, which every way out calls once
            self.tracing.begin(route, request, getattr(self, "model_name", None))
        try:
            await self._wait_ready()
            try:
                response = await handler()
            except NotLoaded as e:  # a catalog model held by another replica, or to load
                response = await self._forward(e, route, request)
                if self.tracing is not None:
                    self.tracing.end(response.status_code, e.name)
                return response  # observed where it was answered
        except ServeError as e:
            self._observe(route, e.status, started)
            if e.status in (500, 504):  # the id finds the replica's log lines about it
                e = type(e)(f"{e.message} (request id {request_ids.current()})", headers=e.headers)
            return error_response(e, error_body)
        except InputError as e:  # from the engine: the input cannot be served as given
            err = input_error(e) if input_error is not None else BadRequest(str(e), param=e.param)
            self._observe(route, err.status, started)
            return error_response(err, error_body)
        except asyncio.CancelledError:
            self._observe(route, 499, started)  # client went away; its rows were dropped
            raise
        except Exception:
            rid = request_ids.current()
            log.exception("unhandled error on %s (request id %s)", route, rid)
            e = ServeError(f"internal error; see the server log (request id {rid})")
            self._observe(route, 500, started)
            return error_response(e, error_body)
        self._observe(route, response.status_code, started)
        return response

    # -- OpenAI ---------------------------------------------------------------------------------
    @api.post("/v1/embeddings", **declared(openai.EmbeddingsRequest, openai.EmbeddingsResponse, openai.OpenAIError))
    async def embeddings(self, request: Request) -> Response:
        return await self._guard("/v1/embeddings", openai.error_body, lambda: self._embeddings(request), request)

    async def _embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, "embed", body)
        req = openai.parse(body, model.limits)
        engine = model.engine
        if req.texts is not None:
            rows = await self._tokenize(engine.with_prompt(req.texts), req.truncate, model)
        else:
            with tracing.span("tokenize"):
                rows = engine.rows_from_token_ids(req.token_ids, req.truncate)
        outs, headers = await self._infer(rows, "/v1/embeddings", model)
        import numpy as np

        with tracing.span("serialize"):
            vectors = engine.postprocess_embeddings(np.stack(outs), req.dimensions)
            payload = openai.format(vectors, req.encoding_format, model.model_name, int(headers["x-tokens"]))
            return Response(dumps(payload), media_type="application/json", headers=headers)

    @api.get("/v1/models", **declared(None, openai.ModelList, openai.OpenAIError))
    async def models(self, request: Request) -> Response:
        async def listing() -> Response:
            return JSONResponse(openai.models(self.served.names, int(self.replica_started)))

        return await self._guard("/v1/models", openai.error_body, listing, request)

    # -- TEI-style classification --------------------------------------------------------------
    @api.post("/predict", **declared(tei.PredictRequest, tei.PredictResponse, tei.TEIError))
    async def predict(self, request: Request) -> Response:
        return await self._guard("/predict", tei.error_body, lambda: self._predict(request), request, tei.input_error)

    async def _predict(self, request: Request) -> Response:
        body = await self._body(request)
        # TEI has no `model`; we accept one to choose between several models.
        model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, "classify", body)
        req = tei.parse(body, model.limits)
        rows = await self._tokenize(req.texts, req.truncate, model)
        outs, headers = await self._infer(rows, "/predict", model)
        import numpy as np

        with tracing.span("serialize"):
            raw = np.stack(outs)
            if req.raw_scores:
                labels = model.engine.manifest.labels or {}
                ranked = [[(labels.get(j, f"LABEL_{j}"), float(row[j])) for j in range(row.shape[0])] for row in raw]
            else:
                ranked = model.engine.postprocess_labels(raw)
            return Response(dumps(tei.format(ranked, req.single)), media_type="application/json", headers=headers)

    # -- TEI embeddings, dense and sparse ----------------------------------------------------------
    @api.post("/embed", **declared(tei.EmbedRequest, tei.EmbedResponse, tei.TEIError))
    async def tei_embed(self, request: Request) -> Response:
        return await self._guard("/embed", tei.error_body, lambda: self._tei_embed(request, False), request,
                                 tei.input_error)

    @api.post("/embed_sparse", **declared(tei.SparseEmbedRequest, tei.SparseEmbedResponse, tei.TEIError))
    async def tei_embed_sparse(self, request: Request) -> Response:
        return await self._guard("/embed_sparse", tei.error_body, lambda: self._tei_embed(request, True), request,
                                 tei.input_error)

    async def _tei_embed(self, request: Request, sparse: bool) -> Response:
        import numpy as np

        route = "/embed_sparse" if sparse else "/embed"
        body = await self._body(request)
        model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, "sparse" if sparse else "embed", body)  # TEI has no `model`: as /predict
        engine = model.engine
        req = tei.parse_embed(body, model.limits, sparse)
        rows = await self._tokenize(engine.with_prompt(req.texts, req.prompt_name), req.truncate, model)
        outs, headers = await self._infer(rows, route, model)
        with tracing.span("serialize"):
            raw = np.stack(outs)
            if sparse:
                payload = tei.format_sparse(engine.postprocess_sparse(raw))
            else:
                payload = engine.postprocess_embeddings(raw, req.dimensions, req.normalize)
            return Response(dumps(payload), media_type="application/json", headers=headers)

    # -- rerank: Cohere / Jina, and TEI -----------------------------------------------------------
    @api.post("/v1/rerank", **declared(cohere.RerankRequest, cohere.RerankResponse, cohere.CohereError))
    async def rerank(self, request: Request) -> Response:
        return await self._guard("/v1/rerank", cohere.error_body, lambda: self._rerank(request), request)

    async def _rerank(self, request: Request) -> Response:
        body = await self._body(request)
        model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, "rerank", body)
        req = cohere.parse(body, model.limits)
        scores, headers = await self._scores(req.query, req.texts, req.truncate, False, "/v1/rerank", model)
        with tracing.span("serialize"):
            payload = cohere.format(req, scores, model.model_name, int(headers["x-tokens"]),
                                    int(headers["x-truncated-inputs"]), model.engine.max_len, request_ids.current() or "")
            return Response(dumps(payload), media_type="application/json", headers=headers)

    @api.post("/rerank", **declared(tei.TEIRerankRequest, tei.RerankResponse, tei.TEIError))
    async def tei_rerank(self, request: Request) -> Response:
        return await self._guard("/rerank", tei.error_body, lambda: self._tei_rerank(request), request, tei.input_error)

    async def _tei_rerank(self, request: Request) -> Response:
        body = await self._body(request)
        model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, "rerank", body)  # TEI has no `model`: as /predict
        req = tei.parse_rerank(body, model.limits)
        scores, headers = await self._scores(req.query, req.texts, req.truncate, req.raw_scores, "/rerank", model)
        with tracing.span("serialize"):
            return Response(dumps(tei.format_rerank(req, scores)), media_type="application/json", headers=headers)

    async def _scores(self, query: str, texts: list[str], truncate: bool, raw_scores: bool, route: str, model):
        """A score per (query, text) pair, in the texts' order, and the timing headers."""
        import numpy as np

        rows = await self._tokenize([(query, t) for t in texts], truncate, model)
        outs, headers = await self._infer(rows, route, model)
        return model.engine.postprocess_scores(np.stack(outs), raw_scores).tolist(), headers

    # -- TEI: tokenizer, model info, health -----------------------------------------------------
    @api.post("/tokenize", **declared(tei.TokenizeRequest, tei.TokenizeResponse, tei.TEIError))
    async def tokenize_route(self, request: Request) -> Response:
        async def run() -> Response:
            body = await self._body(request)
            model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, None, body)  # `model` chooses the tokenizer when several are served
            req = tei.parse_tokenize(body, model.limits)
            return Response(dumps(model.engine.tokens(req.texts, req.add_special_tokens)), media_type="application/json")

        return await self._guard("/tokenize", tei.error_body, run, request)

    @api.post("/decode", **declared(tei.DecodeRequest, tei.DecodeResponse, tei.TEIError))
    async def decode_route(self, request: Request) -> Response:
        async def run() -> Response:
            body = await self._body(request)
            model = self.replica if self.served.single else await self._route(
            body.get("model") if isinstance(body, dict) else None, None, body)
            req = tei.parse_decode(body, model.limits, model.engine.vocab_size)
            return Response(dumps(model.engine.decode(req.ids, req.skip_special_tokens)), media_type="application/json")

        return await self._guard("/decode", tei.error_body, run, request)

    @api.get("/info", **declared(None, tei.Info, tei.TEIError))
    async def info(self, request: Request) -> Response:
        async def run() -> Response:
            return JSONResponse(tei.info(self.engine.manifest, self.model_name, self.engine.max_len, self.limits,
                                         self.args.max_batch_tokens, server_version()))

        return await self._guard("/info", tei.error_body, run, request)

    @api.get("/health")
    async def health(self) -> Response:
        """TEI's health: 200 once the model answers, 503 (TEI's error shape) before or when it cannot."""
        problem = self.health_problem() or (None if self.is_ready else
                                            ("failed to load: see the server log" if self.warmup_error else "warming up"))
        if problem:
            return JSONResponse({"error": problem, "error_type": "unhealthy"}, status_code=503)
        return Response(status_code=200)

    # -- KServe Open Inference Protocol v2 ------------------------------------------------------
    @api.get("/v2/health/live")
    async def live(self) -> Response:
        return JSONResponse({"live": True})

    @api.get("/v2/health/ready")
    async def ready_route(self) -> Response:
        problem = self.health_problem()
        if problem:
            return JSONResponse({"ready": False, "replica": self.replica_id, "error": problem}, status_code=503)
        if self.is_ready:
            return JSONResponse({"ready": True, "replica": self.replica_id, "backend": self.engine.backend.health(),
                                 "startup_s": self.replica.startup_s, "timings": self.replica.timings,
                                 "models": self.served.names, "loaded": [r.model_name for r in self.served.replicas]})
        reason = "failed to load: see the server log" if self.warmup_error else "warming up"
        return JSONResponse({"ready": False, "error": reason}, status_code=503)

    @api.get("/v2")
    async def server_metadata(self) -> Response:
        return JSONResponse({"name": "neuronserve", "version": server_version(), "extensions": []})

    @api.get("/v2/models/{name}", **declared(None, kserve.ModelMetadata, kserve.V2Error))
    async def model_metadata(self, name: str) -> Response:
        try:
            await self._wait_ready()
            if self.served.catalog is not None and name in self.served.catalog:
                return JSONResponse(self._metadata(name))  # loaded here or not
            model = self.replica if self.served.single else self.served.pick(name)
            check_model(name, model.limits)
        except ServeError as e:
            return error_response(e, kserve.error_body)
        return JSONResponse(self._metadata(model.model_name))

    def _metadata(self, name: str) -> dict:
        """GET /v2/models/{name} of a model served: from its engine, or (a catalog model not
        loaded here) from its manifest."""
        model = self.served.by_name.get(name)
        if model is not None:
            m, kind = model.engine.manifest, model.engine.backend.kind
        else:
            from neuronserve.compile.store import read_manifest

            m = read_manifest(self.served.catalog[name][0])
            kind = self.args.backend if self.args.backend != "auto" else ("cpu" if m.target == "cpu" else "neuron")
        return kserve.model_metadata(name, m.cache_key[:12], f"neuronserve-{kind}", m.task, m.model.output_dim)

    @api.get("/v2/models", **declared(None, kserve.ModelIndex, kserve.V2Error))
    async def model_index(self) -> Response:
        """Every model served, with its metadata (what `/v2/models/{name}` says of each)."""
        try:
            await self._wait_ready()
        except ServeError as e:
            return error_response(e, kserve.error_body)
        return JSONResponse({"models": [self._metadata(n) for n in self.served.names]})

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> Response:
        if self.served is not None and name not in self.served.names:
            served = ", ".join(map(repr, self.served.names))
            message = (f"model {name!r} is not served here; this server serves {served}" if self.served.single
                       else f"model {name!r} is not served here; served models: {', '.join(self.served.names)}")
            return error_response(NotFound(message), kserve.error_body)
        if self.is_ready:
            return JSONResponse({"name": name, "ready": True})
        return JSONResponse({"name": name, "ready": False}, status_code=503)

    @api.post("/v2/models/{name}/infer", **declared(kserve.InferRequest, kserve.InferResponse, kserve.V2Error))
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._guard("/v2/infer", kserve.error_body, lambda: self._v2_infer(name, request), request)

    async def _v2_infer(self, name: str, request: Request) -> Response:
        import numpy as np

        model = self.replica if self.served.single else await self._route(name)
        engine = model.engine
        req = kserve.parse(await self._body(request), model.limits, name)
        if engine.task_info.head not in ("pooled", "logits") or not engine.task_info.singles:
            raise NotFound(f"this server runs {article(engine.task)} {engine.task} model, which v2 does not serve here; use "
                           f"{ROUTE_FOR_TASK[engine.task]}")
        texts = engine.with_prompt(req.texts) if engine.task == "embed" else req.texts
        rows = await self._tokenize(texts, req.truncate, model)
        outs, headers = await self._infer(rows, "/v2/infer", model)
        with tracing.span("serialize"):
            raw = np.stack(outs)
            if engine.task == "embed":
                payload = kserve.format_embeddings(model.model_name, req.id, engine.postprocess_embeddings(raw))
            else:
                best = [ranked[0] for ranked in engine.postprocess_labels(raw)]
                payload = kserve.format_labels(model.model_name, req.id, best)
            payload["parameters"] = {"truncated_inputs": int(headers["x-truncated-inputs"])}
            return Response(dumps(payload), media_type="application/json", headers=headers)


def build_app(args: AppArgs):
    """Ray Serve application builder (`import_path: neuronserve.serve.app:build_app`); Serve validates the
    config's `args` into `AppArgs`."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    from neuronserve.serve.generation import deployment as generation

    if generation.generative(args):  # a causal LM: vLLM's engine behind the OpenAI routes
        return generation.build_from_args(args)
    options, args = deployment_options(args)
    # Keys given here (flag, or this process' environment) travel as digests only: Serve keeps the
    # bound arguments and shows them. Each replica also reads its own environment and key file.
    digests = tuple(digest(k) for k in parse_keys(args.api_key.get_secret_value())) if args.api_key else ()
    bound = args.model_dump(exclude={"api_key"})
    if args.host_processes > 1:  # a device replica per NeuronCore group, fed by host processes (serve.remote)
        from neuronserve.serve.device import NeuronDevice
        from neuronserve.serve.placement import host_process_options

        device = NeuronDevice.options(**options).bind(bound)
        return NeuronServe.options(**host_process_options(options, args)).bind(bound, digests, device)
    return NeuronServe.options(**options).bind(bound, digests)
