"""The mesh CA with real crypto: what it issues verifies with OpenSSL (ssl) and carries exactly the SPIFFE id."""

from __future__ import annotations

import datetime
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.ca import (
    CLOCK_SKEW,
    MAX_VALIDITY,
    MIN_VALIDITY,
    PROPAGATION,
    CAError,
    CAKeys,
    CAReconciler,
    CertificateAuthority,
    DirectoryCAStore,
    InvalidCSR,
    SecretCAStore,
    check_csr,
    new_root,
    spiffe_id,
)

TD = "cluster.local"
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def csr_for(key=None, *, uri: str = "", dns: str = "", cn: str = "") -> tuple[bytes, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    sans = [x509.UniformResourceIdentifier(uri)] if uri else []
    sans += [x509.DNSName(dns)] if dns else []
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Clock:
    def __init__(self, now: datetime.datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def ca_in(tmp_path, clock=None, **kwargs) -> CertificateAuthority:
    ca = CertificateAuthority(DirectoryCAStore(tmp_path / "ca"), TD, clock=clock or Clock(), **kwargs)
    ca.ensure()
    return ca


def context_with(issued, key, *, server: bool, bundle: list[str] | None = None) -> ssl.SSLContext:
    """An mTLS context presenting ``issued``/``key`` and trusting ``bundle`` (``issued.trust_bundle``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # identities are SPIFFE URIs, checked by the caller
    fd = os.memfd_create("test-cert")
    try:
        os.write(fd, "".join(issued.cert_chain).encode() + key_pem(key))
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    ctx.load_verify_locations(cadata="".join(bundle or issued.trust_bundle))
    return ctx


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[dict, dict]:
    """A TLS handshake in memory; the (server's view of the client, client's view of the server) certs."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a bad client certificate at the client's first record.
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            return server.getpeercert(), client.getpeercert()
    raise AssertionError("the handshake did not finish")


def sans(issued) -> list:
    leaf = x509.load_pem_x509_certificate(issued.cert_chain[0].encode())
    return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# ---- issuing -------------------------------------------------------------------------------------------------


def test_issued_certificate_verifies_with_openssl_and_carries_only_the_spiffe_uri(tmp_path):
    ca = ca_in(tmp_path, clock=Clock(datetime.datetime.now(datetime.UTC)))
    csr_a, key_a = csr_for()
    csr_b, key_b = csr_for()
    a = ca.issue(csr_a, "shop", "web")
    b = ca.issue(csr_b, "shop", "db")
    assert a.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"
    seen_by_server, seen_by_client = handshake(
        context_with(a, key_a, server=False), context_with(b, key_b, server=True)
    )
    assert seen_by_server["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/shop/sa/web"),)
    assert seen_by_client["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/shop/sa/db"),)
    assert seen_by_server["subject"] == ()


def test_the_identity_comes_from_the_caller_never_from_the_csr(tmp_path):
    ca = ca_in(tmp_path)
    csr, _ = csr_for(uri="spiffe://cluster.local/ns/kube-system/sa/admin", dns="evil.example", cn="admin")
    issued = ca.issue(csr, "shop", "web")
    assert list(sans(issued)) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/web")]
    leaf = x509.load_pem_x509_certificate(issued.cert_chain[0].encode())
    assert leaf.subject == x509.Name([])
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_usages_are_istios(tmp_path):
    ca = ca_in(tmp_path)
    csr, _ = csr_for()
    leaf = x509.load_pem_x509_certificate(ca.issue(csr, "shop", "web").cert_chain[0].encode())
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_validity_default_cap_and_floor(tmp_path):
    clock = Clock()
    ca = ca_in(tmp_path, clock=clock)
    csr, _ = csr_for()

    def life(**kw) -> datetime.timedelta:
        leaf = x509.load_pem_x509_certificate(ca.issue(csr, "shop", "web", **kw).cert_chain[0].encode())
        assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
        return leaf.not_valid_after_utc - NOW

    assert life() == datetime.timedelta(hours=24)
    assert life(validity_seconds=3600) == datetime.timedelta(hours=1)
    assert life(validity_seconds=10 * 86400) == MAX_VALIDITY
    assert life(validity_seconds=1) == MIN_VALIDITY
    # Never past the signer's own end.
    clock.now = ca.keys.signer.not_valid_after_utc - datetime.timedelta(hours=2)
    leaf = x509.load_pem_x509_certificate(ca.issue(csr, "shop", "web").cert_chain[0].encode())
    assert leaf.not_valid_after_utc == ca.keys.signer.not_valid_after_utc


@pytest.mark.parametrize(
    "key, reason",
    [
        (ec.generate_private_key(ec.SECP384R1()), "P-256"),
        (rsa.generate_private_key(65537, 1024), "2048"),
        (ed25519.Ed25519PrivateKey.generate(), "unsupported key type"),
    ],
    ids=["p384", "rsa1024", "ed25519"],
)
def test_weak_or_unsupported_keys_are_refused(key, reason):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCSR, match=reason):
        check_csr(pem)


