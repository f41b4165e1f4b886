"""Proxying in the compiled core: an h2 client -> our server-role connection (hold mode), linked stream by stream
to our client-role connection -> an h2 server. Requests, responses, trailers and resets cross in C, and flow control
is coupled end to end, so a slow reader stops the writer and the proxy holds no more than the windows it advertised."""

from __future__ import annotations

import os
import re

import h2.events
import pytest
from hyperframe.frame import RstStreamFrame, WindowUpdateFrame

from meshproxy._fast import conn as C
from tests.conn.peers import (
    CANCEL,
    GRPC,
    GRPC_RESPONSE,
    INITIAL_WINDOW_SIZE,
    INTERNAL_ERROR,
    NO_ERROR,
    POST,
    REFUSED_STREAM,
    REQUEST,
    RESPONSE,
    Pair,
    Proxy,
    events_of,
    of,
    respond_upstream,
)

UUID4 = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def feed(conn, sid: int, body: bytes, offset: int, end: bool = True) -> int:
    """Send as much of ``body[offset:]`` as ``conn`` (an h2 connection) may now; return the new offset."""
    while offset < len(body):
        n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - offset)
        if n <= 0:
            break
        conn.send_data(sid, body[offset : offset + n], end_stream=end and offset + n == len(body))
        offset += n
    return offset


def bounded(p: Proxy, *streams: C.Stream):
    """A ``check`` for Proxy.pump: what the proxy buffers per stream stays within the window it advertised."""
    down_window, up_window = p.down.conn.local_initial_window, p.up.conn.local_initial_window

    def check() -> None:
        for s in streams:
            if s.conn is p.down.conn:  # queued here: response bytes from upstream; held: request bytes
                assert s.pending_bytes <= up_window, (s, s.pending_bytes)
                assert s.held_bytes <= down_window, (s, s.held_bytes)
            else:  # queued here: request bytes from downstream
                assert s.pending_bytes <= down_window, (s, s.pending_bytes)

    return check


def client_response(p: Proxy, sid: int) -> list:
    got = p.client_events(h2.events.ResponseReceived, sid)
    assert len(got) == 1, p.down.peer_events
    return got[0].headers


def client_reset(p: Proxy, sid: int) -> int | None:
    got = p.client_events(h2.events.StreamReset, sid)
    return got[-1].error_code if got else None


# -- the request crosses -------------------------------------------------------------------------------------------


def test_request_headers_cross_with_rewrites():
    p = Proxy()
    headers = [*GRPC, (b"grpc-timeout", b"5S"), (b"host", b"svc"), (b"x-custom", b"1")]
    _, down = p.request(headers, body=b"\0\0\0\0\0")
    assert down.grpc_timeout_ns == 5 * 10**9 and down.is_grpc
    up = p.forward(down, authority=b"backend:8080", path=b"/pkg.Svc/Other", timeout_ns=999_999_000)
    got = p.server_request().headers
    assert got[:-1] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pkg.Svc/Other"),
        (b":authority", b"backend:8080"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"x-custom", b"1"),
        (b"grpc-timeout", b"999999u"),
    ]
    name, rid = got[-1]
    assert name == b"x-request-id" and UUID4.match(rid) and down.request_id == rid
    assert up.peer is down and down.peer is up and up.is_grpc


def test_request_headers_cross_unchanged_without_rewrites():
    p = Proxy(generate_request_id=False)
    headers = [*REQUEST, (b"grpc-timeout", b"5S"), (b"accept", b"*/*")]
    _, down = p.request(headers)
    p.forward(down)
    assert p.server_request().headers == headers
    assert down.request_id is None


def test_grpc_timeout_is_dropped_for_non_grpc_requests_given_a_timeout():
    p = Proxy(generate_request_id=False)
    _, down = p.request([*REQUEST, (b"grpc-timeout", b"5S")])
    p.forward(down, timeout_ns=10**9)
    assert p.server_request().headers == REQUEST


