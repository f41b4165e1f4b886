"""The sidecar's end of the control plane's config stream (``meshproxy.v1.MeshControl/Stream``).

Owns one worker's subscription: the TCP connection to the control plane, the
gRPC call spoken over our own sans-IO HTTP/2 client connection (no grpcio in
the sidecar: it would cost ~9 MB of idle RSS), the gRPC message framing, the
xDS state-of-the-world exchange, and reconnecting.

The exchange: the stream's first ``StreamRequest`` names the node, the
worker index and the version in force ("" before the first one). Each
``StreamResponse`` is a whole ``SidecarConfig``; the sidecar fills in its own
node and the version, puts the ``outbound`` listener on the local
``--listen`` address (the local flag always wins: the port the pod's traffic
is redirected to is the pod's business, not the control plane's), validates
it and swaps it in with ``Worker.reconfigure`` (listeners re-bound, in-flight
requests untouched). It answers with an ACK (the new version and the nonce)
or a NACK (the nonce, the version still in force, and the one-line reason),
and keeps serving on its last good config either way. A snapshot of the
version already in force is only ACKed.

When the stream ends for any reason (non-zero grpc-status, RST_STREAM,
GOAWAY, a connection error or loss, a dead peer found by TCP keepalive, a
peer that answers no HTTP/2 PING after ``PING_AFTER`` seconds of silence) the
sidecar keeps serving on the config in force and reconnects after a
full-jitter exponential backoff (base 0.1 s, cap 5 s), reset once a stream
has delivered a snapshot. ``stop()`` (the worker's drain) ends it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Any
from urllib.parse import unquote

from google.protobuf.message import DecodeError

from meshproxy import __version__
from meshproxy.config import ConfigError, parse_address, validate
from meshproxy.config.v1.control_pb2 import ErrorDetail, StreamRequest, StreamResponse
from meshproxy.conn import h2conn as h2
from meshproxy.wire import FramingError, MessageReader, grpc_frame

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "OUTBOUND_LISTENER",
    "PING_AFTER",
    "StreamEnded",
    "Subscription",
    "backoff_delay",
    "set_keepalive",
]

log = logging.getLogger("meshproxy.subscription")

STREAM_PATH = b"/meshproxy.v1.MeshControl/Stream"
#: The listener whose address the local ``--listen`` sets, whatever the snapshot says.
OUTBOUND_LISTENER = "outbound"
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
CONNECT_TIMEOUT = 5.0
# Windows we advertise on the control connection: a snapshot of several MiB arrives in a
# few round trips. The bytes are consumed as they arrive (the connection returns the
# window for every EV_DATA it hands us), so this bounds nothing but the speed.
WINDOWS = {"initial_window_size": 1 << 20, "connection_window": 4 << 20}
# A control plane behind a silent network (a node gone, a dropped NAT entry) is found
# within 10 + 5 x 3 = 25 s of silence, instead of TCP's default two hours.
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
#: Seconds of silence on the stream before we send an HTTP/2 PING, and then the longest
#: wait for anything (its ACK included) before the stream counts as dead. TCP keepalive
#: finds a dead host; this finds a live one whose control plane stopped answering.
PING_AFTER = 30.0

EV_RESPONSE = h2.EV_RESPONSE
EV_DATA = h2.EV_DATA
EV_TRAILERS = h2.EV_TRAILERS
EV_CLOSED = h2.EV_CLOSED
EV_GOAWAY = h2.EV_GOAWAY
EV_TERMINATED = h2.EV_TERMINATED


class StreamEnded(Exception):
    """Why one subscription stream ended (one line); the subscription reconnects."""


def backoff_delay(attempt: int, rng: random.Random | Any = random) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 for the first after a good
    stream): full jitter, uniform in [0, min(cap, base x 2^attempt)], so the sidecars of a
    fleet that lost the control plane together do not come back together."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 32)))


def set_keepalive(sock: Any) -> None:
    """TCP keepalive on ``sock``: probes after 10 s of silence, every 5 s, dead after 3."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ended(stream: Any) -> str:
    """Why ``stream`` ended, from the peer's trailers or reset."""
    # The status first: a server that ends the call before the client half-closed follows its
    # trailers with RST_STREAM(NO_ERROR) (RFC 9113 §8.1), often in the same read.
    if stream.grpc_status < 0:
        if stream.state == "closed" and stream.closed_remote_reset:
            return f"the control plane reset the stream (error code {stream.error_code})"
        return "the control plane ended the stream without grpc-status"
    message = b""
    for name, value in stream.trailers or stream.headers or ():
        if name == b"grpc-message":
            message = value
    detail = f": {_one_line(unquote(message.decode('utf-8', 'replace')))}" if message else ""
    return f"the control plane ended the stream with grpc-status {stream.grpc_status}{detail}"


