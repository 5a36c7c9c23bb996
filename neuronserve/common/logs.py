"""Logging, configured once per process: every neuronserve logger is named after its module
(`logging.getLogger(__name__)`: neuronserve.serve.batcher, neuronserve.deploy.loadtest.runner, ...)
and writes through the `neuronserve` logger's one handler, on stderr, as text or as JSON lines.

The command sets it from `--log-level` and `--log-format` (or NEURONSERVE_LOG_LEVEL and
NEURONSERVE_LOG_FORMAT); it exports both, so processes it starts log the same way.

>>> import io
>>> stream = io.StringIO()
>>> configure("info", "json", stream=stream, export=False)
>>> logging.getLogger("neuronserve.serve.batcher").info("queue full")
>>> json.loads(stream.getvalue())["logger"], json.loads(stream.getvalue())["message"]
('neuronserve.serve.batcher', 'queue full')
>>> reset()
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

ROOT = "neuronserve"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
LEVEL_ENV = "NEURONSERVE_LOG_LEVEL"
FORMAT_ENV = "NEURONSERVE_LOG_FORMAT"
DEFAULT_LEVEL = "warning"
DEFAULT_FORMAT = "text"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def default_level() -> str:
    return os.environ.get(LEVEL_ENV, DEFAULT_LEVEL).lower()


def default_format() -> str:
    return os.environ.get(FORMAT_ENV, DEFAULT_FORMAT).lower()


def configure(level: str | None = None, fmt: str | None = None, *, stream: TextIO | None = None,
              export: bool = True) -> None:
    """Set the `neuronserve` loggers' level and format (calling it again replaces the handler).
    With `export`, the choice goes to the environment for child processes."""
    level = (level or default_level()).lower()
    fmt = (fmt or default_format()).lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    reset()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler._neuronserve = True  # type: ignore[attr-defined]
    root = logging.getLogger(ROOT)
    root.addHandler(handler)
    root.setLevel(level.upper())  # still propagating: a handler the application adds on the root sees them too
    if export:
        os.environ[LEVEL_ENV] = level
        os.environ[FORMAT_ENV] = fmt


def configure_from_env() -> bool:
    """In a process the command started (a Ray replica): log as the command was told to, if it said.
    The handler is the only one (no propagation), so Ray's own root handler does not repeat lines."""
    if LEVEL_ENV not in os.environ and FORMAT_ENV not in os.environ:
        return False
    configure(export=False)
    logging.getLogger(ROOT).propagate = False
    return True


def reset() -> None:
    """Remove what `configure` installed."""
    root = logging.getLogger(ROOT)
    for h in [h for h in root.handlers if getattr(h, "_neuronserve", False)]:
        root.removeHandler(h)
    root.setLevel(logging.NOTSET)
    root.propagate = True
