"""meshproxy.tls without sockets: real OpenSSL handshakes between memory BIOs, the SPIFFE check,
and the worker's Security (contexts rebuilt on a new certificate or trust bundle, old
connections untouched)."""

from __future__ import annotations

import ssl
from types import SimpleNamespace

import pytest

from meshproxy import tls
from meshproxy.config.v1 import config_pb2 as pb
from tests.tls.pki import CA, TRUST_DOMAIN, spiffe

SERVER_ID = spiffe("shop", "backend")
CLIENT_ID = spiffe("shop", "web")


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("root A")


@pytest.fixture(scope="module")
def other_ca() -> CA:
    return CA("root B")


class Pair:
    """A client and a server SSLObject joined by memory BIOs."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self.s_in, self.s_out, self.c_in, self.c_out = (ssl.MemoryBIO() for _ in range(4))
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_side=False)
        self.server_error: Exception | None = None
        self.client_error: Exception | None = None

    def _shuttle(self) -> None:
        data = self.c_out.read()
        if data:
            self.s_in.write(data)
        data = self.s_out.read()
        if data:
            self.c_in.write(data)

    def handshake(self) -> Pair:
        server_done = client_done = False
        for _ in range(20):  # a TLS 1.3 handshake takes a few rounds; bounded
            if not client_done and self.client_error is None:
                try:
                    self.client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    self.client_error = e
            self._shuttle()
            if not server_done and self.server_error is None:
                try:
                    self.server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    self.server_error = e
            self._shuttle()
            if (server_done or self.server_error) and (client_done or self.client_error):
                break
        if client_done and self.server_error is not None:
            # TLS 1.3: the client finished first; the server's alert reaches it on its next read.
            try:
                self.client.read(1)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                self.client_error = e
        return self

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None

    def roundtrip(self, data: bytes) -> bytes:
        self.client.write(data)
        self._shuttle()
        got = self.server.read(len(data))
        self.server.write(got)
        self._shuttle()
        return self.client.read(len(data))


def contexts(creds) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (
        tls.server_context(creds.cert_chain, creds.key, creds.trust_bundle),
        tls.client_context(creds.cert_chain, creds.key, creds.trust_bundle),
    )


def test_mutual_handshake_is_tls13_with_alpn_h2_and_spiffe_ids(ca):
    server, _ = contexts(ca.issue(SERVER_ID))
    _, client = contexts(ca.issue(CLIENT_ID))
    pair = Pair(server, client).handshake()
    assert pair.ok, (pair.server_error, pair.client_error)
    assert pair.server.version() == "TLSv1.3" and pair.client.version() == "TLSv1.3"
    assert pair.server.selected_alpn_protocol() == "h2" == pair.client.selected_alpn_protocol()
    peer = tls.check_peer(pair.server.getpeercert(), TRUST_DOMAIN)
    assert (peer.spiffe_id, peer.principal, peer.namespace, peer.service_account) == (
        CLIENT_ID,
        "cluster.local/ns/shop/sa/web",
        "shop",
        "web",
    )
    assert tls.check_peer(pair.client.getpeercert(), TRUST_DOMAIN, frozenset({SERVER_ID})).spiffe_id == SERVER_ID
    assert pair.roundtrip(b"hello") == b"hello"


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_certificate_from_another_ca_fails_the_handshake(ca, other_ca, side):
    good = ca.issue(SERVER_ID if side == "client" else CLIENT_ID)
    stranger = other_ca.issue(CLIENT_ID if side == "client" else SERVER_ID, bundle=ca.pem)
    if side == "client":
        pair = Pair(contexts(good)[0], contexts(stranger)[1]).handshake()
        assert isinstance(pair.server_error, ssl.SSLCertVerificationError)
    else:
        pair = Pair(contexts(stranger)[0], contexts(good)[1]).handshake()
        assert isinstance(pair.client_error, ssl.SSLCertVerificationError)
        assert "unable to get local issuer certificate" in pair.client_error.verify_message


def test_an_expired_certificate_fails_the_handshake(ca):
    expired = ca.issue(CLIENT_ID, expired=True)
    pair = Pair(contexts(ca.issue(SERVER_ID))[0], contexts(expired)[1]).handshake()
    assert isinstance(pair.server_error, ssl.SSLCertVerificationError)
    assert "expired" in pair.server_error.verify_message
    assert pair.client_error is not None  # the alert reached it


def test_a_client_without_certificate_or_below_tls13_is_refused(ca):
    server = contexts(ca.issue(SERVER_ID))[0]
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.pem.decode())
    pair = Pair(server, anonymous).handshake()
    assert pair.server_error is not None and not pair.ok
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    pair = Pair(server, old).handshake()
    assert pair.server_error is not None and pair.client_error is not None


def _peercert(*uris: str, dns: tuple[str, ...] = ()) -> dict:
    return {"subjectAltName": tuple(("URI", u) for u in uris) + tuple(("DNS", d) for d in dns)}


@pytest.mark.parametrize(
    ("peercert", "allowed", "reason"),
    [
        (None, None, "no certificate"),
        (_peercert(dns=("a.test",)), None, "0 URI SANs"),
        (_peercert(SERVER_ID, CLIENT_ID), None, "2 URI SANs"),
        (_peercert("https://cluster.local/ns/a/sa/b"), None, "not a SPIFFE id"),
        (_peercert("spiffe://cluster.local"), None, "not a SPIFFE id"),
        (_peercert(spiffe("shop", "web", "evil.local")), None, "not in trust domain cluster.local"),
        (_peercert(CLIENT_ID), frozenset({SERVER_ID}), "not one of the identities allowed"),
    ],
    ids=["none", "no-uri", "two-uris", "https", "no-path", "other-trust-domain", "not-allowed"],
)
def test_check_peer_refuses(peercert, allowed, reason):
    with pytest.raises(tls.PeerRefused, match=reason):
        tls.check_peer(peercert, TRUST_DOMAIN, allowed)


def test_check_peer_accepts_any_id_of_the_trust_domain_without_an_allowed_list():
    assert tls.check_peer(_peercert(CLIENT_ID), TRUST_DOMAIN, None).principal == "cluster.local/ns/shop/sa/web"
    assert tls.check_peer(_peercert(CLIENT_ID), TRUST_DOMAIN, frozenset()).namespace == "shop"
    # No trust domain configured: any.
    assert tls.check_peer(_peercert(spiffe("a", "b", "other.td")), "").trust_domain == "other.td"


def test_a_wrong_spiffe_id_after_a_good_handshake_is_refused(ca):
    evil = ca.issue(spiffe("shop", "web", "evil.local"))
    pair = Pair(contexts(ca.issue(SERVER_ID))[0], contexts(evil)[1]).handshake()
    assert pair.ok  # the chain is fine: the identity is what is wrong
    with pytest.raises(tls.PeerRefused):
        tls.check_peer(pair.server.getpeercert(), TRUST_DOMAIN)


def test_is_tls_record():
    assert tls.is_tls_record(bytes.fromhex("160301020001"))
    assert tls.is_tls_record(b"\x16\x03")
    assert not tls.is_tls_record(b"\x16")
    assert not tls.is_tls_record(b"PRI * HTTP/2.0")
    assert not tls.is_tls_record(b"\x17\x03")


# -- the worker's Security ------------------------------------------------------------------------


def security(ca: CA, spiffe_id: str = SERVER_ID) -> tls.Security:
    sec = tls.Security()
    sec.configure(pb.Security(trust_domain=TRUST_DOMAIN))
    sec.update(ca.issue(spiffe_id))
    return sec


def test_configure_modes_by_port():
    sec = tls.Security()
    assert not sec.enabled
    sec.configure(
        pb.Security(
            trust_domain=TRUST_DOMAIN,
            peer_authentication=pb.PeerAuthentication(
                mode=pb.PeerAuthentication.STRICT,
                port_modes={8080: pb.PeerAuthentication.DISABLE, 9090: pb.PeerAuthentication.UNSET},
            ),
        )
    )
    assert sec.enabled
    assert sec.mode_for(80) == tls.STRICT
    assert sec.mode_for(8080) == tls.DISABLE
    assert sec.mode_for(9090) == tls.STRICT  # UNSET: the workload's mode
    sec.configure(pb.Security())
    assert sec.mode_for(80) == tls.PERMISSIVE  # unset in a hand-written config
    assert sec.authz is None
    sec.configure(None)
    assert not sec.enabled


def test_no_contexts_until_certificate_and_bundle(ca):
    sec = tls.Security()
    sec.configure(pb.Security(trust_domain=TRUST_DOMAIN))
    assert sec.server is None and sec.client is None
    creds = ca.issue(SERVER_ID, bundle=b"")
    sec.update(creds)
    assert sec.server is None  # no trust bundle yet
    sec.set_trust_bundle([ca.pem.decode()])
    assert sec.server is not None and sec.client is not None and sec.contexts_built == 1
    sec.set_trust_bundle([ca.pem.decode()])
    assert sec.contexts_built == 1  # unchanged: nothing rebuilt


def test_bad_material_keeps_the_contexts_in_force(ca, caplog):
    sec = security(ca)
    server = sec.server
    sec.update(SimpleNamespace(cert_chain=b"not a cert", key=b"not a key", trust_bundle=b"", spiffe_id=""))
    assert sec.server is server
    assert "cannot load" in caplog.text


def test_renewal_serves_new_handshakes_and_leaves_established_connections_alone(ca):
    sec = security(ca)
    client_sec = security(ca, CLIENT_ID)
    old = Pair(sec.server, client_sec.client).handshake()
    assert old.ok
    first = old.client.getpeercert()["serialNumber"]
    sec.update(ca.issue(SERVER_ID))
    new = Pair(sec.server, client_sec.client).handshake()
    assert new.ok
    assert new.client.getpeercert()["serialNumber"] != first
    # The connection made before the renewal goes on, with its certificate.
    assert old.roundtrip(b"still here") == b"still here"
    assert old.client.getpeercert()["serialNumber"] == first


def test_root_rotation_trusts_both_then_only_the_new_root(ca):
    new_root = CA("root A2")
    server = security(ca)
    old_client = security(ca, CLIENT_ID)
    both = ca.pem + new_root.pem
    # First every sidecar trusts both roots...
    server.set_trust_bundle(both)
    old_client.set_trust_bundle(both)
    new_client = tls.Security()
    new_client.configure(pb.Security(trust_domain=TRUST_DOMAIN))
    new_client.update(new_root.issue(CLIENT_ID, bundle=both))
    assert Pair(server.server, old_client.client).handshake().ok
    established = Pair(server.server, new_client.client).handshake()
    assert established.ok
    # ...then certificates come from the new root; then the old root goes.
    server.update(new_root.issue(SERVER_ID, bundle=both))
    assert Pair(server.server, old_client.client).handshake().ok
    server.set_trust_bundle(new_root.pem)
    refused = Pair(server.server, old_client.client).handshake()
    assert isinstance(refused.server_error, ssl.SSLCertVerificationError)
    assert Pair(server.server, new_client.client).handshake().ok
    assert established.roundtrip(b"x") == b"x"


class FakeIdentity:
    """What ``install`` uses of ``meshproxy.identity.IdentityClient``."""

    def __init__(self, current=None) -> None:
        self.current = current
        self.listeners: list = []
        self.bundles: list = []

    def add_listener(self, cb) -> None:
        self.listeners.append(cb)

    def set_trust_bundle(self, pems) -> None:
        self.bundles.append(list(pems))

    def publish(self, creds) -> None:
        self.current = creds
        for cb in self.listeners:
            cb(creds)


def test_install_follows_the_configs_and_the_identity(ca):
    cfg = pb.SidecarConfig(security=pb.Security(trust_domain=TRUST_DOMAIN, trust_bundle=[ca.pem.decode()]))
    worker = SimpleNamespace(on_config=[], runtime=SimpleNamespace(config=cfg))
    identity = FakeIdentity(ca.issue(SERVER_ID))
    sec = tls.install(worker, identity)
    assert worker.security is sec and sec.enabled and sec.server is not None
    assert sec.spiffe_id == SERVER_ID
    assert identity.bundles == [[ca.pem.decode()]]  # the config's bundle reaches the identity client
    built = sec.contexts_built
    identity.publish(ca.issue(SERVER_ID))  # a renewal
    assert sec.contexts_built == built + 1
    # A config without Security turns it all off; one with it back on.
    worker.on_config[0](SimpleNamespace(config=pb.SidecarConfig()))
    assert not sec.enabled and tls.security_of(worker) is None
    worker.on_config[0](SimpleNamespace(config=cfg))
    assert tls.security_of(worker) is sec
    # Installing again keeps the one Security object.
    assert tls.install(worker) is sec
