"""Upstream: clusters, their subsets and endpoints, and each endpoint's pool of
multiplexed HTTP/2 connections.

A cluster is built from a ``meshproxy.v1.Cluster`` message once per config
change. Each subset (the whole cluster is the subset "") owns a compiled
balancer over its endpoints. An endpoint owns its connections: a request
takes the first that can open a stream; another is opened when all are at
the peer's MAX_CONCURRENT_STREAMS or near the end of the stream-id space (up
to ``max_connections_per_endpoint``); requests that arrive while the first
connection is being made wait for it in the endpoint, and all get an answer
if the connect fails. A connection that received GOAWAY takes no new streams
and closes when its last stream ends; one idle past ``idle_timeout`` is shut
down gracefully.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshproxy.config import parse_address
from meshproxy.conn import h2conn as h2
from meshproxy.lb import balancer
from meshproxy.transport import H2Protocol

if TYPE_CHECKING:
    from meshproxy.worker import Worker

__all__ = ["Cluster", "Endpoint", "Subset", "UpstreamProtocol"]

log = logging.getLogger("meshproxy.upstream")

EV_GOAWAY = h2.EV_GOAWAY
EV_IDLE = h2.EV_IDLE
EV_TERMINATED = h2.EV_TERMINATED

# Connection failures, as the downstream sees them: (response flag, grpc status, http status, message).
CONNECT_FAILURE = ("UF", 14, 503, "upstream connect error")
OVERFLOW = ("UO", 14, 503, "upstream connection pool overflow")


class Endpoint:
    """One upstream address and its connections."""

    __slots__ = (
        "address",
        "cluster",
        "connecting",
        "conns",
        "host",
        "labels",
        "port",
        "waiters",
        "weight",
    )

    def __init__(self, cluster: Cluster, address: str, weight: int, labels: dict[str, str]) -> None:
        self.cluster = cluster
        self.address = address
        self.host, self.port = parse_address(address)
        self.weight = weight or 1
        self.labels = labels
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
        if self._unsettled() == 0:
            limit = self.cluster.max_connections
            if limit and len(self.conns) >= limit:
                if not self.conns:
                    callback(None, OVERFLOW)
                    return
                # At the connection limit: wait for a stream to end on one of them.
            else:
                self.connecting += 1
                worker.loop.create_task(self._connect(worker))
        self.waiters.append(callback)

    async def _connect(self, worker: Worker) -> None:
        loop = worker.loop
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamProtocol(worker, self), self.host, self.port),
                self.cluster.connect_timeout,
            )
        except (TimeoutError, OSError) as e:
            self.connecting -= 1
            log.debug("connect to %s failed: %s", self.address, e)
            if self.connecting == 0 and not self.conns:
                self.fail_waiters(CONNECT_FAILURE)
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
        if waiters and self._unsettled() == 0:
            limit = self.cluster.max_connections
            if not limit or len(self.conns) < limit:
                self.connecting += 1
                proto.worker.loop.create_task(self._connect(proto.worker))
        proto.worker.outbox.flush()

    def __repr__(self) -> str:
        return f"<Endpoint {self.address} conns={len(self.conns)}>"


class Subset:
    """Endpoints selected by labels, with their balancer."""

    __slots__ = ("cluster_name", "endpoints", "lb", "name", "policy")

    def __init__(
        self, cluster_name: str, name: str, endpoints: list[Endpoint], policy: int, hash_header: bytes | None
    ) -> None:
        self.cluster_name = cluster_name
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

    def pick(self, stream: Any, hash_header: bytes | None) -> int:
        """Index of the endpoint for ``stream``, or -1 when none is available; counts it as started."""
        lb = self.lb
        if lb is None:
            return -1
        policy = self.policy
        if policy == PEAK_EWMA:
            i = lb.pick(stream.t_open_ns)
            if i >= 0:
                lb.start(i)
            return i
        if policy == RING_HASH:
            key = b""
            if hash_header is not None:
                for name, value in stream.headers:
                    if name == hash_header:
                        key = value
                        break
            return lb.pick(key)
        i = lb.pick()
        if i >= 0 and policy == LEAST_REQUEST:
            lb.start(i)
        return i

    def finish(self, i: int, rtt_ns: int, now_ns: int) -> None:
        """The request sent to endpoint ``i`` ended; ``rtt_ns`` is its time to response headers."""
        if self.policy == PEAK_EWMA:
            self.lb.finish(i, rtt_ns, now_ns)
        elif self.policy == LEAST_REQUEST:
            self.lb.finish(i)


# meshproxy.v1.Cluster.LbPolicy values
PEAK_EWMA, ROUND_ROBIN, RANDOM, LEAST_REQUEST, RING_HASH = range(5)


class Cluster:
    """A named group of endpoints with subsets, built from a ``meshproxy.v1.Cluster``."""

    __slots__ = (
        "connect_timeout",
        "endpoints",
        "hash_header",
        "idle_timeout",
        "max_concurrent_streams",
        "max_connections",
        "name",
        "subsets",
    )

    def __init__(self, msg: Any, reuse: dict[str, Endpoint] | None = None) -> None:
        self.name = msg.name
        self.hash_header = msg.hash_header.lower().encode() if msg.hash_header else None
        self.connect_timeout = _seconds(msg, "connect_timeout", 1.0)
        self.idle_timeout = _seconds(msg, "idle_timeout", 300.0)
        self.max_concurrent_streams = msg.max_concurrent_streams_per_connection or 100
        self.max_connections = msg.max_connections_per_endpoint or 0
        self.endpoints: list[Endpoint] = []
        for e in msg.endpoints:
            old = reuse.get(e.address) if reuse else None
            if old is not None:
                # Keep the live connections of an endpoint that is still there.
                old.cluster = self
                old.weight = e.weight or 1
                old.labels = dict(e.labels)
                self.endpoints.append(old)
            else:
                self.endpoints.append(Endpoint(self, e.address, e.weight, dict(e.labels)))
        policy = int(msg.lb_policy)
        self.subsets: dict[str, Subset] = {"": Subset(self.name, "", self.endpoints, policy, self.hash_header)}
        for sub in msg.subsets:
            want = dict(sub.labels)
            members = [ep for ep in self.endpoints if all(ep.labels.get(k) == v for k, v in want.items())]
            self.subsets[sub.name] = Subset(self.name, sub.name, members, policy, self.hash_header)

    def __repr__(self) -> str:
        return f"<Cluster {self.name} endpoints={len(self.endpoints)} subsets={sorted(self.subsets)}>"


def _seconds(msg: Any, field: str, default: float) -> float:
    if not msg.HasField(field):
        return default
    d = getattr(msg, field)
    return d.seconds + d.nanos / 1e9


class UpstreamProtocol(H2Protocol):
    """One HTTP/2 client connection to an endpoint (h2c)."""

    __slots__ = ("endpoint", "idle_since")

    def __init__(self, worker: Worker, endpoint: Endpoint) -> None:
        super().__init__(worker, h2.H2Connection(True, worker.outbox, worker.upstream_settings, hold=True))
        self.conn.stream_limit = endpoint.cluster.max_concurrent_streams
        self.endpoint = endpoint
        self.idle_since = 0.0

    def connection_made(self, transport: Any) -> None:
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
        super().connection_lost(exc)
        ep = self.endpoint
        try:
            ep.conns.remove(self)
        except ValueError:
            pass
        self.worker.upstreams.discard(self)
        if ep.waiters and not ep.conns and not ep.connecting:
            # It went away before it could take them: those requests never reached an upstream.
            ep.fail_waiters(CONNECT_FAILURE)
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
