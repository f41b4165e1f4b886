"""The authorization matrix (meshproxy.authz): Istio's evaluation order, every source, operation
and condition field, StringMatch semantics, and what a plaintext peer matches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.protobuf import json_format

from meshproxy import authz
from meshproxy.config.v1 import config_pb2 as pb
from meshproxy.tls import Peer

WEB = Peer("spiffe://cluster.local/ns/shop/sa/web")
ADMIN = Peer("spiffe://cluster.local/ns/ops/sa/admin")
PORT = 8080


def policies(*items: dict) -> authz.Policies | None:
    msg = json_format.ParseDict({"policies": list(items)}, pb.Authorization())
    return authz.compile_policies(msg)


def req(
    path: str = "/shop.Cart/Get", method: str = "POST", host: str = "cart.shop:8080", headers: tuple = ()
) -> SimpleNamespace:
    hs = [(b":method", method.encode()), (b":path", path.encode()), (b":authority", host.encode())]
    hs += [(n.encode(), v.encode()) for n, v in headers]
    return SimpleNamespace(path=path.encode(), method=method.encode(), authority=host.encode(), headers=hs)


def decide(ps: authz.Policies | None, peer=WEB, port=PORT, **kw) -> tuple[bool, str, str]:
    if ps is None:
        return (True, "", "")
    d = ps.check(peer, port, req(**kw))
    return (d.allowed, d.policy, d.audit)


def allow(name: str, *rules: dict) -> dict:
    return {"name": name, "action": "ALLOW", "rules": list(rules)}


def deny(name: str, *rules: dict) -> dict:
    return {"name": name, "action": "DENY", "rules": list(rules)}


def audit(name: str, *rules: dict) -> dict:
    return {"name": name, "action": "AUDIT", "rules": list(rules)}


def src(**fields) -> dict:
    return {"from": [{k: [_m(v) for v in vs] for k, vs in fields.items()}]}


def op(**fields) -> dict:
    out = {}
    for k, vs in fields.items():
        out[k] = list(vs) if k.endswith("ports") else [_m(v) for v in vs]
    return {"to": [out]}


def _m(v: str) -> dict:
    """Istio's string form: "*" presence, "x*" prefix, "*x" suffix, else exact."""
    if v == "*":
        return {"presence": True}
    if v.endswith("*"):
        return {"prefix": v[:-1]}
    if v.startswith("*"):
        return {"suffix": v[1:]}
    return {"exact": v}


# -- evaluation order ---------------------------------------------------------------------------------


def test_no_policy_compiles_to_nothing():
    assert policies() is None


def test_only_deny_policies_allow_the_rest():
    ps = policies(deny("ns/no-delete", op(methods=["DELETE"])))
    assert decide(ps, method="GET") == (True, "", "")
    assert decide(ps, method="DELETE") == (False, "ns/no-delete", "")


def test_default_deny_once_an_allow_policy_exists():
    ps = policies(allow("ns/web-only", src(principals=["cluster.local/ns/shop/sa/web"])))
    assert decide(ps) == (True, "ns/web-only", "")
    assert decide(ps, peer=ADMIN) == (False, "", "")
    assert decide(ps, peer=None) == (False, "", "")


def test_deny_takes_precedence_over_allow():
    ps = policies(
        allow("ns/all", {}),
        deny("ns/no-admin-path", op(paths=["/admin*"])),
    )
    assert decide(ps, path="/x") == (True, "ns/all", "")
    assert decide(ps, path="/admin/users") == (False, "ns/no-admin-path", "")


def test_allow_nothing_and_a_policy_without_rules():
    # An ALLOW policy with no rules matches nothing: it denies everything.
    assert decide(policies(allow("ns/allow-nothing"))) == (False, "", "")
    # A DENY policy with no rules never matches.
    assert decide(policies(deny("ns/deny-none"))) == (True, "", "")
    # A rule with nothing in it matches every request.
    assert decide(policies(deny("ns/deny-all", {}))) == (False, "ns/deny-all", "")


