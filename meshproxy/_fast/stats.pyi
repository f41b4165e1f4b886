"""Type stubs for the compiled request and TCP counters (same API as meshproxy.telemetry.stats_py)."""

from meshproxy._fast.conn import Stream

DURATION_BOUNDS_MS: tuple[float, ...]
SIZE_BOUNDS: tuple[int, ...]

class RequestStats:
    def __init__(self) -> None: ...
    def record(
        self, base: int, route: int, down: Stream, up: Stream | None, flags: str | None, end_ns: int
    ) -> None: ...
    def record_values(
        self,
        base: int,
        route: int,
        is_grpc: bool,
        status: int,
        grpc_status: int,
        flags: str | None,
        duration_ns: int,
        req_bytes: int,
        resp_bytes: int,
        req_msgs: int,
        resp_msgs: int,
    ) -> None: ...
    def snapshot(
        self,
    ) -> list[
        tuple[
            int, bool, int, int, str, int, float, tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...], int, int
        ]
    ]: ...
    def route_snapshot(self) -> list[tuple[int, int, int, float, tuple[int, ...]]]: ...

class TcpStats:
    def __init__(self) -> None: ...
    def opened(self, base: int) -> None: ...
    def closed(self, base: int, sent: int, received: int) -> None: ...
    def add(self, base: int, sent: int, received: int) -> None: ...
    def snapshot(self) -> list[tuple[int, int, int, int, int]]: ...
