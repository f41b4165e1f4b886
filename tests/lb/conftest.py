"""Runs every balancer test on both twins: ``twin.balancer`` is the
pure-Python module for ``[py]`` and the compiled one for ``[c]``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from meshproxy import lb

# With MESHPROXY_NO_EXTENSIONS set (the second pass of `make test`) only the
# pure-Python twin is under test, as on a machine without the extensions.
TWINS = ["py"] if os.environ.get("MESHPROXY_NO_EXTENSIONS") else ["py", "c"]


@pytest.fixture(params=TWINS, scope="session")
def twin(request: pytest.FixtureRequest) -> SimpleNamespace:
    if request.param == "py":
        balancer = lb.pure()
    else:
        balancer = lb.compiled()
        if balancer is None:
            pytest.fail("compiled balancer not built: run `pip install -e .` (or `make test`)")
    return SimpleNamespace(name=request.param, balancer=balancer)
