"""The webhook's certificate: generation, TLS with it, and the leader's Secret and caBundle work against the fake
API server (Secrets and MutatingWebhookConfigurations schema-validated as the real API does)."""

from __future__ import annotations

import base64
import datetime
import socket
import ssl
import threading
import time

import pytest

kubernetes = pytest.importorskip("kubernetes")
from cryptography import x509  # noqa: E402
from kubernetes import client  # noqa: E402

from control.leader import LeaderElector, LeaderTask  # noqa: E402
from injector.certs import (  # noqa: E402
    SECRET_NAME,
    WEBHOOK_CONFIGURATION,
    WebhookCertReconciler,
    WebhookCerts,
    load_into,
    read_secret,
    server_context,
    service_dns_names,
)
from tests import fakekube  # noqa: E402
from tests.fakekube import ApiError, FakeKube, ResourceType  # noqa: E402

pytestmark = pytest.mark.timeout(60)

NS = "meshproxy-system"
NAMES = service_dns_names(namespace=NS)
MWC = ResourceType(
    "admissionregistration.k8s.io",
    "v1",
    "mutatingwebhookconfigurations",
    "MutatingWebhookConfiguration",
    False,
    builtin=True,
)


def webhook_configuration() -> dict:
    """deploy/webhook.yaml's object: caBundle absent, for the leader to fill in."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIGURATION},
        "webhooks": [
            {
                "name": "sidecar-injector.meshproxy.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {
                    "service": {"name": "meshproxy-control", "namespace": NS, "path": "/inject", "port": 443}
                },
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {"meshproxy.io/inject": "enabled"}},
                "objectSelector": {
                    "matchExpressions": [{"key": "meshproxy.io/inject", "operator": "NotIn", "values": ["false"]}]
                },
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "timeoutSeconds": 10,
                "reinvocationPolicy": "Never",
            }
        ],
    }


@pytest.fixture
def kube():
    with FakeKube(custom_resources=[MWC], namespaces=(NS,)) as fake:
        yield fake


def api_of(kube: FakeKube) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=kube.host))


def secret_type(kube: FakeKube) -> ResourceType:
    return kube.type_of("", "v1", "secrets")


def ca_bundle(kube: FakeKube) -> str | None:
    return kube.get(MWC, None, WEBHOOK_CONFIGURATION)["webhooks"][0]["clientConfig"].get("caBundle")


def secret_certs(kube: FakeKube) -> WebhookCerts:
    return WebhookCerts.from_secret_data(kube.get(secret_type(kube), NS, SECRET_NAME)["data"])


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- the certificates ---------------------------------------------------------------------------------------


def test_generated_certificates():
    certs = WebhookCerts.generate(NAMES)
    assert certs.problem(NAMES) is None
    ca = x509.load_pem_x509_certificate(certs.ca_pem)
    leaf = x509.load_pem_x509_certificate(certs.cert_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == NAMES
    assert "meshproxy-control.meshproxy-system.svc" in NAMES
    assert leaf.public_key().curve.name == "secp256r1" and ca.public_key().curve.name == "secp256r1"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    leaf.verify_directly_issued_by(ca)
    assert WebhookCerts.from_secret_data(certs.secret_data()) == certs


def test_problems():
    certs = WebhookCerts.generate(NAMES)
    other = WebhookCerts.generate(NAMES)
    assert certs.problem([*NAMES, "meshproxy-control.elsewhere.svc"]) == "not for meshproxy-control.elsewhere.svc"
    assert WebhookCerts(other.ca_pem, certs.cert_pem, certs.key_pem).problem(NAMES) == (
        "the certificate is not signed by the CA"
    )
    assert WebhookCerts(certs.ca_pem, certs.cert_pem, other.key_pem).problem(NAMES) == (
        "the key does not match the certificate"
    )
    assert WebhookCerts(b"junk", certs.cert_pem, certs.key_pem).problem(NAMES).startswith("unreadable")
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650 - 10)
    assert certs.problem(NAMES, now=soon).startswith("expires ")
    with pytest.raises(ValueError, match=r"no tls\.key"):
        WebhookCerts.from_secret_data({"ca.crt": "", "tls.crt": ""})
    with pytest.raises(ValueError, match="not base64"):
        WebhookCerts.from_secret_data({"ca.crt": "%%", "tls.crt": "", "tls.key": ""})


def serve_once(context: ssl.SSLContext) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return port, thread


def handshake(port: int, ca_pem: bytes, hostname: str) -> x509.Certificate:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=hostname) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def test_a_context_takes_new_certificates_for_new_connections():
    first, second = WebhookCerts.generate(NAMES), WebhookCerts.generate(NAMES)
    context = server_context(first)
    port, thread = serve_once(context)
    assert handshake(port, first.ca_pem, NAMES[2]).public_bytes(ssl_der()) == pem_to_der(first.cert_pem)
    thread.join(5)
    load_into(context, second)
    port, thread = serve_once(context)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, first.ca_pem, NAMES[2])
    thread.join(5)
    port, thread = serve_once(context)
    assert handshake(port, second.ca_pem, NAMES[2]).public_bytes(ssl_der()) == pem_to_der(second.cert_pem)
    thread.join(5)


def ssl_der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(ssl_der())


# ---- the leader's work --------------------------------------------------------------------------------------


def test_reconcile_creates_the_secret_once_and_sets_the_ca_bundle(kube):
    kube.create(MWC, None, webhook_configuration())
    reconciler = WebhookCertReconciler(api_of(kube), NS)
    certs = reconciler.reconcile()
    secret = kube.get(secret_type(kube), NS, SECRET_NAME)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert secret_certs(kube) == certs and certs.problem(NAMES) is None
    assert base64.b64decode(ca_bundle(kube)) == certs.ca_pem
    rv = kube.resource_version
    # a second round (this replica or the next leader) changes nothing
    assert WebhookCertReconciler(api_of(kube), NS).reconcile() == certs
    assert kube.resource_version == rv
    # the served certificate is trusted by the caBundle, for the name the API server dials
    port, thread = serve_once(server_context(read_secret(client.CoreV1Api(api_of(kube)), NS)))
    handshake(port, base64.b64decode(ca_bundle(kube)), "meshproxy-control.meshproxy-system.svc")
    thread.join(5)


def test_a_reset_ca_bundle_is_set_again(kube):
    kube.create(MWC, None, webhook_configuration())
    reconciler = WebhookCertReconciler(api_of(kube), NS)
    certs = reconciler.reconcile()
    # `kubectl apply` of a manifest carrying an empty caBundle, say
    config = kube.get(MWC, None, WEBHOOK_CONFIGURATION)
    config["webhooks"][0]["clientConfig"]["caBundle"] = ""
    kube.update(MWC, None, WEBHOOK_CONFIGURATION, config)
    assert reconciler.reconcile() == certs
    assert base64.b64decode(ca_bundle(kube)) == certs.ca_pem


def test_a_missing_configuration_waits_for_the_next_round(kube):
    reconciler = WebhookCertReconciler(api_of(kube), NS)
    certs = reconciler.reconcile()
    assert secret_certs(kube) == certs
    kube.create(MWC, None, webhook_configuration())
    assert reconciler.reconcile() == certs
    assert base64.b64decode(ca_bundle(kube)) == certs.ca_pem


def test_a_secret_created_meanwhile_by_another_replica_is_kept(kube):
    theirs = WebhookCerts.generate(NAMES)

    def race(request):
        if request.method == "POST" and request.path.endswith("/secrets"):
            kube.fault = None
            body = {"metadata": {"name": SECRET_NAME}, "type": "kubernetes.io/tls", "data": theirs.secret_data()}
            kube.create(secret_type(kube), NS, body)
        return None

    kube.fault = race
    assert WebhookCertReconciler(api_of(kube), NS).reconcile() == theirs
    assert secret_certs(kube) == theirs
    posts = [r for r in kube.requests if r.method == "POST" and r.path.endswith("/secrets")]
    assert len(posts) == 1  # answered 409 AlreadyExists; not retried


@pytest.mark.parametrize(
    "data",
    [
        {"tls.crt": "", "tls.key": ""},
        {"ca.crt": base64.b64encode(b"junk").decode(), "tls.crt": "", "tls.key": ""},
        WebhookCerts.generate(["meshproxy-control.elsewhere.svc"]).secret_data(),
    ],
    ids=["no-ca", "junk", "other-names"],
)
def test_an_unusable_secret_is_replaced(kube, data):
    kube.create(secret_type(kube), NS, {"metadata": {"name": SECRET_NAME}, "type": "kubernetes.io/tls", "data": data})
    certs = WebhookCertReconciler(api_of(kube), NS).reconcile()
    assert certs.problem(NAMES) is None
    assert secret_certs(kube) == certs


def test_api_errors_raise_for_the_task_to_retry(kube):
    kube.fault = lambda request: ApiError(503, "ServiceUnavailable", "etcd is down")
    with pytest.raises(kubernetes.client.exceptions.ApiException):
        WebhookCertReconciler(api_of(kube), NS).reconcile()


def test_read_secret(kube):
    core = client.CoreV1Api(api_of(kube))
    assert read_secret(core, NS) is None
    certs = WebhookCerts.generate(NAMES)
    kube.create(secret_type(kube), NS, {"metadata": {"name": SECRET_NAME}, "data": certs.secret_data()})
    assert read_secret(core, NS) == certs
    kube.update(secret_type(kube), NS, SECRET_NAME, {"metadata": {"name": SECRET_NAME}, "data": {"tls.crt": ""}})
    assert read_secret(core, NS) is None


def test_only_the_leader_does_it_and_keeps_doing_it(kube):
    """The wiring of meshproxy-control serve --kubernetes --webhook: a LeaderTask started and stopped by the
    elector's callbacks; two replicas, one Secret."""
    kube.create(MWC, None, webhook_configuration())
    replicas = []
    for identity in ("control-a", "control-b"):
        api = api_of(kube)
        api.user_agent = identity
        task = LeaderTask("webhook-certificate", WebhookCertReconciler(api, NS).reconcile, interval=0.1, retry=0.05)
        elector = LeaderElector(
            api,
            NS,
            "meshproxy-control",
            identity,
            lease_duration=1.0,
            renew_deadline=0.6,
            retry_period=0.1,
            on_started_leading=task.start,
            on_stopped_leading=task.stop,
        )
        replicas.append((elector, task))
        elector.start()
    try:
        wait_for(lambda: ca_bundle(kube), what="the caBundle")
        certs = secret_certs(kube)
        assert base64.b64decode(ca_bundle(kube)) == certs.ca_pem
        assert sum(task.running for _, task in replicas) == 1
        # the leader puts the caBundle back when it is reset
        config = kube.get(MWC, None, WEBHOOK_CONFIGURATION)
        del config["webhooks"][0]["clientConfig"]["caBundle"]
        kube.update(MWC, None, WEBHOOK_CONFIGURATION, config)
        wait_for(lambda: ca_bundle(kube), what="the caBundle again")
        leader = next((e, t) for e, t in replicas if t.running)
        follower = next((e, t) for e, t in replicas if not t.running)
        leader[0].stop()
        assert not leader[1].running
        wait_for(lambda: follower[1].running, what="the other replica to take over")
        # the new leader keeps the Secret the first one made
        time.sleep(0.3)
        assert secret_certs(kube) == certs
        assert base64.b64decode(ca_bundle(kube)) == certs.ca_pem
        creates = [r for r in kube.requests if r.method == "POST" and r.path.endswith("/secrets")]
        assert len(creates) == 1
    finally:
        for elector, task in replicas:
            elector.stop()
            task.stop()


