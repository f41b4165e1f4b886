"""The sans-IO HTTP/2 connection (RFC 9113), pure-Python twin of ``meshproxy/_fast/conn.pyx``.

Same names, events, attributes and behaviour as the compiled twin, written
for reading: it is the oracle of the differential tests and the fallback when
the extensions are not built (``MESHPROXY_NO_EXTENSIONS=1``).

Owns one TCP connection's HTTP/2 state: the preface, SETTINGS and their ACK,
PING, GOAWAY (graceful in two steps, and abrupt), RST_STREAM, the §5.1
stream state machine, MAX_CONCURRENT_STREAMS both ways, connection and
stream flow control, header validation (§8.2-8.3), trailers, and header
blocks assembled from CONTINUATION frames under limits.

It never touches a socket. ``receive(bytes)`` parses every whole frame of a
read in one call and returns the events the Python layer must see, or None;
the bytes to send accumulate in the connection and are written by
``Outbox.flush()`` (or taken with ``data_to_send()``). Events raised outside
``receive`` (a linked peer's reset closes one of our streams, say) wait in the
connection: ``Outbox.flush()`` hands them to its ``handler``, or
``take_events()`` takes them.

Proxying: two streams on two connections are linked with ``link`` or
``open_forward``; from then on response headers, DATA, trailers and resets
cross from one to the other here, without events. DATA goes to the peer
connection's send buffer while the peer's windows allow, the rest waits in
the stream, and the sender gets WINDOW_UPDATE only as bytes actually leave.

For telemetry the core also counts gRPC messages on DATA
(``grpc_msgs_recv``), records the status and grpc-status a server-role
stream actually sent, and, per ``trace_mode``, reads, ensures or re-parents
the W3C ``traceparent`` a forwarded request carries (the Stream's trace
fields say what it did); one ``RequestStats.record`` per request reads it all.

Where this twin departs from the compiled one, a comment says ``BUG (compiled):``;
each such case has an xfail test in tests/conn_twin/test_differential.py.
"""

from __future__ import annotations

import os
import struct
import time
from operator import attrgetter

from meshproxy.codec.constants import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    FRAME_HEADER_SIZE,
    GOAWAY,
    HEADERS,
    MAX_MAX_FRAME_SIZE,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
)
from meshproxy.codec.hpack_py import DEFAULT_TABLE_SIZE, Decoder, Encoder
from meshproxy.errors import (
    CompressionError,
    EnhanceYourCalm,
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    H2Error,
    HeaderListTooLarge,
    ProtocolError,
    StreamClosedError,
)

__all__ = [
    "EV_CLOSED",
    "EV_DATA",
    "EV_GOAWAY",
    "EV_IDLE",
    "EV_REQUEST",
    "EV_RESPONSE",
    "EV_RETRY",
    "EV_TERMINATED",
    "EV_TRAILERS",
    "RETRY_RESET",
    "RETRY_STATUS",
    "H2Connection",
    "Outbox",
    "RetryOn",
    "Stream",
    "TryTimeouts",
    "abandon",
    "link",
    "monotonic_ns",
]

# Events returned by receive(), as tuples whose first item is one of these.
EV_REQUEST = 1  # (EV_REQUEST, stream): a new request's headers (server role)
EV_RESPONSE = 2  # (EV_RESPONSE, stream): response headers on an unlinked client stream
EV_DATA = 3  # (EV_DATA, stream, bytes, end_stream): DATA on an unlinked stream that does not hold
EV_TRAILERS = 4  # (EV_TRAILERS, stream): trailers on an unlinked stream
EV_CLOSED = 5  # (EV_CLOSED, stream): a stream with notify_close ended (cleanly or reset)
EV_GOAWAY = 6  # (EV_GOAWAY, last_stream_id, error_code, debug): the peer is going away
EV_IDLE = 7  # (EV_IDLE,): no streams left on a connection that is going away: close it
EV_TERMINATED = 8  # (EV_TERMINATED, error_code, message): connection error; GOAWAY is queued: flush, close
EV_RETRY = 9  # (EV_RETRY, stream): send this request again (never processed upstream, or retry.hook said so)

# Why retry.hook is asked (its third argument).
RETRY_RESET = 1  # the upstream stream was reset, or its connection lost, before response headers
RETRY_STATUS = 2  # response headers whose status (or trailers-only grpc-status) retry wants

# Stream states (§5.1).
S_IDLE = 0
S_OPEN = 1
S_HALF_LOCAL = 2  # we sent END_STREAM
S_HALF_REMOTE = 3  # the peer sent END_STREAM
S_CLOSED = 4
STATE_NAMES = ("idle", "open", "half_closed_local", "half_closed_remote", "closed")

STREAM_MASK = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
DEFAULT_WINDOW = 65535
RECENT_RESETS = 256  # ids of streams we reset, whose late frames we ignore
MAX_CONTINUATIONS = 64  # CONTINUATION frames per header block (the 2024 flood)
LAST_CLIENT_ID = 0x7FFFFFFF - 2 * 1000  # leave room: a pool opens another connection first
REPLAY_LIMIT = 65536  # request body kept to resend a request the upstream never processed
MAX_REDISPATCH = 3  # times one request is sent again after REFUSED_STREAM / GOAWAY

E_NO_ERROR = ErrorCode.NO_ERROR.value
E_PROTOCOL_ERROR = ErrorCode.PROTOCOL_ERROR.value
E_FLOW_CONTROL_ERROR = ErrorCode.FLOW_CONTROL_ERROR.value
E_STREAM_CLOSED = ErrorCode.STREAM_CLOSED.value
E_FRAME_SIZE_ERROR = ErrorCode.FRAME_SIZE_ERROR.value
E_REFUSED_STREAM = ErrorCode.REFUSED_STREAM.value
E_CANCEL = ErrorCode.CANCEL.value
E_COMPRESSION_ERROR = ErrorCode.COMPRESSION_ERROR.value
E_INTERNAL_ERROR = ErrorCode.INTERNAL_ERROR.value
E_ENHANCE_YOUR_CALM = ErrorCode.ENHANCE_YOUR_CALM.value
E_INADEQUATE_SECURITY = ErrorCode.INADEQUATE_SECURITY.value

SHUTDOWN_PING = b"meshdown"

