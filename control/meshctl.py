"""``meshctl``: the operator's command line.

    meshctl proxy-status [--control-plane ADDR] [--namespace NS] [--node-id ID]
    meshctl proxy-config ADDR [listeners|routes|clusters|endpoints] [--cluster NAME]
    meshctl stats ADDR [--prefix P ...]
    meshctl top ADDR [ADDR ...] [--interval SECONDS] [--count N]
    meshctl analyze -f DIR|FILE|- [-f ...]
    meshctl inject -f FILE|- [-o FILE] [--native|--classic] [--rewrite-probes] [--sidecar-image IMAGE]
                   [--control-plane ADDR]

Every command but ``inject`` takes ``-o table|json|yaml`` (table by default;
``inject`` prints manifests, and its ``-o`` is a file to write them to). Exit
status: 0 done, 1 the command ran and failed (a peer not reachable, a sidecar
NACKing, resources that would be rejected), 2 bad usage; an error is one line
on stderr, never a traceback. The live commands take ``--timeout SECONDS`` (5)
per call; ADDR is a sidecar's admin address (``meshproxy run --admin``,
127.0.0.1:15000 by default) or, for ``--control-plane``, the control plane's
(127.0.0.1:15010 unless ``$MESHCTL_CONTROL_PLANE`` says otherwise).

``proxy-status``, ``proxy-config`` and ``stats`` are in control.proxyctl and
``top`` in control.ctl_top.

``analyze`` checks mesh resources offline, exactly as the control plane
would: every file and document is read, each resource checked on its own,
then across resources (routes to unknown hosts or subsets, hosts claimed
twice). It prints one line per problem and exits 1 if any resource would
be rejected, 0 otherwise (warnings included). Bad arguments: one line on
stderr, exit 2.

``inject`` is the webhook's mutation offline (``injector.mutate``): every Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob in the
multi-document YAML gets the sidecar in its pod template (items of a ``List``
too); other documents pass through unchanged, in their order. Probes are
rewritten only with ``--rewrite-probes`` (the webhook decides from the pod's
PeerAuthentication; offline there is none to read). Output goes to stdout or
``-o FILE``, all or nothing: a document that cannot be injected (a bad
annotation), or input that is not YAML, is one line on stderr and exit 1;
a missing file, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from control.ctl_output import FORMATS, CtlError
from meshproxy.cliargs import Parser, address

__all__ = ["build_parser", "main"]

DEFAULT_CONTROL_PLANE = "127.0.0.1:15010"
CONTROL_PLANE_ENV = "MESHCTL_CONTROL_PLANE"
EPILOG = "Exit status: 0 done, 1 failed (unreachable, bad state), 2 bad usage."


def _interval(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not s > 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return s


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="meshctl",
        description="Inspect and check a meshproxy mesh.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    output = Parser(add_help=False)
    output.add_argument(
        "-o", "--output", choices=FORMATS, default="table", help="output format: table (default), json or yaml"
    )
    live = Parser(add_help=False)
    live.add_argument(
        "--timeout", type=_interval, default=5.0, metavar="SECONDS", help="deadline of each call (default 5)"
    )

    status = sub.add_parser(
        "proxy-status",
        parents=[output, live],
        help="every sidecar connected to the control plane, and its config's state",
        description="List the sidecar workers subscribed to a control plane replica: when they connected, the "
        "config version they were sent and the one they ACKed, and their last NACK. "
        "STATUS is SYNCED (it runs what it should), STALE (a newer version is on its way) or NACKED (it refused "
        "the last version and keeps its previous one). Exit 1 if any sidecar is NACKED.",
        epilog=EPILOG,
    )
    status.add_argument(
        "--control-plane",
        metavar="ADDR",
        type=address,
        help=f"the control plane's gRPC address (default ${CONTROL_PLANE_ENV} or {DEFAULT_CONTROL_PLANE})",
    )
    status.add_argument("-n", "--namespace", default="", metavar="NS", help="only sidecars in this namespace")
    status.add_argument("--node-id", default="", metavar="ID", help="only this sidecar")

    config = sub.add_parser(
        "proxy-config",
        parents=[output, live],
        help="the config a sidecar runs: listeners, routes, clusters, endpoints",
        description="Show the config in force in the sidecar whose admin service is at ADDR. Without a type: its "
        "version, where it came from, accepted and rejected updates, and each resource's version "
        "(-o json|yaml adds the whole config). endpoints is the live state: health, ejections, active requests, "
        "latency estimate, per worker.",
        epilog=EPILOG,
    )
    config.add_argument("address", metavar="ADDR", type=address, help="the sidecar's admin address (host:port)")
    config.add_argument(
        "type", nargs="?", choices=["listeners", "routes", "clusters", "endpoints"], help="one resource type"
    )
    config.add_argument("--cluster", default="", metavar="NAME", help="clusters, endpoints: only this cluster")

    stats = sub.add_parser(
        "stats",
        parents=[output, live],
        help="a sidecar's metrics, as Prometheus would scrape them",
        description="Print the metrics of the sidecar whose admin service is at ADDR (all its workers summed): "
        "the same names, labels and values as its /metrics endpoint.",
        epilog=EPILOG,
    )
    stats.add_argument("address", metavar="ADDR", type=address, help="the sidecar's admin address (host:port)")
    stats.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="P",
        help="only metric families whose name starts with P (repeatable)",
    )

    top = sub.add_parser(
        "top",
        parents=[output, live],
        help="live requests per second, success rate and latency per route",
        description="Poll the sidecars at ADDR... every interval and print, per route (summed over the sidecars), "
        "the requests in the interval, requests per second, success rate (gRPC status 0; HTTP: a response below "
        "500) and p50/p99 latency estimated from the duration histogram as Prometheus' histogram_quantile does. "
        "-o json prints one object per line, -o yaml one document per report.",
        epilog=EPILOG,
    )
    top.add_argument("addresses", nargs="+", metavar="ADDR", type=address, help="sidecars' admin addresses")
    top.add_argument(
        "--interval", type=_interval, default=2.0, metavar="SECONDS", help="seconds per report (default 2)"
    )
    top.add_argument(
        "--count", type=_count, default=0, metavar="N", help="stop after N reports (default 0: until interrupted)"
    )

    analyze = sub.add_parser(
        "analyze",
        parents=[output],
        help="check mesh resources offline",
        description="Check VirtualServices, DestinationRules, ServiceEntries, policies and Kubernetes objects "
        "the way the control plane does. Exit 1 if any would be rejected.",
        epilog=EPILOG,
    )
    analyze.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="PATH",
        help="a YAML file, a directory of them, or - for stdin (repeatable)",
    )
    analyze.add_argument(
        "--cluster-domain", default="cluster.local", help="Kubernetes DNS domain (default cluster.local)"
    )
    inject = sub.add_parser(
        "inject",
        help="add the sidecar to workloads in YAML, offline",
        description="Inject the meshproxy sidecar into the Pods and workloads of multi-document YAML, "
        "as the webhook would. Other documents pass through unchanged.",
        epilog=EPILOG,
    )
    inject.add_argument("-f", "--filename", required=True, metavar="FILE", help="a YAML file, or - for stdin")
    inject.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    mode = inject.add_mutually_exclusive_group()
    mode.add_argument(
        "--native",
        dest="native",
        action="store_const",
        const=True,
        default=True,
        help="a native sidecar (init container, Kubernetes 1.29+) unless a pod's "
        "sidecar.meshproxy.io/nativeSidecar annotation says otherwise (the default)",
    )
    mode.add_argument(
        "--classic",
        dest="native",
        action="store_const",
        const=False,
        help="a classic sidecar container unless a pod's annotation says otherwise",
    )
    inject.add_argument(
        "--rewrite-probes", action="store_true", help="send the apps' HTTP probes through the sidecar (STRICT mTLS)"
    )
    inject.add_argument("--sidecar-image", metavar="IMAGE", help="default meshproxy/proxy:VERSION")
    inject.add_argument(
        "--control-plane",
        metavar="ADDR",
        type=address,
        help="the sidecars' control plane (default meshproxy-control.meshproxy-system.svc:15010)",
    )
    return parser


def _files(paths: list[str]) -> list[Path | None]:
    out: list[Path | None] = []
    for p in paths:
        if p == "-":
            out.append(None)
            continue
        path = Path(p)
        if path.is_dir():
            from control.sources.files import SUFFIXES

            out.extend(
                f for f in sorted(path.iterdir()) if f.suffix in SUFFIXES and not f.name.startswith(".") and f.is_file()
            )
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def analyze(paths: list[str], cluster_domain: str = "cluster.local") -> tuple[list[dict], int]:
    """(problems as dicts, how many resources were read). Raises FileNotFoundError for a missing path."""
    from control.model import parse
    from control.sources.files import read_file, read_text, yaml_error
    from control.translate import Translator

    objects, problems = [], []
    for f in _files(paths):
        origin = "<stdin>" if f is None else str(f)
        try:
            objs, errs = read_text(sys.stdin.read()) if f is None else read_file(f)
        except (OSError, UnicodeDecodeError) as e:
            problems.append({"severity": "error", "resource": origin, "path": "", "message": f"cannot read: {e}"})
            continue
        except yaml.YAMLError as e:
            problems.append({"severity": "error", "resource": origin, "path": "", "message": yaml_error(e)})
            continue
        problems += [{"severity": "error", "resource": origin, "path": "", "message": m} for m in errs]
        objects += [(o, origin) for o in objs]
    translator = Translator(parse(objects, cluster_domain=cluster_domain))
    for p in translator.problems:
        problems.append(
            {"severity": p.severity, "resource": p.resource, "path": p.path, "message": p.message, "origin": p.origin}
        )
    return problems, len(objects)


def _cmd_analyze(args: argparse.Namespace) -> int:
    try:
        problems, count = analyze(args.filename, args.cluster_domain)
    except FileNotFoundError as e:
        print(f"meshctl: error: {e}", file=sys.stderr)
        return 2
    errors = sum(p["severity"] == "error" for p in problems)
    if args.output == "json":
        print(json.dumps({"resources": count, "errors": errors, "problems": problems}, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump({"resources": count, "errors": errors, "problems": problems}, sort_keys=False), end="")
    else:
        for p in problems:
            where = f" ({p['origin']})" if p.get("origin") else ""
            field = f" {p['path']}:" if p["path"] else ""
            print(f"{p['severity'].upper():8}{p['resource']}{where}:{field} {p['message']}")
        warnings = len(problems) - errors
        verdict = "would be rejected" if errors else "OK"
        print(f"{count} resources, {errors} errors, {warnings} warnings: {verdict}")
    return 1 if errors else 0


def inject_documents(text: str, settings) -> list:
    """The documents of ``text`` with the Pods and workloads injected. Raises yaml.YAMLError for input that
    is not YAML and InjectError (naming the document) for one that cannot be injected."""
    from injector.mutate import InjectError, inject

    out = []
    for i, doc in enumerate(yaml.safe_load_all(text), 1):
        if doc is None:  # an empty document (a stray ---)
            continue
        try:
            if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                doc = dict(doc, items=[inject(item, settings)[0] for item in doc["items"]])
            elif isinstance(doc, dict):
                doc = inject(doc, settings)[0]
        except InjectError as e:
            raise InjectError(f"document {i}: {e}") from None
        out.append(doc)
    return out


def _cmd_inject(args: argparse.Namespace) -> int:
    from control.sources.files import yaml_error
    from injector.mutate import DEFAULT_CONTROL_PLANE, InjectError, Settings

    origin = "<stdin>" if args.filename == "-" else args.filename
    if args.filename != "-" and not Path(args.filename).is_file():
        print(f"meshctl: error: {args.filename}: no such file or directory", file=sys.stderr)
        return 2
    settings = Settings(
        image=args.sidecar_image or "",
        control_plane=args.control_plane or DEFAULT_CONTROL_PLANE,
        native=args.native,
        rewrite_probes=args.rewrite_probes,
    )
    try:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
        docs = inject_documents(text, settings)
    except (OSError, UnicodeDecodeError) as e:
        print(f"meshctl: error: {origin}: cannot read: {e}", file=sys.stderr)
        return 1
    except yaml.YAMLError as e:
        print(f"meshctl: error: {origin}: {yaml_error(e)}", file=sys.stderr)
        return 1
    except InjectError as e:
        print(f"meshctl: error: {origin}: {e}", file=sys.stderr)
        return 1
    rendered = yaml.safe_dump_all(docs, sort_keys=False) if docs else ""
    if args.output:
        try:
            Path(args.output).write_text(rendered)
        except OSError as e:
            print(f"meshctl: error: -o {args.output}: {e.strerror or e}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(rendered)
    return 0


def _cmd_proxy_status(args: argparse.Namespace) -> int:
    from control.proxyctl import collect_proxy_status, render_proxy_status

    address = args.control_plane or os.environ.get(CONTROL_PLANE_ENV) or DEFAULT_CONTROL_PLANE
    data = collect_proxy_status(address, args.timeout, args.namespace, args.node_id)
    _print(data, args.output, render_proxy_status)
    return 1 if any(p["state"] == "NACKED" for p in data["proxies"]) else 0


def _cmd_proxy_config(args: argparse.Namespace) -> int:
    from control.proxyctl import collect_config, render_config

    if args.cluster and args.type not in ("clusters", "endpoints"):
        raise _Usage("--cluster goes with clusters or endpoints")
    data = collect_config(args.address, args.type, args.timeout, args.cluster)
    _print(data, args.output, lambda d: render_config(d, args.type))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from control.proxyctl import collect_stats, render_stats

    _print(collect_stats(args.address, args.prefix, args.timeout), args.output, render_stats)
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from control.ctl_top import run

    return run(args.addresses, args.interval, args.count, args.output, args.timeout)


def _print(data, fmt: str, render) -> None:
    from control.ctl_output import dump

    if fmt == "table":
        sys.stdout.write(render(data))
    else:
        dump(data, fmt)


class _Usage(Exception):
    """Arguments argparse accepts but that do not go together (exit 2)."""


COMMANDS = {
    "analyze": _cmd_analyze,
    "inject": _cmd_inject,
    "proxy-status": _cmd_proxy_status,
    "proxy-config": _cmd_proxy_config,
    "stats": _cmd_stats,
    "top": _cmd_top,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _Usage as e:
        print(f"meshctl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CtlError as e:
        print(f"meshctl: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        # grpcio comes with the "control" extra; the admin protos with meshproxy itself.
        print(f"meshctl: error: {e.name or e} is not installed (pip install 'meshproxy[control]')", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `meshctl ... | head`: the reader left. Point stdout at /dev/null so that the interpreter's
        # last flush does not fail again on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
