"""grpcio clients and a grpcio server, each test run straight (``direct``) and through the
sidecar: every call shape, messages far larger than the HTTP/2 windows, cancellation and
deadlines seen from the server, metadata and trailers both ways, many concurrent calls, and
no connection left open in the sidecar once its clients are gone.

The server runs in this process (raw-bytes generic handlers, no protos) so that tests can ask
what it observed: the metadata it got, its deadline, whether it saw a call end. Header fields
grpcio hides (grpc-timeout, te) are read off the wire by ``harness.H2CaptureServer``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest

from tests.integration import harness
from tests.integration.conftest import SIDECAR_KEY, open_target

#: Every call's deadline unless a test is about deadlines: a hung proxy fails the test.
TIMEOUT = 30
#: How long the server may take to notice that a call ended (cancel, deadline).
NOTICE = 10

MIB = 1024 * 1024
LARGE = 4 * MIB
MAX_MESSAGE = 64 * MIB
LARGE_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE))

SERVICE = "meshtest.Echo"
CALL_ID = "x-call-id"
HOLD = "x-hold-seconds"


def chunk(index: int, size: int) -> bytes:
    """Message ``index`` of a server stream: its index, then its low byte repeated."""
    return (struct.pack(">I", index) + bytes([index % 256]) * size)[:size]


def new_call_id() -> str:
    return uuid.uuid4().hex


class Recorder:
    """What the server saw, per call id, for the test thread to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: dict[str, dict] = {}

    def record(self, call_id: str | None, **facts) -> None:
        if call_id is None:
            return
        with self._cond:
            self._calls.setdefault(call_id, {}).update(facts)
            self._cond.notify_all()

    def wait(self, call_id: str, key: str, timeout: float = NOTICE) -> dict:
        """The facts for ``call_id`` once ``key`` is among them; AssertionError after ``timeout``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: key in self._calls.get(call_id, {}), timeout)
            facts = dict(self._calls.get(call_id, {}))
        assert ok, f"the server did not record {key!r} for call {call_id} within {timeout}s: {facts}"
        return facts


def _call_id(context: grpc.ServicerContext) -> str | None:
    return next((v for k, v in context.invocation_metadata() if k == CALL_ID), None)


def _echo_metadata(context: grpc.ServicerContext) -> None:
    """x-meta-* comes back as initial metadata and, renamed x-trailer-*, as trailers."""
    pairs = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-meta-")]
    context.send_initial_metadata(pairs)
    trailers = [("x-trailer-" + k.removeprefix("x-meta-"), v) for k, v in pairs]
    context.set_trailing_metadata([*trailers, ("x-only-trailer", "t")])


class EchoService:
    """The handlers, as raw bytes in and out."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def _watch(self, context: grpc.ServicerContext) -> str | None:
        """Record the call's metadata and deadline now and its end (with is_active) when it comes."""
        call_id = _call_id(context)
        self.recorder.record(
            call_id, metadata=list(context.invocation_metadata()), time_remaining=context.time_remaining()
        )
        context.add_callback(lambda: self.recorder.record(call_id, terminated=True, active=context.is_active()))
        return call_id

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._watch(context)
        _echo_metadata(context)
        return request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """A trailers-only error: the status named by the request, and trailers."""
        self._watch(context)
        code_value, details = request[0], request[1:].decode()
        code = next(c for c in grpc.StatusCode if c.value[0] == code_value)
        pairs = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-meta-")]
        context.set_trailing_metadata([("x-trailer-" + k.removeprefix("x-meta-"), v) for k, v in pairs])
        context.abort(code, details)

    def server_stream(self, request: bytes, context: grpc.ServicerContext):
        call_id = self._watch(context)
        _echo_metadata(context)
        count, size = struct.unpack(">II", request)
        for index in range(count):
            self.recorder.record(call_id, sent=index + 1)
            yield chunk(index, size)

    def client_stream(self, request_iterator, context: grpc.ServicerContext) -> bytes:
        self._watch(context)
        _echo_metadata(context)
        digest, count = hashlib.sha256(), 0
        for message in request_iterator:
            digest.update(message)
            count += 1
        return struct.pack(">I", count) + digest.digest()

    def bidi(self, request_iterator, context: grpc.ServicerContext):
        """Echo each message. Requests are read on a thread of their own: grpcio stops resuming a
        response generator once its call has ended, so only a reader can witness the end."""
        call_id = self._watch(context)
        _echo_metadata(context)
        hold = float(next((v for k, v in context.invocation_metadata() if k == HOLD), 0))
        echoes: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                for message in request_iterator:
                    echoes.put(message)
            except Exception as exc:  # the request stream of a cancelled call may end in an error
                self.recorder.record(call_id, request_error=repr(exc))
            finally:
                echoes.put(None)
            # A cancel can also look like a plain end of requests with the call active for a
            # moment more (grpcio's race, direct too): with x-hold, linger to see the call end.
            start = time.monotonic()
            while context.is_active() and time.monotonic() - start < min(hold, 60):
                time.sleep(0.01)
            self.recorder.record(call_id, handler_done=True, handler_saw_active=context.is_active())

        threading.Thread(target=read, name=f"bidi-reader-{call_id}", daemon=True).start()
        while (message := echoes.get(timeout=2 * TIMEOUT)) is not None:
            yield message

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Sleep the requested seconds (bounded) unless the call ends first."""
        call_id = self._watch(context)
        (seconds,) = struct.unpack(">d", request)
        start = time.monotonic()
        self.recorder.record(call_id, started=True)
        while context.is_active() and time.monotonic() - start < min(seconds, 60):
            time.sleep(0.01)
        self.recorder.record(call_id, slept=time.monotonic() - start, handler_saw_active=context.is_active())
        return b"slept"

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            },
        )


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def echo_server(recorder: Recorder):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=96), options=list(LARGE_OPTIONS))
    server.add_generic_rpc_handlers((EchoService(recorder).handler(),))
    port = server.add_insecure_port(f"{harness.HOST}:0")
    server.start()
    yield f"{harness.HOST}:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def upstream_address(echo_server: str) -> str:
    return echo_server


@pytest.fixture
def channel(target):
    with target.channel(LARGE_OPTIONS) as ch:
        yield ch


class Echo:
    """Client-side callables for the service's methods on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.unary = channel.unary_unary(f"/{SERVICE}/Unary")
        self.fail = channel.unary_unary(f"/{SERVICE}/Fail")
        self.server_stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        self.client_stream = channel.stream_unary(f"/{SERVICE}/ClientStream")
        self.bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
        self.sleep = channel.unary_unary(f"/{SERVICE}/Sleep")