# Header names that are connection-specific in HTTP/1.1 and malformed in HTTP/2 (§8.2.2).
CONNECTION_HEADERS = frozenset([b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"])
# Not :protocol: we do not offer extended CONNECT (RFC 8441), so it is undefined here (§8.3).
REQUEST_PSEUDO = frozenset([b":method", b":scheme", b":path", b":authority"])

H_STATUS_200 = (b":status", b"200")
H_GRPC_CT = (b"content-type", b"application/grpc")

# grpc-timeout units, longest first, and their length in ns.
GRPC_UNITS = b"HMSmun"
GRPC_UNIT_NS = (3600 * 1_000_000_000, 60 * 1_000_000_000, 1_000_000_000, 1_000_000, 1_000, 1)
INT64_MAX = 0x7FFFFFFFFFFFFFFF
INT32_MAX = 0x7FFFFFFF
UINT64 = 0xFFFFFFFFFFFFFFFF

_FRAME_HEADER = struct.Struct(">BHBBL")  # length (24 bits, as 8 + 16), type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")


def monotonic_ns() -> int:
    """The clock the connection stamps streams with (CLOCK_MONOTONIC, ns)."""
    return time.monotonic_ns()


def parse_grpc_timeout(value: bytes) -> int:
    """``grpc-timeout`` in ns (at most 8 digits and a unit), or -1 if malformed."""
    if not 2 <= len(value) <= 9:
        return -1
    digits, unit = value[:-1], value[-1]
    if not all(0x30 <= d <= 0x39 for d in digits):
        return -1
    i = GRPC_UNITS.find(unit)
    if i < 0:
        return -1
    return min(int(digits) * GRPC_UNIT_NS[i], INT64_MAX)


def format_grpc_timeout(ns: int) -> bytes:
    """The shortest exact-enough ``grpc-timeout`` for ``ns`` (8 digits at most, rounded up)."""
    ns = max(ns, 0)
    for i in range(5, -1, -1):
        v = -(-ns // GRPC_UNIT_NS[i])
        if v < 100_000_000:
            return b"%d%c" % (v, GRPC_UNITS[i])
    return b"99999999H"


# -- the conversions the compiled twin gets from its C argument types ------------------------------


def _c_integer(value) -> int:
    if not isinstance(value, int):
        if not hasattr(type(value), "__int__") and not hasattr(type(value), "__index__"):
            raise TypeError("an integer is required")
        value = int(value)  # as Cython converts: a float is truncated
    return int(value)


def _uint32(value) -> int:
    value = _c_integer(value)
    if value < 0:
        raise OverflowError("can't convert negative value to uint32_t")
    if value > 0xFFFFFFFF:
        raise OverflowError("value too large to convert to uint32_t")
    return value


def _int32(value) -> int:
    value = _c_integer(value)
    if not -0x80000000 <= value <= INT32_MAX:
        raise OverflowError("value too large to convert to int")
    return value


def _int64(value) -> int:
    value = _c_integer(value)
    if not -0x8000000000000000 <= value <= INT64_MAX:
        raise OverflowError("Python int too large to convert to C long")
    return value


def _typed(value, cls: type, arg: str):
    # A typed argument of the compiled twin: None passes, anything else must be an instance.
    if value is not None and not isinstance(value, cls):
        expected = f"{cls.__module__}.{cls.__name__}"
        raise TypeError(f"Argument '{arg}' has incorrect type (expected {expected}, got {type(value).__name__})")
    return value


def _readonly(name: str) -> property:
    """A public attribute that Python code reads but only the connection writes (``cdef readonly``)."""
    return property(attrgetter("_" + name), doc=f"Read-only ``{name}``.")


# -- the outbox ------------------------------------------------------------------------------------


class Outbox:
    """The connections of one worker that have bytes to write.

    Every connection appends itself once when it gains output; ``flush()``
    hands each one's buffer to its ``writer`` (``transport.write``) and gives
    it a fresh one, so a buffer the transport keeps by reference is never
    written to again.
    """

    __slots__ = ("_dirty", "_evented")

    def __init__(self) -> None:
        self._dirty: list[H2Connection] = []
        self._evented: list[H2Connection] = []

    def flush(self) -> None:
        """Deliver pending events to each connection's ``handler``, then write what they produced."""
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
                if c._out and c.writer is not None:
                    buf = c._out
                    c._out = bytearray()
                    c.writer(buf)


def _event(c: H2Connection, ev: tuple) -> None:
    # Events of a connection other than the one being driven (a linked peer's
    # close, say) are delivered by the outbox to that connection's handler.
    c._events.append(ev)
    if not c._evented and c._outbox is not None:
        c._evented = True
        c._outbox._evented.append(c)


def _mark(c: H2Connection) -> None:
    if not c._dirty and c._outbox is not None:
        c._dirty = True
        c._outbox._dirty.append(c)


# -- streams ---------------------------------------------------------------------------------------


class RetryOn:
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

    __slots__ = (
        "_grpc_mask",
        "_on_5xx",
        "_on_gateway",
        "_on_reset",
        "_per_try_ns",
        "_statuses",
        "_timeouts",
        "_try_queue",
        "hook",
    )

    def __init__(
        self,
        hook,
        *,
        on_5xx=False,
        on_gateway=False,
        on_reset=False,
        statuses=(),
        grpc_statuses=(),
        per_try_ns=0,
        timeouts=None,
    ):
        per_try_ns = _int64(per_try_ns)
        _typed(timeouts, TryTimeouts, "timeouts")
        if not callable(hook):
            raise TypeError("hook must be callable")
        if per_try_ns < 0:
            raise ValueError("per_try_ns must be >= 0")
        if per_try_ns and timeouts is None:
            raise ValueError("a per-try timeout needs the TryTimeouts to arm it in")
        self._per_try_ns = per_try_ns
        self._timeouts = timeouts
        self._try_queue = timeouts._queue(per_try_ns) if per_try_ns else None
        mask = 0
        for g in grpc_statuses:
            if not 0 <= g <= 31:
                raise ValueError(f"grpc status {g} out of range")
            mask |= 1 << int(g)
        self.hook = hook
        self._on_5xx = bool(on_5xx)
        self._on_gateway = bool(on_gateway)
        self._on_reset = bool(on_reset)
        self._statuses = frozenset(int(x) for x in statuses)
        self._grpc_mask = mask

    on_5xx = property(attrgetter("_on_5xx"))
    on_gateway = property(attrgetter("_on_gateway"))
    on_reset = property(attrgetter("_on_reset"))
    statuses = property(attrgetter("_statuses"))
    grpc_mask = property(attrgetter("_grpc_mask"))
    per_try_ns = property(attrgetter("_per_try_ns"))
    timeouts = property(attrgetter("_timeouts"))

    def matches(self, status: int, grpc_status: int = -1) -> bool:
        """Whether response headers with ``status`` (and, trailers-only, ``grpc_status``; -1 none) qualify."""
        if status >= 500 and (self._on_5xx or (self._on_gateway and 502 <= status <= 504)):
            return True
        if 0 <= grpc_status < 32 and (self._grpc_mask >> grpc_status) & 1:
            return True
        return status in self._statuses


class _TryQueue:
    # The attempts of one TryTimeouts armed with one per-try timeout, in due order, linked through
    # Stream._try_next/_try_prev (opened in order with the same timeout: each is appended at the end).

    __slots__ = ("first", "last", "n")

    def __init__(self) -> None:
        self.first: Stream | None = None
        self.last: Stream | None = None
        self.n = 0


class TryTimeouts:
    """Per-try timeouts of one worker's attempts, armed and disarmed by the core.

    Nearly every attempt of a route with a per-try timeout is armed and
    almost none expires, so ``open_forward`` arms the attempt's upstream
    stream and the stream's close disarms it, with no allocation: each
    per-try timeout has a queue linked through its streams, and as attempts
    open in time order with the same timeout, each new one goes at the end
    of its queue.

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

    __slots__ = ("_arm", "_queues", "_slot_ns", "_timer_at")

    def __init__(self, arm, slot_ns=5_000_000) -> None:
        slot_ns = _int64(slot_ns)
        if not callable(arm):
            raise TypeError("arm must be callable")
        if slot_ns <= 0:
            raise ValueError("slot_ns must be > 0")
        self._arm = arm
        self._slot_ns = slot_ns
        self._queues: dict[int, _TryQueue] = {}  # per-try timeout (ns; -1 for add()) -> its queue
        self._timer_at = 0

    slot_ns = property(attrgetter("_slot_ns"))

    def __len__(self) -> int:
        """The attempts armed."""
        return sum(q.n for q in self._queues.values())

    @property
    def timer_at_ns(self) -> int:
        """When the owner's timer is to fire, 0: no attempt is armed."""
        return self._timer_at

    def add(self, s: Stream, due_ns) -> None:
        """Arm ``s`` (an open stream) to expire at ``due_ns``, instead of any time it was armed for."""
        _typed(s, Stream, "s")
        if s is None:
            raise TypeError("Argument 's' must not be None")
        due_ns = _int64(due_ns)
        if s._state == S_CLOSED:
            raise ValueError("the stream is closed")
        if s._try_queue is not None:
            _try_unlink(s)
        self._insert(self._queue(-1), s, due_ns)

    def _queue(self, key: int) -> _TryQueue:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _TryQueue()
        return q

    def _insert(self, q: _TryQueue, s: Stream, due_ns: int) -> None:
        at = q.last
        # Due order from the end: one comparison when s is due last, the common case.
        while at is not None and at._try_due_ns > due_ns:
            at = at._try_prev
        s._try_queue = q
        s._try_due_ns = due_ns
        s._try_prev = at
        if at is None:
            s._try_next = q.first
            q.first = s
        else:
            s._try_next = at._try_next
            at._try_next = s
        if s._try_next is None:
            q.last = s
        else:
            s._try_next._try_prev = s
        q.n += 1
        if at is None:
            t = (due_ns // self._slot_ns + 1) * self._slot_ns
            if self._timer_at == 0 or t < self._timer_at:
                self._timer_at = t
                self._arm(t)

    def expire(self, now_ns) -> list[Stream]:
        """Take out the attempts due by ``now_ns``; those still waiting for response headers."""
        now_ns = _int64(now_ns)
        out: list[Stream] = []
        next_at = 0
        for q in self._queues.values():
            s = q.first
            while s is not None and s._try_due_ns <= now_ns:
                nxt = s._try_next
                s._try_queue = s._try_next = s._try_prev = None
                q.n -= 1
                if s._state != S_CLOSED and not s._recv_headers and s._peer is not None:
                    out.append(s)
                s = nxt
            q.first = s
            if s is None:
                q.last = None
            else:
                s._try_prev = None
                t = (s._try_due_ns // self._slot_ns + 1) * self._slot_ns
                if next_at == 0 or t < next_at:
                    next_at = t
        self._timer_at = next_at
        if next_at:
            self._arm(next_at)
        return out


def _try_unlink(s: Stream) -> None:
    # Take s out of its TryTimeouts queue (its attempt ended or it is re-armed). The owner's timer
    # stays: if s was the earliest, the timer finds nothing due and moves on to the next one.
    q = s._try_queue
    prev, nxt = s._try_prev, s._try_next
    if prev is None:
        q.first = nxt
    else:
        prev._try_next = nxt
    if nxt is None:
        q.last = prev
    else:
        nxt._try_prev = prev
    q.n -= 1
    s._try_queue = s._try_next = s._try_prev = None


class Stream:
    """One HTTP/2 stream. Made by the connection; read-only from Python but for ``user``,
    ``notify_close`` and ``response_flags``."""

    __slots__ = (
        "_attempts",  # times the request was sent again (any reason)
        "_authority",
        "_blocked",  # in conn._blocked, waiting for the connection window
        "_closed_remote_reset",  # the peer reset it
        "_conn",
        "_content_length",
        "_data_recv",
        "_data_sent",
        "_error_code",  # RST_STREAM code sent or received, -1 none
        "_grpc_msgs_recv",  # gRPC messages whose 5-byte prefix arrived in DATA (is_grpc only)
        "_grpc_status",
        "_grpc_timeout_ns",
        "_head",
        "_headers",  # the request (server role) or response (client role) headers
        "_held",
        "_held_end",
        "_held_trailers",
        "_hold",  # keep received DATA until linked
        "_id",
        "_is_grpc",
        "_method",
        "_msg_left",  # bytes of the current gRPC message's body still to come
        "_msg_len",  # the length prefix read so far
        "_notify_close",  # emit EV_CLOSED for this stream
        "_parent_span_id",
        "_path",
        "_peer",
        "_pending",  # DATA waiting for the send window (bytearray or None)
        "_pending_end",
        "_pending_trailers",
        "_prefix_have",  # bytes of the 5-byte prefix read so far
        "_recv_end",
        "_recv_headers",  # the first non-informational header block is in
        "_recv_unacked",
        "_recv_window",
        "_redispatched",  # of the attempts, after REFUSED_STREAM / GOAWAY (capped at MAX_REDISPATCH)
        "_replay",  # the request body forwarded so far, while it may be sent again
        "_replay_ok",
        "_request_id",
        "_resend",  # replay is to be sent again when the stream is linked
        "_reset_after_end",  # RST_STREAM NO_ERROR once our END_STREAM is out (§8.1)
        "_response_flags",  # Envoy-style flags set by the core (UR, UC), None otherwise
        "_retry",  # server role: when to offer a failed attempt to retry.hook (RetryOn or None)
        "_sampled",
        "_scheme",
        "_send_window",
        "_sent_end",
        "_sent_headers",
        "_span_id",
        "_state",
        "_status",
        "_t_open_ns",
        "_t_response_ns",
        "_trace_done",  # open_forward worked out _trace_out (a retry reuses it)
        "_trace_id",
        "_trace_in",  # an incoming traceparent: 0 none, 1 invalid or repeated, 2 + flags: valid
        "_trace_out",  # the traceparent value sent upstream; None: the incoming one unchanged
        "_trailers",
        "_try_due_ns",
        "_try_next",
        "_try_prev",
        "_try_queue",  # client role: the TryTimeouts queue its per-try timeout is in, or None
        "_unprocessed",  # refused or above a GOAWAY's last stream id: safe to retry
        "user",  # the Python layer's attachment (route, completion record)
    )

    id = _readonly("id")
    conn = _readonly("conn")
    peer = _readonly("peer")
    recv_headers = _readonly("recv_headers")
    recv_end = _readonly("recv_end")
    sent_headers = _readonly("sent_headers")
    sent_end = _readonly("sent_end")
    is_grpc = _readonly("is_grpc")
    head = _readonly("head")
    closed_remote_reset = _readonly("closed_remote_reset")
    unprocessed = _readonly("unprocessed")
    error_code = _readonly("error_code")
    headers = _readonly("headers")
    trailers = _readonly("trailers")
    method = _readonly("method")
    scheme = _readonly("scheme")
    path = _readonly("path")
    authority = _readonly("authority")
    request_id = _readonly("request_id")
    status = _readonly("status")
    grpc_status = _readonly("grpc_status")
    grpc_timeout_ns = _readonly("grpc_timeout_ns")
    content_length = _readonly("content_length")
    data_recv = _readonly("data_recv")
    data_sent = _readonly("data_sent")
    t_open_ns = _readonly("t_open_ns")
    t_response_ns = _readonly("t_response_ns")
    grpc_msgs_recv = _readonly("grpc_msgs_recv")
    trace_id = _readonly("trace_id")
    span_id = _readonly("span_id")
    parent_span_id = _readonly("parent_span_id")
    sampled = _readonly("sampled")
    attempts = _readonly("attempts")
    send_window = _readonly("send_window")
    recv_window = _readonly("recv_window")

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("streams are made by H2Connection")

    @classmethod
    def _new(cls, c: H2Connection, sid: int) -> Stream:
        s = cls.__new__(cls)
        s._id = sid
        s._conn = c
        s._peer = None
        s.user = None
        s._notify_close = False
        s._response_flags = None
        s._state = S_IDLE
        s._recv_headers = s._recv_end = s._sent_headers = s._sent_end = False
        s._is_grpc = s._head = s._closed_remote_reset = s._unprocessed = False
        s._error_code = -1
        s._headers = s._trailers = None
        s._method = s._scheme = s._path = s._authority = s._request_id = None
        s._status = 0
        s._grpc_status = -1
        s._grpc_timeout_ns = -1
        s._content_length = -1
        s._data_recv = s._data_sent = 0
        s._t_open_ns = monotonic_ns()
        s._t_response_ns = 0
        s._grpc_msgs_recv = 0
        s._msg_left = s._msg_len = s._prefix_have = 0
        s._trace_id = s._span_id = s._parent_span_id = b""
        s._sampled = False
        s._trace_in = 0
        s._trace_done = False
        s._trace_out = None
        s._send_window = c._remote_initial_window
        s._recv_window = c._local_initial_window
        s._recv_unacked = 0
        s._pending = None
        s._pending_end = False
        s._pending_trailers = None
        s._blocked = False
        s._hold = False
        s._held = None
        s._held_end = False
        s._held_trailers = None
        s._reset_after_end = False
        s._replay = None
        s._replay_ok = False
        s._resend = False
        s._attempts = 0
        s._redispatched = 0
        s._retry = None
        s._try_queue = s._try_next = s._try_prev = None
        s._try_due_ns = 0
        c._streams[sid] = s
        c._streams_total += 1
        return s

    @property
    def notify_close(self) -> bool:
        return self._notify_close

    @notify_close.setter
    def notify_close(self, value) -> None:
        self._notify_close = bool(value)

    @property
    def retry(self) -> RetryOn | None:
        return self._retry

    @retry.setter
    def retry(self, value: RetryOn | None) -> None:
        if value is not None and not isinstance(value, RetryOn):
            raise TypeError(f"Expected RetryOn, got {type(value).__name__}")
        self._retry = value

    @property
    def response_flags(self) -> str | None:
        return self._response_flags

    @response_flags.setter
    def response_flags(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"Expected str, got {type(value).__name__}")
        self._response_flags = value

    @property
    def state(self) -> str:
        return STATE_NAMES[self._state]

    @property
    def pending_bytes(self) -> int:
        """DATA queued on this stream, waiting for the peer's window."""
        return len(self._pending) if self._pending is not None else 0

    @property
    def held_bytes(self) -> int:
        return len(self._held) if self._held is not None else 0

    def __repr__(self) -> str:
        role = "client" if self._conn._client else "server"
        return f"<Stream {self._id} {STATE_NAMES[self._state]} on {role} connection>"


# -- header validation -----------------------------------------------------------------------------


def _valid_name(name: bytes) -> bool:
    # §8.2.1: no controls, space, uppercase, DEL or non-ASCII; a colon only to start a pseudo-header.
    if not name:
        return False
    rest = name[1:] if name[0] == 0x3A else name
    return all(0x20 < ch < 0x7F and not 0x41 <= ch <= 0x5A and ch != 0x3A for ch in rest)


def _valid_value(value: bytes) -> bool:
    # §8.2.1: no NUL, CR or LF; no leading or trailing whitespace.
    if not value:
        return True
    if value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09):
        return False
    return b"\0" not in value and b"\n" not in value and b"\r" not in value


def _parse_uint(v: bytes) -> int:
    """A decimal of 1 to 18 digits, or -1."""
    if not 0 < len(v) <= 18 or not all(0x30 <= d <= 0x39 for d in v):
        return -1
    return int(v)


def _check_fields(s: Stream, headers: list, kind: int) -> str | None:
    """Validate one header list (§8.2-8.3); record what routing and accounting need.

    kind: 0 request, 1 response, 2 trailers. Returns None, or why it is malformed.
    """
    regular_seen = False
    seen: set[bytes] = set()
    method = scheme = path = authority = host = status = None
    for name, value in headers:
        if not _valid_name(name):
            return f"invalid header name {name!r}"
        if not _valid_value(value):
            return f"invalid value for header {name!r}"
        if name[0] == 0x3A:  # pseudo-header
            if regular_seen:
                return f"pseudo-header {name!r} after a regular header"
            if kind == 2:
                return f"pseudo-header {name!r} in trailers"
            if name in seen:
                return f"duplicate pseudo-header {name!r}"
            seen.add(name)
            if kind == 0:
                if name not in REQUEST_PSEUDO:
                    return f"pseudo-header {name!r} in a request"
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":scheme":
                    scheme = value
                elif name == b":authority":
                    authority = value
            else:
                if name != b":status":
                    return f"pseudo-header {name!r} in a response"
                status = value
            continue
        regular_seen = True
        if name in CONNECTION_HEADERS:
            return f"connection-specific header {name!r}"
        if name == b"te":
            if value != b"trailers":
                return "te header other than 'trailers'"
        elif name == b"content-length":
            cl = _parse_uint(value)
            if cl < 0 or (s._content_length >= 0 and cl != s._content_length):
                return "invalid content-length"
            if kind != 2:
                s._content_length = cl
        elif name == b"content-type":
            if kind != 2 and value.startswith(b"application/grpc"):
                s._is_grpc = True
        elif name == b"grpc-status":
            # A server-role stream's grpc_status is what we send, not what the client says.
            if s._conn._client:
                v = _parse_uint(value)
                s._grpc_status = v if 0 <= v <= INT32_MAX else 2  # garbage is UNKNOWN, as gRPC reads it
        elif name == b"traceparent":
            if kind == 0:
                _parse_traceparent(s, value)
        elif name == b"grpc-timeout":
            if kind == 0:
                s._grpc_timeout_ns = parse_grpc_timeout(value)
        elif name == b"x-request-id":
            if kind == 0:
                s._request_id = value
        elif name == b"host":
            host = value
    if kind == 0:
        if method is None:
            return "request without :method"
        if method == b"CONNECT":
            if authority is None or scheme is not None or path is not None:
                return "malformed CONNECT request"
        else:
            if scheme is None or path is None or not path:
                return "request without :scheme or :path"
            if path[0] != 0x2F and not (path == b"*" and method == b"OPTIONS") and scheme in (b"http", b"https"):
                return f"invalid :path {path!r}"
        if host is not None and authority is not None and host != authority:
            return "host header differs from :authority"
        s._method = method
        s._scheme = scheme
        s._path = path
        s._authority = authority if authority is not None else host
        s._head = method == b"HEAD"
    elif kind == 1:
        if status is None:
            return "response without :status"
        if len(status) != 3 or _parse_uint(status) < 100:
            return f"invalid :status {status!r}"
        s._status = _parse_uint(status)
    return None


# -- the connection --------------------------------------------------------------------------------


class H2Connection:
    """One HTTP/2 connection, either role; see the module docstring.

    ``settings`` (all optional): max_concurrent_streams, initial_window_size,
    max_frame_size, max_header_list_size, header_table_size (what we
    advertise), and connection_window (our connection receive window).
    ``hold``: a new request's DATA is kept until its stream is linked (the
    proxy's mode); otherwise DATA is delivered as EV_DATA events and its
    window returned at once.
    """

    __slots__ = (
        "_blocked",
        "_client",
        "_conn_recv_unacked",
        "_conn_recv_window",
        "_conn_send_window",
        "_decoder",
        "_dirty",
        "_encoder",
        "_evented",
        "_events",
        "_generate_request_id",
        "_goaway_received",
        "_goaway_received_code",
        "_goaway_received_last",
        "_goaway_sent",
        "_goaway_sent_last",
        "_got_remote_settings",
        "_got_settings",
        "_hb_buf",
        "_hb_end_stream",
        "_hb_frames",
        "_hb_stream",
        "_header_table_size",
        "_hold_new",
        "_inbuf",
        "_last_peer_stream",
        "_local_connection_window",
        "_local_initial_window",
        "_local_max_concurrent",
        "_local_max_frame_size",
        "_local_max_header_list",
        "_max_peer_stream",
        "_next_stream_id",
        "_open_local",
        "_open_remote",
        "_out",
        "_outbox",
        "_preface_left",
        "_protocol_errors",
        "_recent_resets",
        "_remote_initial_window",
        "_remote_max_concurrent",
        "_remote_max_frame_size",
        "_remote_max_header_list",
        "_rid_state",
        "_self_dependent",
        "_settings_acked",
        "_shutdown_ping",
        "_stream_limit",
        "_streams",
        "_streams_total",
        "_terminated",
        "_trace_mode",
        "_trace_sampling",
        "_write_paused",
        "handler",
        "writer",
    )

    client = _readonly("client")
    local_max_concurrent = _readonly("local_max_concurrent")
    local_initial_window = _readonly("local_initial_window")
    local_max_frame_size = _readonly("local_max_frame_size")
    local_max_header_list = _readonly("local_max_header_list")
    local_connection_window = _readonly("local_connection_window")
    remote_max_concurrent = _readonly("remote_max_concurrent")
    remote_initial_window = _readonly("remote_initial_window")
    remote_max_frame_size = _readonly("remote_max_frame_size")
    remote_max_header_list = _readonly("remote_max_header_list")
    conn_send_window = _readonly("conn_send_window")
    open_local = _readonly("open_local")
    open_remote = _readonly("open_remote")
    next_stream_id = _readonly("next_stream_id")
    last_peer_stream = _readonly("last_peer_stream")
    goaway_sent = _readonly("goaway_sent")
    goaway_sent_last = _readonly("goaway_sent_last")
    goaway_received = _readonly("goaway_received")
    goaway_received_last = _readonly("goaway_received_last")
    goaway_received_code = _readonly("goaway_received_code")
    terminated = _readonly("terminated")
    write_paused = _readonly("write_paused")
    hold_new = _readonly("hold_new")
    generate_request_id = _readonly("generate_request_id")
    streams_total = _readonly("streams_total")
    protocol_errors = _readonly("protocol_errors")

    def __init__(
        self,
        client,
        outbox: Outbox | None = None,
        settings=None,
        hold=False,
        generate_request_id=False,
        *,
        first_stream_id=1,
    ) -> None:
        cfg = dict(settings or {})
        self._client = bool(client)
        self._outbox = _typed(outbox, Outbox, "outbox")
        self.writer = None  # transport.write
        self.handler = None  # called by Outbox.flush with events raised outside receive()
        self._evented = False
        self._settings_acked = False
        self._max_peer_stream = 0  # the highest stream id the peer opened (processed or not)
        self._out = bytearray()
        self._dirty = False
        self._inbuf = bytearray()
        self._preface_left = 0 if self._client else len(PREFACE)
        self._got_settings = False
        self._got_remote_settings = False
        self._streams: dict[int, Stream] = {}
        self._events: list[tuple] = []
        self._blocked: list[Stream] = []
        self._recent_resets: dict[int, None] = {}
        self._local_max_concurrent = _uint32(cfg.pop("max_concurrent_streams", 1000))
        self._local_initial_window = _uint32(cfg.pop("initial_window_size", 1 << 20))
        self._local_max_frame_size = _uint32(cfg.pop("max_frame_size", DEFAULT_MAX_FRAME_SIZE))
        self._local_max_header_list = _uint32(cfg.pop("max_header_list_size", 65536))
        header_table_size = cfg.pop("header_table_size", DEFAULT_TABLE_SIZE)
        self._local_connection_window = _uint32(cfg.pop("connection_window", 4 << 20))
        if cfg:
            raise ValueError(f"unknown HTTP/2 settings: {sorted(cfg)}")
        if not DEFAULT_WINDOW <= self._local_initial_window <= MAX_WINDOW:
            raise ValueError("initial_window_size must be in [65535, 2^31-1]")
        if not DEFAULT_WINDOW <= self._local_connection_window <= MAX_WINDOW:
            raise ValueError("connection_window must be in [65535, 2^31-1]")
        if not DEFAULT_MAX_FRAME_SIZE <= self._local_max_frame_size <= MAX_MAX_FRAME_SIZE:
            raise ValueError("max_frame_size must be in [16384, 16777215]")
        # A table smaller than the default binds the peer only once it has ACKed our SETTINGS.
        self._decoder = Decoder(max(header_table_size, DEFAULT_TABLE_SIZE), self._local_max_header_list)
        self._encoder = Encoder()
        # Until the peer's SETTINGS say otherwise, assume the RFC's recommended
        # minimum of 100 (as nghttp2 does): opening more would get them refused.
        self._remote_max_concurrent = 100
        self._remote_initial_window = DEFAULT_WINDOW
        self._remote_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self._remote_max_header_list = 0xFFFFFFFF
        self._stream_limit = 0xFFFFFFFF  # our own cap on streams we open (a pool's per-connection limit)
        self._conn_send_window = DEFAULT_WINDOW
        self._conn_recv_window = self._local_connection_window
        self._conn_recv_unacked = 0
        self._open_local = 0
        self._open_remote = 0
        # Client role: the first stream id we use (3 after an HTTP/1.1 upgrade, whose request is stream 1).
        if not (isinstance(first_stream_id, int) and 1 <= first_stream_id <= 0x7FFFFFFF and first_stream_id & 1):
            raise ValueError("first_stream_id must be an odd stream id")
        self._next_stream_id = first_stream_id
        self._last_peer_stream = 0  # the highest stream id we processed (our GOAWAY's last stream id)
        self._hb_stream = 0
        self._hb_end_stream = False
        self._hb_buf = bytearray()
        self._hb_frames = 0
        self._goaway_sent = False
        self._goaway_sent_last = 0
        self._shutdown_ping = False
        self._goaway_received = False
        self._goaway_received_last = 0
        self._goaway_received_code = 0
        self._terminated = False
        self._write_paused = False
        self._hold_new = bool(hold)
        self._generate_request_id = bool(generate_request_id)
        self._streams_total = 0
        self._protocol_errors = 0
        self._rid_state = int.from_bytes(os.urandom(8), "little")
        self._header_table_size = header_table_size
        self._self_dependent = False
        self._trace_mode = 0
        self._trace_sampling = 1.0

    @property
    def trace_mode(self) -> int:
        """Server role: what open_forward does with W3C trace context (the Stream trace fields say what it did).

        0: nothing (an incoming ``traceparent`` passes untouched, and still fills ``trace_id``); 1: a request
        without a valid ``traceparent`` gets one (trace id from ``x-b3-traceid`` if any, else random); 2: as 1,
        and a valid incoming one gets the proxy's own span id as its parent-id. ``tracestate`` and B3 headers
        always pass unchanged.
        """
        return self._trace_mode

    @trace_mode.setter
    def trace_mode(self, value) -> None:
        if not isinstance(value, int) or value not in (0, 1, 2):
            raise ValueError(f"trace_mode must be 0, 1 or 2, not {value!r}")
        self._trace_mode = int(value)

    @property
    def trace_sampling(self) -> float:
        """The share of the traces this connection starts that are marked sampled (0..1)."""
        return self._trace_sampling

    @trace_sampling.setter
    def trace_sampling(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"trace_sampling must be a number, not {type(value).__name__}")
        v = float(value)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"trace_sampling must be in [0, 1], not {value!r}")
        self._trace_sampling = v

    # -- what Python reads ---------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def can_open(self) -> bool:
        """Whether a pool should open a new stream here now (client role).

        Not before the peer's SETTINGS: until then its stream limit is unknown,
        and streams above it would be refused. ``open_stream`` itself may be
        called earlier (HTTP/2 allows it), assuming a limit of 100.
        """
        return self._got_remote_settings and self._may_open()

    def _may_open(self) -> bool:
        return (
            not self._goaway_received
            and not self._goaway_sent
            and not self._terminated
            and self._open_local < self._remote_max_concurrent
            and self._open_local < self._stream_limit
            and self._next_stream_id <= LAST_CLIENT_ID
        )

    @property
    def settled(self) -> bool:
        """Whether the peer's first SETTINGS arrived (a client opens streams only then)."""
        return self._got_remote_settings

    @property
    def stream_limit(self) -> int:
        """Our own cap on the streams we open at once (a pool's per-connection limit)."""
        return self._stream_limit

    @stream_limit.setter
    def stream_limit(self, value) -> None:
        self._stream_limit = _uint32(value)

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def get_stream(self, stream_id: int) -> Stream | None:
        return self._streams.get(stream_id)

    def live_streams(self) -> list[Stream]:
        """The streams not closed yet, in the order they opened."""
        return list(self._streams.values())

    def data_to_send(self) -> bytes:
        """Take the bytes queued for the peer (for callers without an Outbox)."""
        b = bytes(self._out)
        del self._out[:]
        return b

    # -- start, pause, stop --------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our preface: the magic (client), SETTINGS, and the connection window."""
        if self._client:
            self._out += PREFACE
        settings = [
            (0x2, 0),
            (0x3, self._local_max_concurrent),
            (0x4, self._local_initial_window),
            (0x5, self._local_max_frame_size),
            (0x6, self._local_max_header_list),
        ]
        if self._header_table_size != DEFAULT_TABLE_SIZE:
            settings.insert(0, (0x1, _uint32(self._header_table_size)))
        self._frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(ident, value) for ident, value in settings))
        if self._local_connection_window > DEFAULT_WINDOW:
            self._window_update(0, self._local_connection_window - DEFAULT_WINDOW)
        _mark(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for s in list(self._streams.values()):
            if s._pending is not None and (s._pending or s._pending_end):
                self._flush_stream(s)
        _mark(self)

    def shutdown(self) -> list | None:
        """Graceful GOAWAY: no new streams; the in-flight ones finish.

        Server role: GOAWAY with the largest id and a PING first, then, when
        the PING comes back (one round trip, so requests already on the wire
        are counted), GOAWAY with the real last stream id.
        """
        if self._goaway_sent or self._terminated:
            return None
        if self._client:
            self._goaway(0, E_NO_ERROR, b"")
        else:
            self._goaway(STREAM_MASK, E_NO_ERROR, b"")
            self._ping(SHUTDOWN_PING, False)
            self._shutdown_ping = True
        self._check_idle()
        _mark(self)
        return self._take_events()

    def close(self, error_code=E_NO_ERROR, message="") -> list | None:
        """Abrupt GOAWAY: every stream ends now (linked peers are told)."""
        if not self._terminated:
            self._terminate(error_code, message)
            _mark(self)
        return self._take_events()

    def connection_lost(self) -> list | None:
        """The transport is gone: end every stream, telling linked peers."""
        if not self._terminated:
            self._terminated = True
            self._abort_streams(E_CANCEL)
        return self._take_events()

    def ping(self, opaque=b"\0" * 8) -> None:
        if len(opaque) != 8:
            raise ValueError("PING carries 8 bytes")
        self._ping(opaque, False)
        _mark(self)

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, data) -> list | None:
        """Process bytes from the peer; return a list of events, or None."""
        if self._terminated:
            return None
        try:
            self._inbuf += data
            used = self._consume(bytes(self._inbuf))
            del self._inbuf[:used]
        except H2Error as e:
            self._protocol_errors += 1
            self._terminate(e.error_code, str(e))
        _mark(self)
        return self._take_events()

    def take_events(self) -> list | None:
        """Events raised outside ``receive`` (by a linked peer, or our own calls), or None."""
        return self._take_events()

    def _take_events(self) -> list | None:
        if not self._events:
            return None
        ev = self._events
        self._events = []
        return ev

    def _consume(self, buf: bytes) -> int:
        """Process every whole frame at the start of ``buf``; return how many bytes were used."""
        pos = 0
        n = len(buf)
        while self._preface_left and pos < n:
            if buf[pos] != PREFACE[len(PREFACE) - self._preface_left]:
                raise ProtocolError("invalid connection preface")
            pos += 1
            self._preface_left -= 1
        while n - pos >= FRAME_HEADER_SIZE and not self._terminated:
            hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack_from(buf, pos)
            length = hi << 16 | lo
            if length > self._local_max_frame_size:
                raise FrameSizeError(f"frame of {length} bytes > max frame size {self._local_max_frame_size}")
            if n - pos < FRAME_HEADER_SIZE + length:
                break
            sid &= STREAM_MASK
            p = buf[pos + FRAME_HEADER_SIZE : pos + FRAME_HEADER_SIZE + length]
            pos += FRAME_HEADER_SIZE + length
            if not self._got_settings:
                if ftype != SETTINGS or flags & FLAG_ACK:
                    raise ProtocolError("the peer's preface must start with SETTINGS")
                self._got_settings = True
            if self._hb_stream and ftype != CONTINUATION:
                raise ProtocolError(f"expected CONTINUATION on stream {self._hb_stream}, got frame type {ftype}")
            if ftype == DATA:
                self._on_data(flags, sid, p)
            elif ftype == HEADERS:
                self._on_headers(flags, sid, p)
            elif ftype == WINDOW_UPDATE:
                self._on_window_update(sid, p)
            elif ftype == SETTINGS:
                self._on_settings(flags, sid, p)
            elif ftype == RST_STREAM:
                self._on_rst_stream(sid, p)
            elif ftype == PING:
                self._on_ping(flags, sid, p)
            elif ftype == CONTINUATION:
                self._on_continuation(flags, sid, p)
            elif ftype == GOAWAY:
                self._on_goaway(sid, p)
            elif ftype == PRIORITY:
                if sid == 0:
                    raise ProtocolError("PRIORITY frame on stream 0")
                if length != 5:
                    self._stream_error_id(sid, E_FRAME_SIZE_ERROR)
                elif _U32.unpack_from(p)[0] & STREAM_MASK == sid:
                    self._stream_error_id(sid, E_PROTOCOL_ERROR)
            elif ftype == PUSH_PROMISE:
                raise ProtocolError("PUSH_PROMISE received but push is disabled")
            # unknown frame types are ignored (§4.1)
        return pos

    def _stream_for_frame(self, sid: int, what: str) -> Stream | None:
        """The open stream ``sid``, or None after dealing with a frame on a stream that is not."""
        s = self._streams.get(sid)
        if s is not None:
            return s
        if sid in self._recent_resets:
            return None  # we reset or ignored it; frames in flight are ignored (§5.1 closed, §6.8)
        if self._is_idle_id(sid):
            raise ProtocolError(f"{what} frame on idle stream {sid}")
        raise StreamClosedError(f"{what} frame on closed stream {sid}")

    def _is_idle_id(self, sid: int) -> bool:
        if (sid & 1) == self._client:  # our own ids
            return sid >= self._next_stream_id
        return sid > self._max_peer_stream

    def _on_data(self, flags: int, sid: int, p: bytes) -> None:
        length = len(p)
        pad = 0
        if sid == 0:
            raise ProtocolError("DATA frame on stream 0")
        if flags & FLAG_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED DATA frame too short for its pad length")
            pad = p[0] + 1
            if pad > length:
                raise ProtocolError("DATA padding exceeds the payload")
        if length > self._conn_recv_window:
            raise FlowControlError(f"DATA of {length} bytes exceeds the connection window {self._conn_recv_window}")
        self._conn_recv_window -= length
        s = self._streams.get(sid)
        if s is None or s._recv_end:
            self._credit_connection(length)  # nobody will consume it
            if s is not None:
                self._stream_error(s, E_STREAM_CLOSED)
                return
            self._stream_for_frame(sid, "DATA")
            return
        if not s._recv_headers:
            self._credit_connection(length)
            self._stream_error(s, E_PROTOCOL_ERROR)
            return
        if length > s._recv_window:
            self._credit_connection(length)
            self._stream_error(s, E_FLOW_CONTROL_ERROR)
            return
        s._recv_window -= length
        n = length - pad
        if pad:
            self._credit(s, pad)
        s._data_recv += n
        end = bool(flags & FLAG_END_STREAM)
        if s._content_length >= 0 and (s._data_recv > s._content_length or (end and s._data_recv != s._content_length)):
            self._credit_connection(n)
            self._stream_error(s, E_PROTOCOL_ERROR)
            return
        body = p[1 : 1 + n] if flags & FLAG_PADDED else p
        if s._is_grpc and n:
            _count_messages(s, body)
        if s._peer is not None:
            _send_data(s._peer, body, end, s)
        elif s._hold:
            if n:
                if s._held is None:
                    s._held = bytearray()
                s._held += body
            if end:
                s._held_end = True
        elif self._hold_new:
            self._credit(s, n)  # proxy mode, no longer linked: the response is done, drop the rest
        else:
            _event(self, (EV_DATA, s, body, end))
            self._credit(s, n)
        if end:
            self._recv_end(s)

    def _on_headers(self, flags: int, sid: int, p: bytes) -> None:
        length = len(p)
        pad = start = 0
        self_dependent = False
        if sid == 0:
            raise ProtocolError("HEADERS frame on stream 0")
        if flags & FLAG_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED HEADERS frame too short for its pad length")
            pad = p[0]
            start = 1
        if flags & FLAG_PRIORITY:
            if length - start < 5:
                raise FrameSizeError("HEADERS frame too short for its priority fields")
            # A self-dependency is a stream error, but the block must still be decoded.
            self_dependent = _U32.unpack_from(p, start)[0] & STREAM_MASK == sid
            start += 5
        if pad + start > length:
            raise ProtocolError("HEADERS padding exceeds the payload")
        self._header_block(sid, flags, p[start : length - pad], self_dependent)

    def _header_block(self, sid: int, flags: int, block: bytes, self_dependent: bool) -> None:
        if not flags & FLAG_END_HEADERS:
            self._hb_stream = sid
            self._hb_end_stream = bool(flags & FLAG_END_STREAM)
            self._hb_frames = 0
            self._hb_buf[:] = block
            self._self_dependent = self_dependent
            return
        self._on_block(sid, bool(flags & FLAG_END_STREAM), block, self_dependent)

    def _on_continuation(self, flags: int, sid: int, p: bytes) -> None:
        if sid == 0 or sid != self._hb_stream:
            raise ProtocolError(f"CONTINUATION on stream {sid} outside a header block")
        self._hb_frames += 1
        self._hb_buf += p
        if len(self._hb_buf) > 2 * self._local_max_header_list + 16384:
            raise EnhanceYourCalm("header block too large")
        if self._hb_frames > MAX_CONTINUATIONS and not flags & FLAG_END_HEADERS:
            raise EnhanceYourCalm("too many CONTINUATION frames")
        if flags & FLAG_END_HEADERS:
            self._hb_stream = 0
            block = bytes(self._hb_buf)
            del self._hb_buf[:]
            self._on_block(sid, self._hb_end_stream, block, self._self_dependent)

    def _on_block(self, sid: int, end_stream: bool, block: bytes, self_dependent: bool) -> None:
        headers = None
        too_large = False
        try:
            headers = self._decoder.decode(block)
        except HeaderListTooLarge:
            too_large = True  # the block was processed to the end: the table is in sync
        except H2Error as e:
            if e.error_code != E_COMPRESSION_ERROR:
                raise
            raise CompressionError(str(e)) from e
        s = self._streams.get(sid)
        if s is None:
            if not self._is_idle_id(sid):
                if sid in self._recent_resets:
                    return
                raise StreamClosedError(f"HEADERS on closed stream {sid}")
            if self._client:
                raise ProtocolError(f"HEADERS on stream {sid}, which we did not open")
            if not sid & 1:
                raise ProtocolError(f"a client opened even-numbered stream {sid}")
            # a new request
            self._max_peer_stream = sid
            if self._goaway_sent and sid > self._goaway_sent_last:
                self._ignore(sid)  # after our GOAWAY: never processed; its frames are ignored
                return
            self._last_peer_stream = sid
            s = Stream._new(self, sid)
            s._state = S_OPEN
            s._hold = self._hold_new
            s._replay_ok = self._hold_new
            s._notify_close = not self._hold_new
            self._open_remote += 1
            if too_large or self_dependent:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return
            if self._open_remote > self._local_max_concurrent:
                s._unprocessed = True
                self._stream_error(s, E_REFUSED_STREAM)
                return
            if _check_fields(s, headers, 0) is not None:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return
            s._headers = headers
            s._recv_headers = True
            _event(self, (EV_REQUEST, s))
            if end_stream:
                if s._content_length > 0:
                    self._stream_error(s, E_PROTOCOL_ERROR)
                    return
                s._held_end = s._hold
                self._recv_end(s)
            return
        if s._recv_end:
            self._stream_error(s, E_STREAM_CLOSED)
            return
        if too_large or self_dependent:
            self._stream_error(s, E_PROTOCOL_ERROR)
            return
        if s._recv_headers:
            # trailers
            if not end_stream:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return
            why = _check_fields(s, headers, 2)
            if why is not None or (s._content_length >= 0 and s._data_recv != s._content_length):
                self._stream_error(s, E_PROTOCOL_ERROR)
                return
            s._trailers = headers
            s._replay_ok = False
            s._replay = None
            if s._peer is not None:
                _send_trailers(s._peer, headers)
            elif s._hold:
                s._held_trailers = headers
                s._held_end = True
            else:
                _event(self, (EV_TRAILERS, s))
            self._recv_end(s)
            return
        # response headers (client role)
        if _check_fields(s, headers, 1) is not None:
            self._stream_error(s, E_PROTOCOL_ERROR)
            return
        if s._status < 200:
            if end_stream:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return
            if s._peer is not None and s._status != 101:
                _send_headers(s._peer, headers, False)
            return
        s._recv_headers = True
        s._headers = headers
        s._t_response_ns = monotonic_ns()
        if s._peer is not None:
            peer = s._peer
            r = peer._retry
            if (
                r is not None
                and peer._replay_ok
                and not peer._sent_headers
                and r.matches(s._status, s._grpc_status if end_stream else -1)
                and r.hook(peer, s, RETRY_STATUS)
            ):
                # Another attempt instead: nothing of this response goes downstream.
                _detach(s, peer)
                if end_stream and s._sent_end:
                    self._recv_end(s)
                else:
                    self._stream_error(s, E_CANCEL)
                _event(peer._conn, (EV_RETRY, peer))
                _mark(peer._conn)
                return
            peer._replay_ok = False  # the upstream processed it: never sent again
            peer._replay = None
        if s._head or s._status == 304 or s._status == 204:
            s._content_length = -1
        if s._peer is not None:
            _send_headers(s._peer, headers, end_stream)
        else:
            _event(self, (EV_RESPONSE, s))
        if end_stream:
            if s._content_length > 0:
                self._stream_error(s, E_PROTOCOL_ERROR)
                return
            self._recv_end(s)

    def _on_window_update(self, sid: int, p: bytes) -> None:
        if len(p) != 4:
            raise FrameSizeError(f"WINDOW_UPDATE frame of length {len(p)}")
        inc = _U32.unpack(p)[0] & STREAM_MASK
        if sid == 0:
            if inc == 0:
                raise ProtocolError("WINDOW_UPDATE with increment 0 on the connection")
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise FlowControlError("connection flow-control window above 2^31-1")
            self._flush_blocked()
            return
        s = self._streams.get(sid)
        if s is None:
            if self._is_idle_id(sid):
                raise ProtocolError(f"WINDOW_UPDATE on idle stream {sid}")
            return  # closed: allowed for a while
        if inc == 0:
            self._stream_error(s, E_PROTOCOL_ERROR)
            return
        s._send_window += inc
        if s._send_window > MAX_WINDOW:
            self._stream_error(s, E_FLOW_CONTROL_ERROR)
            return
        if s._pending is not None and (s._pending or s._pending_end):
            self._flush_stream(s)

    def _on_settings(self, flags: int, sid: int, p: bytes) -> None:
        if sid != 0:
            raise ProtocolError(f"SETTINGS frame on stream {sid}")
        if flags & FLAG_ACK:
            if p:
                raise FrameSizeError("SETTINGS ACK with a payload")
            if not self._settings_acked:
                self._settings_acked = True  # our one SETTINGS is in effect
                if self._header_table_size < DEFAULT_TABLE_SIZE:
                    self._decoder.max_table_size = self._header_table_size
            return
        if len(p) % 6:
            raise FrameSizeError(f"SETTINGS frame of length {len(p)}, not a multiple of 6")
        if not self._got_remote_settings:
            self._got_remote_settings = True
            self._remote_max_concurrent = 0xFFFFFFFF  # no limit unless this frame sets one
        for ident, value in _SETTING.iter_unpack(p):
            if ident == 0x1:
                self._encoder.header_table_size = value
            elif ident == 0x2:
                if value > 1 or (self._client and value == 1):
                    raise ProtocolError(f"SETTINGS_ENABLE_PUSH = {value}")
            elif ident == 0x3:
                self._remote_max_concurrent = value
            elif ident == 0x4:
                if value > MAX_WINDOW:
                    raise FlowControlError(f"SETTINGS_INITIAL_WINDOW_SIZE = {value}")
                delta = value - self._remote_initial_window
                self._remote_initial_window = value
                for s in self._streams.values():
                    s._send_window += delta
                    if s._send_window > MAX_WINDOW:
                        raise FlowControlError("a stream's window above 2^31-1 after SETTINGS_INITIAL_WINDOW_SIZE")
                if delta > 0:
                    for s in list(self._streams.values()):
                        if s._pending:
                            self._flush_stream(s)
            elif ident == 0x5:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
                    raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE = {value}")
                self._remote_max_frame_size = value
            elif ident == 0x6:
                self._remote_max_header_list = value
        self._frame(SETTINGS, FLAG_ACK, 0, b"")

    def _on_rst_stream(self, sid: int, p: bytes) -> None:
        if sid == 0:
            raise ProtocolError("RST_STREAM frame on stream 0")
        if len(p) != 4:
            raise FrameSizeError(f"RST_STREAM frame of length {len(p)}")
        s = self._streams.get(sid)
        if s is None:
            if self._is_idle_id(sid):
                raise ProtocolError(f"RST_STREAM on idle stream {sid}")
            return
        s._error_code = _U32.unpack(p)[0]
        s._closed_remote_reset = True
        if s._error_code == E_REFUSED_STREAM and self._client:
            s._unprocessed = True
        self._close(s, True)

    def _on_ping(self, flags: int, sid: int, p: bytes) -> None:
        if sid != 0:
            raise ProtocolError(f"PING frame on stream {sid}")
        if len(p) != 8:
            raise FrameSizeError(f"PING frame of length {len(p)}")
        if flags & FLAG_ACK:
            if self._shutdown_ping and p == SHUTDOWN_PING:
                self._shutdown_ping = False
                self._goaway(self._last_peer_stream, E_NO_ERROR, b"")
                self._check_idle()
            return
        self._frame(PING, FLAG_ACK, 0, p)

    def _on_goaway(self, sid: int, p: bytes) -> None:
        if sid != 0:
            raise ProtocolError(f"GOAWAY frame on stream {sid}")
        if len(p) < 8:
            raise FrameSizeError(f"GOAWAY frame of length {len(p)}")
        last = _U32.unpack_from(p)[0] & STREAM_MASK
        if self._goaway_received and last > self._goaway_received_last:
            raise ProtocolError("GOAWAY raised the last stream id")
        self._goaway_received = True
        self._goaway_received_last = last
        self._goaway_received_code = _U32.unpack_from(p, 4)[0]
        _event(self, (EV_GOAWAY, last, self._goaway_received_code, p[8:]))
        # Our streams above ``last`` were never seen by the peer: safe to retry elsewhere.
        for s in list(self._streams.values()):
            if (s._id & 1) == self._client and s._id > last:
                s._unprocessed = True
                s._error_code = E_REFUSED_STREAM
                s._closed_remote_reset = True
                self._close(s, True)
        self._check_idle()

    # -- sending -------------------------------------------------------------------------------

    def open_stream(self, headers, end_stream=False) -> Stream:
        """Open a client stream with ``headers``; returns the Stream."""
        end_stream = bool(end_stream)
        if not self._client:
            raise ValueError("only the client role opens streams")
        if not self._may_open():
            raise ValueError("no new stream can be opened on this connection")
        s = Stream._new(self, self._next_stream_id)
        self._next_stream_id += 2
        self._open_local += 1
        s._state = S_OPEN
        s._notify_close = not self._hold_new
        for h in headers:
            if h[0] == b":method" and h[1] == b"HEAD":
                s._head = True
        _send_headers(s, list(headers), end_stream)
        return s

    def open_forward(self, src: Stream, authority=None, path=None, timeout_ns=-1) -> Stream:
        """Open a stream carrying ``src``'s request upstream and link the two.

        The request headers are re-encoded with ``authority``/``path``
        rewritten when given, ``grpc-timeout`` replaced by ``timeout_ns`` when
        that is >= 0 (the time left), and ``x-request-id`` added when absent
        and the connection generates them. DATA that arrived before the link
        is forwarded now. When ``src.retry`` has a per-try timeout, the new
        stream is armed in its ``TryTimeouts``.
        """
        _typed(src, Stream, "src")
        end = src._held_end and src._held_trailers is None and not src.held_bytes and not (src._resend and src._replay)
        if not self._may_open():
            raise ValueError("no new stream can be opened on this connection")
        out = []
        mode = src._conn._trace_mode
        tp_at = -1
        b3_trace = b3_sampled = b3_flags = None
        for h in src._headers:
            name = h[0]
            if name[0] == 0x3A:
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
                if name == b"traceparent":
                    if tp_at >= 0:
                        continue  # repeated: it was invalid anyway, and the first one is replaced
                    tp_at = len(out)
                elif name == b"x-b3-traceid":
                    b3_trace = h[1]
                elif name == b"x-b3-sampled":
                    b3_sampled = h[1]
                elif name == b"x-b3-flags":
                    b3_flags = h[1]
            out.append(h)
        if timeout_ns >= 0 and src._is_grpc:
            out.append((b"grpc-timeout", format_grpc_timeout(_int64(timeout_ns))))
        if src._request_id is None and src._conn._generate_request_id:
            src._request_id = self._make_request_id()
            out.append((b"x-request-id", src._request_id))
        if mode:
            if not src._trace_done:
                _trace(src, mode, b3_trace, b3_sampled, b3_flags)
            if src._trace_out is not None:
                if tp_at >= 0:
                    out[tp_at] = (b"traceparent", src._trace_out)
                else:
                    out.append((b"traceparent", src._trace_out))
        s = Stream._new(self, self._next_stream_id)
        self._next_stream_id += 2
        self._open_local += 1
        s._state = S_OPEN
        s._head = src._head
        s._is_grpc = src._is_grpc
        src._peer = s
        s._peer = src
        _send_headers(s, out, end)
        _release_held(src)
        retry = src._retry
        if retry is not None and retry._per_try_ns:
            retry._timeouts._insert(retry._try_queue, s, s._t_open_ns + retry._per_try_ns)
        return s

    def _random64(self) -> int:
        # The connection's splitmix64 generator, seeded from os.urandom (request ids, trace and span ids).
        self._rid_state = (self._rid_state + 0x9E3779B97F4A7C15) & UINT64
        return _mix(self._rid_state)

    def _make_request_id(self) -> bytes:
        # A version-4 UUID from the connection's generator.
        a = self._random64()
        b = self._random64()
        a = (a & 0xFFFFFFFFFFFF0FFF) | 0x4000
        b = (b & 0x3FFFFFFFFFFFFFFF) | 0x8000000000000000
        return b"%08x-%04x-%04x-%04x-%012x" % (a >> 32, (a >> 16) & 0xFFFF, a & 0xFFFF, b >> 48, b & 0xFFFFFFFFFFFF)

    def send_headers(self, s: Stream, headers, end_stream=False) -> None:
        _typed(s, Stream, "s")
        end_stream = bool(end_stream)
        if s._conn is not self:
            raise ValueError("stream of another connection")
        if s._state == S_CLOSED or s._sent_end:
            raise ValueError(f"stream {s._id} cannot send")
        if s._sent_headers:
            _send_trailers(s, list(headers))
        else:
            _send_headers(s, list(headers), end_stream)

    def send_data(self, s: Stream, data, end_stream=False) -> None:
        """Queue DATA on ``s``: sent as the windows allow, the rest waits in the stream."""
        _typed(s, Stream, "s")
        end_stream = bool(end_stream)
        if s._conn is not self:
            raise ValueError("stream of another connection")
        if s._state == S_CLOSED or s._sent_end or not s._sent_headers:
            raise ValueError(f"stream {s._id} cannot send DATA")
        _send_data(s, bytes(memoryview(data)), end_stream, None)

    def reset_stream(self, s: Stream, error_code=E_CANCEL) -> list | None:
        _typed(s, Stream, "s")
        if s._state != S_CLOSED:
            self._stream_error(s, _uint32(error_code))
        return self._take_events()

    def respond(self, s: Stream, status, headers=(), body=b"", grpc_status=None, grpc_message=None) -> list | None:
        """An answer made by the proxy: gRPC as trailers-only, else status + body.

        A request still being received is then reset with NO_ERROR (§8.1),
        and a linked upstream stream is cancelled. A request without an
        ``x-request-id`` gets one when the connection generates them.
        Returns the events raised.
        """
        _typed(s, Stream, "s")
        status = _int32(status)
        if body is not None and type(body) is not bytes:
            raise TypeError(f"Expected bytes, got {type(body).__name__}")
        self._respond(s, status, headers, body, grpc_status, grpc_message)
        return self._take_events()

    def _respond(self, s: Stream, status: int, headers, body: bytes | None, grpc_status, grpc_message) -> None:
        if s._state == S_CLOSED or s._sent_headers:
            return
        if s._request_id is None and self._generate_request_id and not self._client:
            # Every request gets an id, as in Envoy's connection manager, the ones answered here too
            # (the access log names them by it); open_forward makes it for the rest.
            s._request_id = self._make_request_id()
        if s._peer is not None:
            peer = s._peer
            if peer._pending:
                # request body still queued for the upstream: it was received here, give it back
                self._credit(s, len(peer._pending))
                peer._pending = None
            _unlink(s)
            if peer._state != S_CLOSED:
                peer._conn._stream_error(peer, E_CANCEL)
                _mark(peer._conn)
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
                _send_data(s, body, True, None)
        if s._state != S_CLOSED and not s._recv_end:
            if s._sent_end:
                self._stream_error(s, E_NO_ERROR)
            else:
                s._reset_after_end = True  # the body waits for window: reset once it is out
        _mark(self)

    # -- internals -----------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray | memoryview) -> None:
        length = len(payload)
        self._out += _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, sid)
        self._out += payload

    def _window_update(self, sid: int, inc: int) -> None:
        self._frame(WINDOW_UPDATE, 0, sid, _U32.pack(inc))

    def _ping(self, opaque: bytes, ack: bool) -> None:
        if type(opaque) is not bytes:
            raise TypeError(f"Expected bytes, got {type(opaque).__name__}")
        self._frame(PING, FLAG_ACK if ack else 0, 0, opaque)

    def _goaway(self, last: int, code: int, debug: bytes) -> None:
        self._frame(GOAWAY, 0, 0, _U32.pack(last) + _U32.pack(code) + debug)
        self._goaway_sent = True
        self._goaway_sent_last = last

    def _terminate(self, code, message) -> None:
        code = _uint32(code)
        if message is not None and not isinstance(message, str):
            raise TypeError(f"Expected str, got {type(message).__name__}")
        self._goaway(self._last_peer_stream, code, message.encode("utf-8", "replace")[:256])
        self._terminated = True
        self._hb_stream = 0
        self._abort_streams(E_CANCEL if code == E_NO_ERROR else code)
        _event(self, (EV_TERMINATED, code, message))

    def _abort_streams(self, code: int) -> None:
        for s in list(self._streams.values()):
            if s._error_code < 0:
                s._error_code = code
            self._close(s, True)

    def _credit_connection(self, n: int) -> None:
        self._conn_recv_unacked += n
        if self._conn_recv_unacked >= self._local_connection_window // 2 and not self._terminated:
            self._window_update(0, self._conn_recv_unacked)
            self._conn_recv_window += self._conn_recv_unacked
            self._conn_recv_unacked = 0
            _mark(self)

    def _credit(self, s: Stream, n: int) -> None:
        """``n`` received bytes of ``s`` were consumed: return them to the sender's windows."""
        if n <= 0:
            return
        self._credit_connection(n)
        if s._state == S_CLOSED or s._recv_end:
            return
        s._recv_unacked += n
        if s._recv_unacked >= self._local_initial_window // 2:
            self._window_update(s._id, s._recv_unacked)
            s._recv_window += s._recv_unacked
            s._recv_unacked = 0
            _mark(self)

    def _recv_end(self, s: Stream) -> None:
        s._recv_end = True
        if s._state == S_OPEN:
            s._state = S_HALF_REMOTE
        elif s._state == S_HALF_LOCAL:
            self._close(s, False)

    def _sent_end(self, s: Stream) -> None:
        s._sent_end = True
        if s._state == S_OPEN:
            s._state = S_HALF_LOCAL
            if s._reset_after_end:
                self._stream_error(s, E_NO_ERROR)  # §8.1: the request body is not wanted
        elif s._state == S_HALF_REMOTE:
            self._close(s, False)

    def _ignore(self, sid: int) -> None:
        """Drop late frames on ``sid`` (a stream we reset, or opened after our GOAWAY)."""
        self._recent_resets[sid] = None
        if len(self._recent_resets) > RECENT_RESETS:
            del self._recent_resets[next(iter(self._recent_resets))]

    def _stream_error_id(self, sid: int, code: int) -> None:
        s = self._streams.get(sid)
        if s is not None:
            self._stream_error(s, code)
        else:
            self._rst(sid, code)

    def _rst(self, sid: int, code: int) -> None:
        self._frame(RST_STREAM, 0, sid, _U32.pack(code))
        self._ignore(sid)
        _mark(self)

    def _stream_error(self, s: Stream, code: int) -> None:
        """Reset ``s`` with ``code`` (a stream error, or our own cancel); the connection lives on."""
        if s._state == S_CLOSED:
            return
        if not self._terminated:
            self._rst(s._id, code)
        if s._error_code < 0 or code != E_NO_ERROR:
            s._error_code = code
        if code != E_NO_ERROR:
            self._protocol_errors += code in (E_PROTOCOL_ERROR, E_FLOW_CONTROL_ERROR, E_FRAME_SIZE_ERROR)
        self._close(s, code != E_NO_ERROR or not s._sent_end)

    def _close(self, s: Stream, abnormal: bool) -> None:
        """Take ``s`` out of the connection; on an abnormal end, tell its linked peer.

        Bytes nobody will now send or consume go back to the connection
        window they were counted against, so a reset never shrinks a window
        for good.
        """
        peer = s._peer
        if s._state == S_CLOSED:
            return
        s._state = S_CLOSED
        del self._streams[s._id]
        if s._try_queue is not None:
            _try_unlink(s)
        if (s._id & 1) == self._client:
            self._open_local -= 1
        else:
            self._open_remote -= 1
        if s._held is not None:
            if s._held:
                self._credit_connection(len(s._held))  # received here, never forwarded
            s._held = None
        if (
            abnormal
            and self._client
            and peer is not None
            and peer._replay_ok
            and not peer._sent_headers
            and peer._state != S_CLOSED
            and (
                (s._unprocessed and peer._redispatched < MAX_REDISPATCH)
                or (
                    not s._unprocessed
                    and peer._retry is not None
                    and peer._retry._on_reset
                    and peer._retry.hook(peer, s, RETRY_RESET)
                )
            )
        ):
            # The upstream never saw this request (REFUSED_STREAM, or above its
            # GOAWAY's last stream id), or it did and the route retries resets:
            # hand it back to be sent elsewhere.
            if s._unprocessed:
                peer._redispatched += 1
            _detach(s, peer)
            _event(peer._conn, (EV_RETRY, peer))
            if s._notify_close:
                _event(self, (EV_CLOSED, s))
            self._check_idle()
            return
        if s._pending is not None:
            if abnormal and s._pending and peer is not None:
                peer._conn._credit_connection(len(s._pending))  # received by the peer
                _mark(peer._conn)
            s._pending = None
        if peer is not None:
            if abnormal and self._client and peer._pending_end and not peer._sent_end and peer._state != S_CLOSED:
                # An upstream that sent its whole response and then reset the
                # stream (§8.1, to stop the request body): the response waits in
                # the downstream stream for a slow client; let it drain, credit
                # comes back as it leaves.
                pass
            elif abnormal:
                if peer._pending:
                    self._credit_connection(len(peer._pending))  # received here
                    peer._pending = None
                    peer._pending_end = False
                    peer._pending_trailers = None
                _unlink(s)
                if peer._state != S_CLOSED:
                    _peer_reset(peer, s)
            elif peer._state == S_CLOSED:
                _unlink(s)  # both ends done: break the reference cycle
        if s._notify_close:
            _event(self, (EV_CLOSED, s))
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._streams and (self._goaway_sent or self._goaway_received) and not self._shutdown_ping:
            _event(self, (EV_IDLE,))

    def _flush_stream(self, s: Stream) -> None:
        """Send what waits in ``s`` as the windows allow; credit its source for what left."""
        buf = s._pending
        # Nothing more once END_STREAM is out: a WINDOW_UPDATE (or resume_writing) on a half-closed
        # (local) stream must not send a second one, the peer would answer STREAM_CLOSED (§5.1).
        if buf is None or s._state == S_CLOSED or s._sent_end or self._write_paused:
            return
        n = len(buf)
        sent = _write_data(s, buf, s._pending_end and s._pending_trailers is None)
        if sent:
            del buf[:sent]
            if s._peer is not None:
                s._peer._conn._credit(s._peer, sent)
                _mark(s._peer._conn)
        if sent == n and s._state != S_CLOSED:
            if s._pending_trailers is not None:
                trailers = s._pending_trailers
                s._pending_trailers = None
                _write_headers(s, trailers, True)
            elif s._pending_end and not s._sent_end:
                # an empty END_STREAM when the data had been sent without it
                _write_data(s, b"", True)
        _mark(self)

    def _flush_blocked(self) -> None:
        blocked = self._blocked
        self._blocked = []
        for s in blocked:
            s._blocked = False
            if s._pending is not None and (s._pending or s._pending_end):
                self._flush_stream(s)


