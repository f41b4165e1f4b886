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
