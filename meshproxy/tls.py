"""Sidecar-to-sidecar mTLS: the workload's SSL contexts, the SPIFFE check of a peer, and the
inbound decision (PeerAuthentication) of what a connection must be.

Owns, per worker, one ``Security`` object (``install`` puts it on the worker as
``worker.security``): the contexts built from the workload certificate, its key and the trust
bundle (``meshproxy.identity`` keeps those current and calls ``update`` on every change), and
what the config's ``Security`` message says (trust domain, inbound modes by port, the compiled
authorization policies of ``meshproxy.authz``). A renewed certificate or a new trust bundle
builds new contexts, used from the next handshake on; a connection keeps the ``SSLObject`` it
was made with, so rotation drops nothing.

Contexts are TLS 1.3 only, ALPN ``h2`` (``meshproxy-tcp`` for a TCP stream between sidecars,
which the inbound side passes to the app as it comes), no session tickets; both sides present the workload
certificate and verify the peer's chain against the trust bundle (no hostname check: the
identity is the SPIFFE id). After the handshake ``check_peer`` reads the peer's only URI SAN
from ``getpeercert()``: one in another trust domain (or, upstream, not in the cluster's
``allowed_spiffe_ids``) is refused and the connection closed.

A sidecar's ClientHello also offers the ALPN ``meshproxy`` (never selected): it is how a PERMISSIVE
port tells the mesh's mTLS from an app's own TLS, which goes to the app untouched (as Istio tells
them apart by its ``istio-*`` ALPN values); ``client_hello_alpn`` reads them.

TLS itself is uvloop's (its ``SSLProtocol``, as ``loop.start_tls`` uses it, or asyncio's on
the stdlib loop). ``accept`` puts it under a connection whose first bytes were already read
to tell TLS from plaintext: they are fed to it as if just received.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meshproxy.config.v1 import config_pb2 as pb

if TYPE_CHECKING:
    from meshproxy.authz import Policies

try:  # uvloop's compiled one (what loop.start_tls and create_server(ssl=...) use)
    from uvloop.loop import SSLProtocol as _UvSSLProtocol
except ImportError:  # pragma: no cover - uvloop is a dependency
    _UvSSLProtocol = None
from asyncio.sslproto import SSLProtocol as _AioSSLProtocol

__all__ = [
    "ALPN",
    "ALPN_MARK",
    "ALPN_TCP",
    "DISABLE",
    "HANDSHAKE_TIMEOUT",
    "MUTUAL_TLS",
    "NONE",
    "PERMISSIVE",
    "STRICT",
    "Peer",
    "PeerRefused",
    "Security",
    "accept",
    "check_peer",
    "client_context",
    "client_hello_alpn",
    "install",
    "is_mesh_hello",
    "is_tls_record",
    "peer_spiffe_id",
    "server_context",
    "upstream_args",
    "upstream_peer",
]

log = logging.getLogger("meshproxy.tls")

ALPN = "h2"
#: What a sidecar offers for a TCP passthrough it wraps in mTLS: the other side passes it to its app as is.
ALPN_TCP = "meshproxy-tcp"
#: Offered by every sidecar's ClientHello beside h2 (and never selected): "this is the mesh's mTLS".
ALPN_MARK = "meshproxy"
#: The longest ClientHello record waited for (a TLS record's largest plaintext, and its header).
MAX_HELLO = 16384 + 5
#: Seconds a TLS handshake may take (both directions) before the connection is closed.
HANDSHAKE_TIMEOUT = 10.0
#: connection_security_policy values (Istio's metric label).
MUTUAL_TLS = "mutual_tls"
NONE = "none"
#: PeerAuthentication.Mode values.
UNSET = pb.PeerAuthentication.UNSET
DISABLE = pb.PeerAuthentication.DISABLE
PERMISSIVE = pb.PeerAuthentication.PERMISSIVE
STRICT = pb.PeerAuthentication.STRICT
SPIFFE = "spiffe://"


def is_tls_record(data: bytes) -> bool:
    """Whether ``data`` begins as a TLS handshake record does (content type 22, version 3.x):
    what a ClientHello starts with."""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


# ---- identities -----------------------------------------------------------------------------------------


class PeerRefused(ConnectionError):
    """The peer completed a handshake, but is not who may be talked to (or mTLS cannot be spoken yet):
    a connection failure like any other to those who catch OSError."""


class Peer:
    """The verified identity of the other end of a connection."""

    __slots__ = ("namespace", "principal", "service_account", "spiffe_id", "trust_domain")

    def __init__(self, spiffe_id: str) -> None:
        self.spiffe_id = spiffe_id
        self.principal = spiffe_id[len(SPIFFE) :]  # Istio's "cluster.local/ns/x/sa/y"
        self.trust_domain, _, path = self.principal.partition("/")
        parts = path.split("/")
        self.namespace = parts[1] if len(parts) >= 2 and parts[0] == "ns" else ""
        self.service_account = parts[3] if len(parts) >= 4 and parts[2] == "sa" else ""

    def __repr__(self) -> str:
        return f"<Peer {self.spiffe_id}>"


def peer_spiffe_id(peercert: dict | None) -> str:
    """The only URI SAN of a verified peer certificate (``getpeercert()``'s dict), a SPIFFE id;
    PeerRefused when there is none, several, or it is not spiffe://."""
    if not peercert:
        raise PeerRefused("the peer presented no certificate")
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        raise PeerRefused(f"the peer certificate has {len(uris)} URI SANs, not one SPIFFE id")
    uri = uris[0]
    if not uri.startswith(SPIFFE) or "/" not in uri[len(SPIFFE) :]:
        raise PeerRefused(f"the peer certificate's URI SAN {uri!r} is not a SPIFFE id")
    return uri


def check_peer(peercert: dict | None, trust_domain: str, allowed: frozenset[str] | None = None) -> Peer:
    """The peer of a completed handshake, if it may be talked to: its SPIFFE id in ``trust_domain``
    (any, when empty) and, when ``allowed`` is given (non-empty), one of those ids. PeerRefused otherwise."""
    spiffe_id = peer_spiffe_id(peercert)
    peer = Peer(spiffe_id)
    if trust_domain and peer.trust_domain != trust_domain:
        raise PeerRefused(f"peer {spiffe_id} is not in trust domain {trust_domain}")
    if allowed and spiffe_id not in allowed:
        raise PeerRefused(f"peer {spiffe_id} is not one of the identities allowed ({', '.join(sorted(allowed))})")
    return peer


# ---- contexts -------------------------------------------------------------------------------------------


def _base(context: ssl.SSLContext, chain: bytes, key: bytes, bundle: bytes, alpn: Sequence[str]) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(alpn))
    context.load_verify_locations(cadata=bundle.decode())
    _load_pair(context, chain, key)
    return context


