"""Smoke tests for perf/bench_resilience.py: it runs, checks the twins agree and reports sane numbers.

These never assert on speed: only that the JSON has its keys and that every
figure is positive.
"""

from __future__ import annotations

import sys

import pytest

from meshproxy import resilience
from tests.perf import bench

SCRIPT = "bench_resilience.py"
BUDGET_CASES = {"budget.deposit", "budget.withdraw", "outlier.record_success", "outlier.record_error"}


@pytest.fixture(scope="module")
def report() -> dict:
    return bench.quick_report(SCRIPT)


def test_report_has_every_case_with_positive_figures(report: dict) -> None:
    cases = set(report["ns_per_call"])
    assert cases >= BUDGET_CASES
    for table in ("ns_per_call", "ns_per_call_median"):
        assert set(report[table]) == cases
        for case in cases:
            assert set(report[table][case]) == {"ours", "pure"}
            for side in ("ours", "pure"):
                assert isinstance(report[table][case][side], float), (table, case, side)
                assert report[table][case][side] > 0, (table, case, side)
    assert set(report["speedup"]) == cases
    assert all(isinstance(v, float) and v > 0 for v in report["speedup"].values())
    assert set(report["checksums"]) == cases


def test_report_says_which_twin_was_measured(report: dict) -> None:
    assert report["twin"] == ("pure" if resilience.compiled() is None else "compiled")
    assert report["python"].startswith("{}.{}.".format(*sys.version_info[:2]))
    assert report["ops"] > 0
    assert report["repeats"] > 0


def test_table_names_every_case() -> None:
    proc = bench.run_bench(SCRIPT, "--quick", "--allow-pure")
    assert proc.returncode == 0, proc.stderr
    for case in BUDGET_CASES:
        assert case in proc.stdout


def test_bad_counts_are_refused() -> None:
    proc = bench.run_bench(SCRIPT, "--quick", "--ops", "0")
    assert proc.returncode == 2
    assert "--ops and --repeats must be positive" in proc.stderr


@pytest.mark.skipif(resilience.compiled() is not None, reason="the compiled twins are built")
def test_missing_compiled_twin_exits_2_with_one_line() -> None:
    proc = bench.run_bench(SCRIPT, "--quick", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--allow-pure" in lines[0]
