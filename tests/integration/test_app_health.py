"""The sidecar's ``--ready`` server runs the app's rewritten probes (``/app-health/...``, from
``MESHPROXY_APP_PROBES``) and drains on ``POST /quitquitquit``: a real ``meshproxy run`` against a tiny
HTTP/1.1 app, an HTTPS one, and a grpcio server with the standard health service. Bounded: every wait
capped; the only wall-clock bounds are generous ones around a probe's timeout."""

from __future__ import annotations

import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from injector.mutate import PROBES_ENV as INJECTOR_PROBES_ENV
from injector.mutate import _rewrite_probes
from meshproxy.ready import PROBES_ENV, AppProbe, app_probes_from_env, parse_app_probes
from tests.integration.harness import HOST, Sidecar, free_port, poll_until, process_tree, wait_listening

TIMEOUT = 10.0


# -- the apps ------------------------------------------------------------------------------------


class HttpApp:
    """An HTTP/1.1 app in a thread: answers ``status`` to every GET and keeps the last request's headers."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self.paths: list[str] = []
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                app.paths.append(self.path)
                app.headers = dict(self.headers.items())
                body = b"app\n"
                self.send_response(app.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        if tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcApp:
    """A grpcio server with the health service; ``serving(service, yes)`` toggles a service's status."""

    def __init__(self) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()
        self.serving("", True)

    def serving(self, service: str, yes: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if yes else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service, status)

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def http_app():
    app = HttpApp()
    yield app
    app.stop()


@pytest.fixture
def grpc_app():
    app = GrpcApp()
    yield app
    app.stop()


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


# -- the sidecar ---------------------------------------------------------------------------------


def sidecar(upstream_port: int, probes: object, extra_args: tuple[str, ...] = ()) -> tuple[Sidecar, int]:
    """A sidecar with ``--ready`` on a free port and ``probes`` (JSON-encoded unless a str) in the env."""
    ready = free_port()
    value = probes if isinstance(probes, str) else json.dumps(probes)
    env = {**os.environ, PROBES_ENV: value}
    args = ["--ready", f"{HOST}:{ready}", *extra_args]
    sc = Sidecar(upstream=f"{HOST}:{upstream_port}", extra_args=args, env=env)
    return sc, ready


