"""Push scale: N simulated sidecars subscribed to one control plane; one VirtualService edit; time until all ACK.

The control plane is the real one (``meshproxy-control serve --config-dir``,
a process of its own, pinned to ``--server-cpu``) over a directory holding a
realistic mesh: ``--services`` ServiceEntries with two labelled endpoints each,
their DestinationRules, and the ``reviews`` 80/20 VirtualService. The sidecars
are light stream clients: each is one TCP connection running meshproxy's own
sans-IO HTTP/2 client (the one the sidecar uses), which subscribes with a
node identity, decodes every snapshot and ACKs it; ``--procs`` client
processes share them, pinned to ``--client-cpu``.

Once every sidecar has ACKed its first snapshot, the script rewrites the
VirtualService (80/20 -> 50/50) with a rename, as an editor or a ConfigMap
update does, and takes t0 just before. Each client records, on the system-wide
monotonic clock, when it sent the ACK of the new version; latency = ACK - t0.
It covers the whole path: inotify, the 100 ms debounce, parsing and
translation, serialization, N writes through grpcio, the client's decode and
ACK. Reported per N: p50, p99 and max latency, and the control plane's RSS
with N sidecars connected (VmRSS) next to its RSS with none.

Baseline, measured in the same run: N = 1, the floor of the path (mostly the
debounce); every row prints its p99 as a ratio of that floor and of the 1 s
target.

Usage::

    .venv/bin/python perf/bench_push.py                    # N = 100, 1000, 10000
    .venv/bin/python perf/bench_push.py --sizes 1,100 --repeat 1 --json -   # smoke

Exit status: 0 when every row completed, 3 when some sidecar never ACKed
(the report is still written), 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATH = b"/meshproxy.v1.MeshControl/Stream"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


# -- the mesh ------------------------------------------------------------------------------------


def mesh_yaml(services: int) -> str:
    docs = []
    for i in range(services):
        host = "reviews.local" if i == 0 else f"svc{i}.local"
        base = 20000 + 2 * i
        docs.append(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: se{i}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc: {base}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{grpc: {base + 1}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dr{i}, namespace: default}}
spec:
  host: {host}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
""")
    return "---\n".join(docs)


def vs_yaml(v1: int, v2: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.local]
  http:
  - route:
    - destination: {{host: reviews.local, subset: v1}}
      weight: {v1}
    - destination: {{host: reviews.local, subset: v2}}
      weight: {v2}
