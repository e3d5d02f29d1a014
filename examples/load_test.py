#!/usr/bin/env python3
"""Measure wsproxy's end-to-end latency and delivery with many WebSocket clients.

    python examples/load_test.py <num_workers> <warmup_secs> <test_duration_secs> \\
        <message_interval_secs> <ws_host> <ws_port> [--json FILE] [--direction {down,up}]
        [--tick SECS]

Each worker stores its own token in `session:{sid}:auth` (a session id unique to the
worker and to the run), connects to ws://{ws_host}:{ws_port}/{agent_id}/ws/{sid} with
`Authorization: Bearer <token>`, and then waits out the warm-up. Each message is ~128 bytes
of JSON: `{"w":<worker>,"s":<seq>,"t":<ns timestamp>,"p":"..."}`, one per worker per
interval, the workers' messages spread evenly over the interval.

- `--direction down` (default): a publisher sends every worker its messages through Redis
  (`PUBLISH session:{sid}:down`); latency runs from the timestamp (taken just before
  PUBLISH) to the arrival of the frame at the worker's socket.
- `--direction up`: every worker's socket sends its own messages as text frames (one
  scheduler loop calls each socket's send at its slot); wsproxy PUBLISHes them to
  `session:{sid}:up`, where one Redis connection of this program, subscribed to every
  worker's channel before the measurement starts, receives them. Latency runs from the
  timestamp (taken just before the frame is sent) to the arrival of the message from Redis.

Either way one clock measures both ends (everything lives in this process). The sequence
numbers give lost, duplicated and out-of-order counts per worker. After the last message a
drain period (up to 2 s, or until everything arrived) precedes the count.

Prints the seed's result block, then delivery figures and this program's own CPU use
(so you can check that the load generator is not the bottleneck). `--json FILE` also
writes every figure for machines.

Pacing: the sender wakes every `--tick` seconds at most (default 0.5 ms) and sends what
is due, stamping each batch once. On Linux a timerfd wakes it; the event loop's own timers
count whole milliseconds, which made 20,000 msg/s leave in bursts of 20 to 40 stamped at
one instant, so the last of a burst waited for the others at every hop and the
percentiles measured the bursts as much as the hops.

Garbage collection: the collector is paused from the warm-up to the end of the
measurement (after a full collection and `gc.freeze()`), and restored after. Measured
on a 2-core VM, its full collections of this program's heap took up to 38 ms, which
delayed every frame in flight by as much, whatever the server; the messages make no
reference cycles, so nothing piles up meanwhile.

Built to drive thousands of sockets from one core: picows WebSocket clients, uvloop,
PUBLISH pipelined over a few Redis connections in batches per tick (down), hiredis parsing
of one subscriber connection (up), connections opened 200 at a time, RLIMIT_NOFILE raised
to its hard limit.

For benchmarks, import this file and call `run_load_test(...)` (returns the figures as a
dict, same keys as the JSON) and `format_results(dict)` (the printed text).

Environment: REDIS_URL (default redis://127.0.0.1:6379).
Exit codes: 0 run completed (even with losses: the numbers say so); 1 no worker could
connect, or Redis unreachable; 2 wrong arguments.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import ctypes
import gc
import json
import logging
import math
import os
import secrets
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from picows import WSCloseCode, WSHandshakeError, WSListener, WSMsgType, ws_connect
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.exceptions import RedisError

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

try:
    from orjson import loads as _loads
except ImportError:
    from json import loads as _loads  # type: ignore[assignment]

try:
    from hiredis import Reader as _HiredisReader
except ImportError:  # only --direction up needs it
    _HiredisReader = None  # type: ignore[assignment,misc]

# benchmarks/harness.py imports this file by path, without examples/ on sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from _common import (  # noqa: E402 (needs the sys.path entry above)
    agent_id,
    positive_int,
    redis_url_from_env,
    run_main,
    run_until_signal,
    safe_url,
)

CONNECT_CONCURRENCY = 200      # handshakes in flight at once
CONNECT_TIMEOUT = 15.0         # TCP connect + HTTP upgrade, per worker
DRAIN_TIMEOUT = 2.0            # max wait for stragglers after the last PUBLISH
MAX_BATCH = 5000               # PUBLISHes per tick at most (then the schedule lags)
MIN_TICK = 0.001               # the loop timer's resolution (when there is no timerfd)
TICK = 0.0005                  # the sender wakes at most this often (--tick)
REDIS_CHUNK = 1000             # commands per pipeline in set-up and clean-up
SUBSCRIBE_BATCH = 1000         # channels per SUBSCRIBE command (direction up)
SUBSCRIBE_TIMEOUT = 10.0       # for every subscription to be confirmed
DIRECTIONS = ("down", "up")

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONT = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_now_ns = time.perf_counter_ns
_PAD = b"x" * 65536
STAMP_WIDTH = 20               # characters for a send stamp (perf_counter_ns has 19 at most)


class LoadTestError(Exception):
    """The test could not run at all (e.g. Redis unreachable)."""


# --------------------------------------------------------------------------- formatting

def format_duration(ns: int | None) -> str:
    """Format nanoseconds like Rust's `{:?}` for `std::time::Duration`.

    >>> format_duration(678_501), format_duration(2_636_340), format_duration(1_500_000_000)
    ('678.501µs', '2.63634ms', '1.5s')
    """
    if ns is None:
        return "n/a"
    ns = int(ns)
    if ns >= 1_000_000_000:
        whole, frac, digits, unit = divmod(ns, 1_000_000_000) + (9, "s")
    elif ns >= 1_000_000:
        whole, frac, digits, unit = divmod(ns, 1_000_000) + (6, "ms")
    elif ns >= 1_000:
        whole, frac, digits, unit = divmod(ns, 1_000) + (3, "µs")
    else:
        return f"{ns}ns"
    decimals = f"{frac:0{digits}d}".rstrip("0")
    return f"{whole}.{decimals}{unit}" if decimals else f"{whole}{unit}"


def _ratio_text(pct: float | None) -> str:
    if pct is None:
        return "n/a"
    # Never round a loss up to 100.00 %.
    return f"{math.floor(pct * 100) / 100:.2f}%"


def _burst_lines(bursts: dict[str, Any] | None) -> list[str]:
    if not bursts or bursts.get("step_us") is None:
        return []
    return [f"Bursts: {bursts['size_median']} messages a tick (median); the first to arrive "
            f"{bursts['first_p50_ms']:.3f}ms (P50), each later one +{bursts['step_us']:.1f}us"]


def format_results(d: dict[str, Any]) -> str:
    """The human-readable report: the seed's block, then delivery and resource figures."""
    lat = d.get("latency_ns") or {}
    fd = format_duration
    lines = [
        "=== Load Test Results ===",
        f"Total measurements: {d['total_measurements']}",
        f"Errors: {d['errors']}",
        "",
        "Latency Statistics:",
        f"  Min:     {fd(lat.get('min'))}",
        f"  Average: {fd(lat.get('avg'))}",
        f"  P50:     {fd(lat.get('p50'))}",
        f"  P95:     {fd(lat.get('p95'))}",
        f"  P99:     {fd(lat.get('p99'))}",
        f"  Max:     {fd(lat.get('max'))}",
        "",
        "Delivery:",
        f"  Sent:           {d['sent']}",
        f"  Received:       {d['received']}",
        f"  Delivery ratio: {_ratio_text(d.get('delivery_ratio_percent'))}",
        f"  Lost:           {d['lost']}",
        f"  Duplicated:     {d['duplicated']}",
        f"  Out of order:   {d['out_of_order']}",
        "",
        f"Direction: {d.get('direction', 'down')}",
        f"P99.9: {fd(lat.get('p999'))}",
        *_burst_lines(d.get("bursts")),
        f"Workers: {d['connected']} of {d['workers']} connected in {d['connect_secs']:.2f}s; "
        f"{d['messages_per_worker']} messages each, "
        f"{d['rate_msgs_per_sec']:g} msg/s target, {d['achieved_rate_msgs_per_sec']:.0f} msg/s "
        f"sent, {d['payload_size']}-byte payloads",
    ]
    if d.get("direction", "down") == "up":
        lines.append(
            f"Senders: the {d['connected']} sockets, one scheduler, max lag behind schedule "
            f"{d['publish_max_lag_ms']:.1f}ms; subscriber: {d['subscribers']} Redis "
            f"connection, {d['subscribed_channels']} channel(s)")
    else:
        lines.append(
            f"Publisher: {d['publishers']} Redis connection(s), max lag behind schedule "
            f"{d['publish_max_lag_ms']:.1f}ms")
    if d.get("publish_no_receivers"):
        lines.append(f"PUBLISH reached no subscriber: {d['publish_no_receivers']} time(s)")
    if d["errors"]:
        by_type = ", ".join(f"{k} {v}" for k, v in d["errors_by_type"].items() if v)
        lines.append(f"Errors by type: {by_type}")
        if d.get("connect_errors"):
            reasons = ", ".join(f"{k} x{v}" for k, v in d["connect_errors"].items())
            lines.append(f"Connect errors: {reasons}")
        if d.get("error_samples"):
            lines.append("First errors: " + " | ".join(d["error_samples"]))
    whole = f"whole run: {d['total_cpu_secs']:.2f}s in {d['total_wall_secs']:.2f}s"
    if d.get("cpu_percent") is None:
        lines.append(f"Load generator CPU: nothing measured ({whole})")
    else:
        lines.append(
            f"Load generator CPU: {d['cpu_secs']:.2f}s in {d['measure_wall_secs']:.2f}s measured"
            f" = {d['cpu_percent']:.1f}% of one core ({whole})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurement

class _Stats:
    """Counters shared by all workers and publishers (one event loop: no locks)."""

    def __init__(self) -> None:
        self.latencies = array.array("q")
        self.stamps = array.array("q")  # the send stamp of each latency, in the same order
        self.received = 0
        self.duplicated = 0
        self.out_of_order = 0
        self.bad_messages = 0
        self.disconnects = 0
        self.sent = 0
        self.publish_errors = 0
        self.no_receivers = 0
        self.max_lag_ns = 0
        self.samples: list[str] = []

    def sample(self, text: str) -> None:
        if len(self.samples) < 3:
            self.samples.append(text[:200])


class _Worker(WSListener):
    """One simulated browser and its message stream: checks sequence numbers and records
    latencies, of the frames it receives (down) or of its own messages as they come out of
    Redis (up: `record` is called by the subscriber)."""

    def __init__(self, wid: int, sid: str, token: str, stats: _Stats, nmsgs: int,
                 up: bool = False) -> None:
        super().__init__()
        self.wid = wid
        self.sid = sid
        self.token = token
        self.up = up
        self.channel = f"session:{sid}:down".encode()
        self.up_channel = f"session:{sid}:up".encode()
        self.stats = stats
        self.seen = bytearray(nmsgs)
        self.highest = -1
        self.transport: Any = None
        self.closing = False
        self.frag: list[bytes] | None = None

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport, frame) -> None:
        now = _now_ns()
        mt = frame.msg_type
        if mt == _TEXT and frame.fin:
            data = frame.get_payload_as_bytes()
        elif mt == _CLOSE:
            if not self.closing:
                code = frame.get_close_code()
                code = getattr(code, "value", code)
                self.stats.sample(f"worker {self.wid}: closed by the server, code {code}")
                self.closing = True
                self.stats.disconnects += 1
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        elif mt == _TEXT or (mt == _CONT and self.frag is not None):
            if mt == _TEXT:
                self.frag = []
            self.frag.append(frame.get_payload_as_bytes())  # type: ignore[union-attr]
            if not frame.fin:
                return
            data, self.frag = b"".join(self.frag), None  # type: ignore[arg-type]
        else:
            if mt == _BINARY:
                self.stats.bad_messages += 1
                self.stats.sample(f"worker {self.wid}: unexpected binary frame")
            return  # PONG etc.
        if self.up:   # wsproxy only speaks upstream to report an error, e.g. Upstream unavailable
            self.stats.bad_messages += 1
            self.stats.sample(f"worker {self.wid}: frame from wsproxy {data[:120]!r}")
            return
        self.record(data, now)

    def record(self, data: bytes, now: int) -> None:
        """One message of this worker's stream arrived at `now` (perf_counter_ns)."""
        st = self.stats
        try:
            msg = _loads(data)
            wid = msg["w"]
            seq = msg["s"]
            ts = msg["t"]
        except Exception:
            st.bad_messages += 1
            st.sample(f"worker {self.wid}: unexpected message {data[:120]!r}")
            return
        seen = self.seen
        if (wid != self.wid or type(seq) is not int or type(ts) is not int
                or not 0 <= seq < len(seen)):
            st.bad_messages += 1
            st.sample(f"worker {self.wid}: misrouted or invalid message {data[:120]!r}")
            return
        if seen[seq]:
            st.duplicated += 1
            return
        seen[seq] = 1
        if seq < self.highest:
            st.out_of_order += 1
        else:
            self.highest = seq
        st.latencies.append(now - ts)
        st.stamps.append(ts)
        st.received += 1

    def on_ws_disconnected(self, transport) -> None:
        if not self.closing:
            self.closing = True
            self.stats.disconnects += 1
            self.stats.sample(f"worker {self.wid}: connection lost")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    if resource is None:
        return 1 << 30
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _bursts(stamps: array.array, latencies: array.array) -> dict[str, Any]:
    """What a tick's burst adds to latency. The messages sent at one tick share one send
    stamp: per burst, the latency of its first arrival, and the latency each later
    position adds ((last - first) / (size - 1)); medians over the bursts."""
    by_stamp: dict[int, list[int]] = {}
    for ts, latency in zip(stamps, latencies, strict=True):
        by_stamp.setdefault(ts, []).append(latency)
    sizes = sorted(len(v) for v in by_stamp.values())
    firsts = sorted(min(v) for v in by_stamp.values())
    steps = sorted((max(v) - min(v)) / (len(v) - 1) for v in by_stamp.values() if len(v) > 1)
    return {
        "size_median": sizes[len(sizes) // 2] if sizes else None,
        "first_p50_ms": firsts[len(firsts) // 2] / 1e6 if firsts else None,
        "step_us": steps[len(steps) // 2] / 1e3 if steps else None,
    }


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile."""
    n = len(sorted_values)
    return sorted_values[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))]


async def _redis_pipelined(client, commands: list[tuple], what: str) -> None:
    for i in range(0, len(commands), REDIS_CHUNK):
        pipe = client.pipeline(transaction=False)
        for cmd in commands[i:i + REDIS_CHUNK]:
            pipe.execute_command(*cmd)
        try:
            await pipe.execute()
        except (RedisError, OSError) as e:
            raise LoadTestError(f"{what} failed: {e}") from e


async def _connect_worker(w: _Worker, url: str, sem: asyncio.Semaphore,
                          failures: Counter, stats: _Stats) -> bool:
    async with sem:
        try:
            transport, _ = await asyncio.wait_for(
                ws_connect(lambda: w, url,
                           extra_headers={"Authorization": f"Bearer {w.token}"},
                           websocket_handshake_timeout=CONNECT_TIMEOUT,
                           logger_name="load_test"),
                CONNECT_TIMEOUT + 1)
        except WSHandshakeError as e:
            status = getattr(e.response, "status", None)
            if status is not None:
                reason = f"HTTP {int(status)}"
                body = (e.raw_body or b"").decode("utf-8", "replace").strip()
                stats.sample(f"worker {w.wid}: handshake refused: {reason} {body[:100]}".rstrip())
            else:
                reason = "handshake error"
                stats.sample(f"worker {w.wid}: {e}")
            failures[reason] += 1
            return False
        except (TimeoutError, OSError, EOFError) as e:
            reason = type(e).__name__
            failures[reason] += 1
            stats.sample(f"worker {w.wid}: connect failed: {e or reason}")
            return False
        except Exception as e:  # picows raises a few other errors on broken handshakes
            reason = type(e).__name__
            failures[reason] += 1
            stats.sample(f"worker {w.wid}: connect failed: {e or reason}")
            return False
        w.transport = transport
        return True


class _RawRedisConn(asyncio.Protocol):
    """What both raw Redis connections share: the transport, the FIFO of replies awaited
    by command(), and closing. Subclasses parse the replies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque = deque()
        self.lost: BaseException | str | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    async def command(self, *args: bytes | str) -> bytes:
        """One command, waited for (hand-shake only); returns the reply."""
        if self.lost is not None or self.transport is None:
            raise ConnectionError(str(self.lost))
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.transport.write(_resp(args))
        return await fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _PublishConn(_RawRedisConn):
    """One Redis connection that pipelines PUBLISH without waiting for the replies.

    A tick's commands go out in one write(); the integer replies (receiver counts) are
    counted as they stream back, ~1 µs each. redis-py `pipeline(transaction=False)` was
    measured at ~100-250 µs of CPU per execute() plus ~9 µs per command on a 2-core VM:
    28-46 % of a core at 2,000 msg/s against 12-14 % this way. redis-py still parses
    REDIS_URL and does the set-up and clean-up (SET/DEL of the tokens).
    """

    def __init__(self, stats: _Stats) -> None:
        super().__init__()   # pending: futures (handshake replies) or [remaining] batches
        self.stats = stats
        self.buf = b""
        self.inflight = 0
        self.max_inflight = 0
        self.idle: asyncio.Future | None = None

    # -- asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        find = buf.find
        while True:
            i = find(b"\r\n", pos)
            if i < 0:
                break
            self._reply(buf[pos:i])
            pos = i + 2
        self.buf = buf[pos:]

    def connection_lost(self, exc) -> None:
        self.lost = exc or "connection closed by Redis"
        unacked = 0
        while self.pending:
            head = self.pending.popleft()
            if isinstance(head, asyncio.Future):
                if not head.done():
                    head.set_exception(ConnectionError(str(self.lost)))
            else:
                unacked += head[0]
        if unacked:
            self.stats.publish_errors += unacked
            self.stats.sample(f"Redis publish connection lost: {self.lost}")
        self.inflight = 0
        self._wake()

    # -- replies
    def _reply(self, line: bytes) -> None:
        if not self.pending:
            return
        head = self.pending[0]
        if type(head) is list:
            st = self.stats
            if line[:1] == b":":
                st.sent += 1
                if line == b":0":
                    st.no_receivers += 1
            else:
                st.publish_errors += 1
                st.sample(f"PUBLISH failed: {line[:200].decode('utf-8', 'replace')}")
            self.inflight -= 1
            head[0] -= 1
            if head[0] == 0:
                self.pending.popleft()
                if not self.pending:
                    self._wake()
        else:
            self.pending.popleft()
            if not head.done():
                head.set_result(line)

    def _wake(self) -> None:
        if self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    # -- API
    def publish_batch(self, blob: bytes | bytearray, n: int) -> None:
        if self.lost is not None or self.transport is None:
            self.stats.publish_errors += n
            return
        self.pending.append([n])
        self.inflight += n
        if self.inflight > self.max_inflight:
            self.max_inflight = self.inflight
        self.transport.write(blob)

    async def wait_acked(self, timeout: float) -> None:
        if self.pending and self.lost is None:
            self.idle = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.idle, timeout)
            except TimeoutError:
                pass


def _resp(args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _SubscribeConn(_RawRedisConn):
    """One Redis connection SUBSCRIBEd to every worker's `session:{sid}:up` (direction up).

    hiredis parses the replies; each message goes to its channel's worker (one dict look-up)
    with the arrival time of the read that brought it, so a whole read costs one clock call.
    """

    def __init__(self, stats: _Stats) -> None:
        super().__init__()   # pending: replies to command() (AUTH)
        self.stats = stats
        self.reader = _HiredisReader()
        self.by_channel: dict[bytes, _Worker] = {}
        self.unconfirmed = 0
        self.confirmed: asyncio.Future | None = None
        self.closed = False

    # -- asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        now = _now_ns()
        reader = self.reader
        reader.feed(data)
        gets = reader.gets
        by_channel = self.by_channel
        while True:
            reply = gets()
            if reply is False:
                return
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                w = by_channel.get(reply[1])
                if w is not None:
                    w.record(reply[2], now)
                    continue
            self._other(reply)

    def _other(self, reply: Any) -> None:
        st = self.stats
        if type(reply) is list and reply and reply[0] == b"subscribe":
            self.unconfirmed -= 1
            if self.unconfirmed == 0 and self.confirmed is not None \
                    and not self.confirmed.done():
                self.confirmed.set_result(None)
        elif self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_result(b"+" + reply if isinstance(reply, bytes)
                               else b"-" + str(reply).encode())
        elif isinstance(reply, Exception):
            st.sample(f"SUBSCRIBE failed: {reply}")
            if self.confirmed is not None and not self.confirmed.done():
                self.confirmed.set_exception(ConnectionError(f"SUBSCRIBE failed: {reply}"))
        else:
            st.bad_messages += 1
            st.sample(f"subscriber: unexpected reply {str(reply)[:120]}")

    def connection_lost(self, exc) -> None:
        self.lost = exc or "connection closed by Redis"
        err = ConnectionError(str(self.lost))
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(err)
        if self.confirmed is not None and not self.confirmed.done():
            self.confirmed.set_exception(err)
        elif self.by_channel and not self.closed:
            self.stats.disconnects += 1
            self.stats.sample(f"Redis subscriber connection lost: {self.lost}")

    # -- API
    async def subscribe(self, workers: list[_Worker], timeout: float) -> None:
        """SUBSCRIBE every worker's :up channel, SUBSCRIBE_BATCH channels a command, one
        write; returns when Redis has confirmed every one of them."""
        if self.lost is not None or self.transport is None:
            raise ConnectionError(str(self.lost))
        channels = [w.up_channel for w in workers]
        self.by_channel.update(zip(channels, workers, strict=True))
        self.unconfirmed += len(channels)
        self.confirmed = asyncio.get_running_loop().create_future()
        self.transport.write(b"".join(
            _resp((b"SUBSCRIBE", *channels[i:i + SUBSCRIBE_BATCH]))
            for i in range(0, len(channels), SUBSCRIBE_BATCH)))
        try:
            await asyncio.wait_for(self.confirmed, timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.unconfirmed} of {len(channels)} subscriptions "
                               f"unconfirmed after {timeout:g}s") from None

    def close(self) -> None:
        self.closed = True
        super().close()


async def _open_publish_conn(redis_url: str, stats: _Stats) -> _PublishConn:
    return await _open_redis_conn(redis_url, lambda: _PublishConn(stats))


async def _open_redis_conn(redis_url: str, factory: Callable[[], Any]) -> Any:
    """Connect as REDIS_URL says (TCP, TLS with rediss://, unix://; AUTH when given)."""
    kw = parse_redis_url(redis_url)
    loop = asyncio.get_running_loop()
    cls_name = getattr(kw.get("connection_class"), "__name__", "")
    if "path" in kw:
        _, conn = await asyncio.wait_for(loop.create_unix_connection(factory, kw["path"]), 5)
    else:
        ctx = None
        if "SSL" in cls_name:
            cafile = kw.get("ssl_ca_certs")
            ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            if str(kw.get("ssl_cert_reqs", "required")).lower() in ("none", "0"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        _, conn = await asyncio.wait_for(loop.create_connection(
            factory, kw.get("host", "localhost"), kw.get("port", 6379), ssl=ctx), 5)
    password = kw.get("password")
    if password is not None:
        args = ("AUTH", kw["username"], password) if kw.get("username") else ("AUTH", password)
        reply = await asyncio.wait_for(conn.command(*args), 5)
        if not reply.startswith(b"+"):
            conn.close()
            raise ConnectionError(f"AUTH failed: {reply.decode('utf-8', 'replace')}")
    return conn


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Pacer:
    """Waits until a time.perf_counter_ns() instant, on a grid of ``tick`` seconds.

    A wait ends at the instant asked for, or at the next tick after the previous wait,
    whichever is later: the sender wakes once a tick at most, and the ticks do not drift
    by the time spent between waits (waking ``tick`` after each return made the period
    about 0.6 ms for a 0.5 ms tick, and the bursts a fifth larger). After a stall of more
    than a tick the grid starts again from now, rather than catching up tick by tick.

    The event loop's timers count whole milliseconds (libuv), so a schedule of 20,000
    messages a second would leave in bursts of 20 or more, stamped at one instant: the
    last of a burst then waits for the others at every hop, and the figures measure the
    bursts. On Linux a timerfd in the event loop wakes the sender at the due instant
    itself (CLOCK_MONOTONIC, the clock of perf_counter_ns); elsewhere, or if it cannot
    be made, the loop's timer is used with a 1 ms floor.
    """

    def __init__(self, tick: float) -> None:
        self.tick_ns = int(tick * 1e9)
        self.target_ns = 0  # the instant the last wait was for
        self.loop = asyncio.get_running_loop()
        self.fd = -1
        self.waiter: asyncio.Future[None] | None = None
        self.spec = _Itimerspec()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._settime = libc.timerfd_settime
            fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        except (AttributeError, OSError, TypeError):  # no timerfd (TypeError: Windows)
            fd = -1
        if fd >= 0:
            try:
                self.loop.add_reader(fd, self._expired)
                self.fd = fd
            except (NotImplementedError, OSError):
                os.close(fd)
        if self.fd < 0:
            self.tick_ns = max(self.tick_ns, int(MIN_TICK * 1e9))

    def _expired(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def until(self, due_ns: int) -> None:
        now = _now_ns()
        tick = self.target_ns + self.tick_ns
        if tick < now - self.tick_ns:
            tick = now  # more than a tick behind: a new grid from now
        due_ns = self.target_ns = max(due_ns, tick)
        if due_ns <= now:
            await asyncio.sleep(0)  # due already: still let the loop read meanwhile
            return
        if self.fd >= 0:
            self.spec.it_value.tv_sec, self.spec.it_value.tv_nsec = divmod(due_ns,
                                                                           1_000_000_000)
            if self._settime(self.fd, 1, ctypes.byref(self.spec), None) == 0:  # ABSTIME
                self.waiter = self.loop.create_future()
                await self.waiter
                return
        # No timerfd (or, should it fail, the loop's timer keeps the pace): it counts
        # whole milliseconds, so a shorter wait would end early.
        await asyncio.sleep(max((due_ns - now) / 1e9, MIN_TICK))

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def _pause_collector() -> bool:
    """Collect once, then keep the garbage collector out of the measurement (see the
    module's docstring). Returns whether it was on, for `_resume_collector`."""
    was_on = gc.isenabled()
    gc.collect()
    gc.freeze()  # what exists now is never scanned again, even by a caller's collect()
    gc.disable()
    return was_on


def _resume_collector(was_on: bool) -> None:
    gc.unfreeze()
    if was_on:
        gc.enable()


async def _publish_loop(conns: list[_PublishConn], connected: list[_Worker], nmsgs: int,
                        t0: int, step_ns: float, payload_size: int, pacer: _Pacer,
                        st: _Stats) -> None:
    """PUBLISH on schedule: message g = s*C + j (seq s for the j-th connected worker) is due
    at t0 + g*step, so each worker gets one per interval and the workers are spread evenly
    over it. Everything due at a tick goes out in one write per connection. A worker always
    uses the same connection, so Redis (and the proxy) keep its messages in order.

    The send stamp is taken once the tick's commands are built, just before they are
    written (right-aligned in STAMP_WIDTH characters; JSON allows the spaces before a
    number): building a tick's ten or more messages takes longer than writing them, and
    is no part of the path measured. A command is kept as its pieces, the stamp among
    them as one shared buffer filled in last, and each connection's are joined once.
    """
    C = len(connected)
    K = len(conns)
    total = C * nmsgs
    W = STAMP_WIDTH
    wids = [w.wid for w in connected]
    heads = [b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(w.channel), w.channel)
             for w in connected]
    route = [j % K for j in range(C)]
    # By the length n of a body's start ({"w":..,"s":..,"t":): the RESP length of the
    # body and its end after the stamp, so a body is exactly payload_size when it can be.
    ends = [b',"p":"' + _PAD[:max(0, payload_size - n - W - 8)] + b'"}' for n in range(128)]
    sizes = [b"$%d\r\n" % (n + W + len(ends[n])) for n in range(128)]
    ends = [end + b"\r\n" for end in ends]
    stamp_format = b"%" + str(W).encode() + b"d"
    m = s = j = 0
    while m < total:
        now = _now_ns()
        due_end = min(total, int((now - t0) // step_ns) + 1, m + MAX_BATCH)
        if due_end > m:
            lag = now - (t0 + m * step_ns)
            if lag > st.max_lag_ns:
                st.max_lag_ns = int(lag)
            stamp = bytearray(W)
            pieces: list[list[bytes | bytearray]] = [[] for _ in range(K)]
            for _ in range(m, due_end):
                head = b'{"w":%d,"s":%d,"t":' % (wids[j], s)
                n = len(head)
                pieces[route[j]] += (heads[j], sizes[n], head, stamp, ends[n])
                j += 1
                if j == C:
                    j = 0
                    s += 1
            now_stamp = stamp_format % _now_ns()
            if len(now_stamp) != W:  # a clock past 10**20 ns: never, but not silently
                raise LoadTestError(f"send stamp {now_stamp!r} is wider than {W}")
            stamp[:] = now_stamp
            for k in range(K):
                if pieces[k]:
                    conns[k].publish_batch(b"".join(pieces[k]), len(pieces[k]) // 5)  # 5 a command
            m = due_end
            if m >= total:
                break
        await pacer.until(int(t0 + m * step_ns))


async def _send_loop(connected: list[_Worker], nmsgs: int, t0: int, step_ns: float,
                     payload_size: int, pacer: _Pacer, st: _Stats) -> None:
    """Direction up: the same schedule as _publish_loop (message g = s*C + j, due at
    t0 + g*step), but each message is a text frame sent by worker j's own socket. One loop
    for all sockets; per message: the clock, the payload (two bytes objects) and the send.
    A socket that is gone is not sent to: those messages count as send errors.
    """
    C = len(connected)
    total = C * nmsgs
    wids = [w.wid for w in connected]
    sends = [w.transport.send for w in connected]
    # Payload tail by header length, so each message is built from one %-format and one +.
    tails = [_PAD[:max(0, payload_size - n - 2)] + b'"}' for n in range(128)]
    text = _TEXT
    now_ns = _now_ns
    m = s = j = 0
    while m < total:
        now = now_ns()
        due_end = min(total, int((now - t0) // step_ns) + 1, m + MAX_BATCH)
        if due_end > m:
            lag = now - (t0 + m * step_ns)
            if lag > st.max_lag_ns:
                st.max_lag_ns = int(lag)
            sent = 0
            for _ in range(m, due_end):
                if connected[j].closing:
                    st.publish_errors += 1
                else:
                    head = b'{"w":%d,"s":%d,"t":%d,"p":"' % (wids[j], s, now_ns())
                    sends[j](text, head + tails[len(head)])
                    sent += 1
                j += 1
                if j == C:
                    j = 0
                    s += 1
            st.sent += sent
            m = due_end
            if m >= total:
                break
        await pacer.until(int(t0 + m * step_ns))


async def run_load_test(num_workers: int, warmup: float, duration: float, interval: float,
                        host: str, port: int, *,
                        redis_url: str | None = None,
                        agent_id: str = "load",
                        payload_size: int = 128,
                        publishers: int = 2,
                        tick: float = TICK,
                        drain_timeout: float = DRAIN_TIMEOUT,
                        progress: Callable[[str], None] | None = None,
                        on_phase: Callable[[str], None] | None = None,
                        direction: str = "down",
                        keep_samples: bool = False) -> dict[str, Any]:
    """Run one load test and return its figures (the keys written by --json).

    ``direction="down"``: Redis PUBLISH -> socket; ``"up"``: socket -> wsproxy's PUBLISH on
    ``session:{sid}:up`` -> this program's Redis subscriber (``publishers`` is then unused).

    ``on_phase("measure_start")`` and ``on_phase("measure_end")`` bracket the measured
    window, ``"connect_start"``/``"connect_end"`` the connection phase, so a caller can
    read the server's own CPU time over exactly those windows. ``keep_samples`` adds
    every latency (ns, sorted) as ``latency_samples_ns``.

    Raises LoadTestError when Redis cannot be used; a run where no worker connects still
    returns (connected == 0, every failure in connect_errors).
    """
    if num_workers < 1 or warmup < 0 or duration <= 0 or interval <= 0 or payload_size < 0:
        raise ValueError("num_workers >= 1, warmup >= 0, duration > 0, interval > 0 required")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    up = direction == "up"
    if up and _HiredisReader is None:
        raise LoadTestError("--direction up needs hiredis (pip install hiredis)")
    say = progress or (lambda _msg: None)
    redis_url = redis_url or redis_url_from_env()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    nofile = raise_nofile_limit()
    if num_workers + 64 > nofile:
        say(f"warning: {num_workers} sockets need more file descriptors than the limit ({nofile})")

    nmsgs = max(1, int(duration / interval + 1e-9))
    run_id = f"{os.getpid():x}{secrets.token_hex(3)}"
    stats = _Stats()
    workers = [
        _Worker(i, f"lt-{run_id}-{i}", secrets.token_urlsafe(18), stats, nmsgs, up)
        for i in range(num_workers)
    ]
    netloc = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    base = f"ws://{netloc}/{agent_id}/ws/"
    n_pub = 0 if up else max(1, min(publishers, num_workers))
    try:
        client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5)
    except ValueError as e:
        raise LoadTestError(f"invalid REDIS_URL {safe_url(redis_url)!r}: {e}") from e
    connected: list[_Worker] = []
    conns: list[_PublishConn] = []
    sub: _SubscribeConn | None = None
    failures: Counter = Counter()
    keys_set = False
    collector_was_on: bool | None = None
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as e:
            raise LoadTestError(f"cannot reach Redis at {safe_url(redis_url)}: {e}") from e
        ttl = int(warmup + duration + 600)
        keys_set = True
        await _redis_pipelined(
            client, [("SET", f"session:{w.sid}:auth", w.token, "EX", ttl) for w in workers],
            "storing the auth tokens")
        try:
            for _ in range(n_pub):
                conns.append(await _open_publish_conn(redis_url, stats))
        except (TimeoutError, OSError) as e:
            raise LoadTestError(f"cannot open a publishing connection to Redis at "
                                f"{safe_url(redis_url)}: {e}") from e

        say(f"Connecting {num_workers} workers to ws://{netloc}/{agent_id}/ws/... "
            f"({CONNECT_CONCURRENCY} at a time)")
        if on_phase is not None:
            on_phase("connect_start")
        t_conn = time.perf_counter()
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        ok = await asyncio.gather(*(_connect_worker(w, base + w.sid, sem, failures, stats)
                                    for w in workers))
        connect_secs = time.perf_counter() - t_conn
        if on_phase is not None:
            on_phase("connect_end")
        connected = [w for w, good in zip(workers, ok, strict=True) if good]
        say(f"Connected {len(connected)}/{num_workers} in {connect_secs:.2f}s"
            + (f"; failures: {dict(failures)}" if failures else ""))

        C = len(connected)
        sent_target = C * nmsgs
        if up and C:
            # Subscribed (every confirmation in) before the measurement starts.
            say(f"Subscribing to {C} session:{{sid}}:up channels")
            try:
                sub = await _open_redis_conn(redis_url, lambda: _SubscribeConn(stats))
                await sub.subscribe(connected, SUBSCRIBE_TIMEOUT)
            except (TimeoutError, OSError) as e:
                raise LoadTestError(f"cannot subscribe to the :up channels at "
                                    f"{safe_url(redis_url)}: {e}") from e
        t_measure = time.perf_counter()
        cpu_measure = time.process_time()
        publish_secs = 0.0
        if C:
            collector_was_on = _pause_collector()
            if warmup > 0:
                say(f"Warming up for {warmup:g}s")
                await asyncio.sleep(warmup)
            say(f"Measuring: {C} workers x {nmsgs} messages, {C / interval:g} msg/s "
                f"for {nmsgs * interval:g}s")
            if on_phase is not None:
                on_phase("measure_start")
            t_measure = time.perf_counter()
            cpu_measure = time.process_time()
            step_ns = interval * 1e9 / C
            t0 = _now_ns() + 1_000_000
            pacer = _Pacer(tick)
            try:
                if up:
                    await _send_loop(connected, nmsgs, t0, step_ns, payload_size, pacer,
                                     stats)
                else:
                    await _publish_loop(conns, connected, nmsgs, t0, step_ns, payload_size,
                                        pacer, stats)
            finally:
                pacer.close()
            publish_end = time.perf_counter()
            for c in conns:   # every PUBLISH answered (bounded)
                await c.wait_acked(max(0.1, publish_end + 5 - time.perf_counter()))
            publish_secs = publish_end - t_measure
            deadline = time.perf_counter() + drain_timeout
            while stats.received < stats.sent and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
        measure_wall = time.perf_counter() - t_measure
        if C and on_phase is not None:
            on_phase("measure_end")
        measure_cpu = time.process_time() - cpu_measure

        # Freeze the figures before tearing down.
        lat = sorted(stats.latencies)
        n = len(lat)
        if n:
            latency: dict[str, int | None] = {
                "min": lat[0], "avg": sum(lat) // n,
                "p50": _percentile(lat, 50), "p95": _percentile(lat, 95),
                "p99": _percentile(lat, 99), "p999": _percentile(lat, 99.9), "max": lat[-1],
            }
        else:
            latency = dict.fromkeys(("min", "avg", "p50", "p95", "p99", "p999", "max"))
        errors_by_type = {
            "connect": sum(failures.values()),
            "disconnected": stats.disconnects,
            "publish": stats.publish_errors,
            "bad_message": stats.bad_messages,
        }
        received = stats.received
        sent = stats.sent
        result: dict[str, Any] = {
            "direction": direction,
            "workers": num_workers,
            "connected": C,
            "warmup_secs": warmup,
            "duration_secs": duration,
            "interval_secs": interval,
            "messages_per_worker": nmsgs,
            "rate_msgs_per_sec": (C / interval) if C else 0.0,
            "achieved_rate_msgs_per_sec": (sent / publish_secs) if publish_secs else 0.0,
            "payload_size": payload_size,
            "publishers": n_pub,
            "subscribers": 1 if sub is not None else 0,
            "subscribed_channels": len(sub.by_channel) if sub is not None else 0,
            "url": f"ws://{netloc}/{agent_id}/ws/{{session_id}}",
            "total_measurements": n,
            "errors": sum(errors_by_type.values()),
            "errors_by_type": errors_by_type,
            "connect_errors": dict(failures),
            "error_samples": list(stats.samples),
            "latency_ns": latency,
            # Upstream, every message has its own send stamp: no bursts to split.
            "bursts": _bursts(stats.stamps, stats.latencies) if not up else _bursts(
                array.array("q"), array.array("q")),
            **({"latency_samples_ns": lat} if keep_samples else {}),
            "latency_ms": {k: (v / 1e6 if v is not None else None) for k, v in latency.items()},
            "sent_target": sent_target,
            "sent": sent,
            "received": received,
            "delivery_ratio_percent": (100.0 * received / sent) if sent else None,
            "lost": sent - received,
            "duplicated": stats.duplicated,
            "out_of_order": stats.out_of_order,
            "publish_no_receivers": stats.no_receivers,
            "publish_max_lag_ms": stats.max_lag_ns / 1e6,
            "publish_max_inflight": max((c.max_inflight for c in conns), default=0),
            "connect_secs": connect_secs,
            "measure_wall_secs": measure_wall,
            "cpu_secs": measure_cpu,
            "cpu_percent": (100.0 * measure_cpu / measure_wall) if C and measure_wall > 0 else None,
        }
    finally:
        if collector_was_on is not None:
            _resume_collector(collector_was_on)
        for c in conns:
            c.close()
        if sub is not None:
            sub.close()
        await _teardown(client, workers, connected, keys_set)

    result["total_wall_secs"] = time.perf_counter() - wall0
    result["total_cpu_secs"] = time.process_time() - cpu0
    return result


async def _teardown(client, workers: list[_Worker], connected: list[_Worker],
                    delete_keys: bool) -> None:
    """Close the sockets (1000) and delete the tokens; bounded in time, never raises."""
    waits: list[Any] = []
    for w in connected:
        t = w.transport
        w.closing = True
        if t is None:
            continue
        try:
            t.send_close(WSCloseCode.OK)
            t.disconnect()
            waits.append(t.wait_disconnected())
        except Exception:
            pass
    if waits:
        try:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 5)
        except (TimeoutError, Exception):
            pass
    try:
        if delete_keys:
            keys = [f"session:{w.sid}:auth" for w in workers]
            await asyncio.wait_for(
                _redis_pipelined(client, [("DEL", *keys[i:i + 500])
                                          for i in range(0, len(keys), 500)],
                                 "deleting the auth tokens"), 5)
    except (TimeoutError, LoadTestError, RedisError, OSError):
        pass
    finally:
        try:
            await asyncio.wait_for(client.aclose(), 2)
        except (TimeoutError, RedisError, OSError):
            pass


# --------------------------------------------------------------------------- command line

def _seconds(allow_zero: bool) -> Callable[[str], float]:
    def check(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
        if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be {'>= 0' if allow_zero else '> 0'}: {value!r}")
        return x
    return check


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535: {value!r}")
    return n


def _host(value: str) -> str:
    if not value or any(c.isspace() or c in "/?#@" for c in value):
        raise argparse.ArgumentTypeError(f"invalid host: {value!r}")
    return value


def _size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 0 <= n <= len(_PAD):
        raise argparse.ArgumentTypeError(f"must be 0-{len(_PAD)}: {value!r}")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="load_test.py",
        usage="%(prog)s <num_workers> <warmup_secs> <test_duration_secs> "
              "<message_interval_secs> <ws_host> <ws_port> [--json FILE] "
              "[--direction {down,up}] [--tick SECS]",
        description="End-to-end latency and delivery test for wsproxy.",
        epilog="Example: load_test.py 50 3 10 1 127.0.0.1 4040. "
               "Environment: REDIS_URL (default redis://127.0.0.1:6379).")
    p.add_argument("num_workers", type=positive_int, help="WebSocket connections")
    p.add_argument("warmup_secs", type=_seconds(True), help="wait after connecting")
    p.add_argument("test_duration_secs", type=_seconds(False), help="measurement period")
    p.add_argument("message_interval_secs", type=_seconds(False),
                   help="each worker receives (or, up, sends) one message per interval")
    p.add_argument("ws_host", type=_host, help="wsproxy host, e.g. 127.0.0.1")
    p.add_argument("ws_port", type=_port, help="wsproxy port, e.g. 4040")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    p.add_argument("--agent-id", type=agent_id, default="load", help="agent id in the URL")
    p.add_argument("--payload-size", type=_size, default=128, metavar="BYTES",
                   help="approximate message size (default 128)")
    p.add_argument("--publishers", type=positive_int, default=2, metavar="N",
                   help="Redis connections the PUBLISHes are pipelined over (default 2; "
                        "down only)")
    p.add_argument("--direction", choices=DIRECTIONS, default="down",
                   help="down (default): Redis PUBLISH -> socket; up: socket -> wsproxy -> "
                        "Redis subscriber")
    p.add_argument("--tick", type=_seconds(False), default=TICK, metavar="SECS",
                   help=f"the sender wakes at most this often, and sends what is due "
                        f"(default {TICK:g}: at 20,000 msg/s, 10 at a time)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    # Refused handshakes are counted and summarised; don't log each one.
    logging.getLogger("picows").setLevel(logging.CRITICAL)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    async def run() -> int:
        try:
            d = await run_load_test(
                args.num_workers, args.warmup_secs, args.test_duration_secs,
                args.message_interval_secs, args.ws_host, args.ws_port,
                agent_id=args.agent_id, payload_size=args.payload_size,
                publishers=args.publishers, progress=say, direction=args.direction,
                tick=args.tick)
        except LoadTestError as e:
            say(f"error: {e}")
            return 1
        print(format_results(d), flush=True)
        if args.json:
            try:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(d, f, indent=2, ensure_ascii=False)
                    f.write("\n")
            except OSError as e:
                say(f"error: cannot write {args.json}: {e}")
                return 1
        if d["connected"] == 0:
            reasons = ", ".join(f"{k} x{v}" for k, v in d["connect_errors"].items())
            say(f"error: no worker could connect to {args.ws_host}:{args.ws_port} ({reasons})")
            return 1
        return 0

    return run_until_signal(run(), stopped="Interrupted; no results.", uvloop=True)


if __name__ == "__main__":
    run_main(main)
