"""Prometheus metrics, rendered as text on scrape.

Per-message counters are C integers in ``_fastpath.stats`` (one add each on the hot
path); per-connection ones are plain Python integers here. Nothing is formatted
until ``/metrics`` is asked for.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

from . import _fastpath

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)

_ERROR_COUNTERS = {
    "invalid_json": "errors_invalid_json",
    "message_too_large": "errors_too_large",
    "binary_message": "errors_binary",
    "upstream_unavailable": "errors_upstream_unavailable",
    "protocol": "errors_protocol",
    "ping_timeout": "ping_timeouts",
}


class Metrics:
    """wsproxy's counters: the C ones from the fast path plus the per-connection ones."""

    def __init__(self) -> None:
        self.active_connections = 0
        self.connections_total: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.handshake_buckets = [0] * (len(HANDSHAKE_BUCKETS) + 1)
        self.handshake_sum = 0.0
        self.handshake_count = 0
        # Filled in by the server: live values read at scrape time.
        self.channels_active: Callable[[], int] = lambda: 0
        self.redis_reconnects: Callable[[], int] = lambda: 0

    def connection_result(self, status: int) -> None:
        """Count one handshake's outcome by HTTP status (101 = accepted)."""
        self.connections_total[str(status)] += 1

    def observe_handshake(self, seconds: float) -> None:
        """Record the time from request head to 101."""
        self.handshake_buckets[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.handshake_sum += seconds
        self.handshake_count += 1

    def samples(self) -> dict[str, int | float]:
        """Flat name -> value view of every counter (for /health and tests)."""
        fast = _fastpath.stats.snapshot()
        return {
            "active_connections": self.active_connections,
            "messages_down": fast["messages_down"],
            "messages_up": fast["messages_up"],
            "bytes_down": fast["bytes_down"],
            "bytes_up": fast["bytes_up"],
            "backpressure_disconnects": fast["backpressure_disconnects"],
            "channels_active": self.channels_active(),
            "redis_reconnects": self.redis_reconnects(),
        }

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        fast = _fastpath.stats.snapshot()
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("wsproxy_active_connections", "gauge", "Open WebSocket connections.")
        out.append(f"wsproxy_active_connections {self.active_connections}")

        family("wsproxy_connections_total", "counter",
               "WebSocket handshakes by outcome (HTTP status; 101 = accepted).")
        for status, count in sorted(self.connections_total.items()):
            out.append(f'wsproxy_connections_total{{status="{status}"}} {count}')

        family("wsproxy_messages_total", "counter", "Messages forwarded, by direction.")
        out.append(f'wsproxy_messages_total{{direction="down"}} {fast["messages_down"]}')
        out.append(f'wsproxy_messages_total{{direction="up"}} {fast["messages_up"]}')

        family("wsproxy_bytes_total", "counter", "Payload bytes forwarded, by direction.")
        out.append(f'wsproxy_bytes_total{{direction="down"}} {fast["bytes_down"]}')
        out.append(f'wsproxy_bytes_total{{direction="up"}} {fast["bytes_up"]}')

        family("wsproxy_errors_total", "counter", "Errors, by type.")
        errors = Counter(self.errors)
        for label, key in _ERROR_COUNTERS.items():
            errors[label] += fast[key]
        for label, count in sorted(errors.items()):
            out.append(f'wsproxy_errors_total{{type="{label}"}} {count}')

        family("wsproxy_backpressure_disconnects_total", "counter",
               "Sockets closed with 1008 because they did not read fast enough.")
        out.append(f"wsproxy_backpressure_disconnects_total {fast['backpressure_disconnects']}")

        family("wsproxy_redis_channels_active", "gauge", "Channels subscribed on Redis.")
        out.append(f"wsproxy_redis_channels_active {self.channels_active()}")

        family("wsproxy_redis_reconnects_total", "counter", "Reconnections to Redis.")
        out.append(f"wsproxy_redis_reconnects_total {self.redis_reconnects()}")

        family("wsproxy_handshake_seconds", "histogram",
               "Time from the request head to the 101 (auth + subscribe).")
        cumulative = 0
        for bound, count in zip(HANDSHAKE_BUCKETS, self.handshake_buckets, strict=False):
            cumulative += count
            out.append(f'wsproxy_handshake_seconds_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'wsproxy_handshake_seconds_bucket{{le="+Inf"}} {self.handshake_count}')
        out.append(f"wsproxy_handshake_seconds_sum {self.handshake_sum}")
        out.append(f"wsproxy_handshake_seconds_count {self.handshake_count}")
        return "\n".join(out) + "\n"
