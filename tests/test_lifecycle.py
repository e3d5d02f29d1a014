"""Production behaviour, done for real to real processes: heartbeat, slow clients, limits,
Redis outages and stalls, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import time

import psutil
import pytest
import redis
import websockets

from .conftest import close_codes, wait_for
from .rawws import RawWebSocket

PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


def connect(proxy, sid: str, token: str = "tok", **kwargs):
    return websockets.connect(f"{proxy.ws_url}/agent1/ws/{sid}",
                              additional_headers={"Authorization": f"Bearer {token}"}, **kwargs)


async def handshake_status(proxy, sid: str) -> int:
    try:
        async with connect(proxy, sid):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


def set_tokens(server, sids) -> None:
    pipe = server.client().pipeline(transaction=False)
    for sid in sids:
        pipe.set(f"session:{sid}:auth", "tok")
    pipe.execute()


def _epoch(log_time: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(log_time.replace("Z", "+00:00")).timestamp()


def numsub_all(server, sids) -> list[int]:
    return [n for _, n in server.client().pubsub_numsub(*[f"session:{s}:down" for s in sids])]


def publish_unread_backlog(server, sid: str) -> None:
    """8 MB of messages for a socket whose client does not read: more than the kernel
    buffers hold, so the proxy keeps the rest queued (anything it sends then, a CLOSE
    say, waits behind them)."""
    r = server.client()
    for _ in range(8):
        pipe = r.pipeline(transaction=False)
        for _ in range(1000):
            pipe.publish(f"session:{sid}:down", '"' + "x" * 1000 + '"')
        pipe.execute()
    time.sleep(0.3)  # for the proxy to take them from Redis


def logged_closes(proxy) -> list[dict]:
    """The proxy's connection_close log events, once there is one."""
    wait_for(lambda: '"event":"connection_close"' in proxy.log(), 5, "connection_close logged")
    return [json.loads(line) for line in proxy.log().splitlines()
            if '"event":"connection_close"' in line]


# --- heartbeat -----------------------------------------------------------------------

def test_client_that_never_answers_pings_is_closed(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, WS_PING_INTERVAL_SECS=0.3, WS_PING_TIMEOUT_SECS=0.9)
    set_tokens(redis_server, [session_id])
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", "tok")
    assert raw.status == 101
    started = time.monotonic()
    opcodes = []
    close_payload = b""
    while True:
        opcode, payload = raw.read_frame()
        opcodes.append(opcode)
        if opcode == CLOSE:
            close_payload = payload
            break
    elapsed = time.monotonic() - started
    raw.close()
    assert PING in opcodes  # it was pinged before being given up on
    assert struct.unpack("!H", close_payload[:2])[0] == 1011
    assert 0.8 <= elapsed <= 2.0


def test_client_that_answers_pings_stays_open(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, WS_PING_INTERVAL_SECS=0.2, WS_PING_TIMEOUT_SECS=0.5)
    set_tokens(redis_server, [session_id])

    async def main():
        async with connect(p, session_id, ping_interval=None) as ws:  # pongs automatically
            await asyncio.sleep(2.0)
            redis_server.client().publish(f"session:{session_id}:down", '"alive"')
            return await asyncio.wait_for(ws.recv(), 5)

    assert asyncio.run(main()) == '"alive"'


def test_raw_client_pong_keeps_connection(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, WS_PING_INTERVAL_SECS=0.2, WS_PING_TIMEOUT_SECS=0.6)
    set_tokens(redis_server, [session_id])
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", "tok")
    deadline = time.monotonic() + 2.0
    pings = 0
    while time.monotonic() < deadline:
        opcode, payload = raw.read_frame()
        assert opcode == PING, f"unexpected opcode {opcode}"
        pings += 1
        raw.send_frame(PONG, payload)
    raw.send_frame(PING, b"mine")
    opcode, payload = raw.read_frame()
    while opcode == PING:
        opcode, payload = raw.read_frame()
    raw.close()
    assert pings >= 3
    assert (opcode, payload) == (PONG, b"mine")  # client pings are answered


