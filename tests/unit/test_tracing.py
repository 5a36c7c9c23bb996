"""`serve.tracing` with the OpenTelemetry SDK's in-memory exporter: the request's spans, the batch
span's links to the requests it served, W3C traceparent, sampling, and the hooks' behaviour when
tracing is off. No Ray, no HTTP server (tests/integration/test_tracing.py exports over OTLP/HTTP)."""

import asyncio
import sys

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from neuronserve.models.artifact import parse_buckets
from neuronserve.serve import tracing
from neuronserve.serve.batcher import Batcher
from neuronserve.serve.buckets import BucketSet
from neuronserve.serve.settings import AppArgs

BUCKETS = BucketSet(parse_buckets("1x16,4x16,8x16"))
# Device time the same for every bucket: the planner runs whatever is waiting as one batch.
FLAT_TIMINGS = {b: 0.001 for b in BUCKETS.buckets}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class FakeRequest:
    """What `Tracing.begin` reads of a Starlette request."""

    def __init__(self, headers=None, method="POST"):
        self.headers = headers or {}
        self.method = method


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    t = tracing.Tracing(exporter, replica_id="r1", batch=False)
    yield t, exporter
    t.shutdown()


def by_name(spans):
    out = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def device(bucket, rows, layout=None):
    return np.array([[r[0], len(r)] for r in rows], dtype=np.float32)


def failing_device(bucket, rows, layout=None):
    raise RuntimeError("device exploded")


async def traced_request(t: tracing.Tracing, batcher: Batcher, rows, headers=None, route="/v1/embeddings"):
    """One request as the HTTP layer runs it: begin, tokenize, batcher, inferred, serialize, end."""
    import time

    t.begin(route, FakeRequest(headers), "tiny")
    status = 200
    try:
        with tracing.span("tokenize"):
            pass
        submitted, timing = time.perf_counter(), {}
        await batcher.submit(rows, timing)
        t.inferred(submitted, timing, len(rows), sum(map(len, rows)))
        with tracing.span("serialize"):
            pass
    except Exception:
        status = 500
    finally:
        t.end(status)
    return status


def test_off_the_hooks_are_no_ops_and_import_no_sdk():
    assert tracing.setup(None) is None and tracing.setup("") is None
    assert tracing.span("tokenize") is tracing.span("serialize")  # one shared no-op
    assert tracing.current_span_context() is None
    batcher = Batcher(BUCKETS, device, max_batch_tokens=64, timings_s=FLAT_TIMINGS)
    assert batcher.request_context is None and batcher.on_batch_trace is None

    async def run():
        return await batcher.submit([[1, 2, 3]])

    assert asyncio.run(run())[0].tolist() == [1.0, 3.0]


def imported(modules: str, prefix: str) -> list[str]:
    """The modules starting with `prefix` that a fresh interpreter has after importing `modules`."""
    import subprocess

    code = f"import sys; import {modules}; print(sorted(m for m in sys.modules if m.startswith({prefix!r})))"
    return eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_off_nothing_of_opentelemetry_is_imported_by_the_tracing_hooks():
    assert imported("neuronserve.serve.tracing, neuronserve.serve.batcher, neuronserve.serve.settings",
                    "opentelemetry") == []
    # Ray Serve imports parts of the SDK itself; the exporter only comes with tracing on.
    assert imported("neuronserve.serve.app", "opentelemetry.exporter.otlp") == []


def test_a_request_has_a_server_span_with_its_phases_as_children(traced):
    t, exporter = traced
    batcher = Batcher(BUCKETS, device, max_batch_tokens=64, timings_s=FLAT_TIMINGS)
    t.attach(batcher)
    rows = [[101, 5, 6, 102], [101, 7, 102]]
    assert asyncio.run(traced_request(t, batcher, rows, {"x-request-id": "req-42"})) == 200

    spans = by_name(exporter.get_finished_spans())
    server = spans["POST /v1/embeddings"][0]
    assert server.kind == SpanKind.SERVER and server.parent is None
    assert dict(server.attributes) == {
        "http.request.method": "POST", "http.route": "/v1/embeddings", "neuronserve.request_id": "req-42",
        "neuronserve.model": "tiny", "neuronserve.inputs": 2, "neuronserve.tokens": 7,
        "http.response.status_code": 200}
    children = ["tokenize", "queue wait", "inference", "serialize"]
    for name in children:
        (child,) = spans[name]
        assert child.parent.span_id == server.context.span_id and child.context.trace_id == server.context.trace_id
    # In time order, inside the request's span.
    starts = [spans[n][0].start_time for n in children]
    assert starts == sorted(starts) and server.start_time <= starts[0]
    assert spans["queue wait"][0].end_time == spans["inference"][0].start_time
    assert all(spans[n][0].end_time <= server.end_time for n in children)
    assert server.resource.attributes["service.name"] == "neuronserve"
    assert server.resource.attributes["service.instance.id"] == "r1"