@pytest.mark.parametrize(
    ("ns", "wire"),
    [
        (0, b"0n"),
        (1, b"1n"),
        (99_999_999, b"99999999n"),
        (100_000_000, b"100000u"),
        (999_999_000, b"999999u"),
        (999_999_001, b"1000000u"),
        (10**9, b"1000000u"),
        (123_456_789_012, b"123457m"),
        (5 * 3600 * 10**9, b"18000000m"),
        (10**18, b"16666667M"),
    ],
)
def test_grpc_timeout_is_the_time_left(ns, wire):
    p = Proxy()
    _, down = p.request([*GRPC, (b"grpc-timeout", b"99H")])
    p.forward(down, timeout_ns=ns)
    got = dict(p.server_request().headers)[b"grpc-timeout"]
    assert got == wire
    units = {b"H": 3600 * 10**9, b"M": 60 * 10**9, b"S": 10**9, b"m": 10**6, b"u": 10**3, b"n": 1}
    value = int(got[:-1]) * units[got[-1:]]
    assert len(got) <= 9 and ns <= value < ns + units[got[-1:]], "rounded up, never down"


def test_request_id_is_kept_when_present():
    p = Proxy()
    _, down = p.request([*REQUEST, (b"x-request-id", b"client-chosen")])
    p.forward(down)
    got = p.server_request().headers
    assert [v for k, v in got if k == b"x-request-id"] == [b"client-chosen"]


def test_request_ids_are_distinct_uuid4():
    p = Proxy()
    ids = set()
    for _ in range(20):
        _, down = p.request(REQUEST)
        p.forward(down)
        rid = dict(p.server_request().headers)[b"x-request-id"]
        assert UUID4.match(rid)
        ids.add(rid)
    assert len(ids) == 20


def test_request_body_held_before_the_link_is_forwarded_after():
    p = Proxy()
    sid, down = p.request(POST, body=b"early" * 200, end=False)
    assert down.held_bytes == 1000 and not p.server.streams
    p.client.send_data(sid, b"late", end_stream=False)
    p.down.to_conn()
    assert down.held_bytes == 1004
    up = p.forward(down)
    assert down.held_bytes == 0
    p.client.send_data(sid, b"-after", end_stream=True)
    p.pump()
    assert p.up.received(up.id) == b"early" * 200 + b"late-after"
    assert [e.stream_id for e in p.up.peer_of(h2.events.StreamEnded)] == [up.id]


def test_held_trailers_and_end_stream_are_forwarded():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\x01x", end=False)
    p.client.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
    p.down.to_conn()
    up = p.forward(down)
    assert p.up.received(up.id) == b"\0\0\0\0\x01x"
    assert p.up.peer_of(h2.events.TrailersReceived)[0].headers == [(b"x-trailer", b"t")]
    assert p.up.peer_of(h2.events.StreamEnded)


def test_request_ended_with_its_headers_is_forwarded_ended():
    p = Proxy()
    _, down = p.request(REQUEST)
    up = p.forward(down)
    assert p.server_request().stream_ended is not None
    assert up.state == "half_closed_local"


def test_request_ended_by_an_empty_data_frame_before_the_link():
    p = Proxy()
    _, down = p.request(POST, body=b"", end=True)
    up = p.forward(down)
    assert p.up.peer_of(h2.events.StreamEnded) and up.sent_end


# -- the response crosses back -------------------------------------------------------------------------------------


def test_response_headers_data_and_trailers_cross_back():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0")
    up = p.forward(down)
    respond_upstream(p, up, [*GRPC_RESPONSE, (b"x-r", b"1")], b"\0\0\0\0\x02hi", [(b"grpc-status", b"0")])
    assert client_response(p, sid) == [*GRPC_RESPONSE, (b"x-r", b"1")]
    assert p.down.received(sid) == b"\0\0\0\0\x02hi"
    assert p.client_events(h2.events.TrailersReceived, sid)[0].headers == [(b"grpc-status", b"0")]
    assert p.client_events(h2.events.StreamEnded, sid)
    assert down.state == up.state == "closed" and down.peer is None and up.peer is None
    assert p.down.conn.active_streams == p.up.conn.active_streams == 0
    assert up.grpc_status == 0 and up.status == 200


def test_response_without_body_crosses():
    p = Proxy()
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    respond_upstream(p, up, [(b":status", b"204")])
    assert client_response(p, sid) == [(b":status", b"204")] and p.client_events(h2.events.StreamEnded, sid)
    assert down.state == up.state == "closed"


