"""Header validation (RFC 9113 §8.1-8.3): a malformed message resets its own stream; the connection and the
other streams live on. Valid messages, trailers, informational responses and CONNECT get through."""

from __future__ import annotations

import h2.events
import pytest

from meshproxy._fast import conn as C
from tests.conn.peers import (
    GRPC,
    POST,
    PROTOCOL_ERROR,
    REQUEST,
    RESPONSE,
    STREAM_CLOSED,
    Pair,
    Raw,
    data,
    events_of,
    headers_frame,
    resets,
)

M, S, P, A = (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"svc")

MALFORMED_REQUESTS = {
    "uppercase-name": [M, S, P, A, (b"X-Foo", b"1")],
    "space-in-name": [M, S, P, A, (b"x foo", b"1")],
    "colon-in-name": [M, S, P, A, (b"x:foo", b"1")],
    "empty-name": [M, S, P, A, (b"", b"1")],
    "del-in-name": [M, S, P, A, (b"x\x7f", b"1")],
    "connection": [M, S, P, A, (b"connection", b"close")],
    "keep-alive": [M, S, P, A, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [M, S, P, A, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [M, S, P, A, (b"transfer-encoding", b"chunked")],
    "upgrade": [M, S, P, A, (b"upgrade", b"h2c")],
    "te-gzip": [M, S, P, A, (b"te", b"gzip")],
    "te-trailers-gzip": [M, S, P, A, (b"te", b"trailers, gzip")],
    "pseudo-after-regular": [M, S, P, (b"x", b"1"), A],
    "unknown-pseudo": [M, S, P, A, (b":foo", b"bar")],
    "duplicate-path": [M, S, P, (b":path", b"/again"), A],
    "duplicate-method": [M, (b":method", b"POST"), S, P, A],
    "missing-method": [S, P, A],
    "missing-scheme": [M, P, A],
    "missing-path": [M, S, A],
    "status-in-request": [M, S, P, A, (b":status", b"200")],
    "empty-path": [M, S, (b":path", b""), A],
    "relative-path": [M, S, (b":path", b"index.html"), A],
    "asterisk-path-get": [M, S, (b":path", b"*"), A],
    "cr-in-value": [M, S, P, A, (b"x", b"a\rb")],
    "lf-in-value": [M, S, P, A, (b"x", b"a\nb")],
    "nul-in-value": [M, S, P, A, (b"x", b"a\0b")],
    "leading-space": [M, S, P, A, (b"x", b" a")],
    "trailing-space": [M, S, P, A, (b"x", b"a ")],
    "leading-tab": [M, S, P, A, (b"x", b"\ta")],
    "trailing-tab": [M, S, P, A, (b"x", b"a\t")],
    "content-length-not-a-number": [M, S, P, A, (b"content-length", b"12a")],
    "content-length-negative": [M, S, P, A, (b"content-length", b"-1")],
    "content-length-twice-differing": [M, S, P, A, (b"content-length", b"1"), (b"content-length", b"2")],
    "connect-with-path": [(b":method", b"CONNECT"), A, P],
    "connect-with-scheme": [(b":method", b"CONNECT"), A, S],
    "connect-without-authority": [(b":method", b"CONNECT")],
}


def answered_by_reset(r: Raw, sid: int, code: int = PROTOCOL_ERROR) -> None:
    assert resets(r.read()) == {sid: code}
    assert r.alive


def live_stream_still_works(r: Raw, sid: int = 1) -> None:
    """Stream ``sid`` (opened with POST, body pending) still takes DATA and a response."""
    r.send(data(sid, b"still", end=True))
    assert events_of(r.events, C.EV_DATA)[-1][1].id == sid and events_of(r.events, C.EV_DATA)[-1][2] == b"still"
    s = r.conn.get_stream(sid)
    r.conn.send_headers(s, RESPONSE, end_stream=True)
    assert s.state == "closed" and not resets(r.read())


@pytest.mark.parametrize("headers", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_malformed_request_resets_only_its_stream(headers):
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, headers)
    answered_by_reset(r, 3)
    assert [e[1].id for e in events_of(r.events, C.EV_REQUEST)] == [1]
    r.request(5)  # the HPACK state is intact, and new streams are welcome
    assert events_of(r.events, C.EV_REQUEST)[-1][1].id == 5
    live_stream_still_works(r)


def test_protocol_pseudo_header_without_extended_connect_is_malformed():
    r = Raw()
    r.request(1, [M, S, P, A, (b":protocol", b"websocket")])
    answered_by_reset(r, 1)  # RFC 8441 §3, RFC 9113 §8.3: an undefined pseudo-header


def test_host_differing_from_authority_is_malformed():
    r = Raw()
    r.request(1, [*REQUEST, (b"host", b"other.example")])
    answered_by_reset(r, 1)  # §8.3.1: a server SHOULD treat it as malformed (routing and the app would disagree)


VALID_REQUESTS = {
    "plain": REQUEST,
    "te-trailers": [*REQUEST, (b"te", b"trailers")],
    "options-asterisk": [(b":method", b"OPTIONS"), S, (b":path", b"*"), A],
    "no-authority": [M, S, P],
    "empty-value": [*REQUEST, (b"x-empty", b"")],
    "inner-space": [*REQUEST, (b"x", b"a b\tc")],
    "obs-text": [*REQUEST, (b"x", b"caf\xc3\xa9")],
    "content-length-repeated-equal": [*REQUEST, (b"content-length", b"0"), (b"content-length", b"0")],
    "non-http-scheme-relative-path": [M, (b":scheme", b"foo"), (b":path", b"bar"), A],
}


@pytest.mark.parametrize("headers", VALID_REQUESTS.values(), ids=VALID_REQUESTS.keys())
def test_valid_requests_are_delivered(headers):
    r = Raw()
    r.request(1, headers)
    assert not resets(r.read())
    (ev,) = events_of(r.events, C.EV_REQUEST)
    assert ev[1].headers == headers


def test_request_fields_are_recorded():
    r = Raw()
    r.request(1, [*GRPC, (b"grpc-timeout", b"250m"), (b"x-request-id", b"abc"), (b"content-length", b"5")], False)
    s = r.events[-1][1]
    assert (s.method, s.scheme, s.path, s.authority) == (b"POST", b"http", b"/pkg.Svc/Call", b"svc")
    assert s.is_grpc and s.grpc_timeout_ns == 250_000_000 and s.request_id == b"abc" and s.content_length == 5
    assert not s.head


def test_host_stands_in_for_a_missing_authority():
    r = Raw()
    r.request(1, [M, S, P, (b"host", b"example.com")])
    assert r.events[-1][1].authority == b"example.com"


def test_connect_form():
    r = Raw()
    r.request(1, [(b":method", b"CONNECT"), (b":authority", b"db:5432")], end_stream=False)
    s = r.events[-1][1]
    assert (s.method, s.authority, s.path, s.scheme) == (b"CONNECT", b"db:5432", None, None)
    r.send(data(1, b"tunnel bytes"))
    assert events_of(r.events, C.EV_DATA)[0][2] == b"tunnel bytes"


# -- content-length ------------------------------------------------------------------------------------------------


def test_content_length_with_too_much_data():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, [*POST, (b"content-length", b"5")], end_stream=False)
    r.send(data(3, b"abc"), data(3, b"def"))
    answered_by_reset(r, 3)
    live_stream_still_works(r)


def test_content_length_with_too_little_data_at_end_stream():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, [*POST, (b"content-length", b"5")], end_stream=False)
    r.send(data(3, b"abcd", end=True))
    answered_by_reset(r, 3)
    live_stream_still_works(r)


