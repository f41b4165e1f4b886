"""The mesh CA: its key material, where it is kept, root rotation, and signing workload certificates.

Key material uses the file names of Istio's "plug-in CA" (the ``cacerts`` Secret), in a directory
locally (``DirectoryCAStore``) and in a Secret in cluster (``SecretCAStore``, ``meshproxy-ca`` in the
control plane's namespace):

- ``ca-cert.pem``, ``ca-key.pem``: the signing certificate and its key: a root, or an intermediate
  that a user's own PKI issued;
- ``cert-chain.pem``: ``ca-cert.pem`` and the intermediates above it (a root: itself);
- ``root-cert.pem``: the root(s) to trust; several certificates during a user-driven rotation;
- ``next-ca-cert.pem``, ``next-ca-key.pem``: a self-signed root that is already trusted but not yet
  signing (the first half of a rotation);
- ``previous-root-cert.pem``: the root a rotation replaced, still trusted until every certificate it
  signed has expired: until the time in ``previous-root-until`` (ISO 8601).

When none of it exists, ``ensure()`` creates an ECDSA P-256 root once (10 years). In cluster only the
leader writes (``CAReconciler`` as a ``LeaderTask``: a create is refused with 409 when another replica
won, and a replace carries the resourceVersion read); every replica reads the Secret and signs with what
it holds. A self-signed root is rotated in two steps so that no sidecar ever sees a certificate it cannot
verify: once it is within ``ROOT_RENEW_BEFORE`` of expiry a new root is added to the trust bundle
(``next-*``); ``propagation`` later (the bundle has reached every sidecar over the config stream) it
becomes the signer and the old root moves to ``previous-root-cert.pem``, which is dropped once every
certificate the old root signed has expired (``MAX_VALIDITY`` plus slack after the switch).

``CertificateAuthority.issue`` signs a CSR for an identity the caller has verified (``control.identity``):
the certificate carries exactly one SAN, the URI ``spiffe://<trust-domain>/ns/<namespace>/sa/<sa>``,
whatever the CSR asks for; key usages are Istio's (digitalSignature, keyEncipherment; serverAuth and
clientAuth). ``SignCertificateService`` is the ``MeshControl/SignCertificate`` handler.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import itertools
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_SECRET",
    "DEFAULT_VALIDITY",
    "MAX_VALIDITY",
    "MIN_VALIDITY",
    "CAError",
    "CAKeys",
    "CAReconciler",
    "CertificateAuthority",
    "DirectoryCAStore",
    "InvalidCSR",
    "Issued",
    "SecretCAStore",
    "SignCertificateService",
    "check_csr",
    "spiffe_id",
]

log = logging.getLogger("meshproxy.control.ca")

CA_SECRET = "meshproxy-ca"
DEFAULT_VALIDITY = datetime.timedelta(hours=24)
#: The longest a workload certificate may live, whatever the sidecar asks for.
MAX_VALIDITY = datetime.timedelta(hours=24)
#: The shortest: below it a sidecar would spend its life renewing.
MIN_VALIDITY = datetime.timedelta(minutes=10)
ROOT_VALIDITY = datetime.timedelta(days=3650)
#: A self-signed root this close to its end is rotated.
ROOT_RENEW_BEFORE = datetime.timedelta(days=365)
#: How long a new root is trusted before it signs: the time for a config push to reach every sidecar.
PROPAGATION = datetime.timedelta(hours=1)
#: Clock skew allowed between the control plane and sidecars (certificates are backdated by it).
CLOCK_SKEW = datetime.timedelta(minutes=1)
MAX_CSR_BYTES = 16 * 1024
#: RSA keys in a CSR: at least this many bits (and at most 8192, which is slow enough already).
MIN_RSA_BITS = 2048

FILES = (
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
    "next-ca-cert.pem",
    "next-ca-key.pem",
    "previous-root-cert.pem",
    "previous-root-until",
)
_NAME_PART = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?")


class CAError(Exception):
    """The CA cannot sign (no usable key material); the message says why."""


class InvalidCSR(ValueError):
    """A CSR the CA refuses: unreadable, badly signed, or with a weak or unsupported key."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(f"{trust_domain!r} is not a trust domain (lower-case letters, digits, '.', '-', '_')")
    return trust_domain


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``; ValueError for a bad part."""
    check_trust_domain(trust_domain)
    for what, value in (("namespace", namespace), ("service account", service_account)):
        # Service account names are DNS-1123 subdomains; namespaces labels.
        parts = value.split(".")
        if not value or len(value) > 253 or not all(_NAME_PART.fullmatch(p) for p in parts):
            raise ValueError(f"{value!r} is not a {what} name")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _pem_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CAError(f"{what}: not PEM certificates: {e}") from None
    return certs


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki(key_or_cert) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def new_root(trust_domain: str, *, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A new self-signed ECDSA P-256 root for ``trust_domain``: (cert PEM, key PEM)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshproxy root CA {now:%Y-%m-%d}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert), _key_pem(key)


# ---- key material --------------------------------------------------------------------------------------------


class CAKeys:
    """The CA's files (name -> PEM bytes; see the module's docstring), checked when made (CAError)."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = dict(files)
        self._check()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CAKeys) and other.files == self.files

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def self_signed(cls, trust_domain: str, *, now: datetime.datetime | None = None) -> CAKeys:
        cert, key = new_root(trust_domain, now=now)
        return cls({"ca-cert.pem": cert, "ca-key.pem": key, "cert-chain.pem": cert, "root-cert.pem": cert})

    def _check(self) -> None:
        unknown = set(self.files) - set(FILES)
        if unknown:
            raise CAError(f"unknown CA files: {', '.join(sorted(unknown))}")
        for name in ("ca-cert.pem", "ca-key.pem"):
            if not self.files.get(name):
                raise CAError(f"no {name}")
        self._load()

    def _load(self) -> None:
        f = self.files
        signer = _pem_certs(f["ca-cert.pem"], "ca-cert.pem")[0]
        try:
            key = serialization.load_pem_private_key(f["ca-key.pem"], password=None)
        except (ValueError, TypeError) as e:
            raise CAError(f"ca-key.pem: not an unencrypted PEM private key: {e}") from None
        if _spki(key) != _spki(signer):
            raise CAError("ca-key.pem is not the key of ca-cert.pem")
        try:
            constraints = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError("ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE)")
        chain = _pem_certs(f["cert-chain.pem"], "cert-chain.pem") if f.get("cert-chain.pem") else [signer]
        if _spki(chain[0]) != _spki(signer):
            raise CAError("cert-chain.pem must start with ca-cert.pem")
        if f.get("root-cert.pem"):
            roots = _pem_certs(f["root-cert.pem"], "root-cert.pem")
        elif _self_signed(signer):
            roots = [signer]
        else:
            raise CAError("ca-cert.pem is an intermediate: give root-cert.pem too")
        # The chain must lead to one of the roots, each certificate signed by the next.
        for lower, upper in itertools.pairwise(chain):
            try:
                lower.verify_directly_issued_by(upper)
            except (ValueError, TypeError, InvalidSignature):
                raise CAError(f"cert-chain.pem: {lower.subject.rfc4514_string()} is not signed by the next") from None
        top = chain[-1]
        if not any(_spki(top) == _spki(r) or _issued_by(top, r) for r in roots):
            raise CAError("cert-chain.pem does not lead to a root in root-cert.pem")
        self.signer, self.key, self.chain, self.roots = signer, key, chain, roots
        nxt = None
        if f.get("next-ca-cert.pem"):
            cert = _pem_certs(f["next-ca-cert.pem"], "next-ca-cert.pem")[0]
            try:
                nkey = serialization.load_pem_private_key(f.get("next-ca-key.pem") or b"", password=None)
            except (ValueError, TypeError) as e:
                raise CAError(f"next-ca-key.pem: {e}") from None
            if _spki(nkey) != _spki(cert):
                raise CAError("next-ca-key.pem is not the key of next-ca-cert.pem")
            nxt = (cert, nkey)
        previous = (
            _pem_certs(f["previous-root-cert.pem"], "previous-root-cert.pem") if f.get("previous-root-cert.pem") else []
        )
        until = None
        if f.get("previous-root-until"):
            try:
                until = datetime.datetime.fromisoformat(f["previous-root-until"].decode().strip())
            except (ValueError, UnicodeDecodeError):
                raise CAError("previous-root-until: not an ISO 8601 time") from None
            if until.tzinfo is None:
                until = until.replace(tzinfo=datetime.UTC)
        self.next, self.previous, self.previous_until = nxt, previous, until

    @property
    def self_signed_root(self) -> bool:
        return len(self.chain) == 1 and _self_signed(self.signer)

    def trust_bundle(self) -> list[bytes]:
        """The roots to trust, PEM each, without repeats, oldest first (so the order stays as a rotation
        moves the signer from one root to the next, and configs do not change for nothing)."""
        out: list[bytes] = []
        seen: set[bytes] = set()
        certs = [*self.roots, *([self.next[0]] if self.next else []), *self.previous]
        certs.sort(key=lambda c: (c.not_valid_before_utc, c.fingerprint(hashes.SHA256())))
        for c in certs:
            fp = c.fingerprint(hashes.SHA256())
            if fp not in seen:
                seen.add(fp)
                out.append(_pem(c))
        return out

    # -- rotation steps (self-signed roots only) ---------------------------------------------------------

    def rotation_step(
        self,
        trust_domain: str,
        *,
        now: datetime.datetime | None = None,
        renew_before: datetime.timedelta = ROOT_RENEW_BEFORE,
        propagation: datetime.timedelta = PROPAGATION,
    ) -> CAKeys | None:
        """The next state of a root rotation due at ``now``, or None when nothing is due.

        A user's own CA (an intermediate, or a root given with its own root-cert.pem) is never rotated
        here: its owner replaces the files."""
        now = now or _now()
        f = dict(self.files)
        if self.previous and self.previous_until is not None and now > self.previous_until:
            # Every certificate the previous root signed has expired: stop trusting it.
            del f["previous-root-cert.pem"]
            f.pop("previous-root-until", None)
            return CAKeys(f)
        if not self.self_signed_root:
            return None
        if self.next is None:
            if self.signer.not_valid_after_utc - now < renew_before:
                cert, key = new_root(trust_domain, now=now)
                f["next-ca-cert.pem"], f["next-ca-key.pem"] = cert, key
                return CAKeys(f)
            return None
        cert, key = self.next
        if now - (cert.not_valid_before_utc + CLOCK_SKEW) >= propagation:
            pem = _pem(cert)
            old = _pem(self.signer)
            f.update({"ca-cert.pem": pem, "ca-key.pem": _key_pem(key), "cert-chain.pem": pem, "root-cert.pem": pem})
            f["previous-root-cert.pem"] = old
            # The old root signed until now; its last certificates end MAX_VALIDITY later at most.
            f["previous-root-until"] = (now + MAX_VALIDITY + 2 * CLOCK_SKEW).isoformat().encode()
            del f["next-ca-cert.pem"], f["next-ca-key.pem"]
            return CAKeys(f)
        return None

    def begin_rotation(self, trust_domain: str, *, now: datetime.datetime | None = None) -> CAKeys:
        """Start a rotation now (an operator's choice, or a test's): the new root is trusted at once and
        signs from the next ``rotation_step`` after ``PROPAGATION``."""
        if not self.self_signed_root:
            raise CAError("only a self-signed root is rotated by meshproxy; replace your own CA's files instead")
        if self.next is not None:
            return self
        cert, key = new_root(trust_domain, now=now)
        return CAKeys(dict(self.files) | {"next-ca-cert.pem": cert, "next-ca-key.pem": key})


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# ---- stores ---------------------------------------------------------------------------------------------------


