"""Security for one workload: Istio's PeerAuthentication, DestinationRule tls and AuthorizationPolicy,
resolved into the ``Security`` and ``UpstreamTls`` messages of its ``SidecarConfig``.

- **Inbound mTLS mode** (``resolve_peer_authentication``), as pilot's ComposePeerAuthentication: the
  workload's policy (a selector matching its labels, in its namespace) over its namespace's (no selector)
  over the mesh's (no selector, in the root namespace); a level whose mode is UNSET inherits the one
  below; with none, PERMISSIVE. Port-level modes come from the workload's policy only; a port whose mode
  is UNSET gets the workload's. Selector policies in the root namespace are ignored, as in Istio. Where
  Istio takes the oldest of several policies at one level, meshproxy (which does not see creation times)
  takes the first by name and warns.
- **Upstream TLS** per cluster: ``ISTIO_MUTUAL`` or ``DISABLE`` when the DestinationRule's
  ``trafficPolicy.tls.mode`` says so; otherwise Istio's auto mTLS: mTLS to the endpoints that have a
  sidecar (label ``security.istio.io/tlsMode: istio``, set by the injector, or on a ServiceEntry
  endpoint) unless their own PeerAuthentication DISABLEs that port. The server's certificate must carry
  one of the destination's SPIFFE ids: its endpoints' service accounts and a ServiceEntry's
  ``subjectAltNames``.
- **Authorization**: the policies that select the workload (in its namespace, or in the root namespace,
  whose policies apply mesh-wide), normalized (``normalize_policy``): principals, namespaces, hosts,
  methods, paths and header values as exact/prefix/suffix/presence matches, ports as numbers, ``when``
  keys as attributes. What cannot be evaluated by the sidecar is handled as Istio handles fields it
  cannot apply: an ALLOW (or AUDIT) rule holding one is dropped, a DENY rule drops the field and so
  matches more. A policy meshproxy cannot read at all fails closed: an ALLOW policy allows nothing, a
  DENY policy denies everything. CUSTOM is refused.

``Security(model, ...)`` indexes a Model once; ``apply(cfg, namespace, labels)`` fills ``cfg.security``
and each cluster's ``tls``. ``label_keys`` are the workload labels its answer depends on (selectors), to
be part of the translator's config scope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from control.model import AuthorizationPolicy, Model, PeerAuthentication, Problem, Service
from meshproxy.config.v1 import config_pb2 as pb

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "TLS_MODE_LABEL",
    "Security",
    "apply",
    "normalize_policy",
    "resolve_peer_authentication",
]

DEFAULT_ROOT_NAMESPACE = "meshproxy-system"
#: Istio's endpoint label: "istio" means a sidecar terminates mTLS in front of the workload.
TLS_MODE_LABEL = "security.istio.io/tlsMode"

_MODES = {
    "UNSET": pb.PeerAuthentication.UNSET,
    "DISABLE": pb.PeerAuthentication.DISABLE,
    "PERMISSIVE": pb.PeerAuthentication.PERMISSIVE,
    "STRICT": pb.PeerAuthentication.STRICT,
}
_ACTIONS = {
    "ALLOW": pb.AuthorizationPolicy.ALLOW,
    "DENY": pb.AuthorizationPolicy.DENY,
    "AUDIT": pb.AuthorizationPolicy.AUDIT,
}
_HEADER_KEY = re.compile(r"request\.headers\[([!#$%&'*+.^_`|~0-9A-Za-z-]+)\]")
_WHEN = {
    "source.principal": pb.AuthorizationCondition.SOURCE_PRINCIPAL,
    "source.namespace": pb.AuthorizationCondition.SOURCE_NAMESPACE,
    "destination.port": pb.AuthorizationCondition.DESTINATION_PORT,
}
#: Source and operation fields the sidecar cannot evaluate (no JWT, no IP blocks).
_UNSUPPORTED_SOURCE = (
    "requestPrincipals",
    "notRequestPrincipals",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
}
_OPERATION_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}


class _Unsupported(Exception):
    """A field or value the sidecar cannot evaluate: the rule is dropped (ALLOW) or the field is (DENY)."""


class _Invalid(Exception):
    """A policy that is not valid Istio: it fails closed."""


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def _name(meta) -> str:
    return f"{meta.namespace}/{meta.name}"


# ---- PeerAuthentication ---------------------------------------------------------------------------------------


def resolve_peer_authentication(
    policies: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> pb.PeerAuthentication:
    """The mode of a workload in ``namespace`` with ``labels``, and its port modes (see the module)."""
    mesh = space = workload = None
    for pa in sorted(policies, key=lambda p: (p.meta.namespace, p.meta.name)):
        ns = pa.meta.namespace
        if not pa.selector:
            if ns == root_namespace:
                mesh = mesh or pa
            elif ns == namespace:
                space = space or pa
        elif ns == namespace and ns != root_namespace and _selects(pa.selector, labels):
            workload = workload or pa
    out = pb.PeerAuthentication(mode=pb.PeerAuthentication.PERMISSIVE)
    for level in (mesh, space, workload):
        if level is None:
            continue
        out.sources.append(_name(level.meta))
        if level.mode != "UNSET":
            out.mode = _MODES[level.mode]
    if workload is not None:
        for port, mode in sorted(workload.port_modes.items()):
            out.port_modes[port] = out.mode if mode == "UNSET" else _MODES[mode]
    return out


def port_mode(pa: pb.PeerAuthentication, port: int) -> int:
    return pa.port_modes.get(port, pa.mode)


# ---- AuthorizationPolicy ----------------------------------------------------------------------------------------


def _string_match(value: Any, path: str, *, lower: bool = False) -> pb.StringMatch:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{path}: an empty value matches nothing (use '*' for any)")
    if lower:
        value = value.lower()
    if value == "*":
        return pb.StringMatch(presence=True)
    if value.startswith("*"):
        if "*" in value[1:]:
            raise _Invalid(f"{path}: {value!r}: '*' goes at the start or the end only")
        return pb.StringMatch(suffix=value[1:])
    if value.endswith("*"):
        if "*" in value[:-1]:
            raise _Invalid(f"{path}: {value!r}: '*' goes at the start or the end only")
        return pb.StringMatch(prefix=value[:-1])
    if "*" in value:
        raise _Invalid(f"{path}: {value!r}: '*' goes at the start or the end only")
    return pb.StringMatch(exact=value)


def _principals(values: Sequence[str], path: str, trust_domain: str) -> list[pb.StringMatch]:
    """Principals; "cluster.local/..." also names the mesh's own trust domain, as in Istio."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str) and v.startswith("spiffe://"):
            raise _Invalid(f"{path}[{i}]: {v!r}: principals are written without 'spiffe://'")
        out.append(_string_match(v, f"{path}[{i}]"))
        if trust_domain != "cluster.local" and isinstance(v, str) and v.startswith("cluster.local/"):
            out.append(_string_match(trust_domain + v[len("cluster.local") :], f"{path}[{i}]"))
    return out


