"""Smoke tests for perf/bench_retry.py: a --quick run measures both sidecar configs, with sane fields, in all formats.

These never assert on speed or on the on/off ratio: only that both configs were
measured at every shape without errors, that the counts add up and every CPU
figure is positive, that the ratio's spread is consistent with its runs, that
the two configs the sidecar is given differ only by the retry settings, and
that a sidecar which does not start is reported as failed (exit status 3).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from meshproxy import config
from tests.perf import bench

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
MISSING = [tool for tool in ("h2load", "nghttpd", "taskset") if not shutil.which(tool, path=SBIN)]
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (nghttp2-client, -server)")
needs_cpus = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")

CONFIGS = ("off", "on")
SHAPES = ("c32m16", "c1m1", "c32m16-paced")
REPEAT = 2
RATE = 8000


def load_script() -> ModuleType:
    return bench.load_script("bench_retry")


def run(tmp: Path, *args: str):
    """Run a quick bench writing its reports under ``tmp``; return (process, report, markdown)."""
    paths = {ext: tmp / f"bench_retry.{ext}" for ext in ("json", "md")}
    proc = bench.run_bench(
        "bench_retry.py", "--quick", "--silent", *(a for ext, p in paths.items() for a in (f"--{ext}", str(p))), *args
    )
    report = json.loads(paths["json"].read_text()) if paths["json"].exists() else None
    md = paths["md"].read_text() if paths["md"].exists() else ""
    return proc, report, md


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory):
    return run(tmp_path_factory.mktemp("bench_retry"), "--repeat", str(REPEAT), "--rate", str(RATE))


def test_the_configs_load_and_differ_only_by_the_retry_settings() -> None:
    script = load_script()
    dicts = {name: script.sidecar_config(name, 15001, 8080) for name in CONFIGS}
    loaded = {}
    for name in CONFIGS:
        cfg = config.from_yaml(script.config_yaml(name, 15001, 8080))
        config.validate(cfg)
        loaded[name] = config.to_dict(cfg)
        assert loaded[name] == config.to_dict(config.from_dict(dicts[name]))
    on, off = loaded["on"], loaded["off"]
    assert on["listeners"][0]["virtual_hosts"][0]["routes"][0].pop("retry_policy")["num_retries"] == 2
    assert on["clusters"][0].pop("outlier_detection") == {"consecutive_5xx": 5}
    assert on["clusters"][0].pop("circuit_breakers")["max_retries"] == 1000
    assert "retry_policy" not in off["listeners"][0]["virtual_hosts"][0]["routes"][0]
    on.pop("version"), off.pop("version")
    assert on == off


@needs_tools
@needs_cpus
def test_quick_run_succeeds_and_writes_every_format(quick) -> None:
    proc, report, md = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report is not None and report["bench"] == "bench_retry"
    assert "| shape | off CPU µs/req | on CPU µs/req | on / off |" in md
    assert md in proc.stdout  # the table is printed too
    for shape in SHAPES:
        for name in CONFIGS:
            assert f"| {shape} | {name} |" in md


@needs_tools
@needs_cpus
def test_both_configs_measured_without_errors(quick) -> None:
    report = quick[1]
    assert report["repeat"] == REPEAT and report["workload"] == "grpc"
    assert list(report["shapes"]) == list(SHAPES)
    assert [report["shapes"][s]["rate_rps"] for s in SHAPES] == [None, None, RATE]
    rows = {(r["shape"], r["config"]): r for r in report["rows"]}
    assert set(rows) == {(s, c) for s in SHAPES for c in CONFIGS}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["errors"] == 0 and r["warmup_errors"] == 0, key
        assert r["requests"] > 0 and r["succeeded"] == r["requests"], key
        assert [run["repetition"] for run in r["runs"]] == list(range(1, REPEAT + 1)), key
        assert all(run["latency_samples"] == run["requests"] for run in r["runs"]), key
        assert r["rps"] > 0, key
        assert 0 < r["p50_us"] <= r["p99_us"], key
        assert r["cpu_us_per_req"] > 0, key
        assert r["cpu_us_per_req_procstat"] >= 0, key
        assert r["proxy_core_util"] > 0, key
        assert all(run["cpu_us_per_req"] > 0 for run in r["runs"]), key
    assert all(kib > 1024 for kib in report["rss_idle_kib"].values())


@needs_tools
@needs_cpus
def test_the_ratio_and_its_spread_are_reported_per_shape(quick) -> None:
    report = quick[1]
    assert report["target"] == 1.05
    comparison = {c["shape"]: c for c in report["comparison"]}
    assert set(comparison) == set(SHAPES)
    rows = {(r["shape"], r["config"]): r for r in report["rows"]}
    for shape, c in comparison.items():
        assert c["off_cpu_us_per_req"] == rows[(shape, "off")]["cpu_us_per_req"] > 0
        assert c["on_cpu_us_per_req"] == rows[(shape, "on")]["cpu_us_per_req"] > 0
        assert len(c["ratios"]) == REPEAT
        assert 0 < c["ratio_min"] == min(c["ratios"]) <= c["ratio"] <= max(c["ratios"]) == c["ratio_max"]
        assert c["ratio_of_medians"] > 0
        assert c["within_target"] is (c["ratio"] <= report["target"])


@needs_tools
@needs_cpus
def test_a_sidecar_that_does_not_start_fails_its_rows_and_json_goes_to_stdout(tmp_path: Path) -> None:
    # An unknown option makes `meshproxy run` exit at once, whatever state meshproxy is in.
    md = tmp_path / "bench_retry.md"
    proc = bench.run_bench(
        "bench_retry.py", "--quick", "--silent", "--shapes", "c1m1", "--json", "--md", str(md),
        "--meshproxy-args=--no-such-option-for-bench",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [(r["config"], r["status"]) for r in report["rows"]] == [("off", "failed"), ("on", "failed")]
    assert all(r["error"].startswith("start:") for r in report["rows"])
    assert report["comparison"][0]["ratio"] is None
    assert "FAILED" in md.read_text()


def test_bad_arguments_exit_2() -> None:
    proc = bench.run_bench("bench_retry.py", "--shapes", "c2m2")
    assert proc.returncode == 2
    assert "--shapes" in proc.stderr
