"""wsproxy._fastpath without the network: what the upstream path writes for Redis."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from picows.picows import WSMsgType, _make_test_ws_frame

from wsproxy import _fastpath

from .conftest import publishing_listener


class _Owner:
    def connection_made(self, proto):
        pass



def published_bytes(payloads: list[bytes], expect_len: int) -> bytes:
    """Feed ``payloads`` as client text frames; return what went to the Redis socket
    (reading until ``expect_len`` bytes came, or 5 s passed)."""
    async def main() -> bytes:
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, _, listener = await publishing_listener(ours, _Owner())
        for payload in payloads:
            listener.on_ws_frame(None, _make_test_ws_frame(WSMsgType.TEXT, payload, True,
                                                           False))
        theirs.setblocking(False)
        data = b""
        deadline = loop.time() + 5
        while len(data) < expect_len and loop.time() < deadline:
            await asyncio.sleep(0.005)  # the flush runs once a loop iteration
            try:
                data += theirs.recv(1 << 22)
            except BlockingIOError:
                pass
        await asyncio.sleep(0.05)
        try:
            data += theirs.recv(1 << 22)  # nothing more may come
        except BlockingIOError:
            pass
        transport.abort()
        theirs.close()
        return data

    _fastpath.configure(1 << 20, 1 << 20)
    return asyncio.run(main())


@pytest.mark.parametrize("size", [1, 9, 10, 99, 100, 101, 999, 1000, 65535, 65536, 1048576])
def test_publish_encoding_matches_resp_for_every_length(size):
    payload = b'"' + b"a" * (size - 2) + b'"' if size >= 2 else b"1"
    assert len(payload) == size
    expected = _fastpath.encode_publish(b"session:s-1:up", payload)
    got = published_bytes([payload], len(expected))
    assert got == expected
    assert got.startswith(b"*3\r\n$7\r\nPUBLISH\r\n$14\r\nsession:s-1:up\r\n$%d\r\n" % size)


def test_pipelined_publishes_keep_their_order():
    payloads = [b'{"n":%d}' % i for i in range(500)]
    expected = b"".join(_fastpath.encode_publish(b"session:s-1:up", p) for p in payloads)
    assert published_bytes(payloads, len(expected)) == expected


def test_invalid_messages_are_not_published():
    expected = _fastpath.encode_publish(b"session:s-1:up", b"[1]")
    assert published_bytes([b"{bad", b"", b"NaN", b"[1]"], len(expected)) == expected


@given(st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=100),
                          st.integers(min_value=-10**12, max_value=10**12)), max_size=8))
def test_encode_command_is_resp_that_hiredis_reads_back(args):
    """encode_command writes RESP by hand: hiredis (an independent parser) reads back
    every argument, as bytes, and nothing more."""
    import hiredis
    reader = hiredis.Reader()
    reader.feed(_fastpath.encode_command(*args))
    expected = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    assert reader.gets() == expected
    assert reader.gets() is False


def test_heartbeat_sweep_sends_at_most_its_ping_budget_and_the_rest_follow():
    """Sockets that fell due together are pinged a budget at a time, those not pinged
    first in the next pass; a silent socket is closed whatever the budget; without a
    budget every due socket is pinged; a socket already gone is left alone."""
    import logging

    from picows.picows import WSTransport

    from .conftest import NullEvents

    async def main():
        loop = asyncio.get_running_loop()
        listeners, peers, transports = [], [], []
        for _ in range(5):
            ours, theirs = socket.socketpair()
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            listener = _fastpath.SessionListener(_fastpath.Upstream(), b"session:s:up", 1,
                                                 "s", "a", NullEvents())
            listener.on_ws_connected(WSTransport(False, transport, logging.getLogger("t"),
                                                 loop))
            listeners.append(listener)
            peers.append(theirs)
            transports.append(transport)
        now = 1000.0
        for listener in listeners:
            listener.last_activity = now - 10  # idle for 10 s
            listener.last_ping = 0.0
        pinged = []
        for budget in (2, 2, 2):
            assert _fastpath.heartbeat_sweep(listeners, now, 1.0, 100.0, budget) == 0
            pinged.append([i for i, lsn in enumerate(listeners) if lsn.last_ping == now])
        await asyncio.sleep(0.05)
        frames = []
        for peer in peers:
            peer.setblocking(False)
            try:
                frames.append(peer.recv(64))
            except BlockingIOError:
                frames.append(b"")
        listeners[4].connected = False  # gone: its on_ws_disconnected has run
        later = now + 1.5  # all due again: no budget pings them all, but the gone one
        assert _fastpath.heartbeat_sweep(listeners, later, 1.0, 100.0) == 0
        everyone = [lsn.last_ping == later for lsn in listeners]
        # Silent past the timeout: closed even with no ping budget left; the gone one
        # is not counted.
        closed = _fastpath.heartbeat_sweep(listeners[:1] + listeners[4:], now + 200, 1.0,
                                           100.0, 0)
        for transport in transports:
            transport.abort()
        for peer in peers:
            peer.close()
        return pinged, frames, everyone, closed

    pinged, frames, everyone, closed = asyncio.run(main())
    assert [len(p) for p in pinged] == [2, 4, 5]  # two, then two more, then the last
    assert frames == [b"\x89\x00"] * 5  # one PING each, no more
    assert everyone == [True] * 4 + [False]
    assert closed == 1


def test_a_socket_listener_stays_in_its_size_class():
    """Every open socket has one SessionListener: at 176 bytes (192 with the GC
    header, a multiple of 64) each starts on a cache line, and send_down's fields,
    first in the object, share that line."""
    from wsproxy._fastpath import SessionListener
    assert SessionListener.__basicsize__ <= 176
