"""The ProxyStatus RPC and ``meshctl proxy-status`` against a real control plane (its grpc.aio server
over a watched directory) with grpcio stream clients standing in for sidecars."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest
import yaml

from control.meshctl import main
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
"""

ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.local]
  http:
  - timeout: {timeout}s
    route:
    - destination: {{host: reviews.local}}
"""


def write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "vs.yaml").write_text(ROUTE.format(timeout=5))
    return tmp_path


@pytest.fixture
def cp(mesh: Path):
    with LocalControlPlane(mesh) as plane:
        yield plane


def meshctl(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def synced(cp: LocalControlPlane, n: int) -> list[dict]:
    return wait_for(lambda: (rows := cp.status()) and len(rows) == n and all(r["state"] == "SYNCED" for r in rows))


def test_the_rpc_lists_every_worker_with_its_versions_and_times(cp):
    t0 = time.time()
    with (
        StreamClient(cp.address, node_id="b", namespace="other", labels={"app": "b"}, worker=1) as b,
        StreamClient(cp.address, node_id="a", namespace="default") as a,
    ):
        snap_a, snap_b = a.wait_snapshots(1), b.wait_snapshots(1)
        synced(cp, 2)
        with grpc.insecure_channel(cp.address) as channel:
            resp = control_pb2_grpc.MeshControlStub(channel).ProxyStatus(control_pb2.ProxyStatusRequest(), timeout=5)
            only_b = control_pb2_grpc.MeshControlStub(channel).ProxyStatus(
                control_pb2.ProxyStatusRequest(namespace="other"), timeout=5
            )
    assert resp.revision == cp.control.revision
    assert [(p.namespace, p.node_id, p.worker) for p in resp.proxies] == [("default", "a", 0), ("other", "b", 1)]
    pa, pb = resp.proxies
    assert pa.state == control_pb2.ProxyStatus.SYNCED
    assert pa.sent_version == pa.acked_version == pa.target_version == snap_a.version_info
    assert pa.sent_nonce == snap_a.nonce and pa.nacks == 0 and pa.nacked_version == pa.nack_nonce == ""
    assert pb.labels == {"app": "b"} and pb.workload == "w" and pb.acked_version == snap_b.version_info
    assert pa.peer.startswith(("ipv4:127.0.0.1:", "ipv6:"))
    for t in (pa.connected_since, pa.sent_at, pa.acked_at):
        assert t0 - 1 <= t.ToNanoseconds() / 1e9 <= time.time() + 1
    assert [p.node_id for p in only_b.proxies] == ["b"]


def test_proxy_status_json_yaml_and_table(cp, capsys):
    with StreamClient(cp.address, node_id="client-1") as client:
        snap = client.wait_snapshots(1)
        synced(cp, 1)
        code, out, err = meshctl(capsys, "proxy-status", "--control-plane", cp.address, "-o", "json")
        assert (code, err) == (0, "")
        data = json.loads(out)
        assert data["control_plane"] == cp.address and data["revision"] == cp.control.revision
        (row,) = data["proxies"]
        assert row["node_id"] == "client-1" and row["namespace"] == "default" and row["workload"] == "w"
        assert row["state"] == "SYNCED" and row["acked_version"] == row["sent_version"] == snap.version_info
        assert row["worker"] == 0 and row["nacks"] == 0 and row["nacked_version"] == "" and row["labels"] == {}
        assert datetime.fromisoformat(row["connected_since"]) and datetime.fromisoformat(row["acked_at"])

        code, out, _ = meshctl(capsys, "proxy-status", "--control-plane", cp.address, "-o", "yaml")
        assert code == 0 and yaml.safe_load(out) == data | {"proxies": [row]}

        code, out, _ = meshctl(capsys, "proxy-status", "--control-plane", cp.address)
        assert code == 0
        header, line = out.splitlines()
        assert header.split() == [
            "NAME", "NAMESPACE", "WORKLOAD", "WORKER", "CONNECTED", "STATUS", "ACKED", "SENT", "NACKS", "LAST", "NACK"
        ]  # fmt: skip
        cells = line.split()
        assert cells[:4] == ["client-1", "default", "w", "0"] and cells[4].endswith("s")
        assert cells[5:] == ["SYNCED", snap.version_info, snap.version_info, "0", "-"]


def test_a_nack_shows_and_exits_1_until_a_version_is_acked(cp, mesh, capsys):
    with StreamClient(cp.address, node_id="n1", auto_ack=False) as client:
        first = client.wait_snapshots(1)
        client.ack(first)
        synced(cp, 1)
        write(mesh / "vs.yaml", ROUTE.format(timeout=7))
        second = client.wait_snapshots(2, timeout=5)
        client.nack(second, first.version_info, "listeners[0]: cannot bind\n(address in use)")
        wait_for(lambda: cp.status()[0]["state"] == "NACKED")
        code, out, err = meshctl(capsys, "proxy-status", "--control-plane", cp.address, "-o", "json")
        assert (code, err) == (1, "")
        (row,) = json.loads(out)["proxies"]
        assert row["state"] == "NACKED" and row["nacks"] == 1
        assert (row["acked_version"], row["sent_version"]) == (first.version_info, second.version_info)
        assert (row["nacked_version"], row["nack_nonce"]) == (second.version_info, second.nonce)
        assert row["nack_message"] == "listeners[0]: cannot bind\n(address in use)"

        code, out, _ = meshctl(capsys, "proxy-status", "--control-plane", cp.address)
        assert code == 1
        nack = f"{second.version_info}: listeners[0]: cannot bind (address in use)"
        cells = out.splitlines()[1].split(None, 9)
        assert cells[5:] == ["NACKED", first.version_info, second.version_info, "1", nack]

        write(mesh / "vs.yaml", ROUTE.format(timeout=9))
        client.ack(client.wait_snapshots(3, timeout=5))
        synced(cp, 1)
        assert meshctl(capsys, "proxy-status", "--control-plane", cp.address)[0] == 0


def test_filters_and_the_environment_default(cp, capsys, monkeypatch):
    with (
        StreamClient(cp.address, node_id="a", namespace="default"),
        StreamClient(cp.address, node_id="b", namespace="other"),
    ):
        synced(cp, 2)
        monkeypatch.setenv("MESHCTL_CONTROL_PLANE", cp.address)
        code, out, _ = meshctl(capsys, "proxy-status", "-n", "other", "-o", "json")
        assert code == 0 and [p["node_id"] for p in json.loads(out)["proxies"]] == ["b"]
        code, out, _ = meshctl(capsys, "proxy-status", "--node-id", "a", "-o", "json")
        assert code == 0 and [p["node_id"] for p in json.loads(out)["proxies"]] == ["a"]


def test_no_sidecars(cp, capsys):
    assert meshctl(capsys, "proxy-status", "--control-plane", cp.address) == (
        0,
        f"no sidecars are connected to the control plane at {cp.address}\n",
        "",
    )
    code, out, _ = meshctl(capsys, "proxy-status", "--control-plane", cp.address, "-o", "json")
    assert code == 0 and json.loads(out)["proxies"] == []


def test_unreachable_control_plane_is_one_line_exit_1(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code, out, err = meshctl(capsys, "proxy-status", "--control-plane", f"127.0.0.1:{port}", "-o", "json")
    assert code == 1 and out == ""
    assert err.startswith(f"meshctl: error: cannot reach the control plane at 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_a_server_that_is_not_a_control_plane(capsys):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code, out, err = meshctl(capsys, "proxy-status", "--control-plane", f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert (code, out) == (1, "")
    assert err == (
        f"meshctl: error: the control plane at 127.0.0.1:{port} does not serve "
        "/meshproxy.v1.MeshControl/ProxyStatus (is it the right address?)\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["proxy-status", "--control-plane", "localhost"], "argument --control-plane: 'localhost'"),
        (["proxy-status", "--timeout", "x"], "argument --timeout: 'x' is not a number of seconds"),
        (["proxy-status", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert message in err and err.startswith("meshctl") and err.count("\n") == 1
