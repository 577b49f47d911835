"""Logging: one JSON object per line (or plain text), and no secret in any line.

Redaction is done on the final text of every record that reaches our handler, the
traceback included, so it covers our loggers, hypercorn's access log (whose
request lines carry the legacy `?token=`) and anything a library puts in an
exception message. It removes: anything shaped like a JWT, the value of
`token=`/`api_key=`-style query parameters and `Authorization` headers, and the
configured keys themselves.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO

import orjson

REDACTED = "[redacted]"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_SECRET_PARAMS = re.compile(
    r"((?:token|api_key|apikey|admin_key|key|secret|password)=)[^&\s\"']+", re.IGNORECASE
)
_AUTH_HEADER = re.compile(r"((?:bearer|apikey)\s+)[^\s\"',]+", re.IGNORECASE)

# Attributes a record may carry through `extra=` that we print as fields.
CONTEXT_FIELDS = ("client", "user", "channel", "node", "protocol", "code", "event_type", "shard")


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Also remove these exact strings (keys known only once the runtime is built)."""
        # Short strings would redact ordinary words; real keys are long.
        known = set(self._secrets) | {s.strip() for s in secrets if len(s.strip()) >= 8}
        self._secrets = sorted(known, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _JWT.sub(REDACTED, text)
        text = _SECRET_PARAMS.sub(rf"\1{REDACTED}", text)
        text = _AUTH_HEADER.sub(rf"\1{REDACTED}", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(logging.Formatter):
    # `redactor` is any text -> text function: tests pass one that keeps everything, to
    # see what a record held before production redaction.
    def __init__(self, redactor: Callable[[str], str]) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                body[name] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return self.redactor(orjson.dumps(body, default=str).decode())


class TextFormatter(logging.Formatter):
    def __init__(self, redactor: Callable[[str], str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))


def configure_logging(
    *,
    level: str = "info",
    json: bool = True,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> Redactor:
    """Install one redacting handler on the root logger (replacing earlier ones)."""
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redactor) if json else TextFormatter(redactor))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return redactor
