"""The handshake, end to end: real proxy process, real Redis, real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time

import pytest
import redis
import websockets
from websockets.exceptions import InvalidStatus

from .conftest import wait_for


def ws_url(proxy, session_id: str, agent: str = "agent1", query: str = "") -> str:
    return f"{proxy.ws_url}/{agent}/ws/{session_id}" + (f"?{query}" if query else "")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status_of(url: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    """The HTTP status a WebSocket handshake gets (101 if it opened) and the response."""
    try:
        async with websockets.connect(url, additional_headers=headers or {},
                                      open_timeout=10) as ws:
            return 101, ws.response
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def upgrade_head(path: str, extra: str = "", key: bytes | None = None) -> bytes:
    key_b64 = base64.b64encode(key or os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key_b64}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


# --- plain HTTP ------------------------------------------------------------------

def test_health_is_json_and_healthy(proxy):
    status, body = proxy.get("/health")
    assert status == 200
    assert json.loads(body)["status"] == "healthy"


def test_ready_answers_200(proxy):
    status, body = proxy.get("/ready")
    assert status == 200
    assert json.loads(body)["status"] == "ready"


@pytest.mark.parametrize("path", ["/", "/nope", "/agent/ws", "/agent/ws/s/extra", "/a/wss/s"])
def test_unknown_paths_are_404(proxy, path):
    assert proxy.get(path)[0] == 404


@pytest.mark.parametrize("agent,sid", [
    ("agent1", "x" * 129), ("a" * 129, "s1"), ("agent1", "bad%20id"), ("agent1", "b@d"),
    ("ag!ent", "s1"), ("agent1", "s:1"),
])
def test_bad_ids_are_400(proxy, agent, sid):
    status, _ = asyncio.run(status_of(f"{proxy.ws_url}/{agent}/ws/{sid}", bearer("t")))
    assert status == 400


def test_id_of_128_allowed_characters_is_accepted(proxy, redis_server):
    sid = ("A-z0.9_~" * 16)[:128]
    redis_server.client().set(f"session:{sid}:auth", "tok128")
    status, _ = asyncio.run(status_of(ws_url(proxy, sid, agent="a" * 128), bearer("tok128")))
    assert status == 101


def test_malformed_request_line_is_400(proxy):
    answer = raw_request(proxy.port, b"HELLO\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_malformed_header_is_400(proxy):
    answer = raw_request(proxy.port, b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_oversized_request_head_is_431(proxy):
    head = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    answer = raw_request(proxy.port, head)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_key_beyond_ascii_is_400_not_an_internal_error(proxy, redis_server, session_id):
    redis_server.client().set(f"session:{session_id}:auth", "tok")
    head = (f"GET /agent1/ws/{session_id} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Authorization: Bearer tok\r\n").encode() + \
        b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAA\xe9==\r\n\r\n"
    answer = raw_request(proxy.port, head)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Sec-WebSocket-Key" in answer
    assert "request handling failed" not in proxy.log()
    metrics = proxy.get("/metrics")[1].decode()
    assert 'wsproxy_errors_total{type="internal"} 0' in metrics


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_head_gets_the_head_of_get_without_a_body(proxy, path):
    get = raw_request(proxy.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = raw_request(proxy.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    get_head, _, get_body = get.partition(b"\r\n\r\n")
    head_head, _, head_body = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert head_body == b""
    assert get_body
    length = [line for line in head_head.split(b"\r\n") if line.startswith(b"Content-Length:")]
    assert length and int(length[0].split(b":")[1]) > 0
    if path != "/metrics":  # (the metrics count the requests themselves)
        assert head_head == get_head


@pytest.mark.parametrize("path,status", [("/nope", 404), ("/agent1/ws/s1", 405)])
def test_head_elsewhere_gets_its_status_without_a_body(proxy, path, status):
    answer = raw_request(proxy.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert body == b""


def test_other_methods_on_health_are_405_naming_get_and_head(proxy):
    answer = raw_request(proxy.port, b"POST /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET, HEAD\r\n" in answer


# --- token -------------------------------------------------------------------------

def test_no_token_is_401_with_www_authenticate(proxy, session_id):
    status, response = asyncio.run(status_of(ws_url(proxy, session_id)))
    assert status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.body  # says why


def test_non_bearer_authorization_is_401(proxy, session_id):
    status, _ = asyncio.run(status_of(ws_url(proxy, session_id), {"Authorization": "Basic eDp5"}))
    assert status == 401


def test_absent_token_key_is_403(proxy, session_id):
    status, response = asyncio.run(status_of(ws_url(proxy, session_id), bearer("whatever")))
    assert status == 403
    assert b"token" in response.body


def test_wrong_token_is_403_and_ttl_untouched(proxy, redis_server, session_id):
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "right")
    status, _ = asyncio.run(status_of(ws_url(proxy, session_id), bearer("wrong")))
    assert status == 403
    assert r.ttl(f"session:{session_id}:auth") == -1  # no EXPIRE after a failed auth


def test_prefix_of_token_is_403(proxy, redis_server, session_id):
    redis_server.client().set(f"session:{session_id}:auth", "secret-token")
    assert asyncio.run(status_of(ws_url(proxy, session_id), bearer("secret")))[0] == 403
    assert asyncio.run(status_of(ws_url(proxy, session_id), bearer("secret-token!")))[0] == 403


def test_wrong_type_key_is_403(proxy, redis_server, session_id):
    redis_server.client().rpush(f"session:{session_id}:auth", "tok")
    assert asyncio.run(status_of(ws_url(proxy, session_id), bearer("tok")))[0] == 403


def test_valid_token_sets_grace_ttl(proxy, redis_server, session_id):
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")
    assert r.ttl(f"session:{session_id}:auth") == -1
    assert asyncio.run(status_of(ws_url(proxy, session_id), bearer("tok")))[0] == 101
    ttl = wait_for(lambda: r.ttl(f"session:{session_id}:auth") > 0 and
                   r.ttl(f"session:{session_id}:auth"), 5, "EXPIRE after auth")
    assert 10800 - 5 <= ttl <= 10800


def test_access_token_query_parameter(proxy, redis_server, session_id):
    redis_server.client().set(f"session:{session_id}:auth", "q/tok+en")
    url = ws_url(proxy, session_id, query="access_token=q%2Ftok%2Ben")
    assert asyncio.run(status_of(url))[0] == 101
    url = ws_url(proxy, session_id, query="access_token=nope")
    assert asyncio.run(status_of(url))[0] == 403


def test_reconnect_within_grace_period_with_same_token(proxy, redis_server, session_id):
    redis_server.client().set(f"session:{session_id}:auth", "tok", ex=30)
    for _ in range(3):
        assert asyncio.run(status_of(ws_url(proxy, session_id), bearer("tok")))[0] == 101


# --- subscription before the 101 ---------------------------------------------------

def test_subscribed_before_101(proxy, redis_server, session_id):
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")

    async def main():
        async with websockets.connect(ws_url(proxy, session_id),
                                      additional_headers=bearer("tok")):
            return r.pubsub_numsub(f"session:{session_id}:down")[0][1]

    assert asyncio.run(main()) == 1


def test_publish_at_the_instant_open_returns_arrives(proxy, redis_server):
    """A backend that publishes as soon as the client's open returns loses nothing."""
    r = redis_server.client()
    rounds = 200

    async def one(i: int) -> bytes:
        sid = f"instant-{os.getpid()}-{i}"
        r.set(f"session:{sid}:auth", "tok")
        async with websockets.connect(ws_url(proxy, sid), additional_headers=bearer("tok")) as ws:
            receivers = r.publish(f"session:{sid}:down", f'{{"n":{i}}}')
            assert receivers == 1
            return await asyncio.wait_for(ws.recv(), 5)

    async def main():
        return [await one(i) for i in range(rounds)]

    got = asyncio.run(main())
    assert got == [f'{{"n":{i}}}' for i in range(rounds)]


