"""Inbound authorization: the config's ``Authorization`` compiled into one decision per request.

Owns Istio's semantics as ``meshproxy.v1.Authorization`` states them: DENY policies first (any
match denies), then no ALLOW policy at all allows, then any ALLOW match allows, else deny (an
ALLOW policy exists, so the default is deny); AUDIT policies never change the decision, a
request one matches is marked. A policy matches when any of its rules does (none: never); a
rule when one ``from`` entry, one ``to`` entry and every ``when`` condition hold (an empty part
holds). StringMatch: exact, prefix, suffix, presence (any non-empty value); hosts are matched
case-insensitively, paths without their query string and with dot segments resolved (as Envoy
normalizes them before its RBAC filter), ports against the workload port the connection was for.

Everything is compiled once per config into closures; ``Policies.check`` runs once per inbound
request, and not at all when the workload has no policy (``compile_policies`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from meshproxy.config.v1 import config_pb2 as pb

__all__ = ["DENIED", "Decision", "Policies", "compile_policies", "normalize_path"]

#: (response flag, grpc status, http status, message) of a denied request, as Envoy's RBAC filter says it.
DENIED = ("RBAC", 7, 403, "RBAC: access denied")

ALLOW = pb.AuthorizationPolicy.ALLOW
DENY = pb.AuthorizationPolicy.DENY
AUDIT = pb.AuthorizationPolicy.AUDIT

A = pb.AuthorizationCondition
_Pred = Callable[[Any, int, Any], bool]  # (peer or None, destination port, the request's h2 stream)


class Decision:
    """What ``Policies.check`` said of one request: ``allowed``; ``policy``, the name of the policy
    that decided ("" when no policy did: allowed with no ALLOW policy, or denied by default);
    ``audit``, the name of an AUDIT policy that matched ("")."""

    __slots__ = ("allowed", "audit", "policy")

    def __init__(self, allowed: bool, policy: str, audit: str) -> None:
        self.allowed = allowed
        self.policy = policy
        self.audit = audit

    @property
    def details(self) -> str:
        """Envoy's response code details for a denial."""
        if self.allowed:
            return ""
        return f"rbac_access_denied_matched_policy[{self.policy or 'none'}]"

    def __repr__(self) -> str:
        return f"<Decision {'allow' if self.allowed else 'deny'} policy={self.policy!r} audit={self.audit!r}>"


_ALLOWED = Decision(True, "", "")  # no ALLOW policy, nothing audited: the common answer, shared


class Policies:
    """One workload's policies, compiled: ``check(peer, port, stream) -> Decision``."""

    __slots__ = ("allow", "audit", "deny")

    def __init__(self, deny: list, allow: list, audit: list) -> None:
        # (name, [rule predicates]) each; a rule is a list of predicates that must all hold.
        self.deny = deny
        self.allow = allow
        self.audit = audit

    def check(self, peer: Any, port: int, s: Any) -> Decision:
        audit = ""
        for name, rules in self.audit:
            if _any_rule(rules, peer, port, s):
                audit = name
                break
        for name, rules in self.deny:
            if _any_rule(rules, peer, port, s):
                return Decision(False, name, audit)
        if not self.allow:
            return Decision(True, "", audit) if audit else _ALLOWED
        for name, rules in self.allow:
            if _any_rule(rules, peer, port, s):
                return Decision(True, name, audit)
        return Decision(False, "", audit)


def _any_rule(rules: list[list[_Pred]], peer: Any, port: int, s: Any) -> bool:
    for preds in rules:
        for pred in preds:
            if not pred(peer, port, s):
                break
        else:
            return True
    return False


def compile_policies(msg: Any) -> Policies | None:
    """``meshproxy.v1.Authorization`` compiled; None when it has no policy (nothing to check)."""
    if not msg.policies:
        return None
    out: dict[int, list] = {ALLOW: [], DENY: [], AUDIT: []}
    for policy in msg.policies:
        out[policy.action].append((policy.name, [_rule(r) for r in policy.rules]))
    return Policies(out[DENY], out[ALLOW], out[AUDIT])


# ---- string matches -------------------------------------------------------------------------------------------


def _string(m: Any, fold: bool = False) -> Callable[[str], bool]:
    kind = m.WhichOneof("match")
    if kind == "presence":
        return bool
    value = getattr(m, kind)
    if fold:
        value = value.lower()
    if kind == "exact":
        return value.__eq__
    if kind == "prefix":
        return lambda s: s.startswith(value)
    return lambda s: s.endswith(value)


