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

import os
import signal
import socket
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
    return free_port(host)


def local_ray_env(environ: dict | None = None) -> dict[str, str]:
    """Environment for a local Ray (HAProxy ingress, lighter bookkeeping); values already set are kept."""
    environ = os.environ if environ is None else environ
    wanted = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # HAProxy binds these on every address.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(port_outside_ephemeral_range()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(port_outside_ephemeral_range()),
        # Replicas behind HAProxy linger 30 s after they stop taking traffic (so a cluster's
        # HAProxies stop routing to them first). A local server stops as a whole, and its drain
        # still waits for every in-flight request, so 2 s is enough and Ctrl-C returns in seconds.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    }
    return {k: v for k, v in wanted.items() if k not in environ}


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
