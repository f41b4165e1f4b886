"""The webhook over real HTTPS: AdmissionReview v1 for several pod shapes, the patch equal to the offline mutation,
malformed reviews answered (never a crash), keep-alive, limits, and the probe rewrite following PeerAuthentication."""

from __future__ import annotations

import asyncio
import base64
import copy
import http.client
import json
import socket
import ssl
import threading

import pytest

from control.model import parse
from control.store import Store
from injector.certs import WebhookCerts, server_context, service_dns_names
from injector.mutate import PROBES_ENV, PROXY_CONTAINER, Settings, inject_pod
from injector.webhook import Injector, WebhookServer, mtls_mode, store_peer_authentications
from tests.fakekube.server import json_patch as apply_patch
from tests.injector.validation import validate

pytestmark = pytest.mark.timeout(60)

HOSTNAME = "meshproxy-control.meshproxy-system.svc"


def peer_authentications(*specs: tuple[str, str, dict]) -> list:
    """(namespace, name, spec) -> control.model.PeerAuthentication objects, parsed as the control plane does."""
    objs = [
        (
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            },
            "test",
        )
        for ns, name, spec in specs
    ]
    model = parse(objs)
    assert len(model.peer_authentications) == len(specs), model.problems
    return model.peer_authentications


class Webhook:
    """The server on its own event loop thread, and a client that trusts its CA."""

    def __init__(self) -> None:
        self.certs = WebhookCerts.generate(service_dns_names())
        self.policies: list = []
        self.injector = Injector(Settings(), peer_authentications=lambda: self.policies)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = WebhookServer(self.injector, server_context(self.certs), "127.0.0.1", 0, max_body=64 * 1024)
        self.run(self.server.start())
        self.client_context = ssl.create_default_context(cadata=self.certs.ca_pem.decode())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def connection(self, hostname: str = HOSTNAME) -> http.client.HTTPSConnection:
        context, port = self.client_context, self.server.port

        class Connection(http.client.HTTPSConnection):
            def connect(self) -> None:
                # the API server dials the Service's name: verify the certificate for it, on loopback
                self.sock = context.wrap_socket(
                    socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=hostname
                )

        return Connection("127.0.0.1", port, timeout=10)

    def post(self, body: bytes, *, path: str = "/inject", conn=None) -> tuple[int, bytes, dict]:
        conn = conn or self.connection()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())

    def review(self, review: dict, conn=None) -> dict:
        status, body, headers = self.post(json.dumps(review).encode(), conn=conn)
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        return answer["response"]


@pytest.fixture(scope="module")
def webhook():
    w = Webhook()
    yield w
    w.close()


@pytest.fixture(autouse=True)
def no_policies(webhook):
    webhook.policies = []


def admission_review(pod: dict, *, uid: str = "b2c1e9a4-0000-4000-8000-000000000001", namespace: str = "shop") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def app(name: str = "app", **extra) -> dict:
    return {"name": name, "image": "example/app:1", "ports": [{"name": "http", "containerPort": 8080}], **extra}


def replicaset_pod(*containers: dict, annotations: dict | None = None, **spec) -> dict:
    """A pod as the ReplicaSet controller sends it: generateName, no name, no namespace, an owner."""
    meta = {
        "generateName": "reviews-v1-5d8f7c9b6-",
        "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d8f7c9b6"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "reviews-v1-5d8f7c9b6",
                "uid": "6f0b1c2d-0000-4000-8000-000000000002",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": list(containers) or [app()], "serviceAccountName": "reviews", **spec},
    }


PROBED = app(
    livenessProbe={"httpGet": {"path": "/healthz", "port": "http"}},
    readinessProbe={"httpGet": {"path": "/ready", "port": 8080}},
)

SHAPES = {
    "plain": replicaset_pod(),
    "probes": replicaset_pod(PROBED),
    "init-containers": replicaset_pod(initContainers=[{"name": "migrate", "image": "example/migrate:1"}]),
    "two-containers-classic": replicaset_pod(
        app(), app("metrics", ports=[]), annotations={"sidecar.meshproxy.io/nativeSidecar": "false"}
    ),
    "annotated": replicaset_pod(
        annotations={
            "traffic.meshproxy.io/excludeOutboundPorts": "5432",
            "traffic.meshproxy.io/includeOutboundIPRanges": "10.0.0.0/8",
            "sidecar.meshproxy.io/proxyMemoryLimit": "512Mi",
        }
    ),
    "job": {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "nightly-28901234-",
            "labels": {"job-name": "nightly-28901234"},
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-28901234", "uid": "u", "controller": True}
            ],
        },
        "spec": {"containers": [app("batch")], "restartPolicy": "Never"},
    },
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pods_are_patched_exactly_as_offline(webhook, shape):
    pod = SHAPES[shape]
    response = webhook.review(admission_review(pod, uid=f"uid-{shape}"))
    assert response["uid"] == f"uid-{shape}"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"], validate=True))
    patched = apply_patch(pod, patch)
    assert patched == inject_pod(copy.deepcopy(pod), Settings())[0]
    validate(patched)
    containers = patched["spec"].get("initContainers", []) + patched["spec"]["containers"]
    assert sum(c["name"] == PROXY_CONTAINER for c in containers) == 1


