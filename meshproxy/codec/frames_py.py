"""RFC 9113 frame codec, pure-Python twin of ``meshproxy/_fast/frames.pyx``.

Owns the wire format of the ten HTTP/2 frame types: the incremental parser
(``FrameParser``: bytes in, in any chunking; whole frames out), the per-type
length, flag and stream-id rules, the header-block sequencing rule
(HEADERS/PUSH_PROMISE ... CONTINUATION), and the ``write_*`` serializers that
append to a caller-owned ``bytearray``. It knows nothing of streams, windows
or sockets: that is the connection's business.

Bodies are exposed without copying: ``data`` fields are memoryview slices of
the bytes that were fed, so a frame keeps its chunk alive. Errors are raised
from :mod:`meshproxy.errors`; a stream error leaves the parser positioned
after the offending frame, so the caller can reset that stream and carry on.
"""

from __future__ import annotations

import struct
from typing import TypeVar

from meshproxy.codec.constants import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WEIGHT,
    DEFINED_FLAGS,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    GOAWAY,
    HEADERS,
    MAX_MAX_FRAME_SIZE,
    MAX_WINDOW_SIZE,
    PING,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
)
from meshproxy.errors import FlowControlError, FrameSizeError, ProtocolError

__all__ = [
    "ContinuationFrame",
    "DataFrame",
    "Frame",
    "FrameParser",
    "GoAwayFrame",
    "HeadersFrame",
    "PingFrame",
    "PriorityFrame",
    "PushPromiseFrame",
    "RstStreamFrame",
    "SettingsFrame",
    "WindowUpdateFrame",
    "write_continuation",
    "write_data",
    "write_frame_header",
    "write_goaway",
    "write_header_block",
    "write_headers",
    "write_ping",
    "write_priority",
    "write_push_promise",
    "write_rst_stream",
    "write_settings",
    "write_window_update",
]

_U32 = struct.Struct(">L")
_HEADER = struct.Struct(">BHBBL")
_PRIO = struct.Struct(">LB")
_SETTING = struct.Struct(">HL")
_U32x2 = struct.Struct(">LL")
_MAX_LENGTH = MAX_MAX_FRAME_SIZE
#: Reads of an incomplete frame shorter than this are coalesced before being held.
_HOLD_PIECE = 4096
_STREAM_MASK = 0x7FFFFFFF


_F = TypeVar("_F", bound="Frame")


class Frame:
    """One parsed frame. ``length`` is the payload length on the wire."""

    __slots__ = ("flags", "length", "stream_id")
    type: int = -1

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("frames are made by FrameParser; use the write_* functions to build bytes")

    def serialize_into(self, buf: bytearray) -> None:
        raise NotImplementedError  # every concrete frame type overrides this

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields())
        return f"{type(self).__name__}(stream_id={self.stream_id}, flags={self.flags:#x}, {fields})"

    def _fields(self) -> tuple[str, ...]:
        return ()


class DataFrame(Frame):
    __slots__ = ("data", "pad_length", "padding")
    type = DATA

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & FLAG_END_STREAM)

    @property
    def flow_controlled_length(self) -> int:
        # The whole payload counts, padding and its length byte included.
        return self.length

    def serialize_into(self, buf: bytearray) -> None:
        write_data(buf, self.stream_id, self.data, self.end_stream, self._pad())

    def _pad(self) -> int | None:
        return self.pad_length if self.flags & FLAG_PADDED else None

    def _fields(self) -> tuple[str, ...]:
        return ("data", "pad_length")


class HeadersFrame(Frame):
    __slots__ = ("data", "depends_on", "exclusive", "pad_length", "padding", "weight")
    type = HEADERS

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & FLAG_END_STREAM)

    @property
    def end_headers(self) -> bool:
        return bool(self.flags & FLAG_END_HEADERS)

    @property
    def priority(self) -> bool:
        return bool(self.flags & FLAG_PRIORITY)

    def serialize_into(self, buf: bytearray) -> None:
        write_headers(
            buf,
            self.stream_id,
            self.data,
            self.end_stream,
            self.end_headers,
            self.pad_length if self.flags & FLAG_PADDED else None,
            (self.depends_on, self.weight, self.exclusive) if self.priority else None,
        )

    def _fields(self) -> tuple[str, ...]:
        return ("data", "pad_length", "depends_on", "weight", "exclusive")


