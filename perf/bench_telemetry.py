"""Measure the sidecar's CPU per request with telemetry off, metrics on, metrics + access log, and span export.

Sidecars run side by side from one ``--config`` file (``perf/bench_retry.py``'s
``off`` config: one listener, one route, one cluster with one endpoint, no
resilience settings), identical but for their telemetry flags (``CONFIGS``):

* ``off``: ``--metrics off --access-log off``: nothing recorded, nothing served;
* ``metrics``: ``--metrics ADDR`` (the default state of a sidecar): the
  request, route and TCP counters and histograms recorded in C, once per
  request; nobody scrapes during the runs (a scrape every 15 s costs per
  scrape, not per request);
* ``log``: ``metrics`` plus ``--access-log FILE``: a JSON line per request,
  appended to a regular file in the run's temporary directory (page cache:
  the kernel copies every byte, as it would into a container's stdout pipe);
  ``--access-log-path /dev/null`` measures the formatting alone;
* ``otlp``: ``metrics`` plus ``--otlp-endpoint`` (``--trace-sampling 1``): a
  span per request exported with opentelemetry-sdk's OTLP/HTTP exporter to
  a sink in this script (on the client CPU) that counts the spans it decodes.
  The SDK exports a partial batch up to its schedule delay (5 s) later, so
  after ``otlp``'s warm-up, and after its measured run but before the CPU
  sample that ends it, the script waits until no export came for that long:
  the warm-up's spans stay out of the run, and the run pays for all of its own.

Each config is checked to be doing what it claims, after its runs: ``off``
serves no ``/metrics``; the others' ``meshproxy_requests_total`` must count at
least the requests measured; ``log`` must have written at least one line per
measured request (its bytes per request are reported); ``otlp``'s exported
spans per request are reported (below 1 when the SDK's queue dropped spans,
in which case its CPU figure is a floor). A config that fails its check is
reported as failed, never as cheap.

The workload, backend, pinning, CPU accounting, shapes and shared options are
``perf/bench_proxy.py``'s, the paced shape (``--rate``) ``perf/bench_retry.py``'s
(both imported, not copied): a gRPC-shaped unary call (POST
``/helloworld.Greeter/SayHello``, a 5-byte-prefixed 100-byte message each way,
``grpc-status: 0`` trailer) driven by ``h2load`` against ``nghttpd``; every
sidecar on one CPU (``--proxy-cpu``, 1), h2load, the backend, this script and
the OTLP sink on the other (``--client-cpu``, 0). The sidecar's CPU is its whole
process tree's kernel CPU clock over exactly the measured run (the exporter's
thread included) divided by the requests done. At ``c32m16`` the sidecar
saturates its core, and a costlier config also batches less per wake-up, which
adds to its CPU per request; ``c32m16-paced`` (``--rate N``, below every
config's throughput) holds all configs to the same request rate, so the
difference is the per-request cost alone; ``c1m1`` is one request at a time.

Runs are interleaved: each repetition measures every config at each shape, the
order rotated from one repetition to the next so that each config takes each
place alike and a drift of the machine falls on all. Reported per shape: each
config's median CPU µs/request over ``--repeat`` runs (default 5), and its
ratio to ``off`` as the median of the per-repetition ratios (each against
``off``'s run of the same repetition and shape), with its min and max over the
repetitions: a spread wider than a difference means that difference is within
the noise. The issue's target applies to ``metrics`` (``<= 1.05``); the others'
costs are reported.

Usage::

    .venv/bin/python perf/bench_telemetry.py                   # 5 repetitions, c32m16 and c1m1, ~8 min
    .venv/bin/python perf/bench_telemetry.py --rate 8000       # plus c32m16 paced at 8,000 req/s in all
    .venv/bin/python perf/bench_telemetry.py --nice -10        # shielded from other work on the machine (root)
    .venv/bin/python perf/bench_telemetry.py --configs off,metrics --shapes c32m16 --repeat 9
    .venv/bin/python perf/bench_telemetry.py --quick --json -  # smoke run, ~1 min, JSON on stdout

Results go to ``perf/results/bench_telemetry.{json,md}`` unless ``--json`` or
``--md`` say otherwise. Exit status: 0 when every config was measured at every
shape without errors and passed its check (whatever the ratios), 3 when a
sidecar failed, a run saw errors or a check failed (the report is still
written), 2 when a tool is missing or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import platform
import shlex
import socket
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# perf/ is not a package: the sibling scripts are imported as modules.
import bench_proxy as bp
import bench_retry as br

CONFIGS = ("off", "metrics", "log", "otlp")
#: What each config adds to ``meshproxy run``; ``{metrics}``, ``{log}`` and ``{otlp}`` are filled per run.
FLAGS = {
    "off": ("--metrics", "off", "--access-log", "off"),
    "metrics": ("--metrics", "{metrics}", "--access-log", "off"),
    "log": ("--metrics", "{metrics}", "--access-log", "{log}"),
    "otlp": ("--metrics", "{metrics}", "--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sampling", "1"),
}
DESCRIPTION = {
    "off": "no metrics recorded or served, no access log",
    "metrics": "request, route and TCP metrics recorded; /metrics served (not scraped during the runs)",
    "log": "metrics, plus a JSON access-log line per request appended to a file",
    "otlp": "metrics, plus a span per request exported over OTLP/HTTP (sampling 1) to a local sink",
}
#: The issue's budget for metrics; the other configs' costs are reported without one.
TARGETS = {"metrics": br.TARGET}
WORKLOAD = br.WORKLOAD
#: BatchSpanProcessor's schedule delay (OTEL_BSP_SCHEDULE_DELAY, ms; the SDK's default 5 s): spans
#: queued below a full batch wait this long to be exported.
BSP_SCHEDULE_DELAY_S = float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY") or 5000) / 1000
PACED = br.PACED


# --------------------------------------------------------------------------- the OTLP sink


class SpanSink:
    """An OTLP/HTTP traces endpoint on loopback that answers every export with 200 and counts the spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        message = trace_service_pb2.ExportTraceServiceRequest
        sink = self
        self.spans = 0
        self.exports = 0
        self.bad = 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the exporter's session reuses its connection

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    request = message.FromString(body)
                    n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                except Exception:  # a body we cannot decode is counted, not fatal to the bench
                    n, bad = 0, 1
                else:
                    bad = 0
                with sink.lock:
                    sink.spans += n
                    sink.exports += 1
                    sink.bad += bad
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return self.spans

    def wait_idle(self, quiet: float, timeout: float) -> None:
        """Return once no export arrived for ``quiet`` seconds (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        last, since = self.exports, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.exports != last:
                last, since = self.exports, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --------------------------------------------------------------------------- checks


def scrape_requests(port: int) -> float | None:
    """The sum of ``meshproxy_requests_total`` on the sidecar's /metrics, None if nothing answers there."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "meshproxy_requests_total":
                total += sample.value
    return total


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


