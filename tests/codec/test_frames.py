"""Unit tests of the HTTP/2 frame codec (parser rules, writers, chunking, zero-copy) on both twins."""

from __future__ import annotations

import itertools
import random
import struct

import pytest

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
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    WINDOW_UPDATE,
)
from meshproxy.errors import ErrorCode, FlowControlError, FrameSizeError, H2Error, ProtocolError
from tests.codec.wire import drain

pytestmark = pytest.mark.codec

MAX_SID = 2**31 - 1
PADS = [None, 0, 1, 7, 255]
PRIORITIES = [None, (0, 1, False), (5, DEFAULT_WEIGHT, True), (MAX_SID, 256, False), (3, 129, True)]
TYPE_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}


# Helpers -------------------------------------------------------------------------------------------


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame built by hand, bypassing our writers (so it can break every rule)."""
    n = len(payload) if length is None else length
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def parse_all(frames, data: bytes, **kw) -> list:
    parser = frames.FrameParser(**kw)
    parser.feed(data)
    out = drain(parser)
    assert parser.buffered == 0
    return out


def parse_one(frames, data: bytes, **kw):
    got = parse_all(frames, data, **kw)
    assert len(got) == 1, got
    return got[0]


def write(fn, *args, **kw) -> bytes:
    buf = bytearray()
    fn(buf, *args, **kw)
    return bytes(buf)


def reserialize(frame) -> bytes:
    buf = bytearray()
    frame.serialize_into(buf)
    return bytes(buf)


def describe(frame) -> tuple:
    """Everything observable about a parsed frame, with memoryviews turned into bytes."""
    fields = []
    for name in (
        "data",
        "pad_length",
        "padding",
        "depends_on",
        "weight",
        "exclusive",
        "error_code",
        "settings",
        "promised_stream_id",
        "opaque_data",
        "last_stream_id",
        "additional_data",
        "increment",
    ):
        if hasattr(frame, name):
            value = getattr(frame, name)
            if isinstance(value, memoryview | bytearray):
                value = bytes(value)
            elif isinstance(value, list):
                value = tuple(tuple(x) for x in value)
            fields.append((name, value))
    return (type(frame).__name__, frame.type, frame.flags, frame.stream_id, frame.length, tuple(fields))


def sample_stream(frames) -> bytes:
    """A connection's worth of frames of every type (and an unknown one) to chunk in different ways."""
    b = bytearray()
    frames.write_settings(b, [(SETTINGS_HEADER_TABLE_SIZE, 0), (SETTINGS_MAX_CONCURRENT_STREAMS, 100)])
    frames.write_settings(b, ack=True)
    frames.write_headers(b, 1, b"\x82\x86\x84", end_headers=False, pad_length=3, priority=(0, 200, True))
    frames.write_continuation(b, 1, b"\x41\x0fwww.example.com", end_headers=False)
    frames.write_continuation(b, 1, b"", end_headers=True)
    frames.write_data(b, 1, b"hello" * 50, pad_length=17)
    frames.write_data(b, 1, b"", end_stream=True)
    b += raw_frame(0xBB, 0xFF, 7, b"unknown extension frame")
    frames.write_priority(b, 3, 1, 42, True)
    frames.write_rst_stream(b, 3, ErrorCode.CANCEL)
    frames.write_push_promise(b, 1, 2, b"\x82" * 40, end_headers=True, pad_length=0)
    frames.write_ping(b, b"12345678")
    frames.write_ping(b, b"87654321", ack=True)
    frames.write_window_update(b, 0, 65535)
    frames.write_window_update(b, 1, 1)
    frames.write_data(b, 5, bytes(range(256)) * 60)
    frames.write_goaway(b, 5, ErrorCode.NO_ERROR, b"bye")
    return bytes(b)


# Round trips: every writer, every flag combination -------------------------------------------------


@pytest.mark.parametrize("end_stream", [False, True])
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 3])
def test_data_round_trip(twin, end_stream, pad, payload) -> None:
    wire = write(twin.frames.write_data, 7, payload, end_stream, pad)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.DataFrame) and f.type == DATA
    assert f.stream_id == 7
    assert f.flags == (FLAG_END_STREAM if end_stream else 0) | (FLAG_PADDED if pad is not None else 0)
    assert f.end_stream is end_stream
    assert bytes(f.data) == payload
    assert f.pad_length == (pad or 0)
    assert bytes(f.padding) == bytes(pad or 0)
    assert f.length == len(payload) + (0 if pad is None else pad + 1) == len(wire) - 9
    assert f.flow_controlled_length == f.length  # padding and its length octet count (RFC 9113 §6.1)
    assert reserialize(f) == wire


@pytest.mark.parametrize("end_stream", [False, True])
@pytest.mark.parametrize("end_headers", [False, True])
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("priority", PRIORITIES)
def test_headers_round_trip(twin, end_stream, end_headers, pad, priority) -> None:
    fragment = b"\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff"
    wire = write(twin.frames.write_headers, 9, fragment, end_stream, end_headers, pad, priority)
    parser = twin.frames.FrameParser()
    parser.feed(wire)
    f = next(parser)
    assert isinstance(f, twin.frames.HeadersFrame) and f.type == HEADERS
    assert f.stream_id == 9
    assert f.flags == (
        (FLAG_END_STREAM if end_stream else 0)
        | (FLAG_END_HEADERS if end_headers else 0)
        | (FLAG_PADDED if pad is not None else 0)
        | (FLAG_PRIORITY if priority else 0)
    )
    assert (f.end_stream, f.end_headers, f.priority) == (end_stream, end_headers, priority is not None)
    assert bytes(f.data) == fragment
    assert f.pad_length == (pad or 0)
    assert bytes(f.padding) == bytes(pad or 0)
    assert (f.depends_on, f.weight, f.exclusive) == (priority or (0, DEFAULT_WEIGHT, False))
    assert f.length == len(wire) - 9
    assert parser.header_block_stream == (0 if end_headers else 9)
    assert reserialize(f) == wire


@pytest.mark.parametrize("depends_on", [0, 1, 6, MAX_SID])
@pytest.mark.parametrize("weight", [1, 2, 16, 255, 256])
@pytest.mark.parametrize("exclusive", [False, True])
def test_priority_round_trip(twin, depends_on, weight, exclusive) -> None:
    wire = write(twin.frames.write_priority, 5, depends_on, weight, exclusive)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.PriorityFrame) and f.type == PRIORITY
    assert (f.stream_id, f.flags, f.length) == (5, 0, 5)
    assert (f.depends_on, f.weight, f.exclusive) == (depends_on, weight, exclusive)
    assert wire[-1] == weight - 1  # the wire carries weight-1
    assert reserialize(f) == wire


@pytest.mark.parametrize("code", [0, 1, 8, 0xD, 0xFFFF_FFFF])
def test_rst_stream_round_trip(twin, code) -> None:
    wire = write(twin.frames.write_rst_stream, MAX_SID, code)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.RstStreamFrame) and f.type == RST_STREAM
    assert (f.stream_id, f.flags, f.length, f.error_code) == (MAX_SID, 0, 4, code)
    assert reserialize(f) == wire


