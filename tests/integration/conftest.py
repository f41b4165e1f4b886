"""Fixtures for the real-peer tests: the interop server (a subprocess, so its GIL is not the
client's), the generated interop modules, and ``target``, which runs each test twice: straight
to the upstream (``direct``) and through a sidecar started for that test (``sidecar``).

A module picks its upstream by overriding the ``upstream_address`` fixture; the default is
the interop server.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.integration import harness

HERE = Path(__file__).resolve().parent

#: Applied to every test here when pytest-timeout is installed: a hung proxy fails one test
#: instead of CI. Each call also carries its own gRPC deadline.
TEST_TIMEOUT = 120

SIDECAR_KEY = pytest.StashKey["harness.Sidecar"]()
_PROCESSES_KEY = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: real processes on loopback (tests/integration)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timeouts = config.pluginmanager.hasplugin("timeout")
    for item in items:
        if HERE not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.integration)
        if timeouts and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On failure, show what the sidecar and the servers printed."""
    report = yield
    if report.failed:
        sidecar = item.stash.get(SIDECAR_KEY, None)
        if sidecar is not None and sidecar.process is not None:
            report.sections.append((f"{sidecar.proxy} (pid {sidecar.pid}) output", sidecar.output()))
        for process in item.session.stash.get(_PROCESSES_KEY, []):
            report.sections.append((f"{process.name} (pid {process.pid}) output", process.output()))
    return report


@dataclass
class Target:
    """Where a test's client connects: ``name`` is ``direct`` or ``sidecar``; ``sidecar`` is the
    running ``harness.Sidecar`` when there is one."""

    name: str
    address: str
    sidecar: harness.Sidecar | None = None

    def channel(self, options=()) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[*harness.CLIENT_OPTIONS, *options])


@pytest.fixture(scope="session")
def interop_pb2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not harness.GRPC_PROTO_AVAILABLE:
        pytest.skip(harness.GRPC_PROTO_MISSING)
    return harness.generate_interop_pb2(tmp_path_factory.mktemp("interop-pb2"))


@pytest.fixture(scope="session")
def interop(interop_pb2_dir: Path):
    """The generated interop modules: ``empty_pb2``, ``messages_pb2``, ``test_pb2_grpc``."""
    return harness.load_interop(interop_pb2_dir)


@pytest.fixture(scope="session")
def interop_server(request: pytest.FixtureRequest, interop_pb2_dir: Path):
    """``host:port`` of the interop server (tests/integration/interop_server.py) in a subprocess."""
    port = harness.free_port()
    argv = [sys.executable, str(HERE / "interop_server.py"), "--port", str(port), "--pb2-dir", str(interop_pb2_dir)]
    process = harness.Process(argv, name="interop-server")
    try:
        harness.wait_listening(harness.HOST, port, 30, alive=process.alive)
    except (TimeoutError, RuntimeError) as exc:
        process.kill()
        pytest.fail(f"{exc}\n{process.describe()}")
    request.session.stash.setdefault(_PROCESSES_KEY, []).append(process)
    yield f"{harness.HOST}:{port}"
    request.session.stash[_PROCESSES_KEY].remove(process)
    code = process.stop(signal.SIGTERM, 10)
    process.remove_log()
    assert code == 0, f"interop server exited with {code}"


@pytest.fixture(scope="session")
def upstream_address(interop_server: str) -> str:
    return interop_server


@contextlib.contextmanager
def open_target(request: pytest.FixtureRequest, kind: str, upstream: str):
    """A ``Target`` for ``upstream``: itself (``direct``) or a sidecar in front of it (``sidecar``)."""
    if kind == "direct":
        yield Target("direct", upstream)
        return
    with harness.Sidecar(upstream=upstream) as sidecar:
        request.node.stash[SIDECAR_KEY] = sidecar
        yield Target("sidecar", sidecar.address, sidecar)


@pytest.fixture(params=["direct", "sidecar"])
def target(request: pytest.FixtureRequest, upstream_address: str):
    with open_target(request, request.param, upstream_address) as t:
        yield t


@pytest.fixture
def channel(target: Target):
    with target.channel() as ch:
        yield ch


@pytest.fixture
def stub(interop, channel: grpc.Channel):
    return interop.test_pb2_grpc.TestServiceStub(channel)
