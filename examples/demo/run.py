"""``make demo``: a whole mesh on loopback, and a canary split changed live by editing its YAML.

    .venv/bin/python examples/demo/run.py [--seconds 6] [--forever]    (or DEMO_SECONDS=6 DEMO_FOREVER=1)

It owns the demo's orchestration: it copies examples/demo/mesh to a temporary folder (the
repository's files are never changed) and starts, on free loopback ports, the control plane
reading that copy, one reviews server per endpoint of its ServiceEntry, and the client's
sidecar; the client (client.Trickle) runs in this process, so that every call is timed on one
clock. It shows the seed's split (80/20) for ``--seconds``, rewrites the copy of the
VirtualService to an even split, shows that for ``--seconds`` (then, with ``--forever``, until
Ctrl-C), stops everything (SIGTERM, then SIGKILL after a timeout) and checks what it saw.

Exit 0 only if both splits were observed within statistical bounds, the change took effect
soon after the edit, no call failed and every process stopped cleanly; 1 if not; 130 if
interrupted before the end.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from client import RATE, Call, Trickle, channel_options, print_lines, reviews_pb2, reviews_pb2_grpc, shares

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HOST = "127.0.0.1"
#: The files of examples/demo/mesh the demo reads and edits, and the objects in them.
SERVICE_FILE, ROUTE_FILE = "reviews.yaml", "reviews-route.yaml"
SERVICE = "reviews"
#: What the client's calls carry as :authority: the ServiceEntry's host and port.
AUTHORITY = "reviews.local:9080"

#: A phase's observed share may differ from the expected one by this many standard deviations
#: (binomial, over the phase's calls) plus SLACK: a wrong split fails, chance does not.
SIGMAS, SLACK = 3.5, 0.02
#: After the edit, the split must have changed within this long (at most half a phase); the
#: calls sent from then on are the ones held to the new split.
SETTLE = 2.0
MIN_CALLS = 20


class DemoError(Exception):
    """The demo cannot go on; ``child`` is the process whose log explains why, if one does."""

    def __init__(self, message: str, child: Child | None = None) -> None:
        super().__init__(message)
        self.child = child


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) while starting up."""


# -- processes --------------------------------------------------------------------


class Child:
    """One process of the demo, its output in a log file. It runs in a session of its own, so a
    Ctrl-C in the terminal reaches only the demo, which then stops each process once, in order
    (two signals, the terminal's and the demo's, could cut a graceful stop short)."""

    def __init__(self, name: str, argv: Sequence[str | os.PathLike[str] | int], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name.replace(' ', '-')}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read {self.log}: {e})"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self, timeout: float) -> str | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. None if it stopped cleanly (exit 0),
        else what went wrong."""
        code = self.popen.poll()
        if code is not None:
            return None if code == 0 else f"had {ended(code)} by itself"
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            return f"did not stop within {timeout:.0f}s of SIGTERM, killed"
        return None if code == 0 else f"{ended(code)} on SIGTERM"


def ended(code: int) -> str:
    """How a process ended, from its Popen returncode (negative: the signal that killed it)."""
    return f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nobody listens on right now (all held open until all are picked)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(ready: Callable[[], bool], timeout: float, stop: threading.Event, child: Child) -> bool:
    """Poll ``ready`` until it is true (True) or ``timeout`` passes (False); raise if ``child``
    exits or the demo is interrupted meanwhile."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not child.alive():
            raise DemoError(f"{child.name} {ended(child.popen.returncode)} while starting", child)
        if time.monotonic() >= deadline:
            return False
        if stop.wait(0.1):
            raise Interrupted
    return True


def listening(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def wait_listening(child: Child, port: int, timeout: float, stop: threading.Event) -> None:
    if not wait_until(listening(port), timeout, stop, child):
        raise DemoError(f"{child.name} is not listening on {HOST}:{port} after {timeout:.0f}s", child)


def wait_answer(child: Child, target: str, authority: str | None, timeout: float, stop: threading.Event) -> str:
    """Call GetReview at ``target`` until one call answers; return the version that did."""
    options = channel_options(authority) if authority else [("grpc.enable_http_proxy", 0)]
    version = last_error = ""

    def call() -> bool:
        nonlocal version, last_error
        try:
            version = stub.GetReview(reviews_pb2.GetReviewRequest(product="a probe"), timeout=1).version
        except grpc.RpcError as e:
            last_error = f"{e.code().name}: {e.details()}"
            return False
        return True

    with grpc.insecure_channel(target, options=options) as channel:
        stub = reviews_pb2_grpc.ReviewsStub(channel)
        if not wait_until(call, timeout, stop, child):
            raise DemoError(f"no call through {target} answered within {timeout:.0f}s; the last: {last_error}", child)
    return version


# -- the mesh's YAML ----------------------------------------------------------------


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str, path: Path) -> dict[str, Any]:
    for doc in docs:
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == SERVICE:
            return doc
    raise DemoError(f"{path}: no {kind} named {SERVICE!r}")


