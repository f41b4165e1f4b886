# cython: language_level=3
"""RFC 9113 frame codec, compiled twin of ``meshproxy/codec/frames_py.py``.

Owns the wire format of the ten HTTP/2 frame types: the incremental parser
(``FrameParser``), the per-type length, flag and stream-id rules, the
header-block sequencing rule, and the ``write_*`` serializers that append to
a caller-owned ``bytearray``. Same names, same behaviour, same errors as the
pure-Python twin; the tests run on both.

Payloads are not copied: a frame remembers the fed chunk and offsets, and
``data`` returns a memoryview slice of that chunk when asked.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy, memset

from meshproxy.codec.constants import (
    CONTINUATION, DATA, DEFAULT_WEIGHT, DEFINED_FLAGS, GOAWAY, HEADERS, PING, PRIORITY,
    PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
)
from meshproxy.errors import FlowControlError, FrameSizeError, ProtocolError

__all__ = [
    "ContinuationFrame", "DataFrame", "Frame", "FrameParser", "GoAwayFrame", "HeadersFrame",
    "PingFrame", "PriorityFrame", "PushPromiseFrame", "RstStreamFrame", "SettingsFrame",
    "WindowUpdateFrame", "write_continuation", "write_data", "write_frame_header", "write_goaway",
    "write_header_block", "write_headers", "write_ping", "write_priority", "write_push_promise",
    "write_rst_stream", "write_settings", "write_window_update",
]

# Defined flags per type, as a C array indexed by type (RFC 9113 §4.1: the
# others are ignored on receipt).
cdef uint8_t _DEFINED[10]
for _t, _f in DEFINED_FLAGS.items():
    _DEFINED[_t] = _f

cdef enum:
    STREAM_MASK = 0x7FFFFFFF
    MAX_WINDOW = 0x7FFFFFFF


cdef class Frame:
    """One parsed frame. ``length`` is the payload length on the wire."""

    type = -1

    def __init__(self, *args, **kwargs):
        raise TypeError("frames are made by FrameParser; use the write_* functions to build bytes")

    def serialize_into(self, bytearray buf):
        raise NotImplementedError  # every concrete frame type overrides this

    def _fields(self):
        return ()

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields())
        return f"{type(self).__name__}(stream_id={self.stream_id}, flags={self.flags:#x}, {fields})"


cdef class _Block(Frame):
    @property
    def data(self):
        return self._mv[self._start:self._end]

    @property
    def padding(self):
        return self._mv[self._end:self._payload_end]


@cython.freelist(32)
cdef class DataFrame(_Block):
    type = DATA

    @property
    def end_stream(self):
        return bool(self.flags & F_END_STREAM)

    @property
    def flow_controlled_length(self):
        # The whole payload counts, padding and its length byte included.
        return self.length

    def serialize_into(self, bytearray buf):
        write_data(buf, self.stream_id, self.data, self.end_stream,
                   self.pad_length if self.flags & F_PADDED else None)

    def _fields(self):
        return ("data", "pad_length")


@cython.freelist(32)
cdef class HeadersFrame(_Block):
    type = HEADERS

    @property
    def end_stream(self):
        return bool(self.flags & F_END_STREAM)

    @property
    def end_headers(self):
        return bool(self.flags & F_END_HEADERS)

    @property
    def priority(self):
        return bool(self.flags & F_PRIORITY)

    def serialize_into(self, bytearray buf):
        write_headers(
            buf, self.stream_id, self.data, self.end_stream, self.end_headers,
            self.pad_length if self.flags & F_PADDED else None,
            (self.depends_on, self.weight, self.exclusive) if self.flags & F_PRIORITY else None,
        )

    def _fields(self):
        return ("data", "pad_length", "depends_on", "weight", "exclusive")


cdef class PriorityFrame(Frame):
    type = PRIORITY

    def serialize_into(self, bytearray buf):
        write_priority(buf, self.stream_id, self.depends_on, self.weight, self.exclusive)

    def _fields(self):
        return ("depends_on", "weight", "exclusive")


cdef class RstStreamFrame(Frame):
    type = RST_STREAM

    def serialize_into(self, bytearray buf):
        write_rst_stream(buf, self.stream_id, self.error_code)

    def _fields(self):
        return ("error_code",)


cdef class SettingsFrame(Frame):
    type = SETTINGS

    @property
    def ack(self):
        return bool(self.flags & F_ACK)

    def serialize_into(self, bytearray buf):
        write_settings(buf, self.settings, self.ack)

    def _fields(self):
        return ("settings",)


cdef class PushPromiseFrame(_Block):
    type = PUSH_PROMISE

    @property
    def end_headers(self):
        return bool(self.flags & F_END_HEADERS)

    def serialize_into(self, bytearray buf):
        write_push_promise(buf, self.stream_id, self.promised_stream_id, self.data, self.end_headers,
                           self.pad_length if self.flags & F_PADDED else None)

    def _fields(self):
        return ("promised_stream_id", "data", "pad_length")


@cython.freelist(8)
cdef class PingFrame(Frame):
    type = PING

    @property
    def ack(self):
        return bool(self.flags & F_ACK)

    def serialize_into(self, bytearray buf):
        write_ping(buf, self.opaque_data, self.ack)

    def _fields(self):
        return ("opaque_data",)


cdef class GoAwayFrame(_Block):
    type = GOAWAY

    @property
    def additional_data(self):
        return self._mv[self._start:self._end]

    def serialize_into(self, bytearray buf):
        write_goaway(buf, self.last_stream_id, self.error_code, self.additional_data)

    def _fields(self):
        return ("last_stream_id", "error_code", "additional_data")


@cython.freelist(32)
cdef class WindowUpdateFrame(Frame):
    type = WINDOW_UPDATE

    def serialize_into(self, bytearray buf):
        write_window_update(buf, self.stream_id, self.increment)

    def _fields(self):
        return ("increment",)


cdef class ContinuationFrame(_Block):
    type = CONTINUATION

    @property
    def end_headers(self):
        return bool(self.flags & F_END_HEADERS)

    def serialize_into(self, bytearray buf):
        write_continuation(buf, self.stream_id, self.data, self.end_headers)

    def _fields(self):
        return ("data",)


cdef inline int _need_stream(uint32_t sid, str name) except -1:
    if sid == 0:
        raise ProtocolError(f"{name} frame on stream 0")
    return 0


cdef inline int _need_connection(uint32_t sid, str name) except -1:
    if sid != 0:
        raise ProtocolError(f"{name} frame on stream {sid}")
    return 0


cdef class FrameParser:
    """Incremental frame parser: ``feed(bytes)``, then iterate for whole frames.

    ``max_frame_size`` is the SETTINGS_MAX_FRAME_SIZE we advertised: a longer
    frame is a connection FRAME_SIZE_ERROR, raised as soon as its header is in,
    before its payload is buffered. Unknown frame types are skipped.
    Iteration stops (without consuming) when the next frame is incomplete.
    After a connection error the parser must not be used again.
    """

    def __init__(self, max_frame_size=MIN_MAX_FRAME_SIZE):
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._pos = 0
        # The pieces of an incomplete frame and the bytes that frame needs:
        # they are joined once, when it is whole, so a large frame arriving in
        # many reads is copied once, not once per read. Reads shorter than
        # HOLD_PIECE are coalesced in ``_tail`` first, so that a peer
        # trickling a frame a byte at a time costs memory in proportion to
        # the frame, not to the number of reads.
        self._held = []
        self._tail = bytearray()
        self._held_len = 0
        self._need = 0
        self._header_block_stream = 0
        self.max_frame_size = max_frame_size

    @property
    def max_frame_size(self):
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value):
        if not MIN_MAX_FRAME_SIZE <= value <= MAX_FRAME_LENGTH:
            raise ValueError(f"max_frame_size must be in [16384, 16777215], got {value}")
        self._max_frame_size = value

    @property
    def buffered(self):
        """Bytes fed but not yet returned as frames."""
        return PyBytes_GET_SIZE(self._buf) - self._pos + self._held_len

    @property
    def header_block_stream(self):
        """The stream whose header block awaits CONTINUATION frames, or 0."""
        return self._header_block_stream

    def feed(self, data):
        if type(data) is not bytes:
            data = bytes(data)
        cdef Py_ssize_t left = PyBytes_GET_SIZE(self._buf) - self._pos
        if left > 0:
            # Only the partial frame left over is copied; whole frames in
            # ``data`` are then sliced in place.
            self._hold(self._buf[self._pos:])
            self._buf = b""
            self._pos = 0
            self._mv = memoryview(self._buf)
        if self._held_len:
            self._hold(<bytes>data)
            if self._held_len < self._need:
                return
            if self._tail:
                self._held.append(bytes(self._tail))
                del self._tail[:]
            data = b"".join(self._held)
            self._held = []
            self._held_len = 0
        self._buf = <bytes>data
        self._pos = 0
        self._mv = memoryview(self._buf)

    cdef int _hold(self, bytes piece) except -1:
        self._held_len += PyBytes_GET_SIZE(piece)
        if PyBytes_GET_SIZE(piece) >= HOLD_PIECE:
            if self._tail:
                self._held.append(bytes(self._tail))
                del self._tail[:]
            self._held.append(piece)
        else:
            self._tail += piece
            if PyByteArray_GET_SIZE(self._tail) >= HOLD_PIECE:
                self._held.append(bytes(self._tail))
                del self._tail[:]
        return 0

    def __iter__(self):
        return self

    def __next__(self):
        cdef Frame f = self._next()
        if f is None:
            raise StopIteration
        return f

    cdef Frame _next(self):
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(self._buf)
        cdef const uint8_t* p
        cdef Py_ssize_t avail, start
        cdef uint32_t length, sid
        cdef uint8_t ftype, flags
        while True:
            avail = PyBytes_GET_SIZE(self._buf) - self._pos
            if avail < HEADER_SIZE:
                if not self._held_len:  # else the held reads already know their need
                    self._need = HEADER_SIZE
                return None
            p = base + self._pos
            length = (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]
            ftype = p[3]
            if length > self._max_frame_size:
                raise FrameSizeError(
                    f"frame of type {ftype} has length {length} > max frame size {self._max_frame_size}")
            if avail < HEADER_SIZE + length:
                self._need = HEADER_SIZE + length
                return None
            flags = p[4]
            sid = read_u32(p + 5) & STREAM_MASK
            start = self._pos + HEADER_SIZE
            self._pos = start + length
            if self._header_block_stream and (ftype != T_CONTINUATION or sid != self._header_block_stream):
                raise ProtocolError(
                    f"expected CONTINUATION on stream {self._header_block_stream}, "
                    f"got frame type {ftype} on stream {sid}")
            if ftype > T_CONTINUATION:
                continue  # unknown frame types are ignored (RFC 9113 §4.1)
            flags &= _DEFINED[ftype]
            if ftype == T_DATA:
                return self._data(flags, sid, start, length)
            if ftype == T_HEADERS:
                return self._headers(flags, sid, start, length)
            if ftype == T_WINDOW_UPDATE:
                return self._window_update(flags, sid, start, length)
            if ftype == T_CONTINUATION:
                return self._continuation(flags, sid, start, length)
            if ftype == T_PING:
                return self._ping(flags, sid, start, length)
            if ftype == T_SETTINGS:
                return self._settings(flags, sid, start, length)
            if ftype == T_RST_STREAM:
                return self._rst_stream(flags, sid, start, length)
            if ftype == T_GOAWAY:
                return self._goaway(flags, sid, start, length)
            if ftype == T_PRIORITY:
                return self._priority(flags, sid, start, length)
            return self._push_promise(flags, sid, start, length)

    cdef inline const uint8_t* _at(self, Py_ssize_t off):
        return <const uint8_t*>PyBytes_AS_STRING(self._buf) + off

    cdef inline void _init(self, Frame f, uint8_t flags, uint32_t sid, uint32_t length):
        f.flags = flags
        f.stream_id = sid
        f.length = length

    cdef inline void _init_block(self, _Block f, Py_ssize_t start, Py_ssize_t end, Py_ssize_t payload_end):
        f._mv = self._mv
        f._start = start
        f._end = end
        f._payload_end = payload_end

    cdef DataFrame _data(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_stream(sid, "DATA")
        cdef DataFrame f = DataFrame.__new__(DataFrame)
        self._init(f, flags, sid, length)
        cdef Py_ssize_t end = start + length
        cdef uint8_t pad = 0
        if flags & F_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED DATA frame too short for its pad length")
            pad = self._at(start)[0]
            if pad > length - 1:
                raise ProtocolError("DATA padding exceeds the payload")
            self._init_block(f, start + 1, end - pad, end)
        else:
            self._init_block(f, start, end, end)
        f.pad_length = pad
        return f

    cdef HeadersFrame _headers(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_stream(sid, "HEADERS")
        cdef HeadersFrame f = HeadersFrame.__new__(HeadersFrame)
        self._init(f, flags, sid, length)
        cdef Py_ssize_t end = start + length
        cdef uint8_t pad = 0
        cdef uint32_t dep
        if flags & F_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED HEADERS frame too short for its pad length")
            pad = self._at(start)[0]
            start += 1
        if flags & F_PRIORITY:
            if end - start < 5:
                raise FrameSizeError("HEADERS frame too short for its priority fields")
            dep = read_u32(self._at(start))
            f.depends_on = dep & STREAM_MASK
            f.exclusive = dep >> 31
            f.weight = self._at(start)[4] + 1
            start += 5
        else:
            f.depends_on = 0
            f.weight = DEFAULT_WEIGHT
            f.exclusive = False
        if pad > end - start:
            raise ProtocolError("HEADERS padding exceeds the payload")
        f.pad_length = pad
        self._init_block(f, start, end - pad, end)
        if not flags & F_END_HEADERS:
            self._header_block_stream = sid
        return f

    cdef PriorityFrame _priority(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_stream(sid, "PRIORITY")
        if length != 5:
            raise FrameSizeError(f"PRIORITY frame of length {length}", stream_id=sid)
        cdef PriorityFrame f = PriorityFrame.__new__(PriorityFrame)
        self._init(f, flags, sid, length)
        cdef uint32_t dep = read_u32(self._at(start))
        f.depends_on = dep & STREAM_MASK
        f.exclusive = dep >> 31
        f.weight = self._at(start)[4] + 1
        if f.depends_on == sid:
            raise ProtocolError("stream depends on itself", stream_id=sid)
        return f

    cdef RstStreamFrame _rst_stream(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_stream(sid, "RST_STREAM")
        if length != 4:
            raise FrameSizeError(f"RST_STREAM frame of length {length}")
        cdef RstStreamFrame f = RstStreamFrame.__new__(RstStreamFrame)
        self._init(f, flags, sid, length)
        f.error_code = read_u32(self._at(start))
        return f

    cdef SettingsFrame _settings(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_connection(sid, "SETTINGS")
        if flags & F_ACK and length:
            raise FrameSizeError("SETTINGS ACK with a payload")
        if length % 6:
            raise FrameSizeError(f"SETTINGS frame of length {length}, not a multiple of 6")
        cdef SettingsFrame f = SettingsFrame.__new__(SettingsFrame)
        self._init(f, flags, sid, length)
        cdef list settings = []
        cdef const uint8_t* p = self._at(start)
        cdef uint32_t i, ident, value
        for i in range(0, length, 6):
            ident = (<uint32_t>p[i] << 8) | p[i + 1]
            value = read_u32(p + i + 2)
            _check_setting(ident, value)
            settings.append((ident, value))
        f.settings = settings
        return f

    cdef PushPromiseFrame _push_promise(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_stream(sid, "PUSH_PROMISE")
        cdef PushPromiseFrame f = PushPromiseFrame.__new__(PushPromiseFrame)
        self._init(f, flags, sid, length)
        cdef Py_ssize_t end = start + length
        cdef uint8_t pad = 0
        if flags & F_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED PUSH_PROMISE frame too short for its pad length")
            pad = self._at(start)[0]
            start += 1
        if end - start < 4:
            raise FrameSizeError("PUSH_PROMISE frame too short for its promised stream id")
        cdef uint32_t promised = read_u32(self._at(start)) & STREAM_MASK
        start += 4
        if promised == 0 or promised & 1:
            raise ProtocolError(f"PUSH_PROMISE promises invalid stream {promised}")
        if pad > end - start:
            raise ProtocolError("PUSH_PROMISE padding exceeds the payload")
        f.promised_stream_id = promised
        f.pad_length = pad
        self._init_block(f, start, end - pad, end)
        if not flags & F_END_HEADERS:
            self._header_block_stream = sid
        return f

    cdef PingFrame _ping(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_connection(sid, "PING")
        if length != 8:
            raise FrameSizeError(f"PING frame of length {length}")
        cdef PingFrame f = PingFrame.__new__(PingFrame)
        self._init(f, flags, sid, length)
        f.opaque_data = PyBytes_FromStringAndSize(<const char*>self._at(start), 8)
        return f

    cdef GoAwayFrame _goaway(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_connection(sid, "GOAWAY")
        if length < 8:
            raise FrameSizeError(f"GOAWAY frame of length {length}")
        cdef GoAwayFrame f = GoAwayFrame.__new__(GoAwayFrame)
        self._init(f, flags, sid, length)
        f.last_stream_id = read_u32(self._at(start)) & STREAM_MASK
        f.error_code = read_u32(self._at(start + 4))
        self._init_block(f, start + 8, start + length, start + length)
        return f

    cdef WindowUpdateFrame _window_update(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        if length != 4:
            raise FrameSizeError(f"WINDOW_UPDATE frame of length {length}")
        cdef WindowUpdateFrame f = WindowUpdateFrame.__new__(WindowUpdateFrame)
        self._init(f, flags, sid, length)
        f.increment = read_u32(self._at(start)) & STREAM_MASK
        if f.increment == 0:
            raise ProtocolError("WINDOW_UPDATE with increment 0", stream_id=sid or None)
        return f

    cdef ContinuationFrame _continuation(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length):
        _need_stream(sid, "CONTINUATION")
        if self._header_block_stream != sid:
            raise ProtocolError(f"CONTINUATION on stream {sid} outside a header block")
        cdef ContinuationFrame f = ContinuationFrame.__new__(ContinuationFrame)
        self._init(f, flags, sid, length)
        self._init_block(f, start, start + length, start + length)
        if flags & F_END_HEADERS:
            self._header_block_stream = 0
        return f


cdef int _check_setting(uint32_t ident, uint32_t value) except -1:
    if ident == 0x2 and value > 1:
        raise ProtocolError(f"SETTINGS_ENABLE_PUSH = {value}")
    if ident == 0x4 and value > MAX_WINDOW:
        raise FlowControlError(f"SETTINGS_INITIAL_WINDOW_SIZE = {value}")
    if ident == 0x5 and not MIN_MAX_FRAME_SIZE <= value <= MAX_FRAME_LENGTH:
        raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE = {value}")
    return 0


# Serialization. Each ``write_*`` appends one frame to ``buf``. Invalid
# arguments are our own bugs, not the peer's, so they raise ValueError.

cdef uint8_t* grow(bytearray buf, Py_ssize_t n) except NULL:
    """Extend ``buf`` by ``n`` bytes and return where they start."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, old + n)
    return <uint8_t*>PyByteArray_AS_STRING(buf) + old


