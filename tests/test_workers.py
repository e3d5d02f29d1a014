"""``--workers 2``: one port, two processes, one view of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from .conftest import close_codes, wait_for


def connect(proxy, sid: str):
    return websockets.connect(f"{proxy.ws_url}/agent1/ws/{sid}",
                              additional_headers={"Authorization": "Bearer tok"})


def log_entries(proxy) -> list[dict]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


def worker_pids(proxy) -> dict[int, int]:
    """worker index -> pid of its latest start."""
    pids = {}
    for e in log_entries(proxy):
        if e["event"] == "worker_started":
            pids[e["worker"]] = e["pid"]
    return pids


def per_worker(proxy, name: str) -> dict[str, float]:
    body = proxy.get("/metrics")[1].decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name:
                out[s.labels.get("worker", "")] = s.value
    return out


def set_tokens(redis_server, sids) -> None:
    pipe = redis_server.client().pipeline(transaction=False)
    for sid in sids:
        pipe.set(f"session:{sid}:auth", "tok")
    pipe.execute()


@pytest.fixture
def two_workers(make_proxy, redis_server):
    p = make_proxy(redis_server.url, WORKERS=2, SHUTDOWN_GRACE_PERIOD_SECS=1)
    wait_for(lambda: len(worker_pids(p)) == 2, 10, "two workers started")
    wait_for(lambda: json.loads(p.get("/health")[1]).get("workers") == 2, 10, "both live")
    return p


async def open_until_both_workers_serve(proxy, sids, sockets) -> dict[str, float]:
    """Open sockets (SO_REUSEPORT spreads them by hash) until each worker has some."""
    for sid in sids:
        sockets.append(await connect(proxy, sid))
        counts = per_worker(proxy, "wsproxy_worker_active_connections")
        if len(sockets) >= 10 and len(counts) == 2 and all(v > 0 for v in counts.values()):
            return counts
    return per_worker(proxy, "wsproxy_worker_active_connections")


def test_connections_spread_and_fan_out_across_workers(two_workers, redis_server, session_id):
    p = two_workers
    shared = f"{session_id}-shared"
    sids = [shared] * 60
    set_tokens(redis_server, [shared])
    r = redis_server.client()

    async def main():
        sockets: list = []
        counts = await open_until_both_workers_serve(p, sids, sockets)
        # Both workers hold a socket of the same session: each subscribed for its own.
        numsub = r.pubsub_numsub(f"session:{shared}:down")[0][1]
        assert r.publish(f"session:{shared}:down", '"to all"') == 2
        got = [await asyncio.wait_for(ws.recv(), 5) for ws in sockets]
        for ws in sockets:
            await ws.close()
        return counts, numsub, got, len(sockets)

    counts, numsub, got, n = asyncio.run(main())
    assert set(counts) == {"0", "1"} and all(v > 0 for v in counts.values())
    assert numsub == 2
    assert got == ['"to all"'] * n


def test_metrics_totals_are_the_sum_over_workers(two_workers, redis_server, session_id):
    p = two_workers
    sids = [f"{session_id}-{i}" for i in range(40)]
    set_tokens(redis_server, sids)
    r = redis_server.client()

    async def main():
        sockets: list = []
        counts = await open_until_both_workers_serve(p, sids, sockets)
        used = sids[:len(sockets)]
        for i, ws in enumerate(sockets):
            for j in range(3):
                await ws.send(f'{{"i":{i},"j":{j}}}')
        for sid in used:
            r.publish(f"session:{sid}:down", '"d"')
            r.publish(f"session:{sid}:down", '"d"')
        for ws in sockets:
            assert [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)] == ['"d"', '"d"']
        await asyncio.sleep(0.3)
        text = p.get("/metrics")[1].decode()
        for ws in sockets:
            await ws.close()
        return counts, len(sockets), text

    counts, n, text = asyncio.run(main())
    assert all(v > 0 for v in counts.values())
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("wsproxy_messages_total", (("direction", "up"),))] == 3 * n
    assert samples[("wsproxy_messages_total", (("direction", "down"),))] == 2 * n
    assert samples[("wsproxy_active_connections", ())] == n
    assert samples[("wsproxy_connections_total", (("status", "101"),))] == n


def test_killed_worker_is_replaced_and_others_keep_working(two_workers, redis_server,
                                                           session_id):
    p = two_workers
    sids = [f"{session_id}-{i}" for i in range(60)]
    set_tokens(redis_server, sids)
    r = redis_server.client()
    pids = worker_pids(p)

    async def main():
        sockets: list = []
        await open_until_both_workers_serve(p, sids, sockets)
        os.kill(pids[0], signal.SIGKILL)
        await asyncio.sleep(0.5)
        alive, dropped = [], 0
        for ws, sid in zip(sockets, sids, strict=False):
            try:
                await asyncio.wait_for(ws.ping(), 2)
                alive.append((ws, sid))
            except (TimeoutError, websockets.ConnectionClosed):
                dropped += 1
        for ws, sid in alive:  # the survivors still get their messages
            assert r.publish(f"session:{sid}:down", '"survivor"') == 1
            assert await asyncio.wait_for(ws.recv(), 5) == '"survivor"'
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wait_for, lambda: worker_pids(p)[0] != pids[0], 10,
                                   "worker 0 restarted")
        await loop.run_in_executor(
            None, wait_for, lambda: per_worker(p, "wsproxy_worker_up").get("0") == 1, 10,
            "worker 0 up again")
        # New connections reach the new worker too.
        fresh: list = []
        counts = await open_until_both_workers_serve(p, sids[len(sockets):], fresh)
        for ws, _ in alive:
            await ws.close()
        for ws in fresh:
            await ws.close()
        return dropped, len(alive), counts

    dropped, survivors, counts = asyncio.run(main())
    assert dropped > 0 and survivors > 0
    assert counts.get("0", 0) > 0
    assert "worker_died" in p.log()
    restarts = per_worker(p, "wsproxy_worker_restarts_total")
    assert restarts[""] == 1
    assert p.proc.poll() is None


def test_sigterm_to_supervisor_closes_every_socket_1001(two_workers, redis_server, session_id):
    p = two_workers
    sids = [f"{session_id}-{i}" for i in range(30)]
    set_tokens(redis_server, sids)

    async def main():
        sockets: list = []
        await open_until_both_workers_serve(p, sids, sockets)
        p.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        codes = await close_codes(sockets)
        return codes, len(sockets), time.monotonic() - started

    codes, n, elapsed = asyncio.run(main())
    assert codes == [1001] * n
    assert p.proc.wait(15) == 0
    assert "Traceback" not in p.log()


def test_workers_that_cannot_start_make_the_supervisor_give_up(make_proxy, redis_server):
    import socket
    import subprocess
    import sys

    from .conftest import free_port
    port = free_port()
    # Someone else holds the port without SO_REUSEPORT: every worker's bind fails.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "WORKERS": "2",
               "REDIS_URL": redis_server.url}
        proc = subprocess.run([sys.executable, "-m", "wsproxy"], env=env, capture_output=True,
                              timeout=60)
    finally:
        blocker.close()
    assert proc.returncode == 1
    assert b"workers_keep_dying" in proc.stdout + proc.stderr


def test_sigterm_while_a_worker_waits_to_be_restarted_stops_everything(two_workers):
    """A worker that dies soon after starting is restarted after a pause; a SIGTERM in
    that pause must stop the supervisor, not start a worker it never signals."""
    p = two_workers

    def deaths() -> int:
        return sum(e["event"] == "worker_died" for e in log_entries(p))

    # Three deaths of worker 0: the first had lived (restarted at once), the next two
    # are quick (a pause of 0.2 s, then 0.4 s, before the restart).
    for n in (1, 2, 3):
        pid = worker_pids(p)[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda n=n: deaths() == n, 10, f"death {n} logged", interval=0.002)
        if n < 3:
            wait_for(lambda pid=pid: worker_pids(p)[0] != pid, 10, "worker 0 restarted")
    p.proc.send_signal(signal.SIGTERM)  # within the 0.4 s pause
    assert p.proc.wait(15) == 0
    for e in log_entries(p):
        if e["event"] == "worker_started":
            with pytest.raises(ProcessLookupError):
                os.kill(e["pid"], 0)
