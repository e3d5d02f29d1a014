"""wsproxy's configuration: one frozen dataclass, read from the environment and flags.

Every setting is an environment variable and a command-line flag of the same name
(``PORT=4040`` or ``--port 4040``); the flag wins. Nothing else in the package reads
the environment. A bad value raises :class:`ConfigError` with one line naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit


class ConfigError(ValueError):
    """A setting has a value wsproxy cannot run with; the message names the setting."""


@dataclass(frozen=True)
class RedisAddress:
    """Where and how to reach Redis, parsed from ``REDIS_URL``."""

    scheme: str  # "redis", "rediss" or "unix"
    host: str
    port: int
    path: str  # unix socket path, "" for TCP
    username: str | None
    password: str | None
    db: int
    # rediss:// only: a CA bundle to trust (else the system's), and whether to verify
    # the server's certificate at all (``?ssl_cert_reqs=none`` turns it off).
    tls_ca_file: str | None = None
    tls_verify: bool = True

    @property
    def display(self) -> str:
        """The address without credentials, fit for a log line."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis://[user:pass@]host[:port][/db]``, ``rediss://...`` or ``unix:///path``.

    ``rediss://`` takes redis-py's query parameters ``ssl_ca_certs=<path>`` and
    ``ssl_cert_reqs=required|none``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("scheme must be redis://, rediss:// or unix://")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    if scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs a socket path")
        db = _db_number(query.get("db", "0"))
        return RedisAddress(scheme, "", 0, parts.path, username, password, db)
    if not parts.hostname:
        raise ValueError("missing host")
    try:
        port = 6379 if parts.port is None else parts.port
    except ValueError as exc:  # urlsplit raises on a port that is not a number
        raise ValueError("invalid port") from exc
    if not 1 <= port <= 65535:
        raise ValueError("invalid port")
    path = parts.path.strip("/")
    db = _db_number(path if path else query.get("db", "0"))
    cert_reqs = unquote(query.get("ssl_cert_reqs", "required")).lower()
    if cert_reqs not in ("required", "none"):
        raise ValueError("ssl_cert_reqs must be required or none")
    ca_file = unquote(query["ssl_ca_certs"]) if "ssl_ca_certs" in query else None
    return RedisAddress(scheme, parts.hostname, port, "", username, password, db,
                        tls_ca_file=ca_file, tls_verify=cert_reqs == "required")


def _db_number(text: str) -> int:
    try:
        db = int(text)
    except ValueError as exc:
        raise ValueError("the database number must be an integer") from exc
    if db < 0:
        raise ValueError("the database number must be >= 0")
    return db


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_int_to(limit: int) -> Callable[[str], int]:
    """A positive integer no larger than ``limit`` (what the code that takes it holds)."""
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > limit:
            raise ValueError(f"must be a positive integer up to {limit}")
        return value

    return parse


# Byte limits go to the C fast path and picows as signed 64-bit sizes.
_bytes = _positive_int_to(1 << 62)
# Redis refuses an EXPIRE whose time in milliseconds would overflow 64 bits.
_ttl_secs = _positive_int_to(10**15)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a number > 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _host(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _redis_url(text: str) -> str:
    parse_redis_url(text)
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    return parse


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1
        )
    return _positive_int(text)