def save(path: Path, docs: list[dict[str, Any]], why: str) -> None:
    """Write ``docs`` to ``path`` as a user's editor would: whole, in one step (a new file
    renamed over the old one), so the control plane never reads half of it."""
    text = f"# {why}\n" + yaml.safe_dump_all(docs, sort_keys=False)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def place_servers(mesh: Path) -> dict[str, int]:
    """Give each endpoint of the ServiceEntry a free port, in the copy; return {version: port}."""
    path = mesh / SERVICE_FILE
    docs = load(path)
    endpoints = find(docs, "ServiceEntry", path)["spec"]["endpoints"]
    ports = free_ports(len(endpoints))
    placed = {}
    for endpoint, port in zip(endpoints, ports, strict=True):
        placed[endpoint["labels"]["version"]] = port
        endpoint["ports"] = {"grpc": port}
    save(path, docs, "A copy of examples/demo/mesh/reviews.yaml, with the endpoints on the ports the demo picked.")
    return dict(sorted(placed.items()))


def route_weights(mesh: Path) -> dict[str, int]:
    """The VirtualService's weights, by the version label of each destination's subset."""
    service_path, route_path = mesh / SERVICE_FILE, mesh / ROUTE_FILE
    subsets = {
        s["name"]: s["labels"]["version"]
        for s in find(load(service_path), "DestinationRule", service_path)["spec"]["subsets"]
    }
    route = find(load(route_path), "VirtualService", route_path)["spec"]["http"][0]["route"]
    return {subsets[d["destination"]["subset"]]: d.get("weight", 100) for d in route}


def even_split(mesh: Path) -> dict[str, int]:
    """Rewrite the VirtualService in ``mesh`` to split evenly (50/50); return the new weights by version."""
    path = mesh / ROUTE_FILE
    docs = load(path)
    route = find(docs, "VirtualService", path)["spec"]["http"][0]["route"]
    for i, destination in enumerate(route):
        # Whole percents that add up to 100 (the first destinations take the remainder).
        destination["weight"] = 100 // len(route) + (i < 100 % len(route))
    save(path, docs, "Rewritten by the demo: an even split.")
    return route_weights(mesh)


# -- what was seen ------------------------------------------------------------------