class PriorityFrame(Frame):
    __slots__ = ("depends_on", "exclusive", "weight")
    type = PRIORITY

    def serialize_into(self, buf: bytearray) -> None:
        write_priority(buf, self.stream_id, self.depends_on, self.weight, self.exclusive)

    def _fields(self) -> tuple[str, ...]:
        return ("depends_on", "weight", "exclusive")


class RstStreamFrame(Frame):
    __slots__ = ("error_code",)
    type = RST_STREAM

    def serialize_into(self, buf: bytearray) -> None:
        write_rst_stream(buf, self.stream_id, self.error_code)

    def _fields(self) -> tuple[str, ...]:
        return ("error_code",)


class SettingsFrame(Frame):
    __slots__ = ("settings",)
    type = SETTINGS

    @property
    def ack(self) -> bool:
        return bool(self.flags & FLAG_ACK)

    def serialize_into(self, buf: bytearray) -> None:
        write_settings(buf, self.settings, self.ack)

    def _fields(self) -> tuple[str, ...]:
        return ("settings",)


class PushPromiseFrame(Frame):
    __slots__ = ("data", "pad_length", "padding", "promised_stream_id")
    type = PUSH_PROMISE

    @property
    def end_headers(self) -> bool:
        return bool(self.flags & FLAG_END_HEADERS)

    def serialize_into(self, buf: bytearray) -> None:
        write_push_promise(
            buf,
            self.stream_id,
            self.promised_stream_id,
            self.data,
            self.end_headers,
            self.pad_length if self.flags & FLAG_PADDED else None,
        )

    def _fields(self) -> tuple[str, ...]:
        return ("promised_stream_id", "data", "pad_length")


class PingFrame(Frame):
    __slots__ = ("opaque_data",)
    type = PING

    @property
    def ack(self) -> bool:
        return bool(self.flags & FLAG_ACK)

    def serialize_into(self, buf: bytearray) -> None:
        write_ping(buf, self.opaque_data, self.ack)

    def _fields(self) -> tuple[str, ...]:
        return ("opaque_data",)


class GoAwayFrame(Frame):
    __slots__ = ("additional_data", "error_code", "last_stream_id")
    type = GOAWAY

    def serialize_into(self, buf: bytearray) -> None:
        write_goaway(buf, self.last_stream_id, self.error_code, self.additional_data)

    def _fields(self) -> tuple[str, ...]:
        return ("last_stream_id", "error_code", "additional_data")


class WindowUpdateFrame(Frame):
    __slots__ = ("increment",)
    type = WINDOW_UPDATE

    def serialize_into(self, buf: bytearray) -> None:
        write_window_update(buf, self.stream_id, self.increment)

    def _fields(self) -> tuple[str, ...]:
        return ("increment",)


class ContinuationFrame(Frame):
    __slots__ = ("data",)
    type = CONTINUATION

    @property
    def end_headers(self) -> bool:
        return bool(self.flags & FLAG_END_HEADERS)

    def serialize_into(self, buf: bytearray) -> None:
        write_continuation(buf, self.stream_id, self.data, self.end_headers)

    def _fields(self) -> tuple[str, ...]:
        return ("data",)


