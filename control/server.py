"""The streaming config API (``meshproxy.v1.MeshControl/Stream``) and the push loop behind it.

One ``ControlServer`` per control-plane process, on one asyncio loop:

- Sources write to the ``Store`` from any thread; ``changed()`` (thread-safe)
  starts the debounce: the configs are recomputed once the store has been
  quiet for ``debounce`` (100 ms), and at most ``max_delay`` (1 s) after the
  first change of a burst, so a stream of changes cannot starve pushes.
- A recompute parses the store into a Model, logs and counts the problems
  that are new, and builds a ``Translator``; then every subscriber whose
  scope's config version differs from what it was last sent is woken. Only
  those get a push, each with its own nonce; the config bytes are built
  once per scope and shared.
- Each stream is one handler coroutine (writes) and one reader task (ACKs
  and NACKs); a subscriber's state (what it was sent, what it ACKed, its last
  NACK) is what ``status()`` reports. A NACK is logged and counted, and the
  same version is not sent again: the sidecar keeps its last good config
  until a new version comes.

``ProxyStatus`` answers ``status()`` as protos (``meshctl proxy-status``).
``SignCertificate`` is ``control.ca.SignCertificateService`` when the
server has a CA (``ca`` and ``authenticator``); the CA's trust bundle goes
into every config, and a change of it (a root rotation) recomputes them.
Without a CA grpcio answers UNIMPLEMENTED and configs carry no security.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from control.model import parse
from control.store import Store
from control.translate import Translator
from meshproxy.config import parse_address
from meshproxy.config.v1 import control_pb2 as cpb
from meshproxy.wire import varint

__all__ = ["ControlServer", "Subscriber", "serve"]

log = logging.getLogger("meshproxy.control")

SERVICE = "meshproxy.v1.MeshControl"
_CONFIG_TAG = b"\x1a"  # StreamResponse.config: field 3, length-delimited


@dataclass(eq=False)
class Subscriber:
    """One sidecar stream (one worker of one sidecar)."""

    node: cpb.Node  # type: ignore[name-defined]
    worker: int
    peer: str
    connected_at: float = field(default_factory=time.time)
    #: The version the sidecar said it runs when it subscribed, then what it ACKs.
    acked_version: str = ""
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float = 0.0
    acked_at: float = 0.0
    nacked_version: str = ""
    nack_nonce: str = ""
    nack_message: str = ""
    nacks: int = 0
    #: What it should have: set by the push loop, written by the stream's handler.
    target_version: str = ""
    #: What the stream's handler awaits while there is nothing to send (one future, not a task,
    #: per wait: a push to 10,000 sidecars wakes 10,000 of them).
    waiter: asyncio.Future | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    @property
    def labels(self) -> Mapping[str, str]:
        return self.node.labels

    def describe(self) -> str:
        return f"{self.node.id} ({self.node.namespace}/{self.node.workload}, worker {self.worker}, {self.peer})"


class ControlServer:
    """Recomputes configs when the store changes and pushes them to the subscribed sidecars."""

    def __init__(
        self,
        store: Store,
        *,
        cluster_domain: str = "cluster.local",
        default_export_to: tuple[str, ...] = ("*",),
        debounce: float = 0.1,
        max_delay: float = 1.0,
        ca=None,
        authenticator=None,
        root_namespace: str = "meshproxy-system",
    ) -> None:
        self.store = store
        self.ca = ca
        self.root_namespace = root_namespace
        self.signer = None
        if ca is not None and authenticator is not None:
            from control.ca import SignCertificateService

            self.signer = SignCertificateService(ca, authenticator)
        self.cluster_domain = cluster_domain
        self.default_export_to = default_export_to
        self.debounce = debounce
        self.max_delay = max_delay
        self.loop: asyncio.AbstractEventLoop | None = None
        self.translator: Translator | None = None
        self.revision = -1
        self.subscribers: set[Subscriber] = set()
        self._payloads: dict[tuple, tuple[str, bytes]] = {}
        self._nonces = itertools.count(1)
        self._burst_start: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._problems: set[str] = set()
        # Counters (exported as metrics by the observability layer).
        self.pushes = 0
        self.acks = 0
        self.nacks = 0
        self.recomputes = 0
        self.rejected_resources = 0

    # -- change detection -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Compute the first configs now and follow the store from here on."""
        self.loop = loop
        self.store.on_change = self.changed
        self.recompute()

    def changed(self) -> None:
        """The store changed (callable from any thread)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._schedule)

    def bundle_changed(self, _bundle=None) -> None:
        """The CA's trust bundle changed (callable from any thread): recompute every config."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._force)

    def _force(self) -> None:
        self.revision = -2  # no store revision: the next recompute rebuilds
        self._schedule()

    def _schedule(self) -> None:
        now = self.loop.time()
        if self._burst_start is None:
            self._burst_start = now
        if self._timer is not None:
            self._timer.cancel()
        when = min(now + self.debounce, self._burst_start + self.max_delay)
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._burst_start = None
        self.recompute()

    def recompute(self) -> None:
        revision, objects = self.store.snapshot()
        if revision == self.revision and self.translator is not None:
            return
        t0 = time.perf_counter()
        model = parse(objects, cluster_domain=self.cluster_domain)
        translator = Translator(
            model,
            default_export_to=self.default_export_to,
            trust_domain=self.ca.trust_domain if self.ca is not None else "cluster.local",
            trust_bundle=self.ca.trust_bundle() if self.ca is not None else (),
            root_namespace=self.root_namespace,
        )
        self._report(translator)
        self.translator, self.revision = translator, revision
        self._payloads = {}
        self.recomputes += 1
        woken = 0
        for sub in self.subscribers:
            version = self._payload(sub)[0]
            if version != sub.target_version:
                sub.target_version = version
                sub.wake()
                woken += 1
        log.info(
            "store revision %d: %d resources, %d errors; %d of %d sidecars to push (%.1f ms)",
            revision,
            len(objects),
            self.rejected_resources,
            woken,
            len(self.subscribers),
            (time.perf_counter() - t0) * 1e3,
        )

    def _report(self, translator: Translator) -> None:
        """Log each problem once, when it first appears; count the resources set aside."""
        current = {str(p): p for p in translator.problems}
        for text, p in current.items():
            if text not in self._problems:
                (log.error if p.severity == "error" else log.warning)("%s", text)
        for text in self._problems - current.keys():
            log.info("resolved: %s", text)
        self._problems = set(current)
        self.rejected_resources = len({p.resource for p in translator.problems if p.severity == "error"})

    def _payload(self, sub: Subscriber) -> tuple[str, bytes]:
        """(version, serialized SidecarConfig) for ``sub``'s scope, built once per scope and recompute."""
        scope = self.translator.scope(sub.node.namespace, sub.labels)
        got = self._payloads.get(scope)
        if got is None:
            cfg = self.translator.config(sub.node.namespace, sub.labels)
            got = (cfg.version, cfg.SerializeToString())
            self._payloads[scope] = got
        return got

    # -- the stream ---------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {}
        if self.signer is not None:
            methods["SignCertificate"] = grpc.unary_unary_rpc_method_handler(
                self.signer.sign,
                request_deserializer=cpb.SignCertificateRequest.FromString,
                response_serializer=cpb.SignCertificateResponse.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(
            SERVICE,
            methods
            | {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=cpb.StreamRequest.FromString,
                    # Responses are built as bytes (the config part shared across sidecars).
                    response_serializer=None,
                ),
                "ProxyStatus": grpc.unary_unary_rpc_method_handler(
                    self._proxy_status,
                    request_deserializer=cpb.ProxyStatusRequest.FromString,
                    response_serializer=cpb.ProxyStatusResponse.SerializeToString,
                ),
            },
        )

    async def _stream(self, requests, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        node = first.node
        if not node.id or not node.namespace:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry node.id and node.namespace"
            )
        sub = Subscriber(node=node, worker=first.worker, peer=context.peer(), acked_version=first.version_info)
        sub.target_version = self._payload(sub)[0]
        self.subscribers.add(sub)
        log.info("%s subscribed (running version %r)", sub.describe(), first.version_info)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(sub, requests))
        reader.add_done_callback(lambda _: sub.wake())
        try:
            while not reader.done():
                if sub.target_version != sub.sent_version:
                    version, body = self._payload(sub)
                    nonce = str(next(self._nonces))
                    head = cpb.StreamResponse(version_info=version, nonce=nonce).SerializeToString()
                    sub.sent_version, sub.sent_nonce, sub.sent_at = version, nonce, time.time()
                    self.pushes += 1
                    await context.write(head + _CONFIG_TAG + varint(len(body)) + body)
                    continue
                sub.waiter = loop.create_future()
                await sub.waiter
        finally:
            self.subscribers.discard(sub)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            log.info("%s disconnected", sub.describe())

    async def _read(self, sub: Subscriber, requests) -> None:
        async for msg in requests:
            if msg.response_nonce != sub.sent_nonce:
                continue  # answers a snapshot that a newer one replaced
            if msg.HasField("error_detail"):
                sub.nacked_version, sub.nack_nonce = sub.sent_version, msg.response_nonce
                sub.nack_message = msg.error_detail.message
                sub.nacks += 1
                self.nacks += 1
                log.warning(
                    "%s refused version %s (keeps %r): %s",
                    sub.describe(),
                    sub.sent_version,
                    msg.version_info,
                    msg.error_detail.message,
                )
            else:
                sub.acked_version, sub.acked_at = msg.version_info, time.time()
                self.acks += 1

    # -- status ---------------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every connected sidecar: who, what it was sent, what it ACKed, its last NACK."""
        out = []
        for sub in sorted(self.subscribers, key=lambda s: (s.node.namespace, s.node.id, s.worker)):
            out.append(
                {
                    "id": sub.node.id,
                    "namespace": sub.node.namespace,
                    "workload": sub.node.workload,
                    "labels": dict(sub.node.labels),
                    "worker": sub.worker,
                    "peer": sub.peer,
                    "connected_at": sub.connected_at,
                    "target": sub.target_version,
                    "sent": sub.sent_version,
                    "sent_nonce": sub.sent_nonce,
                    "sent_at": sub.sent_at,
                    "acked": sub.acked_version,
                    "acked_at": sub.acked_at,
                    "nacked": sub.nacked_version,
                    "nack_nonce": sub.nack_nonce,
                    "nack_message": sub.nack_message,
                    "nacks": sub.nacks,
                    "state": _state(sub),
                }
            )
        return out

    async def _proxy_status(self, request, context: grpc.aio.ServicerContext) -> cpb.ProxyStatusResponse:
        response = cpb.ProxyStatusResponse(revision=self.revision)
        for row in self.status():
            if (request.namespace and row["namespace"] != request.namespace) or (
                request.node_id and row["id"] != request.node_id
            ):
                continue
            status = response.proxies.add(
                node_id=row["id"],
                namespace=row["namespace"],
                workload=row["workload"],
                labels=row["labels"],
                worker=row["worker"],
                peer=row["peer"],
                target_version=row["target"],
                sent_version=row["sent"],
                sent_nonce=row["sent_nonce"],
                acked_version=row["acked"],
                nacked_version=row["nacked"],
                nack_nonce=row["nack_nonce"],
                nack_message=row["nack_message"],
                nacks=row["nacks"],
                state=cpb.ProxyStatus.State.Value(row["state"]),
            )
            status.connected_since.FromNanoseconds(int(row["connected_at"] * 1e9))
            # Unset (not 1970) when nothing was sent or ACKed yet.
            if row["sent_at"]:
                status.sent_at.FromNanoseconds(int(row["sent_at"] * 1e9))
            if row["acked_at"]:
                status.acked_at.FromNanoseconds(int(row["acked_at"] * 1e9))
        return response


