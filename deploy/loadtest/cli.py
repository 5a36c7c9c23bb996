"""`neuronserve loadtest`: sweep closed- or open-loop load over a live endpoint and report it.

Registered by serve/cli.py through `add_subcommand(subparsers)`; `main(argv)` is the standalone
entry point (`python -m neuronserve.deploy.loadtest`). Heavy libraries (aiohttp, matplotlib, tqdm) are imported
inside `run`, so importing this module costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from neuronserve.deploy.loadtest.config import (ARRIVALS, BUILTIN_WORKLOADS, HARD_MAX_REQUESTS_PER_STEP, ROUTES,
                                    LoadtestConfig, LoadtestError, UsageError, config_from_args, format_value)

PROG = "neuronserve loadtest"

DESCRIPTION = """\
Load-test a live endpoint: a sweep of closed-loop concurrency (--concurrency 1,8,32) or open-loop
arrival rates (--rate 50,100,200), each step a warm-up then a measured duration. Writes per-step
JSON, sweep.json, report.md and two plots to --out; prints the table. With --compare A.json B.json,
prints the two runs side by side with B/A ratios instead.

Text generation (--route chat or completions, any OpenAI-compatible server such as vLLM): every
request streams ("stream": true, "stream_options": {"include_usage": true}); the report gives time
to first token (TTFT), inter-token latency (ITL) and time per output token (TPOT) percentiles,
output tokens/s, goodput under --goodput SLOs and $ per 1M output tokens. For example:

  neuronserve loadtest --url http://127.0.0.1:8000 --route chat --model llama \\
      --prompt-tokens 128-1024 --output-tokens 64-256 --concurrency 1,8,32 \\
      --goodput ttft:500 tpot:50 --instance-type inf2.xlarge"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    p.add_argument("--model", help="model name, or a weighted mix of the models one server serves, e.g. "
                   "e5=0.8,bge=0.2 (each request goes to one model, in proportion; the report adds per-model "
                   "latency and cost); default: the first id from GET {url}/v1/models")
    p.add_argument("--route", default="embeddings", choices=ROUTES,
                   help="embeddings: POST /v1/embeddings (OpenAI); classify: POST /predict (TEI); "
                        "v2: POST /v2/models/{model}/infer (KServe v2); rerank: POST /v1/rerank (Cohere/Jina, the "
                        "texts as documents); sparse: POST /embed_sparse (TEI); chat: POST /v1/chat/completions, "
                        "streamed (the text as one user message); completions: POST /v1/completions, streamed "
                        "(the text as the prompt). Default: embeddings")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", metavar="N[,N...]",
                      help="closed loop: N workers sending back to back, one step per value (default 1,8,32)")
    load.add_argument("--rate", metavar="R[,R...]", help="open loop: target requests/s, one step per value")
    p.add_argument("--arrival", default="poisson", choices=ARRIVALS,
                   help="open-loop inter-arrival times: poisson (default) or constant")
    p.add_argument("--duration", default="30s", help="measured time per step: 30s, 2m, 500ms or seconds (default 30s)")
    p.add_argument("--warmup", default="5s", help="unrecorded load before each step (default 5s)")
    p.add_argument("--workload", default="mixed",
                   help=f"{' | '.join(BUILTIN_WORKLOADS)} (built-in, seeded) or a .jsonl file of strings "
                        "or {\"text\": ...} objects; for chat and completions, prompts: strings or "
                        "{\"prompt\": ..., \"max_tokens\": N} objects (default mixed)")
    gen = p.add_argument_group("generation (--route chat or completions)")
    gen.add_argument("--prompt-tokens", metavar="N|LO-HI", default=None,
                     help="prompts of N words, or uniform in LO..HI, instead of --workload's texts (common words: "
                          "about one token each; the report gives the server's prompt_tokens)")
    gen.add_argument("--tokenizer", metavar="DIR", default=None,
                     help="size --prompt-tokens in this tokenizer's tokens (the served model's folder) "
                          "instead of words")
    gen.add_argument("--output-tokens", metavar="N|LO-HI", default=None,
                     help="each request's max_tokens: N, or uniform in LO..HI (default: a prompt file's "
                          "\"max_tokens\" per line, else 128)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="send \"ignore_eos\": true (a vLLM extension) so every answer runs to max_tokens")
    gen.add_argument("--goodput", nargs="+", metavar="METRIC:MS", default=None,
                     help="per-request SLOs in ms, as vLLM bench serve: ttft, tpot, e2el, and itl (the request's "
                          "largest gap between tokens); goodput = requests/s meeting all, e.g. --goodput ttft:500 "
                          "tpot:50")
    p.add_argument("--seed", type=int, default=0, help="seed for built-in workloads and Poisson arrivals (default 0)")
    p.add_argument("--slo-p99-ms", type=float, default=None,
                   help="latency SLO in ms (end to end): adds goodput (requests/s under it) and a pass/fail per step")
    p.add_argument("--instance-type", default=None, help="price the run from this instance type, e.g. inf2.xlarge")
    p.add_argument("--price-per-hour-usd", type=float, default=None, help="price the run at this $/hour")
    p.add_argument("--max-requests", type=int, default=None, help="stop a step after this many measured requests")
    p.add_argument("--inputs-per-request", type=int, default=1, metavar="N",
                   help="texts per request, sent as one list (default 1: one text per request)")
    p.add_argument("--timeout-s", default=None,
                   help="per-request timeout in seconds (default 30; 300 for chat and completions)")
    p.add_argument("--max-outstanding", type=int, default=None,
                   help="open loop: cap on requests in flight; arrivals beyond it are dropped by the client "
                        "and counted (default 1024)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="API key of a server started with one, sent as `Authorization: Bearer KEY` "
                        "(default: the first key of $NEURONSERVE_API_KEY, if set)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra HTTP header for every request (repeatable), e.g. an Authorization header")
    p.add_argument("--out", default=None, help="output directory (default ./loadtest-YYYYmmdd-HHMMSS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="compare two sweep.json (or step-*.json) files side by side; no load is sent")


def add_subcommand(subparsers) -> None:
    """Register `loadtest` on the `neuronserve` dispatcher."""
    p = subparsers.add_parser("loadtest", help="load-test a live endpoint: percentiles, plots, $ per 1M requests",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def _error(message: object) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (0 done, 1 nothing succeeded / unreachable, 2 usage)."""
    try:
        if getattr(args, "compare", None):
            return _compare(args)
        config = config_from_args(args)
        from neuronserve.deploy.loadtest.report import require_plotting

        require_plotting()  # the plots need the loadtest extra: say so before the load, not after it
        headers = _parse_headers(getattr(args, "header", []) or [])
        if config.api_key and any(name.lower() == "authorization" for name in headers):
            raise UsageError("give either --api-key (or $NEURONSERVE_API_KEY) or an Authorization --header, not both")
        return _loadtest(config, {**config.auth_headers(), **headers})
    except UsageError as exc:
        _error(exc)
        return 2
    except LoadtestError as exc:
        _error(exc)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _parse_headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {item!r} is not 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    return headers


def _compare(args) -> int:
    from neuronserve.deploy.loadtest.report import load_result, render_compare

    path_a, path_b = args.compare
    text = render_compare(load_result(path_a), load_result(path_b), path_a, path_b)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


def _machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _loadtest(config: LoadtestConfig, headers: dict[str, str]) -> int:
    from neuronserve.deploy.loadtest.client import run as run_async
    from neuronserve.deploy.loadtest.cost import resolve_price
    from neuronserve.deploy.loadtest.workload import load_generation_workload, load_workload

    price, price_source = resolve_price(config.instance_type, config.price_per_hour_usd)
    if config.generates:
        workload = load_generation_workload(config.workload, seed=config.seed, prompt_tokens=config.prompt_tokens,
                                            output_tokens=config.output_tokens, tokenizer=config.tokenizer)
    else:
        workload = load_workload(config.workload, seed=config.seed)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {str(config.out)!r}: {exc.strerror or exc}") from None

    metadata = {
        "tool": "neuronserve loadtest",
        "url": config.url,
        "route": config.route,
        "endpoint": None,
        "model": config.model,
        "workload": workload.describe(),
        "mode": config.mode,
        "values": config.values,
        "arrival": config.arrival if config.mode == "rate" else None,
        "warmup_s": config.warmup_s,
        "duration_s": config.duration_s,
        "seed": config.seed,
        "timeout_s": config.timeout_s,
        "max_requests": None if config.max_requests == HARD_MAX_REQUESTS_PER_STEP else config.max_requests,
        "inputs_per_request": config.inputs_per_request,
        "max_outstanding": config.max_outstanding if config.mode == "rate" else None,
        "slo_p99_ms": config.slo_p99_ms,
        **({"goodput_slo_ms": config.goodput, "ignore_eos": config.ignore_eos} if config.generates else {}),
        "instance_type": config.instance_type,
        "price_per_hour_usd": price,
        "price_source": price_source,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(),
        "notes": [],
    }
    steps: list[dict] = []
    latencies: list[list[float]] = []
    interrupted = False
    try:
        run_async(_sweep(config, headers, workload, price, metadata, steps, latencies))
    except KeyboardInterrupt:
        interrupted = True
    if not steps:
        if interrupted:
            raise KeyboardInterrupt
        raise LoadtestError("no step completed")
    if interrupted:
        metadata["notes"].append("interrupted: the sweep stopped early")
        print("warning: interrupted: writing the steps completed so far", file=sys.stderr)

    report = _write_outputs(config, metadata, steps, latencies)
    from neuronserve.deploy.loadtest.report import markdown_table, warnings_for

    print(markdown_table(steps))
    for note in warnings_for(steps):  # metadata notes were printed as they happened
        print(f"warning: {note}", file=sys.stderr)
    print(f"report: {report}", file=sys.stderr)
    if interrupted:
        return 130
    if sum(s["succeeded"] for s in steps) == 0:
        _error(f"no request succeeded (see {report})")
        return 1
    return 0


async def _sweep(config: LoadtestConfig, headers: dict[str, str], workload, price: float | None,
                 metadata: dict, steps: list[dict], latencies: list[list[float]]) -> None:
    from neuronserve.deploy.loadtest.client import StepRunner, Target, discover_model, make_client, preflight, raise_fd_limit
    from neuronserve.deploy.loadtest.report import step_label
    from neuronserve.deploy.loadtest.stats import model_breakdown, summarize

    if config.mode == "concurrency":
        pool = int(max(config.values))
    else:
        pool = config.max_outstanding
    raise_fd_limit(pool)
    async with make_client(pool, config.timeout_s, headers) as client:
        model = config.model
        if model is None:
            try:
                model = await discover_model(client, config.url, config.timeout_s)
            except LoadtestError as exc:
                if config.route not in ("classify", "sparse"):  # /predict and /embed_sparse name no model
                    raise
                if "is the server running" in str(exc):
                    raise
                metadata["notes"].append(f"model not discovered ({exc})")
                print(f"warning: model not discovered ({exc})", file=sys.stderr)
        metadata["model"] = model
        target = Target(url=config.url, route=config.route, model=model, ignore_eos=config.ignore_eos)
        metadata["endpoint"] = "POST " + target.endpoint
        # A generation's preflight asks for a few tokens only: it checks the stream, not the speed.
        first = (target.body(workload.text(0), min(8, workload.output_tokens(0))) if target.generates
                 else target.body(workload.text(0)))
        warning = await preflight(client, target, first, config.timeout_s)
        if warning:
            metadata["notes"].append(warning)
            print(f"warning: {warning}", file=sys.stderr)

        if config.mix:
            metadata["mix"] = {name: round(w, 4) for name, w in config.mix}
        runner = StepRunner(client, target, workload, timeout_s=config.timeout_s,
                            max_requests=config.max_requests, progress=config.progress,
                            inputs_per_request=config.inputs_per_request, mix=config.mix)
        for value in config.values:
            if config.mode == "concurrency":
                label = f"c={format_value(value)}"
                result = await runner.closed_loop(int(value), config.warmup_s, config.duration_s, label)
            else:
                label = f"rate={format_value(value)}/s"
                result = await runner.open_loop(value, config.arrival, config.seed, config.max_outstanding,
                                                config.warmup_s, config.duration_s, label)
            step = summarize(result.recorder, mode=config.mode, value=value, arrival=config.arrival,
                             warmup_s=config.warmup_s, duration_s=config.duration_s,
                             slo_p99_ms=config.slo_p99_ms, price_per_hour_usd=price,
                             client_cpu_s=result.cpu_s, client_wall_s=result.wall_s,
                             generation=config.generates, goodput=config.goodput)
            if result.by_model is not None:
                step["models"] = model_breakdown(result.by_model, step, price)
            lat = result.recorder.latencies_ms
            steps.append(step)
            latencies.append(lat)
            raw = {"latencies_ms": [round(x, 3) for x in lat]}
            if config.generates:
                gens = result.recorder.generations
                raw["ttfts_ms"] = [None if g.ttft_ms is None else round(g.ttft_ms, 3) for g in gens]
                raw["tpots_ms"] = [None if g.tpot_ms is None else round(g.tpot_ms, 3) for g in gens]
                raw["output_tokens"] = [g.output_tokens for g in gens]
            _write_json(config.out / f"{config.step_name(value)}.json", {**step, "metadata": metadata, **raw})
            gen = step.get("generation")
            if gen is not None:
                print(f"{step_label(step)}: sent {step['sent']}, ok {step['succeeded']}, throttled {step['throttled']}, "
                      f"errors {step['failed'] - step['throttled']}, {step['achieved_rps']:.2f} req/s, "
                      f"{gen['output_tokens_per_s']:.1f} output tokens/s, TTFT p50 {_ms(gen['ttft_ms']['p50'])} "
                      f"p99 {_ms(gen['ttft_ms']['p99'])} ms, ITL p50 {_ms(gen['itl_ms']['p50'])} "
                      f"p99 {_ms(gen['itl_ms']['p99'])} ms, client CPU {step['client_cpu_percent']:.0f}%",
                      file=sys.stderr)
            p99 = step["latency_ms"]["p99"]
            if gen is None:
                print(f"{step_label(step)}: sent {step['sent']}, ok {step['succeeded']}, throttled {step['throttled']}, "
                      f"errors {step['failed'] - step['throttled']}, dropped {step['dropped_by_client']}, "
                      f"{step['achieved_rps']:.2f} req/s, p99 {'-' if p99 is None else f'{p99:.2f}'} ms, "
                      f"client CPU {step['client_cpu_percent']:.0f}%", file=sys.stderr)
            for name, one in (step.get("models") or {}).items():
                p50, p99 = one["latency_ms"]["p50"], one["latency_ms"]["p99"]
                cost = one["usd_per_1m_requests"]
                print(f"  {name}: ok {one['succeeded']}, {one['achieved_rps']:.2f} req/s, p50 "
                      f"{'-' if p50 is None else f'{p50:.2f}'} ms, p99 {'-' if p99 is None else f'{p99:.2f}'} ms, "
                      f"$/1M req {'-' if cost is None else f'{cost:.4f}'}", file=sys.stderr)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _write_outputs(config: LoadtestConfig, metadata: dict, steps: list[dict], latencies: list[list[float]]) -> Path:
    from neuronserve.deploy.loadtest.report import plot_latency_cdf, plot_latency_vs_throughput, render_report

    sweep = {"metadata": metadata, "steps": steps}
    _write_json(config.out / "sweep.json", sweep)
    report = config.out / "report.md"
    report.write_text(render_report(sweep), encoding="utf-8")
    title = f"{metadata['model']} {metadata['route']} @ {metadata['url']} ({metadata['workload']['name']})"
    plot_latency_vs_throughput(steps, config.out / "latency_vs_throughput.png", title)
    plot_latency_cdf(steps, latencies, config.out / "latency_cdf.png", title)
    return report