def test_informational_responses_cross():
    p = Proxy()
    sid, down = p.request(POST, body=b"x")
    up = p.forward(down)
    p.server.send_headers(up.id, [(b":status", b"103"), (b"link", b"</s.css>")])
    respond_upstream(p, up, RESPONSE, b"done")
    assert p.client_events(h2.events.InformationalResponseReceived, sid)[0].headers[0] == (b":status", b"103")
    assert client_response(p, sid) == RESPONSE and p.down.received(sid) == b"done"


def test_many_streams_at_once():
    p = Proxy()
    pairs = []
    for i in range(20):
        sid, down = p.request([*POST[:2], (b":path", b"/%d" % i), POST[3]], body=b"req%d" % i)
        pairs.append((sid, p.forward(down)))
    for _, up in reversed(pairs):
        respond_upstream(p, up, RESPONSE, b"resp%d" % up.id)
    for sid, up in pairs:
        assert p.down.received(sid) == b"resp%d" % up.id
        assert p.up.received(up.id) == b"req%d" % ((up.id - 1) // 2)


def test_link_with_an_explicitly_opened_stream():
    p = Proxy()
    sid, down = p.request(POST, body=b"held", end=True)
    up = p.up.conn.open_stream([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")])
    C.link(down, up)
    with pytest.raises(ValueError):
        C.link(down, up)
    p.pump()
    assert p.up.received(up.id) == b"held" and p.up.peer_of(h2.events.StreamEnded)
    respond_upstream(p, up, RESPONSE, b"ok")
    assert p.down.received(sid) == b"ok"


# -- flow control coupled end to end -------------------------------------------------------------------------------


def test_large_bodies_cross_both_ways_through_small_windows():
    p = Proxy(
        down_settings={"initial_window_size": 65535, "connection_window": 65535 * 4},
        up_settings={"initial_window_size": 100_000, "connection_window": 300_000},
        client_settings={INITIAL_WINDOW_SIZE: 50_000},
        server_settings={INITIAL_WINDOW_SIZE: 70_000},
    )
    up_body, down_body = os.urandom(5 << 20), os.urandom(5 << 20)
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, POST)
    p.down.to_conn()
    down = events_of(p.down.events, C.EV_REQUEST)[0][1]
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE)
    check = bounded(p, down, up)
    sent_up = sent_down = 0
    for _ in range(5000):
        before = (sent_up, sent_down)
        sent_up = feed(p.client, sid, up_body, sent_up)
        sent_down = feed(p.server, up.id, down_body, sent_down)
        p.pump(check=check)
        if (sent_up, sent_down) == (len(up_body), len(down_body)):
            break
        assert (sent_up, sent_down) != before, "stalled: no window opened"
    p.pump(check=check)
    assert p.up.received(up.id) == up_body
    assert p.down.received(sid) == down_body
    assert down.state == up.state == "closed"
    assert down.data_recv == up.data_sent == len(up_body) and up.data_recv == down.data_sent == len(down_body)


def test_slow_reader_stops_the_upstream_sender():
    p = Proxy(client_acks=False)  # the h2 client never returns flow-control credit
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE)
    body = os.urandom(5 << 20)
    sent = feed(p.server, up.id, body, 0)
    p.pump(check=bounded(p, down, up))
    for _ in range(5):  # whatever credit comes back, it is never enough to move much
        sent = feed(p.server, up.id, body, sent)
        p.pump(check=bounded(p, down, up))
    reached_client = len(p.down.received(sid))
    assert reached_client == 65535, "exactly the client's window"
    assert p.server.local_flow_control_window(up.id) == 0, "the upstream sender is stopped"
    assert sent == p.up.conn.local_initial_window, "it sent one stream window and no more"
    assert down.pending_bytes == sent - reached_client <= p.up.conn.local_initial_window
    updates = [f for f in of(p.up.wire_to_peer, WindowUpdateFrame) if f.stream_id == up.id]
    assert sum(f.window_increment for f in updates) <= reached_client, "credit only for bytes that left"
    # The client reads now: everything arrives, exactly once.
    p.down.auto_ack = True
    for ev in p.client_events(h2.events.DataReceived, sid):
        p.client.acknowledge_received_data(ev.flow_controlled_length, sid)
    for _ in range(1000):
        p.pump(check=bounded(p, down, up))
        sent = feed(p.server, up.id, body, sent)
        if sent == len(body):
            break
    p.pump()
    assert p.down.received(sid) == body and down.state == "closed"


