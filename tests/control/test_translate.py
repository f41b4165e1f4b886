"""control.translate: a Model -> the exact SidecarConfig of each sidecar scope.

Every config built here is checked with the sidecar's own ``meshproxy.config.validate`` (and
read back through ``from_dict``), because a config the sidecar refuses is a NACK on every pod.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.model import parse
from control.sources.files import read_file
from control.translate import OUTBOUND_ADDRESS, Translator, cluster_name, version_of
from meshproxy.config import from_dict, to_dict, validate
from meshproxy.config.v1 import config_pb2 as pb
from meshproxy.telemetry.labels import NAMESPACE_KEY, WORKLOAD_KEY

DATA = Path(__file__).parent / "data"
FQDN = "reviews.default.svc.cluster.local"


# -- helpers ------------------------------------------------------------------------------------


def assert_valid(cfg: pb.SidecarConfig) -> None:
    """The sidecar would ACK ``cfg``: it validates, and its YAML/JSON form reads back to the same message."""
    validate(cfg)
    again = from_dict(to_dict(cfg))
    assert again == cfg


def translator(*objs, **kwargs) -> Translator:
    return Translator(parse([(o, "mesh.yaml") for o in objs]), **kwargs)


def config(t: Translator, namespace: str = "default", labels: dict | None = None) -> dict:
    """The config's dict form, checked, without its version (a digest, tested on its own)."""
    cfg = t.config(namespace, labels or {})
    assert_valid(cfg)
    assert cfg.version == version_of(_without_version(cfg))
    d = to_dict(cfg)
    del d["version"]
    return d


def _without_version(cfg: pb.SidecarConfig) -> pb.SidecarConfig:
    c = pb.SidecarConfig()
    c.CopyFrom(cfg)
    c.ClearField("version")
    return c


def problems(t: Translator) -> list[tuple[str, str, str, str]]:
    return [(p.severity, p.resource, p.path, p.message) for p in t.problems]


def istio(kind: str, name: str, spec: dict, ns: str = "default") -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def kube_service(name: str, ns: str = "default", ports=((9080, "http"),), annotations=None, selector=None) -> dict:
    meta = {"name": name, "namespace": ns} | ({"annotations": annotations} if annotations else {})
    spec = {"ports": [{"port": p, "name": n} if n else {"port": p} for p, n in ports]}
    spec["selector"] = selector or {"app": name}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def pod(name: str, ip: str, ns: str = "default", **labels) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "status": {"podIP": ip},
    }


def service_entry(host: str = "reviews.local", ns: str = "default", name: str = "reviews", **spec) -> dict:
    base = {
        "hosts": [host],
        "resolution": "STATIC",
        "ports": [{"number": 9080, "name": "grpc", "protocol": "GRPC"}],
        "endpoints": [
            {"address": "127.0.0.1", "ports": {"grpc": 50051}, "labels": {"version": "v1"}},
            {"address": "127.0.0.1", "ports": {"grpc": 50052}, "labels": {"version": "v2"}},
        ],
    }
    return istio("ServiceEntry", name, base | spec, ns)


def destination_rule(host: str = "reviews.local", ns: str = "default", name: str = "reviews", **spec) -> dict:
    base = {"host": host, "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}
    return istio("DestinationRule", name, base | spec, ns)


def virtual_service(http: list, hosts=("reviews.local",), ns: str = "default", name: str = "reviews", **spec) -> dict:
    return istio("VirtualService", name, {"hosts": list(hosts), "http": http} | spec, ns)


def split(host: str = "reviews.local", **weights) -> dict:
    return {"route": [{"destination": {"host": host, "subset": s}, "weight": w} for s, w in weights.items()]}


def to(host: str = "reviews.local", subset: str = "", **extra) -> dict:
    dest = {"host": host} | ({"subset": subset} if subset else {})
    return {"route": [{"destination": dest}]} | extra


def listener(*virtual_hosts) -> dict:
    out = {"name": "outbound", "address": OUTBOUND_ADDRESS}
    if virtual_hosts:
        out["virtual_hosts"] = list(virtual_hosts)
    return out


def vhost(name: str, domains: list[str], *routes) -> dict:
    return {"name": name, "domains": domains, "routes": list(routes)}


#: Istio's default retry policy: on every forwarding route whose VirtualService gives no retries.
DEFAULT_RETRY = {
    "num_retries": 2,
    "retry_on": ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes", "503"],
}


def default_route(cluster: str) -> dict:
    return {
        "name": "default",
        "match": {"prefix": "/"},
        "route": {"clusters": [{"cluster": cluster}]},
        "retry_policy": DEFAULT_RETRY,
    }


def fwd(name: str, *clusters: dict, match: dict | None = None, **extra) -> dict:
    """A route (from a VirtualService without retries) forwarding to ``clusters``."""
    route = {"name": name} | ({"match": match} if match is not None else {})
    return route | {"route": {"clusters": list(clusters)}, "retry_policy": DEFAULT_RETRY} | extra


def wc(cluster: str, subset: str = "", weight: int = 0) -> dict:
    return {"cluster": cluster} | ({"subset": subset} if subset else {}) | ({"weight": weight} if weight else {})


DEMO_CLUSTER = "outbound|9080||reviews.local"
DEMO_ENDPOINTS = [
    {"address": "127.0.0.1:50051", "labels": {"version": "v1"}},
    {"address": "127.0.0.1:50052", "labels": {"version": "v2"}},
]
V1_V2 = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]


def demo_cluster(**extra) -> dict:
    return {"name": DEMO_CLUSTER, "endpoints": DEMO_ENDPOINTS, "subsets": V1_V2} | extra


def demo_vhost(*routes) -> dict:
    return vhost("reviews.local:9080", ["reviews.local:9080", "reviews.local"], *routes)


# -- the demo -----------------------------------------------------------------------------------


def test_demo_service_entry_destination_rule_and_canary():
    t = translator(service_entry(), destination_rule(), virtual_service([split(v1=80, v2=20)]))
    assert t.problems == []
    assert config(t) == {
        "listeners": [
            listener(demo_vhost(fwd("default/reviews/0", wc(DEMO_CLUSTER, "v1", 80), wc(DEMO_CLUSTER, "v2", 20))))
        ],
        "clusters": [demo_cluster()],
    }


def test_demo_fixture_file_is_the_same_config():
    objects, bad = read_file(DATA / "demo.yaml")
    assert bad == []
    from_file = Translator(parse([(o, "demo.yaml") for o in objects]))
    inline = translator(service_entry(), destination_rule(), virtual_service([split(v1=80, v2=20)]))
    assert from_file.config("default", {}) == inline.config("default", {})


def test_no_virtual_service_gives_the_default_route():
    t = translator(service_entry(), destination_rule())
    assert config(t) == {
        "listeners": [listener(demo_vhost(default_route(DEMO_CLUSTER)))],
        "clusters": [demo_cluster()],
    }


def test_empty_mesh_is_a_listener_without_hosts():
    assert config(translator()) == {"listeners": [listener()]}


