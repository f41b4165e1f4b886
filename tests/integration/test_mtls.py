"""Sidecar-to-sidecar mTLS and authorization with real TLS (OpenSSL via uvloop), real grpcio
clients and a real grpcio backend.

Two in-process workers on one uvloop loop in a thread: the client's sidecar (listener
``outbound``, plaintext from the app, cluster ``backend`` with ISTIO_MUTUAL to the server's
sidecar) and the server's sidecar (listener ``inbound``, ``meshproxy.transparent.InboundProtocol``,
in front of the grpcio backend). Certificates come from a test CA made with ``cryptography``
(tests/tls/pki.py) and are loaded with ``Security.update`` as ``meshproxy.identity`` does it.

Covered: STRICT refuses plaintext, a certificate of another CA, an expired one, one with a
SPIFFE id of another trust domain and no certificate at all; PERMISSIVE serves both; an
upstream whose identity is not allowed, or whose CA is not trusted, or which refuses our
certificate is a connect failure (UNAVAILABLE, flag UF, the TLS reason); renewal and a root
rotation under grpcio load lose no request; authorization decides per call (PERMISSION_DENIED
for gRPC, 403 for HTTP), and the deciding policy and the peer's identity reach the
completion hooks (what the access log and metrics read).

The transparent inbound listener is tested the same way, its original destination given by a
stand-in for SO_ORIGINAL_DST (the ``redirect`` fixture): port-level modes, an app's own TLS
passed through in PERMISSIVE, and TCP between sidecars inside mTLS. Last, with real processes,
local mode end to end (``meshproxy-control`` signing both sidecars' certificates) and active
health checks over mTLS: those two skip, saying why, until the lead's worker.py/cli.py/health.py
changes are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import uvloop

from meshproxy import config, tls, transparent
from meshproxy.downstream import DownstreamProtocol
from meshproxy.transport import listening_socket
from meshproxy.worker import Worker
from tests.integration import harness
from tests.integration.harness import H2Client
from tests.tls.pki import CA, TRUST_DOMAIN, spiffe

HOST = harness.HOST
TIMEOUT = 10.0
SERVICE = "test.Echo"
ECHO = f"/{SERVICE}/Echo"
FORBIDDEN = f"/{SERVICE}/Forbidden"
WEB = spiffe("shop", "web")  # the client's workload
BACKEND = spiffe("shop", "backend")  # the server's workload
#: grpcio shares connections between channels to one address unless told not to.
LOCAL_POOL = ("grpc.use_local_subchannel_pool", 1)


# -- the loop thread and in-process sidecars ---------------------------------------------------------


class LoopThread:
    """A uvloop event loop running in a thread; ``run`` a coroutine or ``call`` a function on it."""

    def __init__(self, new_loop=uvloop.new_event_loop) -> None:
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mtls-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def go():
            return fn(*args)

        return self.run(go())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@dataclass
class InProcessSidecar:
    worker: Worker
    sec: tls.Security
    port: int
    servers: list = field(default_factory=list)
    completed: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def security(bundle: bytes, mode: str = "STRICT", policies: list | None = None) -> dict:
    out: dict = {
        "trust_domain": TRUST_DOMAIN,
        "trust_bundle": [bundle.decode()],
        "peer_authentication": {"mode": mode},
    }
    if policies:
        out["authorization"] = {"policies": policies}
    return out


def server_config(port: int, backend: str, sec: dict, version: str = "1") -> dict:
    return {
        "version": version,
        "listeners": [
            {
                "name": transparent.INBOUND_LISTENER,
                "address": f"{HOST}:{port}",
                "virtual_hosts": [
                    {"name": "app", "domains": ["*"], "routes": [{"route": {"clusters": [{"cluster": "app"}]}}]}
                ],
            }
        ],
        "clusters": [{"name": "app", "endpoints": [{"address": backend}], "connect_timeout": "1s"}],
        "security": sec,
    }


def client_config(port: int, upstream: str, bundle: bytes, allowed: list[str] | None = None, **cluster) -> dict:
    tls_settings: dict = {"mode": "ISTIO_MUTUAL"}
    if allowed is not None:
        tls_settings["allowed_spiffe_ids"] = allowed
    return {
        "version": "1",
        "listeners": [
            {
                "name": "outbound",
                "address": f"{HOST}:{port}",
                "virtual_hosts": [
                    {"name": "backend", "domains": ["*"], "routes": [{"route": {"clusters": [{"cluster": "backend"}]}}]}
                ],
            }
        ],
        "clusters": [
            {
                "name": "backend",
                "endpoints": [{"address": upstream}],
                "connect_timeout": "2s",
                "tls": tls_settings,
                **cluster,
            }
        ],
        "security": {"trust_domain": TRUST_DOMAIN, "trust_bundle": [bundle.decode()]},
    }


async def _start(cfg: dict, creds, listener: str, protocol) -> InProcessSidecar:
    loop = asyncio.get_running_loop()
    worker = Worker(config.from_dict(cfg), loop)
    sec = tls.install(worker)
    if creds is not None:
        sec.update(creds)
    port = int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])
    sidecar = InProcessSidecar(worker, sec, port)
    worker.on_complete.append(
        lambda req: sidecar.completed.append(
            (req.down.path, req.source_principal, req.connection_security_policy, req.authz_policy, req.response_flags)
        )
    )
    server = await loop.create_server(lambda: protocol(worker, listener), sock=listening_socket(HOST, port))
    sidecar.servers.append(server)
    return sidecar


async def _stop(sidecar: InProcessSidecar) -> None:
    for server in sidecar.servers:
        server.close()
    for p in list(sidecar.worker.downstreams) + list(sidecar.worker.upstreams):
        p._close()
    await asyncio.sleep(0.05)


class Mesh:
    """The two sidecars and the backend of one test."""

    def __init__(self, lt: LoopThread, backend: str, ca: CA) -> None:
        self.lt = lt
        self.backend = backend
        self.ca = ca
        self.server: InProcessSidecar | None = None
        self.client: InProcessSidecar | None = None

    def start_server(
        self,
        mode: str = "STRICT",
        policies: list | None = None,
        creds=None,
        bundle: bytes | None = None,
        redirected: bool = False,
        port_modes: dict | None = None,
    ):
        """The server's sidecar: its inbound listener in front of the backend, a plain one
        (``InboundProtocol``) or, ``redirected``, a transparent one (whose connections must have
        an original destination: see the ``redirect`` fixture)."""
        port = harness.free_port()
        sec = security(bundle or self.ca.pem, mode, policies)
        if port_modes:
            sec["peer_authentication"]["port_modes"] = port_modes
        cfg = server_config(port, self.backend, sec)
        protocol = transparent.InboundProtocol
        if redirected:
            cfg["listeners"][0] = {
                "name": transparent.INBOUND_LISTENER,
                "address": f"{HOST}:{port}",
                "transparent": True,
            }
            cfg["clusters"] = []
            protocol = transparent.TransparentProtocol
        creds = creds if creds is not None else self.ca.issue(BACKEND)
        self.server = self.lt.run(_start(cfg, creds, transparent.INBOUND_LISTENER, protocol))
        return self.server

    def start_client(self, allowed: list[str] | None = None, creds=None, bundle: bytes | None = None, **cluster):
        port = harness.free_port()
        cfg = client_config(port, self.server.address, bundle or self.ca.pem, allowed, **cluster)
        creds = creds if creds is not None else self.ca.issue(WEB)
        self.client = self.lt.run(_start(cfg, creds, "outbound", DownstreamProtocol))
        return self.client

    def stop(self) -> None:
        for s in (self.client, self.server):
            if s is not None:
                self.lt.run(_stop(s))


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("mesh root")


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    def echo(request: bytes, context) -> bytes:
        return request

    def forbidden(request: bytes, context) -> bytes:
        return b"should not be reached"

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Forbidden": grpc.unary_unary_rpc_method_handler(forbidden),
    }
    with harness.grpc_server(handlers, SERVICE, workers=32) as address:
        yield address


@pytest.fixture
def mesh(request: pytest.FixtureRequest, backend: str, ca: CA) -> Iterator[Mesh]:
    """The test's mesh on uvloop (indirect parametrization with "asyncio": the stdlib loop)."""
    lt = LoopThread(
        asyncio.new_event_loop if getattr(request, "param", "uvloop") == "asyncio" else uvloop.new_event_loop
    )
    m = Mesh(lt, backend, ca)
    try:
        yield m
    finally:
        m.stop()
        lt.close()


