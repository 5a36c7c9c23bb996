"""Host-path benchmark: one replica on a SIMULATED NeuronCore, driven by the load generator on the
same machine. What it measures is the host's side of serving (HTTP, tokenizing, batching, responses)
and whether it keeps the (simulated) device busy.

    python benchmarks/host_bench.py [--profiles zero,bert-base-inf2,distilbert-base-inf2]
                                    [--workloads short,mixed] [--inputs 1,16] [--concurrency 32,64,128]
                                    [--duration 15] [--code DIR --label NAME ...] [--out benchmarks/results]
                                    [--variant 'NAME=SERVE ARGS' ...]

For each code tree (`--code`, repeatable, each with a `--label`; default: this checkout), each
variant of the serve command (`--variant 'hp2=--host-processes 2'`, repeatable; default: as is) and each
profile, starts `neuronserve serve --backend simulated --device-profile P` on the default model's
artifact (its real tokenizer and buckets), then for each workload, texts per request and concurrency
runs `neuronserve loadtest` (closed loop) and records, over the measured window:

- served requests/s and real tokens/s, p50/p99;
- the device limit for that workload and profile: the best the simulated device reaches with full
  batches of those lengths (each text in its compiled sequence length, batches as large as the
  artifact and max_batch_tokens allow), and served / limit;
- the server's host CPU: every process of the server (the command, Ray's GCS and raylet, Serve's
  controller, HAProxy, the replica) from /proc, as cores busy and as ms of CPU per request; the
  load generator's own CPU separately (it runs on the same cores).

Prints a table and writes markdown and JSON to --out. The device is a simulation: see
docs/host-sizing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_common import stop_server  # noqa: E402  (this folder)
from tests.fixtures.ports import free_port  # noqa: E402  (the checkout's)
from tests.fixtures.processes import cpu_seconds, tree  # noqa: E402


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of `root` and every process under it, now."""
    return cpu_seconds(tree(root))


def device_limit(artifacts: str, texts: list[str], inputs: int, profile: str, max_batch_tokens: int = 2048) -> dict:
    """Requests/s and real tokens/s of the simulated device with every batch as full as the
    artifact allows for each text's compiled sequence length."""
    from neuronserve.serve.backends.simulated import device_seconds, load_profile
    from neuronserve.serve.engine import Engine

    engine = Engine(artifacts, "simulated", backend_options={"profile": "zero"})
    prof = load_profile(profile)
    rows = engine.tokenize(texts)
    per_row_s, real = 0.0, 0
    for row in rows:
        seq = engine.buckets.seq_len_for(len(row))
        sizes = engine.buckets.allowed_sizes(seq, max_batch_tokens) or (1,)
        best = min(device_seconds(prof, engine.buckets.bucket_for(b, seq)) / b for b in sizes)
        per_row_s += best
        real += len(row)
    per_row_s /= len(rows)
    mean_tokens = real / len(rows)
    if per_row_s == 0:
        return {"rps": float("inf"), "tokens_per_s": float("inf"), "mean_tokens": mean_tokens}
    return {"rps": 1 / (per_row_s * inputs), "tokens_per_s": mean_tokens / per_row_s, "mean_tokens": mean_tokens}


def workload_file(kind: str, inputs: int, path: Path, n: int = 1024) -> list[str]:
    from neuronserve.deploy.loadtest.workload import generate

    texts = generate(kind, count=n, seed=0).texts
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))
    return texts


def start(env: dict, artifacts: str, profile: str, port: int, extra: list[str]) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="hostbench-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "neuronserve", "serve", "--artifacts", artifacts, "--port", str(port),
                             "--metrics-port", "0", "--backend", "simulated", "--device-profile", profile, *extra],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True,
                            cwd=env["PYTHONPATH"])  # `python -m` puts the working directory first on the path
    for line in proc.stdout:
        if "Ctrl-C" in line:
            return proc
    code = proc.wait()
    log.seek(0)
    raise RuntimeError(f"server exited with {code}: {log.read()[-2000:]}")


