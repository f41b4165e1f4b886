"""Measure the sidecar's CPU per request with retries configured but never used, against none (issue 5: <= 5%).

Two meshproxy sidecars run side by side, each from its own ``--config`` file
(the YAML form of ``meshproxy.v1.SidecarConfig``), identical but for:

* ``off``: one listener, one route (prefix ``/``) to one cluster with one
  endpoint, the backend; no ``retry_policy``, no circuit breakers, no outlier
  detection;
* ``on``: the same route with a retry policy every request carries and none
  uses (``RETRY_POLICY``: 2 retries, 5 s per try, on 5xx, reset,
  connect-failure, unavailable and cancelled, a 0.2 retry budget) and the
  same cluster with outlier detection (``consecutive_5xx: 5``) and circuit
  breakers far above the load (``OUTLIER_DETECTION``, ``CIRCUIT_BREAKERS``).
  The backend never fails, so nothing is retried, ejected or shed: what
  ``on`` costs more is the bookkeeping alone.

The workload, the backend, the pinning, the CPU accounting and the options
they share are ``perf/bench_proxy.py``'s (imported from it, not copied): the ``grpc`` workload,
a gRPC-shaped unary call (POST ``/helloworld.Greeter/SayHello``, ``content-type:
application/grpc``, ``te: trailers``, a 5-byte-prefixed 100-byte message each
way and a ``grpc-status: 0`` trailer) driven by ``h2load`` against ``nghttpd``;
both sidecars on one CPU (``--proxy-cpu``, 1), h2load, the backend and this
script on another (``--client-cpu``, 0); shapes ``c32m16`` (32 connections x 16
streams, throughput) and ``c1m1`` (one request at a time). With ``--rate N``, also
``c32m16-paced``: c32m16 held by h2load to N requests/s in all. At c32m16 the
sidecar saturates its core, and a slower config then also batches less per
wake-up, which adds to its CPU per request; paced below both configs'
throughput, both do the same work at the same batching, and the difference is
the per-request cost alone. Every measured run is preceded by an unmeasured
warm-up at the same shape; the sidecar's CPU is its whole process tree's kernel
CPU clock (ns) over exactly the measured run, divided by the requests done
(``/proc/PID/stat`` ticks beside it as a cross-check).

Runs are interleaved: each repetition measures ``off`` and ``on`` back to back
at each shape, in alternating order (off, on; then on, off; ...) so that a
drift of the machine falls on both alike. Reported per shape: each config's
median CPU µs/request over ``--repeat`` runs (default 5), and the ratio on/off
as the median of the per-repetition ratios (each from two adjacent runs), with
its min and max over the repetitions (the spread: if it is wider than the
5% margin, the verdict is within the noise), against the target ``<= 1.05``.

Usage::

    .venv/bin/python perf/bench_retry.py                     # 5 repetitions, both shapes, ~2 min
    .venv/bin/python perf/bench_retry.py --nice -10          # shielded from other work on the machine (root)
    .venv/bin/python perf/bench_retry.py --shapes c32m16 --repeat 9
    .venv/bin/python perf/bench_retry.py --rate 20000         # plus c32m16 paced at 20,000 req/s
    .venv/bin/python perf/bench_retry.py --quick --json -    # smoke run, ~10-20 s, JSON on stdout

Results go to ``perf/results/bench_retry.{json,md}`` unless ``--json`` or ``--md``
say otherwise (``--json -`` or a bare ``--json`` writes the JSON to stdout).
Exit status: 0 when both configs were measured at every shape without errors
(whatever the ratio), 3 when a sidecar failed or a run saw errors (the report is
still written), 2 when a tool is missing or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

# perf/ is not a package: the sibling script is imported as a module.
import bench_proxy as bp

REPO_ROOT = bp.REPO_ROOT
RESULTS = bp.RESULTS
CONFIGS = ("off", "on")
#: The optional paced shape (``--rate``): c32m16's connections and streams, h2load holding the request rate.
PACED = "c32m16-paced"
TARGET = 1.05
WORKLOAD = "grpc"

#: What ``on`` adds to the route and to the cluster (issue 5's "enabled but unused").
RETRY_POLICY: dict[str, Any] = {
    "num_retries": 2,
    "per_try_timeout": "5s",
    "retry_on": ["5xx", "reset", "connect-failure", "unavailable", "cancelled"],
    "budget": {"retry_ratio": 0.2},
}
OUTLIER_DETECTION: dict[str, Any] = {"consecutive_5xx": 5}
CIRCUIT_BREAKERS: dict[str, Any] = {"max_requests": 100000, "max_pending_requests": 100000, "max_retries": 1000}


def sidecar_config(name: str, port: int, upstream: int) -> dict[str, Any]:
    """Config ``name`` (``off`` or ``on``) as a dict: listen on ``port``, everything to the backend on ``upstream``."""
    route: dict[str, Any] = {"name": "all", "match": {"prefix": "/"}, "route": {"clusters": [{"cluster": "backend"}]}}
    cluster: dict[str, Any] = {"name": "backend", "endpoints": [{"address": f"127.0.0.1:{upstream}"}]}
    if name == "on":
        route["retry_policy"] = RETRY_POLICY
        cluster["outlier_detection"] = OUTLIER_DETECTION
        cluster["circuit_breakers"] = CIRCUIT_BREAKERS
    elif name != "off":
        raise ValueError(name)
    listener = {
        "name": "main",
        "address": f"127.0.0.1:{port}",
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
    }
    return {"version": f"bench-retry-{name}", "listeners": [listener], "clusters": [cluster]}


def config_yaml(name: str, port: int, upstream: int) -> str:
    return yaml.safe_dump(sidecar_config(name, port, upstream), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- the run


class RetryBench(bp.Bench):
    """bench_proxy's Bench with two meshproxy rows, ``off`` and ``on``, started from config files."""

    def log(self, message: str) -> None:
        if not self.args.silent:
            print(f"[bench_retry] {message}", file=sys.stderr, flush=True)

    def label(self, row: bp.Row) -> str:
        return f"sidecar {row.proxy}"

    def h2load(self, row: bp.Row, shape: str, count: int | None, **kw: Any) -> bp.Load:
        """bench_proxy's h2load run; at the paced shape, c32m16 with each connection held to its share of ``--rate``."""
        if shape != PACED:
            return super().h2load(row, shape, count, **kw)
        per_client = self.args.rate / bp.SHAPES["c32m16"][0]
        workload = dataclasses.replace(row.workload, h2load_args=(*row.workload.h2load_args, f"--rps={per_client:g}"))
        return super().h2load(dataclasses.replace(row, workload=workload), PACED, count, **kw)

    def run_size(self, shape: str, warmup: bp.Load) -> int:
        return super().run_size("c32m16" if shape == PACED else shape, warmup)

    def start_proxy(self, row: bp.Row, backend_port: int) -> None:
        """Start sidecar ``row.proxy`` (the config's name), check one request goes through, then read its idle RSS."""
        port, admin, metrics = bp.free_ports(3)
        path = self.tmp / f"sidecar-{row.proxy}.yaml"
        path.write_text(config_yaml(row.proxy, port, backend_port))
        cmd = [
            sys.executable, "-m", "meshproxy", "run", "--config", str(path),
            "--admin", f"127.0.0.1:{admin}", "--metrics", f"127.0.0.1:{metrics}",
            *shlex.split(self.args.meshproxy_args),
        ]  # fmt: skip
        self.launch(row, cmd, port)

    def run(self) -> None:
        workload = next(w for w in bp.workloads(self.tmp) if w.name == WORKLOAD)
        backend, backend_port = self.start_backend(workload)
        rows = [bp.Row(name, workload) for name in CONFIGS]
        self.start_rows(rows, backend_port)
        for rep in range(self.args.repeat):
            order = rows if rep % 2 == 0 else rows[::-1]
            for shape in self.args.shapes:
                for row in order:
                    if row.error:
                        continue
                    result = self.measure_row(row, shape, backend, rep)
                    if result is None:
                        continue
                    result["repetition"] = rep + 1  # the dict kept in the results
                    cpu = result["cpu_us_per_req"]
                    self.log(
                        f"{shape} {row.proxy} ({rep + 1}/{self.args.repeat}): {result['requests']:,} requests, "
                        f"{result['rps']:,.0f} req/s, CPU {'-' if cpu is None else f'{cpu:.2f} us'}/req, "
                        f"errors {result['errors'] + result['warmup_errors']}"
                    )
        self.stop_rows(rows, backend)

    def report(self) -> dict[str, Any]:
        args = self.args
        quick = 1 if args.quick else 0
        rows, comparison = [], []
        for shape in args.shapes:
            by_config: dict[str, dict[str, Any]] = {}
            for name in CONFIGS:
                row = self.summary((WORKLOAD, shape, name), {"config": name, "shape": shape})
                rows.append(row)
                by_config[name] = row
            comparison.append(compare(shape, by_config["off"], by_config["on"]))
        return {
            "bench": "bench_retry",
            "quick": args.quick,
            "repeat": args.repeat,
            "target": TARGET,
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
            "configs": {
                "off": "one route (prefix /) to one cluster with one endpoint; no retry_policy, "
                "no circuit_breakers, no outlier_detection",
                "on": "the same, plus the route's retry_policy and the cluster's outlier_detection and "
                "circuit_breakers",
                "retry_policy": RETRY_POLICY,
                "outlier_detection": OUTLIER_DETECTION,
                "circuit_breakers": CIRCUIT_BREAKERS,
            },
            "meshproxy_args": args.meshproxy_args,
            "git": git_state(),
            "versions": self.tools.versions,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpu_measure": "sidecar process-tree CPU clock (ns) over the measured run / requests done; "
            "cpu_us_per_req_procstat: the same from /proc/PID/stat utime+stime+cutime+cstime ticks",
            "comparison": comparison,
            "rows": rows,
            "rss_idle_kib": {name: self.proxy_info[name].get("rss_idle_kib") for name in CONFIGS},
            "rss_after_load_kib": {name: self.proxy_info[name].get("rss_after_load_kib") for name in CONFIGS},
        }


