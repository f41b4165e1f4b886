"""Flow control (RFC 9113 §5.2, §6.9): the windows we enforce on the peer, and the ones we obey."""

from __future__ import annotations

import h2.events
import pytest
from hyperframe.frame import DataFrame, HeadersFrame, WindowUpdateFrame

from meshproxy._fast import conn as C
from tests.conn.peers import (
    FLOW_CONTROL_ERROR,
    INITIAL_WINDOW_SIZE,
    POST,
    PROTOCOL_ERROR,
    RESPONSE,
    Pair,
    Raw,
    data,
    data_bytes,
    events_of,
    of,
    resets,
    settings,
    the_goaway,
    window_update,
)

SMALL = {"initial_window_size": 65535, "connection_window": 1 << 20}


def send_all(r: Raw, sid: int, n: int, end: bool = False) -> None:
    """``n`` bytes of DATA in frames of at most 16384."""
    while n > 16384:
        r.send(data(sid, b"d" * 16384))
        n -= 16384
    r.send(data(sid, b"d" * n, end=end))


def response(r: Raw, sid: int = 1, method=POST) -> C.Stream:
    r.request(sid, method, end_stream=False)
    s = r.events[-1][1]
    r.conn.send_headers(s, RESPONSE)
    r.read()
    return s


# -- the windows we enforce ----------------------------------------------------------------------------------------


def test_data_beyond_the_stream_window_is_a_stream_flow_control_error():
    r = Raw(settings_=SMALL, hold=True)
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    send_all(r, 1, 65535)
    assert r.read() == [] and r.conn.get_stream(1).held_bytes == 65535
    r.send(data(1, b"!"))
    assert resets(r.read()) == {1: FLOW_CONTROL_ERROR}
    assert r.alive and r.conn.get_stream(3).state == "open"


def test_data_beyond_the_connection_window_is_a_connection_flow_control_error():
    r = Raw(settings_={"initial_window_size": 1 << 20, "connection_window": 65535}, hold=True)
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    send_all(r, 1, 40000)
    send_all(r, 3, 25535)
    assert r.alive
    r.send(data(3, b"!"))
    ga = the_goaway(r.read())
    assert ga.error_code == FLOW_CONTROL_ERROR and not r.alive


def test_padding_counts_against_the_windows():
    r = Raw(settings_=SMALL, hold=True)
    r.request(1, POST, end_stream=False)
    s = r.conn.get_stream(1)
    r.send(data(1, b"p" * 100, pad=200))  # 301 octets of payload, 100 of them data
    assert s.held_bytes == 100 and s.recv_window == 65535 - 301
    send_all(r, 1, 65535 - 301 - 100)
    assert s.recv_window == 100 and r.read() == []
    r.send(data(1, b"q" * 50, pad=60))  # 50 data octets fit the window; with the padding (111) they do not
    assert resets(r.read()) == {1: FLOW_CONTROL_ERROR}


def test_non_hold_mode_returns_the_window_as_data_is_delivered():
    r = Raw(settings_=SMALL)
    r.request(1, POST, end_stream=False)
    send_all(r, 1, 200_000)  # three times the stream window: fine, we give it back as it arrives
    assert r.alive and sum(len(e[2]) for e in events_of(r.events, C.EV_DATA)) == 200_000
    updates = of(r.read(), WindowUpdateFrame)
    assert sum(f.window_increment for f in updates if f.stream_id == 1) >= 200_000 - 65535


@pytest.mark.parametrize("sid", [0, 1])
def test_window_update_of_zero(sid):
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.send(window_update(sid, 0))
    if sid == 0:
        assert the_goaway(r.read()).error_code == PROTOCOL_ERROR
    else:
        assert resets(r.read()) == {1: PROTOCOL_ERROR} and r.alive


def test_connection_window_overflow_is_a_flow_control_error():
    r = Raw()
    r.send(window_update(0, 2**31 - 1 - 65535))
    assert r.alive and r.conn.conn_send_window == 2**31 - 1
    r.send(window_update(0, 1))
    assert the_goaway(r.read()).error_code == FLOW_CONTROL_ERROR


def test_stream_window_overflow_is_a_stream_flow_control_error():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.send(window_update(1, 2**31 - 1 - 65535))
    assert r.alive and not r.read()
    r.send(window_update(1, 1))
    assert resets(r.read()) == {1: FLOW_CONTROL_ERROR} and r.alive


# -- the windows we obey -------------------------------------------------------------------------------------------


