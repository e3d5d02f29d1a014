"""The gates' shared deadline timer: limits fire once, not early, at most about a tick
late, and never for a gate that stopped waiting."""

from __future__ import annotations

import asyncio
import time

from wsproxy.http import Deadlines

TICK = 0.02
# How late a limit may fire here: one tick, plus room for a loaded test machine.
SLACK = TICK + 0.25


class _Gate:
    def __init__(self, deadlines: Deadlines, delay: float) -> None:
        self.fired: list[float] = []
        self.added = time.monotonic()
        self.key = deadlines.add(self, delay)

    def _on_timeout(self) -> None:
        self.fired.append(time.monotonic() - self.added)


async def settle(deadlines: Deadlines, timeout: float = 5.0) -> None:
    """Wait until no gate waits any more (or ``timeout``), then one more tick."""
    end = time.monotonic() + timeout
    while len(deadlines) and time.monotonic() < end:
        await asyncio.sleep(TICK)
    await asyncio.sleep(2 * TICK)


def test_each_limit_fires_once_not_early_and_within_a_tick():
    async def main():
        deadlines = Deadlines(TICK)
        gates = [(delay, _Gate(deadlines, delay)) for delay in (0.0, 0.01, 0.05, 0.13, 0.2)]
        await settle(deadlines)
        return deadlines, gates

    deadlines, gates = asyncio.run(main())
    for delay, gate in gates:
        assert len(gate.fired) == 1, (delay, gate.fired)
        assert delay <= gate.fired[0] < delay + SLACK, (delay, gate.fired)
    assert len(deadlines) == 0


def test_a_removed_gate_never_times_out_and_the_timer_stops():
    async def main():
        deadlines = Deadlines(TICK)
        kept = _Gate(deadlines, 0.05)
        removed = _Gate(deadlines, 0.05)
        deadlines.remove(removed, removed.key)
        await settle(deadlines)
        await asyncio.sleep(0.1)
        return kept, removed, deadlines._timer

    kept, removed, idle_timer = asyncio.run(main())
    assert len(kept.fired) == 1
    assert removed.fired == []
    assert idle_timer is None, "nothing waits: no timer should be armed"


def test_a_failing_timeout_does_not_stop_the_others(caplog):
    class _Broken(_Gate):
        def _on_timeout(self) -> None:
            raise RuntimeError("boom")

    async def main():
        deadlines = Deadlines(TICK)
        _Broken(deadlines, 0.01)
        others = [_Gate(deadlines, 0.01) for _ in range(3)]
        await settle(deadlines)
        return others

    others = asyncio.run(main())
    assert all(len(g.fired) == 1 for g in others)
    assert "handshake timeout failed" in caplog.text


def test_thousands_of_gates_cost_one_timer():
    async def main():
        deadlines = Deadlines(TICK)
        gates = [_Gate(deadlines, 0.03 + (i % 7) * 0.01) for i in range(5000)]
        for gate in gates[::2]:
            deadlines.remove(gate, gate.key)
        armed = deadlines._timer is not None
        waiting = len(deadlines)
        await settle(deadlines)
        return gates, armed, waiting, len(deadlines)

    gates, armed, waiting, left = asyncio.run(main())
    assert armed and waiting == 2500 and left == 0
    assert [len(g.fired) for g in gates] == [0, 1] * 2500


def test_a_gate_ended_by_another_gates_timeout_is_not_timed_out():
    """Two gates due in the same sweep: when the first one's timeout ends the second
    (it stops waiting and removes its deadline), the second is not timed out."""
    class _Ending(_Gate):
        other: _Gate

        def _on_timeout(self) -> None:
            super()._on_timeout()
            deadlines.remove(self.other, self.other.key)

    async def main():
        gates = [_Ending(deadlines, 0.01), _Ending(deadlines, 0.01)]
        gates[0].other, gates[1].other = gates[1], gates[0]
        await settle(deadlines)
        return gates

    deadlines = Deadlines(TICK)
    gates = asyncio.run(main())
    assert sorted(len(g.fired) for g in gates) == [0, 1]
    assert len(deadlines) == 0


class _Counting(Deadlines):
    __slots__ = ("sweeps",)

    def __init__(self, tick: float) -> None:
        super().__init__(tick)
        self.sweeps = 0

    def _sweep(self) -> None:
        self.sweeps += 1
        super()._sweep()


def test_a_deadline_added_by_a_timeout_fires_and_leaves_one_timer():
    """A timeout that starts a new wait (a next phase) gets its own deadline; the
    sweep does not arm a second timer beside the one add() armed (two timers would
    sweep twice a tick), and close() leaves none running."""
    later: list[_Gate] = []

    class _Chaining(_Gate):
        def _on_timeout(self) -> None:
            super()._on_timeout()
            later.append(_Gate(deadlines, 0.4))

    async def main():
        _Chaining(deadlines, 0.0)
        await asyncio.sleep(3 * TICK)  # the first sweep ran: the chained wait began
        sweeps_before = deadlines.sweeps
        await asyncio.sleep(0.2)
        sweeps = deadlines.sweeps - sweeps_before
        await settle(deadlines)
        armed_after = deadlines._timer
        _Gate(deadlines, 10)
        deadlines.close()
        return sweeps, armed_after, deadlines._timer

    deadlines = _Counting(TICK)
    sweeps, armed_after, after_close = asyncio.run(main())
    assert len(later) == 1 and len(later[0].fired) == 1
    assert sweeps <= 0.2 / TICK + 2, f"{sweeps} sweeps in 0.2 s: more than one timer"
    assert armed_after is None and after_close is None
