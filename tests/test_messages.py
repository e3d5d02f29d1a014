"""Messages both ways, end to end: byte for byte, in order, errors answered, nothing lost."""

from __future__ import annotations

import asyncio
import json
import random
import time

import psutil
import pytest
import websockets
from websockets.frames import CloseCode

from .conftest import wait_for

INVALID_JSON = '{"error":"Invalid JSON format"}'


def url(proxy, sid: str) -> str:
    return f"{proxy.ws_url}/agent1/ws/{sid}"


def connect(proxy, sid: str, token: str = "tok", **kwargs):
    return websockets.connect(url(proxy, sid), additional_headers={"Authorization":
                              f"Bearer {token}"}, max_size=None, **kwargs)


@pytest.fixture
def session(redis_server, session_id):
    redis_server.client().set(f"session:{session_id}:auth", "tok")
    return session_id


class UpListener:
    """A redis-py subscriber on a session's up channel, started before the test sends."""

    def __init__(self, redis_server, sid: str) -> None:
        self.pubsub = redis_server.client().pubsub()
        self.pubsub.subscribe(f"session:{sid}:up")
        assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"

    def take(self, n: int, timeout: float = 10) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            m = self.pubsub.get_message(timeout=0.5)
            if m and m["type"] == "message":
                got.append(m["data"])
        return got

    def nothing_more(self, wait: float = 0.3) -> bool:
        return not self.take(1, timeout=wait)


# --- downstream ----------------------------------------------------------------------

def test_downstream_byte_for_byte_in_order(proxy, redis_server, session):
    r = redis_server.client()
    rng = random.Random(7)
    payloads = [json.dumps({"i": i, "pad": "x" * rng.randrange(0, 3000), "u": "é€😀"},
                           ensure_ascii=False) for i in range(500)]
    payloads += ["not json at all", "", " spaces ", '{"big":"' + "y" * 1_000_000 + '"}']

    async def main():
        async with connect(proxy, session) as ws:
            pipe = r.pipeline(transaction=False)
            for p in payloads:
                pipe.publish(f"session:{session}:down", p)
            assert all(n == 1 for n in pipe.execute())
            return [await asyncio.wait_for(ws.recv(), 10) for _ in payloads]

    assert asyncio.run(main()) == payloads


def test_downstream_sizes_around_the_send_paths(proxy, redis_server, session):
    # A frame of up to 2,048 bytes is copied to one buffer and sent whole; a larger one
    # goes header and payload apart. The header is 2 bytes below 126 payload bytes, 4
    # from there: both sides of both edges, text and binary, byte for byte.
    r = redis_server.client()
    sizes = [0, 1, 124, 125, 126, 127, 2040, 2043, 2044, 2045, 2046, 2047, 2048, 65535, 65536]
    texts = ['"' + "t" * (n - 2) + '"' if n >= 2 else "7" * n for n in sizes]
    binaries = [b"\xff" * n for n in sizes if n]

    async def main():
        async with connect(proxy, session) as ws:
            for p in [*texts, *binaries]:
                r.publish(f"session:{session}:down", p)
            return [await asyncio.wait_for(ws.recv(), 10) for _ in range(len(texts) +
                                                                         len(binaries))]

    assert asyncio.run(main()) == [*texts, *binaries]


def test_downstream_not_utf8_goes_as_binary(proxy, redis_server, session):
    r = redis_server.client()

    async def main():
        async with connect(proxy, session) as ws:
            r.publish(f"session:{session}:down", b"\xff\x00\xfe")
            r.publish(f"session:{session}:down", b"\xed\xa0\x80")  # an encoded surrogate
            return [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)]

    assert asyncio.run(main()) == [b"\xff\x00\xfe", b"\xed\xa0\x80"]


def test_control_message_is_forwarded_and_connection_left_open(proxy, redis_server, session):
    r = redis_server.client()
    control = '{"type":"control","command":"stream_end"}'

    async def main():
        async with connect(proxy, session) as ws:
            r.publish(f"session:{session}:down", control)
            got = await asyncio.wait_for(ws.recv(), 5)
            await asyncio.sleep(0.3)
            r.publish(f"session:{session}:down", '{"after":1}')
            return got, await asyncio.wait_for(ws.recv(), 5)

    assert asyncio.run(main()) == (control, '{"after":1}')


