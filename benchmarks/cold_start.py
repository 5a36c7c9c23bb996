"""Cold-start benchmark: how long `neuronserve serve` (the default model on the CPU backend) takes to
be ready, and how long an unchanged `neuronserve compile` takes, on this machine.

    python benchmarks/cold_start.py [--code DIR|REV --label NAME ...] [--repeat 1] [--out benchmarks/results]

For each code tree (`--code`, repeatable: a checkout, or a git revision of this repository, which
is exported with `git archive` into a temporary directory; default: this checkout), in a cache
directory of its own under /tmp (NEURONSERVE_CACHE_DIR; the user's cache is never touched):

a. `neuronserve serve` from an empty cache: the default model is compiled first;
b. `neuronserve serve` again with the artifact cached but no cached warm-up timings (their
   directory, `<cache>/timings`, is removed first): every bucket is timed;
c. `neuronserve serve` again, with the artifact and the timings of (b) cached (`--cached-runs N`
   times; the median counts);
d. `neuronserve compile` of the default model, unchanged: a cache hit.

Ready time is the wall time from starting the command to its "neuronserve is ready" line; each
server is then stopped with SIGTERM (it drains and stops its Ray). The command's own breakdown
(`ready in X s: artifact, Ray, Serve, replicas (load, warm-up)`), where the code prints one, is
recorded too. With --repeat N the cases run N times in rounds, code trees alternating, and the
table shows medians. Prints a table and writes markdown and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import cpu_name, stop_server  # noqa: E402  (this folder)
from tests.fixtures.ports import free_port  # noqa: E402

CASES = {
    "empty": "ready, empty cache (compile included)",
    "no_timings": "ready, cached artifact, no cached timings",
    "cached": "ready, cached artifact and timings",
    "compile": "unchanged `neuronserve compile`",
}
TARGETS = {"empty": 45.0, "cached": 10.0, "compile": 2.0}
READY_TIMEOUT_S = 900


def code_tree(code: str, scratch: Path) -> Path:
    """A directory holding the code: `code` itself, or the git revision `code` exported."""
    if Path(code).is_dir():
        return Path(code).resolve()
    out = scratch / f"code-{re.sub(r'[^A-Za-z0-9]+', '-', code)}"
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", code], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def environment(code: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    env.update(PYTHONPATH=str(code), NEURONSERVE_CACHE_DIR=str(cache), HOME=tempfile.mkdtemp(prefix="nsh-"),
               PYTHONUNBUFFERED="1")
    return env


def serve_ready(env: dict, cwd: Path) -> dict:
    """Start `neuronserve serve`, wait for its ready banner, stop it; the times."""
    port, metrics_port = free_port(), free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "neuronserve", "serve", "--port", str(port),
                             "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    ready_s = None
    breakdown = None
    deadline = t0 + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if line.startswith("neuronserve is ready") and ready_s is None:
                ready_s = time.monotonic() - t0
            if line.strip().startswith("ready in "):
                breakdown = line.strip()
            if "Ctrl-C" in line:
                break
    finally:
        stop_server(proc, 120)  # SIGTERM to the command only: it drains and stops its Ray and HAProxy
    if ready_s is None:
        raise RuntimeError("the server did not become ready:\n" + "".join(seen[-30:]))
    return {"seconds": round(ready_s, 2), "breakdown": breakdown}


def compile_hit(env: dict, cwd: Path) -> dict:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "neuronserve", "compile"], capture_output=True, text=True,
                          env=env, cwd=cwd)
    seconds = time.monotonic() - t0
    if done.returncode or "cache hit" not in done.stderr:
        raise RuntimeError(f"the compile was not a cache hit (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return {"seconds": round(seconds, 2), "breakdown": done.stderr.strip().splitlines()[-1]}


def one_round(code: Path, scratch: Path, label: str, n: int, cached_runs: int = 1) -> dict:
    cache = scratch / f"cache-{label}-{n}"
    env = environment(code, cache)
    cwd = scratch  # not the checkout: a server started there would import from it first
    out = {"load_before": os.getloadavg()[0]}
    out["empty"] = serve_ready(env, cwd)
    shutil.rmtree(cache / "timings", ignore_errors=True)
    out["no_timings"] = serve_ready(env, cwd)
    cached = [serve_ready(env, cwd) for _ in range(cached_runs)]
    out["cached"] = {"seconds": statistics.median(c["seconds"] for c in cached), "breakdown": cached[-1]["breakdown"],
                     "runs": [c["seconds"] for c in cached]}
    out["compile"] = compile_hit(env, cwd)
    out["load_after"] = os.getloadavg()[0]
    shutil.rmtree(cache, ignore_errors=True)
    return out


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", action="append", help="a checkout or a git revision to run (repeatable); default: this one")
    p.add_argument("--label", action="append", help="a name for each --code, in order")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all cases (medians are reported)")
    p.add_argument("--cached-runs", type=int, default=1,
                   help="starts of case c per round (its median counts as the round's; a cheap case to repeat)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    codes = a.code or [str(REPO)]
    labels = a.label or [Path(c).name if Path(c).is_dir() else c for c in codes]
    if len(labels) != len(codes):
        p.error("give one --label per --code")
    scratch = Path(tempfile.mkdtemp(prefix="neuronserve-cold-", dir="/tmp"))
    trees = {label: code_tree(code, scratch) for code, label in zip(codes, labels)}
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        for n in range(a.repeat):
            for label, tree in trees.items():
                print(f"round {n + 1}/{a.repeat}: {label} ({tree})", file=sys.stderr, flush=True)
                r = one_round(tree, scratch, label, n, a.cached_runs)
                runs[label].append(r)
                for case in CASES:
                    print(f"  {CASES[case]}: {r[case]['seconds']:.1f} s  {r[case]['breakdown'] or ''}", file=sys.stderr,
                          flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    medians = {label: {case: statistics.median(r[case]["seconds"] for r in rs) for case in CASES}
               for label, rs in runs.items()}
    header = "| | " + " | ".join(labels) + " | target |"
    lines = [f"# Cold start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Machine: {machine()}. Default model (all-MiniLM-L6-v2, 121 CPU buckets), CPU backend, "
             f"`neuronserve serve` with default settings; median of {a.repeat} round(s) ({a.cached_runs} cached "
             "start(s) per round); a separate cache per code tree and round.", "",
             header, "|" + "---|" * (len(labels) + 2)]
    for case, title in CASES.items():
        target = f"<= {TARGETS[case]:g} s" if case in TARGETS else ""
        lines.append(f"| {title} | " + " | ".join(f"{medians[lb][case]:.1f} s" for lb in labels) + f" | {target} |")
    lines += ["", "The command's own breakdown (last round):", ""]
    for label, rs in runs.items():
        for case in CASES:
            if rs[-1][case]["breakdown"]:
                lines.append(f"- {label}, {CASES[case]}: `{rs[-1][case]['breakdown']}`")
    lines += ["", "Load average (1 min) before/after each round: " + "; ".join(
        f"{label}: " + ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in rs) for label, rs in runs.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out / f"cold-start-{stamp}.md").write_text(text)
    (out / f"cold-start-{stamp}.json").write_text(json.dumps(
        {"machine": machine(), "codes": dict(zip(labels, codes)), "runs": runs, "medians": medians}, indent=1))
    print(f"wrote {out / f'cold-start-{stamp}.md'} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