def _path_value(value: Any, path: str) -> pb.StringMatch:
    if isinstance(value, str) and ("{*}" in value or "{**}" in value):
        raise _Unsupported(f"{path}: path templates ({value!r}) are not supported")
    m = _string_match(value, path)
    if m.WhichOneof("match") in ("exact", "prefix") and not getattr(m, m.WhichOneof("match")).startswith("/"):
        raise _Invalid(f"{path}: {value!r} must start with '/'")
    return m


def _ports(values: Sequence[Any], path: str) -> list[int]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.isdigit() or not 1 <= int(v) <= 65535:
            raise _Invalid(f"{path}[{i}]: {v!r} is not a port number")
        out.append(int(v))
    return out


def _source(src: Mapping[str, Any], path: str, deny: bool, trust_domain: str, notes: list[str]):
    out = pb.AuthorizationSource()
    for key in _UNSUPPORTED_SOURCE:
        if src.get(key):
            message = f"{path}.{key}: not supported by meshproxy"
            if not deny:
                raise _Unsupported(message)
            notes.append(f"{message}: ignored, so this DENY rule matches more requests")
    for key, attr in _SOURCE_FIELDS.items():
        values = src.get(key) or []
        if key in ("principals", "notPrincipals"):
            getattr(out, attr).extend(_principals(values, f"{path}.{key}", trust_domain))
        else:
            getattr(out, attr).extend(_string_match(v, f"{path}.{key}[{i}]") for i, v in enumerate(values))
    return out


