"""Transparent listeners: connections iptables redirected to the sidecar, routed by where they
were going (SO_ORIGINAL_DST), HTTP/2 at L7 and everything else as TCP.

Owns what happens to a redirected connection before it is either an HTTP/2 connection of
``meshproxy.downstream`` or a TCP passthrough, and the passthrough itself:

- on accept, the original destination. None (no conntrack entry) or our own listening
  address means the connection was not redirected (someone dialled the port itself): it is
  closed with a log line, because proxying it to itself would loop;
- outbound, the destination ``ip:port`` is looked up in the clusters' ``service_addresses``.
  An unknown destination is passed through as TCP to itself at once, with no detection (as
  Istio's PassthroughCluster): nothing is known about it that L7 could use. Inbound (the
  listener named ``inbound``) the destination is the pod's own ``ip:port`` and the target is
  the app on ``127.0.0.1:port``;
- detection: the first bytes within the listener's ``protocol_detection_timeout`` (100 ms).
  The HTTP/2 connection preface hands the connection, with the bytes read so far, to a
  ``DownstreamProtocol``: outbound on the listener's route table, to which each cluster's
  service addresses were added as domains (so a client that dialled the IP reaches the
  cluster), inbound on a table of its own per app port that routes everything to the local
  cluster ``inbound|<port>||``. Anything else (a TLS ClientHello, HTTP/1.x, a binary protocol)
  is passed through, and so is silence: a server-first protocol (MySQL, SMTP) gets its banner
  after the timeout. Ports in ``opaque_ports`` skip detection;
- TCP passthrough: to an endpoint of the cluster picked by its balancer (another one after a
  connect failure, up to three tries), or to the destination itself; bytes are copied both
  ways untouched, with back-pressure (a side whose write buffer is over its high-water mark
  stops the other side's reading), half-close passed on (``write_eof``) and both ends
  closed when either ends, aborted when either fails.

Everything here runs once per connection (and per read burst of a passthrough); a plain
listener never reaches this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any

from meshproxy.config import Cluster as ClusterConfig
from meshproxy.config import Endpoint as EndpointConfig
from meshproxy.config import Listener, Route, RouteAction, RouteMatch, VirtualHost, WeightedCluster, parse_domain
from meshproxy.config._checks import duration_s, parse_service_address
from meshproxy.conn import h2conn as h2
from meshproxy.downstream import DownstreamProtocol
from meshproxy.resilience import outlier
from meshproxy.routing import RouteTable
from meshproxy.upstream import PEAK_EWMA, Cluster

if TYPE_CHECKING:
    from meshproxy.worker import Runtime, Worker

__all__ = [
    "DEFAULT_DETECTION_TIMEOUT",
    "INBOUND_LISTENER",
    "PREFACE",
    "Index",
    "Passthrough",
    "TransparentProtocol",
    "install_local",
    "local_cluster_name",
    "original_destination",
    "routable",
]

log = logging.getLogger("meshproxy.transparent")

#: The sidecar's own transparent listener to the local app (``--inbound-listen``).
INBOUND_LISTENER = "inbound"
#: Seconds a transparent listener waits for the client's first bytes (Istio's old default).
DEFAULT_DETECTION_TIMEOUT = 0.1
#: RFC 9113 §3.4: what every HTTP/2 client sends first.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: linux/netfilter_ipv4.h SO_ORIGINAL_DST (at SOL_IP) and linux/netfilter_ipv6/ip6_tables.h
#: IP6T_SO_ORIGINAL_DST (at SOL_IPV6): both 80.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
#: Connecting to a destination that is no cluster: Istio's PassthroughCluster connect timeout.
PASSTHROUGH_CONNECT_TIMEOUT = 10.0
#: Tries of a cluster's endpoints for one passthrough connection.
CONNECT_TRIES = 3
#: Bytes a client may send while its upstream is being connected before we stop reading it.
PENDING_LIMIT = 256 * 1024
#: Where inbound connections go: the app, on the port they were sent to.
LOCAL_HOST = "127.0.0.1"


def original_destination(sock: Any) -> tuple[str, int] | None:
    """Where a redirected connection was going, as (canonical IP text, port); None when the
    kernel has no NAT record of it (it was not redirected, or conntrack is not there)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except OSError:
        return None
    return str(ipaddress.ip_address(ip)), int.from_bytes(raw[2:4], "big")


