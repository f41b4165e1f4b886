"""Peers for the connection tests: hand-built frames (which may break every rule), the ``h2`` library
as a real peer in the other role, and a two-connection proxy wired the way the sidecar wires it."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from meshproxy._fast import conn as C

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags, spelled out so the builders below do not depend on the code under test.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# RFC 9113 §7 error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

# Settings identifiers (§6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"svc")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/upload"), (b":authority", b"svc")]
GRPC = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pkg.Svc/Call"),
    (b":authority", b"svc"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
RESPONSE = [(b":status", b"200")]
GRPC_RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]


# -- frames by hand ------------------------------------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """Any frame at all: the 9-octet header (§4.1) and the payload as given."""
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def data(sid: int, payload: bytes = b"", end: bool = False, pad: int | None = None) -> bytes:
    flags = END_STREAM if end else 0
    if pad is not None:
        return frame(DATA, flags | PADDED, sid, bytes([pad]) + payload + b"\0" * pad)
    return frame(DATA, flags, sid, payload)


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def rst(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def ping(opaque: bytes = b"12345678", ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def goaway(last: int, code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last, code) + debug)


def priority(sid: int, depends_on: int, weight: int = 16) -> bytes:
    return frame(PRIORITY, 0, sid, struct.pack(">IB", depends_on, weight - 1))


def continuation(sid: int, fragment: bytes, end_headers: bool = False) -> bytes:
    return frame(CONTINUATION, END_HEADERS if end_headers else 0, sid, fragment)


def headers_frame(
    sid: int,
    block: bytes,
    end_stream: bool = False,
    end_headers: bool = True,
    pad: int | None = None,
    depends_on: int | None = None,
) -> bytes:
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    head = tail = b""
    if pad is not None:
        flags |= PADDED
        head, tail = bytes([pad]), b"\0" * pad
    if depends_on is not None:
        flags |= PRIORITY_FLAG
        head += struct.pack(">IB", depends_on, 15)
    return frame(HEADERS, flags, sid, head + block + tail)


# -- reading what our connection sends -----------------------------------------------------------------------------


def parse(raw: bytes) -> list[Frame]:
    """Every frame in ``raw``, parsed by hyperframe; fails if ``raw`` is not a whole number of valid frames."""
    out, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        assert len(raw) - pos >= 9, f"a truncated frame header at offset {pos}"
        f, length = Frame.parse_frame_header(view[pos : pos + 9])
        assert pos + 9 + length <= len(raw), f"a truncated {type(f).__name__} at offset {pos}"
        f.parse_body(view[pos + 9 : pos + 9 + length])
        out.append(f)
        pos += 9 + length
    return out


def of(frames: Iterable[Frame], kind: type, sid: int | None = None) -> list:
    return [f for f in frames if isinstance(f, kind) and (sid is None or f.stream_id == sid)]


def the_goaway(frames: list[Frame]) -> GoAwayFrame:
    found = of(frames, GoAwayFrame)
    assert len(found) == 1, f"expected one GOAWAY, got {frames}"
    return found[0]


def resets(frames: list[Frame]) -> dict[int, int]:
    """stream id -> RST_STREAM error code."""
    return {f.stream_id: f.error_code for f in of(frames, RstStreamFrame)}


def data_bytes(frames: list[Frame], sid: int) -> int:
    return sum(len(f.data) for f in of(frames, DataFrame, sid))


def events_of(events: list | None, kind: int) -> list:
    return [e for e in events or () if e[0] == kind]


class Raw:
    """Our connection driven by hand: we build the peer's frames, it answers; every answer is parsed.

    ``client`` is our connection's role; the hand-driven peer plays the other one. The handshake sends
    the preface (server role) and the peer's SETTINGS; ``frames`` then accumulates everything we sent.
    """

    def __init__(
        self,
        client: bool = False,
        settings_: dict | None = None,
        peer_settings: Iterable[tuple[int, int]] = (),
        hold: bool = False,
        handshake: bool = True,
    ) -> None:
        self.conn = C.H2Connection(client, settings=settings_, hold=hold)
        self.conn.initiate()
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.events: list = []
        self.frames: list[Frame] = []
        if handshake:
            self.send_bytes((b"" if client else PREFACE) + settings(*peer_settings))
            got = self.read()
            assert isinstance(got[0], SettingsFrame) and "ACK" not in got[0].flags
            assert [f for f in got if isinstance(f, SettingsFrame) and "ACK" in f.flags], got
            self.send(settings(ack=True))
            self.read()

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.enc.encode(headers, huffman=True)

    def send_bytes(self, raw: bytes) -> list:
        events = self.conn.receive(raw) or []
        self.events += events
        return events

    def send(self, *frames: bytes) -> list:
        return self.send_bytes(b"".join(frames))

    def drain(self) -> list:
        """Events queued by our own calls (a stream ended by send_data...): they surface at the next receive()."""
        return self.send_bytes(b"")

    def request(self, sid: int, headers=REQUEST, end_stream: bool = True, **kw) -> list:
        return self.send(headers_frame(sid, self.block(headers), end_stream=end_stream, **kw))

    def read(self) -> list[Frame]:
        """The frames our connection queued since the last read (header blocks decoded into ``.decoded``)."""
        raw = self.conn.data_to_send()
        got = parse(raw.removeprefix(PREFACE) if self.conn.client else raw)
        block = b""
        for f in got:
            if isinstance(f, HeadersFrame | ContinuationFrame):
                block += f.data
                if "END_HEADERS" in f.flags:
                    f.decoded = self.dec.decode(block, raw=True)
                    block = b""
        self.frames += got
        return got

    @property
    def alive(self) -> bool:
        return not self.conn.terminated


# -- the h2 library as the peer ------------------------------------------------------------------------------------


class Pair:
    """Our connection and an ``h2`` peer in the other role, bytes pumped between them by hand.

    ``peer_settings`` are the h2 peer's initial SETTINGS. With ``auto_ack`` the h2 peer returns
    flow-control credit for every DATA it receives (a fast reader); without it the test decides.
    """

    def __init__(
        self,
        client: bool = False,
        settings_: dict | None = None,
        peer_settings: dict | None = None,
        hold: bool = False,
        generate_request_id: bool = False,
        auto_ack: bool = True,
        handshake: bool = True,
        outbox: C.Outbox | None = None,
    ) -> None:
        self.conn = C.H2Connection(
            client, outbox, settings=settings_, hold=hold, generate_request_id=generate_request_id
        )
        config = h2.config.H2Configuration(client_side=not client, header_encoding=None)
        self.peer = h2.connection.H2Connection(config)
        self.auto_ack = auto_ack
        self.moved = False  # whether the last to_peer/to_conn carried bytes
        self.events: list = []  # ours
        self.peer_events: list = []  # the h2 peer's
        self.wire_to_peer: list[Frame] = []  # every frame we sent, parsed
        if handshake:
            self.conn.initiate()
            self.peer.initiate_connection()
            if peer_settings:  # a second SETTINGS frame: h2 applies its own settings only once they are ACKed
                self.peer.update_settings(peer_settings)
            self.pump()

    def to_peer(self) -> list:
        raw = self.conn.data_to_send()
        self.moved = bool(raw)
        if not raw:
            return []
        self.wire_to_peer += parse(raw.removeprefix(PREFACE) if self.conn.client else raw)
        events = self.peer.receive_data(raw)
        if self.auto_ack:
            for ev in events:
                if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                    self.peer.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.peer_events += events
        return events

    def drain(self) -> list:
        """Events queued by our own calls: they surface at the next receive()."""
        events = self.conn.receive(b"") or []
        self.events += events
        return events

    def to_conn(self) -> list:
        raw = self.peer.data_to_send()
        self.moved = bool(raw)
        if not raw:
            return []
        events = self.conn.receive(raw) or []
        self.events += events
        return events

    def pump(self, rounds: int = 1000) -> None:
        """Shuttle bytes both ways until neither side has anything to say."""
        for _ in range(rounds):
            self.to_peer()
            moved = self.moved
            self.to_conn()
            if not moved and not self.moved and not self.conn.pending_output:
                return
        raise AssertionError("the two peers never went quiet")

    def peer_of(self, kind: type) -> list:
        return [e for e in self.peer_events if isinstance(e, kind)]

    def received(self, sid: int) -> bytes:
        """The DATA the h2 peer received on ``sid``."""
        return b"".join(
            e.data for e in self.peer_events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
        )


class Proxy:
    """The sidecar's wiring: an h2 client -> our server-role connection (hold mode) ... our client-role
    connection -> an h2 server. ``forward`` routes a request the way downstream.py does."""

    def __init__(
        self,
        down_settings: dict | None = None,
        up_settings: dict | None = None,
        client_settings: dict | None = None,
        server_settings: dict | None = None,
        generate_request_id: bool = True,
        client_acks: bool = True,
        server_acks: bool = True,
        outbox: C.Outbox | None = None,
    ) -> None:
        self.down = Pair(
            False,
            down_settings,
            client_settings,
            hold=True,
            generate_request_id=generate_request_id,
            auto_ack=client_acks,
            outbox=outbox,
        )
        self.up = Pair(True, up_settings, server_settings, hold=True, auto_ack=server_acks, outbox=outbox)

    @property
    def client(self) -> h2.connection.H2Connection:
        return self.down.peer

    @property
    def server(self) -> h2.connection.H2Connection:
        return self.up.peer

    def pump(self, rounds: int = 10000, check=None) -> None:
        """Shuttle bytes on both sides until all four parties are quiet; ``check()`` runs after every hop."""
        for _ in range(rounds):
            moved = False
            for side, hop in (
                (self.down, "to_peer"),
                (self.down, "to_conn"),
                (self.up, "to_peer"),
                (self.up, "to_conn"),
            ):
                getattr(side, hop)()
                moved = side.moved or moved
                if check is not None:
                    check()
            if not moved and not self.down.conn.pending_output and not self.up.conn.pending_output:
                return
        raise AssertionError("the proxy never went quiet")

    def request(self, headers=REQUEST, body: bytes | None = None, end: bool = True) -> tuple[int, C.Stream]:
        """The h2 client sends a request; returns its stream id and our downstream Stream."""
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.client.send_data(sid, body, end_stream=end)
        before = len(self.down.events)
        self.down.to_conn()
        new = events_of(self.down.events[before:], C.EV_REQUEST)
        assert len(new) == 1, self.down.events[before:]
        return sid, new[0][1]

    def forward(self, down: C.Stream, **kw) -> C.Stream:
        up = self.up.conn.open_forward(down, **kw)
        self.pump()
        return up

    def server_request(self) -> h2.events.RequestReceived:
        got = self.up.peer_of(h2.events.RequestReceived)
        assert got, "the upstream server saw no request"
        return got[-1]

    def client_events(self, kind: type, sid: int | None = None) -> list:
        return [e for e in self.down.peer_of(kind) if sid is None or e.stream_id == sid]


def respond_upstream(p: Proxy, up, headers=RESPONSE, body: bytes = b"", trailers=None) -> None:
    """The h2 server answers the upstream stream ``up``: headers, then ``body`` and ``trailers`` if given."""
    p.server.send_headers(up.id, headers, end_stream=not body and trailers is None)
    if body:
        p.server.send_data(up.id, body, end_stream=trailers is None)
    if trailers is not None:
        p.server.send_headers(up.id, trailers, end_stream=True)
    p.pump()
