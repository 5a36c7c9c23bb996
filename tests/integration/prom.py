"""Run a real Prometheus on loopback and query it: helpers shared by integration tests.

    from tests.integration.prom import prometheus_factory, scrape_config   # fixture + config

    def test_x(prometheus_factory, tmp_path):
        prom = prometheus_factory(scrape_config({"neuronserve": ["127.0.0.1:9400"]}),
                                  rule_files=[RULES])
        prom.wait_until(lambda: prom.scalar("sum(up)") == 1, timeout_s=30, what="target up")

Every wait polls with a deadline; processes are terminated at fixture teardown.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import httpx
import pytest
import yaml

from tests.fixtures.ports import free_port

T = TypeVar("T")


class PrometheusError(RuntimeError):
    pass


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def scrape_config(jobs: Mapping[str, Iterable[str]], *, scrape_interval: str = "1s",
                  evaluation_interval: str = "1s",
                  rule_files: Iterable[str | Path] = ()) -> dict[str, Any]:
    """A Prometheus config scraping `{job: ["host:port", ...]}` at `scrape_interval`."""
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": evaluation_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }


def wait_until(fn: Callable[[], T], *, timeout_s: float, interval_s: float = 0.25,
               what: str = "condition") -> T:
    """Poll `fn` until it returns a truthy value; raise TimeoutError (with the last value)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = fn()
        except (httpx.HTTPError, PrometheusError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; "
                               f"last value: {last!r}")
        time.sleep(interval_s)


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    workdir: Path
    client: httpx.Client = field(repr=False)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the `result` list (vector) or raises PrometheusError."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = self.client.get(f"{self.url}/api/v1/query", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: {body.get('error', r.text)}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def scalar(self, expr: str) -> float | None:
        """The value of a query that yields exactly one sample, else None."""
        result = self.query(expr)
        if len(result) != 1:
            return None
        return float(result[0]["value"][1])

    def values(self, expr: str, by: str) -> dict[str, float]:
        """{label value of `by`: sample value} for a vector query."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def targets_up(self) -> bool:
        r = self.client.get(f"{self.url}/api/v1/targets")
        active = r.json()["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def rule_errors(self) -> list[str]:
        r = self.client.get(f"{self.url}/api/v1/rules")
        errors = []
        for g in r.json()["data"]["groups"]:
            for rule in g["rules"]:
                if rule.get("health") == "err":
                    errors.append(f"{rule.get('name')}: {rule.get('lastError')}")
        return errors

    def wait_until(self, fn: Callable[[], T], *, timeout_s: float, interval_s: float = 0.25,
                   what: str = "condition") -> T:
        return wait_until(fn, timeout_s=timeout_s, interval_s=interval_s, what=what)

    def log_tail(self, lines: int = 40) -> str:
        path = self.workdir / "prometheus.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)


def start_prometheus(config: Mapping[str, Any], workdir: Path, *,
                     rule_files: Iterable[str | Path] = (), binary: str | None = None,
                     ready_timeout_s: float = 60.0) -> PrometheusServer:
    """Start Prometheus on a free loopback port with `config` (rule_files appended)."""
    binary = binary or find_prometheus()
    if binary is None:
        raise FileNotFoundError("prometheus binary not found on PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["rule_files"] = [*config.get("rule_files", []), *(str(p) for p in rule_files)]
    cfg_path = workdir / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=proc, workdir=workdir,
                              client=httpx.Client(timeout=5.0))

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            return server.client.get(f"{server.url}/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout_s=ready_timeout_s, what="prometheus /-/ready")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def prometheus_factory(tmp_path):
    """Factory fixture: `prometheus_factory(config, rule_files=[...]) -> PrometheusServer`.

    Skips the test when no `prometheus` binary is installed (CI installs Debian's package).
    """
    binary = find_prometheus()
    if binary is None:
        pytest.skip("prometheus binary not on PATH (apt-get install prometheus)")
    started: list[PrometheusServer] = []

    def factory(config: Mapping[str, Any], *, rule_files: Iterable[str | Path] = ()):
        server = start_prometheus(config, tmp_path / f"prometheus-{len(started)}",
                                  rule_files=rule_files, binary=binary)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
