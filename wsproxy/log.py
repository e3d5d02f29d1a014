"""Log lines: one JSON object a line (``LOG_FORMAT=json``) or readable text.

Callers log *events* with fields: ``log_event(logging.INFO, "connection_open",
session_id=sid, conn_id=cid)``. No token is ever passed in; as a second guard, the
formatter masks anything that looks like a bearer token or an ``access_token``
parameter, whatever path it came from.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

LOGGER_NAME = "wsproxy"
logger = logging.getLogger(LOGGER_NAME)

_SECRET = re.compile(
    r"(?i)(bearer\s+|access_token=|access_token%3d|access_token\"\s*:\s*\")"
    r"([^\s&\"'\\,;]+)"
)
# Fields whose value is a secret by name, whatever it looks like.
_SECRET_FIELD = re.compile(r"(?i)token|authorization|password|secret")


def redact(text: str) -> str:
    """Mask bearer tokens and ``access_token`` values in ``text``."""
    # Every match contains one of these words, case-folded as the (?i) pattern folds
    # them (casefold maps the long s and the Kelvin sign too): most lines have
    # neither, and skip the regex scan, a third of a log line's cost.
    folded = text.casefold()
    if "bearer" not in folded and "access_token" not in folded:
        return text
    return _SECRET.sub(lambda m: m.group(1) + "[redacted]", text)


_secret_field: dict[str, bool] = {}


def _mask_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in fields.items():
        secret = _secret_field.get(k)
        if secret is None:
            secret = bool(_SECRET_FIELD.search(k))
            if len(_secret_field) < 1024:  # field names are the code's, few
                _secret_field[k] = secret
        out[k] = "[redacted]" if secret else v
    return out


# The last second formatted, as one tuple (a thread reads both halves at once).
_second: tuple[int, str] = (-1, "")


def _iso_time(created: float) -> str:
    global _second
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    cached, text = _second
    if seconds != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    return f"{text}.{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
        }
        entry.update(_mask_fields(fields))
        if not getattr(record, "event", None):
            entry["message"] = record.getMessage()
            entry["logger"] = record.name
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z info  connection_open session_id=abc conn_id=7``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        event = getattr(record, "event", None) or record.getMessage()
        parts = [_iso_time(record.created), f"{record.levelname.lower():<7}", event]
        parts.extend(f"{k}={v}" for k, v in _mask_fields(fields).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure(level: str, fmt: str) -> None:
    """Send wsproxy's (and its libraries') logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Neither formatter prints the caller, thread or process of a record: skip
    # collecting them (the logging HOWTO's "Optimization" settings). The caller's
    # frame walk and a getpid() were a third of every connection's log line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # picows logs every accepted connection at INFO, and request details at DEBUG:
    # too chatty for thousands of sockets, and a request line may carry a token.
    logging.getLogger("picows").setLevel(logging.WARNING)


_context: dict[str, Any] = {}


def set_context(**fields: Any) -> None:
    """Fields added to every event of this process (a worker's index)."""
    _context.update(fields)


def log_event(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` (never a token) if ``level`` is enabled."""
    if logger.isEnabledFor(level):
        if _context:
            fields = {**_context, **fields}
        logger.log(level, event, extra={"event": event, "fields": fields})
