# The shape of the compiled balancers: the generator and hashes as inline C,
# and each balancer's state and C-level pick, so that the compiled
# connection can cimport them and pick without touching Python objects.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef enum:
    MAX_ENDPOINTS = 1 << 24
    MAX_RING_POINTS = 1 << 24

cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    # splitmix64's finalizer: every input bit affects every output bit.
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t hash_bytes(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # FNV-1a 64, then the finalizer (short keys differing in one byte would
    # otherwise land next to each other on the ring).
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ p[k]) * 0x100000001B3ULL
    return mix64(h)


cdef class _Pool:
    cdef Py_ssize_t _n
    cdef Py_ssize_t _navail
    cdef Py_ssize_t* _avail     # available endpoints first, in [0, _navail)
    cdef Py_ssize_t* _pos       # _pos[i]: where endpoint i is in _avail
    cdef uint64_t _state        # splitmix64 counter

    cdef int _init_pool(self, Py_ssize_t n, object seed) except -1
    cdef int _check_index(self, Py_ssize_t i) except -1
    cdef void _set(self, Py_ssize_t i, bint available) noexcept
    cdef void _swap(self, Py_ssize_t a, Py_ssize_t b) noexcept

    cdef inline uint64_t _next(self) noexcept:
        self._state += 0x9E3779B97F4A7C15ULL  # the golden-ratio step of splitmix64
        return mix64(self._state)

    cdef inline Py_ssize_t _below(self, Py_ssize_t m) noexcept:
        return <Py_ssize_t>(((self._next() >> 32) * <uint64_t>m) >> 32)

    cdef inline void _two(self, Py_ssize_t* a, Py_ssize_t* b) noexcept:
        # Two distinct available endpoints (the caller ensures >= 2).
        cdef Py_ssize_t k = self._navail
        cdef Py_ssize_t i = self._below(k)
        cdef Py_ssize_t j = self._below(k - 1)
        if j >= i:
            j += 1
        a[0] = self._avail[i]
        b[0] = self._avail[j]


cdef class RoundRobin(_Pool):
    cdef Py_ssize_t _next_i
    cdef Py_ssize_t pick_c(self) noexcept


cdef class Random(_Pool):
    cdef Py_ssize_t pick_c(self) noexcept


cdef class LeastRequest(_Pool):
    cdef int64_t* _outstanding
    cdef Py_ssize_t pick_c(self) noexcept


cdef class PeakEwma(_Pool):
    cdef double _decay_ns
    cdef double _default_rtt
    cdef double* _estimate
    cdef int64_t* _stamp
    cdef bint* _sampled
    cdef int64_t* _outstanding
    cdef double _rtt(self, Py_ssize_t i, int64_t now_ns) noexcept
    cdef Py_ssize_t pick_c(self, int64_t now_ns) noexcept
    cdef void finish_c(self, Py_ssize_t i, int64_t rtt_ns, int64_t now_ns) noexcept


cdef struct RingPoint:
    uint64_t hash
    Py_ssize_t owner


cdef class RingHash(_Pool):
    cdef RingPoint* _points
    cdef Py_ssize_t _npoints
    cdef uint32_t* _counts
    cdef Py_ssize_t pick_hash(self, uint64_t h) noexcept


cdef class WeightedSplit(_Pool):
    cdef int64_t* _weights
    cdef int64_t* _credit
    cdef Py_ssize_t pick_c(self) noexcept
