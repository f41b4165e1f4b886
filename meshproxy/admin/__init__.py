"""The sidecar's admin service: ``meshproxy.admin.v1.Admin`` over gRPC on ``--admin`` (default 127.0.0.1:15000).

Served by the sidecar's own HTTP/2 core (``grpcserver``; no grpcio in the
sidecar) next to ``grpc.health.v1.Health`` (``health``) and server
reflection v1 and v1alpha (``reflection``), so that grpcurl, grpcio's
reflection client and ``meshctl`` work without the .proto files. The
handlers are in ``service``; with ``--concurrency N`` worker 0 serves the
public address and asks the other workers, which answer on private unix
sockets (``peers``).

``start(worker, address, peers, private_path)`` is the one entry point.
"""

from __future__ import annotations

from typing import Any

from meshproxy.admin.grpcserver import GrpcServer, Service
from meshproxy.admin.health import Health, health_service
from meshproxy.admin.peers import Peers
from meshproxy.admin.reflection import reflection_services
from meshproxy.admin.service import Admin, ResourceTracker
from meshproxy.admin.v1 import admin_pb2

__all__ = ["AdminServer", "start"]

# The running servers. Nothing else need hold them (the command line keeps no handle), and
# uvloop closes a unix listening socket whose server object is garbage-collected.
_running: set[AdminServer] = set()


class AdminServer:
    """A worker's running admin server: ``addresses`` bound, ``await close()`` to stop it."""

    def __init__(self, server: GrpcServer, health: Health, admin: Admin) -> None:
        self.server = server
        self.health = health
        self.admin = admin

    @property
    def addresses(self) -> list[Any]:
        """The bound addresses: (host, port) for TCP, the path for a unix socket."""
        return self.server.addresses()

    async def close(self) -> None:
        _running.discard(self)
        await self.server.close()


async def start(
    worker: Any,
    address: tuple[str, int] | str | None,
    peers_paths: list[str] | None = None,
    private_path: str | None = None,
) -> AdminServer:
    """Start ``worker``'s admin server: on TCP ``address`` ((host, port) or "host:port"; None: none)
    and/or the unix socket ``private_path`` (where a worker other than 0 answers worker 0).
    ``peers_paths``: the other workers' private sockets, which this worker's public answers include.
    Raises OSError when an address cannot be bound."""
    from meshproxy.config import parse_address

    tracker = ResourceTracker()
    worker.on_config.append(tracker)
    if worker.runtime is not None:
        tracker(worker.runtime)
    health = Health(worker)
    worker.on_config.append(health.changed)
    worker.on_drain.append(health.changed)
    admin = Admin(worker, tracker, Peers(peers_paths) if peers_paths else None)
    services = [Service(admin_pb2.DESCRIPTOR.services_by_name["Admin"], admin), health_service(health)]
    services += reflection_services([s.descriptor for s in services])
    server = GrpcServer(worker.loop, services)
    try:
        if address is not None:
            host, port = parse_address(address, listener=True) if isinstance(address, str) else address
            await server.listen_tcp(host, port)
        if private_path is not None:
            await server.listen_unix(private_path)
    except BaseException:
        await server.close(grace=0)
        raise
    running = AdminServer(server, health, admin)
    _running.add(running)
    return running
