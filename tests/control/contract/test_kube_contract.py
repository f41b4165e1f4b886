"""The Kubernetes source and leader election against a real cluster: the fake API server's claims, checked.

Runs only when KUBECONFIG is set. Everything happens in a temporary namespace, deleted at the end; the
credentials need create/delete on namespaces, services, endpointslices and leases, and list/watch on the
kinds KubeSource reads.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import pytest

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="KUBECONFIG is not set: the contract suite needs a real cluster"
    ),
    pytest.mark.timeout(180),
]

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from control.leader import LeaderElector  # noqa: E402
from control.sources.kube import KubeSource  # noqa: E402
from control.store import Store, key_of  # noqa: E402


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def new_api_client() -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = 32  # a watch connection per kind
    return client.ApiClient(cfg)


@pytest.fixture(scope="module")
def api():
    with new_api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def namespace(api):
    core = client.CoreV1Api(api)
    name = f"meshproxy-contract-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"meshproxy.io/contract-test": "true"}}})
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def in_store(store: Store, source: str, ns: str, name: str) -> dict | None:
    for obj, src in store.snapshot()[1]:
        if src == source and key_of(obj)[2:] == (ns, name):
            return obj
    return None


def test_source_sees_a_service_and_its_slice_come_and_go(api, namespace):
    store = Store()
    source = KubeSource(store, api, namespace=namespace)
    source.start()
    try:
        assert source.synced.wait(60)
        assert in_store(store, "kube/core/namespaces", "", namespace) is not None
        core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        # no selector: the EndpointSlice controller leaves the service alone, and the slice is ours
        core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
        slice_ = {
            "metadata": {
                "name": "web-1",
                "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "contract"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.255.0.1"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
        discovery.create_namespaced_endpoint_slice(namespace, slice_)

        wait_for(lambda: in_store(store, "kube/core/services", namespace, "web"), 30, "the service")
        wait_for(lambda: in_store(store, "kube/discovery.k8s.io/endpointslices", namespace, "web-1"), 30, "the slice")
        svc = in_store(store, "kube/core/services", namespace, "web")
        assert svc["apiVersion"] == "v1" and svc["kind"] == "Service" and "status" not in svc
        assert set(svc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
        assert svc["spec"]["ports"][0]["port"] == 80
        got = in_store(store, "kube/discovery.k8s.io/endpointslices", namespace, "web-1")
        assert got["apiVersion"] == "discovery.k8s.io/v1" and got["endpoints"][0]["addresses"] == ["10.255.0.1"]

        discovery.delete_namespaced_endpoint_slice("web-1", namespace)
        core.delete_namespaced_service("web", namespace)
        wait_for(lambda: not in_store(store, "kube/core/services", namespace, "web"), 30, "the service's deletion")
        wait_for(
            lambda: not in_store(store, "kube/discovery.k8s.io/endpointslices", namespace, "web-1"),
            30,
            "the slice's deletion",
        )
    finally:
        source.stop()


def test_two_electors_one_leader_and_hand_over(api, namespace):
    events: dict[str, list[str]] = {"a": [], "b": []}
    electors = {
        identity: LeaderElector(
            new_api_client(),
            namespace,
            "meshproxy-contract",
            identity,
            lease_duration=4.0,
            renew_deadline=3.0,
            retry_period=0.5,
            on_started_leading=lambda i=identity: events[i].append("started"),
            on_stopped_leading=lambda i=identity: events[i].append("stopped"),
        )
        for identity in ("a", "b")
    }
    for e in electors.values():
        e.start()
    try:
        wait_for(lambda: any(e.is_leader for e in electors.values()), 30, "a leader")
        time.sleep(5)  # beyond one lease duration: the leader renews, the other waits
        leaders = [i for i, e in electors.items() if e.is_leader]
        assert len(leaders) == 1
        leader, other = leaders[0], "b" if leaders[0] == "a" else "a"
        lease = client.CoordinationV1Api(api).read_namespaced_lease("meshproxy-contract", namespace)
        assert lease.spec.holder_identity == leader

        electors[leader].stop()  # releases: the other need not wait for expiry
        assert events[leader] == ["started", "stopped"]
        wait_for(lambda: electors[other].is_leader, 3.5, "the hand-over")
    finally:
        for e in electors.values():
            e.stop()
