"""Errors that carry their HTTP status. One handler (`serve.app`) maps them to a response, with
the body in the route's protocol (`error_body` of `serve.protocols.openai`, `.tei`, `.kserve`)."""

from __future__ import annotations


class InputError(ValueError):
    """A request's input cannot be served as given (HTTP 400); the message names the value, limit
    and fix. Raised below the HTTP layer (engine, buckets), which maps it to `BadRequest`."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InputTooLong(InputError):
    """An input has more tokens than the largest compiled bucket (or the model) takes.

    >>> e = InputTooLong(700, 512, index=3)
    >>> str(e)
    'input 3 has 700 tokens; the largest compiled bucket is 512 tokens; send shorter text or set truncate=true'
    >>> str(InputTooLong(700, 512)), e.status
    ('input has 700 tokens; the largest compiled bucket is 512 tokens; send shorter text or set truncate=true', 400)
    """

    def __init__(self, tokens: int, limit: int, index: int | None = None):
        which = "input" if index is None else f"input {index}"
        super().__init__(
            f"{which} has {tokens} tokens; the largest compiled bucket is {limit} tokens; "
            "send shorter text or set truncate=true",
            param="input",
        )
        self.tokens, self.limit, self.index = tokens, limit, index

    def __reduce__(self):  # keep the attributes when pickled (e.g. across Ray workers)
        return (type(self), (self.tokens, self.limit, self.index))


class ServeError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class BadRequest(ServeError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ServeError):
    """No or a wrong API key (`serve.auth`): 401 with the challenge clients expect."""

    status, type = 401, "invalid_request_error"

    def __init__(self, message: str, code: str | None = "invalid_api_key"):
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServeError):
    status, type = 404, "not_found_error"


class PayloadTooLarge(ServeError):
    status, type = 413, "invalid_request_error"


class UnsupportedMediaType(ServeError):
    status, type = 415, "invalid_request_error"


class Overloaded(ServeError):
    status, type = 429, "overloaded_error"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReady(ServeError):
    status, type = 503, "unavailable_error"


class RequestTimeout(ServeError):
    status, type = 504, "timeout_error"


class BackendFailure(ServeError):
    """Never carries the underlying exception text to the client: it is logged instead."""

    status, type = 500, "server_error"


class NotLoaded(Exception):
    """A model of the replica's catalog that is not loaded here now (`serve.replica.Models.pick`):
    not an answer but a hand-off; the HTTP layer sends the request on to a replica that holds the
    model, or that loads it (`serve.app`)."""

    def __init__(self, name: str, body=None):
        super().__init__(name)
        self.name, self.body = name, body