def test_rsa_2048_is_accepted_and_a_bad_signature_or_garbage_is_not():
    pem, _ = csr_for(rsa.generate_private_key(65537, 2048))
    check_csr(pem)
    good, _ = csr_for()
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(der)
    tampered[-5] ^= 0xFF  # inside the signature
    bad = x509.load_der_x509_csr(bytes(tampered)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCSR, match="signature"):
        check_csr(bad)
    for junk in (b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"):
        with pytest.raises(InvalidCSR):
            check_csr(junk)
    with pytest.raises(InvalidCSR, match="over"):
        check_csr(b"x" * 20000)


def test_spiffe_id_parts_are_checked():
    assert spiffe_id("td.example", "ns1", "sa.one") == "spiffe://td.example/ns/ns1/sa/sa.one"
    for args in (("TD", "a", "b"), ("td", "A", "b"), ("td", "a", ""), ("td", "a/b", "c"), ("td", "a", "b/../c")):
        with pytest.raises(ValueError):
            spiffe_id(*args)


def test_no_keys_no_signing(tmp_path):
    ca = CertificateAuthority(DirectoryCAStore(tmp_path / "empty"), TD)
    assert ca.ensure(create=False) is None and not ca.ready
    with pytest.raises(CAError):
        ca.issue(csr_for()[0], "shop", "web")


# ---- key material and stores ------------------------------------------------------------------------------


def test_a_directory_gets_a_root_once_with_private_modes(tmp_path):
    first = ca_in(tmp_path)
    directory = tmp_path / "ca"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for f in directory.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    second = ca_in(tmp_path)
    assert second.keys == first.keys
    root = first.keys.signer
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp256r1"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert len(first.trust_bundle()) == 1


def test_a_readable_key_is_refused(tmp_path):
    ca_in(tmp_path)
    (tmp_path / "ca" / "ca-key.pem").chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        DirectoryCAStore(tmp_path / "ca").load()


def _intermediate(root_pem: bytes, root_key_pem: bytes):
    root = x509.load_pem_x509_certificate(root_pem)
    root_key = serialization.load_pem_private_key(root_key_pem, None)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "my intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def test_a_user_supplied_intermediate_signs_and_chains_to_the_users_root(tmp_path):
    root_pem, root_key = new_root("corp.example", now=NOW)
    inter_pem, inter_key = _intermediate(root_pem, root_key)
    directory = tmp_path / "plugged"
    directory.mkdir(mode=0o700)
    files = {
        "ca-cert.pem": inter_pem,
        "ca-key.pem": inter_key,
        "cert-chain.pem": inter_pem + root_pem,
        "root-cert.pem": root_pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "ca-key.pem").chmod(0o600)
    ca = CertificateAuthority(DirectoryCAStore(directory), TD, clock=lambda: datetime.datetime.now(datetime.UTC))
    ca.ensure()
    assert ca.keys.files == files  # nothing generated
    csr_a, key_a = csr_for()
    csr_b, key_b = csr_for()
    a, b = ca.issue(csr_a, "shop", "web"), ca.issue(csr_b, "shop", "db")
    assert len(a.cert_chain) == 2 and a.cert_chain[1].encode() == inter_pem
    assert a.trust_bundle == [root_pem.decode()]
    seen, _ = handshake(context_with(a, key_a, server=False), context_with(b, key_b, server=True))
    assert seen["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/shop/sa/web"),)
    # Not rotated by meshproxy.
    assert ca.keys.rotation_step(TD, now=NOW + datetime.timedelta(days=3000)) is None


def test_unusable_material_is_refused():
    root_pem, root_key = new_root(TD, now=NOW)
    other_pem, other_key = new_root(TD, now=NOW)
    inter_pem, inter_key = _intermediate(root_pem, root_key)
    with pytest.raises(CAError, match="not the key"):
        CAKeys({"ca-cert.pem": root_pem, "ca-key.pem": other_key})
    with pytest.raises(CAError, match=r"root-cert\.pem"):
        CAKeys({"ca-cert.pem": inter_pem, "ca-key.pem": inter_key})
    with pytest.raises(CAError, match="does not lead"):
        CAKeys({"ca-cert.pem": inter_pem, "ca-key.pem": inter_key, "root-cert.pem": other_pem})
    with pytest.raises(CAError, match=r"no ca-key\.pem"):
        CAKeys({"ca-cert.pem": root_pem})
    leaf_csr, leaf_key = csr_for()
    ca = CertificateAuthority(_Memory(CAKeys({"ca-cert.pem": root_pem, "ca-key.pem": root_key})), TD)
    ca.ensure()
    leaf = ca.issue(leaf_csr, "a", "b").cert_chain[0].encode()
    with pytest.raises(CAError, match="not a CA"):
        CAKeys({"ca-cert.pem": leaf, "ca-key.pem": key_pem(leaf_key)})


