"""The mesh's resources, parsed and checked: Istio's shapes and Kubernetes' own, as typed values.

``parse(objects)`` turns the raw dicts a source holds into a ``Model``: the
VirtualServices, DestinationRules, ServiceEntries, PeerAuthentications and
AuthorizationPolicies (under Istio's apiVersions or our ``meshproxy.io``
group), and the Kubernetes Services, EndpointSlices, Pods and Namespaces.
Each resource is checked on its own: a bad one is set aside with an error
naming the field (``spec.http[0].route[1].weight: ...``) and every other one
is kept, so one broken VirtualService never takes the mesh down. Fields
Istio has and meshproxy does not implement are refused when they change
where or how a request goes (``redirect``, header rewriting, ...) and
accepted with a warning when they only protect or tune (``minHealthPercent``,
which needs a panic threshold meshproxy has not). A DestinationRule's
``trafficPolicy.tls`` is read for its ``ISTIO_MUTUAL`` and ``DISABLE`` modes
(``control.security`` turns them into upstream mTLS); TLS origination
(``SIMPLE``, ``MUTUAL``) is accepted with a warning and not done.

What meshproxy adds to Istio's API is spelled out here and in README's
"Configuration" section: ``retryBudget`` (Linkerd's retry budget) on
``VirtualService.spec.http[].retries`` and on
``DestinationRule.spec.trafficPolicy``, ``healthCheck`` (active checks with
the gRPC health protocol) on ``DestinationRule.spec.trafficPolicy``, and
``grpc: {service, method}`` in a VirtualService match.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from injector.mutate import workload_name

__all__ = [
    "API_VERSIONS",
    "Destination",
    "DestinationRule",
    "CircuitBreakers",
    "Endpoint",
    "Fault",
    "FaultAbort",
    "FaultDelay",
    "GRPC_STATUS",
    "HttpRoute",
    "Invalid",
    "Match",
    "Model",
    "HealthCheck",
    "OutlierDetection",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Port",
    "Problem",
    "Retries",
    "RetryBudget",
    "Service",
    "VirtualService",
    "parse",
    "parse_duration",
]

_NETWORKING = {"networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1"}
_SECURITY = {"security.istio.io/v1beta1", "security.istio.io/v1"}
_OURS = {"meshproxy.io/v1alpha1"}

#: kind -> the apiVersions it is accepted under.
API_VERSIONS: dict[str, frozenset[str]] = {
    "VirtualService": frozenset(_NETWORKING | _OURS),
    "DestinationRule": frozenset(_NETWORKING | _OURS),
    "ServiceEntry": frozenset(_NETWORKING | _OURS),
    "PeerAuthentication": frozenset(_SECURITY | _OURS),
    "AuthorizationPolicy": frozenset(_SECURITY | _OURS),
    "Service": frozenset({"v1"}),
    "EndpointSlice": frozenset({"discovery.k8s.io/v1"}),
    "Pod": frozenset({"v1"}),
    "Namespace": frozenset({"v1"}),
}

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|us|µs|ns|s)")
_MAX_DURATION_S = 315_576_000_000  # google.protobuf.Duration's limit
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_MAX_INT32 = 2**31 - 1
_MAX_UINT32 = 2**32 - 1
_MAX_OUTLIER_TIME_S = 4_611_686_018  # 2^62 ns, floored: the sidecar's outlier detector's limit
_GRPC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

#: Istio retryOn conditions meshproxy understands (Envoy's HTTP ones and gRPC status names).
RETRY_ON = frozenset(
    {
        "connect-failure",
        "refused-stream",
        "reset",
        "5xx",
        "gateway-error",
        "retriable-status-codes",
        "retriable-4xx",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


#: gRPC status names, as Istio spells a fault's ``abort.grpcStatus`` -> the code (OK cannot abort).
GRPC_STATUS = {
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


class Invalid(ValueError):
    """A resource meshproxy refuses: ``path`` names the field, ``message`` says why."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Problem:
    """Something wrong with one resource. An ``error`` sets the resource aside; a ``warning`` does not."""

    severity: str  # "error" or "warning"
    resource: str  # "VirtualService default/reviews"
    path: str
    message: str
    origin: str = ""  # where the resource came from: a file, or "kubernetes"

    def __str__(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        field_ = f" {self.path}:" if self.path else ""
        return f"{self.severity}: {self.resource}{where}:{field_} {self.message}"


def parse_duration(text: Any, path: str) -> float:
    """Istio's durations ("10s", "1.5s", "100ms", "1m30s") in seconds; Invalid otherwise."""
    if isinstance(text, bool) or not isinstance(text, str) or not text:
        raise Invalid(path, f"expected a duration such as '1.5s' or '100ms', got {text!r}")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise Invalid(path, f"expected a duration such as '1.5s' or '100ms', got {text!r}")
    if total > _MAX_DURATION_S:
        raise Invalid(path, f"{text!r} is longer than a protobuf Duration can be (10000 years)")
    return total


class _Spec:
    """One mapping being read, with its path for error messages and the warnings met on the way."""

    __slots__ = ("data", "path", "warnings")

    def __init__(self, data: Any, path: str, warnings: list[tuple[str, str]]) -> None:
        if not isinstance(data, dict):
            raise Invalid(path, f"expected a mapping, got {_kind(data)}")
        self.data = data
        self.path = path
        self.warnings = warnings

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fields(
        self,
        known: Iterable[str],
        refused: Mapping[str, str] | None = None,
        ignored: Mapping[str, str] | None = None,
    ) -> None:
        """Unknown keys are errors (a typo must not pass silently); ``refused`` ones are errors with
        their reason; ``ignored`` ones are accepted with a warning saying what is not done."""
        known = set(known)
        for key in self.data:
            if refused and key in refused:
                raise Invalid(self.at(key), refused[key])
            if ignored and key in ignored:
                self.warnings.append((self.at(key), ignored[key]))
                continue
            if key not in known:
                close = [k for k in sorted(known) if k.lower() == str(key).lower()]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise Invalid(self.at(str(key)), f"unknown field{hint}")

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def spec(self, key: str, *, required: bool = False) -> _Spec | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "is required")
            return None
        return _Spec(value, self.at(key), self.warnings)

    def specs(self, key: str, *, required: bool = False) -> list[_Spec]:
        return [
            _Spec(v, f"{self.at(key)}[{i}]", self.warnings) for i, v in enumerate(self.list(key, required=required))
        ]

    def list(self, key: str, *, required: bool = False) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "is required")
            return []
        if not isinstance(value, list):
            raise Invalid(self.at(key), f"expected a list, got {_kind(value)}")
        if required and not value:
            raise Invalid(self.at(key), "must not be empty")
        return value

    def strs(self, key: str, *, required: bool = False) -> list[str]:
        out = self.list(key, required=required)
        for i, v in enumerate(out):
            if not isinstance(v, str):
                raise Invalid(f"{self.at(key)}[{i}]", f"expected a string, got {_kind(v)}")
        return out

    def str(self, key: str, *, required: bool = False, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "is required")
            return default
        if not isinstance(value, str):
            raise Invalid(self.at(key), f"expected a string, got {_kind(value)}")
        if required and not value:
            raise Invalid(self.at(key), "must not be empty")
        return value

    def int(self, key: str, *, lo: int, hi: int, required: bool = False) -> int | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(self.at(key), f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise Invalid(self.at(key), f"must be from {lo} to {hi}, got {value}")
        return value

    def number(self, key: str, *, lo: float, hi: float) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise Invalid(self.at(key), f"expected a number, got {_kind(value)}")
        if not lo <= value <= hi:
            raise Invalid(self.at(key), f"must be from {lo:g} to {hi:g}, got {value:g}")
        return float(value)

    def bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise Invalid(self.at(key), f"expected true or false, got {_kind(value)}")
        return value

    def duration(self, key: str) -> float | None:
        value = self.data.get(key)
        return None if value is None else parse_duration(value, self.at(key))

    def min_duration(self, key: str, *, required: bool = False) -> float | None:
        """A duration Istio says "MUST be >=1ms" (fixedDelay, interval, baseEjectionTime, backoff)."""
        value = self.duration(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "is required")
            return None
        if value < 1e-3:
            raise Invalid(self.at(key), f"must be 1ms or more, got {self.data[key]!r}")
        return value

    def labels(self, key: str) -> dict[str, str]:
        value = self.data.get(key)
        if value is None:
            return {}
        return _labels(value, self.at(key))

    def enum(self, key: str, allowed: Iterable[str], default: str) -> str:
        value = self.str(key, default=default)
        allowed = tuple(allowed)
        if value not in allowed:
            raise Invalid(self.at(key), f"must be one of {', '.join(allowed)}, got {value!r}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _labels(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid(path, f"expected a mapping of labels, got {_kind(value)}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > 317 or not _LABEL_KEY.fullmatch(k):
            raise Invalid(f"{path}[{k!r}]", "is not a valid label key")
        if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.fullmatch(v):
            raise Invalid(f"{path}[{k!r}]", f"{v!r} is not a valid label value")
        out[k] = v
    return out


def _host(text: str, path: str, *, wildcard: bool = False) -> str:
    host = text.lower()
    if host == "*" and wildcard:
        return host
    if not _HOST.fullmatch(host) or (host.startswith("*") and not wildcard):
        raise Invalid(path, f"{text!r} is not a host name")
    if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
        raise Invalid(path, f"{text!r} is not a host name (a label is over 63 characters, or the name over 253)")
    return host


def _export_to(spec: _Spec, key: str = "exportTo") -> tuple[str, ...] | None:
    values = spec.strs(key)
    if not values:
        return None
    for i, v in enumerate(values):
        if v not in (".", "*", "~") and not _DNS1123_LABEL.fullmatch(v):
            raise Invalid(f"{spec.at(key)}[{i}]", f"{v!r} is not '.', '*', '~' or a namespace")
    return tuple(values)


# -- typed resources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    kind: str
    namespace: str
    name: str
    origin: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Port:
    number: int
    name: str = ""
    protocol: str = ""
    target_port: int | str | None = None


@dataclass(frozen=True)
class Endpoint:
    address: str  # an IP literal or (DNS resolution) a host name
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = 0
    # A Pod's workload (its Deployment, StatefulSet...) and namespace: the sidecars' metric labels.
    workload: str = ""
    namespace: str = ""
    # The workload's service account (a Pod's spec.serviceAccountName, a ServiceEntry endpoint's
    # serviceAccount): its SPIFFE id is what a client's mTLS expects of it. "": unknown.
    service_account: str = field(default="", compare=False)


@dataclass
class Service:
    """A destination: a Kubernetes Service (hosts = its FQDN) or one host of a ServiceEntry."""

    meta: Meta
    host: str
    ports: tuple[Port, ...]
    export_to: tuple[str, ...] | None
    # ServiceEntry: the endpoints, by port number. Kubernetes: filled from EndpointSlices (or Pods).
    endpoints: dict[int, list[Endpoint]] = field(default_factory=dict)
    selector: Mapping[str, str] | None = None  # Kubernetes Services: the Pod selector
    kubernetes: bool = False
    # The IPs the service answers on (a Service's clusterIPs, a ServiceEntry's single-host
    # addresses): a transparent sidecar maps a redirected connection's destination by them.
    addresses: tuple[str, ...] = ()
    # A ServiceEntry's subjectAltNames: identities its servers may present (SPIFFE URIs).
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryBudget:
    ratio: float | None
    min_per_second: int | None
    ttl: float | None


@dataclass(frozen=True)
class Retries:
    attempts: int  # 0: no retries
    per_try_timeout: float | None
    retry_on: tuple[str, ...]  # (): Istio's default conditions
    budget: RetryBudget | None
    backoff: float | None = None  # the base interval


@dataclass(frozen=True)
class FaultDelay:
    fixed_delay: float
    percentage: float | None  # None: every request


@dataclass(frozen=True)
class FaultAbort:
    http_status: int | None  # exactly one of the two is set
    grpc_status: int | None
    percentage: float | None  # None: every request


@dataclass(frozen=True)
class Fault:
    delay: FaultDelay | None
    abort: FaultAbort | None


@dataclass(frozen=True)
class CircuitBreakers:
    """connectionPool's limits; 0 is no limit (as Istio's unset)."""

    max_connections: int = 0
    max_pending_requests: int = 0
    max_requests: int = 0
    max_retries: int = 0


@dataclass(frozen=True)
class OutlierDetection:
    """trafficPolicy.outlierDetection; None: left unset (the sidecar's defaults are Istio's)."""

    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None


@dataclass(frozen=True)
class HealthCheck:
    """The ``healthCheck`` extension of a trafficPolicy; None fields: the sidecar's defaults."""

    interval: float | None = None
    timeout: float | None = None
    unhealthy_threshold: int | None = None
    healthy_threshold: int | None = None
    grpc_service_name: str = ""


@dataclass(frozen=True)
class Subset:
    name: str
    labels: Mapping[str, str]


@dataclass
class DestinationRule:
    meta: Meta
    host: str
    subsets: tuple[Subset, ...]
    export_to: tuple[str, ...] | None
    lb_policy: str = ""  # "" (meshproxy's default), ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH
    hash_header: str = ""
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    max_streams_per_connection: int | None = None
    retry_budget: RetryBudget | None = None
    circuit_breakers: CircuitBreakers | None = None
    outlier_detection: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    tls_mode: str = ""  # trafficPolicy.tls.mode: "" (auto mTLS), DISABLE or ISTIO_MUTUAL


@dataclass(frozen=True)
class StringMatch:
    kind: str  # exact, prefix, regex
    value: str


@dataclass(frozen=True)
class HeaderCondition:
    name: str
    match: StringMatch | None  # None: present
    invert: bool = False


@dataclass(frozen=True)
class Match:
    uri: StringMatch | None = None
    headers: tuple[HeaderCondition, ...] = ()
    method: str = ""
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    grpc_service: str = ""
    grpc_method: str = ""


@dataclass(frozen=True)
class Destination:
    host: str
    subset: str
    port: int | None
    weight: int


@dataclass(frozen=True)
class HttpRoute:
    name: str
    matches: tuple[Match, ...]
    destinations: tuple[Destination, ...]
    direct_status: int | None = None
    direct_body: str = ""
    rewrite_uri: str = ""
    rewrite_authority: str = ""
    timeout: float | None = None
    retries: Retries | None = None  # None: Istio's default policy
    fault: Fault | None = None


@dataclass
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]  # as resolved: FQDNs for short names
    export_to: tuple[str, ...] | None
    http: tuple[HttpRoute, ...]


@dataclass
class PeerAuthentication:
    meta: Meta
    selector: Mapping[str, str] | None
    mode: str  # UNSET, DISABLE, PERMISSIVE, STRICT
    port_modes: Mapping[int, str]


@dataclass
class AuthorizationPolicy:
    meta: Meta
    selector: Mapping[str, str] | None
    action: str
    rules: tuple[dict, ...]


@dataclass
class Model:
    """Everything valid, and every problem found; built by ``parse``."""

    cluster_domain: str
    services: list[Service] = field(default_factory=list)
    destination_rules: list[DestinationRule] = field(default_factory=list)
    virtual_services: list[VirtualService] = field(default_factory=list)
    peer_authentications: list[PeerAuthentication] = field(default_factory=list)
    authorization_policies: list[AuthorizationPolicy] = field(default_factory=list)
    namespaces: dict[str, Mapping[str, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# -- parsing --------------------------------------------------------------------------------------


def _meta(obj: dict, origin: str) -> Meta:
    kind = obj.get("kind")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise Invalid("metadata", "is required")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise Invalid("metadata.name", "is required")
    namespace = meta.get("namespace", "default") if kind != "Namespace" else ""
    if not isinstance(namespace, str) or (kind != "Namespace" and not _DNS1123_LABEL.fullmatch(namespace)):
        raise Invalid("metadata.namespace", f"{namespace!r} is not a namespace name")
    return Meta(kind, namespace, name, origin)


def resolve_host(host: str, namespace: str, cluster_domain: str) -> str:
    """Istio's rule: a name without a dot is a Kubernetes Service in the resource's own namespace."""
    return f"{host}.{namespace}.svc.{cluster_domain}" if "." not in host and host != "*" else host


def _string_match(spec: _Spec) -> StringMatch:
    spec.fields(("exact", "prefix", "regex"))
    set_ = [k for k in ("exact", "prefix", "regex") if k in spec.data]
    if len(set_) != 1:
        raise Invalid(spec.path, "set exactly one of exact, prefix, regex")
    kind = set_[0]
    value = spec.str(kind)
    if kind == "regex":
        try:
            re.compile(value.encode())  # as the sidecar compiles it (meshproxy.config._checks._regex)
        except re.error as e:
            raise Invalid(spec.at(kind), f"invalid regex {value!r}: {e.msg}") from None
    return StringMatch(kind, value)


def _budget(spec: _Spec | None) -> RetryBudget | None:
    if spec is None:
        return None
    spec.fields(("retryRatio", "minRetriesPerSecond", "ttl"))
    ttl = spec.duration("ttl")
    if ttl is not None and ttl <= 0:
        raise Invalid(spec.at("ttl"), "must be greater than 0")
    return RetryBudget(
        spec.number("retryRatio", lo=0.0, hi=1000.0),
        spec.int("minRetriesPerSecond", lo=0, hi=1_000_000),
        ttl,
    )


def _retries(spec: _Spec | None) -> Retries | None:
    if spec is None:
        return None
    spec.fields(
        ("attempts", "perTryTimeout", "retryOn", "retryBudget", "backoff"),
        ignored={
            "retryRemoteLocalities": "meshproxy has no localities: ignored",
            "retryIgnorePreviousHosts": "the next attempt always prefers another endpoint",
        },
    )
    attempts = spec.int("attempts", lo=0, hi=100) or 0
    per_try = spec.duration("perTryTimeout")
    if per_try is not None and per_try <= 0:
        raise Invalid(spec.at("perTryTimeout"), "must be greater than 0")
    conditions = [c.strip() for c in spec.str("retryOn").split(",") if c.strip()]
    for c in conditions:
        if c not in RETRY_ON and not (c.isdigit() and 100 <= int(c) <= 599):
            raise Invalid(spec.at("retryOn"), f"unknown condition {c!r} (known: {', '.join(sorted(RETRY_ON))})")
    return Retries(
        attempts, per_try, tuple(conditions), _budget(spec.spec("retryBudget")), spec.min_duration("backoff")
    )


def _percentage(spec: _Spec) -> float | None:
    """Istio's Percent, ``percentage: {value: 0..100}``; None when not given (then: every request)."""
    p = spec.spec("percentage")
    if p is None:
        return None
    p.fields(("value",))
    value = p.number("value", lo=0.0, hi=100.0)
    return 0.0 if value is None else value  # proto3: an unset value is 0


def _fault(spec: _Spec | None) -> Fault | None:
    """Istio's HTTPFaultInjection; an unset percentage is every request, as Istio's reference says."""
    if spec is None:
        return None
    spec.fields(("delay", "abort"))
    delay = abort = None
    if (d := spec.spec("delay")) is not None:
        d.fields(
            ("fixedDelay", "percentage", "percent"),
            refused={"exponentialDelay": "exponential delays are not supported: use fixedDelay"},
        )
        fixed = d.min_duration("fixedDelay", required=True)
        percentage = _percentage(d)
        legacy = d.int("percent", lo=0, hi=100)  # deprecated; percentage wins when both are given
        if percentage is None and legacy is not None:
            percentage = float(legacy)
        delay = FaultDelay(fixed, percentage)
    if (a := spec.spec("abort")) is not None:
        a.fields(
            ("httpStatus", "grpcStatus", "percentage"),
            refused={"http2Error": "aborting with an HTTP/2 error is not supported: use httpStatus or grpcStatus"},
        )
        if (a.get("httpStatus") is None) == (a.get("grpcStatus") is None):
            raise Invalid(a.path, "set exactly one of httpStatus, grpcStatus")
        http_status = a.int("httpStatus", lo=200, hi=599)
        grpc_status = None
        if http_status is None:
            name = a.str("grpcStatus")
            grpc_status = GRPC_STATUS.get(name)
            if grpc_status is None:
                hint = f" (did you mean {name.upper()!r}?)" if name.upper() in GRPC_STATUS else ""
                raise Invalid(
                    a.at("grpcStatus"),
                    f"{name!r} is not a gRPC error status name{hint} (known: {', '.join(GRPC_STATUS)})",
                )
        abort = FaultAbort(http_status, grpc_status, _percentage(a))
    if delay is None and abort is None:
        raise Invalid(spec.path, "set delay, abort or both")
    return Fault(delay, abort)


def _match(spec: _Spec) -> Match:
    spec.fields(
        ("name", "uri", "headers", "withoutHeaders", "method", "port", "sourceLabels", "sourceNamespace", "grpc"),
        refused={
            "scheme": "matching on scheme is not supported",
            "authority": "matching on authority inside a VirtualService is not supported: list the hosts instead",
            "queryParams": "matching on query parameters is not supported",
            "ignoreUriCase": "case-insensitive URI matching is not supported",
            "gateways": "gateways are not supported: meshproxy routes sidecar traffic only",
            "statPrefix": "statPrefix is not supported",
        },
    )
    uri = None
    if (u := spec.spec("uri")) is not None:
        uri = _string_match(u)
        if uri.kind != "regex" and not uri.value.startswith("/"):
            raise Invalid(u.at(uri.kind), f"{uri.value!r} must start with '/', as every path does")
    headers = []
    for key, invert in (("headers", False), ("withoutHeaders", True)):
        h = spec.spec(key)
        if h is None:
            continue
        for name, cond in h.data.items():
            hpath = f"{h.path}[{name!r}]"
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name.lower()):
                raise Invalid(hpath, "is not a header name")
            # Istio: an empty match ({}) means the header is present.
            sm = _string_match(_Spec(cond, hpath, spec.warnings)) if cond else None
            headers.append(HeaderCondition(name.lower(), sm, invert))
    method = ""
    if (m := spec.spec("method")) is not None:
        sm = _string_match(m)
        if sm.kind != "exact":
            raise Invalid(m.path, "only an exact method match is supported")
        method = sm.value
        if not _TOKEN.fullmatch(method):
            raise Invalid(m.at("exact"), f"{method!r} is not an HTTP method")
    grpc_service = grpc_method = ""
    if (g := spec.spec("grpc")) is not None:
        g.fields(("service", "method"))
        grpc_service, grpc_method = g.str("service"), g.str("method")
        if grpc_method and not grpc_service:
            raise Invalid(g.at("method"), "a method needs its service")
        for key, value in (("service", grpc_service), ("method", grpc_method)):
            if value and not _GRPC_NAME.fullmatch(value):
                raise Invalid(g.at(key), f"{value!r} is not a gRPC {key} name")
    if uri is not None and grpc_service:
        raise Invalid(spec.path, "give either uri or grpc, not both")
    source_namespace = spec.str("sourceNamespace")
    return Match(
        uri=uri,
        headers=tuple(headers),
        method=method,
        port=spec.int("port", lo=1, hi=65535),
        source_labels=spec.labels("sourceLabels"),
        source_namespace=source_namespace,
        grpc_service=grpc_service,
        grpc_method=grpc_method,
    )


def _http_route(spec: _Spec, namespace: str, domain: str) -> HttpRoute:
    spec.fields(
        ("name", "match", "route", "directResponse", "rewrite", "timeout", "retries", "fault"),
        refused={
            "redirect": "redirects are not supported",
            "delegate": "delegation is not supported",
            "headers": "adding or removing headers is not supported",
            "mirror": "mirroring is not supported",
            "mirrors": "mirroring is not supported",
            "mirrorPercentage": "mirroring is not supported",
            "mirror_percent": "mirroring is not supported",
        },
        ignored={"corsPolicy": "CORS is for browsers, not sidecars: ignored"},
    )
    matches = tuple(_match(m) for m in spec.specs("match"))
    destinations = []
    total = 0
    for d in spec.specs("route"):
        d.fields(("destination", "weight"), refused={"headers": "adding or removing headers is not supported"})
        dest = d.spec("destination", required=True)
        dest.fields(("host", "subset", "port"))
        host = resolve_host(_host(dest.str("host", required=True), dest.at("host")), namespace, domain)
        port = None
        if (p := dest.spec("port")) is not None:
            p.fields(("number",))
            port = p.int("number", lo=1, hi=65535, required=True)
        weight = d.int("weight", lo=0, hi=1_000_000) or 0
        total += weight
        destinations.append(Destination(host, dest.str("subset"), port, weight))
    direct_status = None
    direct_body = ""
    if (dr := spec.spec("directResponse")) is not None:
        if destinations:
            raise Invalid(dr.path, "give either route or directResponse, not both")
        dr.fields(("status", "body"))
        direct_status = dr.int("status", lo=200, hi=599, required=True)
        if (body := dr.spec("body")) is not None:
            body.fields(("string",), refused={"bytes": "only a string body is supported"})
            direct_body = body.str("string")
    elif not destinations:
        raise Invalid(spec.at("route"), "is required (or directResponse)")
    if len(destinations) > 1 and total == 0:
        raise Invalid(spec.at("route"), "every weight is 0, so nothing could be picked")
    rewrite_uri = rewrite_authority = ""
    if (rw := spec.spec("rewrite")) is not None:
        rw.fields(("uri", "authority"), refused={"uriRegexRewrite": "regex rewrites are not supported"})
        rewrite_uri, rewrite_authority = rw.str("uri"), rw.str("authority")
        if any(ch.isspace() or not ch.isprintable() for ch in rewrite_authority):
            raise Invalid(rw.at("authority"), f"{rewrite_authority!r} is not an authority")
        if rewrite_uri:
            if not rewrite_uri.startswith("/"):
                raise Invalid(rw.at("uri"), f"{rewrite_uri!r} must start with '/'")
            if not matches or any(m.uri is None or m.uri.kind == "regex" for m in matches):
                raise Invalid(rw.at("uri"), "rewriting the URI needs every match to have a uri prefix or exact")
    timeout = spec.duration("timeout")
    return HttpRoute(
        name=spec.str("name"),
        matches=matches,
        destinations=tuple(destinations),
        direct_status=direct_status,
        direct_body=direct_body,
        rewrite_uri=rewrite_uri,
        rewrite_authority=rewrite_authority,
        timeout=timeout,
        retries=_retries(spec.spec("retries")),
        fault=_fault(spec.spec("fault")),
    )


def _virtual_service(meta: Meta, spec: _Spec, domain: str) -> VirtualService:
    spec.fields(
        ("hosts", "gateways", "http", "exportTo"),
        refused={"tcp": "TCP routes are not supported yet", "tls": "TLS routes are not supported yet"},
    )
    hosts = []
    for i, h in enumerate(spec.strs("hosts", required=True)):
        path = f"{spec.at('hosts')}[{i}]"
        if h == "*" or h.startswith("*"):
            raise Invalid(path, "wildcard hosts are not supported: name the services")
        hosts.append(resolve_host(_host(h, path), meta.namespace, domain))
    gateways = spec.strs("gateways")
    if gateways and "mesh" not in gateways:
        raise Invalid(spec.at("gateways"), "meshproxy has no gateways: with gateways set, 'mesh' must be one of them")
    http = tuple(_http_route(r, meta.namespace, domain) for r in spec.specs("http"))
    return VirtualService(meta, tuple(hosts), _export_to(spec), http)


_NO_ORIGINATION = "TLS origination is not supported: ignored"


def _traffic_policy(spec: _Spec, rule: DestinationRule) -> None:
    spec.fields(
        ("loadBalancer", "connectionPool", "outlierDetection", "retryBudget", "healthCheck", "tls"),
        ignored={
            "portLevelSettings": "per-port policies are not supported: ignored",
            "tunnel": "tunnels are not supported: ignored",
            "proxyProtocol": "PROXY protocol is not supported: ignored",
        },
    )
    if (tls := spec.spec("tls")) is not None:
        tls.fields(
            ("mode",),
            ignored={
                "clientCertificate": _NO_ORIGINATION,
                "privateKey": _NO_ORIGINATION,
                "caCertificates": _NO_ORIGINATION,
                "credentialName": _NO_ORIGINATION,
                "sni": _NO_ORIGINATION,
                "subjectAltNames": "ignored",
                "insecureSkipVerify": "ignored",
                "caCrl": "ignored",
            },
        )
        mode = tls.enum("mode", ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"), "DISABLE")
        if mode in ("SIMPLE", "MUTUAL"):
            tls.warnings.append((tls.at("mode"), f"{mode}: {_NO_ORIGINATION}"))
        else:
            rule.tls_mode = mode
    if (lb := spec.spec("loadBalancer")) is not None:
        lb.fields(
            ("simple", "consistentHash"),
            ignored={"localityLbSetting": "meshproxy has no localities: ignored", "warmupDurationSecs": "ignored"},
        )
        simple = (
            lb.enum(
                "simple", ("UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM", "PASSTHROUGH"), ""
            )
            if "simple" in lb.data
            else ""
        )
        if simple == "PASSTHROUGH":
            raise Invalid(lb.at("simple"), "PASSTHROUGH is not supported")
        rule.lb_policy = {"LEAST_CONN": "LEAST_REQUEST", "UNSPECIFIED": ""}.get(simple, simple)
        if (ch := lb.spec("consistentHash")) is not None:
            if simple:
                raise Invalid(lb.path, "give either simple or consistentHash, not both")
            ch.fields(
                ("httpHeaderName", "ringHash", "minimumRingSize"),
                refused={
                    "httpCookie": "hashing on a cookie is not supported",
                    "useSourceIp": "hashing on the source IP is not supported",
                    "httpQueryParameterName": "hashing on a query parameter is not supported",
                    "maglev": "Maglev is not supported (ringHash is)",
                },
            )
            name = ch.str("httpHeaderName", required=True).lower()
            if not _HEADER_NAME.fullmatch(name):
                raise Invalid(ch.at("httpHeaderName"), f"{name!r} is not a header name")
            rule.lb_policy, rule.hash_header = "RING_HASH", name
    limits: dict[str, int] = {}
    if (cp := spec.spec("connectionPool")) is not None:
        cp.fields(("tcp", "http"))
        if (tcp := cp.spec("tcp")) is not None:
            tcp.fields(
                ("connectTimeout", "maxConnections"),
                ignored={
                    "tcpKeepalive": "ignored",
                    "maxConnectionDuration": "ignored",
                    "idleTimeout": "ignored (http.idleTimeout is honoured)",
                },
            )
            rule.connect_timeout = tcp.duration("connectTimeout")
            if rule.connect_timeout is not None and rule.connect_timeout <= 0:
                raise Invalid(tcp.at("connectTimeout"), "must be greater than 0")
            limits["max_connections"] = tcp.int("maxConnections", lo=0, hi=_MAX_INT32) or 0
        if (http := cp.spec("http")) is not None:
            http.fields(
                ("idleTimeout", "maxConcurrentStreams", "http1MaxPendingRequests", "http2MaxRequests", "maxRetries"),
                ignored={
                    "maxRequestsPerConnection": "connections are not closed after a number of requests: ignored",
                    "h2UpgradePolicy": "meshproxy speaks HTTP/2 upstream: ignored",
                    "useClientProtocol": "ignored",
                },
            )
            for key, name in (
                ("http1MaxPendingRequests", "max_pending_requests"),
                ("http2MaxRequests", "max_requests"),
                ("maxRetries", "max_retries"),
            ):
                limits[name] = http.int(key, lo=0, hi=_MAX_INT32) or 0
            rule.idle_timeout = http.duration("idleTimeout")
            if rule.idle_timeout is not None and rule.idle_timeout <= 0:
                raise Invalid(http.at("idleTimeout"), "must be greater than 0")
            rule.max_streams_per_connection = http.int("maxConcurrentStreams", lo=1, hi=2**31 - 1)
    # Istio's 0 (or unset) is no limit, as the proto's 0.
    if any(limits.values()):
        rule.circuit_breakers = CircuitBreakers(**limits)
    if (od := spec.spec("outlierDetection")) is not None:
        rule.outlier_detection = _outlier_detection(od)
    rule.retry_budget = _budget(spec.spec("retryBudget"))
    if (hc := spec.spec("healthCheck")) is not None:
        rule.health_check = _health_check(hc)


def _health_check(spec: _Spec) -> HealthCheck:
    """meshproxy's ``healthCheck`` extension: grpc.health.v1 checks of every endpoint."""
    spec.fields(("interval", "timeout", "unhealthyThreshold", "healthyThreshold", "grpcServiceName"))
    interval = spec.duration("interval")
    timeout = spec.duration("timeout")
    if interval is not None and interval < 0.1:
        raise Invalid(spec.at("interval"), f"must be 0.1s or more, got {spec.data['interval']!r}")
    if timeout is not None and timeout <= 0:
        raise Invalid(spec.at("timeout"), "must be greater than 0")
    if (timeout if timeout is not None else 1.0) > (interval if interval is not None else 10.0):
        raise Invalid(spec.at("timeout"), "must not exceed the interval (10s when unset)")
    return HealthCheck(
        interval,
        timeout,
        spec.int("unhealthyThreshold", lo=1, hi=1000),
        spec.int("healthyThreshold", lo=1, hi=1000),
        spec.str("grpcServiceName"),
    )


def _outlier_detection(spec: _Spec) -> OutlierDetection:
    """Istio's OutlierDetection, as pilot applies it; what is left unset stays unset (the sidecar's
    defaults are Istio's: 5 consecutive 5xx, 10s interval, 30s base ejection, 10%)."""
    spec.fields(
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "consecutiveErrors",
        ),
        ignored={"minHealthPercent": "meshproxy has no panic threshold: ignored"},
    )
    c5xx = spec.int("consecutive5xxErrors", lo=0, hi=_MAX_UINT32)
    gateway = spec.int("consecutiveGatewayErrors", lo=0, hi=_MAX_UINT32)
    legacy = spec.int("consecutiveErrors", lo=0, hi=_MAX_INT32)
    if legacy:
        # Istio reads the deprecated field as gateway errors only, with the 5xx count off (istio/api#617);
        # the fields that replaced it win when given too.
        spec.warnings.append(
            (
                spec.at("consecutiveErrors"),
                "deprecated: read as consecutiveGatewayErrors, with consecutive5xxErrors 0, as Istio does",
            )
        )
        gateway = legacy if gateway is None else gateway
        c5xx = 0 if c5xx is None else c5xx
    split = bool(spec.bool("splitExternalLocalOriginErrors"))
    local = spec.int("consecutiveLocalOriginFailures", lo=0, hi=_MAX_UINT32)
    if local is not None and not split:
        spec.warnings.append(
            (
                spec.at("consecutiveLocalOriginFailures"),
                "counted only with splitExternalLocalOriginErrors: true: ignored",
            )
        )
        local = None
    percent = spec.int("maxEjectionPercent", lo=0, hi=100)
    if percent == 0:
        spec.warnings.append(
            (spec.at("maxEjectionPercent"), "0 is read as unset, as Istio does: up to 10% of endpoints are ejected")
        )
        percent = None
    times = {}
    for key in ("interval", "baseEjectionTime"):
        times[key] = spec.min_duration(key)
        if times[key] is not None and times[key] > _MAX_OUTLIER_TIME_S:
            raise Invalid(spec.at(key), f"must be at most {_MAX_OUTLIER_TIME_S:.0f}s (about 146 years)")
    return OutlierDetection(
        consecutive_5xx=c5xx,
        consecutive_gateway_errors=gateway,
        consecutive_local_origin_failures=local,
        split_external_local_origin_errors=split,
        interval=times["interval"],
        base_ejection_time=times["baseEjectionTime"],
        max_ejection_percent=percent,
    )


def _destination_rule(meta: Meta, spec: _Spec, domain: str) -> DestinationRule:
    spec.fields(
        ("host", "subsets", "trafficPolicy", "exportTo"),
        refused={"workloadSelector": "workloadSelector is not supported"},
    )
    host = resolve_host(_host(spec.str("host", required=True), spec.at("host")), meta.namespace, domain)
    subsets = []
    seen = set()
    for s in spec.specs("subsets"):
        s.fields(("name", "labels"), ignored={"trafficPolicy": "per-subset policies are not supported: ignored"})
        name = s.str("name", required=True)
        if name in seen:
            raise Invalid(s.at("name"), f"subset {name!r} is defined twice")
        seen.add(name)
        labels = s.labels("labels")
        subsets.append(Subset(name, labels))
    rule = DestinationRule(meta, host, tuple(subsets), _export_to(spec))
    if (tp := spec.spec("trafficPolicy")) is not None:
        _traffic_policy(tp, rule)
    return rule


def _ports(spec: _Spec, key: str, *, kubernetes: bool) -> tuple[Port, ...]:
    ports = []
    seen = set()
    for p in spec.specs(key, required=True):
        if kubernetes:
            p.fields(("name", "port", "targetPort", "protocol", "appProtocol", "nodePort"))
            number = p.int("port", lo=1, hi=65535, required=True)
            protocol = p.str("protocol", default="TCP")
            if protocol not in ("TCP", "UDP", "SCTP"):
                raise Invalid(p.at("protocol"), f"must be TCP, UDP or SCTP, got {protocol!r}")
            target = p.get("targetPort")
            if (target is not None and not isinstance(target, int | str)) or isinstance(target, bool):
                raise Invalid(p.at("targetPort"), f"expected a port number or name, got {_kind(target)}")
            if isinstance(target, int):
                p.int("targetPort", lo=1, hi=65535)
            if protocol != "TCP":
                continue
            protocol = p.str("appProtocol")
        else:
            p.fields(("number", "name", "protocol", "targetPort"))
            number = p.int("number", lo=1, hi=65535, required=True)
            protocol = p.str("protocol").upper()
            target = p.int("targetPort", lo=1, hi=65535)
            if protocol and protocol not in ("GRPC", "HTTP2", "HTTP", "HTTPS", "TCP", "TLS", "MONGO", "REDIS", "MYSQL"):
                raise Invalid(p.at("protocol"), f"unknown protocol {protocol!r}")
            if protocol not in ("", "GRPC", "HTTP2"):
                p.warnings.append((p.at("protocol"), f"{protocol} traffic is proxied as HTTP/2 (h2c) only, for now"))
        if number in seen:
            raise Invalid(p.at("port" if kubernetes else "number"), f"port {number} is listed twice")
        seen.add(number)
        ports.append(Port(number, p.str("name"), protocol, target))
    return tuple(ports)


def _service_entry(meta: Meta, spec: _Spec) -> list[Service]:
    spec.fields(
        ("hosts", "ports", "location", "resolution", "endpoints", "exportTo", "addresses", "subjectAltNames"),
        refused={"workloadSelector": "workloadSelector is not supported: list the endpoints"},
    )
    hosts = [_host(h, f"{spec.at('hosts')}[{i}]") for i, h in enumerate(spec.strs("hosts", required=True))]
    ports = _ports(spec, "ports", kubernetes=False)
    spec.enum("location", ("MESH_EXTERNAL", "MESH_INTERNAL"), "MESH_EXTERNAL")
    resolution = spec.enum("resolution", ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"), "NONE")
    if resolution == "NONE":
        raise Invalid(spec.at("resolution"), "NONE (pass-through) is not supported: use STATIC or DNS")
    by_name = {p.name: p for p in ports if p.name}
    endpoints: dict[int, list[Endpoint]] = {p.number: [] for p in ports}
    for e in spec.specs("endpoints"):
        e.fields(
            ("address", "ports", "labels", "weight", "serviceAccount"),
            ignored={"network": "ignored", "locality": "ignored"},
        )
        address = e.str("address", required=True)
        if resolution == "STATIC":
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise Invalid(e.at("address"), f"{address!r} is not an IP address (resolution is STATIC)") from None
        else:
            _host(address, e.at("address"))
        port_map = e.spec("ports")
        overrides: dict[str, int] = {}
        if port_map is not None:
            for name in port_map.data:
                if name not in by_name:
                    raise Invalid(f"{port_map.path}[{name!r}]", f"no port named {name!r} in spec.ports")
                overrides[name] = port_map.int(name, lo=1, hi=65535)
        labels = e.labels("labels")
        weight = e.int("weight", lo=0, hi=2**32 - 1) or 0
        account = e.str("serviceAccount")
        if account and not all(_DNS1123_LABEL.fullmatch(part) for part in account.split(".")):
            raise Invalid(e.at("serviceAccount"), f"{account!r} is not a service account name")
        for p in ports:
            target = overrides.get(p.name) or p.target_port or p.number
            endpoints[p.number].append(Endpoint(address, int(target), labels, weight, service_account=account))
    export_to = _export_to(spec)
    addresses = _entry_addresses(spec)
    sans = tuple(spec.strs("subjectAltNames"))
    if not spec.list("endpoints"):
        if resolution == "STATIC":
            raise Invalid(spec.at("endpoints"), "a STATIC ServiceEntry needs endpoints")
        # DNS without endpoints: each host resolves to itself (not to every host of the entry).
        return [
            Service(
                meta,
                h,
                ports,
                export_to,
                {p.number: [Endpoint(h, int(p.target_port or p.number))] for p in ports},
                addresses=addresses,
                subject_alt_names=sans,
            )
            for h in hosts
        ]
    return [
        Service(
            meta,
            h,
            ports,
            export_to,
            {k: list(v) for k, v in endpoints.items()},
            addresses=addresses,
            subject_alt_names=sans,
        )
        for h in hosts
    ]


def _entry_addresses(spec: _Spec) -> tuple[str, ...]:
    """A ServiceEntry's ``addresses``: IPs or CIDR blocks. A single-host block is its IP; a wider
    one cannot name one cluster for a connection, so it is kept out with a warning."""
    out: list[str] = []
    for i, text in enumerate(spec.strs("addresses")):
        path = f"{spec.at('addresses')}[{i}]"
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise Invalid(path, f"{text!r} is not an IP address or CIDR block") from None
        if net.num_addresses != 1:
            spec.warnings.append((path, f"{text} is a range: transparent sidecars map single addresses only"))
            continue
        address = str(net.network_address)
        if address not in out:
            out.append(address)
    return tuple(out)


def _kube_service(meta: Meta, obj: dict, domain: str) -> Service | None:
    spec = _Spec(obj.get("spec") or {}, "spec", [])
    if spec.str("type") == "ExternalName":
        return None
    if not _DNS1123_LABEL.fullmatch(meta.name):
        # The name becomes a host (name.namespace.svc...) and the sidecar's domains.
        raise Invalid("metadata.name", f"{meta.name!r} is not a Service name (a DNS-1123 label)")
    ports = _ports(spec, "ports", kubernetes=True)
    selector = spec.labels("selector") if "selector" in spec.data else None
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        raise Invalid("metadata.annotations", f"expected a mapping, got {_kind(annotations)}")
    export = annotations.get("networking.istio.io/exportTo")
    export_to = tuple(x.strip() for x in export.split(",") if x.strip()) if isinstance(export, str) else None
    return Service(
        meta,
        f"{meta.name}.{meta.namespace}.svc.{domain}",
        ports,
        export_to or None,
        selector=selector,
        kubernetes=True,
        addresses=_cluster_ips(spec),
    )


def _cluster_ips(spec: _Spec) -> tuple[str, ...]:
    """A Service's ``clusterIPs`` (dual stack), else its ``clusterIP``; none for a headless
    Service ("None") or one not allocated yet."""
    out: list[str] = []
    ips = spec.strs("clusterIPs") or ([spec.str("clusterIP")] if spec.str("clusterIP") else [])
    path = spec.at("clusterIPs") if spec.get("clusterIPs") else spec.at("clusterIP")
    for i, ip in enumerate(ips):
        if ip == "None":
            return ()
        where = f"{path}[{i}]" if spec.get("clusterIPs") else path
        _ip(ip, where)
        address = str(ipaddress.ip_address(ip))
        if address not in out:
            out.append(address)
    return tuple(out)


def _peer_authentication(meta: Meta, spec: _Spec) -> PeerAuthentication:
    spec.fields(("selector", "mtls", "portLevelMtls"))
    modes = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
    selector = None
    if (s := spec.spec("selector")) is not None:
        s.fields(("matchLabels",))
        selector = s.labels("matchLabels")
    mode = "UNSET"
    if (m := spec.spec("mtls")) is not None:
        m.fields(("mode",))
        mode = m.enum("mode", modes, "UNSET")
    port_modes = {}
    if (pl := spec.spec("portLevelMtls")) is not None:
        if selector is None:
            raise Invalid(pl.path, "port-level settings need a workload selector (as in Istio)")
        for port, value in pl.data.items():
            path = f"{pl.path}[{port!r}]"
            try:
                number = int(port)
            except (TypeError, ValueError):
                raise Invalid(path, "is not a port number") from None
            if not 1 <= number <= 65535:
                raise Invalid(path, "is not a port number")
            pm = _Spec(value, path, spec.warnings)
            pm.fields(("mode",))
            port_modes[number] = pm.enum("mode", modes, "UNSET")
    return PeerAuthentication(meta, selector, mode, port_modes)


_SOURCE_KEYS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
_OPERATION_KEYS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")


def _authorization_policy(meta: Meta, spec: _Spec) -> AuthorizationPolicy:
    spec.fields(
        ("selector", "action", "rules", "targetRef", "targetRefs"),
        refused={"provider": "CUSTOM providers are not supported"},
    )
    if spec.get("targetRef") is not None or spec.get("targetRefs") is not None:
        raise Invalid(spec.at("targetRef"), "targetRef is for gateways: use selector")
    selector = None
    if (s := spec.spec("selector")) is not None:
        s.fields(("matchLabels",))
        selector = s.labels("matchLabels")
    action = spec.enum("action", ("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
    if action == "CUSTOM":
        raise Invalid(spec.at("action"), "CUSTOM is not supported")
    rules = []
    for r in spec.specs("rules"):
        r.fields(("from", "to", "when"))
        for f in r.specs("from"):
            f.fields(("source",))
            src = f.spec("source", required=True)
            src.fields(_SOURCE_KEYS)
            for k in _SOURCE_KEYS:
                src.strs(k)
        for t in r.specs("to"):
            t.fields(("operation",))
            op = t.spec("operation", required=True)
            op.fields(_OPERATION_KEYS)
            for k in _OPERATION_KEYS:
                op.strs(k)
        for w in r.specs("when"):
            w.fields(("key", "values", "notValues"))
            w.str("key", required=True)
            w.strs("values")
            w.strs("notValues")
        rules.append(r.data)
    return AuthorizationPolicy(meta, selector, action, tuple(rules))


def parse(objects: Iterable[tuple[dict, str]], *, cluster_domain: str = "cluster.local") -> Model:
    """``(object, origin)`` pairs -> a Model. Never raises for a bad object: it becomes a Problem."""
    model = Model(cluster_domain)
    slices: list[dict] = []
    pods: list[dict] = []
    seen: dict[tuple, str] = {}
    for obj, origin in objects:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        label = f"{kind or 'object'} {_describe(obj)}"
        warnings: list[tuple[str, str]] = []
        try:
            if not isinstance(obj, dict):
                raise Invalid("", f"expected a Kubernetes object (a mapping), got {_kind(obj)}")
            if not isinstance(kind, str) or kind not in API_VERSIONS:
                model.problems.append(Problem("warning", label, "kind", "not a kind meshproxy reads: ignored", origin))
                continue
            api_version = obj.get("apiVersion")
            if not isinstance(api_version, str) or api_version not in API_VERSIONS[kind]:
                raise Invalid("apiVersion", f"{kind} is read under {', '.join(sorted(API_VERSIONS[kind]))}")
            meta = _meta(obj, origin)
            label = str(meta)
            identity = (api_version.rpartition("/")[0], kind, meta.namespace, meta.name)
            if identity in seen:
                raise Invalid("metadata.name", f"{label} is already defined in {seen[identity]}: this one is ignored")
            seen[identity] = origin
            if kind == "Namespace":
                model.namespaces[meta.name] = _labels(
                    (obj.get("metadata") or {}).get("labels") or {}, "metadata.labels"
                )
            elif kind == "Service":
                if (svc := _kube_service(meta, obj, cluster_domain)) is not None:
                    model.services.append(svc)
            elif kind == "EndpointSlice":
                _check_endpoint_slice(obj)
                slices.append(obj)
            elif kind == "Pod":
                _check_pod(obj)
                pods.append(obj)
            else:
                spec = _Spec(obj.get("spec"), "spec", warnings)
                if kind == "VirtualService":
                    model.virtual_services.append(_virtual_service(meta, spec, cluster_domain))
                elif kind == "DestinationRule":
                    model.destination_rules.append(_destination_rule(meta, spec, cluster_domain))
                elif kind == "ServiceEntry":
                    model.services.extend(_service_entry(meta, spec))
                elif kind == "PeerAuthentication":
                    model.peer_authentications.append(_peer_authentication(meta, spec))
                else:
                    model.authorization_policies.append(_authorization_policy(meta, spec))
        except Invalid as e:
            model.problems.append(Problem("error", label, e.path, e.message, origin))
            continue
        for path, message in warnings:
            model.problems.append(Problem("warning", label, path, message, origin))
    _kube_endpoints(model, slices, pods)
    return model


def _ip(value: str, path: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(path, f"{value!r} is not an IP address") from None


def _check_pod(obj: dict) -> None:
    """What ``_kube_endpoints`` reads of a Pod: its labels and IP. (The API server checks these;
    a directory of YAML has nobody to.)"""
    _labels((obj.get("metadata") or {}).get("labels") or {}, "metadata.labels")
    status = _Spec(obj, "", []).spec("status")
    if status is not None and (ip := status.str("podIP")):
        _ip(ip, status.at("podIP"))


def _check_endpoint_slice(obj: dict) -> None:
    """What ``_kube_endpoints`` reads of an EndpointSlice, checked as the API server would."""
    _labels((obj.get("metadata") or {}).get("labels") or {}, "metadata.labels")
    s = _Spec(obj, "", [])
    address_type = s.str("addressType", default="IPv4")
    for p in s.specs("ports"):
        p.str("name")
        p.int("port", lo=1, hi=65535)
    for e in s.specs("endpoints"):
        for i, address in enumerate(e.strs("addresses")):
            if address_type in ("IPv4", "IPv6"):
                _ip(address, f"{e.at('addresses')}[{i}]")
        if (c := e.spec("conditions")) is not None and not isinstance(c.get("ready"), bool | None):
            raise Invalid(c.at("ready"), f"expected a boolean, got {_kind(c.get('ready'))}")
        if (ref := e.spec("targetRef")) is not None:
            ref.str("name")
            ref.str("namespace")


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "?"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name", "?")
    ns = meta.get("namespace")
    return f"{ns}/{name}" if ns else str(name)


def _kube_endpoints(model: Model, slices: list[dict], pods: list[dict]) -> None:
    """Fill Kubernetes Services' endpoints from their EndpointSlices (ready endpoints only), labelled
    with their Pods' labels; a Service with a selector and no slice at all takes the selected Pods'
    IPs (the endpoint controller's job, for a directory of YAML that has no controller)."""
    pod_labels: dict[tuple[str, str], dict[str, str]] = {}
    pod_accounts: dict[tuple[str, str], str] = {}
    pod_workloads: dict[tuple[str, str], str] = {}
    pod_ips: list[tuple[str, dict[str, str], str, str, str]] = []
    for p in pods:
        meta = p.get("metadata") or {}
        ns = meta.get("namespace", "default")
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            continue
        pod_labels[ns, meta.get("name", "")] = labels
        account = (p.get("spec") or {}).get("serviceAccountName") or "default"
        account = account if isinstance(account, str) else ""
        pod_accounts[ns, meta.get("name", "")] = account
        workload = workload_name(meta)
        pod_workloads[ns, meta.get("name", "")] = workload
        ip = (p.get("status") or {}).get("podIP")
        if isinstance(ip, str) and ip:
            pod_ips.append((ns, labels, ip, account, workload))
    by_service: dict[tuple[str, str], list[dict]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if isinstance(svc, str):
            by_service.setdefault((meta.get("namespace", "default"), svc), []).append(s)
    for service in model.services:
        if not service.kubernetes:
            continue
        ns, name = service.meta.namespace, service.meta.name
        found = by_service.get((ns, name))
        service.endpoints = {p.number: [] for p in service.ports}
        if found is None:
            if service.selector:
                for pns, labels, ip, account, workload in pod_ips:
                    if pns == ns and all(labels.get(k) == v for k, v in service.selector.items()):
                        for p in service.ports:
                            if isinstance(p.target_port, int) or p.target_port is None:
                                service.endpoints[p.number].append(
                                    Endpoint(
                                        ip,
                                        p.target_port or p.number,
                                        labels,
                                        service_account=account,
                                        workload=workload,
                                        namespace=ns,
                                    )
                                )
            continue
        for s in found:
            if s.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
                continue
            slice_ports = {}
            for sp in s.get("ports") or []:
                if isinstance(sp, dict) and isinstance(sp.get("port"), int):
                    slice_ports[sp.get("name") or ""] = sp["port"]
            for ep in s.get("endpoints") or []:
                if not isinstance(ep, dict) or (ep.get("conditions") or {}).get("ready") is False:
                    continue
                addresses = ep.get("addresses") or []
                if not addresses or not isinstance(addresses[0], str):
                    continue
                ref = ep.get("targetRef") or {}
                pod = (ref.get("namespace", ns), ref.get("name", ""))
                labels = pod_labels.get(pod, {})
                account = pod_accounts.get(pod, "")
                workload = pod_workloads.get(pod, "")
                for p in service.ports:
                    port = slice_ports.get(p.name)
                    if port is None and len(slice_ports) == 1 and len(service.ports) == 1:
                        port = next(iter(slice_ports.values()))
                    if port is not None:
                        service.endpoints[p.number].append(
                            Endpoint(
                                addresses[0],
                                port,
                                labels,
                                service_account=account,
                                workload=workload,
                                namespace=pod[0],
                            )
                        )
