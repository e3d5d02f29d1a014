"""The open sockets of this process: their lifecycle, heartbeat and closing.

Each socket is a ``_fastpath.SessionListener`` (the per-message work is compiled);
this table hears its rare events -- connected, disconnected, too slow -- and runs
the heartbeat sweep over all of them, once a tick, instead of a timer per socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _fastpath
from ._fastpath import SessionListener
from .log import log_event

if TYPE_CHECKING:
    from .metrics import Metrics
    from .redis import PubSub

SLOW_CLIENT_ABORT_SECS = 1.0
# The heartbeat pass goes over the sockets in steps this far apart at most, and pings
# at least this many sockets a step when that many are due.
PING_SWEEP_STEP = 0.05
MIN_PINGS_PER_STEP = 16


def down_channel(session_id: str) -> bytes:
    """The channel a session's messages to the client arrive on."""
    return f"session:{session_id}:down".encode()


def up_channel(session_id: str) -> bytes:
    """The channel a session's client messages are published to."""
    return f"session:{session_id}:up".encode()


class ConnectionTable:
    """Every socket of the process, from SUBSCRIBE to close."""

    def __init__(self, pubsub: PubSub, metrics: Metrics, ping_interval: float,
                 ping_timeout: float) -> None:
        self.pubsub = pubsub
        self.metrics = metrics
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        # The open sockets, in the order they opened, each with when (time.monotonic()).
        self.open: dict[SessionListener, float] = {}
        self.handshaking = 0  # handshakes past the path check, not yet open or failed
        self._ids = itertools.count(1)
        self._heartbeat: asyncio.Task[None] | None = None
        self.all_closed = asyncio.Event()
        self.all_closed.set()

    @property
    def count(self) -> int:
        """Open sockets plus handshakes under way: what MAX_CONNECTIONS limits."""
        return len(self.open) + self.handshaking

    def next_conn_id(self) -> int:
        """A process-unique id for the next connection, for logs."""
        return next(self._ids)

    # listener events -----------------------------------------------------------
    def connected(self, listener: SessionListener) -> None:
        self.open[listener] = time.monotonic()
        self.all_closed.clear()
        self.metrics.active_connections = len(self.open)
        log_event(logging.INFO, "connection_open", session_id=listener.session_id,
                  conn_id=listener.conn_id, agent_id=listener.agent_id)

    def disconnected(self, listener: SessionListener) -> None:
        self.pubsub.detach(down_channel(listener.session_id), listener)
        opened = self.open.pop(listener, None)
        self.metrics.active_connections = len(self.open)
        code = listener.close_code if listener.close_code is not None else 1006
        reason = listener.close_reason or "connection lost"
        log_event(logging.INFO, "connection_close", session_id=listener.session_id,
                  conn_id=listener.conn_id, code=code, reason=reason,
                  seconds=round(time.monotonic() - opened, 3) if opened else None)
        if not self.open:
            self.all_closed.set()

    def too_slow(self, listener: SessionListener) -> None:
        log_event(logging.WARNING, "client_too_slow", session_id=listener.session_id,
                  conn_id=listener.conn_id, buffered=listener.write_buffer_size)
        # Not from inside the transport's write call that reported it.
        asyncio.get_running_loop().call_soon(
            listener.close, 1008, "client too slow", SLOW_CLIENT_ABORT_SECS)

    # heartbeat ------------------------------------------------------------------
    def start(self) -> None:
        """Start the heartbeat sweep."""
        _fastpath.set_clock(time.monotonic())
        self._heartbeat = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Stop the heartbeat sweep."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except asyncio.CancelledError:
                pass

    async def _sweep_forever(self) -> None:
        # Every socket is looked at once a pass, and a pass well under both periods
        # keeps pings and timeouts within a quarter period of their due time. A pass
        # is cut into steps of at most PING_SWEEP_STEP, each looking at its share of
        # the sockets, so neither the look (a cache miss or two a socket) nor the
        # pings it sends come all at once.
        period = max(0.02, min(1.0, self.ping_interval / 4,
                               (self.ping_timeout - self.ping_interval) / 4))
        step = period / math.ceil(period / PING_SWEEP_STEP)  # a pass takes one period
        # Sockets that connected together fall due for a ping together: thousands of
        # pings at once held up every message for tens of milliseconds (5,000 idle
        # sockets at the default settings: P99.9 16 to 44 ms, worst 30 to 67 ms). A
        # step sends at most enough pings to reach every socket within a quarter of the
        # interval (or of the slack between a ping and the timeout, if shorter); the
        # others are pinged on a later pass, and from then on their pings stay spread.
        spread = max(step, min(self.ping_interval, self.ping_timeout - self.ping_interval) / 4)
        sockets: list[SessionListener] = []
        at = 0
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            _fastpath.set_clock(now)
            if at >= len(sockets):
                # A new pass, in the order the sockets opened (were it an order that can
                # change from one pass to the next, a socket checked first in one pass
                # and last in the next would wait two periods); those closed since are
                # skipped.
                sockets, at = list(self.open), 0
                share = max(1, math.ceil(len(sockets) * step / period))
                budget = max(MIN_PINGS_PER_STEP, math.ceil(len(sockets) * step / spread))
            closed = _fastpath.heartbeat_sweep(sockets[at:at + share], now,
                                               self.ping_interval, self.ping_timeout, budget)
            at += share
            if closed:
                log_event(logging.INFO, "heartbeat_timeouts", closed=closed)

    # shutdown -------------------------------------------------------------------
    async def close_all(self, code: int, reason: str, spread_secs: float = 0.0,
                        hurry: Callable[[], bool] = lambda: False) -> None:
        """Close every open socket with ``code``, spread over ``spread_secs``; once
        ``hurry()`` is true (a second signal), the rest at once."""
        listeners = list(self.open)
        if not listeners:
            return
        delay = spread_secs / len(listeners) if spread_secs > 0 else 0.0
        for i, listener in enumerate(listeners):
            listener.close(code, reason, 1.0)
            if delay and i + 1 < len(listeners) and not hurry():
                await asyncio.sleep(delay)