def test_slow_upstream_reader_stops_the_client():
    p = Proxy(server_acks=False)
    sid, down = p.request(POST, end=False)
    up = p.forward(down)
    body = os.urandom(3 << 20)
    sent = 0
    for _ in range(5):
        sent = feed(p.client, sid, body, sent)
        p.pump(check=bounded(p, down, up))
    assert len(p.up.received(up.id)) == 65535
    assert sent == p.down.conn.local_initial_window and p.client.local_flow_control_window(sid) == 0
    assert up.pending_bytes == sent - 65535


def test_pause_writing_backs_up_to_the_sender():
    p = Proxy()
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    p.down.conn.pause_writing()
    p.server.send_headers(up.id, RESPONSE)
    body = os.urandom(3 << 20)
    sent = 0
    for _ in range(5):
        sent = feed(p.server, up.id, body, sent)
        p.pump(check=bounded(p, down, up))
    assert p.down.received(sid) == b"" and down.pending_bytes == sent == p.up.conn.local_initial_window
    p.down.conn.resume_writing()
    for _ in range(1000):
        p.pump(check=bounded(p, down, up))
        sent = feed(p.server, up.id, body, sent)
        if sent == len(body) and down.state == "closed":
            break
    assert p.down.received(sid) == body


def test_client_cancel_with_queued_data_returns_the_upstream_connection_window():
    p = Proxy(client_acks=False, up_settings={"initial_window_size": 1 << 20, "connection_window": 1 << 21})
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE)
    feed(p.server, up.id, os.urandom(1 << 20), 0, end=False)
    p.pump()
    assert down.pending_bytes == (1 << 20) - 65535
    for ev in p.client_events(h2.events.DataReceived, sid):  # the client's own connection window
        p.client.acknowledge_received_data(ev.flow_controlled_length, sid)
    p.client.reset_stream(sid, CANCEL)
    p.pump()
    assert [(e.stream_id, e.error_code) for e in p.up.peer_of(h2.events.StreamReset)] == [(up.id, CANCEL)]
    # The upstream connection window (2 MB) must not stay 1 MB short: a second 1.5 MB response gets through.
    p.down.auto_ack = True
    sid2, down2 = p.request(REQUEST)
    up2 = p.forward(down2)
    p.server.send_headers(up2.id, RESPONSE)
    body, sent = os.urandom(3 << 19), 0
    for _ in range(1000):
        sent = feed(p.server, up2.id, body, sent)
        p.pump()
        if sent == len(body):
            break
    p.pump()
    assert p.down.received(sid2) == body


# -- resets and failures -------------------------------------------------------------------------------------------


def test_client_cancel_cancels_upstream():
    p = Proxy()
    sid, down = p.request(POST, body=b"part", end=False)
    up = p.forward(down)
    p.client.reset_stream(sid, CANCEL)
    p.pump()
    assert [(e.stream_id, e.error_code) for e in p.up.peer_of(h2.events.StreamReset)] == [(up.id, CANCEL)]
    assert down.state == up.state == "closed" and down.closed_remote_reset and up.error_code == CANCEL


def test_upstream_reset_before_headers_grpc_gets_trailers_only_unavailable():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0", end=False)  # the request is still open
    up = p.forward(down)
    p.server.reset_stream(up.id, INTERNAL_ERROR)
    p.pump()
    assert client_response(p, sid) == [
        *GRPC_RESPONSE,
        (b"grpc-status", b"14"),
        (b"grpc-message", b"upstream reset the stream (INTERNAL_ERROR)"),
    ]
    assert p.client_events(h2.events.StreamEnded, sid), "trailers-only: END_STREAM on the headers"
    assert client_reset(p, sid) == NO_ERROR, "the unfinished request is then reset with NO_ERROR"
    assert down.response_flags == "UR" and down.state == "closed"


