"""Tracing through a real sidecar: what reaches the backend (``harness.H2CaptureServer`` records
every request's header fields) and what the access log and an OTLP collector are told.

- by default (mode 1) an incoming ``traceparent`` passes unchanged, with ``tracestate`` and the
  B3 headers; one is created when absent (valid W3C, its trace id from ``x-b3-traceid`` when
  there is one, sampled per ``--trace-sampling`` or ``x-b3-sampled``), and an invalid one is
  replaced; the access log shows the trace id the backend got;
- with ``--otlp-endpoint`` (mode 2) the proxy's span becomes the backend's parent and is exported
  over OTLP/HTTP to a collector in this test (decoding ``ExportTraceServiceRequest``), with the
  trace id, the client's span as its parent, kind, name and attributes;
- ``--otlp-endpoint`` without the SDK installed: one line, no traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration import harness
from tests.integration.conftest import SIDECAR_KEY

HOST = harness.HOST
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")
#: How long a request, a header capture or an exported span may take to show up.
WAIT = 10.0


@pytest.fixture
def backend() -> Iterator[harness.H2CaptureServer]:
    with harness.H2CaptureServer() as server:
        yield server


@contextlib.contextmanager
def sidecar(request: pytest.FixtureRequest, backend: harness.H2CaptureServer, *args: str, env=None):
    # Metrics off: what is under test here is tracing (and the access log that shows it).
    argv = ["--metrics", "off", "--access-log", "stdout", *args]
    with harness.Sidecar(upstream=backend.address, extra_args=argv, env=env) as running:
        request.node.stash[SIDECAR_KEY] = running
        yield running


def send(running: harness.Sidecar, backend: harness.H2CaptureServer, headers=(), path: str = "/pkg.Svc/Call"):
    """One gRPC-shaped request through the sidecar; the header fields the backend received."""
    with harness.H2Client(running.address) as client:
        r = client.request(
            path, method="POST", headers=[("content-type", "application/grpc"), ("te", "trailers"), *headers]
        )
        assert r.status == 200 and r.grpc_status == "0", r
    return backend.requests.get(timeout=WAIT)


def valid(traceparent: str) -> tuple[str, str, str]:
    """(trace id, parent id, flags) of a W3C traceparent that must be valid (non-zero ids)."""
    m = TRACEPARENT.match(traceparent)
    assert m, traceparent
    trace_id, parent_id, flags = m.groups()
    assert trace_id != "0" * 32 and parent_id != "0" * 16, traceparent
    return trace_id, parent_id, flags


def access_lines(running: harness.Sidecar, count: int) -> list[dict]:
    lines: list[dict] = []

    def enough() -> bool:
        nonlocal lines
        text = running.process.log_path.read_text(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return len(lines) >= count

    assert harness.poll_until(enough, WAIT), f"{len(lines)} access log lines, expected {count}"
    return lines


# -- mode 1: ensure a traceparent ------------------------------------------------------------------------


def test_an_incoming_trace_passes_unchanged(request, backend):
    b3 = [("x-b3-traceid", TRACE_ID), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")]
    headers = [("traceparent", f"00-{TRACE_ID}-{PARENT}-01"), ("tracestate", "vendor=abc,other=1"), *b3]
    with sidecar(request, backend) as running:
        seen = send(running, backend, [*headers, ("x-request-id", "rid-trace-1")])
        [line] = access_lines(running, 1)
    for name, value in headers:
        assert seen[name] == value, (name, seen)
    assert line["trace_id"] == TRACE_ID and line["x_request_id"] == "rid-trace-1"


def test_a_trace_is_started_when_absent(request, backend):
    with sidecar(request, backend) as running:
        first = send(running, backend)
        second = send(running, backend)
        lines = access_lines(running, 2)
    ids = []
    for seen, line in zip((first, second), lines, strict=True):
        trace_id, _, flags = valid(seen["traceparent"])
        assert flags == "01"  # --trace-sampling defaults to 1
        assert line["trace_id"] == trace_id and line["x_request_id"] == seen["x-request-id"]
        assert "tracestate" not in seen
        ids.append(trace_id)
    assert ids[0] != ids[1]


def test_a_b3_trace_id_is_kept(request, backend):
    short = "a3ce929d0e0e4736"
    with sidecar(request, backend) as running:
        sampled = send(running, backend, [("x-b3-traceid", short), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")])
        unsampled = send(running, backend, [("x-b3-traceid", TRACE_ID), ("x-b3-sampled", "0")])
        lines = access_lines(running, 2)
    trace_id, _, flags = valid(sampled["traceparent"])
    assert trace_id == "0" * 16 + short and flags == "01"  # left-padded to 32 digits
    assert (sampled["x-b3-traceid"], sampled["x-b3-spanid"], sampled["x-b3-sampled"]) == (short, PARENT, "1")
    trace_id, _, flags = valid(unsampled["traceparent"])
    assert trace_id == TRACE_ID and flags == "00" and unsampled["x-b3-sampled"] == "0"
    assert [line["trace_id"] for line in lines] == ["0" * 16 + short, TRACE_ID]


def test_trace_sampling_zero_starts_unsampled_traces(request, backend):
    with sidecar(request, backend, "--trace-sampling", "0") as running:
        started = send(running, backend)
        kept = send(running, backend, [("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    assert valid(started["traceparent"])[2] == "00"
    assert kept["traceparent"] == f"00-{TRACE_ID}-{PARENT}-01"  # the client's decision stands


@pytest.mark.parametrize(
    "broken",
    [
        f"ff-{TRACE_ID}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE_ID[:-1]}g-{PARENT}-01",  # not hex
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        "00-abc-def-01",
    ],
)
def test_an_invalid_traceparent_is_replaced(request, backend, broken):
    with sidecar(request, backend) as running:
        seen = send(running, backend, [("traceparent", broken)])
    assert seen["traceparent"] != broken
    valid(seen["traceparent"])


# -- mode 2: the proxy's span, exported --------------------------------------------------------------------


class Collector:
    """An OTLP/HTTP traces endpoint on loopback: every span of every ExportTraceServiceRequest
    POSTed to /v1/traces goes to ``spans`` as (resource attributes, span)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: queue.Queue = queue.Queue()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_error(404)
                    return
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            spans.put((resource, span))
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def next_span(self):
        try:
            return self.spans.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no span exported within {WAIT}s") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def collector() -> Iterator[Collector]:
    pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
    c = Collector()
    yield c
    c.close()


