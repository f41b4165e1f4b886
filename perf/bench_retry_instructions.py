"""Count the sidecar's instructions per request with retries configured but never used, against none (issue 5: <= 5%).

``perf/bench_retry.py`` measures the same thing as CPU time, and on a shared
virtual machine its run-to-run spread (easily +-15%) is wider than the 5% it
has to resolve. Here each sidecar runs under valgrind's callgrind, which
counts the instructions the process executes (Python, our compiled core,
uvloop, libc: everything in user space), and an instruction count does not
depend on what else the machine is doing: two runs of one config agree to
within about 1%.

The two configs are bench_retry's (``off``; ``on`` with its retry policy,
per-try timeout, budget, outlier detection and circuit breakers), as the
same YAML files; so are the request (the gRPC-shaped unary call from
``perf/bench_proxy.py``, driven by ``h2load`` against ``nghttpd``) and the
pinning (sidecar on ``--proxy-cpu``, h2load and the backend on
``--client-cpu``). For each repetition, shape and config, in alternating
order: start the sidecar under callgrind (instrumentation off, for a quick
start), let one request through, turn instrumentation on (``callgrind_control
-i on``), warm up with ``--warmup-requests``, zero the counters (``-z``),
run the measured requests, dump the counters (``callgrind_control -d``) and
divide their total by the requests done. The sidecar's timers (the sweep,
the per-try timer) run during the measured part too and are counted.

What the count leaves out, and why it still answers the question: kernel
time (the same reads and writes in both configs), and cache or branch
effects (the retry bookkeeping touches a handful of fields per request).
Under callgrind the sidecar runs some 50x slower, so per-time costs (the
once-a-second sweep) weigh less per request than at full speed, and
per-request costs the same: no retry cost is hidden that way.

Shapes: ``c1m1`` (one request at a time) and ``c32m16`` (32 connections x 16
streams, the sidecar saturated: both configs batch alike, as they run at
nearly the same speed).

Usage::

    .venv/bin/python perf/bench_retry_instructions.py               # 2 repetitions, both shapes, ~3 min
    .venv/bin/python perf/bench_retry_instructions.py --repeat 3
    .venv/bin/python perf/bench_retry_instructions.py --quick --json -   # smoke run, ~30 s

Results go to ``perf/results/bench_retry_instructions.{json,md}`` unless
``--json`` or ``--md`` say otherwise. Exit status: 0 when both configs were
counted at every shape without errors (whatever the ratio), 3 when a
sidecar failed or a run saw errors (the report is still written), 2 when a
tool is missing or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# perf/ is not a package: the sibling scripts are imported as modules.
import bench_proxy as bp
import bench_retry as br

NAME = "bench_retry_instructions"
CONFIGS = br.CONFIGS
SHAPES = ("c1m1", "c32m16")
TARGET = br.TARGET
#: Measured requests per run (full, --quick): under callgrind c1m1 does about 150 requests/s.
REQUESTS = {"c1m1": (5_000, 400), "c32m16": (20_000, 2_000)}
WARMUP = {"c1m1": (1_000, 100), "c32m16": (4_000, 400)}
SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.M)


class Failed(Exception):
    """One run could not be counted (the sidecar did not start, a tool failed, the load saw errors)."""


def callgrind_control(tool: str, flag: str, pid: int, timeout: float, *value: str) -> None:
    """``callgrind_control FLAG [VALUE] PID``: it asks the running callgrind (through a file it polls) and waits."""
    proc = subprocess.run([tool, flag, *value, str(pid)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise Failed(f"callgrind_control {flag} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def read_summary(path: Path) -> int:
    """The total instructions of one callgrind dump (its ``summary:`` line)."""
    m = SUMMARY.search(path.read_bytes())
    if m is None:
        raise Failed(f"no summary line in {path.name}")
    return int(m.group(1))


class Counter:
    """Runs the sidecars under callgrind and counts; holds the runs for the report."""

    def __init__(self, args: argparse.Namespace, tools: bp.Tools, valgrind: str, control: str, tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.valgrind = valgrind
        self.control = control
        self.tmp = tmp
        self.procs = bp.Processes(tmp, args.nice)
        self.workload = next(w for w in bp.workloads(tmp) if w.name == br.WORKLOAD)
        self.runs: list[dict[str, Any]] = []

    def log(self, message: str) -> None:
        if not self.args.silent:
            print(f"[{NAME}] {message}", file=sys.stderr, flush=True)

    def h2load(self, url: str, shape: str, count: int, timeout: float) -> bp.Load:
        return bp.run_h2load(self.tools, self.args.client_cpu, url, self.workload, shape, count, timeout, None,
                             self.tmp / "h2load.out")  # fmt: skip

    def run(self) -> None:
        backend_port = bp.free_ports(1)[0]
        argv = [self.tools.nghttpd, "--no-tls", "-d", str(self.tmp / "www"), *self.workload.backend_args,
                str(backend_port)]  # fmt: skip
        backend = self.procs.start("nghttpd", argv, self.args.client_cpu)
        try:
            bp.wait_listening(backend, backend_port, 10)
        except bp.RowFailed as exc:
            raise bp.BenchError(f"backend nghttpd did not start: {exc}") from None
        for rep in range(self.args.repeat):
            order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
            for shape in self.args.shapes:
                for name in order:
                    run = {"config": name, "shape": shape, "repetition": rep + 1}
                    try:
                        run.update(self.count(name, shape, backend_port, rep))
                        run["status"] = "ok"
                        self.log(
                            f"{shape} {name} ({rep + 1}/{self.args.repeat}): {run['requests']:,} requests, "
                            f"{run['instructions_per_request']:,.0f} instructions/request"
                        )
                    except Failed as exc:
                        run.update(status="failed", error=str(exc))
                        self.log(f"{shape} {name} ({rep + 1}/{self.args.repeat}): FAILED: {exc}")
                    self.runs.append(run)
        self.procs.stop(backend)

    def count(self, name: str, shape: str, backend_port: int, rep: int) -> dict[str, Any]:
        """One sidecar under callgrind: warm up, zero, load, dump; its instructions per request."""
        port, admin, metrics = bp.free_ports(3)
        cfg = self.tmp / f"sidecar-{name}.yaml"
        cfg.write_text(br.config_yaml(name, port, backend_port))
        out = self.tmp / f"callgrind-{name}-{shape}-{rep + 1}.out"
        cmd = [
            # Not instrumented until the sidecar serves (Python's start-up runs ~10x faster so).
            self.valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "meshproxy", "run", "--config", str(cfg),
            "--admin", f"127.0.0.1:{admin}", "--metrics", f"127.0.0.1:{metrics}",
        ]  # fmt: skip
        log_name = f"sidecar-{name}-{shape}-{rep + 1}"
        proc = self.procs.start(log_name, cmd, self.args.proxy_cpu, cwd=bp.REPO_ROOT)
        url = f"http://127.0.0.1:{port}{self.workload.path}"
        quick = 1 if self.args.quick else 0
        try:
            bp.wait_listening(proc, port, self.args.startup_timeout)
            self.probe(proc, url)
            callgrind_control(self.control, "-i", proc.pid, 60, "on")
            warm = self.h2load(url, shape, self.args.warmup_requests or WARMUP[shape][quick], self.args.run_timeout)
            callgrind_control(self.control, "-z", proc.pid, 60)
            load = self.h2load(url, shape, self.requests(shape), self.args.run_timeout)
            callgrind_control(self.control, "-d", proc.pid, 60)
        except (bp.RowFailed, subprocess.TimeoutExpired) as exc:
            raise Failed(f"{exc}: {bp.log_tail(self.tmp, log_name)}".rstrip(": ")) from None
        finally:
            self.procs.stop(proc, grace=30)
        errors = load.errors + warm.errors
        if errors or load.done == 0:
            raise Failed(f"{errors} failed requests ({load.done} done)")
        dumps = sorted(self.tmp.glob(f"{out.name}.*"))  # the -d dump is <file>.1 (the exit dump is <file>)
        if not dumps:
            raise Failed("callgrind wrote no dump")
        instructions = read_summary(dumps[0])
        for path in (out, *dumps):
            path.unlink(missing_ok=True)
        return {
            "requests": load.done,
            "instructions": instructions,
            "instructions_per_request": instructions / load.done,
            "rps_under_callgrind": load.done / load.wall_s if load.wall_s else None,
        }

    def probe(self, proc: subprocess.Popen, url: str) -> None:
        deadline = time.monotonic() + self.args.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise bp.RowFailed(f"exited with status {proc.returncode}")
            with contextlib.suppress(bp.RowFailed):
                if self.h2load(url, "c1m1", 1, 30).succeeded == 1:
                    return
            time.sleep(0.5)
        raise bp.RowFailed("no successful request before the start-up timeout")

    def requests(self, shape: str) -> int:
        chosen = self.args.requests if shape == "c32m16" else self.args.latency_requests
        return chosen or REQUESTS[shape][1 if self.args.quick else 0]

    def report(self) -> dict[str, Any]:
        return {
            "bench": NAME,
            "quick": self.args.quick,
            "repeat": self.args.repeat,
            "target": TARGET,
            "measure": "instructions the sidecar process executed (callgrind, user space) over the measured "
            "requests / requests done",
            "shapes": {
                s: {"connections": bp.SHAPES[s][0], "streams": bp.SHAPES[s][1], "requests": self.requests(s)}
                for s in self.args.shapes
            },
            "pinning": bp.pinning(self.args),
            "configs": {
                "retry_policy": br.RETRY_POLICY,
                "outlier_detection": br.OUTLIER_DETECTION,
                "circuit_breakers": br.CIRCUIT_BREAKERS,
            },
            "comparison": [compare(s, self.runs) for s in self.args.shapes],
            "runs": self.runs,
            "git": br.git_state(),
            "versions": self.tools.versions,
            "python": platform.python_version(),
            "kernel": platform.release(),
        }


def compare(shape: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``on`` over ``off`` at ``shape``: per repetition, then their median, min and max."""
    by = {(r["config"], r["repetition"]): r for r in runs if r["shape"] == shape and r["status"] == "ok"}
    per_config = {
        name: [r["instructions_per_request"] for (c, _), r in sorted(by.items()) if c == name] for name in CONFIGS
    }
    ratios = [
        by[("on", rep)]["instructions_per_request"] / by[("off", rep)]["instructions_per_request"]
        for (c, rep) in sorted(by)
        if c == "on" and ("off", rep) in by
    ]
    out: dict[str, Any] = {
        "shape": shape,
        "off_instructions_per_request": statistics.median(per_config["off"]) if per_config["off"] else None,
        "on_instructions_per_request": statistics.median(per_config["on"]) if per_config["on"] else None,
        "ratios": ratios,
        "ratio": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
    }
    out["within_target"] = None if out["ratio"] is None else out["ratio"] <= TARGET
    return out


