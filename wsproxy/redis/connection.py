"""Opening a Redis connection, and keeping one open: capped, jittered reconnects.

The protocols themselves (write coalescing, hiredis parsing, reply matching) are in
``wsproxy._fastpath``; this module decides *when* to connect and what to say first.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

from .._fastpath import RedisProtocol, encode_command
from ..config import RedisAddress
from ..log import log_event

BACKOFF_FIRST_SECS = 0.05
BACKOFF_CAP_SECS = 1.0
CONNECT_TIMEOUT_SECS = 2.0


class RedisUnavailable(ConnectionError):
    """Redis cannot be reached (not connected, or the connection dropped)."""


def backoff_delays(first: float = BACKOFF_FIRST_SECS, cap: float = BACKOFF_CAP_SECS):
    """Endless retry delays: exponential, capped, with full jitter in [d/2, d]."""
    delay = first
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(cap, delay * 2)


async def open_connection(
    address: RedisAddress, protocol_factory: Callable[[], RedisProtocol]
) -> RedisProtocol:
    """Connect to ``address`` and return the protocol (not yet authenticated)."""
    loop = asyncio.get_running_loop()
    if address.scheme == "unix":
        _, proto = await loop.create_unix_connection(protocol_factory, address.path)
    else:
        context = tls_context(address) if address.scheme == "rediss" else None
        _, proto = await loop.create_connection(
            protocol_factory, address.host, address.port, ssl=context
        )
    return proto


def tls_context(address: RedisAddress) -> ssl.SSLContext:
    """The client TLS context for a ``rediss://`` address."""
    context = ssl.create_default_context(cafile=address.tls_ca_file)
    if not address.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def hello_commands(address: RedisAddress, select_db: bool) -> list[bytes]:
    """What a new connection must say first: AUTH, then SELECT on the command connection."""
    commands = []
    if address.password is not None:
        if address.username:
            commands.append(encode_command("AUTH", address.username, address.password))
        else:
            commands.append(encode_command("AUTH", address.password))
    if select_db and address.db:
        commands.append(encode_command("SELECT", address.db))
    return commands


class ReconnectingLink:
    """Keeps one connection to Redis open; subclasses say what to do once it is.

    ``proto`` is the live protocol or ``None``. ``ready`` is an asyncio.Event set
    while the connection is usable.
    """

    role = "redis"

    def __init__(self, address: RedisAddress) -> None:
        self.address = address
        self.proto: Any = None
        self.ready = asyncio.Event()
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._closed = False
        self._ever_connected = False
        self.on_state_change: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Begin connecting, in the background, for as long as the link lives."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.proto is not None:
            self.proto.abort()

    def make_protocol(self) -> RedisProtocol:
        """A new protocol instance for the next connection."""
        raise NotImplementedError

    async def on_connected(self, proto: Any) -> None:
        """Authenticate and set the connection up; raise to retry."""
        raise NotImplementedError

    def on_disconnected(self, proto: Any, exc: BaseException | None) -> None:
        """The connection ``proto`` is gone: fail what waited on it."""

    # called by the protocol ---------------------------------------------------
    def connection_made(self, proto: Any) -> None:
        pass

    def connection_lost(self, proto: Any, exc: BaseException | None) -> None:
        if proto is self.proto:
            self.proto = None
            was_ready = self.ready.is_set()
            self.ready.clear()
            self._lost.set()
            self.on_disconnected(proto, exc)
            if was_ready and not self._closed:
                log_event(logging.WARNING, "redis_down", role=self.role,
                          redis=self.address.display, error=str(exc) if exc else "closed")
            self.on_state_change()
        else:
            self.on_disconnected(proto, exc)

    def protocol_error(self, proto: Any, exc: BaseException) -> None:
        log_event(logging.ERROR, "redis_protocol_error", role=self.role, error=str(exc))

    # the loop -----------------------------------------------------------------
    async def _run(self) -> None:
        delays = backoff_delays()
        failing = False
        while not self._closed:
            proto = None
            try:
                proto = await asyncio.wait_for(
                    open_connection(self.address, self.make_protocol), CONNECT_TIMEOUT_SECS
                )
                self.proto = proto
                self._lost.clear()
                # Redis may have closed it already (at maxclients it accepts, answers
                # -ERR and closes): its connection_lost came before it was ours.
                if not proto.connected:
                    raise RedisUnavailable("connection closed by Redis")
                await asyncio.wait_for(self.on_connected(proto), CONNECT_TIMEOUT_SECS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: retry later
                if proto is not None:
                    proto.abort()
                    self.proto = None
                if not failing:  # say it once per outage, not once per retry
                    failing = True
                    log_event(logging.WARNING, "redis_connect_failed", role=self.role,
                              redis=self.address.display,
                              error=str(exc) or type(exc).__name__, retrying=True)
                await asyncio.sleep(next(delays))
                continue
            failing = False
            if self._ever_connected:
                self.reconnects += 1
            self._ever_connected = True
            self.ready.set()
            up_since = time.monotonic()
            log_event(logging.INFO, "redis_up", role=self.role, redis=self.address.display)
            self.on_state_change()
            await self._lost.wait()
            # The back-off starts over only after a connection that lasted: one that
            # Redis drops at once (over and over) is retried ever more slowly.
            if time.monotonic() - up_since >= BACKOFF_CAP_SECS:
                delays = backoff_delays()
            if not self._closed:
                await asyncio.sleep(next(delays))


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def wait_until(fut: asyncio.Future[Any], timeout: float) -> Any:
    """Await ``fut``, raising TimeoutError after ``timeout`` seconds.

    Cheaper than ``asyncio.wait_for`` on the handshake path (no extra task or waiter);
    ``fut`` must be the caller's own future: a timeout sets its exception.
    """
    handle = asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        handle.cancel()


async def expect_ok(fut: asyncio.Future[Any], what: str) -> None:
    """Await a reply and raise RedisUnavailable unless it is not an error."""
    reply = await fut
    if isinstance(reply, Exception):
        raise RedisUnavailable(f"{what} failed: {reply}")
