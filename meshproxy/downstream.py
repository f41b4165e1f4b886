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
from typing import TYPE_CHECKING, Any

from meshproxy.conn import h2conn as h2
from meshproxy.transport import H2Protocol

if TYPE_CHECKING:
    from meshproxy.upstream import Endpoint, Subset
    from meshproxy.worker import Worker

__all__ = ["Deadlines", "DownstreamProtocol", "Request"]

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
DRAINING = ("DC", 14, 503, "the proxy is draining")


class Request:
    """What the proxy remembers about one request: the completion record.

    Kept on the downstream stream's ``user`` slot; completion hooks receive
    it when the downstream stream closes.
    """

    __slots__ = (
        "deadline_ns",
        "done",
        "down",
        "endpoint",
        "flags",
        "hash_header",
        "index",
        "route",
        "start_ns",
        "subset",
        "up",
    )

    def __init__(self, down: h2.Stream, route: Any, start_ns: int) -> None:
        self.down = down
        self.route = route
        self.start_ns = start_ns
        self.up: h2.Stream | None = None
        self.endpoint: Endpoint | None = None
        self.subset: Subset | None = None
        self.index = -1
        self.flags = ""
        self.deadline_ns = 0
        self.done = False
        self.hash_header: bytes | None = None

    @property
    def response_flags(self) -> str:
        return self.flags or self.down.response_flags or ""


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


def _deliver(conn: h2.H2Connection, events: list | None) -> None:
    # Events raised by our own calls (the EV_CLOSED of a stream we answered) go to the same handler.
    if events is not None and conn.handler is not None:
        conn.handler(events)


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
    """One accepted HTTP/2 connection on a listener."""

    __slots__ = ("listener",)

    def __init__(self, worker: Worker, listener: str) -> None:
        conn = h2.H2Connection(
            False, worker.outbox, worker.downstream_settings(listener), hold=True, generate_request_id=True
        )
        super().__init__(worker, conn)
        self.listener = listener

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
        req = Request(s, route, s.t_open_ns)
        s.user = req
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
        cluster_name, subset_name = route.pick()
        cluster = runtime.clusters.get(cluster_name)
        subset = cluster.subsets.get(subset_name) if cluster is not None else None
        if subset is None:
            respond_error(s, NO_CLUSTER, f"{cluster_name}/{subset_name}" if subset_name else cluster_name)
            return
        req.subset = subset
        req.hash_header = route.hash_header or cluster.hash_header
        # The deadline: the smaller of grpc-timeout and the route timeout.
        timeout_ns = s.grpc_timeout_ns
        route_timeout = route.timeout_s
        if route_timeout is not None:
            rt = int(route_timeout * 1e9)
            if timeout_ns < 0 or rt < timeout_ns:
                timeout_ns = rt
        if timeout_ns >= 0:
            req.deadline_ns = req.start_ns + timeout_ns
            worker.deadlines.add(req.deadline_ns, req)
        self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        """Pick an endpoint of the request's subset and send the request there."""
        s = req.down
        subset = req.subset
        i = subset.pick(s, req.hash_header)
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

    def _redispatch(self, s: h2.Stream) -> None:
        # The upstream never processed the request (REFUSED_STREAM, or above its
        # GOAWAY's last stream id): the core kept its body; send it again.
        req = s.user
        if req is None or req.done:
            return
        t = now_ns()
        req.subset.finish(req.index, t - req.start_ns, t)
        req.index = -1
        req.up = None
        self._dispatch(req)

    def _connected(self, req: Request, c: h2.H2Connection | None, failure: tuple | None) -> None:
        s = req.down
        if s.state == "closed":
            return
        if c is None:
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
        req.up = c.open_forward(s, route.authority_rewrite, route.rewrite_path(s.path), timeout_ns)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.worker.downstreams.discard(self)
        self.worker.outbox.flush()
