"""Kubernetes as a config source: list+watch of every kind translation reads, trimmed, into the Store.

One daemon thread per kind runs a reflector in client-go's manner: list (``store.replace`` of that kind's
source), then watch from the list's resourceVersion, upserting and deleting as events arrive and resuming
from the last resourceVersion seen when a watch ends. 410 Gone means relist; other errors back off with full
jitter. Objects are trimmed to what translation reads before they reach the store, so churn elsewhere in
them (status, managedFields, resourceVersion) neither signals a recompute nor costs memory.

Custom resources are optional: a kind whose group/version is not served (Istio not installed), or that we may
not read, is held empty and looked for again every ``recheck_interval`` seconds, so a cluster without Istio's
CRDs works with our own ``meshproxy.io`` ones alone.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from control.store import Store, key_of

__all__ = ["Backoff", "KubeSource"]

log = logging.getLogger("meshproxy.control.kube")

#: Seconds the API server keeps one watch open; the watch then resumes from the last resourceVersion.
WATCH_TIMEOUT = 300
#: Seconds between looks for a custom resource kind that is not served (or not readable).
RECHECK_INTERVAL = 30.0
BACKOFF_BASE = 0.2
BACKOFF_CAP = 30.0
#: Items per list page: a large cluster's pods arrive in pieces rather than as one huge response.
LIST_PAGE = 500
_CONNECT_TIMEOUT = 10.0
_LIST_READ_TIMEOUT = 60.0
# A watch may sit idle until the server ends it; the client-side read timeout is only there to notice a
# peer that vanished without closing the connection.
_WATCH_READ_SLACK = 30.0
# kubectl's copy of the whole object as last applied: large, and nothing in translation reads it.
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# Top-level fields kept per kind: None keeps the field whole, a tuple keeps only those keys of it.
_Keep = dict[str, tuple[str, ...] | None]
_SPEC_ONLY: _Keep = {"spec": None}


@dataclass(frozen=True)
class _Kind:
    group: str  # "" for the core group
    versions: tuple[str, ...]  # tried in order; the first one served is the one watched
    plural: str
    kind: str
    keep: _Keep
    optional: bool = False  # not served, or forbidden: held empty instead of holding up sync

    @property
    def source(self) -> str:
        return f"kube/{self.group or 'core'}/{self.plural}"


_NETWORKING = (
    ("virtualservices", "VirtualService"),
    ("destinationrules", "DestinationRule"),
    ("serviceentries", "ServiceEntry"),
)
_SECURITY = (("peerauthentications", "PeerAuthentication"), ("authorizationpolicies", "AuthorizationPolicy"))


def _custom(group: str, versions: tuple[str, ...], kinds: tuple[tuple[str, str], ...]) -> list[_Kind]:
    return [_Kind(group, versions, plural, kind, _SPEC_ONLY, optional=True) for plural, kind in kinds]


KINDS: tuple[_Kind, ...] = (
    _Kind("", ("v1",), "namespaces", "Namespace", {}, optional=True),
    _Kind("", ("v1",), "services", "Service", _SPEC_ONLY),
    _Kind("", ("v1",), "pods", "Pod", {"spec": ("serviceAccountName",), "status": ("phase", "podIP", "podIPs")}),
    _Kind(
        "discovery.k8s.io",
        ("v1",),
        "endpointslices",
        "EndpointSlice",
        dict.fromkeys(("addressType", "endpoints", "ports")),
    ),
    *_custom("networking.istio.io", ("v1", "v1beta1", "v1alpha3"), _NETWORKING),
    *_custom("security.istio.io", ("v1", "v1beta1"), _SECURITY),
    *_custom("meshproxy.io", ("v1alpha1",), _NETWORKING + _SECURITY),
)


def trim(kind: _Kind, api_version: str, obj: dict[str, Any]) -> dict[str, Any]:
    """The part of ``obj`` translation reads, with apiVersion and kind filled in (list items lack them)."""
    meta = obj.get("metadata") or {}
    out_meta: dict[str, Any] = {"name": meta.get("name")}
    if meta.get("namespace"):
        out_meta["namespace"] = meta["namespace"]
    if meta.get("labels"):
        out_meta["labels"] = meta["labels"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != _LAST_APPLIED}
    if annotations:
        out_meta["annotations"] = annotations
    out: dict[str, Any] = {"apiVersion": api_version, "kind": kind.kind, "metadata": out_meta}
    for field, subfields in kind.keep.items():
        value = obj.get(field)
        if value is not None and subfields is not None:
            value = {k: value[k] for k in subfields if k in value} if isinstance(value, dict) else None
        if value is not None and value != {}:
            out[field] = value
    return out


class Backoff:
    """Full-jitter exponential backoff: the n-th delay in a row is uniform in [0, min(cap, base * 2**n))."""

    def __init__(self, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> None:
        self.base = base
        self.cap = cap
        #: Failures since the last success.
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 32))
        self.failures += 1
        return random.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0


class _Stopped(Exception):
    """The source is stopping: unwinds a reflector from wherever it is."""


class KubeSource:
    """List+watch of the mesh's kinds into ``store`` through ``api_client``: all namespaces, or only ``namespace``.

    ``synced`` is set once every kind has completed its first list (or been found not served). The
    reflectors share ``api_client``, each holding one watch connection open: a configuration whose
    ``connection_pool_maxsize`` exceeds ``len(KINDS)`` lets urllib3 keep them all rather than discard some.
    """

    def __init__(
        self,
        store: Store,
        api_client: client.ApiClient,
        *,
        namespace: str | None = None,
        watch_timeout: int = WATCH_TIMEOUT,
        recheck_interval: float = RECHECK_INTERVAL,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.synced = threading.Event()
        self.watch_timeout = watch_timeout
        self.recheck_interval = recheck_interval
        self._core = client.CoreV1Api(api_client)
        self._discovery = client.DiscoveryV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._unsynced = {kind.source for kind in KINDS}
        self._reflectors = [_Reflector(self, kind, Backoff(backoff_base, backoff_cap)) for kind in KINDS]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("KubeSource is already started")
        for r in self._reflectors:
            t = threading.Thread(target=r.run, name=f"kube-{r.kind.group or 'core'}-{r.kind.plural}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every reflector and join its thread; open watches are cut at the socket, not waited out."""
        with self._lock:
            self._stopping.set()
            responses = [r.response for r in self._reflectors if r.response is not None]
        for resp in responses:
            _shutdown(resp)
        for t in self._threads:
            if t is threading.current_thread():  # stop() from a store callback: that reflector ends on return
                continue
            t.join(timeout)
            if t.is_alive():
                log.warning("%s did not stop within %.1fs", t.name, timeout)

    # -- for the reflectors -----------------------------------------------------------------------------

    def _mark_synced(self, kind: _Kind) -> None:
        with self._lock:
            self._unsynced.discard(kind.source)
            done = not self._unsynced
        if done and not self.synced.is_set():
            log.info("every kind listed")
            self.synced.set()

    def _opened(self, reflector: _Reflector, resp: urllib3.HTTPResponse) -> None:
        """Let stop() find the open watch; one opened after stop() began is closed here instead."""
        with self._lock:
            stopping = self._stopping.is_set()
            if not stopping:
                reflector.response = resp
        if stopping:
            resp.close()
            raise _Stopped

    def _closed(self, reflector: _Reflector) -> None:
        with self._lock:
            reflector.response = None

    def _request(self, kind: _Kind, version: str, **params: Any) -> urllib3.HTTPResponse:
        """One list or watch call for ``kind`` at ``version``, answered as the raw, unread HTTP response."""
        params = {k: v for k, v in params.items() if v is not None}
        # raw JSON: the store wants the API's dicts, and model objects would cost a conversion each way
        params["_preload_content"] = False
        ns = self.namespace
        if kind.plural == "namespaces":
            if ns is not None:
                # a namespace-bound source needs only its own Namespace, which RBAC can grant by name
                params["field_selector"] = f"metadata.name={ns}"
            return self._core.list_namespace(**params)
        if kind.plural == "services" and kind.group == "":
            if ns is None:
                return self._core.list_service_for_all_namespaces(**params)
            return self._core.list_namespaced_service(ns, **params)
        if kind.plural == "pods" and kind.group == "":
            if ns is None:
                return self._core.list_pod_for_all_namespaces(**params)
            return self._core.list_namespaced_pod(ns, **params)
        if kind.plural == "endpointslices":
            if ns is None:
                return self._discovery.list_endpoint_slice_for_all_namespaces(**params)
            return self._discovery.list_namespaced_endpoint_slice(ns, **params)
        if ns is None:
            return self._custom.list_cluster_custom_object(kind.group, version, kind.plural, **params)
        return self._custom.list_namespaced_custom_object(kind.group, version, ns, kind.plural, **params)


