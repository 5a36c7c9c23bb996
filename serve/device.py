"""The device replica of `--host-processes N`: one process per NeuronCore group, holding the engine,
the batcher and the device's metrics and cost, and no HTTP. Host processes (`serve.app.NeuronServe`
with a `serve.remote.RemoteBatcher`) send it the token rows of many requests per call; it batches
them by bucket with everything else queued, as a lone replica batches its own requests, and answers
each request with its outputs or its error.

Why a second deployment: the Neuron runtime allows one process per NeuronCore, and that process'
event loop could not both answer HTTP and keep a NeuronCore fed on the 2 vCPUs an inf2 gives it per
NeuronCore (docs/host-sizing.md). Stopping: Serve stops routing to every replica of the app at
once; a host process sends its requests' rows as soon as they are tokenized, so every accepted
request is in the device replica's hands (an ongoing call, which it finishes before it stops) well
within its first drain check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import numpy as np
from ray import serve

from neuronserve.serve.errors import NotReady, RequestTimeout, ServeError
from neuronserve.serve.metrics import use_multiproc_dir
from neuronserve.serve.remote import stack_answers
from neuronserve.serve.settings import AppArgs

log = logging.getLogger(__name__)

DEVICE_DEPLOYMENT_NAME = "NeuronDevice"


@serve.deployment(name=DEVICE_DEPLOYMENT_NAME)
class NeuronDevice:
    async def __init__(self, args: dict):
        self.started = time.perf_counter()
        self.args = AppArgs.model_validate(args)
        use_multiproc_dir(self.args.metrics_dir)
        self.loaded: concurrent.futures.Future = concurrent.futures.Future()
        self.served = None
        self.error: str | None = None
        self._ticker: asyncio.Task | None = None
        self._startup = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        from neuronserve.serve.replica import build_models, tick_every_second

        loop = asyncio.get_running_loop()
        try:
            self.served = await loop.run_in_executor(None, build_models, self.args, self.started)
        except Exception as e:
            log.exception("device replica failed to start")
            self.error = str(e)
            self.loaded.set_result(False)
            return
        self.loaded.set_result(True)
        self._ticker = loop.create_task(tick_every_second(self.served))

    async def _wait_ready(self) -> None:
        if not self.loaded.done():
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.loaded)),
                                       timeout=self.args.request_timeout_s)
            except asyncio.TimeoutError:
                raise NotReady("model is still warming up; retry shortly", headers={"Retry-After": "5"}) from None
        if self.error:
            raise NotReady("model failed to load on the device replica; see the server log")

    async def ready(self) -> dict:
        """Waits until every model is loaded and warm; then what the host processes need to know."""
        await self.loaded_or_raise()
        first = self.served.default
        return {"kind": first.engine.backend.kind, "health": first.engine.backend.health(),
                "models": {r.model_name: {"warmup_s": r.warmup_s, "startup_s": r.startup_s, "timings": r.timings}
                           for r in self.served.replicas}}

    async def loaded_or_raise(self) -> None:
        await asyncio.wrap_future(self.loaded)
        if self.error:
            raise RuntimeError(f"the device replica failed to start: {self.error}")

    async def run(self, model: str, requests: list[list[list[int]]]) -> tuple[np.ndarray | None, list]:
        """Each request's rows through `model`'s batcher, all at once; outputs stacked in one array
        (`serve.remote.stack_answers`), and per request its place there or its error."""
        try:
            await self._wait_ready()
            replica = self.served.pick(model)
        except ServeError as e:
            return stack_answers([e] * len(requests))
        timeout = self.args.request_timeout_s

        async def one(rows: list[list[int]]):
            timing: dict = {}
            try:
                outs = await asyncio.wait_for(replica.batcher.submit(rows, timing), timeout=timeout)
            except asyncio.TimeoutError:
                return RequestTimeout(f"request took longer than {timeout:g} s (request_timeout_s)")
            except ServeError as e:
                return e
            return np.stack(outs), timing["queue_s"], timing["inference_s"]

        parts = await asyncio.gather(*(one(rows) for rows in requests))
        return stack_answers(list(parts))

    def reconfigure(self, user_config: dict) -> None:
        self.args = self.args.with_user_config(user_config)
        if self.served is not None:
            self.served.configure(self.args)

    def check_health(self) -> None:
        if self.error:
            raise RuntimeError(f"device replica failed to start: {self.error}")
        problem = self.served.health_problem() if self.served is not None else None
        if problem:
            raise RuntimeError(f"device replica unhealthy: {problem}")

    async def __del__(self):
        models = getattr(self, "served", None)
        if models is not None:
            await asyncio.gather(*(r.batcher.drain(self.args.request_timeout_s) for r in models.replicas))
