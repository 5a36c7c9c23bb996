"""The one JSONL reader, for `neuronserve infer` and `neuronserve loadtest` workloads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_lines(path: str | Path, expected: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a JSONL file; `expected` says what a line
    must be, for the error. Raises ValueError naming the file (and line)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"cannot read {str(path)!r}: the file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be {expected}") from None


def read_texts(path: str | Path, *, allow_empty: bool) -> list[str]:
    """Texts from a JSONL file: each non-blank line is a JSON string or an object with a "text"
    string. `allow_empty`: whether an empty string is a text (infer embeds it; a load test cannot
    send it). Raises ValueError naming the file and line."""
    texts: list[str] = []
    for lineno, item in json_lines(path, 'a JSON string or {"text": ...}'):
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str) or not (allow_empty or item.strip()):
            what = "a JSON string" if allow_empty else "a non-empty JSON string"
            raise ValueError(f'{path}:{lineno}: expected {what} or an object with a "text" string')
        texts.append(item)
    return texts
