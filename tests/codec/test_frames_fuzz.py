"""Bounded, seeded fuzzing of the frame parser (random/mutated streams, random chunkings) on both twins."""

from __future__ import annotations

import os
import random
import struct
import time
import tracemalloc

import pytest

from meshproxy.codec import frames_py as ref
from meshproxy.codec.constants import (
    CONTINUATION,
    DEFAULT_MAX_FRAME_SIZE,
    DEFINED_FLAGS,
    MAX_MAX_FRAME_SIZE,
)
from meshproxy.errors import ErrorCode, H2Error

pytestmark = pytest.mark.codec

#: Override to reproduce a failure: the failure message prints the seed and the case number.
SEED = int(os.environ.get("MESHPROXY_FUZZ_SEED", "0x6D657368"), 0)
MAX_CASES = 3000
MIN_CASES = 400  # always run, however slow the machine: no assertion depends on timing
TIME_CAP = 4.0  # seconds per twin; cases beyond MIN_CASES stop here
MEMORY_SLACK = 2 * 1024 * 1024  # peak traced allocation allowed beyond the input's own size


# Inputs ------------------------------------------------------------------------------------------------------


def _valid_stream(rng: random.Random) -> bytearray:
    """1..10 valid frames of random types, written with the pure twin's writers."""
    b = bytearray()
    for _ in range(rng.randrange(1, 11)):
        sid = rng.choice([1, 3, rng.randrange(1, 1 << 31)])
        pad = rng.choice([None, None, 0, rng.randrange(256)])
        blob = rng.randbytes(rng.choice([0, 1, 10, rng.randrange(300)]))
        kind = rng.randrange(13)
        if kind == 0:
            ref.write_data(b, sid, blob, rng.random() < 0.5, pad)
        elif kind == 1:
            prio = rng.choice([None, (rng.randrange(1 << 31), rng.randrange(1, 257), rng.random() < 0.5)])
            end_headers = rng.random() < 0.6
            ref.write_headers(b, sid, blob, rng.random() < 0.5, end_headers, pad, prio)
            for i in range(0 if end_headers else rng.randrange(1, 4)):
                ref.write_continuation(b, sid, rng.randbytes(rng.randrange(20)), i == 2 or rng.random() < 0.5)
        elif kind == 2:
            ref.write_priority(b, sid, rng.randrange(1 << 31), rng.randrange(1, 257), rng.random() < 0.5)
        elif kind == 3:
            ref.write_rst_stream(b, sid, rng.randrange(1 << 32))
        elif kind == 4:
            ref.write_settings(b, [(rng.randrange(1, 7), rng.randrange(1 << 15)) for _ in range(rng.randrange(4))])
        elif kind == 5:
            ref.write_push_promise(b, sid, rng.randrange(1, 1 << 30) * 2, blob, True, pad)
        elif kind == 6:
            ref.write_ping(b, rng.randbytes(8), rng.random() < 0.5)
        elif kind == 7:
            ref.write_goaway(b, rng.randrange(1 << 31), rng.randrange(1 << 32), blob[:40])
        elif kind == 8:
            ref.write_window_update(b, rng.choice([0, sid]), rng.randrange(1, 1 << 31))
        elif kind == 9:
            ref.write_header_block(b, sid, rng.randbytes(rng.randrange(40000)), rng.random() < 0.5)
        elif kind == 10:  # an unknown extension frame
            ref.write_frame_header(b, len(blob), rng.randrange(10, 256), rng.randrange(256), rng.randrange(1 << 31))
            b += blob
        elif kind == 11:
            ref.write_settings(b, ack=True)
        else:  # a frame that is only a *stream* error; the parser must carry on after it
            bad = rng.randrange(3)
            if bad == 0:  # PRIORITY on a stream that depends on itself
                b += struct.pack(">BHBBLLB", 0, 5, 2, 0, sid, sid, 0)
            elif bad == 1:  # PRIORITY of a length other than 5
                n = rng.choice([0, 4, 6, 9])
                b += struct.pack(">BHBBL", 0, n, 2, 0, sid) + bytes(n)
            else:  # WINDOW_UPDATE with a zero increment on a stream
                b += struct.pack(">BHBBLL", 0, 4, 8, 0, sid, 0)
    return b


def _mutate(rng: random.Random, b: bytearray) -> bytearray:
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(8)
        if not b:
            b += rng.randbytes(rng.randrange(1, 30))
        elif op == 0:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # overwrite an octet
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 3:  # delete a run
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 12)]
        elif op == 4:  # insert garbage
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 12))
        elif op == 5:  # splice in a random frame header (wild length, type, flags, stream id)
            i = rng.randrange(len(b) + 1)
            length = rng.choice([0, 1, 5, 8, rng.randrange(64), rng.randrange(1 << 24)])
            b[i:i] = struct.pack(
                ">BHBBL", length >> 16, length & 0xFFFF, rng.randrange(12), rng.randrange(256), rng.randrange(1 << 32)
            )
        elif op == 6:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randrange(1, 40)]
        else:  # set the flag byte of the first header to something arbitrary
            if len(b) > 4:
                b[4] = rng.randrange(256)
    return b


def make_case(rng: random.Random) -> tuple[bytes, list[int], int]:
    kind = rng.randrange(10)
    if kind == 0:
        data = rng.randbytes(rng.randrange(0, 256))
    elif kind <= 3:
        data = bytes(_valid_stream(rng))
    else:
        data = bytes(_mutate(rng, _valid_stream(rng)))
    max_frame_size = rng.choice(
        [DEFAULT_MAX_FRAME_SIZE] * 4 + [rng.randrange(DEFAULT_MAX_FRAME_SIZE, 70000), MAX_MAX_FRAME_SIZE]
    )
    how = rng.randrange(4)
    if how == 0 or not data:
        sizes = [len(data)]
    elif how == 1 and len(data) <= 2000:
        sizes = [1] * len(data)
    else:
        sizes, left = [], len(data)
        while left:
            n = min(left, rng.choice([1, 2, 8, 9, 10, rng.randrange(1, 100), rng.randrange(1, 20000)]))
            sizes.append(n)
            left -= n
    return data, sizes, max_frame_size