def _canonical(address: tuple) -> tuple[str, int] | None:
    try:
        return str(ipaddress.ip_address(address[0].split("%", 1)[0])), address[1]
    except (ValueError, IndexError, TypeError, AttributeError):
        return None


def local_cluster_name(port: int) -> str:
    """The local cluster (and route table) of an inbound port, named as Istio names it."""
    return f"inbound|{port}||"


# -- config-time: what a runtime keeps for its transparent listeners ---------------------------


class Mode:
    """One transparent listener's settings."""

    __slots__ = ("detection_timeout", "inbound", "opaque")

    def __init__(self, ls: Any) -> None:
        self.inbound = ls.name == INBOUND_LISTENER
        self.opaque = frozenset(ls.opaque_ports)
        self.detection_timeout = (
            duration_s(ls.protocol_detection_timeout)
            if ls.HasField("protocol_detection_timeout")
            else DEFAULT_DETECTION_TIMEOUT
        )


class Index:
    """A runtime's view for transparent listeners: their modes by name, and the cluster of each
    service address (``(ip, port)`` -> cluster name)."""

    __slots__ = ("destinations", "modes")

    def __init__(self, config: Any) -> None:
        self.modes = {ls.name: Mode(ls) for ls in config.listeners if ls.transparent}
        self.destinations: dict[tuple[str, int], str] = {}
        for c in config.clusters:
            for text in c.service_addresses:
                self.destinations.setdefault(parse_service_address(text), c.name)


def routable(ls: Any, clusters: Any) -> Any:
    """A transparent listener as its route table sees it: its virtual hosts, plus one per
    cluster with service addresses whose domains are those addresses (the ones no virtual host
    has already), routing everything to the cluster. A client that dialled a Service's IP
    sends that IP as :authority; this is how its request finds the cluster."""
    taken = {parse_domain(d) for vh in ls.virtual_hosts for d in vh.domains}
    names = {vh.name for vh in ls.virtual_hosts}
    out = Listener()
    out.CopyFrom(ls)
    for c in clusters:
        domains = []
        for text in c.service_addresses:
            d = parse_domain(text)
            if d not in taken:
                taken.add(d)
                domains.append(text)
        name = f"{c.name} (service address)"
        if not domains or name in names:
            continue
        route = Route(name="service-address", match=RouteMatch(prefix="/"))
        route.route.CopyFrom(RouteAction(clusters=[WeightedCluster(cluster=c.name)]))
        out.virtual_hosts.append(VirtualHost(name=name, domains=domains, routes=[route]))
    return out


def install_local(
    runtime: Runtime,
    listener: str,
    port: int,
    reuse: dict | None = None,
    states: dict | None = None,
    now: int = 0,
) -> str:
    """Give ``runtime`` the local cluster and route table of inbound ``port`` on ``listener`` (once);
    return their name, which is also the listener name its L7 connections go by."""
    name = local_cluster_name(port)
    if name in runtime.tables:
        return name
    msg = ClusterConfig(name=name, endpoints=[EndpointConfig(address=f"{LOCAL_HOST}:{port}")])
    route = Route(name="local", match=RouteMatch(prefix="/"))
    route.route.CopyFrom(RouteAction(clusters=[WeightedCluster(cluster=name)]))
    table = RouteTable.compile(
        Listener(name=name, virtual_hosts=[VirtualHost(name=name, domains=["*"], routes=[route])]), [msg]
    )
    cluster = Cluster(msg, (reuse or {}).get(name), (states or {}).get(name), now or h2.monotonic_ns())
    runtime.clusters[name] = cluster
    runtime.tables[name] = table
    runtime.listener_settings[name] = runtime.listener_settings.get(listener, {})
    runtime.listener_timeouts[name] = runtime.listener_timeouts.get(listener, (0.0, 0))
    runtime.local_ports.add((listener, port))
    return name


# -- per connection: detection --------------------------------------------------------------------


