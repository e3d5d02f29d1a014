# The compiled core of wsproxy: every per-message path lives here.
# Python code (http.py, session.py, redis/) sees it through _fastpath.pyi.

from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t
from picows.picows cimport WSListener, WSTransport, WSFrame, WSMsgType


cdef enum:
    C_MESSAGES_DOWN = 0
    C_BYTES_DOWN = 1
    C_MESSAGES_UP = 2
    C_BYTES_UP = 3
    C_ERRORS_INVALID_JSON = 4
    C_ERRORS_TOO_LARGE = 5
    C_ERRORS_BINARY = 6
    C_ERRORS_UPSTREAM_UNAVAILABLE = 7
    C_ERRORS_PROTOCOL = 8
    C_BACKPRESSURE_DISCONNECTS = 9
    C_PING_TIMEOUTS = 10
    N_COUNTERS = 11


cdef class Stats:
    # Counters as C integers, so the hot path pays one add each. ``c`` points at
    # this process' own array, or at its slot in the workers' shared memory
    # (metrics.py), where any worker can read every worker's counters on scrape.
    cdef long long* c
    cdef long long own[N_COUNTERS]
    cdef object keep


cdef class RedisProtocol:
    cdef object transport
    cdef object reader
    cdef bytearray tail
    cdef bytearray out
    cdef bint flush_scheduled
    cdef bint flush_deferred
    cdef bint write_paused
    cdef object loop
    cdef public object owner
    cdef public bint connected

    cdef int write(self, const char* data, Py_ssize_t size) except -1
    cdef int _schedule_flush(self) except -1
    cdef int on_reply(self, object reply) except -1
    cdef int prepare(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -1
    cdef Py_ssize_t fast_reply(self, const char* p, Py_ssize_t pos, Py_ssize_t n) except -3
    cdef int _reply_via_hiredis(self, const char* p, Py_ssize_t size) except -1


cdef class CommandProtocol(RedisProtocol):
    cdef object waiters


cdef class Upstream:
    cdef public CommandProtocol proto
    cdef public Py_ssize_t max_pending_bytes

    cdef bint publish(self, SessionListener source, bytes prefix,
                      const char* payload, Py_ssize_t size) except -1


cdef class Route:
    cdef readonly bytes channel  # the route table's index points into these bytes
    cdef list _listeners
    cdef object single  # the only SessionListener, when there is exactly one; or None
    cdef public list waiters  # called with None (subscribed) or the error, once
    cdef public bint subscribed

    cdef int deliver(self, const char* payload, Py_ssize_t size) except -1


cdef struct RouteSlot:
    uint64_t hash
    Py_ssize_t size
    const char* data   # the channel's bytes (owned by the Route's ``channel``)
    PyObject* route    # NULL: a free slot (the table's dict holds the reference)


cdef class RouteTable:
    cdef dict routes
    cdef RouteSlot* slots
    cdef size_t mask

    cdef Route find_hashed(self, const char* p, Py_ssize_t n, uint64_t h)
    cdef RouteSlot* slot_for(self, uint64_t h) noexcept
    cdef int _place(self, Route route) except -1
    cdef int _resize(self, size_t size) except -1


cdef enum:
    PREFETCH_DEPTH = 16  # messages of one read parsed ahead and prefetched


cdef struct PreparedMessage:  # one pub/sub message, parsed ahead (offsets in the read)
    Py_ssize_t start, end, channel, channel_size, payload, payload_size
    uint64_t hash


cdef class PubSubProtocol(RedisProtocol):
    cdef RouteTable routes
    cdef PreparedMessage pre[PREFETCH_DEPTH]
    cdef int pre_count  # parsed ahead in this read
    cdef int pre_next   # the next of them fast_reply will meet
    cdef public object on_control


cdef class SessionListener(WSListener):
    # What send_down reads comes first, within the first 56 bytes (WSListener's part
    # ends at 32). The object is 176 bytes, 192 with its GC header, a multiple of 64:
    # pymalloc puts every listener at the start of a cache line, and those fields on
    # one line (PubSubProtocol.prepare prefetches it). Flags only Cython code reads are
    # single bytes, to stay at 176.
    cdef WSTransport transport
    cdef int fd
    cdef public bint too_slow
    cdef public bint closing
    cdef bint backlogged
    cdef Upstream upstream
    cdef bytes up_prefix
    cdef list pending
    cdef Py_ssize_t pending_bytes
    cdef bytearray fragments
    cdef public bint connected
    cdef unsigned char in_fragmented
    cdef unsigned char fragmented_binary
    cdef unsigned char fragmented_oversize
    cdef unsigned char trim_scheduled
    cdef public double last_activity
    cdef public double last_ping
    cdef public object conn_id
    cdef public object session_id
    cdef public object agent_id
    cdef public object events
    cdef public object close_code
    cdef public object close_reason
    cdef PyObject* picows_proto  # borrowed, while connected through accept_upgrade

    cdef int send_down(self, WSMsgType msg_type, const char* data, Py_ssize_t size) except -1
    cdef int _on_message(self, const char* data, Py_ssize_t size) except -1
    cdef int _send_error(self, bytes error) except -1
    cdef _check_backlog(self)
    cdef _start_fragmented(self, bint binary, WSFrame frame)
    cdef _finish_fragmented(self)
    cdef _on_close_frame(self, WSFrame frame)
    cdef _protocol_error(self, str reason)
    cdef _too_slow(self)
    cdef _note_picows_close(self)