def compare(shape: str, off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """CPU per request of ``on`` over ``off`` at ``shape``: per repetition (adjacent runs), median, min, max."""
    out: dict[str, Any] = {
        "shape": shape,
        "off_cpu_us_per_req": off.get("cpu_us_per_req"),
        "on_cpu_us_per_req": on.get("cpu_us_per_req"),
        "ratios": [],
        "ratio": None,
        "ratio_min": None,
        "ratio_max": None,
        "ratio_of_medians": None,
        "within_target": None,
    }
    if off["status"] != "ok" or on["status"] != "ok":
        return out
    off_by_rep = {r["repetition"]: r["cpu_us_per_req"] for r in off["runs"]}
    ratios = [
        r["cpu_us_per_req"] / off_by_rep[r["repetition"]]
        for r in on["runs"]
        if r["cpu_us_per_req"] is not None and off_by_rep.get(r["repetition"])
    ]
    if ratios:
        out.update(ratios=ratios, ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        out["within_target"] = out["ratio"] <= TARGET
    if out["off_cpu_us_per_req"] and out["on_cpu_us_per_req"] is not None:
        out["ratio_of_medians"] = out["on_cpu_us_per_req"] / out["off_cpu_us_per_req"]
    return out


def versions_line(report: dict[str, Any]) -> str:
    """The report's last line: the tools', Python's, the kernel's and meshproxy's versions (commit, and
    whether the tree had uncommitted changes)."""
    return (
        "Versions: "
        + ", ".join(f"{k} {val}" for k, val in report["versions"].items())
        + f"; Python {report['python']}; Linux {report['kernel']}; meshproxy at "
        + f"{(report['git']['commit'] or 'unknown')[:12]}"
        + (" with uncommitted changes" if report["git"]["dirty"] else "")
        + "."
    )


def git_state() -> dict[str, Any]:
    """The checkout measured: its commit and whether the working tree had changes (the sidecar is run from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip()) if commit else None}


# --------------------------------------------------------------------------- output


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, the on/off table, each config's figures, the configs."""
    pin = report["pinning"]
    fmt, pct = bp.fmt, bp.pct
    lines = [
        "# Retries enabled but unused: sidecar CPU per gRPC request, `on` / `off`",
        "",
        f"Both sidecars pinned to CPU {pin['proxy_cpu']}; h2load (one thread), the nghttpd backend and the driver "
        f"on CPU {pin['client_cpu']} ({pin['cpus']} CPUs)"
        + (f", all at nice {pin['nice']}" if pin.get("nice") else "")
        + ". "
        + "; ".join(
            f"{s}: {c['connections']} connection(s) x {c['streams']} stream(s)"
            + (f" paced at {c['rate_rps']:,} req/s" if c.get("rate_rps") else "")
            + f", up to {c['requests']:,} requests"
            for s, c in report["shapes"].items()
        )
        + f" (cut to ~{report['max_run_seconds']:g} s at the warm-up's rate), each after {report['warmup_s']:g} s "
        f"of warm-up. {report['repeat']} repetition(s), off and on back to back in alternating order."
        + (" **QUICK mode: smoke figures only.**" if report["quick"] else ""),
        "",
        f"Request: {report['backend']['request']}. Backend: {report['backend']['program']}.",
        "",
        f"| shape | off CPU µs/req | on CPU µs/req | on / off | min to max over {report['repeat']} run(s) "
        f"| target | within |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in report["comparison"]:
        if c["ratio"] is None:
            verdict = "not measured"
        else:
            verdict = "yes" if c["within_target"] else "no"
            if c["ratio_min"] <= TARGET < c["ratio_max"]:
                verdict += " (spread straddles the target)"
        lines.append(
            f"| {c['shape']} | {fmt(c['off_cpu_us_per_req'], '.2f')} | {fmt(c['on_cpu_us_per_req'], '.2f')} "
            f"| {fmt(c['ratio'], '.3f')} | {fmt(c['ratio_min'], '.3f')} to {fmt(c['ratio_max'], '.3f')} "
            f"| ≤ {TARGET:.2f} | {verdict} |"
        )
    lines += [
        "",
        "CPU µs/req: the sidecar's median over the runs; on / off: the median of the per-repetition ratios "
        "(each from two adjacent runs), min to max its spread.",
        "",
        "| shape | config | req/s | p50 µs | p99 µs | CPU µs/req | CPU µs/req (/proc ticks) | sidecar core "
        "| others on sidecar CPU | client core | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        head = f"| {r['shape']} | {r['config']} "
        if r["status"] != "ok":
            lines.append(head + "| FAILED |" + " |" * 8)
            continue
        other = bp.others_on_proxy_cpu(r)
        lines.append(
            head + f"| {fmt(r['rps'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['cpu_us_per_req'], '.2f')} "
            f"| {fmt(r['cpu_us_per_req_procstat'], '.1f')} | {pct(r['proxy_core_util'])} | {pct(other)} "
            f"| {pct(r['client_core_util'])} | {r['errors'] + r['warmup_errors']} |"
        )
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed:", ""]
        for error in dict.fromkeys(f"{r['config']}: {r['error']}" for r in failed):
            lines.append(f"- {error}")
    cfg = report["configs"]
    rss = report["rss_idle_kib"]
    lines += [
        "",
        f"- `off`: {cfg['off']}.",
        f"- `on`: {cfg['on']}: `retry_policy: {flow(cfg['retry_policy'])}`, "
        f"`outlier_detection: {flow(cfg['outlier_detection'])}`, `circuit_breakers: {flow(cfg['circuit_breakers'])}`. "
        "The backend never fails: nothing is retried, ejected or shed.",
        "- Idle RSS of the sidecar's process tree: "
        + ", ".join(f"{name} {fmt(kib and kib / 1024, '.1f')} MiB" for name, kib in rss.items())
        + ".",
        "",
        "Columns: *sidecar core*, its CPU time over the run's wall time; *others on sidecar CPU*, what else was "
        "busy on that CPU or stolen by the hypervisor (large values make the row suspect); *client core*, h2load + "
        "backend CPU over wall time; *errors*, failed + errored + timed out + non-2xx, warm-up included.",
        f"CPU: {report['cpu_measure']}.",
        versions_line(report),
    ]
    return "\n".join(lines) + "\n"


def flow(value: Any) -> str:
    """``value`` as one line of YAML flow style."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000).strip()


# --------------------------------------------------------------------------- main


BENCH_RETRY = bp.Script(
    "bench_retry",
    row="config",
    proxy="sidecar",
    proxies="sidecars",
    proxy_cpu="the two sidecars",
    repeat=(5, 3),
    bench=RetryBench,
    markdown=markdown,
    idle_wait=(1.0, 0.2),
    bare_json=True,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the request counts and repetitions for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(bp.SHAPES), help="c32m16,c1m1 (default both)")
    p.add_argument(
        "--rate",
        type=int,
        help=f"also run shape {PACED}: c32m16 held by h2load to this many requests/s in all, below what both "
        "configs sustain, so both do the same work at the same batching (default: not run)",
    )
    bp.add_run_options(p, BENCH_RETRY)
    args = p.parse_args(argv)
    args.shapes = [x for x in args.shapes.split(",") if x]
    if not args.shapes or set(args.shapes) - set(bp.SHAPES) or len(set(args.shapes)) != len(args.shapes):
        p.error(f"--shapes takes a comma-separated subset of {','.join(bp.SHAPES)}")
    if args.rate is not None:
        if not 32 <= args.rate <= 10_000_000:
            p.error("--rate takes 32-10,000,000 requests/s")
        args.shapes.append(PACED)
        # bench_proxy's tables are keyed by shape: the paced shape is c32m16's (in this process only).
        bp.SHAPES.setdefault(PACED, bp.SHAPES["c32m16"])
        bp.REQUESTS.setdefault(PACED, bp.REQUESTS["c32m16"])
    bp.check_run_options(p, args, BENCH_RETRY)
    if not 0 <= args.idle_wait <= 60:
        p.error("--idle-wait takes 0-60 s")
    args.proxies = list(CONFIGS)  # bench_proxy's Bench keeps per-row info under these names
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, print the Markdown table, write the reports; return the exit status."""
    return bp.run_script(BENCH_RETRY, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
