"""Fake kube-apiserver over plain HTTP on loopback: CRUD, list/watch with resourceVersion, selectors, 409/410/422.

One lock guards the whole store and one counter hands out resourceVersions, so every write is totally
ordered, as etcd orders them. Watches replay a bounded history of events; a watch that starts before
the retained window gets an ERROR event carrying a 410 Expired Status, as the real API sends it.
"""

from __future__ import annotations

import collections
import copy
import datetime
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes_validate

KUBERNETES_VERSION = "1.30.0"
#: The API server's own audience: a token given no other (a legacy or default token) has it, and a
#: TokenReview that names no audience checks for it, as kube-apiserver's --api-audiences.
API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    builtin: bool = False  # built-ins are schema-validated; custom resources are not
    return_deleted_object: bool = False  # DELETE answers with the object rather than a Success Status

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTIN_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", False, builtin=True),
    ResourceType("", "v1", "pods", "Pod", True, builtin=True, return_deleted_object=True),
    ResourceType("", "v1", "services", "Service", True, builtin=True, return_deleted_object=True),
    ResourceType("", "v1", "secrets", "Secret", True, builtin=True),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, builtin=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, builtin=True),
)


class ApiError(Exception):
    """A failure answered as a metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    out = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        out["details"] = details
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- selectors --------------------------------------------------------------------------------------------

_SELECTOR_TERM = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<nkey>[^\s=!(),]+)"
    r"|(?P<skey>[^\s=!(),]+)\s*(?P<setop>in|notin)\s*\((?P<values>[^)]*)\)"
    r"|(?P<key>[^\s=!(),]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s=!(),]*)"
    r"|(?P<ekey>[^\s=!(),]+))\s*$"
)


def _split_terms(selector: str) -> list[str]:
    terms, depth, cur = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t for t in terms if t.strip()]


def parse_label_selector(selector: str):
    """Return a predicate over a labels dict; raises ApiError 400 on a malformed selector."""
    preds = []
    for term in _split_terms(selector or ""):
        m = _SELECTOR_TERM.match(term)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        if m["nkey"]:
            preds.append(lambda labels, k=m["nkey"]: k not in labels)
        elif m["skey"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["setop"] == "in":
                preds.append(lambda labels, k=m["skey"], vs=values: labels.get(k) in vs)
            else:
                preds.append(lambda labels, k=m["skey"], vs=values: labels.get(k) not in vs)
        elif m["key"]:
            if m["op"] == "!=":
                preds.append(lambda labels, k=m["key"], v=m["value"]: labels.get(k) != v)
            else:
                preds.append(lambda labels, k=m["key"], v=m["value"]: k in labels and labels[k] == v)
        else:
            preds.append(lambda labels, k=m["ekey"]: k in labels)
    return lambda labels: all(p(labels or {}) for p in preds)


def parse_field_selector(selector: str):
    fields = {"metadata.name": ("name",), "metadata.namespace": ("namespace",)}
    preds = []
    for term in _split_terms(selector or ""):
        m = re.match(r"^\s*([^\s=!]+)\s*(==|=|!=)\s*(\S*)\s*$", term)
        if not m or m[1] not in fields:
            raise ApiError(400, "BadRequest", f"field label not supported: {term.strip()}")
        key, op, value = fields[m[1]][0], m[2], m[3]
        if op == "!=":
            preds.append(lambda meta, k=key, v=value: meta.get(k, "") != v)
        else:
            preds.append(lambda meta, k=key, v=value: meta.get(k, "") == v)
    return lambda meta: all(p(meta) for p in preds)


# ---- patches ----------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902: add, remove, replace, test."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op.get("path", ""))
        parent = doc
        try:
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            last = parts[-1]
            kind = op.get("op")
            if kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent[last]
                if current != op.get("value"):
                    raise ApiError(422, "Invalid", f"testing value {op.get('path')} failed")
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind in ("add", "replace"):
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(op["value"])
                    elif kind == "add":
                        parent.insert(int(last), op["value"])
                    else:
                        parent[int(last)] = op["value"]
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op["value"]
            else:
                raise ApiError(400, "BadRequest", f"unsupported JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"jsonpatch {op.get('op')} {op.get('path')}: {exc!r}") from None
    return doc


# ---- the store --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One HTTP request as the fake received it, for tests that count calls or inject faults."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("1", "true")


@dataclass
class _Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    rtype: ResourceType
    obj: dict
    old: dict | None


class FakeKube:
    """The store and its HTTP front end. Use as a context manager, or call start()/stop().

    Attributes after start(): host ("http://127.0.0.1:PORT"), port. ``port`` may be chosen up front, so a test
    can point a client at the fake before it listens.

    ``requests`` records every HTTP request received. ``fault``, when set, is called with each one before it
    is served; an ApiError it returns is the answer instead (a flaky or partitioned API server).
    """

    def __init__(
        self,
        custom_resources: list[ResourceType] | tuple = (),
        *,
        history: int = 100,
        bookmark_interval: float = 1.0,
        namespaces: tuple[str, ...] = ("default",),
        validate_version: str = KUBERNETES_VERSION,
        port: int = 0,
    ) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in (*BUILTIN_TYPES, *custom_resources):
            self.register(rt)
        self._cond = threading.Condition()
        self._objects: dict[tuple[ResourceType, str, str], dict] = {}
        self._events: collections.deque[_Event] = collections.deque()
        self._history = history
        self._rv = 0
        self._compacted_rv = 0  # every event with rv > this is retained
        self._tokens: dict[str, dict] = {}
        #: The spec of every TokenReview received, in order.
        self.token_reviews: list[dict] = []
        self._closed = False
        self.bookmark_interval = bookmark_interval
        self.validate_version = validate_version
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.requests: list[Request] = []
        self.fault: Callable[[Request], ApiError | None] | None = None
        self.host = ""
        self.port = port
        for ns in namespaces:
            self.create(self.type_of("", "v1", "namespaces"), None, {"metadata": {"name": ns}})

    # -- registry ---------------------------------------------------------------------------------------

    def register(self, rtype: ResourceType) -> None:
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype

    def type_of(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self._types.get((group, version, plural))
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    def add_token(
        self,
        token: str,
        username: str,
        *,
        uid: str = "",
        groups: tuple[str, ...] = (),
        audiences: tuple[str, ...] = (),
        extra: dict | None = None,
        expires_at: float | None = None,
    ) -> None:
        """Make TokenReview authenticate token as username for ``audiences`` (empty: the API server's own,
        ``API_AUDIENCES``) until ``expires_at`` (time.time(); None: forever)."""
        with self._cond:
            self._tokens[token] = {
                "user": {"username": username, "uid": uid or str(uuid.uuid4()), "groups": list(groups)}
                | ({"extra": extra} if extra else {}),
                "audiences": list(audiences or API_AUDIENCES),
                "expires_at": expires_at,
            }

    def add_service_account_token(
        self,
        token: str,
        namespace: str,
        service_account: str,
        *,
        audiences: tuple[str, ...] = (),
        pod: str = "",
        expires_at: float | None = None,
    ) -> None:
        """A projected service-account token, as the kubelet gets one minted (TokenRequest): its user is
        ``system:serviceaccount:NS:SA`` in the service-account groups, bound to ``pod`` if given."""
        extra = None
        if pod:
            extra = {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [str(uuid.uuid4())],
            }
        self.add_token(
            token,
            f"system:serviceaccount:{namespace}:{service_account}",
            groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
            audiences=audiences,
            extra=extra,
            expires_at=expires_at,
        )

    def revoke_token(self, token: str) -> None:
        """TokenReview no longer authenticates ``token`` (its pod or service account was deleted)."""
        with self._cond:
            self._tokens.pop(token, None)

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> FakeKube:
        handler = type("_BoundHandler", (_Handler,), {"kube": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.host = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fakekube", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            # kept-alive connections would go on being served by their handler threads: a stopped server
            # must look gone to its clients, so reset them
            with self._cond:
                connections, self._connections = list(self._connections), set()
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- history ----------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def compact(self, keep: int = 0) -> None:
        """Forget all but the last `keep` events, as etcd compaction does; older watches then get 410."""
        with self._cond:
            while len(self._events) > keep:
                self._compacted_rv = self._events.popleft().rv
            if not self._events:
                self._compacted_rv = self._rv

    def _record(self, etype: str, rtype: ResourceType, obj: dict, old: dict | None) -> None:
        self._events.append(_Event(self._rv, etype, rtype, obj, old))
        while len(self._events) > self._history:
            self._compacted_rv = self._events.popleft().rv
        self._cond.notify_all()

    # -- CRUD, callable directly from tests as well as over HTTP -----------------------------------------

    def _key(self, rtype: ResourceType, ns: str | None, name: str) -> tuple[ResourceType, str, str]:
        return (rtype, ns or "", name)

    def _not_found(self, rtype: ResourceType, name: str) -> ApiError:
        details = {"name": name, "kind": rtype.plural}
        if rtype.group:
            details["group"] = rtype.group
        return ApiError(404, "NotFound", f'{rtype.resource} "{name}" not found', details)

    def _check_body(self, rtype: ResourceType, ns: str | None, body: Any, name: str | None = None) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        body = copy.deepcopy(body)
        body.setdefault("apiVersion", rtype.api_version)
        body.setdefault("kind", rtype.kind)
        if body["apiVersion"] != rtype.api_version or body["kind"] != rtype.kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({body['apiVersion']}) does not match the expected API version "
                f"({rtype.api_version}) or kind {body['kind']!r} is not {rtype.kind!r}",
            )
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if rtype.namespaced:
            if meta.get("namespace", ns) != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if name is not None and meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        return body

    def _validate(self, rtype: ResourceType, obj: dict) -> None:
        meta = obj["metadata"]
        if not meta.get("name"):
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind} "" is invalid: metadata.name: Required value: name or generateName is required',
                {"kind": rtype.kind, "causes": [{"reason": "FieldValueRequired", "field": "metadata.name"}]},
            )
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]) or len(meta["name"]) > 253:
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind} "{meta["name"]}" is invalid: metadata.name: Invalid value: "{meta["name"]}": '
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                {"name": meta["name"], "kind": rtype.kind},
            )
        if not rtype.builtin:
            return
        try:
            kubernetes_validate.validate(obj, self.validate_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            field = ".".join(str(p) for p in exc.absolute_path) or "<root>"
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind} "{meta["name"]}" is invalid: {field}: {exc.message}',
                {
                    "name": meta["name"],
                    "kind": rtype.kind,
                    "causes": [{"reason": "FieldValueInvalid", "message": exc.message, "field": field}],
                },
            ) from None

    def _require_namespace(self, rtype: ResourceType, ns: str | None) -> None:
        if rtype.namespaced and (self._types[("", "v1", "namespaces")], "", ns) not in self._objects:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})

    def create(self, rtype: ResourceType, ns: str | None, body: Any) -> dict:
        obj = self._check_body(rtype, ns, body)
        meta = obj["metadata"]
        with self._cond:
            self._require_namespace(rtype, ns)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            self._validate(rtype, obj)
            key = self._key(rtype, ns, meta["name"])
            if key in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rtype.resource} "{meta["name"]}" already exists',
                    {"name": meta["name"], "kind": rtype.plural} | ({"group": rtype.group} if rtype.group else {}),
                )
            self._rv += 1
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = str(self._rv)
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            self._objects[key] = obj
            self._record("ADDED", rtype, obj, None)
            return copy.deepcopy(obj)

    def get(self, rtype: ResourceType, ns: str | None, name: str) -> dict:
        with self._cond:
            obj = self._objects.get(self._key(rtype, ns, name))
            if obj is None:
                raise self._not_found(rtype, name)
            return copy.deepcopy(obj)

    def _items(self, rtype: ResourceType, ns: str | None, label_pred, field_pred) -> list[dict]:
        out = []
        for (rt, ons, _), obj in sorted(self._objects.items(), key=lambda kv: kv[0][1:]):
            if rt is rtype and (ns is None or ons == ns) and _matches(obj, label_pred, field_pred):
                out.append(copy.deepcopy(obj))
        return out

    def list(self, rtype: ResourceType, ns: str | None, label_selector: str = "", field_selector: str = "") -> dict:
        label_pred, field_pred = parse_label_selector(label_selector), parse_field_selector(field_selector)
        with self._cond:
            items = self._items(rtype, ns, label_pred, field_pred)
            rv = self._rv
        if rtype.builtin:  # the real API leaves kind/apiVersion off built-in list items
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return {
            "kind": rtype.kind + "List",
            "apiVersion": rtype.api_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": items,
        }

    def _replace(self, rtype: ResourceType, ns: str | None, name: str, obj: dict, old: dict) -> dict:
        meta = obj["metadata"]
        sent_rv = meta.get("resourceVersion")
        if sent_rv not in (None, "") and sent_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.resource} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": name, "kind": rtype.plural} | ({"group": rtype.group} if rtype.group else {}),
            )
        if sent_rv in (None, "") and not rtype.builtin:
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind}.{rtype.group} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                "must be specified for an update",
            )
        for field in ("uid", "creationTimestamp"):
            meta[field] = old["metadata"][field]
        self._validate(rtype, obj)

        def body_of(o: dict) -> dict:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        meta["generation"] = old["metadata"]["generation"] + (body_of(obj) != body_of(old))
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if obj == old:  # a no-op write neither bumps resourceVersion nor emits an event
            return copy.deepcopy(old)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[self._key(rtype, ns, name)] = obj
        self._record("MODIFIED", rtype, obj, old)
        return copy.deepcopy(obj)

    def update(self, rtype: ResourceType, ns: str | None, name: str, body: Any) -> dict:
        obj = self._check_body(rtype, ns, body, name)
        obj["metadata"]["name"] = name
        with self._cond:
            old = self._objects.get(self._key(rtype, ns, name))
            if old is None:
                raise self._not_found(rtype, name)
            return self._replace(rtype, ns, name, obj, old)

    def patch(self, rtype: ResourceType, ns: str | None, name: str, patch: Any, content_type: str) -> dict:
        with self._cond:
            old = self._objects.get(self._key(rtype, ns, name))
            if old is None:
                raise self._not_found(rtype, name)
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
                new = json_patch(old, patch)
            elif content_type == "application/merge-patch+json" or (
                content_type == "application/strategic-merge-patch+json" and rtype.builtin
            ):
                # strategic merge is approximated by a JSON merge patch: lists are replaced, not merged by key
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                new = merge_patch(old, patch)
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - "
                    f"accepted media types include: application/json-patch+json, "
                    f"application/merge-patch+json (got {content_type})",
                )
            new = self._check_body(rtype, ns, new, name)
            return self._replace(rtype, ns, name, new, old)

    def delete(self, rtype: ResourceType, ns: str | None, name: str) -> dict:
        with self._cond:
            key = self._key(rtype, ns, name)
            old = self._objects.pop(key, None)
            if old is None:
                raise self._not_found(rtype, name)
            self._rv += 1
            obj = copy.deepcopy(old)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._record("DELETED", rtype, obj, old)
        if rtype.return_deleted_object:
            return copy.deepcopy(obj)
        details = {"name": name, "kind": rtype.plural, "uid": old["metadata"]["uid"]}
        if rtype.group:
            details["group"] = rtype.group
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def token_review(self, body: Any) -> dict:
        if not isinstance(body, dict) or body.get("kind", "TokenReview") != "TokenReview":
            raise ApiError(400, "BadRequest", "expected a TokenReview")
        spec = body.get("spec") or {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "BadRequest", "token is required for TokenReview in authentication")
        # No audience named: the API server's own (kube-apiserver's --api-audiences).
        wanted = list(spec.get("audiences") or API_AUDIENCES)
        with self._cond:
            entry = self._tokens.get(token)
            self.token_reviews.append(copy.deepcopy(spec))
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        if entry is None:
            status["error"] = "invalid bearer token"
        elif entry["expires_at"] is not None and time.time() >= entry["expires_at"]:
            status["error"] = "invalid bearer token, token has expired"
        else:
            granted = [a for a in wanted if a in entry["audiences"]]
            if not granted:
                status["error"] = "invalid bearer token, token audiences is invalid for the target audiences"
            else:
                status = {"authenticated": True, "user": copy.deepcopy(entry["user"]), "audiences": granted}
        out = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None}}
        out["spec"] = spec
        out["status"] = status
        return out

    # -- watch ------------------------------------------------------------------------------------------

    def watch(
        self,
        rtype: ResourceType,
        ns: str | None,
        *,
        resource_version: str = "",
        label_selector: str = "",
        field_selector: str = "",
        timeout: float = 1800.0,
        bookmarks: bool = False,
    ):
        """Return a generator of watch events (dicts); bad selectors or resourceVersions raise ApiError now."""
        label_pred, field_pred = parse_label_selector(label_selector), parse_field_selector(field_selector)
        if resource_version not in ("", "0") and not resource_version.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version {resource_version!r}")
        return self._watch_events(rtype, ns, resource_version, label_pred, field_pred, timeout, bookmarks)

    def _watch_events(self, rtype, ns, resource_version, label_pred, field_pred, timeout, bookmarks):
        deadline = time.monotonic() + timeout
        with self._cond:
            oldest = self._compacted_rv + 1
            if resource_version in ("", "0"):
                # no resourceVersion: synthetic ADDED for current state, then changes from now
                initial = [("ADDED", o) for o in self._items(rtype, ns, label_pred, field_pred)]
                since = self._rv
            else:
                since = int(resource_version)
                initial = []
                if since < self._compacted_rv:
                    initial = None
        if initial is None:
            yield {
                "type": "ERROR",
                "object": status_object(410, "Expired", f"too old resource version: {since} ({oldest})"),
            }
            return
        for etype, obj in initial:
            yield {"type": etype, "object": obj}
        last_sent = time.monotonic()
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if since < self._compacted_rv:  # fell behind the window while streaming
                        pending = None
                        break
                    pending = [e for e in self._events if e.rv > since]
                    if pending:
                        since = pending[-1].rv
                        break
                    now = time.monotonic()
                    if now >= deadline:
                        return
                    if bookmarks and now - last_sent >= self.bookmark_interval:
                        break
                    wait = deadline - now
                    if bookmarks:
                        wait = min(wait, self.bookmark_interval - (now - last_sent))
                    self._cond.wait(max(wait, 0.001))
                current_rv = self._rv
            if pending is None:
                yield {"type": "ERROR", "object": status_object(410, "Expired", "too old resource version")}
                return
            if not pending:
                last_sent = time.monotonic()
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": rtype.kind,
                        "apiVersion": rtype.api_version,
                        "metadata": {"resourceVersion": str(current_rv)},
                    },
                }
                continue
            for ev in pending:
                out = _filter_event(ev, rtype, ns, label_pred, field_pred)
                if out is not None:
                    last_sent = time.monotonic()
                    yield out


def kubeconfig(host: str) -> str:
    """A kubeconfig (YAML) whose one context talks to the fake API server at ``host`` with a token."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": host}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
            "current-context": "c",
        }
    )


