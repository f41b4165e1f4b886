# cython: language_level=3
"""The compiled sans-IO HTTP/2 connection (RFC 9113), client and server roles.

Owns one TCP connection's HTTP/2 state: the preface, SETTINGS and their ACK,
PING, GOAWAY (graceful in two steps, and abrupt), RST_STREAM, the §5.1
stream state machine, MAX_CONCURRENT_STREAMS both ways, connection and
stream flow control, header validation (§8.2-8.3), trailers, and header
blocks assembled from CONTINUATION frames under limits.

It never touches a socket. ``receive(bytes)`` parses every whole frame of a
read in one call and returns the events the Python layer must see (a new
request, a closed stream, a GOAWAY) or None; the bytes to send accumulate in
the connection and are written by ``Outbox.flush()``, once per read burst for
every connection that gained output.

Proxying happens here, not in Python: two streams on two connections are
linked with ``link``/``open_forward``, after which response headers, DATA,
trailers and resets cross from one to the other in C. DATA payloads are
copied straight from the receive buffer into the peer connection's send
buffer while the peer's windows allow; the rest waits in the stream, and the
sender gets WINDOW_UPDATE only as bytes actually leave, so a slow reader
backs up to the writer and memory per stream stays within the window we
advertise.

For telemetry the core also counts gRPC messages on DATA
(``grpc_msgs_recv``), records the status and grpc-status a server-role
stream actually sent, and, per ``trace_mode``, reads, ensures or re-parents
the W3C ``traceparent`` a forwarded request carries (the Stream's trace
fields say what it did); one ``RequestStats.record`` per request reads it all.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from meshproxy._fast.frames cimport (
    F_ACK, F_END_HEADERS, F_END_STREAM, F_PADDED, F_PRIORITY, HEADER_SIZE, MAX_FRAME_LENGTH, MIN_MAX_FRAME_SIZE,
    T_CONTINUATION, T_DATA, T_GOAWAY, T_HEADERS, T_PING, T_PRIORITY, T_PUSH_PROMISE, T_RST_STREAM, T_SETTINGS,
    T_WINDOW_UPDATE, grow, put_frame_header, put_u32, read_u32,
)
from meshproxy._fast.hpack cimport Decoder, Encoder

import os

from meshproxy.errors import (
    CompressionError, EnhanceYourCalm, ErrorCode, FlowControlError, FrameSizeError, H2Error, HeaderListTooLarge,
    ProtocolError, StreamClosedError,
)

__all__ = [
    "EV_CLOSED", "EV_DATA", "EV_GOAWAY", "EV_IDLE", "EV_REQUEST", "EV_RESPONSE", "EV_RETRY", "EV_TERMINATED",
    "EV_TRAILERS",
    "H2Connection", "Outbox", "RETRY_RESET", "RETRY_STATUS", "RetryOn", "Stream", "TryTimeouts", "abandon", "link",
    "monotonic_ns",
]

# Events returned by receive(), as tuples whose first item is one of these.
EV_REQUEST = 1     # (EV_REQUEST, stream): a new request's headers (server role)
EV_RESPONSE = 2    # (EV_RESPONSE, stream): response headers on an unlinked client stream
EV_DATA = 3        # (EV_DATA, stream, bytes, end_stream): DATA on an unlinked stream that does not hold
EV_TRAILERS = 4    # (EV_TRAILERS, stream): trailers on an unlinked stream
EV_CLOSED = 5      # (EV_CLOSED, stream): a stream with notify_close ended (cleanly or reset)
EV_GOAWAY = 6      # (EV_GOAWAY, last_stream_id, error_code, debug): the peer is going away
EV_IDLE = 7        # (EV_IDLE,): no streams left on a connection that is going away: close it
EV_TERMINATED = 8  # (EV_TERMINATED, error_code, message): connection error; GOAWAY is queued: flush, close
EV_RETRY = 9       # (EV_RETRY, stream): send this request again (never processed upstream, or retry.hook said so)

# Why retry.hook is asked (its third argument).
RETRY_RESET = 1    # the upstream stream was reset, or its connection lost, before response headers
RETRY_STATUS = 2   # response headers whose status (or trailers-only grpc-status) retry wants

cdef enum:
    S_IDLE = 0
    S_OPEN = 1
    S_HALF_LOCAL = 2    # we sent END_STREAM
    S_HALF_REMOTE = 3   # the peer sent END_STREAM
    S_CLOSED = 4

    STREAM_MASK = 0x7FFFFFFF
    MAX_WINDOW = 0x7FFFFFFF
    DEFAULT_WINDOW = 65535
    PREFACE_LEN = 24
    RECENT_RESETS = 256           # ids of streams we reset, whose late frames we ignore
    MAX_CONTINUATIONS = 64        # CONTINUATION frames per header block (the 2024 flood)
    LAST_CLIENT_ID = 0x7FFFFFFF - 2 * 1000   # leave room: a pool opens another connection first
    REPLAY_LIMIT = 65536          # request body kept to resend a request the upstream never processed
    MAX_REDISPATCH = 3            # times one request is sent again after REFUSED_STREAM / GOAWAY

    E_NO_ERROR = 0x0
    E_PROTOCOL_ERROR = 0x1
    E_INTERNAL_ERROR = 0x2
    E_FLOW_CONTROL_ERROR = 0x3
    E_STREAM_CLOSED = 0x5
    E_FRAME_SIZE_ERROR = 0x6
    E_REFUSED_STREAM = 0x7
    E_CANCEL = 0x8
    E_COMPRESSION_ERROR = 0x9
    E_ENHANCE_YOUR_CALM = 0xB

cdef const char* _HEX = b"0123456789abcdef"
cdef bytes EMPTY = b""
cdef bytes H_TRACEPARENT = b"traceparent"
cdef bytes PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
cdef bytes SHUTDOWN_PING = b"meshdown"

# Header names that are connection-specific in HTTP/1.1 and malformed in HTTP/2 (§8.2.2).
cdef frozenset CONNECTION_HEADERS = frozenset(
    [b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"])

cdef tuple H_STATUS_200 = (b":status", b"200")
cdef tuple H_GRPC_CT = (b"content-type", b"application/grpc")

cdef char* _GRPC_UNITS = b"HMSmun"
cdef int64_t[6] _GRPC_UNIT_NS
_GRPC_UNIT_NS[:] = [3600 * 1000000000, 60 * 1000000000, 1000000000, 1000000, 1000, 1]


cdef inline int64_t _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def monotonic_ns():
    """The clock the connection stamps streams with (CLOCK_MONOTONIC, ns)."""
    return _now()


cdef int64_t parse_grpc_timeout(bytes value) noexcept:
    """``grpc-timeout`` in ns (at most 8 digits and a unit), or -1 if malformed."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef const char* p = PyBytes_AS_STRING(value)
    cdef int64_t v = 0
    if n < 2 or n > 9:
        return -1
    for i in range(n - 1):
        if p[i] < 48 or p[i] > 57:
            return -1
        v = v * 10 + (p[i] - 48)
    for i in range(6):
        if p[n - 1] == _GRPC_UNITS[i]:
            if v > 0x7FFFFFFFFFFFFFFF // _GRPC_UNIT_NS[i]:
                return 0x7FFFFFFFFFFFFFFF
            return v * _GRPC_UNIT_NS[i]
    return -1


cdef bytes format_grpc_timeout(int64_t ns):
    """The shortest exact-enough ``grpc-timeout`` for ``ns`` (8 digits at most, rounded up)."""
    cdef int i
    cdef int64_t unit, v
    if ns < 0:
        ns = 0
    for i in range(5, -1, -1):
        unit = _GRPC_UNIT_NS[i]
        v = (ns + unit - 1) // unit
        if v < 100000000:
            return b"%d%c" % (v, _GRPC_UNITS[i])
    return b"99999999H"


cdef class RetryOn:
    """When a failed attempt of a request is offered for another one (a route's retry conditions).

    Set on a downstream (server-role) stream as ``stream.retry``; None (the
    default) means never. The core tests the conditions itself, so a
    response that does not meet them costs no Python: response headers with
    a status >= 500 (``on_5xx``), 502-504 (``on_gateway``) or in
    ``statuses``, or a trailers-only gRPC response whose grpc-status is in
    ``grpc_statuses``; or (``on_reset``) a reset of the upstream stream or
    the loss of its connection before response headers. Only while nothing
    of the response went downstream and the request body is still whole in
    the replay copy (``REPLAY_LIMIT``). Then ``hook(stream, upstream,
    reason)`` decides (attempts left, budget): true, and the core cancels
    the attempt, keeps the request (body included) and raises ``EV_RETRY``
    for it; false, and the response (or the reset) goes downstream as it
    would have.

    With ``per_try_ns`` > 0, every attempt ``open_forward`` sends for the
    stream is also armed in ``timeouts`` (a ``TryTimeouts``), due that long
    after the attempt's stream opened, and disarmed by the core when that
    stream closes: a per-try timeout costs no Python per attempt.
    """

    def __init__(self, hook, *, on_5xx=False, on_gateway=False, on_reset=False, statuses=(), grpc_statuses=(),
                 int64_t per_try_ns=0, TryTimeouts timeouts=None):
        cdef uint32_t mask = 0
        if not callable(hook):
            raise TypeError("hook must be callable")
        if per_try_ns < 0:
            raise ValueError("per_try_ns must be >= 0")
        if per_try_ns and timeouts is None:
            raise ValueError("a per-try timeout needs the TryTimeouts to arm it in")
        self.per_try_ns = per_try_ns
        self.timeouts = timeouts
        if per_try_ns:
            self._try_queue = timeouts._queue(per_try_ns)
        for g in grpc_statuses:
            if not 0 <= g <= 31:
                raise ValueError(f"grpc status {g} out of range")
            mask |= 1u << <int>g
        self.hook = hook
        self.on_5xx = on_5xx
        self.on_gateway = on_gateway
        self.on_reset = on_reset
        self.statuses = frozenset(int(x) for x in statuses)
        self.grpc_mask = mask

    cdef bint wants(self, int status, int grpc_status):
        if status >= 500 and (self.on_5xx or (self.on_gateway and status <= 504 and status >= 502)):
            return True
        if 0 <= grpc_status < 32 and (self.grpc_mask >> grpc_status) & 1:
            return True
        return bool(self.statuses) and status in self.statuses

    def matches(self, int status, int grpc_status=-1):
        """Whether response headers with ``status`` (and, trailers-only, ``grpc_status``; -1 none) qualify."""
        return self.wants(status, grpc_status)


cdef class _TryQueue:
    pass


