# The shape of the compiled HTTP/2 connection: streams, connections and the
# outbox that batches their writes, for cimport by other compiled modules.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from meshproxy._fast.hpack cimport Decoder, Encoder


cdef class H2Connection
cdef class Stream
cdef class TryTimeouts
cdef class _TryQueue


cdef class RetryOn:
    cdef readonly bint on_5xx
    cdef readonly bint on_gateway
    cdef readonly bint on_reset
    cdef readonly frozenset statuses
    cdef readonly uint32_t grpc_mask
    cdef public object hook
    cdef readonly int64_t per_try_ns     # each attempt's time to response headers, 0: none
    cdef readonly TryTimeouts timeouts   # where open_forward arms that per-try timeout
    cdef _TryQueue _try_queue            # timeouts' queue for per_try_ns

    cdef bint wants(self, int status, int grpc_status)


cdef class _TryQueue:
    # The attempts of one TryTimeouts armed with one per-try timeout, in due order, linked through
    # Stream.try_next/try_prev (opened in order with the same timeout: each is appended at the end).
    cdef Stream first
    cdef Stream last
    cdef Py_ssize_t n


cdef class TryTimeouts:
    cdef readonly int64_t slot_ns
    cdef dict _queues                    # per-try timeout (ns; -1 for add()) -> _TryQueue
    cdef int64_t _timer_at               # when the owner's timer is set to fire, 0: not set
    cdef object _arm                     # the owner's callable(at_ns): set the timer

    cdef _TryQueue _queue(self, int64_t key)
    cdef int _insert(self, _TryQueue q, Stream s, int64_t due_ns) except -1


cdef class Outbox:
    cdef list _dirty
    cdef list _evented


cdef class Stream:
    cdef readonly uint32_t id
    cdef readonly H2Connection conn
    cdef readonly Stream peer
    cdef public object user          # the Python layer's attachment (route, completion record)
    cdef public bint notify_close    # emit EV_CLOSED for this stream
    cdef public str response_flags   # Envoy-style flags set by the core (UR, UC), None otherwise
    cdef uint8_t state
    cdef readonly bint recv_headers  # the first non-informational header block is in
    cdef readonly bint recv_end
    cdef readonly bint sent_headers
    cdef readonly bint sent_end
    cdef readonly bint is_grpc
    cdef readonly bint head
    cdef readonly bint closed_remote_reset  # the peer reset it
    cdef readonly bint unprocessed   # refused or above a GOAWAY's last stream id: safe to retry
    cdef readonly int64_t error_code  # RST_STREAM code sent or received, -1 none
    cdef readonly list headers       # the request (server role) or response (client role) headers
    cdef readonly list trailers
    cdef readonly bytes method
    cdef readonly bytes scheme
    cdef readonly bytes path
    cdef readonly bytes authority
    cdef readonly bytes request_id
    # Client role: the :status and grpc-status (trailers or trailers-only) received. Server role: what
    # was SENT downstream: the final :status of the response headers (forwarded, respond() or
    # send_headers), the grpc-status of the trailers or trailers-only headers; 0 / -1 until then.
    cdef readonly int status
    cdef readonly int grpc_status
    cdef readonly int64_t grpc_timeout_ns
    cdef readonly int64_t content_length
    cdef readonly int64_t data_recv
    cdef readonly int64_t data_sent
    cdef readonly int64_t t_open_ns
    cdef readonly int64_t t_response_ns
    cdef readonly uint64_t grpc_msgs_recv  # gRPC messages whose 5-byte prefix arrived in DATA (is_grpc only)
    cdef int64_t msg_left            # bytes of the current message's body still to come
    cdef uint32_t msg_len            # the length prefix read so far
    cdef uint8_t prefix_have         # bytes of the 5-byte prefix read so far
    # Tracing (server role), set from an incoming traceparent and by open_forward (conn.trace_mode):
    cdef readonly bytes trace_id     # 32 hex, b"" if none
    cdef readonly bytes span_id      # the proxy's span id sent upstream as the parent-id, b"" if none
    cdef readonly bytes parent_span_id  # the incoming traceparent's parent-id, b"" if none
    cdef readonly bint sampled
    cdef uint16_t trace_in           # an incoming traceparent: 0 none, 1 invalid or repeated, 2 + flags: valid
    cdef bint trace_done             # open_forward worked out trace_out (a retry reuses it)
    cdef bytes trace_out             # the traceparent value sent upstream, None: the incoming one unchanged
    cdef int64_t send_window
    cdef int64_t recv_window
    cdef int64_t recv_unacked
    cdef bytearray pending           # DATA waiting for the send window
    cdef bint pending_end
    cdef list pending_trailers
    cdef bint blocked                # in conn._blocked, waiting for the connection window
    cdef bint hold                   # keep received DATA until linked
    cdef bytearray held
    cdef bint held_end
    cdef list held_trailers
    cdef bint reset_after_end        # RST_STREAM NO_ERROR once our END_STREAM is out (§8.1)
    cdef bytearray replay            # the request body forwarded so far, while it may be sent again
    cdef bint replay_ok
    cdef bint resend                 # replay is to be sent again when the stream is linked
    cdef readonly int attempts       # times the request was sent again (any reason)
    cdef int redispatched            # of those, after REFUSED_STREAM / GOAWAY (capped at MAX_REDISPATCH)
    cdef public RetryOn retry        # server role: when to offer a failed attempt to retry.hook
    cdef _TryQueue try_queue         # client role: the TryTimeouts queue its per-try timeout is in
    cdef Stream try_next
    cdef Stream try_prev
    cdef int64_t try_due_ns


