"""Tests for perf/bench_retry_instructions.py: a small run counts both sidecar configs under callgrind, and the
figures it reports follow from its runs.

These never assert on the on/off ratio (it is what the bench measures), only
that each count is real (a positive total from callgrind's dump, divided by
the requests h2load completed), that the ratios are computed from adjacent
runs of the same repetition, and that bad input exits 2 with one line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from tests.perf import bench

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
TOOLS = ("h2load", "nghttpd", "taskset", "valgrind", "callgrind_control")
MISSING = [tool for tool in TOOLS if not shutil.which(tool, path=SBIN)]
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")
needs_cpus = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")


def load_script() -> ModuleType:
    return bench.load_script("bench_retry_instructions")


def test_the_summary_line_of_a_dump_is_read(tmp_path: Path) -> None:
    mod = load_script()
    dump = tmp_path / "callgrind.out.1"
    dump.write_bytes(b"# callgrind format\nversion: 1\nevents: Ir\nfn=(1) main\n0 5\nsummary: 469170411\ntotals: 4\n")
    assert mod.read_summary(dump) == 469170411
    dump.write_bytes(b"events: Ir\n")
    with pytest.raises(mod.Failed, match="no summary"):
        mod.read_summary(dump)


def test_ratios_pair_each_on_run_with_the_off_run_of_its_repetition() -> None:
    mod = load_script()

    def run(config, rep, ipr, shape="c1m1", status="ok"):
        return {"config": config, "shape": shape, "repetition": rep, "status": status, "instructions_per_request": ipr}

    runs = [
        run("off", 1, 100.0), run("on", 1, 102.0),
        run("on", 2, 110.0), run("off", 2, 100.0),
        run("off", 3, 90.0), run("on", 3, 0.0, status="failed"),
        run("off", 1, 1.0, shape="c32m16"),
    ]  # fmt: skip
    c = mod.compare("c1m1", runs)
    assert c["ratios"] == pytest.approx([1.02, 1.10])
    assert c["ratio"] == pytest.approx(1.06) and c["ratio_min"] == pytest.approx(1.02)
    assert c["ratio_max"] == pytest.approx(1.10)
    assert c["off_instructions_per_request"] == 100.0 and c["on_instructions_per_request"] == 106.0
    assert c["within_target"] is False
    assert mod.compare("c32m16", runs)["ratio"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "c2m2"], "--shapes"),
        (["--repeat", "0"], "--repeat"),
        (["--requests", "0"], "--requests"),
        (["--nice", "40"], "--nice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message) -> None:
    proc = bench.run_bench("bench_retry_instructions.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@needs_tools
@needs_cpus
def test_a_small_run_counts_both_configs(tmp_path: Path) -> None:
    md = tmp_path / "out.md"
    proc = bench.run_bench(
        "bench_retry_instructions.py", "--quick", "--silent", "--shapes", "c1m1", "--latency-requests", "60",
        "--warmup-requests", "20", "--json", "--md", str(md),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["bench"] == "bench_retry_instructions" and report["target"] == 1.05
    assert [(r["config"], r["shape"], r["status"]) for r in report["runs"]] == [
        ("off", "c1m1", "ok"),
        ("on", "c1m1", "ok"),
    ]
    for r in report["runs"]:
        assert r["requests"] == 60
        # A sidecar runs tens of thousands of instructions per proxied request: a count of nothing, or of a
        # process that did not serve the requests, would not get near it.
        assert r["instructions"] > 60 * 10_000
        assert r["instructions_per_request"] == pytest.approx(r["instructions"] / r["requests"])
    (c,) = report["comparison"]
    off, on = report["runs"]
    assert c["ratio"] == pytest.approx(on["instructions_per_request"] / off["instructions_per_request"])
    assert "| c1m1 | off | 1 | 60 |" in md.read_text()
