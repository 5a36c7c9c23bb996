"""Validated settings of one loadtest run, built from argparse values.

Validation happens here rather than in argparse `type=` callbacks so that both the
`neuronserve loadtest` subcommand and the standalone parser report a bad value as one line
(argparse would print its whole multi-line usage first).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROUTES = ("embeddings", "classify", "v2", "rerank", "sparse", "chat", "completions")
# Routes that generate text: streamed, timed token by token (TTFT, ITL), priced per output token.
GENERATE_ROUTES = ("chat", "completions")
# Per-request SLOs `--goodput` accepts, in ms (vLLM `bench serve`'s ttft, tpot and e2el, and itl).
GOODPUT_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_OUTPUT_TOKENS = "128"
ARRIVALS = ("poisson", "constant")
BUILTIN_WORKLOADS = ("short", "mixed", "long")

# The variable the server reads its keys from (comma-separated); the generator sends the first.
API_KEY_ENV = "NEURONSERVE_API_KEY"

# Safety net for "bounded in count" when --max-requests is not given: far above what one
# asyncio client can send in a step, so it only ever stops a runaway loop.
HARD_MAX_REQUESTS_PER_STEP = 2_000_000


class UsageError(Exception):
    """A value the user can fix on the command line (exit code 2)."""


class LoadtestError(Exception):
    """The run could not proceed, e.g. the server is unreachable (exit code 1)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int, *, name: str = "duration", allow_zero: bool = False) -> float:
    """Seconds from `30s`, `2m`, `500ms`, `1h` or plain seconds (`45`, `2.5`).

    >>> parse_duration("500ms"), parse_duration("2m"), parse_duration("7")
    (0.5, 120.0, 7.0)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise UsageError(
                f"{name} {text!r} is not a duration; use e.g. 30s, 2m, 500ms or plain seconds like 45"
            )
        unit = match.group(2).lower() if match.group(2) else None
        seconds = float(match.group(1)) * _UNIT_SECONDS[unit]
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        limit = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"{name} {text!r} must be {limit} seconds")
    return seconds


def parse_values(text: str, *, name: str, integer: bool) -> list[float]:
    """A comma-separated sweep such as `1,8,32` (integers) or `50,100,200` (rates, may be fractional)."""
    values: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part) if integer else float(part)
        except ValueError:
            kind = "whole numbers" if integer else "numbers"
            raise UsageError(f"{name} {text!r}: {part!r} is not a number; give {kind} like 1,8,32") from None
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{name} {text!r}: every value must be > 0 (got {part})")
        values.append(value)
    if not values:
        raise UsageError(f"{name} is empty; give values like 1,8,32")
    return values


def normalise_url(url: str) -> str:
    """Base URL without a trailing slash; an OpenAI-style `.../v1` base is accepted too."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url {url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000")
    base = url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


@dataclass(frozen=True)
class LengthRange:
    """A length distribution: fixed (lo == hi) or uniform over lo..hi inclusive."""

    lo: int
    hi: int

    def sample(self, rng) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def parse_length(text: str, *, name: str, minimum: int = 1) -> LengthRange:
    """`128` (fixed) or `64-512` / `64:512` (uniform, inclusive).

    >>> parse_length("128", name="--output-tokens"), parse_length("64-512", name="--output-tokens")
    (LengthRange(lo=128, hi=128), LengthRange(lo=64, hi=512))
    """
    hint = "give N (fixed) or LO-HI (uniform), e.g. 128 or 64-512"
    parts = re.split(r"\s*[-:]\s*", str(text).strip())
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a length; {hint}") from None
    if len(values) not in (1, 2):
        raise UsageError(f"{name} {text!r} is not a length; {hint}")
    lo, hi = values[0], values[-1]
    if lo < minimum or hi < lo:
        raise UsageError(f"{name} {text!r}: lengths must be >= {minimum} and LO <= HI; {hint}")
    return LengthRange(lo, hi)


def parse_goodput(items: list[str] | None) -> dict[str, float] | None:
    """`--goodput ttft:500 tpot:50`: per-request SLOs in ms (vLLM `bench serve`'s syntax); a request
    is good when it meets all of them.

    >>> parse_goodput(["ttft:500", "tpot:50"])
    {'ttft': 500.0, 'tpot': 50.0}
    """
    if not items:
        return None
    slos: dict[str, float] = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, value = part.strip().partition(":")
            key = key.strip().lower()
            try:
                ms = float(value)
            except ValueError:
                ms = float("nan")
            if not sep or key not in GOODPUT_METRICS or not (ms > 0 and math.isfinite(ms)):
                raise UsageError(f"--goodput {part.strip()!r} is not METRIC:MS with METRIC one of "
                                 f"{', '.join(GOODPUT_METRICS)} and MS > 0, e.g. --goodput ttft:500 tpot:50")
            if key in slos:
                raise UsageError(f"--goodput names {key} twice")
            slos[key] = ms
    return slos or None


