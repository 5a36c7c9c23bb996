"""Rendering: the Markdown report, the side-by-side comparison, and the two plots."""

from __future__ import annotations

import json
from pathlib import Path

from neuronserve.deploy.loadtest.config import LoadtestError, UsageError, format_value

# matplotlib is the `loadtest` extra's, not the serving install's.
PLOTS_NEED = "plots need the loadtest extra: pip install 'neuronserve[loadtest]'"


class MissingExtraError(LoadtestError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def step_label(step: dict) -> str:
    if step["mode"] == "rate":
        arrival = step.get("arrival") or "poisson"
        return f"rate={format_value(step['value'])}/s ({arrival})"
    return f"c={format_value(step['value'])}"


def _num(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _errors_cell(step: dict) -> str:
    parts = [f"{code}:{n}" for code, n in step.get("errors_by_status", {}).items()]
    parts += [f"{kind}:{n}" for kind, n in step.get("errors_by_kind", {}).items()]
    return ", ".join(parts) if parts else "0"


def _tokens_cell(step: dict) -> str:
    value = _num(step.get("tokens_per_s"), 0)
    return f"~{value}" if step.get("tokens_source") in ("estimate", "mixed") else value


def markdown_table(steps: list[dict]) -> str:
    if any(s.get("generation") for s in steps):
        return generation_table(steps)
    has_slo = any(s.get("slo_p99_ms") is not None for s in steps)
    has_cost = any(s.get("price_per_hour_usd") is not None for s in steps)
    head = ["step", "offered/s", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "tokens/s",
            "ok", "throttled", "errors", "dropped"]
    if has_slo:
        head += ["goodput/s", "p99 <= SLO"]
    if has_cost:
        head += ["$/1M req"]
    head += ["client CPU"]
    align = ["---"] + ["---:"] * (len(head) - 1)
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for s in steps:
        lat = s["latency_ms"]
        cells = [step_label(s), _num(s["offered_rps"]), _num(s["achieved_rps"]), _num(lat["p50"]),
                 _num(lat["p90"]), _num(lat["p99"]), _num(lat["max"]), _tokens_cell(s), str(s["succeeded"]),
                 str(s["throttled"]), _errors_cell(s), str(s["dropped_by_client"])]
        if has_slo:
            met = s.get("slo_met")
            cells += [_num(s.get("goodput_rps")), "-" if met is None else ("yes" if met else "NO")]
        if has_cost:
            cells += [_num(s.get("usd_per_1m_requests"), 4)]
        cpu = f"{s['client_cpu_percent']:.0f}%" + (" (!)" if s.get("client_saturated") else "")
        cells.append(cpu)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def generation_table(steps: list[dict]) -> str:
    """The table of a generation sweep: TTFT, ITL and TPOT percentiles, end to end, output tokens/s,
    goodput and $ per 1M output tokens.

    >>> gen = {"ttft_ms": {"p50": 80.0, "p90": 90.0, "p99": 99.0}, "itl_ms": {"p50": 20.0, "p90": 21.0, "p99": 25.0},
    ...        "tpot_ms": {"p50": 20.5}, "output_tokens_per_s": 400.0, "output_tokens_source": "usage",
    ...        "goodput_rps": None, "usd_per_1m_output_tokens": None}
    >>> step = {"mode": "concurrency", "value": 8, "offered_rps": 2.0, "achieved_rps": 2.0, "succeeded": 40,
    ...         "throttled": 0, "errors_by_status": {}, "errors_by_kind": {}, "client_cpu_percent": 3.0,
    ...         "latency_ms": {"p50": 1000.0, "p99": 1200.0}, "generation": gen}
    >>> print(generation_table([step]).splitlines()[2])
    | c=8 | 2.00 | 2.00 | 80.00 | 90.00 | 99.00 | 20.00 | 21.00 | 25.00 | 20.50 | 1,000.00 | 1,200.00 | 400.0 | 40 | 0 | 0 | 3% |
    """
    has_goodput = any((s.get("generation") or {}).get("goodput_rps") is not None for s in steps)
    has_cost = any(s.get("price_per_hour_usd") is not None for s in steps)
    head = ["step", "offered/s", "req/s", "TTFT p50", "TTFT p90", "TTFT p99", "ITL p50", "ITL p90", "ITL p99",
            "TPOT p50", "e2e p50", "e2e p99", "out tok/s", "ok", "throttled", "errors"]
    if has_goodput:
        head += ["goodput/s", "good %"]
    if has_cost:
        head += ["$/1M out tok"]
    head += ["client CPU"]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for s in steps:
        g = s.get("generation") or {}
        ttft, itl, tpot = g.get("ttft_ms", {}), g.get("itl_ms", {}), g.get("tpot_ms", {})
        out = _num(g.get("output_tokens_per_s"), 1)
        if g.get("output_tokens_source") in ("chunks", "mixed"):
            out = "~" + out
        cells = [step_label(s), _num(s["offered_rps"]), _num(s["achieved_rps"]),
                 _num(ttft.get("p50")), _num(ttft.get("p90")), _num(ttft.get("p99")),
                 _num(itl.get("p50")), _num(itl.get("p90")), _num(itl.get("p99")), _num(tpot.get("p50")),
                 _num(s["latency_ms"].get("p50")), _num(s["latency_ms"].get("p99")), out,
                 str(s["succeeded"]), str(s["throttled"]), _errors_cell(s)]
        if has_goodput:
            good = g.get("good_requests")
            cells += [_num(g.get("goodput_rps")),
                      "-" if good is None or not s["succeeded"] else f"{100.0 * good / s['succeeded']:.0f}%"]
        if has_cost:
            cells += [_num(g.get("usd_per_1m_output_tokens"), 4)]
        cells.append(f"{s['client_cpu_percent']:.0f}%" + (" (!)" if s.get("client_saturated") else ""))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def warnings_for(steps: list[dict]) -> list[str]:
    notes = []
    for s in steps:
        label = step_label(s)
        if s.get("client_saturated"):
            notes.append(f"{label}: the load generator used {s['client_cpu_percent']:.0f}% of one core; "
                         "it is probably the bottleneck (results understate the server); "
                         "run several generators or a faster client machine")
        if s["sent"] and s["succeeded"] == 0:
            notes.append(f"{label}: no request succeeded ({_errors_cell(s)}, throttled {s['throttled']})")
        elif s["failed"]:
            notes.append(f"{label}: {s['failed']} of {s['sent']} requests failed "
                         f"(throttled {s['throttled']}; {_errors_cell(s)})")
        if s["dropped_by_client"]:
            notes.append(f"{label}: {s['dropped_by_client']} arrivals dropped by the client "
                         "(too many requests outstanding; the server is not keeping up)")
        lag = s.get("send_lag_ms") or {}
        if lag.get("p99") is not None and lag["p99"] > 10.0:
            notes.append(f"{label}: p99 send lag {lag['p99']:.2f} ms behind the arrival schedule; "
                         "the client could not keep the offered rate")
        gen = s.get("generation") or {}
        if gen.get("output_tokens_source") in ("chunks", "mixed"):
            notes.append(f"{label}: the stream carried no usage (stream_options.include_usage) for some or all "
                         "requests: their output tokens were counted as content events, one token each (marked ~)")
        if s["mode"] == "rate" and s["offered_rps"] and s["achieved_rps"] < 0.9 * s["offered_rps"]:
            notes.append(f"{label}: achieved {s['achieved_rps']:.2f}/s of {s['offered_rps']:.2f}/s offered")
    return notes


def tokens_note(steps: list[dict]) -> str:
    sources = {s.get("tokens_source") for s in steps if s.get("succeeded")}
    if sources == {"server"}:
        return "tokens/s: from the server's `usage.prompt_tokens`."
    if sources == {"estimate"}:
        return "tokens/s: estimated as words x 1.3 (the responses carry no `usage.prompt_tokens`); marked ~."
    if sources:
        return "tokens/s: server `usage.prompt_tokens` where present, else words x 1.3 (marked ~)."
    return "tokens/s: no successful responses."


def generation_notes(meta: dict) -> list[str]:
    """The report's lines on how a generation sweep was measured."""
    w = meta.get("workload", {})
    lines = [f"- output lengths (max_tokens): {w.get('max_tokens')} (min/median/max {w.get('max_tokens_min')}/"
             f"{w.get('max_tokens_median')}/{w.get('max_tokens_max')})"
             + ("; ignore_eos sent" if meta.get("ignore_eos") else "")]
    if w.get("tokens_min") is not None:
        lines.append(f"- prompt lengths in the tokenizer's tokens (without special tokens or a chat template): "
                     f"min/median/max {w['tokens_min']}/{w['tokens_median']}/{w['tokens_max']}")
    slos = meta.get("goodput_slo_ms")
    if slos:
        lines.append("- goodput SLOs: " + ", ".join(f"{k} <= {v:g} ms" for k, v in slos.items())
                     + "; goodput = requests/s meeting all of them (itl: the request's largest gap)")
    return lines


GENERATION_LEGEND = (
    "Times in ms, of successful requests, streamed. TTFT: from sending to the first content event; ITL: "
    "gaps between content events (all requests' gaps pooled); TPOT: (e2e - TTFT) / (output tokens - 1) per "
    "request; e2e: until `data: [DONE]`. Output tokens from the stream's usage (`completion_tokens`); "
    "~ marks counts of content events where a stream had no usage. $/1M out tok = 1e6 / out tok/s x price / 3600.")


def render_report(sweep: dict) -> str:
    steps = sweep["steps"]
    meta = sweep["metadata"]
    machine = meta.get("machine", {})
    lines = [
        "# neuronserve loadtest",
        "",
        f"- url: `{meta['url']}` route `{meta['route']}` ({meta.get('endpoint', '')})",
        f"- model: `{meta.get('model')}`",
        f"- workload: `{meta['workload']['name']}` ({meta['workload']['texts']} texts, words "
        f"min/median/max {meta['workload']['words_min']}/{meta['workload']['words_median']}/"
        f"{meta['workload']['words_max']}), seed {meta.get('seed')}",
        f"- mode: {meta['mode']} sweep {', '.join(format_value(v) for v in meta['values'])}"
        + (f", {meta.get('arrival')} arrivals" if meta["mode"] == "rate" else "")
        + f"; warm-up {meta['warmup_s']:g} s, duration {meta['duration_s']:g} s per step",
        f"- started: {meta['started_at']}; client machine: {machine.get('platform')} "
        f"({machine.get('cpu_count')} CPUs, Python {machine.get('python')})",
    ]
    generation = any(step.get("generation") for step in steps)
    if generation:
        lines += generation_notes(meta)
    if meta.get("slo_p99_ms") is not None and not generation:
        lines.append(f"- SLO: p99 <= {meta['slo_p99_ms']:g} ms; goodput = successful requests/s under it")
    if meta.get("price_per_hour_usd") is not None:
        per = "$/1M out tok = 1e6 / out tok/s" if generation else "$/1M req = 1e6 / achieved/s"
        lines.append(f"- price: ${meta['price_per_hour_usd']:g}/hour from {meta.get('price_source')}; "
                     f"{per} x price / 3600")
    if generation:
        lines += ["", markdown_table(steps), "", GENERATION_LEGEND]
    else:
        lines += ["", markdown_table(steps), "", f"Latencies are of successful requests, in ms. {tokens_note(steps)}"]
    if any(step.get("models") for step in steps):
        lines += ["", "## Per model", "", models_table(steps), "",
                  "Each model's cost is the price apportioned by its share of the step's tokens."]
    notes = (meta.get("notes") or []) + warnings_for(steps)
    if notes:
        lines += ["", "## Warnings", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def models_table(steps: list[dict]) -> str:
    """A row per step and model of a weighted mix: requests, throughput, latency, cost.

    >>> step = {"mode": "concurrency", "value": 8, "models": {"e5": {"succeeded": 80, "achieved_rps": 8.0,
    ...     "latency_ms": {"p50": 3.0, "p99": 9.5}, "share_of_tokens": 0.8, "usd_per_1m_requests": 0.5}}}
    >>> print(models_table([step]).splitlines()[2])
    | c=8 | e5 | 80 | 8.00 | 3.00 | 9.50 | 0.80 | 0.5000 |
    """
    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    rows = ["| step | model | ok | req/s | p50 ms | p99 ms | token share | $/1M req |",
            "|---|---|---|---|---|---|---|---|"]
    for step in steps:
        for name, one in (step.get("models") or {}).items():
            cost = one["usd_per_1m_requests"]
            rows.append(f"| {step_label(step)} | {name} | {one['succeeded']} | {one['achieved_rps']:.2f} | "
                        f"{ms(one['latency_ms']['p50'])} | {ms(one['latency_ms']['p99'])} | "
                        f"{one['share_of_tokens']:.2f} | {'-' if cost is None else f'{cost:.4f}'} |")
    return "\n".join(rows)


# --- comparison ---------------------------------------------------------------------------

def load_result(path: str | Path) -> dict:
    """A sweep.json, or a single step-*.json wrapped as a one-step sweep."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{str(path)!r} is not a loadtest JSON file ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("steps"), list):
        return data
    if isinstance(data, dict) and "mode" in data and "latency_ms" in data:
        return {"metadata": data.get("metadata", {}), "steps": [data]}
    raise UsageError(f"{str(path)!r} is neither a sweep.json nor a step-*.json from neuronserve loadtest")


def _ratio(a, b) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def render_compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Side-by-side table of matching steps; ratios are B/A (for latency and $, < 1 is better)."""
    def key(s):
        return (s["mode"], float(s["value"]))

    steps_a = {key(s): s for s in a["steps"]}
    steps_b = {key(s): s for s in b["steps"]}
    metrics = [
        ("achieved/s", lambda s: s.get("achieved_rps")),
        ("p50 ms", lambda s: s["latency_ms"].get("p50")),
        ("p99 ms", lambda s: s["latency_ms"].get("p99")),
        ("errors", lambda s: s.get("failed")),
        ("$/1M req", lambda s: s.get("usd_per_1m_requests")),
    ]
    if any(s.get("generation") for s in (*a["steps"], *b["steps"])):
        def gen(s):
            return s.get("generation") or {}

        metrics = [
            ("out tok/s", lambda s: gen(s).get("output_tokens_per_s")),
            ("TTFT p50", lambda s: gen(s).get("ttft_ms", {}).get("p50")),
            ("TTFT p99", lambda s: gen(s).get("ttft_ms", {}).get("p99")),
            ("ITL p50", lambda s: gen(s).get("itl_ms", {}).get("p50")),
            ("ITL p99", lambda s: gen(s).get("itl_ms", {}).get("p99")),
            ("errors", lambda s: s.get("failed")),
            ("$/1M out tok", lambda s: gen(s).get("usd_per_1m_output_tokens")),
        ]
    head = ["step"]
    for name, _ in metrics:
        head += [f"{name} A", f"{name} B", "B/A"]
    lines = []
    for label, data in (("A", a), ("B", b)):
        meta = data.get("metadata", {})
        path = name_a if label == "A" else name_b
        lines.append(f"- {label}: `{path}` model `{meta.get('model')}` at `{meta.get('url')}` "
                     f"started {meta.get('started_at')}")
    lines += ["", "| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    common = [k for k in steps_a if k in steps_b]
    for k in sorted(common):
        sa, sb = steps_a[k], steps_b[k]
        cells = [step_label(sa)]
        for name, get in metrics:
            va, vb = get(sa), get(sb)
            digits = 0 if name == "errors" else (4 if name.startswith("$") else 2)
            cells += [_num(va, digits), _num(vb, digits), _ratio(va, vb)]
        lines.append("| " + " | ".join(cells) + " |")
    if not common:
        lines.append("| (no steps in common) |" + " |" * (len(head) - 1))
    only_a = [step_label(steps_a[k]) for k in sorted(steps_a) if k not in steps_b]
    only_b = [step_label(steps_b[k]) for k in sorted(steps_b) if k not in steps_a]
    if only_a or only_b:
        lines.append("")
        if only_a:
            lines.append(f"Only in A: {', '.join(only_a)}")
        if only_b:
            lines.append(f"Only in B: {', '.join(only_b)}")
    lines += ["", "Ratios are B/A: above 1 is better for throughput (achieved/s, out tok/s), below 1 is better for "
              "latency, errors and $."]
    return "\n".join(lines) + "\n"


# --- plots --------------------------------------------------------------------------------

def require_plotting() -> None:
    """Raise MissingExtraError (a LoadtestError: one line, exit 1) unless matplotlib imports; a
    command can call it before a run so a missing extra shows before the load, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtraError(PLOTS_NEED) from None


def _figure(width: float = 7.5, height: float = 4.8):
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_generation_vs_throughput(steps: list[dict], path: Path, title: str) -> None:
    """TTFT and ITL percentiles against output tokens/s, one panel each."""
    fig = _figure(width=9.5)
    ok_steps = [s for s in steps if (s.get("generation") or {}).get("ttft_ms", {}).get("p50") is not None]
    for i, (key, name) in enumerate((("ttft_ms", "time to first token (ms)"), ("itl_ms", "inter-token latency (ms)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        if ok_steps:
            xs = [s["generation"]["output_tokens_per_s"] for s in ok_steps]
            for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
                ax.plot(xs, [s["generation"][key][q] for s in ok_steps], style, label=q)
            for s, x in zip(ok_steps, xs):
                y = s["generation"][key]["p99"]
                if y is not None:
                    ax.annotate(step_label(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            slo = (ok_steps[0].get("generation") or {}).get("goodput_slo_ms") or {}
            limit = slo.get("ttft") if key == "ttft_ms" else slo.get("itl")
            if limit:
                ax.axhline(limit, color="red", linewidth=0.8, linestyle="-.", label=f"SLO {limit:g} ms")
            ax.legend(loc="upper left")
        else:
            ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_latency_vs_throughput(steps: list[dict], path: Path, title: str) -> None:
    if any(s.get("generation") for s in steps):
        plot_generation_vs_throughput(steps, path, title)
        return
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ok_steps = [s for s in steps if s["latency_ms"]["p50"] is not None]
    if ok_steps:
        xs = [s["achieved_rps"] for s in ok_steps]
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [s["latency_ms"][q] for s in ok_steps], style, label=q)
        for s in ok_steps:
            ax.annotate(step_label(s), (s["achieved_rps"], s["latency_ms"]["p99"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        slo = ok_steps[0].get("slo_p99_ms")
        if slo:
            ax.axhline(slo, color="red", linewidth=0.8, linestyle="-.", label=f"SLO {slo:g} ms")
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("achieved throughput (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_latency_cdf(steps: list[dict], latencies: list[list[float]], path: Path, title: str) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    lo, hi = None, None
    for s, lat in zip(steps, latencies):
        if not lat:
            continue
        xs = sorted(lat)
        n = len(xs)
        ys = [(i + 1) / n for i in range(n)]
        ax.step(xs, ys, where="post", label=f"{step_label(s)} (n={n})")
        lo = xs[0] if lo is None else min(lo, xs[0])
        hi = xs[-1] if hi is None else max(hi, xs[-1])
        drawn += 1
    if drawn:
        if lo and hi and lo > 0 and hi / lo > 20:
            ax.set_xscale("log")
        ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
