"""Every meshctl command against a live local mesh: ``meshproxy-control serve --config-dir`` (a
process), a sidecar subscribed to it (``meshproxy run --control-plane ... --admin ...``), two grpcio
backends, and known traffic through the sidecar; the commands run as the installed ``meshctl``
script, their -o json output parsed and checked against what the mesh is and what was sent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml

from tests.integration import harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MESHCTL = Path(sys.executable).parent / "meshctl"
HOST = "reviews.local"
AUTHORITY = f"{HOST}:9080"
OK_CALLS, FAILED_CALLS = 30, 10

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{grpc: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.local]
  http:
  - name: split
    route:
    - destination: {{host: reviews.local, subset: v1}}
      weight: 50
    - destination: {{host: reviews.local, subset: v2}}
      weight: 50
"""

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews}}
    spec:
      containers: [{name: app, image: reviews:1}]
"""


class Backend:
    """demo.Reviews: Get answers the version, Fail answers NOT_FOUND (a gRPC failure, not retried)."""

    def __init__(self, version: str) -> None:
        self.version = version.encode()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.method_handlers_generic_handler(
            "demo.Reviews",
            {
                "Get": grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.version),
                "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @staticmethod
    def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such review")


class Mesh:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.backends = [Backend("v1"), Backend("v2")]
        (directory / "mesh.yaml").write_text(MESH.format(v1=self.backends[0].port, v2=self.backends[1].port))
        self.cp_port = harness.free_port()
        argv = [sys.executable, "-m", "control", "serve", "--config-dir", str(directory)]
        self.control = harness.Process([*argv, "--listen", self.control_plane], name="meshproxy-control")
        harness.wait_listening("127.0.0.1", self.cp_port, 20, alive=self.control.alive)
        node = ["--node-id", "client-1", "--namespace", "default", "--workload", "client", "--labels", "app=client"]
        self.sidecar = harness.Sidecar(control_plane=self.control_plane, extra_args=node).start()
        self.admin = f"127.0.0.1:{self.sidecar.admin_port}"
        harness.wait_listening("127.0.0.1", self.sidecar.admin_port, 20, alive=self.sidecar.process.alive)
        self.channel = grpc.insecure_channel(
            self.sidecar.address, options=[*harness.CLIENT_OPTIONS, ("grpc.default_authority", AUTHORITY)]
        )

    @property
    def control_plane(self) -> str:
        return f"127.0.0.1:{self.cp_port}"

    def call(self, ok: int, failed: int) -> None:
        get, fail = self.channel.unary_unary("/demo.Reviews/Get"), self.channel.unary_unary("/demo.Reviews/Fail")
        for _ in range(ok):
            get(b"", timeout=10)
        for _ in range(failed):
            with pytest.raises(grpc.RpcError) as e:
                fail(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

    def close(self) -> None:
        self.channel.close()
        try:
            self.sidecar.stop()
        finally:
            code = self.control.stop(signal.SIGTERM, 10)
            self.control.remove_log()
            for b in self.backends:
                b.server.stop(None)
        assert code == 0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        # The config is in force once the route answers.
        assert harness.poll_until(lambda: _answers(m), 20), m.sidecar.output()
        yield m
    except BaseException as e:
        e.add_note(f"sidecar output:\n{m.sidecar.output()}\ncontrol plane output:\n{m.control.output()}")
        raise
    finally:
        m.close()


def _answers(m: Mesh) -> bool:
    try:
        m.channel.unary_unary("/demo.Reviews/Get")(b"", timeout=2)
        return True
    except grpc.RpcError:
        return False


def meshctl(*argv: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MESHCTL), *argv], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok_json(*argv: str) -> dict:
    r = meshctl(*argv, "-o", "json")
    assert (r.returncode, r.stderr) == (0, ""), r
    return json.loads(r.stdout)


# -- proxy-status ------------------------------------------------------------------------------------


def test_proxy_status_shows_the_sidecar_synced_on_the_version_it_runs(mesh):
    data = ok_json("proxy-status", "--control-plane", mesh.control_plane)
    (row,) = data["proxies"]
    assert (row["node_id"], row["namespace"], row["workload"], row["worker"]) == ("client-1", "default", "client", 0)
    assert row["labels"] == {"app": "client"} and row["state"] == "SYNCED" and row["nacks"] == 0
    dump = ok_json("proxy-config", mesh.admin)
    assert row["acked_version"] == row["sent_version"] == dump["version"] != ""
    table = meshctl("proxy-status", "--control-plane", mesh.control_plane)
    assert table.returncode == 0 and table.stdout.splitlines()[1].split()[:4] == ["client-1", "default", "client", "0"]
    as_yaml = yaml.safe_load(meshctl("proxy-status", "--control-plane", mesh.control_plane, "-o", "yaml").stdout)
    assert as_yaml["proxies"][0]["acked_version"] == row["acked_version"]
    assert as_yaml["proxies"][0]["connected_since"] == row["connected_since"]


def test_a_sidecar_with_two_workers_shows_both(mesh):
    node = ["--node-id", "client-2", "--namespace", "default", "--workload", "client2", "--concurrency", "2"]
    with harness.Sidecar(control_plane=mesh.control_plane, extra_args=node) as second:
        admin = f"127.0.0.1:{second.admin_port}"
        harness.wait_listening("127.0.0.1", second.admin_port, 20, alive=second.process.alive)

        def both_synced() -> list[dict]:
            data = ok_json("proxy-status", "--control-plane", mesh.control_plane, "--node-id", "client-2")
            rows = data["proxies"]
            return rows if len(rows) == 2 and all(r["state"] == "SYNCED" for r in rows) else []

        assert harness.poll_until(both_synced, 20)
        rows = both_synced()
        assert [(r["node_id"], r["worker"]) for r in rows] == [("client-2", 0), ("client-2", 1)]
        assert rows[0]["acked_version"] == rows[1]["acked_version"] == ok_json("proxy-config", admin)["version"]
        everyone = ok_json("proxy-status", "--control-plane", mesh.control_plane)["proxies"]
        assert [(r["node_id"], r["worker"]) for r in everyone] == [("client-1", 0), ("client-2", 0), ("client-2", 1)]
        endpoints = [e for c in ok_json("proxy-config", admin, "endpoints")["clusters"] for e in c["endpoints"]]
        assert sorted({e["worker"] for e in endpoints}) == [0, 1]
        assert ok_json("stats", admin, "--prefix", "meshproxy_build_info")["workers"] == 2


# -- proxy-config ------------------------------------------------------------------------------------


def test_proxy_config_summary(mesh):
    dump = ok_json("proxy-config", mesh.admin)
    assert dump["source"].startswith("control-plane:") and mesh.control_plane in dump["source"]
    assert dump["node"]["id"] == "client-1" and dump["accepted_total"] >= 1 and dump["rejected_total"] == 0
    assert dump["last_rejected"] is None and dump["last_updated"]
    types = {(r["type"], r["name"]) for r in dump["resources"]}
    listeners = [lst["name"] for lst in dump["config"]["listeners"]]
    assert {("listener", n) for n in listeners} | {("route", n) for n in listeners} <= types
    assert {("cluster", c["name"]) for c in dump["config"]["clusters"]} <= types
    assert all(r["version"] for r in dump["resources"])
    table = meshctl("proxy-config", mesh.admin)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["VERSION", dump["version"]]
    assert "TYPE  " in table.stdout and f"control-plane:{mesh.control_plane}" in table.stdout


def _reviews_routes(routes: dict) -> list[dict]:
    return [
        r
        for t in routes["routes"]
        for vh in t["virtual_hosts"]
        if AUTHORITY in vh.get("domains", [])
        for r in vh["routes"]
    ]


def test_proxy_config_listeners_routes_clusters(mesh):
    listeners = ok_json("proxy-config", mesh.admin, "listeners")["listeners"]
    outbound = next(lst for lst in listeners if lst["name"] == "outbound")
    assert outbound["routes"] >= 1 and any(HOST in vh for vh in outbound["virtual_hosts"])

    routes = ok_json("proxy-config", mesh.admin, "routes")
    (route,) = _reviews_routes(routes)
    weights = sorted((c["subset"], c["weight"]) for c in route["route"]["clusters"])
    assert weights == [("v1", 50), ("v2", 50)]
    table = meshctl("proxy-config", mesh.admin, "routes").stdout
    line = next(ln for ln in table.splitlines() if AUTHORITY in ln)
    assert "|v1 50%" in line and "|v2 50%" in line

    clusters = ok_json("proxy-config", mesh.admin, "clusters")["clusters"]
    cluster = next(c for c in clusters if c["name"] == route["route"]["clusters"][0]["cluster"])
    ports = sorted(int(e["address"].rpartition(":")[2]) for e in cluster["endpoints"])
    assert ports == sorted(b.port for b in mesh.backends)
    assert sorted(s["name"] for s in cluster["subsets"]) == ["v1", "v2"] and cluster["resource_version"]
    only = ok_json("proxy-config", mesh.admin, "clusters", "--cluster", cluster["name"])["clusters"]
    assert [c["name"] for c in only] == [cluster["name"]]
    table = meshctl("proxy-config", mesh.admin, "clusters")
    assert table.returncode == 0
    (line,) = [ln.split() for ln in table.stdout.splitlines() if ln.startswith(cluster["name"] + " ")]
    assert line == [cluster["name"], "PEAK_EWMA", "2", "v1,v2", cluster["resource_version"]]


def test_proxy_config_endpoints_live_state(mesh):
    clusters = ok_json("proxy-config", mesh.admin, "endpoints")["clusters"]
    reviews = [c for c in clusters if HOST in c["name"]]
    assert reviews, clusters
    endpoints = [e for c in reviews for e in c["endpoints"]]
    assert sorted(int(e["address"].rpartition(":")[2]) for e in endpoints) == sorted(b.port for b in mesh.backends)
    assert all(e["health"] == "HEALTHY" and e["worker"] == 0 and e["active_requests"] == 0 for e in endpoints)
    assert sorted(s for e in endpoints for s in e["subsets"] if s) == ["v1", "v2"]
    name = reviews[0]["name"]
    only = ok_json("proxy-config", mesh.admin, "endpoints", "--cluster", name)["clusters"]
    assert {c["name"] for c in only} == {name}
    table = meshctl("proxy-config", mesh.admin, "endpoints", "-o", "table")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:4] == ["CLUSTER", "ENDPOINT", "WEIGHT", "HEALTH"]
    assert sum(" HEALTHY " in ln for ln in table.stdout.splitlines()) >= 2


# -- stats -----------------------------------------------------------------------------------------------


def _route_counts(mesh: Mesh) -> tuple[dict[str, float], dict]:
    """(requests by success, the duration histogram) of the reviews route, from meshctl stats."""
    data = ok_json("stats", mesh.admin, "--prefix", "meshproxy_route_")
    assert data["workers"] == 1
    assert {f["name"] for f in data["families"]} == {
        "meshproxy_route_requests_total",
        "meshproxy_route_request_duration_milliseconds",
    }
    requests = next(f for f in data["families"] if f["name"] == "meshproxy_route_requests_total")
    by_success = {"true": 0.0, "false": 0.0}
    for m in requests["metrics"]:
        if m["labels"]["virtual_host"] == AUTHORITY:
            by_success[m["labels"]["success"]] += m["value"]
    duration = next(f for f in data["families"] if f["name"] == "meshproxy_route_request_duration_milliseconds")
    assert duration["type"] == "HISTOGRAM"
    (h,) = [m for m in duration["metrics"] if m["labels"]["virtual_host"] == AUTHORITY]
    return by_success, h


def test_stats_route_counts_are_the_calls_made(mesh):
    before, _ = _route_counts(mesh)
    mesh.call(OK_CALLS, FAILED_CALLS)
    after, h = _route_counts(mesh)
    assert after["true"] - before["true"] == OK_CALLS
    assert after["false"] - before["false"] == FAILED_CALLS
    assert h["count"] == after["true"] + after["false"] and h["sum"] > 0
    assert [b["count"] for b in h["buckets"]] == sorted(b["count"] for b in h["buckets"])
    assert all(b["count"] <= h["count"] for b in h["buckets"])

    everything = ok_json("stats", mesh.admin)
    names = {f["name"] for f in everything["families"]}
    assert {"meshproxy_requests_total", "meshproxy_route_requests_total", "meshproxy_build_info"} <= names
    table = meshctl("stats", mesh.admin, "--prefix", "meshproxy_route_requests")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SERIES", "VALUE"]
    failed = [ln for ln in lines[1:] if 'success="false"' in ln and f'virtual_host="{AUTHORITY}"' in ln]
    assert len(failed) == 1 and failed[0].startswith("meshproxy_route_requests_total{")
    assert int(failed[0].split()[-1]) >= FAILED_CALLS
    as_yaml = yaml.safe_load(meshctl("stats", mesh.admin, "--prefix", "meshproxy_build_info", "-o", "yaml").stdout)
    (build,) = as_yaml["families"]
    assert build["type"] == "GAUGE" and build["metrics"][0]["value"] == 1


# -- top -------------------------------------------------------------------------------------------------


def test_top_reports_the_traffic_of_each_interval(mesh):
    """Calls go on in the background, one failure every 4 calls, one at a time: any window of n
    consecutive calls holds n // 4 or n // 4 + 1 failures (one more either way allowed: a call
    counted just before or after a poll may land in the neighbouring window)."""
    stop, made = threading.Event(), []
    get, fail = mesh.channel.unary_unary("/demo.Reviews/Get"), mesh.channel.unary_unary("/demo.Reviews/Fail")

    def traffic() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and len(made) < 100_000:
            try:
                (fail if len(made) % 4 == 3 else get)(b"", timeout=10)
            except grpc.RpcError:
                pass
            made.append(1)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        assert harness.poll_until(lambda: len(made) >= 8, 20)
        r = meshctl("top", mesh.admin, "--interval", "0.5", "--count", "3", "-o", "json")
    finally:
        stop.set()
        thread.join(15)
    assert (r.returncode, r.stderr) == (0, ""), r
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(reports) == 3
    total = 0
    for rep in reports:
        assert rep["sidecars"] == [mesh.admin] and rep["seconds"] > 0
        (row,) = [x for x in rep["routes"] if x["virtual_host"] == AUTHORITY]
        n = row["requests"]
        total += n
        assert n > 0 and row["rps"] == pytest.approx(n / rep["seconds"], rel=1e-6)
        failures = round(n * (1 - row["success_rate"]))
        assert n // 4 - 1 <= failures <= n // 4 + 2, row
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert total <= len(made)

    table = meshctl("top", mesh.admin, "--interval", "0.2", "--count", "1")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert "1 sidecar(s)" in lines[0] and lines[1].startswith("LISTENER")


# -- errors ------------------------------------------------------------------------------------------------


def test_wrong_and_unreachable_addresses_are_one_line_exit_1(mesh):
    backend = f"127.0.0.1:{mesh.backends[0].port}"  # gRPC, but no Admin service
    for argv in (["proxy-config", backend], ["stats", backend], ["top", backend, "--count", "1"]):
        r = meshctl(*argv)
        assert (r.returncode, r.stdout) == (1, ""), r
        assert (
            r.stderr.startswith(f"meshctl: error: the sidecar at {backend} does not serve ")
            and r.stderr.count("\n") == 1
        )
    closed = f"127.0.0.1:{harness.free_port()}"
    for argv in (
        ["proxy-status", "--control-plane", closed],
        ["proxy-config", closed, "routes"],
        ["stats", closed],
        ["top", closed, "--count", "1"],
    ):
        r = meshctl(*argv, "-o", "json")
        assert (r.returncode, r.stdout) == (1, ""), r
        assert r.stderr.startswith("meshctl: error: cannot reach the ") and r.stderr.count("\n") == 1
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["proxy-config"],
        ["proxy-config", "127.0.0.1:15000", "secrets"],
        ["proxy-config", "127.0.0.1:15000", "listeners", "--cluster", "x"],
        ["stats"],
        ["stats", "no-port"],
        ["top", "127.0.0.1:15000", "--interval", "-1"],
        ["proxy-status", "-o", "csv"],
        ["frobnicate"],
    ],
)
def test_bad_usage_exit_2_one_line(argv):
    r = meshctl(*argv)
    assert (r.returncode, r.stdout) == (2, ""), r
    assert r.stderr.startswith("meshctl") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["proxy-status", "proxy-config", "stats", "top", "analyze", "inject"])
def test_help_of_every_command(command):
    r = meshctl(command, "--help")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith(f"usage: meshctl {command} ")
    assert "Exit status: 0 done, 1 failed" in r.stdout
    if command != "inject":  # inject prints manifests; its -o is a file
        assert "-o {table,json,yaml}, --output {table,json,yaml}" in r.stdout


# -- analyze and inject, on the live mesh's own files ----------------------------------------------------


def test_analyze_the_live_mesh_directory(mesh):
    data = ok_json("analyze", "-f", str(mesh.directory))
    assert data == {"resources": 3, "errors": 0, "problems": []}
    r = meshctl("analyze", "-f", str(mesh.directory))
    assert (r.returncode, r.stdout) == (0, "3 resources, 0 errors, 0 warnings: OK\n")


def test_inject_points_the_sidecar_at_the_live_control_plane(mesh, tmp_path):
    r = meshctl("inject", "-f", "-", "--control-plane", mesh.control_plane, stdin=DEPLOYMENT)
    assert (r.returncode, r.stderr) == (0, ""), r
    (doc,) = list(yaml.safe_load_all(r.stdout))
    pod = doc["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    (sidecar,) = [c for c in containers if c["name"] == "meshproxy-proxy"]
    assert mesh.control_plane in json.dumps(sidecar)
    assert [c["name"] for c in pod["containers"] if c["name"] == "app"] == ["app"]
    out = tmp_path / "injected.yaml"
    assert meshctl("inject", "-f", "-", "-o", str(out), stdin=DEPLOYMENT).returncode == 0
    assert yaml.safe_load(out.read_text())["kind"] == "Deployment"
    assert os.path.getsize(out) > len(DEPLOYMENT)
