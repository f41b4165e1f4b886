"""A route's retry policy and fault injection as compiled from config, the status mappings, and what a
cluster keeps across config changes (its budget, outlier verdicts, requests in flight) and how its
outlier detector drives every subset's balancer."""

from __future__ import annotations

import pytest

from meshproxy.config import from_dict
from meshproxy.config.v1 import config_pb2 as pb
from meshproxy.conn import h2conn as h2
from meshproxy.resilience import outlier
from meshproxy.resilience.policy import (
    DEFAULT_BUDGET,
    FaultPolicy,
    RetryPolicy,
    budget_args,
    grpc_for_http,
    http_for_grpc,
    outcome,
)
from meshproxy.upstream import Cluster

pytestmark = pytest.mark.resilience

S = 1_000_000_000
MS = 1_000_000


def retry_policy(**kw) -> RetryPolicy:
    msg = pb.RetryPolicy()
    for k, v in kw.items():
        if k == "retry_on":
            msg.retry_on.extend(v)
        elif k in ("per_try_timeout", "base_interval", "max_interval"):
            getattr(msg, k).FromNanoseconds(v)
        elif k == "budget":
            msg.budget.retry_ratio = v
        else:
            setattr(msg, k, v)
    return RetryPolicy(msg)


def test_conditions_compile_into_the_core_matcher():
    p = retry_policy(num_retries=2, retry_on=["5xx", "unavailable", "cancelled", "409", "retriable-status-codes"])
    p.bind(lambda down, up, reason: True)
    r = p.retry_on
    assert isinstance(r, h2.RetryOn)
    assert r.on_5xx and r.on_reset and not r.on_gateway
    assert r.statuses == frozenset({409})
    assert r.matches(200, 14) and r.matches(200, 1) and not r.matches(200, 13)
    assert r.matches(500) and r.matches(409) and not r.matches(404)


@pytest.mark.parametrize(
    ("retry_on", "attr"),
    [(["gateway-error"], "on_gateway"), (["reset"], "on_reset"), (["5xx"], "on_5xx")],
)
def test_each_condition_sets_its_flag(retry_on, attr):
    p = retry_policy(num_retries=1, retry_on=retry_on)
    assert p.conditions[attr] is True


def test_retriable_4xx_is_409_as_envoy():
    assert retry_policy(num_retries=1, retry_on=["retriable-4xx"]).conditions["statuses"] == (409,)


def test_connect_failure_and_refused_stream_need_no_core_condition():
    # Requests no upstream saw are always re-sent: the conditions add nothing for the core to test.
    c = retry_policy(num_retries=1, retry_on=["connect-failure", "refused-stream"]).conditions
    assert not any(c[k] for k in ("on_5xx", "on_gateway", "on_reset", "statuses", "grpc_statuses"))


def test_defaults_and_backoff_with_full_jitter():
    p = retry_policy(num_retries=3)
    assert (p.per_try_ns, p.backoff_base_ns, p.backoff_max_ns) == (0, 25 * MS, 250 * MS)
    assert p.budget_args is None
    assert p.backoff_ns(1, 0.0) == 0
    assert p.backoff_ns(1, 0.5) == 12_500_000
    assert p.backoff_ns(2, 0.5) == 25 * MS
    assert p.backoff_ns(3, 0.999) < 100 * MS
    assert p.backoff_ns(10, 0.5) == 125 * MS, "capped at max_interval"
    q = retry_policy(num_retries=1, base_interval=100 * MS, per_try_timeout=2 * S)
    assert (q.per_try_ns, q.backoff_max_ns) == (2 * S, S)


def test_a_route_budget_takes_linkerds_defaults_for_what_is_unset():
    p = retry_policy(num_retries=1, budget=0.5)
    assert p.budget_args == (10 * S, 10, 0.5)
    assert DEFAULT_BUDGET == (10 * S, 10, 0.2)


def test_budget_args_of_an_empty_message_are_the_defaults():
    assert budget_args(pb.RetryBudget()) == DEFAULT_BUDGET


@pytest.mark.parametrize(
    ("http", "grpc"), [(400, 13), (401, 16), (403, 7), (404, 12), (429, 14), (502, 14), (503, 14), (504, 14), (500, 2)]
)
def test_grpc_for_http_is_grpcs_mapping(http, grpc):
    assert grpc_for_http(http) == grpc


@pytest.mark.parametrize(("grpc", "http"), [(0, 200), (1, 499), (4, 504), (8, 429), (13, 500), (14, 503), (16, 401)])
def test_http_for_grpc_is_envoys_mapping(grpc, http):
    assert http_for_grpc(grpc) == http


@pytest.mark.parametrize(
    ("status", "grpc", "want"),
    [
        (200, -1, outlier.SUCCESS),
        (200, 0, outlier.SUCCESS),
        (404, -1, outlier.SUCCESS),
        (500, -1, outlier.ERROR_5XX),
        (503, -1, outlier.GATEWAY_ERROR),
        (200, 14, outlier.GATEWAY_ERROR),
        (200, 4, outlier.GATEWAY_ERROR),
        (200, 13, outlier.ERROR_5XX),
        (200, 12, outlier.ERROR_5XX),
        (200, 8, outlier.SUCCESS),
    ],
)
def test_outcome_classifies_as_envoy(status, grpc, want):
    assert outcome(status, grpc) == want