class TransparentProtocol(asyncio.Protocol):
    """A connection accepted on a transparent listener, until it is HTTP/2 or a passthrough."""

    __slots__ = ("buffer", "cluster", "destination", "listener", "mode", "target", "timer", "transport", "worker")

    def __init__(self, worker: Worker, listener: str) -> None:
        self.worker = worker
        self.listener = listener
        self.transport: Any = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.destination: tuple[str, int] | None = None
        self.cluster: str | None = None  # the destination's cluster, outbound
        self.target: tuple[str, int] | None = None  # where a passthrough goes when there is no cluster
        self.mode: Mode | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        worker = self.worker
        index = worker.runtime.transparent
        mode = index.modes.get(self.listener) if index is not None else None
        sock = transport.get_extra_info("socket")
        dest = original_destination(sock) if sock is not None else None
        local = _canonical(transport.get_extra_info("sockname") or ())
        if mode is None or dest is None or dest == local:
            peer = transport.get_extra_info("peername")
            log.warning(
                "listener %s: connection from %s to %s was not redirected here (no original destination): closed",
                self.listener,
                _show(peer),
                _show(local),
            )
            transport.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mode = mode
        self.destination = dest
        port = dest[1]
        if mode.inbound:
            self.target = (LOCAL_HOST, port)
        else:
            self.cluster = index.destinations.get(dest)
            if self.cluster is None:
                # Nothing is known of it: straight through, to where it was going.
                self.target = dest
                self._passthrough()
                return
        if port in mode.opaque:
            self._passthrough()
            return
        self.timer = worker.loop.call_later(mode.detection_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if len(buf) < len(PREFACE) and PREFACE.startswith(buf):
            self.buffer = buf  # maybe HTTP/2: wait for the rest of the preface (or the timeout)
            return
        self.buffer = buf
        if buf.startswith(PREFACE):
            self._http2()
        else:
            self._passthrough()

    def eof_received(self) -> bool:
        # The client half-closed before we decided: whatever it sent goes through as TCP.
        self._passthrough(eof=True)
        return True

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self._passthrough()

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _http2(self) -> None:
        self._cancel()
        worker = self.worker
        listener = self.listener
        if self.mode.inbound:
            listener = install_local(worker.runtime, listener, self.destination[1])
        proto = DownstreamProtocol(worker, listener)
        transport = self.transport
        data, self.buffer = self.buffer, b""
        self.transport = None
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(data)

    def _passthrough(self, eof: bool = False) -> None:
        self._cancel()
        transport = self.transport
        if transport is None:
            return
        self.transport = None
        data, self.buffer = self.buffer, b""
        Passthrough(self.worker, transport, self.listener, self.destination, self.cluster, self.target, data, eof)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.transport = None


def _show(address: Any) -> str:
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# -- per connection: TCP passthrough ---------------------------------------------------------------


class _Side(asyncio.Protocol):
    """One end of a passthrough: what it reads goes to the other end's transport."""

    __slots__ = ("eof", "peer", "pending", "pending_eof", "pending_size", "pipe", "transport")

    def __init__(self, pipe: Passthrough) -> None:
        self.pipe = pipe
        self.peer: _Side = self  # the other end, set by the pipe
        self.transport: Any = None
        self.eof = False  # this end sent EOF (and we passed it on, or will)
        self.pending: list[bytes] = []  # read before the other end was connected
        self.pending_size = 0
        self.pending_eof = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self is self.pipe.upstream:
            # Now, in this callback: what the client sent meanwhile must go first.
            self.pipe.connected()

    def data_received(self, data: bytes) -> None:
        other = self.peer
        if other.transport is None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_LIMIT:
                self.transport.pause_reading()
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.peer
        if other.transport is None:
            self.pending_eof = True
        else:
            self.pipe.forward_eof(other)
        if other.eof:
            self.pipe.close()
        return True  # still open the other way

    def pause_writing(self) -> None:
        # Our peer reads slower than the other end writes: stop reading the other end.
        other = self.peer.transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.peer.transport
        if other is not None and not other.is_closing():
            other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pipe.lost(self, exc)


class _ConnKey:
    """What a balancer reads of a request, for a connection: when it started and, for ring
    hash, the client's address as the key (a client sticks to one endpoint)."""

    __slots__ = ("headers", "t_open_ns")

    def __init__(self, client: bytes) -> None:
        self.t_open_ns = h2.monotonic_ns()
        self.headers = ((b":client", client),)


class Passthrough:
    """A client connection copied byte for byte to a TCP connection to its upstream."""

    __slots__ = (
        "client",
        "closed",
        "cluster",
        "endpoint",
        "listener",
        "picked",
        "started_ns",
        "task",
        "upstream",
        "worker",
    )

    def __init__(
        self,
        worker: Worker,
        transport: Any,
        listener: str,
        destination: tuple[str, int],
        cluster: str | None,
        target: tuple[str, int] | None,
        data: bytes,
        eof: bool,
    ) -> None:
        self.worker = worker
        self.listener = listener
        self.cluster = cluster
        self.endpoint: Any = None
        self.picked: tuple[Any, int] | None = None  # (subset, index) to tell the balancer when done
        self.started_ns = 0
        self.closed = False
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.connection_made(transport)
        if data:
            self.client.pending.append(data)
            self.client.pending_size = len(data)
        self.client.pending_eof = eof
        self.client.eof = eof
        transport.set_protocol(self.client)
        worker.passthroughs.add(self)
        # Kept: the loop holds its tasks weakly.
        self.task = worker.loop.create_task(self._connect(destination, target))

    async def _connect(self, destination: tuple[str, int], target: tuple[str, int] | None) -> None:
        loop = self.worker.loop
        tried: list[Any] = []
        for _ in range(1 if target is not None else CONNECT_TRIES):
            if target is not None:
                (host, port), timeout, ep = target, PASSTHROUGH_CONNECT_TIMEOUT, None
            else:
                ep = self._pick(tried)
                if ep is None:
                    log.warning("%s: no healthy endpoint in %s: connection closed", _show(destination), self.cluster)
                    break
                host, port, timeout = ep.host, ep.port, ep.cluster.connect_timeout
            self.started_ns = h2.monotonic_ns()
            try:
                # The upstream side's connection_made calls connected().
                await asyncio.wait_for(loop.create_connection(lambda: self.upstream, host, port), timeout)
                return
            except (OSError, TimeoutError) as e:
                log.debug("passthrough to %s:%s failed: %s", host, port, e)
                if ep is not None:
                    self._done_with_endpoint(ep, failed=True)
                    tried.append(ep)
                if self.closed:
                    return
        else:
            log.info("%s: cannot connect upstream: connection closed", _show(destination))
        self.close(abort=True)

    def _pick(self, tried: list[Any]) -> Any:
        runtime = self.worker.runtime
        cluster = runtime.clusters.get(self.cluster) if runtime is not None else None
        if cluster is None:
            return None
        subset = cluster.subsets[""]
        peer = self.client.transport.get_extra_info("peername") if self.client.transport is not None else None
        key = _ConnKey(str(peer[0]).encode() if peer else b"")
        i = subset.pick(key, b":client") if not tried else subset.pick_other(key, b":client", tried)
        if i < 0:
            return None
        self.picked = (subset, i)
        self.endpoint = subset.endpoints[i]
        return self.endpoint

    def _done_with_endpoint(self, ep: Any, failed: bool) -> None:
        """The balancer's bookkeeping for the endpoint picked: the attempt is over (a failed
        connect also counts for outlier detection)."""
        picked, self.picked = self.picked, None
        self.endpoint = None
        t = h2.monotonic_ns()
        if picked is not None:
            subset, i = picked
            subset.finish(i, t - self.started_ns, t)
        if failed:
            ep.cluster.record(ep, outlier.LOCAL_ORIGIN_FAILURE, t)

    def connected(self) -> None:
        """The upstream connection is made: flush what the client sent meanwhile, and from now on
        copy both ways."""
        client, upstream = self.client, self.upstream
        if self.closed:  # the client went away while we connected
            upstream.transport.abort()
            return
        sock = upstream.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        picked = self.picked
        if picked is not None and picked[0].policy == PEAK_EWMA:
            # Peak EWMA learns the connect time; a connection's lifetime says nothing of the endpoint.
            self._done_with_endpoint(self.endpoint, failed=False)
        for side, other in ((client, upstream), (upstream, client)):
            if side.pending:
                data = b"".join(side.pending)
                side.pending.clear()
                side.pending_size = 0
                # Resume first: a pause that writing it calls for (pause_writing) must stand.
                if not side.transport.is_closing():
                    side.transport.resume_reading()
                other.transport.write(data)
            if side.pending_eof:
                side.pending_eof = False
                self.forward_eof(other)
        if client.eof and upstream.eof:
            self.close()

    def forward_eof(self, to: _Side) -> None:
        t = to.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        # One end is gone: the other goes too, its buffered bytes flushed unless this was a failure.
        self.close(abort=exc is not None)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.worker.passthroughs.discard(self)
        if self.endpoint is not None:
            self._done_with_endpoint(self.endpoint, failed=False)
            self.endpoint = None
        for side in (self.client, self.upstream):
            t = side.transport
            if t is not None and not t.is_closing():
                if abort:
                    t.abort()
                else:
                    t.close()