def as_shares(weights: dict[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {v: w / total for v, w in weights.items()}


def split_words(weights: dict[str, int]) -> str:
    return ", ".join(f"{w}% to {v}" for v, w in weights.items())


@dataclass
class Verdict:
    """The calls of one phase held to the split expected in it (shares by version)."""

    label: str
    expected: dict[str, float]
    calls: list[Call]

    def problems(self) -> list[str]:
        answered, errors = shares(self.calls)
        n = sum(answered.values())
        found = []
        if errors:
            found.append(f"{self.label}: {sum(errors.values())} of {len(self.calls)} calls failed ({dict(errors)})")
        if n < MIN_CALLS:
            return [*found, f"{self.label}: only {n} calls answered, too few to judge the split"]
        for version in sorted(set(self.expected) | set(answered)):
            p, seen = self.expected.get(version, 0.0), answered[version] / n
            if abs(seen - p) > SIGMAS * math.sqrt(p * (1 - p) / n) + SLACK:
                found.append(f"{self.label}: {version} answered {seen:.1%} of the calls, expected {p:.0%}")
        return found

    def line(self) -> str:
        answered, errors = shares(self.calls)
        n = sum(answered.values())
        seen = "  ".join(f"{v} {answered[v] / n:.1%}" for v in sorted(set(self.expected) | set(answered))) if n else "-"
        want = "/".join(f"{p * 100:.0f}" for p in self.expected.values())
        verdict = "ok" if not self.problems() else "NOT AS EXPECTED"
        tally = f"of {n} calls, {sum(errors.values())} failed"
        return f"{self.label:<27} {seen:<18}  {tally:<24} expected {want:<6} {verdict}"


def change_time(calls: list[Call], before: dict[str, float], after: dict[str, float]) -> float | None:
    """When the split switched from ``before`` to ``after``: the send time of the first call after
    the most likely change point (maximum likelihood: where the running sum of each answer's
    log-likelihood ratio, after over before, is lowest). None if the calls never switched."""
    answered = sorted((c for c in calls if c.version is not None), key=lambda c: c.started)
    total = lowest = 0.0
    change_at = 0
    for i, c in enumerate(answered):
        # A floor keeps a version absent from one split from weighing infinitely.
        total += math.log(max(after.get(c.version, 0.0), 0.01) / max(before.get(c.version, 0.0), 0.01))
        if total < lowest:
            lowest, change_at = total, i + 1
    return answered[change_at].started if change_at < len(answered) else None


# -- the demo -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("DEMO_SECONDS") or 6),
        help="how long each split is shown (default 6, or DEMO_SECONDS; at least 2)",
    )
    parser.add_argument(
        "--forever",
        action="store_true",
        default=os.environ.get("DEMO_FOREVER", "") not in ("", "0"),
        help="after both splits, keep going until Ctrl-C (or DEMO_FOREVER=1)",
    )
    args = parser.parse_args(argv)
    if args.seconds < 2:
        parser.error("--seconds must be at least 2: a split needs a few dozen calls to show")
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


def row(name: str, where: str, what: str) -> None:
    say(f"  {name:<16} {where:<17} {what}")


class Demo:
    """One run: the processes it started, the client, and what it found wrong (``problems``)."""

    def __init__(self, args: argparse.Namespace, work: Path, stop: threading.Event) -> None:
        self.args = args
        self.stop = stop
        self.mesh = work / "mesh"
        self.logs = work / "logs"
        self.children: list[Child] = []
        self.trickle: Trickle | None = None
        self.problems: list[str] = []
        self.report: list[str] = []

    def child(self, name: str, argv: Sequence[str | os.PathLike[str] | int]) -> Child:
        child = Child(name, argv, self.logs)
        self.children.append(child)
        return child

    def start(self) -> tuple[list[str], str]:
        """Start every process and wait until each works; return (the versions served, the sidecar's address)."""
        shutil.copytree(HERE / "mesh", self.mesh)
        self.logs.mkdir()
        servers = place_servers(self.mesh)
        control_port, sidecar_port, admin_port, metrics_port = free_ports(4)
        control, sidecar = f"{HOST}:{control_port}", f"{HOST}:{sidecar_port}"
        py = sys.executable
        say("meshproxy demo: a service mesh on this machine's loopback, configured by Istio-style YAML")
        say(f"Starting the control plane, {len(servers)} versions of a reviews service and a client's sidecar ...\n")

        plane = self.child(
            "control plane", [py, "-m", "control", "serve", "--config-dir", self.mesh, "--listen", control]
        )
        backends = {
            version: self.child(
                f"reviews {version}", [py, HERE / "reviews_server.py", "--version", version, "--port", port]
            )
            for version, port in servers.items()
        }
        wait_listening(plane, control_port, 20, self.stop)
        # The sidecar comes once the control plane listens, so that its first connection succeeds.
        side = self.child(
            "client sidecar",
            [
                *(py, "-m", "meshproxy", "run", "--control-plane", control, "--listen", sidecar),
                *("--node-id", "demo-client", "--namespace", "default", "--workload", "client"),
                *("--labels", "app=client", "--admin", f"{HOST}:{admin_port}", "--metrics", f"{HOST}:{metrics_port}"),
            ],
        )
        for version, port in servers.items():
            wait_listening(backends[version], port, 15, self.stop)
        wait_listening(side, sidecar_port, 20, self.stop)
        # Every process is started before this one opens a gRPC channel (grpcio and fork do not mix).
        for version, port in servers.items():
            answered = wait_answer(backends[version], f"{HOST}:{port}", None, 10, self.stop)
            if answered != version:
                raise DemoError(
                    f"the server on port {port} says it is {answered}, expected {version}", backends[version]
                )
        wait_answer(side, sidecar, AUTHORITY, 30, self.stop)

        row("control plane", control, f"reads the mesh's YAML from {self.mesh}")
        row("", "", "(a copy of examples/demo/mesh: the demo edits the copy, never the repository)")
        row("", "", "and pushes routes to the sidecars")
        for version, port in servers.items():
            row(
                f"reviews {version}",
                f"{HOST}:{port}",
                f'a small gRPC service (reviews.proto); its answers say "{version}"',
            )
        row("client sidecar", sidecar, "meshproxy, the client's proxy: it passes each call on to a reviews server,")
        row("", "", "as the routes it got from the control plane say")
        row("client", "(this process)", f"{RATE:.0f} calls a second to {AUTHORITY}, all through its sidecar")
        say()
        return list(servers), sidecar

    def run(self) -> int:
        try:
            versions, sidecar = self.start()
        except Interrupted:
            say("\ninterrupted while starting")
            return 130
        seconds = self.args.seconds
        before = route_weights(self.mesh)
        say(f'The VirtualService "{SERVICE}" ({ROUTE_FILE}) routes {split_words(before)}.')
        say("Each line: the calls of one second, and the share of them each version answered.")
        say()
        self.trickle = trickle = Trickle(sidecar, AUTHORITY).start()
        if not print_lines(trickle, versions, seconds, self.stop, sys.stdout):
            return self.interrupted()

        after = even_split(self.mesh)
        edited = time.monotonic()
        say(f"\n>>> t={edited - trickle.started:.0f}s  the demo rewrote the VirtualService to {split_words(after)}")
        say(f">>> ({self.mesh / ROUTE_FILE})")
        say(">>> the control plane sees the file change and pushes new routes to the sidecar\n")
        if not print_lines(trickle, versions, seconds, self.stop, sys.stdout):
            return self.interrupted()
        ended = time.monotonic()
        self.judge(before, after, edited, ended)
        if self.args.forever:
            say("\n(DEMO_FOREVER: running until Ctrl-C)\n")
            print_lines(trickle, versions, None, self.stop, sys.stdout)
        return 0

    def judge(self, before: dict[str, int], after: dict[str, int], edited: float, ended: float) -> None:
        """Hold the calls to the weights ``before`` and ``after`` the edit; note what is off."""
        assert self.trickle is not None
        p0, p1 = as_shares(before), as_shares(after)
        settle = min(SETTLE, self.args.seconds / 2)
        first = Verdict("before the edit", p0, self.trickle.calls(self.trickle.started, edited))
        second = Verdict(f"after the edit (from +{settle:.0f}s)", p1, self.trickle.calls(edited + settle, ended))
        self.report += [first.line(), second.line()]
        self.problems += first.problems() + second.problems()
        changed = change_time(self.trickle.calls(edited, ended), p0, p1)
        if changed is None:
            self.problems.append("the split did not change after the edit")
            self.report.append("the split did not change after the edit   NOT AS EXPECTED")
            return
        took = changed - edited
        ok = took <= settle
        if not ok:
            self.problems.append(f"the split took {took:.2f}s to change after the edit (expected under {settle:.0f}s)")
        self.report.append(
            f"the split changed {took * 1000:.0f} ms after the edit was saved"
            f" (file watch, push, sidecar config swap)   {'ok' if ok else 'TOO SLOW'}"
        )
        errors = sum(1 for c in self.trickle.calls(edited, edited + settle) if c.error)
        if errors:
            self.problems.append(f"{errors} calls failed while the routes changed")

    def interrupted(self) -> int:
        self.report.append("interrupted before both splits were shown")
        return 130

    def shut_down(self) -> None:
        """The client first (so no call meets a stopping sidecar), then the rest in reverse order of start."""
        if self.trickle is not None:
            self.trickle.stop()
        troubles = []
        for child in reversed(self.children):
            trouble = child.stop(15)
            if trouble:
                troubles.append(f"{child.name} {trouble}")
                say(f"--- {child.name} {trouble}; the end of its log ({child.log}):\n{child.tail()}")
        self.problems += troubles
        if self.children:
            names = ", ".join(c.name for c in reversed(self.children))
            self.report.append(f"stopped {names}   {'ok' if not troubles else 'NOT CLEANLY'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    work = Path(tempfile.mkdtemp(prefix="meshproxy-demo-"))
    demo = Demo(args, work, stop)
    try:
        code = demo.run()
    except DemoError as e:
        demo.problems.append(str(e))
        say(f"\ndemo failed: {e}")
        if e.child is not None:
            say(f"--- the end of {e.child.name}'s log ({e.child.log}):\n{e.child.tail()}\n---")
        code = 1
    finally:
        demo.shut_down()
    say("\nWhat the demo saw")
    for line in demo.report:
        say(f"  {line}")
    if demo.problems:
        say("\ndemo: FAILED\n" + "\n".join(f"  - {p}" for p in demo.problems))
        say(f"  (logs kept in {demo.logs})")
        return code or 1
    shutil.rmtree(work, ignore_errors=True)
    say("\ndemo: ok" if code == 0 else "\ndemo: stopped early")
    return code


if __name__ == "__main__":
    sys.exit(main())
