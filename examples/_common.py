"""What every example program needs; not a program itself.

- `run_main(main)`: the `__main__` entry point (exit with main's code; Ctrl+C before the
  event loop took over the signal exits 0; stdout closed early exits 1, quietly).
- `run_until_signal(coro)`: run the program's main coroutine; SIGINT/SIGTERM cancel it
  cleanly (a status line on stderr, exit 0, no traceback), a second one exits at once.
- argparse types whose errors argparse turns into the usage line and exit code 2:
  `session_id`, `agent_id` (or `ident(kind)`), `token`, `positive_int`, `positive_float`.
- `redis_url_from_env()`, `wsproxy_url_from_env()`: REDIS_URL / WSPROXY_URL, or the
  defaults; `valid_redis_url(parse)`: REDIS_URL checked by the caller's redis-py parser.
- `safe_url(url)`: a URL without its password, for messages.

Standard library only, so that every program can import it whatever it depends on; the
programs find it because their own directory is on sys.path (`python examples/NAME.py`).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_WSPROXY_URL = "ws://127.0.0.1:4040"
ID_RE = re.compile(r"[A-Za-z0-9._~-]{1,128}")   # what the proxy accepts in a URL path


# --------------------------------------------------------------------------- environment

def redis_url_from_env() -> str:
    """REDIS_URL, or the default when it is unset or empty."""
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def valid_redis_url(parse: Callable[[str], object]) -> str | None:
    """`redis_url_from_env()` if `parse` (e.g. redis-py's `ConnectionPool.from_url`) accepts
    it; otherwise print why on stderr and return None (the program then exits 1)."""
    url = redis_url_from_env()
    try:
        parse(url)
    except ValueError as e:
        print(f"error: invalid REDIS_URL {safe_url(url)!r}: {e}", file=sys.stderr)
        return None
    return url


def wsproxy_url_from_env() -> str:
    """WSPROXY_URL, or the default when it is unset or empty."""
    return os.environ.get("WSPROXY_URL") or DEFAULT_WSPROXY_URL


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            user = parts.username or ""
            return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        pass
    return url


# --------------------------------------------------------------------------- argparse types

def ident(kind: str) -> Callable[[str], str]:
    """argparse type for an id (`kind`: "session id", "agent id"): the proxy accepts
    1-128 characters of A-Z a-z 0-9 . _ ~ -"""
    def check(value: str) -> str:
        if not ID_RE.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"invalid {kind} {value!r}: use 1-128 characters of A-Z a-z 0-9 . _ ~ -")
        return value
    return check


session_id = ident("session id")
agent_id = ident("agent id")


def token(value: str) -> str:
    """argparse type for a bearer token: non-empty printable text without spaces."""
    if not value or any(c.isspace() for c in value) or not value.isprintable():
        raise argparse.ArgumentTypeError(
            "the token must be non-empty printable text without spaces")
    return value


def positive_int(value: str) -> int:
    """argparse type: an integer > 0."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
    return n


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (x > 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
    return x


# --------------------------------------------------------------------------- running

def run_until_signal(coro: Coroutine[Any, Any, int], *, stopped: str = "Stopped.",
                     uvloop: bool = False) -> int:
    """Run `coro` and return its exit code. SIGINT/SIGTERM cancel it cleanly: `stopped` is
    printed on stderr and the code is 0; a second signal exits at once. With `uvloop`, runs
    on uvloop when it is installed."""
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
            print(stopped, file=sys.stderr, flush=True)
            return 0
        finally:
            # The work is done and the program is about to exit: a late signal must not
            # kill it mid-teardown (the loop would restore the default action on close).
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)

    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:
            pass
        else:
            return _uvloop.run(runner())
    return asyncio.run(runner())


def run_main(main: Callable[[], int]) -> NoReturn:
    """The `if __name__ == "__main__":` of every program: exit with main()'s code."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C before the event loop took over the signal
        sys.exit(0)
    except BrokenPipeError:  # stdout closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