cdef inline int _stream_arg(object stream_id, str name) except -1:
    if not 0 < stream_id <= STREAM_MASK:
        raise ValueError(f"{name} needs a stream id in [1, 2^31-1], got {stream_id}")
    return 0


cdef inline int _u32_arg(object value, str name) except -1:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value} out of range [0, 2^32-1]")
    return 0


cdef inline int _pad_arg(object pad_length) except -1:
    """0 for no padding, else the bytes padding adds (pad length + its octet)."""
    if pad_length is None:
        return 0
    if not 0 <= pad_length <= 255:
        raise ValueError(f"pad length {pad_length} out of range")
    return <int>pad_length + 1


cdef int _write(bytearray buf, uint8_t ftype, uint8_t flags, uint32_t sid, object payload,
                int pad, const uint8_t* prefix, Py_ssize_t prefix_len) except -1:
    """Append header, [pad length], prefix, payload, [zero padding]."""
    cdef Py_buffer view
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    cdef Py_ssize_t length = view.len + prefix_len + pad
    cdef uint8_t* out
    try:
        if length > MAX_FRAME_LENGTH:
            raise ValueError(f"frame length {length} out of range")
        out = grow(buf, HEADER_SIZE + length)
        put_frame_header(out, <uint32_t>length, ftype, flags, sid)
        out += HEADER_SIZE
        if pad:
            out[0] = pad - 1
            out += 1
        if prefix_len:
            memcpy(out, prefix, prefix_len)
            out += prefix_len
        memcpy(out, view.buf, view.len)
        if pad > 1:
            memset(out + view.len, 0, pad - 1)
    finally:
        PyBuffer_Release(&view)
    return 0


