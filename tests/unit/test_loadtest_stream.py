"""Server-sent events and the timeline of one streamed OpenAI completion (pure: no network)."""

from __future__ import annotations

import json

import pytest

from neuronserve.deploy.loadtest.stream import SSEParser, StreamTimeline, event_content, event_error


def chat_event(text: str | None = None, role: str | None = None, finish: str | None = None) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if text is not None:
        delta["content"] = text
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage_event(prompt: int, completion: int) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def sse(*events: dict | str, eol: str = "\n") -> bytes:
    out = []
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e)
        out.append(f"data: {data}{eol}{eol}")
    return "".join(out).encode()


STREAM = sse(chat_event("", role="assistant"), chat_event("Hel"), chat_event("lo, wörld"),
             chat_event("", finish="length"), usage_event(7, 2), "[DONE]")
EXPECTED = [json.dumps(e) for e in (chat_event("", role="assistant"), chat_event("Hel"), chat_event("lo, wörld"),
                                    chat_event("", finish="length"), usage_event(7, 2))] + ["[DONE]"]


def test_whole_stream_in_one_read():
    assert SSEParser().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_every_split_point_gives_the_same_events(eol):
    data = sse(chat_event("Hel"), chat_event("lo, wörld"), usage_event(7, 2), "[DONE]", eol=eol)
    whole = SSEParser()
    want = whole.feed(data) + whole.close()
    assert want[-1] == "[DONE]" and len(want) == 4
    for cut in range(1, len(data)):  # includes cuts inside 'ö' (two bytes) and between \r and \n
        p = SSEParser()
        assert p.feed(data[:cut]) + p.feed(data[cut:]) + p.close() == want, cut


def test_byte_by_byte_reads():
    p = SSEParser()
    events = [e for i in range(len(STREAM)) for e in p.feed(STREAM[i:i + 1])]
    assert events == EXPECTED


def test_comments_multiline_data_and_other_fields():
    p = SSEParser()
    raw = b": ping\n\nevent: message\nid: 3\ndata: line one\ndata:line two\n\nretry: 10\n\n"
    assert p.feed(raw) == ["line one\nline two"]


def test_an_event_without_its_blank_line_counts_at_the_end_of_the_stream():
    p = SSEParser()
    assert p.feed(b"data: [DONE]") == []
    assert p.close() == ["[DONE]"]


def test_content_of_chat_and_completion_events():
    assert event_content(chat_event("", role="assistant")) == ""
    assert event_content(chat_event("x")) == "x"
    assert event_content({"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]}) == "think"
    assert event_content({"choices": [{"index": 0, "text": "abc", "finish_reason": None}]}) == "abc"
    assert event_content(usage_event(1, 1)) == ""
    assert event_content({"choices": None}) == ""


def feed_all(timeline: StreamTimeline, reads: list[tuple[float, bytes]]) -> StreamTimeline:
    parser = SSEParser()
    last = timeline.sent_s
    for at, data in reads:
        for event in parser.feed(data):
            timeline.feed(event, at)
        last = at
    for event in parser.close():
        timeline.feed(event, last)
    timeline.finish(last)
    return timeline


def test_timeline_of_a_chat_stream_with_usage_split_across_reads():
    # Sent at t=10.0; the role delta at 10.05 (not a token), tokens at 10.30, 10.32, 10.36;
    # the usage event split across two reads; [DONE] at 10.40.
    whole_usage = sse(usage_event(11, 3))
    reads = [(10.05, sse(chat_event("", role="assistant"))), (10.30, sse(chat_event("a"))),
             (10.32, sse(chat_event("b"))), (10.36, sse(chat_event("c"), chat_event("", finish="stop"))),
             (10.37, whole_usage[:15]), (10.38, whole_usage[15:]), (10.40, sse("[DONE]"))]
    t = feed_all(StreamTimeline(sent_s=10.0), reads)
    assert t.failure() is None and t.done
    assert t.ttft_s == pytest.approx(0.30)
    assert t.itls_s == pytest.approx([0.02, 0.04])
    assert t.e2e_s == pytest.approx(0.40)
    assert (t.prompt_tokens, t.completion_tokens, t.output_tokens, t.tokens_from_usage) == (11, 3, 3, True)
    assert t.tpot_s == pytest.approx((0.40 - 0.30) / (3 - 1))


def test_usage_counts_win_over_events_and_events_in_one_read_have_no_gap():
    # Two content events in one read (e.g. a stream interval): a gap of 0; usage says 5 tokens.
    reads = [(1.1, sse({"choices": [{"index": 0, "text": "x"}]})),
             (1.2, sse({"choices": [{"index": 0, "text": "y"}]}, {"choices": [{"index": 0, "text": "z"}]})),
             (1.3, sse({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}, "[DONE]"))]
    t = feed_all(StreamTimeline(sent_s=1.0), reads)
    assert t.itls_s == pytest.approx([0.1, 0.0])
    assert t.content_events == 3 and t.output_tokens == 5 and t.tpot_s == pytest.approx((0.3 - 0.1) / 4)


def test_without_usage_the_content_events_are_counted():
    t = feed_all(StreamTimeline(sent_s=0.0), [(0.1, sse(chat_event("a"), chat_event("b"))), (0.2, sse("[DONE]"))])
    assert t.failure() is None
    assert t.output_tokens == 2 and not t.tokens_from_usage and t.prompt_tokens is None


@pytest.mark.parametrize("error, message", [
    ({"error": {"message": "out of KV cache", "type": "server_error", "code": 500}},
     "out of KV cache (server_error, code 500)"),
    ({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}, "bad (BadRequestError, code 400)"),
])
def test_an_error_mid_stream_fails_the_request(error, message):
    t = feed_all(StreamTimeline(sent_s=0.0), [(0.1, sse(chat_event("a"))), (0.2, sse(error, "[DONE]"))])
    assert t.failure() == "stream_error" and t.error == message
    assert event_error(chat_event("a")) is None


def test_a_stream_cut_before_done_is_incomplete():
    t = feed_all(StreamTimeline(sent_s=0.0), [(0.1, sse(chat_event("a"))), (0.2, b'data: {"choi')])
    assert t.failure() == "incomplete_stream"


def test_a_stream_of_garbage_or_without_tokens_fails():
    t = feed_all(StreamTimeline(sent_s=0.0), [(0.1, b"data: not json\n\ndata: [DONE]\n\n")])
    assert t.failure() == "invalid_stream_event" and t.bad_events == 1
    t = feed_all(StreamTimeline(sent_s=0.0), [(0.1, sse(usage_event(3, 0), "[DONE]"))])
    assert t.failure() == "no_tokens"


def test_events_after_done_are_ignored():
    t = feed_all(StreamTimeline(sent_s=0.0), [(0.1, sse(chat_event("a"), "[DONE]")), (0.5, sse(chat_event("b")))])
    assert t.content_events == 1 and t.e2e_s == pytest.approx(0.1)
