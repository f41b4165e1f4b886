"""Tracing: the trace headers the core ensures, and the optional OTLP span export.

The headers are the compiled core's work (``conn.trace_mode``, set on each
downstream connection from ``worker.trace_mode``): in mode 1 a request
forwarded without a W3C ``traceparent`` gets one (its trace id taken from
``x-b3-traceid`` when there is one), sampled with ``--trace-sampling``; in
mode 2 the proxy also makes its own span the parent of what it sends
upstream. ``tracestate`` and the B3 headers always pass unchanged, as do
``x-request-id`` values the client sent. ``Tracing`` picks the mode: 1, or
2 when spans are exported (an exported span is only useful as a parent).

With ``--otlp-endpoint`` every sampled request becomes one span, exported
with opentelemetry-sdk's ``BatchSpanProcessor`` and OTLP/HTTP (protobuf)
exporter, off the event loop in the processor's thread. The span is built
from what the core recorded on the downstream stream (trace id, the proxy's
span id, the incoming parent, open time) directly as a ``ReadableSpan``
handed to the processor: going through a ``Tracer`` would cost a context,
a span object and its locks per request for the same result. Kind: CLIENT
for a request leaving the pod (Istio's reporter=source), SERVER on the
inbound listener. The SDK is the optional ``tracing`` extra; without it
``--otlp-endpoint`` is refused with one line (``TracingUnavailable``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from meshproxy import __version__
from meshproxy.conn import h2conn as h2
from meshproxy.telemetry.accesslog import is_failure
from meshproxy.transparent import INBOUND_LISTENER

if TYPE_CHECKING:
    from meshproxy.downstream import Request
    from meshproxy.worker import Runtime, Worker

__all__ = ["ENSURE", "ENSURE_CHILD", "OFF", "Tracing", "TracingUnavailable", "check_available", "span_name"]

#: ``conn.trace_mode``: pass trace headers through untouched; add a traceparent when absent;
#: also make the proxy's span the parent of the request sent upstream.
OFF, ENSURE, ENSURE_CHILD = 0, 1, 2

EXTRA_HINT = "pip install 'meshproxy[tracing]'"

now_ns = h2.monotonic_ns


class TracingUnavailable(RuntimeError):
    """``--otlp-endpoint`` without the ``tracing`` extra installed (one line, for the CLI)."""

    def __init__(self, cause: ImportError) -> None:
        super().__init__(f"--otlp-endpoint needs the 'tracing' extra ({EXTRA_HINT}): {cause}")


def check_available() -> None:
    """Raise TracingUnavailable when the OTLP exporter cannot be imported (the CLI may call it
    before any worker starts)."""
    try:
        _sdk()
    except ImportError as e:
        raise TracingUnavailable(e) from None


def _sdk() -> Any:
    """The opentelemetry names the export uses (ImportError without the ``tracing`` extra)."""
    from types import SimpleNamespace

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    return SimpleNamespace(
        OTLPSpanExporter=OTLPSpanExporter,
        Resource=Resource,
        ReadableSpan=ReadableSpan,
        BatchSpanProcessor=BatchSpanProcessor,
        InstrumentationScope=InstrumentationScope,
        SpanContext=SpanContext,
        SpanKind=SpanKind,
        Status=Status,
        StatusCode=StatusCode,
        TraceFlags=TraceFlags,
    )


def span_name(is_grpc: bool, authority: bytes | None, path: bytes | None) -> str:
    """A request's span name: ``package.Service/Method`` for gRPC, else ``authority/path`` without
    the query (names are grouped on; a query would make each one unique)."""
    p = (path or b"").split(b"?", 1)[0].decode("utf-8", "replace")
    if is_grpc and p.startswith("/"):
        return p[1:]
    return (authority or b"").decode("utf-8", "replace") + p


class Tracing:
    """Tracing for one worker: sets ``worker.trace_mode`` / ``worker.trace_sampling`` (applied to
    each downstream connection as it is accepted) and, when ``settings.otlp_endpoint`` is set (or
    an ``exporter`` is given: any opentelemetry ``SpanExporter``, for tests), puts its ``export``
    hook on ``worker.on_complete`` itself and keeps the span service name in step with the
    node (``worker.on_config``). ``close()`` sends the spans still queued."""

    def __init__(self, worker: Worker, settings: Any, exporter: Any = None) -> None:
        self.worker = worker
        endpoint = getattr(settings, "otlp_endpoint", None)
        self.exporting = bool(endpoint) or exporter is not None
        self.mode = ENSURE_CHILD if self.exporting else ENSURE
        self.sampling = float(getattr(settings, "trace_sampling", 1.0))
        worker.trace_mode = self.mode
        worker.trace_sampling = self.sampling
        self.exported = 0  # spans handed to the processor
        self._processor: Any = None
        if not self.exporting:
            return
        try:
            sdk = self._sdk = _sdk()
        except ImportError as e:
            raise TracingUnavailable(e) from None
        if exporter is None:
            exporter = sdk.OTLPSpanExporter(endpoint=endpoint)
        self._processor = sdk.BatchSpanProcessor(exporter)
        self._scope = sdk.InstrumentationScope("meshproxy", __version__)
        self._kinds = (sdk.SpanKind.CLIENT, sdk.SpanKind.SERVER)
        self._sampled = sdk.TraceFlags(sdk.TraceFlags.SAMPLED)
        self._error = sdk.Status(sdk.StatusCode.ERROR)
        self._unset = sdk.Status(sdk.StatusCode.UNSET)
        self._names: dict[tuple, str] = {}
        self._resource = self._resource_for(worker.node)
        worker.on_config.append(self._config)
        worker.on_complete.append(self.export)

    def _resource_for(self, node: Any) -> Any:
        # Istio names a proxy's spans "<workload>.<namespace>".
        attrs = {"service.name": "meshproxy"}
        if node is not None and node.workload:
            attrs["service.name"] = f"{node.workload}.{node.namespace}" if node.namespace else node.workload
            attrs["k8s.namespace.name"] = node.namespace
        if node is not None and node.id:
            attrs["service.instance.id"] = node.id
        return self._sdk.Resource.create(attrs)

    def _config(self, runtime: Runtime) -> None:
        self._resource = self._resource_for(runtime.config.node if runtime.config.HasField("node") else None)

    def export(self, req: Request) -> None:
        """The completion hook: one span for ``req`` when it was sampled."""
        down = req.down
        if not down.sampled or not down.span_id:
            return
        sdk = self._sdk
        end_wall = time.time_ns()
        end = now_ns()
        is_grpc = down.is_grpc
        key = (is_grpc, down.authority, down.path)
        name = self._names.get(key)
        if name is None:
            if len(self._names) >= 4096:
                self._names.clear()
            name = self._names[key] = span_name(*key)
        trace_id = int(down.trace_id, 16)
        flags = self._sampled
        parent = down.parent_span_id
        status, grpc = down.status, down.grpc_status
        response_flags = req.flags or down.response_flags or ""
        attributes: dict[str, Any] = {
            "http.method": (down.method or b"").decode("ascii", "replace"),
            "http.status_code": status,
            "response_flags": response_flags or "-",
        }
        if is_grpc:
            attributes["rpc.system"] = "grpc"
            if grpc >= 0:
                attributes["rpc.grpc.status_code"] = grpc
        if req.subset is not None:
            attributes["upstream_cluster"] = req.subset.cluster_name
        if req.endpoint is not None:
            attributes["upstream_address"] = req.endpoint.address
        if down.request_id:
            attributes["guid:x-request-id"] = down.request_id.decode("utf-8", "replace")
        span = sdk.ReadableSpan(
            name,
            context=sdk.SpanContext(trace_id, int(down.span_id, 16), False, flags),
            parent=sdk.SpanContext(trace_id, int(parent, 16), True, flags) if parent else None,
            resource=self._resource,
            attributes=attributes,
            kind=self._kinds[req.listener == INBOUND_LISTENER],
            instrumentation_scope=self._scope,
            status=self._error if is_failure(status, grpc, is_grpc, response_flags) else self._unset,
            start_time=end_wall - (end - down.t_open_ns),
            end_time=end_wall,
        )
        self._processor.on_end(span)
        self.exported += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Send the spans still queued (within ``timeout_s``) and stop the export thread."""
        if self._processor is None:
            return
        hooks = self.worker.on_complete
        if self.export in hooks:
            hooks.remove(self.export)
        self._processor.force_flush(int(timeout_s * 1000))
        self._processor.shutdown()
        self._processor = None
