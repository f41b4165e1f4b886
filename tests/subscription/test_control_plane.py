"""``meshproxy run --control-plane``: the real sidecar in a subprocess, subscribed to an in-test
control plane (``tests/subscription/control.py``, grpcio asyncio), in front of two real gRPC
upstreams (``a`` and ``b``, grpcio servers in this process that answer ``Who`` with their
name and ``Tick`` with a slow server stream).

Covered: the first snapshot binds the listeners and is ACKed; a bad one is NACKed and the
old routes serve; a switch of cluster leaves an in-flight stream alone and keeps the pooled
connection of an endpoint that stays; listeners added, moved (their connections drain) and
refused (a port in use: NACK); the control plane stopped (the sidecar serves on) and
restarted on its port (it reconnects with its version); a stream ended by the control plane
(reconnect, and the same version is only ACKed); ``--concurrency 2`` (two streams, workers
0 and 1); a snapshot over 1 MiB; no grpcio in the sidecar; SIGHUP and SIGTERM; bad flags.

Every wait is bounded; the backoff's cap (5 s) bounds every reconnect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import grpc
import pytest

from meshproxy import config
from tests.integration import harness
from tests.subscription.control import ControlServer

pytestmark = pytest.mark.timeout(60)

HOST = harness.HOST
SERVICE = "subtest.Upstream"
WHO = f"/{SERVICE}/Who"
TICK = f"/{SERVICE}/Tick"
CALL_TIMEOUT = 10.0
#: Where every snapshot puts the outbound listener; the sidecar's --listen must win.
DECOY_PORT = harness.free_port()
NODE_ARGS = ["--node-id", "node-1", "--namespace", "shop", "--workload", "cart", "--labels", "app=cart,version=v1"]


# -- upstreams -------------------------------------------------------------------------


@contextlib.contextmanager
def upstream(name: str):
    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode()),
        "Tick": grpc.unary_stream_rpc_method_handler(harness.tick),
    }
    with harness.grpc_server(handlers, SERVICE) as address:
        yield address


@pytest.fixture(scope="module")
def upstreams():
    """``{"a": address, "b": address}``."""
    with upstream("a") as a, upstream("b") as b:
        yield {"a": a, "b": b}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- snapshots ---------------------------------------------------------------------------


def snapshot(
    upstreams: dict, *, who: str = "a", tick: str = "a", extra: dict | None = None, routes=()
) -> config.SidecarConfig:
    """Clusters ``a`` and ``b``; ``Who`` goes to cluster ``who``, ``Tick`` to ``tick``; listeners
    ``outbound`` (its address here is a decoy: the sidecar's --listen wins) and ``extra``
    (name -> address) with the same routes; ``routes`` go first."""
    vhost = {
        "name": "all",
        "domains": ["*"],
        "routes": [
            *routes,
            {"match": {"path": WHO}, "route": {"clusters": [{"cluster": who}]}},
            {"match": {"path": TICK}, "route": {"clusters": [{"cluster": tick}]}},
        ],
    }
    listeners = [{"name": "outbound", "address": f"{HOST}:{DECOY_PORT}", "virtual_hosts": [vhost]}]
    listeners += [
        {"name": name, "address": address, "virtual_hosts": [vhost]} for name, address in (extra or {}).items()
    ]
    clusters = [{"name": name, "endpoints": [{"address": address}]} for name, address in sorted(upstreams.items())]
    return config.from_dict({"listeners": listeners, "clusters": clusters}, check=False)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=list(harness.CLIENT_OPTIONS))


def who(address: str) -> str:
    with channel(address) as ch:
        return ch.unary_unary(WHO)(b"", timeout=CALL_TIMEOUT).decode()


def tick_request(count: int, interval: float) -> bytes:
    return struct.pack(">Id", count, interval)


def connections_to(sidecar: harness.Sidecar, address: str) -> set[tuple[int, int]]:
    """The sidecar's established TCP connections to ``address`` (by port)."""
    return {c for c in sidecar.connections() if c[1] == port_of(address)}


def sidecar_for(cp: ControlServer, *extra: str, **kwargs) -> harness.Sidecar:
    return harness.Sidecar(control_plane=cp.address, extra_args=[*NODE_ARGS, *extra], **kwargs)


def ack_of(cp: ControlServer, version: str, index: int = -1):
    """The reply to the ``index``-th snapshot ``version`` sent (waiting for it to be sent first)."""
    assert harness.poll_until(lambda: cp.nonces(version), 10), f"snapshot {version} never sent"
    return cp.reply(cp.nonces(version)[index])


def refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- the tests -------------------------------------------------------------------------


def test_first_snapshot_binds_listeners_routes_and_acks(upstreams: dict):
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp) as sidecar:
            first = cp.wait(lambda r: r.first).request
            assert first.node.id == "node-1"
            assert first.node.namespace == "shop"
            assert first.node.workload == "cart"
            assert dict(first.node.labels) == {"app": "cart", "version": "v1"}
            assert first.node.service_account == ""
            assert (first.version_info, first.response_nonce, first.worker) == ("", "", 0)
            ack = ack_of(cp, "v1")
            assert ack.version_info == "v1"
            assert not ack.HasField("error_detail")
            assert who(sidecar.address) == "a"
            # The outbound listener is where --listen says, not where the snapshot said.
            assert refused(DECOY_PORT)
            # SIGHUP: config comes from the control plane; it is logged and ignored.
            os.kill(sidecar.pid, signal.SIGHUP)
            assert harness.poll_until(lambda: "SIGHUP ignored" in sidecar.output(), 5), sidecar.output()
            assert who(sidecar.address) == "a"
            assert len(cp.first_messages()) == 1


