"""Request ids: taken from the client's `x-request-id` when it is sane, else made here.

The id of the request being handled is `current()` (a contextvar, set by the HTTP layer's edge
middleware for the whole handling of one request, `serve.edge.Edge`) and `request.state.request_id`
(the ASGI scope's `state`). It goes back in every response's `x-request-id` header and into the
replica's log lines about the request.

>>> accept("abc-123")
'abc-123'
>>> len(accept("bad id with spaces")), len(accept(None)), len(accept("x" * 200))
(32, 32, 32)
"""

from __future__ import annotations

import contextvars
import re
import uuid

HEADER = "x-request-id"
MAX_LENGTH = 128
# Printable, no spaces or quotes: safe in a header, a log line and a metric exemplar.
_SANE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,%d}" % MAX_LENGTH)

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("neuronserve_request_id", default=None)


def new() -> str:
    """A fresh id: uuid4 as 32 hex digits."""
    return uuid.uuid4().hex


def accept(value: str | bytes | None) -> str:
    """The client's id when it is 1-128 characters of [A-Za-z0-9._:/+=@-], else a new one."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            value = None
    if value is not None and _SANE.fullmatch(value):
        return value
    return new()


def current() -> str | None:
    """The id of the request this code runs for, or None outside a request."""
    return _current.get()


def set_current(request_id: str | None) -> contextvars.Token:
    return _current.set(request_id)


def reset(token: contextvars.Token) -> None:
    _current.reset(token)
