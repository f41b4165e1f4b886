"""RFC 7541 HPACK, pure-Python twin of ``meshproxy/_fast/hpack.pyx``.

Owns header compression for one direction of one connection: the
``Decoder`` (static and dynamic tables, table size updates only at the start
of a block and never above what we advertised, table-driven Huffman,
integer and string limits, the header-list size limit enforced while
decoding) and the ``Encoder`` (indexing policy, Huffman when shorter, size
updates after the peer changes SETTINGS_HEADER_TABLE_SIZE).

Headers are ``(name, value)`` tuples of bytes. A field that must never be
indexed, by any hop, is a ``NeverIndexed`` tuple: the decoder returns one for
each never-indexed literal, and the encoder keeps it never-indexed.
"""

from __future__ import annotations

from collections import deque

from meshproxy.codec.hpack_tables import (
    HUFFMAN_ACCEPT,
    HUFFMAN_CODES,
    HUFFMAN_EMIT,
    HUFFMAN_FAIL,
    NEVER_INDEXED_NAMES,
    STATIC_TABLE,
    UNINDEXED_NAMES,
    build_huffman_decode_table,
)
from meshproxy.errors import CompressionError, HeaderListTooLarge

__all__ = [
    "DEFAULT_MAX_HEADER_LIST_SIZE",
    "DEFAULT_TABLE_SIZE",
    "Decoder",
    "Encoder",
    "NeverIndexed",
    "huffman_decode",
    "huffman_encode",
]

DEFAULT_TABLE_SIZE = 4096
DEFAULT_MAX_HEADER_LIST_SIZE = 65536
#: Integers above this are refused: no HPACK quantity legitimately needs more.
MAX_INTEGER = 2**32 - 1
ENTRY_OVERHEAD = 32
_STATIC_LEN = len(STATIC_TABLE)

_DECODE_TABLE = build_huffman_decode_table()
_STATIC_ENTRIES = [None] + [tuple(e) for e in STATIC_TABLE]
_STATIC_FULL: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, _e in enumerate(STATIC_TABLE, 1):
    _STATIC_FULL.setdefault(_e, _i)
    _STATIC_NAME.setdefault(_e[0], _i)


class NeverIndexed(tuple):
    """A ``(name, value)`` header that no hop may add to a compression table."""

    __slots__ = ()

    def __new__(cls, name: bytes, value: bytes) -> NeverIndexed:
        return tuple.__new__(cls, (name, value))

    def __repr__(self) -> str:
        return f"NeverIndexed({self[0]!r}, {self[1]!r})"


