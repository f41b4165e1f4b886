"""The sidecar's workload identity: its key, its certificate from the control plane, and renewing it.

Owns the client side of ``meshproxy.v1.MeshControl/SignCertificate``. The private key is an ECDSA P-256
key made in memory for each certificate and never written anywhere; the CSR names the SPIFFE id the
sidecar expects (``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``), though the control
plane takes the identity from the token alone. The call goes over our own sans-IO HTTP/2 client
connection, as the config stream does (``meshproxy.subscription``): no grpcio in the sidecar.

The token proves who the sidecar is. ``token_source`` is called before each request, so a projected
service-account token that the kubelet rotates is read afresh each time. ``file_token_source`` reads one
from a file: in a pod ``/var/run/secrets/meshproxy/token`` (the injector mounts it, audience
``meshproxy``); a local sidecar is given a bootstrap token the same way, by a file the operator writes
(``MESHPROXY_TOKEN_FILE``), never by a command-line argument, which other users could read in ``ps``.

``IdentityClient`` keeps one identity current: it asks for a certificate at start, renews it at about
half its life (uniformly within ``renew_at`` ± ``jitter`` of it, so a fleet started together does not
renew together) and, when a request fails, retries with full-jitter exponential backoff (1 s up to 60 s).
The current certificate stays in use until a new one arrives, so a failed renewal costs nothing while the
old one lasts. ``current`` is the ``Credentials`` (chain, key, trust bundle) in force; every change (a new
certificate, or a new trust bundle from the config stream: ``set_trust_bundle``) calls the listeners,
which is how the TLS layer learns to load them into its contexts for the next handshakes (connections up
keep theirs: renewal drops nothing).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from meshproxy import __version__
from meshproxy.config import parse_address
from meshproxy.config.v1.control_pb2 import SignCertificateRequest, SignCertificateResponse
from meshproxy.conn import h2conn as h2
from meshproxy.wire import FramingError, MessageReader, grpc_frame

__all__ = [
    "DEFAULT_TOKEN_FILE",
    "Credentials",
    "IdentityClient",
    "SignError",
    "file_token_source",
    "make_csr",
    "new_key",
    "sign_certificate",
    "spiffe_id_of",
]

log = logging.getLogger("meshproxy.identity")

SIGN_PATH = b"/meshproxy.v1.MeshControl/SignCertificate"
DEFAULT_TOKEN_FILE = "/var/run/secrets/meshproxy/token"
TOKEN_FILE_ENV = "MESHPROXY_TOKEN_FILE"
CALL_TIMEOUT = 10.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


class SignError(Exception):
    """A SignCertificate call failed; ``status`` is the grpc-status (-1: no gRPC answer at all)."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Credentials:
    """One identity: PEM bytes ready for ``ssl``, and what the certificate says."""

    cert_chain: bytes  # the leaf, then any intermediates
    key: bytes  # PKCS#8, unencrypted: kept in memory only
    trust_bundle: bytes  # the roots, concatenated
    spiffe_id: str
    not_before: float  # seconds since the epoch
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def load_into(self, context: ssl.SSLContext) -> None:
        """Make ``context`` present this certificate and trust these roots from its next handshake on.

        ``ssl`` loads a key pair only from a file: an anonymous memory file where there is one, else a
        private temporary file removed at once (the sidecar's root filesystem is read-only in a pod, where
        memfd exists)."""
        pem = self.cert_chain + self.key
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("meshproxy-identity", os.MFD_CLOEXEC)
            try:
                os.write(fd, pem)
                context.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        else:  # pragma: no cover - not Linux
            with tempfile.NamedTemporaryFile(prefix="meshproxy-identity-", suffix=".pem") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(pem)
                f.flush()
                context.load_cert_chain(f.name)
        if self.trust_bundle:
            context.load_verify_locations(cadata=self.trust_bundle.decode())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str = "") -> bytes:
    """A PEM CSR for ``key``, naming ``spiffe_id`` as its URI SAN when given."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def spiffe_id_of(cert: x509.Certificate) -> str:
    """The certificate's spiffe:// URI SAN ("" if it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri
    return ""


def file_token_source(path: str | os.PathLike | None = None) -> Callable[[], str]:
    """A token source reading ``path`` at each call (default: ``$MESHPROXY_TOKEN_FILE``, else the
    projected token's path in a pod)."""
    chosen = Path(path or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE)

    def read() -> str:
        try:
            return chosen.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise SignError(f"cannot read the token from {chosen}: {reason}") from None

    return read


