"""Hand-built wire helpers shared by the codec tests: they bypass our own writers, so they can break every rule."""

from __future__ import annotations


def drain(parser) -> list:
    """The frames available now; fails (instead of hanging) if the parser returns frames without consuming."""
    limit = parser.buffered // 9  # every frame takes at least its 9-octet header
    out = []
    for f in parser:
        out.append(f)
        assert len(out) <= limit, "parser returns frames without consuming input"
    return out


def enc_int(value: int, prefix: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with ``first``'s high bits above a ``prefix``-bit prefix."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out, value = [first | mask], value - mask
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes([*out, value])