# --- slow clients ----------------------------------------------------------------------

def test_slow_client_is_closed_and_others_keep_flowing(make_proxy, redis_server, session_id,
                                                      record_property):
    buffer_limit = 256 * 1024
    p = make_proxy(redis_server.url, MAX_BUFFER_SIZE_BYTES=buffer_limit)
    slow_sid, fast_sid = f"{session_id}-slow", f"{session_id}-fast"
    set_tokens(redis_server, [slow_sid, fast_sid])
    r = redis_server.client()
    slow = RawWebSocket(p.port, f"/agent1/ws/{slow_sid}", "tok", rcvbuf=4096)
    proc = psutil.Process(p.proc.pid)
    rss_before = proc.memory_info().rss
    payload = '{"flood":"' + "x" * 1000 + '"}'

    flood_started = time.time()

    async def main():
        async with connect(p, fast_sid) as fast:
            latencies = []
            for batch in range(40):  # 40 x 500 x ~1 KiB = 20 MB aimed at the slow socket
                pipe = r.pipeline(transaction=False)
                for _ in range(500):
                    pipe.publish(f"session:{slow_sid}:down", payload)
                pipe.execute()
                t0 = time.monotonic()
                r.publish(f"session:{fast_sid}:down", f'{{"batch":{batch}}}')
                assert await asyncio.wait_for(fast.recv(), 5) == f'{{"batch":{batch}}}'
                latencies.append(time.monotonic() - t0)
            return latencies

    latencies = asyncio.run(main())
    rss_after = proc.memory_info().rss
    # The slow socket is gone: reading what is left ends in EOF or a reset, soon.
    slow.sock.settimeout(5)
    closed = False
    try:
        while True:
            if not slow.sock.recv(65536):
                closed = True
                break
    except (ConnectionResetError, ConnectionError):
        closed = True
    slow.close()
    assert closed
    wait_for(lambda: '"code":1008' in p.log(), 5, "close 1008 in the log")
    assert "client too slow" in p.log()
    entries = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
    too_slow_at = next(e["time"] for e in entries if e["event"] == "client_too_slow")
    closed_at = next(e["time"] for e in entries
                     if e["event"] == "connection_close" and e["code"] == 1008)
    record_property("too_slow_after_flood_start_secs", round(_epoch(too_slow_at)
                                                             - flood_started, 3))
    record_property("closed_after_too_slow_secs", round(_epoch(closed_at)
                                                        - _epoch(too_slow_at), 3))
    record_property("fast_socket_median_latency_ms",
                    round(1000 * sorted(latencies)[len(latencies) // 2], 3))
    record_property("rss_growth_bytes", rss_after - rss_before)
    assert sorted(latencies)[len(latencies) // 2] < 0.05  # the median fast-socket delivery
    assert rss_after - rss_before < 64 * 1024 * 1024  # 20 MB sent at it; not kept
    metrics = p.get("/metrics")[1].decode()
    assert "wsproxy_backpressure_disconnects_total 1" in metrics


def test_client_that_sends_bad_frames_and_never_reads_is_closed_1008(make_proxy, redis_server,
                                                                     session_id):
    """Error replies count against MAX_BUFFER_SIZE_BYTES like downstream frames: a
    client that floods invalid JSON (each answered with a 31-byte error frame) and
    never reads is closed as too slow, not queued for without limit."""
    buffer_limit = 64 * 1024
    p = make_proxy(redis_server.url, MAX_BUFFER_SIZE_BYTES=buffer_limit)
    set_tokens(redis_server, [session_id])
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", "tok", rcvbuf=4096)
    frame = b"\x81\x81" + b"\x00\x00\x00\x00" + b"x"  # masked (zero mask) text "x"
    sent = 0
    deadline = time.monotonic() + 20
    try:
        # 200,000 bad frames would be answered with 6 MB: enough to pass the limit
        # with the kernel's buffers on both sides full, bounded in count and time.
        while sent < 200_000 and time.monotonic() < deadline:
            raw.sock.sendall(frame * 1000)
            sent += 1000
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        pass
    # The client stays, unread: the proxy gives up on it by itself.
    wait_for(lambda: '"code":1008' in p.log(), 10, "close 1008 in the log")
    raw.close()
    assert "client too slow" in p.log()
    metrics = p.get("/metrics")[1].decode()
    assert "wsproxy_backpressure_disconnects_total 1" in metrics
    assert 'wsproxy_errors_total{type="invalid_json"} 0' not in metrics
    wait_for(lambda: numsub_all(redis_server, [session_id]) == [0], 5, "unsubscribed")
    assert p.proc.poll() is None


def test_client_that_closes_and_stops_reading_is_dropped(make_proxy, redis_server, session_id):
    """The client sends CLOSE while the proxy still holds frames for it, and never reads
    again: the proxy's answering CLOSE cannot be flushed, and the connection is dropped
    after the close timeout, its subscription with it."""
    p = make_proxy(redis_server.url, MAX_BUFFER_SIZE_BYTES=32 * 1024 * 1024)
    set_tokens(redis_server, [session_id])
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", "tok", rcvbuf=4096)
    publish_unread_backlog(redis_server, session_id)  # under MAX_BUFFER_SIZE_BYTES
    raw.send_frame(CLOSE, struct.pack("!H", 1000))
    closed_at = time.monotonic()
    wait_for(lambda: numsub_all(redis_server, [session_id]) == [0], 6, "unsubscribed")
    dropped_after = time.monotonic() - closed_at
    raw.close()
    assert dropped_after < 4
    closes = logged_closes(p)
    assert [(c["code"], c["reason"]) for c in closes] == [(1000, "client closed")]
    assert json.loads(p.get("/health")[1])["connections"] == 0


def test_client_that_stops_reading_after_picows_closed_1009_is_dropped(make_proxy, redis_server,
                                                                       session_id):
    """picows answers an oversized frame with CLOSE 1009 by itself, then only waits for
    its write buffer to drain: a client that does not read is dropped once it has been
    silent for the ping interval (plus the close timeout), not at the ping timeout."""
    p = make_proxy(redis_server.url, MAX_MESSAGE_SIZE_BYTES=1000, MAX_FRAME_SIZE_BYTES=10_000,
                   MAX_BUFFER_SIZE_BYTES=32 * 1024 * 1024, WS_PING_INTERVAL_SECS=0.5,
                   WS_PING_TIMEOUT_SECS=30)
    set_tokens(redis_server, [session_id])
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", "tok", rcvbuf=4096)
    publish_unread_backlog(redis_server, session_id)  # under MAX_BUFFER_SIZE_BYTES
    raw.send_frame(TEXT, b'"' + b"a" * 20_000 + b'"')
    sent_at = time.monotonic()
    wait_for(lambda: numsub_all(redis_server, [session_id]) == [0], 8, "unsubscribed")
    dropped_after = time.monotonic() - sent_at
    raw.close()
    assert dropped_after < 5
    closes = logged_closes(p)
    assert [c["code"] for c in closes] == [1009]


def test_oversized_frame_close_is_logged_with_1009(make_proxy, redis_server, session_id):
    """picows sends the 1009 itself: the log says so, not 1006 'connection lost'."""
    p = make_proxy(redis_server.url, MAX_MESSAGE_SIZE_BYTES=1000, MAX_FRAME_SIZE_BYTES=10_000)
    set_tokens(redis_server, [session_id])
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", "tok")
    raw.send_frame(TEXT, b'"' + b"a" * 20_000 + b'"')
    opcode, payload = raw.read_frame()
    assert opcode == CLOSE and struct.unpack("!H", payload[:2])[0] == 1009
    # No CLOSE back (which would carry the code too): picows ends the connection.
    closes = logged_closes(p)
    raw.close()
    assert [c["code"] for c in closes] == [1009]
    assert "exceeding max allowed size" in closes[0]["reason"]


# --- limits ------------------------------------------------------------------------------

def test_silent_and_trickling_clients_are_dropped(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, HANDSHAKE_TIMEOUT_SECS=0.5)
    set_tokens(redis_server, [session_id])

    async def main():
        async with connect(p, session_id) as ws:  # an open socket must not be disturbed
            silent = socket.create_connection(("127.0.0.1", p.port))
            trickle = socket.create_connection(("127.0.0.1", p.port))
            silent.settimeout(3)
            trickle.settimeout(3)
            started = time.monotonic()
            head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
            dropped_at = None
            for i in range(30):
                try:
                    trickle.send(head[i:i + 1])
                except OSError:
                    dropped_at = time.monotonic() - started
                    break
                await asyncio.sleep(0.05)
                trickle.setblocking(False)
                try:
                    if trickle.recv(1) == b"":
                        dropped_at = time.monotonic() - started
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    dropped_at = time.monotonic() - started
                    break
                finally:
                    trickle.setblocking(True)
                    trickle.settimeout(3)
            assert silent.recv(1) == b""
            silent_elapsed = time.monotonic() - started
            redis_server.client().publish(f"session:{session_id}:down", '"still here"')
            got = await asyncio.wait_for(ws.recv(), 5)
            silent.close()
            trickle.close()
            return dropped_at, silent_elapsed, got

    dropped_at, silent_elapsed, got = asyncio.run(main())
    assert dropped_at is not None and 0.4 <= dropped_at <= 1.5
    assert 0.4 <= silent_elapsed <= 1.5
    assert got == '"still here"'


# --- Redis outage ----------------------------------------------------------------------

def test_redis_killed_and_restarted(make_redis, make_proxy, session_id, record_property):
    server = make_redis()
    p = make_proxy(server.url)
    sids = [f"{session_id}-{i}" for i in range(100)]
    set_tokens(server, sids)

    async def main():
        sockets = [await connect(p, sid) for sid in sids]
        assert numsub_all(server, sids) == [1] * 100

        server.kill()
        wait_for(lambda: p.get("/health")[0] == 503, 5, "/health 503 after SIGKILL")
        assert p.get("/ready")[0] == 503
        assert await handshake_status(p, f"{session_id}-new") == 503
        await sockets[0].send('{"during":"outage"}')
        assert await asyncio.wait_for(sockets[0].recv(), 5) == '{"error":"Upstream unavailable"}'
        for ws in sockets:  # every socket is still open
            await asyncio.wait_for(await ws.ping(), 5)

        server.start()  # same port, empty
        restarted = time.monotonic()
        wait_for(lambda: numsub_all(server, sids) == [1] * 100, 5, "re-subscription")
        resubscribed_in = time.monotonic() - restarted
        wait_for(lambda: p.get("/health")[0] == 200, 5, "/health 200 again")
        assert p.get("/ready")[0] == 200

        r = server.client()
        for i, sid in enumerate(sids):
            assert r.publish(f"session:{sid}:down", f'{{"after":{i}}}') == 1
        for i, ws in enumerate(sockets):
            assert await asyncio.wait_for(ws.recv(), 5) == f'{{"after":{i}}}'
        up = r.pubsub()
        up.subscribe(f"session:{sids[5]}:up")
        up.get_message(timeout=5)
        await sockets[5].send('{"upstream":"back"}')
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            m = up.get_message(timeout=0.5)
            if m and m["type"] == "message":
                message = m["data"]
        set_tokens(server, [f"{session_id}-new"])
        new_status = await handshake_status(p, f"{session_id}-new")
        for ws in sockets:
            await ws.close()
        return resubscribed_in, message, new_status

    resubscribed_in, message, new_status = asyncio.run(main())
    record_property("resubscribed_in_secs", round(resubscribed_in, 3))
    assert resubscribed_in < 2.0
    assert message == b'{"upstream":"back"}'
    assert new_status == 101
    metrics = p.get("/metrics")[1].decode()
    reconnects = [line for line in metrics.splitlines()
                  if line.startswith("wsproxy_redis_reconnects_total ")]
    assert reconnects and float(reconnects[0].split()[1]) >= 2  # both connections
    assert p.proc.poll() is None


def test_redis_that_stops_answering_is_an_outage(make_redis, make_proxy, session_id,
                                                 record_property):
    server = make_redis()
    p = make_proxy(server.url, AUTH_TIMEOUT_SECS=0.5)
    set_tokens(server, [session_id])
    blocker = server.client()

    async def main():
        async with connect(p, session_id) as ws:
            loop = asyncio.get_running_loop()
            sleeper = loop.run_in_executor(None, blocker.execute_command, "DEBUG", "SLEEP", "4")
            await asyncio.sleep(0.1)
            # Connected but silent: caught by the health PING, not by a TCP error.
            stalled = time.monotonic()
            await loop.run_in_executor(None, wait_for, lambda: p.get("/health")[0] == 503, 3.5,
                                       "/health 503 during the stall")
            detected_in = time.monotonic() - stalled
            await sleeper
            await loop.run_in_executor(None, wait_for, lambda: p.get("/health")[0] == 200, 5,
                                       "/health 200 after the stall")
            await loop.run_in_executor(None, wait_for,
                                       lambda: numsub_all(server, [session_id]) == [1], 5,
                                       "re-subscribed after the stall")
            server.client().publish(f"session:{session_id}:down", '"after stall"')
            return detected_in, await asyncio.wait_for(ws.recv(), 5)

    detected_in, got = asyncio.run(main())
    record_property("stall_detected_in_secs", round(detected_in, 3))
    assert detected_in < 3.0
    assert got == '"after stall"'
    assert "redis_stalled" in p.log()


# --- shutdown ----------------------------------------------------------------------------

def test_sigterm_drains_then_closes_1001_and_exits_0(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, SHUTDOWN_GRACE_PERIOD_SECS=2)
    sids = [f"{session_id}-{i}" for i in range(100)]
    set_tokens(redis_server, sids + [f"{session_id}-late"])
    r = redis_server.client()

    async def main():
        sockets = [await connect(p, sid) for sid in sids]
        p.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wait_for, lambda: p.get("/ready")[0] == 503, 1,
                                   "/ready 503 at once")
        assert await handshake_status(p, f"{session_id}-late") == 503
        # Open sockets keep working during the grace period.
        for i, sid in enumerate(sids):
            assert r.publish(f"session:{sid}:down", f'{{"grace":{i}}}') == 1
        for i, ws in enumerate(sockets):
            assert await asyncio.wait_for(ws.recv(), 5) == f'{{"grace":{i}}}'
        codes = await close_codes(sockets)
        closed_after = time.monotonic() - signalled
        return codes, closed_after

    codes, closed_after = asyncio.run(main())
    assert codes == [1001] * 100
    assert 1.8 <= closed_after <= 6
    assert p.proc.wait(10) == 0
    log = p.log()
    assert "Traceback" not in log
    events = [json.loads(line)["event"] for line in log.splitlines() if line.startswith("{")]
    assert "shutdown_started" in events and "shutdown_complete" in events


def test_handshake_under_way_at_sigterm_is_refused_503(make_redis, make_proxy, session_id):
    """A signal that comes while a handshake waits for Redis: that socket is not
    accepted any more than a new one (503), while open sockets are served through the
    grace period."""
    server = make_redis()
    p = make_proxy(server.url, SHUTDOWN_GRACE_PERIOD_SECS=3)
    open_sid, late_sid = f"{session_id}-open", f"{session_id}-late"
    set_tokens(server, [open_sid, late_sid])
    blocker = redis.Redis(port=server.port, socket_timeout=5)

    async def main():
        ws = await connect(p, open_sid)
        loop = asyncio.get_running_loop()
        # DEBUG SLEEP holds all of Redis: the late handshake's GET waits through it.
        sleeper = loop.run_in_executor(None, blocker.execute_command, "DEBUG", "SLEEP", "0.8")
        await asyncio.sleep(0.1)
        late = asyncio.ensure_future(handshake_status(p, late_sid))
        await asyncio.sleep(0.2)
        p.proc.send_signal(signal.SIGTERM)
        await sleeper
        status = await asyncio.wait_for(late, 5)
        server.client().publish(f"session:{open_sid}:down", '"still served"')
        message = await asyncio.wait_for(ws.recv(), 5)
        codes = await close_codes([ws])
        return status, message, codes

    status, message, codes = asyncio.run(main())
    assert status == 503
    assert message == '"still served"'
    assert codes == [1001]
    assert p.proc.wait(10) == 0
    assert '"reason":"draining"' in p.log()


def test_second_signal_closes_at_once(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, SHUTDOWN_GRACE_PERIOD_SECS=30)
    set_tokens(redis_server, [session_id])

    async def main():
        async with connect(p, session_id) as ws:
            p.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            p.proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            return info.value.rcvd.code if info.value.rcvd else None, time.monotonic() - started

    code, elapsed = asyncio.run(main())
    assert code == 1001
    assert elapsed < 2.0
    assert p.proc.wait(10) == 0


def test_shutdown_close_spread(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, SHUTDOWN_GRACE_PERIOD_SECS=0, SHUTDOWN_CLOSE_SPREAD_SECS=1)
    sids = [f"{session_id}-{i}" for i in range(20)]
    set_tokens(redis_server, sids)

    async def main():
        sockets = [await connect(p, sid) for sid in sids]
        p.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()

        async def closed_at(ws):
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed:
                return time.monotonic() - started

        return await asyncio.gather(*(closed_at(ws) for ws in sockets))

    times = sorted(asyncio.run(main()))
    assert times[-1] - times[0] >= 0.6  # spread out, not all in the same instant
    assert p.proc.wait(10) == 0


def test_second_signal_during_a_spread_close_closes_the_rest_at_once(make_proxy, redis_server,
                                                                     session_id):
    p = make_proxy(redis_server.url, SHUTDOWN_GRACE_PERIOD_SECS=0, SHUTDOWN_CLOSE_SPREAD_SECS=20)
    sids = [f"{session_id}-{i}" for i in range(20)]
    set_tokens(redis_server, sids)

    async def main():
        sockets = [await connect(p, sid) for sid in sids]
        p.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.5)  # about one socket a second is being closed
        p.proc.send_signal(signal.SIGINT)
        hurried = time.monotonic()
        return await close_codes(sockets, timeout=10), time.monotonic() - hurried

    codes, elapsed = asyncio.run(main())
    assert codes == [1001] * 20
    assert elapsed < 3  # not the 18 s left of the spread
    assert p.proc.wait(10) == 0


def test_socket_whose_channel_redis_refuses_after_a_reconnect_is_closed(make_redis, make_proxy,
                                                                         session_id):
    """An ACL change takes a session's channel from wsproxy's Redis user: Redis drops
    the pub/sub connection, and on re-subscription refuses that channel. Its socket
    would receive nothing: it is closed with 1011, the others go on."""
    server = make_redis()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "proxy", "on", ">pw", "~*", "&*", "+@all")
    keep, drop = f"keep-{session_id}", f"drop-{session_id}"
    set_tokens(server, [keep, drop])
    p = make_proxy(server.url.replace("redis://", "redis://proxy:pw@"))

    async def main():
        kept, dropped = await connect(p, keep), await connect(p, drop)
        admin.execute_command("ACL", "SETUSER", "proxy", "resetchannels", "&session:keep-*")
        codes = await close_codes([dropped], timeout=10)
        # The kept socket's channel is subscribed again.
        await asyncio.get_running_loop().run_in_executor(
            None, wait_for, lambda: numsub_all(server, [keep]) == [1], 5, "re-subscribed")
        admin.publish(f"session:{keep}:down", '"still here"')
        message = await asyncio.wait_for(kept.recv(), 5)
        # The client of the refused channel comes back at once: its own SUBSCRIBE is
        # refused too, and says so (not a wait for the handshake timeout).
        started = time.monotonic()
        again = await handshake_status(p, drop)
        again_after = time.monotonic() - started
        await kept.close()
        return codes, message, again, again_after

    codes, message, again, again_after = asyncio.run(main())
    assert codes == [1011]
    assert again == 503 and again_after < 2
    assert message == '"still here"'
    assert '"event":"redis_subscribe_refused"' in p.log()
    assert p.get("/health")[0] == 200
    assert p.proc.poll() is None


def test_resubscription_in_batches_survives_sockets_leaving(make_redis, make_proxy, session_id):
    """More channels than one batch; sockets close while Redis comes back: every channel
    still open ends up subscribed, every closed one does not."""
    server = make_redis()
    p = make_proxy(server.url)
    sids = [f"{session_id}-{i}" for i in range(1100)]
    set_tokens(server, sids)

    async def main():
        sem = asyncio.Semaphore(100)

        async def open_one(sid):
            async with sem:
                return await connect(p, sid)

        sockets = await asyncio.gather(*(open_one(sid) for sid in sids))
        server.kill()
        wait_for(lambda: p.get("/health")[0] == 503, 5, "/health 503")
        server.start()
        # Close every tenth socket while the proxy reconnects and re-subscribes.
        leaving = list(range(0, len(sockets), 10))
        for i in leaving:
            await sockets[i].close()
            await asyncio.sleep(0.002)
        loop = asyncio.get_running_loop()
        staying = [sid for i, sid in enumerate(sids) if i % 10]
        gone = [sids[i] for i in leaving]
        await loop.run_in_executor(None, wait_for,
                                   lambda: numsub_all(server, staying) == [1] * len(staying),
                                   5, "every open channel re-subscribed")
        left_over = numsub_all(server, gone)
        for i, ws in enumerate(sockets):
            if i % 10:
                await ws.close()
        return left_over

    assert asyncio.run(main()) == [0] * 110


def test_heartbeat_pass_looks_at_each_socket_once_a_period_in_steps_with_a_budget(
        monkeypatch):
    """In process, with the clock and the sweep recorded: at the defaults (15 s / 30 s)
    a pass takes 1 s in 20 steps of 50 ms, each step looks at its share of the sockets
    in the order they opened, every socket once a pass, and may send at most enough
    pings to reach all of them in a quarter interval (at least 16)."""
    from wsproxy import _fastpath, session

    table = session.ConnectionTable(None, None, 15.0, 30.0)
    for i in range(10_000):
        table.open[f"socket {i}"] = 0.0
    steps: list[float] = []
    calls: list[tuple[list, int]] = []

    async def fake_sleep(seconds):
        steps.append(seconds)
        if len(steps) > 40:  # two passes
            raise asyncio.CancelledError

    def fake_sweep(listeners, now, interval, timeout, budget):
        calls.append((list(listeners), budget))
        return 0

    monkeypatch.setattr(session.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(_fastpath, "heartbeat_sweep", fake_sweep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(table._sweep_forever())
    assert len(calls) == 40 and all(s == pytest.approx(0.05) for s in steps)
    first_pass = [name for part, _ in calls[:20] for name in part]
    assert first_pass == [f"socket {i}" for i in range(10_000)]  # once each, in order
    assert [len(part) for part, _ in calls[:20]] == [500] * 20
    assert {budget for _, budget in calls} == {134}  # 10,000 × 0.05 s / 3.75 s
    assert [name for part, _ in calls[20:] for name in part] == first_pass
