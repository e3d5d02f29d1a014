"""End-to-end benchmarks: a real redis-server, wsproxy as a subprocess pinned to core 0,
load from ``examples/load_test.py`` on core 1 (see harness.py).

Each benchmark runs one load_test pass. Its percentiles, the proxy's CPU per message,
handshake rate and memory go into ``extra_info`` (in the saved JSON; shown with
``--benchmark-columns`` as usual for timings). The benchmark's own *timing* samples are
replaced by the per-message latencies of the run, so the table's min/median/max and
``--benchmark-compare`` speak of message latency, not of how long the run took.

``WSPROXY_BENCH=smoke`` shrinks every run for a quick look; ``test_smoke_floor`` is
what CI runs: it fails only below SPEC's floor (100 % delivery, P99 < 50 ms at
500 sockets x 2 msg/s), a guard against gross regressions, not a timed test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SMOKE = os.environ.get("WSPROXY_BENCH") == "smoke"


@pytest.fixture(scope="module")
def redis():
    harness.pin_self()
    started = harness.start_redis()
    yield started
    started.stop()


def run(benchmark, redis, workers: int, interval: float, duration: float, warmup: float = 1.0,
        direction: str = "down", env: dict[str, str] | None = None) -> harness.Measurement:
    if SMOKE:
        workers, duration = max(1, workers // 10), min(duration, 3.0)
    holder: list[harness.Measurement] = []

    def once():
        holder.append(harness.measure("wsproxy", redis, workers, warmup, duration, interval,
                                      env=env, direction=direction, keep_samples=True))

    benchmark.pedantic(once, rounds=1, iterations=1)
    m = holder[0]
    summary = m.summary()
    benchmark.extra_info.update(summary)
    samples = m.result.get("latency_samples_ns")
    if samples and benchmark.stats is not None:
        benchmark.stats.stats.data[:] = [ns / 1e9 for ns in samples]
    return m


def test_one_message_latency(benchmark, redis):
    """One socket, 100 messages a second: the latency floor of one message."""
    m = run(benchmark, redis, workers=1, interval=0.01, duration=3)
    assert m.result["lost"] == 0


def test_downstream_paced_1000x20(benchmark, redis):
    """1,000 sockets x 20 msg/s downstream, 128-byte JSON: P50/P95/P99/P99.9, CPU a message."""
    m = run(benchmark, redis, workers=1000, interval=0.05, duration=10)
    assert m.result["lost"] == 0


def test_upstream_paced_1000x20(benchmark, redis):
    """1,000 sockets x 20 msg/s upstream: each client message validated and published."""
    m = run(benchmark, redis, workers=1000, interval=0.05, duration=10, direction="up")
    assert m.result["lost"] == 0


def test_handshakes_per_second(benchmark, redis):
    """Auth GET + EXPIRE + SUBSCRIBE + 101, 200 at a time (load_test's connect phase)."""
    m = run(benchmark, redis, workers=3000, interval=1.0, duration=1, warmup=0)
    assert m.result["connected"] == m.result["workers"]


def test_rss_per_idle_socket_10k(benchmark, redis):
    """Resident memory the proxy adds per open, idle socket, at 10,000 sockets."""
    m = run(benchmark, redis, workers=10_000, interval=2.0, duration=2, warmup=1)
    assert m.result["connected"] == m.result["workers"]


def test_smoke_floor(benchmark, redis):
    """SPEC's floor: 500 sockets x 2 msg/s, every message delivered, P99 < 50 ms."""
    m = run(benchmark, redis, workers=500 * (10 if SMOKE else 1), interval=0.5, duration=5)
    assert m.result["delivery_ratio_percent"] == 100.0
    assert m.result["lost"] == 0 and m.result["duplicated"] == 0
    assert m.result["latency_ms"]["p99"] < 50.0