def step(env: dict, proc: subprocess.Popen, url: str, workload: Path, inputs: int, c: int, duration: int,
         warmup: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "neuronserve.deploy.loadtest", "--url", url, "--concurrency", str(c),
           "--duration", f"{duration}s", "--warmup", f"{warmup}s", "--workload", str(workload), "--no-progress",
           "--out", str(out)]
    if inputs > 1:
        cmd += ["--inputs-per-request", str(inputs)]
    gen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    time.sleep(warmup + 1.5)  # the load generator's start-up and warm-up are not measured
    cpu0, t0 = tree_cpu_s(proc.pid), time.monotonic()
    while gen.poll() is None:
        cpu1, t1 = tree_cpu_s(proc.pid), time.monotonic()
        time.sleep(0.25)
    if gen.returncode:
        raise RuntimeError(f"load generator failed: {gen.stderr.read()[-2000:]}")
    s = json.loads((out / "sweep.json").read_text())["steps"][0]
    cores = (cpu1 - cpu0) / (t1 - t0)
    rps = s["achieved_rps"]
    return {"rps": rps, "tokens_per_s": s["tokens_per_s"], "p50_ms": s["latency_ms"]["p50"],
            "p99_ms": s["latency_ms"]["p99"], "errors": s["sent"] - s["succeeded"],
            "server_cores_busy": cores, "server_cpu_ms_per_request": cores / rps * 1000 if rps else None,
            "loadgen_cores_busy": (s.get("client_cpu_percent") or 0) / 100}


def processes(args: list[str]) -> int:
    """Host processes per replica that `serve` arguments ask for."""
    return int(args[args.index("--host-processes") + 1]) if "--host-processes" in args else 1