def test_message_between_ack_and_101_is_delivered_first(proxy, redis_server, session_id):
    """Messages published while the handshake is still in flight reach the socket, in order."""
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")
    channel = f"session:{session_id}:down"

    async def main():
        connect = asyncio.ensure_future(
            websockets.connect(ws_url(proxy, session_id), additional_headers=bearer("tok")))
        # Publish in a tight loop as soon as the subscription exists, racing the 101.
        sent = []
        deadline = time.monotonic() + 5
        while not connect.done() and time.monotonic() < deadline:
            if r.pubsub_numsub(channel)[0][1]:
                n = len(sent)
                if r.publish(channel, f'{{"early":{n}}}'):
                    sent.append(f'{{"early":{n}}}')
            await asyncio.sleep(0)
        ws = await connect
        r.publish(channel, '{"late":1}')
        received = [await asyncio.wait_for(ws.recv(), 5) for _ in range(len(sent) + 1)]
        await ws.close()
        return sent, received

    sent, received = asyncio.run(main())
    assert received == sent + ['{"late":1}']


# --- Redis unavailable / slow ------------------------------------------------------

def test_redis_unreachable_gives_503(make_proxy, session_id):
    from .conftest import free_port
    p = make_proxy(f"redis://127.0.0.1:{free_port()}", wait_healthy=False)
    assert p.get("/health")[0] == 503
    assert json.loads(p.get("/health")[1])["status"] == "unhealthy"
    assert p.get("/ready")[0] == 503
    status, _ = asyncio.run(status_of(ws_url(p, session_id), bearer("tok")))
    assert status == 503
    assert p.proc.poll() is None  # still running, still retrying


