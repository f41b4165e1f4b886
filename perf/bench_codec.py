"""Benchmark meshproxy's compiled HTTP/2 codec (frame parsing, HPACK decode/encode) against hyperframe and hpack.

Measures, in one run and on identical inputs:

* frames parsed per second on a realistic gRPC client byte stream (HEADERS, DATA,
  WINDOW_UPDATE, PING, SETTINGS mixed), serialized by hyperframe so neither side
  builds its own input; ours is fed in 64 KiB reads (and, for information, 4 KiB);
  measured as parse only, and as parse + a consumer reading every frame's fields;
* HPACK header blocks decoded per second, for the blocks of N gRPC requests on
  one connection as produced by ``hpack.Encoder``;
* HPACK header blocks encoded per second, for the same N header lists.

"Ours" is the compiled twin (``meshproxy.codec.compiled()``). If it is not built
the script exits with status 2, unless ``--allow-pure`` is given, in which case
the pure-Python twin is measured in its place and labelled so. The pure twin is
always measured too, for information only (it is not part of any speedup).

Usage::

    .venv/bin/python perf/bench_codec.py            # table, ~15-25 s
    .venv/bin/python perf/bench_codec.py --json     # one JSON object on stdout
    .venv/bin/python perf/bench_codec.py --quick --allow-pure   # smoke run, ~2 s
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]

# Frame types and the END_STREAM/ACK flag bit (RFC 9113 §6); hyperframe's
# ``Frame.type`` uses the same numbers.
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x6, 0x8
FLAG_END_STREAM_OR_ACK = 0x1

SEED = 20240611
AUTHORITY = b"greeter.default.svc.cluster.local:50051"
USER_AGENT = b"grpc-python/1.62.1 grpc-c/39.0.0 (linux; chttp2)"
#: (path, weight): a Greeter service, a route guide and health checks.
GRPC_METHODS = (
    (b"/helloworld.Greeter/SayHello", 6),
    (b"/helloworld.Greeter/SayHelloAgain", 2),
    (b"/routeguide.RouteGuide/GetFeature", 3),
    (b"/grpc.health.v1.Health/Check", 1),
)

Header = tuple[bytes, bytes]
HeaderList = list[Header]


class Digest(NamedTuple):
    """What a frame-parsing pass saw; both sides must agree on every field."""

    frames: int
    payload_bytes: int  # len(data) of DATA/HEADERS + len(opaque_data) of PING
    stream_id_sum: int
    end_stream_or_ack: int
    increment_sum: int
    settings: int


@dataclass
class Workload:
    """The inputs every side is measured on, built once and deterministically."""

    requests: list[HeaderList]  # one header list per gRPC call
    blocks: list[bytes]  # hpack.Encoder blocks for ``requests``, one connection
    stream: bytes  # the client's frames, serialized by hyperframe
    expected: Digest  # what parsing ``stream`` must yield


@dataclass
class Side:
    """One contender in one benchmark: a zero-argument callable doing one iteration."""

    label: str
    run: Callable[[], Any]
    check: Callable[[Any], Any] | None = None  # maps run()'s result to a Digest, for verification
    items: int = 0  # items (frames or blocks) per iteration, set on verification
    number: int = 1  # iterations per timed repeat, set by calibration
    times: list[float] = field(default_factory=list)  # seconds per iteration, one per repeat

    @property
    def best(self) -> float:
        """Items per second of the fastest repeat."""
        return self.items / min(self.times)

    @property
    def median(self) -> float:
        """Items per second of the median repeat."""
        return self.items / statistics.median(self.times)


class BenchError(Exception):
    """A setup or verification failure: reported on one line, exit status 1 or 2."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- modules