def test_audit_marks_without_deciding():
    ps = policies(audit("ns/audit-writes", op(methods=["POST", "PUT"])))
    assert decide(ps, method="POST") == (True, "", "ns/audit-writes")
    assert decide(ps, method="GET") == (True, "", "")
    ps = policies(
        audit("ns/audit", {}), deny("ns/deny", op(methods=["DELETE"])), allow("ns/allow", op(methods=["GET"]))
    )
    assert decide(ps, method="DELETE") == (False, "ns/deny", "ns/audit")
    assert decide(ps, method="GET") == (True, "ns/allow", "ns/audit")
    assert decide(ps, method="PUT") == (False, "", "ns/audit")


def test_any_rule_of_a_policy_and_first_matching_policy_name():
    ps = policies(
        allow("ns/a", op(paths=["/a"]), op(paths=["/b"])),
        allow("ns/c", op(paths=["/c"])),
    )
    assert decide(ps, path="/b") == (True, "ns/a", "")
    assert decide(ps, path="/c") == (True, "ns/c", "")
    assert decide(ps, path="/d") == (False, "", "")


def test_denial_details():
    d = policies(deny("ns/x", {})).check(WEB, PORT, req())
    assert d.details == "rbac_access_denied_matched_policy[ns/x]"
    d = policies(allow("ns/y", op(paths=["/nope"]))).check(WEB, PORT, req())
    assert d.details == "rbac_access_denied_matched_policy[none]"
    assert authz.DENIED[:3] == ("RBAC", 7, 403)


# -- sources ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "peer", "allowed"),
    [
        ({"principals": ["cluster.local/ns/shop/sa/web"]}, WEB, True),
        ({"principals": ["cluster.local/ns/shop/sa/web"]}, ADMIN, False),
        ({"principals": ["cluster.local/ns/shop/*"]}, WEB, True),
        ({"principals": ["*/sa/admin"]}, ADMIN, True),
        ({"principals": ["*"]}, WEB, True),
        ({"principals": ["*"]}, None, False),  # plaintext: no principal to match
        ({"not_principals": ["cluster.local/ns/shop/sa/web"]}, WEB, False),
        ({"not_principals": ["cluster.local/ns/shop/sa/web"]}, ADMIN, True),
        ({"not_principals": ["*"]}, None, True),  # plaintext: not_ always holds
        ({"namespaces": ["shop"]}, WEB, True),
        ({"namespaces": ["shop"]}, ADMIN, False),
        ({"namespaces": ["sh*"]}, WEB, True),
        ({"namespaces": ["shop"]}, None, False),
        ({"not_namespaces": ["shop"]}, ADMIN, True),
        ({"not_namespaces": ["shop"]}, WEB, False),
        ({"principals": ["cluster.local/ns/shop/sa/web"], "namespaces": ["ops"]}, WEB, False),  # all fields
        ({"principals": ["cluster.local/ns/ops/sa/admin", "cluster.local/ns/shop/sa/web"]}, WEB, True),  # any value
    ],
)
def test_sources(fields, peer, allowed):
    assert decide(policies(allow("ns/p", src(**fields))), peer=peer)[0] is allowed


def test_any_source_entry_is_enough():
    rule = {"from": [{"namespaces": [_m("ops")]}, {"principals": [_m("cluster.local/ns/shop/sa/web")]}]}
    ps = policies(allow("ns/p", rule))
    assert decide(ps, peer=WEB)[0] and decide(ps, peer=ADMIN)[0]
    assert not decide(ps, peer=Peer("spiffe://cluster.local/ns/x/sa/y"))[0]


# -- operations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "request_kw", "allowed"),
    [
        ({"paths": ["/shop.Cart/Get"]}, {}, True),
        ({"paths": ["/shop.Cart/*"]}, {}, True),  # a gRPC service
        ({"paths": ["/shop.Cart/Get"]}, {"path": "/shop.Cart/Put"}, False),  # a gRPC method
        ({"paths": ["*/Get"]}, {}, True),
        ({"paths": ["/api"]}, {"path": "/api?x=1"}, True),  # the query string is not part of the path
        ({"paths": ["/public/*"]}, {"path": "/public/../admin"}, False),  # dot segments resolved
        ({"not_paths": ["/admin*"]}, {"path": "/public/../admin"}, False),
        ({"not_paths": ["/admin*"]}, {"path": "/public/x"}, True),
        ({"methods": ["GET"]}, {"method": "GET"}, True),
        ({"methods": ["GET"]}, {"method": "POST"}, False),
        ({"not_methods": ["DELETE"]}, {"method": "DELETE"}, False),
        ({"hosts": ["CART.shop:8080"]}, {}, True),  # hosts: case-insensitive
        ({"hosts": ["*.shop:8080"]}, {"host": "Cart.Shop:8080"}, True),
        ({"hosts": ["cart.shop"]}, {}, False),
        ({"not_hosts": ["cart*"]}, {}, False),
        ({"ports": [8080]}, {}, True),
        ({"ports": [9090]}, {}, False),
        ({"not_ports": [8080]}, {}, False),
        ({"not_ports": [9090]}, {}, True),
        ({"paths": ["/shop.Cart/Get"], "methods": ["GET"]}, {}, False),  # all fields
    ],
)
def test_operations(fields, request_kw, allowed):
    assert decide(policies(allow("ns/p", op(**fields))), **request_kw)[0] is allowed


