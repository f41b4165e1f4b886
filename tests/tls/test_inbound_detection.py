"""The inbound decision of a transparent listener with mTLS configured (meshproxy.transparent):
TLS, plaintext HTTP/2, TCP or refused, per the port's PeerAuthentication mode, fed byte by byte."""

from __future__ import annotations

import ssl
from types import SimpleNamespace

import pytest

from meshproxy import tls, transparent

PREFACE = transparent.PREFACE
PORT = 8080


def client_hello(alpn: list[str] | None) -> bytes:
    """A real ClientHello (OpenSSL's), offering ``alpn``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="backend.shop")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


CLIENT_HELLO = client_hello(["h2", tls.ALPN_MARK])  # a sidecar's
APP_HELLO = client_hello(["http/1.1"])  # an app's own TLS


class _Transport:
    def is_closing(self) -> bool:
        return False


class Recorder(transparent.TransparentProtocol):
    """The decision alone, for an inbound connection to ``PORT`` in ``mode``."""

    def __init__(self, mode: int, opaque: bool = False) -> None:
        super().__init__(worker=None, listener=transparent.INBOUND_LISTENER)
        self.transport = _Transport()
        self.mode = SimpleNamespace(inbound=True, opaque=frozenset({PORT} if opaque else ()), detection_timeout=0.1)
        self.destination = ("10.0.0.3", PORT)
        self.tls_mode = mode
        self.decision: tuple | None = None

    def _tls(self) -> None:
        self.decision = ("tls", self.buffer)

    def _refuse_plaintext(self) -> None:
        self.decision = ("refused", self.buffer)

    def _http2(self) -> None:
        self.decision = ("http2", self.buffer)

    def _passthrough(self, eof: bool = False) -> None:
        self.decision = ("tcp", self.buffer)


def feed(p: Recorder, chunks: list[bytes]) -> tuple:
    for chunk in chunks:
        if p.decision is not None:
            break
        p.data_received(chunk)
    return p.decision


@pytest.mark.parametrize(
    ("mode", "opaque", "chunks", "decision"),
    [
        (tls.STRICT, False, [CLIENT_HELLO], "tls"),
        (tls.STRICT, False, [CLIENT_HELLO[:1], CLIENT_HELLO[1:]], "tls"),  # one byte is not enough to tell
        (tls.STRICT, False, [PREFACE], "refused"),
        (tls.STRICT, False, [b"GET / HTTP/1.1\r\n"], "refused"),
        (tls.STRICT, True, [b"\x00\x01binary"], "refused"),
        (tls.PERMISSIVE, False, [CLIENT_HELLO], "tls"),
        (tls.PERMISSIVE, False, [PREFACE[:1], PREFACE[1:]], "http2"),
        (tls.PERMISSIVE, False, [b"GET / HTTP/1.1\r\n"], "tcp"),
        (tls.PERMISSIVE, True, [CLIENT_HELLO], "tls"),  # opaque: the mesh's TLS is still ours to terminate
        (tls.PERMISSIVE, False, [CLIENT_HELLO[:3], CLIENT_HELLO[3:20], CLIENT_HELLO[20:]], "tls"),
        (tls.PERMISSIVE, False, [APP_HELLO], "tcp"),  # the app's own TLS goes to the app
        (tls.PERMISSIVE, False, [client_hello(None)], "tcp"),
        (tls.PERMISSIVE, False, [client_hello([tls.ALPN_TCP])], "tls"),
        (tls.STRICT, False, [APP_HELLO], "tls"),  # STRICT: terminated (and refused, without a mesh certificate)
        (tls.PERMISSIVE, True, [PREFACE], "tcp"),  # opaque: plaintext is TCP, whatever it looks like
        (tls.DISABLE, False, [CLIENT_HELLO], "tcp"),  # the app's own TLS
        (tls.DISABLE, False, [PREFACE], "http2"),
    ],
)
def test_decision(mode, opaque, chunks, decision):
    p = Recorder(mode, opaque)
    got = feed(p, chunks)
    assert got is not None and got[0] == decision
    assert got[1] == b"".join(chunks)[: len(got[1])] and len(got[1]) >= 2  # every byte read is kept


def test_strict_refuses_silence_and_a_half_close():
    p = Recorder(tls.STRICT)
    p._timed_out()
    assert p.decision == ("refused", b"")
    p = Recorder(tls.STRICT)
    p.data_received(b"\x16")
    p.eof_received()
    assert p.decision == ("refused", b"\x16")


def test_permissive_silence_is_tcp():
    p = Recorder(tls.PERMISSIVE)
    p._timed_out()
    assert p.decision == ("tcp", b"")


@pytest.mark.parametrize(
    ("data", "alpn"),
    [
        (CLIENT_HELLO, ["h2", "meshproxy"]),
        (APP_HELLO, ["http/1.1"]),
        (client_hello(None), []),
        (CLIENT_HELLO[:4], None),
        (CLIENT_HELLO[:-1], None),
        (b"\x16\x03\x01\x00\x05hello", []),
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\xff", []),  # cut short inside
        (b"\x16\x03\x01\xff\xff", []),  # a record longer than TLS allows: not waited for
        (b"GET / HTTP/1.1\r\n", []),
    ],
    ids=["sidecar", "app", "no-alpn", "header-only", "one-byte-short", "garbage", "truncated", "oversized", "http"],
)
def test_client_hello_alpn(data, alpn):
    assert tls.client_hello_alpn(data) == alpn


def test_sidecar_contexts_mark_their_hellos():
    from tests.tls.pki import CA, spiffe

    creds = CA().issue(spiffe("shop", "web"))
    for alpn in (tls.ALPN, tls.ALPN_TCP):
        context = tls.client_context(creds.cert_chain, creds.key, creds.trust_bundle, alpn)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        assert tls.is_mesh_hello(tls.client_hello_alpn(outgoing.read()))
