"""PING (RFC 9113 §6.7) and GOAWAY (§6.8): answers, graceful shutdown in two steps, abrupt close, a peer going away."""

from __future__ import annotations

import h2.events
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame

from meshproxy._fast import conn as C
from tests.conn.peers import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    INTERNAL_ERROR,
    NO_ERROR,
    POST,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    REQUEST,
    RESPONSE,
    Pair,
    Raw,
    data,
    events_of,
    frame,
    goaway,
    headers_frame,
    of,
    ping,
    resets,
    the_goaway,
)

MAX_ID = 2**31 - 1


# -- PING ----------------------------------------------------------------------------------------------------------


def test_ping_is_answered_with_the_same_payload():
    p = Pair(client=False)
    p.peer.ping(b"\x00\x01abc\xff\xfe\x07")
    p.pump()
    acks = p.peer_of(h2.events.PingAckReceived)
    assert [a.ping_data for a in acks] == [b"\x00\x01abc\xff\xfe\x07"]


@pytest.mark.parametrize("client", [False, True])
def test_ping_ack_from_raw_peer(client):
    r = Raw(client=client)
    r.send(ping(b"ABCDEFGH"))
    (got,) = r.read()
    assert isinstance(got, PingFrame) and "ACK" in got.flags and got.opaque_data == b"ABCDEFGH"
    r.send(ping(b"ABCDEFGH", ack=True))  # an ACK is not answered
    assert r.read() == []


def test_our_ping_reaches_the_peer():
    p = Pair(client=True)
    p.conn.ping(b"12345678")
    p.pump()
    assert [e.ping_data for e in p.peer_of(h2.events.PingReceived)] == [b"12345678"]
    with pytest.raises(ValueError):
        p.conn.ping(b"short")


@pytest.mark.parametrize(
    ("raw", "code"),
    [(frame(6, 0, 1, b"\0" * 8), PROTOCOL_ERROR), (frame(6, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR)],
)
def test_malformed_ping(raw, code):
    r = Raw()
    r.send(raw)
    assert the_goaway(r.read()).error_code == code


# -- graceful shutdown, server role --------------------------------------------------------------------------------


def test_graceful_shutdown_two_steps_with_the_right_last_stream_id():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    assert r.conn.shutdown() is None
    first, probe = r.read()
    assert isinstance(first, GoAwayFrame) and first.last_stream_id == MAX_ID and first.error_code == NO_ERROR
    assert isinstance(probe, PingFrame) and "ACK" not in probe.flags
    # A request already on the wire when the first GOAWAY left is still served.
    r.request(5, POST, end_stream=False)
    assert [e[1].id for e in events_of(r.events, C.EV_REQUEST)] == [1, 3, 5]
    r.send(ping(probe.opaque_data, ack=True))
    final = the_goaway(r.read())
    assert final.last_stream_id == 5 and final.error_code == NO_ERROR
    assert r.conn.goaway_sent_last == 5


def test_graceful_shutdown_in_flight_streams_finish_then_idle():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3)
    s1, s3 = (e[1] for e in events_of(r.events, C.EV_REQUEST))
    r.conn.shutdown()
    r.send(ping(b"meshdown", ack=True))
    assert of(r.read(), GoAwayFrame)[-1].last_stream_id == 3
    r.send(data(1, b"body", end=True))
    assert events_of(r.events, C.EV_DATA)[-1][2:] == (b"body", True)
    r.conn.send_headers(s3, RESPONSE, end_stream=True)
    assert [e[0] for e in r.drain()] == [C.EV_CLOSED], "one stream is still in flight"
    r.conn.send_headers(s1, RESPONSE)
    r.conn.send_data(s1, b"answer", end_stream=True)
    assert [e[0] for e in r.drain()] == [C.EV_CLOSED, C.EV_IDLE]
    got = r.read()
    assert [f.stream_id for f in of(got, HeadersFrame)] == [3, 1] and of(got, DataFrame)[0].data == b"answer"
    assert r.alive and not resets(got)