def test_redis_too_slow_for_auth_gives_504(make_redis, make_proxy, session_id):
    server = make_redis()
    p = make_proxy(server.url, AUTH_TIMEOUT_SECS=0.3)
    server.client().set(f"session:{session_id}:auth", "tok")
    blocker = redis.Redis(port=server.port, socket_timeout=5)

    async def main():
        # DEBUG SLEEP blocks the whole Redis: the GET cannot be answered in time.
        loop = asyncio.get_running_loop()
        sleeper = loop.run_in_executor(None, blocker.execute_command, "DEBUG", "SLEEP", "1.5")
        await asyncio.sleep(0.1)
        started = time.monotonic()
        result = await status_of(ws_url(p, session_id), bearer("tok"))
        elapsed = time.monotonic() - started
        await sleeper
        return result[0], elapsed

    status, elapsed = asyncio.run(main())
    assert status == 504
    assert elapsed < 1.4  # answered at the auth timeout, not when Redis woke up


def test_token_check_failure_does_not_leak_subscriptions(proxy, redis_server, session_id):
    r = redis_server.client()
    asyncio.run(status_of(ws_url(proxy, session_id), bearer("x")))
    assert r.pubsub_numsub(f"session:{session_id}:down")[0][1] == 0


# --- requests picows would refuse after auth ---------------------------------------

@pytest.mark.parametrize("head_extra,expect", [
    ("no-key", 400), ("bad-version", 426), ("no-upgrade", 426),
])
def test_bad_upgrade_after_valid_token_leaks_nothing(proxy, redis_server, session_id,
                                                      head_extra, expect):
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")
    path = f"/agent1/ws/{session_id}"
    auth = "Authorization: Bearer tok\r\n"
    if head_extra == "no-key":
        head = (f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                f"\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n").encode()
    elif head_extra == "bad-version":
        head = upgrade_head(path, auth).replace(b"Version: 13", b"Version: 8")
    else:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    answer = raw_request(proxy.port, head)
    assert answer.startswith(f"HTTP/1.1 {expect} ".encode())
    time.sleep(0.1)
    assert r.pubsub_numsub(f"session:{session_id}:down")[0][1] == 0
    assert r.ttl(f"session:{session_id}:auth") == -1  # refused before any Redis work


def test_client_gone_during_auth_leaks_nothing(make_redis, make_proxy, session_id):
    server = make_redis()
    p = make_proxy(server.url, AUTH_TIMEOUT_SECS=2)
    r = server.client()
    r.set(f"session:{session_id}:auth", "tok")
    blocker = redis.Redis(port=server.port, socket_timeout=5)

    async def main():
        loop = asyncio.get_running_loop()
        sleeper = loop.run_in_executor(None, blocker.execute_command, "DEBUG", "SLEEP", "0.5")
        await asyncio.sleep(0.1)
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(upgrade_head(f"/agent1/ws/{session_id}", "Authorization: Bearer tok\r\n"))
        await asyncio.sleep(0.1)
        s.close()  # gone while the GET waits on a sleeping Redis
        await sleeper

    asyncio.run(main())
    time.sleep(0.5)
    assert r.pubsub_numsub(f"session:{session_id}:down")[0][1] == 0
    assert p.get("/health")[0] == 200


def test_max_connections_gives_503_before_redis_work(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, MAX_CONNECTIONS=2)
    r = redis_server.client()
    for i in range(3):
        r.set(f"session:{session_id}-{i}:auth", "tok")

    async def main():
        a = await websockets.connect(ws_url(p, f"{session_id}-0"), additional_headers=bearer("tok"))
        b = await websockets.connect(ws_url(p, f"{session_id}-1"), additional_headers=bearer("tok"))
        third = await status_of(ws_url(p, f"{session_id}-2"), bearer("tok"))
        ttl_after_third = r.ttl(f"session:{session_id}-2:auth")
        full = p.get("/ready"), p.get("/health")[0]
        await a.close()
        await asyncio.sleep(0.2)
        ready_again = p.get("/ready")
        fourth = await status_of(ws_url(p, f"{session_id}-2"), bearer("tok"))
        await b.close()
        return third[0], ttl_after_third, fourth[0], full, ready_again

    third, ttl_after_third, fourth, full, ready_again = asyncio.run(main())
    assert third == 503
    assert ttl_after_third == -1  # refused before the GET and EXPIRE
    assert fourth == 101  # a slot freed by a close is usable again
    # A full instance is not ready (a load balancer sends new clients elsewhere), but
    # healthy.
    (ready_status, ready_body), health_status = full
    assert (ready_status, json.loads(ready_body)) == (503, {"status": "at capacity"})
    assert health_status == 200
    assert ready_again[0] == 200


