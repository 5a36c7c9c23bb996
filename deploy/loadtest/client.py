"""The load generator: one aiohttp session, closed-loop workers or an open-loop arrival schedule.

The client's CPU per request matters when the generator shares the machine with the server it
measures, so it uses aiohttp (a C HTTP parser), parses responses with orjson and runs the steps
on uvloop where it is installed (`run`).

A request counts in a step if it is *issued* inside the step's measurement window (after the
warm-up); it is timed with time.perf_counter from just before sending until the whole response
body has arrived. The generation routes (chat, completions) stream: each read of the body is
timed as it arrives and fed to `stream.StreamTimeline` (TTFT, inter-token gaps, usage).
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from neuronserve.deploy.loadtest.config import GENERATE_ROUTES, LoadtestError
from neuronserve.deploy.loadtest.schedule import iter_arrival_times
from neuronserve.deploy.loadtest.stats import Generation, StepRecorder
from neuronserve.deploy.loadtest.stream import SSEParser, StreamTimeline

if TYPE_CHECKING:  # pragma: no cover
    import aiohttp

    from neuronserve.deploy.loadtest.workload import Workload


def _failed(rec, kind: str, window_start: float) -> None:
    """Count a request that got no answer (`kind`: the transport error, or 'cancelled')."""
    if rec is not None:
        rec.transport_error(kind)
        rec.last_end_s = max(rec.last_end_s, time.perf_counter() - window_start)


@dataclass
class Target:
    """How to turn a text into a request for one route, and read tokens back from the response."""

    url: str
    route: str
    model: str | None
    ignore_eos: bool = False  # generation: vLLM's extension, so every answer runs to max_tokens

    @property
    def generates(self) -> bool:
        return self.route in GENERATE_ROUTES

    @property
    def path(self) -> str:
        if self.route == "chat":
            return "/v1/chat/completions"
        if self.route == "completions":
            return "/v1/completions"
        if self.route == "embeddings":
            return "/v1/embeddings"
        if self.route == "classify":
            return "/predict"
        if self.route == "rerank":
            return "/v1/rerank"
        if self.route == "sparse":
            return "/embed_sparse"
        return f"/v2/models/{self.model}/infer"

    @property
    def endpoint(self) -> str:
        return self.url + self.path

    def body(self, text: "str | list[str]", max_tokens: int | None = None) -> bytes:
        """One request's body: a text, or a list of texts (one request, several inputs); for the
        generation routes a streamed request for `max_tokens` tokens with usage in the stream."""
        texts = text if isinstance(text, list) else [text]
        if self.generates:
            payload = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}}
            if self.route == "chat":
                payload["messages"] = [{"role": "user", "content": texts[0]}]
            else:
                payload["prompt"] = texts[0]
            if self.ignore_eos:
                payload["ignore_eos"] = True
            return json.dumps(payload).encode()
        if self.route == "embeddings":
            payload: object = {"input": text, "model": self.model}
        elif self.route in ("classify", "sparse"):
            payload = {"inputs": text}
        elif self.route == "rerank":
            # The texts are the documents; the query is the first text's opening words, so queries vary
            # as the workload's texts do.
            payload = {"model": self.model, "query": " ".join(texts[0].split()[:8]), "documents": texts}
        else:
            payload = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        return json.dumps(payload).encode()


def run(coro):
    """`asyncio.run` on uvloop when it is installed (a dependency of this package except on
    Windows): its event loop costs the generator about a third less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def error_kind(exc: BaseException) -> str:
    """A short snake_case name for a failed request: `timeout`, `connect_error`,
    `server_disconnected`, `incomplete_body`, else the exception's class name in snake case."""
    import aiohttp

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server_disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "incomplete_body"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def server_tokens(payload: object) -> int | None:
    """`usage.prompt_tokens` from an OpenAI-shaped response, if present."""
    if isinstance(payload, dict):
        usage = payload.get("usage")
        if isinstance(usage, dict):
            tokens = usage.get("prompt_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
                return tokens
    return None


def make_client(pool_size: int, timeout_s: float, headers: dict[str, str] | None = None) -> "aiohttp.ClientSession":
    """Call inside the running loop. Keep-alive connections, as many as the concurrency: a pool
    smaller than the number of concurrent requests makes requests wait for a connection."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"content-type": "application/json", **(headers or {})},
    )


def _transport_errors() -> tuple:
    import aiohttp

    return (aiohttp.ClientError, OSError, asyncio.TimeoutError)


async def fetch(client: "aiohttp.ClientSession", method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request; returns (status, whole body)."""
    async with client.request(method, url, data=body) as resp:
        return resp.status, await resp.read()


@dataclass
class StreamOutcome:
    """A streamed request: its status, and its timeline when the server answered with a stream."""

    status: int
    content_type: str
    timeline: StreamTimeline | None = None
    body: bytes = b""  # the body of an answer that was not a stream (an error, or JSON)

    @property
    def streamed(self) -> bool:
        return self.timeline is not None


async def fetch_stream(client: "aiohttp.ClientSession", url: str, body: bytes) -> StreamOutcome:
    """One streamed request, each read timed as it arrives. The clock starts just before sending."""
    sent = time.perf_counter()
    async with client.post(url, data=body, headers={"accept": "text/event-stream"}) as resp:
        content_type = resp.headers.get("content-type", "")
        if resp.status != 200 or not content_type.lower().startswith("text/event-stream"):
            return StreamOutcome(resp.status, content_type, body=await resp.read())
        timeline = StreamTimeline(sent_s=sent)
        parser = SSEParser()
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            for event in parser.feed(data):
                timeline.feed(event, now)
        # Read to the end even after [DONE] so the connection goes back to the pool.
        now = time.perf_counter()
        for event in parser.close():
            timeline.feed(event, now)
        timeline.finish(now)
        return StreamOutcome(resp.status, content_type, timeline=timeline)


def as_generation(timeline: StreamTimeline) -> Generation:
    """A finished, successful timeline in the units of the report (ms)."""
    ttft = timeline.ttft_s
    return Generation(e2e_ms=timeline.e2e_s * 1000.0, ttft_ms=None if ttft is None else ttft * 1000.0,
                      itls_ms=tuple(x * 1000.0 for x in timeline.itls_s), output_tokens=timeline.output_tokens,
                      tokens_from_usage=timeline.tokens_from_usage)


def _snippet(content: bytes) -> str:
    """An error body in one line: an OpenAI error's message, else the first 200 characters."""
    try:
        data = json.loads(content)
        message = data.get("error", data).get("message") if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            message = data["error"]
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return content[:200].decode("utf-8", "replace").replace("\n", " ")


def raise_fd_limit(needed: int) -> None:
    """Best effort: a large open-loop pool needs one file descriptor per connection."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = needed + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, ValueError, OSError):
        pass


def _refused(exc: BaseException) -> bool:
    """Whether a connection failure was a refusal, looking down the exception chain."""
    seen = 0
    while exc is not None and seen < 10:  # bounded walk down the exception chain
        if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED,):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _unreachable(url: str, exc: BaseException, timeout_s: float) -> LoadtestError:
    import aiohttp

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return LoadtestError(f"no response from {url} within {timeout_s:g} s; is the server running and healthy?")
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionError)):
        reason = "connection refused" if _refused(exc) else (str(exc) or "connection failed")
        return LoadtestError(f"cannot connect to {url} ({reason}); is the server running?")
    return LoadtestError(f"request to {url} failed ({error_kind(exc)}: {exc}); is the server running?")


def unauthorized(url: str, client: "aiohttp.ClientSession") -> LoadtestError:
    """The one line for a 401: every request of the run would fail the same way."""
    if "Authorization" in client.headers:
        return LoadtestError(f"{url} refused the API key (HTTP 401); check --api-key or $NEURONSERVE_API_KEY")
    return LoadtestError(f"{url} requires an API key (HTTP 401); pass --api-key or set NEURONSERVE_API_KEY")


async def discover_model(client: "aiohttp.ClientSession", url: str, timeout_s: float) -> str:
    """The first model id from GET {url}/v1/models."""
    models_url = url + "/v1/models"
    try:
        status, content = await asyncio.wait_for(fetch(client, "GET", models_url), timeout_s)
    except _transport_errors() as exc:
        raise _unreachable(models_url, exc, timeout_s) from None
    if status == 401:
        raise unauthorized(models_url, client)
    if status != 200:
        raise LoadtestError(
            f"GET {models_url} returned HTTP {status}; pass --model to name the model"
        )
    try:
        data = json.loads(content)["data"]
        model = data[0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LoadtestError(f"GET {models_url} listed no models; pass --model to name the model") from None
    if not isinstance(model, str) or not model:
        raise LoadtestError(f"GET {models_url} returned an empty model id; pass --model")
    return model


async def preflight(client: "aiohttp.ClientSession", target: Target, body: bytes, timeout_s: float) -> str | None:
    """One unrecorded request: fail fast if nothing listens; return a warning for an HTTP error."""
    if target.generates:
        return await preflight_stream(client, target, body, timeout_s)
    try:
        status, content = await asyncio.wait_for(fetch(client, "POST", target.endpoint, body), timeout_s)
    except _transport_errors() as exc:
        raise _unreachable(target.endpoint, exc, timeout_s) from None
    if status == 401:
        raise unauthorized(target.endpoint, client)
    # 429 on one request is ordinary shedding, not a sign the route or model is wrong.
    if status >= 300 and status != 429:
        snippet = content[:200].decode("utf-8", "replace").replace("\n", " ")
        return f"first request to {target.endpoint} returned HTTP {status}: {snippet}"
    return None


async def preflight_stream(client: "aiohttp.ClientSession", target: Target, body: bytes,
                           timeout_s: float) -> str | None:
    """The generation routes' first request: fail fast on a server that does not stream (every
    request would fail alike); a warning for an HTTP error or a broken stream."""
    url = target.endpoint
    try:
        outcome = await asyncio.wait_for(fetch_stream(client, url, body), timeout_s)
    except _transport_errors() as exc:
        raise _unreachable(url, exc, timeout_s) from None
    if outcome.status == 401:
        raise unauthorized(url, client)
    if outcome.status != 200:
        if outcome.status == 429:
            return None
        return f"first request to {url} returned HTTP {outcome.status}: {_snippet(outcome.body)}"
    if not outcome.streamed:
        raise LoadtestError(
            f"POST {url} answered HTTP 200 with Content-Type {outcome.content_type or '(none)'!r}, not a stream of "
            "server-sent events (text/event-stream): the server ignored \"stream\": true, so no time to first "
            "token can be measured; point --url at an OpenAI-compatible server that streams (e.g. vLLM)")
    timeline = outcome.timeline
    kind = timeline.failure()
    if kind == "stream_error":
        return f"first request to {url} failed in its stream: {timeline.error}"
    if kind is not None:
        return (f"first request to {url} gave a broken stream ({kind}: {timeline.content_events} content events, "
                f"[DONE] {'seen' if timeline.done else 'missing'})")
    if not timeline.tokens_from_usage:
        return (f"the stream from {url} carried no usage (stream_options.include_usage ignored): output tokens "
                "are counted as content events, one token each")
    return None


class _Progress:
    """A per-step bar on stderr (tqdm), ticking on wall time; silent when not a terminal."""

    def __init__(self, label: str, total_s: float, enabled: bool | None):
        self._bar = None
        if enabled is False:
            return
        if enabled is None and not sys.stderr.isatty():
            return
        from tqdm import tqdm

        self._bar = tqdm(total=round(total_s, 1), desc=label, unit="s", file=sys.stderr, leave=True,
                         bar_format="{desc}: {bar} {n:.1f}/{total:.1f} s{postfix}", dynamic_ncols=True)

    async def run(self, start: float, warmup_s: float, total_s: float, rec: StepRecorder,
                  stop: asyncio.Event) -> None:
        if self._bar is None:
            return
        # Bounded: at most total/0.25 ticks plus the drain, and it stops on the event.
        for _ in range(int(total_s / 0.25) + 400):
            elapsed = min(time.perf_counter() - start, total_s)
            self._bar.n = round(elapsed, 1)
            phase = "warm-up" if elapsed < warmup_s else "measure"
            self._bar.set_postfix_str(f"{phase} sent={rec.sent} ok={rec.succeeded} err={rec.failed}", refresh=False)
            self._bar.refresh()
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
                break
            except asyncio.TimeoutError:
                continue

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class StepResult:
    recorder: StepRecorder
    cpu_s: float
    wall_s: float
    by_model: dict[str, StepRecorder] | None = None  # a weighted model mix: each model's own record


class StepRunner:
    """Runs one sweep step against a target with a shared client."""

    def __init__(self, client: "aiohttp.ClientSession", target: Target, workload: "Workload", *,
                 timeout_s: float, max_requests: int, progress: bool | None = None, inputs_per_request: int = 1,
                 mix: list[tuple[str, float]] | None = None):
        from dataclasses import replace

        from neuronserve.deploy.loadtest.stats import mix_order

        self.client = client
        self.target = target
        self.workload = workload
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.progress = progress
        self.inputs = inputs_per_request
        # A weighted model mix (--model a=0.8,b=0.2): request i goes to model `_order[i]`, each
        # with its own endpoint and bodies, and is also recorded in that model's `by_model`.
        self.models = [name for name, _ in mix] if mix else [target.model]
        targets = [replace(target, model=name) for name in self.models]
        self._endpoints = [t.endpoint for t in targets]
        self._order = mix_order([w for _, w in mix]) if mix else [0]
        self._model_bodies = [self._bodies_for(t) for t in targets]
        self._bodies = self._model_bodies[0]  # the one model's, without a mix
        self.by_model: dict[str, StepRecorder] | None = None
        self._errors = _transport_errors()

    def _bodies_for(self, target: Target) -> list[bytes]:
        workload, n = self.workload, self.inputs
        if target.generates:
            return [target.body(t, workload.output_tokens(i)) for i, t in enumerate(workload.texts)]
        if n == 1:
            return [target.body(t) for t in workload.texts]
        texts = workload.texts  # request i sends texts i*n .. i*n+n-1 of the pool, as one list
        return [target.body([texts[(i * n + k) % len(texts)] for k in range(n)]) for i in range(len(texts))]

    def _new_step(self) -> StepRecorder:
        self.by_model = {m: StepRecorder() for m in self.models} if len(self.models) > 1 else None
        return StepRecorder()

    async def _one(self, index: int, rec: StepRecorder | None, window_start: float) -> None:
        """Send request `index`; record it only if rec is given (i.e. it was issued in the window)."""
        m = self._order[index % len(self._order)]
        bodies = self._model_bodies[m]
        body = bodies[index % len(bodies)]
        if rec is not None and self.by_model is not None:  # a mix: the model's own record too
            own = self.by_model[self.models[m]]
            own.sent += 1
            rec = _Both(rec, own)
        if self.target.generates:
            await self._one_stream(index, rec, window_start, self._endpoints[m], body)
            return
        t0 = time.perf_counter()
        try:
            status, content = await asyncio.wait_for(fetch(self.client, "POST", self._endpoints[m], body), self.timeout_s)
        except asyncio.CancelledError:
            _failed(rec, "cancelled", window_start)
            raise
        except self._errors as exc:
            _failed(rec, error_kind(exc), window_start)
            return
        t1 = time.perf_counter()
        if rec is None:
            return
        rec.last_end_s = max(rec.last_end_s, t1 - window_start)
        if not 200 <= status < 300:
            rec.http_error(status)
            return
        try:
            payload = orjson.loads(content)
        except ValueError:  # orjson.JSONDecodeError is one
            rec.transport_error("invalid_response_body")
            return
        tokens = server_tokens(payload)
        if tokens is not None:
            rec.ok((t1 - t0) * 1000.0, tokens, True)
        else:
            rec.ok((t1 - t0) * 1000.0, sum(self.workload.estimated_tokens(index * self.inputs + k)
                                           for k in range(self.inputs)), False)

    async def _one_stream(self, index: int, rec, window_start: float, endpoint: str, body: bytes) -> None:
        try:
            outcome = await asyncio.wait_for(fetch_stream(self.client, endpoint, body), self.timeout_s)
        except asyncio.CancelledError:
            _failed(rec, "cancelled", window_start)
            raise
        except self._errors as exc:
            _failed(rec, error_kind(exc), window_start)
            return
        if rec is None:
            return
        rec.last_end_s = max(rec.last_end_s, time.perf_counter() - window_start)
        if not 200 <= outcome.status < 300:
            rec.http_error(outcome.status)
            return
        if not outcome.streamed:
            rec.transport_error("not_streamed")
            return
        timeline = outcome.timeline
        kind = timeline.failure()
        if kind is not None:
            rec.transport_error(kind)
            return
        if timeline.prompt_tokens is not None:
            rec.generated(as_generation(timeline), timeline.prompt_tokens, True)
        else:
            rec.generated(as_generation(timeline), self.workload.estimated_tokens(index), False)

    async def closed_loop(self, concurrency: int, warmup_s: float, duration_s: float, label: str) -> StepResult:
        rec = self._new_step()
        start = time.perf_counter()
        window_start = start + warmup_s
        window_end = window_start + duration_s
        counter = iter(range(10**12))

        async def worker() -> None:
            # Each iteration sends one request; the window end and --max-requests bound it.
            while True:
                now = time.perf_counter()
                if now >= window_end:
                    return
                in_window = now >= window_start
                if in_window:
                    if rec.sent >= self.max_requests:
                        rec.stop_issuing(now - window_start)
                        return
                    rec.sent += 1
                await self._one(next(counter), rec if in_window else None, window_start)

        return await self._run(rec, start, warmup_s, duration_s, label,
                               [worker() for _ in range(int(concurrency))], drain=None)

    async def open_loop(self, rate: float, arrival: str, seed: int, max_outstanding: int,
                        warmup_s: float, duration_s: float, label: str) -> StepResult:
        rec = self._new_step()
        schedule = iter_arrival_times(rate, warmup_s + duration_s, arrival=arrival, seed=seed)
        outstanding: set[asyncio.Task] = set()
        start = time.perf_counter()
        window_start = start + warmup_s

        async def dispatcher() -> None:
            issued_in_window = 0
            for index, due in enumerate(schedule):
                delay = start + due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)  # behind schedule: still let responses be read
                in_window = due >= warmup_s
                if in_window and issued_in_window >= self.max_requests:
                    rec.stop_issuing(time.perf_counter() - window_start)
                    return
                if len(outstanding) >= max_outstanding:
                    # A stalled server must not grow client memory without bound.
                    if in_window:
                        rec.dropped_by_client += 1
                        issued_in_window += 1
                    continue
                if in_window:
                    rec.sent += 1
                    issued_in_window += 1
                    rec.send_lags_ms.append(max(0.0, (time.perf_counter() - start - due) * 1000.0))
                task = asyncio.ensure_future(self._one(index, rec if in_window else None, window_start))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)

        return await self._run(rec, start, warmup_s, duration_s, label, [dispatcher()], drain=outstanding)

    async def _run(self, rec: StepRecorder, start: float, warmup_s: float, duration_s: float, label: str,
                   coros: list, drain: set | None) -> StepResult:
        total_s = warmup_s + duration_s
        cpu0 = time.process_time()
        stop = asyncio.Event()
        progress = _Progress(label, total_s, self.progress)
        ticker = asyncio.ensure_future(progress.run(start, warmup_s, total_s, rec, stop))
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            # Hard bound on the step: the window plus one request timeout plus a margin.
            deadline = total_s + self.timeout_s + 5.0
            done, pending = await asyncio.wait(tasks, timeout=deadline)
            for t in pending:
                t.cancel()
            if drain:
                left = max(0.5, start + deadline - time.perf_counter())
                await asyncio.wait(set(drain), timeout=left)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        finally:
            # Also on Ctrl-C (this task cancelled): no request may outlive the step or the client.
            stragglers = [t for t in (*tasks, *(drain or ())) if not t.done()]
            for t in stragglers:
                t.cancel()
            if stragglers:
                await asyncio.wait(stragglers, timeout=2.0)
            stop.set()
            await asyncio.wait([ticker], timeout=1.0)
            progress.close()
        wall = time.perf_counter() - start
        return StepResult(recorder=rec, cpu_s=time.process_time() - cpu0, wall_s=wall, by_model=self.by_model)


class _Both:
    """Records one request in the step's record and its model's (a weighted mix)."""

    def __init__(self, step: StepRecorder, model: StepRecorder):
        self.step, self.model = step, model

    @property
    def last_end_s(self) -> float:
        return self.step.last_end_s

    @last_end_s.setter
    def last_end_s(self, value: float) -> None:
        self.step.last_end_s = value
        self.model.last_end_s = max(self.model.last_end_s, value)

    def __getattr__(self, name):
        def both(*args):
            getattr(self.step, name)(*args)
            getattr(self.model, name)(*args)

        return both