def sizing_table(rows: list[dict], code: str) -> str:
    """Host capacity per NeuronCore on each inf2/trn1 size, from the zero-profile rows of `code`
    (host work alone). With one host process (the default) the replica's one event loop does the
    host work of every request: at most one vCPU's worth, so it serves at most what this host
    reached (the best over the concurrencies), and the instance's vCPUs per NeuronCore bound it too
    (vCPUs x 1000 / server CPU ms per request). With `--host-processes N` the host work spreads over
    N processes and only the vCPUs bound it (an extrapolation from the CPU per request measured
    here, where 2 cores are all there is)."""
    from neuronserve.common.pricing import INSTANCES

    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r["code"] == code and r["profile"] == "zero" and r["rps"]:
            key = (r["workload"], r["inputs"])
            if key not in best or r["rps"] > best[key]["rps"]:
                best[key] = r
    if not best:
        return ""
    processes = next(iter(best.values())).get("host_processes", 1)
    sizes = [t for t in INSTANCES.values() if t.family in ("inf2", "trn1") and t.neuron_cores]
    head = "| instance | vCPUs per NeuronCore | " + " | ".join(
        f"{w}, {n} text{'s' if n > 1 else ''}/req: req/s per NeuronCore" for w, n in best) + " |"
    rule = ("min(one event loop's best here, vCPUs per NeuronCore x 1000 / server CPU ms per request)"
            if processes == 1 else "vCPUs per NeuronCore x 1000 / server CPU ms per request")
    lines = [f"Host-limited requests/s per NeuronCore, {code} ({processes} host process{'es' if processes > 1 else ''} "
             f"per replica; zero profile: host work only; {rule}):", "",
             head, "|---|---|" + "---|" * len(best)]
    for t in sizes:
        per_core = t.vcpus / t.neuron_cores
        cells = []
        for r in best.values():
            by_cpu = per_core * 1000 / r["server_cpu_ms_per_request"]
            cells.append(f"{min(r['rps'], by_cpu) if processes == 1 else by_cpu:.0f}")
        lines.append(f"| {t.name} | {per_core:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="zero,bert-base-inf2,distilbert-base-inf2")
    p.add_argument("--workloads", default="short,mixed")
    p.add_argument("--inputs", default="1,16", help="texts per request")
    p.add_argument("--concurrency", default="32,64,128")
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--code", action="append", help="a checkout to run (repeatable); default: this one")
    p.add_argument("--label", action="append")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `neuronserve serve` argument (repeatable)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=ARGS: also run the server with these extra `serve` arguments, under NAME (repeatable); "
                   "NAME@LABEL=ARGS: only for the code labelled LABEL")
    p.add_argument("--artifacts", help="default: the default model compiled for cpu (cached)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.artifacts is None:
        from neuronserve.compile.compiler import CompileOptions, compile_artifact

        a.artifacts = str(compile_artifact(CompileOptions(model="default", target="cpu")).out_dir)
    codes = a.code or [str(REPO)]
    labels = a.label or [Path(c).name for c in codes]
    variants = [v.partition("=") for v in a.variant] or [("", "", "")]
    runs = []
    for code, label in zip(codes, labels):
        for name, _, args in variants:
            name, _, only = name.partition("@")  # NAME@LABEL: for that code only
            if not only or only == label:
                runs.append((code, f"{label}/{name}" if name else label, args.split()))

    work = Path(tempfile.mkdtemp(prefix="hostbench-"))
    workloads = {w: workload_file(w, 1, work / f"{w}.jsonl") for w in a.workloads.split(",")}
    inputs_list = [int(x) for x in a.inputs.split(",")]
    concurrencies = [int(x) for x in a.concurrency.split(",")]
    rows = []
    # Codes alternate within each profile, so a comparison does not pit one code's quiet minutes
    # against another's busy ones.
    for profile in a.profiles.split(","):
        for code, label, variant_args in runs:
            env = {**os.environ, "PYTHONPATH": code, "HOME": tempfile.mkdtemp(prefix="nsh-")}
            env.pop("RAY_ADDRESS", None)
            port = free_port()
            proc = start(env, a.artifacts, profile, port, a.serve_arg + variant_args)
            try:
                for w, texts in workloads.items():
                    for inputs in inputs_list:
                        limit = device_limit(a.artifacts, texts, inputs, profile)
                        for c in concurrencies:
                            out = work / f"{label}-{profile}-{w}-{inputs}-{c}"
                            r = step(env, proc, f"http://127.0.0.1:{port}", work / f"{w}.jsonl", inputs, c,
                                     a.duration, a.warmup, out)
                            r.update(code=label, host_processes=processes(a.serve_arg + variant_args), profile=profile, workload=w, inputs=inputs, concurrency=c,
                                     limit_rps=limit["rps"], limit_tokens_per_s=limit["tokens_per_s"],
                                     x_limit=(r["tokens_per_s"] / limit["tokens_per_s"]) if limit["tokens_per_s"] != float("inf") else None)
                            print(json.dumps(r), flush=True)
                            rows.append(r)
            finally:
                stop_server(proc, 60)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
               "load generator on the same cores")
    lines = [f"Host path on a SIMULATED NeuronCore ({machine}), {a.duration} s per step.", "",
             "| code | profile | workload | texts/req | c | req/s | real tok/s | x device limit | p50 ms | p99 ms | "
             "server cores | server CPU ms/req | loadgen cores | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xl = "-" if r["x_limit"] is None else f"{r['x_limit']:.2f}"
        lines.append(f"| {r['code']} | {r['profile']} | {r['workload']} | {r['inputs']} | {r['concurrency']} | {r['rps']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {xl} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_cores_busy']:.2f} | "
                     f"{r['server_cpu_ms_per_request']:.2f} | {r['loadgen_cores_busy']:.2f} | {r['errors']} |")
    table = "\n".join(lines)
    for _, label, _ in runs[1:] if len(runs) > 1 else runs:  # the code compared against comes first
        sizing = sizing_table(rows, label)
        if sizing:
            table += "\n\n" + sizing
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"host-{stamp}.md").write_text(f"# Host path ({stamp})\n\n{table}\n")
    (outdir / f"host-{stamp}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