def test_cluster_name():
    assert cluster_name("reviews.local", 9080) == "outbound|9080||reviews.local"


# -- Kubernetes Services: aliases and ports --------------------------------------------------------


#: The Pod's labels, and who it is (the sidecars' metric labels: meshproxy.telemetry.labels).
REVIEWS_LABELS = {"app": "reviews", "version": "v1", WORKLOAD_KEY: "r1", NAMESPACE_KEY: "default"}


def _reviews_objects():
    return [kube_service("reviews"), pod("r1", "10.0.0.1", app="reviews", version="v1")]


def test_kubernetes_aliases_in_the_same_namespace():
    t = translator(*_reviews_objects())
    cluster = f"outbound|9080||{FQDN}"
    assert config(t, "default") == {
        "listeners": [
            listener(
                vhost(
                    f"{FQDN}:9080",
                    [
                        f"{FQDN}:9080",
                        "reviews.default.svc:9080",
                        "reviews.default:9080",
                        "reviews:9080",
                        FQDN,
                        "reviews.default.svc",
                        "reviews.default",
                        "reviews",
                    ],
                    default_route(cluster),
                )
            )
        ],
        "clusters": [
            {
                "name": cluster,
                "endpoints": [{"address": "10.0.0.1:9080", "labels": REVIEWS_LABELS}],
            }
        ],
    }


def test_kubernetes_aliases_from_another_namespace_have_no_short_name():
    t = translator(*_reviews_objects())
    d = config(t, "shop")
    assert d["listeners"][0]["virtual_hosts"][0]["domains"] == [
        f"{FQDN}:9080",
        "reviews.default.svc:9080",
        "reviews.default:9080",
        FQDN,
        "reviews.default.svc",
        "reviews.default",
    ]


def test_multi_port_service_has_a_virtual_host_and_cluster_per_port_and_no_bare_domains():
    svc = kube_service("catalog", "shop", ports=((9090, "grpc"), (8080, "http")))
    t = translator(svc, pod("c0", "10.1.0.7", "shop", app="catalog"))
    host = "catalog.shop.svc.cluster.local"
    labels = {"app": "catalog", WORKLOAD_KEY: "c0", NAMESPACE_KEY: "shop"}
    assert config(t, "shop") == {
        "listeners": [
            listener(
                vhost(
                    f"{host}:9090",
                    [f"{host}:9090", "catalog.shop.svc:9090", "catalog.shop:9090", "catalog:9090"],
                    default_route(f"outbound|9090||{host}"),
                ),
                vhost(
                    f"{host}:8080",
                    [f"{host}:8080", "catalog.shop.svc:8080", "catalog.shop:8080", "catalog:8080"],
                    default_route(f"outbound|8080||{host}"),
                ),
            )
        ],
        "clusters": [
            {"name": f"outbound|8080||{host}", "endpoints": [{"address": "10.1.0.7:8080", "labels": labels}]},
            {"name": f"outbound|9090||{host}", "endpoints": [{"address": "10.1.0.7:9090", "labels": labels}]},
        ],
    }


def test_kube_fixture_ipv6_and_slices():
    objects, _ = read_file(DATA / "kube.yaml")
    t = Translator(parse([(o, "kube.yaml") for o in objects]))
    d = config(t, "shop")
    clusters = {c["name"]: c for c in d["clusters"]}
    assert sorted(clusters) == [
        "outbound|8080||catalog.shop.svc.cluster.local",
        "outbound|9080||ratings.shop.svc.cluster.local",
        f"outbound|9080||{FQDN}",
        "outbound|9090||catalog.shop.svc.cluster.local",
    ]
    assert [e["address"] for e in clusters[f"outbound|9080||{FQDN}"]["endpoints"]] == [
        "10.0.0.1:9080",
        "10.0.0.2:9080",
        "10.0.0.4:9080",
    ]
    # the UDP-only Service has no virtual host; ExternalName has none either
    names = [vh["name"] for vh in d["listeners"][0]["virtual_hosts"]]
    assert names == [
        "catalog.shop.svc.cluster.local:9090",
        "catalog.shop.svc.cluster.local:8080",
        "ratings.shop.svc.cluster.local:9080",
        f"{FQDN}:9080",
    ]
    # ratings is exported to shop and default only
    assert "ratings.shop.svc.cluster.local:9080" not in [
        vh["name"] for vh in config(t, "prod")["listeners"][0]["virtual_hosts"]
    ]


def test_ipv6_endpoints_are_bracketed():
    t = translator(kube_service("a"), pod("a0", "fd00::7", app="a"))
    assert config(t)["clusters"][0]["endpoints"] == [
        {"address": "[fd00::7]:9080", "labels": {"app": "a", WORKLOAD_KEY: "a0", NAMESPACE_KEY: "default"}}
    ]


# -- exportTo -----------------------------------------------------------------------------------


def _hosts(t: Translator, namespace: str) -> list[str]:
    return [vh["name"] for vh in config(t, namespace)["listeners"][0].get("virtual_hosts", [])]


@pytest.mark.parametrize(
    ("export_to", "visible_from"),
    [
        (None, {"default", "shop", "prod"}),
        (["*"], {"default", "shop", "prod"}),
        (["."], {"default"}),
        (["~"], set()),
        (["shop"], {"shop"}),
        ([".", "prod"], {"default", "prod"}),
    ],
)
def test_service_entry_export_to(export_to, visible_from):
    extra = {"exportTo": export_to} if export_to is not None else {}
    t = translator(service_entry(**extra))
    for ns in ("default", "shop", "prod"):
        assert _hosts(t, ns) == (["reviews.local:9080"] if ns in visible_from else []), ns


def test_service_export_to_annotation():
    t = translator(kube_service("ratings", "shop", annotations={"networking.istio.io/exportTo": "., default"}))
    assert _hosts(t, "shop") == ["ratings.shop.svc.cluster.local:9080"]
    assert _hosts(t, "default") == ["ratings.shop.svc.cluster.local:9080"]
    assert _hosts(t, "prod") == []


def test_default_export_to_dot():
    t = translator(
        service_entry(), service_entry("other.local", name="other", exportTo=["*"]), default_export_to=(".",)
    )
    assert _hosts(t, "default") == ["other.local:9080", "reviews.local:9080"]
    assert _hosts(t, "shop") == ["other.local:9080"]


def test_virtual_service_export_to_limits_who_uses_it():
    vs = virtual_service([split(v1=100)], exportTo=["."])
    t = translator(service_entry(), destination_rule(), vs)
    assert config(t, "default")["listeners"][0]["virtual_hosts"][0]["routes"] == [
        fwd("default/reviews/0", wc(DEMO_CLUSTER, "v1", 100))
    ]
    assert config(t, "shop")["listeners"][0]["virtual_hosts"][0]["routes"] == [default_route(DEMO_CLUSTER)]


