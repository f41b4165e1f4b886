"""The fake API server driven by the official kubernetes client, asserting what that client sees from a real one."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pydantic
import pytest
import urllib3

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from tests.fakekube import ApiError, FakeKube, Request, ResourceType, parse_label_selector  # noqa: E402

pytestmark = pytest.mark.timeout(60)

VIRTUAL_SERVICE = ResourceType("networking.istio.io", "v1", "virtualservices", "VirtualService", True)
DESTINATION_RULE = ResourceType("networking.istio.io", "v1", "destinationrules", "DestinationRule", True)
REQUEST_TIMEOUT = 10  # seconds, for every client call


@pytest.fixture
def kube():
    with FakeKube([VIRTUAL_SERVICE, DESTINATION_RULE], history=100, bookmark_interval=0.2) as fake:
        yield fake


@pytest.fixture
def api_client(kube):
    cfg = client.Configuration(host=kube.host)
    with client.ApiClient(cfg) as api:
        yield api


@pytest.fixture
def core(api_client):
    return client.CoreV1Api(api_client)


def pod(name: str, labels: dict | None = None, ns: str = "default") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]},
    }


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


def test_create_get_list_patch_delete(core):
    created = core.create_namespaced_pod("default", pod("a", {"app": "web"}), _request_timeout=REQUEST_TIMEOUT)
    meta = created.metadata
    assert meta.uid and meta.creation_timestamp and meta.generation == 1
    assert int(meta.resource_version) > 0

    got = core.read_namespaced_pod("a", "default", _request_timeout=REQUEST_TIMEOUT)
    assert got.metadata.uid == meta.uid and got.spec.containers[0].image == "nginx:1.27"

    lst = core.list_namespaced_pod("default", _request_timeout=REQUEST_TIMEOUT)
    assert [p.metadata.name for p in lst.items] == ["a"]
    assert int(lst.metadata.resource_version) >= int(meta.resource_version)

    patched = core.patch_namespaced_pod(
        "a", "default", {"metadata": {"labels": {"tier": "front"}}}, _request_timeout=REQUEST_TIMEOUT
    )
    assert patched.metadata.labels == {"app": "web", "tier": "front"}
    assert int(patched.metadata.resource_version) > int(meta.resource_version)
    assert patched.metadata.generation == 1  # metadata-only change

    patched = core.patch_namespaced_pod(
        "a", "default", [{"op": "replace", "path": "/spec/containers/0/image", "value": "nginx:1.28"}]
    )
    assert patched.spec.containers[0].image == "nginx:1.28" and patched.metadata.generation == 2

    deleted = core.delete_namespaced_pod("a", "default", _request_timeout=REQUEST_TIMEOUT)
    assert deleted.metadata.name == "a"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("a", "default", _request_timeout=REQUEST_TIMEOUT)
    assert err.value.status == 404
    st = status_of(err.value)
    assert st["kind"] == "Status" and st["apiVersion"] == "v1" and st["status"] == "Failure"
    assert st["reason"] == "NotFound" and st["code"] == 404 and st["message"] == 'pods "a" not found'


def test_all_namespaces_services_secrets_slices_leases(core, api_client):
    core.create_namespace({"metadata": {"name": "shop"}}, _request_timeout=REQUEST_TIMEOUT)
    core.create_namespaced_pod("shop", pod("p1", ns="shop"))
    core.create_namespaced_pod("default", pod("p2"))
    names = [(p.metadata.namespace, p.metadata.name) for p in core.list_pod_for_all_namespaces().items]
    assert names == [("default", "p2"), ("shop", "p1")]

    svc = {"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    assert core.create_namespaced_service("shop", svc).spec.ports[0].port == 80
    assert core.create_namespaced_secret("shop", {"metadata": {"name": "s"}, "data": {"k": "dg=="}}).data == {
        "k": "dg=="
    }
    discovery = client.DiscoveryV1Api(api_client)
    slice_ = {
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
    discovery.create_namespaced_endpoint_slice("shop", slice_)
    slices = discovery.list_namespaced_endpoint_slice("shop", label_selector="kubernetes.io/service-name=web")
    assert slices.items[0].endpoints[0].addresses == ["10.0.0.1"]
    coordination = client.CoordinationV1Api(api_client)
    lease = coordination.create_namespaced_lease(
        "shop", {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}
    )
    assert lease.spec.holder_identity == "a"

    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("nowhere", pod("x", ns="nowhere"))
    assert err.value.status == 404 and 'namespaces "nowhere" not found' in status_of(err.value)["message"]


def test_label_and_field_selectors(core):
    core.create_namespaced_pod("default", pod("a", {"app": "web", "version": "v1"}))
    core.create_namespaced_pod("default", pod("b", {"app": "web", "version": "v2"}))
    core.create_namespaced_pod("default", pod("c", {"app": "db"}))

    def names(**kw):
        return [p.metadata.name for p in core.list_namespaced_pod("default", **kw).items]

    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app==web,version!=v1") == ["b"]
    assert names(label_selector="version!=v1") == ["b", "c"]  # != matches a missing key, as upstream
    assert names(label_selector="version in (v1, v2)") == ["a", "b"]
    assert names(label_selector="version notin (v1)") == ["b", "c"]
    assert names(label_selector="version") == ["a", "b"]
    assert names(label_selector="!version") == ["c"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c,metadata.namespace=default") == ["a", "b"]
    with pytest.raises(ApiException) as err:
        names(field_selector="spec.nodeName=x")
    assert err.value.status == 400


def test_parse_label_selector_units():
    sel = parse_label_selector("a in (x,y), !b, c!=z")
    assert sel({"a": "x"}) and not sel({"a": "q"}) and not sel({"a": "x", "b": "1"}) and not sel({"a": "y", "c": "z"})


def test_watch_streams_and_resumes(core):
    start_rv = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("a", {"app": "web"}))
    core.create_namespaced_pod("default", pod("b", {"app": "db"}))
    core.patch_namespaced_pod("a", "default", {"metadata": {"annotations": {"x": "1"}}})
    core.delete_namespaced_pod("a", "default")

    w = watch.Watch()
    seen = []
    for ev in w.stream(core.list_namespaced_pod, "default", resource_version=start_rv, timeout_seconds=5):
        seen.append((ev["type"], ev["object"].metadata.name, ev["object"].metadata.resource_version))
        if len(seen) == 4:
            w.stop()
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "a")]
    rvs = [int(rv) for _, _, rv in seen]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4

    # resume from the second event: only what came after it
    resumed = []
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_pod, "default", resource_version=seen[1][2], timeout_seconds=5):
        resumed.append((ev["type"], ev["object"].metadata.name))
        if len(resumed) == 2:
            w.stop()
    assert resumed == [("MODIFIED", "a"), ("DELETED", "a")]

    # with a selector: a only, and the stream ends by itself at timeoutSeconds
    selected = [
        (ev["type"], ev["object"].metadata.name)
        for ev in watch.Watch().stream(
            core.list_namespaced_pod, "default", resource_version=start_rv, label_selector="app=web", timeout_seconds=1
        )
    ]
    assert selected == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]


def test_watch_sees_live_changes_and_selector_transitions(core):
    core.create_namespaced_pod("default", pod("a", {"app": "web"}))
    rv = core.list_namespaced_pod("default").metadata.resource_version

    def writer():
        time.sleep(0.2)  # let the watch open first, so these arrive live rather than from history
        core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"app": "db"}}})  # leaves app=web
        core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"app": "web"}}})  # comes back

    t = threading.Thread(target=writer)
    t.start()
    events = []
    w = watch.Watch()
    stream = w.stream(
        core.list_namespaced_pod, "default", resource_version=rv, label_selector="app=web", timeout_seconds=5
    )
    for ev in stream:
        events.append((ev["type"], ev["object"].metadata.labels["app"]))
        if len(events) == 2:
            w.stop()
    t.join(timeout=5)
    # the object left the selector (DELETED carries its new state) and came back (ADDED), as the watch cache does
    assert events == [("DELETED", "db"), ("ADDED", "web")]


def test_watch_without_resource_version_lists_first(core):
    core.create_namespaced_pod("default", pod("a"))
    got = [
        (ev["type"], ev["object"].metadata.name)
        for ev in watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=1)
    ]
    assert got == [("ADDED", "a")]


def test_bookmarks(kube):
    rv = kube.resource_version
    query = f"watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"
    url = f"{kube.host}/api/v1/namespaces/default/pods?{query}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert lines and all(e["type"] == "BOOKMARK" for e in lines)
    assert lines[0]["object"]["metadata"]["resourceVersion"] == str(rv)


def test_watch_410_gone_after_compaction(kube, core):
    old_rv = core.list_namespaced_pod("default").metadata.resource_version
    for i in range(3):
        core.create_namespaced_pod("default", pod(f"p{i}"))
    kube.compact()

    # on the wire: HTTP 200, then one ERROR event whose object is an Expired Status
    url = f"{kube.host}/api/v1/namespaces/default/pods?watch=1&resourceVersion={old_rv}&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    st = events[0]["object"]
    assert (st["kind"], st["apiVersion"], st["status"], st["reason"], st["code"]) == (
        "Status",
        "v1",
        "Failure",
        "Expired",
        410,
    )
    assert st["message"].startswith(f"too old resource version: {old_rv} (")

    # the official client turns that ERROR event into ApiException(410); with timeout_seconds it does not retry
    with pytest.raises(ApiException) as err:
        list(watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=old_rv, timeout_seconds=2))
    assert err.value.status == 410 and err.value.reason.startswith("Expired: too old resource version")

    # without timeout_seconds it retries once from the same resourceVersion, gets 410 again, then raises
    with pytest.raises(ApiException) as err:
        next(iter(watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=old_rv)))
    assert err.value.status == 410

    # the current resourceVersion is still watchable
    rv = core.list_namespaced_pod("default").metadata.resource_version
    assert list(watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1)) == []


def test_history_window_expires_old_versions():
    with FakeKube(history=3) as small:
        cfg = client.Configuration(host=small.host)
        with client.ApiClient(cfg) as api:
            core = client.CoreV1Api(api)
            rv0 = core.list_namespaced_pod("default").metadata.resource_version
            for i in range(5):
                core.create_namespaced_pod("default", pod(f"p{i}"))
            with pytest.raises(ApiException) as err:
                list(watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv0, timeout_seconds=1))
            assert err.value.status == 410
            rv_recent = str(small.resource_version - 2)
            got = list(
                watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv_recent, timeout_seconds=1)
            )
            assert [e["object"].metadata.name for e in got] == ["p3", "p4"]


def test_conflicts(core):
    first = core.create_namespaced_pod("default", pod("a"))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("default", pod("a"))
    assert err.value.status == 409
    st = status_of(err.value)
    assert st["reason"] == "AlreadyExists" and st["message"] == 'pods "a" already exists'

    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "1"}}})
    stale = core.api_client.sanitize_for_serialization(first)
    stale["metadata"]["labels"] = {"y": "2"}
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_pod("a", "default", stale)
    assert err.value.status == 409
    st = status_of(err.value)
    assert st["reason"] == "Conflict" and "the object has been modified" in st["message"]

    fresh = core.api_client.sanitize_for_serialization(core.read_namespaced_pod("a", "default"))
    fresh["metadata"]["labels"] = {"y": "2"}
    assert core.replace_namespaced_pod("a", "default", fresh).metadata.labels == {"y": "2"}

    with pytest.raises(ApiException) as err:  # a patch carrying a stale resourceVersion is a precondition too
        core.patch_namespaced_pod("a", "default", {"metadata": {"resourceVersion": first.metadata.resource_version}})
    assert err.value.status == 409


def post_raw(api_client, path: str, body: dict):
    """POST through the official client's ApiClient without its model checks, raising ApiException on failure."""
    method, url, headers, body, _ = api_client.param_serialize(
        "POST", path, header_params={"Content-Type": "application/json", "Accept": "application/json"}, body=body
    )
    resp = api_client.call_api(method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT)
    resp.read()
    return api_client.response_deserialize(resp, {"201": "V1Pod"}).data


