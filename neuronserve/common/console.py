"""How commands talk to people: progress and errors on stderr, results on stdout."""

from __future__ import annotations

import sys


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fail(message: str, code: int = 1) -> int:
    """Print one clear error line and return the exit code (2: bad usage, 1: failure)."""
    err(f"error: {message}")
    return code