def test_fault_policy_defaults_to_every_request():
    cfg = from_dict(
        {
            "clusters": [],
            "listeners": [
                {
                    "name": "l",
                    "address": "127.0.0.1:0",
                    "virtual_hosts": [
                        {
                            "name": "v",
                            "domains": ["*"],
                            "routes": [
                                {
                                    "direct_response": {"status": 200},
                                    "fault": {"delay": {"fixed_delay": "0.5s"}, "abort": {"grpc_status": 14}},
                                },
                                {
                                    "direct_response": {"status": 200},
                                    "fault": {"abort": {"http_status": 503, "percentage": 12.5}},
                                },
                            ],
                        }
                    ],
                }
            ],
        },
        check=False,
    )
    routes = cfg.listeners[0].virtual_hosts[0].routes
    f = FaultPolicy(routes[0].fault)
    assert (f.delay_ns, f.delay_pct, f.abort_pct, f.abort_grpc, f.abort_http) == (S // 2, 100.0, 100.0, 14, None)
    g = FaultPolicy(routes[1].fault)
    assert (g.delay_ns, g.abort_pct, g.abort_http, g.abort_grpc) == (0, 12.5, 503, None)


# --- the cluster's state ---------------------------------------------------------------------


def cluster_msg(addresses, **extra):
    d = {
        "name": "c",
        "lb_policy": "ROUND_ROBIN",
        "endpoints": [{"address": a, "labels": {"v": "1" if i % 2 == 0 else "2"}} for i, a in enumerate(addresses)],
        "subsets": [{"name": "one", "labels": {"v": "1"}}],
    }
    d.update(extra)
    return from_dict({"clusters": [d]}, check=False).clusters[0]


OD = {"outlier_detection": {"consecutive_5xx": 2, "base_ejection_time": "1s", "max_ejection_percent": 100}}


def test_an_ejection_takes_the_endpoint_out_of_every_subset_until_the_sweep_returns_it():
    c = Cluster(cluster_msg(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], **OD))
    ep = c.endpoints[2]  # in "" at index 2 and in "one" (v=1) at index 1
    assert [(s.name, j) for s, j in ep.placements] == [("", 2), ("one", 1)]
    c.record(ep, outlier.ERROR_5XX, 0)
    assert c.subsets[""].lb.is_available(2)
    c.record(ep, outlier.GATEWAY_ERROR, 0)
    assert not c.subsets[""].lb.is_available(2) and not c.subsets["one"].lb.is_available(1)
    assert c.state.ejections == 1
    c.sweep(S - 1)
    assert not c.subsets[""].lb.is_available(2)
    c.sweep(S)
    assert c.subsets[""].lb.is_available(2) and c.subsets["one"].lb.is_available(1)


def test_without_outlier_detection_results_change_nothing():
    c = Cluster(cluster_msg(["10.0.0.1:80"]))
    for _ in range(100):
        c.record(c.endpoints[0], outlier.ERROR_5XX, 0)
    assert c.outlier is None and c.subsets[""].lb.is_available(0)


def test_a_config_change_keeps_budget_verdicts_and_counts_while_their_settings_stay():
    first = Cluster(cluster_msg(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], **OD))
    for _ in range(2):
        first.record(first.endpoints[1], outlier.ERROR_5XX, 0)
    first.state.active_requests = 7
    budget = first.state.budget
    reuse = {ep.address: ep for ep in first.endpoints}
    # 10.0.0.2 moves from index 1 to index 0; 10.0.0.1 is gone; 10.0.0.9 is new.
    second = Cluster(cluster_msg(["10.0.0.2:80", "10.0.0.3:80", "10.0.0.9:80"], **OD), reuse, first.state)
    assert second.state is first.state and second.state.budget is budget and second.state.active_requests == 7
    assert second.outlier is first.outlier
    assert second.outlier.is_ejected(0) and not second.subsets[""].lb.is_available(0)
    assert [ep.index for ep in second.endpoints] == [0, 1, 2]
    gone = reuse["10.0.0.1:80"]
    assert gone.index == -1
    first.record(gone, outlier.ERROR_5XX, 0)  # a late result of a request routed before the change
    assert second.outlier.ejected() == 1
    # New settings: a new detector (and budget), starting clean.
    third = Cluster(
        cluster_msg(
            ["10.0.0.2:80", "10.0.0.3:80"],
            retry_budget={"retry_ratio": 0.5},
            outlier_detection={"consecutive_5xx": 3},
        ),
        {ep.address: ep for ep in second.endpoints},
        second.state,
    )
    assert third.outlier is not second.outlier and third.outlier.ejected() == 0
    assert third.state.budget is not budget and third.state.budget.retry_ratio == 0.5


def test_max_ejection_time_defaults_to_the_larger_of_300s_and_the_base():
    c = Cluster(cluster_msg(["10.0.0.1:80"], outlier_detection={"base_ejection_time": "400s"}))
    assert c.state.detector_args["max_ejection_time_ns"] == 400 * S
    d = Cluster(cluster_msg(["10.0.0.1:80"], outlier_detection={}))
    assert d.state.detector_args["max_ejection_time_ns"] == 300 * S
    assert d.state.detector_args["consecutive_5xx"] == 5 and d.state.detector_args["max_ejection_percent"] == 10
