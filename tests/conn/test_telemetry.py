"""What the core notes for telemetry, on both twins: gRPC messages counted on DATA (prefixes and bodies across
frame boundaries, several per frame), the status and grpc-status a server-role stream SENT (forwarded,
trailers-only, respond()), and W3C trace context in open_forward by ``trace_mode``: passed through (0),
ensured (1: created when absent or invalid, the trace id from B3 if there), and the proxy's child span (2)."""

from __future__ import annotations

import os
import re
import struct

import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy import conn_py
from tests.conn import peers
from tests.conn.conftest import COMPILED
from tests.conn.peers import GRPC, GRPC_RESPONSE, POST, REQUEST, Pair, Proxy, Raw, data, headers_frame, respond_upstream

TRACEPARENT = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")
TID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"
INCOMING = b"00-" + TID + b"-" + PARENT + b"-01"


def grpc_messages(*bodies: bytes) -> bytes:
    return b"".join(b"\0" + struct.pack(">I", len(b)) + b for b in bodies)


def sent_upstream(p: Proxy) -> list[tuple[bytes, bytes]]:
    return p.server_request().headers


def header_values(headers, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


def traced(C, mode: int, extra=(), sampling: float = 1.0, grpc: bool = True) -> tuple[object, list]:
    """A request with ``extra`` headers through a proxy whose downstream connection has ``trace_mode``."""
    p = Proxy()
    p.down.conn.trace_mode = mode
    p.down.conn.trace_sampling = sampling
    _, down = p.request([*(GRPC if grpc else REQUEST), *extra])
    p.forward(down)
    return down, sent_upstream(p)


# -- gRPC messages ---------------------------------------------------------------------------------------------


def test_messages_are_counted_both_ways_across_frames(C):
    p = Proxy()
    body = grpc_messages(b"a" * 10, b"", b"b" * 3)
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, GRPC)
    # the first prefix split 2 + 3 bytes, the second message whole with the third's prefix start, the rest
    for chunk in (body[:2], body[2:5], body[5:22], body[22:]):
        p.client.send_data(sid, chunk)
    p.client.end_stream(sid)
    p.down.to_conn()
    down = next(e[1] for e in p.down.events if e[0] == C.EV_REQUEST)
    up = p.forward(down)
    assert down.grpc_msgs_recv == 3 and up.grpc_msgs_recv == 0
    respond_upstream(p, up, GRPC_RESPONSE, grpc_messages(b"x", b"yy", b"") + b"\0\0\0", [(b"grpc-status", b"0")])
    # three whole messages in one frame and a prefix cut short: only complete prefixes count
    assert up.grpc_msgs_recv == 3 and down.grpc_msgs_recv == 3
    assert p.down.received(sid) == grpc_messages(b"x", b"yy", b"") + b"\0\0\0"