def test_control_character_in_a_header_is_400_before_redis_work(proxy, redis_server,
                                                               session_id):
    """A header value with a control character is refused by the gate itself, before
    the GET, the EXPIRE and the SUBSCRIBE (picows only sees a head the gate checked)."""
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")
    head = upgrade_head(f"/agent1/ws/{session_id}",
                        "Authorization: Bearer tok\r\nX-Odd: a\x01b\r\n")
    answer = raw_request(proxy.port, head)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"control character" in answer
    assert r.ttl(f"session:{session_id}:auth") == -1  # refused before auth
    assert r.pubsub_numsub(f"session:{session_id}:down")[0][1] == 0
    assert proxy.get("/health")[0] == 200


def test_connection_header_with_keep_alive_and_upgrade_opens(proxy, redis_server, session_id):
    """Firefox sends ``Connection: keep-alive, Upgrade``: a token list, which RFC 6455
    allows. The upgrade must go through (101, a working socket), not be refused."""
    from .rawws import RawWebSocket

    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")
    raw = RawWebSocket.__new__(RawWebSocket)
    raw.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    raw.buffer = b""
    head = upgrade_head(f"/agent1/ws/{session_id}", "Authorization: Bearer tok\r\n")
    raw.sock.sendall(head.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"))
    while b"\r\n\r\n" not in raw.buffer:
        raw.buffer += raw.sock.recv(4096)
    assert raw.buffer.startswith(b"HTTP/1.1 101 ")
    raw.buffer = raw.buffer.partition(b"\r\n\r\n")[2]
    wait_for(lambda: r.pubsub_numsub(f"session:{session_id}:down")[0][1] == 1, 5,
             "the subscription")
    r.publish(f"session:{session_id}:down", '{"hi":1}')
    assert raw.read_frame() == (0x1, b'{"hi":1}')
    raw.close()


def test_redis_with_a_password_and_a_database(make_redis, make_proxy, session_id):
    """REDIS_URL's password (AUTH on both connections) and db (SELECT for the token)."""
    server = make_redis(password="s3cret-pw")
    p = make_proxy(server.url + "/2")
    r = redis.Redis(port=server.port, password="s3cret-pw", db=2)
    r.set(f"session:{session_id}:auth", "tok")
    server.client().set(f"session:{session_id}-db0:auth", "tok")  # db 0: not looked at

    async def main():
        async with websockets.connect(ws_url(p, session_id), additional_headers=bearer("tok")) \
                as ws:
            r.publish(f"session:{session_id}:down", '"through auth"')
            got = await asyncio.wait_for(ws.recv(), 5)
        other = await status_of(ws_url(p, f"{session_id}-db0"), bearer("tok"))
        return got, other[0]

    got, other = asyncio.run(main())
    assert got == '"through auth"'
    assert other == 403
    assert r.ttl(f"session:{session_id}:auth") > 0
    assert "s3cret-pw" not in p.log()


def test_wrong_redis_password_is_unhealthy_and_says_why(make_redis, make_proxy):
    server = make_redis(password="right-pw")
    p = make_proxy(f"redis://:wrong-pw@127.0.0.1:{server.port}", wait_healthy=False)
    wait_for(lambda: "redis_connect_failed" in p.log(), 5, "the failure logged")
    assert p.get("/health")[0] == 503
    assert "wrong-pw" not in p.log()
    assert p.proc.poll() is None


def _round_trip(p, server, session_id) -> str:
    server.client().set(f"session:{session_id}:auth", "tok")

    async def main():
        async with websockets.connect(ws_url(p, session_id), additional_headers=bearer("tok")) \
                as ws:
            assert server.client().publish(f"session:{session_id}:down", '"hi"') == 1
            return await asyncio.wait_for(ws.recv(), 5)

    return asyncio.run(main())


def test_redis_over_tls(make_redis, make_proxy, session_id):
    """rediss:// with the CA given as ssl_ca_certs, as redis-py spells it."""
    server = make_redis(tls=True)
    p = make_proxy(server.tls_url)
    assert _round_trip(p, server, session_id) == '"hi"'
    assert "rediss://127.0.0.1" in p.log()


def test_redis_over_tls_refuses_an_untrusted_certificate(make_redis, make_proxy):
    server = make_redis(tls=True)
    p = make_proxy(f"rediss://127.0.0.1:{server.tls_port}", wait_healthy=False)
    wait_for(lambda: "redis_connect_failed" in p.log(), 5, "the failure logged")
    assert "CERTIFICATE_VERIFY_FAILED" in p.log()
    assert p.get("/health")[0] == 503


def test_redis_over_a_unix_socket(make_redis, make_proxy, session_id):
    server = make_redis(unix_socket=True)
    p = make_proxy(server.unix_url)
    assert _round_trip(p, server, session_id) == '"hi"'
