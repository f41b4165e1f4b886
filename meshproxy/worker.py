"""One sidecar worker process: its event loop, listeners, runtime config,
upstream pools, deadlines, and graceful drain.

The config in force is one ``Runtime`` object (route tables compiled per
listener, clusters with their endpoints); ``apply()`` builds a new one from
a ``meshproxy.v1.SidecarConfig`` and swaps it in with a single assignment,
keeping the live connections of endpoints that are still there. A request
uses the runtime it was routed with until it ends.

``reconfigure()`` does the same and also brings the listeners in line with
the new config (the control plane's snapshots): new addresses are bound
before anything changes, so a port that cannot be bound refuses the whole
config; listeners that went away (or moved) stop accepting and tell their
connections to go away, and the streams in flight on them finish. In
control-plane mode a worker starts with no config at all and binds its
first listeners from the first snapshot.

A transparent listener (``Listener.transparent``) accepts with
``meshproxy.transparent``'s protocol, which hands HTTP/2 connections to the
same downstream protocol (on a route table that also routes the clusters'
service addresses) and passes the rest through as TCP; the runtime keeps
what it needs for that (``transparent``, ``local_ports``), and the drain
gives passthroughs the same deadline as streams. ``ready`` is what the
kubelet's readiness probe is told (``meshproxy.ready``).

With ``--concurrency N`` the supervisor in ``meshproxy.cli`` forks N of
these; each binds the listeners with SO_REUSEPORT so the kernel spreads
connections across them, as Envoy's workers do.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from meshproxy import transparent
from meshproxy.config import ConfigError, field_ns, field_s, parse_address, validate
from meshproxy.conn import h2conn as h2
from meshproxy.downstream import Deadlines, DownstreamProtocol, Request, TryTimeouts
from meshproxy.health import HealthChecker
from meshproxy.resilience import outlier
from meshproxy.resilience.policy import new_budget, outcome
from meshproxy.routing import RouteTable
from meshproxy.transport import listening_socket
from meshproxy.upstream import Cluster, ClusterState, Endpoint, UpstreamProtocol

__all__ = ["Runtime", "Worker"]

log = logging.getLogger("meshproxy.worker")


def _http2_settings(msg: Any) -> dict[str, int]:
    """A listener's ``Http2Settings`` as keyword settings of the compiled connection."""
    out = {}
    for field, key in (
        ("max_concurrent_streams", "max_concurrent_streams"),
        ("initial_stream_window_size", "initial_window_size"),
        ("initial_connection_window_size", "connection_window"),
        ("max_frame_size", "max_frame_size"),
        ("max_header_list_size", "max_header_list_size"),
        ("header_table_size", "header_table_size"),
    ):
        if msg.HasField(field):
            out[key] = getattr(msg, field)
    return out


def _listener_settings(ls: Any) -> dict[str, int]:
    # The buffer limits are the windows we advertise: a sender cannot exceed
    # them, and we reopen them only as bytes leave for the other side.
    out = {}
    if ls.per_stream_buffer_limit_bytes:
        out["initial_window_size"] = max(65535, ls.per_stream_buffer_limit_bytes)
    if ls.per_connection_buffer_limit_bytes:
        out["connection_window"] = max(65535, ls.per_connection_buffer_limit_bytes)
    if ls.HasField("http2"):
        out.update(_http2_settings(ls.http2))
    return out


