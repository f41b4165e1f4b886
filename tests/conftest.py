"""Session-wide test settings.

``XDG_STATE_HOME``: a local control plane (``meshproxy-control serve --config-dir``) keeps its CA
under it; each test process (each xdist worker) gets its own, so that no test writes to the home
directory or shares a CA with another process's tests.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_home(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old