def test_the_job_pod_is_named_after_its_cronjob(webhook):
    response = webhook.review(admission_review(SHAPES["job"]))
    patched = apply_patch(SHAPES["job"], json.loads(base64.b64decode(response["patch"])))
    args = next(c for c in patched["spec"]["initContainers"] if c["name"] == PROXY_CONTAINER)["args"]
    assert args[args.index("--workload") + 1] == "nightly"


@pytest.mark.parametrize(
    "pod",
    [
        replicaset_pod() | {"metadata": replicaset_pod()["metadata"] | {"labels": {"meshproxy.io/inject": "false"}}},
        inject_pod(replicaset_pod(), Settings())[0],
        replicaset_pod(hostNetwork=True),
    ],
    ids=["opted-out", "already-injected", "host-network"],
)
def test_pods_left_alone_are_allowed_without_a_patch(webhook, pod):
    response = webhook.review(admission_review(pod))
    assert response == {"uid": "b2c1e9a4-0000-4000-8000-000000000001", "allowed": True}


def test_other_resources_and_operations_are_allowed_untouched(webhook):
    review = admission_review(replicaset_pod())
    review["request"]["operation"] = "UPDATE"
    assert webhook.review(review) == {"uid": review["request"]["uid"], "allowed": True}
    review = admission_review({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}})
    review["request"]["kind"] = {"group": "", "version": "v1", "kind": "Service"}
    assert webhook.review(review) == {"uid": review["request"]["uid"], "allowed": True}


def malformed() -> dict:
    good = admission_review(replicaset_pod(), uid="u-1")
    no_request = {k: v for k, v in good.items() if k != "request"}
    no_uid = copy.deepcopy(good)
    del no_uid["request"]["uid"]
    no_object = copy.deepcopy(good)
    no_object["request"]["object"] = None
    list_object = copy.deepcopy(good)
    list_object["request"]["object"] = [1, 2]
    beta = copy.deepcopy(good) | {"apiVersion": "admission.k8s.io/v1beta1"}
    wrong_kind = copy.deepcopy(good) | {"kind": "TokenReview"}
    bad_spec = copy.deepcopy(good)
    bad_spec["request"]["object"]["spec"] = {"containers": "app"}
    return {
        "a-list": ([good], "", "expected an AdmissionReview object, got a list"),
        "null": (None, "", "expected an AdmissionReview object, got null"),
        "v1beta1": (beta, "u-1", "expected kind AdmissionReview of admission.k8s.io/v1, got AdmissionReview"),
        "wrong-kind": (wrong_kind, "u-1", "expected kind AdmissionReview of admission.k8s.io/v1, got TokenReview"),
        "no-request": (no_request, "", "the AdmissionReview has no request"),
        "no-uid": (no_uid, "", "the AdmissionReview's request has no uid"),
        "no-object": (no_object, "u-1", "has no pod in request.object"),
        "list-object": (list_object, "u-1", "has no pod in request.object"),
        "bad-spec": (bad_spec, "u-1", "spec.containers: expected a non-empty list of containers"),
    }


@pytest.mark.parametrize("case", malformed(), ids=str)
def test_malformed_reviews_get_a_clear_error(webhook, case):
    review, uid, message = malformed()[case]
    response = webhook.review(review)
    assert response["uid"] == uid
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["status"] == "Failure"
    assert response["status"]["code"] in (400, 422)
    assert message in response["status"]["message"]


def test_a_bad_annotation_refuses_the_pod_naming_it(webhook):
    pod = replicaset_pod(annotations={"traffic.meshproxy.io/excludeInboundPorts": "http"})
    response = webhook.review(admission_review(pod))
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert response["status"]["message"] == (
        "meshproxy sidecar injection: Pod reviews-v1-5d8f7c9b6-: annotation "
        "traffic.meshproxy.io/excludeInboundPorts: 'http' is not a port number (1-65535)"
    )


def test_a_body_that_is_not_json_is_a_400_with_one_line(webhook):
    status, body, _ = webhook.post(b"{not json")
    assert status == 400
    text = body.decode()
    assert text.startswith("the body is not JSON: ") and text.count("\n") == 1


def test_the_server_keeps_serving_after_errors_on_one_connection(webhook):
    conn = webhook.connection()
    try:
        assert webhook.post(b"\xff\xfe", conn=conn)[0] == 400
        assert webhook.review({"kind": "nonsense"}, conn=conn)["allowed"] is False
        first = conn.sock
        response = webhook.review(admission_review(replicaset_pod()), conn=conn)
        assert response["allowed"] is True and "patch" in response
        assert conn.sock is first  # keep-alive: the API server reuses its connections
    finally:
        conn.close()


