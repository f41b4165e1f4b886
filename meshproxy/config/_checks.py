"""The semantic checks of a SidecarConfig, and the grammar of its addresses and domains.

The schema says what type each field has; this module says which values
make sense together: addresses that parse, names that are unique, routes
that point at clusters and subsets that exist, regexes that compile, HTTP/2
settings within RFC 9113's limits, trust bundles that OpenSSL loads, SPIFFE
ids and authorization rules the sidecar can evaluate. Whatever passes here
can be compiled into a route table and bound without another error, so a
control-plane push is either ACKed whole or NACKed with the first problem
found.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from typing import NamedTuple

from meshproxy.config._error import ConfigError, at, index
from meshproxy.config.v1 import config_pb2 as pb

__all__ = [
    "Domain",
    "check_routes",
    "duration_s",
    "parse_address",
    "parse_domain",
    "parse_service_address",
    "validate",
]

# RFC 9110 token characters; a header name may also be an HTTP/2 pseudo-header (":scheme").
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_NAME = re.compile(r":?[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DOMAIN_HOST = re.compile(r"[a-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")

_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?")
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?)(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")
_MAX_WINDOW = 2**31 - 1
_MIN_FRAME, _MAX_FRAME = 2**14, 2**24 - 1
_MAX_GRPC_STATUS = 16

# What meshproxy.resilience's OutlierDetector takes (its _check_config): the
# sidecar builds one from each OutlierDetection, so these bounds are its.
_MAX_OUTLIER_TIME_NS = 1 << 62
_DEFAULT_BASE_EJECTION_NS = 30_000_000_000
_DEFAULT_MAX_EJECTION_NS = 300_000_000_000


def _port(text: str, lowest: int) -> int:
    if not _PORT.fullmatch(text) or not lowest <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from {lowest} to 65535")
    return int(text)


def parse_address(text: str, *, listener: bool = False) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``, IPv6 brackets removed; ValueError with the reason otherwise.

    A listener's host must be an IP literal and its port may be 0 (the
    kernel picks one); an endpoint's host may also be a DNS name, and its
    port is 1..65535. IPv6 literals are bracketed: ``[::1]:15001``.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError("expected [IPv6]:port, such as [::1]:15001")
        host, port = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError("no port: expected host:port, such as 127.0.0.1:15001")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets, as in [::1]:15001")
        if not host:
            raise ValueError("no host: expected host:port, such as 127.0.0.1:15001")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if listener:
                raise ValueError(f"{host!r} is not an IP address (a listener binds to one)") from None
            if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in host.split(".")):
                raise ValueError(f"{host!r} is neither an IP address nor a DNS name") from None
    return host, _port(port, 0 if listener else 1)


class Domain(NamedTuple):
    """A virtual host's domain, lower-cased: ``pattern`` is a host (``"api.example.com"``, ``"[::1]"``),
    a suffix wildcard (``"*.example.com"``) or ``"*"``; ``port`` None means any port."""

    pattern: str
    port: int | None

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*")


def parse_domain(text: str) -> Domain:
    """A ``VirtualHost.domains`` entry -> Domain; ValueError with the reason otherwise."""
    d = text.lower()
    if d == "*":
        return Domain("*", None)
    port = None
    if d.startswith("["):
        close = d.find("]")
        if close < 0:
            raise ValueError("unclosed '[' (expected [IPv6] or [IPv6]:port)")
        host, rest = d[: close + 1], d[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected [IPv6] or [IPv6]:port")
            port = _port(rest[1:], 1)
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host[1:-1]!r} is not an IPv6 address") from None
        return Domain(host, port)
    host, colon, port_text = d.rpartition(":")
    if not colon:
        host = d
    else:
        port = _port(port_text, 1)
    if host == "*":
        raise ValueError("'*' matches every authority and takes no port")
    body = host[1:] if host.startswith("*") else host
    if not body or not _DOMAIN_HOST.fullmatch(body):
        raise ValueError("expected a host name, '*.suffix' or '*', with an optional :port")
    return Domain(host, port)


def duration_s(d: object) -> float:
    """A google.protobuf.Duration in seconds."""
    return d.seconds + d.nanos / 1e9


def field_s(msg: object, field: str, default: float) -> float:
    """``msg.field`` (a Duration) in seconds, or ``default`` when unset."""
    return duration_s(getattr(msg, field)) if msg.HasField(field) else default


def field_ns(msg: object, field: str, default: int) -> int:
    """``msg.field`` (a Duration) in nanoseconds, or ``default`` when unset."""
    if not msg.HasField(field):
        return default
    d = getattr(msg, field)
    return d.seconds * 1_000_000_000 + d.nanos


def _duration(msg: object, field: str, path: str, *, positive: bool = False) -> int | None:
    """Check ``msg.field`` (a Duration) if set; its length in nanoseconds, or None when unset."""
    if not msg.HasField(field):
        return None
    d = getattr(msg, field)
    if not -1_000_000_000 < d.nanos < 1_000_000_000 or (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos):
        raise ConfigError(at(path, field), f"malformed duration (seconds={d.seconds}, nanos={d.nanos})")
    ns = d.seconds * 1_000_000_000 + d.nanos
    if ns < 0 or (positive and ns == 0):
        need = "greater than 0" if positive else "0 or more"
        raise ConfigError(at(path, field), f"must be {need}, got {ns / 1e9:g}s")
    return ns


def _percentage(msg: object, field: str, path: str) -> None:
    if msg.HasField(field):
        value = getattr(msg, field)
        if not 0.0 <= value <= 100.0:  # NaN fails every comparison
            raise ConfigError(at(path, field), f"must be from 0 to 100, got {value:g}")


def _regex(pattern: str, path: str) -> None:
    try:
        re.compile(pattern.encode())
    except re.error as exc:
        raise ConfigError(path, f"invalid regex {pattern!r}: {exc.msg}") from None


def _unique(name: str, seen: dict[str, str], path: str, what: str) -> None:
    if not name:
        raise ConfigError(at(path, "name"), f"every {what} needs a name")
    if name in seen:
        raise ConfigError(at(path, "name"), f"{what} name {name!r} is already used by {seen[name]}")
    seen[name] = path


def validate(cfg: pb.SidecarConfig) -> None:
    """Raise ConfigError for the first thing in ``cfg`` the sidecar could not use."""
    clusters: dict[str, pb.Cluster] = {}
    seen: dict[str, str] = {}
    claimed: dict[tuple[str, int], str] = {}
    for i, c in enumerate(cfg.clusters):
        path = index("clusters", i)
        _unique(c.name, seen, path, "cluster")
        _check_cluster(c, path)
        _check_service_addresses(c, path, claimed)
        clusters[c.name] = c
    seen = {}
    bound: dict[tuple[str, int], str] = {}
    for i, lis in enumerate(cfg.listeners):
        path = index("listeners", i)
        _unique(lis.name, seen, path, "listener")
        try:
            host, port = parse_address(lis.address, listener=True)
        except ValueError as exc:
            raise ConfigError(at(path, "address"), f"invalid address {lis.address!r}: {exc}") from None
        # Port 0 is a fresh port per bind; two equal ones would both bind
        # (SO_REUSEPORT) and silently share the traffic.
        if port and (host, port) in bound:
            raise ConfigError(at(path, "address"), f"{lis.address} is already the address of {bound[host, port]}")
        bound[host, port] = path
        # 0s is meaningful here: no idle timeout at all.
        _duration(lis, "stream_idle_timeout", path)
        _duration(lis, "idle_timeout", path)
        _check_transparent(lis, path)
        if lis.HasField("http2"):
            _check_http2(lis.http2, at(path, "http2"))
        check_routes(lis, clusters, path)
    if cfg.HasField("security"):
        _check_security(cfg.security, "security")
    _check_mtls_needs_bundle(cfg)


def _check_cluster(c: pb.Cluster, path: str) -> None:
    if c.lb_policy not in pb.Cluster.LbPolicy.values():
        raise ConfigError(at(path, "lb_policy"), f"unknown policy number {c.lb_policy}")
    if c.hash_header and not _HEADER_NAME.fullmatch(c.hash_header):
        raise ConfigError(at(path, "hash_header"), f"{c.hash_header!r} is not a header name")
    for j, ep in enumerate(c.endpoints):
        try:
            parse_address(ep.address)
        except ValueError as exc:
            raise ConfigError(
                at(index(at(path, "endpoints"), j), "address"), f"invalid address {ep.address!r}: {exc}"
            ) from None
    seen: dict[str, str] = {}
    for j, s in enumerate(c.subsets):
        spath = index(at(path, "subsets"), j)
        _unique(s.name, seen, spath, "subset")
        for key in s.labels:
            if not key:
                raise ConfigError(at(spath, "labels"), "a label selector key is empty")
    _duration(c, "connect_timeout", path, positive=True)
    _duration(c, "idle_timeout", path, positive=True)
    if c.HasField("retry_budget"):
        _check_budget(c.retry_budget, at(path, "retry_budget"))
    # circuit_breakers: every uint32 is a limit (0: none), nothing to check.
    if c.HasField("outlier_detection"):
        _check_outlier(c.outlier_detection, at(path, "outlier_detection"))
    if c.HasField("health_check"):
        _check_health(c.health_check, at(path, "health_check"))
    if c.HasField("tls"):
        _check_upstream_tls(c, at(path, "tls"))


def _check_transparent(lis: pb.Listener, path: str) -> None:
    # Opaque ports and the detection timeout are accepted on any listener: a sidecar may make
    # the control plane's outbound listener transparent after the snapshot was checked.
    for j, port in enumerate(lis.opaque_ports):
        if not 1 <= port <= 65535:
            raise ConfigError(index(at(path, "opaque_ports"), j), f"must be a port from 1 to 65535, got {port}")
    _duration(lis, "protocol_detection_timeout", path, positive=True)


def parse_service_address(text: str) -> tuple[str, int]:
    """A ``Cluster.service_addresses`` entry -> ``(ip, port)``, the IP in its canonical text form;
    ValueError with the reason otherwise."""
    host, port = parse_address(text)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (a Service's address is one)") from None


def _check_service_addresses(c: pb.Cluster, path: str, claimed: dict[tuple[str, int], str]) -> None:
    """Each address parses and belongs to one cluster only: it is how a redirected connection
    finds its cluster."""
    for j, text in enumerate(c.service_addresses):
        apath = index(at(path, "service_addresses"), j)
        try:
            key = parse_service_address(text)
        except ValueError as exc:
            raise ConfigError(apath, f"invalid address {text!r}: {exc}") from None
        if key in claimed:
            raise ConfigError(apath, f"{text} is already a service address of {claimed[key]}")
        claimed[key] = apath


def _check_health(h: pb.HealthCheck, path: str) -> None:
    interval = _duration(h, "interval", path, positive=True)
    timeout = _duration(h, "timeout", path, positive=True)
    if interval is not None and interval < 100_000_000:
        raise ConfigError(at(path, "interval"), f"must be at least 0.1s, got {interval / 1e9:g}s")
    if (timeout if timeout is not None else 1e9) > (interval if interval is not None else 10e9):
        raise ConfigError(at(path, "timeout"), "must not exceed interval (one check at a time)")
    for field in ("unhealthy_threshold", "healthy_threshold"):
        if getattr(h, field) > 1000:
            raise ConfigError(at(path, field), f"must be at most 1000, got {getattr(h, field)}")


def _check_outlier(o: pb.OutlierDetection, path: str) -> None:
    # The thresholds are uint32, as OutlierDetector's; its times must be 1ns..2^62ns, base <= max.
    times = {}
    for field in ("interval", "base_ejection_time", "max_ejection_time"):
        ns = _duration(o, field, path, positive=True)
        if ns is not None and ns > _MAX_OUTLIER_TIME_NS:
            raise ConfigError(at(path, field), f"must be at most 2^62 ns (about 146 years), got {ns / 1e9:g}s")
        times[field] = ns
    base, most = times["base_ejection_time"], times["max_ejection_time"]
    if most is not None and most < (base if base is not None else _DEFAULT_BASE_EJECTION_NS):
        what = f"{base / 1e9:g}s" if base is not None else "30s when unset"
        raise ConfigError(at(path, "max_ejection_time"), f"{most / 1e9:g}s is below base_ejection_time ({what})")
    if most is None and base is not None and base > _DEFAULT_MAX_EJECTION_NS:
        raise ConfigError(
            at(path, "base_ejection_time"),
            f"{base / 1e9:g}s exceeds max_ejection_time (300s when unset): set max_ejection_time too",
        )
    if o.HasField("max_ejection_percent") and o.max_ejection_percent > 100:
        raise ConfigError(at(path, "max_ejection_percent"), f"must be from 0 to 100, got {o.max_ejection_percent}")


#: retry_on conditions besides HTTP status codes ("503") and gRPC status names.
RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "reset", "5xx", "gateway-error", "retriable-status-codes", "retriable-4xx"}
)
#: The gRPC statuses a route may retry on, by the names Envoy's grpc retry-on uses.
GRPC_RETRY_ON = frozenset({"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})


def _check_retry(r: pb.RetryPolicy, path: str) -> None:
    _duration(r, "per_try_timeout", path, positive=True)
    base = _duration(r, "base_interval", path, positive=True)
    most = _duration(r, "max_interval", path, positive=True)
    if base is not None and most is not None and most < base:
        raise ConfigError(at(path, "max_interval"), f"{most / 1e9:g}s is below base_interval ({base / 1e9:g}s)")
    for j, cond in enumerate(r.retry_on):
        if cond in RETRY_ON or cond in GRPC_RETRY_ON:
            continue
        if cond.isdigit() and 100 <= int(cond) <= 599:
            continue
        known = ", ".join(sorted(RETRY_ON | GRPC_RETRY_ON))
        raise ConfigError(index(at(path, "retry_on"), j), f"unknown condition {cond!r} (known: {known}, or a status)")
    if r.HasField("budget"):
        _check_budget(r.budget, at(path, "budget"))


def _check_budget(b: pb.RetryBudget, path: str) -> None:
    if not 0.0 <= b.retry_ratio <= 1000.0:
        raise ConfigError(at(path, "retry_ratio"), f"must be from 0 to 1000, got {b.retry_ratio:g}")
    _duration(b, "ttl", path, positive=True)


def _check_http2(h: pb.Http2Settings, path: str) -> None:
    if h.HasField("max_concurrent_streams") and h.max_concurrent_streams == 0:
        raise ConfigError(at(path, "max_concurrent_streams"), "0 would refuse every stream")
    if h.HasField("initial_stream_window_size") and h.initial_stream_window_size > _MAX_WINDOW:
        raise ConfigError(at(path, "initial_stream_window_size"), f"exceeds 2^31-1 ({h.initial_stream_window_size})")
    if h.HasField("initial_connection_window_size") and not 65535 <= h.initial_connection_window_size <= _MAX_WINDOW:
        raise ConfigError(
            at(path, "initial_connection_window_size"),
            f"must be from 65535 (where it starts; it can only grow) to 2^31-1, got {h.initial_connection_window_size}",
        )
    if h.HasField("max_frame_size") and not _MIN_FRAME <= h.max_frame_size <= _MAX_FRAME:
        raise ConfigError(at(path, "max_frame_size"), f"must be from 16384 to 16777215, got {h.max_frame_size}")


def check_routes(lis: pb.Listener, clusters: dict[str, pb.Cluster], lpath: str = "") -> None:
    """Check ``lis``'s virtual hosts and routes, against ``clusters`` by name; ``lpath`` is the listener's path."""
    seen: dict[str, str] = {}
    domains: dict[Domain, str] = {}
    for i, vh in enumerate(lis.virtual_hosts):
        path = index(at(lpath, "virtual_hosts"), i)
        _unique(vh.name, seen, path, "virtual host")
        if not vh.domains:
            raise ConfigError(at(path, "domains"), "no domains; '*' matches every authority")
        for j, text in enumerate(vh.domains):
            dpath = index(at(path, "domains"), j)
            try:
                d = parse_domain(text)
            except ValueError as exc:
                raise ConfigError(dpath, f"invalid domain {text!r}: {exc}") from None
            if d in domains:
                raise ConfigError(dpath, f"domain {text!r} is already in {domains[d]}")
            domains[d] = dpath
        route_names: dict[str, str] = {}
        for j, route in enumerate(vh.routes):
            rpath = index(at(path, "routes"), j)
            if route.name:
                _unique(route.name, route_names, rpath, "route")
            _check_route(route, rpath, clusters)


def _check_route(route: pb.Route, path: str, clusters: dict[str, pb.Cluster]) -> None:
    _check_match(route.match, at(path, "match"))
    _duration(route, "timeout", path)
    if route.HasField("retry_policy"):
        _check_retry(route.retry_policy, at(path, "retry_policy"))
    if route.HasField("fault"):
        _check_fault(route.fault, at(path, "fault"))
    action = route.WhichOneof("action")
    if action is None:
        raise ConfigError(path, "no action: set 'route' or 'direct_response'")
    if action == "direct_response":
        dr, dpath = route.direct_response, at(path, "direct_response")
        if not 200 <= dr.status <= 599:
            raise ConfigError(at(dpath, "status"), f"must be from 200 to 599, got {dr.status}")
        if dr.HasField("grpc_status") and not 0 <= dr.grpc_status <= _MAX_GRPC_STATUS:
            raise ConfigError(at(dpath, "grpc_status"), f"must be a gRPC status code (0..16), got {dr.grpc_status}")
        return
    ra, apath = route.route, at(path, "route")
    if not ra.clusters:
        raise ConfigError(at(apath, "clusters"), "no cluster to send to")
    for j, wc in enumerate(ra.clusters):
        wpath = index(at(apath, "clusters"), j)
        cluster = clusters.get(wc.cluster)
        if cluster is None:
            known = ", ".join(clusters) or "none"
            raise ConfigError(at(wpath, "cluster"), f"no cluster named {wc.cluster!r} (known: {known})")
        if wc.subset and all(s.name != wc.subset for s in cluster.subsets):
            raise ConfigError(at(wpath, "subset"), f"cluster {wc.cluster!r} has no subset named {wc.subset!r}")
    if len(ra.clusters) > 1 and not any(wc.weight for wc in ra.clusters):
        raise ConfigError(at(apath, "clusters"), "every weight is 0, so nothing could be picked")
    if ra.prefix_rewrite and route.match.WhichOneof("path_specifier") not in ("prefix", "path"):
        raise ConfigError(at(apath, "prefix_rewrite"), "needs a match on 'prefix' or 'path' to replace")
    if ra.authority_rewrite and any(ch.isspace() or not ch.isprintable() for ch in ra.authority_rewrite):
        raise ConfigError(at(apath, "authority_rewrite"), f"{ra.authority_rewrite!r} is not an authority")
    if ra.hash_header and not _HEADER_NAME.fullmatch(ra.hash_header):
        raise ConfigError(at(apath, "hash_header"), f"{ra.hash_header!r} is not a header name")


def _check_fault(f: pb.FaultInjection, path: str) -> None:
    if not f.HasField("delay") and not f.HasField("abort"):
        raise ConfigError(path, "neither delay nor abort: set one or both")
    if f.HasField("delay"):
        dpath = at(path, "delay")
        if not f.delay.HasField("fixed_delay"):
            raise ConfigError(at(dpath, "fixed_delay"), "is required: how long to delay")
        _duration(f.delay, "fixed_delay", dpath, positive=True)
        _percentage(f.delay, "percentage", dpath)
    if f.HasField("abort"):
        a, apath = f.abort, at(path, "abort")
        _percentage(a, "percentage", apath)
        error = a.WhichOneof("error")
        if error is None:
            raise ConfigError(apath, "no error: set http_status or grpc_status")
        if error == "http_status" and not 200 <= a.http_status <= 599:
            raise ConfigError(at(apath, "http_status"), f"must be from 200 to 599, got {a.http_status}")
        if error == "grpc_status" and not 1 <= a.grpc_status <= _MAX_GRPC_STATUS:
            raise ConfigError(
                at(apath, "grpc_status"), f"must be a gRPC error status (1..16; 0 is OK), got {a.grpc_status}"
            )


def _check_match(m: pb.RouteMatch, path: str) -> None:
    kind = m.WhichOneof("path_specifier")
    if kind == "regex":
        _regex(m.regex, at(path, "regex"))
    elif kind is not None and not getattr(m, kind).startswith("/"):
        raise ConfigError(at(path, kind), f"{getattr(m, kind)!r} must start with '/', as every :path does")
    if m.HasField("grpc"):
        g = m.grpc
        if g.method and not g.service:
            raise ConfigError(at(path, "grpc.method"), "a method needs its service")
        for field in ("service", "method"):
            value = getattr(g, field)
            if "/" in value or any(ch.isspace() for ch in value):
                raise ConfigError(
                    at(at(path, "grpc"), field), f"{value!r} is not a gRPC {field} name (as in pkg.Service/Method)"
                )
    for j, h in enumerate(m.headers):
        hpath = index(at(path, "headers"), j)
        if not _HEADER_NAME.fullmatch(h.name):
            raise ConfigError(at(hpath, "name"), f"{h.name!r} is not a header name")
        if h.WhichOneof("match") == "regex":
            _regex(h.regex, at(hpath, "regex"))
    if m.method and not _TOKEN.fullmatch(m.method):
        raise ConfigError(at(path, "method"), f"{m.method!r} is not an HTTP method")


# ---- mTLS and authorization -------------------------------------------------------------------------


def _check_upstream_tls(c: pb.Cluster, path: str) -> None:
    tls = c.tls
    if tls.mode not in pb.UpstreamTls.Mode.values():
        raise ConfigError(at(path, "mode"), f"unknown mode number {tls.mode}")
    for j, sid in enumerate(tls.allowed_spiffe_ids):
        if not _SPIFFE_ID.fullmatch(sid):
            raise ConfigError(
                index(at(path, "allowed_spiffe_ids"), j),
                f"{sid!r} is not a SPIFFE id (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)",
            )
    endpoints = {ep.address for ep in c.endpoints}
    for j, address in enumerate(tls.plaintext_endpoints):
        if address not in endpoints:
            raise ConfigError(
                index(at(path, "plaintext_endpoints"), j), f"{address!r} is not an endpoint of the cluster"
            )


def _check_security(sec: pb.Security, path: str) -> None:
    if sec.trust_domain and not _TRUST_DOMAIN.fullmatch(sec.trust_domain):
        raise ConfigError(at(path, "trust_domain"), f"{sec.trust_domain!r} is not a trust domain")
    for j, pem in enumerate(sec.trust_bundle):
        jpath = index(at(path, "trust_bundle"), j)
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError(jpath, "not a PEM certificate")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(jpath, f"not a certificate OpenSSL can load: {exc}") from None
    if sec.HasField("peer_authentication"):
        pa, ppath = sec.peer_authentication, at(path, "peer_authentication")
        if pa.mode not in pb.PeerAuthentication.Mode.values():
            raise ConfigError(at(ppath, "mode"), f"unknown mode number {pa.mode}")
        for port, mode in pa.port_modes.items():
            if not 1 <= port <= 65535:
                raise ConfigError(index(at(ppath, "port_modes"), str(port)), "is not a port from 1 to 65535")
            if mode not in pb.PeerAuthentication.Mode.values():
                raise ConfigError(index(at(ppath, "port_modes"), str(port)), f"unknown mode number {mode}")
    if sec.HasField("authorization"):
        for j, policy in enumerate(sec.authorization.policies):
            _check_policy(policy, index(at(at(path, "authorization"), "policies"), j))


def _check_mtls_needs_bundle(cfg: pb.SidecarConfig) -> None:
    """Nothing can be verified without roots: mTLS upstream and STRICT inbound need the trust bundle."""
    if cfg.security.trust_bundle:
        return
    for i, c in enumerate(cfg.clusters):
        if c.tls.mode == pb.UpstreamTls.ISTIO_MUTUAL:
            raise ConfigError(at(index("clusters", i), "tls.mode"), "ISTIO_MUTUAL needs security.trust_bundle")
    pa = cfg.security.peer_authentication
    if pa.mode == pb.PeerAuthentication.STRICT or pb.PeerAuthentication.STRICT in pa.port_modes.values():
        raise ConfigError("security.peer_authentication", "STRICT needs security.trust_bundle")


def _check_string_match(m: pb.StringMatch, path: str, what: str = "") -> None:
    kind = m.WhichOneof("match")
    if kind is None:
        raise ConfigError(path, "no match: set exact, prefix, suffix or presence")
    if kind == "presence":
        if not m.presence:
            raise ConfigError(at(path, "presence"), "presence: false matches nothing")
        return
    value = getattr(m, kind)
    if not value:
        raise ConfigError(at(path, kind), "is empty (presence: true matches any value)")
    if what == "path" and kind in ("exact", "prefix") and not value.startswith("/"):
        raise ConfigError(at(path, kind), f"{value!r} must start with '/', as every :path does")


def _check_matches(msg: object, fields: tuple[str, ...], path: str, what: str = "") -> None:
    for name in fields:
        for k, m in enumerate(getattr(msg, name)):
            _check_string_match(m, index(at(path, name), k), what)


def _check_policy(policy: pb.AuthorizationPolicy, path: str) -> None:
    if not policy.name:
        raise ConfigError(at(path, "name"), "every policy needs a name (the access log gives it)")
    if policy.action not in pb.AuthorizationPolicy.Action.values():
        raise ConfigError(at(path, "action"), f"unknown action number {policy.action}")
    for j, rule in enumerate(policy.rules):
        rpath = index(at(path, "rules"), j)
        for k, src in enumerate(getattr(rule, "from")):
            spath = index(at(rpath, "from"), k)
            _check_matches(src, ("principals", "not_principals", "namespaces", "not_namespaces"), spath)
        for k, op in enumerate(rule.to):
            opath = index(at(rpath, "to"), k)
            _check_matches(op, ("hosts", "not_hosts", "methods", "not_methods"), opath)
            _check_matches(op, ("paths", "not_paths"), opath, "path")
            for name in ("ports", "not_ports"):
                for n, port in enumerate(getattr(op, name)):
                    if not 1 <= port <= 65535:
                        raise ConfigError(index(at(opath, name), n), f"must be a port from 1 to 65535, got {port}")
        for k, cond in enumerate(rule.when):
            cpath = index(at(rpath, "when"), k)
            if cond.attribute not in pb.AuthorizationCondition.Attribute.values():
                raise ConfigError(at(cpath, "attribute"), f"unknown attribute number {cond.attribute}")
            if cond.attribute == pb.AuthorizationCondition.REQUEST_HEADER:
                if not _HEADER_NAME.fullmatch(cond.header) or cond.header != cond.header.lower():
                    raise ConfigError(at(cpath, "header"), f"{cond.header!r} is not a lower-case header name")
            elif cond.header:
                raise ConfigError(at(cpath, "header"), "only a REQUEST_HEADER condition names a header")
            if not cond.values and not cond.not_values:
                raise ConfigError(cpath, "give values or not_values")
            _check_matches(cond, ("values", "not_values"), cpath)
