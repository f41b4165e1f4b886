"""Outlier detection, pure-Python twin of ``meshproxy/_fast/outlier.pyx``.

Owns the decision to eject an endpoint after consecutive failures, and when
it returns: Envoy's consecutive-failure outlier detection (consecutive 5xx,
consecutive gateway errors, consecutive local-origin failures; no
success-rate or failure-percentage ejection). Endpoints are the indices
``0..n-1`` of the balancer they sit beside; ``resize`` follows an endpoint
change. Sans-IO and clock-free: callers pass ``now_ns`` (a monotonic clock in
integer nanoseconds) and apply the verdicts themselves, ``set_available(i,
False)`` on the balancer when ``record`` returns True and
``set_available(i, True)`` for each endpoint ``sweep`` returns.

The rules, as Envoy's (``outlier_detection_impl.cc`` and its docs):

* Callers classify each result: ``SUCCESS``; ``ERROR_5XX`` (an HTTP 5xx
  other than 502/503/504, gRPC INTERNAL, UNKNOWN, DATA_LOSS...);
  ``GATEWAY_ERROR`` (HTTP 502/503/504, gRPC UNAVAILABLE), which counts
  towards both ``consecutive_5xx`` and ``consecutive_gateway_errors``; and
  ``LOCAL_ORIGIN_FAILURE`` (connect failure, reset before a response,
  timeout). A non-gateway 5xx breaks a run of gateway errors; a success
  breaks every run.
* ``split_external_local_origin_errors`` is Envoy's (and Istio's) switch,
  off by default as there: local-origin failures then count as gateway
  errors (Envoy maps a connect failure or reset to 503 and a timeout to
  504) and ``consecutive_local_origin_failures`` is unused. Switched on,
  they count only towards ``consecutive_local_origin_failures`` and leave
  the 5xx runs alone, and any response from the endpoint (even a 5xx)
  breaks a run of local-origin failures, since the connection worked.
* A threshold of 0 turns that detector off.
* A run that reaches its threshold is reset and tries one ejection (two
  runs reaching theirs on the same result try one ejection). The ejection
  is refused, and counted in ``ejections_overflow``, when it would bring
  the ejected share above ``max_ejection_percent``: ``100 * (ejected + 1) >
  max_ejection_percent * n``. That is Envoy since 1.27 (envoyproxy/envoy
  #27909): the share after the ejection is checked, and there is no longer
  an exception for the first host, so 10% of 3 endpoints ejects none;
  ``always_eject_one_host`` is Envoy's (1.31) opt-in to always allow an
  ejection while none is ejected.
* An ejection lasts ``base_ejection_time_ns x multiplier``, at most
  ``max_ejection_time_ns``. Each ejection raises the multiplier by one
  (not past the point where the product reaches the cap), and each full
  ``interval_ns`` the endpoint stays healthy after an ejection ends lowers
  it by one. Envoy lowers it at each interval tick; here it is computed
  from the time the ejection ended, so the result does not depend on how
  often ``sweep`` is called.
* An ejection ends at exactly ``ejected at + duration``; the endpoint stays
  ejected (``is_ejected``, counted by ``ejected()`` and by the percentage)
  until a ``sweep`` at or after that time returns it. Results recorded for
  an ejected endpoint (requests sent before the ejection) are ignored, and
  it comes back with every run at zero.
* A clock that goes backwards counts as no time passing: nothing ends
  early, no multiplier decays.

Bad arguments raise ``ValueError`` with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ERROR_5XX",
    "GATEWAY_ERROR",
    "LOCAL_ORIGIN_FAILURE",
    "SUCCESS",
    "OutlierDetector",
]

SUCCESS = 0
ERROR_5XX = 1
GATEWAY_ERROR = 2
LOCAL_ORIGIN_FAILURE = 3

# Far above any sane mesh, as the balancers' limit.
_MAX_ENDPOINTS = 1 << 24
# Envoy's thresholds are UInt32Value.
_MAX_THRESHOLD = 0xFFFFFFFF
# Keeps now_ns + duration, and base x multiplier, inside int64 for the compiled twin.
_MAX_TIME_NS = 1 << 62
_INT64_MAX = (1 << 63) - 1


def _check_config(
    n: int,
    consecutive_5xx: int,
    consecutive_gateway_errors: int,
    consecutive_local_origin_failures: int,
    base_ejection_time_ns: int,
    max_ejection_time_ns: int,
    max_ejection_percent: int,
    interval_ns: int,
) -> None:
    if not 0 <= n <= _MAX_ENDPOINTS:
        raise ValueError(f"n must be between 0 and {_MAX_ENDPOINTS}, got {n}")
    for name, value in (
        ("consecutive_5xx", consecutive_5xx),
        ("consecutive_gateway_errors", consecutive_gateway_errors),
        ("consecutive_local_origin_failures", consecutive_local_origin_failures),
    ):
        if not 0 <= value <= _MAX_THRESHOLD:
            raise ValueError(f"{name} must be between 0 and {_MAX_THRESHOLD}, got {value}")
    for name, value in (
        ("base_ejection_time_ns", base_ejection_time_ns),
        ("max_ejection_time_ns", max_ejection_time_ns),
        ("interval_ns", interval_ns),
    ):
        if not 0 < value <= _MAX_TIME_NS:
            raise ValueError(f"{name} must be between 1 and {_MAX_TIME_NS}, got {value}")
    if max_ejection_time_ns < base_ejection_time_ns:
        raise ValueError(
            f"max_ejection_time_ns ({max_ejection_time_ns}) is below base_ejection_time_ns ({base_ejection_time_ns})"
        )
    if not 0 <= max_ejection_percent <= 100:
        raise ValueError(f"max_ejection_percent must be between 0 and 100, got {max_ejection_percent}")


def _check_mapping(mapping: Sequence[int], old_n: int) -> list[int]:
    """``mapping`` as a list, checked: each entry an old index or -1, no old index twice."""
    m = list(mapping)
    if len(m) > _MAX_ENDPOINTS:
        raise ValueError(f"mapping has {len(m)} endpoints, more than {_MAX_ENDPOINTS}")
    seen = set()
    for new_i, old_i in enumerate(m):
        if not isinstance(old_i, int) or isinstance(old_i, bool):
            raise ValueError(f"mapping[{new_i}] must be an int, got {old_i!r}")
        if old_i == -1:
            continue
        if not 0 <= old_i < old_n:
            raise ValueError(f"mapping[{new_i}] = {old_i} is not -1 or an endpoint of {old_n}")
        if old_i in seen:
            raise ValueError(f"mapping[{new_i}] = {old_i} maps endpoint {old_i} twice")
        seen.add(old_i)
    return m


class OutlierDetector:
    """Consecutive-failure outlier detection over ``n`` endpoints (see the module docstring)."""

    __slots__ = (
        "_always_one",
        "_base",
        "_c5xx",
        "_cgw",
        "_clocal",
        "_ejected",
        "_interval",
        "_max_mult",
        "_max_pct",
        "_max_time",
        "_mult",
        "_n",
        "_nejected",
        "_overflow",
        "_split",
        "_t5xx",
        "_tgw",
        "_times",
        "_tlocal",
        "_total",
        "_until",
    )

    def __init__(
        self,
        n: int,
        *,
        consecutive_5xx: int = 5,
        consecutive_gateway_errors: int = 0,
        consecutive_local_origin_failures: int = 5,
        split_external_local_origin_errors: bool = False,
        base_ejection_time_ns: int = 30_000_000_000,
        max_ejection_time_ns: int = 300_000_000_000,
        max_ejection_percent: int = 10,
        always_eject_one_host: bool = False,
        interval_ns: int = 10_000_000_000,
    ) -> None:
        _check_config(
            n,
            consecutive_5xx,
            consecutive_gateway_errors,
            consecutive_local_origin_failures,
            base_ejection_time_ns,
            max_ejection_time_ns,
            max_ejection_percent,
            interval_ns,
        )
        self._t5xx = consecutive_5xx
        self._tgw = consecutive_gateway_errors
        self._tlocal = consecutive_local_origin_failures
        self._split = bool(split_external_local_origin_errors)
        self._base = base_ejection_time_ns
        self._max_time = max_ejection_time_ns
        # The smallest multiplier whose duration reaches the cap: past it the
        # duration would not grow, only the time needed to decay back.
        self._max_mult = -(-max_ejection_time_ns // base_ejection_time_ns)
        self._max_pct = max_ejection_percent
        self._always_one = bool(always_eject_one_host)
        self._interval = interval_ns
        self._total = 0
        self._overflow = 0
        self._alloc(n)

    def _alloc(self, n: int) -> None:
        self._n = n
        self._nejected = 0
        self._c5xx = [0] * n
        self._cgw = [0] * n
        self._clocal = [0] * n
        self._ejected = [False] * n
        self._mult = [0] * n
        self._times = [0] * n
        # While ejected: when the ejection ends. Otherwise: when the last one
        # ended, from which the multiplier decays.
        self._until = [0] * n

    def __len__(self) -> int:
        return self._n

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self._n:
            raise ValueError(f"endpoint {i} out of range for {self._n} endpoints")

    def record(self, i: int, outcome: int, now_ns: int) -> bool:
        """Record one result of endpoint ``i``; True when it ejected ``i`` (take it out of picks)."""
        self._check_index(i)
        if outcome == SUCCESS:
            self._c5xx[i] = self._cgw[i] = self._clocal[i] = 0
            return False
        if not ERROR_5XX <= outcome <= LOCAL_ORIGIN_FAILURE:
            raise ValueError(f"unknown outcome {outcome}")
        if self._ejected[i]:
            return False
        tripped = False
        if outcome == LOCAL_ORIGIN_FAILURE and self._split:
            if self._tlocal:
                self._clocal[i] += 1
                if self._clocal[i] >= self._tlocal:
                    self._clocal[i] = 0
                    tripped = True
            return tripped and self._eject(i, now_ns)
        if self._split:
            self._clocal[i] = 0
        if outcome == ERROR_5XX:
            self._cgw[i] = 0
        elif self._tgw:
            self._cgw[i] += 1
            if self._cgw[i] >= self._tgw:
                self._cgw[i] = 0
                tripped = True
        if self._t5xx:
            self._c5xx[i] += 1
            if self._c5xx[i] >= self._t5xx:
                self._c5xx[i] = 0
                tripped = True
        return tripped and self._eject(i, now_ns)

    def _eject(self, i: int, now_ns: int) -> bool:
        nej = self._nejected
        if 100 * (nej + 1) > self._max_pct * self._n and not (self._always_one and nej == 0):
            self._overflow += 1
            return False
        mult = self._mult[i]
        healthy = now_ns - self._until[i]
        if mult and healthy > 0:
            mult = max(0, mult - healthy // self._interval)
        mult = min(mult + 1, self._max_mult)
        self._mult[i] = mult
        self._until[i] = min(now_ns + min(self._base * mult, self._max_time), _INT64_MAX)
        self._ejected[i] = True
        self._c5xx[i] = self._cgw[i] = self._clocal[i] = 0
        self._times[i] += 1
        self._total += 1
        self._nejected = nej + 1
        return True

    def sweep(self, now_ns: int) -> list[int]:
        """The endpoints whose ejection has ended by ``now_ns``, in index order (make them available again)."""
        back: list[int] = []
        if self._nejected:
            ejected, until = self._ejected, self._until
            for i in range(self._n):
                if ejected[i] and until[i] <= now_ns:
                    ejected[i] = False
                    back.append(i)
            self._nejected -= len(back)
        return back

    def is_ejected(self, i: int) -> bool:
        """Whether endpoint ``i`` is ejected (until a sweep returns it)."""
        self._check_index(i)
        return self._ejected[i]

    def ejected(self) -> int:
        """How many endpoints are ejected."""
        return self._nejected

    def times_ejected(self, i: int) -> int:
        """How many times endpoint ``i`` has been ejected."""
        self._check_index(i)
        return self._times[i]

    def ejected_until(self, i: int) -> int:
        """When endpoint ``i``'s ejection ends (monotonic ns), or 0 when it is not ejected."""
        self._check_index(i)
        return self._until[i] if self._ejected[i] else 0

    @property
    def ejections_total(self) -> int:
        """Ejections made (Envoy's ``ejections_enforced_total``)."""
        return self._total

    @property
    def ejections_overflow(self) -> int:
        """Ejections refused by ``max_ejection_percent`` (Envoy's ``ejections_overflow``)."""
        return self._overflow

    def resize(self, mapping: Sequence[int]) -> None:
        """Follow an endpoint change: new endpoint ``j`` is old endpoint ``mapping[j]``, or new if -1.

        Endpoints that remain keep their runs, ejection, multiplier and
        count; new ones start clean; dropped ones are forgotten (sweep never
        returns them). The totals are kept.
        """
        m = _check_mapping(mapping, self._n)
        old = (self._c5xx, self._cgw, self._clocal, self._ejected, self._mult, self._times, self._until)
        self._alloc(len(m))
        new = (self._c5xx, self._cgw, self._clocal, self._ejected, self._mult, self._times, self._until)
        for j, i in enumerate(m):
            if i >= 0:
                for src, dst in zip(old, new, strict=True):
                    dst[j] = src[i]
        self._nejected = sum(self._ejected)
