"""Downstream: the listener side. Accepts HTTP/2 (h2c) connections, routes each
new request once, and hands it to an upstream stream; from then on the
compiled core forwards both ways.

Python runs here once per request (route, split, pick, open the upstream
stream) and once when it ends (balancer feedback, deadline bookkeeping, the
completion hooks for metrics and logs). Errors the proxy makes itself reach
gRPC clients as trailers-only responses with the right grpc-status and a
grpc-message naming the cause, and plain HTTP clients as 404/503/504 with an
Envoy-style ``x-meshproxy-response-flags`` header.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
from typing import TYPE_CHECKING, Any

from meshproxy.authz import DENIED
from meshproxy.conn import h2conn as h2
from meshproxy.resilience import outlier
from meshproxy.resilience.policy import MAX_REDISPATCH, FaultPolicy, grpc_for_http, http_for_grpc
from meshproxy.transport import H2Protocol
from meshproxy.upstream import OVERFLOW

if TYPE_CHECKING:
    from meshproxy.upstream import Endpoint, Subset
    from meshproxy.worker import Worker

__all__ = ["Deadlines", "DownstreamProtocol", "Request", "TryTimeouts"]

log = logging.getLogger("meshproxy.downstream")

EV_REQUEST = h2.EV_REQUEST
EV_CLOSED = h2.EV_CLOSED
EV_IDLE = h2.EV_IDLE
EV_TERMINATED = h2.EV_TERMINATED
EV_RETRY = h2.EV_RETRY
now_ns = h2.monotonic_ns

# (response flag, grpc status, http status, message) for the errors the proxy answers itself.
NO_ROUTE = ("NR", 12, 404, "no route matched the request")
NO_CLUSTER = ("NC", 14, 503, "the route's cluster is not configured")
NO_HEALTHY = ("UH", 14, 503, "no healthy upstream")
TIMEOUT = ("UT", 4, 504, "upstream request timeout")
STREAM_IDLE = ("SI", 4, 408, "stream idle timeout")
DRAINING = ("DC", 14, 503, "the proxy is draining")


class Request:
    """What the proxy remembers about one request: the completion record.

    Kept on the downstream stream's ``user`` slot; completion hooks receive
    it when the downstream stream closes.
    """

    __slots__ = (
        "active_at",
        "activity",
        "authz",
        "backoff",
        "deadline_ns",
        "done",
        "down",
        "endpoint",
        "flags",
        "hash_header",
        "index",
        "listener",
        "peer",
        "redispatched",
        "retries",
        "retrying",
        "route",
        "start_ns",
        "subset",
        "tried",
        "up",
    )

    def __init__(self, down: h2.Stream, route: Any, start_ns: int, listener: str, peer: Any = None) -> None:
        self.down = down
        self.route = route
        self.listener = listener  # the name of the listener it came in on
        # The downstream's verified identity (meshproxy.tls.Peer) when it came over mTLS, else None.
        self.peer = peer
        # meshproxy.authz.Decision, when the inbound listener's policies were checked (else None).
        self.authz: Any = None
        self.start_ns = start_ns
        self.up: h2.Stream | None = None
        self.endpoint: Endpoint | None = None
        self.subset: Subset | None = None
        self.index = -1
        self.flags = ""
        self.deadline_ns = 0
        self.done = False
        self.hash_header: bytes | None = None
        self.retries = 0  # retries the policy allowed (budget withdrawn)
        self.redispatched = 0  # re-sends after a connect failure (never seen upstream)
        self.retrying = False  # counted in the cluster's active retries
        self.backoff = False  # the next re-send waits out the backoff
        self.tried: list[Endpoint] | None = None  # endpoints of earlier attempts
        # For the stream idle timeout: what the stream had done at the last sweep, and since when.
        self.activity: tuple | None = None
        self.active_at = start_ns

    @property
    def response_flags(self) -> str:
        return self.flags or self.down.response_flags or ""

    @property
    def source_principal(self) -> str:
        """The downstream's principal ("cluster.local/ns/x/sa/y") when it came over mTLS, else ""."""
        peer = self.peer
        return peer.principal if peer is not None else ""

    @property
    def connection_security_policy(self) -> str:
        """Istio's label: "mutual_tls" when the downstream came over mTLS, else "none"."""
        return "mutual_tls" if self.peer is not None else "none"

    @property
    def authz_policy(self) -> str:
        """The authorization policy that decided (allowed or denied) this request, "" when none did."""
        d = self.authz
        return d.policy if d is not None else ""