# -- DestinationRule policies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lb", "expected"),
    [
        ({"simple": "ROUND_ROBIN"}, {"lb_policy": "ROUND_ROBIN"}),
        ({"simple": "LEAST_CONN"}, {"lb_policy": "LEAST_REQUEST"}),
        ({"simple": "LEAST_REQUEST"}, {"lb_policy": "LEAST_REQUEST"}),
        ({"simple": "RANDOM"}, {"lb_policy": "RANDOM"}),
        ({"simple": "UNSPECIFIED"}, {}),
        ({"consistentHash": {"httpHeaderName": "X-User"}}, {"lb_policy": "RING_HASH", "hash_header": "x-user"}),
    ],
)
def test_destination_rule_lb_policy(lb, expected):
    t = translator(service_entry(), destination_rule(trafficPolicy={"loadBalancer": lb}))
    assert config(t)["clusters"] == [demo_cluster(**expected)]


def test_destination_rule_connection_pool_and_retry_budget():
    policy = {
        "connectionPool": {
            "tcp": {"connectTimeout": "250ms", "maxConnections": 100},
            "http": {
                "idleTimeout": "1m30s",
                "maxConcurrentStreams": 50,
                "http1MaxPendingRequests": 10,
                "http2MaxRequests": 1000,
                "maxRetries": 3,
                "maxRequestsPerConnection": 1,
            },
        },
        "retryBudget": {"retryRatio": 0.25, "minRetriesPerSecond": 5, "ttl": "30s"},
    }
    t = translator(service_entry(), destination_rule(trafficPolicy=policy))
    assert problems(t) == [
        (
            "warning",
            "DestinationRule default/reviews",
            "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
            "connections are not closed after a number of requests: ignored",
        )
    ]
    assert config(t)["clusters"] == [
        demo_cluster(
            connect_timeout="0.250s",
            idle_timeout="90s",
            max_concurrent_streams_per_connection=50,
            retry_budget={"retry_ratio": 0.25, "min_retries_per_second": 5, "ttl": "30s"},
            circuit_breakers={
                "max_connections": 100,
                "max_pending_requests": 10,
                "max_requests": 1000,
                "max_retries": 3,
            },
        )
    ]


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"tcp": {"maxConnections": 1}}, {"circuit_breakers": {"max_connections": 1}}),
        ({"http": {"maxRetries": 0, "http2MaxRequests": 7}}, {"circuit_breakers": {"max_requests": 7}}),
        # Istio's 0 is no limit, as the proto's: nothing to send
        ({"tcp": {"maxConnections": 0}, "http": {"http1MaxPendingRequests": 0}}, {}),
    ],
)
def test_circuit_breakers_only_what_is_limited(pool, expected):
    t = translator(service_entry(), destination_rule(trafficPolicy={"connectionPool": pool}))
    assert problems(t) == []
    assert config(t)["clusters"] == [demo_cluster(**expected)]


@pytest.mark.parametrize(
    ("outlier", "expected"),
    [
        # present with nothing set: detection on with the defaults (5 consecutive 5xx, 10s, 30s, 10%)
        ({}, {}),
        (
            {
                "consecutive5xxErrors": 0,
                "consecutiveGatewayErrors": 3,
                "consecutiveLocalOriginFailures": 2,
                "splitExternalLocalOriginErrors": True,
                "interval": "5s",
                "baseEjectionTime": "1m",
                "maxEjectionPercent": 50,
            },
            {
                "consecutive_5xx": 0,
                "consecutive_gateway_errors": 3,
                "consecutive_local_origin_failures": 2,
                "split_external_local_origin_errors": True,
                "interval": "5s",
                "base_ejection_time": "60s",
                "max_ejection_percent": 50,
            },
        ),
        ({"consecutive5xxErrors": 7, "maxEjectionPercent": 100}, {"consecutive_5xx": 7, "max_ejection_percent": 100}),
        # the deprecated field: gateway errors only, the 5xx count off (as pilot reads it)
        ({"consecutiveErrors": 4}, {"consecutive_5xx": 0, "consecutive_gateway_errors": 4}),
        ({"consecutiveErrors": 4, "consecutive5xxErrors": 6}, {"consecutive_5xx": 6, "consecutive_gateway_errors": 4}),
        ({"consecutiveErrors": 0}, {}),
        # Envoy's max ejection time is at least the base one
        ({"baseEjectionTime": "10m"}, {"base_ejection_time": "600s", "max_ejection_time": "600s"}),
        ({"baseEjectionTime": "5m"}, {"base_ejection_time": "300s"}),
        # the longest the sidecar's detector takes (2^62 ns)
        (
            {"baseEjectionTime": "4611686018s", "interval": "4611686018s"},
            {"interval": "4611686018s", "base_ejection_time": "4611686018s", "max_ejection_time": "4611686018s"},
        ),
    ],
)
def test_outlier_detection(outlier, expected):
    t = translator(service_entry(), destination_rule(trafficPolicy={"outlierDetection": outlier}))
    assert [p for p in problems(t) if p[0] == "error"] == []
    assert config(t)["clusters"] == [demo_cluster(outlier_detection=expected)]


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        ({}, {}),
        (
            {
                "interval": "2s",
                "timeout": "500ms",
                "unhealthyThreshold": 4,
                "healthyThreshold": 1,
                "grpcServiceName": "demo.Reviews",
            },
            {
                "interval": "2s",
                "timeout": "0.500s",
                "unhealthy_threshold": 4,
                "healthy_threshold": 1,
                "grpc_service_name": "demo.Reviews",
            },
        ),
    ],
)
def test_health_check_extension(check, expected):
    t = translator(service_entry(), destination_rule(trafficPolicy={"healthCheck": check}))
    assert problems(t) == []
    assert config(t)["clusters"] == [demo_cluster(health_check=expected)]


@pytest.mark.parametrize(
    ("check", "where", "why"),
    [
        ({"interval": "50ms"}, "interval", "0.1s or more"),
        ({"interval": "1s", "timeout": "2s"}, "timeout", "must not exceed the interval"),
        ({"timeout": "11s"}, "timeout", "must not exceed the interval"),
        ({"unhealthyThreshold": 0}, "unhealthyThreshold", ""),
        ({"grpcService": "x"}, "grpcService", ""),
    ],
)
def test_health_check_extension_refusals(check, where, why):
    t = translator(service_entry(), destination_rule(trafficPolicy={"healthCheck": check}))
    errors = [p for p in problems(t) if p[0] == "error"]
    assert len(errors) == 1 and f"spec.trafficPolicy.healthCheck.{where}" in str(errors[0]) and why in str(errors[0])


