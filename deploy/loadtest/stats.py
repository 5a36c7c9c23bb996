"""Percentiles and the per-step summary (pure Python: no numpy needed at import)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of already sorted values (numpy's default method).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    """
    if not sorted_values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


@dataclass(frozen=True)
class Generation:
    """One successful streamed generation, in ms (see `stream.StreamTimeline` for the rules)."""

    e2e_ms: float
    ttft_ms: float | None  # None: no token had content (e.g. only an end-of-sequence token)
    itls_ms: tuple[float, ...]
    output_tokens: int
    tokens_from_usage: bool

    @property
    def tpot_ms(self) -> float | None:
        """(end to end - TTFT) / (output tokens - 1), vLLM's definition; None under two tokens.

        >>> Generation(e2e_ms=500.0, ttft_ms=100.0, itls_ms=(), output_tokens=5, tokens_from_usage=True).tpot_ms
        100.0
        """
        if self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def meets(self, slos: dict[str, float]) -> bool:
        """Whether it meets every SLO (ms): ttft, tpot, e2el, and itl (its largest gap). A metric
        the request has no value for (TPOT of a one-token answer) does not fail it.

        >>> g = Generation(e2e_ms=500.0, ttft_ms=100.0, itls_ms=(90.0, 120.0), output_tokens=3, tokens_from_usage=True)
        >>> g.meets({"ttft": 100, "tpot": 200}), g.meets({"itl": 100}), g.meets({"e2el": 499})
        (True, False, False)
        """
        values = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2el": self.e2e_ms,
                  "itl": max(self.itls_ms) if self.itls_ms else None}
        return all(values[k] is None or values[k] <= limit for k, limit in slos.items())


def distribution(values: list[float]) -> dict:
    """p50/p90/p99, mean and max of values (ms, 2 decimals); all None when empty.

    >>> distribution([10.0, 20.0, 30.0, 40.0])
    {'p50': 25.0, 'p90': 37.0, 'p99': 39.7, 'mean': 25.0, 'max': 40.0}
    """
    xs = sorted(values)
    return {**{f"p{q}": _r(percentile(xs, q)) for q in PERCENTILES},
            "mean": _r(sum(xs) / len(xs)) if xs else None, "max": _r(xs[-1]) if xs else None}


@dataclass
class StepRecorder:
    """Everything measured in one step's window (warm-up traffic never reaches it)."""

    sent: int = 0
    dropped_by_client: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    tokens_server: float = 0.0
    tokens_estimated: float = 0.0
    n_server_tokens: int = 0
    n_estimated_tokens: int = 0
    throttled: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    last_end_s: float = 0.0  # latest completion, seconds after the window start
    send_lags_ms: list[float] = field(default_factory=list)  # open loop: actual send - scheduled time
    stopped_s: float | None = None  # when --max-requests ended issuing early, seconds into the window
    generations: list["Generation"] = field(default_factory=list)  # generation routes: one per success

    def stop_issuing(self, at_s: float) -> None:
        if self.stopped_s is None:
            self.stopped_s = max(at_s, 1e-6)

    def ok(self, latency_ms: float, tokens: float, from_server: bool) -> None:
        self.latencies_ms.append(latency_ms)
        if from_server:
            self.tokens_server += tokens
            self.n_server_tokens += 1
        else:
            self.tokens_estimated += tokens
            self.n_estimated_tokens += 1

    def generated(self, g: "Generation", prompt_tokens: float, prompt_from_server: bool) -> None:
        """A successful streamed generation: its end-to-end latency counts as the request's."""
        self.ok(g.e2e_ms, prompt_tokens, prompt_from_server)
        self.generations.append(g)

    def http_error(self, status: int) -> None:
        if status == 429:
            self.throttled += 1
        else:
            key = str(status)
            self.errors_by_status[key] = self.errors_by_status.get(key, 0) + 1

    def transport_error(self, kind: str) -> None:
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    @property
    def succeeded(self) -> int:
        return len(self.latencies_ms)

    @property
    def failed(self) -> int:
        return self.throttled + sum(self.errors_by_status.values()) + sum(self.errors_by_kind.values())


def cost_per_million(rps: float | None, price_per_hour_usd: float | None) -> float | None:
    """$ per 1M requests (or tokens, given tokens/s) = 1e6 / rps * price_per_hour / 3600.

    >>> round(cost_per_million(100.0, 0.7582), 4)
    2.1061
    """
    if not rps or rps <= 0 or price_per_hour_usd is None:
        return None
    return 1e6 / rps * price_per_hour_usd / 3600.0