def test_two_sockets_of_one_session_both_receive(proxy, redis_server, session):
    r = redis_server.client()
    channel = f"session:{session}:down"

    async def main():
        async with connect(proxy, session) as a, connect(proxy, session) as b:
            assert r.pubsub_numsub(channel)[0][1] == 1  # one SUBSCRIBE shared
            for i in range(50):
                r.publish(channel, f'{{"n":{i}}}')
            got_a = [await asyncio.wait_for(a.recv(), 5) for _ in range(50)]
            got_b = [await asyncio.wait_for(b.recv(), 5) for _ in range(50)]
            return got_a, got_b

    got_a, got_b = asyncio.run(main())
    assert got_a == got_b == [f'{{"n":{i}}}' for i in range(50)]


@pytest.mark.parametrize("leaving", ["older", "newer"])
def test_closing_one_socket_keeps_the_other_subscribed(proxy, redis_server, session, leaving):
    r = redis_server.client()
    channel = f"session:{session}:down"

    async def main():
        older = await connect(proxy, session)
        newer = await connect(proxy, session)
        gone, staying = (older, newer) if leaving == "older" else (newer, older)
        await gone.close()
        await asyncio.sleep(0.2)
        numsub = r.pubsub_numsub(channel)[0][1]
        r.publish(channel, '{"still":"here"}')
        got = await asyncio.wait_for(staying.recv(), 5)
        await staying.close()
        await asyncio.sleep(0.2)
        return numsub, got, r.pubsub_numsub(channel)[0][1]

    numsub, got, after = asyncio.run(main())
    assert numsub == 1
    assert got == '{"still":"here"}'
    assert after == 0  # the last socket's close unsubscribed


def test_reconnect_right_after_close_is_never_silenced(proxy, redis_server, session):
    """Close then open at once, many times: the new socket always receives."""
    r = redis_server.client()
    channel = f"session:{session}:down"

    async def main():
        for i in range(50):
            old = await connect(proxy, session)
            close = asyncio.ensure_future(old.close())
            new = await connect(proxy, session)
            await close
            assert r.publish(channel, f'{{"round":{i}}}') == 1
            assert await asyncio.wait_for(new.recv(), 5) == f'{{"round":{i}}}'
            await new.close()

    asyncio.run(main())


def test_sessions_are_isolated(proxy, redis_server, session_id):
    r = redis_server.client()
    r.set(f"session:{session_id}-a:auth", "tok")
    r.set(f"session:{session_id}-b:auth", "tok")

    async def main():
        async with connect(proxy, f"{session_id}-a") as a, connect(proxy, f"{session_id}-b") as b:
            r.publish(f"session:{session_id}-a:down", '"for a"')
            r.publish(f"session:{session_id}-b:down", '"for b"')
            return await asyncio.wait_for(a.recv(), 5), await asyncio.wait_for(b.recv(), 5)

    assert asyncio.run(main()) == ('"for a"', '"for b"')


# --- upstream ------------------------------------------------------------------------

def test_upstream_published_byte_for_byte_in_order(proxy, redis_server, session):
    up = UpListener(redis_server, session)
    messages = [json.dumps({"i": i, "text": "héllo ✓"}, ensure_ascii=False) for i in range(300)]
    messages += [' {"spaced" : [1, 2.5e3, true, null]} \n', '"just a string"', "42", "null"]

    async def main():
        async with connect(proxy, session) as ws:
            for m in messages:
                await ws.send(m)
            await asyncio.sleep(0.2)

    asyncio.run(main())
    assert up.take(len(messages)) == [m.encode() for m in messages]


def test_fragmented_message_is_reassembled(proxy, redis_server, session):
    up = UpListener(redis_server, session)
    parts = ['{"frag', 'mented": "', "é" * 1000, '"}']

    async def main():
        async with connect(proxy, session) as ws:
            await ws.send(iter(parts))
            await ws.send('{"after":true}')
            await asyncio.sleep(0.2)

    asyncio.run(main())
    assert up.take(2) == ["".join(parts).encode(), b'{"after":true}']


INVALID_DOCUMENTS = [
    b'{"a":1', b'{"a":1}}', b'{"a":1} x', b"NaN", b'{"a":NaN}', b"Infinity", b"-Infinity",
    b"01", b'{"a":-01}', b'"ctrl\x01char"', b'"\\ud800"', b'"\\udc00x"',
    b"\xed\xa0\x80", b"\"\xff\"", b"\"\xc0\xaf\"", b"", b"   ", b"\n\t",
    b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b"{'single':1}", b"[1,]", b"tru",
]


@pytest.mark.parametrize("document", INVALID_DOCUMENTS,
                         ids=[repr(d[:16]) + f"-{len(d)}" for d in INVALID_DOCUMENTS])
