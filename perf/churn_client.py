"""Open new connections to an HTTP/2 server one after another, one GET each, for a while (for bench_mtls).

Usage: ``python perf/churn_client.py PORT PATH SECONDS [CERT KEY BUNDLE]``. With the three
files each connection is TLS 1.3 with that client certificate, checking the server's chain
against ``BUNDLE`` and offering the ALPN a sidecar offers (``meshproxy.tls.client_context``:
``h2`` and the mesh mark); without them, prior-knowledge h2c. Each connection sends the
preface, an empty SETTINGS and one GET, reads up to the response's END_STREAM, and is closed.
Prints one JSON line: connections completed, errors, seconds, per-connection times (µs).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
END_STREAM = 0x1
DATA, HEADERS, RST_STREAM, GOAWAY = 0, 1, 3, 7


def request(path: str) -> bytes:
    """Preface, SETTINGS, and stream 1's HEADERS: GET ``path`` (HPACK: static indexes and plain literals)."""
    raw_path, authority = path.encode(), b"bench"
    block = b"\x82\x86" + b"\x04" + bytes([len(raw_path)]) + raw_path + b"\x01" + bytes([len(authority)]) + authority
    headers = len(block).to_bytes(3, "big") + bytes([HEADERS, 0x5]) + (1).to_bytes(4, "big") + block
    return PREFACE + SETTINGS + headers


def read_response(sock: socket.socket) -> None:
    """Read frames until stream 1 ends; OSError if it is reset, the connection goes away or closes first."""
    buf = b""
    while True:
        while len(buf) >= 9:
            size = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + size:
                break
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = buf[9 + size :]
            if kind in (RST_STREAM, GOAWAY) and stream in (0, 1):
                raise OSError(f"frame type {kind} before the response ended")
            if stream == 1 and kind in (DATA, HEADERS) and flags & END_STREAM:
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("closed before the response ended")
        buf += chunk


def main(argv: Sequence[str]) -> int:
    port, path, seconds = int(argv[0]), argv[1], float(argv[2])
    context = None
    if len(argv) >= 6:
        from meshproxy import tls

        read = lambda name: Path(name).read_bytes()  # noqa: E731
        context = tls.client_context(read(argv[3]), read(argv[4]), read(argv[5]))
    payload = request(path)
    done = errors = 0
    times: list[int] = []
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter_ns()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = context.wrap_socket(raw, server_hostname=None) if context is not None else raw
                try:
                    sock.sendall(payload)
                    read_response(sock)
                finally:
                    if sock is not raw:
                        sock.close()
        except OSError:
            errors += 1
            continue
        times.append((time.perf_counter_ns() - t0) // 1000)
        done += 1
    out = {"connections": done, "errors": errors, "seconds": time.monotonic() - started, "times_us": times}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