# --------------------------------------------------------------------------- the run


class TelemetryBench(br.RetryBench):
    """bench_retry's Bench (paced shape included) with one sidecar row per telemetry config."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sink: SpanSink | None = None
        self.ports: dict[str, dict[str, int]] = {}
        self.log_paths: dict[str, Path] = {}
        self.spans_before = 0
        self.drain_s = 0.0
        #: Per config: requests sent through it (probes, warm-ups, measured runs) and what its check saw.
        self.sent: dict[str, int] = dict.fromkeys(self.args.proxies, 0)
        self.checks: dict[str, dict[str, Any]] = {name: {} for name in self.args.proxies}

    def log(self, message: str) -> None:
        if not self.args.silent:
            print(f"[bench_telemetry] {message}", file=sys.stderr, flush=True)

    def h2load(self, row: bp.Row, shape: str, count: int | None, **kw: Any) -> bp.Load:
        """bench_retry's h2load run; after ``otlp``'s warm-up and measured runs, wait until its exporter is idle."""
        measured = kw.get("log_file") is not None
        if measured and self.sink is not None:
            self.spans_before = self.sink.count()
        load = super().h2load(row, shape, count, **kw)
        self.sent[row.proxy] = self.sent.get(row.proxy, 0) + load.done
        if row.proxy == "otlp" and self.sink is not None and (measured or kw.get("duration_ms") is not None):
            # The SDK exports the spans still queued up to its schedule delay later. Drained after the
            # warm-up, they stay out of the measured run; drained before the CPU sample that ends it,
            # the run's own spans are all paid for inside it.
            started = time.monotonic()
            self.sink.wait_idle(BSP_SCHEDULE_DELAY_S + 0.5, timeout=BSP_SCHEDULE_DELAY_S * 4 + 5)
            self.drain_s = time.monotonic() - started
        return load

    def start_proxy(self, row: bp.Row, backend_port: int) -> None:
        """Start sidecar ``row.proxy`` (a telemetry config) from the common config file and its own flags."""
        port, admin, metrics = bp.free_ports(3)
        self.ports[row.proxy] = {"listen": port, "admin": admin, "metrics": metrics}
        path = self.tmp / f"sidecar-{row.proxy}.yaml"
        path.write_text(br.config_yaml("off", port, backend_port))
        log_path = (
            Path(self.args.access_log_path) if self.args.access_log_path else self.tmp / f"access-{row.proxy}.log"
        )
        self.log_paths[row.proxy] = log_path
        if row.proxy == "otlp" and self.sink is None:
            try:
                self.sink = SpanSink()
            except ImportError as exc:
                raise bp.RowFailed(f"the OTLP sink needs opentelemetry-proto ({exc})") from None
        fill = {"metrics": f"127.0.0.1:{metrics}", "log": str(log_path), "otlp": self.sink.url if self.sink else ""}
        flags = [f.format(**fill) for f in FLAGS[row.proxy]]
        cmd = [
            sys.executable, "-m", "meshproxy", "run", "--config", str(path), "--admin", f"127.0.0.1:{admin}",
            *flags, *shlex.split(self.args.meshproxy_args),
        ]  # fmt: skip
        self.launch(row, cmd, port)

    def log_size(self, name: str) -> int:
        path = self.log_paths.get(name)
        if name != "log" or path is None or not path.is_file():
            return 0
        return path.stat().st_size

    def measure(self, row: bp.Row, shape: str, backend: Any) -> dict[str, Any]:
        """bench_proxy's measurement, plus what the config's telemetry produced during the measured run."""
        self.drain_s = 0.0
        if row.proxy == "log" and self.log_paths["log"].is_file() and not self.args.access_log_path:
            # O_APPEND: the sidecar's next write lands at the new end; the file stays bounded in size.
            self.log_paths["log"].write_bytes(b"")
        result = super().measure(row, shape, backend)
        done = result["requests"] or 0
        if row.proxy == "log":
            size = self.log_size("log")
            # Lines of the warm-up are in the file too: bytes per request over both.
            total = done + result["warmup_requests"]
            result["log_bytes_per_req"] = size / total if total and size else None
        if row.proxy == "otlp" and self.sink is not None:
            result["spans_per_req"] = (self.sink.count() - self.spans_before) / done if done else None
            # The CPU window ran on through the drain: what else ran on the sidecar's CPU is over that time.
            result["drain_s"] = self.drain_s
            wall = result["wall_s"]
            for key in ("proxy_core_other", "proxy_core_steal"):
                if result.get(key) is not None and wall:
                    result[key] *= wall / (wall + self.drain_s)
        return result

    def check(self, row: bp.Row) -> None:
        """Does the config do what it says? Its failure marks the row failed, never cheap."""
        name, info = row.proxy, self.checks[row.proxy]
        metrics_port = self.ports.get(name, {}).get("metrics")
        measured = sum(r["requests"] for k, runs in self.results.items() if k[2] == name for r in runs)
        info["requests_sent"] = self.sent.get(name, 0)
        info["requests_measured"] = measured
        problems = []
        if metrics_port is not None:
            counted = scrape_requests(metrics_port)
            info["metrics_requests_total"] = counted
            if name == "off":
                if counted is not None or listening(metrics_port):
                    problems.append("off serves /metrics")
            elif counted is None:
                problems.append("no /metrics answer")
            elif counted < measured:
                problems.append(f"meshproxy_requests_total {counted:,.0f} < {measured:,} requests measured")
        if name == "log":
            rates = [r.get("log_bytes_per_req") for k, runs in self.results.items() if k[2] == name for r in runs]
            if not self.args.access_log_path and (not rates or not all(rates)):
                problems.append("the access log stayed empty in a measured run")
            elif not self.args.access_log_path:
                # An access-log line is far over 100 bytes: below that, some requests were not logged.
                if min(rates) < 100:
                    problems.append(f"{min(rates):.0f} access-log bytes per request: requests not logged")
        if name == "otlp":
            if self.sink is None or self.sink.count() == 0:
                problems.append("no span reached the OTLP sink")
            else:
                info["spans_received"] = self.sink.count()
                info["exports"] = self.sink.exports
                info["undecodable_exports"] = self.sink.bad
        info["ok"] = not problems
        info["problems"] = problems
        if problems:
            row.error = row.error or "check: " + "; ".join(problems)
            self.log(f"sidecar {name} failed its check: {'; '.join(problems)}")

    def run(self) -> None:
        workload = next(w for w in bp.workloads(self.tmp) if w.name == WORKLOAD)
        backend, backend_port = self.start_backend(workload)
        rows = [bp.Row(name, workload) for name in self.args.proxies]
        try:
            self.start_rows(rows, backend_port)
            for rep in range(self.args.repeat):
                # Rotate the order: each config takes each place in turn.
                k = rep % len(rows)
                order = rows[k:] + rows[:k]
                for shape in self.args.shapes:
                    for row in order:
                        if row.error:
                            continue
                        result = self.measure_row(row, shape, backend, rep)
                        if result is None:
                            continue
                        result["repetition"] = rep + 1
                        cpu = result["cpu_us_per_req"]
                        self.log(
                            f"{shape} {row.proxy} ({rep + 1}/{self.args.repeat}): {result['requests']:,} requests, "
                            f"{result['rps']:,.0f} req/s, CPU {'-' if cpu is None else f'{cpu:.2f} us'}/req, "
                            f"errors {result['errors'] + result['warmup_errors']}"
                        )
            for row in rows:
                if row.proc is not None and row.proc.poll() is None:
                    self.check(row)
        finally:
            if self.sink is not None:
                self.sink.close()
        self.stop_rows(rows, backend)

    def report(self) -> dict[str, Any]:
        args = self.args
        quick = 1 if args.quick else 0
        rows, comparison = [], []
        for shape in args.shapes:
            by_config: dict[str, dict[str, Any]] = {}
            for name in args.proxies:
                row = self.summary((WORKLOAD, shape, name), {"config": name, "shape": shape})
                for key in ("log_bytes_per_req", "spans_per_req"):
                    values = [r[key] for r in row["runs"] if r.get(key) is not None]
                    row[key] = statistics.median(values) if values else None
                rows.append(row)
                by_config[name] = row
            for name in args.proxies:
                if name == "off":
                    continue
                c = br.compare(shape, by_config["off"], by_config[name])
                target = TARGETS.get(name)
                comparison.append({
                    "shape": shape, "config": name,
                    "off_cpu_us_per_req": c["off_cpu_us_per_req"], "cpu_us_per_req": c["on_cpu_us_per_req"],
                    "extra_cpu_us_per_req": (c["on_cpu_us_per_req"] - c["off_cpu_us_per_req"])
                    if c["on_cpu_us_per_req"] is not None and c["off_cpu_us_per_req"] is not None else None,
                    "ratios": c["ratios"], "ratio": c["ratio"], "ratio_min": c["ratio_min"],
                    "ratio_max": c["ratio_max"], "ratio_of_medians": c["ratio_of_medians"], "target": target,
                    "within_target": (c["ratio"] <= target) if target and c["ratio"] is not None else None,
                })  # fmt: skip
        return {
            "bench": "bench_telemetry",
            "quick": args.quick,
            "repeat": args.repeat,
            "configs": args.proxies,
            "workload": WORKLOAD,
            "shapes": {
                s: {
                    "connections": bp.SHAPES[s][0],
                    "streams": bp.SHAPES[s][1],
                    "requests": (args.requests if s != "c1m1" else args.latency_requests) or bp.REQUESTS[s][quick],
                    "rate_rps": args.rate if s == PACED else None,
                }
                for s in args.shapes
            },
            "warmup_s": args.warmup,
            "max_run_seconds": args.max_run_seconds,
            "pinning": bp.pinning(args),
            "backend": {
                "program": bp.BACKEND_PROGRAM,
                "request": f"POST {bp.GRPC_PATH}: {len(bp.grpc_message())}-byte prefixed message in and out, "
                "grpc-status: 0 trailer",
            },
            "sidecar_config": "perf/bench_retry.py's off config: one route (prefix /) to one cluster with one "
            "endpoint, no resilience settings",
            "flags": {
                name: " ".join(FLAGS[name]).format(metrics="127.0.0.1:PORT", log="FILE", otlp="URL")
                for name in args.proxies
            },
            "descriptions": {name: DESCRIPTION[name] for name in args.proxies},
            "access_log_path": args.access_log_path or "a regular file in the run's temporary directory",
            "meshproxy_args": args.meshproxy_args,
            "extensions": extensions(),
            "git": br.git_state(),
            "versions": self.tools.versions,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpu_measure": "sidecar process-tree CPU clock (ns) over the measured run / requests done "
            "(threads included: the span exporter's); cpu_us_per_req_procstat: the same from /proc/PID/stat ticks",
            "comparison": comparison,
            "checks": self.checks,
            "rows": rows,
            "rss_idle_kib": {name: self.proxy_info[name].get("rss_idle_kib") for name in args.proxies},
            "rss_after_load_kib": {name: self.proxy_info[name].get("rss_after_load_kib") for name in args.proxies},
        }


def extensions() -> dict[str, Any]:
    """Whether the sidecar ran compiled: a run on the pure-Python twins measures something else."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        from meshproxy.conn import USING_EXTENSIONS

        out["conn"] = bool(USING_EXTENSIONS)
    with contextlib.suppress(Exception):
        from meshproxy.telemetry import stats

        out["stats"] = bool(stats.using_extensions)
    return out


