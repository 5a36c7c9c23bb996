"""`neuronserve serve`: start (or join) Ray, run the app, print how to call it, drain on signal."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from neuronserve.common.console import err, fail

APP_NAME = "neuronserve"


# `neuronserve serve`'s flags, in help order, each generated from its setting (serve.settings).
COMMAND_FLAGS = ("host", "port", "address", "ready_timeout_s", "drain_timeout_s", "auto_cast")
GROUPS = {
    "what to serve": ("artifacts", "max_models_per_replica", "model_name", "backend", "device_profile", "cached_timings"),
    "placement": ("num_replicas", "cores_per_replica", "threads_per_replica", "host_processes", "device_memory_gib"),
    "autoscaling (docs/decisions.md, \"Autoscaling\")": (
        "autoscale", "target_ongoing_requests", "inputs_per_request", "upscale_delay_s", "downscale_delay_s"),
    "batching (live-tunable through Serve's user_config)": (
        "max_batch_tokens", "batch_wait_ms", "max_concurrent_batches", "max_queued_rows", "packing"),
    "requests": ("request_timeout_s", "max_inputs_per_request", "max_body_bytes", "truncate", "max_ongoing_requests",
                 "access_log"),
    "metrics and cost": ("metrics_port", "instance_type", "price_per_hour_usd"),
    "tracing (OpenTelemetry; OTEL_SERVICE_NAME names the service)": ("otlp_endpoint",),
    "security and faults (docs/security.md)": ("api_key", "api_key_file", "max_consecutive_failed_batches"),
}
NOT_FLAGS = {"metrics_dir"}  # the command makes its own
WARM_UP_S = 60  # a replica's load and warm-up stays under this (docs/decisions.md, "Scale to zero")


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


def _app_args(args, artifacts: Path | str | list[str], metrics_dir: str | None):
    """The application's settings: the flags given, else the environment, else the defaults."""
    from neuronserve.serve.settings import AppArgs, given

    values = given(args, app_flag_names())
    values.update(artifacts=artifacts if isinstance(artifacts, list) else str(artifacts), metrics_dir=metrics_dir)
    return AppArgs(**{k: v for k, v in values.items() if v is not None})


def _default_artifacts(auto_cast: str) -> Path:
    from neuronserve.compile.compiler import CompileOptions, compile_artifact

    err("no --artifacts given: using the default model (all-MiniLM-L6-v2) on the CPU backend")
    result = compile_artifact(CompileOptions(model="default", target="cpu", auto_cast=auto_cast), log=err)
    return result.out_dir


class _Compile:
    """The default model's compile (`_default_artifacts`) on a thread of its own; a daemon, so a
    stop while it runs does not wait for it."""

    def __init__(self, auto_cast: str):
        self.outcome = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, args=(auto_cast,), name="compile", daemon=True)
        self.thread.start()

    def _run(self, auto_cast: str) -> None:
        from neuronserve.compile.compiler import CompileError
        from neuronserve.models.artifact import ArtifactError, load_manifest
        from neuronserve.models.loading import ModelError

        t0 = time.monotonic()
        try:
            artifacts = _default_artifacts(auto_cast)
            self.outcome = (artifacts, load_manifest(artifacts))
        except (ArtifactError, CompileError, ModelError) as e:
            self.outcome = e
        except Exception as e:  # reported by the command's thread, as a failure, not lost on this one
            self.outcome = RuntimeError(f"compiling the default model failed: {type(e).__name__}: {e}")
        self.seconds = time.monotonic() - t0

    def wait(self, stop: threading.Event):
        """(artifacts, manifest), the error, or None when `stop` was set first."""
        while self.thread.is_alive():
            if stop.is_set():
                return None
            self.thread.join(0.1)
        return self.outcome


