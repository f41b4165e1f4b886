"""Transparent mode (meshproxy.transparent), the readiness endpoint and ``meshproxy wait-ready``.

Without iptables: the protocol detection fed byte by byte, the route table a transparent
listener gets (its clusters' service addresses as domains), and a connection that reaches a
transparent listener without a redirect (no original destination: closed, with a log line).

With iptables, for real, as root: a network namespace whose nat OUTPUT redirects TCP to the
sidecar's 15001 except for uid 1337 (the sidecar runs as 1337, so its own connections go
out), and connections to the stand-in "pod IP" 10.0.0.3 to its 15006 (the inbound listener).
The peers live in the namespace on a veth interface (10.0.0.2; Service IPs 10.96.0.0/16 are
routed there too, and nothing listens on them): grpcio backends, a TCP echo server and a
server-first one that sends a banner before reading. Skipped, with the reason, only when the
test is not root or network namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from meshproxy import config, transparent
from meshproxy.routing import RouteTable
from tests.integration import harness
from tests.integration.harness import H2Client

PREFACE = transparent.PREFACE
TIMEOUT = 10.0
HOST = harness.HOST


# -- detection, fed byte by byte -------------------------------------------------------------------


class _Transport:
    def is_closing(self) -> bool:
        return False


class Recorder(transparent.TransparentProtocol):
    """The detection alone: what it decides, and with which bytes, instead of doing it."""

    def __init__(self) -> None:
        super().__init__(worker=None, listener="outbound")
        self.transport = _Transport()
        self.decision: tuple | None = None

    def _http2(self) -> None:
        self.decision = ("http2", self.buffer)

    def _passthrough(self, eof: bool = False) -> None:
        self.decision = ("tcp", self.buffer, eof)


CLIENT_HELLO = bytes.fromhex("1603010200010001fc0303") + os.urandom(32)


@pytest.mark.parametrize(
    ("chunks", "decision"),
    [
        ([PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"], "http2"),
        ([PREFACE[:1], PREFACE[1:10], PREFACE[10:], b"frames"], "http2"),
        ([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], "tcp"),
        ([b"POST /x HTTP/1.0\r\n"], "tcp"),
        ([CLIENT_HELLO], "tcp"),
        ([b"PRI * HTTP/1.1\r\n\r\n"], "tcp"),
        ([PREFACE[:5], b"X"], "tcp"),
        ([b"\x00\x00\x00\x01binary"], "tcp"),
    ],
    ids=[
        "preface",
        "preface-in-pieces",
        "http1",
        "http1.0",
        "tls-client-hello",
        "almost-preface",
        "diverges",
        "binary",
    ],
)
def test_detection_decides_on_the_first_bytes_and_keeps_them(chunks, decision):
    p = Recorder()
    sent = b""
    for i, chunk in enumerate(chunks):
        if p.decision is not None:
            break
        p.data_received(chunk)
        sent += chunk
        if i < len(chunks) - 1 and decision == "http2" and len(sent) < len(PREFACE):
            assert p.decision is None, "decided before the preface was complete"
    assert p.decision is not None
    assert p.decision[0] == decision
    # Nothing read is lost: the protocol that takes over gets every byte so far.
    assert p.decision[1] == sent


def test_silence_or_a_partial_preface_until_the_timeout_is_passthrough():
    p = Recorder()
    p._timed_out()
    assert p.decision == ("tcp", b"", False)
    p = Recorder()
    p.data_received(PREFACE[:7])
    assert p.decision is None
    p._timed_out()
    assert p.decision == ("tcp", PREFACE[:7], False)


def test_a_half_close_before_the_decision_is_passthrough_with_the_eof():
    p = Recorder()
    p.data_received(b"PR")
    assert p.eof_received() is True
    assert p.decision == ("tcp", b"PR", True)


def test_no_original_destination_without_a_redirect():
    with socket.create_server((HOST, 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert transparent.original_destination(accepted) is None


# -- the route table of a transparent listener -----------------------------------------------------


def test_service_addresses_become_domains_of_their_cluster():
    cfg = config.from_dict(
        {
            "listeners": [
                {
                    "name": "outbound",
                    "address": "127.0.0.1:15001",
                    "transparent": True,
                    "virtual_hosts": [
                        {
                            "name": "named",
                            "domains": ["echo.test:9080", "10.96.0.11:80"],
                            "routes": [{"route": {"clusters": [{"cluster": "b"}]}}],
                        }
                    ],
                }
            ],
            "clusters": [
                {"name": "a", "endpoints": [{"address": "10.0.0.2:1"}], "service_addresses": ["10.96.0.10:9080"]},
                {
                    "name": "b",
                    "endpoints": [{"address": "10.0.0.2:2"}],
                    "service_addresses": ["10.96.0.11:80", "[fd00::1]:80"],
                },
            ],
        }
    )
    ls = transparent.routable(cfg.listeners[0], cfg.clusters)
    added = {vh.name: list(vh.domains) for vh in ls.virtual_hosts[1:]}
    # An address a virtual host already has stays that virtual host's.
    assert added == {"a (service address)": ["10.96.0.10:9080"], "b (service address)": ["[fd00::1]:80"]}
    table = RouteTable.compile(ls, cfg.clusters)
    for authority, cluster in (
        (b"10.96.0.10:9080", "a"),
        (b"[fd00::1]:80", "b"),
        (b"10.96.0.11:80", "b"),
        (b"echo.test:9080", "b"),
    ):
        route = table.match(authority, b"/pkg.Svc/Get", b"POST", [])
        assert route is not None and route.pick() == (cluster, ""), authority
    assert table.match(b"10.96.0.10:9081", b"/", b"GET", []) is None
    index = transparent.Index(cfg)
    assert index.destinations == {("10.96.0.10", 9080): "a", ("10.96.0.11", 80): "b", ("fd00::1", 80): "b"}
    assert index.modes["outbound"].detection_timeout == transparent.DEFAULT_DETECTION_TIMEOUT


def test_inbound_local_clusters_outlive_a_config_change_with_their_connections():
    from meshproxy.worker import Runtime

    def cfg(version: str) -> config.SidecarConfig:
        return config.from_dict(
            {
                "version": version,
                "listeners": [{"name": "inbound", "address": "0.0.0.0:15006", "transparent": True}],
                "clusters": [{"name": "x", "endpoints": [{"address": f"10.0.0.{version}:80"}]}],
            }
        )

    first = Runtime(cfg("1"))
    name = transparent.install_local(first, "inbound", 8080)
    assert name == "inbound|8080||"
    assert [ep.address for ep in first.clusters[name].endpoints] == ["127.0.0.1:8080"]
    route = first.tables[name].match(b"reviews:9080", b"/pkg.Svc/Get", b"POST", [])
    assert route.pick() == (name, "")
    endpoint = first.clusters[name].endpoints[0]
    second = Runtime(cfg("2"), first)
    # The same endpoint (and so its pooled connections) serves the port after the change.
    assert second.clusters[name].endpoints[0] is endpoint
    assert second.local_ports == {("inbound", 8080)}
    # A config without the transparent inbound listener drops them.
    plain = config.from_dict({"listeners": [{"name": "inbound", "address": "0.0.0.0:15006"}]})
    assert name not in Runtime(plain, second).clusters


def test_the_command_line_amends_the_control_planes_listeners():
    from meshproxy import cli

    args = cli.build_parser().parse_args(
        ["run", "--control-plane", "127.0.0.1:1", "--transparent", "--inbound-listen", "0.0.0.0:15006"]
    )
    amend = cli.listener_amendment(args, "outbound")
    snapshot = config.from_dict(
        {
            "listeners": [
                {"name": "outbound", "address": "127.0.0.1:15001", "opaque_ports": [3306]},
                {"name": "inbound", "address": "0.0.0.0:1", "opaque_ports": [5432]},
                {"name": "other", "address": "127.0.0.1:2"},
            ]
        }
    )
    amend(snapshot)
    config.validate(snapshot)
    got = {ls.name: (ls.address, ls.transparent, list(ls.opaque_ports)) for ls in snapshot.listeners}
    assert got == {
        "outbound": ("127.0.0.1:15001", True, [3306]),
        "inbound": ("0.0.0.0:15006", True, [5432]),
        "other": ("127.0.0.1:2", False, []),
    }
    # Without an inbound listener in the snapshot, the sidecar adds its own.
    bare = config.from_dict({"listeners": [{"name": "outbound", "address": "127.0.0.1:15001"}]})
    amend(bare)
    assert [(ls.name, ls.address, ls.transparent) for ls in bare.listeners] == [
        ("outbound", "127.0.0.1:15001", True),
        ("inbound", "0.0.0.0:15006", True),
    ]
    plain = cli.build_parser().parse_args(["run", "--control-plane", "127.0.0.1:1"])
    assert cli.listener_amendment(plain, "outbound") is None


# -- a transparent listener reached without a redirect -----------------------------------------------


def test_a_connection_that_was_not_redirected_is_closed_with_a_log_line():
    with harness.H2ScriptedServer("upstream") as upstream:
        with harness.Sidecar(upstream=upstream.address, extra_args=["--transparent", "--log-level", "info"]) as sc:
            with socket.create_connection((HOST, sc.listen_port), timeout=TIMEOUT) as s:
                s.sendall(PREFACE)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""
            assert harness.poll_until(lambda: "was not redirected here" in sc.output(), TIMEOUT), sc.output()
            assert upstream.connections == 0


# -- --ready and wait-ready ------------------------------------------------------------------------------


def http_get(port: int, path: str, host: str = HOST) -> tuple[int, str]:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def wait_ready(url: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "wait-ready", "--url", url, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )


def test_ready_is_503_until_a_config_is_in_force():
    ready = harness.free_port()
    unreachable = f"{HOST}:{harness.free_port()}"
    args = ["--node-id", "n", "--namespace", "default", "--workload", "w", "--ready", f"{HOST}:{ready}"]
    sc = harness.Sidecar(control_plane=unreachable, extra_args=args)
    sc.launch()
    try:
        harness.wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        assert http_get(ready, "/ready") == (503, "not ready: no config in force yet\n")
        assert http_get(ready, "/healthz") == (200, "ok\n")
        assert http_get(ready, "/nope")[0] == 404
        done = wait_ready(f"http://{HOST}:{ready}/ready", 0.5)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"meshproxy: wait-ready: http://{HOST}:{ready}/ready not ready after 0.5s (last: HTTP 503)"
        ]
    finally:
        sc.process.stop(signal.SIGTERM, 10)


def test_ready_is_200_once_listening_and_503_while_draining():
    ready = harness.free_port()
    with harness.H2ScriptedServer("slow", delay=3.0) as upstream:
        sc = harness.Sidecar(upstream=upstream.address, extra_args=["--ready", f"{HOST}:{ready}"], stop_timeout=15)
        sc.launch()
        try:
            # Started before the sidecar is up: it waits, then succeeds.
            done = wait_ready(f"http://{HOST}:{ready}/ready", 20)
            assert done.returncode == 0, done.stderr
            assert done.stderr == ""
            assert http_get(ready, "/ready") == (200, "ready\n")
            sc.wait_ready()
            with H2Client(sc.address) as client:
                sid = client.send("/slow")
                assert harness.poll_until(lambda: upstream.connections == 1, TIMEOUT)
                sc.process.popen.send_signal(signal.SIGTERM)
                # The request in flight holds the drain open; meanwhile the probe says so.
                assert harness.poll_until(lambda: http_get(ready, "/ready") == (503, "draining\n"), TIMEOUT)
                assert http_get(ready, "/healthz") == (200, "ok\n")
                assert sid == 1
            # The client gone, nothing holds the drain open any more.
            assert sc.process.popen.wait(TIMEOUT) == 0
        finally:
            sc.process.stop(signal.SIGKILL, 5)


def test_wait_ready_with_nothing_listening_says_why_in_one_line():
    port = harness.free_port()
    done = wait_ready(f"http://{HOST}:{port}/ready", 0.3)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not ready after 0.3s" in lines[0] and "refused" in lines[0].lower(), lines


def test_wait_ready_refuses_a_url_that_is_not_http():
    done = wait_ready("https://127.0.0.1:1/ready", 1)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "meshproxy wait-ready: error: argument --url: 'https://127.0.0.1:1/ready' is not an http:// URL"
    )


def test_transparent_goes_with_listen_or_the_control_plane(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"listeners": [], "clusters": []}))
    done = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "--config", str(path), "--transparent"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "meshproxy: error: --transparent goes with --control-plane or --listen; in a config file, "
        "set transparent: true on the listener"
    ]


# -- for real: iptables in a network namespace -------------------------------------------------------

CLONE_NEWNET = 0x40000000
PROXY_UID = 1337
NS = f"mp-transparent-{os.getpid()}"
POD_IP = "10.0.0.3"  # the inbound stand-in: redirected to 15006
PEER_IP = "10.0.0.2"  # where the servers listen
GRPC_SVC = "10.96.0.10"
SMTP_SVC = "10.96.0.20"
OPAQUE_SVC = "10.96.0.30"
ECHO_SVC = "10.96.0.40"
PEER_IP6 = "fd00::2"
ECHO_SVC6 = "fd01::40"
OPAQUE_PORT = 3306

GRPC_SERVER = """
import sys
from concurrent import futures
import grpc
identity = sys.argv[2].encode()
def echo(request, context):
    return identity + b":" + request
handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1])
server.start()
print("serving", flush=True)
server.wait_for_termination()
"""

GRPC_CALL = """
import sys
import grpc
options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
if len(sys.argv) > 3:
    options.append(("grpc.default_authority", sys.argv[3]))
with grpc.insecure_channel(sys.argv[1], options=options) as channel:
    print(channel.unary_unary("/test.Echo/Echo")(sys.argv[2].encode(), timeout=10).decode())
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root: network namespaces and iptables need root"
    for tool in ("ip", "iptables", "ip6tables", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install -y iproute2 iptables util-linux)"
    probe = f"{NS}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block in network namespace ``name`` (this thread only): sockets made there stay there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


class EchoServer(harness.ThreadedServer):
    """Echoes every byte; at the client's EOF it half-closes too. Records each peer address and
    whether the client's EOF arrived."""

    name = "echo"
    banner = b""

    def __init__(self, host: str) -> None:
        self.peers: list[tuple[str, int]] = []
        self.eofs = 0
        self.lock = threading.Lock()
        super().__init__(host)

    def _handle(self, sock: socket.socket) -> None:
        with sock:
            with self.lock:
                self.peers.append(sock.getpeername()[:2])
            try:
                if self.banner:
                    sock.sendall(self.banner)
                while data := sock.recv(1 << 16):
                    sock.sendall(data)
                with self.lock:
                    self.eofs += 1
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class BannerServer(EchoServer):
    """Server first: a banner as soon as a client connects (SMTP's 220, MySQL's handshake)."""

    name = "banner"
    banner = b"220 meshproxy-test ESMTP ready\r\n"


