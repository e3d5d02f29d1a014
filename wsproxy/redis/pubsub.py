"""The pub/sub connection and the channel router.

One connection per process carries every ``session:{sid}:down`` subscription.
Subscriptions are reference-counted per channel: the first socket of a session
subscribes, the last one to go unsubscribes, and an older socket's close never
silences a newer one. Redis answers (un)subscribe and PING in order, so the
control replies are matched to a FIFO of what we sent. ``message`` pushes never
reach Python: ``_fastpath.PubSubProtocol`` routes them to their sockets.

After a reconnect every live channel is subscribed again, in batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .._fastpath import PubSubProtocol, Route, RouteTable, SessionListener, encode_command
from ..config import RedisAddress
from ..log import log_event
from .connection import (
    ReconnectingLink,
    RedisUnavailable,
    expect_ok,
    hello_commands,
    wait_until,
)

RESUBSCRIBE_BATCH = 500


def _notify(route: Route, error: BaseException | None) -> None:
    """Tell everyone waiting for ``route``'s SUBSCRIBE how it went, once."""
    waiters, route.waiters = route.waiters, []
    for waiter in waiters:
        waiter(error)


class PubSub(ReconnectingLink):
    """The process' pub/sub connection, with the channel -> Route table."""

    role = "pubsub"

    def __init__(self, address: RedisAddress) -> None:
        super().__init__(address)
        self.routes = RouteTable()
        # What each control reply answers, in order: (kind, Route | Future | None).
        self._expected: deque[tuple[str, Any]] = deque()
        self._resubscribe_task: asyncio.Task[None] | None = None
        # True from a reconnection until every channel live before it is subscribed
        # again: /health and /ready say 503 meanwhile.
        self.resubscribing = False

    def make_protocol(self) -> PubSubProtocol:
        return PubSubProtocol(self, self.routes, self._on_control)

    # connection lifecycle ------------------------------------------------------
    async def on_connected(self, proto: Any) -> None:
        loop = asyncio.get_running_loop()
        # AUTH if set, then PING: the link is up once Redis has answered on this
        # connection, not when it merely accepted it (at maxclients Redis accepts,
        # answers -ERR and closes).
        hello = [("AUTH", c) for c in hello_commands(self.address, select_db=False)]
        for what, command in [*hello, ("PING", encode_command("PING"))]:
            fut = loop.create_future()
            self._expected.append(("reply", fut))
            proto.send(command)
            await expect_ok(fut, what)
        if self.routes:
            self.resubscribing = True
            self._resubscribe_task = loop.create_task(self._resubscribe(proto))

    async def _resubscribe(self, proto: Any) -> None:
        """Subscribe every live channel again, a batch at a time."""
        try:
            await self._resubscribe_batches(proto)
        finally:
            if self._resubscribe_task is asyncio.current_task():
                self.resubscribing = False
                self.on_state_change()

    async def _resubscribe_batches(self, proto: Any) -> None:
        channels = list(self.routes)
        started = asyncio.get_running_loop().time()
        for i in range(0, len(channels), RESUBSCRIBE_BATCH):
            if proto is not self.proto:
                return
            batch = [c for c in channels[i:i + RESUBSCRIBE_BATCH] if c in self.routes]
            if not batch:
                continue
            for channel in batch:
                self._expected.append(("subscribe", self.routes[channel]))
            # One SUBSCRIBE per channel, in one write: each gets exactly one reply,
            # its ack or its error (a SUBSCRIBE of many channels that is refused, by
            # an ACL say, gets one error for all of them, and the replies expected
            # after it would be matched to the wrong requests).
            proto.send(b"".join([encode_command("SUBSCRIBE", c) for c in batch]))
            # Redis answers in order: the PING's reply means the batch is acknowledged.
            done = asyncio.get_running_loop().create_future()
            self._expected.append(("reply", done))
            proto.send(encode_command("PING"))
            try:
                await done
            except RedisUnavailable:
                return
        log_event(logging.INFO, "redis_resubscribed", channels=len(channels),
                  seconds=round(asyncio.get_running_loop().time() - started, 3))

    def on_disconnected(self, proto: Any, exc: BaseException | None) -> None:
        error = RedisUnavailable(str(exc) if exc else "pub/sub connection closed")
        expected, self._expected = self._expected, deque()
        for kind, target in expected:
            if kind == "reply" and target is not None and not target.done():
                target.set_exception(error)
        # A waiter told of the error may detach its socket and so drop its route:
        # walk a copy.
        for route in list(self.routes.values()):
            route.subscribed = False
            _notify(route, error)

    # control replies ----------------------------------------------------------
    def _on_control(self, reply: Any) -> None:
        if not self._expected:
            log_event(logging.WARNING, "redis_unexpected_reply", role=self.role,
                      reply=repr(reply)[:200])
            return
        kind, target = self._expected.popleft()
        if kind == "subscribe":
            route: Route = target
            if isinstance(reply, Exception):
                _notify(route, RedisUnavailable(f"SUBSCRIBE failed: {reply}"))
                self._refused(route, reply)
                return
            # The ack may be for a route that was dropped meanwhile: harmless.
            route.subscribed = True
            _notify(route, None)
        elif kind == "reply" and target is not None and not target.done():
            target.set_result(reply)

    def _refused(self, route: Route, reply: Exception) -> None:
        """Redis refused a channel's SUBSCRIBE (an ACL, say). A socket still in its
        handshake is answered 503 by its gate; open sockets of the channel, which were
        subscribed before a reconnection, would silently receive nothing: they are
        closed, and their clients may reconnect. The route goes now (its sockets'
        detach finds nothing to do), so the next socket of the channel sends its own
        SUBSCRIBE instead of waiting on this one."""
        if self.routes.get(route.channel) is route:
            del self.routes[route.channel]
        open_sockets = [listener for listener in route.listeners if listener.connected]
        log_event(logging.WARNING, "redis_subscribe_refused", channel=route.channel.decode(
            "utf-8", "replace"), error=str(reply)[:200], closing=len(open_sockets))
        for listener in open_sockets:
            listener.close(1011, "subscription refused by Redis")

    # subscriptions ------------------------------------------------------------
    def attach(self, channel: bytes, listener: SessionListener) -> Route:
        """Register ``listener`` for ``channel`` *before* anything is sent to Redis,
        subscribing if it is the channel's first socket. Then wait for Redis' ack with
        :meth:`when_subscribed`. Raises RedisUnavailable if the connection is down."""
        proto = self.proto
        if proto is None or not self.ready.is_set():
            raise RedisUnavailable("pub/sub connection is down")
        route = self.routes.get(channel)
        if route is None:
            route = Route(channel)
            self.routes[channel] = route
            route.add(listener)
            self._expected.append(("subscribe", route))
            proto.send(encode_command("SUBSCRIBE", channel))
        else:
            route.add(listener)
        return route

    @staticmethod
    def when_subscribed(route: Route, callback: Callable[[BaseException | None], None]) -> bool:
        """True if Redis already confirmed the route's SUBSCRIBE. Otherwise False, and
        ``callback(None)`` runs once it does, or ``callback(error)`` if the
        subscription fails or the connection drops first. A caller that gives up
        takes its callback back with :meth:`forget_waiter`."""
        if route.subscribed:
            return True
        route.waiters.append(callback)
        return False

    @staticmethod
    def forget_waiter(route: Route, callback: Callable[[BaseException | None], None]) -> None:
        """Undo :meth:`when_subscribed` (the caller timed out or its client left)."""
        try:
            route.waiters.remove(callback)
        except ValueError:
            pass

    async def wait_subscribed(self, route: Route, timeout: float) -> None:
        """Return once Redis confirmed the route's SUBSCRIBE; TimeoutError after
        ``timeout`` seconds, RedisUnavailable if the subscription failed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(error: BaseException | None) -> None:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

        if self.when_subscribed(route, done):
            return
        try:
            await wait_until(waiter, timeout)
        finally:
            self.forget_waiter(route, done)

    def detach(self, channel: bytes, listener: SessionListener) -> None:
        """Remove ``listener``; unsubscribe when it was the channel's last socket."""
        route = self.routes.get(channel)
        if route is None:
            return
        if not route.remove(listener):
            return
        if len(route):
            return
        del self.routes[channel]
        _notify(route, RedisUnavailable("subscription abandoned"))
        proto = self.proto
        # Also while the link is still setting up (not ready yet): a re-subscription
        # batch holding this channel may already be on its way.
        if proto is not None and proto.connected:
            self._expected.append(("unsubscribe", None))
            proto.send(encode_command("UNSUBSCRIBE", channel))

    async def ping(self, timeout: float) -> bool:
        """True if the pub/sub connection answered PING within ``timeout``."""
        proto = self.proto
        if proto is None or not self.ready.is_set():
            return False
        fut = asyncio.get_running_loop().create_future()
        self._expected.append(("reply", fut))
        proto.send(encode_command("PING"))
        try:
            await wait_until(fut, timeout)
            return True
        except (TimeoutError, RedisUnavailable):
            return False
