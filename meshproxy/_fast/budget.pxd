# The shape of the compiled retry budget: its whole state in C fields (the
# ring is a fixed array), and C-level deposit/withdraw, so that the compiled
# connection can cimport them and account for a request without touching
# Python objects.

from libc.stdint cimport int64_t

cdef enum:
    N_SLOTS = 10
    RETRY_TOKENS = 1000


cdef class RetryBudget:
    cdef int64_t _ttl_ns
    cdef int64_t _min_per_second
    cdef double _retry_ratio
    cdef int64_t _deposit_tokens    # earned per request: round(ratio * RETRY_TOKENS)
    cdef int64_t _reserve_tokens
    cdef int64_t _origin_ns         # slot 0 starts here
    cdef int64_t _slot_ns
    cdef int64_t _slot              # slots since the origin
    cdef int64_t _slot_end_ns       # the current slot's end (saturated at INT64_MAX)
    cdef Py_ssize_t _idx            # _slot % N_SLOTS: the current slot in the ring
    cdef int64_t _ring[N_SLOTS]     # tokens in minus tokens out, per slot
    cdef int64_t _sum               # of the ring
    cdef int64_t _deposits
    cdef int64_t _withdrawals
    cdef int64_t _denied

    cdef void _advance(self, int64_t now_ns) noexcept

    cdef inline void deposit_c(self, int64_t now_ns) noexcept:
        if now_ns >= self._slot_end_ns:
            self._advance(now_ns)
        self._ring[self._idx] += self._deposit_tokens
        self._sum += self._deposit_tokens
        self._deposits += 1

    cdef inline bint withdraw_c(self, int64_t now_ns) noexcept:
        if now_ns >= self._slot_end_ns:
            self._advance(now_ns)
        if self._reserve_tokens + self._sum < RETRY_TOKENS:
            self._denied += 1
            return False
        self._ring[self._idx] -= RETRY_TOKENS
        self._sum -= RETRY_TOKENS
        self._withdrawals += 1
        return True
