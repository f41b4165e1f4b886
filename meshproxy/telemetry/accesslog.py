"""The access log: one JSON object per request, a line each, to stdout or a file.

The keys are those of Envoy's and Istio's JSON access logs (``start_time``,
``method``, ``authority``, ``path``, ``response_code``, ``response_flags``,
``upstream_host``...); a value that does not apply is ``null``, as in
Envoy's JSON format. ``grpc_status`` is the number the client was sent.
``peer_identity`` is the caller's SPIFFE id when it came over mTLS;
``authz_policy`` names the AuthorizationPolicy that allowed or denied the
request, and ``authz_audit`` (present only then) an AUDIT policy that matched.

``AccessLog.log`` is a completion hook (``Worker.on_complete``): it runs once
per request, inside the event loop, and must stay cheap. A line is formatted
at once (nothing of the request is kept) into a list; the list is written
with one ``os.write`` per event-loop burst (a ``call_soon`` armed by the
first line of the burst), never one per request. On a pipe the writes are
cut at line boundaries to at most ``PIPE_BUF`` bytes, so the lines of
several workers sharing one stdout never interleave. The writes block, as
``logging``'s do: a reader that stops reading stops the worker.

Sampling (``access_log_sampling`` < 1) thins out the successes only: a
request that failed (``is_failure``: no response, a 5xx, a gRPC status other
than 0, or a response flag such as UH, UT, NR, URX) is always logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshproxy.conn import h2conn as h2

if TYPE_CHECKING:
    import asyncio

    from meshproxy.downstream import Request

__all__ = ["AccessLog", "AccessLogError", "is_failure"]

log = logging.getLogger("meshproxy.accesslog")

now_ns = h2.monotonic_ns
_quote = json.encoder.encode_basestring_ascii  # the C one: "..." with everything non-ASCII escaped

#: Formatted lines kept before a write regardless of the burst (a burst of many completions).
MAX_LINES = 1024
#: Bytes kept when the destination cannot take them (a full pipe): beyond, lines are dropped.
MAX_BACKLOG = 4 << 20
#: The largest single write to a regular file.
MAX_WRITE = 1 << 20
#: Quoted strings remembered (authority, path, method, user agent, cluster, endpoint repeat).
MAX_QUOTED = 4096

_MILLIS = [f'.{ms:03d}Z",' for ms in range(1000)]
#: Small numbers as text: a list index costs a third of formatting an int.
_SMALL = 4096
_NUM = [str(n) for n in range(_SMALL)]
_PROTOCOL = ('"http"', '"grpc"')


class AccessLogError(RuntimeError):
    """The access log's destination cannot be opened (one line, for the CLI)."""


#: Response flags that mark no failure by themselves: a direct response, an injected delay.
NOT_FAILURES = frozenset({"DR", "DI"})


def is_failure(status: int, grpc_status: int, is_grpc: bool, flags: str) -> bool:
    """Whether a request failed: no response, a 5xx, a gRPC status other than 0, or a response
    flag other than ``NOT_FAILURES`` (sampling never drops these; a span's status is ERROR)."""
    if status == 0 or status >= 500 or (flags and flags not in NOT_FAILURES):
        return True
    return is_grpc and grpc_status != 0


