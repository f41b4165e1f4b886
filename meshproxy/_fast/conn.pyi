"""Type stubs for the compiled HTTP/2 connection (same API as meshproxy.conn_py)."""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Header = tuple[bytes, bytes]
Event = tuple[Any, ...]

EV_REQUEST: int
EV_RESPONSE: int
EV_DATA: int
EV_TRAILERS: int
EV_CLOSED: int
EV_GOAWAY: int
EV_IDLE: int
EV_TERMINATED: int
EV_RETRY: int
RETRY_RESET: int
RETRY_STATUS: int

def monotonic_ns() -> int: ...
def link(a: Stream, b: Stream) -> None: ...
def abandon(down: Stream) -> bool: ...

class RetryOn:
    on_5xx: bool
    on_gateway: bool
    on_reset: bool
    statuses: frozenset[int]
    grpc_mask: int
    per_try_ns: int
    timeouts: TryTimeouts | None
    hook: Callable[[Stream, Stream, int], object]
    def __init__(
        self,
        hook: Callable[[Stream, Stream, int], object],
        *,
        on_5xx: bool = False,
        on_gateway: bool = False,
        on_reset: bool = False,
        statuses: Iterable[int] = (),
        grpc_statuses: Iterable[int] = (),
        per_try_ns: int = 0,
        timeouts: TryTimeouts | None = None,
    ) -> None: ...
    def matches(self, status: int, grpc_status: int = -1) -> bool: ...

class TryTimeouts:
    slot_ns: int
    timer_at_ns: int
    def __init__(self, arm: Callable[[int], object], slot_ns: int = 5_000_000) -> None: ...
    def __len__(self) -> int: ...
    def add(self, s: Stream, due_ns: int) -> None: ...
    def expire(self, now_ns: int) -> list[Stream]: ...

class Outbox:
    def __init__(self) -> None: ...
    def flush(self) -> None: ...

class Stream:
    id: int
    conn: H2Connection
    peer: Stream | None
    user: Any
    notify_close: bool
    response_flags: str | None
    recv_headers: bool
    recv_end: bool
    sent_headers: bool
    sent_end: bool
    is_grpc: bool
    head: bool
    closed_remote_reset: bool
    unprocessed: bool
    error_code: int
    headers: list[Header] | None
    trailers: list[Header] | None
    method: bytes | None
    scheme: bytes | None
    path: bytes | None
    authority: bytes | None
    request_id: bytes | None
    status: int
    grpc_status: int
    grpc_timeout_ns: int
    content_length: int
    data_recv: int
    data_sent: int
    t_open_ns: int
    t_response_ns: int
    grpc_msgs_recv: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    sampled: bool
    attempts: int
    retry: RetryOn | None
    @property
    def state(self) -> str: ...
    @property
    def pending_bytes(self) -> int: ...
    @property
    def held_bytes(self) -> int: ...
    @property
    def send_window(self) -> int: ...
    @property
    def recv_window(self) -> int: ...

class H2Connection:
    client: bool
    writer: Callable[[bytearray], object] | None
    handler: Callable[[list[Event]], object] | None
    local_max_concurrent: int
    local_initial_window: int
    local_max_frame_size: int
    local_max_header_list: int
    local_connection_window: int
    remote_max_concurrent: int
    remote_initial_window: int
    remote_max_frame_size: int
    remote_max_header_list: int
    conn_send_window: int
    open_local: int
    open_remote: int
    next_stream_id: int
    last_peer_stream: int
    goaway_sent: bool
    goaway_sent_last: int
    goaway_received: bool
    goaway_received_last: int
    goaway_received_code: int
    terminated: bool
    write_paused: bool
    hold_new: bool
    stream_limit: int
    generate_request_id: bool
    trace_mode: int
    trace_sampling: float
    streams_total: int
    protocol_errors: int
    def __init__(
        self,
        client: bool,
        outbox: Outbox | None = None,
        settings: dict[str, int] | None = None,
        hold: bool = False,
        generate_request_id: bool = False,
        *,
        first_stream_id: int = 1,
    ) -> None: ...
    @property
    def active_streams(self) -> int: ...
    @property
    def can_open(self) -> bool: ...
    @property
    def settled(self) -> bool: ...
    @property
    def pending_output(self) -> int: ...
    def get_stream(self, stream_id: int) -> Stream | None: ...
    def live_streams(self) -> list[Stream]: ...
    def data_to_send(self) -> bytes: ...
    def take_events(self) -> list[Event] | None: ...
    def initiate(self) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def shutdown(self) -> list[Event] | None: ...
    def close(self, error_code: int = 0, message: str = "") -> list[Event] | None: ...
    def connection_lost(self) -> list[Event] | None: ...
    def ping(self, opaque: bytes = ...) -> None: ...
    def receive(self, data: bytes) -> list[Event] | None: ...
    def open_stream(self, headers: Iterable[Header], end_stream: bool = False) -> Stream: ...
    def open_forward(
        self, src: Stream, authority: bytes | None = None, path: bytes | None = None, timeout_ns: int = -1
    ) -> Stream: ...
    def send_headers(self, s: Stream, headers: Iterable[Header], end_stream: bool = False) -> None: ...
    def send_data(self, s: Stream, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, s: Stream, error_code: int = 8) -> list[Event] | None: ...
    def respond(
        self,
        s: Stream,
        status: int,
        headers: Sequence[Header] = (),
        body: bytes = b"",
        grpc_status: int | None = None,
        grpc_message: str | None = None,
    ) -> list[Event] | None: ...
