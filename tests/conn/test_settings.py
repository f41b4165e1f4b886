"""The preface and SETTINGS (RFC 9113 §3.4, §6.5): the exchange, the ACK, and each of the six settings honoured."""

from __future__ import annotations

import h2.events
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from meshproxy._fast import conn as C
from tests.conn.peers import (
    ENABLE_PUSH,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADER_TABLE_SIZE,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    POST,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    REQUEST,
    RESPONSE,
    Pair,
    Raw,
    data,
    events_of,
    frame,
    headers_frame,
    of,
    parse,
    ping,
    resets,
    settings,
    the_goaway,
    window_update,
)


def assert_connection_error(r: Raw, code: int) -> None:
    ga = the_goaway(r.read())
    assert ga.error_code == code, ga
    assert r.conn.terminated
    assert events_of(r.events, C.EV_TERMINATED)[-1][1] == code


# -- the exchange --------------------------------------------------------------------------------------------------


def test_server_preface_is_settings_then_connection_window_then_ack():
    p = Pair(client=False, settings_={"max_concurrent_streams": 7, "initial_window_size": 100_000})
    first, wu, ack = p.wire_to_peer
    assert isinstance(first, SettingsFrame) and "ACK" not in first.flags
    assert first.settings == {
        ENABLE_PUSH: 0,
        MAX_CONCURRENT_STREAMS: 7,
        INITIAL_WINDOW_SIZE: 100_000,
        MAX_FRAME_SIZE: 16384,
        0x6: 65536,
    }
    assert isinstance(wu, WindowUpdateFrame) and wu.stream_id == 0 and wu.window_increment == (4 << 20) - 65535
    assert isinstance(ack, SettingsFrame) and "ACK" in ack.flags
    assert p.peer_of(h2.events.SettingsAcknowledged), "the h2 peer saw no ACK of its SETTINGS"
    assert p.peer.remote_settings.max_concurrent_streams == 7
    assert p.peer.outbound_flow_control_window == 4 << 20


def test_client_preface_starts_with_the_magic():
    c = C.H2Connection(True)
    c.initiate()
    raw = c.data_to_send()
    assert raw.startswith(PREFACE)
    assert isinstance(parse(raw[len(PREFACE) :])[0], SettingsFrame)


def test_client_and_server_talk():
    p = Pair(client=True)
    s = p.conn.open_stream(REQUEST, end_stream=True)
    p.to_peer()
    req = p.peer_of(h2.events.RequestReceived)[0]
    assert req.headers == REQUEST
    p.peer.send_headers(s.id, RESPONSE)
    p.peer.send_data(s.id, b"hello", end_stream=True)
    p.pump()
    kinds = [e[0] for e in p.events]
    assert kinds == [C.EV_RESPONSE, C.EV_DATA, C.EV_CLOSED]
    assert p.events[1][2:] == (b"hello", True)
    assert s.status == 200 and s.state == "closed" and s.error_code == -1


def test_connection_window_setting_and_custom_header_table_size_are_advertised():
    r = Raw(settings_={"connection_window": 65535, "header_table_size": 256})
    first = r.frames[0]
    assert first.settings[HEADER_TABLE_SIZE] == 256
    assert not of(r.frames, WindowUpdateFrame), "no WINDOW_UPDATE when the connection window is the default"


@pytest.mark.parametrize(
    "bad", [{"initial_window_size": 1000}, {"max_frame_size": 100}, {"connection_window": 2**31}, {"nope": 1}]
)
def test_invalid_local_settings_are_refused(bad):
    with pytest.raises(ValueError):
        C.H2Connection(False, settings=bad)


def test_invalid_preface_is_a_protocol_error():
    r = Raw(handshake=False)
    r.read()
    r.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_connection_error(r, PROTOCOL_ERROR)


def test_preface_byte_by_byte():
    r = Raw(handshake=False)
    r.read()
    for b in PREFACE + settings():
        assert r.send_bytes(bytes([b])) == []
    assert [("ACK" in f.flags) for f in r.read()] == [True]


@pytest.mark.parametrize("first", [ping(), settings(ack=True), window_update(0, 100), headers_frame(1, b"\x82")])
def test_first_frame_not_settings_is_a_protocol_error(first):
    r = Raw(handshake=False)
    r.read()
    r.send_bytes(PREFACE + first)
    assert_connection_error(r, PROTOCOL_ERROR)