def test_outlier_detection_what_istio_reads_as_unset_is_unset_with_a_warning():
    outlier = {
        "consecutiveLocalOriginFailures": 3,
        "maxEjectionPercent": 0,
        "minHealthPercent": 50,
        "consecutiveErrors": 2,
    }
    t = translator(service_entry(), destination_rule(trafficPolicy={"outlierDetection": outlier}))
    od = "spec.trafficPolicy.outlierDetection"
    assert problems(t) == [
        (
            "warning",
            "DestinationRule default/reviews",
            f"{od}.minHealthPercent",
            "meshproxy has no panic threshold: ignored",
        ),
        (
            "warning",
            "DestinationRule default/reviews",
            f"{od}.consecutiveErrors",
            "deprecated: read as consecutiveGatewayErrors, with consecutive5xxErrors 0, as Istio does",
        ),
        (
            "warning",
            "DestinationRule default/reviews",
            f"{od}.consecutiveLocalOriginFailures",
            "counted only with splitExternalLocalOriginErrors: true: ignored",
        ),
        (
            "warning",
            "DestinationRule default/reviews",
            f"{od}.maxEjectionPercent",
            "0 is read as unset, as Istio does: up to 10% of endpoints are ejected",
        ),
    ]
    assert config(t)["clusters"] == [
        demo_cluster(outlier_detection={"consecutive_5xx": 0, "consecutive_gateway_errors": 2})
    ]


def test_retry_budget_with_only_a_ratio():
    t = translator(service_entry(), destination_rule(trafficPolicy={"retryBudget": {"retryRatio": 0.1}}))
    assert config(t)["clusters"] == [demo_cluster(retry_budget={"retry_ratio": 0.1})]


def test_destination_rule_closest_to_the_sidecar_wins():
    # the Service's namespace's rule for everyone, the sidecar's own namespace's rule for it
    rules = [
        destination_rule(trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}),
        destination_rule(ns="shop", name="shop-view", trafficPolicy={"loadBalancer": {"simple": "ROUND_ROBIN"}}),
    ]
    t = translator(service_entry(), *rules)
    assert config(t, "default")["clusters"][0]["lb_policy"] == "RANDOM"
    assert config(t, "shop")["clusters"][0]["lb_policy"] == "ROUND_ROBIN"
    assert config(t, "prod")["clusters"][0]["lb_policy"] == "RANDOM"


# -- VirtualService routes ----------------------------------------------------------------------


def _routes(t: Translator, namespace: str = "default", labels: dict | None = None, index: int = 0) -> list[dict]:
    return config(t, namespace, labels)["listeners"][0]["virtual_hosts"][index]["routes"]


def _mesh(*http, **vs_spec) -> Translator:
    return translator(service_entry(), destination_rule(), virtual_service(list(http), **vs_spec))


def test_several_matches_one_route_each_in_order():
    t = _mesh(
        {
            "name": "api",
            "match": [{"uri": {"exact": "/a"}}, {"uri": {"prefix": "/b/"}}, {"uri": {"regex": "/c/[0-9]+"}}],
            **to(subset="v2"),
        },
        to(subset="v1"),
    )
    v2 = wc(DEMO_CLUSTER, "v2")
    assert _routes(t) == [
        fwd("default/reviews/api/0", v2, match={"path": "/a"}),
        fwd("default/reviews/api/1", v2, match={"prefix": "/b/"}),
        fwd("default/reviews/api/2", v2, match={"regex": "/c/[0-9]+"}),
        fwd("default/reviews/1", wc(DEMO_CLUSTER, "v1")),
    ]


def test_header_method_and_grpc_matches():
    t = _mesh(
        {
            "match": [
                {
                    "headers": {
                        "End-User": {"exact": "jason"},
                        "x-tenant": {"prefix": "acme-"},
                        "x-id": {"regex": "[0-9]+"},
                        "x-canary": {},
                    },
                    "withoutHeaders": {"x-skip": {"exact": "1"}, "x-debug": {}},
                    "method": {"exact": "POST"},
                },
                {"grpc": {"service": "reviews.v1.Reviews", "method": "GetReview"}},
                {"grpc": {"service": "reviews.v1.Reviews"}},
            ],
            **to(subset="v2"),
        }
    )
    v2 = {"clusters": [wc(DEMO_CLUSTER, "v2")]}
    assert _routes(t) == [
        {
            "name": "default/reviews/0/0",
            "retry_policy": DEFAULT_RETRY,
            "match": {
                "headers": [
                    {"name": "end-user", "exact": "jason"},
                    {"name": "x-tenant", "prefix": "acme-"},
                    {"name": "x-id", "regex": "[0-9]+"},
                    {"name": "x-canary", "present": True},
                    {"name": "x-skip", "exact": "1", "invert": True},
                    {"name": "x-debug", "present": True, "invert": True},
                ],
                "method": "POST",
            },
            "route": v2,
        },
        {
            "name": "default/reviews/0/1",
            "match": {"grpc": {"service": "reviews.v1.Reviews", "method": "GetReview"}},
            "route": v2,
            "retry_policy": DEFAULT_RETRY,
        },
        fwd("default/reviews/0/2", wc(DEMO_CLUSTER, "v2"), match={"grpc": {"service": "reviews.v1.Reviews"}}),
    ]


def test_timeout_retries_and_route_budget():
    t = _mesh(
        to(
            subset="v1",
            timeout="1.5s",
            retries={
                "attempts": 3,
                "perTryTimeout": "100ms",
                "retryOn": "connect-failure,refused-stream,503,unavailable",
                "retryBudget": {"retryRatio": 0.2, "minRetriesPerSecond": 0, "ttl": "1m"},
            },
        )
    )
    assert _routes(t) == [
        {
            "name": "default/reviews/0",
            "route": {"clusters": [wc(DEMO_CLUSTER, "v1")]},
            "timeout": "1.500s",
            "retry_policy": {
                "num_retries": 3,
                "per_try_timeout": "0.100s",
                "retry_on": ["connect-failure", "refused-stream", "503", "unavailable"],
                "budget": {"retry_ratio": 0.2, "min_retries_per_second": 0, "ttl": "60s"},
            },
        }
    ]


_DURATIONS = st.one_of(
    st.sampled_from(["0s", "1ms", "999us", "5m", "300s", "300.000000001s", "10m", "4611686018s", "4611686019s"]),
    st.integers(0, 10**7).map(lambda ms: f"{ms}ms"),
)