def test_bad_first_snapshot_is_nacked_and_nothing_listens(upstreams: dict):
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams, who="nope"), "v0")
        sidecar = sidecar_for(cp).launch()
        try:
            nack = ack_of(cp, "v0")
            assert nack.version_info == ""
            assert "no cluster named 'nope'" in nack.error_detail.message
            assert refused(sidecar.listen_port)
            cp.push(snapshot(upstreams), "v1")
            sidecar.wait_ready()
            assert ack_of(cp, "v1").version_info == "v1"
            assert who(sidecar.address) == "a"
        finally:
            sidecar.stop()


def test_invalid_snapshot_nacked_old_routes_serve(upstreams: dict):
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp) as sidecar:
            assert ack_of(cp, "v1").version_info == "v1"
            (nonce,) = cp.push(snapshot(upstreams, who="nope"), "v2")
            nack = cp.reply(nonce)
            assert nack.version_info == "v1"
            reason = nack.error_detail.message
            assert reason.startswith("listeners[0].virtual_hosts[0].routes[0].route.clusters[0].cluster:"), reason
            assert "no cluster named 'nope'" in reason and "\n" not in reason
            assert who(sidecar.address) == "a"
            assert harness.poll_until(lambda: "config version 'v2' refused" in sidecar.output(), 5), sidecar.output()
            # The next good one is taken.
            (nonce,) = cp.push(snapshot(upstreams, who="b"), "v3")
            assert cp.reply(nonce).version_info == "v3"
            assert who(sidecar.address) == "b"


def test_switch_keeps_in_flight_stream_and_pooled_connection(upstreams: dict):
    """v1 sends Who and Tick to ``a``. A 15 x 100 ms Tick is in flight when v2 switches Who to
    ``b``: new Who calls reach ``b``, the Tick ends OK with every message, and the sidecar's
    one connection to ``a`` (an endpoint that stayed) is the same socket before and after."""
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp) as sidecar, channel(sidecar.address) as ch:
            assert ack_of(cp, "v1").version_info == "v1"
            call = ch.unary_stream(TICK)(tick_request(15, 0.1), timeout=CALL_TIMEOUT)
            messages = [next(call)]
            before = connections_to(sidecar, upstreams["a"])
            assert len(before) == 1, sidecar.connections()
            (nonce,) = cp.push(snapshot(upstreams, who="b"), "v2")
            assert cp.reply(nonce).version_info == "v2"
            assert [who(sidecar.address) for _ in range(3)] == ["b"] * 3
            messages.extend(call)
            assert call.code() is grpc.StatusCode.OK
            assert [struct.unpack(">I", m)[0] for m in messages] == list(range(15))
            # A new Tick (still routed to a) rides the connection a had before the swap.
            assert len(list(ch.unary_stream(TICK)(tick_request(2, 0.0), timeout=CALL_TIMEOUT))) == 2
            assert connections_to(sidecar, upstreams["a"]) == before