def test_non_grpc_bodies_are_not_counted(C):
    p = Proxy()
    _, down = p.request(POST, body=grpc_messages(b"hello"))
    up = p.forward(down)
    respond_upstream(p, up, [(b":status", b"200")], grpc_messages(b"x", b"y"))
    assert down.grpc_msgs_recv == 0 and up.grpc_msgs_recv == 0 and down.data_recv == 10


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bodies=st.lists(st.binary(max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    keep=st.integers(min_value=0, max_value=400),
)
def test_messages_counted_for_any_frame_boundaries(C, bodies, cuts, keep):
    wire = grpc_messages(*bodies)
    wire = wire[: min(keep, len(wire))] if keep < len(wire) else wire
    # the messages whose 5-byte prefix is entirely inside what was sent
    expected, pos = 0, 0
    for b in bodies:
        if pos + 5 <= len(wire):
            expected += 1
        pos += 5 + len(b)
    r = Raw()
    r.request(1, GRPC, end_stream=False)
    points = sorted({c for c in cuts if 0 < c < len(wire)})
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        r.send(data(1, wire[a:b]))
    stream = r.conn.get_stream(1)
    assert stream.grpc_msgs_recv == expected


# -- what a server-role stream sent -----------------------------------------------------------------------------


def test_forwarded_status_and_trailers_grpc_status_are_what_was_sent(C):
    p = Proxy()
    _, down = p.request(GRPC, body=grpc_messages(b""))
    up = p.forward(down)
    assert (down.status, down.grpc_status) == (0, -1)
    p.server.send_headers(up.id, GRPC_RESPONSE)
    p.pump()
    assert (down.status, down.grpc_status) == (200, -1)
    p.server.send_headers(up.id, [(b"grpc-status", b"7"), (b"grpc-message", b"nope")], end_stream=True)
    p.pump()
    assert (down.status, down.grpc_status) == (200, 7) and (up.status, up.grpc_status) == (200, 7)


def test_trailers_only_forwarded(C):
    p = Proxy()
    _, down = p.request(GRPC, body=grpc_messages(b""))
    up = p.forward(down)
    respond_upstream(p, up, [*GRPC_RESPONSE, (b"grpc-status", b"14")])
    assert (down.status, down.grpc_status) == (200, 14) and down.state == "closed"


def test_http_status_forwarded(C):
    p = Proxy()
    _, down = p.request(REQUEST)
    up = p.forward(down)
    respond_upstream(p, up, [(b":status", b"503")], b"busy")
    assert (down.status, down.grpc_status) == (503, -1)


def test_respond_sets_what_was_sent(C):
    p = Proxy()
    _, a = p.request(GRPC, body=grpc_messages(b""))
    p.down.conn.respond(a, 200, grpc_status=4, grpc_message="deadline")
    _, b = p.request(REQUEST)
    p.down.conn.respond(b, 404, [(b"content-type", b"text/plain")], b"not here")
    p.pump()
    assert (a.status, a.grpc_status) == (200, 4)
    assert (b.status, b.grpc_status) == (404, -1)


def test_informational_headers_do_not_count_as_the_status(C):
    pair = Pair(False)
    sid = pair.peer.get_next_available_stream_id()
    pair.peer.send_headers(sid, REQUEST, end_stream=True)
    pair.to_conn()
    s = pair.conn.get_stream(sid)
    pair.conn.send_headers(s, [(b":status", b"103"), (b"link", b"</a>")])
    assert s.status == 0
    pair.conn.send_headers(s, [(b":status", b"201")], end_stream=True)
    assert s.status == 201


def test_a_grpc_status_the_client_sends_is_not_the_streams(C):
    r = Raw()
    r.request(1, [*GRPC, (b"grpc-status", b"5")], end_stream=False)
    r.send(headers_frame(1, r.block([(b"grpc-status", b"9")]), end_stream=True))
    assert r.conn.get_stream(1).grpc_status == -1


def test_no_response_sent_leaves_status_zero(C):
    p = Proxy()
    _, down = p.request(REQUEST)
    p.down.conn.reset_stream(down)
    assert (down.status, down.grpc_status) == (0, -1)


# -- trace context ----------------------------------------------------------------------------------------------


def test_mode_0_passes_traceparent_untouched_and_reads_it(C):
    extra = [(b"traceparent", INCOMING), (b"tracestate", b"a=1")]
    down, sent = traced(C, 0, extra)
    assert header_values(sent, b"traceparent") == [INCOMING]
    assert header_values(sent, b"tracestate") == [b"a=1"]
    assert (down.trace_id, down.parent_span_id, down.span_id, down.sampled) == (TID, PARENT, b"", True)


def test_mode_0_adds_nothing(C):
    down, sent = traced(C, 0)
    assert not header_values(sent, b"traceparent")
    assert (down.trace_id, down.parent_span_id, down.span_id, down.sampled) == (b"", b"", b"", False)


@pytest.mark.parametrize("grpc", [True, False], ids=["grpc", "http"])
def test_mode_1_creates_a_traceparent(C, grpc):
    down, sent = traced(C, 1, grpc=grpc)
    (tp,) = header_values(sent, b"traceparent")
    m = TRACEPARENT.match(tp)
    assert m, tp
    assert m.group(1) == down.trace_id and m.group(2) == down.span_id and m.group(3) == b"01"
    assert int(m.group(1), 16) and int(m.group(2), 16)
    assert down.parent_span_id == b"" and down.sampled


def test_mode_1_keeps_a_valid_traceparent(C):
    down, sent = traced(C, 1, [(b"traceparent", INCOMING)])
    assert header_values(sent, b"traceparent") == [INCOMING]
    assert (down.trace_id, down.parent_span_id, down.span_id, down.sampled) == (TID, PARENT, b"", True)


@pytest.mark.parametrize("flags", [b"00", b"01", b"03"])
def test_mode_2_makes_the_proxy_the_parent(C, flags):
    incoming = b"00-" + TID + b"-" + PARENT + b"-" + flags
    extra = [(b"x-first", b"1"), (b"traceparent", incoming), (b"tracestate", b"v=2"), (b"x-b3-traceid", b"1" * 16)]
    down, sent = traced(C, 2, extra)
    (tp,) = header_values(sent, b"traceparent")
    assert tp == b"00-" + TID + b"-" + down.span_id + b"-" + flags
    assert down.span_id != PARENT and re.fullmatch(rb"[0-9a-f]{16}", down.span_id)
    assert (down.trace_id, down.parent_span_id, down.sampled) == (TID, PARENT, flags != b"00")
    names = [k for k, _ in sent if not k.startswith(b":")]
    assert names.index(b"traceparent") == names.index(b"x-first") + 1  # replaced where it was
    assert header_values(sent, b"tracestate") == [b"v=2"] and header_values(sent, b"x-b3-traceid") == [b"1" * 16]


def test_mode_2_creates_when_absent(C):
    down, sent = traced(C, 2)
    (tp,) = header_values(sent, b"traceparent")
    assert TRACEPARENT.match(tp) and tp[36:52] == down.span_id and down.parent_span_id == b""


@pytest.mark.parametrize(
    ("b3", "trace_id", "flags"),
    [
        ([(b"x-b3-traceid", b"a3ce929d0e0e4736")], b"0" * 16 + b"a3ce929d0e0e4736", b"01"),
        ([(b"x-b3-traceid", TID.upper())], TID, b"01"),
        ([(b"x-b3-traceid", TID), (b"x-b3-sampled", b"0")], TID, b"00"),
        ([(b"x-b3-traceid", TID), (b"x-b3-sampled", b"1")], TID, b"01"),
        ([(b"x-b3-sampled", b"true")], None, b"01"),
        ([(b"x-b3-traceid", TID), (b"x-b3-sampled", b"0"), (b"x-b3-flags", b"1")], TID, b"01"),
        ([(b"x-b3-traceid", b"0" * 32)], None, b"01"),
        ([(b"x-b3-traceid", b"xyz")], None, b"01"),
    ],
    ids=["64-bit", "uppercase", "not-sampled", "sampled", "no-trace-id", "debug", "zero", "garbage"],
)
def test_b3_headers_give_the_trace_id_and_sampling_and_pass_unchanged(C, b3, trace_id, flags):
    extra = [*b3, (b"x-b3-spanid", b"b7ad6b7169203331")]
    down, sent = traced(C, 1, extra)
    (tp,) = header_values(sent, b"traceparent")
    m = TRACEPARENT.match(tp)
    assert m and m.group(3) == flags
    if trace_id is not None:
        assert m.group(1) == trace_id == down.trace_id
    else:
        assert int(m.group(1), 16) != 0
    for name, value in extra:
        assert header_values(sent, name) == [value]


INVALID = {
    "version-ff": b"ff-" + TID + b"-" + PARENT + b"-01",
    "uppercase": b"00-" + TID.upper() + b"-" + PARENT + b"-01",
    "zero-trace": b"00-" + b"0" * 32 + b"-" + PARENT + b"-01",
    "zero-parent": b"00-" + TID + b"-" + b"0" * 16 + b"-01",
    "short": INCOMING[:-1],
    "v00-longer": INCOMING + b"-x",
    "bad-dash": INCOMING.replace(b"-", b"_", 1),
    "bad-flags": INCOMING[:-2] + b"zz",
}


@pytest.mark.parametrize("value", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_traceparent_is_replaced_not_forwarded(C, value):
    down, sent = traced(C, 1, [(b"traceparent", value)])
    (tp,) = header_values(sent, b"traceparent")
    m = TRACEPARENT.match(tp)
    assert m and tp != value and m.group(1) == down.trace_id != TID and down.parent_span_id == b""


@pytest.mark.parametrize("value", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_traceparent_in_mode_0_passes_but_is_not_read(C, value):
    down, sent = traced(C, 0, [(b"traceparent", value)])
    assert header_values(sent, b"traceparent") == [value] and down.trace_id == b""


def test_a_later_version_is_read_and_rewritten_as_version_00(C):
    later = b"cc-" + TID + b"-" + PARENT + b"-01-what-the-future-holds"
    down, sent = traced(C, 1, [(b"traceparent", later)])
    assert header_values(sent, b"traceparent") == [later] and down.trace_id == TID
    down, sent = traced(C, 2, [(b"traceparent", later)])
    assert header_values(sent, b"traceparent") == [b"00-" + TID + b"-" + down.span_id + b"-01"]


def test_repeated_traceparents_are_invalid_and_become_one(C):
    extra = [(b"traceparent", INCOMING), (b"traceparent", INCOMING)]
    down, sent = traced(C, 0, extra)
    assert header_values(sent, b"traceparent") == [INCOMING, INCOMING] and down.trace_id == b""
    down, sent = traced(C, 1, extra)
    (tp,) = header_values(sent, b"traceparent")
    assert TRACEPARENT.match(tp) and down.trace_id != TID


def test_sampling_decides_the_flag_of_new_traces(C):
    down, sent = traced(C, 1, sampling=0.0)
    assert header_values(sent, b"traceparent")[0].endswith(b"-00") and not down.sampled
    p = Proxy()
    p.down.conn.trace_mode = 1
    p.down.conn.trace_sampling = 0.5
    flags = set()
    for _ in range(64):
        _, down = p.request(REQUEST)
        up = p.forward(down)
        flags.add(down.sampled)
        respond_upstream(p, up, [(b":status", b"204")])
    assert flags == {True, False}  # 2^-63 odds of a false failure


def test_a_retried_request_carries_the_same_trace(C):
    p = Proxy()
    p.down.conn.trace_mode = 2
    _, down = p.request([*GRPC, (b"traceparent", INCOMING)], body=grpc_messages(b"hi"))
    up = p.forward(down)
    first = header_values(sent_upstream(p), b"traceparent")
    assert C.abandon(down)
    p.pump()
    p.up = Pair(True, hold=True)
    p.up.pump()
    p.forward(down)
    assert header_values(sent_upstream(p), b"traceparent") == first and up.state == "closed"
    assert first == [b"00-" + TID + b"-" + down.span_id + b"-01"]


def test_the_twins_make_the_same_ids(monkeypatch):
    if COMPILED is None:
        pytest.skip("the compiled twin is not built")
    got = []
    for mod in (COMPILED, conn_py):
        monkeypatch.setattr(os, "urandom", lambda n: bytes(range(3, 3 + n)))
        monkeypatch.setattr(peers, "C", mod)
        out = []
        for mode, sampling, extra in ((1, 1.0, ()), (1, 0.3, ()), (2, 1.0, [(b"traceparent", INCOMING)])):
            down, sent = traced(mod, mode, extra, sampling)
            out.append((header_values(sent, b"traceparent"), down.trace_id, down.span_id, down.sampled))
        got.append(out)
    assert got[0] == got[1]


def test_trace_settings_are_checked(C):
    c = C.H2Connection(False)
    assert (c.trace_mode, c.trace_sampling) == (0, 1.0)
    c.trace_mode = 2
    c.trace_sampling = 0
    assert (c.trace_mode, c.trace_sampling) == (2, 0.0)
    for bad in (3, -1, "1", 1.5):
        with pytest.raises(ValueError):
            c.trace_mode = bad
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError):
            c.trace_sampling = bad
    with pytest.raises(TypeError):
        c.trace_sampling = "0.5"
    assert (c.trace_mode, c.trace_sampling) == (2, 0.0)


def test_trailers_pass_with_mode_set(C):
    # the request's own DATA and trailers are unaffected by tracing
    p = Proxy()
    p.down.conn.trace_mode = 1
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, GRPC)
    p.client.send_data(sid, grpc_messages(b"a"))
    p.client.send_headers(sid, [(b"x-t", b"1")], end_stream=True)
    p.down.to_conn()
    down = next(e[1] for e in p.down.events if e[0] == C.EV_REQUEST)
    p.forward(down)
    assert p.up.peer_of(h2.events.TrailersReceived)[0].headers == [(b"x-t", b"1")]
    assert down.grpc_msgs_recv == 1


UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize("grpc", [True, False])
def test_a_request_the_proxy_answers_gets_an_x_request_id_too(C, grpc):
    p = Proxy()
    _, down = p.request(GRPC if grpc else REQUEST)
    assert down.request_id is None
    if grpc:
        p.down.conn.respond(down, 200, (), b"", 12, "no route")
    else:
        p.down.conn.respond(down, 404, (), b"no route")
    p.pump()
    assert UUID4.fullmatch(down.request_id)
    # Not sent back (Envoy does not either, by default): it is for the access log and traces.
    (resp,) = [e for e in p.client_events(h2.events.ResponseReceived)]
    assert b"x-request-id" not in dict(resp.headers)


def test_an_answered_request_keeps_its_own_x_request_id_and_none_is_made_when_not_generating(C):
    p = Proxy()
    _, down = p.request([*REQUEST, (b"x-request-id", b"client-chosen")])
    p.down.conn.respond(down, 404, (), b"no route")
    assert down.request_id == b"client-chosen"
    p = Proxy(generate_request_id=False)
    _, down = p.request(REQUEST)
    p.down.conn.respond(down, 404, (), b"no route")
    assert down.request_id is None