cdef class TryTimeouts:
    """Per-try timeouts of one worker's attempts, armed and disarmed in C.

    Nearly every attempt of a route with a per-try timeout is armed and
    almost none expires, so ``open_forward`` arms the attempt's upstream
    stream and the stream's close disarms it, with no allocation and no
    Python: each per-try timeout has a queue linked through its streams,
    and as attempts open in time order with the same timeout, each new one
    goes at the end of its queue.

    The owner keeps one timer: ``arm(at_ns)`` is called whenever the
    earliest attempt armed becomes due sooner than the timer, with its due
    time rounded up to the next multiple of ``slot_ns`` (so expiries close
    together share a wake-up, up to ``slot_ns`` late). The owner then calls
    ``expire(now_ns)`` at that time: it takes out every attempt due by
    ``now_ns``, sets the timer for the next one, and returns those still
    waiting for response headers (open, linked to their request; after the
    headers the request's deadline governs), earliest first for each
    per-try timeout.
    """

    def __init__(self, arm, int64_t slot_ns=5_000_000):
        if not callable(arm):
            raise TypeError("arm must be callable")
        if slot_ns <= 0:
            raise ValueError("slot_ns must be > 0")
        self._arm = arm
        self.slot_ns = slot_ns
        self._queues = {}
        self._timer_at = 0

    def __len__(self):
        """The attempts armed."""
        cdef _TryQueue q
        cdef Py_ssize_t n = 0
        for q in self._queues.values():
            n += q.n
        return n

    @property
    def timer_at_ns(self):
        """When the owner's timer is to fire, 0: no attempt is armed."""
        return self._timer_at

    def add(self, Stream s not None, int64_t due_ns):
        """Arm ``s`` (an open stream) to expire at ``due_ns``, instead of any time it was armed for."""
        if s.state == S_CLOSED:
            raise ValueError("the stream is closed")
        if s.try_queue is not None:
            _try_unlink(s)
        self._insert(self._queue(-1), s, due_ns)

    cdef _TryQueue _queue(self, int64_t key):
        cdef _TryQueue q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _TryQueue.__new__(_TryQueue)
        return q

    cdef int _insert(self, _TryQueue q, Stream s, int64_t due_ns) except -1:
        cdef Stream at = q.last
        cdef int64_t t
        # Due order from the end: one comparison when s is due last, the common case.
        while at is not None and at.try_due_ns > due_ns:
            at = at.try_prev
        s.try_queue = q
        s.try_due_ns = due_ns
        s.try_prev = at
        if at is None:
            s.try_next = q.first
            q.first = s
        else:
            s.try_next = at.try_next
            at.try_next = s
        if s.try_next is None:
            q.last = s
        else:
            s.try_next.try_prev = s
        q.n += 1
        if at is None:
            t = (due_ns // self.slot_ns + 1) * self.slot_ns
            if self._timer_at == 0 or t < self._timer_at:
                self._timer_at = t
                self._arm(t)
        return 0

    def expire(self, int64_t now_ns):
        """Take out the attempts due by ``now_ns``; those still waiting for response headers."""
        cdef list out = []
        cdef _TryQueue q
        cdef Stream s, nxt
        cdef int64_t t, next_at = 0
        for q in self._queues.values():
            s = q.first
            while s is not None and s.try_due_ns <= now_ns:
                nxt = s.try_next
                s.try_queue = s.try_next = s.try_prev = None
                q.n -= 1
                if s.state != S_CLOSED and not s.recv_headers and s.peer is not None:
                    out.append(s)
                s = nxt
            q.first = s
            if s is None:
                q.last = None
            else:
                s.try_prev = None
                t = (s.try_due_ns // self.slot_ns + 1) * self.slot_ns
                if next_at == 0 or t < next_at:
                    next_at = t
        self._timer_at = next_at
        if next_at:
            self._arm(next_at)
        return out


cdef inline int _try_unlink(Stream s) except -1:
    # Take s out of its TryTimeouts queue (its attempt ended or it is re-armed). The owner's timer
    # stays: if s was the earliest, the timer finds nothing due and moves on to the next one.
    cdef _TryQueue q = s.try_queue
    cdef Stream prev = s.try_prev, nxt = s.try_next
    if prev is None:
        q.first = nxt
    else:
        prev.try_next = nxt
    if nxt is None:
        q.last = prev
    else:
        nxt.try_prev = prev
    q.n -= 1
    s.try_queue = s.try_next = s.try_prev = None
    return 0


cdef class Outbox:
    """The connections of one worker that have bytes to write.

    Every connection appends itself once when it gains output; ``flush()``
    hands each one's buffer to its ``writer`` (``transport.write``) and gives
    it a fresh one, so a buffer the transport keeps by reference is never
    written to again.
    """

    def __init__(self):
        self._dirty = []
        self._evented = []

    def flush(self):
        """Deliver pending events to each connection's ``handler``, then write what they produced."""
        cdef H2Connection c
        cdef bytearray buf
        cdef list events
        while self._dirty or self._evented:
            while self._evented:
                evented = self._evented
                self._evented = []
                for c in evented:
                    c._evented = False
                    events = c._take_events()
                    if events is not None and c.handler is not None:
                        c.handler(events)
            dirty = self._dirty
            self._dirty = []
            for c in dirty:
                c._dirty = False
                if PyByteArray_GET_SIZE(c.out) and c.writer is not None:
                    buf = c.out
                    c.out = bytearray()
                    c.writer(buf)


cdef inline int _event(H2Connection c, tuple ev) except -1:
    # Events of a connection other than the one being driven (a linked peer's
    # close, say) are delivered by the outbox to that connection's handler.
    c.events.append(ev)
    if not c._evented and c.outbox is not None:
        c._evented = True
        c.outbox._evented.append(c)
    return 0


cdef inline void _mark(H2Connection c):
    if not c._dirty and c.outbox is not None:
        c._dirty = True
        c.outbox._dirty.append(c)


@cython.freelist(64)
cdef class Stream:
    """One HTTP/2 stream. Made by the connection; read-only from Python but for ``user``."""

    def __init__(self, *args, **kwargs):
        raise TypeError("streams are made by H2Connection")

    @property
    def state(self):
        return ("idle", "open", "half_closed_local", "half_closed_remote", "closed")[self.state]

    @property
    def pending_bytes(self):
        """DATA queued on this stream, waiting for the peer's window."""
        return PyByteArray_GET_SIZE(self.pending) if self.pending is not None else 0

    @property
    def held_bytes(self):
        return PyByteArray_GET_SIZE(self.held) if self.held is not None else 0

    @property
    def send_window(self):
        return self.send_window

    @property
    def recv_window(self):
        return self.recv_window

    def __repr__(self):
        state = ("idle", "open", "half_closed_local", "half_closed_remote", "closed")[self.state]
        return f"<Stream {self.id} {state} on {'client' if self.conn.client else 'server'} connection>"


cdef Stream _new_stream(H2Connection c, uint32_t sid):
    cdef Stream s = Stream.__new__(Stream)
    s.id = sid
    s.conn = c
    s.state = S_IDLE
    s.error_code = -1
    s.status = 0
    s.grpc_status = -1
    s.grpc_timeout_ns = -1
    s.content_length = -1
    s.send_window = c.remote_initial_window
    s.recv_window = c.local_initial_window
    s.t_open_ns = _now()
    s.trace_id = s.span_id = s.parent_span_id = EMPTY
    c.streams[sid] = s
    c.streams_total += 1
    return s


cdef inline int _valid_name(bytes name) except -1:
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name), i
    cdef uint8_t ch
    if n == 0:
        return 0
    for i in range(1 if p[0] == 58 else 0, n):
        ch = p[i]
        if ch <= 0x20 or (0x41 <= ch <= 0x5A) or ch >= 0x7F or ch == 58:
            return 0
    return 1


cdef inline int _valid_value(bytes value) except -1:
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef uint8_t ch
    if n == 0:
        return 1
    if p[0] == 0x20 or p[0] == 0x09 or p[n - 1] == 0x20 or p[n - 1] == 0x09:
        return 0
    for i in range(n):
        ch = p[i]
        if ch == 0 or ch == 0x0A or ch == 0x0D:
            return 0
    return 1


cdef inline int64_t _parse_uint(bytes v) noexcept:
    cdef const char* p = PyBytes_AS_STRING(v)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(v), i
    cdef int64_t r = 0
    if n == 0 or n > 18:
        return -1
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return -1
        r = r * 10 + (p[i] - 48)
    return r


cdef inline bint _starts(bytes v, const char* prefix, Py_ssize_t n) noexcept:
    return PyBytes_GET_SIZE(v) >= n and memcmp(PyBytes_AS_STRING(v), prefix, n) == 0


cdef str _check_fields(Stream s, list headers, int kind):
    """Validate one header list (§8.2-8.3); record what routing and accounting need.

    kind: 0 request, 1 response, 2 trailers. Returns None, or why it is malformed.
    """
    cdef bint regular_seen = False
    cdef tuple h
    cdef bytes name, value
    cdef int64_t cl
    cdef int seen = 0, bit
    cdef Py_ssize_t n
    cdef const char* q
    cdef bytes method = None, scheme = None, path = None, authority = None, host = None, status = None
    for item in headers:
        h = <tuple>item
        name = <bytes>h[0]
        value = <bytes>h[1]
        if not _valid_name(name):
            return f"invalid header name {name!r}"
        if not _valid_value(value):
            return f"invalid value for header {name!r}"
        if PyBytes_AS_STRING(name)[0] == 58:  # pseudo-header
            if regular_seen:
                return f"pseudo-header {name!r} after a regular header"
            if kind == 2:
                return f"pseudo-header {name!r} in trailers"
            if kind == 0:
                if name == b":method":
                    bit = 1
                    method = value
                elif name == b":path":
                    bit = 2
                    path = value
                elif name == b":scheme":
                    bit = 4
                    scheme = value
                elif name == b":authority":
                    bit = 8
                    authority = value
                else:  # :protocol too: we do not offer extended CONNECT (RFC 8441)
                    return f"pseudo-header {name!r} in a request"
            else:
                if name != b":status":
                    return f"pseudo-header {name!r} in a response"
                bit = 32
                status = value
            if seen & bit:
                return f"duplicate pseudo-header {name!r}"
            seen |= bit
            continue
        regular_seen = True
        # Only a handful of names matter here; tell them apart by length first
        # (this runs for every header of every request and response).
        n = PyBytes_GET_SIZE(name)
        q = PyBytes_AS_STRING(name)
        if n == 2:
            if memcmp(q, b"te", 2) == 0 and value != b"trailers":
                return "te header other than 'trailers'"
        elif n == 4:
            if memcmp(q, b"host", 4) == 0:
                host = value
        elif n == 7 or n == 10 or n == 16 or n == 17:
            if name in CONNECTION_HEADERS:
                return f"connection-specific header {name!r}"
        elif n == 11:
            if memcmp(q, b"grpc-status", 11) == 0:
                # A server-role stream's grpc_status is what we send, not what the client says.
                if s.conn.client:
                    cl = _parse_uint(value)
                    s.grpc_status = <int>cl if 0 <= cl <= 0x7FFFFFFF else 2  # garbage is UNKNOWN, as gRPC reads it
            elif kind == 0 and memcmp(q, b"traceparent", 11) == 0:
                _parse_traceparent(s, value)
        elif n == 12:
            if memcmp(q, b"content-type", 12) == 0:
                if kind != 2 and _starts(value, b"application/grpc", 16):
                    s.is_grpc = True
            elif kind == 0 and memcmp(q, b"grpc-timeout", 12) == 0:
                s.grpc_timeout_ns = parse_grpc_timeout(value)
            elif kind == 0 and memcmp(q, b"x-request-id", 12) == 0:
                s.request_id = value
        elif n == 14:
            if memcmp(q, b"content-length", 14) == 0:
                cl = _parse_uint(value)
                if cl < 0 or (s.content_length >= 0 and cl != s.content_length):
                    return "invalid content-length"
                if kind != 2:
                    s.content_length = cl
    if kind == 0:
        if method is None:
            return "request without :method"
        if method == b"CONNECT":
            if authority is None or scheme is not None or path is not None:
                return "malformed CONNECT request"
        else:
            if scheme is None or path is None or PyBytes_GET_SIZE(path) == 0:
                return "request without :scheme or :path"
            if PyBytes_AS_STRING(path)[0] != 47 and not (path == b"*" and method == b"OPTIONS"):
                if scheme in (b"http", b"https"):
                    return f"invalid :path {path!r}"
        if host is not None and authority is not None and host != authority:
            return "host header differs from :authority"
        s.method = method
        s.scheme = scheme
        s.path = path
        s.authority = authority if authority is not None else host
        s.head = method == b"HEAD"
    elif kind == 1:
        if status is None:
            return "response without :status"
        if PyBytes_GET_SIZE(status) != 3 or _parse_uint(status) < 100:
            return f"invalid :status {status!r}"
        s.status = <int>_parse_uint(status)
    return None


cdef class H2Connection:
    """One HTTP/2 connection, either role; see the module docstring.

    ``settings`` (all optional): max_concurrent_streams, initial_window_size,
    max_frame_size, max_header_list_size, header_table_size (what we
    advertise), and connection_window (our connection receive window).
    ``hold``: a new request's DATA is kept until its stream is linked (the
    proxy's mode); otherwise DATA is delivered as EV_DATA events and its
    window returned at once.
    """

    def __init__(self, bint client, Outbox outbox=None, settings=None, bint hold=False,
                 bint generate_request_id=False, *, first_stream_id=1):
        cfg = dict(settings or {})
        self.client = client
        self.outbox = outbox
        self.writer = None
        self.handler = None
        self.out = bytearray()
        self.inbuf = bytearray()
        self.preface_left = 0 if client else PREFACE_LEN
        self.streams = {}
        self.events = []
        self._blocked = []
        self._recent_resets = {}
        self.local_max_concurrent = cfg.pop("max_concurrent_streams", 1000)
        self.local_initial_window = cfg.pop("initial_window_size", 1 << 20)
        self.local_max_frame_size = cfg.pop("max_frame_size", MIN_MAX_FRAME_SIZE)
        self.local_max_header_list = cfg.pop("max_header_list_size", 65536)
        header_table_size = cfg.pop("header_table_size", 4096)
        self.local_connection_window = cfg.pop("connection_window", 4 << 20)
        if cfg:
            raise ValueError(f"unknown HTTP/2 settings: {sorted(cfg)}")
        if not DEFAULT_WINDOW <= self.local_initial_window <= MAX_WINDOW:
            raise ValueError("initial_window_size must be in [65535, 2^31-1]")
        if not DEFAULT_WINDOW <= self.local_connection_window <= MAX_WINDOW:
            raise ValueError("connection_window must be in [65535, 2^31-1]")
        if not MIN_MAX_FRAME_SIZE <= self.local_max_frame_size <= MAX_FRAME_LENGTH:
            raise ValueError("max_frame_size must be in [16384, 16777215]")
        # A table smaller than the default binds the peer only once it has ACKed our SETTINGS.
        self.decoder = Decoder(max(header_table_size, 4096), self.local_max_header_list)
        self.encoder = Encoder()
        # Until the peer's SETTINGS say otherwise, assume the RFC's recommended
        # minimum of 100 (as nghttp2 does): opening more would get them refused.
        self.remote_max_concurrent = 100
        self.remote_initial_window = DEFAULT_WINDOW
        self.remote_max_frame_size = MIN_MAX_FRAME_SIZE
        self.remote_max_header_list = 0xFFFFFFFF
        self.conn_send_window = DEFAULT_WINDOW
        self.conn_recv_window = self.local_connection_window
        # Client role: the first stream id we use (3 after an HTTP/1.1 upgrade, whose request is stream 1).
        if not (isinstance(first_stream_id, int) and 1 <= first_stream_id <= 0x7FFFFFFF and first_stream_id & 1):
            raise ValueError("first_stream_id must be an odd stream id")
        self.next_stream_id = first_stream_id
        self.hb_buf = bytearray()
        self.hold_new = hold
        self.stream_limit = 0xFFFFFFFF
        self.generate_request_id = generate_request_id
        self._rid_state = int.from_bytes(os.urandom(8), "little")
        self._header_table_size = header_table_size
        self._trace_mode = 0
        self._trace_sampling = 1.0

    @property
    def trace_mode(self):
        """Server role: what open_forward does with W3C trace context (the Stream trace fields say what it did).

        0: nothing (an incoming ``traceparent`` passes untouched, and still fills ``trace_id``); 1: a request
        without a valid ``traceparent`` gets one (trace id from ``x-b3-traceid`` if any, else random); 2: as 1,
        and a valid incoming one gets the proxy's own span id as its parent-id. ``tracestate`` and B3 headers
        always pass unchanged.
        """
        return self._trace_mode

    @trace_mode.setter
    def trace_mode(self, value):
        if not isinstance(value, int) or value not in (0, 1, 2):
            raise ValueError(f"trace_mode must be 0, 1 or 2, not {value!r}")
        self._trace_mode = value

    @property
    def trace_sampling(self):
        """The share of the traces this connection starts that are marked sampled (0..1)."""
        return self._trace_sampling

    @trace_sampling.setter
    def trace_sampling(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"trace_sampling must be a number, not {type(value).__name__}")
        cdef double v = value
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"trace_sampling must be in [0, 1], not {value!r}")
        self._trace_sampling = v

    # -- what Python reads ------------------------------------------------

    @property
    def active_streams(self):
        return len(self.streams)

    @property
    def can_open(self):
        """Whether a pool should open a new stream here now (client role).

        Not before the peer's SETTINGS: until then its stream limit is unknown,
        and streams above it would be refused. ``open_stream`` itself may be
        called earlier (HTTP/2 allows it), assuming a limit of 100.
        """
        return self.got_remote_settings and self._may_open()

    cdef bint _may_open(self):
        return (not self.goaway_received and not self.goaway_sent and not self.terminated
                and self.open_local < self.remote_max_concurrent and self.open_local < self.stream_limit
                and self.next_stream_id <= LAST_CLIENT_ID)

    @property
    def settled(self):
        """Whether the peer's first SETTINGS arrived (a client opens streams only then)."""
        return self.got_remote_settings

    @property
    def pending_output(self):
        return PyByteArray_GET_SIZE(self.out)

    def get_stream(self, stream_id):
        return self.streams.get(stream_id)

    def live_streams(self):
        """The streams not closed yet, in the order they opened."""
        return list(self.streams.values())

    def data_to_send(self):
        """Take the bytes queued for the peer (for callers without an Outbox)."""
        cdef bytes b = bytes(self.out)
        del self.out[:]
        return b

    # -- start, pause, stop -------------------------------------------------

    def initiate(self):
        """Queue our preface: the magic (client), SETTINGS, and the connection window."""
        if self.client:
            self.out += PREFACE
        settings = [(0x2, 0), (0x3, self.local_max_concurrent), (0x4, self.local_initial_window),
                    (0x5, self.local_max_frame_size), (0x6, self.local_max_header_list)]
        if self._header_table_size != 4096:
            settings.insert(0, (0x1, self._header_table_size))
        cdef uint8_t* p = grow(self.out, HEADER_SIZE + 6 * len(settings))
        put_frame_header(p, 6 * len(settings), T_SETTINGS, 0, 0)
        p += HEADER_SIZE
        for ident, value in settings:
            p[0] = ident >> 8
            p[1] = ident & 0xFF
            put_u32(p + 2, value)
            p += 6
        if self.local_connection_window > DEFAULT_WINDOW:
            self._window_update(0, self.local_connection_window - DEFAULT_WINDOW)
        _mark(self)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        for s in list(self.streams.values()):
            if (<Stream>s).pending is not None and (PyByteArray_GET_SIZE((<Stream>s).pending)
                                                    or (<Stream>s).pending_end):
                self._flush_stream(<Stream>s)
        _mark(self)

    def shutdown(self):
        """Graceful GOAWAY: no new streams; the in-flight ones finish.

        Server role: GOAWAY with the largest id and a PING first, then, when
        the PING comes back (one round trip, so requests already on the wire
        are counted), GOAWAY with the real last stream id.
        """
        if self.goaway_sent or self.terminated:
            return
        if self.client:
            self._goaway(0, E_NO_ERROR, b"")
        else:
            self._goaway(STREAM_MASK, E_NO_ERROR, b"")
            self._ping(SHUTDOWN_PING, False)
            self._shutdown_ping = True
        self._check_idle()
        _mark(self)
        return self._take_events()

    def close(self, error_code=E_NO_ERROR, message=""):
        """Abrupt GOAWAY: every stream ends now (linked peers are told)."""
        if not self.terminated:
            self._terminate(error_code, message)
            _mark(self)
        return self._take_events()

    def connection_lost(self):
        """The transport is gone: end every stream, telling linked peers."""
        if not self.terminated:
            self.terminated = True
            self._abort_streams(E_CANCEL)
        return self._take_events()

    def ping(self, opaque=b"\0" * 8):
        if len(opaque) != 8:
            raise ValueError("PING carries 8 bytes")
        self._ping(opaque, False)
        _mark(self)

    # -- receiving --------------------------------------------------------

    def receive(self, data):
        """Process bytes from the peer; return a list of events, or None."""
        cdef Py_buffer view
        cdef Py_ssize_t used
        if self.terminated:
            return None
        try:
            if PyByteArray_GET_SIZE(self.inbuf):
                self.inbuf += data
                used = self._consume(<const uint8_t*>PyByteArray_AS_STRING(self.inbuf),
                                     PyByteArray_GET_SIZE(self.inbuf))
                if used:
                    del self.inbuf[:used]
            else:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                try:
                    used = self._consume(<const uint8_t*>view.buf, view.len)
                    if used < view.len:
                        self.inbuf += (<const char*>view.buf)[used:view.len]
                finally:
                    PyBuffer_Release(&view)
        except H2Error as e:
            self.protocol_errors += 1
            self._terminate(e.error_code, str(e))
        _mark(self)
        return self._take_events()

    def take_events(self):
        """Events raised outside ``receive`` (by a linked peer, or our own calls), or None."""
        return self._take_events()

    cdef list _take_events(self):
        cdef list ev
        if not self.events:
            return None
        ev = self.events
        self.events = []
        return ev

    cdef Py_ssize_t _consume(self, const uint8_t* buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t pos = 0
        cdef uint32_t length, sid
        cdef uint8_t ftype, flags
        cdef const uint8_t* p
        if self.preface_left:
            while self.preface_left and pos < n:
                if buf[pos] != (<const uint8_t*>PyBytes_AS_STRING(PREFACE))[PREFACE_LEN - self.preface_left]:
                    raise ProtocolError("invalid connection preface")
                pos += 1
                self.preface_left -= 1
        while n - pos >= HEADER_SIZE and not self.terminated:
            p = buf + pos
            length = (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]
            if length > self.local_max_frame_size:
                raise FrameSizeError(f"frame of {length} bytes > max frame size {self.local_max_frame_size}")
            if n - pos < HEADER_SIZE + length:
                break
            ftype = p[3]
            flags = p[4]
            sid = read_u32(p + 5) & STREAM_MASK
            pos += HEADER_SIZE + length
            if not self.got_settings:
                if ftype != T_SETTINGS or flags & F_ACK:
                    raise ProtocolError("the peer's preface must start with SETTINGS")
                self.got_settings = True
            if self.hb_stream and ftype != T_CONTINUATION:
                raise ProtocolError(f"expected CONTINUATION on stream {self.hb_stream}, got frame type {ftype}")
            if ftype == T_DATA:
                self._on_data(flags, sid, p + HEADER_SIZE, length)
            elif ftype == T_HEADERS:
                self._on_headers(flags, sid, p + HEADER_SIZE, length)
            elif ftype == T_WINDOW_UPDATE:
                self._on_window_update(sid, p + HEADER_SIZE, length)
            elif ftype == T_SETTINGS:
                self._on_settings(flags, sid, p + HEADER_SIZE, length)
            elif ftype == T_RST_STREAM:
                self._on_rst_stream(sid, p + HEADER_SIZE, length)
            elif ftype == T_PING:
                self._on_ping(flags, sid, p + HEADER_SIZE, length)
            elif ftype == T_CONTINUATION:
                self._on_continuation(flags, sid, p + HEADER_SIZE, length)
            elif ftype == T_GOAWAY:
                self._on_goaway(sid, p + HEADER_SIZE, length)
            elif ftype == T_PRIORITY:
                if sid == 0:
                    raise ProtocolError("PRIORITY frame on stream 0")
                if length != 5:
                    self._stream_error_id(sid, E_FRAME_SIZE_ERROR)
                elif read_u32(p + HEADER_SIZE) & STREAM_MASK == sid:
                    self._stream_error_id(sid, E_PROTOCOL_ERROR)
            elif ftype == T_PUSH_PROMISE:
                raise ProtocolError("PUSH_PROMISE received but push is disabled")
            # unknown frame types are ignored (§4.1)
        return pos

    cdef Stream _stream_for_frame(self, uint32_t sid, const char* what):
        """The open stream ``sid``, or None after dealing with a frame on a stream that is not."""
        cdef Stream s = self.streams.get(sid)
        if s is not None:
            return s
        if sid in self._recent_resets:
            return None  # we reset it; frames in flight are ignored (§5.1 closed)
        if self._is_idle_id(sid):
            raise ProtocolError(f"{what.decode()} frame on idle stream {sid}")
        raise StreamClosedError(f"{what.decode()} frame on closed stream {sid}")

    cdef bint _is_idle_id(self, uint32_t sid):
        if (sid & 1) == (1 if self.client else 0):  # our own ids
            return sid >= self.next_stream_id
        return sid > self.max_peer_stream

    cdef int _on_data(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        cdef uint32_t pad = 0, n
        cdef Stream s
        if sid == 0:
            raise ProtocolError("DATA frame on stream 0")
        if flags & F_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED DATA frame too short for its pad length")
            pad = p[0] + 1
            if pad > length:
                raise ProtocolError("DATA padding exceeds the payload")
        if length > self.conn_recv_window:
            raise FlowControlError(f"DATA of {length} bytes exceeds the connection window {self.conn_recv_window}")
        self.conn_recv_window -= length
        s = self.streams.get(sid)
        if s is None or s.recv_end:
            self._credit_connection(length)  # nobody will consume it
            if s is not None:
                self._stream_error(s, E_STREAM_CLOSED)
                return 0
            self._stream_for_frame(sid, b"DATA")
            return 0
        if not s.recv_headers:
            self._credit_connection(length)
            self._stream_error(s, E_PROTOCOL_ERROR)
            return 0
        if length > s.recv_window:
            self._credit_connection(length)
            self._stream_error(s, E_FLOW_CONTROL_ERROR)
            return 0
        s.recv_window -= length
        n = length - pad
        if pad:
            self._credit(s, pad)
        s.data_recv += n
        if s.content_length >= 0 and (s.data_recv > s.content_length or
                                      (flags & F_END_STREAM and s.data_recv != s.content_length)):
            self._credit_connection(n)
            self._stream_error(s, E_PROTOCOL_ERROR)
            return 0
        p += 1 if flags & F_PADDED else 0
        if s.is_grpc and n:
            _count_messages(s, p, n)
        if s.peer is not None:
            _send_data(s.peer, p, n, flags & F_END_STREAM, s)
        elif s.hold:
            if n:
                if s.held is None:
                    s.held = bytearray()
                s.held += p[:n]
            if flags & F_END_STREAM:
                s.held_end = True
        elif self.hold_new:
            self._credit(s, n)  # proxy mode, no longer linked: the response is done, drop the rest
        else:
            _event(self, (EV_DATA, s, PyBytes_FromStringAndSize(<const char*>p, n),
                                bool(flags & F_END_STREAM)))
            self._credit(s, n)
        if flags & F_END_STREAM:
            self._recv_end(s)
        return 0

    cdef int _on_headers(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        cdef uint32_t pad = 0, start = 0
        cdef bint self_dependent = False
        if sid == 0:
            raise ProtocolError("HEADERS frame on stream 0")
        if flags & F_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED HEADERS frame too short for its pad length")
            pad = p[0]
            start = 1
        if flags & F_PRIORITY:
            if length - start < 5:
                raise FrameSizeError("HEADERS frame too short for its priority fields")
            # A self-dependency is a stream error, but the block must still be decoded.
            self_dependent = read_u32(p + start) & STREAM_MASK == sid
            start += 5
        if pad + start > length:
            raise ProtocolError("HEADERS padding exceeds the payload")
        self._header_block(sid, flags, p + start, length - start - pad, self_dependent)
        return 0

    cdef int _header_block(self, uint32_t sid, uint8_t flags, const uint8_t* p, Py_ssize_t n,
                           bint self_dependent) except -1:
        if not flags & F_END_HEADERS:
            self.hb_stream = sid
            self.hb_end_stream = bool(flags & F_END_STREAM)
            self.hb_frames = 0
            del self.hb_buf[:]
            self.hb_buf += p[:n]
            self._self_dependent = self_dependent
            return 0
        return self._on_block(sid, bool(flags & F_END_STREAM), p, n, self_dependent)

    cdef int _on_continuation(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        if sid == 0 or sid != self.hb_stream:
            raise ProtocolError(f"CONTINUATION on stream {sid} outside a header block")
        self.hb_frames += 1
        self.hb_buf += p[:length]
        if PyByteArray_GET_SIZE(self.hb_buf) > 2 * <Py_ssize_t>self.local_max_header_list + 16384:
            raise EnhanceYourCalm("header block too large")
        if self.hb_frames > MAX_CONTINUATIONS and not flags & F_END_HEADERS:
            raise EnhanceYourCalm("too many CONTINUATION frames")
        if flags & F_END_HEADERS:
            self.hb_stream = 0
            block = bytes(self.hb_buf)
            del self.hb_buf[:]
            return self._on_block(sid, self.hb_end_stream, <const uint8_t*>PyBytes_AS_STRING(block),
                                  PyBytes_GET_SIZE(block), self._self_dependent)
        return 0

    cdef int _on_block(self, uint32_t sid, bint end_stream, const uint8_t* p, Py_ssize_t n,
                       bint self_dependent) except -1:
        cdef list headers = None
        cdef bint too_large = False
        cdef Stream s, peer
        cdef str why
        cdef int kind
        try:
            headers = self.decoder._decode(p, n)
        except HeaderListTooLarge:
            too_large = True  # the block was processed to the end: the table is in sync
        except H2Error as e:
            raise CompressionError(str(e)) if e.error_code == E_COMPRESSION_ERROR else e
        s = self.streams.get(sid)
        if s is None:
            if not self._is_idle_id(sid):
                if sid in self._recent_resets:
                    return 0
                raise StreamClosedError(f"HEADERS on closed stream {sid}")
            if self.client:
                raise ProtocolError(f"HEADERS on stream {sid}, which we did not open")
            if not sid & 1:
                raise ProtocolError(f"a client opened even-numbered stream {sid}")
            # a new request
            self.max_peer_stream = sid
            if self.goaway_sent and sid > self.goaway_sent_last:
                self._ignore(sid)  # after our GOAWAY: never processed; its frames are ignored
                return 0
            self.last_peer_stream = sid
            s = _new_stream(self, sid)
            s.state = S_OPEN
            s.hold = self.hold_new
            s.replay_ok = self.hold_new
            s.notify_close = not self.hold_new
            self.open_remote += 1
            if too_large or self_dependent:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return 0
            if self.open_remote > self.local_max_concurrent:
                s.unprocessed = True
                self._stream_error(s, E_REFUSED_STREAM)
                return 0
            why = _check_fields(s, headers, 0)
            if why is not None:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return 0
            s.headers = headers
            s.recv_headers = True
            _event(self, (EV_REQUEST, s))
            if end_stream:
                if s.content_length > 0:
                    self._stream_error(s, E_PROTOCOL_ERROR)
                    return 0
                s.held_end = s.hold
                self._recv_end(s)
            return 0
        if s.recv_end:
            self._stream_error(s, E_STREAM_CLOSED)
            return 0
        if too_large or self_dependent:
            self._stream_error(s, E_PROTOCOL_ERROR)
            return 0
        if s.recv_headers:
            # trailers
            if not end_stream:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return 0
            why = _check_fields(s, headers, 2)
            if why is not None or (s.content_length >= 0 and s.data_recv != s.content_length):
                self._stream_error(s, E_PROTOCOL_ERROR)
                return 0
            s.trailers = headers
            s.replay_ok = False
            s.replay = None
            if s.peer is not None:
                _send_trailers(s.peer, headers)
            elif s.hold:
                s.held_trailers = headers
                s.held_end = True
            else:
                _event(self, (EV_TRAILERS, s))
            self._recv_end(s)
            return 0
        # response headers (client role)
        why = _check_fields(s, headers, 1)
        if why is not None:
            self._stream_error(s, E_PROTOCOL_ERROR)
            return 0
        if s.status < 200:
            if end_stream:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return 0
            if s.peer is not None and s.status != 101:
                _send_headers(s.peer, headers, False)
            return 0
        s.recv_headers = True
        s.headers = headers
        s.t_response_ns = _now()
        if s.peer is not None:
            peer = s.peer
            if (peer.retry is not None and peer.replay_ok and not peer.sent_headers
                    and peer.retry.wants(s.status, s.grpc_status if end_stream else -1)
                    and peer.retry.hook(peer, s, RETRY_STATUS)):
                # Another attempt instead: nothing of this response goes downstream.
                _detach(s, peer)
                if end_stream and s.sent_end:
                    self._recv_end(s)
                else:
                    self._stream_error(s, E_CANCEL)
                _event(peer.conn, (EV_RETRY, peer))
                _mark(peer.conn)
                return 0
            peer.replay_ok = False  # the upstream processed it: never sent again
            peer.replay = None
        if s.head or s.status == 304 or s.status == 204:
            s.content_length = -1
        if s.peer is not None:
            _send_headers(s.peer, headers, end_stream)
        else:
            _event(self, (EV_RESPONSE, s))
        if end_stream:
            if s.content_length > 0:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return 0
            self._recv_end(s)
        return 0

    cdef int _on_window_update(self, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        cdef uint32_t inc
        cdef Stream s
        if length != 4:
            raise FrameSizeError(f"WINDOW_UPDATE frame of length {length}")
        inc = read_u32(p) & STREAM_MASK
        if sid == 0:
            if inc == 0:
                raise ProtocolError("WINDOW_UPDATE with increment 0 on the connection")
            self.conn_send_window += inc
            if self.conn_send_window > MAX_WINDOW:
                raise FlowControlError("connection flow-control window above 2^31-1")
            self._flush_blocked()
            return 0
        s = self.streams.get(sid)
        if s is None:
            if self._is_idle_id(sid):
                raise ProtocolError(f"WINDOW_UPDATE on idle stream {sid}")
            return 0  # closed: allowed for a while
        if inc == 0:
            self._stream_error(s, E_PROTOCOL_ERROR)
            return 0
        s.send_window += inc
        if s.send_window > MAX_WINDOW:
            self._stream_error(s, E_FLOW_CONTROL_ERROR)
            return 0
        if s.pending is not None and (PyByteArray_GET_SIZE(s.pending) or s.pending_end):
            self._flush_stream(s)
        return 0

    cdef int _on_settings(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        cdef uint32_t i, ident, value
        cdef int64_t delta
        if sid != 0:
            raise ProtocolError(f"SETTINGS frame on stream {sid}")
        if flags & F_ACK:
            if length:
                raise FrameSizeError("SETTINGS ACK with a payload")
            if not self._settings_acked:
                self._settings_acked = True
                if self._header_table_size < 4096:
                    self.decoder.max_table_size = self._header_table_size
            return 0
        if length % 6:
            raise FrameSizeError(f"SETTINGS frame of length {length}, not a multiple of 6")
        if not self.got_remote_settings:
            self.got_remote_settings = True
            self.remote_max_concurrent = 0xFFFFFFFF  # no limit unless this frame sets one
        for i in range(0, length, 6):
            ident = (<uint32_t>p[i] << 8) | p[i + 1]
            value = read_u32(p + i + 2)
            if ident == 0x1:
                self.encoder.header_table_size = value
            elif ident == 0x2:
                if value > 1 or (self.client and value == 1):
                    raise ProtocolError(f"SETTINGS_ENABLE_PUSH = {value}")
            elif ident == 0x3:
                self.remote_max_concurrent = value
            elif ident == 0x4:
                if value > MAX_WINDOW:
                    raise FlowControlError(f"SETTINGS_INITIAL_WINDOW_SIZE = {value}")
                delta = <int64_t>value - self.remote_initial_window
                self.remote_initial_window = value
                for s in self.streams.values():
                    (<Stream>s).send_window += delta
                    if (<Stream>s).send_window > MAX_WINDOW:
                        raise FlowControlError("a stream's window above 2^31-1 after SETTINGS_INITIAL_WINDOW_SIZE")
                if delta > 0:
                    for s in list(self.streams.values()):
                        if (<Stream>s).pending is not None and PyByteArray_GET_SIZE((<Stream>s).pending):
                            self._flush_stream(<Stream>s)
            elif ident == 0x5:
                if not MIN_MAX_FRAME_SIZE <= value <= MAX_FRAME_LENGTH:
                    raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE = {value}")
                self.remote_max_frame_size = value
            elif ident == 0x6:
                self.remote_max_header_list = value
        cdef uint8_t* q = grow(self.out, HEADER_SIZE)
        put_frame_header(q, 0, T_SETTINGS, F_ACK, 0)
        return 0

    cdef int _on_rst_stream(self, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        cdef Stream s
        if sid == 0:
            raise ProtocolError("RST_STREAM frame on stream 0")
        if length != 4:
            raise FrameSizeError(f"RST_STREAM frame of length {length}")
        s = self.streams.get(sid)
        if s is None:
            if self._is_idle_id(sid):
                raise ProtocolError(f"RST_STREAM on idle stream {sid}")
            return 0
        s.error_code = read_u32(p)
        s.closed_remote_reset = True
        if s.error_code == E_REFUSED_STREAM and self.client:
            s.unprocessed = True
        self._close(s, True)
        return 0

    cdef int _on_ping(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        if sid != 0:
            raise ProtocolError(f"PING frame on stream {sid}")
        if length != 8:
            raise FrameSizeError(f"PING frame of length {length}")
        if flags & F_ACK:
            if self._shutdown_ping and memcmp(p, PyBytes_AS_STRING(SHUTDOWN_PING), 8) == 0:
                self._shutdown_ping = False
                self._goaway(self.last_peer_stream, E_NO_ERROR, b"")
                self._check_idle()
            return 0
        cdef uint8_t* q = grow(self.out, HEADER_SIZE + 8)
        put_frame_header(q, 8, T_PING, F_ACK, 0)
        memcpy(q + HEADER_SIZE, p, 8)
        return 0

    cdef int _on_goaway(self, uint32_t sid, const uint8_t* p, uint32_t length) except -1:
        cdef uint32_t last
        cdef Stream s
        if sid != 0:
            raise ProtocolError(f"GOAWAY frame on stream {sid}")
        if length < 8:
            raise FrameSizeError(f"GOAWAY frame of length {length}")
        last = read_u32(p) & STREAM_MASK
        if self.goaway_received and last > self.goaway_received_last:
            raise ProtocolError("GOAWAY raised the last stream id")
        self.goaway_received = True
        self.goaway_received_last = last
        self.goaway_received_code = read_u32(p + 4)
        _event(self, (EV_GOAWAY, last, self.goaway_received_code,
                            PyBytes_FromStringAndSize(<const char*>p + 8, length - 8)))
        # Our streams above ``last`` were never seen by the peer: safe to retry elsewhere.
        for s in list(self.streams.values()):
            if ((<Stream>s).id & 1) == (1 if self.client else 0) and (<Stream>s).id > last:
                (<Stream>s).unprocessed = True
                (<Stream>s).error_code = E_REFUSED_STREAM
                (<Stream>s).closed_remote_reset = True
                self._close(<Stream>s, True)
        self._check_idle()
        return 0

    # -- sending ----------------------------------------------------------

    def open_stream(self, headers, bint end_stream=False):
        """Open a client stream with ``headers``; returns the Stream."""
        if not self.client:
            raise ValueError("only the client role opens streams")
        if not self._may_open():
            raise ValueError("no new stream can be opened on this connection")
        cdef Stream s = _new_stream(self, self.next_stream_id)
        self.next_stream_id += 2
        self.open_local += 1
        s.state = S_OPEN
        s.notify_close = not self.hold_new
        for h in headers:
            if h[0] == b":method" and h[1] == b"HEAD":
                s.head = True
        _send_headers(s, list(headers), end_stream)
        return s

    def open_forward(self, Stream src, authority=None, path=None, timeout_ns=-1):
        """Open a stream carrying ``src``'s request upstream and link the two.

        The request headers are re-encoded with ``authority``/``path``
        rewritten when given, ``grpc-timeout`` replaced by ``timeout_ns`` when
        that is >= 0 (the time left), and ``x-request-id`` added when absent
        and the connection generates them. DATA that arrived before the link
        is forwarded now. When ``src.retry`` has a per-try timeout, the new
        stream is armed in its ``TryTimeouts``.
        """
        cdef list out = []
        cdef tuple h
        cdef bytes name
        cdef int mode = src.conn._trace_mode
        cdef Py_ssize_t tp_at = -1, n
        cdef const char* q
        cdef object b3_trace = None, b3_sampled = None, b3_flags = None
        cdef bint end = (src.held_end and src.held_trailers is None and not src.held_bytes
                         and not (src.resend and src.replay is not None and PyByteArray_GET_SIZE(src.replay)))
        if not self._may_open():
            raise ValueError("no new stream can be opened on this connection")
        for item in src.headers:
            h = <tuple>item
            name = <bytes>h[0]
            if PyBytes_AS_STRING(name)[0] == 58:
                if authority is not None and name == b":authority":
                    h = (name, authority)
                elif path is not None and name == b":path":
                    h = (name, path)
                out.append(h)
                continue
            if name == b"grpc-timeout" and timeout_ns >= 0:
                continue
            if name == b"host" and authority is not None:
                continue
            if mode:
                n = PyBytes_GET_SIZE(name)
                q = PyBytes_AS_STRING(name)
                if n == 11 and memcmp(q, b"traceparent", 11) == 0:
                    if tp_at >= 0:
                        continue  # repeated: it was invalid anyway, and the first one is replaced
                    tp_at = len(out)
                elif n == 12 and memcmp(q, b"x-b3-traceid", 12) == 0:
                    b3_trace = h[1]
                elif n == 12 and memcmp(q, b"x-b3-sampled", 12) == 0:
                    b3_sampled = h[1]
                elif n == 10 and memcmp(q, b"x-b3-flags", 10) == 0:
                    b3_flags = h[1]
            out.append(h)
        if timeout_ns >= 0 and src.is_grpc:
            out.append((b"grpc-timeout", format_grpc_timeout(timeout_ns)))
        if src.request_id is None and src.conn.generate_request_id:
            src.request_id = self._make_request_id()
            out.append((b"x-request-id", src.request_id))
        if mode:
            if not src.trace_done:
                _trace(src, mode, b3_trace, b3_sampled, b3_flags)
            if src.trace_out is not None:
                if tp_at >= 0:
                    out[tp_at] = (H_TRACEPARENT, src.trace_out)
                else:
                    out.append((H_TRACEPARENT, src.trace_out))
        cdef Stream s = _new_stream(self, self.next_stream_id)
        self.next_stream_id += 2
        self.open_local += 1
        s.state = S_OPEN
        s.head = src.head
        s.is_grpc = src.is_grpc
        src.peer = s
        s.peer = src
        _send_headers(s, out, end)
        _release_held(src)
        cdef RetryOn retry = src.retry
        if retry is not None and retry.per_try_ns:
            retry.timeouts._insert(retry._try_queue, s, s.t_open_ns + retry.per_try_ns)
        return s

    cdef bytes _make_request_id(self):
        # A version-4 UUID from the connection's generator.
        cdef uint64_t a = _random64(self)
        cdef uint64_t b = _random64(self)
        a = (a & 0xFFFFFFFFFFFF0FFFULL) | 0x4000ULL            # version 4
        b = (b & 0x3FFFFFFFFFFFFFFFULL) | 0x8000000000000000ULL  # variant 10
        # xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx, formatted by hand (this runs per request)
        cdef char[36] out
        cdef int i, k = 0
        cdef uint64_t v
        for i in range(36):
            if i == 8 or i == 13 or i == 18 or i == 23:
                out[i] = 45
                continue
            v = a if k < 16 else b
            out[i] = _HEX[(v >> (60 - 4 * (k & 15))) & 0xF]
            k += 1
        return PyBytes_FromStringAndSize(out, 36)

    def send_headers(self, Stream s, headers, bint end_stream=False):
        if s.conn is not self:
            raise ValueError("stream of another connection")
        if s.state == S_CLOSED or s.sent_end:
            raise ValueError(f"stream {s.id} cannot send")
        if s.sent_headers:
            _send_trailers(s, list(headers))
        else:
            _send_headers(s, list(headers), end_stream)

    def send_data(self, Stream s, data, bint end_stream=False):
        """Queue DATA on ``s``: sent as the windows allow, the rest waits in the stream."""
        cdef Py_buffer view
        if s.conn is not self:
            raise ValueError("stream of another connection")
        if s.state == S_CLOSED or s.sent_end or not s.sent_headers:
            raise ValueError(f"stream {s.id} cannot send DATA")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            _send_data(s, <const uint8_t*>view.buf, view.len, end_stream, None)
        finally:
            PyBuffer_Release(&view)

    def reset_stream(self, Stream s, error_code=E_CANCEL):
        if s.state != S_CLOSED:
            self._stream_error(s, error_code)
        return self._take_events()

    def respond(self, Stream s, int status, headers=(), body=b"", grpc_status=None, grpc_message=None):
        """An answer made by the proxy: gRPC as trailers-only, else status + body.

        A request still being received is then reset with NO_ERROR (§8.1),
        and a linked upstream stream is cancelled. A request without an
        ``x-request-id`` gets one when the connection generates them.
        Returns the events raised.
        """
        self._respond(s, status, headers, body, grpc_status, grpc_message)
        return self._take_events()

    cdef int _respond(self, Stream s, int status, object headers, bytes body, object grpc_status,
                      object grpc_message) except -1:
        cdef list hs
        if s.state == S_CLOSED or s.sent_headers:
            return 0
        if s.request_id is None and self.generate_request_id and not self.client:
            # Every request gets an id, as in Envoy's connection manager, the ones answered here too
            # (the access log names them by it); open_forward makes it for the rest.
            s.request_id = self._make_request_id()
        if s.peer is not None:
            peer = s.peer
            if peer.pending is not None and PyByteArray_GET_SIZE(peer.pending):
                # request body still queued for the upstream: it was received here, give it back
                self._credit(s, PyByteArray_GET_SIZE(peer.pending))
                peer.pending = None
            _unlink(s)
            if peer.state != S_CLOSED:
                peer.conn._stream_error(peer, E_CANCEL)
                _mark(peer.conn)
        if grpc_status is not None:
            hs = [H_STATUS_200, H_GRPC_CT, (b"grpc-status", b"%d" % grpc_status)]
            if grpc_message:
                hs.append((b"grpc-message", _percent_encode(grpc_message)))
            hs.extend(headers)
            _send_headers(s, hs, True)
        else:
            hs = [(b":status", b"%d" % status)]
            hs.extend(headers)
            if body:
                hs.append((b"content-length", b"%d" % len(body)))
            _send_headers(s, hs, not body)
            if body:
                _send_data(s, <const uint8_t*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), True, None)
        if s.state != S_CLOSED and not s.recv_end:
            if s.sent_end:
                self._stream_error(s, E_NO_ERROR)
            else:
                s.reset_after_end = True  # the body waits for window: reset once it is out
        _mark(self)
        return 0

    # -- internals ----------------------------------------------------------

    cdef int _window_update(self, uint32_t sid, uint32_t inc) except -1:
        cdef uint8_t* q = grow(self.out, HEADER_SIZE + 4)
        put_frame_header(q, 4, T_WINDOW_UPDATE, 0, sid)
        put_u32(q + HEADER_SIZE, inc)
        return 0

    cdef int _ping(self, bytes opaque, bint ack) except -1:
        cdef uint8_t* q = grow(self.out, HEADER_SIZE + 8)
        put_frame_header(q, 8, T_PING, F_ACK if ack else 0, 0)
        memcpy(q + HEADER_SIZE, PyBytes_AS_STRING(opaque), 8)
        return 0

    cdef int _goaway(self, uint32_t last, uint32_t code, bytes debug) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(debug)
        cdef uint8_t* q = grow(self.out, HEADER_SIZE + 8 + n)
        put_frame_header(q, 8 + n, T_GOAWAY, 0, 0)
        put_u32(q + HEADER_SIZE, last)
        put_u32(q + HEADER_SIZE + 4, code)
        memcpy(q + HEADER_SIZE + 8, PyBytes_AS_STRING(debug), n)
        self.goaway_sent = True
        self.goaway_sent_last = last
        return 0

    cdef int _terminate(self, uint32_t code, str message) except -1:
        self._goaway(self.last_peer_stream, code, message.encode("utf-8", "replace")[:256])
        self.terminated = True
        self.hb_stream = 0
        self._abort_streams(E_CANCEL if code == E_NO_ERROR else code)
        _event(self, (EV_TERMINATED, code, message))
        return 0

    cdef int _abort_streams(self, uint32_t code) except -1:
        cdef Stream s
        for s in list(self.streams.values()):
            if s.error_code < 0:
                s.error_code = code
            self._close(s, True)
        return 0

    cdef int _credit_connection(self, Py_ssize_t n) except -1:
        self.conn_recv_unacked += n
        if self.conn_recv_unacked >= self.local_connection_window // 2 and not self.terminated:
            self._window_update(0, <uint32_t>self.conn_recv_unacked)
            self.conn_recv_window += self.conn_recv_unacked
            self.conn_recv_unacked = 0
            _mark(self)
        return 0

    cdef int _credit(self, Stream s, Py_ssize_t n) except -1:
        """``n`` received bytes of ``s`` were consumed: return them to the sender's windows."""
        if n <= 0:
            return 0
        self._credit_connection(n)
        if s.state == S_CLOSED or s.recv_end:
            return 0
        s.recv_unacked += n
        if s.recv_unacked >= self.local_initial_window // 2:
            self._window_update(s.id, <uint32_t>s.recv_unacked)
            s.recv_window += s.recv_unacked
            s.recv_unacked = 0
            _mark(self)
        return 0

    cdef int _recv_end(self, Stream s) except -1:
        s.recv_end = True
        if s.state == S_OPEN:
            s.state = S_HALF_REMOTE
        elif s.state == S_HALF_LOCAL:
            self._close(s, False)
        return 0

    cdef int _sent_end(self, Stream s) except -1:
        s.sent_end = True
        if s.state == S_OPEN:
            s.state = S_HALF_LOCAL
            if s.reset_after_end:
                self._stream_error(s, E_NO_ERROR)  # §8.1: the request body is not wanted
        elif s.state == S_HALF_REMOTE:
            self._close(s, False)
        return 0

    cdef int _ignore(self, uint32_t sid) except -1:
        self._recent_resets[sid] = None
        if len(self._recent_resets) > RECENT_RESETS:
            del self._recent_resets[next(iter(self._recent_resets))]
        return 0

    cdef int _stream_error_id(self, uint32_t sid, uint32_t code) except -1:
        cdef Stream s = self.streams.get(sid)
        if s is not None:
            return self._stream_error(s, code)
        self._rst(sid, code)
        return 0

    cdef int _rst(self, uint32_t sid, uint32_t code) except -1:
        cdef uint8_t* q = grow(self.out, HEADER_SIZE + 4)
        put_frame_header(q, 4, T_RST_STREAM, 0, sid)
        put_u32(q + HEADER_SIZE, code)
        self._ignore(sid)
        _mark(self)
        return 0

    cdef int _stream_error(self, Stream s, uint32_t code) except -1:
        """Reset ``s`` with ``code`` (a stream error, or our own cancel); the connection lives on."""
        if s.state == S_CLOSED:
            return 0
        if not self.terminated:
            self._rst(s.id, code)
        if s.error_code < 0 or code != E_NO_ERROR:
            s.error_code = code
        if code != E_NO_ERROR:
            self.protocol_errors += code in (E_PROTOCOL_ERROR, E_FLOW_CONTROL_ERROR, E_FRAME_SIZE_ERROR)
        self._close(s, code != E_NO_ERROR or not s.sent_end)
        return 0

    cdef int _close(self, Stream s, bint abnormal) except -1:
        """Take ``s`` out of the connection; on an abnormal end, tell its linked peer.

        Bytes nobody will now send or consume go back to the connection
        window they were counted against, so a reset never shrinks a window
        for good.
        """
        cdef Stream peer = s.peer
        if s.state == S_CLOSED:
            return 0
        s.state = S_CLOSED
        del self.streams[s.id]
        if s.try_queue is not None:
            _try_unlink(s)
        if (s.id & 1) == (1 if self.client else 0):
            self.open_local -= 1
        else:
            self.open_remote -= 1
        if s.held is not None:
            if PyByteArray_GET_SIZE(s.held):
                self._credit_connection(PyByteArray_GET_SIZE(s.held))  # received here, never forwarded
            s.held = None
        if (abnormal and self.client and peer is not None and peer.replay_ok and not peer.sent_headers
                and peer.state != S_CLOSED and (
                    (s.unprocessed and peer.redispatched < MAX_REDISPATCH)
                    or (not s.unprocessed and peer.retry is not None and peer.retry.on_reset
                        and peer.retry.hook(peer, s, RETRY_RESET)))):
            # The upstream never saw this request (REFUSED_STREAM, or above its
            # GOAWAY's last stream id), or it did and the route retries resets:
            # hand it back to be sent elsewhere.
            if s.unprocessed:
                peer.redispatched += 1
            _detach(s, peer)
            _event(peer.conn, (EV_RETRY, peer))
            if s.notify_close:
                _event(self, (EV_CLOSED, s))
            self._check_idle()
            return 0
        if s.pending is not None:
            if abnormal and PyByteArray_GET_SIZE(s.pending) and peer is not None:
                peer.conn._credit_connection(PyByteArray_GET_SIZE(s.pending))  # received by the peer
                _mark(peer.conn)
            s.pending = None
        if peer is not None:
            if abnormal and self.client and peer.pending_end and not peer.sent_end and peer.state != S_CLOSED:
                # An upstream that sent its whole response and then reset the
                # stream (§8.1, to stop the request body): the response waits in
                # the downstream stream for a slow client; let it drain, credit
                # comes back as it leaves.
                pass
            elif abnormal:
                if peer.pending is not None and PyByteArray_GET_SIZE(peer.pending):
                    self._credit_connection(PyByteArray_GET_SIZE(peer.pending))  # received here
                    peer.pending = None
                    peer.pending_end = False
                    peer.pending_trailers = None
                _unlink(s)
                if peer.state != S_CLOSED:
                    _peer_reset(peer, s)
            elif peer.state == S_CLOSED:
                _unlink(s)  # both ends done: break the reference cycle
        if s.notify_close:
            _event(self, (EV_CLOSED, s))
        self._check_idle()
        return 0

    cdef int _check_idle(self) except -1:
        if not self.streams and (self.goaway_sent or self.goaway_received) and not self._shutdown_ping:
            _event(self, (EV_IDLE,))
        return 0

    cdef int _flush_stream(self, Stream s) except -1:
        """Send what waits in ``s`` as the windows allow; credit its source for what left."""
        cdef Py_ssize_t n, sent
        cdef bytearray buf = s.pending
        if buf is None or s.state == S_CLOSED or s.sent_end or self.write_paused:
            return 0
        n = PyByteArray_GET_SIZE(buf)
        sent = _write_data(s, <const uint8_t*>PyByteArray_AS_STRING(buf), n,
                           s.pending_end and s.pending_trailers is None)
        if sent:
            del buf[:sent]
            if s.peer is not None:
                s.peer.conn._credit(s.peer, sent)
                _mark(s.peer.conn)
        if sent == n and s.state != S_CLOSED:
            if s.pending_trailers is not None:
                trailers = s.pending_trailers
                s.pending_trailers = None
                _write_headers(s, trailers, True)
            elif s.pending_end and not s.sent_end:
                # an empty END_STREAM when the data had been sent without it
                _write_data(s, NULL, 0, True)
        _mark(self)
        return 0

    cdef int _flush_blocked(self) except -1:
        cdef list blocked = self._blocked
        cdef Stream s
        self._blocked = []
        for s in blocked:
            s.blocked = False
            if s.pending is not None and (PyByteArray_GET_SIZE(s.pending) or s.pending_end):
                self._flush_stream(s)
        return 0


cdef inline uint64_t _mix(uint64_t z) noexcept:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t _random64(H2Connection c) noexcept:
    # The connection's splitmix64 generator, seeded from os.urandom (request ids, trace and span ids).
    c._rid_state += 0x9E3779B97F4A7C15ULL
    return _mix(c._rid_state)


# -- telemetry: what the core notes for metrics, logs and traces -----------------------------------------


cdef inline void _count_messages(Stream s, const uint8_t* p, Py_ssize_t n) noexcept:
    """Count the gRPC messages whose 5-byte prefix (flag, 4-byte length) completes in ``p[:n]``.

    Prefixes and bodies may span DATA frames: the stream keeps where it is.
    """
    cdef Py_ssize_t i = 0, take
    while i < n:
        if s.msg_left:
            take = n - i if n - i < s.msg_left else <Py_ssize_t>s.msg_left
            s.msg_left -= take
            i += take
            continue
        if not s.prefix_have and n - i >= 5:
            # the common case: a whole prefix in this frame
            s.grpc_msgs_recv += 1
            s.msg_left = read_u32(p + i + 1)
            i += 5
            continue
        if s.prefix_have:
            s.msg_len = (s.msg_len << 8) | p[i]  # bytes 1-4: the length, big-endian
        s.prefix_have += 1
        i += 1
        if s.prefix_have == 5:
            s.grpc_msgs_recv += 1
            s.msg_left = s.msg_len
            s.msg_len = 0
            s.prefix_have = 0


cdef inline void _note_sent(Stream s, list headers, bint end_stream):
    """Server role: record the final :status and the grpc-status of what goes downstream.

    Only (bytes, bytes) pairs are read (the encoder also takes str, which this never sees from the proxy).
    """
    cdef object h, name, value
    cdef const char* q
    cdef int64_t v
    if not headers:
        return
    h = headers[0]
    if isinstance(h, tuple) and PyTuple_GET_SIZE(h) == 2:
        name = (<tuple>h)[0]
        value = (<tuple>h)[1]
        if (type(name) is bytes and PyBytes_GET_SIZE(name) == 7 and type(value) is bytes
                and PyBytes_GET_SIZE(value) == 3 and memcmp(PyBytes_AS_STRING(name), b":status", 7) == 0):
            q = PyBytes_AS_STRING(value)
            if 50 <= q[0] <= 57 and 48 <= q[1] <= 57 and 48 <= q[2] <= 57:  # a final status: 200-999
                s.status = (q[0] - 48) * 100 + (q[1] - 48) * 10 + (q[2] - 48)
    if end_stream:
        for h in headers:
            if isinstance(h, tuple) and PyTuple_GET_SIZE(h) == 2:
                name = (<tuple>h)[0]
                value = (<tuple>h)[1]
                if (type(name) is bytes and type(value) is bytes and PyBytes_GET_SIZE(name) == 11
                        and memcmp(PyBytes_AS_STRING(name), b"grpc-status", 11) == 0):
                    v = _parse_uint(<bytes>value)
                    s.grpc_status = <int>v if 0 <= v <= 0x7FFFFFFF else 2


cdef inline int _hex_digit(uint8_t ch) noexcept:
    if 48 <= ch <= 57:
        return ch - 48
    if 97 <= ch <= 102:
        return ch - 87
    return -1


cdef bint _lower_hex(const uint8_t* p, Py_ssize_t n, bint nonzero) noexcept:
    """``p[:n]`` is lowercase hex (W3C trace context allows no other), and not all zeros if ``nonzero``."""
    cdef Py_ssize_t i
    cdef int d, seen = 0
    for i in range(n):
        d = _hex_digit(p[i])
        if d < 0:
            return False
        seen |= d
    return seen != 0 or not nonzero


cdef int _parse_traceparent(Stream s, bytes value) except -1:
    """An incoming ``traceparent`` (W3C trace context, "version-traceid-parentid-flags").

    A valid one fills ``trace_id``, ``parent_span_id`` and ``sampled``; an invalid one (version ff, not
    lowercase hex, an all-zero id, the wrong length) or a repeated one leaves them empty.
    """
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    if s.trace_in:
        s.trace_in = 1
        s.trace_id = s.parent_span_id = EMPTY
        s.sampled = False
        return 0
    s.trace_in = 1
    if n < 55 or p[2] != 45 or p[35] != 45 or p[52] != 45:
        return 0
    if not _lower_hex(p, 2, False) or (p[0] == 102 and p[1] == 102):
        return 0
    if (n != 55 and p[0] == 48 and p[1] == 48) or (n > 55 and p[55] != 45):
        return 0  # version 00 is exactly 55 characters; a later version may add fields after a dash
    if not _lower_hex(p + 3, 32, True) or not _lower_hex(p + 36, 16, True) or not _lower_hex(p + 53, 2, False):
        return 0
    s.trace_in = 2 + (_hex_digit(p[53]) << 4 | _hex_digit(p[54]))
    s.trace_id = value[3:35]
    s.parent_span_id = value[36:52]
    s.sampled = (s.trace_in - 2) & 1
    return 0


cdef bytes _b3_trace_id(object value):
    """``x-b3-traceid`` (16 or 32 hex digits, either case) as 32 lowercase hex, or None if unusable."""
    cdef bytes v
    cdef Py_ssize_t n, i
    cdef char[32] out
    cdef uint8_t ch
    cdef bint nonzero = False
    if type(value) is not bytes:
        return None
    v = <bytes>value
    n = PyBytes_GET_SIZE(v)
    if n != 16 and n != 32:
        return None
    for i in range(32 - n):
        out[i] = 48
    for i in range(n):
        ch = <uint8_t>PyBytes_AS_STRING(v)[i]
        if 65 <= ch <= 70:
            ch += 32
        if _hex_digit(ch) < 0:
            return None
        nonzero = nonzero or ch != 48
        out[32 - n + i] = ch
    if not nonzero:
        return None
    return PyBytes_FromStringAndSize(out, 32)


cdef inline void _put_hex64(char* out, uint64_t v) noexcept:
    cdef int i
    for i in range(16):
        out[i] = _HEX[(v >> (60 - 4 * i)) & 0xF]


cdef int _trace(Stream src, int mode, object b3_trace, object b3_sampled, object b3_flags) except -1:
    """Work out the trace context ``src``'s request carries upstream (trace_mode 1 or 2), once per request.

    A valid incoming traceparent is kept (mode 1) or gets the proxy's span as its parent (mode 2); otherwise
    a new one starts: the trace id from x-b3-traceid if usable, else random; sampled as x-b3-flags /
    x-b3-sampled say, else with probability ``trace_sampling``.
    """
    cdef H2Connection c = src.conn
    cdef uint64_t a, b
    cdef char[55] tp
    cdef bytes tid
    cdef double u
    cdef bint sampled
    src.trace_done = True
    if src.trace_in >= 2:
        if mode == 1:
            src.trace_out = None  # forwarded as it came
            return 0
        memcpy(tp, b"00-", 3)
        memcpy(tp + 3, PyBytes_AS_STRING(src.trace_id), 32)
        tp[35] = 45
        a = _random64(c)
        _put_hex64(tp + 36, a if a else 1)
        tp[52] = 45
        tp[53] = _HEX[((src.trace_in - 2) >> 4) & 0xF]
        tp[54] = _HEX[(src.trace_in - 2) & 0xF]
        src.trace_out = PyBytes_FromStringAndSize(tp, 55)
        src.span_id = PyBytes_FromStringAndSize(tp + 36, 16)
        return 0
    tid = _b3_trace_id(b3_trace) if b3_trace is not None else None
    memcpy(tp, b"00-", 3)
    if tid is not None:
        memcpy(tp + 3, PyBytes_AS_STRING(tid), 32)
    else:
        a = _random64(c)
        b = _random64(c)
        if a == 0 and b == 0:
            b = 1  # never the invalid all-zero trace id
        _put_hex64(tp + 3, a)
        _put_hex64(tp + 19, b)
    tp[35] = 45
    a = _random64(c)
    _put_hex64(tp + 36, a if a else 1)
    tp[52] = 45
    if b3_flags == b"1":
        sampled = True  # B3 debug
    elif b3_sampled == b"1" or b3_sampled == b"true":
        sampled = True
    elif b3_sampled == b"0" or b3_sampled == b"false":
        sampled = False
    elif c._trace_sampling >= 1.0:
        sampled = True
    elif c._trace_sampling <= 0.0:
        sampled = False
    else:
        u = <double>(_random64(c) >> 11) * (1.0 / 9007199254740992.0)
        sampled = u < c._trace_sampling
    tp[53] = 48
    tp[54] = 49 if sampled else 48
    src.trace_out = PyBytes_FromStringAndSize(tp, 55)
    src.trace_id = PyBytes_FromStringAndSize(tp + 3, 32)
    src.span_id = PyBytes_FromStringAndSize(tp + 36, 16)
    src.parent_span_id = EMPTY
    src.sampled = sampled
    return 0


cdef bytes _percent_encode(object message):
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
    cdef bytes raw = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    out = bytearray()
    for ch in raw:
        if 0x20 <= ch <= 0x7E and ch != 0x25:
            out.append(ch)
        else:
            out += b"%%%02X" % ch
    return bytes(out)


cdef void _unlink(Stream s) noexcept:
    if s.peer is not None:
        s.peer.peer = None
        s.peer = None


cdef int _detach(Stream up, Stream down) except -1:
    """Take ``down``'s request back from its attempt ``up`` to be sent again: unlinked, holding
    what arrives, its replay copy to go out first on the next link."""
    if up.pending is not None and PyByteArray_GET_SIZE(up.pending):
        down.conn._credit(down, PyByteArray_GET_SIZE(up.pending))  # sent again from the replay copy
        _mark(down.conn)
    up.pending = None
    up.pending_end = False
    up.pending_trailers = None
    _unlink(up)
    down.attempts += 1
    down.hold = True
    down.resend = True
    if down.recv_end and down.trailers is None:
        down.held_end = True
    return 0


def abandon(Stream down):
    """Cancel the attempt in flight for ``down``'s request and keep the request to send again.

    For a per-try timeout. Possible while no response headers came back and
    the request body is whole in the replay copy: then the upstream stream
    is reset (CANCEL), ``down`` is unlinked and holds what arrives, and the
    next ``open_forward`` sends the request again; returns True. Otherwise
    changes nothing and returns False. Raises no event.
    """
    cdef Stream up = down.peer
    if up is None or down.state == S_CLOSED or down.sent_headers or not down.replay_ok or up.recv_headers:
        return False
    _detach(up, down)
    if up.state != S_CLOSED:
        up.conn._stream_error(up, E_CANCEL)
        _mark(up.conn)
    return True


def link(Stream a, Stream b):
    """Link two streams on two connections: from now on each forwards to the other in C."""
    if a.peer is not None or b.peer is not None:
        raise ValueError("stream already linked")
    a.peer = b
    b.peer = a
    _release_held(a)
    _release_held(b)


cdef int _release_held(Stream s) except -1:
    """Forward what ``s`` received before it was linked."""
    cdef bytearray held = s.held
    cdef bytearray again
    cdef Stream dst = s.peer
    cdef bint more
    s.hold = False
    if dst is None:
        return 0
    if s.resend:
        # Sent once already (and credited then): sent again without crediting anyone.
        s.resend = False
        again = s.replay
        if again is not None and PyByteArray_GET_SIZE(again):
            more = (held is not None and PyByteArray_GET_SIZE(held) > 0) or s.held_trailers is not None
            _send_data(dst, <const uint8_t*>PyByteArray_AS_STRING(again), PyByteArray_GET_SIZE(again),
                       s.held_end and not more, None)
            if s.replay_ok:
                s.replay = bytearray(again)
    if held is not None:
        s.held = None
        if PyByteArray_GET_SIZE(held):
            _send_data(dst, <const uint8_t*>PyByteArray_AS_STRING(held), PyByteArray_GET_SIZE(held),
                       s.held_end and s.held_trailers is None, s)
        elif s.held_end and s.held_trailers is None and not dst.sent_end and dst.sent_headers:
            _send_data(dst, NULL, 0, True, s)
    elif s.held_end and s.held_trailers is None and not dst.sent_end and dst.sent_headers:
        _send_data(dst, NULL, 0, True, s)
    if s.held_trailers is not None:
        _send_trailers(dst, s.held_trailers)
        s.held_trailers = None
    return 0


cdef int _peer_reset(Stream dst, Stream src) except -1:
    """``src`` ended abnormally; end its linked stream ``dst`` accordingly.

    Downstream (server-role) streams get a gRPC status when no response has
    started (trailers-only, 14 UNAVAILABLE or 1 CANCELLED), else a reset.
    Upstream streams are cancelled.
    """
    cdef H2Connection c = dst.conn
    cdef int64_t code = src.error_code
    if c.client:
        c._stream_error(dst, E_CANCEL)
    elif dst.sent_end or dst.pending_end:
        # The whole response is out (or queued): only the request body is unwanted now.
        if not dst.recv_end and dst.sent_end:
            c._stream_error(dst, E_NO_ERROR)
    elif not dst.sent_headers and dst.is_grpc:
        status = _grpc_status_for_reset(code) if src.closed_remote_reset else 14
        reason = "upstream connection lost" if src.conn.terminated else \
            f"upstream reset the stream ({_code_name(code)})"
        dst.response_flags = "UR" if not src.conn.terminated else "UC"
        c._respond(dst, 200, (), b"", status, reason)
    elif not dst.sent_headers:
        dst.response_flags = "UR" if not src.conn.terminated else "UC"
        reason = b"upstream connect error or disconnect/reset before headers"
        c._respond(dst, 503, [(b"content-type", b"text/plain"), (b"x-meshproxy-response-flags",
                                                                b"UC" if src.conn.terminated else b"UR")],
                  reason, None, None)
    else:
        dst.response_flags = "UR" if not src.conn.terminated else "UC"
        c._stream_error(dst, E_INTERNAL_ERROR if code == E_NO_ERROR else (
            E_CANCEL if code == E_REFUSED_STREAM else <uint32_t>code))
    _mark(c)
    return 0


cdef int _grpc_status_for_reset(int64_t code) noexcept:
    # gRPC over HTTP/2: RST_STREAM codes as statuses. An upstream that refused
    # or broke the stream is UNAVAILABLE to the client, as Envoy answers.
    if code == E_CANCEL:
        return 1    # CANCELLED
    if code == E_ENHANCE_YOUR_CALM:
        return 8    # RESOURCE_EXHAUSTED
    if code == 0xC:
        return 7    # INADEQUATE_SECURITY -> PERMISSION_DENIED
    return 14       # UNAVAILABLE


cdef str _code_name(int64_t code):
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


cdef inline bint _informational(list headers):
    cdef tuple h
    if not headers:
        return False
    h = <tuple>headers[0]
    return h[0] == b":status" and PyBytes_GET_SIZE(<bytes>h[1]) == 3 and PyBytes_AS_STRING(<bytes>h[1])[0] == 49


cdef int _send_headers(Stream s, list headers, bint end_stream) except -1:
    cdef H2Connection c = s.conn
    if s.state == S_CLOSED or c.terminated:
        return 0
    if not c.client and _informational(headers):
        _write_headers(s, headers, False)  # 1xx: the final response is still to come
        return 0
    s.sent_headers = True
    _write_headers(s, headers, end_stream)
    return 0


cdef int _send_trailers(Stream s, list trailers) except -1:
    """Trailers end the stream; they wait behind DATA still queued."""
    if s.state == S_CLOSED or s.conn.terminated or s.sent_end:
        return 0
    if s.pending is not None and PyByteArray_GET_SIZE(s.pending):
        s.pending_trailers = trailers
        s.pending_end = True
        return 0
    if not s.sent_headers:
        # a trailers-only response cannot follow nothing: send them as the headers
        s.sent_headers = True
    _write_headers(s, trailers, True)
    return 0


cdef int _write_headers(Stream s, list headers, bint end_stream) except -1:
    cdef H2Connection c = s.conn
    cdef Encoder enc = c.encoder
    cdef Py_ssize_t n, off = 0, chunk, maxf = c.remote_max_frame_size
    cdef uint8_t* q
    cdef uint8_t flags
    enc._encode(headers, True)
    if not c.client:
        _note_sent(s, headers, end_stream)
    n = enc._out_len
    chunk = n if n <= maxf else maxf
    flags = (F_END_STREAM if end_stream else 0) | (F_END_HEADERS if chunk == n else 0)
    q = grow(c.out, HEADER_SIZE + chunk)
    put_frame_header(q, chunk, T_HEADERS, flags, s.id)
    memcpy(q + HEADER_SIZE, enc._out, chunk)
    off = chunk
    while off < n:
        chunk = n - off if n - off <= maxf else maxf
        q = grow(c.out, HEADER_SIZE + chunk)
        put_frame_header(q, chunk, T_CONTINUATION, F_END_HEADERS if off + chunk == n else 0, s.id)
        memcpy(q + HEADER_SIZE, enc._out + off, chunk)
        off += chunk
    _mark(c)
    if end_stream:
        c._sent_end(s)
    return 0


cdef Py_ssize_t _write_data(Stream s, const uint8_t* p, Py_ssize_t n, bint end) except -1:
    """Write as much of ``p[:n]`` as the windows allow as DATA frames; return how much.

    END_STREAM goes on the last frame only if all of it was written.
    """
    cdef H2Connection c = s.conn
    cdef Py_ssize_t allowed, chunk, off = 0, maxf = c.remote_max_frame_size
    cdef uint8_t* q
    if c.write_paused:
        return 0
    allowed = s.send_window if s.send_window < c.conn_send_window else c.conn_send_window
    if allowed < 0:
        allowed = 0
    if allowed > n:
        allowed = n
    while off < allowed:
        chunk = allowed - off if allowed - off <= maxf else maxf
        q = grow(c.out, HEADER_SIZE + chunk)
        put_frame_header(q, chunk, T_DATA, F_END_STREAM if end and off + chunk == n else 0, s.id)
        memcpy(q + HEADER_SIZE, p + off, chunk)
        off += chunk
    if n == 0 and end:
        q = grow(c.out, HEADER_SIZE)
        put_frame_header(q, 0, T_DATA, F_END_STREAM, s.id)
    s.send_window -= allowed
    c.conn_send_window -= allowed
    s.data_sent += allowed
    if off < n and not s.blocked and c.conn_send_window <= 0:
        s.blocked = True
        c._blocked.append(s)
    _mark(c)
    if end and off == n:
        c._sent_end(s)
    return off


cdef int _send_data(Stream dst, const uint8_t* p, Py_ssize_t n, bint end, Stream src) except -1:
    """Forward ``n`` bytes to ``dst``: now if its windows allow, else queued in it.

    ``src`` (the stream they came from, or None) is credited for what left.
    """
    cdef Py_ssize_t sent = 0
    if dst.state == S_CLOSED or dst.sent_end or dst.conn.terminated:
        if src is not None:
            src.conn._credit(src, n)
        return 0
    if src is not None and src.replay_ok and n:
        # A request body is kept (up to REPLAY_LIMIT) until the upstream answers,
        # so a request it never processed can be sent again elsewhere.
        if src.replay is None:
            src.replay = bytearray()
        if PyByteArray_GET_SIZE(src.replay) + n > REPLAY_LIMIT:
            src.replay_ok = False
            src.replay = None
        else:
            src.replay += p[:n]
    if (dst.pending is None or not PyByteArray_GET_SIZE(dst.pending)) and not dst.pending_end:
        sent = _write_data(dst, p, n, end)
        if sent == n and (dst.sent_end or not end):
            if src is not None and sent:
                src.conn._credit(src, sent)
            return 0
    if dst.pending is None:
        dst.pending = bytearray()
    dst.pending += p[sent:n]
    if end:
        dst.pending_end = True
    if src is not None and sent:
        src.conn._credit(src, sent)
    return 0
