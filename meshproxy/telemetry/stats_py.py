"""The request and TCP counters, pure-Python twin of ``meshproxy/_fast/stats.pyx``.

Owns the numbers behind the sidecar's metrics: per label set (a ``base`` id
worked out by the labeller at config time, plus what only the request
knows: protocol, response code, grpc-status and response flags) a request
count, a duration histogram, request and response size histograms and gRPC
message counters; per route a count and a duration histogram split by
success; and per TCP destination the connections and bytes. Counters only
grow (they are Prometheus counters) and are read at scrape time with
``snapshot()``.

``RequestStats.record`` is the one call per request: everything else it
needs it reads from the downstream and upstream streams. ``record_values``
takes the same numbers as arguments (for callers without streams, and for
the tests that replay one sequence on both twins). Same names, rows and
row order (slots in the order they were first recorded) as the compiled
twin; this one is the oracle of the tests.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["DURATION_BOUNDS_MS", "SIZE_BOUNDS", "RequestStats", "TcpStats"]

#: Envoy's default histogram buckets (ms): a duration d is counted in the first bucket whose bound is >= d.
DURATION_BOUNDS_MS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
#: Byte-size buckets, powers of ten as Istio's (le semantics, as above).
SIZE_BOUNDS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

_DURATION_BOUNDS = tuple(float(b) for b in DURATION_BOUNDS_MS)
_N_DURATION = len(DURATION_BOUNDS_MS) + 1
_N_SIZE = len(SIZE_BOUNDS) + 1


def _duration_ms(duration_ns: int) -> float:
    # A clock that went backwards (or an end stamped before the open) counts as 0, not as a negative time.
    ms = duration_ns / 1e6
    return ms if ms > 0.0 else 0.0


class _Slot:
    __slots__ = (
        "count",
        "dur",
        "dur_sum",
        "req_bytes",
        "req_msgs",
        "req_size",
        "resp_bytes",
        "resp_msgs",
        "resp_size",
    )

    def __init__(self) -> None:
        self.count = 0
        self.dur_sum = 0.0
        self.dur = [0] * _N_DURATION
        self.req_bytes = 0
        self.req_size = [0] * _N_SIZE
        self.resp_bytes = 0
        self.resp_size = [0] * _N_SIZE
        self.req_msgs = 0
        self.resp_msgs = 0


class _RouteSlot:
    __slots__ = ("count", "dur", "dur_sum")

    def __init__(self) -> None:
        self.count = 0
        self.dur_sum = 0.0
        self.dur = [0] * _N_DURATION


class RequestStats:
    """Request counters and histograms, by label set and by route; see the module docstring."""

    __slots__ = ("_routes", "_slots")

    def __init__(self) -> None:
        self._slots: dict[tuple, _Slot] = {}
        self._routes: dict[tuple[int, int], _RouteSlot] = {}

    def record(self, base, route, down, up, flags, end_ns) -> None:
        """Count one finished request from its downstream stream ``down`` and last upstream stream ``up``.

        ``base``: the label set's id; ``route``: the route's id, or -1 for no per-route stats; ``flags``:
        Envoy's response flags ("" or None for none); ``end_ns``: when it ended (the core's clock).
        """
        self.record_values(
            base,
            route,
            down.is_grpc,
            down.status,
            down.grpc_status,
            flags,
            end_ns - down.t_open_ns,
            down.data_recv,
            down.data_sent,
            down.grpc_msgs_recv,
            up.grpc_msgs_recv if up is not None else 0,
        )

    def record_values(
        self,
        base,
        route,
        is_grpc,
        status,
        grpc_status,
        flags,
        duration_ns,
        req_bytes,
        resp_bytes,
        req_msgs,
        resp_msgs,
    ) -> None:
        """``record`` with the numbers given: status as sent (0: none), grpc_status (-1: none)."""
        is_grpc = bool(is_grpc)
        if flags is None:
            flags = ""
        elif not isinstance(flags, str):
            raise TypeError(f"flags must be str, not {type(flags).__name__}")
        key = (int(base), is_grpc, int(status), int(grpc_status), flags)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        ms = _duration_ms(duration_ns)
        d = bisect_left(_DURATION_BOUNDS, ms)
        slot.count += 1
        slot.dur_sum += ms
        slot.dur[d] += 1
        req_bytes = max(0, req_bytes)
        resp_bytes = max(0, resp_bytes)
        slot.req_bytes += req_bytes
        slot.req_size[bisect_left(SIZE_BOUNDS, req_bytes)] += 1
        slot.resp_bytes += resp_bytes
        slot.resp_size[bisect_left(SIZE_BOUNDS, resp_bytes)] += 1
        slot.req_msgs += req_msgs
        slot.resp_msgs += resp_msgs
        if route >= 0:
            ok = grpc_status == 0 if is_grpc else 0 < status < 500
            rkey = (int(route), 1 if ok else 0)
            rs = self._routes.get(rkey)
            if rs is None:
                rs = self._routes[rkey] = _RouteSlot()
            rs.count += 1
            rs.dur_sum += ms
            rs.dur[d] += 1

    def snapshot(self) -> list[tuple]:
        """Rows ``(base, is_grpc, status, grpc_status, flags, count, duration_sum_ms, duration_buckets,
        req_bytes_sum, req_size_buckets, resp_bytes_sum, resp_size_buckets, req_msgs, resp_msgs)``; buckets
        are per-bucket (not cumulative) counts, the last one +Inf."""
        return [
            (
                *key,
                s.count,
                s.dur_sum,
                tuple(s.dur),
                s.req_bytes,
                tuple(s.req_size),
                s.resp_bytes,
                tuple(s.resp_size),
                s.req_msgs,
                s.resp_msgs,
            )
            for key, s in self._slots.items()
        ]

    def route_snapshot(self) -> list[tuple]:
        """Rows ``(route, success, count, duration_sum_ms, duration_buckets)``; success is 1 or 0."""
        return [(*key, s.count, s.dur_sum, tuple(s.dur)) for key, s in self._routes.items()]


class TcpStats:
    """TCP connections opened and closed and bytes carried, by destination label set ``base``."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[int, list[int]] = {}

    def _row(self, base) -> list[int]:
        row = self._rows.get(base)
        if row is None:
            row = self._rows[int(base)] = [0, 0, 0, 0]
        return row

    def opened(self, base) -> None:
        self._row(base)[0] += 1

    def closed(self, base, sent, received) -> None:
        row = self._row(base)
        row[1] += 1
        row[2] += max(0, sent)
        row[3] += max(0, received)

    def add(self, base, sent, received) -> None:
        """Bytes carried on a connection still open (so that a long one shows up before it ends)."""
        row = self._row(base)
        row[2] += max(0, sent)
        row[3] += max(0, received)

    def snapshot(self) -> list[tuple[int, int, int, int, int]]:
        """Rows ``(base, opened, closed, sent, received)``."""
        return [(base, *row) for base, row in self._rows.items()]
