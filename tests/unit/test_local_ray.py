"""Ray settings for a local server: HAProxy ingress and its ports, lighter bookkeeping."""

import socket
from pathlib import Path

from neuronserve.serve.local_ray import local_ray_env, port_outside_ephemeral_range


def test_haproxy_ports_are_free_and_below_the_ephemeral_range():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {port_outside_ephemeral_range() for _ in range(20)}
    assert all(19999 < p < low for p in ports) and len(ports) > 1  # above Ray's worker ports
    for p in ports:
        with socket.socket() as s:
            s.bind(("0.0.0.0", p))  # free on every address, where HAProxy binds


def test_local_ray_env_keeps_what_the_environment_sets():
    env = local_ray_env({"RAY_SERVE_HAPROXY_METRICS_PORT": "9999", "RAY_SERVE_ENABLE_HA_PROXY": "0",
                         "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"})
    assert "RAY_SERVE_HAPROXY_METRICS_PORT" not in env and "RAY_SERVE_ENABLE_HA_PROXY" not in env
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in env
    assert int(env["RAY_SERVE_HAPROXY_STATS_PORT"]) > 0 and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
