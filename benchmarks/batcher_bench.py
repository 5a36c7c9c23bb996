"""In-process batcher benchmark: the real Batcher and CPU backend, no HTTP, no Ray.

    python benchmarks/batcher_bench.py --artifacts DIR [--clients 32] [--duration 20] [--forwards 2]
                                       [--batcher path/to/batcher.py] [--label NAME] [--json FILE]

`--clients` closed-loop asyncio clients each send one text of the `mixed` workload
(`neuronserve.deploy.loadtest.workload`, seed 0) at a time, tokenized on the event loop as the
replica does, and wait for its vector. The batcher is built as the replica builds it: the CPU
backend's warm-up timings for `--forwards` concurrent forwards of `--threads` torch threads each,
wide inline batches, packing when the artifact has a packed graph. After `--warm` seconds,
`--duration` seconds are measured; prints real tokens/s, padded/real tokens, batches and
requests/s as a table (and one JSON line to `--json`, appended).

`--batcher FILE` loads another version of `neuronserve/serve/batcher.py` (e.g. one written out with
`git show REV:serve/batcher.py`); `--compare FILE` alternates that one with this one in the same
process (A B B A ..., `--rounds` pairs), both planning over the same warm-up timings, and prints
the ratio per pair. Without `--artifacts`, the default model is compiled for CPU into a temporary
folder.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path


def load_batcher_module(path: str | None):
    if path is None:
        from neuronserve.serve import batcher

        return batcher
    spec = importlib.util.spec_from_file_location("batcher_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def warm_up(engine, forwards: int) -> dict:
    """The CPU backend's warm-up timings for `forwards` concurrent forwards, per bucket."""
    from neuronserve.models.artifact import Bucket

    return {Bucket.parse(k): v for k, v in engine.backend.warmup(forwards=forwards).items()}


def build(module, engine, forwards: int, max_batch_tokens: int, records: list, timings: dict):
    wide = engine.backend.threads * forwards
    run_inline = functools.partial(engine.run_batch, threads=wide) if wide > engine.backend.threads else None
    params = inspect.signature(module.Batcher).parameters
    table_kw = "timings_s" if "timings_s" in params else "costs_s"  # batchers before serve.planner
    return module.Batcher(engine.buckets, engine.run_batch, max_batch_tokens=max_batch_tokens,
                          max_concurrent_batches=forwards, on_batch=records.append, run_inline=run_inline,
                          pack=engine.packing, **{table_kw: timings})


async def run(batcher, engine, texts: list[str], clients: int, warm_s: float, duration_s: float,
              records: list) -> dict:
    loop = asyncio.get_running_loop()
    counter = iter(range(10**12))
    window: dict = {}
    stop_at = loop.time() + warm_s + duration_s

    async def client():
        done = 0
        while loop.time() < stop_at:
            i = next(counter)
            rows = engine.tokenize([texts[i % len(texts)]])
            await batcher.submit(rows)
            if "start" in window:
                done += 1
        return done

    async def mark():
        await asyncio.sleep(warm_s)
        window["start"], window["first"] = time.perf_counter(), len(records)
        await asyncio.sleep(duration_s)
        window["end"], window["last"] = time.perf_counter(), len(records)

    marker = asyncio.create_task(mark())
    requests = sum(await asyncio.gather(*(client() for _ in range(clients))))
    await marker
    measured = records[window["first"]:window["last"]]
    seconds = window["end"] - window["start"]
    real = sum(r.real_tokens for r in measured)
    padded = sum(r.padded_tokens for r in measured)
    return {
        "seconds": round(seconds, 2),
        "real_tokens_per_s": round(real / seconds, 1),
        "padded_per_real": round(padded / real, 4) if real else None,
        "batches": len(measured),
        "packed_batches": sum(bool(getattr(r, "packed", False)) for r in measured),
        "requests_per_s": round(requests / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, help="a CPU artifact (default: compile the default model)")
    p.add_argument("--batcher", help="a batcher.py to load instead of neuronserve.serve.batcher")
    p.add_argument("--label", help="the name of this run in the table (default: the batcher's)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warm", type=float, default=3.0)
    p.add_argument("--forwards", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per forward")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    p.add_argument("--compare", metavar="FILE",
                   help="another batcher.py: alternate it with --batcher's in this process (A B B A ...), "
                        "one warm-up's timings for both, --rounds pairs")
    p.add_argument("--rounds", type=int, default=4, help="pairs of runs with --compare")
    a = p.parse_args(argv)

    from neuronserve.deploy.loadtest.workload import generate
    from neuronserve.serve.engine import Engine

    artifacts = a.artifacts
    if artifacts is None:
        from neuronserve.compile.compiler import CompileOptions, compile_artifact

        artifacts = compile_artifact(CompileOptions(model="default", out=Path(tempfile.mkdtemp()) / "default")).out_dir
    engine = Engine(artifacts, "cpu", backend_options={"threads": a.threads})
    texts = generate("mixed", seed=0).texts
    timings = warm_up(engine, a.forwards)
    variants = [(a.label or (a.batcher or "neuronserve.serve.batcher"), load_batcher_module(a.batcher))]
    schedule = [0]
    if a.compare:
        variants.append((a.compare, load_batcher_module(a.compare)))
        schedule = [k for r in range(a.rounds) for k in ((0, 1) if r % 2 == 0 else (1, 0))]
    cols = ["label", "real_tokens_per_s", "padded_per_real", "batches", "packed_batches", "requests_per_s"]
    print(" | ".join(cols), flush=True)
    results = []
    for k in schedule:
        label, module = variants[k]
        records: list = []

        async def go():
            batcher = build(module, engine, a.forwards, a.max_batch_tokens, records, timings)
            return await run(batcher, engine, texts, a.clients, a.warm, a.duration, records)

        result = {"label": label, "clients": a.clients, "forwards": a.forwards, "threads": a.threads,
                  **asyncio.run(go())}
        results.append(result)
        print(" | ".join(str(result[c]) for c in cols), flush=True)
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(result) + "\n")
    if a.compare:
        first = [r["real_tokens_per_s"] for r in results if r["label"] == variants[0][0]]
        second = [r["real_tokens_per_s"] for r in results if r["label"] == variants[1][0]]
        ratios = sorted(x / y for x, y in zip(first, second))
        print(f"{variants[0][0]} / {variants[1][0]} real tokens/s per pair: "
              + ", ".join(f"{x:.3f}" for x in ratios) + f"; median {ratios[len(ratios) // 2]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
