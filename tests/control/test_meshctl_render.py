"""meshctl's rendering and its proxy-config / stats commands against an in-process grpcio Admin that
answers fixed protos: tables cell by cell, JSON/YAML data, 64-bit numbers, errors."""

from __future__ import annotations

import contextlib
import json
from concurrent import futures

import grpc
import pytest
import yaml
from google.protobuf import json_format

from control.ctl_output import age, number, one_line, table
from control.meshctl import main
from control.proxyctl import plain, render_config, render_stats
from meshproxy.admin.v1 import admin_pb2
from meshproxy.config.v1 import config_pb2

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0  # the "now" tables measure ages from

CONFIG = {
    "version": "abc123",
    "listeners": [
        {
            "name": "outbound",
            "address": "127.0.0.1:15001",
            "virtual_hosts": [
                {
                    "name": "reviews.local:9080",
                    "domains": ["reviews.local:9080", "reviews.local"],
                    "routes": [
                        {
                            "name": "split",
                            "match": {"prefix": "/", "grpc": {"service": "demo.Reviews"}},
                            "route": {
                                "clusters": [
                                    {"cluster": "outbound|9080||reviews.local", "subset": "v1", "weight": 80},
                                    {"cluster": "outbound|9080||reviews.local", "subset": "v2", "weight": 20},
                                ]
                            },
                        },
                        {
                            "name": "teapot",
                            "match": {"path": "/tea", "headers": [{"name": "x-brew", "exact": "1", "invert": True}]},
                            "direct_response": {"status": 418},
                        },
                    ],
                },
                {
                    "name": "ratings.local:9080",
                    "domains": ["ratings.local:9080"],
                    "routes": [{"name": "default", "route": {"clusters": [{"cluster": "ratings", "weight": 1}]}}],
                },
            ],
        }
    ],
    "clusters": [
        {
            "name": "outbound|9080||reviews.local",
            "endpoints": [
                {"address": "10.0.0.1:9080", "weight": 1, "labels": {"version": "v1"}},
                {"address": "10.0.0.2:9080", "weight": 1, "labels": {"version": "v2"}},
            ],
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        },
        {"name": "ratings", "lb_policy": "ROUND_ROBIN", "endpoints": [{"address": "10.0.0.3:9080", "weight": 1}]},
    ],
}


def ts(seconds: float):
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def config_dump() -> admin_pb2.ConfigDump:
    cfg = json_format.ParseDict(CONFIG, config_pb2.SidecarConfig())
    dump = admin_pb2.ConfigDump(
        version="abc123",
        node=config_pb2.Node(id="client-1", namespace="default", workload="client"),
        config=cfg,
        accepted_total=2**40,  # a uint64 beyond what proto JSON leaves as a number
        rejected_total=1,
        last_updated=ts(NOW - 75),
        source="control-plane:127.0.0.1:15010",
        last_rejected=admin_pb2.RejectedConfig(version="bad1", reason="listeners[0]: cannot bind", time=ts(NOW - 300)),
    )
    for kind, name in (("listener", "outbound"), ("route", "outbound")):
        dump.resources.add(type=kind, name=name, version="abc123", last_updated=ts(NOW - 75))
    dump.resources.add(
        type="cluster", name="outbound|9080||reviews.local", version="old999", last_updated=ts(NOW - 7200)
    )
    dump.resources.add(type="cluster", name="ratings", version="abc123", last_updated=ts(NOW - 75))
    return dump


def clusters_response() -> admin_pb2.ClustersResponse:
    Health = admin_pb2.EndpointStatus.Health
    return admin_pb2.ClustersResponse(
        clusters=[
            admin_pb2.ClusterStatus(
                name="outbound|9080||reviews.local",
                lb_policy="PEAK_EWMA",
                active_requests=3,
                retries_total=2**35,
                endpoints=[
                    admin_pb2.EndpointStatus(
                        address="10.0.0.1:9080",
                        weight=1,
                        subsets=["", "v1"],
                        health=Health.HEALTHY,
                        active_requests=2,
                        ewma_ms=1.23456,
                    ),
                    admin_pb2.EndpointStatus(
                        address="10.0.0.2:9080",
                        weight=1,
                        subsets=["", "v2"],
                        health=Health.EJECTED,
                        ejected_until=ts(NOW + 30),
                        ejections=4,
                        active_requests=1,
                    ),
                ],
            )
        ]
    )


