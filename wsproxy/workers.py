"""``--workers N``: N worker processes accepting on one port, under a small supervisor.

Each worker is a whole wsproxy (its own event loop, Redis connections and listening
socket bound with ``SO_REUSEPORT``, so the kernel spreads connections over them).
Sessions need nothing shared: each worker subscribes for its own sockets, so a
session's sockets may land on different workers and fan-out still holds.

The supervisor forks the workers before it runs anything else, forwards SIGTERM and
SIGINT (the graceful shutdown applies to all workers together), restarts a worker
that dies (a log line and ``wsproxy_worker_restarts_total``), and gives up with exit
status 1 if workers keep dying right after they start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time

from .config import Config
from .log import log_event, set_context
from .metrics import SharedSlots

# A worker that dies within this long of starting counts as a start-up failure;
# this many of those in a row and the supervisor gives up.
STARTUP_WINDOW_SECS = 2.0
MAX_STARTUP_FAILURES = 5
_PR_SET_PDEATHSIG = 1
_FORWARDED = {signal.SIGTERM, signal.SIGINT}  # what the supervisor passes on


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor disappears (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _run_worker(config: Config, slots: SharedSlots, index: int) -> int:
    """The body of a worker process."""
    import uvloop

    from .server import listening_socket, run_server

    _die_with_parent()
    # Its own process group: a terminal's Ctrl+C reaches the supervisor only, which
    # forwards it once, instead of every worker seeing it twice.
    os.setpgid(0, 0)
    set_context(worker=index)
    try:
        sock = listening_socket(config.host, config.port, reuse_port=True)
    except OSError as exc:
        log_event(logging.ERROR, "worker_listen_failed", port=config.port,
                  error=exc.strerror or str(exc))
        return 1
    uvloop.run(run_server(config, sock=sock, slots=slots, worker=index))
    return 0


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots = SharedSlots(config.workers)
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.started_at: dict[int, float] = {}
        self.stopping = 0
        self.startup_failures = 0

    def spawn(self, index: int) -> None:
        # A signal between fork() and the pid's registration would be forwarded to
        # every worker but this one, and one in the child before it resets its
        # handlers would run the supervisor's _forward there: hold them until both
        # processes are ready for them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                for signum in _FORWARDED:
                    signal.signal(signum, signal.SIG_DFL)
            else:
                self.pids[pid] = index
                self.started_at[index] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        if pid == 0:
            code = 1
            try:
                code = _run_worker(self.config, self.slots, index)
            except BaseException:  # noqa: BLE001 - report, then leave without cleanup
                logging.getLogger("wsproxy").exception("worker crashed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        log_event(logging.INFO, "worker_started", worker=index, pid=pid)

    def _forward(self, signum: int, _frame: object = None) -> None:
        self.stopping += 1
        log_event(logging.INFO, "supervisor_signal", signal=signal.Signals(signum).name,
                  workers=len(self.pids))
        for pid in list(self.pids):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        for signum in _FORWARDED:
            signal.signal(signum, self._forward)
        for index in range(self.config.workers):
            self.spawn(index)
        exit_code = 0
        while self.pids:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            if pid not in self.pids:
                continue
            index = self.pids.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            self.slots.clear_gauges(index)
            if self.stopping:
                if code != 0:
                    exit_code = 1
                log_event(logging.INFO, "worker_stopped", worker=index, pid=pid, code=code)
                continue
            lived = time.monotonic() - self.started_at[index]
            self.startup_failures = self.startup_failures + 1 if lived < STARTUP_WINDOW_SECS \
                else 0
            log_event(logging.ERROR, "worker_died", worker=index, pid=pid, code=code,
                      seconds=round(lived, 3))
            if self.startup_failures >= MAX_STARTUP_FAILURES:
                log_event(logging.ERROR, "workers_keep_dying",
                          failures=self.startup_failures)
                self._forward(signal.SIGTERM)
                self._forward(signal.SIGTERM)  # a second signal: close at once
                exit_code = 1
                continue
            self.slots.count_restart()
            if self.startup_failures:
                time.sleep(min(1.0, 0.1 * 2 ** self.startup_failures))
                if self.stopping:  # signalled meanwhile: the others are stopping
                    continue
            self.spawn(index)
        log_event(logging.INFO, "supervisor_exit", code=exit_code)
        return exit_code


def supervise(config: Config) -> int:
    """Run ``config.workers`` workers until signalled; the process' exit status."""
    return Supervisor(config).run()
