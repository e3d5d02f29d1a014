"""The HTTP/1.1 gate in front of picows.

picows writes the 101 as soon as its listener factory returns, so nothing async can
happen before the upgrade through its public API. Every TCP connection therefore
starts with a :class:`Gate`: it reads the request head, answers plain HTTP itself
(``/health``, ``/ready``, ``/metrics``, errors), runs auth and the SUBSCRIBE, and only
then hands the live transport to picows' ``WSProtocol``: ``_fastpath.accept_upgrade``
writes the 101 and puts the protocol in its frame-reading state (or, should picows'
layout not be the one it knows, picows is given the request to negotiate itself).
The hand-over relies on picows internals: picows is pinned exactly in pyproject.toml
and ``tests/test_handover.py`` fails loudly if an upgrade breaks it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # internal API, see above

from ._fastpath import (
    READ_BUFFER_INIT,
    HeadError,
    Route,
    SessionListener,
    TransportForPicows,
    accept_upgrade,
    parse_head,
    picows_layout_matches,
)
from .auth import AuthResult, auth_key, auth_result, token_from_request
from .log import log_event
from .redis import RedisUnavailable
from .session import down_channel, up_channel

if TYPE_CHECKING:
    from .server import Server

MAX_HEAD_BYTES = 16 * 1024  # picows refuses request heads of this size too
_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_WS_PATH = re.compile(r"/([^/]*)/ws/([^/]*)")
MAX_HEADERS = 128
# An adapter, not a Logger: picows builds a child Logger per connection from a Logger
# (memory and time per socket), but uses an adapter as it is.
_PICOWS_LOGGER = logging.LoggerAdapter(logging.getLogger("picows.server"), {})
# What picows is given to negotiate: the gate has checked the client's own head.
_REPLAY_HEAD = (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ")


class BadRequest(ValueError):
    """The request head is not HTTP/1.1 we can read; the message says why."""

    status = 400


class TooManyHeaders(BadRequest):
    """More header lines than any WebSocket client sends."""

    status = 431


@dataclass
class Request:
    """The parts of a request head the gate needs."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]  # lower-case names; the first of repeated headers wins


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and headers (without the final CRLF CRLF): HTTP/1.x only,
    header names RFC 9110 tokens, no control characters but HTAB, no repeated
    Content-Length. The scan itself is compiled (``_fastpath.parse_head``)."""
    if head.count(b"\r\n") > MAX_HEADERS:
        raise TooManyHeaders(f"more than {MAX_HEADERS} headers")
    try:
        method, target, version, headers = parse_head(head)
    except HeadError as exc:
        raise BadRequest(str(exc)) from None
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
    except ValueError:  # binascii.Error, or a key with bytes beyond ASCII
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    if "content-length" in request.headers and request.headers["content-length"] != "0":
        return 400, "a WebSocket upgrade has no body"
    if "transfer-encoding" in request.headers:
        return 400, "a WebSocket upgrade has no body"
    return None


def http_response(status: int, body: bytes, content_type: str = "application/json",
                  extra_headers: tuple[tuple[str, str], ...] = (),
                  head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection; to a HEAD request
    (``head_only``), the same head without the body."""
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def error_body(message: str) -> bytes:
    """``{"error": message}``."""
    return orjson.dumps({"error": message})


