# cython: language_level=3
"""Endpoint balancers, compiled twin of ``meshproxy/lb/balancer_py.py``.

Owns the choice of one endpoint among ``n`` for one request: round robin,
uniform random, least request and peak-EWMA (both power of two choices),
a consistent-hash ring, and smooth weighted round robin for subset splits.
Same names, behaviour, errors and (for the same seed) picks as the
pure-Python twin; the tests run on both and compare their pick sequences.

State lives in C arrays owned by each balancer, so a pick allocates no
Python object (beyond the returned int when called from Python; compiled
callers use the ``pick_c`` methods declared in the ``.pxd``).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport exp
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport qsort

import os

from meshproxy.lb.balancer_py import _check_weights

__all__ = ["LeastRequest", "PeakEwma", "Random", "RingHash", "RoundRobin", "WeightedSplit", "hash_key"]


cdef void* _alloc(Py_ssize_t count, size_t size) except NULL:
    cdef void* p = PyMem_Malloc(<size_t>(count if count > 0 else 1) * size)
    if p == NULL:
        raise MemoryError()
    return p


def hash_key(bytes key not None):
    """The 64-bit ring position of ``key``: FNV-1a, then splitmix64's finalizer."""
    return hash_bytes(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


cdef inline uint64_t _point_hash(Py_ssize_t endpoint, Py_ssize_t replica) noexcept:
    # Depends only on (endpoint, replica), never on n: adding an endpoint
    # leaves every existing point where it was.
    return mix64((((<uint64_t>endpoint) << 32) | <uint64_t>replica) + 0x9E3779B97F4A7C15ULL)


cdef int _cmp_points(const void* a, const void* b) noexcept nogil:
    # (hash, owner) order, as Python sorts the twin's tuples.
    cdef const RingPoint* pa = <const RingPoint*>a
    cdef const RingPoint* pb = <const RingPoint*>b
    if pa.hash != pb.hash:
        return -1 if pa.hash < pb.hash else 1
    if pa.owner != pb.owner:
        return -1 if pa.owner < pb.owner else 1
    return 0


cdef class _Pool:
    """The endpoints, which are up, and the random generator (see the twin)."""

    def __dealloc__(self):
        PyMem_Free(self._avail)
        PyMem_Free(self._pos)

    cdef int _init_pool(self, Py_ssize_t n, object seed) except -1:
        cdef Py_ssize_t i
        if not 1 <= n <= MAX_ENDPOINTS:
            raise ValueError(f"n must be between 1 and {MAX_ENDPOINTS}, got {n}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        elif seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if self._avail != NULL:
            raise TypeError(f"{type(self).__name__} is already initialised")
        self._avail = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        self._pos = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        for i in range(n):
            self._avail[i] = i
            self._pos[i] = i
        self._n = n
        self._navail = n
        self._state = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)
        return 0

    def __len__(self):
        return self._n

    @property
    def available(self):
        """How many endpoints are available."""
        return self._navail

    cdef int _check_index(self, Py_ssize_t i) except -1:
        if not 0 <= i < self._n:
            raise ValueError(f"endpoint {i} out of range for {self._n} endpoints")
        return 0

    def is_available(self, Py_ssize_t i):
        """Whether endpoint ``i`` may be picked."""
        self._check_index(i)
        return self._pos[i] < self._navail

    def set_available(self, Py_ssize_t i, bint available):
        """Mark endpoint ``i`` up (picked again) or down (ejected, never picked)."""
        self._check_index(i)
        self._set(i, available)

    cdef void _set(self, Py_ssize_t i, bint available) noexcept:
        cdef Py_ssize_t p = self._pos[i]
        if available:
            if p >= self._navail:
                self._swap(p, self._navail)
                self._navail += 1
        elif p < self._navail:
            self._navail -= 1
            self._swap(p, self._navail)

    cdef void _swap(self, Py_ssize_t a, Py_ssize_t b) noexcept:
        cdef Py_ssize_t ia = self._avail[a]
        cdef Py_ssize_t ib = self._avail[b]
        self._avail[a] = ib
        self._avail[b] = ia
        self._pos[ib] = a
        self._pos[ia] = b


@cython.final
cdef class RoundRobin(_Pool):
    """Each available endpoint in turn, from a seeded starting point."""

    def __init__(self, Py_ssize_t n, seed=None):
        self._init_pool(n, seed)
        # A random start, so sidecars that all restart at once do not all
        # send their first request to endpoint 0.
        self._next_i = self._below(n)

    cdef Py_ssize_t pick_c(self) noexcept:
        cdef Py_ssize_t i = self._next_i
        if self._navail == 0:
            return -1
        while self._pos[i] >= self._navail:
            i = i + 1 if i + 1 < self._n else 0
        self._next_i = i + 1 if i + 1 < self._n else 0
        return i

    def pick(self):
        """The next available endpoint after the previous pick, or -1 if none is."""
        return self.pick_c()


@cython.final
cdef class Random(_Pool):
    """A uniformly random available endpoint."""

    def __init__(self, Py_ssize_t n, seed=None):
        self._init_pool(n, seed)

    cdef Py_ssize_t pick_c(self) noexcept:
        if self._navail == 0:
            return -1
        return self._avail[self._below(self._navail)]

    def pick(self):
        """A random available endpoint, or -1 if none is."""
        return self.pick_c()


@cython.final
cdef class LeastRequest(_Pool):
    """Power of two choices on outstanding requests (see the twin)."""

    def __init__(self, Py_ssize_t n, seed=None):
        cdef Py_ssize_t i
        self._init_pool(n, seed)
        self._outstanding = <int64_t*>_alloc(n, sizeof(int64_t))
        for i in range(n):
            self._outstanding[i] = 0

    def __dealloc__(self):
        PyMem_Free(self._outstanding)

    cdef Py_ssize_t pick_c(self) noexcept:
        cdef Py_ssize_t k = self._navail
        cdef Py_ssize_t a, b
        if k < 2:
            return self._avail[0] if k else -1
        self._two(&a, &b)
        return b if self._outstanding[b] < self._outstanding[a] else a

    def pick(self):
        """The less loaded of two random available endpoints, or -1 if none is."""
        return self.pick_c()

    def start(self, Py_ssize_t i):
        """A request was sent to endpoint ``i``."""
        self._check_index(i)
        self._outstanding[i] += 1

    def finish(self, Py_ssize_t i):
        """A request to endpoint ``i`` completed (in any way)."""
        self._check_index(i)
        if self._outstanding[i] == 0:
            raise ValueError(f"finish({i}) without a matching start({i})")
        self._outstanding[i] -= 1

    def outstanding(self, Py_ssize_t i):
        """Requests in flight to endpoint ``i``."""
        self._check_index(i)
        return self._outstanding[i]


@cython.final
cdef class PeakEwma(_Pool):
    """linkerd2-proxy's balancer: power of two choices on peak-EWMA cost (see the twin)."""

    def __init__(self, Py_ssize_t n, int64_t decay_ns=10_000_000_000, int64_t default_rtt_ns=30_000_000, seed=None):
        cdef Py_ssize_t i
        self._init_pool(n, seed)
        if decay_ns <= 0:
            raise ValueError(f"decay_ns must be > 0, got {decay_ns}")
        if default_rtt_ns < 0:
            raise ValueError(f"default_rtt_ns must be >= 0, got {default_rtt_ns}")
        self._decay_ns = <double>decay_ns
        self._default_rtt = <double>default_rtt_ns
        self._estimate = <double*>_alloc(n, sizeof(double))
        self._stamp = <int64_t*>_alloc(n, sizeof(int64_t))
        self._sampled = <bint*>_alloc(n, sizeof(bint))
        self._outstanding = <int64_t*>_alloc(n, sizeof(int64_t))
        for i in range(n):
            self._estimate[i] = self._default_rtt
            self._stamp[i] = 0
            self._sampled[i] = False
            self._outstanding[i] = 0

    def __dealloc__(self):
        PyMem_Free(self._estimate)
        PyMem_Free(self._stamp)
        PyMem_Free(self._sampled)
        PyMem_Free(self._outstanding)

    cdef double _rtt(self, Py_ssize_t i, int64_t now_ns) noexcept:
        cdef int64_t idle
        if not self._sampled[i]:
            return self._default_rtt
        idle = now_ns - self._stamp[i]
        if idle <= 0:
            return self._estimate[i]
        return self._estimate[i] * exp(-(<double>idle) / self._decay_ns)

    cdef Py_ssize_t pick_c(self, int64_t now_ns) noexcept:
        cdef Py_ssize_t k = self._navail
        cdef Py_ssize_t a, b
        if k < 2:
            return self._avail[0] if k else -1
        self._two(&a, &b)
        if self._rtt(b, now_ns) * <double>(self._outstanding[b] + 1) < (
            self._rtt(a, now_ns) * <double>(self._outstanding[a] + 1)
        ):
            return b
        return a

    def pick(self, int64_t now_ns):
        """The cheaper of two random available endpoints, or -1 if none is."""
        return self.pick_c(now_ns)

    def start(self, Py_ssize_t i):
        """A request was sent to endpoint ``i``."""
        self._check_index(i)
        self._outstanding[i] += 1

    def finish(self, Py_ssize_t i, int64_t rtt_ns, int64_t now_ns):
        """A request to endpoint ``i`` completed after ``rtt_ns``, at ``now_ns``."""
        self._check_index(i)
        if rtt_ns < 0:
            raise ValueError(f"rtt_ns must be >= 0, got {rtt_ns}")
        if self._outstanding[i] == 0:
            raise ValueError(f"finish({i}) without a matching start({i})")
        self.finish_c(i, rtt_ns, now_ns)

    cdef void finish_c(self, Py_ssize_t i, int64_t rtt_ns, int64_t now_ns) noexcept:
        cdef double rtt = <double>rtt_ns
        cdef double est = self._estimate[i]
        cdef double w
        cdef int64_t elapsed
        if self._outstanding[i] > 0:
            self._outstanding[i] -= 1
        if not self._sampled[i] or rtt > est:
            self._estimate[i] = rtt
            self._sampled[i] = True
        else:
            elapsed = now_ns - self._stamp[i]
            # A clock that went backwards counts as no time at all.
            w = exp(-(<double>elapsed) / self._decay_ns) if elapsed > 0 else 1.0
            self._estimate[i] = est * w + rtt * (1.0 - w)
        self._stamp[i] = now_ns

    def outstanding(self, Py_ssize_t i):
        """Requests in flight to endpoint ``i``."""
        self._check_index(i)
        return self._outstanding[i]

    def rtt_estimate(self, Py_ssize_t i, int64_t now_ns):
        """Endpoint ``i``'s RTT estimate in ns as a pick at ``now_ns`` sees it."""
        self._check_index(i)
        return self._rtt(i, now_ns)

    def cost(self, Py_ssize_t i, int64_t now_ns):
        """Endpoint ``i``'s cost as a pick at ``now_ns`` sees it."""
        self._check_index(i)
        return self._rtt(i, now_ns) * <double>(self._outstanding[i] + 1)


@cython.final
cdef class RingHash(_Pool):
    """Consistent hashing of a bytes key onto a ring of points (see the twin)."""

    def __init__(self, Py_ssize_t n, weights=None, Py_ssize_t ring_size=1024):
        cdef Py_ssize_t i, r, k, total
        cdef uint64_t w, wmax
        self._init_pool(n, 0)
        if weights is None:
            ws = [1] * n
        else:
            ws = _check_weights(weights, "ring")
            if len(ws) != n:
                raise ValueError(f"got {len(ws)} weights for {n} endpoints")
        if not 1 <= ring_size <= MAX_RING_POINTS:
            raise ValueError(f"ring_size must be between 1 and {MAX_RING_POINTS}, got {ring_size}")
        wmax = max(ws)
        if wmax == 0:
            raise ValueError("all ring weights are 0")
        self._counts = <uint32_t*>_alloc(n, sizeof(uint32_t))
        total = 0
        for i in range(n):
            w = ws[i]
            if w == 0:
                self._counts[i] = 0
            else:
                k = <Py_ssize_t>((<uint64_t>ring_size * w + wmax // 2) // wmax)
                self._counts[i] = k if k > 1 else 1
            total += self._counts[i]
        if total > MAX_RING_POINTS:
            raise ValueError(f"ring of {total} points exceeds {MAX_RING_POINTS}")
        self._points = <RingPoint*>_alloc(total, sizeof(RingPoint))
        k = 0
        for i in range(n):
            for r in range(self._counts[i]):
                self._points[k].hash = _point_hash(i, r)
                self._points[k].owner = i
                k += 1
        self._npoints = total
        qsort(self._points, total, sizeof(RingPoint), _cmp_points)
        # An endpoint of weight 0 has no point: it is down for good, so that
        # the "none available" check stays one comparison.
        for i in range(n):
            if self._counts[i] == 0:
                self._set(i, False)

    def __dealloc__(self):
        PyMem_Free(self._points)
        PyMem_Free(self._counts)

    @property
    def points(self):
        """How many points the ring has."""
        return self._npoints

    def set_available(self, Py_ssize_t i, bint available):
        """Mark endpoint ``i`` up or down; an endpoint of weight 0 stays down."""
        self._check_index(i)
        if available and self._counts[i] == 0:
            return
        self._set(i, available)

    cdef Py_ssize_t pick_hash(self, uint64_t h) noexcept:
        cdef Py_ssize_t lo = 0
        cdef Py_ssize_t hi = self._npoints
        cdef Py_ssize_t mid, p
        if self._navail == 0:
            return -1
        while lo < hi:  # the first point at or after h (bisect_left)
            mid = (lo + hi) >> 1
            if self._points[mid].hash < h:
                lo = mid + 1
            else:
                hi = mid
        p = lo if lo < self._npoints else 0
        while self._pos[self._points[p].owner] >= self._navail:
            p = p + 1 if p + 1 < self._npoints else 0
        return self._points[p].owner

    def pick(self, bytes key not None):
        """The endpoint owning ``key``'s place on the ring, or -1 if none is available."""
        return self.pick_hash(hash_bytes(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)))


@cython.final
cdef class WeightedSplit(_Pool):
    """Smooth weighted round robin (nginx's), for splits such as 80/20 (see the twin)."""

    def __init__(self, weights):
        cdef Py_ssize_t i, n
        ws = _check_weights(weights, "split")
        if not ws:
            raise ValueError("a split needs at least one weight")
        if not any(ws):
            raise ValueError("all split weights are 0")
        n = len(ws)
        self._init_pool(n, 0)
        self._weights = <int64_t*>_alloc(n, sizeof(int64_t))
        self._credit = <int64_t*>_alloc(n, sizeof(int64_t))
        for i in range(n):
            self._weights[i] = ws[i]
            self._credit[i] = 0

    def __dealloc__(self):
        PyMem_Free(self._weights)
        PyMem_Free(self._credit)

    cdef Py_ssize_t pick_c(self) noexcept:
        cdef int64_t total = 0
        cdef int64_t best_credit = 0
        cdef int64_t w, c
        cdef Py_ssize_t i
        cdef Py_ssize_t best = -1
        for i in range(self._n):
            w = self._weights[i]
            if w == 0 or self._pos[i] >= self._navail:
                continue
            c = self._credit[i] + w
            self._credit[i] = c
            total += w
            if best < 0 or c > best_credit:
                best = i
                best_credit = c
        if best >= 0:
            self._credit[best] -= total
        return best

    def pick(self):
        """The next endpoint of the split, or -1 if no weighted endpoint is available."""
        return self.pick_c()