def write_frame_header(bytearray buf, length, ftype, flags, stream_id):
    if not 0 <= length <= MAX_FRAME_LENGTH:
        raise ValueError(f"frame length {length} out of range")
    if not 0 <= stream_id <= STREAM_MASK:
        raise ValueError(f"stream id {stream_id} out of range")
    if not 0 <= ftype <= 0xFF:
        raise ValueError(f"frame type {ftype} out of range")
    if not 0 <= flags <= 0xFF:
        raise ValueError(f"flags {flags} out of range")
    put_frame_header(grow(buf, HEADER_SIZE), length, ftype, flags, stream_id)


def write_data(bytearray buf, stream_id, data, bint end_stream=False, pad_length=None):
    _stream_arg(stream_id, "DATA")
    cdef int pad = _pad_arg(pad_length)
    _write(buf, T_DATA, (F_END_STREAM if end_stream else 0) | (F_PADDED if pad else 0),
           stream_id, data, pad, NULL, 0)


cdef int _priority_fields(uint8_t* out, object depends_on, object weight, bint exclusive) except -1:
    if not 0 <= depends_on <= STREAM_MASK:
        raise ValueError(f"dependency {depends_on} out of range")
    if not 1 <= weight <= 256:
        raise ValueError(f"weight {weight} out of range [1, 256]")
    put_u32(out, <uint32_t>depends_on | (0x80000000 if exclusive else 0))
    out[4] = <int>weight - 1
    return 0


