"""The twins and their selector: same public names, the right twin chosen, a sans-IO core, vectors present."""

from __future__ import annotations

import os

import pytest

from meshproxy import codec
from tests.codec.conftest import VECTORS
from tests.twins import IO_MODULES, probe

pytestmark = pytest.mark.codec


def test_both_twins_export_the_same_names(twin):
    frames_py, hpack_py = codec.pure()
    assert sorted(twin.frames.__all__) == sorted(frames_py.__all__)
    assert sorted(twin.hpack.__all__) == sorted(hpack_py.__all__)
    for mod in (twin.frames, twin.hpack):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__} lacks {name}"


def test_both_twins_share_one_never_indexed_type(twin):
    # A header decoded by one twin must stay never-indexed when re-encoded by the other.
    assert twin.hpack.NeverIndexed is codec.pure()[1].NeverIndexed


def test_selector_honours_no_extensions():
    got = probe("meshproxy.codec", ("frames", "hpack"), no_extensions=True)
    assert (got["frames"], got["hpack"], got["ext"]) == (
        "meshproxy.codec.frames_py",
        "meshproxy.codec.hpack_py",
        False,
    )


def test_selector_prefers_compiled_twins():
    if os.environ.get("MESHPROXY_NO_EXTENSIONS"):
        pytest.skip("MESHPROXY_NO_EXTENSIONS is set: compiled twin not under test")
    got = probe("meshproxy.codec", ("frames", "hpack"), no_extensions=False)
    assert (got["frames"], got["hpack"], got["ext"]) == ("meshproxy._fast.frames", "meshproxy._fast.hpack", True)


@pytest.mark.parametrize("no_ext", ["", "1"])
def test_codec_is_sans_io(no_ext):
    loaded = set(probe("meshproxy.codec", ("frames", "hpack"), no_extensions=bool(no_ext))["modules"])
    assert not loaded & IO_MODULES


def test_vectors_are_present():
    # The vector suites parametrize over these files: without them they would
    # silently collect nothing.
    frames = list((VECTORS / "http2-frame-test-case").glob("*/*.json"))
    stories = list((VECTORS / "hpack-test-case").glob("*/story_*.json"))
    assert len(frames) >= 30, f"frame vectors missing under {VECTORS}"
    assert len(stories) >= 200, f"HPACK stories missing under {VECTORS}"


def test_frames_are_only_made_by_the_parser(twin):
    with pytest.raises(TypeError):
        twin.frames.DataFrame(0, 1, 0)


@pytest.mark.parametrize("module", ["frames", "hpack"])
def test_stubs_declare_every_public_name(module):
    # The .pyi beside each compiled module is what type checkers and editors
    # see: it must name everything the module exports.
    import ast
    from pathlib import Path

    import meshproxy._fast

    stub = Path(meshproxy._fast.__file__).with_name(f"{module}.pyi")
    declared = set()
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            declared.update(alias.asname or alias.name for alias in node.names)
    exported = set(codec.pure()[0 if module == "frames" else 1].__all__)
    assert exported <= declared, f"{module}.pyi lacks {sorted(exported - declared)}"
