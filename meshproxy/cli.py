"""The ``meshproxy`` command: ``meshproxy run`` starts a sidecar.

Where the config comes from, one of:

- ``--config FILE``: the YAML (or JSON) form of ``meshproxy.v1.SidecarConfig``.
  SIGHUP reads it again and swaps it in (listeners stay as they were); a bad
  file is refused with its reason, the config in force stays.
- ``--listen ADDR --upstream ADDR``: the one-cluster, route-everything shortcut.
- ``--control-plane ADDR --namespace NS --workload NAME [--node-id ID]
  [--labels k=v,...] [--listen ADDR]``: subscribe to the control plane's
  config stream (``meshproxy.subscription``). Listeners are bound when the
  first snapshot arrives; later snapshots are swapped in (listeners
  re-bound), bad ones NACKed; while the control plane is unreachable the
  sidecar serves on its last good config and reconnects with backoff.
  ``--listen`` (default 127.0.0.1:15001) is the address of the snapshot's
  listener named ``outbound``, whatever the snapshot says. SIGHUP is ignored.

In a pod (``meshproxy.transparent``): ``--transparent`` makes the outbound
listener (``outbound`` from the control plane, or the ``--listen`` one)
transparent: it takes the connections iptables redirected and routes them by
their original destination. ``--inbound-listen ADDR`` adds the transparent
listener ``inbound`` to the local app (Istio's 15006); with ``--app ADDR`` (a
local sidecar in front of an app at ADDR) the listener ``inbound`` is a plain
one routing every request to the app, its connections mTLS or not per the
PeerAuthentication of its port (``meshproxy.tls``). ``--ready ADDR``
answers the kubelet's probes: ``/ready`` (200 once a config is in force and
its listeners accept; 503 before and while draining) and ``/healthz``, the
app's rewritten probes under ``/app-health/`` and ``POST /quitquitquit`` (a
drain, as SIGTERM): see ``meshproxy.ready``.

``--concurrency N`` forks N workers sharing the listeners with SO_REUSEPORT
(with a control plane, each worker holds its own stream, as worker 0..N-1).
SIGTERM drains: GOAWAY, in-flight streams finish up to ``--drain-timeout``, exit 0.
Bad flags or config: one line on stderr, exit 2.

``meshproxy wait-ready --url URL [--timeout S]`` polls a ``/ready`` URL until it
answers 200 (exit 0), or says why not in one line after the timeout (exit 1):
a classic-mode pod's postStart, so that the app starts after its proxy.

``meshproxy iptables [...] [--cleanup] [--dry-run]`` programs the pod's
traffic capture (``meshproxy.iptables``): what the ``meshproxy-init``
container runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from functools import partial
from typing import Any

from meshproxy import iptables
from meshproxy.cliargs import Parser, address, bind_address, positive, seconds
from meshproxy.telemetry import METRIC_NAME_STYLES

__all__ = ["main"]

log = logging.getLogger("meshproxy")

#: The outbound listener's address in control-plane mode when --listen is not given (Istio's port).
DEFAULT_OUTBOUND = "127.0.0.1:15001"

# Kubernetes' syntax: a label name or value (63 characters at most) and a DNS-1123 subdomain
# (a label key's prefix, a workload name; 253 at most) or label (a namespace; 63 at most).
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _label_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise argparse.ArgumentTypeError(f"label key {key!r}: the prefix must be a lowercase DNS subdomain")
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"label key {key!r}: the name must be 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )


def _labels(value: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> a dict, each key and value checked as Kubernetes checks labels."""
    labels: dict[str, str] = {}
    for item in value.split(","):
        key, eq, val = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        _label_key(key)
        if len(val) > 63 or (val and not _LABEL_NAME.fullmatch(val)):
            raise argparse.ArgumentTypeError(
                f"label {key}: value {val!r} must be at most 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit"
            )
        if key in labels:
            raise argparse.ArgumentTypeError(f"label {key!r} is given twice")
        labels[key] = val
    return labels