def _mix(z: int) -> int:
    # splitmix64's finaliser, in 64-bit arithmetic.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & UINT64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & UINT64
    return z ^ (z >> 31)


def _percent_encode(message) -> bytes:
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
    raw = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    out = bytearray()
    for ch in raw:
        if 0x20 <= ch <= 0x7E and ch != 0x25:
            out.append(ch)
        else:
            out += b"%%%02X" % ch
    return bytes(out)


def _grpc_status_for_reset(code: int) -> int:
    # gRPC over HTTP/2: RST_STREAM codes as statuses. An upstream that refused
    # or broke the stream is UNAVAILABLE to the client, as Envoy answers.
    if code == E_CANCEL:
        return 1  # CANCELLED
    if code == E_ENHANCE_YOUR_CALM:
        return 8  # RESOURCE_EXHAUSTED
    if code == E_INADEQUATE_SECURITY:
        return 7  # PERMISSION_DENIED
    return 14  # UNAVAILABLE


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


def _unlink(s: Stream) -> None:
    if s._peer is not None:
        s._peer._peer = None
        s._peer = None


def _detach(up: Stream, down: Stream) -> None:
    """Take ``down``'s request back from its attempt ``up`` to be sent again: unlinked, holding
    what arrives, its replay copy to go out first on the next link."""
    if up._pending:
        down._conn._credit(down, len(up._pending))  # sent again from the replay copy
        _mark(down._conn)
    up._pending = None
    up._pending_end = False
    up._pending_trailers = None
    _unlink(up)
    down._attempts += 1
    down._hold = True
    down._resend = True
    if down._recv_end and down._trailers is None:
        down._held_end = True


