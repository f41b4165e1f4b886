"""The sidecar behind real rules: ``meshproxy iptables`` in a pod namespace, then ``meshproxy run``
with transparent listeners, configured by a file or by ``--transparent --inbound-listen``.

The app dials a Service address and an unknown one; a client in the peer namespace dials the
app and the readiness port. The remote listeners speak first (a banner, like MySQL or SMTP):
the sidecar must pass them through after its detection timeout, not stall.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.interception.conftest import PEER_IP, POD_IP, READY_TIMEOUT, REPO, netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))

SERVICE_IP = "10.96.0.10"

CONFIG = f"""\
version: "interception-1"
node: {{ id: app-1.default, namespace: default, workload: app }}
listeners:
  - name: outbound
    address: 0.0.0.0:15001
    transparent: true
    virtual_hosts:
      - name: remote
        domains: ["remote"]
        routes:
          - name: all
            match: {{ prefix: / }}
            route: {{ clusters: [{{ cluster: remote }}] }}
  - name: inbound
    address: 0.0.0.0:15006
    transparent: true
clusters:
  - name: remote
    service_addresses: ["{SERVICE_IP}:80"]
    endpoints:
      - address: {PEER_IP}:8080
"""

COMMAND_LINE = [
    "--listen", "0.0.0.0:15001", "--upstream", f"{PEER_IP}:8080", "--transparent",
    "--inbound-listen", "0.0.0.0:15006", "--ready", "0.0.0.0:15021",
]  # fmt: skip


def start_sidecar(netns, args: list[str]) -> subprocess.Popen:
    netns.meshproxy_iptables()
    netns.listen(netns.peer, "remote:0.0.0.0:8080", "remote:0.0.0.0:9090")
    # The app listens on localhost only: a connection reaching it from outside came via the sidecar.
    netns.listen(netns.pod, "app:127.0.0.1:8080")
    # The sidecar keeps uid 0 (this interpreter may live where uid 1337 cannot read) and runs
    # under gid 1337: the --gid-owner rule is what lets its own connections out.
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns.pod, "setpriv", "--regid", "1337", "--clear-groups", "--",
         sys.executable, "-m", "meshproxy", "run", *args,
         "--admin", "127.0.0.1:15000", "--metrics", "127.0.0.1:15090"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    netns.processes.append(proc)
    return proc


def wait_until(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the sidecar exited {proc.returncode}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("the sidecar did not become ready")
        time.sleep(0.1)


@pytest.fixture
def file_sidecar(netns, tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG)
    proc = start_sidecar(netns, ["--config", str(config)])
    # A connection over lo is never redirected: it reaches the listener once it is bound.
    wait_until(proc, lambda: "ERR" not in netns.connect(netns.pod, "127.0.0.1", 15001))
    return netns


@pytest.fixture
def cli_sidecar(netns):
    proc = start_sidecar(netns, COMMAND_LINE)
    # The kubelet's probe from outside the pod: 15021 is never captured.
    probe = "GET /ready HTTP/1.1\\r\\nHost: pod\\r\\nConnection: close\\r\\n\\r\\n"
    wait_until(proc, lambda: netns.connect(netns.peer, POD_IP, 15021, send=probe).startswith("HTTP/1.1 200"))
    return netns


def test_a_service_address_is_routed_to_its_cluster_and_passed_through(file_sidecar):
    assert file_sidecar.connect(file_sidecar.pod, SERVICE_IP, 80) == f"remote {PEER_IP}:8080"


@pytest.mark.parametrize("configured_by", ["file_sidecar", "cli_sidecar"])
def test_an_unknown_destination_is_passed_through_to_itself(configured_by, request):
    pod = request.getfixturevalue(configured_by)
    assert pod.connect(pod.pod, PEER_IP, 9090) == f"remote {PEER_IP}:9090"


@pytest.mark.parametrize("configured_by", ["file_sidecar", "cli_sidecar"])
def test_inbound_reaches_the_app_through_the_sidecar(configured_by, request):
    pod = request.getfixturevalue(configured_by)
    assert pod.connect(pod.peer, POD_IP, 8080) == "app 127.0.0.1:8080"
