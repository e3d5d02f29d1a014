"""User-space instructions per handshake or per message, counted by callgrind: figures
that do not drift with machine noise, for comparing two versions of a path.

    python benchmarks/instructions.py --sockets 1000                   # per handshake
    python benchmarks/instructions.py --sockets 1000 --phase down      # per message down
    python benchmarks/instructions.py --sockets 1000 --phase up        # per message up

The proxy runs under ``valgrind --tool=callgrind`` with instrumentation off; it is
switched on (``callgrind_control -i on``) for exactly one phase of one
``examples/load_test.py`` run, then off: the connect phase (N sockets, 200 at a time),
or the measured window of a paced run (each socket one message every ``--interval``
seconds, for ``--duration``). Kernel work is not counted: this is the part of the CPU
that the code controls.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--phase", choices=("connect", "down", "up"), default="connect")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between two messages of one socket (down, up)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds of paced messages counted (down, up)")
    args = parser.parse_args()
    counting = args.phase != "connect"
    start, end = ("measure_start", "measure_end") if counting else ("connect_start",
                                                                     "connect_end")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH (apt-get install -y valgrind)")
    harness.pin_self()
    redis = harness.start_redis()
    load_test = harness.load_test_module()
    url = f"redis://127.0.0.1:{redis.port}"
    port = harness.free_port()
    out_dir = tempfile.mkdtemp(prefix="wsproxy-callgrind-")
    out = os.path.join(out_dir, "callgrind.out")
    # Valgrind names its control channel after $USER and $HOST: the proxy's own HOST
    # setting must not be in its environment, or callgrind_control cannot find it.
    env = {k: v for k, v in os.environ.items() if k != "HOST"}
    env.update(REDIS_URL=url, LOG_LEVEL="warning", USER=env.get("USER", "root"))
    log = open(os.path.join(out_dir, "valgrind.log"), "wb")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, "-m", "wsproxy", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)

    def control(switch: str) -> None:
        subprocess.run(["callgrind_control", "-i", switch, str(proc.pid)], env=env,
                       capture_output=True, check=True)

    def on_phase(phase: str) -> None:
        if phase == start:
            control("on")
        elif phase == end:
            control("off")

    import uvloop
    try:
        harness._wait(lambda: harness._healthy(port), 120, "wsproxy under callgrind")
        if counting:
            result = uvloop.run(load_test.run_load_test(
                args.sockets, 1.0, args.duration, args.interval, "127.0.0.1", port,
                redis_url=url, on_phase=on_phase, direction=args.phase))
        else:
            result = uvloop.run(load_test.run_load_test(
                args.sockets, 0.2, 0.5, 5, "127.0.0.1", port, redis_url=url,
                on_phase=on_phase))
    finally:
        proc.terminate()
        proc.wait(60)
        redis.stop()
        log.close()
    total = 0
    for path in glob.glob(out + "*"):
        for line in open(path):
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    if not total or result["connected"] != args.sockets:
        raise SystemExit(f"no count: {result['connected']} connected; see {out_dir}")
    if counting:
        if not result["received"] or result["lost"]:
            raise SystemExit(f"{result['received']} received, {result['lost']} lost; "
                             f"see {out_dir}")
        # Messages counted: those of the measured window (the load test's own count).
        print(f"{result['received']} messages {args.phase}: "
              f"{total / result['received']:,.0f} instructions each "
              f"(callgrind output in {out_dir})")
        return
    print(f"{args.sockets} handshakes: {total / args.sockets:,.0f} instructions each "
          f"(callgrind output in {out_dir})")


if __name__ == "__main__":
    main()
