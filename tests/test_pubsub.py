"""wsproxy.redis.pubsub in-process against a real redis-server: reference counting,
re-subscription after a reconnect, and its batches."""

from __future__ import annotations

import asyncio

import uvloop

from wsproxy._fastpath import SessionListener, Upstream
from wsproxy.config import parse_redis_url
from wsproxy.redis import PubSub
from wsproxy.redis.pubsub import RESUBSCRIBE_BATCH

from .conftest import NullEvents


def listener(sid: str) -> SessionListener:
    return SessionListener(Upstream(), f"session:{sid}:up".encode(), 1, sid, "a", NullEvents())


async def started(url: str) -> PubSub:
    pubsub = PubSub(parse_redis_url(url))
    pubsub.start()
    await asyncio.wait_for(pubsub.ready.wait(), 5)
    return pubsub


def test_refcount_subscribes_once_and_unsubscribes_last(redis_server, session_id):
    r = redis_server.client()
    channel = f"session:{session_id}:down".encode()

    async def main():
        pubsub = await started(redis_server.url)
        a, b = listener(session_id), listener(session_id)
        await pubsub.wait_subscribed(pubsub.attach(channel, a), 5)
        await pubsub.wait_subscribed(pubsub.attach(channel, b), 5)
        counts = [r.pubsub_numsub(channel)[0][1]]
        pubsub.detach(channel, a)
        await asyncio.sleep(0.1)
        counts.append(r.pubsub_numsub(channel)[0][1])
        pubsub.detach(channel, b)
        await asyncio.sleep(0.1)
        counts.append(r.pubsub_numsub(channel)[0][1])
        pubsub.detach(channel, b)  # twice: harmless
        await pubsub.close()
        return counts

    assert uvloop.run(main()) == [1, 1, 0]


def test_every_channel_resubscribed_after_reconnect(redis_server, session_id):
    """More channels than one batch; the last route of the first batch leaves while that
    batch is in flight: the later batches are still sent."""
    r = redis_server.client()
    n = RESUBSCRIBE_BATCH * 2 + 10
    channels = [f"session:{session_id}-{i}:down".encode() for i in range(n)]

    async def main():
        pubsub = await started(redis_server.url)
        for ch in channels:
            pubsub.attach(ch, listener("x"))
        pubsub._resubscribe_task = None
        pubsub.proto.abort()
        while pubsub._resubscribe_task is None:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        leaving = channels[RESUBSCRIBE_BATCH - 1]
        pubsub.detach(leaving, pubsub.routes[leaving].listeners[0])
        await asyncio.wait_for(pubsub._resubscribe_task, 5)
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        counts = await loop.run_in_executor(None, lambda: dict(r.pubsub_numsub(*channels)))
        await pubsub.close()
        return leaving, counts

    leaving, counts = uvloop.run(main())
    assert counts[leaving] == 0
    assert [ch for ch in channels if ch != leaving and counts[ch] != 1] == []


def test_connection_loss_tells_every_subscribe_waiter_even_as_they_detach(redis_server):
    """A gate waiting for its SUBSCRIBE ack detaches its socket when told the connection
    dropped, which removes the route: telling every waiter must survive that."""

    async def main():
        pubsub = await started(redis_server.url)
        told: list[str] = []
        try:
            for n in range(3):
                sid = f"lost-{n}"
                channel = f"session:{sid}:down".encode()
                sock = listener(sid)
                route = pubsub.attach(channel, sock)

                def on_result(error, channel=channel, sock=sock, sid=sid):
                    told.append(f"{sid}: {error}")
                    pubsub.detach(channel, sock)

                # No ack yet: the SUBSCRIBE is still in this iteration's write buffer.
                assert pubsub.when_subscribed(route, on_result) is False
            pubsub.on_disconnected(pubsub.proto, ConnectionResetError("gone"))
            return told, dict(pubsub.routes)
        finally:
            await pubsub.close()

    told, routes = uvloop.run(main())
    assert sorted(told) == [f"lost-{n}: gone" for n in range(3)]
    assert routes == {}


def test_resubscribing_until_every_channel_is_acknowledged(redis_server, session_id):
    """From a reconnection until Redis acknowledged every live channel again,
    ``resubscribing`` is True (the server answers /health and /ready with 503); the
    link reports the change once it is over."""
    n = RESUBSCRIBE_BATCH * 2 + 10
    channels = [f"session:{session_id}-{i}:down".encode() for i in range(n)]

    async def main():
        pubsub = await started(redis_server.url)
        for ch in channels:
            pubsub.attach(ch, listener("x"))
        await pubsub.wait_subscribed(pubsub.routes[channels[-1]], 5)
        seen: list[tuple[bool, bool, int]] = []
        pubsub.on_state_change = lambda: seen.append(
            (pubsub.resubscribing, pubsub.ready.is_set(),
             sum(r.subscribed for r in pubsub.routes.values())))
        before = pubsub.resubscribing
        pubsub.proto.abort()
        await asyncio.wait_for(pubsub.ready.wait(), 5)
        at_ready = pubsub.resubscribing
        await asyncio.wait_for(pubsub._resubscribe_task, 5)
        seen_until_close = list(seen)
        await pubsub.close()
        return before, at_ready, seen_until_close

    before, at_ready, seen = uvloop.run(main())
    assert before is False
    assert at_ready is True
    # down, up (still re-subscribing), then done with every route acknowledged
    assert seen == [(False, False, 0), (True, True, 0), (False, True, n)]


