"""Real processes on loopback: a local Ray with Serve, isolated from the user's Ray files."""

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from neuronserve.serve.local_ray import local_ray_env, stop_haproxy
from tests.fixtures.ports import free_port


@pytest.fixture(scope="session")
def ray_home():
    """Ray 2.60 writes ~/.ray/auth_token: give the session its own HOME and a short temp dir
    (Ray's socket paths must stay under 107 bytes)."""
    home = tempfile.mkdtemp(prefix="nsh-")
    old = os.environ.get("HOME")
    os.environ["HOME"] = home
    yield home
    if old is not None:
        os.environ["HOME"] = old


@pytest.fixture(scope="session")
def serve_instance(ray_home):
    """One local Ray (2 CPUs, 4 declared NeuronCores) and Serve on a free port for the session."""
    import ray
    from ray import serve

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["NEURONSERVE_EXTRA_PYTHONPATH"] = f"{repo}:{repo}/tests/doubles"
    ingress = local_ray_env()  # the ingress `neuronserve serve` uses, for this Ray's processes only:
    os.environ.update(ingress)  # other clusters started by tests must pick their own ports
    ray.init(address="local", num_cpus=2, resources={"neuron_cores": 4}, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"), logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": f"{repo}:{repo}/tests/doubles"}})
    for key in ingress:
        os.environ.pop(key)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    node_id = ray.get_runtime_context().get_node_id()
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    stop_haproxy(node_id)


def deploy(url: str, args, name: str = "neuronserve", timeout_s: float = 180) -> None:
    """Deploy the real application and wait until every replica reports ready."""
    from ray import serve

    from neuronserve.serve.app import build_app

    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10) as c:
        while time.monotonic() < deadline:
            try:
                if c.get(f"{url}/v2/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"app not ready within {timeout_s} s")


def start_server(artifacts, port, metrics_port, *extra, cwd=None):
    env = {**os.environ, "HOME": tempfile.mkdtemp(prefix="nsh-"), "PYTHONUNBUFFERED": "1"}
    for key in [k for k in env if k == "RAY_ADDRESS" or k.startswith("RAY_SERVE_HAPROXY_")]:
        env.pop(key)  # its own Ray and ingress ports, not the test session's
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuronserve", "serve", "--artifacts", str(artifacts), "--port", str(port),
         "--metrics-port", str(metrics_port), "--threads-per-replica", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, cwd=cwd,
    )
    lines: queue.Queue = queue.Queue()
    stderr: list[str] = []
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [stderr.append(l) for l in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 240
    out = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise AssertionError("server exited early:\n" + "".join(stderr[-40:]))
            continue
        out.append(line)
        if "Ctrl-C" in line:
            return proc, out, stderr
    proc.kill()
    raise AssertionError("server not ready in time:\n" + "".join(out) + "".join(stderr[-40:]))


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def haproxy_backup_listeners(port: int) -> list[tuple[int, list[int]]]:
    """For the HAProxy serving `port`: each `backup` server of its config (Serve's fallback proxy)
    with the PIDs listening on its port."""
    import re

    from neuronserve.serve.local_ray import _cmdline, listeners

    out = []
    for pid in listeners(port):
        words = _cmdline(pid).split()
        if "haproxy" not in words[0] or "-f" not in words:
            continue
        config = Path(words[words.index("-f") + 1]).read_text()
        for backup in sorted({int(m) for m in re.findall(r"server \S+ \S+:(\d+) .*backup", config)}):
            out.append((backup, listeners(backup)))
    return out


def stop_server(proc, timeout_s: float = 90) -> None:
    """Stop a server `start_server` started, if it still runs: SIGTERM to the command itself (it
    drains and stops its Ray and HAProxy; signalling the whole group would kill Ray under it
    first), then SIGKILL to its group if it has not exited within `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
