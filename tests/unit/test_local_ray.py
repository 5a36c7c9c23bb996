"""Ray settings for a local server: HAProxy ingress and its ports, lighter bookkeeping."""

import os
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
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0" and env["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"


def test_each_local_server_gets_its_own_fallback_proxy_ports():
    """Serve's fallback proxy (HAProxy's backup route) defaults to 8500/9500 on every Ray; two
    servers on a machine must not share it, or one answers for the other."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    seen = set()
    for _ in range(5):
        env = local_ray_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"})
        http, grpc = int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]), int(env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"])
        assert 19999 < http < low and 19999 < grpc < low and http != grpc
        seen.add(http)
    assert len(seen) > 1
    kept = local_ray_env({"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8600"})
    assert "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" not in kept


def test_each_local_server_gets_its_own_replica_port_ranges_below_the_ephemeral_range():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    bases = set()
    for _ in range(10):
        env = local_ray_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"})
        http = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
        grpc = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"])
        assert 19999 < http[0] < http[1] < grpc[0] < grpc[1] < low
        bases.add(http[0])
    assert len(bases) > 1  # not Serve's fixed 30000 for every server on the machine
    # A range the environment gives is kept whole.
    given = local_ray_env({"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "25000"})
    assert not any(k.startswith(("RAY_SERVE_DIRECT_INGRESS_MIN_", "RAY_SERVE_DIRECT_INGRESS_MAX_")) and "PORT" in k
                   for k in given)


def test_the_haproxy_template_of_this_ray_loses_only_the_per_request_log():
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from neuronserve.serve.local_ray import UNREAD_LOGS, loopback_template

    for line in UNREAD_LOGS:  # a Ray upgrade that renames one fails here, not silently
        assert line in HAPROXY_CONFIG_TEMPLATE, line
    patched = loopback_template(HAPROXY_CONFIG_TEMPLATE)
    assert "local0" not in patched and "httplog" not in patched and "log-health-checks" not in patched
    assert "option abortonclose" in patched and "http-reuse always" in patched  # the rest is Ray's


def test_the_haproxy_template_of_this_ray_keeps_its_listeners_on_loopback():
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from neuronserve.serve.local_ray import loopback_template

    patched = loopback_template(HAPROXY_CONFIG_TEMPLATE)
    binds = [line.strip() for line in patched.splitlines() if line.strip().startswith("bind ")]
    assert "bind 127.0.0.1:{{ config.stats_port }}" in binds and "bind 127.0.0.1:{{ config.metrics_port }}" in binds
    assert not [b for b in binds if b.startswith(("bind *:", "bind :"))], binds


def _rendered(template: str, stats: int = 23456, metrics: int = 23457) -> str:
    """The lines of Ray's template that the rewrite touches, as Serve renders them."""
    return (template.replace("{{ config.stats_port }}", str(stats)).replace("{{ config.metrics_port }}", str(metrics))
            .replace("{{ config.log_target }}", "127.0.0.1:514").replace("{{ config.error_file_path }}", "/tmp/ray/500.http"))


def test_the_rendered_config_gets_what_the_template_rewrite_gives():
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from neuronserve.serve.local_ray import loopback_config, loopback_template

    rewritten = loopback_config(_rendered(HAPROXY_CONFIG_TEMPLATE), 23456, 23457)
    assert rewritten == _rendered(loopback_template(HAPROXY_CONFIG_TEMPLATE))
    assert "bind 127.0.0.1:23456" in rewritten and "bind 127.0.0.1:23457" in rewritten
    assert "bind *:23456" not in rewritten and "local0" not in rewritten and "/tmp/ray/500.http" not in rewritten
    assert loopback_config(rewritten, 23456, 23457) == rewritten  # a reload of a rewritten config changes nothing


def test_a_config_whose_stats_listener_moved_is_refused():
    import pytest

    from neuronserve.serve.local_ray import check_haproxy_template, loopback_config

    with pytest.raises(ValueError, match="stats listener"):
        loopback_config("listen stats\n  bind 0.0.0.0:8404\n", 8404, 9101)
    assert check_haproxy_template() is None  # this Ray's template has the lines


def test_the_wrapper_rewrites_the_config_then_becomes_the_real_haproxy(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from neuronserve.serve import local_ray

    monkeypatch.setattr(local_ray, "ERROR_DIR", tmp_path)
    fake = tmp_path / "haproxy"  # records its pid, arguments and the config it was given
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "cfg = sys.argv[sys.argv.index('-f') + 1]\n"
                    "print(json.dumps({'pid': os.getpid(), 'argv': sys.argv, 'config': open(cfg).read()}))\n")
    fake.chmod(0o755)
    env = local_ray.install_haproxy_wrapper({"RAY_SERVE_HAPROXY_BINARY_PATH": str(fake)})
    assert env[local_ray.HAPROXY_REAL_ENV] == str(fake) and env["RAY_SERVE_HAPROXY_BINARY_PATH"] != str(fake)
    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n    log 127.0.0.1:514 local0 info\nlisten stats\n  bind *:8404\nfrontend http\n"
                      "    bind 0.0.0.0:8000\n    errorfile 502 /tmp/ray/500.http\n")
    proc = subprocess.Popen([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config), "-sf", "12"],
                            env={**os.environ, **env, "RAY_SERVE_HAPROXY_STATS_PORT": "8404"},
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    seen = json.loads(out)
    assert seen["pid"] == proc.pid  # exec'd in place: Serve's process handle is HAProxy's
    assert seen["argv"][1:] == ["-db", "-f", str(config), "-sf", "12"]
    assert "bind 127.0.0.1:8404" in seen["config"] and "bind 0.0.0.0:8000" in seen["config"]  # the API port is untouched
    assert "local0" not in seen["config"] and "/tmp/ray/500.http" not in seen["config"]  # neuronserve's error pages
    assert (tmp_path / "503.http").exists()  # written once, by the command, before Ray starts