class AccessLog:
    """JSON access log lines for the requests of one worker.

    ``settings.access_log`` is ``"stdout"`` or a file path (appended to,
    created if missing; AccessLogError if it cannot be opened). ``write``,
    when given, replaces it: it is called with the bytes of one or more
    whole lines per burst (tests, other sinks).
    ``settings.access_log_sampling`` is the share of successful requests
    logged. ``loop`` is the event loop the hook runs on (default: the running
    one at the first line). ``rng`` draws the sampling decisions.
    """

    def __init__(
        self,
        settings: Any,
        write: Callable[[bytes], object] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.sampling = float(getattr(settings, "access_log_sampling", 1.0))
        self._random = rng
        self._loop = loop
        self._lines: list[str] = []
        self._scheduled = False
        self._backlog = b""
        self._fd = -1
        self._own_fd = False
        self._chunk = MAX_WRITE
        self._write = write
        self.dropped = 0  # lines lost to write errors or a backlog past MAX_BACKLOG
        self._warned = False
        if write is None:
            dest = settings.access_log
            if dest == "stdout":
                self._fd = 1
            else:
                try:
                    self._fd = os.open(dest, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except OSError as e:
                    raise AccessLogError(f"--access-log {dest}: cannot open it: {e.strerror or e}") from None
                self._own_fd = True
            mode = os.fstat(self._fd).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                self._chunk = select.PIPE_BUF
        # Streams carry monotonic times; the log shows wall-clock ones. Refreshed at every write.
        self._wall_offset = time.time_ns() - now_ns()
        self._second = -1
        self._second_text = ""
        self._quoted: dict[bytes | str, str] = {}
        self._peer_conn: Any = None
        self._peer = "null"

    # -- the hook -------------------------------------------------------------------

    def log(self, req: Request) -> None:
        """The completion hook: format ``req``'s line now, write it with the burst's others."""
        down = req.down
        up = req.up
        status = down.status
        grpc = down.grpc_status
        is_grpc = down.is_grpc
        flags = req.flags or down.response_flags or ""
        if self.sampling < 1.0 and not is_failure(status, grpc, is_grpc, flags) and self._random() >= self.sampling:
            return
        end = now_ns()
        start = down.t_open_ns
        wall = start + self._wall_offset
        second = wall // 1_000_000_000
        if second != self._second:
            self._second = second
            self._second_text = time.strftime('{"start_time":"%Y-%m-%dT%H:%M:%S', time.gmtime(second))
        # Most values repeat (method, authority, path, user agent, endpoint...): their JSON is
        # remembered, looked up inline (a method call per value would cost more than the lookup).
        quoted = self._quoted
        method, authority, path = down.method, down.authority, down.path
        method = quoted.get(method) or self._q(method)
        authority = quoted.get(authority) or self._q(authority)
        path = quoted.get(path) or self._q(path)
        ep = req.endpoint
        if ep is None:
            host = "null"
        else:
            host = ep.address
            host = quoted.get(host) or self._q(host)
        subset = req.subset
        if subset is None:
            cluster = "null"
        else:
            cluster = subset.cluster_name
            cluster = quoted.get(cluster) or self._q(cluster)
        route = req.route
        if route is None:
            route_name = "null"
        else:
            route_name = route.name
            route_name = quoted.get(route_name) or self._q(route_name)
        user_agent = "null"
        for name, value in down.headers or ():
            if name == b"user-agent":
                user_agent = quoted.get(value) or self._q(value)
                break
        num = _NUM
        if up is not None and up.t_response_ns:
            upstream_time = (up.t_response_ns - up.t_open_ns) // 1_000_000
            upstream_time = num[upstream_time] if upstream_time < _SMALL else str(upstream_time)
        else:
            upstream_time = "null"
        duration = (end - start) // 1_000_000
        received, sent = down.data_recv, down.data_sent
        conn = down.conn
        if conn is not self._peer_conn:
            self._peer_conn = conn
            self._peer = _peer_of(conn)
        rid = down.request_id
        rid = _quote(rid.decode("utf-8", "replace")) if rid else "null"
        # The core gives 32 lower-case hex digits or nothing: no escaping needed.
        trace_id = down.trace_id
        trace_id = f'"{trace_id.decode()}"' if trace_id else "null"
        # mTLS (meshproxy.tls) and authorization (meshproxy.authz): who called, and which policy decided.
        peer = req.peer
        peer_identity = "null" if peer is None else (quoted.get(peer.spiffe_id) or self._q(peer.spiffe_id))
        decision = req.authz
        if decision is None:
            authz = '"authz_policy":null'
        else:
            name = decision.policy
            authz = f'"authz_policy":{quoted.get(name) or self._q(name) if name else "null"}'
            if decision.audit:
                authz += f',"authz_audit":{quoted.get(decision.audit) or self._q(decision.audit)}'
        self._lines.append(
            f"{self._second_text}{_MILLIS[wall // 1_000_000 % 1000]}"
            f'"method":{method},"authority":{authority},"path":{path},'
            f'"protocol":"HTTP/2","request_protocol":{_PROTOCOL[is_grpc]},'
            f'"response_code":{num[status] if 0 <= status < _SMALL else status},'
            f'"grpc_status":{(num[grpc] if grpc < _SMALL else grpc) if is_grpc and grpc >= 0 else "null"},'
            f'"response_flags":"{flags or "-"}","bytes_received":{num[received] if received < _SMALL else received},'
            f'"bytes_sent":{num[sent] if sent < _SMALL else sent},'
            f'"duration":{num[duration] if duration < _SMALL else duration},"upstream_service_time":{upstream_time},'
            f'"upstream_host":{host},"upstream_cluster":{cluster},"route_name":{route_name},'
            f'"x_request_id":{rid},"trace_id":{trace_id},'
            f'"downstream_peer":{self._peer},"peer_identity":{peer_identity},{authz},"user_agent":{user_agent}}}\n'
        )
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                import asyncio

                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)
        elif len(self._lines) >= MAX_LINES:
            self._write_lines()

    def _q(self, value: bytes | str | None) -> str:
        """``value`` as a JSON string (bytes read as UTF-8), remembered (``log`` looks it up first)."""
        if value is None:
            return "null"
        if len(self._quoted) >= MAX_QUOTED:
            self._quoted.clear()
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        quoted = self._quoted[value] = _quote(text)
        return quoted

    # -- writing --------------------------------------------------------------------

    def flush(self) -> None:
        """Write the lines formatted so far (the burst's ``call_soon``; also at close)."""
        self._scheduled = False
        self._wall_offset = time.time_ns() - now_ns()
        if self._lines or self._backlog:
            self._write_lines()

    def _write_lines(self) -> None:
        data = "".join(self._lines).encode()
        self._lines.clear()
        if self._write is not None:
            self._write(data)
            return
        if self._backlog:
            data = self._backlog + data
            self._backlog = b""
        view = memoryview(data)
        pos, n = 0, len(data)
        while pos < n:
            end = n if n - pos <= self._chunk else _line_end(data, pos, self._chunk)
            try:
                written = os.write(self._fd, view[pos:end])
            except BlockingIOError:
                self._keep(data[pos:])
                return
            except OSError as e:
                self._lost(data[pos:], e)
                return
            pos += written
        self._warned = False

    def _keep(self, rest: bytes) -> None:
        # The destination is full for now (a non-blocking pipe): keep the rest for the next write.
        if len(rest) > MAX_BACKLOG:
            self._lost(rest, None)
            return
        self._backlog = rest
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_later(0.05, self.flush)

    def _lost(self, rest: bytes, error: OSError | None) -> None:
        self.dropped += rest.count(b"\n")
        if not self._warned:
            self._warned = True
            log.warning("access log lines dropped: %s", error or "the destination is not keeping up")

    def close(self) -> None:
        """Write what is left; close the file (not stdout)."""
        self.flush()
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def _line_end(data: bytes, pos: int, limit: int) -> int:
    """Where a write starting at ``pos`` ends: after the last whole line within ``limit`` bytes
    (a longer line goes whole, as one write)."""
    cut = data.rfind(b"\n", pos, pos + limit)
    if cut < 0:
        cut = data.find(b"\n", pos + limit)
        return len(data) if cut < 0 else cut + 1
    return cut + 1


def _peer_of(conn: Any) -> str:
    """The downstream connection's remote address as a JSON string ("ip:port"), or null."""
    handler = conn.handler
    proto = getattr(handler, "__self__", None)
    transport = getattr(proto, "transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return "null"
    host, port = peer[0], peer[1]
    return f'"[{host}]:{port}"' if ":" in host else f'"{host}:{port}"'