# -- clients -------------------------------------------------------------------------------------------


def call(address: str, method: str = ECHO, body: bytes = b"ping", timeout: float = TIMEOUT):
    """One unary call on a connection of its own; (status code, details, trailing metadata as a dict,
    response or None)."""
    with grpc.insecure_channel(address, options=[*harness.CLIENT_OPTIONS, LOCAL_POOL]) as ch:
        try:
            reply = ch.unary_unary(method)(body, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details(), dict(e.trailing_metadata() or ()), None
        return grpc.StatusCode.OK, "", {}, reply


def tls_context(creds=None, bundle: bytes | None = None) -> ssl.SSLContext:
    """A client context as a foreign peer would have it: ``creds`` (None: no certificate)."""
    if creds is not None:
        return tls.client_context(creds.cert_chain, creds.key, bundle or creds.trust_bundle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=bundle.decode())
    context.set_alpn_protocols(["h2"])
    return context


class TlsH2Client(H2Client):
    """``harness.H2Client`` over TLS."""

    def __init__(self, address: str, context: ssl.SSLContext, timeout: float = TIMEOUT) -> None:
        import h2.config
        import h2.connection

        host, _, port = address.rpartition(":")
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock = context.wrap_socket(raw)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.responses = {}
        self.goaway = None
        self.closed = False
        self._inbuf = bytearray()
        self._flush()


def tls_get(address: str, context: ssl.SSLContext, path: str = "/") -> harness.H2Response | Exception:
    """A GET over TLS: its response, or the exception that ended the attempt."""
    try:
        with TlsH2Client(address, context) as client:
            return client.request(path)
    except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
        return e


def refused(outcome) -> bool:
    return isinstance(outcome, Exception) or outcome.status is None


# -- STRICT, PERMISSIVE, DISABLE --------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", ["uvloop", "asyncio"], indirect=True)
def test_strict_mtls_end_to_end_knows_the_peer(mesh: Mesh):
    server = mesh.start_server("STRICT")
    client = mesh.start_client(allowed=[BACKEND])
    code, details, _, reply = call(client.address, body=b"hello")
    assert (code, reply) == (grpc.StatusCode.OK, b"hello"), details
    path, principal, policy, _, _ = server.completed[-1]
    assert (path, principal, policy) == (ECHO.encode(), "cluster.local/ns/shop/sa/web", "mutual_tls")
    # The client's side: one upstream connection, over TLS, to the identity it expected.
    peers = mesh.lt.call(lambda: [p.peer.spiffe_id for p in client.worker.upstreams])
    assert peers == [BACKEND]
    # Outbound requests have no downstream peer.
    assert client.completed[-1][1:3] == ("", "none")


def test_strict_refuses_plaintext(mesh: Mesh):
    server = mesh.start_server("STRICT")
    with H2Client(server.address) as plain:
        response = plain.request("/")
    assert response.status is None and plain.closed
    code, _, _, _ = call(server.address)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert mesh.lt.call(lambda: server.sec.plaintext_refused) >= 2
    assert server.completed == []


@pytest.mark.parametrize("case", ["other-ca", "expired", "other-trust-domain", "no-certificate", "no-spiffe-id"])
def test_strict_refuses_a_bad_client_certificate(mesh: Mesh, ca: CA, case: str):
    server = mesh.start_server("STRICT")
    if case == "other-ca":
        context = tls_context(CA("stranger").issue(WEB), bundle=ca.pem)
    elif case == "expired":
        context = tls_context(ca.issue(WEB, expired=True))
    elif case == "other-trust-domain":
        context = tls_context(ca.issue(spiffe("shop", "web", "evil.local")))
    elif case == "no-spiffe-id":
        context = tls_context(ca.issue(None))
    else:
        context = tls_context(None, bundle=ca.pem)
    assert refused(tls_get(server.address, context))
    failures = mesh.lt.call(lambda: (server.sec.handshake_failures, server.sec.peers_refused))
    if case in ("other-trust-domain", "no-spiffe-id"):
        assert failures == (0, 1)  # a good chain, a refused identity
    else:
        assert harness.poll_until(lambda: mesh.lt.call(lambda: server.sec.handshake_failures) == 1, TIMEOUT)
    assert server.completed == []
    # The worker lives on: a good peer is served.
    good = tls_get(server.address, tls_context(ca.issue(WEB)))
    assert not refused(good)


def test_garbage_after_a_tls_record_header_closes_only_that_connection(mesh: Mesh, ca: CA):
    server = mesh.start_server("PERMISSIVE")
    with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
        sock.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionError):
            while sock.recv(4096):
                pass  # whatever alert it sends, then EOF
    assert harness.poll_until(lambda: mesh.lt.call(lambda: server.sec.handshake_failures) == 1, TIMEOUT)
    assert not refused(tls_get(server.address, tls_context(ca.issue(WEB))))


