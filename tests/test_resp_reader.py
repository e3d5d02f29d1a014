"""The Redis read path without the network: replies cut at their boundaries in the
read buffer, pub/sub messages sent straight from it, everything else read by hiredis.

Streams are fed in arbitrary pieces (hypothesis picks the cuts), the way TCP may
deliver them; what comes out is compared with what hiredis alone makes of the stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from picows.picows import WSTransport

from wsproxy import _fastpath

from .conftest import NullEvents, publishing_listener

# ---------------------------------------------------------------------------
# RESP values, their encoding, and what hiredis makes of them

line_text = st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b)

resp_values = st.recursive(
    st.one_of(
        st.tuples(st.just("bulk"), st.binary(max_size=40)),
        st.tuples(st.just("simple"), line_text),
        st.tuples(st.just("error"), line_text.map(lambda b: b"ERR " + b)),
        st.tuples(st.just("int"), st.integers(min_value=-10**15, max_value=10**15)),
        st.just(("null",)),
    ),
    lambda children: st.one_of(
        st.tuples(st.just("array"), st.lists(children, max_size=4)),
        st.just(("null_array",)),
    ),
    max_leaves=12,
)


def encode(value) -> bytes:
    kind = value[0]
    if kind == "bulk":
        return b"$%d\r\n%b\r\n" % (len(value[1]), value[1])
    if kind == "simple":
        return b"+%b\r\n" % value[1]
    if kind == "error":
        return b"-%b\r\n" % value[1]
    if kind == "int":
        return b":%d\r\n" % value[1]
    if kind == "null":
        return b"$-1\r\n"
    if kind == "null_array":
        return b"*-1\r\n"
    return b"*%d\r\n" % len(value[1]) + b"".join(encode(v) for v in value[1])


def comparable(reply):
    """hiredis' reply with errors made comparable (exceptions compare by identity)."""
    if isinstance(reply, hiredis.ReplyError):
        return ("error", str(reply))
    if isinstance(reply, list):
        return [comparable(r) for r in reply]
    return reply


def hiredis_replies(stream: bytes) -> list:
    reader = hiredis.Reader()
    reader.feed(stream)
    out = []
    while (reply := reader.gets()) is not False:
        out.append(comparable(reply))
    return out


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def route_table(*routes: _fastpath.Route) -> _fastpath.RouteTable:
    table = _fastpath.RouteTable()
    for route in routes:
        table[route.channel] = route
    return table


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel), channel, len(payload), payload)


# ---------------------------------------------------------------------------
# Where a reply ends

@given(resp_values)
def test_reply_end_is_where_hiredis_stops(value):
    data = encode(value)
    assert _fastpath.reply_end(data + b"+next\r\n") == len(data)
    assert hiredis_replies(data + b"+next\r\n")[-1] == b"next"


@given(resp_values, st.data())
def test_a_cut_reply_needs_more(value, data):
    encoded = encode(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    assert _fastpath.reply_end(encoded[:cut]) == -2


@pytest.mark.parametrize("reply", [
    b"+a\rb\r\n",                                  # only CRLF ends a line, not a lone CR
    b":12\r\r\n",
    b">3\r\n+message\r\n$1\r\nc\r\n:1\r\n",        # push
    b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n_\r\n#t\r\n",  # map: two replies an entry
    b"~2\r\n,1.5\r\n(12345678901234567890\r\n",  # set, double, big number
    b"=8\r\ntxt:ab\r\n\r\n",                     # verbatim string holding CRLF
    b"!5\r\nERR x\r\n",                          # blob error
    b"%-1\r\n",
])
def test_resp3_reply_ends(reply):
    """RESP3 is never asked for (no HELLO 3), but its shapes are cut right too."""
    assert _fastpath.reply_end(reply + b"+next\r\n") == len(reply)
    assert all(_fastpath.reply_end(reply[:cut]) == -2 for cut in range(len(reply)))


@pytest.mark.parametrize("bad", [b"?what\r\n", b"$abc\r\n", b"*x\r\n", b"$-2\r\n",
                                 b"$3\r\nabcde\r\n", b"$99999999999999999999\r\n"])
def test_malformed_lengths_are_protocol_errors(bad):
    with pytest.raises(hiredis.ProtocolError):
        _fastpath.reply_end(bad)


# ---------------------------------------------------------------------------
# The pub/sub connection

class _Owner:
    def __init__(self) -> None:
        self.protocol_errors: list[BaseException] = []

    def connection_made(self, proto) -> None:
        pass

    def protocol_error(self, proto, exc) -> None:
        self.protocol_errors.append(exc)


class _Transport:
    """What a protocol reading replies needs of its transport."""

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name, default=None):
        return default


