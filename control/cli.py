"""``meshproxy-control serve``: the control plane process.

    meshproxy-control serve --config-dir DIR [--listen ADDR]     # a directory of YAML (local mesh)
    meshproxy-control serve --kubernetes [--kubeconfig FILE]     # in cluster, or from a kubeconfig
        [--webhook [--webhook-listen ADDR] [--webhook-cert-dir DIR] [--sidecar-image IMAGE]]
    meshproxy-control add-token --file FILE --namespace NS --service-account SA   # a local sidecar's token

Serves ``meshproxy.v1.MeshControl`` on ``--listen`` (default 0.0.0.0:15010,
Istio's plaintext xDS port). Replicas are independent for serving config:
each one watches the sources and answers its own sidecars. With
``--kubernetes`` they also elect a leader through a Lease for the work that
must happen once (the CA secret, the webhook's caBundle, as those land).
With ``--webhook`` it also serves the sidecar injector (``injector.webhook``) over HTTPS on
``--webhook-listen`` (default 0.0.0.0:15017, path /inject). Its certificate: ``tls.crt``/``tls.key`` in
``--webhook-cert-dir`` (re-read when they change, as a mounted Secret does); else, with ``--kubernetes``,
Secret ``meshproxy-webhook-tls`` in the control plane's namespace, which the leader creates and whose CA it
writes into the MutatingWebhookConfiguration's caBundle (the webhook listens once the Secret exists);
else a self-signed one made at start, for local use.
The mesh CA (``control.ca``) signs sidecars' certificates (``SignCertificate``) for trust domain
``--trust-domain`` (default cluster.local). Its keys: ``--ca-dir`` (Istio's plug-in CA files:
``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem``; your own root or intermediate,
or, locally, a root made there once); default, with ``--config-dir``, ``$XDG_STATE_HOME/meshproxy/ca``
(``~/.local/state/meshproxy/ca``), and with ``--kubernetes`` Secret ``meshproxy-ca`` in the control
plane's namespace, which the leader creates once and rotates; every replica follows it. Sidecars prove who
they are with their projected service-account token (``--kubernetes``: a TokenReview for audience
``--token-audience``, default meshproxy) or a bootstrap token from ``--bootstrap-tokens FILE``
(``token,namespace,service-account`` lines, mode 0600; see ``control.identity``).
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

WEBHOOK_LISTEN = "0.0.0.0:15017"
# how often a replica looks at the webhook's Secret (until it exists, and then for a replaced one), and how
# often the leader checks the Secret and the caBundle
SECRET_POLL, SECRET_RECHECK, RECONCILE_INTERVAL = 2.0, 30.0, 30.0


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
    mesh_ca = serve.add_argument_group("mesh CA")
    mesh_ca.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    mesh_ca.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="the CA's files (default: $XDG_STATE_HOME/meshproxy/ca locally, Secret meshproxy-ca in cluster)",
    )
    mesh_ca.add_argument(
        "--bootstrap-tokens", metavar="FILE", help="tokens of local sidecars: token,namespace,service-account (0600)"
    )
    mesh_ca.add_argument(
        "--token-audience", default="meshproxy", help="with --kubernetes: the audience of sidecar tokens"
    )
    token = sub.add_parser(
        "add-token",
        help="make a bootstrap token for a local sidecar",
        description="Append a new token for NS/SA to FILE (created with mode 0600) and print it.",
    )
    token.add_argument("--file", required=True, metavar="FILE", help="the --bootstrap-tokens file")
    token.add_argument("--namespace", required=True, metavar="NS")
    token.add_argument("--service-account", required=True, metavar="SA")
    hook = serve.add_argument_group("sidecar injection")
    hook.add_argument("--webhook", action="store_true", help="also serve the sidecar injector webhook")
    hook.add_argument(
        "--webhook-listen",
        metavar="ADDR",
        type=bind_address,
        help=f"the webhook's HTTPS address (default {WEBHOOK_LISTEN})",
    )
    hook.add_argument("--webhook-cert-dir", metavar="DIR", help="a directory with tls.crt and tls.key")
    hook.add_argument("--sidecar-image", metavar="IMAGE", help="the image injected (default meshproxy/proxy:VERSION)")
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from control.ca import CAError
    from control.server import ControlServer, serve
    from control.store import Store

    loop = asyncio.get_running_loop()
    store = Store()
    stoppers = []
    api = None
    ca_tasks: list = []
    if args.config_dir and not Path(args.config_dir).is_dir():
        print(f"meshproxy-control: error: --config-dir {args.config_dir}: not a directory", file=sys.stderr)
        return 2
    try:
        ca, authenticator = _mesh_ca(args)
    except (CAError, ValueError, OSError) as e:
        print(f"meshproxy-control: error: {e}", file=sys.stderr)
        return 2
    control = ControlServer(
        store,
        cluster_domain=args.cluster_domain,
        default_export_to=args.default_export_to,
        debounce=args.debounce,
        max_delay=args.max_delay,
        ca=ca,
        authenticator=authenticator,
        root_namespace=_namespace(),
    )
    ca.on_bundle_change = control.bundle_changed
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
        stopper, api = await _kubernetes(args, store, loop, ca, authenticator)
        stoppers.append(stopper)
        # Every replica signs with what the leader's Secret holds.
        ca_tasks.append(asyncio.create_task(ca.follow()))
    control.start(loop)
    try:
        server, _ = await serve(control, args.listen)
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"meshproxy-control: error: cannot listen on {args.listen}: {reason}", file=sys.stderr)
        return 1
    log.info("serving meshproxy.v1.MeshControl on %s", args.listen)
    if args.webhook:
        try:
            stoppers.insert(0, await _webhook(args, store, api))
        except _CannotStart as e:
            print(f"meshproxy-control: error: {e}", file=sys.stderr)
            await server.stop(grace=None)
            for s in stoppers:
                await s()
            return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    for t in ca_tasks:
        t.cancel()
    await server.stop(grace=1.0)
    for s in stoppers:
        await s()
    return 0


def _mesh_ca(args: argparse.Namespace):
    """The CA and the authenticators of sidecars' tokens (TokenReview's is added with the API client)."""
    from control.ca import CertificateAuthority, DirectoryCAStore
    from control.identity import AnyAuthenticator, BootstrapTokens

    authenticators = []
    if args.bootstrap_tokens:
        authenticators.append(BootstrapTokens(args.bootstrap_tokens))
    directory = args.ca_dir
    if directory is None and args.config_dir:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        directory = os.path.join(state, "meshproxy", "ca")
    store = DirectoryCAStore(directory) if directory else None  # None: the Secret, once the API is known
    ca = CertificateAuthority(store, args.trust_domain)
    if store is not None:
        # Locally the one process creates the root; a --ca-dir in cluster is the user's own CA.
        ca.ensure(create=not args.kubernetes)
        if not ca.ready:
            raise ValueError(f"--ca-dir {directory}: no ca-cert.pem and ca-key.pem")
        log.info("mesh CA from %s (trust domain %s)", directory, args.trust_domain)
    return ca, AnyAuthenticator(authenticators)


class _CannotStart(Exception):
    """The webhook cannot start; the message is the one line to print."""


def _namespace() -> str:
    return os.environ.get("POD_NAMESPACE", "meshproxy-system")


async def _webhook(args: argparse.Namespace, store, api):
    """Start the injector webhook; return its stopper."""
    import ssl

    from injector import certs
    from injector.mutate import Settings
    from injector.webhook import Injector, WebhookServer, store_peer_authentications

    namespace = _namespace()
    injector = Injector(
        Settings(image=args.sidecar_image or "", control_plane=f"meshproxy-control.{namespace}.svc:15010"),
        peer_authentications=store_peer_authentications(store, args.cluster_domain),
        root_namespace=namespace,
    )
    listen = args.webhook_listen or WEBHOOK_LISTEN
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    tasks: list[asyncio.Task] = []
    holder: dict[str, WebhookServer] = {}

    async def start(context: ssl.SSLContext) -> None:
        server = WebhookServer(injector, context, host, int(port))
        await server.start()
        holder["server"] = server
        log.info("serving the sidecar injector on https://%s:%d/inject", host, server.port)

    if args.webhook_cert_dir:
        directory = Path(args.webhook_cert_dir)
        files = (directory / "tls.crt", directory / "tls.key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(*files)
        except (OSError, ssl.SSLError) as e:
            raise _CannotStart(f"--webhook-cert-dir {directory}: cannot load tls.crt and tls.key: {e}") from None
        tasks.append(asyncio.create_task(_reload_files(context, files)))
    elif api is None:
        log.warning("the webhook's certificate is self-signed for this process; give --webhook-cert-dir to keep one")
        context = certs.server_context(certs.WebhookCerts.generate(certs.service_dns_names(namespace=namespace)))
    else:
        context = None
        tasks.append(asyncio.create_task(_follow_secret(api, namespace, start)))
    if context is not None:
        try:
            await start(context)
        except OSError as e:
            for t in tasks:
                t.cancel()
            raise _CannotStart(f"cannot listen on {listen}: {e.strerror or e}") from None

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if "server" in holder:
            await holder["server"].stop()

    return stop


def _stat(files: tuple[Path, ...]) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()  # through the symlinks a mounted Secret swaps on update
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


async def _reload_files(context, files: tuple[Path, ...], interval: float = 10.0) -> None:
    import ssl

    seen = _stat(files)
    while True:
        await asyncio.sleep(interval)
        now = _stat(files)
        if now == seen:
            continue
        seen = now
        try:
            context.load_cert_chain(*files)
            log.info("webhook certificate reloaded from %s", files[0].parent)
        except (OSError, ssl.SSLError) as e:
            log.warning("webhook certificate not reloaded (keeping the old one): %s", e)


async def _follow_secret(api, namespace: str, start) -> None:
    """Serve the Secret's certificate: start the webhook once it exists, load a replaced one."""
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from injector import certs

    core = client.CoreV1Api(api)
    loop = asyncio.get_running_loop()
    context, current, announced = None, None, False
    while True:
        try:
            found = await loop.run_in_executor(None, certs.read_secret, core, namespace)
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            log.warning("secret %s/%s: %s", namespace, certs.SECRET_NAME, getattr(e, "reason", None) or e)
            found = None
        if found is not None and found != current:
            if context is None:
                context = certs.server_context(found)
                try:
                    await start(context)
                except OSError as e:
                    log.error("the webhook cannot listen: %s", e.strerror or e)
                    return
            else:
                certs.load_into(context, found)
                log.info("webhook certificate replaced from secret %s/%s", namespace, certs.SECRET_NAME)
            current = found
        elif context is None and not announced:
            log.info("waiting for secret %s/%s (the leader creates it)", namespace, certs.SECRET_NAME)
            announced = True
        await asyncio.sleep(SECRET_RECHECK if context is not None else SECRET_POLL)