@pytest.fixture
def echo(channel: grpc.Channel) -> Echo:
    return Echo(channel)


def stream_request(count: int, size: int) -> bytes:
    return struct.pack(">II", count, size)


def digest_of(messages: list[bytes]) -> bytes:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(message)
    return struct.pack(">I", len(messages)) + digest.digest()


# -- the four call shapes --------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_unary(echo: Echo, size: int):
    request = os.urandom(size)
    response, call = echo.unary.with_call(request, timeout=TIMEOUT)
    assert response == request
    assert call.code() is grpc.StatusCode.OK


def test_server_streaming(echo: Echo):
    responses = echo.server_stream(stream_request(100, 1000), timeout=TIMEOUT)
    assert list(responses) == [chunk(i, 1000) for i in range(100)]
    assert responses.code() is grpc.StatusCode.OK


def test_client_streaming(echo: Echo):
    requests = [os.urandom(i * 37) for i in range(100)]
    assert echo.client_stream(iter(requests), timeout=TIMEOUT) == digest_of(requests)


def test_bidi_streaming_lockstep(echo: Echo):
    with harness.RequestPipe() as pipe:
        responses = echo.bidi(pipe, timeout=TIMEOUT)
        for i in range(50):
            message = os.urandom(i * 100 + 1)
            pipe.add(message)
            assert next(responses) == message
        pipe.close()
        assert list(responses) == []
    assert responses.code() is grpc.StatusCode.OK


