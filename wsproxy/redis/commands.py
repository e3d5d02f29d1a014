"""The command connection: GET and EXPIRE for auth, PUBLISH for every client message.

One connection per process. Commands are pipelined: each is appended to one write
buffer flushed once a loop iteration, and replies are matched in order
(``wsproxy._fastpath.CommandProtocol``). PUBLISH goes through :attr:`upstream`,
the C-level handle the sockets hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._fastpath import CommandProtocol, Upstream, encode_command
from ..config import RedisAddress
from .connection import (
    ReconnectingLink,
    RedisUnavailable,
    expect_ok,
    hello_commands,
    wait_until,
)


class CommandClient(ReconnectingLink):
    """The process' command connection to Redis, reconnecting by itself."""

    role = "command"

    def __init__(self, address: RedisAddress) -> None:
        super().__init__(address)
        self.upstream = Upstream()

    def make_protocol(self) -> CommandProtocol:
        return CommandProtocol(self)

    async def on_connected(self, proto: Any) -> None:
        for command in hello_commands(self.address, select_db=True):
            await expect_ok(proto.request(command), "AUTH/SELECT")
        await expect_ok(proto.request(encode_command("PING")), "PING")
        self.upstream.proto = proto

    def on_disconnected(self, proto: Any, exc: BaseException | None) -> None:
        if self.upstream.proto is proto:
            self.upstream.proto = None
        proto.fail_pending(RedisUnavailable(str(exc) if exc else "connection closed"))

    def _live(self) -> CommandProtocol:
        proto = self.upstream.proto
        if proto is None or not proto.connected:
            raise RedisUnavailable("not connected to Redis")
        return proto

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        """Send one command and return its reply; an error reply is raised as-is.
        With ``timeout``, TimeoutError once it has passed."""
        fut = self._live().request(encode_command(*args))
        reply = await (fut if timeout is None else wait_until(fut, timeout))
        if isinstance(reply, Exception):
            raise reply
        return reply

    def execute_cb(self, callback: Callable[[Any], None], *args: Any) -> None:
        """Send one command; ``callback(reply)`` runs when it is answered (an error
        reply, or RedisUnavailable if the connection ends first, is the argument).
        Raises RedisUnavailable at once if there is no connection."""
        self._live().request_cb(encode_command(*args), callback)

    def execute_noreply(self, *args: Any) -> None:
        """Send one command whose reply nobody needs (EXPIRE after auth)."""
        self._live().send_noreply(encode_command(*args))

    async def ping(self, timeout: float) -> bool:
        """True if Redis answered PING within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.execute("PING"), timeout) == b"PONG"
        except (TimeoutError, RedisUnavailable, Exception):
            return False
