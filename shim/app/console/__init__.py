"""The operator console: one static page at /console and the JSON it polls.

The page asks for the admin key, keeps it in the tab's sessionStorage and sends it as
X-Admin-Key; the static files themselves hold no secrets and are served to anyone.
Cutover changes go through the existing admin API (/api/v1/admin/cutover); the live
tail connects to /connection/websocket with a short-lived console credential that
POST /console/api/token trades for the admin key.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, request

from shim.app.console.overview import overview
from shim.app.http import json_response, key_matches
from shim.app.runtime import Runtime
from shim.core import console_credential

STATIC = Path(__file__).resolve().parent / "static"

# The page loads only its own files and talks only to its own origin (HTTP and
# WebSocket): injected markup could neither load script nor send the key elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def console_blueprint(runtime: Runtime) -> Blueprint:
    blueprint = Blueprint(
        "console",
        __name__,
        url_prefix="/console",
        static_folder=str(STATIC),
        static_url_path="/static",
    )
    admin_key = runtime.settings.admin_api_key

    @blueprint.get("")
    @blueprint.get("/")
    async def page() -> Response:
        response = await blueprint.send_static_file("index.html")
        # A new deploy's page (and the script it names) is picked up on reload.
        response.headers["Cache-Control"] = "no-cache"
        return response

    @blueprint.get("/api/overview")
    async def show_overview() -> Response:
        key = request.headers.get("X-Admin-Key", "")
        if not key_matches(key, admin_key):
            return json_response({"error": "missing or invalid X-Admin-Key"}, 401, no_store=True)
        return json_response(await overview(runtime), no_store=True)

    @blueprint.post("/api/token")
    async def console_token() -> Response:
        """A short-lived credential for the live tail's WebSocket (see
        shim.core.console_credential); the admin key itself is no WebSocket login."""
        key = request.headers.get("X-Admin-Key", "")
        if not key_matches(key, admin_key):
            return json_response({"error": "missing or invalid X-Admin-Key"}, 401, no_store=True)
        token, expires_at = console_credential.mint(
            admin_key, runtime.settings.console_token_ttl_seconds
        )
        return json_response({"token": token, "expires_at": expires_at}, no_store=True)

    @blueprint.after_request
    async def secure(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return blueprint