def test_empty_streams(echo: Echo):
    assert list(echo.server_stream(stream_request(0, 0), timeout=TIMEOUT)) == []
    assert echo.client_stream(iter(()), timeout=TIMEOUT) == digest_of([])
    responses = echo.bidi(iter(()), timeout=TIMEOUT)
    assert list(responses) == []
    assert responses.code() is grpc.StatusCode.OK


# -- messages larger than any HTTP/2 window ---------------------------------------


def test_large_unary_each_way(echo: Echo):
    request = os.urandom(LARGE)
    assert echo.unary(request, timeout=TIMEOUT) == request


def test_large_client_stream(echo: Echo):
    requests = [os.urandom(LARGE) for _ in range(4)]
    assert echo.client_stream(iter(requests), timeout=TIMEOUT) == digest_of(requests)


def test_large_server_stream(echo: Echo):
    responses = echo.server_stream(stream_request(4, LARGE), timeout=TIMEOUT)
    received = list(responses)
    assert len(received) == 4
    assert all(message == chunk(i, LARGE) for i, message in enumerate(received))


def test_large_bidi_lockstep(echo: Echo):
    with harness.RequestPipe() as pipe:
        responses = echo.bidi(pipe, timeout=TIMEOUT)
        for _ in range(4):
            message = os.urandom(LARGE)
            pipe.add(message)
            assert next(responses) == message
        pipe.close()
        assert list(responses) == []


# -- cancellation and deadlines, as the server sees them --------------------------


