"""Smoke test for perf/bench_telemetry.py: a --quick run measures every telemetry config at every
shape without errors, proves each config did its job (checks), and prints its table.

It never asserts on speed or on a ratio: only that the rows were measured, that the
metrics/log/otlp configs really recorded, logged and exported, and that the ratios against
``off`` are reported with a spread consistent with their runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.perf import bench

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
MISSING = [tool for tool in ("h2load", "nghttpd", "taskset") if not shutil.which(tool, path=SBIN)]
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (nghttp2-client, -server)")
needs_cpus = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")

CONFIGS = ("off", "metrics", "log", "otlp")


@needs_tools
@needs_cpus
def test_quick_run_measures_every_config_and_checks_it(tmp_path: Path) -> None:
    paths = {ext: tmp_path / f"bench_telemetry.{ext}" for ext in ("json", "md")}
    proc = bench.run_bench(
        "bench_telemetry.py",
        "--quick",
        "--silent",
        "--repeat",
        "1",
        *(a for ext, p in paths.items() for a in (f"--{ext}", str(p))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(paths["json"].read_text())
    md = paths["md"].read_text()
    assert report["bench"] == "bench_telemetry"
    assert md in proc.stdout  # the table is printed too
    rows = {(r["shape"], r["config"]): r for r in report["rows"]}
    assert {c for _, c in rows} == set(CONFIGS)
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["errors"] == 0, key
        assert r["requests"] > 0 and r["cpu_us_per_req"] > 0, key
        assert f"| {key[0]} | {key[1]} |" in md
    for name in CONFIGS:
        assert f"`{name}`" in md and "check passed" in md
    assert "check failed" not in md
