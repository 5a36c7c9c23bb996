"""The static-batching anchor for generation: plain Ray Serve `@serve.batch` calling transformers'
`generate` on left-padded batches, the way a team serves a causal LM without an LLM engine.

    python benchmarks/static_generate_server.py MODEL_DIR PORT [--max-batch-size 32]
                                                [--batch-wait-s 0.05] [--threads 2] [--batcher serve|fill]

`POST /v1/completions` in OpenAI's shape (prompt text, `max_tokens`, `temperature`, `stream`,
`stream_options.include_usage`, `ignore_eos`), `GET /v1/models`, `GET /stats`. A batch is the
requests that arrived within `--batch-wait-s` (at most `--max-batch-size`); it is padded to its
longest prompt and decoded to its largest `max_tokens` in one `generate` call, and the next batch
starts only when it ends: a request that arrives meanwhile waits, and a short answer's row keeps
being computed until the batch's longest is done. That is what static batching costs. Ray 2.60's
batch queue also cuts the next batch when its wait ends while the previous one still runs (it
queues it behind the running one), so under load with slow batches they stay small: that is
plain `@serve.batch` as written (`--batcher serve`). `--batcher fill` is the static batcher at its
best: one loop that, when a batch ends, takes every request that arrived meanwhile (up to
`--max-batch-size`; when idle it waits `--batch-wait-s` for company after the first), so under
load each batch holds what queued while the previous one generated.

The batch streams: a streamer hands each step's tokens (one per row) to the batch's async
generator, which Serve fans out to the requests (`@serve.batch` over an async generator), so a
request's first token leaves when its batch's prefill ends and its stream closes once it has
its own `max_tokens`. `ignore_eos` runs every row to its `max_tokens`; without it a row that
emits the end-of-sequence token ends there (generate pads it while others go on).
Sampling: greedy at temperature 0, else multinomial at the batch's first request's temperature
(top-k and top-p off, as vLLM's defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("port", type=int)
p.add_argument("--max-batch-size", type=int, default=32)
p.add_argument("--batch-wait-s", type=float, default=0.05)
p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
p.add_argument("--batcher", choices=["serve", "fill"], default="serve",
               help="serve: Ray's @serve.batch; fill: a batch takes everything that queued while the previous one ran")
a = p.parse_args()

from bench_common import serve_until_signalled  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402

api = FastAPI()
NAME = Path(a.model).name


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": a.threads})
@serve.ingress(api)
class StaticGenerate:
    def __init__(self, model: str, threads: int, max_batch_size: int, batch_wait_s: float, batcher: str):
        import torch
        from concurrent.futures import ThreadPoolExecutor

        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.context = self.model.config.max_position_embeddings
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.batcher, self.max_batch_size, self.batch_wait_s = batcher, max_batch_size, batch_wait_s
        self.pending: asyncio.Queue | None = None  # fill: (request, its step queue), taken by _fill_loop
        self.pool = ThreadPoolExecutor(1)  # one generate at a time: the batches are static
        self.stats = {"batches": 0, "rows": 0, "prompt_tokens": 0, "padded_prompt_tokens": 0,
                      "output_tokens": 0, "computed_output_tokens": 0}

    def _generate(self, rows: list[list[int]], max_new: int, temperature: float, ignore_eos: bool, streamer):
        from transformers import GenerationConfig

        torch = self.torch
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=temperature > 0, temperature=temperature or None,
            top_k=None, top_p=None, pad_token_id=pad, bos_token_id=self.tok.bos_token_id,
            eos_token_id=None if ignore_eos else self.tok.eos_token_id)
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[dict]):
        async for out in self._batch_steps(requests):
            yield out

    async def _fill_loop(self):
        """The filling batcher: one batch at a time, each taking every request that queued meanwhile."""
        loop = asyncio.get_running_loop()
        while True:
            queued = not self.pending.empty()  # requests waited while the previous batch ran
            batch = [await self.pending.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                if not self.pending.empty():
                    batch.append(self.pending.get_nowait())
                elif queued or loop.time() >= deadline:
                    break  # under load the queue is taken as it stands; idle, the first waits for company
                else:
                    try:
                        batch.append(await asyncio.wait_for(self.pending.get(), deadline - loop.time()))
                    except asyncio.TimeoutError:
                        break
            open_ = [True] * len(batch)  # a row's stream closes when it has its tokens, not at the batch's end
            try:
                async for out in self._batch_steps([r for r, _ in batch]):
                    for i, ((_, q), item) in enumerate(zip(batch, out)):
                        if open_[i]:
                            open_[i] = item is not StopIteration
                            q.put_nowait(item if open_[i] else None)
            finally:
                for i, (_, q) in enumerate(batch):
                    if open_[i]:
                        q.put_nowait(None)

    async def _filled(self, request: dict):
        if self.pending is None:
            self.pending = asyncio.Queue()
            self._filler = asyncio.ensure_future(self._fill_loop())
        q: asyncio.Queue = asyncio.Queue()
        self.pending.put_nowait((request, q))
        while (item := await q.get()) is not None:
            yield item

    async def _batch_steps(self, requests: list[dict]):
        from transformers.generation.streamers import BaseStreamer

        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        class Steps(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate first hands over the prompt ids
                    self.prompt_seen = True
                    return
                loop.call_soon_threadsafe(steps.put_nowait, value.reshape(-1).tolist())

            def end(self):
                loop.call_soon_threadsafe(steps.put_nowait, None)

        rows = [r["ids"] for r in requests]
        wanted = [r["max_tokens"] for r in requests]
        max_new = max(wanted)
        s = self.stats
        s["batches"] += 1
        s["rows"] += len(rows)
        s["prompt_tokens"] += sum(len(r) for r in rows)
        s["padded_prompt_tokens"] += len(rows) * max(len(r) for r in rows)
        done = asyncio.ensure_future(loop.run_in_executor(
            self.pool, self._generate, rows, max_new, requests[0]["temperature"], requests[0]["ignore_eos"], Steps()))
        sent = [0] * len(rows)
        ended = [False] * len(rows)
        try:
            while (step := await steps.get()) is not None:
                s["computed_output_tokens"] += len(rows)
                out = []
                for i, token in enumerate(step):
                    if ended[i] or sent[i] >= wanted[i]:
                        ended[i] = True
                        out.append(StopIteration)
                        continue
                    sent[i] += 1
                    s["output_tokens"] += 1
                    eos = token == self.tok.eos_token_id and not requests[i]["ignore_eos"]
                    ended[i] = eos
                    out.append((token, "stop" if eos else "length" if sent[i] == wanted[i] else None))
                yield out
        finally:
            await done

    async def _events(self, body: dict, ids: list[int], include_usage: bool):
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = 0
        request = {"ids": ids, "max_tokens": int(body.get("max_tokens", 16)),
                   "temperature": float(body.get("temperature", 1.0)), "ignore_eos": bool(body.get("ignore_eos", False))}
        gen = self._filled(request) if self.batcher == "fill" else self.generate_batch(request)
        async for token, finish in gen:
            n += 1
            text = self.tok.decode([token], skip_special_tokens=True)
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": NAME,
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {"id": rid, "object": "text_completion", "created": created, "model": NAME, "choices": [],
                   "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await request.json()
        ids = self.tok(body["prompt"])["input_ids"]
        max_tokens = int(body.get("max_tokens", 16))
        if len(ids) + max_tokens > self.context:
            return JSONResponse(status_code=400, content={"error": {
                "message": f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the context of "
                           f"{self.context} tokens", "type": "invalid_request_error", "param": "max_tokens",
                "code": "context_length_exceeded"}})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            async def sse():
                async for event in self._events(body, ids, include_usage):
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish, n = "", None, 0
        async for event in self._events(body, ids, False):
            text += event["choices"][0]["text"]
            finish = event["choices"][0]["finish_reason"]
            n += 1
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": NAME, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": NAME, "object": "model", "owned_by": "static-batching"}]}

    @api.get("/stats")
    async def get_stats(self):
        return self.stats


serve_until_signalled(StaticGenerate.bind(a.model, a.threads, a.max_batch_size, a.batch_wait_s, a.batcher),
                      "static-generate", a.port, "static-generate server ready", num_cpus=a.threads)
