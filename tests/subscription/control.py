"""An in-test control plane: ``MeshControl`` served by grpcio's asyncio server in a thread of its
own, which the test drives from its own thread: set the snapshot every new stream gets, push a
new one to every connected sidecar, end the streams with a gRPC status, and read what the
sidecars sent (their first messages, ACKs and NACKs), waiting for a given one with a bound.

It follows the protocol as the real control plane must: it waits for a stream's first message
(the node) before it sends anything, gives every response a nonce unique on the server, and
sends the snapshot in force to every stream that opens (state of the world).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from meshproxy.config.v1 import control_pb2, control_pb2_grpc
from meshproxy.config.v1.config_pb2 import SidecarConfig
from tests.integration import harness


@dataclass(frozen=True)
class Received:
    """One StreamRequest as it arrived: on which stream (numbered from 1 on this server)."""

    stream: int
    request: control_pb2.StreamRequest

    @property
    def first(self) -> bool:
        """The stream's first message (the subscription), not an ACK or NACK."""
        return not self.request.response_nonce


@dataclass(frozen=True)
class Sent:
    stream: int
    version: str
    nonce: str


class _End:
    """Queued to a stream: end it with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


class ControlServer:
    """``with ControlServer(port) as cp:`` serves on ``cp.address`` until the block ends; a new
    one on the same port is the control plane restarted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or harness.free_port()
        self.address = f"{harness.HOST}:{self.port}"
        self.received: list[Received] = []
        self.sent: list[Sent] = []
        self._cond = threading.Condition()
        self._snapshot: tuple[str, SidecarConfig] | None = None
        self._queues: dict[int, asyncio.Queue] = {}
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="control-plane", daemon=True)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> ControlServer:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        control_pb2_grpc.add_MeshControlServicer_to_server(_Servicer(self), self._server)
        # No SO_REUSEPORT: a second server on the port must fail, not share it.
        if self._server.add_insecure_port(self.address) != self.port:
            raise RuntimeError(f"cannot listen on {self.address}")
        await self._server.start()

    def stop(self) -> None:
        """Stop serving: every stream and connection ends at once."""
        if self._server is not None:
            self._call(self._server.stop(None))
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- what the test does -----------------------------------------------------------

    def set_snapshot(self, config: SidecarConfig, version: str) -> None:
        """The snapshot streams get when they open (and nothing is pushed now)."""
        snapshot = SidecarConfig()
        snapshot.CopyFrom(config)
        with self._cond:
            self._snapshot = (version, snapshot)

    def push(self, config: SidecarConfig, version: str) -> list[str]:
        """Make ``config`` the snapshot in force and send it to every open stream; the nonces sent."""
        self.set_snapshot(config, version)
        return self._call(self._push())

    async def _push(self) -> list[str]:
        return [self._send(stream, queue) for stream, queue in self._queues.items()]

    def end_streams(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, details: str = "test") -> int:
        """End every open stream with ``code``; how many there were."""
        return self._call(self._end_streams(code, details))

    async def _end_streams(self, code: grpc.StatusCode, details: str) -> int:
        for queue in self._queues.values():
            queue.put_nowait(_End(code, details))
        return len(self._queues)

    def wait(self, predicate: Callable[[Received], bool], timeout: float = 10.0, *, after: int = 0) -> Received:
        """The first message (from index ``after`` on) for which ``predicate`` holds; AssertionError
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.received[after:]:
                    if predicate(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such message within {timeout}s; received: {self.received}")
                self._cond.wait(left)

    def reply(self, nonce: str, timeout: float = 10.0) -> control_pb2.StreamRequest:
        """The ACK or NACK that answers ``nonce``."""
        return self.wait(lambda r: r.request.response_nonce == nonce, timeout).request

    def first_messages(self) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.first]

    def nonces(self, version: str) -> list[str]:
        """Every nonce sent with snapshot ``version``, in order."""
        with self._cond:
            return [s.nonce for s in self.sent if s.version == version]

    # -- inside the server's loop -------------------------------------------------------

    def _record(self, stream: int, request: control_pb2.StreamRequest) -> None:
        with self._cond:
            self.received.append(Received(stream, request))
            self._cond.notify_all()

    def _send(self, stream: int, queue: asyncio.Queue) -> str:
        with self._cond:
            if self._snapshot is None:
                return ""
            version, config = self._snapshot
            nonce = str(next(self._nonces))
            self.sent.append(Sent(stream, version, nonce))
        queue.put_nowait(control_pb2.StreamResponse(version_info=version, nonce=nonce, config=config))
        return nonce


class _Servicer(control_pb2_grpc.MeshControlServicer):
    def __init__(self, owner: ControlServer) -> None:
        self.owner = owner

    async def Stream(self, request_iterator, context):
        owner = self.owner
        stream = next(owner._stream_ids)
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        owner._record(stream, first)
        queue: asyncio.Queue = asyncio.Queue()
        owner._queues[stream] = queue

        async def read() -> None:
            async for request in requests:
                owner._record(stream, request)

        reader = asyncio.ensure_future(read())
        try:
            owner._send(stream, queue)
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    await context.abort(item.code, item.details)
                yield item
        finally:
            del owner._queues[stream]
            reader.cancel()