def abandon(down: Stream) -> bool:
    """Cancel the attempt in flight for ``down``'s request and keep the request to send again.

    For a per-try timeout. Possible while no response headers came back and
    the request body is whole in the replay copy: then the upstream stream
    is reset (CANCEL), ``down`` is unlinked and holds what arrives, and the
    next ``open_forward`` sends the request again; returns True. Otherwise
    changes nothing and returns False. Raises no event.
    """
    _typed(down, Stream, "down")
    up = down._peer
    if up is None or down._state == S_CLOSED or down._sent_headers or not down._replay_ok or up._recv_headers:
        return False
    _detach(up, down)
    if up._state != S_CLOSED:
        up._conn._stream_error(up, E_CANCEL)
        _mark(up._conn)
    return True


def link(a: Stream, b: Stream) -> None:
    """Link two streams on two connections: from now on each forwards to the other."""
    _typed(a, Stream, "a")
    _typed(b, Stream, "b")
    if a._peer is not None or b._peer is not None:
        raise ValueError("stream already linked")
    a._peer = b
    b._peer = a
    _release_held(a)
    _release_held(b)


def _release_held(s: Stream) -> None:
    """Forward what ``s`` received before it was linked."""
    held = s._held
    dst = s._peer
    s._hold = False
    if dst is None:
        return
    if s._resend:
        # Sent once already (and credited then): sent again without crediting anyone.
        s._resend = False
        again = s._replay
        if again:
            more = bool(held) or s._held_trailers is not None
            _send_data(dst, bytes(again), s._held_end and not more, None)
            if s._replay_ok:
                s._replay = bytearray(again)
    end_with_data = s._held_end and s._held_trailers is None
    if held is not None:
        s._held = None
        if held:
            _send_data(dst, bytes(held), end_with_data, s)
        elif end_with_data and not dst._sent_end and dst._sent_headers:
            _send_data(dst, b"", True, s)
    elif end_with_data and not dst._sent_end and dst._sent_headers:
        _send_data(dst, b"", True, s)
    if s._held_trailers is not None:
        _send_trailers(dst, s._held_trailers)
        s._held_trailers = None