def test_permissive_serves_mtls_and_plaintext(mesh: Mesh):
    server = mesh.start_server("PERMISSIVE")
    client = mesh.start_client()
    assert call(client.address)[0] == grpc.StatusCode.OK
    assert call(server.address)[0] == grpc.StatusCode.OK  # plaintext, straight from a client without sidecar
    policies = sorted(c[2] for c in server.completed)
    assert policies == ["mutual_tls", "none"]
    assert sorted(c[1] for c in server.completed) == ["", "cluster.local/ns/shop/sa/web"]


def test_disable_serves_plaintext_only(mesh: Mesh, ca: CA):
    server = mesh.start_server("DISABLE")
    assert call(server.address)[0] == grpc.StatusCode.OK
    assert refused(tls_get(server.address, tls_context(ca.issue(WEB))))
    assert [c[2] for c in server.completed] == ["none"]


# -- upstream identity ---------------------------------------------------------------------------------------


def _assert_connect_failure(outcome, *reasons: str) -> None:
    code, details, metadata, _ = outcome
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert metadata.get("x-meshproxy-response-flags") == "UF", metadata
    assert "TLS error" in details, details
    for reason in reasons:
        assert reason in details, details


def test_an_upstream_with_a_wrong_spiffe_id_is_refused(mesh: Mesh):
    server = mesh.start_server("STRICT")
    client = mesh.start_client(allowed=[spiffe("shop", "payments")])
    _assert_connect_failure(call(client.address), BACKEND, "not one of the identities allowed")
    assert server.completed == []
    assert mesh.lt.call(lambda: len(client.worker.upstreams)) == 0