def _load_pair(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    from meshproxy.identity import Credentials

    Credentials(chain, key, b"", "", 0.0, 0.0).load_into(context)


def server_context(chain: bytes, key: bytes, bundle: bytes) -> ssl.SSLContext:
    """The inbound side: present ``chain``/``key``, require a client certificate chaining to ``bundle``."""
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key, bundle, (ALPN, ALPN_TCP))
    context.num_tickets = 0  # nobody resumes: tickets would be work for nothing
    return context


def client_context(chain: bytes, key: bytes, bundle: bytes, alpn: str = ALPN) -> ssl.SSLContext:
    """The outbound side: present ``chain``/``key``, require a server certificate chaining to ``bundle``;
    offer ``alpn`` (h2, or ALPN_TCP for a TCP stream; ALPN_TCP is itself a mesh mark)."""
    offer = (alpn,) if alpn.startswith(ALPN_MARK) else (alpn, ALPN_MARK)
    return _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), chain, key, bundle, offer)


def client_hello_alpn(data: bytes) -> list[str] | None:
    """The ALPN protocols a ClientHello at the start of ``data`` offers ([] when it offers none, or
    ``data`` is not a ClientHello); None when more bytes are needed to tell (its record is incomplete)."""
    if len(data) < 5:
        return None
    if data[0] != 0x16 or data[1] != 0x03:
        return []
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end:
        return None if end <= MAX_HELLO else []
    m = memoryview(data)[5:end]
    try:
        if m[0] != 1:  # not a ClientHello
            return []
        body = m[4 : 4 + int.from_bytes(m[1:4], "big")]
        i = 2 + 32  # client_version, random
        i += 1 + body[i]  # session_id
        i += 2 + int.from_bytes(body[i : i + 2], "big")  # cipher_suites
        i += 1 + body[i]  # compression_methods
        ext_end = i + 2 + int.from_bytes(body[i : i + 2], "big")
        i += 2
        while i + 4 <= ext_end:
            kind = int.from_bytes(body[i : i + 2], "big")
            size = int.from_bytes(body[i + 2 : i + 4], "big")
            if kind == 16:  # application_layer_protocol_negotiation
                ext = body[i + 4 : i + 4 + size]
                out, j, n = [], 2, 2 + int.from_bytes(ext[0:2], "big")
                while j < n:
                    k = ext[j]
                    out.append(bytes(ext[j + 1 : j + 1 + k]).decode("ascii", "replace"))
                    j += 1 + k
                return out
            i += 4 + size
    except IndexError:  # a ClientHello cut short or malformed: not ours
        return []
    return []


