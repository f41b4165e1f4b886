"""Runs every http2-frame-test-case JSON vector (decode, re-encode, errors) on both frame codec twins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshproxy.codec.constants import (
    CONTINUATION,
    DEFAULT_WEIGHT,
    DEFINED_FLAGS,
    FLAG_PADDED,
    FLAG_PRIORITY,
    HEADERS,
)
from meshproxy.errors import H2Error
from tests.codec.conftest import VECTORS
from tests.codec.wire import drain

pytestmark = pytest.mark.codec

FRAME_VECTORS = VECTORS / "http2-frame-test-case"
CASES = sorted(FRAME_VECTORS.glob("*/*.json"))

# Every frame_payload key the vectors use, and the attribute of our frame it maps to.
# padding/padding_length and the three priority fields get dedicated handling below.
SIMPLE_FIELDS = {
    "data": "data",
    "header_block_fragment": "data",
    "error_code": "error_code",
    "settings": "settings",
    "opaque_data": "opaque_data",
    "last_stream_id": "last_stream_id",
    "additional_debug_data": "additional_data",
    "window_size_increment": "increment",
    "promised_stream_id": "promised_stream_id",
}
PADDING_FIELDS = {"padding_length", "padding"}
PRIORITY_FIELDS = {"stream_dependency", "weight", "exclusive"}


def _case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _as_bytes(value: object) -> bytes:
    # Text payloads in the vectors are plain ASCII strings.
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


def _parse_one(frames, wire: bytes, prefix: bytes = b""):
    parser = frames.FrameParser()
    parser.feed(prefix + wire)
    got = drain(parser)
    if prefix:
        assert len(got) >= 1 and got[0].type == HEADERS
        got = got[1:]
    assert len(got) == 1, f"expected exactly one frame, got {got!r}"
    assert parser.buffered == 0
    return got[0]


def test_vector_set_is_complete() -> None:
    # Guards against a moved/emptied vector directory silently collecting zero cases.
    dirs = {p.parent.name for p in CASES}
    assert {"data", "headers", "priority", "rst_stream", "settings", "push_promise", "ping", "goaway"} <= dirs
    assert {"window_update", "continuation", "error"} <= dirs
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=_case_id)
def test_vector(twin, path: Path) -> None:
    case = _load(path)
    wire = bytes.fromhex(case["wire"])
    frames = twin.frames

    if case["error"] is not None:
        assert case["frame"] is None
        parser = frames.FrameParser()
        parser.feed(wire)
        with pytest.raises(H2Error) as info:
            drain(parser)
        assert info.value.error_code in case["error"], f"{info.value!r} not in {case['error']}"
        return

    expected = case["frame"]
    prefix = b""
    if expected["type"] == CONTINUATION:
        # A CONTINUATION is only legal right after a HEADERS/PUSH_PROMISE (or CONTINUATION) without
        # END_HEADERS on the same stream (RFC 9113 §6.10); on its own it is a connection PROTOCOL_ERROR.
        # So open a header block on the vector's stream first, with an empty HEADERS fragment.
        head = bytearray()
        frames.write_headers(head, expected["stream_identifier"], b"", end_headers=False)
        prefix = bytes(head)

    frame = _parse_one(frames, wire, prefix)

    assert frame.length == expected["length"]
    assert frame.type == expected["type"]
    assert frame.flags == expected["flags"]
    assert frame.stream_id == expected["stream_identifier"]

    payload = expected["frame_payload"]
    unknown = set(payload) - set(SIMPLE_FIELDS) - PADDING_FIELDS - PRIORITY_FIELDS
    assert not unknown, f"vector field(s) without a mapping: {unknown}"

    for key, attr in SIMPLE_FIELDS.items():
        if key not in payload:
            continue
        want = payload[key]
        got = getattr(frame, attr)
        if key == "settings":
            assert [tuple(s) for s in got] == [tuple(s) for s in want]
        elif isinstance(want, str):
            assert bytes(got) == _as_bytes(want), key
        else:
            assert got == want, key

    pad_len = 0
    if PADDING_FIELDS & set(payload):
        if payload.get("padding_length") is None:
            assert payload.get("padding") is None
            assert not frame.flags & FLAG_PADDED
            if DEFINED_FLAGS[frame.type] & FLAG_PADDED:
                assert frame.pad_length == 0
                assert bytes(frame.padding) == b""
        else:
            pad_len = payload["padding_length"]
            assert frame.flags & FLAG_PADDED
            assert frame.pad_length == pad_len
            # The received padding is exposed as-is (the vector's padding is not zero).
            assert bytes(frame.padding) == _as_bytes(payload["padding"])
            assert len(frame.padding) == pad_len

    if PRIORITY_FIELDS & set(payload):
        if payload["stream_dependency"] is None:
            # HEADERS without the PRIORITY flag: the defaults of RFC 9113 §5.3.2 / RFC 7540 §5.3.5.
            assert payload["weight"] is None and payload["exclusive"] is None
            assert frame.type == HEADERS and not frame.flags & FLAG_PRIORITY
            assert (frame.depends_on, frame.weight, frame.exclusive) == (0, DEFAULT_WEIGHT, False)
        else:
            assert frame.depends_on == payload["stream_dependency"]
            assert frame.weight == payload["weight"]  # already the 1..256 value
            assert frame.exclusive is payload["exclusive"]

    out = bytearray()
    frame.serialize_into(out)
    # We always send zero padding (RFC 9113 §6.1: "Padding octets MUST be set to zero when sending"),
    # so the re-encoding matches the vector with its padding octets zeroed.
    expected_wire = wire[: len(wire) - pad_len] + bytes(pad_len) if pad_len else wire
    assert bytes(out) == expected_wire
