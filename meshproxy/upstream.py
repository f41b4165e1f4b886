"""Upstream: clusters, their subsets and endpoints, and each endpoint's pool of
multiplexed HTTP/2 connections.

A cluster is built from a ``meshproxy.v1.Cluster`` message once per config
change; what must outlive a config change (requests and retries in flight,
the counters, the retry budget, outlier detection's verdicts) is in its
``ClusterState``, handed from one build to the next by cluster name. Each
subset (the whole cluster is the subset "") owns a compiled balancer over
its endpoints. An endpoint owns its connections: a request
takes the first that can open a stream; another is opened when all are at
the peer's MAX_CONCURRENT_STREAMS or near the end of the stream-id space (up
to ``max_connections_per_endpoint``); requests that arrive while the first
connection is being made wait for it in the endpoint, and all get an answer
if the connect fails. A connection that received GOAWAY takes no new streams
and closes when its last stream ends; one idle past ``idle_timeout`` is shut
down gracefully.

Circuit breakers (per worker, as everything here): a request over
``max_requests``, one that would wait for a connection over
``max_pending_requests``, and a new connection over ``max_connections`` (the
request waits for a stream on the ones there are, or overflows when there
are none) are answered at once with OVERFLOW. Outlier detection, when
configured, takes ejected endpoints out of every subset's balancer
(``set_available``) and puts them back when their time is up (``sweep``).

A cluster whose ``tls`` is ISTIO_MUTUAL connects to its endpoints (but its
``plaintext_endpoints``) with the worker's client context (``meshproxy.tls``):
TLS 1.3, ALPN h2, the workload certificate. A server whose chain does not
verify, or whose SPIFFE id is not one the cluster allows, fails the connect
like a refused TCP connect does (flag UF, the TLS reason in the message),
and counts for outlier detection the same way.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshproxy.config import connect_timeout_s, field_ns, idle_timeout_s, parse_address
from meshproxy.conn import h2conn as h2
from meshproxy.lb import balancer
from meshproxy.resilience import outlier
from meshproxy.resilience.policy import DEFAULT_BUDGET, budget_args, new_budget
from meshproxy.tls import PeerRefused, describe, upstream_args, upstream_peer
from meshproxy.transport import H2Protocol

if TYPE_CHECKING:
    from meshproxy.worker import Worker

__all__ = ["Cluster", "ClusterState", "Endpoint", "Subset", "UpstreamProtocol", "connect_failure"]

log = logging.getLogger("meshproxy.upstream")

EV_GOAWAY = h2.EV_GOAWAY
EV_IDLE = h2.EV_IDLE
EV_TERMINATED = h2.EV_TERMINATED

# Connection failures, as the downstream sees them: (response flag, grpc status, http status, message).
CONNECT_FAILURE = ("UF", 14, 503, "upstream connect error")
OVERFLOW = ("UO", 14, 503, "upstream connection pool overflow")


def connect_failure(reason: str) -> tuple:
    """A connect failure (flag UF) whose message says why: a TLS failure, a refused peer identity."""
    return ("UF", 14, 503, f"upstream connect error: {reason}")


class Endpoint:
    """One upstream address and its connections."""

    __slots__ = (
        "address",
        "cluster",
        "connecting",
        "conns",
        "failing",
        "host",
        "index",
        "labels",
        "mtls",
        "placements",
        "port",
        "stats_base",
        "unhealthy",
        "waiters",
        "weight",
    )

    def __init__(self, cluster: Cluster, address: str, weight: int, labels: dict[str, str]) -> None:
        self.cluster = cluster
        self.stats_base = -1  # meshproxy.telemetry.metrics: the id of its label set (-1: none yet)
        self.address = address
        self.host, self.port = parse_address(address)
        self.weight = weight or 1
        self.labels = labels
        # Connect with mTLS (the cluster's ISTIO_MUTUAL, this endpoint not a plaintext one); set by the cluster.
        self.mtls = False
        self.index = -1  # in cluster.endpoints
        self.unhealthy = False  # active health checks' verdict (meshproxy.health)
        # Outlier detection has seen a failure since the last success: the next success must be recorded.
        self.failing = False
        # (subset, index in the subset's balancer) for each subset this endpoint is in.
        self.placements: list[tuple[Subset, int]] = []
        self.conns: list[UpstreamProtocol] = []
        self.connecting = 0
        # Requests waiting for a connection: callables taking an H2Connection, or None on failure.
        self.waiters: deque[Callable[[h2.H2Connection | None, tuple | None], None]] = deque()

    def ready(self) -> h2.H2Connection | None:
        """A connection that can open a stream now, or None."""
        for p in self.conns:
            c = p.conn
            if c.can_open:
                return c
        return None

    def _unsettled(self) -> int:
        # Connections made but without the peer's SETTINGS yet: they will take streams soon.
        return self.connecting + sum(1 for p in self.conns if not p.conn.settled)

    def wait(self, worker: Worker, callback: Callable[[h2.H2Connection | None, tuple | None], None]) -> None:
        """Call ``callback(conn, None)`` once a connection can take a stream, or ``(None, failure)``."""
        cluster = self.cluster
        if cluster.max_pending and cluster.pending() >= cluster.max_pending:
            cluster.state.overflows += 1
            callback(None, OVERFLOW)
            return
        if self._unsettled() == 0:
            if not self._may_connect():
                if not self.conns:
                    cluster.state.overflows += 1
                    callback(None, OVERFLOW)
                    return
                # At a connection limit: wait for a stream to end on one of them.
            else:
                self.connecting += 1
                worker.loop.create_task(self._connect(worker))
        self.waiters.append(callback)

    def _may_connect(self) -> bool:
        cluster = self.cluster
        limit = cluster.max_connections
        if limit and len(self.conns) >= limit:
            return False
        limit = cluster.breaker_connections
        return not limit or cluster.connections() < limit

    async def _connect(self, worker: Worker) -> None:
        loop = worker.loop
        failure = CONNECT_FAILURE
        try:
            tls = upstream_args(worker, self)  # {} for plaintext
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamProtocol(worker, self, bool(tls)), self.host, self.port, **tls),
                self.cluster.connect_timeout,
            )
            if proto.refused:
                raise PeerRefused(proto.refused)
        except (TimeoutError, OSError) as e:  # ssl.SSLError and PeerRefused are OSErrors
            if isinstance(e, ssl.SSLError | PeerRefused):
                failure = connect_failure(f"TLS error: {describe(e)}")
                log.info("mTLS to %s (%s) failed: %s", self.address, self.cluster.name, describe(e))
            self.connecting -= 1
            log.debug("connect to %s failed: %s", self.address, e)
            self.cluster.record(self, outlier.LOCAL_ORIGIN_FAILURE, h2.monotonic_ns())
            if self.connecting == 0 and not self.conns:
                self.fail_waiters(failure)
                worker.outbox.flush()
            return
        self.connecting -= 1
        self.serve_waiters(proto)

    def fail_waiters(self, failure: tuple) -> None:
        """Answer every waiting request with ``failure`` (no connection will take them)."""
        waiters, self.waiters = self.waiters, deque()
        for cb in waiters:
            cb(None, failure)

    def serve_waiters(self, proto: UpstreamProtocol) -> None:
        """Give waiting requests streams on ``proto``; open another connection for the rest."""
        c = proto.conn
        waiters = self.waiters
        while waiters and c.can_open:
            waiters.popleft()(c, None)
        if waiters and self._unsettled() == 0 and self._may_connect():
            self.connecting += 1
            proto.worker.loop.create_task(self._connect(proto.worker))
        proto.worker.outbox.flush()

    def __repr__(self) -> str:
        return f"<Endpoint {self.address} conns={len(self.conns)}>"


class Subset:
    """Endpoints selected by labels, with their balancer."""

    __slots__ = ("cluster", "cluster_name", "endpoints", "lb", "name", "policy")

    def __init__(self, cluster: Cluster, name: str, endpoints: list[Endpoint], policy: int) -> None:
        self.cluster = cluster
        self.cluster_name = cluster.name
        self.name = name
        self.endpoints = endpoints
        self.policy = policy
        n = len(endpoints)
        weights = [e.weight for e in endpoints]
        if n == 0:
            self.lb = None
        elif policy == ROUND_ROBIN:
            self.lb = balancer.RoundRobin(n)
        elif policy == RANDOM:
            self.lb = balancer.Random(n)
        elif policy == LEAST_REQUEST:
            self.lb = balancer.LeastRequest(n)
        elif policy == RING_HASH:
            self.lb = balancer.RingHash(n, weights)
        else:
            self.lb = balancer.PeakEwma(n)
        for j, ep in enumerate(endpoints):
            ep.placements.append((self, j))

    def pick(self, stream: Any, hash_header: bytes | None) -> int:
        """Index of the endpoint for ``stream``, or -1 when none is available; counts it as started."""
        if self.lb is None:
            return -1
        i = self._raw_pick(stream, hash_header)
        if i >= 0 and (self.policy == PEAK_EWMA or self.policy == LEAST_REQUEST):
            self.lb.start(i)
        return i

    def pick_other(self, stream: Any, hash_header: bytes | None, tried: list[Endpoint]) -> int:
        """As ``pick``, preferring an endpoint not in ``tried`` (a retry's next attempt).

        The balancer is asked again a few times (Envoy's previous-hosts
        predicate does the same), then the next available endpoint in index
        order that was not tried is taken; when every available one was
        tried, the balancer's choice stands.
        """
        lb = self.lb
        if lb is None:
            return -1
        endpoints = self.endpoints
        policy = self.policy
        i = -1
        for _ in range(3):
            i = self._raw_pick(stream, hash_header)
            if i < 0 or endpoints[i] not in tried:
                break
        else:
            n = len(endpoints)
            for k in range(1, n):
                j = (i + k) % n
                if lb.is_available(j) and endpoints[j] not in tried:
                    i = j
                    break
        if i >= 0 and (policy == PEAK_EWMA or policy == LEAST_REQUEST):
            lb.start(i)
        return i

    def _raw_pick(self, stream: Any, hash_header: bytes | None) -> int:
        policy = self.policy
        if policy == PEAK_EWMA:
            return self.lb.pick(stream.t_open_ns)
        if policy == RING_HASH:
            key = b""
            if hash_header is not None:
                for name, value in stream.headers:
                    if name == hash_header:
                        key = value
                        break
            return self.lb.pick(key)
        return self.lb.pick()

    def finish(self, i: int, rtt_ns: int, now_ns: int) -> None:
        """The request sent to endpoint ``i`` ended; ``rtt_ns`` is its time to response headers."""
        if self.policy == PEAK_EWMA:
            self.lb.finish(i, rtt_ns, now_ns)
        elif self.policy == LEAST_REQUEST:
            self.lb.finish(i)


S = 1_000_000_000  # a second in ns

# meshproxy.v1.Cluster.LbPolicy values
PEAK_EWMA, ROUND_ROBIN, RANDOM, LEAST_REQUEST, RING_HASH = range(5)
# meshproxy.v1.UpstreamTls.Mode
ISTIO_MUTUAL = 1


class ClusterState:
    """What a cluster keeps across config changes: requests and retries in flight, its counters,
    its retry budget and its outlier detector (each kept while its settings stay the same)."""

    __slots__ = (
        "active_requests",
        "active_retries",
        "budget",
        "budget_args",
        "detector",
        "detector_args",
        "ejections",
        "overflows",
        "retries",
        "retries_denied",
        "retries_overflow",
    )

    def __init__(self) -> None:
        self.active_requests = 0
        self.active_retries = 0
        self.retries = 0  # retries sent (not counting re-sends of requests no upstream saw)
        self.retries_denied = 0  # retries the budget refused
        self.retries_overflow = 0  # retries refused by max_retries
        self.overflows = 0  # requests answered OVERFLOW (max_requests, max_pending_requests, max_connections)
        self.ejections = 0
        self.budget: Any = None
        self.budget_args: tuple | None = None
        self.detector: Any = None
        self.detector_args: dict | None = None


class Cluster:
    """A named group of endpoints with subsets, built from a ``meshproxy.v1.Cluster``."""

    __slots__ = (
        "allowed_ids",
        "breaker_connections",
        "connect_timeout",
        "endpoints",
        "hash_header",
        "health_check",
        "idle_timeout",
        "max_concurrent_streams",
        "max_connections",
        "max_pending",
        "max_requests",
        "max_retries",
        "name",
        "outlier",
        "state",
        "subsets",
    )

    def __init__(
        self,
        msg: Any,
        reuse: dict[str, Endpoint] | None = None,
        state: ClusterState | None = None,
        now_ns: int = 0,
    ) -> None:
        self.name = msg.name
        self.state = state = state if state is not None else ClusterState()
        self.hash_header = msg.hash_header.lower().encode() if msg.hash_header else None
        self.connect_timeout = connect_timeout_s(msg)
        self.idle_timeout = idle_timeout_s(msg)
        self.max_concurrent_streams = msg.max_concurrent_streams_per_connection or 100
        self.max_connections = msg.max_connections_per_endpoint or 0
        cb = msg.circuit_breakers
        self.breaker_connections = cb.max_connections
        self.max_pending = cb.max_pending_requests
        self.max_requests = cb.max_requests
        self.max_retries = cb.max_retries
        self.endpoints: list[Endpoint] = []
        reuse = reuse or {}
        old_index = {address: ep.index for address, ep in reuse.items()}
        for e in msg.endpoints:
            old = reuse.get(e.address)
            if old is not None:
                # Keep the live connections of an endpoint that is still there.
                old.cluster = self
                old.weight = e.weight or 1
                old.labels = dict(e.labels)
                old.placements = []
                self.endpoints.append(old)
            else:
                self.endpoints.append(Endpoint(self, e.address, e.weight, dict(e.labels)))
        for i, ep in enumerate(self.endpoints):
            ep.index = i
        # Upstream mTLS (meshproxy.tls): the endpoints it applies to, and the SPIFFE ids servers may have.
        tls = msg.tls
        mtls = msg.HasField("tls") and tls.mode == ISTIO_MUTUAL
        plaintext = frozenset(tls.plaintext_endpoints)
        self.allowed_ids = frozenset(tls.allowed_spiffe_ids) or None
        for ep in self.endpoints:
            ep.mtls = mtls and ep.address not in plaintext
        for ep in reuse.values():
            if ep.cluster is not self:
                ep.index = -1  # gone from the cluster: its results no longer count
        policy = int(msg.lb_policy)
        self.subsets: dict[str, Subset] = {"": Subset(self, "", self.endpoints, policy)}
        for sub in msg.subsets:
            want = dict(sub.labels)
            members = [ep for ep in self.endpoints if all(ep.labels.get(k) == v for k, v in want.items())]
            self.subsets[sub.name] = Subset(self, sub.name, members, policy)
        # The cluster's retry budget (routes may have their own): kept while its settings are.
        args = budget_args(msg.retry_budget) if msg.HasField("retry_budget") else DEFAULT_BUDGET
        if state.budget is None or state.budget_args != args:
            state.budget = new_budget(args, now_ns)
            state.budget_args = args
        self.health_check = msg.health_check if msg.HasField("health_check") else None
        self.outlier = None
        if msg.HasField("outlier_detection"):
            self._outlier(msg.outlier_detection, old_index)
        else:
            state.detector = state.detector_args = None
        for ep in self.endpoints:
            if ep.unhealthy:
                self.refresh(ep)

    def _outlier(self, od: Any, old_index: dict[str, int]) -> None:
        base = field_ns(od, "base_ejection_time", 30 * S)
        args = {
            "consecutive_5xx": od.consecutive_5xx if od.HasField("consecutive_5xx") else 5,
            "consecutive_gateway_errors": od.consecutive_gateway_errors,
            "consecutive_local_origin_failures": (
                od.consecutive_local_origin_failures if od.HasField("consecutive_local_origin_failures") else 5
            ),
            "split_external_local_origin_errors": od.split_external_local_origin_errors,
            "interval_ns": field_ns(od, "interval", 10 * S),
            "base_ejection_time_ns": base,
            # Unset: 300s or the base time, whichever is larger (Envoy's).
            "max_ejection_time_ns": field_ns(od, "max_ejection_time", max(300 * S, base)),
            "max_ejection_percent": od.max_ejection_percent if od.HasField("max_ejection_percent") else 10,
        }
        state = self.state
        n = len(self.endpoints)
        det = state.detector
        if det is not None and state.detector_args == args:
            # Same settings: the verdicts on endpoints still here carry over.
            det.resize([old_index.get(ep.address, -1) for ep in self.endpoints])
        else:
            det = outlier.OutlierDetector(n, **args)
            state.detector = det
            state.detector_args = args
        self.outlier = det
        for ep in self.endpoints:
            if det.is_ejected(ep.index):
                self.refresh(ep)

    def record(self, ep: Endpoint, result: int, now_ns: int) -> None:
        """An attempt on ``ep`` ended with ``result`` (an ``outlier`` outcome): eject it if that is the last straw."""
        det = self.outlier
        if det is None or ep.cluster is not self or ep.index < 0:
            return
        ep.failing = result != outlier.SUCCESS
        if det.record(ep.index, result, now_ns):
            self.state.ejections += 1
            self.refresh(ep)
            log.info("ejected %s from %s (%d times)", ep.address, self.name, det.times_ejected(ep.index))

    def sweep(self, now_ns: int) -> None:
        """Return the endpoints whose ejection time is up."""
        det = self.outlier
        if det is None or not det.ejected():
            return
        for i in det.sweep(now_ns):
            ep = self.endpoints[i]
            self.refresh(ep)
            log.info("%s back in %s", ep.address, self.name)

    def refresh(self, ep: Endpoint) -> None:
        """Make ``ep`` available to every subset's balancer unless it is ejected or unhealthy."""
        det = self.outlier
        available = not ep.unhealthy and not (det is not None and ep.index >= 0 and det.is_ejected(ep.index))
        for subset, j in ep.placements:
            subset.lb.set_available(j, available)

    def pending(self) -> int:
        """Requests waiting for a connection."""
        return sum(len(ep.waiters) for ep in self.endpoints)

    def connections(self) -> int:
        """Connections open or being made."""
        return sum(len(ep.conns) + ep.connecting for ep in self.endpoints)

    def __repr__(self) -> str:
        return f"<Cluster {self.name} endpoints={len(self.endpoints)} subsets={sorted(self.subsets)}>"


class UpstreamProtocol(H2Protocol):
    """One HTTP/2 client connection to an endpoint: h2c, or h2 over mTLS (``tls``): then the server's
    identity is checked first (``peer``), and ``refused`` says why it was not accepted."""

    __slots__ = ("endpoint", "idle_since", "peer", "refused", "tls")

    def __init__(self, worker: Worker, endpoint: Endpoint, tls: bool = False) -> None:
        super().__init__(worker, h2.H2Connection(True, worker.outbox, worker.upstream_settings, hold=True))
        self.conn.stream_limit = endpoint.cluster.max_concurrent_streams
        self.endpoint = endpoint
        self.idle_since = 0.0
        self.tls = tls
        self.peer: Any = None
        self.refused = ""

    def connection_made(self, transport: Any) -> None:
        if self.tls:
            try:
                self.peer = upstream_peer(self.worker, self.endpoint, transport.get_extra_info("peercert"))
            except PeerRefused as e:
                self.refused = str(e)
                transport.abort()
                return
        super().connection_made(transport)
        self.endpoint.conns.append(self)
        self.worker.upstreams.add(self)

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive(data)
        if events is not None:
            self._events(events)
        if self.endpoint.waiters:  # the peer's SETTINGS, or a stream ending, may let them in
            self.endpoint.serve_waiters(self)
        self.worker.outbox.flush()

    def _events(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == EV_IDLE or kind == EV_TERMINATED:
                self.worker.loop.call_soon(self._close)
            elif kind == EV_GOAWAY:
                log.debug("GOAWAY from %s: last stream %d, code %d", self.endpoint.address, ev[1], ev[2])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return  # never used: Endpoint._connect reports it
        settled = self.conn.settled
        super().connection_lost(exc)
        ep = self.endpoint
        try:
            ep.conns.remove(self)
        except ValueError:
            pass
        self.worker.upstreams.discard(self)
        failure = CONNECT_FAILURE
        if self.tls and not settled:
            # TLS 1.3: the server checks our certificate after our side of the handshake is done,
            # so its refusal (an alert) ends the connection here, before its SETTINGS: a failed
            # connect all the same (uvloop does not pass the alert on).
            reason = describe(exc) if exc is not None else "the server closed the connection after the handshake"
            failure = connect_failure(f"TLS error: {reason} (did it refuse our certificate?)")
            log.info("mTLS to %s (%s) failed: %s", ep.address, ep.cluster.name, reason)
            ep.cluster.record(ep, outlier.LOCAL_ORIGIN_FAILURE, h2.monotonic_ns())
        if ep.waiters and not ep.conns and not ep.connecting:
            # It went away before it could take them: those requests never reached an upstream.
            ep.fail_waiters(failure)
        self.worker.outbox.flush()

    def check_idle(self, now: float) -> None:
        """Shut the connection down gracefully once idle past the cluster's idle timeout."""
        c = self.conn
        if c.active_streams:
            self.idle_since = 0.0
        elif not self.idle_since:
            self.idle_since = now
        elif now - self.idle_since >= self.endpoint.cluster.idle_timeout:
            c.shutdown()
            self.worker.loop.call_soon(self._close)
