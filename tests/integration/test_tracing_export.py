"""Tracing exported for real: the OpenTelemetry SDK's OTLP/HTTP exporter sends protobuf to a
receiver on loopback (tests/fixtures/otlp_receiver.py), first from `serve.tracing` in this process,
then from the replicas of a real `neuronserve serve --otlp-endpoint`."""

import asyncio
import concurrent.futures as cf
import signal

import httpx
import pytest

from neuronserve.serve import tracing
from neuronserve.serve.batcher import Batcher
from tests.fixtures.otlp_receiver import OtlpReceiver
from tests.integration.conftest import free_port, start_server, stop_server
from tests.unit.test_tracing import BUCKETS, FLAT_TIMINGS, device, traced_request

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
PHASES = ("tokenize", "queue wait", "inference", "serialize")


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def test_spans_reach_an_otlp_http_receiver_as_protobuf(receiver):
    t = tracing.setup(receiver.url, replica_id="replica-a")  # the exporter and BatchSpanProcessor serving uses
    batcher = Batcher(BUCKETS, device, max_batch_tokens=128, timings_s=FLAT_TIMINGS)
    t.attach(batcher)

    async def run():
        return await asyncio.gather(traced_request(t, batcher, [[1, 2, 3]], {"x-request-id": "one"}),
                                    traced_request(t, batcher, [[4, 5]], {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}))

    assert asyncio.run(run()) == [200, 200]
    t.shutdown()  # exports what the batch processor holds
    spans = receiver.received()
    assert receiver.errors == [] and receiver.requests >= 1
    servers = [s for s in spans if s.name == "POST /v1/embeddings"]
    (batch,) = [s for s in spans if s.name == "batch"]
    assert len(servers) == 2 and all(s.kind == "SPAN_KIND_SERVER" for s in servers)
    assert set(batch.links) == {(s.trace_id, s.span_id) for s in servers}
    assert batch.attributes["neuronserve.batch.rows"] == 2 and batch.attributes["neuronserve.batch.real_tokens"] == 5
    joined = [s for s in servers if s.trace_id == TRACE_ID]
    assert len(joined) == 1 and joined[0].parent_span_id == CALLER_SPAN
    assert {s.attributes.get("neuronserve.request_id") for s in servers} == {"one", None}
    assert batch.resource["service.name"] == "neuronserve" and batch.resource["service.instance.id"] == "replica-a"


def test_neuronserve_serve_traces_requests_and_the_batch_they_shared(minilm_artifact, receiver, monkeypatch):
    # Read by the replicas' SDK: its service name, and an export delay far longer than the test, so
    # the spans arrive only because a stopping replica sends what it still holds.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "neuronserve-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    port, mport = free_port(), free_port()
    # One replica, one batch at a time, and rows wait up to 400 ms for a fuller batch: requests sent
    # together share a batch.
    proc, out, stderr = start_server(minilm_artifact, port, mport, "--otlp-endpoint", receiver.url, "--replicas", "1",
                                     "--max-concurrent-batches", "1", "--batch-wait-ms", "400")
    try:
        url = f"http://127.0.0.1:{port}"
        texts = ["a slow request", "another one", "and a third"]
        headers = [{"x-request-id": "req-0", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
                   {"x-request-id": "req-1"}, {"x-request-id": "req-2"}]
        with httpx.Client(timeout=60) as client, cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client.post, url + "/v1/embeddings", json={"input": [text]}, headers=h)
                       for text, h in zip(texts, headers)]
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 3
        # The other traced routes: the model list, and KServe v2 inference.
        assert httpx.get(url + "/v1/models", headers={"x-request-id": "models"}, timeout=30).status_code == 200
        v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["v2 text"]}]}
        assert httpx.post(url + "/v2/models/all-MiniLM-L6-v2/infer", json=v2, headers={"x-request-id": "v2"},
                          timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)  # drains, then each replica flushes its spans
        assert proc.wait(timeout=90) == 0

        def complete(spans):
            ids = {s.attributes.get("neuronserve.request_id") for s in spans if s.name == "POST /v1/embeddings"}
            return {"req-0", "req-1", "req-2"} <= ids and sum(s.name == "batch" for s in spans) >= 1 and \
                {"GET /v1/models", "POST /v2/infer"} <= {s.name for s in spans}

        spans = receiver.wait_for(complete, timeout_s=5)
        servers = {s.attributes["neuronserve.request_id"]: s for s in spans
                   if s.name == "POST /v1/embeddings" and s.attributes.get("neuronserve.request_id")}
        # The caller's trace is joined; the others start their own.
        assert servers["req-0"].trace_id == TRACE_ID and servers["req-0"].parent_span_id == CALLER_SPAN
        assert servers["req-1"].trace_id != TRACE_ID and servers["req-1"].parent_span_id == ""
        for rid, server in servers.items():
            assert server.kind == "SPAN_KIND_SERVER" and server.status != "STATUS_CODE_ERROR"
            assert server.attributes["http.route"] == "/v1/embeddings"
            assert server.attributes["http.response.status_code"] == 200
            assert server.attributes["neuronserve.model"] == "all-MiniLM-L6-v2"
            assert server.attributes["neuronserve.inputs"] == 1 and server.attributes["neuronserve.tokens"] >= 3
            assert server.resource["service.name"] == "neuronserve-test"
            children = {s.name: s for s in spans if s.parent_span_id == server.span_id}
            assert set(children) == set(PHASES), (rid, sorted(children))
            assert all(c.trace_id == server.trace_id for c in children.values())
            assert server.start_ns <= children["tokenize"].start_ns <= children["queue wait"].start_ns
            assert children["serialize"].end_ns <= server.end_ns
        # One batch served all three (the 400 ms wait gathered them), linked to each request's span.
        batches = [s for s in spans if s.name == "batch" and len(s.links) == 3]
        assert len(batches) == 1, [(s.attributes, s.links) for s in spans if s.name == "batch"]
        batch = batches[0]
        assert set(batch.links) == {(s.trace_id, s.span_id) for s in servers.values()}
        assert batch.parent_span_id == "" and batch.trace_id not in {s.trace_id for s in servers.values()}
        assert batch.attributes["neuronserve.batch.rows"] == 3 and batch.attributes["neuronserve.batch.requests"] == 3
        assert batch.attributes["neuronserve.batch.real_tokens"] == sum(s.attributes["neuronserve.tokens"]
                                                                        for s in servers.values())
        assert batch.attributes["neuronserve.batch.padded_tokens"] >= batch.attributes["neuronserve.batch.real_tokens"]
        assert batch.attributes["neuronserve.batch.bucket"]
        others = {s.attributes.get("neuronserve.request_id"): s for s in spans if s.name in ("GET /v1/models", "POST /v2/infer")}
        assert others["models"].attributes["http.response.status_code"] == 200
        assert others["v2"].attributes["neuronserve.inputs"] == 1
        assert {s.name for s in spans if s.parent_span_id == others["v2"].span_id} == set(PHASES)
        assert receiver.errors == []
    finally:
        stop_server(proc)
