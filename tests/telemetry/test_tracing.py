"""Tracing in process: the mode ``Tracing`` asks of the core, and the spans it exports, built from
real streams (tests.conn.peers.Proxy: an h2 client -> the proxy's two connections -> an h2 server)
and caught by opentelemetry-sdk's in-memory exporter: ids, parent, kind, name, times, attributes,
status; unsampled requests give no span; without the SDK, one clear error."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from meshproxy.downstream import Request
from meshproxy.telemetry import tracing
from meshproxy.telemetry.tracing import ENSURE, ENSURE_CHILD, Tracing, TracingUnavailable, span_name
from tests.conn.peers import GRPC, REQUEST, Proxy

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
GRPC_RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def worker(node=None) -> SimpleNamespace:
    return SimpleNamespace(trace_mode=0, trace_sampling=1.0, on_complete=[], on_config=[], node=node)


def settings(endpoint: str | None = None, sampling: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(otlp_endpoint=endpoint, trace_sampling=sampling)


def completed(
    mode: int, headers=GRPC, listener: str = "main", grpc_status: bytes = b"0", sampling: float = 1.0
) -> tuple[Request, dict]:
    """A request through the core with ``conn.trace_mode`` = ``mode``, answered by the server;
    returns the completion record and the header fields the server received."""
    p = Proxy()
    p.down.conn.trace_mode = mode
    p.down.conn.trace_sampling = sampling
    _, down = p.request(list(headers))
    req = Request(down, SimpleNamespace(name="r"), down.t_open_ns, listener)
    req.subset = SimpleNamespace(cluster_name="backend")
    req.endpoint = SimpleNamespace(address="10.0.0.9:50051")
    up = p.up.conn.open_forward(down)
    req.up = up
    p.pump()
    seen = dict(p.server_request().headers)
    p.server.send_headers(up.id, GRPC_RESPONSE)
    p.server.send_data(up.id, b"\0\0\0\0\0")
    p.server.send_headers(up.id, [(b"grpc-status", grpc_status)], end_stream=True)
    p.pump()
    assert down.state == "closed"
    return req, seen


def exporting(node=None) -> tuple[Tracing, InMemorySpanExporter, SimpleNamespace]:
    w = worker(node)
    memory = InMemorySpanExporter()
    return Tracing(w, settings(), exporter=memory), memory, w


def test_without_export_the_core_ensures_a_traceparent():
    w = worker()
    t = Tracing(w, settings(sampling=0.25))
    assert t.mode == ENSURE and w.trace_mode == ENSURE and w.trace_sampling == 0.25
    assert w.on_complete == [] and not t.exporting
    t.close()  # nothing to do


def test_export_makes_the_proxy_span_the_parent_upstream():
    t, memory, w = exporting()
    assert t.mode == ENSURE_CHILD and w.trace_mode == ENSURE_CHILD and w.on_complete == [t.export]
    headers = [*GRPC, (b"traceparent", f"00-{TRACE_ID}-{PARENT}-01".encode()), (b"x-request-id", b"rid-7")]
    req, seen = completed(ENSURE_CHILD, headers)
    before = time.time_ns()
    t.export(req)
    t.close()
    [span] = memory.get_finished_spans()
    ctx = span.context
    assert f"{ctx.trace_id:032x}" == TRACE_ID and ctx.trace_flags.sampled
    # The span the backend sees as its parent is the one exported; its own parent is the client's.
    version, trace_id, parent_id, flags = seen[b"traceparent"].decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert f"{ctx.span_id:016x}" == parent_id != PARENT
    assert f"{span.parent.span_id:016x}" == PARENT and span.parent.is_remote
    assert span.name == "pkg.Svc/Call" and span.kind == SpanKind.CLIENT
    assert span.start_time <= span.end_time <= before + 1_000_000_000
    assert span.end_time - span.start_time >= 0
    attrs = dict(span.attributes)
    assert attrs["http.method"] == "POST" and attrs["http.status_code"] == 200
    assert attrs["rpc.grpc.status_code"] == 0 and attrs["rpc.system"] == "grpc"
    assert attrs["upstream_cluster"] == "backend" and attrs["upstream_address"] == "10.0.0.9:50051"
    assert attrs["response_flags"] == "-" and attrs["guid:x-request-id"] == "rid-7"
    assert span.status.status_code == StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "meshproxy"
    assert w.on_complete == []  # closed: the hook is gone


def test_a_trace_the_proxy_starts_has_no_parent():
    t, memory, _ = exporting()
    req, seen = completed(ENSURE_CHILD)
    t.export(req)
    t.close()
    [span] = memory.get_finished_spans()
    _, trace_id, parent_id, _ = seen[b"traceparent"].decode().split("-")
    assert f"{span.context.trace_id:032x}" == trace_id and f"{span.context.span_id:016x}" == parent_id
    assert span.parent is None


def test_inbound_requests_are_server_spans_and_failures_errors():
    t, memory, _ = exporting()
    req, _ = completed(ENSURE_CHILD, listener="inbound", grpc_status=b"14")
    t.export(req)
    t.close()
    [span] = memory.get_finished_spans()
    assert span.kind == SpanKind.SERVER and span.status.status_code == StatusCode.ERROR
    assert span.attributes["rpc.grpc.status_code"] == 14


def test_unsampled_requests_give_no_span():
    t, memory, _ = exporting()
    headers = [*GRPC, (b"traceparent", f"00-{TRACE_ID}-{PARENT}-00".encode())]
    req, seen = completed(ENSURE_CHILD, headers)
    assert seen[b"traceparent"].endswith(b"-00")
    t.export(req)
    req2, seen2 = completed(ENSURE_CHILD, sampling=0.0)
    assert seen2[b"traceparent"].endswith(b"-00")
    t.export(req2)
    t.close()
    assert memory.get_finished_spans() == () and t.exported == 0


def test_plain_requests_are_named_by_authority_and_path():
    t, memory, _ = exporting()
    req, _ = completed(ENSURE_CHILD, [*REQUEST[:2], (b":path", b"/items/7?q=secret"), (b":authority", b"shop")])
    t.export(req)
    t.close()
    [span] = memory.get_finished_spans()
    assert span.name == "shop/items/7" and "rpc.grpc.status_code" not in span.attributes
    assert span.attributes["http.method"] == "GET"


def test_the_service_name_follows_the_node():
    node = SimpleNamespace(workload="reviews", namespace="shop", id="reviews-1")
    t, memory, w = exporting(node)
    req, _ = completed(ENSURE_CHILD)
    t.export(req)
    # A new config with another node (what worker.on_config hooks receive: a Runtime).
    other = SimpleNamespace(workload="ratings", namespace="shop", id="ratings-1")
    config = SimpleNamespace(node=other, HasField=lambda name: name == "node")
    for hook in w.on_config:
        hook(SimpleNamespace(config=config))
    t.export(completed(ENSURE_CHILD)[0])
    t.close()
    first, second = memory.get_finished_spans()
    assert first.resource.attributes["service.name"] == "reviews.shop"
    assert first.resource.attributes["service.instance.id"] == "reviews-1"
    assert second.resource.attributes["service.name"] == "ratings.shop"


@pytest.mark.parametrize(
    ("is_grpc", "authority", "path", "name"),
    [
        (True, b"svc:50051", b"/pkg.Svc/Method", "pkg.Svc/Method"),
        (False, b"svc", b"/a/b?x=1", "svc/a/b"),
        (False, None, None, ""),
        (False, b"h", "/caf\u00e9".encode(), "h/caf\u00e9"),
    ],
)
def test_span_names(is_grpc, authority, path, name):
    assert span_name(is_grpc, authority, path) == name


def test_without_the_sdk_one_clear_error(monkeypatch):
    def missing():
        raise ImportError("No module named 'opentelemetry'")

    monkeypatch.setattr(tracing, "_sdk", missing)
    with pytest.raises(TracingUnavailable, match=r"^--otlp-endpoint needs the 'tracing' extra \(pip install"):
        Tracing(worker(), settings("http://127.0.0.1:4318/v1/traces"))
    with pytest.raises(TracingUnavailable, match="No module named 'opentelemetry'"):
        tracing.check_available()
    # Without an endpoint the SDK is never needed.
    assert Tracing(worker(), settings()).mode == ENSURE


def test_check_available_with_the_sdk():
    tracing.check_available()