@settings(max_examples=200, deadline=None)
@given(
    outlier=st.fixed_dictionaries(
        {},
        optional={
            "consecutive5xxErrors": st.integers(-1, 2**32),
            "consecutiveGatewayErrors": st.integers(-1, 2**32),
            "consecutiveLocalOriginFailures": st.integers(-1, 2**32),
            "consecutiveErrors": st.integers(-1, 2**31),
            "splitExternalLocalOriginErrors": st.booleans(),
            "interval": _DURATIONS,
            "baseEjectionTime": _DURATIONS,
            "maxEjectionPercent": st.integers(-1, 101),
        },
    ),
    pool=st.fixed_dictionaries(
        {},
        optional={
            "maxConnections": st.integers(-1, 2**31),
            "http1MaxPendingRequests": st.integers(-1, 2**31),
            "maxRetries": st.integers(-1, 2**31),
        },
    ),
    delay=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {"fixedDelay": _DURATIONS},
            optional={"percentage": st.builds(dict, value=st.floats(-1, 101)), "percent": st.integers(-1, 101)},
        ),
    ),
    abort=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {},
            optional={
                "httpStatus": st.integers(150, 650),
                "grpcStatus": st.sampled_from(["OK", "CANCELLED", "UNAVAILABLE", "UNAUTHENTICATED", "unknown"]),
                "percentage": st.builds(dict, value=st.floats(-1, 101)),
            },
        ),
    ),
    retries=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {"attempts": st.integers(0, 5)}, optional={"backoff": _DURATIONS, "retryOn": st.just("5xx,unavailable")}
        ),
    ),
)
def test_whatever_the_model_accepts_the_sidecar_accepts(outlier, pool, delay, abort, retries):
    http = {k: v for k, v in (("maxRetries", pool.pop("maxRetries", None)),) if v is not None}
    policy = {"outlierDetection": outlier, "connectionPool": {"tcp": pool, "http": http}}
    fault = {k: v for k, v in (("delay", delay), ("abort", abort)) if v is not None}
    extra = ({"fault": fault} if fault else {}) | ({"retries": retries} if retries is not None else {})
    objs = [service_entry(), destination_rule(trafficPolicy=policy), virtual_service([to(subset="v1", **extra)])]
    model = parse([(o, "mesh.yaml") for o in objs])
    t = Translator(model)
    d = config(t)  # validated: whatever the model kept must be a config the sidecar takes
    cluster, route = d["clusters"][0], d["listeners"][0]["virtual_hosts"][0]["routes"][0]
    dr_refused = any(p.resource.startswith("DestinationRule") for p in model.errors())
    vs_refused = any(p.resource.startswith("VirtualService") for p in model.errors())
    assert ("outlier_detection" in cluster) == (not dr_refused)
    assert ("fault" in route) == (bool(fault) and not vs_refused)


def test_retries_zero_attempts_turn_retries_off():
    # as pilot: attempts 0 is no retry policy at all, whatever else is given
    t = _mesh(to(retries={"attempts": 0}), to(subset="v1", retries={"perTryTimeout": "1s", "retryOn": "5xx"}))
    assert _routes(t) == [
        {"name": "default/reviews/0", "route": {"clusters": [wc(DEMO_CLUSTER)]}, "retry_policy": {}},
        {"name": "default/reviews/1", "route": {"clusters": [wc(DEMO_CLUSTER, "v1")]}, "retry_policy": {}},
    ]
    # ...and the sidecar gets an explicit policy of no retries, not an unset one
    (route, _) = t.config("default", {}).listeners[0].virtual_hosts[0].routes
    assert route.HasField("retry_policy") and route.retry_policy.num_retries == 0


def test_no_retries_is_istios_default_policy():
    t = _mesh(to(subset="v1"))
    (route,) = _routes(t)
    assert route["retry_policy"] == {
        "num_retries": 2,
        "retry_on": ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes", "503"],
    }


def test_retries_without_retry_on_keep_the_default_conditions_and_backoff_is_the_base_interval():
    t = _mesh(to(retries={"attempts": 5, "backoff": "100ms"}), to(retries={"attempts": 1, "retryOn": "reset"}))
    assert [r["retry_policy"] for r in _routes(t)] == [
        {"num_retries": 5, "retry_on": DEFAULT_RETRY["retry_on"], "base_interval": "0.100s"},
        {"num_retries": 1, "retry_on": ["reset"]},
    ]


def test_fault_injection_on_every_kind_of_route():
    t = _mesh(
        {
            "match": [{"uri": {"prefix": "/grpc"}}],
            **to(subset="v2"),
            "fault": {"abort": {"grpcStatus": "UNAVAILABLE"}},
        },
        {
            "match": [{"uri": {"prefix": "/teapot"}}],
            "directResponse": {"status": 418},
            "fault": {"delay": {"fixedDelay": "1ms", "percent": 50}},
        },
        to(
            subset="v1",
            fault={
                "delay": {"fixedDelay": "5s", "percentage": {"value": 0.1}},
                "abort": {"httpStatus": 503, "percentage": {"value": 10}},
            },
        ),
    )
    assert _routes(t) == [
        fwd(
            "default/reviews/0", wc(DEMO_CLUSTER, "v2"), match={"prefix": "/grpc"}, fault={"abort": {"grpc_status": 14}}
        ),
        {
            "name": "default/reviews/1",
            "match": {"prefix": "/teapot"},
            "direct_response": {"status": 418},
            "fault": {"delay": {"fixed_delay": "0.001s", "percentage": 50.0}},
        },
        fwd(
            "default/reviews/2",
            wc(DEMO_CLUSTER, "v1"),
            fault={
                "delay": {"fixed_delay": "5s", "percentage": 0.1},
                "abort": {"http_status": 503, "percentage": 10.0},
            },
        ),
    ]


def test_fault_percentage_unset_is_left_unset_and_zero_is_kept():
    # unset: every request (Istio's docs; the proto's default); {} or 0: none
    t = _mesh(to(fault={"delay": {"fixedDelay": "1s"}, "abort": {"httpStatus": 500, "percentage": {}}}))
    (route,) = t.config("default", {}).listeners[0].virtual_hosts[0].routes
    assert not route.fault.delay.HasField("percentage")
    assert route.fault.abort.HasField("percentage") and route.fault.abort.percentage == 0.0
    assert_valid(t.config("default", {}))


def test_direct_response():
    t = _mesh(
        {"match": [{"uri": {"exact": "/teapot"}}], "directResponse": {"status": 418, "body": {"string": "stout"}}},
        {"directResponse": {"status": 503}, "timeout": "1s"},
    )
    assert _routes(t) == [
        {
            "name": "default/reviews/0",
            "match": {"path": "/teapot"},
            "direct_response": {"status": 418, "body": "stout"},
        },
        {"name": "default/reviews/1", "direct_response": {"status": 503}, "timeout": "1s"},
    ]


def test_rewrite_uri_and_authority():
    t = _mesh(
        {
            "match": [{"uri": {"prefix": "/v0/"}}, {"uri": {"exact": "/old"}}],
            "rewrite": {"uri": "/v1/", "authority": "reviews.internal:9080"},
            **to(subset="v1"),
        },
        {"rewrite": {"authority": "other"}, **to(subset="v2")},
    )
    assert _routes(t) == [
        {
            "name": "default/reviews/0/0",
            "match": {"prefix": "/v0/"},
            "route": {
                "clusters": [wc(DEMO_CLUSTER, "v1")],
                "prefix_rewrite": "/v1/",
                "authority_rewrite": "reviews.internal:9080",
            },
            "retry_policy": DEFAULT_RETRY,
        },
        {
            "name": "default/reviews/0/1",
            "match": {"path": "/old"},
            "route": {
                "clusters": [wc(DEMO_CLUSTER, "v1")],
                "prefix_rewrite": "/v1/",
                "authority_rewrite": "reviews.internal:9080",
            },
            "retry_policy": DEFAULT_RETRY,
        },
        {
            "name": "default/reviews/1",
            "route": {"clusters": [wc(DEMO_CLUSTER, "v2")], "authority_rewrite": "other"},
            "retry_policy": DEFAULT_RETRY,
        },
    ]