def _matches(obj: dict, label_pred, field_pred) -> bool:
    meta = obj.get("metadata", {})
    return label_pred(meta.get("labels") or {}) and field_pred(meta)


def _filter_event(ev: _Event, rtype: ResourceType, ns: str | None, label_pred, field_pred) -> dict | None:
    """Selector transitions turn MODIFIED into ADDED or DELETED, as the watch cache does."""
    if ev.rtype is not rtype or (ns is not None and ev.obj["metadata"].get("namespace") != ns):
        return None
    now = _matches(ev.obj, label_pred, field_pred)
    before = ev.old is not None and _matches(ev.old, label_pred, field_pred)
    if ev.type == "ADDED":
        etype = "ADDED" if now else None
    elif ev.type == "DELETED":
        etype = "DELETED" if before else None
    elif now and before:
        etype = "MODIFIED"
    elif now:
        etype = "ADDED"
    elif before:
        etype = "DELETED"
    else:
        etype = None
    return None if etype is None else {"type": etype, "object": copy.deepcopy(ev.obj)}


# ---- HTTP -------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.kube._cond:
            self.kube._connections.add(self.connection)

    def finish(self) -> None:
        with self.kube._cond:
            self.kube._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _send_json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(400, "BadRequest", f"error decoding request body: {exc}") from None

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        request = Request(method, url.path, query, dict(self.headers.items()))
        with self.kube._cond:
            self.kube.requests.append(request)
        try:
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            fault = self.kube.fault
            if fault is not None and (error := fault(request)) is not None:
                raise error
            if url.path == "/version" and method == "GET":
                major, minor, _ = self.kube.validate_version.split(".")
                return self._send_json(200, {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}.0-fake"})
            if url.path == "/apis/authentication.k8s.io/v1/tokenreviews" and method == "POST":
                return self._send_json(201, self.kube.token_review(body))
            rtype, ns, name = self._route(url.path)
            self._serve(method, rtype, ns, name, query, body)
        except ApiError as exc:
            self._send_json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, path: str) -> tuple[ResourceType, str | None, str | None]:
        segs = [urllib.parse.unquote(s) for s in path.strip("/").split("/")]
        if segs[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", segs[2:]
        elif len(segs) >= 3 and segs[0] == "apis":
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if len(rest) >= 3 and rest[0] == "namespaces":
            rtype = self.kube.type_of(group, version, rest[2])
            if not rtype.namespaced or len(rest) > 4:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return rtype, rest[1], rest[3] if len(rest) == 4 else None
        if 1 <= len(rest) <= 2:
            rtype = self.kube.type_of(group, version, rest[0])
            return rtype, None, rest[1] if len(rest) == 2 else None
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _serve(self, method: str, rtype: ResourceType, ns: str | None, name: str | None, query: dict, body: Any):
        kube = self.kube
        if rtype.namespaced and ns is None and (name is not None or method != "GET"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if name is None:
            if method == "GET" and query.get("watch") in ("1", "true"):
                return self._watch(rtype, ns, query)
            if method == "GET":
                lst = kube.list(rtype, ns, query.get("labelSelector", ""), query.get("fieldSelector", ""))
                return self._send_json(200, lst)
            if method == "POST":
                return self._send_json(201, kube.create(rtype, ns, body))
        else:
            if method == "GET":
                return self._send_json(200, kube.get(rtype, ns, name))
            if method == "PUT":
                return self._send_json(200, kube.update(rtype, ns, name, body))
            if method == "PATCH":
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                return self._send_json(200, kube.patch(rtype, ns, name, body, ctype))
            if method == "DELETE":
                return self._send_json(200, kube.delete(rtype, ns, name))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _watch(self, rtype: ResourceType, ns: str | None, query: dict) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        events = self.kube.watch(
            rtype,
            ns,
            resource_version=query.get("resourceVersion", ""),
            label_selector=query.get("labelSelector", ""),
            field_selector=query.get("fieldSelector", ""),
            timeout=timeout,
            bookmarks=query.get("allowWatchBookmarks") in ("1", "true"),
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self.wfile.flush()
            for ev in events:
                self._chunk(json.dumps(ev).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            events.close()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
