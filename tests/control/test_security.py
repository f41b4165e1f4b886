"""control.security: PeerAuthentication precedence, AuthorizationPolicy normalization, upstream TLS, and the
config it fills passing the sidecar's validation (and its failures naming the field)."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from control.ca import CAKeys
from control.model import Endpoint, parse
from control.security import Security, apply, normalize_policy, resolve_peer_authentication
from control.translate import Translator
from meshproxy.config import ConfigError, validate
from meshproxy.config.v1 import config_pb2 as pb

ROOT = "meshproxy-system"
BUNDLE = [k.decode() for k in CAKeys.self_signed("cluster.local").trust_bundle()]
HAS_SERVICE_ACCOUNTS = "service_account" in Endpoint.__dataclass_fields__
needs_model_patch = pytest.mark.skipif(
    not HAS_SERVICE_ACCOUNTS, reason="control/model.py without the mTLS fields (see the H7 report's model diff)"
)


def pa(name: str, ns: str, mode: str | None = None, selector: dict | None = None, ports: dict | None = None) -> dict:
    spec: dict = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def ap(name: str, ns: str, spec: dict) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def model_of(*objects: dict):
    return parse([(o, "test") for o in objects])


MODE = pb.PeerAuthentication.Mode.Name


def resolved(objects, ns="shop", labels=None):
    m = model_of(*objects)
    assert m.errors() == []
    out = resolve_peer_authentication(m.peer_authentications, ns, labels or {"app": "web"}, ROOT)
    return MODE(out.mode), {p: MODE(v) for p, v in out.port_modes.items()}, list(out.sources)


# ---- PeerAuthentication precedence ----------------------------------------------------------------------------


MESH, NS, WL = "mesh", "ns", "wl"


@pytest.mark.parametrize(
    "mesh, namespace, workload, expected",
    [
        (None, None, None, "PERMISSIVE"),  # nothing: Istio's default
        ("STRICT", None, None, "STRICT"),
        ("STRICT", "DISABLE", None, "DISABLE"),  # the namespace over the mesh
        ("DISABLE", "STRICT", "PERMISSIVE", "PERMISSIVE"),  # the workload over both
        ("STRICT", "UNSET", None, "STRICT"),  # UNSET inherits
        ("STRICT", "UNSET", "UNSET", "STRICT"),
        ("DISABLE", "STRICT", "UNSET", "STRICT"),
        (None, None, "STRICT", "STRICT"),
        ("UNSET", None, None, "PERMISSIVE"),
        (None, "UNSET", "UNSET", "PERMISSIVE"),
    ],
)
def test_precedence_matrix(mesh, namespace, workload, expected):
    objects = []
    if mesh is not None:
        objects.append(pa("default", ROOT, mesh))
    if namespace is not None:
        objects.append(pa("default", "shop", namespace))
    if workload is not None:
        objects.append(pa("web", "shop", workload, selector={"app": "web"}))
    mode, ports, sources = resolved(objects)
    assert mode == expected and ports == {}
    assert len(sources) == len(objects)


def test_a_policy_applies_only_where_it_should():
    objects = [
        pa("default", "other", "STRICT"),  # another namespace
        pa("db", "shop", "STRICT", selector={"app": "db"}),  # another workload
        pa("sel", ROOT, "STRICT", selector={"app": "web"}),  # a selector in the root namespace: ignored
    ]
    assert resolved(objects)[0] == "PERMISSIVE"
    assert resolved(objects, labels={"app": "db"})[0] == "STRICT"
    assert resolved(objects, ns="other")[0] == "STRICT"
    # The mesh-wide policy also governs workloads in the root namespace itself.
    assert resolved([pa("default", ROOT, "STRICT")], ns=ROOT)[0] == "STRICT"


def test_port_level_modes():
    objects = [
        pa("default", "shop", "STRICT"),
        pa("web", "shop", "UNSET", selector={"app": "web"}, ports={8080: "DISABLE", 9090: "UNSET", 7070: "PERMISSIVE"}),
    ]
    mode, ports, _ = resolved(objects)
    assert mode == "STRICT"
    # UNSET at a port inherits the workload's resolved mode.
    assert ports == {7070: "PERMISSIVE", 8080: "DISABLE", 9090: "STRICT"}


def test_several_policies_at_one_level_take_the_first_by_name_and_warn():
    objects = [pa("b", "shop", "STRICT"), pa("a", "shop", "DISABLE"), pa("default", ROOT, "STRICT")]
    assert resolved(objects)[0] == "DISABLE"
    problems = Security(model_of(*objects), root_namespace=ROOT).problems
    assert [(p.resource, "first by name" in p.message) for p in problems] == [("PeerAuthentication shop/b", True)]


# ---- AuthorizationPolicy ----------------------------------------------------------------------------------------


def normalized(spec: dict, trust_domain: str = "cluster.local"):
    m = model_of(ap("p", "shop", spec))
    assert m.errors() == [], m.errors()
    policy, problems = normalize_policy(m.authorization_policies[0], trust_domain)
    return (json_format.MessageToDict(policy) if policy is not None else None), problems


def test_normalized_rules():
    policy, problems = normalized(
        {
            "action": "ALLOW",
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["cluster.local/ns/shop/sa/web", "cluster.local/ns/ops/*", "*"],
                                "notNamespaces": ["kube-*", "*-test"],
                            }
                        }
                    ],
                    "to": [
                        {
                            "operation": {
                                "methods": ["GET", "POST"],
                                "paths": ["/pkg.Service/Get", "/admin/*", "*/health"],
                                "ports": ["8080"],
                                "notPorts": ["9090"],
                                "hosts": ["API.example.com"],
                            }
                        }
                    ],
                    "when": [
                        {"key": "request.headers[X-Tenant]", "values": ["acme"], "notValues": ["evil*"]},
                        {"key": "source.namespace", "values": ["shop"]},
                        {"key": "source.principal", "notValues": ["cluster.local/ns/shop/sa/bad"]},
                        {"key": "destination.port", "values": ["8080"]},
                    ],
                },
                {},
            ],
        }
    )
    assert problems == []
    assert policy == {
        "name": "shop/p",
        "rules": [
            {
                "from": [
                    {
                        "principals": [
                            {"exact": "cluster.local/ns/shop/sa/web"},
                            {"prefix": "cluster.local/ns/ops/"},
                            {"presence": True},
                        ],
                        "notNamespaces": [{"prefix": "kube-"}, {"suffix": "-test"}],
                    }
                ],
                "to": [
                    {
                        "hosts": [{"exact": "api.example.com"}],
                        "methods": [{"exact": "GET"}, {"exact": "POST"}],
                        "paths": [{"exact": "/pkg.Service/Get"}, {"prefix": "/admin/"}, {"suffix": "/health"}],
                        "ports": [8080],
                        "notPorts": [9090],
                    }
                ],
                "when": [
                    {"header": "x-tenant", "values": [{"exact": "acme"}], "notValues": [{"prefix": "evil"}]},
                    {"attribute": "SOURCE_NAMESPACE", "values": [{"exact": "shop"}]},
                    {"attribute": "SOURCE_PRINCIPAL", "notValues": [{"exact": "cluster.local/ns/shop/sa/bad"}]},
                    {"attribute": "DESTINATION_PORT", "values": [{"exact": "8080"}]},
                ],
            },
            {},  # an empty rule: matches every request
        ],
    }


def test_actions_and_empty_policies():
    assert normalized({"action": "DENY", "rules": [{}]})[0] == {"name": "shop/p", "action": "DENY", "rules": [{}]}
    assert normalized({"action": "AUDIT"})[0] == {"name": "shop/p", "action": "AUDIT"}
    # No rules: an ALLOW policy that allows nothing.
    assert normalized({})[0] == {"name": "shop/p"}


def test_unsupported_fields_fail_closed_the_way_istio_does():
    spec = {
        "rules": [
            {"from": [{"source": {"requestPrincipals": ["issuer/subject"]}}]},
            {"when": [{"key": "source.ip", "values": ["10.0.0.1"]}]},
            {"to": [{"operation": {"paths": ["/api/{*}/x"]}}]},
            {"from": [{"source": {"namespaces": ["shop"]}}]},
        ]
    }
    allow, problems = normalized(spec)
    # ALLOW: each rule with something unsupported is dropped; the rest stays.
    assert allow["rules"] == [{"from": [{"namespaces": [{"exact": "shop"}]}]}]
    assert [p[0] for p in problems] == ["warning"] * 3
    assert all("dropped" in p[1] for p in problems)
    deny, problems = normalized(spec | {"action": "DENY"})
    # DENY: the unsupported parts are dropped from the rule, which then matches more.
    assert deny["rules"] == [{"from": [{}]}, {}, {"to": [{}]}, {"from": [{"namespaces": [{"exact": "shop"}]}]}]
    assert len(problems) == 3 and all("matches more" in p[1] for p in problems)


@pytest.mark.parametrize(
    "rule, reason",
    [
        ({"from": [{"source": {"principals": [""]}}]}, "empty value"),
        ({"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}, "without 'spiffe://'"),
        ({"from": [{"source": {"namespaces": ["a*b"]}}]}, "start or the end"),
        ({"to": [{"operation": {"ports": ["http"]}}]}, "not a port"),
        ({"to": [{"operation": {"paths": ["api"]}}]}, "start with '/'"),
        ({"when": [{"key": "request.headers[x]"}]}, "values or notValues"),
        ({"when": [{"key": "request.headers.x", "values": ["a"]}]}, "request.headers[<name>]"),
    ],
)
def test_invalid_policies_fail_closed(rule, reason):
    allow, problems = normalized({"action": "ALLOW", "rules": [{}, rule]})
    assert allow == {"name": "shop/p"}  # allows nothing
    assert problems[0][0] == "error" and reason in problems[0][1] and "allows nothing" in problems[0][1]
    deny, problems = normalized({"action": "DENY", "rules": [rule]})
    assert deny["rules"] == [{}]  # denies everything
    assert "denies every request" in problems[0][1]
    audit, problems = normalized({"action": "AUDIT", "rules": [rule]})
    assert audit is None and "ignored" in problems[0][1]


def test_custom_is_refused_with_a_reason():
    m = model_of(ap("p", "shop", {"action": "CUSTOM", "provider": {"name": "ext"}}))
    assert [(p.severity, p.message) for p in m.errors()] == [("error", "CUSTOM providers are not supported")]


def test_principals_of_cluster_local_also_name_the_mesh_trust_domain():
    policy, _ = normalized({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}]}]}, "corp.io")
    assert policy["rules"][0]["from"][0]["principals"] == [
        {"exact": "cluster.local/ns/a/sa/b"},
        {"exact": "corp.io/ns/a/sa/b"},
    ]


def test_which_policies_select_a_workload():
    m = model_of(
        ap("mesh-deny", ROOT, {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}),
        ap("mesh-web", ROOT, {"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]}),
        ap("ns-allow", "shop", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        ap("db-only", "shop", {"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]}),
        ap("audit", "shop", {"action": "AUDIT", "rules": [{}]}),
        ap("elsewhere", "other", {"rules": [{}]}),
    )
    sec = Security(m, root_namespace=ROOT)
    names = [
        (p.name, pb.AuthorizationPolicy.Action.Name(p.action))
        for p in sec.authorization("shop", {"app": "web"}).policies
    ]
    # DENY first, then ALLOW, then AUDIT: the order the sidecar evaluates them in.
    assert names == [
        (f"{ROOT}/mesh-deny", "DENY"),
        (f"{ROOT}/mesh-web", "ALLOW"),
        ("shop/ns-allow", "ALLOW"),
        ("shop/audit", "AUDIT"),
    ]
    assert [p.name for p in sec.authorization("other", {"app": "db"}).policies] == [
        f"{ROOT}/mesh-deny",
        "other/elsewhere",
    ]
    assert sec.label_keys == {"app"}


# ---- upstream TLS and the whole config -----------------------------------------------------------------------


def service(name: str, ns: str = "shop", port: int = 8080) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port}], "clusterIP": "10.96.0.10"},
    }


def pod(name: str, app: str, ip: str, ns: str = "shop", meshed: bool = True, sa: str = "") -> dict:
    labels = {"app": app} | ({"security.istio.io/tlsMode": "istio"} if meshed else {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": sa or app},
        "status": {"podIP": ip},
    }


def dr(host: str, mode: str, ns: str = "shop") -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": f"{host}-tls", "namespace": ns},
        "spec": {"host": host, "trafficPolicy": {"tls": {"mode": mode}}},
    }


def config_for(objects, ns="shop", labels=None, bundle=BUNDLE) -> pb.SidecarConfig:
    m = model_of(*objects)
    cfg = Translator(m).config(ns, labels or {"app": "client"})
    out = pb.SidecarConfig()
    out.CopyFrom(cfg)
    apply(out, m, ns, labels or {"app": "client"}, trust_bundle=bundle, root_namespace=ROOT)
    return out


def tls_of(cfg: pb.SidecarConfig, host_part: str) -> dict:
    c = next(c for c in cfg.clusters if host_part in c.name)
    return json_format.MessageToDict(c.tls)


def test_auto_mtls_per_endpoint_and_server_side_disable():
    cfg = config_for(
        [
            service("web"),
            pod("web-1", "web", "10.0.0.1"),
            pod("web-2", "web", "10.0.0.2", meshed=False),  # no sidecar
            service("db"),
            pod("db-1", "db", "10.0.1.1", meshed=False),
            service("legacy"),
            pod("legacy-1", "legacy", "10.0.2.1"),
            pa("legacy", "shop", "DISABLE", selector={"app": "legacy"}),
        ]
    )
    validate(cfg)
    web = tls_of(cfg, "web.shop")
    assert web["mode"] == "ISTIO_MUTUAL" and web["plaintextEndpoints"] == ["10.0.0.2:8080"]
    assert tls_of(cfg, "db.shop") == {}  # nobody behind it has a sidecar: plaintext
    assert tls_of(cfg, "legacy.shop") == {}  # its sidecar does not accept mTLS
    assert cfg.security.trust_bundle == BUNDLE and cfg.security.trust_domain == "cluster.local"


@needs_model_patch
def test_allowed_ids_are_the_destinations_service_accounts():
    cfg = config_for([service("web"), pod("web-1", "web", "10.0.0.1"), pod("web-2", "web", "10.0.0.2", sa="web-v2")])
    assert tls_of(cfg, "web.shop")["allowedSpiffeIds"] == [
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web-v2",
    ]


@needs_model_patch
def test_destination_rule_tls_wins_over_auto_mtls():
    objects = [service("web"), pod("web-1", "web", "10.0.0.1"), pod("web-2", "web", "10.0.0.2", meshed=False)]
    assert tls_of(config_for([*objects, dr("web", "DISABLE")]), "web.shop") == {}
    forced = tls_of(config_for([*objects, dr("web", "ISTIO_MUTUAL")]), "web.shop")
    assert forced["mode"] == "ISTIO_MUTUAL" and "plaintextEndpoints" not in forced


@needs_model_patch
def test_local_sidecars_behind_a_service_entry_get_mtls_with_their_identity():
    # Local mode: a ServiceEntry's endpoint is another sidecar's inbound listener.
    entry = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {
            "hosts": ["orders.local"],
            "ports": [{"number": 8080, "name": "grpc", "protocol": "GRPC"}],
            "resolution": "STATIC",
            "location": "MESH_INTERNAL",
            "subjectAltNames": ["spiffe://cluster.local/ns/shop/sa/orders-legacy"],
            "endpoints": [
                {
                    "address": "127.0.0.1",
                    "ports": {"grpc": 15006},
                    "labels": {"security.istio.io/tlsMode": "istio"},
                    "serviceAccount": "orders",
                },
                {"address": "127.0.0.2", "ports": {"grpc": 8080}},
            ],
        },
    }
    tls = tls_of(config_for([entry]), "orders.local")
    assert tls == {
        "mode": "ISTIO_MUTUAL",
        "allowedSpiffeIds": [
            "spiffe://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/ns/shop/sa/orders-legacy",
        ],
        "plaintextEndpoints": ["127.0.0.2:8080"],
    }


def test_security_follows_the_workload():
    objects = [
        pa("default", "shop", "STRICT"),
        pa("client", "shop", "UNSET", selector={"app": "client"}, ports={9000: "PERMISSIVE"}),
        ap("deny-evil", "shop", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}),
    ]
    cfg = config_for(objects)
    validate(cfg)
    sec = json_format.MessageToDict(cfg.security)
    assert sec["peerAuthentication"] == {
        "mode": "STRICT",
        "portModes": {"9000": "PERMISSIVE"},
        "sources": ["shop/default", "shop/client"],
    }
    assert [p["name"] for p in sec["authorization"]["policies"]] == ["shop/deny-evil"]
    # STRICT without roots cannot be enforced: the sidecar refuses such a config.
    with pytest.raises(ConfigError, match=r"STRICT needs security\.trust_bundle"):
        validate(config_for(objects, bundle=[]))


# ---- the sidecar's checks --------------------------------------------------------------------------------------


def base() -> pb.SidecarConfig:
    cfg = pb.SidecarConfig()
    cfg.clusters.add(name="c", endpoints=[pb.Endpoint(address="10.0.0.1:80")])
    cfg.security.trust_bundle.extend(BUNDLE)
    return cfg


@pytest.mark.parametrize(
    "change, path",
    [
        (lambda c: c.security.trust_bundle.append("junk"), "security.trust_bundle[1]"),
        (
            lambda c: c.security.trust_bundle.append("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "security.trust_bundle[1]",
        ),
        (lambda c: setattr(c.security, "trust_domain", "Bad Domain"), "security.trust_domain"),
        (
            lambda c: c.security.peer_authentication.port_modes.__setitem__(0, 3),
            "security.peer_authentication.port_modes['0']",
        ),
        (
            lambda c: c.clusters[0].tls.allowed_spiffe_ids.append("cluster.local/ns/a/sa/b"),
            "clusters[0].tls.allowed_spiffe_ids[0]",
        ),
        (
            lambda c: c.clusters[0].tls.plaintext_endpoints.append("10.9.9.9:80"),
            "clusters[0].tls.plaintext_endpoints[0]",
        ),
        (lambda c: c.security.authorization.policies.add(), "security.authorization.policies[0].name"),
        (
            lambda c: c.security.authorization.policies.add(name="p").rules.add().to.add().paths.add(prefix="api"),
            "security.authorization.policies[0].rules[0].to[0].paths[0].prefix",
        ),
        (
            lambda c: (
                getattr(c.security.authorization.policies.add(name="p").rules.add(), "from").add().principals.add()
            ),
            "security.authorization.policies[0].rules[0].from[0].principals[0]",
        ),
        (
            lambda c: c.security.authorization.policies.add(name="p").rules.add().to.add().ports.append(70000),
            "security.authorization.policies[0].rules[0].to[0].ports[0]",
        ),
        (
            lambda c: (
                c.security.authorization.policies.add(name="p")
                .rules.add()
                .when.add(header="X-A", values=[pb.StringMatch(exact="a")])
            ),
            "security.authorization.policies[0].rules[0].when[0].header",
        ),
        (
            lambda c: c.security.authorization.policies.add(name="p").rules.add().when.add(header="x"),
            "security.authorization.policies[0].rules[0].when[0]",
        ),
    ],
)
def test_validation_names_the_field(change, path):
    cfg = base()
    validate(cfg)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.path == path


def test_mutual_tls_upstream_needs_the_bundle():
    cfg = base()
    cfg.clusters[0].tls.mode = pb.UpstreamTls.ISTIO_MUTUAL
    validate(cfg)
    cfg.security.ClearField("trust_bundle")
    with pytest.raises(ConfigError, match=r"ISTIO_MUTUAL needs security\.trust_bundle"):
        validate(cfg)