def is_mesh_hello(alpn: list[str]) -> bool:
    """Whether a ClientHello offering ``alpn`` is a sidecar's (the mesh's mTLS)."""
    return any(p.startswith(ALPN_MARK) for p in alpn)


# ---- per worker ---------------------------------------------------------------------------------------------


class Security:
    """A worker's mTLS state: its contexts, and the config's ``Security`` compiled.

    ``enabled`` False (the config has no ``Security``): plaintext both ways, no authorization;
    nothing here is consulted on a connection. ``server``/``client`` are None until there is a
    certificate and a trust bundle: an mTLS connection either way then fails (and says why).
    """

    __slots__ = (
        "_bundle",
        "_chain",
        "_key",
        "authz",
        "client",
        "client_tcp",
        "contexts_built",
        "enabled",
        "handshake_failures",
        "mode",
        "peers_refused",
        "plaintext_refused",
        "port_modes",
        "server",
        "spiffe_id",
        "trust_domain",
    )

    def __init__(self) -> None:
        self.enabled = False
        self.trust_domain = ""
        self.mode = PERMISSIVE
        self.port_modes: dict[int, int] = {}
        self.authz: Policies | None = None
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        self.client_tcp: ssl.SSLContext | None = None
        self.spiffe_id = ""
        self._chain = b""
        self._key = b""
        self._bundle = b""
        self.contexts_built = 0
        # Counters for metrics and tests.
        self.handshake_failures = 0
        self.peers_refused = 0
        self.plaintext_refused = 0

    # -- config -------------------------------------------------------------------------------------------

    def configure(self, msg: Any | None) -> None:
        """Take the config's ``Security`` (None or unset: no mTLS)."""
        from meshproxy import authz

        if msg is None:
            self.enabled = False
            self.authz = None
            return
        self.enabled = True
        self.trust_domain = msg.trust_domain
        pa = msg.peer_authentication
        self.mode = pa.mode or PERMISSIVE
        self.port_modes = {port: mode for port, mode in pa.port_modes.items() if mode != UNSET}
        self.authz = authz.compile_policies(msg.authorization) if msg.HasField("authorization") else None
        if msg.trust_bundle:
            self.set_trust_bundle(msg.trust_bundle)

    def mode_for(self, port: int) -> int:
        """The inbound mode of workload port ``port``."""
        return self.port_modes.get(port, self.mode) if self.port_modes else self.mode

    # -- material -------------------------------------------------------------------------------------------

    def update(self, creds: Any) -> None:
        """A new identity (``meshproxy.identity.Credentials``, or anything with ``cert_chain``, ``key``,
        ``trust_bundle`` and ``spiffe_id``): new contexts for the next handshakes. An empty trust bundle
        keeps the one there is (the config's)."""
        self._chain = creds.cert_chain
        self._key = creds.key
        self.spiffe_id = getattr(creds, "spiffe_id", "")
        if creds.trust_bundle:
            self._bundle = creds.trust_bundle
        self._rebuild()

    def set_trust_bundle(self, pems: Sequence[str] | bytes) -> None:
        """The roots peers must chain to (PEM strings, or their concatenation); new contexts if they changed."""
        bundle = (
            pems if isinstance(pems, bytes) else "".join(p if p.endswith("\n") else p + "\n" for p in pems).encode()
        )
        if bundle != self._bundle:
            self._bundle = bundle
            self._rebuild()

    def _rebuild(self) -> None:
        if not (self._chain and self._key and self._bundle):
            return
        try:
            server = server_context(self._chain, self._key, self._bundle)
            client = client_context(self._chain, self._key, self._bundle)
            client_tcp = client_context(self._chain, self._key, self._bundle, ALPN_TCP)
        except (ssl.SSLError, ValueError, OSError) as e:
            # The contexts in force stay: a bad push must not take the sidecar's identity away.
            log.error("cannot load the workload certificate or trust bundle: %s", e)
            return
        self.server, self.client, self.client_tcp = server, client, client_tcp
        self.contexts_built += 1
        log.debug("TLS contexts rebuilt (%d)", self.contexts_built)


def install(worker: Any, identity: Any = None) -> Security:
    """Give ``worker`` its ``Security`` (``worker.security``), kept in line with every config the worker
    takes and, when given, with ``identity`` (a ``meshproxy.identity.IdentityClient``): each new
    certificate rebuilds the contexts, and the config's trust bundle is handed to it."""
    sec = getattr(worker, "security", None)
    if not isinstance(sec, Security):
        sec = Security()
        worker.security = sec

    def on_config(runtime: Any) -> None:
        cfg = runtime.config
        try:
            sec.configure(cfg.security if cfg.HasField("security") else None)
        except Exception:  # validated before: a bug here must not stop the config swap
            log.exception("cannot apply the security config")
        if identity is not None and cfg.HasField("security") and cfg.security.trust_bundle:
            identity.set_trust_bundle(list(cfg.security.trust_bundle))

    worker.on_config.append(on_config)
    if worker.runtime is not None:
        on_config(worker.runtime)
    if identity is not None:
        identity.add_listener(sec.update)
        if identity.current is not None:
            sec.update(identity.current)
    return sec


