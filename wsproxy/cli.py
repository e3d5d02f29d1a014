"""``wsproxy`` command line: flags and environment -> Config -> run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .config import SETTINGS, Config, ConfigError


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting; each also read from the environment variable of the same name."""
    parser = argparse.ArgumentParser(
        prog="wsproxy",
        description="WebSocket proxy that turns backends' WebSockets into Redis Pub/Sub. "
                    "Every flag is also an environment variable of the same name "
                    "(--port 4040 = PORT=4040); the flag wins.",
    )
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.name, metavar=setting.name,
                            default=None,
                            help=f"{setting.help} (default: {setting.default})")
    return parser


def load_config(argv: Sequence[str] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Parse ``argv`` over ``environ``; ConfigError names a bad setting."""
    args = build_parser().parse_args(argv)
    return Config.from_sources(vars(args), os.environ if environ is None else environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsproxy`` command."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"wsproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    from . import log
    log.configure(config.log_level, config.log_format)
    if config.workers > 1:
        from .workers import supervise
        return supervise(config)
    return run_single(config)


def run_single(config: Config) -> int:
    """Run one server process on uvloop until it is signalled to stop."""
    import uvloop

    from .server import run_server
    try:
        uvloop.run(run_server(config))
    except OSError as exc:  # the port is taken, or the host is not ours
        print(f"wsproxy: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
