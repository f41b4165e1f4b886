"""``meshproxy-control serve``: the control plane process.

    meshproxy-control serve --config-dir DIR [--listen ADDR]     # a directory of YAML (local mesh)
    meshproxy-control serve --kubernetes [--kubeconfig FILE]     # in cluster, or from a kubeconfig

Serves ``meshproxy.v1.MeshControl`` on ``--listen`` (default 0.0.0.0:15010,
Istio's plaintext xDS port). Replicas are independent for serving config:
each one watches the sources and answers its own sidecars. With
``--kubernetes`` they also elect a leader through a Lease for the work that
must happen once (the CA secret, the webhook's caBundle, as those land).
SIGTERM/SIGINT stop it: streams end, sidecars keep their config and
reconnect to another replica. Bad flags: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from meshproxy.cliargs import Parser, bind_address, seconds

__all__ = ["build_parser", "main"]

log = logging.getLogger("meshproxy.control")


def _export_to(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError("give '*', '.', or namespaces separated by commas")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meshproxy-control", description="meshproxy's control plane")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    serve = sub.add_parser("serve", help="serve sidecar configs", description="Serve sidecar configs.")
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-dir", metavar="DIR", help="read the mesh's resources from this directory of YAML")
    src.add_argument("--kubernetes", action="store_true", help="read them from Kubernetes")
    serve.add_argument("--kubeconfig", metavar="FILE", help="with --kubernetes: a kubeconfig (default: in-cluster)")
    serve.add_argument("--watch-namespace", metavar="NS", help="with --kubernetes: watch one namespace (default: all)")
    serve.add_argument(
        "--listen",
        metavar="ADDR",
        type=bind_address,
        default="0.0.0.0:15010",
        help="API address (default 0.0.0.0:15010)",
    )
    serve.add_argument(
        "--cluster-domain", default="cluster.local", help="Kubernetes DNS domain (default cluster.local)"
    )
    serve.add_argument(
        "--default-export-to",
        type=_export_to,
        default=("*",),
        metavar="NAMESPACES",
        help="where resources without exportTo are visible: '*' (default, as Istio), '.', or namespaces",
    )
    serve.add_argument("--debounce", type=seconds, default=0.1, metavar="SECONDS", help="quiet period (default 0.1)")
    serve.add_argument(
        "--max-delay", type=seconds, default=1.0, metavar="SECONDS", help="longest wait to push (default 1)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from control.server import ControlServer, serve
    from control.store import Store

    loop = asyncio.get_running_loop()
    store = Store()
    control = ControlServer(
        store,
        cluster_domain=args.cluster_domain,
        default_export_to=args.default_export_to,
        debounce=args.debounce,
        max_delay=args.max_delay,
    )
    stoppers = []
    if args.config_dir:
        from control.sources.files import DirectorySource

        directory = Path(args.config_dir)
        if not directory.is_dir():
            print(f"meshproxy-control: error: --config-dir {directory}: not a directory", file=sys.stderr)
            return 2
        source = DirectorySource(store, directory)
        source.start()
        stoppers.append(source.stop)
    else:
        stoppers.extend(await _kubernetes(args, store, loop))
    control.start(loop)
    try:
        server, _ = await serve(control, args.listen)
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"meshproxy-control: error: cannot listen on {args.listen}: {reason}", file=sys.stderr)
        return 1
    log.info("serving meshproxy.v1.MeshControl on %s", args.listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace=1.0)
    for s in stoppers:
        await s()
    return 0


async def _kubernetes(args: argparse.Namespace, store, loop: asyncio.AbstractEventLoop) -> list:
    from kubernetes import client, config

    from control.leader import LeaderElector
    from control.sources.kube import KubeSource

    configuration = client.Configuration()
    try:
        if args.kubeconfig:
            config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as e:
        raise SystemExit(f"meshproxy-control: error: no Kubernetes credentials: {e}") from None
    # One pooled connection per watch (about 20 kinds) plus the lease: the default pool
    # (5 per CPU) would drop and reopen connections.
    configuration.connection_pool_maxsize = 32
    api = client.ApiClient(configuration)
    source = KubeSource(store, api, namespace=args.watch_namespace)
    source.start()
    # The first configs should reflect the whole cluster, not whatever the first lists returned.
    if not await loop.run_in_executor(None, source.synced.wait, 60.0):
        log.warning("the initial Kubernetes lists are not all done after 60 s; serving what is known")
    namespace = os.environ.get("POD_NAMESPACE", "meshproxy-system")
    identity = os.environ.get("POD_NAME") or socket.gethostname()
    elector = LeaderElector(
        api,
        namespace,
        "meshproxy-control",
        identity,
        on_started_leading=lambda: log.info("%s leads (lease %s/meshproxy-control)", identity, namespace),
        on_stopped_leading=lambda: log.info("%s no longer leads", identity),
    )
    elector.start()

    async def stop() -> None:
        await loop.run_in_executor(None, elector.stop)
        await loop.run_in_executor(None, source.stop)

    return [stop]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kubeconfig and not args.kubernetes:
        print("meshproxy-control: error: --kubeconfig goes with --kubernetes", file=sys.stderr)
        return 2
    if args.watch_namespace and not args.kubernetes:
        print("meshproxy-control: error: --watch-namespace goes with --kubernetes", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop

        return uvloop.run(_serve(args))
    except OSError as e:
        print(f"meshproxy-control: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