def write_headers(bytearray buf, stream_id, fragment, bint end_stream=False, bint end_headers=True,
                  pad_length=None, priority=None):
    _stream_arg(stream_id, "HEADERS")
    cdef int pad = _pad_arg(pad_length)
    cdef uint8_t prio[5]
    cdef uint8_t flags = ((F_END_STREAM if end_stream else 0) | (F_END_HEADERS if end_headers else 0)
                          | (F_PADDED if pad else 0))
    if priority is not None:
        depends_on, weight, exclusive = priority
        _priority_fields(prio, depends_on, weight, exclusive)
        flags |= F_PRIORITY
    _write(buf, T_HEADERS, flags, stream_id, fragment, pad, prio, 5 if priority is not None else 0)


def write_priority(bytearray buf, stream_id, depends_on, weight, bint exclusive=False):
    _stream_arg(stream_id, "PRIORITY")
    cdef uint8_t prio[5]
    _priority_fields(prio, depends_on, weight, exclusive)
    _write(buf, T_PRIORITY, 0, stream_id, b"", 0, prio, 5)


def write_rst_stream(bytearray buf, stream_id, error_code):
    _stream_arg(stream_id, "RST_STREAM")
    _u32_arg(error_code, "error code")
    cdef uint8_t* out = grow(buf, HEADER_SIZE + 4)
    put_frame_header(out, 4, T_RST_STREAM, 0, stream_id)
    put_u32(out + HEADER_SIZE, error_code)


