"""``meshproxy.admin.v1.Admin``: what one worker tells an operator about itself (and, on worker 0, the others).

Owns the handlers of admin.proto's RPCs and the bookkeeping they need:
``ResourceTracker`` (a ``worker.on_config`` hook) remembers, for each
listener, route table and cluster, the config version it last changed in
(by comparing the serialized resource with the one before).

- GetConfigDump: the config in force (filtered by resource type), each
  resource's version, and ``worker.config_log`` (accepted/rejected counts,
  the last refused version and why).
- GetClusters: per cluster and endpoint, from the runtime: health (the
  health checker's verdict, outlier detection's ejection), requests in
  flight, connections, the balancer's EWMA, the counters of ClusterState;
  worker 0 adds the other workers' (``worker`` says whose).
- GetStats: ``meshproxy.telemetry.metrics.families`` / ``gather`` (the figures
  /metrics shows), summed over the workers on worker 0 unless ``local_only``.
- Get/SetLogLevel: Python logging levels of meshproxy's loggers (every worker).
- Drain: ``worker.drain(exit=False)`` on every worker; Shutdown: the
  worker's ``shutdown`` (the drain that exits, as SIGTERM), once the answer is out.
- GetServerInfo: version, node, live/ready/draining, config version.

``peers`` (worker 0 with ``--concurrency`` > 1) is a ``meshproxy.admin.peers.Peers``; the
other workers serve this same class with no peers on their private socket.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from meshproxy import __version__
from meshproxy.admin.grpcserver import Call, GrpcError, Status
from meshproxy.admin.v1 import admin_pb2
from meshproxy.config.v1 import config_pb2
from meshproxy.conn import USING_EXTENSIONS
from meshproxy.conn import h2conn as h2

__all__ = ["LEVELS", "RESOURCE_TYPES", "Admin", "ResourceTracker", "cluster_status"]

log = logging.getLogger("meshproxy.admin")

#: ConfigDumpRequest.types
RESOURCE_TYPES = ("listeners", "routes", "clusters", "endpoints")
#: The levels SetLogLevel takes.
LEVELS = ("debug", "info", "warning", "error", "critical")

Health = admin_pb2.EndpointStatus.Health
#: PeakEwma's estimate for an endpoint it never sampled (meshproxy.lb's default_rtt_ns, as Subset makes it).
DEFAULT_RTT_NS = 30_000_000.0


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _resources(config: Any) -> dict[tuple[str, str], bytes]:
    """(type, name) -> the resource serialized deterministically, for change detection."""
    out: dict[tuple[str, str], bytes] = {}
    for ls in config.listeners:
        bare = type(ls)()
        bare.CopyFrom(ls)
        del bare.virtual_hosts[:]
        out[("listener", ls.name)] = bare.SerializeToString(deterministic=True)
        out[("route", ls.name)] = b"".join(vh.SerializeToString(deterministic=True) for vh in ls.virtual_hosts)
    for c in config.clusters:
        out[("cluster", c.name)] = c.SerializeToString(deterministic=True)
    return out


class ResourceTracker:
    """The config version each resource last changed in (a ``worker.on_config`` hook)."""

    def __init__(self) -> None:
        # (type, name) -> (serialized, version, wall-clock time of the change)
        self.resources: dict[tuple[str, str], tuple[bytes, str, float]] = {}

    def __call__(self, runtime: Any) -> None:
        now = time.time()
        version = runtime.config.version
        new = {}
        for key, blob in _resources(runtime.config).items():
            old = self.resources.get(key)
            new[key] = old if old is not None and old[0] == blob else (blob, version, now)
        self.resources = new

    def statuses(self, types: set[str]) -> list[Any]:
        return [
            admin_pb2.ResourceStatus(type=t, name=name, version=version, last_updated=_timestamp(when))
            for (t, name), (_, version, when) in sorted(self.resources.items())
            if t in types
        ]


def _filtered(config: Any, types: set[str]) -> Any:
    """``config`` with only the resource types asked for: "listeners" without their routes, "routes"
    as listeners with only name and virtual hosts, "clusters" without endpoints, "endpoints" as
    clusters with only name and endpoints; both halves of a resource give it whole."""
    out = type(config)()
    out.CopyFrom(config)
    if not types & {"listeners", "routes"}:
        del out.listeners[:]
    elif "listeners" not in types:
        del out.listeners[:]
        for src in config.listeners:
            ls = out.listeners.add(name=src.name)
            ls.virtual_hosts.extend(src.virtual_hosts)
    elif "routes" not in types:
        for ls in out.listeners:
            del ls.virtual_hosts[:]
    if not types & {"clusters", "endpoints"}:
        del out.clusters[:]
    elif "clusters" not in types:
        del out.clusters[:]
        for src in config.clusters:
            c = out.clusters.add(name=src.name)
            c.endpoints.extend(src.endpoints)
    elif "endpoints" not in types:
        for c in out.clusters:
            del c.endpoints[:]
    return out


def _ewma_ms(ep: Any, now_ns: int) -> float:
    """The balancer's peak-EWMA latency estimate for ``ep``, ms; 0 when its balancer keeps none.

    Each subset the endpoint is in has its own balancer, fed only by the routes to that subset:
    the highest estimate of the subsets that sampled it, or the default of an endpoint never
    sampled (an estimate still exactly at ``DEFAULT_RTT_NS``) when none did.
    """
    sampled, default = [], 0.0
    for subset, j in ep.placements:
        estimate = getattr(subset.lb, "rtt_estimate", None)
        if estimate is None:
            continue
        ns = estimate(j, now_ns)
        if ns == DEFAULT_RTT_NS:
            default = ns / 1e6
        else:
            sampled.append(ns / 1e6)
    return max(sampled) if sampled else default


def cluster_status(cluster: Any, worker_index: int, now_ns: int, wall_now: float) -> Any:
    """One worker's view of ``cluster`` as a ``ClusterStatus`` (``now_ns``: the core's monotonic clock,
    ``wall_now``: time.time() at the same moment)."""

    state = cluster.state
    det = cluster.outlier
    msg = admin_pb2.ClusterStatus(
        name=cluster.name,
        active_requests=max(0, state.active_requests),
        pending_requests=cluster.pending(),
        active_retries=max(0, state.active_retries),
        active_connections=cluster.connections(),
        retries_total=state.retries,
        retries_budget_denied_total=state.retries_denied,
        retries_overflow_total=state.retries_overflow,
        overflow_total=state.overflows,
        ejections_total=state.ejections,
        circuit_breakers=config_pb2.CircuitBreakers(
            max_connections=cluster.breaker_connections,
            max_pending_requests=cluster.max_pending,
            max_requests=cluster.max_requests,
            max_retries=cluster.max_retries,
        ),
        worker=worker_index,
    )
    policy = cluster.subsets[""].policy if "" in cluster.subsets else 0
    msg.lb_policy = config_pb2.Cluster.LbPolicy.Name(policy)
    for ep in cluster.endpoints:
        e = msg.endpoints.add(
            address=ep.address,
            weight=ep.weight,
            labels=ep.labels,
            subsets=sorted(subset.name for subset, _ in ep.placements),
            active_requests=sum(p.conn.active_streams for p in ep.conns),
            ewma_ms=_ewma_ms(ep, now_ns),
            connections=len(ep.conns),
            worker=worker_index,
        )
        ejected = det is not None and ep.index >= 0 and det.is_ejected(ep.index)
        if det is not None and ep.index >= 0:
            e.ejections = det.times_ejected(ep.index)
        if ejected:
            e.health = Health.EJECTED
            until = getattr(det, "ejected_until", None)  # the detector's monotonic ns, when it tells
            if until is not None:
                e.ejected_until.CopyFrom(_timestamp(wall_now + (until(ep.index) - now_ns) / 1e9))
        elif ep.unhealthy:
            e.health = Health.UNHEALTHY
    return msg


def _levels() -> dict[str, str]:
    out = {"": logging.getLevelName(logging.getLogger().level).lower()}
    for name, logger in sorted(logging.root.manager.loggerDict.items()):
        if (name == "meshproxy" or name.startswith("meshproxy.")) and isinstance(logger, logging.Logger):
            if logger.level != logging.NOTSET:
                out[name] = logging.getLevelName(logger.level).lower()
    return out


class Admin:
    """The handlers of ``meshproxy.admin.v1.Admin`` for ``worker``."""

    def __init__(self, worker: Any, tracker: ResourceTracker, peers: Any = None) -> None:
        self.worker = worker
        self.tracker = tracker
        self.peers = peers

    async def GetConfigDump(self, request: Any, call: Call) -> Any:
        types = set(request.types) or set(RESOURCE_TYPES)
        unknown = sorted(types - set(RESOURCE_TYPES))
        if unknown:
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"unknown resource type {unknown[0]!r}: one of {', '.join(RESOURCE_TYPES)}"
            )
        worker = self.worker
        dump = admin_pb2.ConfigDump()
        runtime = worker.runtime
        if runtime is not None:
            dump.version = runtime.version
            dump.node.CopyFrom(runtime.config.node)
            dump.config.CopyFrom(_filtered(runtime.config, types))
            wanted = set()
            if types & {"listeners"}:
                wanted.add("listener")
            if types & {"routes"}:
                wanted.add("route")
            if types & {"clusters", "endpoints"}:
                wanted.add("cluster")
            dump.resources.extend(self.tracker.statuses(wanted))
        cl = worker.config_log
        dump.accepted_total = cl.accepted_total
        dump.rejected_total = cl.rejected_total
        dump.source = cl.source
        if cl.last_updated:
            dump.last_updated.CopyFrom(_timestamp(cl.last_updated))
        if cl.last_rejected is not None:
            version, reason, when = cl.last_rejected
            dump.last_rejected.CopyFrom(admin_pb2.RejectedConfig(version=version, reason=reason, time=_timestamp(when)))
        return dump

    async def GetClusters(self, request: Any, call: Call) -> Any:
        out = admin_pb2.ClustersResponse()
        runtime = self.worker.runtime
        now, wall = h2.monotonic_ns(), time.time()
        if runtime is not None:
            for name, cluster in sorted(runtime.clusters.items()):
                if request.name and name != request.name:
                    continue
                out.clusters.append(cluster_status(cluster, self.worker.index, now, wall))
        if self.peers is not None:
            for r in await self.peers.clusters(request.name):
                out.clusters.extend(r.clusters)
            out.clusters.sort(key=lambda c: (c.name, c.worker))
        if request.name and not out.clusters:
            raise GrpcError(Status.NOT_FOUND, f"no cluster {request.name!r}")
        return out

    async def GetStats(self, request: Any, call: Call) -> Any:
        try:
            from meshproxy.telemetry import metrics
        except ImportError:
            raise GrpcError(Status.UNIMPLEMENTED, "metrics are not built into this sidecar") from None
        prefixes = list(request.prefixes)
        if request.local_only or self.peers is None:
            families, workers = metrics.families(self.worker, True, prefixes), 1
        else:
            # One code path with /metrics: the other workers' figures summed with ours.
            try:
                families, workers = await metrics.gather(self.worker, self.peers, prefixes)
            except TimeoutError:
                raise GrpcError(Status.UNAVAILABLE, "the other workers did not answer in time") from None
        return admin_pb2.StatsResponse(families=families, workers=workers)

    async def GetLogLevel(self, request: Any, call: Call) -> Any:
        return admin_pb2.LogLevelResponse(levels=_levels())

    async def SetLogLevel(self, request: Any, call: Call) -> Any:
        level = request.level.lower()
        if level not in LEVELS:
            raise GrpcError(Status.INVALID_ARGUMENT, f"unknown level {request.level!r}: one of {', '.join(LEVELS)}")
        name = request.logger
        if name and name != "meshproxy" and not name.startswith("meshproxy."):
            raise GrpcError(Status.INVALID_ARGUMENT, f"{name!r} is not one of meshproxy's loggers")
        logging.getLogger(name or None).setLevel(level.upper())
        log.warning("log level of %s set to %s", name or "the root logger", level)
        if self.peers is not None:
            await self.peers.set_log_level(name, level)
        return admin_pb2.LogLevelResponse(levels=_levels())

    async def Drain(self, request: Any, call: Call) -> Any:
        worker = self.worker
        connections = len(worker.downstreams)
        worker.drain(exit=False)
        if self.peers is not None:
            for r in await self.peers.drain():
                connections += r.connections
        return admin_pb2.DrainResponse(connections=connections)

    async def Shutdown(self, request: Any, call: Call) -> Any:
        # After the answer is out: the drain that exits may stop the loop soon after.
        shutdown = getattr(self.worker, "shutdown", None) or self.worker.drain
        call.on_done(shutdown)
        return admin_pb2.ShutdownResponse()

    async def GetServerInfo(self, request: Any, call: Call) -> Any:
        worker = self.worker
        info = admin_pb2.ServerInfo(
            version=__version__,
            live=True,
            ready=worker.ready,
            draining=worker.draining,
            config_version=worker.runtime.version if worker.runtime is not None else "",
            start_time=_timestamp(worker.started_at),
            workers=worker.workers,
            extensions=USING_EXTENSIONS,
        )
        node = worker.node
        if node is not None:
            info.node.CopyFrom(node)
        return info
