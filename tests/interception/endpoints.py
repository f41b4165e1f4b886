"""The two ends of the interception tests, run inside a network namespace with ``ip netns exec``.

``listen NAME:ADDR:PORT ...``: binds each listener, prints ``ready``, then answers every
connection with one line: ``NAME ORIGINAL-DESTINATION`` (SO_ORIGINAL_DST, the address the
client dialled before any REDIRECT, or the local address when conntrack has no entry) and
closes it. Runs until killed.

``connect [--uid U --gid G] [--source IP] [--send TEXT] HOST PORT``: dials, sends TEXT (``\\r``
and ``\\n`` unescaped) if given, prints the first line it is sent, exit 0; on failure prints
``ERR ...`` and exits 1. With --uid/--gid the credentials are dropped after the imports (so
the interpreter's files need not be readable by that uid) and before the socket exists: the
owner match judges the socket's credentials.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
TIMEOUT = 5.0


def original_destination(conn: socket.socket) -> str:
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return f"[{ipaddress.IPv6Address(raw[8:24])}]:{port}"
    raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return f"{ipaddress.IPv4Address(raw[4:8])}:{port}"


def serve(name: str, listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                orig = original_destination(conn)
            except OSError:
                # Not tracked by conntrack (no NAT in this namespace): the address dialled is
                # the one the connection arrived on. On 15001/15006 that would name the
                # listener's own port, so a redirect is never mistaken for a direct hit.
                host, port = conn.getsockname()[:2]
                orig = f"[{host}]:{port}" if conn.family == socket.AF_INET6 else f"{host}:{port}"
            conn.sendall(f"{name} {orig}\n".encode())


def listen(specs: list[str]) -> None:
    threads = []
    for spec in specs:
        name, rest = spec.split(":", 1)
        host, port = rest.rsplit(":", 1)
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, int(port)))
        sock.listen(16)
        threads.append(threading.Thread(target=serve, args=(name, sock), daemon=True))
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    threading.Event().wait()


def connect(argv: list[str]) -> int:
    uid = gid = None
    source = None
    send = b""
    while argv and argv[0].startswith("--"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        if flag == "--uid":
            uid = int(value)
        elif flag == "--gid":
            gid = int(value)
        elif flag == "--source":
            source = value
        elif flag == "--send":
            send = value.replace("\\r", "\r").replace("\\n", "\n").encode()
    host, port = argv
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            if source:
                sock.bind((source, 0))
            sock.connect((host, int(port)))
            sock.sendall(send)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        print(f"ERR {e}", flush=True)
        return 1
    print(data.decode().partition("\n")[0].strip(), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "listen":
        listen(sys.argv[2:])
    else:
        sys.exit(connect(sys.argv[2:]))