def test_client_role_first_frame_not_settings_is_a_protocol_error():
    r = Raw(client=True, handshake=False)
    r.read()
    r.send(ping())
    assert_connection_error(r, PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (frame(4, 1, 0, b"\0" * 6), FRAME_SIZE_ERROR),  # ACK with a payload
        (frame(4, 0, 0, b"\0" * 5), FRAME_SIZE_ERROR),  # not a multiple of 6
        (frame(4, 0, 1, b""), PROTOCOL_ERROR),  # on a stream
    ],
)
def test_malformed_settings(raw, code):
    r = Raw()
    r.send(raw)
    assert_connection_error(r, code)


def test_unknown_settings_are_ignored_and_acked():
    r = Raw()
    r.send(settings((0x99, 5), (0x8, 1)))
    assert [("ACK" in f.flags) for f in of(r.read(), SettingsFrame)] == [True]
    assert r.alive


# -- HEADER_TABLE_SIZE ---------------------------------------------------------------------------------------------


def test_peer_header_table_size_zero_resizes_our_encoder():
    r = Raw(peer_settings=[(HEADER_TABLE_SIZE, 0)])
    strict = hpack.Decoder()
    strict.header_table_size = 0  # a decoder that never kept a table: any dynamic reference fails
    strict.max_allowed_table_size = 0
    blocks = []
    for sid in (1, 3, 5):
        r.request(sid)
        s = r.events[-1][1]
        r.conn.send_headers(s, [*RESPONSE, (b"x-custom", b"same-value-every-time")], end_stream=True)
        blocks += [f.data for f in of(r.read(), HeadersFrame)]
    assert blocks[0][0] == 0x20, "the first block must start with a dynamic table size update to 0"
    for b in blocks:
        assert strict.decode(b, raw=True) == [(b":status", b"200"), (b"x-custom", b"same-value-every-time")]


def test_peer_header_table_size_change_mid_connection_with_h2():
    p = Pair(client=False)
    for i, size in enumerate([0, 4096, 100, 4096]):
        p.peer.update_settings({HEADER_TABLE_SIZE: size})
        p.pump()
        sid = p.peer.get_next_available_stream_id()
        p.peer.send_headers(sid, [*REQUEST, (b"x-n", b"%d" % i)], end_stream=True)
        p.pump()
        s = p.events[-1][1]
        p.conn.send_headers(s, [*RESPONSE, (b"x-n", b"%d" % i), (b"x-pad", b"v" * 60)], end_stream=True)
        p.pump()
        got = [e for e in p.peer_events if isinstance(e, h2.events.ResponseReceived)][-1]
        assert got.headers == [(b":status", b"200"), (b"x-n", b"%d" % i), (b"x-pad", b"v" * 60)]


def test_our_header_table_size_is_what_the_decoder_allows():
    p = Pair(client=False, settings_={"header_table_size": 256})
    assert p.peer.remote_settings.header_table_size == 256
    for i in range(5):
        sid = p.peer.get_next_available_stream_id()
        p.peer.send_headers(sid, [*REQUEST, (b"x-big", b"%d" % i * 50)], end_stream=True)
        p.pump()
        assert p.events[-1][1].headers[-1] == (b"x-big", b"%d" % i * 50)
    assert not p.conn.terminated


@pytest.mark.parametrize("size", [0, 256])
def test_our_smaller_header_table_size_applies_only_once_acked(size):
    c = C.H2Connection(False, settings={"header_table_size": size})
    c.initiate()
    c.data_to_send()
    # The usual first flight of a client: preface, SETTINGS and a request, before it has read our SETTINGS;
    # its encoder still uses the default 4096-octet table (RFC 9113 §6.5.3, RFC 7541 §4.2).
    events = c.receive(PREFACE + settings() + headers_frame(1, hpack.Encoder().encode(REQUEST), end_stream=True))
    assert [e[0] for e in events] == [C.EV_REQUEST], events


# -- ENABLE_PUSH ---------------------------------------------------------------------------------------------------


def test_client_receiving_enable_push_1_is_a_protocol_error():
    r = Raw(client=True)
    r.send(settings((ENABLE_PUSH, 1)))
    assert_connection_error(r, PROTOCOL_ERROR)


def test_server_receiving_enable_push_1_is_fine():
    r = Raw(client=False)
    r.send(settings((ENABLE_PUSH, 1)))
    assert r.alive and [("ACK" in f.flags) for f in r.read()] == [True]


@pytest.mark.parametrize("client", [False, True])
def test_enable_push_above_1_is_a_protocol_error(client):
    r = Raw(client=client)
    r.send(settings((ENABLE_PUSH, 2)))
    assert_connection_error(r, PROTOCOL_ERROR)


# -- MAX_CONCURRENT_STREAMS ----------------------------------------------------------------------------------------