def security_of(worker: Any) -> Security | None:
    """The worker's ``Security`` when mTLS is configured, else None."""
    sec = getattr(worker, "security", None)
    return sec if sec is not None and sec.enabled else None


def upstream_args(worker: Any, endpoint: Any, alpn: str = ALPN) -> dict[str, Any]:
    """Keyword arguments of ``loop.create_connection`` (or ``asyncio.open_connection``) to ``endpoint``
    (a ``meshproxy.upstream.Endpoint``): none when it is spoken to in plaintext, else the worker's client
    context (offering ``alpn``), no SNI, the handshake timeout. PeerRefused when mTLS is due but there
    is no workload certificate yet."""
    if not endpoint.mtls:
        return {}
    sec = security_of(worker)
    context = None
    if sec is not None:
        context = sec.client if alpn == ALPN else sec.client_tcp
    if context is None:
        raise PeerRefused("mTLS, but no workload certificate yet")
    return {"ssl": context, "server_hostname": "", "ssl_handshake_timeout": HANDSHAKE_TIMEOUT}


def upstream_peer(worker: Any, endpoint: Any, peercert: dict | None) -> Peer:
    """The server of an mTLS connection to ``endpoint``, if it is one the endpoint's cluster allows
    (``check_peer`` with the trust domain and the cluster's ``allowed_spiffe_ids``); PeerRefused if not."""
    sec = security_of(worker)
    return check_peer(peercert, sec.trust_domain if sec is not None else "", endpoint.cluster.allowed_ids)


# ---- accepting a TLS connection -------------------------------------------------------------------------


class _Handshake(asyncio.Protocol):
    """The application side of an accepted TLS connection until the peer is checked."""

    __slots__ = ("on_ready", "sec", "what")

    def __init__(self, sec: Security, on_ready: Callable[[Any, Peer], None], what: str) -> None:
        self.sec = sec
        self.on_ready = on_ready
        self.what = what

    def connection_made(self, transport: Any) -> None:
        sec = self.sec
        try:
            peer = check_peer(transport.get_extra_info("peercert"), sec.trust_domain)
        except PeerRefused as e:
            sec.peers_refused += 1
            log.info("%s: %s: connection closed", self.what, e)
            transport.abort()
            return
        self.on_ready(transport, peer)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - on_ready replaces this protocol
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _new_ssl_protocol(loop: Any, app: Any, context: ssl.SSLContext, waiter: Any, server_side: bool) -> Any:
    cls = (
        _UvSSLProtocol if _UvSSLProtocol is not None and type(loop).__module__.startswith("uvloop") else _AioSSLProtocol
    )
    return cls(
        loop,
        app,
        context,
        waiter,
        server_side,
        None,
        call_connection_made=True,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )


def accept(
    loop: Any, transport: Any, data: bytes, sec: Security, on_ready: Callable[[Any, Peer], None], what: str
) -> bool:
    """Terminate TLS on an accepted ``transport`` whose first bytes ``data`` were already read.

    ``on_ready(tls_transport, peer)`` is called once the handshake is done and the peer is one of
    the trust domain; it must give ``tls_transport`` its protocol (``set_protocol`` then
    ``connection_made``). A failed handshake, or a refused peer, closes the connection and is
    logged and counted. False (and the connection closed) when there is no certificate yet."""
    context = sec.server
    if context is None:
        log.warning("%s: TLS, but no workload certificate yet: connection closed", what)
        transport.abort()
        return False
    waiter = loop.create_future()
    waiter.add_done_callback(lambda f: _handshake_done(f, sec, what))
    proto = _new_ssl_protocol(loop, _Handshake(sec, on_ready, what), context, waiter, True)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if data:
        _feed(proto, data)
    return True


def _feed(proto: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buf = proto.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


def _handshake_done(f: asyncio.Future, sec: Security, what: str) -> None:
    if f.cancelled():
        return
    exc = f.exception()
    if exc is not None:
        sec.handshake_failures += 1
        log.info("%s: TLS handshake failed: %s", what, describe(exc))


def describe(exc: BaseException) -> str:
    """A TLS failure in a few words (OpenSSL's reason when there is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return str(exc) or type(exc).__name__
