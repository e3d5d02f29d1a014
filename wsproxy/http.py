"""The HTTP/1.1 gate in front of picows.

picows writes the 101 as soon as its listener factory returns, so nothing async can
happen before the upgrade through its public API. Every TCP connection therefore
starts with a :class:`Gate`: it reads the request head, answers plain HTTP itself
(``/health``, ``/ready``, ``/metrics``, errors), runs auth and the SUBSCRIBE, and only
then hands the live transport to picows' ``WSProtocol`` and replays the buffered
request into it, so picows validates the upgrade and writes the 101 itself.
The hand-over relies on picows internals: picows is pinned exactly in pyproject.toml
and ``tests/test_handover.py`` fails loudly if an upgrade breaks it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # internal API, see above

from ._fastpath import SessionListener
from .auth import AuthResult, check_token, token_from_request
from .log import log_event
from .redis import RedisUnavailable
from .session import down_channel, up_channel

if TYPE_CHECKING:
    from .server import Server

MAX_HEAD_BYTES = 16 * 1024  # picows refuses request heads of this size too
_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_WS_PATH = re.compile(r"/([^/]*)/ws/([^/]*)")
_HTTP1_VERSION = re.compile(r"HTTP/1\.[0-9]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
# An adapter, not a Logger: picows builds a child Logger per connection from a Logger
# (memory and time per socket), but uses an adapter as it is.
_PICOWS_LOGGER = logging.LoggerAdapter(logging.getLogger("picows.server"), {})
# picows' read buffer starts at this size and grows for larger frames; a small start
# keeps idle sockets cheap.
_READ_BUFFER_INIT = 4096


class BadRequest(ValueError):
    """The request head is not HTTP/1.1 we can read; the message says why."""


@dataclass
class Request:
    """The parts of a request head the gate needs."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]  # lower-case names; the first of repeated headers wins


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and headers (without the final CRLF CRLF)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest("undecodable request head") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _HTTP1_VERSION.fullmatch(version):
        raise BadRequest("unsupported HTTP version")
    if not target.startswith("/"):
        raise BadRequest("request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header line")
        headers.setdefault(name.lower(), value.strip(" \t"))
    path, _, query = target.partition("?")
    return Request(method, path, query, version, headers)


def upgrade_problem(request: Request) -> tuple[int, str] | None:
    """Why this is not a WebSocket upgrade we can accept, as (status, reason), or None.

    Checked before any Redis work, so a request picows would refuse after auth
    never takes a subscription.
    """
    if request.version != "HTTP/1.1":
        return 400, "WebSocket upgrade needs HTTP/1.1"
    if request.headers.get("upgrade", "").lower() != "websocket":
        return 426, "WebSocket upgrade required"
    connection = [t.strip().lower() for t in request.headers.get("connection", "").split(",")]
    if "upgrade" not in connection:
        return 400, "Connection header must contain Upgrade"
    if request.headers.get("sec-websocket-version") != "13":
        return 426, "Sec-WebSocket-Version must be 13"
    key = request.headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    except binascii.Error:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    if "content-length" in request.headers and request.headers["content-length"] != "0":
        return 400, "a WebSocket upgrade has no body"
    if "transfer-encoding" in request.headers:
        return 400, "a WebSocket upgrade has no body"
    return None


