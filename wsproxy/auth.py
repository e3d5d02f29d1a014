"""Where the token comes from, and checking it against Redis.

The token is a secret: it is never logged, never put in an exception message,
and compared in constant time.
"""

from __future__ import annotations

import enum
import hmac
from urllib.parse import parse_qsl

import hiredis

from .redis import CommandClient, RedisUnavailable


class AuthResult(enum.Enum):
    """The outcome of checking a token, each with the HTTP status it becomes."""

    OK = 101
    MISSING = 401
    FORBIDDEN = 403
    UNAVAILABLE = 503
    TIMEOUT = 504


def token_from_request(authorization: str | None, query: str) -> str | None:
    """The bearer token from ``Authorization: Bearer <t>``, else from ``?access_token=<t>``
    (RFC 6750 section 2.3: browsers cannot set headers on a WebSocket)."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "access_token" and value:
                return value
    return None


def auth_key(session_id: str) -> str:
    """The Redis key holding the session's token."""
    return f"session:{session_id}:auth"


async def check_token(
    redis: CommandClient, session_id: str, token: str, timeout: float, grace_secs: int
) -> AuthResult:
    """GET the session's token and compare; on a match, EXPIRE it to the grace period."""
    key = auth_key(session_id)
    try:
        stored = await redis.execute("GET", key, timeout=timeout)
    except TimeoutError:
        return AuthResult.TIMEOUT
    except RedisUnavailable:
        return AuthResult.UNAVAILABLE
    except hiredis.ReplyError as exc:
        # A key that holds no string cannot hold a token; any other error
        # (LOADING, NOAUTH, ...) means Redis cannot answer now.
        return AuthResult.FORBIDDEN if str(exc).startswith("WRONGTYPE") else (
            AuthResult.UNAVAILABLE)
    if not isinstance(stored, bytes) or not hmac.compare_digest(stored, token.encode()):
        return AuthResult.FORBIDDEN
    try:
        redis.execute_noreply("EXPIRE", key, grace_secs)
    except RedisUnavailable:
        return AuthResult.UNAVAILABLE
    return AuthResult.OK