# --------------------------------------------------------------------------- output


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, the ratios to off, each config's figures, the checks."""
    pin = report["pinning"]
    fmt, pct = bp.fmt, bp.pct
    lines = [
        "# Telemetry cost: sidecar CPU per gRPC request, each config / `off`",
        "",
        f"All sidecars pinned to CPU {pin['proxy_cpu']}; h2load (one thread), the nghttpd backend, the driver and "
        f"the OTLP sink on CPU {pin['client_cpu']} ({pin['cpus']} CPUs)"
        + (f", all at nice {pin['nice']}" if pin.get("nice") else "")
        + ". "
        + "; ".join(
            f"{s}: {c['connections']} connection(s) x {c['streams']} stream(s)"
            + (f" paced at {c['rate_rps']:,} req/s" if c.get("rate_rps") else "")
            + f", up to {c['requests']:,} requests"
            for s, c in report["shapes"].items()
        )
        + f" (cut to ~{report['max_run_seconds']:g} s at the warm-up's rate), each after {report['warmup_s']:g} s "
        f"of warm-up. {report['repeat']} repetition(s), every config in each, the order rotated."
        + (" **QUICK mode: smoke figures only.**" if report["quick"] else ""),
        "",
        f"Request: {report['backend']['request']}. Backend: {report['backend']['program']}. "
        f"Sidecar: {report['sidecar_config']}; compiled: {report['extensions'] or 'unknown'}.",
        "",
        f"| shape | config | off CPU µs/req | config CPU µs/req | extra µs/req | config / off "
        f"| min to max over {report['repeat']} run(s) | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in report["comparison"]:
        if c["ratio"] is None:
            verdict = "not measured"
        elif c["target"] is None:
            verdict = "reported"
        else:
            verdict = f"≤ {c['target']:.2f}: " + ("yes" if c["within_target"] else "no")
            if c["ratio_min"] <= c["target"] < c["ratio_max"]:
                verdict += " (spread straddles it)"
        lines.append(
            f"| {c['shape']} | {c['config']} | {fmt(c['off_cpu_us_per_req'], '.2f')} "
            f"| {fmt(c['cpu_us_per_req'], '.2f')} | {fmt(c['extra_cpu_us_per_req'], '+.2f')} "
            f"| {fmt(c['ratio'], '.3f')} | {fmt(c['ratio_min'], '.3f')} to {fmt(c['ratio_max'], '.3f')} | {verdict} |"
        )
    lines += [
        "",
        "CPU µs/req: the sidecar's median over the runs; config / off: the median of the per-repetition ratios "
        "(each against off's run in the same repetition), min to max its spread.",
        "",
        "| shape | config | req/s | p50 µs | p99 µs | CPU µs/req | CPU µs/req (/proc ticks) | sidecar core "
        "| others on sidecar CPU | client core | log bytes/req | spans/req | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        head = f"| {r['shape']} | {r['config']} "
        if r["status"] != "ok":
            lines.append(head + "| FAILED |" + " |" * 10)
            continue
        other = bp.others_on_proxy_cpu(r)
        lines.append(
            head + f"| {fmt(r['rps'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['cpu_us_per_req'], '.2f')} "
            f"| {fmt(r['cpu_us_per_req_procstat'], '.1f')} | {pct(r['proxy_core_util'])} | {pct(other)} "
            f"| {pct(r['client_core_util'])} | {fmt(r.get('log_bytes_per_req'))} "
            f"| {fmt(r.get('spans_per_req'), '.2f')} "
            f"| {r['errors'] + r['warmup_errors']} |"
        )
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed:", ""]
        for error in dict.fromkeys(f"{r['config']}: {r['error']}" for r in failed):
            lines.append(f"- {error}")
    lines += ["", "Configs (flags added to `meshproxy run --config FILE --admin ADDR`) and their checks:", ""]
    for name in report["configs"]:
        check = report["checks"].get(name, {})
        seen = ", ".join(f"{k} {v:,.0f}" if isinstance(v, int | float) and not isinstance(v, bool) else f"{k} {v}"
                         for k, v in check.items() if k not in ("ok", "problems"))  # fmt: skip
        status = "passed" if check.get("ok") else "FAILED: " + "; ".join(check.get("problems", ["not checked"]))
        rss = report["rss_idle_kib"].get(name)
        lines.append(
            f"- `{name}`: {report['descriptions'][name]} (`{report['flags'][name]}`); check {status} ({seen}); "
            f"idle RSS {fmt(rss and rss / 1024, '.1f')} MiB."
        )
    lines += [
        "",
        f"Access log: {report['access_log_path']}. Columns: *sidecar core*, its CPU time over the run's wall time; "
        "*others on sidecar CPU*, what else was busy on that CPU or stolen by the hypervisor (large values make the "
        "row suspect); *client core*, h2load + backend CPU over wall time; *log bytes/req*, the access log's growth "
        "over warm-up and run per request; *spans/req*, spans the sink decoded per measured request (below 1: the "
        "SDK dropped spans, so that row's CPU is a floor; otlp's CPU window runs on until the exporter has sent the "
        "run's last spans, with the sidecar otherwise idle); *errors*, failed + errored + timed out + non-2xx.",
        f"CPU: {report['cpu_measure']}.",
        br.versions_line(report),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


BENCH_TELEMETRY = bp.Script(
    "bench_telemetry",
    row="config",
    proxy="sidecar",
    proxies="sidecars",
    proxy_cpu="the sidecars",
    repeat=(5, 2),
    bench=TelemetryBench,
    markdown=markdown,
    idle_wait=(1.0, 0.2),
    bare_json=True,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the request counts and repetitions for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma separated, off first (default {CONFIGS})")
    p.add_argument("--shapes", default=",".join(bp.SHAPES), help="c32m16,c1m1 (default both)")
    p.add_argument(
        "--rate",
        type=int,
        help=f"also run shape {PACED}: c32m16 held by h2load to this many requests/s in all, below what every "
        "config sustains (default: not run)",
    )
    p.add_argument(
        "--access-log-path",
        help="where config log writes (e.g. /dev/null: the formatting alone); default a file in the temporary "
        "directory, emptied before each measured run",
    )
    bp.add_run_options(p, BENCH_TELEMETRY)
    args = p.parse_args(argv)
    args.proxies = [x for x in args.configs.split(",") if x]
    if not args.proxies or args.proxies[0] != "off" or set(args.proxies) - set(CONFIGS):
        p.error(f"--configs takes off and a comma-separated subset of {','.join(CONFIGS[1:])}")
    if len(set(args.proxies)) != len(args.proxies):
        p.error("--configs names each config once")
    args.shapes = [x for x in args.shapes.split(",") if x]
    if not args.shapes or set(args.shapes) - set(bp.SHAPES) or len(set(args.shapes)) != len(args.shapes):
        p.error(f"--shapes takes a comma-separated subset of {','.join(bp.SHAPES)}")
    if args.rate is not None:
        if not 32 <= args.rate <= 10_000_000:
            p.error("--rate takes 32-10,000,000 requests/s")
        args.shapes.append(PACED)
        bp.SHAPES.setdefault(PACED, bp.SHAPES["c32m16"])
        bp.REQUESTS.setdefault(PACED, bp.REQUESTS["c32m16"])
    bp.check_run_options(p, args, BENCH_TELEMETRY)
    if not 0 <= args.idle_wait <= 60:
        p.error("--idle-wait takes 0-60 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, print the Markdown table, write the reports; return the exit status."""
    return bp.run_script(BENCH_TELEMETRY, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
