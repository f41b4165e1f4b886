"""The transport side of one HTTP/2 connection, either direction.

``H2Protocol`` joins an asyncio (uvloop) transport to a compiled connection:
bytes read go to ``conn.receive`` in one call, the events that come back go
to the subclass's ``_events``, and the worker's outbox is flushed once per
read, so every connection that gained output is written once. Any transport
works, a TLS one included: the protocol never looks below ``write``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshproxy.worker import Worker

__all__ = ["H2Protocol", "listening_socket"]


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (an IP literal), bound now (OSError if it
    cannot be) and shared with the other workers (SO_REUSEPORT); IPv6 sockets are IPv6 only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class H2Protocol(asyncio.Protocol):
    """Base of the downstream and upstream protocols; subclasses handle events in ``_events``."""

    __slots__ = ("conn", "transport", "worker")

    def __init__(self, worker: Worker, conn: Any) -> None:
        self.worker = worker
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.writer = transport.write
        self.conn.handler = self._events
        self.conn.initiate()

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive(data)
        if events is not None:
            self._events(events)
        self.worker.outbox.flush()

    def _events(self, events: list) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        self.worker.outbox.flush()
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()
        self.worker.outbox.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.writer = None
        events = self.conn.connection_lost()
        if events is not None:
            self._events(events)
