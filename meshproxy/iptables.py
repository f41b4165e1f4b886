"""``meshproxy iptables``: the pod's traffic capture, what the ``meshproxy-init`` container runs.

Owns the nat-table rules that send a pod's TCP through its sidecar, Istio's design:

- ``MESHPROXY_OUTPUT`` (from ``OUTPUT``): the app's outbound TCP goes to ``MESHPROXY_REDIRECT``
  (REDIRECT to the outbound port, 15001), except the proxy's own traffic (uid/gid 1337, owner
  match), loopback traffic, excluded ports and CIDRs, and destinations outside the included CIDRs.
  One loopback case goes to the inbound path instead: the proxy connecting to the pod's own
  address (it picked its own pod as an endpoint), so that the inbound side still sees it.
- ``MESHPROXY_INBOUND`` (from ``PREROUTING``): TCP arriving for included ports, minus excluded
  ones, goes to ``MESHPROXY_IN_REDIRECT`` (REDIRECT to the inbound port, 15006). The proxy's
  own ports (15090, 15021, 15020, the outbound and inbound ports) are never captured.

Each family (IPv4 with iptables; IPv6 with ip6tables when the node has it) is changed by one
``iptables-restore --noflush`` transaction: our chains are declared (created, or flushed if
present) and filled, and the jumps into them added only when absent, so running twice gives the
same rules and a refused transaction changes nothing. If IPv6 fails after IPv4 succeeded, IPv4's
nat table is put back as it was. ``--cleanup`` removes our chains and jumps; ``--dry-run``
prints the transactions and changes nothing.

The rule texts are built by pure functions (``chain_rules``, ``apply_input``,
``cleanup_input``) from the ``iptables-save`` text of the nat table; only ``run`` touches the
system.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from meshproxy.cliargs import Parser

__all__ = [
    "ALWAYS_EXCLUDED_INBOUND",
    "CHAINS",
    "IPV4",
    "IPV6",
    "Capture",
    "Family",
    "add_parser",
    "apply_input",
    "chain_rules",
    "cleanup_input",
    "main",
    "run",
]

OUTPUT, REDIRECT, INBOUND, IN_REDIRECT = CHAINS = (
    "MESHPROXY_OUTPUT",
    "MESHPROXY_REDIRECT",
    "MESHPROXY_INBOUND",
    "MESHPROXY_IN_REDIRECT",
)

#: The sidecar's metrics, readiness and (Istio's) agent ports: never captured inbound.
ALWAYS_EXCLUDED_INBOUND = (15090, 15021, 15020)

#: The jumps from the built-in chains into ours, as ``iptables-save`` prints them.
JUMPS = (("PREROUTING", f"-p tcp -j {INBOUND}"), ("OUTPUT", f"-p tcp -j {OUTPUT}"))

#: How long iptables-restore waits for the xtables lock (iptables-legacy) before giving up.
LOCK_WAIT_SECONDS = 10

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Family:
    name: str
    version: int
    restore: str
    save: str
    #: The loopback address the proxy's own listeners and the app's local calls use.
    localhost: str
    #: The source address the inbound proxy dials the app from (Istio's 127.0.0.6): its
    #: connections to the pod's address over lo must reach the app, not the inbound path again.
    passthrough_source: str


IPV4 = Family("IPv4", 4, "iptables-restore", "iptables-save", "127.0.0.1/32", "127.0.0.6/32")
IPV6 = Family("IPv6", 6, "ip6tables-restore", "ip6tables-save", "::1/128", "::6/128")


@dataclass(frozen=True)
class Capture:
    """What to capture. ``None`` for an include list means everything (``*``)."""

    proxy_uid: int = 1337
    proxy_gid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15006
    include_outbound_cidrs: tuple[Network, ...] | None = None
    exclude_outbound_cidrs: tuple[Network, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Capture:
        return cls(
            proxy_uid=args.proxy_uid,
            proxy_gid=args.proxy_gid,
            outbound_port=args.outbound_port,
            inbound_port=args.inbound_port,
            include_outbound_cidrs=args.include_outbound_cidrs,
            exclude_outbound_cidrs=args.exclude_outbound_cidrs,
            exclude_outbound_ports=args.exclude_outbound_ports,
            include_inbound_ports=args.include_inbound_ports,
            exclude_inbound_ports=args.exclude_inbound_ports,
        )

    def inbound_never(self) -> tuple[int, ...]:
        """The inbound ports left alone whatever the include list says."""
        ports = (*ALWAYS_EXCLUDED_INBOUND, self.outbound_port, self.inbound_port, *self.exclude_inbound_ports)
        return tuple(dict.fromkeys(ports))


# ---- rule generation (pure) ----------------------------------------------------------------


def _of(family: Family, networks: Sequence[Network]) -> list[str]:
    return [str(n) for n in networks if n.version == family.version]


def chain_rules(capture: Capture, family: Family) -> list[str]:
    """The ``-A`` lines filling our four chains for one family."""
    rules = [
        f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {capture.outbound_port}",
        f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {capture.inbound_port}",
    ]

    # Inbound: an explicit list captures only its ports; "*" captures all but the excluded.
    never = capture.inbound_never()
    if capture.include_inbound_ports is None:
        rules += [f"-A {INBOUND} -p tcp -m tcp --dport {port} -j RETURN" for port in never]
        rules.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
    else:
        rules += [
            f"-A {INBOUND} -p tcp -m tcp --dport {port} -j {IN_REDIRECT}"
            for port in capture.include_inbound_ports
            if port not in never
        ]

    out = f"-A {OUTPUT}"
    owners = (f"--uid-owner {capture.proxy_uid}", f"--gid-owner {capture.proxy_gid}")
    # The inbound proxy dials the app from the passthrough source: straight to the app.
    rules.append(f"{out} -s {family.passthrough_source} -o lo -j RETURN")
    # The proxy dialling the pod's own address (not localhost) over lo: its own pod was picked
    # as the endpoint, so the connection goes through the inbound side like any other.
    rules += [f"{out} ! -d {family.localhost} -o lo -m owner {owner} -j {IN_REDIRECT}" for owner in owners]
    # Anything else over lo (localhost, the app calling its own address) stays local.
    rules.append(f"{out} -o lo -j RETURN")
    # The proxy's own outbound connections must not loop back into it.
    rules += [f"{out} -m owner {owner} -j RETURN" for owner in owners]
    rules += [f"{out} -p tcp -m tcp --dport {port} -j RETURN" for port in capture.exclude_outbound_ports]
    rules += [f"{out} -d {cidr} -j RETURN" for cidr in _of(family, capture.exclude_outbound_cidrs)]
    if capture.include_outbound_cidrs is None:
        rules.append(f"{out} -j {REDIRECT}")
    else:
        rules += [f"{out} -d {cidr} -j {REDIRECT}" for cidr in _of(family, capture.include_outbound_cidrs)]
    return rules


@dataclass(frozen=True)
class _NatState:
    chains: tuple[str, ...]  # our chains that exist
    jumps: tuple[tuple[str, str], ...]  # (chain, rule spec) of rules outside ours that target ours


def _parse_nat(save_text: str) -> _NatState:
    """Our chains and the jumps into them, from ``iptables-save`` output (its nat table)."""
    chains: list[str] = []
    jumps: list[tuple[str, str]] = []
    table = None
    for line in save_text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
        elif table != "nat":
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in CHAINS:
                chains.append(name)
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            words = spec.split()
            target = words[words.index("-j") + 1] if "-j" in words[:-1] else None
            if chain not in CHAINS and target in CHAINS:
                jumps.append((chain, spec))
    return _NatState(tuple(chains), tuple(jumps))


def apply_input(capture: Capture, family: Family, save_text: str = "") -> str:
    """The ``iptables-restore --noflush`` input installing our rules over the current nat table."""
    state = _parse_nat(save_text)
    lines = ["*nat"]
    # Declaring a chain creates it, or flushes it when it exists: no duplicates on a rerun.
    lines += [f":{chain} - [0:0]" for chain in CHAINS]
    lines += chain_rules(capture, family)
    wanted = list(JUMPS)
    for chain, spec in state.jumps:
        if (chain, spec) in wanted:
            wanted.remove((chain, spec))  # keep the first copy of each jump we want
        else:
            lines.append(f"-D {chain} {spec}")  # a stale jump or a duplicate
    # Insert first, ahead of anything else in the built-in chains.
    lines += [f"-I {chain} 1 {spec}" for chain, spec in wanted]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def cleanup_input(save_text: str) -> str | None:
    """The ``iptables-restore --noflush`` input removing our chains and jumps; None if none."""
    state = _parse_nat(save_text)
    if not state.chains and not state.jumps:
        return None
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in state.chains]  # flushed, so they can go
    lines += [f"-D {chain} {spec}" for chain, spec in state.jumps]
    lines += [f"-X {chain}" for chain in state.chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---- command line --------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {text} is not in 1-65535")
    return port


def _items(value: str) -> list[str]:
    if not value.strip():
        return []
    items = [item.strip() for item in value.split(",")]
    if "" in items:
        raise argparse.ArgumentTypeError(f"{value!r} has an empty item")
    return items


def _ports(value: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(_port(item) for item in _items(value)))


def _ports_or_all(value: str) -> tuple[int, ...] | None:
    return None if value.strip() == "*" else _ports(value)


def _cidr(text: str) -> Network:
    try:
        # Host bits are allowed (10.1.2.3/8 means 10.0.0.0/8), as Kubernetes users write them.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or CIDR") from None


def _cidrs(value: str) -> tuple[Network, ...]:
    return tuple(dict.fromkeys(_cidr(item) for item in _items(value)))


def _cidrs_or_all(value: str) -> tuple[Network, ...] | None:
    return None if value.strip() == "*" else _cidrs(value)


def _id(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a numeric id") from None
    if not 0 <= n < 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid uid/gid")
    return n


DESCRIPTION = (
    "Program the pod's nat table so that its TCP goes through the sidecar (what the meshproxy-init "
    "container runs; needs NET_ADMIN). PORTS and CIDRS are comma-separated; '*' means all; '' none."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy-uid", type=_id, default=1337, metavar="UID", help="the proxy's uid, not captured")
    p.add_argument("--proxy-gid", type=_id, default=1337, metavar="GID", help="the proxy's gid, not captured")
    p.add_argument("--outbound-port", type=_port, default=15001, metavar="PORT", help="outbound capture port")
    p.add_argument("--inbound-port", type=_port, default=15006, metavar="PORT", help="inbound capture port")
    p.add_argument(
        "--include-outbound-cidrs",
        type=_cidrs_or_all,
        default=None,
        metavar="CIDRS|*",
        help="outbound destinations captured (default *)",
    )
    p.add_argument(
        "--exclude-outbound-cidrs", type=_cidrs, default=(), metavar="CIDRS", help="outbound destinations left alone"
    )
    p.add_argument(
        "--exclude-outbound-ports", type=_ports, default=(), metavar="PORTS", help="outbound ports left alone"
    )
    p.add_argument(
        "--include-inbound-ports",
        type=_ports_or_all,
        default=None,
        metavar="PORTS|*",
        help="inbound ports captured (default *)",
    )
    p.add_argument(
        "--exclude-inbound-ports",
        type=_ports,
        default=(),
        metavar="PORTS",
        help=f"inbound ports left alone (besides {', '.join(map(str, ALWAYS_EXCLUDED_INBOUND))} and the proxy's)",
    )
    p.add_argument("--cleanup", action="store_true", help="remove the rules instead (no error if there are none)")
    p.add_argument("--dry-run", action="store_true", help="print the iptables-restore input; change nothing")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``iptables`` on ``meshproxy``'s subcommands; ``run(args)`` carries it out."""
    p = subparsers.add_parser("iptables", help="program the pod's traffic capture", description=DESCRIPTION)
    _add_arguments(p)
    return p