def test_leader_task_retries_failures(caplog):
    calls = []

    def work():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise kubernetes.client.exceptions.ApiException(status=503, reason="Service Unavailable")

    task = LeaderTask("flaky", work, interval=60.0, retry=0.01)
    task.start()
    try:
        wait_for(lambda: len(calls) >= 3, what="the third try")
    finally:
        task.stop()
    assert "leader task flaky: Service Unavailable" in caplog.text
    with pytest.raises(ValueError):
        LeaderTask("bad", work, interval=0)


# ---- the whole control plane ---------------------------------------------------------------------------------


def test_meshproxy_control_serve_kubernetes_webhook(kube, tmp_path):
    """meshproxy-control serve --kubernetes --webhook as a process against the fake API server: the leader
    creates the Secret and patches the caBundle; the webhook then serves that certificate, which the caBundle
    makes trusted for the name the API server dials."""
    import http.client
    import json
    import os
    import signal
    import sys

    from tests.integration import harness

    kube.create(MWC, None, webhook_configuration())
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fakekube.kubeconfig(kube.host))
    port = harness.free_port()
    argv = [sys.executable, "-m", "control", "serve", "--kubernetes", "--kubeconfig", str(kubeconfig)]
    argv += ["--listen", "127.0.0.1:0", "--webhook", "--webhook-listen", f"127.0.0.1:{port}", "--log-level", "info"]
    env = {**os.environ, "POD_NAMESPACE": NS, "POD_NAME": "control-0"}
    process = harness.Process(argv, name="meshproxy-control", env=env)
    try:
        wait_for(lambda: ca_bundle(kube) or not process.alive(), timeout=30, what="the caBundle")
        assert process.alive(), process.describe()
        certs = secret_certs(kube)
        assert base64.b64decode(ca_bundle(kube)) == certs.ca_pem
        harness.wait_listening("127.0.0.1", port, 30, alive=process.alive)
        context = ssl.create_default_context(cadata=base64.b64decode(ca_bundle(kube)).decode())
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10)
        conn.sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10),
            server_hostname="meshproxy-control.meshproxy-system.svc",
        )
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "e2e",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "default",
                "operation": "CREATE",
                "object": {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "a", "image": "b"}]}},
            },
        }
        conn.request("POST", "/inject", body=json.dumps(review), headers={"Content-Type": "application/json"})
        response = json.loads(conn.getresponse().read())["response"]
        conn.close()
        assert (response["uid"], response["allowed"], response["patchType"]) == ("e2e", True, "JSONPatch")
        patch = json.loads(base64.b64decode(response["patch"]))
        proxy = next(op for op in patch if op["path"] == "/spec/initContainers")["value"][1]
        # the sidecars are pointed at the control plane's own namespace
        assert proxy["args"][proxy["args"].index("--control-plane") + 1] == (
            "meshproxy-control.meshproxy-system.svc:15010"
        )
    finally:
        code = process.stop(signal.SIGTERM, 15)
        output = process.describe()
        process.remove_log()
    assert code == 0, output