def read_frames(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every server frame (unmasked) waiting on ``sock``, as (opcode, payload)."""
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 22)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    frames, pos = [], 0
    while pos < len(data):
        opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if size == 126:
            size = int.from_bytes(data[pos:pos + 2], "big")
            pos += 2
        elif size == 127:
            size = int.from_bytes(data[pos:pos + 8], "big")
            pos += 8
        frames.append((opcode, data[pos:pos + size]))
        pos += size
    assert pos == len(data), "a frame was cut short"
    return frames


def run_pubsub(chunks: list[bytes], channel: bytes = b"session:s-1:down"):
    """Feed ``chunks`` to a PubSubProtocol whose one route leads to a real socket;
    return (control replies, frames the socket received, owner, transport)."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    control: list = []
    owner, fake = _Owner(), _Transport()

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        wst = WSTransport(False, transport, logging.getLogger("test"), loop)
        listener = _fastpath.SessionListener(_fastpath.Upstream(), b"session:s-1:up", 1,
                                             "s-1", "a", NullEvents())
        listener.on_ws_connected(wst)
        route = _fastpath.Route(channel)
        route.add(listener)
        proto = _fastpath.PubSubProtocol(owner, route_table(route),
                                         lambda reply: control.append(comparable(reply)))
        proto.connection_made(fake)
        for chunk in chunks:
            proto.data_received(chunk)
        await asyncio.sleep(0.01)
        frames = read_frames(theirs)
        transport.abort()
        await asyncio.sleep(0)
        return frames

    _fastpath.configure(1 << 20, 1 << 30)
    try:
        frames = asyncio.run(main())
    finally:
        theirs.close()
    return control, frames, owner, fake


# ---------------------------------------------------------------------------
# The channel -> Route table the pub/sub read searches in C

POOL = [b"session:%d:down" % i for i in range(300)] + [b"", b"x", b"12345678", b"y" * 200]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(POOL) - 1)), max_size=900))
def test_route_table_finds_what_the_dict_holds(ops):
    # Channels come and go in any order (deleting from the middle of a probe run
    # included); after every step the C index agrees with a plain dict (for every
    # channel after a deletion), and stays at most half full.
    table, model = _fastpath.RouteTable(), {}
    for add, i in ops:
        channel = POOL[i]
        if add:
            route = _fastpath.Route(channel)
            table[channel] = route
            model[channel] = route
            assert table.lookup(channel) is route
        elif channel in model:
            del table[channel]
            del model[channel]
            # A deletion moves later slots of its probe run: every one still found.
            assert table.lookup(channel) is None
            assert all(table.lookup(c) is r for c, r in model.items())
        else:
            with pytest.raises(KeyError):
                del table[channel]
        assert len(table) == len(model)
        assert table.index_size >= 2 * len(model)
    for channel in POOL:
        assert table.lookup(channel) is model.get(channel)
        assert table.get(channel) is model.get(channel)
    assert dict(table) == model


def test_route_table_deletions_at_half_load_keep_every_channel_found():
    # 32 channels in the smallest index (64 slots, half full): long probe runs, some
    # wrapping around the end. Deleted in random orders, and after each deletion every
    # channel still held is found where the pub/sub read looks for it.
    import random
    rng = random.Random(5)
    for _ in range(200):
        channels = rng.sample(POOL, 32)
        table = _fastpath.RouteTable()
        for channel in channels:
            table[channel] = _fastpath.Route(channel)
        assert table.index_size == 64
        rng.shuffle(channels)
        for k, channel in enumerate(channels):
            del table[channel]
            assert table.lookup(channel) is None
            for held in channels[k + 1:]:
                assert table.lookup(held) is not None and table.lookup(held).channel == held


