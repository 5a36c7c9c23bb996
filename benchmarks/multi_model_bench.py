"""Two models on one replica: the default embedder (all-MiniLM-L6-v2) and a reranker of the same
size, sharing the device under a mixed load, against each model served alone.

    python benchmarks/multi_model_bench.py [--mix 0.9] [--documents 4] [--duration 20]
                                           [--warmup 3] [--rounds 1] [--out benchmarks/results]

The reranker is a cross-encoder with all-MiniLM-L6-v2's config (6 layers, 384 wide) and a one-label
head, random weights (seed 0, so every run builds the same model and the compile cache hits) and
the real tokenizer; on this backend its speed is what matters, not its scores. Both are compiled
for cpu (cached), then three servers run in turn, each with one replica (`--rounds` times over,
the three in turn each round, so the shared machine's changing load falls on all of them):

  (c) both models, (a) the embedder alone, (b) the reranker alone

and each is driven by a closed-loop client (aiohttp, one connection per worker) at c=32, then at
c=1 (the alone servers also at each model's depth, below). Every request is one model's: an
embedding of one text (`/v1/embeddings`, the loadtest's `mixed` texts), or a rerank of
`--documents` of those texts against a query (`/v1/rerank`). The mixed server gets the models in
a fixed proportional order (`--mix`: the embedder's share of the requests), the same order at c=32
and c=1; a server of one model gets only its own requests.

Device time, real tokens and requests come from each server's Prometheus endpoint, per model
(`neuronserve_device_busy_seconds_total`, `..._tokens_real_total`, `..._requests_total`), read
at the start and end of each step's measured window; latencies from the client.

The targets (issue 17):
- total served real tokens/s of (c) at c=32 >= 0.9 x (a)'s at c=32: the device is shared, not wasted;
- each model's share of (c)'s device time within 10% (of the share) of its share of demand;
- p50 at c=1 of each model in (c) within 2 ms of its p50 served alone.

A model's *demand* is the device time its requests would need on their own: its share of the
requests times the device seconds one of its requests takes when the model is served alone with
as many of its requests outstanding as it had in the mix at c=32 (its `depth`, by Little's law
from the client's latencies; `demand_shares` in `neuronserve.deploy.loadtest.stats`). The alone
servers run that concurrency as a third step. The depth matters: alone at c=32 a model has 32
requests queued and fills large batches, which a tenth of a mixed load of 32 never gives it even
on a device of its own, so demand measured there understates what its traffic needs (the report
shows that comparison too). Token shares would not do: a rerank pair is longer than either text
alone, the reranker has no packed graph, and batches of different lengths pad differently, so a
token of one model does not cost what a token of the other does. With a closed loop each model
is served in the proportion it is asked, so a model whose share of device time is above its
demand spends more device time per request than its own traffic needs alone (smaller batches,
more padding, interference from the other model's batches): what sharing must not do.

Prints a table and writes `<out>/multi-model-<stamp>.md` and `.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.fixtures.ports import free_port  # noqa: E402  (the checkout's)
from tests.integration.conftest import start_server, stop_server  # noqa: E402

EMBED, RERANK = "minilm-embed", "minilm-rerank"
TARGETS = {
    "tokens_vs_embedder_alone_c32": 0.9,  # (c) total real tokens/s >= 0.9 x (a)
    "device_share_error": 0.10,  # |device share - demand share| <= 10% of the demand share
    "c1_p50_over_alone_ms": 2.0,  # each model's p50 at c=1 in (c) <= its p50 alone + 2 ms
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_reranker(out: Path) -> Path:
    """A cross-encoder with the default embedder's config and tokenizer, a one-label head and
    random weights (seed 0: the same bytes every time), saved under `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from neuronserve.models.loading import DEFAULT_MODEL, resolve_model_path

    base, _ = resolve_model_path(DEFAULT_MODEL)
    path = out / "minilm-l6-cross-encoder-random"
    if (path / "config.json").is_file():
        return path
    config = AutoConfig.from_pretrained(base, num_labels=1)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    # The embedder's own truncation length, so both models have the same compiled buckets.
    AutoTokenizer.from_pretrained(base, model_max_length=256).save_pretrained(str(path))
    return path


def compile_both(work: Path) -> dict[str, Path]:
    from neuronserve.compile.compiler import CompileOptions, compile_artifact

    embed = compile_artifact(CompileOptions(model="default", task="embed", target="cpu"))
    rerank = compile_artifact(CompileOptions(model=str(build_reranker(work)), task="rerank", target="cpu",
                                             buckets=[e.bucket for e in embed.manifest.buckets]))
    for name, res in ((EMBED, embed), (RERANK, rerank)):
        log(f"  {name}: {res.out_dir} ({'cached' if res.cache_hit else f'compiled in {res.seconds:.0f} s'}, "
            f"{len(res.manifest.buckets)} buckets)")
    return {EMBED: embed.out_dir, RERANK: rerank.out_dir}


# -- the load ----------------------------------------------------------------------------------
def request_bodies(texts: list[str], documents: int, url: str) -> dict[str, list[bytes]]:
    """The bodies each model's requests send, in order: one text per embedding; `documents`
    consecutive texts per rerank, the query taken from the first (the loadtest's rerank shape)."""
    from neuronserve.deploy.loadtest.client import Target

    embed, rerank = Target(url, "embeddings", EMBED), Target(url, "rerank", RERANK)
    n = len(texts)
    return {EMBED: [embed.body(t) for t in texts],
            RERANK: [rerank.body([texts[(i * documents + k) % n] for k in range(documents)]) for i in range(n)]}


def path_of(model: str) -> str:
    return "/v1/embeddings" if model == EMBED else "/v1/rerank"


def metric_totals(text: str) -> dict[str, dict[str, float]]:
    """Per model: device-busy seconds, real and padded tokens, answered requests (HTTP 200),
    batches and the rows they held."""
    from prometheus_client.parser import text_string_to_metric_families

    keys = {"neuronserve_device_busy_seconds_total": "device_s", "neuronserve_tokens_real_total": "real_tokens",
            "neuronserve_tokens_padded_total": "padded_tokens", "neuronserve_requests_total": "requests",
            "neuronserve_batches_total": "batches", "neuronserve_rows_total": "rows"}
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = keys.get(s.name)
            if key is None or "model" not in s.labels or (key == "requests" and s.labels.get("status") != "200"):
                continue
            per = out.setdefault(s.labels["model"], dict.fromkeys(keys.values(), 0.0))
            per[key] += s.value
    return out


def delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {m: {k: v - before.get(m, {}).get(k, 0.0) for k, v in per.items()} for m, per in after.items()}


async def closed_loop(url: str, metrics_url: str, bodies: dict[str, list[bytes]], order: list[str],
                      concurrency: int, warmup_s: float, duration_s: float) -> dict:
    """`concurrency` workers, each sending its next request as its last one is answered; request i
    goes to model order[i % len(order)]. Latencies of requests issued inside the window; the
    server's counters read at the window's start and end."""
    import aiohttp

    from neuronserve.deploy.loadtest.client import fetch, make_client

    transport_errors = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
    counter = itertools.count()
    sent = {m: itertools.count() for m in bodies}
    lat: dict[str, list[float]] = {m: [] for m in set(order)}
    errors: dict[str, int] = {m: 0 for m in set(order)}
    kinds: dict[int, int] = {}  # HTTP status (0: no response) -> failed requests
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s
    async with make_client(concurrency + 1, 60.0) as client:
        async def worker() -> None:
            while (now := loop.time()) < end:
                model = order[next(counter) % len(order)]
                pool = bodies[model]
                body = pool[next(sent[model]) % len(pool)]
                t = time.perf_counter()
                try:
                    status, _ = await fetch(client, "POST", url + path_of(model), body)
                except transport_errors:
                    status = 0
                ms = (time.perf_counter() - t) * 1000
                if now >= start:
                    if status == 200:
                        lat[model].append(ms)
                    else:
                        errors[model] += 1
                        kinds[status] = kinds.get(status, 0) + 1

        async def scrape() -> dict:
            _, text = await fetch(client, "GET", metrics_url)
            return metric_totals(text.decode())

        async def window() -> tuple[dict, dict, float]:
            await asyncio.sleep(start - loop.time())
            before, w0 = await scrape(), loop.time()
            await asyncio.sleep(end - loop.time())
            return before, await scrape(), loop.time() - w0

        w = asyncio.ensure_future(window())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        before, after, elapsed = await w
    return {"latencies_ms": lat, "errors": errors, "error_kinds": kinds, "server": delta(after, before), "elapsed_s": elapsed}


def summarize_step(run: str, c: int, raw: dict) -> dict:
    from neuronserve.deploy.loadtest.stats import percentile

    elapsed = raw["elapsed_s"]
    models = {}
    for m, lat in raw["latencies_ms"].items():
        lat = sorted(lat)
        srv = raw["server"].get(m, {})
        # Requests of this model outstanding on average (Little's law over the window).
        models[m] = {"requests": len(lat), "errors": raw["errors"][m], "p50_ms": percentile(lat, 50),
                     "in_flight": sum(lat) / 1000 / elapsed,
                     "p99_ms": percentile(lat, 99), "rps": len(lat) / elapsed,
                     "real_tokens_per_s": srv.get("real_tokens", 0.0) / elapsed,
                     "device_s": srv.get("device_s", 0.0), "server_requests": srv.get("requests", 0.0),
                     "real_tokens": srv.get("real_tokens", 0.0), "padded_tokens": srv.get("padded_tokens", 0.0),
                     "batches": srv.get("batches", 0.0), "rows": srv.get("rows", 0.0)}
    return {"run": run, "concurrency": c, "elapsed_s": elapsed, "models": models,
            "real_tokens_per_s": sum(v["real_tokens_per_s"] for v in models.values())}


def run_server(run: str, artifacts: dict[str, Path], models: list[str], weights: dict[str, float],
               bodies_for, args, concurrencies: tuple[int, ...] = (32, 1), rnd: int = 0) -> list[dict]:
    from neuronserve.deploy.loadtest.client import run as run_async
    from neuronserve.deploy.loadtest.stats import mix_order

    port, mport = free_port(), free_port()
    extra = [a for m in models[1:] for a in ("--artifacts", f"{m}={artifacts[m]}")]
    log(f"{run}: starting a replica of {', '.join(models)} ...")
    t = time.monotonic()
    proc, _, stderr = start_server(f"{models[0]}={artifacts[models[0]]}", port, mport, "--replicas", "1", *extra)
    log(f"  ready in {time.monotonic() - t:.0f} s")
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
    bodies = bodies_for(url)
    order = [models[i] for i in mix_order([weights[m] for m in models], 1000)]
    steps = []
    try:
        for c in concurrencies:
            raw = run_async(closed_loop(url, metrics_url, {m: bodies[m] for m in models}, order, c,
                                        args.warmup, args.duration))
            step = summarize_step(run, c, raw)
            step["round"] = rnd
            step["load_1m"] = os.getloadavg()[0]  # the machine is shared: how busy it was
            steps.append(step)
            log(f"  c={c}: {step['real_tokens_per_s']:.0f} real tokens/s; " + "; ".join(
                f"{m} {v['rps']:.1f} req/s p50 {v['p50_ms'] or float('nan'):.2f} ms device {v['device_s']:.2f} s, "
                f"{v['errors']} errors" for m, v in step["models"].items()))
            if any(v["errors"] or not v["requests"] for v in step["models"].values()):
                raise RuntimeError(f"{run} c={c}: failed requests ({raw['error_kinds']}); the server's log:\n"
                                   + "".join(stderr[-30:]))
    finally:
        stop_server(proc)
    return steps


def median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def evaluate(steps: list[dict], weights: dict[str, float], depth: dict[str, int]) -> dict:
    """The three targets from the steps (medians over rounds). `depth`: each model's requests
    outstanding in the mixed load at c=32, the concurrency its demand is measured at alone."""
    from neuronserve.deploy.loadtest.stats import demand_shares, share_error, shares

    def pick(run: str, c: int) -> list[dict]:
        return [s for s in steps if s["run"] == run and s["concurrency"] == c]

    alone = {EMBED: "embedder alone", RERANK: "reranker alone"}
    both = "both"
    out: dict = {}
    tok_alone = median([s["real_tokens_per_s"] for s in pick(alone[EMBED], 32)])
    tok_both = median([s["real_tokens_per_s"] for s in pick(both, 32)])
    ratio = tok_both / tok_alone
    # What the mixed load would reach if each model's tokens cost what they cost served alone (a
    # reranker's token may cost more than the embedder's): its token shares at each model's own rate.
    alone_tps = {m: median([s["real_tokens_per_s"] for s in pick(alone[m], 32)]) for m in (EMBED, RERANK)}
    token_share = {m: median([shares({k: s["models"][k]["real_tokens"] for k in (EMBED, RERANK)})[m]
                              for s in pick(both, 32)]) for m in (EMBED, RERANK)}
    expected = 1 / sum(token_share[m] / alone_tps[m] for m in (EMBED, RERANK))
    out["tokens_vs_embedder_alone_c32"] = {"value": ratio, "met": ratio >= TARGETS["tokens_vs_embedder_alone_c32"],
                                           "both_tokens_per_s": tok_both, "embedder_alone_tokens_per_s": tok_alone,
                                           "reranker_alone_tokens_per_s": alone_tps[RERANK],
                                           "no_waste_tokens_per_s": expected, "vs_no_waste": tok_both / expected}
    def per_request_alone(m: str, c: int) -> float:
        return median([s["models"][m]["device_s"] / s["models"][m]["server_requests"] for s in pick(alone[m], c)])

    # Demand: device seconds per request of each model served alone with as many of its requests
    # outstanding as it had in the mix; for reference, alone at c=32 (deeper queues, fuller batches
    # than the model's share of the mix can give it).
    per_request = {m: per_request_alone(m, depth[m]) for m in (EMBED, RERANK)}
    per_request_32 = {m: per_request_alone(m, 32) for m in (EMBED, RERANK)}
    demand = demand_shares(weights, per_request)
    demand_32 = demand_shares(weights, per_request_32)
    measured = [shares({m: s["models"][m]["device_s"] for m in (EMBED, RERANK)}) for s in pick(both, 32)]
    device = {m: median([x[m] for x in measured]) for m in (EMBED, RERANK)}
    tokens = [shares({m: s["models"][m]["real_tokens"] for m in (EMBED, RERANK)}) for s in pick(both, 32)]
    requests = [shares({m: s["models"][m]["server_requests"] for m in (EMBED, RERANK)}) for s in pick(both, 32)]
    err = {m: share_error(device[m], demand[m]) for m in (EMBED, RERANK)}
    out["device_share_error"] = {
        "value": max(err.values()), "met": max(err.values()) <= TARGETS["device_share_error"],
        "per_model": {m: {"device_share": device[m], "demand_share": demand[m], "error": err[m],
                          "depth": depth[m], "device_s_per_request_alone": per_request[m],
                          "demand_share_alone_c32": demand_32[m], "error_alone_c32": share_error(device[m], demand_32[m]),
                          "device_s_per_request_alone_c32": per_request_32[m],
                          "device_s_per_request_both": median([s["models"][m]["device_s"] / s["models"][m]["server_requests"]
                                                               for s in pick(both, 32)]),
                          "token_share": median([x[m] for x in tokens]),
                          "request_share": median([x[m] for x in requests])} for m in (EMBED, RERANK)}}
    over = {}
    for m in (EMBED, RERANK):
        a = median([s["models"][m]["p50_ms"] for s in pick(alone[m], 1)])
        b = median([s["models"][m]["p50_ms"] for s in pick(both, 1)])
        over[m] = {"alone_p50_ms": a, "both_p50_ms": b, "over_ms": b - a}
    worst = max(v["over_ms"] for v in over.values())
    out["c1_p50_over_alone_ms"] = {"value": worst, "met": worst <= TARGETS["c1_p50_over_alone_ms"], "per_model": over}
    return out


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def report(steps: list[dict], checks: dict, meta: dict) -> str:
    lines = [f"Two models on one replica, {meta['machine']}; commit {meta['commit']}.",
             f"Closed loop, {meta['duration_s']} s measured per step after {meta['warmup_s']} s warm-up, "
             f"{meta['rounds']} round(s) (medians); the mixed load sends {meta['mix'][EMBED]:.0%} of its requests "
             f"to {EMBED} (one `mixed` text per /v1/embeddings) and {meta['mix'][RERANK]:.0%} to {RERANK} "
             f"(/v1/rerank, {meta['documents']} documents each).", "",
             "| round | run | c | model | req/s | real tokens/s | p50 ms | p99 ms | device s | device ms/req | rows/batch | "
             "padded/real | errors | load 1m |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        for m, v in s["models"].items():
            per_req = v["device_s"] / v["server_requests"] * 1000 if v["server_requests"] else float("nan")
            pr = v["padded_tokens"] / v["real_tokens"] if v["real_tokens"] else float("nan")
            rows = v["rows"] / v["batches"] if v["batches"] else float("nan")
            lines.append(f"| {s['round']} | {s['run']} | {s['concurrency']} | {m} | {v['rps']:.1f} | {v['real_tokens_per_s']:.0f} | "
                         f"{v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['device_s']:.2f} | {per_req:.2f} | {rows:.1f} | "
                         f"{pr:.2f} | {v['errors']} | {s['load_1m']:.1f} |")
        if len(s["models"]) > 1:
            lines.append(f"| {s['round']} | {s['run']} | {s['concurrency']} | total | {sum(v['rps'] for v in s['models'].values()):.1f} | "
                         f"{s['real_tokens_per_s']:.0f} | | | {sum(v['device_s'] for v in s['models'].values()):.2f} | | | | | {s['load_1m']:.1f} |")
    t = checks["tokens_vs_embedder_alone_c32"]
    d = checks["device_share_error"]
    p = checks["c1_p50_over_alone_ms"]
    lines += ["", "Device share in the mix at c=32 against demand: each model's request share x its device ms per request "
              "served alone with as many of its requests outstanding as it had in the mix (`depth`); for reference "
              "the same with the model alone at c=32.", "",
              "| model | request share | token share | depth | device ms/req alone at depth | device ms/req in the mix | "
              "demand share | device share | off by (of demand) | device ms/req alone c=32 | demand share (alone c=32) | "
              "off by |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in d["per_model"].items():
        lines.append(f"| {m} | {v['request_share']:.3f} | {v['token_share']:.3f} | {v['depth']} | "
                     f"{v['device_s_per_request_alone'] * 1000:.2f} | {v['device_s_per_request_both'] * 1000:.2f} | "
                     f"{v['demand_share']:.3f} | {v['device_share']:.3f} | {v['error']:.1%} | "
                     f"{v['device_s_per_request_alone_c32'] * 1000:.2f} | {v['demand_share_alone_c32']:.3f} | "
                     f"{v['error_alone_c32']:.1%} |")
    lines += ["", "| model | p50 c=1 alone ms | p50 c=1 both ms | difference ms |", "|---|---|---|---|"]
    for m, v in p["per_model"].items():
        lines.append(f"| {m} | {v['alone_p50_ms']:.2f} | {v['both_p50_ms']:.2f} | {v['over_ms']:+.2f} |")
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|",
              f"| total real tokens/s, both / embedder alone, c=32 | {t['value']:.3f} ({t['both_tokens_per_s']:.0f} / "
              f"{t['embedder_alone_tokens_per_s']:.0f}) | >= {TARGETS['tokens_vs_embedder_alone_c32']} | "
              f"{'yes' if t['met'] else 'NO'} |",
              f"| (for reference) total real tokens/s, both / the mix at each model's alone rate | {t['vs_no_waste']:.3f} "
              f"({t['both_tokens_per_s']:.0f} / {t['no_waste_tokens_per_s']:.0f}) | - | - |",
              f"| device share off its demand share at the mix's depth (worst model) | {d['value']:.1%} | <= "
              f"{TARGETS['device_share_error']:.0%} | {'yes' if d['met'] else 'NO'} |",
              f"| (for reference) the same against demand measured alone at c=32 | "
              f"{max(v['error_alone_c32'] for v in d['per_model'].values()):.1%} | - | - |",
              f"| p50 at c=1, both - alone (worst model) | {p['value']:+.2f} ms | <= {TARGETS['c1_p50_over_alone_ms']} ms | "
              f"{'yes' if p['met'] else 'NO'} |"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", type=float, default=0.9, help="the embedder's share of the mixed load's requests")
    p.add_argument("--documents", type=int, default=4, help="documents per rerank request")
    p.add_argument("--duration", type=float, default=20, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=3, help="seconds of load before each step's window")
    p.add_argument("--rounds", type=int, default=1, help="rounds through the three servers (medians)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args()
    if not 0 < a.mix < 1:
        p.error(f"--mix is the embedder's share of the requests, between 0 and 1 exclusive; got {a.mix}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neuronserve.compile.compiler import cache_root

    # The servers run with a HOME of their own: the compile cache's timing tables stay in reach.
    os.environ.setdefault("NEURONSERVE_CACHE_DIR", str(cache_root()))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    from neuronserve.deploy.loadtest.workload import generate

    work = Path(tempfile.mkdtemp(prefix="nsmulti-"))
    log("compiling both models for cpu (cached after the first run) ...")
    artifacts = compile_both(work)
    texts = generate("mixed", seed=0).texts
    weights = {EMBED: a.mix, RERANK: 1 - a.mix}
    bodies_for = lambda url: request_bodies(texts, a.documents, url)  # noqa: E731
    steps: list[dict] = []
    depth: dict[str, int] = {}
    # Rounds go through the three servers in turn (a server started again each round), so a
    # change in the shared machine's load falls on all three rather than on one.
    for rnd in range(a.rounds):
        steps += run_server("both", artifacts, [EMBED, RERANK], weights, bodies_for, a, rnd=rnd)
        if not depth:
            # Each model's demand is measured alone at the depth its requests had in the mix at
            # c=32 (the first round's, kept for the others so their steps compare).
            depth = {m: max(1, round(median([s["models"][m]["in_flight"] for s in steps if s["concurrency"] == 32])))
                     for m in (EMBED, RERANK)}
            log(f"requests outstanding per model in the mix at c=32: {depth}")
        for run, m in (("embedder alone", EMBED), ("reranker alone", RERANK)):
            extra = () if depth[m] in (32, 1) else (depth[m],)
            steps += run_server(run, artifacts, [m], {m: 1.0}, bodies_for, a, (32, 1, *extra), rnd=rnd)
    checks = evaluate(steps, weights, depth)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               "load generator on the same cores")
    meta = {"machine": machine, "python": platform.python_version(), "commit": commit(), "mix": weights,
            "documents": a.documents, "duration_s": a.duration, "warmup_s": a.warmup, "rounds": a.rounds,
            "replicas": 1, "backend": "cpu", "artifacts": {m: str(v) for m, v in artifacts.items()},
            "targets": TARGETS, "depth": depth}
    text = report(steps, checks, meta)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"multi-model-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    base.with_suffix(".md").write_text(f"# Two models on one replica\n\n{text}\n")
    base.with_suffix(".json").write_text(json.dumps({**meta, "steps": steps, "checks": checks}, indent=1))
    log(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