@dataclass(frozen=True)
class Setting:
    """One configuration entry: its variable name, parser, default and help text."""

    name: str
    parse: Callable[[str], Any]
    default: str
    help: str

    @property
    def flag(self) -> str:
        """The command-line flag: ``MAX_CONNECTIONS`` -> ``--max-connections``."""
        return "--" + self.name.lower().replace("_", "-")

    @property
    def field(self) -> str:
        """The attribute of :class:`Config` holding the parsed value."""
        return self.name.lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", _host, "0.0.0.0", "address to listen on"),
    Setting("PORT", _port, "4040", "TCP port to listen on"),
    Setting("REDIS_URL", _redis_url, "redis://127.0.0.1:6379",
            "Redis to use: redis://, rediss:// (TLS) or unix://"),
    Setting("AUTH_TIMEOUT_SECS", _positive_float, "2",
            "longest wait for Redis during auth before answering 504"),
    Setting("AUTH_GRACE_PERIOD_SECS", _ttl_secs, "10800",
            "TTL given to session:{sid}:auth after a successful handshake"),
    Setting("HANDSHAKE_TIMEOUT_SECS", _positive_float, "5",
            "longest time from TCP accept to the 101 (request head, auth, subscribe)"),
    Setting("WS_PING_INTERVAL_SECS", _positive_float, "15",
            "ping a client idle for this long"),
    Setting("WS_PING_TIMEOUT_SECS", _positive_float, "30",
            "close a client that sent nothing (not even a pong) for this long"),
    Setting("MAX_MESSAGE_SIZE_BYTES", _bytes, "1048576",
            "largest client message published upstream"),
    Setting("MAX_FRAME_SIZE_BYTES", _bytes, "16777216",
            "hard limit on one client frame: larger closes the socket with 1009"),
    Setting("MAX_BUFFER_SIZE_BYTES", _bytes, "10485760",
            "unsent bytes a socket may hold before it is closed with 1008"),
    Setting("MAX_CONNECTIONS", _positive_int, "50000",
            "open WebSockets (and handshakes) per process; beyond it 503"),
    Setting("SHUTDOWN_GRACE_PERIOD_SECS", _non_negative_float, "30",
            "how long open sockets keep working after SIGTERM"),
    Setting("SHUTDOWN_CLOSE_SPREAD_SECS", _non_negative_float, "0",
            "spread the final 1001 closes over this many seconds"),
    Setting("WORKERS", _workers, "1",
            "worker processes sharing the port (SO_REUSEPORT); 'auto' = usable CPUs"),
    Setting("LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Setting("LOG_FORMAT", _choice("json", "text"), "json",
            "json: one JSON object a line; text: for humans"),
)


@dataclass(frozen=True)
class Config:
    """wsproxy's settings, validated. Build it with :meth:`from_sources`."""

    host: str = "0.0.0.0"
    port: int = 4040
    redis_url: str = "redis://127.0.0.1:6379"
    auth_timeout_secs: float = 2.0
    auth_grace_period_secs: int = 10800
    handshake_timeout_secs: float = 5.0
    ws_ping_interval_secs: float = 15.0
    ws_ping_timeout_secs: float = 30.0
    max_message_size_bytes: int = 1048576
    max_frame_size_bytes: int = 16777216
    max_buffer_size_bytes: int = 10485760
    max_connections: int = 50000
    shutdown_grace_period_secs: float = 30.0
    shutdown_close_spread_secs: float = 0.0
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"

    def __post_init__(self) -> None:
        if self.ws_ping_timeout_secs <= self.ws_ping_interval_secs:
            raise ConfigError(
                "WS_PING_TIMEOUT_SECS: must be greater than WS_PING_INTERVAL_SECS "
                f"({self.ws_ping_timeout_secs:g} <= {self.ws_ping_interval_secs:g})"
            )
        if self.max_frame_size_bytes < self.max_message_size_bytes:
            raise ConfigError(
                "MAX_FRAME_SIZE_BYTES: must be at least MAX_MESSAGE_SIZE_BYTES "
                f"({self.max_frame_size_bytes} < {self.max_message_size_bytes})"
            )

    @property
    def redis(self) -> RedisAddress:
        """``redis_url``, parsed."""
        return parse_redis_url(self.redis_url)

    @classmethod
    def from_sources(
        cls, flags: Mapping[str, str | None], environ: Mapping[str, str]
    ) -> Config:
        """Build the config from flag values (by variable name) over environment variables.

        Raises :class:`ConfigError` naming the first bad setting.
        """
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = flags.get(setting.name)
            if raw is None:
                raw = environ.get(setting.name)
            if raw is None:
                raw = setting.default
            try:
                values[setting.field] = setting.parse(str(raw))
            except ValueError as exc:
                reason = str(exc) if not str(exc).startswith("invalid literal") else (
                    "not a number")
                if setting.name == "REDIS_URL":
                    shown = "<url>"  # may carry a password: never echo it
                else:
                    shown = repr(raw)
                raise ConfigError(f"{setting.name}: invalid value {shown}: {reason}") from exc
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
