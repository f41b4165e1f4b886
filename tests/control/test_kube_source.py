"""control.sources.kube against the fake API server: initial sync, events, trimming, resume, 410, outages, scoping."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

from control.sources.kube import KINDS, Backoff, KubeSource  # noqa: E402
from control.store import Store, key_of  # noqa: E402
from tests.fakekube import ApiError, FakeKube, Request, ResourceType  # noqa: E402

pytestmark = pytest.mark.timeout(30)

NETWORKING = (
    ("virtualservices", "VirtualService"),
    ("destinationrules", "DestinationRule"),
    ("serviceentries", "ServiceEntry"),
)
SECURITY = (("peerauthentications", "PeerAuthentication"), ("authorizationpolicies", "AuthorizationPolicy"))


def custom_types(group: str, version: str, kinds) -> list[ResourceType]:
    return [ResourceType(group, version, plural, kind, True) for plural, kind in kinds]


ISTIO = custom_types("networking.istio.io", "v1", NETWORKING) + custom_types("security.istio.io", "v1", SECURITY)
MESHPROXY = custom_types("meshproxy.io", "v1alpha1", NETWORKING + SECURITY)
EVERY_SOURCE = {kind.source for kind in KINDS}
MERGE = "application/merge-patch+json"


@pytest.fixture
def kube():
    with FakeKube([*ISTIO, *MESHPROXY], bookmark_interval=0.2, namespaces=("default", "shop")) as fake:
        yield fake


def api_client_for(host: str) -> client.ApiClient:
    # one pooled connection per watch (there are len(KINDS)), so none is discarded on its way back to the pool
    return client.ApiClient(client.Configuration(host=host, connection_pool_maxsize=32))


@pytest.fixture
def start_source(kube):
    """Start a KubeSource on a fresh Store; every one is stopped (and must stop promptly) at teardown."""
    started: list[KubeSource] = []

    def start(host: str | None = None, **kw) -> KubeSource:
        src = KubeSource(Store(), api_client_for(host or kube.host), **kw)
        src.start()
        started.append(src)
        return src

    yield start
    for src in started:
        src.stop()  # cuts the open watches: every thread ends within stop()'s join timeout
        assert not any(t.is_alive() for t in src._threads)


def wait_for(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def objects(store: Store) -> dict[tuple[str, str, str], dict]:
    """(source, namespace, name) -> object."""
    return {(src, key_of(o)[2], key_of(o)[3]): o for o, src in store.snapshot()[1]}


def names(store: Store, source: str) -> set[tuple[str, str]]:
    return {(ns, name) for (src, ns, name) in objects(store) if src == source}


def rtype(kube: FakeKube, group: str, version: str, plural: str) -> ResourceType:
    return kube.type_of(group, version, plural)


def pod(name: str, ns: str = "default", labels: dict | None = None, ip: str = "10.0.0.1") -> dict:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx:1.27"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": []},
    }


def service(name: str) -> dict:
    return {"metadata": {"name": name}, "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}}


def endpoint_slice(name: str, service_name: str, ip: str = "10.0.0.1") -> dict:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def seed_every_kind(kube: FakeKube, ns: str = "default") -> None:
    kube.create(rtype(kube, "", "v1", "services"), ns, service("web"))
    kube.create(rtype(kube, "", "v1", "pods"), ns, pod("web-1", ns))
    kube.create(rtype(kube, "discovery.k8s.io", "v1", "endpointslices"), ns, endpoint_slice("web-abc", "web"))
    for rt in (*ISTIO, *MESHPROXY):
        kube.create(rt, ns, {"metadata": {"name": "web"}, "spec": {"hosts": ["web"]}, "status": {"x": 1}})


def list_requests(kube: FakeKube, path_suffix: str) -> list[Request]:
    return [r for r in kube.requests if r.method == "GET" and not r.is_watch and r.path.endswith(path_suffix)]


def watch_requests(kube: FakeKube, path_suffix: str) -> list[Request]:
    return [r for r in kube.requests if r.is_watch and r.path.endswith(path_suffix)]


# ---- sync and events --------------------------------------------------------------------------------------


def test_initial_sync_of_every_kind(kube, start_source):
    seed_every_kind(kube)
    src = start_source()
    assert src.synced.wait(5)
    got = objects(src.store)
    assert {s for (s, _, _) in got} == EVERY_SOURCE
    assert got[("kube/core/namespaces", "", "shop")] == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop"},
    }
    assert got[("kube/core/services", "default", "web")]["kind"] == "Service"
    assert got[("kube/discovery.k8s.io/endpointslices", "default", "web-abc")]["apiVersion"] == "discovery.k8s.io/v1"
    for rt in (*ISTIO, *MESHPROXY):
        obj = got[(f"kube/{rt.group}/{rt.plural}", "default", "web")]
        assert (obj["apiVersion"], obj["kind"], obj["spec"]) == (rt.api_version, rt.kind, {"hosts": ["web"]})
    # each watch starts from the resourceVersion its list returned, so nothing between the two is missed
    wait_for(lambda: watch_requests(kube, "/pods"), what="the pods watch")
    first = watch_requests(kube, "/pods")[0]
    assert first.query["resourceVersion"] == str(kube.resource_version)
    assert first.query["allowWatchBookmarks"] == "true" and first.query["timeoutSeconds"] == "300"


def test_add_modify_delete_through_the_api(kube, start_source):
    src = start_source()
    assert src.synced.wait(5)
    api = api_client_for(kube.host)
    core, discovery, custom = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.CustomObjectsApi(api)

    core.create_namespaced_service("shop", service("cart"))
    wait_for(lambda: ("shop", "cart") in names(src.store, "kube/core/services"), what="service added")
    core.patch_namespaced_service("cart", "shop", {"spec": {"ports": [{"port": 8080}]}})
    wait_for(
        lambda: objects(src.store)[("kube/core/services", "shop", "cart")]["spec"]["ports"] == [{"port": 8080}],
        what="service modified",
    )

    discovery.create_namespaced_endpoint_slice("shop", endpoint_slice("cart-1", "cart", "10.1.0.1"))
    wait_for(lambda: names(src.store, "kube/discovery.k8s.io/endpointslices") == {("shop", "cart-1")})

    group, version = "meshproxy.io", "v1alpha1"
    body = {
        "apiVersion": "meshproxy.io/v1alpha1",
        "kind": "DestinationRule",
        "metadata": {"name": "cart"},
        "spec": {"host": "cart"},
    }
    custom.create_namespaced_custom_object(group, version, "shop", "destinationrules", body)
    source = "kube/meshproxy.io/destinationrules"
    wait_for(lambda: names(src.store, source) == {("shop", "cart")}, what="custom resource added")
    custom.patch_namespaced_custom_object(group, version, "shop", "destinationrules", "cart", {"spec": {"host": "x"}})
    wait_for(lambda: objects(src.store)[(source, "shop", "cart")]["spec"] == {"host": "x"}, what="cr modified")

    core.delete_namespaced_service("cart", "shop")
    custom.delete_namespaced_custom_object(group, version, "shop", "destinationrules", "cart")
    discovery.delete_namespaced_endpoint_slice("cart-1", "shop")
    wait_for(lambda: not names(src.store, "kube/core/services"), what="service deleted")
    wait_for(lambda: not names(src.store, source), what="custom resource deleted")
    wait_for(lambda: not names(src.store, "kube/discovery.k8s.io/endpointslices"), what="slice deleted")


def test_objects_are_trimmed_and_status_churn_is_not_a_change(kube, start_source):
    pods = rtype(kube, "", "v1", "pods")
    noisy = pod("a")
    noisy["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "x"}
    kube.create(pods, "default", noisy)
    kube.create(rtype(kube, "", "v1", "services"), "default", service("web") | {"status": {"loadBalancer": {}}})
    kube.create(rtype(kube, "discovery.k8s.io", "v1", "endpointslices"), "default", endpoint_slice("web-1", "web"))
    vs = ISTIO[0]
    kube.create(vs, "default", {"metadata": {"name": "r"}, "spec": {"hosts": ["r"]}, "status": {"conditions": []}})
    src = start_source()
    assert src.synced.wait(5)
    got = objects(src.store)
    assert got[("kube/core/pods", "default", "a")] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "default", "labels": {"app": "web"}, "annotations": {"team": "x"}},
        "spec": {"serviceAccountName": "web"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
    }
    assert got[("kube/core/services", "default", "web")] == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    }
    assert set(got[("kube/discovery.k8s.io/endpointslices", "default", "web-1")]) == {
        "apiVersion",
        "kind",
        "metadata",
        "addressType",
        "endpoints",
        "ports",
    }
    assert "status" not in got[("kube/networking.istio.io/virtualservices", "default", "r")]

    # a status-only change (and the resourceVersion bump it brings) is not a change to the store; the
    # label change that follows it on the same watch shows the watch got past it
    revision = src.store.revision
    kube.patch(pods, "default", "a", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, MERGE)
    kube.patch(pods, "default", "a", {"metadata": {"labels": {"app": "web", "v": "2"}}}, MERGE)
    wait_for(lambda: objects(src.store)[("kube/core/pods", "default", "a")]["metadata"]["labels"].get("v") == "2")
    assert src.store.revision == revision + 1
    kube.patch(pods, "default", "a", {"status": {"podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}]}}, MERGE)
    wait_for(lambda: objects(src.store)[("kube/core/pods", "default", "a")]["status"]["podIP"] == "10.0.0.9")


# ---- resume, relist, outages ------------------------------------------------------------------------------


def test_watch_timeout_resumes_without_relisting(kube, start_source):
    src = start_source(watch_timeout=1)
    assert src.synced.wait(5)
    lists = len(list_requests(kube, "/pods"))
    wait_for(lambda: len(watch_requests(kube, "/pods")) >= 3, timeout=5, what="two watch timeouts")
    kube.create(rtype(kube, "", "v1", "pods"), "default", pod("late"))
    wait_for(lambda: ("default", "late") in names(src.store, "kube/core/pods"), what="event after resuming")
    assert len(list_requests(kube, "/pods")) == lists
    rvs = [int(r.query["resourceVersion"]) for r in watch_requests(kube, "/pods")]
    assert all(rv > 0 for rv in rvs) and rvs == sorted(rvs)


def test_410_after_compaction_relists_and_catches_up_on_deletions(kube, start_source):
    pods = rtype(kube, "", "v1", "pods")
    for name in ("a", "b"):
        kube.create(pods, "default", pod(name))
    src = start_source(watch_timeout=1, backoff_cap=0.3)
    assert src.synced.wait(5)
    assert names(src.store, "kube/core/pods") == {("default", "a"), ("default", "b")}

    # cut the pods watch off: the open one ends at its timeout, and reconnecting fails until the fault clears
    refused = threading.Event()

    def no_pod_watches(req: Request) -> ApiError | None:
        if req.is_watch and req.path.endswith("/pods"):
            refused.set()
            return ApiError(503, "ServiceUnavailable", "down for the test")
        return None

    kube.fault = no_pod_watches
    assert refused.wait(5)
    lists = len(list_requests(kube, "/pods"))
    kube.delete(pods, "default", "a")
    kube.create(pods, "default", pod("c"))
    kube.compact()  # the resourceVersion the watch would resume from is gone: the next watch gets 410
    kube.fault = None

    wait_for(lambda: names(src.store, "kube/core/pods") == {("default", "b"), ("default", "c")}, what="relisted state")
    assert len(list_requests(kube, "/pods")) == lists + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_server_then_available(start_source):
    port = free_port()
    src = start_source(host=f"http://127.0.0.1:{port}", backoff_cap=0.5)
    assert not src.synced.wait(0.8)
    with FakeKube([*ISTIO, *MESHPROXY], port=port) as late:
        late.create(late.type_of("", "v1", "services"), "default", service("web"))
        assert src.synced.wait(10)  # retries come at most backoff_cap (0.5 s) apart
        assert names(src.store, "kube/core/services") == {("default", "web")}
        src.stop()


def test_errors_back_off_then_recover(kube, start_source, caplog):
    def broken(req: Request) -> ApiError:
        return ApiError(500, "InternalError", "etcd is unhappy")

    kube.fault = broken
    src = start_source()
    time.sleep(1.0)
    kube.fault = None
    attempts = len(list_requests(kube, "/services"))
    # without backoff this would be hundreds; full jitter from 0.2 s doubling gives about four in a second
    assert 1 <= attempts <= 10
    assert src.synced.wait(8)
    warnings = [r for r in caplog.records if r.name == "meshproxy.control.kube" and r.levelno >= logging.WARNING]
    assert sum("kube/core/services" in r.getMessage() for r in warnings) == 1  # the first failure of a streak


def test_backoff_is_full_jitter_exponential_capped_and_resets(monkeypatch):
    b = Backoff(0.2, 1.0)
    assert all(0 <= b.next() <= ceiling for ceiling in (0.2, 0.4, 0.8, 1.0, 1.0, 1.0))
    monkeypatch.setattr("control.sources.kube.random.uniform", lambda low, high: high)  # the ceilings themselves
    b.reset()
    assert [round(b.next(), 6) for _ in range(6)] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert b.failures == 6
    b.reset()
    assert b.failures == 0 and b.next() == 0.2


# ---- optional kinds and scope -----------------------------------------------------------------------------


def test_missing_istio_versions_fall_back_or_are_skipped():
    old_istio = [
        ResourceType("networking.istio.io", "v1alpha3", "virtualservices", "VirtualService", True),
        ResourceType("networking.istio.io", "v1beta1", "destinationrules", "DestinationRule", True),
    ]
    with FakeKube([*old_istio, *MESHPROXY], bookmark_interval=0.2) as kube:
        for rt in (*old_istio, *MESHPROXY):
            kube.create(rt, "default", {"metadata": {"name": "web"}, "spec": {"hosts": ["web"]}})
        src = KubeSource(Store(), api_client_for(kube.host), recheck_interval=0.2)
        src.start()
        try:
            assert src.synced.wait(5)
            got = objects(src.store)
            vs = got[("kube/networking.istio.io/virtualservices", "default", "web")]
            assert vs["apiVersion"] == "networking.istio.io/v1alpha3"
            dr = got[("kube/networking.istio.io/destinationrules", "default", "web")]
            assert dr["apiVersion"] == "networking.istio.io/v1beta1"
            tried = [r.path.split("/")[3] for r in list_requests(kube, "/virtualservices") if "istio" in r.path]
            assert tried[:3] == ["v1", "v1beta1", "v1alpha3"]
            sources = src.store.sources()
            assert not any(s.startswith("kube/security.istio.io/") for s in sources)
            assert "kube/networking.istio.io/serviceentries" not in sources
            assert {f"kube/meshproxy.io/{rt.plural}" for rt in MESHPROXY} <= set(sources)

            # Istio's security CRDs installed later are picked up by the periodic look
            late = ResourceType("security.istio.io", "v1beta1", "peerauthentications", "PeerAuthentication", True)
            kube.register(late)
            kube.create(late, "default", {"metadata": {"name": "strict"}, "spec": {"mtls": {"mode": "STRICT"}}})
            wait_for(
                lambda: names(src.store, "kube/security.istio.io/peerauthentications") == {("default", "strict")},
                what="a CRD installed after start",
            )
            # and watched from then on
            kube.create(late, "default", {"metadata": {"name": "second"}, "spec": {}})
            wait_for(lambda: len(names(src.store, "kube/security.istio.io/peerauthentications")) == 2)
        finally:
            src.stop()


def test_namespace_bound_source_sees_only_its_namespace(kube, start_source):
    seed_every_kind(kube, "default")
    seed_every_kind(kube, "shop")
    src = start_source(namespace="shop")
    assert src.synced.wait(5)
    got = objects(src.store)
    assert {(s, ns) for (s, ns, _) in got} == {(s, "shop") for s in EVERY_SOURCE - {"kube/core/namespaces"}} | {
        ("kube/core/namespaces", "")
    }
    assert names(src.store, "kube/core/namespaces") == {("", "shop")}
    kube.create(rtype(kube, "", "v1", "pods"), "default", pod("elsewhere"))
    kube.create(rtype(kube, "", "v1", "pods"), "shop", pod("here", "shop"))
    wait_for(lambda: ("shop", "here") in names(src.store, "kube/core/pods"))
    assert ("default", "elsewhere") not in names(src.store, "kube/core/pods")
    assert all("/namespaces/shop/" in r.path or r.path.endswith("/namespaces") for r in kube.requests)


def test_forbidden_namespaces_are_skipped(kube, start_source):
    def rbac(req: Request) -> ApiError | None:
        if req.path == "/api/v1/namespaces":
            return ApiError(403, "Forbidden", 'namespaces is forbidden: User "mesh" cannot list resource')
        return None

    kube.fault = rbac
    kube.create(rtype(kube, "", "v1", "services"), "default", service("web"))
    src = start_source()
    assert src.synced.wait(5)
    assert "kube/core/namespaces" not in src.store.sources()
    assert names(src.store, "kube/core/services") == {("default", "web")}