@pytest.mark.parametrize(
    "settings",
    [
        [],
        [(SETTINGS_HEADER_TABLE_SIZE, 4096)],
        # Wire order and duplicates are kept (RFC 9113 §6.5.3: processed in order, last one wins).
        [(SETTINGS_MAX_FRAME_SIZE, 20000), (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_MAX_FRAME_SIZE, 16384)],
        [
            (SETTINGS_HEADER_TABLE_SIZE, 0xFFFF_FFFF),
            (SETTINGS_ENABLE_PUSH, 1),
            (SETTINGS_MAX_CONCURRENT_STREAMS, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW_SIZE),
            (SETTINGS_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE),
            (SETTINGS_MAX_HEADER_LIST_SIZE, 0xFFFF_FFFF),
            (0, 0xFFFF_FFFF),  # unknown identifiers are kept, values unchecked (§6.5.2)
            (0xFFFF, 12345),
        ],
    ],
    ids=["empty", "one", "duplicates", "all"],
)
def test_settings_round_trip(twin, settings) -> None:
    wire = write(twin.frames.write_settings, settings)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.SettingsFrame) and f.type == SETTINGS
    assert (f.stream_id, f.flags, f.ack, f.length) == (0, 0, False, 6 * len(settings))
    assert [tuple(s) for s in f.settings] == settings
    assert reserialize(f) == wire


def test_settings_ack_round_trip(twin) -> None:
    wire = write(twin.frames.write_settings, ack=True)
    assert wire == raw_frame(SETTINGS, FLAG_ACK, 0)
    f = parse_one(twin.frames, wire)
    assert (f.ack, f.flags, f.length, list(f.settings)) == (True, FLAG_ACK, 0, [])
    assert reserialize(f) == wire


@pytest.mark.parametrize("end_headers", [False, True])
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("promised", [2, 1000, MAX_SID - 1])
def test_push_promise_round_trip(twin, end_headers, pad, promised) -> None:
    wire = write(twin.frames.write_push_promise, 3, promised, b"\x82\x87", end_headers, pad)
    parser = twin.frames.FrameParser()
    parser.feed(wire)
    f = next(parser)
    assert isinstance(f, twin.frames.PushPromiseFrame) and f.type == PUSH_PROMISE
    assert f.stream_id == 3
    assert f.flags == (FLAG_END_HEADERS if end_headers else 0) | (FLAG_PADDED if pad is not None else 0)
    assert f.end_headers is end_headers
    assert f.promised_stream_id == promised
    assert bytes(f.data) == b"\x82\x87"
    assert f.pad_length == (pad or 0)
    assert bytes(f.padding) == bytes(pad or 0)
    assert f.length == len(wire) - 9
    assert parser.header_block_stream == (0 if end_headers else 3)
    assert reserialize(f) == wire


@pytest.mark.parametrize("ack", [False, True])
@pytest.mark.parametrize("opaque", [bytes(8), b"\xff" * 8, b"deadbeef"])
def test_ping_round_trip(twin, ack, opaque) -> None:
    wire = write(twin.frames.write_ping, opaque, ack)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.PingFrame) and f.type == PING
    assert (f.stream_id, f.flags, f.ack, f.length) == (0, FLAG_ACK if ack else 0, ack, 8)
    assert bytes(f.opaque_data) == opaque
    assert reserialize(f) == wire


@pytest.mark.parametrize("last", [0, 1, MAX_SID])
@pytest.mark.parametrize("code", [0, 2, 0xFFFF_FFFF])
@pytest.mark.parametrize("debug", [b"", b"x", b"debug data" * 100])
def test_goaway_round_trip(twin, last, code, debug) -> None:
    wire = write(twin.frames.write_goaway, last, code, debug)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.GoAwayFrame) and f.type == GOAWAY
    assert (f.stream_id, f.flags, f.length) == (0, 0, 8 + len(debug))
    assert (f.last_stream_id, f.error_code, bytes(f.additional_data)) == (last, code, debug)
    assert reserialize(f) == wire


@pytest.mark.parametrize("sid", [0, 1, MAX_SID])
@pytest.mark.parametrize("increment", [1, 65535, MAX_WINDOW_SIZE])
def test_window_update_round_trip(twin, sid, increment) -> None:
    wire = write(twin.frames.write_window_update, sid, increment)
    f = parse_one(twin.frames, wire)
    assert isinstance(f, twin.frames.WindowUpdateFrame) and f.type == WINDOW_UPDATE
    assert (f.stream_id, f.flags, f.length, f.increment) == (sid, 0, 4, increment)
    assert reserialize(f) == wire


@pytest.mark.parametrize("end_headers", [False, True])
@pytest.mark.parametrize("fragment", [b"", b"\x82", bytes(range(256))])
def test_continuation_round_trip(twin, end_headers, fragment) -> None:
    head = write(twin.frames.write_headers, 11, b"\x82", end_headers=False)
    wire = write(twin.frames.write_continuation, 11, fragment, end_headers)
    parser = twin.frames.FrameParser()
    parser.feed(head + wire)
    assert next(parser).type == HEADERS
    f = next(parser)
    assert isinstance(f, twin.frames.ContinuationFrame) and f.type == CONTINUATION
    assert (f.stream_id, f.flags, f.end_headers) == (11, FLAG_END_HEADERS if end_headers else 0, end_headers)
    assert bytes(f.data) == fragment and f.length == len(fragment)
    assert parser.header_block_stream == (0 if end_headers else 11)
    assert reserialize(f) == wire


def test_frame_classes_and_all(twin) -> None:
    fr = twin.frames
    classes = {
        DATA: fr.DataFrame,
        HEADERS: fr.HeadersFrame,
        PRIORITY: fr.PriorityFrame,
        RST_STREAM: fr.RstStreamFrame,
        SETTINGS: fr.SettingsFrame,
        PUSH_PROMISE: fr.PushPromiseFrame,
        PING: fr.PingFrame,
        GOAWAY: fr.GoAwayFrame,
        WINDOW_UPDATE: fr.WindowUpdateFrame,
        CONTINUATION: fr.ContinuationFrame,
    }
    for cls in classes.values():
        assert issubclass(cls, fr.Frame)
        assert cls.__name__ in fr.__all__
    for name in fr.__all__:
        assert hasattr(fr, name), name


def test_frame_type_is_a_class_attribute(twin) -> None:
    # The py twin exposes ``DataFrame.type == DATA`` etc. on the classes, not only on instances.
    fr = twin.frames
    for cls, ftype in [(fr.DataFrame, DATA), (fr.SettingsFrame, SETTINGS), (fr.ContinuationFrame, CONTINUATION)]:
        assert cls.type == ftype


