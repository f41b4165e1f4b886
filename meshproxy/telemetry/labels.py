"""Metric labels: Istio's standard label set for each (reporter, destination) a request can have,
interned as small integer ids that the compiled counters are keyed by.

Owns what a label *means* (where each value comes from, and "unknown" when nothing says) and
the tables from id to label values. Ids are stable for the life of the process: the same
label values always get the same id, so counters keyed by an id never need moving when the
config changes, and a table grows only with distinct label sets (workload, app, version,
service...: never with endpoint addresses).

Where the values come from:

- reporter: "destination" for the transparent listener named ``inbound`` and the per-port
  listeners of its local clusters (``inbound|<port>||``), "source" for every other listener;
- the reporting side is this sidecar's node (``meshproxy.v1.Node``): ``namespace``,
  ``workload`` and its ``labels``; the other side's workload, before mTLS, is not known and is
  "unknown" (as Istio without peer metadata);
- a destination endpoint's values come from ``Endpoint.labels``, which the control plane fills
  with the Pod's labels plus ``meshproxy.io/workload`` and ``meshproxy.io/namespace``
  (``WORKLOAD_KEY``, ``NAMESPACE_KEY``); app, version, canonical service and revision are read
  from the usual Kubernetes/Istio label keys (``app``/``app.kubernetes.io/name``,
  ``version``/``app.kubernetes.io/version``, ``service.istio.io/canonical-name`` and
  ``-revision``), as Istio reads them;
- destination_service is the cluster's service host (an Istio-style name
  ``outbound|<port>|<subset>|<host>`` gives ``host``; any other cluster name is itself);
  ``<name>.<namespace>.svc...`` hosts give destination_service_name and _namespace;
- connection_security_policy is "unknown" for reporter source (as Istio) and, for reporter
  destination, "mutual_tls" when the request came over mTLS (``with_peer``: source_principal
  is then the peer's SPIFFE id, and its namespace the source namespace) or "none"; the
  principals are "unknown" otherwise.

The per-request labels (request_protocol, response_code, grpc_response_status,
response_flags) are not here: the compiled counters keep them beside the id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BASE_LABELS",
    "NAMESPACE_KEY",
    "REQUEST_LABELS",
    "ROUTE_LABELS",
    "UNKNOWN",
    "WORKLOAD_KEY",
    "Labeller",
    "is_inbound",
    "service_of_cluster",
]

UNKNOWN = "unknown"
#: Endpoint label keys the control plane sets to the endpoint's workload and namespace.
WORKLOAD_KEY = "meshproxy.io/workload"
NAMESPACE_KEY = "meshproxy.io/namespace"
#: Istio's name for connections to destinations no cluster knows.
PASSTHROUGH = "PassthroughCluster"

#: The labels an id stands for, in exposition order (Istio's standard metrics).
BASE_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "connection_security_policy",
)
_SOURCE_NAMESPACE = BASE_LABELS.index("source_workload_namespace")
_SOURCE_PRINCIPAL = BASE_LABELS.index("source_principal")
_SECURITY_POLICY = BASE_LABELS.index("connection_security_policy")
#: Added per request by the counters (HTTP requests only; TCP metrics have BASE_LABELS alone).
REQUEST_LABELS = ("request_protocol", "response_code", "grpc_response_status", "response_flags")
#: The labels of a route id.
ROUTE_LABELS = ("listener", "virtual_host", "route")

_INBOUND = "inbound"


def is_inbound(listener: str) -> bool:
    """Whether requests on ``listener`` are reported by the destination: the transparent inbound
    listener, and the per-port listeners its HTTP/2 connections are handed to."""
    return listener == _INBOUND or listener.startswith("inbound|")


def service_of_cluster(name: str) -> str:
    """The service host a cluster stands for: ``outbound|9080||reviews.default.svc.cluster.local``
    gives ``reviews.default.svc.cluster.local``; a name of another form is the host itself."""
    if name.startswith("outbound|"):
        parts = name.split("|", 3)
        if len(parts) == 4 and parts[3]:
            return parts[3]
    return name


def _first(labels: Mapping[str, str], *keys: str) -> str:
    for k in keys:
        v = labels.get(k)
        if v:
            return v
    return ""


class _Workload:
    """One side's workload labels: (workload, namespace, app, version, canonical service, revision)."""

    __slots__ = ("app", "canonical_revision", "canonical_service", "namespace", "version", "workload")

    def __init__(self, workload: str, namespace: str, labels: Mapping[str, str]) -> None:
        self.workload = workload or UNKNOWN
        self.namespace = namespace or UNKNOWN
        self.app = _first(labels, "app", "app.kubernetes.io/name") or UNKNOWN
        self.version = _first(labels, "version", "app.kubernetes.io/version") or UNKNOWN
        # Istio's canonical service: its label, else the app's name, else the workload's.
        self.canonical_service = (
            _first(labels, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app") or workload or UNKNOWN
        )
        self.canonical_revision = (
            _first(labels, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version") or "latest"
        )


_NOBODY = _Workload("", "", {})


def _service_parts(host: str, fallback_namespace: str) -> tuple[str, str]:
    """(name, namespace) of a service host: ``reviews.default.svc.cluster.local`` -> reviews,
    default; another host is its own name, in ``fallback_namespace``."""
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc" and parts[0] and parts[1]:
        return parts[0], parts[1]
    return host, fallback_namespace


class Labeller:
    """Interns label sets as ids: ``base`` ids (Istio labels of a reporter/destination pair) and
    ``route`` ids (listener, virtual host, route).

    ``set_node(node)`` says who this sidecar is (a ``meshproxy.v1.Node`` or None); the ids
    already handed out keep their labels, and new lookups use the new node. Lookups are for
    config time and first use (a dict lookup on a tuple); the request path reads the id cached
    on the endpoint or route instead.
    """

    __slots__ = ("_bases", "_node", "_route_ids", "_routes", "_table")

    def __init__(self, node: Any = None) -> None:
        self._table: list[tuple[str, ...]] = []
        self._bases: dict[tuple[str, ...], int] = {}
        self._routes: list[tuple[str, str, str]] = []
        self._route_ids: dict[tuple[str, str, str], int] = {}
        self._node = _NOBODY
        self.set_node(node)

    def set_node(self, node: Any) -> None:
        if node is None:
            self._node = _NOBODY
        else:
            self._node = _Workload(node.workload, node.namespace, dict(node.labels))

    # -- ids -------------------------------------------------------------------------------------

    def _intern(self, values: tuple[str, ...]) -> int:
        i = self._bases.get(values)
        if i is None:
            i = self._bases[values] = len(self._table)
            self._table.append(values)
        return i

    def _base(self, inbound: bool, dest: _Workload, service: str, service_name: str, service_ns: str) -> int:
        node = self._node
        if inbound:
            # Reported by the destination (this sidecar); the source is unknown until mTLS tells.
            src, dst = _NOBODY, node
            policy = "none"
        else:
            src, dst = node, dest
            policy = UNKNOWN
        return self._intern(
            (
                "destination" if inbound else "source",
                src.workload,
                src.namespace,
                UNKNOWN,
                src.app,
                src.version,
                src.canonical_service,
                src.canonical_revision,
                dst.workload,
                dst.namespace,
                UNKNOWN,
                dst.app,
                dst.version,
                service,
                service_name,
                service_ns,
                dst.canonical_service,
                dst.canonical_revision,
                policy,
            )
        )

    def endpoint_base(self, listener: str, cluster: str, labels: Mapping[str, str]) -> int:
        """The id of requests on ``listener`` sent to an endpoint (of ``cluster``) with ``labels``."""
        if is_inbound(listener):
            return self._inbound_base()
        dest = _Workload(labels.get(WORKLOAD_KEY, ""), labels.get(NAMESPACE_KEY, ""), labels)
        host = service_of_cluster(cluster)
        name, ns = _service_parts(host, dest.namespace)
        return self._base(False, dest, host, name, ns)

    def cluster_base(self, listener: str, cluster: str | None) -> int:
        """The id of requests on ``listener`` that reached no endpoint: of ``cluster`` (no healthy
        endpoint, overflow...) or of no cluster at all (None: no route, a direct response)."""
        if is_inbound(listener):
            return self._inbound_base()
        if cluster is None:
            return self._base(False, _NOBODY, UNKNOWN, UNKNOWN, UNKNOWN)
        host = service_of_cluster(cluster)
        name, ns = _service_parts(host, UNKNOWN)
        return self._base(False, _NOBODY, host, name, ns)

    def passthrough_base(self, listener: str) -> int:
        """The id of TCP passthroughs on ``listener`` to a destination no cluster knows."""
        if is_inbound(listener):
            return self._inbound_base()
        return self._base(False, _NOBODY, UNKNOWN, PASSTHROUGH, UNKNOWN)

    def _inbound_base(self) -> int:
        node = self._node
        return self._base(True, node, UNKNOWN, node.canonical_service, node.namespace)

    def with_peer(self, base: int, spiffe_id: str, namespace: str) -> int:
        """The id of ``base``'s requests that came over mTLS from the peer ``spiffe_id`` (in
        ``namespace``): source_principal is its SPIFFE id, connection_security_policy
        "mutual_tls", and, when nothing else said it, the source namespace is the id's."""
        values = list(self._table[base])
        values[_SOURCE_PRINCIPAL] = spiffe_id
        if values[_SOURCE_NAMESPACE] == UNKNOWN and namespace:
            values[_SOURCE_NAMESPACE] = namespace
        values[_SECURITY_POLICY] = "mutual_tls"
        return self._intern(tuple(values))

    def route_id(self, listener: str, virtual_host: str, route: str) -> int:
        key = (listener, virtual_host, route)
        i = self._route_ids.get(key)
        if i is None:
            i = self._route_ids[key] = len(self._routes)
            self._routes.append(key)
        return i

    # -- back to labels --------------------------------------------------------------------------

    def labels(self, base: int) -> tuple[str, ...]:
        """The values of ``BASE_LABELS`` for ``base``."""
        return self._table[base]

    def route_labels(self, route_id: int) -> tuple[str, str, str]:
        """The values of ``ROUTE_LABELS`` for ``route_id``."""
        return self._routes[route_id]

    def __len__(self) -> int:
        return len(self._table)
