"""The admin server's gRPC-over-HTTP/2 edges, driven with the ``h2`` library (a client that does what
grpcio will not): non-POST and non-gRPC requests, encodings, broken and oversized messages, unary
calls with zero or two messages, ``grpc-timeout``, a client reset and an HTTP/2 protocol error.
Every one gets a proper answer, and the server keeps serving."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import pytest
from grpc_health.v1 import health_pb2

from meshproxy.admin.v1 import admin_pb2
from tests.admin.conftest import HOST

pytestmark = pytest.mark.timeout(60)

INFO = "/meshproxy.admin.v1.Admin/GetServerInfo"
DUMP = "/meshproxy.admin.v1.Admin/GetConfigDump"
WATCH = "/grpc.health.v1.Health/Watch"


def frame(message: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(message)) + message


@dataclass
class Answer:
    headers: dict = field(default_factory=dict)
    data: bytes = b""
    trailers: dict = field(default_factory=dict)
    reset: int | None = None

    @property
    def grpc_status(self) -> str | None:
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))

    @property
    def messages(self) -> list[bytes]:
        out, buf = [], self.data
        while len(buf) >= 5:
            n = struct.unpack(">I", buf[1:5])[0]
            out.append(buf[5 : 5 + n])
            buf = buf[5 + n :]
        return out


class Client:
    """One h2c connection to the admin server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.ended: set[int] = set()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.authority = f"{HOST}:{port}"
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, path: str, *, method: str = "POST", content_type: str = "application/grpc", extra=()) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":path", path), (":authority", self.authority)]
        headers += [("content-type", content_type), ("te", "trailers"), *extra]
        self.conn.send_headers(sid, headers)
        self.answers[sid] = Answer()
        self._flush()
        return sid

    def send(self, sid: int, data: bytes, end: bool = True) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        self._flush()

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)
        self._flush()

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid, 8)
        self._flush()

    def call(self, path: str, body: bytes | None, **kwargs) -> Answer:
        sid = self.start(path, **kwargs)
        if body is None:
            self.end(sid)
        else:
            self.send(sid, body)
        return self.wait(sid)

    def wait(self, sid: int, until=None) -> Answer:
        """Read until stream ``sid`` ended (or ``until(answer)``); bounded by the socket timeout."""
        answer = self.answers[sid]
        for _ in range(10_000):
            if sid in self.ended or (until is not None and until(answer)) or self.goaway is not None:
                return answer
            data = self.sock.recv(65536)
            if not data:
                return answer
            for ev in self.conn.receive_data(data):
                self._event(ev)
            self._flush()
        raise AssertionError("no end")

    def _event(self, ev) -> None:
        a = self.answers.get(getattr(ev, "stream_id", 0))
        if isinstance(ev, h2.events.ResponseReceived):
            a.headers = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            a.data += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            a.trailers = dict(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            a.reset = ev.error_code
            self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(sidecar):
    c = Client(sidecar.admin_port)
    yield c
    c.close()


def _still_serving(client: Client) -> None:
    answer = client.call(INFO, frame(b""))
    assert answer.grpc_status == "0"
    assert admin_pb2.ServerInfo.FromString(answer.messages[0]).live


def test_unary_call_by_hand(client):
    answer = client.call(INFO, frame(b""))
    assert answer.headers[":status"] == "200"
    assert answer.headers["content-type"] == "application/grpc"
    assert answer.trailers == {"grpc-status": "0"}
    assert len(answer.messages) == 1


def test_get_is_405(client):
    answer = client.call(INFO, None, method="GET")
    assert answer.headers[":status"] == "405"
    _still_serving(client)


def test_not_grpc_is_415(client):
    answer = client.call(INFO, b"{}", content_type="application/json")
    assert answer.headers[":status"] == "415"
    _still_serving(client)


def test_grpc_plus_proto_content_type_is_grpc(client):
    assert client.call(INFO, frame(b""), content_type="application/grpc+proto").grpc_status == "0"


def test_unknown_encoding_is_unimplemented(client):
    answer = client.call(INFO, frame(b""), extra=[("grpc-encoding", "gzip")])
    assert answer.grpc_status == "12"
    assert answer.headers["grpc-accept-encoding"] == "identity"


def test_compressed_message_without_encoding_is_internal(client):
    answer = client.call(INFO, frame(b"", flag=1))
    assert answer.grpc_status == "13"
    assert "compressed" in answer.headers["grpc-message"]
    _still_serving(client)


def test_message_over_the_limit_is_resource_exhausted(client):
    # Only the length prefix is sent: the answer comes before any of the 5 MiB.
    sid = client.start(DUMP)
    client.send(sid, struct.pack(">BI", 0, 5 << 20), end=False)
    answer = client.wait(sid)
    assert answer.grpc_status == "8"
    assert "larger than max" in answer.headers["grpc-message"]
    # The request was not finished: the server says it wants no more (RST_STREAM NO_ERROR), RFC 9113 §8.1.
    assert answer.reset == 0
    _still_serving(client)


def test_unary_without_message_is_internal(client):
    answer = client.call(INFO, None)
    assert answer.grpc_status == "13"
    _still_serving(client)


def test_unary_with_two_messages_is_internal(client):
    answer = client.call(INFO, frame(b"") + frame(b""))
    assert answer.grpc_status == "13"
    assert "more than one" in answer.headers["grpc-message"]


def test_request_ending_inside_a_message_is_internal(client):
    answer = client.call(INFO, frame(b"\x0a\x02ab")[:-1])
    assert answer.grpc_status == "13"


def test_messages_split_across_frames(client):
    body = frame(admin_pb2.ConfigDumpRequest(types=["clusters"]).SerializeToString())
    sid = client.start(DUMP)
    for i in range(len(body)):
        client.send(sid, body[i : i + 1], end=False)
    client.end(sid)
    answer = client.wait(sid)
    assert answer.grpc_status == "0"
    dump = admin_pb2.ConfigDump.FromString(answer.messages[0])
    assert dump.config.clusters and not dump.config.listeners


def test_grpc_timeout_ends_a_watch_with_deadline_exceeded(client):
    answer = client.call(
        WATCH, frame(health_pb2.HealthCheckRequest().SerializeToString()), extra=[("grpc-timeout", "300m")]
    )
    assert answer.trailers.get("grpc-status") == "4"
    assert [health_pb2.HealthCheckResponse.FromString(m).status for m in answer.messages] == [1]
    _still_serving(client)


def test_client_reset_of_a_watch(client):
    sid = client.start(WATCH)
    client.send(sid, frame(b""))
    client.wait(sid, until=lambda a: a.messages)
    client.reset(sid)
    _still_serving(client)


def test_protocol_error_is_goaway(sidecar):
    with socket.create_connection((HOST, sidecar.admin_port), timeout=10) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface, SETTINGS
        s.sendall(b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"\x00" * 8)  # PING on stream 1
        got = b""
        for _ in range(100):  # until the server closes
            data = s.recv(65536)
            if not data:
                break
            got += data
    # A GOAWAY (type 7) with PROTOCOL_ERROR (1).
    i = got.find(b"\x07\x00\x00\x00\x00\x00")
    assert i >= 3, got
    assert struct.unpack(">I", got[i + 10 : i + 14])[0] == 1