def test_stream_opened_after_the_final_goaway_is_ignored():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.conn.shutdown()
    r.send(ping(r.read()[1].opaque_data, ack=True))
    assert the_goaway(r.read()).last_stream_id == 1
    r.request(3)  # the peer had not seen the GOAWAY yet
    assert not events_of(r.events, C.EV_REQUEST)[1:] and r.read() == []
    assert r.alive and r.conn.get_stream(3) is None
    # The in-flight stream still finishes, and then the connection is idle.
    r.send(data(1, b"done", end=True))
    r.conn.send_headers(r.conn.get_stream(1), RESPONSE, end_stream=True)
    assert events_of(r.drain(), C.EV_IDLE)


def test_request_body_of_a_stream_ignored_after_goaway_is_ignored_too():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.conn.shutdown()
    r.send(ping(b"meshdown", ack=True))
    r.read()
    r.request(3, POST, end_stream=False)  # sent before the client saw GOAWAY(last=1)
    r.send(data(3, b"x" * 100, end=True))
    # §6.8: frames on streams above the last stream id are ignored (DATA still counts for the connection window);
    # the in-flight stream 1 must not be killed.
    assert r.alive, r.read()
    r.send(data(1, b"done", end=True))
    assert events_of(r.events, C.EV_DATA)[-1][2:] == (b"done", True)


def test_goaway_after_the_final_one_never_raises_the_last_stream_id():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.conn.shutdown()
    r.send(ping(b"meshdown", ack=True))
    assert of(r.read(), GoAwayFrame)[-1].last_stream_id == 1
    r.request(3)  # ignored: never processed
    r.conn.close(INTERNAL_ERROR, "bye")
    # §6.8: endpoints MUST NOT increase the last stream id they send; stream 3 was not processed either.
    assert the_goaway(r.read()).last_stream_id == 1


def test_hpack_state_survives_ignored_streams():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.conn.shutdown()
    r.send(ping(r.read()[1].opaque_data, ack=True))
    r.read()
    r.request(3, [*REQUEST, (b"x-indexed", b"value")])  # ignored, but its entries join the dynamic table
    block = r.block([(b"x-indexed", b"value")])
    assert len(block) == 1, "the encoder refers to the entry stream 3 added"
    r.send(headers_frame(1, block, end_stream=True))  # trailers on the live stream
    assert r.alive and not resets(r.read())
    assert events_of(r.events, C.EV_TRAILERS)[0][1].trailers == [(b"x-indexed", b"value")]


def test_idle_waits_for_the_ping_ack_even_with_no_streams():
    r = Raw()
    r.conn.shutdown()
    assert not events_of(r.events, C.EV_IDLE)
    r.send(ping(b"meshdown", ack=True))
    assert events_of(r.events, C.EV_IDLE)
    assert of(r.read(), GoAwayFrame)[-1].last_stream_id == 0


def test_shutdown_twice_sends_one_goaway_pair():
    r = Raw()
    r.conn.shutdown()
    r.conn.shutdown()
    assert len(of(r.read(), GoAwayFrame)) == 1


# -- graceful shutdown, client role --------------------------------------------------------------------------------


def test_client_shutdown_no_new_streams_idle_when_done():
    r = Raw(client=True)
    s = r.conn.open_stream(REQUEST, end_stream=True)
    r.conn.shutdown()
    assert not r.conn.can_open
    with pytest.raises(ValueError):
        r.conn.open_stream(REQUEST)
    ga = of(r.read(), GoAwayFrame)
    assert [(g.last_stream_id, g.error_code) for g in ga] == [(0, NO_ERROR)]
    assert not events_of(r.events, C.EV_IDLE)
    r.send(headers_frame(1, r.block(RESPONSE), end_stream=True))
    assert s.state == "closed" and events_of(r.events, C.EV_CLOSED) and events_of(r.events, C.EV_IDLE)


def test_client_shutdown_without_streams_is_idle_at_once():
    c = C.H2Connection(True)
    c.initiate()
    assert c.shutdown() == [(C.EV_IDLE,)]


# -- abrupt close --------------------------------------------------------------------------------------------------


