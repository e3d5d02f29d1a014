#!/usr/bin/env python3
"""Store a session's bearer token in Redis, as a backend does before a client connects.

    python examples/auth_token_setter.py <session_id> <token> [--ttl SECS]

Writes the token to `session:{session_id}:auth`. wsproxy compares the client's
`Authorization: Bearer <token>` (or `?access_token=`) with it in constant time and,
on success, gives the key a TTL (AUTH_GRACE_PERIOD_SECS) so reconnections keep working
for a while and the key then disappears by itself.

Environment: REDIS_URL (default redis://127.0.0.1:6379).
Exit codes: 0 token stored, 1 Redis error, 2 wrong arguments.
"""
from __future__ import annotations

import argparse
import sys

import redis
from _common import positive_int, redis_url_from_env, run_main, safe_url, session_id, token


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="auth_token_setter.py",
        usage="%(prog)s <session_id> <token> [--ttl SECS]",
        description="SET session:{session_id}:auth to the token wsproxy will require.",
        epilog="Environment: REDIS_URL (default redis://127.0.0.1:6379)")
    p.add_argument("session_id", type=session_id, help="session id, e.g. test-session-123")
    p.add_argument("token", type=token, help="bearer token the client will present")
    p.add_argument("--ttl", type=positive_int, metavar="SECS",
                   help="expire the key after SECS seconds (default: no expiry until the proxy "
                        "sets its grace period)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = redis_url_from_env()
    key = f"session:{args.session_id}:auth"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as e:
        print(f"error: invalid REDIS_URL {safe_url(url)!r}: {e}", file=sys.stderr)
        return 1
    try:
        client.set(key, args.token, ex=args.ttl)
    except (redis.RedisError, OSError) as e:
        print(f"error: cannot store the token in Redis at {safe_url(url)}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    ttl = f", expires in {args.ttl}s" if args.ttl else ""
    print(f"Auth token set for session {args.session_id!r} (key {key}{ttl})", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