def test_headers_default_priority_fields(twin) -> None:
    f = parse_one(twin.frames, write(twin.frames.write_headers, 1, b"abc"))
    assert (f.depends_on, f.weight, f.exclusive) == (0, DEFAULT_WEIGHT, False)
    assert not f.priority


# Chunking --------------------------------------------------------------------------------------------


def _feed_in_chunks(frames, data: bytes, sizes) -> list:
    parser = frames.FrameParser()
    out, pos = [], 0
    for size in sizes:
        parser.feed(data[pos : pos + size])
        pos += size
        out.extend(drain(parser))
    assert pos == len(data)
    assert parser.buffered == 0
    return out


def test_byte_by_byte_equals_whole(twin) -> None:
    data = sample_stream(twin.frames)
    whole = [describe(f) for f in parse_all(twin.frames, data)]
    assert len(whole) == 16  # the unknown frame is skipped
    # Described only after all feeding: earlier frames' views must survive later feeds.
    frames = _feed_in_chunks(twin.frames, data, [1] * len(data))
    assert [describe(f) for f in frames] == whole


@pytest.mark.parametrize("seed", range(25))
def test_random_chunkings_equal_whole(twin, seed) -> None:
    rng = random.Random(seed)
    data = sample_stream(twin.frames)
    whole = [describe(f) for f in parse_all(twin.frames, data)]
    sizes, left = [], len(data)
    while left:
        n = min(left, rng.choice([0, 1, 2, 8, 9, 10, rng.randrange(1, 64), rng.randrange(1, 5000)]))
        sizes.append(n)
        left -= n
    frames = _feed_in_chunks(twin.frames, data, sizes)
    assert [describe(f) for f in frames] == whole, f"seed={seed} sizes={sizes}"


def test_feed_accepts_bytearray_and_memoryview(twin) -> None:
    data = sample_stream(twin.frames)
    whole = [describe(f) for f in parse_all(twin.frames, data)]
    for conv in (bytearray, memoryview):
        parser = twin.frames.FrameParser()
        half = len(data) // 2
        parser.feed(conv(data[:half]))
        got = drain(parser)
        parser.feed(conv(data[half:]))
        got += drain(parser)
        assert [describe(f) for f in got] == whole


def test_feeding_mutable_buffer_is_not_aliased(twin) -> None:
    # A caller may reuse its receive buffer after feed(); parsed frames must not change with it.
    buf = bytearray(write(twin.frames.write_data, 1, b"original"))
    parser = twin.frames.FrameParser()
    parser.feed(buf)
    f = next(parser)
    buf[9:] = b"XXXXXXXX"
    assert bytes(f.data) == b"original"


# Unknown types, undefined flags, reserved bits --------------------------------------------------------


@pytest.mark.parametrize("ftype", [0x0A, 0x0B, 0x10, 0x7F, 0xFF])
def test_unknown_frame_types_are_skipped(twin, ftype) -> None:
    ping = write(twin.frames.write_ping, b"abcdefgh")
    data = (
        raw_frame(ftype, 0xFF, 0, b"")
        + raw_frame(ftype, 0x00, 0x8000_0003, b"x" * 100)
        + ping
        + raw_frame(ftype, 0x01, 5, bytes(DEFAULT_MAX_FRAME_SIZE))
        + ping
    )
    got = parse_all(twin.frames, data)
    assert [f.type for f in got] == [PING, PING]
    assert all(bytes(f.opaque_data) == b"abcdefgh" for f in got)
    assert [describe(f) for f in _feed_in_chunks(twin.frames, data, [1] * len(data))] == [describe(f) for f in got]


def test_unknown_type_only_stream_yields_nothing(twin) -> None:
    parser = twin.frames.FrameParser()
    parser.feed(raw_frame(0x42, 0, 1, b"abc") * 3)
    assert drain(parser) == []
    assert parser.buffered == 0


def _frame_of_each_type(frames) -> dict[int, bytes]:
    return {
        DATA: write(frames.write_data, 1, b"data", True, 2),
        HEADERS: write(frames.write_headers, 1, b"hdr", True, True, 1, (3, 7, True)),
        PRIORITY: write(frames.write_priority, 1, 3, 7, True),
        RST_STREAM: write(frames.write_rst_stream, 1, 8),
        SETTINGS: write(frames.write_settings, [(1, 2)]),
        PUSH_PROMISE: write(frames.write_push_promise, 1, 2, b"pp", True, 3),
        PING: write(frames.write_ping, b"pingpong", True),
        GOAWAY: write(frames.write_goaway, 1, 0, b"x"),
        WINDOW_UPDATE: write(frames.write_window_update, 1, 5),
        CONTINUATION: write(frames.write_continuation, 1, b"cont", True),
    }


@pytest.mark.parametrize("ftype", sorted(TYPE_NAMES), ids=TYPE_NAMES.get)
def test_undefined_flags_are_masked_off(twin, ftype) -> None:
    fr = twin.frames
    wire = _frame_of_each_type(fr)[ftype]
    undefined = ~DEFINED_FLAGS[ftype] & 0xFF
    assert undefined  # every type leaves some bits undefined
    flagged = wire[:4] + bytes([wire[4] | undefined]) + wire[5:]
    prefix = write(fr.write_headers, 1, b"", end_headers=False) if ftype == CONTINUATION else b""
    clean = parse_all(fr, prefix + wire)[-1]
    got = parse_all(fr, prefix + flagged)[-1]
    assert got.flags == clean.flags == wire[4]
    assert not got.flags & undefined
    assert describe(got) == describe(clean)
    assert reserialize(got) == wire  # undefined flags are never sent (RFC 9113 §4.1)


@pytest.mark.parametrize("ftype", sorted(TYPE_NAMES), ids=TYPE_NAMES.get)
def test_reserved_stream_id_bit_is_ignored(twin, ftype) -> None:
    fr = twin.frames
    wire = _frame_of_each_type(fr)[ftype]
    reserved = wire[:5] + bytes([wire[5] | 0x80]) + wire[6:]
    prefix = write(fr.write_headers, 1, b"", end_headers=False) if ftype == CONTINUATION else b""
    got = parse_all(fr, prefix + reserved)[-1]
    assert describe(got) == describe(parse_all(fr, prefix + wire)[-1])
    assert reserialize(got) == wire


def test_reserved_bits_in_payload_fields_are_ignored(twin) -> None:
    fr = twin.frames
    # PUSH_PROMISE promised stream id (§6.6), GOAWAY last stream id (§6.8), WINDOW_UPDATE increment (§6.9).
    pp = parse_one(fr, raw_frame(PUSH_PROMISE, FLAG_END_HEADERS, 1, struct.pack(">L", 0x8000_0002) + b"x"))
    assert pp.promised_stream_id == 2
    ga = parse_one(fr, raw_frame(GOAWAY, 0, 0, struct.pack(">LL", 0x8000_0007, 1)))
    assert ga.last_stream_id == 7
    wu = parse_one(fr, raw_frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 0xFFFF_FFFF)))
    assert wu.increment == MAX_WINDOW_SIZE