def test_route_table_grows_and_gives_memory_back():
    table = _fastpath.RouteTable()
    small = table.index_size
    for channel in POOL:
        table[channel] = _fastpath.Route(channel)
    assert table.index_size >= 2 * len(POOL) > small
    for channel in POOL[5:]:
        del table[channel]
    assert table.index_size < 8 * 5 * 2 and sorted(table) == sorted(POOL[:5])
    assert all(table.lookup(c).channel == c for c in POOL[:5])
    assert all(table.lookup(c) is None for c in POOL[5:])


def test_route_table_files_a_route_under_its_own_channel_only():
    table = _fastpath.RouteTable()
    with pytest.raises(ValueError):
        table[b"session:a:down"] = _fastpath.Route(b"session:b:down")
    with pytest.raises(TypeError):
        table[b"c"] = None
    with pytest.raises(AttributeError):  # the index points into it: it cannot change
        _fastpath.Route(b"c").channel = b"d"
    assert table.get("not bytes") is None
    first, second = _fastpath.Route(b"c"), _fastpath.Route(b"c")
    table[b"c"] = first
    table[b"c"] = second  # replaced, not added twice
    assert len(table) == 1 and table.lookup(b"c") is second
    del table[b"c"]
    assert table.lookup(b"c") is None and len(table) == 0


def test_route_single_listener_slot_follows_adds_and_removes():
    route = _fastpath.Route(b"c")
    a, b = (_fastpath.SessionListener(_fastpath.Upstream(), b"u", 1, "s", "a", NullEvents())
            for _ in range(2))
    route.add(a)
    route.add(b)
    assert route.listeners == (a, b) and len(route) == 2
    assert route.remove(a) and not route.remove(a)
    assert route.listeners == (b,)
    assert route.remove(b) and len(route) == 0


stream_items = st.lists(st.one_of(
    st.tuples(st.just("message"), st.booleans(), st.binary(max_size=300)),
    st.tuples(st.just("control"), resp_values),
), max_size=12)


@settings(max_examples=150, deadline=None)
@given(stream_items, st.lists(st.integers(min_value=0), max_size=12))
def test_pubsub_stream_cut_anywhere(items, cuts):
    """Messages for a subscribed channel reach the socket in order, with the frame type
    their payload calls for; messages for other channels are dropped; every other
    reply reaches on_control exactly as hiredis reads it."""
    channel = b"session:s-1:down"
    stream, sent, controls = b"", [], []
    for item in items:
        if item[0] == "message":
            _, ours, payload = item
            stream += message(channel if ours else b"session:other:down", payload)
            if ours:
                try:
                    payload.decode("utf-8")
                    sent.append((0x1, payload))
                except UnicodeDecodeError:
                    sent.append((0x2, payload))
        else:
            encoded = encode(item[1])
            stream += encoded
            controls.extend(hiredis_replies(encoded))
    control, frames, owner, transport = run_pubsub(pieces(stream, cuts), channel)
    assert frames == sent
    assert control == controls
    assert owner.protocol_errors == [] and not transport.aborted


def test_a_large_message_in_many_reads_arrives_once_and_whole():
    payload = b'"' + bytes(range(32, 127)) * 11_000 + b'"'
    stream = message(b"session:s-1:down", payload) * 2
    chunks = [stream[i:i + 4096] for i in range(0, len(stream), 4096)]
    control, frames, _, _ = run_pubsub(chunks)
    assert frames == [(0x1, payload), (0x1, payload)]
    assert control == []


def test_a_message_with_a_null_payload_is_not_sent():
    stream = b"*3\r\n$7\r\nmessage\r\n$16\r\nsession:s-1:down\r\n$-1\r\n" + message(
        b"session:s-1:down", b'{"after":1}')
    control, frames, owner, _ = run_pubsub([stream])
    assert frames == [(0x1, b'{"after":1}')]
    assert control == [] and owner.protocol_errors == []


def test_a_reply_whose_callback_raised_is_not_given_again():
    """A control callback that raises ends that read, but the reply counts as read: the
    next read starts after it (no reply is handed over twice)."""
    seen: list = []

    def on_control(reply):
        seen.append(comparable(reply))
        if len(seen) == 1:
            raise RuntimeError("callback broke")

    proto = _fastpath.PubSubProtocol(_Owner(), _fastpath.RouteTable(), on_control)

    async def main():
        proto.connection_made(_Transport())
        with pytest.raises(RuntimeError):
            proto.data_received(b"+first\r\n+sec")
        proto.data_received(b"ond\r\n")

    asyncio.run(main())
    assert seen == [b"first", b"second"]