def test_invalid_json_is_answered_and_connection_stays_open(proxy, redis_server, session,
                                                            document):
    up = UpListener(redis_server, session)

    async def main():
        async with connect(proxy, session) as ws:
            await ws.send(document, text=True)
            error = await asyncio.wait_for(ws.recv(), 5)
            await ws.send('{"ok":1}')
            await asyncio.sleep(0.1)
            return error

    assert asyncio.run(main()) == INVALID_JSON
    assert up.take(1) == [b'{"ok":1}']  # only the valid one was published
    assert up.nothing_more()


def test_binary_message_is_refused(proxy, redis_server, session):
    up = UpListener(redis_server, session)

    async def main():
        async with connect(proxy, session) as ws:
            await ws.send(b'{"looks":"like json"}')
            first = await asyncio.wait_for(ws.recv(), 5)
            await ws.send(iter([b"frag", b"mented"]))
            second = await asyncio.wait_for(ws.recv(), 5)
            await ws.send('{"ok":2}')
            await asyncio.sleep(0.1)
            return first, second

    expected = '{"error":"Binary messages not supported"}'
    assert asyncio.run(main()) == (expected, expected)
    assert up.take(2, timeout=1) == [b'{"ok":2}']


def test_message_too_large(make_proxy, redis_server, session):
    p = make_proxy(redis_server.url, MAX_MESSAGE_SIZE_BYTES=1000, MAX_FRAME_SIZE_BYTES=100_000)
    up = UpListener(redis_server, session)
    exact = '"' + "a" * 998 + '"'  # 1000 bytes: allowed
    over = '"' + "a" * 999 + '"'

    async def main():
        async with connect(p, session) as ws:
            await ws.send(over)
            e1 = await asyncio.wait_for(ws.recv(), 5)
            await ws.send(iter(['"', "a" * 600, "a" * 600, '"']))  # fragmented, over
            e2 = await asyncio.wait_for(ws.recv(), 5)
            await ws.send(exact)
            await asyncio.sleep(0.1)
            return e1, e2

    e1, e2 = asyncio.run(main())
    assert json.loads(e1) == {"error": "Message too large", "max_size": 1000}
    assert e1 == e2 == '{"error":"Message too large","max_size":1000}'
    assert up.take(1) == [exact.encode()]
    assert up.nothing_more()


def test_large_frames_do_not_stay_with_their_sockets(proxy, redis_server, session_id):
    """picows grows a socket's read buffer until a frame fits: after one 8 MiB frame
    (under the frame limit, over the message limit) the socket must not keep those
    megabytes while it stays open, and it must still read small and large frames."""
    sids = [f"{session_id}-{i}" for i in range(16)]
    pipe = redis_server.client().pipeline(transaction=False)
    for sid in sids:
        pipe.set(f"session:{sid}:auth", "tok")
    pipe.execute()
    up = UpListener(redis_server, sids[0])
    big = '"' + "a" * (8 * 1024 * 1024) + '"'
    too_large = '{"error":"Message too large","max_size":1048576}'
    proc = psutil.Process(proxy.proc.pid)

    async def main():
        sockets = [await connect(proxy, sid) for sid in sids]
        await asyncio.sleep(0.2)
        before = proc.memory_info().rss
        replies = []
        for ws in sockets:
            await ws.send(big)
            replies.append(await asyncio.wait_for(ws.recv(), 10))
        await asyncio.sleep(0.2)
        after = proc.memory_info().rss
        first = sockets[0]
        await first.send('{"small":1}')
        await first.send(big)
        replies.append(await asyncio.wait_for(first.recv(), 10))
        await first.send('{"small":2}')
        await asyncio.sleep(0.1)
        for ws in sockets:
            await ws.close()
        return before, after, replies

    before, after, replies = asyncio.run(main())
    assert replies == [too_large] * (len(sids) + 1)
    assert up.take(2) == [b'{"small":1}', b'{"small":2}']
    # 16 x 8 MiB went through; without giving the buffers back the growth is 128 MiB
    # or more.
    assert after - before < 32 * 1024 * 1024, f"RSS grew {(after - before) >> 20} MiB"


def test_frame_over_hard_limit_closes_with_1009(make_proxy, redis_server, session):
    p = make_proxy(redis_server.url, MAX_MESSAGE_SIZE_BYTES=1000, MAX_FRAME_SIZE_BYTES=10_000)

    async def main():
        async with connect(p, session) as ws:
            await ws.send('"' + "a" * 20_000 + '"')
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            return info.value.rcvd.code if info.value.rcvd else None

    assert asyncio.run(main()) == CloseCode.MESSAGE_TOO_BIG
    assert p.get("/health")[0] == 200


