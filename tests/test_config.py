"""Tests for wsproxy's configuration: defaults, environment, flags, validation, --help.

The expected defaults are copied from SPEC.md's "Configuration" table, not from the code,
so a drift between the two fails here. Start-up errors are checked on the real command
(``python -m wsproxy``) because what the user sees is its exit code and stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.cli import build_parser, load_config
from wsproxy.config import SETTINGS, Config, ConfigError, parse_redis_url

ROOT = Path(__file__).resolve().parent.parent

# SPEC.md, "Configuration": variable -> (default as written in --help, parsed value).
SPEC_DEFAULTS: dict[str, tuple[str, object]] = {
    "HOST": ("0.0.0.0", "0.0.0.0"),
    "PORT": ("4040", 4040),
    "REDIS_URL": ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
    "AUTH_TIMEOUT_SECS": ("2", 2),
    "AUTH_GRACE_PERIOD_SECS": ("10800", 10800),
    "WS_PING_INTERVAL_SECS": ("15", 15),
    "WS_PING_TIMEOUT_SECS": ("30", 30),
    "MAX_MESSAGE_SIZE_BYTES": ("1048576", 1048576),
    "MAX_BUFFER_SIZE_BYTES": ("10485760", 10485760),
    "MAX_CONNECTIONS": ("50000", 50000),
    "SHUTDOWN_GRACE_PERIOD_SECS": ("30", 30),
    "LOG_LEVEL": ("info", "info"),
    "LOG_FORMAT": ("json", "json"),
}

# A valid value other than the default for each variable, and what it parses to.
OTHER_VALUES: dict[str, tuple[str, object]] = {
    "HOST": ("127.0.0.2", "127.0.0.2"),
    "PORT": ("5001", 5001),
    "REDIS_URL": ("redis://10.1.2.3:6380/2", "redis://10.1.2.3:6380/2"),
    "AUTH_TIMEOUT_SECS": ("0.5", 0.5),
    "AUTH_GRACE_PERIOD_SECS": ("60", 60),
    "WS_PING_INTERVAL_SECS": ("5", 5.0),
    "WS_PING_TIMEOUT_SECS": ("45", 45.0),
    "MAX_MESSAGE_SIZE_BYTES": ("2048", 2048),
    "MAX_BUFFER_SIZE_BYTES": ("4096", 4096),
    "MAX_CONNECTIONS": ("10", 10),
    "SHUTDOWN_GRACE_PERIOD_SECS": ("1.5", 1.5),
    "LOG_LEVEL": ("debug", "debug"),
    "LOG_FORMAT": ("text", "text"),
}

ALL_NAMES = [s.name for s in SETTINGS]


def flag_of(name: str) -> str:
    """SPEC: the flag has the variable's name: MAX_CONNECTIONS -> --max-connections."""
    return "--" + name.lower().replace("_", "-")


# ---------------------------------------------------------------------------
# defaults, environment, flags


def test_defaults_equal_spec_table() -> None:
    config = load_config([], {})
    for name, (_, expected) in SPEC_DEFAULTS.items():
        assert getattr(config, name.lower()) == expected, name


def test_dataclass_defaults_equal_the_documented_defaults() -> None:
    # Code that builds Config() directly must get the same values as the command.
    assert Config() == load_config([], {})


def test_default_redis_address() -> None:
    redis = load_config([], {}).redis
    assert (redis.scheme, redis.host, redis.port, redis.db) == ("redis", "127.0.0.1", 6379, 0)


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_environment_variable_is_read(name: str) -> None:
    text, expected = OTHER_VALUES[name]
    config = load_config([], {name: text})
    assert getattr(config, name.lower()) == expected


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_every_setting_has_a_flag_named_like_the_variable(name: str) -> None:
    text, expected = OTHER_VALUES[name]
    config = load_config([flag_of(name), text], {})
    assert getattr(config, name.lower()) == expected


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_flag_wins_over_environment(name: str) -> None:
    text, expected = OTHER_VALUES[name]
    default_text, _ = SPEC_DEFAULTS[name]
    config = load_config([flag_of(name), text], {name: default_text})
    assert getattr(config, name.lower()) == expected


def test_port_flag_wins_over_port_env() -> None:
    assert load_config(["--port", "5000"], {"PORT": "6000"}).port == 5000
    assert load_config(["--port=5000"], {"PORT": "6000"}).port == 5000
    assert load_config([], {"PORT": "6000"}).port == 6000