def _peer_reset(dst: Stream, src: Stream) -> None:
    """``src`` ended abnormally; end its linked stream ``dst`` accordingly.

    Downstream (server-role) streams get a gRPC status when no response has
    started (trailers-only, 14 UNAVAILABLE or 1 CANCELLED), else a reset.
    Upstream streams are cancelled.
    """
    c = dst._conn
    code = src._error_code
    lost = src._conn._terminated
    if c._client:
        c._stream_error(dst, E_CANCEL)
    elif dst._sent_end or dst._pending_end:
        # The whole response is out (or queued): only the request body is unwanted now.
        if not dst._recv_end and dst._sent_end:
            c._stream_error(dst, E_NO_ERROR)
    elif not dst._sent_headers and dst._is_grpc:
        status = _grpc_status_for_reset(code) if src._closed_remote_reset else 14
        reason = "upstream connection lost" if lost else f"upstream reset the stream ({_code_name(code)})"
        dst._response_flags = "UC" if lost else "UR"
        c._respond(dst, 200, (), b"", status, reason)
    elif not dst._sent_headers:
        dst._response_flags = "UC" if lost else "UR"
        reason = b"upstream connect error or disconnect/reset before headers"
        headers = [(b"content-type", b"text/plain"), (b"x-meshproxy-response-flags", b"UC" if lost else b"UR")]
        c._respond(dst, 503, headers, reason, None, None)
    else:
        dst._response_flags = "UC" if lost else "UR"
        if code == E_NO_ERROR:
            c._stream_error(dst, E_INTERNAL_ERROR)
        else:
            c._stream_error(dst, E_CANCEL if code == E_REFUSED_STREAM else code)
    _mark(c)


