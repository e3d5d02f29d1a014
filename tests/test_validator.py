"""Tests for the strict JSON and UTF-8 validators of the fast path.

``wsproxy._fastpath.validate_json`` / ``utf8_valid`` wrap ``wsp_json_valid`` /
``wsp_utf8_valid`` from ``wsproxy/_jsonvalid.h``.  Explicit cases pin down the
strictness rules; hypothesis differential tests compare against Python's
``json`` module and ``bytes.decode("utf-8")`` on thousands of generated inputs.
"""

from __future__ import annotations

import json
import json.decoder
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy._fastpath import utf8_valid, validate_json

# Mirrors WSP_JSON_MAX_DEPTH in wsproxy/_jsonvalid.h (see test_max_depth_matches_header).
MAX_DEPTH = 1024

HEADER = Path(__file__).resolve().parent.parent / "wsproxy" / "_jsonvalid.h"

# Generating structured documents costs a few ms per example in hypothesis
# itself, so those tests use 3000 examples (each mutation test checks several
# documents per example); the cheap byte-level strategies get more.
DIFF_SETTINGS = settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHEAP_DIFF_SETTINGS = settings(DIFF_SETTINGS, max_examples=6000)


# ---------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
# Removes complete JSON strings so that brackets inside them are not counted.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


class _Rejected(ValueError):
    pass


def _reject_constant(name: str) -> object:
    raise _Rejected(name)


def _ignore_number(literal: str) -> None:
    return None


