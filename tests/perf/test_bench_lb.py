"""Smoke tests for perf/bench_lb.py: it runs, checks the twins agree and reports sane numbers.

These never assert on speed: only that the JSON has its keys and that every
figure is positive.
"""

from __future__ import annotations

import sys

import pytest

from meshproxy import lb
from tests.perf import bench

KINDS = ("RoundRobin", "Random", "LeastRequest", "PeakEwma", "RingHash", "WeightedSplit")


def run_bench(*args: str):
    return bench.run_bench("bench_lb.py", *args)


@pytest.fixture(scope="module")
def report() -> dict:
    return bench.quick_report("bench_lb.py")


def test_report_has_every_balancer_with_positive_figures(report: dict) -> None:
    for table in ("ns_per_pick", "ns_per_pick_median"):
        assert set(report[table]) == set(KINDS)
        for kind in KINDS:
            assert set(report[table][kind]) == {"ours", "pure"}
            for side in ("ours", "pure"):
                assert isinstance(report[table][kind][side], float), (table, kind, side)
                assert report[table][kind][side] > 0, (table, kind, side)
    assert set(report["speedup"]) == set(KINDS)
    assert all(isinstance(v, float) and v > 0 for v in report["speedup"].values())
    assert set(report["checksums"]) == set(KINDS)


def test_report_says_which_twin_was_measured(report: dict) -> None:
    assert report["twin"] == ("pure" if lb.compiled() is None else "compiled")
    assert report["python"].startswith("{}.{}.".format(*sys.version_info[:2]))
    assert report["endpoints"] > 0
    assert report["picks"] > 0
    assert report["repeats"] > 0


def test_table_names_every_balancer() -> None:
    proc = run_bench("--quick", "--allow-pure")
    assert proc.returncode == 0, proc.stderr
    for kind in KINDS:
        assert kind in proc.stdout


@pytest.mark.skipif(lb.compiled() is not None, reason="the compiled twin is built")
def test_missing_compiled_twin_exits_2_with_one_line() -> None:
    proc = run_bench("--quick", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--allow-pure" in lines[0]