cdef class H2Connection:
    cdef readonly bint client
    cdef public object writer        # transport.write
    cdef public object handler       # called by Outbox.flush with events raised outside receive()
    cdef bint _evented
    cdef bint _settings_acked
    cdef uint32_t max_peer_stream
    cdef bytearray out
    cdef bint _dirty
    cdef Outbox outbox
    cdef bytearray inbuf
    cdef Py_ssize_t preface_left
    cdef bint got_settings
    cdef bint got_remote_settings
    cdef Decoder decoder
    cdef Encoder encoder
    cdef dict streams
    cdef list events
    cdef list _blocked
    cdef dict _recent_resets
    cdef readonly uint32_t local_max_concurrent
    cdef readonly uint32_t local_initial_window
    cdef readonly uint32_t local_max_frame_size
    cdef readonly uint32_t local_max_header_list
    cdef readonly uint32_t local_connection_window
    cdef readonly uint32_t remote_max_concurrent
    cdef readonly uint32_t remote_initial_window
    cdef readonly uint32_t remote_max_frame_size
    cdef readonly uint32_t remote_max_header_list
    cdef readonly int64_t conn_send_window
    cdef int64_t conn_recv_window
    cdef int64_t conn_recv_unacked
    cdef readonly uint32_t open_local
    cdef readonly uint32_t open_remote
    cdef readonly uint32_t next_stream_id
    cdef readonly uint32_t last_peer_stream
    cdef uint32_t hb_stream
    cdef bint hb_end_stream
    cdef bytearray hb_buf
    cdef uint32_t hb_frames
    cdef readonly bint goaway_sent
    cdef readonly uint32_t goaway_sent_last
    cdef bint _shutdown_ping
    cdef readonly bint goaway_received
    cdef readonly uint32_t goaway_received_last
    cdef readonly int64_t goaway_received_code
    cdef readonly bint terminated
    cdef readonly bint write_paused
    cdef readonly bint hold_new
    cdef public uint32_t stream_limit  # our own cap on streams we open (a pool's per-connection limit)
    cdef readonly bint generate_request_id
    cdef readonly uint64_t streams_total
    cdef readonly uint64_t protocol_errors
    cdef uint64_t _rid_state
    cdef int _trace_mode             # 0 off, 1 ensure a traceparent, 2 ensure + the proxy's child span
    cdef double _trace_sampling      # the share of traces we start that are marked sampled
    cdef object _header_table_size
    cdef bint _self_dependent

    cdef list _take_events(self)
    cdef Py_ssize_t _consume(self, const uint8_t* buf, Py_ssize_t n) except -1
    cdef Stream _stream_for_frame(self, uint32_t sid, const char* what)
    cdef bint _is_idle_id(self, uint32_t sid)
    cdef int _on_data(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_headers(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_continuation(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_window_update(self, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_settings(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_rst_stream(self, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_ping(self, uint8_t flags, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef int _on_goaway(self, uint32_t sid, const uint8_t* p, uint32_t length) except -1
    cdef bytes _make_request_id(self)
    cdef int _window_update(self, uint32_t sid, uint32_t inc) except -1
    cdef int _ping(self, bytes opaque, bint ack) except -1
    cdef int _goaway(self, uint32_t last, uint32_t code, bytes debug) except -1
    cdef int _terminate(self, uint32_t code, str message) except -1
    cdef int _abort_streams(self, uint32_t code) except -1
    cdef int _credit_connection(self, Py_ssize_t n) except -1
    cdef int _credit(self, Stream s, Py_ssize_t n) except -1
    cdef int _recv_end(self, Stream s) except -1
    cdef int _sent_end(self, Stream s) except -1
    cdef int _ignore(self, uint32_t sid) except -1
    cdef int _stream_error_id(self, uint32_t sid, uint32_t code) except -1
    cdef int _rst(self, uint32_t sid, uint32_t code) except -1
    cdef int _stream_error(self, Stream s, uint32_t code) except -1
    cdef int _close(self, Stream s, bint abnormal) except -1
    cdef int _check_idle(self) except -1
    cdef int _flush_stream(self, Stream s) except -1
    cdef int _flush_blocked(self) except -1
    cdef int _header_block(self, uint32_t sid, uint8_t flags, const uint8_t* p, Py_ssize_t n,
                           bint self_dependent) except -1
    cdef int _on_block(self, uint32_t sid, bint end_stream, const uint8_t* p, Py_ssize_t n,
                       bint self_dependent) except -1
    cdef int _respond(self, Stream s, int status, object headers, bytes body, object grpc_status,
                      object grpc_message) except -1
    cdef bint _may_open(self)
