"""/metrics and the logs, as an operator reads them from a running proxy."""

from __future__ import annotations

import asyncio
import json
import socket

import websockets
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for
from .rawws import RawWebSocket


def scrape(proxy) -> dict[tuple[str, tuple], float]:
    status, body = proxy.get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_traffic(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url)
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", "tok")
    before = scrape(p)
    for name in ("wsproxy_active_connections", "wsproxy_backpressure_disconnects_total",
                 "wsproxy_redis_channels_active", "wsproxy_redis_reconnects_total",
                 "wsproxy_handshake_seconds_count"):
        assert any(key[0] == name for key in before), name
    url = f"{p.ws_url}/agent1/ws/{session_id}"

    async def main():
        async with websockets.connect(url, additional_headers={"Authorization": "Bearer tok"}) \
                as ws:
            during = scrape(p)
            for i in range(7):
                r.publish(f"session:{session_id}:down", f'{{"d":{i}}}')
            for _ in range(7):
                await ws.recv()
            for i in range(5):
                await ws.send(f'{{"u":{i}}}')
            await ws.send("not json")
            await ws.recv()
            await ws.send(b"binary")
            await ws.recv()
        try:
            async with websockets.connect(url, additional_headers={"Authorization": "Bearer x"}):
                pass
        except websockets.InvalidStatus:
            pass
        return during

    during = asyncio.run(main())
    # Refused at the path itself: an id out of its alphabet, a method other than GET.
    assert p.get(f"/agent1/ws/{session_id}!")[0] == 400
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw:
        raw.sendall(f"POST /agent1/ws/{session_id} HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 0\r\n\r\n".encode())
        assert raw.recv(100).startswith(b"HTTP/1.1 405 ")
    wait_for(lambda: value(scrape(p), "wsproxy_active_connections") == 0, 5, "close counted")
    after = scrape(p)
    assert value(during, "wsproxy_active_connections") == 1
    assert value(during, "wsproxy_redis_channels_active") == 1
    assert value(after, "wsproxy_redis_channels_active") == 0
    assert value(after, "wsproxy_messages_total", direction="down") == 7
    assert value(after, "wsproxy_messages_total", direction="up") == 5
    assert value(after, "wsproxy_bytes_total", direction="down") == sum(
        len(f'{{"d":{i}}}') for i in range(7))
    assert value(after, "wsproxy_bytes_total", direction="up") == sum(
        len(f'{{"u":{i}}}') for i in range(5))
    assert value(after, "wsproxy_errors_total", type="invalid_json") == 1
    assert value(after, "wsproxy_errors_total", type="binary_message") == 1
    assert value(after, "wsproxy_connections_total", status="101") == 1
    assert value(after, "wsproxy_connections_total", status="403") == 1
    assert value(after, "wsproxy_connections_total", status="400") == 1
    assert value(after, "wsproxy_connections_total", status="405") == 1
    assert value(after, "wsproxy_handshake_seconds_count") == 1
    assert value(after, "wsproxy_handshake_seconds_bucket", le="+Inf") == 1


SECRET_HEADER = "hdr-SECRET-9f8e7d"
SECRET_QUERY = "qry-SECRET-1a2b3c"
SECRET_WRONG = "bad-SECRET-5d6e7f"


def test_no_token_ever_reaches_the_log(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url, LOG_LEVEL="debug")
    r = redis_server.client()
    r.set(f"session:{session_id}:auth", SECRET_HEADER)
    r.set(f"session:{session_id}-q:auth", SECRET_QUERY)
    base = f"{p.ws_url}/agent1/ws"

    async def main():
        async with websockets.connect(f"{base}/{session_id}",
                                      additional_headers={"Authorization":
                                                          f"Bearer {SECRET_HEADER}"}) as ws:
            await ws.send('{"x":1}')
        async with websockets.connect(f"{base}/{session_id}-q?access_token={SECRET_QUERY}"):
            pass
        for url, headers in [
            (f"{base}/{session_id}", {"Authorization": f"Bearer {SECRET_WRONG}"}),
            (f"{base}/{session_id}-q?access_token={SECRET_WRONG}", {}),
            (f"{base}/bad!id?access_token={SECRET_WRONG}", {}),
            (f"{base}/{'x' * 200}", {"Authorization": f"Bearer {SECRET_WRONG}"}),
        ]:
            try:
                async with websockets.connect(url, additional_headers=headers):
                    pass
            except websockets.InvalidStatus:
                pass

    asyncio.run(main())
    # A malformed request carrying a token, and one refused by the upgrade check.
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(f"GET /a/ws/{session_id}?access_token={SECRET_WRONG} HTTP/1.1\r\n"
                  f"Authorization: Bearer {SECRET_WRONG}\r\nbroken header\r\n\r\n".encode())
        s.recv(4096)
    raw = RawWebSocket(p.port, f"/agent1/ws/{session_id}", SECRET_HEADER)
    raw.close()
    wait_for(lambda: p.log().count("connection_close") >= 3, 5, "closes logged")
    log = p.log()
    for secret in (SECRET_HEADER, SECRET_QUERY, SECRET_WRONG, "SECRET"):
        assert secret not in log
    assert "handshake_rejected" in log and "connection_open" in log


def test_log_lines_are_json_with_ids(make_proxy, redis_server, session_id):
    p = make_proxy(redis_server.url)
    redis_server.client().set(f"session:{session_id}:auth", "tok")

    async def main():
        async with websockets.connect(f"{p.ws_url}/agent1/ws/{session_id}",
                                      additional_headers={"Authorization": "Bearer tok"}):
            pass

    asyncio.run(main())
    wait_for(lambda: "connection_close" in p.log(), 5, "close logged")
    entries = [json.loads(line) for line in p.log().splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "event"} <= entry.keys()
    opened = [e for e in entries if e["event"] == "connection_open"]
    closed = [e for e in entries if e["event"] == "connection_close"]
    assert opened[0]["session_id"] == session_id and opened[0]["conn_id"]
    assert closed[0]["conn_id"] == opened[0]["conn_id"]
    assert closed[0]["code"] == 1000 and closed[0]["reason"]
    assert any(e["event"] == "redis_up" for e in entries)


def test_text_log_format(make_proxy, redis_server):
    p = make_proxy(redis_server.url, LOG_FORMAT="text")
    wait_for(lambda: "redis_up" in p.log(), 5, "redis_up logged")
    line = next(line for line in p.log().splitlines() if "listening" in line)
    assert not line.startswith("{")
    assert "port=" in line
