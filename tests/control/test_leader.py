"""control.leader against the fake API server: one leader, hand-over on release and on expiry, conflicts, outages."""

from __future__ import annotations

import datetime
import logging
import re
import threading
import time
from collections.abc import Callable

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

from control.leader import LeaderElector  # noqa: E402
from tests.fakekube import ApiError, FakeKube, Request  # noqa: E402

pytestmark = pytest.mark.timeout(30)

# short enough for tests, in the proportions of the defaults (15 / 10 / 2)
TIMING = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1}
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
MERGE = "application/merge-patch+json"


@pytest.fixture
def kube():
    with FakeKube() as fake:
        yield fake


class Candidate:
    """An elector with its own ApiClient (its User-Agent is its identity) and a log of its callbacks."""

    def __init__(self, kube: FakeKube, identity: str, **timing: float) -> None:
        api = client.ApiClient(client.Configuration(host=kube.host))
        api.user_agent = identity
        self.events: list[str] = []
        self.elector = LeaderElector(
            api,
            "default",
            "control",
            identity,
            **(TIMING | timing),
            on_started_leading=lambda: self.events.append("started"),
            on_stopped_leading=lambda: self.events.append("stopped"),
        )


@pytest.fixture
def candidate(kube):
    made: list[Candidate] = []

    def make(identity: str, *, start: bool = True, **timing: float) -> Candidate:
        c = Candidate(kube, identity, **timing)
        made.append(c)
        if start:
            c.elector.start()
        return c

    yield make
    for c in made:
        c.elector.stop()


