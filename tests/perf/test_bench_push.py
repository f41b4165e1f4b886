"""Smoke test for perf/bench_push.py: a small run completes, every sidecar ACKs the edit, the report is whole.

Never asserts on speed: only that the figures exist, are positive and consistent.
"""

from __future__ import annotations

import json

import pytest

from tests.perf import bench

pytestmark = pytest.mark.timeout(240)


def test_a_small_push_run_reports_every_sidecar_acking_the_new_version() -> None:
    proc = bench.run_bench(
        "bench_push.py",
        "--sizes",
        "7",
        "--procs",
        "2",
        "--repeat",
        "1",
        "--services",
        "3",
        "--settle",
        "2",
        "--json",
        "-",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    baseline, row = report["rows"]
    assert baseline["sidecars"] == 1 and row["sidecars"] == 7
    for r in (baseline, row):
        assert r["acked"] == r["sidecars"] and r["missing"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["rss_connected_mib"] > 0
    assert row["p99_vs_baseline"] == pytest.approx(row["p99_ms"] / baseline["p99_ms"])
    assert "p99" in proc.stdout and "the 1 s target" in proc.stdout


def test_bad_sizes_are_a_one_line_error() -> None:
    proc = bench.run_bench("bench_push.py", "--sizes", "ten")
    assert proc.returncode == 2
    assert "--sizes" in proc.stderr and "Traceback" not in proc.stderr
