"""The streaming config API end to end: a real grpc.aio server over a watched directory, grpcio clients."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import grpc
import pytest

from control.translate import version_of
from meshproxy import config
from meshproxy.config.v1 import control_pb2, control_pb2_grpc
from tests.control.cp import LocalControlPlane, StreamClient, wait_for

pytestmark = pytest.mark.timeout(60)

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: grpc, protocol: GRPC}]
  endpoints:
  - {address: 127.0.0.1, ports: {grpc: 50051}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {grpc: 50052}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def virtual_service(v1: int, v2: int, namespace: str = "default", export_to: str = "") -> str:
    export = f"\n  exportTo: [{export_to}]" if export_to else ""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: {namespace}}}
spec:
  hosts: [reviews.local]{export}
  http:
  - route:
    - destination: {{host: reviews.local, subset: v1}}
      weight: {v1}
    - destination: {{host: reviews.local, subset: v2}}
      weight: {v2}
"""


def weights(snapshot: control_pb2.StreamResponse) -> list[tuple[str, int]]:
    vh = next(v for v in snapshot.config.listeners[0].virtual_hosts if v.name == "reviews.local:9080")
    return [(c.subset, c.weight) for c in vh.routes[0].route.clusters]


def write(path: Path, text: str) -> None:
    """Write as editors do: a temporary file renamed over the old one."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "vs.yaml").write_text(virtual_service(80, 20))
    return tmp_path


@pytest.fixture
def cp(mesh: Path):
    with LocalControlPlane(mesh) as plane:
        yield plane


def test_first_snapshot_is_the_sidecars_config_and_its_ack_is_recorded(cp):
    with StreamClient(cp.address) as client:
        snap = client.wait_snapshots(1)
        assert snap.nonce
        assert not snap.config.HasField("node")
        assert snap.config.version == snap.version_info == version_of(_unversioned(snap.config))
        config.validate(snap.config)
        assert weights(snap) == [("v1", 80), ("v2", 20)]
        status = wait_for(lambda: [s for s in cp.status() if s["state"] == "SYNCED"])
        assert status[0]["id"] == "n1" and status[0]["acked"] == snap.version_info


def _unversioned(cfg):
    copy = type(cfg)()
    copy.CopyFrom(cfg)
    copy.version = ""
    return copy


def test_an_edit_is_pushed_once_with_a_new_version_and_an_unchanged_rewrite_is_not(cp, mesh):
    with StreamClient(cp.address) as client:
        first = client.wait_snapshots(1)
        write(mesh / "vs.yaml", virtual_service(50, 50))
        second = client.wait_snapshots(2, timeout=3)
        assert weights(second) == [("v1", 50), ("v2", 50)]
        assert second.version_info != first.version_info and second.nonce != first.nonce
        # The same content again (and a touch): the store does not change, nothing is pushed.
        recomputes = cp.control.recomputes
        write(mesh / "vs.yaml", virtual_service(50, 50))
        os.utime(mesh / "vs.yaml")
        time.sleep(0.5)
        assert len(client.snapshots) == 2
        assert cp.control.recomputes == recomputes


def test_a_nack_is_recorded_and_the_refused_version_is_not_sent_again(cp, mesh, caplog):
    caplog.set_level(logging.WARNING, logger="meshproxy.control")
    with StreamClient(cp.address, auto_ack=False) as client:
        first = client.wait_snapshots(1)
        client.ack(first)
        write(mesh / "vs.yaml", virtual_service(50, 50))
        second = client.wait_snapshots(2, timeout=3)
        client.nack(second, first.version_info, "listeners[0]: cannot bind")
        row = wait_for(lambda: [s for s in cp.status() if s["state"] == "NACKED"])[0]
        assert row["nacked"] == second.version_info
        assert row["acked"] == first.version_info
        assert row["nack_message"] == "listeners[0]: cannot bind"
        assert cp.control.nacks == 1
        assert any("refused version" in r.getMessage() and "cannot bind" in r.getMessage() for r in caplog.records)
        time.sleep(0.4)
        assert len(client.snapshots) == 2
        # A new version is sent, and its ACK clears the NACKED state.
        write(mesh / "vs.yaml", virtual_service(70, 30))
        third = client.wait_snapshots(3, timeout=3)
        client.ack(third)
        wait_for(lambda: [s for s in cp.status() if s["state"] == "SYNCED" and s["acked"] == third.version_info])


def test_an_ack_for_a_superseded_nonce_is_ignored(cp, mesh):
    with StreamClient(cp.address, auto_ack=False) as client:
        first = client.wait_snapshots(1)
        write(mesh / "vs.yaml", virtual_service(50, 50))
        client.wait_snapshots(2, timeout=3)
        client.ack(first)  # answers the first snapshot, which the second replaced
        time.sleep(0.3)
        assert cp.status()[0]["acked"] == ""
        assert cp.control.acks == 0


def test_only_sidecars_whose_config_changed_are_pushed(cp, mesh):
    with (
        StreamClient(cp.address, node_id="a", namespace="default") as a,
        StreamClient(cp.address, node_id="b", namespace="other") as b,
    ):
        a.wait_snapshots(1)
        b.wait_snapshots(1)
        # A VirtualService in "other", visible only there, overrides the split for "other" alone.
        (mesh / "other.yaml").write_text(virtual_service(10, 90, namespace="other", export_to="'.'"))
        snap = b.wait_snapshots(2, timeout=3)
        assert weights(snap) == [("v1", 10), ("v2", 90)]
        time.sleep(0.3)
        assert len(a.snapshots) == 1


def test_a_broken_virtual_service_is_rejected_and_everything_else_keeps_working(cp, mesh, caplog):
    caplog.set_level(logging.ERROR, logger="meshproxy.control")
    with StreamClient(cp.address) as client:
        first = client.wait_snapshots(1)
        # Broken: a misspelt field. The good edit next to it still lands.
        broken = virtual_service(50, 50).replace("weight: 50", "wieght: 50", 1).replace("name: reviews", "name: typo")
        write(mesh / "vs.yaml", virtual_service(60, 40))
        write(mesh / "broken.yaml", broken)
        second = client.wait_snapshots(2, timeout=3)
        assert weights(second) == [("v1", 60), ("v2", 40)]
        wait_for(lambda: cp.control.rejected_resources == 1)
        assert any(
            "VirtualService default/typo" in r.getMessage() and "wieght: unknown field" in r.getMessage()
            for r in caplog.records
        )
        assert second.version_info != first.version_info


def test_a_yaml_syntax_error_keeps_the_files_last_good_content(cp, mesh):
    with StreamClient(cp.address) as client:
        client.wait_snapshots(1)
        write(mesh / "vs.yaml", "spec: [unclosed\n")
        wait_for(lambda: "vs.yaml" in cp.source.errors, timeout=3)
        time.sleep(0.3)
        assert len(client.snapshots) == 1
        assert weights(client.snapshots[0]) == [("v1", 80), ("v2", 20)]


def test_changes_are_debounced_and_a_steady_stream_of_them_cannot_starve_pushes(mesh):
    # Windows far wider than the gaps between edits, so a slow machine cannot split a burst.
    with LocalControlPlane(mesh, debounce=1.0, max_delay=1.5) as cp:
        base = cp.control.recomputes
        # Five edits 20 ms apart, inside one quiet period: one recompute.
        for i in range(5):
            write(mesh / "vs.yaml", virtual_service(80 - i, 20 + i))
            time.sleep(0.02)
        wait_for(lambda: cp.control.recomputes == base + 1, timeout=5)
        time.sleep(1.2)
        assert cp.control.recomputes == base + 1
        # Edits every 100 ms for 4 s never leave 1 s of quiet: max_delay (1.5 s) still pushes.
        base = cp.control.recomputes
        for i in range(40):
            write(mesh / "vs.yaml", virtual_service(70 - i, 30 + i))
            time.sleep(0.1)
        assert cp.control.recomputes >= base + 2


def test_a_reconnecting_sidecar_gets_its_config_again_with_the_same_version(cp):
    with StreamClient(cp.address) as client:
        first = client.wait_snapshots(1)
    with StreamClient(cp.address, version=first.version_info) as again:
        snap = again.wait_snapshots(1)
        assert snap.version_info == first.version_info


def test_a_first_message_without_a_node_is_refused(cp):
    channel = grpc.insecure_channel(cp.address)
    stub = control_pb2_grpc.MeshControlStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Stream(iter([control_pb2.StreamRequest()]), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in err.value.details()
    channel.close()


def test_sign_certificate_is_declared_but_not_served_yet(cp):
    channel = grpc.insecure_channel(cp.address)
    stub = control_pb2_grpc.MeshControlStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.SignCertificate(control_pb2.SignCertificateRequest(csr="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_sidecars_of_one_scope_share_one_serialized_config(cp):
    clients = [StreamClient(cp.address, node_id=f"n{i}", labels={"app": "x", "pod": str(i)}) for i in range(5)]
    try:
        snaps = [c.wait_snapshots(1) for c in clients]
        assert len({s.version_info for s in snaps}) == 1
        assert len({s.nonce for s in snaps}) == 5
        assert len(cp.control._payloads) == 1
    finally:
        for c in clients:
            c.close()
