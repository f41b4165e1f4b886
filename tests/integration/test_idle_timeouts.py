"""A listener's idle timeouts end to end: ``stream_idle_timeout`` ends a request on which nothing moves
(DEADLINE_EXCEEDED before a response, with flag SI), a request that keeps moving outlives it, and
``idle_timeout`` sends GOAWAY to a connection without streams. The sidecar checks once a second, so the
waits here are generous; they bound the test, they are not what it asserts."""

from __future__ import annotations

import json
import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import pytest

from tests.integration.harness import HOST, Sidecar, free_port, grpc_server, tick

SERVICE = "t.Idle"


def hang(request: bytes, context) -> bytes:
    deadline = time.monotonic() + 8
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    return b""


HANDLERS = {
    "Hang": grpc.unary_unary_rpc_method_handler(hang),
    "Tick": grpc.unary_stream_rpc_method_handler(tick),
}


def config(tmp_path, port: int, upstream: str, **listener) -> str:
    cfg = {
        "listeners": [
            {
                "name": "in",
                "address": f"{HOST}:{port}",
                "virtual_hosts": [
                    {"name": "all", "domains": ["*"], "routes": [{"route": {"clusters": [{"cluster": "up"}]}}]}
                ],
                **listener,
            }
        ],
        "clusters": [{"name": "up", "endpoints": [{"address": upstream}]}],
    }
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture
def upstream():
    with grpc_server(HANDLERS, SERVICE) as address:
        yield address


def test_a_request_on_which_nothing_moves_ends_with_deadline_exceeded(tmp_path, upstream):
    port = free_port()
    with Sidecar(config_file=config(tmp_path, port, upstream, stream_idle_timeout="1s"), listen_port=port) as sc:
        with grpc.insecure_channel(sc.address) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(f"/{SERVICE}/Hang")(b"", timeout=20)
            took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream idle timeout" in err.value.details()
    assert took >= 1.0, "not before the idle timeout"


def test_a_stream_that_keeps_moving_outlives_the_idle_timeout(tmp_path, upstream):
    port = free_port()
    with Sidecar(config_file=config(tmp_path, port, upstream, stream_idle_timeout="1s"), listen_port=port) as sc:
        with grpc.insecure_channel(sc.address) as channel:
            # 12 messages 0.3 s apart: 3.3 s in all, never 1 s without a frame.
            request = struct.pack(">Id", 12, 0.3)
            got = list(channel.unary_stream(f"/{SERVICE}/Tick")(request, timeout=20))
    assert len(got) == 12


def test_a_connection_without_streams_gets_goaway_after_the_idle_timeout(tmp_path, upstream):
    port = free_port()
    with Sidecar(config_file=config(tmp_path, port, upstream, idle_timeout="1s"), listen_port=port) as sc:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        with socket.create_connection((HOST, sc.listen_port), timeout=10) as sock:
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            started = time.monotonic()
            buf = b""
            goaway = None
            # Frames read by hand: h2 stops at the first GOAWAY, and ours is graceful (GOAWAY, PING, GOAWAY).
            while goaway is None:
                data = sock.recv(65536)
                assert data, "closed without GOAWAY"
                buf += data
                while len(buf) >= 9:
                    length, kind = int.from_bytes(buf[:3], "big"), buf[3]
                    if len(buf) < 9 + length:
                        break
                    payload, buf = buf[9 : 9 + length], buf[9 + length :]
                    if kind == 0x7:
                        goaway = int.from_bytes(payload[4:8], "big")
                        break
            took = time.monotonic() - started
    assert goaway == 0, "NO_ERROR"
    assert took >= 1.0


def test_zero_turns_the_timeouts_off(tmp_path, upstream):
    port = free_port()
    cfg = config(tmp_path, port, upstream, stream_idle_timeout="0s", idle_timeout="0s")
    with Sidecar(config_file=cfg, listen_port=port) as sc:
        with grpc.insecure_channel(sc.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(f"/{SERVICE}/Hang")(b"", timeout=2.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream idle" not in (err.value.details() or "")