def write_settings(bytearray buf, settings=(), bint ack=False):
    settings = list(settings)
    if ack and settings:
        raise ValueError("a SETTINGS ACK carries no settings")
    for ident, value in settings:
        if not 0 <= ident <= 0xFFFF:
            raise ValueError(f"setting identifier {ident} out of range [0, 2^16-1]")
        _u32_arg(value, "setting value")
    cdef Py_ssize_t n = len(settings)
    cdef uint8_t* out = grow(buf, HEADER_SIZE + 6 * n)
    put_frame_header(out, <uint32_t>(6 * n), T_SETTINGS, F_ACK if ack else 0, 0)
    out += HEADER_SIZE
    cdef uint32_t c_ident, c_value
    for item in settings:
        c_ident, c_value = item
        out[0] = c_ident >> 8
        out[1] = c_ident
        put_u32(out + 2, c_value)
        out += 6


def write_push_promise(bytearray buf, stream_id, promised_stream_id, fragment, bint end_headers=True,
                       pad_length=None):
    _stream_arg(stream_id, "PUSH_PROMISE")
    _stream_arg(promised_stream_id, "PUSH_PROMISE")
    cdef int pad = _pad_arg(pad_length)
    cdef uint8_t promised[4]
    put_u32(promised, promised_stream_id)
    _write(buf, T_PUSH_PROMISE, (F_END_HEADERS if end_headers else 0) | (F_PADDED if pad else 0),
           stream_id, fragment, pad, promised, 4)