def test_content_length_with_end_stream_on_headers():
    r = Raw()
    r.request(1, [*POST, (b"content-length", b"5")], end_stream=True)
    answered_by_reset(r, 1)


def test_content_length_matching_is_fine():
    r = Raw()
    r.request(1, [*POST, (b"content-length", b"6")], end_stream=False)
    r.send(data(1, b"abc"), data(1, b"def", end=True))
    assert not resets(r.read()) and [e[2] for e in events_of(r.events, C.EV_DATA)] == [b"abc", b"def"]


def test_content_length_violations_do_not_leak_the_connection_window():
    r = Raw()
    bad = [*POST, (b"content-length", b"0")]
    for sid in range(1, 2 * 300, 2):  # 300 x 16384 = 4.9 MB, more than our 4 MB connection window
        r.request(sid, bad, end_stream=False)
        r.send(data(sid, b"x" * 16384))
        assert r.alive, r.read()[-1]


# -- trailers ------------------------------------------------------------------------------------------------------


def test_valid_trailers_are_delivered():
    r = Raw()
    r.request(1, GRPC, end_stream=False)
    r.send(data(1, b"\0\0\0\0\0"), headers_frame(1, r.block([(b"x-checksum", b"abc")]), end_stream=True))
    (ev,) = events_of(r.events, C.EV_TRAILERS)
    assert ev[1].trailers == [(b"x-checksum", b"abc")] and ev[1].state == "half_closed_remote"