def _operation(op: Mapping[str, Any], path: str, deny: bool, notes: list[str]):
    out = pb.AuthorizationOperation()
    for key, attr in _OPERATION_FIELDS.items():
        values = op.get(key) or []
        matches = []
        try:
            for i, v in enumerate(values):
                where = f"{path}.{key}[{i}]"
                if key in ("paths", "notPaths"):
                    matches.append(_path_value(v, where))
                else:
                    matches.append(_string_match(v, where, lower=key in ("hosts", "notHosts")))
        except _Unsupported as e:
            if not deny:
                raise
            # Dropping one value would narrow the rule; dropping the whole field widens it.
            notes.append(f"{e}: {path}.{key} ignored, so this DENY rule matches more requests")
            continue
        getattr(out, attr).extend(matches)
    out.ports.extend(_ports(op.get("ports") or [], f"{path}.ports"))
    out.not_ports.extend(_ports(op.get("notPorts") or [], f"{path}.notPorts"))
    return out


def _condition(w: Mapping[str, Any], path: str, trust_domain: str) -> pb.AuthorizationCondition:
    key = w.get("key") or ""
    values, not_values = w.get("values") or [], w.get("notValues") or []
    if not values and not not_values:
        raise _Invalid(f"{path}: give values or notValues")
    out = pb.AuthorizationCondition()
    m = _HEADER_KEY.fullmatch(key)
    if m is not None:
        out.attribute = pb.AuthorizationCondition.REQUEST_HEADER
        out.header = m.group(1).lower()
    elif key in _WHEN:
        out.attribute = _WHEN[key]
    elif key.startswith("request.headers"):
        raise _Invalid(f"{path}.key: {key!r}: write request.headers[<name>]")
    else:
        raise _Unsupported(f"{path}.key: {key!r} is not supported by meshproxy")
    for attr, given in (("values", values), ("not_values", not_values)):
        where = f"{path}.{'values' if attr == 'values' else 'notValues'}"
        if out.attribute == pb.AuthorizationCondition.SOURCE_PRINCIPAL:
            getattr(out, attr).extend(_principals(given, where, trust_domain))
        elif out.attribute == pb.AuthorizationCondition.DESTINATION_PORT:
            getattr(out, attr).extend(pb.StringMatch(exact=str(p)) for p in _ports(given, where))
        else:
            getattr(out, attr).extend(_string_match(v, f"{where}[{i}]") for i, v in enumerate(given))
    return out


def _rule(rule: Mapping[str, Any], path: str, deny: bool, trust_domain: str, notes: list[str]):
    out = pb.AuthorizationRule()
    for i, f in enumerate(rule.get("from") or []):
        getattr(out, "from").append(
            _source(f.get("source") or {}, f"{path}.from[{i}].source", deny, trust_domain, notes)
        )
    for i, t in enumerate(rule.get("to") or []):
        out.to.append(_operation(t.get("operation") or {}, f"{path}.to[{i}].operation", deny, notes))
    for i, w in enumerate(rule.get("when") or []):
        where = f"{path}.when[{i}]"
        try:
            out.when.append(_condition(w, where, trust_domain))
        except _Unsupported as e:
            if not deny:
                raise
            notes.append(f"{e}: ignored, so this DENY rule matches more requests")
    return out