def test_the_wrapper_refuses_a_config_it_cannot_keep_on_loopback(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "haproxy.cfg"
    config.write_text("listen stats\n  bind 0.0.0.0:8404\n")
    done = subprocess.run([sys.executable, "-c", "import sys; from neuronserve.serve.local_ray import run_haproxy; "
                           "run_haproxy(sys.argv)", "-db", "-f", str(config)], capture_output=True, text=True,
                          env={**os.environ, "NEURONSERVE_HAPROXY_BINARY": "/bin/true", "RAY_SERVE_HAPROXY_STATS_PORT": "8404"})
    assert done.returncode == 1 and "stats listener cannot be kept on loopback" in done.stderr


class _Process:
    def __init__(self, pid, code=None):
        self.pid, self.code = pid, code

    def poll(self):
        return self.code


class _Info:
    def __init__(self, process):
        self.process = process


def test_a_dead_gcs_or_raylet_is_named_and_other_processes_do_not_count():
    from neuronserve.serve.local_ray import LocalRayProcesses

    def procs(**codes):
        return LocalRayProcesses({kind: [_Info(_Process(i + 10, code))] for i, (kind, code) in enumerate(codes.items())})

    assert procs(gcs_server=None, raylet=None, dashboard=1).dead() is None
    assert procs(gcs_server=None, raylet=-9).dead() == "raylet (pid 11) was killed by SIGKILL"
    assert procs(gcs_server=3, raylet=None).dead() == "gcs_server (pid 10) exited with code 3"


def test_kill_stops_real_processes_that_ignore_sigterm():
    import subprocess
    import sys

    from neuronserve.serve.local_ray import LocalRayProcesses

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stubborn.stdout.readline().strip() == "up"
    stopped = LocalRayProcesses({"raylet": [_Info(stubborn)], "dashboard": [_Info(polite)]}).kill(grace_s=0.5)
    assert stopped == 2 and stubborn.poll() == -9 and polite.poll() == -15


def test_listeners_finds_this_process_and_stale_haproxy_spares_other_programs():
    from neuronserve.serve.local_ray import describe, listeners, stale_haproxy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert os.getpid() in listeners(port)
        assert not stale_haproxy(os.getpid())
        assert describe(os.getpid()).startswith(f"pid {os.getpid()} (")
    assert os.getpid() not in listeners(port)


def test_haproxy_answers_a_dead_replica_with_a_json_503(tmp_path, monkeypatch):
    import json

    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from neuronserve.serve import local_ray

    monkeypatch.setattr(local_ray, "ERROR_DIR", tmp_path / "errors")
    patched = local_ray.loopback_template(HAPROXY_CONFIG_TEMPLATE)
    for code in (502, 503, 504):
        assert f"errorfile {code} {tmp_path / 'errors' / f'{code}.http'}" in patched
    local_ray.write_error_files()
    head, body = (tmp_path / "errors" / "502.http").read_bytes().decode().split("\r\n\r\n", 1)
    lines = head.split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable" and "Retry-After: 1" in lines
    assert f"Content-Length: {len(body.encode())}" in lines
    assert json.loads(body)["error"]["type"] == "service_unavailable"
    assert (tmp_path / "errors" / "504.http").read_bytes().decode().startswith("HTTP/1.1 504 Gateway Timeout\r\n")


def test_lean_local_ray_sets_ray_start_parameters_only_inside_the_block():
    from ray._private import node, parameter

    from neuronserve.serve.local_ray import lean_local_ray

    before = parameter.RayParams()
    assert before.no_monitor is False and before.dashboard_agent_listen_port == 52365  # Ray's defaults
    start_api_server = node.Node.start_api_server
    with lean_local_ray():
        inside = parameter.RayParams()
        assert inside.no_monitor is True and inside.dashboard_agent_listen_port == 0
        assert node.Node.start_api_server is not start_api_server
        assert node.Node.start_api_server(object(), include_dashboard=False, raise_on_failure=False) is None
    after = parameter.RayParams()
    assert after.no_monitor is False and after.dashboard_agent_listen_port == 52365
    assert node.Node.start_api_server is start_api_server
    with lean_local_ray(lean=False):  # sessions of their own only
        assert parameter.RayParams().no_monitor is False and node.Node.start_api_server is start_api_server


def test_lean_local_ray_starts_processes_in_sessions_of_their_own_and_raises_the_raylets_prestart():
    import subprocess
    import sys

    from ray._private import services

    from neuronserve.serve.local_ray import lean_local_ray

    seen = []

    class Recording(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            seen.append(list(args))
            super().__init__(args, *rest, **kwargs)

    original = services.ConsolePopen
    services.ConsolePopen = Recording
    try:
        with lean_local_ray(prestart_workers=5):
            child = services.ConsolePopen([sys.executable, "-c", "import time; time.sleep(5)"])
            try:
                assert os.getsid(child.pid) == child.pid != os.getsid(0)
            finally:
                child.kill()
                child.wait()
            # Not run (no such program): what the raylet would be started with.
            try:
                services.ConsolePopen(["/nonexistent/raylet", "--maximum_startup_concurrency=2",
                                       "--num_prestart_python_workers=2", "--head"])
            except OSError:
                pass
        assert services.ConsolePopen is Recording
    finally:
        services.ConsolePopen = original
    assert seen[-1] == ["/nonexistent/raylet", "--maximum_startup_concurrency=5", "--num_prestart_python_workers=5",
                        "--head"]
