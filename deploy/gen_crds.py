"""The CustomResourceDefinitions of deploy/: the Istio-shaped kinds, their OpenAPI v3 schemas written once.

``python deploy/gen_crds.py`` writes ``deploy/crds/meshproxy.io.yaml`` (our group, ``meshproxy.io/v1alpha1``,
in the base) and ``deploy/istio-crds/crds.yaml`` (the same kinds under ``networking.istio.io`` and
``security.istio.io`` with Istio's versions and names, for clusters without Istio); ``--check`` exits 1 when
either file differs from what would be written. The schemas are structural (every node typed), shaped as
Istio's CRDs shape them: the fields control/model.py reads, and also the ones it refuses or ignores, because
the API server prunes a field its schema does not name and a refused ``redirect`` must reach the control
plane to be refused rather than vanish. ``x-kubernetes-preserve-unknown-fields`` is on ``status`` only, as
in Istio's. meshproxy's extensions (``retryBudget``, ``healthCheck``, ``match[].grpc``) are in both groups:
on our Istio-group CRDs they survive; Istio's own CRDs prune them, so use the ``meshproxy.io`` group for them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["GROUP", "ISTIO_GROUPS", "KINDS", "crds", "render", "schema"]

DEPLOY = Path(__file__).resolve().parent
GROUP = "meshproxy.io"
VERSION = "v1alpha1"
#: Istio's groups -> (served versions, the storage version), as Istio's own CRDs declare them.
ISTIO_GROUPS = {
    "networking.istio.io": (("v1", "v1alpha3", "v1beta1"), "v1alpha3"),
    "security.istio.io": (("v1", "v1beta1"), "v1beta1"),
}
OUTPUTS = {
    "base": DEPLOY / "crds" / "meshproxy.io.yaml",
    "istio": DEPLOY / "istio-crds" / "crds.yaml",
}

Schema = dict[str, Any]

# -- building blocks ------------------------------------------------------------------------------


def _d(schema: Schema, description: str | None) -> Schema:
    return {"description": description, **schema} if description else schema


def string(description: str | None = None, **kw: Any) -> Schema:
    return _d({"type": "string", **kw}, description)


def boolean(description: str | None = None, *, nullable: bool = False) -> Schema:
    return _d({"type": "boolean", **({"nullable": True} if nullable else {})}, description)


def int32(description: str | None = None, *, nullable: bool = False, **kw: Any) -> Schema:
    return _d({"type": "integer", "format": "int32", **({"nullable": True} if nullable else {}), **kw}, description)


def uint32(description: str | None = None, *, nullable: bool = False) -> Schema:
    extra = {"nullable": True} if nullable else {}
    return _d({"type": "integer", "minimum": 0, "maximum": 4294967295, **extra}, description)


def uint64(description: str | None = None) -> Schema:
    return _d({"type": "integer", "minimum": 0}, description)


def number(description: str | None = None, **kw: Any) -> Schema:
    return _d({"type": "number", "format": "double", **kw}, description)


def port_number(description: str | None = None) -> Schema:
    return _d({"type": "integer", "minimum": 1, "maximum": 65535}, description)


def enum(values: tuple[str, ...], description: str | None = None) -> Schema:
    return _d({"type": "string", "enum": list(values)}, description)


def array(items: Schema, description: str | None = None, **kw: Any) -> Schema:
    return _d({"type": "array", "items": items, **kw}, description)


def strings(description: str | None = None, **kw: Any) -> Schema:
    return array(string(), description, **kw)


def obj(properties: dict[str, Schema], description: str | None = None, *, required: tuple[str, ...] = ()) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    return _d(out, description)


def string_map(description: str | None = None, values: Schema | None = None) -> Schema:
    return _d({"type": "object", "additionalProperties": values or string()}, description)


def one_of(schema: Schema, *groups: tuple[str, ...], optional: bool = True) -> Schema:
    """At most one (or, ``optional=False``, exactly one) of each group's fields, as Istio's CRDs say it:
    value validations only inside ``oneOf``, so the schema stays structural."""
    branches: list[Schema] = [{"required": [f]} for group in groups for f in group]
    if optional:
        branches.insert(0, {"not": {"anyOf": [{"required": [f]} for group in groups for f in group]}})
    return {**schema, "oneOf": branches}


#: Go's duration syntax as control/model.py parses it ("10s", "1.5s", "1m30s", "100ms").
DURATION_PATTERN = r"^((\d+(\.\d*)?|\.\d+)(h|ms|m|us|µs|ns|s))+$"


def duration(description: str | None = None) -> Schema:
    return string(description, pattern=DURATION_PATTERN)


#: A namespace name, or Istio's ".", "*" and "~".
EXPORT_TO = strings(
    "Namespaces the resource is visible in: '.' (its own), '*' (all, the default), '~' (none) or names."
)


def workload_selector(key: str = "matchLabels") -> Schema:
    return obj({key: string_map("Labels of the workloads this applies to.")})


# -- shared Istio messages ------------------------------------------------------------------------

STRING_MATCH = one_of(
    obj(
        {
            "exact": string("The whole value."),
            "prefix": string("A prefix of the value."),
            "regex": string("An RE2 regular expression matching the whole value."),
        }
    ),
    ("exact", "prefix", "regex"),
)
PERCENT = obj({"value": number(minimum=0, maximum=100)})
PORT_SELECTOR = obj({"number": port_number()})
DESTINATION = obj(
    {
        "host": string("A Service name (short names resolve in the resource's namespace) or a ServiceEntry host."),
        "subset": string("A subset of the host's DestinationRule."),
        "port": PORT_SELECTOR,
    },
    required=("host",),
)
HEADER_OPERATIONS = obj({"set": string_map(), "add": string_map(), "remove": strings()})
HEADERS = obj({"request": HEADER_OPERATIONS, "response": HEADER_OPERATIONS})


def retry_budget() -> Schema:
    return obj(
        {
            "retryRatio": number("Retries allowed per original request (0.2: one retry per five requests).", minimum=0),
            "minRetriesPerSecond": int32("Retries always allowed, whatever the ratio.", minimum=0),
            "ttl": duration("How long a request counts towards the ratio."),
        },
        "meshproxy extension: Linkerd's retry budget.",
    )


# -- VirtualService -------------------------------------------------------------------------------


def _http_match() -> Schema:
    string_matches = string_map(values=STRING_MATCH)
    return obj(
        {
            "name": string(),
            "uri": STRING_MATCH,
            "scheme": STRING_MATCH,
            "method": STRING_MATCH,
            "authority": STRING_MATCH,
            "headers": string_matches,
            "withoutHeaders": string_matches,
            "queryParams": string_matches,
            "port": port_number(),
            "sourceLabels": string_map(),
            "sourceNamespace": string(),
            "gateways": strings(),
            "ignoreUriCase": boolean(),
            "statPrefix": string(),
            "grpc": obj(
                {"service": string("The fully qualified service, e.g. helloworld.Greeter."), "method": string()},
                "meshproxy extension: match a gRPC service and, optionally, one of its methods.",
            ),
        }
    )


def _http_route() -> Schema:
    return obj(
        {
            "name": string(),
            "match": array(_http_match()),
            "route": array(
                obj({"destination": DESTINATION, "weight": int32(), "headers": HEADERS}, required=("destination",))
            ),
            "redirect": one_of(
                obj(
                    {
                        "uri": string(),
                        "authority": string(),
                        "port": port_number(),
                        "derivePort": enum(("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")),
                        "scheme": string(),
                        "redirectCode": uint32(),
                    }
                ),
                ("port", "derivePort"),
            ),
            "directResponse": obj(
                {
                    "status": uint32(),
                    "body": one_of(obj({"string": string(), "bytes": string(format="binary")}), ("string", "bytes")),
                },
                required=("status",),
            ),
            "delegate": obj({"name": string(), "namespace": string()}),
            "rewrite": obj(
                {
                    "uri": string(),
                    "authority": string(),
                    "uriRegexRewrite": obj({"match": string(), "rewrite": string()}),
                }
            ),
            "timeout": duration("The request's deadline, retries included."),
            "retries": obj(
                {
                    "attempts": int32(),
                    "perTryTimeout": duration(),
                    "retryOn": string(),
                    "retryRemoteLocalities": boolean(nullable=True),
                    "retryIgnorePreviousHosts": boolean(nullable=True),
                    "backoff": duration(),
                    "retryBudget": retry_budget(),
                }
            ),
            "fault": obj(
                {
                    "delay": one_of(
                        obj(
                            {
                                "fixedDelay": duration(),
                                "exponentialDelay": duration(),
                                "percentage": PERCENT,
                                "percent": int32(),
                            }
                        ),
                        ("fixedDelay", "exponentialDelay"),
                    ),
                    "abort": one_of(
                        obj(
                            {
                                "httpStatus": int32(),
                                "grpcStatus": string(),
                                "http2Error": string(),
                                "percentage": PERCENT,
                            }
                        ),
                        ("httpStatus", "grpcStatus", "http2Error"),
                    ),
                }
            ),
            "mirror": DESTINATION,
            "mirrors": array(obj({"destination": DESTINATION, "percentage": PERCENT}, required=("destination",))),
            "mirrorPercentage": PERCENT,
            "mirror_percent": uint32(nullable=True),
            "corsPolicy": obj(
                {
                    "allowOrigins": array(STRING_MATCH),
                    "allowOrigin": strings(),
                    "allowMethods": strings(),
                    "allowHeaders": strings(),
                    "exposeHeaders": strings(),
                    "maxAge": duration(),
                    "allowCredentials": boolean(nullable=True),
                    "unmatchedPreflights": enum(("UNSPECIFIED", "FORWARD", "IGNORE")),
                }
            ),
            "headers": HEADERS,
        }
    )


def _l4_route() -> Schema:
    return array(obj({"destination": DESTINATION, "weight": int32()}, required=("destination",)))


def virtual_service() -> Schema:
    return obj(
        {
            "hosts": strings("The hosts this routes: Service names or ServiceEntry hosts."),
            "gateways": strings("'mesh' (sidecars) is the only one meshproxy has."),
            "http": array(_http_route(), "HTTP/2 and gRPC routes, first match wins."),
            "tls": array(
                obj(
                    {
                        "match": array(
                            obj(
                                {
                                    "sniHosts": strings(),
                                    "destinationSubnets": strings(),
                                    "port": port_number(),
                                    "sourceLabels": string_map(),
                                    "gateways": strings(),
                                    "sourceNamespace": string(),
                                },
                                required=("sniHosts",),
                            )
                        ),
                        "route": _l4_route(),
                    },
                    required=("match",),
                ),
                "Not supported yet: refused by the control plane.",
            ),
            "tcp": array(
                obj(
                    {
                        "match": array(
                            obj(
                                {
                                    "destinationSubnets": strings(),
                                    "port": port_number(),
                                    "sourceSubnet": string(),
                                    "sourceLabels": string_map(),
                                    "gateways": strings(),
                                    "sourceNamespace": string(),
                                }
                            )
                        ),
                        "route": _l4_route(),
                    }
                ),
                "Not supported yet: refused by the control plane.",
            ),
            "exportTo": EXPORT_TO,
        },
        "Routing rules for requests to the hosts: Istio's VirtualService.",
    )


# -- DestinationRule ------------------------------------------------------------------------------


def _load_balancer() -> Schema:
    hash_ = one_of(
        obj(
            {
                "httpHeaderName": string("Hash on this request header."),
                "httpCookie": obj(
                    {
                        "name": string(),
                        "path": string(),
                        "ttl": duration(),
                        "attributes": array(obj({"name": string(), "value": string()}, required=("name",))),
                    },
                    required=("name",),
                ),
                "useSourceIp": boolean(),
                "httpQueryParameterName": string(),
                "ringHash": obj({"minimumRingSize": uint64()}),
                "maglev": obj({"tableSize": uint64()}),
                "minimumRingSize": uint64(),
            }
        ),
        ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
    )
    hash_ = {**hash_, "allOf": [one_of({}, ("ringHash", "maglev"))]}
    locality = obj(
        {
            "distribute": array(obj({"from": string(), "to": string_map(values=uint32())})),
            "failover": array(obj({"from": string(), "to": string()})),
            "failoverPriority": strings(),
            "enabled": boolean(nullable=True),
        }
    )
    return one_of(
        obj(
            {
                "simple": enum(("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")),
                "consistentHash": hash_,
                "localityLbSetting": locality,
                "warmupDurationSecs": duration(),
                "warmup": obj(
                    {
                        "duration": duration(),
                        "minimumPercent": number(minimum=0, maximum=100, nullable=True),
                        "aggression": number(minimum=1, nullable=True),
                    },
                    required=("duration",),
                ),
            }
        ),
        ("simple", "consistentHash"),
    )


def _connection_pool() -> Schema:
    return obj(
        {
            "tcp": obj(
                {
                    "maxConnections": int32(),
                    "connectTimeout": duration(),
                    "tcpKeepalive": obj({"probes": uint32(), "time": duration(), "interval": duration()}),
                    "maxConnectionDuration": duration(),
                    "idleTimeout": duration(),
                }
            ),
            "http": obj(
                {
                    "http1MaxPendingRequests": int32(),
                    "http2MaxRequests": int32(),
                    "maxRequestsPerConnection": int32(),
                    "maxRetries": int32(),
                    "idleTimeout": duration(),
                    "h2UpgradePolicy": enum(("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")),
                    "useClientProtocol": boolean(),
                    "maxConcurrentStreams": int32(),
                }
            ),
        }
    )


def _outlier_detection() -> Schema:
    return obj(
        {
            "splitExternalLocalOriginErrors": boolean(),
            "consecutiveLocalOriginFailures": uint32(nullable=True),
            "consecutiveGatewayErrors": uint32(nullable=True),
            "consecutive5xxErrors": uint32(nullable=True),
            "interval": duration(),
            "baseEjectionTime": duration(),
            "maxEjectionPercent": int32(),
            "minHealthPercent": int32(),
            "consecutiveErrors": int32(),
        }
    )


def _client_tls() -> Schema:
    return obj(
        {
            "mode": enum(("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")),
            "clientCertificate": string(),
            "privateKey": string(),
            "caCertificates": string(),
            "credentialName": string(),
            "subjectAltNames": strings(),
            "sni": string(),
            "insecureSkipVerify": boolean(nullable=True),
            "caCrl": string(),
        }
    )


def _traffic_policy(*, top: bool) -> Schema:
    props: dict[str, Schema] = {
        "loadBalancer": _load_balancer(),
        "connectionPool": _connection_pool(),
        "outlierDetection": _outlier_detection(),
        "tls": _client_tls(),
    }
    if top:
        props |= {
            "portLevelSettings": array(
                obj({"port": PORT_SELECTOR, **props}),
                "Not supported: ignored by the control plane.",
            ),
            "tunnel": obj(
                {"protocol": string(), "targetHost": string(), "targetPort": port_number()},
                required=("targetHost", "targetPort"),
            ),
            "proxyProtocol": obj({"version": enum(("V1", "V2"))}),
            "retryBudget": retry_budget(),
            "healthCheck": obj(
                {
                    "interval": duration("Between checks of one endpoint (default 10s)."),
                    "timeout": duration("For one check (default 1s)."),
                    "unhealthyThreshold": int32(minimum=1),
                    "healthyThreshold": int32(minimum=1),
                    "grpcServiceName": string("The service name sent in grpc.health.v1.HealthCheckRequest."),
                },
                "meshproxy extension: active grpc.health.v1 checks of every endpoint.",
            ),
        }
    return obj(props)


def destination_rule() -> Schema:
    return obj(
        {
            "host": string("The Service name or ServiceEntry host this applies to."),
            "trafficPolicy": _traffic_policy(top=True),
            "subsets": array(
                obj(
                    {
                        "name": string(),
                        "labels": string_map("The labels of the endpoints in the subset."),
                        "trafficPolicy": _traffic_policy(top=False),
                    },
                    required=("name",),
                )
            ),
            "exportTo": EXPORT_TO,
            "workloadSelector": workload_selector(),
        },
        "Policies for traffic to a host, and its subsets: Istio's DestinationRule.",
        required=("host",),
    )


# -- ServiceEntry ---------------------------------------------------------------------------------


def service_entry() -> Schema:
    return obj(
        {
            "hosts": strings("The names the entry brings into the mesh."),
            "addresses": strings(),
            "ports": array(
                obj(
                    {
                        "number": port_number(),
                        "protocol": string("GRPC, HTTP2, HTTP, HTTPS, TCP, TLS, MONGO, REDIS or MYSQL."),
                        "name": string(),
                        "targetPort": port_number(),
                    },
                    required=("number", "name"),
                )
            ),
            "location": enum(("MESH_EXTERNAL", "MESH_INTERNAL")),
            "resolution": enum(("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")),
            "endpoints": array(
                obj(
                    {
                        "address": string(),
                        "ports": string_map(values=port_number()),
                        "labels": string_map(),
                        "network": string(),
                        "locality": string(),
                        "weight": uint32(),
                        "serviceAccount": string(),
                    }
                )
            ),
            "workloadSelector": workload_selector("labels"),
            "exportTo": EXPORT_TO,
            "subjectAltNames": strings(),
        },
        "A destination outside Kubernetes' Services: Istio's ServiceEntry.",
        required=("hosts",),
    )


# -- security -------------------------------------------------------------------------------------

_MTLS_MODE = obj({"mode": enum(("UNSET", "DISABLE", "PERMISSIVE", "STRICT"))})


def peer_authentication() -> Schema:
    return obj(
        {
            "selector": workload_selector(),
            "mtls": _MTLS_MODE,
            "portLevelMtls": string_map("Port number -> mode (needs a selector).", _MTLS_MODE),
        },
        "Mutual TLS for traffic to the workloads: Istio's PeerAuthentication.",
    )


_TARGET_REF = obj(
    {"group": string(), "kind": string(), "name": string(), "namespace": string()}, required=("kind", "name")
)
_SOURCE_FIELDS = (
    "principals",
    "requestPrincipals",
    "namespaces",
    "serviceAccounts",
    "ipBlocks",
    "remoteIpBlocks",
)
_OPERATION_FIELDS = ("hosts", "ports", "methods", "paths")


def _positive_and_negative(fields: tuple[str, ...]) -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for f in fields:
        out[f] = strings()
        out["not" + f[0].upper() + f[1:]] = strings()
    return out


def authorization_policy() -> Schema:
    return obj(
        {
            "selector": workload_selector(),
            "targetRef": _TARGET_REF,
            "targetRefs": array(_TARGET_REF),
            "rules": array(
                obj(
                    {
                        "from": array(obj({"source": obj(_positive_and_negative(_SOURCE_FIELDS))})),
                        "to": array(obj({"operation": obj(_positive_and_negative(_OPERATION_FIELDS))})),
                        "when": array(
                            obj({"key": string(), "values": strings(), "notValues": strings()}, required=("key",))
                        ),
                    }
                )
            ),
            "action": enum(("ALLOW", "DENY", "AUDIT", "CUSTOM")),
            "provider": obj({"name": string()}),
        },
        "Access control for the workloads: Istio's AuthorizationPolicy.",
    )


# -- the CRDs -------------------------------------------------------------------------------------


#: kind -> (plural, Istio group, Istio short name, spec schema, extra printer columns).
KINDS: dict[str, tuple[str, str, str, Any, list[dict[str, str]]]] = {
    "VirtualService": (
        "virtualservices",
        "networking.istio.io",
        "vs",
        virtual_service,
        [
            {"name": "Gateways", "type": "string", "jsonPath": ".spec.gateways"},
            {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"},
        ],
    ),
    "DestinationRule": (
        "destinationrules",
        "networking.istio.io",
        "dr",
        destination_rule,
        [{"name": "Host", "type": "string", "jsonPath": ".spec.host"}],
    ),
    "ServiceEntry": (
        "serviceentries",
        "networking.istio.io",
        "se",
        service_entry,
        [
            {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"},
            {"name": "Location", "type": "string", "jsonPath": ".spec.location"},
            {"name": "Resolution", "type": "string", "jsonPath": ".spec.resolution"},
        ],
    ),
    "PeerAuthentication": (
        "peerauthentications",
        "security.istio.io",
        "pa",
        peer_authentication,
        [{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}],
    ),
    "AuthorizationPolicy": (
        "authorizationpolicies",
        "security.istio.io",
        "ap",
        authorization_policy,
        [{"name": "Action", "type": "string", "jsonPath": ".spec.action"}],
    ),
}


def schema(kind: str) -> Schema:
    """The whole object's openAPIV3Schema: ``spec``, and ``status`` kept as written (as Istio's CRDs keep it)."""
    spec = KINDS[kind][3]()
    return {
        "type": "object",
        "properties": {
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "required": ["spec"],
    }


def _crd(kind: str, group: str, versions: tuple[str, ...], storage: str, *, istio: bool) -> dict[str, Any]:
    plural, _, short, _, columns = KINDS[kind]
    names: dict[str, Any] = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()}
    if istio:
        # Istio's own names, so `kubectl get vs` works as with Istio; our group has none (they would clash
        # with Istio's when both are installed).
        names["shortNames"] = [short]
        names["categories"] = ["istio-io", group.replace(".", "-")]
    else:
        names["categories"] = ["meshproxy"]
    columns = [*columns, {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": names,
            "scope": "Namespaced",
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": v == storage,
                    "schema": {"openAPIV3Schema": schema(kind)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
                for v in versions
            ],
        },
    }


def crds(which: str) -> list[dict[str, Any]]:
    """``base``: our group's CRDs; ``istio``: the Istio groups' (deploy/istio-crds, optional)."""
    if which == "base":
        return [_crd(kind, GROUP, (VERSION,), VERSION, istio=False) for kind in KINDS]
    out = []
    for kind, (_, group, *_rest) in KINDS.items():
        versions, storage = ISTIO_GROUPS[group]
        out.append(_crd(kind, group, versions, storage, istio=True))
    return out


class _Dumper(yaml.SafeDumper):
    """No anchors: the shared messages (STRING_MATCH, DESTINATION, ...) are written out where they are used."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(which: str) -> str:
    header = "# Generated by deploy/gen_crds.py: edit that file and run it, not this one.\n"
    body = yaml.dump_all(crds(which), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gen_crds.py", description="Write deploy/'s CustomResourceDefinitions.")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is not what would be written")
    args = parser.parse_args(argv)
    stale = []
    for which, path in OUTPUTS.items():
        text = render(which)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"gen_crds.py: {path.relative_to(DEPLOY.parent)} is out of date: run python deploy/gen_crds.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
