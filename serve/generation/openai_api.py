"""OpenAI's completions and chat completions over a `GenerationEngine`: POST /v1/completions,
POST /v1/chat/completions (the chat template from the model's tokenizer), GET /v1/models.

Streaming is server-sent events, one chunk per engine step, `data: [DONE]` last; with
`stream_options.include_usage` a last chunk with empty `choices` carries the usage. Errors have
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) and their status.

Extensions (as vLLM's own server takes them, through the `openai` client's `extra_body`):
`ignore_eos`, `min_tokens`, and `return_token_ids` (each choice also carries `token_ids`, the
generated ids: what token-for-token comparisons need).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuronserve.serve.errors import BadRequest, InputError, NotFound, ServeError
from neuronserve.serve.generation.engine import GenerationEngine, Sampling
from neuronserve.serve.protocols import openai as openai_protocol


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="must name the served model")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = Field(1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16")
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None


def error_body(e: ServeError) -> bytes:
    """OpenAI's error shape (`serve.protocols.openai.error_body`, the encoders' too), as JSON.

    >>> error_body(NotFound("no model x", param="model", code="model_not_found"))
    b'{"error":{"message":"no model x","type":"not_found_error","param":"model","code":"model_not_found"}}'
    """
    return orjson.dumps(openai_protocol.error_body(e))


def parse(cls: type[BaseModel], body: bytes) -> Any:
    """The request from its JSON body, or a 400 naming the first field at fault.

    >>> parse(ChatRequest, b'{"model": "m", "messages": []}')
    Traceback (most recent call last):
    ...
    neuronserve.serve.errors.BadRequest: messages: List should have at least 1 item after validation, not 0
    """
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-after", "str", "list[")))
        param = str(first["loc"][0]) if first["loc"] else None
        raise BadRequest(f"{where}: {first['msg']}" if where else first["msg"], param=param) from None


def _response_id(kind: str) -> str:
    """A new response id, prefixed as OpenAI's are for `kind` (completion or chat)."""
    return f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"


def _usage(prompt: int, output: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


class OpenAIGeneration:
    """The protocol over one engine serving one model under `model_name`."""

    def __init__(self, engine: GenerationEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "neuronserve", "max_model_len": self.engine.max_model_len}]}

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise NotFound(f"model {model!r} is not served here; this server serves {self.model_name!r} "
                           "(GET /v1/models lists it)", param="model", code="model_not_found")

    @staticmethod
    def _sampling(r: _Sampling, max_tokens: int) -> Sampling:
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        return Sampling(max_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed, stop=stop,
                        ignore_eos=r.ignore_eos, min_tokens=r.min_tokens, presence_penalty=r.presence_penalty,
                        frequency_penalty=r.frequency_penalty)

    def _max_tokens(self, asked: int | None, prompt_tokens: int) -> int:
        if asked is None:  # chat's default: whatever the context leaves
            return max(1, self.engine.max_model_len - prompt_tokens)
        return asked

    def prepare_completion(self, body: bytes) -> tuple[CompletionRequest, list[int], Sampling]:
        r = parse(CompletionRequest, body)
        self._check_model(r.model)
        if isinstance(r.prompt, list) and isinstance(r.prompt[0], int):
            ids = list(r.prompt)
            vocab = len(self.engine.tokenizer)
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise BadRequest(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        else:
            text = r.prompt if isinstance(r.prompt, str) else r.prompt[0]
            ids = self.engine.tokenizer(text)["input_ids"]
        sampling = self._sampling(r, self._max_tokens(r.max_tokens, len(ids)))
        self._check(len(ids), sampling.max_tokens, "prompt")
        return r, ids, sampling

    def prepare_chat(self, body: bytes) -> tuple[ChatRequest, list[int], Sampling]:
        r = parse(ChatRequest, body)
        self._check_model(r.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in r.messages]
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (role order, ...) raise from Jinja
            raise BadRequest(f"messages: the model's chat template rejects them: {e}", param="messages") from None
        # The template writes the special tokens itself (BOS included): none added again.
        ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        asked = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        sampling = self._sampling(r, self._max_tokens(asked, len(ids)))
        self._check(len(ids), sampling.max_tokens, "messages")
        return r, ids, sampling

    def _check(self, prompt_tokens: int, max_tokens: int, prompt_param: str) -> None:
        try:
            self.engine.check_prompt(prompt_tokens, max_tokens)
        except InputError as e:
            raise BadRequest(str(e), param=prompt_param if e.param != "max_tokens" else "max_tokens",
                             code="context_length_exceeded") from None

    # -- responses -------------------------------------------------------------------------------

    async def complete(self, kind: str, r: _Sampling, ids: list[int], sampling: Sampling) -> dict:
        rid = _response_id(kind)
        text, token_ids, finish, produced = [], [], None, 0
        async for d in self.engine.generate(rid, ids, sampling):
            text.append(d.text)
            token_ids.extend(d.token_ids)
            finish, produced = d.finish_reason or finish, d.output_tokens
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if kind == "completion":
            choice["text"] = "".join(text)
        else:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        if r.return_token_ids:
            choice["token_ids"] = token_ids
        return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": _usage(len(ids), produced)}

    async def stream(self, kind: str, r: _Sampling, ids: list[int], sampling: Sampling) -> AsyncIterator[bytes]:
        """SSE frames; closing this generator (the client went away) aborts the sequence."""
        rid = _response_id(kind)
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        created = int(time.time())
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        head = {"id": rid, "object": obj, "created": created, "model": self.model_name}

        def frame(choices: list, usage: dict | None = None) -> bytes:
            chunk = {**head, "choices": choices}
            if include_usage:
                chunk["usage"] = usage
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        produced = 0
        if kind == "chat":
            yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for d in self.engine.generate(rid, ids, sampling):
            produced = d.output_tokens
            if not d.text and not d.token_ids and d.finish_reason is None:
                continue
            if kind == "completion":
                choice = {"index": 0, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
            else:
                choice = {"index": 0, "delta": {"content": d.text} if d.text else {}, "logprobs": None,
                          "finish_reason": d.finish_reason}
            if r.return_token_ids:
                choice["token_ids"] = d.token_ids
            yield frame([choice])
        if include_usage:
            yield frame([], _usage(len(ids), produced))
        yield b"data: [DONE]\n\n"