def test_trailers_without_end_stream_reset_the_stream():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    r.send(headers_frame(3, r.block([(b"x-t", b"1")]), end_stream=False))
    answered_by_reset(r, 3)
    live_stream_still_works(r)


@pytest.mark.parametrize(
    "trailers",
    [[(b":path", b"/")], [(b"x", b"1"), (b":status", b"200")], [(b"Bad", b"1")], [(b"connection", b"x")]],
    ids=["pseudo", "pseudo-late", "uppercase", "connection"],
)
def test_malformed_trailers_reset_the_stream(trailers):
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    r.send(headers_frame(3, r.block(trailers), end_stream=True))
    answered_by_reset(r, 3)
    live_stream_still_works(r)


def test_trailers_after_end_stream_are_stream_closed():
    r = Raw()
    r.request(1, POST, end_stream=True)
    r.send(headers_frame(1, r.block([(b"x", b"1")]), end_stream=True))
    answered_by_reset(r, 1, STREAM_CLOSED)


# -- responses (client role) ---------------------------------------------------------------------------------------

MALFORMED_RESPONSES = {
    "missing-status": [(b"x", b"1")],
    "status-not-a-number": [(b":status", b"abc")],
    "status-four-digits": [(b":status", b"2000")],
    "status-below-100": [(b":status", b"099")],
    "request-pseudo": [(b":status", b"200"), (b":path", b"/")],
    "duplicate-status": [(b":status", b"200"), (b":status", b"204")],
    "uppercase": [(b":status", b"200"), (b"Server", b"x")],
    "connection": [(b":status", b"200"), (b"transfer-encoding", b"chunked")],
}


@pytest.mark.parametrize("headers", MALFORMED_RESPONSES.values(), ids=MALFORMED_RESPONSES.keys())
def test_malformed_response_resets_only_its_stream(headers):
    r = Raw(client=True)
    a = r.conn.open_stream(REQUEST, end_stream=True)
    b = r.conn.open_stream(REQUEST, end_stream=True)
    r.read()
    r.send(headers_frame(3, r.block(headers), end_stream=True))
    answered_by_reset(r, 3)
    assert b.state == "closed" and not events_of(r.events, C.EV_RESPONSE)
    r.send(headers_frame(1, r.block(RESPONSE), end_stream=True))
    assert a.status == 200 and a.state == "closed"


def test_informational_then_final_response():
    r = Raw(client=True)
    s = r.conn.open_stream(POST)
    r.send(headers_frame(1, r.block([(b":status", b"100")])))
    assert not events_of(r.events, C.EV_RESPONSE) and not s.recv_headers
    r.send(headers_frame(1, r.block([(b":status", b"103"), (b"link", b"</a.css>")])))
    r.send(headers_frame(1, r.block([(b":status", b"201"), (b"content-length", b"2")])), data(1, b"ok", end=True))
    assert [e[1] for e in events_of(r.events, C.EV_RESPONSE)] == [s]
    assert s.status == 201 and s.headers == [(b":status", b"201"), (b"content-length", b"2")]
    assert events_of(r.events, C.EV_DATA)[0][2:] == (b"ok", True) and r.alive