def test_invalid_pod_is_422(core, api_client):
    # client 37's typed API checks bodies with pydantic, so schema-invalid objects must go in raw
    unknown_field = pod("c")
    unknown_field["spec"]["bogus"] = True
    with pytest.raises(pydantic.ValidationError):
        core.create_namespaced_pod("default", unknown_field)

    with pytest.raises(ApiException) as err:  # strict: unknown fields are rejected
        post_raw(api_client, "/api/v1/namespaces/default/pods", unknown_field)
    assert err.value.status == 422
    st = status_of(err.value)
    assert (st["kind"], st["status"], st["reason"], st["code"]) == ("Status", "Failure", "Invalid", 422)
    assert "'bogus' was unexpected" in st["message"] and st["message"].startswith('Pod "c" is invalid: spec:')

    wrong_type = pod("a")
    wrong_type["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    with pytest.raises(ApiException) as err:
        post_raw(api_client, "/api/v1/namespaces/default/pods", wrong_type)
    assert err.value.status == 422 and "'http' is not of type 'integer'" in status_of(err.value)["message"]

    no_containers = pod("b")
    del no_containers["spec"]["containers"]
    with pytest.raises(ApiException) as err:
        post_raw(api_client, "/api/v1/namespaces/default/pods", no_containers)
    assert err.value.status == 422 and "'containers' is a required property" in status_of(err.value)["message"]

    bad_name = pod("Not_A_Name")
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("default", bad_name)
    assert err.value.status == 422

    assert core.list_namespaced_pod("default").items == []
    assert post_raw(api_client, "/api/v1/namespaces/default/pods", pod("ok")).metadata.name == "ok"


def test_custom_resources(kube, api_client):
    custom = client.CustomObjectsApi(api_client)
    group, version = "networking.istio.io", "v1"
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "labels": {"team": "a"}},
        "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]},
    }
    created = custom.create_namespaced_custom_object(group, version, "default", "virtualservices", vs)
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    custom.create_namespaced_custom_object(
        group,
        version,
        "default",
        "destinationrules",
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "reviews"},
            "spec": {},
        },
    )
    got = custom.get_namespaced_custom_object(group, version, "default", "virtualservices", "reviews")
    assert got["spec"]["hosts"] == ["reviews"]
    lst = custom.list_namespaced_custom_object(group, version, "default", "virtualservices", label_selector="team=a")
    assert lst["kind"] == "VirtualServiceList" and [i["metadata"]["name"] for i in lst["items"]] == ["reviews"]
    assert lst["items"][0]["kind"] == "VirtualService"
    everywhere = custom.list_cluster_custom_object(group, version, "destinationrules")
    assert [i["metadata"]["name"] for i in everywhere["items"]] == ["reviews"]

    patched = custom.patch_namespaced_custom_object(
        group, version, "default", "virtualservices", "reviews", {"spec": {"hosts": ["reviews", "reviews.default"]}}
    )
    assert patched["spec"]["hosts"] == ["reviews", "reviews.default"] and patched["metadata"]["generation"] == 2

    events = []
    w = watch.Watch()
    for ev in w.stream(
        custom.list_namespaced_custom_object,
        group,
        version,
        "default",
        "virtualservices",
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=5,
    ):
        events.append((ev["type"], ev["object"]["metadata"]["name"]))
        w.stop()
    assert events == [("MODIFIED", "reviews")]

    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(group, version, "default", "virtualservices", vs)
    assert err.value.status == 409
    custom.delete_namespaced_custom_object(group, version, "default", "virtualservices", "reviews")
    with pytest.raises(ApiException) as err:
        custom.get_namespaced_custom_object(group, version, "default", "virtualservices", "reviews")
    assert err.value.status == 404
    assert status_of(err.value)["message"] == 'virtualservices.networking.istio.io "reviews" not found'

    with pytest.raises(ApiException) as err:  # an unregistered resource is a plain 404
        custom.list_namespaced_custom_object(group, version, "default", "gateways")
    assert err.value.status == 404


