"""Both sources drive one translation: the same objects from a directory and from Kubernetes give the same configs.

Then ``meshproxy-control serve --kubernetes`` as a process against the fake API
server: a subscriber gets its config, and an edit made through the API is pushed.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from control.model import parse
from control.sources.files import DirectorySource
from control.sources.kube import KubeSource
from control.store import Store
from control.translate import Translator
from meshproxy import config
from tests import fakekube
from tests.control.cp import StreamClient, wait_for
from tests.fakekube import FakeKube, ResourceType
from tests.integration import harness

kubernetes = pytest.importorskip("kubernetes")

pytestmark = pytest.mark.timeout(60)

NETWORKING = [("virtualservices", "VirtualService"), ("destinationrules", "DestinationRule")]
NETWORKING += [("serviceentries", "ServiceEntry")]
SECURITY = [("peerauthentications", "PeerAuthentication"), ("authorizationpolicies", "AuthorizationPolicy")]
CUSTOM = [ResourceType("networking.istio.io", "v1", p, k, True) for p, k in NETWORKING]
CUSTOM += [ResourceType("security.istio.io", "v1", p, k, True) for p, k in SECURITY]
CUSTOM += [ResourceType("meshproxy.io", "v1alpha1", p, k, True) for p, k in NETWORKING + SECURITY]

MESH = textwrap.dedent("""
    apiVersion: v1
    kind: Service
    metadata: {name: reviews, namespace: shop}
    spec:
      selector: {app: reviews}
      ports: [{name: grpc, port: 9080, targetPort: 8080}]
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: reviews-abc
      namespace: shop
      labels: {kubernetes.io/service-name: reviews}
    addressType: IPv4
    ports: [{name: grpc, port: 8080, protocol: TCP}]
    endpoints:
    - addresses: [10.0.0.1]
      conditions: {ready: true}
      targetRef: {kind: Pod, name: reviews-v1-1, namespace: shop}
    - addresses: [10.0.0.2]
      conditions: {ready: true}
      targetRef: {kind: Pod, name: reviews-v2-1, namespace: shop}
    - addresses: [10.0.0.3]
      conditions: {ready: false}
      targetRef: {kind: Pod, name: reviews-v2-2, namespace: shop}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: reviews-v1-1, namespace: shop, labels: {app: reviews, version: v1}}
    spec: {containers: [{name: app, image: reviews}]}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: reviews-v2-1, namespace: shop, labels: {app: reviews, version: v2}}
    spec: {containers: [{name: app, image: reviews}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec:
      hosts: [reviews]
      http:
      - match: [{headers: {x-canary: {exact: "yes"}}}]
        route: [{destination: {host: reviews, subset: v2}}]
      - route:
        - {destination: {host: reviews, subset: v1}, weight: 80}
        - {destination: {host: reviews, subset: v2}, weight: 20}
        retries: {attempts: 2, retryOn: unavailable, retryBudget: {retryRatio: 0.1}}
    ---
    apiVersion: meshproxy.io/v1alpha1
    kind: ServiceEntry
    metadata: {name: billing, namespace: default}
    spec:
      hosts: [billing.example.com]
      resolution: DNS
      ports: [{number: 443, name: grpc, protocol: GRPC}]
      exportTo: ["."]
    ---
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: shop}
    spec: {mtls: {mode: STRICT}}
""")

OBJECTS = [d for d in yaml.safe_load_all(MESH) if d]


def rtype_of(kube: FakeKube, obj: dict) -> ResourceType:
    group, _, version = obj["apiVersion"].rpartition("/")
    for rt in kube._types.values():
        if rt.group == group and rt.version == version and rt.kind == obj["kind"]:
            return rt
    raise KeyError(obj["apiVersion"], obj["kind"])


def configs(store: Store) -> dict[str, dict]:
    translator = Translator(parse(store.snapshot()[1]))
    assert not [p for p in translator.problems if p.severity == "error"], translator.problems
    out = {}
    for ns in ("shop", "default", "elsewhere"):
        cfg = translator.config(ns, {"app": "client"})
        config.validate(cfg)
        out[ns] = config.to_dict(cfg)
    return out


@pytest.fixture
def kube():
    with FakeKube(CUSTOM, namespaces=("default", "shop", "meshproxy-system"), bookmark_interval=0.2) as fake:
        for obj in OBJECTS:
            fake.create(rtype_of(fake, obj), obj["metadata"].get("namespace"), copy.deepcopy(obj))
        yield fake


def test_a_directory_and_kubernetes_with_the_same_objects_give_the_same_configs(kube, tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    from_files = Store()

    async def load() -> None:
        source = DirectorySource(from_files, tmp_path)
        source.start()
        await source.stop()

    asyncio.run(load())

    from_kube = Store()
    api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=kube.host, connection_pool_maxsize=32))
    source = KubeSource(from_kube, api)
    source.start()
    try:
        assert source.synced.wait(10)
        expected = configs(from_files)
        # Not vacuous: the shop sidecar has the split, the canary header route, both ready endpoints.
        shop = expected["shop"]
        reviews = next(c for c in shop["clusters"] if c["name"] == "outbound|9080||reviews.shop.svc.cluster.local")
        assert sorted(e["address"] for e in reviews["endpoints"]) == ["10.0.0.1:8080", "10.0.0.2:8080"]
        assert [e["labels"]["version"] for e in reviews["endpoints"]] == ["v1", "v2"]
        assert "billing.example.com:443" not in str(expected["shop"]) and "billing.example.com:443" in str(
            expected["default"]
        )
        assert configs(from_kube) == expected
        # An edit through the API reaches the store (and so the configs) too.
        vs = kube.get(rtype_of(kube, OBJECTS[5]), "shop", "reviews")
        vs["spec"]["http"][1]["route"][0]["weight"] = 50
        vs["spec"]["http"][1]["route"][1]["weight"] = 50
        kube.update(rtype_of(kube, OBJECTS[5]), "shop", "reviews", vs)
        wait_for(lambda: "'weight': 50" in str(configs(from_kube)["shop"]), timeout=5)
    finally:
        source.stop()


def test_meshproxy_control_serve_kubernetes_pushes_api_edits(kube, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fakekube.kubeconfig(kube.host))
    port = harness.free_port()
    argv = [sys.executable, "-m", "control", "serve", "--kubernetes", "--kubeconfig", str(kubeconfig)]
    argv += ["--listen", f"127.0.0.1:{port}", "--log-level", "info"]
    process = harness.Process(argv, name="meshproxy-control", env={**os.environ, "POD_NAMESPACE": "meshproxy-system"})
    try:
        harness.wait_listening("127.0.0.1", port, 30, alive=process.alive)
        with StreamClient(f"127.0.0.1:{port}", namespace="shop") as client:
            first = client.wait_snapshots(1, timeout=10)
            assert "outbound|9080||reviews.shop.svc.cluster.local" in [c.name for c in first.config.clusters]
            rt = rtype_of(kube, OBJECTS[4])  # the DestinationRule: switch the balancer
            dr = kube.get(rt, "shop", "reviews")
            dr["spec"]["trafficPolicy"] = {"loadBalancer": {"simple": "RANDOM"}}
            kube.update(rt, "shop", "reviews", dr)
            second = client.wait_snapshots(2, timeout=10)
            cluster = next(c for c in second.config.clusters if c.name.endswith("reviews.shop.svc.cluster.local"))
            assert cluster.lb_policy == config.Cluster.RANDOM
        # The replica took the lease (work that must happen once runs under it).
        wait_for(lambda: "leads" in process.output(), timeout=10)
    finally:
        code = process.stop(15, 15)
        output = process.describe()
        process.remove_log()
    assert code == 0, output
