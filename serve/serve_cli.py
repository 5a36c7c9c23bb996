"""`neuronserve serve`: start (or join) Ray, run the app, print how to call it, drain on signal."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from neuronserve.common.console import err, fail

APP_NAME = "neuronserve"


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an artifact on Ray Serve (default: all-MiniLM-L6-v2 on the CPU backend)",
        description="Serve an artifact over HTTP: OpenAI /v1/embeddings, TEI-style /predict, KServe v2. Starts a "
        "local Ray unless --address names a cluster. With no --artifacts, compiles the default model into "
        "the cache first. Ctrl-C or SIGTERM drains in-flight requests, then stops.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, help="artifact directory (default: compile the default model for cpu)")
    p.add_argument("--auto-cast", default="none", choices=["none", "bf16"], help="precision when compiling the default model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local Ray)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "neuron"])
    p.add_argument("--replicas", default="auto", help="replicas, or 'auto': one per NeuronCore group / CPU split")
    p.add_argument("--cores-per-replica", type=int, default=1, help="NeuronCores per replica")
    p.add_argument("--threads-per-replica", type=int, default=None, help="CPU backend: torch threads per forward (default: 1, one forward per core)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="padded tokens per batch")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="extra wait for fuller batches (0: none)")
    p.add_argument("--max-concurrent-batches", type=int, default=None,
                   help="batches in flight per replica (default: 1 on Neuron; on CPU one per core of the replica)")
    p.add_argument("--no-packing", dest="packing", action="store_const", const=False, default=None,
                   help="never pack several short rows into one sequence (CPU artifacts with a packed graph)")
    p.add_argument("--max-queued-rows", type=int, default=None, help="queued rows per replica before 429")
    p.add_argument("--request-timeout-s", type=float, default=None)
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus exporter port (default 9400); 0 disables")
    p.add_argument("--instance-type", default=None, help="for cost metrics, e.g. inf2.xlarge")
    p.add_argument("--price-per-hour-usd", type=float, default=None, help="overrides the price table")
    p.add_argument("--ready-timeout-s", type=float, default=600, help="give up if not ready by then")
    p.set_defaults(func=run)


def _app_args(args, artifacts: Path, metrics_dir: str | None):
    from neuronserve.serve.settings import AppArgs

    values = {
        "artifacts": str(artifacts),
        "backend": args.backend,
        "num_replicas": args.replicas if args.replicas == "auto" else int(args.replicas),
        "cores_per_replica": args.cores_per_replica,
        "threads_per_replica": args.threads_per_replica,
        "max_batch_tokens": args.max_batch_tokens,
        "batch_wait_ms": args.batch_wait_ms,
        "max_concurrent_batches": args.max_concurrent_batches,
        "max_queued_rows": args.max_queued_rows,
        "packing": args.packing,
        "request_timeout_s": args.request_timeout_s,
        "metrics_port": args.metrics_port,
        "instance_type": args.instance_type,
        "price_per_hour_usd": args.price_per_hour_usd,
        "metrics_dir": metrics_dir,
    }
    return AppArgs(**{k: v for k, v in values.items() if v is not None})


def _default_artifacts(auto_cast: str) -> Path:
    from neuronserve.compile.compiler import CompileOptions, compile_artifact

    err("no --artifacts given: using the default model (all-MiniLM-L6-v2) on the CPU backend")
    result = compile_artifact(CompileOptions(model="default", target="cpu", auto_cast=auto_cast), log=err)
    return result.out_dir


def wait_ready(url: str, timeout_s: float, stop: threading.Event, replicas: int = 1, *, interval_s: float = 0.5,
               settle_polls: int = 20) -> bool:
    """Poll readiness until every replica has answered 200 (each names itself in the body). Each
    poll is a new connection so the load balancer spreads them; should it keep sending them to the
    same replicas, `settle_polls` answers of 200 in a row count as ready."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    warm: set = set()
    in_a_row = 0
    with httpx.Client(timeout=5, headers={"Connection": "close"}) as client:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                r = client.get(f"{url}/v2/health/ready")
                json_body = r.headers.get("content-type", "").startswith("application/json")
                if r.status_code == 200:
                    warm.add(r.json().get("replica") if json_body else None)
                    in_a_row += 1
                    if len(warm) >= replicas or in_a_row >= settle_polls:
                        return True
                    state = f"{len(warm)}/{replicas} replicas warm"
                else:
                    in_a_row = 0
                    state = r.json().get("error", r.status_code) if json_body else r.status_code
            except httpx.HTTPError as e:
                in_a_row = 0
                state = type(e).__name__
            if state != last:
                err(f"waiting for readiness: {state}")
                last = state
            stop.wait(interval_s)
    return False