class StallServer(harness.ThreadedServer):
    """Accepts and never reads: whatever is sent to it piles up in front of it."""

    name = "stall"

    def _handle(self, sock: socket.socket) -> None:
        with sock:
            self._closed.wait()


class Mesh:
    """The namespace, its peers and the sidecar in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[harness.Process] = []
        self.servers: list[harness.ThreadedServer] = []
        self.sidecar: harness.Process | None = None

    def run(self, argv: list[str], name: str) -> harness.Process:
        p = harness.Process(["ip", "netns", "exec", NS, *argv], name=name)
        self.processes.append(p)
        return p

    def connect(self, host: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
        with in_netns(NS):
            return socket.create_connection((host, port), timeout=timeout)

    def close(self) -> None:
        for p in self.processes:
            p.stop(signal.SIGTERM, 10)
        for s in self.servers:
            s.close()


def _setup_namespace() -> None:
    _ip("netns", "add", NS)
    for cmd in (
        ["link", "set", "lo", "up"],
        # A veth pair with both ends here stands for the pod's network (no dummy module needed).
        ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
        ["link", "set", "eth0", "up"],
        ["link", "set", "eth1", "up"],
        ["addr", "add", f"{PEER_IP}/24", "dev", "eth0"],
        ["addr", "add", f"{POD_IP}/32", "dev", "eth0"],
        ["route", "add", "10.96.0.0/16", "dev", "eth0"],
        ["addr", "add", f"{PEER_IP6}/64", "dev", "eth0", "nodad"],
        ["route", "add", "fd01::/64", "dev", "eth0"],
    ):
        _ip("-n", NS, *cmd)
    rules = [
        # The sidecar's own connections leave as they are (else every upstream connection would loop back).
        ["-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", str(PROXY_UID), "-j", "RETURN"],
        # The test's own loopback traffic (the readiness probe) is nobody's business.
        ["-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.0/8", "-j", "RETURN"],
        # Inbound stand-in: what is sent to the "pod IP" lands on the inbound listener.
        ["-A", "OUTPUT", "-p", "tcp", "-d", POD_IP, "-j", "REDIRECT", "--to-ports", "15006"],
        ["-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
    ]
    for rule in rules:
        subprocess.run(["ip", "netns", "exec", NS, "iptables", "-t", "nat", *rule], check=True, capture_output=True)
    for rule in (rules[0], ["-A", "OUTPUT", "-p", "tcp", "-d", "::1/128", "-j", "RETURN"], rules[-1]):
        subprocess.run(["ip", "netns", "exec", NS, "ip6tables", "-t", "nat", *rule], check=True, capture_output=True)


@pytest.fixture(scope="module")
def mesh():
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="mp-transparent-"))
    root.chmod(0o755)  # the sidecar runs as uid 1337 and reads its config here
    m = Mesh(root)
    try:
        _setup_namespace()
        grpc_py = root / "grpc_server.py"
        grpc_py.write_text(GRPC_SERVER)
        (root / "grpc_call.py").write_text(GRPC_CALL)
        backends = {}
        for identity in ("by-address", "by-name"):
            port = harness.free_port()
            p = m.run([sys.executable, str(grpc_py), f"{PEER_IP}:{port}", identity], f"grpc-{identity}")
            backends[identity] = port
            assert harness.poll_until(lambda p=p: "serving" in p.output() or not p.alive(), 30), p.describe()
            assert p.alive(), p.describe()
        with in_netns(NS):
            m.echo = EchoServer(PEER_IP)
            m.banner = BannerServer(PEER_IP)
            m.stall = StallServer(PEER_IP)
            m.app_echo = EchoServer("127.0.0.1")  # the local app, inbound: on loopback only
            m.app_h2 = harness.H2ScriptedServer("app", host="127.0.0.1")
        m.servers += [m.echo, m.banner, m.stall, m.app_echo, m.app_h2]
        echo_port = int(m.echo.address.rsplit(":", 1)[1])
        m.echo_port = echo_port
        m.banner_port = int(m.banner.address.rsplit(":", 1)[1])
        route_all = [{"match": {"prefix": "/"}, "route": {"clusters": [{"cluster": "grpc-by-name"}]}}]
        cfg = {
            "version": "netns",
            "listeners": [
                {
                    "name": "outbound",
                    "address": "0.0.0.0:15001",
                    "transparent": True,
                    "opaque_ports": [OPAQUE_PORT],
                    "virtual_hosts": [{"name": "echo.test", "domains": ["echo.test:9080"], "routes": route_all}],
                },
                {"name": "outbound6", "address": "[::]:15001", "transparent": True},
            ],
            "clusters": [
                {
                    "name": "grpc-by-address",
                    "endpoints": [{"address": f"{PEER_IP}:{backends['by-address']}"}],
                    "service_addresses": [f"{GRPC_SVC}:9080"],
                },
                {"name": "grpc-by-name", "endpoints": [{"address": f"{PEER_IP}:{backends['by-name']}"}]},
                {
                    "name": "smtp",
                    "endpoints": [{"address": f"{PEER_IP}:{m.banner_port}"}],
                    "service_addresses": [f"{SMTP_SVC}:25"],
                },
                {
                    "name": "opaque-echo",
                    "endpoints": [{"address": f"{PEER_IP}:{echo_port}"}],
                    "service_addresses": [f"{OPAQUE_SVC}:{OPAQUE_PORT}"],
                },
                {
                    "name": "echo",
                    "endpoints": [{"address": f"{PEER_IP}:{echo_port}"}],
                    "service_addresses": [f"{ECHO_SVC}:7000", f"[{ECHO_SVC6}]:7000"],
                },
            ],
        }
        path = root / "sidecar.json"
        path.write_text(json.dumps(cfg))
        path.chmod(0o644)
        argv = ["setpriv", "--reuid", str(PROXY_UID), "--regid", str(PROXY_UID), "--clear-groups"]
        argv += [sys.executable, "-m", "meshproxy", "run", "--config", str(path), "--log-level", "info"]
        argv += ["--inbound-listen", "0.0.0.0:15006", "--ready", "127.0.0.1:15021"]
        argv += ["--admin", "127.0.0.1:15000", "--metrics", "127.0.0.1:15090"]
        m.sidecar = m.run(argv, "sidecar")

        def ready() -> bool:
            try:
                with in_netns(NS):
                    return http_get(15021, "/ready") == (200, "ready\n")
            except OSError:
                return False

        assert harness.poll_until(lambda: ready() or not m.sidecar.alive(), 30), m.sidecar.describe()
        assert m.sidecar.alive(), m.sidecar.describe()
        yield m
    finally:
        m.close()
        _ip("netns", "del", NS, check=False)
        shutil.rmtree(root, ignore_errors=True)


def grpc_call(mesh: Mesh, target: str, message: str, authority: str | None = None) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", NS, sys.executable, str(mesh.root / "grpc_call.py"), target, message]
    if authority:
        argv.append(authority)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_grpc_to_a_service_address_reaches_the_cluster_mapped_from_it(mesh):
    done = grpc_call(mesh, f"{GRPC_SVC}:9080", "hello")
    assert done.returncode == 0, done.stderr + mesh.sidecar.output()
    # Nothing listens on the Service IP: the sidecar recovered it and routed to its cluster.
    assert done.stdout.strip() == "by-address:hello"


def test_grpc_is_routed_at_l7_by_authority_first(mesh):
    done = grpc_call(mesh, f"{GRPC_SVC}:9080", "hi", authority="echo.test:9080")
    assert done.returncode == 0, done.stderr + mesh.sidecar.output()
    assert done.stdout.strip() == "by-name:hi"


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` (from a thread, so a large one cannot deadlock against the echo), half-close,
    and read everything until EOF."""

    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    sender.join(TIMEOUT)
    return bytes(out)