def normalize_policy(
    policy: AuthorizationPolicy, trust_domain: str = "cluster.local"
) -> tuple[pb.AuthorizationPolicy | None, list[tuple[str, str]]]:
    """``policy`` as the sidecar evaluates it, and the problems found: ``(severity, message)`` pairs.

    None for a policy with no effect (an AUDIT policy that cannot be read)."""
    action = policy.action
    if action not in _ACTIONS:
        return None, [("error", f"spec.action: {action} is not supported: the policy is ignored")]
    deny = action == "DENY"
    out = pb.AuthorizationPolicy(name=_name(policy.meta), action=_ACTIONS[action])
    problems: list[tuple[str, str]] = []
    try:
        for i, r in enumerate(policy.rules):
            path = f"spec.rules[{i}]"
            notes: list[str] = []
            try:
                out.rules.append(_rule(r, path, deny, trust_domain, notes))
            except _Unsupported as e:
                problems.append(("warning", f"{e}: this ALLOW rule is dropped, so it allows nothing"))
                continue
            problems.extend(("warning", n) for n in notes)
    except (_Invalid, AttributeError, TypeError) as e:
        del out.rules[:]
        reason = str(e) if isinstance(e, _Invalid) else f"unreadable rules: {e}"
        if action == "AUDIT":
            return None, [("error", f"{reason}: the policy is ignored")]
        if deny:
            out.rules.add()  # one empty rule: matches every request
            return out, [("error", f"{reason}: failing closed, the policy denies every request")]
        return out, [("error", f"{reason}: failing closed, the policy allows nothing")]
    return out, problems


# ---- the index --------------------------------------------------------------------------------------------------