def test_an_upstream_from_another_ca_is_refused(mesh: Mesh, ca: CA):
    stranger = CA("stranger")
    # The server trusts our root (it would accept us); its own certificate is the stranger's.
    mesh.start_server("STRICT", creds=stranger.issue(BACKEND, bundle=ca.pem))
    client = mesh.start_client()
    _assert_connect_failure(call(client.address), "certificate verify failed")


def test_an_upstream_that_refuses_our_certificate_is_a_connect_failure(mesh: Mesh, ca: CA):
    stranger = CA("stranger")
    both = ca.pem + stranger.pem
    # The server's certificate is one we trust, but it trusts only the stranger's root.
    mesh.start_server("STRICT", creds=ca.issue(BACKEND, bundle=stranger.pem), bundle=stranger.pem)
    client = mesh.start_client(bundle=both)
    _assert_connect_failure(call(client.address), "refuse our certificate")


def test_connect_failures_count_for_outlier_detection(mesh: Mesh):
    mesh.start_server("STRICT")
    client = mesh.start_client(
        allowed=[spiffe("shop", "payments")],
        outlier_detection={"consecutive_local_origin_failures": 2, "max_ejection_percent": 100},
    )
    for _ in range(2):
        assert call(client.address)[0] == grpc.StatusCode.UNAVAILABLE
    ejections = mesh.lt.call(lambda: client.worker.runtime.clusters["backend"].state.ejections)
    assert ejections == 1
    code, details, metadata, _ = call(client.address)
    assert (code, metadata.get("x-meshproxy-response-flags")) == (grpc.StatusCode.UNAVAILABLE, "UH"), details


# -- renewal and root rotation under load -----------------------------------------------------------------------


class Load:
    """grpcio unary calls from ``threads`` threads through ``address`` until stopped; counts outcomes."""

    def __init__(self, address: str, threads: int = 8) -> None:
        self.address = address
        self.stop_flag = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with grpc.insecure_channel(self.address, options=list(harness.CLIENT_OPTIONS)) as ch:
            stub = ch.unary_unary(ECHO)
            while not self.stop_flag.is_set():
                try:
                    stub(b"x" * 100, timeout=TIMEOUT)
                    with self.lock:
                        self.ok += 1
                except grpc.RpcError as e:
                    with self.lock:
                        self.failures.append(f"{e.code()}: {e.details()}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(TIMEOUT * 2)

    def wait_for(self, n: int) -> None:
        """Until ``n`` more calls succeeded (bounded)."""
        with self.lock:
            target = self.ok + n
        assert harness.poll_until(lambda: self.ok >= target or len(self.failures) > 0, TIMEOUT, 0.01), "load stalled"


def _reconnect(mesh: Mesh) -> set[str]:
    """Make every next request need new handshakes: GOAWAY on both sides' connections (their streams
    in flight finish). Returns the serial numbers of the server certificates the client's
    connections saw."""

    def go() -> set[str]:
        serials = set()
        for p in list(mesh.client.worker.upstreams):
            cert = p.transport.get_extra_info("peercert") if p.transport is not None else None
            if cert:
                serials.add(cert["serialNumber"])
            p.conn.shutdown()
        for p in list(mesh.server.worker.downstreams):
            p.conn.shutdown()
        mesh.client.worker.outbox.flush()
        mesh.server.worker.outbox.flush()
        return serials

    return mesh.lt.call(go)


def test_renewal_under_load_loses_no_request(mesh: Mesh, ca: CA):
    server = mesh.start_server("STRICT")
    client = mesh.start_client(allowed=[BACKEND], max_concurrent_streams_per_connection=4)
    seen: set[str] = set()
    with Load(client.address) as load:
        load.wait_for(50)
        for _ in range(5):
            mesh.lt.call(server.sec.update, ca.issue(BACKEND))
            mesh.lt.call(client.sec.update, ca.issue(WEB))
            load.wait_for(20)  # on the connections made before the renewal
            seen |= _reconnect(mesh)
            load.wait_for(50)  # on new ones, with the new certificates
    assert load.failures == [], load.failures[:5]
    assert load.ok > 400
    assert len(seen) >= 3, "new handshakes did not use the renewed certificates"
    assert mesh.lt.call(lambda: server.sec.handshake_failures + server.sec.peers_refused) == 0


def test_renewal_keeps_established_connections(mesh: Mesh, ca: CA):
    mesh.start_server("STRICT")
    client = mesh.start_client(allowed=[BACKEND])
    assert call(client.address)[0] == grpc.StatusCode.OK
    before = mesh.lt.call(lambda: list(client.worker.upstreams))
    mesh.lt.call(mesh.server.sec.update, ca.issue(BACKEND))
    mesh.lt.call(client.sec.update, ca.issue(WEB))
    assert call(client.address)[0] == grpc.StatusCode.OK
    assert mesh.lt.call(lambda: list(client.worker.upstreams)) == before


def test_root_rotation_under_load_loses_no_request(mesh: Mesh, ca: CA):
    new_root = CA("mesh root 2")
    both = ca.pem + new_root.pem
    server = mesh.start_server("STRICT")
    client = mesh.start_client(allowed=[BACKEND], max_concurrent_streams_per_connection=4)

    def push_bundle(sidecar: InProcessSidecar, bundle: bytes, version: str) -> None:
        # As the control plane does it: a new config with the new trust bundle.
        cfg = sidecar.worker.runtime.config.__deepcopy__()
        del cfg.security.trust_bundle[:]
        cfg.security.trust_bundle.extend(
            p + "-----END CERTIFICATE-----\n" for p in bundle.decode().split("-----END CERTIFICATE-----\n") if p.strip()
        )
        cfg.version = version
        mesh.lt.call(sidecar.worker.apply, cfg)

    with Load(client.address) as load:
        load.wait_for(50)
        # 1. Every sidecar trusts both roots.
        push_bundle(server, both, "2")
        push_bundle(client, both, "2")
        _reconnect(mesh)
        load.wait_for(50)
        # 2. Certificates come from the new root.
        mesh.lt.call(server.sec.update, new_root.issue(BACKEND, bundle=both))
        mesh.lt.call(client.sec.update, new_root.issue(WEB, bundle=both))
        _reconnect(mesh)
        load.wait_for(50)
        # 3. The old root goes.
        push_bundle(server, new_root.pem, "3")
        push_bundle(client, new_root.pem, "3")
        _reconnect(mesh)
        load.wait_for(50)
    assert load.failures == [], load.failures[:5]
    # From now on a certificate of the old root is refused.
    assert refused(tls_get(server.address, tls_context(ca.issue(WEB), bundle=both)))
    assert not refused(tls_get(server.address, tls_context(new_root.issue(WEB), bundle=both)))


# -- authorization ------------------------------------------------------------------------------------------------


POLICIES = [
    {
        "name": "shop/allow-web",
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"principals": [{"exact": "cluster.local/ns/shop/sa/web"}]}],
                "to": [{"paths": [{"prefix": f"/{SERVICE}/"}]}],
            }
        ],
    },
    {"name": "shop/deny-forbidden", "action": "DENY", "rules": [{"to": [{"paths": [{"exact": FORBIDDEN}]}]}]},
    {"name": "shop/audit-all", "action": "AUDIT", "rules": [{}]},
]


