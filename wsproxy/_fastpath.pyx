# cython: language_level=3
"""wsproxy's compiled core: the per-message paths, in C.

- up: picows frame (pointer + size) -> JSON/UTF-8 validation in place ->
  RESP ``PUBLISH`` appended to the command connection's write buffer, flushed once a
  loop iteration; replies matched FIFO to their sockets.
- down: Redis bytes -> ``message`` replies read where they lie in the read buffer ->
  channel lookup in a C index (RouteTable) -> one ``send()`` per socket (a frame up
  to 2 KiB put together on the stack) or one ``sendmsg()`` straight from that buffer.
  Replies of any other kind are cut out at their boundary and read by hiredis.
- the upgrade: for a request the gate has checked, the 101 and picows' protocol set
  to read frames (``accept_upgrade``), without picows parsing the request again.

Nothing here awaits; everything that is not per message lives in plain Python.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Realloc
from cpython.object cimport PyCallable_Check
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memchr, memcmp, memcpy, memset
from cpython.unicode cimport PyUnicode_DecodeLatin1

from picows.picows cimport MemoryBuffer, WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

import collections
import os
import weakref
from binascii import b2a_base64
from hashlib import sha1

import hiredis
from picows.picows import WSProtocol as PicowsProtocol  # internal: see accept_upgrade

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    cdef struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    ssize_t send(int fd, const void* buf, size_t size, int flags)
    ctypedef unsigned int socklen_t
    int setsockopt(int fd, int level, int optname, const void* optval, socklen_t optlen)
    int getsockopt(int fd, int level, int optname, void* optval, socklen_t* optlen)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR

cdef extern from * nogil:
    void __builtin_prefetch(const void* addr)

cdef extern from "_jsonvalid.h" nogil:
    int wsp_utf8_valid(const unsigned char *p, size_t n)
    int wsp_json_valid(const unsigned char *p, size_t n)


# ---------------------------------------------------------------------------
# Validators, exposed for tests and benchmarks.

def validate_json(const unsigned char[:] data not None) -> bool:
    """True if ``data`` is one strict RFC 8259 JSON text in valid UTF-8."""
    if data.shape[0] == 0:
        return False
    return wsp_json_valid(&data[0], <size_t>data.shape[0]) == 1


def utf8_valid(const unsigned char[:] data not None) -> bool:
    """True if ``data`` is valid UTF-8 (no overlongs, no surrogates)."""
    if data.shape[0] == 0:
        return True
    return wsp_utf8_valid(&data[0], <size_t>data.shape[0]) == 1


# ---------------------------------------------------------------------------
# Counters

# In the order of the C_* constants in _fastpath.pxd.
COUNTER_NAMES = (
    "messages_down", "bytes_down", "messages_up", "bytes_up", "errors_invalid_json",
    "errors_too_large", "errors_binary", "errors_upstream_unavailable", "errors_protocol",
    "backpressure_disconnects", "ping_timeouts",
)


cdef class Stats:
    """Hot-path counters as C integers; read by metrics.py on scrape."""

    def __cinit__(self):
        memset(self.own, 0, sizeof(self.own))
        self.c = self.own
        self.keep = None

    def bind(self, buffer, Py_ssize_t offset) -> None:
        """Keep the counters in ``buffer`` (writable, e.g. shared memory) from byte
        ``offset`` on, continuing from the values already there."""
        cdef unsigned char[::1] view = buffer
        if offset < 0 or offset + N_COUNTERS * sizeof(long long) > view.shape[0]:
            raise ValueError("counter slot outside the buffer")
        self.keep = view
        self.c = <long long*>&view[offset]

    def snapshot(self) -> dict:
        """The counters as a dict of name -> int."""
        return {name: self.c[i] for i, name in enumerate(COUNTER_NAMES)}


cdef Stats STATS = Stats()
stats = STATS


# Settings the hot path needs, set once by configure().
cdef Py_ssize_t g_max_message = 1048576
cdef Py_ssize_t g_max_buffer = 10485760
cdef bytes g_err_too_large = b'{"error":"Message too large","max_size":1048576}'
# A coarse clock, advanced by the heartbeat sweeper: marking activity per frame
# costs a store, not a clock read.
cdef double g_now = 0.0

cdef bytes ERR_INVALID_JSON = b'{"error":"Invalid JSON format"}'
cdef bytes ERR_BINARY = b'{"error":"Binary messages not supported"}'
cdef bytes ERR_UNAVAILABLE = b'{"error":"Upstream unavailable"}'


def configure(Py_ssize_t max_message, Py_ssize_t max_buffer) -> None:
    """Set the message and buffer limits used by every socket."""
    global g_max_message, g_max_buffer, g_err_too_large
    g_max_message = max_message
    g_max_buffer = max_buffer
    g_err_too_large = b'{"error":"Message too large","max_size":%d}' % max_message


def set_clock(double now) -> None:
    """Advance the coarse clock that frames stamp as their socket's last activity."""
    global g_now
    g_now = now


# ---------------------------------------------------------------------------
# HTTP request heads (the gate's first step for every connection)

class HeadError(ValueError):
    """A request head that is not HTTP/1.x we can read; the message says why."""


cdef unsigned char _TOKEN_CHAR[256]   # RFC 9110 tchar
cdef unsigned char _CONTROL_CHAR[256]  # CTLs but HTAB; CR and LF count outside a CRLF
cdef int _c
for _c in range(256):
    _TOKEN_CHAR[_c] = (48 <= _c <= 57 or 65 <= _c <= 90 or 97 <= _c <= 122
                       or _c in b"!#$%&'*+-.^_`|~")
    _CONTROL_CHAR[_c] = (_c < 32 and _c != 9) or _c == 127


cdef inline Py_ssize_t _line_end(const unsigned char* p, Py_ssize_t start, Py_ssize_t n) noexcept:
    # Index of the next CRLF at or after start, or n.
    cdef Py_ssize_t i
    for i in range(start, n - 1):
        if p[i] == 13 and p[i + 1] == 10:
            return i
    return n