def http_response(status: int, body: bytes, content_type: str = "application/json",
                  extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_body(message: str) -> bytes:
    """``{"error": message}``."""
    return orjson.dumps({"error": message})


class Gate(asyncio.Protocol):
    """One TCP connection until it is answered or handed over to picows."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: Any = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.handed_over = False
        self.lost = False

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # A client that sends nothing, or trickles its head, is dropped after the
        # handshake timeout.
        self.timer = asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout_secs, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is not None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) >= MAX_HEAD_BYTES:
                self._finish(431, error_body("request head too large"))
            return
        if end + 4 > MAX_HEAD_BYTES:
            self._finish(431, error_body("request head too large"))
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # Hold further bytes in the kernel while auth runs: memory stays bounded.
        self.transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._handle(end))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _head_timeout(self) -> None:
        self.timer = None
        if self.task is None and not self.lost:
            log_event(logging.INFO, "handshake_timeout", received=len(self.buffer))
            self.transport.abort()

    # answering -------------------------------------------------------------------
    def _finish(self, status: int, body: bytes, content_type: str = "application/json",
                extra_headers: tuple[tuple[str, str], ...] = ()) -> None:
        if self.lost or self.transport.is_closing():
            return
        self.transport.write(http_response(status, body, content_type, extra_headers))
        self.transport.close()

    async def _handle(self, head_end: int) -> None:
        try:
            await self._route(head_end)
        except asyncio.CancelledError:
            pass  # the client went away; _handshake cleaned up after itself
        except Exception:  # noqa: BLE001 - the process must not die for one request
            logging.getLogger("wsproxy").exception("request handling failed")
            self.server.metrics.count_error("internal")
            self._finish(500, error_body("internal error"))

    async def _route(self, head_end: int) -> None:
        server = self.server
        try:
            request = parse_request_head(bytes(self.buffer[:head_end]))
        except BadRequest as exc:
            self._finish(400, error_body(str(exc)))
            return
        path = request.path
        if path in ("/health", "/ready", "/metrics"):
            if request.method not in ("GET", "HEAD"):
                self._finish(405, error_body("method not allowed"),
                             extra_headers=(("Allow", "GET"),))
            elif path == "/health":
                status, body = server.health()
                self._finish(status, body)
            elif path == "/ready":
                status, body = server.readiness()
                self._finish(status, body)
            else:
                self._finish(200, server.metrics.render().encode(),
                             "text/plain; version=0.0.4; charset=utf-8")
            return
        match = _WS_PATH.fullmatch(path)
        if match is None:
            self._finish(404, error_body("not found"))
            return
        if request.method != "GET":
            self._finish(405, error_body("method not allowed"), extra_headers=(("Allow", "GET"),))
            return
        agent_id, session_id = match.groups()
        if not _ID.fullmatch(agent_id) or not _ID.fullmatch(session_id):
            self._finish(400, error_body(
                "agent_id and session_id must be 1-128 characters of A-Z a-z 0-9 . _ ~ -"))
            return
        await self._handshake(request, agent_id, session_id)

    async def _handshake(self, request: Request, agent_id: str, session_id: str) -> None:
        server = self.server
        config = server.config
        metrics = server.metrics
        table = server.connections
        started = time.monotonic()
        deadline = started + config.handshake_timeout_secs

        def reject(status: int, message: str, reason: str,
                   extra: tuple[tuple[str, str], ...] = ()) -> None:
            metrics.connection_result(status)
            log_event(logging.INFO, "handshake_rejected", session_id=session_id,
                      agent_id=agent_id, status=status, reason=reason)
            self._finish(status, error_body(message), extra_headers=extra)

        problem = upgrade_problem(request)
        if problem is not None:
            status, message = problem
            extra = (("Sec-WebSocket-Version", "13"),) if status == 426 else ()
            reject(status, message, "bad_upgrade", extra)
            return
        if server.draining:
            reject(503, "shutting down", "draining")
            return
        if table.count >= config.max_connections:
            reject(503, "too many connections", "max_connections")
            return
        token = token_from_request(request.headers.get("authorization"), request.query)
        if token is None:
            reject(401, "missing bearer token", "no_token",
                   (("WWW-Authenticate", 'Bearer realm="wsproxy"'),))
            return

        table.handshaking += 1
        listener: SessionListener | None = None
        channel = down_channel(session_id)
        try:
            result = await check_token(server.command, session_id, token,
                                       config.auth_timeout_secs, config.auth_grace_period_secs)
            del token
            if result is AuthResult.FORBIDDEN:
                reject(403, "invalid token", "auth_failed")
                return
            if result is AuthResult.TIMEOUT:
                reject(504, "auth timed out waiting for Redis", "auth_timeout")
                return
            if result is AuthResult.UNAVAILABLE:
                reject(503, "Redis unavailable", "redis_unavailable")
                return

            listener = SessionListener(server.command.upstream, up_channel(session_id),
                                       table.next_conn_id(), session_id, agent_id, table)
            # Registered in the router *before* SUBSCRIBE is sent: a message that
            # arrives between the ack and the 101 waits in the listener.
            try:
                route = server.pubsub.attach(channel, listener)
            except RedisUnavailable:
                listener = None
                reject(503, "Redis unavailable", "redis_unavailable")
                return
            try:
                await server.pubsub.wait_subscribed(route,
                                                    max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                reject(504, "subscription timed out", "subscribe_timeout")
                return
            except RedisUnavailable:
                reject(503, "Redis unavailable", "subscribe_failed")
                return
            if self.lost or self.transport.is_closing():
                return
            if not self._hand_over(listener):
                metrics.connection_result(400)
                log_event(logging.INFO, "handshake_rejected", session_id=session_id,
                          agent_id=agent_id, status=400, reason="picows_rejected")
                return
            listener = None  # picows owns it now; on_ws_disconnected detaches it
            metrics.connection_result(101)
            metrics.observe_handshake(time.monotonic() - started)
        finally:
            table.handshaking -= 1
            if listener is not None:
                server.pubsub.detach(channel, listener)

    # the hand-over ---------------------------------------------------------------
    def _hand_over(self, listener: SessionListener) -> bool:
        """Give the transport to picows and replay the request; True if it upgraded."""
        config = self.server.config
        transport = self.transport
        proto = WSProtocol(
            None,                 # host_port (client side only)
            None,                 # ws_path (client side only)
            False,                # is_client_side
            lambda _request: listener,
            _PICOWS_LOGGER,
            True,                 # disconnect_on_exception
            None,                 # handshake timeout: the gate already enforced it
            False, 20, 20,        # auto-ping off: session.py runs one sweep for all sockets
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,                # auto-pong off: the listener answers and counts pings
            config.max_frame_size_bytes,
            None,                 # extra_headers
            _READ_BUFFER_INIT,
        )
        self.handed_over = True
        transport.set_protocol(proto)
        proto.connection_made(transport)
        # WSProtocol has no data_received: replay through the buffered interface.
        data = memoryview(self.buffer)
        offset = 0
        try:
            while offset < len(data):
                chunk = proto.get_buffer(-1)
                size = min(len(chunk), len(data) - offset)
                chunk[:size] = data[offset:offset + size]
                proto.buffer_updated(size)
                offset += size
                # After a refusal picows closed the transport: feeding more would
                # make it negotiate again.
                if proto.transport.is_disconnected or transport.is_closing():
                    break
        finally:
            data.release()
            self.buffer = bytearray()
        transport.resume_reading()
        # on_ws_disconnected never fires for a connection picows refused.
        return bool(listener.connected)