def test_an_unknown_destination_passes_through_to_itself(mesh):
    before = len(mesh.echo.peers)
    with mesh.connect(PEER_IP, mesh.echo_port) as s:
        local = s.getsockname()[:2]
        assert exchange(s, b"to the original destination\n") == b"to the original destination\n"
    peer = mesh.echo.peers[before]
    # The echo server's peer is the sidecar, not this socket.
    assert peer != local


def test_tcp_passthrough_is_byte_exact_large_binary_and_half_closed(mesh):
    data = bytes(range(256)) * 4096 + os.urandom(3 << 20) + PREFACE
    eofs = mesh.echo.eofs
    with mesh.connect(ECHO_SVC, 7000, timeout=60) as s:
        assert exchange(s, data) == data
    # Our half-close reached the server, whose own EOF came back to us after every byte.
    assert mesh.echo.eofs == eofs + 1


def test_ipv6_original_destinations_are_recovered_too(mesh):
    with in_netns(NS):
        s = socket.create_connection((ECHO_SVC6, 7000), timeout=TIMEOUT)
    with s:
        assert exchange(s, b"over IPv6\n") == b"over IPv6\n"


def test_a_reader_that_stops_stops_the_writer(mesh):
    """Back-pressure: with the far end not reading, the sidecar stops reading the client once its
    write buffer is full, so what the client gets to send is bounded by socket buffers, not by
    the sidecar's memory."""
    port = int(mesh.stall.address.rsplit(":", 1)[1])
    chunk = b"\x00" * (1 << 20)
    sent = 0
    with mesh.connect(PEER_IP, port) as s:
        s.settimeout(2.0)
        with contextlib.suppress(TimeoutError):
            while sent < 256 << 20:
                sent += s.send(chunk)
    # Kernel buffers both sides of the sidecar hold a few MiB each; without back-pressure the
    # sidecar would take all 256 MiB into memory.
    assert sent < 64 << 20, f"the client could send {sent >> 20} MiB to a server that reads nothing"