def test_server_refuses_the_stream_beyond_its_limit_and_keeps_the_others():
    r = Raw(settings_={"max_concurrent_streams": 2})
    r.request(1, POST, end_stream=False)
    r.request(3, POST, end_stream=False)
    r.request(5, POST, end_stream=False)
    assert resets(r.read()) == {5: REFUSED_STREAM}
    assert [e[1].id for e in events_of(r.events, C.EV_REQUEST)] == [1, 3]
    assert r.conn.open_remote == 2
    # DATA for the refused stream is ignored; the live ones carry on.
    r.send(data(5, b"late"), data(1, b"one", end=True), data(3, b"three", end=True))
    assert r.alive and not resets(r.read())
    assert [(e[1].id, e[2]) for e in events_of(r.events, C.EV_DATA)] == [(1, b"one"), (3, b"three")]
    # Once one ends, a new stream fits again.
    s1 = r.conn.get_stream(1)
    r.conn.send_headers(s1, RESPONSE, end_stream=True)
    r.read()
    r.request(7)
    assert not resets(r.read())
    assert events_of(r.events, C.EV_REQUEST)[-1][1].id == 7


def test_client_can_open_up_to_the_peer_limit():
    p = Pair(client=True, peer_settings={MAX_CONCURRENT_STREAMS: 2})
    assert p.conn.remote_max_concurrent == 2
    a = p.conn.open_stream(REQUEST, end_stream=True)
    assert p.conn.can_open
    p.conn.open_stream(REQUEST, end_stream=True)
    assert not p.conn.can_open
    with pytest.raises(ValueError):
        p.conn.open_stream(REQUEST)
    p.pump()
    p.peer.send_headers(a.id, RESPONSE, end_stream=True)
    p.pump()
    assert a.state == "closed" and p.conn.can_open


def test_client_assumes_100_streams_before_the_peer_settings():
    c = C.H2Connection(True)
    c.initiate()
    for _ in range(100):
        c.open_stream(REQUEST, end_stream=True)
    assert not c.can_open
    c.receive(settings())
    assert c.can_open, "a SETTINGS frame without MAX_CONCURRENT_STREAMS means no limit"


# -- INITIAL_WINDOW_SIZE -------------------------------------------------------------------------------------------


def test_initial_window_size_changes_existing_streams_send_windows():
    r = Raw(peer_settings=[(INITIAL_WINDOW_SIZE, 100)])
    r.request(1)
    s = r.events[-1][1]
    r.conn.send_headers(s, RESPONSE)
    r.conn.send_data(s, b"x" * 1000, end_stream=True)
    assert [len(f.data) for f in of(r.read(), DataFrame)] == [100]
    assert s.send_window == 0 and s.pending_bytes == 900
    r.send(settings((INITIAL_WINDOW_SIZE, 500)))  # +400
    assert [len(f.data) for f in of(r.read(), DataFrame)] == [400]
    assert s.send_window == 0 and s.pending_bytes == 500
    r.send(settings((INITIAL_WINDOW_SIZE, 50)))  # -450: the window goes negative (§6.9.2)
    assert s.send_window == -450
    r.send(window_update(1, 450))
    assert not of(r.read(), DataFrame) and s.send_window == 0
    r.send(window_update(1, 200))
    got = of(r.read(), DataFrame)
    assert [len(f.data) for f in got] == [200] and "END_STREAM" not in got[0].flags
    r.send(window_update(1, 300))
    got = of(r.read(), DataFrame)
    assert [len(f.data) for f in got] == [300] and "END_STREAM" in got[0].flags
    assert s.state == "closed"


def test_initial_window_size_above_max_is_a_flow_control_error():
    r = Raw()
    r.send(settings((INITIAL_WINDOW_SIZE, 2**31)))
    assert_connection_error(r, FLOW_CONTROL_ERROR)


def test_initial_window_size_overflowing_a_stream_window_is_a_flow_control_error():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.send(window_update(1, 2**31 - 1 - 65535))  # the stream window is now exactly 2^31-1
    assert r.alive and r.conn.get_stream(1).send_window == 2**31 - 1
    r.send(settings((INITIAL_WINDOW_SIZE, 65536)))
    assert_connection_error(r, FLOW_CONTROL_ERROR)


# -- MAX_FRAME_SIZE ------------------------------------------------------------------------------------------------