class TryTimeouts:
    """Per-try timeouts of one worker: the core's ``h2.TryTimeouts`` and one loop timer.

    The core arms every attempt of a route with a per-try timeout in
    ``wheel`` as it opens the attempt's upstream stream, and disarms it as
    that stream closes, so no Python runs per attempt. Here only the
    earliest attempt armed has a timer, and when it fires, each attempt
    that ran out without response headers goes to its downstream
    connection's ``per_try_expired``. Timeouts due within ``SLOT_NS`` of
    each other share a wake-up, and fire up to ``SLOT_NS`` late.
    """

    SLOT_NS = 5_000_000

    __slots__ = ("_timer", "wheel", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.wheel = h2.TryTimeouts(self._arm, self.SLOT_NS)
        self._timer: asyncio.TimerHandle | None = None

    def _arm(self, at_ns: int) -> None:
        # The earliest attempt armed is due by at_ns (its due time rounded up to a slot).
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.worker.loop.call_later(max(0.0, (at_ns - now_ns()) / 1e9), self._fire)

    def _fire(self) -> None:
        self._timer = None
        for up in self.wheel.expire(now_ns()):
            req = up.peer.user
            if req is not None and req.up is up:
                # The downstream connection's protocol (its event handler's owner) runs the retry.
                req.down.conn.handler.__self__.per_try_expired(req)
        self.worker.outbox.flush()


class Deadlines:
    """Request deadlines of one worker: a heap and one timer for the earliest.

    Only requests with a deadline (grpc-timeout or a route timeout) are here;
    an entry whose request already ended is dropped when it surfaces, and the
    heap is compacted when such entries outnumber the live ones (long
    deadlines on short requests would otherwise keep them for the deadline).
    """

    __slots__ = ("_heap", "_live", "_seq", "_timer", "_timer_at", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._heap: list[tuple[int, int, Request]] = []
        self._live = 0
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0

    def add(self, deadline_ns: int, req: Request) -> None:
        self._seq += 1
        self._live += 1
        heapq.heappush(self._heap, (deadline_ns, self._seq, req))
        if self._timer is None or deadline_ns < self._timer_at:
            self._arm(deadline_ns)

    def done(self, req: Request) -> None:
        """``req`` (which had a deadline) ended before it."""
        self._live -= 1
        heap = self._heap
        if len(heap) > 1024 and len(heap) > 4 * self._live:
            self._heap = [e for e in heap if not e[2].done]
            heapq.heapify(self._heap)

    def _arm(self, at_ns: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self.worker.loop
        self._timer_at = at_ns
        self._timer = loop.call_later(max(0.0, (at_ns - now_ns()) / 1e9), self._fire)

    def _fire(self) -> None:
        self._timer = None
        t = now_ns()
        # self._heap, not a local: expiring a request completes it, which may compact the heap.
        while self._heap and self._heap[0][0] <= t:
            _, _, req = heapq.heappop(self._heap)
            if not req.done:
                expire(req)
        if self._heap:
            self._arm(self._heap[0][0])
        self.worker.outbox.flush()


def expire(req: Request) -> None:
    """A request ran past its deadline: answer it (or end it) as a timeout."""
    down = req.down
    req.flags = "UT"
    conn = down.conn
    if not down.sent_headers:
        respond_error(down, TIMEOUT)
    else:
        # The response has begun: all that is left is to end it (the client's
        # own deadline, if it is gRPC, reports DEADLINE_EXCEEDED).
        _deliver(conn, conn.reset_stream(down, 0x8))


def idle_expire(req: Request) -> None:
    """A request saw no frame either way for the listener's stream idle timeout: end it."""
    down = req.down
    if not down.sent_headers:
        respond_error(down, STREAM_IDLE)
    else:
        req.flags = "SI"
        conn = down.conn
        _deliver(conn, conn.reset_stream(down, 0x8))


def _deliver(conn: h2.H2Connection, events: list | None) -> None:
    # Events raised by our own calls (the EV_CLOSED of a stream we answered) go to the same handler.
    if events is not None and conn.handler is not None:
        conn.handler(events)


def _chance(percent: float) -> bool:
    return percent >= 100.0 or random.random() * 100.0 < percent


def _abort(stream: h2.Stream, fault: FaultPolicy) -> None:
    """Answer with the route's injected fault (flag FI): a gRPC request trailers-only with its
    grpc-status, a plain one with the HTTP status (each mapped from the other when not given)."""
    req = stream.user
    req.flags = "FI"
    headers = [(b"x-meshproxy-response-flags", b"FI")]
    conn = stream.conn
    if stream.is_grpc:
        g = fault.abort_grpc if fault.abort_grpc is not None else grpc_for_http(fault.abort_http)
        events = conn.respond(stream, 200, headers, b"", g, "fault filter abort")
    else:
        status = fault.abort_http if fault.abort_http is not None else http_for_grpc(fault.abort_grpc)
        events = conn.respond(stream, status, [(b"content-type", b"text/plain"), *headers], b"fault filter abort")
    _deliver(conn, events)


def respond_error(stream: h2.Stream, err: tuple[str, int, int, str], detail: str = "") -> None:
    flag, grpc_status, http_status, message = err
    if detail:
        message = f"{message}: {detail}"
    req = stream.user
    if req is not None:
        req.flags = flag
    headers = [(b"x-meshproxy-response-flags", flag.encode())]
    conn = stream.conn
    if stream.is_grpc:
        events = conn.respond(stream, 200, headers, b"", grpc_status, message)
    else:
        events = conn.respond(stream, http_status, [(b"content-type", b"text/plain"), *headers], message.encode())
    _deliver(conn, events)


class DownstreamProtocol(H2Protocol):
    """One accepted HTTP/2 connection on a listener.

    Inbound (the workload's own listener) with mTLS configured, it also knows ``peer``, the
    verified identity of the other end (None: plaintext), ``port``, the workload port the
    connection was for, and ``security``, the worker's ``meshproxy.tls.Security``, whose
    authorization policies each request is checked against. Elsewhere those are None and 0.
    """

    __slots__ = ("idle_since", "listener", "peer", "port", "security")

    def __init__(self, worker: Worker, listener: str, peer: Any = None, port: int = 0, security: Any = None) -> None:
        conn = h2.H2Connection(
            False, worker.outbox, worker.downstream_settings(listener), hold=True, generate_request_id=True
        )
        super().__init__(worker, conn)
        self.listener = listener
        self.idle_since = 0.0
        self.peer = peer
        self.port = port
        self.security = security
        if worker.trace_mode:
            # meshproxy.telemetry.tracing: the trace headers the core ensures on each forwarded request.
            conn.trace_mode = worker.trace_mode
            conn.trace_sampling = worker.trace_sampling

    def check_idle(self, now: float, idle_timeout: float, now_ns: int, stream_idle_ns: int) -> None:
        """The worker's sweep (each second): GOAWAY once the connection has had no stream for
        ``idle_timeout`` s; end requests with no frame either way for ``stream_idle_ns``."""
        c = self.conn
        if c.active_streams:
            self.idle_since = 0.0
        elif not self.idle_since:
            self.idle_since = now
        elif idle_timeout and now - self.idle_since >= idle_timeout and not c.goaway_sent:
            log.debug("closing a connection idle for %.0fs", now - self.idle_since)
            _deliver(c, c.shutdown())
        if not stream_idle_ns or not c.active_streams:
            return
        for s in c.live_streams():
            req = s.user
            if req is None or req.done:
                continue
            up = req.up
            activity = (
                s.data_recv,
                s.data_sent,
                s.sent_headers,
                s.recv_end,
                up.data_recv if up is not None else -1,
                up.data_sent if up is not None else -1,
            )
            if activity != req.activity:
                req.activity = activity
                req.active_at = now_ns
            elif now_ns - req.active_at >= stream_idle_ns:
                idle_expire(req)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.worker.downstreams.add(self)
        if self.worker.draining:
            self.conn.shutdown()
        self.worker.outbox.flush()

    def _events(self, events: list) -> None:
        worker = self.worker
        for ev in events:
            kind = ev[0]
            if kind == EV_REQUEST:
                self._request(ev[1])
            elif kind == EV_CLOSED:
                req = ev[1].user
                if req is not None:
                    ev[1].user = None
                    worker.complete(req)
            elif kind == EV_RETRY:
                self._redispatch(ev[1])
            elif kind == EV_IDLE or kind == EV_TERMINATED:
                worker.loop.call_soon(self._close)

    def _request(self, s: h2.Stream) -> None:
        # Once per request: route, split, pick, open the upstream stream.
        worker = self.worker
        runtime = worker.runtime
        s.notify_close = True
        table = runtime.tables.get(self.listener)
        route = table.match(s.authority or b"", s.path or b"", s.method, s.headers) if table is not None else None
        req = Request(s, route, s.t_open_ns, self.listener, self.peer)
        s.user = req
        sec = self.security
        if sec is not None and sec.authz is not None:
            decision = sec.authz.check(self.peer, self.port, s)
            req.authz = decision
            if not decision.allowed:
                respond_error(s, DENIED)
                return
        if route is None:
            respond_error(s, NO_ROUTE)
            return
        direct = route.direct_response
        if direct is not None:
            req.flags = "DR"
            conn = s.conn
            if s.is_grpc and direct.grpc_status is not None:
                events = conn.respond(s, 200, (), b"", direct.grpc_status, direct.grpc_message)
            else:
                events = conn.respond(s, direct.status, (), direct.body)
            _deliver(conn, events)
            return
        # The deadline: the smaller of grpc-timeout and the route timeout, over every attempt.
        timeout_ns = s.grpc_timeout_ns
        route_timeout = route.timeout_s
        if route_timeout is not None:
            rt = int(route_timeout * 1e9)
            if timeout_ns < 0 or rt < timeout_ns:
                timeout_ns = rt
        if timeout_ns >= 0:
            req.deadline_ns = req.start_ns + timeout_ns
            worker.deadlines.add(req.deadline_ns, req)
        fault = route.fault
        if fault is not None and fault.delay_ns and _chance(fault.delay_pct):
            req.flags = "DI"
            worker.loop.call_later(fault.delay_ns / 1e9, self._delayed, req)
            return
        self._route(req, runtime)

    def _delayed(self, req: Request) -> None:
        if not req.done:
            self._route(req, self.worker.runtime)
            self.worker.outbox.flush()

    def _route(self, req: Request, runtime: Any) -> None:
        """After routing (and any injected delay): abort, or pick the cluster and send the request."""
        s = req.down
        route = req.route
        fault = route.fault
        if fault is not None and fault.abort_pct and _chance(fault.abort_pct):
            _abort(s, fault)
            return
        cluster_name, subset_name = route.pick()
        cluster = runtime.clusters.get(cluster_name)
        subset = cluster.subsets.get(subset_name) if cluster is not None else None
        if subset is None:
            respond_error(s, NO_CLUSTER, f"{cluster_name}/{subset_name}" if subset_name else cluster_name)
            return
        state = cluster.state
        if cluster.max_requests and state.active_requests >= cluster.max_requests:
            state.overflows += 1
            respond_error(s, OVERFLOW, f"{cluster_name} has {state.active_requests} requests in flight")
            return
        # From here the request counts as in flight to the cluster (until worker.complete).
        state.active_requests += 1
        req.subset = subset
        req.hash_header = route.hash_header or cluster.hash_header
        policy = route.retry
        if policy is not None:
            s.retry = policy.retry_on
            (policy.budget or state.budget).deposit(req.start_ns)
        self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        """Pick an endpoint of the request's subset (another one than tried, if any) and send the
        request there."""
        s = req.down
        subset = req.subset
        tried = req.tried
        i = subset.pick(s, req.hash_header) if tried is None else subset.pick_other(s, req.hash_header, tried)
        if i < 0:
            respond_error(s, NO_HEALTHY, subset.cluster_name)
            return
        ep = subset.endpoints[i]
        req.index = i
        req.endpoint = ep
        c = ep.ready()
        if c is None:
            ep.wait(self.worker, lambda conn, failure: self._connected(req, conn, failure))
        else:
            self._forward(req, c)

    def _end_attempt(self, req: Request) -> None:
        # The attempt on req.endpoint is over and the request will go out again.
        t = now_ns()
        if req.index >= 0:
            req.subset.finish(req.index, t - req.start_ns, t)
        if req.tried is None:
            req.tried = []
        req.tried.append(req.endpoint)
        req.index = -1
        req.up = None

    def _redispatch(self, s: h2.Stream) -> None:
        # The core took the request back (EV_RETRY): the upstream never processed
        # it (REFUSED_STREAM, above its GOAWAY's last stream id), or the worker's
        # retry hook allowed another attempt. It kept the body; send it again.
        req = s.user
        if req is None or req.done:
            return
        self._end_attempt(req)
        if req.backoff:
            req.backoff = False
            self._retry_later(req)
        else:
            self._dispatch(req)

    def _retry_later(self, req: Request) -> None:
        """Send the request again after the route's backoff (full jitter)."""
        delay = req.route.retry.backoff_ns(req.retries, random.random())
        self.worker.loop.call_later(delay / 1e9, self._retry_now, req)

    def _retry_now(self, req: Request) -> None:
        if not req.done:
            self._dispatch(req)
            self.worker.outbox.flush()

    def _connected(self, req: Request, c: h2.H2Connection | None, failure: tuple | None) -> None:
        s = req.down
        if s.state == "closed":
            return
        if c is None:
            if failure[0] == "UF" and req.redispatched < MAX_REDISPATCH:
                # No upstream saw it: always safe to send elsewhere.
                req.redispatched += 1
                self._end_attempt(req)
                self._dispatch(req)
                return
            respond_error(s, failure, req.endpoint.address)
            return
        self._forward(req, c)

    def _forward(self, req: Request, c: h2.H2Connection) -> None:
        s = req.down
        route = req.route
        timeout_ns = -1
        if req.deadline_ns:
            timeout_ns = req.deadline_ns - now_ns()
            if timeout_ns <= 0:
                expire(req)
                return
        # With a per-try timeout, the core arms the attempt in the worker's TryTimeouts. The timeout
        # is ours alone (the upstream's grpc-timeout is the time left, as Envoy sends it).
        req.up = c.open_forward(s, route.authority_rewrite, route.rewrite_path(s.path), timeout_ns)

    def per_try_expired(self, req: Request) -> None:
        """The per-try timeout of ``req``'s attempt in flight: it covers the wait for response
        headers; after them the deadline governs."""
        up = req.up
        if req.done or up is None or up.recv_headers:
            return
        worker = self.worker
        ep = req.endpoint
        if h2.abandon(req.down):
            ep.cluster.record(ep, outlier.LOCAL_ORIGIN_FAILURE, now_ns())
            if worker.may_retry(req):
                self._end_attempt(req)
                self._retry_later(req)
            else:
                expire(req)
        else:
            expire(req)
        worker.outbox.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.worker.downstreams.discard(self)
        self.worker.outbox.flush()