def test_authorization_over_mtls(mesh: Mesh):
    server = mesh.start_server("PERMISSIVE", policies=POLICIES)
    client = mesh.start_client()
    assert call(client.address)[0] == grpc.StatusCode.OK
    code, details, metadata, _ = call(client.address, FORBIDDEN)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert details == "RBAC: access denied"
    assert metadata.get("x-meshproxy-response-flags") == "RBAC"
    # Plaintext: no principal, so no ALLOW policy matches: denied by default.
    assert call(server.address)[0] == grpc.StatusCode.PERMISSION_DENIED
    with H2Client(server.address) as plain:
        response = plain.request(ECHO)
    assert response.status == 403
    assert response.headers.get("x-meshproxy-response-flags") == "RBAC"
    records = [(c[0], c[2], c[3], c[4]) for c in server.completed]
    assert records == [
        (ECHO.encode(), "mutual_tls", "shop/allow-web", ""),
        (FORBIDDEN.encode(), "mutual_tls", "shop/deny-forbidden", "RBAC"),
        (ECHO.encode(), "none", "", "RBAC"),
        (ECHO.encode(), "none", "", "RBAC"),
    ]


def test_metrics_and_access_log_name_the_peer_and_the_deciding_policy(mesh: Mesh):
    """Issue 6 item 5 and issue 8: the caller's SPIFFE id and connection_security_policy label the
    inbound request metrics; the access log names the peer and the policy that decided."""
    from types import SimpleNamespace

    from meshproxy.telemetry import accesslog, metrics

    server = mesh.start_server("PERMISSIVE", policies=POLICIES)
    client = mesh.start_client()
    lines: list[bytes] = []

    def install() -> None:
        w = server.worker
        w.recorder = metrics.Recorder(w, SimpleNamespace(metric_names="meshproxy"))
        w.on_complete.append(w.recorder.record)
        w.access_log = accesslog.AccessLog(SimpleNamespace(access_log_sampling=1.0), write=lines.append)
        w.on_complete.append(w.access_log.log)

    mesh.lt.call(install)
    assert call(client.address)[0] == grpc.StatusCode.OK
    assert call(client.address, FORBIDDEN)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert call(server.address)[0] == grpc.StatusCode.PERMISSION_DENIED  # plaintext
    mesh.lt.call(server.worker.access_log.flush)
    families = mesh.lt.call(lambda: metrics.families(server.worker))
    (requests,) = [f for f in families if f.name == "meshproxy_requests_total"]
    seen = sorted(
        (
            m.labels["source_principal"],
            m.labels["connection_security_policy"],
            m.labels["source_workload_namespace"],
            m.labels["response_flags"],
            int(m.value),
        )
        for m in requests.metrics
    )
    assert seen == [
        (WEB, "mutual_tls", "shop", "-", 1),
        (WEB, "mutual_tls", "shop", "RBAC", 1),
        ("unknown", "none", "unknown", "RBAC", 1),
    ]
    logged = [json.loads(line) for chunk in lines for line in chunk.splitlines()]
    assert [(e["path"], e["peer_identity"], e["authz_policy"], e.get("authz_audit")) for e in logged] == [
        (ECHO, WEB, "shop/allow-web", "shop/audit-all"),
        (FORBIDDEN, WEB, "shop/deny-forbidden", "shop/audit-all"),
        (ECHO, None, None, "shop/audit-all"),
    ]


