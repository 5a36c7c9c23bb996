"""The Ray Serve application for a causal LM: one replica hosts one vLLM engine and the OpenAI
routes over it (docs/generation.md says why this is our own replica and not `ray.serve.llm`).

    app = build_generation_app(engine_args, env, model_name="tiny", num_cpus=2)
    serve.run(app, name="generate", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from neuronserve.serve.edge import Edge
from neuronserve.serve.errors import ServeError
from neuronserve.serve.generation.openai_api import OpenAIGeneration, error_body

DEPLOYMENT_NAME = "NeuronServeGeneration"
logger = logging.getLogger("ray.serve")


class _API(FastAPI):
    """FastAPI behind `serve.edge.Edge`, as the encoder server is: request ids, API keys (checked
    before a body is read or a sequence starts) and an OpenAI-shaped answer to anything that escapes."""

    def build_middleware_stack(self):
        return Edge(super().build_middleware_stack())


api = _API(title="neuronserve generation", docs_url=None, redoc_url=None)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(e: ServeError) -> Response:
    return Response(error_body(e), status_code=e.status, media_type="application/json", headers=e.headers)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class GenerationServer:
    """One vLLM engine (continuous batching across every request this replica takes)."""

    def __init__(self, engine_args: dict[str, Any], env: dict[str, str], model_name: str,
                 metrics: dict[str, Any] | None = None, key_digests: tuple[str, ...] = (),
                 api_key_file: str | None = None, artifact: dict[str, str] | None = None):
        from neuronserve.serve.auth import ApiKeys
        from neuronserve.serve.generation.engine import GenerationEngine
        from neuronserve.serve.settings import ServeSettings

        started = time.monotonic()
        self.metrics = None
        # The keys: the digests the builder was given, and those of this replica's environment
        # (NEURONSERVE_API_KEY, NEURONSERVE_API_KEY_FILE, as a Kubernetes Secret fills them) and file.
        settings = ServeSettings(api_key_file=api_key_file) if api_key_file else ServeSettings()
        self.keys = ApiKeys.from_keys(settings.api_keys(), key_digests)
        if self.keys:
            logger.info("API keys required: %d accepted", len(self.keys))
        Edge.install(self.keys, self._observe, outer_returns_id=True)  # Serve's RequestIdMiddleware adds the id
        if artifact is not None:  # from the store: pulled (and verified) on this node, or its cached copy
            engine_args, env = local_engine_config(engine_args, env, artifact)
        self.engine = GenerationEngine.start(engine_args, env, on_step=self._on_step)
        self.startup_s = time.monotonic() - started
        self.openai = OpenAIGeneration(self.engine, model_name)
        self._ticker = None
        if metrics is not None:
            self._start_metrics(model_name, metrics)

    def _start_metrics(self, model_name: str, m: dict[str, Any]) -> None:
        from neuronserve.common.pricing import detect_instance_type
        from neuronserve.serve.metrics import GenerationMetrics, use_multiproc_dir

        # After the engine started: vLLM's own Prometheus metrics (created as it starts, in this
        # process's default registry) stay out of the exporter's directory; only ours go there.
        use_multiproc_dir(m.get("metrics_dir"))
        instance_type = m.get("instance_type") or detect_instance_type() or "unknown"
        self.metrics = GenerationMetrics(model_name, m.get("backend", "cpu"), int(m.get("cores", 1)), instance_type,
                                         m.get("price_per_hour_usd"), None)
        self.metrics.startup({"ready": self.startup_s})
        self.engine.metrics = self.metrics
        self._ticker = asyncio.get_running_loop().create_task(self._tick_every_second())

    async def _tick_every_second(self) -> None:
        """Accrue allocated cost (and the busy time of running sequences) once a second. A method:
        the class is serialized as it is declared, before later module globals exist."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self.metrics.tick()
            except Exception:
                logger.exception("metrics tick failed")

    def _observe(self, route: str, status: int, seconds: float) -> None:
        """A request Edge answered itself (a refused key, an escaped error)."""
        if self.metrics is not None:
            self.metrics.answered(route, status)

    def _on_step(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        if self.metrics is not None:
            self.metrics.scheduler(running, waiting, kv_cache_usage)

    async def _serve(self, kind: str, request: Request) -> Response:
        prepare = self.openai.prepare_completion if kind == "completion" else self.openai.prepare_chat
        route = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
        try:
            r, ids, sampling = prepare(await request.body())
            if r.stream:
                response = StreamingResponse(self.openai.stream(kind, r, ids, sampling),
                                             media_type="text/event-stream", headers=_SSE_HEADERS)
            else:
                response = Response(orjson.dumps(await self.openai.complete(kind, r, ids, sampling)),
                                    media_type="application/json")
        except ServeError as e:
            response = _error(e)
        except Exception as e:  # a bug or a dead engine: logged, and answered in the protocol's shape
            logger.exception("generation request failed")
            response = _error(ServeError(f"the request failed: {type(e).__name__}: {e}"))
        if self.metrics is not None:
            self.metrics.answered(route, response.status_code)
        return response

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    @api.get("/v1/models")
    async def models(self) -> Response:
        return Response(orjson.dumps(self.openai.models()), media_type="application/json")

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(b"", status_code=200)

    @api.get("/v1/generation/stats")
    async def stats(self) -> Response:
        """The engine's unfinished sequences (vLLM's count), sequences aborted because their client
        left, and how long the engine took to start."""
        try:
            return Response(orjson.dumps({"unfinished": self.engine.running(), "aborted": self.engine.aborted,
                                          "startup_s": round(self.startup_s, 3)}), media_type="application/json")
        except Exception as e:
            logger.exception("stats failed")
            return _error(ServeError(f"stats failed: {type(e).__name__}: {e}"))

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self):
        ticker, metrics = getattr(self, "_ticker", None), getattr(self, "metrics", None)
        if ticker is not None:
            ticker.cancel()
        if metrics is not None:
            metrics.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def local_engine_config(engine_args: dict[str, Any], env: dict[str, str],
                        artifact: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine's arguments and environment for this node: `artifact["uri"]` (s3://) is pulled
    into the local cache and verified (a cached copy costs a stat), and paths the builder gave under
    `artifact["root"]` (where it expected the copy) are moved under the copy this node has."""
    from neuronserve.compile.store import resolve_artifacts

    root, local = artifact["root"], str(resolve_artifacts(artifact["uri"], logger.info))

    def moved(v):
        return local + v[len(root):] if isinstance(v, str) and (v == root or v.startswith(root + os.sep)) else v

    return {k: moved(v) for k, v in engine_args.items()}, {k: moved(v) for k, v in env.items()}


def build_generation_app(engine_args: dict[str, Any], env: dict[str, str], model_name: str, *, num_cpus: float = 1,
                         num_replicas: int = 1, max_ongoing_requests: int = 256,
                         ray_actor_options: dict | None = None, metrics: dict[str, Any] | None = None,
                         key_digests: tuple[str, ...] = (), api_key_file: str | None = None,
                         artifact: dict[str, str] | None = None):
    """The application: `num_replicas` replicas, each reserving `num_cpus` of Ray's CPUs for its
    engine (whose threads the env binds to as many cores), or the given `ray_actor_options`
    (`serve.placement.place_generate`'s: NeuronCores for a tensor-parallel group).

    `metrics` (None: none recorded) configures `serve.metrics.GenerationMetrics`: `backend`, the
    `cores` a replica holds (cost), `instance_type` and `price_per_hour_usd` (None: looked up),
    `metrics_dir` (the node exporter's directory; None: in the replica's process only).
    `key_digests` (`serve.auth.digest` of each key: never a key, Serve shows bound arguments) and
    `api_key_file` (read by each replica) turn API keys on, with the replica's own environment's.
    `artifact` ({"uri": s3 URI, "root": the local folder the paths name}): each replica pulls the
    artifact (`local_engine_config`) before its engine starts."""
    actor = dict(ray_actor_options) if ray_actor_options is not None else {"num_cpus": num_cpus}
    actor["runtime_env"] = {**actor.get("runtime_env", {}),
                            "env_vars": {**actor.get("runtime_env", {}).get("env_vars", {}), **env}}
    return GenerationServer.options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests, ray_actor_options=actor,
    ).bind(dict(engine_args), dict(env), model_name, dict(metrics) if metrics is not None else None,
           tuple(key_digests), api_key_file, dict(artifact) if artifact is not None else None)


def metrics_config(args, target: str, actor: dict) -> dict[str, Any]:
    """`build_generation_app`'s `metrics` from `neuronserve serve`'s arguments: the cores a replica
    holds are its NeuronCores (a tensor-parallel group) or, on CPU, the CPUs it reserves.

    >>> class A: instance_type, price_per_hour_usd, metrics_dir = "trn1.32xlarge", None, "/m"
    >>> metrics_config(A, "trn1", {"num_cpus": 0, "resources": {"neuron_cores": 8}})["cores"]
    8
    >>> metrics_config(A, "cpu", {"num_cpus": 2})["backend"]
    'cpu'
    """
    neuron = actor.get("resources", {}).get("neuron_cores")
    return {"backend": "cpu" if target == "cpu" else "neuron", "cores": int(neuron or actor.get("num_cpus") or 1),
            "instance_type": args.instance_type, "price_per_hour_usd": args.price_per_hour_usd,
            "metrics_dir": args.metrics_dir}


def generative(args) -> bool:
    """Whether `neuronserve serve`'s arguments name one generative artifact (task generate)."""
    from neuronserve.compile.store import read_manifest

    specs = args.artifact_list()
    return len(specs) == 1 and read_manifest(specs[0][1]).task == "generate"


def build_from_args(args):
    """`neuronserve serve --artifacts A` for a generative artifact: the engine's arguments from its
    manifest (`models.generation.vllm_engine_config`), the replicas and their resources from the
    cluster (`serve.placement.place_generate`)."""
    from neuronserve.compile.store import S3Uri, cache_dir_for, is_remote, read_manifest
    from neuronserve.models.generation import vllm_engine_config
    from neuronserve.serve.auth import digest, parse_keys
    from neuronserve.serve.placement import cluster_cpus, cluster_neuron_cores, place_generate

    name, where = args.artifact_list()[0]
    manifest = read_manifest(where)  # an s3:// artifact's manifest alone: the replicas pull the rest
    artifact = None
    if is_remote(where):
        local = str(cache_dir_for(S3Uri.parse(where)))
        artifact, where = {"uri": where, "root": local}, local
    replicas, actor = place_generate(manifest.target, manifest.generation.tp_degree, cpus=cluster_cpus(),
                                     neuron_cores=cluster_neuron_cores(), num_replicas=args.num_replicas)
    cpu_ids = None  # vLLM binds by NUMA node: right for a replica that has the node
    if manifest.target == "cpu" and replicas == 1 and hasattr(os, "sched_getaffinity"):
        cpu_ids = sorted(os.sched_getaffinity(0))[: max(1, int(actor.get("num_cpus", 1)))]
    config = vllm_engine_config(manifest, where, cpu_ids=cpu_ids)
    return build_generation_app(config.args, config.env, name or manifest.model.name, num_replicas=replicas,
                                max_ongoing_requests=args.max_ongoing_requests, ray_actor_options=actor,
                                metrics=metrics_config(args, manifest.target, actor),
                                key_digests=tuple(digest(k) for k in parse_keys(args.api_key.get_secret_value()))
                                if args.api_key else (), api_key_file=args.api_key_file, artifact=artifact)
