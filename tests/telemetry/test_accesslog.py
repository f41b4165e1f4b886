"""The access log in process: real streams from the compiled core (an h2 client -> the proxy's two
connections -> an h2 server, tests.conn.peers.Proxy) completed as downstream.py completes them, and
the lines the hook writes parsed back: keys and values, escaping, sampling (failures always logged),
one write per event-loop burst, files, pipes and a destination that fails."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import select
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from meshproxy.downstream import Request
from meshproxy.telemetry import accesslog
from meshproxy.telemetry.accesslog import AccessLog, AccessLogError, is_failure
from tests.conn.peers import GRPC, REQUEST, Proxy

KEYS = [
    "start_time",
    "method",
    "authority",
    "path",
    "protocol",
    "request_protocol",
    "response_code",
    "grpc_status",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "upstream_host",
    "upstream_cluster",
    "route_name",
    "x_request_id",
    "trace_id",
    "downstream_peer",
    "peer_identity",
    "authz_policy",
    "user_agent",
]
GRPC_RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
ROUTE = SimpleNamespace(name="echo-route")
SUBSET = SimpleNamespace(cluster_name="echo")
ENDPOINT = SimpleNamespace(address="10.1.2.3:8080")


def settings(destination: str | None = None, sampling: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(access_log=destination, access_log_sampling=sampling)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Sink:
    """A ``write`` for AccessLog: keeps each write (one per burst) and the lines parsed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.writes.append(data)

    @property
    def lines(self) -> list[dict]:
        out = []
        for chunk in self.writes:
            assert chunk.endswith(b"\n"), chunk
            out += [json.loads(line) for line in chunk.decode("ascii").splitlines()]
        return out