def test_no_policy_checks_nothing(mesh: Mesh):
    server = mesh.start_server("PERMISSIVE")
    assert mesh.lt.call(lambda: server.sec.authz) is None
    assert call(server.address, FORBIDDEN)[0] == grpc.StatusCode.OK
    assert server.completed[-1][3] == ""


def test_a_policy_push_applies_to_connections_already_open(mesh: Mesh):
    server = mesh.start_server("STRICT")
    client = mesh.start_client()
    assert call(client.address, FORBIDDEN)[0] == grpc.StatusCode.OK
    cfg = server.worker.runtime.config.__deepcopy__()
    cfg.security.authorization.policies.add(name="shop/deny-forbidden", action=1).rules.add().to.add().paths.add(
        exact=FORBIDDEN
    )
    cfg.version = "2"
    connections = mesh.lt.call(lambda: list(client.worker.upstreams))
    mesh.lt.call(server.worker.apply, cfg)
    time.sleep(0.01)
    assert call(client.address, FORBIDDEN)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert call(client.address)[0] == grpc.StatusCode.OK
    assert mesh.lt.call(lambda: list(client.worker.upstreams)) == connections


# -- the transparent inbound listener (an original destination as iptables would give it) --------------------


@pytest.fixture
def redirect(monkeypatch) -> dict:
    """Where connections accepted on a transparent listener "were going", by the listener's port
    (what SO_ORIGINAL_DST says after an iptables REDIRECT)."""
    where: dict[int, tuple[str, int]] = {}
    monkeypatch.setattr(transparent, "original_destination", lambda sock: where.get(sock.getsockname()[1]))
    return where


