# The shape of the compiled frame codec: C-level constants, the frame types
# and the parser, so that the compiled connection can cimport them.

from libc.stdint cimport uint8_t, uint32_t

cdef enum:
    T_DATA = 0x0
    T_HEADERS = 0x1
    T_PRIORITY = 0x2
    T_RST_STREAM = 0x3
    T_SETTINGS = 0x4
    T_PUSH_PROMISE = 0x5
    T_PING = 0x6
    T_GOAWAY = 0x7
    T_WINDOW_UPDATE = 0x8
    T_CONTINUATION = 0x9

    F_END_STREAM = 0x01
    F_ACK = 0x01
    F_END_HEADERS = 0x04
    F_PADDED = 0x08
    F_PRIORITY = 0x20

    HEADER_SIZE = 9
    HOLD_PIECE = 4096
    MIN_MAX_FRAME_SIZE = 16384
    MAX_FRAME_LENGTH = 16777215


cdef inline uint32_t read_u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = v >> 16
    p[2] = v >> 8
    p[3] = v


cdef inline void put_frame_header(uint8_t* p, uint32_t length, uint8_t ftype, uint8_t flags,
                                  uint32_t stream_id) noexcept nogil:
    p[0] = length >> 16
    p[1] = length >> 8
    p[2] = length
    p[3] = ftype
    p[4] = flags
    put_u32(p + 5, stream_id)


cdef uint8_t* grow(bytearray buf, Py_ssize_t n) except NULL


cdef class Frame:
    # ``type`` is a class attribute of each concrete frame class, as in the twin.
    cdef readonly uint8_t flags
    cdef readonly uint32_t stream_id
    cdef readonly uint32_t length


cdef class _Block(Frame):
    # A frame whose payload is (mostly) one slice of the fed chunk.
    cdef object _mv
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _payload_end


cdef class DataFrame(_Block):
    cdef readonly uint8_t pad_length


cdef class HeadersFrame(_Block):
    cdef readonly uint8_t pad_length
    cdef readonly uint32_t depends_on
    cdef readonly int weight
    cdef readonly bint exclusive


cdef class PriorityFrame(Frame):
    cdef readonly uint32_t depends_on
    cdef readonly int weight
    cdef readonly bint exclusive


cdef class RstStreamFrame(Frame):
    cdef readonly uint32_t error_code


cdef class SettingsFrame(Frame):
    cdef readonly list settings


cdef class PushPromiseFrame(_Block):
    cdef readonly uint8_t pad_length
    cdef readonly uint32_t promised_stream_id


cdef class PingFrame(Frame):
    cdef readonly bytes opaque_data


cdef class GoAwayFrame(_Block):
    cdef readonly uint32_t last_stream_id
    cdef readonly uint32_t error_code


cdef class WindowUpdateFrame(Frame):
    cdef readonly uint32_t increment


cdef class ContinuationFrame(_Block):
    pass


cdef class FrameParser:
    cdef bytes _buf
    cdef object _mv
    cdef Py_ssize_t _pos
    cdef list _held            # pieces of the incomplete next frame
    cdef bytearray _tail       # short reads coalesced before they are held
    cdef Py_ssize_t _held_len  # bytes in _held and _tail
    cdef Py_ssize_t _need      # bytes the next frame needs, from _pos
    cdef uint32_t _max_frame_size
    cdef uint32_t _header_block_stream

    cdef Frame _next(self)
    cdef int _hold(self, bytes piece) except -1
    cdef const uint8_t* _at(self, Py_ssize_t off)
    cdef void _init(self, Frame f, uint8_t flags, uint32_t sid, uint32_t length)
    cdef void _init_block(self, _Block f, Py_ssize_t start, Py_ssize_t end, Py_ssize_t payload_end)
    cdef DataFrame _data(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef HeadersFrame _headers(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef PriorityFrame _priority(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef RstStreamFrame _rst_stream(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef SettingsFrame _settings(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef PushPromiseFrame _push_promise(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef PingFrame _ping(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef GoAwayFrame _goaway(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef WindowUpdateFrame _window_update(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
    cdef ContinuationFrame _continuation(self, uint8_t flags, uint32_t sid, Py_ssize_t start, uint32_t length)
