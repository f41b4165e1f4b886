# The shape of the compiled request and TCP counters: slots of plain C
# counters in growable arrays, found through an open-addressing hash of a
# 64-bit key, so that recording a request allocates nothing once its label
# set has been seen.

from libc.stdint cimport int64_t, uint64_t

from meshproxy._fast.conn cimport Stream

cdef enum:
    N_DURATION = 20   # len(DURATION_BOUNDS_MS) + 1 (+Inf)
    N_SIZE = 9        # len(SIZE_BOUNDS) + 1 (+Inf)


ctypedef struct ReqSlot:
    uint64_t count
    double dur_sum
    uint64_t dur[N_DURATION]
    uint64_t req_bytes
    uint64_t req_size[N_SIZE]
    uint64_t resp_bytes
    uint64_t resp_size[N_SIZE]
    uint64_t req_msgs
    uint64_t resp_msgs


ctypedef struct RouteSlot:
    uint64_t count
    double dur_sum
    uint64_t dur[N_DURATION]


ctypedef struct TcpSlot:
    uint64_t opened
    uint64_t closed
    uint64_t sent
    uint64_t received


cdef class KeyMap:
    # uint64 key -> slot index; the key ~0 marks an empty cell (no packed key has its top bit set).
    cdef uint64_t* keys
    cdef Py_ssize_t* values
    cdef Py_ssize_t mask           # capacity - 1 (a power of two)
    cdef Py_ssize_t used

    cdef int _resize(self, Py_ssize_t cap) except -1
    cdef Py_ssize_t get(self, uint64_t key) noexcept
    cdef int put(self, uint64_t key, Py_ssize_t value) except -1


cdef class RequestStats:
    cdef KeyMap _map               # packed (base, is_grpc, status, grpc_status, flags code) -> slot
    cdef dict _overflow            # the same as tuples, for keys that do not pack (rare)
    cdef list _keys                # slot -> (base, is_grpc, status, grpc_status, flags)
    cdef ReqSlot* _slots
    cdef Py_ssize_t _n
    cdef Py_ssize_t _cap
    cdef dict _flag_codes          # flags string -> small code (0: none)
    cdef list _flag_names
    cdef object _last_flags        # the flags string seen last and its code: callers reuse a few strings
    cdef Py_ssize_t _last_code
    cdef KeyMap _route_map         # route << 1 | success -> route slot
    cdef list _route_keys
    cdef RouteSlot* _routes
    cdef Py_ssize_t _rn
    cdef Py_ssize_t _rcap

    cdef int _record(self, int64_t base, int64_t route, bint is_grpc, int status, int grpc_status, object flags,
                     int64_t duration_ns, int64_t req_bytes, int64_t resp_bytes, uint64_t req_msgs,
                     uint64_t resp_msgs) except -1
    cdef Py_ssize_t _slot(self, int64_t base, bint is_grpc, int status, int grpc_status, object flags) except -1
    cdef Py_ssize_t _new_slot(self, int64_t base, bint is_grpc, int status, int grpc_status,
                              object flags) except -1
    cdef Py_ssize_t _route_slot(self, int64_t route, bint ok) except -1
    cdef int record_c(self, int64_t base, int64_t route, Stream down, Stream up, object flags,
                      int64_t end_ns) except -1


cdef class TcpStats:
    cdef KeyMap _map
    cdef dict _overflow
    cdef list _keys
    cdef TcpSlot* _slots
    cdef Py_ssize_t _n
    cdef Py_ssize_t _cap

    cdef TcpSlot* _row(self, int64_t base) except NULL