def test_duplicate_route_names_are_made_unique():
    """Istio does not require unique http route names; the sidecar does within a virtual host."""
    t = _mesh({"name": "x", **to(subset="v1")}, {"name": "x", **to(subset="v2")}, {"name": "2", **to()}, to())
    assert [r["name"] for r in _routes(t)] == [
        "default/reviews/x",
        "default/reviews/x#2",
        "default/reviews/2",
        "default/reviews/3",
    ]
    t = _mesh({"name": "1", **to(subset="v1")}, to(subset="v2"))
    assert [r["name"] for r in _routes(t)] == ["default/reviews/1", "default/reviews/1#2"]


def test_port_specific_matches():
    svc = kube_service("reviews", ports=((9080, "grpc"), (9901, "admin")))
    vs = virtual_service(
        [
            {"match": [{"port": 9901}], "route": [{"destination": {"host": "reviews", "port": {"number": 9901}}}]},
            {"match": [{"port": 9080, "uri": {"prefix": "/api"}}, {"uri": {"prefix": "/any"}}], **to("reviews")},
            to("reviews"),
        ],
        hosts=["reviews"],
    )
    t = translator(svc, vs)
    assert problems(t) == []
    d = config(t, "default")
    grpc, admin = d["listeners"][0]["virtual_hosts"]
    c9080, c9901 = f"outbound|9080||{FQDN}", f"outbound|9901||{FQDN}"
    assert grpc["name"] == f"{FQDN}:9080"
    assert grpc["routes"] == [
        fwd("default/reviews/1/0", wc(c9080), match={"prefix": "/api"}),
        fwd("default/reviews/1/1", wc(c9080), match={"prefix": "/any"}),
        fwd("default/reviews/2", wc(c9080)),
    ]
    assert admin["name"] == f"{FQDN}:9901"
    assert admin["routes"] == [
        # a match on the port alone: an empty (match-all) RouteMatch
        fwd("default/reviews/0", wc(c9901), match={}),
        fwd("default/reviews/1/1", wc(c9901), match={"prefix": "/any"}),
        fwd("default/reviews/2", wc(c9901)),
    ]
    assert [c["name"] for c in d["clusters"]] == [c9080, c9901]


def test_source_labels_and_source_namespace_and_scopes():
    t = _mesh(
        {"match": [{"sourceLabels": {"app": "productpage", "version": "v2"}}], **to(subset="v2")},
        {"match": [{"sourceNamespace": "shop"}], **to(subset="v2")},
        to(subset="v1"),
    )
    v1 = fwd("default/reviews/2", wc(DEMO_CLUSTER, "v1"))
    # a match on the source alone: an empty (match-all) RouteMatch for the sidecars it selects
    from_pp_v2 = fwd("default/reviews/0", wc(DEMO_CLUSTER, "v2"), match={})
    from_shop = fwd("default/reviews/1", wc(DEMO_CLUSTER, "v2"), match={})
    pp_v2 = {"app": "productpage", "version": "v2", "pod-template-hash": "abc"}
    assert _routes(t, "default", pp_v2) == [from_pp_v2, v1]
    assert _routes(t, "default", {"app": "productpage", "version": "v1"}) == [v1]
    assert _routes(t, "default", {}) == [v1]
    assert _routes(t, "shop", {}) == [from_shop, v1]
    assert _routes(t, "shop", pp_v2) == [from_pp_v2, from_shop, v1]

    # scopes: only the labels some sourceLabels names matter
    assert t.scope("default", pp_v2) == ("default", (("app", "productpage"), ("version", "v2")))
    other_pod = pp_v2 | {"pod-template-hash": "xyz", "team": "books"}
    assert t.scope("default", other_pod) == t.scope("default", pp_v2)
    assert t.config("default", other_pod) is t.config("default", pp_v2)
    assert t.scope("shop", pp_v2) != t.scope("default", pp_v2)
    assert t.config("default", {"team": "books"}) is t.config("default", {})
    # another value of a key that matters: another scope (the same content, so the same version)
    assert t.scope("default", {"app": "details"}) == ("default", (("app", "details"),))
    assert t.config("default", {"app": "details"}).version == t.config("default", {}).version
    assert t.config("default", {"app": "details"}).version != t.config("default", pp_v2).version


def test_scope_without_source_labels_is_the_namespace():
    t = _mesh(to())
    assert t.scope("default", {"app": "x", "version": "v1"}) == ("default", ())
    assert t.config("default", {"app": "x"}) is t.config("default", {"app": "y"})


# -- across resources ---------------------------------------------------------------------------


def test_unknown_destination_host_warns_and_answers_503():
    t = translator(service_entry(), destination_rule(), virtual_service([to("ghost.local")]))
    assert problems(t) == [
        (
            "warning",
            "VirtualService default/reviews",
            "spec.http[0].route[0].destination",
            "host ghost.local is not a known service (a Kubernetes Service or a ServiceEntry host): "
            "this route answers 503",
        )
    ]
    assert config(t) == {
        "listeners": [
            listener(
                demo_vhost(
                    {"name": "default/reviews/0", "direct_response": {"status": 503, "body": "no service ghost.local"}}
                )
            )
        ],
        # no route sends to reviews.local: no cluster for it
    }


def test_undefined_subset_warns_and_answers_503():
    t = translator(service_entry(), destination_rule(), virtual_service([split(v1=50, v3=50)]))
    assert problems(t) == [
        (
            "warning",
            "VirtualService default/reviews",
            "spec.http[0].route[1].destination",
            "subset 'v3' of reviews.local is not defined by any DestinationRule: this route answers 503",
        )
    ]
    assert _routes(t) == [
        {
            "name": "default/reviews/0",
            "direct_response": {
                "status": 503,
                "body": "no subset v3 of reviews.local is visible from namespace default",
            },
        }
    ]


def test_subset_visible_in_one_namespace_but_not_another():
    t = translator(
        service_entry(),
        destination_rule(exportTo=["."]),
        virtual_service([split(v1=80, v2=20)]),
    )
    assert problems(t) == []
    assert config(t, "default")["listeners"][0]["virtual_hosts"][0]["routes"][0]["route"] == {
        "clusters": [wc(DEMO_CLUSTER, "v1", 80), wc(DEMO_CLUSTER, "v2", 20)]
    }
    assert config(t, "shop") == {
        "listeners": [
            listener(
                demo_vhost(
                    {
                        "name": "default/reviews/0",
                        "direct_response": {
                            "status": 503,
                            "body": "no subset v1 of reviews.local is visible from namespace shop",
                        },
                    }
                )
            )
        ],
        # the cluster is there, without the subsets shop cannot see
        "clusters": [{"name": DEMO_CLUSTER, "endpoints": DEMO_ENDPOINTS}],
    }


