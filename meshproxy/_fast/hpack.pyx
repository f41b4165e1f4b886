# cython: language_level=3
"""RFC 7541 HPACK, compiled twin of ``meshproxy/codec/hpack_py.py``.

Owns header compression for one direction of one connection: ``Decoder``
and ``Encoder`` with the same names, behaviour and errors as the pure-Python
twin (the tests run on both). The constant tables come from
``meshproxy.codec.hpack_tables`` and are copied into C arrays at import.

Decoding allocates only what it returns: indexed fields reuse the tuple
stored in the static or dynamic table, and Huffman strings are decoded into a
scratch buffer owned by the decoder before becoming one bytes object.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from collections import deque

from meshproxy.codec.hpack_py import NeverIndexed
from meshproxy.codec.hpack_tables import (
    HUFFMAN_ACCEPT, HUFFMAN_CODES, HUFFMAN_EMIT, HUFFMAN_FAIL, NEVER_INDEXED_NAMES, STATIC_TABLE,
    UNINDEXED_NAMES, build_huffman_decode_table,
)
from meshproxy.errors import CompressionError, HeaderListTooLarge

__all__ = [
    "DEFAULT_MAX_HEADER_LIST_SIZE", "DEFAULT_TABLE_SIZE", "Decoder", "Encoder", "NeverIndexed",
    "huffman_decode", "huffman_encode",
]

DEFAULT_TABLE_SIZE = 4096
DEFAULT_MAX_HEADER_LIST_SIZE = 65536
MAX_INTEGER = 2**32 - 1

cdef enum:
    ENTRY_OVERHEAD = 32
    STATIC_LEN = 61
    C_DEFAULT_TABLE_SIZE = 4096

cdef uint64_t C_MAX_INTEGER = 0xFFFFFFFF

# Huffman tables (see hpack_tables.build_huffman_decode_table for the layout).
cdef uint32_t _HDEC[4096]
cdef uint32_t _HCODE[257]
cdef uint8_t _HLEN[257]
cdef uint32_t H_EMIT = HUFFMAN_EMIT
cdef uint32_t H_ACCEPT = HUFFMAN_ACCEPT
cdef uint32_t H_FAIL = HUFFMAN_FAIL

for _i, _e in enumerate(build_huffman_decode_table()):
    _HDEC[_i] = _e
for _i, (_code, _n) in enumerate(HUFFMAN_CODES):
    _HCODE[_i] = _code
    _HLEN[_i] = _n

cdef list _STATIC = [None] + [tuple(_e) for _e in STATIC_TABLE]
cdef dict _STATIC_FULL = {}
cdef dict _STATIC_NAME = {}
for _i, _e in enumerate(STATIC_TABLE, 1):
    _STATIC_FULL.setdefault(_e, _i)
    _STATIC_NAME.setdefault(_e[0], _i)

cdef dict _STATIC_PAIRS = {k: -v for k, v in _STATIC_FULL.items()}
cdef dict _STATIC_NAMES = {k: -v for k, v in _STATIC_NAME.items()}

# One lookup per field decides the encoder's policy for its name.
cdef enum:
    P_INDEX = 0
    P_NEVER = 1
    P_UNINDEXED = 2
cdef dict _POLICY = {}
for _name in UNINDEXED_NAMES:
    _POLICY[_name] = P_UNINDEXED
for _name in NEVER_INDEXED_NAMES:
    _POLICY[_name] = P_NEVER


# ---------------------------------------------------------------- primitives

cdef inline Py_ssize_t _read_int(const uint8_t* data, Py_ssize_t* pos, Py_ssize_t end, int prefix) except -1:
    cdef uint32_t mask = (1 << prefix) - 1
    cdef uint64_t value = data[pos[0]] & mask
    cdef uint8_t b
    cdef int shift = 0
    pos[0] += 1
    if value < mask:
        return <Py_ssize_t>value
    while True:
        if pos[0] >= end:
            raise CompressionError("truncated integer")
        b = data[pos[0]]
        pos[0] += 1
        value += <uint64_t>(b & 0x7F) << shift
        if value > C_MAX_INTEGER:
            raise CompressionError("integer too large")
        if not b & 0x80:
            return <Py_ssize_t>value
        shift += 7
        if shift > 28:
            raise CompressionError("integer encoding too long")


cdef inline Py_ssize_t _huffman_decode(const uint8_t* src, Py_ssize_t n, uint8_t* dst) except -1:
    cdef uint32_t state = 0
    cdef uint32_t e = H_ACCEPT
    cdef Py_ssize_t i, o = 0
    cdef uint8_t b
    for i in range(n):
        b = src[i]
        e = _HDEC[(state << 4) | (b >> 4)]
        if e & H_FAIL:
            raise CompressionError("invalid Huffman code (EOS or unknown code)")
        if e & H_EMIT:
            dst[o] = <uint8_t>(e >> 8)
            o += 1
        state = e & 0xFF
        e = _HDEC[(state << 4) | (b & 0xF)]
        if e & H_FAIL:
            raise CompressionError("invalid Huffman code (EOS or unknown code)")
        if e & H_EMIT:
            dst[o] = <uint8_t>(e >> 8)
            o += 1
        state = e & 0xFF
    if not e & H_ACCEPT:
        raise CompressionError("invalid Huffman padding")
    return o


cdef inline Py_ssize_t _huffman_length(const uint8_t* s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i, bits = 0
    for i in range(n):
        bits += _HLEN[s[i]]
    return (bits + 7) >> 3


cdef inline Py_ssize_t _huffman_encode(const uint8_t* s, Py_ssize_t n, uint8_t* out) noexcept:
    # Only the low (bits + 8) bits of acc matter, so bits shifted out the top
    # are harmless: a code is at most 30 bits and fewer than 8 are pending.
    cdef uint64_t acc = 0
    cdef int bits = 0
    cdef Py_ssize_t i, o = 0
    cdef uint8_t c
    for i in range(n):
        c = s[i]
        acc = (acc << _HLEN[c]) | _HCODE[c]
        bits += _HLEN[c]
        while bits >= 8:
            bits -= 8
            out[o] = <uint8_t>(acc >> bits)
            o += 1
    if bits:
        out[o] = <uint8_t>((acc << (8 - bits)) | ((1 << (8 - bits)) - 1))
        o += 1
    return o


cdef inline Py_ssize_t _entry_size(tuple header) noexcept:
    return PyBytes_GET_SIZE(<bytes>header[0]) + PyBytes_GET_SIZE(<bytes>header[1]) + ENTRY_OVERHEAD


cdef inline bytes _as_bytes(object s):
    if type(s) is bytes:
        return <bytes>s
    if isinstance(s, str):
        return (<str>s).encode("utf-8")
    return bytes(s)


def huffman_decode(data):
    cdef Py_buffer view
    cdef uint8_t* dst = NULL
    cdef Py_ssize_t n
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        dst = <uint8_t*>PyMem_Realloc(NULL, view.len * 8 // 5 + 1)
        if dst == NULL:
            raise MemoryError()
        n = _huffman_decode(<const uint8_t*>view.buf, view.len, dst)
        return PyBytes_FromStringAndSize(<char*>dst, n)
    finally:
        PyMem_Free(dst)
        PyBuffer_Release(&view)


def huffman_encode(data):
    cdef bytes s = _as_bytes(data)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _huffman_length(p, n))
    _huffman_encode(p, n, <uint8_t*>PyBytes_AS_STRING(out))
    return out


# ------------------------------------------------------------------- decoder

cdef class Decoder:
    """Decodes header blocks from one peer.

    ``max_table_size`` is our SETTINGS_HEADER_TABLE_SIZE (once the peer has
    ACKed it): a size update above it is an error, and lowering it below the
    table's current size obliges the next block to begin with a size update.
    ``max_header_list_size`` bounds each decoded list (RFC 9113 §6.5.2 sizes).
    """

    def __cinit__(self):
        self._scratch = NULL
        self._scratch_cap = 0

    def __init__(self, max_table_size=DEFAULT_TABLE_SIZE, max_header_list_size=DEFAULT_MAX_HEADER_LIST_SIZE):
        self._ring = [None] * 64
        self._mask = 63
        self._head = 0
        self._count = 0
        self._table_bytes = 0
        self._table_size = C_DEFAULT_TABLE_SIZE
        self._must_update = False
        self._max_table_size = C_DEFAULT_TABLE_SIZE
        self.max_table_size = max_table_size
        self.max_header_list_size = max_header_list_size

    def __dealloc__(self):
        PyMem_Free(self._scratch)

    @property
    def max_table_size(self):
        return self._max_table_size

    @max_table_size.setter
    def max_table_size(self, value):
        if not 0 <= value <= MAX_INTEGER:
            raise ValueError(f"table size {value} out of range")
        self._max_table_size = value
        if value < self._table_size:
            self._must_update = True

    @property
    def table_size(self):
        """The dynamic table's current maximum size, as set by the peer."""
        return self._table_size

    @property
    def table_bytes(self):
        """Bytes the dynamic table holds now (RFC 7541 entry sizes)."""
        return self._table_bytes

    def decode(self, block):
        cdef Py_buffer view
        PyObject_GetBuffer(block, &view, PyBUF_SIMPLE)
        try:
            return self._decode(<const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef list _decode(self, const uint8_t* data, Py_ssize_t end):
        cdef list headers = []
        cdef Py_ssize_t pos = 0, idx, size, list_size = 0
        cdef Py_ssize_t limit = self.max_header_list_size
        cdef bint overflow = False, seen_field = False
        cdef uint8_t b
        cdef object header  # a tuple, or a NeverIndexed (tuple subclass)
        cdef bytes name, value
        while pos < end:
            b = data[pos]
            if b & 0x80:
                idx = _read_int(data, &pos, end, 7)
                header = self._lookup(idx)
            elif b & 0x40:
                idx = _read_int(data, &pos, end, 6)
                name = <bytes>self._lookup(idx)[0] if idx else self._string(data, &pos, end)
                value = self._string(data, &pos, end)
                header = (name, value)
                self._add(<tuple>header)
            elif b & 0x20:
                if seen_field:
                    raise CompressionError("dynamic table size update after a header field")
                size = _read_int(data, &pos, end, 5)
                if size > self._max_table_size:
                    raise CompressionError(
                        f"table size update to {size} above our maximum {self._max_table_size}")
                self._table_size = size
                self._must_update = False
                self._evict(size)
                continue
            else:
                idx = _read_int(data, &pos, end, 4)
                if overflow:
                    # Past the limit, literals that do not touch the table are
                    # skipped undecoded: nothing is allocated for them.
                    if not idx:
                        _skip_string(data, &pos, end)
                    elif idx > STATIC_LEN + self._count:
                        raise CompressionError(f"header index {idx} out of range")
                    _skip_string(data, &pos, end)
                    seen_field = True
                    continue
                name = <bytes>self._lookup(idx)[0] if idx else self._string(data, &pos, end)
                value = self._string(data, &pos, end)
                header = NeverIndexed(name, value) if b & 0x10 else (name, value)
            if self._must_update:
                raise CompressionError("expected a dynamic table size update at the start of the block")
            seen_field = True
            if not overflow:
                list_size += _entry_size(<tuple>header)
                if list_size > limit:
                    overflow = True
                else:
                    headers.append(header)
        if self._must_update:
            raise CompressionError("expected a dynamic table size update at the start of the block")
        if overflow:
            raise HeaderListTooLarge(f"header list larger than {limit} bytes")
        return headers

    cdef tuple _lookup(self, Py_ssize_t idx):
        if 0 < idx <= STATIC_LEN:
            return <tuple>_STATIC[idx]
        idx -= STATIC_LEN + 1
        if idx < 0 or idx >= self._count:
            raise CompressionError(f"header index {idx + STATIC_LEN + 1} out of range")
        return <tuple>self._ring[(self._head - idx) & self._mask]

    cdef bytes _string(self, const uint8_t* data, Py_ssize_t* pos, Py_ssize_t end):
        if pos[0] >= end:
            raise CompressionError("truncated string literal")
        cdef bint huffman = data[pos[0]] & 0x80
        cdef Py_ssize_t length = _read_int(data, pos, end, 7)
        cdef Py_ssize_t start = pos[0], need, n
        if length > end - start:
            raise CompressionError("string literal runs past the end of the block")
        pos[0] = start + length
        if not huffman:
            return PyBytes_FromStringAndSize(<const char*>data + start, length)
        need = length * 8 // 5 + 1
        if need > self._scratch_cap:
            self._scratch = <uint8_t*>PyMem_Realloc(self._scratch, need)
            if self._scratch == NULL:
                self._scratch_cap = 0
                raise MemoryError()
            self._scratch_cap = need
        n = _huffman_decode(data + start, length, self._scratch)
        return PyBytes_FromStringAndSize(<const char*>self._scratch, n)

    cdef int _add(self, tuple header) except -1:
        cdef Py_ssize_t size = _entry_size(header)
        cdef Py_ssize_t i
        cdef list ring
        if size > self._table_size:
            # An entry larger than the table empties it (RFC 7541 §4.4).
            return self._evict(0)
        self._evict(self._table_size - size)
        if self._count > self._mask:
            # Full ring: double it, oldest entry first in the new one.
            ring = [None] * (2 * (self._mask + 1))
            for i in range(self._count):
                ring[self._count - 1 - i] = self._ring[(self._head - i) & self._mask]
            self._ring = ring
            self._mask = len(ring) - 1
            self._head = self._count - 1
        self._head = (self._head + 1) & self._mask
        self._ring[self._head] = header
        self._count += 1
        self._table_bytes += size
        return 0

    cdef int _evict(self, Py_ssize_t target) except -1:
        cdef Py_ssize_t slot
        while self._table_bytes > target:
            slot = (self._head - self._count + 1) & self._mask
            self._table_bytes -= _entry_size(<tuple>self._ring[slot])
            self._ring[slot] = None
            self._count -= 1
        return 0


cdef inline int _skip_string(const uint8_t* data, Py_ssize_t* pos, Py_ssize_t end) except -1:
    if pos[0] >= end:
        raise CompressionError("truncated string literal")
    cdef Py_ssize_t length = _read_int(data, pos, end, 7)
    if length > end - pos[0]:
        raise CompressionError("string literal runs past the end of the block")
    pos[0] += length
    return 0


# ------------------------------------------------------------------- encoder

cdef inline Py_ssize_t _write_int(uint8_t* out, Py_ssize_t value, int prefix, uint8_t first) noexcept:
    cdef Py_ssize_t mask = (1 << prefix) - 1
    cdef Py_ssize_t o = 1
    if value < mask:
        out[0] = first | <uint8_t>value
        return 1
    out[0] = first | <uint8_t>mask
    value -= mask
    while value >= 0x80:
        out[o] = <uint8_t>((value & 0x7F) | 0x80)
        value >>= 7
        o += 1
    out[o] = <uint8_t>value
    return o + 1


cdef inline Py_ssize_t _write_string(uint8_t* out, bytes s, bint huffman) noexcept:
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef Py_ssize_t hlen, o
    if huffman and n:
        hlen = _huffman_length(p, n)
        if hlen < n:
            o = _write_int(out, hlen, 7, 0x80)
            return o + _huffman_encode(p, n, out + o)
    o = _write_int(out, n, 7, 0x00)
    memcpy(out + o, p, n)
    return o + n


cdef class Encoder:
    """Encodes header lists for one peer.

    ``max_table_size`` caps the dynamic table we are willing to keep;
    ``header_table_size`` is the peer's SETTINGS_HEADER_TABLE_SIZE, set once
    our SETTINGS ACK for it is sent. The table used is the smaller of the two,
    and each change is announced at the start of the next block.
    """

    def __cinit__(self):
        self._out = NULL
        self._out_cap = 0
        self._out_len = 0

    def __init__(self, max_table_size=DEFAULT_TABLE_SIZE):
        if not 0 <= max_table_size <= MAX_INTEGER:
            raise ValueError(f"table size {max_table_size} out of range")
        self._max_table_size = max_table_size
        self._header_table_size = C_DEFAULT_TABLE_SIZE
        self._table_size = C_DEFAULT_TABLE_SIZE  # what the peer's decoder believes
        self._pending_min = -1  # smallest size since the last block, -1: none
        self._entries = deque()
        self._table_bytes = 0
        self._inserted = 0  # ids are insertion counts, so eviction needs no reindexing
        # Static entries are stored as -index beside the dynamic ids, so one
        # lookup per field covers both tables.
        self._by_pair = _STATIC_PAIRS.copy()
        self._by_name = _STATIC_NAMES.copy()
        self._resize(min(max_table_size, C_DEFAULT_TABLE_SIZE))

    def __dealloc__(self):
        PyMem_Free(self._out)

    @property
    def header_table_size(self):
        return self._header_table_size

    @header_table_size.setter
    def header_table_size(self, value):
        if not 0 <= value <= MAX_INTEGER:
            raise ValueError(f"table size {value} out of range")
        self._header_table_size = value
        self._resize(min(value, self._max_table_size))

    @property
    def table_size(self):
        return self._table_size

    cdef int _resize(self, Py_ssize_t size) except -1:
        if size == self._table_size and self._pending_min < 0:
            return 0
        self._pending_min = size if self._pending_min < 0 else min(self._pending_min, size)
        self._table_size = size
        return self._evict(size)

    def encode(self, headers, bint huffman=True):
        self._encode(headers, huffman)
        return PyBytes_FromStringAndSize(<const char*>self._out, self._out_len)

    def encode_into(self, bytearray buf, headers, bint huffman=True):
        """Append the block for ``headers`` to ``buf``; return its length."""
        self._encode(headers, huffman)
        cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
        PyByteArray_Resize(buf, old + self._out_len)
        memcpy(PyByteArray_AS_STRING(buf) + old, self._out, self._out_len)
        return self._out_len

    cdef int _reserve(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self._out_len + n
        cdef Py_ssize_t cap
        cdef uint8_t* p
        if need <= self._out_cap:
            return 0
        cap = max(need, 2 * self._out_cap, 256)
        p = <uint8_t*>PyMem_Realloc(self._out, cap)
        if p == NULL:
            raise MemoryError()
        self._out = p
        self._out_cap = cap
        return 0

    cdef int _encode(self, object headers, bint huffman) except -1:
        cdef object header, key, found, policy_obj
        cdef bytes name, value
        cdef Py_ssize_t idx, name_idx
        cdef int policy
        self._out_len = 0
        if self._pending_min >= 0:
            self._reserve(12)
            if self._pending_min < self._table_size:
                self._out_len += _write_int(self._out + self._out_len, self._pending_min, 5, 0x20)
            self._out_len += _write_int(self._out + self._out_len, self._table_size, 5, 0x20)
            self._pending_min = -1
        for header in headers:
            if type(header) is tuple and len(<tuple>header) == 2 \
                    and type((<tuple>header)[0]) is bytes and type((<tuple>header)[1]) is bytes:
                name = <bytes>(<tuple>header)[0]
                value = <bytes>(<tuple>header)[1]
                key = header
            else:
                name = _as_bytes(header[0])
                value = _as_bytes(header[1])
                key = (name, value)
            policy_obj = _POLICY.get(name)
            policy = P_INDEX if policy_obj is None else <int>policy_obj
            if type(header) is not tuple and isinstance(header, NeverIndexed):
                policy = P_NEVER
            # Worst case: two 6-byte integers and both strings raw.
            self._reserve(12 + 2 * 6 + PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value))
            if policy != P_NEVER:
                found = self._by_pair.get(key)
                if found is not None:
                    self._out_len += _write_int(self._out + self._out_len, self._index(found), 7, 0x80)
                    continue
            found = self._by_name.get(name)
            name_idx = 0 if found is None else self._index(found)
            if policy == P_NEVER:
                self._out_len += _write_int(self._out + self._out_len, name_idx, 4, 0x10)
            elif policy == P_UNINDEXED or (PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + ENTRY_OVERHEAD
                                           > self._table_size * 3 // 4):
                self._out_len += _write_int(self._out + self._out_len, name_idx, 4, 0x00)
            else:
                self._out_len += _write_int(self._out + self._out_len, name_idx, 6, 0x40)
                self._add(name, value)
            if not name_idx:
                self._out_len += _write_string(self._out + self._out_len, name, huffman)
            self._out_len += _write_string(self._out + self._out_len, value, huffman)
        return 0

    cdef int _add(self, bytes name, bytes value) except -1:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + ENTRY_OVERHEAD
        self._evict(self._table_size - size)
        self._inserted += 1
        self._entries.appendleft((name, value, self._inserted))
        self._table_bytes += size
        self._by_pair[(name, value)] = self._inserted
        if <object>self._by_name.get(name, 0) >= 0:  # a static name index is kept: it never moves
            self._by_name[name] = self._inserted
        return 0

    cdef inline Py_ssize_t _index(self, object found):
        """The HPACK index of a table lookup result (-static index or dynamic id)."""
        cdef Py_ssize_t v = found
        return -v if v < 0 else STATIC_LEN + 1 + self._inserted - v

    cdef int _evict(self, Py_ssize_t target) except -1:
        cdef bytes name, value
        cdef object ident
        while self._table_bytes > target:
            name, value, ident = self._entries.pop()
            self._table_bytes -= PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + ENTRY_OVERHEAD
            key = (name, value)
            if self._by_pair.get(key) == ident:
                del self._by_pair[key]
            if self._by_name.get(name) == ident:
                del self._by_name[name]
        return 0