def test_token_review(kube, api_client):
    kube.add_token(
        "good-token", "system:serviceaccount:shop:web", groups=("system:serviceaccounts",), audiences=("mesh",)
    )
    auth = client.AuthenticationV1Api(api_client)
    ok = auth.create_token_review({"spec": {"token": "good-token", "audiences": ["mesh"]}})
    assert ok.status.authenticated is True
    assert ok.status.user.username == "system:serviceaccount:shop:web"
    assert ok.status.user.groups == ["system:serviceaccounts"] and ok.status.audiences == ["mesh"]

    bad = auth.create_token_review({"spec": {"token": "nope"}})
    assert not bad.status.authenticated and bad.status.error

    wrong_audience = auth.create_token_review({"spec": {"token": "good-token", "audiences": ["other"]}})
    assert not wrong_audience.status.authenticated


def test_watch_all_namespaces_and_direct_api(kube, core):
    core.create_namespace({"metadata": {"name": "shop"}})
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    kube.create(kube.type_of("", "v1", "pods"), "shop", pod("x", ns="shop"))  # tests may seed without HTTP
    core.create_namespaced_pod("default", pod("y"))
    got = [
        (ev["object"].metadata.namespace, ev["object"].metadata.name)
        for ev in watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    ]
    assert got == [("shop", "x"), ("default", "y")]


