"""The compiled route table: from a request's :authority, :path, :method and headers to a route.

Owns the routing decision of one request and nothing after it: which
virtual host, which route, which (cluster, subset) of a weighted split.
Picking an endpoint inside the subset is the balancer's job
(:mod:`meshproxy.lb`), sending the request the connection's.

A listener's virtual hosts are compiled once per config change into plain
lookups over bytes, because ``match`` runs once per request on values that
come straight from the HPACK decoder:

* authority: a dict of exact domains (case-insensitive; a domain with a
  port matches only that port and wins over one without, which matches any
  port), then suffix wildcards longest first, then ``"*"``. The answer is
  cached per authority value, so the common case is one dict lookup;
* routes: in order, first match wins. Everything a route tests was turned
  into bytes, compiled bytes regexes or precomputed prefixes at compile time.

The semantics follow Envoy's where a user might know them: ``path`` and
``regex`` see the :path without its query string and a regex must match
all of it; ``prefix`` sees the whole :path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from meshproxy.config import Cluster, Listener, parse_domain
from meshproxy.config import Route as RouteConfig
from meshproxy.config._checks import check_routes, duration_s
from meshproxy.lb import balancer
from meshproxy.resilience.policy import FaultPolicy, RetryPolicy

__all__ = ["DirectResponse", "Route", "RouteTable", "grpc_service_method"]

_ANY, _PREFIX, _EXACT, _REGEX, _PRESENT = range(5)
_PATH_KINDS = {None: _ANY, "prefix": _PREFIX, "path": _EXACT, "regex": _REGEX}
_HEADER_KINDS = {None: _PRESENT, "present": _PRESENT, "exact": _EXACT, "prefix": _PREFIX, "regex": _REGEX}

# Bounded, so that a client cycling through made-up authorities costs a
# cache refill now and then rather than unbounded memory.
_CACHE_MAX = 1024
_MISS = object()


class DirectResponse(NamedTuple):
    """What the sidecar answers by itself; ``grpc_status`` None means derive it from ``status``."""

    status: int
    body: bytes
    grpc_status: int | None
    grpc_message: str


def grpc_service_method(path: bytes) -> tuple[bytes, bytes] | None:
    """``b"/pkg.Service/Method"`` -> ``(b"pkg.Service", b"Method")``; None if ``path`` is not of that form."""
    slash = path.find(b"/", 1)
    if slash < 2 or path[0] != 0x2F or slash == len(path) - 1 or path.find(b"/", slash + 1) >= 0 or b"?" in path:
        return None
    return path[1:slash], path[slash + 1 :]


def _is_grpc(content_type: bytes | None) -> bool:
    return content_type is not None and (
        content_type == b"application/grpc" or content_type.startswith((b"application/grpc+", b"application/grpc;"))
    )


def _first(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


class Route:
    """One compiled route: what ``RouteTable.match`` returns.

    ``name`` and ``virtual_host`` name it for logs and metrics.
    ``timeout_s`` is None for no route timeout. A route either answers
    directly (``direct_response`` is not None) or forwards: ``pick()`` gives
    the (cluster, subset) for this request, subset ``""`` meaning the whole
    cluster; ``clusters`` lists the split as (cluster, subset, weight).
    ``authority_rewrite`` (bytes or None) replaces :authority upstream,
    ``rewrite_path`` the :path, and ``hash_header`` (lower-case bytes or
    None) is the route's ring-hash key header, overriding the cluster's.
    ``retry`` is a ``RetryPolicy`` when the route retries (None for no
    policy or ``num_retries`` 0), ``fault`` a ``FaultPolicy`` or None.
    """

    __slots__ = (
        "_grpc",
        "_grpc_path",
        "_headers",
        "_method",
        "_needs_headers",
        "_only",
        "_path",
        "_path_kind",
        "_prefix_rewrite",
        "_regex",
        "_split",
        "_targets",
        "authority_rewrite",
        "clusters",
        "direct_response",
        "fault",
        "hash_header",
        "name",
        "retry",
        "stats_id",
        "timeout_s",
        "virtual_host",
    )

    def __init__(self, cfg: RouteConfig, virtual_host: str) -> None:
        self.name = cfg.name
        self.virtual_host = virtual_host
        self.stats_id = -1  # meshproxy.telemetry.metrics: the id of its per-route stats (-1: none)
        timeout = duration_s(cfg.timeout) if cfg.HasField("timeout") else 0.0
        self.timeout_s = timeout or None
        rp = cfg.retry_policy
        self.retry = RetryPolicy(rp) if cfg.HasField("retry_policy") and rp.num_retries > 0 else None
        self.fault = FaultPolicy(cfg.fault) if cfg.HasField("fault") else None

        m = cfg.match
        kind = m.WhichOneof("path_specifier")
        self._path_kind = _PATH_KINDS[kind]
        self._path = getattr(m, kind).encode() if kind in ("prefix", "path") else b""
        self._regex = re.compile(m.regex.encode()) if kind == "regex" else None
        self._method = m.method.encode() if m.method else None
        self._grpc = m.HasField("grpc")
        # "/pkg.Service/" (any method) or "/pkg.Service/Method": compared with the :path as it is.
        self._grpc_path = None
        if m.grpc.service:
            self._grpc_path = f"/{m.grpc.service}/{m.grpc.method}".encode()
        self._headers = tuple(_header_matcher(h) for h in m.headers)
        self._needs_headers = self._grpc or bool(self._headers)

        self.direct_response = None
        self.authority_rewrite = None
        self.hash_header = None
        self._prefix_rewrite = None
        self.clusters: tuple[tuple[str, str, int], ...] = ()
        self._targets: tuple[tuple[str, str], ...] = ()
        self._only = None
        self._split = None
        if cfg.WhichOneof("action") == "direct_response":
            d = cfg.direct_response
            grpc_status = d.grpc_status if d.HasField("grpc_status") else None
            self.direct_response = DirectResponse(d.status, d.body.encode(), grpc_status, d.grpc_message)
            return
        a = cfg.route
        self.authority_rewrite = a.authority_rewrite.encode() if a.authority_rewrite else None
        self.hash_header = a.hash_header.lower().encode() if a.hash_header else None
        self._prefix_rewrite = a.prefix_rewrite.encode() if a.prefix_rewrite else None
        self.clusters = tuple((c.cluster, c.subset, c.weight) for c in a.clusters)
        self._targets = tuple((c.cluster, c.subset) for c in a.clusters)
        if len(self._targets) == 1:
            self._only = self._targets[0]
        else:
            self._split = balancer.WeightedSplit([c.weight for c in a.clusters])

    def __repr__(self) -> str:
        return f"<Route {self.name!r} of {self.virtual_host!r}>"

    def pick(self) -> tuple[str, str]:
        """(cluster, subset) for the next request; smooth weighted round robin over a split, so
        every ``sum(weights)`` picks follow the weights exactly."""
        split = self._split
        if split is not None:
            return self._targets[split.pick()]
        only = self._only
        if only is None:
            raise LookupError(f"route {self.name!r} answers directly; it has no cluster")
        return only

    def rewrite_path(self, path: bytes) -> bytes:
        """The upstream :path for ``path``, which this route matched: the matched prefix (or the whole
        path, query kept, for an exact match) replaced by ``prefix_rewrite``."""
        new = self._prefix_rewrite
        if new is None:
            return path
        if self._path_kind == _PREFIX:
            return new + path[len(self._path) :]
        q = path.find(b"?")
        return new if q < 0 else new + path[q:]

    def _headers_hold(self, hd: dict[bytes, bytes] | None, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        # hd is the header list as a dict when no name repeats in it; None means scan the list.
        if self._grpc and not _is_grpc(hd.get(b"content-type") if hd is not None else _first(headers, b"content-type")):
            return False
        for name, kind, value, invert in self._headers:
            if hd is not None:
                v = hd.get(name)
                held = v is not None and (
                    kind == _PRESENT
                    or (kind == _EXACT and v == value)
                    or (kind == _PREFIX and v.startswith(value))
                    or (kind == _REGEX and value.fullmatch(v) is not None)
                )
            else:
                # A repeated name: one of its values satisfying the condition is enough.
                held = False
                for n, v in headers:
                    if n == name and (
                        kind == _PRESENT
                        or (kind == _EXACT and v == value)
                        or (kind == _PREFIX and v.startswith(value))
                        or (kind == _REGEX and value.fullmatch(v) is not None)
                    ):
                        held = True
                        break
            if held is invert:
                return False
        return True


def _header_matcher(h) -> tuple[bytes, int, object, bool]:
    kind = h.WhichOneof("match")
    invert = h.invert
    if kind == "present" and not h.present:
        # "absent" is "present", inverted.
        invert = not invert
    if kind == "regex":
        value = re.compile(h.regex.encode())
    elif kind in ("exact", "prefix"):
        value = getattr(h, kind).encode()
    else:
        value = None
    return h.name.lower().encode(), _HEADER_KINDS[kind], value, invert


class RouteTable:
    """A listener's virtual hosts and routes, compiled for ``match``; ``RouteTable.compile(listener, clusters)``."""

    __slots__ = ("_any", "_cache", "_exact", "_wildcards", "listener")

    def __init__(self, listener: Listener, clusters: Iterable[Cluster]) -> None:
        by_name = {c.name: c for c in clusters}
        check_routes(listener, by_name)
        self.listener = listener.name
        self._exact: dict[bytes, tuple[Route, ...]] = {}
        wildcards = []
        self._any = None
        for vh in listener.virtual_hosts:
            routes = tuple(Route(r, vh.name) for r in vh.routes)
            for text in vh.domains:
                d = parse_domain(text)
                if d.pattern == "*":
                    self._any = routes
                elif d.wildcard:
                    port = None if d.port is None else str(d.port).encode()
                    wildcards.append((d.pattern[1:].encode(), port, routes))
                else:
                    key = d.pattern if d.port is None else f"{d.pattern}:{d.port}"
                    self._exact[key.encode()] = routes
        # Longest suffix first; for equal suffixes the one with a port first.
        wildcards.sort(key=lambda w: (len(w[0]), w[1] is not None), reverse=True)
        self._wildcards = tuple(wildcards)
        self._cache: dict[bytes, tuple[Route, ...] | None] = {}

    @classmethod
    def compile(cls, listener: Listener, clusters: Iterable[Cluster]) -> RouteTable:
        """Compile ``listener``'s virtual hosts; routes must name clusters (and subsets) of ``clusters``.

        Raises ConfigError for what ``meshproxy.config.validate`` would refuse
        in them, with paths relative to the listener.
        """
        return cls(listener, clusters)

    def routes(self) -> list[Route]:
        """Every route of the table, once each."""
        seen: dict[int, Route] = {}
        for routes in (*self._exact.values(), *(w[2] for w in self._wildcards), self._any or ()):
            for r in routes:
                seen.setdefault(id(r), r)
        return list(seen.values())

    def _routes_for(self, authority: bytes) -> tuple[Route, ...] | None:
        a = authority.lower()
        routes = self._exact.get(a)
        if routes is not None:
            return routes
        if a.startswith(b"["):
            close = a.find(b"]") + 1
            host, port = a[:close], a[close + 1 :] if a[close : close + 1] == b":" else None
        else:
            host, colon, port = a.rpartition(b":")
            if not colon:
                host, port = a, None
        if port is not None:
            routes = self._exact.get(host)
            if routes is not None:
                return routes
        n = len(host)
        for suffix, wport, routes in self._wildcards:
            # The "*" stands for at least one character, as in Envoy.
            if n > len(suffix) and host.endswith(suffix) and (wport is None or wport == port):
                return routes
        return self._any

    def match(
        self, authority: bytes, path: bytes, method: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> Route | None:
        """The first route of the virtual host for ``authority`` that matches the request, or None.

        ``headers`` are (lower-case name, value) pairs as decoded, pseudo-headers included.
        """
        routes = self._cache.get(authority, _MISS)
        if routes is _MISS:
            routes = self._routes_for(authority)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[authority] = routes
        if routes is None:
            return None
        bare = None
        hd = _MISS
        for r in routes:
            # Cheapest tests first; the header list is looked at only by a
            # route that needs it, and made into a dict at most once.
            kind = r._path_kind
            if kind == _PREFIX:
                if not path.startswith(r._path):
                    continue
            elif kind != _ANY:
                if bare is None:
                    q = path.find(b"?")
                    bare = path if q < 0 else path[:q]
                if kind == _EXACT:
                    if bare != r._path:
                        continue
                elif r._regex.fullmatch(bare) is None:
                    continue
            m = r._method
            if m is not None and method != m:
                continue
            gp = r._grpc_path
            if gp is not None:
                if gp[-1] == 0x2F:
                    # Service only: any one non-empty method segment after it.
                    if not path.startswith(gp) or len(path) == len(gp) or path.find(b"/", len(gp)) >= 0:
                        continue
                elif path != gp:
                    continue
            if r._needs_headers:
                if hd is _MISS:
                    hd = dict(headers)
                    if len(hd) != len(headers):
                        hd = None
                if not r._headers_hold(hd, headers):
                    continue
            return r
        return None
