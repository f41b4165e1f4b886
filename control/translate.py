"""Translation: the mesh's resources (a ``control.model.Model``) -> one ``SidecarConfig`` per sidecar scope.

A sidecar's config depends only on its namespace and on those of its labels
that some VirtualService match selects on (``sourceLabels``): that pair is
its *scope*, and sidecars sharing one share a config (computed and
serialized once, however many subscribe).

What a sidecar gets, for every service (a Kubernetes Service or a
ServiceEntry host) exported to its namespace (``exportTo``; the default is
``--default-export-to``):

- a cluster per service port, named as Istio names them
  (``outbound|9080||reviews.default.svc.cluster.local``), with the ready
  endpoints, the DestinationRule's subsets and traffic policy (load
  balancer, connection pool and circuit breakers, outlier detection, retry
  budget);
- on the ``outbound`` listener, a virtual host per service port whose
  domains are the names a client may use (``reviews`` from the same
  namespace, ``reviews.default``, ``reviews.default.svc``, the FQDN; each
  with ``:port``, and bare when the service has a single port), and whose
  routes are the VirtualService's HTTP routes for that port, in order, or a
  single route to the whole cluster when no VirtualService names the host.
  Every route that forwards has a retry policy: the VirtualService's, or
  Istio's default one (``DEFAULT_RETRY_ON``, 2 retries) when it gives none,
  as pilot does; ``attempts: 0`` is a policy of no retries.

Each cluster also lists its ``service_addresses``: the service's cluster IPs
(a ServiceEntry's single-host ``addresses``) with the cluster's port, by
which a transparent sidecar maps a redirected connection to the cluster.

Security (``control.security``): the workload's PeerAuthentication mode,
the AuthorizationPolicies that select it, the trust domain and bundle, and
each cluster's upstream mTLS fill ``SidecarConfig.security`` and
``Cluster.tls``; the labels those policies select on join the scope. They
are filled only once the CA's trust bundle is known (none: no mTLS and no
authorization, as a control plane without a CA).

Resources refused by ``control.model`` never reach here. What can only be
judged across resources is reported once, as warnings, in
``Translator.__init__``: a route to a host, port or subset that does not
exist (yet) keeps its VirtualService, as in Istio, and answers 503 (the
sidecar's "no cluster") until it appears; two services claiming one host,
or two VirtualServices routing one, keep the closest one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration

from control.model import (
    Destination,
    DestinationRule,
    Fault,
    HealthCheck,
    HttpRoute,
    Match,
    Model,
    OutlierDetection,
    Problem,
    Retries,
    RetryBudget,
    Service,
    VirtualService,
)
from control.security import DEFAULT_ROOT_NAMESPACE, Security
from meshproxy.config.v1 import config_pb2 as pb
from meshproxy.telemetry.labels import NAMESPACE_KEY, WORKLOAD_KEY

__all__ = [
    "DEFAULT_NUM_RETRIES",
    "DEFAULT_RETRY_ON",
    "OUTBOUND_ADDRESS",
    "Scope",
    "Translator",
    "cluster_name",
    "version_of",
]

#: Where the outbound listener binds unless the sidecar says otherwise (its --listen).
OUTBOUND_ADDRESS = "127.0.0.1:15001"

#: Istio's default retry policy (pilot's retry.DefaultPolicy): for a route whose VirtualService
#: gives no ``retries``, and for the default route; also the conditions of a policy that gives
#: ``attempts`` but no ``retryOn``. Envoy's "retriable-status-codes" with Istio's codes [503] is
#: "retriable-status-codes" and "503" here.
DEFAULT_NUM_RETRIES = 2
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes", "503")

# Envoy's max_ejection_time is the larger of 300s and base_ejection_time when unset; the sidecar's is 300s.
_DEFAULT_MAX_EJECTION_S = 300.0

#: (namespace, the labels that matter, sorted) -> one config.
Scope = tuple[str, tuple[tuple[str, str], ...]]

_LB = {
    "": pb.Cluster.PEAK_EWMA,
    "ROUND_ROBIN": pb.Cluster.ROUND_ROBIN,
    "LEAST_REQUEST": pb.Cluster.LEAST_REQUEST,
    "RANDOM": pb.Cluster.RANDOM,
    "RING_HASH": pb.Cluster.RING_HASH,
}


def cluster_name(host: str, port: int) -> str:
    return f"outbound|{port}||{host}"


def version_of(cfg: pb.SidecarConfig) -> str:
    """The version of a config: a digest of its content, so equal configs have equal versions."""
    return hashlib.sha256(cfg.SerializeToString(deterministic=True)).hexdigest()[:16]


def _visible(export_to: tuple[str, ...] | None, owner: str, namespace: str, default: tuple[str, ...]) -> bool:
    for e in export_to or default:
        if e == "*" or (e == "." and owner == namespace) or e == namespace:
            return True
    return False


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _endpoint_address(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Translator:
    """Indexes one Model; ``config(namespace, labels)`` builds a sidecar's config from it."""

    def __init__(
        self,
        model: Model,
        *,
        default_export_to: tuple[str, ...] = ("*",),
        trust_domain: str = "cluster.local",
        trust_bundle: tuple[str, ...] | list[str] = (),
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.model = model
        self.default_export_to = default_export_to
        self.problems: list[Problem] = list(model.problems)
        self.security = Security(
            model,
            trust_domain=trust_domain,
            trust_bundle=trust_bundle,
            root_namespace=root_namespace,
            default_export_to=default_export_to,
        )
        self.problems.extend(self.security.problems)
        self.services: dict[str, Service] = {}
        # Kubernetes Services first: a ServiceEntry cannot take over a Service's host.
        for svc in sorted(model.services, key=lambda s: (not s.kubernetes, s.meta.namespace, s.meta.name)):
            other = self.services.get(svc.host)
            if other is not None:
                self._warn(svc.meta, f"host {svc.host} is already defined by {other.meta}: this one is ignored for it")
                continue
            self.services[svc.host] = svc
        # The "ip:port" each cluster answers on (its service_addresses), by host and port; one
        # address belongs to one cluster, Kubernetes Services first, as for hosts.
        self.service_addresses: dict[tuple[str, int], list[str]] = {}
        claimed: dict[str, Service] = {}
        for svc in sorted(self.services.values(), key=lambda s: (not s.kubernetes, s.meta.namespace, s.meta.name)):
            for port in svc.ports:
                for ip in svc.addresses:
                    address = _endpoint_address(ip, port.number)
                    other = claimed.get(address)
                    if other is not None:
                        self._warn(svc.meta, f"{address} is already the address of {other.meta}: ignored for this one")
                        continue
                    claimed[address] = svc
                    self.service_addresses.setdefault((svc.host, port.number), []).append(address)
        self.rules: dict[str, list[DestinationRule]] = {}
        for dr in model.destination_rules:
            if dr.host not in self.services:
                self._warn(dr.meta, f"no service has host {dr.host} (yet)", "spec.host")
            self.rules.setdefault(dr.host, []).append(dr)
        self.routes: dict[str, list[VirtualService]] = {}
        self.source_label_keys: set[str] = set()
        for vs in model.virtual_services:
            self._check_virtual_service(vs)
            for i, host in enumerate(vs.hosts):
                if host not in self.services:
                    self._warn(
                        vs.meta, f"{host} is not a known service (yet): no sidecar routes by it", f"spec.hosts[{i}]"
                    )
            for host in vs.hosts:
                self.routes.setdefault(host, []).append(vs)
            for r in vs.http:
                for m in r.matches:
                    self.source_label_keys.update(m.source_labels)
        # A workload's security depends on the labels its policies select on.
        self.source_label_keys |= self.security.label_keys
        for host, vss in self.routes.items():
            for vs in vss[1:]:
                self._warn(
                    vs.meta, f"host {host} is also routed by {vss[0].meta}; a sidecar uses the one closest to it"
                )
        self._cache: dict[Scope, pb.SidecarConfig] = {}

    def _warn(self, meta, message: str, path: str = "") -> None:
        self.problems.append(Problem("warning", str(meta), path, message, meta.origin))

    def _check_virtual_service(self, vs: VirtualService) -> None:
        """Cross-resource checks, as warnings: a destination that does not exist (yet) is what a
        Kubernetes user sees between two ``kubectl apply``s, so, as in Istio, the VirtualService
        stays and that route answers 503 until the host, subset or port appears."""
        subsets: dict[str, set[str]] = {}
        for dr in self.model.destination_rules:
            subsets.setdefault(dr.host, set()).update(s.name for s in dr.subsets)
        for i, r in enumerate(vs.http):
            for j, d in enumerate(r.destinations):
                svc = self.services.get(d.host)
                if svc is None:
                    problem = f"host {d.host} is not a known service (a Kubernetes Service or a ServiceEntry host)"
                elif d.subset and d.subset not in subsets.get(d.host, ()):
                    problem = f"subset {d.subset!r} of {d.host} is not defined by any DestinationRule"
                elif d.port is not None and all(p.number != d.port for p in svc.ports):
                    problem = f"{d.host} has no port {d.port}"
                elif not svc.ports:
                    problem = f"{d.host} has no TCP port"
                elif d.port is None and len(svc.ports) > 1 and d.host not in vs.hosts:
                    problem = f"{d.host} has several ports: set port.number"
                else:
                    continue
                self._warn(vs.meta, f"{problem}: this route answers 503", f"spec.http[{i}].route[{j}].destination")

    # -- scopes -------------------------------------------------------------------------------------

    def scope(self, namespace: str, labels: Mapping[str, str]) -> Scope:
        return namespace, tuple(sorted((k, v) for k, v in labels.items() if k in self.source_label_keys))

    def config(self, namespace: str, labels: Mapping[str, str]) -> pb.SidecarConfig:
        """The config (version set, node unset) of a sidecar in ``namespace`` with ``labels``. Cached by scope."""
        key = self.scope(namespace, labels)
        cfg = self._cache.get(key)
        if cfg is None:
            cfg = self._build(namespace, dict(key[1]))
            cfg.version = version_of(cfg)
            self._cache[key] = cfg
        return cfg

    def _pick(self, candidates: list, namespace: str, owner: str):
        """Of the resources for one host, the one closest to the sidecar: its namespace, then the service's."""
        visible = [c for c in candidates if _visible(c.export_to, c.meta.namespace, namespace, self.default_export_to)]
        for ns in (namespace, owner):
            for c in visible:
                if c.meta.namespace == ns:
                    return c
        return visible[0] if visible else None

    def _build(self, namespace: str, labels: dict[str, str]) -> pb.SidecarConfig:
        cfg = pb.SidecarConfig()
        listener = cfg.listeners.add(name="outbound", address=OUTBOUND_ADDRESS)
        clusters: dict[str, pb.Cluster] = {}
        used: set[str] = set()
        for host in sorted(self.services):
            svc = self.services[host]
            if not _visible(svc.export_to, svc.meta.namespace, namespace, self.default_export_to):
                continue
            aliases = self._aliases(svc, namespace)
            vs = self._pick(self.routes.get(host, []), namespace, svc.meta.namespace)
            for port in svc.ports:
                domains = [f"{a}:{port.number}" for a in aliases]
                if len(svc.ports) == 1:
                    domains += aliases
                domains = [d for d in domains if d not in used]
                if not domains:
                    continue
                used.update(domains)
                vh = listener.virtual_hosts.add(name=f"{host}:{port.number}", domains=domains)
                if vs is None:
                    route = vh.routes.add(name="default")
                    route.match.prefix = "/"
                    route.route.clusters.add(cluster=self._cluster(clusters, svc, port.number, namespace).name)
                    _retry_policy(route.retry_policy, None)
                    continue
                for i, r in enumerate(vs.http):
                    self._routes(vh, vs, i, r, svc, port.number, namespace, labels, clusters)
        cfg.clusters.extend(clusters[name] for name in sorted(clusters))
        if self.security.trust_bundle:
            self.security.apply(cfg, namespace, labels)
        return cfg

    def _aliases(self, svc: Service, namespace: str) -> list[str]:
        if not svc.kubernetes:
            return [svc.host]
        name, ns = svc.meta.name, svc.meta.namespace
        short = [f"{name}.{ns}.svc", f"{name}.{ns}"] + ([name] if ns == namespace else [])
        return [svc.host, *short]

    def _cluster(self, clusters: dict[str, pb.Cluster], svc: Service, port: int, namespace: str) -> pb.Cluster:
        name = cluster_name(svc.host, port)
        c = clusters.get(name)
        if c is not None:
            return c
        c = pb.Cluster(name=name, service_addresses=self.service_addresses.get((svc.host, port), ()))
        for e in svc.endpoints.get(port, []):
            ep = c.endpoints.add(address=_endpoint_address(e.address, e.port), weight=e.weight)
            ep.labels.update(e.labels)
            # Who the endpoint is, for the sidecars' metric labels (destination_workload, _namespace).
            if e.workload:
                ep.labels[WORKLOAD_KEY] = e.workload
            if e.namespace:
                ep.labels[NAMESPACE_KEY] = e.namespace
        dr = self._pick(self.rules.get(svc.host, []), namespace, svc.meta.namespace)
        if dr is not None:
            for s in dr.subsets:
                c.subsets.add(name=s.name).labels.update(s.labels)
            c.lb_policy = _LB[dr.lb_policy]
            c.hash_header = dr.hash_header
            if dr.connect_timeout is not None:
                c.connect_timeout.CopyFrom(_duration(dr.connect_timeout))
            if dr.idle_timeout is not None:
                c.idle_timeout.CopyFrom(_duration(dr.idle_timeout))
            if dr.max_streams_per_connection is not None:
                c.max_concurrent_streams_per_connection = dr.max_streams_per_connection
            if dr.retry_budget is not None:
                c.retry_budget.CopyFrom(_budget(dr.retry_budget))
            if dr.circuit_breakers is not None:
                cb = dr.circuit_breakers
                c.circuit_breakers.max_connections = cb.max_connections
                c.circuit_breakers.max_pending_requests = cb.max_pending_requests
                c.circuit_breakers.max_requests = cb.max_requests
                c.circuit_breakers.max_retries = cb.max_retries
            if dr.outlier_detection is not None:
                _outlier_detection(c.outlier_detection, dr.outlier_detection)
            if dr.health_check is not None:
                _health_check(c.health_check, dr.health_check)
        clusters[name] = c
        return c

    def _routes(
        self,
        vh: pb.VirtualHost,
        vs: VirtualService,
        index: int,
        r: HttpRoute,
        svc: Service,
        port: int,
        namespace: str,
        labels: dict[str, str],
        clusters: dict[str, pb.Cluster],
    ) -> None:
        base = f"{vs.meta.namespace}/{vs.meta.name}/{r.name or index}"
        matches: list[Match | None] = list(r.matches) or [None]
        for j, m in enumerate(matches):
            if m is not None and not self._applies(m, port, namespace, labels):
                continue
            name = base if len(matches) == 1 else f"{base}/{j}"
            taken = {rt.name for rt in vh.routes}
            unique, n = name, 1
            while unique in taken:  # route names need not be unique in Istio; here they must be
                n += 1
                unique = f"{name}#{n}"
            route = vh.routes.add(name=unique)
            if m is not None:
                _match(route.match, m)
            if r.timeout is not None:
                route.timeout.CopyFrom(_duration(r.timeout))
            if r.fault is not None:
                _fault(route.fault, r.fault)
            if r.direct_status is not None:
                route.direct_response.status = r.direct_status
                route.direct_response.body = r.direct_body
                continue
            missing = self._set_destinations(route, r.destinations, svc, port, namespace, clusters)
            if missing:
                # Envoy's answer to a route whose cluster does not exist (NC): an honest 503 for
                # this sidecar, which cannot see that subset's DestinationRule.
                route.ClearField("route")
                route.direct_response.status = 503
                route.direct_response.body = missing
                continue
            if r.rewrite_uri and m is not None and m.uri is not None:
                route.route.prefix_rewrite = r.rewrite_uri
            if r.rewrite_authority:
                route.route.authority_rewrite = r.rewrite_authority
            # Only a route that forwards retries (as in Istio, where a direct response has no RouteAction).
            _retry_policy(route.retry_policy, r.retries)

    @staticmethod
    def _applies(m: Match, port: int, namespace: str, labels: dict[str, str]) -> bool:
        if m.port is not None and m.port != port:
            return False
        if m.source_namespace and m.source_namespace != namespace:
            return False
        return all(labels.get(k) == v for k, v in m.source_labels.items())

    def _set_destinations(
        self,
        route: pb.Route,
        destinations: tuple[Destination, ...],
        svc: Service,
        port: int,
        namespace: str,
        clusters: dict[str, pb.Cluster],
    ) -> str:
        """Fill the route's split; return why it cannot be (a host, port or subset that does not
        exist, or that this sidecar's namespace cannot see), or ""."""
        for d in destinations:
            target = self.services.get(d.host)
            if target is None:
                return f"no service {d.host}"
            if d.port is not None:
                tport = d.port
            elif d.host == svc.host:
                tport = port
            elif len(target.ports) == 1:
                tport = target.ports[0].number
            elif not target.ports:
                return f"{d.host} has no TCP port"
            else:
                return f"{d.host} has several ports and the route names none"
            if all(p.number != tport for p in target.ports):
                return f"{d.host} has no port {tport}"
            c = self._cluster(clusters, target, tport, namespace)
            if d.subset and all(s.name != d.subset for s in c.subsets):
                return f"no subset {d.subset} of {d.host} is visible from namespace {namespace}"
            route.route.clusters.add(cluster=c.name, subset=d.subset, weight=d.weight)
        return ""


def _match(out: pb.RouteMatch, m: Match) -> None:
    if m.uri is not None:
        setattr(out, {"exact": "path", "prefix": "prefix", "regex": "regex"}[m.uri.kind], m.uri.value)
    if m.grpc_service:
        out.grpc.service = m.grpc_service
        out.grpc.method = m.grpc_method
    for h in m.headers:
        hm = out.headers.add(name=h.name, invert=h.invert)
        if h.match is None:
            hm.present = True
        else:
            setattr(hm, h.match.kind, h.match.value)
    out.method = m.method


def _budget(b: RetryBudget) -> pb.RetryBudget:
    out = pb.RetryBudget()
    if b.ratio is not None:
        out.retry_ratio = b.ratio
    if b.min_per_second is not None:
        out.min_retries_per_second = b.min_per_second
    if b.ttl is not None:
        out.ttl.CopyFrom(_duration(b.ttl))
    return out


def _retry_policy(out: pb.RetryPolicy, r: Retries | None) -> None:
    """Pilot's ConvertPolicy: no ``retries``, the default policy; ``attempts`` 0, no retries (and
    nothing else of the policy applies); otherwise the default overridden by what is given."""
    out.SetInParent()  # set even when every field is at its default: num_retries 0 is "no retries"
    if r is None:
        out.num_retries = DEFAULT_NUM_RETRIES
        out.retry_on.extend(DEFAULT_RETRY_ON)
        return
    if r.attempts <= 0:
        return
    out.num_retries = r.attempts
    if r.per_try_timeout is not None:
        out.per_try_timeout.CopyFrom(_duration(r.per_try_timeout))
    out.retry_on.extend(r.retry_on or DEFAULT_RETRY_ON)
    if r.budget is not None:
        out.budget.CopyFrom(_budget(r.budget))
    if r.backoff is not None:
        out.base_interval.CopyFrom(_duration(r.backoff))


def _fault(out: pb.FaultInjection, f: Fault) -> None:
    if f.delay is not None:
        out.delay.fixed_delay.CopyFrom(_duration(f.delay.fixed_delay))
        if f.delay.percentage is not None:
            out.delay.percentage = f.delay.percentage
    if f.abort is not None:
        if f.abort.http_status is not None:
            out.abort.http_status = f.abort.http_status
        else:
            out.abort.grpc_status = f.abort.grpc_status
        if f.abort.percentage is not None:
            out.abort.percentage = f.abort.percentage


def _health_check(out: pb.HealthCheck, h: HealthCheck) -> None:
    out.SetInParent()  # present with every field unset: checks on, with the defaults
    if h.interval is not None:
        out.interval.CopyFrom(_duration(h.interval))
    if h.timeout is not None:
        out.timeout.CopyFrom(_duration(h.timeout))
    out.unhealthy_threshold = h.unhealthy_threshold or 0
    out.healthy_threshold = h.healthy_threshold or 0
    out.grpc_service_name = h.grpc_service_name


def _outlier_detection(out: pb.OutlierDetection, o: OutlierDetection) -> None:
    out.SetInParent()  # present with every field unset: detection on, with the defaults
    for name in ("consecutive_5xx", "consecutive_gateway_errors", "consecutive_local_origin_failures"):
        value = getattr(o, name)
        if value is not None:
            setattr(out, name, value)
    out.split_external_local_origin_errors = o.split_external_local_origin_errors
    if o.interval is not None:
        out.interval.CopyFrom(_duration(o.interval))
    if o.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(_duration(o.base_ejection_time))
        if o.base_ejection_time > _DEFAULT_MAX_EJECTION_S:
            out.max_ejection_time.CopyFrom(_duration(o.base_ejection_time))
    if o.max_ejection_percent is not None:
        out.max_ejection_percent = o.max_ejection_percent
