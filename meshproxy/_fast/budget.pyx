# cython: language_level=3
"""Linkerd's retry budget, compiled twin of ``meshproxy/resilience/budget_py.py``.

Owns one decision: may this retry go out? Retries stay under
``retry_ratio`` times the requests of the last ``ttl`` plus a reserve of
``min_per_second x ttl``, counted in integer tokens over a ring of ten
slots; the twin's docstring gives the arithmetic. Same names, behaviour,
errors and counts as the pure-Python twin (the constructor's checks and
rounding are the twin's own function), and the tests replay random walks
on both.

``deposit`` runs once per request, so the whole state is C fields and a
call allocates nothing; compiled callers use ``deposit_c`` and
``withdraw_c`` from the ``.pxd``.
"""

cimport cython
from libc.stdint cimport INT64_MAX, int64_t

from meshproxy.resilience.budget_py import _settings

__all__ = ["SLOTS", "TOKENS_PER_RETRY", "RetryBudget"]

SLOTS = N_SLOTS
TOKENS_PER_RETRY = RETRY_TOKENS


@cython.final
cdef class RetryBudget:
    """Retries allowed: ``retry_ratio`` per request over the last ``ttl_ns``, plus ``min_per_second`` x ttl."""

    def __init__(self, ttl_ns=10_000_000_000, min_per_second=10, retry_ratio=0.2, now_ns=0):
        cdef Py_ssize_t k
        (
            self._ttl_ns,
            self._min_per_second,
            self._retry_ratio,
            self._origin_ns,
            self._deposit_tokens,
            self._reserve_tokens,
        ) = _settings(ttl_ns, min_per_second, retry_ratio, now_ns)
        self._slot_ns = self._ttl_ns // N_SLOTS
        self._slot = 0
        self._idx = 0
        # The origin is at most INT64_MAX: the first slot's end saturates too.
        self._slot_end_ns = (
            INT64_MAX if self._origin_ns > INT64_MAX - self._slot_ns else self._origin_ns + self._slot_ns
        )
        for k in range(N_SLOTS):
            self._ring[k] = 0
        self._sum = 0
        self._deposits = 0
        self._withdrawals = 0
        self._denied = 0

    cdef void _advance(self, int64_t now_ns) noexcept:
        # Only called once now_ns has reached the current slot's end, so
        # now_ns > origin >= 0 and nothing below overflows.
        cdef int64_t slot = (now_ns - self._origin_ns) // self._slot_ns
        cdef int64_t start = self._origin_ns + slot * self._slot_ns
        cdef int64_t n = slot - self._slot
        cdef Py_ssize_t i = self._idx
        if n > N_SLOTS:
            n = N_SLOTS
        while n > 0:
            i = i + 1 if i + 1 < N_SLOTS else 0
            self._sum -= self._ring[i]
            self._ring[i] = 0
            n -= 1
        self._slot = slot
        self._idx = <Py_ssize_t>(slot % N_SLOTS)
        # The last slot before INT64_MAX never ends: its end saturates,
        # and every later call recomputes the same slot (the twin agrees).
        self._slot_end_ns = INT64_MAX if start > INT64_MAX - self._slot_ns else start + self._slot_ns

    def deposit(self, int64_t now_ns):
        """An original request (not a retry) was sent at ``now_ns``: it earns ``retry_ratio`` retries for ttl."""
        self.deposit_c(now_ns)

    def withdraw(self, int64_t now_ns):
        """May a retry go out at ``now_ns``? If so (True) it is counted against the budget; if not, as denied."""
        return self.withdraw_c(now_ns)

    def balance(self, int64_t now_ns):
        """Tokens left at ``now_ns``, maybe negative: ``balance // TOKENS_PER_RETRY`` more retries are allowed."""
        if now_ns >= self._slot_end_ns:
            self._advance(now_ns)
        return self._reserve_tokens + self._sum

    @property
    def ttl_ns(self):
        """How long a request or retry counts, in ns."""
        return self._ttl_ns

    @property
    def min_per_second(self):
        """Retries per second of ttl always allowed (the reserve), even without requests."""
        return self._min_per_second

    @property
    def retry_ratio(self):
        """Retries each request earns (as configured; applied to three decimals)."""
        return self._retry_ratio

    @property
    def deposits(self):
        """Requests deposited, lifetime total."""
        return self._deposits

    @property
    def withdrawals(self):
        """Retries allowed, lifetime total."""
        return self._withdrawals

    @property
    def denied(self):
        """Retries refused, lifetime total."""
        return self._denied
