"""``meshctl``: the operator's command line.

    meshctl analyze -f DIR|FILE|- [-f ...] [-o table|json|yaml]
    meshctl inject -f FILE|- [-o FILE] [--native|--classic] [--rewrite-probes] [--sidecar-image IMAGE]
                   [--control-plane ADDR]

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
import sys
from pathlib import Path

import yaml

from meshproxy.cliargs import Parser, address

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meshctl", description="Inspect and check a meshproxy mesh.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    analyze = sub.add_parser(
        "analyze",
        help="check mesh resources offline",
        description="Check VirtualServices, DestinationRules, ServiceEntries, policies and Kubernetes objects "
        "the way the control plane does. Exit 1 if any would be rejected.",
    )
    analyze.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="PATH",
        help="a YAML file, a directory of them, or - for stdin (repeatable)",
    )
    analyze.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    analyze.add_argument("--cluster-domain", default="cluster.local")
    inject = sub.add_parser(
        "inject",
        help="add the sidecar to workloads in YAML, offline",
        description="Inject the meshproxy sidecar into the Pods and workloads of multi-document YAML, "
        "as the webhook would. Other documents pass through unchanged.",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        return _cmd_analyze(args)
    if args.command == "inject":
        return _cmd_inject(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
