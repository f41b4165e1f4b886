"""The subscription's wire, in process: gRPC message framing and reassembly, the backoff, TCP
keepalive, and every way a stream can end, against a control plane made with the ``h2``
library that misbehaves on cue (trailers-only errors, RST_STREAM, GOAWAY, a non-gRPC answer,
a closed socket) or splits its messages across DATA frames. Each ending must be logged with
its reason and followed by a new connection that again says who the sidecar is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import socket
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from meshproxy import config
from meshproxy.config.v1.control_pb2 import StreamRequest, StreamResponse
from meshproxy.subscription import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    Subscription,
    backoff_delay,
    set_keepalive,
)
from meshproxy.wire import MAX_MESSAGE, FramingError, MessageReader, grpc_frame, read_varint, varint
from meshproxy.worker import Worker
from tests.integration import harness

pytestmark = pytest.mark.timeout(30)

# -- framing ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 4096, 1 << 30])
def test_messages_reassembled_from_any_chunking(chunk: int):
    messages = [b"", b"x", bytes(range(256)) * 400, b"last"]
    wire = b"".join(grpc_frame(m) for m in messages)
    reader = MessageReader()
    out = []
    for i in range(0, len(wire), chunk):
        out += reader.feed(wire[i : i + chunk])
    assert out == messages


def test_frame_layout():
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_compressed_or_oversized_message_is_refused():
    with pytest.raises(FramingError, match="compressed"):
        MessageReader().feed(b"\x01\x00\x00\x00\x01x")
    with pytest.raises(FramingError, match="over the limit"):
        MessageReader().feed(b"\x00" + (MAX_MESSAGE + 1).to_bytes(4, "big"))


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16384, 2**32, 2**64 - 1])
def test_varints_round_trip(n: int):
    from google.protobuf.internal.encoder import _VarintBytes

    assert varint(n) == _VarintBytes(n)
    assert read_varint(b"x" + varint(n) + b"y", 1) == (n, 1 + len(varint(n)))


def test_a_cut_or_overlong_varint_is_refused():
    with pytest.raises(ValueError):
        read_varint(b"\x80\x80", 0)
    with pytest.raises(ValueError):
        read_varint(b"\xff" * 10 + b"\x01", 0)


# -- backoff and keepalive -------------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_capped():
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
        samples = [backoff_delay(attempt, rng) for _ in range(400)]
        assert all(0 <= s <= bound for s in samples), attempt
        # Full jitter: the whole range is used, not just its top.
        assert min(samples) < bound * 0.1 and max(samples) > bound * 0.9, (attempt, min(samples), max(samples))
    assert backoff_delay(10_000, rng) <= BACKOFF_CAP


def test_keepalive_options():
    with socket.socket() as sock:
        set_keepalive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


# -- a control plane that misbehaves -----------------------------------------------------------


class ScriptedControl(harness.ThreadedServer):
    """An h2c server that takes each connection's ``/meshproxy.v1.MeshControl/Stream`` call,
    reads its first message (put on ``firsts``), then does ``action``. ``split``: sends two
    snapshots, the second starting in the first's DATA frame and ending in the next one, and
    puts the ACKs or NACKs it gets on ``replies``. ``quiet``: answers the call's headers and
    then nothing but the PING ACKs h2 sends by itself (``pings`` counts the PINGs)."""

    name = "scripted-control"

    def __init__(self, action: str) -> None:
        self.action = action
        self.firsts: queue.Queue[StreamRequest] = queue.Queue()
        self.replies: queue.Queue[StreamRequest] = queue.Queue()
        self.pings = 0
        super().__init__()

    def _handle(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.settimeout(0.2)
        reader = MessageReader()
        stream_id = 0
        hang_up = False
        with sock:
            sock.sendall(conn.data_to_send())
            while not self._closed.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        stream_id = event.stream_id
                        assert dict(event.headers)[":path"] == "/meshproxy.v1.MeshControl/Stream"
                    elif isinstance(event, h2.events.PingReceived):
                        self.pings += 1
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        for message in reader.feed(event.data):
                            request = StreamRequest.FromString(message)
                            if request.response_nonce:
                                self.replies.put(request)
                            else:
                                self.firsts.put(request)
                                hang_up = self._act(conn, stream_id)
                sock.sendall(conn.data_to_send())
                if hang_up:
                    # A clean close: FIN first, then read what the client still sends until it
                    # closes too (closing with unread bytes would send RST instead).
                    with contextlib.suppress(OSError):  # the client may have gone already
                        sock.shutdown(socket.SHUT_WR)
                        while sock.recv(65536):
                            pass
                    return

    def _act(self, conn: h2.connection.H2Connection, sid: int) -> bool:
        """Answer the stream's first message; whether to close the connection then."""
        ok = [(":status", "200"), ("content-type", "application/grpc")]
        if self.action == "trailers-only":
            conn.send_headers(sid, [*ok, ("grpc-status", "7"), ("grpc-message", "not%20allowed")], end_stream=True)
        elif self.action == "rst":
            conn.send_headers(sid, ok)
            conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif self.action == "goaway":
            conn.send_headers(sid, ok)
            conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=sid)
        elif self.action == "quiet":
            conn.send_headers(sid, ok)
        elif self.action == "http-404":
            conn.send_headers(sid, [(":status", "404")], end_stream=True)
        elif self.action == "split":
            conn.send_headers(sid, ok)
            one = grpc_frame(StreamResponse(version_info="s1", nonce="n1").SerializeToString())
            two = grpc_frame(StreamResponse(version_info="s2", nonce="n2", config=_bad()).SerializeToString())
            conn.send_data(sid, one + two[:7])
            conn.send_data(sid, two[7:])
        return self.action in ("goaway", "close")


