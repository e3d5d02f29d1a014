"""One wsproxy process: the listening socket, Redis links, health, and its lifecycle.

start -> serve -> (SIGTERM/SIGINT) drain: /ready 503, new sockets 503, open sockets
keep working for SHUTDOWN_GRACE_PERIOD_SECS -> close each with 1001 -> exit 0.
A second signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time

import orjson

from . import _fastpath
from .config import Config
from .http import Deadlines, Gate
from .log import log_event
from .metrics import Metrics, SharedSlots
from .redis import CommandClient, PubSub
from .session import ConnectionTable

HEALTH_PING_INTERVAL_SECS = 1.0
GC_THRESHOLDS = (50_000, 20, 20)


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket (``SO_REUSEPORT`` when several workers share it)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Server:
    """Everything one wsproxy process runs."""

    def __init__(self, config: Config, sock: socket.socket | None = None,
                 slots: SharedSlots | None = None, worker: int = 0) -> None:
        self.config = config
        self.metrics = Metrics(slots, worker)
        self.command = CommandClient(config.redis)
        self.pubsub = PubSub(config.redis)
        self.connections = ConnectionTable(self.pubsub, self.metrics,
                                           config.ws_ping_interval_secs,
                                           config.ws_ping_timeout_secs)
        self.metrics.channels_active = lambda: len(self.pubsub.routes)
        self.metrics.redis_reconnects = lambda: self.command.reconnects + self.pubsub.reconnects
        # Handshake limits fire within a tick: a twentieth of a second, or a fifth
        # of a limit under a quarter second, but never under 5 ms (a sweep scans
        # every pending bucket).
        self.deadlines = Deadlines(max(0.005, min(0.05, config.auth_timeout_secs / 5,
                                                  config.handshake_timeout_secs / 5)))
        self.draining = False
        self._sock = sock
        self._server: asyncio.base_events.Server | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._redis_ok = False

    # health -------------------------------------------------------------------------
    @property
    def redis_ok(self) -> bool:
        """Both Redis connections are up and answered their last health PING, and
        every channel is subscribed again after a reconnection."""
        return (self._redis_ok and self.command.ready.is_set() and self.pubsub.ready.is_set()
                and not self.pubsub.resubscribing)

    def _instance_state(self) -> tuple[bool, bool, int]:
        """(Redis OK for every live worker, any worker draining, live workers).

        With one process that is this process; with --workers, every worker publishes
        its state in its metrics slot, so any of them can answer for the instance.
        """
        self.metrics.set_health(self.redis_ok, self.draining)
        slots = self.metrics.slots
        live = slots.live_workers()
        ok = all(slots.get(w, "redis_ok") for w in live)
        draining = any(slots.get(w, "draining") for w in live)
        return ok, draining, len(live)

    def health(self) -> tuple[int, bytes]:
        """``/health``: 200 while Redis answers, else 503."""
        ok, draining, workers = self._instance_state()
        body = {
            "status": "healthy" if ok else "unhealthy",
            "redis": "up" if ok else "down",
            "connections": self.metrics.total("active_connections"),
            "draining": draining,
            "workers": workers,
        }
        return (200 if ok else 503), orjson.dumps(body)

    def readiness(self) -> tuple[int, bytes]:
        """``/ready``: 200 while accepting sockets; 503 while draining, while Redis is
        down, or at MAX_CONNECTIONS."""
        ok, draining, _ = self._instance_state()
        if draining:
            return 503, orjson.dumps({"status": "draining"})
        if not ok:
            return 503, orjson.dumps({"status": "redis unavailable"})
        if self._full():
            return 503, orjson.dumps({"status": "at capacity"})
        return 200, orjson.dumps({"status": "ready"})

    def _full(self) -> bool:
        """Every live worker holds MAX_CONNECTIONS sockets: a new one would get 503.
        (This one counts its handshakes too; the others' slots hold open sockets.)"""
        limit = self.config.max_connections
        if self.connections.count < limit:
            return False
        slots = self.metrics.slots
        return all(slots.get(w, "active_connections") >= limit
                   for w in slots.live_workers() if w != self.metrics.worker)

    def _links_changed(self) -> None:
        # A link that just came up has answered AUTH/PING; one that went down is down.
        self._redis_ok = self.command.ready.is_set() and self.pubsub.ready.is_set()
        self.metrics.set_health(self.redis_ok, self.draining)

    async def _health_loop(self) -> None:
        """PING both connections; one that stops answering is treated as lost."""
        timeout = max(self.config.auth_timeout_secs, 0.5)
        while True:
            await asyncio.sleep(HEALTH_PING_INTERVAL_SECS)
            results = await asyncio.gather(self.command.ping(timeout), self.pubsub.ping(timeout))
            for link, ok in zip((self.command, self.pubsub), results, strict=True):
                if not ok and link.ready.is_set() and link.proto is not None:
                    log_event(logging.WARNING, "redis_stalled", role=link.role,
                              timeout=timeout)
                    link.proto.abort()
            self._redis_ok = all(results)
            self.metrics.set_health(self.redis_ok, self.draining)
            self.metrics.refresh()

    # lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to Redis (in the background) and start listening."""
        _fastpath.configure(self.config.max_message_size_bytes,
                            self.config.max_buffer_size_bytes)
        self.metrics.bind_fast_counters()
        self.command.on_state_change = self._links_changed
        self.pubsub.on_state_change = self._links_changed
        self.command.start()
        self.pubsub.start()
        self.connections.start()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        sock = self._sock or listening_socket(self.config.host, self.config.port)
        loop = asyncio.get_running_loop()
        # Everything built so far lives as long as the process: keep the collector off
        # it, and collect less often (a handshake allocates many short-lived objects,
        # nearly all freed by reference counting).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._server = await loop.create_server(lambda: Gate(self), sock=sock, backlog=4096)
        address = sock.getsockname()
        log_event(logging.INFO, "listening", host=address[0], port=address[1],
                  redis=self.config.redis.display)
        # Say clearly if Redis is not there at start; the links keep retrying.
        try:
            await asyncio.wait_for(
                asyncio.gather(self.command.ready.wait(), self.pubsub.ready.wait()), 2.0)
        except TimeoutError:
            log_event(logging.WARNING, "redis_unavailable_at_start",
                      redis=self.config.redis.display, retrying=True)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: first drain gracefully, a second closes at once."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Begin the graceful shutdown (again: skip the grace period)."""
        self._signals += 1
        if self._signals == 1:
            self.draining = True
            self.metrics.set_health(self.redis_ok, True)
            log_event(logging.INFO, "shutdown_started", signal=signal.Signals(signum).name,
                      grace_secs=self.config.shutdown_grace_period_secs,
                      connections=len(self.connections.open))
        else:
            log_event(logging.INFO, "shutdown_immediate", signal=signal.Signals(signum).name)
        self._stop.set()

    async def serve(self) -> None:
        """Run until a signal, then drain and stop."""
        await self._stop.wait()
        self._stop.clear()
        grace = self.config.shutdown_grace_period_secs
        if self._signals == 1 and grace > 0 and self.connections.open:
            waiters = [asyncio.ensure_future(self.connections.all_closed.wait()),
                       asyncio.ensure_future(self._stop.wait())]
            await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        await self.stop()

    async def stop(self) -> None:
        """Close every socket with 1001, stop listening, disconnect from Redis."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        # (A second signal, before or during the closing, ends the spread.)
        await self.connections.close_all(1001, "server shutting down",
                                          self.config.shutdown_close_spread_secs,
                                          hurry=lambda: self._signals > 1)
        # Give clients a moment to answer the CLOSE; close() aborts stragglers after 1 s.
        deadline = time.monotonic() + 1.5
        while self.connections.open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.connections.stop()
        if self._health_task is not None:
            self._health_task.cancel()
        await self.command.close()
        await self.pubsub.close()
        self.deadlines.close()
        log_event(logging.INFO, "shutdown_complete")


async def run_server(config: Config, sock: socket.socket | None = None,
                     slots: SharedSlots | None = None, worker: int = 0) -> None:
    """Start a server, serve until signalled, stop."""
    server = Server(config, sock, slots, worker)
    server.install_signal_handlers()
    await server.start()
    await server.serve()
