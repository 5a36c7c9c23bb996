"""Reading one streamed OpenAI completion: server-sent events in, a request's timeline out.

Pure (no network): the client feeds the bytes of each read with the time it arrived, so the
parsing and the timing rules are tested on synthetic streams.

A stream from an OpenAI-compatible server (vLLM's among them) is a series of `data: {json}` events
separated by blank lines and ended by `data: [DONE]`. With `stream_options.include_usage` the last
event before `[DONE]` carries `usage` and an empty `choices` list. An error after the 200 status has
been sent arrives as an event too: `{"error": {...}}` (OpenAI, recent vLLM) or `{"object": "error",
"message": ...}` (older vLLM).

Timing follows vLLM's `bench serve`: time to first token (TTFT) is from just before the request
is sent to the read that brought the first event with content; inter-token latencies (ITL) are
the gaps between successive content events; end to end is until `[DONE]` (or the end of the
stream without one, which fails the request); time per output
token (TPOT) is (end to end - TTFT) / (output tokens - 1). Events that arrive in one read share its
time, so their gaps are 0, which is what the client saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

DONE = "[DONE]"


class SSEParser:
    """Incremental server-sent events parser: feed it bytes as they arrive, get complete events'
    `data` fields back. An event may be split across reads anywhere, even inside a UTF-8
    character or a `\\r\\n`.

    >>> p = SSEParser()
    >>> p.feed(b'data: {"a"'), p.feed(b': 1}\\n\\n: keep-alive\\n\\ndata: [DONE]\\n\\n')
    ([], ['{"a": 1}', '[DONE]'])
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []  # the data lines of the event being read

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            # A line ends at \n, \r\n or \r; a lone \r at the end of the buffer may be the first
            # half of \r\n, so wait for the next read before taking it.
            nl = self._buffer.find(b"\n")
            cr = self._buffer.find(b"\r")
            if cr != -1 and (nl == -1 or cr < nl):
                if cr == len(self._buffer) - 1:
                    break
                end, skip = cr, (2 if self._buffer[cr + 1:cr + 2] == b"\n" else 1)
            elif nl != -1:
                end, skip = nl, 1
            else:
                break
            line = self._buffer[:end]
            self._buffer = self._buffer[end + skip:]
            self._line(line, events)
        return events

    def close(self) -> list[str]:
        """The end of the stream: an event not ended by a blank line still counts."""
        events: list[str] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:  # a blank line ends an event
            if self._data:
                events.append(b"\n".join(self._data).decode("utf-8", "replace"))
                self._data = []
            return
        if line.startswith(b":"):  # a comment (keep-alive)
            return
        name, sep, value = line.partition(b":")
        if name == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # `event:`, `id:`, `retry:` carry nothing an OpenAI stream uses.


def event_content(event: dict) -> str:
    """The text an OpenAI stream event carries: a chat delta's `content` (or a reasoning model's
    `reasoning_content`/`reasoning`), or a completion choice's `text`.

    >>> event_content({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    'Hi'
    >>> event_content({"choices": [{"index": 0, "text": " there"}]}), event_content({"choices": [], "usage": {}})
    (' there', '')
    """
    choices = event.get("choices")
    if not isinstance(choices, list):
        return ""
    parts = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "reasoning_content", "reasoning"):
                value = delta.get(key)
                if isinstance(value, str):
                    parts.append(value)
        text = choice.get("text")
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


def event_error(event: dict) -> str | None:
    """The message of an error event, else None.

    >>> event_error({"error": {"message": "KV cache full", "type": "server_error", "code": 500}})
    'KV cache full (server_error, code 500)'
    >>> event_error({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400})
    'bad (BadRequestError, code 400)'
    """
    body = event.get("error")
    if body is None and event.get("object") == "error":
        body = event
    if body is None:
        return None
    if not isinstance(body, dict):
        return str(body)
    details = [str(body[k]) for k in ("type",) if body.get(k)]
    if body.get("code") is not None:
        details.append(f"code {body['code']}")
    message = str(body.get("message") or "error")
    return f"{message} ({', '.join(details)})" if details else message


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass
class StreamTimeline:
    """One streamed request, built event by event. Times are seconds from `time.perf_counter`."""

    sent_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    end_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    content_events: int = 0
    prompt_tokens: int | None = None  # from the usage event
    completion_tokens: int | None = None
    done: bool = False  # `data: [DONE]` seen
    error: str | None = None  # an error event: the request failed after its 200
    bad_events: int = 0  # events that were not JSON objects
    text_chars: int = 0

    def feed(self, data: str, now_s: float) -> None:
        """One event's data field, arrived at `now_s`."""
        if self.done:
            return
        if data.strip() == DONE:
            self.done = True
            self.end_s = now_s
            return
        try:
            event = orjson.loads(data)
        except ValueError:
            self.bad_events += 1
            return
        if not isinstance(event, dict):
            self.bad_events += 1
            return
        message = event_error(event)
        if message is not None:
            self.error = self.error or message
            return
        usage = event.get("usage")
        if isinstance(usage, dict):  # the last one wins (vLLM's continuous usage sends one per event)
            self.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.completion_tokens = _count(usage.get("completion_tokens"))
        content = event_content(event)
        if not content:
            return  # the role-only first chat delta, the finish event, the usage event
        self.content_events += 1
        self.text_chars += len(content)
        if self.first_token_s is None:
            self.first_token_s = now_s
        else:
            self.itls_s.append(now_s - self.last_token_s)
        self.last_token_s = now_s

    def finish(self, now_s: float) -> None:
        if self.end_s is None:
            self.end_s = now_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.sent_s

    @property
    def output_tokens(self) -> int:
        """From the usage event; without one, the number of content events (one token each in
        vLLM's default streaming, more with speculative decoding or a stream interval)."""
        return self.completion_tokens if self.completion_tokens is not None else self.content_events

    @property
    def tokens_from_usage(self) -> bool:
        return self.completion_tokens is not None

    @property
    def tpot_s(self) -> float | None:
        """(end to end - TTFT) / (output tokens - 1); None with fewer than two tokens."""
        n = self.output_tokens
        if self.ttft_s is None or self.e2e_s is None or n < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)

    def failure(self) -> str | None:
        """Why the request counts as failed, as an error kind, or None if it succeeded."""
        if self.error is not None:
            return "stream_error"
        if not self.done:
            return "incomplete_stream"  # the connection closed before [DONE]
        if self.content_events == 0 and not self.completion_tokens:
            return "no_tokens" if not self.bad_events else "invalid_stream_event"
        return None