class Subscription:
    """One worker's subscription to the control plane at ``address`` (host:port).

    ``node`` is this sidecar's ``meshproxy.v1.Node``; ``worker_index`` its
    worker's index (0..N-1); ``listen`` the outbound listener's address;
    ``shared_ports``: several workers bind the same listeners, so a listener on
    port 0 (a different port in each) is refused.
    """

    def __init__(
        self,
        worker: Any,
        address: str,
        node: Any,
        *,
        worker_index: int = 0,
        listen: str = "127.0.0.1:15001",
        shared_ports: bool = False,
    ) -> None:
        self.worker = worker
        self.address = address
        self.host, self.port = parse_address(address)
        self.node = node
        self.worker_index = worker_index
        self.listen = listen
        self.shared_ports = shared_ports
        self._task: asyncio.Task | None = None
        self._delivered = False  # the current stream brought at least one snapshot

    @property
    def version(self) -> str:
        """The config version in force ("" before the first)."""
        runtime = self.worker.runtime
        return runtime.version if runtime is not None else ""

    def start(self) -> None:
        self._task = self.worker.loop.create_task(self._run())

    def stop(self) -> None:
        """End the subscription (the config in force stays); ``wait_closed`` waits for it."""
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- the reconnect loop -----------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        quiet = False  # the last attempt already failed, and said so
        while True:
            self._delivered = False
            try:
                await self._stream()
            except (OSError, TimeoutError, StreamEnded) as e:
                reason = _one_line(str(e)) or type(e).__name__
            except Exception as e:  # a bug here must not end the subscription for good
                log.error("control plane %s: subscription failed", self.address, exc_info=True)
                reason = f"{type(e).__name__}: {e}"
            if self._delivered:
                attempt = 0
                quiet = False
            delay = backoff_delay(attempt)
            attempt += 1
            # Say it once when the control plane goes away, not every few seconds while it stays away.
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(
                level,
                "control plane %s: %s; serving on version %r, reconnecting in %.2fs",
                self.address,
                reason,
                self.version,
                delay,
            )
            quiet = True
            await asyncio.sleep(delay)

    async def _stream(self) -> None:
        """One connection and stream, until it ends: raises StreamEnded or OSError, never returns."""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        conn = None
        try:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_keepalive(sock)
            conn = h2.H2Connection(True, None, WINDOWS)
            conn.initiate()
            stream = conn.open_stream(
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", STREAM_PATH),
                    (b":authority", self.address.encode()),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                    (b"user-agent", f"meshproxy/{__version__}".encode()),
                ]
            )
            first = StreamRequest(node=self.node, version_info=self.version, worker=self.worker_index)
            conn.send_data(stream, grpc_frame(first.SerializeToString()))
            writer.write(conn.data_to_send())
            log.info(
                "subscribing to control plane %s (version %r, worker %d)", self.address, self.version, self.worker_index
            )
            messages = MessageReader()
            pinged = False
            while True:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
                    # cancellation of stop() when the read completes at the same moment.
                    async with asyncio.timeout(PING_AFTER):
                        data = await reader.read(1 << 16)
                except TimeoutError:
                    if pinged:
                        raise StreamEnded(f"the control plane answered no PING within {PING_AFTER:g}s") from None
                    conn.ping()  # the peer must ACK it (RFC 9113 §6.7): any bytes back prove it alive
                    writer.write(conn.data_to_send())
                    pinged = True
                    continue
                pinged = False
                if not data:
                    raise StreamEnded("the control plane closed the connection")
                for ev in conn.receive(data) or ():
                    await self._event(ev, conn, stream, messages)
                if stream.recv_end:
                    # Ended with no event of its own: a trailers-only answer (grpc-status in
                    # the response headers), or DATA with END_STREAM and no trailers.
                    raise StreamEnded(_ended(stream))
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                    await writer.drain()
        finally:
            if conn is not None and not conn.terminated and not writer.is_closing():
                conn.close()  # GOAWAY, so the control plane knows this is no network failure
                writer.write(conn.data_to_send())
            writer.close()

    async def _event(self, ev: tuple, conn: Any, stream: Any, messages: MessageReader) -> None:
        kind = ev[0]
        if kind == EV_DATA:
            try:
                received = messages.feed(ev[2])
            except FramingError as e:
                raise StreamEnded(f"the control plane sent {e}") from None
            for message in received:
                try:
                    response = StreamResponse.FromString(message)
                except DecodeError as e:
                    raise StreamEnded(f"a StreamResponse that does not parse: {e}") from None
                reply = await self._apply(response)
                self._delivered = True
                conn.send_data(stream, grpc_frame(reply.SerializeToString()))
        elif kind == EV_RESPONSE:
            content_type = next((v for n, v in stream.headers if n == b"content-type"), b"")
            if stream.status != 200 or not content_type.startswith(b"application/grpc"):
                raise StreamEnded(f"not a gRPC response: status {stream.status}, content-type {content_type!r}")
        elif kind == EV_TRAILERS or kind == EV_CLOSED:
            raise StreamEnded(_ended(stream))
        elif kind == EV_GOAWAY:
            raise StreamEnded(f"the control plane sent GOAWAY (error code {ev[2]})")
        elif kind == EV_TERMINATED:
            raise StreamEnded(f"HTTP/2 connection error {ev[1]}: {ev[2]}")

    # -- one snapshot -----------------------------------------------------------------

    async def _apply(self, response: Any) -> Any:
        """Apply one snapshot; the ACK or NACK to send back."""
        version, nonce = response.version_info, response.nonce
        if self.worker.runtime is not None and version == self.version:
            return StreamRequest(version_info=version, response_nonce=nonce)
        cfg = response.config
        cfg.node.CopyFrom(self.node)
        cfg.version = version
        for ls in cfg.listeners:
            if ls.name == OUTBOUND_LISTENER:
                ls.address = self.listen
        checked = False
        try:
            validate(cfg)
            if self.shared_ports:
                for i, ls in enumerate(cfg.listeners):
                    if parse_address(ls.address, listener=True)[1] == 0:
                        raise ConfigError(f"listeners[{i}].address", "port 0 cannot be shared by several workers")
            checked = True
            await self.worker.reconfigure(cfg)
        except Exception as e:
            known = isinstance(e, ConfigError)
            reason = _one_line(str(e) if known else f"{type(e).__name__}: {e}")
            if not (checked and known):
                # The worker records the ConfigErrors of reconfigure itself; these it never saw.
                self.worker.config_log.rejected(version, reason)
            log.error(
                "config version %r refused, keeping version %r: %s", version, self.version, reason, exc_info=not known
            )
            return StreamRequest(
                version_info=self.version, response_nonce=nonce, error_detail=ErrorDetail(message=reason)
            )
        log.info("config version %r in force", version)
        return StreamRequest(version_info=version, response_nonce=nonce)