class DirectoryCAStore:
    """The CA's files in a directory (mode 0700; keys 0600), each replaced atomically."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def __str__(self) -> str:
        return str(self.directory)

    def load(self) -> CAKeys | None:
        """The keys in the directory; None when it holds no ca-cert.pem and ca-key.pem (CAError if it holds
        something unusable)."""
        files = {}
        for name in FILES:
            try:
                files[name] = (self.directory / name).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CAError(f"{self.directory / name}: {e.strerror or e}") from None
        if "ca-cert.pem" not in files and "ca-key.pem" not in files:
            return None
        key_file = self.directory / "ca-key.pem"
        if key_file.exists() and key_file.stat().st_mode & 0o077:
            raise CAError(f"{key_file}: readable by others (mode {key_file.stat().st_mode & 0o777:o}): chmod 600 it")
        return CAKeys(files)

    def create(self, keys: CAKeys) -> CAKeys:
        """Write ``keys`` unless the directory already holds a CA; the keys in force."""
        import fcntl

        # Two control planes started at once on the same directory must not each write half a CA.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = self.load()
            if found is not None:
                return found
            self.replace(keys, None)
        return keys

    def replace(self, keys: CAKeys, old: CAKeys | None) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in FILES:
            path = self.directory / name
            data = keys.files.get(name)
            if data is None:
                path.unlink(missing_ok=True)
                continue
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.")
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)


class SecretCAStore:
    """The CA's files in an Opaque Secret (``CA_SECRET`` by default) in the control plane's namespace."""

    def __init__(self, api_client, namespace: str, name: str = CA_SECRET, *, request_timeout: float = 10.0) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self._timeout = request_timeout
        self._version: str | None = None

    def __str__(self) -> str:
        return f"secret {self.namespace}/{self.name}"

    def load(self) -> CAKeys | None:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._core.read_namespaced_secret(self.name, self.namespace, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        files = {}
        for k, v in (secret.data or {}).items():
            try:
                files[k] = base64.b64decode(v, validate=True)
            except (binascii.Error, TypeError):
                raise CAError(f"{self}: {k} is not base64") from None
        self._version = secret.metadata.resource_version
        return CAKeys(files)

    def _body(self, keys: CAKeys) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "meshproxy"},
            },
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in keys.files.items()},
        }

    def create(self, keys: CAKeys) -> CAKeys:
        """Create the Secret with ``keys`` unless it exists; the keys in force (another replica's if it won)."""
        from kubernetes.client.exceptions import ApiException

        found = self.load()
        if found is not None:
            return found
        try:
            self._core.create_namespaced_secret(self.namespace, self._body(keys), _request_timeout=self._timeout)
            log.info("%s: created the mesh CA", self)
            return keys
        except ApiException as e:
            if e.status != 409:
                raise
        found = self.load()
        if found is None:
            raise CAError(f"{self}: created by someone else, then gone")
        return found

    def replace(self, keys: CAKeys, old: CAKeys | None) -> None:
        """Replace the Secret, with the resourceVersion last read (409 if someone wrote it since)."""
        body = self._body(keys)
        body["metadata"]["resourceVersion"] = self._version
        result = self._core.replace_namespaced_secret(self.name, self.namespace, body, _request_timeout=self._timeout)
        self._version = result.metadata.resource_version


# ---- the CA ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A signed certificate: the chain (leaf first, then intermediates; PEM) and the trust bundle (PEM)."""

    cert_chain: list[str]
    trust_bundle: list[str]
    spiffe_id: str
    not_after: datetime.datetime


def check_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """The CSR in ``pem``, checked: readable, self-signature valid, an EC P-256 or RSA >= 2048 key."""
    data = pem.encode() if isinstance(pem, str) else pem
    if not data:
        raise InvalidCSR("no CSR")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidCSR(f"the CSR is over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise InvalidCSR(f"not a PEM certificate signing request: {e}") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InvalidCSR(f"unreadable public key: {e}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidCSR(f"EC keys must be on P-256 (secp256r1), not {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= 8192:
            raise InvalidCSR(f"RSA keys must have {MIN_RSA_BITS} to 8192 bits, not {key.key_size}")
    else:
        raise InvalidCSR(f"unsupported key type {type(key).__name__}: use EC P-256 (or RSA >= 2048)")
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise InvalidCSR("the CSR's signature does not verify with its own key")
    return csr


class CertificateAuthority:
    """Signs workload certificates with the keys a store holds.

    ``ensure()`` loads the keys, creating a root once if there are none and ``create`` is True (the leader,
    or a local control plane); ``reload()`` reads them again (every replica, periodically); ``rotate()``
    takes the next step of a root rotation if one is due and writes it (the leader). ``on_bundle_change``
    is called with the new trust bundle whenever it changes, so the config stream can carry it."""

    def __init__(
        self,
        store,
        trust_domain: str = "cluster.local",
        *,
        default_validity: datetime.timedelta = DEFAULT_VALIDITY,
        max_validity: datetime.timedelta = MAX_VALIDITY,
        clock: Callable[[], datetime.datetime] = _now,
        on_bundle_change: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.store = store
        self.trust_domain = check_trust_domain(trust_domain)
        if not MIN_VALIDITY <= default_validity <= max_validity:
            raise ValueError("need MIN_VALIDITY <= default_validity <= max_validity")
        self.default_validity = default_validity
        self.max_validity = max_validity
        self.clock = clock
        self.on_bundle_change = on_bundle_change
        self._keys: CAKeys | None = None
        self._lock = threading.Lock()
        self.issued = 0

    @property
    def ready(self) -> bool:
        return self._keys is not None

    @property
    def keys(self) -> CAKeys | None:
        return self._keys

    def trust_bundle(self) -> list[str]:
        keys = self._keys
        return [p.decode() for p in keys.trust_bundle()] if keys is not None else []

    def _set(self, keys: CAKeys | None) -> None:
        with self._lock:
            before = self.trust_bundle()
            self._keys = keys
            after = self.trust_bundle()
        if after != before and self.on_bundle_change is not None:
            self.on_bundle_change(after)

    def ensure(self, *, create: bool = True) -> CAKeys | None:
        """Load the keys; with ``create``, make a root first if the store has none."""
        keys = self.store.load()
        if keys is None and create:
            keys = self.store.create(CAKeys.self_signed(self.trust_domain, now=self.clock()))
            log.info("%s: a new self-signed root for trust domain %s", self.store, self.trust_domain)
        if keys is not None:
            self._set(keys)
        return keys

    def reload(self) -> None:
        """Read the keys again (a replica following the leader's Secret); keeps the old ones on an error."""
        try:
            keys = self.store.load()
        except CAError as e:
            log.error("%s: %s; signing with the keys loaded before", self.store, e)
            return
        if keys is not None and keys != self._keys:
            self._set(keys)

    def rotate(self, *, now: datetime.datetime | None = None, **kwargs) -> bool:
        """Take the next rotation step if one is due, write it to the store; True if something changed."""
        keys = self._keys
        if keys is None:
            return False
        step = keys.rotation_step(self.trust_domain, now=now or self.clock(), **kwargs)
        if step is None:
            return False
        self.store.replace(step, keys)
        self._set(step)
        what = "a new root is trusted" if step.next else "the new root signs" if step.previous else "dropped"
        log.info("%s: root rotation: %s", self.store, what)
        return True

    async def follow(self, interval: float = 30.0) -> None:
        """Reload the keys every ``interval`` seconds, forever (a replica following the leader's Secret;
        run as a task, cancel to stop). Read errors are logged and the keys in force kept."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.reload)
            except Exception as e:  # an API error must not end the following
                log.warning("%s: not reloaded: %s", self.store, getattr(e, "reason", None) or e)
            await asyncio.sleep(interval)

    def begin_rotation(self) -> None:
        keys = self._keys
        if keys is None:
            raise CAError("the CA has no keys yet")
        step = keys.begin_rotation(self.trust_domain, now=self.clock())
        if step is not keys:
            self.store.replace(step, keys)
            self._set(step)

    def issue(self, csr_pem: str | bytes, namespace: str, service_account: str, *, validity_seconds: int = 0) -> Issued:
        """Sign ``csr_pem`` for ``namespace``/``service_account`` (already verified by the caller).

        InvalidCSR for a CSR refused; CAError when the CA has no keys yet. Only the CSR's public key is
        used: its subject and SANs are ignored."""
        csr = check_csr(csr_pem)
        keys = self._keys
        if keys is None:
            raise CAError("the CA has no keys yet")
        uri = spiffe_id(self.trust_domain, namespace, service_account)
        now = self.clock()
        validity = self.default_validity
        if validity_seconds:
            validity = max(MIN_VALIDITY, min(self.max_validity, datetime.timedelta(seconds=validity_seconds)))
        not_after = min(now + validity, keys.signer.not_valid_after_utc)
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(keys.signer.public_key())
        cert = (
            x509.CertificateBuilder()
            # No subject: the identity is the SAN, which is then critical (RFC 5280 §4.2.1.6).
            .subject_name(x509.Name([]))
            .issuer_name(keys.signer.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
            .sign(keys.key, hashes.SHA256())
        )
        self.issued += 1
        chain = [_pem(cert).decode()] + [_pem(c).decode() for c in keys.chain if not _self_signed(c)]
        return Issued(chain, [p.decode() for p in keys.trust_bundle()], uri, not_after)


class CAReconciler:
    """The leader's CA work, one round per call (a ``LeaderTask``): create the keys once, rotate the root
    when due. Safe in two replicas at once: the store refuses a create or a replace based on a stale read."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def reconcile(self) -> None:
        self.ca.ensure(create=True)
        self.ca.rotate()


class SignCertificateService:
    """``meshproxy.v1.MeshControl/SignCertificate``: check the caller's token, then sign its CSR.

    ``authenticator`` is a ``control.identity`` authenticator (``async authenticate(token) -> Caller``).
    Status codes: UNAUTHENTICATED for a token refused, INVALID_ARGUMENT for a CSR refused, UNAVAILABLE
    while the CA has no keys or the token cannot be checked (the sidecar retries)."""

    def __init__(self, ca: CertificateAuthority, authenticator) -> None:
        self.ca = ca
        self.authenticator = authenticator

    async def sign(self, request, context):
        import grpc

        from control.identity import AuthenticationError, AuthenticatorUnavailable
        from meshproxy.config.v1 import control_pb2 as cpb

        try:
            caller = await self.authenticator.authenticate(request.token)
        except AuthenticationError as e:
            log.warning("SignCertificate from %s: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except AuthenticatorUnavailable as e:
            log.warning("SignCertificate from %s: cannot check the token: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot check the token now: {e}")
        try:
            issued = self.ca.issue(
                request.csr, caller.namespace, caller.service_account, validity_seconds=request.validity_seconds
            )
        except InvalidCSR as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"csr: {e}")
        except (CAError, ValueError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the CA cannot sign now: {e}")
        log.info("signed a certificate for %s (%s), valid until %s", issued.spiffe_id, caller, issued.not_after)
        return cpb.SignCertificateResponse(cert_chain=issued.cert_chain, trust_bundle=issued.trust_bundle)
