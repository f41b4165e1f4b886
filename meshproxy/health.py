"""Active health checks: ``grpc.health.v1.Health/Check`` from one worker to every endpoint of the
clusters that configure ``health_check``.

Owns the checks and the verdict ``Endpoint.unhealthy``; the cluster turns
the verdict (with outlier detection's) into balancer availability. Each
endpoint gets one task and one HTTP/2 connection of its own (kept between
checks, made again after a failure), spoken with our sans-IO connection as
the control plane's stream is: no grpcio in the sidecar. A check passes
when the answer is grpc-status 0 with ``status: SERVING`` within
``timeout``; ``unhealthy_threshold`` failures in a row make the endpoint
unhealthy, ``healthy_threshold`` passes in a row healthy again. Endpoints
start healthy, so a new endpoint takes traffic before its first check (as
Linkerd), and the first check of each task is jittered over the interval
so that workers and sidecars do not check in step.

``HealthChecker.update(runtime)`` follows config changes: tasks whose
cluster, endpoint and settings are unchanged keep running (and their
counts), the others are replaced or stopped; an endpoint whose cluster no
longer checks is healthy again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from meshproxy.config import field_s
from meshproxy.conn import h2conn as h2
from meshproxy.errors import H2Error
from meshproxy.tls import upstream_args, upstream_peer
from meshproxy.wire import MessageReader, grpc_frame, read_varint, varint

if TYPE_CHECKING:
    from meshproxy.upstream import Endpoint
    from meshproxy.worker import Runtime

__all__ = ["SERVING", "HealthChecker", "check_request", "grpc_health_check", "read_response", "serving_status"]

log = logging.getLogger("meshproxy.health")

CHECK_PATH = b"/grpc.health.v1.Health/Check"
#: HealthCheckResponse.ServingStatus.SERVING
SERVING = 1


async def read_response(conn: Any, stream: Any, reader: Any, writer: Any, peer: str) -> list[bytes]:
    """The gRPC messages of ``stream``'s response, read from ``reader`` until the stream ends, our
    own client connection ``conn`` answering on ``writer`` as it goes (WINDOW_UPDATE, PING, SETTINGS
    ACK). ConnectionError when the ``peer`` closes the connection or the HTTP/2 connection fails;
    the caller bounds the wait. Also the admin service's calls to the other workers."""
    messages = MessageReader()
    got: list[bytes] = []
    while not (stream.recv_end or stream.state == "closed"):
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError(f"the {peer} closed the connection")
        for ev in conn.receive(data) or ():
            if ev[0] == h2.EV_DATA and ev[1] is stream:
                got += messages.feed(ev[2])
        out = conn.data_to_send()
        if out:
            writer.write(out)
        if conn.terminated:
            raise ConnectionError("HTTP/2 connection error")
    return got


def check_request(service: str) -> bytes:
    """A ``grpc.health.v1.HealthCheckRequest`` for ``service``, protobuf-encoded (field 1, a string)."""
    name = service.encode()
    return (b"\x0a" + varint(len(name)) + name) if name else b""


