"""User-space instructions per handshake, counted by callgrind: a figure that does not
drift with machine noise, for comparing two versions of the handshake path.

    python benchmarks/instructions.py --sockets 1000

The proxy runs under ``valgrind --tool=callgrind`` with instrumentation off; it is
switched on (``callgrind_control -i on``) for exactly the connect phase of one
``examples/load_test.py`` run (N sockets, 200 at a time), then off. Kernel work is not
counted: this is the part of a handshake's CPU that the code controls.
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
    args = parser.parse_args()
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
        if phase == "connect_start":
            control("on")
        elif phase == "connect_end":
            control("off")

    import uvloop
    try:
        harness._wait(lambda: harness._healthy(port), 120, "wsproxy under callgrind")
        result = uvloop.run(load_test.run_load_test(
            args.sockets, 0.2, 0.5, 5, "127.0.0.1", port, redis_url=url, on_phase=on_phase))
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
    print(f"{args.sockets} handshakes: {total / args.sockets:,.0f} instructions each "
          f"(callgrind output in {out_dir})")


if __name__ == "__main__":
    main()