def test_custom_resource_update_rules(api_client):
    custom = client.CustomObjectsApi(api_client)
    args = ("networking.istio.io", "v1", "default", "destinationrules")
    body = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "r"}, "spec": {}}
    created = custom.create_namespaced_custom_object(*args, body)
    with pytest.raises(ApiException) as err:  # custom resources insist on a resourceVersion for PUT
        custom.replace_namespaced_custom_object(*args, "r", body)
    assert err.value.status == 422
    updated = custom.replace_namespaced_custom_object(*args, "r", created | {"spec": {"host": "reviews"}})
    assert updated["spec"] == {"host": "reviews"} and updated["metadata"]["uid"] == created["metadata"]["uid"]
    with pytest.raises(ApiException) as err:  # strategic merge is for built-ins only
        custom.patch_namespaced_custom_object(
            *args, "r", {"spec": {}}, _content_type="application/strategic-merge-patch+json"
        )
    assert err.value.status == 415


def test_chosen_port_request_log_faults_and_stop():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FakeKube(port=port) as fake:
        assert fake.host == f"http://127.0.0.1:{port}"
        core = client.CoreV1Api(client.ApiClient(client.Configuration(host=fake.host)))

        def flaky(req: Request) -> ApiError | None:
            return ApiError(503, "ServiceUnavailable", "injected") if req.query.get("watch") else None

        fake.fault = flaky
        with pytest.raises(ApiException) as err:
            next(iter(watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=1)))
        assert err.value.status == 503
        assert core.list_namespaced_pod("default", _request_timeout=REQUEST_TIMEOUT).items == []
        fake.fault = None
        assert [(r.method, r.path, r.is_watch) for r in fake.requests] == [
            ("GET", "/api/v1/namespaces/default/pods", True),
            ("GET", "/api/v1/namespaces/default/pods", False),
        ]
        assert fake.requests[0].headers["User-Agent"].startswith("OpenAPI-Generator")

        # stop() also resets kept-alive connections: the client's pooled one must not go on being served
        fake.stop()
        with pytest.raises(urllib3.exceptions.HTTPError):
            core.list_namespaced_pod("default", _request_timeout=REQUEST_TIMEOUT)
