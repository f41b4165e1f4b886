"""Runs every codec test on both twins: ``twin.frames`` / ``twin.hpack`` are
the pure-Python modules for ``[py]`` and the compiled ones for ``[c]``."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshproxy import codec

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"


@pytest.fixture(params=["py", "c"], scope="session")
def twin(request: pytest.FixtureRequest) -> SimpleNamespace:
    if request.param == "py":
        frames, hpack = codec.pure()
    else:
        if os.environ.get("MESHPROXY_NO_EXTENSIONS"):
            pytest.skip("MESHPROXY_NO_EXTENSIONS is set: compiled twin not under test")
        mods = codec.compiled()
        if mods is None:
            pytest.fail("compiled codec not built: run `pip install -e .` (or `make test`)")
        frames, hpack = mods
    return SimpleNamespace(name=request.param, frames=frames, hpack=hpack)
