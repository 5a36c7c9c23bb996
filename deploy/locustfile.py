"""Locust user for teams that drive load with Locust (`pip install locust`; not a dependency).

    NEURONSERVE_MODEL=my-model locust -f deploy/locustfile.py --host http://127.0.0.1:8000

With API keys on the server, the first of `NEURONSERVE_API_KEY`'s comma-separated keys is sent as
`Authorization: Bearer` (as `neuronserve loadtest` does).

Each user POSTs /v1/embeddings back to back with texts from the same seeded `mixed` workload that
`neuronserve loadtest --workload mixed` sends, so numbers from both tools are comparable. Locust
rounds latencies under 100 ms to whole milliseconds; for encoder latencies prefer
`neuronserve loadtest`, which reports sub-millisecond percentiles, goodput and $ per 1M requests.
"""

import itertools
import os

from locust import HttpUser, constant, task

try:
    from neuronserve.deploy.loadtest.workload import generate
except ImportError as e:
    raise SystemExit(f"the locustfile needs neuronserve installed in locust's Python (pip install -e .): {e}") from e

TEXTS = generate("mixed", seed=int(os.environ.get("NEURONSERVE_LOADTEST_SEED", "0"))).texts
_NEXT = itertools.count()


class EmbeddingsUser(HttpUser):
    wait_time = constant(0)  # closed loop: like `neuronserve loadtest --concurrency <users>`

    def on_start(self):
        key = os.environ.get("NEURONSERVE_API_KEY", "").split(",")[0].strip()
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = os.environ.get("NEURONSERVE_MODEL")
        if not self.model:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                try:
                    self.model = resp.json()["data"][0]["id"]
                except (ValueError, KeyError, IndexError, TypeError):
                    resp.failure("no model listed; set NEURONSERVE_MODEL")
                    self.model = "default"

    @task
    def embed(self):
        text = TEXTS[next(_NEXT) % len(TEXTS)]
        with self.client.post("/v1/embeddings", json={"input": text, "model": self.model},
                              name="/v1/embeddings", catch_response=True) as resp:
            if resp.status_code == 429:
                resp.failure("throttled (429)")
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            else:
                resp.success()
