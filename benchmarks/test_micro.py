"""Micro benchmarks of the hot-path pieces, without the network.

Run: ``pytest benchmarks/test_micro.py`` (add ``--benchmark-compare`` to compare with
the committed baseline). MB/s figures land in each benchmark's ``extra_info``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

import orjson
import pytest

from wsproxy import _fastpath
from wsproxy.auth import token_from_request
from wsproxy.http import parse_request_head, upgrade_problem


def document(size: int) -> bytes:
    """A typical JSON message of about ``size`` bytes: objects, strings, numbers."""
    item = {"type": "token", "text": "Hello, wörld — streaming ✓", "index": 12345,
            "score": -0.125e-3, "flags": [True, False, None], "nested": {"a": [1, 2, 3]}}
    per_item = len(json.dumps(item, ensure_ascii=False).encode()) + 1
    items = [item] * max(1, -(-size // per_item))
    return json.dumps({"items": items}, ensure_ascii=False).encode()


SIZES = {"small": 64, "1KiB": 1024, "64KiB": 64 * 1024, "1MiB": 1024 * 1024}
DOCS = {name: document(size) if size > 64 else b'{"type":"ping","counter":1}'
        for name, size in SIZES.items()}
PARSERS = {
    "wsproxy": _fastpath.validate_json,
    "orjson": orjson.loads,
    "json": json.loads,
}


def record_throughput(benchmark, size: int) -> None:
    """MB/s at the median time, in extra_info (absent with --benchmark-disable)."""
    if benchmark.stats:
        benchmark.extra_info["MB_per_s"] = round(size / benchmark.stats.stats.median / 1e6, 1)


@pytest.mark.parametrize("size", list(DOCS))
@pytest.mark.parametrize("parser", list(PARSERS))
def test_validate_json(benchmark, parser, size):
    data = DOCS[size]
    fn = PARSERS[parser]
    benchmark.group = f"validate-json-{size}"
    result = benchmark(fn, data)
    assert result is True or result is not None
    benchmark.extra_info["bytes"] = len(data)
    record_throughput(benchmark, len(data))


def test_utf8_valid_ascii_1mib(benchmark):
    data = b"a" * (1024 * 1024)
    benchmark.group = "utf8"
    assert benchmark(_fastpath.utf8_valid, data) is True
    record_throughput(benchmark, len(data))


def test_encode_publish_python(benchmark):
    """The Python-level encoder (control paths); the hot path's is measured below."""
    channel = b"session:0123456789abcdef:up"
    payload = DOCS["small"]
    benchmark.group = "resp"
    out = benchmark(_fastpath.encode_publish, channel, payload)
    assert out.endswith(payload + b"\r\n")


class _Events:
    def connected(self, listener):
        pass

    def disconnected(self, listener):
        pass

    def too_slow(self, listener):
        pass


@pytest.fixture
def socket_pair_listener():
    """A SessionListener on a real uvloop transport whose peer is drained by a thread."""
    import uvloop
    from picows.picows import WSTransport

    loop = uvloop.new_event_loop()
    ours, theirs = socket.socketpair()
    # Room for the drain thread to fall behind without the socket ever filling up: the
    # benchmark measures the direct-send path, not the transport's queue.
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    ours.setblocking(False)
    stop = threading.Event()

    def drain():
        theirs.settimeout(0.2)
        while not stop.is_set():
            try:
                if not theirs.recv(1 << 20):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()

    async def make():
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        wst = WSTransport(False, transport, logging.getLogger("bench"), loop)
        listener = _fastpath.SessionListener(_fastpath.Upstream(), b"session:s:up", 1, "s", "a",
                                             _Events())
        listener.on_ws_connected(wst)
        return transport, listener

    _fastpath.configure(1 << 20, 1 << 30)
    transport, listener = loop.run_until_complete(make())
    yield loop, listener, transport
    stop.set()
    transport.abort()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    theirs.close()
    drainer.join(2)


def test_downstream_dispatch_one_message(benchmark, socket_pair_listener):
    """One Redis ``message`` reply, read in place -> route lookup -> WebSocket frame to a
    socket (one sendmsg() into a Unix socket pair)."""
    loop, listener, _ = socket_pair_listener
    channel = b"session:s:down"
    routes = _fastpath.RouteTable()
    routes[channel] = _fastpath.Route(channel)
    routes[channel].add(listener)
    proto = _fastpath.PubSubProtocol(None, routes, lambda reply: None)
    payload = DOCS["small"]
    reply = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel), channel, len(payload), payload)
    before = _fastpath.stats.snapshot()["messages_down"]
    benchmark.group = "dispatch"
    benchmark(proto.data_received, reply)
    assert _fastpath.stats.snapshot()["messages_down"] > before
    assert listener.write_buffer_size == 0, "the socket filled up: not the direct path"



def test_handshake_path_without_network(benchmark):
    """Everything the gate does for an upgrade request except the Redis round trips."""
    head = (b"GET /agent-1/ws/session-0123456789 HTTP/1.1\r\nHost: proxy:4040\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer 9f8e7d6c5b4a\r\nUser-Agent: bench")

    def handshake():
        request = parse_request_head(head)
        assert upgrade_problem(request) is None
        token = token_from_request(request.headers.get("authorization"), request.query)
        return _fastpath.SessionListener(_fastpath.Upstream(), b"session:x:up", 1,
                                         "session-0123456789", "agent-1", _Events()), token

    benchmark.group = "handshake"
    _, token = benchmark(handshake)
    assert token == "9f8e7d6c5b4a"


def test_upstream_frame_to_publish(benchmark, socket_pair_listener):
    """A client text frame -> JSON/UTF-8 validation -> RESP PUBLISH appended for Redis."""
    from picows.picows import WSMsgType, _make_test_ws_frame

    loop, listener, transport = socket_pair_listener
    upstream = _fastpath.Upstream()

    class Owner:
        def connection_made(self, proto):
            pass

    proto = _fastpath.CommandProtocol(Owner())

    async def attach():
        proto.connection_made(transport)  # the drained socket stands in for Redis

    loop.run_until_complete(attach())
    upstream.proto = proto
    listener = _fastpath.SessionListener(upstream, b"session:0123456789abcdef:up", 2, "s", "a",
                                         _Events())
    frame = _make_test_ws_frame(WSMsgType.TEXT, DOCS["small"], True, False)
    before = _fastpath.stats.snapshot()["messages_up"]
    benchmark.group = "upstream"
    benchmark(listener.on_ws_frame, None, frame)
    assert _fastpath.stats.snapshot()["messages_up"] > before