# ---- one call -----------------------------------------------------------------------------------------------


def _status_message(stream: Any) -> tuple[int, str]:
    message = b""
    for name, value in stream.trailers or stream.headers or ():
        if name == b"grpc-message":
            message = value
    return stream.grpc_status, " ".join(unquote(message.decode("utf-8", "replace")).split())


async def sign_certificate(
    address: str, request: SignCertificateRequest, *, timeout: float = CALL_TIMEOUT
) -> SignCertificateResponse:
    """One ``SignCertificate`` call to the control plane at ``address`` (host:port); SignError if it fails."""
    host, port = parse_address(address)
    try:
        async with asyncio.timeout(timeout):
            return await _call(host, port, address, request)
    except TimeoutError:
        raise SignError(f"no answer within {timeout:g}s", 4) from None
    except OSError as e:
        raise SignError(f"cannot reach the control plane: {e.strerror or e}", 14) from None


async def _call(host: str, port: int, authority: str, request: SignCertificateRequest) -> SignCertificateResponse:
    reader, writer = await asyncio.open_connection(host, port)
    conn = None
    try:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h2.H2Connection(True, None, None)
        conn.initiate()
        stream = conn.open_stream(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", SIGN_PATH),
                (b":authority", authority.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"user-agent", f"meshproxy/{__version__}".encode()),
            ]
        )
        conn.send_data(stream, grpc_frame(request.SerializeToString()), True)
        writer.write(conn.data_to_send())
        messages = MessageReader()
        received: list[bytes] = []
        while True:
            data = await reader.read(1 << 16)
            if not data:
                raise SignError("the control plane closed the connection", 14)
            for ev in conn.receive(data) or ():
                kind = ev[0]
                if kind == h2.EV_DATA:
                    try:
                        received.extend(messages.feed(ev[2]))
                    except FramingError as e:
                        raise SignError(f"the control plane sent {e}", 13) from None
                elif kind == h2.EV_GOAWAY and ev[2]:
                    raise SignError(f"the control plane sent GOAWAY (error code {ev[2]})", 14)
                elif kind == h2.EV_TERMINATED:
                    raise SignError(f"HTTP/2 connection error {ev[1]}: {ev[2]}", 14)
            out = conn.data_to_send()
            if out:
                writer.write(out)
            if stream.recv_end or stream.state == "closed":
                break
        status, message = _status_message(stream)
        if stream.status != 200:
            raise SignError(f"not a gRPC response: HTTP status {stream.status}", 14)
        if status != 0:
            detail = f": {message}" if message else ""
            raise SignError(f"grpc-status {status}{detail}", status)
        if len(received) != 1:
            raise SignError(f"expected one response message, got {len(received)}", 13)
        try:
            return SignCertificateResponse.FromString(received[0])
        except DecodeError as e:
            raise SignError(f"a SignCertificateResponse that does not parse: {e}", 13) from None
    finally:
        if conn is not None and not conn.terminated and not writer.is_closing():
            conn.close()
            writer.write(conn.data_to_send())
        writer.close()


# ---- keeping an identity current --------------------------------------------------------------------------------


