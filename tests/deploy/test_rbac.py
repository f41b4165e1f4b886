"""deploy/rbac.yaml: least privilege, checked both ways.

The rules are exactly the expected ones (reads of what control/sources/kube.py watches, and a handful of
named writes), with no wildcard; and every request the control plane's Kubernetes code makes — the
config reflectors, leader election, the webhook certificate's reconciler — is allowed by them, as recorded
by a fake API server and judged by Kubernetes' RBAC matching rules.
"""

from __future__ import annotations

import base64
import time
import urllib.parse
from collections.abc import Callable

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

from control.leader import LeaderElector  # noqa: E402
from control.sources.kube import KINDS, KubeSource  # noqa: E402
from control.store import Store  # noqa: E402
from injector import certs  # noqa: E402
from tests.deploy.conftest import one  # noqa: E402
from tests.fakekube import FakeKube, Request, ResourceType  # noqa: E402
from tests.fakekube.server import BUILTIN_TYPES  # noqa: E402

NAMESPACE = "meshproxy-system"
NAME = "meshproxy-control"
READ = frozenset({"get", "list", "watch"})

Grants = dict[tuple[str, str, tuple[str, ...]], frozenset[str]]


def grants(rules: list[dict]) -> Grants:
    """(apiGroup, resource, resourceNames) -> verbs, one entry per combination the rules spell."""
    out: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for rule in rules:
        assert not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource, tuple(sorted(rule.get("resourceNames") or ())))
                out.setdefault(key, set()).update(rule["verbs"])
    return {k: frozenset(v) for k, v in out.items()}


def test_no_wildcards(base):
    for role in (one(base, "ClusterRole", NAME), one(base, "Role", NAME)):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in v for v in rule.get(field) or ()), (role["kind"], rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_cluster_role_reads_exactly_what_the_control_plane_watches(base):
    expected: Grants = {(kind.group, kind.plural, ()): READ for kind in KINDS}
    expected |= {
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", (certs.WEBHOOK_CONFIGURATION,)): frozenset(
            {"get", "update"}
        ),
        ("authentication.k8s.io", "tokenreviews", ()): frozenset({"create"}),
    }
    assert grants(one(base, "ClusterRole", NAME)["rules"]) == expected


def test_role_writes_only_the_lease_and_the_secret(base):
    role = one(base, "Role", NAME)
    assert role["metadata"]["namespace"] == NAMESPACE
    # create cannot be restricted by resourceNames (the name is not known when it is authorized)
    assert grants(role["rules"]) == {
        ("coordination.k8s.io", "leases", ()): frozenset({"create"}),
        ("coordination.k8s.io", "leases", (NAME,)): frozenset({"get", "update"}),
        ("", "secrets", ()): frozenset({"create"}),
        ("", "secrets", (certs.SECRET_NAME,)): frozenset({"get", "update"}),
    }


def test_bindings_grant_the_roles_to_the_service_account_only(base):
    account = one(base, "ServiceAccount", NAME)
    assert account["metadata"]["namespace"] == NAMESPACE
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    crb = one(base, "ClusterRoleBinding", NAME)
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME}
    assert crb["subjects"] == subject
    rb = one(base, "RoleBinding", NAME)
    assert rb["metadata"]["namespace"] == NAMESPACE
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}
    assert rb["subjects"] == subject
    pod = one(base, "Deployment", NAME)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == NAME
    assert pod.get("automountServiceAccountToken", True) is True


# -- every request the control plane makes is allowed ---------------------------------------------------


