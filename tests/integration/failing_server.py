"""Real upstreams that fail on purpose, for the resilience tests (tests/integration/test_resilience.py).

* ``FailingBackend``: a grpcio server (raw-bytes generic handlers, service ``resilience.Backend``:
  ``Unary`` answers its name, ``Stream`` answers ``count`` messages) whose behaviour the test sets
  at runtime, thread-safely, with ``set(...)``: fail every k-th call, a seeded share of calls, or
  the first attempt of each request id, with a given status; delay; hang until cancelled;
  send some stream messages and then fail. ``stop()`` makes it die (grpcio's ``stop(0)``). It
  counts and records every call it receives (index, x-request-id, body size and CRC, outcome),
  the honest measure of load: backend calls minus client calls is the retries actually sent.
* ``BackendProcess``: the same server in a subprocess (``python -m
  tests.integration.failing_server --port P --name N``), controlled over its
  ``resilience.Control`` service (``Set``, ``Stats``), so that a test can SIGKILL it mid-load.
* ``H2FaultServer``: an ``h2``-library server for what grpcio cannot be made to do: reset a
  stream (RST_STREAM INTERNAL_ERROR before any response), refuse one (REFUSED_STREAM), send a
  GOAWAY whose last stream id leaves in-flight streams unprocessed, or drop the connection.

The failure decisions depend only on the call's index (or a seeded sequence drawn per call, or
the request id), so counts are exact whatever the interleaving.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.integration import harness

SERVICE = "resilience.Backend"
CONTROL = "resilience.Control"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Behaviour:
    """What a ``FailingBackend`` does with each call; ``n`` is the call's 1-based index on this
    server since the last ``reset()``. A call fails (with ``status``) when any rule says so:

    * ``fail_every`` k > 0: calls k, 2k, 3k...;
    * ``fail_ratio`` p: a draw from ``random.Random(seed)``, one per call, below p;
    * ``fail_first`` n: calls 1..n;
    * ``fail_first_attempt``: the first call with each x-request-id (later ones pass).

    A call that does not fail waits ``delay`` seconds and answers, or with ``hang`` waits until
    the call is cancelled (or the server stops) and never answers. ``Stream`` answers the number
    of messages the request asks for (``>I``), but with ``stream_fail_after`` m > 0 it sends m
    messages and then fails with ``status``, and with ``stream_hang_after`` m > 0 it sends m
    messages and then hangs until the call is cancelled (whatever ``hang`` says: that is for
    ``Unary``, and for ``Stream`` without ``stream_hang_after``).
    """

    fail_every: int = 0
    fail_ratio: float = 0.0
    seed: int = 0
    fail_first: int = 0
    fail_first_attempt: bool = False
    status: str = "UNAVAILABLE"
    delay: float = 0.0
    hang: bool = False
    stream_fail_after: int = 0
    stream_hang_after: int = 0

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.status]


@dataclass
class Call:
    index: int
    method: str
    request_id: str
    size: int
    crc: int
    start: float
    end: float = 0.0
    #: "ok", "failed", "cancelled" (the peer cancelled or the server stopped), or "" while running.
    outcome: str = ""


@dataclass
class Stats:
    calls: int = 0
    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    records: list[Call] = field(default_factory=list)

    def request_ids(self) -> list[str]:
        return [c.request_id for c in self.records]


class FailingBackend:
    """A grpcio server on loopback (``address``) that fails as told. Context manager; ``stop()``
    (also on exit) ends it with grace 0: in-flight calls are cancelled, connections closed."""

    def __init__(
        self,
        name: str,
        behaviour: Behaviour | None = None,
        *,
        port: int = 0,
        workers: int = 64,
        options: tuple[tuple[str, object], ...] = (),
    ) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._behaviour = behaviour or Behaviour()
        self._rng = random.Random(self._behaviour.seed)
        self._stats = Stats()
        self._seen_ids: set[str] = set()
        self._generation = 0  # raised by reset(): calls from before it are not counted after
        self._stopping = threading.Event()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"backend-{name}"),
            options=list(options),
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        control = {
            "Set": grpc.unary_unary_rpc_method_handler(self._control_set),
            "Stats": grpc.unary_unary_rpc_method_handler(self._control_stats),
        }
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE, handlers),
                grpc.method_handlers_generic_handler(CONTROL, control),
            )
        )
        self.port = self._server.add_insecure_port(f"{harness.HOST}:{port}")
        if port and self.port != port:
            raise OSError(f"{name}: cannot listen on port {port}")
        self.address = f"{harness.HOST}:{self.port}"
        self._server.start()
        self.alive = True

    # -- control -----------------------------------------------------------------------

    def set(self, behaviour: Behaviour | None = None, **fields) -> None:
        """Replace the behaviour (``Behaviour(**fields)`` when none is given); the seeded
        sequence restarts. Counts are kept (see ``reset``)."""
        new = behaviour if behaviour is not None else Behaviour(**fields)
        with self._lock:
            self._behaviour = new
            self._rng = random.Random(new.seed)
            self._seen_ids.clear()

    def reset(self) -> None:
        """Forget the calls counted so far (call indices start again at 1)."""
        with self._lock:
            self._stats = Stats()
            self._generation += 1
            self._seen_ids.clear()
            self._rng = random.Random(self._behaviour.seed)

    def stats(self) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(s.calls, s.ok, s.failed, s.cancelled, [dataclasses.replace(c) for c in s.records])

    @property
    def calls(self) -> int:
        with self._lock:
            return self._stats.calls

    def stop(self, grace: float | None = 0) -> None:
        """Die: stop serving at once (with ``grace`` None or 0, in-flight calls are cancelled)."""
        self._stopping.set()
        self.alive = False
        self._server.stop(grace).wait(5)

    def __enter__(self) -> FailingBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- the calls ------------------------------------------------------------------------

    def _admit(self, method: str, request: bytes, context: grpc.ServicerContext) -> tuple[Call, Behaviour, bool]:
        metadata = dict(context.invocation_metadata())
        request_id = str(metadata.get("x-request-id", ""))
        with self._lock:
            b = self._behaviour
            self._stats.calls += 1
            n = self._stats.calls
            fail = n <= b.fail_first or (b.fail_every > 0 and n % b.fail_every == 0)
            if b.fail_ratio > 0 and self._rng.random() < b.fail_ratio:
                fail = True
            if b.fail_first_attempt and request_id not in self._seen_ids:
                fail = True
            self._seen_ids.add(request_id)
            call = Call(n, method, request_id, len(request), zlib.crc32(request), time.monotonic())
            call._generation = self._generation  # not a field: not in the JSON form
            self._stats.records.append(call)
        return call, b, fail

    def _finish(self, call: Call, outcome: str) -> None:
        with self._lock:
            call.end = time.monotonic()
            call.outcome = outcome
            if call._generation != self._generation:
                return
            if outcome == "ok":
                self._stats.ok += 1
            elif outcome == "failed":
                self._stats.failed += 1
            else:
                self._stats.cancelled += 1

    def _wait(self, context: grpc.ServicerContext, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: forever) while the call lives; False if it ended first."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            if not context.is_active():
                return False
            left = 0.005 if deadline is None else min(0.005, deadline - time.monotonic())
            if left <= 0:
                return True
            if self._stopping.wait(left):
                return False

    def _fail(self, call: Call, b: Behaviour, context: grpc.ServicerContext) -> None:
        self._finish(call, "failed")
        context.abort(b.code(), f"{self.name}: injected failure on call {call.index}")

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        call, b, fail = self._admit("Unary", request, context)
        if fail:
            self._fail(call, b, context)
        if not self._wait(context, None if b.hang else b.delay):
            self._finish(call, "cancelled")
            context.abort(grpc.StatusCode.CANCELLED, "ended before the answer")
        self._finish(call, "ok")
        return self.name.encode()

    def _stream(self, request: bytes, context: grpc.ServicerContext):
        call, b, fail = self._admit("Stream", request, context)
        count = struct.unpack(">I", request[:4])[0] if len(request) >= 4 else 1
        if fail:
            self._fail(call, b, context)
        for index in range(count):
            if b.stream_fail_after and index == b.stream_fail_after:
                self._fail(call, b, context)
            hang = index >= b.stream_hang_after if b.stream_hang_after > 0 else b.hang
            if not self._wait(context, None if hang else b.delay):
                self._finish(call, "cancelled")
                return
            yield struct.pack(">I", index)
        self._finish(call, "ok")

    def _control_set(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.set(Behaviour(**json.loads(request)))
        return b"ok"

    def _control_stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"reset":
            self.reset()
            return b"{}"
        s = self.stats()
        return json.dumps(dataclasses.asdict(s)).encode()


class BackendProcess:
    """A ``FailingBackend`` in a subprocess of its own, controlled over ``resilience.Control``:
    ``set``, ``stats``, ``reset`` as the in-process one, and ``kill()`` (SIGKILL: the kernel
    closes its sockets, nothing is said on them). Context manager."""

    def __init__(self, name: str, behaviour: Behaviour | None = None, *, startup_timeout: float = 30.0) -> None:
        self.name = name
        self.port = harness.free_port()
        self.address = f"{harness.HOST}:{self.port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "tests.integration.failing_server", "--port", str(self.port), "--name", name]
        if behaviour is not None:
            argv += ["--behaviour", json.dumps(dataclasses.asdict(behaviour))]
        self.process = harness.Process(argv, name=f"backend-{name}", env=env)
        self._startup_timeout = startup_timeout
        self._channel: grpc.Channel | None = None

    def wait_ready(self) -> BackendProcess:
        try:
            harness.wait_listening(harness.HOST, self.port, self._startup_timeout, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            self.process.kill()
            raise AssertionError(f"{exc}\n{self.process.describe()}") from None
        self._channel = grpc.insecure_channel(self.address, options=list(harness.CLIENT_OPTIONS))
        return self

    def _control(self, method: str, request: bytes) -> bytes:
        assert self._channel is not None, "not ready"
        return self._channel.unary_unary(f"/{CONTROL}/{method}")(request, timeout=10)

    def set(self, behaviour: Behaviour | None = None, **fields) -> None:
        new = behaviour if behaviour is not None else Behaviour(**fields)
        self._control("Set", json.dumps(dataclasses.asdict(new)).encode())

    def reset(self) -> None:
        self._control("Stats", b"reset")

    def stats(self) -> Stats:
        raw = json.loads(self._control("Stats", b""))
        records = [Call(**c) for c in raw.pop("records")]
        return Stats(**raw, records=records)

    @property
    def calls(self) -> int:
        return self.stats().calls

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self.process.kill()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.process.kill()
        self.process.remove_log()

    def __enter__(self) -> BackendProcess:
        return self.wait_ready()

    def __exit__(self, *exc_info) -> None:
        self.close()


# -- an h2-library server for resets, refusals and GOAWAY ------------------------------------


class H2FaultServer(harness.H2ScriptedServer):
    """An h2c server (``harness.H2ScriptedServer``: the ``h2`` library, a thread per connection)
    that answers each request with a gRPC-shaped OK (``x-served-by: name``, one message ``name``,
    ``grpc-status: 0``) after ``delay`` seconds, except as ``action(n)`` says for the n-th request
    it receives (1-based, over all connections; ``action`` may be replaced at any time):

    * ``"ok"``: answer;
    * ``"reset"``: RST_STREAM INTERNAL_ERROR once the request has arrived (no response at all);
    * ``"refuse"``: RST_STREAM REFUSED_STREAM as the headers arrive (unprocessed: RFC 9113 §8.7);
    * ``"close"``: close the TCP connection at once (every stream on it dies unanswered);
    * ``"status:NNN"``: answer HTTP status NNN (text/plain, a short body), no gRPC trailers.

    With ``goaway_after`` k > 0, once a connection has received k requests, the next request to
    arrive gets a GOAWAY (NO_ERROR) whose last stream id is the highest of those k: that request
    and any later ones on the connection are left unprocessed (counted in ``ignored``), the k are
    answered, and the connection is closed once they are.

    Counters (under ``lock``): connections, requests (headers received, ignored ones excluded),
    served, resets, refused, closes, goaways, ignored, cancelled (streams the client reset).
    """

    name = "h2-fault"
    poll_interval = 0.02

    def __init__(self, name: str = "h2", *, delay: float = 0.0, action=None, goaway_after: int = 0) -> None:
        self.action = action or (lambda n: "ok")
        self.goaway_after = goaway_after
        self.requests = 0
        self.resets = 0
        self.refused = 0
        self.closes = 0
        self.cancelled = 0
        super().__init__(name, delay=delay, host=harness.HOST)

    def reset(self, action=None) -> None:
        """Zero the counters (request numbers start again at 1) and set ``action``."""
        with self.lock:
            self.action = action or (lambda n: "ok")
            self.connections = self.requests = self.served = self.resets = 0
            self.refused = self.closes = self.goaways = self.ignored = self.cancelled = 0

    def counts(self) -> dict[str, int]:
        with self.lock:
            names = "connections requests served resets refused closes goaways ignored cancelled".split()
            return {k: getattr(self, k) for k in names}

    def _goaway_on_request(self, session: harness.H2Session) -> bool:
        return bool(self.goaway_after) and session.received >= self.goaway_after

    def _request(self, session: harness.H2Session, sid: int, headers: dict[str, str]) -> bool:
        import h2.errors

        with self.lock:
            self.requests += 1
            n = self.requests
            action = self.action
        what = action(n)
        if what == "refuse":
            session.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            with self.lock:
                self.refused += 1
            return True
        if what == "close":
            with self.lock:
                self.closes += 1
            with contextlib.suppress(OSError):
                session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        session.open_streams.add(sid)
        session.plans[sid] = what
        return True

    def _request_ended(self, session: harness.H2Session, sid: int) -> None:
        import h2.errors

        if session.plans.get(sid, "ok") == "reset":
            del session.plans[sid]
            session.open_streams.discard(sid)
            session.conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            with self.lock:
                self.resets += 1
        else:
            super()._request_ended(session, sid)

    def _respond(self, session: harness.H2Session, sid: int) -> None:
        what = session.plans.pop(sid, "ok")
        if not what.startswith("status:"):
            super()._respond(session, sid)
            return
        fields = [(":status", what[7:]), ("content-type", "text/plain"), ("x-served-by", self.identity)]
        session.conn.send_headers(sid, fields)
        session.conn.send_data(sid, f"{self.identity}: status {what[7:]}\n".encode(), end_stream=True)

    def _stream_reset(self, session: harness.H2Session, sid: int, was_open: bool) -> None:
        if was_open:
            with self.lock:
                self.cancelled += 1


# -- the subprocess ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a FailingBackend in a process of its own")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--behaviour", default="{}", help="Behaviour fields as JSON")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    backend = FailingBackend(args.name, Behaviour(**json.loads(args.behaviour)), port=args.port)
    print(f"{args.name} listening on {backend.address}", flush=True)
    stop.wait()
    backend.stop()


if __name__ == "__main__":
    main()
