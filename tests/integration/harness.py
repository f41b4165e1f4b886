"""Real processes on loopback for the integration tests: free ports, readiness, the sidecar
under test (or nghttpx standing in for it), its sockets, h2c peers (a one-shot GET, a client
for many requests on one connection, a capturing server and a scriptable one), and the gRPC
interop protos."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

#: Which proxy ``Sidecar`` runs: ``meshproxy`` (the default, the thing under test) or
#: ``nghttpx``, a known-good stand-in for checking the tests themselves.
PROXY_ENV = "MESHPROXY_TEST_PROXY"

HOST = "127.0.0.1"

#: Debian's grpc-proto; ``make test`` installs it.
GRPC_PROTO_ROOT = Path("/usr/share/grpc-proto")
INTEROP_PROTOS = ("empty", "messages", "test")
GRPC_PROTO_AVAILABLE = all((GRPC_PROTO_ROOT / f"grpc/testing/{name}.proto").is_file() for name in INTEROP_PROTOS)
GRPC_PROTO_MISSING = f"the gRPC interop protos are missing: {GRPC_PROTO_ROOT}/grpc/testing (apt-get install grpc-proto)"

#: The interop protos are generated under this package, not ``grpc.testing``: that name is
#: grpcio's own package. The proto package stays ``grpc.testing``, so the wire paths are
#: the official ones (``/grpc.testing.TestService/UnaryCall``).
INTEROP_PACKAGE = "grpc_interop"

#: Channel options every test client uses: no HTTP CONNECT proxy from the environment,
#: and no transparent retries that would hide a stream the proxy refused or reset.
CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0))


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Return once ``host:port`` accepts a TCP connection; raise TimeoutError after ``timeout``
    seconds, or RuntimeError as soon as ``alive()`` says the process meant to listen is gone."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"the process meant to listen on {host}:{port} exited")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")
        time.sleep(0.02)


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Evaluate ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _split(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, _, port = address.rpartition(":")
    return host, int(port)


def _tail(path: Path, limit: int = 20_000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = data[-limit:].decode("utf-8", "replace")
    return text if len(data) <= limit else f"[... {len(data) - limit} bytes cut ...]\n{text}"


class Process:
    """A child process whose stdout and stderr go to a file (a pipe could fill and stall it)."""

    def __init__(self, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.name = name
        fd, log = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "wb") as out:
            # A session of its own: a Ctrl-C meant for pytest does not reach it, and a
            # forced kill takes its worker processes (nghttpx forks one) with it.
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return _tail(self.log_path)

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}): {' '.join(self.argv)}\n--- output ---\n{self.output()}"

    def stop(self, sig: int, timeout: float) -> int | None:
        """Send ``sig`` and wait up to ``timeout`` seconds; return the exit code, or None when
        it had to be killed."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(10)

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)