@dataclass
class LoadtestConfig:
    url: str
    model: str | None
    route: str
    mode: str  # "concurrency" (closed loop) or "rate" (open loop)
    values: list[float]
    arrival: str
    duration_s: float
    warmup_s: float
    workload: str  # a built-in name or a path
    seed: int
    slo_p99_ms: float | None
    instance_type: str | None
    price_per_hour_usd: float | None
    max_requests: int
    timeout_s: float
    max_outstanding: int
    out: Path
    progress: bool | None = None  # None: only when stderr is a terminal
    api_key: str | None = field(default=None, repr=False)  # sent as a Bearer token; never written out
    inputs_per_request: int = 1
    mix: list[tuple[str, float]] | None = None  # --model a=0.8,b=0.2: each request's model, by weight
    # Generation routes (chat, completions) only:
    prompt_tokens: LengthRange | None = None  # generated prompts of this length instead of --workload's texts
    output_tokens: LengthRange | None = None  # max_tokens of each request (None: a prompt file's own, else 128)
    ignore_eos: bool = False
    goodput: dict[str, float] | None = None
    tokenizer: str | None = None  # sizes --prompt-tokens in this tokenizer's tokens instead of words

    @property
    def generates(self) -> bool:
        return self.route in GENERATE_ROUTES

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def step_name(self, value: float) -> str:
        return f"step-{self.mode}-{format_value(value)}"


def parse_model_mix(text: str | None) -> list[tuple[str, float]] | None:
    """`--model a=0.8,b=0.2`: the models of a weighted mix, weights normalised to sum to 1; a
    plain name (or none) is no mix.

    >>> parse_model_mix("e5=3,bge=1")
    [('e5', 0.75), ('bge', 0.25)]
    >>> parse_model_mix("minilm") is None
    True
    >>> parse_model_mix("a=0.5,a=0.5")
    Traceback (most recent call last):
    ...
    neuronserve.deploy.loadtest.config.UsageError: --model 'a=0.5,a=0.5': model 'a' appears twice; give each model once, e.g. a=0.8,b=0.2
    """
    if not text or "=" not in text:
        return None
    hint = "give each model once, e.g. a=0.8,b=0.2"
    mix: list[tuple[str, float]] = []
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not name.strip() or not w > 0 or w == float("inf"):
            raise UsageError(f"--model {text!r}: {item.strip()!r} is not NAME=WEIGHT with a positive weight; {hint}")
        if name.strip() in {n for n, _ in mix}:
            raise UsageError(f"--model {text!r}: model {name.strip()!r} appears twice; {hint}")
        mix.append((name.strip(), w))
    total = sum(w for _, w in mix)
    return [(n, w / total) for n, w in mix]


def format_value(value: float) -> str:
    """`8` for 8.0, `12.5` for 12.5: used in step names and file names."""
    return f"{value:g}"