def _endpoint_address(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _visible(export_to, owner: str, namespace: str, default: tuple[str, ...]) -> bool:
    for e in export_to or default:
        if e == "*" or (e == "." and owner == namespace) or e == namespace:
            return True
    return False


class Security:
    """One Model's security resources, indexed; ``apply`` fills a sidecar's config."""

    def __init__(
        self,
        model: Model,
        *,
        trust_domain: str = "cluster.local",
        trust_bundle: Sequence[str] = (),
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        default_export_to: tuple[str, ...] = ("*",),
    ) -> None:
        self.model = model
        self.trust_domain = trust_domain
        self.trust_bundle = list(trust_bundle)
        self.root_namespace = root_namespace
        self.default_export_to = default_export_to
        self.problems: list[Problem] = []
        self.peer_authentications = list(model.peer_authentications)
        self.label_keys: set[str] = set()
        self._check_peer_authentications()
        self.policies: list[tuple[AuthorizationPolicy, pb.AuthorizationPolicy]] = []
        for ap in sorted(model.authorization_policies, key=lambda p: (p.meta.namespace, p.meta.name)):
            normalized, problems = normalize_policy(ap, trust_domain)
            for severity, message in problems:
                path, _, text = message.partition(": ") if message.startswith("spec.") else ("", "", message)
                self.problems.append(Problem(severity, str(ap.meta), path, text, ap.meta.origin))
            if normalized is not None:
                self.policies.append((ap, normalized))
            self.label_keys.update(ap.selector or {})
        self.services: dict[str, Service] = {}
        for svc in sorted(model.services, key=lambda s: (not s.kubernetes, s.meta.namespace, s.meta.name)):
            self.services.setdefault(svc.host, svc)
        self.rules: dict[str, list] = {}
        for dr in model.destination_rules:
            self.rules.setdefault(dr.host, []).append(dr)

    def _warn(self, meta, message: str, path: str = "") -> None:
        self.problems.append(Problem("warning", str(meta), path, message, meta.origin))

    def _check_peer_authentications(self) -> None:
        levels: dict[tuple[str, str], list[PeerAuthentication]] = {}
        for pa in sorted(self.peer_authentications, key=lambda p: (p.meta.namespace, p.meta.name)):
            self.label_keys.update(pa.selector or {})
            if pa.selector and pa.meta.namespace == self.root_namespace:
                self._warn(pa.meta, "a selector policy in the root namespace applies to no workload (as in Istio)")
            if not pa.selector:
                levels.setdefault((pa.meta.namespace, ""), []).append(pa)
        for (ns, _), pas in levels.items():
            what = "mesh-wide" if ns == self.root_namespace else f"namespace {ns}'s"
            for pa in pas[1:]:
                self._warn(
                    pa.meta,
                    f"{pas[0].meta} is also {what} policy; meshproxy uses the first by name (Istio: the oldest)",
                )

    # -- per workload -------------------------------------------------------------------------------------------

    def peer_authentication(self, namespace: str, labels: Mapping[str, str]) -> pb.PeerAuthentication:
        return resolve_peer_authentication(self.peer_authentications, namespace, labels, self.root_namespace)

    def authorization(self, namespace: str, labels: Mapping[str, str]) -> pb.Authorization:
        out = pb.Authorization()
        for ap, normalized in self.policies:
            ns = ap.meta.namespace
            if ns != namespace and ns != self.root_namespace:
                continue
            if _selects(ap.selector, labels):
                out.policies.append(normalized)
        order = {pb.AuthorizationPolicy.DENY: 0, pb.AuthorizationPolicy.ALLOW: 1, pb.AuthorizationPolicy.AUDIT: 2}
        ordered = sorted(out.policies, key=lambda p: (order[p.action], p.name))
        del out.policies[:]
        out.policies.extend(ordered)
        return out

    def _destination_rule(self, svc: Service, namespace: str):
        candidates = [
            dr
            for dr in self.rules.get(svc.host, [])
            if _visible(dr.export_to, dr.meta.namespace, namespace, self.default_export_to)
        ]
        for ns in (namespace, svc.meta.namespace):
            for dr in candidates:
                if dr.meta.namespace == ns:
                    return dr
        return candidates[0] if candidates else None

    def upstream_tls(self, svc: Service, port: int, namespace: str) -> pb.UpstreamTls:
        """TLS from a sidecar in ``namespace`` to ``svc``'s ``port``."""
        dr = self._destination_rule(svc, namespace)
        explicit = getattr(dr, "tls_mode", "") if dr is not None else ""
        if explicit == "DISABLE":
            return pb.UpstreamTls(mode=pb.UpstreamTls.DISABLE)
        endpoints = svc.endpoints.get(port, [])
        out = pb.UpstreamTls(mode=pb.UpstreamTls.ISTIO_MUTUAL)
        ids: set[str] = set()
        meshed = 0
        for e in endpoints:
            sa = getattr(e, "service_account", "")
            if sa:
                ids.add(f"spiffe://{self.trust_domain}/ns/{svc.meta.namespace}/sa/{sa}")
            if explicit == "ISTIO_MUTUAL":
                continue
            in_mesh = e.labels.get(TLS_MODE_LABEL) == "istio"
            if in_mesh:
                pa = resolve_peer_authentication(
                    self.peer_authentications, svc.meta.namespace, e.labels, self.root_namespace
                )
                in_mesh = port_mode(pa, e.port) != pb.PeerAuthentication.DISABLE
            if in_mesh:
                meshed += 1
            else:
                out.plaintext_endpoints.append(_endpoint_address(e.address, e.port))
        for san in getattr(svc, "subject_alt_names", ()):
            ids.add(san)
        if explicit != "ISTIO_MUTUAL" and not meshed:
            return pb.UpstreamTls(mode=pb.UpstreamTls.DISABLE)
        out.allowed_spiffe_ids.extend(sorted(ids))
        return out

    def apply(self, cfg: pb.SidecarConfig, namespace: str, labels: Mapping[str, str]) -> None:
        """Fill ``cfg.security`` for a workload in ``namespace`` with ``labels``, and the ``tls`` of every
        cluster of ``cfg`` named ``outbound|<port>||<host>`` after a known service."""
        sec = cfg.security
        sec.trust_domain = self.trust_domain
        sec.trust_bundle.extend(self.trust_bundle)
        sec.peer_authentication.CopyFrom(self.peer_authentication(namespace, labels))
        sec.authorization.CopyFrom(self.authorization(namespace, labels))
        for c in cfg.clusters:
            direction, port, _, host = [*c.name.split("|"), "", "", ""][:4]
            svc = self.services.get(host)
            if direction != "outbound" or svc is None or not port.isdigit():
                continue
            tls = self.upstream_tls(svc, int(port), namespace)
            if tls.mode != pb.UpstreamTls.DISABLE:
                c.tls.CopyFrom(tls)


def apply(
    cfg: pb.SidecarConfig,
    model: Model,
    namespace: str,
    labels: Mapping[str, str],
    *,
    trust_domain: str = "cluster.local",
    trust_bundle: Sequence[str] = (),
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> None:
    """``Security(model, ...).apply(cfg, namespace, labels)``: for one config; index once for many."""
    Security(model, trust_domain=trust_domain, trust_bundle=trust_bundle, root_namespace=root_namespace).apply(
        cfg, namespace, labels
    )