def _namespace(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Kubernetes namespace name (a lowercase DNS label)")
    return value


def _workload(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Kubernetes name (a lowercase DNS subdomain)")
    return value


def _node_id(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise argparse.ArgumentTypeError(f"{value!r}: a node id is one word")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meshproxy", description="meshproxy: the sidecar of a service mesh for Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run a sidecar", description="Run a meshproxy sidecar.")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="sidecar config (YAML or JSON of meshproxy.v1.SidecarConfig)")
    src.add_argument(
        "--listen",
        metavar="ADDR",
        type=bind_address,
        help="listen address (with --upstream); with --control-plane, the outbound listener's "
        f"(default {DEFAULT_OUTBOUND})",
    )
    run.add_argument("--upstream", metavar="ADDR", type=address, help="the one upstream, h2c (with --listen)")
    run.add_argument(
        "--control-plane", metavar="ADDR", type=address, help="take the config from the control plane at host:port"
    )
    run.add_argument(
        "--node-id",
        metavar="ID",
        type=_node_id,
        help="this sidecar's node id (with --control-plane; default: hostname)",
    )
    run.add_argument("--namespace", metavar="NS", type=_namespace, help="this pod's namespace (with --control-plane)")
    run.add_argument("--workload", metavar="NAME", type=_workload, help="this pod's workload (with --control-plane)")
    run.add_argument("--labels", metavar="K=V,...", type=_labels, help="this pod's labels (with --control-plane)")
    run.add_argument(
        "--admin",
        metavar="ADDR|off",
        type=_address_or_off,
        default="127.0.0.1:15000",
        help="the gRPC admin service meshproxy.admin.v1.Admin (with health and reflection); default 127.0.0.1:15000",
    )
    run.add_argument(
        "--metrics",
        metavar="ADDR|off",
        type=_address_or_off,
        default="0.0.0.0:15090",
        help="Prometheus metrics on GET /metrics (default 0.0.0.0:15090); off: none recorded",
    )
    run.add_argument(
        "--metric-names",
        choices=METRIC_NAME_STYLES,
        default="meshproxy",
        help="the request metrics' names: meshproxy_* (default) or Istio's istio_*, for existing dashboards",
    )
    run.add_argument(
        "--access-log",
        metavar="off|stdout|PATH",
        default="off",
        help="JSON access log lines to stdout or appended to a file (default off)",
    )
    run.add_argument(
        "--access-log-sampling",
        metavar="RATIO",
        type=_ratio,
        default=1.0,
        help="the share of successful requests logged, 0 to 1 (default 1); failures are always logged",
    )
    run.add_argument(
        "--trace-sampling",
        metavar="RATIO",
        type=_ratio,
        default=1.0,
        help="the share of traces the sidecar starts that are marked sampled, 0 to 1 (default 1)",
    )
    run.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        type=_http_url_any,
        help="export a span per sampled request with OTLP/HTTP to this URL "
        "(e.g. http://127.0.0.1:4318/v1/traces; needs the 'tracing' extra); default: no spans",
    )
    run.add_argument(
        "--concurrency",
        metavar="N",
        type=positive,
        default=1,
        help="worker processes sharing the listeners (default 1)",
    )
    run.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=seconds,
        default=10.0,
        help="how long in-flight streams may take to finish on SIGTERM (default 10)",
    )
    run.add_argument(
        "--transparent",
        action="store_true",
        help="the outbound listener takes connections redirected by iptables and routes them by their "
        "original destination (with --control-plane or --listen)",
    )
    run.add_argument(
        "--inbound-listen",
        metavar="ADDR",
        type=bind_address,
        help="a transparent listener for redirected inbound connections to the local app (e.g. 0.0.0.0:15006)",
    )
    run.add_argument(
        "--app",
        metavar="ADDR",
        type=address,
        help="with --inbound-listen: a plain (not transparent) inbound listener in front of the app at ADDR "
        "(a local sidecar; ServiceEntry endpoints point at --inbound-listen)",
    )
    run.add_argument(
        "--ready",
        metavar="ADDR",
        type=bind_address,
        help="answer the kubelet's probes GET /ready, /healthz, /app-health/... and POST /quitquitquit"
        " on this address (e.g. 0.0.0.0:15021)",
    )
    run.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    wait = sub.add_parser(
        "wait-ready",
        help="wait until a sidecar is ready",
        description="Poll a sidecar's /ready URL until it answers 200 (a classic-mode pod's postStart).",
    )
    wait.add_argument("--url", required=True, type=_http_url, help="e.g. http://127.0.0.1:15021/ready")
    wait.add_argument(
        "--timeout", metavar="SECONDS", type=seconds, default=60.0, help="give up after this long (default 60)"
    )
    iptables.add_parser(sub)
    return parser


def _address_or_off(value: str) -> str:
    return value if value == "off" else bind_address(value)


def _ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= r <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"{value!r} must be between 0 and 1")
    return r


