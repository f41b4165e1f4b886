"""meshctl top: quantiles from histogram bucket deltas (hand-computed, Prometheus' histogram_quantile
rules), counter deltas and resets, summing sidecars, and the command against an in-process grpcio
Admin whose counters move by known amounts between polls."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from concurrent import futures

import grpc
import pytest
import yaml

from control.ctl_top import RouteCounters, histogram_quantile, render_table, report, route_counters, subtract
from control.meshctl import main
from meshproxy.admin.v1 import admin_pb2

pytestmark = pytest.mark.timeout(60)

BOUNDS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000)

# -- histogram_quantile --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "bounds", "cumulative", "count", "expected"),
    [
        # rank 5 lies in (1, 5]: 2 below, 4 inside -> 1 + 4 * (5 - 2) / 4
        (0.5, (1, 5, 10), (2, 6, 10), 10, 4.0),
        # rank 9.9 lies in (5, 10]: 6 below, 4 inside -> 5 + 5 * 3.9 / 4
        (0.99, (1, 5, 10), (2, 6, 10), 10, 9.875),
        # the first bucket's lower edge is 0: rank 2 of 4 in (0, 0.5]
        (0.5, (0.5, 1), (4, 4), 4, 0.25),
        # a rank exactly at a bucket's cumulative count is that bucket's upper bound
        (0.5, (10, 20), (5, 10), 10, 10.0),
        # empty buckets below are skipped: rank 1 lies in (2, 3]
        (0.25, (1, 2, 3), (0, 0, 4), 4, 2.25),
        # in +Inf: the highest finite bound (Prometheus' answer)
        (0.5, (1, 5), (1, 2), 10, 5.0),
        (1.0, (1, 5), (1, 10), 10, 5.0),
        # q = 0: the lower edge of the lowest non-empty bucket (Prometheus: 0/0, NaN)
        (0.0, (1, 5), (0, 3), 3, 1.0),
        (0.0, (1, 5, 10), (0, 0, 3), 3, 5.0),
        # a bucket bound at or below zero answers that bound
        (0.5, (0, 5), (4, 4), 4, 0.0),
    ],
)
def test_quantile_hand_computed(q, bounds, cumulative, count, expected):
    assert histogram_quantile(q, bounds, cumulative, count) == pytest.approx(expected)


def test_quantile_edges():
    assert math.isnan(histogram_quantile(0.5, (1, 5), (0, 0), 0))
    assert math.isnan(histogram_quantile(0.5, (), (), 3))
    assert histogram_quantile(-0.1, (1,), (1,), 1) == -math.inf
    assert histogram_quantile(1.1, (1,), (1,), 1) == math.inf


def test_quantile_on_envoy_buckets_from_deltas():
    # 100 requests in the window: 50 in (5, 10] ms, 49 in (10, 25], 1 in (250, 500].
    before = [0] * len(BOUNDS)
    after = [0, 0, 0, 50, 99, 99, 99, 99, 100] + [100] * (len(BOUNDS) - 9)
    before_r = RouteCounters(requests=7, successes=7, bounds=BOUNDS, cumulative=tuple(before), count=7)
    after_r = RouteCounters(requests=107, successes=106, bounds=BOUNDS, cumulative=tuple(after), count=107)
    d = after_r.minus(before_r)
    assert (d.requests, d.successes, d.count) == (100, 99, 100)
    # p50: rank 50 is the top of (5, 10]; p99: rank 99 is the top of (10, 25]; p995 falls in (250, 500]
    assert histogram_quantile(0.5, d.bounds, d.cumulative, d.count) == pytest.approx(10.0)
    assert histogram_quantile(0.99, d.bounds, d.cumulative, d.count) == pytest.approx(25.0)
    assert histogram_quantile(0.995, d.bounds, d.cumulative, d.count) == pytest.approx(250 + 250 * 0.5)


# -- deltas and sums -------------------------------------------------------------------------------


def test_a_counter_that_went_down_counts_from_zero():
    before = RouteCounters(requests=500, successes=500, bounds=(1, 5), cumulative=(400, 500), count=500)
    after = RouteCounters(requests=20, successes=18, bounds=(1, 5), cumulative=(10, 20), count=20)
    assert after.minus(before) == after


def test_subtract_keeps_new_routes_whole():
    a = {("outbound", "r", "default"): RouteCounters(requests=10, successes=9, bounds=(1,), cumulative=(10,), count=10)}
    b = {("outbound", "r", "default"): RouteCounters(requests=4, successes=4, bounds=(1,), cumulative=(4,), count=4)}
    a[("outbound", "s", "default")] = RouteCounters(requests=3, successes=3, bounds=(1,), cumulative=(2,), count=3)
    d = subtract(a, b)
    assert d[("outbound", "r", "default")] == RouteCounters(6, 5, (1,), (6,), 6)
    assert d[("outbound", "s", "default")] == a[("outbound", "s", "default")]


def test_report_sums_sidecars_per_route_and_sorts_busiest_first():
    key, other = ("outbound", "reviews.local:9080", "r0"), ("outbound", "ratings.local:9080", "r0")
    one = {key: RouteCounters(10, 10, (1, 5, 10), (2, 6, 10), 10), other: RouteCounters(0, 0, (1, 5, 10), (0, 0, 0), 0)}
    two = {key: RouteCounters(10, 8, (1, 5, 10), (0, 0, 10), 10)}
    rows = report([(one, 2.0), (two, 4.0)])
    assert [r["virtual_host"] for r in rows] == ["reviews.local:9080", "ratings.local:9080"]
    r = rows[0]
    assert r["requests"] == 20 and r["rps"] == pytest.approx(10 / 2 + 10 / 4)
    assert r["success_rate"] == pytest.approx(18 / 20)
    # summed buckets (2, 6, 20) of 20: rank 10 in (5, 10]: 5 + 5 * 4 / 14
    assert r["p50_ms"] == pytest.approx(5 + 5 * 4 / 14)
    assert rows[1] == {
        "listener": "outbound",
        "virtual_host": "ratings.local:9080",
        "route": "r0",
        "requests": 0,
        "rps": 0.0,
        "success_rate": None,
        "p50_ms": None,
        "p99_ms": None,
    }


def test_route_counters_from_stats_response():
    labels = {"listener": "outbound", "virtual_host": "reviews", "route": "r0"}
    stats = admin_pb2.StatsResponse(
        families=[
            admin_pb2.MetricFamily(
                name="meshproxy_route_requests_total",
                type=admin_pb2.MetricFamily.COUNTER,
                metrics=[
                    admin_pb2.Metric(labels=labels | {"success": "true"}, value=7),
                    admin_pb2.Metric(labels=labels | {"success": "false"}, value=3),
                ],
            ),
            admin_pb2.MetricFamily(
                name="meshproxy_route_request_duration_milliseconds",
                type=admin_pb2.MetricFamily.HISTOGRAM,
                metrics=[
                    admin_pb2.Metric(
                        labels=labels,
                        histogram=admin_pb2.Histogram(count=10, sum=42.0, bounds=[1, 5], cumulative_counts=[4, 9]),
                    )
                ],
            ),
            admin_pb2.MetricFamily(name="meshproxy_upstream_retries_total", metrics=[admin_pb2.Metric(value=99)]),
        ]
    )
    assert route_counters(stats) == {("outbound", "reviews", "r0"): RouteCounters(10, 7, (1, 5), (4, 9), 10)}


def test_table():
    rows = [
        {
            "listener": "outbound",
            "virtual_host": "reviews.local:9080",
            "route": "default",
            "requests": 200,
            "rps": 100.0,
            "success_rate": 0.995,
            "p50_ms": 1.25,
            "p99_ms": 25.0,
        },
        {
            "listener": "outbound",
            "virtual_host": "idle",
            "route": "r1",
            "requests": 0,
            "rps": 0.0,
            "success_rate": None,
            "p50_ms": None,
            "p99_ms": None,
        },
    ]
    assert render_table(rows).splitlines() == [
        "LISTENER  VIRTUAL HOST        ROUTE    REQUESTS  RPS    SUCCESS  P50 MS  P99 MS",
        "outbound  reviews.local:9080  default  200       100.0  99.50%   1.25    25",
        "outbound  idle                r1       0         0.0    -        -       -",
    ]


# -- the command against a scripted Admin ---------------------------------------------------------


class ScriptedAdmin:
    """GetStats answers one route whose counters grow by ``step`` requests (``failures`` of them
    failing, all in the (5, 10] ms bucket) at every call."""

    def __init__(self, step: int, failures: int) -> None:
        self.step, self.failures, self.calls = step, failures, 0
        self.lock = threading.Lock()
        self.prefixes: list[list[str]] = []

    def get_stats(self, request: admin_pb2.StatsRequest, context) -> admin_pb2.StatsResponse:
        with self.lock:
            self.prefixes.append(list(request.prefixes))
            n = self.calls
            self.calls += 1
        total, failed = n * self.step, n * self.failures
        labels = {"listener": "outbound", "virtual_host": "reviews.local:9080", "route": "default"}
        cumulative = [0, 0, 0] + [total] * (len(BOUNDS) - 3)
        return admin_pb2.StatsResponse(
            workers=1,
            families=[
                admin_pb2.MetricFamily(
                    name="meshproxy_route_requests_total",
                    type=admin_pb2.MetricFamily.COUNTER,
                    metrics=[
                        admin_pb2.Metric(labels=labels | {"success": "true"}, value=total - failed),
                        admin_pb2.Metric(labels=labels | {"success": "false"}, value=failed),
                    ],
                ),
                admin_pb2.MetricFamily(
                    name="meshproxy_route_request_duration_milliseconds",
                    type=admin_pb2.MetricFamily.HISTOGRAM,
                    metrics=[
                        admin_pb2.Metric(
                            labels=labels,
                            histogram=admin_pb2.Histogram(
                                count=total, sum=7.0 * total, bounds=BOUNDS, cumulative_counts=cumulative
                            ),
                        )
                    ],
                ),
            ],
        )


@contextlib.contextmanager
def admin_server(admin: ScriptedAdmin):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.method_handlers_generic_handler(
        "meshproxy.admin.v1.Admin",
        {
            "GetStats": grpc.unary_unary_rpc_method_handler(
                admin.get_stats,
                request_deserializer=admin_pb2.StatsRequest.FromString,
                response_serializer=admin_pb2.StatsResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_top_json_lines_per_report(capsys):
    admin = ScriptedAdmin(step=40, failures=2)
    with admin_server(admin) as address:
        code = main(["top", address, "--interval", "0.05", "--count", "3", "-o", "json"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    reports = [json.loads(line) for line in out.splitlines()]
    assert len(reports) == 3 and admin.calls == 4
    assert all(p == ["meshproxy_route_"] for p in admin.prefixes)
    for r in reports:
        assert r["sidecars"] == [address] and r["seconds"] > 0
        (row,) = r["routes"]
        assert row["requests"] == 40 and row["success_rate"] == pytest.approx(38 / 40)
        assert row["rps"] == pytest.approx(40 / r["seconds"], rel=0.01)
        # all in (5, 10]: p50 at rank 20 of 40 -> 7.5; p99 at rank 39.6 -> 5 + 5 * 39.6 / 40
        assert row["p50_ms"] == pytest.approx(7.5) and row["p99_ms"] == pytest.approx(5 + 5 * 39.6 / 40)


def test_top_two_sidecars_are_summed_in_yaml_and_table(capsys):
    a, b = ScriptedAdmin(step=10, failures=0), ScriptedAdmin(step=30, failures=10)
    with admin_server(a) as one, admin_server(b) as two:
        assert main(["top", one, two, "--interval", "0.05", "--count", "1", "-o", "yaml"]) == 0
        docs = list(yaml.safe_load_all(capsys.readouterr().out))
        assert main(["top", one, two, "--interval", "0.05", "--count", "2"]) == 0
        table = capsys.readouterr().out
    (doc,) = docs
    (row,) = doc["routes"]
    assert row["requests"] == 40 and row["success_rate"] == pytest.approx(30 / 40)
    lines = table.splitlines()
    assert lines[0].endswith("2 sidecar(s), last " + lines[0].rsplit("last ", 1)[1])
    assert lines[1].split() == [
        "LISTENER",
        "VIRTUAL",
        "HOST",
        "ROUTE",
        "REQUESTS",
        "RPS",
        "SUCCESS",
        "P50",
        "MS",
        "P99",
        "MS",
    ]
    assert lines[2].split()[:4] == ["outbound", "reviews.local:9080", "default", "40"]
    assert lines[2].split()[5] == "75.00%"
    assert lines[3] == "" and lines[5] == lines[1]  # the second report, after a blank line


def test_top_counts_a_sidecar_named_twice_once(capsys):
    admin = ScriptedAdmin(step=10, failures=0)
    with admin_server(admin) as address:
        assert main(["top", address, address, "--interval", "0.05", "--count", "1", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sidecars"] == [address] and report["routes"][0]["requests"] == 10 and admin.calls == 2


def test_top_unreachable_is_one_line_exit_1(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        code = main(["top", f"127.0.0.1:{port}", "--count", "1", "--interval", "0.01"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"meshctl: error: cannot reach the sidecar at 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["top"], "the following arguments are required: ADDR"),
        (["top", "127.0.0.1:1", "--interval", "0"], "argument --interval: '0' must be a positive number of seconds"),
        (["top", "127.0.0.1:1", "--count", "-1"], "argument --count: '-1' must not be negative"),
        (["top", "nohost", "--count", "1"], "argument ADDR: 'nohost'"),
        (["top", "127.0.0.1:1", "-o", "xml"], "argument -o/--output: invalid choice: 'xml'"),
    ],
)
def test_top_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.startswith(f"meshctl top: error: {message}") and err.count("\n") == 1
