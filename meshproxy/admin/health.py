"""``grpc.health.v1.Health`` (Check, Watch, List) on the admin server: the sidecar's own health.

Owns the serving status the admin server reports for the whole server
("") and for ``meshproxy.admin.v1.Admin``: SERVING while the worker is
ready (a config in force, its listeners accepting, not draining: what
``/ready`` says), NOT_SERVING otherwise, so a Drain turns it. Check of
another service is NOT_FOUND; Watch of one sends SERVICE_UNKNOWN and stays
open, as the gRPC health protocol says. Watch sends the status at once and
then each change: the worker's config swaps and drain wake the watchers
(``changed``), and a slow re-check catches the rest (a listener starting to
accept after its swap).
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshproxy.admin.grpc_health_v1 import health_pb2
from meshproxy.admin.grpcserver import Call, GrpcError, Service, Status

__all__ = ["ADMIN_SERVICE", "Health", "health_service"]

ADMIN_SERVICE = "meshproxy.admin.v1.Admin"
#: Seconds between a watcher's re-checks when nothing woke it.
RECHECK = 1.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health:
    """The health service of one worker's admin server."""

    def __init__(self, worker: Any, services: tuple[str, ...] = ("", ADMIN_SERVICE)) -> None:
        self.worker = worker
        self.services = services
        # One future per watcher, resolved by a change or by the watcher's re-check timer.
        self._waiters: set[asyncio.Future] = set()

    def status(self) -> int:
        return SERVING if self.worker.ready else NOT_SERVING

    def changed(self, *_: Any) -> None:
        """Wake the watchers (a worker hook: called with the new runtime, or nothing)."""
        for wake in self._waiters:
            if not wake.done():
                wake.set_result(None)

    async def Check(self, request: Any, call: Call) -> Any:
        if request.service not in self.services:
            raise GrpcError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status())

    async def List(self, request: Any, call: Call) -> Any:
        status = self.status()
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name in self.services}
        )

    async def Watch(self, request: Any, call: Call) -> None:
        known = request.service in self.services
        last = -1
        loop = asyncio.get_running_loop()
        # Ends when the client cancels, the connection goes, the call's deadline passes or the server
        # closes (the task is cancelled). The wait is a future, not a nested asyncio.timeout: on
        # Python 3.11 an inner timeout expiring together with the call's deadline can turn the
        # deadline's cancellation into its own TimeoutError, which would be swallowed here.
        while True:
            wake = loop.create_future()  # registered first: a change while we send still wakes us
            self._waiters.add(wake)
            timer = loop.call_later(RECHECK, _resolve, wake)
            try:
                status = self.status() if known else SERVICE_UNKNOWN
                if status != last:
                    await call.send(health_pb2.HealthCheckResponse(status=status))
                    last = status
                await wake
            finally:
                timer.cancel()
                self._waiters.discard(wake)


def _resolve(wake: asyncio.Future) -> None:
    if not wake.done():
        wake.set_result(None)


def health_service(health: Health) -> Service:
    return Service(health_pb2.DESCRIPTOR.services_by_name["Health"], health)
