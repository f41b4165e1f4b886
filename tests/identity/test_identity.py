"""The sidecar's certificate client: key and CSR, SignCertificate over our own HTTP/2 client, renewal and
retries, and credentials that do mutual TLS with OpenSSL."""

from __future__ import annotations

import asyncio
import random
import ssl

import grpc
import pytest

from control.ca import CertificateAuthority, DirectoryCAStore, SignCertificateService, check_csr
from control.identity import BootstrapTokens
from meshproxy.config.v1 import control_pb2 as cpb
from meshproxy.identity import (
    TOKEN_FILE_ENV,
    Credentials,
    IdentityClient,
    SignError,
    file_token_source,
    make_csr,
    new_key,
)

WEB, DB = "w" * 43, "d" * 43


class ControlPlane:
    """SignCertificate on a grpc.aio server in the test's loop, with bootstrap tokens for shop/web and shop/db."""

    def __init__(self, tmp_path) -> None:
        path = tmp_path / "tokens.csv"
        path.write_text(f"{WEB},shop,web\n{DB},shop,db\n")
        path.chmod(0o600)
        self.ca = CertificateAuthority(DirectoryCAStore(tmp_path / "ca"), "cluster.local")
        self.ca.ensure()
        self.service = SignCertificateService(self.ca, BootstrapTokens(path))
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> str:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "meshproxy.v1.MeshControl",
                    {
                        "SignCertificate": grpc.unary_unary_rpc_method_handler(
                            self.service.sign,
                            request_deserializer=cpb.SignCertificateRequest.FromString,
                            response_serializer=cpb.SignCertificateResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(None)


def contexts(client: Credentials, server: Credentials) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    out = []
    for creds, side in ((client, ssl.PROTOCOL_TLS_CLIENT), (server, ssl.PROTOCOL_TLS_SERVER)):
        ctx = ssl.SSLContext(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"])
        creds.load_into(ctx)
        out.append(ctx)
    return out[0], out[1]


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[dict, dict, str]:
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
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            return server.getpeercert(), client.getpeercert(), client.selected_alpn_protocol()
    raise AssertionError("the handshake did not finish")


def token_file(tmp_path, token: str, name: str = "token"):
    path = tmp_path / name
    path.write_text(token + "\n")
    return path


def test_the_csr_passes_the_cas_checks_and_names_the_spiffe_id():
    csr = check_csr(make_csr(new_key(), "spiffe://cluster.local/ns/shop/sa/web"))
    assert [u.value for u in csr.extensions[0].value] == ["spiffe://cluster.local/ns/shop/sa/web"]


def test_two_sidecars_get_identities_and_do_mutual_tls(tmp_path):
    cp = ControlPlane(tmp_path)

    async def main():
        address = await cp.start()
        try:
            web = IdentityClient(
                address, file_token_source(token_file(tmp_path, WEB, "web")), namespace="shop", service_account="web"
            )
            db = IdentityClient(address, file_token_source(token_file(tmp_path, DB, "db")))
            seen = []
            web.add_listener(seen.append)
            web_creds, db_creds = await web.refresh(), await db.refresh()
            assert seen == [web_creds] and web.current is web_creds
            return web_creds, db_creds
        finally:
            await cp.stop()

    web, db = asyncio.run(main())
    assert web.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"
    assert db.spiffe_id == "spiffe://cluster.local/ns/shop/sa/db"  # from the token: the CSR named none
    assert web.lifetime == 24 * 3600 + 60
    server_saw, client_saw, alpn = handshake(*contexts(web, db))
    assert server_saw["subjectAltName"] == (("URI", web.spiffe_id),)
    assert client_saw["subjectAltName"] == (("URI", db.spiffe_id),)
    assert alpn == "h2"
    # A peer from another CA is refused.
    (tmp_path / "other").mkdir()
    other = ControlPlane(tmp_path / "other")

    async def foreign():
        address = await other.start()
        try:
            return await IdentityClient(address, file_token_source(token_file(tmp_path, DB, "db2"))).refresh()
        finally:
            await other.stop()

    stranger = asyncio.run(foreign())
    client_ctx, _ = contexts(web, db)
    _, stranger_ctx = contexts(stranger, stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_ctx, stranger_ctx)


def test_renewal_runs_again_and_again_and_publishes_each_new_certificate(tmp_path):
    cp = ControlPlane(tmp_path)

    async def main():
        address = await cp.start()
        try:
            client = IdentityClient(address, file_token_source(token_file(tmp_path, WEB)))
            # A clock past the renewal point of any certificate: each one is renewed as soon as it arrives.
            client.clock = lambda: 4e9
            seen: list[Credentials] = []
            got = asyncio.Event()

            def listener(creds: Credentials) -> None:
                seen.append(creds)
                if len(seen) >= 3:
                    got.set()

            client.add_listener(listener)
            client.start()
            first = await asyncio.wait_for(client.wait_ready(), 10)
            await asyncio.wait_for(got.wait(), 10)
            client.stop()
            await client.wait_closed()
            return first, seen
        finally:
            await cp.stop()

    first, seen = asyncio.run(main())
    assert seen[0] is first
    assert len({c.cert_chain for c in seen}) == len(seen)  # a new certificate each time
    assert len({c.key for c in seen}) == len(seen)  # and a new key


def test_renewal_time_is_about_half_the_life():
    creds = Credentials(b"", b"", b"", "", not_before=1000.0, not_after=1000.0 + 86400)
    client = IdentityClient("127.0.0.1:1", lambda: "", clock=lambda: 1000.0, rng=random.Random(7))
    delays = [client.renew_delay(creds) for _ in range(200)]
    assert all(0.45 * 86400 <= d <= 0.55 * 86400 for d in delays)
    assert max(delays) - min(delays) > 0.05 * 86400  # spread out, not all at once
    client.clock = lambda: 1000.0 + 86400
    assert client.renew_delay(creds) == 0.0


def test_backoff_is_bounded_by_the_cap_and_by_the_current_certificates_end():
    client = IdentityClient("127.0.0.1:1", lambda: "", clock=lambda: 0.0, rng=random.Random(1))
    assert all(0 <= client.retry_delay(n) <= min(60.0, 2**n) for n in range(40))
    client.current = Credentials(b"", b"", b"", "", not_before=-100.0, not_after=10.0)
    assert all(client.retry_delay(n) <= 5.0 for n in range(40))


def test_a_failed_renewal_keeps_the_certificate_and_retries_until_the_control_plane_is_back(tmp_path):
    cp = ControlPlane(tmp_path)

    async def main():
        address = await cp.start()
        port = cp.port
        client = IdentityClient(
            address, file_token_source(token_file(tmp_path, WEB)), backoff_base=0.01, backoff_cap=0.05
        )
        first = await client.refresh()
        await cp.stop()
        with pytest.raises(SignError) as err:
            await client.refresh()
        assert err.value.status == 14
        assert client.current is first  # still in use
        # The loop retries while the control plane is away, and gets a new certificate once it is back.
        client.clock = lambda: 4e9
        renewed = asyncio.Event()
        client.add_listener(lambda creds: renewed.set())
        client.start()
        for _ in range(200):
            if client.failures >= 3:
                break
            await asyncio.sleep(0.01)
        assert client.failures >= 3 and client.current is first
        await cp.start(port)
        try:
            await asyncio.wait_for(renewed.wait(), 10)
            assert client.current is not first
        finally:
            client.stop()
            await client.wait_closed()
            await cp.stop()

    asyncio.run(main())


def test_an_unknown_token_is_refused_and_the_trust_bundle_follows_the_config_stream(tmp_path):
    cp = ControlPlane(tmp_path)

    async def main():
        address = await cp.start()
        try:
            bad = IdentityClient(address, file_token_source(token_file(tmp_path, "x" * 43)))
            with pytest.raises(SignError) as err:
                await bad.refresh()
            assert err.value.status == 16
            client = IdentityClient(address, file_token_source(token_file(tmp_path, WEB, "web")))
            return await client.refresh(), client
        finally:
            await cp.stop()

    creds, client = asyncio.run(main())
    cp.ca.begin_rotation()
    seen = []
    client.add_listener(seen.append)
    client.set_trust_bundle(cp.ca.trust_bundle())
    assert len(seen) == 1 and seen[0].trust_bundle == "".join(cp.ca.trust_bundle()).encode()
    assert seen[0].cert_chain == creds.cert_chain  # same certificate, new roots
    client.set_trust_bundle(cp.ca.trust_bundle())
    assert len(seen) == 1  # nothing changed


def test_token_files(tmp_path, monkeypatch):
    with pytest.raises(SignError, match="cannot read the token"):
        file_token_source(tmp_path / "missing")()
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file(tmp_path, "abc")))
    assert file_token_source()() == "abc"


def test_a_chain_through_an_intermediate_verifies_against_the_root_alone(tmp_path):
    from control.ca import new_root
    from tests.control.test_ca import _intermediate

    root_pem, root_key = new_root("corp.example")
    inter_pem, inter_key = _intermediate(root_pem, root_key)
    directory = tmp_path / "ca"
    directory.mkdir(mode=0o700)
    files = {"ca-cert.pem": inter_pem, "ca-key.pem": inter_key, "cert-chain.pem": inter_pem + root_pem}
    for name, data in (files | {"root-cert.pem": root_pem}).items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)
    cp = ControlPlane(tmp_path)  # its own self-signed CA, replaced by the user's below
    cp.ca = cp.service.ca = type(cp.ca)(DirectoryCAStore(directory), "cluster.local")
    cp.ca.ensure(create=False)

    async def main():
        address = await cp.start()
        try:
            web = await IdentityClient(address, file_token_source(token_file(tmp_path, WEB, "w"))).refresh()
            db = await IdentityClient(address, file_token_source(token_file(tmp_path, DB, "d"))).refresh()
            return web, db
        finally:
            await cp.stop()

    web, db = asyncio.run(main())
    assert web.cert_chain.count(b"BEGIN CERTIFICATE") == 2 and web.trust_bundle == root_pem
    server_saw, client_saw, _ = handshake(*contexts(web, db))
    assert server_saw["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/shop/sa/web"),)
    assert client_saw["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/shop/sa/db"),)
