"""Tests for the HTTP/1.1 gate's pure parts: request heads, upgrade checks, ids, tokens,
and the responses it writes. No sockets: these are the rules, checked one by one.
"""

from __future__ import annotations

import http.client
import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.auth import token_from_request
from wsproxy.http import _ID, _WS_PATH, BadRequest, http_response, parse_request_head
from wsproxy.http import upgrade_problem as _upgrade_problem

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key: 16 bytes in base64
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-"


def upgrade_problem(head: bytes) -> tuple[int, str] | None:
    return _upgrade_problem(parse_request_head(head))


def upgrade_head(version: str = "HTTP/1.1", drop: tuple[str, ...] = (), **replace: str) -> bytes:
    """A browser-like upgrade request; ``replace`` sets headers (``Sec_WebSocket_Key=``)."""
    headers = {
        "Host": "proxy.example:4040",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        "Origin": "https://app.example",
    }
    for name, value in replace.items():
        headers[name.replace("_", "-")] = value
    lines = [f"GET /agent-1/ws/session-1 {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    return "\r\n".join(lines).encode("latin-1")


# ---------------------------------------------------------------------------
# parse_request_head: valid heads


def test_parse_request_line_path_and_query() -> None:
    request = parse_request_head(
        b"GET /agent/ws/sess?access_token=abc&x=1 HTTP/1.1\r\nHost: h")
    assert (request.method, request.path, request.query, request.version) == (
        "GET", "/agent/ws/sess", "access_token=abc&x=1", "HTTP/1.1")


def test_parse_without_query_or_headers() -> None:
    request = parse_request_head(b"GET /health HTTP/1.1")
    assert (request.path, request.query, request.headers) == ("/health", "", {})


def test_parse_query_splits_at_first_question_mark() -> None:
    request = parse_request_head(b"GET /a/ws/b?x=1?y=2 HTTP/1.1")
    assert (request.path, request.query) == ("/a/ws/b", "x=1?y=2")


def test_header_names_are_case_insensitive() -> None:
    request = parse_request_head(
        b"GET / HTTP/1.1\r\nUPGRADE: websocket\r\nsec-websocket-KEY: k\r\nConnection: Upgrade")
    assert request.headers["upgrade"] == "websocket"
    assert request.headers["sec-websocket-key"] == "k"
    assert request.headers["connection"] == "Upgrade"


def test_first_of_repeated_headers_wins() -> None:
    request = parse_request_head(
        b"GET / HTTP/1.1\r\nAuthorization: Bearer first\r\nauthorization: Bearer second")
    assert request.headers["authorization"] == "Bearer first"


def test_header_values_are_trimmed_and_keep_inner_colons() -> None:
    request = parse_request_head(
        b"GET / HTTP/1.1\r\nHost:  proxy.example:4040 \t\r\nX-Empty:\r\nX-Tight:v")
    assert request.headers == {"host": "proxy.example:4040", "x-empty": "", "x-tight": "v"}


def test_http_1_0_head_parses() -> None:
    assert parse_request_head(b"GET /health HTTP/1.0").version == "HTTP/1.0"


# ---------------------------------------------------------------------------
# parse_request_head: malformed heads


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"GET",
        b"GET /",
        b"GET  / HTTP/1.1",           # two spaces
        b"GET / HTTP/1.1 extra",
        b" / HTTP/1.1",               # no method
        b"GET example.com HTTP/1.1",  # target is not a path
        b"GET\t/\tHTTP/1.1",
    ],
)
def test_bad_request_line(head: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_head(head)


@pytest.mark.parametrize(
    "header",
    [
        b"Host example",        # no colon
        b": value",             # empty name
        b"Host : example",      # whitespace before the colon (RFC 9112 5.1: reject)
        b" Host: example",      # leading whitespace
        b"\tHost: example",
        b"",                    # an empty line inside the head
    ],
)
def test_bad_header_line(header: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_head(b"GET / HTTP/1.1\r\nUser-Agent: t\r\n" + header)


@pytest.mark.parametrize("bad", [b"a\x01b", b"a\x00", b"a\x7fb", b"a\nX-Smuggled: 1",
                                 b"a\rb", b"\x1b[31m"])
def test_control_characters_in_a_header_are_rejected(bad: bytes) -> None:
    with pytest.raises(BadRequest, match="control character"):
        parse_request_head(b"GET / HTTP/1.1\r\nX-Odd: " + bad + b"\r\nHost: x")


def test_tab_and_latin1_in_header_values_are_kept() -> None:
    headers = parse_request_head(b"GET / HTTP/1.1\r\nX-A: a\tb\r\nX-B: caf\xe9").headers
    assert headers == {"x-a": "a\tb", "x-b": "caf\u00e9"}


def test_repeated_content_length_is_rejected() -> None:
    with pytest.raises(BadRequest, match="Content-Length"):
        parse_request_head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\ncontent-length: 5")


def test_more_than_128_headers_is_431() -> None:
    many = b"".join(b"\r\nX-%d: v" % i for i in range(129))
    with pytest.raises(BadRequest) as caught:
        parse_request_head(b"GET / HTTP/1.1" + many)
    assert caught.value.status == 431
    assert len(parse_request_head(b"GET / HTTP/1.1" + many[:many.rindex(b"\r\n")]).headers) == 128


@pytest.mark.parametrize("fold", [b" continued", b"\tcontinued", b" x: y"])
def test_obs_fold_is_rejected(fold: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_head(b"GET / HTTP/1.1\r\nX-Long: first part\r\n" + fold)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/2", b"HTTP/0.9", b"FOO/1.1",
                                     b"http/1.1", b"HTTPS/1.1"])
def test_non_http1_version_is_rejected(version: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_head(b"GET / " + version + b"\r\nHost: h")


@pytest.mark.parametrize("version", [b"HTTP/1.", b"HTTP/1.1x", b"HTTP/1.1.1", b"HTTP/1.x"])
def test_malformed_http1_version_is_rejected(version: bytes) -> None:
    # RFC 9112 2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT. Fails until http.py checks
    # more than the "HTTP/1." prefix.
    with pytest.raises(BadRequest):
        parse_request_head(b"GET / " + version + b"\r\nHost: h")


# ---------------------------------------------------------------------------
# upgrade_problem


def test_correct_upgrade_has_no_problem() -> None:
    assert upgrade_problem(upgrade_head()) is None


def test_upgrade_tokens_are_case_insensitive_and_listed() -> None:
    head = upgrade_head(Upgrade="WebSocket", Connection="keep-alive, Upgrade")
    assert upgrade_problem(head) is None


@pytest.mark.parametrize("head", [upgrade_head(drop=("Upgrade",)), upgrade_head(Upgrade="h2c")])
def test_missing_upgrade_is_426(head: bytes) -> None:
    problem = upgrade_problem(head)
    assert problem is not None and problem[0] == 426 and problem[1]


@pytest.mark.parametrize("head", [upgrade_head(Sec_WebSocket_Version="8"),
                                  upgrade_head(drop=("Sec-WebSocket-Version",))])
def test_wrong_websocket_version_is_426(head: bytes) -> None:
    problem = upgrade_problem(head)
    assert problem is not None and problem[0] == 426 and problem[1]


@pytest.mark.parametrize(
    "head",
    [
        upgrade_head(drop=("Sec-WebSocket-Key",)),
        upgrade_head(Sec_WebSocket_Key=""),
        upgrade_head(Sec_WebSocket_Key="not base64!!"),
        upgrade_head(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAA"),  # 15 bytes
        upgrade_head(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAAAAAAAA=="),  # 19 bytes
        upgrade_head(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAAA\xe9=="),  # beyond ASCII
    ],
)
def test_bad_or_missing_key_is_400(head: bytes) -> None:
    problem = upgrade_problem(head)
    assert problem is not None and problem[0] == 400 and problem[1]


def test_http_1_0_upgrade_is_400() -> None:
    problem = upgrade_problem(upgrade_head(version="HTTP/1.0"))
    assert problem is not None and problem[0] == 400


def test_connection_without_upgrade_is_400() -> None:
    problem = upgrade_problem(upgrade_head(Connection="keep-alive"))
    assert problem is not None and problem[0] == 400


# ---------------------------------------------------------------------------
# agent_id / session_id


def ids_accepted(agent_id: str, session_id: str) -> bool:
    """Would the path /{agent_id}/ws/{session_id} reach the handshake?"""
    match = _WS_PATH.fullmatch(f"/{agent_id}/ws/{session_id}")
    return match is not None and match.groups() == (agent_id, session_id) and all(
        _ID.fullmatch(part) for part in match.groups())


VALID_ID = st.from_regex(r"[A-Za-z0-9._~-]{1,128}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(VALID_ID)
def test_valid_ids_are_accepted(value: str) -> None:
    assert _ID.fullmatch(value)
    assert ids_accepted(value, value)
    assert ids_accepted("agent", value)
    assert ids_accepted(value, "session")


INVALID_ID = st.builds(
    lambda head, bad, tail: head + bad + tail,
    st.text(alphabet=ID_CHARS, max_size=40),
    st.characters().filter(lambda c: c not in ID_CHARS),
    st.text(alphabet=ID_CHARS, max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(INVALID_ID)
def test_ids_with_other_characters_are_refused(value: str) -> None:
    assert not _ID.fullmatch(value)
    assert not ids_accepted("agent", value)
    assert not ids_accepted(value, "session")


@pytest.mark.parametrize("value", ["a" * 129, "", "a b", "a/b", "a%20b", "é", "a\n", "a?b",
                                   "a+b", "ä", "١"])
def test_invalid_id_examples(value: str) -> None:
    assert not _ID.fullmatch(value)


def test_id_length_limits() -> None:
    assert _ID.fullmatch("a")
    assert _ID.fullmatch("Z" * 128)
    assert _ID.fullmatch("A-z_0.9~" * 16)
    assert not _ID.fullmatch("a" * 129)


@pytest.mark.parametrize("path", ["/a/ws/b/", "/a/ws/b/c", "/a/b/ws/c", "/a/wss/b", "a/ws/b",
                                  "/a/ws"])
def test_other_paths_do_not_match_the_websocket_route(path: str) -> None:
    assert _WS_PATH.fullmatch(path) is None


# ---------------------------------------------------------------------------
# token_from_request


@pytest.mark.parametrize("authorization", ["Bearer tok-123", "bearer tok-123",
                                           "BEARER tok-123", "Bearer   tok-123 ",
                                           " Bearer tok-123"])
def test_bearer_header(authorization: str) -> None:
    assert token_from_request(authorization, "") == "tok-123"


def test_access_token_query() -> None:
    assert token_from_request(None, "access_token=tok-123") == "tok-123"
    assert token_from_request(None, "x=1&access_token=tok-123&y=2") == "tok-123"


def test_access_token_query_is_url_decoded() -> None:
    assert token_from_request(None, "access_token=a%2Bb%2F%3Dc%20d") == "a+b/=c d"


def test_header_is_preferred_over_query() -> None:
    assert token_from_request("Bearer from-header", "access_token=from-query") == "from-header"


def test_query_is_used_when_header_is_not_bearer() -> None:
    assert token_from_request("Basic xyz", "access_token=from-query") == "from-query"


@pytest.mark.parametrize(
    ("authorization", "query"),
    [
        (None, ""),
        ("", ""),
        ("Bearer", ""),
        ("Bearer   ", ""),
        ("Basic xyz", ""),
        ("Bearerxyz", ""),
        (None, "access_token="),
        (None, "access_token"),
        (None, "token=abc"),
        (None, "ACCESS_TOKEN=abc"),
        ("", "x=1"),
    ],
)
def test_no_token(authorization: str | None, query: str) -> None:
    assert token_from_request(authorization, query) is None


# ---------------------------------------------------------------------------
# http_response


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
        return self._file


def read_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Parse with the standard library's client, as a real client would."""
    response = http.client.HTTPResponse(_FakeSocket(raw))  # type: ignore[arg-type]
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b'{"status":"healthy"}'), (404, b'{"error":"not found"}'), (503, b""),
     (400, "é → ü".encode())],
)
def test_http_response_content_length_matches_body(status: int, body: bytes) -> None:
    raw = http_response(status, body)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert rest == body
    assert raw.startswith(f"HTTP/1.1 {status} ".encode())
    code, headers, parsed_body = read_response(raw)
    assert code == status
    assert int(headers["content-length"]) == len(body)
    assert parsed_body == body
    assert headers["connection"].lower() == "close"
    assert headers["content-type"] == "application/json"


def test_http_response_extra_headers_and_content_type() -> None:
    raw = http_response(401, b"missing bearer token", "text/plain",
                        (("WWW-Authenticate", 'Bearer realm="wsproxy"'),
                         ("Sec-WebSocket-Version", "13")))
    code, headers, body = read_response(raw)
    assert code == 401
    assert headers["www-authenticate"] == 'Bearer realm="wsproxy"'
    assert headers["sec-websocket-version"] == "13"
    assert headers["content-type"] == "text/plain"
    assert headers["connection"].lower() == "close"
    assert body == b"missing bearer token"
    # One response, nothing after the body.
    assert raw.endswith(b"\r\n\r\nmissing bearer token")
    assert raw.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize(("status", "reason"), [(426, "Upgrade Required"),
                                                (504, "Gateway Timeout"), (403, "Forbidden")])
def test_http_response_reason_phrase(status: int, reason: str) -> None:
    status_line = http_response(status, b"").split(b"\r\n", 1)[0]
    assert status_line == f"HTTP/1.1 {status} {reason}".encode()


# ---------------------------------------------------------------------------
# parse_head (compiled) against a plain-Python statement of the same rules

_REF_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REF_VERSION = re.compile(r"HTTP/1\.[0-9]")


def reference_parse(head: bytes) -> tuple[str, str, str, dict[str, str]] | str:
    """The head rules written the obvious way: the result, or the error message."""
    text = head.decode("latin-1")
    if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n", text):
        return "control character in the request head"
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return "malformed request line"
    method, target, version = parts
    if not _REF_VERSION.fullmatch(version):
        return "unsupported HTTP version"
    if not target.startswith("/"):
        return "request target must be a path"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _REF_TOKEN.fullmatch(name):
            return "malformed header line"
        name = name.lower()
        if name in headers:
            if name == "content-length":
                return "repeated Content-Length"
            continue
        headers[name] = value.strip(" \t")
    return method, target, version, headers


_HEAD_PIECES = st.sampled_from([
    b"GET", b"HEAD", b" ", b"/", b"/a/ws/b?x=1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2",
    b"\r\n", b"Host", b"Content-Length", b"content-length", b":", b": ", b"\t", b"x",
    b"V a l", b"\xe9", b"\x00", b"\x01", b"\r", b"\n", b"\x7f", b"(", b"0",
])


@settings(max_examples=3000)
@given(st.lists(_HEAD_PIECES, max_size=30).map(b"".join) | st.binary(max_size=60))
def test_parse_head_follows_the_reference_rules(head: bytes) -> None:
    from wsproxy._fastpath import HeadError, parse_head
    expected = reference_parse(head)
    if isinstance(expected, str):
        with pytest.raises(HeadError) as caught:
            parse_head(head)
        assert str(caught.value) == expected
    else:
        assert parse_head(head) == expected


@pytest.mark.parametrize("head", [
    upgrade_head(),
    b"GET /a/ws/b?access_token=t HTTP/1.1\r\nX-Empty:\r\nX-Pad: \t v \t\r\nHOST: h\r\nhost: 2",
])
def test_parse_head_matches_the_reference_on_real_heads(head: bytes) -> None:
    from wsproxy._fastpath import parse_head
    assert parse_head(head) == reference_parse(head)
