"""The example programs (examples/*.py), each run as a user runs it: a subprocess against a
live proxy and Redis (fixtures `redis_server` and `proxy` from conftest.py).

The examples play the backend (redis-py) and the browser (a WebSocket client); these tests
check their output and exit codes, and that what they send really crosses the proxy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN_TIMEOUT = 30          # seconds for a short example run
LOAD_TEST_TIMEOUT = 120   # seconds for a load_test run


# --------------------------------------------------------------------------- helpers

def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def example_env(redis_url: str, ws_url: str = "ws://127.0.0.1:1") -> dict[str, str]:
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["WSPROXY_URL"] = ws_url
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("COLUMNS", None)
    return env


def run_example(name: str, *args: str, env: dict[str, str],
                timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


class Running:
    """An example running in the background; its output lines are collected as they come."""

    def __init__(self, name: str, *args: str, env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8")
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._pump, args=(k, s), daemon=True)
                        for k, s in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for t in self.threads:
            t.start()

    def _pump(self, key: str, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines[key].append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pred, stream: str = "stdout", timeout: float = 10.0) -> str:
        """The first line of `stream` for which pred(line) is true; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[stream]:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None
                                 and not any(t.is_alive() for t in self.threads)):
                    pytest.fail(f"{self.name}: no matching {stream} line within {timeout}s; "
                                f"exit={self.proc.poll()} output={self.lines}")
                self.cond.wait(min(left, 0.2))

    def interrupt(self, timeout: float = 10.0, twice_after: float | None = None) -> int:
        """Ctrl+C (twice, ``twice_after`` seconds apart, if given), then the exit code."""
        self.proc.send_signal(signal.SIGINT)
        if twice_after is not None:
            time.sleep(twice_after)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=5)
        return rc

    def text(self, stream: str) -> str:
        with self.cond:
            return "\n".join(self.lines[stream])

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for t in self.threads:
            t.join(timeout=5)


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def open_socket(proxy, agent: str, sid: str, token: str):
    return ws_connect(f"{proxy.ws_url}/{agent}/ws/{sid}",
                      additional_headers={"Authorization": f"Bearer {token}"},
                      open_timeout=10, close_timeout=5)


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rust's Debug format for Duration, as in the seed's output block.
DURATION = r"(\d+(?:\.\d+)?)(ns|µs|ms|s)"
UNIT_NS = {"ns": 1, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def duration_ns(text: str) -> float:
    m = re.fullmatch(DURATION, text)
    assert m, f"not a Rust-style duration: {text!r}"
    return float(m.group(1)) * UNIT_NS[m.group(2)]


# --------------------------------------------------------------------------- auth_token_setter

def test_auth_token_setter_stores_the_token(redis_server):
    sid, token = uid("ex-auth"), uid("tok")
    r = run_example("auth_token_setter.py", sid, token, env=example_env(redis_server.url))
    assert r.returncode == 0, r.stderr
    key = f"session:{sid}:auth"
    assert key in r.stdout
    client = redis_server.client()
    assert client.get(key) == token.encode()

    r = run_example("auth_token_setter.py", sid, "other-token", "--ttl", "60",
                    env=example_env(redis_server.url))
    assert r.returncode == 0, r.stderr
    assert client.get(key) == b"other-token"
    assert 0 < client.ttl(key) <= 60


# --------------------------------------------------------------------------- redis_publisher

def test_publisher_messages_reach_the_socket(redis_server, proxy):
    sid, token = uid("ex-pub"), uid("tok")
    redis_server.client().set(f"session:{sid}:auth", token)
    expected = [f'{{"type":"data","payload":"Message #{n}"}}' for n in (1, 2, 3)]
    with open_socket(proxy, "agent1", sid, token) as ws:
        r = run_example("redis_publisher.py", sid, "--interval", "0.2", "--count", "3",
                        env=example_env(redis_server.url, proxy.ws_url))
        assert r.returncode == 0, r.stderr
        got = [ws.recv(timeout=5) for _ in expected]
    assert got == expected
    confirmations = [line for line in r.stdout.splitlines() if line.startswith("Published")]
    assert len(confirmations) == 3, r.stdout
    for n, (line, message) in enumerate(zip(confirmations, expected, strict=True), start=1):
        assert f"#{n}" in line and f"session:{sid}:down" in line and message in line
        m = re.search(r"\((\d+) receivers?\)", line)
        assert m and int(m.group(1)) >= 1, line
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- redis_subscriber

def test_subscriber_prints_what_a_socket_sent(redis_server, proxy):
    sid, token = uid("ex-sub"), uid("tok")
    client = redis_server.client()
    client.set(f"session:{sid}:auth", token)
    channel = f"session:{sid}:up"
    messages = ['{"hello":"world","n":1}', '[1,2,{"nested":true}]', '"just a string"']
    with Running("redis_subscriber.py", sid, env=example_env(redis_server.url)) as sub:
        wait_until(lambda: client.pubsub_numsub(channel)[0][1] >= 1, what="the subscription")
        with open_socket(proxy, "agent1", sid, token) as ws:
            for message in messages:
                ws.send(message)
            for message in messages:
                sub.wait_line(lambda line, m=message: line == m)
        assert sub.interrupt() == 0
        assert "Traceback" not in sub.text("stderr")
    # Exactly the messages, one per line, nothing else on stdout.
    assert sub.lines["stdout"] == messages


# --------------------------------------------------------------------------- ws_bidir_client

def test_bidir_client_pings_go_up_and_downstream_is_printed(redis_server, proxy):
    sid, token = uid("ex-bidir"), uid("tok")
    client = redis_server.client()
    client.set(f"session:{sid}:auth", token)
    pubsub = client.pubsub()
    pubsub.subscribe(f"session:{sid}:up")
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        with Running("ws_bidir_client.py", "agent1", sid, token, "--interval", "0.3",
                     env=example_env(redis_server.url, proxy.ws_url)) as bidir:
            pings = []
            deadline = time.monotonic() + 10
            while len(pings) < 2 and time.monotonic() < deadline:
                m = pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if m is not None:
                    pings.append(json.loads(m["data"]))
            assert len(pings) == 2, f"pings on :up: {pings}; output {bidir.lines}"
            for n, ping in enumerate(pings, start=1):
                assert set(ping) == {"type", "counter", "timestamp"}
                assert ping["type"] == "ping" and ping["counter"] == n
                assert ping["timestamp"].endswith("Z")
                ts = datetime.fromisoformat(ping["timestamp"].replace("Z", "+00:00"))
                assert ts.tzinfo is not None and ts.utcoffset().total_seconds() == 0
                assert abs((datetime.now(UTC) - ts).total_seconds()) < 60
            sent = bidir.wait_line(lambda line: line.startswith("Sent:") and '"counter":1' in line)
            assert json.loads(sent.split("Sent:", 1)[1]) == pings[0]

            down = json.dumps({"type": "data", "payload": f"hello {sid}"}, separators=(",", ":"))
            assert client.publish(f"session:{sid}:down", down) >= 1
            bidir.wait_line(lambda line: line == f"Received: {down}")
            assert bidir.interrupt() == 0
            assert "Traceback" not in bidir.text("stderr")
    finally:
        pubsub.close()


def test_bidir_client_count_stops_by_itself(redis_server, proxy):
    sid, token = uid("ex-bidir-n"), uid("tok")
    redis_server.client().set(f"session:{sid}:auth", token)
    r = run_example("ws_bidir_client.py", "agent1", sid, token, "--interval", "0.2",
                    "--count", "2", env=example_env(redis_server.url, proxy.ws_url))
    assert r.returncode == 0, r.stderr
    sent = [line for line in r.stdout.splitlines() if line.startswith("Sent:")]
    assert [json.loads(line[5:])["counter"] for line in sent] == [1, 2]


def test_bidir_client_refused_handshake_exits_1(redis_server, proxy):
    sid = uid("ex-bidir-403")
    redis_server.client().set(f"session:{sid}:auth", "the-right-token")
    r = run_example("ws_bidir_client.py", "agent1", sid, "a-wrong-token", "--count", "1",
                    env=example_env(redis_server.url, proxy.ws_url))
    assert r.returncode == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "403" in err and "Traceback" not in err, err
    assert "Sent:" not in r.stdout


def test_bidir_client_unreachable_proxy_exits_1(redis_server):
    env = example_env(redis_server.url, f"ws://127.0.0.1:{free_port()}")
    r = run_example("ws_bidir_client.py", "agent1", uid("ex-bidir-down"), "tok", "--count", "1",
                    env=env)
    assert r.returncode == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err


def test_bidir_client_malformed_wsproxy_url_exits_1(redis_server):
    env = example_env(redis_server.url, "ws://[::1")
    r = run_example("ws_bidir_client.py", "agent1", uid("ex-bidir-url"), "tok", "--count", "1",
                    env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: invalid WSPROXY_URL"), r.stderr


# --------------------------------------------------------------------------- arguments, Ctrl+C

BAD_ARGS = [
    ("auth_token_setter.py", []),
    ("auth_token_setter.py", ["only-a-session"]),
    ("auth_token_setter.py", ["bad/session", "token"]),
    ("auth_token_setter.py", ["sid", "token", "extra"]),
    ("redis_publisher.py", ["sid", "extra"]),
    ("redis_publisher.py", ["sid", "--interval", "0"]),
    ("redis_publisher.py", ["sid", "--count", "many"]),
    ("redis_subscriber.py", []),
    ("redis_subscriber.py", ["a", "b"]),
    ("ws_bidir_client.py", []),
    ("ws_bidir_client.py", ["agent1", "sid"]),
    ("ws_bidir_client.py", ["agent1", "sid", "tok", "--interval", "-1"]),
    ("ws_bidir_client.py", ["agent 1", "sid", "tok"]),
    ("load_test.py", []),
    ("load_test.py", ["10", "1", "1", "1", "127.0.0.1"]),
    ("load_test.py", ["ten", "1", "1", "1", "127.0.0.1", "4040"]),
    ("load_test.py", ["10", "1", "0", "1", "127.0.0.1", "4040"]),
    ("load_test.py", ["10", "1", "1", "1", "127.0.0.1", "99999"]),
    ("load_test.py", ["10", "1", "1", "1", "127.0.0.1", "4040", "--direction", "sideways"]),
]


@pytest.mark.parametrize("name,args", BAD_ARGS, ids=[f"{n}:{' '.join(a) or '-'}"
                                                     for n, a in BAD_ARGS])
def test_wrong_arguments_print_usage_and_exit_2(name, args):
    # Nothing is listening at these URLs: argument errors must come before any connection.
    env = example_env("redis://127.0.0.1:1", "ws://127.0.0.1:1")
    r = run_example(name, *args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"usage: {name} "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("twice_after", [None, 0.0, 0.01], ids=["once", "twice", "twice-10ms"])
@pytest.mark.parametrize("which", ["publisher", "subscriber", "bidir"])
def test_ctrl_c_exits_cleanly(redis_server, proxy, which, twice_after):
    sid, token = uid(f"ex-sigint-{which}"), uid("tok")
    redis_server.client().set(f"session:{sid}:auth", token)
    env = example_env(redis_server.url, proxy.ws_url)
    # (command line, start of the line that says it is running, where that line goes)
    args, ready, stream = {
        "publisher": (("redis_publisher.py", sid, "--interval", "0.2"), "Published", "stdout"),
        "subscriber": (("redis_subscriber.py", sid), "Subscribed", "stderr"),
        "bidir": (("ws_bidir_client.py", "agent1", sid, token, "--interval", "0.2"), "Sent:",
                  "stdout"),
    }[which]
    with Running(*args, env=env) as p:
        p.wait_line(lambda line: line.startswith(ready), stream=stream)
        time.sleep(0.3)   # let it get into its waiting/sending loop
        assert p.interrupt(twice_after=twice_after) == 0
        err = p.text("stderr")
    assert "Traceback" not in err and "Error" not in err, err


# --------------------------------------------------------------------------- load_test

def test_load_test_duration_format():
    fmt = load_module("load_test").format_duration
    assert fmt(678_501) == "678.501µs"
    assert fmt(2_636_340) == "2.63634ms"
    assert fmt(2_400_249) == "2.400249ms"
    assert fmt(1_000) == "1µs"
    assert fmt(999) == "999ns"
    assert fmt(1_000_000_000) == "1s"
    assert fmt(1_500_000_000) == "1.5s"
    assert fmt(61_000_000_001) == "61.000000001s"


def test_load_test_pacer_keeps_a_grid_never_wakes_early_and_closes_its_timer():
    # The sender's pacing: each wait ends at its due instant or after, never before
    # (a timerfd on the clock of perf_counter_ns); at most once a tick, on a grid that
    # the time spent between waits does not shift; after a stall, a new grid from now.
    lt = load_module("load_test")
    import asyncio

    def busy(seconds: float) -> None:
        end = time.perf_counter_ns() + int(seconds * 1e9)
        while time.perf_counter_ns() < end:
            pass

    async def main():
        pacer = lt._Pacer(0.01)
        fd = pacer.fd
        early, targets = [], []
        for step in (0.0002, 0.03, 0.0001, -0.01, -0.01, -0.01):
            due = time.perf_counter_ns() + int(step * 1e9)
            await pacer.until(due)
            woke = time.perf_counter_ns()
            early.append(woke - max(due, pacer.target_ns))
            targets.append(pacer.target_ns)
            busy(0.001)  # work between two waits
        busy(0.05)  # a stall of five ticks
        before = time.perf_counter_ns()
        await pacer.until(before - 10**7)
        restarted = pacer.target_ns - before
        pacer.close()
        return fd, pacer.tick_ns, early, targets, restarted

    fd, tick, early, targets, restarted = asyncio.run(main())
    assert all(d >= 0 for d in early), early
    gaps = [b - a for a, b in zip(targets, targets[1:], strict=False)]
    assert all(g >= tick for g in gaps), gaps  # once a tick at most
    assert gaps[-3:] == [tick] * 3, gaps  # already due: the next tick of the grid
    assert 0 <= restarted < tick
    if sys.platform.startswith("linux"):  # elsewhere the loop's timer paces (no fd)
        assert fd >= 0, "no timerfd on Linux"
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the pacer


def check_load_test_run(r: subprocess.CompletedProcess, out: Path, direction: str,
                        redis_server) -> dict:
    """20 workers x (2 s / 0.2 s) messages: the seed's block, every message delivered once
    and in order, the JSON agreeing with the text; returns the JSON figures."""
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    # The seed's block, line by line.
    assert lines[0] == "=== Load Test Results ==="
    total = int(re.fullmatch(r"Total measurements: (\d+)", lines[1]).group(1))
    errors = int(re.fullmatch(r"Errors: (\d+)", lines[2]).group(1))
    assert lines[3] == "" and lines[4] == "Latency Statistics:"
    latency = {}
    labels = ("Min", "Average", "P50", "P95", "P99", "Max")
    for line, label in zip(lines[5:11], labels, strict=True):
        m = re.fullmatch(rf"  {label}:\s+{DURATION}", line)
        assert m, f"bad latency line {line!r}"
        latency[label] = duration_ns(line.split(":", 1)[1].strip())
    assert (latency["Min"] <= latency["P50"] <= latency["P95"] <= latency["P99"]
            <= latency["Max"])
    assert latency["Min"] <= latency["Average"] <= latency["Max"]
    assert 0 < latency["Min"] and latency["Max"] < 10e9

    def figure(label: str) -> str:
        m = re.search(rf"^\s*{label}:\s+(\S+)\s*$", r.stdout, re.MULTILINE)
        assert m, f"no {label!r} line in:\n{r.stdout}"
        return m.group(1)

    # 20 workers x (2 s / 0.2 s) messages, all delivered once, in order.
    assert total == 200 and errors == 0
    assert int(figure("Sent")) == 200
    assert int(figure("Received")) == 200
    assert figure("Delivery ratio") == "100.00%"
    assert int(figure("Lost")) == 0
    assert int(figure("Duplicated")) == 0
    assert int(figure("Out of order")) == 0
    assert f"Direction: {direction}" in lines[lines.index("  Out of order:   0") + 1:]
    assert re.search(r"^Load generator CPU: .*% of one core", r.stdout, re.MULTILINE)

    d = json.loads(out.read_text(encoding="utf-8"))
    assert d["direction"] == direction
    assert d["total_measurements"] == total and d["errors"] == errors
    assert (d["sent"], d["received"], d["lost"], d["duplicated"], d["out_of_order"]) == \
        (200, 200, 0, 0, 0)
    assert d["delivery_ratio_percent"] == 100.0
    assert d["workers"] == 20 and d["connected"] == 20 and d["messages_per_worker"] == 10
    assert d["rate_msgs_per_sec"] == pytest.approx(100.0)
    assert d["cpu_secs"] > 0 and d["cpu_percent"] > 0
    lat = d["latency_ns"]
    assert set(lat) >= {"min", "avg", "p50", "p95", "p99", "p999", "max"}
    assert lat["p99"] <= lat["p999"] <= lat["max"]
    for key, label in (("min", "Min"), ("avg", "Average"), ("p50", "P50"), ("p95", "P95"),
                       ("p99", "P99"), ("max", "Max")):
        assert latency[label] == pytest.approx(lat[key], abs=1), key
    # The printed text is exactly format_results() of the JSON figures.
    assert r.stdout.rstrip("\n") == load_module("load_test").format_results(d)
    # It cleans up after itself: no auth tokens left behind.
    assert redis_server.client().keys("session:lt-*:auth") == []
    return d


def test_load_test_block_and_json(redis_server, proxy, tmp_path):
    out = tmp_path / "load.json"
    r = run_example("load_test.py", "20", "1", "2", "0.2", "127.0.0.1", str(proxy.port),
                    "--json", str(out), env=example_env(redis_server.url, proxy.ws_url),
                    timeout=LOAD_TEST_TIMEOUT)
    d = check_load_test_run(r, out, "down", redis_server)
    assert d["publishers"] == 2 and d["subscribers"] == 0
    assert re.search(r"^Publisher: 2 Redis connection\(s\)", r.stdout, re.MULTILINE)


def messages_up(proxy) -> int:
    status, body = proxy.get("/metrics")
    assert status == 200
    m = re.search(rb'^wsproxy_messages_total\{direction="up"\} (\d+)', body, re.MULTILINE)
    assert m, body
    return int(m.group(1))


def test_load_test_direction_up(redis_server, proxy, tmp_path):
    out = tmp_path / "load-up.json"
    before = messages_up(proxy)
    r = run_example("load_test.py", "20", "1", "2", "0.2", "127.0.0.1", str(proxy.port),
                    "--direction", "up", "--json", str(out),
                    env=example_env(redis_server.url, proxy.ws_url), timeout=LOAD_TEST_TIMEOUT)
    d = check_load_test_run(r, out, "up", redis_server)
    assert d["publishers"] == 0 and d["subscribers"] == 1 and d["subscribed_channels"] == 20
    assert re.search(r"^Senders: the 20 sockets, one scheduler, .* subscriber: 1 Redis "
                     r"connection, 20 channel\(s\)$", r.stdout, re.MULTILINE), r.stdout
    # The 200 messages really went socket -> wsproxy -> PUBLISH :up.
    assert messages_up(proxy) - before >= 200
    # And the subscriber is gone.
    assert redis_server.client().pubsub_channels("session:lt-*:up") == []


def test_load_test_up_subscribes_before_measuring(redis_server, proxy):
    """In process: on_phase brackets the measured window in up mode too, and by
    "measure_start" Redis has every worker's :up channel subscribed."""
    import asyncio

    load_test = load_module("load_test")
    client = redis_server.client()
    phases: list[tuple[str, int]] = []

    def on_phase(phase: str) -> None:
        phases.append((phase, len(client.pubsub_channels("session:lt-*:up"))))

    d = asyncio.run(load_test.run_load_test(
        7, 0, 0.5, 0.1, "127.0.0.1", proxy.port, redis_url=redis_server.url,
        on_phase=on_phase, direction="up"))
    assert [p for p, _ in phases] == ["connect_start", "connect_end", "measure_start",
                                      "measure_end"]
    assert dict(phases)["measure_start"] == 7
    assert d["direction"] == "up" and (d["sent"], d["received"], d["lost"]) == (35, 35, 0)
    assert d["errors"] == 0 and d["total_measurements"] == 35
    with pytest.raises(ValueError):
        asyncio.run(load_test.run_load_test(1, 0, 1, 1, "127.0.0.1", proxy.port,
                                            redis_url=redis_server.url, direction="sideways"))


def test_load_test_keeps_its_garbage_collector_out_of_the_measurement(redis_server, proxy):
    """In process: the collector is off (and the heap frozen) from the warm-up to the
    end of the measurement, so its pauses are not counted as latency, and it is back
    as it was once the run returns."""
    import asyncio
    import gc

    load_test = load_module("load_test")
    seen: dict[str, tuple[bool, int]] = {}

    def on_phase(phase: str) -> None:
        seen[phase] = (gc.isenabled(), gc.get_freeze_count())

    assert gc.isenabled() and gc.get_freeze_count() == 0
    d = asyncio.run(load_test.run_load_test(
        5, 0.1, 0.3, 0.1, "127.0.0.1", proxy.port, redis_url=redis_server.url,
        on_phase=on_phase))
    assert (d["sent"], d["received"], d["lost"]) == (15, 15, 0)
    assert seen["connect_end"][0] is True
    for phase in ("measure_start", "measure_end"):
        enabled, frozen = seen[phase]
        assert enabled is False and frozen > 0, (phase, seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_load_test_up_reports_what_wsproxy_refuses(redis_server, make_proxy, tmp_path):
    # 128-byte messages over a 64-byte limit: wsproxy answers each with an error frame and
    # publishes nothing; the run completes and says so.
    small = make_proxy(redis_server.url, MAX_MESSAGE_SIZE_BYTES=64)
    out = tmp_path / "refused.json"
    r = run_example("load_test.py", "3", "0", "0.4", "0.2", "127.0.0.1", str(small.port),
                    "--direction", "up", "--json", str(out),
                    env=example_env(redis_server.url, small.ws_url), timeout=LOAD_TEST_TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    d = json.loads(out.read_text(encoding="utf-8"))
    assert (d["sent"], d["received"], d["lost"]) == (6, 0, 6)
    assert d["errors_by_type"]["bad_message"] == 6 and d["errors"] == 6
    assert d["delivery_ratio_percent"] == 0.0 and d["total_measurements"] == 0
    assert "Message too large" in " ".join(d["error_samples"])
    assert "Errors: 6" in r.stdout and "Direction: up" in r.stdout


def test_load_test_exits_1_when_no_worker_connects(redis_server):
    port = free_port()   # nothing listens there
    r = run_example("load_test.py", "5", "0", "1", "0.5", "127.0.0.1", str(port),
                    env=example_env(redis_server.url), timeout=LOAD_TEST_TIMEOUT)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Total measurements: 0" in r.stdout and "Errors: 5" in r.stdout
    assert "no worker could connect" in r.stderr and "Traceback" not in r.stderr


def test_load_test_bursts_split_latency_into_the_path_and_the_position():
    # Messages stamped at one tick form a burst: the first arrival of each, and what
    # each later position adds, as medians over the bursts.
    import array
    lt = load_module("load_test")
    stamps = array.array("q", [100, 100, 100, 200, 200, 200, 300, 300, 300, 400])
    latencies = array.array("q", [30_000, 10_000, 20_000,       # first 10 us, +10 us a step
                                  12_000, 52_000, 32_000,       # first 12 us, +20 us
                                  11_000, 15_000, 19_000,       # first 11 us, +4 us
                                  90_000])                      # alone: no step
    bursts = lt._bursts(stamps, latencies)
    assert bursts == {"size_median": 3, "first_p50_ms": 0.012, "step_us": 10.0}
    text = lt.format_results(_results_with(bursts))
    assert "Bursts: 3 messages a tick (median); the first to arrive 0.012ms (P50), " \
           "each later one +10.0us" in text
    assert lt._bursts(array.array("q"), array.array("q")) == {
        "size_median": None, "first_p50_ms": None, "step_us": None}
    alone = {"size_median": 1, "first_p50_ms": 0.1, "step_us": None}
    assert "Bursts" not in lt.format_results(_results_with(alone))


def _results_with(bursts):
    """A complete figures dict for format_results, with these burst figures."""
    return {
        "direction": "down", "total_measurements": 10, "errors": 0, "latency_ns": {},
        "sent": 10, "received": 10, "delivery_ratio_percent": 100.0, "lost": 0,
        "duplicated": 0, "out_of_order": 0, "connected": 2, "workers": 2,
        "connect_secs": 0.1, "messages_per_worker": 5, "rate_msgs_per_sec": 20.0,
        "achieved_rate_msgs_per_sec": 20.0, "payload_size": 128, "publishers": 2,
        "publish_max_lag_ms": 0.1, "publish_no_receivers": 0, "cpu_secs": 0.1,
        "measure_wall_secs": 1.0, "cpu_percent": 10.0, "total_cpu_secs": 0.2,
        "total_wall_secs": 2.0, "bursts": bursts,
    }


def test_load_test_publishes_a_tick_with_one_stamp_in_exact_framing():
    # Down: every message of a tick carries the same send stamp, written into its slot
    # after the commands were built, in a body of exactly the payload size that is
    # valid JSON; the RESP lengths around it stay exact.
    import asyncio
    import json
    from types import SimpleNamespace

    lt = load_module("load_test")
    sent = []

    class Conn:
        def publish_batch(self, blob, n):
            sent.append((bytes(blob), n))

    workers = [SimpleNamespace(wid=w, channel=f"session:s{w}:down".encode())
               for w in range(5)]
    before = time.perf_counter_ns()
    asyncio.run(lt._publish_loop([Conn(), Conn()], workers, 1, before - 10**9, 1.0, 128,
                                 None, lt._Stats()))
    after = time.perf_counter_ns()
    assert [n for _, n in sent] == [3, 2]
    bodies = []
    for blob, n in sent:
        at = 0
        for _ in range(n):  # *3 $7 PUBLISH $len channel $len body, lengths exact
            assert blob.startswith(b"*3\r\n$7\r\nPUBLISH\r\n", at)
            at += len(b"*3\r\n$7\r\nPUBLISH\r\n")
            for _argument in ("channel", "body"):
                assert blob[at:at + 1] == b"$"
                end = blob.index(b"\r\n", at)
                start, size = end + 2, int(blob[at + 1:end])
                assert blob[start + size:start + size + 2] == b"\r\n"
                at = start + size + 2
            bodies.append(blob[start:start + size])
        assert at == len(blob)
    assert all(len(b) == 128 for b in bodies)
    messages = [json.loads(b) for b in bodies]
    assert sorted(m["w"] for m in messages) == list(range(5))
    stamps = {m["t"] for m in messages}
    assert len(stamps) == 1 and before <= stamps.pop() <= after