def test_upstream_reset_before_headers_http_gets_503_ur():
    p = Proxy()
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    p.server.reset_stream(up.id, INTERNAL_ERROR)
    p.pump()
    headers = client_response(p, sid)
    assert headers[0] == (b":status", b"503")
    assert (b"x-meshproxy-response-flags", b"UR") in headers and (b"content-type", b"text/plain") in headers
    body = p.down.received(sid)
    assert body == b"upstream connect error or disconnect/reset before headers"
    assert (b"content-length", b"%d" % len(body)) in headers
    assert p.client_events(h2.events.StreamEnded, sid) and client_reset(p, sid) is None
    assert down.response_flags == "UR"


@pytest.mark.parametrize(
    ("upstream_code", "downstream_code"),
    [(INTERNAL_ERROR, INTERNAL_ERROR), (NO_ERROR, INTERNAL_ERROR), (REFUSED_STREAM, CANCEL), (CANCEL, CANCEL)],
)
def test_upstream_reset_after_headers_resets_downstream(upstream_code, downstream_code):
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0")
    up = p.forward(down)
    p.server.send_headers(up.id, GRPC_RESPONSE)
    p.server.send_data(up.id, b"\0\0\0\0\x01z")
    p.pump()
    p.server.reset_stream(up.id, upstream_code)
    p.pump()
    assert client_response(p, sid) == GRPC_RESPONSE and p.down.received(sid) == b"\0\0\0\0\x01z"
    assert client_reset(p, sid) == downstream_code
    assert down.state == "closed" and down.response_flags == "UR"


def test_upstream_reset_after_the_whole_response_only_stops_the_request_body():
    p = Proxy()
    sid, down = p.request(POST, body=b"streaming", end=False)
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE)
    p.server.send_data(up.id, b"all of it", end_stream=True)
    p.server.reset_stream(up.id, NO_ERROR)  # §8.1: a server done early stops the request body this way
    p.pump()
    assert p.down.received(sid) == b"all of it" and p.client_events(h2.events.StreamEnded, sid)
    assert client_reset(p, sid) == NO_ERROR


def test_upstream_connection_lost_grpc_gets_unavailable():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0")
    p.forward(down)
    p.up.conn.connection_lost()
    p.pump()
    headers = dict(client_response(p, sid))
    assert headers[b"grpc-status"] == b"14" and down.response_flags == "UC"


def test_upstream_connection_lost_grpc_is_answered_trailers_only():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0")
    p.forward(down)
    p.up.conn.connection_lost()
    p.pump()
    headers = client_response(p, sid)
    assert headers[:2] == GRPC_RESPONSE and (b"grpc-message", b"upstream connection lost") in headers
    assert p.client_events(h2.events.StreamEnded, sid) and down.response_flags == "UC"


def test_upstream_connection_lost_http_gets_503_uc():
    p = Proxy()
    sid, down = p.request(REQUEST)
    p.forward(down)
    sid2, down2 = p.request(REQUEST)
    up2 = p.forward(down2)
    respond_upstream(p, up2, RESPONSE, b"")  # a finished exchange is not touched
    sid3, down3 = p.request(REQUEST)
    up3 = p.forward(down3)
    p.server.send_headers(up3.id, RESPONSE)
    p.pump()
    p.up.conn.connection_lost()
    p.pump()
    headers = client_response(p, sid)
    assert headers[0] == (b":status", b"503") and (b"x-meshproxy-response-flags", b"UC") in headers
    assert down.response_flags == "UC"
    assert client_reset(p, sid2) is None
    assert client_reset(p, sid3) is not None, "a response already started can only be reset"