def test_close_sends_goaway_with_code_and_ends_every_stream():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    s1, s3 = (e[1] for e in events_of(r.events, C.EV_REQUEST))
    events = r.conn.close(ENHANCE_YOUR_CALM, "too much")
    ga = the_goaway(r.read())
    assert (ga.last_stream_id, ga.error_code, ga.additional_data) == (3, ENHANCE_YOUR_CALM, b"too much")
    assert s1.state == s3.state == "closed" and s1.error_code == ENHANCE_YOUR_CALM
    assert [e[0] for e in events] == [C.EV_CLOSED, C.EV_CLOSED, C.EV_IDLE, C.EV_TERMINATED]
    assert events[-1][1:] == (ENHANCE_YOUR_CALM, "too much")
    assert r.conn.receive(ping()) is None and r.read() == [], "a terminated connection reads nothing"
    assert r.conn.close(PROTOCOL_ERROR) is None and r.read() == [], "close is idempotent"


def test_close_no_error_cancels_streams():
    r = Raw()
    r.request(1, POST, end_stream=False)
    s = r.events[-1][1]
    r.conn.close()
    assert the_goaway(r.read()).error_code == NO_ERROR
    assert s.error_code == CANCEL


def test_connection_lost_ends_streams_silently():
    r = Raw()
    r.request(1, POST, end_stream=False)
    s = r.events[-1][1]
    events = r.conn.connection_lost()
    assert [e[0] for e in events] == [C.EV_CLOSED]
    assert s.state == "closed" and s.error_code == CANCEL and r.read() == []


# -- GOAWAY received -----------------------------------------------------------------------------------------------


def test_goaway_received_client_streams_above_last_are_unprocessed():
    r = Raw(client=True)
    a, b, c = (r.conn.open_stream(POST) for _ in range(3))
    r.read()
    events = r.send(goaway(1, NO_ERROR, b"bye"))
    assert events[0] == (C.EV_GOAWAY, 1, NO_ERROR, b"bye")
    closed = [e[1] for e in events_of(events, C.EV_CLOSED)]
    assert closed == [b, c]
    assert all(s.unprocessed and s.error_code == REFUSED_STREAM and s.state == "closed" for s in closed)
    assert not a.unprocessed and a.state == "open"
    assert not r.conn.can_open and r.conn.goaway_received and r.conn.goaway_received_last == 1
    assert r.read() == [], "no RST_STREAM for streams the peer never saw"
    # Stream 1 finishes normally; then the connection is idle.
    r.conn.send_data(a, b"", end_stream=True)
    r.send(headers_frame(1, r.block(RESPONSE), end_stream=True))
    assert a.state == "closed" and events_of(r.events, C.EV_IDLE)


def test_goaway_from_h2_server_with_refused_streams():
    p = Pair(client=True)
    s1 = p.conn.open_stream(REQUEST, end_stream=True)
    p.pump()
    s3 = p.conn.open_stream(REQUEST, end_stream=True)  # not yet on the wire when the server goes away
    p.peer.close_connection(error_code=0, last_stream_id=1)
    p.to_conn()
    assert s3.unprocessed and s3.state == "closed" and not s1.unprocessed
    assert events_of(p.events, C.EV_GOAWAY)[0][1:3] == (1, 0)


def test_refused_stream_reset_marks_unprocessed():
    r = Raw(client=True)
    s = r.conn.open_stream(REQUEST, end_stream=True)
    r.read()
    r.send(frame(3, 0, 1, (REFUSED_STREAM).to_bytes(4, "big")))
    assert s.unprocessed and s.closed_remote_reset and s.error_code == REFUSED_STREAM


def test_goaway_raising_the_last_stream_id_is_a_protocol_error():
    r = Raw(client=True)
    r.send(goaway(5))
    r.send(goaway(7))
    assert the_goaway(r.read()).error_code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("raw", "code"),
    [(frame(7, 0, 1, b"\0" * 8), PROTOCOL_ERROR), (frame(7, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR)],
)
def test_malformed_goaway(raw, code):
    r = Raw()
    r.send(raw)
    assert the_goaway(r.read()).error_code == code


def test_server_receiving_goaway_is_idle_when_streams_end():
    r = Raw()
    r.request(1)
    s = r.events[-1][1]
    r.send(goaway(1))
    assert r.alive and not events_of(r.events, C.EV_IDLE)
    r.conn.send_headers(s, RESPONSE, end_stream=True)
    assert of(r.read(), HeadersFrame) and events_of(r.drain(), C.EV_IDLE)
    assert not of(r.frames, DataFrame)