def test_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORT", "6001")
    monkeypatch.setenv("MAX_CONNECTIONS", "123")
    config = load_config([])
    assert (config.port, config.max_connections) == (6001, 123)


def test_every_setting_of_the_code_has_its_flag() -> None:
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in list(SPEC_DEFAULTS) + ALL_NAMES:
        assert flag_of(name) in flags, name


@pytest.mark.parametrize("text", ["DEBUG", "Warning", " error "])
def test_log_level_is_case_insensitive(text: str) -> None:
    assert load_config([], {"LOG_LEVEL": text}).log_level == text.strip().lower()


def test_shutdown_grace_period_may_be_zero() -> None:
    assert load_config([], {"SHUTDOWN_GRACE_PERIOD_SECS": "0"}).shutdown_grace_period_secs == 0


# ---------------------------------------------------------------------------
# bad values, in process


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "0"),
        ("PORT", "70000"),
        ("PORT", "http"),
        ("HOST", "  "),
        ("MAX_MESSAGE_SIZE_BYTES", "-1"),
        ("MAX_MESSAGE_SIZE_BYTES", "0"),
        ("MAX_BUFFER_SIZE_BYTES", "abc"),
        ("MAX_CONNECTIONS", "1.5"),
        ("AUTH_TIMEOUT_SECS", "0"),
        ("AUTH_TIMEOUT_SECS", "nan"),
        ("AUTH_TIMEOUT_SECS", "inf"),
        ("AUTH_GRACE_PERIOD_SECS", "-5"),
        ("AUTH_GRACE_PERIOD_SECS", str(10**16)),  # Redis would refuse the EXPIRE
        ("MAX_FRAME_SIZE_BYTES", str(2**63)),  # picows and the fast path hold 64 bits
        ("MAX_MESSAGE_SIZE_BYTES", str(2**64)),
        ("MAX_BUFFER_SIZE_BYTES", str(2**63)),
        ("SHUTDOWN_GRACE_PERIOD_SECS", "-1"),
        ("WS_PING_INTERVAL_SECS", "0"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", "redis://"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "verbose"),
    ],
)
def test_bad_value_raises_config_error_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], {name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "env",
    [
        {"WS_PING_TIMEOUT_SECS": "10"},  # below the default interval of 15
        {"WS_PING_TIMEOUT_SECS": "15"},  # equal to it
        {"WS_PING_INTERVAL_SECS": "40"},  # above the default timeout of 30
    ],
)
def test_ping_timeout_must_exceed_ping_interval(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="WS_PING_TIMEOUT_SECS"):
        load_config([], env)


def test_redis_url_error_never_echoes_the_password() -> None:
    for url in ("redis://:s3cret@h:1/x", "http://user:s3cret@h", "redis://u:s3cret@h:99999"):
        with pytest.raises(ConfigError) as info:
            load_config([], {"REDIS_URL": url})
        assert "REDIS_URL" in str(info.value)
        assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------------------
# bad values, on the real command


def _clean_env(**overrides: str) -> dict[str, str]:
    """The test process' environment without wsproxy settings; never our Redis on 6379."""
    env = {k: v for k, v in os.environ.items() if k not in ALL_NAMES}
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + existing if existing else "")
    # If a bad value were accepted, the server must not bind a public port or reach a
    # real Redis during the few seconds before the timeout kills it.
    env["HOST"] = "127.0.0.1"
    env["REDIS_URL"] = "redis://127.0.0.1:1"
    env.update(overrides)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsproxy", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=15)


@pytest.mark.parametrize(
    ("args", "env", "name"),
    [
        (["--port", "0"], {}, "PORT"),
        ([], {"PORT": "70000"}, "PORT"),
        ([], {"MAX_MESSAGE_SIZE_BYTES": "-1"}, "MAX_MESSAGE_SIZE_BYTES"),
        ([], {"MAX_BUFFER_SIZE_BYTES": "abc"}, "MAX_BUFFER_SIZE_BYTES"),
        ([], {"REDIS_URL": "http://x"}, "REDIS_URL"),
        ([], {"REDIS_URL": "redis://:s3cret@h:1/x"}, "REDIS_URL"),
        ([], {"AUTH_TIMEOUT_SECS": "0"}, "AUTH_TIMEOUT_SECS"),
        ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ([], {"WS_PING_TIMEOUT_SECS": "15"}, "WS_PING_TIMEOUT_SECS"),
        ([], {"WS_PING_TIMEOUT_SECS": "5", "WS_PING_INTERVAL_SECS": "10"},
         "WS_PING_TIMEOUT_SECS"),
        (["--max-connections", "-3"], {"MAX_CONNECTIONS": "100"}, "MAX_CONNECTIONS"),
    ],
)
def test_bad_value_stops_startup_with_one_line(args: list[str], env: dict[str, str],
                                               name: str) -> None:
    result = _run(args, _clean_env(**env))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.endswith("\n")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