async def _kubernetes(args: argparse.Namespace, store, loop: asyncio.AbstractEventLoop, ca, authenticator):
    from kubernetes import client, config

    from control.leader import LeaderElector, LeaderTask
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
    namespace = _namespace()
    identity = os.environ.get("POD_NAME") or socket.gethostname()
    tasks: list[LeaderTask] = []
    from control.ca import CAReconciler, SecretCAStore
    from control.identity import TokenReviewAuthenticator

    authenticator.authenticators.append(TokenReviewAuthenticator(api, args.token_audience))
    if ca.store is None:
        ca.store = SecretCAStore(api, namespace)
        reconciler = CAReconciler(ca)

        def ca_round() -> None:
            # In the loop's executor, whose threads asyncio.run joins before the interpreter exits: a
            # daemon thread stopped inside cryptography's Rust code at exit aborts the process (SIGABRT).
            asyncio.run_coroutine_threadsafe(_in_executor(reconciler.reconcile), loop).result()

        tasks.append(LeaderTask("mesh-ca", ca_round, interval=RECONCILE_INTERVAL))
    if args.webhook and not args.webhook_cert_dir:
        from injector.certs import WebhookCertReconciler, service_dns_names

        reconciler = WebhookCertReconciler(
            api, namespace, dns_names=service_dns_names(namespace=namespace, domain=args.cluster_domain)
        )
        tasks.append(LeaderTask("webhook-certificate", reconciler.reconcile, interval=RECONCILE_INTERVAL))

    def started() -> None:
        log.info("%s leads (lease %s/meshproxy-control)", identity, namespace)
        for t in tasks:
            t.start()

    def stopped() -> None:
        for t in tasks:
            t.stop()
        log.info("%s no longer leads", identity)

    elector = LeaderElector(
        api, namespace, "meshproxy-control", identity, on_started_leading=started, on_stopped_leading=stopped
    )
    elector.start()

    async def stop() -> None:
        await loop.run_in_executor(None, elector.stop)
        await loop.run_in_executor(None, source.stop)

    return stop, api


async def _in_executor(fn):
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "add-token":
        from control.identity import add_bootstrap_token

        try:
            print(add_bootstrap_token(args.file, args.namespace, args.service_account))
        except (OSError, ValueError) as e:
            print(f"meshproxy-control: error: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
        return 0
    if args.kubeconfig and not args.kubernetes:
        print("meshproxy-control: error: --kubeconfig goes with --kubernetes", file=sys.stderr)
        return 2
    if args.watch_namespace and not args.kubernetes:
        print("meshproxy-control: error: --watch-namespace goes with --kubernetes", file=sys.stderr)
        return 2
    for flag in ("webhook_listen", "webhook_cert_dir", "sidecar_image"):
        if getattr(args, flag) and not args.webhook:
            print(f"meshproxy-control: error: --{flag.replace('_', '-')} goes with --webhook", file=sys.stderr)
            return 2
    if args.webhook_cert_dir and not Path(args.webhook_cert_dir).is_dir():
        print(f"meshproxy-control: error: --webhook-cert-dir {args.webhook_cert_dir}: not a directory", file=sys.stderr)
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
