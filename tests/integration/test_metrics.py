"""Prometheus metrics end to end: a real sidecar (``--config``) in front of grpcio backends (v1 and
v2 of one service, their endpoints labelled as the control plane labels them) and a plain h2
server, a known mix of traffic, then ``GET /metrics`` parsed with prometheus_client's parser.

The mix: OK unary calls with known payloads, calls failing with a gRPC status, calls to no route
(NR), a server-streaming and a bidi call with known message counts, slow calls on a route of
their own, plain HTTP requests answered 200 and 503. Every figure asserted is exact (counts,
labels, byte sums, message counts, bucket placement); durations only from below (a backend that
sleeps 60 ms puts its calls above the 50 ms bucket). Also: ``--metric-names istio``, with
``--concurrency 2`` the sidecar's figures are the sum of both workers', and TCP passthroughs of
transparent listeners behind real iptables rules (tests/interception's network namespaces; skipped
where they cannot be made).
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import harness
from tests.integration.conftest import SIDECAR_KEY
from tests.integration.harness import H2ScriptedServer, H2Session
from tests.interception.conftest import PEER_IP, POD_IP, netns  # noqa: F401  (netns: the fixture)
from tests.interception.test_sidecar import start_sidecar, wait_until

HOST = harness.HOST
TIMEOUT = 10.0
SERVICE_HOST = "echo.shop.svc.cluster.local"
CLUSTER = f"outbound|50051||{SERVICE_HOST}"
WEB_HOST = "web.shop.svc.cluster.local"
WEB = f"outbound|80||{WEB_HOST}"
SLOW_S = 0.06
PAYLOAD = b"x" * 100  # 105 bytes on the wire, as one gRPC message
NODE = {"id": "client-0", "namespace": "front", "workload": "client", "labels": {"app": "client", "version": "c1"}}


# -- backends ----------------------------------------------------------------------------------


def _echo(request: bytes, context) -> bytes:
    return request


def _fail(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")


def _slow(request: bytes, context) -> bytes:
    time.sleep(SLOW_S)
    return request


def _stream(request: bytes, context):
    (count,) = struct.unpack(">I", request)
    for i in range(count):
        yield struct.pack(">I", i)


def _chat(requests, context):
    yield from requests


def handlers() -> dict:
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    }


class WebServer(H2ScriptedServer):
    """Plain HTTP/2: ``/http/ok`` is 200 with body ``hello``, anything else 503 (empty body)."""

    def _request(self, session: H2Session, sid: int, headers: dict[str, str]) -> bool:
        session.plans[sid] = headers.get(":path", "")
        return super()._request(session, sid, headers)

    def _respond(self, session: H2Session, sid: int) -> None:
        ok = session.plans.pop(sid, "") == "/http/ok"
        body = b"hello" if ok else b""
        session.conn.send_headers(
            sid, [(":status", "200" if ok else "503"), ("content-length", str(len(body)))], end_stream=not body
        )
        if body:
            session.conn.send_data(sid, body, end_stream=True)


def labels(version: str) -> dict[str, str]:
    return {
        "app": "echo",
        "version": version,
        "meshproxy.io/workload": f"echo-{version}",
        "meshproxy.io/namespace": "shop",
    }


def route(name: str, match: dict, cluster: str, subset: str = "") -> dict:
    return {"name": name, "match": match, "route": {"clusters": [{"cluster": cluster, "subset": subset}]}}


def write_config(directory: Path, port: int, v1: str, v2: str, web: str) -> Path:
    config = {
        "version": "metrics-1",
        "node": NODE,
        "listeners": [
            {
                "name": "main",
                "address": f"{HOST}:{port}",
                "virtual_hosts": [
                    {
                        "name": "mesh",
                        "domains": ["*"],
                        "routes": [
                            route("slow", {"path": "/echo.V2/Slow"}, CLUSTER, "v2"),
                            route("v1", {"prefix": "/echo.V1/"}, CLUSTER, "v1"),
                            route("v2", {"prefix": "/echo.V2/"}, CLUSTER, "v2"),
                            route("web", {"prefix": "/http/"}, WEB),
                        ],
                    }
                ],
            }
        ],
        "clusters": [
            {
                "name": CLUSTER,
                "endpoints": [{"address": v1, "labels": labels("v1")}, {"address": v2, "labels": labels("v2")}],
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            },
            {"name": WEB, "endpoints": [{"address": web, "labels": {"app": "web", "meshproxy.io/workload": "web"}}]},
        ],
    }
    path = directory / f"metrics-{port}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


@contextlib.contextmanager
def mesh(tmp_path: Path, request: pytest.FixtureRequest, *extra_args: str):
    """Backends and a sidecar in front of them: yields the running sidecar."""
    with (
        harness.grpc_server(handlers(), "echo.V1") as v1,
        harness.grpc_server(handlers(), "echo.V2") as v2,
        WebServer("web") as web,
    ):
        port = harness.free_port()
        path = write_config(tmp_path, port, v1, v2, web.address)
        with harness.Sidecar(config_file=path, listen_port=port, extra_args=list(extra_args)) as sidecar:
            request.node.stash[SIDECAR_KEY] = sidecar
            harness.wait_listening(HOST, sidecar.metrics_port, 10)
            yield sidecar


# -- the client side -----------------------------------------------------------------------------


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=list(harness.CLIENT_OPTIONS))


def unary(ch: grpc.Channel, path: str, body: bytes = PAYLOAD) -> grpc.StatusCode:
    try:
        ch.unary_unary(path)(body, timeout=TIMEOUT)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def scrape(sidecar: harness.Sidecar) -> dict:
    """The families exposed, by name (counters under their name without ``_total``, as the parser
    gives them)."""
    with urllib.request.urlopen(f"http://{HOST}:{sidecar.metrics_port}/metrics", timeout=TIMEOUT) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, name: str, suffix: str = "", **want: str) -> list:
    family = fams.get(name)
    if family is None:
        return []
    full = (name + suffix) if suffix else (name + "_total" if family.type == "counter" else name)
    return [s for s in family.samples if s.name == full and all(s.labels.get(k) == v for k, v in want.items())]


def value(fams: dict, name: str, suffix: str = "", **want: str) -> float:
    found = samples(fams, name, suffix, **want)
    assert len(found) == 1, (name, suffix, want, [s.labels for s in samples(fams, name, suffix)])
    return found[0].value


def total(fams: dict, name: str, suffix: str = "", **want: str) -> float:
    return sum(s.value for s in samples(fams, name, suffix, **want))


def bucket(fams: dict, name: str, le: str, **want: str) -> float:
    return value(fams, name, "_bucket", le=le, **want)


def settle(sidecar: harness.Sidecar, prefix: str, expected: int) -> dict:
    """Scrape until ``expected`` requests are counted (a stream is recorded as it closes, which may
    be just after the client saw its end): bounded in time, then whatever is there."""
    fams: dict = {}

    def done() -> bool:
        nonlocal fams
        fams = scrape(sidecar)
        return total(fams, f"{prefix}_requests") >= expected

    harness.poll_until(done, 10.0)
    return fams


# -- the tests -------------------------------------------------------------------------------------

N_OK, M_FAIL, K_NR, SLOW, STREAM_MSGS, CHAT_MSGS, HTTP_OK, HTTP_FAIL = 5, 3, 4, 2, 7, 3, 3, 2
EXPECTED = N_OK + M_FAIL + K_NR + SLOW + 1 + 1 + HTTP_OK + HTTP_FAIL


def run_mix(address: str) -> None:
    with channel(address) as ch:
        for _ in range(N_OK):
            assert unary(ch, "/echo.V1/Echo") is grpc.StatusCode.OK
        for _ in range(M_FAIL):
            assert unary(ch, "/echo.V1/Fail") is grpc.StatusCode.PERMISSION_DENIED
        for _ in range(K_NR):
            assert unary(ch, "/nowhere.Service/Call") is grpc.StatusCode.UNIMPLEMENTED
        for _ in range(SLOW):
            assert unary(ch, "/echo.V2/Slow") is grpc.StatusCode.OK
        got = list(ch.unary_stream("/echo.V2/Stream")(struct.pack(">I", STREAM_MSGS), timeout=TIMEOUT))
        assert len(got) == STREAM_MSGS
        got = list(ch.stream_stream("/echo.V1/Chat")(iter([PAYLOAD] * CHAT_MSGS), timeout=TIMEOUT))
        assert got == [PAYLOAD] * CHAT_MSGS
    for _ in range(HTTP_OK):
        assert harness.h2_get(address, "/http/ok") == (200, b"hello")
    for _ in range(HTTP_FAIL):
        assert harness.h2_get(address, "/http/fail")[0] == 503


def test_known_mix_exact(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with mesh(tmp_path, request, "--concurrency", "1") as sidecar:
        run_mix(sidecar.address)
        fams = settle(sidecar, "meshproxy", EXPECTED)
    req = "meshproxy_requests"
    assert total(fams, req) == EXPECTED

    common = {
        "reporter": "source",
        "source_workload": "client",
        "source_workload_namespace": "front",
        "source_app": "client",
        "source_version": "c1",
        "source_principal": "unknown",
        "destination_service": SERVICE_HOST,
        "destination_service_name": "echo",
        "destination_service_namespace": "shop",
        "destination_workload_namespace": "shop",
        "destination_app": "echo",
        "connection_security_policy": "unknown",
    }
    v1 = {
        **common,
        "destination_workload": "echo-v1",
        "destination_version": "v1",
        "destination_canonical_service": "echo",
    }
    v2 = {**common, "destination_workload": "echo-v2", "destination_version": "v2"}
    ok = {"request_protocol": "grpc", "response_code": "200", "grpc_response_status": "0", "response_flags": "-"}

    # v1 OK: the unary calls and the bidi call; bytes and messages exact.
    assert value(fams, req, **v1, **ok) == N_OK + 1
    size = len(PAYLOAD) + 5
    assert value(fams, "meshproxy_request_bytes", "_sum", **v1, **ok) == (N_OK + CHAT_MSGS) * size
    assert value(fams, "meshproxy_response_bytes", "_sum", **v1, **ok) == (N_OK + CHAT_MSGS) * size
    assert value(fams, "meshproxy_request_bytes", "_count", **v1, **ok) == N_OK + 1
    # 105 bytes: above 100, within 1000 (the chat's 315 too).
    assert bucket(fams, "meshproxy_request_bytes", "100", **v1, **ok) == 0
    assert bucket(fams, "meshproxy_request_bytes", "1000", **v1, **ok) == N_OK + 1
    assert value(fams, "meshproxy_request_messages", **v1, **ok) == N_OK + CHAT_MSGS
    assert value(fams, "meshproxy_response_messages", **v1, **ok) == N_OK + CHAT_MSGS

    # v1 failures: grpc-status 7 in trailers-only responses, no response message.
    failed = {**ok, "grpc_response_status": "7"}
    assert value(fams, req, **v1, **failed) == M_FAIL
    assert value(fams, "meshproxy_request_messages", **v1, **failed) == M_FAIL
    assert value(fams, "meshproxy_response_messages", **v1, **failed) == 0
    assert value(fams, "meshproxy_request_bytes", "_sum", **v1, **failed) == M_FAIL * size

    # v2 OK: the slow calls and the server stream (one request message of 4 bytes, 7 answers).
    assert value(fams, req, **v2, **ok) == SLOW + 1
    assert value(fams, "meshproxy_request_messages", **v2, **ok) == SLOW + 1
    assert value(fams, "meshproxy_response_messages", **v2, **ok) == SLOW + STREAM_MSGS
    assert value(fams, "meshproxy_request_bytes", "_sum", **v2, **ok) == SLOW * size + 9
    assert value(fams, "meshproxy_response_bytes", "_sum", **v2, **ok) == SLOW * size + STREAM_MSGS * 9
    # The slow calls took at least 60 ms: not in the buckets up to 50.
    dur = "meshproxy_request_duration_milliseconds"
    assert value(fams, dur, "_count", **v2, **ok) == SLOW + 1
    assert bucket(fams, dur, "50", **v2, **ok) <= 1
    assert bucket(fams, dur, "+Inf", **v2, **ok) == SLOW + 1
    assert value(fams, dur, "_sum", **v2, **ok) >= SLOW * SLOW_S * 1000

    # No route: answered by the sidecar (trailers-only UNIMPLEMENTED), no destination known.
    nr = value(fams, req, response_flags="NR", grpc_response_status="12", response_code="200")
    assert nr == K_NR
    [nr_sample] = samples(fams, req, response_flags="NR")
    assert nr_sample.labels["destination_service"] == nr_sample.labels["destination_workload"] == "unknown"

    # Plain HTTP: 200 and 503 from the upstream, no grpc status, bodies of 5 and 0 bytes.
    web = {"destination_service": WEB_HOST, "destination_service_name": "web", "destination_workload": "web"}
    http_ok = value(fams, req, **web, request_protocol="http", response_code="200", grpc_response_status="")
    assert http_ok == HTTP_OK
    assert value(fams, req, **web, response_code="503", response_flags="-") == HTTP_FAIL
    assert value(fams, "meshproxy_response_bytes", "_sum", **web, response_code="200") == HTTP_OK * 5
    assert not samples(fams, "meshproxy_request_messages", request_protocol="http")

    # Per route: success (grpc-status 0; HTTP below 500) and the duration histogram.
    rr = "meshproxy_route_requests"
    assert value(fams, rr, route="v1", success="true", listener="main", virtual_host="mesh") == N_OK + 1
    assert value(fams, rr, route="v1", success="false") == M_FAIL
    assert value(fams, rr, route="v2", success="true") == 1
    assert value(fams, rr, route="slow", success="true") == SLOW
    assert value(fams, rr, route="web", success="true") == HTTP_OK
    assert value(fams, rr, route="web", success="false") == HTTP_FAIL
    assert total(fams, rr) == EXPECTED - K_NR  # no route, no route stats
    rd = "meshproxy_route_request_duration_milliseconds"
    assert value(fams, rd, "_count", route="slow") == SLOW
    assert bucket(fams, rd, "50", route="slow") == 0
    assert bucket(fams, rd, "+Inf", route="slow") == SLOW

    # The cluster and config families.
    assert value(fams, "meshproxy_endpoints", cluster=CLUSTER, health="healthy") == 2
    assert value(fams, "meshproxy_upstream_requests_active", cluster=CLUSTER) == 0
    assert value(fams, "meshproxy_upstream_retries", cluster=CLUSTER) == 0
    assert value(fams, "meshproxy_config_info", version="metrics-1") == 1
    assert value(fams, "meshproxy_config_updates", result="accepted") == 1
    assert value(fams, "meshproxy_build_info") == 1
    assert "istio_requests" not in fams


def test_istio_names(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with mesh(tmp_path, request, "--concurrency", "1", "--metric-names", "istio") as sidecar:
        with channel(sidecar.address) as ch:
            for _ in range(N_OK):
                assert unary(ch, "/echo.V1/Echo") is grpc.StatusCode.OK
        fams = settle(sidecar, "istio", N_OK)
    assert value(fams, "istio_requests", destination_version="v1", grpc_response_status="0") == N_OK
    assert value(fams, "istio_request_duration_milliseconds", "_count", destination_version="v1") == N_OK
    assert value(fams, "istio_request_messages", destination_version="v1") == N_OK
    assert not [name for name in fams if name.startswith("meshproxy_request")]
    assert value(fams, "meshproxy_route_requests", route="v1", success="true") == N_OK


def test_workers_summed(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    calls = 24
    with mesh(tmp_path, request, "--concurrency", "2") as sidecar:
        for _ in range(calls):
            # A connection each: the kernel spreads them over both workers.
            with channel(sidecar.address) as ch:
                assert unary(ch, "/echo.V1/Echo") is grpc.StatusCode.OK
        fams = settle(sidecar, "meshproxy", calls)
        # A second scrape: the same figures (nothing counted twice, nothing lost).
        again = scrape(sidecar)
    assert total(fams, "meshproxy_requests") == calls
    assert value(fams, "meshproxy_requests", destination_version="v1", grpc_response_status="0") == calls
    assert value(fams, "meshproxy_request_bytes", "_sum", destination_version="v1") == calls * (len(PAYLOAD) + 5)
    assert value(fams, "meshproxy_route_requests", route="v1", success="true") == calls
    assert total(again, "meshproxy_requests") == calls
    # Alike in every worker: not summed.
    assert value(fams, "meshproxy_build_info") == 1
    assert value(fams, "meshproxy_config_info", version="metrics-1") == 1
    # Counted by each worker: summed.
    assert value(fams, "meshproxy_config_updates", result="accepted") == 2


# -- TCP passthroughs -----------------------------------------------------------------------------

TCP_SERVICE_IP = "10.96.0.10"
TCP_CONFIG = f"""\
version: "tcp-1"
node: {{ id: app-1.default, namespace: default, workload: app, labels: {{ app: app, version: a1 }} }}
listeners:
  - name: outbound
    address: 0.0.0.0:15001
    transparent: true
  - name: inbound
    address: 0.0.0.0:15006
    transparent: true