# ---- applying ------------------------------------------------------------------------------


class _Failed(Exception):
    pass


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def _save(family: Family) -> tuple[str | None, str]:
    """The nat table as ``iptables-save`` prints it, or None and why this family is unavailable."""
    missing = [tool for tool in (family.save, family.restore) if shutil.which(tool) is None]
    if missing:
        return None, f"{' and '.join(missing)} not found"
    try:
        done = subprocess.run([family.save, "-t", "nat"], capture_output=True, text=True, check=False)
    except OSError as e:
        return None, f"{family.save}: {e.strerror}"
    if done.returncode != 0:
        return None, f"{family.save} -t nat failed: {_first_line(done.stderr)}"
    return done.stdout, ""


def _restore(family: Family, text: str, *, noflush: bool = True) -> None:
    cmd = [family.restore, f"--wait={LOCK_WAIT_SECONDS}"] + (["--noflush"] if noflush else [])
    try:
        done = subprocess.run(cmd, input=text, capture_output=True, text=True, check=False)
    except OSError as e:
        raise _Failed(f"{family.restore}: {e.strerror}") from None
    if done.returncode != 0:
        raise _Failed(f"{family.restore} refused the rules: {_first_line(done.stderr)}")


def _rollback(family: Family, before: str) -> None:
    """Put a family's nat table back as ``before`` was (best effort: we are already failing)."""
    try:
        if "*nat" in before:
            _restore(family, before, noflush=False)  # replaces the nat table only
        else:
            current, _ = _save(family)
            undo = cleanup_input(current or "")
            if undo:
                _restore(family, undo)
    except _Failed as e:
        print(f"meshproxy iptables: {family.name}: could not undo: {e}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    capture = Capture.from_args(args)
    inputs: list[tuple[Family, str, str]] = []  # (family, restore input, nat table before)
    for family in (IPV4, IPV6):
        before, why = _save(family)
        if before is None:
            if family is IPV4 and not args.dry_run:
                print(f"meshproxy iptables: {why} (is iptables installed, with NET_ADMIN?)", file=sys.stderr)
                return 1
            note = "assuming an empty nat table" if family is IPV4 else "IPv6 is left alone"
            print(f"meshproxy iptables: {family.name}: {why}; {note}", file=sys.stderr)
            if family is IPV6:
                continue
            before = ""
        text = cleanup_input(before) if args.cleanup else apply_input(capture, family, before)
        if text is None:
            print(f"meshproxy iptables: {family.name}: nothing to clean up")
            continue
        inputs.append((family, text, before))

    if args.dry_run:
        for family, text, _ in inputs:
            sys.stdout.write(f"# {family.restore} --noflush\n{text}")
        return 0

    done: list[tuple[Family, str]] = []
    for family, text, before in inputs:
        try:
            _restore(family, text)
        except _Failed as e:
            for applied, previous in reversed(done):
                _rollback(applied, previous)
            print(f"meshproxy iptables: {family.name}: {e}", file=sys.stderr)
            return 1
        done.append((family, before))
        print(f"meshproxy iptables: {family.name}: {'removed' if args.cleanup else 'installed'} the capture rules")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="meshproxy iptables", description=DESCRIPTION)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
