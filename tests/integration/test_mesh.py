"""The local mesh end to end: ``meshproxy-control serve --config-dir`` and a sidecar subscribed to it.

Real processes on loopback: the control plane (file source), a sidecar
(``meshproxy run --control-plane``), two gRPC backends answering with their
version, and a grpcio client calling through the sidecar by authority. The
seed's VirtualService splits 80/20; an edit makes it 50/50; the control plane
can die and come back without the sidecar missing a call.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.integration import harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
METHOD = "/demo.Reviews/Get"


class VersionServer:
    """A gRPC server whose one method answers its version (raw bytes: no proto needed)."""

    def __init__(self, version: str) -> None:
        self.version = version.encode()
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.method_handlers_generic_handler(
            "demo.Reviews", {"Get": grpc.unary_unary_rpc_method_handler(self._get)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _get(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        return self.version

    def stop(self) -> None:
        self.server.stop(0)


class ControlPlane:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or harness.free_port()
        self.process: harness.Process | None = None

    def start(self) -> ControlPlane:
        argv = [sys.executable, "-m", "control", "serve", "--config-dir", str(self.directory)]
        argv += ["--listen", self.address, "--log-level", "info"]
        self.process = harness.Process(argv, name="meshproxy-control")
        harness.wait_listening("127.0.0.1", self.port, 20, alive=self.process.alive)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None and self.process.alive():
            code = self.process.stop(signal.SIGTERM, 10)
            assert code == 0, self.process.describe()
        if self.process is not None:
            self.process.remove_log()


def service_entry(v1_port: int, v2_port: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc: {v1_port}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{grpc: {v2_port}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""


def virtual_service(host: str, v1: int, v2: int) -> str:
    # The seed's VirtualService, word for word but for the host and the weights.
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - {host}
  http:
  - route:
    - destination:
        host: {host}
        subset: v1
      weight: {v1}
    - destination:
        host: {host}
        subset: v2
      weight: {v2}
"""


def replace(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def call(channel: grpc.Channel, n: int) -> dict[str, int]:
    get = channel.unary_unary(METHOD)
    counts: dict[str, int] = {}
    for _ in range(n):
        version = get(b"", timeout=5).decode()
        counts[version] = counts.get(version, 0) + 1
    return counts


def assert_split(counts: dict[str, int], n: int, share_v1: float) -> None:
    """v1's count within 4 standard deviations of a binomial draw (the split itself is exact per worker)."""
    assert sum(counts.values()) == n, counts
    sigma = math.sqrt(n * share_v1 * (1 - share_v1))
    assert abs(counts.get("v1", 0) - n * share_v1) <= 4 * sigma, counts


@pytest.fixture
def backends():
    v1, v2 = VersionServer("v1"), VersionServer("v2")
    yield v1, v2
    v1.stop()
    v2.stop()


@pytest.fixture
def mesh(tmp_path: Path, backends) -> Path:
    v1, v2 = backends
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "reviews.yaml").write_text(service_entry(v1.port, v2.port))
    (d / "route.yaml").write_text(virtual_service("reviews.local", 80, 20))
    return d


def sidecar_for(control: ControlPlane, **kw) -> harness.Sidecar:
    args = ["--node-id", "client-1", "--namespace", "default", "--workload", "client", "--labels", "app=client"]
    return harness.Sidecar(control_plane=control.address, extra_args=args, **kw)


def channel_to(sidecar: harness.Sidecar, authority: str) -> grpc.Channel:
    return grpc.insecure_channel(sidecar.address, options=[("grpc.default_authority", authority)])


def test_seed_split_lands_80_20_and_an_edit_makes_it_50_50_within_a_second(mesh: Path, capsys) -> None:
    control = ControlPlane(mesh).start()
    try:
        with sidecar_for(control) as sidecar, channel_to(sidecar, "reviews.local:9080") as channel:
            assert_split(call(channel, 2000), 2000, 0.8)
            t_edit = time.monotonic()
            replace(mesh / "route.yaml", virtual_service("reviews.local", 50, 50))
            # How long until the split changed (for the record: smooth WRR makes every 10
            # consecutive calls exactly 8/2 before and 5/5 after).
            window: list[str] = []
            get = channel.unary_unary(METHOD)
            switched = None
            while time.monotonic() - t_edit < 5:
                window = ([*window, get(b"", timeout=5).decode()])[-10:]
                if len(window) == 10 and window.count("v2") == 5:
                    switched = time.monotonic() - t_edit
                    break
            assert switched is not None, "the split never became 50/50"
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t_edit)))
            # Every call made from 1 s after the edit on is on the new split.
            assert_split(call(channel, 1000), 1000, 0.5)
            with capsys.disabled():
                print(f"\n[mesh] 80/20 -> 50/50 took {switched * 1e3:.0f} ms from the file edit to the data path")
    finally:
        control.stop()