class Deadlines:
    """The gates' time limits with one timer for all, instead of a timer each.

    A gate's deadline puts it in the bucket of the ``tick`` it falls in; a gate that
    is done waiting takes itself out. One timer, armed while any bucket is filled,
    sweeps the buckets that are due every tick and calls their gates'
    ``_on_timeout``: a limit fires at most one tick late. (Per connection this is a
    set insert and a discard, where a loop timer cost an allocation, a timer-heap
    insert, a cancel and a handle close.)
    """

    __slots__ = ("tick", "_buckets", "_timer")

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self._buckets: dict[int, set[Gate]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, gate: Gate, delay: float) -> int:
        """Call ``gate._on_timeout()`` once ``delay`` seconds have passed, unless it is
        removed first; returns the key to remove it with."""
        key = math.ceil((time.monotonic() + delay) / self.tick)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
        bucket.add(gate)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick, self._sweep)
        return key

    def remove(self, gate: Gate, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(gate)
            if not bucket:
                del self._buckets[key]

    def __len__(self) -> int:
        """Gates waiting on a deadline."""
        return sum(len(b) for b in self._buckets.values())

    def close(self) -> None:
        """Stop the timer (the process is shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        now_key = time.monotonic() / self.tick
        for key in sorted(k for k in self._buckets if k <= now_key):
            bucket = self._buckets[key]
            for gate in list(bucket):
                # A timeout can end other gates (their remove() empties their slot
                # here): only those still waiting on this deadline are timed out.
                if gate not in bucket:
                    continue
                bucket.discard(gate)
                try:
                    gate._on_timeout()
                except Exception:  # noqa: BLE001 - one gate must not stop the others'
                    logging.getLogger("wsproxy").exception("handshake timeout failed")
            if not bucket:
                del self._buckets[key]
        # (A timeout that added a deadline has already armed the next sweep.)
        if self._buckets and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick, self._sweep)


# Where a gate is in its connection's life.
_READING = 0       # waiting for the complete request head
_AUTH = 1          # GET session:{sid}:auth sent, waiting for the reply
_SUBSCRIBING = 2   # SUBSCRIBE sent, waiting for Redis' confirmation
_DONE = 3          # answered, handed over, or abandoned


class Gate(asyncio.Protocol):
    """One TCP connection until it is answered or handed over to picows.

    The handshake is a chain of callbacks, not a task: the request head is handled
    in ``data_received``, the auth reply and the subscription ack call back from
    the Redis connections' reads, and one deadline at a time (``Deadlines``) bounds
    each wait.
    """

    __slots__ = ("server", "transport", "buffer", "timer", "state", "lost", "head_end", "head_only",
                 "started", "deadline", "session_id", "agent_id", "token", "ws_key",
                 "listener", "route", "channel")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: Any = None
        self.buffer = bytearray()
        self.timer: int | None = None  # a Deadlines key while a limit runs
        self.state = _READING
        self.lost = False
        self.head_end = 0
        self.head_only = False  # a HEAD request: every answer goes without its body
        self.started = 0.0
        self.deadline = 0.0
        self.session_id = ""
        self.agent_id = ""
        self.token: str | None = None
        self.ws_key = b""
        self.listener: SessionListener | None = None
        self.route: Route | None = None
        self.channel = b""

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # A client that sends nothing, or trickles its head, is dropped after the
        # handshake timeout.
        self.timer = self.server.deadlines.add(self, self.server.config.handshake_timeout_secs)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.state != _READING:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) >= MAX_HEAD_BYTES:
                self._finish(431, error_body("request head too large"))
                self.state = _DONE
            return
        if end + 4 > MAX_HEAD_BYTES:
            self._finish(431, error_body("request head too large"))
            self.state = _DONE
            return
        self._cancel_timer()
        # Hold further bytes in the kernel while auth runs: memory stays bounded.
        self.transport.pause_reading()
        self.head_end = end
        self.state = _DONE  # until a handshake starts
        try:
            self._route()
        except Exception:  # noqa: BLE001 - the process must not die for one request
            self._internal_error()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if self.state == _SUBSCRIBING and self.route is not None:
            self.server.pubsub.forget_waiter(self.route, self._on_subscribed)
        if self.state in (_AUTH, _SUBSCRIBING):
            self._end()  # a reply that comes later finds the gate done

    # answering -------------------------------------------------------------------
    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.server.deadlines.remove(self, self.timer)
            self.timer = None

    def _finish(self, status: int, body: bytes, content_type: str = "application/json",
                extra_headers: tuple[tuple[str, str], ...] = ()) -> None:
        if self.lost or self.transport.is_closing():
            return
        self.transport.write(http_response(status, body, content_type, extra_headers,
                                           self.head_only))
        self.transport.close()

    def _internal_error(self) -> None:
        logging.getLogger("wsproxy").exception("request handling failed")
        self.server.metrics.count_error("internal")
        self._finish(500, error_body("internal error"))
        if self.state in (_AUTH, _SUBSCRIBING):
            self._end()

    def _reject(self, status: int, message: str, reason: str,
                extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Refuse the upgrade with ``status``; counted, logged, answered."""
        self.server.metrics.connection_result(status)
        log_event(logging.INFO, "handshake_rejected", session_id=self.session_id,
                  agent_id=self.agent_id, status=status, reason=reason)
        self._finish(status, error_body(message), extra_headers=extra)

    def _fail(self, status: int, message: str, reason: str) -> None:
        """Refuse a handshake already under way, and release what it holds."""
        self._reject(status, message, reason)
        self._end()

    def _end(self) -> None:
        """The handshake is over (upgraded, refused or abandoned): stop counting it,
        and unsubscribe unless picows took the listener."""
        self.state = _DONE
        self._cancel_timer()
        self.token = None
        server = self.server
        server.connections.handshaking -= 1
        if self.listener is not None:
            server.pubsub.detach(self.channel, self.listener)
            self.listener = None
        self.route = None

    def _on_timeout(self) -> None:
        self.timer = None
        state = self.state
        if state == _READING:
            if not self.lost:
                log_event(logging.INFO, "handshake_timeout", received=len(self.buffer))
                self.state = _DONE
                self.transport.abort()
        elif state == _AUTH:
            self._fail(504, "auth timed out waiting for Redis", "auth_timeout")
        elif state == _SUBSCRIBING:
            if self.route is not None:
                self.server.pubsub.forget_waiter(self.route, self._on_subscribed)
            self._fail(504, "subscription timed out", "subscribe_timeout")

    # routing ---------------------------------------------------------------------
    def _route(self) -> None:
        server = self.server
        try:
            request = parse_request_head(bytes(self.buffer[:self.head_end]))
        except BadRequest as exc:
            self._finish(exc.status, error_body(str(exc)))
            return
        path = request.path
        self.head_only = request.method == "HEAD"
        if path in ("/health", "/ready", "/metrics"):
            if request.method != "GET" and not self.head_only:
                self._finish(405, error_body("method not allowed"),
                             extra_headers=(("Allow", "GET, HEAD"),))
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
        # From here on a refusal is a refused upgrade: counted and logged.
        if request.method != "GET":
            self._reject(405, "method not allowed", "method", extra=(("Allow", "GET"),))
            return
        agent_id, session_id = match.groups()
        if not _ID.fullmatch(agent_id) or not _ID.fullmatch(session_id):
            self._reject(400, "agent_id and session_id must be 1-128 characters of "
                         "A-Z a-z 0-9 . _ ~ -", "invalid id")
            return
        self.agent_id = agent_id
        self.session_id = session_id
        self._start_handshake(request)

    # the handshake: token, GET, EXPIRE, SUBSCRIBE, ack, 101 -------------------------
    def _start_handshake(self, request: Request) -> None:
        server = self.server
        config = server.config
        table = server.connections
        self.started = time.monotonic()
        self.deadline = self.started + config.handshake_timeout_secs

        problem = upgrade_problem(request)
        if problem is not None:
            status, message = problem
            extra = (("Sec-WebSocket-Version", "13"),) if status == 426 else ()
            self._reject(status, message, "bad_upgrade", extra)
            return
        if server.draining:
            self._reject(503, "shutting down", "draining")
            return
        if table.count >= config.max_connections:
            self._reject(503, "too many connections", "max_connections")
            return
        token = token_from_request(request.headers.get("authorization"), request.query)
        if token is None:
            self._reject(401, "missing bearer token", "no_token",
                         (("WWW-Authenticate", 'Bearer realm="wsproxy"'),))
            return

        self.ws_key = request.headers["sec-websocket-key"].encode("latin-1")
        self.token = token
        self.state = _AUTH
        table.handshaking += 1
        try:
            server.command.execute_cb(self._on_auth_reply, "GET", auth_key(self.session_id))
        except RedisUnavailable:
            self._fail(503, "Redis unavailable", "redis_unavailable")
            return
        self.timer = server.deadlines.add(
            self, min(config.auth_timeout_secs, config.handshake_timeout_secs))

    def _on_auth_reply(self, reply: Any) -> None:
        if self.state != _AUTH:
            return  # timed out, or the client left
        try:
            self._after_auth(reply)
        except Exception:  # noqa: BLE001 - the process must not die for one request
            self._internal_error()

    def _after_auth(self, reply: Any) -> None:
        server = self.server
        self._cancel_timer()
        token, self.token = self.token, None
        result = auth_result(reply, token or "")
        if result is AuthResult.FORBIDDEN:
            self._fail(403, "invalid token", "auth_failed")
            return
        if result is not AuthResult.OK:
            self._fail(503, "Redis unavailable", "redis_unavailable")
            return
        session_id = self.session_id
        try:
            server.command.execute_noreply("EXPIRE", auth_key(session_id),
                                           server.config.auth_grace_period_secs)
        except RedisUnavailable:
            self._fail(503, "Redis unavailable", "redis_unavailable")
            return
        if self.lost or self.transport.is_closing():
            self._end()
            return
        table = server.connections
        listener = SessionListener(server.command.upstream, up_channel(session_id),
                                   table.next_conn_id(), session_id, self.agent_id, table)
        channel = down_channel(session_id)
        # Registered in the router *before* SUBSCRIBE is sent: a message that
        # arrives between the ack and the 101 waits in the listener.
        try:
            route = server.pubsub.attach(channel, listener)
        except RedisUnavailable:
            self._fail(503, "Redis unavailable", "redis_unavailable")
            return
        self.listener = listener
        self.channel = channel
        self.route = route
        if server.pubsub.when_subscribed(route, self._on_subscribed):
            self._upgrade()  # another socket of the session is already subscribed
            return
        self.state = _SUBSCRIBING
        self.timer = server.deadlines.add(self, max(0.0, self.deadline - time.monotonic()))

    def _on_subscribed(self, error: BaseException | None) -> None:
        if self.state != _SUBSCRIBING:
            return
        try:
            self._cancel_timer()
            if error is not None:
                self._fail(503, "Redis unavailable", "subscribe_failed")
            else:
                self._upgrade()
        except Exception:  # noqa: BLE001 - the process must not die for one request
            self._internal_error()

    def _upgrade(self) -> None:
        listener = self.listener
        assert listener is not None
        if self.lost or self.transport.is_closing():
            self._end()
            return
        if self.server.draining:
            # The signal came during auth or the subscription: a 101 now would be
            # cut off by the exit (no socket was open, so no grace period runs).
            self._fail(503, "shutting down", "draining")
            return
        if not self._hand_over(listener):
            # picows answered 400 and closed the connection itself: _fail writes nothing.
            self._fail(400, "WebSocket upgrade refused", "picows_rejected")
            return
        self.listener = None  # picows owns it now; on_ws_disconnected detaches it
        metrics = self.server.metrics
        metrics.connection_result(101)
        metrics.observe_handshake(time.monotonic() - self.started)
        self._end()

    # the hand-over ---------------------------------------------------------------
    def _hand_over(self, listener: SessionListener) -> bool:
        """Give the transport to picows; True if it upgraded.

        The gate has already checked every header. Where picows' layout is the one
        ``_fastpath.accept_upgrade`` knows (always, with the pinned version), that writes
        the 101 and connects the listener without picows parsing the request again:
        picows' own negotiation was a third of a handshake's instructions. Otherwise
        picows is given the smallest request that says the same about the upgrade (the
        key) to negotiate itself. Either way, whatever the client sent after its head
        (early frames) follows.
        """
        transport = self.transport
        view = TransportForPicows(transport)
        fast = fast_upgrade_available()
        proto = _picows_protocol(lambda _request: listener,
                                 self.server.config.max_frame_size_bytes)
        transport.set_protocol(proto)
        try:
            if fast:
                accept_upgrade(proto, view, listener, self.ws_key, _PICOWS_LOGGER,
                               asyncio.get_running_loop())
            else:
                proto.connection_made(view)
        except BaseException:
            # picows' protocol may be half set up: the gate takes the connection back,
            # and its caller answers 500.
            transport.set_protocol(self)
            raise
        start = self.head_end + 4
        if not fast:
            self._feed(proto, b"".join((_REPLAY_HEAD, self.ws_key, b"\r\n\r\n",
                                        memoryview(self.buffer)[start:])))
        elif len(self.buffer) > start:
            self._feed(proto, memoryview(self.buffer)[start:])
        self.buffer = bytearray()
        transport.resume_reading()
        # on_ws_disconnected never fires for a connection picows refused.
        return bool(listener.connected)

    def _feed(self, proto: Any, data: Any) -> None:
        """Bytes into picows' protocol (WSProtocol has no data_received: through its
        buffered interface), until they end or picows ends the connection."""
        transport = self.transport
        with memoryview(data) as view:
            offset = 0
            while offset < len(view):
                chunk = proto.get_buffer(-1)
                size = min(len(chunk), len(view) - offset)
                chunk[:size] = view[offset:offset + size]
                proto.buffer_updated(size)
                offset += size
                # After a refusal or a protocol error picows has closed, or sent its
                # CLOSE: feeding more would make it parse again.
                ws = proto.transport
                if ws.is_disconnected or ws.is_close_frame_sent or transport.is_closing():
                    break


def _picows_protocol(listener_factory: Any, max_frame_size: int, idle: float = 20,
                     reply: float = 20) -> Any:
    """A server-side picows WSProtocol, built the way ``picows.api.ws_create_server``
    builds one, with wsproxy's settings."""
    return WSProtocol(
        None,                 # host_port (client side only)
        None,                 # ws_path (client side only)
        False,                # is_client_side
        listener_factory,
        _PICOWS_LOGGER,
        True,                 # disconnect_on_exception
        None,                 # handshake timeout: the gate already enforced it
        False, idle, reply,   # auto-ping off: session.py runs one sweep for all sockets
        WSAutoPingStrategy.PING_WHEN_IDLE,
        False,                # auto-pong off: the listener answers and counts pings
        max_frame_size,
        None,                 # extra_headers
        READ_BUFFER_INIT,     # small, so idle sockets are cheap (grows for large frames)
    )


_fast_upgrade: bool | None = None


def fast_upgrade_available() -> bool:
    """Whether ``_fastpath.accept_upgrade`` may upgrade connections: picows' WSProtocol
    reads back as built through the layout it assumes. Checked once per process, on a
    probe object, with a running loop."""
    global _fast_upgrade
    if _fast_upgrade is None:
        def factory(_request: Any) -> None:
            return None
        idle, reply, max_frame = 21.5, 22.5, 1_234_567
        probe = _picows_protocol(factory, max_frame, idle, reply)
        _fast_upgrade = bool(picows_layout_matches(
            probe, factory, _PICOWS_LOGGER, asyncio.get_running_loop(), max_frame, idle,
            reply))
        if not _fast_upgrade:
            log_event(logging.WARNING, "picows_layout_unknown",
                      detail="upgrades go through picows' own negotiation")
    return _fast_upgrade
