"""A local server's replicas inherit their environment from the Ray it starts (no runtime_env, so
they can start in Ray's prestarted workers); the metrics directory is the one thing they set
themselves, since Ray's own processes would write their metrics into it too."""

from __future__ import annotations

import json
import subprocess
import sys

from neuronserve.serve.placement import (REPLICA_ENV_INHERITED, deployment_options, inherited_replica_env,
                                         replica_env)
from neuronserve.serve.settings import AppArgs
from tests.fixtures.manifests import make_artifact


def test_replicas_get_a_runtime_env_unless_the_local_server_put_theirs_in_rays(tmp_path, monkeypatch):
    art = make_artifact(tmp_path, "cpu")
    monkeypatch.delenv(REPLICA_ENV_INHERITED, raising=False)
    options, _ = deployment_options(AppArgs(artifacts=str(art), metrics_dir="/m"))
    env = options["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/m" and env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv(REPLICA_ENV_INHERITED, "1")
    options, _ = deployment_options(AppArgs(artifacts=str(art), metrics_dir="/m"))
    assert "runtime_env" not in options["ray_actor_options"]


def test_the_inherited_environment_is_the_replicas_but_the_metrics_directory():
    environ = {"OMP_WAIT_POLICY": "ACTIVE", "NEURONSERVE_LOG_LEVEL": "debug"}
    inherited = inherited_replica_env(environ)
    wanted = replica_env(AppArgs(artifacts=".", metrics_dir="/m"), environ)
    assert {**environ, **inherited} == {**{k: v for k, v in wanted.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
                                        **environ, REPLICA_ENV_INHERITED: "1"}
    assert "PROMETHEUS_MULTIPROC_DIR" not in inherited and "OMP_WAIT_POLICY" not in inherited  # the user's is kept


def test_a_replica_writes_its_metrics_into_the_directory_it_is_given(tmp_path):
    """In a fresh process (prometheus_client chooses its storage at import): metrics made after
    `use_multiproc_dir` go to files the exporter aggregates."""
    code = (
        "import json, os, sys\n"
        "from neuronserve.serve import metrics\n"
        "metrics.use_multiproc_dir(sys.argv[1])\n"
        "metrics.get_metrics().requests.labels('m', '/v1/embeddings', '200').inc(3)\n"
        "from prometheus_client import generate_latest\n"
        "print(json.dumps({'env': os.environ.get('PROMETHEUS_MULTIPROC_DIR'), 'files': sorted(os.listdir(sys.argv[1])),"
        " 'text': generate_latest(metrics.registry()).decode()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["env"] == str(tmp_path) and any(f.startswith("counter_") for f in seen["files"])
    assert 'neuronserve_requests_total{model="m",route="/v1/embeddings",status="200"} 3.0' in seen["text"]
