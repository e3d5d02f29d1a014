"""Prometheus metrics, kept in shared memory and rendered as text on scrape.

Every worker process owns one *slot* of int64 counters in an anonymous shared mapping
that the supervisor creates before forking (one slot when there is one process). The
per-message counters of ``_fastpath`` point straight into the slot, so the hot path
pays one add and no copy; the per-connection ones are written here. A scrape that
lands on any worker sums every slot, so ``/metrics`` shows the whole instance, and
the slots also carry each worker's health for ``/health`` and ``/ready``.

Shared memory rather than gathering on scrape: a scrape needs no round trip to the
other workers (which may be busy or restarting), and a dead worker's counters stay
counted, so totals never go backwards.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Callable

from . import _fastpath

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)
# Handshake outcomes get fixed places in the slot; anything else counts as "other".
STATUSES = (101, 400, 401, 403, 405, 426, 500, 503, 504)

_ERROR_TYPES = {  # label -> slot field
    "invalid_json": "errors_invalid_json",
    "message_too_large": "errors_too_large",
    "binary_message": "errors_binary",
    "upstream_unavailable": "errors_upstream_unavailable",
    "protocol": "errors_protocol",
    "ping_timeout": "ping_timeouts",
    "internal": "errors_internal",
}

HEADER_FIELDS = ("worker_restarts",)
SLOT_FIELDS: tuple[str, ...] = (
    *_fastpath.COUNTER_NAMES,  # first, in _fastpath's order: it writes them from C
    "pid", "active_connections", "channels_active", "redis_reconnects", "redis_ok",
    "draining", "errors_internal",
    *(f"connections_{s}" for s in STATUSES), "connections_other",
    *(f"handshake_bucket_{i}" for i in range(len(HANDSHAKE_BUCKETS))),
    "handshake_count", "handshake_sum_ns",
)
_INDEX = {name: i for i, name in enumerate(SLOT_FIELDS)}


class SharedSlots:
    """One int64 slot of counters per worker, in memory shared across fork()."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.slot_size = len(SLOT_FIELDS)
        self.buffer = mmap.mmap(-1, 8 * (len(HEADER_FIELDS) + workers * self.slot_size))
        self.values = memoryview(self.buffer).cast("q")

    def offset(self, worker: int, field: str) -> int:
        """Index in :attr:`values` of ``field`` in ``worker``'s slot."""
        return len(HEADER_FIELDS) + worker * self.slot_size + _INDEX[field]

    def get(self, worker: int, field: str) -> int:
        return int(self.values[self.offset(worker, field)])

    def set(self, worker: int, field: str, value: int) -> None:
        self.values[self.offset(worker, field)] = value

    def add(self, worker: int, field: str, amount: int = 1) -> None:
        self.values[self.offset(worker, field)] += amount

    def total(self, field: str) -> int:
        """``field`` summed over every worker, live or dead (counters never go back)."""
        return sum(self.get(w, field) for w in range(self.workers))

    def live_workers(self) -> list[int]:
        """Workers whose process is running (pid set and alive)."""
        return [w for w in range(self.workers) if _alive(self.get(w, "pid"))]

    def worker_restarts(self) -> int:
        return int(self.values[0])

    def count_restart(self) -> None:
        self.values[0] += 1

    def clear_gauges(self, worker: int) -> None:
        """A worker died: what it held open is gone, what it counted stays."""
        for field in ("pid", "active_connections", "channels_active", "redis_ok", "draining"):
            self.set(worker, field, 0)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return True
    return True


