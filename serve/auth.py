"""Who may call the server: API keys, checked as `Authorization: Bearer <key>`.

Keys come from the settings (`api_key`, comma-separated; `api_key_file`, one per line) or, in a
replica, from its own environment (`NEURONSERVE_API_KEY`, `NEURONSERVE_API_KEY_FILE`: the names
Kubernetes manifests fill from a Secret). What travels through Ray (the application's bound
arguments, which Serve keeps and shows) is never a key, only its SHA-256 digest; a presented
token is hashed and compared with every digest in constant time (`hmac.compare_digest`, no early
exit), so neither the comparison nor the number of keys leaks which one nearly matched.

>>> keys = ApiKeys.from_keys(["k1-secret", "k2-secret"])
>>> keys.allows(b"Bearer k2-secret"), keys.allows(b"Bearer nope"), keys.allows(None)
(True, False, False)
>>> keys
ApiKeys(2 keys)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

SCHEME = b"bearer"


class KeyFileError(ValueError):
    """An API key file that cannot be read or holds no key."""


def parse_keys(text: str | None) -> list[str]:
    """Keys from a comma-separated value; blanks around them and empty items are dropped.

    >>> parse_keys(" a1 , b2,, ")
    ['a1', 'b2']
    """
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def read_key_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped. Raises KeyFileError
    (without the file's content) when it cannot be read or holds no key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"API key file {str(path)!r} cannot be read: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise KeyFileError(f"API key file {str(path)!r} holds no key; write one key per line")
    return keys


def digest(key: str) -> str:
    """The SHA-256 hex digest a key travels as.

    >>> digest("k")[:16]
    '8254c329a92850f6'
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    """The digests of the accepted keys. Empty: authentication is off."""

    def __init__(self, digests: Iterable[str] = ()):
        self._digests = tuple(sorted({bytes.fromhex(d) for d in digests}))

    @classmethod
    def from_keys(cls, keys: Iterable[str], digests: Iterable[str] = ()) -> "ApiKeys":
        return cls([*digests, *(digest(k) for k in keys)])

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the digests either
        return f"ApiKeys({len(self._digests)} keys)"

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys (scheme Bearer, any case)."""
        if not self._digests:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != SCHEME or not token:
            return False
        presented = hashlib.sha256(token).digest()
        ok = False
        for d in self._digests:  # every key, whatever matched earlier
            ok |= hmac.compare_digest(presented, d)
        return ok