def test_help_lists_every_variable_with_its_default() -> None:
    result = _run(["--help"], _clean_env())
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines at the terminal width
    for name, (default, _) in SPEC_DEFAULTS.items():
        # One option entry: "--max-connections MAX_CONNECTIONS <help> (default: 50000)",
        # up to the next "--flag VARIABLE" entry.
        entry = re.search(rf"{re.escape(flag_of(name))} {name} (.*?)(?= --[a-z-]+ [A-Z_]+ |$)",
                          text)
        assert entry is not None, f"{name} not in --help"
        assert f"(default: {default})" in entry.group(1), (name, entry.group(1))


# ---------------------------------------------------------------------------
# parse_redis_url


def test_parse_plain_redis_url() -> None:
    address = parse_redis_url("redis://cache.internal")
    assert (address.scheme, address.host, address.port, address.path) == (
        "redis", "cache.internal", 6379, "")
    assert (address.username, address.password, address.db) == (None, None, 0)


def test_parse_rediss_url_with_port_and_db() -> None:
    address = parse_redis_url("rediss://cache.internal:6380/3")
    assert (address.scheme, address.host, address.port, address.db) == (
        "rediss", "cache.internal", 6380, 3)
    assert address.display == "rediss://cache.internal:6380/3"


def test_parse_unix_socket_url() -> None:
    address = parse_redis_url("unix:///tmp/r.sock")
    assert (address.scheme, address.path, address.db) == ("unix", "/tmp/r.sock", 0)
    assert address.display == "unix:///tmp/r.sock"
    assert parse_redis_url("unix:///tmp/r.sock?db=2").db == 2


def test_parse_credentials_are_url_decoded() -> None:
    address = parse_redis_url("redis://app%40x:pa%3Ass@h:1/2")
    assert (address.username, address.password) == ("app@x", "pa:ss")
    assert (address.host, address.port, address.db) == ("h", 1, 2)


def test_parse_password_only() -> None:
    address = parse_redis_url("redis://:s3cret@h")
    assert (address.username, address.password) == (None, "s3cret")


@pytest.mark.parametrize("url", ["http://h", "h:6379", "", "tcp://h:6379", "redis:/h"])
def test_parse_rejects_bad_scheme_or_missing_host(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


@pytest.mark.parametrize("url", ["redis://h:abc", "redis://h:70000", "redis://h:-1"])
def test_parse_rejects_bad_port(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


def test_parse_rejects_port_zero() -> None:
    # Port 0 is not a Redis port; it must not silently become 6379.
    # Fails until config.py's ``parts.port or 6379`` treats 0 as given.
    with pytest.raises(ValueError):
        parse_redis_url("redis://h:0")


@pytest.mark.parametrize("url", ["redis://h/x", "redis://h/-1", "unix://"])
def test_parse_rejects_bad_db_or_empty_unix_path(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cret@h:1/2", "redis://user:s3cret@h", "rediss://user:s3cret@h:6380/1",
     "unix://:s3cret@/tmp/r.sock"],
)
def test_display_never_contains_the_password(url: str) -> None:
    config = load_config([], {"REDIS_URL": url})
    assert config.redis.password == "s3cret"
    assert "s3cret" not in config.redis.display
    assert "user" not in config.redis.display


@settings(max_examples=200, deadline=None)
@given(password=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1)
       .map(lambda s: "pw-" + s))
def test_display_never_contains_any_password(password: str) -> None:
    config = Config(redis_url=f"redis://default:{password}@redis.example:6390/4")
    assert config.redis.password == password
    assert password not in config.redis.display
    assert config.redis.display == "redis://redis.example:6390/4"


def test_rediss_query_parameters() -> None:
    from wsproxy.config import parse_redis_url

    a = parse_redis_url("rediss://h:6380/1?ssl_ca_certs=%2Fetc%2Fca.pem")
    assert (a.scheme, a.tls_ca_file, a.tls_verify, a.db) == ("rediss", "/etc/ca.pem", True, 1)
    assert parse_redis_url("rediss://h?ssl_cert_reqs=none").tls_verify is False
    with pytest.raises(ValueError):
        parse_redis_url("rediss://h?ssl_cert_reqs=maybe")