def load_codecs(allow_pure: bool) -> tuple[ModuleType, ModuleType, ModuleType, ModuleType, bool]:
    """Return ``(frames, hpack, pure_frames, pure_hpack, compiled)`` for ours and the pure twin.

    ``meshproxy`` is imported as installed if it can be; otherwise from this
    checkout. Without the compiled twin, raises (status 2) unless ``allow_pure``.
    """
    try:
        codec = importlib.import_module("meshproxy.codec")
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        codec = importlib.import_module("meshproxy.codec")
    pure_frames, pure_hpack = codec.pure()
    mods = codec.compiled()
    if mods is not None:
        return mods[0], mods[1], pure_frames, pure_hpack, True
    if not allow_pure:
        raise BenchError(
            "compiled codec twin (meshproxy._fast.frames/hpack) is not built: build it (`pip install -e .`) "
            "or pass --allow-pure to benchmark the pure-Python twin in its place",
            status=2,
        )
    return pure_frames, pure_hpack, pure_frames, pure_hpack, False


def load_reference() -> tuple[ModuleType, ModuleType]:
    """Return the reference libraries ``(hyperframe.frame, hpack)``, or raise (status 2)."""
    try:
        hf_frame = importlib.import_module("hyperframe.frame")
        ref_hpack = importlib.import_module("hpack")
    except ImportError as exc:
        raise BenchError(f"reference library missing ({exc}): pip install hyperframe hpack", status=2) from exc
    return hf_frame, ref_hpack


# --------------------------------------------------------------------------- workload


def make_requests(count: int, rng: random.Random) -> list[HeaderList]:
    """Header lists of ``count`` unary gRPC requests, as a grpc client sends them.

    Everything repeats call to call except the method and the grpc-timeout, which
    (like grpc-go's) is the time left to a ~5 s deadline in microseconds.
    """
    paths = [p for p, _ in GRPC_METHODS]
    weights = [w for _, w in GRPC_METHODS]
    return [
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", rng.choices(paths, weights)[0]),
            (b":authority", AUTHORITY),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-accept-encoding", b"identity,deflate,gzip"),
            (b"user-agent", USER_AGENT),
            (b"grpc-timeout", b"%du" % rng.randrange(4_990_000, 5_000_000)),
        ]
        for _ in range(count)
    ]


def encode_reference_blocks(ref_hpack: ModuleType, requests: Sequence[HeaderList]) -> list[bytes]:
    """Encode ``requests`` in order with one ``hpack.Encoder``, as on one connection."""
    encoder = ref_hpack.Encoder()
    return [encoder.encode(headers) for headers in requests]


def build_stream(hf_frame: ModuleType, blocks: Sequence[bytes], rng: random.Random) -> tuple[bytes, Digest]:
    """Serialize a gRPC client's connection traffic with hyperframe; return it and its expected digest.

    One unary call per block on odd stream ids: HEADERS (END_HEADERS), DATA with a
    length-prefixed 20-200 byte message (END_STREAM), a connection WINDOW_UPDATE
    for the response; every 16 calls a PING (BDP probe) and, 8 calls later, a
    PING ACK; SETTINGS and their ACKs at the start and every 100 calls.
    """
    frames: list[Any] = []

    def settings(values: dict[int, int] | None = None, ack: bool = False) -> None:
        f = hf_frame.SettingsFrame(0, values)
        if ack:
            f.flags.add("ACK")
        frames.append(f)

    def ping(ack: bool) -> None:
        f = hf_frame.PingFrame(0, rng.randbytes(8))
        if ack:
            f.flags.add("ACK")
        frames.append(f)

    # SETTINGS_ENABLE_PUSH=0, INITIAL_WINDOW_SIZE=4 MiB, MAX_HEADER_LIST_SIZE=16 KiB.
    settings({0x2: 0, 0x4: 4 << 20, 0x6: 16 << 10})
    frames.append(hf_frame.WindowUpdateFrame(0, window_increment=(4 << 20) - 65535))
    for i, block in enumerate(blocks):
        sid = 2 * i + 1
        frames.append(hf_frame.HeadersFrame(sid, block, flags=["END_HEADERS"]))
        message = rng.randbytes(rng.randrange(20, 201))
        frames.append(hf_frame.DataFrame(sid, b"\0" + len(message).to_bytes(4, "big") + message, flags=["END_STREAM"]))
        frames.append(hf_frame.WindowUpdateFrame(0, window_increment=rng.randrange(40, 400)))
        if i == 0:
            settings(ack=True)  # the server's SETTINGS arrived meanwhile
        if i % 16 == 8:
            ping(ack=False)
        elif i % 16 == 0 and i:
            ping(ack=True)
        if i % 100 == 50:
            settings({0x4: (4 << 20) + i})  # a BDP-driven window change
        elif i % 100 == 51:
            settings(ack=True)

    payload = 0
    for f in frames:
        payload += len(f.data) if f.type in (DATA, HEADERS) else len(f.opaque_data) if f.type == PING else 0
    expected = Digest(
        frames=len(frames),
        payload_bytes=payload,
        stream_id_sum=sum(f.stream_id for f in frames),
        end_stream_or_ack=sum(1 for f in frames if "END_STREAM" in f.flags or "ACK" in f.flags),
        increment_sum=sum(f.window_increment for f in frames if f.type == WINDOW_UPDATE),
        settings=sum(len(f.settings) for f in frames if f.type == SETTINGS),
    )
    return b"".join(f.serialize() for f in frames), expected