def _nesting_depth(text: str) -> int:
    """Max array/object nesting depth (exact for valid JSON, a guess otherwise)."""
    depth = deepest = 0
    for ch in _JSON_STRING.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _contains_surrogate(obj: object) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def json_oracle(data: bytes) -> bool:
    """What validate_json must return, derived from Python's json module.

    Known differences between json.loads and the strict validator, handled here:
    - UTF-8: json.loads(bytes) would auto-detect UTF-16/32 and its "str" input has
      no encoding at all, so decode strictly ourselves first (this also keeps a
      UTF-8 BOM in the text, which json.loads rejects like the validator does).
    - NaN, Infinity, -Infinity are accepted by json.loads: parse_constant raises.
    - Lone surrogate escapes ("\\ud800") are accepted by json.loads and yield a
      str with a surrogate code point; the validator rejects them.  A decoded
      pair becomes one astral code point, and strict UTF-8 decoding cannot
      produce surrogates, so any surrogate left in the result is a lone one.
      object_pairs_hook=list keeps *all* keys and values: with a dict, a
      duplicate key could silently drop a value holding a lone surrogate.
    - Integers longer than sys.get_int_max_str_digits() (4300) make json.loads
      raise ValueError although the text is valid: parse_int/parse_float
      skip the conversion.
    - Nesting deeper than MAX_DEPTH is valid JSON but rejected by design;
      json.loads itself would raise RecursionError far below 100k levels (and,
      with the default recursion limit, already just below MAX_DEPTH).
    - Whitespace: json.loads only skips ' ', '\\t', '\\n', '\\r' (checked in
      test_python_json_whitespace_matches_rfc), the same set as the validator.
    - The "\\u" hex digits: the C scanner json uses checks each digit; the pure
      Python fallback uses int(x, 16), which would accept "\\u 12f" or "\\u1_2f"
      (test_oracle_uses_c_scanstring guards that assumption).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if _nesting_depth(text) > MAX_DEPTH:
        return False
    # json's C scanner recurses once per level and honours the interpreter's
    # recursion limit (1000 by default), which is below MAX_DEPTH.
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, MAX_DEPTH + 200))
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_ignore_number,
            parse_float=_ignore_number,
            object_pairs_hook=list,
        )
    except ValueError:  # JSONDecodeError and _Rejected
        return False
    finally:
        sys.setrecursionlimit(old_limit)
    return not _contains_surrogate(obj)


def utf8_oracle(data: bytes) -> bool:
    try:
        data.decode("utf-8")  # strict: no overlongs, surrogates, > U+10FFFF
    except UnicodeDecodeError:
        return False
    return True


def _case_id(case: object) -> str:
    text = repr(case)
    return text if len(text) <= 40 else f"{text[:30]}...len={len(text)}"


def check_json(data: bytes) -> None:
    expected = json_oracle(data)
    got = validate_json(data)
    assert got is expected, (data, got, expected)
    if got:
        assert utf8_valid(data) is True, data


def test_oracle_uses_c_scanstring() -> None:
    assert json.decoder.scanstring is json.decoder.c_scanstring  # type: ignore[attr-defined]


def test_python_json_whitespace_matches_rfc() -> None:
    for ws in " \t\n\r":
        assert json.loads(f"{ws}1{ws}") == 1
    for other in "\x0b\x0c\x1c\x85\xa0\u2028\u3000\ufeff":
        with pytest.raises(ValueError):
            json.loads(f"{other}1")
        with pytest.raises(ValueError):
            json.loads(f"1{other}")


def test_max_depth_matches_header() -> None:
    if not HEADER.exists():
        pytest.skip("header not available (installed package)")
    match = re.search(r"#define\s+WSP_JSON_MAX_DEPTH\s+(\d+)", HEADER.read_text())
    assert match is not None
    assert int(match.group(1)) == MAX_DEPTH


# ---------------------------------------------------------------------------
# Explicit cases
# ---------------------------------------------------------------------------

VALID_JSON = [
    # scalars at top level
    b"0",
    b"-0",
    b"7",
    b"-7",
    b"1234567890",
    b"0.5",
    b"-0.0",
    b"3.14159",
    b"1e5",
    b"1E5",
    b"1e+5",
    b"1e-5",
    b"1E-05",
    b"-1.25e-10",
    b"0e0",
    b"-0E+0",
    b"1.5e308",
    b"1e400",  # valid grammar, overflows a double: not our business
    b"9" * 5000,  # longer than Python's int-string limit
    b"true",
    b"false",
    b"null",
    b'""',
    b'"abc"',
    b'" "',
    b'"\x7f"',  # DEL is not a control character for JSON
    b'"\\"\\\\\\/\\b\\f\\n\\r\\t"',
    b'"\\u0000"',
    b'"\\u001f"',
    b'"\\u00e9\\u00E9"',
    b'"\\uFFFF\\ufffe"',
    b'"\\ud7ff\\ue000"',
    # valid surrogate pairs
    b'"\\ud83d\\ude00"',
    b'"\\uD83D\\uDE00"',
    b'"\\ud800\\udc00"',
    b'"\\udbff\\udfff"',
    b'"x\\ud83d\\ude00y\\ud83d\\ude00"',
    # raw unicode
    '"é"'.encode(),
    '"中文字符"'.encode(),
    '"😀"'.encode(),
    '"\u0080\u07ff\u0800\ud7ff\ue000\ufffd\uffff\U00010000\U0010ffff"'.encode(),
    '"\u2028\u2029"'.encode(),
    '{"ключ":"значение","🔑":["\u00e9",1]}'.encode(),
    # containers
    b"[]",
    b"{}",
    b"[ ]",
    b"{ }",
    b"[[]]",
    b"[{}]",
    b'{"":{}}',
    b"[1,2,3]",
    b'[1,"a",true,false,null,{},[],-0.5e3]',
    b'{"a":1}',
    b'{"":""}',
    b'{"a":1,"a":2}',  # duplicate keys are allowed by RFC 8259
    b'{"a":1,"b":[true,false,null],"c":{"d":"e","f":[{"g":[]}]}}',
    b'[[[[[["deep"]]]]]]',
    # surrounding / inner whitespace
    b" 1",
    b"1 ",
    b" \t\n\r1 \t\n\r",
    b"\n[\n  1,\n  2\n]\n",
    b' { "a" : [ 1 , 2 ] , "b" : { } } ',
    b'\t"s"\t',
    b"[\r\n]",
    # nesting 500 deep, and exactly at the limit
    b"[" * 500 + b"]" * 500,
    b'{"a":' * 500 + b"1" + b"}" * 500,
    b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
    b'{"a":' * MAX_DEPTH + b"null" + b"}" * MAX_DEPTH,
    b'[{"a":' * (MAX_DEPTH // 2) + b"0" + b"}]" * (MAX_DEPTH // 2),
]

INVALID_JSON = [
    # empty / whitespace only
    b"",
    b" ",
    b"\n",
    b" \t\n\r",
    # truncated documents
    b"[",
    b"[1",
    b"[1,",
    b"[1,2",
    b"{",
    b'{"',
    b'{"a',
    b'{"a"',
    b'{"a":',
    b'{"a":1',
    b'{"a":1,',
    b'{"a":1,"b"',
    b'"',
    b'"abc',
    b'"abc\\',
    b'"abc\\"',
    b'"\\u',
    b'"\\u12',
    b'"\\u123',
    b'"\\u1234',
    b'"\\ud83d',
    b'"\\ud83d\\',
    b'"\\ud83d\\u',
    b'"\\ud83d\\ude0',
    b'"\\ud83d\\ude00',
    b"t",
    b"tru",
    b"fals",
    b"nul",
    b"-",
    b"1e",
    b"1e+",
    b"1E-",
    b"1.",
    b"-0.",
    b'[{"a":[1,{"b":2}]}',
    # trailing garbage
    b"1 2",
    b"1,",
    b"1]",
    b"[]]",
    b"{}}",
    b"[] []",
    b"{}{}",
    b'"a""b"',
    b'"a" "b"',
    b"truex",
    b"true false",
    b"nullnull",
    b"[1]x",
    b"1\x00",
    b"0x10",
    b"1_000",
    b"12a",
    b"1.5.5",
    b"1ee5",
    b"1e5.5",
    b"1e5e5",
    b"[1] ,",
    # NaN / Infinity (accepted by Python's json, not by RFC 8259)
    b"NaN",
    b"-NaN",
    b"nan",
    b"Infinity",
    b"-Infinity",
    b"+Infinity",
    b"inf",
    b"[NaN]",
    b'{"a":Infinity}',
    b"[1,-Infinity]",
    # numbers
    b"01",
    b"-01",
    b"00",
    b"-00",
    b"007",
    b"0.0.0",
    b"+1",
    b"+0",
    b".5",
    b"-.5",
    b"1.e5",
    b"--1",
    b"- 1",
    b"-a",
    b"1e+-5",
    b"\xd9\xa1",  # ARABIC-INDIC DIGIT ONE
    b"\xef\xbc\x91",  # FULLWIDTH DIGIT ONE
    # commas, colons, brackets
    b"[1,]",
    b'{"a":1,}',
    b"[,]",
    b"[,1]",
    b"{,}",
    b"[1,,2]",
    b"[1 2]",
    b"[1}",
    b'{"a":1]',
    b'{"a"}',
    b'{"a" 1}',
    b'{"a"::1}',
    b'{"a":1 "b":2}',
    b'{"a":1,,"b":2}',
    b"{1:2}",
    b"{null:1}",
    b'{"a":}',
    b"{:1}",
    b":",
    b",",
    b"]",
    b"}",
    b"[}",
    b"{]",
    # quotes, comments, other dialects
    b"'a'",
    b"{'a':1}",
    b"{\"a\":'b'}",
    b"{a:1}",
    b"// c\n1",
    b"/* c */ 1",
    b"1 // c",
    b"1 /* c */",
    b"[1 /*x*/]",
    b"# c\n1",
    b"True",
    b"False",
    b"None",
    b"NULL",
    b"undefined",
    b"`a`",
    # invalid escapes
    b'"\\a"',
    b'"\\x41"',
    b'"\\0"',
    b'"\\\'"',
    b'"\\ "',
    b'"\\U0041"',
    b'"\\u"',
    b'"\\u12"',
    b'"\\u12G4"',
    b'"\\u 123"',
    b'"\\u+123"',
    b'"\\u-123"',
    b'"\\u1_23"',
    b'"\\u0x12"',
    b'"\\\xc3\xa9"',
    # lone surrogates: high, low, high followed by something that is not a low
    b'"\\ud800"',
    b'"\\uD800"',
    b'"\\udbff"',
    b'"\\udc00"',
    b'"\\uDFFF"',
    b'"\\ude00\\ud83d"',
    b'"\\ud800x"',
    b'"\\ud800 \\udc00"',
    b'"\\ud800\\u0041"',
    b'"\\ud800\\ud800"',
    b'"\\ud800\\ue000"',
    b'"\\ud800\\n"',
    b'"\\ud800\\\\udc00"',
    b'"\\ud83d\\ude00\\udc00"',
    b'"a\\udc00b"',
    b'{"\\ud800":1}',
    b'{"a":"\\ud800","a":1}',
    b'["\\ud800"]',
    # whitespace that JSON does not allow
    b"\x0b1",
    b"\x0c1",
    b"1\x0c",
    b"[1,\x0b2]",
    b"\xc2\xa01",  # U+00A0
    b"[1,\xe2\x80\xa82]",  # U+2028
    b"\xef\xbb\xbf1",  # UTF-8 BOM
    b"\xef\xbb\xbf{}",
    # non-ASCII outside strings
    b"\xc3\xa9",
    b"[\xc3\xa9]",
    b"1\x80",
    b"\xff",
    # nesting beyond the limit
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1),
]

# Each of these makes a byte string invalid UTF-8, wherever it appears.
INVALID_UTF8 = [
    # overlong encodings
    b"\xc0\x80",
    b"\xc0\xaf",
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xe0\x80\xaf",
    b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\x80",
    b"\xf0\x80\x80\xaf",
    b"\xf0\x8f\xbf\xbf",
    # UTF-16 surrogates encoded as UTF-8 (including a CESU-8 pair)
    b"\xed\xa0\x80",
    b"\xed\xad\xbf",
    b"\xed\xae\x80",
    b"\xed\xbf\xbf",
    b"\xed\xa0\xbd\xed\xb8\x80",
    # above U+10FFFF, and bytes that never occur in UTF-8
    b"\xf4\x90\x80\x80",
    b"\xf4\xbf\xbf\xbf",
    b"\xf5\x80\x80\x80",
    b"\xf7\xbf\xbf\xbf",
    b"\xf8\x88\x80\x80\x80",
    b"\xfc\x84\x80\x80\x80\x80",
    b"\xfe",
    b"\xff",
    # truncated sequences
    b"\xc3",
    b"\xdf",
    b"\xe2",
    b"\xe2\x82",
    b"\xef\xbf",
    b"\xf0",
    b"\xf0\x9f",
    b"\xf0\x9f\x98",
    b"\xf4\x8f\xbf",
    b"\xe2\x82a",
    b"\xf0\x9f\x98a",
    b"\xc3 ",
    # stray continuation bytes
    b"\x80",
    b"\xbf",
    b"\x80\x80",
    b"\xc3\xa9\xa9",
    b"\xe2\x82\xac\xac",
    b"\xf0\x9f\x98\x80\x80",
]

VALID_UTF8_CHARS = [
    "\x7f",
    "\x80",
    "\xe9",
    "\u07ff",
    "\u0800",
    "\u20ac",
    "\ud7ff",
    "\ue000",
    "\ufffd",
    "\uffff",
    "\U00010000",
    "\U0001f600",
    "\U0010ffff",
]


@pytest.mark.parametrize("doc", VALID_JSON, ids=_case_id)
def test_valid_json(doc: bytes) -> None:
    assert validate_json(doc) is True
    assert utf8_valid(doc) is True


@pytest.mark.parametrize("doc", INVALID_JSON, ids=_case_id)
def test_invalid_json(doc: bytes) -> None:
    assert validate_json(doc) is False


@pytest.mark.parametrize("doc", VALID_JSON + INVALID_JSON, ids=_case_id)
def test_explicit_cases_agree_with_oracle(doc: bytes) -> None:
    check_json(doc)


def test_return_types() -> None:
    assert type(validate_json(b"1")) is bool
    assert type(validate_json(b"x")) is bool
    assert type(utf8_valid(b"1")) is bool
    assert type(utf8_valid(b"\xff")) is bool


@pytest.mark.parametrize("code", range(0x20))
def test_control_characters_in_strings(code: int) -> None:
    raw = bytes([code])
    assert validate_json(b'"' + raw + b'"') is False
    assert validate_json(b'"abcdefghijklmnop' + raw + b'qrstuvwxyz"') is False
    assert validate_json(b'{"k' + raw + b'":1}') is False
    # ...but they are fine escaped
    assert validate_json(b'"\\u%04x"' % code) is True


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=_case_id)
def test_invalid_utf8(bad: bytes) -> None:
    assert utf8_valid(bad) is False
    assert validate_json(b'"' + bad + b'"') is False
    assert validate_json(b'["ok", "' + bad + b'"]') is False
    assert validate_json(b'{"' + bad + b'": 1}') is False
    assert validate_json(bad) is False
    # every alignment relative to the 8/16-byte fast paths, followed by ASCII
    # or at the very end of the buffer
    for pad in range(20):
        for tail in (b"", b"z" * 17):
            data = b"a" * pad + bad + tail
            assert utf8_valid(data) is False, data
            assert validate_json(b'"' + data + b'"') is False, data
            assert validate_json(b'"' + data) is False, data


@pytest.mark.parametrize("char", VALID_UTF8_CHARS, ids=_case_id)
def test_valid_utf8_all_alignments(char: str) -> None:
    enc = char.encode()
    for pad in range(20):
        for tail in (b"", b"z" * 17):
            data = b"a" * pad + enc + tail
            assert utf8_valid(data) is True, data
            assert validate_json(b'"' + data + b'"') is True, data
            # truncated multi-byte sequence at the end of the buffer
            for cut in range(1, len(enc)):
                assert utf8_valid(b"a" * pad + enc[:cut]) is False


def test_utf8_simple() -> None:
    assert utf8_valid(b"") is True
    assert utf8_valid(b"\x00") is True  # NUL is valid UTF-8
    assert utf8_valid(bytes(range(128)) * 3) is True
    assert utf8_valid(bytes(range(256))) is False
    assert utf8_valid("héllo wörld – ✓ 😀".encode()) is True
    assert utf8_valid(("a" * 1000 + "é").encode() * 100) is True
    assert utf8_valid(b"a" * 1000 + b"\x80") is False


@pytest.mark.parametrize("pad", range(20))
@pytest.mark.parametrize(
    "special, ok",
    [
        (b'\\"', True),
        (b"\\\\", True),
        (b"\\n", True),
        (b"\\u00e9", True),
        (b"\\ud83d\\ude00", True),
        ("é".encode(), True),
        ("😀".encode(), True),
        (b"\\ud83d", False),
        (b"\\q", False),
        (b"\x1f", False),
        (b"\x00", False),
        (b'"', False),  # ends the string early: the rest is garbage
        (b"\xed\xa0\x80", False),
    ],
)
def test_string_specials_at_every_offset(pad: int, special: bytes, ok: bool) -> None:
    """Specials landing anywhere inside / across the 8-byte string fast path."""
    for tail in (0, 1, 7, 8, 9, 17):
        doc = b'"' + b"x" * pad + special + b"y" * tail + b'"'
        assert validate_json(doc) is ok, doc
        assert validate_json(b'{"k":' + doc + b"}") is ok, doc


def test_deep_nesting_rejected_quickly() -> None:
    n = 100_000
    docs = [
        b"[" * n,
        b"[" * n + b"]" * n,
        b'{"a":' * n,
        b'{"a":' * n + b"1" + b"}" * n,
        b'[{"a":' * n + b"1" + b"}]" * n,
        b"{" * n,
        b" [" * n,
    ]
    start = time.perf_counter()
    for _ in range(10):
        for doc in docs:
            assert validate_json(doc) is False
    # Rejection happens at depth MAX_DEPTH + 1, so this is microseconds; the
    # bound only catches accidental O(n^2) behaviour or full scans.
    assert time.perf_counter() - start < 2.0


def test_depth_limit_boundary() -> None:
    for opener, closer in ((b"[", b"]"), (b'{"k":', b"}")):
        inner = b"" if opener == b"[" else b"0"
        for depth in (1, 2, MAX_DEPTH - 1, MAX_DEPTH):
            assert validate_json(opener * depth + inner + closer * depth) is True
        for depth in (MAX_DEPTH + 1, MAX_DEPTH + 2, 5000):
            assert validate_json(opener * depth + inner + closer * depth) is False
    # depth is about nesting, not about the number of containers
    assert validate_json(b"[" + b"[]," * 100_000 + b"[]]") is True
    assert validate_json(b"[" + b"[[]]," * 2000 + b"[" * (MAX_DEPTH - 1) + b"]" * MAX_DEPTH) is True


def test_large_documents() -> None:
    doc = json.dumps(
        [{"id": i, "name": f"user {i} ✓", "tags": ["a", "b\n"], "v": i / 7} for i in range(20_000)]
    ).encode()
    assert len(doc) > 1_000_000
    assert validate_json(doc) is True
    assert validate_json(doc[:-1]) is False
    assert validate_json(doc + b",") is False
    big_string = json.dumps("ascii and ünïcödé 😀 " * 50_000, ensure_ascii=False).encode()
    assert validate_json(big_string) is True
    assert validate_json(big_string[:-1]) is False


# ---------------------------------------------------------------------------
# Differential tests (hypothesis)
# ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=20,
)

_whitespace = st.text(alphabet=" \t\n\r", max_size=3)


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    value = draw(json_values)
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 1, 2, "\t", " \r"])),
        separators=draw(
            st.sampled_from([None, (",", ":"), (", ", ": "), (" , ", " : "), ("\t,\n", "\r:\t")])
        ),
        sort_keys=draw(st.booleans()),
    )
    return (draw(_whitespace) + text + draw(_whitespace)).encode("utf-8")


_interesting_bytes = st.sampled_from(
    b'[]{}:,"\\/ -+.0123456789eEuUtrfalsn\t\n\r\x00\x01\x1f\x7f'
    b"\x80\xa0\xbf\xc0\xc1\xc2\xdf\xe0\xed\xef\xf0\xf4\xf5\xff"
) | st.integers(0, 255)


@st.composite
def mutated_documents(draw: st.DrawFn) -> list[bytes]:
    """A valid document followed by 1-5 successively mutated versions of it."""
    doc = bytearray(draw(json_documents()))
    versions = [bytes(doc)]
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        pos = draw(st.integers(0, len(doc)))
        if op == "insert":
            doc[pos:pos] = bytes([draw(_interesting_bytes)])
        elif op == "truncate":
            del doc[pos:]
        elif pos < len(doc):
            if op == "delete":
                del doc[pos]
            else:
                doc[pos] = draw(_interesting_bytes)
        versions.append(bytes(doc))
    return versions


# Fragments that combine into near-valid documents far more often than random
# bytes do: every grammar rule, escapes, surrogate halves, and bad UTF-8.
_JSON_TOKENS = [
    b"[", b"]", b"{", b"}", b",", b":", b'"', b'"', b'"k"', b'"\xc3\xa9"',
    b"\\", b"\\u", b"\\n", b"\\/", b"\\x", b"d83d", b"DE00", b"dbff", b"dc00",
    b"0041", b"12", b"0", b"1", b"9", b"-", b"+", b".", b"e", b"E", b"x",
    b"true", b"false", b"null", b"NaN", b"Infinity", b"tru", b"nul",
    b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x00", b"\x1f", b"\x7f", b"'", b"/", b"*",
    b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"\xd9\xa1",
    b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xff",
]  # fmt: skip

token_documents = st.lists(st.sampled_from(_JSON_TOKENS), max_size=40).map(b"".join)

_escape_pieces = st.sampled_from(
    [
        "a", "é", "😀", " ", '\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t",
        "\\u0041", "\\u00e9", "\\u001F", "\\uffff", "\\uD7FF", "\\ue000",
        "\\ud83d", "\\uD83D", "\\ude00", "\\uDE00", "\\udbff", "\\udfff",
        "\\ud800", "\\udc00", "\\u", "\\u12", "\\x", "\\", "\x01",
    ]
)  # fmt: skip

escape_documents = st.lists(
    st.lists(_escape_pieces, max_size=12).map(lambda parts: '"' + "".join(parts) + '"'),
    min_size=1,
    max_size=4,
).map(lambda strings: ("[" + ",".join(strings) + "]").encode())


# Raw string contents: arbitrary bytes plus pieces that matter to the string
# scanner, so that control characters, quotes, backslashes and (in)valid UTF-8
# land at every offset of the 8-byte fast path and of the buffer's tail.
_string_pieces = st.sampled_from(
    [
        b"abcdefgh", b"x", b"\\", b'\\"', b'"', b"\\u00e9", b"\\ud83d\\ude00", b"\\ud83d",
        b"\x00", b"\x1f", b"\x7f", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80",
        b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
    ]
)  # fmt: skip


@st.composite
def string_documents(draw: st.DrawFn) -> bytes:
    content = b"".join(draw(st.lists(_string_pieces | st.binary(max_size=3), max_size=16)))
    prefix, suffix = draw(
        st.sampled_from([(b'"', b'"'), (b'["', b'", 1]'), (b'{"', b'":1}'), (b'"', b"")])
    )
    return prefix + content + suffix


@DIFF_SETTINGS
@given(json_documents())
def test_generated_documents_are_valid(doc: bytes) -> None:
    assert json_oracle(doc) is True, doc
    assert validate_json(doc) is True, doc


@DIFF_SETTINGS
@given(st.text(alphabet=st.characters(categories=["Cs", "Ll", "Lo", "So", "Cc"])))
def test_surrogate_text_differential(text: str) -> None:
    """Python strs containing surrogates (paired or not) escaped by json.dumps."""
    check_json(json.dumps(text).encode())
    check_json(json.dumps({text: [text]}, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@DIFF_SETTINGS
@given(mutated_documents())
def test_mutated_documents_differential(docs: list[bytes]) -> None:
    assert validate_json(docs[0]) is True
    for doc in docs[1:]:
        check_json(doc)


@CHEAP_DIFF_SETTINGS
@given(token_documents)
def test_token_documents_differential(doc: bytes) -> None:
    check_json(doc)


@DIFF_SETTINGS
@given(escape_documents)
def test_escape_documents_differential(doc: bytes) -> None:
    check_json(doc)


@CHEAP_DIFF_SETTINGS
@given(string_documents())
def test_string_documents_differential(doc: bytes) -> None:
    check_json(doc)


@CHEAP_DIFF_SETTINGS
@given(st.binary(max_size=64))
def test_binary_differential(data: bytes) -> None:
    check_json(data)


# --- utf8_valid vs bytes.decode("utf-8") ---

_UTF8_PIECES = [
    b"a", b"abcdefg", b"abcdefghijklmnopq", b"\x00", b"\x7f",
    b"\xc2\x80", b"\xc3\xa9", b"\xdf\xbf", b"\xe0\xa0\x80", b"\xe2\x82\xac", b"\xed\x9f\xbf",
    b"\xee\x80\x80", b"\xef\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf0\x9f\x98\x80", b"\xf4\x8f\xbf\xbf",
    b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xc2", b"\xe0", b"\xe0\x9f", b"\xed", b"\xed\xa0",
    b"\xf0", b"\xf0\x8f", b"\xf4", b"\xf4\x90", b"\xf5", b"\xff",
]  # fmt: skip


@CHEAP_DIFF_SETTINGS
@given(st.binary(max_size=80))
def test_utf8_binary_differential(data: bytes) -> None:
    assert utf8_valid(data) is utf8_oracle(data), data


@CHEAP_DIFF_SETTINGS
@given(st.text())
def test_utf8_encoded_text_is_valid(text: str) -> None:
    assert utf8_valid(text.encode()) is True


@CHEAP_DIFF_SETTINGS
@given(st.lists(st.sampled_from(_UTF8_PIECES), max_size=30).map(b"".join))
def test_utf8_pieces_differential(data: bytes) -> None:
    assert utf8_valid(data) is utf8_oracle(data), data


@DIFF_SETTINGS
@given(st.text(), st.integers(min_value=0), st.binary(min_size=1, max_size=4))
def test_utf8_spliced_differential(text: str, where: int, junk: bytes) -> None:
    enc = text.encode()
    pos = where % (len(enc) + 1)
    data = enc[:pos] + junk + enc[pos:]
    assert utf8_valid(data) is utf8_oracle(data), data