# -- telemetry: what the core notes for metrics, logs and traces -------------------------------------


def _count_messages(s: Stream, p) -> None:
    """Count the gRPC messages whose 5-byte prefix (flag, 4-byte length) completes in ``p``.

    Prefixes and bodies may span DATA frames: the stream keeps where it is.
    """
    i, n = 0, len(p)
    while i < n:
        if s._msg_left:
            take = min(n - i, s._msg_left)
            s._msg_left -= take
            i += take
            continue
        if not s._prefix_have and n - i >= 5:
            # the common case: a whole prefix in this frame
            s._grpc_msgs_recv += 1
            s._msg_left = int.from_bytes(p[i + 1 : i + 5], "big")
            i += 5
            continue
        if s._prefix_have:
            s._msg_len = (s._msg_len << 8) | p[i]  # bytes 1-4: the length, big-endian
        s._prefix_have += 1
        i += 1
        if s._prefix_have == 5:
            s._grpc_msgs_recv += 1
            s._msg_left = s._msg_len
            s._msg_len = 0
            s._prefix_have = 0


def _note_sent(s: Stream, headers: list, end_stream: bool) -> None:
    """Server role: record the final :status and the grpc-status of what goes downstream.

    Only (bytes, bytes) pairs are read (the encoder also takes str, which this never sees from the proxy).
    """
    if not headers:
        return
    h = headers[0]
    if isinstance(h, tuple) and len(h) == 2 and h[0] == b":status" and type(h[1]) is bytes and len(h[1]) == 3:
        v = _parse_uint(h[1])
        if v >= 200:  # a final status
            s._status = v
    if end_stream:
        for h in headers:
            if isinstance(h, tuple) and len(h) == 2 and h[0] == b"grpc-status" and type(h[1]) is bytes:
                v = _parse_uint(h[1])
                s._grpc_status = v if 0 <= v <= INT32_MAX else 2