class _Preload:
    """What the command needs once Ray is up, imported on a thread of its own while `ray.init` waits
    for Ray's processes: Serve and the application's modules, and (for a local Ray) the check of
    Serve's HAProxy template. Ray itself must be imported before (see `run`)."""

    def __init__(self, local: bool):
        self.problem: str | None = None
        self._thread = threading.Thread(target=self._run, args=(local,), name="preload", daemon=True)
        self._thread.start()

    def _run(self, local: bool) -> None:
        try:
            if local:  # first: `ray.init` imports them (aiohttp, ...) right before it starts the raylet
                import ray.dashboard.optional_deps  # noqa: F401
            import ray.serve  # noqa: F401

            import neuronserve.serve.app  # noqa: F401
            import neuronserve.serve.placement  # noqa: F401
        except Exception:  # an import that fails here fails again, with its error, where the name is bound
            return
        if local:
            from neuronserve.serve.local_ray import check_haproxy_template

            self.problem = check_haproxy_template()

    def wait(self) -> str | None:
        """Once the imports are done: why this Ray's HAProxy cannot serve a local server, or None."""
        self._thread.join()
        return self.problem


class _ServeStart:
    """`serve.start` on a thread of its own, so the application deploys while the proxy starts.

    `serve.start` returns only once the proxy (here HAProxy and its manager actor) is up, and a
    deployment waits for `serve.start`; each of them starts a Ray worker process, which on a small
    machine takes seconds. Once the Serve controller exists (the proxy's options are given to it when
    it is created), `serve.run` finds it and deploys, and the controller starts the replicas beside
    the proxy instead of after it."""

    def __init__(self, serve, http_options: dict, logging_config):
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        self._names = (SERVE_CONTROLLER_NAME, SERVE_NAMESPACE)
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(serve, http_options, logging_config),
                                        name="serve-start", daemon=True)
        self._thread.start()

    def _run(self, serve, http_options: dict, logging_config) -> None:
        try:
            serve.start(http_options=http_options, logging_config=logging_config)
        except BaseException as e:  # reported by the wait_* methods, on the command's thread
            self.error = e
        finally:
            self._done.set()

    def _problem(self) -> str | None:
        return None if self.error is None else f"Ray Serve did not start: {self.error}"

    def wait_for_controller(self, stop: threading.Event, interval_s: float = 0.05) -> str | None:
        """None once the Serve controller exists (or `serve.start` returned), else what went wrong."""
        import ray

        name, namespace = self._names
        while not stop.is_set():
            if self._done.is_set():
                return self._problem()
            try:
                ray.get_actor(name, namespace=namespace)
                return None
            except ValueError:  # not created yet
                self._done.wait(interval_s)
        return "stopped while Ray Serve was starting"

    def wait_for_proxies(self, stop: threading.Event) -> str | None:
        """None once `serve.start` has returned (the proxy is up), else what went wrong."""
        while not self._done.wait(0.1):
            if stop.is_set():
                return "stopped while Ray Serve was starting"
        return self._problem()


