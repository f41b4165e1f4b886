"""control.model: Istio's and Kubernetes' resources parsed and checked, one at a time."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from control.model import (
    API_VERSIONS,
    CircuitBreakers,
    Endpoint,
    Fault,
    FaultAbort,
    FaultDelay,
    Invalid,
    OutlierDetection,
    Port,
    Problem,
    Service,
    parse,
    parse_duration,
)
from control.sources.files import read_file

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[2]


# -- builders -----------------------------------------------------------------------------------


def res(kind: str, name: str, spec: dict, *, ns: str | None = "default", api: str | None = None) -> dict:
    group = {"PeerAuthentication": "security", "AuthorizationPolicy": "security"}.get(kind, "networking")
    meta = {"name": name} | ({"namespace": ns} if ns is not None else {})
    return {"apiVersion": api or f"{group}.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec}


def route(*dests, **extra) -> dict:
    return {"route": [{"destination": d} if "destination" not in d else d for d in dests]} | extra


def vs(http: list, hosts=("reviews",), name: str = "reviews", **spec) -> dict:
    return res("VirtualService", name, {"hosts": list(hosts), "http": http} | spec)


def dr(host: str = "reviews", name: str = "reviews", **spec) -> dict:
    return res("DestinationRule", name, {"host": host} | spec)


def se(name: str = "ext", **spec) -> dict:
    base = {"hosts": ["api.example.com"], "resolution": "DNS", "ports": [{"number": 443, "name": "https"}]}
    return res("ServiceEntry", name, base | spec)


def parsed(*objs, origin: str = "test.yaml"):
    return parse([(o, origin) for o in objs])


def problems(*objs) -> list[tuple[str, str, str, str]]:
    return [(p.severity, p.resource, p.path, p.message) for p in parsed(*objs).problems]


def error(obj: dict) -> tuple[str, str]:
    """(path, message) of the one error ``obj`` gets; the resource must have been set aside."""
    model = parsed(obj)
    errs = model.errors()
    assert len(errs) == 1, model.problems
    kind = obj["kind"]
    assert not [r for r in _resources(model) if r.meta.kind == kind], "an invalid resource was kept"
    return errs[0].path, errs[0].message


def _resources(model):
    return (
        model.virtual_services
        + model.destination_rules
        + model.services
        + model.peer_authentications
        + model.authorization_policies
    )


SIMPLE_ROUTE = [route({"host": "reviews"})]
GRPC_NAMES = (
    "CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, "
    "RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, "
    "DATA_LOSS, UNAUTHENTICATED"
)


# -- apiVersions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "api", "spec"),
    [
        *[
            ("VirtualService", api, {"hosts": ["reviews"], "http": SIMPLE_ROUTE})
            for api in (
                "networking.istio.io/v1alpha3",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1",
                "meshproxy.io/v1alpha1",
            )
        ],
        *[
            ("DestinationRule", api, {"host": "reviews"})
            for api in (
                "networking.istio.io/v1alpha3",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1",
                "meshproxy.io/v1alpha1",
            )
        ],
        *[
            ("ServiceEntry", api, {"hosts": ["a.example.com"], "resolution": "DNS", "ports": [{"number": 80}]})
            for api in (
                "networking.istio.io/v1alpha3",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1",
                "meshproxy.io/v1alpha1",
            )
        ],
        *[
            ("PeerAuthentication", api, {"mtls": {"mode": "PERMISSIVE"}})
            for api in ("security.istio.io/v1beta1", "security.istio.io/v1", "meshproxy.io/v1alpha1")
        ],
        *[
            ("AuthorizationPolicy", api, {"action": "DENY"})
            for api in ("security.istio.io/v1beta1", "security.istio.io/v1", "meshproxy.io/v1alpha1")
        ],
    ],
)
def test_accepted_api_versions(kind, api, spec):
    model = parsed(res(kind, "x", spec, api=api))
    assert model.errors() == []
    assert len(_resources(model)) == 1
    assert _resources(model)[0].meta.kind == kind


def test_api_versions_table():
    assert API_VERSIONS["VirtualService"] == {
        "networking.istio.io/v1alpha3",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1",
        "meshproxy.io/v1alpha1",
    }
    assert API_VERSIONS["PeerAuthentication"] == {
        "security.istio.io/v1beta1",
        "security.istio.io/v1",
        "meshproxy.io/v1alpha1",
    }
    assert API_VERSIONS["EndpointSlice"] == {"discovery.k8s.io/v1"}


@pytest.mark.parametrize(
    ("kind", "api", "listed"),
    [
        (
            "VirtualService",
            "networking.istio.io/v2",
            "meshproxy.io/v1alpha1, networking.istio.io/v1, networking.istio.io/v1alpha3, networking.istio.io/v1beta1",
        ),
        (
            "PeerAuthentication",
            "networking.istio.io/v1",
            "meshproxy.io/v1alpha1, security.istio.io/v1, security.istio.io/v1beta1",
        ),
        ("Service", "v2", "v1"),
        ("EndpointSlice", "discovery.k8s.io/v1beta1", "discovery.k8s.io/v1"),
    ],
)
def test_refused_api_version(kind, api, listed):
    obj = res(kind, "x", {}, api=api)
    assert problems(obj) == [("error", f"{kind} default/x", "apiVersion", f"{kind} is read under {listed}")]


def test_unknown_kind_is_a_warning_and_ignored():
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "x"}}
    assert problems(obj) == [("warning", "ConfigMap x/cm", "kind", "not a kind meshproxy reads: ignored")]


def test_not_a_mapping():
    assert problems(["a", "list"]) == [
        ("error", "object ?", "", "expected a Kubernetes object (a mapping), got a list")
    ]


# -- the seed -----------------------------------------------------------------------------------


def test_istio_docs_seed_parses_without_errors():
    objects, bad = read_file(DATA / "istio-docs-seed.yaml")
    assert bad == []
    model = parse([(o, "seed") for o in objects])
    assert model.errors() == []
    assert [str(p) for p in model.problems] == []
    (v,) = model.virtual_services
    assert v.hosts == ("reviews.default.svc.cluster.local",)
    (r,) = v.http
    assert [(d.host, d.subset, d.weight, d.port) for d in r.destinations] == [
        ("reviews.default.svc.cluster.local", "v1", 80, None),
        ("reviews.default.svc.cluster.local", "v2", 20, None),
    ]
    assert r.matches == ()
    (pa,) = model.peer_authentications
    assert (pa.meta.namespace, pa.meta.name, pa.selector, pa.mode, dict(pa.port_modes)) == (
        "default",
        "default",
        None,
        "STRICT",
        {},
    )
    (rule,) = model.destination_rules
    assert [(s.name, dict(s.labels)) for s in rule.subsets] == [
        ("v1", {"version": "v1"}),
        ("v2", {"version": "v2"}),
        ("v3", {"version": "v3"}),
    ]
    (svc,) = model.services
    assert svc.endpoints == {
        9080: [
            # No owner reference in the seed: each Pod is its own workload.
            Endpoint(
                "10.244.0.11", 9080, {"app": "reviews", "version": "v1"}, 0, "reviews-v1-545db77b95-2ps7q", "default"
            ),
            Endpoint(
                "10.244.0.12", 9080, {"app": "reviews", "version": "v2"}, 0, "reviews-v2-7bf8c9648f-8xbqs", "default"
            ),
        ]
    }


def test_repository_seed_parses_without_errors():
    objects, bad = read_file(REPO / "examples" / "seed" / "seed.yaml")
    assert bad == []
    model = parse([(o, "seed.yaml") for o in objects])
    assert model.errors() == []
    assert len(model.virtual_services) == 1
    assert model.peer_authentications[0].mode == "STRICT"


# -- refusals, with the field path ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "path", "message"),
    [
        # unknown fields, with a hint when only the case differs
        (vs(SIMPLE_ROUTE, Hosts=["x"]), "spec.Hosts", "unknown field (did you mean 'hosts'?)"),
        (
            vs([route({"host": "reviews"}, retries={"attempts": 2, "retryon": "5xx"})]),
            "spec.http[0].retries.retryon",
            "unknown field (did you mean 'retryOn'?)",
        ),
        (vs([route({"host": "reviews"}, timout="1s")]), "spec.http[0].timout", "unknown field"),
        (
            vs([route({"host": "reviews", "subsets": "v1"})]),
            "spec.http[0].route[0].destination.subsets",
            "unknown field",
        ),
        # refused Istio features
        (vs([{"redirect": {"uri": "/x"}}]), "spec.http[0].redirect", "redirects are not supported"),
        (
            vs([route({"host": "reviews"}, headers={"request": {"set": {"x": "1"}}})]),
            "spec.http[0].headers",
            "adding or removing headers is not supported",
        ),
        (
            vs([{"route": [{"destination": {"host": "reviews"}, "headers": {}}]}]),
            "spec.http[0].route[0].headers",
            "adding or removing headers is not supported",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"uri": {"regex": "/(a"}}])]),
            "spec.http[0].match[0].uri.regex",
            "invalid regex '/(a': missing ), unterminated subpattern",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"headers": {"x-v": {"regex": "[a"}}}])]),
            "spec.http[0].match[0].headers['x-v'].regex",
            "invalid regex '[a': unterminated character set",
        ),
        (
            vs([route({"host": "reviews"}, timeout="10 seconds")]),
            "spec.http[0].timeout",
            "expected a duration such as '1.5s' or '100ms', got '10 seconds'",
        ),
        (
            vs([route({"host": "reviews"}, retries={"attempts": 1, "perTryTimeout": 2})]),
            "spec.http[0].retries.perTryTimeout",
            "expected a duration such as '1.5s' or '100ms', got 2",
        ),
        (
            vs([{"route": [{"destination": {"host": "reviews", "subset": s}, "weight": 0} for s in ("v1", "v2")]}]),
            "spec.http[0].route",
            "every weight is 0, so nothing could be picked",
        ),
        (
            vs(SIMPLE_ROUTE, hosts=["*.example.com"]),
            "spec.hosts[0]",
            "wildcard hosts are not supported: name the services",
        ),
        (vs(SIMPLE_ROUTE, hosts=["*"]), "spec.hosts[0]", "wildcard hosts are not supported: name the services"),
        (
            vs(SIMPLE_ROUTE, gateways=["istio-system/ingress"]),
            "spec.gateways",
            "meshproxy has no gateways: with gateways set, 'mesh' must be one of them",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"uri": {"regex": "/v1/.*"}}], rewrite={"uri": "/"})]),
            "spec.http[0].rewrite.uri",
            "rewriting the URI needs every match to have a uri prefix or exact",
        ),
        (
            vs([route({"host": "reviews"}, rewrite={"uri": "/"})]),
            "spec.http[0].rewrite.uri",
            "rewriting the URI needs every match to have a uri prefix or exact",
        ),
        (
            vs([route({"host": "reviews"}, retries={"attempts": 3, "retryOn": "5xx,sometimes"})]),
            "spec.http[0].retries.retryOn",
            "unknown condition 'sometimes' (known: 5xx, cancelled, connect-failure, deadline-exceeded, "
            "gateway-error, internal, refused-stream, reset, resource-exhausted, retriable-4xx, "
            "retriable-status-codes, unavailable)",
        ),
        (
            vs([route({"host": "reviews"}, retries={"attempts": 3, "retryOn": "600"})]),
            "spec.http[0].retries.retryOn",
            "unknown condition '600' (known: 5xx, cancelled, connect-failure, deadline-exceeded, "
            "gateway-error, internal, refused-stream, reset, resource-exhausted, retriable-4xx, "
            "retriable-status-codes, unavailable)",
        ),
        (
            vs([route({"host": "reviews"}, retries={"attempts": 3, "retryBudget": {"retryRatio": -0.1}})]),
            "spec.http[0].retries.retryBudget.retryRatio",
            "must be from 0 to 1000, got -0.1",
        ),
        (
            vs([route({"host": "reviews"}, retries={"attempts": 3, "retryBudget": {"retryRatio": "20%"}})]),
            "spec.http[0].retries.retryBudget.retryRatio",
            "expected a number, got a string",
        ),
        (
            dr(trafficPolicy={"retryBudget": {"retryRatio": 1001}}),
            "spec.trafficPolicy.retryBudget.retryRatio",
            "must be from 0 to 1000, got 1001",
        ),
        (
            dr(trafficPolicy={"retryBudget": {"ttl": "0s"}}),
            "spec.trafficPolicy.retryBudget.ttl",
            "must be greater than 0",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"gateways": ["mesh"]}])]),
            "spec.http[0].match[0].gateways",
            "gateways are not supported: meshproxy routes sidecar traffic only",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"method": {"prefix": "P"}}])]),
            "spec.http[0].match[0].method",
            "only an exact method match is supported",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"method": {"exact": "GET POST"}}])]),
            "spec.http[0].match[0].method.exact",
            "'GET POST' is not an HTTP method",
        ),
        (
            vs([route({"host": "reviews"}, rewrite={"authority": "a b"})]),
            "spec.http[0].rewrite.authority",
            "'a b' is not an authority",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"uri": {"regex": "/caf\\u00e9"}}])]),
            "spec.http[0].match[0].uri.regex",
            "invalid regex '/caf\\\\u00e9': bad escape \\u",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"uri": {"prefix": "/a", "exact": "/a"}}])]),
            "spec.http[0].match[0].uri",
            "set exactly one of exact, prefix, regex",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"uri": {"prefix": "api"}}])]),
            "spec.http[0].match[0].uri.prefix",
            "'api' must start with '/', as every path does",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"grpc": {"method": "Get"}}])]),
            "spec.http[0].match[0].grpc.method",
            "a method needs its service",
        ),
        (
            vs([route({"host": "reviews"}, match=[{"uri": {"prefix": "/"}, "grpc": {"service": "a.B"}}])]),
            "spec.http[0].match[0]",
            "give either uri or grpc, not both",
        ),
        (
            vs([{"route": [{"destination": {"host": "reviews"}}], "directResponse": {"status": 503}}]),
            "spec.http[0].directResponse",
            "give either route or directResponse, not both",
        ),
        (vs([{"name": "nothing"}]), "spec.http[0].route", "is required (or directResponse)"),
        (
            vs([{"directResponse": {"status": 700}}]),
            "spec.http[0].directResponse.status",
            "must be from 200 to 599, got 700",
        ),
        (vs(SIMPLE_ROUTE, tcp=[]), "spec.tcp", "TCP routes are not supported yet"),
        (vs(SIMPLE_ROUTE, hosts=[]), "spec.hosts", "must not be empty"),
        (vs(SIMPLE_ROUTE, exportTo=["Prod"]), "spec.exportTo[0]", "'Prod' is not '.', '*', '~' or a namespace"),
        # fault injection
        (vs([route({"host": "reviews"}, fault={})]), "spec.http[0].fault", "set delay, abort or both"),
        (vs([route({"host": "reviews"}, fault={"delays": {}})]), "spec.http[0].fault.delays", "unknown field"),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"percentage": {"value": 5}}})]),
            "spec.http[0].fault.delay.fixedDelay",
            "is required",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "0s"}})]),
            "spec.http[0].fault.delay.fixedDelay",
            "must be 1ms or more, got '0s'",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "999us"}})]),
            "spec.http[0].fault.delay.fixedDelay",
            "must be 1ms or more, got '999us'",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": 5}})]),
            "spec.http[0].fault.delay.fixedDelay",
            "expected a duration such as '1.5s' or '100ms', got 5",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"exponentialDelay": "1s"}})]),
            "spec.http[0].fault.delay.exponentialDelay",
            "exponential delays are not supported: use fixedDelay",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "1s", "percentage": {"value": 100.5}}})]),
            "spec.http[0].fault.delay.percentage.value",
            "must be from 0 to 100, got 100.5",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "1s", "percentage": {"value": "5%"}}})]),
            "spec.http[0].fault.delay.percentage.value",
            "expected a number, got a string",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "1s", "percentage": 5}})]),
            "spec.http[0].fault.delay.percentage",
            "expected a mapping, got int",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "1s", "percentage": {"val": 5}}})]),
            "spec.http[0].fault.delay.percentage.val",
            "unknown field",
        ),
        (
            vs([route({"host": "reviews"}, fault={"delay": {"fixedDelay": "1s", "percent": 120}})]),
            "spec.http[0].fault.delay.percent",
            "must be from 0 to 100, got 120",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"percentage": {"value": 5}}})]),
            "spec.http[0].fault.abort",
            "set exactly one of httpStatus, grpcStatus",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"httpStatus": 503, "grpcStatus": "UNAVAILABLE"}})]),
            "spec.http[0].fault.abort",
            "set exactly one of httpStatus, grpcStatus",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"httpStatus": 600}})]),
            "spec.http[0].fault.abort.httpStatus",
            "must be from 200 to 599, got 600",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"httpStatus": 199}})]),
            "spec.http[0].fault.abort.httpStatus",
            "must be from 200 to 599, got 199",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"httpStatus": "503"}})]),
            "spec.http[0].fault.abort.httpStatus",
            "expected an integer, got a string",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"grpcStatus": "unavailable"}})]),
            "spec.http[0].fault.abort.grpcStatus",
            f"'unavailable' is not a gRPC error status name (did you mean 'UNAVAILABLE'?) (known: {GRPC_NAMES})",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"grpcStatus": "OK"}})]),
            "spec.http[0].fault.abort.grpcStatus",
            f"'OK' is not a gRPC error status name (known: {GRPC_NAMES})",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"grpcStatus": 14}})]),
            "spec.http[0].fault.abort.grpcStatus",
            "expected a string, got int",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"http2Error": "REFUSED_STREAM"}})]),
            "spec.http[0].fault.abort.http2Error",
            "aborting with an HTTP/2 error is not supported: use httpStatus or grpcStatus",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"httpStatus": 503, "percentage": {"value": -1}}})]),
            "spec.http[0].fault.abort.percentage.value",
            "must be from 0 to 100, got -1",
        ),
        (
            vs([route({"host": "reviews"}, fault={"abort": {"httpStatus": 503, "percent": 10}})]),
            "spec.http[0].fault.abort.percent",
            "unknown field",
        ),
        # retry backoff
        (
            vs([route({"host": "reviews"}, retries={"attempts": 2, "backoff": "0s"})]),
            "spec.http[0].retries.backoff",
            "must be 1ms or more, got '0s'",
        ),
        # DestinationRules
        (dr(host="*.example.com"), "spec.host", "'*.example.com' is not a host name"),
        # circuit breakers (connectionPool) and outlier detection
        (
            dr(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": -1}}}),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "must be from 0 to 2147483647, got -1",
        ),
        (
            dr(trafficPolicy={"connectionPool": {"http": {"http1MaxPendingRequests": -1}}}),
            "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            "must be from 0 to 2147483647, got -1",
        ),
        (
            dr(trafficPolicy={"connectionPool": {"http": {"http2MaxRequests": "many"}}}),
            "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
            "expected an integer, got a string",
        ),
        (
            dr(trafficPolicy={"connectionPool": {"http": {"maxRetries": 2**31}}}),
            "spec.trafficPolicy.connectionPool.http.maxRetries",
            "must be from 0 to 2147483647, got 2147483648",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"consecutive5xxErrors": -1}}),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            "must be from 0 to 4294967295, got -1",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"consecutiveGatewayErrors": 2**32}}),
            "spec.trafficPolicy.outlierDetection.consecutiveGatewayErrors",
            "must be from 0 to 4294967295, got 4294967296",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"consecutiveLocalOriginFailures": 1.5}}),
            "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
            "expected an integer, got float",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"consecutiveErrors": -2}}),
            "spec.trafficPolicy.outlierDetection.consecutiveErrors",
            "must be from 0 to 2147483647, got -2",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"interval": "0s"}}),
            "spec.trafficPolicy.outlierDetection.interval",
            "must be 1ms or more, got '0s'",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"baseEjectionTime": "soon"}}),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "expected a duration such as '1.5s' or '100ms', got 'soon'",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"baseEjectionTime": "0.5ms"}}),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "must be 1ms or more, got '0.5ms'",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"baseEjectionTime": "1281024h"}}),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "must be at most 4611686018s (about 146 years)",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"interval": "4611686019s"}}),
            "spec.trafficPolicy.outlierDetection.interval",
            "must be at most 4611686018s (about 146 years)",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"maxEjectionPercent": 101}}),
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "must be from 0 to 100, got 101",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"splitExternalLocalOriginErrors": "yes"}}),
            "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
            "expected true or false, got a string",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"Consecutive5xxErrors": 3}}),
            "spec.trafficPolicy.outlierDetection.Consecutive5xxErrors",
            "unknown field (did you mean 'consecutive5xxErrors'?)",
        ),
        (
            dr(trafficPolicy={"outlierDetection": {"consecutive_5xx": 3}}),
            "spec.trafficPolicy.outlierDetection.consecutive_5xx",
            "unknown field",
        ),
        (
            dr(subsets=[{"name": "v1", "labels": {"version": "v1"}}, {"name": "v1"}]),
            "spec.subsets[1].name",
            "subset 'v1' is defined twice",
        ),
        (
            dr(subsets=[{"name": "v1", "labels": {"app/version/x": "v1"}}]),
            "spec.subsets[0].labels['app/version/x']",
            "is not a valid label key",
        ),
        (
            dr(subsets=[{"name": "v1", "labels": {"version": "v 1"}}]),
            "spec.subsets[0].labels['version']",
            "'v 1' is not a valid label value",
        ),
        (
            dr(subsets=[{"name": "v1", "labels": {"version": 1}}]),
            "spec.subsets[0].labels['version']",
            "1 is not a valid label value",
        ),
        (
            dr(subsets=[{"name": "v1", "labels": {"version": "x" * 64}}]),
            "spec.subsets[0].labels['version']",
            f"'{'x' * 64}' is not a valid label value",
        ),
        (
            dr(trafficPolicy={"loadBalancer": {"simple": "PASSTHROUGH"}}),
            "spec.trafficPolicy.loadBalancer.simple",
            "PASSTHROUGH is not supported",
        ),
        (
            dr(trafficPolicy={"loadBalancer": {"simple": "FASTEST"}}),
            "spec.trafficPolicy.loadBalancer.simple",
            "must be one of UNSPECIFIED, ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, PASSTHROUGH, got 'FASTEST'",
        ),
        (
            dr(trafficPolicy={"loadBalancer": {"consistentHash": {"httpCookie": {"name": "c"}}}}),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie",
            "hashing on a cookie is not supported",
        ),
        (
            dr(trafficPolicy={"connectionPool": {"tcp": {"connectTimeout": "soon"}}}),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "expected a duration such as '1.5s' or '100ms', got 'soon'",
        ),
        (
            dr(trafficPolicy={"connectionPool": {"http": {"maxConcurrentStreams": 0}}}),
            "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
            "must be from 1 to 2147483647, got 0",
        ),
        # ServiceEntries
        (
            se(resolution="STATIC", endpoints=[{"address": "api.internal"}]),
            "spec.endpoints[0].address",
            "'api.internal' is not an IP address (resolution is STATIC)",
        ),
        (se(resolution="STATIC"), "spec.endpoints", "a STATIC ServiceEntry needs endpoints"),
        (se(resolution="NONE"), "spec.resolution", "NONE (pass-through) is not supported: use STATIC or DNS"),
        (
            se(endpoints=[{"address": "a.internal", "ports": {"http": 8443}}]),
            "spec.endpoints[0].ports['http']",
            "no port named 'http' in spec.ports",
        ),
        (
            se(endpoints=[{"address": "a.internal", "labels": {"-bad": "x"}}]),
            "spec.endpoints[0].labels['-bad']",
            "is not a valid label key",
        ),
        (
            se(ports=[{"number": 443}, {"number": 443}]),
            "spec.ports[1].number",
            "port 443 is listed twice",
        ),
        (se(hosts=["a" * 64 + ".example.com"]), "spec.hosts[0]", None),
        (
            se(workloadSelector={"labels": {}}),
            "spec.workloadSelector",
            "workloadSelector is not supported: list the endpoints",
        ),
        # PeerAuthentication and AuthorizationPolicy
        (
            res(
                "PeerAuthentication", "p", {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}
            ),
            "spec.portLevelMtls",
            "port-level settings need a workload selector (as in Istio)",
        ),
        (
            res("PeerAuthentication", "p", {"mtls": {"mode": "STRICTER"}}),
            "spec.mtls.mode",
            "must be one of UNSET, DISABLE, PERMISSIVE, STRICT, got 'STRICTER'",
        ),
        (
            res(
                "PeerAuthentication",
                "p",
                {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"http": {"mode": "DISABLE"}}},
            ),
            "spec.portLevelMtls['http']",
            "is not a port number",
        ),
        (res("AuthorizationPolicy", "a", {"action": "CUSTOM"}), "spec.action", "CUSTOM is not supported"),
        (
            res("AuthorizationPolicy", "a", {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}),
            "spec.rules[0].from[0].source.principal",
            "unknown field",
        ),
        (
            res("AuthorizationPolicy", "a", {"rules": [{"from": [{"source": {"Namespaces": ["x"]}}]}]}),
            "spec.rules[0].from[0].source.Namespaces",
            "unknown field (did you mean 'namespaces'?)",
        ),
        (
            res("AuthorizationPolicy", "a", {"provider": {"name": "opa"}, "action": "CUSTOM"}),
            "spec.provider",
            "CUSTOM providers are not supported",
        ),
        # metadata
        (res("VirtualService", "", {}), "metadata.name", "is required"),
        (res("VirtualService", "r", {}, ns="Default"), "metadata.namespace", "'Default' is not a namespace name"),
        (
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "my_svc"}, "spec": {"ports": [{"port": 80}]}},
            "metadata.name",
            "'my_svc' is not a Service name (a DNS-1123 label)",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"version": 2}}},
            "metadata.labels['version']",
            "2 is not a valid label value",
        ),
    ],
)
def test_refusal_names_the_field(obj, path, message):
    got_path, got_message = error(obj)
    assert got_path == path
    if message is not None:
        assert got_message == message
    else:
        assert "is not a host name" in got_message


def test_error_problem_carries_resource_and_origin():
    (p,) = parsed(vs([{"redirect": {}}]), origin="routes.yaml").problems
    assert p == Problem(
        "error", "VirtualService default/reviews", "spec.http[0].redirect", "redirects are not supported", "routes.yaml"
    )
    assert str(p) == (
        "error: VirtualService default/reviews (routes.yaml): spec.http[0].redirect: redirects are not supported"
    )


# -- warnings keep the resource -----------------------------------------------------------------


def test_ignored_fields_warn_and_keep_the_resource():
    rule = dr(
        subsets=[{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"outlierDetection": {}}}],
        trafficPolicy={
            "outlierDetection": {"consecutive5xxErrors": 3, "minHealthPercent": 50},
            "connectionPool": {"http": {"maxRequestsPerConnection": 1}},
            "tls": {"mode": "ISTIO_MUTUAL"},
        },
    )
    virtual = vs([route({"host": "reviews"}, corsPolicy={"allowOrigins": [{"exact": "https://a"}]})])
    model = parsed(rule, virtual)
    assert model.errors() == []
    assert [(p.severity, p.resource, p.path, p.message) for p in model.problems] == [
        (
            "warning",
            "DestinationRule default/reviews",
            "spec.subsets[0].trafficPolicy",
            "per-subset policies are not supported: ignored",
        ),
        (
            "warning",
            "DestinationRule default/reviews",
            "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
            "connections are not closed after a number of requests: ignored",
        ),
        (
            "warning",
            "DestinationRule default/reviews",
            "spec.trafficPolicy.outlierDetection.minHealthPercent",
            "meshproxy has no panic threshold: ignored",
        ),
        (
            "warning",
            "VirtualService default/reviews",
            "spec.http[0].corsPolicy",
            "CORS is for browsers, not sidecars: ignored",
        ),
    ]
    assert len(model.destination_rules) == 1 and len(model.virtual_services) == 1
    assert model.destination_rules[0].subsets[0].name == "v1"
    assert model.destination_rules[0].outlier_detection == OutlierDetection(consecutive_5xx=3)
    assert model.destination_rules[0].circuit_breakers is None


def test_an_errored_resource_reports_no_warnings():
    # the CORS policy would warn, the redirect refuses: only the refusal is reported
    assert problems(vs([{"corsPolicy": {}, "redirect": {}}])) == [
        ("error", "VirtualService default/reviews", "spec.http[0].redirect", "redirects are not supported")
    ]


# -- isolation and duplicates --------------------------------------------------------------------


def test_a_broken_resource_does_not_affect_the_others():
    good_before = vs(SIMPLE_ROUTE, name="a")
    broken = vs([{"redirect": {}}], name="b")
    good_after = dr(subsets=[{"name": "v1", "labels": {"version": "v1"}}])
    not_a_mapping = "just text"
    model = parsed(good_before, broken, not_a_mapping, good_after)
    assert [v.meta.name for v in model.virtual_services] == ["a"]
    assert [d.meta.name for d in model.destination_rules] == ["reviews"]
    assert [(p.resource, p.path) for p in model.errors()] == [
        ("VirtualService default/b", "spec.http[0].redirect"),
        ("object ?", ""),
    ]


def test_duplicates_across_origins_keep_the_first():
    one = vs(SIMPLE_ROUTE)
    two = copy.deepcopy(one) | {"apiVersion": "networking.istio.io/v1alpha3"}  # same group: the same object
    model = parse([(one, "a.yaml"), (two, "b.yaml")])
    assert len(model.virtual_services) == 1
    assert model.virtual_services[0].meta.origin == "a.yaml"
    assert [str(p) for p in model.problems] == [
        "error: VirtualService default/reviews (b.yaml): metadata.name: VirtualService default/reviews is "
        "already defined in a.yaml: this one is ignored"
    ]


def test_same_name_in_other_namespace_or_kind_is_not_a_duplicate():
    model = parsed(
        vs(SIMPLE_ROUTE),
        res("VirtualService", "reviews", {"hosts": ["reviews"], "http": SIMPLE_ROUTE}, ns="prod"),
        dr(),
    )
    assert model.problems == []
    assert [(v.meta.namespace, v.hosts) for v in model.virtual_services] == [
        ("default", ("reviews.default.svc.cluster.local",)),
        ("prod", ("reviews.prod.svc.cluster.local",)),
    ]


# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("2h45m", 9900.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("1500ns", 1.5e-6),
        (".5s", 0.5),
        ("1m0.5s", 60.5),
        ("0s", 0.0),
        ("1s500ms", 1.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text, "t") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "10", "s", "1.5", "1 s", "-1s", "1d", "1sm", "1.5.5s", "1S", " 1s", 10, 1.5, True, None]
)
def test_bad_durations(text):
    with pytest.raises(Invalid) as e:
        parse_duration(text, "spec.http[0].timeout")
    assert e.value.path == "spec.http[0].timeout"
    assert e.value.message == f"expected a duration such as '1.5s' or '100ms', got {text!r}"


def test_durations_reach_the_model():
    model = parsed(vs([route({"host": "reviews"}, timeout="1m30s", retries={"attempts": 2, "perTryTimeout": "100ms"})]))
    (r,) = model.virtual_services[0].http
    assert r.timeout == 90.0
    assert r.retries.per_try_timeout == pytest.approx(0.1)


# -- the parsed values --------------------------------------------------------------------------


def test_virtual_service_values():
    model = parsed(
        vs(
            [
                {
                    "name": "canary",
                    "match": [
                        {
                            "uri": {"prefix": "/api"},
                            "headers": {"X-User": {"exact": "jason"}, "x-trace": {}},
                            "withoutHeaders": {"x-skip": {"prefix": "1"}},
                            "method": {"exact": "POST"},
                            "port": 9080,
                            "sourceLabels": {"app": "productpage"},
                            "sourceNamespace": "shop",
                        },
                        {"grpc": {"service": "reviews.v1.Reviews", "method": "Get"}},
                    ],
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v2", "port": {"number": 9080}}, "weight": 25},
                        {"destination": {"host": "ratings.shop.svc.cluster.local"}, "weight": 75},
                    ],
                    "rewrite": {"authority": "reviews.internal"},
                    "timeout": "2s",
                    "retries": {
                        "attempts": 3,
                        "perTryTimeout": "500ms",
                        "retryOn": "connect-failure, 503,unavailable",
                        "retryBudget": {"retryRatio": 0.25, "minRetriesPerSecond": 5, "ttl": "30s"},
                    },
                },
                {"directResponse": {"status": 418, "body": {"string": "teapot"}}},
            ],
            exportTo=[".", "shop"],
        )
    )
    assert model.problems == []
    (v,) = model.virtual_services
    assert v.export_to == (".", "shop")
    r, direct = v.http
    first, second = r.matches
    assert (first.uri.kind, first.uri.value) == ("prefix", "/api")
    assert [(h.name, h.match and (h.match.kind, h.match.value), h.invert) for h in first.headers] == [
        ("x-user", ("exact", "jason"), False),
        ("x-trace", None, False),
        ("x-skip", ("prefix", "1"), True),
    ]
    assert (first.method, first.port, dict(first.source_labels), first.source_namespace) == (
        "POST",
        9080,
        {"app": "productpage"},
        "shop",
    )
    assert (second.grpc_service, second.grpc_method, second.uri) == ("reviews.v1.Reviews", "Get", None)
    assert [(d.host, d.subset, d.port, d.weight) for d in r.destinations] == [
        ("reviews.default.svc.cluster.local", "v2", 9080, 25),
        ("ratings.shop.svc.cluster.local", "", None, 75),
    ]
    assert (r.name, r.rewrite_authority, r.rewrite_uri, r.timeout) == ("canary", "reviews.internal", "", 2.0)
    assert r.retries.attempts == 3
    assert r.retries.per_try_timeout == pytest.approx(0.5)
    assert r.retries.retry_on == ("connect-failure", "503", "unavailable")
    assert (r.retries.budget.ratio, r.retries.budget.min_per_second, r.retries.budget.ttl) == (0.25, 5, 30.0)
    assert (direct.direct_status, direct.direct_body, direct.destinations) == (418, "teapot", ())


def test_destination_rule_values():
    model = parsed(
        dr(
            trafficPolicy={
                "loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}},
                "connectionPool": {
                    "tcp": {"connectTimeout": "250ms"},
                    "http": {"idleTimeout": "1m", "maxConcurrentStreams": 50},
                },
                "retryBudget": {"retryRatio": 0.1},
            },
            exportTo=["*"],
        ),
        dr(name="lc", host="ratings.shop.svc.cluster.local", trafficPolicy={"loadBalancer": {"simple": "LEAST_CONN"}}),
    )
    assert model.problems == []
    a, b = model.destination_rules
    assert (a.host, a.lb_policy, a.hash_header, a.connect_timeout, a.idle_timeout, a.max_streams_per_connection) == (
        "reviews.default.svc.cluster.local",
        "RING_HASH",
        "x-user",
        0.25,
        60.0,
        50,
    )
    assert (a.retry_budget.ratio, a.retry_budget.min_per_second, a.retry_budget.ttl) == (0.1, None, None)
    assert a.export_to == ("*",)
    assert (b.host, b.lb_policy) == ("ratings.shop.svc.cluster.local", "LEAST_REQUEST")


def test_fault_values():
    model = parsed(
        vs(
            [
                route(
                    {"host": "reviews"},
                    fault={
                        "delay": {"fixedDelay": "1.5s", "percentage": {"value": 0.1}, "percent": 30},
                        "abort": {"grpcStatus": "RESOURCE_EXHAUSTED"},
                    },
                ),
                route({"host": "reviews"}, fault={"delay": {"fixedDelay": "1ms", "percent": 30}}),
                route({"host": "reviews"}, fault={"abort": {"httpStatus": 503, "percentage": {}}}),
                route({"host": "reviews"}, retries={"attempts": 2, "backoff": "250ms"}),
            ]
        )
    )
    assert model.problems == []
    a, b, c, d = model.virtual_services[0].http
    # percentage wins over the deprecated percent; an unset percentage stays None (every request)
    assert a.fault == Fault(FaultDelay(1.5, 0.1), FaultAbort(None, 8, None))
    assert b.fault == Fault(FaultDelay(0.001, 30.0), None)
    # an empty Percent is 0, as in proto3
    assert c.fault == Fault(None, FaultAbort(503, None, 0.0))
    assert (d.fault, d.retries.backoff) == (None, 0.25)


def test_destination_rule_resilience_values():
    model = parsed(
        dr(
            trafficPolicy={
                "connectionPool": {
                    "tcp": {"maxConnections": 10},
                    "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 2**31 - 1, "maxRetries": 0},
                },
                "outlierDetection": {
                    "consecutive5xxErrors": 0,
                    "consecutiveGatewayErrors": 2**32 - 1,
                    "consecutiveLocalOriginFailures": 0,
                    "splitExternalLocalOriginErrors": True,
                    "interval": "1ms",
                    "baseEjectionTime": "2m",
                    "maxEjectionPercent": 100,
                },
            }
        ),
        dr(name="bare", host="ratings", trafficPolicy={"outlierDetection": {}, "connectionPool": {"tcp": {}}}),
    )
    assert model.problems == []
    a, b = model.destination_rules
    assert a.circuit_breakers == CircuitBreakers(10, 1, 2**31 - 1, 0)
    assert a.outlier_detection == OutlierDetection(0, 2**32 - 1, 0, True, 0.001, 120.0, 100)
    # present and empty: detection with every default; no limit at all: no circuit breakers
    assert (b.outlier_detection, b.circuit_breakers) == (OutlierDetection(), None)


def test_service_entry_values():
    model = parsed(
        se(
            hosts=["api.example.com", "API2.example.com"],
            resolution="STATIC",
            ports=[{"number": 443, "name": "https", "targetPort": 8443}, {"number": 80, "name": "http"}],
            endpoints=[
                {"address": "10.0.0.1", "labels": {"version": "v1"}, "weight": 3},
                {"address": "2001:db8::1", "ports": {"http": 8080}},
            ],
            exportTo=["."],
        )
    )
    a, b = model.services
    assert (a.host, b.host) == ("api.example.com", "api2.example.com")
    assert a.ports == (Port(443, "https", "", 8443), Port(80, "http", "", None))
    assert a.export_to == (".",)
    assert a.kubernetes is False
    assert (
        a.endpoints
        == b.endpoints
        == {
            443: [Endpoint("10.0.0.1", 8443, {"version": "v1"}, 3), Endpoint("2001:db8::1", 8443, {}, 0)],
            80: [Endpoint("10.0.0.1", 80, {"version": "v1"}, 3), Endpoint("2001:db8::1", 8080, {}, 0)],
        }
    )


def test_service_entry_dns_without_endpoints_resolves_each_host_to_itself():
    model = parsed(se(hosts=["a.example.com", "b.example.com"], ports=[{"number": 443, "name": "https"}]))
    assert {s.host: s.endpoints for s in model.services} == {
        "a.example.com": {443: [Endpoint("a.example.com", 443)]},
        "b.example.com": {443: [Endpoint("b.example.com", 443)]},
    }


def test_service_entry_protocols_warn():
    model = parsed(se(ports=[{"number": 80, "name": "http", "protocol": "HTTP"}, {"number": 9090, "protocol": "grpc"}]))
    assert [(p.severity, p.path, p.message) for p in model.problems] == [
        ("warning", "spec.ports[0].protocol", "HTTP traffic is proxied as HTTP/2 (h2c) only, for now")
    ]
    assert [p.protocol for p in model.services[0].ports] == ["HTTP", "GRPC"]


def test_peer_authentication_and_authorization_policy_values():
    model = parsed(
        res(
            "PeerAuthentication",
            "pa",
            {
                "selector": {"matchLabels": {"app": "reviews"}},
                "mtls": {"mode": "PERMISSIVE"},
                "portLevelMtls": {8080: {"mode": "DISABLE"}},
            },
        ),
        res(
            "AuthorizationPolicy",
            "ap",
            {
                "selector": {"matchLabels": {"app": "reviews"}},
                "action": "DENY",
                "rules": [
                    {"from": [{"source": {"namespaces": ["bad"]}}], "to": [{"operation": {"methods": ["POST"]}}]}
                ],
            },
        ),
    )
    assert model.errors() == []
    (pa,) = model.peer_authentications
    assert (dict(pa.selector), pa.mode, dict(pa.port_modes)) == ({"app": "reviews"}, "PERMISSIVE", {8080: "DISABLE"})
    (ap,) = model.authorization_policies
    assert (dict(ap.selector), ap.action, len(ap.rules)) == ({"app": "reviews"}, "DENY", 1)
    assert [p.message for p in model.problems] == []


# -- Kubernetes ---------------------------------------------------------------------------------


def _kube_model():
    objects, bad = read_file(DATA / "kube.yaml")
    assert bad == []
    model = parse([(o, "kube.yaml") for o in objects])
    assert model.problems == []
    return model


def test_kubernetes_services_from_endpoint_slices_with_pod_labels():
    model = _kube_model()
    by_host = {s.host: s for s in model.services}
    assert sorted(by_host) == [
        "catalog.shop.svc.cluster.local",
        "dns.default.svc.cluster.local",
        "ratings.shop.svc.cluster.local",
        "reviews.default.svc.cluster.local",
    ]
    reviews = by_host["reviews.default.svc.cluster.local"]
    assert reviews.kubernetes is True
    assert reviews.selector == {"app": "reviews"}
    assert reviews.ports == (Port(9080, "http", "", 9080),)
    # not-ready 10.0.0.3 skipped; 10.0.0.4 has no targetRef, so no labels; v2's targetRef has no
    # namespace: the slice's
    assert reviews.endpoints == {
        9080: [
            Endpoint("10.0.0.1", 9080, {"app": "reviews", "version": "v1"}, 0, "reviews-v1", "default"),
            Endpoint("10.0.0.2", 9080, {"app": "reviews", "version": "v2"}, 0, "reviews-v2", "default"),
            Endpoint("10.0.0.4", 9080, {}, 0, "", "default"),
        ]
    }


def test_kubernetes_named_ports_matched_by_name_and_udp_dropped():
    catalog = next(s for s in _kube_model().services if s.meta.name == "catalog")
    assert catalog.ports == (Port(9090, "grpc", "", "grpc"), Port(8080, "http", "", "web"))
    labels = {"app": "catalog", "track": "stable"}
    assert catalog.endpoints == {
        9090: [Endpoint("10.1.0.7", 19090, labels, 0, "catalog-0", "shop")],
        8080: [Endpoint("10.1.0.7", 18080, labels, 0, "catalog-0", "shop")],
    }


def test_kubernetes_service_without_slices_takes_the_selected_pods():
    ratings = next(s for s in _kube_model().services if s.meta.name == "ratings")
    assert ratings.export_to == ("shop", "default")
    # only the shop namespace's Pods with app=ratings and an IP; the target port
    assert ratings.endpoints == {
        9080: [
            Endpoint("10.1.0.20", 19080, {"app": "ratings", "version": "v1"}, 0, "ratings-0", "shop"),
            Endpoint("10.1.0.21", 19080, {"app": "ratings", "version": "v2"}, 0, "ratings-1", "shop"),
        ]
    }


def test_external_name_skipped_udp_only_service_has_no_ports():
    model = _kube_model()
    assert "legacy" not in [s.meta.name for s in model.services]
    dns = next(s for s in model.services if s.meta.name == "dns")
    assert (dns.ports, dns.endpoints) == ((), {})
    assert model.namespaces == {"shop": {"meshproxy.io/inject": "enabled"}}


def test_kubernetes_service_single_unnamed_port_matches_single_slice_port():
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "a"},
        "spec": {"ports": [{"port": 80, "targetPort": 8080}]},
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "a-1", "labels": {"kubernetes.io/service-name": "a"}},
        "addressType": "IPv6",
        "ports": [{"name": "web", "port": 8080}],
        "endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": True}}],
    }
    fqdn = {**eps, "metadata": {"name": "a-2", "labels": {"kubernetes.io/service-name": "a"}}, "addressType": "FQDN"}
    fqdn["endpoints"] = [{"addresses": ["a.example.com"]}]
    (s,) = parsed(svc, eps, fqdn).services
    assert s.endpoints == {80: [Endpoint("fd00::1", 8080, {}, 0, "", "default")]}
    assert isinstance(s, Service) and s.selector is None


# -- malformed objects are Problems, never exceptions ----------------------------------------------


def _slice(**fields) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s"}} | fields


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": {"podIP": "10.0.0.300"}},
            ("error", "Pod default/p", "status.podIP", "'10.0.0.300' is not an IP address"),
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": "Running"},
            ("error", "Pod default/p", "status", "expected a mapping, got a string"),
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": ["app"]}},
            ("error", "Pod default/p", "metadata.labels", "expected a mapping of labels, got a list"),
        ),
        (
            _slice(endpoints=[{"addresses": ["a b"]}]),
            ("error", "EndpointSlice default/s", "endpoints[0].addresses[0]", "'a b' is not an IP address"),
        ),
        (
            _slice(endpoints=[{"addresses": "10.0.0.1"}]),
            ("error", "EndpointSlice default/s", "endpoints[0].addresses", "expected a list, got a string"),
        ),
        (
            _slice(endpoints=[{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]),
            ("error", "EndpointSlice default/s", "endpoints[0].conditions.ready", "expected a boolean, got a string"),
        ),
        (
            _slice(endpoints=[{"addresses": ["10.0.0.1"], "targetRef": "pod/x"}]),
            ("error", "EndpointSlice default/s", "endpoints[0].targetRef", "expected a mapping, got a string"),
        ),
        (
            _slice(ports=[{"port": 0}]),
            ("error", "EndpointSlice default/s", "ports[0].port", "must be from 1 to 65535, got 0"),
        ),
        (
            _slice(ports=[{"name": {"a": 1}, "port": 80}]),
            ("error", "EndpointSlice default/s", "ports[0].name", "expected a string, got a mapping"),
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "s", "annotations": "x"},
                "spec": {"ports": [{"port": 80}]},
            },
            ("error", "Service default/s", "metadata.annotations", "expected a mapping, got a string"),
        ),
        (
            {"apiVersion": ["v1"], "kind": "Service", "metadata": {"name": "s"}},
            ("error", "Service s", "apiVersion", "Service is read under v1"),
        ),
        (
            {"apiVersion": "v1", "kind": ["Service"], "metadata": {"name": "s"}},
            ("warning", "['Service'] s", "kind", "not a kind meshproxy reads: ignored"),
        ),
    ],
)
def test_malformed_objects_are_problems_not_exceptions(obj, expected):
    """A directory of YAML has no API server to check Pods and EndpointSlices: parse must."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}
    model = parsed(svc, obj)
    assert [(p.severity, p.resource, p.path, p.message) for p in model.problems] == [expected]
    assert [s.meta.name for s in model.services] == ["a"]


def test_an_fqdn_slice_is_not_checked_for_ip_addresses():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}
    eps = _slice(
        metadata={"name": "s", "labels": {"kubernetes.io/service-name": "a"}},
        addressType="FQDN",
        endpoints=[{"addresses": ["a.example.com"]}],
    )
    model = parsed(svc, eps)
    assert model.problems == []
    assert model.services[0].endpoints == {80: []}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (70000, "must be from 1 to 65535, got 70000"),
        (0, "must be from 1 to 65535, got 0"),
        (True, "expected a port number or name, got a boolean"),
        ([80], "expected a port number or name, got a list"),
    ],
)
def test_kubernetes_target_port_range(target, message):
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "a"},
        "spec": {"ports": [{"port": 80, "targetPort": target}]},
    }
    assert error(svc) == ("spec.ports[0].targetPort", message)


def test_duration_beyond_protobuf_range():
    assert parse_duration("87600000h", "t") == 315_360_000_000.0  # 10,000 years of 365 days: fits
    with pytest.raises(Invalid) as e:
        parse_duration("100000000h", "spec.http[0].timeout")
    assert (e.value.path, e.value.message) == (
        "spec.http[0].timeout",
        "'100000000h' is longer than a protobuf Duration can be (10000 years)",
    )
