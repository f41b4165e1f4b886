# cython: language_level=3
"""Outlier detection, compiled twin of ``meshproxy/resilience/outlier_py.py``.

Owns the decision to eject an endpoint after consecutive failures, and when
it returns: Envoy's consecutive 5xx, gateway-error and local-origin
detectors, the ejection time that grows with each ejection and decays while
healthy, and the max ejection percent. Same names, behaviour and errors as
the pure-Python twin, whose docstring states the rules; the tests replay
random operation sequences on both and compare every result and counter.

``record`` runs on every response, so the state is one C struct per
endpoint and a success is a bounds check and three stores: no Python object
is made (beyond the returned bool when called from Python; compiled callers
use ``record_c`` from the ``.pxd``).
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from meshproxy.resilience.outlier_py import _check_config, _check_mapping

__all__ = ["ERROR_5XX", "GATEWAY_ERROR", "LOCAL_ORIGIN_FAILURE", "SUCCESS", "OutlierDetector"]

SUCCESS = SUCCESS_C
ERROR_5XX = ERROR_5XX_C
GATEWAY_ERROR = GATEWAY_ERROR_C
LOCAL_ORIGIN_FAILURE = LOCAL_ORIGIN_FAILURE_C

cdef int64_t _INT64_MAX = 0x7FFFFFFFFFFFFFFF


cdef EndpointState* _alloc_states(Py_ssize_t n) except NULL:
    cdef size_t size = <size_t>(n if n > 0 else 1) * sizeof(EndpointState)
    cdef EndpointState* p = <EndpointState*>PyMem_Malloc(size)
    if p == NULL:
        raise MemoryError()
    memset(p, 0, size)
    return p


@cython.final
cdef class OutlierDetector:
    """Consecutive-failure outlier detection over ``n`` endpoints (see the twin)."""

    def __init__(
        self,
        n,
        *,
        consecutive_5xx=5,
        consecutive_gateway_errors=0,
        consecutive_local_origin_failures=5,
        split_external_local_origin_errors=False,
        base_ejection_time_ns=30_000_000_000,
        max_ejection_time_ns=300_000_000_000,
        max_ejection_percent=10,
        always_eject_one_host=False,
        interval_ns=10_000_000_000,
    ):
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
        if self._eps != NULL:
            raise TypeError("OutlierDetector is already initialised")
        self._t5xx = consecutive_5xx
        self._tgw = consecutive_gateway_errors
        self._tlocal = consecutive_local_origin_failures
        self._split = bool(split_external_local_origin_errors)
        self._base = base_ejection_time_ns
        self._max_time = max_ejection_time_ns
        # The smallest multiplier whose duration reaches the cap.
        self._max_mult = (self._max_time + self._base - 1) // self._base
        self._max_pct = max_ejection_percent
        self._always_one = bool(always_eject_one_host)
        self._interval = interval_ns
        self._eps = _alloc_states(n)
        self._n = n

    def __dealloc__(self):
        PyMem_Free(self._eps)

    def __len__(self):
        return self._n

    cdef int _check_index(self, Py_ssize_t i) except -1:
        if not 0 <= i < self._n:
            raise ValueError(f"endpoint {i} out of range for {self._n} endpoints")
        return 0

    def record(self, Py_ssize_t i, int outcome, int64_t now_ns):
        """Record one result of endpoint ``i``; True when it ejected ``i`` (take it out of picks)."""
        self._check_index(i)
        if not SUCCESS_C <= outcome <= LOCAL_ORIGIN_FAILURE_C:
            raise ValueError(f"unknown outcome {outcome}")
        return self.record_c(i, outcome, now_ns)

    cdef bint record_c(self, Py_ssize_t i, int outcome, int64_t now_ns) noexcept:
        cdef EndpointState* e = &self._eps[i]
        cdef bint tripped = False
        if outcome == SUCCESS_C:
            e.c5xx = 0
            e.cgw = 0
            e.clocal = 0
            return False
        if e.ejected:
            return False
        if outcome == LOCAL_ORIGIN_FAILURE_C and self._split:
            if self._tlocal:
                e.clocal += 1
                if e.clocal >= self._tlocal:
                    e.clocal = 0
                    tripped = True
            return tripped and self._eject(i, now_ns)
        if self._split:
            e.clocal = 0
        if outcome == ERROR_5XX_C:
            e.cgw = 0
        elif self._tgw:
            e.cgw += 1
            if e.cgw >= self._tgw:
                e.cgw = 0
                tripped = True
        if self._t5xx:
            e.c5xx += 1
            if e.c5xx >= self._t5xx:
                e.c5xx = 0
                tripped = True
        return tripped and self._eject(i, now_ns)

    cdef bint _eject(self, Py_ssize_t i, int64_t now_ns) noexcept:
        cdef EndpointState* e = &self._eps[i]
        cdef int64_t nej = self._nejected
        cdef int64_t mult = e.mult
        cdef uint64_t intervals
        cdef int64_t duration
        if 100 * (nej + 1) > self._max_pct * self._n and not (self._always_one and nej == 0):
            self._overflow += 1
            return False
        if mult and now_ns > e.until_ns:
            # In uint64 the difference of two int64 cannot overflow.
            intervals = (<uint64_t>now_ns - <uint64_t>e.until_ns) // <uint64_t>self._interval
            mult = 0 if intervals >= <uint64_t>mult else mult - <int64_t>intervals
        mult = mult + 1 if mult < self._max_mult else self._max_mult
        duration = self._base * mult
        if duration > self._max_time:
            duration = self._max_time
        e.mult = mult
        e.until_ns = now_ns + duration if now_ns <= _INT64_MAX - duration else _INT64_MAX
        e.ejected = True
        e.c5xx = 0
        e.cgw = 0
        e.clocal = 0
        e.times_ejected += 1
        self._total += 1
        self._nejected = nej + 1
        return True

    def sweep(self, int64_t now_ns):
        """The endpoints whose ejection has ended by ``now_ns``, in index order (make them available again)."""
        cdef list back = []
        cdef Py_ssize_t i
        cdef EndpointState* e
        if self._nejected:
            for i in range(self._n):
                e = &self._eps[i]
                if e.ejected and e.until_ns <= now_ns:
                    e.ejected = False
                    back.append(i)
            self._nejected -= len(back)
        return back

    def is_ejected(self, Py_ssize_t i):
        """Whether endpoint ``i`` is ejected (until a sweep returns it)."""
        self._check_index(i)
        return self._eps[i].ejected

    def ejected(self):
        """How many endpoints are ejected."""
        return self._nejected

    def times_ejected(self, Py_ssize_t i):
        """How many times endpoint ``i`` has been ejected."""
        self._check_index(i)
        return self._eps[i].times_ejected

    def ejected_until(self, Py_ssize_t i):
        """When endpoint ``i``'s ejection ends (monotonic ns), or 0 when it is not ejected."""
        self._check_index(i)
        return self._eps[i].until_ns if self._eps[i].ejected else 0

    @property
    def ejections_total(self):
        """Ejections made (Envoy's ``ejections_enforced_total``)."""
        return self._total

    @property
    def ejections_overflow(self):
        """Ejections refused by ``max_ejection_percent`` (Envoy's ``ejections_overflow``)."""
        return self._overflow

    def resize(self, mapping):
        """Follow an endpoint change: new endpoint ``j`` is old endpoint ``mapping[j]``, or new if -1 (see the twin)."""
        cdef list m = _check_mapping(mapping, self._n)
        cdef Py_ssize_t n = len(m)
        cdef EndpointState* eps = _alloc_states(n)
        cdef Py_ssize_t j, i
        cdef Py_ssize_t nejected = 0
        for j in range(n):
            i = m[j]
            if i >= 0:
                eps[j] = self._eps[i]
                nejected += eps[j].ejected
        PyMem_Free(self._eps)
        self._eps = eps
        self._n = n
        self._nejected = nejected
