"""Small HTTP helpers every endpoint module shares."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from quart import Response


def json_response(body: Any, status: int = 200, *, no_store: bool = False) -> Response:
    response = Response(orjson.dumps(body), status=status, content_type="application/json")
    if no_store:
        response.headers["Cache-Control"] = "no-store"
    return response


def key_matches(given: str, expected: str) -> bool:
    """A request's API or admin key against the configured one, in constant time; an
    empty key never matches, so an unset admin key disables what it guards."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
