"""Runs every resilience test on both twins: ``twin.budget`` / ``twin.outlier`` are the pure-Python
modules for ``[py]`` and the compiled ones for ``[c]``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from meshproxy import resilience

# With MESHPROXY_NO_EXTENSIONS set (the second pass of `make test`) only the
# pure-Python twins are under test, as on a machine without the extensions.
TWINS = ["py"] if os.environ.get("MESHPROXY_NO_EXTENSIONS") else ["py", "c"]


@pytest.fixture(params=TWINS, scope="session")
def twin(request: pytest.FixtureRequest) -> SimpleNamespace:
    if request.param == "py":
        budget, outlier = resilience.pure()
    else:
        mods = resilience.compiled()
        if mods is None:
            pytest.fail("compiled resilience twins not built: run `pip install -e .` (or `make test`)")
        budget, outlier = mods
    return SimpleNamespace(name=request.param, budget=budget, outlier=outlier)
