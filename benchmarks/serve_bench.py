"""Serving benchmark: neuronserve against a naive server and plain Ray Serve batching, all on the
same artifact graph, the same machine and the same load generator (`neuronserve loadtest`).

    python benchmarks/serve_bench.py [--artifacts DIR] [--workload mixed|short] [--duration 10]
                                     [--concurrency 1,8,32,64] [--out benchmarks/results]

Prints one table and writes `<out>/serve-<workload>-<date>.json` and `.md`. Every ratio comes from
this one run: served real tokens/s against the raw backend's best tokens/s on pre-padded buckets
(the limit, measured before the servers and again right after neuronserve's steps: the mean of
the two), padded against real tokens, and each server against the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from bench_common import metric_totals, stop_server

from neuronserve.serve.placement import OPENMP_ENV

REPO = Path(__file__).resolve().parents[1]



def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TARGETS = {
    "ratio_to_limit_c32": 0.6,  # served real tokens/s at c=32 >= 0.6 x raw limit
    "vs_plain_ray_c32": 1.8,  # >= 1.8 x plain Ray Serve batching
    "padded_per_real": 1.15,  # padded/real tokens <= 1.15
    "c1_p50_over_raw_ms": 8.0,  # p50 at c=1 <= raw batch-1 forward + 8 ms
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_workload(kind: str, path: Path, n: int = 1024) -> None:
    from neuronserve.deploy.loadtest.workload import generate

    texts = generate(kind, count=n, seed=0).texts
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))


def _padded_rate(engine, bucket, inputs, min_s: float) -> float:
    """Padded tokens/s of `bucket` run back to back for at least `min_s` (and 3 calls)."""
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_s:
        engine.backend.forward(bucket, inputs)
        n += 1
    return bucket.padded_tokens * n / (time.perf_counter() - t0)


def _raw_worker(artifacts: str, threads: int, buckets: list[str], min_s: float, barrier) -> list[float]:
    """Padded tokens/s of each bucket, pre-padded, run for at least `min_s`; every worker of one
    measurement starts each bucket together (the barrier), so concurrent workers share the cores."""
    from neuronserve.models.artifact import parse_buckets
    from neuronserve.serve.engine import Engine

    engine = Engine(artifacts, "cpu", backend_options={"threads": threads})
    rates = []
    for bucket in parse_buckets(",".join(buckets)):
        inputs = _tensors(engine, [[1000] * bucket.seq_len] * bucket.batch_size, bucket)
        engine.backend.forward(bucket, inputs)
        engine.backend.forward(bucket, inputs)
        if barrier is not None:
            barrier.wait()
        rates.append(_padded_rate(engine, bucket, inputs, min_s))
    return rates


def _raw_forwards_worker(artifacts: str, forwards: int, buckets: list[str], min_s: float) -> list[float]:
    """Like `_raw_worker`, but one process running `forwards` single-threaded forwards at once on
    one engine (the server's CPU default: one forward per core in one replica)."""
    import threading

    from neuronserve.models.artifact import parse_buckets
    from neuronserve.serve.engine import Engine

    engine = Engine(artifacts, "cpu", backend_options={"threads": 1})
    barrier = threading.Barrier(forwards)
    rates = []
    for bucket in parse_buckets(",".join(buckets)):
        inputs = _tensors(engine, [[1000] * bucket.seq_len] * bucket.batch_size, bucket)
        counts = [0] * forwards

        def run(k: int) -> None:
            engine.backend.forward(bucket, inputs)
            barrier.wait()
            counts[k] = _padded_rate(engine, bucket, inputs, min_s)

        workers = [threading.Thread(target=run, args=(k,)) for k in range(forwards)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(sum(counts))
    return rates


def _batch1_ms(artifacts: str, threads: int, median_len: int) -> tuple[float, str]:
    import numpy as np

    from neuronserve.serve.engine import Engine

    engine = Engine(artifacts, "cpu", backend_options={"threads": threads})
    bucket = engine.buckets.bucket_for(1, engine.buckets.seq_len_for(median_len))
    row = [[1000] * median_len]
    for _ in range(3):
        engine.run_bucket(bucket, row)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        engine.run_bucket(bucket, row)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000, str(bucket)


# Seconds per bucket in the raw limit's scan; then its best buckets are measured again, this
# many, this long each.
SCAN_S, CONFIRM_TOP, CONFIRM_S = 0.6, 3, 2.0


def raw_limit(artifacts: Path, texts: list[str], min_s: float = SCAN_S, batch1: bool = True) -> dict:
    """The raw backend's best real tokens/s on full, pre-padded buckets (no tokenizer, no HTTP),
    as the best of three ways to use the machine's cores: one process with a thread per core, one
    single-threaded process per core running at once, or one process running a single-threaded
    forward per core at once (the server's CPU default). Each layout scans the buckets for
    `min_s` each, then measures its CONFIRM_TOP best again for CONFIRM_S each and keeps the best
    of those. With `batch1`, also the batch-1 forward of the workload's median text, the faster
    of 1 thread and all of them."""
    import multiprocessing as mp

    import numpy as np

    from neuronserve.models.artifact import load_manifest
    from neuronserve.serve.engine import Engine

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    manifest = load_manifest(artifacts)
    # Small buckets never hold the limit on this backend, nor past 2048 padded tokens; keeps it short.
    buckets = [str(e.bucket) for e in manifest.buckets
               if e.bucket.batch_size >= 4 and 256 <= e.bucket.padded_tokens <= 2048]
    ctx = mp.get_context("spawn")
    out: dict = {}
    if batch1:
        # The batch-1 forward first, on a quiet machine: the median of 30 calls, best of 3 rounds.
        engine = Engine(artifacts, "cpu", backend_options={"threads": 1})
        median_len = int(np.median([len(r) for r in engine.tokenize(texts)]))
        del engine
        with ctx.Pool(1) as pool:
            b1 = min(pool.starmap(_batch1_ms, [(str(artifacts), t, median_len) for t in sorted({1, cores})] * 3))
        out = {"batch1_forward_ms": b1[0], "median_tokens": median_len, "batch1_bucket": b1[1]}
    def measure(procs: int, threads: int, forwards: int, names: list[str], seconds: float) -> list[float]:
        if forwards > 1:
            with ctx.Pool(1) as pool:
                (totals,) = pool.starmap(_raw_forwards_worker, [(str(artifacts), forwards, names, seconds)])
            return totals
        barrier = ctx.Manager().Barrier(procs) if procs > 1 else None
        with ctx.Pool(procs) as pool:
            parts = pool.starmap(_raw_worker, [(str(artifacts), threads, names, seconds, barrier)] * procs)
        return [sum(p[i] for p in parts) for i in range(len(names))]

    layouts = {}
    for procs, threads, forwards in ((1, cores, 1), (cores, 1, 1)) + (((1, 1, cores),) if cores > 1 else ()):
        name = f"{procs}x{threads}" + (f"x{forwards}" if forwards > 1 else "")
        totals = measure(procs, threads, forwards, buckets, min_s)
        # The highest of ~50 short, noisy measurements overstates its bucket: the
        # best few are measured again for longer, and the best of those is the layout's limit.
        top = [buckets[i] for i in np.argsort(totals)[::-1][:CONFIRM_TOP]]
        again = measure(procs, threads, forwards, top, CONFIRM_S)
        best = int(np.argmax(again))
        layouts[name] = {"tokens_per_s": again[best], "best_bucket": top[best], "scan_max_tokens_per_s": max(totals)}
        log(f"  {name} (processes x threads[ x forwards]): {again[best]:.0f} tokens/s at {top[best]} "
            f"(scan's highest {max(totals):.0f})")
    layout = max(layouts, key=lambda k: layouts[k]["tokens_per_s"])
    return {"tokens_per_s": layouts[layout]["tokens_per_s"], "best_bucket": layouts[layout]["best_bucket"],
            "scan_max_tokens_per_s": max(v["scan_max_tokens_per_s"] for v in layouts.values()),
            "layout": layout, "layouts": layouts, **out}


def _tensors(engine, rows, bucket):
    import torch

    from neuronserve.models.families import graph_inputs
    from neuronserve.serve.buckets import pad_rows

    ids, mask = pad_rows(rows, bucket, engine.pad_id)
    return graph_inputs(engine.manifest.inputs, torch.from_numpy(ids), torch.from_numpy(mask))


class Server:
    def __init__(self, name: str, argv: list[str], url: str, ready_line: str | None, stats):
        self.name, self.argv, self.url, self.ready_line, self.stats = name, argv, url, ready_line, stats
        self.proc = None

    def __enter__(self):
        env = {**os.environ, **OPENMP_ENV, "HOME": tempfile.mkdtemp(prefix="nsb-")}  # same for every server
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + 600
        with httpx.Client(timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
                try:
                    r = c.post(self.url + "/v1/embeddings", json={"input": "warm up"})
                    if r.status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready")

    def __exit__(self, *exc):
        if self.proc:
            stop_server(self.proc, 60)


def neuronserve_stats(metrics_url: str) -> dict:
    return metric_totals(metrics_url, {"real_tokens": "neuronserve_tokens_real_total",
                                       "padded_tokens": "neuronserve_tokens_padded_total"})


def http_stats(url: str) -> dict:
    return httpx.get(url + "/stats", timeout=5).json()


def run_steps(server: Server, workload: Path, concurrencies: list[int], duration: int, out: Path) -> list[dict]:
    steps = []
    for c in concurrencies:
        before = server.stats() if server.stats else {}
        step_out = out / f"{server.name}-c{c}"
        cmd = [sys.executable, "-m", "neuronserve.deploy.loadtest", "--url", server.url, "--concurrency", str(c),
               "--duration", f"{duration}s", "--warmup", "2s", "--workload", str(workload), "--no-progress",
               "--out", str(step_out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        step = json.loads((step_out / "sweep.json").read_text())["steps"][0]
        after = server.stats() if server.stats else {}
        real = after.get("real_tokens", 0) - before.get("real_tokens", 0)
        padded = after.get("padded_tokens", 0) - before.get("padded_tokens", 0)
        row = {
            "server": server.name, "concurrency": c, "rps": step["achieved_rps"],
            "tokens_per_s": step["tokens_per_s"], "p50_ms": step["latency_ms"]["p50"],
            "p99_ms": step["latency_ms"]["p99"], "errors": step["sent"] - step["succeeded"],
            "client_cpu_percent": step.get("client_cpu_percent"),
            "padded_per_real": (padded / real) if real else None,
        }
        log(f"  {server.name} c={c}: {row['rps']:.1f} req/s, {row['tokens_per_s']:.0f} tok/s, p50 {row['p50_ms']:.1f} ms")
        steps.append(row)
    return steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path)
    p.add_argument("--workload", default="mixed", choices=["mixed", "short", "long"])
    p.add_argument("--duration", type=int, default=10, help="seconds per step")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--servers", default="neuronserve,naive,plain-ray",
                   help="any of neuronserve, neuronserve-nopack (serve --no-packing), naive, plain-ray")
    p.add_argument("--threads", type=int, help="torch threads per neuronserve replica (default: the server's)")
    p.add_argument("--replicas", help="neuronserve replicas (default: the server's, auto)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args()
    known = ("neuronserve", "neuronserve-nopack", "naive", "plain-ray")
    unknown = [n for n in a.servers.split(",") if n not in known]
    if unknown:
        p.error(f"unknown server {unknown[0]!r} in --servers; choose from {', '.join(known)}")
    concurrencies = [int(x) for x in a.concurrency.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.artifacts is None:
        from neuronserve.compile.compiler import CompileOptions, compile_artifact

        log("compiling the default model for cpu (cached after the first run) ...")
        a.artifacts = compile_artifact(CompileOptions(model="default", target="cpu")).out_dir
    work = Path(tempfile.mkdtemp(prefix="nsbench-"))
    workload = work / f"{a.workload}.jsonl"
    write_workload(a.workload, workload)
    texts = [json.loads(line) for line in workload.read_text().splitlines()]
    log("measuring the raw backend limit ...")
    limit = raw_limit(a.artifacts, texts)
    log(f"  raw limit {limit['tokens_per_s']:.0f} tokens/s at {limit['best_bucket']}; "
        f"batch-1 forward {limit['batch1_forward_ms']:.2f} ms at {limit['batch1_bucket']}")

    servers = []
    for name in a.servers.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name in ("neuronserve", "neuronserve-nopack"):
            mport = free_port()
            argv = [sys.executable, "-m", "neuronserve", "serve", "--artifacts", str(a.artifacts), "--port", str(port),
                    "--metrics-port", str(mport)]
            argv += ["--no-packing"] if name == "neuronserve-nopack" else []
            argv += ["--threads-per-replica", str(a.threads)] if a.threads else []
            argv += ["--replicas", a.replicas] if a.replicas else []
            servers.append(Server(name, argv, url, None, lambda m=mport: neuronserve_stats(f"http://127.0.0.1:{m}/metrics")))
        elif name == "naive":
            argv = [sys.executable, str(REPO / "benchmarks" / "naive_server.py"), str(a.artifacts), str(port)]
            servers.append(Server(name, argv, url, None, None))
        elif name == "plain-ray":
            argv = [sys.executable, str(REPO / "benchmarks" / "ray_batch_server.py"), str(a.artifacts), str(port)]
            servers.append(Server(name, argv, url, None, lambda u=url: http_stats(u)))
    rows = []
    last_ours = max((i for i, sv in enumerate(servers) if sv.name.startswith("neuronserve")), default=None)
    for i, server in enumerate(servers):
        log(f"{server.name}: starting ...")
        with server:
            rows += run_steps(server, workload, concurrencies, a.duration, work)
        if i == last_ours:
            # A machine's speed drifts over minutes: the limit is measured again right
            # after neuronserve's steps, and the ratios use the mean of the two measurements.
            log("measuring the raw backend limit again ...")
            again = raw_limit(a.artifacts, texts, batch1=False)
            before = limit["tokens_per_s"]
            limit.update(before_tokens_per_s=before, after_tokens_per_s=again["tokens_per_s"],
                         after_layouts=again["layouts"], tokens_per_s=(before + again["tokens_per_s"]) / 2,
                         scan_max_tokens_per_s=(limit["scan_max_tokens_per_s"] + again["scan_max_tokens_per_s"]) / 2)
            log(f"  raw limit {again['tokens_per_s']:.0f} tokens/s after, {before:.0f} before; "
                f"ratios use the mean, {limit['tokens_per_s']:.0f}")

    def pick(name, c):
        return next((r for r in rows if r["server"] == name and r["concurrency"] == c), None)

    for r in rows:
        r["ratio_to_limit"] = r["tokens_per_s"] / limit["tokens_per_s"]
    ours32, plain32, ours1 = pick("neuronserve", 32), pick("plain-ray", 32), pick("neuronserve", 1)
    checks = {}
    if ours32:
        checks["ratio_to_limit_c32"] = (ours32["ratio_to_limit"], ours32["ratio_to_limit"] >= TARGETS["ratio_to_limit_c32"])
        pr = ours32["padded_per_real"]
        checks["padded_per_real"] = (pr, pr is not None and pr <= TARGETS["padded_per_real"])
    if ours32 and plain32:
        v = ours32["tokens_per_s"] / plain32["tokens_per_s"]
        checks["vs_plain_ray_c32"] = (v, v >= TARGETS["vs_plain_ray_c32"])
    if ours1:
        over = ours1["p50_ms"] - limit["batch1_forward_ms"]
        checks["c1_p50_over_raw_ms"] = (over, over <= TARGETS["c1_p50_over_raw_ms"])

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, load generator on the same machine"
    lines = [f"Workload `{a.workload}` (one text per request), {a.duration} s per step; {machine}.",
             f"Raw backend limit: {limit['tokens_per_s']:.0f} real tokens/s"
             + (f" (mean of {limit['before_tokens_per_s']:.0f} before and {limit['after_tokens_per_s']:.0f} after neuronserve's steps)"
                if "after_tokens_per_s" in limit else "")
             + f" (best bucket {limit['best_bucket']}, "
             f"{limit['layout']} (processes x threads[ x forwards]), best of " + ", ".join(f"{k}: {v['tokens_per_s']:.0f}" for k, v in limit["layouts"].items()) + "; "
             f"pre-padded, no tokenizer or HTTP; each layout's {CONFIRM_TOP} best buckets of a {SCAN_S:g} s scan measured "
             f"again for {CONFIRM_S:g} s, the scans' highest: {limit['scan_max_tokens_per_s']:.0f}); "
             f"batch-1 forward {limit['batch1_forward_ms']:.2f} ms "
             f"({limit['batch1_bucket']}, median text {limit['median_tokens']} tokens).", "",
             "| server | c | req/s | real tokens/s | x limit | padded/real | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pr = f"{r['padded_per_real']:.3f}" if r["padded_per_real"] else "1 (exact length)" if r["server"] == "naive" else "-"
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['rps']:.1f} | {r['tokens_per_s']:.0f} | {r['ratio_to_limit']:.2f} | "
                     f"{pr} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for k, (v, ok) in checks.items():
        lines.append(f"| {k} | {v:.3f} | {TARGETS[k]} | {'yes' if ok else 'NO'} |")
    report = "\n".join(lines)
    print(report)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = a.out / f"serve-{a.workload}-{stamp}"
    base.with_suffix(".md").write_text(report + "\n")
    base.with_suffix(".json").write_text(json.dumps({"limit": limit, "rows": rows, "checks": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()},
                                                    "targets": TARGETS, "machine": machine, "workload": a.workload,
                                                    "duration_s": a.duration}, indent=2))
    log(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