POD_IP = "10.0.0.3"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class EchoServer:
    """A TCP echo server on loopback (the app behind a TCP port)."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def test_transparent_inbound_strict(mesh: Mesh, redirect: dict, backend: str):
    server = mesh.start_server("STRICT", redirected=True)
    redirect[server.port] = (POD_IP, _port(backend))
    client = mesh.start_client(allowed=[BACKEND])
    code, details, _, reply = call(client.address, body=b"through 15006")
    assert (code, reply) == (grpc.StatusCode.OK, b"through 15006"), details
    assert server.completed[-1][1:3] == ("cluster.local/ns/shop/sa/web", "mutual_tls")
    assert call(server.address)[0] == grpc.StatusCode.UNAVAILABLE
    assert mesh.lt.call(lambda: server.sec.plaintext_refused) >= 1  # grpcio may try more than once


def test_transparent_inbound_port_level_modes(mesh: Mesh, redirect: dict, backend: str):
    bport = _port(backend)
    server = mesh.start_server("STRICT", redirected=True, port_modes={bport: "PERMISSIVE"})
    redirect[server.port] = (POD_IP, bport)
    client = mesh.start_client()
    assert call(client.address)[0] == grpc.StatusCode.OK
    assert call(server.address)[0] == grpc.StatusCode.OK
    assert sorted(c[2] for c in server.completed) == ["mutual_tls", "none"]
    # Another port of the workload has the workload's mode.
    redirect[server.port] = (POD_IP, bport + 1 if bport < 65535 else bport - 1)
    assert call(server.address)[0] == grpc.StatusCode.UNAVAILABLE
    assert mesh.lt.call(lambda: server.sec.plaintext_refused) >= 1  # grpcio may try more than once


def test_transparent_inbound_disable_passes_tls_through(mesh: Mesh, redirect: dict, echo: EchoServer, ca: CA):
    server = mesh.start_server("DISABLE", redirected=True)
    redirect[server.port] = (POD_IP, echo.port)
    # The app's own TLS goes to it untouched: the echo server sends our ClientHello back.
    with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as sock:
        hello = bytes.fromhex("160301002e") + bytes(46)
        sock.sendall(hello)
        got = b""
        while len(got) < len(hello):
            chunk = sock.recv(4096)
            assert chunk
            got += chunk
        assert got == hello


def test_tcp_over_mtls_between_sidecars(mesh: Mesh, redirect: dict, echo: EchoServer):
    """A TCP stream (an opaque port) from an app through both sidecars: mTLS between them, ALPN
    meshproxy-tcp; the server's sidecar passes the bytes to its app as they come."""
    server = mesh.start_server("STRICT", redirected=True)
    redirect[server.port] = (POD_IP, echo.port)
    port = harness.free_port()
    service = ("10.96.0.7", 7000)
    cfg = client_config(port, server.address, mesh.ca.pem, [BACKEND])
    cfg["listeners"][0] = {"name": "outbound", "address": f"{HOST}:{port}", "transparent": True, "opaque_ports": [7000]}
    cfg["clusters"][0]["service_addresses"] = [f"{service[0]}:{service[1]}"]
    client = mesh.client = mesh.lt.run(_start(cfg, mesh.ca.issue(WEB), "outbound", transparent.TransparentProtocol))
    redirect[client.port] = service
    data = bytes(range(256)) * 1024
    with socket.create_connection((HOST, client.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        got = bytearray()
        while len(got) < len(data):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
    assert bytes(got) == data
    # What the server's sidecar saw is what a TLS client offering meshproxy-tcp sends.
    creds = mesh.ca.issue(WEB)
    context = tls.client_context(creds.cert_chain, creds.key, mesh.ca.pem, tls.ALPN_TCP)
    with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as raw, context.wrap_socket(raw) as sock:
        assert sock.selected_alpn_protocol() == tls.ALPN_TCP
        sock.sendall(b"direct")
        assert sock.recv(100) == b"direct"
    assert mesh.lt.call(lambda: (server.sec.plaintext_refused, server.sec.handshake_failures)) == (0, 0)


def test_tcp_over_mtls_to_a_wrong_identity_is_closed(mesh: Mesh, redirect: dict, echo: EchoServer):
    server = mesh.start_server("STRICT", redirected=True)
    redirect[server.port] = (POD_IP, echo.port)
    port = harness.free_port()
    service = ("10.96.0.7", 7000)
    cfg = client_config(port, server.address, mesh.ca.pem, [spiffe("shop", "payments")])
    cfg["listeners"][0] = {"name": "outbound", "address": f"{HOST}:{port}", "transparent": True, "opaque_ports": [7000]}
    cfg["clusters"][0]["service_addresses"] = [f"{service[0]}:{service[1]}"]
    client = mesh.client = mesh.lt.run(_start(cfg, mesh.ca.issue(WEB), "outbound", transparent.TransparentProtocol))
    redirect[client.port] = service
    with socket.create_connection((HOST, client.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"secret")
        sock.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionError):
            assert sock.recv(100) == b""


# -- local mode, real processes: control plane (CA, bootstrap tokens), two sidecars ------------------------------


def _has_app_flag() -> bool:
    import argparse

    from meshproxy import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return any("--app" in a.option_strings for a in sub.choices["run"]._actions)


LOCAL_MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: orders, namespace: shop}}
spec:
  hosts: [orders.local]
  ports: [{{number: 8080, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - address: 127.0.0.1
    ports: {{grpc: {inbound}}}
    labels: {{security.istio.io/tlsMode: istio}}
    serviceAccount: orders
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: shop}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-allow-web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/web"]}}}}]
    to: [{{operation: {{paths: ["{echo}"]}}}}]
"""


@pytest.mark.skipif(not _has_app_flag(), reason="meshproxy run has no --app yet (the lead's cli.py/worker.py diff)")
def test_local_mode_end_to_end(tmp_path, backend: str):
    """``meshproxy-control serve --config-dir --bootstrap-tokens`` signs both sidecars' certificates;
    the client's sidecar reaches the server's (``--inbound-listen --app``) over mTLS, STRICT, with
    the AuthorizationPolicy enforced there."""
    inbound, cp_port = harness.free_port(), harness.free_port()
    mesh_dir = tmp_path / "mesh"
    mesh_dir.mkdir()
    (mesh_dir / "mesh.yaml").write_text(LOCAL_MESH.format(inbound=inbound, echo=ECHO))
    tokens = tmp_path / "tokens"
    env = {}
    for sa in ("orders", "web"):
        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "control",
                "add-token",
                "--file",
                str(tokens),
                "--namespace",
                "shop",
                "--service-account",
                sa,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        path = tmp_path / f"token-{sa}"
        path.write_text(token)
        path.chmod(0o600)
        env[sa] = {**os.environ, "MESHPROXY_TOKEN_FILE": str(path)}
    argv = [sys.executable, "-m", "control", "serve", "--config-dir", str(mesh_dir), "--listen", f"{HOST}:{cp_port}"]
    argv += ["--ca-dir", str(tmp_path / "ca"), "--bootstrap-tokens", str(tokens), "--log-level", "info"]
    cp = harness.Process(argv, name="meshproxy-control")
    try:
        harness.wait_listening(HOST, cp_port, 20, alive=cp.alive)
        node = ["--namespace", "shop", "--log-level", "info"]
        server = harness.Sidecar(
            control_plane=f"{HOST}:{cp_port}",
            extra_args=[
                *node,
                "--workload",
                "orders",
                "--labels",
                "app=orders",
                "--inbound-listen",
                f"{HOST}:{inbound}",
                "--app",
                backend,
            ],
            env=env["orders"],
        )
        client = harness.Sidecar(
            control_plane=f"{HOST}:{cp_port}",
            extra_args=[*node, "--workload", "web", "--labels", "app=web"],
            env=env["web"],
        )
        with server, client:
            harness.wait_listening(HOST, inbound, 20, alive=server.process.alive)
            options = [*harness.CLIENT_OPTIONS, LOCAL_POOL, ("grpc.default_authority", "orders.local:8080")]

            def mesh_call(method: str):
                with grpc.insecure_channel(client.address, options=options) as ch:
                    try:
                        return grpc.StatusCode.OK, ch.unary_unary(method)(b"local", timeout=TIMEOUT)
                    except grpc.RpcError as e:
                        return e.code(), e.details()

            # The client's certificate may come a moment after its first config: bounded wait.
            assert harness.poll_until(lambda: mesh_call(ECHO) == (grpc.StatusCode.OK, b"local"), 20, 0.2)
            assert mesh_call(FORBIDDEN) == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")
            assert call(f"{HOST}:{inbound}")[0] == grpc.StatusCode.UNAVAILABLE  # plaintext: STRICT
            assert "plaintext connection refused (mTLS STRICT)" in server.output()
    finally:
        cp.stop(signal.SIGTERM, 10)
        cp.remove_log()


# -- active health checks to an mTLS cluster -----------------------------------------------------------------------


def _health_checks_know_mtls() -> bool:
    import inspect

    from meshproxy.health import HealthChecker

    return "worker" in inspect.signature(HealthChecker).parameters


@contextlib.contextmanager
def healthy_backend() -> Iterator[str]:
    """A grpcio server with grpc.health.v1 (SERVING) besides the echo service."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield f"{HOST}:{port}"
    finally:
        server.stop(grace=None)


HEALTH_CHECK = {"interval": "0.2s", "timeout": "0.2s", "unhealthy_threshold": 1, "healthy_threshold": 1}


@pytest.mark.skipif(not _health_checks_know_mtls(), reason="meshproxy.health without mTLS (the lead's health.py diff)")
@pytest.mark.parametrize("allowed", [BACKEND, spiffe("shop", "payments")], ids=["right-identity", "wrong-identity"])
def test_active_health_checks_speak_mtls(mesh: Mesh, allowed: str):
    """Health checks to an ISTIO_MUTUAL cluster go over mTLS like its requests (a STRICT server would
    otherwise refuse them and every endpoint would be marked unhealthy), and check the identity too."""
    with healthy_backend() as address:
        mesh.backend = address
        server = mesh.start_server("STRICT")
        client = mesh.start_client(allowed=[allowed], health_check=HEALTH_CHECK)
        mesh.lt.call(lambda: client.worker.health.update(client.worker.runtime))
        endpoint = mesh.lt.call(lambda: client.worker.runtime.clusters["backend"].endpoints[0])
        if allowed == BACKEND:
            checked = b"/grpc.health.v1.Health/Check"
            assert harness.poll_until(lambda: any(c[0] == checked for c in server.completed), TIMEOUT)
            assert next(c[2] for c in server.completed if c[0] == checked) == "mutual_tls"
            assert not endpoint.unhealthy
            assert call(client.address)[0] == grpc.StatusCode.OK
        else:
            assert harness.poll_until(lambda: endpoint.unhealthy, TIMEOUT)
            assert server.completed == []
        mesh.lt.call(client.worker.health.stop)


def test_transparent_inbound_permissive_passes_an_apps_own_tls_through(mesh: Mesh, redirect: dict, echo: EchoServer):
    """PERMISSIVE: a ClientHello without the mesh's ALPN mark is the app's own TLS: it reaches the app
    byte for byte (here an echo server, which sends it back)."""
    from tests.tls.test_inbound_detection import client_hello

    server = mesh.start_server("PERMISSIVE", redirected=True)
    redirect[server.port] = (POD_IP, echo.port)
    hello = client_hello(["http/1.1"])
    with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(hello)
        got = b""
        while len(got) < len(hello):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
    assert got == hello
    assert mesh.lt.call(lambda: (server.sec.handshake_failures, server.sec.peers_refused)) == (0, 0)
