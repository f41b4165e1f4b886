"""Runs every codec test on both twins: ``twin.frames`` / ``twin.hpack`` are
the pure-Python modules for ``[py]`` and the compiled ones for ``[c]``."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshproxy import codec

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"


# With MESHPROXY_NO_EXTENSIONS set (the second pass of `make test`) only the
# pure-Python twin is under test, as on a machine without the extensions.
TWINS = ["py"] if os.environ.get("MESHPROXY_NO_EXTENSIONS") else ["py", "c"]


@pytest.fixture(params=TWINS, scope="session")
def twin(request: pytest.FixtureRequest) -> SimpleNamespace:
    if request.param == "py":
        frames, hpack = codec.pure()
    else:
        mods = codec.compiled()
        if mods is None:
            pytest.fail("compiled codec not built: run `pip install -e .` (or `make test`)")
        frames, hpack = mods
    return SimpleNamespace(name=request.param, frames=frames, hpack=hpack)
