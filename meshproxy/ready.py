"""The kubelet's probes (``--ready``, Istio's port 15021) and ``meshproxy wait-ready``.

``serve`` answers HTTP/1.1 on its own socket, one request per connection:
``GET /ready`` is 200 once the worker has a config in force and its listeners
accept, 503 before that and while it drains; ``GET /healthz`` is 200 while the
process runs. With ``--concurrency N`` every worker binds the address
(SO_REUSEPORT) and answers for itself. Tiny on purpose: asyncio streams, no
framework, nothing kept per connection.

``GET /app-health/<container>/<livez|readyz|startupz>`` runs an app's own probe
for the kubelet, when the injector rewrote it (STRICT mTLS would refuse the
kubelet's plaintext probe; Istio's probe rewrite). The original probes come in
``MESHPROXY_APP_PROBES`` as JSON by path, read once at startup (a malformed
value is logged once and no app probe is served): ``httpGet`` is an HTTP/1.1
GET to 127.0.0.1 (the pod's network namespace) with the probe's path, port,
``httpHeaders`` and the Host, User-Agent and Accept the kubelet would send,
over TLS without verification for ``scheme: HTTPS``; it passes on 200-399.
``grpc`` is a ``grpc.health.v1.Health/Check`` of the probe's service on
127.0.0.1:port; it passes on SERVING. Either within the probe's
``timeoutSeconds`` (default 1). A pass is 200, a failure 503 with a one-line
reason, a path not in the table 404.

``POST /quitquitquit`` (Envoy's and Istio's name) answers 200 and drains the
sidecar as SIGTERM does, which then exits 0; with ``--concurrency N`` the
worker that got it has the supervisor drain them all. It is how a
classic-mode Job's app, its work done, lets the pod complete::

    curl -fsS -X POST http://127.0.0.1:15021/quitquitquit

(a native sidecar needs none of this: the kubelet stops it after the app).

``wait_ready`` polls such a URL until it answers 200 (a classic-mode pod's
postStart, so the app starts once the proxy is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy.transport import listening_socket

__all__ = ["PROBES_ENV", "AppProbe", "app_probes_from_env", "parse_app_probes", "probe_app", "serve", "wait_ready"]

log = logging.getLogger("meshproxy.ready")

#: The environment variable the injector hands the original probes in (``injector.mutate.PROBES_ENV``).
PROBES_ENV = "MESHPROXY_APP_PROBES"
#: Where the app listens: the sidecar shares the pod's network namespace.
APP_HOST = "127.0.0.1"
#: The kubelet's default ``timeoutSeconds``.
DEFAULT_PROBE_TIMEOUT = 1.0
#: The most of the app's answer read for its status line.
MAX_STATUS_LINE = 8192

#: The most a request's head may be; a probe's is well under 1 KiB.
MAX_HEAD = 8192
#: A client that has not sent its request within this is dropped.
READ_TIMEOUT = 5.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass(frozen=True)
class AppProbe:
    """One original probe: ``kind`` "http" (port, path, scheme, headers) or "grpc" (port, service)."""

    kind: str
    port: int
    timeout: float = DEFAULT_PROBE_TIMEOUT
    path: str = "/"
    scheme: str = "HTTP"
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or "\r" in value or "\n" in value:
        raise ValueError(f"{what}: expected a one-line string")
    return value


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{where}: port: expected a number 1-65535, got {value!r}")
    return value


def _probe(where: str, spec: object) -> AppProbe:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected an object")
    timeout = spec.get("timeoutSeconds", DEFAULT_PROBE_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"{where}: timeoutSeconds: expected a positive number, got {timeout!r}")
    http, grpc = spec.get("httpGet"), spec.get("grpc")
    if isinstance(http, dict) and grpc is None:
        path = _text(http.get("path") or "/", f"{where}: path")
        scheme = _text(http.get("scheme") or "HTTP", f"{where}: scheme").upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise ValueError(f"{where}: scheme: expected HTTP or HTTPS, got {scheme!r}")
        headers = []
        raw_headers = http.get("httpHeaders") or []
        if not isinstance(raw_headers, list):
            raise ValueError(f"{where}: httpHeaders: expected a list")
        for h in raw_headers:
            if not isinstance(h, dict):
                raise ValueError(f"{where}: httpHeaders: expected objects with name and value")
            name = _text(h.get("name"), f"{where}: httpHeaders name")
            if not name or ":" in name or " " in name:
                raise ValueError(f"{where}: httpHeaders: bad name {name!r}")
            headers.append((name, _text(h.get("value", ""), f"{where}: httpHeaders value")))
        return AppProbe(
            "http",
            _port(http.get("port"), where),
            float(timeout),
            path=path if path.startswith("/") else "/" + path,
            scheme=scheme,
            host=_text(http.get("host") or "", f"{where}: host"),
            headers=tuple(headers),
        )
    if isinstance(grpc, dict) and http is None:
        service = grpc.get("service") or ""
        return AppProbe(
            "grpc", _port(grpc.get("port"), where), float(timeout), service=_text(service, f"{where}: service")
        )
    raise ValueError(f"{where}: expected exactly one of httpGet or grpc")


def parse_app_probes(text: str) -> dict[bytes, AppProbe]:
    """``MESHPROXY_APP_PROBES`` (JSON: path -> original probe) as the probes by request path.
    ValueError, naming the path, for anything else."""
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(table, dict):
        raise ValueError("expected a JSON object of paths")
    probes: dict[bytes, AppProbe] = {}
    for path, spec in table.items():
        if not path.startswith("/app-health/") or not path.isascii() or " " in path or "?" in path:
            raise ValueError(f"{path!r}: expected a path under /app-health/")
        probes[path.encode()] = _probe(path, spec)
    return probes


def app_probes_from_env(environ: dict[str, str] | None = None) -> dict[bytes, AppProbe]:
    """The app probes in ``MESHPROXY_APP_PROBES``; none (and one warning) if the value is malformed."""
    text = (os.environ if environ is None else environ).get(PROBES_ENV)
    if not text:
        return {}
    try:
        return parse_app_probes(text)
    except ValueError as e:
        log.warning("%s ignored, no app probe is served: %s", PROBES_ENV, e)
        return {}


def _tls_context() -> ssl.SSLContext:
    # the kubelet's HTTPS probe does not verify the app's certificate either
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _http_request(probe: AppProbe) -> bytes:
    host = probe.host or APP_HOST
    authority = f"[{host}]:{probe.port}" if ":" in host else f"{host}:{probe.port}"
    defaults = [("Host", authority), ("User-Agent", "kube-probe/meshproxy"), ("Accept", "*/*")]
    given = {name.lower() for name, _ in probe.headers}
    fields = [h for h in defaults if h[0].lower() not in given] + list(probe.headers)
    fields.append(("Connection", "close"))
    head = f"GET {probe.path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    return head.encode("latin-1", "replace")


async def _http_probe(probe: AppProbe) -> tuple[bool, str]:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(probe.timeout):
            tls = _tls_context() if probe.scheme == "HTTPS" else None
            reader, writer = await asyncio.open_connection(APP_HOST, probe.port, ssl=tls, limit=MAX_STATUS_LINE)
            writer.write(_http_request(probe))
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return False, f"no answer within {probe.timeout:g}s"
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; a too long line a ValueError
        return False, str(e) or type(e).__name__
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "no HTTP answer" if not line else "not an HTTP answer"
    status = int(parts[1])
    if 200 <= status < 400:
        return True, f"HTTP {status}"
    return False, f"HTTP {status}"


async def probe_app(probe: AppProbe) -> tuple[bool, str]:
    """Run one original probe against the app: (passed, a short reason)."""
    if probe.kind == "grpc":
        from meshproxy.health import grpc_health_check

        return await grpc_health_check(APP_HOST, probe.port, probe.service, probe.timeout)
    return await _http_probe(probe)


def _response(status: int, body: str) -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + data


def answer(request_line: bytes, is_ready: Callable[[], bool], is_draining: Callable[[], bool]) -> bytes:
    """The response to one request line (``GET /ready HTTP/1.1``)."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, "bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target not in (b"/ready", b"/healthz"):
        return _response(404, "not found: try /ready or /healthz\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, "GET only\n")
    if target == b"/healthz":
        response = _response(200, "ok\n")
    elif is_ready():
        response = _response(200, "ready\n")
    else:
        response = _response(503, "draining\n" if is_draining() else "not ready: no config in force yet\n")
    if method == b"HEAD":
        response = response[: response.index(b"\r\n\r\n") + 4]
    return response


async def _answer_app(method: bytes, probe: AppProbe | None) -> bytes:
    if probe is None:
        return _response(404, "not found: no such app probe\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, "GET only\n")
    ok, why = await probe_app(probe)
    if ok:
        response = _response(200, f"ok: {why}\n" if why else "ok\n")
    else:
        response = _response(503, f"app probe failed: {why}\n")
    if method == b"HEAD":
        response = response[: response.index(b"\r\n\r\n") + 4]
    return response


async def serve(
    address: tuple[str, int],
    is_ready: Callable[[], bool],
    is_draining: Callable[[], bool],
    shutdown: Callable[[], None] | None = None,
    app_probes: dict[bytes, AppProbe] | None = None,
) -> asyncio.AbstractServer:
    """Start answering the probes on ``address`` (host, port); OSError if it cannot be bound.

    ``shutdown`` is what ``POST /quitquitquit`` calls (the drain SIGTERM starts; without it the path is
    404); ``app_probes`` the ``/app-health/`` table, by default ``MESHPROXY_APP_PROBES``'s."""
    probes = app_probes_from_env() if app_probes is None else app_probes
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        quit_after = False
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            parts = line.split()
            target = parts[1].split(b"?", 1)[0] if len(parts) == 3 and parts[2].startswith(b"HTTP/1.") else b""
            if target.startswith(b"/app-health/"):
                response = await _answer_app(parts[0], probes.get(target))
            elif target == b"/quitquitquit" and shutdown is not None:
                if parts[0] == b"POST":
                    response, quit_after = _response(200, "draining\n"), True
                else:
                    response = _response(405, "POST only\n")
            else:
                response = answer(line, is_ready, is_draining)
            writer.write(response)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a probe that went away or sent garbage: nothing to answer
        finally:
            if quit_after:
                loop.call_soon(shutdown)  # whether or not the answer got out: it was asked
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    sock = listening_socket(*address)
    try:
        return await asyncio.start_server(handle, sock=sock, limit=MAX_HEAD)
    except BaseException:
        sock.close()
        raise


def wait_ready(url: str, timeout: float, interval: float = 0.2) -> tuple[bool, str]:
    """Poll ``url`` until it answers 200 or ``timeout`` seconds pass: (ready, the last answer)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    while True:
        left = deadline - time.monotonic()
        try:
            with opener.open(url, timeout=max(0.1, min(1.0, left))) as response:
                if response.status == 200:
                    return True, "200"
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            last = str(getattr(reason, "strerror", None) or reason)
        if time.monotonic() + interval > deadline:
            return False, last
        time.sleep(interval)