def test_a_batch_span_links_to_every_request_it_served(traced):
    t, exporter = traced
    batcher = Batcher(BUCKETS, device, max_batch_tokens=128, timings_s=FLAT_TIMINGS)
    t.attach(batcher)

    async def run():
        # Started together: every request's rows are queued before the batcher's loop takes a batch.
        return await asyncio.gather(traced_request(t, batcher, [[1, 2, 3], [4, 5]]),
                                    traced_request(t, batcher, [[6, 7, 8, 9]]),
                                    traced_request(t, batcher, [[10]]))

    assert asyncio.run(run()) == [200, 200, 200]
    spans = by_name(exporter.get_finished_spans())
    servers = spans["POST /v1/embeddings"]
    (batch,) = spans["batch"]
    assert batch.parent is None and batch.context.trace_id not in {s.context.trace_id for s in servers}
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked == {(s.context.trace_id, s.context.span_id) for s in servers} and len(batch.links) == 3
    assert dict(batch.attributes) == {
        "neuronserve.batch.bucket": "4x16", "neuronserve.batch.rows": 4, "neuronserve.batch.padded_tokens": 64,
        "neuronserve.batch.real_tokens": 10, "neuronserve.batch.packed": False, "neuronserve.batch.requests": 3}
    assert batch.status.status_code == StatusCode.UNSET
    # The batch ran inside every request's inference span.
    for inference in spans["inference"]:
        assert inference.start_time <= batch.start_time + 1_000_000 and batch.end_time <= inference.end_time + 1_000_000


def test_a_request_joins_the_callers_trace_from_traceparent(traced):
    t, exporter = traced
    batcher = Batcher(BUCKETS, device, max_batch_tokens=64, timings_s=FLAT_TIMINGS)
    t.attach(batcher)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    assert asyncio.run(traced_request(t, batcher, [[1, 2]], headers)) == 200
    spans = by_name(exporter.get_finished_spans())
    server = spans["POST /v1/embeddings"][0]
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == PARENT_ID and server.parent.is_remote
    assert {f"{s.context.trace_id:032x}" for s in spans["tokenize"] + spans["queue wait"]} == {TRACE_ID}
    assert [f"{link.context.trace_id:032x}" for link in spans["batch"][0].links] == [TRACE_ID]


def test_a_caller_that_does_not_sample_gets_no_spans_and_its_batch_none(traced):
    t, exporter = traced
    batcher = Batcher(BUCKETS, device, max_batch_tokens=64, timings_s=FLAT_TIMINGS)
    t.attach(batcher)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}  # sampled flag off
    assert asyncio.run(traced_request(t, batcher, [[1, 2]], headers)) == 200
    assert exporter.get_finished_spans() == ()


def test_a_failed_batch_is_an_error_span_and_the_request_a_5xx(traced):
    t, exporter = traced
    batcher = Batcher(BUCKETS, failing_device, max_batch_tokens=64, timings_s=FLAT_TIMINGS)
    t.attach(batcher)
    assert asyncio.run(traced_request(t, batcher, [[1, 2]])) == 500
    spans = by_name(exporter.get_finished_spans())
    (batch,) = spans["batch"]
    assert batch.status.status_code == StatusCode.ERROR and "device exploded" in batch.status.description
    assert [e.name for e in batch.events] == ["exception"]
    server = spans["POST /v1/embeddings"][0]
    assert server.status.status_code == StatusCode.ERROR and server.attributes["http.response.status_code"] == 500
    assert "queue wait" not in spans  # the request never got an answer from the batcher


def test_a_phase_that_raises_is_an_error_span(traced):
    t, exporter = traced
    t.begin("/predict", FakeRequest(), None)
    with pytest.raises(ValueError):
        with tracing.span("tokenize"):
            raise ValueError("input has 700 tokens")
    t.end(400)
    spans = by_name(exporter.get_finished_spans())
    assert spans["tokenize"][0].status.status_code == StatusCode.ERROR
    server = spans["POST /predict"][0]
    assert server.status.status_code == StatusCode.UNSET and server.attributes["http.response.status_code"] == 400
    assert "neuronserve.model" not in server.attributes  # not known yet: not a made-up value
    assert tracing.span("after") is tracing.span("end")  # the request's trace is over


def test_otel_service_name_names_the_service(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "embeddings-eu")
    exporter = InMemorySpanExporter()
    t = tracing.Tracing(exporter, batch=False)
    t.begin("/v1/models", None)
    t.end(200)
    t.shutdown()
    (s,) = exporter.get_finished_spans()
    assert s.name == "GET /v1/models" and s.resource.attributes["service.name"] == "embeddings-eu"


def test_a_ratio_sampler_keeps_batches_of_sampled_requests(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")  # no new trace is sampled ...
    exporter = InMemorySpanExporter()
    t = tracing.Tracing(exporter, batch=False)
    batcher = Batcher(BUCKETS, device, max_batch_tokens=64, timings_s=FLAT_TIMINGS)
    t.attach(batcher)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}  # ... but the caller's sampled one is

    async def run():
        return await asyncio.gather(traced_request(t, batcher, [[1, 2]], headers), traced_request(t, batcher, [[3]]))

    asyncio.run(run())
    t.shutdown()
    spans = by_name(exporter.get_finished_spans())
    assert len(spans["POST /v1/embeddings"]) == 1
    (batch,) = spans["batch"]
    assert [f"{link.context.trace_id:032x}" for link in batch.links] == [TRACE_ID]  # the sampled one only