def generation_summary(gens: list[Generation], elapsed_s: float, price_per_hour_usd: float | None,
                       goodput: dict[str, float] | None) -> dict:
    """The generation block of a step: TTFT, ITL (every gap of every request), TPOT (one per
    request), output tokens and their rate and cost, and goodput under the per-request SLOs."""
    out_tokens = sum(g.output_tokens for g in gens)
    from_usage = sum(1 for g in gens if g.tokens_from_usage)
    if gens and from_usage == len(gens):
        source = "usage"
    elif from_usage:
        source = "mixed"
    else:
        source = "chunks" if gens else "none"
    out_per_s = out_tokens / elapsed_s
    record = {
        "ttft_ms": distribution([g.ttft_ms for g in gens if g.ttft_ms is not None]),
        "itl_ms": distribution([x for g in gens for x in g.itls_ms]),
        "tpot_ms": distribution([g.tpot_ms for g in gens if g.tpot_ms is not None]),
        "output_tokens": out_tokens,
        "output_tokens_mean": _r(out_tokens / len(gens)) if gens else None,
        "output_tokens_source": source,
        "output_tokens_per_s": round(out_per_s, 2),
        "usd_per_1m_output_tokens": _r(cost_per_million(out_per_s, price_per_hour_usd), 4),
        "goodput_slo_ms": goodput,
        "good_requests": None,
        "goodput_rps": None,
    }
    if goodput:
        good = sum(1 for g in gens if g.meets(goodput))
        record["good_requests"] = good
        record["goodput_rps"] = round(good / elapsed_s, 2)
    return record


def summarize(rec: StepRecorder, *, mode: str, value: float, arrival: str | None, warmup_s: float,
              duration_s: float, slo_p99_ms: float | None, price_per_hour_usd: float | None,
              client_cpu_s: float, client_wall_s: float, generation: bool = False,
              goodput: dict[str, float] | None = None) -> dict:
    """The step's report record (latencies in ms with 2 decimals, rates per second)."""
    lat = sorted(rec.latencies_ms)
    # Requests issued in the window may finish after it; count the time they took. A step cut
    # short by --max-requests issued only until `stopped_s`.
    issue_s = min(duration_s, rec.stopped_s) if rec.stopped_s is not None else duration_s
    elapsed_s = max(issue_s, rec.last_end_s)
    ok = len(lat)
    achieved = ok / elapsed_s
    responses = (ok + rec.throttled + sum(rec.errors_by_status.values())) / elapsed_s
    tokens = rec.tokens_server + rec.tokens_estimated
    if rec.n_server_tokens and not rec.n_estimated_tokens:
        tokens_source = "server"
    elif rec.n_estimated_tokens and not rec.n_server_tokens:
        tokens_source = "estimate"
    elif ok:
        tokens_source = "mixed"
    else:
        tokens_source = "none"
    tokens_per_s = tokens / elapsed_s
    cpu_percent = 100.0 * client_cpu_s / client_wall_s if client_wall_s > 0 else 0.0
    record = {
        "mode": mode,
        "value": value,
        "arrival": arrival if mode == "rate" else None,
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "elapsed_s": round(elapsed_s, 3),
        "target_rps": value if mode == "rate" else None,
        "issue_s": round(issue_s, 3),
        "offered_rps": round((rec.sent + rec.dropped_by_client) / issue_s, 2),
        "sent": rec.sent,
        "succeeded": ok,
        "failed": rec.failed,
        "throttled": rec.throttled,
        "errors_by_status": dict(sorted(rec.errors_by_status.items())),
        "errors_by_kind": dict(sorted(rec.errors_by_kind.items())),
        "dropped_by_client": rec.dropped_by_client,
        "achieved_rps": round(achieved, 2),
        "responses_rps": round(responses, 2),
        "latency_ms": {
            **{f"p{q}": _r(percentile(lat, q)) for q in PERCENTILES},
            "mean": _r(sum(lat) / ok) if ok else None,
            "min": _r(lat[0]) if ok else None,
            "max": _r(lat[-1]) if ok else None,
        },
        # Open loop: how late the client issued requests against the schedule. A large lag means
        # the generator, not the server, limited the offered rate (latency is timed from the send).
        "send_lag_ms": ({"p99": _r(percentile(sorted(rec.send_lags_ms), 99)),
                         "max": _r(max(rec.send_lags_ms))} if rec.send_lags_ms else None),
        "tokens_per_s": round(tokens_per_s, 2),
        "tokens_source": tokens_source,
        "slo_p99_ms": slo_p99_ms,
        "goodput_rps": None,
        "slo_met": None,
        "price_per_hour_usd": price_per_hour_usd,
        "usd_per_1m_requests": _r(cost_per_million(achieved, price_per_hour_usd), 4),
        "usd_per_1m_tokens": _r(cost_per_million(tokens_per_s, price_per_hour_usd), 4),
        "client_cpu_percent": round(cpu_percent, 1),
        "client_saturated": cpu_percent > 80.0,
    }
    if slo_p99_ms is not None:
        within = sum(1 for x in lat if x <= slo_p99_ms)
        record["goodput_rps"] = round(within / elapsed_s, 2)
        p99 = record["latency_ms"]["p99"]
        record["slo_met"] = p99 is not None and p99 <= slo_p99_ms
    if generation:
        # tokens_per_s above counts prompt tokens (the server's usage.prompt_tokens, else words x 1.3).
        record["generation"] = generation_summary(rec.generations, elapsed_s, price_per_hour_usd, goodput)
    return record


