"""The mutating admission webhook: AdmissionReview v1 in, the injection patch out, served over HTTPS.

``Injector.review`` is the whole protocol, sans-IO: a decoded AdmissionReview in, the AdmissionReview to
answer out, never an exception. A pod CREATE gets ``allowed: true`` with a base64 RFC 6902 patch (none
when the pod is left alone); another resource or operation is allowed untouched. As Istio's injector does,
a review it cannot read (not an AdmissionReview v1, no uid, no pod) and a pod whose annotations are wrong get
``allowed: false`` with a ``status`` (metav1.Status) whose message says why: with the configuration's
``failurePolicy: Fail`` the API server refuses that pod with this message, rather than starting it without
its sidecar.

``WebhookServer`` serves ``POST /inject`` with aiohttp (HTTP/1.1 keep-alive, which the API server uses)
on TLS. A body that is not JSON at all is a 400 with one line of text; a body is refused with 413 as soon
as it passes 16 MiB, a request line or header field over 8 KiB with 400 (aiohttp's parser).

Probes are rewritten (see ``injector.mutate``) for pods whose mTLS mode is STRICT: the PeerAuthentication
that applies to the pod, Istio's precedence: one in its namespace selecting its labels, else the
namespace's own, else the mesh-wide one in the root namespace; UNSET defers to the next, and none at all
means PERMISSIVE. A port-level STRICT counts too, as the kubelet's probes could be aimed at that port.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from injector.mutate import InjectError, Settings, inject_pod

__all__ = ["MAX_BODY", "Injector", "WebhookServer", "mtls_mode", "store_peer_authentications"]

log = logging.getLogger("meshproxy.injector.webhook")

#: The largest review body read (a pod is a few KiB; the API server caps objects at 3 MiB in etcd).
MAX_BODY = 16 * 1024 * 1024
#: The longest request line or header field.
MAX_HEADER = 8190
API_VERSION = "admission.k8s.io/v1"
POD = {"group": "", "version": "v1", "kind": "Pod"}


def mtls_mode(peer_authentications: Iterable[Any], namespace: str, labels: dict[str, str], root_namespace: str) -> str:
    """The mode that applies to a pod: STRICT, PERMISSIVE or DISABLE (``control.model.PeerAuthentication``s)."""
    workload, space, mesh = [], [], []
    for pa in sorted(peer_authentications, key=lambda p: p.meta.name):
        if pa.meta.namespace == namespace and pa.selector is not None:
            if all(labels.get(k) == v for k, v in pa.selector.items()):
                workload.append(pa)
        elif pa.meta.namespace == namespace and pa.selector is None:
            space.append(pa)
        elif pa.meta.namespace == root_namespace and pa.selector is None:
            mesh.append(pa)
    if any("STRICT" in pa.port_modes.values() for pa in workload):
        return "STRICT"
    for level in (workload, space, mesh):
        for pa in level:
            if pa.mode != "UNSET":
                return pa.mode
    return "PERMISSIVE"


def store_peer_authentications(store, cluster_domain: str = "cluster.local") -> Callable[[], list]:
    """A function returning the valid PeerAuthentications in ``store`` (control.store.Store), parsed once per
    store revision."""
    from control.model import parse

    cache: dict[str, Any] = {"revision": None, "value": []}

    def current() -> list:
        revision, objects = store.snapshot()
        if cache["revision"] != revision:
            chosen = [(o, s) for o, s in objects if o.get("kind") == "PeerAuthentication"]
            cache["value"] = parse(chosen, cluster_domain=cluster_domain).peer_authentications
            cache["revision"] = revision
        return cache["value"]

    return current


def _denied(uid: str, code: int, message: str) -> dict:
    reason = "BadRequest" if code == 400 else "Invalid" if code == 422 else "InternalError"
    return {
        "uid": uid,
        "allowed": False,
        "status": {"status": "Failure", "code": code, "reason": reason, "message": message},
    }


class Injector:
    """Answers AdmissionReviews for pod CREATEs with ``settings``; the probe rewrite follows the pod's mTLS mode
    (``peer_authentications`` returns the current PeerAuthentications; None: never rewrite)."""

    def __init__(
        self,
        settings: Settings,
        *,
        peer_authentications: Callable[[], Iterable[Any]] | None = None,
        root_namespace: str = "meshproxy-system",
    ) -> None:
        self.settings = settings
        self._peer_authentications = peer_authentications
        self.root_namespace = root_namespace

    def review(self, body: Any) -> dict:
        """The AdmissionReview answering ``body`` (already decoded from JSON)."""
        return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": self._response(body)}

    def _response(self, body: Any) -> dict:
        if not isinstance(body, dict):
            return _denied("", 400, f"expected an AdmissionReview object, got {_kind(body)}")
        request = body.get("request")
        uid = request.get("uid") if isinstance(request, dict) else None
        uid = uid if isinstance(uid, str) else ""
        if body.get("kind") != "AdmissionReview" or body.get("apiVersion") != API_VERSION:
            return _denied(
                uid,
                400,
                f"expected kind AdmissionReview of {API_VERSION}, got {body.get('kind')} {body.get('apiVersion')}",
            )
        if not isinstance(request, dict):
            return _denied(uid, 400, "the AdmissionReview has no request")
        if not uid:
            return _denied(uid, 400, "the AdmissionReview's request has no uid")
        if request.get("kind") != POD or request.get("operation") != "CREATE":
            # not ours to change: the configuration asks only for pod CREATEs
            return {"uid": uid, "allowed": True}
        pod = request.get("object")
        if not isinstance(pod, dict):
            return _denied(uid, 400, "the AdmissionReview's request has no pod in request.object")
        namespace = request.get("namespace")
        meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
        if not isinstance(namespace, str) or not namespace:
            namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
        try:
            settings = self.settings
            if self._peer_authentications is not None:
                labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
                mode = mtls_mode(self._peer_authentications(), namespace, labels, self.root_namespace)
                settings = dataclasses.replace(settings, rewrite_probes=mode == "STRICT")
            _, patch = inject_pod(pod, settings)
        except InjectError as e:
            return _denied(uid, 422, f"meshproxy sidecar injection: {e}")
        except Exception:
            # a bug must not take the webhook down, nor admit the pod without its sidecar silently
            log.exception("review %s: injection failed", uid)
            return _denied(uid, 500, "meshproxy sidecar injection: internal error (see the control plane's log)")
        out: dict[str, Any] = {"uid": uid, "allowed": True}
        if patch:
            out["patchType"] = "JSONPatch"
            out["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
            log.debug("review %s: injected pod %s/%s", uid, namespace, meta.get("name") or meta.get("generateName"))
        return out


def _kind(value: Any) -> str:
    return "null" if value is None else {list: "a list", str: "a string"}.get(type(value), type(value).__name__)


class WebhookServer:
    """``POST /inject`` over TLS on ``host:port``. ``context`` may be given new certificates at any time
    (``injector.certs.load_into``): new connections get them."""

    def __init__(
        self, injector: Injector, context: ssl.SSLContext, host: str, port: int, *, max_body: int = MAX_BODY
    ) -> None:
        self.injector = injector
        self.max_body = max_body
        self.context = context
        self.host = host
        self.port = port
        self._runner = None

    async def start(self) -> None:
        """Listen; OSError when the address is taken. ``port`` is the bound one afterwards."""
        from aiohttp import web

        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/inject", self._inject)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, max_line_size=MAX_HEADER, max_field_size=MAX_HEADER
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _inject(self, request):
        from aiohttp import web

        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return web.Response(status=400, text=f"the body is not JSON: {e}\n")
        return web.json_response(self.injector.review(body))