@pytest.mark.parametrize("how", ["goaway", "refused"])
def test_unprocessed_request_is_handed_back_and_sent_again_whole(how):
    # GOAWAY above the stream, or REFUSED_STREAM: the upstream never processed the request (RFC 9113
    # §8.7), so the core hands it back (EV_RETRY) with its body kept, and it goes out again elsewhere.
    p = Proxy()
    body = b"\0\0\0\0\x05hello"
    sid, down = p.request(GRPC, body=body)
    up = p.forward(down)
    assert p.up.received(up.id) == body
    if how == "goaway":
        p.server.close_connection(error_code=NO_ERROR, last_stream_id=0)
    else:
        p.server.reset_stream(up.id, REFUSED_STREAM)
    p.pump()
    assert up.unprocessed and up.state == "closed"
    assert (C.EV_RETRY, down) in (p.down.conn.take_events() or [])
    assert down.attempts == 1 and down.state != "closed"
    assert not p.client_events(h2.events.ResponseReceived, sid), "the client sees nothing of the first try"
    p.up = Pair(True, hold=True)  # another upstream connection
    p.up.pump()
    again = p.forward(down)
    assert p.up.received(again.id) == body, "the whole body, once"
    assert dict(p.server_request().headers)[b":path"] == dict(GRPC)[b":path"]
    respond_upstream(
        p, again, [(b":status", b"200"), (b"content-type", b"application/grpc")], b"", [(b"grpc-status", b"0")]
    )
    assert dict(client_response(p, sid))[b":status"] == b"200"


def test_unprocessed_request_with_a_body_over_the_replay_limit_gets_unavailable():
    p = Proxy(down_settings={"initial_window_size": 1 << 20}, up_settings={"initial_window_size": 1 << 20})
    sid, down = p.request(GRPC, end=False)
    p.forward(down)
    body = b"x" * (65536 + 1)
    for i in range(0, len(body), 16384):
        p.client.send_data(sid, body[i : i + 16384], end_stream=i + 16384 >= len(body))
        p.pump()
    p.server.close_connection(error_code=NO_ERROR, last_stream_id=0)
    p.pump()
    assert down.attempts == 0
    assert dict(client_response(p, sid))[b"grpc-status"] == b"14"


def test_downstream_connection_lost_cancels_upstream_streams():
    p = Proxy()
    ups = []
    for _ in range(3):
        _, down = p.request(POST, body=b"x", end=False)
        ups.append(p.forward(down))
    p.down.conn.connection_lost()
    p.pump()
    assert sorted((e.stream_id, e.error_code) for e in p.up.peer_of(h2.events.StreamReset)) == [
        (u.id, CANCEL) for u in ups
    ]
    assert all(u.state == "closed" for u in ups) and p.up.conn.active_streams == 0


def test_downstream_protocol_error_cancels_upstream_streams():
    p = Proxy()
    _, down = p.request(POST, body=b"x", end=False)
    up = p.forward(down)
    p.down.conn.receive(b"\0\0\x08\x06\0\0\0\0\x01" + b"12345678")  # PING on stream 1
    p.pump()
    assert [(e.stream_id, e.error_code) for e in p.up.peer_of(h2.events.StreamReset)] == [(up.id, CANCEL)]


# -- answers made by the proxy -------------------------------------------------------------------------------------


def test_respond_grpc_status_on_an_open_request():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0", end=False)
    events = p.down.conn.respond(down, 200, [(b"x-meshproxy-response-flags", b"NR")], b"", 12, "no route: ü 100%")
    p.pump()
    assert client_response(p, sid) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"12"),
        (b"grpc-message", b"no route: %C3%BC 100%25"),
        (b"x-meshproxy-response-flags", b"NR"),
    ]
    assert p.client_events(h2.events.StreamEnded, sid) and client_reset(p, sid) == NO_ERROR
    assert down.state == "closed" and events is None  # hold-mode streams do not notify unless asked


def test_respond_grpc_status_on_a_finished_request_sends_no_reset():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0", end=True)
    down.notify_close = True
    events = p.down.conn.respond(down, 200, grpc_status=5)
    p.pump()
    assert dict(client_response(p, sid))[b"grpc-status"] == b"5"
    assert b"grpc-message" not in dict(client_response(p, sid))
    assert client_reset(p, sid) is None and not of(p.down.wire_to_peer, RstStreamFrame)
    assert events == [(C.EV_CLOSED, down)]


def test_respond_http_with_a_body():
    p = Proxy()
    sid, down = p.request(REQUEST)
    p.down.conn.respond(down, 404, [(b"content-type", b"text/plain")], b"not here")
    p.pump()
    assert client_response(p, sid) == [
        (b":status", b"404"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"8"),
    ]
    assert p.down.received(sid) == b"not here" and client_reset(p, sid) is None


