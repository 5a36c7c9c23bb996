"""OpenTelemetry tracing of requests and batches; off unless `otlp_endpoint` is set.

Each replica process exports its own spans over OTLP/HTTP (protobuf) through a
BatchSpanProcessor. A request gets a server span (joining the caller's trace when it sends a W3C
`traceparent` header) with children `tokenize`, `queue wait`, `inference` and `serialize`. A batch
serves many requests, so it is a span of its own, `batch`, the root of its own trace, linked
(OpenTelemetry span links) to the server span of every request it served. docs/tracing.md lists
the spans and their attributes.

Off, nothing here imports OpenTelemetry, and the HTTP layer's hooks cost an attribute check each:
`span()` hands back one shared no-op context manager, since no request trace is ever set.

>>> with span("tokenize"):  # no request is being traced: a no-op
...     pass
>>> current_span_context() is None
True
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import time
from typing import Any, Callable

EXTRA_HINT = "pip install 'neuronserve[tracing]'"
EXPORTER_MODULE = "opentelemetry.exporter.otlp.proto.http"
DEFAULT_SERVICE_NAME = "neuronserve"
BATCH_SPAN = "batch"
REQUEST_ID_HEADER = "x-request-id"

# The request being traced in this task (set by `Tracing.begin`, cleared by `Tracing.end`).
_request: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("neuronserve_request_trace",
                                                                                default=None)
_NO_SPAN = contextlib.nullcontext()


class TracingUnavailable(RuntimeError):
    """`otlp_endpoint` is set but the OTLP exporter is not installed."""


def available() -> bool:
    """Whether the OTLP/HTTP exporter (the `tracing` extra) is installed, without importing it."""
    try:
        return importlib.util.find_spec(EXPORTER_MODULE) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector: a base URL gets the standard `/v1/traces` path.

    >>> traces_url("http://collector:4318")
    'http://collector:4318/v1/traces'
    >>> traces_url("http://collector:4318/v1/traces")
    'http://collector:4318/v1/traces'
    """
    url = endpoint.rstrip("/")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


def span(name: str):
    """A child span of the request being traced in this task, as a context manager; a shared no-op
    when none is (tracing off, or outside a request)."""
    rt = _request.get()
    return _NO_SPAN if rt is None else rt.child(name)


def current_span_context():
    """The server span's context of the request being traced in this task (what a batch links
    to), or None. The batcher keeps it on the request's rows (`Batcher.request_context`)."""
    rt = _request.get()
    return None if rt is None else rt.span_context


def setup(endpoint: str | None, replica_id: str | None = None) -> Tracing | None:
    """A replica's tracing from its `otlp_endpoint` setting: None when unset (tracing off)."""
    if not endpoint:
        return None
    if not available():
        raise TracingUnavailable(f"otlp_endpoint is set ({endpoint}) but the OpenTelemetry OTLP exporter is not "
                                 f"installed: {EXTRA_HINT}")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return Tracing(OTLPSpanExporter(endpoint=traces_url(endpoint)), replica_id=replica_id)


