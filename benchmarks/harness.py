"""End-to-end measurement harness: Redis and one proxy pinned to cores, load from
``examples/load_test.py`` (imported, not a second load generator), the proxy's own CPU
time read from /proc over exactly the measured window.

As a command it compares servers side by side, alternating A B, then B A:

    python benchmarks/harness.py --servers wsproxy,node_ws,py_websockets --rounds 2 \\
        --workers 1000 --interval 0.05 --duration 10

Peers (``../shared/peers``) need their own set-up first, as their README says:
``python3 -m venv /tmp/peers && /tmp/peers/bin/pip install websockets==17.4 redis==8.1.0
hiredis uvloop orjson`` and ``cp -r ../shared/peers/node_ws /tmp/node_ws && (cd
/tmp/node_ws && npm ci)``; ``PEERS_PYTHON`` and ``NODE_WS_DIR`` point elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT.parent / "shared" / "peers"
PROXY_CORE = "0"
LOAD_CORE = "1"  # the load generator and Redis share the other core
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def load_test_module():
    """``examples/load_test.py``, imported by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "examples" / "load_test.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` (and its reaped children) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / CLOCK_TICKS, (stime + cstime) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _taskset(core: str) -> list[str]:
    return ["taskset", "-c", core] if shutil.which("taskset") else []


def _no_taskset(core: str) -> list[str]:
    return []


@dataclass
class Started:
    """A process started here, stopped by its PID."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_redis() -> Started:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install -y redis-server)")
    port = free_port()
    log = Path(f"/tmp/bench-redis-{port}.log")
    proc = subprocess.Popen(
        _taskset(LOAD_CORE) + [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--maxclients", "60000"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    _wait(lambda: _redis_ping(port), 10, "redis-server")
    return Started(proc, port, log)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def server_command(kind: str, port: int) -> tuple[list[str], Path | None, dict[str, str]]:
    """How to start server ``kind``: (argv, cwd, extra env).

    ``wsproxy@DIR`` is wsproxy from another checkout (its extension built in place:
    ``python setup.py build_ext --inplace`` there), to compare two versions in one run:
    ``git worktree add /tmp/old HEAD~1`` then ``--servers wsproxy,wsproxy@/tmp/old``.
    """
    if kind == "wsproxy":
        return ([sys.executable, "-m", "wsproxy"], None,
                {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning"})
    if kind.startswith("wsproxy@"):
        checkout = Path(kind.split("@", 1)[1]).resolve()
        if not (checkout / "wsproxy" / "__init__.py").is_file():
            raise ValueError(f"{kind!r}: no wsproxy package in {checkout}")
        return ([sys.executable, "-m", "wsproxy"], checkout,
                {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning",
                 "PYTHONPATH": str(checkout)})
    if kind.startswith("wsproxy-workers"):
        n = kind.rsplit("-", 1)[1] if kind.count("-") == 2 else "2"
        return ([sys.executable, "-m", "wsproxy"], None,
                {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning", "WORKERS": n})
    if kind == "py_websockets":
        python = os.environ.get("PEERS_PYTHON", "/tmp/peers/bin/python")
        return ([python, str(PEERS / "py_websockets" / "server.py"), "--port", str(port)], None,
                {})
    if kind == "node_ws":
        directory = Path(os.environ.get("NODE_WS_DIR", "/tmp/node_ws"))
        return (["node", str(directory / "server.js"), "--port", str(port)], directory, {})
    raise ValueError(f"unknown server {kind!r}")


def start_server(kind: str, redis_url: str, env: dict[str, str] | None = None,
                 pin: bool = True) -> Started:
    port = free_port()
    argv, cwd, extra = server_command(kind, port)
    log = Path(f"/tmp/bench-{kind.replace('/', '_')}-{port}.log")
    full_env = {**os.environ, "REDIS_URL": redis_url, **extra, **(env or {})}
    prefix = _taskset(PROXY_CORE) if pin and not kind.startswith("wsproxy-workers") else []
    proc = subprocess.Popen(prefix + argv, cwd=cwd, env=full_env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        _wait(lambda: proc.poll() is None and _healthy(port), 20, f"{kind} /health")
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{kind} did not start:\n{log.read_text()[-2000:]}") from None
    return Started(proc, port, log)


def server_pids(started: Started) -> list[int]:
    """The server's process and its children (the workers of --workers)."""
    pids = [started.proc.pid]
    try:
        children = Path(f"/proc/{started.proc.pid}/task/{started.proc.pid}/children")
        pids += [int(p) for p in children.read_text().split()]
    except OSError:
        pass
    return pids


@dataclass
class Measurement:
    """One run: the load_test figures plus the server's own cost."""

    server: str
    result: dict[str, Any]
    server_cpu_secs: float
    window_secs: float
    rss_before: int = 0
    rss_open: int = 0  # with every socket of the run open
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.server_cpu_secs / self.window_secs if self.window_secs else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        received = self.result["received"]
        return 1e6 * self.server_cpu_secs / received if received else float("nan")

    def summary(self) -> dict[str, Any]:
        lat = self.result["latency_ms"]
        return {
            "server": self.server,
            "rate": self.result["rate_msgs_per_sec"],
            "sent": self.result["sent"],
            "received": self.result["received"],
            "lost": self.result["lost"],
            "p50_ms": lat["p50"], "p95_ms": lat["p95"], "p99_ms": lat["p99"],
            "p999_ms": lat["p999"], "max_ms": lat["max"],
            "burst_first_p50_ms": self.result["bursts"]["first_p50_ms"],
            "burst_step_us": self.result["bursts"]["step_us"],
            "server_cpu_percent": round(self.cpu_percent, 1),
            "server_cpu_us_per_msg": round(self.cpu_us_per_message, 2),
            "loadgen_cpu_percent": self.result["cpu_percent"],
            "connect_secs": self.result["connect_secs"],
            "handshakes_per_sec": round(self.result["connected"] / self.result["connect_secs"], 1)
            if self.result["connect_secs"] else None,
            "rss_per_socket_bytes": round((self.rss_open - self.rss_before)
                                          / self.result["connected"])
            if self.result["connected"] else None,
            **self.extra,
        }


