"""Tests for /metrics' text: what Prometheus' own parser reads from Metrics.render()."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from wsproxy.metrics import Metrics, SharedSlots

# SPEC.md, "Metrics": family name -> (type, label names of its samples).
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "wsproxy_active_connections": ("gauge", frozenset()),
    "wsproxy_connections_total": ("counter", frozenset({"status"})),
    "wsproxy_messages_total": ("counter", frozenset({"direction"})),
    "wsproxy_bytes_total": ("counter", frozenset({"direction"})),
    "wsproxy_errors_total": ("counter", frozenset({"type"})),
    "wsproxy_backpressure_disconnects_total": ("counter", frozenset()),
    "wsproxy_redis_channels_active": ("gauge", frozenset()),
    "wsproxy_redis_reconnects_total": ("counter", frozenset()),
    "wsproxy_handshake_seconds": ("histogram", frozenset()),
}


def families(metrics: Metrics) -> dict[str, Metric]:
    """Parsed families by the name they are exposed under (``_total`` kept)."""
    parsed = {}
    for family in text_string_to_metric_families(metrics.render()):
        name = family.name + "_total" if family.type == "counter" else family.name
        parsed[name] = family
    return parsed


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample values of one exposed sample name, keyed by their sorted labels."""
    out = {}
    for family in text_string_to_metric_families(metrics.render()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def buckets(metrics: Metrics) -> list[tuple[float, float]]:
    """(le, cumulative count) of the handshake histogram, in exposition order."""
    out = []
    for family in text_string_to_metric_families(metrics.render()):
        for sample in family.samples:
            if sample.name == "wsproxy_handshake_seconds_bucket":
                out.append((float(sample.labels["le"]), sample.value))
    return out


def test_render_parses_and_has_every_spec_metric() -> None:
    metrics = Metrics()
    metrics.connection_result(101)
    parsed = families(metrics)
    for name, (kind, _) in SPEC_METRICS.items():
        assert name in parsed, name
        assert parsed[name].type == kind, name


def test_render_ends_with_newline_and_has_help_for_each_family() -> None:
    text = Metrics().render()
    assert text.endswith("\n")
    for name in SPEC_METRICS:
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} " in text


def test_samples_carry_the_labels_spec_names() -> None:
    metrics = Metrics()
    metrics.connection_result(101)
    metrics.connection_result(403)
    metrics.observe_handshake(0.01)
    for name, (kind, labels) in SPEC_METRICS.items():
        family = families(metrics)[name]
        assert family.samples, name
        for sample in family.samples:
            if kind == "histogram":
                assert set(sample.labels) <= {"le"}
            else:
                assert set(sample.labels) == labels, (name, sample)


@pytest.mark.parametrize("name", ["wsproxy_messages_total", "wsproxy_bytes_total"])
def test_direction_is_down_and_up(name: str) -> None:
    values = samples(Metrics(), name)
    assert set(values) == {(("direction", "down"),), (("direction", "up"),)}
    assert all(v >= 0 for v in values.values())


def test_error_types_are_listed_even_at_zero() -> None:
    values = samples(Metrics(), "wsproxy_errors_total")
    types = {dict(labels)["type"] for labels in values}
    assert {"invalid_json", "message_too_large", "binary_message",
            "upstream_unavailable"} <= types


def test_connections_total_counts_by_status() -> None:
    metrics = Metrics()
    assert samples(metrics, "wsproxy_connections_total") == {}
    metrics.connection_result(101)
    metrics.connection_result(101)
    metrics.connection_result(403)
    metrics.connection_result(503)
    assert samples(metrics, "wsproxy_connections_total") == {
        (("status", "101"),): 2, (("status", "403"),): 1, (("status", "503"),): 1}


def test_error_counter_moves() -> None:
    metrics = Metrics()
    before = samples(metrics, "wsproxy_errors_total").get((("type", "internal"),), 0)
    for _ in range(3):
        metrics.count_error("internal")
    after = samples(metrics, "wsproxy_errors_total")[(("type", "internal"),)]
    assert after == before + 3


def test_gauges_read_live_values() -> None:
    metrics = Metrics()
    metrics.active_connections = 5
    metrics.channels_active = lambda: 4
    metrics.redis_reconnects = lambda: 2
    assert samples(metrics, "wsproxy_active_connections") == {(): 5}
    assert samples(metrics, "wsproxy_redis_channels_active") == {(): 4}
    assert samples(metrics, "wsproxy_redis_reconnects_total") == {(): 2}


def test_reconnects_never_go_back_when_a_worker_restarts() -> None:
    """A restarted worker writes the slot of the one that died: its own count of Redis
    reconnections starts at 0, and the counter must not fall."""
    slots = SharedSlots(2)
    first = Metrics(slots, 1)
    first.redis_reconnects = lambda: 3
    assert samples(first, "wsproxy_redis_reconnects_total") == {(): 3}
    slots.clear_gauges(1)  # the supervisor saw it die
    second = Metrics(slots, 1)
    second.redis_reconnects = lambda: 0
    assert samples(second, "wsproxy_redis_reconnects_total") == {(): 3}
    second.redis_reconnects = lambda: 1
    assert samples(second, "wsproxy_redis_reconnects_total") == {(): 4}


def test_empty_histogram() -> None:
    metrics = Metrics()
    assert all(count == 0 for _, count in buckets(metrics))
    assert buckets(metrics)[-1] == (math.inf, 0)
    assert samples(metrics, "wsproxy_handshake_seconds_count") == {(): 0}
    assert samples(metrics, "wsproxy_handshake_seconds_sum") == {(): 0}


def test_observe_handshake_moves_buckets_sum_and_count() -> None:
    metrics = Metrics()
    metrics.observe_handshake(0.003)
    metrics.observe_handshake(0.1)   # exactly on a bound: le is "less or equal"
    metrics.observe_handshake(10.0)  # beyond the last finite bound
    by_le = dict(buckets(metrics))
    assert by_le[0.0025] == 0
    assert by_le[0.005] == 1
    assert by_le[0.05] == 1
    assert by_le[0.1] == 2
    assert by_le[5.0] == 2
    assert by_le[math.inf] == 3
    assert samples(metrics, "wsproxy_handshake_seconds_count") == {(): 3}
    (total,) = samples(metrics, "wsproxy_handshake_seconds_sum").values()
    assert total == pytest.approx(10.103)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), max_size=50))
def test_histogram_is_cumulative_and_inf_equals_count(observations: list[float]) -> None:
    metrics = Metrics()
    for seconds in observations:
        metrics.observe_handshake(seconds)
    series = buckets(metrics)
    bounds = [le for le, _ in series]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf
    counts = [count for _, count in series]
    assert counts == sorted(counts), "buckets must be cumulative"
    for le, count in series:
        assert count == sum(1 for s in observations if s <= le), le
    assert series[-1][1] == len(observations)
    assert samples(metrics, "wsproxy_handshake_seconds_count") == {(): len(observations)}
    (total,) = samples(metrics, "wsproxy_handshake_seconds_sum").values()
    # The sum is kept in whole nanoseconds (an int64 in shared memory).
    assert total == pytest.approx(sum(observations), abs=1e-9 * (len(observations) + 1))
