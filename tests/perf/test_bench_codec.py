"""Smoke tests for perf/bench_codec.py: it runs, verifies itself and reports sane numbers.

These never assert on speed: only that the JSON has its keys, that every rate
is positive and that every side counted the same frames and blocks.
"""

from __future__ import annotations

import sys

import pytest

from meshproxy import codec
from tests.perf import bench

pytest.importorskip("hyperframe")
pytest.importorskip("hpack")

SIDES = ("ours", "reference", "pure")
RATE_KEYS = (
    [f"frames_per_s_{side}" for side in SIDES]
    + ["frames_per_s_ours_4k"]
    + [f"hpack_{op}_blocks_per_s_{side}" for op in ("decode", "encode") for side in SIDES]
)
SPEEDUP_KEYS = ("frame_parse_speedup", "frame_parse_speedup_4k", "hpack_decode_speedup", "hpack_encode_speedup")


def run_bench(*args: str):
    return bench.run_bench("bench_codec.py", *args)


@pytest.fixture(scope="module")
def report() -> dict:
    return bench.quick_report("bench_codec.py")


def test_report_has_speedups_and_positive_rates(report: dict) -> None:
    for key in (*SPEEDUP_KEYS, *RATE_KEYS):
        assert isinstance(report[key], float), key
        assert report[key] > 0, key
    for key in RATE_KEYS:
        assert report["medians"][key] > 0, key


def test_report_says_which_twin_was_measured(report: dict) -> None:
    expected = "pure" if codec.compiled() is None else "compiled"
    assert report["twin"] == expected
    assert report["pure_measured_separately"] is (expected == "compiled")
    assert report["python"].startswith("{}.{}.".format(*sys.version_info[:2]))


def test_every_side_counted_the_same_work(report: dict) -> None:
    assert report["frames"] > 0
    assert set(report["frames_counted"]) == {"ours", "ours_4k", "reference", "pure"}
    assert set(report["frames_counted"].values()) == {report["frames"]}
    assert report["hpack_blocks"] > 0
    for op in ("decode", "encode"):
        counted = report["hpack_blocks_counted"][op]
        assert set(counted) == set(SIDES)
        assert set(counted.values()) == {report["hpack_blocks"]}


@pytest.mark.skipif(codec.compiled() is not None, reason="the compiled twin is built")
def test_missing_compiled_twin_exits_2_with_one_line() -> None:
    proc = run_bench("--quick", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--allow-pure" in lines[0]