def request(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def workers_catching_sigterm(pid: int) -> int:
    """How many of ``pid``'s worker processes have their SIGTERM handler installed."""
    count = 0
    for worker in process_tree(pid)[1:]:
        try:
            status = Path(f"/proc/{worker}/status").read_text()
        except OSError:
            continue
        caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
        count += bool(caught & (1 << (signal.SIGTERM - 1)))
    return count


def http_probe(port: int, path: str = "/healthz", **extra) -> dict:
    return {"httpGet": {"path": path, "port": port, "scheme": "HTTP", **extra}, "timeoutSeconds": 1}


# -- httpGet -------------------------------------------------------------------------------------


def test_an_http_probe_follows_the_app(http_app):
    headers = [{"name": "X-Probe", "value": "yes"}]
    probes = {"/app-health/app/livez": http_probe(http_app.port, "/healthz?deep=1", httpHeaders=headers)}
    sc, ready = sidecar(http_app.port, probes)
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        status, body = request(ready, "/app-health/app/livez")
        assert (status, body) == (200, "ok: HTTP 200\n")
        assert http_app.paths[-1] == "/healthz?deep=1"
        assert http_app.headers["X-Probe"] == "yes"
        assert http_app.headers["Host"] == f"127.0.0.1:{http_app.port}"
        assert http_app.headers["User-Agent"].startswith("kube-probe/")
        http_app.status = 500
        assert request(ready, "/app-health/app/livez") == (503, "app probe failed: HTTP 500\n")
        http_app.status = 302  # the kubelet counts 200-399 as success
        assert request(ready, "/app-health/app/livez")[0] == 200
        http_app.status = 204
        assert request(ready, "/app-health/app/livez")[0] == 200
        # the readiness endpoints are as they were
        assert request(ready, "/healthz") == (200, "ok\n")
        assert poll_until(lambda: request(ready, "/ready")[0] == 200, TIMEOUT)


def test_a_host_header_in_the_probe_is_sent_as_given(http_app):
    probes = {"/app-health/app/readyz": http_probe(http_app.port, httpHeaders=[{"name": "host", "value": "app.local"}])}
    sc, ready = sidecar(http_app.port, probes)
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        assert request(ready, "/app-health/app/readyz")[0] == 200
        assert [v for k, v in http_app.headers.items() if k.lower() == "host"] == ["app.local"]


def test_an_https_probe_does_not_verify_the_certificate(tmp_path):
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=elsewhere"),
            *("-keyout", key, "-out", cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    app = HttpApp(tls=(cert, key))
    try:
        probes = {"/app-health/app/livez": http_probe(app.port, scheme="HTTPS")}
        sc, ready = sidecar(app.port, probes)
        with sc:
            wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
            assert request(ready, "/app-health/app/livez") == (200, "ok: HTTP 200\n")
            app.status = 503
            assert request(ready, "/app-health/app/livez") == (503, "app probe failed: HTTP 503\n")
    finally:
        app.stop()


def test_an_app_that_is_not_listening_fails_the_probe(http_app):
    gone = free_port()
    sc, ready = sidecar(http_app.port, {"/app-health/app/livez": http_probe(gone)})
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        status, body = request(ready, "/app-health/app/livez")
        assert status == 503
        assert body.startswith("app probe failed: ") and body.count("\n") == 1


@pytest.mark.parametrize("kind", ["httpGet", "grpc"])
def test_an_app_that_never_answers_fails_within_the_probe_timeout(silent_port, kind):
    probe = {kind: {"port": silent_port}, "timeoutSeconds": 1}
    sc, ready = sidecar(silent_port, {"/app-health/app/livez": probe})
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        start = time.monotonic()
        assert request(ready, "/app-health/app/livez") == (503, "app probe failed: no answer within 1s\n")
        took = time.monotonic() - start
        assert 0.9 <= took < 1 + 5.0, took  # the probe's timeout, with generous slack


# -- grpc ----------------------------------------------------------------------------------------


def test_a_grpc_probe_follows_the_health_service(grpc_app):
    probes = {
        "/app-health/app/livez": {"grpc": {"port": grpc_app.port}, "timeoutSeconds": 1},
        "/app-health/app/readyz": {"grpc": {"port": grpc_app.port, "service": "orders"}, "timeoutSeconds": 2},
    }
    sc, ready = sidecar(grpc_app.port, probes)
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        assert request(ready, "/app-health/app/livez") == (200, "ok\n")
        # a service the health service does not know: NOT_FOUND, a failure
        status, body = request(ready, "/app-health/app/readyz")
        assert status == 503 and body == "app probe failed: grpc-status 5\n"
        grpc_app.serving("orders", True)
        assert request(ready, "/app-health/app/readyz")[0] == 200
        grpc_app.serving("", False)
        assert request(ready, "/app-health/app/livez") == (503, "app probe failed: serving status 2\n")
        assert request(ready, "/app-health/app/readyz")[0] == 200
        grpc_app.serving("", True)
        assert request(ready, "/app-health/app/livez")[0] == 200


# -- paths, methods, a malformed table -----------------------------------------------------------


def test_unknown_app_health_paths_are_404_and_only_get_runs_a_probe(http_app):
    sc, ready = sidecar(http_app.port, {"/app-health/app/livez": http_probe(http_app.port)})
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        assert request(ready, "/app-health/app/startupz")[0] == 404
        assert request(ready, "/app-health/other/livez")[0] == 404
        assert request(ready, "/app-health/")[0] == 404
        assert request(ready, "/app-health/app/livez", "POST") == (405, "GET only\n")
        assert http_app.paths == []
        assert request(ready, "/app-health/app/livez?x=1")[0] == 200


@pytest.mark.parametrize("value", ["{not json", '["/app-health/a/livez"]', '{"/app-health/a/livez": {"exec": {}}}'])
def test_a_malformed_table_serves_no_app_probe_and_ready_still_works(http_app, value):
    sc, ready = sidecar(http_app.port, value)
    with sc:
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        assert poll_until(lambda: request(ready, "/ready") == (200, "ready\n"), TIMEOUT)
        assert request(ready, "/healthz") == (200, "ok\n")
        assert request(ready, "/app-health/a/livez")[0] == 404
        assert sc.output().count(f"{PROBES_ENV} ignored") == 1, sc.output()


# -- /quitquitquit -------------------------------------------------------------------------------


def test_quitquitquit_drains_and_exits_0(http_app):
    sc, ready = sidecar(http_app.port, {})
    sc.launch()
    try:
        sc.wait_ready()
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        assert request(ready, "/quitquitquit") == (405, "POST only\n")
        assert request(ready, "/quitquitquit", "PUT")[0] == 405
        assert sc.process.alive()
        assert request(ready, "/quitquitquit", "POST") == (200, "draining\n")
        assert sc.process.popen.wait(TIMEOUT) == 0, sc.process.describe()
    finally:
        sc.process.stop(signal.SIGKILL, 5)
        sc.process.remove_log()


def test_quitquitquit_with_several_workers_stops_them_all(http_app):
    sc, ready = sidecar(http_app.port, {}, ("--concurrency", "2"))
    sc.launch()
    try:
        sc.wait_ready()
        wait_listening(HOST, ready, TIMEOUT, sc.process.alive)
        # every worker past its start (a worker still starting would die of the SIGTERM, as it would of anyone's)
        assert poll_until(lambda: workers_catching_sigterm(sc.pid) == 2, TIMEOUT), sc.process.describe()
        assert request(ready, "/quitquitquit", "POST") == (200, "draining\n")
        assert sc.process.popen.wait(TIMEOUT) == 0, sc.process.describe()
    finally:
        sc.process.stop(signal.SIGKILL, 5)
        sc.process.remove_log()


# -- the table (unit) ----------------------------------------------------------------------------


def test_the_injectors_table_parses():
    assert INJECTOR_PROBES_ENV == PROBES_ENV
    container = {
        "name": "app",
        "ports": [{"name": "http", "containerPort": 8080}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http", "httpHeaders": [{"name": "X-A", "value": "b"}]},
            "timeoutSeconds": 3,
        },
        "readinessProbe": {"grpc": {"port": 9090, "service": "orders"}},
        "startupProbe": {"httpGet": {"port": 8080, "scheme": "HTTPS"}},
    }
    originals = _rewrite_probes([container])
    probes = parse_app_probes(json.dumps(originals, sort_keys=True, separators=(",", ":")))
    assert probes == {
        b"/app-health/app/livez": AppProbe("http", 8080, 3.0, path="/healthz", headers=(("X-A", "b"),)),
        b"/app-health/app/readyz": AppProbe("grpc", 9090, 1.0, service="orders"),
        b"/app-health/app/startupz": AppProbe("http", 8080, 1.0, path="/", scheme="HTTPS"),
    }


@pytest.mark.parametrize(
    "value",
    [
        "",
        "nope",
        "[]",
        '{"/healthz": {"httpGet": {"port": 80}}}',
        '{"/app-health/a/livez": 1}',
        '{"/app-health/a/livez": {"httpGet": {"port": "http"}}}',
        '{"/app-health/a/livez": {"httpGet": {"port": 0}}}',
        '{"/app-health/a/livez": {"httpGet": {"port": 80, "scheme": "FTP"}}}',
        '{"/app-health/a/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "X", "value": "a\\r\\nB: c"}]}}}',
        '{"/app-health/a/livez": {"httpGet": {"port": 80}, "grpc": {"port": 90}}}',
        '{"/app-health/a/livez": {"grpc": {"port": 90}, "timeoutSeconds": 0}}',
        '{"/app-health/a/livez": {"tcpSocket": {"port": 90}}}',
    ],
)
def test_a_malformed_table_is_refused(value):
    with pytest.raises(ValueError):
        parse_app_probes(value)


def test_a_malformed_env_value_is_one_warning_and_no_probe(caplog):
    with caplog.at_level(logging.WARNING, logger="meshproxy.ready"):
        assert app_probes_from_env({PROBES_ENV: "{"}) == {}
    assert len(caplog.records) == 1 and PROBES_ENV in caplog.records[0].getMessage()
    assert app_probes_from_env({}) == {}
    probe = {"/app-health/a/livez": {"grpc": {"port": 90}}}
    assert app_probes_from_env({PROBES_ENV: json.dumps(probe)}) == {b"/app-health/a/livez": AppProbe("grpc", 90)}