def test_respond_body_larger_than_the_window_is_not_truncated():
    p = Proxy(client_settings={INITIAL_WINDOW_SIZE: 10})
    sid, down = p.request(POST, body=b"x", end=False)
    p.down.conn.respond(down, 503, [], b"b" * 100)
    p.pump()
    assert p.down.received(sid) == b"b" * 100


def test_respond_on_a_linked_stream_cancels_upstream():
    p = Proxy()
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0")
    up = p.forward(down)
    p.down.conn.respond(down, 200, grpc_status=4, grpc_message="upstream request timeout")
    p.server.send_headers(up.id, GRPC_RESPONSE)  # in flight when the cancel arrives: ignored
    p.server.send_data(up.id, b"late")
    p.pump()
    assert dict(client_response(p, sid))[b"grpc-status"] == b"4"
    assert [(e.stream_id, e.error_code) for e in p.up.peer_of(h2.events.StreamReset)] == [(up.id, CANCEL)]
    assert len(p.client_events(h2.events.ResponseReceived, sid)) == 1 and not p.down.conn.terminated


def test_respond_after_the_response_started_does_nothing():
    p = Proxy()
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE)
    p.pump()
    p.down.conn.respond(down, 503, grpc_status=14)
    p.pump()
    assert client_response(p, sid) == RESPONSE and up.state != "closed"


# -- the Outbox ----------------------------------------------------------------------------------------------------


def test_outbox_writes_each_dirty_connection_once_with_a_fresh_buffer():
    box = C.Outbox()
    writes = []
    a, b = C.H2Connection(False, box), C.H2Connection(True, box)
    a.writer = lambda buf: writes.append(("a", buf))
    b.writer = lambda buf: writes.append(("b", buf))
    a.initiate()
    b.initiate()
    a.ping(b"11111111")
    box.flush()
    assert [w[0] for w in writes] == ["a", "b"] and a.pending_output == b.pending_output == 0
    first = writes[0][1]
    a.ping(b"22222222")
    box.flush()
    assert writes[-1][0] == "a" and writes[-1][1] is not first and first.endswith(b"11111111")
    box.flush()
    assert len(writes) == 3


def test_outbox_flushes_the_linked_connection_too():
    box = C.Outbox()
    p = Proxy(outbox=box)
    box.flush()  # nobody writes yet: the handshake went through data_to_send()
    _, down = p.request(REQUEST)
    up = p.forward(down)
    writes = []
    p.down.conn.writer = lambda buf: writes.append(("down", bytes(buf)))
    p.up.conn.writer = lambda buf: writes.append(("up", bytes(buf)))
    box.flush()
    assert writes == []
    p.server.send_headers(up.id, RESPONSE)
    p.server.send_data(up.id, b"via the outbox", end_stream=True)
    p.up.conn.receive(p.server.data_to_send())  # upstream bytes in...
    box.flush()  # ... downstream bytes out, in one write
    assert [w[0] for w in writes] == ["down"]
    got = p.client.receive_data(writes[0][1])
    assert [type(e) for e in got] == [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded]
    assert got[1].data == b"via the outbox"


# -- events the Python layer must see ------------------------------------------------------------------------------


def test_downstream_close_caused_by_upstream_is_reported():
    # The client has nothing more to say, so the downstream connection's receive() is not called again;
    # the close must reach the downstream connection's handler when the outbox is flushed.
    outbox = C.Outbox()
    p = Proxy(outbox=outbox)
    delivered = []
    p.down.conn.handler = delivered.extend
    _, down = p.request(REQUEST)
    down.notify_close = True  # as downstream.py sets it: the completion record
    up = p.forward(down)
    respond_upstream(p, up, RESPONSE, b"done")
    assert down.state == "closed"
    outbox.flush()
    assert (C.EV_CLOSED, down) in delivered
    assert p.down.conn.take_events() is None, "delivered once, not again"


# -- no window leaks when streams end early ------------------------------------------------------------------------


def upload(p: Proxy, sid: int, body: bytes, rounds: int = 200) -> int:
    sent = 0
    for _ in range(rounds):
        sent = feed(p.client, sid, body, sent)
        p.pump()
        if sent == len(body):
            break
    return sent