def test_listeners_added_moved_and_refused(upstreams: dict):
    """v2 adds listener ``extra`` on port P; v3 moves it to Q: Q serves, P is closed, and a
    stream in flight on P finishes; v4 puts it on a port someone else holds: NACK, v3 stays."""
    p, q = harness.free_port(), harness.free_port()
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp) as sidecar:
            assert ack_of(cp, "v1").version_info == "v1"
            assert refused(p)
            (nonce,) = cp.push(snapshot(upstreams, extra={"extra": f"{HOST}:{p}"}), "v2")
            assert cp.reply(nonce).version_info == "v2"
            assert who(f"{HOST}:{p}") == "a"
            with channel(f"{HOST}:{p}") as ch:
                call = ch.unary_stream(TICK)(tick_request(10, 0.1), timeout=CALL_TIMEOUT)
                messages = [next(call)]
                (nonce,) = cp.push(snapshot(upstreams, who="b", extra={"extra": f"{HOST}:{q}"}), "v3")
                assert cp.reply(nonce).version_info == "v3"
                assert who(f"{HOST}:{q}") == "b"
                assert refused(p)
                messages.extend(call)
                assert call.code() is grpc.StatusCode.OK
                assert len(messages) == 10
            with socket.create_server((HOST, 0)) as taken:
                busy = taken.getsockname()[1]
                (nonce,) = cp.push(snapshot(upstreams, extra={"extra": f"{HOST}:{busy}"}), "v4")
                nack = cp.reply(nonce)
            assert nack.version_info == "v3"
            assert nack.error_detail.message.startswith(f"listeners[1].address: cannot listen on {HOST}:{busy}")
            assert who(f"{HOST}:{q}") == "b"
            assert who(sidecar.address) == "b"


def test_control_plane_down_then_restarted_on_its_port(upstreams: dict):
    cp = ControlServer().start()
    try:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp) as sidecar:
            assert ack_of(cp, "v1").version_info == "v1"
            cp.stop()
            # Unreachable for a while (several reconnect attempts): the sidecar serves on v1.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert who(sidecar.address) == "a"
                time.sleep(0.1)
            assert sidecar.process.alive()
            cp = ControlServer(cp.port)
            cp.set_snapshot(snapshot(upstreams, who="b"), "v2")
            cp.start()
            first = cp.wait(lambda r: r.first, timeout=15).request
            assert first.version_info == "v1"
            assert first.node.id == "node-1"
            assert ack_of(cp, "v2").version_info == "v2"
            assert who(sidecar.address) == "b"
            # One warning when it went away, not one per attempt.
            output = sidecar.output()
            assert output.count("reconnecting in") == 1, output
    finally:
        cp.stop()


def test_stream_ended_by_control_plane_reconnects_and_same_version_is_only_acked(upstreams: dict):
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp, "--log-level", "info") as sidecar:
            assert ack_of(cp, "v1").version_info == "v1"
            assert cp.end_streams(grpc.StatusCode.UNAVAILABLE, "going away for a test") == 1
            again = cp.wait(lambda r: r.first and r.stream == 2, timeout=10).request
            assert again.version_info == "v1"
            assert ack_of(cp, "v1", index=1).version_info == "v1"
            assert who(sidecar.address) == "a"
            output = sidecar.output()
            assert "grpc-status 14: going away for a test" in output, output
            assert output.count("config version 'v1' in force") == 1, output


def test_concurrency_two_workers_two_streams(upstreams: dict):
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp, "--concurrency", "2") as sidecar:
            assert harness.poll_until(lambda: len(cp.first_messages()) == 2, 10), cp.received
            assert sorted(r.request.worker for r in cp.first_messages()) == [0, 1]
            assert harness.poll_until(lambda: len(cp.nonces("v1")) == 2, 10)
            for nonce in cp.nonces("v1"):
                assert cp.reply(nonce).version_info == "v1"
            (nonce_a, nonce_b) = cp.push(snapshot(upstreams, who="b"), "v2")
            assert cp.reply(nonce_a).version_info == cp.reply(nonce_b).version_info == "v2"
            assert who(sidecar.address) == "b"
        assert sidecar.exit_code == 0


