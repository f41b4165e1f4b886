"""``meshproxy-control``'s command line: a bad invocation is one line on stderr, exit 2 (1: it cannot start)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "the following arguments are required: command"),
        (("serve",), 2, "one of the arguments --config-dir --kubernetes is required"),
        (("serve", "--config-dir", "/nonexistent-dir"), 2, "--config-dir /nonexistent-dir: not a directory"),
        (("serve", "--config-dir", ".", "--listen", "nope"), 2, "argument --listen: 'nope': no port"),
        (("serve", "--config-dir", ".", "--listen", "example.com:1"), 2, "argument --listen"),
        (("serve", "--config-dir", ".", "--debounce", "-1"), 2, "argument --debounce: '-1' must not be negative"),
        (("serve", "--config-dir", ".", "--kubernetes"), 2, "not allowed with argument"),
        (("serve", "--config-dir", ".", "--kubeconfig", "k"), 2, "--kubeconfig goes with --kubernetes"),
        (("serve", "--config-dir", ".", "--default-export-to", ","), 2, "argument --default-export-to"),
        (("serve", "--kubernetes", "--kubeconfig", "/nonexistent"), 1, "no Kubernetes credentials"),
    ],
)
def test_bad_invocations_are_one_line(args: tuple[str, ...], code: int, message: str) -> None:
    proc = run(*args)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert lines[0].startswith("meshproxy-control")


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run("serve", "--config-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}", "--log-level", "error")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"meshproxy-control: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


# -- the sidecar injector webhook --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("serve", "--config-dir", ".", "--webhook-listen", "127.0.0.1:1"), 2, "--webhook-listen goes with --webhook"),
        (("serve", "--config-dir", ".", "--sidecar-image", "x"), 2, "--sidecar-image goes with --webhook"),
        (("serve", "--config-dir", ".", "--webhook-cert-dir", "."), 2, "--webhook-cert-dir goes with --webhook"),
        (("serve", "--config-dir", ".", "--webhook", "--webhook-listen", "nope"), 2, "argument --webhook-listen"),
        (
            ("serve", "--config-dir", ".", "--webhook", "--webhook-cert-dir", "/nonexistent-dir"),
            2,
            "--webhook-cert-dir /nonexistent-dir: not a directory",
        ),
    ],
)
def test_bad_webhook_invocations_are_one_line(args: tuple[str, ...], code: int, message: str) -> None:
    test_bad_invocations_are_one_line(args, code, message)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cert_dir_without_certificates_is_one_line_and_exit_1(tmp_path) -> None:
    proc = run(
        "serve", "--config-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--webhook", "--webhook-cert-dir",
        str(tmp_path), "--webhook-listen", f"127.0.0.1:{free_port()}", "--log-level", "error",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"meshproxy-control: error: --webhook-cert-dir {tmp_path}: cannot load tls.crt and tls.key"
    ), proc.stderr


def _review(port: int, ca_pem: bytes | None, review: dict, timeout: float = 20.0) -> dict:
    """POST the review once the webhook listens; ca_pem None: no verification (the self-signed case)."""
    import http.client
    import json
    import socket
    import ssl
    import time

    if ca_pem is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cadata=ca_pem.decode())
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10)
    conn.sock = context.wrap_socket(sock, server_hostname="meshproxy-control.meshproxy-system.svc")
    try:
        conn.request("POST", "/inject", body=json.dumps(review), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        der = conn.sock.getpeercert(binary_form=True)
        return json.loads(response.read()) | {"peer": der}
    finally:
        conn.close()


def _pod_review() -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "cli-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": "web-", "labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "image": "example/web:1",
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                        }
                    ]
                },
            },
        },
    }


def test_serve_with_the_webhook(tmp_path) -> None:
    """A cert dir and a STRICT namespace in the config dir: the probe is rewritten, the image is ours."""
    import base64
    import json
    import signal

    from injector.certs import WebhookCerts, service_dns_names
    from tests.fakekube.server import json_patch

    mesh = tmp_path / "mesh"
    mesh.mkdir()
    (mesh / "pa.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n"
    )
    certs = WebhookCerts.generate(service_dns_names())
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "tls.crt").write_bytes(certs.cert_pem)
    (tls / "tls.key").write_bytes(certs.key_pem)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "control", "serve", "--config-dir", str(mesh), "--listen", "127.0.0.1:0",
            "--webhook", "--webhook-listen", f"127.0.0.1:{port}", "--webhook-cert-dir", str(tls),
            "--sidecar-image", "registry.local/proxy:dev", "--log-level", "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        answer = _review(port, certs.ca_pem, _pod_review())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    response = answer["response"]
    assert (response["uid"], response["allowed"], response["patchType"]) == ("cli-1", True, "JSONPatch")
    pod = json_patch(_pod_review()["request"]["object"], json.loads(base64.b64decode(response["patch"])))
    proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "meshproxy-proxy")
    assert proxy["image"] == "registry.local/proxy:dev"
    assert pod["spec"]["containers"][0]["livenessProbe"]["httpGet"] == {
        "path": "/app-health/web/livez",
        "port": 15021,
        "scheme": "HTTP",
    }


def test_serve_with_a_self_signed_webhook(tmp_path) -> None:
    import base64
    import signal

    from cryptography import x509

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "control", "serve", "--config-dir", str(tmp_path), "--listen", "127.0.0.1:0",
            "--webhook", "--webhook-listen", f"127.0.0.1:{port}", "--log-level", "error",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        answer = _review(port, None, _pod_review())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert answer["response"]["allowed"] is True
    # no STRICT PeerAuthentication: the probe stays the app's
    assert b"app-health" not in base64.b64decode(answer["response"]["patch"])
    cert = x509.load_der_x509_certificate(answer["peer"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "meshproxy-control.meshproxy-system.svc" in names


def test_a_cert_dir_is_reloaded_when_its_files_change(tmp_path) -> None:
    """As the kubelet updates a mounted Secret: new connections get the new certificate."""
    import asyncio
    import ssl

    from control.cli import _reload_files
    from injector.certs import WebhookCerts, service_dns_names

    first, second = WebhookCerts.generate(service_dns_names()), WebhookCerts.generate(service_dns_names())
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    crt.write_bytes(first.cert_pem)
    key.write_bytes(first.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)

    async def handshake(port: int, ca_pem: bytes) -> bool:
        client = ssl.create_default_context(cadata=ca_pem.decode())
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="meshproxy-control.meshproxy-system.svc"
            )
        except ssl.SSLCertVerificationError:
            return False
        writer.close()
        return True

    async def scenario() -> tuple[bool, bool, bool]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        task = asyncio.create_task(_reload_files(context, (crt, key), interval=0.02))
        try:
            before = await handshake(port, first.ca_pem)
            # a new pair, written as new files (the kubelet swaps a symlink to a new directory)
            for path, data in ((crt, second.cert_pem), (key, second.key_pem)):
                tmp = path.with_suffix(".new")
                tmp.write_bytes(data)
                tmp.replace(path)
            for _ in range(500):
                if await handshake(port, second.ca_pem):
                    break
                await asyncio.sleep(0.02)
            return before, await handshake(port, second.ca_pem), await handshake(port, first.ca_pem)
        finally:
            task.cancel()
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == (True, True, False)
