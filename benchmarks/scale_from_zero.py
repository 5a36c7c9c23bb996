"""Time to first response after scale to zero (`neuronserve serve --autoscale 0:N`).

    python benchmarks/scale_from_zero.py [--rounds 3] [--artifacts DIR]

Starts a local Ray with the ingress `neuronserve serve` uses (HAProxy, its set-up hook), deploys
the application with `--autoscale 0:1` (default artifact: the default model for CPU, compiled into
the cache if missing) and a 2 s downscale delay, then for each round waits until Serve reports no
running replica and times one embeddings request from sending to its answer: the autoscaler
noticing the request, a replica process starting, loading the artifact and warming its buckets,
and the request itself. A replica still warming when the request has waited `request_timeout_s`
answers 503 with Retry-After; the client retries after it, as a client should, and the time runs
to the first 200. Prints one line per round (every answer) and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.fixtures.ports import free_port  # noqa: E402


def running(app: str) -> int:
    from ray import serve

    from neuronserve.serve.placement import DEPLOYMENT_NAME

    return serve.status().applications[app].deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--artifacts", help="artifact directory (default: the default model for CPU)")
    args = parser.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    from neuronserve.serve.app import build_app
    from neuronserve.serve.local_ray import local_ray_env, stop_haproxy
    from neuronserve.serve.settings import AppArgs

    artifacts = args.artifacts
    if not artifacts:
        from neuronserve.compile.compiler import CompileOptions, compile_artifact

        artifacts = str(compile_artifact(CompileOptions(model="default", target="cpu")).out_dir)
    os.environ.setdefault("HOME", tempfile.mkdtemp(prefix="nsh-"))
    os.environ["NEURONSERVE_EXTRA_PYTHONPATH"] = str(REPO)
    os.environ.update(local_ray_env())
    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"),
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    node_id = ray.get_runtime_context().get_node_id()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    times = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(AppArgs(artifacts=artifacts, autoscale="0:1", upscale_delay_s=0, downscale_delay_s=2,
                                metrics_port=0))
        serve.run(app, name="neuronserve", route_prefix="/", blocking=False)
        # No readiness polling first: a ready check that answers 503 at once (warming up) is no
        # ongoing request, so with a 2 s downscale delay the first replica may leave before it is
        # warm. Each round's request waits in the replica through its warm-up instead.
        with httpx.Client(timeout=300) as c:
            for i in range(args.rounds):
                t0 = time.monotonic()
                zeros = 0
                while zeros < 3:  # three polls in a row, so a status between two states is not taken
                    zeros = zeros + 1 if running("neuronserve") == 0 else 0
                    time.sleep(0.5)
                idle = time.monotonic() - t0
                t0 = time.monotonic()
                answers = []  # a replica still warming after request_timeout_s answers 503 with Retry-After
                while True:
                    r = c.post(url + "/v1/embeddings", json={"input": ["the first request after scale to zero"]})
                    answers.append(f"{r.status_code} at {time.monotonic() - t0:.1f} s")
                    if r.status_code != 503 or not r.headers.get("retry-after"):
                        break
                    time.sleep(float(r.headers["retry-after"]))
                took = time.monotonic() - t0
                times.append(took)
                print(f"round {i + 1}: zero replicas {idle:.1f} s after the last request; first 200 in {took:.2f} s "
                      f"({', '.join(answers)})", flush=True)
                if r.status_code != 200:
                    print(r.headers, r.text[:300])
                    return 1
        print(f"median time to first 200 from zero: {statistics.median(times):.1f} s over {len(times)} rounds "
              f"({os.cpu_count()} CPUs)")
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_haproxy(node_id)


if __name__ == "__main__":
    raise SystemExit(main())