@pytest.mark.parametrize("garbage", [b"?bad\r\n", b"$x\r\n", b"*3\r\n$7\r\nmessage\r\n$2z\r\n"])
def test_garbage_from_redis_drops_the_connection(garbage):
    before = message(b"session:s-1:down", b'{"n":1}')
    control, frames, owner, transport = run_pubsub([before + garbage + before])
    assert frames == [(0x1, b'{"n":1}')], "what came before the garbage is delivered"
    assert transport.aborted
    assert len(owner.protocol_errors) == 1
    assert isinstance(owner.protocol_errors[0], hiredis.ProtocolError)


# ---------------------------------------------------------------------------
# The command connection

def run_command(replies: list, cuts: list[int]):
    """Queue one waiter per reply (a callback for ("cb", value), a publishing socket for
    ("publish", value), fire-and-forget for ("none", value)); feed the encoded replies
    cut at ``cuts``; return what the callbacks got and the counter of failed publishes."""
    got: list = []
    ours, theirs = socket.socketpair()

    async def main():
        transport, proto, listener = await publishing_listener(ours, _Owner())
        for waiter, _ in replies:
            if waiter == "cb":
                proto.request_cb(b"*1\r\n$4\r\nPING\r\n", lambda r: got.append(comparable(r)))
            elif waiter == "publish":
                assert upstream_publish(listener)
            else:
                proto.send_noreply(b"*1\r\n$4\r\nPING\r\n")
        stream = b"".join(encode(value) for _, value in replies)
        for chunk in pieces(stream, cuts):
            proto.data_received(chunk)
        pending = proto.awaiting_replies
        transport.abort()
        await asyncio.sleep(0)
        return pending

    def upstream_publish(listener) -> bool:
        from picows.picows import WSMsgType, _make_test_ws_frame
        before = _fastpath.stats.snapshot()["messages_up"]
        listener.on_ws_frame(None, _make_test_ws_frame(WSMsgType.TEXT, b"{}", True, False))
        return _fastpath.stats.snapshot()["messages_up"] == before + 1

    failed_before = _fastpath.stats.snapshot()["errors_upstream_unavailable"]
    try:
        pending = asyncio.run(main())
    finally:
        theirs.close()
    failed = _fastpath.stats.snapshot()["errors_upstream_unavailable"] - failed_before
    return got, failed, pending


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["cb", "publish", "none"]), resp_values),
                max_size=12),
       st.lists(st.integers(min_value=0), max_size=12))
def test_command_replies_cut_anywhere_reach_their_waiters(replies, cuts):
    """Replies are matched FIFO whether read in place (integers for publishes and
    fire-and-forget commands) or by hiredis; a publish answered with anything but an
    integer counts as failed."""
    got, failed, pending = run_command(replies, cuts)
    assert got == [comparable_value(v) for w, v in replies if w == "cb"]
    assert failed == sum(1 for w, v in replies if w == "publish" and v[0] != "int")
    assert pending == 0


def comparable_value(value):
    return hiredis_replies(encode(value))[0]


