"""Active gRPC health checks end to end: a sidecar in front of two grpcio servers that run the standard
health service. An endpoint whose health service says NOT_SERVING (or that stops answering) gets no
requests once the checks agree, and takes them again once it passes; every call still succeeds,
served by the healthy one. Bounded: a few hundred calls, every wait capped."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshproxy.health import check_request, serving_status
from tests.integration.harness import HOST, Sidecar, free_port, poll_until

SERVICE = "t.Echo"


class Backend:
    """A grpcio server with an echo method that counts calls, and the health service."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_unary_rpc_method_handler(self._echo)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()
        self.serving(True)

    def _echo(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
        return request

    def serving(self, yes: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if yes else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def backends():
    bs = [Backend(), Backend()]
    yield bs
    for b in bs:
        b.stop()


def sidecar_config(tmp_path, port: int, backends, health_check: dict | None) -> str:
    cluster = {
        "name": "echo",
        "lb_policy": "ROUND_ROBIN",
        "endpoints": [{"address": b.address} for b in backends],
    }
    if health_check is not None:
        cluster["health_check"] = health_check
    cfg = {
        "listeners": [
            {
                "name": "in",
                "address": f"{HOST}:{port}",
                "virtual_hosts": [
                    {"name": "all", "domains": ["*"], "routes": [{"route": {"clusters": [{"cluster": "echo"}]}}]}
                ],
            }
        ],
        "clusters": [cluster],
    }
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def calls(channel, n: int) -> None:
    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    for _ in range(n):
        assert echo(b"x", timeout=5) == b"x"


def share(backends, channel, n: int = 40) -> list[int]:
    before = [b.calls for b in backends]
    calls(channel, n)
    return [b.calls - x for b, x in zip(backends, before, strict=True)]


HC = {"interval": "0.2s", "timeout": "0.1s", "unhealthy_threshold": 2, "healthy_threshold": 1}


def test_a_not_serving_endpoint_is_skipped_until_it_serves_again(tmp_path, backends):
    port = free_port()
    with Sidecar(config_file=sidecar_config(tmp_path, port, backends, HC), listen_port=port) as sc:
        channel = grpc.insecure_channel(sc.address)
        assert share(backends, channel) == [20, 20], "both healthy: round robin"
        backends[1].serving(False)
        # Two failed checks, 0.2 s apart: within about a second no call reaches it.
        assert poll_until(lambda: share(backends, channel, 10)[1] == 0, timeout=10)
        assert share(backends, channel) == [40, 0], "every call served by the healthy one"
        backends[1].serving(True)
        assert poll_until(lambda: share(backends, channel, 10)[1] > 0, timeout=10)
        assert share(backends, channel) == [20, 20]
        channel.close()


def test_an_endpoint_whose_checks_time_out_is_skipped(tmp_path, backends):
    port = free_port()
    # The health service of backend 1 answers nothing: its server is gone, the TCP port refuses.
    with Sidecar(config_file=sidecar_config(tmp_path, port, backends, HC), listen_port=port) as sc:
        channel = grpc.insecure_channel(sc.address)
        calls(channel, 4)
        backends[1].stop()
        assert poll_until(lambda: "unhealthy" in sc.output(), timeout=10), sc.output()
        before = backends[0].calls
        calls(channel, 20)
        assert backends[0].calls - before == 20
        channel.close()


def test_without_health_check_a_not_serving_endpoint_still_gets_requests(tmp_path, backends):
    port = free_port()
    with Sidecar(config_file=sidecar_config(tmp_path, port, backends, None), listen_port=port) as sc:
        channel = grpc.insecure_channel(sc.address)
        backends[1].serving(False)
        time.sleep(0.6)  # what three check intervals would have been
        assert share(backends, channel) == [20, 20]
        channel.close()


@pytest.mark.parametrize("service", ["", "t.Echo", "x" * 300])
def test_the_hand_encoded_request_is_grpcs(service):
    assert check_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_the_status_is_read_from_grpcs_response(status):
    message = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    assert serving_status(message) == status
    # Unknown fields before it (a newer server) are skipped.
    assert serving_status(b"\x12\x03abc\x1d\x00\x00\x00\x00" + message) == status


def test_a_response_that_is_not_protobuf_is_refused():
    with pytest.raises(ValueError):
        serving_status(b"\x0f")
    with pytest.raises(ValueError):
        serving_status(b"\x12\x05ab")
