"""HPACK unit tests: RFC 7541 examples, integer/string/Huffman edge cases, table rules, limits, encoder policy."""

from __future__ import annotations

import random
import tracemalloc

import hpack as ref_hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from meshproxy.codec.hpack_tables import NEVER_INDEXED_NAMES, STATIC_TABLE, UNINDEXED_NAMES
from meshproxy.errors import CompressionError, ErrorCode, H2Error, HeaderListTooLarge, ProtocolError
from tests.codec.wire import enc_int

pytestmark = pytest.mark.codec

REF_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
STATIC_NAME_INDEX = {}
for _i, (_name, _value) in enumerate(STATIC_TABLE, 1):
    STATIC_NAME_INDEX.setdefault(_name, _i)


# -- independent wire builders (RFC 7541 §5.1, §5.2, §6), raw strings only ----------------------------------


def raw_str(s: bytes) -> bytes:
    return enc_int(len(s), 7) + s


def huff_str(s: bytes) -> bytes:
    code = REF_HUFFMAN.encode(s)
    return enc_int(len(code), 7, 0x80) + code


def indexed(idx: int) -> bytes:
    return enc_int(idx, 7, 0x80)


def incremental(name: bytes | int, value: bytes) -> bytes:
    """Literal with incremental indexing (§6.2.1); an int name is a table index."""
    if isinstance(name, int):
        return enc_int(name, 6, 0x40) + raw_str(value)
    return b"\x40" + raw_str(name) + raw_str(value)


def without_indexing(name: bytes | int, value: bytes, first: int = 0x00) -> bytes:
    """Literal without indexing (§6.2.2), or never indexed (§6.2.3) with first=0x10."""
    if isinstance(name, int):
        return enc_int(name, 4, first) + raw_str(value)
    return bytes([first]) + raw_str(name) + raw_str(value)


def size_update(size: int) -> bytes:
    return enc_int(size, 5, 0x20)


def plain(headers) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in headers]


def entry_size(headers) -> int:
    return sum(len(n) + len(v) + 32 for n, v in headers)


def rejects(decoder, block: bytes) -> CompressionError:
    with pytest.raises(CompressionError) as info:
        decoder.decode(block)
    err = info.value
    assert err.error_code == ErrorCode.COMPRESSION_ERROR and err.is_connection_error
    return err


# -- integers (RFC 7541 §5.1, C.1) ---------------------------------------------------------------------


def test_rfc_c1_integer_examples(twin) -> None:
    hp = twin.hpack
    # C.1.1 / C.1.2: 10 and 1337 with a 5-bit prefix, i.e. as dynamic table size updates.
    assert enc_int(10, 5) == b"\x0a" and enc_int(1337, 5) == b"\x1f\x9a\x0a"
    dec = hp.Decoder(max_table_size=4096)
    assert dec.decode(b"\x2a") == [] and dec.table_size == 10
    assert dec.decode(b"\x3f\x9a\x0a") == [] and dec.table_size == 1337
    enc = hp.Encoder(max_table_size=4096)
    enc.header_table_size = 10
    assert enc.encode([]) == b"\x2a"
    enc.header_table_size = 1337
    assert enc.encode([]) == b"\x3f\x9a\x0a"
    # C.1.3 encodes 42 with an 8-bit prefix, which HPACK never uses; the nearest is a 7-bit string length.
    assert dec.decode(b"\x00\x01a\x2a" + b"v" * 42) == [(b"a", b"v" * 42)]


def _filled_decoder(hp, count: int):
    """A decoder whose dynamic table holds ``count`` entries n<i>: v (index 62 is the newest)."""
    dec = hp.Decoder()
    dec.decode(b"".join(incremental(b"n%d" % i, b"v") for i in range(count)))
    return dec


@pytest.mark.parametrize("idx", [1, 61, 62, 126, 127, 128, 129, 61 + 80])
def test_index_at_prefix_boundaries(twin, idx) -> None:
    """7-bit (indexed), 6-bit (incremental name), 4-bit (unindexed / never-indexed name) prefixes."""
    hp = twin.hpack
    count = 80
    dec = _filled_decoder(hp, count)
    name = STATIC_TABLE[idx - 1][0] if idx <= 61 else b"n%d" % (count - 1 - (idx - 62))
    value = STATIC_TABLE[idx - 1][1] if idx <= 61 else b"v"
    assert plain(dec.decode(indexed(idx))) == [(name, value)]
    assert plain(dec.decode(without_indexing(idx, b"x"))) == [(name, b"x")]
    assert plain(dec.decode(without_indexing(idx, b"y", 0x10))) == [(name, b"y")]
    # Last: adding an entry shifts the dynamic indices.
    assert plain(dec.decode(incremental(idx, b"z"))) == [(name, b"z")]
    assert plain(dec.decode(indexed(62))) == [(name, b"z")]