def test_the_sidecar_serves_through_a_control_plane_restart_and_resyncs(mesh: Path) -> None:
    control = ControlPlane(mesh).start()
    try:
        with sidecar_for(control) as sidecar, channel_to(sidecar, "reviews.local:9080") as channel:
            assert_split(call(channel, 200), 200, 0.8)
            control.kill()
            # No control plane: the last good config stays in force.
            assert call(channel, 100) == {"v1": 80, "v2": 20}
            replace(mesh / "route.yaml", virtual_service("reviews.local", 50, 50))
            time.sleep(0.5)
            assert call(channel, 100) == {"v1": 80, "v2": 20}
            control = ControlPlane(mesh, control.port).start()
            # The sidecar reconnects (jittered backoff, at most 5 s) and gets the edit made meanwhile.
            get = channel.unary_unary(METHOD)
            deadline = time.monotonic() + 15
            window: list[str] = []
            while time.monotonic() < deadline:
                window = ([*window, get(b"", timeout=5).decode()])[-10:]
                if len(window) == 10 and window.count("v2") == 5:
                    break
                time.sleep(0.01)
            else:
                pytest.fail(f"no 50/50 after the control plane came back\n{control.process.describe()}")
            assert_split(call(channel, 400), 400, 0.5)
    finally:
        control.stop()


def test_the_seed_yaml_unchanged_routes_a_kubernetes_service_80_20(tmp_path: Path, backends) -> None:
    """examples/seed/seed.yaml as it is (VirtualService ``reviews`` 80/20 and PeerAuthentication
    STRICT), beside the Kubernetes objects a cluster would have: the Service, its two
    EndpointSlices (one per version, as two Deployments on one loopback address need two
    ports), the Pods that label the endpoints, and a DestinationRule for the subsets."""
    v1, v2 = backends
    d = tmp_path / "mesh"
    d.mkdir()
    shutil.copy(ROOT / "examples" / "seed" / "seed.yaml", d / "seed.yaml")
    objects = [
        """apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: grpc, port: 9080, targetPort: 9080}]""",
        """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]""",
    ]
    for version, port in (("v1", v1.port), ("v2", v2.port)):
        objects.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: reviews-{version}, namespace: default, labels: {{app: reviews, version: {version}}}}}
spec: {{containers: [{{name: app, image: reviews}}]}}
status: {{podIP: 127.0.0.1}}""")
        objects.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-{version}
  namespace: default
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: grpc, port: {port}, protocol: TCP}}]
endpoints:
- addresses: [127.0.0.1]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: reviews-{version}, namespace: default}}""")
    (d / "cluster.yaml").write_text("\n---\n".join(objects))
    analyze = harness.Process([sys.executable, "-m", "control.meshctl", "analyze", "-f", str(d)], name="meshctl")
    assert analyze.popen.wait(30) == 0, analyze.output()
    assert "0 errors" in analyze.output()
    analyze.remove_log()
    control = ControlPlane(d).start()
    try:
        with sidecar_for(control) as sidecar:
            for authority in ("reviews:9080", "reviews.default.svc.cluster.local:9080", "reviews"):
                with channel_to(sidecar, authority) as channel:
                    assert_split(call(channel, 500), 500, 0.8)
    finally:
        control.stop()


class FailingServer(VersionServer):
    """A VersionServer that fails every call with UNAVAILABLE."""

    def _get(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")


def test_istio_retries_and_outlier_detection_act_through_the_control_plane(tmp_path: Path) -> None:
    """Resilience as an Istio user writes it: the VirtualService's ``retries`` and the
    DestinationRule's ``outlierDetection`` (``trafficPolicy``), pushed by the control plane.
    One of two endpoints fails every call: every client call still succeeds (retried on the
    other endpoint), and the failing one is ejected after exactly consecutive5xxErrors calls
    and gets nothing more while ejected (baseEjectionTime 30s outlasts the test)."""
    good, bad = VersionServer("v1"), FailingServer("v2")
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "reviews.yaml").write_text(
        service_entry(good.port, bad.port)
        + """  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""
    )
    (d / "route.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.local]
  http:
  - route:
    - destination: {host: reviews.local}
    retries: {attempts: 2, retryOn: unavailable, perTryTimeout: 2s}
"""
    )
    control = ControlPlane(d).start()
    try:
        with sidecar_for(control) as sidecar, channel_to(sidecar, "reviews.local:9080") as channel:
            assert call(channel, 100) == {"v1": 100}
            assert bad.calls == 3, "ejected after exactly three consecutive failures"
            assert good.calls == 100
    finally:
        control.stop()
        good.stop()
        bad.stop()
