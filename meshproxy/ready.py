"""The kubelet's probes (``--ready``, Istio's port 15021) and ``meshproxy wait-ready``.

``serve`` answers HTTP/1.1 on its own socket, one request per connection:
``GET /ready`` is 200 once the worker has a config in force and its listeners
accept, 503 before that and while it drains; ``GET /healthz`` is 200 while the
process runs. With ``--concurrency N`` every worker binds the address
(SO_REUSEPORT) and answers for itself. Tiny on purpose: asyncio streams, no
framework, nothing kept per connection.

``wait_ready`` polls such a URL until it answers 200 (a classic-mode pod's
postStart, so the app starts once the proxy is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from meshproxy.transport import listening_socket

__all__ = ["serve", "wait_ready"]

#: The most a request's head may be; a probe's is well under 1 KiB.
MAX_HEAD = 8192
#: A client that has not sent its request within this is dropped.
READ_TIMEOUT = 5.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


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


async def serve(
    address: tuple[str, int], is_ready: Callable[[], bool], is_draining: Callable[[], bool]
) -> asyncio.AbstractServer:
    """Start answering the probes on ``address`` (host, port); OSError if it cannot be bound."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(head.split(b"\r\n", 1)[0], is_ready, is_draining))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a probe that went away or sent garbage: nothing to answer
        finally:
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
