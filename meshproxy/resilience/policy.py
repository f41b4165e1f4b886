"""A route's retry policy and fault injection, compiled from config, and the status mappings they share.

Owns what a route says about failures, not the state of any request:
``RetryPolicy`` turns ``meshproxy.v1.RetryPolicy`` into numbers and the
compiled ``RetryOn`` conditions the core tests without Python;
``FaultPolicy`` turns ``meshproxy.v1.FaultInjection`` into delays and
aborts. The per-request decisions (attempts left, the budget, backoff,
the next endpoint) are the downstream's and the worker's.

Retry conditions, as Envoy and Istio spell them:

* ``5xx``: a response status >= 500, a reset before response headers, a
  connect failure; ``gateway-error``: 502, 503, 504; ``reset``: a reset of
  the upstream stream (or its connection) before response headers;
  ``retriable-4xx``: 409; an HTTP status such as ``"503"`` (and
  ``retriable-status-codes``, which says those are listed);
* gRPC names (``cancelled``, ``deadline-exceeded``, ``internal``,
  ``resource-exhausted``, ``unavailable``): a trailers-only response with
  that grpc-status (a status in trailers comes after response headers went
  downstream: too late, as in Envoy);
* ``connect-failure``, ``refused-stream``: accepted; a request the upstream
  never saw (connect failure, REFUSED_STREAM, above a GOAWAY's last stream
  id) is sent to another endpoint whatever the policy says, up to
  ``MAX_REDISPATCH`` times, free of the budget, since it cost the upstream
  nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshproxy.config import field_ns
from meshproxy.conn import h2conn as h2
from meshproxy.resilience import budget, outlier

__all__ = [
    "GRPC_NAMES",
    "MAX_REDISPATCH",
    "FaultPolicy",
    "RetryPolicy",
    "grpc_for_http",
    "http_for_grpc",
    "outcome",
]

#: Re-sends of a request no upstream saw (connect failure, REFUSED_STREAM, GOAWAY).
MAX_REDISPATCH = 3

#: gRPC status names of retry_on.
GRPC_NAMES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}

# gRPC's mapping of an HTTP status to a grpc-status (doc/http-grpc-status-mapping.md).
_GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
# And back, as Envoy maps a grpc-status to an HTTP status (Grpc::Utility::grpcToHttpStatus).
_HTTP_FOR_GRPC = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401)

_NS = 1_000_000_000


def grpc_for_http(status: int) -> int:
    """The grpc-status a gRPC client reads from an HTTP ``status`` (UNKNOWN for the rest)."""
    return _GRPC_FOR_HTTP.get(status, 2)


def http_for_grpc(grpc_status: int) -> int:
    """The HTTP status Envoy gives a ``grpc_status`` (500 for unknown values)."""
    return _HTTP_FOR_GRPC[grpc_status] if 0 <= grpc_status < len(_HTTP_FOR_GRPC) else 500


def outcome(status: int, grpc_status: int) -> int:
    """An attempt's result for outlier detection, from its HTTP status and grpc-status (-1 none).

    As Envoy: a grpc-status counts as the HTTP status it maps to, so
    UNAVAILABLE (503) and DEADLINE_EXCEEDED (504) are gateway errors and
    INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS 5xx.
    """
    if grpc_status > 0:
        status = http_for_grpc(grpc_status)
    if status < 500:
        return outlier.SUCCESS
    if 502 <= status <= 504:
        return outlier.GATEWAY_ERROR
    return outlier.ERROR_5XX


class RetryPolicy:
    """One route's retries: ``num_retries``, ``per_try_ns`` (0: none), the backoff, the conditions
    (``retry_on``, a compiled ``RetryOn`` once ``bind`` gave it the hook) and the route's own
    budget (``budget_args`` for ``new_budget`` and the ``budget`` made from them, or None to use
    the destination cluster's)."""

    __slots__ = (
        "backoff_base_ns",
        "backoff_max_ns",
        "budget",
        "budget_args",
        "conditions",
        "num_retries",
        "per_try_ns",
        "retry_on",
    )

    def __init__(self, msg: Any) -> None:
        self.num_retries = msg.num_retries
        self.per_try_ns = field_ns(msg, "per_try_timeout", 0)
        self.backoff_base_ns = field_ns(msg, "base_interval", 25_000_000)
        self.backoff_max_ns = field_ns(msg, "max_interval", 10 * self.backoff_base_ns)
        on_5xx = on_gateway = on_reset = False
        statuses: set[int] = set()
        grpc: set[int] = set()
        for cond in msg.retry_on:
            if cond == "5xx":
                on_5xx = on_reset = True
            elif cond == "gateway-error":
                on_gateway = True
            elif cond == "reset":
                on_reset = True
            elif cond == "retriable-4xx":
                statuses.add(409)
            elif cond in GRPC_NAMES:
                grpc.add(GRPC_NAMES[cond])
            elif cond.isdigit():
                statuses.add(int(cond))
            # connect-failure, refused-stream, retriable-status-codes: see the module docstring.
        self.conditions = {
            "on_5xx": on_5xx,
            "on_gateway": on_gateway,
            "on_reset": on_reset,
            "statuses": tuple(sorted(statuses)),
            "grpc_statuses": tuple(sorted(grpc)),
        }
        self.retry_on: Any = None
        self.budget_args = budget_args(msg.budget) if msg.HasField("budget") else None
        self.budget: Any = None  # the route's own RetryBudget, set by the worker's runtime

    def bind(self, hook: Callable[[Any, Any, int], bool], timeouts: Any = None) -> None:
        """Build the compiled conditions with the worker's decision ``hook`` and, for a per-try
        timeout, the worker's ``h2.TryTimeouts`` the core arms each attempt in."""
        if self.per_try_ns and timeouts is None:
            raise ValueError("a per-try timeout needs the worker's TryTimeouts")
        self.retry_on = h2.RetryOn(
            hook, per_try_ns=self.per_try_ns, timeouts=timeouts if self.per_try_ns else None, **self.conditions
        )

    def backoff_ns(self, retry: int, draw: float) -> int:
        """The wait before retry number ``retry`` (1-based): full jitter, ``draw`` in [0, 1)."""
        cap = min(self.backoff_base_ns << min(retry - 1, 30), self.backoff_max_ns)
        return int(cap * draw)


#: Linkerd's defaults: (ttl_ns, min_retries_per_second, retry_ratio).
DEFAULT_BUDGET = (10 * _NS, 10, 0.2)


def budget_args(msg: Any) -> tuple[int, int, float]:
    """``meshproxy.v1.RetryBudget`` -> (ttl_ns, min_per_second, retry_ratio), unset fields at Linkerd's defaults."""
    ttl = field_ns(msg, "ttl", DEFAULT_BUDGET[0])
    per_second = msg.min_retries_per_second if msg.HasField("min_retries_per_second") else DEFAULT_BUDGET[1]
    return ttl, per_second, msg.retry_ratio or DEFAULT_BUDGET[2]


def new_budget(args: tuple[int, int, float], now_ns: int) -> Any:
    ttl_ns, per_second, ratio = args
    return budget.RetryBudget(ttl_ns, per_second, ratio, now_ns)


class FaultPolicy:
    """A route's fault injection: ``delay_ns`` on ``delay_pct``% of requests, then an abort on
    ``abort_pct``% with ``abort_http`` or ``abort_grpc`` (the other None)."""

    __slots__ = ("abort_grpc", "abort_http", "abort_pct", "delay_ns", "delay_pct")

    def __init__(self, msg: Any) -> None:
        self.delay_ns = 0
        self.delay_pct = 0.0
        if msg.HasField("delay"):
            d = msg.delay
            self.delay_ns = field_ns(d, "fixed_delay", 0)
            self.delay_pct = d.percentage if d.HasField("percentage") else 100.0
        self.abort_pct = 0.0
        self.abort_http: int | None = None
        self.abort_grpc: int | None = None
        if msg.HasField("abort"):
            a = msg.abort
            self.abort_pct = a.percentage if a.HasField("percentage") else 100.0
            if a.WhichOneof("error") == "grpc_status":
                self.abort_grpc = a.grpc_status
            else:
                self.abort_http = a.http_status
