"""The webhook's serving certificate: a self-signed CA and a serving cert for the Service's DNS names, kept in
Secret ``meshproxy-webhook-tls``, and the MutatingWebhookConfiguration's caBundle that makes the API server
trust it.

The leader (``WebhookCertReconciler``, run while a replica holds the Lease) creates the Secret once, replaces
it only when it is unusable (unreadable, for other names, or within 30 days of expiry) and sets the caBundle
of every webhook in ``meshproxy-sidecar-injector`` to the Secret's CA, again whenever someone resets it.
Every replica (``read_secret``) serves whatever the Secret holds, so all replicas present one certificate.
Keys are ECDSA P-256; the certificates carry the key identifiers and usages strict X.509 verifiers ask for.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SECRET_NAME",
    "SERVICE_NAME",
    "WEBHOOK_CONFIGURATION",
    "WebhookCertReconciler",
    "WebhookCerts",
    "load_into",
    "read_secret",
    "server_context",
    "service_dns_names",
]

log = logging.getLogger("meshproxy.injector.certs")

SECRET_NAME = "meshproxy-webhook-tls"
SERVICE_NAME = "meshproxy-control"
WEBHOOK_CONFIGURATION = "meshproxy-sidecar-injector"
_MWC = ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
# No one rotates a webhook's private CA by hand: long-lived, and replaced by the leader before it lapses.
CA_DAYS = 3650
SERVING_DAYS = 3650
RENEW_BEFORE = datetime.timedelta(days=30)


def service_dns_names(
    service: str = SERVICE_NAME, namespace: str = "meshproxy-system", domain: str = "cluster.local"
) -> list[str]:
    """The names the API server may use for the Service (it dials ``<service>.<namespace>.svc``)."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.{domain}"]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshproxy"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


@dataclass(frozen=True)
class WebhookCerts:
    """PEM: the CA certificate (the caBundle), the serving certificate and its private key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def generate(cls, dns_names: list[str], *, now: datetime.datetime | None = None) -> WebhookCerts:
        now = now or _now()
        # a minute of slack for clocks a little behind ours
        start = now - datetime.timedelta(minutes=1)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("meshproxy webhook CA")
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(dns_names[0]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=SERVING_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cls(
            ca.public_bytes(serialization.Encoding.PEM),
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    # -- the Secret's form ----------------------------------------------------------------------------------

    def secret_data(self) -> dict[str, str]:
        """``data`` of a kubernetes.io/tls Secret (base64), with the CA beside the pair as cert-manager does."""
        return {
            "ca.crt": base64.b64encode(self.ca_pem).decode(),
            "tls.crt": base64.b64encode(self.cert_pem).decode(),
            "tls.key": base64.b64encode(self.key_pem).decode(),
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, str] | None) -> WebhookCerts:
        """Raises ValueError when a key is missing or not base64."""
        data = data or {}
        try:
            ca, cert, key = (base64.b64decode(data[k], validate=True) for k in ("ca.crt", "tls.crt", "tls.key"))
        except KeyError as e:
            raise ValueError(f"no {e.args[0]}") from None
        except (binascii.Error, TypeError) as e:
            raise ValueError(f"not base64: {e}") from None
        return cls(ca, cert, key)

    def problem(self, dns_names: list[str], *, now: datetime.datetime | None = None) -> str | None:
        """Why these certificates should be replaced, or None when they serve ``dns_names`` for 30 days more."""
        now = now or _now()
        try:
            ca = x509.load_pem_x509_certificate(self.ca_pem)
            cert = x509.load_pem_x509_certificate(self.cert_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except ValueError as e:
            return f"unreadable: {e}"
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            return "the key does not match the certificate"
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return "the certificate is not signed by the CA"
        try:
            names = set(
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                    x509.DNSName
                )
            )
        except x509.ExtensionNotFound:
            names = set()
        if missing := [n for n in dns_names if n not in names]:
            return f"not for {', '.join(missing)}"
        expiry = min(ca.not_valid_after_utc, cert.not_valid_after_utc)
        if expiry - now < RENEW_BEFORE:
            return f"expires {expiry:%Y-%m-%d}"
        return None


# ---- serving ------------------------------------------------------------------------------------------------


def load_into(context: ssl.SSLContext, certs: WebhookCerts) -> None:
    """Make ``context`` present ``certs`` from the next handshake on (connections already up keep theirs).

    ssl loads key pairs only from files: an anonymous memory file where there is one (the control plane's
    root filesystem may be read-only), else a private temporary file removed at once.
    """
    pem = certs.cert_pem + certs.key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshproxy-webhook-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="meshproxy-webhook-", suffix=".pem") as f:
        f.write(pem)
        f.flush()
        context.load_cert_chain(f.name)


def server_context(certs: WebhookCerts) -> ssl.SSLContext:
    """TLS 1.2+ server context with ``certs``; the API server speaks HTTP/1.1 to webhooks."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    load_into(context, certs)
    return context