def test_paths_methods_and_sizes(webhook):
    assert webhook.post(b"{}", path="/other")[0] == 404
    conn = webhook.connection()
    conn.request("GET", "/inject")
    assert conn.getresponse().status == 405
    conn.close()
    status, _, _ = webhook.post(b"[" + b"1," * 40000 + b"1]")
    assert status == 413


def test_header_fields_are_limited(webhook):
    conn = webhook.connection()
    conn.putrequest("POST", "/inject")
    conn.putheader("X-Big", "a" * 20000)
    conn.putheader("Content-Length", "2")
    conn.endheaders(b"{}")
    assert conn.getresponse().status in (400, 431)
    conn.close()


def test_the_certificate_is_for_the_service_name_only(webhook):
    for name in service_dns_names():
        conn = webhook.connection(name)
        conn.connect()
        conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        webhook.connection("evil.example").connect()
    stranger = ssl.create_default_context()  # the system's roots: the self-signed CA is not among them
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        stranger.wrap_socket(socket.create_connection(("127.0.0.1", webhook.server.port)), server_hostname=HOSTNAME),
    ):
        pass


# ---- the probe rewrite follows the pod's mTLS mode ---------------------------------------------------------


def rewritten(response: dict) -> bool:
    patched = apply_patch(SHAPES["probes"], json.loads(base64.b64decode(response["patch"])))
    validate(patched)
    proxy = next(c for c in patched["spec"]["initContainers"] if c["name"] == PROXY_CONTAINER)
    app_probe = patched["spec"]["containers"][0]["livenessProbe"]["httpGet"]
    has_env = any(e["name"] == PROBES_ENV for e in proxy["env"])
    assert has_env == (app_probe["port"] == 15021)
    return has_env


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        ([], False),
        ([("shop", "default", {"mtls": {"mode": "STRICT"}})], True),
        ([("shop", "default", {"mtls": {"mode": "PERMISSIVE"}})], False),
        ([("meshproxy-system", "default", {"mtls": {"mode": "STRICT"}})], True),
        ([("other", "default", {"mtls": {"mode": "STRICT"}})], False),
        (
            [
                ("meshproxy-system", "default", {"mtls": {"mode": "STRICT"}}),
                ("shop", "default", {"mtls": {"mode": "PERMISSIVE"}}),
            ],
            False,
        ),
        (
            [
                ("shop", "default", {"mtls": {"mode": "STRICT"}}),
                ("shop", "reviews", {"selector": {"matchLabels": {"app": "reviews"}}, "mtls": {"mode": "DISABLE"}}),
            ],
            False,
        ),
        ([("shop", "ratings", {"selector": {"matchLabels": {"app": "ratings"}}, "mtls": {"mode": "STRICT"}})], False),
        (
            [
                ("shop", "default", {"mtls": {"mode": "STRICT"}}),
                ("shop", "reviews", {"selector": {"matchLabels": {"app": "reviews"}}, "mtls": {"mode": "UNSET"}}),
            ],
            True,
        ),
        (
            [
                (
                    "shop",
                    "reviews",
                    {
                        "selector": {"matchLabels": {"app": "reviews"}},
                        "mtls": {"mode": "PERMISSIVE"},
                        "portLevelMtls": {"8080": {"mode": "STRICT"}},
                    },
                )
            ],
            True,
        ),
    ],
    ids=[
        "none",
        "namespace-strict",
        "namespace-permissive",
        "mesh-strict",
        "other-namespace",
        "namespace-overrides-mesh",
        "workload-overrides-namespace",
        "workload-not-selected",
        "workload-unset-inherits",
        "port-level-strict",
    ],
)
def test_probes_rewritten_when_strict(webhook, policies, expected):
    webhook.policies = peer_authentications(*policies)
    assert rewritten(webhook.review(admission_review(SHAPES["probes"]))) is expected


def test_mtls_mode_from_a_store():
    store = Store()
    current = store_peer_authentications(store)
    assert mtls_mode(current(), "shop", {}, "meshproxy-system") == "PERMISSIVE"
    store.upsert(
        "files",
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "shop"},
            "spec": {"mtls": {"mode": "STRICT"}},
        },
    )
    store.upsert("files", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "shop"}})
    assert mtls_mode(current(), "shop", {}, "meshproxy-system") == "STRICT"
    assert mtls_mode(current(), "other", {}, "meshproxy-system") == "PERMISSIVE"


def test_an_injector_without_policies_never_rewrites():
    injector = Injector(Settings())
    response = injector.review(admission_review(SHAPES["probes"]))["response"]
    assert rewritten(response) is False
    injector = Injector(Settings(rewrite_probes=True))
    assert rewritten(injector.review(admission_review(SHAPES["probes"]))["response"]) is True
