"""HPACK interop vectors (http2jp/hpack-test-case): decode every encoder's stories, round-trip the raw data."""

from __future__ import annotations

import json
from functools import cache

import hpack as ref_hpack
import pytest

from tests.codec.conftest import VECTORS

pytestmark = pytest.mark.codec

CASES_DIR = VECTORS / "hpack-test-case"
ENCODER_DIRS = sorted(d for d in CASES_DIR.glob("*") if d.is_dir() and d.name != "raw-data")
ENCODED_STORIES = [story for d in ENCODER_DIRS for story in sorted(d.glob("story_*.json"))]
RAW_STORIES = sorted((CASES_DIR / "raw-data").glob("story_*.json"))


def _story_id(path) -> str:
    return f"{path.parent.name}/{path.stem}"


@cache
def _load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _headers(case: dict) -> list[tuple[bytes, bytes]]:
    """A case's ``headers`` (a list of one-entry objects) as (name, value) bytes tuples, in order."""
    out = []
    for field in case["headers"]:
        ((name, value),) = field.items()
        out.append((name.encode("utf-8"), value.encode("utf-8")))
    return out


def _plain(headers) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in headers]


def test_vectors_present() -> None:
    # Guards the parametrizations below against silently collecting nothing.
    names = {d.name for d in ENCODER_DIRS}
    assert {"go-hpack", "nghttp2", "nghttp2-change-table-size", "nghttp2-16384-4096", "python-hpack"} <= names
    assert len(ENCODED_STORIES) >= 180
    assert len(RAW_STORIES) == 32


@pytest.mark.parametrize("story", ENCODED_STORIES, ids=_story_id)
def test_decode_story(twin, story) -> None:
    decoder = twin.hpack.Decoder()
    cases = _load(story)["cases"]
    assert cases
    for case in cases:
        if case.get("header_table_size") is not None:
            # Our SETTINGS_HEADER_TABLE_SIZE, ACKed just before this block.
            decoder.max_table_size = case["header_table_size"]
        got = decoder.decode(bytes.fromhex(case["wire"]))
        assert _plain(got) == _headers(case), f"{_story_id(story)} seqno {case['seqno']}"
        assert decoder.table_bytes <= decoder.table_size <= decoder.max_table_size


@pytest.mark.parametrize("peer_table_size", [4096, 256, 0])
@pytest.mark.parametrize("story", RAW_STORIES, ids=_story_id)
def test_encode_raw_story(twin, story, peer_table_size) -> None:
    hp = twin.hpack
    encoder = hp.Encoder()
    ours = hp.Decoder(max_table_size=peer_table_size)
    ref = ref_hpack.Decoder()
    ref.max_allowed_table_size = peer_table_size
    if peer_table_size != 4096:
        # The peer's SETTINGS_HEADER_TABLE_SIZE, applied before the first block: the
        # encoder must open with a size update, or both decoders refuse the block.
        encoder.header_table_size = peer_table_size
    # Same story through an encoder that may not index: the baseline the table has to beat.
    no_table = hp.Encoder(max_table_size=0)
    wire_total = no_table_total = 0
    cases = _load(story)["cases"]
    for seqno, case in enumerate(cases):
        headers = _headers(case)
        block = encoder.encode(headers)
        if seqno == 0 and peer_table_size != 4096:
            assert block[0] & 0xE0 == 0x20, "first block must start with a dynamic table size update"
        assert [tuple(h) for h in ref.decode(block, raw=True)] == headers, f"reference decoder, case {seqno}"
        assert _plain(ours.decode(block)) == headers, f"our decoder, case {seqno}"
        assert ref.header_table_size == encoder.table_size == ours.table_size
        assert ours.table_bytes <= peer_table_size
        wire_total += len(block)
        if peer_table_size == 4096:
            no_table_total += len(no_table.encode(headers))
    if peer_table_size == 4096 and len(cases) >= 10:
        # Stories of 10+ messages repeat most fields: the dynamic table must pay off.
        assert wire_total < no_table_total * 0.7, (wire_total, no_table_total)