def read_secret(core_api, namespace: str, name: str = SECRET_NAME) -> WebhookCerts | None:
    """The Secret's certificates (``core_api`` a kubernetes CoreV1Api); None when it does not exist yet or
    is unusable. Other API errors raise."""
    from kubernetes.client.exceptions import ApiException

    try:
        secret = core_api.read_namespaced_secret(name, namespace, _request_timeout=10)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    try:
        certs = WebhookCerts.from_secret_data(secret.data)
    except ValueError as e:
        log.warning("secret %s/%s: %s", namespace, name, e)
        return None
    if (why := certs.problem([])) is not None and not why.startswith("expires"):
        log.warning("secret %s/%s: %s", namespace, name, why)
        return None
    return certs


# ---- the leader's part ----------------------------------------------------------------------------------------


class WebhookCertReconciler:
    """Makes sure the Secret exists and is usable, and that the webhook configuration trusts its CA.

    ``reconcile()`` is one round, safe to repeat and to run in two replicas at once: the Secret is created
    only if absent (409: someone else did, theirs is read back), replaced and the configuration updated only
    with the resourceVersion they were read at (409: the next round tries again).
    """

    def __init__(
        self,
        api_client,
        namespace: str,
        *,
        secret: str = SECRET_NAME,
        configuration: str = WEBHOOK_CONFIGURATION,
        dns_names: list[str] | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        # plain dicts: a typed round trip would drop fields this client version does not know
        self._custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.secret = secret
        self.configuration = configuration
        self.dns_names = dns_names or service_dns_names(namespace=namespace)
        self._timeout = request_timeout

    def reconcile(self) -> WebhookCerts:
        """One round. Returns the Secret's certificates; API errors raise (ApiException, urllib3 errors)."""
        certs = self.ensure_secret()
        self.ensure_ca_bundle(certs.ca_pem)
        return certs

    def ensure_secret(self) -> WebhookCerts:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._core.read_namespaced_secret(self.secret, self.namespace, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status != 404:
                raise
            secret = None
        if secret is None:
            certs = WebhookCerts.generate(self.dns_names)
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": self.secret,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/part-of": "meshproxy"},
                },
                "type": "kubernetes.io/tls",
                "data": certs.secret_data(),
            }
            try:
                self._core.create_namespaced_secret(self.namespace, body, _request_timeout=self._timeout)
                log.info("secret %s/%s: created the webhook's certificate", self.namespace, self.secret)
                return certs
            except ApiException as e:
                if e.status != 409:
                    raise
            # AlreadyExists: another replica created it between our read and our create; theirs stands
            secret = self._core.read_namespaced_secret(self.secret, self.namespace, _request_timeout=self._timeout)
        try:
            certs = WebhookCerts.from_secret_data(secret.data)
            why = certs.problem(self.dns_names)
        except ValueError as e:
            why = str(e)
        if why is None:
            return certs
        log.warning("secret %s/%s: %s; replacing it", self.namespace, self.secret, why)
        certs = WebhookCerts.generate(self.dns_names)
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.secret,
                "namespace": self.namespace,
                "resourceVersion": secret.metadata.resource_version,
                "labels": secret.metadata.labels or {},
            },
            "type": "kubernetes.io/tls",
            "data": certs.secret_data(),
        }
        self._core.replace_namespaced_secret(self.secret, self.namespace, body, _request_timeout=self._timeout)
        return certs

    def ensure_ca_bundle(self, ca_pem: bytes) -> bool:
        """Set every webhook's caBundle to ``ca_pem``; True if the configuration was written. A configuration
        that does not exist (yet) is left for the next round."""
        from kubernetes.client.exceptions import ApiException

        group, version, plural = _MWC
        try:
            config = self._custom.get_cluster_custom_object(
                group, version, plural, self.configuration, _request_timeout=self._timeout
            )
        except ApiException as e:
            if e.status == 404:
                log.warning("mutatingwebhookconfiguration %s does not exist (yet)", self.configuration)
                return False
            raise
        bundle = base64.b64encode(ca_pem).decode()
        changed = False
        for webhook in config.get("webhooks") or ():
            client_config = webhook.setdefault("clientConfig", {})
            if client_config.get("caBundle") != bundle:
                client_config["caBundle"] = bundle
                changed = True
        if not changed:
            return False
        self._custom.replace_cluster_custom_object(
            group, version, plural, self.configuration, config, _request_timeout=self._timeout
        )
        log.info("mutatingwebhookconfiguration %s: caBundle set", self.configuration)
        return True