def wait_ready(url: str, timeout_s: float, stop: threading.Event, replicas: int = 1, *, interval_s: float = 0.25,
               settle_polls: int = 20) -> list[dict] | None:
    """Poll readiness until every replica has answered 200 (each names itself in the body). Each
    poll is a new connection so the load balancer spreads them; should it keep sending them to the
    same replicas, `settle_polls` answers of 200 in a row count as ready. Returns the ready
    answers' bodies, one per replica seen (with their start-up phases), or None if not ready."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    warm: dict = {}
    in_a_row = 0
    with httpx.Client(timeout=5, headers={"Connection": "close"}) as client:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                r = client.get(f"{url}/v2/health/ready")
                json_body = r.headers.get("content-type", "").startswith("application/json")
                if r.status_code == 200:
                    body = r.json() if json_body else {}
                    warm[body.get("replica")] = body
                    in_a_row += 1
                    if len(warm) >= replicas or in_a_row >= settle_polls:
                        return list(warm.values())
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
    return None


def describe_ready(took_s: float, steps: dict[str, float], replicas: list[dict]) -> str:
    """The console's start-up line: the command's steps, then the slowest replica's phases and
    where the replicas' timing tables came from.

    >>> describe_ready(8.04, {"artifact": 0.5, "Ray": 3.0, "Serve": 2.0, "replicas": 2.5},
    ...                [{"startup_s": {"pull": 0.0, "load": 0.8, "warmup": 0.7, "ready": 1.6}, "timings": "cached"}])
    'ready in 8.0 s: artifact 0.5 s, Ray 3.0 s, Serve 2.0 s, replicas 2.5 s (load 0.8 s, warm-up 0.7 s, cached timings)'
    >>> describe_ready(9.0, {}, [{"startup_s": {"load": 1.0, "warmup": 5.0, "ready": 6.0}, "timings": "measured"},
    ...                          {"startup_s": {"load": 1.0, "warmup": 0.5, "ready": 7.0}, "timings": "cached"}])
    'ready in 9.0 s:  (load 1.0 s, warm-up 0.5 s, measured timings on 1 of 2 replicas, cached on 1)'
    """
    line = f"ready in {took_s:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
    phased = [r for r in replicas if isinstance(r.get("startup_s"), dict)]
    if phased:
        slowest = max(phased, key=lambda r: r["startup_s"].get("ready", 0.0))
        phases = slowest["startup_s"]
        pull = f"pull {phases['pull']:.1f} s, " if phases.get("pull", 0.0) >= 0.05 else ""
        measured = sum(r.get("timings") != "cached" for r in phased)
        if measured in (0, len(phased)):
            timings = "measured timings" if measured else "cached timings"
        else:  # a later replica found the table an earlier one kept
            timings = f"measured timings on {measured} of {len(phased)} replicas, cached on {len(phased) - measured}"
        line += (f" ({pull}load {phases.get('load', 0.0):.1f} s, warm-up {phases.get('warmup', 0.0):.1f} s, "
                 f"{timings})")
    return line


def replica_count() -> int:
    """Replicas of the running app that answer HTTP, from Serve's status (1 if it cannot tell): with
    `--host-processes`, the host processes, not the device replicas behind them."""
    from ray import serve

    from neuronserve.serve.placement import DEPLOYMENT_NAME

    try:
        deployments = serve.status().applications[APP_NAME].deployments
        return max(1, sum(sum(d.replica_states.values()) for name, d in deployments.items() if name == DEPLOYMENT_NAME))
    except Exception:  # status shape differs across Ray versions: fall back to one
        return 1


def _invalid(e) -> str:
    from neuronserve.serve.settings import env_name

    return "invalid setting: " + "; ".join(
        f"--{'.'.join(map(str, x['loc'])).replace('_', '-')} (or {env_name(str(x['loc'][0]))}): {x['msg']}"
        for x in e.errors())


def run(args) -> int:
    began = time.monotonic()
    from pydantic import ValidationError

    from neuronserve.compile.compiler import CompileError
    from neuronserve.compile.store import StoreError, is_remote, resolve_artifacts
    from neuronserve.models.artifact import ArtifactError, load_manifest
    from neuronserve.models.loading import ModelError
    from neuronserve.serve.backends.base import BackendError
    from neuronserve.serve.settings import ServeCommand, given

    try:
        command = ServeCommand(**given(args, COMMAND_FLAGS))
        probe = _app_args(args, Path("."), None)  # settings checked before any compile
    except ValidationError as e:
        return fail(_invalid(e), code=2)
    if probe.autoscale is not None and probe.num_replicas != "auto":
        return fail(f"--replicas {probe.num_replicas} and --autoscale {probe.autoscale} both set the replica count: "
                    "give one of them", code=2)
    if probe.autoscale is not None and probe.downscale_delay_s < WARM_UP_S:
        # Serve counts requests, not warm-up: an idle replica still warming can be removed.
        err(f"warning: --downscale-delay-s {probe.downscale_delay_s:g} is shorter than a replica's warm-up "
            f"(tens of seconds): a replica started with no request waiting can be removed before it is warm")
    # Before any compile or Ray start: a taken port is one line naming the flag, not a Ray/HAProxy
    # traceback after the start.
    wanted = [] if (command.address or os.environ.get("RAY_ADDRESS")) else [("port", command.port)]
    if probe.metrics_port:
        wanted.append(("metrics_port", probe.metrics_port))
    for _, port in wanted:
        _remove_stale_haproxy(command.host, port)
    problem = ports_problem(command.host, wanted)
    if problem:
        return fail(problem)
    steps: dict[str, float] = {}  # the command's start-up steps, in seconds, for the ready line
    mark = time.monotonic()
    given = _given_artifacts(args)
    artifacts = manifest = None
    try:
        if given:
            # An s3:// URI is pulled (and verified) here, once, before Ray starts; the replicas on this
            # machine then find it in the cache, and the app keeps the URI for replicas elsewhere.
            artifacts, manifests = _artifacts_and_manifests(given, probe)
            manifest = manifests[0][1]
        if probe.backend == "simulated":
            from neuronserve.serve.backends.simulated import load_profile

            load_profile(probe.device_profile)
        if probe.host_processes > 1:  # before Ray starts, as the application would say it after
            from neuronserve.serve.placement import check_host_processes, uses_neuron

            target = manifest.target if manifest is not None else "cpu"  # no --artifacts: the default, for cpu
            check_host_processes(probe, device=probe.backend == "simulated" or uses_neuron(probe, target))
    except (ArtifactError, CompileError, ModelError, BackendError, StoreError, ValueError) as e:
        return fail(str(e))
    compiling = None
    if given:
        steps["artifact"] = time.monotonic() - mark
    else:
        # The default model's compile (or its cache hit) runs beside Ray's and Serve's start, which
        # need no artifact; the application is built once both are done.
        compiling = _Compile(command.auto_cast)
    metrics_dir = None
    exporter = None
    if probe.metrics_port != 0:
        metrics_dir = tempfile.mkdtemp(prefix="neuronserve-metrics-")

    stop = threading.Event()
    signals = []  # each SIGINT/SIGTERM received; a second one skips the drain

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) == 2:
            err("second signal: stopping now, without waiting for in-flight requests")
        stop.set()

    # Ray is imported here, on this thread, before anything else imports it: a second thread importing
    # it (or Serve) at the same time can be handed a half-initialised module by Python's import locks.
    import ray

    from neuronserve.common import logs
    from neuronserve.serve.local_ray import (LocalRayProcesses, lean_local_ray, local_ray_env, quiet_ray_console,
                                             serve_workers_env, stop_haproxy)

    if logs.default_level() != "debug":
        quiet_ray_console()

    local: LocalRayProcesses | None = None
    node_id = None
    died: list[str] = []  # what of the local Ray died, set by the watch
    finished = threading.Event()  # the watch runs until the command is done, through the drain
    code = 0
    serve = None
    try:
        mark = time.monotonic()
        # Serve and the application's modules load on a thread of their own while Ray starts (seconds
        # of imports on a small machine, which ray.init does not need).
        preload = _Preload(local=not (command.address or os.environ.get("RAY_ADDRESS")))
        if metrics_dir:
            exporter = _start_exporter(metrics_dir, probe.metrics_port, command.host)
        address = command.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            from neuronserve.serve.placement import inherited_replica_env

            os.environ.update(local_ray_env(access_log=probe.access_log))  # read by the Ray processes started next
            os.environ.update(inherited_replica_env(os.environ))  # the replicas' too, so they need no runtime_env
            os.environ.update(serve_workers_env(os.environ))
            # "local" always starts a fresh Ray for this server instead of joining a stray one. No
            # runtime_env: Serve's actors then start in the worker processes Ray has started already.
            with lean_local_ray():
                ray.init(address="local", include_dashboard=False, logging_level="WARNING")
            node_id = ray.get_runtime_context().get_node_id()
            local = LocalRayProcesses.of_this_driver()
            threading.Thread(target=_watch, args=(local, stop, died, finished), name="ray-watch", daemon=True).start()
        # After ray.init, which installs its own SIGTERM handler (exit at once): ours drains first.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        problem = preload.wait()
        if problem is not None:
            code = fail(problem)
            return code
        steps["Ray"], mark = time.monotonic() - mark, time.monotonic()
        from ray import serve

        from neuronserve.serve.app import build_app
        from neuronserve.serve.placement import serve_logging_config

        if logs.default_level() != "debug":
            quiet_ray_console()  # again: Serve's import sets its logger up
        starting = _ServeStart(serve, {"host": command.host, "port": command.port}, serve_logging_config())
        # The application is built while Serve's controller starts; it is deployed once both are done.
        if compiling is not None:
            waited = time.monotonic()
            outcome = compiling.wait(stop)
            mark += time.monotonic() - waited  # Serve's step counts its own time, not the compile's
            if outcome is None:  # a signal while compiling
                code = 130
                return code
            if isinstance(outcome, Exception):
                code = fail(str(outcome))
                return code
            artifacts, manifest = outcome
            steps = {"artifact (beside Ray)": compiling.seconds, **steps}
        app_args = _app_args(args, artifacts if isinstance(artifacts, list) or is_remote(str(artifacts))
                             else Path(artifacts).resolve(), metrics_dir)
        try:
            app = build_app(app_args)
        except ValueError as e:  # settings that contradict each other only with the artifact known
            code = fail(str(e), code=2)
            return code
        problem = starting.wait_for_controller(stop)
        if problem is not None:
            code = fail(problem) if not stop.is_set() else 130
            return code
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        problem = starting.wait_for_proxies(stop)
        if problem is not None:
            code = fail(problem) if not stop.is_set() else 130
            return code
        steps["Serve"], mark = time.monotonic() - mark, time.monotonic()
        url = f"http://{command.host}:{command.port}"
        ready = wait_ready(url, command.ready_timeout_s, stop, replica_count())
        steps["replicas"] = time.monotonic() - mark
        if ready is None:
            if died:
                code = _ray_died(died[0], signals)
            elif stop.is_set():
                code = 130
            else:
                code = fail(f"the server did not become ready within {command.ready_timeout_s:g} s; see the replica logs above")
            return code
        _print_banner(url, manifest, exporter, app_args, describe_ready(time.monotonic() - began, steps, ready))
        stop.wait()
        if died:
            code = _ray_died(died[0], signals)
            return code
        code = _drain(serve, command.drain_timeout_s, signals, died)
        return code
    finally:
        finished.set()
        ray_gone = bool(died) or (local is not None and local.dead() is not None)
        # Each step on its own: one failing must not leave the others' processes behind. Ray's own
        # shutdown calls block on a dead GCS, so with the local Ray gone its processes are stopped
        # directly instead.
        for step in (
            None if ray_gone or serve is None else (lambda: _bounded(serve.shutdown, 10.0)),
            None if ray_gone or local is None else (lambda: _bounded(ray.shutdown, 10.0)),
            local.kill if local is not None else None,
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
        if ray_gone:
            # Ray's exit handlers would wait on the dead GCS again.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _watch(local, stop: threading.Event, died: list, finished: threading.Event, interval_s: float = 0.5) -> None:
    """Notice the local Ray dying under the server (a raylet killed, the OOM killer, a signal to
    the whole group), while serving or draining: say so and stop, so the command exits non-zero and
    a supervisor restarts it, and a drain waiting on a dead Ray ends at once."""
    while not finished.wait(interval_s):
        why = local.dead()
        if why:
            died.append(why)
            stop.set()
            return


def _ray_died(why: str, signals: list) -> int:
    """Ray died: after a stop signal (it got the signal too, e.g. systemd's default stop), a stop;
    otherwise a failure, exit 1, so a supervisor restarts the server."""
    if signals:
        err(f"stopping: the local Ray was stopped too ({why}), so requests in flight were cut off; "
            "under systemd, KillMode=mixed signals the command alone and lets it drain")
        return 0
    return fail(f"the local Ray stopped under the server: {why}; requests in flight were lost. "
                "Exiting so a supervisor can restart it")


def _bounded(step, timeout_s: float, abort=None) -> str:
    """Run a blocking Ray call in a thread and wait at most `timeout_s` (Ray's calls have no
    timeout of their own and block forever on a dead GCS); 'done', 'timeout' or 'aborted'. Its
    error, if any, is raised here."""
    result: list = []

    def target():
        try:
            step()
            result.append(None)
        except BaseException as e:  # re-raised in the caller's thread
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout_s
    while t.is_alive() and time.monotonic() < deadline:
        if abort is not None and abort():
            return "aborted"
        t.join(0.1)
    if t.is_alive():
        return "timeout"
    if result and result[0] is not None:
        raise result[0]
    return "done"


def _drain(serve, timeout_s: float, signals: list, died: list) -> int:
    """Stop routing, let in-flight requests finish (at most `timeout_s`), then remove the app."""
    err(f"draining: finishing in-flight requests, accepting no new ones (at most {timeout_s:g} s; "
        "signal again to stop at once) ...")
    t0 = time.monotonic()
    # Serve stops routing, then waits for each replica's requests to finish.
    outcome = _bounded(lambda: serve.delete(APP_NAME), timeout_s, abort=lambda: len(signals) > 1 or bool(died))
    took = time.monotonic() - t0
    if died:
        return _ray_died(died[0], signals)
    if outcome == "done":
        err(f"drained in {took:.1f}s; stopped")
        return 0
    if outcome == "timeout":
        err(f"warning: requests still in flight after {timeout_s:g} s (--drain-timeout-s); stopping anyway")
    else:
        err("warning: drain skipped; requests still in flight were cut off")
    return 0


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
            from neuronserve.serve.local_ray import describe, listeners

            holders = listeners(port)
            held = f", held by {', '.join(describe(pid) for pid in holders[:3])}" if holders else ""
            return (f"port {port} on {host} cannot be used ({why}{held}): it is --{name.replace('_', '-')} "
                    f"({env_name(name)}); stop what holds it or choose another port")
    return None


def _remove_stale_haproxy(host: str, port: int, wait_s: float = 5.0) -> None:
    """An unclean stop (the command killed outright) can leave Ray Serve's HAProxy holding the
    HTTP port with no Ray behind it: stop it, saying so, so the next start just works."""
    from neuronserve.serve.local_ray import describe, listeners, stale_haproxy

    if not port_in_use(host, port):
        return
    for pid in listeners(port):
        if stale_haproxy(pid):
            err(f"port {port}: stopping a stale HAProxy left by an earlier server whose Ray is gone: {describe(pid)}")
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
    deadline = time.monotonic() + wait_s
    while port_in_use(host, port) and time.monotonic() < deadline:
        time.sleep(0.1)


def _start_exporter(metrics_dir: str, port: int, host: str):
    from neuronserve.serve.exporter import start_exporter
    from neuronserve.serve.metrics import ensure_multiproc_dir

    ensure_multiproc_dir(metrics_dir, clean=True)
    return start_exporter(metrics_dir, port, host=host)


def _given_artifacts(args) -> list[str]:
    """--artifacts as given (each flag once), else NEURONSERVE_ARTIFACTS (one, or a JSON list)."""
    import json

    if args.artifacts:
        return list(args.artifacts)
    env = os.environ.get("NEURONSERVE_ARTIFACTS", "").strip()
    if env.startswith("["):
        try:
            return [str(a) for a in json.loads(env)]
        except ValueError:
            pass
    return [env] if env else []


def _artifacts_and_manifests(given: list[str], probe):
    """What the app is given (one artifact as is; several as a list of NAME=DIR|URI, local
    directories made absolute) and each served model's (name, manifest), checked: one name per
    model, one target, and, on Neuron, room for them all on a replica's NeuronCores
    (`serve.placement.check_models`)."""
    from neuronserve.compile.store import is_remote, resolve_artifacts
    from neuronserve.models.artifact import load_manifest
    from neuronserve.serve.placement import check_models
    from neuronserve.serve.settings import parse_artifact

    if len(given) == 1 and parse_artifact(given[0])[0] is None:
        local = resolve_artifacts(given[0], err)
        manifest = load_manifest(local)
        served = [(probe.model_name or manifest.model.name, manifest)]
        check_models(served, probe, {served[0][0]: local})
        return given[0], served
    if probe.model_name:
        raise ValueError(f"--model-name {probe.model_name} names one model, but {len(given)} artifacts are given: "
                         "name each as --artifacts NAME=DIR instead")
    served, named, dirs = [], [], {}
    for item in given:
        name, where = parse_artifact(item)
        local = resolve_artifacts(where, err)
        manifest = load_manifest(local)
        where = where if is_remote(where) else str(Path(where).resolve())
        served.append((name or manifest.model.name, manifest))
        named.append(f"{name or manifest.model.name}={where}")
        dirs.setdefault(served[-1][0], local)
    check_models(served, probe, dirs)
    return named, served


def _print_banner(url: str, manifest, exporter, app_args, startup: str) -> None:
    names = [n for n, _ in app_args.artifact_list()]
    name = app_args.model_name or names[0] or manifest.model.name
    if manifest.task == "generate" and manifest.generation is not None:
        gen = manifest.generation
        print(f"neuronserve is ready: {name} (generate, {manifest.target}, {gen.engine}, tp_degree {gen.tp_degree}, "
              f"context {gen.max_model_len}) at {url}", flush=True)
    elif len(names) > 1:
        print(f"neuronserve is ready: {len(names)} models ({', '.join(names)}; {manifest.target}) at {url}", flush=True)
    else:
        print(f"neuronserve is ready: {name} ({manifest.task}, {manifest.target}, {len(manifest.buckets)} buckets) at {url}", flush=True)
    print(f"  {startup}", flush=True)
    if app_args.host_processes > 1:
        print(f"  {app_args.host_processes} host processes per replica answer HTTP and tokenize; one device process "
              "per replica runs the batches", flush=True)
    if app_args.backend == "simulated":
        print(f"  SIMULATED NeuronCore (profile {app_args.device_profile}): no model runs and the vectors mean "
              "nothing; for measuring the host path only", flush=True)
    # With API keys, the example sends one from the environment (never printed).
    auth = " -H \"Authorization: Bearer $NEURONSERVE_API_KEY\"" if (app_args.api_key or app_args.api_key_file) else ""
    if manifest.task == "generate":
        print(f"""  curl -s {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "hello"}}], "max_tokens": 16}}'""")
    elif manifest.task == "embed":
        print(f"""  curl -s {url}/v1/embeddings{auth} -H 'Content-Type: application/json' -d '{{"model": "{name}", "input": ["hello world"]}}'""")
    elif manifest.task == "sparse":
        print(f"""  curl -s {url}/embed_sparse{auth} -H 'Content-Type: application/json' -d '{{"inputs": ["hello world"]}}'""")
    elif manifest.task == "rerank":
        print(f"""  curl -s {url}/v1/rerank{auth} -H 'Content-Type: application/json' -d '{{"model": "{name}", "query": "what is a bucket", "documents": ["a compiled shape", "a pail"]}}'""")
    else:
        print(f"""  curl -s {url}/predict{auth} -H 'Content-Type: application/json' -d '{{"inputs": "I love this"}}'""")
    if exporter is not None:
        print(f"  metrics: {url.rsplit(':', 1)[0]}:{exporter.port}/metrics")
    print("  Ctrl-C to drain and stop", flush=True)