def test_cancel_server_stream_mid_stream(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    total = 100_000
    responses = echo.server_stream(stream_request(total, 1024), metadata=[(CALL_ID, call_id)], timeout=TIMEOUT)
    for i in range(5):
        assert next(responses) == chunk(i, 1024)
    responses.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        next(responses)
    assert raised.value.code() is grpc.StatusCode.CANCELLED
    facts = recorder.wait(call_id, "terminated")
    assert facts["active"] is False
    # Flow control held the server back and the cancel stopped it: it never got to the end.
    assert facts["sent"] < total


def test_cancel_bidi_mid_stream(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    with harness.RequestPipe() as pipe:
        responses = echo.bidi(pipe, metadata=[(CALL_ID, call_id), (HOLD, str(NOTICE))], timeout=TIMEOUT)
        for i in range(3):
            pipe.add(bytes([i]) * 100)
            assert next(responses) == bytes([i]) * 100
        responses.cancel()
        facts = recorder.wait(call_id, "terminated")
        assert facts["active"] is False
        # The server, waiting for requests (none was half-closed), must see the call end.
        facts = recorder.wait(call_id, "handler_done", timeout=2 * NOTICE)
    assert facts["handler_saw_active"] is False
    assert responses.code() is grpc.StatusCode.CANCELLED


def test_cancel_unary_in_flight(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    sleep = 30.0
    future = echo.sleep.future(struct.pack(">d", sleep), metadata=[(CALL_ID, call_id)], timeout=2 * sleep)
    recorder.wait(call_id, "started")
    assert future.cancel()
    assert future.code() is grpc.StatusCode.CANCELLED
    facts = recorder.wait(call_id, "slept", timeout=sleep)
    assert facts["handler_saw_active"] is False
    # Its deadline was 60 s away: only the cancel can have ended it before the sleep did.
    assert facts["slept"] < sleep


def test_deadline_exceeded(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    deadline, sleep = 1.0, 20.0
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        echo.sleep(struct.pack(">d", sleep), metadata=[(CALL_ID, call_id)], timeout=deadline)
    elapsed = time.monotonic() - started
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < sleep, "the call outlived its deadline: it ended when the server finished"
    facts = recorder.wait(call_id, "slept", timeout=sleep)
    # The deadline reached the server (the header itself: test_grpc_timeout_header).
    assert facts["time_remaining"] is not None
    assert 0 < facts["time_remaining"] < sleep
    assert facts["handler_saw_active"] is False
    assert facts["slept"] < sleep


@pytest.mark.parametrize("kind", ["direct", "sidecar"])
@pytest.mark.parametrize("deadline", [0.5, 5.0, 300.0])
def test_grpc_timeout_header(request: pytest.FixtureRequest, kind: str, deadline: float):
    """What reaches the server, read off the wire: a grpc-timeout no longer than the client's
    deadline, and the header fields a gRPC server insists on."""
    with harness.H2CaptureServer() as server, open_target(request, kind, server.address) as target:
        with target.channel() as ch:
            call = ch.unary_unary(f"/{SERVICE}/Unary")
            assert call(b"hello", metadata=[("x-meta-ascii", "v")], timeout=deadline) == b""
        headers = server.requests.get(timeout=NOTICE)
    # grpcio rounds its own header up: for a 300 s deadline it sends "5M" mostly, and now and then
    # "301S" (seen here about once in 20 calls); the sidecar passes on the time left of what it got.
    assert 0 < harness.grpc_timeout_seconds(headers["grpc-timeout"]) <= deadline * 1.01 + 1
    assert headers[":method"] == "POST"
    assert headers[":path"] == f"/{SERVICE}/Unary"
    assert headers["content-type"].startswith("application/grpc")
    assert headers["te"] == "trailers"
    assert headers["x-meta-ascii"] == "v"


def test_deadline_met(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    deadline = 20.0
    assert echo.sleep(struct.pack(">d", 0.0), metadata=[(CALL_ID, call_id)], timeout=deadline) == b"slept"
    facts = recorder.wait(call_id, "slept")
    # Within grpcio's own rounding of its header (up, to fewer digits: a 20 s deadline can go out as
    # about 20.1 s, direct as through the sidecar, which passes on the time left of what it got).
    assert 0 < facts["time_remaining"] <= deadline * 1.01 + 1


def test_no_deadline_none_invented(channel: grpc.Channel, recorder: Recorder):
    """Without a client deadline (and no route timeout configured) no grpc-timeout appears."""
    call_id = new_call_id()
    # No deadline on the wire, but the wait for it is bounded all the same.
    future = Echo(channel).unary.future(b"x", metadata=[(CALL_ID, call_id)])
    try:
        assert future.result(timeout=TIMEOUT) == b"x"
    finally:
        future.cancel()
    remaining = recorder.wait(call_id, "metadata")["time_remaining"]
    # grpcio reports "no deadline" as None or as a huge number (its infinite future).
    assert remaining is None or remaining > 1e6


# -- metadata and trailers --------------------------------------------------------

SENT_METADATA = [
    ("x-meta-ascii", "hello, world"),
    ("x-meta-bin", b"\x00\x01\x7f\x80\xfe\xff"),
    ("x-meta-empty-bin", b""),
    ("x-meta-multi", "first"),
    ("x-meta-multi", "second"),
]
TRAILERS = [("x-trailer-" + k.removeprefix("x-meta-"), v) for k, v in SENT_METADATA]


def _custom(metadata) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in metadata if k.startswith(("x-meta-", "x-trailer-"))]


def test_metadata_unary(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    response, call = echo.unary.with_call(b"m", metadata=[(CALL_ID, call_id), *SENT_METADATA], timeout=TIMEOUT)
    assert response == b"m"
    assert _custom(recorder.wait(call_id, "metadata")["metadata"]) == SENT_METADATA
    assert _custom(call.initial_metadata()) == SENT_METADATA
    assert _custom(call.trailing_metadata()) == TRAILERS
    assert ("x-only-trailer", "t") in call.trailing_metadata()


def test_metadata_bidi(echo: Echo, recorder: Recorder):
    call_id = new_call_id()
    responses = echo.bidi(iter([b"a", b"b"]), metadata=[(CALL_ID, call_id), *SENT_METADATA], timeout=TIMEOUT)
    assert list(responses) == [b"a", b"b"]
    assert _custom(recorder.wait(call_id, "metadata")["metadata"]) == SENT_METADATA
    assert _custom(responses.initial_metadata()) == SENT_METADATA
    # Trailers after DATA: a HEADERS frame with END_STREAM the proxy must forward as trailers.
    assert _custom(responses.trailing_metadata()) == TRAILERS
    assert responses.code() is grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.NOT_FOUND, "no such thing"),
        (grpc.StatusCode.PERMISSION_DENIED, "100% denied: caf\u00e9 \U0001f608\r\n\tend"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
)
def test_error_status_trailers_only(echo: Echo, code: grpc.StatusCode, details: str):
    """A response that is only trailers (HEADERS with END_STREAM, grpc-status in it)."""
    request = bytes([code.value[0]]) + details.encode()
    with pytest.raises(grpc.RpcError) as raised:
        echo.fail(request, metadata=SENT_METADATA, timeout=TIMEOUT)
    assert raised.value.code() is code
    assert raised.value.details() == details
    assert _custom(raised.value.trailing_metadata()) == TRAILERS


# -- many calls at once -----------------------------------------------------------


def test_many_concurrent_unary(echo: Echo):
    count = 200
    requests = [struct.pack(">I", i) + os.urandom(i * 10) for i in range(count)]
    pending = [echo.unary.future(request, timeout=TIMEOUT) for request in requests]
    results = [future.result(timeout=TIMEOUT) for future in pending]
    assert results == requests


def test_many_concurrent_streams(echo: Echo):
    streams, messages = 50, 20

    def run(n: int) -> bool:
        requests = [struct.pack(">II", n, i) + os.urandom(n * 7 + i) for i in range(messages)]
        return list(echo.bidi(iter(requests), timeout=TIMEOUT)) == requests

    with futures.ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(run, range(streams), timeout=TIMEOUT * 2))
    assert results == [True] * streams


# -- no connection outlives its client --------------------------------------------


@pytest.fixture
def sidecar(request: pytest.FixtureRequest, upstream_address: str):
    with harness.Sidecar(upstream=upstream_address) as sidecar:
        request.node.stash[SIDECAR_KEY] = sidecar
        yield sidecar


def test_no_leaked_connections(sidecar: harness.Sidecar):
    clients = 20
    # A subchannel pool per channel: grpcio would otherwise share one TCP connection between them.
    options = [*harness.CLIENT_OPTIONS, *LARGE_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(sidecar.address, options=options) for _ in range(clients)]
    try:
        for ch in channels:
            echo = Echo(ch)
            assert echo.unary(b"ping", timeout=TIMEOUT) == b"ping"
            assert len(list(echo.server_stream(stream_request(10, 100), timeout=TIMEOUT))) == 10
            cancelled = echo.server_stream(stream_request(100_000, 1024), timeout=TIMEOUT)
            next(cancelled)
            cancelled.cancel()
            with pytest.raises(grpc.RpcError):
                echo.sleep(struct.pack(">d", 10.0), timeout=0.1)
        # The measurement sees them: one connection per client channel.
        assert harness.poll_until(lambda: sidecar.downstream_connections() == clients, NOTICE), (
            f"expected {clients} client connections, the sidecar holds {sidecar.connections()}"
        )
        upstream_peak = sidecar.upstream_connections()
    finally:
        for ch in channels:
            ch.close()
    assert harness.poll_until(lambda: sidecar.downstream_connections() == 0, NOTICE), (
        f"client connections left open after the clients closed: {sidecar.connections()}"
    )
    # Pooled upstream connections may stay, but not one per call or per client made.
    assert 1 <= upstream_peak <= clients
    assert sidecar.upstream_connections() <= upstream_peak
