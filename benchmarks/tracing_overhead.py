"""What tracing costs a request on the replica's event loop: off against code without the hooks, and on.

    python benchmarks/tracing_overhead.py [--requests 4000] [--clients 8] [--rounds 5] [--baseline REV]

Requests go through the real HTTP layer (`serve.app`: FastRoutes, the replica's /v1/embeddings
handler, the one error handler) and the real Batcher, with a stand-in engine (a few tokens per text,
no model) and a device that answers at once, so that only the serving code is timed, not a model:
the hooks' cost is not hidden behind inference. Three variants, alternated in one process
(A B C, C B A, ...), `--rounds` times, each running `--requests` requests from `--clients`
concurrent clients:

- `baseline`: `serve/app.py` and `serve/batcher.py` as of `--baseline` (default: the parent of the
  commit that added `serve/tracing.py`), loaded from git;
- `off`: this tree, tracing off (no `--otlp-endpoint`);
- `on`: this tree, tracing on, spans going through the BatchSpanProcessor to an exporter that drops
  them (what the SDK costs here, not the network).

Prints the process's CPU and wall microseconds per request (medians over the rounds), and each
variant's difference from the baseline (the median of the differences within each round). With a
device that takes no time, that is the serving code's CPU per request; with tracing on it includes
the span processor's thread. Then the off hooks timed alone (timeit).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a short sentence", "another short sentence to embed", "one more", "the fourth text of the set"]


def git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def default_baseline() -> str:
    first = subprocess.run(["git", "-C", str(REPO), "rev-list", "--reverse", "HEAD", "--", "serve/tracing.py"],
                           capture_output=True, text=True, check=True).stdout.split()
    if not first:
        raise SystemExit("serve/tracing.py is in no commit of HEAD: give --baseline REV")
    return first[0] + "^"


def load(name: str, source: str):
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class StandInEngine:
    """Tokens without a tokenizer; outputs without a model."""

    task, model_name = "embed", "bench"

    def tokenize(self, texts, truncate=True):
        return [[101, *(len(w) for w in t.split()), 102] for t in texts]

    def postprocess_embeddings(self, raw, dimensions=None):
        return raw


def device(bucket, rows, layout=None):
    import numpy as np

    return np.ones((len(rows), 8), dtype=np.float32)


def replica(app_module, batcher_module, tracing=None):
    """A loaded NeuronServe of `app_module` (as the unit tests build one), without Ray Serve."""
    from neuronserve.models.artifact import parse_buckets
    from neuronserve.serve.buckets import BucketSet
    from neuronserve.serve.replica import limits_of
    from neuronserve.serve.settings import AppArgs

    cls = type("BenchReplica", (app_module.NeuronServe.func_or_class,), {"__del__": lambda self: None})
    r = object.__new__(cls)
    r.args = AppArgs(artifacts="unused")
    r.loaded = concurrent.futures.Future()
    r.loaded.set_result(True)
    r.warmup_error, r.metrics, r.model_name = None, None, "bench"
    r.engine = StandInEngine()
    buckets = BucketSet(parse_buckets("1x16,4x16,8x16,16x16"))
    r.batcher = batcher_module.Batcher(buckets, device, max_batch_tokens=2048,
                                       timings_s={b: 1e-5 for b in buckets.buckets})
    r.limits = limits_of(r.args, "bench", "embed")
    if tracing is not None:
        r.tracing = tracing
        tracing.attach(r.batcher)
    return r


async def drive(app_module, r, requests: int, clients: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) for `requests` POST /v1/embeddings through
    FastRoutes from `clients` concurrent clients."""
    import orjson

    bodies = [orjson.dumps({"input": [t]}) for t in TEXTS]

    async def fastapi_app(scope, receive, send):
        raise AssertionError("the fast path must not reach FastAPI")

    mw = app_module.FastRoutes(fastapi_app)
    app_module._replica = r
    left = iter(range(requests))

    async def client():
        statuses = []
        for i in left:
            body = bodies[i % len(bodies)]
            sent = []

            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "root_path": "",
                     "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                     "query_string": b""}
            await mw(scope, receive, send)
            statuses.append(sent[0]["status"])
        return statuses

    c0, t0 = time.process_time(), time.perf_counter()
    statuses = [s for part in await asyncio.gather(*(client() for _ in range(clients))) for s in part]
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    app_module._replica = None
    assert statuses == [200] * requests, sorted(set(statuses))
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline", help="git revision without the tracing hooks (default: before serve/tracing.py)")
    a = p.parse_args(argv)

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from neuronserve.serve import app as app_now
    from neuronserve.serve import batcher as batcher_now
    from neuronserve.serve.tracing import Tracing

    class DropExporter(SpanExporter):
        def __init__(self):
            self.spans = 0

        def export(self, spans):
            self.spans += len(spans)
            return SpanExportResult.SUCCESS

    rev = a.baseline or default_baseline()
    app_then = load("app_baseline", git_show(rev, "serve/app.py"))
    batcher_then = load("batcher_baseline", git_show(rev, "serve/batcher.py"))
    exporter = DropExporter()
    tracing = Tracing(exporter)
    variants = {
        "baseline": lambda: (app_then, replica(app_then, batcher_then)),
        "off": lambda: (app_now, replica(app_now, batcher_now)),
        "on": lambda: (app_now, replica(app_now, batcher_now, tracing)),
    }
    names = list(variants)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm: imports, caches
        asyncio.run(drive(*variants[name](), 500, a.clients))
    for k in range(a.rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            module, r = variants[name]()
            c, w = asyncio.run(drive(module, r, a.requests, a.clients))
            cpu[name].append(c / a.requests * 1e6)
            wall[name].append(w / a.requests * 1e6)
    tracing.shutdown()
    print(f"baseline {rev}; {a.requests} requests x {a.rounds} rounds, {a.clients} clients; "
          f"{exporter.spans} spans exported by 'on'")
    # Differences within a round (runs next to each other), then their median: the machine's load
    # drifts between rounds more than the hooks cost.
    print("variant  | CPU us/request | vs baseline | wall us/request | vs baseline | CPU per round")
    for name in names:
        dc = statistics.median(x - y for x, y in zip(cpu[name], cpu["baseline"]))
        dw = statistics.median(x - y for x, y in zip(wall[name], wall["baseline"]))
        print(f"{name:8} | {statistics.median(cpu[name]):14.1f} | {dc:+11.1f} | {statistics.median(wall[name]):15.1f} | "
              f"{dw:+11.1f} | {' '.join(f'{t:.1f}' for t in cpu[name])}")
    hooks_off()
    return 0


def hooks_off(n: int = 200_000) -> None:
    """The hooks a request passes with tracing off, timed alone: four `self.tracing` checks in the
    app, two `tracing.span()` blocks, and the batcher's two hook checks."""
    import timeit

    from neuronserve.serve import tracing

    class Holder:
        tracing = None
        request_context = None
        on_batch_trace = None

    h = Holder()

    def request_hooks():
        if h.tracing is not None:
            pass
        with tracing.span("tokenize"):
            pass
        if h.request_context is not None:
            pass
        if h.on_batch_trace is not None:
            pass
        if h.tracing is not None:
            pass
        with tracing.span("serialize"):
            pass
        if h.tracing is not None:
            pass
        if h.tracing is not None:
            pass

    def nothing():
        pass

    hooks = min(timeit.repeat(request_hooks, number=n, repeat=5)) / n
    call = min(timeit.repeat(nothing, number=n, repeat=5)) / n
    print(f"hooks with tracing off, alone: {(hooks - call) * 1e6:.2f} us per request")


if __name__ == "__main__":
    sys.exit(main())