class FrameParser:
    """Incremental frame parser: ``feed(bytes)``, then iterate for whole frames.

    ``max_frame_size`` is the SETTINGS_MAX_FRAME_SIZE we advertised: a longer
    frame is a connection FRAME_SIZE_ERROR, raised as soon as its header is in,
    before its payload is buffered. Unknown frame types are skipped.
    Iteration stops (without consuming) when the next frame is incomplete.
    After a connection error the parser must not be used again.
    """

    __slots__ = (
        "_buf",
        "_header_block_stream",
        "_held",
        "_held_len",
        "_max_frame_size",
        "_mv",
        "_need",
        "_pos",
        "_tail",
    )

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._buf = b""
        self._mv = memoryview(b"")
        self._pos = 0
        # The pieces of an incomplete frame and the bytes that frame needs:
        # they are joined once, when it is whole, so a large frame arriving in
        # many reads is copied once, not once per read. Reads shorter than
        # _HOLD_PIECE are coalesced in ``_tail`` first, so that a peer
        # trickling a frame a byte at a time costs memory in proportion to
        # the frame, not to the number of reads.
        self._held: list[bytes] = []
        self._tail = bytearray()
        self._held_len = 0
        self._need = 0
        self._header_block_stream = 0
        self.max_frame_size = max_frame_size

    @property
    def max_frame_size(self) -> int:
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in [16384, 16777215], got {value}")
        self._max_frame_size = value

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames."""
        return len(self._buf) - self._pos + self._held_len

    @property
    def header_block_stream(self) -> int:
        """The stream whose header block awaits CONTINUATION frames, or 0."""
        return self._header_block_stream

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        if self._pos < len(self._buf):
            # Only the partial frame left over is copied; whole frames in
            # ``data`` are then sliced in place.
            self._hold(self._buf[self._pos :])
            self._buf = b""
            self._pos = 0
            self._mv = memoryview(self._buf)
        if self._held_len:
            self._hold(data)
            if self._held_len < self._need:
                return
            if self._tail:
                self._held.append(bytes(self._tail))
                self._tail.clear()
            data = b"".join(self._held)
            self._held.clear()
            self._held_len = 0
        self._buf = data
        self._pos = 0
        self._mv = memoryview(data)

    def _hold(self, piece: bytes) -> None:
        self._held_len += len(piece)
        if len(piece) >= _HOLD_PIECE:
            if self._tail:
                self._held.append(bytes(self._tail))
                self._tail.clear()
            self._held.append(piece)
        else:
            self._tail += piece
            if len(self._tail) >= _HOLD_PIECE:
                self._held.append(bytes(self._tail))
                self._tail.clear()

    def __iter__(self) -> FrameParser:
        return self

    def __next__(self) -> Frame:
        while True:
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if avail < 9:
                if not self._held_len:  # else the held reads already know their need
                    self._need = 9
                raise StopIteration
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            ftype = buf[pos + 3]
            if length > self._max_frame_size:
                raise FrameSizeError(
                    f"frame of type {ftype} has length {length} > max frame size {self._max_frame_size}"
                )
            if avail < 9 + length:
                self._need = 9 + length
                raise StopIteration
            flags = buf[pos + 4]
            stream_id = _U32.unpack_from(buf, pos + 5)[0] & _STREAM_MASK
            start = pos + 9
            self._pos = start + length

            open_block = self._header_block_stream
            if open_block and (ftype != CONTINUATION or stream_id != open_block):
                raise ProtocolError(
                    f"expected CONTINUATION on stream {open_block}, got frame type {ftype} on stream {stream_id}"
                )
            parse = _PARSERS.get(ftype)
            if parse is None:
                continue  # unknown frame types are ignored (RFC 9113 §4.1)
            return parse(self, flags & DEFINED_FLAGS[ftype], stream_id, start, length)

    # Per-type parsers. Each gets flags already masked to the defined ones.

    def _data(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_stream(sid, "DATA")
        f = _make(DataFrame, flags, sid, length)
        end = start + length
        if flags & FLAG_PADDED:
            start, end, f.pad_length = self._padding(start, end, "DATA")
        else:
            f.pad_length = 0
        f.data = self._mv[start:end]
        f.padding = self._mv[end : self._pos]
        return f

    def _headers(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_stream(sid, "HEADERS")
        f = _make(HeadersFrame, flags, sid, length)
        end = start + length
        pad = 0
        if flags & FLAG_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED HEADERS frame too short for its pad length")
            pad = self._buf[start]
            start += 1
        if flags & FLAG_PRIORITY:
            if end - start < 5:
                raise FrameSizeError("HEADERS frame too short for its priority fields")
            f.depends_on, f.weight, f.exclusive = _priority(self._buf, start)
            start += 5
        else:
            f.depends_on, f.weight, f.exclusive = 0, DEFAULT_WEIGHT, False
        if pad > end - start:
            raise ProtocolError("HEADERS padding exceeds the payload")
        f.pad_length = pad
        f.data = self._mv[start : end - pad]
        f.padding = self._mv[end - pad : end]
        if not flags & FLAG_END_HEADERS:
            self._header_block_stream = sid
        return f

    def _priority(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_stream(sid, "PRIORITY")
        if length != 5:
            raise FrameSizeError(f"PRIORITY frame of length {length}", stream_id=sid)
        f = _make(PriorityFrame, flags, sid, length)
        f.depends_on, f.weight, f.exclusive = _priority(self._buf, start)
        if f.depends_on == sid:
            raise ProtocolError("stream depends on itself", stream_id=sid)
        return f

    def _rst_stream(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_stream(sid, "RST_STREAM")
        if length != 4:
            raise FrameSizeError(f"RST_STREAM frame of length {length}")
        f = _make(RstStreamFrame, flags, sid, length)
        f.error_code = _U32.unpack_from(self._buf, start)[0]
        return f

    def _settings(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_connection(sid, "SETTINGS")
        if flags & FLAG_ACK and length:
            raise FrameSizeError("SETTINGS ACK with a payload")
        if length % 6:
            raise FrameSizeError(f"SETTINGS frame of length {length}, not a multiple of 6")
        f = _make(SettingsFrame, flags, sid, length)
        settings = []
        for off in range(start, start + length, 6):
            ident, value = _SETTING.unpack_from(self._buf, off)
            _check_setting(ident, value)
            settings.append((ident, value))
        f.settings = settings
        return f

    def _push_promise(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_stream(sid, "PUSH_PROMISE")
        f = _make(PushPromiseFrame, flags, sid, length)
        end = start + length
        pad = 0
        if flags & FLAG_PADDED:
            if length < 1:
                raise FrameSizeError("PADDED PUSH_PROMISE frame too short for its pad length")
            pad = self._buf[start]
            start += 1
        if end - start < 4:
            raise FrameSizeError("PUSH_PROMISE frame too short for its promised stream id")
        promised = _U32.unpack_from(self._buf, start)[0] & _STREAM_MASK
        start += 4
        if promised == 0 or promised & 1:
            raise ProtocolError(f"PUSH_PROMISE promises invalid stream {promised}")
        if pad > end - start:
            raise ProtocolError("PUSH_PROMISE padding exceeds the payload")
        f.promised_stream_id = promised
        f.pad_length = pad
        f.data = self._mv[start : end - pad]
        f.padding = self._mv[end - pad : end]
        if not flags & FLAG_END_HEADERS:
            self._header_block_stream = sid
        return f

    def _ping(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_connection(sid, "PING")
        if length != 8:
            raise FrameSizeError(f"PING frame of length {length}")
        f = _make(PingFrame, flags, sid, length)
        f.opaque_data = self._buf[start : start + 8]
        return f

    def _goaway(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_connection(sid, "GOAWAY")
        if length < 8:
            raise FrameSizeError(f"GOAWAY frame of length {length}")
        f = _make(GoAwayFrame, flags, sid, length)
        last, f.error_code = _U32x2.unpack_from(self._buf, start)
        f.last_stream_id = last & _STREAM_MASK
        f.additional_data = self._mv[start + 8 : start + length]
        return f

    def _window_update(self, flags: int, sid: int, start: int, length: int) -> Frame:
        if length != 4:
            raise FrameSizeError(f"WINDOW_UPDATE frame of length {length}")
        f = _make(WindowUpdateFrame, flags, sid, length)
        f.increment = _U32.unpack_from(self._buf, start)[0] & _STREAM_MASK
        if f.increment == 0:
            raise ProtocolError("WINDOW_UPDATE with increment 0", stream_id=sid or None)
        return f

    def _continuation(self, flags: int, sid: int, start: int, length: int) -> Frame:
        _need_stream(sid, "CONTINUATION")
        if self._header_block_stream != sid:
            raise ProtocolError(f"CONTINUATION on stream {sid} outside a header block")
        f = _make(ContinuationFrame, flags, sid, length)
        f.data = self._mv[start : start + length]
        if flags & FLAG_END_HEADERS:
            self._header_block_stream = 0
        return f

    def _padding(self, start: int, end: int, name: str) -> tuple[int, int, int]:
        if end - start < 1:
            raise FrameSizeError(f"PADDED {name} frame too short for its pad length")
        pad = self._buf[start]
        if pad > end - start - 1:
            raise ProtocolError(f"{name} padding exceeds the payload")
        return start + 1, end - pad, pad


_PARSERS = {
    DATA: FrameParser._data,
    HEADERS: FrameParser._headers,
    PRIORITY: FrameParser._priority,
    RST_STREAM: FrameParser._rst_stream,
    SETTINGS: FrameParser._settings,
    PUSH_PROMISE: FrameParser._push_promise,
    PING: FrameParser._ping,
    GOAWAY: FrameParser._goaway,
    WINDOW_UPDATE: FrameParser._window_update,
    CONTINUATION: FrameParser._continuation,
}


def _make(cls: type[_F], flags: int, sid: int, length: int) -> _F:
    f = cls.__new__(cls)
    f.flags = flags
    f.stream_id = sid
    f.length = length
    return f


def _need_stream(sid: int, name: str) -> None:
    if sid == 0:
        raise ProtocolError(f"{name} frame on stream 0")


def _need_connection(sid: int, name: str) -> None:
    if sid != 0:
        raise ProtocolError(f"{name} frame on stream {sid}")


def _priority(buf: bytes, off: int) -> tuple[int, int, bool]:
    dep, weight = _PRIO.unpack_from(buf, off)
    return dep & _STREAM_MASK, weight + 1, bool(dep >> 31)


def _check_setting(ident: int, value: int) -> None:
    if ident == SETTINGS_ENABLE_PUSH and value > 1:
        raise ProtocolError(f"SETTINGS_ENABLE_PUSH = {value}")
    if ident == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW_SIZE:
        raise FlowControlError(f"SETTINGS_INITIAL_WINDOW_SIZE = {value}")
    if ident == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
        raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE = {value}")


# Serialization. Each ``write_*`` appends one frame to ``buf``. Invalid
# arguments are our own bugs, not the peer's, so they raise ValueError, and
# every argument is checked before the first byte is appended: a rejected
# call leaves ``buf`` untouched.

_U32_MAX = 0xFFFFFFFF


def write_frame_header(buf: bytearray, length: int, ftype: int, flags: int, stream_id: int) -> None:
    if not 0 <= length <= _MAX_LENGTH:
        raise ValueError(f"frame length {length} out of range")
    if not 0 <= stream_id <= _STREAM_MASK:
        raise ValueError(f"stream id {stream_id} out of range")
    if not 0 <= ftype <= 0xFF:
        raise ValueError(f"frame type {ftype} out of range")
    if not 0 <= flags <= 0xFF:
        raise ValueError(f"flags {flags} out of range")
    buf += _HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


def _u32_arg(value: int, name: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} {value} out of range [0, 2^32-1]")


def _stream_arg(stream_id: int, name: str) -> None:
    if not 0 < stream_id <= _STREAM_MASK:
        raise ValueError(f"{name} needs a stream id in [1, 2^31-1], got {stream_id}")


def _pad_arg(pad_length: int | None) -> int:
    if pad_length is None:
        return 0
    if not 0 <= pad_length <= 255:
        raise ValueError(f"pad length {pad_length} out of range")
    return pad_length + 1


def write_data(
    buf: bytearray,
    stream_id: int,
    data: bytes | bytearray | memoryview,
    end_stream: bool = False,
    pad_length: int | None = None,
) -> None:
    _stream_arg(stream_id, "DATA")
    extra = _pad_arg(pad_length)
    flags = (FLAG_END_STREAM if end_stream else 0) | (FLAG_PADDED if extra else 0)
    write_frame_header(buf, len(data) + extra, DATA, flags, stream_id)
    if extra:
        buf.append(pad_length)
    buf += data
    if extra:
        buf += bytes(pad_length)


def write_headers(
    buf: bytearray,
    stream_id: int,
    fragment: bytes | bytearray | memoryview,
    end_stream: bool = False,
    end_headers: bool = True,
    pad_length: int | None = None,
    priority: tuple[int, int, bool] | None = None,
) -> None:
    _stream_arg(stream_id, "HEADERS")
    extra = _pad_arg(pad_length)
    prio = _priority_fields(*priority) if priority is not None else b""
    flags = (
        (FLAG_END_STREAM if end_stream else 0)
        | (FLAG_END_HEADERS if end_headers else 0)
        | (FLAG_PADDED if extra else 0)
        | (FLAG_PRIORITY if priority is not None else 0)
    )
    write_frame_header(buf, len(fragment) + extra + len(prio), HEADERS, flags, stream_id)
    if extra:
        buf.append(pad_length)
    buf += prio
    buf += fragment
    if extra:
        buf += bytes(pad_length)


def _priority_fields(depends_on: int, weight: int, exclusive: bool) -> bytes:
    if not 0 <= depends_on <= _STREAM_MASK:
        raise ValueError(f"dependency {depends_on} out of range")
    if not 1 <= weight <= 256:
        raise ValueError(f"weight {weight} out of range [1, 256]")
    return _PRIO.pack(depends_on | (0x80000000 if exclusive else 0), weight - 1)


def write_priority(buf: bytearray, stream_id: int, depends_on: int, weight: int, exclusive: bool = False) -> None:
    _stream_arg(stream_id, "PRIORITY")
    prio = _priority_fields(depends_on, weight, exclusive)
    write_frame_header(buf, 5, PRIORITY, 0, stream_id)
    buf += prio


def write_rst_stream(buf: bytearray, stream_id: int, error_code: int) -> None:
    _stream_arg(stream_id, "RST_STREAM")
    _u32_arg(error_code, "error code")
    write_frame_header(buf, 4, RST_STREAM, 0, stream_id)
    buf += _U32.pack(error_code)


def write_settings(buf: bytearray, settings=(), ack: bool = False) -> None:
    settings = list(settings)
    if ack and settings:
        raise ValueError("a SETTINGS ACK carries no settings")
    for ident, value in settings:
        if not 0 <= ident <= 0xFFFF:
            raise ValueError(f"setting identifier {ident} out of range [0, 2^16-1]")
        _u32_arg(value, "setting value")
    write_frame_header(buf, 6 * len(settings), SETTINGS, FLAG_ACK if ack else 0, 0)
    for ident, value in settings:
        buf += _SETTING.pack(ident, value)


def write_push_promise(
    buf: bytearray,
    stream_id: int,
    promised_stream_id: int,
    fragment: bytes | bytearray | memoryview,
    end_headers: bool = True,
    pad_length: int | None = None,
) -> None:
    _stream_arg(stream_id, "PUSH_PROMISE")
    _stream_arg(promised_stream_id, "PUSH_PROMISE")
    extra = _pad_arg(pad_length)
    flags = (FLAG_END_HEADERS if end_headers else 0) | (FLAG_PADDED if extra else 0)
    write_frame_header(buf, len(fragment) + extra + 4, PUSH_PROMISE, flags, stream_id)
    if extra:
        buf.append(pad_length)
    buf += _U32.pack(promised_stream_id)
    buf += fragment
    if extra:
        buf += bytes(pad_length)


def write_ping(buf: bytearray, opaque_data: bytes, ack: bool = False) -> None:
    if len(opaque_data) != 8:
        raise ValueError("PING opaque data must be 8 bytes")
    write_frame_header(buf, 8, PING, FLAG_ACK if ack else 0, 0)
    buf += opaque_data


def write_goaway(
    buf: bytearray, last_stream_id: int, error_code: int, additional_data: bytes | bytearray | memoryview = b""
) -> None:
    if not 0 <= last_stream_id <= _STREAM_MASK:
        raise ValueError(f"last stream id {last_stream_id} out of range")
    _u32_arg(error_code, "error code")
    write_frame_header(buf, 8 + len(additional_data), GOAWAY, 0, 0)
    buf += _U32x2.pack(last_stream_id, error_code)
    buf += additional_data


def write_window_update(buf: bytearray, stream_id: int, increment: int) -> None:
    if not 0 < increment <= MAX_WINDOW_SIZE:
        raise ValueError(f"window increment {increment} out of range [1, 2^31-1]")
    write_frame_header(buf, 4, WINDOW_UPDATE, 0, stream_id)
    buf += _U32.pack(increment)


def write_continuation(
    buf: bytearray, stream_id: int, fragment: bytes | bytearray | memoryview, end_headers: bool = True
) -> None:
    _stream_arg(stream_id, "CONTINUATION")
    write_frame_header(buf, len(fragment), CONTINUATION, FLAG_END_HEADERS if end_headers else 0, stream_id)
    buf += fragment


def write_header_block(
    buf: bytearray,
    stream_id: int,
    block: bytes | bytearray | memoryview,
    end_stream: bool = False,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    priority: tuple[int, int, bool] | None = None,
) -> None:
    """Write a whole header block: one HEADERS frame, then as many
    CONTINUATION frames as ``max_frame_size`` (the peer's) requires."""
    if not DEFAULT_MAX_FRAME_SIZE <= max_frame_size <= MAX_MAX_FRAME_SIZE:
        raise ValueError(f"max_frame_size {max_frame_size} out of range")
    view = memoryview(block)
    first = max_frame_size - (5 if priority is not None else 0)
    total = len(view)
    write_headers(buf, stream_id, view[:first], end_stream, total <= first, None, priority)
    pos = first
    while pos < total:
        nxt = pos + max_frame_size
        write_continuation(buf, stream_id, view[pos:nxt], nxt >= total)
        pos = nxt