def test_from_and_to_must_both_hold():
    rule = {**src(namespaces=["shop"]), **op(paths=["/shop.Cart/*"])}
    ps = policies(allow("ns/p", rule))
    assert decide(ps)[0]
    assert not decide(ps, peer=ADMIN)[0]
    assert not decide(ps, path="/other.Svc/M")[0]


# -- conditions ---------------------------------------------------------------------------------------


def when(attribute: str, values=(), not_values=(), header: str = "") -> dict:
    c = {"attribute": attribute, "values": [_m(v) for v in values], "not_values": [_m(v) for v in not_values]}
    if header:
        c["header"] = header
    return {"when": [c]}


@pytest.mark.parametrize(
    ("condition", "request_kw", "peer", "allowed"),
    [
        (when("REQUEST_HEADER", ["v1"], header="x-version"), {"headers": (("x-version", "v1"),)}, WEB, True),
        (when("REQUEST_HEADER", ["v1"], header="x-version"), {"headers": (("x-version", "v2"),)}, WEB, False),
        # Several values of one header: one matching is enough.
        (
            when("REQUEST_HEADER", ["v1"], header="x-version"),
            {"headers": (("x-version", "v2"), ("x-version", "v1"))},
            WEB,
            True,
        ),
        (when("REQUEST_HEADER", ["*"], header="x-token"), {}, WEB, False),  # absent: fails values
        (when("REQUEST_HEADER", not_values=["bad"], header="x-token"), {}, WEB, True),  # absent: holds not_values
        (
            when("REQUEST_HEADER", not_values=["bad*"], header="x-token"),
            {"headers": (("x-token", "bad-1"),)},
            WEB,
            False,
        ),
        (when("SOURCE_PRINCIPAL", ["cluster.local/ns/shop/sa/web"]), {}, WEB, True),
        (when("SOURCE_PRINCIPAL", ["*"]), {}, None, False),
        (when("SOURCE_NAMESPACE", ["ops"]), {}, ADMIN, True),
        (when("SOURCE_NAMESPACE", not_values=["ops"]), {}, ADMIN, False),
        (when("DESTINATION_PORT", ["8080"]), {}, WEB, True),
        (when("DESTINATION_PORT", ["80*"]), {}, WEB, True),
        (when("DESTINATION_PORT", ["9090"]), {}, WEB, False),
    ],
)
def test_conditions(condition, request_kw, peer, allowed):
    assert decide(policies(allow("ns/p", condition)), peer=peer, **request_kw)[0] is allowed


def test_every_condition_must_hold():
    rule = {
        "when": [
            {"attribute": "REQUEST_HEADER", "header": "x-a", "values": [_m("1")]},
            {"attribute": "REQUEST_HEADER", "header": "x-b", "values": [_m("2")]},
        ]
    }
    ps = policies(allow("ns/p", rule))
    assert decide(ps, headers=(("x-a", "1"), ("x-b", "2")))[0]
    assert not decide(ps, headers=(("x-a", "1"),))[0]


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/a/b", "/a/b"),
        (b"/a/./b", "/a/b"),
        (b"/a/../b", "/b"),
        (b"/../../b", "/b"),
        (b"/a/%2e%2e/b", "/b"),
        (b"/a/b/..", "/a/"),
        (b"/a?x=/../y", "/a"),
        (b"/a#frag", "/a"),
        (None, ""),
    ],
)
def test_normalize_path(raw, normal):
    assert authz.normalize_path(raw) == normal