def mix_order(weights: list[float], length: int = 1000) -> list[int]:
    """Which model each request of a weighted mix goes to, in a fixed order (smooth weighted round
    robin): every window of requests holds each model in proportion to its weight.

    >>> mix_order([0.75, 0.25], 8)
    [0, 0, 1, 0, 0, 0, 1, 0]
    """
    current = [0.0] * len(weights)
    total = sum(weights)
    order = []
    for _ in range(length):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return order


def model_breakdown(by_model: dict[str, StepRecorder], step: dict, price_per_hour_usd: float | None) -> dict:
    """Per model of a mixed step: its requests, latencies and throughput over the step's elapsed
    time, and its cost: the instance's price apportioned by the model's share of the step's tokens
    (the device work it asked for; the server's own split, by device time, is the
    `neuronserve_cost_allocated_usd_total` series), per 1M of its requests and tokens."""
    elapsed = step["elapsed_s"]
    tokens = {m: r.tokens_server + r.tokens_estimated for m, r in by_model.items()}
    all_tokens = sum(tokens.values())
    out = {}
    for name, rec in by_model.items():
        lat = sorted(rec.latencies_ms)
        ok = len(lat)
        rps = ok / elapsed if elapsed > 0 else 0.0
        share = tokens[name] / all_tokens if all_tokens > 0 else (1.0 / len(by_model))
        price = None if price_per_hour_usd is None else price_per_hour_usd * share
        out[name] = {
            "sent": rec.sent, "succeeded": ok, "failed": rec.failed, "throttled": rec.throttled,
            "achieved_rps": round(rps, 2),
            "latency_ms": {**{f"p{q}": _r(percentile(lat, q)) for q in PERCENTILES},
                           "mean": _r(sum(lat) / ok) if ok else None},
            "tokens_per_s": round(tokens[name] / elapsed, 2) if elapsed > 0 else 0.0,
            "share_of_tokens": round(share, 4),
            "price_per_hour_usd": _r(price, 6),
            "usd_per_1m_requests": _r(cost_per_million(rps, price), 4),
            "usd_per_1m_tokens": _r(cost_per_million(tokens[name] / elapsed if elapsed > 0 else 0.0, price), 4),
        }
    return out


def shares(values: dict[str, float]) -> dict[str, float]:
    """Each key's fraction of the total (all zero: equal shares).

    >>> shares({"a": 3.0, "b": 1.0})
    {'a': 0.75, 'b': 0.25}
    """
    if any(v < 0 for v in values.values()):
        raise ValueError(f"shares of negative values: {values}")
    total = sum(values.values())
    if total <= 0:
        return {k: 1.0 / len(values) for k in values}
    return {k: v / total for k, v in values.items()}


def demand_shares(weights: dict[str, float], device_s_per_request: dict[str, float]) -> dict[str, float]:
    """Each model's share of the device time a weighted mix of requests asks for: its weight (share
    of the requests) times the device seconds one of its requests takes (measured with the model
    served alone), as a fraction of the mix's total. This, not the share of requests or of tokens,
    is what a scheduler fair by device time should give each model when the device is shared
    without waste: a model whose requests cost more needs more of it.

    >>> {m: round(s, 3) for m, s in demand_shares({"embed": 0.9, "rerank": 0.1},
    ...                                           {"embed": 0.002, "rerank": 0.012}).items()}
    {'embed': 0.6, 'rerank': 0.4}
    """
    missing = set(weights) ^ set(device_s_per_request)
    if missing:
        raise ValueError(f"weights and device times name different models: {', '.join(sorted(missing))}")
    return shares({m: weights[m] * device_s_per_request[m] for m in weights})


def share_error(measured: float, demand: float) -> float:
    """How far a measured share is from the demanded one, relative to the demand
    (0.1: 10% of the demand off, either way).

    >>> round(share_error(0.55, 0.5), 3)
    0.1
    """
    if demand <= 0:
        raise ValueError(f"a demand share must be > 0, got {demand}")
    return abs(measured - demand) / demand
