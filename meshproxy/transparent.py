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
  connect failure, up to three tries), or to the destination itself; to an endpoint of a
  cluster with ISTIO_MUTUAL (``meshproxy.tls``) inside mTLS, ALPN ``meshproxy-tcp``, the
  server's SPIFFE id checked before a byte goes out; bytes are copied both
  ways untouched, with back-pressure (a side whose write buffer is over its high-water mark
  stops the other side's reading), half-close passed on (``write_eof``) and both ends
  closed when either ends, aborted when either fails.

- inbound mTLS (``meshproxy.tls``), when the config has ``Security``: the PeerAuthentication
  mode of the destination port decides. DISABLE: as above (a ClientHello is passed through).
  PERMISSIVE: a ClientHello (first bytes 0x16 0x03) offering the mesh's ALPN mark is TLS,
  terminated here with the workload certificate; another ClientHello (the app's own TLS) and
  anything else are detected as above. STRICT: TLS (any) or the connection is closed. Once
  the handshake is done and the peer's SPIFFE id is of our trust domain, ALPN h2 hands the
  connection to a ``DownstreamProtocol`` that knows the peer, and anything else is passed
  through to the app in plaintext. Every inbound HTTP/2 connection, TLS or not, is given the
  worker's ``Security`` and its port for authorization.

``InboundProtocol`` does the same for the non-transparent listener named ``inbound`` (a local
sidecar's, in front of an app it routes to): the port is the one the listener was dialled on.

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
from meshproxy.tls import (
    ALPN_TCP,
    DISABLE,
    HANDSHAKE_TIMEOUT,
    STRICT,
    PeerRefused,
    accept,
    client_hello_alpn,
    describe,
    is_mesh_hello,
    is_tls_record,
    security_of,
    upstream_args,
    upstream_peer,
)
from meshproxy.upstream import PEAK_EWMA, Cluster

if TYPE_CHECKING:
    from meshproxy.worker import Runtime, Worker

__all__ = [
    "DEFAULT_DETECTION_TIMEOUT",
    "INBOUND_LISTENER",
    "PREFACE",
    "InboundProtocol",
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

    __slots__ = (
        "buffer",
        "cluster",
        "destination",
        "listener",
        "mode",
        "sec",
        "target",
        "timer",
        "tls_mode",
        "transport",
        "worker",
    )

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
        self.sec: Any = None  # inbound with mTLS configured: the worker's meshproxy.tls.Security
        self.tls_mode = DISABLE  # inbound: PERMISSIVE or STRICT when TLS is looked for

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
            sec = self.sec = security_of(worker)
            if sec is not None:
                self.tls_mode = sec.mode_for(port)
                if self.tls_mode != DISABLE:
                    # Opaque or not, the first bytes say whether it is TLS; STRICT waits as long as a handshake may.
                    wait = HANDSHAKE_TIMEOUT if self.tls_mode == STRICT else mode.detection_timeout
                    self.timer = worker.loop.call_later(wait, self._timed_out)
                    return
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
        if self.tls_mode != DISABLE:
            if len(buf) < 2:
                self.buffer = buf
                return
            self.buffer = buf
            if is_tls_record(buf):
                if self.tls_mode == STRICT:
                    self._tls()
                    return
                # PERMISSIVE: the mesh's mTLS is terminated here, an app's own TLS goes to the app.
                alpn = client_hello_alpn(buf)
                if alpn is None:
                    return  # the rest of the ClientHello (or the timeout)
                if is_mesh_hello(alpn):
                    self._tls()
                    return
                self.tls_mode = DISABLE
                self._passthrough()
                return
            if self.tls_mode == STRICT:
                self._refuse_plaintext()
                return
            self.tls_mode = DISABLE  # PERMISSIVE, plaintext: detected as any other
            if self.destination[1] in self.mode.opaque:
                self._passthrough()
                return
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
        if self.tls_mode == STRICT:
            self._refuse_plaintext()
            return True
        self._passthrough(eof=True)
        return True

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            if self.tls_mode == STRICT:
                self._refuse_plaintext()
            else:
                self._passthrough()

    def _refuse_plaintext(self) -> None:
        self._cancel()
        transport, self.transport = self.transport, None
        self.buffer = b""
        self.sec.plaintext_refused += 1
        log.info(
            "listener %s: plaintext connection from %s to port %d refused (mTLS STRICT)",
            self.listener,
            _show(transport.get_extra_info("peername")),
            self.destination[1],
        )
        transport.abort()

    def _tls(self) -> None:
        self._cancel()
        transport, self.transport = self.transport, None
        data, self.buffer = self.buffer, b""
        what = f"listener {self.listener}: {_show(transport.get_extra_info('peername'))} to port {self.destination[1]}"
        accept(self.worker.loop, transport, data, self.sec, self._secured, what)

    def _secured(self, transport: Any, peer: Any) -> None:
        """The TLS handshake is done and ``peer`` is of our trust domain: HTTP/2 or a passthrough to the app."""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._downstream(transport, b"", peer)
        else:
            Passthrough(self.worker, transport, self.listener, self.destination, None, self.target, b"", False)

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _http2(self) -> None:
        self._cancel()
        transport = self.transport
        data, self.buffer = self.buffer, b""
        self.transport = None
        self._downstream(transport, data, None)

    def _downstream(self, transport: Any, data: bytes, peer: Any) -> None:
        worker = self.worker
        listener = self.listener
        if self.mode.inbound:
            port = self.destination[1]
            listener = install_local(worker.runtime, listener, port)
            proto = DownstreamProtocol(worker, listener, peer, port, self.sec)
        else:
            proto = DownstreamProtocol(worker, listener)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if data:
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


class InboundProtocol(asyncio.Protocol):
    """A connection to the non-transparent inbound listener (a local sidecar's, in front of its
    app): with mTLS configured, TLS or plaintext per the mode of the port it was dialled on, as a
    transparent inbound listener decides; then HTTP/2 on the listener's own routes."""

    __slots__ = ("buffer", "listener", "port", "sec", "timer", "tls_mode", "transport", "worker")

    def __init__(self, worker: Worker, listener: str) -> None:
        self.worker = worker
        self.listener = listener
        self.transport: Any = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.sec: Any = None
        self.port = 0
        self.tls_mode = DISABLE

    def connection_made(self, transport: Any) -> None:
        worker = self.worker
        local = transport.get_extra_info("sockname")
        self.port = local[1] if local else 0
        sec = self.sec = security_of(worker)
        self.tls_mode = sec.mode_for(self.port) if sec is not None else DISABLE
        if self.tls_mode == DISABLE:
            self._downstream(transport, b"", None)
            return
        self.transport = transport
        self.timer = worker.loop.call_later(HANDSHAKE_TIMEOUT, self._timed_out)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if len(buf) < 2:
            self.buffer = buf
            return
        self._cancel()
        transport, self.transport = self.transport, None
        self.buffer = b""
        what = f"listener {self.listener}: {_show(transport.get_extra_info('peername'))}"
        if is_tls_record(buf):
            accept(self.worker.loop, transport, buf, self.sec, self._secured, what)
        elif self.tls_mode == STRICT:
            self.sec.plaintext_refused += 1
            log.info("%s: plaintext connection refused (mTLS STRICT)", what)
            transport.abort()
        else:
            self._downstream(transport, buf, None)

    def _secured(self, transport: Any, peer: Any) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            log.info("listener %s: mTLS from %s without ALPN h2: closed", self.listener, peer.spiffe_id)
            transport.close()
            return
        self._downstream(transport, b"", peer)

    def _downstream(self, transport: Any, data: bytes, peer: Any) -> None:
        proto = DownstreamProtocol(self.worker, self.listener, peer, self.port, self.sec)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if data:
            proto.data_received(data)

    def eof_received(self) -> bool:
        self._close()
        return True

    def _timed_out(self) -> None:
        self.timer = None
        self._close()

    def _close(self) -> None:
        self._cancel()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

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

    __slots__ = ("bytes_in", "eof", "peer", "pending", "pending_eof", "pending_size", "pipe", "transport")

    def __init__(self, pipe: Passthrough) -> None:
        self.pipe = pipe
        self.bytes_in = 0  # read from this end (the metrics read it at scrape time)
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
        self.bytes_in += len(data)
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
        "tls",
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
        self.tls = False  # the upstream connection is mTLS (its server's identity checked before a byte goes)
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.connection_made(transport)
        if data:
            self.client.pending.append(data)
            self.client.pending_size = self.client.bytes_in = len(data)
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
                kw = upstream_args(self.worker, ep, ALPN_TCP) if ep is not None else {}
                self.tls = bool(kw)
                # The upstream side's connection_made calls connected().
                await asyncio.wait_for(loop.create_connection(lambda: self.upstream, host, port, **kw), timeout)
                return
            except (OSError, TimeoutError) as e:  # ssl.SSLError and PeerRefused are OSErrors
                log.debug("passthrough to %s:%s failed: %s", host, port, describe(e))
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
        if self.tls:
            try:
                upstream_peer(self.worker, self.endpoint, upstream.transport.get_extra_info("peercert"))
            except PeerRefused as e:
                log.info("passthrough to %s: %s: connection closed", self.endpoint.address, e)
                self._done_with_endpoint(self.endpoint, failed=True)
                self.close(abort=True)
                return
        sock = upstream.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Before the endpoint is let go below: the metrics label the connection by it.
        for hook in self.worker.on_tcp_open:
            hook(self)
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
        for hook in self.worker.on_tcp_close:
            hook(self)
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