def api_key_from(value: str | None, environ=None) -> str | None:
    """The key to send: `--api-key`, else the first of `NEURONSERVE_API_KEY`'s comma-separated keys.

    >>> api_key_from(None, {"NEURONSERVE_API_KEY": " k1 , k2"}), api_key_from("mine", {}), api_key_from(None, {})
    ('k1', 'mine', None)
    """
    environ = os.environ if environ is None else environ
    if value is not None:
        value = value.strip()
        if not value:
            raise UsageError("--api-key is empty; give the key, or leave the flag out")
        return value
    keys = [k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    return keys[0] if keys else None


def config_from_args(args) -> LoadtestConfig:
    """Validate an argparse namespace; raises UsageError with a one-line message."""
    if not getattr(args, "url", None):
        raise UsageError("--url is required (or use --compare A.json B.json)")
    url = normalise_url(args.url)
    if args.route not in ROUTES:
        raise UsageError(f"--route {args.route!r} is not one of {', '.join(ROUTES)}")
    if args.concurrency is not None and args.rate is not None:
        raise UsageError("give either --concurrency (closed loop) or --rate (open loop), not both")
    if args.rate is not None:
        mode, values = "rate", parse_values(args.rate, name="--rate", integer=False)
    else:
        mode = "concurrency"
        values = parse_values(args.concurrency or "1,8,32", name="--concurrency", integer=True)
    if args.arrival not in ARRIVALS:
        raise UsageError(f"--arrival {args.arrival!r} is not one of {', '.join(ARRIVALS)}")
    duration_s = parse_duration(args.duration, name="--duration")
    warmup_s = parse_duration(args.warmup, name="--warmup", allow_zero=True)
    generates = args.route in GENERATE_ROUTES
    timeout = getattr(args, "timeout_s", None)
    if timeout is None:  # a generation takes seconds where an embedding takes milliseconds
        timeout = "300" if generates else "30"
    timeout_s = parse_duration(timeout, name="--timeout-s")
    if args.slo_p99_ms is not None and not args.slo_p99_ms > 0:
        raise UsageError(f"--slo-p99-ms must be > 0 (got {args.slo_p99_ms})")
    if args.instance_type and args.price_per_hour_usd is not None:
        raise UsageError("give either --instance-type or --price-per-hour-usd, not both")
    if args.price_per_hour_usd is not None and not args.price_per_hour_usd > 0:
        raise UsageError(f"--price-per-hour-usd must be > 0 (got {args.price_per_hour_usd})")
    if args.max_requests is not None and args.max_requests <= 0:
        raise UsageError(f"--max-requests must be > 0 (got {args.max_requests})")
    inputs = getattr(args, "inputs_per_request", 1) or 1
    if inputs < 1:
        raise UsageError(f"--inputs-per-request must be >= 1 (got {inputs})")
    if args.max_outstanding is not None and args.max_outstanding <= 0:
        raise UsageError(f"--max-outstanding must be > 0 (got {args.max_outstanding})")
    prompt_tokens = output_tokens = goodput = None
    ignore_eos = bool(getattr(args, "ignore_eos", False))
    if generates:
        if inputs != 1:
            raise UsageError(f"--inputs-per-request {inputs}: --route {args.route} sends one prompt per request")
        if getattr(args, "prompt_tokens", None) is not None:
            prompt_tokens = parse_length(args.prompt_tokens, name="--prompt-tokens")
        if getattr(args, "output_tokens", None) is not None:
            output_tokens = parse_length(args.output_tokens, name="--output-tokens")
        goodput = parse_goodput(getattr(args, "goodput", None))
        if getattr(args, "tokenizer", None) and prompt_tokens is None:
            raise UsageError("--tokenizer sizes the prompts of --prompt-tokens; give --prompt-tokens N or LO-HI too")
        if args.slo_p99_ms is not None:
            raise UsageError(f"--slo-p99-ms is for the encoder routes; for --route {args.route} give per-request SLOs "
                             f"with --goodput, e.g. --goodput e2el:{args.slo_p99_ms:g} ttft:500 tpot:50")
    else:
        given = [flag for flag, value in (("--prompt-tokens", getattr(args, "prompt_tokens", None)),
                                          ("--output-tokens", getattr(args, "output_tokens", None)),
                                          ("--goodput", getattr(args, "goodput", None)),
                                          ("--ignore-eos", ignore_eos or None),
                                          ("--tokenizer", getattr(args, "tokenizer", None))) if value]
        if given:
            raise UsageError(f"{', '.join(given)}: only for the generation routes (--route chat or completions); "
                             f"--route {args.route} sends texts to an encoder")
    workload = args.workload
    if workload not in BUILTIN_WORKLOADS and not Path(workload).is_file():
        raise UsageError(
            f"--workload {workload!r} is neither one of {', '.join(BUILTIN_WORKLOADS)} nor an existing .jsonl file"
        )
    out = Path(args.out) if args.out else None
    if out is None:
        import time

        out = Path(time.strftime("loadtest-%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    mix = parse_model_mix(args.model)
    return LoadtestConfig(
        url=url,
        model=mix[0][0] if mix else args.model,
        mix=mix,
        route=args.route,
        mode=mode,
        values=values,
        arrival=args.arrival,
        duration_s=duration_s,
        warmup_s=warmup_s,
        workload=workload,
        seed=args.seed,
        slo_p99_ms=args.slo_p99_ms,
        instance_type=args.instance_type,
        price_per_hour_usd=args.price_per_hour_usd,
        max_requests=args.max_requests or HARD_MAX_REQUESTS_PER_STEP,
        timeout_s=timeout_s,
        max_outstanding=args.max_outstanding or 1024,
        out=out,
        progress=False if args.no_progress else None,
        api_key=api_key_from(getattr(args, "api_key", None)),
        inputs_per_request=inputs,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        ignore_eos=ignore_eos,
        goodput=goodput,
        tokenizer=getattr(args, "tokenizer", None) if generates else None,
    )
