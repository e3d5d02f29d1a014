"""Guards on the hand-over to picows, which uses picows internals.

wsproxy/http.py constructs ``picows.picows.WSProtocol`` positionally, the way
``picows/api.py`` does in ``ws_create_server``. If a picows upgrade changes that, these
tests fail loudly here rather than as mysterious handshake failures.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from importlib import metadata

import picows.api
import pytest
import websockets

PINNED = "2.3.1"


def test_picows_is_the_pinned_version():
    assert metadata.version("picows") == PINNED, (
        "wsproxy/http.py hands connections to picows' internal WSProtocol; re-check its "
        "constructor against picows/api.py before moving the pin")


def test_pyproject_pins_picows_exactly():
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert text.count(f'"picows=={PINNED}"') == 2  # runtime and build-time


def test_wsprotocol_constructor_matches_what_http_py_passes():
    source = inspect.getsource(picows.api.ws_create_server)
    call = re.search(r"return WSProtocol\((.*?)\n\s*\)", source, re.S)
    assert call is not None, "picows.api.ws_create_server no longer builds a WSProtocol"
    arguments = [a.split("#")[0].strip() for a in call.group(1).split("\n")]
    arguments = [a.rstrip(",") for a in arguments if a]
    flat = [x.strip() for a in arguments for x in a.split(",") if x.strip()]
    assert flat == [
        "None", "None", "False", "ws_listener_factory",
        '_resolve_logger(logger_name', '"server")',
        "disconnect_on_exception", "websocket_handshake_timeout",
        "enable_auto_ping", "auto_ping_idle_timeout", "auto_ping_reply_timeout",
        "auto_ping_strategy", "enable_auto_pong", "max_frame_size", "None",
        "read_buffer_init_size",
    ]


def test_frames_sent_with_the_request_are_not_lost(proxy, redis_server, session_id):
    """Bytes that arrive with the request head are replayed into picows, not dropped,
    and reading resumes after the hand-over (pitfalls 1 and 3 of the hand-over notes)."""
    import socket

    from .rawws import RawWebSocket

    redis_server.client().set(f"session:{session_id}:auth", "tok")
    up = redis_server.client().pubsub()
    up.subscribe(f"session:{session_id}:up")
    up.get_message(timeout=5)
    raw = RawWebSocket.__new__(RawWebSocket)
    raw.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    raw.buffer = b""
    # Request head and a first text frame in the same write.
    head = (f"GET /agent1/ws/{session_id} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer tok\r\n\r\n").encode()
    frame = bytes([0x81, 0x80 | 9]) + b"\0\0\0\0" + b'{"pre":1}'
    raw.sock.sendall(head + frame)
    while b"\r\n\r\n" not in raw.buffer:
        raw.buffer += raw.sock.recv(4096)
    assert raw.buffer.startswith(b"HTTP/1.1 101 ")
    raw.buffer = raw.buffer.partition(b"\r\n\r\n")[2]
    raw.send_frame(0x1, b'{"post":2}')  # read after the hand-over: reading was resumed
    got = []
    for _ in range(40):
        m = up.get_message(timeout=0.25)
        if m and m["type"] == "message":
            got.append(m["data"])
        if len(got) == 2:
            break
    raw.close()
    assert got == [b'{"pre":1}', b'{"post":2}']


def test_websockets_client_completes_close_handshake(proxy, redis_server, session_id):
    redis_server.client().set(f"session:{session_id}:auth", "tok")

    async def main():
        ws = await websockets.connect(f"{proxy.ws_url}/a/ws/{session_id}",
                                      additional_headers={"Authorization": "Bearer tok"})
        await ws.close()
        return ws.protocol.close_rcvd.code

    assert asyncio.run(main()) == 1000


def test_socket_options_set_and_read_the_real_socket():
    import socket

    from wsproxy._fastpath import SocketOptions

    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        options = SocketOptions(client.fileno())
        assert options.fileno() == client.fileno()
        options.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert options.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        options.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert options.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == client.getsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF)
    with pytest.raises(OSError):
        SocketOptions(-1).getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_transport_for_picows_passes_through_and_picows_sets_nodelay():
    """picows is given a view of the uvloop transport: its socket calls must reach the
    real socket (TCP_NODELAY set), and everything else the real transport."""
    import socket

    import uvloop
    from picows import WSAutoPingStrategy
    from picows.picows import WSProtocol

    from wsproxy.http import TransportForPicows

    async def main():
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()

        class Keep(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport)

        server = await loop.create_server(Keep, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        transport = await accepted
        real = transport.get_extra_info("socket")
        real.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        view = TransportForPicows(transport)
        assert view.get_extra_info("socket").fileno() == real.fileno()
        assert view.get_extra_info("peername") == transport.get_extra_info("peername")
        assert view.is_closing() is False
        import logging
        proto = WSProtocol(None, None, False, lambda r: None, logging.getLogger("t"), True,
                           None, False, 20, 20,
                           WSAutoPingStrategy.PING_WHEN_IDLE, False, 1 << 20, None, 4096)
        transport.set_protocol(proto)
        proto.connection_made(view)
        nodelay = real.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert proto.transport.underlying_transport is view
        view.set_write_buffer_limits(high=0, low=0)  # passed through
        assert transport.get_write_buffer_limits() == (0, 0)
        view.write(b"x")
        assert client.recv(1) == b"x"
        view.close()
        client.close()
        server.close()
        return nodelay

    assert uvloop.run(main()) == 1


# The upgrade itself: _fastpath.accept_upgrade, and picows' own negotiation as fallback.
RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example
RFC_101 = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


HEAD = (b"GET /a/ws/s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + RFC_KEY + b"\r\n\r\n")


async def _hand_over_accepted(listener, early: bytes):
    """Accept a TCP connection from a plain client socket and hand it to ``listener`` as
    the gate does after auth (reading paused, the head and ``early`` bytes buffered).
    Returns the server, the client socket, the uvloop transport and _hand_over's answer."""
    import socket
    from types import SimpleNamespace

    from wsproxy import http

    loop = asyncio.get_running_loop()
    accepted = loop.create_future()

    class Keep(asyncio.Protocol):
        def connection_made(self, transport):
            transport.pause_reading()
            accepted.set_result(transport)

    server = await loop.create_server(Keep, "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname())
    client.settimeout(5)
    transport = await accepted
    gate = http.Gate(SimpleNamespace(config=SimpleNamespace(max_frame_size_bytes=1 << 20)))
    gate.transport = transport
    gate.buffer = bytearray(HEAD + early)
    gate.head_end = len(HEAD) - 4
    gate.ws_key = RFC_KEY
    return server, client, transport, gate._hand_over(listener)


async def _receive(client, until) -> bytes:
    """What the client receives until ``until(bytes)`` holds or the server closes."""
    received = b""
    while not until(received):
        chunk = await asyncio.get_running_loop().run_in_executor(None, client.recv, 4096)
        if not chunk:
            break
        received += chunk
    return received


async def _wait_for(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fast", [True, False], ids=["accept_upgrade", "picows_negotiates"])
def test_hand_over_upgrades_sends_and_receives(fast, monkeypatch):
    """Both ways of upgrading give the client the same 101 (RFC 6455's accept value for
    its key), leave picows parsing frames (state READ_HEADER) with the listener and its
    transport in place, deliver a frame sent with the request head, carry frames both
    ways, report the disconnect, and keep no reference to the listener or its transport."""
    import gc
    import weakref

    import uvloop
    from picows import WSListener, WSMsgType

    from wsproxy import http
    from wsproxy._fastpath import picows_parser_state

    class Recorder(WSListener):
        connected = False

        def __init__(self):
            super().__init__()
            self.events = []
            self.transport = None

        def on_ws_connected(self, transport):
            self.connected = True
            self.transport = transport
            self.events.append("connected")
            transport.send(WSMsgType.TEXT, b"hello")

        def on_ws_frame(self, transport, frame):
            self.events.append(frame.get_payload_as_bytes())

        def on_ws_disconnected(self, transport):
            self.events.append("disconnected")

    monkeypatch.setattr(http, "_fast_upgrade", None if fast else False)

    async def main():
        listener = Recorder()
        server, client, transport, upgraded = await _hand_over_accepted(
            listener, _masked_text(b"early"))
        assert upgraded is True
        assert http.fast_upgrade_available() is fast
        proto = transport.get_protocol()
        assert picows_parser_state(proto) == 1  # READ_HEADER: parsing frames
        assert proto.listener is listener and proto.transport is listener.transport
        received = await _receive(client, lambda b: len(b) >= len(RFC_101) + 7)
        client.sendall(_masked_text(b"later"))
        await _wait_for(lambda: len(listener.events) >= 3)
        client.close()
        await _wait_for(lambda: "disconnected" in listener.events)
        server.close()
        await server.wait_closed()
        # (WSProtocol takes no weak reference; it holds both of these.)
        return (received, listener.events, weakref.ref(listener.transport),
                weakref.ref(listener))

    received, events, transport_ref, listener_ref = uvloop.run(main())
    assert received == RFC_101 + b"\x81\x05hello"
    assert events == ["connected", b"early", b"later", "disconnected"]
    gc.collect()
    assert transport_ref() is None and listener_ref() is None  # no reference left behind


@pytest.mark.parametrize("fast", [True, False], ids=["accept_upgrade", "picows_negotiates"])
def test_a_listener_that_fails_to_connect_gets_1011(fast, monkeypatch):
    """An exception from on_ws_connected closes the connection with 1011 after the 101,
    as picows does, either way."""
    import uvloop
    from picows import WSListener

    from wsproxy import http

    class Failing(WSListener):
        connected = False

        def on_ws_connected(self, transport):
            raise RuntimeError("cannot connect")

    monkeypatch.setattr(http, "_fast_upgrade", None if fast else False)

    async def main():
        server, client, _transport, upgraded = await _hand_over_accepted(Failing(), b"")
        received = await _receive(client, lambda b: False)  # until the server closes
        client.close()
        server.close()
        return upgraded, received

    upgraded, received = uvloop.run(main())
    assert upgraded is False
    assert received == RFC_101 + b"\x88\x02\x03\xf3"  # CLOSE, code 1011, then the end


def test_picows_layout_check_accepts_the_pinned_picows_and_refuses_a_mismatch():
    """accept_upgrade writes into picows' WSProtocol through a layout wsproxy declares:
    with the pinned picows it must match (or every upgrade takes the slower path), and
    the check must refuse an object built otherwise, or something that is no WSProtocol."""
    import uvloop

    from wsproxy import http
    from wsproxy._fastpath import picows_layout_matches, picows_parser_state

    async def main():
        loop = asyncio.get_running_loop()

        def factory(_request):
            return None

        idle, reply = 21.5, 22.5
        proto = http._picows_protocol(factory, 4321, idle, reply)
        logger = http._PICOWS_LOGGER
        return (picows_layout_matches(proto, factory, logger, loop, 4321, idle, reply),
                picows_layout_matches(proto, factory, logger, loop, 4322, idle, reply),
                picows_layout_matches(proto, factory, logger, loop, 4321, reply, idle),
                picows_layout_matches(proto, lambda r: None, logger, loop, 4321, idle, reply),
                picows_layout_matches(object(), factory, logger, loop, 4321, idle, reply),
                picows_parser_state(proto))

    assert uvloop.run(main()) == (True, False, False, False, False, 0)


def test_an_unknown_picows_layout_falls_back_to_picows_negotiation(monkeypatch, caplog):
    """Should the layout check fail (another picows), the process says so once and
    every upgrade goes through picows' own negotiation."""
    import logging

    import uvloop

    from wsproxy import http

    monkeypatch.setattr(http, "_fast_upgrade", None)
    monkeypatch.setattr(http, "picows_layout_matches", lambda *args: False)

    async def main():
        return http.fast_upgrade_available(), http.fast_upgrade_available()

    with caplog.at_level(logging.WARNING, logger="wsproxy"):
        assert uvloop.run(main()) == (False, False)
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("picows_layout_unknown") == 1


def test_the_layout_functions_refuse_anything_but_a_picows_protocol():
    """They read and write picows' object memory: given another object they must
    raise, not write."""
    from picows import WSListener

    from wsproxy._fastpath import TransportForPicows, accept_upgrade, picows_parser_state

    with pytest.raises(TypeError):
        picows_parser_state(object())
    with pytest.raises(TypeError):
        accept_upgrade([], TransportForPicows.__new__(TransportForPicows), WSListener(),
                       RFC_KEY, None, None)


def _frame_zero_mask(payload: bytes) -> bytes:
    """A client text frame of any size, masked with the zero key (so sent as is)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


def test_read_buffer_goes_back_to_its_initial_size_between_frames(monkeypatch):
    """picows grows a socket's read buffer to fit a frame and never shrinks it; the
    listener gives it back between frames, never while part of a frame waits in it."""
    import uvloop

    from wsproxy import http
    from wsproxy._fastpath import (
        READ_BUFFER_INIT,
        SessionListener,
        Upstream,
        picows_read_buffer_capacity,
    )

    from .conftest import NullEvents

    class Recorder(SessionListener):
        def on_ws_frame(self, transport, frame):
            self.got.append(frame.get_payload_as_bytes())
            SessionListener.on_ws_frame(self, transport, frame)

    monkeypatch.setattr(http, "_fast_upgrade", None)
    big1 = b'"' + b"a" * 900_000 + b'"'
    big2 = b'"' + b"b" * 900_000 + b'"'
    second = _frame_zero_mask(big2)

    async def main():
        listener = Recorder(Upstream(), b"session:s:up", 1, "s", "a", NullEvents())
        listener.got = []
        server, client, transport, upgraded = await _hand_over_accepted(listener, b"")
        assert upgraded is True
        proto = transport.get_protocol()
        capacities = [picows_read_buffer_capacity(proto)]
        # The first frame whole and half the second: the buffer must keep that half.
        client.sendall(_frame_zero_mask(big1) + second[:len(second) // 2])
        await _wait_for(lambda: len(listener.got) == 1)
        await asyncio.sleep(0.05)
        capacities.append(picows_read_buffer_capacity(proto))
        client.sendall(second[len(second) // 2:])
        await _wait_for(lambda: len(listener.got) == 2)
        await asyncio.sleep(0.05)
        capacities.append(picows_read_buffer_capacity(proto))
        client.sendall(_frame_zero_mask(b'{"after":1}'))
        await _wait_for(lambda: len(listener.got) == 3)
        client.close()
        await _wait_for(lambda: not listener.connected)
        server.close()
        await server.wait_closed()
        return capacities, listener.got

    capacities, got = uvloop.run(main())
    assert capacities[0] == READ_BUFFER_INIT
    assert capacities[1] > 450_000  # half a frame waits in it
    assert capacities[2] == READ_BUFFER_INIT
    assert got == [big1, big2, b'{"after":1}']