def test_upstream_unavailable_when_redis_dies(make_redis, make_proxy, session_id):
    server = make_redis()
    p = make_proxy(server.url)
    server.client().set(f"session:{session_id}:auth", "tok")

    async def main():
        async with connect(p, session_id) as ws:
            server.kill()
            await asyncio.sleep(0.3)
            await ws.send('{"lost?":"never silently"}')
            return await asyncio.wait_for(ws.recv(), 5)

    assert asyncio.run(main()) == '{"error":"Upstream unavailable"}'
    assert p.proc.poll() is None


def test_client_ping_is_answered(proxy, session):
    async def main():
        async with connect(proxy, session, ping_interval=None) as ws:
            pong = await ws.ping(b"are you there")
            return await asyncio.wait_for(pong, 5)

    assert asyncio.run(main()) is not None


def test_close_code_is_echoed(proxy, session):
    async def main():
        ws = await connect(proxy, session)
        await ws.close(code=4000, reason="bye")
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None

    assert asyncio.run(main()) == 4000


def test_upstream_messages_from_two_sessions_keep_their_channels(proxy, redis_server,
                                                                session_id):
    r = redis_server.client()
    sids = [f"{session_id}-{i}" for i in range(2)]
    for sid in sids:
        r.set(f"session:{sid}:auth", "tok")
    ups = [UpListener(redis_server, sid) for sid in sids]

    async def main():
        async with connect(proxy, sids[0]) as a, connect(proxy, sids[1]) as b:
            for i in range(20):
                await a.send(f'{{"from":0,"i":{i}}}')
                await b.send(f'{{"from":1,"i":{i}}}')
            await asyncio.sleep(0.2)

    asyncio.run(main())
    for n, up in enumerate(ups):
        assert up.take(20) == [f'{{"from":{n},"i":{i}}}'.encode() for i in range(20)]


def test_pubsub_subscriptions_return_to_zero(proxy, redis_server, session_id):
    """Many sockets over many sessions, all closed: no channel left subscribed."""
    r = redis_server.client()
    sids = [f"{session_id}-{i}" for i in range(30)]
    for sid in sids:
        r.set(f"session:{sid}:auth", "tok")

    async def main():
        sockets = [await connect(proxy, sid) for sid in sids for _ in range(2)]
        random.Random(1).shuffle(sockets)
        await asyncio.gather(*(ws.close() for ws in sockets))

    asyncio.run(main())
    wait_for(lambda: all(n == 0 for _, n in r.pubsub_numsub(*[f"session:{s}:down" for s in sids])),
             5, "every channel unsubscribed")
    assert proxy.proc.poll() is None


def test_backlogged_socket_keeps_order_and_bytes(proxy, redis_server, session):
    """A client that stops reading for a while: frames pile up behind what the kernel
    would not take, and still arrive complete and in order once it reads again."""
    from .rawws import RawWebSocket

    r = redis_server.client()
    raw = RawWebSocket(proxy.port, f"/agent1/ws/{session}", "tok", rcvbuf=4096)
    payloads = [json.dumps({"n": i, "pad": "z" * (i % 3000)}) for i in range(2000)]
    pipe = r.pipeline(transaction=False)
    for p in payloads:
        pipe.publish(f"session:{session}:down", p)
    assert all(n == 1 for n in pipe.execute())
    time.sleep(0.5)  # the proxy has queued what the socket would not take
    got = []
    for _ in payloads:
        opcode, data = raw.read_frame()
        assert opcode == 0x1
        got.append(data.decode())
    raw.close()
    assert got == payloads


def test_the_largest_accepted_limits_work_end_to_end(make_proxy, redis_server, session):
    """Start-up accepts limits up to what the code holds (2**62 bytes, a TTL Redis
    takes): with every one at its maximum a socket opens, gets its TTL and carries
    messages both ways (larger values stop start-up: test_config)."""
    p = make_proxy(redis_server.url, MAX_FRAME_SIZE_BYTES=2**62, MAX_MESSAGE_SIZE_BYTES=2**62,
                   MAX_BUFFER_SIZE_BYTES=2**62, AUTH_GRACE_PERIOD_SECS=10**15)
    r = redis_server.client()
    up = UpListener(redis_server, session)

    async def main():
        async with connect(p, session) as ws:
            await ws.send('{"n":1}')
            assert r.publish(f"session:{session}:down", '{"m":2}') == 1
            return await asyncio.wait_for(ws.recv(), 5)

    assert asyncio.run(main()) == '{"m":2}'
    assert up.take(1) == [b'{"n":1}']
    assert r.ttl(f"session:{session}:auth") > 10**14
