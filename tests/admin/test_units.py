"""The admin pieces that need no process: per-resource versions, the config dump's type filter,
reflection's symbol index and answers, and the health status of a worker."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from meshproxy import config
from meshproxy.admin.grpc_health_v1 import health_pb2
from meshproxy.admin.grpc_reflection_v1 import reflection_pb2 as v1
from meshproxy.admin.grpcserver import Status, percent_encode
from meshproxy.admin.health import Health
from meshproxy.admin.reflection import Reflection
from meshproxy.admin.service import ResourceTracker, _filtered
from meshproxy.admin.v1 import admin_pb2


def _config(version: str, *, cluster_address: str = "127.0.0.1:1", route_to: str = "a", port: int = 2):
    vhost = {
        "name": "all",
        "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"clusters": [{"cluster": route_to}]}}],
    }
    return config.from_dict(
        {
            "version": version,
            "listeners": [{"name": "main", "address": f"127.0.0.1:{port}", "virtual_hosts": [vhost]}],
            "clusters": [
                {"name": "a", "endpoints": [{"address": cluster_address}]},
                {"name": "b", "endpoints": [{"address": "127.0.0.1:3"}]},
            ],
        }
    )


def _versions(tracker: ResourceTracker) -> dict:
    return {(s.type, s.name): s.version for s in tracker.statuses({"listener", "route", "cluster"})}


def test_resource_versions_follow_what_changed():
    tracker = ResourceTracker()
    tracker(SimpleNamespace(config=_config("v1")))
    assert set(_versions(tracker).values()) == {"v1"}
    # Same config again under a new version: nothing changed.
    tracker(SimpleNamespace(config=_config("v2")))
    assert set(_versions(tracker).values()) == {"v1"}
    # Only cluster a's endpoint changes.
    tracker(SimpleNamespace(config=_config("v3", cluster_address="127.0.0.1:9")))
    assert _versions(tracker) == {
        ("listener", "main"): "v1",
        ("route", "main"): "v1",
        ("cluster", "a"): "v3",
        ("cluster", "b"): "v1",
    }
    # The listener's address, then its routes, each on their own.
    tracker(SimpleNamespace(config=_config("v4", cluster_address="127.0.0.1:9", port=5)))
    tracker(SimpleNamespace(config=_config("v5", cluster_address="127.0.0.1:9", port=5, route_to="b")))
    versions = _versions(tracker)
    assert (versions[("listener", "main")], versions[("route", "main")]) == ("v4", "v5")
    # A resource that goes away is forgotten; one that comes back is new.
    cfg = _config("v6", cluster_address="127.0.0.1:9", port=5, route_to="b")
    del cfg.clusters[0]
    tracker(SimpleNamespace(config=cfg))
    assert ("cluster", "a") not in _versions(tracker)


def test_filtered_config_keeps_the_original_whole():
    cfg = _config("v1")
    only = _filtered(cfg, {"routes"})
    assert [ls.name for ls in only.listeners] == ["main"]
    assert only.listeners[0].address == ""
    assert len(only.listeners[0].virtual_hosts) == 1
    assert not only.clusters
    endpoints = _filtered(cfg, {"endpoints"})
    assert [c.name for c in endpoints.clusters] == ["a", "b"]
    assert endpoints.clusters[0].endpoints[0].address == "127.0.0.1:1"
    assert cfg.listeners[0].address == "127.0.0.1:2"  # untouched


def _reflection() -> Reflection:
    services = [
        admin_pb2.DESCRIPTOR.services_by_name["Admin"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        v1.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return Reflection(services, v1)


def test_reflection_symbols():
    r = _reflection()
    for symbol in [
        "meshproxy.admin.v1.Admin",
        "meshproxy.admin.v1.Admin.Drain",
        "meshproxy.admin.v1.EndpointStatus",
        "meshproxy.admin.v1.EndpointStatus.Health",
        "meshproxy.admin.v1.EndpointStatus.EJECTED",
        "meshproxy.admin.v1.EndpointStatus.labels",
        "meshproxy.admin.v1.EndpointStatus.LabelsEntry",
        "meshproxy.admin.v1.MetricFamily.HISTOGRAM",
    ]:
        assert r.symbols[symbol].name == "meshproxy/admin/v1/admin.proto", symbol
    assert r.symbols["grpc.health.v1.HealthCheckResponse.SERVING"].name == "grpc_health/v1/health.proto"
    assert r.symbols["meshproxy.v1.Cluster.LbPolicy"].name == "meshproxy/v1/config.proto"
    assert r.symbols["google.protobuf.Timestamp"].name == "google/protobuf/timestamp.proto"
    # Only what the served services need: not the control plane's API, not descriptor.proto.
    assert "meshproxy.v1.MeshControl" not in r.symbols
    assert "google.protobuf.FileDescriptorProto" not in r.symbols


def test_reflection_answers():
    r = _reflection()
    sent: set[str] = set()
    empty = r.answer(v1.ServerReflectionRequest(host="x"), sent)
    assert empty.error_response.error_code == Status.INVALID_ARGUMENT
    ext = r.answer(
        v1.ServerReflectionRequest(
            file_containing_extension=v1.ExtensionRequest(
                containing_type="meshproxy.admin.v1.Metric", extension_number=9
            )
        ),
        sent,
    )
    assert ext.error_response.error_code == Status.NOT_FOUND
    health = r.answer(v1.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"), sent)
    assert len(health.file_descriptor_response.file_descriptor_proto) == 1  # it imports nothing
    assert sent == {"grpc_health/v1/health.proto"}


def test_percent_encoded_grpc_message():
    assert percent_encode("plain text: ok") == b"plain text: ok"
    assert percent_encode("50% é\n") == b"50%25 %C3%A9%0A"


def test_health_status_follows_the_worker():
    async def run() -> None:
        worker = SimpleNamespace(ready=True)
        health = Health(worker)
        assert (
            await health.Check(health_pb2.HealthCheckRequest(), None)
        ).status == health_pb2.HealthCheckResponse.SERVING
        worker.ready = False
        response = await health.Check(health_pb2.HealthCheckRequest(service="meshproxy.admin.v1.Admin"), None)
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(run())


def test_peers_in_process(tmp_path):
    """A real Worker's admin server on a unix socket, asked by ``Peers`` as worker 0 asks the others;
    a worker that is not there is left out."""
    from meshproxy import admin
    from meshproxy.admin.peers import PeerError, Peers, unary
    from meshproxy.worker import Worker

    async def run() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(_config("v7"), loop, index=1, workers=2)
        path = str(tmp_path / "worker-1.sock")
        server = await admin.start(worker, None, [], path)
        try:
            assert server.addresses == [path]
            peers = Peers([path, str(tmp_path / "worker-2.sock")], timeout=2.0)
            (clusters,) = await peers.clusters("a")
            assert [(c.name, c.worker) for c in clusters.clusters] == [("a", 1)]
            (levels,) = await peers.set_log_level("meshproxy.admin", "info")
            assert levels.levels["meshproxy.admin"] == "info"
            info = await unary(path, "GetServerInfo", admin_pb2.ServerInfoRequest(), admin_pb2.ServerInfo)
            assert (info.config_version, info.workers) == ("v7", 2)
            try:
                await unary(path, "GetClusters", admin_pb2.ClustersRequest(name="zz"), admin_pb2.ClustersResponse)
            except PeerError as e:
                assert "grpc-status 5" in str(e) and "'zz'" in str(e)
            else:
                raise AssertionError("no error for an unknown cluster")
        finally:
            await server.close()
            logging.getLogger("meshproxy.admin").setLevel(logging.NOTSET)

    asyncio.run(run())
