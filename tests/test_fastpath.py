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