class _Memory:
    def __init__(self, keys=None) -> None:
        self.keys = keys
        self.writes = 0

    def load(self):
        return self.keys

    def create(self, keys):
        if self.keys is None:
            self.keys = keys
        return self.keys

    def replace(self, keys, old):
        self.keys = keys
        self.writes += 1


# ---- rotation ---------------------------------------------------------------------------------------------------


def test_root_rotation_trusts_first_signs_later_and_forgets_the_old_root_last(tmp_path):
    # Started in the past, so that every certificate is valid for the handshakes, at the real time.
    clock = Clock(datetime.datetime.now(datetime.UTC) - PROPAGATION - 2 * CLOCK_SKEW)
    bundles = []
    ca = ca_in(tmp_path, clock=clock, on_bundle_change=bundles.append)
    old_root = ca.keys.signer
    csr, key = csr_for()
    before = ca.issue(csr, "shop", "web")

    ca.begin_rotation()
    assert len(ca.trust_bundle()) == 2 and len(bundles) == 2
    during = ca.issue(csr, "shop", "web")
    assert x509.load_pem_x509_certificate(during.cert_chain[0].encode()).issuer == old_root.subject
    assert not ca.rotate()  # not yet: the new root must reach every sidecar first

    clock.now += PROPAGATION + CLOCK_SKEW
    assert ca.rotate()
    after = ca.issue(csr, "shop", "web")
    assert ca.keys.signer != old_root
    assert x509.load_pem_x509_certificate(after.cert_chain[0].encode()).issuer == ca.keys.signer.subject
    assert len(after.trust_bundle) == 2
    # A sidecar still holding a certificate from the old root and one with the new talk to each other,
    # once the bundle (pushed over the config stream) holds both roots; with the old bundle alone, not.
    bundle = ca.trust_bundle()
    handshake(context_with(before, key, server=False, bundle=bundle), context_with(after, key, server=True))
    handshake(context_with(after, key, server=False), context_with(before, key, server=True, bundle=bundle))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context_with(before, key, server=False), context_with(after, key, server=True))
    # Persisted: a restart (or another replica) sees the same state.
    assert DirectoryCAStore(tmp_path / "ca").load() == ca.keys

    clock.now += MAX_VALIDITY
    assert not ca.rotate()  # certificates of the old root may live until now + 2 x skew
    clock.now += 3 * CLOCK_SKEW
    assert ca.rotate()
    assert ca.trust_bundle() == [ca.keys.signer.public_bytes(serialization.Encoding.PEM).decode()]
    assert len(bundles) == 3  # two roots, then (same two), then one: published on change only
    assert not ca.rotate()


def test_a_root_near_its_end_is_rotated_by_the_reconciler(tmp_path):
    clock = Clock()
    ca = ca_in(tmp_path, clock=clock)
    reconciler = CAReconciler(ca)
    reconciler.reconcile()
    assert ca.keys.next is None
    clock.now = ca.keys.signer.not_valid_after_utc - datetime.timedelta(days=100)
    reconciler.reconcile()
    assert ca.keys.next is not None


# ---- in cluster -----------------------------------------------------------------------------------------------


@pytest.fixture
def kube():
    from tests.fakekube.server import FakeKube

    with FakeKube(namespaces=("default", "meshproxy-system")) as fake:
        yield fake


@pytest.fixture
def api_client(kube):
    from kubernetes import client

    with client.ApiClient(client.Configuration(host=kube.host)) as api:
        yield api


def test_the_secret_is_created_once_and_shared_by_replicas(api_client, kube):
    from kubernetes.client.exceptions import ApiException

    leader = CertificateAuthority(SecretCAStore(api_client, "meshproxy-system"), TD)
    replica = CertificateAuthority(SecretCAStore(api_client, "meshproxy-system"), TD)
    assert replica.ensure(create=False) is None  # only the leader creates
    CAReconciler(leader).reconcile()
    replica.reload()
    assert replica.keys == leader.keys
    secret = kube.get(kube.type_of("", "v1", "secrets"), "meshproxy-system", "meshproxy-ca")
    assert set(secret["data"]) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
    # A second leader (a lost race) keeps the first one's root.
    racer = CertificateAuthority(SecretCAStore(api_client, "meshproxy-system"), TD)
    racer.ensure()
    assert racer.keys == leader.keys
    # A write based on a stale read is refused.
    leader.begin_rotation()
    with pytest.raises(ApiException) as err:
        racer.begin_rotation()
    assert err.value.status == 409
    replica.reload()
    assert len(replica.trust_bundle()) == 2
