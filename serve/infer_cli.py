"""`neuronserve infer` (offline batch inference) and `neuronserve bench` (the raw backend limit)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronserve.common.console import err, fail


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "infer",
        help="run an artifact over a JSONL file of texts, offline",
        description="Each input line is a JSON string or {\"text\": ...}; each output line is {\"embedding\": [...]} "
        "or {\"label\": ..., \"score\": ...}, in input order.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory from `neuronserve compile`")
    p.add_argument("--input", type=Path, required=True, help="JSONL input file")
    p.add_argument("--output", type=Path, required=True, help="JSONL output file")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "neuron"])
    p.add_argument("--no-truncate", action="store_true", help="make inputs longer than the largest bucket an error")
    p.add_argument("--chunk-size", type=int, default=256, help="texts planned together (bigger: less padding)")
    p.add_argument("--threads", type=int, default=None, help="CPU backend: torch threads (default: all cores)")
    p.set_defaults(func=run_infer)

    b = subparsers.add_parser(
        "bench",
        help="measure the raw backend per bucket: latency and real/padded tokens per second",
        description="Runs every compiled bucket back to back on pre-padded inputs (no tokenizer, no HTTP): the "
        "limit every serving figure is compared against.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--artifacts", type=Path, required=True)
    b.add_argument("--backend", default="auto", choices=["auto", "cpu", "neuron"])
    b.add_argument("--iterations", type=int, default=10, help="timed runs per bucket (after 2 warm-up runs)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", type=Path, help="also write the results as JSON here")
    b.set_defaults(func=run_bench)


def read_texts(path: Path) -> list[str]:
    from neuronserve.common.jsonl import read_texts as read_jsonl

    return read_jsonl(path, allow_empty=True)


def _engine(args):
    from neuronserve.serve.engine import Engine

    options = {"threads": args.threads} if args.threads else {}
    return Engine(args.artifacts, args.backend, backend_options=options)


def run_infer(args) -> int:
    from tqdm import tqdm

    from neuronserve.models.artifact import ArtifactError
    from neuronserve.serve.backends.base import BackendError
    from neuronserve.serve.engine import InputError

    try:
        texts = read_texts(args.input)
    except ValueError as e:
        return fail(str(e), code=2)
    if args.chunk_size < 1:
        return fail("--chunk-size must be >= 1", code=2)
    try:
        engine = _engine(args)
    except (ArtifactError, BackendError) as e:
        return fail(str(e))
    tmp = args.output.with_name(args.output.name + ".partial")
    try:
        out = open(tmp, "w", encoding="utf-8")
    except OSError as e:
        return fail(f"cannot write {args.output}: {e.strerror}")
    with out, tqdm(total=len(texts), unit="text", desc="infer", disable=None) as bar:
        for start in range(0, len(texts), args.chunk_size):
            chunk = texts[start : start + args.chunk_size]
            try:
                if engine.task == "embed":
                    lines = [{"embedding": [round(float(x), 7) for x in v]} for v in engine.embed(chunk, not args.no_truncate)]
                else:
                    lines = [{"label": label, "score": score} for label, score in engine.classify(chunk, not args.no_truncate)]
            except InputError as e:
                out.close()
                tmp.unlink(missing_ok=True)
                msg = str(e)
                if hasattr(e, "index"):
                    msg = msg.replace(f"input {e.index} ", f"line {start + e.index + 1} ", 1)
                return fail(msg)
            out.writelines(json.dumps(line) + "\n" for line in lines)
            bar.update(len(chunk))
    tmp.replace(args.output)
    err(f"wrote {len(texts)} results to {args.output}")
    return 0


def run_bench(args) -> int:
    import time

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from neuronserve.models.artifact import ArtifactError, load_manifest
    from neuronserve.models.families import graph_inputs
    from neuronserve.serve.backends.base import BackendError, load_backend

    if args.iterations < 1:
        return fail("--iterations must be >= 1", code=2)
    try:
        manifest = load_manifest(args.artifacts)
        backend = load_backend(args.artifacts, args.backend, **({"threads": args.threads} if args.threads else {}))
    except (ArtifactError, BackendError) as e:
        return fail(str(e))
    # Realistic rows: every row real (no batch padding) at full length, so real == padded tokens here;
    # the serving benchmarks report the padding the batcher adds on top.
    rows = []
    table = Table(title=f"raw {backend.kind} backend: {manifest.model.name} ({manifest.precision})")
    for col in ("bucket", "p50 ms", "p90 ms", "rows/s", "tokens/s"):
        table.add_column(col, justify="right")
    for bucket in manifest.bucket_list():
        shape = (bucket.batch_size, bucket.seq_len)
        inputs = graph_inputs(manifest.inputs, torch.full(shape, 1000, dtype=torch.long), torch.ones(shape, dtype=torch.long))
        for _ in range(2):
            backend.forward(bucket, inputs)
        times = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            backend.forward(bucket, inputs)
            times.append(time.perf_counter() - t0)
        p50, p90 = float(np.percentile(times, 50)), float(np.percentile(times, 90))
        row = {
            "bucket": str(bucket),
            "batch_size": bucket.batch_size,
            "seq_len": bucket.seq_len,
            "p50_ms": round(p50 * 1000, 3),
            "p90_ms": round(p90 * 1000, 3),
            "rows_per_s": round(bucket.batch_size / p50, 1),
            "tokens_per_s": round(bucket.padded_tokens / p50, 1),
        }
        rows.append(row)
        table.add_row(row["bucket"], f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}", f"{row['rows_per_s']:.0f}", f"{row['tokens_per_s']:.0f}")
    Console().print(table)
    best = max(rows, key=lambda r: r["tokens_per_s"])
    print(f"best: {best['tokens_per_s']:.0f} tokens/s at bucket {best['bucket']}")
    if args.json:
        args.json.write_text(json.dumps({"model": manifest.model.name, "backend": backend.kind, "precision": manifest.precision, "buckets": rows}, indent=2))
    return 0