def test_destination_port_checks():
    svc = kube_service("reviews", ports=((9080, "grpc"), (9901, "admin")))
    other = kube_service("ratings", ports=((9080, "grpc"), (9901, "admin")))
    t = translator(
        svc,
        other,
        virtual_service(
            [
                {
                    "match": [{"uri": {"prefix": "/nope"}}],
                    "route": [{"destination": {"host": "reviews", "port": {"number": 1}}}],
                },
                {"match": [{"uri": {"prefix": "/r"}}], **to("ratings")},
                to("reviews"),
            ],
            hosts=["reviews"],
        ),
    )
    assert problems(t) == [
        (
            "warning",
            "VirtualService default/reviews",
            "spec.http[0].route[0].destination",
            f"{FQDN} has no port 1: this route answers 503",
        ),
        (
            "warning",
            "VirtualService default/reviews",
            "spec.http[1].route[0].destination",
            "ratings.default.svc.cluster.local has several ports: set port.number: this route answers 503",
        ),
    ]
    routes = _routes(t, index=2)  # reviews:9080 (ratings:9080 and :9901 sort first)
    assert routes == [
        {
            "name": "default/reviews/0",
            "match": {"prefix": "/nope"},
            "direct_response": {"status": 503, "body": f"{FQDN} has no port 1"},
        },
        {
            "name": "default/reviews/1",
            "match": {"prefix": "/r"},
            "direct_response": {
                "status": 503,
                "body": "ratings.default.svc.cluster.local has several ports and the route names none",
            },
        },
        fwd("default/reviews/2", wc(f"outbound|9080||{FQDN}")),
    ]


def test_service_entry_cannot_take_a_kubernetes_service_host():
    entry = service_entry(
        FQDN, name="shadow", ports=[{"number": 9080, "name": "http"}], endpoints=[{"address": "192.0.2.1"}]
    )
    t = translator(entry, *_reviews_objects())
    assert problems(t) == [
        (
            "warning",
            "ServiceEntry default/shadow",
            "",
            f"host {FQDN} is already defined by Service default/reviews: this one is ignored for it",
        )
    ]
    assert config(t)["clusters"] == [
        {
            "name": f"outbound|9080||{FQDN}",
            "endpoints": [{"address": "10.0.0.1:9080", "labels": REVIEWS_LABELS}],
        }
    ]


def test_destination_rule_for_an_unknown_host_warns():
    t = translator(destination_rule("ghost.local"))
    assert problems(t) == [
        ("warning", "DestinationRule default/reviews", "spec.host", "no service has host ghost.local (yet)")
    ]
    assert config(t) == {"listeners": [listener()]}


def test_two_virtual_services_for_one_host_the_sidecars_namespace_wins():
    mine = virtual_service([split(v1=100)], name="reviews")
    theirs = virtual_service([split(v2=100)], ns="shop", name="reviews-shop")
    t = translator(service_entry(), destination_rule(), mine, theirs)
    assert problems(t) == [
        (
            "warning",
            "VirtualService shop/reviews-shop",
            "",
            "host reviews.local is also routed by VirtualService default/reviews; a sidecar uses the one closest to it",
        )
    ]
    assert _routes(t, "shop") == [fwd("shop/reviews-shop/0", wc(DEMO_CLUSTER, "v2", 100))]
    assert _routes(t, "default") == [fwd("default/reviews/0", wc(DEMO_CLUSTER, "v1", 100))]
    # elsewhere: the one in the service's namespace
    assert _routes(t, "prod") == [fwd("default/reviews/0", wc(DEMO_CLUSTER, "v1", 100))]


def test_route_to_another_service():
    t = translator(
        service_entry(),
        destination_rule(),
        service_entry("ratings.local", name="ratings", endpoints=[{"address": "127.0.0.2", "ports": {"grpc": 50061}}]),
        virtual_service([{"match": [{"uri": {"prefix": "/ratings"}}], **to("ratings.local")}, to(subset="v1")]),
    )
    assert problems(t) == []
    d = config(t)
    assert d["listeners"][0]["virtual_hosts"][1]["routes"] == [
        fwd("default/reviews/0", wc("outbound|9080||ratings.local"), match={"prefix": "/ratings"}),
        fwd("default/reviews/1", wc(DEMO_CLUSTER, "v1")),
    ]
    assert [c["name"] for c in d["clusters"]] == ["outbound|9080||ratings.local", DEMO_CLUSTER]


# -- versions -----------------------------------------------------------------------------------


def test_version_is_a_stable_digest_of_the_content():
    objs = [service_entry(), destination_rule(), virtual_service([split(v1=80, v2=20)])]
    a = translator(*objs).config("default", {})
    b = translator(*copy.deepcopy(objs)).config("default", {})
    assert a.version == b.version
    assert len(a.version) == 16 and int(a.version, 16) >= 0
    assert version_of(_without_version(a)) == a.version
    changed = copy.deepcopy(objs)
    changed[2]["spec"]["http"][0]["route"][0]["weight"] = 50
    changed[2]["spec"]["http"][0]["route"][1]["weight"] = 50
    c = translator(*changed).config("default", {})
    assert c.version != a.version
    # another namespace that sees the same: the same content, the same version
    assert translator(*objs).config("shop", {}).version == a.version


def test_version_of_ignores_nothing_else():
    cfg = pb.SidecarConfig()
    v0 = version_of(cfg)
    cfg.clusters.add(name="x")
    assert version_of(cfg) != v0
    cfg2 = pb.SidecarConfig()
    cfg2.clusters.add(name="x")
    assert version_of(cfg2) == version_of(cfg)


# -- every fixture, every namespace: the sidecar accepts it ---------------------------------------


FIXTURES = sorted(DATA.glob("*.yaml"))
LABELS = [{}, {"app": "productpage", "version": "v2"}, {"app": "reviews", "version": "v1"}, {"app": "ratings"}]


def test_there_are_fixtures():
    assert {f.name for f in FIXTURES} >= {"demo.yaml", "kube.yaml", "routing.yaml", "istio-docs-seed.yaml"}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_fixture_translates_to_valid_configs(path):
    objects, _ = read_file(path)
    t = Translator(parse([(o, path.name) for o in objects]))
    t_local = Translator(parse([(o, path.name) for o in objects]), default_export_to=(".",))
    seen = 0
    for tr in (t, t_local):
        for ns in ("default", "shop", "prod", "istio-system"):
            for labels in LABELS:
                cfg = tr.config(ns, labels)
                assert_valid(cfg)
                assert tr.config(ns, labels) is cfg
                seen += len(cfg.listeners[0].virtual_hosts)
    if path.name != "broken.yaml":
        assert seen > 0


def test_all_fixtures_together_translate_to_valid_configs():
    pairs = []
    for path in FIXTURES:
        objects, _ = read_file(path)
        pairs += [(o, path.name) for o in objects]
    t = Translator(parse(pairs))
    for ns in ("default", "shop", "prod"):
        for labels in LABELS:
            assert_valid(t.config(ns, labels))


