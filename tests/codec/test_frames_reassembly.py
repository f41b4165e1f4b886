"""A frame arriving in many small reads is held as those reads and joined once, not re-copied per read."""

from __future__ import annotations

import tracemalloc

import pytest

pytestmark = pytest.mark.codec

READ = 4096
FRAME_PAYLOAD = 1 << 20  # 1 MiB: needs SETTINGS_MAX_FRAME_SIZE above the default


def _largest_live_block() -> int:
    return max(trace.size for trace in tracemalloc.take_snapshot().traces)


def test_large_frame_in_small_reads_is_joined_once(twin):
    fr = twin.frames
    wire = bytearray()
    fr.write_data(wire, 1, bytes(range(256)) * (FRAME_PAYLOAD // 256), end_stream=True)
    fr.write_ping(wire, b"pingpong")
    wire = bytes(wire)
    reads = [wire[i : i + READ] for i in range(0, len(wire), READ)]

    parser = fr.FrameParser(max_frame_size=(1 << 24) - 1)
    tracemalloc.start()
    try:
        largest = 0
        fed = 0
        got = []
        for read in reads[:-1]:
            parser.feed(read)
            fed += len(read)
            got.extend(parser)
            assert parser.buffered == fed - sum(9 + f.length for f in got)
            if not got:
                largest = max(largest, _largest_live_block())
    finally:
        tracemalloc.stop()
    # Re-joining the partial frame on every read would keep one ever-growing
    # buffer alive (up to the whole megabyte); holding the reads keeps only
    # read-sized pieces until the frame is whole.
    assert not got
    assert largest < 4 * READ, f"a {largest}-byte buffer was live while the frame was still incomplete"

    parser.feed(reads[-1])
    data, ping = list(parser)
    assert data.type == fr.DataFrame.type and data.length == FRAME_PAYLOAD and data.end_stream
    assert bytes(data.data) == bytes(range(256)) * (FRAME_PAYLOAD // 256)
    assert ping.opaque_data == b"pingpong"
    assert parser.buffered == 0


def test_frame_header_split_across_reads_still_fails_fast(twin):
    # Holding reads must not delay the max-frame-size check: it fires as soon
    # as the 9-byte header is complete, before any payload arrives.
    fr = twin.frames
    from meshproxy.errors import FrameSizeError

    header = bytearray()
    fr.write_frame_header(header, 20_000, 0, 0, 1)
    parser = fr.FrameParser()
    for byte in bytes(header[:-1]):
        parser.feed(bytes([byte]))
        assert list(parser) == []
    parser.feed(bytes(header[-1:]))
    with pytest.raises(FrameSizeError) as info:
        next(parser)
    assert info.value.is_connection_error
