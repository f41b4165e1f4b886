"""The compiled route table: authority precedence, every match kind, first match wins, exact weighted splits."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshproxy import config, lb, routing
from meshproxy.config import ConfigError
from meshproxy.routing import RouteTable, grpc_service_method

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sidecar.yaml"
GRPC = [(b"content-type", b"application/grpc")]

CLUSTERS = [
    {
        "name": "c",
        "endpoints": [
            {"address": "10.0.0.1:80", "labels": {"v": "1"}},
            {"address": "10.0.0.2:80", "labels": {"v": "2"}},
        ],
        "subsets": [{"name": "v1", "labels": {"v": "1"}}, {"name": "v2", "labels": {"v": "2"}}],
    },
    {"name": "d", "endpoints": [{"address": "10.0.0.3:80"}]},
]


def to(cluster: str = "c", **extra) -> dict:
    """A route action to one cluster."""
    return {"clusters": [{"cluster": cluster}], **extra}


def table(virtual_hosts: list[dict], clusters: list[dict] = CLUSTERS) -> RouteTable:
    cfg = config.from_dict(
        {"listeners": [{"name": "l", "address": "127.0.0.1:0", "virtual_hosts": virtual_hosts}], "clusters": clusters}
    )
    return RouteTable.compile(cfg.listeners[0], cfg.clusters)


def routes_table(*routes: dict) -> RouteTable:
    """One catch-all virtual host with these routes, named r0, r1, ... unless named."""
    named = [{"name": f"r{i}", **r} if "name" not in r else r for i, r in enumerate(routes)]
    return table([{"name": "all", "domains": ["*"], "routes": named}])


def name_of(
    t: RouteTable, path: bytes = b"/", method: bytes = b"GET", headers=(), authority: bytes = b"x"
) -> str | None:
    r = t.match(authority, path, method, list(headers))
    return None if r is None else r.name


# --- authority --------------------------------------------------------------------


def hosts_table() -> RouteTable:
    vhosts = [
        ("exact", ["api.example.com"]),
        ("exact-port", ["api.example.com:8080"]),
        ("wild", ["*.example.com"]),
        ("wild-longer", ["*.eu.example.com"]),
        ("wild-port", ["*.example.com:9090"]),
        ("v6", ["[::1]"]),
        ("any", ["*"]),
    ]
    return table([{"name": n, "domains": ds, "routes": [{"name": n, "route": to()}]} for n, ds in vhosts])


@pytest.mark.parametrize(
    ("authority", "vhost"),
    [
        (b"api.example.com", "exact"),
        (b"API.Example.COM", "exact"),
        (b"api.example.com:443", "exact"),  # a domain without a port matches any port
        (b"api.example.com:8080", "exact-port"),  # ...but one with the port wins
        (b"API.EXAMPLE.COM:8080", "exact-port"),
        (b"www.example.com", "wild"),
        (b"a.b.example.com:1", "wild"),
        (b"x.eu.example.com", "wild-longer"),  # longest suffix first
        (b"x.EU.example.com:8080", "wild-longer"),
        (b"www.example.com:9090", "wild-port"),  # equal suffix: the one with the port first
        (b"x.eu.example.com:9090", "wild-longer"),  # a longer suffix beats a port
        (b"example.com", "any"),  # "*." needs at least one character before the suffix
        (b".example.com", "any"),
        (b"[::1]", "v6"),
        (b"[::1]:8080", "v6"),
        (b"[::2]:8080", "any"),
        (b"other", "any"),
        (b"", "any"),
    ],
)
def test_authority_precedence(authority, vhost):
    r = hosts_table().match(authority, b"/", b"GET", [])
    assert r is not None and r.virtual_host == vhost


def test_port_specific_domain_only_matches_that_port():
    t = table([{"name": "p", "domains": ["api:8080"], "routes": [{"route": to()}]}])
    assert t.match(b"api:8080", b"/", b"GET", []) is not None
    assert t.match(b"api:8081", b"/", b"GET", []) is None
    assert t.match(b"api", b"/", b"GET", []) is None


def test_no_catch_all_means_no_route():
    t = table([{"name": "a", "domains": ["a", "*.a"], "routes": [{"route": to()}]}])
    assert t.match(b"b", b"/", b"GET", []) is None
    assert t.match(b"x.a", b"/", b"GET", []) is not None


def test_domains_in_config_are_case_insensitive():
    t = table([{"name": "a", "domains": ["API.Example.com", "*.WILD.io"], "routes": [{"route": to()}]}])
    assert t.match(b"api.example.com", b"/", b"GET", []) is not None
    assert t.match(b"x.wild.IO", b"/", b"GET", []) is not None


def test_the_authority_cache_stays_bounded_and_correct():
    t = hosts_table()
    for i in range(3 * routing._CACHE_MAX):
        host = b"h%d.example.com" % i if i % 2 else b"h%d.other" % i
        assert t.match(host, b"/", b"GET", []).virtual_host == ("wild" if i % 2 else "any")
        assert len(t._cache) <= routing._CACHE_MAX
    assert t.match(b"api.example.com", b"/", b"GET", []).virtual_host == "exact"


# --- paths ------------------------------------------------------------------------------


def test_prefix_sees_the_whole_path():
    t = routes_table({"match": {"prefix": "/api/"}, "route": to()})
    assert name_of(t, b"/api/") == "r0"
    assert name_of(t, b"/api/x?y=1") == "r0"
    assert name_of(t, b"/api") is None
    assert name_of(t, b"/API/x") is None  # paths are case-sensitive


def test_exact_path_ignores_the_query():
    t = routes_table({"match": {"path": "/a"}, "route": to()})
    assert name_of(t, b"/a") == "r0"
    assert name_of(t, b"/a?x=1") == "r0"
    assert name_of(t, b"/a/") is None
    assert name_of(t, b"/ab") is None


def test_regex_must_match_the_whole_path_without_query():
    t = routes_table({"match": {"regex": "/v[0-9]+/items"}, "route": to()})
    assert name_of(t, b"/v12/items") == "r0"
    assert name_of(t, b"/v12/items?page=2") == "r0"
    assert name_of(t, b"/v12/items/3") is None  # a search would match; fullmatch does not
    assert name_of(t, b"/x/v12/items") is None


def test_empty_match_matches_everything():
    t = routes_table({"route": to()})
    assert name_of(t, b"/anything?at=all", b"DELETE") == "r0"


# --- gRPC -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/pkg.Service/Method", (b"pkg.Service", b"Method")),
        (b"/Svc/M", (b"Svc", b"M")),
        (b"/pkg.Service/", None),
        (b"/pkg.Service", None),
        (b"//Method", None),
        (b"pkg.Service/Method", None),
        (b"/a/b/c", None),
        (b"/a/b?x", None),
        (b"/", None),
        (b"", None),
    ],
)
def test_grpc_service_method(path, expected):
    assert grpc_service_method(path) == expected


def grpc_table() -> RouteTable:
    return routes_table(
        {"name": "get", "match": {"grpc": {"service": "pkg.Svc", "method": "Get"}}, "route": to()},
        {"name": "svc", "match": {"grpc": {"service": "pkg.Svc"}}, "route": to()},
        {"name": "any-grpc", "match": {"grpc": {}}, "route": to()},
        {"name": "rest", "route": to()},
    )


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [
        (b"/pkg.Svc/Get", b"application/grpc", "get"),
        (b"/pkg.Svc/Get", b"application/grpc+proto", "get"),
        (b"/pkg.Svc/List", b"application/grpc", "svc"),  # service only: any method
        (b"/pkg.Svc/GetMore", b"application/grpc", "svc"),
        (b"/pkg.SvcX/Get", b"application/grpc", "any-grpc"),  # a longer service name is another service
        (b"/pkg.Svc/", b"application/grpc", "any-grpc"),
        (b"/pkg.Svc/Get/x", b"application/grpc", "any-grpc"),
        (b"/other.Svc/Get", b"application/grpc;charset=utf-8", "any-grpc"),
        (b"/pkg.Svc/Get", b"application/json", "rest"),  # not a gRPC request
        (b"/pkg.Svc/Get", b"application/grpc-web", "rest"),
        (b"/pkg.Svc/Get", None, "rest"),
    ],
)
@pytest.mark.parametrize("crumbs", [[], [(b"x", b"1"), (b"x", b"2")]], ids=["unique", "repeated"])
def test_grpc_matches(path, content_type, expected, crumbs):
    headers = [(b":method", b"POST"), (b":path", path), *crumbs]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    assert name_of(grpc_table(), path, b"POST", headers) == expected


# --- headers and method --------------------------------------------------------


def header_route(**hm) -> RouteTable:
    return routes_table({"match": {"headers": [{"name": "x-user", **hm}]}, "route": to()})


@pytest.mark.parametrize(
    ("hm", "headers", "matches"),
    [
        ({"exact": "bob"}, [(b"x-user", b"bob")], True),
        ({"exact": "bob"}, [(b"x-user", b"bobby")], False),
        ({"exact": "bob"}, [(b"x-user", b"BOB")], False),  # values are case-sensitive
        ({"exact": "bob"}, [(b"x-user", b"al"), (b"x-user", b"bob")], True),  # any value of the name
        ({"exact": "bob"}, [(b"x-other", b"bob")], False),
        ({"prefix": "bo"}, [(b"x-user", b"bob")], True),
        ({"prefix": "bo"}, [(b"x-user", b"abo")], False),
        ({"regex": "b.b"}, [(b"x-user", b"bob")], True),
        ({"regex": "b.b"}, [(b"x-user", b"bobby")], False),  # fullmatch
        ({"regex": "o"}, [(b"x-user", b"bob")], False),
        ({"present": True}, [(b"x-user", b"")], True),
        ({"present": True}, [], False),
        ({}, [(b"x-user", b"x")], True),  # no condition: present
        ({}, [], False),
        ({"present": False}, [], True),  # absent
        ({"present": False}, [(b"x-user", b"x")], False),
        ({"exact": "bob", "invert": True}, [(b"x-user", b"al")], True),
        ({"exact": "bob", "invert": True}, [(b"x-user", b"bob")], False),
        ({"exact": "bob", "invert": True}, [], True),  # absent: the condition does not hold
        ({"regex": "a+", "invert": True}, [(b"x-user", b"aaa")], False),
        ({"prefix": "a", "invert": True}, [(b"x-user", b"ba")], True),
        ({"present": True, "invert": True}, [], True),
        ({"present": False, "invert": True}, [(b"x-user", b"x")], True),
        ({"present": False, "invert": True}, [], False),
    ],
)
@pytest.mark.parametrize("crumbs", [[], [(b"cookie", b"a=1"), (b"cookie", b"b=2")]], ids=["unique", "repeated"])
def test_header_matches(hm, headers, matches, crumbs):
    # A name that repeats (cookie crumbs) makes match() scan the list instead of using a dict: both must agree.
    assert (name_of(header_route(**hm), headers=crumbs + headers) == "r0") is matches


def test_header_names_are_case_insensitive_in_config_and_pseudo_headers_match():
    t = routes_table(
        {
            "match": {"headers": [{"name": "X-User", "exact": "bob"}, {"name": ":scheme", "exact": "https"}]},
            "route": to(),
        }
    )
    assert name_of(t, headers=[(b":scheme", b"https"), (b"x-user", b"bob")]) == "r0"
    assert name_of(t, headers=[(b":scheme", b"http"), (b"x-user", b"bob")]) is None


def test_all_header_conditions_must_hold():
    t = routes_table(
        {"match": {"headers": [{"name": "a", "exact": "1"}, {"name": "b", "present": False}]}, "route": to()}
    )
    assert name_of(t, headers=[(b"a", b"1")]) == "r0"
    assert name_of(t, headers=[(b"a", b"1"), (b"b", b"")]) is None
    assert name_of(t, headers=[(b"a", b"2")]) is None


def test_method():
    t = routes_table({"match": {"method": "POST"}, "route": to()})
    assert name_of(t, method=b"POST") == "r0"
    assert name_of(t, method=b"GET") is None
    assert name_of(t, method=b"post") is None


def test_every_condition_of_a_route_must_hold():
    t = routes_table(
        {
            "match": {"prefix": "/p", "method": "POST", "grpc": {}, "headers": [{"name": "x", "exact": "1"}]},
            "route": to(),
        }
    )
    ok = [(b"content-type", b"application/grpc"), (b"x", b"1")]
    assert name_of(t, b"/p.S/M", b"POST", ok) == "r0"
    assert name_of(t, b"/q.S/M", b"POST", ok) is None
    assert name_of(t, b"/p.S/M", b"GET", ok) is None
    assert name_of(t, b"/p.S/M", b"POST", ok[:1]) is None
    assert name_of(t, b"/p.S/M", b"POST", ok[1:]) is None


# --- order ----------------------------------------------------------------------------


def test_first_match_wins():
    specific = {"name": "specific", "match": {"prefix": "/api/v2/"}, "route": to("d")}
    general = {"name": "general", "match": {"prefix": "/api/"}, "route": to()}
    assert name_of(routes_table(specific, general), b"/api/v2/x") == "specific"
    assert name_of(routes_table(general, specific), b"/api/v2/x") == "general"
    assert name_of(routes_table(specific, general), b"/api/v1/x") == "general"


def test_virtual_hosts_keep_their_own_routes():
    t = table(
        [
            {"name": "a", "domains": ["a"], "routes": [{"name": "ra", "match": {"prefix": "/only-a"}, "route": to()}]},
            {"name": "b", "domains": ["*"], "routes": [{"name": "rb", "route": to("d")}]},
        ]
    )
    assert t.match(b"a", b"/only-a", b"GET", []).name == "ra"
    # Authority picks the virtual host first: no fall-through to another host's routes.
    assert t.match(b"a", b"/other", b"GET", []) is None
    assert t.match(b"b", b"/only-a", b"GET", []).name == "rb"


# --- splits -----------------------------------------------------------------------------

TWINS = ["py"] if os.environ.get("MESHPROXY_NO_EXTENSIONS") else ["py", "c"]


@pytest.fixture(params=TWINS)
def twin_balancer(request, monkeypatch):
    mod = lb.pure() if request.param == "py" else lb.compiled()
    if mod is None:
        pytest.fail("compiled balancer not built: run `pip install -e .` (or `make test`)")
    monkeypatch.setattr(routing, "balancer", mod)
    return mod


def split_route(*targets: tuple[str, str, int]):
    t = routes_table({"route": {"clusters": [{"cluster": c, "subset": s, "weight": w} for c, s, w in targets]}})
    return t.match(b"x", b"/", b"GET", [])


def test_80_20_split_over_clusters_is_exact(twin_balancer):
    r = split_route(("c", "", 80), ("d", "", 20))
    assert Counter(r.pick() for _ in range(10_000)) == {("c", ""): 8000, ("d", ""): 2000}


def test_80_20_split_over_subsets_is_exact_and_interleaved(twin_balancer):
    r = split_route(("c", "v1", 80), ("c", "v2", 20))
    picks = [r.pick() for _ in range(10_000)]
    assert Counter(picks) == {("c", "v1"): 8000, ("c", "v2"): 2000}
    # Smooth WRR: every window of 5 consecutive picks has exactly one v2.
    assert all(picks[i : i + 5].count(("c", "v2")) == 1 for i in range(0, 10_000, 5))
    assert r.clusters == (("c", "v1", 80), ("c", "v2", 20))


def test_three_way_split_and_weight_0(twin_balancer):
    r = split_route(("c", "v1", 5), ("c", "v2", 3), ("d", "", 2), ("c", "", 0))
    assert Counter(r.pick() for _ in range(1000)) == {("c", "v1"): 500, ("c", "v2"): 300, ("d", ""): 200}


def test_one_cluster_skips_the_balancer(monkeypatch):
    def no_split(weights):
        raise AssertionError("a single-cluster route must not build a WeightedSplit")

    monkeypatch.setattr(routing, "balancer", SimpleNamespace(WeightedSplit=no_split))
    r = split_route(("c", "v2", 0))
    assert {r.pick() for _ in range(10)} == {("c", "v2")}
    with pytest.raises(AssertionError):
        split_route(("c", "v1", 1), ("c", "v2", 1))


# --- what a route carries ----------------------------------------------------------------


def test_direct_response():
    t = routes_table(
        {"name": "plain", "match": {"path": "/plain"}, "direct_response": {"status": 404, "body": "nope"}},
        {
            "name": "grpc",
            "direct_response": {"status": 503, "body": "down", "grpc_status": 14, "grpc_message": "maintenance"},
        },
    )
    plain = t.match(b"x", b"/plain", b"GET", [])
    assert plain.direct_response == routing.DirectResponse(404, b"nope", None, "")
    grpc = t.match(b"x", b"/pkg.S/M", b"POST", GRPC)
    assert grpc.direct_response == (503, b"down", 14, "maintenance")
    assert isinstance(grpc.direct_response.body, bytes)
    with pytest.raises(LookupError):
        grpc.pick()
    # grpc_status 0 (OK) is a value, not "unset".
    ok = routes_table({"direct_response": {"status": 200, "grpc_status": 0}}).match(b"x", b"/", b"GET", [])
    assert ok.direct_response.grpc_status == 0


def test_forwarding_route_has_no_direct_response():
    r = routes_table({"route": to()}).match(b"x", b"/", b"GET", [])
    assert r.direct_response is None
    assert (r.authority_rewrite, r.hash_header, r.timeout_s) == (None, None, None)


@pytest.mark.parametrize(("timeout", "expected"), [(None, None), ("0s", None), ("2.5s", 2.5), ("0.001s", 0.001)])
def test_timeout_s(timeout, expected):
    route = {"route": to()} if timeout is None else {"route": to(), "timeout": timeout}
    assert routes_table(route).match(b"x", b"/", b"GET", []).timeout_s == expected


def test_authority_rewrite_and_hash_header_are_bytes():
    r = routes_table({"route": to(authority_rewrite="inner.svc:8080", hash_header="X-User")}).match(
        b"x", b"/", b"GET", []
    )
    assert r.authority_rewrite == b"inner.svc:8080"
    assert r.hash_header == b"x-user"


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        ({"prefix": "/api/"}, "/", b"/api/items?x=1", b"/items?x=1"),
        ({"prefix": "/api"}, "/v2", b"/api/items", b"/v2/items"),
        ({"prefix": "/"}, "/base/", b"/x", b"/base/x"),
        ({"path": "/old"}, "/new", b"/old", b"/new"),
        ({"path": "/old"}, "/new", b"/old?q=1", b"/new?q=1"),  # the query is kept
        ({"prefix": "/api/"}, None, b"/api/x", b"/api/x"),
    ],
)
def test_rewrite_path(match, rewrite, path, expected):
    action = to() if rewrite is None else to(prefix_rewrite=rewrite)
    r = routes_table({"match": match, "route": action}).match(b"x", path, b"GET", [])
    assert r.rewrite_path(path) == expected


# --- compile ------------------------------------------------------------------------------


def test_compile_refuses_a_route_to_an_unknown_cluster():
    cfg = config.from_dict(
        {
            "listeners": [
                {
                    "name": "l",
                    "address": "127.0.0.1:0",
                    "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"route": to("gone")}]}],
                }
            ]
        },
        check=False,
    )
    with pytest.raises(ConfigError) as info:
        RouteTable.compile(cfg.listeners[0], [])
    assert (
        str(info.value) == "virtual_hosts[0].routes[0].route.clusters[0].cluster: no cluster named 'gone' (known: none)"
    )


def test_the_example_file_routes():
    cfg = config.load_file(EXAMPLE)
    t = RouteTable.compile(cfg.listeners[0], cfg.clusters)
    assert t.listener == "outbound"
    tester = [*GRPC, (b"x-user", b"tester")]
    assert t.match(b"ratings:9080", b"/bookinfo.Ratings/Get", b"POST", tester).name == "ratings-testers"
    canary = t.match(b"Ratings", b"/bookinfo.Ratings/Get", b"POST", GRPC)
    assert canary.name == "ratings-canary"
    assert Counter(canary.pick() for _ in range(100)) == {("ratings", "v1"): 80, ("ratings", "v2"): 20}
    assert t.match(b"ratings", b"/", b"GET", []).direct_response.status == 415
    details = t.match(b"details:9080", b"/api/v1/book/1", b"GET", [])
    assert (details.name, details.rewrite_path(b"/api/v1/book/1")) == ("details-api", b"/book/1")
    assert t.match(b"details:9080", b"/admin", b"GET", []).direct_response.grpc_status == 14
    # details is only on port 9080: elsewhere the catch-all takes it.
    assert t.match(b"details", b"/api/v1/book/1", b"GET", []).virtual_host == "passthrough"