def test_a_failing_socket_does_not_cost_the_others_their_message(caplog):
    """A socket whose backlog overflows calls its too-slow handler from inside the
    delivery; when that handler raises, the other socket of the channel still gets
    the message, the read goes on, and the failure is logged."""
    channel = b"session:s-1:down"

    class _Raising(NullEvents):
        def too_slow(self, listener) -> None:
            raise RuntimeError("handler broke")

    async def main():
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(2)]
        pairs[0][0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for sock in pairs[1]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        listeners, transports = [], []
        for (ours, _), events in zip(pairs, (_Raising(), NullEvents()), strict=True):
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            wst = WSTransport(False, transport, logging.getLogger("test"), loop)
            listener = _fastpath.SessionListener(_fastpath.Upstream(), b"session:s-1:up", 1,
                                                 "s-1", "a", events)
            listener.on_ws_connected(wst)
            listeners.append(listener)
            transports.append(transport)
        route = _fastpath.Route(channel)
        for listener in listeners:
            route.add(listener)
        owner = _Owner()
        proto = _fastpath.PubSubProtocol(owner, route_table(route), lambda reply: None)
        proto.connection_made(_Transport())
        payload = b'"' + b"x" * 300_000 + b'"'  # more than the slow socket takes at once
        proto.data_received(message(channel, payload) + message(channel, b'{"n":2}'))
        await asyncio.sleep(0.05)
        frames = read_frames(pairs[1][1])
        for transport in transports:
            transport.abort()
        await asyncio.sleep(0)
        for pair in pairs:
            pair[1].close()
        return frames, owner

    _fastpath.configure(1 << 20, 64 * 1024)
    try:
        frames, owner = asyncio.run(main())
    finally:
        _fastpath.configure(1 << 20, 1 << 30)
    assert [f[1] for f in frames] == [b'"' + b"x" * 300_000 + b'"', b'{"n":2}']
    assert "delivery to a socket failed" in caplog.text
    assert owner.protocol_errors == []


def test_one_read_of_many_routes_reaches_each_socket_in_order():
    """A burst read in one go, as under load: messages for routes with one socket, with
    two, with one still in its handshake, for a channel nobody holds, and for a socket
    already closed, interleaved. Each open socket gets exactly its own messages, in
    order; the one in its handshake keeps its own for later; nothing else is sent."""

    async def main():
        loop = asyncio.get_running_loop()
        table, pairs, transports = _fastpath.RouteTable(), [], []

        async def connected(channel: bytes):
            ours, theirs = socket.socketpair()
            for sock in (ours, theirs):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            wst = WSTransport(False, transport, logging.getLogger("test"), loop)
            listener = _fastpath.SessionListener(_fastpath.Upstream(), b"up", 1, "s", "a",
                                                 NullEvents())
            listener.on_ws_connected(wst)
            pairs.append((channel, theirs, wst))
            transports.append(transport)
            return listener

        singles = [b"session:one-%d:down" % i for i in range(12)]
        shared, waiting, closed = b"session:two:down", b"session:hs:down", b"session:x:down"
        for channel in [*singles, shared, closed]:
            table[channel] = _fastpath.Route(channel)
        for channel in singles:
            table[channel].add(await connected(channel))
        table[shared].add(await connected(shared))
        table[shared].add(await connected(shared))
        in_handshake = _fastpath.SessionListener(_fastpath.Upstream(), b"up", 1, "s", "a",
                                                 NullEvents())
        table[waiting] = _fastpath.Route(waiting)
        table[waiting].add(in_handshake)
        table[closed].add(await connected(closed))
        pairs[-1][2].disconnect()  # picows closes this one's transport
        await asyncio.sleep(0.01)

        order = [*singles, shared, waiting, b"session:nobody:down", closed] * 3
        stream = b"".join(message(c, b'{"c":"%s","n":%d}' % (c, n))
                          for n, c in enumerate(order))
        proto = _fastpath.PubSubProtocol(_Owner(), table, lambda reply: None)
        proto.connection_made(_Transport())
        proto.data_received(stream)
        await asyncio.sleep(0.05)
        got = {}
        for channel, theirs, _ in pairs[:-1]:
            got.setdefault(channel, []).append([f[1] for f in read_frames(theirs)])
        after_close = [f for f in read_frames(pairs[-1][1]) if f[0] == 1]
        # The socket that was in its handshake gets its own once picows hands it over.
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        transports.append(transport)
        in_handshake.on_ws_connected(WSTransport(False, transport, logging.getLogger("t"), loop))
        await asyncio.sleep(0.05)
        got[waiting] = [[f[1] for f in read_frames(theirs)]]
        theirs.close()
        for transport in transports:
            transport.abort()
        await asyncio.sleep(0)
        for _, theirs, _ in pairs:
            theirs.close()
        return order, got, after_close

    order, got, after_close = asyncio.run(main())
    expected = {}
    for n, channel in enumerate(order):
        expected.setdefault(channel, []).append(b'{"c":"%s","n":%d}' % (channel, n))
    for channel, per_socket in got.items():
        assert per_socket == [expected[channel]] * len(per_socket), channel
    assert len(got[b"session:two:down"]) == 2
    assert len(got) == 14 and len(got[b"session:hs:down"][0]) == 3
    assert after_close == []  # nothing written to a closed socket