def markdown(report: dict[str, Any]) -> str:
    pin = report["pinning"]
    fmt = bp.fmt
    lines = [
        "# Retries enabled but unused: sidecar instructions per gRPC request, `on` / `off`",
        "",
        f"Each sidecar under callgrind on CPU {pin['proxy_cpu']}; h2load (one thread) and the nghttpd backend on CPU "
        f"{pin['client_cpu']}. "
        + "; ".join(
            f"{s}: {c['connections']} connection(s) x {c['streams']} stream(s), {c['requests']:,} requests"
            for s, c in report["shapes"].items()
        )
        + f". {report['repeat']} repetition(s), off and on in alternating order."
        + (" **QUICK mode: smoke figures only.**" if report["quick"] else ""),
        "",
        f"| shape | off instructions/req | on instructions/req | on / off | min to max over {report['repeat']} "
        "run(s) | target | within |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in report["comparison"]:
        verdict = "not measured" if c["ratio"] is None else ("yes" if c["within_target"] else "no")
        lines.append(
            f"| {c['shape']} | {fmt(c['off_instructions_per_request'])} | {fmt(c['on_instructions_per_request'])} "
            f"| {fmt(c['ratio'], '.4f')} | {fmt(c['ratio_min'], '.4f')} to {fmt(c['ratio_max'], '.4f')} "
            f"| ≤ {TARGET:.2f} | {verdict} |"
        )
    lines += ["", "| shape | config | repetition | requests | instructions/req | req/s under callgrind | status |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in report["runs"]:
        lines.append(
            f"| {r['shape']} | {r['config']} | {r['repetition']} | {fmt(r.get('requests'))} "
            f"| {fmt(r.get('instructions_per_request'))} | {fmt(r.get('rps_under_callgrind'))} "
            f"| {r['status'] if r['status'] == 'ok' else 'FAILED: ' + r['error']} |"
        )
    cfg = report["configs"]
    lines += [
        "",
        "- `off`: one route (prefix /) to one cluster with one endpoint; no retry_policy, no circuit_breakers, no "
        "outlier_detection.",
        f"- `on`: the same, plus `retry_policy: {br.flow(cfg['retry_policy'])}`, "
        f"`outlier_detection: {br.flow(cfg['outlier_detection'])}`, "
        f"`circuit_breakers: {br.flow(cfg['circuit_breakers'])}`. The backend never fails: nothing is retried.",
        f"- Measure: {report['measure']}.",
        br.versions_line(report),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="c1m1,c32m16 (default both)")
    p.add_argument("--quick", action="store_true", help="smoke run: few requests, 1 repetition")
    p.add_argument("--repeat", type=int, help="runs per config and shape (default 2; quick 1)")
    p.add_argument("--requests", type=int, help="measured requests per c32m16 run (default 20,000; quick 2,000)")
    p.add_argument("--latency-requests", type=int, help="measured requests per c1m1 run (default 5,000; quick 400)")
    p.add_argument("--warmup-requests", type=int, help="requests before the counters are zeroed (default by shape)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU of the sidecar (default 1)")
    p.add_argument("--client-cpu", type=int, default=0, help="CPU of h2load, the backend and this script (default 0)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds for a sidecar under callgrind to "
                   "serve its first request (default 120)")  # fmt: skip
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds one h2load run may take (default 600)")
    p.add_argument("--nice", type=int, default=0, help="niceness of the processes started (default 0)")
    p.add_argument("--json", nargs="?", const="-", default=str(bp.RESULTS / f"{NAME}.json"),
                   help="write the JSON report here ('-' or no value: stdout)")  # fmt: skip
    p.add_argument("--md", default=str(bp.RESULTS / f"{NAME}.md"), help="write the Markdown report here")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.shapes = [x for x in args.shapes.split(",") if x]
    if not args.shapes or set(args.shapes) - set(SHAPES) or len(set(args.shapes)) != len(args.shapes):
        p.error(f"--shapes takes a comma-separated subset of {','.join(SHAPES)}")
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    if not 1 <= args.repeat <= 20:
        p.error("--repeat takes 1-20")
    for opt in ("requests", "latency_requests", "warmup_requests"):
        value = getattr(args, opt)
        if value is not None and not 1 <= value <= 1_000_000:
            p.error(f"--{opt.replace('_', '-')} takes 1-1,000,000")
    if not -20 <= args.nice <= 19:
        p.error("--nice takes -20..19")
    if args.startup_timeout <= 0 or args.run_timeout <= 0:
        p.error("timeouts must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = os.sched_getaffinity(0)
    if args.proxy_cpu not in cpus or args.client_cpu not in cpus or args.proxy_cpu == args.client_cpu:
        print(f"{NAME}: need two distinct usable CPUs (have {sorted(cpus)})", file=sys.stderr)
        return 2
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if not valgrind or not control:
        print(f"{NAME}: valgrind and callgrind_control are needed (apt-get install valgrind)", file=sys.stderr)
        return 2
    try:
        tools = bp.find_tools(())
    except bp.BenchError as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    tools.nice = args.nice
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bp.on_signal)
    bp.pin_self(args.client_cpu)
    with bp.workspace(False, NAME) as tmp:
        bp.write_docroot(tmp / "www")
        counter = Counter(args, tools, valgrind, control, tmp)
        try:
            counter.run()
        except bp.BenchError as exc:
            print(f"{NAME}: {exc}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, bp.Interrupted) as exc:
            print(f"{NAME}: interrupted ({type(exc).__name__} {exc}), processes stopped", file=sys.stderr)
            return 130
        finally:
            with bp.signals_held():
                counter.procs.stop_all()
    report = counter.report()
    md = markdown(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(md)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    return 3 if any(r["status"] != "ok" for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