def _shutdown(resp: urllib3.HTTPResponse) -> None:
    # closing a response that another thread is blocked reading can wait on that read; shutting the socket
    # down wakes the reader instead, and it closes the response itself
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Reflector:
    """One kind's list+watch loop, run on its own thread."""

    def __init__(self, source: KubeSource, kind: _Kind, backoff: Backoff) -> None:
        self.source = source
        self.kind = kind
        self.response: urllib3.HTTPResponse | None = None  # the open watch, for stop() to cut
        self._backoff = backoff
        self._version = kind.versions[0]
        self._available: bool | None = None  # for optional kinds: None until first looked for
        self._events_since_list = 0

    def _api_version(self, version: str) -> str:
        return f"{self.kind.group}/{version}" if self.kind.group else version

    def run(self) -> None:
        source, stopping = self.source, self.source._stopping
        rv: str | None = None
        while not stopping.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    if rv is None:
                        stopping.wait(source.recheck_interval)
                        continue
                rv = self._watch(rv)
                continue
            except _Stopped:
                return
            except ApiException as exc:
                if stopping.is_set():
                    return
                error: Exception = exc
                if exc.status in (404, 410) and rv is not None:
                    # 410: our resourceVersion was compacted away; 404: the watched version is gone.
                    # Only a fresh list tells what is there now.
                    log.info("%s: watch answered %s %s; relisting", self.kind.source, exc.status, exc.reason)
                    rv = None
                    if self._events_since_list:
                        continue
                    # straight after a list: wait a little, so a server that always says so is not hammered
            except Exception as exc:
                if stopping.is_set():
                    return
                error = exc
            # rv is kept: the next watch resumes where this one was, and a 410 will say if that is too old
            delay = self._backoff.next()
            level = logging.WARNING if self._backoff.failures == 1 else logging.DEBUG
            log.log(level, "%s: %s; retrying in %.2fs", self.kind.source, _describe(error), delay)
            stopping.wait(delay)

    def _list(self) -> str | None:
        """List the kind into the store: its resourceVersion, or None if the kind is not there to list."""
        kind = self.kind
        for version in kind.versions:
            try:
                items, rv = self._list_version(version)
            except ApiException as exc:
                if not kind.optional or exc.status not in (403, 404):
                    raise
                if exc.status == 404:
                    continue
                self._unavailable(f"forbidden ({exc.reason})")
                return None
            if self._available is False:
                log.info("%s: now served at %s", kind.source, self._api_version(version))
            self._available = True
            self._version = version
            self._events_since_list = 0
            self.source.store.replace(kind.source, items)
            self.source._mark_synced(kind)
            return rv
        if not kind.optional:
            raise ApiException(status=404, reason=f"{kind.plural} is not served")
        self._unavailable(f"not served at {', '.join(map(self._api_version, kind.versions))}")
        return None

    def _unavailable(self, why: str) -> None:
        if self._available is not False:
            log.info("%s: %s; looking again every %gs", self.kind.source, why, self.source.recheck_interval)
        self._available = False
        # a CRD removed takes its objects with it
        self.source.store.replace(self.kind.source, [])
        self.source._mark_synced(self.kind)

    def _list_version(self, version: str) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        api_version = self._api_version(version)
        token = None
        while True:
            resp = self.source._request(
                self.kind,
                version,
                limit=LIST_PAGE,
                _continue=token,
                _request_timeout=(_CONNECT_TIMEOUT, _LIST_READ_TIMEOUT),
            )
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items.extend(trim(self.kind, api_version, item) for item in body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, meta.get("resourceVersion", "")

    def _watch(self, rv: str) -> str:
        """Apply one watch's events from ``rv`` on; the resourceVersion to resume from once it ends."""
        timeout = self.source.watch_timeout
        resp = self.source._request(
            self.kind,
            self._version,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(_CONNECT_TIMEOUT, timeout + _WATCH_READ_SLACK),
        )
        self.source._opened(self, resp)
        progressed = False
        try:
            for line in iter_resp_lines(resp):
                if self.source._stopping.is_set():
                    raise _Stopped
                if line:
                    rv = self._apply(json.loads(line), rv)
                    if not progressed:
                        progressed = True
                        self._backoff.reset()
        except urllib3.exceptions.ReadTimeoutError:
            log.debug("%s: watch idle past its timeout; resuming at %s", self.kind.source, rv)
        except urllib3.exceptions.HTTPError:
            if self.source._stopping.is_set():
                raise _Stopped from None
            if not progressed:
                raise
            # dropped after it delivered: resume at once; if the server is gone, the reconnect backs off
            log.debug("%s: watch connection lost; resuming at %s", self.kind.source, rv, exc_info=True)
        finally:
            self.source._closed(self)
            resp.close()
            resp.release_conn()
        self._backoff.reset()
        return rv

    def _apply(self, event: dict[str, Any], rv: str) -> str:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        self._events_since_list += 1
        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
        if etype in ("ADDED", "MODIFIED"):
            self.source.store.upsert(self.kind.source, trim(self.kind, self._api_version(self._version), obj))
        elif etype == "DELETED":
            self.source.store.delete(self.kind.source, key_of(trim(self.kind, self._api_version(self._version), obj)))
        return rv  # a BOOKMARK only moves the resourceVersion on


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