def download(p: Proxy, up: C.Stream, body: bytes, rounds: int = 200) -> int:
    sent = 0
    for _ in range(rounds):
        sent = feed(p.server, up.id, body, sent)
        p.pump()
        if sent == len(body):
            break
    return sent


def test_held_request_body_of_a_cancelled_stream_returns_the_connection_window():
    p = Proxy(down_settings={"initial_window_size": 65535, "connection_window": 65535})
    sid, down = p.request(POST, end=False)
    assert upload(p, sid, b"h" * 60000, rounds=3) == 60000 and down.held_bytes == 60000  # never linked
    p.client.reset_stream(sid, CANCEL)
    p.pump()
    sid2, down2 = p.request(POST, end=False)
    up2 = p.forward(down2)
    body = os.urandom(200_000)
    assert upload(p, sid2, body) == len(body)
    assert p.up.received(up2.id) == body


def test_cancelled_upload_queued_upstream_returns_the_downstream_connection_window():
    window = 4 * 65535
    p = Proxy(server_acks=False, down_settings={"initial_window_size": window, "connection_window": window})
    sid, down = p.request(POST, end=False)
    up = p.forward(down)
    assert upload(p, sid, os.urandom(window), rounds=5) == window
    assert up.pending_bytes == window - 65535  # the server took its 65535 and reads no more
    p.client.reset_stream(sid, CANCEL)
    p.pump()
    p.up.auto_ack = True
    sid2, down2 = p.request(POST, end=False)
    p.forward(down2)
    body = os.urandom(2 * 65535)
    assert upload(p, sid2, body) == len(body), "the downstream connection window never came back"


def test_upstream_reset_after_a_complete_response_returns_the_upstream_connection_window():
    window = 4 * 65535
    p = Proxy(client_acks=False, up_settings={"initial_window_size": window, "connection_window": window})
    sid, down = p.request(POST, body=b"x", end=False)
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE)
    assert feed(p.server, up.id, os.urandom(window), 0) == window  # the whole response, END_STREAM...
    p.server.reset_stream(up.id, NO_ERROR)  # ... then stop the request body (§8.1)
    p.pump()
    assert down.pending_bytes == window - 65535
    for ev in p.client_events(h2.events.DataReceived, sid):
        p.client.acknowledge_received_data(ev.flow_controlled_length, sid)
    p.down.auto_ack = True
    p.pump()
    assert len(p.down.received(sid)) == window  # the client got all of it...
    _, down2 = p.request(REQUEST)
    up2 = p.forward(down2)
    p.server.send_headers(up2.id, RESPONSE)
    body = os.urandom(65535)
    assert download(p, up2, body) == len(body), "... but the upstream connection window never came back"


def test_informational_response_then_upstream_reset_still_answers_503():
    p = Proxy()
    sid, down = p.request(REQUEST)
    up = p.forward(down)
    p.server.send_headers(up.id, [(b":status", b"100")])
    p.pump()
    p.server.reset_stream(up.id, INTERNAL_ERROR)
    p.pump()
    assert p.client_events(h2.events.InformationalResponseReceived, sid)
    assert client_response(p, sid)[0] == (b":status", b"503"), "a 1xx is not the start of the response"


def test_trailers_wait_behind_data_queued_for_a_slow_client():
    p = Proxy(client_acks=False)
    sid, down = p.request(GRPC, body=b"\0\0\0\0\0")
    up = p.forward(down)
    p.server.send_headers(up.id, GRPC_RESPONSE)
    body = os.urandom(100_000)
    assert feed(p.server, up.id, body, 0, end=False) == len(body)
    p.server.send_headers(up.id, [(b"grpc-status", b"0")], end_stream=True)
    p.pump()
    assert up.state == "closed" and down.pending_bytes == 100_000 - 65535
    assert not p.client_events(h2.events.TrailersReceived, sid)
    for ev in p.client_events(h2.events.DataReceived, sid):
        p.client.acknowledge_received_data(ev.flow_controlled_length, sid)
    p.down.auto_ack = True
    p.pump()
    assert p.down.received(sid) == body
    assert p.client_events(h2.events.TrailersReceived, sid)[0].headers == [(b"grpc-status", b"0")]
    assert down.state == "closed"
