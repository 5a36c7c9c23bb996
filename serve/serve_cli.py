"""`neuronserve serve`: start (or join) Ray, run the app, print how to call it, drain on signal."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from neuronserve.common.console import err, fail

APP_NAME = "neuronserve"


# `neuronserve serve`'s flags, in help order, each generated from its setting (serve.settings).
COMMAND_FLAGS = ("host", "port", "address", "ready_timeout_s", "auto_cast")
GROUPS = {
    "what to serve": ("artifacts", "model_name", "backend"),
    "placement": ("num_replicas", "cores_per_replica", "threads_per_replica"),
    "batching (live-tunable through Serve's user_config)": (
        "max_batch_tokens", "batch_wait_ms", "max_concurrent_batches", "max_queued_rows", "packing"),
    "requests": ("request_timeout_s", "max_inputs_per_request", "max_body_bytes", "truncate", "max_ongoing_requests",
                 "access_log"),
    "metrics and cost": ("metrics_port", "instance_type", "price_per_hour_usd"),
}
NOT_FLAGS = {"metrics_dir"}  # the command makes its own


def add_subcommand(subparsers) -> None:
    from neuronserve.serve.settings import AppArgs, ServeCommand, add_flags

    p = subparsers.add_parser(
        "serve",
        help="serve an artifact on Ray Serve (default: all-MiniLM-L6-v2 on the CPU backend)",
        description="Serve an artifact over HTTP: OpenAI /v1/embeddings, TEI-style /predict, KServe v2. Starts a "
        "local Ray unless --address names a cluster. With no --artifacts, compiles the default model into "
        "the cache first. Ctrl-C or SIGTERM drains in-flight requests, then stops. Every flag can also be set "
        "by the environment variable its help names.",
    )
    add_flags(p.add_argument_group("server"), ServeCommand, COMMAND_FLAGS)
    for title, names in GROUPS.items():
        add_flags(p.add_argument_group(title), AppArgs, names, aliases={"num_replicas": ["--replicas"]},
                  defaults={"artifacts": "compile the default model for cpu into the cache"})
    p.set_defaults(func=run)


def app_flag_names() -> list[str]:
    return [n for names in GROUPS.values() for n in names]


def _app_args(args, artifacts: Path, metrics_dir: str | None):
    """The application's settings: the flags given, else the environment, else the defaults."""
    from neuronserve.serve.settings import AppArgs, given

    values = given(args, app_flag_names())
    values.update(artifacts=str(artifacts), metrics_dir=metrics_dir)
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


def _invalid(e) -> str:
    from neuronserve.serve.settings import env_name

    return "invalid setting: " + "; ".join(
        f"--{'.'.join(map(str, x['loc'])).replace('_', '-')} (or {env_name(str(x['loc'][0]))}): {x['msg']}"
        for x in e.errors())


def run(args) -> int:
    from pydantic import ValidationError

    from neuronserve.compile.compiler import CompileError
    from neuronserve.models.artifact import ArtifactError, load_manifest
    from neuronserve.models.loading import ModelError
    from neuronserve.serve.settings import ServeCommand, given

    try:
        command = ServeCommand(**given(args, COMMAND_FLAGS))
        probe = _app_args(args, Path("."), None)  # settings checked before any compile
    except ValidationError as e:
        return fail(_invalid(e), code=2)
    # Before any compile or Ray start: a taken port is one line naming the flag, not a Ray/HAProxy
    # traceback after the start.
    wanted = [] if (command.address or os.environ.get("RAY_ADDRESS")) else [("port", command.port)]
    if probe.metrics_port:
        wanted.append(("metrics_port", probe.metrics_port))
    problem = ports_problem(command.host, wanted)
    if problem:
        return fail(problem)
    try:
        artifacts = Path(args.artifacts or os.environ.get("NEURONSERVE_ARTIFACTS") or _default_artifacts(command.auto_cast))
        manifest = load_manifest(artifacts)
    except (ArtifactError, CompileError, ModelError) as e:
        return fail(str(e))
    metrics_dir = None
    exporter = None
    if probe.metrics_port != 0:
        metrics_dir = tempfile.mkdtemp(prefix="neuronserve-metrics-")
    app_args = _app_args(args, artifacts.resolve(), metrics_dir)

    stop = threading.Event()

    import ray
    from ray import serve

    from neuronserve.serve.app import build_app
    from neuronserve.serve.local_ray import local_ray_env, stop_haproxy

    started_ray = False
    node_id = None
    try:
        if metrics_dir:
            exporter = _start_exporter(metrics_dir, app_args.metrics_port, command.host)
        address = command.address or os.environ.get("RAY_ADDRESS")
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
        serve.start(http_options={"host": command.host, "port": command.port}, logging_config={"log_level": "WARNING"})
        app = build_app(app_args)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{command.host}:{command.port}"
        if not wait_ready(url, command.ready_timeout_s, stop, replica_count()):
            if stop.is_set():
                return 130
            return fail(f"the server did not become ready within {command.ready_timeout_s:g} s; see the replica logs above")
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


def port_in_use(host: str, port: int) -> str | None:
    """Why nothing could listen on `host:port` now (e.g. 'Address already in use'), or None.

    >>> import socket
    >>> with socket.socket() as s:
    ...     s.bind(("127.0.0.1", 0)); s.listen()
    ...     port_in_use("127.0.0.1", s.getsockname()[1])
    'Address already in use'
    """
    with socket.socket() as s:
        # As servers bind (uvicorn, HAProxy): a port held only by closing connections is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def ports_problem(host: str, wanted: list[tuple[str, int]]) -> str | None:
    """One line for the first setting whose port cannot be listened on, naming its flag and
    variable; or None when all are free.

    >>> ports_problem("127.0.0.1", [("port", 8000), ("metrics_port", 8000)])
    '--port and --metrics-port are both 8000; give them different ports'
    """
    from neuronserve.serve.settings import env_name

    seen: dict[int, str] = {}
    for name, port in wanted:
        flag = "--" + name.replace("_", "-")
        if port in seen:
            return f"{seen[port]} and {flag} are both {port}; give them different ports"
        seen[port] = flag
    for name, port in wanted:
        why = port_in_use(host, port)
        if why:
            return (f"port {port} on {host} cannot be used ({why}): it is --{name.replace('_', '-')} "
                    f"({env_name(name)}); stop what holds it or choose another port")
    return None


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
