"""A host process' `RemoteBatcher` (`--host-processes`): requests gathered into calls to the device
replica while its calls are out, each request answered with its own rows' outputs or its own error,
a failing device replica counted, and the drain."""

import asyncio

import numpy as np
import pytest

from neuronserve.serve.errors import BackendFailure, Overloaded, RequestTimeout, ServeError
from neuronserve.serve.remote import RemoteBatcher, rebuild_error, stack_answers


class FakeDevice:
    """The device replica's `run`: each row's output is (its length, its first id); rows of a
    request whose first id is 999 get that request a 429. Calls wait on `gate` until released."""

    def __init__(self):
        self.calls: list[list[list[list[int]]]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, model: str, requests):
        self.calls.append(requests)
        await self.gate.wait()
        parts = []
        for rows in requests:
            if rows[0][0] == 999:
                parts.append(Overloaded("device queue full", retry_after_s=2))
            else:
                parts.append((np.array([[len(r), r[0]] for r in rows], np.float32), 0.001, 0.002))
        return stack_answers(parts)


def run(coro):
    return asyncio.run(coro)


def test_requests_waiting_while_calls_are_out_go_in_one_call_and_each_gets_its_own_rows():
    async def main():
        device = FakeDevice()
        device.gate.clear()
        b = RemoteBatcher(device, "m", max_calls=1)
        first = asyncio.ensure_future(b.submit([[1, 2, 3]]))
        await asyncio.sleep(0)  # the first call is out and held
        later = [asyncio.ensure_future(b.submit([[10 + i] * (i + 1), [20 + i]], {})) for i in range(5)]
        await asyncio.sleep(0)
        assert len(device.calls) == 1 and b.queued_rows == 10 and b.inflight_rows == 1
        device.gate.set()
        outs = await asyncio.gather(first, *later)
        return device, b, outs

    device, b, outs = run(main())
    assert [len(c) for c in device.calls] == [1, 5]  # the five that waited went together
    assert b.calls == 2 and b.sent_requests == 6
    assert [o.tolist() for o in outs[0]] == [[3, 1]]
    for i, out in enumerate(outs[1:]):
        assert [o.tolist() for o in out] == [[i + 1, 10 + i], [1, 20 + i]]
    assert b.queued_rows == 0 and b.inflight_rows == 0 and b.calls_out == 0


def test_timing_comes_from_the_device_replica():
    async def main():
        b = RemoteBatcher(FakeDevice(), "m")
        timing: dict = {}
        await b.submit([[5]], timing)
        return timing

    assert run(main()) == {"queue_s": 0.001, "inference_s": 0.002}


def test_an_error_is_the_requests_alone_and_keeps_its_status_and_headers():
    async def main():
        device = FakeDevice()
        device.gate.clear()
        b = RemoteBatcher(device, "m", max_calls=1)
        hold = asyncio.ensure_future(b.submit([[1]]))
        await asyncio.sleep(0)
        ok = asyncio.ensure_future(b.submit([[7, 7]]))
        refused = asyncio.ensure_future(b.submit([[999, 1]]))
        device.gate.set()
        return await asyncio.gather(hold, ok, refused, return_exceptions=True)

    hold, ok, refused = run(main())
    assert [o.tolist() for o in ok] == [[2, 7]]
    assert isinstance(refused, Overloaded) and refused.status == 429 and refused.headers == {"Retry-After": "2"}


def test_a_device_replica_that_cannot_be_reached_fails_its_requests_with_500_and_is_counted():
    async def broken(model, requests):
        raise ConnectionError("actor died")

    async def main():
        b = RemoteBatcher(broken, "m")
        results = await asyncio.gather(b.submit([[1]]), b.submit([[2]]), return_exceptions=True)
        return b, results

    b, results = run(main())
    assert all(isinstance(r, BackendFailure) and r.status == 500 for r in results)
    assert "actor died" not in str(results[0])  # no internals in the answer
    assert b.failed_in_a_row >= 1 and b.calls_out == 0 and b.inflight_rows == 0


def test_a_request_gone_before_its_call_is_not_sent():
    async def main():
        device = FakeDevice()
        device.gate.clear()
        b = RemoteBatcher(device, "m", max_calls=1)
        hold = asyncio.ensure_future(b.submit([[1]]))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(b.submit([[2]]))
        kept = asyncio.ensure_future(b.submit([[3]]))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        device.gate.set()
        await asyncio.gather(hold, kept)
        return device

    device = run(main())
    assert device.calls[1] == [[[3]]]


def test_drain_waits_for_every_answer():
    async def main():
        device = FakeDevice()
        device.gate.clear()
        b = RemoteBatcher(device, "m", max_calls=1)
        pending = [asyncio.ensure_future(b.submit([[i]])) for i in range(1, 4)]
        await asyncio.sleep(0)
        assert not await b.drain(0.05)  # held: not drained
        asyncio.get_running_loop().call_later(0.05, device.gate.set)
        drained = await b.drain(5)
        return drained, all(p.done() for p in pending)

    assert run(main()) == (True, True)


@pytest.mark.parametrize("error", [Overloaded("full", retry_after_s=4), RequestTimeout("slow"),
                                   BackendFailure("failed"), ServeError("plain")])
def test_errors_cross_the_process_boundary_as_plain_values(error):
    import pickle

    _, answers = stack_answers([error])
    back = rebuild_error(pickle.loads(pickle.dumps(answers[0])))
    assert type(back) is type(error) and back.status == error.status
    assert back.message == error.message and back.headers == error.headers
