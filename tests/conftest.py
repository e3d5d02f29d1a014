"""Fixtures: real redis-server processes and real wsproxy processes on free loopback ports.

Nothing here touches the Redis on 6379. Every process a fixture starts, it stops,
by its PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class NullEvents:
    """A SessionListener's event sink that ignores everything (in-process tests)."""

    def connected(self, listener) -> None:
        pass

    def disconnected(self, listener) -> None:
        pass

    def too_slow(self, listener) -> None:
        pass


async def publishing_listener(sock, owner):
    """A CommandProtocol on ``sock`` (its Redis end), the Upstream over it, and a
    SessionListener of session ``s-1`` that publishes through it, for in-process tests.
    Returns (transport, protocol, listener)."""
    from wsproxy import _fastpath
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock)
    proto = _fastpath.CommandProtocol(owner)
    proto.connection_made(transport)
    upstream = _fastpath.Upstream()
    upstream.proto = proto
    listener = _fastpath.SessionListener(upstream, b"session:s-1:up", 1, "s-1", "a",
                                         NullEvents())
    return transport, proto, listener


async def close_codes(sockets, timeout: float = 10.0) -> list:
    """For each websockets client, the close code the server sent next (``"message"``
    if a message came instead, None for a close without a CLOSE frame)."""
    import asyncio

    import websockets
    codes: list = []
    for ws in sockets:
        try:
            await asyncio.wait_for(ws.recv(), timeout)
            codes.append("message")
        except websockets.ConnectionClosed as exc:
            codes.append(exc.rcvd.code if exc.rcvd else None)
    return codes


class RedisServer:
    """A redis-server process of our own on a free port; can be killed and restarted."""

    def __init__(self, port: int | None = None, password: str | None = None,
                 tls: bool = False, unix_socket: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: install it (apt-get install -y redis-server)"
                        " -- the tests need a real Redis", pytrace=False)
        self.binary = binary
        self.port = port or free_port()
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}"
        self.extra: list[str] = []
        self.tls_port: int | None = None
        self.cert: Path | None = None
        if tls:
            self.cert = self._make_certificate()
            self.tls_port = free_port()
            self.extra += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.cert),
                           "--tls-key-file", str(self.dir / "key.pem"),
                           "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no"]
            self.tls_url = (f"rediss://{auth}127.0.0.1:{self.tls_port}"
                            f"?ssl_ca_certs={self.cert}")
        self.socket_path: Path | None = None
        if unix_socket:
            self.socket_path = self.dir / "redis.sock"
            self.extra += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
            self.unix_url = f"unix://{self.socket_path}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
             "--enable-debug-command", "local",
             *(["--requirepass", self.password] if self.password else []), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._pings, 10, f"redis-server on port {self.port}")

    def _make_certificate(self) -> Path:
        """A self-signed certificate for 127.0.0.1, made with the openssl command."""
        if shutil.which("openssl") is None:
            pytest.fail("the openssl command is needed for the TLS test (apt-get install -y "
                        "openssl)", pytrace=False)
        cert = self.dir / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(self.dir / "key.pem"), "-out", str(cert),
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        return cert

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, password=self.password,
                                    socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        """A new redis-py client on this server."""
        return redis.Redis(port=self.port, password=self.password, socket_timeout=10)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """A ``python -m wsproxy`` process; its log goes to a file the test can read."""

    def __init__(self, redis_url: str, **settings: object) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile(prefix="wsproxy-", suffix=".log",
                                                    delete=False)
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "REDIS_URL")}
        env.update({"HOST": "127.0.0.1", "PORT": str(self.port), "REDIS_URL": redis_url,
                    "LOG_LEVEL": "info", "LOG_FORMAT": "json"})
        env.update({k: str(v) for k, v in settings.items()})
        self.proc = subprocess.Popen([sys.executable, "-m", "wsproxy"], env=env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_for(self._listening, 20, f"wsproxy listening on {self.port}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"wsproxy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """Plain HTTP GET on the proxy: (status, body)."""
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_healthy(self, timeout: float = 10) -> None:
        wait_for(lambda: self.get("/health")[0] == 200, timeout, "wsproxy /health 200")

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        Path(self.log_file.name).unlink(missing_ok=True)
        return self.proc.returncode


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server shared by the tests that do not break it."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(redis_server: RedisServer) -> Iterator[Proxy]:
    """A wsproxy with default settings (short shutdown grace) on the shared Redis."""
    p = Proxy(redis_server.url, SHUTDOWN_GRACE_PERIOD_SECS=1)
    p.wait_healthy()
    yield p
    p.stop()


@pytest.fixture
def make_redis() -> Iterator:
    """Start extra redis-servers a test may kill; all stopped afterwards."""
    started: list[RedisServer] = []

    def make(port: int | None = None, password: str | None = None, tls: bool = False,
             unix_socket: bool = False) -> RedisServer:
        server = RedisServer(port, password, tls, unix_socket)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def make_proxy() -> Iterator:
    """Start a wsproxy with custom settings; stopped afterwards."""
    started: list[Proxy] = []

    def make(redis_url: str, wait_healthy: bool = True, **settings: object) -> Proxy:
        settings.setdefault("SHUTDOWN_GRACE_PERIOD_SECS", 1)
        p = Proxy(redis_url, **settings)
        started.append(p)
        if wait_healthy:
            p.wait_healthy()
        return p

    yield make
    for p in started:
        p.stop()


_counter = iter(range(1, 10**9))


@pytest.fixture
def session_id(request: pytest.FixtureRequest) -> str:
    """A session id unique to this test (and run)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"{name}-{os.getpid()}-{next(_counter)}"