def parse_head(bytes head):
    """Split a request head (without its final CRLF CRLF) into
    ``(method, target, version, headers)``; header names lower-case, the first of
    repeated headers kept, values trimmed of spaces and tabs. Raises HeadError.

    One pass in C over the bytes: the same rules as a split/regex parse in Python,
    at a fraction of the instructions (it runs for every connection)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t i, end, sp1 = -1, sp2 = -1, start, colon, vs, ve
    cdef unsigned char c
    cdef dict headers = {}
    for i in range(n):
        c = p[i]
        if _CONTROL_CHAR[c]:
            if c == 13 and i + 1 < n and p[i + 1] == 10:
                continue
            if c == 10 and i > 0 and p[i - 1] == 13:
                continue
            raise HeadError("control character in the request head")
    end = _line_end(p, 0, n)
    for i in range(end):
        if p[i] == 32:
            if sp1 < 0:
                sp1 = i
            elif sp2 < 0:
                sp2 = i
            else:
                raise HeadError("malformed request line")
    if sp1 <= 0 or sp2 < 0 or sp2 == sp1 + 1:
        raise HeadError("malformed request line")
    if not (end - sp2 - 1 == 8 and memcmp(p + sp2 + 1, b"HTTP/1.", 7) == 0
            and 48 <= p[end - 1] <= 57):
        raise HeadError("unsupported HTTP version")
    if p[sp1 + 1] != 47:  # '/'
        raise HeadError("request target must be a path")
    start = end + 2
    while start <= n:
        end = _line_end(p, start, n)
        colon = -1
        for i in range(start, end):
            if p[i] == 58:  # ':'
                colon = i
                break
            if not _TOKEN_CHAR[p[i]]:
                break
        if colon <= start:
            raise HeadError("malformed header line")
        name = PyUnicode_DecodeLatin1(<const char*>p + start, colon - start, NULL).lower()
        if name in headers:
            if name == "content-length":
                raise HeadError("repeated Content-Length")
        else:
            vs = colon + 1
            ve = end
            while vs < ve and (p[vs] == 32 or p[vs] == 9):
                vs += 1
            while ve > vs and (p[ve - 1] == 32 or p[ve - 1] == 9):
                ve -= 1
            headers[name] = PyUnicode_DecodeLatin1(<const char*>p + vs, ve - vs, NULL)
        start = end + 2
    return (PyUnicode_DecodeLatin1(<const char*>p, sp1, NULL),
            PyUnicode_DecodeLatin1(<const char*>p + sp1 + 1, sp2 - sp1 - 1, NULL),
            PyUnicode_DecodeLatin1(<const char*>p + sp2 + 1, 8, NULL),
            headers)


cdef class SocketOptions:
    """Integer socket options of one fd, set and read with the system calls directly.

    picows' connection_made sets two options and reads five (for a log line) on the
    transport's socket; uvloop's socket object builds a Python socket for each call,
    which was 12 % of a handshake's instructions. wsproxy.http gives picows this instead.
    """

    cdef int fd

    def __init__(self, int fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def setsockopt(self, int level, int option, int value):
        cdef int v = value
        if setsockopt(self.fd, level, option, &v, sizeof(v)) != 0:
            raise OSError(errno, os.strerror(errno))

    def getsockopt(self, int level, int option):
        cdef int v = 0
        cdef socklen_t size = sizeof(v)
        if getsockopt(self.fd, level, option, &v, &size) != 0:
            raise OSError(errno, os.strerror(errno))
        return v


cdef class TransportForPicows:
    """The connection's transport as picows is given it.

    Everything passes through to the uvloop transport, except ``get_extra_info
    ("socket")``: that answers with :class:`SocketOptions` on the same fd, so picows'
    connection_made (TCP_NODELAY, TCP_QUICKACK, five options read for a log line)
    costs seven plain system calls instead of seven Python socket objects. The
    methods picows binds or calls per frame are the transport's own, bound once.
    Compiled so that picows' and the listener's calls on it cost no Python frame.
    """

    cdef readonly object transport
    cdef readonly SocketOptions socket
    cdef readonly int fd
    cdef public object write, writelines, get_write_buffer_size, close, abort, is_closing

    def __init__(self, transport):
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()
        self.socket = SocketOptions(self.fd)
        self.write = transport.write
        self.writelines = transport.writelines
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.close = transport.close
        self.abort = transport.abort
        self.is_closing = transport.is_closing

    def get_extra_info(self, name, default=None):
        if name == "socket":
            return self.socket
        return self.transport.get_extra_info(name, default)

    def set_write_buffer_limits(self, high=None, low=None):
        self.transport.set_write_buffer_limits(high, low)

    def __getattr__(self, name):
        return getattr(self.transport, name)


# ---------------------------------------------------------------------------
# RESP encoding

cdef inline int _append(bytearray buf, const char* data, Py_ssize_t size) except -1:
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, old + size)
    memcpy(PyByteArray_AS_STRING(buf) + old, data, size)
    return 0


cdef inline int _ndigits(size_t v) noexcept:
    cdef int n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline int _resp_header(char* out, char kind, Py_ssize_t size) noexcept:
    # "<kind><size>\r\n": '*' for an array, '$' for a bulk string.
    cdef int n = _ndigits(<size_t>size), i
    cdef size_t v = <size_t>size
    out[0] = kind
    for i in range(n, 0, -1):
        out[i] = <char>(48 + v % 10)
        v //= 10
    out[n + 1] = 13
    out[n + 2] = 10
    return n + 3


def encode_command(*args) -> bytes:
    """RESP-encode one command; str arguments are UTF-8 encoded, ints in decimal.

    Sized first, then written into one bytes object: bytes %-formatting showed in
    the handshake profile (three commands a handshake)."""
    cdef list items = []
    cdef bytes item
    cdef Py_ssize_t size, total = 3 + _ndigits(<size_t>len(args))
    for arg in args:
        if type(arg) is bytes:
            item = <bytes>arg
        elif isinstance(arg, str):
            item = (<str>arg).encode()
        elif isinstance(arg, int):
            item = str(int(arg)).encode()
        else:
            item = bytes(arg)
        items.append(item)
        size = PyBytes_GET_SIZE(item)
        total += 5 + _ndigits(<size_t>size) + size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)  # not shared yet: writing into it is safe
    cdef Py_ssize_t pos = _resp_header(p, 42, len(items))
    for item in items:
        size = PyBytes_GET_SIZE(item)
        pos += _resp_header(p + pos, 36, size)
        memcpy(p + pos, PyBytes_AS_STRING(item), size)
        pos += size
        p[pos] = 13
        p[pos + 1] = 10
        pos += 2
    return out


def publish_prefix(bytes channel) -> bytes:
    """The constant head of ``PUBLISH channel <payload>``: the payload's length follows."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (len(channel), channel)


def encode_publish(bytes channel, bytes payload) -> bytes:
    """RESP ``PUBLISH channel payload``, as the upstream path writes it."""
    cdef bytearray out = bytearray(publish_prefix(channel))
    out += b"$%d\r\n" % len(payload)
    out += payload
    out += b"\r\n"
    return bytes(out)


# ---------------------------------------------------------------------------
# Redis connections

# ---------------------------------------------------------------------------
# Redis replies: where each one ends, found in the read buffer itself
#
# A reply the connection handles itself (a pub/sub ``message``, the integer a PUBLISH
# returns) is read straight from the buffer, with no Python object made. Any other
# reply is cut out at its boundary and handed to hiredis, alone, for its Python form.

cdef enum:
    RESP_MAX_DEPTH = 32
    NEED_MORE = -2  # the buffer ends inside this reply
    NOT_MINE = -1   # fast_reply: not a reply it reads in place; _read_length: malformed

cdef inline Py_ssize_t _read_length(const char* p, Py_ssize_t pos, Py_ssize_t n,
                                    Py_ssize_t* value) noexcept:
    """Read "<digits>\r\n" (or "-1\r\n") at ``pos``; return the index after it,
    NEED_MORE, or NOT_MINE when it is not a length."""
    cdef Py_ssize_t v = 0, start = pos
    cdef char c
    if pos < n and p[pos] == 45:  # "-": only "-1", a null bulk or array
        if pos + 1 >= n:
            return NEED_MORE
        if p[pos + 1] != 49:
            return NOT_MINE
        pos += 2
        v = -1
    else:
        while pos < n:
            c = p[pos]
            if c < 48 or c > 57:
                break
            if pos - start >= 18:
                return NOT_MINE
            v = v * 10 + (c - 48)
            pos += 1
        if pos == start and pos < n:
            return NOT_MINE
    if pos + 1 >= n:
        return NEED_MORE
    if p[pos] != 13 or p[pos + 1] != 10:
        return NOT_MINE
    value[0] = v
    return pos + 2


cdef inline Py_ssize_t _read_bulk(const char* p, Py_ssize_t pos, Py_ssize_t n,
                                  Py_ssize_t* start, Py_ssize_t* size) noexcept:
    """Read a non-null bulk string "$<size>\r\n<data>\r\n" at ``pos``: set ``start``
    and ``size`` to its data and return the index after it, or NEED_MORE, or NOT_MINE
    for anything else (a null bulk included)."""
    if pos >= n:
        return NEED_MORE
    if p[pos] != 36:
        return NOT_MINE
    pos = _read_length(p, pos + 1, n, size)
    if pos < 0:
        return pos
    if size[0] < 0:
        return NOT_MINE
    start[0] = pos
    pos += size[0]
    if pos + 2 > n:
        return NEED_MORE
    if p[pos] != 13 or p[pos + 1] != 10:
        return NOT_MINE
    return pos + 2


