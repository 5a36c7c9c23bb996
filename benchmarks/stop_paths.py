"""How `neuronserve serve` stops, every way a user or a supervisor stops it.

    python benchmarks/stop_paths.py [--code DIR --label NAME] ... [--rounds 1] [--out benchmarks/results]

For each code tree (`--code`, repeatable, with a `--label` each; default: this checkout) and each
stop path, starts `python -m neuronserve serve` (a few-bucket all-MiniLM-L6-v2 CPU artifact, its
own port), waits until it is ready, sends 4 long requests, then stops it:

    sigint-pid      SIGINT to the command (Ctrl-C in a terminal that signals it alone)
    sigterm-pid     SIGTERM to the command (Kubernetes, `kill PID`)
    sigint-group    SIGINT to its process group (Ctrl-C in a terminal)
    sigterm-group   SIGTERM to its process group (supervisord killasgroup, `kill -- -PGID`)
    sigterm-all     SIGTERM to every process under it at once (systemd's default stop)
    raylet-killed   SIGKILL to its raylet while it serves (the local Ray dies)

and records the seconds until the command exits (given up and SIGKILLed after --give-up-s), its exit
code, the in-flight requests answered 200, the processes of the server still running 10 s later and
whether the HTTP port is free. Prints a table and writes it (markdown and JSON) to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.fixtures.ports import free_port  # noqa: E402  (the checkout's)
from tests.fixtures.processes import port_free, still_running, tree  # noqa: E402
PATHS = ("sigint-pid", "sigterm-pid", "sigint-group", "sigterm-group", "sigterm-all", "raylet-killed")


def alive(procs: dict[int, str]) -> list[str]:
    return [line.split(": ", 1)[1].split(" ", 1)[0].rsplit("/", 1)[-1] for line in still_running(procs)]


def artifact(python: str, env: dict) -> str:
    out = tempfile.mkdtemp(prefix="stop-paths-")
    code = ("from neuronserve.compile.compiler import CompileOptions, compile_artifact\n"
            "from neuronserve.models.artifact import parse_buckets\n"
            f"compile_artifact(CompileOptions(model='default', buckets=parse_buckets('1x16,4x16,8x16,4x32,2x128'), out={out!r}))")
    subprocess.run([python, "-c", code], check=True, env=env, capture_output=True)
    return out


def one(python: str, env: dict, art: str, path: str, give_up_s: float) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([python, "-m", "neuronserve", "serve", "--artifacts", art, "--port", str(port),
                             "--metrics-port", "0", "--threads-per-replica", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    t_start = time.monotonic()
    for line in proc.stdout:
        if "Ctrl-C" in line:
            break
    else:
        return {"path": path, "error": "did not start"}
    ready_s = time.monotonic() - t_start
    procs = tree(proc.pid)
    pool = concurrent.futures.ThreadPoolExecutor(4)
    body = {"input": ["a fairly long sentence about serving models on small machines " * 8] * 16}

    def call():
        try:
            return httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=60).status_code
        except httpx.HTTPError as e:
            return type(e).__name__

    futures = [pool.submit(call) for _ in range(4)]
    time.sleep(0.5)
    t0 = time.monotonic()
    if path == "sigint-pid":
        proc.send_signal(signal.SIGINT)
    elif path == "sigterm-pid":
        proc.send_signal(signal.SIGTERM)
    elif path == "sigint-group":
        os.killpg(proc.pid, signal.SIGINT)
    elif path == "sigterm-group":
        os.killpg(proc.pid, signal.SIGTERM)
    elif path == "sigterm-all":
        for pid in procs:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    elif path == "raylet-killed":
        raylet = next(pid for pid, c in procs.items() if c.split(" ", 1)[0].endswith("/raylet"))
        os.kill(raylet, signal.SIGKILL)
    try:
        proc.wait(give_up_s)
        stop_s, code = time.monotonic() - t0, proc.returncode
    except subprocess.TimeoutExpired:
        stop_s, code = None, "hung"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    results = [f.result() for f in futures]
    time.sleep(10)
    left = alive(procs)
    for pid in procs:  # leave nothing of ours behind for the next round
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return {"path": path, "ready_s": round(ready_s, 1), "stop_s": None if stop_s is None else round(stop_s, 1),
            "exit": code, "answered_200": sum(r == 200 for r in results), "in_flight": len(results),
            "left": left, "port_free": port_free(port)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", action="append", help="a checkout to run (repeatable); default: this one")
    p.add_argument("--label", action="append", help="a name for each --code")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--give-up-s", type=float, default=90.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    codes = a.code or [str(REPO)]
    labels = a.label or [Path(c).name for c in codes]
    rows = []
    for code, label in zip(codes, labels):
        env = {**os.environ, "PYTHONPATH": code, "HOME": tempfile.mkdtemp(prefix="nsh-"), "HF_HUB_OFFLINE": "1"}
        art = artifact(sys.executable, env)
        for r in range(a.rounds):
            for path in a.paths.split(","):
                row = {"code": label, "round": r, **one(sys.executable, env, art, path, a.give_up_s)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = ["| code | stop path | ready s | stop s | exit | in-flight 200 | processes left | port free |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        stop = "gave up at %g" % a.give_up_s if row.get("stop_s") is None else row["stop_s"]
        lines.append(f"| {row['code']} | {row['path']} | {row.get('ready_s')} | {stop} | {row.get('exit')} | "
                     f"{row.get('answered_200')}/{row.get('in_flight')} | {len(row.get('left', []))} "
                     f"{' '.join(sorted(set(row.get('left', []))))} | {row.get('port_free')} |")
    table = "\n".join(lines)
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}"
    (out / f"stop-paths-{stamp}.md").write_text(f"# Stop paths ({stamp}, {machine})\n\n{table}\n")
    (out / f"stop-paths-{stamp}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
