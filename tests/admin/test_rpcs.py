"""Every read-only RPC of ``meshproxy.admin.v1.Admin`` through a real grpcio client against a real sidecar
(``meshproxy run --config``), and the gRPC errors of bad calls: an unknown service or method
(UNIMPLEMENTED), a request that does not parse (INVALID_ARGUMENT), bad arguments."""

from __future__ import annotations

import time

import grpc
import pytest

from meshproxy import __version__
from meshproxy.admin.v1 import admin_pb2
from meshproxy.resilience import outlier
from tests.admin.conftest import CALL_TIMEOUT, DEAD, WHO, channel
from tests.integration import harness

pytestmark = pytest.mark.timeout(60)

Health = admin_pb2.EndpointStatus.Health
WHO_CALLS = 5


@pytest.fixture(scope="module")
def traffic(sidecar: harness.Sidecar) -> dict:
    """Known traffic through the sidecar, once per module: ``WHO_CALLS`` OK calls to ``backend``, one call
    to ``dead`` (connect refused: UNAVAILABLE, and the endpoint ejected)."""
    with channel(sidecar.address) as ch:
        for _ in range(WHO_CALLS):
            assert ch.unary_unary(WHO)(b"", timeout=CALL_TIMEOUT) == b"backend"
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(DEAD)(b"", timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    return {"ok": WHO_CALLS, "failed": 1}


def test_server_info(stub, sidecar):
    before = time.time()
    info = stub.GetServerInfo(admin_pb2.ServerInfoRequest(), timeout=CALL_TIMEOUT)
    assert info.version == __version__
    assert (info.live, info.ready, info.draining) == (True, True, False)
    assert info.config_version == "v1"
    assert info.workers == 1
    assert (info.node.id, info.node.namespace, info.node.workload) == ("node-a", "shop", "cart")
    assert 0 < info.start_time.ToSeconds() <= before


def test_config_dump_whole(stub, sidecar):
    dump = stub.GetConfigDump(admin_pb2.ConfigDumpRequest(), timeout=CALL_TIMEOUT)
    assert dump.version == "v1"
    assert dump.node.id == "node-a"
    assert dump.source == f"file:{sidecar.config_path}"
    assert dump.accepted_total == 1 and dump.rejected_total == 0
    assert not dump.HasField("last_rejected")
    assert dump.last_updated.ToSeconds() > 0
    assert [ls.name for ls in dump.config.listeners] == ["main"]
    assert [r.name for r in dump.config.listeners[0].virtual_hosts[0].routes] == ["who", "dead", "faulty"]
    assert [c.name for c in dump.config.clusters] == ["backend", "checked", "dead"]
    assert dump.config.clusters[0].endpoints[0].labels["version"] == "v1"
    resources = {(r.type, r.name): r for r in dump.resources}
    assert sorted(resources) == [
        ("cluster", "backend"),
        ("cluster", "checked"),
        ("cluster", "dead"),
        ("listener", "main"),
        ("route", "main"),
    ]
    assert {r.version for r in resources.values()} == {"v1"}
    assert all(r.last_updated.ToSeconds() > 0 for r in resources.values())


def test_config_dump_shows_the_resilience_settings_in_force(stub):
    # Issue 5: retries (with the route's budget), timeouts, faults, breakers and outlier detection as applied.
    dump = stub.GetConfigDump(admin_pb2.ConfigDumpRequest(types=["routes", "clusters"]), timeout=CALL_TIMEOUT)
    routes = {r.name: r for r in dump.config.listeners[0].virtual_hosts[0].routes}
    who = routes["who"]
    assert who.timeout.ToSeconds() == 30
    assert who.retry_policy.num_retries == 2 and who.retry_policy.per_try_timeout.ToSeconds() == 10
    assert list(who.retry_policy.retry_on) == ["unavailable", "reset"]
    assert who.retry_policy.budget.retry_ratio == pytest.approx(0.3)
    assert who.retry_policy.budget.min_retries_per_second == 4
    assert routes["faulty"].fault.abort.grpc_status == 14 and routes["faulty"].fault.abort.percentage == 100
    clusters = {c.name: c for c in dump.config.clusters}
    assert clusters["backend"].circuit_breakers.max_requests == 77
    assert clusters["dead"].outlier_detection.consecutive_5xx == 1
    assert clusters["dead"].outlier_detection.base_ejection_time.ToSeconds() == 300


@pytest.mark.parametrize(
    ("types", "listeners", "routes", "clusters", "endpoints"),
    [
        (["listeners"], True, False, False, False),
        (["routes"], True, True, False, False),
        (["listeners", "routes"], True, True, False, False),
        (["clusters"], False, False, True, False),
        (["endpoints"], False, False, True, True),
        (["clusters", "endpoints"], False, False, True, True),
    ],
)
def test_config_dump_filtered(stub, types, listeners, routes, clusters, endpoints):
    dump = stub.GetConfigDump(admin_pb2.ConfigDumpRequest(types=types), timeout=CALL_TIMEOUT)
    assert bool(dump.config.listeners) == listeners
    assert bool(dump.config.clusters) == clusters
    if listeners:
        assert bool(dump.config.listeners[0].virtual_hosts) == routes
        # "routes" alone: a listener is only its name and its route table.
        assert (dump.config.listeners[0].address != "") == ("listeners" in types)
    if clusters:
        assert bool(dump.config.clusters[0].endpoints) == endpoints
        assert dump.config.clusters[0].HasField("circuit_breakers") == ("clusters" in types)
    kinds = {r.type for r in dump.resources}
    expected = {"listener"} if "listeners" in types else set()
    expected |= {"route"} if "routes" in types else set()
    expected |= {"cluster"} if clusters else set()
    assert kinds == expected


def test_config_dump_unknown_type_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.GetConfigDump(admin_pb2.ConfigDumpRequest(types=["listeners", "secrets"]), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'secrets'" in err.value.details()


def _clusters(stub, name: str = "") -> dict[str, admin_pb2.ClusterStatus]:
    return {c.name: c for c in stub.GetClusters(admin_pb2.ClustersRequest(name=name), timeout=CALL_TIMEOUT).clusters}


def test_clusters_endpoint_states(stub, traffic, upstream):
    # The health checker runs every 0.2 s: the checked endpoint turns UNHEALTHY at its first check.
    assert harness.poll_until(lambda: _clusters(stub)["checked"].endpoints[0].health == Health.UNHEALTHY, 10)
    clusters = _clusters(stub)
    assert sorted(clusters) == ["backend", "checked", "dead"]

    backend = clusters["backend"]
    assert backend.lb_policy == "PEAK_EWMA"
    assert backend.circuit_breakers.max_requests == 77
    assert backend.worker == 0
    assert (backend.active_requests, backend.pending_requests, backend.active_retries) == (0, 0, 0)
    assert backend.active_connections == 1
    (ep,) = backend.endpoints
    assert ep.address == upstream
    assert ep.weight == 3
    assert dict(ep.labels) == {"version": "v1"}
    assert list(ep.subsets) == ["", "v1"]
    assert ep.health == Health.HEALTHY
    assert ep.connections == 1
    assert ep.active_requests == 0
    # Sampled by the calls (loopback answers within ms): no longer the 30 ms default of an unsampled one.
    assert 0 < ep.ewma_ms < 30

    checked = clusters["checked"]
    assert checked.lb_policy == "ROUND_ROBIN"
    assert checked.endpoints[0].health == Health.UNHEALTHY

    dead = clusters["dead"]
    (dep,) = dead.endpoints
    assert dep.health == Health.EJECTED
    assert dep.ejections == 1
    if hasattr(outlier.OutlierDetector, "ejected_until"):
        # base_ejection_time 300 s, from the call a moment ago.
        assert time.time() + 200 < dep.ejected_until.ToSeconds() <= time.time() + 300
    assert dead.ejections_total == 1
    assert dep.connections == 0


def test_clusters_by_name(stub):
    only = stub.GetClusters(admin_pb2.ClustersRequest(name="dead"), timeout=CALL_TIMEOUT)
    assert [c.name for c in only.clusters] == ["dead"]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetClusters(admin_pb2.ClustersRequest(name="nope"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _metrics_module():
    try:
        from meshproxy.telemetry import metrics
    except ImportError:
        pytest.xfail("meshproxy.telemetry.metrics (H2) is not there yet")
    return metrics


def test_stats(stub, traffic):
    _metrics_module()
    stats = stub.GetStats(admin_pb2.StatsRequest(), timeout=CALL_TIMEOUT)
    assert stats.workers == 1
    families = {f.name: f for f in stats.families}
    assert "meshproxy_requests_total" in families, sorted(families)
    requests = families["meshproxy_requests_total"]
    assert requests.type == admin_pb2.MetricFamily.COUNTER
    by_code = {}
    for m in requests.metrics:
        key = (m.labels["response_code"], m.labels["grpc_response_status"])
        by_code[key] = by_code.get(key, 0) + m.value
    assert by_code[("200", "0")] == traffic["ok"]
    # The call to the dead cluster: the sidecar's own UNAVAILABLE (trailers-only, HTTP 200).
    assert by_code[("200", "14")] == traffic["failed"]
    duration = families["meshproxy_request_duration_milliseconds"]
    assert duration.type == admin_pb2.MetricFamily.HISTOGRAM
    assert sum(m.histogram.count for m in duration.metrics) == traffic["ok"] + traffic["failed"]


def test_stats_prefixes(stub, traffic):
    _metrics_module()
    stats = stub.GetStats(admin_pb2.StatsRequest(prefixes=["meshproxy_upstream_", "meshproxy_config_"]))
    names = {f.name for f in stats.families}
    assert names, "no family matched"
    assert all(n.startswith(("meshproxy_upstream_", "meshproxy_config_")) for n in names), names
    assert "meshproxy_requests_total" not in names


def test_log_levels_get_and_invalid_set(stub):
    levels = stub.GetLogLevel(admin_pb2.LogLevelRequest(), timeout=CALL_TIMEOUT).levels
    assert levels[""] in ("debug", "info", "warning", "error", "critical")
    for request, needle in [
        (admin_pb2.LogLevelRequest(logger="meshproxy", level="loud"), "'loud'"),
        (admin_pb2.LogLevelRequest(logger="urllib3", level="debug"), "'urllib3'"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.SetLogLevel(request, timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
    assert stub.GetLogLevel(admin_pb2.LogLevelRequest(), timeout=CALL_TIMEOUT).levels == levels


def test_unknown_service_and_method_are_unimplemented(admin_channel):
    for path, needle in [
        ("/meshproxy.admin.v1.Nope/GetStats", "unknown service meshproxy.admin.v1.Nope"),
        ("/meshproxy.admin.v1.Admin/Reboot", "unknown method Reboot for service meshproxy.admin.v1.Admin"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            admin_channel.unary_unary(path)(b"", timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.value.details() == needle


def test_request_that_does_not_parse_is_invalid_argument(admin_channel, stub):
    # Field 1 (types, a string) with a length running past the end of the message.
    with pytest.raises(grpc.RpcError) as err:
        admin_channel.unary_unary("/meshproxy.admin.v1.Admin/GetConfigDump")(b"\x0a\x7fabc", timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ConfigDumpRequest" in err.value.details()
    # The server is fine after it.
    assert stub.GetServerInfo(admin_pb2.ServerInfoRequest(), timeout=CALL_TIMEOUT).live


def test_concurrent_calls_on_one_channel(stub):
    futures = [stub.GetServerInfo.future(admin_pb2.ServerInfoRequest(), timeout=CALL_TIMEOUT) for _ in range(50)]
    assert all(f.result().version == __version__ for f in futures)