class FixedAdmin:
    def __init__(self) -> None:
        self.requests: list = []

    def _unary(self, method: str, req_type, answer):
        def handle(request, context):
            self.requests.append((method, request))
            return answer(request)

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=req_type.FromString, response_serializer=lambda m: m.SerializeToString()
        )

    def handlers(self) -> dict:
        def clusters(req):
            resp = clusters_response()
            if req.name:
                kept = [c for c in resp.clusters if c.name == req.name]
                del resp.clusters[:]
                resp.clusters.extend(kept)
            return resp

        def stats(req):
            return admin_pb2.StatsResponse(
                workers=2,
                families=[
                    admin_pb2.MetricFamily(
                        name="meshproxy_requests_total",
                        help="Requests.",
                        type=admin_pb2.MetricFamily.COUNTER,
                        metrics=[
                            admin_pb2.Metric(labels={"response_code": "200", "reporter": "source"}, value=12),
                            admin_pb2.Metric(labels={"response_code": "503", "reporter": "source"}, value=3),
                        ],
                    ),
                    admin_pb2.MetricFamily(
                        name="meshproxy_request_duration_milliseconds",
                        help="Duration.",
                        type=admin_pb2.MetricFamily.HISTOGRAM,
                        metrics=[
                            admin_pb2.Metric(
                                labels={"reporter": "source"},
                                histogram=admin_pb2.Histogram(
                                    count=15, sum=20.5, bounds=[0.5, 1, 5], cumulative_counts=[2, 10, 14]
                                ),
                            )
                        ],
                    ),
                    admin_pb2.MetricFamily(
                        name="meshproxy_config_last_update_timestamp_seconds",
                        type=admin_pb2.MetricFamily.GAUGE,
                        metrics=[admin_pb2.Metric(value=1764136507.25)],
                    ),
                ],
            )

        return {
            "GetConfigDump": self._unary("GetConfigDump", admin_pb2.ConfigDumpRequest, lambda req: config_dump()),
            "GetClusters": self._unary("GetClusters", admin_pb2.ClustersRequest, clusters),
            "GetStats": self._unary("GetStats", admin_pb2.StatsRequest, stats),
        }


@contextlib.contextmanager
def serving(admin: FixedAdmin):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("meshproxy.admin.v1.Admin", admin.handlers()),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def admin():
    a = FixedAdmin()
    with serving(a) as address:
        a.address = address
        yield a


def meshctl(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys, *argv: str):
    code, out, err = meshctl(capsys, *argv, "-o", "json")
    assert (code, err) == (0, "")
    return json.loads(out)


# -- the building blocks ---------------------------------------------------------------------------------


def test_table_pads_columns_and_dashes_empty_cells():
    assert table(("A", "LONGER"), [("x", None), ("wide cell", ""), (1, "two\nlines")]) == (
        "A          LONGER\nx          -\nwide cell  -\n1          two lines\n"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (-3, "0s"),
        (0.9, "0s"),
        (59, "59s"),
        (60, "1m0s"),
        (3599, "59m59s"),
        (3600, "1h0m"),
        (86399, "23h59m"),
        (90061, "1d1h"),
    ],
)
def test_age(seconds, text):
    assert age(seconds) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, ""), (float("nan"), ""), (3, "3"), (3.0, "3"), (2**40, "1099511627776"), (1.23456, "1.23"), (0.5, "0.5")],
)
def test_number(value, text):
    assert number(value) == text


def test_one_line():
    assert one_line("a\n  b\tc ") == "a b c"


def test_plain_keeps_64_bit_integers_numbers_everywhere():
    d = plain(clusters_response())
    c = d["clusters"][0]
    assert c["retries_total"] == 2**35 and c["active_requests"] == 3 and c["pending_requests"] == 0
    assert [e["active_requests"] for e in c["endpoints"]] == [2, 1]
    assert c["endpoints"][1]["health"] == "EJECTED" and c["endpoints"][1]["ejected_until"].endswith("Z")
    # a config leaves defaults out, as its YAML form does
    assert (
        "lb_policy"
        not in plain(json_format.ParseDict(CONFIG, config_pb2.SidecarConfig()), defaults=False)["clusters"][0]
    )


# -- proxy-config ---------------------------------------------------------------------------------------------


