"""`neuronserve infer` (offline batch inference) and `neuronserve bench` (the raw backend limit)."""

from __future__ import annotations

import json
from pathlib import Path

from neuronserve.common.console import err, fail
from neuronserve.serve.errors import InputError


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "infer",
        help="run an artifact over a JSONL file of texts, offline",
        description="Each input line is a JSON string or an object with \"text\"; for rerank (and classify of "
        "pairs) an object with \"query\" and \"document\", or \"text\" as a [text, text] pair. Each output line, "
        "in input order, keeps the input object's other fields (e.g. \"id\") and adds the result: \"embedding\" "
        "(embed), \"label\" and \"score\" (classify), \"score\" (rerank), \"sparse\": [{\"index\", \"value\"}] "
        "(sparse).",
    )
    p.add_argument("--artifacts", required=True, metavar="DIR|URI", help=ARTIFACTS_HELP)
    p.add_argument("--input", type=Path, required=True, metavar="FILE", help="JSONL input file")
    p.add_argument("--output", type=Path, required=True, metavar="FILE", help="JSONL output file")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "neuron"], help=BACKEND_HELP)
    p.add_argument("--no-truncate", action="store_true", help="make inputs longer than the largest bucket an error")
    p.add_argument("--chunk-size", type=int, default=256, metavar="N", help="texts planned together (bigger: less padding)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU backend: torch threads (default: all cores)")
    p.add_argument("--prompt-name", metavar="NAME", help="embed, sparse: the model's prompt to put before each text "
                   "(default: the model's default prompt, if it has one)")
    p.set_defaults(func=run_infer)

    b = subparsers.add_parser(
        "bench",
        help="measure the raw backend per bucket: latency and real/padded tokens per second",
        description="Runs every compiled bucket back to back on pre-padded inputs (no tokenizer, no HTTP): the "
        "limit every serving figure is compared against. Each batch holds the rows the batcher would send "
        "to that bucket: lengths spread evenly between the next smaller bucket's sequence length and its "
        "own, so real tokens/s counts the rows' tokens and padded tokens/s everything the device computes. "
        "Progress goes to stderr, the table to stdout.",
    )
    b.add_argument("--artifacts", required=True, metavar="DIR|URI", help=ARTIFACTS_HELP)
    b.add_argument("--backend", default="auto", choices=["auto", "cpu", "neuron"], help=BACKEND_HELP)
    b.add_argument("--iterations", type=int, default=10, metavar="N", help="timed runs per bucket (after 2 warm-up runs)")
    b.add_argument("--threads", type=int, default=None, metavar="N", help="CPU backend: torch threads (default: all cores)")
    b.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON here")
    b.set_defaults(func=run_bench)


ARTIFACTS_HELP = ("artifact directory from `neuronserve compile`, or its s3:// URI (pulled into the local cache and "
                  "verified, as `serve` does; the `s3` extra)")
BACKEND_HELP = "auto: the artifact's target; cpu runs a CPU artifact, neuron a Neuron one on this host's NeuronCores"


INPUT_KEYS = ("text", "query", "document")


def read_items(path: Path, pairs: bool) -> list[tuple[object, dict]]:
    """(input, other fields) per non-blank line: the input is a text, or a (text, text) pair when
    the task takes pairs (`pairs`); the other fields are the line's object without its input keys.
    Raises ValueError naming the file and line."""
    from neuronserve.common.jsonl import json_lines

    expected = ('a JSON string, {"text": ...}, {"query": ..., "document": ...} or {"text": [text, text]}' if pairs
                else 'a JSON string or {"text": ...}')
    items = []
    for lineno, item in json_lines(path, expected):
        extra = {}
        if isinstance(item, dict):
            extra = {k: v for k, v in item.items() if k not in INPUT_KEYS}
            if pairs and "query" in item and "document" in item:
                item = [item["query"], item["document"]]
            else:
                item = item.get("text")
        if pairs and isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item):
            item = tuple(item)
        elif not isinstance(item, str):
            raise ValueError(f"{path}:{lineno}: expected {expected}")
        items.append((item, extra))
    return items


def results(engine, chunk: list, truncate: bool, prompt_name: str | None) -> list[dict]:
    """The output fields of each input of `chunk`, by the artifact's task."""
    task = engine.task
    if task in ("embed", "sparse"):
        if any(not isinstance(t, str) for t in chunk):
            raise InputError(f"a {task} model takes single texts, not pairs", "input")
        if task == "embed":
            return [{"embedding": [round(float(x), 7) for x in v]} for v in engine.embed(chunk, truncate, prompt_name=prompt_name)]
        return [{"sparse": [{"index": int(i), "value": round(float(v), 7)} for i, v in zip(idx, values)]}
                for idx, values in engine.sparse(chunk, truncate, prompt_name)]
    if task == "rerank":
        if any(isinstance(t, str) for t in chunk):
            raise InputError("a rerank model scores pairs: give each line a query and a document", "input")
        return [{"score": float(s)} for s in engine.rerank(chunk, truncate)]
    return [{"label": label, "score": score} for label, score in engine.classify(chunk, truncate)]


def _local(artifacts: str) -> Path:
    """The artifact directory: `artifacts` itself, or its s3:// URI pulled (and verified) into the cache."""
    from neuronserve.compile.store import resolve_artifacts

    return resolve_artifacts(artifacts, err)