def test_http1_and_tls_to_a_service_address_pass_through_to_its_cluster(mesh):
    for first in (b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n", CLIENT_HELLO):
        with mesh.connect(ECHO_SVC, 7000) as s:
            assert exchange(s, first) == first


def test_http2_to_a_service_address_is_proxied_not_passed_through(mesh):
    with mesh.connect(ECHO_SVC, 7000) as s:
        s.sendall(PREFACE)
        head = s.recv(9)
    # The sidecar's own SETTINGS (frame type 4 on stream 0), not the preface echoed back.
    assert len(head) == 9 and head[3] == 0x4 and head[5:9] == b"\x00\x00\x00\x00", head


def test_an_opaque_port_skips_detection(mesh):
    with mesh.connect(OPAQUE_SVC, OPAQUE_PORT) as s:
        # An HTTP/2 preface on an opaque port is just bytes: echoed, not answered.
        assert exchange(s, PREFACE + b"tail") == PREFACE + b"tail"


@pytest.mark.parametrize("where", ["service", "unknown"])
def test_a_server_first_protocol_gets_its_banner_without_sending_first(mesh, where):
    host, port = (SMTP_SVC, 25) if where == "service" else (PEER_IP, mesh.banner_port)
    with mesh.connect(host, port) as s:
        banner = b""
        while not banner.endswith(b"\r\n"):
            chunk = s.recv(1024)
            assert chunk, "closed before the banner"
            banner += chunk
        assert banner == BannerServer.banner
        assert exchange(s, b"QUIT\r\n") == b"QUIT\r\n"


def test_inbound_tcp_reaches_the_app_on_loopback(mesh):
    port = int(mesh.app_echo.address.rsplit(":", 1)[1])
    # Nothing listens on the pod IP: the inbound listener recovered the port and went to 127.0.0.1.
    with mesh.connect(POD_IP, port) as s:
        assert exchange(s, b"inbound\x00\xff") == b"inbound\x00\xff"


def test_inbound_http2_is_routed_to_the_local_cluster(mesh):
    port = int(mesh.app_h2.address.rsplit(":", 1)[1])
    with in_netns(NS):
        client = H2Client(f"{POD_IP}:{port}", authority=f"reviews:{port}")
    with client:
        for _ in range(3):
            response = client.request("/test.Echo/Echo", method="POST", headers=[("content-type", "application/grpc")])
            assert response.status == 200 and response.headers.get("x-served-by") == "app", response
            assert response.grpc_status == "0"
    # One client connection, proxied at L7: the app saw the sidecar's (pooled) connection.
    assert mesh.app_h2.connections == 1


def test_the_readiness_probe_in_the_pod(mesh):
    with in_netns(NS):
        assert http_get(15021, "/ready") == (200, "ready\n")
        assert http_get(15021, "/healthz") == (200, "ok\n")
