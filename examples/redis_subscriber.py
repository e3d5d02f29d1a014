#!/usr/bin/env python3
"""Play a backend agent: print what a session's client sends, from `session:{session_id}:up`.

    python examples/redis_subscriber.py <session_id>

Prints each message on stdout, one line per message, exactly as wsproxy published it
(line breaks inside a message, which JSON only allows as whitespace, print as spaces), so
the output can be piped, e.g. into `jq`. Status lines go to stderr.
If the Redis connection drops, it reconnects and subscribes again. Ctrl+C stops.

Environment: REDIS_URL (default redis://127.0.0.1:6379).
Exit codes: 0 stopped by Ctrl+C/SIGTERM, 1 Redis unreachable at start, 2 wrong arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

import redis.asyncio as aioredis
from _common import run_main, run_until_signal, safe_url, session_id, valid_redis_url
from redis.exceptions import RedisError

NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="redis_subscriber.py",
        usage="%(prog)s <session_id>",
        description="Print every message on session:{session_id}:up, one per line.",
        epilog="Environment: REDIS_URL (default redis://127.0.0.1:6379). Ctrl+C stops.")
    p.add_argument("session_id", type=session_id, help="session id, e.g. test-session-123")
    return p.parse_args(argv)


def show(data: bytes) -> str:
    text = data.decode("utf-8", errors="backslashreplace")
    return text.translate(NEWLINES) if ("\n" in text or "\r" in text) else text


async def subscribe(url: str, sid: str) -> int:
    channel = f"session:{sid}:up"
    client = aioredis.Redis.from_url(url, socket_connect_timeout=5)
    pubsub = client.pubsub()
    try:
        try:
            await pubsub.subscribe(channel)
        except (RedisError, OSError) as e:
            print(f"error: cannot subscribe to {channel} at {safe_url(url)}: {e}",
                  file=sys.stderr)
            return 1
        out = sys.stdout
        backoff = 0.1
        lost = False
        while True:
            try:
                msg = await pubsub.get_message(timeout=None)
            except (RedisError, OSError) as e:
                # redis-py reconnects and re-subscribes on the next read; just pace the retries.
                if not lost:
                    print(f"Redis connection lost ({e}); reconnecting...", file=sys.stderr,
                          flush=True)
                    lost = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if msg is None:
                continue
            backoff = 0.1
            kind = msg["type"]
            if kind == "message":
                out.write(show(msg["data"]) + "\n")
                out.flush()
            elif kind == "subscribe":
                if lost:
                    print(f"Reconnected; subscribed to {channel} again", file=sys.stderr,
                          flush=True)
                    lost = False
                else:
                    print(f"Subscribed to {channel}; waiting for messages (Ctrl+C to stop)",
                          file=sys.stderr, flush=True)
    finally:
        try:
            await asyncio.wait_for(pubsub.aclose(), 2)
            await asyncio.wait_for(client.aclose(), 2)
        except (TimeoutError, RedisError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = valid_redis_url(aioredis.ConnectionPool.from_url)
    if url is None:
        return 1
    return run_until_signal(subscribe(url, args.session_id))


if __name__ == "__main__":
    run_main(main)
