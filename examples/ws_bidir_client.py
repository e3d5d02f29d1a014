#!/usr/bin/env python3
"""Play the browser: a WebSocket client that sends pings upstream and prints what comes down.

    python examples/ws_bidir_client.py <agent_id> <session_id> <auth_token> \\
        [--interval SECS] [--count N]

Connects to `{WSPROXY_URL}/{agent_id}/ws/{session_id}` with `Authorization: Bearer <token>`
(set the token first with auth_token_setter.py). Every SECS seconds (default 3, first at
once) sends `{"type":"ping","counter":N,"timestamp":"<ISO 8601 UTC>"}`, which wsproxy
publishes to `session:{session_id}:up`, and prints every message that arrives (whatever
a backend publishes to `session:{session_id}:down`). With --count it stops after N pings
and one more interval of listening; otherwise Ctrl+C stops it.

Environment: WSPROXY_URL (default ws://127.0.0.1:4040).
Exit codes: 0 done, stopped by Ctrl+C/SIGTERM, or closed by the server with 1000/1001;
1 connection or handshake refused (the HTTP status is shown) or closed abnormally;
2 wrong arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime

from _common import (
    agent_id,
    positive_float,
    positive_int,
    run_main,
    run_until_signal,
    session_id,
    token,
    wsproxy_url_from_env,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ws_bidir_client.py",
        usage="%(prog)s <agent_id> <session_id> <auth_token> [--interval SECS] [--count N]",
        description="Connect to wsproxy, send pings upstream, print downstream messages.",
        epilog="Environment: WSPROXY_URL (default ws://127.0.0.1:4040). Ctrl+C stops.")
    p.add_argument("agent_id", type=agent_id, help="agent id, e.g. agent1")
    p.add_argument("session_id", type=session_id, help="session id, e.g. test-session-123")
    p.add_argument("auth_token", type=token, help="the token stored by auth_token_setter.py")
    p.add_argument("--interval", type=positive_float, default=3.0, metavar="SECS",
                   help="seconds between pings (default 3)")
    p.add_argument("--count", type=positive_int, default=None, metavar="N",
                   help="stop after N pings (default: run until Ctrl+C)")
    return p.parse_args(argv)


def utc_now_iso() -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-15T12:00:00.123Z"""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def show(message: str | bytes) -> str:
    if isinstance(message, bytes):
        return f"(binary, {len(message)} bytes) {message!r}"
    if "\n" in message or "\r" in message:
        return message.replace("\r", " ").replace("\n", " ")
    return message


async def send_pings(ws, interval: float, count: int | None) -> None:
    n = 0
    start = time.monotonic()
    while count is None or n < count:
        n += 1
        ping = json.dumps({"type": "ping", "counter": n, "timestamp": utc_now_iso()},
                          separators=(",", ":"))
        await ws.send(ping)
        print(f"Sent: {ping}", flush=True)
        delay = start + n * interval - time.monotonic()   # fixed schedule, no drift
        if delay > 0:
            await asyncio.sleep(delay)
    # --count: the loop above already listened for one more interval after the last ping.


async def print_incoming(ws) -> None:
    async for message in ws:
        print(f"Received: {show(message)}", flush=True)


async def run(base_url: str, agent_id: str, sid: str, token: str, interval: float,
              count: int | None) -> int:
    url = f"{base_url.rstrip('/')}/{agent_id}/ws/{sid}"
    try:
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                           open_timeout=10, compression=None, max_size=None,
                           ping_interval=20, ping_timeout=20)
    except InvalidStatus as e:
        r = e.response
        body = r.body.decode("utf-8", "replace").strip().replace("\n", " ") if r.body else ""
        print(f"error: handshake refused by {url}: HTTP {r.status_code} {r.reason_phrase}"
              + (f": {body[:200]}" if body else ""), file=sys.stderr)
        return 1
    except (InvalidURI, ValueError) as e:  # urllib raises ValueError on e.g. "ws://[::1"
        print(f"error: invalid WSPROXY_URL {base_url!r}: {e}", file=sys.stderr)
        return 1
    except (OSError, InvalidHandshake, TimeoutError) as e:
        reason = str(e) or type(e).__name__
        print(f"error: cannot connect to {url}: {reason}", file=sys.stderr)
        return 1

    print(f"Connected to {url}", file=sys.stderr, flush=True)
    sender = asyncio.create_task(send_pings(ws, interval, count))
    receiver = asyncio.create_task(print_incoming(ws))
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            try:
                sender.result()
            except ConnectionClosed:
                pass   # reported below from the close code
            else:
                await asyncio.wait_for(ws.close(), 5)
                return 0
        await asyncio.wait({receiver}, timeout=5)
        code = ws.close_code
        reason = ws.close_reason or ""
        if code is None or code == 1006:
            print("error: connection lost (closed without a close frame)", file=sys.stderr)
            return 1
        print(f"Connection closed by the server: code {code}" + (f" ({reason})" if reason else ""),
              file=sys.stderr, flush=True)
        return 0 if code in (1000, 1001) else 1
    finally:
        for t in (sender, receiver):
            t.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        if ws.close_code is None:
            try:
                await asyncio.wait_for(ws.close(), 2)
            except (TimeoutError, OSError, ConnectionClosed):
                pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_url = wsproxy_url_from_env()
    return run_until_signal(run(base_url, args.agent_id, args.session_id, args.auth_token,
                                args.interval, args.count))


if __name__ == "__main__":
    run_main(main)
