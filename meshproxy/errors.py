"""The one exception tree of meshproxy's HTTP/2 core, with RFC 9113 error codes.

Every error a peer can cause carries the code to send back (``error_code``)
and its scope: ``stream_id is None`` means a connection error (answer with
GOAWAY and close), otherwise a stream error (answer with RST_STREAM on that
stream; the connection and its other streams live on).
"""

from __future__ import annotations

import enum

__all__ = [
    "CompressionError",
    "EnhanceYourCalm",
    "ErrorCode",
    "FlowControlError",
    "FrameSizeError",
    "H2Error",
    "HeaderListTooLarge",
    "ProtocolError",
    "StreamClosedError",
]


class ErrorCode(enum.IntEnum):
    """RFC 9113 §7 error codes."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class H2Error(Exception):
    """Root of the tree. ``error_code`` is what goes on the wire."""

    error_code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, stream_id: int | None = None) -> None:
        super().__init__(message)
        self.stream_id = stream_id

    @property
    def is_connection_error(self) -> bool:
        return self.stream_id is None

    def __repr__(self) -> str:
        scope = "connection" if self.stream_id is None else f"stream {self.stream_id}"
        return f"{type(self).__name__}({self.args[0]!r}, {self.error_code.name}, {scope})"


class ProtocolError(H2Error):
    """The peer broke a rule of RFC 9113."""

    error_code = ErrorCode.PROTOCOL_ERROR


class FrameSizeError(ProtocolError):
    """A frame too long for the negotiated maximum, or the wrong length for its type."""

    error_code = ErrorCode.FRAME_SIZE_ERROR


class FlowControlError(ProtocolError):
    """A window would exceed 2^31-1, or a peer sent beyond a window."""

    error_code = ErrorCode.FLOW_CONTROL_ERROR


class CompressionError(ProtocolError):
    """An HPACK block could not be decoded: the shared table state is lost,
    so this is always a connection error."""

    error_code = ErrorCode.COMPRESSION_ERROR


class HeaderListTooLarge(ProtocolError):
    """A decoded header list exceeds our SETTINGS_MAX_HEADER_LIST_SIZE.

    The HPACK decoder raises it only after the whole block was processed, so
    the dynamic table is still in sync with the peer's: the connection can
    reset just that stream (or answer 431) and carry on. The decoder does not
    know the stream; the connection sets ``stream_id`` before acting on it.
    """

    error_code = ErrorCode.ENHANCE_YOUR_CALM


class StreamClosedError(ProtocolError):
    """A frame on a stream that was already closed (RFC 9113 §5.1)."""

    error_code = ErrorCode.STREAM_CLOSED


class EnhanceYourCalm(ProtocolError):
    """The peer is costing us too much: a CONTINUATION flood, a header block
    past any sane size. Always a connection error."""

    error_code = ErrorCode.ENHANCE_YOUR_CALM