def _engine(args):
    from neuronserve.serve.engine import Engine

    options = {"threads": args.threads} if args.threads else {}
    return Engine(_local(args.artifacts), args.backend, backend_options=options)


def run_infer(args) -> int:
    from tqdm import tqdm

    from neuronserve.models.artifact import ArtifactError
    from neuronserve.serve.backends.base import BackendError

    if args.chunk_size < 1:
        return fail("--chunk-size must be >= 1", code=2)
    from neuronserve.compile.store import StoreError

    try:
        engine = _engine(args)
    except (ArtifactError, BackendError, StoreError) as e:
        return fail(str(e))
    try:
        items = read_items(args.input, engine.task_info.pairs)
    except ValueError as e:
        return fail(str(e), code=2)
    texts = [text for text, _ in items]
    tmp = args.output.with_name(args.output.name + ".partial")
    try:
        out = open(tmp, "w", encoding="utf-8")
    except OSError as e:
        return fail(f"cannot write {args.output}: {e.strerror}")
    with out, tqdm(total=len(texts), unit="text", desc="infer", disable=None) as bar:
        for start in range(0, len(texts), args.chunk_size):
            chunk = texts[start : start + args.chunk_size]
            try:
                lines = [{**extra, **result} for (_, extra), result in zip(
                    items[start : start + args.chunk_size],
                    results(engine, chunk, not args.no_truncate, getattr(args, "prompt_name", None)))]
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


def real_lengths(batch_size: int, seq_len: int, seq_lens: list[int]) -> list[int]:
    """Row lengths of a batch the batcher would send to a (batch_size, seq_len) bucket: spread evenly
    over (the next smaller compiled sequence length, seq_len].

    >>> real_lengths(4, 128, [32, 128])
    [56, 80, 104, 128]
    >>> real_lengths(2, 32, [32, 128])
    [16, 32]
    """
    lower = max([n for n in seq_lens if n < seq_len], default=0)
    return [lower + -(-(i + 1) * (seq_len - lower) // batch_size) for i in range(batch_size)]


def _rows(lengths: list[int], seq_len: int):
    """(input_ids, attention_mask) of rows of these lengths padded to seq_len (token 100: inside
    every vocabulary; the values do not change an encoder's cost)."""
    import torch

    ids = torch.zeros((len(lengths), seq_len), dtype=torch.long)
    mask = torch.zeros((len(lengths), seq_len), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = 100
        mask[i, :n] = 1
    return ids, mask


def run_bench(args) -> int:
    import sys
    import time

    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from neuronserve.models.artifact import ArtifactError, load_manifest
    from neuronserve.models.families import graph_inputs
    from neuronserve.serve.backends.base import BackendError, load_backend

    if args.iterations < 1:
        return fail("--iterations must be >= 1", code=2)
    from neuronserve.compile.store import StoreError

    try:
        local = _local(args.artifacts)
        manifest = load_manifest(local)
        backend = load_backend(local, args.backend, **({"threads": args.threads} if args.threads else {}))
    except (ArtifactError, BackendError, StoreError) as e:
        return fail(str(e))
    buckets = manifest.bucket_list()
    seq_lens = sorted({b.seq_len for b in buckets})
    rows = []
    table = Table(title=f"raw {backend.kind} backend: {manifest.model.name} ({manifest.precision})")
    for col in ("bucket", "p50 ms", "p90 ms", "rows/s", "real tokens/s", "padded tokens/s"):
        table.add_column(col, justify="right")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
    with progress:
        task = progress.add_task("bench", total=len(buckets) * (args.iterations + 2))
        for n, bucket in enumerate(buckets, 1):
            progress.update(task, description=f"bucket {bucket} ({n}/{len(buckets)})")
            if not sys.stderr.isatty():
                err(f"bench: bucket {bucket} ({n}/{len(buckets)}), {args.iterations} runs")
            lengths = real_lengths(bucket.batch_size, bucket.seq_len, seq_lens)
            inputs = graph_inputs(manifest.inputs, *_rows(lengths, bucket.seq_len))
            for _ in range(2):
                backend.forward(bucket, inputs)
                progress.advance(task)
            times = []
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                backend.forward(bucket, inputs)
                times.append(time.perf_counter() - t0)
                progress.advance(task)
            p50, p90 = float(np.percentile(times, 50)), float(np.percentile(times, 90))
            row = {
                "bucket": str(bucket),
                "batch_size": bucket.batch_size,
                "seq_len": bucket.seq_len,
                "p50_ms": round(p50 * 1000, 3),
                "p90_ms": round(p90 * 1000, 3),
                "rows_per_s": round(bucket.batch_size / p50, 1),
                "real_tokens": sum(lengths),
                "real_tokens_per_s": round(sum(lengths) / p50, 1),
                "padded_tokens_per_s": round(bucket.padded_tokens / p50, 1),
            }
            rows.append(row)
            table.add_row(row["bucket"], f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}", f"{row['rows_per_s']:.0f}",
                          f"{row['real_tokens_per_s']:.0f}", f"{row['padded_tokens_per_s']:.0f}")
    Console().print(table)
    best = max(rows, key=lambda r: r["real_tokens_per_s"])
    print(f"best: {best['real_tokens_per_s']:.0f} real tokens/s ({best['padded_tokens_per_s']:.0f} padded) at bucket {best['bucket']}")
    if args.json:
        args.json.write_text(json.dumps({"model": manifest.model.name, "backend": backend.kind, "precision": manifest.precision, "buckets": rows}, indent=2))
    return 0
