"""The few gRPC and protobuf wire-format pieces meshproxy writes and reads by hand.

The sidecar speaks gRPC to the control plane and to health-checked
endpoints over its own HTTP/2 connection, without grpcio (it would cost
~9 MB of idle RSS): this module owns gRPC's length-prefixed message framing
(``grpc_frame``, ``MessageReader``) and protobuf varints, the one
encoding the hand-written messages need (the control plane uses them too,
to splice a serialized config into a response without re-encoding it).
"""

from __future__ import annotations

__all__ = ["MAX_MESSAGE", "FramingError", "MessageReader", "grpc_frame", "read_varint", "varint"]

#: A message bigger than this is refused: a corrupt length prefix must not make us buffer gigabytes.
MAX_MESSAGE = 64 << 20


class FramingError(ValueError):
    """A gRPC message we cannot read (compressed, or over ``MAX_MESSAGE``); one line."""


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: not compressed, 4-byte big-endian length, the bytes."""
    return b"\0" + len(message).to_bytes(4, "big") + message


class MessageReader:
    """Reassembles gRPC length-prefixed messages from DATA payloads of any size: a message may
    span many frames, and a frame may hold several messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data``; FramingError for one we cannot read."""
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= 5:
            if buf[0] != 0:
                # We send no grpc-accept-encoding, so a compressed message is the peer's error.
                raise FramingError("a compressed message (none was asked for)")
            n = int.from_bytes(buf[1:5], "big")
            if n > MAX_MESSAGE:
                raise FramingError(f"a message of {n} bytes is over the limit of {MAX_MESSAGE}")
            if len(buf) < 5 + n:
                break
            out.append(bytes(buf[5 : 5 + n]))
            del buf[: 5 + n]
        return out


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at ``buf[i:]`` and the index after it; ValueError if it is cut or over 64 bits."""
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