def test_data_and_headers_split_to_the_peer_max_frame_size():
    p = Pair(client=False, peer_settings={MAX_FRAME_SIZE: 20000, INITIAL_WINDOW_SIZE: 2**20})
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, REQUEST, end_stream=True)
    p.pump()
    s = p.events[-1][1]
    big = [(b"x-h%d" % i, b"~" * 1000) for i in range(30)]  # ~48 KB even Huffman-coded
    start = len(p.wire_to_peer)
    p.conn.send_headers(s, [*RESPONSE, *big])
    p.conn.send_data(s, bytes(range(256)) * 200, end_stream=True)  # 51200 bytes
    p.pump()
    sent = p.wire_to_peer[start:]
    hb = [f for f in sent if isinstance(f, HeadersFrame | ContinuationFrame)]
    assert len(hb) >= 2 and all(len(f.data) <= 20000 for f in hb)
    assert isinstance(hb[0], HeadersFrame) and all(isinstance(f, ContinuationFrame) for f in hb[1:])
    assert [len(f.data) for f in of(sent, DataFrame)] == [20000, 20000, 11200]
    assert p.peer_of(h2.events.ResponseReceived)[0].headers == [(b":status", b"200"), *big]
    assert p.received(sid) == bytes(range(256)) * 200


def test_default_max_frame_size_is_16384():
    r = Raw()
    r.request(1)
    s = r.events[-1][1]
    r.conn.send_headers(s, RESPONSE)
    r.conn.send_data(s, b"z" * 40000, end_stream=True)
    assert [len(f.data) for f in of(r.read(), DataFrame)] == [16384, 16384, 7232]


def test_frame_larger_than_ours_is_a_frame_size_error():
    r = Raw()
    r.request(1, POST, end_stream=False)
    r.send(data(1, b"x" * 16385))
    assert_connection_error(r, FRAME_SIZE_ERROR)


def test_frame_up_to_our_larger_max_frame_size_is_accepted():
    r = Raw(settings_={"max_frame_size": 32768})
    r.request(1, POST, end_stream=False)
    r.send(data(1, b"x" * 32768, end=True))
    assert r.alive and events_of(r.events, C.EV_DATA)[0][2] == b"x" * 32768


def test_frame_size_error_is_seen_from_the_header_alone():
    r = Raw()
    r.send_bytes(b"\x01\x00\x00" + b"\x00\x00" + (1).to_bytes(4, "big"))  # a 65536-octet DATA: no payload yet
    assert_connection_error(r, FRAME_SIZE_ERROR)


@pytest.mark.parametrize("value", [16383, 2**24])
def test_invalid_max_frame_size_setting_is_a_protocol_error(value):
    r = Raw()
    r.send(settings((MAX_FRAME_SIZE, value)))
    assert_connection_error(r, PROTOCOL_ERROR)


# -- MAX_HEADER_LIST_SIZE ------------------------------------------------------------------------------------------


def test_header_list_larger_than_ours_resets_that_stream_only():
    r = Raw(settings_={"max_header_list_size": 1000})
    r.request(1, POST, end_stream=False)
    big = [*REQUEST, *[(b"x-%d" % i, b"v" * 50) for i in range(20)]]  # > 1000 with the 32-octet overheads
    r.request(3, big)
    assert resets(r.read()) == {3: PROTOCOL_ERROR}
    assert r.alive and [e[1].id for e in events_of(r.events, C.EV_REQUEST)] == [1]
    # The HPACK table stayed in sync: a request that reuses the dynamic entries decodes.
    r.request(5, [*REQUEST, (b"x-1", b"v" * 50)])
    assert not resets(r.read())
    assert events_of(r.events, C.EV_REQUEST)[-1][1].headers[-1] == (b"x-1", b"v" * 50)
    r.send(data(1, b"still here", end=True))
    assert events_of(r.events, C.EV_DATA)[-1][2] == b"still here"


# -- stream ids running out ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("twin", ["c", "py"])
def test_stream_ids_near_the_end_stop_new_streams_so_a_pool_opens_another_connection(twin):
    from meshproxy import conn as selector

    mod = C if twin == "c" else selector.pure()
    last = 0x7FFFFFFF - 2 * 1000  # what the connection keeps in reserve
    c = mod.H2Connection(True, first_stream_id=last - 2)
    c.initiate()
    c.receive(settings())
    assert c.can_open
    c.open_stream(REQUEST, end_stream=True)
    c.open_stream(REQUEST, end_stream=True)
    assert c.next_stream_id == last + 2 and not c.can_open
    with pytest.raises(ValueError):
        c.open_stream(REQUEST, end_stream=True)


@pytest.mark.parametrize("bad", [0, 2, 2**31, -1, "1"])
def test_first_stream_id_must_be_an_odd_stream_id(bad):
    with pytest.raises(ValueError):
        C.H2Connection(True, first_stream_id=bad)
