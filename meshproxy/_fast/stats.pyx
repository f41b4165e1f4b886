# cython: language_level=3
"""The request and TCP counters, compiled twin of ``meshproxy/telemetry/stats_py.py``.

Owns the numbers behind the sidecar's metrics (the twin's docstring says
which). ``RequestStats.record`` runs once per request: it reads the two
streams' C fields, packs the label set into a 64-bit key (label base,
protocol, status, grpc-status, and the response flags interned to a small
code) and finds its slot in an open-addressing hash, so a label set seen
before costs no allocation at all; only a new one (or a key that does not
pack, kept in a dict) builds Python objects. Same names, rows and row order
as the pure-Python twin, which the tests replay against this one.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from meshproxy._fast.conn cimport Stream

__all__ = ["DURATION_BOUNDS_MS", "SIZE_BOUNDS", "RequestStats", "TcpStats"]

DURATION_BOUNDS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                      300000, 600000, 1800000, 3600000)
SIZE_BOUNDS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

cdef double[19] _DURATION_BOUNDS
_DURATION_BOUNDS[:] = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                       300000, 600000, 1800000, 3600000]
cdef int64_t[8] _SIZE_BOUNDS
_SIZE_BOUNDS[:] = [1, 10, 100, 1000, 10000, 100000, 1000000, 10000000]

cdef enum:
    MAX_FLAG_CODE = 8191          # flags codes pack into 13 bits; later ones go to the overflow dict

cdef uint64_t _EMPTY = 0xFFFFFFFFFFFFFFFFULL


cdef inline uint64_t _hash(uint64_t z) noexcept:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline Py_ssize_t _duration_bucket(double ms) noexcept:
    # le semantics: the first bound >= ms (bisect_left in the twin)
    cdef Py_ssize_t i = 0
    while i < N_DURATION - 1 and ms > _DURATION_BOUNDS[i]:
        i += 1
    return i


cdef inline Py_ssize_t _size_bucket(int64_t n) noexcept:
    cdef Py_ssize_t i = 0
    while i < N_SIZE - 1 and n > _SIZE_BOUNDS[i]:
        i += 1
    return i


cdef void* _grow(void* p, Py_ssize_t* cap, Py_ssize_t need, size_t item) except NULL:
    # Room for ``need`` items (doubling); the new items are zeroed.
    cdef Py_ssize_t old = cap[0], new = old if old else 16
    cdef void* q
    if need <= old and p != NULL:
        return p
    while new < need:
        new *= 2
    q = PyMem_Realloc(p, new * item)
    if q == NULL:
        raise MemoryError()
    memset(<char*>q + old * item, 0, (new - old) * item)
    cap[0] = new
    return q


@cython.final
cdef class KeyMap:
    """uint64 key -> slot index, open addressing with linear probing, at most half full."""

    def __cinit__(self):
        self.mask = -1
        self.used = 0
        self.keys = NULL
        self.values = NULL
        self._resize(64)

    def __dealloc__(self):
        PyMem_Free(self.keys)
        PyMem_Free(self.values)

    cdef int _resize(self, Py_ssize_t cap) except -1:
        cdef uint64_t* old_keys = self.keys
        cdef Py_ssize_t* old_values = self.values
        cdef Py_ssize_t old_cap = self.mask + 1, i
        cdef uint64_t* keys = <uint64_t*>PyMem_Malloc(cap * sizeof(uint64_t))
        cdef Py_ssize_t* values = <Py_ssize_t*>PyMem_Malloc(cap * sizeof(Py_ssize_t))
        if keys == NULL or values == NULL:
            PyMem_Free(keys)
            PyMem_Free(values)
            raise MemoryError()
        for i in range(cap):
            keys[i] = _EMPTY
        self.keys = keys
        self.values = values
        self.mask = cap - 1
        self.used = 0
        for i in range(old_cap):
            if old_keys[i] != _EMPTY:
                self.put(old_keys[i], old_values[i])
        PyMem_Free(old_keys)
        PyMem_Free(old_values)
        return 0

    cdef Py_ssize_t get(self, uint64_t key) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>(_hash(key) & <uint64_t>self.mask)
        cdef uint64_t k
        while True:
            k = self.keys[i]
            if k == key:
                return self.values[i]
            if k == _EMPTY:
                return -1
            i = (i + 1) & self.mask

    cdef int put(self, uint64_t key, Py_ssize_t value) except -1:
        cdef Py_ssize_t i
        if 2 * (self.used + 1) > self.mask + 1:
            self._resize(2 * (self.mask + 1))
        i = <Py_ssize_t>(_hash(key) & <uint64_t>self.mask)
        while self.keys[i] != _EMPTY and self.keys[i] != key:
            i = (i + 1) & self.mask
        if self.keys[i] == _EMPTY:
            self.used += 1
        self.keys[i] = key
        self.values[i] = value
        return 0


@cython.final
cdef class RequestStats:
    """Request counters and histograms, by label set and by route; see the module docstring."""

    def __cinit__(self):
        self._map = KeyMap()
        self._overflow = {}
        self._keys = []
        self._slots = NULL
        self._n = self._cap = 0
        self._flag_codes = {"": 0}
        self._flag_names = [""]
        self._route_map = KeyMap()
        self._route_keys = []
        self._routes = NULL
        self._rn = self._rcap = 0

    def __dealloc__(self):
        PyMem_Free(self._slots)
        PyMem_Free(self._routes)

    def record(self, int64_t base, int64_t route, Stream down not None, Stream up, str flags, int64_t end_ns):
        """Count one finished request from its downstream stream ``down`` and last upstream stream ``up``.

        ``base``: the label set's id; ``route``: the route's id, or -1 for no per-route stats; ``flags``:
        Envoy's response flags ("" or None for none); ``end_ns``: when it ended (the core's clock).
        """
        self.record_c(base, route, down, up, flags, end_ns)

    cdef int record_c(self, int64_t base, int64_t route, Stream down, Stream up, object flags,
                      int64_t end_ns) except -1:
        return self._record(base, route, down.is_grpc, down.status, down.grpc_status, flags,
                            end_ns - down.t_open_ns, down.data_recv, down.data_sent, down.grpc_msgs_recv,
                            up.grpc_msgs_recv if up is not None else 0)

    def record_values(self, int64_t base, int64_t route, bint is_grpc, int status, int grpc_status, str flags,
                      int64_t duration_ns, int64_t req_bytes, int64_t resp_bytes, uint64_t req_msgs,
                      uint64_t resp_msgs):
        """``record`` with the numbers given: status as sent (0: none), grpc_status (-1: none)."""
        self._record(base, route, is_grpc, status, grpc_status, flags, duration_ns, req_bytes, resp_bytes,
                     req_msgs, resp_msgs)

    cdef int _record(self, int64_t base, int64_t route, bint is_grpc, int status, int grpc_status, object flags,
                     int64_t duration_ns, int64_t req_bytes, int64_t resp_bytes, uint64_t req_msgs,
                     uint64_t resp_msgs) except -1:
        cdef Py_ssize_t i = self._slot(base, is_grpc, status, grpc_status, flags), d
        cdef ReqSlot* s = &self._slots[i]
        cdef RouteSlot* r
        cdef double ms = <double>duration_ns / 1e6
        cdef bint ok
        if not ms > 0.0:
            ms = 0.0  # a clock that went backwards counts as 0, not as a negative time
        d = _duration_bucket(ms)
        if req_bytes < 0:
            req_bytes = 0
        if resp_bytes < 0:
            resp_bytes = 0
        s.count += 1
        s.dur_sum += ms
        s.dur[d] += 1
        s.req_bytes += <uint64_t>req_bytes
        s.req_size[_size_bucket(req_bytes)] += 1
        s.resp_bytes += <uint64_t>resp_bytes
        s.resp_size[_size_bucket(resp_bytes)] += 1
        s.req_msgs += req_msgs
        s.resp_msgs += resp_msgs
        if route >= 0:
            ok = grpc_status == 0 if is_grpc else (status > 0 and status < 500)
            r = &self._routes[self._route_slot(route, ok)]
            r.count += 1
            r.dur_sum += ms
            r.dur[d] += 1
        return 0

    cdef Py_ssize_t _slot(self, int64_t base, bint is_grpc, int status, int grpc_status, object flags) except -1:
        cdef Py_ssize_t code, i
        cdef uint64_t key
        if flags is None or not flags:
            code = 0
            flags = ""
        elif flags is self._last_flags:
            code = self._last_code
        else:
            c = self._flag_codes.get(flags)
            if c is None:
                code = len(self._flag_names)
                self._flag_codes[flags] = code
                self._flag_names.append(flags)
            else:
                code = <Py_ssize_t>c
            self._last_flags = flags
            self._last_code = code
        if (0 <= base <= 0x7FFFFFFF and 0 <= status <= 1023 and -1 <= grpc_status <= 254
                and code <= MAX_FLAG_CODE):
            key = ((<uint64_t>base << 32) | (<uint64_t>is_grpc << 31) | (<uint64_t>status << 21)
                   | (<uint64_t>(grpc_status + 1) << 13) | <uint64_t>code)
            i = self._map.get(key)
            if i >= 0:
                return i
            i = self._new_slot(base, is_grpc, status, grpc_status, flags)
            self._map.put(key, i)
            return i
        t = (base, is_grpc, status, grpc_status, flags)
        found = self._overflow.get(t)
        if found is not None:
            return <Py_ssize_t>found
        i = self._new_slot(base, is_grpc, status, grpc_status, flags)
        self._overflow[t] = i
        return i

    cdef Py_ssize_t _new_slot(self, int64_t base, bint is_grpc, int status, int grpc_status,
                              object flags) except -1:
        self._slots = <ReqSlot*>_grow(self._slots, &self._cap, self._n + 1, sizeof(ReqSlot))
        self._keys.append((base, is_grpc, status, grpc_status, flags))
        self._n += 1
        return self._n - 1

    cdef Py_ssize_t _route_slot(self, int64_t route, bint ok) except -1:
        cdef uint64_t key
        cdef Py_ssize_t i
        if route > 0x3FFFFFFFFFFFFFFF:
            raise OverflowError("route id too large")
        key = (<uint64_t>route << 1) | <uint64_t>ok
        i = self._route_map.get(key)
        if i >= 0:
            return i
        self._routes = <RouteSlot*>_grow(self._routes, &self._rcap, self._rn + 1, sizeof(RouteSlot))
        self._route_keys.append((route, 1 if ok else 0))
        i = self._rn
        self._rn += 1
        self._route_map.put(key, i)
        return i

    def snapshot(self):
        """Rows ``(base, is_grpc, status, grpc_status, flags, count, duration_sum_ms, duration_buckets,
        req_bytes_sum, req_size_buckets, resp_bytes_sum, resp_size_buckets, req_msgs, resp_msgs)``; buckets
        are per-bucket (not cumulative) counts, the last one +Inf."""
        cdef list rows = []
        cdef Py_ssize_t i
        cdef ReqSlot* s
        for i in range(self._n):
            s = &self._slots[i]
            rows.append((*self._keys[i], s.count, s.dur_sum, tuple([s.dur[j] for j in range(N_DURATION)]),
                         s.req_bytes, tuple([s.req_size[j] for j in range(N_SIZE)]),
                         s.resp_bytes, tuple([s.resp_size[j] for j in range(N_SIZE)]),
                         s.req_msgs, s.resp_msgs))
        return rows

    def route_snapshot(self):
        """Rows ``(route, success, count, duration_sum_ms, duration_buckets)``; success is 1 or 0."""
        cdef list rows = []
        cdef Py_ssize_t i
        cdef RouteSlot* r
        for i in range(self._rn):
            r = &self._routes[i]
            rows.append((*self._route_keys[i], r.count, r.dur_sum, tuple([r.dur[j] for j in range(N_DURATION)])))
        return rows


@cython.final
cdef class TcpStats:
    """TCP connections opened and closed and bytes carried, by destination label set ``base``."""

    def __cinit__(self):
        self._map = KeyMap()
        self._overflow = {}
        self._keys = []
        self._slots = NULL
        self._n = self._cap = 0

    def __dealloc__(self):
        PyMem_Free(self._slots)

    cdef TcpSlot* _row(self, int64_t base) except NULL:
        cdef Py_ssize_t i
        if base >= 0:
            i = self._map.get(<uint64_t>base)
        else:
            found = self._overflow.get(base)
            i = -1 if found is None else <Py_ssize_t>found
        if i < 0:
            self._slots = <TcpSlot*>_grow(self._slots, &self._cap, self._n + 1, sizeof(TcpSlot))
            i = self._n
            self._n += 1
            self._keys.append(base)
            if base >= 0:
                self._map.put(<uint64_t>base, i)
            else:
                self._overflow[base] = i
        return &self._slots[i]

    def opened(self, int64_t base):
        self._row(base).opened += 1

    def closed(self, int64_t base, int64_t sent, int64_t received):
        cdef TcpSlot* r = self._row(base)
        r.closed += 1
        r.sent += <uint64_t>(sent if sent > 0 else 0)
        r.received += <uint64_t>(received if received > 0 else 0)

    def add(self, int64_t base, int64_t sent, int64_t received):
        """Bytes carried on a connection still open (so that a long one shows up before it ends)."""
        cdef TcpSlot* r = self._row(base)
        r.sent += <uint64_t>(sent if sent > 0 else 0)
        r.received += <uint64_t>(received if received > 0 else 0)

    def snapshot(self):
        """Rows ``(base, opened, closed, sent, received)``."""
        cdef list rows = []
        cdef Py_ssize_t i
        cdef TcpSlot* r
        for i in range(self._n):
            r = &self._slots[i]
            rows.append((self._keys[i], r.opened, r.closed, r.sent, r.received))
        return rows
