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
import os
import re
import signal
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_SESSION = "test-session-123"
ID_RE = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def session_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"invalid session id {value!r}: use 1-128 characters of A-Z a-z 0-9 . _ ~ -")
    return value


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (x > 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
    return x


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
    return n


def safe_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password:
            host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
            return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        pass
    return url


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


def run_until_signal(coro) -> int:
    """Run `coro`; SIGINT/SIGTERM cancel it cleanly (exit 0), a second one exits at once."""
    async def runner() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def on_signal() -> None:
            nonlocal stopping
            if stopping:
                sys.stdout.flush()
                os._exit(0)
            stopping = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await coro
        except asyncio.CancelledError:
            if not stopping:
                raise
            print("Stopped.", file=sys.stderr, flush=True)
            return 0

    return asyncio.run(runner())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    try:
        aioredis.ConnectionPool.from_url(url)
    except ValueError as e:
        print(f"error: invalid REDIS_URL {safe_url(url)!r}: {e}", file=sys.stderr)
        return 1
    return run_until_signal(publish(url, args.session_id, args.interval, args.count))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C before the event loop took over the signal
        sys.exit(0)
    except BrokenPipeError:  # stdout closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
