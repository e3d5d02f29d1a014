"""wsproxy's own small Redis client over hiredis: a command connection and a
pub/sub connection per process, each reconnecting by itself."""

from .commands import CommandClient
from .connection import RedisUnavailable
from .pubsub import PubSub

__all__ = ["CommandClient", "PubSub", "RedisUnavailable"]