def wait_for(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> float:
    """Seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - t0


def lease(kube: FakeKube) -> dict:
    return kube.get(kube.type_of("coordination.k8s.io", "v1", "leases"), "default", "control")


def leader_of(*cs: Candidate) -> list[str]:
    return [c.elector.identity for c in cs if c.elector.is_leader]


def watch_for_overlap(*cs: Candidate) -> Callable[[], bool]:
    """Sample until the returned function is called: True if two ever led at once."""
    done, overlap = threading.Event(), []

    def sample() -> None:
        while not done.is_set():
            if len(leader_of(*cs)) > 1:
                overlap.append(True)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()

    def finish() -> bool:
        done.set()
        t.join(1)
        return bool(overlap)

    return finish


#: A lease short enough to outlive in a test, with a renew deadline that a loaded 2-core machine meets.
STEADY = {"lease_duration": 3.0, "renew_deadline": 2.5, "retry_period": 0.1}


def test_two_candidates_one_leader(kube, candidate):
    a, b = candidate("a", **STEADY), candidate("b", **STEADY)
    wait_for(lambda: leader_of(a, b), what="a leader")
    overlapped = watch_for_overlap(a, b)
    watching = datetime.datetime.now(datetime.UTC)
    time.sleep(3.5)  # longer than the lease: the leader keeps renewing, the other keeps waiting
    assert not overlapped()
    (leader,) = leader_of(a, b)
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == leader and spec["leaseDurationSeconds"] == 3
    assert spec["leaseTransitions"] == 0
    assert MICROTIME.match(spec["renewTime"]) and MICROTIME.match(spec["acquireTime"])
    # Renewed while we watched (without the renewals the lease would have passed to the other).
    assert datetime.datetime.fromisoformat(spec["renewTime"]) > watching
    assert (a if leader == "a" else b).events == ["started"]
    assert (b if leader == "a" else a).events == []


#: A lease far longer than any wait below: a candidate that waited for it to expire would time out.
LONG = {"lease_duration": 60.0, "renew_deadline": 40.0, "retry_period": 0.1}


def test_stop_releases_and_the_other_takes_over_at_once(kube, candidate):
    a = candidate("a", **LONG)
    wait_for(lambda: a.elector.is_leader)
    b = candidate("b", **LONG)
    time.sleep(0.3)
    assert leader_of(a, b) == ["a"]
    a.elector.stop()
    assert a.events == ["started", "stopped"] and not a.elector.is_leader
    assert lease(kube)["spec"].get("holderIdentity") in (None, "b")  # released (or b was that quick)
    # within 10 s of a 60 s lease: b did not wait for it to expire
    wait_for(lambda: b.elector.is_leader, timeout=10, what="b leading")
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1


def test_a_crashed_leader_is_replaced_after_the_lease_expires(kube, candidate, monkeypatch):
    a = candidate("a")
    wait_for(lambda: a.elector.is_leader)
    b = candidate("b")
    time.sleep(0.2)
    monkeypatch.setattr(a.elector, "_release", lambda: None)  # a crash: the Lease is left as it was
    a.elector.stop()
    left = lease(kube)["spec"]
    assert left["holderIdentity"] == "a"
    wait_for(lambda: b.elector.is_leader, what="b leading after expiry")
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # b took over only once a's last renewal had run its lease duration (the times the two
    # candidates wrote in the Lease, not this test's clock, which a slow renewal skews).
    renewed = datetime.datetime.strptime(left["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    acquired = datetime.datetime.strptime(spec["acquireTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert acquired - renewed >= datetime.timedelta(seconds=left["leaseDurationSeconds"])


def test_a_partitioned_leader_steps_down_before_the_other_steps_up(kube, candidate):
    a = candidate("a")
    wait_for(lambda: a.elector.is_leader)
    b = candidate("b")
    time.sleep(0.2)
    overlapped = watch_for_overlap(a, b)

    def partition(req: Request) -> ApiError | None:
        if req.headers.get("User-Agent") == "a":
            return ApiError(503, "ServiceUnavailable", "a cannot reach the API server")
        return None

    kube.fault = partition
    cut_at = time.monotonic()
    wait_for(lambda: a.events == ["started", "stopped"], what="a stepping down")
    stepped_down = time.monotonic() - cut_at
    assert stepped_down >= 0.4  # renew_deadline 0.6 s after its last renewal, not at the first failure
    wait_for(lambda: b.elector.is_leader, what="b leading")
    assert not overlapped()
    assert not a.elector.is_leader

    kube.fault = None  # a reconnects and stays a follower while b holds the lease
    time.sleep(0.4)
    assert leader_of(a, b) == ["b"]


def test_api_server_gone_means_stopped_leading(kube, candidate):
    a = candidate("a")
    wait_for(lambda: a.elector.is_leader)
    kube.stop()
    wait_for(lambda: a.events == ["started", "stopped"], what="on_stopped_leading")
    assert not a.elector.is_leader


def test_update_conflict_is_retried(kube, candidate, caplog):
    caplog.set_level(logging.DEBUG, logger="meshproxy.control.leader")
    a = candidate("a")
    wait_for(lambda: a.elector.is_leader)
    leases = kube.type_of("coordination.k8s.io", "v1", "leases")
    conflicts = []

    def concurrent_writer(req: Request) -> None:
        # someone else writes the Lease between a's read and a's update, so a's update is stale
        if req.method == "PUT" and not conflicts:
            conflicts.append(req)
            kube.patch(leases, "default", "control", {"metadata": {"labels": {"touched": "yes"}}}, MERGE)

    kube.fault = concurrent_writer
    wait_for(lambda: conflicts, what="a renewal")
    kube.fault = None
    renewed = lease(kube)["spec"]["renewTime"]
    wait_for(lambda: lease(kube)["spec"]["renewTime"] != renewed, what="the next renewal")
    assert a.elector.is_leader and a.events == ["started"]
    assert any("conflict" in r.getMessage() for r in caplog.records)


def test_takeover_by_a_conflicting_writer_ends_leadership(kube, candidate):
    a = candidate("a", **LONG)
    wait_for(lambda: a.elector.is_leader)
    leases = kube.type_of("coordination.k8s.io", "v1", "leases")

    def usurper(req: Request) -> None:
        if req.method == "PUT" and kube.fault is not None:
            kube.fault = None
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            kube.patch(leases, "default", "control", {"spec": {"holderIdentity": "z", "renewTime": now}}, MERGE)

    kube.fault = usurper
    # a's update conflicts, its next read shows z holding a fresh lease: it steps down at once,
    # not after its 40 s renew deadline
    wait_for(lambda: a.events == ["started", "stopped"], timeout=10, what="a stepping down")
    assert lease(kube)["spec"]["holderIdentity"] == "z"


def test_lost_create_race(kube, candidate):
    leases = kube.type_of("coordination.k8s.io", "v1", "leases")
    b = candidate("b", start=False)

    def first(req: Request) -> None:
        # someone creates the Lease just before b does, so b's create is AlreadyExists
        if req.method == "POST" and kube.fault is not None:
            kube.fault = None
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            spec = {"holderIdentity": "z", "leaseDurationSeconds": 1, "renewTime": now, "acquireTime": now}
            kube.create(leases, "default", {"metadata": {"name": "control"}, "spec": spec})

    kube.fault = first
    b.elector.start()
    time.sleep(0.4)
    assert not b.elector.is_leader and kube.fault is None
    wait_for(lambda: b.elector.is_leader, what="b taking the lease z never renewed")
    assert lease(kube)["spec"]["leaseTransitions"] == 1


def test_stop_from_a_callback(kube):
    events: list[str] = []
    elector = LeaderElector(
        client.ApiClient(client.Configuration(host=kube.host)),
        "default",
        "control",
        "a",
        **TIMING,
        on_started_leading=lambda: elector.stop(),  # e.g. a replica that only wanted to know it could lead
        on_stopped_leading=lambda: events.append("stopped"),
    )
    elector.start()
    wait_for(lambda: events == ["stopped"], what="on_stopped_leading")
    wait_for(lambda: "holderIdentity" not in lease(kube)["spec"], what="the release on the way out")
    assert not elector.is_leader


def test_bad_timing_is_refused(kube):
    api = client.ApiClient(client.Configuration(host=kube.host))
    noop = lambda: None  # noqa: E731
    for timing in (
        {"lease_duration": 1.0, "renew_deadline": 1.0, "retry_period": 0.1},
        {"lease_duration": 2.0, "renew_deadline": 1.0, "retry_period": 1.0},
        {"lease_duration": 2.0, "renew_deadline": 1.0, "retry_period": 0},
    ):
        with pytest.raises(ValueError):
            LeaderElector(api, "default", "x", "a", **timing, on_started_leading=noop, on_stopped_leading=noop)