def _credentials(response: SignCertificateResponse, key: ec.EllipticCurvePrivateKey) -> Credentials:
    if not response.cert_chain:
        raise SignError("the response has no certificate", 13)
    try:
        leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
        for pem in [*response.cert_chain[1:], *response.trust_bundle]:
            x509.load_pem_x509_certificates(pem.encode())
    except ValueError as e:
        raise SignError(f"the response holds an unreadable certificate: {e}", 13) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise SignError("the certificate is not for our key", 13)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Credentials(
        cert_chain="".join(_line_end(p) for p in response.cert_chain).encode(),
        key=key_pem,
        trust_bundle="".join(_line_end(p) for p in response.trust_bundle).encode(),
        spiffe_id=spiffe_id_of(leaf),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def _line_end(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"


class IdentityClient:
    """Keeps this sidecar's certificate current (see the module's docstring).

    ``namespace``/``service_account``/``trust_domain`` only name the SPIFFE id put in the CSR; what the
    certificate says is what the token proves (``current.spiffe_id``)."""

    def __init__(
        self,
        address: str,
        token_source: Callable[[], str],
        *,
        namespace: str = "",
        service_account: str = "",
        trust_domain: str = "cluster.local",
        validity_seconds: int = 0,
        renew_at: float = 0.5,
        jitter: float = 0.05,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        timeout: float = CALL_TIMEOUT,
        clock: Callable[[], float] = time.time,
        rng: random.Random | Any = random,
    ) -> None:
        if not 0 < renew_at - jitter and renew_at + jitter < 1:
            raise ValueError("need 0 < renew_at - jitter and renew_at + jitter < 1")
        self.address = address
        self.token_source = token_source
        self.namespace = namespace
        self.service_account = service_account
        self.trust_domain = trust_domain
        self.validity_seconds = validity_seconds
        self.renew_at = renew_at
        self.jitter = jitter
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self.clock = clock
        self.rng = rng
        self.current: Credentials | None = None
        self.renewals = 0
        self.failures = 0
        self.last_error = ""
        self._listeners: list[Callable[[Credentials], None]] = []
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Event | None = None

    # -- what the TLS layer uses ------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[Credentials], None]) -> None:
        """``callback(credentials)`` on every change from now on (on the loop's thread)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Credentials], None]) -> None:
        self._listeners.remove(callback)

    def _publish(self, creds: Credentials) -> None:
        self.current = creds
        if self._ready is not None:
            self._ready.set()
        for cb in list(self._listeners):
            try:
                cb(creds)
            except Exception:
                log.exception("identity listener %r failed", cb)

    def set_trust_bundle(self, pems: Sequence[str]) -> None:
        """The trust bundle from the config stream (``Security.trust_bundle``): newer than the one the last
        certificate came with when a root rotation starts."""
        bundle = "".join(_line_end(p) for p in pems).encode()
        if self.current is not None and self.current.trust_bundle != bundle:
            self._publish(replace(self.current, trust_bundle=bundle))

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE id asked for."""
        if not (self.namespace and self.service_account):
            return ""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    # -- one renewal --------------------------------------------------------------------------------------

    async def refresh(self) -> Credentials:
        """Ask for a new certificate now; publish and return it (SignError if the call fails)."""
        token = self.token_source()
        key = new_key()
        request = SignCertificateRequest(
            csr=make_csr(key, self.spiffe_id).decode(), token=token, validity_seconds=self.validity_seconds
        )
        response = await sign_certificate(self.address, request, timeout=self.timeout)
        creds = _credentials(response, key)
        self.renewals += 1
        self._publish(creds)
        expires = datetime.datetime.fromtimestamp(creds.not_after, datetime.UTC)
        log.info("certificate for %s, valid until %s", creds.spiffe_id, f"{expires:%Y-%m-%d %H:%M:%S}Z")
        return creds

    def renew_delay(self, creds: Credentials) -> float:
        """Seconds from now until ``creds`` should be renewed: at renew_at ± jitter of its life."""
        fraction = self.renew_at + self.rng.uniform(-self.jitter, self.jitter)
        return max(0.0, creds.not_before + creds.lifetime * fraction - self.clock())

    def retry_delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base x 2^attempt)]; never past the current certificate's end."""
        delay = self.rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** min(attempt, 32)))
        if self.current is not None:
            left = self.current.not_after - self.clock()
            if left > 0:
                delay = min(delay, max(left / 2, 0.1))
        return delay

    # -- the loop -------------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        self._ready = asyncio.Event()
        if self.current is not None:
            self._ready.set()
        self._task = loop.create_task(self._run())

    async def wait_ready(self) -> Credentials:
        """The first certificate (waits for it)."""
        if self._ready is None:
            raise RuntimeError("start() first")
        await self._ready.wait()
        return self.current

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                creds = await self.refresh()
            except (SignError, ValueError) as e:
                self.failures += 1
                self.last_error = str(e)
                delay = self.retry_delay(attempt)
                attempt += 1
                left = ""
                if self.current is not None:
                    left = f"; the current certificate ends in {max(0.0, self.current.not_after - self.clock()):.0f}s"
                level = logging.ERROR if getattr(e, "status", -1) in (3, 16) else logging.WARNING
                log.log(level, "certificate from %s: %s%s; again in %.1fs", self.address, e, left, delay)
                await asyncio.sleep(delay)
                continue
            except Exception as e:  # a bug here must not end renewals for good
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("certificate from %s failed", self.address)
                await asyncio.sleep(self.retry_delay(attempt))
                attempt += 1
                continue
            attempt = 0
            await asyncio.sleep(self.renew_delay(creds))