class Tracing:
    """One replica's tracer provider, exporter and processor, and the hooks the HTTP layer and the
    batcher call. `batch=False` exports each span as it ends (tests); serving batches them.

    The sampler is the SDK's (OTEL_TRACES_SAMPLER; default: parent-based, always on), except for
    batch spans, which are kept whenever one of the requests they link to was sampled."""

    def __init__(self, exporter, *, replica_id: str | None = None, batch: bool = True):
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.instance.id": replica_id or str(os.getpid())})
        # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins; else ours, not the
        # SDK's "unknown_service:python".
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=True)
        self.provider.sampler = _batches_follow_requests(self.provider.sampler)
        self.provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("neuronserve.serve")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._root = otel_context.Context()  # an empty context: batch spans start their own trace

    # -- requests (the HTTP layer) ----------------------------------------------------------------
    def begin(self, route: str, request=None, model: str | None = None) -> RequestTrace:
        """Start the server span of a request and make it this task's request trace."""
        headers = request.headers if request is not None else {}
        method = request.method if request is not None else "GET"
        attributes: dict[str, Any] = {"http.request.method": method, "http.route": route}
        # The caller's request id; the header for now (docs/tracing.md).
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id:
            attributes["neuronserve.request_id"] = request_id
        if model:
            attributes["neuronserve.model"] = model
        parent = self._propagator.extract(headers)  # W3C traceparent/tracestate; none: a new trace
        server = self._trace.SpanKind.SERVER
        s = self.tracer.start_span(f"{method} {route}", context=parent, kind=server, attributes=attributes)
        rt = RequestTrace(self, s)
        _request.set(rt)
        return rt

    def end(self, status: int, model: str | None = None) -> None:
        """End this task's request span with the response status (5xx marks it an error), and the
        model when the span began before it was known (a request that waited for the warm-up)."""
        rt = _request.get()
        if rt is None:
            return
        _request.set(None)
        rt.span.set_attribute("http.response.status_code", status)
        if model:
            rt.span.set_attribute("neuronserve.model", model)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            rt.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        rt.span.end()

    def inferred(self, submitted: float, timing: dict, inputs: int, tokens: int) -> None:
        """After the batcher answered this task's request: its `queue wait` and `inference` spans
        (from `submitted`, a `time.perf_counter()`, and the batcher's `timing`), and the request's
        input and token counts."""
        rt = _request.get()
        if rt is None:
            return
        rt.span.set_attributes({"neuronserve.inputs": inputs, "neuronserve.tokens": tokens})
        start = to_epoch_ns(submitted)
        started = start + int(timing["queue_s"] * 1e9)
        finished = started + int(timing["inference_s"] * 1e9)
        for name, t0, t1 in (("queue wait", start, started), ("inference", started, finished)):
            self.tracer.start_span(name, context=rt.context, start_time=t0).end(end_time=t1)

    # -- batches (the batcher) --------------------------------------------------------------------
    def attach(self, batcher) -> None:
        """Hook into a batcher: its rows keep their request's span context, and each finished
        batch becomes a span linked to those."""
        batcher.request_context = current_span_context
        batcher.on_batch_trace = self.batch_recorder(batcher.clock)

    def batch_recorder(self, clock: Callable[[], float] = time.perf_counter):
        """The batcher's `on_batch_trace` hook: (batch, rows, started, finished, error), times on `clock`."""

        def record(batch, rows, started: float, finished: float, error: BaseException | None) -> None:
            self.record_batch(batch, rows, to_epoch_ns(started, clock), to_epoch_ns(finished, clock), error)

        return record

    def record_batch(self, batch, rows, start_ns: int, end_ns: int, error: BaseException | None = None) -> None:
        """A finished batch's span, linked once to each sampled request it served (none: no span)."""
        from opentelemetry.trace import Link, Status, StatusCode

        served = {}
        for r in rows:
            ctx = r.trace
            if ctx is not None and ctx.trace_flags.sampled:
                served[(ctx.trace_id, ctx.span_id)] = ctx
        if not served:
            return
        bucket = batch.bucket
        attributes = {"neuronserve.batch.bucket": str(bucket), "neuronserve.batch.rows": len(rows),
                      "neuronserve.batch.padded_tokens": bucket.padded_tokens,
                      "neuronserve.batch.real_tokens": sum(len(r.ids) for r in rows),
                      "neuronserve.batch.packed": bool(batch.packed), "neuronserve.batch.requests": len(served)}
        s = self.tracer.start_span(BATCH_SPAN, context=self._root, links=[Link(c) for c in served.values()],
                                   attributes=attributes, start_time=start_ns)
        if error is not None:
            s.record_exception(error)
            s.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        s.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Export what is still buffered and stop (blocking: up to the exporter's timeout)."""
        self.provider.shutdown()


class RequestTrace:
    """One request's server span, and how its children find it."""

    __slots__ = ("tracing", "span", "context", "span_context")

    def __init__(self, tracing: Tracing, server_span):
        self.tracing = tracing
        self.span = server_span
        self.context = tracing._trace.set_span_in_context(server_span)
        self.span_context = server_span.get_span_context()

    @contextlib.contextmanager
    def child(self, name: str):
        s = self.tracing.tracer.start_span(name, context=self.context)
        try:
            yield s
        except BaseException as e:
            from opentelemetry.trace import Status, StatusCode

            s.record_exception(e)
            s.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise
        finally:
            s.end()


def to_epoch_ns(t: float, clock: Callable[[], float] = time.perf_counter) -> int:
    """A time on `clock` as Unix nanoseconds (what span times are), by how long ago it was.

    >>> abs(to_epoch_ns(time.perf_counter()) - time.time_ns()) < 1e9
    True
    """
    return time.time_ns() - int((clock() - t) * 1e9)


def _batches_follow_requests(inner):
    """`inner` (the SDK's sampler) for every span but batch spans, which are only started when a
    request they link to was sampled (`Tracing.record_batch`), so are kept."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class BatchesFollowRequests(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):
            if name == BATCH_SPAN and links:
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"BatchesFollowRequests{{{inner.get_description()}}}"

    return BatchesFollowRequests()