def exporting_env() -> dict[str, str]:
    # The batch processor's default is a batch every 5 s: the test waits for less.
    return {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_the_proxy_span_is_the_backend_parent_and_is_exported(request, backend, collector):
    from opentelemetry.proto.trace.v1 import trace_pb2

    headers = [("traceparent", f"00-{TRACE_ID}-{PARENT}-01"), ("tracestate", "k=v"), ("x-request-id", "rid-span")]
    with sidecar(request, backend, "--otlp-endpoint", collector.url, env=exporting_env()) as running:
        seen = send(running, backend, headers)
        resource, span = collector.next_span()
        [line] = access_lines(running, 1)
    trace_id, proxy_span, flags = valid(seen["traceparent"])
    assert trace_id == TRACE_ID and flags == "01" and proxy_span != PARENT
    assert seen["tracestate"] == "k=v"
    assert span.trace_id.hex() == TRACE_ID and span.span_id.hex() == proxy_span
    assert span.parent_span_id.hex() == PARENT
    assert span.kind == trace_pb2.Span.SPAN_KIND_CLIENT and span.name == "pkg.Svc/Call"
    assert 0 < span.start_time_unix_nano <= span.end_time_unix_nano
    attrs = attributes(span)
    assert attrs["http.method"] == "POST" and attrs["http.status_code"] == 200
    assert attrs["rpc.grpc.status_code"] == 0 and attrs["upstream_cluster"] == "upstream"
    assert attrs["upstream_address"] == backend.address and attrs["guid:x-request-id"] == "rid-span"
    assert resource["service.name"] == "meshproxy"
    assert line["trace_id"] == TRACE_ID


def test_a_trace_the_proxy_starts_is_exported_as_a_root(request, backend, collector):
    with sidecar(request, backend, "--otlp-endpoint", collector.url, env=exporting_env()) as running:
        seen = send(running, backend)
        _, span = collector.next_span()
        unsampled = send(running, backend, [("traceparent", f"00-{TRACE_ID}-{PARENT}-00")])
        marker = send(running, backend, [("x-request-id", "marker")])
        spans = [collector.next_span()[1]]
    trace_id, proxy_span, _ = valid(seen["traceparent"])
    assert span.trace_id.hex() == trace_id and span.span_id.hex() == proxy_span and span.parent_span_id == b""
    # The unsampled request gave no span: the next one exported is the marker's.
    assert valid(unsampled["traceparent"])[2] == "00"
    assert [s.trace_id.hex() for s in spans] == [valid(marker["traceparent"])[0]]


def test_spans_still_queued_at_shutdown_are_sent(request, backend, collector):
    # The SDK's default schedule (a batch every 5 s): the span is still queued when SIGTERM comes,
    # and the worker sends it on its way out (meshproxy.telemetry.close, after the drain).
    with sidecar(request, backend, "--otlp-endpoint", collector.url) as running:
        seen = send(running, backend, [("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    assert running.exit_code == 0
    _, span = collector.next_span()
    assert span.trace_id.hex() == TRACE_ID and span.span_id.hex() == valid(seen["traceparent"])[1]


def test_otlp_without_the_sdk_is_one_line(tmp_path: Path, backend):
    # A stand-in package that fails to import, first on the path: as if the extra were missing.
    fake = tmp_path / "opentelemetry"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'opentelemetry'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    port = harness.free_port()
    argv = [sys.executable, "-m", "meshproxy", "run", "--listen", f"{HOST}:{port}", "--upstream", backend.address]
    argv += ["--metrics", "off", "--admin", "off", "--otlp-endpoint", f"http://{HOST}:1/v1/traces"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    err = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert err[-1].startswith("meshproxy: error: --otlp-endpoint needs the 'tracing' extra"), done.stderr
