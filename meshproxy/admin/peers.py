"""Worker 0's calls to the other workers' admin service, over their private unix sockets.

Owns the multi-worker side of the admin service (``--concurrency N``):
worker 0 answers the public admin address and ``/metrics`` for the whole
sidecar, and asks workers 1..N-1 for their own figures with unary calls of
``meshproxy.admin.v1.Admin`` spoken over our own sans-IO HTTP/2 client
connection (no grpcio in the sidecar), one short connection per call. A
worker that does not answer within ``timeout`` is left out (logged), so
one stuck worker does not take the sidecar's metrics with it; each
response says how many workers it covers (``meshproxy.telemetry.metrics``
sums their figures).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

from google.protobuf.message import DecodeError

from meshproxy.admin.v1 import admin_pb2
from meshproxy.conn import h2conn as h2
from meshproxy.errors import H2Error
from meshproxy.health import read_response
from meshproxy.wire import FramingError, grpc_frame

__all__ = ["PeerError", "Peers", "unary"]

log = logging.getLogger("meshproxy.admin")

SERVICE = "/meshproxy.admin.v1.Admin/"
TIMEOUT = 5.0


class PeerError(Exception):
    """A call to another worker failed (one line)."""


async def unary(path: str, method: str, request: Any, response_cls: Any, timeout: float = TIMEOUT) -> Any:
    """Call ``meshproxy.admin.v1.Admin/<method>`` on the admin server at unix socket ``path``."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            conn = h2.H2Connection(True)
            conn.initiate()
            stream = conn.open_stream(
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", (SERVICE + method).encode()),
                    (b":authority", b"localhost"),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                    (b"grpc-timeout", b"%dm" % max(1, int(timeout * 1000))),
                ]
            )
            conn.send_data(stream, grpc_frame(request.SerializeToString()), True)
            writer.write(conn.data_to_send())
            # Bounded by the timeout.
            got = await read_response(conn, stream, reader, writer, "worker")
    except TimeoutError:
        raise PeerError(f"no answer within {timeout:g}s") from None
    except (OSError, H2Error, FramingError) as e:
        raise PeerError(str(e) or type(e).__name__) from None
    finally:
        if writer is not None:
            writer.close()
    if stream.closed_remote_reset:
        raise PeerError(f"the call was reset (error code {stream.error_code})")
    if stream.grpc_status != 0:
        message = next((v for n, v in stream.trailers or stream.headers or () if n == b"grpc-message"), b"")
        raise PeerError(f"grpc-status {stream.grpc_status}: {unquote(message.decode('utf-8', 'replace'))}")
    if len(got) != 1:
        raise PeerError(f"{len(got)} response messages")
    try:
        return response_cls.FromString(got[0])
    except DecodeError as e:
        raise PeerError(f"the response does not parse: {e}") from None


class Peers:
    """The other workers of this sidecar, by the paths of their private admin sockets."""

    def __init__(self, paths: list[str], timeout: float = TIMEOUT) -> None:
        self.paths = list(paths)
        self.timeout = timeout

    async def _all(self, method: str, request: Any, response_cls: Any) -> list[Any]:
        results = await asyncio.gather(
            *(unary(p, method, request, response_cls, self.timeout) for p in self.paths), return_exceptions=True
        )
        out = []
        for path, r in zip(self.paths, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, PeerError):
                    log.error("admin: %s on %s failed", method, path, exc_info=r)
                else:
                    log.warning("admin: worker at %s: %s failed: %s", path, method, r)
                continue
            out.append(r)
        return out

    async def stats(self, prefixes: list[str] | tuple[str, ...] = ()) -> list[Any]:
        """Each answering worker's own ``StatsResponse`` (``local_only``)."""
        return await self._all(
            "GetStats", admin_pb2.StatsRequest(prefixes=list(prefixes), local_only=True), admin_pb2.StatsResponse
        )

    async def clusters(self, name: str = "") -> list[Any]:
        """Each answering worker's ``ClustersResponse``."""
        return await self._all("GetClusters", admin_pb2.ClustersRequest(name=name), admin_pb2.ClustersResponse)

    async def drain(self) -> list[Any]:
        """Drain every other worker (they keep running); their ``DrainResponse``s."""
        return await self._all("Drain", admin_pb2.DrainRequest(), admin_pb2.DrainResponse)

    async def set_log_level(self, logger: str, level: str) -> list[Any]:
        return await self._all(
            "SetLogLevel", admin_pb2.LogLevelRequest(logger=logger, level=level), admin_pb2.LogLevelResponse
        )