def test_summary(admin, capsys):
    data = as_json(capsys, "proxy-config", admin.address)
    assert data["version"] == "abc123" and data["source"] == "control-plane:127.0.0.1:15010"
    assert data["accepted_total"] == 2**40 and data["rejected_total"] == 1
    assert data["last_rejected"] == {
        "version": "bad1",
        "reason": "listeners[0]: cannot bind",
        "time": ts(NOW - 300).ToJsonString(),
    }
    assert data["node"] == {
        "id": "client-1",
        "namespace": "default",
        "workload": "client",
        "labels": {},
        "service_account": "",
    }
    assert data["config"] == CONFIG
    assert data["resources"][2] == {
        "type": "cluster",
        "name": "outbound|9080||reviews.local",
        "version": "old999",
        "last_updated": ts(NOW - 7200).ToJsonString(),
    }
    assert render_config(data, None, now=NOW).splitlines() == [
        "VERSION        abc123",
        "SOURCE         control-plane:127.0.0.1:15010",
        "NODE           client-1 (default/client)",
        f"UPDATED        {ts(NOW - 75).ToJsonString()} (1m15s ago)",
        "ACCEPTED       1099511627776",
        "REJECTED       1",
        f"LAST REJECTED  bad1 at {ts(NOW - 300).ToJsonString()}: listeners[0]: cannot bind",
        "",
        "TYPE      NAME                          VERSION  UPDATED",
        "listener  outbound                      abc123   1m15s",
        "route     outbound                      abc123   1m15s",
        "cluster   outbound|9080||reviews.local  old999   2h0m",
        "cluster   ratings                       abc123   1m15s",
    ]
    method, request = admin.requests[-1]
    assert method == "GetConfigDump" and list(request.types) == []


def test_listeners(admin, capsys):
    data = as_json(capsys, "proxy-config", admin.address, "listeners")
    assert data == {
        "version": "abc123",
        "listeners": [
            {
                "name": "outbound",
                "address": "127.0.0.1:15001",
                "virtual_hosts": ["reviews.local:9080", "ratings.local:9080"],
                "routes": 3,
                "resource_version": "abc123",
            }
        ],
    }
    assert render_config(data, "listeners").splitlines() == [
        "NAME      ADDRESS          VIRTUAL HOSTS                          ROUTES  TRANSPARENT  VERSION",
        "outbound  127.0.0.1:15001  reviews.local:9080,ratings.local:9080  3       no           abc123",
    ]


def test_routes(admin, capsys):
    data = as_json(capsys, "proxy-config", admin.address, "routes")
    assert data["routes"] == [
        {"listener": "outbound", "resource_version": "abc123", "virtual_hosts": CONFIG["listeners"][0]["virtual_hosts"]}
    ]
    assert render_config(data, "routes").splitlines() == [
        "LISTENER  VIRTUAL HOST        DOMAINS                           ROUTE    MATCH                         ACTION",
        "outbound  reviews.local:9080  reviews.local:9080,reviews.local  split    prefix=/ grpc=demo.Reviews/*  "
        "outbound|9080||reviews.local|v1 80%, outbound|9080||reviews.local|v2 20%",
        "outbound  reviews.local:9080  reviews.local:9080,reviews.local  teapot   path=/tea !x-brew exact=1     "
        "direct 418",
        "outbound  ratings.local:9080  ratings.local:9080                default  *                             "
        "ratings",
    ]


def test_clusters(admin, capsys):
    data = as_json(capsys, "proxy-config", admin.address, "clusters")
    assert [c["resource_version"] for c in data["clusters"]] == ["old999", "abc123"]
    assert data["clusters"][1] == CONFIG["clusters"][1] | {"resource_version": "abc123"}
    assert render_config(data, "clusters").splitlines() == [
        "NAME                          LB           ENDPOINTS  SUBSETS  VERSION",
        "outbound|9080||reviews.local  PEAK_EWMA    2          v1,v2    old999",
        "ratings                       ROUND_ROBIN  1          -        abc123",
    ]
    only = as_json(capsys, "proxy-config", admin.address, "clusters", "--cluster", "ratings")
    assert [c["name"] for c in only["clusters"]] == ["ratings"]