def test_traces_url_and_setup_need_the_exporter(monkeypatch):
    assert tracing.available()
    monkeypatch.setitem(sys.modules, tracing.EXPORTER_MODULE, None)  # as if the extra were not installed
    assert not tracing.available()
    with pytest.raises(tracing.TracingUnavailable, match=r"pip install 'neuronserve\[tracing\]'"):
        tracing.setup("http://127.0.0.1:4318")


def test_the_setting_wants_a_url_and_the_extra(monkeypatch):
    from pydantic import ValidationError

    assert AppArgs(artifacts="a").otlp_endpoint is None
    assert AppArgs(artifacts="a", otlp_endpoint="http://c:4318").otlp_endpoint == "http://c:4318"
    monkeypatch.setenv("NEURONSERVE_OTLP_ENDPOINT", "https://collector.example:4318")
    assert AppArgs(artifacts="a").otlp_endpoint == "https://collector.example:4318"
    with pytest.raises(ValidationError, match="http:// or https:// URL"):
        AppArgs(artifacts="a", otlp_endpoint="collector:4318")
    monkeypatch.setitem(sys.modules, tracing.EXPORTER_MODULE, None)
    with pytest.raises(ValidationError, match=r"pip install 'neuronserve\[tracing\]'"):
        AppArgs(artifacts="a", otlp_endpoint="http://c:4318")


def test_serve_with_an_endpoint_but_without_the_extra_is_one_line_naming_it(monkeypatch, capsys):
    from neuronserve.cli import main

    monkeypatch.setitem(sys.modules, tracing.EXPORTER_MODULE, None)
    assert main(["serve", "--otlp-endpoint", "http://127.0.0.1:4318"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--otlp-endpoint" in err and "pip install 'neuronserve[tracing]'" in err


# -- through the HTTP layer: serve.app's hooks, on a replica with a stand-in engine and batcher ----
def post(replica, path: str, body: bytes, headers: dict) -> int:
    """One request through the app's FastRoutes (POST /v1/embeddings: the replica's handler); its status."""
    from tests.unit.test_fast_routes import post_embeddings

    assert path == "/v1/embeddings"
    return post_embeddings(replica, body, headers=headers)[0]


def test_the_app_traces_an_embeddings_request_and_its_caller(traced):
    from tests.unit.test_fast_routes import standin_replica

    t, exporter = traced
    replica = standin_replica()
    replica.tracing = t
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "abc"}
    assert post(replica, "/v1/embeddings", b'{"input": ["ab", "abcd"], "model": "tiny"}', headers) == 200
    spans = by_name(exporter.get_finished_spans())
    (server,) = spans["POST /v1/embeddings"]
    assert f"{server.context.trace_id:032x}" == TRACE_ID and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.attributes["neuronserve.request_id"] == "abc" and server.attributes["neuronserve.model"] == "tiny"
    assert server.attributes["neuronserve.inputs"] == 2 and server.attributes["neuronserve.tokens"] == 10
    assert server.attributes["http.response.status_code"] == 200
    for name in ("tokenize", "queue wait", "inference", "serialize"):
        assert spans[name][0].parent.span_id == server.context.span_id
    # The stand-in batcher's timing: 1 ms queued, 2 ms inferring.
    assert spans["queue wait"][0].end_time - spans["queue wait"][0].start_time == 1_000_000
    assert spans["inference"][0].end_time - spans["inference"][0].start_time == 2_000_000


def test_the_app_traces_a_refused_request_with_its_status(traced):
    from tests.unit.test_fast_routes import standin_replica

    t, exporter = traced
    replica = standin_replica()
    replica.tracing = t
    assert post(replica, "/v1/embeddings", b'{"input": "' + b"y" * 30 + b'", "truncate": false}', {}) == 400
    spans = by_name(exporter.get_finished_spans())
    (server,) = spans["POST /v1/embeddings"]
    assert server.attributes["http.response.status_code"] == 400 and "neuronserve.inputs" not in server.attributes
    assert spans["tokenize"][0].status.status_code == StatusCode.ERROR
    assert "queue wait" not in spans and "serialize" not in spans


def test_the_app_without_tracing_sends_no_spans_and_answers_the_same():
    from tests.unit.test_fast_routes import standin_replica

    replica = standin_replica()
    assert replica.tracing is None
    assert post(replica, "/v1/embeddings", b'{"input": ["ab"]}', {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) == 200
    assert tracing.current_span_context() is None


def test_a_request_that_began_before_the_model_was_known_still_names_it(traced):
    # A request that arrives during the warm-up begins its span before the replica knows its model.
    t, exporter = traced
    t.begin("/v1/embeddings", FakeRequest({}), None)
    t.end(200, "tiny")
    (server,) = by_name(exporter.get_finished_spans())["POST /v1/embeddings"]
    assert server.attributes["neuronserve.model"] == "tiny"
