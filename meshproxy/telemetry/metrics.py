"""Metrics: the per-request recording hook, the metric families (admin protos) built from the
compiled counters and the worker's state at scrape time, and the Prometheus endpoint.

Owns three things, in the order data flows:

- ``Recorder.record(req)``, a worker's ``on_complete`` hook: it finds the request's label id
  (cached on the endpoint, ``Endpoint.stats_base``, or the route, ``Route.stats_id``; worked out
  by ``meshproxy.telemetry.labels`` on first use after a config change) and calls the compiled
  ``RequestStats.record`` once. Nothing else happens per request; TCP passthroughs are counted
  per connection (``tcp_opened``/``tcp_closed``; their bytes are read from the passthrough at
  scrape time);
- ``families(worker)``: every metric as ``meshproxy.admin.v1.MetricFamily`` protos, the one code
  path behind both the admin ``GetStats`` and ``/metrics``; ``merge`` sums several workers'
  families by (name, labels) (``max`` for the info gauges, which each worker reports alike);
- ``serve(...)``: ``GET /metrics`` over HTTP/1.1 on the worker's loop, the families (the whole
  sidecar's, with ``--concurrency`` N: worker 0 asks its peers) converted to prometheus_client
  metrics on a private registry and written by prometheus_client's own exposition code (text
  format 0.0.4, or OpenMetrics when the scraper asks for it).

Family names: the Istio-standard ones are ``meshproxy_*`` or, with ``--metric-names istio``,
``istio_*`` (``METRIC_NAMES`` lists both sets, as exposed); the rest are always ``meshproxy_*``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from meshproxy import __version__
from meshproxy.admin.v1 import admin_pb2 as pb
from meshproxy.conn import USING_EXTENSIONS as CONN_EXTENSIONS
from meshproxy.conn import h2conn as h2
from meshproxy.telemetry import stats as _stats
from meshproxy.telemetry.labels import BASE_LABELS, REQUEST_LABELS, ROUTE_LABELS, Labeller

if TYPE_CHECKING:
    from meshproxy.worker import Runtime, Worker

__all__ = [
    "METRIC_NAMES",
    "Recorder",
    "families",
    "gather",
    "merge",
    "names",
    "serve",
    "to_prometheus",
]

log = logging.getLogger("meshproxy.metrics")

COUNTER = pb.MetricFamily.COUNTER
GAUGE = pb.MetricFamily.GAUGE
HISTOGRAM = pb.MetricFamily.HISTOGRAM

# The Istio-standard families, by what they measure: (suffix after the prefix, type, help).
_STANDARD = {
    "requests": ("requests_total", COUNTER, "Requests, by source, destination and response."),
    "duration": ("request_duration_milliseconds", HISTOGRAM, "Request duration, ms (Envoy's buckets)."),
    "request_bytes": ("request_bytes", HISTOGRAM, "Request body bytes."),
    "response_bytes": ("response_bytes", HISTOGRAM, "Response body bytes."),
    "request_messages": ("request_messages_total", COUNTER, "gRPC request messages."),
    "response_messages": ("response_messages_total", COUNTER, "gRPC response messages."),
    "tcp_sent": ("tcp_sent_bytes_total", COUNTER, "Bytes sent to the client on TCP connections."),
    "tcp_received": ("tcp_received_bytes_total", COUNTER, "Bytes received from the client on TCP connections."),
    "tcp_opened": ("tcp_connections_opened_total", COUNTER, "TCP connections opened."),
    "tcp_closed": ("tcp_connections_closed_total", COUNTER, "TCP connections closed."),
}

# Always meshproxy_*: (name, type, help).
_OWN = (
    ("meshproxy_route_requests_total", COUNTER, "Requests by route and success."),
    ("meshproxy_route_request_duration_milliseconds", HISTOGRAM, "Request duration by route, ms."),
    ("meshproxy_upstream_retries_total", COUNTER, "Retries sent."),
    ("meshproxy_upstream_retry_budget_denied_total", COUNTER, "Retries the retry budget refused."),
    ("meshproxy_upstream_retry_overflow_total", COUNTER, "Retries refused by the max_retries circuit breaker."),
    ("meshproxy_upstream_overflow_total", COUNTER, "Requests answered overflow (UO) by a circuit breaker."),
    ("meshproxy_outlier_ejections_total", COUNTER, "Endpoints ejected by outlier detection."),
    ("meshproxy_outlier_ejected_endpoints", GAUGE, "Endpoints ejected now."),
    ("meshproxy_upstream_requests_active", GAUGE, "Requests in flight to the cluster."),
    ("meshproxy_upstream_requests_pending", GAUGE, "Requests waiting for an upstream connection."),
    ("meshproxy_upstream_connections_active", GAUGE, "Upstream connections open."),
    ("meshproxy_endpoints", GAUGE, "Endpoints by health (healthy, unhealthy, ejected)."),
    ("meshproxy_downstream_connections_active", GAUGE, "Downstream connections open (HTTP/2 and TCP), by listener."),
    ("meshproxy_config_info", GAUGE, "The config version in force (value 1)."),
    ("meshproxy_config_updates_total", COUNTER, "Configs accepted and rejected."),
    ("meshproxy_config_last_update_timestamp_seconds", GAUGE, "When a config was last accepted (Unix time)."),
    ("meshproxy_build_info", GAUGE, "The sidecar's version and whether its compiled extensions are in use."),
)
_OWN_TYPES = {name: (kind, text) for name, kind, text in _OWN}
_CLUSTER_FAMILIES = (
    "meshproxy_upstream_retries_total",
    "meshproxy_upstream_retry_budget_denied_total",
    "meshproxy_upstream_retry_overflow_total",
    "meshproxy_upstream_overflow_total",
    "meshproxy_outlier_ejections_total",
    "meshproxy_outlier_ejected_endpoints",
    "meshproxy_upstream_requests_active",
    "meshproxy_upstream_requests_pending",
    "meshproxy_upstream_connections_active",
    "meshproxy_endpoints",
)
# Gauges every worker reports alike: the sidecar's value is any worker's, not their sum.
_SAME_IN_EVERY_WORKER = frozenset(
    ("meshproxy_config_info", "meshproxy_config_last_update_timestamp_seconds", "meshproxy_build_info")
)


def names(style: str = "meshproxy") -> dict[str, str]:
    """The Istio-standard family names in ``style`` ("meshproxy" or "istio"), by what they measure."""
    prefix = "istio_" if style == "istio" else "meshproxy_"
    return {key: prefix + suffix for key, (suffix, _, _) in _STANDARD.items()}


#: The family names each ``--metric-names`` style exposes (histograms by their base name).
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    style: (*names(style).values(), *(name for name, _, _ in _OWN)) for style in ("meshproxy", "istio")
}

_STANDARD_TYPES = {
    prefix + suffix: (kind, text) for prefix in ("meshproxy_", "istio_") for suffix, kind, text in _STANDARD.values()
}

now_ns = h2.monotonic_ns


class Recorder:
    """One worker's request and TCP counters, and the hooks that feed them.

    ``record`` is the worker's ``on_complete`` hook (``meshproxy.telemetry.install`` adds it);
    ``configure`` (added to ``worker.on_config`` here) forgets the label ids cached on the
    runtime's endpoints, since their labels or the node may have changed: each is worked out
    again on its next request. ``tcp_opened``/``tcp_closed`` are the passthroughs' hooks
    (``worker.on_tcp_open``/``on_tcp_close`` when the worker has them).
    """

    __slots__ = (
        "_cluster_bases",
        "_peer_bases",
        "_record",
        "_tcp_live",
        "labeller",
        "settings",
        "stats",
        "style",
        "tcp",
        "worker",
    )

    def __init__(self, worker: Worker, settings: Any) -> None:
        self.worker = worker
        self.settings = settings
        self.style = getattr(settings, "metric_names", "meshproxy")
        self.stats = _stats.RequestStats()
        self.tcp = _stats.TcpStats()
        self._record = self.stats.record
        self.labeller = Labeller(worker.node)
        # (listener, cluster name or None) -> base id, for requests that reached no endpoint.
        self._cluster_bases: dict[tuple[str, str | None], int] = {}
        # (base id, peer SPIFFE id) -> base id with the peer's labels (mTLS).
        self._peer_bases: dict[tuple[int, str], int] = {}
        # Open passthroughs: [base id, bytes sent and received already counted].
        self._tcp_live: dict[Any, list[int]] = {}
        on_config = getattr(worker, "on_config", None)
        if on_config is not None:
            on_config.append(self.configure)
        for attr, hook in (("on_tcp_open", self.tcp_opened), ("on_tcp_close", self.tcp_closed)):
            hooks = getattr(worker, attr, None)
            if hooks is not None:
                hooks.append(hook)
        if worker.runtime is not None:
            self.configure(worker.runtime)

    # -- config time -------------------------------------------------------------------------------

    def configure(self, runtime: Runtime) -> None:
        """A new runtime is in force: the node may be another, and endpoints kept from the last
        one may have new labels. (Routes are new objects each time: their ids start unset.)"""
        self.labeller.set_node(runtime.config.node)
        self._cluster_bases.clear()
        for cluster in runtime.clusters.values():
            for ep in cluster.endpoints:
                ep.stats_base = -1

    # -- per request -----------------------------------------------------------------------------

    def record(self, req: Any) -> None:
        """Count one finished request (the worker's completion hook): one compiled call."""
        ep = req.endpoint
        if ep is not None:
            base = ep.stats_base
            if base < 0:
                base = ep.stats_base = self.labeller.endpoint_base(req.listener, ep.cluster.name, ep.labels)
        else:
            base = self._no_endpoint(req)
        peer = req.peer
        if peer is not None:
            # Over mTLS (inbound): the labels also say who called. A dict lookup, only then.
            key = (base, peer.spiffe_id)
            pb = self._peer_bases.get(key)
            if pb is None:
                pb = self._peer_bases[key] = self.labeller.with_peer(base, peer.spiffe_id, peer.namespace)
            base = pb
        route = req.route
        if route is None:
            rid = -1
        else:
            rid = route.stats_id
            if rid < 0:
                rid = route.stats_id = self.labeller.route_id(req.listener, route.virtual_host, route.name)
        down = req.down
        # Flags: the proxy's own (req.flags), else the core's (UR, UC), else None (the counters take None as none).
        self._record(base, rid, down, req.up, req.flags or down.response_flags, now_ns())

    def _no_endpoint(self, req: Any) -> int:
        # No route, a direct response, no healthy endpoint, an overflow...: rare, a dict lookup.
        subset = req.subset
        key = (req.listener, subset.cluster_name if subset is not None else None)
        base = self._cluster_bases.get(key)
        if base is None:
            base = self._cluster_bases[key] = self.labeller.cluster_base(*key)
        return base

    # -- per TCP passthrough -----------------------------------------------------------------------

    def tcp_opened(self, pt: Any) -> None:
        """A passthrough (``meshproxy.transparent.Passthrough``) reached its upstream."""
        ep = pt.endpoint
        listener = pt.listener
        if ep is not None:
            base = self.labeller.endpoint_base(listener, ep.cluster.name, ep.labels)
        elif pt.cluster is not None:
            base = self.labeller.cluster_base(listener, pt.cluster)
        else:
            base = self.labeller.passthrough_base(listener)
        self.tcp.opened(base)
        self._tcp_live[pt] = [base, 0, 0]

    def tcp_closed(self, pt: Any) -> None:
        """A passthrough ended (one that never reached its upstream was not counted)."""
        entry = self._tcp_live.pop(pt, None)
        if entry is not None:
            base, sent, received = entry
            self.tcp.closed(base, pt.upstream.bytes_in - sent, pt.client.bytes_in - received)

    def _flush_tcp(self) -> None:
        # Bytes of connections still open, so that a long-lived one shows before it ends.
        add = self.tcp.add
        for pt, entry in self._tcp_live.items():
            sent, received = pt.upstream.bytes_in, pt.client.bytes_in
            if sent != entry[1] or received != entry[2]:
                add(entry[0], sent - entry[1], received - entry[2])
                entry[1], entry[2] = sent, received

    # -- scrape time -------------------------------------------------------------------------------

    def request_families(self) -> list[pb.MetricFamily]:
        """The Istio-standard request and TCP families and the per-route ones, from the counters."""
        self._flush_tcp()
        n = names(self.style)
        out = {key: _family(n[key]) for key in _STANDARD}
        route_count = _family("meshproxy_route_requests_total")
        route_duration = _family("meshproxy_route_request_duration_milliseconds")
        labels_of = self.labeller.labels
        duration_bounds = _stats.DURATION_BOUNDS_MS
        size_bounds = _stats.SIZE_BOUNDS
        for row in self.stats.snapshot():
            (base, is_grpc, status, grpc_status, flags, count, dur_sum, dur, req_sum, req_size, resp_sum, resp_size) = (
                row[:12]
            )
            labels = dict(zip(BASE_LABELS, labels_of(base), strict=True))
            labels.update(
                zip(
                    REQUEST_LABELS,
                    (
                        "grpc" if is_grpc else "http",
                        str(status),
                        str(grpc_status) if is_grpc and grpc_status >= 0 else "",
                        flags or "-",
                    ),
                    strict=True,
                )
            )
            _add_value(out["requests"], labels, count)
            _add_histogram(out["duration"], labels, count, dur_sum, duration_bounds, dur)
            _add_histogram(out["request_bytes"], labels, count, req_sum, size_bounds, req_size)
            _add_histogram(out["response_bytes"], labels, count, resp_sum, size_bounds, resp_size)
            if is_grpc:
                # Istio reports message counts for gRPC only.
                _add_value(out["request_messages"], labels, row[12])
                _add_value(out["response_messages"], labels, row[13])
        for base, opened, closed, sent, received in self.tcp.snapshot():
            labels = dict(zip(BASE_LABELS, labels_of(base), strict=True))
            _add_value(out["tcp_opened"], labels, opened)
            _add_value(out["tcp_closed"], labels, closed)
            _add_value(out["tcp_sent"], labels, sent)
            _add_value(out["tcp_received"], labels, received)
        route_labels = self.labeller.route_labels
        by_route: dict[int, list] = {}
        for rid, success, count, dur_sum, dur in self.stats.route_snapshot():
            labels = dict(zip(ROUTE_LABELS, route_labels(rid), strict=True))
            _add_value(route_count, {**labels, "success": "true" if success else "false"}, count)
            acc = by_route.get(rid)
            if acc is None:
                by_route[rid] = [labels, count, dur_sum, list(dur)]
            else:
                acc[1] += count
                acc[2] += dur_sum
                acc[3] = [a + b for a, b in zip(acc[3], dur, strict=True)]
        for labels, count, dur_sum, dur in by_route.values():
            _add_histogram(route_duration, labels, count, dur_sum, duration_bounds, dur)
        return [*out.values(), route_count, route_duration]


# -- families ------------------------------------------------------------------------------------


def _family(name: str) -> pb.MetricFamily:
    kind, text = _STANDARD_TYPES.get(name) or _OWN_TYPES[name]
    return pb.MetricFamily(name=name, help=text, type=kind)


def _add_value(family: pb.MetricFamily, labels: dict[str, str], value: float) -> None:
    family.metrics.add(labels=labels, value=value)


def _add_histogram(
    family: pb.MetricFamily,
    labels: dict[str, str],
    count: int,
    total: float,
    bounds: Sequence[float],
    buckets: Sequence[int],
) -> None:
    """``buckets``: per-bucket counts with +Inf last, as the counters keep them."""
    cumulative = []
    running = 0
    for c in buckets[: len(bounds)]:
        running += c
        cumulative.append(running)
    m = family.metrics.add(labels=labels)
    h = m.histogram
    h.count = count
    h.sum = total
    h.bounds.extend(float(b) for b in bounds)
    h.cumulative_counts.extend(cumulative)


def _cluster_families(runtime: Runtime | None) -> list[pb.MetricFamily]:
    out = {name: _family(name) for name in _CLUSTER_FAMILIES}
    if runtime is None:
        return list(out.values())
    for name, cluster in runtime.clusters.items():
        state = cluster.state
        labels = {"cluster": name}
        det = cluster.outlier
        healthy = unhealthy = ejected = conns = 0
        for ep in cluster.endpoints:
            conns += len(ep.conns)
            if ep.unhealthy:
                unhealthy += 1
            elif det is not None and ep.index >= 0 and det.is_ejected(ep.index):
                ejected += 1
            else:
                healthy += 1
        for family, value in (
            ("meshproxy_upstream_retries_total", state.retries),
            ("meshproxy_upstream_retry_budget_denied_total", state.retries_denied),
            ("meshproxy_upstream_retry_overflow_total", state.retries_overflow),
            ("meshproxy_upstream_overflow_total", state.overflows),
            ("meshproxy_outlier_ejections_total", state.ejections),
            ("meshproxy_outlier_ejected_endpoints", det.ejected() if det is not None else 0),
            ("meshproxy_upstream_requests_active", state.active_requests),
            ("meshproxy_upstream_requests_pending", cluster.pending()),
            ("meshproxy_upstream_connections_active", conns),
        ):
            _add_value(out[family], labels, value)
        endpoints = out["meshproxy_endpoints"]
        for health, value in (("healthy", healthy), ("unhealthy", unhealthy), ("ejected", ejected)):
            _add_value(endpoints, {"cluster": name, "health": health}, value)
    return list(out.values())


def _worker_families(worker: Worker) -> list[pb.MetricFamily]:
    downstream = _family("meshproxy_downstream_connections_active")
    counts: dict[str, int] = {}
    for p in worker.downstreams:
        counts[p.listener] = counts.get(p.listener, 0) + 1
    for t in worker.passthroughs:
        counts[t.listener] = counts.get(t.listener, 0) + 1
    for listener in worker.listeners:
        counts.setdefault(listener, 0)
    for listener, n in sorted(counts.items()):
        _add_value(downstream, {"listener": listener}, n)
    info = _family("meshproxy_config_info")
    runtime = worker.runtime
    if runtime is not None:
        _add_value(info, {"version": runtime.version}, 1)
    updates = _family("meshproxy_config_updates_total")
    last = _family("meshproxy_config_last_update_timestamp_seconds")
    config_log = getattr(worker, "config_log", None)
    if config_log is not None:
        _add_value(updates, {"result": "accepted"}, config_log.accepted_total)
        _add_value(updates, {"result": "rejected"}, config_log.rejected_total)
        if config_log.last_updated:
            _add_value(last, {}, float(config_log.last_updated))
    build = _family("meshproxy_build_info")
    extensions = CONN_EXTENSIONS and _stats.USING_EXTENSIONS
    _add_value(build, {"version": __version__, "extensions": "true" if extensions else "false"}, 1)
    return [downstream, info, updates, last, build]


def families(worker: Worker, local_only: bool = True, prefixes: Sequence[str] = ()) -> list[pb.MetricFamily]:
    """Every metric family of ``worker`` (its own figures: ``gather`` adds the other workers'),
    filtered to the names starting with one of ``prefixes`` (none: all). Request and TCP
    families come from ``worker.recorder`` (none when metrics are off). ``local_only`` is
    StatsRequest's: this function never asks other workers, whatever it says."""
    out: list[pb.MetricFamily] = []
    recorder = getattr(worker, "recorder", None)
    if recorder is not None:
        out += recorder.request_families()
    out += _cluster_families(worker.runtime)
    out += _worker_families(worker)
    if prefixes:
        out = [f for f in out if f.name.startswith(tuple(prefixes))]
    return out


def _key(labels: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def merge(*lists: Iterable[pb.MetricFamily]) -> list[pb.MetricFamily]:
    """Several workers' families as one sidecar's: metrics with the same name and labels summed
    (counters, gauges, histograms bucket by bucket), except the gauges every worker reports alike
    (config and build info, last update time), whose largest value stands."""
    merged: dict[str, pb.MetricFamily] = {}
    index: dict[str, dict[tuple, pb.Metric]] = {}
    for fams in lists:
        for f in fams:
            into = merged.get(f.name)
            if into is None:
                into = merged[f.name] = pb.MetricFamily(name=f.name, help=f.help, type=f.type)
                index[f.name] = {}
            seen = index[f.name]
            keep_max = f.name in _SAME_IN_EVERY_WORKER
            for m in f.metrics:
                key = _key(m.labels)
                have = seen.get(key)
                if have is None:
                    have = seen[key] = into.metrics.add()
                    have.CopyFrom(m)
                elif f.type == HISTOGRAM:
                    h, o = have.histogram, m.histogram
                    if list(h.bounds) != list(o.bounds):
                        raise ValueError(f"{f.name}: workers report different bucket bounds")
                    h.count += o.count
                    h.sum += o.sum
                    for i, c in enumerate(o.cumulative_counts):
                        h.cumulative_counts[i] += c
                elif keep_max:
                    have.value = max(have.value, m.value)
                else:
                    have.value += m.value
    return list(merged.values())


async def gather(worker: Worker, peers: Any, prefixes: Sequence[str] = (), timeout: float = 5.0) -> tuple[list, int]:
    """The whole sidecar's families (``worker``'s and, when ``peers`` is given, every other
    worker's, merged) and how many workers they cover. Raises what ``peers.stats`` raises, and
    TimeoutError after ``timeout`` seconds."""
    local = families(worker, True, prefixes)
    if peers is None:
        return local, 1
    responses = await asyncio.wait_for(peers.stats(list(prefixes)), timeout)
    return merge(local, *(r.families for r in responses)), 1 + sum(max(1, r.workers) for r in responses)


# -- prometheus_client ---------------------------------------------------------------------------


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


def to_prometheus(fams: Iterable[pb.MetricFamily]) -> Iterator[Any]:
    """The families as prometheus_client ``Metric`` objects (what a custom collector yields)."""
    from prometheus_client.metrics_core import Metric

    for f in fams:
        if f.type == COUNTER:
            base = f.name[: -len("_total")] if f.name.endswith("_total") else f.name
            metric = Metric(base, f.help, "counter")
            for m in f.metrics:
                metric.add_sample(base + "_total", dict(m.labels), m.value)
        elif f.type == GAUGE:
            metric = Metric(f.name, f.help, "gauge")
            for m in f.metrics:
                metric.add_sample(f.name, dict(m.labels), m.value)
        else:
            metric = Metric(f.name, f.help, "histogram")
            for m in f.metrics:
                labels = dict(m.labels)
                h = m.histogram
                for bound, c in zip(h.bounds, h.cumulative_counts, strict=True):
                    metric.add_sample(f.name + "_bucket", {**labels, "le": _le(bound)}, c)
                metric.add_sample(f.name + "_bucket", {**labels, "le": "+Inf"}, h.count)
                metric.add_sample(f.name + "_count", labels, h.count)
                metric.add_sample(f.name + "_sum", labels, h.sum)
        yield metric


class _Snapshot:
    """A prometheus_client custom collector over families gathered just before exposition."""

    def __init__(self) -> None:
        self.families: list[pb.MetricFamily] = []

    def collect(self) -> Iterator[Any]:
        return to_prometheus(self.families)


# -- the HTTP endpoint ---------------------------------------------------------------------------

_MAX_HEAD = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class _Exporter:
    """What every connection of one metrics server shares: the worker, its peers, the registry."""

    def __init__(self, worker: Worker, peers: Any) -> None:
        from prometheus_client import CollectorRegistry

        self.worker = worker
        self.peers = peers
        self.snapshot = _Snapshot()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.snapshot)

    async def render(self, accept: str) -> tuple[int, str, bytes]:
        from prometheus_client.exposition import choose_encoder

        # A worker that does not answer: no partial sums (the sidecar's counters would seem to drop).
        expected = getattr(self.worker, "workers", 1)
        try:
            fams, answered = await gather(self.worker, self.peers)
        except Exception as e:
            log.warning("metrics: the other workers' figures are missing: %s", e)
            return 503, "text/plain; charset=utf-8", f"the other workers' figures are missing: {e}\n".encode()
        if self.peers is not None and answered < expected:
            message = f"{expected - answered} of {expected} workers did not answer\n"
            return 503, "text/plain; charset=utf-8", message.encode()
        encode, content_type = choose_encoder(accept)
        self.snapshot.families = fams
        try:
            return 200, content_type, encode(self.registry)
        finally:
            self.snapshot.families = []


class _MetricsProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: requests answered one at a time, in order (keep-alive)."""

    def __init__(self, exporter: _Exporter) -> None:
        self.exporter = exporter
        self.transport: Any = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self._send(400, "text/plain", b"request head too large\n", close=True)
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self._request(head)

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._send(400, "text/plain", b"bad request line\n", close=True)
            return
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        if "content-length" in headers or "transfer-encoding" in headers:
            # Nothing here takes a body: rather than skip one, answer and close.
            close = True
        path = target.split("?", 1)[0]
        if path != "/metrics":
            self._send(404, "text/plain", b"not found: try /metrics\n", close, head_only=method == "HEAD")
            return
        if method not in ("GET", "HEAD"):
            self._send(405, "text/plain", b"GET /metrics\n", close, extra=b"Allow: GET, HEAD\r\n")
            return
        self.busy = True
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._metrics(headers.get("accept", ""), close, method == "HEAD"))
        task.add_done_callback(_log_failure)

    async def _metrics(self, accept: str, close: bool, head_only: bool) -> None:
        try:
            status, content_type, body = await self.exporter.render(accept)
        finally:
            self.busy = False
        if self.transport is None:
            return
        self._send(status, content_type, body, close, head_only=head_only)
        if self.transport is not None and not close:
            self.transport.resume_reading()
            self._next()

    def _send(
        self, status: int, content_type: str, body: bytes, close: bool, head_only: bool = False, extra: bytes = b""
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n"
        ).encode()
        transport.write(head + extra + b"\r\n" + (b"" if head_only else body))
        if close:
            transport.close()
            self.transport = None


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("metrics: a scrape failed", exc_info=task.exception())


async def serve(worker: Worker, host: str, port: int, settings: Any = None, peers: Any = None) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` on the worker's loop (HTTP/1.1, keep-alive); the
    families are ``worker``'s and, with ``peers`` (``meshproxy.admin.peers.Peers``), the other
    workers' too, summed. Returns the server, serving. (``settings`` is accepted for symmetry
    with the other telemetry pieces: the names are the recorder's.)"""
    exporter = _Exporter(worker, peers)
    server = await worker.loop.create_server(lambda: _MetricsProtocol(exporter), host, port, reuse_address=True)
    return server
