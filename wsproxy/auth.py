"""Where the token comes from, and checking it against Redis.

The token is a secret: it is never logged, never put in an exception message,
and compared in constant time.
"""

from __future__ import annotations

import enum
import hmac
from typing import Any
from urllib.parse import parse_qsl

import hiredis


class AuthResult(enum.Enum):
    """What Redis' reply says of a token, each with the HTTP status it becomes."""

    OK = 101
    FORBIDDEN = 403
    UNAVAILABLE = 503


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


def auth_result(reply: Any, token: str) -> AuthResult:
    """What Redis' answer to ``GET session:{sid}:auth`` means for ``token``: OK,
    FORBIDDEN, or UNAVAILABLE (an error reply, or the connection's end)."""
    if isinstance(reply, hiredis.ReplyError):
        # A key that holds no string cannot hold a token; any other error
        # (LOADING, NOAUTH, ...) means Redis cannot answer now.
        return AuthResult.FORBIDDEN if str(reply).startswith("WRONGTYPE") else (
            AuthResult.UNAVAILABLE)
    if isinstance(reply, BaseException):
        return AuthResult.UNAVAILABLE
    if not isinstance(reply, bytes) or not hmac.compare_digest(reply, token.encode()):
        return AuthResult.FORBIDDEN
    return AuthResult.OK
