"""The operator console's WebSocket credential: short-lived, minted for a holder of
the admin key, and good for nothing but the console's live tail.

The admin key itself is never a WebSocket login (it would be a permanent token that
may read every channel). `POST /console/api/token` trades the admin key for one of
these; the Centrifuge endpoint accepts it as a connect token and the connection
expires with it, so the page's SDK fetches a fresh one through `getToken`.

Format: `dexconsole.<expiry, unix seconds>.<nonce>.<HMAC-SHA256>`, keyed by a key
derived from the admin key, so every node sharing the admin key accepts it and
changing the admin key revokes all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

PREFIX = "dexconsole"
_KEY_LABEL = b"dex-shim console credential v1"


def _mac(admin_key: str, message: str) -> str:
    key = hmac.new(admin_key.encode(), _KEY_LABEL, hashlib.sha256).digest()
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def mint(admin_key: str, ttl_seconds: float, *, now: float | None = None) -> tuple[str, int]:
    """(credential, expiry in unix seconds)."""
    expires_at = int((time.time() if now is None else now) + max(1.0, ttl_seconds))
    message = f"{PREFIX}.{expires_at}.{secrets.token_urlsafe(12)}"
    return f"{message}.{_mac(admin_key, message)}", expires_at


def verify(token: str, admin_key: str) -> int:
    """The credential's expiry (unix seconds, maybe past) when it is genuine, else 0."""
    if not admin_key or not token.startswith(PREFIX + "."):
        return 0
    message, _, mac = token.rpartition(".")
    parts = message.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
        return 0
    if not hmac.compare_digest(mac.encode(), _mac(admin_key, message).encode()):
        return 0
    return int(parts[1])


def valid(token: str, admin_key: str, *, now: float | None = None) -> bool:
    """Genuine and not expired."""
    return verify(token, admin_key) > (time.time() if now is None else now)


def looks_like_one(token: str) -> bool:
    return token.startswith(PREFIX + ".")
