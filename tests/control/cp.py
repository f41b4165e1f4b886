"""Test helpers: a control plane on its own loop in a thread, and a plain grpcio stream client.

``LocalControlPlane(directory)`` runs the real pieces (Store, DirectorySource,
ControlServer, the grpc.aio server) on 127.0.0.1 in a background thread, so a
test can drive it from ordinary synchronous code; ``call()`` runs a function
on its loop. ``StreamClient`` is a sidecar as seen by the API: it subscribes,
collects snapshots, and ACKs or NACKs them when the test says so.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from control.server import ControlServer, serve
from control.sources.files import DirectorySource
from control.store import Store
from meshproxy.config.v1 import config_pb2, control_pb2, control_pb2_grpc


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class LocalControlPlane:
    def __init__(self, directory: Path, *, port: int = 0, **kwargs: Any) -> None:
        self.directory = Path(directory)
        self.kwargs = kwargs
        self.requested_port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> LocalControlPlane:
        self.thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        self.store = Store()
        self.control = ControlServer(self.store, **self.kwargs)
        self.source = DirectorySource(self.store, self.directory)
        self.source.start()
        self.control.start(self.loop)
        self.server, self.port = await serve(self.control, f"127.0.0.1:{self.requested_port}")

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run ``fn(*args)`` (a function or a coroutine function) on the control plane's loop."""

        async def run() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self) -> list[dict]:
        return self.call(self.control.status)

    def stop(self) -> None:
        async def stop() -> None:
            await self.server.stop(grace=0.2)
            await self.source.stop()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def __enter__(self) -> LocalControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StreamClient:
    """One subscription through grpcio. ``snapshots`` fills as responses arrive."""

    def __init__(
        self,
        address: str,
        *,
        node_id: str = "n1",
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        version: str = "",
        worker: int = 0,
        auto_ack: bool = True,
    ) -> None:
        self.channel = grpc.insecure_channel(address)
        self.requests: queue.Queue = queue.Queue()
        self.snapshots: list[control_pb2.StreamResponse] = []
        self.auto_ack = auto_ack
        self.error: grpc.RpcError | None = None
        node = config_pb2.Node(id=node_id, namespace=namespace, workload="w", labels=labels or {})
        self.requests.put(control_pb2.StreamRequest(node=node, version_info=version, worker=worker))
        self.call = control_pb2_grpc.MeshControlStub(self.channel).Stream(iter(self.requests.get, None))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.snapshots.append(response)
                if self.auto_ack:
                    self.ack(response)
        except grpc.RpcError as e:
            self.error = e

    def ack(self, response: control_pb2.StreamResponse) -> None:
        self.requests.put(control_pb2.StreamRequest(version_info=response.version_info, response_nonce=response.nonce))

    def nack(self, response: control_pb2.StreamResponse, running: str, message: str) -> None:
        self.requests.put(
            control_pb2.StreamRequest(
                version_info=running,
                response_nonce=response.nonce,
                error_detail=control_pb2.ErrorDetail(message=message),
            )
        )

    def wait_snapshots(self, n: int, timeout: float = 5.0) -> control_pb2.StreamResponse:
        wait_for(lambda: len(self.snapshots) >= n, timeout)
        return self.snapshots[n - 1]

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()
        self.thread.join(5)

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
