"""The official gRPC interop test cases (grpc/grpc doc/interop-test-descriptions.md), each run
straight to the interop server and through the sidecar: sizes and assertions as written there."""

from __future__ import annotations

import grpc
import pytest

from tests.integration import harness

pytestmark = pytest.mark.skipif(not harness.GRPC_PROTO_AVAILABLE, reason=harness.GRPC_PROTO_MISSING)

#: Every call's deadline: a hung proxy fails the test instead of hanging it.
TIMEOUT = 30

REQUEST_SIZES = (27182, 8, 1828, 45904)
RESPONSE_SIZES = (31415, 9, 2653, 58979)
LARGE_REQUEST = 271828
LARGE_RESPONSE = 314159

ECHO_INITIAL = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
ECHO_TRAILING = ("x-grpc-test-echo-trailing-bin", b"\xab\xab\xab")


def payload(pb, size: int):
    return pb.messages_pb2.Payload(body=bytes(size))


def test_empty_unary(interop, stub):
    response = stub.EmptyCall(interop.empty_pb2.Empty(), timeout=TIMEOUT)
    assert response is not None
    assert response == interop.empty_pb2.Empty()
    assert response.ByteSize() == 0


def test_large_unary(interop, stub):
    request = interop.messages_pb2.SimpleRequest(response_size=LARGE_RESPONSE, payload=payload(interop, LARGE_REQUEST))
    response = stub.UnaryCall(request, timeout=TIMEOUT)
    assert len(response.payload.body) == LARGE_RESPONSE
    assert response.payload.body == bytes(LARGE_RESPONSE)


def test_client_streaming(interop, stub):
    requests = [interop.messages_pb2.StreamingInputCallRequest(payload=payload(interop, n)) for n in REQUEST_SIZES]
    response = stub.StreamingInputCall(iter(requests), timeout=TIMEOUT)
    assert response.aggregated_payload_size == 74922 == sum(REQUEST_SIZES)


def test_server_streaming(interop, stub):
    messages = interop.messages_pb2
    request = messages.StreamingOutputCallRequest(
        response_parameters=[messages.ResponseParameters(size=n) for n in RESPONSE_SIZES]
    )
    responses = list(stub.StreamingOutputCall(request, timeout=TIMEOUT))
    assert [len(r.payload.body) for r in responses] == list(RESPONSE_SIZES)
    assert all(r.payload.body == bytes(len(r.payload.body)) for r in responses)


def test_ping_pong(interop, stub):
    messages = interop.messages_pb2
    sizes = []
    with harness.RequestPipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=TIMEOUT)
        for request_size, response_size in zip(REQUEST_SIZES, RESPONSE_SIZES, strict=True):
            pipe.add(
                messages.StreamingOutputCallRequest(
                    response_parameters=[messages.ResponseParameters(size=response_size)],
                    payload=payload(interop, request_size),
                )
            )
            response = next(responses)
            assert response.payload.body == bytes(response_size)
            sizes.append(len(response.payload.body))
        pipe.close()
        assert list(responses) == []
    assert sizes == list(RESPONSE_SIZES)
    assert responses.code() is grpc.StatusCode.OK


def test_empty_stream(stub):
    responses = stub.FullDuplexCall(iter(()), timeout=TIMEOUT)
    assert list(responses) == []
    assert responses.code() is grpc.StatusCode.OK


def test_cancel_after_begin(stub):
    with harness.RequestPipe() as pipe:
        future = stub.StreamingInputCall.future(pipe, timeout=TIMEOUT)
        assert future.cancel()
        assert future.cancelled()
        assert future.code() is grpc.StatusCode.CANCELLED


def test_cancel_after_first_response(interop, stub):
    messages = interop.messages_pb2
    with harness.RequestPipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=TIMEOUT)
        pipe.add(
            messages.StreamingOutputCallRequest(
                response_parameters=[messages.ResponseParameters(size=31415)], payload=payload(interop, 27182)
            )
        )
        assert len(next(responses).payload.body) == 31415
        responses.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            next(responses)
    assert raised.value.code() is grpc.StatusCode.CANCELLED
    assert responses.code() is grpc.StatusCode.CANCELLED


def test_timeout_on_sleeping_server(interop, stub):
    with harness.RequestPipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=0.001)
        pipe.add(interop.messages_pb2.StreamingOutputCallRequest(payload=payload(interop, 27182)))
        with pytest.raises(grpc.RpcError) as raised:
            next(responses)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_custom_metadata(interop, stub):
    messages = interop.messages_pb2
    metadata = (ECHO_INITIAL, ECHO_TRAILING)

    request = messages.SimpleRequest(response_size=LARGE_RESPONSE, payload=payload(interop, LARGE_REQUEST))
    response, call = stub.UnaryCall.with_call(request, metadata=metadata, timeout=TIMEOUT)
    assert len(response.payload.body) == LARGE_RESPONSE
    assert ECHO_INITIAL in call.initial_metadata()
    assert ECHO_TRAILING in call.trailing_metadata()

    request = messages.StreamingOutputCallRequest(
        response_parameters=[messages.ResponseParameters(size=LARGE_RESPONSE)],
        payload=payload(interop, LARGE_REQUEST),
    )
    responses = stub.FullDuplexCall(iter([request]), metadata=metadata, timeout=TIMEOUT)
    assert [len(r.payload.body) for r in responses] == [LARGE_RESPONSE]
    assert responses.code() is grpc.StatusCode.OK
    assert ECHO_INITIAL in responses.initial_metadata()
    assert ECHO_TRAILING in responses.trailing_metadata()


def _check_echoed_status(interop, stub, message: str, *, duplex: bool) -> None:
    messages = interop.messages_pb2
    status = messages.EchoStatus(code=2, message=message)

    with pytest.raises(grpc.RpcError) as raised:
        stub.UnaryCall(messages.SimpleRequest(response_status=status), timeout=TIMEOUT)
    assert raised.value.code() is grpc.StatusCode.UNKNOWN
    assert raised.value.code().value[0] == 2
    assert raised.value.details() == message

    if duplex:
        responses = stub.FullDuplexCall(
            iter([messages.StreamingOutputCallRequest(response_status=status)]), timeout=TIMEOUT
        )
        with pytest.raises(grpc.RpcError) as raised:
            next(responses)
        assert raised.value.code() is grpc.StatusCode.UNKNOWN
        assert raised.value.details() == message


def test_status_code_and_message(interop, stub):
    _check_echoed_status(interop, stub, "test status message", duplex=True)


def test_special_status_message(interop, stub):
    _check_echoed_status(
        interop, stub, "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n", duplex=False
    )


def test_unimplemented_method(interop, stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnimplementedCall(interop.empty_pb2.Empty(), timeout=TIMEOUT)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_unimplemented_service(interop, channel):
    unimplemented = interop.test_pb2_grpc.UnimplementedServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        unimplemented.UnimplementedCall(interop.empty_pb2.Empty(), timeout=TIMEOUT)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
