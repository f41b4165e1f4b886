"""Fixtures for the interception tests: a "pod" network namespace joined to a "peer" namespace
by a veth pair (IPv4 and IPv6), created fresh for each test under a unique name and always
deleted, plus listeners started inside either namespace.

The real-rule tests need root and ``ip netns``; they skip with the reason otherwise. The rule
generation tests need neither.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENDPOINTS = Path(__file__).resolve().parent / "endpoints.py"

#: Every wait here is bounded: a command, a listener becoming ready, a client's connection.
COMMAND_TIMEOUT = 30.0
READY_TIMEOUT = 10.0

POD_IP, PEER_IP = "10.77.0.1", "10.77.0.2"
POD_IP6, PEER_IP6 = "fd77::1", "fd77::2"


def netns_unavailable() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "interception tests need root (network namespaces and iptables)"
    if shutil.which("ip") is None:
        return "interception tests need iproute2's `ip netns` (ip is not installed)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def run(argv: list[str], *, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, cwd=REPO, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def normalized_save(text: str) -> str:
    """iptables-save output without its timestamped comments and packet counters, and without
    tables holding nothing (built-in chains with the ACCEPT policy only): with the nf_tables
    backend an empty table lingers once used, and it filters nothing."""
    tables: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("*"):
            tables.append([])
        if line.startswith(":"):
            line = line.split("[")[0].strip()
        tables[-1].append(line)
    builtin = {f":{chain} ACCEPT" for chain in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}
    kept = [table for table in tables if any(line not in builtin for line in table[1:-1])]
    return "\n".join(line for table in kept for line in table)


@dataclass
class Namespaces:
    pod: str
    peer: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def exec(self, ns: str, *argv: str, check: bool = True, env: dict[str, str] | None = None):
        return run(["ip", "netns", "exec", ns, *argv], check=check, env=env)

    def meshproxy_iptables(self, *args: str, check: bool = True, env: dict[str, str] | None = None):
        """``meshproxy iptables ARGS`` inside the pod namespace (as meshproxy-init runs it)."""
        return self.exec(self.pod, sys.executable, "-m", "meshproxy.iptables", *args, check=check, env=env)

    def save(self, family: int = 4) -> str:
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        return normalized_save(self.exec(self.pod, tool).stdout)

    def listen(self, ns: str, *specs: str) -> None:
        """Start listeners (``NAME:ADDR:PORT``) in a namespace; return when they are bound."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(ENDPOINTS), "listen", *specs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.processes.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"listeners {specs} in {ns} did not start: {line!r} {proc.stderr.read()}")

    def connect(
        self,
        ns: str,
        host: str,
        port: int,
        *,
        uid: int | None = None,
        gid: int | None = None,
        source: str | None = None,
        send: str | None = None,
    ) -> str:
        """Dial HOST:PORT from a namespace; the line the listener that answered sent (or ERR ...)."""
        argv = [sys.executable, str(ENDPOINTS), "connect"]
        if uid is not None:
            argv += ["--uid", str(uid)]
        if gid is not None:
            argv += ["--gid", str(gid)]
        if source is not None:
            argv += ["--source", source]
        if send is not None:
            argv += ["--send", send]
        return self.exec(ns, *argv, host, str(port), check=False).stdout.strip()

    def close(self) -> None:
        for proc in self.processes:
            proc.kill()
            try:
                proc.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        for ns in (self.pod, self.peer):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=COMMAND_TIMEOUT, check=False)


def _setup(ns: Namespaces, token: str) -> None:
    pod_if, peer_if = f"mpi{token}p", f"mpi{token}q"  # at most 15 characters
    run(["ip", "netns", "add", ns.pod])
    run(["ip", "netns", "add", ns.peer])
    run(["ip", "link", "add", pod_if, "type", "veth", "peer", "name", peer_if])
    run(["ip", "link", "set", pod_if, "netns", ns.pod])
    run(["ip", "link", "set", peer_if, "netns", ns.peer])
    for name, dev, ip4, ip6 in ((ns.pod, pod_if, POD_IP, POD_IP6), (ns.peer, peer_if, PEER_IP, PEER_IP6)):
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", name, "addr", "add", f"{ip4}/24", "dev", dev])
        # nodad: the address is usable at once instead of after duplicate detection.
        run(["ip", "-n", name, "addr", "add", f"{ip6}/64", "dev", dev, "nodad"])
        run(["ip", "-n", name, "link", "set", dev, "up"])
    # As in a real pod: everything off-link goes out of the pod's interface.
    run(["ip", "-n", ns.pod, "route", "add", "default", "via", PEER_IP])
    run(["ip", "-n", ns.pod, "-6", "route", "add", "default", "via", PEER_IP6])


@pytest.fixture
def netns():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    token = secrets.token_hex(4)
    ns = Namespaces(pod=f"mpi-{token}-pod", peer=f"mpi-{token}-peer")
    try:
        _setup(ns, token)
        _wait_link(ns)
        yield ns
    finally:
        ns.close()


def _wait_link(ns: Namespaces) -> None:
    """The veth pair carries traffic (a listener in the peer answers), bounded."""
    ns.listen(ns.peer, f"probe:{PEER_IP}:9")
    deadline = time.monotonic() + READY_TIMEOUT
    while (answer := ns.connect(ns.pod, PEER_IP, 9)) != f"probe {PEER_IP}:9":
        if time.monotonic() > deadline:
            raise AssertionError(f"the veth pair does not carry traffic: {answer}")
        time.sleep(0.05)