"""


def replace(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the simulated sidecars (client processes) -----------------------------------------------------


class Sidecar(asyncio.Protocol):
    """One subscription: our HTTP/2 client, gRPC framing, decode, ACK; records ACK times by version."""

    def __init__(
        self, node_id: str, acked: dict[str, list[float]], events: list[asyncio.Event], count: list[int]
    ) -> None:
        from meshproxy.config.v1 import control_pb2
        from meshproxy.conn import h2conn as h2

        self.h2 = h2
        self.pb = control_pb2
        self.node_id = node_id
        self.acked = acked
        self.events = events  # [all ACKed once, all ACKed twice]
        self.count = count  # [ACKed once, ACKed twice, n]
        self.buf = bytearray()
        self.acks = 0
        self.conn = h2.H2Connection(True, settings={"initial_window_size": 1 << 20})

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.conn.initiate()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PATH),
            (b":authority", b"control"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        self.stream = self.conn.open_stream(headers)
        self.stream.notify_close = True
        node = self.pb.meshproxy_dot_v1_dot_config__pb2.Node(id=self.node_id, namespace="default", workload="bench")
        self.send(self.pb.StreamRequest(node=node))

    def send(self, msg: Any) -> None:
        body = msg.SerializeToString()
        self.conn.send_data(self.stream, struct.pack(">BI", 0, len(body)) + body)
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive(data)
        if events:
            for ev in events:
                if ev[0] == self.h2.EV_DATA:
                    self.buf += ev[2]
                elif ev[0] in (self.h2.EV_CLOSED, self.h2.EV_TRAILERS, self.h2.EV_GOAWAY, self.h2.EV_TERMINATED):
                    s = ev[1] if ev[0] in (self.h2.EV_CLOSED, self.h2.EV_TRAILERS) else None
                    detail = (s.error_code, s.trailers) if s is not None else ev[1:]
                    print(f"sidecar {self.node_id}: stream ended: event {ev[0]} {detail}", file=sys.stderr)
        while len(self.buf) >= 5:
            (n,) = struct.unpack_from(">I", self.buf, 1)
            if len(self.buf) < 5 + n:
                break
            resp = self.pb.StreamResponse.FromString(bytes(self.buf[5 : 5 + n]))
            del self.buf[: 5 + n]
            self.send(self.pb.StreamRequest(version_info=resp.version_info, response_nonce=resp.nonce))
            self.acked.setdefault(resp.version_info, []).append(time.monotonic())
            self.acks += 1
            if self.acks <= 2:
                self.count[self.acks - 1] += 1
                if self.count[self.acks - 1] == self.count[2]:
                    self.events[self.acks - 1].set()
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


async def client_main(port: int, first: int, n: int, pipe_fd: int, settle: float) -> None:
    """Open ``n`` sidecars; say "ready" on the pipe when all ACKed once; then, once all ACKed a second
    version (or ``settle`` seconds passed), send the ACK times."""
    loop = asyncio.get_running_loop()
    acked: dict[str, list[float]] = {}
    ready, pushed = asyncio.Event(), asyncio.Event()
    count = [0, 0, n]
    transports = []
    for i in range(n):
        for attempt in range(50):
            try:
                t, _ = await loop.create_connection(
                    lambda i=i: Sidecar(f"sim-{first + i}", acked, [ready, pushed], count), "127.0.0.1", port
                )
                break
            except OSError:
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise SystemExit(f"cannot connect sidecar {first + i}")
        transports.append(t)
    try:
        await asyncio.wait_for(ready.wait(), 120)
    except TimeoutError:
        raise SystemExit(f"only {count[0]} of {n} sidecars got a first snapshot within 120 s") from None
    pipe = socket.socket(fileno=pipe_fd).makefile("rw", buffering=1)
    # socket.makefile's text mode has no line buffering: flush each line.
    pipe.write("ready\n")
    pipe.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pushed.wait(), settle)
    pipe.write(json.dumps(acked) + "\n")
    pipe.flush()
    for t in transports:
        t.close()


# -- the driver -------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return (["taskset", "-c", str(cpu)] if cpu is not None else []) + argv


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"control plane exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("control plane did not listen")


def run_size(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    mesh = tmp / f"mesh-{n}"
    mesh.mkdir()
    (mesh / "services.yaml").write_text(mesh_yaml(args.services))
    (mesh / "vs.yaml").write_text(vs_yaml(80, 20))
    port = free_port()
    log = open(tmp / f"control-{n}.log", "w")
    cmd = [sys.executable, "-m", "control", "serve", "--config-dir", str(mesh), "--listen", f"127.0.0.1:{port}"]
    server = subprocess.Popen(
        pinned([*cmd, "--log-level", os.environ.get("BENCH_PUSH_LOG", "warning")], args.server_cpu),
        stdout=log,
        stderr=log,
    )
    clients: list[tuple[subprocess.Popen, Any]] = []
    try:
        wait_port(port, server)
        time.sleep(0.3)
        rss_idle = rss_kib(server.pid)
        procs = max(1, min(args.procs, n))
        t_connect = time.monotonic()
        for p in range(procs):
            share = n // procs + (1 if p < n % procs else 0)
            first = p * (n // procs) + min(p, n % procs)
            parent, child = socket.socketpair()
            argv = [sys.executable, __file__, "--client", str(port), str(first), str(share), str(child.fileno())]
            argv.append(str(args.settle))
            proc = subprocess.Popen(pinned(argv, args.client_cpu), pass_fds=(child.fileno(),))
            child.close()
            clients.append((proc, parent.makefile("rw", buffering=1)))
        for proc, f in clients:
            if f.readline().strip() != "ready":
                raise RuntimeError(f"client {proc.pid} failed")
        connect_s = time.monotonic() - t_connect
        time.sleep(0.5)  # let the first round of ACKs and any stragglers settle
        rss_connected = rss_kib(server.pid)
        t0 = time.monotonic()
        replace(mesh / "vs.yaml", vs_yaml(50, 50))
        latencies: list[float] = []
        new_versions: set[str] = set()
        for _proc, f in clients:
            # Each client answers once all its sidecars ACKed the new version (or --settle passed):
            # version -> the ACK times of this process's sidecars; the edit made exactly one new version.
            for version, times in json.loads(f.readline()).items():
                after = [(t - t0) * 1e3 for t in times if t >= t0]
                if after:
                    new_versions.add(version)
                    latencies += after
        if len(new_versions) != 1:
            raise RuntimeError(f"expected one new version after the edit, saw {len(new_versions)}")
        missing = n - len(latencies)
        rss_after = rss_kib(server.pid)
        return {
            "sidecars": n,
            "acked": len(latencies),
            "missing": missing,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else float("nan"),
            "connect_s": connect_s,
            "rss_idle_mib": rss_idle / 1024,
            "rss_connected_mib": rss_connected / 1024,
            "rss_after_push_mib": rss_after / 1024,
        }
    finally:
        for proc, f in clients:
            with contextlib.suppress(Exception):
                f.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="sidecar counts (default 100,1000,10000)")
    parser.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--services", type=int, default=20, help="ServiceEntries in the mesh (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the median run is reported")
    parser.add_argument(
        "--settle", type=float, default=60.0, help="longest wait for every ACK after the edit (default 60 s)"
    )
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--json", help="write the report as JSON here ('-': stdout)")
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        port, first, n, fd = (int(x) for x in args.client[:4])
        import uvloop

        uvloop.run(client_main(port, first, n, fd, float(args.client[4])))
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: integers separated by commas")
    if os.cpu_count() is not None and os.cpu_count() < 2:
        args.server_cpu = args.client_cpu = None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(sizes) + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    rows = []
    status = 0
    tmp = tempfile.mkdtemp(prefix="bench-push-")
    try:
        for n in [1, *sizes]:
            runs = []
            for r in range(args.repeat):
                sub = Path(tmp) / f"{n}-{r}"
                sub.mkdir()
                runs.append(run_size(args, n, sub))
            runs.sort(key=lambda x: x["p99_ms"])
            row = runs[len(runs) // 2]
            row["runs_p99_ms"] = [x["p99_ms"] for x in runs]
            rows.append(row)
            if row["missing"]:
                status = 3
            print(
                f"N={n:>6}  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  max {row['max_ms']:7.1f} ms"
                f"  acked {row['acked']}/{n}  connect {row['connect_s']:.1f}s"
                f"  control plane RSS {row['rss_idle_mib']:.1f} -> {row['rss_connected_mib']:.1f} MiB",
                flush=True,
            )
    finally:
        if not os.environ.get("BENCH_PUSH_KEEP"):  # keep the control plane logs to look into a run
            shutil.rmtree(tmp, ignore_errors=True)
    floor = rows[0]["p99_ms"]
    print(f"\nbaseline (N=1) p99: {floor:.1f} ms")
    for row in rows[1:]:
        row["p99_vs_baseline"] = row["p99_ms"] / floor
        row["p99_vs_target_1s"] = row["p99_ms"] / 1000.0
        print(
            f"N={row['sidecars']:>6}: p99 {row['p99_vs_baseline']:.2f}x the N=1 floor, "
            f"{row['p99_vs_target_1s']:.2f}x the 1 s target; "
            f"RSS per sidecar {(row['rss_connected_mib'] - row['rss_idle_mib']) * 1024 / row['sidecars']:.1f} KiB"
        )
    report = {"rows": rows, "services": args.services, "procs": args.procs, "repeat": args.repeat}
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