def test_endpoints(admin, capsys):
    data = as_json(capsys, "proxy-config", admin.address, "endpoints", "--cluster", "outbound|9080||reviews.local")
    assert admin.requests[-1] == ("GetClusters", admin_pb2.ClustersRequest(name="outbound|9080||reviews.local"))
    (c,) = data["clusters"]
    assert c["retries_total"] == 2**35 and [e["health"] for e in c["endpoints"]] == ["HEALTHY", "EJECTED"]
    code, out, _ = meshctl(capsys, "proxy-config", admin.address, "endpoints")
    assert code == 0 and out.splitlines() == [
        "CLUSTER                       ENDPOINT       WEIGHT  HEALTH   SUBSETS  ACTIVE  EWMA MS  EJECTIONS  WORKER",
        'outbound|9080||reviews.local  10.0.0.1:9080  1       HEALTHY  "",v1    2       1.23     0          0',
        'outbound|9080||reviews.local  10.0.0.2:9080  1       EJECTED  "",v2    1       0        4          0',
    ]
    code, out, _ = meshctl(capsys, "proxy-config", admin.address, "endpoints", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == as_json(capsys, "proxy-config", admin.address, "endpoints")


# -- stats ----------------------------------------------------------------------------------------------------------


def test_stats(admin, capsys):
    data = as_json(capsys, "stats", admin.address, "--prefix", "meshproxy_req", "--prefix", "meshproxy_config")
    assert admin.requests[-1] == (
        "GetStats",
        admin_pb2.StatsRequest(prefixes=["meshproxy_req", "meshproxy_config"]),
    )
    assert data["workers"] == 2
    assert data["families"][0] == {
        "name": "meshproxy_requests_total",
        "help": "Requests.",
        "type": "COUNTER",
        "metrics": [
            {"labels": {"reporter": "source", "response_code": "200"}, "value": 12},
            {"labels": {"reporter": "source", "response_code": "503"}, "value": 3},
        ],
    }
    assert data["families"][1]["metrics"] == [
        {
            "labels": {"reporter": "source"},
            "count": 15,
            "sum": 20.5,
            "buckets": [{"le": 0.5, "count": 2}, {"le": 1.0, "count": 10}, {"le": 5.0, "count": 14}],
        }
    ]
    code, out, _ = meshctl(capsys, "stats", admin.address)
    expected = [
        ('meshproxy_requests_total{reporter="source",response_code="200"}', "12"),
        ('meshproxy_requests_total{reporter="source",response_code="503"}', "3"),
        ('meshproxy_request_duration_milliseconds_bucket{reporter="source",le="0.5"}', "2"),
        ('meshproxy_request_duration_milliseconds_bucket{reporter="source",le="1"}', "10"),
        ('meshproxy_request_duration_milliseconds_bucket{reporter="source",le="5"}', "14"),
        ('meshproxy_request_duration_milliseconds_bucket{reporter="source",le="+Inf"}', "15"),
        ('meshproxy_request_duration_milliseconds_sum{reporter="source"}', "20.5"),
        ('meshproxy_request_duration_milliseconds_count{reporter="source"}', "15"),
        ("meshproxy_config_last_update_timestamp_seconds", "1764136507.25"),
    ]
    width = max(len(s) for s, _ in expected)
    assert code == 0
    assert out.splitlines() == [f"{'SERIES':{width}}  VALUE"] + [f"{s:{width}}  {v}" for s, v in expected]


def test_a_peer_that_fails_the_call_is_one_line(capsys):
    def broken(request, context):
        context.abort(grpc.StatusCode.INTERNAL, "stats\nexploded")

    server = grpc.server(futures.ThreadPoolExecutor(1))
    handler = grpc.method_handlers_generic_handler(
        "meshproxy.admin.v1.Admin", {"GetStats": grpc.unary_unary_rpc_method_handler(broken)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code, out, err = meshctl(capsys, "stats", f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert (code, out) == (1, "")
    assert err == (
        f"meshctl: error: the sidecar at 127.0.0.1:{port}: /meshproxy.admin.v1.Admin/GetStats: INTERNAL: "
        "stats exploded\n"
    )


def test_a_peer_that_does_not_answer_in_time(capsys):
    import threading

    release = threading.Event()

    def slow(request, context):
        release.wait(10)
        return admin_pb2.StatsResponse().SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(1))
    handler = grpc.method_handlers_generic_handler(
        "meshproxy.admin.v1.Admin", {"GetStats": grpc.unary_unary_rpc_method_handler(slow)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code, out, err = meshctl(capsys, "stats", f"127.0.0.1:{port}", "--timeout", "0.2")
    finally:
        release.set()
        server.stop(None)
    assert (code, out) == (1, "")
    assert err == (
        f"meshctl: error: the sidecar at 127.0.0.1:{port} did not answer /meshproxy.admin.v1.Admin/GetStats "
        "within 0.2s\n"
    )


def test_stats_label_values_are_escaped_as_the_exposition_does():
    data = {"families": [{"name": "m", "type": "GAUGE", "metrics": [{"labels": {"p": 'a"b\\c\nd'}, "value": 1}]}]}
    assert render_stats(data).splitlines()[1] == 'm{p="a\\"b\\\\c\\nd"}  1'
