"""What several benchmark scripts share: a Ray Serve anchor server's run-until-signalled life,
stopping a server they started, the machine's CPU name for reports, and totals read from a
Prometheus endpoint.

Imported by scripts run as `python benchmarks/NAME.py` (this folder is then on `sys.path`).
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import threading
from pathlib import Path


def serve_until_signalled(app, name: str, port: int, ready_line: str, **ray_init) -> None:
    """Run `app` on a local Ray Serve at 127.0.0.1:`port`, print `ready_line` once it answers, and
    stop on SIGTERM or SIGINT (the benchmark stops its servers by signal). Never returns."""
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, logging_level="WARNING", **ray_init)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=name, route_prefix="/")
    print(ready_line, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    os._exit(0)


def stop_server(proc: subprocess.Popen, wait_s: float) -> None:
    """Stop a server started in a session of its own: SIGTERM to the command alone (it drains and
    stops its Ray and HAProxy itself), and its whole process group killed if it is not gone within
    `wait_s` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metric_totals(metrics_url: str, samples: dict[str, str]) -> dict[str, float]:
    """`{key: sum over every label set of the sample named samples[key]}` from a Prometheus endpoint
    (a sample name as exposed, e.g. `neuronserve_tokens_real_total`)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name: key for key, name in samples.items()}
    totals = dict.fromkeys(samples, 0.0)
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for s in family.samples:
            if s.name in wanted:
                totals[wanted[s.name]] += s.value
    return totals