def serving_status(message: bytes) -> int:
    """The ``status`` (field 1, an enum) of a ``HealthCheckResponse``; 0 (UNKNOWN) when absent.
    ValueError for bytes that are not a protobuf message."""
    i, n, status = 0, len(message), 0
    while i < n:
        key, i = read_varint(message, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(message, i)
            if field == 1:
                status = value
        elif wire == 2:
            length, i = read_varint(message, i)
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
        if i > n:
            raise ValueError("truncated")
    return status


async def _exchange(
    conn: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str, service: str
) -> tuple[bool, str]:
    """One Health/Check on an open HTTP/2 connection: (SERVING, why not). Raises OSError, ValueError, H2Error."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", CHECK_PATH),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    stream = conn.open_stream(headers)
    conn.send_data(stream, grpc_frame(check_request(service)), True)
    writer.write(conn.data_to_send())
    got = await read_response(conn, stream, reader, writer, "endpoint")
    if stream.closed_remote_reset:
        return False, f"the check was reset (error code {stream.error_code})"
    if stream.status != 200:
        return False, f"HTTP status {stream.status}"
    if stream.grpc_status != 0:
        return False, f"grpc-status {stream.grpc_status}"
    status = serving_status(got[-1]) if got else 0
    if status != SERVING:
        return False, f"serving status {status}"
    return True, ""


async def grpc_health_check(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    """One ``grpc.health.v1.Health/Check`` of ``service`` at host:port on a connection of its own, closed
    after: (SERVING, why not), never raising (the kubelet's gRPC probe, for ``meshproxy.ready``)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            conn = h2.H2Connection(True)
            conn.initiate()
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return await _exchange(conn, reader, writer, authority, service)
    except TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except (OSError, ValueError, H2Error) as e:  # FramingError is a ValueError
        return False, str(e) or type(e).__name__
    finally:
        if writer is not None:
            writer.close()


class _Settings:
    __slots__ = ("healthy", "interval", "service", "timeout", "unhealthy")

    def __init__(self, msg: Any) -> None:
        self.interval = field_s(msg, "interval", 10.0)
        self.timeout = field_s(msg, "timeout", 1.0)
        self.unhealthy = msg.unhealthy_threshold or 3
        self.healthy = msg.healthy_threshold or 2
        self.service = msg.grpc_service_name

    def key(self) -> tuple:
        return (self.interval, self.timeout, self.unhealthy, self.healthy, self.service)


class _Check:
    """The checks of one endpoint: its task and connection."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint, settings: _Settings, worker: Any = None
    ) -> None:
        self.worker = worker  # for mTLS to endpoints of ISTIO_MUTUAL clusters (meshproxy.tls)
        self.endpoint = endpoint
        self.settings = settings
        self.fails = 0
        self.passes = 0
        self.conn: Any = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task = loop.create_task(self._run())

    def stop(self) -> None:
        self.task.cancel()
        self._disconnect()

    async def _run(self) -> None:
        s = self.settings
        await asyncio.sleep(random.uniform(0.0, s.interval))
        while True:
            ok, why = await self._check_once()
            self._verdict(ok, why)
            await asyncio.sleep(s.interval)

    def _verdict(self, ok: bool, why: str) -> None:
        ep, s = self.endpoint, self.settings
        if ok:
            self.fails = 0
            self.passes += 1
            if ep.unhealthy and self.passes >= s.healthy:
                ep.unhealthy = False
                log.info("%s is healthy again", ep.address)
                ep.cluster.refresh(ep)
        else:
            self.passes = 0
            self.fails += 1
            if not ep.unhealthy and self.fails >= s.unhealthy:
                ep.unhealthy = True
                log.warning("%s is unhealthy: %s", ep.address, why)
                ep.cluster.refresh(ep)

    async def _check_once(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await self._exchange()
        except TimeoutError:
            self._disconnect()
            return False, f"no answer within {self.settings.timeout:g}s"
        except (OSError, ValueError, H2Error) as e:  # FramingError is a ValueError
            self._disconnect()
            return False, str(e) or type(e).__name__

    async def _exchange(self) -> tuple[bool, str]:
        ep = self.endpoint
        if self.conn is None or self.conn.terminated or self.conn.goaway_received:
            self._disconnect()
            # As the requests do: mTLS to an endpoint of an ISTIO_MUTUAL cluster, its identity checked.
            tls = upstream_args(self.worker, ep) if self.worker is not None else {}
            self.reader, self.writer = await asyncio.open_connection(ep.host, ep.port, **tls)
            if tls:
                upstream_peer(self.worker, ep, self.writer.get_extra_info("peercert"))  # PeerRefused: an OSError
            self.conn = h2.H2Connection(True)
            self.conn.initiate()
        return await _exchange(self.conn, self.reader, self.writer, ep.address, self.settings.service)

    def _disconnect(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.conn = self.reader = self.writer = None


class HealthChecker:
    """One worker's active health checks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: Any = None) -> None:
        self.loop = loop
        self.worker = worker
        self._checks: dict[tuple[str, str], _Check] = {}

    def update(self, runtime: Runtime) -> None:
        """Bring the checks in line with ``runtime``'s clusters (see the module docstring)."""
        wanted: dict[tuple[str, str], tuple[Endpoint, _Settings]] = {}
        for cluster in runtime.clusters.values():
            msg = cluster.health_check
            if msg is None:
                for ep in cluster.endpoints:
                    if ep.unhealthy:
                        ep.unhealthy = False
                        cluster.refresh(ep)
                continue
            settings = _Settings(msg)
            for ep in cluster.endpoints:
                wanted[(cluster.name, ep.address)] = (ep, settings)
        for key, check in list(self._checks.items()):
            want = wanted.get(key)
            if want is None or want[0] is not check.endpoint or want[1].key() != check.settings.key():
                check.stop()
                del self._checks[key]
        for key, (ep, settings) in wanted.items():
            if key not in self._checks:
                self._checks[key] = _Check(self.loop, ep, settings, self.worker)

    def stop(self) -> None:
        for check in self._checks.values():
            check.stop()
        self._checks.clear()
