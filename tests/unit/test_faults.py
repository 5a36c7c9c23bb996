"""A forward that raises (a device error): its batch's requests answer 500 without internals,
naming their request ids, which the replica's log lines carry with the error; failed batches are
counted; after `max_consecutive_failed_batches` in a row the replica reports unhealthy (Serve's
health check raises, readiness says 503, new requests get 503 + Retry-After) and a good batch
resets the count. Through the real application in this process with a real tiny model, its
backend wrapped by a test double that fails on demand (`tests.fixtures.inprocess_app.FailOnDemand`)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from neuronserve.serve import request_ids
from neuronserve.serve.batcher import Batcher
from neuronserve.serve.metrics import registry
from tests.fixtures.inprocess_app import FailOnDemand, Running, tiny_artifact
from tests.unit.test_batcher import BUCKETS, FakeDevice

LIMIT = 3


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    return {task: tiny_artifact(out, task) for task in ("embed", "classify")}


@pytest.fixture
def running(artifacts, request):
    task = getattr(request, "param", "embed")
    r = Running(artifacts[task], max_consecutive_failed_batches=LIMIT)
    r.device = r.replica.engine.backend = FailOnDemand(r.replica.engine.backend)
    yield r
    r.close()


def failed_batches(model: str) -> float:
    reg = registry()
    return sum(s.value for m in reg.collect() if m.name == "neuronserve_batches_failed"
               for s in m.samples if s.name.endswith("_total") and s.labels["model"] == model)


ROUTES = {
    "embed": [("/v1/embeddings", {"input": ["a", "b c"]}, lambda b: b["error"]["message"]),
              ("/v2/models/tiny-bert-embed/infer",
               {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, lambda b: b["error"])],
    "classify": [("/predict", {"inputs": ["great", "awful"]}, lambda b: b["error"])],
}


@pytest.mark.parametrize("running, route, body, message_of",
                         [(task, *r) for task, rs in ROUTES.items() for r in rs], indirect=["running"],
                         ids=[r[0] for rs in ROUTES.values() for r in rs])
def test_a_failing_forward_answers_500_with_the_request_id_and_no_internals(running, route, body, message_of, caplog):
    model = running.replica.model_name
    before = failed_batches(model)
    running.device.failing = True
    with caplog.at_level(logging.ERROR, logger="neuronserve.serve.batcher"):
        r = running.request("POST", route, json=body, headers={"x-request-id": "dev-fault-7"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "dev-fault-7"
    message = message_of(r.json())
    assert "internal error" in message and "see the server log" in message and "dev-fault-7" in message
    assert FailOnDemand.SECRET not in r.text and "DeviceError" not in r.text
    logged = [rec for rec in caplog.records if "dev-fault-7" in rec.getMessage()]
    assert logged and FailOnDemand.SECRET in str(logged[0].exc_info[1])  # the log says what the client is not told
    assert failed_batches(model) - before >= 1
    running.device.failing = False
    assert running.request("POST", route, json=body).status_code == 200  # the replica still serves


def test_consecutive_failures_make_the_replica_unhealthy_and_a_success_resets_them(running):
    replica, body = running.replica, {"input": "hello"}
    running.device.failing = True
    for _ in range(LIMIT - 1):
        assert running.request("POST", "/v1/embeddings", json=body).status_code == 500
    replica.check_health()  # LIMIT - 1 in a row: still healthy
    assert running.request("GET", "/v2/health/ready").status_code == 200
    running.device.failing = False
    assert running.request("POST", "/v1/embeddings", json=body).status_code == 200  # resets the count
    running.device.failing = True
    for _ in range(LIMIT - 1):
        assert running.request("POST", "/v1/embeddings", json=body).status_code == 500
    replica.check_health()  # not LIMIT in a row: the success in between reset it
    assert running.request("POST", "/v1/embeddings", json=body).status_code == 500  # the LIMIT-th in a row
    with pytest.raises(RuntimeError, match=f"{LIMIT} batches in a row failed"):
        replica.check_health()
    ready = running.request("GET", "/v2/health/ready")
    assert ready.status_code == 503 and "in a row failed" in ready.json()["error"]
    forwards = running.device.forwards
    refused = running.request("POST", "/v1/embeddings", json=body)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "unhealthy" in refused.json()["error"]["message"]
    assert running.device.forwards == forwards  # refused before reaching the device


def test_zero_turns_the_health_rule_off(artifacts):
    running = Running(artifacts["embed"], max_consecutive_failed_batches=0)
    try:
        running.replica.engine.backend = device = FailOnDemand(running.replica.engine.backend)
        device.failing = True
        for _ in range(5):
            assert running.request("POST", "/v1/embeddings", json={"input": "x"}).status_code == 500
        running.replica.check_health()
    finally:
        running.close()


# -- the batcher's side, with a fake device -------------------------------------------------------
def test_the_batcher_counts_failed_batches_in_a_row_and_reports_each(caplog):
    async def scenario():
        device = FakeDevice(fail=True)
        reports = []
        b = Batcher(BUCKETS, device, max_batch_tokens=1024, on_failure=lambda bucket, rows: reports.append((bucket, rows)))
        token = request_ids.set_current("req-a")
        try:
            with pytest.raises(Exception, match="internal error"):
                await b.submit([[1, 2, 3], [4, 5]])
        finally:
            request_ids.reset(token)
        assert b.failed_in_a_row == 1 and [rows for _, rows in reports] == [2]
        with pytest.raises(Exception):
            await b.submit([[7]])
        assert b.failed_in_a_row == 2
        device.fail = False
        await b.submit([[8]])
        assert b.failed_in_a_row == 0 and len(reports) == 2

    with caplog.at_level(logging.ERROR, logger="neuronserve.serve.batcher"):
        asyncio.run(scenario())
    first = caplog.records[0].getMessage()
    assert re.search(r"failed \(1 in a row\); requests: req-a$", first), first