def turn(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop run what is due now (the burst's flush)."""
    loop.run_until_complete(asyncio.sleep(0))


def forwarded(
    headers=GRPC,
    body: bytes = b"\0\0\0\0\x02hi",
    response=GRPC_RESPONSE,
    response_body: bytes = b"\0\0\0\0\x03abc",
    trailers=((b"grpc-status", b"0"),),
) -> Request:
    """A request the proxy forwarded and whose response came back, as downstream.py records it."""
    p = Proxy()
    _, down = p.request(list(headers), body=body or None)
    req = Request(down, ROUTE, down.t_open_ns, "main")
    req.subset, req.endpoint = SUBSET, ENDPOINT
    up = p.up.conn.open_forward(down)
    req.up = up
    p.pump()
    p.server.send_headers(up.id, list(response), end_stream=not response_body and not trailers)
    if response_body:
        p.server.send_data(up.id, response_body, end_stream=not trailers)
    if trailers:
        p.server.send_headers(up.id, list(trailers), end_stream=True)
    p.pump()
    assert down.state == "closed", down.state
    return req


def answered_by_proxy(headers=REQUEST, flag: str = "NR", status: int = 404) -> Request:
    """A request the proxy answered itself (no route), as respond_error does."""
    p = Proxy()
    _, down = p.request(list(headers))
    req = Request(down, None, down.t_open_ns, "main")
    req.flags = flag
    p.down.conn.respond(down, status, [(b"content-type", b"text/plain")], b"no route")
    p.pump()
    return req


def test_a_forwarded_grpc_call_in_full(loop):
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    req = forwarded(headers=[*GRPC, (b"user-agent", b"grpc-python/1.0"), (b"x-request-id", b"rid-1")])
    before = datetime.datetime.now(datetime.UTC)
    log.log(req)
    turn(loop)
    [line] = sink.lines
    assert list(line) == KEYS
    assert line["method"] == "POST" and line["authority"] == "svc" and line["path"] == "/pkg.Svc/Call"
    assert line["protocol"] == "HTTP/2" and line["request_protocol"] == "grpc"
    assert line["response_code"] == 200 and line["grpc_status"] == 0 and line["response_flags"] == "-"
    assert line["bytes_received"] == 7 and line["bytes_sent"] == 8
    assert isinstance(line["duration"], int) and line["duration"] >= 0
    assert isinstance(line["upstream_service_time"], int) and line["upstream_service_time"] >= 0
    assert line["upstream_host"] == "10.1.2.3:8080" and line["upstream_cluster"] == "echo"
    assert line["route_name"] == "echo-route" and line["x_request_id"] == "rid-1"
    assert line["user_agent"] == "grpc-python/1.0" and line["peer_identity"] is None
    assert line["authz_policy"] is None and "authz_audit" not in line
    # RFC 3339, UTC, milliseconds; the request started before the line was written.
    assert len(line["start_time"]) == 24 and line["start_time"].endswith("Z")
    start = datetime.datetime.fromisoformat(line["start_time"])
    assert before - datetime.timedelta(seconds=5) <= start <= before + datetime.timedelta(milliseconds=1)


def test_a_grpc_failure_and_a_plain_request(loop):
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    log.log(forwarded(trailers=[(b"grpc-status", b"14"), (b"grpc-message", b"down")]))
    log.log(forwarded(headers=REQUEST, body=b"", response=[(b":status", b"503")], response_body=b"busy", trailers=()))
    turn(loop)
    grpc, plain = sink.lines
    assert grpc["grpc_status"] == 14 and grpc["response_code"] == 200
    assert plain["request_protocol"] == "http" and plain["grpc_status"] is None
    assert plain["response_code"] == 503 and plain["bytes_sent"] == 4 and plain["bytes_received"] == 0
    assert plain["method"] == "GET" and plain["path"] == "/"


def test_a_request_answered_by_the_proxy(loop):
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    log.log(answered_by_proxy())
    turn(loop)
    [line] = sink.lines
    assert line["response_code"] == 404 and line["response_flags"] == "NR"
    assert line["upstream_host"] is None and line["upstream_cluster"] is None and line["route_name"] is None
    assert line["upstream_service_time"] is None and line["trace_id"] is None
    # The core made up an x-request-id when it answered (as it does when it forwards).
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", line["x_request_id"])


def test_one_write_per_burst(loop):
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    reqs = [forwarded() for _ in range(5)]
    for req in reqs[:3]:
        log.log(req)
    assert sink.writes == []  # nothing written inside the burst
    turn(loop)
    assert len(sink.writes) == 1 and len(sink.lines) == 3
    for req in reqs[3:]:
        log.log(req)
    turn(loop)
    assert len(sink.writes) == 2 and len(sink.lines) == 5


def test_a_long_burst_is_written_in_bounded_pieces(loop, monkeypatch):
    monkeypatch.setattr(accesslog, "MAX_LINES", 4)
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    req = forwarded()
    for _ in range(10):
        log.log(req)
    assert [c.count(b"\n") for c in sink.writes] == [4, 4]
    turn(loop)
    assert [c.count(b"\n") for c in sink.writes] == [4, 4, 2]


@pytest.mark.parametrize(
    ("path", "agent"),
    [
        (b'/a"b\\c', b'agent "quoted" \\ back'),
        ("/caf\u00e9/\u65e5\u672c".encode(), "bot/\u00e9".encode()),
        (b"/bad\xff\xfe", b"tab\tand\x7f"),
    ],
)
def test_values_are_escaped(loop, path, agent):
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", b"svc")]
    log.log(
        forwarded(headers=[*headers, (b"user-agent", agent)], body=b"", response=[(b":status", b"200")], trailers=())
    )
    turn(loop)
    [line] = sink.lines
    assert line["path"] == path.decode("utf-8", "replace")
    assert line["user_agent"] == agent.decode("utf-8", "replace")
    assert sink.writes[0].isascii()


def test_failures_are_always_logged_and_successes_sampled(loop):
    sink = Sink()
    draws = iter([0.1, 0.9, 0.3, 0.7])
    log = AccessLog(settings(sampling=0.5), sink, loop=loop, rng=lambda: next(draws))
    ok = forwarded()
    for _ in range(4):
        log.log(ok)  # logged when the draw is under 0.5: the 1st and 3rd
    log.log(forwarded(trailers=[(b"grpc-status", b"2")]))
    log.log(answered_by_proxy())
    turn(loop)
    lines = sink.lines
    assert [line["grpc_status"] for line in lines] == [0, 0, 2, None]
    assert lines[-1]["response_flags"] == "NR"


def test_sampling_zero_logs_failures_only(loop):
    sink = Sink()
    log = AccessLog(settings(sampling=0.0), sink, loop=loop)
    for _ in range(20):
        log.log(forwarded())
    log.log(forwarded(headers=REQUEST, body=b"", response=[(b":status", b"500")], response_body=b"", trailers=()))
    turn(loop)
    assert [line["response_code"] for line in sink.lines] == [500]


@pytest.mark.parametrize(
    ("status", "grpc", "is_grpc", "flags", "failed"),
    [
        (200, -1, False, "", False),
        (404, -1, False, "", False),
        (503, -1, False, "", True),
        (0, -1, False, "", True),
        (200, 0, True, "", False),
        (200, 5, True, "", True),
        (200, -1, True, "", True),
        (200, 0, True, "URX", True),
        (200, -1, False, "NR", True),
        (404, -1, False, "NR", True),
        (200, -1, False, "DI", False),  # an injected delay, then a success
        (200, -1, False, "DR", False),  # a direct response
        (503, -1, False, "DR", True),
        (200, 14, True, "DR", True),
    ],
)
def test_what_counts_as_a_failure(status, grpc, is_grpc, flags, failed):
    assert is_failure(status, grpc, is_grpc, flags) is failed


def test_downstream_peer_from_the_connections_transport(loop):
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    req = forwarded()
    other = forwarded()

    class Transport:
        def __init__(self, peer):
            self.peer = peer

        def get_extra_info(self, name):
            return self.peer if name == "peername" else None

    class Protocol:
        def __init__(self, peer):
            self.transport = Transport(peer)

        def events(self, events):
            pass

    req.down.conn.handler = Protocol(("10.0.0.7", 43210)).events
    other.down.conn.handler = Protocol(("fd00::1", 80, 0, 0)).events
    log.log(req)
    log.log(other)
    turn(loop)
    assert [line["downstream_peer"] for line in sink.lines] == ["10.0.0.7:43210", "[fd00::1]:80"]


def test_a_file_is_appended_to(loop, tmp_path):
    path = tmp_path / "access.log"
    path.write_text('{"earlier": true}\n')
    log = AccessLog(settings(str(path)), loop=loop)
    req = forwarded()
    log.log(req)
    log.log(req)
    assert path.read_text().count("\n") == 1  # not yet: the burst is still on
    turn(loop)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"earlier": True} and len(lines) == 3 and lines[1]["path"] == "/pkg.Svc/Call"
    log.log(req)
    log.close()  # writes what is left
    assert path.read_text().count("\n") == 4


def test_a_file_that_cannot_be_opened_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-dir" / "access.log"
    with pytest.raises(
        AccessLogError, match=r"^--access-log .*access\.log: cannot open it: No such file or directory$"
    ):
        AccessLog(settings(str(missing)))


def test_close_writes_without_the_loop(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(settings(str(path)), loop=asyncio.new_event_loop())
    try:
        log.log(forwarded())
        log.close()
        assert json.loads(path.read_text())["response_code"] == 200
    finally:
        log._loop.close()


def test_writes_to_a_pipe_keep_lines_whole(loop, monkeypatch):
    # Several workers share stdout: each write to a pipe must be whole lines within PIPE_BUF.
    read_fd, write_fd = os.pipe()
    writes: list[bytes] = []
    real_write = os.write
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: _read_all(read_fd, chunks), daemon=True)
    reader.start()
    try:
        log = AccessLog(settings(f"/dev/fd/{write_fd}"), loop=loop)

        def spy(fd, data):
            if fd == log._fd:
                writes.append(bytes(data))
            return real_write(fd, data)

        monkeypatch.setattr(accesslog.os, "write", spy)
        req = forwarded()
        for _ in range(100):
            log.log(req)
        turn(loop)
        log.close()
    finally:
        os.close(write_fd)
        reader.join(10)
        os.close(read_fd)
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["response_code"] == 200 for line in lines)
    assert len(writes) > 1 and all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)


