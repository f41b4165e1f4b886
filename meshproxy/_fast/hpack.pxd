# The shape of the compiled HPACK codec, for cimport by the compiled connection.

from libc.stdint cimport uint8_t


cdef class Decoder:
    cdef list _ring            # dynamic table entries as (name, value) tuples; capacity a power of two
    cdef Py_ssize_t _mask      # len(_ring) - 1
    cdef Py_ssize_t _head      # slot of the newest entry
    cdef Py_ssize_t _count
    cdef Py_ssize_t _table_bytes
    cdef Py_ssize_t _table_size
    cdef Py_ssize_t _max_table_size
    cdef bint _must_update
    cdef public Py_ssize_t max_header_list_size
    cdef uint8_t* _scratch     # Huffman output, reused across strings
    cdef Py_ssize_t _scratch_cap

    cdef list _decode(self, const uint8_t* data, Py_ssize_t end)
    cdef tuple _lookup(self, Py_ssize_t idx)
    cdef bytes _string(self, const uint8_t* data, Py_ssize_t* pos, Py_ssize_t end)
    cdef int _add(self, tuple header) except -1
    cdef int _evict(self, Py_ssize_t target) except -1


cdef class Encoder:
    cdef object _entries       # deque of (name, value, id), newest first
    cdef dict _by_pair
    cdef dict _by_name
    cdef Py_ssize_t _inserted
    cdef Py_ssize_t _table_bytes
    cdef Py_ssize_t _table_size
    cdef Py_ssize_t _max_table_size
    cdef Py_ssize_t _header_table_size
    cdef Py_ssize_t _pending_min
    cdef uint8_t* _out         # the block being built
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap

    cdef int _encode(self, object headers, bint huffman) except -1
    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef int _resize(self, Py_ssize_t size) except -1
    cdef int _add(self, bytes name, bytes value) except -1
    cdef int _evict(self, Py_ssize_t target) except -1
    cdef Py_ssize_t _index(self, object found)