def test_routing_fixture_details():
    """Spot checks on the busiest fixture: per-namespace DestinationRules, scoped routes, 503s."""
    objects, _ = read_file(DATA / "routing.yaml")
    t = Translator(parse([(o, "routing.yaml") for o in objects]))
    shop = config(t, "shop")
    reviews_9080 = next(vh for vh in shop["listeners"][0]["virtual_hosts"] if vh["name"] == f"{FQDN}:9080")
    jason = reviews_9080["routes"][0]
    # shop's own DestinationRule has no v3
    assert jason["direct_response"] == {
        "status": 503,
        "body": f"no subset v3 of {FQDN} is visible from namespace shop",
    }
    reviews_cluster = next(c for c in shop["clusters"] if c["name"] == f"outbound|9080||{FQDN}")
    assert reviews_cluster["lb_policy"] == "ROUND_ROBIN"
    assert [s["name"] for s in reviews_cluster["subsets"]] == ["v1", "v2"]
    default = config(t, "default")
    reviews_cluster = next(c for c in default["clusters"] if c["name"] == f"outbound|9080||{FQDN}")
    assert (reviews_cluster["lb_policy"], reviews_cluster["hash_header"]) == ("RING_HASH", "x-user")
    assert [e["address"] for e in reviews_cluster["endpoints"]] == ["10.0.0.1:9080", "10.0.0.2:9080", "[fd00::3]:9080"]
    # the ratings route for reviews' pods only
    ratings_vh = next(vh for vh in default["listeners"][0]["virtual_hosts"] if vh["name"].startswith("ratings."))
    assert [r["name"] for r in ratings_vh["routes"]] == ["shop/ratings/1"]
    from_reviews = config(t, "default", {"app": "reviews"})
    ratings_vh = next(vh for vh in from_reviews["listeners"][0]["virtual_hosts"] if vh["name"].startswith("ratings."))
    assert [r["name"] for r in ratings_vh["routes"]] == ["shop/ratings/0", "shop/ratings/1"]
    assert ratings_vh["routes"][0]["timeout"] == "0.100s"
    # payments: the prod VirtualService is the only one; each DNS host resolves to itself
    payments = next(c for c in default["clusters"] if c["name"] == "outbound|443||payments.example.com")
    assert payments["endpoints"] == [{"address": "payments.example.com:443"}]


def test_default_export_to_applies_to_virtual_services_and_destination_rules_too():
    """One default for every kind (Istio has one per kind): with '.', shop's own resources for
    reviews.local are shop's alone."""
    objs = [
        service_entry(exportTo=["*"]),
        destination_rule(ns="shop", name="shop-view", trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}),
        virtual_service([split(v2=100)], ns="shop", name="shop-route"),
    ]
    everywhere = translator(*objs)
    local = translator(*objs, default_export_to=(".",))
    shop_route = [fwd("shop/shop-route/0", wc(DEMO_CLUSTER, "v2", 100))]
    assert _routes(everywhere, "shop") == _routes(local, "shop") == shop_route
    assert _routes(everywhere, "default") == shop_route
    assert config(everywhere, "default")["clusters"] == [demo_cluster(lb_policy="RANDOM")]
    # with '.', default sees neither: the default route, a cluster without subsets
    assert config(local, "default") == {
        "listeners": [listener(demo_vhost(default_route(DEMO_CLUSTER)))],
        "clusters": [{"name": DEMO_CLUSTER, "endpoints": DEMO_ENDPOINTS}],
    }


# -- service addresses: how a transparent sidecar maps a redirected connection to a cluster -------


def _with_spec(obj: dict, **spec) -> dict:
    obj = copy.deepcopy(obj)
    obj["spec"].update(spec)
    return obj


def test_a_services_cluster_ip_and_each_port_are_its_clusters_service_addresses():
    svc = _with_spec(kube_service("catalog", "shop", ports=((9090, "grpc"), (8080, "http"))), clusterIP="10.96.3.4")
    t = translator(svc, pod("c0", "10.1.0.7", "shop", app="catalog"))
    host = "catalog.shop.svc.cluster.local"
    clusters = {c["name"]: c for c in config(t, "shop")["clusters"]}
    assert clusters[f"outbound|9090||{host}"]["service_addresses"] == ["10.96.3.4:9090"]
    assert clusters[f"outbound|8080||{host}"]["service_addresses"] == ["10.96.3.4:8080"]
    assert t.problems == []


def test_dual_stack_cluster_ips_are_all_listed_ipv6_bracketed_and_canonical():
    svc = _with_spec(kube_service("reviews"), clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "FD00:0::A"])
    t = translator(svc, pod("r1", "10.0.0.1", app="reviews"))
    assert config(t)["clusters"][0]["service_addresses"] == ["10.96.0.10:9080", "[fd00::a]:9080"]


@pytest.mark.parametrize("spec", [{"clusterIP": "None"}, {"clusterIP": ""}, {}], ids=["headless", "empty", "unset"])
def test_no_cluster_ip_no_service_addresses(spec):
    t = translator(_with_spec(kube_service("reviews"), **spec), pod("r1", "10.0.0.1", app="reviews"))
    assert "service_addresses" not in config(t)["clusters"][0]


def test_a_bad_cluster_ip_is_an_error_on_the_service():
    t = translator(_with_spec(kube_service("reviews"), clusterIPs=["10.96.0.300"]))
    assert problems(t) == [
        ("error", "Service default/reviews", "spec.clusterIPs[0]", "'10.96.0.300' is not an IP address")
    ]


def test_service_entry_addresses_single_hosts_kept_ranges_warned():
    entry = service_entry(addresses=["192.0.2.10", "198.51.100.0/24", "2001:db8::1/128"])
    t = translator(entry)
    assert problems(t) == [
        (
            "warning",
            "ServiceEntry default/reviews",
            "spec.addresses[1]",
            "198.51.100.0/24 is a range: transparent sidecars map single addresses only",
        )
    ]
    assert config(t)["clusters"] == [
        {
            "name": DEMO_CLUSTER,
            "endpoints": DEMO_ENDPOINTS,
            "service_addresses": ["192.0.2.10:9080", "[2001:db8::1]:9080"],
        }
    ]


def test_a_bad_service_entry_address_is_an_error():
    t = translator(service_entry(addresses=["reviews.local"]))
    assert problems(t) == [
        (
            "error",
            "ServiceEntry default/reviews",
            "spec.addresses[0]",
            "'reviews.local' is not an IP address or CIDR block",
        )
    ]


def test_an_address_belongs_to_one_cluster_the_kubernetes_service_first():
    svc = _with_spec(kube_service("reviews"), clusterIP="10.96.0.10")
    entry = service_entry(
        "other.local", name="other", ports=[{"number": 9080, "name": "grpc"}], addresses=["10.96.0.10"]
    )
    t = translator(entry, svc, pod("r1", "10.0.0.1", app="reviews"))
    assert problems(t) == [
        (
            "warning",
            "ServiceEntry default/other",
            "",
            "10.96.0.10:9080 is already the address of Service default/reviews: ignored for this one",
        )
    ]
    clusters = {c["name"]: c for c in config(t)["clusters"]}
    assert clusters[f"outbound|9080||{FQDN}"]["service_addresses"] == ["10.96.0.10:9080"]
    assert "service_addresses" not in clusters["outbound|9080||other.local"]
