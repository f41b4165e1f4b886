"""The gRPC interop test server (grpc.testing.TestService, as grpc/grpc's
doc/interop-test-descriptions.md describes it) on grpcio, plaintext.

    python tests/integration/interop_server.py --port 50051 [--pb2-dir DIR]

``--pb2-dir`` names where ``harness.generate_interop_pb2`` already put the generated modules;
without it they are generated into a temporary directory. SIGTERM stops it (exit 0).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

try:
    from tests.integration import harness
except ImportError:  # run as a script: this file's folder is sys.path[0]
    import harness

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
MAX_MESSAGE = 64 * 1024 * 1024


def make_servicer(pb):
    messages = pb.messages_pb2

    def echo_metadata(context: grpc.ServicerContext) -> None:
        """Echo Metadata: the initial key back as initial metadata, the trailing one as trailers."""
        received = context.invocation_metadata()
        initial = [(k, v) for k, v in received if k == ECHO_INITIAL]
        trailing = [(k, v) for k, v in received if k == ECHO_TRAILING]
        if initial:
            context.send_initial_metadata(initial)
        if trailing:
            context.set_trailing_metadata(trailing)

    def echo_status(request, context: grpc.ServicerContext) -> bool:
        """Echo Status: close with the requested code and message; True if it did."""
        if not request.HasField("response_status") or request.response_status.code == 0:
            return False
        context.set_code(_status_code(request.response_status.code))
        context.set_details(request.response_status.message)
        return True

    def check_payload_type(request, context: grpc.ServicerContext) -> None:
        if request.response_type != messages.COMPRESSABLE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported response_type {request.response_type}")

    def check_compression(request, context: grpc.ServicerContext) -> None:
        # CompressedRequest needs to see the message's compressed flag, which grpcio does not
        # show a handler: the spec's answer for a server without the feature is INVALID_ARGUMENT.
        if request.HasField("expect_compressed") and request.expect_compressed.value:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this server cannot check request compression")

    def payload(size: int):
        return messages.Payload(type=messages.COMPRESSABLE, body=bytes(size))

    def stream_responses(request, context: grpc.ServicerContext):
        for params in request.response_parameters:
            if params.interval_us:
                time.sleep(params.interval_us / 1e6)
            if params.HasField("compressed") and not params.compressed.value:
                context.disable_next_message_compression()
            yield messages.StreamingOutputCallResponse(payload=payload(params.size))

    class TestService(pb.test_pb2_grpc.TestServiceServicer):
        # UnimplementedCall is left to the generated base class: UNIMPLEMENTED.

        def EmptyCall(self, request, context):
            echo_metadata(context)
            return pb.empty_pb2.Empty()

        def UnaryCall(self, request, context):
            echo_metadata(context)
            if echo_status(request, context):
                return messages.SimpleResponse()
            check_payload_type(request, context)
            check_compression(request, context)
            if request.HasField("response_compressed") and request.response_compressed.value:
                context.set_compression(grpc.Compression.Gzip)
            return messages.SimpleResponse(payload=payload(request.response_size))

        def StreamingOutputCall(self, request, context):
            echo_metadata(context)
            if echo_status(request, context):
                return
            check_payload_type(request, context)
            if any(p.HasField("compressed") and p.compressed.value for p in request.response_parameters):
                context.set_compression(grpc.Compression.Gzip)
            yield from stream_responses(request, context)

        def StreamingInputCall(self, request_iterator, context):
            echo_metadata(context)
            total = 0
            for request in request_iterator:
                check_compression(request, context)
                total += len(request.payload.body)
            return messages.StreamingInputCallResponse(aggregated_payload_size=total)

        def FullDuplexCall(self, request_iterator, context):
            echo_metadata(context)
            for request in request_iterator:
                if echo_status(request, context):
                    return
                check_payload_type(request, context)
                yield from stream_responses(request, context)

        def HalfDuplexCall(self, request_iterator, context):
            echo_metadata(context)
            requests = list(request_iterator)
            for request in requests:
                if echo_status(request, context):
                    return
                check_payload_type(request, context)
            for request in requests:
                yield from stream_responses(request, context)

    return TestService()


def _status_code(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def serve(port: int, host: str, pb2_dir: str | None) -> None:
    tmp = None
    if pb2_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="interop-pb2-")
        pb2_dir = tmp.name
        harness.generate_interop_pb2(pb2_dir)
    pb = harness.load_interop(pb2_dir)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
    )
    pb.test_pb2_grpc.add_TestServiceServicer_to_server(make_servicer(pb), server)
    if server.add_insecure_port(f"{host}:{port}") != port:
        sys.exit(f"interop server: cannot listen on {host}:{port}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"interop server listening on {host}:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=1).wait(5)
    if tmp is not None:
        tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=harness.HOST)
    parser.add_argument("--pb2-dir", help="where generate_interop_pb2 put the generated modules")
    args = parser.parse_args(argv)
    serve(args.port, args.host, args.pb2_dir)


if __name__ == "__main__":
    main()