class Runtime:
    """The config in force: route tables by listener name, clusters by name.

    ``retry_hook`` is the worker's retry decision, given to the compiled
    conditions of every route that retries, and ``try_timeouts`` its
    ``h2.TryTimeouts``, where the core arms the attempts of routes with a
    per-try timeout. Retry budgets and the clusters'
    state (requests in flight, counters, outlier verdicts) carry over from
    ``previous`` while their settings stay the same: a config push must not
    hand out a fresh budget.
    """

    __slots__ = (
        "clusters",
        "config",
        "listener_settings",
        "listener_timeouts",
        "local_ports",
        "route_budgets",
        "sweep_interval",
        "tables",
        "transparent",
        "version",
    )

    def __init__(
        self,
        config: Any,
        previous: Runtime | None = None,
        retry_hook: Callable[[Any, Any, int], bool] | None = None,
        try_timeouts: Any = None,
    ) -> None:
        self.config = config
        self.version = config.version
        now = now_ns()
        reuse: dict[str, dict[str, Endpoint]] = {}
        states: dict[str, ClusterState] = {}
        old_budgets: dict[tuple, Any] = {}
        if previous is not None:
            for name, cl in previous.clusters.items():
                reuse[name] = {ep.address: ep for ep in cl.endpoints}
                states[name] = cl.state
            old_budgets = previous.route_budgets
        # Routes first: they are what can still be refused, and the clusters take over live endpoints.
        # A transparent listener's table also routes its clusters' service addresses (meshproxy.transparent).
        self.tables = {
            ls.name: RouteTable.compile(
                transparent.routable(ls, config.clusters) if ls.transparent else ls, config.clusters
            )
            for ls in config.listeners
        }
        self.route_budgets: dict[tuple, Any] = {}
        for listener, table in self.tables.items():
            for route in table.routes():
                policy = route.retry
                if policy is None:
                    continue
                if retry_hook is not None:
                    policy.bind(retry_hook, try_timeouts)
                if policy.budget_args is not None:
                    key = (listener, route.virtual_host, route.name, policy.budget_args)
                    b = old_budgets.get(key) or self.route_budgets.get(key)
                    policy.budget = b if b is not None else new_budget(policy.budget_args, now)
                    self.route_budgets[key] = policy.budget
        self.clusters = {c.name: Cluster(c, reuse.get(c.name), states.get(c.name), now) for c in config.clusters}
        self.listener_settings = {ls.name: _listener_settings(ls) for ls in config.listeners}
        # Seconds between the worker's sweeps: 1, or a quarter of the shortest outlier-detection
        # interval (at least 0.05). An ejected endpoint comes back at the first sweep after its
        # time, and the time until then counts towards the healthy interval that lowers its
        # ejection multiplier: a sweep as slow as the interval would lower it before the endpoint
        # had served anything, and repeated ejections would never grow.
        self.sweep_interval = min(
            [1.0] + [max(0.05, c.state.detector_args["interval_ns"] / 4e9) for c in self.clusters.values() if c.outlier]
        )
        # (connection idle timeout in s, stream idle timeout in ns); 0: none.
        self.listener_timeouts = {
            ls.name: (field_s(ls, "idle_timeout", 3600.0), field_ns(ls, "stream_idle_timeout", 300 * 1_000_000_000))
            for ls in config.listeners
        }
        # Transparent listeners: how a redirected connection finds its cluster, and the local
        # clusters of the app ports inbound HTTP/2 went to (kept while their listener is).
        self.transparent = transparent.Index(config) if any(ls.transparent for ls in config.listeners) else None
        self.local_ports: set[tuple[str, int]] = set()
        if previous is not None and self.transparent is not None:
            for listener, port in previous.local_ports:
                if listener in self.transparent.modes:
                    transparent.install_local(self, listener, port, reuse, states, now)


class ConfigLog:
    """What became of the configs this worker was given (the admin config dump, the config metrics).

    ``source`` says where they come from ("file:PATH", "control-plane:ADDR", "flags"); times are
    wall-clock seconds (time.time()). ``rejected`` is recorded by whoever refused a config (the
    subscription's NACK, a bad reload): the config in force stays.
    """

    __slots__ = ("accepted_total", "last_rejected", "last_updated", "rejected_total", "source")

    def __init__(self, source: str = "") -> None:
        self.source = source
        self.accepted_total = 0
        self.rejected_total = 0
        self.last_updated = 0.0
        self.last_rejected: tuple[str, str, float] | None = None  # (version, reason, time)

    def accepted(self) -> None:
        self.accepted_total += 1
        self.last_updated = time.time()

    def rejected(self, version: str, reason: str) -> None:
        self.rejected_total += 1
        self.last_rejected = (version, reason, time.time())


def _bind(address: str) -> socket.socket:
    """A listening socket on ``address``, bound now (OSError if it cannot be) and shared with
    the other workers (SO_REUSEPORT)."""
    return listening_socket(*parse_address(address, listener=True))