def attributes(request: Request) -> tuple[str, str, str, str | None, str | None] | None:
    """(verb, apiGroup, resource, namespace, name) as the API server authorizes ``request``; None for
    discovery and /version, which every authenticated user may read (system:discovery)."""
    segs = [urllib.parse.unquote(s) for s in request.path.strip("/").split("/")]
    if segs[:2] == ["api", "v1"]:
        group, rest = "", segs[2:]
    elif segs[0] == "apis" and len(segs) >= 3:
        group, rest = segs[1], segs[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    resource, name = rest[0], rest[1] if len(rest) > 1 else None
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(request.method)
    if verb is None:
        verb = "get" if name else ("watch" if request.is_watch else "list")
    return verb, group, resource, namespace, name


def allowed(attrs: tuple[str, str, str, str | None, str | None], cluster: list[dict], role: list[dict]) -> bool:
    verb, group, resource, namespace, name = attrs
    rules = cluster + (role if namespace == NAMESPACE else [])
    for rule in rules:
        if group not in rule["apiGroups"] or resource not in rule["resources"] or verb not in rule["verbs"]:
            continue
        names = rule.get("resourceNames")
        # a rule naming objects matches only requests naming one of them
        if not names or (name is not None and name in names):
            return True
    return False


def test_the_matcher_refuses_what_the_rules_do_not_grant(base):
    cluster, role = one(base, "ClusterRole", NAME)["rules"], one(base, "Role", NAME)["rules"]
    denied = [
        ("list", "", "secrets", None, None),  # no Secret outside our own, nor a list of them
        ("get", "", "secrets", NAMESPACE, "someone-elses"),
        ("get", "", "secrets", "default", certs.SECRET_NAME),
        ("update", "coordination.k8s.io", "leases", NAMESPACE, "another-lease"),
        ("update", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", None, "istio-sidecar-injector"),
        ("update", "meshproxy.io", "virtualservices", "default", "reviews"),
        ("create", "", "pods", "default", None),
    ]
    for attrs in denied:
        assert not allowed(attrs, cluster, role), attrs
    assert allowed(("create", "", "secrets", NAMESPACE, None), cluster, role)


def wait_for(pred: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_every_request_of_the_control_plane_is_allowed(base):
    builtin = {(t.group, t.plural) for t in BUILTIN_TYPES}
    custom = [
        ResourceType(k.group, k.versions[0], k.plural, k.kind, True)
        for k in KINDS
        if (k.group, k.plural) not in builtin
    ]
    webhook_type = ResourceType(
        "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False
    )
    with FakeKube([*custom, webhook_type], namespaces=("default", NAMESPACE), bookmark_interval=0.2) as kube:
        config = one(base, "MutatingWebhookConfiguration")
        kube.create(webhook_type, None, {k: v for k, v in config.items() if k not in ("apiVersion", "kind")})
        api = client.ApiClient(client.Configuration(host=kube.host, connection_pool_maxsize=32))

        # the config sources: list and watch every kind, cluster-wide
        source = KubeSource(Store(), api)
        source.start()
        try:
            assert source.synced.wait(20), "the reflectors did not sync"
            wait_for(lambda: sum(r.is_watch for r in kube.requests) >= len(KINDS), "every watch")
        finally:
            source.stop()

        # leader election: take the Lease, renew it, release it
        led = []
        elector = LeaderElector(
            api,
            NAMESPACE,
            NAME,
            "replica-a",
            lease_duration=1.0,
            renew_deadline=0.6,
            retry_period=0.1,
            on_started_leading=lambda: led.append(True),
            on_stopped_leading=lambda: None,
        )
        elector.start()
        try:
            wait_for(lambda: led, "leadership")
            before = len(kube.requests)
            wait_for(lambda: len(kube.requests) > before + 2, "renewals")
        finally:
            elector.stop()

        # the leader's certificate work: create the Secret, write the caBundle, then replace a bad Secret
        reconciler = certs.WebhookCertReconciler(api, NAMESPACE)
        first = reconciler.reconcile()
        secret_type = kube.type_of("", "v1", "secrets")
        stored = kube.get(secret_type, NAMESPACE, certs.SECRET_NAME)
        stored["data"]["tls.crt"] = base64.b64encode(b"not a certificate").decode()
        kube.update(secret_type, NAMESPACE, certs.SECRET_NAME, stored)
        second = reconciler.reconcile()
        assert second.ca_pem != first.ca_pem
        hook = kube.get(webhook_type, None, certs.WEBHOOK_CONFIGURATION)["webhooks"][0]
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == second.ca_pem
        # and what every replica does to serve the webhook: read the Secret
        assert certs.read_secret(client.CoreV1Api(api), NAMESPACE) is not None

        requests = list(kube.requests)

    cluster, role = one(base, "ClusterRole", NAME)["rules"], one(base, "Role", NAME)["rules"]
    seen = {a for r in requests if (a := attributes(r)) is not None}
    refused = sorted(a for a in seen if not allowed(a, cluster, role))
    assert not refused, f"requests the RBAC rules do not allow: {refused}"
    verbs = {(verb, resource) for verb, _, resource, _, _ in seen}
    # the test exercised every write the rules exist for
    expected_writes = {
        ("create", "leases"),
        ("update", "leases"),
        ("create", "secrets"),
        ("update", "secrets"),
        ("update", "mutatingwebhookconfigurations"),
    }
    assert expected_writes <= verbs
    assert {("list", k.plural) for k in KINDS} | {("watch", k.plural) for k in KINDS} <= verbs