def build_workload(hf_frame: ModuleType, ref_hpack: ModuleType, calls: int, blocks: int) -> Workload:
    """Build the requests, their reference HPACK blocks and the frame stream."""
    rng = random.Random(SEED)
    requests = make_requests(max(calls, blocks), rng)
    encoded = encode_reference_blocks(ref_hpack, requests)
    stream, expected = build_stream(hf_frame, encoded[:calls], rng)
    return Workload(requests=requests[:blocks], blocks=encoded[:blocks], stream=stream, expected=expected)


def chunked(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into reads of ``size`` bytes, as a socket would return them."""
    return [data[i : i + size] for i in range(0, len(data), size)]


# --------------------------------------------------------------------------- the measured work
#
# Frames are measured two ways. "Parse" (the headline frame_parse_speedup):
# each library turns the stream into a list of fully parsed frame objects in
# its natural form (hyperframe's header-then-body loop; our iterator), and the
# frames are checked untimed afterwards. "Parse + read": the same, with a
# Python consumer reading type, stream id, flags and the payload field of
# every frame; the consumer's bytecode costs the same on both sides, and it
# forces our lazily sliced ``data`` views to be made. The read loops are
# written out twice on purpose: a shared accessor would add a call per frame
# to both sides and blur the comparison.


def collect_ours(parser_class: type, chunks: Sequence[bytes]) -> list:
    """Parse only: feed ``chunks`` to a fresh ``FrameParser`` and collect every frame it yields."""
    parser = parser_class()
    out: list = []
    for chunk in chunks:
        parser.feed(chunk)
        out.extend(parser)
    return out


def collect_reference(parse_frame_header: Callable, stream: bytes) -> list:
    """Parse only: hyperframe's header-then-body loop over ``stream``, collecting every frame."""
    mv = memoryview(stream)
    end = len(stream)
    pos = 0
    out = []
    while pos < end:
        f, length = parse_frame_header(mv[pos : pos + 9])
        pos += 9
        f.parse_body(mv[pos : pos + length])
        pos += length
        out.append(f)
    return out


def digest(frames: Sequence[Any], increment: str, flagged: Callable[[Any], bool]) -> Digest:
    """The Digest of a list of parsed frames (untimed verification); ``increment`` names
    the WINDOW_UPDATE field and ``flagged`` tests END_STREAM/ACK, which the libraries spell differently."""
    return Digest(
        frames=len(frames),
        payload_bytes=sum(len(f.data) for f in frames if f.type in (DATA, HEADERS))
        + sum(len(f.opaque_data) for f in frames if f.type == PING),
        stream_id_sum=sum(f.stream_id for f in frames),
        end_stream_or_ack=sum(1 for f in frames if flagged(f)),
        increment_sum=sum(getattr(f, increment) for f in frames if f.type == WINDOW_UPDATE),
        settings=sum(len(f.settings) for f in frames if f.type == SETTINGS),
    )


def digest_ours(frames: Sequence[Any]) -> Digest:
    """The Digest of frames collected by ``collect_ours``."""
    return digest(frames, "increment", lambda f: bool(f.flags & FLAG_END_STREAM_OR_ACK))


def digest_reference(frames: Sequence[Any]) -> Digest:
    """The Digest of frames collected by ``collect_reference``."""
    return digest(frames, "window_increment", lambda f: "END_STREAM" in f.flags or "ACK" in f.flags)


def parse_ours(parser_class: type, chunks: Sequence[bytes]) -> Digest:
    """Feed ``chunks`` to a fresh ``FrameParser``, iterating after each read."""
    parser = parser_class()
    frames = payload = sids = flagged = increments = settings = 0
    for chunk in chunks:
        parser.feed(chunk)
        for f in parser:
            frames += 1
            t = f.type
            sids += f.stream_id
            if f.flags & FLAG_END_STREAM_OR_ACK:
                flagged += 1
            if t == DATA or t == HEADERS:
                payload += len(f.data)
            elif t == WINDOW_UPDATE:
                increments += f.increment
            elif t == PING:
                payload += len(f.opaque_data)
            elif t == SETTINGS:
                settings += len(f.settings)
    if parser.buffered:
        raise BenchError(f"FrameParser left {parser.buffered} bytes unparsed")
    return Digest(frames, payload, sids, flagged, increments, settings)


def parse_reference(parse_frame_header: Callable, stream: bytes) -> Digest:
    """Parse ``stream`` with hyperframe: header then body, frame after frame."""
    mv = memoryview(stream)
    end = len(stream)
    pos = 0
    frames = payload = sids = flagged = increments = settings = 0
    while pos < end:
        f, length = parse_frame_header(mv[pos : pos + 9])
        pos += 9
        f.parse_body(mv[pos : pos + length])
        pos += length
        frames += 1
        t = f.type
        sids += f.stream_id
        fl = f.flags
        if "END_STREAM" in fl or "ACK" in fl:
            flagged += 1
        if t == DATA or t == HEADERS:
            payload += len(f.data)
        elif t == WINDOW_UPDATE:
            increments += f.window_increment
        elif t == PING:
            payload += len(f.opaque_data)
        elif t == SETTINGS:
            settings += len(f.settings)
    return Digest(frames, payload, sids, flagged, increments, settings)


def decode_ours(decoder_class: type, blocks: Sequence[bytes]) -> list[list[Header]]:
    """Decode ``blocks`` in order with a fresh meshproxy ``Decoder``."""
    decode = decoder_class().decode
    return [decode(block) for block in blocks]


def decode_reference(decoder_class: type, blocks: Sequence[bytes]) -> list[list[Header]]:
    """Decode ``blocks`` in order with a fresh ``hpack.Decoder`` (``raw=True``: bytes out, like ours)."""
    decode = decoder_class().decode
    return [decode(block, raw=True) for block in blocks]


def encode_all(encoder_class: type, requests: Sequence[HeaderList]) -> list[bytes]:
    """Encode ``requests`` in order with a fresh encoder (same call for ours and hpack)."""
    encode = encoder_class().encode
    return [encode(headers) for headers in requests]


# --------------------------------------------------------------------------- verification


def as_tuples(header_lists: Sequence[Sequence[Sequence[bytes]]]) -> list[list[tuple[bytes, ...]]]:
    """Normalize decoded header lists (HeaderTuple, NeverIndexed...) to plain tuples."""
    return [[tuple(h) for h in headers] for headers in header_lists]


def verify_frames(sides: Sequence[Side], expected: Digest) -> None:
    """Run each frame side once; every one must see exactly the frames that were serialized."""
    for side in sides:
        got = side.run()
        if side.check is not None:
            got = side.check(got)
        if got != expected:
            raise BenchError(f"frame parse mismatch: {side.label} saw {got}, expected {expected}")
        side.items = got.frames


def verify_decode(sides: Sequence[Side], requests: Sequence[HeaderList]) -> None:
    """Run each decode side once; every one must give back the encoded header lists."""
    for side in sides:
        if as_tuples(side.run()) != requests:
            raise BenchError(f"hpack decode mismatch: {side.label} did not decode the reference blocks to the input")
        side.items = len(requests)


def verify_encode(sides: Sequence[Side], requests: Sequence[HeaderList], ref_decoder: type) -> dict[str, int]:
    """Run each encode side once; the reference decoder must decode its blocks back to the input.

    Returns the total encoded size per side, in bytes.
    """
    sizes = {}
    for side in sides:
        blocks = side.run()
        if as_tuples(decode_reference(ref_decoder, blocks)) != requests:
            raise BenchError(f"hpack encode mismatch: hpack.Decoder does not decode {side.label}'s blocks to the input")
        side.items = len(requests)
        sizes[side.label] = sum(map(len, blocks))
    return sizes


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def measure(sides: Sequence[Side], repeats: int, min_time: float) -> None:
    """Warm up and calibrate every side, then time ``repeats`` interleaved rounds.

    Each round times every side once (order alternating round to round), each
    repeat running for at least ``min_time`` seconds; gc is off while timing.
    """
    for side in sides:
        side.run()  # warm up: caches, lazy imports, allocator
        side.number = max(1, math.ceil(min_time / max(timed(side.run, 1), 1e-9)))
        side.times = []
    was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            for side in sides if r % 2 == 0 else reversed(sides):
                gc.collect()
                gc.disable()
                side.times.append(timed(side.run, side.number))
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- CPU pinning


def pin_cpu(requested: int | None) -> tuple[list[int] | None, int | None]:
    """Pin to ``requested`` (or to the only CPU allowed); return ``(affinity, pinned_cpu)``."""
    if not hasattr(os, "sched_getaffinity"):
        if requested is not None:
            raise BenchError("--pin needs os.sched_setaffinity, which this platform lacks", status=2)
        return None, None
    if requested is not None:
        try:
            os.sched_setaffinity(0, {requested})
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot pin to CPU {requested}: {exc}", status=2) from exc
    affinity = sorted(os.sched_getaffinity(0))
    if len(affinity) == 1:
        os.sched_setaffinity(0, set(affinity))
        return affinity, affinity[0]
    return affinity, None


# --------------------------------------------------------------------------- reporting


def ratio(ours: Side, reference: Side) -> float:
    """Speedup of ours over the reference from the best repeats (higher is better)."""
    return ours.best / reference.best


def build_report(
    args: argparse.Namespace,
    work: Workload,
    benches: dict[str, dict[str, Side]],
    encoded_sizes: dict[str, int],
    ours_compiled: bool,
    frames_module: ModuleType,
    affinity: list[int] | None,
    pinned: int | None,
) -> dict[str, Any]:
    """The JSON object: speedups, raw best rates, medians, and how they were obtained."""
    frames, dec, enc = benches["frames"], benches["decode"], benches["encode"]
    rated = {
        "frames_per_s_ours": frames["ours"],
        "frames_per_s_ours_4k": frames["ours_4k"],
        "frames_per_s_reference": frames["reference"],
        "frames_per_s_pure": frames["pure"],
        "frames_read_per_s_ours": benches["frames_read"]["ours"],
        "frames_read_per_s_reference": benches["frames_read"]["reference"],
        **{f"hpack_decode_blocks_per_s_{name}": side for name, side in dec.items()},
        **{f"hpack_encode_blocks_per_s_{name}": side for name, side in enc.items()},
    }
    return {
        "frame_parse_speedup": ratio(frames["ours"], frames["reference"]),
        "frame_parse_speedup_4k": ratio(frames["ours_4k"], frames["reference"]),
        "frame_parse_read_speedup": ratio(benches["frames_read"]["ours"], benches["frames_read"]["reference"]),
        "hpack_decode_speedup": ratio(dec["ours"], dec["reference"]),
        "hpack_encode_speedup": ratio(enc["ours"], enc["reference"]),
        **{key: side.best for key, side in rated.items()},
        "medians": {key: side.median for key, side in rated.items()},
        "twin": "compiled" if ours_compiled else "pure",
        "ours_module": getattr(frames_module, "__file__", frames_module.__name__),
        "pure_measured_separately": ours_compiled,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cpu_affinity": affinity,
        "pinned_cpu": pinned,
        "calls": args.calls,
        "stream_bytes": len(work.stream),
        "frames": work.expected.frames,
        "frame_payload_bytes": work.expected.payload_bytes,
        "frames_counted": {name: side.items for name, side in frames.items()},
        "hpack_blocks": len(work.blocks),
        "hpack_blocks_counted": {
            "decode": {name: side.items for name, side in dec.items()},
            "encode": {name: side.items for name, side in enc.items()},
        },
        "hpack_reference_block_bytes": sum(map(len, work.blocks)),
        "hpack_encoded_bytes": {name: encoded_sizes[side.label] for name, side in enc.items()},
        "repeats": args.repeats,
        "min_time_s": args.min_time,
    }


def format_table(report: dict[str, Any], benches: dict[str, dict[str, Side]]) -> str:
    """The human-readable table: best and median rates, ns per item, speedups."""
    twin = report["twin"]
    pinned = report["pinned_cpu"]
    lines = [
        f"meshproxy codec benchmark: ours = {twin} twin ({report['ours_module']})",
        f"Python {report['python']} ({report['python_implementation']}), "
        f"CPU affinity {report['cpu_affinity']}, {'not pinned' if pinned is None else f'pinned to CPU {pinned}'}, "
        f"{report['repeats']} repeats of >= {report['min_time_s']} s per side, gc off while timing",
        f"frame stream: {report['calls']} gRPC calls, {report['frames']} frames, {report['stream_bytes']} bytes; "
        f"hpack: {report['hpack_blocks']} request blocks on one connection",
    ]
    if twin == "pure":
        lines.append("NOTE: compiled twin not built -- 'ours' is the PURE-PYTHON twin (--allow-pure)")
    header = f"{'benchmark':<14} {'side':<32} {'best/s':>12} {'median/s':>12} {'ns/item':>9}"
    lines += ["", header, "-" * len(header)]
    titles = {
        "frames": ("frame parse", "frames"),
        "frames_read": ("parse + read", "frames"),
        "decode": ("hpack decode", "blocks"),
        "encode": ("hpack encode", "blocks"),
    }
    speedups = {
        "frames": f"{report['frame_parse_speedup']:.2f}x (4 KiB reads: {report['frame_parse_speedup_4k']:.2f}x)",
        "frames_read": f"{report['frame_parse_read_speedup']:.2f}x",
        "decode": f"{report['hpack_decode_speedup']:.2f}x",
        "encode": f"{report['hpack_encode_speedup']:.2f}x",
    }
    for key, sides in benches.items():
        title, unit = titles[key]
        for i, (name, side) in enumerate(sides.items()):
            if name == "pure" and side is sides.get("ours"):
                continue  # ours is the pure twin: already shown
            name = title if i == 0 else ""
            lines.append(
                f"{name:<14} {side.label:<32} {side.best:>12,.0f} {side.median:>12,.0f} {1e9 / side.best:>9,.0f}"
            )
        lines.append(f"{'':<14} speedup ours/reference ({unit}/s, best): {speedups[key]}")
    sizes = report["hpack_encoded_bytes"]
    lines.append("")
    lines.append(
        f"hpack encoded size for the {report['hpack_blocks']} blocks: ours {sizes['ours']} B, "
        f"reference {sizes['reference']} B, pure {sizes['pure']} B"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the defaults for a ~2 s smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quick", action="store_true", help="smoke run (~2 s): fewer calls, repeats and shorter repeats")
    p.add_argument(
        "--allow-pure", action="store_true", help="if the compiled twin is not built, measure the pure twin as 'ours'"
    )
    p.add_argument("--pin", type=int, metavar="CPU", help="pin the process to this CPU (os.sched_setaffinity)")
    p.add_argument("--calls", type=int, help="gRPC calls in the frame stream (default 1000; quick 200)")
    p.add_argument("--blocks", type=int, help="header blocks per HPACK iteration (default 100; quick 50)")
    p.add_argument("--repeats", type=int, help="timed repeats per side (default 7; quick 3)")
    p.add_argument("--min-time", type=float, help="minimum seconds per repeat (default 0.2; quick 0.02)")
    args = p.parse_args(argv)
    defaults = (200, 50, 3, 0.02) if args.quick else (1000, 100, 7, 0.2)
    for name, default in zip(("calls", "blocks", "repeats", "min_time"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.calls < 1 or args.blocks < 1 or args.repeats < 1 or args.min_time <= 0:
        p.error("--calls, --blocks, --repeats and --min-time must be positive")
    return args


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Side]]]:
    """Set up, verify and measure everything; return the report and the measured sides."""
    affinity, pinned = pin_cpu(args.pin)
    frames_mod, hpack_mod, pure_frames, pure_hpack, ours_compiled = load_codecs(args.allow_pure)
    hf_frame, ref_hpack = load_reference()
    work = build_workload(hf_frame, ref_hpack, args.calls, args.blocks)

    ours = "ours (compiled)" if ours_compiled else "ours (PURE twin)"
    chunks_64k, chunks_4k = chunked(work.stream, 64 << 10), chunked(work.stream, 4 << 10)
    parse_header = hf_frame.Frame.parse_frame_header
    blocks, requests = work.blocks, work.requests
    frames = {
        "ours": Side(
            f"{ours}, 64 KiB reads",
            lambda: collect_ours(frames_mod.FrameParser, chunks_64k),
            check=digest_ours,
        ),
        "ours_4k": Side(
            f"{ours}, 4 KiB reads", lambda: collect_ours(frames_mod.FrameParser, chunks_4k), check=digest_ours
        ),
        "reference": Side(
            "reference (hyperframe)", lambda: collect_reference(parse_header, work.stream), check=digest_reference
        ),
    }
    frames_read = {
        "ours": Side(f"{ours}, 64 KiB reads", lambda: parse_ours(frames_mod.FrameParser, chunks_64k)),
        "reference": Side("reference (hyperframe)", lambda: parse_reference(parse_header, work.stream)),
    }
    decode = {
        "ours": Side(ours, lambda: decode_ours(hpack_mod.Decoder, blocks)),
        "reference": Side("reference (hpack)", lambda: decode_reference(ref_hpack.Decoder, blocks)),
    }
    encode = {
        "ours": Side(ours, lambda: encode_all(hpack_mod.Encoder, requests)),
        "reference": Side("reference (hpack)", lambda: encode_all(ref_hpack.Encoder, requests)),
    }
    if ours_compiled:
        frames["pure"] = Side(
            "pure twin (info), 64 KiB reads",
            lambda: collect_ours(pure_frames.FrameParser, chunks_64k),
            check=digest_ours,
        )
        decode["pure"] = Side("pure twin (info)", lambda: decode_ours(pure_hpack.Decoder, blocks))
        encode["pure"] = Side("pure twin (info)", lambda: encode_all(pure_hpack.Encoder, requests))
    benches = {"frames": frames, "frames_read": frames_read, "decode": decode, "encode": encode}

    verify_frames(list(frames.values()), work.expected)
    verify_frames(list(frames_read.values()), work.expected)
    verify_decode(list(decode.values()), requests)
    encoded_sizes = verify_encode(list(encode.values()), requests, ref_hpack.Decoder)
    for key, sides in benches.items():
        measure(list(sides.values()), args.repeats, args.min_time)
        if key != "frames_read":
            sides.setdefault("pure", sides["ours"])  # ours is the pure twin: same measurement
    report = build_report(args, work, benches, encoded_sizes, ours_compiled, frames_mod, affinity, pinned)
    return report, benches


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the table or the JSON object; return the exit status."""
    args = parse_args(argv)
    try:
        report, benches = run(args)
    except BenchError as exc:
        print(f"bench_codec: {exc}", file=sys.stderr)
        return exc.status
    print(json.dumps(report, indent=2) if args.json else format_table(report, benches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
