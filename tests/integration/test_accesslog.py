"""The access log of a real sidecar: a known mix of gRPC calls (successes, application failures,
calls no route matches, a slow one) and plain HTTP/2 requests through ``meshproxy run
--access-log``, then every line parsed and matched to its request by x-request-id: method,
authority, path, codes, flags, exact byte counts, upstream host and cluster, route, peer.
Sampling 0 logs the failures and nothing else; a file shared by two workers gets every line
whole.

Backends: a grpcio server in this process (raw-bytes handlers) and ``harness.H2CaptureServer``
for plain HTTP/2. Every call carries a deadline; waits for lines are bounded polls.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration import harness
from tests.integration.conftest import SIDECAR_KEY

HOST = harness.HOST
SERVICE = "test.Echo"
TIMEOUT = 10.0
#: The slow call's minimum duration (ms): its line must say at least this.
SLOW_MS = 60
PEER = re.compile(r"^127\.0\.0\.1:\d+$")


def reply_for(request: bytes) -> bytes:
    return b"pong:" + request


def _echo(request: bytes, context) -> bytes:
    return reply_for(request)


def _fail(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def _slow(request: bytes, context) -> bytes:
    time.sleep(SLOW_MS / 1000 + 0.01)
    return reply_for(request)


HANDLERS = {
    "Echo": grpc.unary_unary_rpc_method_handler(_echo),
    "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    "Slow": grpc.unary_unary_rpc_method_handler(_slow),
}


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[str, str]]:
    """(grpcio backend address, plain HTTP/2 backend address)."""
    with harness.grpc_server(HANDLERS, SERVICE) as grpc_address, harness.H2CaptureServer() as plain:
        yield grpc_address, plain.address


def config(port: int, grpc_address: str, plain_address: str) -> dict:
    def route(name: str, prefix: str, cluster: str) -> dict:
        return {"name": name, "match": {"prefix": prefix}, "route": {"clusters": [{"cluster": cluster}]}}

    return {
        "version": "accesslog",
        "listeners": [
            {
                "name": "main",
                "address": f"{HOST}:{port}",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [route("echo", f"/{SERVICE}/", "echo"), route("plain", "/plain/", "plain")],
                    }
                ],
            }
        ],
        "clusters": [
            {"name": "echo", "endpoints": [{"address": grpc_address}]},
            {"name": "plain", "endpoints": [{"address": plain_address}]},
        ],
    }


@contextlib.contextmanager
def sidecar(tmp_path: Path, request: pytest.FixtureRequest, backends: tuple[str, str], *args: str):
    port = harness.free_port()
    path = tmp_path / f"sidecar-{port}.json"
    path.write_text(json.dumps(config(port, *backends)))
    # Metrics off: what is under test here is the access log alone.
    with harness.Sidecar(config_file=path, listen_port=port, extra_args=["--metrics", "off", *args]) as running:
        request.node.stash[SIDECAR_KEY] = running
        yield running


def stdout_lines(sidecar: harness.Sidecar) -> list[dict]:
    """The JSON lines the sidecar printed (so far, or all of them once it has exited; its log
    lines, on stderr, share the file)."""
    text = sidecar.output() if sidecar.exit_code is not None else sidecar.process.log_path.read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_lines(read, count: int, timeout: float = 10.0) -> list[dict]:
    """``read()``'s lines once there are at least ``count`` (AssertionError after ``timeout`` s)."""
    lines: list[dict] = []

    def enough() -> bool:
        nonlocal lines
        lines = read()
        return len(lines) >= count

    assert harness.poll_until(enough, timeout), f"{len(lines)} access log lines, expected {count}: {lines}"
    return lines


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (/proc/PID/fd and net/tcp)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
    return False


