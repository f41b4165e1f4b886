"""``make demo`` end to end, in its short mode: examples/demo/run.py as a subprocess, the way the
Makefile runs it, with the control plane, the reviews servers and the sidecar it starts.

The demo checks itself (exit 0 only if both splits were seen within statistical bounds, the
change followed the edit promptly, no call failed and every process stopped cleanly); these
tests hold it to that, to its output saying so, and to Ctrl-C stopping everything it started."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration import harness

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "examples" / "demo" / "run.py"
TIMEOUT = 60
#: The demo prints this row once every process is up and answering.
ALL_UP = "(this process)"
STOPPED_OK = re.compile(r"^  stopped client sidecar, reviews v2, reviews v1, control plane +ok$", re.M)

pytestmark = pytest.mark.timeout(2 * TIMEOUT)


class Demo:
    """run.py in a session of its own (so a signal to its group is what a terminal's Ctrl-C
    sends it), its output read line by line as it comes."""

    def __init__(self, **env: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(RUN)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.seen: list[str] = []
        #: The demo and every process it started, as of the last wait_for.
        self.tree: list[int] = []

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def output(self) -> str:
        return "".join(self.seen)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        """Read output until a line holds ``text``; fail if the demo ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"the demo ended before printing {text!r}:\n{self.output}")
            self.seen.append(line)
            if text in line:
                self.tree = harness.process_tree(self.popen.pid)
                return
        self.kill()
        pytest.fail(f"the demo did not print {text!r} within {timeout}s:\n{self.output}")

    def finish(self, timeout: float = TIMEOUT) -> str:
        """Wait for the end; return all the output."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the demo did not finish within {timeout}s:\n{self.output}")
        self._reader.join(5)
        while not self._lines.empty():
            line = self._lines.get_nowait()
            if line is not None:
                self.seen.append(line)
        return self.output

    def kill(self) -> None:
        for pid in [*self.tree, *harness.process_tree(self.popen.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(10)

    def leftovers(self) -> list[int]:
        """Processes the demo started that still exist."""
        alive = []
        for pid in self.tree:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            alive.append(pid)
        return alive


def live_lines(out: str) -> list[str]:
    return re.findall(r"^t= *\d+s  reviews\.local .*$", out, flags=re.M)


def test_demo_shows_the_split_change_and_checks_it():
    mesh = {path: path.read_bytes() for path in (ROOT / "examples" / "demo" / "mesh").iterdir()}
    demo = Demo(DEMO_SECONDS="3")
    demo.wait_for(ALL_UP)
    out = demo.finish()
    assert demo.popen.returncode == 0, out
    before, _, after = out.partition("the demo rewrote the VirtualService to 50% to v1, 50% to v2")
    assert after, out
    assert 'The VirtualService "reviews" (reviews-route.yaml) routes 80% to v1, 20% to v2.' in before
    assert len(live_lines(before)) == 3 and len(live_lines(after)) == 3, out
    assert re.search(r"^  before the edit .* expected 80/20 +ok$", out, flags=re.M), out
    assert re.search(r"^  after the edit .* expected 50/50 +ok$", out, flags=re.M), out
    assert re.search(r"^  the split changed \d+ ms after the edit was saved .* ok$", out, flags=re.M), out
    assert STOPPED_OK.search(out), out
    assert out.rstrip().endswith("demo: ok"), out
    assert not demo.leftovers(), f"processes of the demo outlived it: {demo.leftovers()}"
    assert {path: path.read_bytes() for path in mesh} == mesh, "the demo changed the repository's mesh files"


def test_ctrl_c_stops_everything_cleanly():
    demo = Demo(DEMO_SECONDS="2", DEMO_FOREVER="1")
    demo.wait_for(ALL_UP)
    demo.wait_for("running until Ctrl-C")
    demo.wait_for("t=  6s")
    os.killpg(demo.popen.pid, signal.SIGINT)
    out = demo.finish()
    assert demo.popen.returncode == 0, out
    assert STOPPED_OK.search(out), out
    assert out.rstrip().endswith("demo: ok"), out
    assert not demo.leftovers(), f"processes of the demo outlived it: {demo.leftovers()}"