def _http_url_any(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    return value


def _http_url(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() != "http" or not rest or rest.startswith("/"):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// URL")
    return value


def listener_amendment(args: argparse.Namespace, outbound: str) -> Any:
    """What the command line says about listeners, as a function completing each config (or None):
    ``--transparent`` on the listener named ``outbound``, ``--inbound-listen`` as the listener
    ``inbound`` (the control plane's, if it sends one, keeps its other settings)."""
    from meshproxy.transparent import INBOUND_LISTENER

    if not args.transparent and not args.inbound_listen:
        return None

    def amend(cfg: Any) -> None:
        if args.transparent:
            for ls in cfg.listeners:
                if ls.name == outbound:
                    ls.transparent = True
        if args.inbound_listen:
            inbound = next((ls for ls in cfg.listeners if ls.name == INBOUND_LISTENER), None)
            if inbound is None:
                inbound = cfg.listeners.add(name=INBOUND_LISTENER)
            inbound.address = args.inbound_listen
            if args.app:
                _route_to_app(cfg, inbound, args.app)
            else:
                inbound.transparent = True

    return amend


#: The cluster of ``--app``: the local app, as Istio names an inbound cluster.
APP_CLUSTER = "inbound|app||"


def _route_to_app(cfg: Any, inbound: Any, app: str) -> None:
    """``--app``: the inbound listener routes every request to the cluster of the app at ``app``."""
    inbound.transparent = False
    del inbound.virtual_hosts[:]
    route = inbound.virtual_hosts.add(name="app", domains=["*"]).routes.add(name="app")
    route.match.prefix = "/"
    route.route.clusters.add(cluster=APP_CLUSTER)
    cluster = next((c for c in cfg.clusters if c.name == APP_CLUSTER), None) or cfg.clusters.add(name=APP_CLUSTER)
    del cluster.endpoints[:]
    cluster.endpoints.add(address=app)


def load_config(args: argparse.Namespace) -> Any:
    from meshproxy import config

    for flag in ("node_id", "namespace", "workload", "labels"):
        if getattr(args, flag) is not None:
            raise config.ConfigError(f"--{flag.replace('_', '-')} goes with --control-plane")
    if args.app and not args.inbound_listen:
        raise config.ConfigError("--app goes with --inbound-listen")
    if args.config:
        if args.upstream:
            raise config.ConfigError("--upstream goes with --listen, not with --config")
        if args.transparent:
            raise config.ConfigError(
                "--transparent goes with --control-plane or --listen; in a config file, "
                "set transparent: true on the listener"
            )
        cfg = config.load_file(args.config)
    elif args.listen and args.upstream:
        cfg = config.simple(args.listen, args.upstream)
    else:
        raise config.ConfigError(
            "give --config FILE, --listen ADDR with --upstream ADDR, or --control-plane ADDR with its node flags"
        )
    config.validate(cfg)
    amend = listener_amendment(args, "main")
    if amend is not None:
        amend(cfg)
        config.validate(cfg)
    return cfg


def control_plane_node(args: argparse.Namespace) -> Any:
    """The ``meshproxy.v1.Node`` this sidecar subscribes as (``--control-plane`` mode)."""
    from meshproxy import config

    if args.config:
        raise config.ConfigError("--control-plane and --config are alternatives: give one")
    if args.upstream:
        raise config.ConfigError("--upstream goes with --listen, not with --control-plane")
    if args.app and not args.inbound_listen:
        raise config.ConfigError("--app goes with --inbound-listen")
    for flag in ("namespace", "workload"):
        if not getattr(args, flag):
            raise config.ConfigError(f"--control-plane needs --{flag}")
    if args.concurrency > 1 and config.parse_address(args.listen or DEFAULT_OUTBOUND, listener=True)[1] == 0:
        raise config.ConfigError("--listen: port 0 cannot be shared by several workers")
    if (
        args.concurrency > 1
        and args.inbound_listen
        and config.parse_address(args.inbound_listen, listener=True)[1] == 0
    ):
        raise config.ConfigError("--inbound-listen: port 0 cannot be shared by several workers")
    return config.Node(
        id=args.node_id or socket.gethostname(),
        namespace=args.namespace,
        workload=args.workload,
        labels=args.labels or {},
    )


def telemetry_settings(args: argparse.Namespace) -> Any:
    from meshproxy.telemetry import Settings

    return Settings(
        metrics=args.metrics != "off",
        metric_names=args.metric_names,
        access_log=None if args.access_log == "off" else args.access_log,
        access_log_sampling=args.access_log_sampling,
        trace_sampling=args.trace_sampling,
        otlp_endpoint=args.otlp_endpoint,
    )


def _config_source(args: argparse.Namespace) -> str:
    if args.control_plane:
        return f"control-plane:{args.control_plane}"
    if args.config:
        return f"file:{os.path.abspath(args.config)}"
    return "flags"


async def _serve_operations(worker: Any, args: argparse.Namespace, settings: Any, rundir: str | None) -> None:
    """The admin service and /metrics. Worker 0 serves them for the whole sidecar; with several
    workers, each other worker answers worker 0 on a private unix socket in ``rundir``."""
    from meshproxy import admin
    from meshproxy.config import parse_address

    peers = [os.path.join(rundir, f"worker-{i}.sock") for i in range(1, worker.workers)] if rundir else []
    if worker.index:
        await admin.start(worker, None, [], os.path.join(rundir, f"worker-{worker.index}.sock"))
        return
    public = parse_address(args.admin, listener=True) if args.admin != "off" else None
    await admin.start(worker, public, peers, None)
    if args.metrics != "off":
        from meshproxy.admin.peers import Peers
        from meshproxy.telemetry import metrics

        host, port = parse_address(args.metrics, listener=True)
        await metrics.serve(worker, host, port, settings, Peers(peers) if peers else None)


def _run_worker(cfg: Any, args: argparse.Namespace, index: int = 0, node: Any = None, rundir: str | None = None) -> int:
    """One worker: ``cfg`` is the config, or None with ``node`` to take it from the control plane."""
    import uvloop

    from meshproxy import telemetry
    from meshproxy.config import parse_address
    from meshproxy.subscription import OUTBOUND_LISTENER
    from meshproxy.worker import Worker

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    amend = listener_amendment(args, OUTBOUND_LISTENER if node is not None else "main")
    worker = Worker(cfg, loop, drain_timeout=args.drain_timeout, amend=amend, index=index, workers=args.concurrency)
    worker.config_log.source = _config_source(args)
    # A drain that ends the process (POST /quitquitquit, the admin Shutdown), as SIGTERM does: this
    # worker, or every worker through the supervisor.
    worker.shutdown = worker.drain if args.concurrency == 1 else partial(os.kill, os.getppid(), signal.SIGTERM)
    settings = telemetry_settings(args)
    try:
        telemetry.install(worker, settings)
    except RuntimeError as e:  # e.g. --otlp-endpoint without the tracing extra
        print(f"meshproxy: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.ready:
            from meshproxy import ready

            loop.run_until_complete(
                ready.serve(
                    parse_address(args.ready, listener=True),
                    lambda: worker.ready,
                    lambda: worker.draining,
                    worker.shutdown,
                )
            )
        loop.run_until_complete(_serve_operations(worker, args, settings, rundir))
        loop.run_until_complete(worker.start())
    except OSError as e:
        print(f"meshproxy: error: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    worker.install_signals()
    if _early_signals:
        worker.drain()
    subscription = None
    identity = None
    if node is not None:
        from meshproxy import tls
        from meshproxy.identity import IdentityClient, file_token_source
        from meshproxy.subscription import Subscription

        # The workload certificate (SignCertificate, renewed at half its life) and the config's
        # Security: mTLS both ways and authorization (meshproxy.tls, meshproxy.authz).
        identity = IdentityClient(args.control_plane, file_token_source(), namespace=args.namespace)
        tls.install(worker, identity)
        identity.start(loop)
        worker.on_drain.append(identity.stop)

        subscription = Subscription(
            worker,
            args.control_plane,
            node,
            worker_index=index,
            listen=args.listen or DEFAULT_OUTBOUND,
            shared_ports=args.concurrency > 1,
        )
        worker.on_drain.append(subscription.stop)
        subscription.start()
        loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: the config comes from the control plane")
    else:
        if args.config:
            loop.add_signal_handler(signal.SIGHUP, _reload, worker, args.config)
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in worker.bound_addresses()))
    loop.run_until_complete(worker.wait_stopped())
    if subscription is not None:
        loop.run_until_complete(subscription.wait_closed())
    if identity is not None:
        loop.run_until_complete(identity.wait_closed())
    telemetry.close(worker)
    loop.close()
    return 0


def _reload(worker: Any, path: str) -> None:
    """SIGHUP: read ``--config`` again; a bad file is refused with its reason and the config in force stays."""
    from meshproxy import config

    try:
        cfg = config.load_file(path)
    except config.ConfigError as e:
        worker.config_log.rejected("", str(e))
        log.error("config reload refused, keeping version %r: %s", worker.runtime.version, e)
        return
    try:
        worker.apply(cfg)  # records a refusal itself
    except config.ConfigError as e:
        log.error("config reload refused, keeping version %r: %s", worker.runtime.version, e)
        return
    log.warning("config version %r in force", cfg.version)


_early_signals: list[int] = []


def _early_signal(signum: int, _frame: Any) -> None:
    _early_signals.append(signum)


def _supervise(cfg: Any, args: argparse.Namespace, node: Any = None) -> int:
    """Fork ``--concurrency`` workers; forward SIGTERM/SIGINT; exit 0 if they all did."""
    import shutil
    import tempfile

    # Where workers 1..N-1 answer worker 0's admin calls (metrics, clusters): private to this sidecar.
    rundir = tempfile.mkdtemp(prefix="meshproxy-")
    children: list[int] = []
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        # SIGTERM and SIGINT drain every worker; SIGHUP makes each re-read the config (or log that it will not).
        sig = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
        if sig == signal.SIGTERM:
            stopping.append(sig)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # Installed before the first fork: a signal that comes while the workers start is not lost.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(args.concurrency):
        if stopping:
            break
        pid = os.fork()
        if pid == 0:
            # Until the worker's loop takes over the signals, a stop signal is remembered (the worker
            # drains as soon as it runs); the default action would kill a starting worker.
            signal.signal(signal.SIGTERM, _early_signal)
            signal.signal(signal.SIGINT, _early_signal)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = 1
            try:
                code = _run_worker(cfg, args, index, node, rundir)
            finally:
                os._exit(code)
        children.append(pid)
    if stopping:
        # A stop that came between a fork and its append: tell every worker again (draining twice is a no-op).
        forward(signal.SIGTERM, None)
    status = 0
    for pid in children:
        _, code = os.waitpid(pid, 0)  # retried across our signal handlers (PEP 475)
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1
    shutil.rmtree(rundir, ignore_errors=True)
    return status


def _wait_ready(args: argparse.Namespace) -> int:
    from meshproxy.ready import wait_ready

    ok, last = wait_ready(args.url, args.timeout)
    if not ok:
        print(f"meshproxy: wait-ready: {args.url} not ready after {args.timeout:g}s (last: {last})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        return _wait_ready(args)
    if args.command == "iptables":
        return iptables.run(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from meshproxy.config import ConfigError

    try:
        if args.control_plane:
            node, cfg = control_plane_node(args), None
        else:
            node, cfg = None, load_config(args)
    except ConfigError as e:
        print(f"meshproxy: error: {e}", file=sys.stderr)
        return 2
    if args.otlp_endpoint:
        from meshproxy.telemetry import tracing

        try:
            tracing.check_available()  # once, before any worker starts
        except tracing.TracingUnavailable as e:
            print(f"meshproxy: error: {e}", file=sys.stderr)
            return 2
    if args.concurrency == 1:
        return _run_worker(cfg, args, 0, node)
    if node is not None:
        return _supervise(None, args, node)
    for ls in cfg.listeners:
        if ls.address.endswith(":0"):
            print(f"meshproxy: error: listener {ls.name}: port 0 cannot be shared by several workers", file=sys.stderr)
            return 2
    return _supervise(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