def big_snapshot(upstreams: dict, n: int) -> tuple[config.SidecarConfig, bytes]:
    """2000 routes and a 1.3 MiB direct response on ``/big`` whose body starts with ``n``."""
    big = (f"{n:04d}" + "0123456789abcdef" * (1300 * 1024 // 16)).encode()
    routes = [
        {"match": {"path": f"/bulk/{i:05d}"}, "direct_response": {"status": 200, "body": f"route {i}"}}
        for i in range(2000)
    ]
    routes.append({"match": {"path": "/big"}, "direct_response": {"status": 200, "body": big.decode()}})
    return snapshot(upstreams, routes=routes), big


def test_snapshots_over_one_mib(upstreams: dict):
    """Snapshots of 1.3 MiB: each one message over many DATA frames, more than the stream
    window the sidecar advertises (1 MiB), and four of them more than its connection window
    (4 MiB): they arrive only if the sidecar returns WINDOW_UPDATEs for what it consumed.
    The last route and the whole body of each arrive intact."""
    cfg, big = big_snapshot(upstreams, 0)
    assert cfg.ByteSize() > 1.25 * (1 << 20)
    with ControlServer() as cp:
        cp.set_snapshot(cfg, "big0")
        with sidecar_for(cp) as sidecar:
            assert ack_of(cp, "big0").version_info == "big0"
            assert harness.h2_get(sidecar.address, "/bulk/01999") == (200, b"route 1999")
            assert harness.h2_get(sidecar.address, "/big") == (200, big)
            for n in range(1, 4):
                cfg, big = big_snapshot(upstreams, n)
                (nonce,) = cp.push(cfg, f"big{n}")
                assert cp.reply(nonce).version_info == f"big{n}"
                assert harness.h2_get(sidecar.address, "/big") == (200, big)


def test_sidecar_never_imports_grpcio(upstreams: dict):
    """The whole life of a control-plane sidecar (subscribe, apply, ACK, serve, drain) under
    ``-X importtime``: no ``grpc`` module is ever imported."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    with ControlServer() as cp:
        cp.set_snapshot(snapshot(upstreams), "v1")
        with sidecar_for(cp, env=env) as sidecar:
            assert ack_of(cp, "v1").version_info == "v1"
            assert who(sidecar.address) == "a"
            log = sidecar.process.log_path.read_text()  # all of it: output() is only the tail
    imported = [line.rsplit("|", 1)[1].strip() for line in log.splitlines() if line.startswith("import time:")]
    assert "meshproxy.subscription" in imported, log[:2000]
    assert [m for m in imported if m == "grpc" or m.startswith(("grpc.", "grpc_"))] == []


def test_sigterm_before_any_config():
    """No control plane at all: nothing listens, one warning, and SIGTERM ends it with exit 0."""
    dead = f"{HOST}:{harness.free_port()}"
    sidecar = harness.Sidecar(control_plane=dead, extra_args=NODE_ARGS).launch()
    try:
        time.sleep(1.0)
        assert sidecar.process.alive(), sidecar.output()
        assert refused(sidecar.listen_port)
    finally:
        sidecar.stop()
    assert sidecar.exit_code == 0
    assert sidecar.output().count("reconnecting in") == 1, sidecar.output()


# -- the command line ----------------------------------------------------------------------


CP = f"{HOST}:15010"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--control-plane", CP, "--workload", "w"], "--namespace"),
        (["--control-plane", CP, "--namespace", "ns"], "--workload"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--config", "x.yaml"], "--config"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--upstream", CP], "--upstream"),
        (["--control-plane", "nope", "--namespace", "ns", "--workload", "w"], "'nope'"),
        (["--control-plane", CP, "--namespace", "Not_A_Namespace", "--workload", "w"], "Not_A_Namespace"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "Cart!"], "Cart!"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--node-id", ""], "--node-id"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--labels", "app"], "'app'"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--labels", "bad key=x"], "'bad key'"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--labels", "app=-x"], "'-x'"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--labels", "a=1,a=2"], "twice"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--labels", "Ex.com/a=1"], "prefix"),
        (["--control-plane", CP, "--namespace", "ns", "--workload", "w", "--labels", f"{'x' * 64}=1"], "--labels"),
        (
            [
                "--control-plane",
                CP,
                "--namespace",
                "ns",
                "--workload",
                "w",
                "--listen",
                f"{HOST}:0",
                "--concurrency",
                "2",
            ],
            "port 0",
        ),
        (["--listen", f"{HOST}:1", "--upstream", CP, "--namespace", "ns"], "--control-plane"),
        (["--config", "x.yaml", "--labels", "a=b"], "--control-plane"),
    ],
)
def test_cli_refuses_bad_control_plane_flags(args: list[str], named: str):
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", *args], capture_output=True, text=True, timeout=30
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1 and lines[0].startswith("meshproxy"), result.stderr
    assert "Traceback" not in result.stderr
    assert named in lines[0], result.stderr