# max_frame_size -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ftype", [DATA, HEADERS, SETTINGS, PING, 0x42], ids=["DATA", "HEADERS", "SETTINGS", "PING", "0x42"]
)
def test_oversized_frame_rejected_on_header_alone(twin, ftype) -> None:
    parser = twin.frames.FrameParser()
    sid = 0 if ftype in (SETTINGS, PING) else 1  # otherwise a valid header: only the length is wrong
    header = raw_frame(ftype, 0, sid, length=DEFAULT_MAX_FRAME_SIZE + 1)
    parser.feed(header[:8])
    assert drain(parser) == []  # 8 bytes: not even a header yet
    parser.feed(header[8:])  # the 9th byte completes the header; no payload byte has arrived
    with pytest.raises(FrameSizeError) as info:
        next(parser)
    assert info.value.error_code == ErrorCode.FRAME_SIZE_ERROR
    assert info.value.stream_id is None


def test_frame_of_exactly_max_size_waits_for_body(twin) -> None:
    parser = twin.frames.FrameParser()
    body = bytes(DEFAULT_MAX_FRAME_SIZE)
    wire = write(twin.frames.write_data, 1, body)
    parser.feed(wire[:9])
    assert drain(parser) == []
    assert parser.buffered == 9
    parser.feed(wire[9:-1])
    assert drain(parser) == []
    parser.feed(wire[-1:])
    (f,) = drain(parser)
    assert len(f.data) == DEFAULT_MAX_FRAME_SIZE


def test_raised_max_frame_size_admits_larger_frames(twin) -> None:
    big = write(twin.frames.write_data, 1, b"z" * 70000)
    with pytest.raises(FrameSizeError):
        parse_all(twin.frames, big)
    f = parse_one(twin.frames, big, max_frame_size=70000)
    assert len(f.data) == 70000
    with pytest.raises(FrameSizeError):
        parse_all(twin.frames, big, max_frame_size=69999)
    parser = twin.frames.FrameParser()
    parser.max_frame_size = MAX_MAX_FRAME_SIZE
    parser.feed(big)
    assert len(next(parser).data) == 70000


def test_lowered_max_frame_size_applies_to_next_frame(twin) -> None:
    parser = twin.frames.FrameParser(max_frame_size=20000)
    frame = write(twin.frames.write_data, 1, b"q" * 17000)
    parser.feed(frame + frame)
    assert len(next(parser).data) == 17000
    parser.max_frame_size = DEFAULT_MAX_FRAME_SIZE
    with pytest.raises(FrameSizeError):
        next(parser)


@pytest.mark.parametrize("value", [DEFAULT_MAX_FRAME_SIZE, 20000, MAX_MAX_FRAME_SIZE])
def test_max_frame_size_setter_accepts_range(twin, value) -> None:
    parser = twin.frames.FrameParser()
    parser.max_frame_size = value
    assert parser.max_frame_size == value
    assert twin.frames.FrameParser(max_frame_size=value).max_frame_size == value


@pytest.mark.parametrize("value", [-1, 0, DEFAULT_MAX_FRAME_SIZE - 1, MAX_MAX_FRAME_SIZE + 1, 2**32])
def test_max_frame_size_setter_rejects_out_of_range(twin, value) -> None:
    parser = twin.frames.FrameParser()
    with pytest.raises(ValueError):
        parser.max_frame_size = value
    assert parser.max_frame_size == DEFAULT_MAX_FRAME_SIZE
    with pytest.raises(ValueError):
        twin.frames.FrameParser(max_frame_size=value)


def test_default_max_frame_size(twin) -> None:
    assert twin.frames.FrameParser().max_frame_size == DEFAULT_MAX_FRAME_SIZE


# Per-type length and stream-id rules --------------------------------------------------------------------

P, E, PR = FLAG_PADDED, FLAG_END_HEADERS, FLAG_PRIORITY
U32 = struct.Struct(">L").pack
PRIO_BYTES = struct.pack(">LB", 3, 15)
STREAM_ERR = "stream"
CONN_ERR = "connection"
# The code each error class must put on the wire (RFC 9113 §7), spelled out independently of the classes.
WIRE_CODE = {ProtocolError: 0x1, FlowControlError: 0x3, FrameSizeError: 0x6}

