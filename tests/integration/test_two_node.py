"""Two Ray nodes on loopback, the rendered Serve config deployed the way KubeRay does it (REST,
`serve deploy`), one replica per node: replicas land on both nodes and HTTP requests succeed.

Each node declares `neuron_cores: 2` and each replica asks for 2, so exactly one replica fits per
node, as one Neuron replica per pod does under KubeRay. The replicas run the CPU backend.

Every process this test starts runs in its own session with a private HOME and Ray temp dir; cleanup
kills those process groups and any process whose command line names the test's temp dir, never
`ray stop` (other Ray clusters may run on this machine). Ray >= 2.52 turns token authentication on:
all processes here share one token through RAY_AUTH_MODE/RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.ports import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def ray_bin() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else "ray"


def serve_bin() -> str:
    exe = Path(sys.executable).parent / "serve"
    return str(exe) if exe.exists() else "serve"


class Cluster:
    def __init__(self, root: Path):
        # Ray's socket paths must stay short: keep the temp dir shallow.
        self.root = root
        self.temp = root / "ray"
        self.home = root / "home"
        self.temp.mkdir()
        self.home.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "NEURONSERVE_CACHE_DIR": str(root / "cache"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)

    @property
    def address(self) -> str:
        # Ray resolves 127.0.0.1 to the machine's own interface address and binds its GCS there, so
        # the cluster runs on that address (traffic stays on this host); HTTP and the dashboard
        # listen on 127.0.0.1 only.
        return f"127.0.0.1:{self.gcs_port}"

    def _node_ports(self) -> list[str]:
        # Two raylets on one machine must not share their agents' fixed default ports.
        return [
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
        ]

    def start_node(self, head: bool, log: Path) -> None:
        common = ["--num-cpus", "1", "--resources", json.dumps({"neuron_cores": 2}), "--temp-dir", str(self.temp),
                  "--block", *self._node_ports()]
        if head:
            cmd = [ray_bin(), "start", "--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port), *common]
        else:
            cmd = [ray_bin(), "start", "--address", self.address, *common]
        out = open(log, "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=self.root))

    def launch(self, head: bool, attempts: int = 3, timeout: float = 120) -> None:
        """Start a node and wait for `ray start` to report it up. A port picked free may be taken by
        another process before Ray binds it; then `ray start` exits and the node is started again
        on new ports."""
        name = "head" if head else "worker"
        for attempt in range(1, attempts + 1):
            log = self.root / f"{name}-{attempt}.log"
            self.start_node(head=head, log=log)
            proc = self.procs[-1]
            deadline = time.time() + timeout
            while proc.poll() is None and time.time() < deadline:
                if "Ray runtime started." in log.read_text(errors="replace"):
                    return
                time.sleep(0.5)
            if proc.poll() is None:
                raise AssertionError(f"{name} node not up after {timeout:.0f} s:\n{self.logs()}")
            if attempt == attempts:
                raise AssertionError(f"{name} node exited {attempts} times (last code {proc.returncode}):\n"
                                     f"{self.logs()}")
            if head:
                self.gcs_port, self.dashboard_port = free_port(), free_port()

    def python(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        code = textwrap.dedent(f"""
            import ray, time, sys
            ray.init(address="{self.address}", logging_level="ERROR")
            deadline = time.time() + {timeout}
            while time.time() < deadline:
                alive = [x for x in ray.nodes() if x["Alive"]]
                if len(alive) >= {n}:
                    sys.exit(0)
                time.sleep(0.5)
            print("alive nodes:", len([x for x in ray.nodes() if x["Alive"]]))
            sys.exit(1)
        """)
        deadline = time.time() + timeout
        while True:  # the head's GCS may not accept connections yet
            try:
                r = self.python(code, timeout=timeout + 60)
            except subprocess.TimeoutExpired as e:  # ray.init itself can hang on an unreachable GCS
                raise AssertionError(f"cluster never had {n} nodes: probe hung\n{e.stderr!r:.3000}\n{self.logs()}")
            if r.returncode == 0:
                return
            if time.time() > deadline:
                raise AssertionError(f"cluster never had {n} nodes:\n{r.stdout}\n{r.stderr[-3000:]}\n{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text()[-2000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Ray daemons that left the process group still name our temp dir on their command line.
        marker = str(self.root).encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                if marker in (pid_dir / "cmdline").read_bytes():
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass


@pytest.fixture
def cluster():
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ns2n-", dir="/tmp"))
    c = Cluster(root)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def compile_cpu_artifact(c: Cluster) -> Path:
    out = c.root / "artifact"
    code = textwrap.dedent(f"""
        from pathlib import Path
        from neuronserve.compile.compiler import CompileOptions, compile_artifact
        from neuronserve.models.artifact import Bucket
        compile_artifact(CompileOptions(model="default", task="embed", target="cpu",
                                        buckets=[Bucket(1, 32), Bucket(4, 32)], out=Path({str(out)!r})))
    """)
    r = c.python(code, timeout=600)
    assert r.returncode == 0, f"compile failed:\n{r.stderr[-3000:]}"
    return out


def serve_config_for_test(c: Cluster, artifact: Path) -> dict:
    """The rendered serveConfigV2, adjusted only where one machine differs from a cluster."""
    from neuronserve.deploy.render import RenderOptions, plan, serve_config

    opts = RenderOptions(artifacts=str(artifact), instance_type="c7i.xlarge", image="unused", backend="cpu",
                         min_replicas=2, max_replicas=2, threads_per_replica=1)
    config = serve_config(plan(opts), opts)
    # Both "nodes" share one loopback: one proxy only, on a free port.
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": c.http_port}
    (app,) = config["applications"]
    app["args"]["artifacts"] = str(artifact)  # the pods' path is the image's; here it is local
    app["args"]["metrics_dir"] = None
    (dep,) = app["deployments"]
    # One replica per node, like one Neuron replica per pod: each node has neuron_cores 2.
    dep["ray_actor_options"] = {"num_cpus": 0, "resources": {"neuron_cores": 2}}
    return config


def test_replicas_on_both_nodes_and_http_works(cluster):
    import httpx

    from tests.fixtures.k8s_validate import validate_serve_config

    c = cluster
    artifact = compile_cpu_artifact(c)
    c.launch(head=True)
    c.wait_nodes(1)
    c.launch(head=False)
    c.wait_nodes(2)

    config = serve_config_for_test(c, artifact)
    validate_serve_config(yaml.safe_dump(config))
    config_file = c.root / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    r = subprocess.run([serve_bin(), "deploy", str(config_file), "--address", f"http://127.0.0.1:{c.dashboard_port}"],
                       env=c.env, capture_output=True, text=True, timeout=120, cwd=c.root)
    assert r.returncode == 0, f"serve deploy failed:\n{r.stdout}\n{r.stderr[-3000:]}\n{c.logs()}"

    probe = textwrap.dedent(f"""
        import json, sys, time, ray
        from ray import serve
        from ray.util.state import list_actors
        ray.init(address="{c.address}", logging_level="ERROR")
        deadline = time.time() + 420
        status = None
        while time.time() < deadline:
            apps = serve.status().applications
            app = apps.get("neuronserve")
            status = app and app.status
            if status == "RUNNING":
                break
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                print(json.dumps({{"status": status, "message": app.message}}))
                sys.exit(1)
            time.sleep(1)
        # Name this cluster's API server: other Ray clusters may run on the machine.
        actors = list_actors(address="http://127.0.0.1:{c.dashboard_port}", filters=[("state", "=", "ALIVE")],
                             detail=True, limit=10000)
        replicas = [a for a in actors
                    if a.class_name.startswith("ServeReplica:neuronserve:NeuronServe")]
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({{"status": status, "replica_nodes": [a.node_id for a in replicas], "nodes": nodes}}))
    """)
    r = c.python(probe, timeout=600)
    assert r.returncode == 0, f"app did not start:\n{r.stdout}\n{r.stderr[-3000:]}\n{c.logs()}"
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["status"] == "RUNNING", info
    assert len(info["nodes"]) == 2
    assert len(info["replica_nodes"]) == 2, info
    assert set(info["replica_nodes"]) == set(info["nodes"]), f"replicas not spread over both nodes: {info}"

    base = f"http://127.0.0.1:{c.http_port}"
    with httpx.Client(timeout=60, trust_env=False) as client:
        deadline = time.time() + 120
        while True:  # ready gates on warm-up
            ready = client.get(f"{base}/v2/health/ready")
            if ready.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert ready.status_code == 200, ready.text
        for i in range(20):
            resp = client.post(f"{base}/v1/embeddings", json={"input": [f"request {i}", "second row"]})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert [d["index"] for d in body["data"]] == [0, 1]
            assert len(body["data"][0]["embedding"]) == 384
