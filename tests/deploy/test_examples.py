"""deploy/examples: the seed's mesh config (examples/seed/seed.yaml) as a cluster takes it, in an injected namespace."""

from __future__ import annotations

from control.model import parse
from control.sources.files import read_file
from tests.deploy.conftest import REPO, one


def seed(kind: str) -> dict:
    objects, bad = read_file(REPO / "examples" / "seed" / "seed.yaml")
    assert not bad
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def test_the_namespace_is_injected(base, examples):
    namespace = one(examples, "Namespace")
    name = namespace["metadata"]["name"]
    assert namespace["metadata"]["labels"]["meshproxy.io/inject"] == "enabled"
    # the injector's namespaceSelector selects it
    hook = one(base, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["namespaceSelector"]["matchLabels"].items() <= namespace["metadata"]["labels"].items()
    for obj in examples:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == name, obj["metadata"]["name"]
            assert obj["apiVersion"] == "meshproxy.io/v1alpha1"  # the base's CRDs; Istio's groups are optional


def test_the_seeds_route_and_mtls_policy(examples):
    assert one(examples, "VirtualService", "reviews")["spec"] == seed("VirtualService")["spec"]
    assert one(examples, "PeerAuthentication", "default")["spec"] == seed("PeerAuthentication")["spec"]
    assert seed("PeerAuthentication")["spec"] == {"mtls": {"mode": "STRICT"}}


def test_the_control_plane_reads_them(examples):
    model = parse([(o, "deploy/examples") for o in examples])
    assert not model.errors()
    namespace = one(examples, "Namespace")["metadata"]["name"]
    host = f"reviews.{namespace}.svc.cluster.local"
    (vs,) = model.virtual_services
    assert vs.hosts == (host,)
    (route,) = vs.http
    assert [(d.host, d.subset, d.weight) for d in route.destinations] == [(host, "v1", 80), (host, "v2", 20)]
    # the subsets the route names exist
    (rule,) = model.destination_rules
    assert rule.host == host
    assert {s.name: dict(s.labels) for s in rule.subsets} == {"v1": {"version": "v1"}, "v2": {"version": "v2"}}
    (policy,) = model.peer_authentications
    assert policy.mode == "STRICT" and policy.selector is None  # the whole namespace


def test_the_sample_app_lands_in_the_namespace_and_the_subsets(examples):
    """examples/k8s/app.yaml (the sample app) goes where deploy/examples routes: the same namespace, a Service
    named as the route's host, and one Deployment per subset whose pods carry the subset's labels."""
    namespace = one(examples, "Namespace")["metadata"]["name"]
    app, bad = read_file(REPO / "examples" / "k8s" / "app.yaml")
    assert not bad
    assert {o["metadata"]["namespace"] for o in app} == {namespace}
    assert one(app, "Service", "reviews")
    subsets = {s["name"]: s["labels"] for s in one(examples, "DestinationRule", "reviews")["spec"]["subsets"]}
    service = one(app, "Service", "reviews")["spec"]["selector"]
    for name, labels in subsets.items():
        matching = [
            d["metadata"]["name"]
            for d in app
            if d["kind"] == "Deployment"
            and (labels | service).items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, (name, matching)
