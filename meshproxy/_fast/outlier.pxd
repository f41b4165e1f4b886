# The shape of the compiled outlier detector: one C struct per endpoint, so
# that a result touches one cache line, and a C-level record that the
# compiled connection can cimport to report every response without Python.

from libc.stdint cimport int64_t, uint32_t

cdef enum:
    SUCCESS_C = 0
    ERROR_5XX_C = 1
    GATEWAY_ERROR_C = 2
    LOCAL_ORIGIN_FAILURE_C = 3


cdef struct EndpointState:
    int64_t until_ns        # ejected: when the ejection ends; else when the last one ended
    int64_t times_ejected
    uint32_t c5xx           # the current runs
    uint32_t cgw
    uint32_t clocal
    int64_t mult            # the ejection multiplier
    bint ejected


cdef class OutlierDetector:
    cdef EndpointState* _eps
    cdef Py_ssize_t _n
    cdef Py_ssize_t _nejected
    cdef uint32_t _t5xx
    cdef uint32_t _tgw
    cdef uint32_t _tlocal
    cdef bint _split
    cdef bint _always_one
    cdef int64_t _base
    cdef int64_t _max_time
    cdef int64_t _max_mult
    cdef int64_t _max_pct
    cdef int64_t _interval
    cdef int64_t _total
    cdef int64_t _overflow

    cdef int _check_index(self, Py_ssize_t i) except -1
    # i in range and outcome one of the four: the caller checks.
    cdef bint record_c(self, Py_ssize_t i, int outcome, int64_t now_ns) noexcept
    cdef bint _eject(self, Py_ssize_t i, int64_t now_ns) noexcept