class Sidecar:
    """The sidecar under test as a context manager: started, ready when its listen port accepts
    TCP, and on exit sent SIGTERM and required to drain and exit 0 within ``stop_timeout``.

    ``Sidecar(upstream="127.0.0.1:50051")`` runs
    ``python -m meshproxy run --listen ... --upstream ... --admin ... --metrics ...`` on free
    ports; ``Sidecar(config_file=path, listen_port=p)`` runs ``python -m meshproxy run --config
    path`` and waits for ``p`` (``upstream`` then only tells ``upstream_connections`` which
    port to count). ``Sidecar(control_plane="127.0.0.1:15010")`` runs ``python -m meshproxy run
    --control-plane ... --listen ...``: it is ready once the control plane's first snapshot has
    been applied (the outbound listener is on ``listen_port``); the node flags (``--namespace``,
    ``--workload``...) go in ``extra_args``. ``extra_args`` are appended to meshproxy's command line.
    ``launch()`` starts the process without waiting for it to listen; ``wait_ready()`` waits.

    With ``MESHPROXY_TEST_PROXY=nghttpx`` nghttpx stands in (h2c in, h2c out, one worker); it
    drains on SIGQUIT (SIGTERM is its immediate stop), and it knows neither ``config_file``
    nor meshproxy's ``extra_args``.
    """

    def __init__(
        self,
        upstream: str | tuple[str, int] | None = None,
        *,
        config_file: str | os.PathLike[str] | None = None,
        control_plane: str | None = None,
        listen_port: int | None = None,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        proxy: str | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if upstream is None and config_file is None and control_plane is None:
            raise ValueError("give upstream, config_file or control_plane (and upstream only to count its connections)")
        if config_file is not None and listen_port is None:
            raise ValueError("with config_file, listen_port must say where the config listens")
        self.proxy = proxy or os.environ.get(PROXY_ENV) or "meshproxy"
        if self.proxy not in ("meshproxy", "nghttpx"):
            raise ValueError(f"{PROXY_ENV}={self.proxy!r}: expected meshproxy or nghttpx")
        self.host = HOST
        self.upstream = _split(upstream) if upstream is not None else None
        self.config_file = Path(config_file) if config_file is not None else None
        self.control_plane = control_plane
        self.listen_port = listen_port or free_port()
        self.admin_port = free_port()
        self.metrics_port = free_port()
        self.extra_args = list(extra_args)
        self.env = env
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: Process | None = None
        self.exit_code: int | None = None
        self._final_output: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.listen_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "sidecar not started"
        return self.process.pid

    def argv(self) -> list[str]:
        if self.proxy == "nghttpx":
            if self.config_file is not None or self.control_plane is not None:
                import pytest

                pytest.skip(f"config_file and control_plane need meshproxy, not the {PROXY_ENV}=nghttpx stand-in")
            assert self.upstream is not None
            uhost, uport = self.upstream
            return [
                "nghttpx",
                f"--frontend={self.host},{self.listen_port};no-tls",
                f"--backend={uhost},{uport};;proto=h2",
                "--workers=1",
                "--no-ocsp",
                "--conf=/dev/null",
            ]
        argv = [sys.executable, "-m", "meshproxy", "run"]
        if self.config_file is not None:
            argv += ["--config", str(self.config_file)]
        elif self.control_plane is not None:
            argv += ["--control-plane", self.control_plane, "--listen", self.address]
        else:
            assert self.upstream is not None
            uhost, uport = self.upstream
            argv += ["--listen", self.address, "--upstream", f"{uhost}:{uport}"]
        argv += ["--admin", f"{self.host}:{self.admin_port}", "--metrics", f"{self.host}:{self.metrics_port}"]
        return argv + self.extra_args

    def start(self) -> Sidecar:
        self.launch()
        return self.wait_ready()

    def launch(self) -> Sidecar:
        """Start the process; ``wait_ready()`` waits for its listen port."""
        self.process = Process(self.argv(), name=self.proxy, env=self.env)
        return self

    def wait_ready(self) -> Sidecar:
        assert self.process is not None, "sidecar not launched"
        try:
            wait_listening(self.host, self.listen_port, self.startup_timeout, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            self.process.kill()
            message = f"{exc}\nexit code {self.process.popen.returncode}\n{self.process.describe()}"
            self.process.remove_log()
            raise AssertionError(message) from None
        return self

    def stop(self) -> None:
        """Ask for a drain (SIGTERM; SIGQUIT for nghttpx) and require exit code 0 in time."""
        if self.process is None or self.exit_code is not None:
            return
        sig = signal.SIGQUIT if self.proxy == "nghttpx" else signal.SIGTERM
        try:
            code = self.process.stop(sig, self.stop_timeout)
            self.exit_code = -signal.SIGKILL if code is None else code
            self._final_output = self.process.output()
            if code is None:
                raise AssertionError(
                    f"{self.proxy} did not exit within {self.stop_timeout}s of {sig.name}\n{self.process.describe()}"
                )
            if code != 0:
                raise AssertionError(f"{self.proxy} exited with {code} after {sig.name}\n{self.process.describe()}")
        finally:
            self.process.remove_log()

    def output(self) -> str:
        """What the sidecar printed so far (all of it, once stopped)."""
        if self._final_output is not None:
            return self._final_output
        return self.process.output() if self.process is not None else ""

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.stop()
            return
        # The body failed: stop anyway, and keep its error the one reported, with the
        # sidecar's side of the story attached.
        try:
            self.stop()
        except AssertionError as stop_error:
            exc.add_note(str(stop_error))
        else:
            exc.add_note(f"{self.proxy} output:\n{self.output()}")

    # -- the sidecar's sockets -------------------------------------------------

    def connections(self) -> list[tuple[int, int]]:
        """(local port, remote port) of every ESTABLISHED TCP socket the sidecar's processes hold."""
        return established_tcp(process_tree(self.pid))

    def downstream_connections(self) -> int:
        """Established connections from clients to the listen port."""
        return sum(1 for local, _ in self.connections() if local == self.listen_port)

    def upstream_connections(self) -> int:
        """Established connections from the sidecar to its upstream."""
        if self.upstream is None:
            raise ValueError("upstream unknown: pass it beside config_file to count its connections")
        return sum(1 for _, remote in self.connections() if remote == self.upstream[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a proxy may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


_TCP_ESTABLISHED = "01"


def established_tcp(pids: Iterable[int]) -> list[tuple[int, int]]:
    """(local port, remote port) of the ESTABLISHED TCP sockets open in ``pids``: socket inodes from
    /proc/PID/fd matched against /proc/PID/net/tcp{,6}."""
    pids = list(pids)
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: list[tuple[int, int]] = []
    seen: set[str] = set()
    for pid in pids[:1]:
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if state == _TCP_ESTABLISHED and inode in inodes and inode not in seen:
                    seen.add(inode)
                    found.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)))
    return found


class RequestPipe:
    """A request iterator for grpcio's sync streaming calls that the test feeds one message at a
    time (ping-pong). Iteration gives up after ``timeout`` seconds without a message or a close;
    each call's own, shorter deadline ends the call long before that."""

    _CLOSED = object()

    def __init__(self, timeout: float = 120.0) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._timeout = timeout

    def add(self, request) -> None:
        self._queue.put(request)

    def close(self) -> None:
        """Half-close: the call sees the end of its requests."""
        self._queue.put(self._CLOSED)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            item = self._queue.get(timeout=self._timeout)
        except queue.Empty:
            raise StopIteration from None
        if item is self._CLOSED:
            self._queue.put(self._CLOSED)  # stays closed for any further next()
            raise StopIteration
        return item

    def __enter__(self) -> RequestPipe:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ThreadedServer:
    """A loopback TCP server for tests: one thread accepts, one thread per connection runs
    ``_handle(sock)``. Subclasses set their own state before calling ``__init__`` (the accept
    thread starts there). ``close()`` (or leaving the ``with``) stops and joins them all."""

    name = "server"

    def __init__(self, host: str = HOST) -> None:
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name=f"{self.name}-accept", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(sock,), name=f"{self.name}-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class H2CaptureServer(ThreadedServer):
    """A bare HTTP/2 (h2c) server that records every request's header fields and answers each
    finished request with one empty gRPC message and ``grpc-status: 0``: for checking what
    exactly reaches a server (grpc-timeout, te), which grpcio's server does not show."""

    name = "h2-capture"

    def __init__(self, host: str = HOST) -> None:
        self.requests: queue.Queue[dict[str, str]] = queue.Queue()
        super().__init__(host)

    def _handle(self, conn: socket.socket) -> None:
        self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        headers: dict[int, dict[str, str]] = {}
        conn.settimeout(0.2)
        with conn:
            h2conn.initiate_connection()
            conn.sendall(h2conn.data_to_send())
            while not self._closed.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers[event.stream_id] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        h2conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self.requests.put(headers.pop(event.stream_id))
                        h2conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        h2conn.send_data(event.stream_id, b"\0\0\0\0\0")
                        h2conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                conn.sendall(h2conn.data_to_send())


def grpc_frame(message: bytes) -> bytes:
    """``message`` as one uncompressed gRPC length-prefixed message."""
    return b"\0" + struct.pack(">I", len(message)) + message


# -- a plain HTTP/2 client -----------------------------------------------------------


@dataclass
class H2Response:
    """What ``H2Client`` received on one stream."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    #: RST_STREAM error code, or -1 when the connection ended before the stream did.
    reset: int | None = None
    ended: bool = False
    #: When the request was sent (``time.monotonic()``), and how long after that the stream
    #: ended or the peer reset it (0.0 until then, and when the connection ended first).
    start: float = 0.0
    elapsed: float = 0.0

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def grpc_status(self) -> str | None:
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))


class H2Client:
    """A blocking h2c client (the ``h2`` library) on one connection: ``send`` requests (several
    at once if wanted, in one write with ``flush=False``), then ``wait`` for their responses
    (``H2Response``: headers, body, trailers, RST_STREAM code, timing). ``raw_headers`` sends
    header fields exactly as given (the h2 library would otherwise drop or refuse the malformed
    ones); ``authority`` is the :authority of requests that name none (a subclass may change
    the class default).

    It reads frame by frame: the h2 library takes no frame at all after a GOAWAY (RFC 9113
    allows more, a PING say), so to this client a GOAWAY ends the connection; ``goaway`` keeps
    its last stream id, and every stream still open is then reported with ``reset == -1``, as
    are all of them when the connection closes."""

    authority = "test"

    def __init__(
        self, address: str, *, timeout: float = 10.0, raw_headers: bool = False, authority: str | None = None
    ) -> None:
        import h2.config
        import h2.connection

        host, _, port = address.rpartition(":")
        if authority is not None:
            self.authority = authority
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=not raw_headers,
            normalize_outbound_headers=not raw_headers,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.responses: dict[int, H2Response] = {}
        #: The last stream id of a GOAWAY received, if one was.
        self.goaway: int | None = None
        self.closed = False
        self._inbuf = bytearray()
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        flush: bool = True,
    ) -> int:
        """Start a request and return its stream id; with ``flush`` False it is only queued, to
        leave with the next one in a single write."""
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (":method", method),
            (":scheme", "http"),
            (":authority", self.authority if authority is None else authority),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(sid, fields, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.responses[sid] = H2Response(start=time.monotonic())
        if flush:
            self._flush()
        return sid

    def wait(self, stream_ids: list[int], timeout: float = 10.0) -> list[H2Response]:
        """The responses of ``stream_ids`` once each has ended or been reset; TimeoutError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not all(self.responses[sid].done for sid in stream_ids):
            if self.closed:
                for sid in stream_ids:
                    if not self.responses[sid].done:
                        self.responses[sid].reset = -1
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete response within {timeout}s: {[self.responses[s] for s in stream_ids]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                continue
            self._receive(data)
        return [self.responses[sid] for sid in stream_ids]

    def _receive(self, data: bytes) -> None:
        self._inbuf += data
        while len(self._inbuf) >= 9 and not self.closed:
            end = 9 + int.from_bytes(self._inbuf[:3], "big")
            if len(self._inbuf) < end:
                break
            frame = bytes(self._inbuf[:end])
            del self._inbuf[:end]
            self._receive_frame(frame)
            if self.goaway is not None:
                self.closed = True
        self._flush()

    def _receive_frame(self, frame: bytes) -> None:
        import h2.events

        for event in self.conn.receive_data(frame):
            response = self.responses.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived):
                response.headers = dict(event.headers)
                response.status = int(response.headers[":status"])
            elif isinstance(event, h2.events.DataReceived):
                response.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                response.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                response.ended = True
                response.elapsed = time.monotonic() - response.start
            elif isinstance(event, h2.events.StreamReset):
                if response is not None:
                    response.reset = int(event.error_code)
                    response.elapsed = time.monotonic() - response.start
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.last_stream_id
                for sid, r in self.responses.items():
                    if sid > (event.last_stream_id or 0) and not r.done:
                        r.reset = -1

    def request(self, path: str, timeout: float = 10.0, **kwargs) -> H2Response:
        """``send`` one request (``kwargs`` are its options) and ``wait`` for its response."""
        return self.wait([self.send(path, **kwargs)], timeout)[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# -- an h2-library server a test scripts ------------------------------------------------


class H2Session:
    """One connection of an ``H2ScriptedServer``: its h2 state and what the server owes on it."""

    def __init__(self, sock: socket.socket, conn) -> None:
        self.sock = sock
        self.conn = conn
        #: Requests accepted and neither answered, nor reset (by either side), nor refused.
        self.open_streams: set[int] = set()
        #: Stream id -> when to answer it (streams whose request has fully arrived).
        self.due: dict[int, float] = {}
        #: Stream id -> what a subclass means to do with it (its own vocabulary).
        self.plans: dict[int, str] = {}
        #: Requests accepted (ignored ones excluded), the highest stream id among them, and
        #: the requests answered.
        self.received = 0
        self.highest = 0
        self.answered = 0
        #: GOAWAYs sent, and the last stream id of the one that ends the connection once sent.
        self.goaways = 0
        self.final_last: int | None = None
        #: Raw frames for the next write.
        self.extra = bytearray()


class H2ScriptedServer(ThreadedServer):
    """An h2c server (the ``h2`` library, a thread per connection) that answers every request
    ``delay`` seconds after it has fully arrived with a gRPC-shaped OK carrying ``identity``
    (``x-served-by``, the one message, ``grpc-status: 0``). Subclasses script the rest through
    the hooks (each gets the connection's ``H2Session``): ``_initiate`` (the SETTINGS),
    ``_goaway_on_request`` (a GOAWAY as a request arrives, last stream id the highest accepted
    before it), ``_request`` (a request's headers: accept, refuse, drop the connection),
    ``_request_ended``, ``_respond``, ``_answered``, ``_stream_reset``, ``_ping_ack`` and
    ``_after_read``.

    GOAWAYs are written as raw frames (``_queue_goaway``): the h2 library sends none it can keep
    working after. Once the final one is out, later streams are left unprocessed (counted in
    ``ignored``), and when no accepted stream is left the connection is closed gracefully (our
    FIN, then the peer's).

    Counters (under ``lock``): ``connections``, ``served``, ``goaways``, ``ignored``."""

    name = "h2-scripted"
    #: The longest the loop sleeps waiting for the socket (answers are due on this grid).
    poll_interval = 0.05

    def __init__(self, identity: str, *, delay: float = 0.0, host: str = HOST) -> None:
        import h2.connection  # noqa: F401  (fail early when the h2 library is missing)

        self.identity = identity
        self.delay = delay
        self.lock = threading.Lock()
        self.connections = 0
        self.served = 0
        self.goaways = 0
        self.ignored = 0
        super().__init__(host)

    # -- the hooks --------------------------------------------------------------------

    def _initiate(self, conn) -> None:
        conn.initiate_connection()

    def _goaway_on_request(self, session: H2Session) -> bool:
        return False

    def _request(self, session: H2Session, sid: int, headers: dict[str, str]) -> bool:
        """An accepted request's headers have arrived; False ends the connection at once."""
        session.open_streams.add(sid)
        return True

    def _request_ended(self, session: H2Session, sid: int) -> None:
        """An open stream's request has fully arrived."""
        session.due[sid] = time.monotonic() + self.delay

    def _respond(self, session: H2Session, sid: int) -> None:
        conn = session.conn
        conn.send_headers(
            sid, [(":status", "200"), ("content-type", "application/grpc"), ("x-served-by", self.identity)]
        )
        conn.send_data(sid, grpc_frame(self.identity.encode()))
        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)

    def _answered(self, session: H2Session) -> None:
        """After each answer (``session.answered`` counts them)."""

    def _stream_reset(self, session: H2Session, sid: int, was_open: bool) -> None:
        """The client reset ``sid`` (already dropped from the open and due ones)."""

    def _ping_ack(self, session: H2Session) -> None:
        pass

    def _after_read(self, session: H2Session) -> None:
        """After the events of each read."""

    # -- the machinery ----------------------------------------------------------------

    def _queue_goaway(self, session: H2Session, last: int, *, final: bool = True) -> None:
        """A GOAWAY (NO_ERROR) with last stream id ``last`` in the next write; ``final`` for the
        one that ends the connection (not a graceful-shutdown first one with 2^31-1)."""
        session.extra += struct.pack(">I", 8)[1:] + bytes([0x7, 0]) + struct.pack(">III", 0, last, 0)
        session.goaways += 1
        if final:
            session.final_last = last
        with self.lock:
            self.goaways += 1

    def _handle(self, sock: socket.socket) -> None:
        import h2.exceptions

        with self.lock:
            self.connections += 1
        with sock, contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self._initiate(conn)
        sock.sendall(conn.data_to_send())
        session = H2Session(sock, conn)
        while not self._closed.is_set():
            now = time.monotonic()
            for sid in [s for s, t in session.due.items() if t <= now]:
                del session.due[sid]
                session.open_streams.discard(sid)
                self._respond(session, sid)
                session.answered += 1
                with self.lock:
                    self.served += 1
                self._answered(session)
            sock.sendall(conn.data_to_send() + bytes(session.extra))
            session.extra.clear()
            if session.final_last is not None and not session.open_streams:
                sock.shutdown(socket.SHUT_WR)
                end = time.monotonic() + 2
                sock.settimeout(0.1)
                while time.monotonic() < end:
                    try:
                        if not sock.recv(65536):
                            break
                    except TimeoutError:
                        continue
                return
            wait = min(session.due.values(), default=now + self.poll_interval) - now
            readable, _, _ = select.select([sock], [], [], max(0.0, min(wait, self.poll_interval)))
            if not readable:
                continue
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    sid = event.stream_id
                    if session.final_last is None and self._goaway_on_request(session):
                        self._queue_goaway(session, session.highest)
                    if session.final_last is not None and sid > session.final_last:
                        with self.lock:
                            self.ignored += 1
                        continue
                    session.received += 1
                    session.highest = max(session.highest, sid)
                    if not self._request(session, sid, dict(event.headers)):
                        return
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    if event.stream_id in session.open_streams:
                        self._request_ended(session, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    was_open = event.stream_id in session.open_streams
                    session.open_streams.discard(event.stream_id)
                    session.due.pop(event.stream_id, None)
                    self._stream_reset(session, event.stream_id, was_open)
                elif isinstance(event, h2.events.PingAckReceived):
                    self._ping_ack(session)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            self._after_read(session)


def h2_get(address: str | tuple[str, int], path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One plain HTTP/2 (h2c) GET of ``path`` on a connection of its own: ``(status, body)``.
    TimeoutError after ``timeout`` seconds, ConnectionError if the stream is reset or the
    connection closes first."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    deadline = time.monotonic() + timeout
    with socket.create_connection(_split(address), timeout=timeout) as sock:
        conn.initiate_connection()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", "test"), (":path", path)]
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = 0, bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"GET {path}: no complete response within {timeout}s")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"GET {path}: the connection closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, bytes(body)
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"GET {path}: stream reset with error code {event.error_code}")
            sock.sendall(conn.data_to_send())


def grpc_timeout_seconds(value: str) -> float:
    """The duration a ``grpc-timeout`` header field says (``1S``, ``999m``, ``100000u``...)."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(value) < 2 or not value[:-1].isdigit() or len(value) > 9 or value[-1] not in units:
        raise ValueError(f"not a grpc-timeout value: {value!r}")
    return int(value[:-1]) * units[value[-1]]


# -- the interop protos ----------------------------------------------------------


def generate_interop_pb2(out_dir: str | os.PathLike[str]) -> Path:
    """Generate the grpc.testing messages and stubs with grpc_tools.protoc into ``out_dir`` (as
    package ``grpc_interop``), put ``out_dir`` on sys.path, and return it."""
    from grpc_tools import protoc

    out = Path(out_dir)
    src = out / "proto-src"
    (src / INTEROP_PACKAGE).mkdir(parents=True, exist_ok=True)
    for name in INTEROP_PROTOS:
        text = (GRPC_PROTO_ROOT / f"grpc/testing/{name}.proto").read_text()
        text = text.replace('import "grpc/testing/', f'import "{INTEROP_PACKAGE}/')
        (src / INTEROP_PACKAGE / f"{name}.proto").write_text(text)
    argv = ["protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}"]
    argv += [f"{src}/{INTEROP_PACKAGE}/{name}.proto" for name in INTEROP_PROTOS]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed: {' '.join(argv)}")
    (out / INTEROP_PACKAGE / "__init__.py").touch()
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return out


def load_interop(out_dir: str | os.PathLike[str]) -> SimpleNamespace:
    """The generated modules: ``empty_pb2``, ``messages_pb2``, ``test_pb2_grpc``."""
    import importlib

    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    return SimpleNamespace(
        empty_pb2=importlib.import_module(f"{INTEROP_PACKAGE}.empty_pb2"),
        messages_pb2=importlib.import_module(f"{INTEROP_PACKAGE}.messages_pb2"),
        test_pb2_grpc=importlib.import_module(f"{INTEROP_PACKAGE}.test_pb2_grpc"),
    )


def tick(request: bytes, context) -> Iterator[bytes]:
    """A gRPC server-stream handler (raw bytes): the request packs ``(count, interval)`` as
    ``>Id``; the answer is ``count`` messages (each its index, ``>I``), one every ``interval``
    seconds, for as long as the call lives."""
    count, interval = struct.unpack(">Id", request)
    for index in range(count):
        if index:
            time.sleep(interval)
        if not context.is_active():
            return
        yield struct.pack(">I", index)


@contextlib.contextmanager
def grpc_server(handlers: dict, service: str, workers: int = 16) -> Iterator[str]:
    """A grpcio server on loopback whose ``service`` has the raw-bytes ``handlers`` (method
    name -> grpc method handler); yields its address, stops it on exit."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield f"{HOST}:{port}"
    finally:
        server.stop(grace=None)
