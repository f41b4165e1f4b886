"""Fixtures for the admin service tests: a real sidecar process (``meshproxy run --config``) with a
grpcio upstream, and grpcio clients of its admin address.

The config has three clusters, so that GetClusters has every endpoint state to show: ``backend``
(the upstream, which answers ``Who``; subset ``v1``), ``checked`` (the same upstream, actively
health-checked: it serves no grpc.health.v1, so it turns UNHEALTHY) and ``dead`` (a closed port
with outlier detection ejecting at the first connect failure).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from meshproxy import config
from meshproxy.admin.v1 import admin_pb2_grpc
from tests.integration import harness

HOST = harness.HOST
SERVICE = "admintest.Upstream"
WHO = f"/{SERVICE}/Who"
DEAD = "/admintest.Dead/Call"
CALL_TIMEOUT = 10.0


def sidecar_config(upstream: str, listen_port: int, dead_port: int, version: str = "v1") -> config.SidecarConfig:
    return config.from_dict(
        {
            "version": version,
            "node": {"id": "node-a", "namespace": "shop", "workload": "cart", "labels": {"app": "cart"}},
            "listeners": [
                {
                    "name": "main",
                    "address": f"{HOST}:{listen_port}",
                    "virtual_hosts": [
                        {
                            "name": "all",
                            "domains": ["*"],
                            "routes": [
                                {
                                    "name": "who",
                                    "match": {"path": WHO},
                                    "route": {"clusters": [{"cluster": "backend", "subset": "v1"}]},
                                    # Never used (the backend answers): for the config dump.
                                    "timeout": "30s",
                                    "retry_policy": {
                                        "num_retries": 2,
                                        "per_try_timeout": "10s",
                                        "retry_on": ["unavailable", "reset"],
                                        "budget": {"retry_ratio": 0.3, "min_retries_per_second": 4},
                                    },
                                },
                                {
                                    "name": "dead",
                                    "match": {"prefix": "/admintest.Dead/"},
                                    "route": {"clusters": [{"cluster": "dead"}]},
                                },
                                {
                                    "name": "faulty",
                                    "match": {"prefix": "/admintest.Faulty/"},
                                    "route": {"clusters": [{"cluster": "backend"}]},
                                    "fault": {"abort": {"percentage": 100, "grpc_status": 14}},
                                },
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "endpoints": [{"address": upstream, "weight": 3, "labels": {"version": "v1"}}],
                    "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                    "circuit_breakers": {"max_requests": 77},
                },
                {
                    "name": "checked",
                    "lb_policy": "ROUND_ROBIN",
                    "endpoints": [{"address": upstream}],
                    "health_check": {"interval": "0.2s", "timeout": "0.2s", "unhealthy_threshold": 1},
                },
                {
                    "name": "dead",
                    "endpoints": [{"address": f"{HOST}:{dead_port}"}],
                    "connect_timeout": "1s",
                    "outlier_detection": {
                        "consecutive_5xx": 1,
                        "consecutive_local_origin_failures": 1,
                        "interval": "0.1s",
                        "base_ejection_time": "300s",
                        "max_ejection_percent": 100,
                    },
                },
            ],
        }
    )


@contextlib.contextmanager
def upstream_server() -> Iterator[str]:
    handlers = {"Who": grpc.unary_unary_rpc_method_handler(lambda request, context: b"backend")}
    with harness.grpc_server(handlers, SERVICE) as address:
        yield address


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=list(harness.CLIENT_OPTIONS))


@contextlib.contextmanager
def running_sidecar(tmp: Path, upstream: str, *extra_args: str, version: str = "v1") -> Iterator[harness.Sidecar]:
    listen_port = harness.free_port()
    dead_port = harness.free_port()  # nothing listens there
    path = tmp / "sidecar.yaml"
    path.write_text(config.to_yaml(sidecar_config(upstream, listen_port, dead_port, version)))
    sidecar = harness.Sidecar(config_file=path, listen_port=listen_port, extra_args=list(extra_args))
    sidecar.config_path = path
    with sidecar:
        # With several workers the listen port may accept (another worker) before worker 0 serves admin.
        harness.wait_listening(HOST, sidecar.admin_port, 20, alive=sidecar.process.alive)
        yield sidecar


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with upstream_server() as address:
        yield address


@pytest.fixture(scope="module")
def sidecar(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Sidecar]:
    """One sidecar for the read-only tests of a module (tests that drain or stop make their own)."""
    with running_sidecar(tmp_path_factory.mktemp("admin"), upstream) as s:
        yield s


def admin_address(sidecar: harness.Sidecar) -> str:
    return f"{sidecar.host}:{sidecar.admin_port}"


@pytest.fixture
def admin_channel(sidecar: harness.Sidecar) -> Iterator[grpc.Channel]:
    with channel(admin_address(sidecar)) as ch:
        yield ch


@pytest.fixture
def stub(admin_channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(admin_channel)
