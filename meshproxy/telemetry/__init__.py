"""Telemetry: what the sidecar tells operators about the traffic it carries.

- ``stats`` (compiled, with its pure-Python twin ``stats_py``): the request
  and TCP counters and histograms, kept in C and recorded with one call per
  request;
- ``labels`` and ``metrics``: Istio's standard labels, worked out once per
  config, and the Prometheus exposition on ``--metrics`` (read at scrape
  time: nothing calls prometheus-client per request);
- ``accesslog``: JSON lines, buffered, sampled or off;
- ``tracing``: ``traceparent`` ensured by the core, optional OTLP span export.

``Settings`` is what the command line says about all of it; ``install``
puts the per-request hooks on a worker (its ``on_complete`` list).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshproxy.worker import Worker

__all__ = ["METRIC_NAME_STYLES", "Settings", "close", "install"]

#: ``--metric-names``: our own family names, or Istio's (so that existing dashboards and Kiali work).
METRIC_NAME_STYLES = ("meshproxy", "istio")


@dataclass
class Settings:
    """The sidecar's telemetry settings (``meshproxy run`` flags)."""

    #: Record request and TCP metrics (``--metrics off``: nothing is recorded, nothing served).
    metrics: bool = True
    metric_names: str = "meshproxy"
    #: "stdout", a file path, or None (off).
    access_log: str | None = None
    #: The share of successful requests logged (failures always are).
    access_log_sampling: float = 1.0
    #: The share of the traces the sidecar starts that are marked sampled (meshproxy.telemetry.tracing).
    trace_sampling: float = 1.0
    #: OTLP/HTTP traces endpoint (e.g. http://127.0.0.1:4318/v1/traces), or None: no spans exported.
    otlp_endpoint: str | None = None


def install(worker: Worker, settings: Settings) -> None:
    """Put the telemetry hooks on ``worker``: metrics recording, the access log, tracing."""
    if settings.metrics:
        from meshproxy.telemetry import metrics

        worker.recorder = metrics.Recorder(worker, settings)
        worker.on_complete.append(worker.recorder.record)
    if settings.access_log:
        from meshproxy.telemetry import accesslog

        worker.access_log = accesslog.AccessLog(settings)
        worker.on_complete.append(worker.access_log.log)
    from meshproxy.telemetry import tracing

    # Tracing sets the core's trace mode, and puts its own span-export hook on worker.on_complete
    # (only with --otlp-endpoint).
    worker.tracing = tracing.Tracing(worker, settings)


def close(worker: Worker) -> None:
    """After the worker stopped: write the access log lines and send the spans still queued (the
    workers end with os._exit, which runs no atexit and no finalizer)."""
    for part in (worker.access_log, worker.tracing):
        if part is not None:
            part.close()