def _state(sub: Subscriber) -> str:
    if sub.acked_version == sub.sent_version and sub.sent_version == sub.target_version:
        return "SYNCED"
    # By nonce: before the first snapshot is sent, nacked and sent versions are both "".
    return "NACKED" if sub.nack_nonce and sub.nack_nonce == sub.sent_nonce else "STALE"


async def serve(control: ControlServer, address: str) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server for ``control`` on ``address``; returns it (started) and its port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 4 << 20),
            # Sidecars hold one stream for hours: keep idle connections honest.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.max_concurrent_streams", 1000),
            # A fleet reconnects at once after a restart: 10,000 sidecars arrive within seconds,
            # faster than calls are handed to Python (~1,000/s). grpc's defaults refuse calls
            # beyond 1,000-3,000 waiting (RESOURCE_EXHAUSTED) and cancel those waiting over 30 s;
            # let them wait instead, as retrying would only bring them back.
            ("grpc.server.max_pending_requests", 50_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
            ("grpc.server_max_unrequested_time_in_server", 300),
        ]
    )
    server.add_generic_rpc_handlers((control.handler(),))
    # Bind once ourselves first: a port in use is then a plain OSError ("Address already in
    # use"), where grpc would log a core error line and raise a vaguer one.
    host, port = parse_address(address, listener=True)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, port))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
