"""wsproxy: a WebSocket proxy that lets backends replace their own WebSockets with
Redis Pub/Sub. See README.md; the command is ``wsproxy`` (``wsproxy --help``)."""

__version__ = "0.1.0"