def by_request_id(lines: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for line in lines:
        rid = line["x_request_id"]
        assert rid not in out, f"two lines for {rid}: {out[rid]} and {line}"
        out[rid] = line
    return out


def call(ch: grpc.Channel, method: str, body: bytes, rid: str, service: str = SERVICE) -> grpc.StatusCode:
    try:
        ch.unary_unary(f"/{service}/{method}")(body, timeout=TIMEOUT, metadata=[("x-request-id", rid)])
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def run_mix(address: str, ok: int = 5, failed: int = 3, unrouted: int = 2, plain: int = 2, slow: bool = True) -> None:
    with grpc.insecure_channel(address, options=list(harness.CLIENT_OPTIONS)) as ch:
        for i in range(ok):
            assert call(ch, "Echo", f"hello-{i}".encode(), f"ok-{i}") == grpc.StatusCode.OK
        for i in range(failed):
            assert call(ch, "Fail", b"x", f"fail-{i}") == grpc.StatusCode.NOT_FOUND
        for i in range(unrouted):
            assert call(ch, "Call", b"y", f"nr-{i}", service="test.Other") == grpc.StatusCode.UNIMPLEMENTED
        if slow:
            assert call(ch, "Slow", b"zz", "slow-0") == grpc.StatusCode.OK
    with harness.H2Client(address, authority="plain.example") as client:
        for i in range(plain):
            r = client.request(
                f"/plain/item?i={i}", headers=[("x-request-id", f"plain-{i}"), ("user-agent", "h2-test/1.0")]
            )
            assert r.status == 200, r


def test_every_line_of_a_known_mix(tmp_path: Path, request: pytest.FixtureRequest, backends):
    grpc_address, plain_address = backends
    before = datetime.datetime.now(datetime.UTC)
    with sidecar(tmp_path, request, backends, "--access-log", "stdout") as running:
        run_mix(running.address)
        lines = by_request_id(wait_lines(lambda: stdout_lines(running), 13))
    assert sorted(lines) == sorted(
        [f"ok-{i}" for i in range(5)]
        + [f"fail-{i}" for i in range(3)]
        + ["nr-0", "nr-1", "slow-0"]
        + ["plain-0", "plain-1"]
    )
    for rid, line in lines.items():
        assert PEER.match(line["downstream_peer"]), line
        assert line["protocol"] == "HTTP/2" and line["peer_identity"] is None, line
        start = datetime.datetime.fromisoformat(line["start_time"])
        assert start >= before - datetime.timedelta(seconds=1), line
        assert line["start_time"].endswith("Z") and len(line["start_time"]) == 24, line
        assert isinstance(line["duration"], int) and line["duration"] >= 0, line
        if rid.startswith("plain"):
            continue
        assert line["method"] == "POST" and line["authority"] == running.address, line
        assert line["request_protocol"] == "grpc" and line["user_agent"].startswith("grpc-python"), line
    for i in range(5):
        line = lines[f"ok-{i}"]
        body = f"hello-{i}".encode()
        assert line["path"] == f"/{SERVICE}/Echo" and line["response_code"] == 200 and line["grpc_status"] == 0
        assert line["response_flags"] == "-"
        assert line["bytes_received"] == 5 + len(body) and line["bytes_sent"] == 5 + len(reply_for(body))
        assert line["upstream_host"] == grpc_address and line["upstream_cluster"] == "echo"
        assert line["route_name"] == "echo" and isinstance(line["upstream_service_time"], int)
    for i in range(3):
        line = lines[f"fail-{i}"]
        assert line["path"] == f"/{SERVICE}/Fail" and line["response_code"] == 200 and line["grpc_status"] == 5
        assert line["response_flags"] == "-" and line["bytes_sent"] == 0 and line["bytes_received"] == 6
        assert line["upstream_host"] == grpc_address and line["route_name"] == "echo"
    for i in range(2):
        line = lines[f"nr-{i}"]
        assert line["path"] == "/test.Other/Call" and line["response_flags"] == "NR"
        assert line["response_code"] == 200 and line["grpc_status"] == 12
        assert line["upstream_host"] is None and line["upstream_cluster"] is None and line["route_name"] is None
        assert line["upstream_service_time"] is None
    slow = lines["slow-0"]
    assert slow["duration"] >= SLOW_MS and slow["upstream_service_time"] >= SLOW_MS
    for i in range(2):
        line = lines[f"plain-{i}"]
        assert line["method"] == "GET" and line["authority"] == "plain.example"
        assert line["path"] == f"/plain/item?i={i}" and line["request_protocol"] == "http"
        assert line["response_code"] == 200 and line["grpc_status"] is None and line["response_flags"] == "-"
        assert line["bytes_received"] == 0 and line["bytes_sent"] == 5
        assert line["upstream_host"] == plain_address and line["upstream_cluster"] == "plain"
        assert line["route_name"] == "plain" and line["user_agent"] == "h2-test/1.0"


def test_sampling_zero_logs_failures_only(tmp_path: Path, request: pytest.FixtureRequest, backends):
    with sidecar(tmp_path, request, backends, "--access-log", "stdout", "--access-log-sampling", "0") as running:
        run_mix(running.address, ok=10, failed=3, unrouted=2, plain=2, slow=False)
    # Stopped (drained, exited 0): every line it was going to write is written.
    lines = stdout_lines(running)
    assert sorted(line["x_request_id"] for line in lines) == ["fail-0", "fail-1", "fail-2", "nr-0", "nr-1"]


def test_a_file_shared_by_two_workers(tmp_path: Path, request: pytest.FixtureRequest, backends):
    path = tmp_path / "access.log"
    calls = 48

    def read() -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    with sidecar(tmp_path, request, backends, "--access-log", str(path), "--concurrency", "2") as running:
        # Ready means one worker listens: wait for both (a worker still starting would also die
        # of the SIGTERM that ends the test).
        workers = harness.process_tree(running.pid)[1:]
        assert len(workers) == 2, workers
        assert harness.poll_until(lambda: all(listening(pid, running.listen_port) for pid in workers), 10), workers
        # A channel per few calls: the kernel spreads connections over the workers.
        for n in range(0, calls, 4):
            with grpc.insecure_channel(running.address, options=list(harness.CLIENT_OPTIONS)) as ch:
                for i in range(n, n + 4):
                    assert call(ch, "Echo", b"x" * i, f"file-{i}") == grpc.StatusCode.OK
        lines = wait_lines(read, calls)
    assert path.read_text().endswith("\n")
    got = by_request_id(lines)
    assert sorted(got) == sorted(f"file-{i}" for i in range(calls))
    for i in range(calls):
        assert got[f"file-{i}"]["bytes_received"] == 5 + i


def test_off_by_default(tmp_path: Path, request: pytest.FixtureRequest, backends):
    with sidecar(tmp_path, request, backends) as running:
        run_mix(running.address, ok=3, failed=1, unrouted=1, plain=0, slow=False)
    assert stdout_lines(running) == []
