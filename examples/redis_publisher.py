#!/usr/bin/env python3
"""Play a backend agent: publish messages for a client to `session:{session_id}:down`.

    python examples/redis_publisher.py [session_id] [--interval SECS] [--count N]

Every SECS seconds (default 2, first one at once) publishes
`{"type":"data","payload":"Message #N"}` and prints a confirmation with the number of
receivers Redis reported (the wsproxy instances subscribed for that session; 0 means no
client is connected, and the message is lost: Pub/Sub keeps no history).
Stops after N messages with --count, or on Ctrl+C.

Environment: REDIS_URL (default redis://127.0.0.1:6379).
Exit codes: 0 done or stopped by Ctrl+C/SIGTERM, 1 Redis error, 2 wrong arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import redis.asyncio as aioredis
from _common import (
    positive_float,
    positive_int,
    run_main,
    run_until_signal,
    safe_url,
    session_id,
    valid_redis_url,
)
from redis.exceptions import RedisError

DEFAULT_SESSION = "test-session-123"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="redis_publisher.py",
        usage="%(prog)s [session_id] [--interval SECS] [--count N]",
        description="Publish {\"type\":\"data\",\"payload\":\"Message #N\"} to "
                    "session:{session_id}:down at a fixed interval.",
        epilog="Environment: REDIS_URL (default redis://127.0.0.1:6379). Ctrl+C stops.")
    p.add_argument("session_id", nargs="?", default=DEFAULT_SESSION, type=session_id,
                   help=f"session id (default {DEFAULT_SESSION})")
    p.add_argument("--interval", type=positive_float, default=2.0, metavar="SECS",
                   help="seconds between messages (default 2)")
    p.add_argument("--count", type=positive_int, default=None, metavar="N",
                   help="stop after N messages (default: run until Ctrl+C)")
    return p.parse_args(argv)


async def publish(url: str, sid: str, interval: float, count: int | None) -> int:
    channel = f"session:{sid}:down"
    client = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as e:
            print(f"error: cannot reach Redis at {safe_url(url)}: {e}", file=sys.stderr)
            return 1
        print(f"Publishing to {channel} every {interval:g}s"
              + (f", {count} message(s)" if count else ", Ctrl+C to stop"), file=sys.stderr,
              flush=True)
        failures = 0
        n = 0
        start = time.monotonic()
        while count is None or n < count:
            n += 1
            message = json.dumps({"type": "data", "payload": f"Message #{n}"},
                                 separators=(",", ":"))
            try:
                receivers = await client.publish(channel, message)
            except (RedisError, OSError) as e:
                # A backend keeps going when Redis blips; report and try the next one.
                failures += 1
                print(f"error: publishing message #{n} failed: {e}", file=sys.stderr, flush=True)
            else:
                plural = "" if receivers == 1 else "s"
                print(f"Published message #{n} to {channel} ({receivers} receiver{plural}): "
                      f"{message}", flush=True)
            if count is not None and n >= count:
                break
            # Fixed schedule (no drift): message n+1 goes at start + n * interval.
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return 1 if failures else 0
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = valid_redis_url(aioredis.ConnectionPool.from_url)
    if url is None:
        return 1
    return run_until_signal(publish(url, args.session_id, args.interval, args.count))


if __name__ == "__main__":
    run_main(main)
