"""Server reflection (v1alpha through grpcio-reflection's own client, v1 through a raw stream) and
grpc.health.v1 on the admin address of a real sidecar."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from meshproxy.admin.grpc_reflection_v1 import reflection_pb2 as v1
from tests.admin.conftest import CALL_TIMEOUT

pytestmark = pytest.mark.timeout(60)

SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "meshproxy.admin.v1.Admin",
]


def test_reflection_client_lists_and_resolves_admin(admin_channel):
    db = ProtoReflectionDescriptorDatabase(admin_channel)
    assert sorted(db.get_services()) == SERVICES
    pool = DescriptorPool(db)
    admin = pool.FindServiceByName("meshproxy.admin.v1.Admin")
    assert sorted(admin.methods_by_name) == sorted(
        [
            "GetConfigDump",
            "GetClusters",
            "GetStats",
            "GetLogLevel",
            "SetLogLevel",
            "Drain",
            "Shutdown",
            "GetServerInfo",
        ]
    )
    get_clusters = admin.methods_by_name["GetClusters"]
    assert get_clusters.output_type.full_name == "meshproxy.admin.v1.ClustersResponse"
    status = pool.FindMessageTypeByName("meshproxy.admin.v1.ClusterStatus")
    # A field typed by an imported file (meshproxy/v1/config.proto), fetched as a dependency.
    assert status.fields_by_name["circuit_breakers"].message_type.full_name == "meshproxy.v1.CircuitBreakers"
    info = pool.FindMessageTypeByName("meshproxy.admin.v1.ServerInfo")
    assert info.fields_by_name["start_time"].message_type.full_name == "google.protobuf.Timestamp"
    health = pool.FindEnumTypeByName("meshproxy.admin.v1.EndpointStatus.Health")
    assert [v.name for v in health.values] == ["HEALTHY", "UNHEALTHY", "EJECTED"]
    # And the gRPC services themselves.
    assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Watch"].server_streaming
    with pytest.raises(KeyError):
        db.FindFileContainingSymbol("meshproxy.admin.v1.NoSuchThing")


def _v1_call(admin_channel, *requests):
    info = admin_channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=v1.ServerReflectionRequest.SerializeToString,
        response_deserializer=v1.ServerReflectionResponse.FromString,
    )
    return list(info(iter(requests), timeout=CALL_TIMEOUT))


def _names(response) -> list[str]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(b).name
        for b in response.file_descriptor_response.file_descriptor_proto
    ]


def test_reflection_v1_on_one_stream(admin_channel):
    listed, by_name, again, method, missing, extensions, bad_type = _v1_call(
        admin_channel,
        v1.ServerReflectionRequest(host="h", list_services=""),
        v1.ServerReflectionRequest(file_by_filename="meshproxy/admin/v1/admin.proto"),
        v1.ServerReflectionRequest(file_containing_symbol="meshproxy.admin.v1.Metric"),
        v1.ServerReflectionRequest(file_containing_symbol="meshproxy.admin.v1.Admin.GetStats"),
        v1.ServerReflectionRequest(file_by_filename="meshproxy/v1/control.proto"),
        v1.ServerReflectionRequest(all_extension_numbers_of_type="meshproxy.admin.v1.Metric"),
        v1.ServerReflectionRequest(all_extension_numbers_of_type="no.Such"),
    )
    assert listed.valid_host == "h"
    assert listed.original_request.list_services == ""
    assert sorted(s.name for s in listed.list_services_response.service) == SERVICES
    # The file first, then everything it imports, directly or not.
    assert _names(by_name) == [
        "meshproxy/admin/v1/admin.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
        "meshproxy/v1/config.proto",
    ]
    # Already sent on this stream: only the file asked for comes again.
    assert _names(again) == ["meshproxy/admin/v1/admin.proto"]
    assert _names(method) == ["meshproxy/admin/v1/admin.proto"]
    # The control plane's API is in the sidecar's pool but not served here.
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "meshproxy/v1/control.proto" in missing.error_response.error_message
    assert extensions.all_extension_numbers_response.base_type_name == "meshproxy.admin.v1.Metric"
    assert list(extensions.all_extension_numbers_response.extension_number) == []
    assert bad_type.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_health_check(admin_channel):
    health = health_pb2_grpc.HealthStub(admin_channel)
    for service in ("", "meshproxy.admin.v1.Admin"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="shop.Cart"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = health.List(health_pb2.HealthListRequest(), timeout=CALL_TIMEOUT)
    assert {k: v.status for k, v in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        "meshproxy.admin.v1.Admin": health_pb2.HealthCheckResponse.SERVING,
    }


def test_health_watch_of_unknown_service_stays_open(admin_channel):
    health = health_pb2_grpc.HealthStub(admin_channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="shop.Cart"), timeout=CALL_TIMEOUT)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    watch.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(watch)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    # The server took the cancel in its stride.
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status == 1