# Running one case --------------------------------------------------------------------------------------------


def _frame_len(buf: bytes, pos: int) -> int | None:
    if len(buf) - pos < 9:
        return None
    return int.from_bytes(buf[pos : pos + 3], "big")


def run_case(frames, data: bytes, sizes: list[int], max_frame_size: int, stats: dict) -> None:
    parser = frames.FrameParser(max_frame_size=max_frame_size)
    fed = 0
    calls = 0
    for size in sizes:
        chunk = data[fed : fed + size]
        parser.feed(chunk)
        fed += size
        while True:
            before = parser.buffered
            pos = fed - before  # offset in ``data`` of the next unparsed byte
            calls += 1
            # Progress: each call either returns a frame, raises, or stops, and every call that does not stop
            # consumes at least one 9-octet header; so calls are bounded by the bytes fed plus one stop per chunk.
            assert calls <= fed // 9 + len(sizes) + 1, "parser is not making progress"
            try:
                f = next(parser)
            except StopIteration:
                after = parser.buffered
                assert after <= before  # only skipped (unknown-type) frames may have been consumed
                rest = fed - after
                n = _frame_len(data[:fed], rest)
                assert n is None or 9 + n > after, "stopped although a whole frame was buffered"
                assert n is None or n <= max_frame_size, "an oversized header went unreported"
                break
            except H2Error as exc:
                assert isinstance(exc.error_code, ErrorCode)
                if exc.stream_id is None:
                    stats["connection_errors"] += 1
                    return  # a connection error ends the connection: stop this stream
                stats["stream_errors"] += 1
                assert 0 < exc.stream_id <= 0x7FFF_FFFF
                # A stream error leaves the parser after the offending frame.
                assert parser.buffered <= before - 9
                continue
            stats["frames"] += 1
            after = parser.buffered
            assert 0 <= f.type <= CONTINUATION
            assert f.flags & ~DEFINED_FLAGS[f.type] == 0
            assert 0 <= f.stream_id <= 0x7FFF_FFFF
            assert f.length <= max_frame_size
            # The frame ends exactly where the parser now stands, and its header says so.
            end = fed - after
            start = end - 9 - f.length
            assert start >= pos
            assert _frame_len(data, start) == f.length and data[start + 3] == f.type
            if hasattr(f, "data"):
                assert len(f.data) <= f.length
    assert fed == len(data)


# The test ----------------------------------------------------------------------------------------------------


def test_fuzz_parser(twin) -> None:
    master = random.Random(SEED)
    stats = {"cases": 0, "frames": 0, "stream_errors": 0, "connection_errors": 0}
    deadline = time.monotonic() + TIME_CAP
    tracemalloc.start()
    try:
        for i in range(MAX_CASES):
            if i >= MIN_CASES and time.monotonic() > deadline:
                break
            case_seed = master.getrandbits(64)
            data, sizes, max_frame_size = make_case(random.Random(case_seed))
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                run_case(twin.frames, data, sizes, max_frame_size, stats)
            except Exception as exc:  # anything but an H2Error escaping run_case is a bug
                pytest.fail(
                    f"fuzz case failed: MESHPROXY_FUZZ_SEED={SEED:#x} case={i} case_seed={case_seed:#x} "
                    f"max_frame_size={max_frame_size} chunks={len(sizes)} input[:200]={data[:200].hex()} "
                    f"-> {type(exc).__name__}: {exc}"
                )
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak <= len(data) + MEMORY_SLACK, (
                f"MESHPROXY_FUZZ_SEED={SEED:#x} case={i}: peak {peak} bytes for a {len(data)}-byte input"
            )
            stats["cases"] += 1
    finally:
        tracemalloc.stop()
    print(f"fuzz[{twin.name}] seed={SEED:#x} {stats}")
    assert stats["cases"] >= MIN_CASES
    # A fuzzer that never gets past the first header, or never trips a rule, would prove nothing.
    assert stats["frames"] > 20 * stats["cases"] // 10
    assert stats["connection_errors"] > stats["cases"] // 10
    assert stats["stream_errors"] > stats["cases"] // 10


@pytest.mark.parametrize("read_size", [1, 3])
def test_large_frame_in_tiny_reads_has_bounded_memory(twin, read_size) -> None:
    # A peer can trickle a frame (up to the SETTINGS_MAX_FRAME_SIZE we advertise, at most 16 MiB) a few octets
    # per read. Holding those reads must cost memory in proportion to the frame, not to the number of reads.
    payload = bytes(range(256)) * 512  # 128 KiB
    wire = bytearray()
    ref.write_data(wire, 1, payload, True)
    wire = bytes(wire)
    reads = [wire[i : i + read_size] for i in range(0, len(wire), read_size)]
    first, last = reads[:-1], reads[-1]  # allocated before tracing starts
    parser = twin.frames.FrameParser(max_frame_size=MAX_MAX_FRAME_SIZE)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for read in first:
            parser.feed(read)
            if next(parser, None) is not None:
                pytest.fail("a frame was returned before its last octet arrived")
        parser.feed(last)
        frame = next(parser)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert bytes(frame.data) == payload and parser.buffered == 0
    assert peak <= len(wire) + MEMORY_SLACK, f"peak {peak} bytes for a {len(wire)}-byte frame in {len(reads)} reads"