def _kind(ls: Any) -> str:
    """What makes a bound listener the same one in a new config: its address, and whether it is
    transparent (its connections get another protocol, so a change re-binds it)."""
    return f"{ls.address} (transparent)" if ls.transparent else ls.address


def _close_servers(servers: dict[str, tuple[str, asyncio.AbstractServer]]) -> None:
    for _, server in servers.values():
        server.close()


class Worker:
    """Runs the sidecar's listeners on one event loop.

    ``config`` None: no config yet (control-plane mode); ``start()`` binds
    nothing and the first ``reconfigure()`` binds the listeners. ``amend``,
    when given, completes every config before it is checked and used (the
    command line's say over listeners: ``--transparent``, ``--inbound-listen``).
    """

    def __init__(
        self,
        config: Any | None,
        loop: asyncio.AbstractEventLoop,
        drain_timeout: float = 10.0,
        amend: Callable[[Any], None] | None = None,
        index: int = 0,
        workers: int = 1,
    ) -> None:
        self.loop = loop
        self.outbox = h2.Outbox()
        self.amend = amend
        # This worker's index among ``workers`` (--concurrency): worker 0 answers admin and metrics for all.
        self.index = index
        self.workers = workers
        self.started_at = time.time()
        self.config_log = ConfigLog()
        # Called with the new Runtime after every swap (and at start, when there is one): telemetry
        # and the admin service precompute what they need per endpoint and route there.
        self.on_config: list[Callable[[Runtime], None]] = []
        # The trace headers the core ensures on requests it forwards (meshproxy.telemetry.tracing):
        # 0 pass them through untouched; 1 add a traceparent when absent; 2 also make the proxy's span
        # the parent. Applied to each downstream connection as it is accepted.
        self.trace_mode = 0
        self.trace_sampling = 1.0
        # A drain that ends the process (the admin Shutdown, POST /quitquitquit); meshproxy.cli makes it
        # reach every worker when there are several.
        self.shutdown: Callable[[], None] = self.drain
        # meshproxy.telemetry.install sets these (None: off).
        self.recorder: Any = None
        self.access_log: Any = None
        self.tracing: Any = None
        # meshproxy.tls.install sets it: the workload's TLS contexts and the config's Security compiled.
        self.security: Any = None
        if config is not None:
            self._amend(config)
        self.deadlines = Deadlines(self)
        self.try_timeouts = TryTimeouts(self)
        self.runtime: Runtime | None = (
            Runtime(config, None, self.retry_hook, self.try_timeouts.wheel) if config is not None else None
        )
        if self.runtime is not None:
            self.config_log.accepted()
        self.health = HealthChecker(loop, self)
        self.downstreams: set[DownstreamProtocol] = set()
        self.upstreams: set[UpstreamProtocol] = set()
        # TCP passthroughs of transparent listeners (meshproxy.transparent).
        self.passthroughs: set[transparent.Passthrough] = set()
        # The bound listeners by name: (the address as configured, marked if transparent; its server).
        self.listeners: dict[str, tuple[str, asyncio.AbstractServer]] = {}
        self.draining = False
        self.drain_timeout = drain_timeout
        self.upstream_settings = {"initial_window_size": 1 << 20, "connection_window": 4 << 20}
        # Completion hooks (metrics, access logs): called once per request as it ends.
        self.on_complete: list[Callable[[Request], None]] = []
        # Called with a TCP passthrough (meshproxy.transparent) once it reached its upstream, and
        # when it ends (the TCP metrics).
        self.on_tcp_open: list[Callable[[transparent.Passthrough], None]] = []
        self.on_tcp_close: list[Callable[[transparent.Passthrough], None]] = []
        # Called once when the drain begins (the control-plane subscription stops there).
        self.on_drain: list[Callable[[], None]] = []
        self._stopped = loop.create_future()
        self._sweeper: asyncio.TimerHandle | None = None
        self._exit_after_drain = True
        self._drained = False

    @property
    def node(self) -> Any:
        """The ``meshproxy.v1.Node`` this worker runs as (the config's; None before the first config)."""
        return self.runtime.config.node if self.runtime is not None else None

    # -- config -------------------------------------------------------------

    def apply(self, config: Any) -> None:
        """Swap in a new config (validated): routes and clusters change for new requests at once.

        Endpoints still present keep their connections; requests in flight
        finish on the config they were routed with. Listeners are not
        re-bound (``--config`` and SIGHUP: a change of listener addresses
        needs a restart; ``reconfigure`` re-binds). Raises ConfigError (and
        changes nothing) if the routes cannot be compiled.
        """
        try:
            self._amend(config)
            runtime = Runtime(config, self.runtime, self.retry_hook, self.try_timeouts.wheel)
        except ConfigError as e:
            self.config_log.rejected(config.version, str(e))
            raise
        self._swap(runtime)

    def _swap(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config_log.accepted()
        self.health.update(runtime)
        self._config_hooks(runtime)

    def _config_hooks(self, runtime: Runtime) -> None:
        # The config is in force by now: a hook that fails (a bug) is logged, and the others still run.
        for hook in self.on_config:
            try:
                hook(runtime)
            except Exception:
                log.exception("config hook %r failed on version %r", hook, runtime.version)

    async def reconfigure(self, config: Any) -> None:
        """Swap in a new config (validated), listeners included.

        Listeners whose name and address are unchanged keep their socket and
        connections. New or moved ones are bound first: if one cannot be, or
        the routes cannot be compiled, ConfigError is raised and nothing has
        changed. Then the runtime is swapped (as ``apply``), the new
        listeners start accepting, and the ones removed or moved stop
        accepting and send GOAWAY to their connections, whose streams in
        flight finish.
        """
        try:
            self._amend(config)
        except ConfigError as e:
            self.config_log.rejected(config.version, str(e))
            raise
        old = self.listeners
        opened: dict[str, tuple[str, asyncio.AbstractServer]] = {}
        try:
            for i, ls in enumerate(config.listeners):
                if old.get(ls.name, ("",))[0] == _kind(ls):
                    continue
                try:
                    opened[ls.name] = (_kind(ls), await self._open(ls))
                except OSError as e:
                    raise ConfigError(
                        f"listeners[{i}].address", f"cannot listen on {ls.address}: {e.strerror or e}"
                    ) from None
            # Last: building the runtime takes over the endpoints (and connections) of the old one.
            runtime = Runtime(config, self.runtime, self.retry_hook, self.try_timeouts.wheel)
        except BaseException as e:
            _close_servers(opened)
            if isinstance(e, ConfigError):
                self.config_log.rejected(config.version, str(e))
            raise
        self._swap(runtime)
        self.listeners = {ls.name: opened.get(ls.name) or old[ls.name] for ls in config.listeners}
        retired = {name: entry for name, entry in old.items() if self.listeners.get(name) is not entry}
        # Not accepting until now: a connection accepted earlier would have been
        # given the old runtime's settings and routes.
        for _, server in opened.values():
            await server.start_serving()
        for name, (address, server) in retired.items():
            self._retire(name, address, server)
        if opened:
            log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self.bound_addresses()))

    def _amend(self, config: Any) -> None:
        if self.amend is not None:
            self.amend(config)
            validate(config)

    async def _open(self, ls: Any) -> asyncio.AbstractServer:
        """Listener ``ls``'s server, bound (OSError if it cannot be) but not accepting yet."""
        sock = _bind(ls.address)
        if ls.transparent:
            proto = transparent.TransparentProtocol
        elif ls.name == transparent.INBOUND_LISTENER:
            # A local sidecar's inbound listener (``--app``): mTLS per PeerAuthentication first (meshproxy.tls).
            proto = transparent.InboundProtocol
        else:
            proto = DownstreamProtocol
        try:
            return await self.loop.create_server(
                lambda name=ls.name: proto(self, name), sock=sock, backlog=1024, start_serving=False
            )
        except BaseException:
            sock.close()
            raise

    def _retire(self, name: str, address: str, server: asyncio.AbstractServer) -> None:
        """Stop accepting on a listener that left the config (or moved), and send GOAWAY to the
        connections it accepted: their streams in flight finish, new ones go elsewhere."""
        bound = [sock.getsockname()[:2] for sock in server.sockets]
        server.close()
        log.info("listener %s on %s removed", name, address)
        for p in list(self.downstreams):
            if p.listener != name or p.transport is None:
                continue
            local = p.transport.get_extra_info("sockname")
            if local is None or not any(_accepted_on(local, b) for b in bound):
                continue
            events = p.conn.shutdown()
            if events is not None:
                p._events(events)
        self.outbox.flush()

    def downstream_settings(self, listener: str) -> dict[str, int]:
        # Connections are accepted only once a runtime is in force.
        return self.runtime.listener_settings.get(listener, {})

    # -- requests -------------------------------------------------------------

    def complete(self, req: Request) -> None:
        """A downstream stream ended: balancer and outlier feedback, the cluster's counts, the hooks."""
        req.done = True
        if req.deadline_ns:
            self.deadlines.done(req)
        subset = req.subset
        if subset is not None:
            state = subset.cluster.state
            state.active_requests -= 1
            if req.retrying:
                state.active_retries -= 1
            up = req.up
            ep = req.endpoint
            if ep is not None and ep.waiters:
                # A stream of ours ended (the proxy may have reset it, which the upstream
                # does not answer): one of the requests waiting for a stream may take its place.
                for p in ep.conns:
                    if p.conn.can_open:
                        ep.serve_waiters(p)
                        break
            if req.index >= 0:
                if up is not None and up.t_response_ns:
                    subset.finish(req.index, up.t_response_ns - up.t_open_ns, up.t_response_ns)
                else:
                    t = now_ns()
                    subset.finish(req.index, t - req.start_ns, t)
            if ep is not None and up is not None:
                if up.recv_headers:
                    status, grpc = up.status, up.grpc_status
                    if status >= 500 or grpc > 0:
                        ep.cluster.record(ep, outcome(status, grpc), up.t_response_ns)
                    elif ep.failing:
                        # A success ends the endpoint's runs of failures (and costs nothing otherwise).
                        ep.cluster.record(ep, SUCCESS, up.t_response_ns)
                elif up.closed_remote_reset or up.conn.terminated:
                    ep.cluster.record(ep, outlier.LOCAL_ORIGIN_FAILURE, now_ns())
                # Otherwise the downstream gave up (or its deadline passed): not the endpoint's doing.
        for hook in self.on_complete:
            hook(req)

    # -- retries ----------------------------------------------------------------

    def retry_hook(self, down: h2.Stream, up: h2.Stream, reason: int) -> bool:
        """The core's question (``RetryOn.hook``): the attempt ``up`` of the request on ``down`` failed
        in a way its route retries; may it go out again? Records the failure for outlier detection
        when it does (otherwise the response goes downstream and ``complete`` records it)."""
        req = down.user
        if req is None or req.done or req.up is not up or not self.may_retry(req):
            return False
        ep = req.endpoint
        if ep is not None:
            result = outlier.LOCAL_ORIGIN_FAILURE if reason == h2.RETRY_RESET else outcome(up.status, up.grpc_status)
            ep.cluster.record(ep, result, now_ns())
        req.backoff = True
        return True

    def may_retry(self, req: Request) -> bool:
        """Whether ``req`` may be retried now: attempts left, ``max_retries``, then the budget (a token is
        spent when it says yes). A refusal is counted and flags the request URX."""
        policy = req.route.retry
        if policy is None or req.retries >= policy.num_retries:
            req.flags = "URX"
            return False
        cluster = req.subset.cluster
        state = cluster.state
        if not req.retrying and cluster.max_retries and state.active_retries >= cluster.max_retries:
            state.retries_overflow += 1
            req.flags = "URX"
            return False
        if not (policy.budget or state.budget).withdraw(now_ns()):
            state.retries_denied += 1
            req.flags = "URX"
            return False
        req.retries += 1
        state.retries += 1
        if not req.retrying:
            req.retrying = True
            state.active_retries += 1
        return True

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        # Requests make short-lived objects without cycles (the core breaks
        # the stream links when streams end), so the cyclic collector mostly
        # rescans the same long-lived objects: freeze what exists now and
        # collect rarely. It cost ~2% of a loaded worker's CPU at the defaults.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        if self.runtime is not None:
            opened: dict[str, tuple[str, asyncio.AbstractServer]] = {}
            try:
                for ls in self.runtime.config.listeners:
                    opened[ls.name] = (_kind(ls), await self._open(ls))
            except BaseException:
                _close_servers(opened)
                raise
            self.listeners = opened
            for _, server in opened.values():
                await server.start_serving()
        if self.runtime is not None:
            self.health.update(self.runtime)
            self._config_hooks(self.runtime)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        # Each second, or each outlier-detection interval when a cluster's is shorter (ejections
        # end within an interval of their time, as in Envoy): idle connections and streams,
        # the ends of ejections.
        now = time.monotonic()
        for p in list(self.upstreams):
            p.check_idle(now)
        runtime = self.runtime
        if runtime is not None:
            t = now_ns()
            for cluster in runtime.clusters.values():
                cluster.sweep(t)
            timeouts = runtime.listener_timeouts
            for p in list(self.downstreams):
                idle, stream_idle = timeouts.get(p.listener, (0.0, 0))
                p.check_idle(now, idle, t, stream_idle)
        self.outbox.flush()
        self._sweeper = self.loop.call_later(runtime.sweep_interval if runtime is not None else 1.0, self._sweep)

    def bound_addresses(self) -> list[tuple[str, int]]:
        out = []
        for _, server in self.listeners.values():
            for sock in server.sockets:
                out.append(sock.getsockname()[:2])
        return out

    @property
    def ready(self) -> bool:
        """A config is in force, its listeners accept, the workload certificate is there when mTLS is
        configured, and the worker is not draining (``--ready``)."""
        if self.runtime is None or self.draining:
            return False
        sec = self.security
        if sec is not None and sec.enabled and sec.server is None:
            return False  # mTLS configured, no workload certificate yet (meshproxy.tls)
        return all(server.is_serving() for _, server in self.listeners.values())

    def install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        self.loop.add_signal_handler(signal.SIGINT, self.drain)

    def drain(self, exit: bool = True) -> None:
        """Stop accepting, GOAWAY every downstream connection, finish in-flight streams, then stop.

        ``exit`` False (the admin service's Drain): the same, but the worker keeps running (its admin
        and metrics stay up, /ready says 503) until a later ``drain()`` stops it.
        """
        if self.draining:
            if exit and not self._exit_after_drain:
                # Drained before without exiting: stop now (in-flight streams had their chance).
                self._exit_after_drain = True
                if self._drained:
                    self.loop.create_task(self._finish_drain())
            return
        self.draining = True
        self._exit_after_drain = exit
        self._drained = False
        log.info("draining %d connections (deadline %.1fs)", len(self.downstreams), self.drain_timeout)
        self.health.stop()
        for hook in self.on_drain:
            hook()
        _close_servers(self.listeners)
        for p in list(self.downstreams):
            events = p.conn.shutdown()
            if events is not None:
                p._events(events)
        self.outbox.flush()
        self.loop.create_task(self._finish_drain())

    async def _finish_drain(self) -> None:
        deadline = self.loop.time() + self.drain_timeout
        while (self.downstreams or self.passthroughs) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for p in list(self.downstreams):
            p.conn.close(0, "drain deadline")
            p._close()
        for t in list(self.passthroughs):
            t.close()
        for p in list(self.upstreams):
            p.conn.shutdown()
            p._close()
        self.outbox.flush()
        if not self._exit_after_drain:
            # The admin service's Drain: drained, and still running until told to stop.
            self._drained = True
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def wait_stopped(self) -> None:
        await self._stopped


def _accepted_on(local: tuple, bound: tuple[str, int]) -> bool:
    """Whether a connection whose local address is ``local`` came in on a socket bound to ``bound``."""
    host, port = bound
    return local[1] == port and (host in ("0.0.0.0", "::") or local[0] == host)


now_ns = h2.monotonic_ns
SUCCESS = outlier.SUCCESS