_LOWER_HEX = frozenset(b"0123456789abcdef")


def _lower_hex(v: bytes, nonzero: bool) -> bool:
    """``v`` is lowercase hex (W3C trace context allows no other), and not all zeros if ``nonzero``."""
    return all(ch in _LOWER_HEX for ch in v) and (not nonzero or v.strip(b"0") != b"")


def _parse_traceparent(s: Stream, value: bytes) -> None:
    """An incoming ``traceparent`` (W3C trace context, "version-traceid-parentid-flags").

    A valid one fills ``trace_id``, ``parent_span_id`` and ``sampled``; an invalid one (version ff, not
    lowercase hex, an all-zero id, the wrong length) or a repeated one leaves them empty.
    """
    if s._trace_in:
        s._trace_in = 1
        s._trace_id = s._parent_span_id = b""
        s._sampled = False
        return
    s._trace_in = 1
    n = len(value)
    if n < 55 or value[2] != 0x2D or value[35] != 0x2D or value[52] != 0x2D:
        return
    if not _lower_hex(value[0:2], False) or value[0:2] == b"ff":
        return
    if (n != 55 and value[0:2] == b"00") or (n > 55 and value[55] != 0x2D):
        return  # version 00 is exactly 55 characters; a later version may add fields after a dash
    if not (_lower_hex(value[3:35], True) and _lower_hex(value[36:52], True) and _lower_hex(value[53:55], False)):
        return
    flags = int(value[53:55], 16)
    s._trace_in = 2 + flags
    s._trace_id = value[3:35]
    s._parent_span_id = value[36:52]
    s._sampled = bool(flags & 1)