def test_informational_response_with_end_stream_is_malformed():
    r = Raw(client=True)
    r.conn.open_stream(POST)
    r.send(headers_frame(1, r.block([(b":status", b"100")]), end_stream=True))
    answered_by_reset(r, 1)


def test_second_final_response_without_end_stream_is_malformed():
    r = Raw(client=True)
    r.conn.open_stream(REQUEST, end_stream=True)
    r.send(headers_frame(1, r.block(RESPONSE)), headers_frame(1, r.block(RESPONSE)))
    answered_by_reset(r, 1)


def test_response_content_length_is_checked():
    r = Raw(client=True)
    r.conn.open_stream(REQUEST, end_stream=True)
    r.send(headers_frame(1, r.block([(b":status", b"200"), (b"content-length", b"3")])), data(1, b"ab", end=True))
    answered_by_reset(r, 1)


@pytest.mark.parametrize(
    ("method", "status"), [(b"HEAD", b"200"), (b"GET", b"204"), (b"GET", b"304")], ids=["head", "204", "304"]
)
def test_content_length_without_a_body_is_fine_where_no_body_is_allowed(method, status):
    r = Raw(client=True)
    s = r.conn.open_stream([(b":method", method), S, P, A], end_stream=True)
    r.send(headers_frame(1, r.block([(b":status", status), (b"content-length", b"1234")]), end_stream=True))
    assert not resets(r.read()) and s.state == "closed" and s.error_code == -1


def test_response_trailers_are_delivered():
    r = Raw(client=True)
    s = r.conn.open_stream(GRPC)
    r.conn.send_data(s, b"\0\0\0\0\0", end_stream=True)
    r.send(headers_frame(1, r.block([(b":status", b"200"), (b"content-type", b"application/grpc")])))
    r.send(data(1, b"\0\0\0\0\0"), headers_frame(1, r.block([(b"grpc-status", b"7")]), end_stream=True))
    assert [e[0] for e in r.events] == [C.EV_RESPONSE, C.EV_DATA, C.EV_TRAILERS, C.EV_CLOSED]
    assert s.grpc_status == 7 and s.trailers == [(b"grpc-status", b"7")]


# -- what we send, judged by h2 ------------------------------------------------------------------------------------


def test_h2_accepts_our_response_data_and_trailers():
    p = Pair(client=False)
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, GRPC, end_stream=True)
    p.pump()
    s = p.events[-1][1]
    p.conn.send_headers(s, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    p.conn.send_data(s, b"\0\0\0\0\0")
    p.conn.send_headers(s, [(b"grpc-status", b"0")])
    p.pump()
    assert p.peer_of(h2.events.ResponseReceived)[0].headers[0] == (b":status", b"200")
    assert p.received(sid) == b"\0\0\0\0\0"
    assert p.peer_of(h2.events.TrailersReceived)[0].headers == [(b"grpc-status", b"0")]
    assert p.peer_of(h2.events.StreamEnded) and s.state == "closed"


def test_send_headers_informational_then_final_response():
    p = Pair(client=False)
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, POST, end_stream=True)
    p.pump()
    s = p.events[-1][1]
    p.conn.send_headers(s, [(b":status", b"103"), (b"link", b"</a.css>")])
    p.conn.send_headers(s, RESPONSE)  # the final response: must not carry END_STREAM
    p.conn.send_data(s, b"body", end_stream=True)
    p.pump()
    assert p.peer_of(h2.events.InformationalResponseReceived)[0].headers[0] == (b":status", b"103")
    assert p.peer_of(h2.events.ResponseReceived)[0].headers == RESPONSE
    assert p.received(sid) == b"body"
