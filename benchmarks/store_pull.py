"""What an S3 pull adds to a start: the default artifact pulled from a local S3-compatible server.

    python benchmarks/store_pull.py [--rounds 5] [--out benchmarks/results]

Compiles the default model for CPU (a cache hit once compiled: `neuronserve compile`), starts
moto's S3 server on loopback (tests/fixtures/s3_server.py, the store tests' server), pushes the
artifact once, then per round pulls it into an empty cache (download + SHA-256 of every file +
rename: what `neuronserve serve --artifacts s3://...` adds before Ray starts) and pulls it again
(the cache hit every later start, and every replica on the node, pays). Also times hashing the
artifact alone, the verification's share. Prints a table of medians and writes it to
benchmarks/results/store-pull-<timestamp>.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    from neuronserve.compile import store
    from neuronserve.compile.compiler import CompileOptions, compile_artifact
    from neuronserve.models.artifact import load_manifest
    from tests.fixtures.s3_server import BUCKET, start_s3_server

    t0 = time.perf_counter()
    compiled = compile_artifact(CompileOptions(model="default", target="cpu"))
    compile_s = time.perf_counter() - t0
    manifest = load_manifest(compiled.out_dir)
    files = store.artifact_files(manifest)
    size_mb = sum((compiled.out_dir / rel).stat().st_size for rel in files) / 1e6

    server = start_s3_server()
    saved = {k: os.environ.get(k) for k in (*server.env(), "NEURONSERVE_CACHE_DIR")}
    os.environ.update(server.env())
    rows = []
    try:
        pushed = store.push(compiled.out_dir, f"s3://{BUCKET}/bench")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            store.verify_files(compiled.out_dir, manifest, "local")
            hash_s = time.perf_counter() - t0
            cache = Path(tempfile.mkdtemp(prefix="store-bench-"))
            try:
                os.environ["NEURONSERVE_CACHE_DIR"] = str(cache)
                cold = store.pull(pushed.uri)
                assert cold.downloaded
                t0 = time.perf_counter()
                store.resolve_artifacts(pushed.uri)
                hit_s = time.perf_counter() - t0
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            rows.append({"pull_s": cold.seconds, "hit_s": hit_s, "hash_s": hash_s})
            print(f"pull {cold.seconds:.2f} s, cache hit {hit_s * 1e3:.2f} ms, hashing alone {hash_s:.2f} s", flush=True)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"
    lines = [
        f"# S3 pull of the default artifact ({datetime.now(timezone.utc).isoformat(timespec='seconds')})",
        "",
        f"Machine: {machine} (shared). Server: moto's S3 server on loopback (tests/fixtures/s3_server.py).",
        f"Artifact: {manifest.model.name}, cpu, {len(manifest.buckets)} buckets, {len(files) + 1} files, {size_mb:.1f} MB "
        f"(key {manifest.cache_key[:12]}; compile {'cache hit' if compiled.cache_hit else 'ran'} in {compile_s:.1f} s).",
        f"{args.rounds} rounds; medians.",
        "",
        "| what | median | min | max |",
        "|---|---|---|---|",
    ]
    for key, label, scale, unit in (("pull_s", "pull into an empty cache (download, verify, rename)", 1, "s"),
                                    ("hash_s", "of which hashing every file (measured alone)", 1, "s"),
                                    ("hit_s", "pull again (cache hit)", 1e3, "ms")):
        values = [r[key] * scale for r in rows]
        lines.append(f"| {label} | {statistics.median(values):.2f} {unit} | {min(values):.2f} {unit} | {max(values):.2f} {unit} |")
    lines += ["", f"Throughput of the cold pull: {size_mb / med['pull_s']:.0f} MB/s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"store-pull-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