def _b3_trace_id(value) -> bytes | None:
    """``x-b3-traceid`` (16 or 32 hex digits, either case) as 32 lowercase hex, or None if unusable."""
    if type(value) is not bytes or len(value) not in (16, 32):
        return None
    v = value.lower()
    if not _lower_hex(v, True):
        return None
    return v.rjust(32, b"0")


def _trace(src: Stream, mode: int, b3_trace, b3_sampled, b3_flags) -> None:
    """Work out the trace context ``src``'s request carries upstream (trace_mode 1 or 2), once per request.

    A valid incoming traceparent is kept (mode 1) or gets the proxy's span as its parent (mode 2); otherwise
    a new one starts: the trace id from x-b3-traceid if usable, else random; sampled as x-b3-flags /
    x-b3-sampled say, else with probability ``trace_sampling``.
    """
    c = src._conn
    src._trace_done = True
    if src._trace_in >= 2:
        if mode == 1:
            src._trace_out = None  # forwarded as it came
            return
        span = b"%016x" % (c._random64() or 1)
        src._trace_out = b"00-%s-%s-%02x" % (src._trace_id, span, src._trace_in - 2)
        src._span_id = span
        return
    tid = _b3_trace_id(b3_trace) if b3_trace is not None else None
    if tid is None:
        a = c._random64()
        b = c._random64()
        if a == 0 and b == 0:
            b = 1  # never the invalid all-zero trace id
        tid = b"%016x%016x" % (a, b)
    span = b"%016x" % (c._random64() or 1)
    if b3_flags == b"1":
        sampled = True  # B3 debug
    elif b3_sampled in (b"1", b"true"):
        sampled = True
    elif b3_sampled in (b"0", b"false"):
        sampled = False
    elif c._trace_sampling >= 1.0:
        sampled = True
    elif c._trace_sampling <= 0.0:
        sampled = False
    else:
        sampled = (c._random64() >> 11) * (1.0 / 9007199254740992.0) < c._trace_sampling
    src._trace_out = b"00-%s-%s-%s" % (tid, span, b"01" if sampled else b"00")
    src._trace_id = tid
    src._span_id = span
    src._parent_span_id = b""
    src._sampled = sampled


def _informational(headers: list) -> bool:
    """Whether ``headers`` open with a 1xx ``:status``."""
    if not headers:
        return False
    name, value = headers[0][0], headers[0][1]
    return name == b":status" and len(value) == 3 and value[0] == 0x31


def _send_headers(s: Stream, headers: list, end_stream: bool) -> None:
    c = s._conn
    if s._state == S_CLOSED or c._terminated:
        return
    if not c._client and _informational(headers):
        _write_headers(s, headers, False)  # 1xx: the final response is still to come
        return
    s._sent_headers = True
    _write_headers(s, headers, end_stream)


def _send_trailers(s: Stream, trailers: list) -> None:
    """Trailers end the stream; they wait behind DATA still queued."""
    if s._state == S_CLOSED or s._conn._terminated or s._sent_end:
        return
    if s._pending:
        s._pending_trailers = trailers
        s._pending_end = True
        return
    # a trailers-only response cannot follow nothing: send them as the headers
    s._sent_headers = True
    _write_headers(s, trailers, True)


def _write_headers(s: Stream, headers: list, end_stream: bool) -> None:
    """HEADERS (and CONTINUATION frames past the peer's max frame size) carrying ``headers``."""
    c = s._conn
    block = c._encoder.encode(headers, True)
    if not c._client:
        _note_sent(s, headers, end_stream)
    n = len(block)
    maxf = c._remote_max_frame_size
    chunk = min(n, maxf)
    flags = (FLAG_END_STREAM if end_stream else 0) | (FLAG_END_HEADERS if chunk == n else 0)
    c._frame(HEADERS, flags, s._id, block[:chunk])
    off = chunk
    while off < n:
        chunk = min(n - off, maxf)
        c._frame(CONTINUATION, FLAG_END_HEADERS if off + chunk == n else 0, s._id, block[off : off + chunk])
        off += chunk
    _mark(c)
    if end_stream:
        c._sent_end(s)


def _write_data(s: Stream, data, end: bool) -> int:
    """Write as much of ``data`` as the windows allow as DATA frames; return how much.

    END_STREAM goes on the last frame only if all of it was written.
    """
    c = s._conn
    n = len(data)
    maxf = c._remote_max_frame_size
    if c._write_paused:
        return 0
    allowed = max(0, min(s._send_window, c._conn_send_window, n))
    off = 0
    while off < allowed:
        chunk = min(allowed - off, maxf)
        c._frame(DATA, FLAG_END_STREAM if end and off + chunk == n else 0, s._id, data[off : off + chunk])
        off += chunk
    if n == 0 and end:
        c._frame(DATA, FLAG_END_STREAM, s._id, b"")
    s._send_window -= allowed
    c._conn_send_window -= allowed
    s._data_sent += allowed
    if off < n and not s._blocked and c._conn_send_window <= 0:
        s._blocked = True
        c._blocked.append(s)
    _mark(c)
    if end and off == n:
        c._sent_end(s)
    return off


def _send_data(dst: Stream, data: bytes, end: bool, src: Stream | None) -> None:
    """Forward ``data`` to ``dst``: now if its windows allow, else queued in it.

    ``src`` (the stream it came from, or None) is credited for what left.
    """
    n = len(data)
    sent = 0
    if dst._state == S_CLOSED or dst._sent_end or dst._conn._terminated:
        if src is not None:
            src._conn._credit(src, n)
        return
    if src is not None and src._replay_ok and n:
        # A request body is kept (up to REPLAY_LIMIT) until the upstream answers,
        # so a request it never processed can be sent again elsewhere.
        if src._replay is None:
            src._replay = bytearray()
        if len(src._replay) + n > REPLAY_LIMIT:
            src._replay_ok = False
            src._replay = None
        else:
            src._replay += data
    if not dst._pending and not dst._pending_end:
        sent = _write_data(dst, data, end)
        if sent == n and (dst._sent_end or not end):
            if src is not None and sent:
                src._conn._credit(src, sent)
            return
    if dst._pending is None:
        dst._pending = bytearray()
    dst._pending += data[sent:]
    if end:
        dst._pending_end = True
    if src is not None and sent:
        src._conn._credit(src, sent)
