"""A listener's idle timeouts, the cases test_resilience.py (which shows them firing) leaves out: a
stream that keeps moving outlives ``stream_idle_timeout``, and 0s turns both timeouts off."""

from __future__ import annotations

import json
import struct
import time

import grpc
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


def test_a_stream_that_keeps_moving_outlives_the_idle_timeout(tmp_path, upstream):
    port = free_port()
    with Sidecar(config_file=config(tmp_path, port, upstream, stream_idle_timeout="1s"), listen_port=port) as sc:
        with grpc.insecure_channel(sc.address) as channel:
            # 12 messages 0.3 s apart: 3.3 s in all, never 1 s without a frame.
            request = struct.pack(">Id", 12, 0.3)
            got = list(channel.unary_stream(f"/{SERVICE}/Tick")(request, timeout=20))
    assert len(got) == 12


def test_zero_turns_the_timeouts_off(tmp_path, upstream):
    port = free_port()
    cfg = config(tmp_path, port, upstream, stream_idle_timeout="0s", idle_timeout="0s")
    with Sidecar(config_file=cfg, listen_port=port) as sc:
        with grpc.insecure_channel(sc.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(f"/{SERVICE}/Hang")(b"", timeout=2.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream idle" not in (err.value.details() or "")