def write_ping(bytearray buf, opaque_data, bint ack=False):
    if len(opaque_data) != 8:
        raise ValueError("PING opaque data must be 8 bytes")
    _write(buf, T_PING, F_ACK if ack else 0, 0, opaque_data, 0, NULL, 0)


def write_goaway(bytearray buf, last_stream_id, error_code, additional_data=b""):
    if not 0 <= last_stream_id <= STREAM_MASK:
        raise ValueError(f"last stream id {last_stream_id} out of range")
    _u32_arg(error_code, "error code")
    cdef uint8_t fields[8]
    put_u32(fields, last_stream_id)
    put_u32(fields + 4, error_code)
    _write(buf, T_GOAWAY, 0, 0, additional_data, 0, fields, 8)


def write_window_update(bytearray buf, stream_id, increment):
    if not 0 < increment <= MAX_WINDOW:
        raise ValueError(f"window increment {increment} out of range [1, 2^31-1]")
    if not 0 <= stream_id <= STREAM_MASK:
        raise ValueError(f"stream id {stream_id} out of range")
    cdef uint8_t* out = grow(buf, HEADER_SIZE + 4)
    put_frame_header(out, 4, T_WINDOW_UPDATE, 0, stream_id)
    put_u32(out + HEADER_SIZE, increment)


def write_continuation(bytearray buf, stream_id, fragment, bint end_headers=True):
    _stream_arg(stream_id, "CONTINUATION")
    _write(buf, T_CONTINUATION, F_END_HEADERS if end_headers else 0, stream_id, fragment, 0, NULL, 0)


def write_header_block(bytearray buf, stream_id, block, bint end_stream=False,
                       max_frame_size=MIN_MAX_FRAME_SIZE, priority=None):
    """Write a whole header block: one HEADERS frame, then as many
    CONTINUATION frames as ``max_frame_size`` (the peer's) requires."""
    if not MIN_MAX_FRAME_SIZE <= max_frame_size <= MAX_FRAME_LENGTH:
        raise ValueError(f"max_frame_size {max_frame_size} out of range")
    view = memoryview(block)
    cdef Py_ssize_t first = max_frame_size - (5 if priority is not None else 0)
    cdef Py_ssize_t total = len(view)
    cdef Py_ssize_t pos, nxt
    write_headers(buf, stream_id, view[:first], end_stream, total <= first, None, priority)
    pos = first
    while pos < total:
        nxt = pos + max_frame_size
        write_continuation(buf, stream_id, view[pos:nxt], nxt >= total)
        pos = nxt