class Metrics:
    """This worker's view of the counters: writes its own slot, renders all of them."""

    def __init__(self, slots: SharedSlots | None = None, worker: int = 0) -> None:
        self.slots = slots or SharedSlots(1)
        self.worker = worker
        self.slots.set(worker, "pid", os.getpid())
        # A restarted worker's slot keeps what the process before it counted: the
        # counters it adds to, and reconnections, which it sets from its own count.
        self._reconnects_before = self.slots.get(worker, "redis_reconnects")
        # Live values read when the slot is refreshed (set by the server).
        self.channels_active: Callable[[], int] = lambda: 0
        self.redis_reconnects: Callable[[], int] = lambda: 0

    def bind_fast_counters(self) -> None:
        """Point ``_fastpath``'s per-message counters at this worker's slot."""
        _fastpath.stats.bind(self.slots.buffer, 8 * self.slots.offset(self.worker,
                                                                      SLOT_FIELDS[0]))

    # writing ------------------------------------------------------------------------
    @property
    def active_connections(self) -> int:
        return self.slots.get(self.worker, "active_connections")

    @active_connections.setter
    def active_connections(self, value: int) -> None:
        self.slots.set(self.worker, "active_connections", value)

    def set_health(self, redis_ok: bool, draining: bool) -> None:
        """Publish this worker's health to the other workers."""
        self.slots.set(self.worker, "redis_ok", int(redis_ok))
        self.slots.set(self.worker, "draining", int(draining))

    def refresh(self) -> None:
        """Copy the live gauges of this worker into its slot."""
        self.slots.set(self.worker, "channels_active", self.channels_active())
        self.slots.set(self.worker, "redis_reconnects",
                       self._reconnects_before + self.redis_reconnects())

    def connection_result(self, status: int) -> None:
        """Count one handshake's outcome by HTTP status (101 = accepted)."""
        field = f"connections_{status}" if status in STATUSES else "connections_other"
        self.slots.add(self.worker, field)

    def count_error(self, kind: str) -> None:
        """Count an error of ``kind`` that the fast path does not count itself."""
        self.slots.add(self.worker, _ERROR_TYPES[kind])

    def observe_handshake(self, seconds: float) -> None:
        """Record the time from request head to 101."""
        bucket = bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)
        if bucket < len(HANDSHAKE_BUCKETS):
            self.slots.add(self.worker, f"handshake_bucket_{bucket}")
        self.slots.add(self.worker, "handshake_count")
        self.slots.add(self.worker, "handshake_sum_ns", int(seconds * 1e9))

    # reading ------------------------------------------------------------------------
    def total(self, field: str) -> int:
        """``field`` summed over the instance."""
        return self.slots.total(field)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) for the whole instance."""
        self.refresh()
        s = self.slots
        live = s.live_workers()
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("wsproxy_active_connections", "gauge", "Open WebSocket connections.")
        active = sum(s.get(w, "active_connections") for w in live)
        out.append(f"wsproxy_active_connections {active}")

        family("wsproxy_connections_total", "counter",
               "WebSocket handshakes by outcome (HTTP status; 101 = accepted).")
        for status in (*STATUSES, "other"):
            count = s.total(f"connections_{status}")
            if count:
                out.append(f'wsproxy_connections_total{{status="{status}"}} {count}')

        family("wsproxy_messages_total", "counter", "Messages forwarded, by direction.")
        out.append(f'wsproxy_messages_total{{direction="down"}} {s.total("messages_down")}')
        out.append(f'wsproxy_messages_total{{direction="up"}} {s.total("messages_up")}')

        family("wsproxy_bytes_total", "counter", "Payload bytes forwarded, by direction.")
        out.append(f'wsproxy_bytes_total{{direction="down"}} {s.total("bytes_down")}')
        out.append(f'wsproxy_bytes_total{{direction="up"}} {s.total("bytes_up")}')

        family("wsproxy_errors_total", "counter", "Errors, by type.")
        for label, field in sorted(_ERROR_TYPES.items()):
            out.append(f'wsproxy_errors_total{{type="{label}"}} {s.total(field)}')

        family("wsproxy_backpressure_disconnects_total", "counter",
               "Sockets closed with 1008 because they did not read fast enough.")
        out.append(
            f"wsproxy_backpressure_disconnects_total {s.total('backpressure_disconnects')}")

        family("wsproxy_redis_channels_active", "gauge", "Channels subscribed on Redis.")
        out.append(f"wsproxy_redis_channels_active "
                   f"{sum(s.get(w, 'channels_active') for w in live)}")

        family("wsproxy_redis_reconnects_total", "counter", "Reconnections to Redis.")
        out.append(f"wsproxy_redis_reconnects_total {s.total('redis_reconnects')}")

        family("wsproxy_handshake_seconds", "histogram",
               "Time from the request head to the 101 (auth + subscribe).")
        cumulative = 0
        for i, bound in enumerate(HANDSHAKE_BUCKETS):
            cumulative += s.total(f"handshake_bucket_{i}")
            out.append(f'wsproxy_handshake_seconds_bucket{{le="{bound}"}} {cumulative}')
        count = s.total("handshake_count")
        out.append(f'wsproxy_handshake_seconds_bucket{{le="+Inf"}} {count}')
        out.append(f"wsproxy_handshake_seconds_sum {s.total('handshake_sum_ns') / 1e9}")
        out.append(f"wsproxy_handshake_seconds_count {count}")

        if s.workers > 1:
            family("wsproxy_worker_up", "gauge", "1 while the worker process runs.")
            for w in range(s.workers):
                out.append(f'wsproxy_worker_up{{worker="{w}"}} {int(w in live)}')
            family("wsproxy_worker_active_connections", "gauge",
                   "Open WebSocket connections, per worker.")
            for w in live:
                out.append(f'wsproxy_worker_active_connections{{worker="{w}"}} '
                           f"{s.get(w, 'active_connections')}")
            family("wsproxy_worker_restarts_total", "counter",
                   "Worker processes restarted after dying.")
            out.append(f"wsproxy_worker_restarts_total {s.worker_restarts()}")
        return "\n".join(out) + "\n"
