"""``meshctl``: the operator's command line.

    meshctl analyze -f DIR|FILE|- [-f ...] [-o table|json|yaml]

``analyze`` checks mesh resources offline, exactly as the control plane
would: every file and document is read, each resource checked on its own,
then across resources (routes to unknown hosts or subsets, hosts claimed
twice). It prints one line per problem and exits 1 if any resource would
be rejected, 0 otherwise (warnings included). Bad arguments: one line on
stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from meshproxy.cliargs import Parser

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        return _cmd_analyze(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
