"""Header blocks over CONTINUATION frames (RFC 9113 §6.10, §4.3) and the limits against CONTINUATION floods."""

from __future__ import annotations

import h2.events
import pytest

from meshproxy._fast import conn as C
from tests.conn.peers import (
    ENHANCE_YOUR_CALM,
    POST,
    PROTOCOL_ERROR,
    REQUEST,
    RESPONSE,
    Pair,
    Raw,
    continuation,
    data,
    events_of,
    headers_frame,
    ping,
    priority,
    rst,
    the_goaway,
    window_update,
)

BIG = [*REQUEST, *[(b"x-field-%02d" % i, b"~" * 200) for i in range(40)]]


def split(block: bytes, parts: int) -> list[bytes]:
    size = -(-len(block) // parts)
    return [block[i : i + size] for i in range(0, len(block), size)]


def send_block(r: Raw, sid: int, block: bytes, parts: int, end_stream: bool = True) -> list:
    pieces = split(block, parts)
    frames = [headers_frame(sid, pieces[0], end_stream=end_stream, end_headers=len(pieces) == 1)]
    frames += [continuation(sid, p, end_headers=i == len(pieces) - 1) for i, p in enumerate(pieces[1:], 1)]
    return r.send(*frames)


def connection_error(r: Raw) -> int:
    assert not r.alive
    return the_goaway(r.read()).error_code


@pytest.mark.parametrize("parts", [2, 10, 60, 65])
def test_block_over_many_continuations_is_decoded(parts):
    r = Raw()
    block = r.block(BIG)
    send_block(r, 1, block, parts)
    (ev,) = events_of(r.events, C.EV_REQUEST)
    assert ev[1].headers == BIG and ev[1].state == "half_closed_remote", "END_STREAM came on the HEADERS frame"


def test_block_split_into_one_byte_frames():
    r = Raw()
    block = r.block(REQUEST)
    send_block(r, 1, block, len(block))
    assert events_of(r.events, C.EV_REQUEST)[0][1].headers == REQUEST


def test_empty_headers_fragment_then_continuations():
    r = Raw()
    block = r.block(REQUEST)
    r.send(headers_frame(1, b"", end_stream=True, end_headers=False), continuation(1, block, end_headers=True))
    assert events_of(r.events, C.EV_REQUEST)[0][1].headers == REQUEST


def test_block_fed_byte_by_byte():
    r = Raw()
    block = r.block(BIG)
    pieces = split(block, 5)
    raw = headers_frame(1, pieces[0], end_stream=True, end_headers=False)
    raw += b"".join(continuation(1, p, end_headers=i == len(pieces) - 1) for i, p in enumerate(pieces[1:], 1))
    for i in range(len(raw)):
        r.send_bytes(raw[i : i + 1])
    assert events_of(r.events, C.EV_REQUEST)[0][1].headers == BIG


def test_trailers_over_continuations():
    r = Raw()
    r.request(1, POST, end_stream=False)
    trailers = [(b"x-t%d" % i, b"~" * 100) for i in range(20)]
    send_block(r, 1, r.block(trailers), 4)
    assert events_of(r.events, C.EV_TRAILERS)[0][1].trailers == trailers


@pytest.mark.parametrize(
    "intruder",
    [ping(), data(1, b"x"), window_update(0, 10), priority(3, 0), rst(1, 8), headers_frame(3, b"\x82")],
    ids=["PING", "DATA", "WINDOW_UPDATE", "PRIORITY", "RST_STREAM", "HEADERS"],
)
def test_interleaved_frame_is_a_protocol_error(intruder):
    r = Raw()
    r.request(1, POST, end_stream=False)
    pieces = split(r.block(BIG), 3)
    r.send(headers_frame(3, pieces[0], end_headers=False), continuation(3, pieces[1]), intruder)
    assert connection_error(r) == PROTOCOL_ERROR


def test_unknown_frame_type_inside_a_block_is_a_protocol_error():
    r = Raw()
    pieces = split(r.block(BIG), 2)
    r.send(headers_frame(1, pieces[0], end_headers=False), b"\0\0\0\x42\0\0\0\0\x01")
    assert connection_error(r) == PROTOCOL_ERROR


def test_continuation_on_another_stream_is_a_protocol_error():
    r = Raw()
    pieces = split(r.block(BIG), 2)
    r.send(headers_frame(1, pieces[0], end_headers=False), continuation(3, pieces[1], end_headers=True))
    assert connection_error(r) == PROTOCOL_ERROR


@pytest.mark.parametrize("client", [False, True])
def test_continuation_without_headers_is_a_protocol_error(client):
    r = Raw(client=client)
    r.send(continuation(1, r.block(REQUEST), end_headers=True))
    assert connection_error(r) == PROTOCOL_ERROR


def test_continuation_after_a_complete_block_is_a_protocol_error():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.send(continuation(1, b"\x82", end_headers=True))
    assert connection_error(r) == PROTOCOL_ERROR


def test_continuation_flood_by_count_is_enhance_your_calm():
    r = Raw()
    r.send(headers_frame(1, b"", end_headers=False))
    for i in range(64):
        r.send(continuation(1, b""))
        assert r.alive, f"cut off after {i + 1} CONTINUATION frames"
    r.send(continuation(1, b""))
    assert connection_error(r) == ENHANCE_YOUR_CALM


def test_continuation_flood_by_size_is_enhance_your_calm():
    r = Raw(settings_={"max_header_list_size": 4096})  # the cap is 2 x 4096 + 16384 = 24576 octets
    r.send(headers_frame(1, b"\0" * 16000, end_headers=False))
    assert r.alive
    r.send(continuation(1, b"\0" * 8000))
    assert r.alive
    r.send(continuation(1, b"\0" * 1000))
    assert connection_error(r) == ENHANCE_YOUR_CALM


def test_flood_is_cut_off_before_the_whole_block_arrives():
    r = Raw()
    r.send(headers_frame(1, b"\x40" + b"\0" * 16000, end_headers=False))
    for _ in range(9):  # 16000 + 9 x 16384 octets > 2 x 65536 + 16384
        if not r.alive:
            break
        r.send(continuation(1, b"\0" * 16384))
    assert connection_error(r) == ENHANCE_YOUR_CALM


# -- client role, against h2 ---------------------------------------------------------------------------------------


def test_client_decodes_response_headers_split_by_h2():
    p = Pair(client=True, settings_={"max_header_list_size": 200_000})
    s = p.conn.open_stream(REQUEST, end_stream=True)
    p.pump()
    headers = [*RESPONSE, *[(b"x-r%d" % i, b"~" * 1000) for i in range(40)]]  # ~65 KB on the wire
    p.peer.send_headers(s.id, headers, end_stream=True)
    p.pump()
    assert s.headers == headers and s.state == "closed"


def test_our_split_blocks_are_accepted_by_h2():
    p = Pair(client=True)
    headers = [*REQUEST, *[(b"x-q%d" % i, b"~" * 1000) for i in range(40)]]
    s = p.conn.open_stream(headers, end_stream=True)
    p.pump()
    (req,) = p.peer_of(h2.events.RequestReceived)
    assert req.headers == headers and req.stream_id == s.id
