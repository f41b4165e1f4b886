"""One version of the demo's Reviews gRPC service (reviews.proto), plaintext, on loopback.

    python examples/demo/reviews_server.py --version v1 --port 50051

Every answer carries ``--version``, so a client can see which version of the service a call
reached. SIGTERM or SIGINT stops it gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc

# Compiled from reviews.proto, found on sys.path (this script's folder), when the module loads.
reviews_pb2, reviews_pb2_grpc = grpc.protos_and_services("reviews.proto")


class Reviews(reviews_pb2_grpc.ReviewsServicer):
    def __init__(self, version: str) -> None:
        self.version = version

    def GetReview(self, request, context):
        return reviews_pb2.Review(
            version=self.version, text=f"{request.product or 'the product'}: reviewed by {self.version}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="the version this server reports, e.g. v1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    # No SO_REUSEPORT (grpcio's default): a port already taken must fail here, not share traffic.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    reviews_pb2_grpc.add_ReviewsServicer_to_server(Reviews(args.version), server)
    address = f"{args.host}:{args.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        parser.exit(1, f"reviews_server: cannot listen on {address}: {e}\n")
    server.start()
    print(f"reviews {args.version} serving on {address}", flush=True)
    # A timed wait, not a bare one: signal handlers run only between the main thread's steps.
    while not stop.wait(0.5):
        pass
    server.stop(grace=1).wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