cdef inline Py_ssize_t _line_end_crlf(const char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """The index after the next CRLF from ``pos``, or NEED_MORE."""
    cdef const char* cr
    while pos < n:
        cr = <const char*>memchr(p + pos, 13, <size_t>(n - pos))
        if cr == NULL:
            return NEED_MORE
        pos = cr - p
        if pos + 1 >= n:
            return NEED_MORE
        if p[pos + 1] == 10:
            return pos + 2
        pos += 1
    return NEED_MORE


cdef Py_ssize_t _reply_end(const char* p, Py_ssize_t pos, Py_ssize_t n, int depth) except -3:
    """The index just past the reply starting at ``pos``, or NEED_MORE.

    Only lengths are checked here: what a line holds is left to hiredis, which reads
    the reply next and raises ProtocolError on anything malformed.
    """
    cdef Py_ssize_t count = 0, i
    cdef char kind
    if pos >= n:
        return NEED_MORE
    if depth > RESP_MAX_DEPTH:
        raise hiredis.ProtocolError("reply nested too deeply")
    kind = p[pos]
    if kind in b"+-:,(#_":  # one line (RESP2 and RESP3 simple types)
        return _line_end_crlf(p, pos + 1, n)
    if kind in b"$=!":  # length-prefixed
        pos = _read_length(p, pos + 1, n, &count)
        if pos < 0:
            if pos == NEED_MORE:
                return NEED_MORE
            raise hiredis.ProtocolError("bad bulk length")
        if count < 0:
            return pos
        if n - pos < count + 2:
            return NEED_MORE
        if p[pos + count] != 13 or p[pos + count + 1] != 10:
            raise hiredis.ProtocolError("bulk string not followed by CRLF")
        return pos + count + 2
    if kind in b"*>~%":  # aggregates; a map has two replies per entry
        pos = _read_length(p, pos + 1, n, &count)
        if pos < 0:
            if pos == NEED_MORE:
                return NEED_MORE
            raise hiredis.ProtocolError("bad aggregate length")
        if kind == 37:
            count *= 2
        i = 0
        while i < count:
            pos = _reply_end(p, pos, n, depth + 1)
            if pos < 0:
                return pos
            i += 1
        return pos
    raise hiredis.ProtocolError(f"unexpected reply type byte {kind!r}")


def reply_end(data: bytes, Py_ssize_t pos=0) -> int:
    """Where the reply at ``pos`` of ``data`` ends (-2: incomplete); for tests."""
    if pos < 0 or pos > PyBytes_GET_SIZE(data):
        raise ValueError("pos outside data")
    return _reply_end(PyBytes_AS_STRING(data), pos, PyBytes_GET_SIZE(data), 0)


cdef class RedisProtocol:
    """asyncio protocol for one Redis connection: coalesced writes, hiredis replies.

    Lifecycle events go to ``owner`` (a Python object from wsproxy.redis):
    ``connection_made(proto)``, ``connection_lost(proto, exc)``.
    """

    def __init__(self, owner):
        self.owner = owner
        self.transport = None
        self.reader = hiredis.Reader()
        self.tail = None
        self.out = bytearray()
        self.flush_scheduled = False
        self.flush_deferred = False
        self.write_paused = False
        self.loop = None
        self.connected = False

    # asyncio.Protocol interface -------------------------------------------------
    def connection_made(self, transport):
        import asyncio
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.connected = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # unix sockets have no TCP_NODELAY
        self.owner.connection_made(self)

    def data_received(self, data):
        cdef bytearray tail = self.tail
        cdef object buf
        cdef const char* p
        cdef Py_ssize_t n, pos = 0, end, start
        if tail is not None and PyByteArray_GET_SIZE(tail):
            tail += data  # the start of a reply is waiting for the rest
            buf = tail
            p = PyByteArray_AS_STRING(tail)
            n = PyByteArray_GET_SIZE(tail)
        else:
            buf = data if type(data) is bytes else bytes(data)
            p = PyBytes_AS_STRING(buf)
            n = PyBytes_GET_SIZE(buf)
        try:
            self.prepare(p, pos, n)
            while pos < n:
                end = self.fast_reply(p, pos, n)
                if end == NEED_MORE:
                    break
                if end == NOT_MINE:
                    end = _reply_end(p, pos, n, 0)
                    if end == NEED_MORE:
                        break
                    start, pos = pos, end  # consumed even if a callback raises
                    self._reply_via_hiredis(p + start, end - start)
                else:
                    pos = end
        except hiredis.ProtocolError as exc:
            # The stream can no longer be trusted: drop the connection.
            pos = n
            self.transport.abort()
            self.owner.protocol_error(self, exc)
        finally:
            # Keep what is not read yet (also when a callback raised part way: the
            # reply it was given counts as read, and is not given again).
            if buf is tail:
                del tail[:pos]
            elif pos < n:
                self.tail = bytearray(p[pos:n])

    cdef int _reply_via_hiredis(self, const char* p, Py_ssize_t size) except -1:
        self.reader.feed(PyBytes_FromStringAndSize(p, size))
        reply = self.reader.gets()
        if reply is False:  # the scanner and hiredis disagree on where it ends
            raise hiredis.ProtocolError("incomplete reply")
        self.on_reply(reply)
        return 0

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.connected = False
        self.owner.connection_lost(self, exc)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False

    # writing ---------------------------------------------------------------------
    cdef int write(self, const char* data, Py_ssize_t size) except -1:
        _append(self.out, data, size)
        if not self.flush_scheduled:
            self._schedule_flush()
        return 0

    cdef int _schedule_flush(self) except -1:
        self.flush_scheduled = True
        self.loop.call_soon(self.flush)
        return 0

    def flush(self):
        """Write everything queued in one call, one loop iteration after the first of
        it: what arrives in the meantime (the next client frames of a burst, which
        come a few microseconds apart) goes in the same write."""
        if not self.flush_deferred:
            self.flush_deferred = True
            self.loop.call_soon(self.flush)
            return
        self.flush_deferred = False
        self.flush_scheduled = False
        if not self.connected or PyByteArray_GET_SIZE(self.out) == 0:
            return
        # Hand the buffer over and start a new one: the transport may keep a
        # reference to what it could not send yet.
        cdef bytearray data = self.out
        self.out = bytearray()
        self.transport.write(data)

    def send(self, bytes command):
        """Queue an already encoded command."""
        self.write(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command))

    def close(self):
        """Close the connection (pending replies fail through connection_lost)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self):
        """Drop the connection at once."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def pending_write_bytes(self) -> int:
        """Bytes queued here and in the transport, not yet written to the socket."""
        n = PyByteArray_GET_SIZE(self.out)
        if self.transport is not None:
            n += self.transport.get_write_buffer_size()
        return n

    cdef int on_reply(self, object reply) except -1:
        return 0

    cdef int prepare(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -1:
        """Called once a read, before its replies are handled (a chance to
        prefetch what they will touch)."""
        return 0

    cdef Py_ssize_t fast_reply(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -3:
        """Handle the reply at ``pos`` in place and return where it ends, or NOT_MINE
        (hiredis reads it), or NEED_MORE."""
        return NOT_MINE


cdef class CommandProtocol(RedisProtocol):
    """The command connection: GET/EXPIRE/PUBLISH, replies matched FIFO.

    A waiter is a future (a caller awaits the reply), a callable (called with the
    reply, at once, from the read), ``None`` (fire and forget), or the
    SessionListener that sent a PUBLISH (told if it failed).
    """

    def __init__(self, owner):
        RedisProtocol.__init__(self, owner)
        self.waiters = collections.deque()

    def request(self, bytes command):
        """Send ``command``; return a future for its reply (a ReplyError is a result)."""
        fut = self.loop.create_future()
        self.waiters.append(fut)
        self.write(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command))
        return fut

    def request_cb(self, bytes command, callback):
        """Send ``command``; call ``callback(reply)`` when it is answered. The reply
        may be a ReplyError, or the exception that ended the connection first.
        No future and no extra loop iteration: the handshake uses this."""
        self.waiters.append(callback)
        self.write(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command))

    def send_noreply(self, bytes command):
        """Send ``command`` and ignore its reply."""
        self.waiters.append(None)
        self.write(PyBytes_AS_STRING(command), PyBytes_GET_SIZE(command))

    cdef Py_ssize_t fast_reply(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -3:
        # ":<integer>\r\n" for a PUBLISH or a fire-and-forget command: nothing to
        # build, only the waiter to drop. Anything else goes through hiredis.
        cdef Py_ssize_t i = pos + 1
        cdef object waiter
        if p[pos] != 58 or not self.waiters:
            return NOT_MINE
        if i < n and p[i] == 45:
            i += 1
        while i < n and 48 <= p[i] <= 57:
            i += 1
        if i + 1 >= n:
            return NEED_MORE
        if i == pos + 1 or p[i] != 13 or p[i + 1] != 10 or (p[pos + 1] == 45 and i == pos + 2):
            return NOT_MINE  # not a plain integer: hiredis says what it is
        waiter = self.waiters[0]
        if waiter is not None and type(waiter) is not SessionListener:
            return NOT_MINE
        self.waiters.popleft()
        return i + 2

    cdef int on_reply(self, object reply) except -1:
        cdef object waiter
        if not self.waiters:
            return 0  # cannot happen with a well-behaved server; nothing to match
        waiter = self.waiters.popleft()
        if waiter is None:
            return 0
        if type(waiter) is SessionListener:
            if type(reply) is not int:  # a PUBLISH error reply
                (<SessionListener>waiter)._send_error(ERR_UNAVAILABLE)
                STATS.c[C_ERRORS_UPSTREAM_UNAVAILABLE] += 1
            return 0
        if PyCallable_Check(waiter):
            _call_reply_callback(waiter, reply)
        elif not waiter.done():
            waiter.set_result(reply)
        return 0

    @property
    def awaiting_replies(self) -> int:
        """Commands sent whose replies have not come yet."""
        return len(self.waiters)

    def fail_pending(self, exc):
        """The connection is gone: fail every waiter; tell each publisher's socket."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter is None:
                continue
            if type(waiter) is SessionListener:
                (<SessionListener>waiter)._send_error(ERR_UNAVAILABLE)
                STATS.c[C_ERRORS_UPSTREAM_UNAVAILABLE] += 1
            elif PyCallable_Check(waiter):
                _call_reply_callback(waiter, exc)
            elif not waiter.done():
                waiter.set_exception(exc)


cdef void _log_exception(str what):
    import logging
    logging.getLogger("wsproxy").exception(what)


cdef inline void _call_reply_callback(object callback, object reply):
    # A callback runs inside the Redis connection's read: an exception escaping it
    # would end the connection for everyone, so it is logged here instead.
    try:
        callback(reply)
    except Exception:
        _log_exception("Redis reply callback failed")


cdef inline int _bulk_header(char* out, Py_ssize_t size) noexcept:
    # "$<size>\r\n" without printf's format parsing (it showed in the upstream profile).
    return _resp_header(out, 36, size)


cdef class Upstream:
    """The stable handle sockets publish through; the protocol behind it changes on reconnect."""

    def __init__(self, Py_ssize_t max_pending_bytes=64 * 1024 * 1024):
        self.proto = None
        self.max_pending_bytes = max_pending_bytes

    cdef bint publish(self, SessionListener source, bytes prefix,
                      const char* payload, Py_ssize_t size) except -1:
        cdef CommandProtocol proto = self.proto
        cdef char head[32]
        cdef int head_len
        if proto is None or not proto.connected:
            return False
        if proto.write_paused and proto.pending_write_bytes > self.max_pending_bytes:
            return False  # Redis is not keeping up: refuse rather than grow without bound
        head_len = _bulk_header(head, size)
        # One resize for the whole command: prefix, "$<size>\r\n", payload, CRLF.
        cdef bytearray out = proto.out
        cdef Py_ssize_t prefix_len = PyBytes_GET_SIZE(prefix)
        cdef Py_ssize_t old = PyByteArray_GET_SIZE(out)
        PyByteArray_Resize(out, old + prefix_len + head_len + size + 2)
        cdef char* w = PyByteArray_AS_STRING(out) + old
        memcpy(w, PyBytes_AS_STRING(prefix), prefix_len)
        memcpy(w + prefix_len, head, head_len)
        memcpy(w + prefix_len + head_len, payload, size)
        memcpy(w + prefix_len + head_len + size, b"\r\n", 2)
        proto.waiters.append(source)
        if not proto.flush_scheduled:
            proto._schedule_flush()
        return True


cdef class Route:
    """One subscribed channel and the sockets of this process that receive it."""

    def __init__(self, bytes channel):
        self.channel = channel
        self._listeners = []
        self.single = None
        self.waiters = []
        self.subscribed = False

    def add(self, SessionListener listener not None) -> None:
        """Deliver this channel's messages to ``listener`` too (after the others)."""
        self._listeners.append(listener)
        self.single = listener if len(self._listeners) == 1 else None

    def remove(self, SessionListener listener not None) -> bool:
        """Stop delivering to ``listener``; False if it was not here."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            return False
        self.single = self._listeners[0] if len(self._listeners) == 1 else None
        return True

    @property
    def listeners(self) -> tuple:
        """The sockets receiving this channel, in the order they were added."""
        return tuple(self._listeners)

    def __len__(self) -> int:
        return len(self._listeners)

    cdef int deliver(self, const char* payload, Py_ssize_t size) except -1:
        cdef WSMsgType msg_type = WSMsgType.TEXT
        cdef SessionListener listener
        # A payload that is not UTF-8 cannot be a text frame: send it as binary.
        if size and not wsp_utf8_valid(<const unsigned char*>payload, size):
            msg_type = WSMsgType.BINARY
        if self.single is not None:
            listener = <SessionListener>self.single
            # One socket, the usual case: no list to walk (two fewer cache misses
            # a message, when every message is for a different socket).
            try:
                listener.send_down(msg_type, payload, size)
            except Exception:
                _log_exception("delivery to a socket failed")
            return 0
        for listener in self._listeners:
            try:
                listener.send_down(msg_type, payload, size)
            except Exception:
                # One socket's failure must not cost the others this message, nor
                # escape into the Redis read (which would end the connection).
                _log_exception("delivery to a socket failed")
        return 0


# ---------------------------------------------------------------------------
# channel -> Route, readable from C without making a key object

cdef enum:
    MIN_ROUTE_SLOTS = 64

cdef uint64_t g_route_seed = 0


cdef inline uint64_t _mix(uint64_t h) noexcept:
    # splitmix64's finaliser: every input bit moves every output bit.
    h ^= h >> 30
    h *= 0xbf58476d1ce4e5b9ULL
    h ^= h >> 27
    h *= 0x94d049bb133111ebULL
    return h ^ (h >> 31)


cdef inline uint64_t _channel_hash(const char* p, Py_ssize_t n) noexcept:
    # Eight bytes a step (a 50-byte channel is 7 steps; CPython's SipHash took
    # ~180 instructions for it). Seeded per process from os.urandom, so which
    # channels collide cannot be chosen from outside; channels exist only for
    # authenticated sessions anyway.
    cdef uint64_t h = g_route_seed ^ (<uint64_t>n * 0x9e3779b97f4a7c15ULL)
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, p, 8)
        h = _mix(h ^ w)
        p += 8
        n -= 8
    if n:
        w = 0
        memcpy(&w, p, n)
        h = _mix(h ^ w ^ 0x5555555555555555ULL)
    return h


cdef inline size_t _probe(RouteSlot* slots, size_t mask, const char* p, Py_ssize_t n,
                         uint64_t h) noexcept:
    """The slot holding channel ``p[:n]`` (hash ``h``), or else the free slot that ends
    its probe run (where it would go)."""
    cdef size_t i = <size_t>h & mask
    while slots[i].route != NULL:
        if slots[i].hash == h and slots[i].size == n and memcmp(slots[i].data, p, n) == 0:
            return i
        i = (i + 1) & mask
    return i


cdef class RouteTable:
    """The channel -> Route table: a dict for Python code, and beside it an
    open-addressing index (linear probing, at most half full) that the pub/sub read
    searches with the channel's bytes where they lie in the read buffer: no key
    object, no SipHash. Keys must be the Route's own ``channel``."""

    def __cinit__(self):
        self.routes = {}
        self.slots = <RouteSlot*>calloc(MIN_ROUTE_SLOTS, sizeof(RouteSlot))
        if self.slots == NULL:
            raise MemoryError()
        self.mask = MIN_ROUTE_SLOTS - 1

    def __dealloc__(self):
        free(self.slots)

    cdef Route find_hashed(self, const char* p, Py_ssize_t n, uint64_t h):
        """The Route of channel ``p[:n]`` (whose _channel_hash is ``h``), or None."""
        cdef RouteSlot* slot = &self.slots[_probe(self.slots, self.mask, p, n, h)]
        return None if slot.route == NULL else <Route>slot.route

    cdef RouteSlot* slot_for(self, uint64_t h) noexcept:
        """Where the search for a channel of hash ``h`` starts (for prefetching)."""
        return &self.slots[<size_t>h & self.mask]

    cdef int _place(self, Route route) except -1:
        cdef const char* p = PyBytes_AS_STRING(route.channel)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(route.channel)
        cdef uint64_t h = _channel_hash(p, n)
        cdef RouteSlot* slot = &self.slots[_probe(self.slots, self.mask, p, n, h)]
        slot.hash = h
        slot.size = n
        slot.data = p
        slot.route = <PyObject*>route
        return 0

    cdef int _resize(self, size_t size) except -1:
        cdef RouteSlot* slots = <RouteSlot*>calloc(size, sizeof(RouteSlot))
        if slots == NULL:
            raise MemoryError()
        free(self.slots)
        self.slots = slots
        self.mask = size - 1
        for route in self.routes.values():
            self._place(<Route>route)
        return 0

    def __setitem__(self, bytes channel not None, Route route not None):
        if channel != route.channel:
            raise ValueError("a route is filed under its own channel")
        if channel in self.routes:
            del self[channel]
        if <size_t>(2 * (len(self.routes) + 1)) > self.mask + 1:
            self._resize(2 * (self.mask + 1))
        self.routes[route.channel] = route
        self._place(route)

    def __delitem__(self, bytes channel not None):
        # Held until the slot is cleared: its data points into the route's channel.
        cdef Route route = self.routes.pop(channel)  # KeyError if absent
        # Backward-shift deletion: later slots of the same probe run move up, so a
        # search never stops early at the hole (no tombstones).
        cdef const char* p = PyBytes_AS_STRING(channel)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(channel)
        cdef size_t i = _probe(self.slots, self.mask, p, n, _channel_hash(p, n)), j = i, home
        self.slots[i].route = NULL
        while True:
            j = (j + 1) & self.mask
            if self.slots[j].route == NULL:
                break
            home = <size_t>self.slots[j].hash & self.mask
            # Slot j may fill the hole at i unless its home lies cyclically in (i, j].
            if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                self.slots[i] = self.slots[j]
                self.slots[j].route = NULL
                i = j
        cdef size_t size = self.mask + 1
        if size > MIN_ROUTE_SLOTS and <size_t>(8 * len(self.routes)) < size:
            self._resize(size // 2)  # give memory back after a peak

    def get(self, channel, default=None):
        return self.routes.get(channel, default)

    def __getitem__(self, channel):
        return self.routes[channel]

    def __contains__(self, channel):
        return channel in self.routes

    def __len__(self):
        return len(self.routes)

    def __iter__(self):
        return iter(self.routes)

    def keys(self):
        return self.routes.keys()

    def values(self):
        return self.routes.values()

    def items(self):
        return self.routes.items()

    def lookup(self, bytes channel not None):
        """What the pub/sub read finds for ``channel`` in the C index (for tests)."""
        return self.find_hashed(PyBytes_AS_STRING(channel), PyBytes_GET_SIZE(channel),
                                _channel_hash(PyBytes_AS_STRING(channel),
                                              PyBytes_GET_SIZE(channel)))

    @property
    def index_size(self) -> int:
        """Slots in the C index (for tests: it grows and shrinks with the table)."""
        return self.mask + 1


g_route_seed = _mix(int.from_bytes(os.urandom(8), "little"))


cdef inline Py_ssize_t _read_message(const char* p, Py_ssize_t pos, Py_ssize_t n,
                                     PreparedMessage* m) noexcept:
    """Read the pub/sub push "*3\r\n$7\r\nmessage\r\n$<n>\r\n<channel>\r\n$<n>\r\n
    <payload>\r\n" at ``pos`` into ``m`` (offsets, end, the channel's hash); return
    its end, NOT_MINE for any other reply, or NEED_MORE."""
    cdef Py_ssize_t avail = n - pos, end
    if memcmp(p + pos, b"*3\r\n$7\r\nmessage\r\n", avail if avail < 17 else 17) != 0:
        return NOT_MINE
    if avail < 17:
        return NEED_MORE
    end = _read_bulk(p, pos + 17, n, &m.channel, &m.channel_size)
    if end < 0:
        return end
    end = _read_bulk(p, end, n, &m.payload, &m.payload_size)
    if end < 0:
        return end
    m.start = pos
    m.end = end
    m.hash = _channel_hash(p + m.channel, m.channel_size)
    return end


cdef class PubSubProtocol(RedisProtocol):
    """The pub/sub connection: ``message`` pushes go to their Route; the rest to on_control."""

    def __init__(self, owner, RouteTable routes not None, on_control):
        RedisProtocol.__init__(self, owner)
        self.routes = routes
        self.on_control = on_control

    cdef Py_ssize_t fast_reply(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -3:
        # "*3\r\n$7\r\nmessage\r\n$<n>\r\n<channel>\r\n$<n>\r\n<payload>\r\n", read
        # where it lies: the channel is looked up, the payload sent from the buffer.
        cdef Route route
        cdef PreparedMessage one
        cdef PreparedMessage* m
        cdef Py_ssize_t end
        if self.pre_next < self.pre_count and self.pre[self.pre_next].start == pos:
            # Read already by prepare() (same buffer: it runs at the start of each
            # read and nothing moves the buffer before its messages are handled).
            m = &self.pre[self.pre_next]
            self.pre_next += 1
        else:
            end = _read_message(p, pos, n, &one)
            if end < 0:
                return end
            m = &one
        route = self.routes.find_hashed(p + m.channel, m.channel_size, m.hash)
        if route is not None:
            route.deliver(p + m.payload, m.payload_size)
        return m.end

    cdef int prepare(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -1:
        # The messages of one read are each for a different socket, so the index
        # slot, the channel's bytes, the route, the listener and its transport are
        # all cold: five cache misses a message, one after the other. Here the
        # first PREFETCH_DEPTH messages of the read are parsed and hashed once (the
        # parse is kept for fast_reply) and what they will touch is prefetched in
        # stages, so each stage's misses overlap and are done by the time the
        # messages are handled. Nothing is decided here: a slot that turns out to
        # hold another channel only wasted a prefetch.
        cdef RouteSlot* slot
        cdef PyObject* objects[PREFETCH_DEPTH]
        cdef int count = 0, i
        cdef Py_ssize_t end
        cdef PyObject* obj
        self.pre_count = self.pre_next = 0
        while count < PREFETCH_DEPTH:
            end = _read_message(p, pos, n, &self.pre[count])
            if end < 0:
                break  # not a message, or not all here: fast_reply will say which
            pos = end
            count += 1
        self.pre_count = count
        if count < 2:
            return 0  # one message: nothing to overlap
        for i in range(count):
            __builtin_prefetch(self.routes.slot_for(self.pre[i].hash))
        # Offsets: objects are 16-byte aligned, so a prefetch at the first and the
        # last field used covers every cache line those fields lie on.
        for i in range(count):  # slot -> the route and the channel's bytes
            slot = self.routes.slot_for(self.pre[i].hash)
            objects[i] = slot.route
            if objects[i] != NULL:
                __builtin_prefetch(objects[i])  # refcount ... single
                __builtin_prefetch(<char*>objects[i] + 48)
                __builtin_prefetch(slot.data)
        for i in range(count):  # route -> its only listener
            if objects[i] != NULL:
                obj = <PyObject*>(<Route>objects[i]).single
                objects[i] = NULL if obj == <PyObject*>None else obj
                if objects[i] != NULL:  # refcount, transport ... backlogged (52)
                    __builtin_prefetch(objects[i])
                    __builtin_prefetch(<char*>objects[i] + 52)
        for i in range(count):  # listener -> its transport's is_close_frame_sent etc.
            if objects[i] != NULL:
                obj = <PyObject*>(<SessionListener>objects[i]).transport
                if obj != <PyObject*>None:
                    __builtin_prefetch(<char*>obj + 128)
        return 0

    cdef int on_reply(self, object reply) except -1:
        cdef Route route
        if type(reply) is list and len(<list>reply) == 3 and (<list>reply)[0] == b"message":
            # Only a message the fast path did not take comes here (e.g. a null payload).
            route = self.routes.get((<list>reply)[1])
            payload = (<list>reply)[2]
            if route is not None and type(payload) is bytes:
                route.deliver(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
            return 0
        self.on_control(reply)
        return 0


# ---------------------------------------------------------------------------
# The per-socket listener

cdef enum:
    SMALL_FRAME = 2048  # frames up to this size are sent from one stack buffer
    CLOSE_ABORT_SECS = 2  # after our CLOSE, how long the client has to close its side
    # picows' read buffer: what a socket starts with, and the most it keeps once a
    # large frame has been read (picows only ever grows it).
    READ_BUFFER_INIT_BYTES = 4096
    READ_BUFFER_KEEP_BYTES = 64 * 1024

READ_BUFFER_INIT = READ_BUFFER_INIT_BYTES


cdef inline Py_ssize_t _frame_header(unsigned char* out, WSMsgType msg_type,
                                     Py_ssize_t size) noexcept:
    # RFC 6455 5.2, server to client: FIN + opcode, then the length, no mask.
    cdef int i
    out[0] = 0x80 | <unsigned char>msg_type
    if size < 126:
        out[1] = <unsigned char>size
        return 2
    if size < 65536:
        out[1] = 126
        out[2] = <unsigned char>(size >> 8)
        out[3] = <unsigned char>size
        return 4
    out[1] = 127
    for i in range(8):
        out[2 + i] = <unsigned char>((<unsigned long long>size) >> (56 - 8 * i))
    return 10


cdef inline int _safe_close_code(int code) noexcept:
    # Codes a server may send back in its CLOSE; anything else is answered with 1000.
    if code == 1000 or code == 1001 or code == 1002 or code == 1003:
        return code
    if 1007 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return 1000


cdef class SessionListener(WSListener):
    """One client WebSocket: upstream validation and publish, downstream sends, closing.

    ``events`` (wsproxy.session.ConnectionTable) hears ``connected(l)``,
    ``disconnected(l)`` and ``too_slow(l)``; none of those is per message.
    """

    def __init__(self, Upstream upstream, bytes up_channel, conn_id, str session_id,
                 str agent_id, events):
        self.upstream = upstream
        self.up_prefix = publish_prefix(up_channel)
        self.transport = None
        self.pending = []
        self.pending_bytes = 0
        self.fragments = None
        self.in_fragmented = False
        self.fragmented_binary = False
        self.fragmented_oversize = False
        self.too_slow = False
        self.backlogged = False
        self.fd = -1
        self.closing = False
        self.connected = False
        self.last_activity = g_now
        self.last_ping = 0.0
        self.conn_id = conn_id
        self.session_id = session_id
        self.agent_id = agent_id
        self.events = events
        self.close_code = None
        self.close_reason = None
        self.picows_proto = NULL
        self.trim_scheduled = False

    # picows callbacks ---------------------------------------------------------
    cpdef on_ws_connected(self, WSTransport transport):
        cdef bytes payload
        self.transport = transport
        self.connected = True
        self.last_activity = g_now
        underlying = self.transport.underlying_transport
        if type(underlying) is TransportForPicows:
            self.fd = (<TransportForPicows>underlying).fd
        else:
            self.fd = underlying.get_extra_info("socket").fileno()
        # pause_writing/resume_writing now mean "the transport holds unsent bytes" /
        # "it is empty again": while it is empty, send_down writes to the socket itself.
        underlying.set_write_buffer_limits(high=0, low=0)
        # Messages that arrived between the SUBSCRIBE ack and the 101 go first.
        pending = self.pending
        self.pending = None
        self.pending_bytes = 0
        if self.too_slow:  # more arrived during the handshake than a socket may hold
            self.events.connected(self)
            self.events.too_slow(self)
            return
        for payload in pending:
            if PyBytes_GET_SIZE(payload) and not wsp_utf8_valid(
                    <const unsigned char*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload)):
                self.send_down(WSMsgType.BINARY, PyBytes_AS_STRING(payload),
                               PyBytes_GET_SIZE(payload))
            else:
                self.send_down(WSMsgType.TEXT, PyBytes_AS_STRING(payload),
                               PyBytes_GET_SIZE(payload))
        self.events.connected(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType msg_type = frame.msg_type
        self.last_activity = g_now
        if (self.picows_proto != NULL and not self.trim_scheduled
                and _read_buffer_capacity(self.picows_proto) > READ_BUFFER_KEEP_BYTES):
            # Once picows is done with this read (the frame points into the buffer).
            self.trim_scheduled = True
            transport._loop.call_soon(self._trim_read_buffer)
        if msg_type == WSMsgType.TEXT or msg_type == WSMsgType.BINARY:
            if self.in_fragmented:
                self._protocol_error("new message before the previous one finished")
                return
            if msg_type == WSMsgType.BINARY:
                if frame.fin:
                    STATS.c[C_ERRORS_BINARY] += 1
                    self._send_error(ERR_BINARY)
                else:
                    self._start_fragmented(True, frame)
                return
            if frame.fin:
                self._on_message(frame.payload_ptr, frame.payload_size)
            else:
                self._start_fragmented(False, frame)
        elif msg_type == WSMsgType.CONTINUATION:
            if not self.in_fragmented:
                self._protocol_error("continuation frame without a message")
                return
            # A binary or oversize message keeps nothing (fragments is None): it is
            # refused whole at its last frame.
            if not self.fragmented_oversize and not self.fragmented_binary:
                if PyByteArray_GET_SIZE(self.fragments) + frame.payload_size > g_max_message:
                    self.fragmented_oversize = True
                    self.fragments = None
                else:
                    _append(self.fragments, frame.payload_ptr, frame.payload_size)
            if frame.fin:
                self._finish_fragmented()
        elif msg_type == WSMsgType.PING:
            if not self.closing and not self.too_slow:
                transport.send_pong(frame.get_payload_as_bytes())
                self._check_backlog()
        elif msg_type == WSMsgType.CLOSE:
            self._on_close_frame(frame)
        # PONG: nothing beyond the activity stamp above.

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.connected = False
        self.picows_proto = NULL  # it may be freed from now on
        self._note_picows_close()
        self.events.disconnected(self)

    cpdef pause_writing(self):
        # The transport now holds bytes the kernel did not take: until it has written
        # them, every frame must queue behind them.
        self.backlogged = True

    cpdef resume_writing(self):
        self.backlogged = False

    # upstream -----------------------------------------------------------------
    cdef int _on_message(self, const char* data, Py_ssize_t size) except -1:
        if size > g_max_message:
            STATS.c[C_ERRORS_TOO_LARGE] += 1
            self._send_error(g_err_too_large)
            return 0
        if size == 0 or not wsp_json_valid(<const unsigned char*>data, <size_t>size):
            STATS.c[C_ERRORS_INVALID_JSON] += 1
            self._send_error(ERR_INVALID_JSON)
            return 0
        if self.upstream.publish(self, self.up_prefix, data, size):
            STATS.c[C_MESSAGES_UP] += 1
            STATS.c[C_BYTES_UP] += size
        else:
            STATS.c[C_ERRORS_UPSTREAM_UNAVAILABLE] += 1
            self._send_error(ERR_UNAVAILABLE)
        return 0

    cdef _start_fragmented(self, bint binary, WSFrame frame):
        self.in_fragmented = True
        self.fragmented_binary = binary
        self.fragmented_oversize = frame.payload_size > g_max_message
        if binary or self.fragmented_oversize:
            self.fragments = None
        else:
            self.fragments = bytearray()
            _append(self.fragments, frame.payload_ptr, frame.payload_size)

    cdef _finish_fragmented(self):
        cdef bytearray message = self.fragments
        self.in_fragmented = False
        self.fragments = None
        if self.fragmented_binary:
            STATS.c[C_ERRORS_BINARY] += 1
            self._send_error(ERR_BINARY)
        elif self.fragmented_oversize:
            STATS.c[C_ERRORS_TOO_LARGE] += 1
            self._send_error(g_err_too_large)
        else:
            self._on_message(PyByteArray_AS_STRING(message), PyByteArray_GET_SIZE(message))

    cdef int _send_error(self, bytes error) except -1:
        if self.transport is not None and not self.closing and not self.too_slow:
            self.transport.send(WSMsgType.TEXT, error)
            self._check_backlog()
        return 0

    cdef _check_backlog(self):
        # Replies (error frames, pongs) count against the same bound as downstream
        # frames: a client that keeps sending bad frames or pings and never reads
        # must not make the proxy queue its answers without limit.
        if self.transport.underlying_transport.get_write_buffer_size() > g_max_buffer:
            self._too_slow()

    # downstream ---------------------------------------------------------------
    cdef int send_down(self, WSMsgType msg_type, const char* data, Py_ssize_t size) except -1:
        # ``data`` may point into a Redis read buffer: whatever must outlive this call
        # is copied.
        if self.too_slow or self.closing:
            return 0
        if self.transport is None:
            if self.pending is not None:
                # Still in the handshake: keep it for on_ws_connected, within the
                # same bound a slow socket gets.
                self.pending_bytes += size
                if self.pending_bytes > g_max_buffer:
                    self.pending = []
                    self.too_slow = True
                    STATS.c[C_BACKPRESSURE_DISCONNECTS] += 1
                else:
                    self.pending.append(PyBytes_FromStringAndSize(data, size))
            return 0
        # Read through self, not a local: a local would take a reference, and so
        # write the transport's first cache line, which nothing else here needs.
        if self.transport.is_close_frame_sent or self.transport.is_disconnected:
            return 0
        cdef unsigned char header[10]
        cdef unsigned char small[SMALL_FRAME]
        cdef Py_ssize_t header_size = _frame_header(header, msg_type, size)
        cdef iovec iov[2]
        cdef msghdr msg
        cdef ssize_t sent = 0
        STATS.c[C_MESSAGES_DOWN] += 1
        STATS.c[C_BYTES_DOWN] += size
        if not self.backlogged:
            # The common case: nothing queued, so the frame goes straight to the
            # kernel in one call. A small frame is put together on the stack and
            # goes by send(): copying it costs less than the kernel's reading of a
            # msghdr and two iovecs (about 0.2 us a call on loopback TCP). A large
            # one goes by sendmsg(), header and payload without a copy.
            if header_size + size <= SMALL_FRAME:
                memcpy(small, header, header_size)
                memcpy(small + header_size, data, size)
                sent = send(self.fd, small, header_size + size, MSG_NOSIGNAL | MSG_DONTWAIT)
            else:
                iov[0].iov_base = header
                iov[0].iov_len = header_size
                iov[1].iov_base = <void*>data
                iov[1].iov_len = size
                memset(&msg, 0, sizeof(msg))
                msg.msg_iov = iov
                msg.msg_iovlen = 2
                sent = sendmsg(self.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
            if sent == header_size + size:
                return 0
            if sent < 0:
                if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                    return 0  # the connection is failing: the transport will report it
                sent = 0
        # Queue the rest behind what the transport holds (this pauses us), and close
        # the socket once that backlog passes MAX_BUFFER_SIZE_BYTES.
        cdef bytes frame = PyBytes_FromStringAndSize(NULL, header_size + size - sent)
        cdef char* out = PyBytes_AS_STRING(frame)
        if sent < header_size:
            memcpy(out, header + sent, header_size - sent)
            memcpy(out + header_size - sent, data, size)
        else:
            memcpy(out, data + (sent - header_size),
                   header_size + size - sent)
        self.transport.underlying_transport.write(frame)
        self._check_backlog()
        return 0

    cdef _too_slow(self):
        # The client is not reading: stop sending at once; the close happens outside
        # the write call that found out.
        if not self.too_slow:
            self.too_slow = True
            STATS.c[C_BACKPRESSURE_DISCONNECTS] += 1
            self.events.too_slow(self)

    # closing ------------------------------------------------------------------
    cdef _on_close_frame(self, WSFrame frame):
        cdef int code = <int>frame.get_close_code()
        cdef bint answering = self.closing
        self._note_picows_close()
        if self.close_code is None:
            self.close_code = code if code != 0 else 1005
            self.close_reason = "client closed"
        self.closing = True
        # (After a CLOSE of ours or picows', picows sends nothing more: this one is
        # only sent to a client that closed first.)
        self.transport.send_close(<WSCloseCode>_safe_close_code(code))
        self.transport.disconnect()
        if not answering:
            # disconnect() waits for the transport to flush: a client that stops
            # reading after its CLOSE would keep the connection (and its subscription)
            # for good. (close() set the same limit on a close of ours.)
            self.transport._loop.call_later(CLOSE_ABORT_SECS, self._abort_if_open)

    cdef _protocol_error(self, str reason):
        STATS.c[C_ERRORS_PROTOCOL] += 1
        self.close(1002, reason)

    def close(self, int code, str reason, double abort_after=CLOSE_ABORT_SECS):
        """Send CLOSE ``code``; drop the TCP connection if the client has not closed
        its side within ``abort_after`` seconds."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        self._note_picows_close()
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        # (picows sends nothing after a CLOSE it or we already sent.)
        self.transport.send_close(<WSCloseCode>code, reason.encode())
        self.transport._loop.call_later(abort_after, self._abort_if_open)

    cdef _note_picows_close(self):
        # picows sends a CLOSE by itself on a frame it cannot parse (1002) or one over
        # the frame limit (1009): unless a close of ours came first, that is the code
        # the connection ended with.
        if self.close_code is not None or self.transport is None:
            return
        handshake = self.transport.close_handshake
        if handshake is not None and handshake.sent is not None:
            self.close_code = int(handshake.sent.code)
            self.close_reason = handshake.sent.reason or "protocol error"

    def _abort_if_open(self):
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(False)

    def _trim_read_buffer(self):
        self.trim_scheduled = False
        if self.picows_proto != NULL:
            _trim_read_buffer(self.picows_proto)

    @property
    def write_buffer_size(self) -> int:
        """Bytes this socket has queued and not yet written."""
        if self.transport is None:
            return 0
        return self.transport.underlying_transport.get_write_buffer_size()


def heartbeat_sweep(listeners, double now, double interval, double timeout,
                    Py_ssize_t max_pings=-1) -> int:
    """Ping idle sockets, close silent ones; returns how many were closed.

    A socket is idle when nothing (data, ping or pong) arrived for ``interval``
    seconds; it is pinged then and every ``interval`` after, and closed with 1011
    once silent for ``timeout``. At most ``max_pings`` are sent (all if negative):
    sockets that connected together fall due together, and thousands of pings in one
    pass would hold up every message behind them; those left wait for a later pass.
    """
    cdef SessionListener listener
    cdef double idle
    cdef int closed = 0
    for listener in listeners:
        if listener.closing or not listener.connected:  # (connected: it has a transport)
            continue
        idle = now - listener.last_activity
        if idle >= timeout:
            STATS.c[C_PING_TIMEOUTS] += 1
            listener.close(1011, "ping timeout")
            closed += 1
        elif idle >= interval and listener.transport.is_close_frame_sent:
            # picows sent a CLOSE by itself (a frame it could not parse, or one over
            # the frame limit) and then only waits for its write buffer to drain: a
            # client that does not read would keep the connection. close() sends
            # nothing more and drops it if the client has not closed within the abort
            # time.
            listener.close(1000, "")
        elif idle >= interval and now - listener.last_ping >= interval and max_pings != 0:
            listener.last_ping = now
            listener.transport.send_ping()
            max_pings -= 1
    return closed


# ---------------------------------------------------------------------------
# The upgrade without picows' HTTP negotiation

cdef extern from *:
    """
    /* picows 2.3.1's WSProtocol object, as Cython lays out a cdef class: the object
       head, the vtable pointer, then the attributes in the order picows.pyx declares
       them (enums and bints are C ints). picows declares WSProtocol in its .pyx, not
       its .pxd, so this is the only way to reach them; picows_layout_matches() checks
       it against a real object (its size, and the fields on both sides of the parser
       state) before it is used. */
    typedef struct {
        PyObject_HEAD
        void *vtab;
        PyObject *transport;
        PyObject *listener;
        PyObject *listener_factory;
        PyObject *host_port;
        PyObject *ws_path;
        PyObject *logger;
        int log_debug_enabled;
        int is_client_side;
        int disconnect_on_exception;
        PyObject *disconnect_exception;
        PyObject *loop;
        PyObject *handshake_timeout;
        PyObject *handshake_timeout_handle;
        PyObject *handshake_complete_future;
        Py_ssize_t http_max_size;
        PyObject *websocket_key_b64;
        Py_ssize_t max_frame_size;
        int enable_auto_pong;
        int enable_auto_ping;
        PyObject *auto_ping_idle_timeout;
        PyObject *auto_ping_reply_timeout;
        int auto_ping_strategy;
        PyObject *auto_ping_loop_task;
        double last_data_time;
        PyObject *extra_headers;
        int state;
        PyObject *read_buffer;
        Py_ssize_t f_new_data_start_pos;
        Py_ssize_t f_curr_state_start_pos;
        Py_ssize_t f_curr_frame_start_pos;
        Py_ssize_t f_payload_length;
        Py_ssize_t f_payload_start_pos;
        int f_msg_type;
        uint32_t f_mask;
        uint8_t f_fin, f_rsv1, f_rsv2, f_rsv3, f_has_mask, f_payload_length_flag;
    } wsp_picows_protocol;
    """
    ctypedef struct wsp_picows_protocol:
        PyObject* transport
        PyObject* listener
        PyObject* listener_factory
        PyObject* host_port
        PyObject* logger
        int is_client_side
        int disconnect_on_exception
        PyObject* loop
        PyObject* handshake_timeout
        PyObject* handshake_timeout_handle
        PyObject* handshake_complete_future
        Py_ssize_t http_max_size
        Py_ssize_t max_frame_size
        int enable_auto_pong
        int enable_auto_ping
        PyObject* auto_ping_idle_timeout
        PyObject* auto_ping_reply_timeout
        int auto_ping_strategy
        PyObject* auto_ping_loop_task
        double last_data_time
        PyObject* extra_headers
        int state
        PyObject* read_buffer
        Py_ssize_t f_new_data_start_pos

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY
    int TCP_QUICKACK

# picows' parser states (its .pxd: WSParserState).
cdef enum:
    PICOWS_WAIT_UPGRADE_RESPONSE = 0
    PICOWS_READ_HEADER = 1
# picows' limit on a request head; a constant of its WSProtocol.__init__.
cdef Py_ssize_t PICOWS_HTTP_MAX_SIZE = 16 * 1024
# RFC 6455 section 1.3.
cdef bytes WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
cdef bytes RESPONSE_101 = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                           b"Upgrade: websocket\r\nSec-WebSocket-Accept: ")


cdef inline int _check_protocol(object proto) except -1:
    # The layout is read and written only on picows' own WSProtocol objects.
    if type(proto) is not PicowsProtocol:
        raise TypeError(f"a picows WSProtocol is needed, not {type(proto).__name__}")
    return 0


cdef inline void _set_slot(PyObject** slot, object value) noexcept:
    # Store a new reference in one of picows' object attributes, dropping the old one.
    cdef PyObject* old = slot[0]
    Py_INCREF(value)
    slot[0] = <PyObject*>value
    Py_XDECREF(old)


def picows_layout_matches(object proto, object factory, object logger, object loop,
                          Py_ssize_t max_frame_size, object idle, object reply) -> bool:
    """True if ``proto``, a WSProtocol just built with these arguments (server side, no
    handshake timeout, auto-ping and auto-pong off, PING_WHEN_IDLE, no extra headers),
    reads back through ``wsp_picows_protocol`` as it was built: the layout above is
    picows' own, so :func:`accept_upgrade` may use it."""
    if type(proto) is not PicowsProtocol:
        return False
    if sizeof(wsp_picows_protocol) != (<type>PicowsProtocol).__basicsize__:
        return False
    cdef wsp_picows_protocol* p = <wsp_picows_protocol*><PyObject*>proto
    return (p.transport == <PyObject*>None and p.listener == <PyObject*>None
            and p.listener_factory == <PyObject*>factory
            and p.host_port == <PyObject*>None
            and p.logger == <PyObject*>logger
            and p.is_client_side == 0 and p.disconnect_on_exception == 1
            and p.loop == <PyObject*>loop
            and p.handshake_timeout == <PyObject*>None
            and p.handshake_timeout_handle == <PyObject*>None
            and p.http_max_size == PICOWS_HTTP_MAX_SIZE
            and p.max_frame_size == max_frame_size
            and p.enable_auto_pong == 0 and p.enable_auto_ping == 0
            and p.auto_ping_idle_timeout == <PyObject*>idle
            and p.auto_ping_reply_timeout == <PyObject*>reply
            and p.auto_ping_strategy == 1
            and p.auto_ping_loop_task == <PyObject*>None
            and p.last_data_time == 0.0
            and p.extra_headers == <PyObject*>None
            and p.state == PICOWS_WAIT_UPGRADE_RESPONSE
            and type(<object>p.read_buffer) is MemoryBuffer
            and p.f_new_data_start_pos == 0
            and type(<object>p.handshake_complete_future).__name__ == "Future")


def picows_parser_state(object proto) -> int:
    """The parser state of a WSProtocol (0 until upgraded, then 1 and on); for tests."""
    _check_protocol(proto)
    return (<wsp_picows_protocol*><PyObject*>proto).state


cdef inline Py_ssize_t _read_buffer_capacity(PyObject* proto) noexcept:
    return (<MemoryBuffer>(<wsp_picows_protocol*>proto).read_buffer).capacity


cdef int _trim_read_buffer(PyObject* proto) except -1:
    # picows doubles its read buffer until a frame fits, and never gives it back: one
    # frame of 8 MiB (refused as too large or not) would keep 8 to 16 MiB with its
    # socket for good. Between frames, with no partial frame buffered, the buffer goes
    # back to its initial size, laid out as picows' own constructor lays it out.
    cdef wsp_picows_protocol* p = <wsp_picows_protocol*>proto
    cdef MemoryBuffer buf = <MemoryBuffer>p.read_buffer
    cdef char* data
    if (p.state != PICOWS_READ_HEADER or p.f_new_data_start_pos != 0
            or buf.capacity <= READ_BUFFER_KEEP_BYTES):
        return 0  # in the middle of a frame: a later one will trim
    data = <char*>PyMem_Realloc(buf.data, READ_BUFFER_INIT_BYTES)
    if data == NULL:
        return 0  # keep the large one
    buf.data = data
    buf.capacity = READ_BUFFER_INIT_BYTES
    buf.size = READ_BUFFER_INIT_BYTES - 256  # picows leaves 256 bytes for its SIMD reads
    return 0


def picows_read_buffer_capacity(object proto) -> int:
    """The capacity of a WSProtocol's read buffer; for tests."""
    _check_protocol(proto)
    return _read_buffer_capacity(<PyObject*>proto)


def accept_upgrade(object proto, TransportForPicows transport not None,
                   WSListener listener not None, bytes ws_key not None,
                   object logger, object loop):
    """Upgrade a connection whose request the gate has checked: what picows does in
    ``connection_made`` and in ``_negotiate`` for a valid request, without parsing the
    request again or building the 101 in Python.

    ``proto`` is a fresh server-side WSProtocol on ``transport`` (whose reading is
    paused), checked with :func:`picows_layout_matches`. Writes the 101 with the accept
    value for ``ws_key``; then calls the listener's ``on_ws_connected``. Bytes the client
    sent after its head go to ``proto`` afterwards, through its buffered interface.
    """
    _check_protocol(proto)
    cdef wsp_picows_protocol* p = <wsp_picows_protocol*><PyObject*>proto
    cdef int one = 1
    if p.state != PICOWS_WAIT_UPGRADE_RESPONSE or p.transport != <PyObject*>None:
        raise RuntimeError("the protocol has already been given a connection")
    # connection_made: the socket options picows sets (a failure is harmless: the
    # connection works without them, as it does on a non-TCP socket), and its transport.
    setsockopt(transport.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    setsockopt(transport.fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one))
    cdef WSTransport ws = WSTransport(False, transport, logger, loop)
    _set_slot(&p.transport, ws)
    # _negotiate, for a request that passed: the listener, the state, the 101.
    _set_slot(&p.listener_factory, None)
    _set_slot(&p.listener, listener)
    ws.listener_proxy = weakref.proxy(listener)
    p.state = PICOWS_READ_HEADER
    accept = b2a_base64(sha1(ws_key + WS_GUID).digest(), newline=False)
    transport.write(RESPONSE_101 + accept + b"\r\n\r\n")
    (<object>p.handshake_complete_future).set_result(None)
    if isinstance(listener, SessionListener):
        # Borrowed, from here on (a failure above hands the connection back to the
        # gate, and the protocol goes): the protocol outlives the connection, which
        # ends with on_ws_disconnected, where the listener lets go of it.
        (<SessionListener>listener).picows_proto = <PyObject*>proto
    # picows' _invoke_on_ws_connected: an exception closes the connection with 1011.
    try:
        listener.on_ws_connected(ws)
    except Exception as exc:  # noqa: BLE001 - as picows does
        logger.error("Initiate disconnect because of exception from "
                     "WSListener.on_ws_connected: %s", str(exc))
        ws.send_close(WSCloseCode.INTERNAL_ERROR, b"")
        loop.call_later(0.01, (<object>ws).disconnect)
    # (picows also stamps its last_data_time here: only its auto-ping reads it, and
    # that is off.)
