"""The ``C`` fixture of the core's tests that run on both twins: the compiled connection module (skipped when
it is not built) and the pure-Python one, made the twin ``tests.conn.peers`` builds its connections with."""

from __future__ import annotations

import pytest

from meshproxy import conn, conn_py
from tests.conn import peers

COMPILED = conn.compiled()


@pytest.fixture(params=["compiled", "pure"])
def C(request, monkeypatch):
    if request.param == "compiled" and COMPILED is None:
        pytest.skip("the compiled twin is not built")
    mod = COMPILED if request.param == "compiled" else conn_py
    monkeypatch.setattr(peers, "C", mod)
    return mod