def test_prefix_boundary_encodings() -> None:
    # The builder itself, against RFC 7541 §5.1 by hand: 2^N-1 needs a zero continuation octet.
    assert enc_int(126, 7, 0x80) == b"\xfe"
    assert enc_int(127, 7, 0x80) == b"\xff\x00"
    assert enc_int(128, 7, 0x80) == b"\xff\x01"
    assert enc_int(63, 6, 0x40) == b"\x7f\x00"
    assert enc_int(15, 4, 0x10) == b"\x1f\x00"
    assert enc_int(31 + 128, 5, 0x20) == b"\x3f\x80\x01"


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 255, 16384])
def test_string_length_boundaries(twin, length) -> None:
    hp = twin.hpack
    value = bytes(random.Random(length).choices(b"abcdefghij", k=length))
    block = without_indexing(b"x-len", value)
    assert plain(hp.Decoder().decode(block)) == [(b"x-len", value)]
    enc = hp.Encoder()
    wire = enc.encode([(b"x-len", value)], huffman=False)
    assert plain(hp.Decoder().decode(wire)) == [(b"x-len", value)]


def test_integer_limits(twin) -> None:
    hp = twin.hpack
    top = 2**32 - 1
    dec = hp.Decoder(max_table_size=top)
    # Redundant zero continuation octets are legal up to our limit of five (RFC 7541 §5.1 allows limits).
    assert dec.decode(b"\x3f\x80\x80\x80\x80\x00") == [] and dec.table_size == 31
    assert dec.decode(size_update(top)) == [] and dec.table_size == top
    assert len(size_update(top)) == 6
    rejects(hp.Decoder(max_table_size=top), size_update(top + 1))  # value too large
    rejects(hp.Decoder(max_table_size=top), b"\x3f\x80\x80\x80\x80\x80\x00")  # six continuation octets
    rejects(hp.Decoder(), b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x0f")
    rejects(hp.Decoder(), indexed(2**32) + b"\x82")
    rejects(hp.Decoder(), b"\x00" + enc_int(2**40, 7) + b"abc")  # string length
    with pytest.raises(ValueError):
        dec.max_table_size = top + 1
    with pytest.raises(ValueError):
        hp.Encoder(max_table_size=-1)


@pytest.mark.parametrize(
    "block",
    [
        b"\xff",  # indexed, continuation missing
        b"\xff\x80",  # continuation bit set on the last octet
        b"\x7f",  # incremental literal, name index continuation missing
        b"\x3f\xe1",  # size update continuation missing
        b"\x0f\x80",
        b"\x40\x7f",  # string length continuation missing
    ],
    ids=bytes.hex,
)
def test_truncated_integer(twin, block) -> None:
    rejects(twin.hpack.Decoder(), block)


@pytest.mark.parametrize(
    "block",
    [
        b"\x40",  # name string missing
        b"\x41",  # value string missing
        b"\x00",
        b"\x01",
        b"\x10",
        b"\x1f\x08",  # never-indexed, static name 23, value missing
        b"\x40\x01a",  # literal name, value missing
        b"\x40\x05abc",  # name shorter than its length
        b"\x04\x05ab",  # value shorter than its length
        b"\x04\x85ab",  # same, Huffman
        b"\x82\x40\x01a\x02b",
    ],
    ids=bytes.hex,
)
def test_truncated_string(twin, block) -> None:
    rejects(twin.hpack.Decoder(), block)


# -- RFC 7541 Appendix C.2 - C.6 ---------------------------------------------------------------------------


def test_rfc_c2_literal_and_indexed_fields(twin) -> None:
    hp = twin.hpack
    # C.2.1 literal with indexing
    dec = hp.Decoder()
    block = bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")
    got = dec.decode(block)
    assert got == [(b"custom-key", b"custom-header")] and dec.table_bytes == 55
    assert dec.decode(b"\xbe") == [(b"custom-key", b"custom-header")]
    # C.2.2 literal without indexing
    dec = hp.Decoder()
    got = dec.decode(bytes.fromhex("040c2f73616d706c652f70617468"))
    assert got == [(b":path", b"/sample/path")] and dec.table_bytes == 0
    assert not isinstance(got[0], hp.NeverIndexed)
    # C.2.3 never indexed
    dec = hp.Decoder()
    got = dec.decode(bytes.fromhex("100870617373776f726406736563726574"))
    assert got == [(b"password", b"secret")] and dec.table_bytes == 0
    assert isinstance(got[0], hp.NeverIndexed)
    # C.2.4 indexed
    dec = hp.Decoder()
    assert dec.decode(b"\x82") == [(b":method", b"GET")] and dec.table_bytes == 0
    assert all(type(x) is bytes for x in dec.decode(b"\x82")[0])


REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
        (b"cache-control", b"no-cache"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ],
]
REQUEST_TABLE_BYTES = [57, 110, 164]
# After the third request: [62] custom-key, [63] cache-control, [64] :authority.
REQUEST_FINAL_TABLE = [
    (b"custom-key", b"custom-value"),
    (b"cache-control", b"no-cache"),
    (b":authority", b"www.example.com"),
]
C3_WIRE = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
C4_WIRE = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]