def huffman_decode(data: bytes | bytearray | memoryview) -> bytes:
    table = _DECODE_TABLE
    out = bytearray()
    state = 0
    accept = True
    for byte in bytes(data):
        for nibble in (byte >> 4, byte & 0xF):
            entry = table[(state << 4) | nibble]
            if entry & HUFFMAN_FAIL:
                raise CompressionError("invalid Huffman code (EOS or unknown code)")
            if entry & HUFFMAN_EMIT:
                out.append((entry >> 8) & 0xFF)
            state = entry & 0xFF
            accept = entry & HUFFMAN_ACCEPT
    if not accept:
        raise CompressionError("invalid Huffman padding")
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    acc = 0
    nbits = 0
    for byte in data:
        code, n = HUFFMAN_CODES[byte]
        acc = (acc << n) | code
        nbits += n
    pad = -nbits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((nbits + pad) // 8, "big")


def _huffman_length(data: bytes) -> int:
    return (sum(HUFFMAN_CODES[b][1] for b in data) + 7) // 8


def _entry_size(name: bytes, value: bytes) -> int:
    return len(name) + len(value) + ENTRY_OVERHEAD


def _as_bytes(s) -> bytes:
    if type(s) is bytes:
        return s
    if isinstance(s, str):
        return s.encode("utf-8")
    return bytes(s)


class Decoder:
    """Decodes header blocks from one peer.

    ``max_table_size`` is our SETTINGS_HEADER_TABLE_SIZE (once the peer has
    ACKed it): a size update above it is an error, and lowering it below the
    table's current size obliges the next block to begin with a size update.
    ``max_header_list_size`` bounds each decoded list (RFC 9113 §6.5.2 sizes).
    """

    __slots__ = (
        "_entries",
        "_max_table_size",
        "_must_update",
        "_table_bytes",
        "_table_size",
        "max_header_list_size",
    )

    def __init__(
        self,
        max_table_size: int = DEFAULT_TABLE_SIZE,
        max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE,
    ) -> None:
        self._entries: deque[tuple[bytes, bytes]] = deque()  # newest first
        self._table_bytes = 0
        self._table_size = DEFAULT_TABLE_SIZE
        self._must_update = False
        self._max_table_size = DEFAULT_TABLE_SIZE
        self.max_table_size = max_table_size
        self.max_header_list_size = max_header_list_size

    @property
    def max_table_size(self) -> int:
        return self._max_table_size

    @max_table_size.setter
    def max_table_size(self, value: int) -> None:
        if not 0 <= value <= MAX_INTEGER:
            raise ValueError(f"table size {value} out of range")
        self._max_table_size = value
        if value < self._table_size:
            self._must_update = True

    @property
    def table_size(self) -> int:
        """The dynamic table's current maximum size, as set by the peer."""
        return self._table_size

    @property
    def table_bytes(self) -> int:
        """Bytes the dynamic table holds now (RFC 7541 entry sizes)."""
        return self._table_bytes

    def decode(self, block: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
        data = bytes(block)
        end = len(data)
        pos = 0
        headers: list[tuple[bytes, bytes]] = []
        list_size = 0
        limit = self.max_header_list_size
        overflow = False
        seen_field = False
        while pos < end:
            b = data[pos]
            if b & 0x80:
                idx, pos = _decode_int(data, pos, 7)
                header = self._lookup(idx)
            elif b & 0x40:
                idx, pos = _decode_int(data, pos, 6)
                name, pos = (self._lookup(idx)[0], pos) if idx else _decode_str(data, pos)
                value, pos = _decode_str(data, pos)
                header = (name, value)
                self._add(header)
            elif b & 0x20:
                if seen_field:
                    raise CompressionError("dynamic table size update after a header field")
                size, pos = _decode_int(data, pos, 5)
                if size > self._max_table_size:
                    raise CompressionError(f"table size update to {size} above our maximum {self._max_table_size}")
                self._table_size = size
                self._must_update = False
                self._evict(size)
                continue
            else:
                idx, pos = _decode_int(data, pos, 4)
                if overflow:
                    # Past the limit, literals that do not touch the table are
                    # skipped undecoded: nothing is allocated for them.
                    if not idx:
                        pos = _skip_str(data, pos)
                    elif idx > _STATIC_LEN + len(self._entries):
                        raise CompressionError(f"header index {idx} out of range")
                    pos = _skip_str(data, pos)
                    seen_field = True
                    continue
                name, pos = (self._lookup(idx)[0], pos) if idx else _decode_str(data, pos)
                value, pos = _decode_str(data, pos)
                header = NeverIndexed(name, value) if b & 0x10 else (name, value)
            if self._must_update:
                raise CompressionError("expected a dynamic table size update at the start of the block")
            seen_field = True
            if not overflow:
                list_size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
                if list_size > limit:
                    overflow = True
                else:
                    headers.append(header)
        if self._must_update:
            raise CompressionError("expected a dynamic table size update at the start of the block")
        if overflow:
            raise HeaderListTooLarge(f"header list larger than {limit} bytes")
        return headers

    def _lookup(self, idx: int) -> tuple[bytes, bytes]:
        if 0 < idx <= _STATIC_LEN:
            return _STATIC_ENTRIES[idx]
        didx = idx - _STATIC_LEN - 1
        if idx == 0 or didx >= len(self._entries):
            raise CompressionError(f"header index {idx} out of range")
        return self._entries[didx]

    def _add(self, header: tuple[bytes, bytes]) -> None:
        size = _entry_size(*header)
        if size > self._table_size:
            # An entry larger than the table empties it (RFC 7541 §4.4).
            self._entries.clear()
            self._table_bytes = 0
            return
        self._evict(self._table_size - size)
        self._entries.appendleft(header)
        self._table_bytes += size

    def _evict(self, target: int) -> None:
        while self._table_bytes > target:
            self._table_bytes -= _entry_size(*self._entries.pop())


def _decode_int(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise CompressionError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if value > MAX_INTEGER:
            raise CompressionError("integer too large")
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise CompressionError("integer encoding too long")


def _decode_str(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise CompressionError("truncated string literal")
    huffman = data[pos] & 0x80
    length, pos = _decode_int(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise CompressionError("string literal runs past the end of the block")
    raw = data[pos:end]
    return (huffman_decode(raw) if huffman else raw), end


def _skip_str(data: bytes, pos: int) -> int:
    if pos >= len(data):
        raise CompressionError("truncated string literal")
    length, pos = _decode_int(data, pos, 7)
    if pos + length > len(data):
        raise CompressionError("string literal runs past the end of the block")
    return pos + length


class Encoder:
    """Encodes header lists for one peer.

    ``max_table_size`` caps the dynamic table we are willing to keep;
    ``header_table_size`` is the peer's SETTINGS_HEADER_TABLE_SIZE, set once
    our SETTINGS ACK for it is sent. The table used is the smaller of the two,
    and each change is announced at the start of the next block.
    """

    __slots__ = (
        "_by_name",
        "_by_pair",
        "_entries",
        "_header_table_size",
        "_inserted",
        "_max_table_size",
        "_pending_min",
        "_table_bytes",
        "_table_size",
    )

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if not 0 <= max_table_size <= MAX_INTEGER:
            raise ValueError(f"table size {max_table_size} out of range")
        self._max_table_size = max_table_size
        self._header_table_size = DEFAULT_TABLE_SIZE
        self._table_size = DEFAULT_TABLE_SIZE  # what the peer's decoder believes
        self._pending_min = -1  # smallest size since the last block, -1: none
        self._entries: deque[tuple[bytes, bytes, int]] = deque()  # (name, value, id), newest first
        self._table_bytes = 0
        self._inserted = 0  # ids are insertion counts, so eviction needs no reindexing
        self._by_pair: dict[tuple[bytes, bytes], int] = {}
        self._by_name: dict[bytes, int] = {}
        self._resize(min(max_table_size, DEFAULT_TABLE_SIZE))

    @property
    def header_table_size(self) -> int:
        return self._header_table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if not 0 <= value <= MAX_INTEGER:
            raise ValueError(f"table size {value} out of range")
        self._header_table_size = value
        self._resize(min(value, self._max_table_size))

    @property
    def table_size(self) -> int:
        return self._table_size

    def _resize(self, size: int) -> None:
        if size == self._table_size and self._pending_min < 0:
            return
        self._pending_min = size if self._pending_min < 0 else min(self._pending_min, size)
        self._table_size = size
        self._evict(size)

    def encode(self, headers, huffman: bool = True) -> bytes:
        buf = bytearray()
        self.encode_into(buf, headers, huffman)
        return bytes(buf)

    def encode_into(self, buf: bytearray, headers, huffman: bool = True) -> int:
        """Append the block for ``headers`` to ``buf``; return its length."""
        start = len(buf)
        if self._pending_min >= 0:
            if self._pending_min < self._table_size:
                _encode_int(buf, self._pending_min, 5, 0x20)
            _encode_int(buf, self._table_size, 5, 0x20)
            self._pending_min = -1
        for header in headers:
            name = _as_bytes(header[0])
            value = _as_bytes(header[1])
            never = isinstance(header, NeverIndexed) or name in NEVER_INDEXED_NAMES
            if not never:
                idx = _STATIC_FULL.get((name, value))
                if idx is None:
                    ident = self._by_pair.get((name, value))
                    if ident is not None:
                        idx = _STATIC_LEN + 1 + self._inserted - ident
                if idx is not None:
                    _encode_int(buf, idx, 7, 0x80)
                    continue
            name_idx = _STATIC_NAME.get(name)
            if name_idx is None:
                ident = self._by_name.get(name)
                name_idx = 0 if ident is None else _STATIC_LEN + 1 + self._inserted - ident
            if never:
                _encode_int(buf, name_idx, 4, 0x10)
            elif name in UNINDEXED_NAMES or _entry_size(name, value) > self._table_size * 3 // 4:
                _encode_int(buf, name_idx, 4, 0x00)
            else:
                _encode_int(buf, name_idx, 6, 0x40)
                self._add(name, value)
            if not name_idx:
                _encode_str(buf, name, huffman)
            _encode_str(buf, value, huffman)
        return len(buf) - start

    def _add(self, name: bytes, value: bytes) -> None:
        size = _entry_size(name, value)
        self._evict(self._table_size - size)
        self._inserted += 1
        ident = self._inserted
        self._entries.appendleft((name, value, ident))
        self._table_bytes += size
        self._by_pair[(name, value)] = ident
        self._by_name[name] = ident

    def _evict(self, target: int) -> None:
        while self._table_bytes > target:
            name, value, ident = self._entries.pop()
            self._table_bytes -= _entry_size(name, value)
            if self._by_pair.get((name, value)) == ident:
                del self._by_pair[(name, value)]
            if self._by_name.get(name) == ident:
                del self._by_name[name]


def _encode_int(buf: bytearray, value: int, prefix: int, first: int) -> None:
    mask = (1 << prefix) - 1
    if value < mask:
        buf.append(first | value)
        return
    buf.append(first | mask)
    value -= mask
    while value >= 0x80:
        buf.append((value & 0x7F) | 0x80)
        value >>= 7
    buf.append(value)


def _encode_str(buf: bytearray, s: bytes, huffman: bool) -> None:
    if huffman and s:
        hlen = _huffman_length(s)
        if hlen < len(s):
            _encode_int(buf, hlen, 7, 0x80)
            buf += huffman_encode(s)
            return
    _encode_int(buf, len(s), 7, 0x00)
    buf += s