clusters:
  - name: remote
    service_addresses: ["{TCP_SERVICE_IP}:80"]
    endpoints:
      - address: {PEER_IP}:8080
        labels: {{ app: remote, version: r1, meshproxy.io/workload: remote-r1, meshproxy.io/namespace: peer }}
"""


def scrape_in(ns, namespace: str) -> dict:
    url = "http://127.0.0.1:15090/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    out = ns.exec(namespace, sys.executable, "-c", code).stdout
    return {f.name: f for f in text_string_to_metric_families(out)}


def test_tcp_passthroughs(netns, tmp_path: Path) -> None:  # noqa: F811  (the fixture imported above)
    config = tmp_path / "sidecar.yaml"
    config.write_text(TCP_CONFIG)
    proc = start_sidecar(netns, ["--config", str(config)])
    wait_until(proc, lambda: "ERR" not in netns.connect(netns.pod, "127.0.0.1", 15001))
    # The listeners speak first (one line) and close: each connection is a passthrough that ends.
    for _ in range(2):
        assert netns.connect(netns.pod, TCP_SERVICE_IP, 80) == f"remote {PEER_IP}:8080"
    assert netns.connect(netns.pod, PEER_IP, 9090) == f"remote {PEER_IP}:9090"
    assert netns.connect(netns.peer, POD_IP, 8080) == "app 127.0.0.1:8080"
    fams: dict = {}

    def closed() -> bool:
        nonlocal fams
        fams = scrape_in(netns, netns.pod)
        return total(fams, "meshproxy_tcp_connections_closed") >= 4

    harness.poll_until(closed, 10.0)
    remote = {"reporter": "source", "destination_service": "remote", "destination_workload": "remote-r1"}
    remote |= {"destination_workload_namespace": "peer", "destination_version": "r1", "source_workload": "app"}
    assert value(fams, "meshproxy_tcp_connections_opened", **remote) == 2
    assert value(fams, "meshproxy_tcp_connections_closed", **remote) == 2
    line = len(f"remote {PEER_IP}:8080\n")
    assert value(fams, "meshproxy_tcp_sent_bytes", **remote) == 2 * line
    assert value(fams, "meshproxy_tcp_received_bytes", **remote) == 0
    unknown = {"destination_service_name": "PassthroughCluster", "reporter": "source"}
    assert value(fams, "meshproxy_tcp_connections_closed", **unknown) == 1
    assert value(fams, "meshproxy_tcp_sent_bytes", **unknown) == len(f"remote {PEER_IP}:9090\n")
    inbound = {"reporter": "destination", "destination_workload": "app", "destination_workload_namespace": "default"}
    assert value(fams, "meshproxy_tcp_connections_closed", **inbound) == 1
    assert value(fams, "meshproxy_tcp_sent_bytes", **inbound) == len("app 127.0.0.1:8080\n")
    assert total(fams, "meshproxy_tcp_connections_opened") == 4
    assert total(fams, "meshproxy_requests") == 0
