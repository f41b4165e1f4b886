"""A small gRPC server on meshproxy's own sans-IO HTTP/2 connection (no grpcio in the sidecar).

Owns gRPC over HTTP/2 in the server role for the admin service: one
``H2Connection`` per TCP or unix connection (its HTTP/2 errors are the
core's: it answers them per RFC 9113 and we close once its GOAWAY is out),
the request checks gRPC asks of a server (POST, ``application/grpc``,
identity encoding, a known ``/service/method``: otherwise 405, 415 or a
trailers-only UNIMPLEMENTED), length-prefixed messages both ways, the
``grpc-timeout`` deadline, and the status in the trailers (trailers-only
when nothing was sent). Every call runs as one task (the admin path is not
the data path: coroutines are fine here).

A service is built from its protobuf ``ServiceDescriptor`` and an object
with one coroutine per method, named as the method:

- unary: ``async def GetStats(self, request, call) -> response``;
- server streaming: ``async def Watch(self, request, call) -> None``, which
  sends with ``await call.send(message)``;
- client or bidi streaming: ``async def Info(self, call) -> None``, reading
  with ``async for request in call`` (or ``await call.recv()``, None at the end).

A handler raising ``GrpcError(code, message)`` ends the call with that
status; any other exception is INTERNAL (and logged). A client's reset or
a lost connection cancels the call's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from meshproxy.conn import h2conn as h2

__all__ = ["MAX_RECEIVE", "Call", "GrpcError", "GrpcServer", "Method", "Service", "Status"]

log = logging.getLogger("meshproxy.admin")

#: The largest request message taken (gRPC's default receive limit).
MAX_RECEIVE = 4 << 20
# DATA queued on one stream beyond the peer's window before ``send`` waits for it to drain.
SEND_HIGH_WATER = 1 << 20
# Request bytes received but not yet read by a streaming handler before the call is refused:
# the connection returns the window as DATA arrives, so this is what bounds a flooding client.
RECV_BACKLOG = 16 << 20
SETTINGS = {"max_concurrent_streams": 100}
# application/grpc+proto, application/grpc;charset=...: gRPC content types too.
GRPC_SUBTYPES = (b"application/grpc+", b"application/grpc;")

EV_REQUEST = h2.EV_REQUEST
EV_DATA = h2.EV_DATA
EV_TRAILERS = h2.EV_TRAILERS
EV_CLOSED = h2.EV_CLOSED
EV_IDLE = h2.EV_IDLE
EV_TERMINATED = h2.EV_TERMINATED


class Status:
    """gRPC status codes (the ones we send)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class GrpcError(Exception):
    """Ends a call with ``code`` and a one-line ``message``."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Method:
    """One RPC: its request class, whether each side streams, and its handler."""

    __slots__ = ("client_streaming", "handler", "name", "request", "server_streaming")

    def __init__(
        self, name: str, request: type[Message], handler: Callable, client_streaming: bool, server_streaming: bool
    ) -> None:
        self.name = name
        self.request = request
        self.handler = handler
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming


class Service:
    """A gRPC service: its full name and methods, from its descriptor and an implementation object."""

    def __init__(self, descriptor: Any, impl: Any) -> None:
        self.name: str = descriptor.full_name
        self.descriptor = descriptor
        self.methods: dict[str, Method] = {}
        for m in descriptor.methods:
            handler = getattr(impl, m.name, None)
            if handler is None:
                continue  # UNIMPLEMENTED, as an unknown method
            self.methods[m.name] = Method(
                m.name, GetMessageClass(m.input_type), handler, m.client_streaming, m.server_streaming
            )


def percent_encode(message: str) -> bytes:
    """A ``grpc-message`` value: percent-encoded UTF-8 (gRPC over HTTP/2, "Responses")."""
    out = bytearray()
    for ch in message.encode("utf-8"):
        if 0x20 <= ch <= 0x7E and ch != 0x25:
            out.append(ch)
        else:
            out += b"%%%02X" % ch
    return bytes(out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Gone(Exception):
    """The client reset the stream or the connection went away: nobody to answer."""


class Call:
    """One RPC in progress: the request messages as they arrive, the responses as they go."""

    def __init__(self, proto: _Connection, stream: Any, method: Method) -> None:
        self._proto = proto
        self.stream = stream
        self.method = method
        self.headers: list[tuple[bytes, bytes]] = stream.headers
        self.peer = proto.peer
        self._buf = bytearray()
        self._messages: list[bytes] = []
        self._ended = stream.recv_end
        self._error: GrpcError | None = None
        self._wakeup: asyncio.Future | None = None
        self._done_callbacks: list[Callable[[], None]] = []
        self.task: asyncio.Task | None = None
        self.finished = False  # our trailers (or a reset) are out

    def metadata(self, name: bytes) -> bytes | None:
        """The value of request header ``name`` (lowercase), or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the call's status has been sent (Shutdown exits only then)."""
        self._done_callbacks.append(callback)

    # -- receiving ----------------------------------------------------------------------

    def _feed(self, data: bytes, end: bool) -> None:
        if data and self._error is None:
            buf = self._buf
            buf += data
            while len(buf) >= 5:
                flag = buf[0]
                n = int.from_bytes(buf[1:5], "big")
                if flag == 1:
                    self._error = GrpcError(Status.INTERNAL, "a compressed message, but no grpc-encoding was set")
                elif flag != 0:
                    self._error = GrpcError(Status.INTERNAL, f"invalid message flag {flag}")
                elif n > MAX_RECEIVE:
                    self._error = GrpcError(
                        Status.RESOURCE_EXHAUSTED, f"received message larger than max ({n} vs. {MAX_RECEIVE})"
                    )
                if self._error is not None:
                    buf.clear()
                    break
                if len(buf) < 5 + n:
                    break
                self._messages.append(bytes(buf[5 : 5 + n]))
                del buf[: 5 + n]
            backlog = len(buf) + sum(len(m) for m in self._messages)
            if self._error is None and backlog > RECV_BACKLOG:
                self._error = GrpcError(Status.RESOURCE_EXHAUSTED, "too many request bytes not yet read")
        if end:
            self._ended = True
            if self._buf and self._error is None:
                self._error = GrpcError(Status.INTERNAL, "the request ended inside a message")
        self._wake()

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    async def recv(self) -> Message | None:
        """The next request message, or None once the client half-closed; GrpcError for a bad one."""
        for _ in range(1 << 62):  # each pass waits for the client to send more, or to end
            if self._error is not None:
                raise self._error
            if self._messages:
                raw = self._messages.pop(0)
                try:
                    return self.method.request.FromString(raw)
                except DecodeError as e:
                    raise GrpcError(
                        Status.INVALID_ARGUMENT, f"the request does not parse as {self.method.request.__name__}: {e}"
                    ) from None
            if self._ended:
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
            self._wakeup = None
        raise AssertionError("unreachable")

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Message:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    # -- sending ------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one response message; waits while much of what was sent is still queued."""
        s = self.stream
        proto = self._proto
        if self.finished or s.state == "closed" or s.sent_end:
            raise _Gone()
        conn = proto.conn
        if not s.sent_headers:
            conn.send_headers(s, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        data = message.SerializeToString()
        conn.send_data(s, b"\0" + len(data).to_bytes(4, "big") + data)
        proto.flush()
        # Bounded: each pass waits for the peer to read (a WINDOW_UPDATE) or the stream to end.
        while (s.pending_bytes > SEND_HIGH_WATER or proto.write_paused) and s.state != "closed":
            await proto.progress()

    def _finish(self, code: int, message: str) -> None:
        """Send the status: trailers, or a trailers-only response when nothing was sent."""
        if self.finished:
            return
        self.finished = True
        s = self.stream
        conn = self._proto.conn
        if s.state != "closed" and not s.sent_end and not conn.terminated:
            message = _one_line(message)
            if not s.sent_headers:
                events = conn.respond(s, 200, grpc_status=code, grpc_message=message or None)
            else:
                trailers = [(b"grpc-status", b"%d" % code)]
                if message:
                    trailers.append((b"grpc-message", percent_encode(message)))
                conn.send_headers(s, trailers, True)
                events = None
                if s.state != "closed" and not s.recv_end:
                    # The client is still sending: we want no more of it (RFC 9113 §8.1).
                    events = conn.reset_stream(s, 0)
            if events:
                self._proto.events(events)
        self._proto.flush()
        callbacks, self._done_callbacks = self._done_callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("admin: a call's completion callback failed")

    async def run(self) -> None:
        """Run the handler and send its status."""
        method = self.method
        code, message = Status.OK, ""
        try:
            deadline_ns = self.stream.grpc_timeout_ns
            when = None
            if deadline_ns >= 0:
                when = asyncio.get_running_loop().time() + deadline_ns / 1e9
            deadline = asyncio.timeout_at(when)
            try:
                async with deadline:
                    if method.client_streaming:
                        await method.handler(self)
                    else:
                        request = await self.recv()
                        if request is None:
                            raise GrpcError(Status.INTERNAL, "the request ended without a message")
                        if await self._more():
                            raise GrpcError(Status.INTERNAL, "more than one request message for a unary request")
                        if method.server_streaming:
                            await method.handler(request, self)
                        else:
                            response = await method.handler(request, self)
                            await self.send(response)
            except TimeoutError:
                # Ours only if the deadline fired (the loop's clock may read a hair before ``when``
                # when it does): a TimeoutError of the handler's own is a failure like any other.
                if not deadline.expired():
                    raise
                raise GrpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except GrpcError as e:
            code, message = e.code, e.message
        except _Gone:
            self.finished = True
            return
        except asyncio.CancelledError:
            # The client reset the stream or went away (or the server closes): nobody to answer.
            self.finished = True
            raise
        except Exception as e:
            log.exception("admin: %s failed", method.name)
            code, message = Status.INTERNAL, f"{method.name} failed: {type(e).__name__}: {e}"
        self._finish(code, message)

    async def _more(self) -> bool:
        """Whether a unary request's client sends a second message (read up to its half-close)."""
        for _ in range(1 << 62):  # each pass waits for more bytes or the end
            if self._error is not None:
                raise self._error
            if self._messages:
                return True
            if self._ended:
                return False
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
            self._wakeup = None
        raise AssertionError("unreachable")


class _Connection(asyncio.Protocol):
    """One client connection: the HTTP/2 core in server role and the calls on it."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.conn = h2.H2Connection(False, None, SETTINGS)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, Call] = {}
        self.peer = ""
        self.write_paused = False
        self._progress: asyncio.Future | None = None

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.server.connections.add(self)
        self.conn.initiate()
        if self.server.closing:
            self.conn.shutdown()
        self.flush()

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive(data)
        if events:
            self.events(events)
        self.flush()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        events = self.conn.connection_lost()
        if events:
            self.events(events)
        for call in list(self.calls.values()):
            self._cancel(call)
        self.calls.clear()
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    # -- the core's events -------------------------------------------------------------------

    def events(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == EV_REQUEST:
                self._request(ev[1])
            elif kind == EV_DATA:
                call = self.calls.get(ev[1].id)
                if call is not None:
                    call._feed(ev[2], ev[3])
            elif kind == EV_TRAILERS:
                call = self.calls.get(ev[1].id)
                if call is not None:
                    call._feed(b"", True)
            elif kind == EV_CLOSED:
                s = ev[1]
                call = self.calls.pop(s.id, None)
                if call is not None and not call.finished:
                    # Reset by the client (or ended by the connection) before we answered.
                    self._cancel(call)
            elif kind == EV_IDLE or kind == EV_TERMINATED:
                # Going away and nothing left, or a connection error whose GOAWAY is queued.
                if kind == EV_TERMINATED:
                    log.debug("admin connection from %s: HTTP/2 error %s: %s", self.peer, ev[1], ev[2])
                self.flush()
                if self.transport is not None:
                    self.transport.close()

    def _cancel(self, call: Call) -> None:
        call.finished = True
        if call.task is not None and not call.task.done():
            call.task.cancel()
        call._wake()

    def _request(self, s: Any) -> None:
        conn = self.conn
        if s.method != b"POST":
            self.events(conn.respond(s, 405, [(b"allow", b"POST")]) or [])
            return
        content_type = next((v for n, v in s.headers if n == b"content-type"), b"")
        if content_type != b"application/grpc" and not content_type.startswith(GRPC_SUBTYPES):
            self.events(conn.respond(s, 415, [(b"accept", b"application/grpc")]) or [])
            return
        path = s.path or b""
        service_name, _, method_name = path[1:].decode("utf-8", "replace").partition("/")
        service = self.server.services.get(service_name)
        method = service.methods.get(method_name) if service is not None else None
        if method is None:
            why = f"unknown service {service_name}"
            if service is not None:
                why = f"unknown method {method_name} for service {service_name}"
            self.events(conn.respond(s, 200, grpc_status=Status.UNIMPLEMENTED, grpc_message=why) or [])
            return
        encoding = next((v for n, v in s.headers if n == b"grpc-encoding"), b"identity")
        if encoding != b"identity":
            self.events(
                conn.respond(
                    s,
                    200,
                    [(b"grpc-accept-encoding", b"identity")],
                    grpc_status=Status.UNIMPLEMENTED,
                    grpc_message=f"grpc-encoding {encoding.decode('latin-1')} is not supported",
                )
                or []
            )
            return
        call = Call(self, s, method)
        self.calls[s.id] = call
        call.task = self.server.loop.create_task(call.run())
        self.server.tasks.add(call.task)
        call.task.add_done_callback(self.server.tasks.discard)

    # -- output ------------------------------------------------------------------------------

    def flush(self) -> None:
        events = self.conn.take_events()
        if events:
            self.events(events)
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def progress(self) -> None:
        """Wait for the peer to do something (bytes read, the transport writable again)."""
        if self.transport is None:
            raise _Gone()
        if self._progress is None or self._progress.done():
            self._progress = self.server.loop.create_future()
        await self._progress

    def _wake(self) -> None:
        p = self._progress
        if p is not None and not p.done():
            p.set_result(None)

    def shutdown(self) -> None:
        """Graceful GOAWAY: calls in flight finish; the connection closes when none is left."""
        events = self.conn.shutdown()
        if events:
            self.events(events)
        self.flush()


class GrpcServer:
    """Serves ``services`` on any number of TCP and unix listening sockets of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, services: list[Service]) -> None:
        self.loop = loop
        self.services = {s.name: s for s in services}
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.closing = False

    async def listen_tcp(self, host: str, port: int) -> asyncio.AbstractServer:
        """Listen on host:port (no SO_REUSEPORT: a second sidecar on the same port must fail, not share)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
            server = await self.loop.create_server(lambda: _Connection(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.servers.append(server)
        return server

    async def listen_unix(self, path: str) -> asyncio.AbstractServer:
        """Listen on the unix socket ``path`` (a stale file from a previous run is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await self.loop.create_unix_server(lambda: _Connection(self), path)
        os.chmod(path, 0o600)
        self.servers.append(server)
        return server

    def addresses(self) -> list[Any]:
        return [sock.getsockname() for server in self.servers for sock in server.sockets]

    async def close(self, grace: float = 1.0) -> None:
        """Stop accepting; GOAWAY to every connection; calls still running after ``grace`` seconds are
        cancelled (a Watch never ends by itself) and the connections closed."""
        self.closing = True
        for server in self.servers:
            server.close()
        for c in list(self.connections):
            c.shutdown()
        deadline = self.loop.time() + grace
        while self.tasks and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self.tasks):
            task.cancel()
        for c in list(self.connections):
            c.flush()
            if c.transport is not None:
                c.transport.close()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