def replica_count() -> int:
    """Replicas of the running app, from Serve's status (1 if it cannot tell)."""
    from ray import serve

    try:
        deployments = serve.status().applications[APP_NAME].deployments
        return max(1, sum(sum(d.replica_states.values()) for d in deployments.values()))
    except Exception:  # status shape differs across Ray versions: fall back to one
        return 1


def run(args) -> int:
    if args.replicas != "auto" and not str(args.replicas).isdigit():
        return fail(f"--replicas must be a number or 'auto', got {args.replicas!r}", code=2)
    from pydantic import ValidationError

    from neuronserve.compile.compiler import CompileError
    from neuronserve.models.artifact import ArtifactError, load_manifest
    from neuronserve.models.loading import ModelError

    try:
        artifacts = args.artifacts or _default_artifacts(args.auto_cast)
        manifest = load_manifest(artifacts)
    except (ArtifactError, CompileError, ModelError) as e:
        return fail(str(e))
    metrics_dir = None
    exporter = None
    if args.metrics_port != 0:
        metrics_dir = tempfile.mkdtemp(prefix="neuronserve-metrics-")
    try:
        app_args = _app_args(args, artifacts.resolve(), metrics_dir)
    except ValidationError as e:
        return fail("invalid setting: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()), code=2)

    stop = threading.Event()

    import ray
    from ray import serve

    from neuronserve.serve.app import build_app
    from neuronserve.serve.local_ray import local_ray_env, stop_haproxy

    started_ray = False
    node_id = None
    try:
        if metrics_dir:
            exporter = _start_exporter(metrics_dir, app_args.metrics_port, args.host)
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            os.environ.update(local_ray_env())  # read by the Ray processes started next
            # "local" always starts a fresh Ray for this server instead of joining a stray one.
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
            started_ray = True
            node_id = ray.get_runtime_context().get_node_id()
        # After ray.init, which installs its own SIGTERM handler (exit at once): ours drains first.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
        app = build_app(app_args)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{args.host}:{args.port}"
        if not wait_ready(url, args.ready_timeout_s, stop, replica_count()):
            if stop.is_set():
                return 130
            return fail(f"the server did not become ready within {args.ready_timeout_s:g} s; see the replica logs above")
        _print_banner(url, manifest, exporter, app_args)
        stop.wait()
        err("draining: finishing in-flight requests, accepting no new ones ...")
        t0 = time.monotonic()
        serve.delete(APP_NAME)  # Serve stops routing, then waits for each replica's requests to finish
        err(f"drained in {time.monotonic() - t0:.1f}s; stopped")
        return 0
    finally:
        # Each step on its own: one failing must not leave the others' processes behind.
        for step in (
            serve.shutdown,
            ray.shutdown if started_ray else None,
            (lambda: stop_haproxy(node_id)) if node_id else None,
            exporter.stop if exporter is not None else None,
            (lambda: shutil.rmtree(metrics_dir, ignore_errors=True)) if metrics_dir else None,
        ):
            if step is None:
                continue
            try:
                step()
            except Exception as e:  # shutting down: report and go on
                err(f"warning: cleanup step failed: {e}")


def _start_exporter(metrics_dir: str, port: int, host: str):
    from neuronserve.serve.exporter import start_exporter
    from neuronserve.serve.metrics import ensure_multiproc_dir

    ensure_multiproc_dir(metrics_dir, clean=True)
    return start_exporter(metrics_dir, port, host=host)


def _print_banner(url: str, manifest, exporter, app_args) -> None:
    name = app_args.model_name or manifest.model.name
    print(f"neuronserve is ready: {name} ({manifest.task}, {manifest.target}, {len(manifest.buckets)} buckets) at {url}", flush=True)
    if manifest.task == "embed":
        print(f"""  curl -s {url}/v1/embeddings -H 'Content-Type: application/json' -d '{{"model": "{name}", "input": ["hello world"]}}'""")
    else:
        print(f"""  curl -s {url}/predict -H 'Content-Type: application/json' -d '{{"inputs": "I love this"}}'""")
    if exporter is not None:
        print(f"  metrics: {url.rsplit(':', 1)[0]}:{exporter.port}/metrics")
    print("  Ctrl-C to drain and stop", flush=True)