@pytest.mark.parametrize("huffman", [False, True], ids=["C.3", "C.4"])
def test_rfc_c3_c4_requests(twin, huffman) -> None:
    hp = twin.hpack
    wires = [bytes.fromhex(w) for w in (C4_WIRE if huffman else C3_WIRE)]
    dec = hp.Decoder()
    enc = hp.Encoder()
    for wire, headers, size in zip(wires, REQUESTS, REQUEST_TABLE_BYTES, strict=True):
        assert dec.decode(wire) == headers
        assert dec.table_bytes == size
        # Our encoding policy happens to match the RFC's choices for these requests, byte for byte.
        assert enc.encode(headers, huffman=huffman) == wire
    assert dec.decode(b"\xbe\xbf\xc0") == REQUEST_FINAL_TABLE
    rejects(dec, b"\xc1")


RESPONSES = [
    [
        (b":status", b"302"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        (b"location", b"https://www.example.com"),
    ],
    [
        (b":status", b"307"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        (b"location", b"https://www.example.com"),
    ],
    [
        (b":status", b"200"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
        (b"location", b"https://www.example.com"),
        (b"content-encoding", b"gzip"),
        (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
    ],
]
RESPONSE_TABLE_BYTES = [222, 222, 215]
# After the third response (the 256-octet table evicted everything older): three entries.
RESPONSE_FINAL_TABLE = [
    (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
    (b"content-encoding", b"gzip"),
    (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
]
C5_WIRE = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
    "6e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f"
    "3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076"
    "657273696f6e3d31",
]
C6_WIRE = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335df"
    "dfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


@pytest.mark.parametrize("huffman", [False, True], ids=["C.5", "C.6"])
def test_rfc_c5_c6_responses_with_eviction(twin, huffman) -> None:
    hp = twin.hpack
    wires = [bytes.fromhex(w) for w in (C6_WIRE if huffman else C5_WIRE)]
    # The examples assume a 256-octet table. In HTTP/2 that is our SETTINGS_HEADER_TABLE_SIZE, and the
    # peer must announce the smaller table with a size update before the first block.
    dec = hp.Decoder(max_table_size=256)
    rejects(hp.Decoder(max_table_size=256), wires[0])
    assert dec.decode(size_update(256)) == []
    for wire, headers, size in zip(wires, RESPONSES, RESPONSE_TABLE_BYTES, strict=True):
        assert dec.decode(wire) == headers
        assert dec.table_bytes == size
    assert dec.decode(b"\xbe\xbf\xc0") == RESPONSE_FINAL_TABLE
    rejects(dec, b"\xc1")  # the fourth entry was evicted


def test_responses_through_our_encoder(twin) -> None:
    hp = twin.hpack
    enc = hp.Encoder()
    enc.header_table_size = 256
    dec = hp.Decoder(max_table_size=256)
    ref = ref_hpack.Decoder()
    ref.max_allowed_table_size = 256
    for headers in RESPONSES * 3:
        wire = enc.encode(headers)
        assert plain(dec.decode(wire)) == headers
        assert plain(ref.decode(wire, raw=True)) == headers
        assert dec.table_bytes <= 256 and ref.header_table_size == 256


# -- Huffman (RFC 7541 §5.2, Appendix B) -----------------------------------------------------------------


def test_huffman_every_byte(twin) -> None:
    hp = twin.hpack
    for b in range(256):
        s = bytes([b])
        code = hp.huffman_encode(s)
        assert code == REF_HUFFMAN.encode(s), b
        assert hp.huffman_decode(code) == s, b
    everything = bytes(range(256)) * 2
    assert hp.huffman_encode(everything) == REF_HUFFMAN.encode(everything)
    assert hp.huffman_decode(hp.huffman_encode(everything)) == everything
    assert hp.huffman_encode(b"") == b"" and hp.huffman_decode(b"") == b""
    assert hp.huffman_encode(b"www.example.com") == bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")


def test_huffman_random_strings(twin) -> None:
    hp = twin.hpack
    rng = random.Random(7541)
    for i in range(300):
        alphabet = bytes(range(256)) if i % 3 == 0 else b"abcdefghijklmnopqrstuvwxyz0123456789-_./:;=, "
        s = bytes(rng.choices(alphabet, k=rng.randrange(0, 200)))
        code = hp.huffman_encode(s)
        assert code == REF_HUFFMAN.encode(s)
        assert hp.huffman_decode(code) == s
        assert hp.huffman_decode(bytearray(code)) == s
        assert hp.huffman_decode(memoryview(code)) == s


@pytest.mark.parametrize(
    "bits",
    [
        "1" * 30 + "11",  # EOS, then padding
        "00011" + "1" * 30 + "11111",  # EOS after a symbol ('a' is 00011)
        "1" * 8,  # padding of 8 bits
        "00011" + "1" * 11,  # padding longer than 7 bits after a symbol
        "00011" + "000",  # padding not all ones
        "00011" + "110",
        "00011" + "00011" + "111110",
        "1111111000" + "000000",  # '!' then zeros
    ],
)
def test_huffman_invalid(twin, bits) -> None:
    hp = twin.hpack
    assert len(bits) % 8 == 0
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    with pytest.raises(ref_hpack.HPACKDecodingError):  # the case itself is invalid
        decode_huffman(data)
    with pytest.raises(CompressionError):
        hp.huffman_decode(data)
    # The same string inside a block, as a value and as a name.
    with pytest.raises(CompressionError):
        hp.Decoder().decode(b"\x04" + enc_int(len(data), 7, 0x80) + data)
    with pytest.raises(CompressionError):
        hp.Decoder().decode(b"\x40" + enc_int(len(data), 7, 0x80) + data + b"\x00")


def test_huffman_valid_padding(twin) -> None:
    hp = twin.hpack
    assert hp.huffman_decode(bytes([0b00011_111])) == b"a"  # 'a' and three bits of padding
    assert hp.huffman_decode(int("00011" + "00011" + "111111", 2).to_bytes(2, "big")) == b"aa"
    assert hp.huffman_decode(b"\xfe\x3f") == b"!"  # 1111111000: '!' then six bits of padding
    # Eight 5-bit codes end exactly on an octet boundary: no padding at all.
    assert hp.huffman_encode(b"a" * 8) == int("00011" * 8, 2).to_bytes(5, "big")
    assert hp.huffman_decode(int("00011" * 8, 2).to_bytes(5, "big")) == b"a" * 8


# -- indices -------------------------------------------------------------------------------------------------


def test_index_zero_and_out_of_range(twin) -> None:
    hp = twin.hpack
    rejects(hp.Decoder(), b"\x80")  # index 0 (§6.1)
    rejects(hp.Decoder(), b"\x82\x80")
    assert hp.Decoder().decode(indexed(61)) == [(b"www-authenticate", b"")]
    rejects(hp.Decoder(), indexed(62))  # empty dynamic table
    rejects(hp.Decoder(), incremental(62, b"v"))
    rejects(hp.Decoder(), without_indexing(62, b"v"))
    rejects(hp.Decoder(), without_indexing(62, b"v", 0x10))
    dec = _filled_decoder(hp, 3)
    assert dec.decode(indexed(64)) == [(b"n0", b"v")]
    rejects(dec, indexed(65))
    rejects(hp.Decoder(), indexed(2**31))


# -- dynamic table size updates (RFC 7541 §4.2, §6.3) -----------------------------------------------------


def test_size_update_only_at_block_start(twin) -> None:
    hp = twin.hpack
    dec = hp.Decoder()
    assert dec.decode(size_update(0) + size_update(4096) + b"\x82") == [(b":method", b"GET")]
    assert dec.table_size == 4096
    assert dec.decode(size_update(100) + b"\x82") == [(b":method", b"GET")]  # allowed in any block
    assert dec.table_size == 100
    rejects(hp.Decoder(), b"\x82" + size_update(100))
    rejects(hp.Decoder(), b"\x82" + size_update(100) + b"\x82")
    rejects(hp.Decoder(), incremental(b"a", b"b") + size_update(100))
    rejects(hp.Decoder(), without_indexing(b"a", b"b", 0x10) + size_update(100))


def test_size_update_above_max(twin) -> None:
    hp = twin.hpack
    rejects(hp.Decoder(), size_update(4097))
    rejects(hp.Decoder(max_table_size=100), size_update(100) + size_update(101))
    dec = hp.Decoder(max_table_size=8192)
    assert dec.decode(size_update(8192)) == [] and dec.table_size == 8192


def test_size_update_evicts(twin) -> None:
    hp = twin.hpack
    dec = hp.Decoder()
    entries = [(b"k%d" % i, b"v" * 30) for i in range(10)]  # 64 octets each
    dec.decode(b"".join(incremental(n, v) for n, v in entries))
    assert dec.table_bytes == 640
    dec.decode(size_update(200))
    assert dec.table_bytes == 192  # the three newest survive
    assert plain(dec.decode(indexed(62) + indexed(64))) == [entries[9], entries[7]]
    rejects(dec, indexed(65))
    dec = hp.Decoder()
    dec.decode(b"".join(incremental(n, v) for n, v in entries))
    dec.decode(size_update(0) + size_update(4096))
    assert dec.table_bytes == 0
    rejects(dec, indexed(62))


def test_lowered_max_requires_update(twin) -> None:
    hp = twin.hpack

    def lowered():
        dec = hp.Decoder()
        dec.decode(incremental(b"k", b"v" * 100))
        dec.max_table_size = 100  # our smaller SETTINGS_HEADER_TABLE_SIZE was ACKed
        return dec

    rejects(lowered(), b"\x82")  # no update
    rejects(lowered(), b"")  # an empty block must carry the update too
    rejects(lowered(), size_update(101) + b"\x82")  # above the new max
    rejects(lowered(), b"\x82" + size_update(100))  # not at the start
    dec = lowered()
    assert dec.decode(size_update(100) + b"\x82") == [(b":method", b"GET")]
    assert dec.table_size == 100 and dec.table_bytes == 0  # the 133-octet entry did not fit
    assert dec.decode(b"\x82") == [(b":method", b"GET")]  # obligation met once
    dec = lowered()
    assert dec.decode(size_update(0) + size_update(50)) == [] and dec.table_size == 50
    # Raising the max, or lowering it to no less than the current table size, needs no update.
    dec.max_table_size = 4096
    assert dec.decode(b"\x82") == [(b":method", b"GET")]
    dec.max_table_size = 50
    assert dec.decode(b"\x82") == [(b":method", b"GET")]
    dec.max_table_size = 49
    rejects(dec, b"\x82")


def test_max_table_size_at_construction(twin) -> None:
    hp = twin.hpack
    dec = hp.Decoder(max_table_size=256)
    rejects(dec, b"\x82")
    dec = hp.Decoder(max_table_size=256)
    assert dec.decode(size_update(256) + b"\x82") == [(b":method", b"GET")]
    assert dec.max_table_size == 256 and dec.table_size == 256


def test_entry_larger_than_table_empties_it(twin) -> None:
    hp = twin.hpack
    dec = hp.Decoder(max_table_size=100)
    dec.decode(size_update(100) + incremental(b"a", b"b"))
    assert dec.table_bytes == 34
    got = dec.decode(incremental(b"big", b"x" * 100))
    assert got == [(b"big", b"x" * 100)] and dec.table_bytes == 0
    rejects(dec, indexed(62))
    # §4.4: a new entry may name the entry it evicts.
    dec = hp.Decoder(max_table_size=70)
    dec.decode(size_update(70) + incremental(b"name", b"v1"))
    assert dec.decode(incremental(62, b"v2")) == [(b"name", b"v2")]
    assert dec.table_bytes == 38 and dec.decode(indexed(62)) == [(b"name", b"v2")]


def test_decoder_accepts_buffers(twin) -> None:
    hp = twin.hpack
    wire = bytes.fromhex(C4_WIRE[0])
    for buf in (bytearray(wire), memoryview(wire), memoryview(b"xx" + wire)[2:]):
        assert hp.Decoder().decode(buf) == REQUESTS[0]


# -- header list size (RFC 9113 §6.5.2, §10.5.1) -----------------------------------------------------------


def test_header_list_size_limit_boundary(twin) -> None:
    hp = twin.hpack
    headers = [(b"x-a", b"1" * 10), (b"x-b", b"2" * 20)]
    block = b"".join(without_indexing(n, v) for n, v in headers)
    limit = entry_size(headers)
    assert plain(hp.Decoder(max_header_list_size=limit).decode(block)) == headers
    with pytest.raises(HeaderListTooLarge) as info:
        hp.Decoder(max_header_list_size=limit - 1).decode(block)
    err = info.value
    assert err.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert isinstance(err, ProtocolError) and isinstance(err, H2Error)
    assert not isinstance(err, CompressionError)
    dec = hp.Decoder()
    dec.max_header_list_size = limit - 1
    with pytest.raises(HeaderListTooLarge):
        dec.decode(block)


def test_header_list_overflow_keeps_table_in_sync(twin) -> None:
    hp = twin.hpack
    a, b, c, d = (b"x-a", b"a" * 40), (b"x-b", b"b" * 100), (b"x-c", b"c" * 30), (b"x-d", b"d" * 10)
    e = (b"x-e", b"e" * 5)
    block = (
        incremental(*a)  # fits
        + incremental(*b)  # overflows the limit here
        + without_indexing(*d)  # skipped: touches no table
        + indexed(63)  # a, past the limit
        + incremental(*c)  # added after the overflow point: must still reach the table
        + without_indexing(*d, 0x10)
        + incremental(62, e[1])  # name of c (newest) with a new value
    )
    limit = 200
    assert entry_size([a]) <= limit < entry_size([a, b])
    dec = hp.Decoder(max_header_list_size=limit)
    with pytest.raises(HeaderListTooLarge):
        dec.decode(block)
    assert dec.table_bytes == entry_size([a, b, c, (c[0], e[1])])
    # The next block references entries added after the overflow point.
    got = [plain(dec.decode(indexed(i))) for i in (62, 63, 64, 65)]
    assert got == [[(c[0], e[1])], [c], [b], [a]]
    rejects(dec, indexed(66))
    # Same table as an unlimited decoder that saw the whole block.
    ref = hp.Decoder(max_header_list_size=2**20)
    assert plain(ref.decode(block)) == [a, b, d, a, c, d, (c[0], e[1])]
    assert ref.table_bytes == dec.table_bytes


def test_header_list_overflow_still_checks_structure(twin) -> None:
    hp = twin.hpack
    big = incremental(b"x-big", b"b" * 300)
    # Errors after the overflow point are still connection errors: the table state may be lost.
    for tail in (indexed(0), indexed(70), size_update(10), without_indexing(70, b"v"), b"\x00\x05ab", b"\x7f"):
        rejects(hp.Decoder(max_header_list_size=100), big + tail)


def test_header_bomb(twin) -> None:
    hp = twin.hpack
    dec = hp.Decoder()  # default 64 KiB list limit, 4 KiB table
    value = b"x" * 4000
    dec.decode(incremental(b"bomb", value))
    refs = 20_000
    block = b"\xbe" * refs  # one octet each, 4036 octets each expanded: ~80 MB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(HeaderListTooLarge):
            dec.decode(block)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    expanded = refs * (4 + len(value))
    assert peak < 1_000_000, peak
    assert peak * 50 < expanded
    # The connection lives on: the table is intact.
    assert plain(dec.decode(b"\xbe")) == [(b"bomb", value)]


# -- never-indexed fields (RFC 7541 §6.2.3, §7.1.3) --------------------------------------------------------


def test_never_indexed_type(twin) -> None:
    hp = twin.hpack
    h = hp.NeverIndexed(b"a", b"b")
    assert isinstance(h, tuple) and h == (b"a", b"b") and tuple(h) == (b"a", b"b")
    assert h[0] == b"a" and h[1] == b"b" and len(h) == 2
    assert "NeverIndexed" in repr(h)


def test_never_indexed_round_trip(twin) -> None:
    hp = twin.hpack
    enc, dec = hp.Encoder(), hp.Decoder()
    sent = [hp.NeverIndexed(b"x-secret", b"hunter2"), (b"x-other", b"v")]
    wire = enc.encode(sent, huffman=False)
    assert wire.startswith(b"\x10\x08x-secret\x07hunter2")
    got = dec.decode(wire)
    assert plain(got) == plain(sent)
    assert isinstance(got[0], hp.NeverIndexed) and not isinstance(got[1], hp.NeverIndexed)
    assert dec.table_bytes == entry_size([sent[1]])
    # A proxy forwards what it decoded: the field stays never-indexed on the next hop.
    enc2 = hp.Encoder()
    again = enc2.encode(got, huffman=False)
    assert again == wire
    assert enc.encode(sent, huffman=False)[: len(b"\x10\x08x-secret\x07hunter2")] == b"\x10\x08x-secret\x07hunter2"
    ref = ref_hpack.Decoder().decode(wire, raw=True)
    assert isinstance(ref[0], ref_hpack.NeverIndexedHeaderTuple) and not ref[0].indexable


@pytest.mark.parametrize("name", sorted(NEVER_INDEXED_NAMES))
def test_sensitive_names_never_indexed(twin, name) -> None:
    hp = twin.hpack
    assert name in STATIC_NAME_INDEX
    enc, dec = hp.Encoder(), hp.Decoder()
    value = b"secret-token-123"
    expected = enc_int(STATIC_NAME_INDEX[name], 4, 0x10) + raw_str(value)
    for _ in range(2):  # never added to the table: the second block is the same
        wire = enc.encode([(name, value)], huffman=False)
        assert wire == expected
        got = dec.decode(wire)
        assert got == [(name, value)] and isinstance(got[0], hp.NeverIndexed)
        assert dec.table_bytes == 0
    # Even when (name, value) is in the static table, e.g. an empty cookie, it stays a literal.
    assert enc.encode([(name, b"")], huffman=False) == enc_int(STATIC_NAME_INDEX[name], 4, 0x10) + b"\x00"


def test_never_indexed_literal_name_and_value_in_table(twin) -> None:
    hp = twin.hpack
    enc = hp.Encoder()
    first = enc.encode([(b"x-tok", b"abc")], huffman=False)
    assert first == incremental(b"x-tok", b"abc")
    assert enc.encode([(b"x-tok", b"abc")]) == indexed(62)
    # Marked never-indexed: no indexed reference to the identical entry, but the name may be referenced.
    assert enc.encode([hp.NeverIndexed(b"x-tok", b"abc")], huffman=False) == without_indexing(62, b"abc", 0x10)
    assert enc.encode([hp.NeverIndexed(b":method", b"GET")], huffman=False) == without_indexing(2, b"GET", 0x10)


# -- encoder policy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNINDEXED_NAMES))
def test_unindexed_names(twin, name) -> None:
    hp = twin.hpack
    enc, dec = hp.Encoder(), hp.Decoder()
    value = b"value-123"
    idx = STATIC_NAME_INDEX.get(name, 0)
    expected = without_indexing(idx if idx else name, value)
    for _ in range(2):
        wire = enc.encode([(name, value)], huffman=False)
        assert wire == expected
        assert wire[0] & 0xF0 == 0x00
        got = dec.decode(wire)
        assert got == [(name, value)] and not isinstance(got[0], hp.NeverIndexed)
        assert dec.table_bytes == 0


def test_indexed_on_second_encode(twin) -> None:
    hp = twin.hpack
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"svc.ns.svc.cluster.local:8080"),
        (b":path", b"/pkg.Service/Method"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"user-agent", b"grpc-python/1.60"),
        (b"x-custom", b"abc"),
        (b"grpc-timeout", b"100m"),
    ]
    enc, dec, ref = hp.Encoder(), hp.Decoder(), ref_hpack.Decoder()
    first = enc.encode(headers)
    assert plain(dec.decode(first)) == headers and plain(ref.decode(first, raw=True)) == headers
    # :authority, content-type, te, user-agent, x-custom were added (5 entries).
    assert dec.table_bytes == entry_size([headers[i] for i in (2, 4, 5, 6, 7)])
    second = enc.encode(headers)
    assert plain(dec.decode(second)) == headers and plain(ref.decode(second, raw=True)) == headers
    indexable = [h for h in headers if h[0] not in UNINDEXED_NAMES]
    # Every indexable field is now one octet (x-custom is the newest entry, :authority the oldest);
    # :path and grpc-timeout are literals without indexing again.
    assert enc.encode(headers, huffman=False) == (
        b"\x83\x87"  # static :method POST, :scheme https
        + indexed(66)
        + without_indexing(4, b"/pkg.Service/Method")
        + indexed(65)
        + indexed(64)
        + indexed(63)
        + indexed(62)
        + without_indexing(b"grpc-timeout", b"100m")
    )
    assert len(second) < len(first)
    only_indexable = enc.encode(indexable)
    assert len(only_indexable) == len(indexable) and all(b & 0x80 for b in only_indexable)
    assert plain(dec.decode(only_indexable)) == indexable


def test_large_entries_not_indexed(twin) -> None:
    hp = twin.hpack
    enc, dec = hp.Encoder(), hp.Decoder()
    name = b"x-big"
    fits = b"f" * (3072 - 32 - len(name))  # exactly 3/4 of 4096: indexed
    too_big = b"t" * (3073 - 32 - len(name))  # one octet more: literal without indexing
    wires = [enc.encode([(name, fits)], huffman=False)]
    assert wires[0] == incremental(name, fits)
    wires.append(enc.encode([(name, fits)]))
    assert wires[1] == indexed(62)
    wires.append(enc.encode([(name, too_big)], huffman=False))
    assert wires[2] == without_indexing(62, too_big)  # the name is still referenced
    wires.append(enc.encode([(name, too_big)], huffman=False))
    assert wires[3] == wires[2]
    assert [plain(dec.decode(w)) for w in wires] == [[(name, v)] for v in (fits, fits, too_big, too_big)]
    assert dec.table_bytes == 3072
    # Against a 256-octet peer table the threshold is 192.
    enc = hp.Encoder()
    enc.header_table_size = 256
    dec = hp.Decoder(max_table_size=256)
    ok, big = (b"x-k", b"v" * (192 - 32 - 3)), (b"x-k", b"w" * (193 - 32 - 3))
    wires = [enc.encode([ok], huffman=False), enc.encode([big], huffman=False), enc.encode([ok])]
    assert wires == [size_update(256) + incremental(*ok), without_indexing(62, big[1]), indexed(62)]
    assert [plain(dec.decode(w)) for w in wires] == [[ok], [big], [ok]]
    assert dec.table_bytes == 192


def test_static_matches(twin) -> None:
    hp = twin.hpack
    enc = hp.Encoder()
    headers = [(b":method", b"GET"), (b":path", b"/"), (b":status", b"200"), (b"accept-encoding", b"gzip, deflate")]
    assert enc.encode(headers) == b"\x82\x84\x88\x90"
    assert enc.encode([(b":path", b"/index.html")]) == b"\x85"  # :path is unindexed, but a static match wins


def test_encoder_size_updates(twin) -> None:
    hp = twin.hpack
    enc = hp.Encoder()
    ours = hp.Decoder()
    ref = ref_hpack.Decoder()
    msg = [(b"x-a", b"1"), (b"x-b", b"2")]

    def send(peer_max: int) -> bytes:
        ours.max_table_size = peer_max
        ref.max_allowed_table_size = peer_max
        wire = enc.encode(msg)
        assert plain(ours.decode(wire)) == msg
        assert plain(ref.decode(wire, raw=True)) == msg
        assert ours.table_size == ref.header_table_size == enc.table_size
        return wire

    assert send(4096)[0] == 0x40  # no change: no update
    enc.header_table_size = 4096
    assert send(4096)[0] & 0x80  # same value again: no update
    enc.header_table_size = 256
    assert send(256).startswith(size_update(256))
    assert send(256)[0] & 0x80
    enc.header_table_size = 10
    enc.header_table_size = 4096
    enc.header_table_size = 2000
    # Lowered then raised before a block: the minimum, then the final size (§4.2).
    wire = send(2000)
    assert wire.startswith(size_update(10) + size_update(2000))
    assert wire[len(size_update(10) + size_update(2000))] == 0x40  # the table was emptied: literals again
    enc.header_table_size = 0
    wire = send(0)
    assert wire.startswith(size_update(0) + b"\x00")
    assert ours.table_bytes == 0
    enc.header_table_size = 4096
    assert send(4096).startswith(size_update(4096) + b"\x40")


def test_encoder_caps_peer_table_size(twin) -> None:
    hp = twin.hpack
    enc = hp.Encoder(max_table_size=1024)
    assert enc.table_size == 1024
    ref = ref_hpack.Decoder()
    wire = enc.encode([(b"x-a", b"1")])
    assert wire.startswith(size_update(1024) + b"\x40")  # announce our smaller table in the first block
    assert plain(ref.decode(wire, raw=True)) == [(b"x-a", b"1")] and ref.header_table_size == 1024
    enc.header_table_size = 65536
    ref.max_allowed_table_size = 65536
    assert enc.header_table_size == 65536 and enc.table_size == 1024
    wire = enc.encode([(b"x-a", b"1")])
    assert wire == indexed(62)  # capped: nothing changed, no update
    assert plain(ref.decode(wire, raw=True)) == [(b"x-a", b"1")]
    enc.header_table_size = 512
    enc.header_table_size = 8192
    wire = enc.encode([(b"x-a", b"1")])
    assert wire.startswith(size_update(512) + size_update(1024))
    assert plain(ref.decode(wire, raw=True)) == [(b"x-a", b"1")] and ref.header_table_size == 1024
    dec = hp.Decoder(max_table_size=8192)
    enc = hp.Encoder(max_table_size=8192)
    enc.header_table_size = 8192
    wire = enc.encode([(b"x-a", b"1")])
    assert wire.startswith(size_update(8192)) and enc.table_size == 8192
    assert plain(dec.decode(wire)) == [(b"x-a", b"1")] and dec.table_size == 8192
    enc0 = hp.Encoder(max_table_size=0)
    wire = enc0.encode([(b"x-a", b"1"), (b"x-a", b"1")], huffman=False)
    assert wire == size_update(0) + without_indexing(b"x-a", b"1") * 2


def test_huffman_flag(twin) -> None:
    hp = twin.hpack
    headers = [(b"x-custom", b"hello world")]
    assert hp.Encoder().encode(headers, huffman=False) == b"\x40\x08x-custom\x0bhello world"
    name_code, value_code = REF_HUFFMAN.encode(b"x-custom"), REF_HUFFMAN.encode(b"hello world")
    expected = b"\x40" + enc_int(len(name_code), 7, 0x80) + name_code + enc_int(len(value_code), 7, 0x80) + value_code
    assert hp.Encoder().encode(headers) == expected
    assert hp.Encoder().encode(headers, huffman=True) == expected
    # Huffman only when it is shorter: bytes with long codes are sent raw.
    odd = (b"x-bin", b"\x00\x01\x02\xff")
    assert hp.Encoder().encode([odd]) == b"\x40" + huff_str(b"x-bin") + raw_str(odd[1])
    # '&' has an 8-bit code: no shorter as Huffman, so sent raw.
    assert len(REF_HUFFMAN.encode(b"&&")) == 2
    assert hp.Encoder().encode([(b"x-bin", b"&&")]) == b"\x40" + huff_str(b"x-bin") + raw_str(b"&&")


def test_str_input(twin) -> None:
    hp = twin.hpack
    text = [(":authority", "example.com"), ("x-name", "héllo wörld ☃")]
    utf8 = [(n.encode(), v.encode()) for n, v in text]
    assert hp.Encoder().encode(text) == hp.Encoder().encode(utf8)
    assert hp.Encoder().encode(text, huffman=False) == hp.Encoder().encode(utf8, huffman=False)
    got = hp.Decoder().decode(hp.Encoder().encode(text))
    assert got == utf8 and all(type(x) is bytes for h in got for x in h)
    mixed = [("x-a", b"1"), (b"x-b", "2")]
    assert hp.Decoder().decode(hp.Encoder().encode(mixed)) == [(b"x-a", b"1"), (b"x-b", b"2")]


def test_encode_into(twin) -> None:
    hp = twin.hpack
    headers = REQUESTS[2]
    expected = hp.Encoder().encode(headers)
    buf = bytearray(b"frame-header")
    n = hp.Encoder().encode_into(buf, headers)
    assert n == len(expected) and buf == b"frame-header" + expected
    enc = hp.Encoder()
    buf = bytearray()
    n1 = enc.encode_into(buf, headers, False)
    n2 = enc.encode_into(buf, headers, huffman=False)
    assert buf[:n1] == hp.Encoder().encode(headers, huffman=False)
    assert n1 + n2 == len(buf) and n2 < n1  # the second block indexes what the first added
    dec = hp.Decoder()
    assert dec.decode(buf[:n1]) == headers and dec.decode(buf[n1:]) == headers
    assert hp.Encoder().encode_into(bytearray(), []) == 0


def test_encoder_eviction_consistency(twin) -> None:
    hp = twin.hpack
    rng = random.Random(1)
    enc, dec, ref = hp.Encoder(), hp.Decoder(max_table_size=512), ref_hpack.Decoder()
    enc.header_table_size = 512
    ref.max_allowed_table_size = 512
    pool = [(b"x-h%d" % i, b"v" * rng.randrange(1, 120)) for i in range(40)]
    for _ in range(150):
        headers = rng.choices(pool, k=rng.randrange(1, 8))
        wire = enc.encode(headers)
        assert plain(dec.decode(wire)) == headers
        assert plain(ref.decode(wire, raw=True)) == headers
        assert dec.table_bytes <= 512