# (id, wire, expected exception class (its code: WIRE_CODE), scope, RFC 9113 section)
RULE_CASES = [
    ("data-on-stream-0", raw_frame(DATA, 0, 0, b"abc"), ProtocolError, CONN_ERR, "6.1"),
    ("data-padded-empty", raw_frame(DATA, P, 1, b""), FrameSizeError, CONN_ERR, "4.2"),
    ("data-pad-equals-length", raw_frame(DATA, P, 1, b"\x04abc"), ProtocolError, CONN_ERR, "6.1"),
    ("data-pad-255-length-1", raw_frame(DATA, P, 1, b"\xff"), ProtocolError, CONN_ERR, "6.1"),
    ("headers-on-stream-0", raw_frame(HEADERS, E, 0, b"\x82"), ProtocolError, CONN_ERR, "6.2"),
    ("headers-padded-empty", raw_frame(HEADERS, E | P, 1, b""), FrameSizeError, CONN_ERR, "4.2"),
    ("headers-pad-exceeds-payload", raw_frame(HEADERS, E | P, 1, b"\x04abc"), ProtocolError, CONN_ERR, "6.2"),
    ("headers-priority-short", raw_frame(HEADERS, E | PR, 1, PRIO_BYTES[:4]), FrameSizeError, CONN_ERR, "4.2"),
    (
        "headers-padded-priority-short",
        raw_frame(HEADERS, E | PR | P, 1, b"\x00" + PRIO_BYTES[:4]),
        FrameSizeError,
        CONN_ERR,
        "4.2",
    ),
    (
        "headers-pad-overlaps-priority",
        raw_frame(HEADERS, E | PR | P, 1, b"\x02" + PRIO_BYTES + b"a"),
        ProtocolError,
        CONN_ERR,
        "6.2",
    ),
    ("priority-on-stream-0", raw_frame(PRIORITY, 0, 0, PRIO_BYTES), ProtocolError, CONN_ERR, "6.3"),
    ("priority-length-4", raw_frame(PRIORITY, 0, 5, PRIO_BYTES[:4]), FrameSizeError, STREAM_ERR, "6.3"),
    ("priority-length-6", raw_frame(PRIORITY, 0, 5, PRIO_BYTES + b"x"), FrameSizeError, STREAM_ERR, "6.3"),
    ("priority-length-0", raw_frame(PRIORITY, 0, 5, b""), FrameSizeError, STREAM_ERR, "6.3"),
    ("priority-self-dependency", raw_frame(PRIORITY, 0, 3, PRIO_BYTES), ProtocolError, STREAM_ERR, "7540 5.3.1"),
    (
        "priority-self-dependency-exclusive",
        raw_frame(PRIORITY, 0, 3, struct.pack(">LB", 0x8000_0003, 0)),
        ProtocolError,
        STREAM_ERR,
        "7540 5.3.1",
    ),
    ("rst-stream-on-stream-0", raw_frame(RST_STREAM, 0, 0, U32(1)), ProtocolError, CONN_ERR, "6.4"),
    ("rst-stream-length-3", raw_frame(RST_STREAM, 0, 1, b"abc"), FrameSizeError, CONN_ERR, "6.4"),
    ("rst-stream-length-5", raw_frame(RST_STREAM, 0, 1, b"abcde"), FrameSizeError, CONN_ERR, "6.4"),
    ("settings-on-stream-1", raw_frame(SETTINGS, 0, 1, b""), ProtocolError, CONN_ERR, "6.5"),
    ("settings-ack-with-payload", raw_frame(SETTINGS, FLAG_ACK, 0, bytes(6)), FrameSizeError, CONN_ERR, "6.5"),
    ("settings-length-5", raw_frame(SETTINGS, 0, 0, bytes(5)), FrameSizeError, CONN_ERR, "6.5"),
    ("settings-length-13", raw_frame(SETTINGS, 0, 0, bytes(13)), FrameSizeError, CONN_ERR, "6.5"),
    ("push-promise-on-stream-0", raw_frame(PUSH_PROMISE, E, 0, U32(2)), ProtocolError, CONN_ERR, "6.6"),
    ("push-promise-padded-empty", raw_frame(PUSH_PROMISE, E | P, 1, b""), FrameSizeError, CONN_ERR, "4.2"),
    ("push-promise-short", raw_frame(PUSH_PROMISE, E, 1, b"\x00\x00\x02"), FrameSizeError, CONN_ERR, "4.2"),
    ("push-promise-promises-0", raw_frame(PUSH_PROMISE, E, 1, U32(0)), ProtocolError, CONN_ERR, "6.6"),
    (
        "push-promise-promises-0-reserved-bit",
        raw_frame(PUSH_PROMISE, E, 1, U32(0x8000_0000)),
        ProtocolError,
        CONN_ERR,
        "6.6",
    ),
    ("push-promise-promises-odd", raw_frame(PUSH_PROMISE, E, 1, U32(5)), ProtocolError, CONN_ERR, "5.1.1"),
    (
        "push-promise-pad-overlaps-promised-id",
        raw_frame(PUSH_PROMISE, E | P, 1, b"\x02" + U32(2) + b"a"),
        ProtocolError,
        CONN_ERR,
        "6.6",
    ),
    ("ping-on-stream-1", raw_frame(PING, 0, 1, bytes(8)), ProtocolError, CONN_ERR, "6.7"),
    ("ping-length-7", raw_frame(PING, 0, 0, bytes(7)), FrameSizeError, CONN_ERR, "6.7"),
    ("ping-length-9", raw_frame(PING, FLAG_ACK, 0, bytes(9)), FrameSizeError, CONN_ERR, "6.7"),
    ("goaway-on-stream-1", raw_frame(GOAWAY, 0, 1, bytes(8)), ProtocolError, CONN_ERR, "6.8"),
    ("goaway-length-7", raw_frame(GOAWAY, 0, 0, bytes(7)), FrameSizeError, CONN_ERR, "4.2"),
    ("window-update-length-3", raw_frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x01"), FrameSizeError, CONN_ERR, "6.9"),
    ("window-update-length-5", raw_frame(WINDOW_UPDATE, 0, 0, U32(1) + b"\x00"), FrameSizeError, CONN_ERR, "6.9"),
    ("window-update-zero-on-stream", raw_frame(WINDOW_UPDATE, 0, 7, U32(0)), ProtocolError, STREAM_ERR, "6.9"),
    (
        "window-update-zero-reserved-bit-on-stream",
        raw_frame(WINDOW_UPDATE, 0, 7, U32(0x8000_0000)),
        ProtocolError,
        STREAM_ERR,
        "6.9",
    ),
    ("window-update-zero-on-connection", raw_frame(WINDOW_UPDATE, 0, 0, U32(0)), ProtocolError, CONN_ERR, "6.9"),
    ("continuation-on-stream-0", raw_frame(CONTINUATION, E, 0, b"x"), ProtocolError, CONN_ERR, "6.10"),
    ("continuation-without-block", raw_frame(CONTINUATION, E, 1, b"x"), ProtocolError, CONN_ERR, "6.10"),
]


@pytest.mark.parametrize(
    ("wire", "cls", "scope", "section"), [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES]
)
def test_frame_rule(twin, wire, cls, scope, section) -> None:
    ping = write(twin.frames.write_ping, b"continue")
    parser = twin.frames.FrameParser()
    parser.feed(wire + ping)
    with pytest.raises(H2Error) as info:
        next(parser)
    exc = info.value
    assert type(exc) is cls, f"RFC 9113 §{section}: expected {cls.__name__}, got {exc!r}"
    assert exc.error_code == WIRE_CODE[cls]
    if scope == CONN_ERR:
        assert exc.stream_id is None and exc.is_connection_error
    else:
        sid = struct.unpack_from(">L", wire, 5)[0] & MAX_SID
        assert exc.stream_id == sid and not exc.is_connection_error
        # A stream error leaves the parser after the offending frame: the next frame parses.
        nxt = next(parser)
        assert nxt.type == PING and bytes(nxt.opaque_data) == b"continue"
        assert parser.buffered == 0


def test_stream_errors_then_more_frames(twin) -> None:
    fr = twin.frames
    good = write(fr.write_data, 1, b"ok")
    data = (
        raw_frame(PRIORITY, 0, 3, PRIO_BYTES)  # self-dependency
        + good
        + raw_frame(PRIORITY, 0, 9, b"\x00" * 7)  # bad length
        + raw_frame(WINDOW_UPDATE, 0, 11, U32(0))  # zero increment
        + good
    )
    parser = fr.FrameParser()
    parser.feed(data)
    seen = []
    for _ in range(10):  # bounded: a parser stuck on the bad frame must fail the test, not hang it
        try:
            f = next(parser)
        except StopIteration:
            break
        except H2Error as exc:
            assert exc.stream_id is not None
            seen.append(("err", exc.stream_id, exc.error_code))
        else:
            seen.append(("frame", f.stream_id, bytes(f.data)))
    assert seen == [
        ("err", 3, ErrorCode.PROTOCOL_ERROR),
        ("frame", 1, b"ok"),
        ("err", 9, ErrorCode.FRAME_SIZE_ERROR),
        ("err", 11, ErrorCode.PROTOCOL_ERROR),
        ("frame", 1, b"ok"),
    ]


def test_pad_fills_whole_remainder(twin) -> None:
    # Padding may take every octet after the mandatory fields: an empty body is legal.
    fr = twin.frames
    f = parse_one(fr, raw_frame(DATA, P, 1, b"\x03" + bytes(3)))
    assert (bytes(f.data), f.pad_length) == (b"", 3)
    f = parse_one(fr, raw_frame(HEADERS, E | P | PR, 1, b"\x02" + PRIO_BYTES + bytes(2)))
    assert (bytes(f.data), f.pad_length, f.depends_on, f.weight) == (b"", 2, 3, 16)
    f = parse_one(fr, raw_frame(PUSH_PROMISE, E | P, 1, b"\x01" + U32(4) + bytes(1)))
    assert (bytes(f.data), f.pad_length, f.promised_stream_id) == (b"", 1, 4)


def test_nonzero_padding_is_accepted_and_exposed(twin) -> None:
    # RFC 9113 §6.1: a receiver is not obligated to verify padding.
    f = parse_one(twin.frames, raw_frame(DATA, P, 1, b"\x02ab\xff\xfe"))
    assert (bytes(f.data), bytes(f.padding)) == (b"ab", b"\xff\xfe")


# SETTINGS value validation (RFC 9113 §6.5.2) -------------------------------------------------------------

SETTINGS_CASES = [
    ("enable-push-0", SETTINGS_ENABLE_PUSH, 0, None),
    ("enable-push-1", SETTINGS_ENABLE_PUSH, 1, None),
    ("enable-push-2", SETTINGS_ENABLE_PUSH, 2, ProtocolError),
    ("enable-push-max", SETTINGS_ENABLE_PUSH, 0xFFFF_FFFF, ProtocolError),
    ("initial-window-max", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW_SIZE, None),
    ("initial-window-too-big", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW_SIZE + 1, FlowControlError),
    ("initial-window-u32-max", SETTINGS_INITIAL_WINDOW_SIZE, 0xFFFF_FFFF, FlowControlError),
    ("max-frame-size-min", SETTINGS_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE, None),
    ("max-frame-size-max", SETTINGS_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE, None),
    ("max-frame-size-too-small", SETTINGS_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE - 1, ProtocolError),
    ("max-frame-size-zero", SETTINGS_MAX_FRAME_SIZE, 0, ProtocolError),
    ("max-frame-size-too-big", SETTINGS_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE + 1, ProtocolError),
    ("header-table-size-any", SETTINGS_HEADER_TABLE_SIZE, 0xFFFF_FFFF, None),
    ("max-header-list-size-any", SETTINGS_MAX_HEADER_LIST_SIZE, 0xFFFF_FFFF, None),
    ("unknown-id-any-value", 0x99, 0xFFFF_FFFF, None),
]


@pytest.mark.parametrize(("ident", "value", "cls"), [c[1:] for c in SETTINGS_CASES], ids=[c[0] for c in SETTINGS_CASES])
@pytest.mark.parametrize("position", ["alone", "after-valid"])
def test_settings_value_validation(twin, ident, value, cls, position) -> None:
    before = [(SETTINGS_HEADER_TABLE_SIZE, 100)] if position == "after-valid" else []
    payload = b"".join(struct.pack(">HL", i, v) for i, v in [*before, (ident, value)])
    wire = raw_frame(SETTINGS, 0, 0, payload)
    if cls is None:
        f = parse_one(twin.frames, wire)
        assert [tuple(s) for s in f.settings] == [*before, (ident, value)]
        return
    with pytest.raises(H2Error) as info:
        parse_all(twin.frames, wire)
    assert type(info.value) is cls
    assert info.value.error_code == WIRE_CODE[cls]
    assert info.value.stream_id is None


# Header-block sequencing (RFC 9113 §4.3, §6.2, §6.10) ------------------------------------------------------


def _open_block(fr, sid: int = 1, push: bool = False) -> bytes:
    if push:
        return write(fr.write_push_promise, sid, 2, b"\x82", end_headers=False)
    return write(fr.write_headers, sid, b"\x82", end_headers=False)


INTERRUPTERS = {
    "data-same-stream": lambda fr: write(fr.write_data, 1, b"x"),
    "headers-same-stream": lambda fr: write(fr.write_headers, 1, b"\x82"),
    "priority-same-stream": lambda fr: write(fr.write_priority, 1, 0, 16),
    "rst-stream-same-stream": lambda fr: write(fr.write_rst_stream, 1, 8),
    "settings": lambda fr: write(fr.write_settings, []),
    "push-promise-same-stream": lambda fr: write(fr.write_push_promise, 1, 2, b""),
    "ping": lambda fr: write(fr.write_ping, bytes(8)),
    "goaway": lambda fr: write(fr.write_goaway, 0, 0),
    "window-update-same-stream": lambda fr: write(fr.write_window_update, 1, 1),
    "window-update-connection": lambda fr: write(fr.write_window_update, 0, 1),
    "continuation-other-stream": lambda fr: write(fr.write_continuation, 3, b"\x82"),
    "continuation-stream-0": lambda fr: raw_frame(CONTINUATION, E, 0, b""),
    "unknown-type-same-stream": lambda fr: raw_frame(0x20, 0, 1, b"ext"),
    "unknown-type-stream-0": lambda fr: raw_frame(0xFA, 0, 0, b""),
}


@pytest.mark.parametrize("push", [False, True], ids=["headers", "push-promise"])
@pytest.mark.parametrize("interrupter", sorted(INTERRUPTERS))
def test_header_block_interrupted(twin, interrupter, push) -> None:
    fr = twin.frames
    parser = fr.FrameParser()
    parser.feed(_open_block(fr, 1, push) + INTERRUPTERS[interrupter](fr))
    assert next(parser).type == (PUSH_PROMISE if push else HEADERS)
    assert parser.header_block_stream == 1
    with pytest.raises(ProtocolError) as info:
        next(parser)
    assert type(info.value) is ProtocolError
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR
    assert info.value.stream_id is None


def test_header_block_interrupted_after_continuation(twin) -> None:
    fr = twin.frames
    parser = fr.FrameParser()
    parser.feed(_open_block(fr) + write(fr.write_continuation, 1, b"a", False) + write(fr.write_data, 1, b""))
    assert [next(parser).type, next(parser).type] == [HEADERS, CONTINUATION]
    assert parser.header_block_stream == 1
    with pytest.raises(ProtocolError) as info:
        next(parser)
    assert info.value.stream_id is None


def test_continuation_after_block_closed(twin) -> None:
    fr = twin.frames
    parser = fr.FrameParser()
    parser.feed(
        _open_block(fr) + write(fr.write_continuation, 1, b"a", True) + write(fr.write_continuation, 1, b"b", True)
    )
    assert [next(parser).type, next(parser).type] == [HEADERS, CONTINUATION]
    assert parser.header_block_stream == 0
    with pytest.raises(ProtocolError) as info:
        next(parser)
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR and info.value.stream_id is None


def test_continuation_after_complete_headers(twin) -> None:
    fr = twin.frames
    with pytest.raises(ProtocolError) as info:
        parse_all(fr, write(fr.write_headers, 1, b"\x82") + write(fr.write_continuation, 1, b"x"))
    assert info.value.stream_id is None


@pytest.mark.parametrize("push", [False, True], ids=["headers", "push-promise"])
def test_header_block_sequence_and_state(twin, push) -> None:
    fr = twin.frames
    parser = fr.FrameParser()
    assert parser.header_block_stream == 0
    parser.feed(_open_block(fr, 5, push))
    next(parser)
    assert parser.header_block_stream == 5
    for i in range(3):
        parser.feed(write(fr.write_continuation, 5, bytes([i]), False))
        assert next(parser).type == CONTINUATION
        assert parser.header_block_stream == 5
    parser.feed(write(fr.write_continuation, 5, b"", True))
    assert next(parser).end_headers
    assert parser.header_block_stream == 0
    parser.feed(write(fr.write_data, 5, b"body") + write(fr.write_headers, 7, b"", end_headers=False))
    assert next(parser).type == DATA
    assert next(parser).type == HEADERS
    assert parser.header_block_stream == 7


def test_header_block_state_survives_chunking(twin) -> None:
    fr = twin.frames
    data = _open_block(fr, 3) + write(fr.write_continuation, 3, b"abc", True) + write(fr.write_data, 3, b"d")
    frames = _feed_in_chunks(fr, data, [1] * len(data))
    assert [f.type for f in frames] == [HEADERS, CONTINUATION, DATA]


# write_header_block ------------------------------------------------------------------------------------------

# Block sizes around the split points: max-5 is what fits in a HEADERS frame that carries priority fields.
BLOCK_SIZES = {
    "0": lambda m: 0,
    "1": lambda m: 1,
    "max-5": lambda m: m - 5,
    "max-4": lambda m: m - 4,
    "max-1": lambda m: m - 1,
    "max": lambda m: m,
    "max+1": lambda m: m + 1,
    "2max": lambda m: 2 * m,
    "3max+7": lambda m: 3 * m + 7,
}


@pytest.mark.parametrize("max_size", [DEFAULT_MAX_FRAME_SIZE, 20000])
@pytest.mark.parametrize("priority", [None, (3, 256, True)], ids=["no-priority", "priority"])
@pytest.mark.parametrize("size_name", sorted(BLOCK_SIZES))
@pytest.mark.parametrize("end_stream", [False, True])
def test_write_header_block_splits_and_reassembles(twin, max_size, priority, size_name, end_stream) -> None:
    fr = twin.frames
    size = BLOCK_SIZES[size_name](max_size)
    block = bytes((i * 7 + 3) & 0xFF for i in range(size))
    buf = bytearray()
    fr.write_header_block(buf, 5, block, end_stream, max_size, priority)

    got = parse_all(fr, bytes(buf), max_frame_size=max_size)
    head, conts = got[0], got[1:]
    assert head.type == HEADERS and all(f.type == CONTINUATION for f in conts)
    assert all(f.stream_id == 5 for f in got)
    assert all(f.length <= max_size for f in got)
    assert b"".join(bytes(f.data) for f in got) == block
    # END_HEADERS only on the last frame; END_STREAM on the HEADERS frame (§8.1), never on CONTINUATION.
    assert [f.end_headers for f in got] == [False] * (len(got) - 1) + [True]
    assert head.end_stream is end_stream
    assert not head.flags & FLAG_PADDED
    assert (head.depends_on, head.weight, head.exclusive) == (priority or (0, DEFAULT_WEIGHT, False))
    # Minimal split: every frame but the last is full.
    first_room = max_size - (5 if priority else 0)
    assert len(head.data) == min(size, first_room)
    assert all(len(f.data) == max_size for f in conts[:-1])
    expected_conts = 0 if size <= first_room else -(-(size - first_room) // max_size)
    assert len(conts) == expected_conts
    if conts:
        assert len(conts[-1].data) > 0


def test_write_header_block_rejects_bad_max_frame_size(twin) -> None:
    for bad in (DEFAULT_MAX_FRAME_SIZE - 1, MAX_MAX_FRAME_SIZE + 1, 0):
        buf = bytearray(b"keep")
        with pytest.raises(ValueError):
            twin.frames.write_header_block(buf, 1, b"x", False, bad)
        assert buf == b"keep"


# Writers reject invalid arguments with ValueError, leaving the buffer untouched ----------------------------

BAD_CALLS = {
    "frame-header-length-negative": lambda fr, b: fr.write_frame_header(b, -1, DATA, 0, 1),
    "frame-header-length-too-big": lambda fr, b: fr.write_frame_header(b, 2**24, DATA, 0, 1),
    "frame-header-stream-negative": lambda fr, b: fr.write_frame_header(b, 0, DATA, 0, -1),
    "frame-header-stream-too-big": lambda fr, b: fr.write_frame_header(b, 0, DATA, 0, 2**31),
    "frame-header-type-256": lambda fr, b: fr.write_frame_header(b, 0, 256, 0, 1),
    "frame-header-flags-256": lambda fr, b: fr.write_frame_header(b, 0, DATA, 256, 1),
    "frame-header-flags-negative": lambda fr, b: fr.write_frame_header(b, 0, DATA, -1, 1),
    "data-stream-0": lambda fr, b: fr.write_data(b, 0, b"x"),
    "data-stream-too-big": lambda fr, b: fr.write_data(b, 2**31, b"x"),
    "data-pad-negative": lambda fr, b: fr.write_data(b, 1, b"x", False, -1),
    "data-pad-256": lambda fr, b: fr.write_data(b, 1, b"x", False, 256),
    "data-too-long": lambda fr, b: fr.write_data(b, 1, bytes(2**24 - 1), False, 0),
    "headers-stream-0": lambda fr, b: fr.write_headers(b, 0, b"x"),
    "headers-pad-256": lambda fr, b: fr.write_headers(b, 1, b"x", False, True, 256),
    "headers-weight-0": lambda fr, b: fr.write_headers(b, 1, b"x", False, True, None, (0, 0, False)),
    "headers-weight-257": lambda fr, b: fr.write_headers(b, 1, b"x", False, True, None, (0, 257, False)),
    "headers-dependency-too-big": lambda fr, b: fr.write_headers(b, 1, b"x", False, True, None, (2**31, 16, False)),
    "headers-dependency-negative": lambda fr, b: fr.write_headers(b, 1, b"x", False, True, 3, (-1, 16, False)),
    "priority-stream-0": lambda fr, b: fr.write_priority(b, 0, 1, 16),
    "priority-weight-0": lambda fr, b: fr.write_priority(b, 1, 0, 0),
    "priority-weight-257": lambda fr, b: fr.write_priority(b, 1, 0, 257),
    "priority-dependency-too-big": lambda fr, b: fr.write_priority(b, 1, 2**31, 16),
    "rst-stream-stream-0": lambda fr, b: fr.write_rst_stream(b, 0, 0),
    "rst-stream-code-negative": lambda fr, b: fr.write_rst_stream(b, 1, -1),
    "rst-stream-code-too-big": lambda fr, b: fr.write_rst_stream(b, 1, 2**32),
    "settings-ack-with-settings": lambda fr, b: fr.write_settings(b, [(1, 1)], True),
    "settings-id-too-big": lambda fr, b: fr.write_settings(b, [(1, 1), (2**16, 0)]),
    "settings-id-negative": lambda fr, b: fr.write_settings(b, [(-1, 0)]),
    "settings-value-too-big": lambda fr, b: fr.write_settings(b, [(1, 1), (1, 2**32)]),
    "settings-value-negative": lambda fr, b: fr.write_settings(b, [(1, -1)]),
    "push-promise-stream-0": lambda fr, b: fr.write_push_promise(b, 0, 2, b""),
    "push-promise-promised-0": lambda fr, b: fr.write_push_promise(b, 1, 0, b""),
    "push-promise-promised-too-big": lambda fr, b: fr.write_push_promise(b, 1, 2**31, b""),
    "push-promise-pad-256": lambda fr, b: fr.write_push_promise(b, 1, 2, b"", True, 256),
    "ping-7-bytes": lambda fr, b: fr.write_ping(b, bytes(7)),
    "ping-9-bytes": lambda fr, b: fr.write_ping(b, bytes(9)),
    "goaway-last-stream-negative": lambda fr, b: fr.write_goaway(b, -1, 0),
    "goaway-last-stream-too-big": lambda fr, b: fr.write_goaway(b, 2**31, 0),
    "goaway-code-too-big": lambda fr, b: fr.write_goaway(b, 1, 2**32),
    "goaway-code-negative": lambda fr, b: fr.write_goaway(b, 1, -1),
    "window-update-increment-0": lambda fr, b: fr.write_window_update(b, 1, 0),
    "window-update-increment-too-big": lambda fr, b: fr.write_window_update(b, 1, 2**31),
    "window-update-stream-negative": lambda fr, b: fr.write_window_update(b, -1, 1),
    "window-update-stream-too-big": lambda fr, b: fr.write_window_update(b, 2**31, 1),
    "continuation-stream-0": lambda fr, b: fr.write_continuation(b, 0, b"x"),
    "header-block-stream-0": lambda fr, b: fr.write_header_block(b, 0, b"x"),
    "header-block-bad-priority": lambda fr, b: fr.write_header_block(b, 1, b"x" * 40000, False, 16384, (1, 0, False)),
}


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_writer_rejects_invalid_arguments(twin, call) -> None:
    buf = bytearray(b"previous frames")
    with pytest.raises(ValueError):
        call(twin.frames, buf)
    assert buf == b"previous frames", "a rejected write must not leave a partial frame behind"


def test_writers_append(twin) -> None:
    fr = twin.frames
    buf = bytearray(b"prefix")
    fr.write_ping(buf, bytes(8))
    fr.write_window_update(buf, 0, 1)
    assert buf[:6] == b"prefix"
    assert [f.type for f in parse_all(fr, bytes(buf[6:]))] == [PING, WINDOW_UPDATE]


# Zero-copy views, buffered, header_block_stream ------------------------------------------------------------


def test_bodies_are_views_of_the_fed_bytes(twin) -> None:
    fr = twin.frames
    chunk = b"".join(
        [
            write(fr.write_data, 1, b"payload-1", False, 4),
            write(fr.write_headers, 3, b"\x82\x86", False, False, 2, (1, 8, False)),
            write(fr.write_continuation, 3, b"\x84", True),
            write(fr.write_push_promise, 3, 4, b"\x87", True, 1),
            write(fr.write_goaway, 3, 0, b"debug"),
        ]
    )
    parser = fr.FrameParser()
    parser.feed(chunk)
    data, headers, cont, pp, goaway = drain(parser)
    for view in (data.data, data.padding, headers.data, cont.data, pp.data, goaway.additional_data):
        assert isinstance(view, memoryview)
        assert view.obj is chunk
    assert bytes(data.data) == b"payload-1" and bytes(goaway.additional_data) == b"debug"

    # A second feed of whole frames is sliced in place too (nothing was left over from the first one).
    chunk2 = write(fr.write_data, 5, b"second")
    parser.feed(chunk2)
    (data2,) = drain(parser)
    assert data2.data.obj is chunk2
    assert bytes(data.data) == b"payload-1"  # earlier views still valid


def test_buffered_counts_unreturned_bytes(twin) -> None:
    fr = twin.frames
    a = write(fr.write_data, 1, b"a" * 10)
    b = write(fr.write_data, 1, b"b" * 20)
    parser = fr.FrameParser()
    assert parser.buffered == 0
    parser.feed(a + b[:15])
    assert parser.buffered == len(a) + 15
    assert bytes(next(parser).data) == b"a" * 10
    assert parser.buffered == 15
    with pytest.raises(StopIteration):
        next(parser)
    assert parser.buffered == 15  # an incomplete frame is not consumed
    parser.feed(b[15:])
    assert parser.buffered == len(b)
    assert bytes(next(parser).data) == b"b" * 20
    assert parser.buffered == 0
    parser.feed(b"")
    assert parser.buffered == 0
    assert drain(parser) == []


def test_buffered_after_skipped_unknown_frame(twin) -> None:
    parser = twin.frames.FrameParser()
    parser.feed(raw_frame(0x77, 0, 0, b"xyz") + b"\x00\x00")
    assert drain(parser) == []
    assert parser.buffered == 2


def test_iteration_stops_until_more_data(twin) -> None:
    fr = twin.frames
    wire = write(fr.write_ping, b"12345678")
    parser = fr.FrameParser()
    for i in range(len(wire) - 1):
        parser.feed(wire[i : i + 1])
        assert drain(parser) == []
        assert parser.buffered == i + 1
    parser.feed(wire[-1:])
    assert [f.type for f in drain(parser)] == [PING]


def test_all_flag_combinations_parse(twin) -> None:
    """Every value of the flag byte on every frame type parses to the masked flags (the payloads
    are valid whether or not PADDED/PRIORITY make the parser read a pad length or priority fields)."""
    fr = twin.frames
    payloads = {
        DATA: b"\x00body",
        HEADERS: b"\x00" + PRIO_BYTES + b"hdr",
        PRIORITY: PRIO_BYTES,
        RST_STREAM: U32(0),
        SETTINGS: b"",
        PUSH_PROMISE: U32(2) + b"\x00\x00",  # promises 2 unpadded, 0x200 when PADDED (pad length 0)
        PING: bytes(8),
        GOAWAY: bytes(8),
        WINDOW_UPDATE: U32(1),
        CONTINUATION: b"c",
    }
    sids = {SETTINGS: 0, PING: 0, GOAWAY: 0}
    for ftype, flags in itertools.product(sorted(payloads), range(256)):
        sid = sids.get(ftype, 1)
        prefix = write(fr.write_headers, 1, b"", end_headers=False) if ftype == CONTINUATION else b""
        f = parse_all(fr, prefix + raw_frame(ftype, flags, sid, payloads[ftype]))[-1]
        assert f.type == ftype and f.flags == flags & DEFINED_FLAGS[ftype], (ftype, flags)