def _read_all(fd: int, out: list[bytes]) -> None:
    while chunk := os.read(fd, 65536):
        out.append(chunk)


def test_line_end_cuts_at_whole_lines():
    data = b"aaaa\nbb\ncccccc\nd\n"
    assert accesslog._line_end(data, 0, 9) == 8
    assert accesslog._line_end(data, 8, 7) == 15
    assert accesslog._line_end(data, 8, 3) == 15  # a line longer than the limit goes whole
    assert accesslog._line_end(b"abc", 0, 2) == 3


def test_a_failing_destination_drops_lines_and_warns_once(loop, tmp_path, caplog):
    path = tmp_path / "access.log"
    log = AccessLog(settings(str(path)), loop=loop)
    os.close(log._fd)  # every write now fails with EBADF
    req = forwarded()
    with caplog.at_level(logging.WARNING, logger="meshproxy.accesslog"):
        for _ in range(3):
            log.log(req)
            log.log(req)
            turn(loop)
    assert log.dropped == 6
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["access log lines dropped: [Errno 9] Bad file descriptor"]
    log._own_fd = False


def test_start_time_follows_the_wall_clock_across_seconds(loop):
    # The cached second must change with the request's start time.
    sink = Sink()
    log = AccessLog(settings(), sink, loop=loop)
    req = forwarded()
    log.log(req)
    log._wall_offset += 1_500_000_000  # as if the next request had started 1.5 s later
    log.log(req)
    turn(loop)
    first, second = (datetime.datetime.fromisoformat(line["start_time"]) for line in sink.lines)
    assert second - first == datetime.timedelta(milliseconds=1500)


def test_formatting_cost_is_reported():
    """Prints ns per logged request (pytest -s) for the record; asserts only that every line came out."""
    loop = asyncio.new_event_loop()
    written = [0]

    def count(data: bytes) -> None:
        written[0] += data.count(b"\n")

    try:
        log = AccessLog(settings(), count, loop=loop)
        req = forwarded(headers=[*GRPC, (b"user-agent", b"grpc-python/1.0")])
        n = 20_000
        t = time.process_time_ns()
        for i in range(n):
            log.log(req)
            if i % 64 == 63:
                log.flush()
        log.flush()
        print(f"[accesslog] {(time.process_time_ns() - t) / n:.0f} ns of CPU per logged request")
    finally:
        loop.close()
    assert written[0] == n