def test_send_data_beyond_the_stream_window_waits_for_window_updates():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 1000)])
    s = response(r)
    r.conn.send_data(s, bytes(range(256)) * 20, end_stream=True)  # 5120 bytes
    got = r.read()
    assert data_bytes(got, 1) == 1000 and s.pending_bytes == 4120 and s.send_window == 0
    assert not any("END_STREAM" in f.flags for f in of(got, DataFrame))
    for inc, want in [(1, 1), (299, 299), (2000, 2000), (10_000, 1820)]:
        r.send(window_update(1, inc))
        assert data_bytes(r.read(), 1) == want
    assert s.pending_bytes == 0 and s.sent_end
    body = b"".join(f.data for f in of(r.frames, DataFrame, 1))
    assert body == bytes(range(256)) * 20 and "END_STREAM" in of(r.frames, DataFrame, 1)[-1].flags


def test_send_data_beyond_the_connection_window_waits_for_window_updates():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 1 << 20)])
    a = response(r, 1)
    b = response(r, 3)
    r.conn.send_data(a, b"a" * 60000, end_stream=True)
    r.conn.send_data(b, b"b" * 10000, end_stream=True)
    got = r.read()
    assert (data_bytes(got, 1), data_bytes(got, 3)) == (60000, 5535)
    assert r.conn.conn_send_window == 0 and b.pending_bytes == 4465
    r.send(window_update(0, 1000))
    assert data_bytes(r.read(), 3) == 1000
    r.send(window_update(3, 1))  # the stream window is not what it waits for
    assert r.read() == []
    r.send(window_update(0, 100_000))
    got = r.read()
    assert data_bytes(got, 3) == 3465 and "END_STREAM" in of(got, DataFrame, 3)[-1].flags
    assert r.conn.conn_send_window == 100_000 - 3465


def test_streams_blocked_on_the_connection_window_share_it_in_order():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 1 << 20)])
    streams = [response(r, sid) for sid in (1, 3, 5)]
    r.conn.send_data(streams[0], b"x" * 65535)
    for s in streams[1:]:
        r.conn.send_data(s, b"y" * 1000, end_stream=True)
    assert data_bytes(r.read(), 1) == 65535
    r.send(window_update(0, 1500))
    got = r.read()
    assert (data_bytes(got, 3), data_bytes(got, 5)) == (1000, 500)
    r.send(window_update(0, 500))
    assert data_bytes(r.read(), 5) == 500 and streams[2].state != "open"


def test_trailers_wait_behind_queued_data():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 100)])
    s = response(r)
    r.conn.send_data(s, b"x" * 250)
    r.conn.send_headers(s, [(b"grpc-status", b"0")])
    assert [type(f) for f in r.read()] == [DataFrame] and s.pending_bytes == 150
    r.send(window_update(1, 100))
    assert [type(f) for f in r.read()] == [DataFrame]
    r.send(window_update(1, 100))
    got = r.read()
    assert [type(f) for f in got] == [DataFrame, HeadersFrame] and len(got[0].data) == 50
    assert "END_STREAM" in got[1].flags and got[1].decoded == [(b"grpc-status", b"0")]


def test_empty_end_stream_waits_behind_queued_data():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 10)])
    s = response(r)
    r.conn.send_data(s, b"x" * 20)
    r.conn.send_data(s, b"", end_stream=True)
    assert data_bytes(r.read(), 1) == 10 and not s.sent_end
    r.send(window_update(1, 10))
    got = of(r.read(), DataFrame)
    assert sum(len(f.data) for f in got) == 10 and "END_STREAM" in got[-1].flags and s.sent_end


def test_zero_initial_window_sends_nothing_until_updated():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 0)])
    s = response(r)
    r.conn.send_data(s, b"x" * 10, end_stream=True)
    assert r.read() == [] and s.pending_bytes == 10
    r.send(settings((INITIAL_WINDOW_SIZE, 4)))
    assert data_bytes(r.read(), 1) == 4
    r.send(window_update(1, 6))
    assert data_bytes(r.read(), 1) == 6 and s.sent_end


def test_pause_and_resume_writing():
    r = Raw()
    s = response(r)
    r.conn.pause_writing()
    r.conn.send_data(s, b"x" * 100, end_stream=True)
    assert r.read() == [] and s.pending_bytes == 100
    r.conn.resume_writing()
    got = r.read()
    assert data_bytes(got, 1) == 100 and "END_STREAM" in got[-1].flags


def test_h2_peer_with_a_small_window_gets_every_byte():
    p = Pair(client=False, peer_settings={INITIAL_WINDOW_SIZE: 3000})
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, POST, end_stream=True)
    p.pump()
    s = p.events[-1][1]
    body = bytes(range(256)) * 1000
    p.conn.send_headers(s, RESPONSE)
    p.conn.send_data(s, body, end_stream=True)
    p.pump()
    assert p.received(sid) == body and p.peer_of(h2.events.StreamEnded)
    assert max(len(f.data) for f in of(p.wire_to_peer, DataFrame)) <= 3000
