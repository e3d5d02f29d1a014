"""wsproxy.redis.connection: the reconnect schedule and URL-driven hello commands."""

from __future__ import annotations

import itertools

from wsproxy._fastpath import encode_command
from wsproxy.config import parse_redis_url
from wsproxy.redis.connection import BACKOFF_CAP_SECS, BACKOFF_FIRST_SECS, backoff_delays


def test_backoff_grows_exponentially_is_capped_and_jittered():
    delays = list(itertools.islice(backoff_delays(), 200))
    ceiling = BACKOFF_FIRST_SECS
    for d in delays:
        assert ceiling / 2 <= d <= ceiling  # full jitter in the upper half of the step
        ceiling = min(BACKOFF_CAP_SECS, ceiling * 2)
    assert max(delays) <= BACKOFF_CAP_SECS
    tail = delays[50:]
    assert len(set(tail)) > 100  # jittered: reconnecting proxies do not move in lockstep
    assert min(tail) >= BACKOFF_CAP_SECS / 2


def test_hello_commands_follow_the_url():
    from wsproxy.redis.connection import hello_commands

    plain = parse_redis_url("redis://127.0.0.1:6400")
    assert hello_commands(plain, select_db=True) == []
    full = parse_redis_url("redis://user:p%40ss@127.0.0.1:6400/3")
    assert hello_commands(full, select_db=True) == [
        encode_command("AUTH", "user", "p@ss"), encode_command("SELECT", 3)]
    # The pub/sub connection needs no SELECT: channels are not per database.
    assert hello_commands(full, select_db=False) == [encode_command("AUTH", "user", "p@ss")]
    password_only = parse_redis_url("redis://:secret@127.0.0.1:6400")
    assert hello_commands(password_only, select_db=True) == [encode_command("AUTH", "secret")]