def _matcher(matches: Sequence[Any], fold: bool = False) -> Callable[[str], bool] | None:
    """One value matching any of ``matches``; None when there are none."""
    if not matches:
        return None
    fs = [_string(m, fold) for m in matches]
    if len(fs) == 1:
        return fs[0]
    return lambda v: any(f(v) for f in fs)


# ---- request attributes -----------------------------------------------------------------------------------------


def _text(b: bytes | None) -> str:
    return b.decode("utf-8", "surrogateescape") if b else ""


def normalize_path(path: bytes | None) -> str:
    """The :path as authorization sees it: no query or fragment, dot segments resolved (RFC 3986 5.2.4)."""
    p = _text(path)
    for sep in ("?", "#"):
        i = p.find(sep)
        if i >= 0:
            p = p[:i]
    if "%2e" in p.lower():
        p = p.replace("%2e", ".").replace("%2E", ".")
    if "/." not in p:
        return p
    out: list[str] = []
    segments = p.split("/")
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    trailing = segments[-1] in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def _header_values(s: Any, name: bytes) -> list[str]:
    return [_text(v) for n, v in (s.headers or ()) if n == name]


# ---- rules ----------------------------------------------------------------------------------------------------


def _rule(rule: Any) -> list[_Pred]:
    preds: list[_Pred] = []
    sources = [_source(src) for src in getattr(rule, "from")]
    if sources:
        preds.append(_any_of(sources))
    ops = [_operation(op) for op in rule.to]
    if ops:
        preds.append(_any_of(ops))
    preds.extend(_condition(c) for c in rule.when)
    return preds


def _any_of(entries: list[list[_Pred]]) -> _Pred:
    if len(entries) == 1:
        preds = entries[0]
        return lambda peer, port, s: all(p(peer, port, s) for p in preds)
    return lambda peer, port, s: any(all(p(peer, port, s) for p in preds) for preds in entries)


def _peer_field(attr: str, matches: Sequence[Any], negate: bool) -> _Pred | None:
    f = _matcher(matches)
    if f is None:
        return None
    if negate:
        return lambda peer, port, s: peer is None or not f(getattr(peer, attr))
    return lambda peer, port, s: peer is not None and f(getattr(peer, attr))


def _source(src: Any) -> list[_Pred]:
    preds = [
        _peer_field("principal", src.principals, False),
        _peer_field("principal", src.not_principals, True),
        _peer_field("namespace", src.namespaces, False),
        _peer_field("namespace", src.not_namespaces, True),
    ]
    return [p for p in preds if p is not None]


def _stream_field(get: Callable[[Any], str], matches: Sequence[Any], negate: bool, fold: bool = False) -> _Pred | None:
    f = _matcher(matches, fold)
    if f is None:
        return None
    if negate:
        return lambda peer, port, s: not f(get(s))
    return lambda peer, port, s: f(get(s))


def _host(s: Any) -> str:
    return _text(s.authority).lower()


def _method(s: Any) -> str:
    return _text(s.method)


def _path(s: Any) -> str:
    return normalize_path(s.path)


def _operation(op: Any) -> list[_Pred]:
    preds = [
        _stream_field(_host, op.hosts, False, fold=True),
        _stream_field(_host, op.not_hosts, True, fold=True),
        _stream_field(_method, op.methods, False),
        _stream_field(_method, op.not_methods, True),
        _stream_field(_path, op.paths, False),
        _stream_field(_path, op.not_paths, True),
    ]
    if op.ports:
        ports = frozenset(op.ports)
        preds.append(lambda peer, port, s: port in ports)
    if op.not_ports:
        not_ports = frozenset(op.not_ports)
        preds.append(lambda peer, port, s: port not in not_ports)
    return [p for p in preds if p is not None]


def _condition(c: Any) -> _Pred:
    attribute = c.attribute
    if attribute == A.REQUEST_HEADER:
        name = c.header.lower().encode()

        def values(peer: Any, port: int, s: Any) -> list[str]:
            return _header_values(s, name)

    elif attribute == A.SOURCE_PRINCIPAL:

        def values(peer: Any, port: int, s: Any) -> list[str]:
            return [peer.principal] if peer is not None else []

    elif attribute == A.SOURCE_NAMESPACE:

        def values(peer: Any, port: int, s: Any) -> list[str]:
            return [peer.namespace] if peer is not None and peer.namespace else []

    else:  # DESTINATION_PORT

        def values(peer: Any, port: int, s: Any) -> list[str]:
            return [str(port)] if port else []

    want = _matcher(c.values)
    refuse = _matcher(c.not_values)

    def holds(peer: Any, port: int, s: Any) -> bool:
        got = values(peer, port, s)
        if want is not None and not any(want(v) for v in got):
            return False
        return refuse is None or not any(refuse(v) for v in got)

    return holds