def pin_self() -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {int(LOAD_CORE)})


def measure(server: str, redis: Started, workers: int, warmup: float, duration: float,
            interval: float, payload_size: int = 128, env: dict[str, str] | None = None,
            pin: bool = True, direction: str = "down",
            keep_samples: bool = False, tick: float | None = None) -> Measurement:
    """Start ``server`` fresh, drive one load_test run at it, stop it."""
    load_test = load_test_module()
    redis_url = f"redis://127.0.0.1:{redis.port}"
    started = start_server(server, redis_url, env, pin=pin)
    marks: dict[str, tuple[float, float]] = {}

    rss_open = 0

    user: dict[str, float] = {}

    def on_phase(phase: str) -> None:
        nonlocal rss_open
        pids = server_pids(started)
        splits = [cpu_split(p) for p in pids]
        marks[phase] = (time.perf_counter(), sum(u + s for u, s in splits))
        user[phase] = sum(u for u, _ in splits)
        if phase == "measure_start":  # every socket is open now
            rss_open = sum(rss_bytes(p) for p in pids)

    try:
        rss_before = sum(rss_bytes(p) for p in server_pids(started))
        import uvloop
        result = uvloop.run(load_test.run_load_test(
            workers, warmup, duration, interval, "127.0.0.1", started.port,
            redis_url=redis_url, payload_size=payload_size, on_phase=on_phase,
            direction=direction, keep_samples=keep_samples,
            tick=load_test.TICK if tick is None else tick))
    finally:
        started.stop()
    (t0, c0), (t1, c1) = marks["measure_start"], marks["measure_end"]
    connect_cpu = marks["connect_end"][1] - marks["connect_start"][1]
    user_cpu = user["measure_end"] - user["measure_start"]
    extra = {"direction": direction,
             "server_cpu_us_per_handshake": round(1e6 * connect_cpu / result["connected"], 1)
             if result["connected"] else None,
             # The part of the CPU per message spent in the server's own code (user
             # space); the rest is the kernel's (sends, receives, wake-ups).
             "server_user_us_per_msg": round(1e6 * user_cpu / result["received"], 2)
             if result["received"] else None}
    return Measurement(server, result, c1 - c0, t1 - t0, rss_before, rss_open, extra)


def median_of(runs: list[Measurement], key: str) -> float:
    values = [r.summary()[key] for r in runs if r.summary()[key] is not None]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="wsproxy,node_ws,py_websockets")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--payload", type=int, default=128)
    parser.add_argument("--direction", choices=("down", "up"), default="down")
    parser.add_argument("--tick", type=float, default=None,
                        help="the load generator's pacing step in seconds (its default: "
                             "0.0005)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the scheduler place every process (latency at low load is "
                             "then not set by Redis and the load generator sharing a core)")
    parser.add_argument("--json", help="write every run's summary here")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the servers under test (repeatable), "
                             "e.g. WS_PING_INTERVAL_SECS=15")
    args = parser.parse_args()
    if args.no_pin:
        global _taskset
        _taskset = _no_taskset
    else:
        pin_self()
    settings: dict[str, str] = {}
    for item in args.env:
        name, equals, value = item.partition("=")
        if not name or not equals:
            parser.error("--env takes NAME=VALUE")
        settings[name] = value
    servers = args.servers.split(",")
    runs: dict[str, list[Measurement]] = {s: [] for s in servers}
    redis = start_redis()
    try:
        for round_ in range(args.rounds):
            # A B, then B A: drift hits every server alike, and so does going first
            # in a round (the same two builds measured A B and B A showed the first
            # costing 1.5 to 9 % more CPU a message).
            for server in servers if round_ % 2 == 0 else servers[::-1]:
                m = measure(server, redis, args.workers, args.warmup, args.duration,
                            args.interval, args.payload, env=settings,
                            direction=args.direction, tick=args.tick)
                runs[server].append(m)
                print(f"round {round_ + 1} {json.dumps(m.summary())}", flush=True)
    finally:
        redis.stop()
    keys = ("server_cpu_percent", "server_cpu_us_per_msg", "server_user_us_per_msg",
            "p50_ms", "p99_ms", "p999_ms", "burst_first_p50_ms", "burst_step_us",
            "lost", "handshakes_per_sec", "server_cpu_us_per_handshake", "rss_per_socket_bytes")
    print("\nmedians of", args.rounds, "rounds:", args.direction, f"{args.workers} sockets,",
          f"{args.workers / args.interval:g} msg/s, {args.payload}-byte payloads")
    for server in servers:
        print(server + ": " + ", ".join(f"{k}={median_of(runs[server], k):.3f}" for k in keys))
    # The first server's cost as a fraction of each other's, round by round (a round's
    # servers ran back to back, so machine drift cancels within it).
    first = servers[0]
    for other in servers[1:]:
        for key in ("server_cpu_us_per_msg", "server_cpu_us_per_handshake"):
            ratios = [a.summary()[key] / b.summary()[key]
                      for a, b in zip(runs[first], runs[other], strict=True)
                      if a.summary()[key] and b.summary()[key]]
            if ratios:
                print(f"{first}/{other} {key}: median {statistics.median(ratios):.2f} "
                      f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {s: [m.summary() for m in ms] for s, ms in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