def _bad() -> config.SidecarConfig:
    route = {"match": {"prefix": "/"}, "route": {"clusters": [{"cluster": "missing"}]}}
    listener = {
        "name": "outbound",
        "address": "127.0.0.1:0",
        "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}],
    }
    return config.from_dict({"listeners": [listener]}, check=False)


def _node() -> config.Node:
    return config.Node(id="n", namespace="ns", workload="w")


async def _subscribe_until(address: str, done, timeout: float = 10.0) -> Worker:
    """Run a Subscription (for a worker with no config) until ``done()``; return the worker."""
    worker = Worker(None, asyncio.get_running_loop())
    sub = Subscription(worker, address, _node(), worker_index=3, listen="127.0.0.1:0")
    sub.start()
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)
    finally:
        sub.stop()
        await sub.wait_closed()
    return worker


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ("trailers-only", "grpc-status 7: not allowed"),
        ("rst", "reset the stream (error code 2)"),
        ("goaway", "GOAWAY"),
        ("http-404", "not a gRPC response: status 404"),
        ("close", "closed the connection"),
    ],
)
def test_every_stream_ending_reconnects(action: str, reason: str, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="meshproxy.subscription")
    with ScriptedControl(action) as server:
        asyncio.run(_subscribe_until(server.address, lambda: server.firsts.qsize() >= 2))
        first = server.firsts.get_nowait()
        again = server.firsts.get_nowait()
    assert first.node.id == again.node.id == "n"
    assert first.worker == again.worker == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and reason in warnings[0], warnings


class SilentControl(harness.ThreadedServer):
    """Accepts, reads everything, answers nothing: a control plane that hangs with its socket open."""

    name = "silent-control"

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def _handle(self, sock: socket.socket) -> None:
        self.connections += 1
        sock.settimeout(0.2)
        with sock:
            while not self._closed.is_set():
                try:
                    if not sock.recv(65536):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return


def test_a_control_plane_that_answers_no_ping_is_left(monkeypatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr("meshproxy.subscription.PING_AFTER", 0.2)
    caplog.set_level(logging.WARNING, logger="meshproxy.subscription")
    with SilentControl() as server:
        asyncio.run(_subscribe_until(server.address, lambda: server.connections >= 2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "answered no PING within 0.2s" in warnings[0], warnings


def test_pings_keep_a_quiet_stream_alive(monkeypatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr("meshproxy.subscription.PING_AFTER", 0.1)
    caplog.set_level(logging.WARNING, logger="meshproxy.subscription")
    with ScriptedControl("quiet") as server:
        end = time.monotonic() + 1.5
        asyncio.run(_subscribe_until(server.address, lambda: time.monotonic() > end))
        # Many silences, each ended by a PING and its ACK: one connection, never a reconnect.
        assert server.firsts.qsize() == 1
        assert server.pings >= 3
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_messages_split_across_frames_are_each_answered():
    """Snapshot s1 and half of s2 in one DATA frame, the rest in the next: s1 (empty: valid) is
    ACKed, s2 (a route to a missing cluster) NACKed with s1 still in force."""
    with ScriptedControl("split") as server:
        worker = asyncio.run(_subscribe_until(server.address, lambda: server.replies.qsize() >= 2))
        ack, nack = server.replies.get_nowait(), server.replies.get_nowait()
    assert (ack.version_info, ack.response_nonce, ack.HasField("error_detail")) == ("s1", "n1", False)
    assert (nack.version_info, nack.response_nonce) == ("s1", "n2")
    assert "no cluster named 'missing'" in nack.error_detail.message
    assert worker.runtime is not None and worker.runtime.version == "s1"
    assert worker.runtime.config.node.id == "n"