def test_refused_channels_do_not_disturb_the_rest_of_a_resubscription(redis_server,
                                                                      session_id):
    """A SUBSCRIBE that Redis refuses (an ACL that does not allow the channel) gets one
    error: with the channels of a batch each in its own SUBSCRIBE, the others are still
    acknowledged and the re-subscription ends."""
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "resetchannels",
                          f"&session:{session_id}-ok-*", "+@all", "~*")
    ok = [f"session:{session_id}-ok-{i}:down".encode() for i in range(5)]
    refused = [f"session:{session_id}-no-{i}:down".encode() for i in range(2)]
    url = redis_server.url.replace("redis://", "redis://limited:pw@")

    async def main():
        pubsub = await started(url)
        for ch in refused[:1] + ok + refused[1:]:
            pubsub.attach(ch, listener("x"))
        await pubsub.wait_subscribed(pubsub.routes[ok[-1]], 5)
        pubsub.proto.abort()
        await asyncio.wait_for(pubsub.ready.wait(), 5)
        await asyncio.wait_for(pubsub._resubscribe_task, 5)
        # A refused channel's route is gone (its next socket subscribes anew).
        state = {ch: pubsub.routes[ch].subscribed if ch in pubsub.routes else "gone"
                 for ch in ok + refused}
        resubscribing = pubsub.resubscribing
        counts = await asyncio.get_running_loop().run_in_executor(
            None, lambda: dict(admin.pubsub_numsub(*ok, *refused)))
        await pubsub.close()
        return state, resubscribing, counts

    state, resubscribing, counts = uvloop.run(main())
    assert resubscribing is False
    assert state == {**{ch: True for ch in ok}, **{ch: "gone" for ch in refused}}
    assert [counts[ch] for ch in ok] == [1] * len(ok)
    assert [counts[ch] for ch in refused] == [0] * len(refused)


def test_commands_of_consecutive_loop_iterations_share_one_write(redis_server):
    """A protocol's writes go out one loop iteration after the first command queued:
    commands queued in the next iteration (the next client frame of a burst) go in
    the same write to the socket, and later ones in the next write.

    The writes are counted where they leave the protocol: Redis' own count of reads
    is no measure, since a Redis that wakes late reads two writes at once."""
    from wsproxy._fastpath import CommandProtocol
    from wsproxy.redis.commands import CommandClient

    writes: list[bytes] = []

    class CountingTransport:
        def __init__(self, transport):
            self._transport = transport

        def write(self, data):
            writes.append(bytes(data))
            self._transport.write(data)

        def __getattr__(self, name):
            return getattr(self._transport, name)

    class CountingProtocol(CommandProtocol):
        def connection_made(self, transport):
            super().connection_made(CountingTransport(transport))

    class CountingClient(CommandClient):
        def make_protocol(self):
            return CountingProtocol(self)

    async def main():
        client = CountingClient(parse_redis_url(redis_server.url))
        client.start()
        await asyncio.wait_for(client.ready.wait(), 5)
        loop = asyncio.get_running_loop()
        try:
            sent = []
            for spread in (1, 3):  # iterations between the first and the last command
                writes.clear()
                replies = []
                for i in range(spread + 1):
                    if i:
                        await asyncio.sleep(0)  # the next loop iteration
                    reply = loop.create_future()
                    client.execute_cb(reply.set_result, "PUBLISH", "nobody", str(i))
                    replies.append(reply)
                assert await asyncio.gather(*replies) == [0] * (spread + 1)
                sent.append([w.count(b"PUBLISH") for w in writes])
            return sent
        finally:
            await client.close()

    one_later, three_later = uvloop.run(main())
    assert one_later == [2]  # both in one write
    assert three_later == [2, 2]  # the first two, then the next two


def test_a_redis_refusing_clients_is_retried_slowly_and_never_taken_for_ready(make_redis,
                                                                            session_id):
    """At maxclients Redis accepts a connection, answers -ERR and closes it. The link
    must not call such a connection ready, must back off between attempts (not retry
    every few milliseconds), and must come up, usable, once Redis takes clients again."""
    server = make_redis()
    admin = server.client()
    admin.config_set("maxclients", 1)  # admin's own connection is the one client
    channel = f"session:{session_id}:down".encode()

    def rejected() -> int:
        return int(admin.info("stats")["rejected_connections"])

    async def main():
        loop = asyncio.get_running_loop()
        pubsub = PubSub(parse_redis_url(server.url))
        pubsub.start()
        try:
            ready_while_refused = False
            end = loop.time() + 3
            while loop.time() < end:
                ready_while_refused |= pubsub.ready.is_set()
                await asyncio.sleep(0.002)
            attempts = await loop.run_in_executor(None, rejected)
            await loop.run_in_executor(None, admin.config_set, "maxclients", 100)
            await asyncio.wait_for(pubsub.ready.wait(), 5)
            pubsub.attach(channel, listener(session_id))
            await pubsub.wait_subscribed(pubsub.routes[channel], 5)
            subscribers = await loop.run_in_executor(
                None, lambda: dict(admin.pubsub_numsub(channel))[channel])
            return ready_while_refused, attempts, subscribers
        finally:
            await pubsub.close()

    ready_while_refused, attempts, subscribers = uvloop.run(main())
    assert ready_while_refused is False
    # 25-50 ms doubling to 0.5-1 s: at least 4 attempts in 3 s, at most 10 (11 by
    # 3.3 s, when the count is read late); without the backoff, 60 or more.
    assert 4 <= attempts <= 11, attempts
    assert subscribers == 1
