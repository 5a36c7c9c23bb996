"""The host processes' side of a device replica: token rows go to it in bulk, answers come back.

With `--host-processes N` (device backends: Neuron, simulated) each NeuronCore group is held by one
device replica (`serve.device.NeuronDevice`: the engine, batcher and device metrics, one process
per NeuronCore as the Neuron runtime requires) and HTTP is answered by N host processes per device
replica (`serve.app.NeuronServe`): they parse, check, tokenize and encode responses in parallel,
on as many host CPUs, and hand token rows to the device replica here.

`RemoteBatcher` stands where a host process would otherwise have its `Batcher` (the same
`submit(rows, timing)`): requests submitted while the device replica is busy with this process'
earlier calls wait here and go together in one call (at most `max_calls` in flight), so the
per-call cost of Ray (a few hundred microseconds on each side) is paid per group, not per request.
The device replica batches rows from every host process by bucket, as one replica would. Its
answer is per request: outputs, or the error the request alone gets (a full queue is a 429 for
the requests that did not fit, as before).

Nothing here knows Ray: `call(model, requests)` is an async function (the app binds it to the
device deployment's handle).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from neuronserve.serve import errors
from neuronserve.serve.errors import BackendFailure, ServeError

log = logging.getLogger(__name__)

# One request's answer from the device replica: ("ok", first row, rows, queue_s, inference_s) into
# the call's stacked outputs, or ("error", class name, message, headers).
Answer = tuple
Call = Callable[[str, list[list[list[int]]]], Awaitable[tuple[np.ndarray | None, list[Answer]]]]


def answer_error(e: ServeError) -> Answer:
    """A request's error as the device replica sends it back (plain values: any Ray worker reads them)."""
    return ("error", type(e).__name__, e.message, dict(e.headers))


def rebuild_error(answer: Answer) -> ServeError:
    """The `ServeError` a device replica's answer names: its class (status), message and headers.

    >>> e = rebuild_error(answer_error(errors.Overloaded("queue full", retry_after_s=3)))
    >>> type(e).__name__, e.status, e.message, e.headers
    ('Overloaded', 429, 'queue full', {'Retry-After': '3'})
    >>> rebuild_error(("error", "Unheard", "odd", {})).status
    500
    """
    _, name, message, headers = answer
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ServeError)):
        cls = ServeError
    e = cls.__new__(cls)
    ServeError.__init__(e, message, headers=headers)
    return e


def stack_answers(parts: list[tuple[np.ndarray, float, float] | ServeError]) -> tuple[np.ndarray | None, list[Answer]]:
    """The device replica's reply to one call: every request's outputs in one array (one buffer to
    send instead of one per request) and each request's place in it, or its error.

    >>> out, answers = stack_answers([(np.ones((2, 3), np.float32), 0.001, 0.002),
    ...                               errors.Overloaded("full", retry_after_s=1),
    ...                               (np.zeros((1, 3), np.float32), 0.0, 0.003)])
    >>> out.shape, answers[0], answers[1][:2], answers[2]
    ((3, 3), ('ok', 0, 2, 0.001, 0.002), ('error', 'Overloaded'), ('ok', 2, 1, 0.0, 0.003))
    """
    arrays, answers, at = [], [], 0
    for part in parts:
        if isinstance(part, ServeError):
            answers.append(answer_error(part))
            continue
        out, queue_s, inference_s = part
        arrays.append(out)
        answers.append(("ok", at, len(out), queue_s, inference_s))
        at += len(out)
    return (np.concatenate(arrays) if arrays else None), answers


@dataclass(eq=False)
class _Waiting:
    rows: list[list[int]]
    future: asyncio.Future
    timing: dict | None


class RemoteBatcher:
    """A host process' stand-in for a `Batcher`: `submit` sends the rows to the device replica
    (gathered with other requests' while `max_calls` calls are out) and returns their outputs."""

    def __init__(self, call: Call, model: str, *, max_calls: int = 2):
        self.call = call
        self.model = model
        self.max_calls = max_calls
        self.waiting: list[_Waiting] = []
        self.calls_out = 0
        self.queued_rows = 0  # waiting here, not yet sent
        self.inflight_rows = 0  # sent, not yet answered
        self.failed_in_a_row = 0  # calls that failed (the device replica unreachable) since one did not
        self.calls = 0  # calls made (how well requests were gathered)
        self.sent_requests = 0  # requests those calls carried
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, rows: list[list[int]], timing: dict | None = None) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        item = _Waiting(rows, loop.create_future(), timing)
        self.waiting.append(item)
        self.queued_rows += len(rows)
        self._send(loop)
        return await item.future

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.waiting and self.calls_out < self.max_calls:
            group, self.waiting = self.waiting, []
            # A request whose client left (or timed out) before its call goes is not sent.
            group = [w for w in group if not w.future.done()]
            rows = sum(len(w.rows) for w in group)
            self.queued_rows = sum(len(w.rows) for w in self.waiting)
            if not group:
                continue
            self.calls_out += 1
            self.inflight_rows += rows
            self.calls += 1
            self.sent_requests += len(group)
            task = loop.create_task(self._run(group, rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[_Waiting], rows: int) -> None:
        try:
            out, answers = await self.call(self.model, [w.rows for w in group])
        except asyncio.CancelledError:
            self._fail(group, BackendFailure("the device replica's call was cancelled"))
            raise
        except ServeError as e:
            self._fail(group, e)
        except Exception as e:  # the device replica died or cannot be reached
            self.failed_in_a_row += 1
            log.error("call to the device replica failed (%d requests): %s", len(group), e)
            self._fail(group, BackendFailure("the device replica failed; see the server log"))
        else:
            self.failed_in_a_row = 0
            for w, answer in zip(group, answers):
                if w.future.done():
                    continue
                if answer[0] == "ok":
                    _, at, n, queue_s, inference_s = answer
                    if w.timing is not None:
                        w.timing["queue_s"], w.timing["inference_s"] = queue_s, inference_s
                    w.future.set_result(list(out[at:at + n]))
                else:
                    w.future.set_exception(rebuild_error(answer))
        finally:
            self.calls_out -= 1
            self.inflight_rows -= rows
            self._send(asyncio.get_running_loop())

    @staticmethod
    def _fail(group: list[_Waiting], e: ServeError) -> None:
        for w in group:
            if not w.future.done():
                w.future.set_exception(e)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every request submitted here is answered (graceful shutdown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.waiting or self.calls_out) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self.waiting and not self.calls_out

    def configure(self, *_args, **_kwargs) -> None:
        """Batching knobs are the device replica's (it gets the same user_config)."""
