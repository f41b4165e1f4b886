"""Resilience end to end (issue 5): retries and their budget, backoff, per-try and overall
deadlines, stream and connection idle timeouts, circuit breakers, outlier ejection and fault
injection, against real upstreams that fail on
purpose (``tests/integration/failing_server.py``): grpcio servers that fail a set share of calls
with a given status, hang, or die (in-process ``stop(0)``, or a subprocess killed with SIGKILL),
and an ``h2``-library server that resets or refuses streams and sends GOAWAY.

The measure of load and of retries is what the backends count: backend calls minus client calls
is the number of retries actually sent. Failure decisions are deterministic (every k-th call, the
first attempt of each request id, or a seeded sequence drawn once per call), so counts are exact
or, for seeded shares, within binomial bounds computed here. The figures each test measures are
printed with a ``[resilience]`` prefix (``pytest -s`` shows them).

Every sidecar runs one worker (circuit breakers and budgets are per worker); every call carries a
deadline and every load is bounded in count. No wall-clock upper bound is asserted except where
the behaviour is itself about time (a deadline, a backoff cap, an ejection's end, "answered at
once"), and then with wide slack.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.integration import harness
from tests.integration.conftest import SIDECAR_KEY
from tests.integration.failing_server import (
    STREAM,
    UNARY,
    BackendProcess,
    Behaviour,
    FailingBackend,
    H2FaultServer,
    Stats,
)
from tests.integration.harness import H2Response, grpc_frame

HOST = harness.HOST
#: Every call's deadline unless the test is about deadlines.
TIMEOUT = 10.0
#: The default retry budget (Linkerd's): 20% of requests over 10 s, plus 10 retries a second.
RATIO, MIN_PER_SECOND, TTL = 0.2, 10, 10.0
FLAGS = "x-meshproxy-response-flags"
GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))


def report(message: str) -> None:
    print(f"[resilience] {message}", flush=True)


# -- config ---------------------------------------------------------------------------------


def route(
    cluster: str,
    *,
    prefix: str = "/",
    case: str | None = None,
    retry: dict | None = None,
    timeout: str | None = None,
    fault: dict | None = None,
) -> dict:
    """A route to ``cluster``; with ``case``, only for requests carrying ``x-case: <case>``."""
    match: dict = {"prefix": prefix}
    if case is not None:
        match["headers"] = [{"name": "x-case", "exact": case}]
    r: dict = {"name": f"{cluster}-{case or prefix}", "match": match, "route": {"clusters": [{"cluster": cluster}]}}
    if retry is not None:
        r["retry_policy"] = retry
    if timeout is not None:
        r["timeout"] = timeout
    if fault is not None:
        r["fault"] = fault
    return r


def retry(retry_on: list[str], num_retries: int = 2, **extra) -> dict:
    return {"num_retries": num_retries, "retry_on": retry_on, **extra}


def cluster(name: str, *addresses: str, **extra) -> dict:
    return {"name": name, "endpoints": [{"address": a} for a in addresses], "connect_timeout": "1s", **extra}


@contextlib.contextmanager
def sidecar(
    directory: Path,
    routes: list[dict],
    clusters: list[dict],
    request: pytest.FixtureRequest | None = None,
    **listener_extra,
):
    """A one-worker sidecar running ``routes`` (one virtual host, ``*``) and ``clusters``;
    ``listener_extra`` are more fields of its listener."""
    port = harness.free_port()
    config = {
        "version": "resilience",
        "listeners": [
            {
                "name": "main",
                "address": f"{HOST}:{port}",
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
                **listener_extra,
            }
        ],
        "clusters": clusters,
    }
    path = directory / f"sidecar-{port}.json"
    path.write_text(json.dumps(config, indent=1))
    with harness.Sidecar(config_file=path, listen_port=port, extra_args=["--concurrency", "1"]) as running:
        if request is not None:
            request.node.stash[SIDECAR_KEY] = running
        yield running


# -- gRPC clients ---------------------------------------------------------------------------


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=list(harness.CLIENT_OPTIONS))


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    reply: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)
    start: float = 0.0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def flags(self) -> str:
        return self.metadata.get(FLAGS, "")


def _metadata(*parts) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        for key, value in part or ():
            out[key] = value if isinstance(value, str) else value.decode("latin-1")
    return out


def call(
    ch: grpc.Channel,
    *,
    body: bytes = b"ping",
    request_id: str | None = None,
    case: str | None = None,
    timeout: float = TIMEOUT,
    path: str = UNARY,
) -> Outcome:
    """One unary call; never raises for a gRPC status."""
    md = []
    if request_id is not None:
        md.append(("x-request-id", request_id))
    if case is not None:
        md.append(("x-case", case))
    start = time.monotonic()
    try:
        reply, rpc = ch.unary_unary(path).with_call(body, timeout=timeout, metadata=md)
    except grpc.RpcError as error:
        return Outcome(
            error.code(),
            error.details() or "",
            metadata=_metadata(error.initial_metadata(), error.trailing_metadata()),
            start=start,
            elapsed=time.monotonic() - start,
        )
    return Outcome(
        grpc.StatusCode.OK,
        reply=reply,
        metadata=_metadata(rpc.initial_metadata(), rpc.trailing_metadata()),
        start=start,
        elapsed=time.monotonic() - start,
    )


def load(
    address: str,
    count: int,
    *,
    threads: int = 4,
    prefix: str = "req",
    case: str | None = None,
    after_each: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """``count`` unary calls from ``threads`` threads over one channel, each with its own
    x-request-id ``<prefix>-<i>``; ``after_each(done)`` runs after each call completes."""
    outcomes: list[Outcome | None] = [None] * count
    counter = itertools.count()
    done = itertools.count(1)
    lock = threading.Lock()
    with channel(address) as ch:

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter)
                if i >= count:
                    return
                outcomes[i] = call(ch, request_id=f"{prefix}-{i}", case=case)
                if after_each is not None:
                    with lock:
                        n = next(done)
                    after_each(n)

        pool = [threading.Thread(target=worker, name=f"load-{t}") for t in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(120)
    assert all(o is not None for o in outcomes), "a load thread did not finish"
    return outcomes  # type: ignore[return-value]


def success_rate(outcomes: list[Outcome]) -> float:
    return sum(o.ok for o in outcomes) / len(outcomes)


def codes(outcomes: list[Outcome]) -> Counter:
    return Counter(o.code.name for o in outcomes)


def attempts_by_request(stats: dict[str, Stats]) -> dict[str, list[str]]:
    """request id -> the backends its attempts reached, in order of arrival."""
    seen: list[tuple[float, str, str]] = []
    for name, s in stats.items():
        seen += [(c.start, c.request_id, name) for c in s.records]
    by: dict[str, list[str]] = {}
    for _, rid, name in sorted(seen):
        by.setdefault(rid, []).append(name)
    return by


# -- a plain HTTP/2 client ----------------------------------------------------------------------


class H2Client(harness.H2Client):
    """``harness.H2Client`` (:authority ``resilience``) with a shorthand for gRPC-shaped calls."""

    authority = "resilience"

    def grpc(self, path: str = UNARY, *, extra=(), body: bytes = b"ping", timeout: float = TIMEOUT) -> H2Response:
        """A gRPC-shaped unary request with ``extra`` header fields (grpc-timeout, x-case...)."""
        return self.request(
            path, method="POST", headers=[*GRPC_HEADERS, *extra], body=grpc_frame(body), timeout=timeout
        )


# -- fixtures -------------------------------------------------------------------------------------


@contextlib.contextmanager
def backends(*names: str, behaviour: Behaviour | None = None) -> Iterator[list[FailingBackend]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FailingBackend(n, behaviour)) for n in names]


def all_stats(servers) -> dict[str, Stats]:
    return {s.name: s.stats() for s in servers}


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - sigmas * sd, mean + sigmas * sd


def budget_bound(requests: int, elapsed: float, ratio: float = RATIO, per_second: int = MIN_PER_SECOND) -> float:
    """The most retries a budget allows for ``requests`` over ``elapsed`` seconds: ratio x requests
    plus the reserve (per_second x ttl), and one more reserve for each ttl the run outlasted."""
    return ratio * requests + per_second * (TTL + elapsed) + 1


# == 1. retries against a share of failing calls, and the budget ===================================


def test_retries_lift_the_success_rate_within_the_budget(tmp_path: Path, request: pytest.FixtureRequest):
    """Three backends each failing a seeded 20% of calls with UNAVAILABLE. Without a retry policy
    the success rate is ~80%; with ``retry_on: [unavailable]``, ``num_retries: 2`` and the default
    budget it is ~1 - 0.2^3 = 99.2% (each attempt on another endpoint). The budget
    (0.2 x requests + 10/s x 10 s) is far above the ~0.24 x requests wanted, so every failed
    attempt is either retried or (the third) returned: failed backend calls == retries + failed
    client calls, exactly. No request reaches one backend twice."""
    n_plain, n_retry = 400, 500
    with backends("b0", "b1", "b2") as servers:
        for i, s in enumerate(servers):
            s.set(fail_ratio=0.2, seed=100 + i)
        addresses = [s.address for s in servers]
        routes = [route("retrying", case="retry", retry=retry(["unavailable"], 2)), route("plain")]
        clusters = [cluster("retrying", *addresses), cluster("plain", *addresses)]
        with sidecar(tmp_path, routes, clusters, request) as proxy:
            plain = load(proxy.address, n_plain, prefix="plain")
            plain_backend = sum(s.calls for s in servers)
            for s in servers:
                s.reset()
            start = time.monotonic()
            retried = load(proxy.address, n_retry, prefix="retry", case="retry")
            elapsed = time.monotonic() - start
        stats = all_stats(servers)
    rate_plain, rate_retry = success_rate(plain), success_rate(retried)
    backend_calls = sum(s.calls for s in stats.values())
    backend_failed = sum(s.failed for s in stats.values())
    retries = backend_calls - n_retry
    client_failed = n_retry - sum(o.ok for o in retried)
    bound = budget_bound(n_retry, elapsed)
    report(
        f"20% failing: no retries {rate_plain:.1%} success ({n_plain} calls, backend saw {plain_backend}); "
        f"retries {rate_retry:.2%} success ({n_retry} calls in {elapsed:.2f}s), expected 99.2%; "
        f"retries sent {retries} = {retries / n_retry:.3f} x requests (budget allows {bound:.0f}); "
        f"failed attempts {backend_failed}; client failures {codes(retried)}"
    )
    assert plain_backend == n_plain, "no retry policy: one backend call per client call"
    low, high = binomial_bounds(n_plain, 0.8)
    assert low / n_plain <= rate_plain <= high / n_plain, rate_plain
    assert rate_retry >= 0.97, f"{rate_retry:.2%} success with retries; expected ~99.2%: {codes(retried)}"
    assert retries <= bound, f"{retries} retries for {n_retry} requests in {elapsed:.1f}s: over the budget {bound}"
    assert backend_failed == retries + client_failed, (
        f"{backend_failed} failed attempts, {retries} retries, {client_failed} failed calls: "
        "some failed attempt was neither retried nor returned"
    )
    assert all(o.code is grpc.StatusCode.UNAVAILABLE for o in retried if not o.ok), codes(retried)
    by_request = attempts_by_request(stats)
    assert set(by_request) == {f"retry-{i}" for i in range(n_retry)}
    repeats = {rid: where for rid, where in by_request.items() if len(where) != len(set(where))}
    assert not repeats, f"retries went back to an endpoint already tried: {dict(list(repeats.items())[:5])}"


STORM_BUDGETS = {
    # name: (where the budget is set, retry_ratio, min_retries_per_second, ttl seconds, client calls)
    "default": (None, RATIO, MIN_PER_SECOND, TTL, 600),
    "route": ("route", 0.5, 2, 10.0, 300),
    "cluster": ("cluster", 0.1, 3, 10.0, 300),
    # the route's budget wins over its cluster's (which is the "cluster" one above)
    "route-over-cluster": ("both", 0.5, 2, 10.0, 300),
}


@pytest.mark.parametrize("budget", list(STORM_BUDGETS))
def test_budget_stops_a_retry_storm(tmp_path: Path, request: pytest.FixtureRequest, budget: str):
    """Both backends fail every call (UNAVAILABLE). With ``num_retries: 2`` an unbudgeted proxy
    would triple the load; the budget (the default one, the route's, or the cluster's
    ``retry_budget``; the route's when both are set) keeps the retries within ratio x requests +
    min_retries_per_second x ttl, and every client gets the backend's own failure (not one the
    proxy made up). The budget is not stricter than configured either: with every call failing,
    the retries sent come to the whole allowance (less a couple for the requests still depositing
    at the end)."""
    where, ratio, per_second, ttl, n = STORM_BUDGETS[budget]
    spec = {"retry_ratio": ratio, "min_retries_per_second": per_second, "ttl": f"{ttl}s"}
    policy = retry(["unavailable"], 2, **({"budget": spec} if where in ("route", "both") else {}))
    extra = {"retry_budget": spec} if where == "cluster" else {}
    if where == "both":
        extra = {"retry_budget": {"retry_ratio": 0.1, "min_retries_per_second": 3, "ttl": "10s"}}
    with backends("d0", "d1", behaviour=Behaviour(fail_every=1)) as servers:
        clusters = [cluster("down", *(s.address for s in servers), **extra)]
        with sidecar(tmp_path, [route("down", retry=policy)], clusters, request) as proxy:
            start = time.monotonic()
            outcomes = load(proxy.address, n, threads=6, prefix="storm")
            elapsed = time.monotonic() - start
        backend_calls = sum(s.calls for s in servers)
    retries = backend_calls - n
    allowance = ratio * n + per_second * ttl
    bound = ratio * n + per_second * (ttl + elapsed) + 1
    report(
        f"100% failing, {budget} budget (ratio {ratio}, {per_second}/s, ttl {ttl:g}s): {n} calls in "
        f"{elapsed:.2f}s, backend saw {backend_calls} ({backend_calls / n:.3f} x), retries {retries} "
        f"(allowance {allowance:.0f}, bound {bound:.0f}; without a budget {2 * n}); outcomes {codes(outcomes)}"
    )
    assert codes(outcomes) == {"UNAVAILABLE": n}, codes(outcomes)
    original = [o for o in outcomes if "injected failure" not in o.details]
    assert not original, f"{len(original)} calls did not get the backend's failure, e.g. {original[0]}"
    assert retries <= bound, f"retry storm: {retries} retries for {n} requests (budget {bound:.0f})"
    if elapsed < 0.9 * ttl:  # nothing aged out of the window yet
        assert retries >= allowance - 3, f"only {retries} retries of the {allowance:.0f} the budget allows"


def test_backoff_full_jitter(tmp_path: Path, request: pytest.FixtureRequest):
    """``base_interval: 0.2s``, ``max_interval: 0.3s``, 2 retries, a backend failing every call:
    the gap before the first retry is at most 0.2 s, before the second at most min(0.4, 0.3) =
    0.3 s (plus 60 ms for the attempts themselves), and both are spread over their range (full
    jitter): of 20 requests some first gap exceeds 0.1 s and some second gap exceeds 0.2 s (each
    missed by chance with probability below 1e-3)."""
    base, cap, n = 0.2, 0.3, 20
    policy = retry(["unavailable"], 2, base_interval=f"{base}s", max_interval=f"{cap}s")
    with FailingBackend("jitter", Behaviour(fail_every=1)) as backend:
        with sidecar(tmp_path, [route("j", retry=policy)], [cluster("j", backend.address)], request) as proxy:
            outcomes = load(proxy.address, n, threads=5, prefix="jitter")
        stats = backend.stats()
    starts: dict[str, list[float]] = {}
    for c in stats.records:
        starts.setdefault(c.request_id, []).append(c.start)
    gaps = [[b - a for a, b in itertools.pairwise(sorted(t))] for t in starts.values()]
    first = [g[0] for g in gaps if len(g) >= 1]
    second = [g[1] for g in gaps if len(g) >= 2]
    report(
        f"backoff base {base}s max {cap}s: attempts per request {Counter(len(t) for t in starts.values())}; "
        f"1st gap min/mean/max {min(first):.3f}/{sum(first) / len(first):.3f}/{max(first):.3f}s (uniform "
        f"[0, {base}]: mean {base / 2}); 2nd gap {min(second):.3f}/{sum(second) / len(second):.3f}/"
        f"{max(second):.3f}s (uniform [0, {cap}]: mean {cap / 2})"
    )
    assert codes(outcomes) == {"UNAVAILABLE": n}
    assert len(first) == n and len(second) == n, Counter(len(t) for t in starts.values())
    assert max(first) <= base + 0.06, f"a first retry waited {max(first):.3f}s; the cap is {base}s"
    assert max(second) <= cap + 0.06, f"a second retry waited {max(second):.3f}s; the cap is {cap}s"
    assert max(first) > base / 2, f"no first gap above {base / 2}s: not full jitter over [0, {base}]"
    assert max(second) > base, f"no second gap above {base}s: the cap did not grow to min(2 x base, max)"


# == 2. backends dying, and requests the upstream never saw ===========================================


@pytest.mark.parametrize("death", ["sigkill", "stop"])
@pytest.mark.parametrize("policy", ["retry", "none"])
def test_killing_one_of_three_backends_mid_load(
    tmp_path: Path, request: pytest.FixtureRequest, policy: str, death: str
):
    """Three backends (each answers in 10 ms); 6 client threads make 240 calls; after 60, one
    backend dies: a subprocess SIGKILLed (``sigkill``: its sockets just close) or an in-process
    grpcio server stopped with grace 0 (``stop``: it cancels what it has in flight). With
    ``retry_on: [reset, connect-failure, refused-stream, unavailable, cancelled]`` no call fails.
    Without a retry policy only the calls in flight on the dead backend may fail (at most one per
    client thread); calls after it, whose connect attempts to the dead backend fail, are re-sent
    to another endpoint regardless of policy."""
    n, threads, kill_at = 240, 6, 60
    behaviour = Behaviour(delay=0.01)
    with contextlib.ExitStack() as stack:
        servers: list = []
        for i in range(3):  # started together, then waited for
            if death == "sigkill":
                servers.append(BackendProcess(f"p{i}", behaviour))
                stack.callback(servers[-1].close)
            else:
                servers.append(stack.enter_context(FailingBackend(f"p{i}", behaviour)))
        if death == "sigkill":
            for s in servers:
                s.wait_ready()
        on = ["reset", "connect-failure", "refused-stream", "unavailable", "cancelled"]
        routes = [route("procs", retry=retry(on, 3) if policy == "retry" else None)]
        clusters = [cluster("procs", *(s.address for s in servers))]
        proxy = stack.enter_context(sidecar(tmp_path, routes, clusters, request))
        killed_at: list[float] = []

        def after_each(done: int) -> None:
            if done == kill_at:
                killed_at.append(time.monotonic())
                if death == "sigkill":
                    servers[1].kill()
                else:
                    servers[1].stop(0)

        outcomes = load(proxy.address, n, threads=threads, prefix="kill", after_each=after_each)
        survivors = {s.name: s.stats() for s in (servers[0], servers[2])}
    assert killed_at, "the backend was never killed"
    failed = [o for o in outcomes if not o.ok]
    late = [o for o in failed if o.start > killed_at[0]]
    report(
        f"one of three dies ({death}, policy {policy}): {n} calls, {len(failed)} failed "
        f"{Counter((o.code.name, o.details) for o in failed)}, {len(late)} of them started after the death; "
        f"survivors served { {k: v.calls for k, v in survivors.items()} }"
    )
    if policy == "retry":
        assert not failed, f"{len(failed)} calls failed: {codes(failed)}; e.g. {failed[0]}"
    else:
        assert len(failed) <= threads, f"{len(failed)} failed; at most {threads} were in flight: {failed[:3]}"
    served_after = sum(1 for s in survivors.values() for c in s.records if c.start > killed_at[0] and c.outcome == "ok")
    assert served_after >= (n - kill_at) // 2, f"only {served_after} calls served after the death: not mid-load"


def test_requests_never_seen_are_resent_without_policy_or_budget(tmp_path: Path, request: pytest.FixtureRequest):
    """No retry policy and a budget that allows nothing (ratio 0.001, no reserve). Endpoint one
    is a closed port (connect failure); endpoint two refuses every other stream (REFUSED_STREAM);
    endpoint three answers. Every call succeeds: requests the upstream never saw are re-sent to
    another endpoint whatever the policy and the budget say. Against two endpoints that refuse
    everything, each request is sent 1 + 3 times and then fails (UNAVAILABLE)."""
    closed = f"{HOST}:{harness.free_port()}"
    nil_budget = {"retry_ratio": 0.001, "min_retries_per_second": 0, "ttl": "10s"}
    n, m = 60, 5
    with contextlib.ExitStack() as stack:
        refuser = stack.enter_context(H2FaultServer("refuser", action=lambda k: "refuse" if k % 2 else "ok"))
        ok = stack.enter_context(H2FaultServer("ok"))
        walls = [stack.enter_context(H2FaultServer(f"wall{i}", action=lambda k: "refuse")) for i in range(2)]
        clusters = [
            cluster("unseen", closed, refuser.address, ok.address, lb_policy="ROUND_ROBIN", retry_budget=nil_budget),
            cluster("walls", *(w.address for w in walls), retry_budget=nil_budget),
        ]
        routes = [route("walls", case="walls"), route("unseen")]
        with sidecar(tmp_path, routes, clusters, request) as proxy:
            outcomes = load(proxy.address, n, threads=3, prefix="unseen")
            with channel(proxy.address) as ch:
                walled = [call(ch, request_id=f"wall-{i}", case="walls") for i in range(m)]
        counts = {"refuser": refuser.counts(), "ok": ok.counts()}
        wall_attempts = sum(w.counts()["refused"] for w in walls)
    report(
        f"never-seen requests: {n} calls {codes(outcomes)}; upstreams {counts}; against two refusing "
        f"endpoints: {m} calls {codes(walled)} in {wall_attempts} attempts"
    )
    assert codes(outcomes) == {"OK": n}, [o for o in outcomes if not o.ok][:3]
    assert counts["refuser"]["refused"] > 0, "the refusing endpoint was never tried"
    assert counts["refuser"]["served"] + counts["ok"]["served"] == n
    assert codes(walled) == {"UNAVAILABLE": m}, walled
    assert wall_attempts == 4 * m, f"{wall_attempts} attempts for {m} requests: expected 1 + 3 re-sends each"


def test_goaway_above_last_stream_id_is_resent(tmp_path: Path, request: pytest.FixtureRequest):
    """An upstream that, after 5 requests on a connection, answers the next with a GOAWAY whose
    last stream id leaves it and every later stream unprocessed; 8 requests at a time, 10 rounds,
    no retry policy. None is lost: those above the last stream id are re-sent on a new connection."""
    with H2FaultServer("g", delay=0.02, goaway_after=5) as upstream:
        with sidecar(tmp_path, [route("g")], [cluster("g", upstream.address)], request) as proxy:
            outcomes: Counter = Counter()
            with H2Client(proxy.address) as client:
                for _ in range(10):
                    ids = [
                        client.send(UNARY, method="POST", headers=GRPC_HEADERS, body=grpc_frame(b"x"), flush=i == 7)
                        for i in range(8)
                    ]
                    for r in client.wait(ids):
                        outcomes[(r.status, r.reset, r.grpc_status, r.headers.get(FLAGS))] += 1
        counts = upstream.counts()
    report(f"GOAWAY upstream: 80 requests {dict(outcomes)}; upstream {counts}")
    assert outcomes == {(200, None, "0", None): 80}, outcomes
    assert counts["ignored"] > 0, f"no stream was ever above a GOAWAY's last stream id: {counts}"
    assert counts["served"] == 80


def test_grpcio_max_connection_age_goaways_lose_nothing(tmp_path: Path, request: pytest.FixtureRequest):
    """A grpcio backend that ends each connection after 200 ms (GOAWAY, max_connection_age), under
    4 client threads for 300 calls of 5 ms each: no call fails."""
    options = (("grpc.max_connection_age_ms", 200), ("grpc.max_connection_age_grace_ms", 2000))
    with FailingBackend("aged", Behaviour(delay=0.005), options=options) as backend:
        with sidecar(tmp_path, [route("aged")], [cluster("aged", backend.address)], request) as proxy:
            outcomes = load(proxy.address, 300, threads=4, prefix="aged")
        calls = backend.calls
    report(f"grpcio max_connection_age: 300 calls {codes(outcomes)}, backend saw {calls}")
    assert codes(outcomes) == {"OK": 300}, [o for o in outcomes if not o.ok][:3]


# == 3. retry conditions ===================================================================


@pytest.fixture(scope="module")
def conditions(tmp_path_factory: pytest.TempPathFactory):
    """One sidecar, one route per case (``x-case`` header), each to a cluster of its own (its own
    budget), in front of a grpcio backend (``grpc``) and an h2 server (``h2``) the tests set up."""
    cases = {
        # gRPC statuses, against the grpcio backend
        "unavailable": ("grpc", ["unavailable"]),
        "internal": ("grpc", ["internal"]),
        "resource-exhausted": ("grpc", ["resource-exhausted"]),
        "cancelled": ("grpc", ["cancelled"]),
        "deadline-exceeded": ("grpc", ["deadline-exceeded"]),
        "grpc-several": ("grpc", ["cancelled", "unavailable"]),
        # resets and HTTP statuses, against the h2 server
        "reset": ("h2", ["reset"]),
        "5xx": ("h2", ["5xx"]),
        "gateway-error": ("h2", ["gateway-error"]),
        "503": ("h2", ["503"]),
        "connect-failure": ("h2", ["connect-failure"]),
        "h2-internal": ("h2", ["internal"]),
    }
    with FailingBackend("cond") as grpc_backend, H2FaultServer("h2cond") as h2_server:
        upstream = {"grpc": grpc_backend.address, "h2": h2_server.address}
        routes = [route(f"c-{case}", case=case, retry=retry(on, 2)) for case, (_, on) in cases.items()]
        clusters = [cluster(f"c-{case}", upstream[kind]) for case, (kind, _) in cases.items()]
        with sidecar(tmp_path_factory.mktemp("conditions"), routes, clusters) as proxy:
            yield proxy, grpc_backend, h2_server


GRPC_CASES = [
    # (route case, the status the backend fails first attempts with, retried?)
    ("unavailable", "UNAVAILABLE", True),
    ("internal", "INTERNAL", True),
    ("resource-exhausted", "RESOURCE_EXHAUSTED", True),
    ("cancelled", "CANCELLED", True),
    ("deadline-exceeded", "DEADLINE_EXCEEDED", True),
    ("grpc-several", "UNAVAILABLE", True),
    ("unavailable", "INTERNAL", False),
    ("internal", "UNAVAILABLE", False),
    ("grpc-several", "RESOURCE_EXHAUSTED", False),
]


@pytest.mark.parametrize(("case", "status", "retried"), GRPC_CASES)
def test_grpc_status_retry_conditions(conditions, case: str, status: str, retried: bool):
    """The backend fails the first attempt of each request id with ``status`` (trailers-only, as
    grpcio sends an abort); 10 calls. A matching ``retry_on`` retries each once (2 backend calls
    per call, all succeed); another status is returned as is (1 backend call per call)."""
    proxy, backend, _ = conditions
    backend.set(fail_first_attempt=True, status=status)
    backend.reset()
    with channel(proxy.address) as ch:
        outcomes = [call(ch, request_id=f"{case}-{status}-{i}", case=case) for i in range(10)]
    calls = backend.calls
    report(f"retry_on {case} vs {status}: {codes(outcomes)}, backend calls {calls}")
    if retried:
        assert codes(outcomes) == {"OK": 10} and calls == 20, (codes(outcomes), calls)
    else:
        assert codes(outcomes) == {status: 10} and calls == 10, (codes(outcomes), calls)


H2_CASES = [
    # (route case, what the upstream does to odd-numbered requests, retried?)
    ("reset", "reset", True),
    ("5xx", "reset", True),
    ("5xx", "status:500", True),
    ("5xx", "status:503", True),
    ("gateway-error", "status:503", True),
    ("gateway-error", "status:502", True),
    ("503", "status:503", True),
    ("gateway-error", "status:500", False),
    ("503", "status:500", False),
    ("connect-failure", "reset", False),
    ("h2-internal", "reset", False),
]


@pytest.mark.parametrize(("case", "failure", "retried"), H2_CASES)
def test_reset_and_http_status_retry_conditions(conditions, case: str, failure: str, retried: bool):
    """The h2 upstream fails every odd-numbered request (RST_STREAM INTERNAL_ERROR, or an HTTP
    status); 10 plain HTTP/2 requests one at a time. Retried: each first attempt fails and its
    retry succeeds (20 upstream requests, all 200). Not retried: every other request gets the
    failure (a reset reaches an HTTP client as 503, as Envoy's UR)."""
    proxy, _, upstream = conditions
    upstream.reset(lambda k: failure if k % 2 else "ok")
    with H2Client(proxy.address) as client:
        responses = [client.request(f"/cond/{i}", headers=[("x-case", case)]) for i in range(10)]
    counts = upstream.counts()
    statuses = Counter((r.status, r.reset) for r in responses)
    report(f"retry_on {case} vs {failure}: {dict(statuses)}; upstream {counts}")
    if retried:
        assert statuses == {(200, None): 10} and counts["requests"] == 20, (statuses, counts)
    else:
        assert counts["requests"] == 10, counts
        assert statuses[(200, None)] == 5, statuses
        failed_status = 503 if failure == "reset" else int(failure[7:])
        assert statuses[(failed_status, None)] == 5, statuses


# == 4. what is never retried ================================================================


def test_no_retry_after_response_headers_went_downstream(tmp_path: Path, request: pytest.FixtureRequest):
    """A server-streaming call whose backend sends one message and then fails with UNAVAILABLE,
    with ``retry_on: [unavailable, reset, 5xx]``, 3 retries: the client gets the one message and
    the failure, and the backend saw each call once. The same method failing before any message
    (trailers-only) is retried and succeeds."""
    with FailingBackend("streamer", Behaviour(stream_fail_after=1)) as backend:
        routes = [route("s", retry=retry(["unavailable", "reset", "5xx"], 3))]
        with sidecar(tmp_path, routes, [cluster("s", backend.address)], request) as proxy:
            with channel(proxy.address) as ch:
                results = []
                for i in range(5):
                    got: list[bytes] = []
                    try:
                        stream = ch.unary_stream(STREAM)(
                            struct.pack(">I", 3), timeout=TIMEOUT, metadata=[("x-request-id", f"mid-{i}")]
                        )
                        for message in stream:
                            got.append(message)
                        results.append((len(got), "OK"))
                    except grpc.RpcError as error:
                        results.append((len(got), error.code().name))
                mid_calls = backend.calls
                backend.set(fail_first_attempt=True)
                backend.reset()
                before = []
                for i in range(5):
                    stream = ch.unary_stream(STREAM)(
                        struct.pack(">I", 3), timeout=TIMEOUT, metadata=[("x-request-id", f"pre-{i}")]
                    )
                    before.append(len(list(stream)))
                before_calls = backend.calls
    report(
        f"stream failing after 1 message: {Counter(results)}, backend calls {mid_calls} for 5; "
        f"failing before any message: messages {before}, backend calls {before_calls} for 5"
    )
    assert results == [(1, "UNAVAILABLE")] * 5, results
    assert mid_calls == 5, f"{mid_calls} backend calls for 5 calls: a call was retried after its headers went out"
    assert before == [3] * 5 and before_calls == 10, (before, before_calls)


def test_request_body_over_64k_is_not_retried(tmp_path: Path, request: pytest.FixtureRequest):
    """The backend fails the first attempt of each request id (UNAVAILABLE). A 60 KiB request is
    replayed whole (2 attempts, same size and CRC) and succeeds; an 80 KiB request, over the
    64 KiB replay buffer, is not retried: the failure is returned after one attempt. The 80 KiB
    request itself goes through when the backend does not fail."""
    small, big = bytes(range(256)) * 240, bytes(range(256)) * 320  # 60 KiB, 80 KiB
    with FailingBackend("bodies", Behaviour(fail_first_attempt=True)) as backend:
        routes = [route("b", retry=retry(["unavailable"], 2))]
        with sidecar(tmp_path, routes, [cluster("b", backend.address)], request) as proxy:
            with channel(proxy.address) as ch:
                small_out = [call(ch, body=small, request_id=f"small-{i}") for i in range(3)]
                small_calls = backend.stats()
                backend.reset()
                big_out = [call(ch, body=big, request_id=f"big-{i}") for i in range(3)]
                big_calls = backend.calls
                backend.set(Behaviour())
                big_ok = call(ch, body=big, request_id="big-ok")
    report(
        f"60 KiB bodies: {codes(small_out)} in {small_calls.calls} backend calls; "
        f"80 KiB bodies: {codes(big_out)} in {big_calls} backend calls; 80 KiB without failure: {big_ok.code.name}"
    )
    assert codes(small_out) == {"OK": 3} and small_calls.calls == 6, (codes(small_out), small_calls.calls)
    assert {(c.size, c.crc) for c in small_calls.records} == {(len(small), zlib.crc32(small))}, "replayed body differs"
    assert codes(big_out) == {"UNAVAILABLE": 3} and big_calls == 3, (codes(big_out), big_calls)
    assert all("injected failure" in o.details for o in big_out), big_out
    assert big_ok.ok, big_ok


# == 5. deadlines and per-try timeouts ======================================================


def test_grpc_deadline_across_retries(tmp_path: Path, request: pytest.FixtureRequest):
    """Two hanging backends, ``per_try_timeout: 0.03s``, 5 retries. A grpcio call with
    ``timeout=0.1`` ends with DEADLINE_EXCEEDED after 0.09-1 s; a raw gRPC request with
    ``grpc-timeout: 100m`` (no client-side deadline at all) gets DEADLINE_EXCEEDED from the proxy
    in the same window. The backends saw more than one attempt per call (the per-try timeout
    fired and retried), and every abandoned attempt was cancelled upstream."""
    policy = retry(["unavailable", "5xx", "deadline-exceeded"], 5, per_try_timeout="0.03s")
    with backends("h0", "h1", behaviour=Behaviour(hang=True)) as servers:
        routes = [route("hang", retry=policy)]
        with sidecar(tmp_path, routes, [cluster("hang", *(s.address for s in servers))], request) as proxy:
            with channel(proxy.address) as ch:
                call(ch, timeout=0.5, request_id="warm-up")  # connections up, so the 100 ms is all retries
                for s in servers:
                    s.reset()
                grpcio = call(ch, timeout=0.1, request_id="grpcio-deadline")
            grpcio_calls = sum(s.calls for s in servers)
            for s in servers:
                s.reset()
            with H2Client(proxy.address) as client:
                raw = client.grpc(extra=[("grpc-timeout", "100m"), ("x-request-id", "raw-deadline")], timeout=5)
            raw_calls = sum(s.calls for s in servers)
            all_cancelled = harness.poll_until(lambda: all(s.stats().cancelled == s.calls for s in servers), 5)
    report(
        f"deadline 100 ms, per-try 30 ms: grpcio {grpcio.code.name} after {grpcio.elapsed * 1000:.0f} ms, "
        f"{grpcio_calls} attempts; grpc-timeout 100m: grpc-status {raw.grpc_status} after "
        f"{raw.elapsed * 1000:.0f} ms, {raw_calls} attempts; abandoned attempts all cancelled: {all_cancelled}"
    )
    assert grpcio.code is grpc.StatusCode.DEADLINE_EXCEEDED, grpcio
    assert 0.09 <= grpcio.elapsed <= 1.0, grpcio.elapsed
    assert grpcio_calls > 1, f"{grpcio_calls} attempt(s): the per-try timeout did not retry"
    assert raw.status == 200 and raw.grpc_status == "4", raw
    assert 0.09 <= raw.elapsed <= 1.0, raw.elapsed
    assert raw_calls > 1, f"{raw_calls} attempt(s): the per-try timeout did not retry"
    assert all_cancelled, {s.name: (s.calls, s.stats().cancelled) for s in servers}


def test_route_timeout_across_retries(tmp_path: Path, request: pytest.FixtureRequest):
    """Hanging upstreams (a grpcio backend, and an h2 server for plain HTTP), route ``timeout:
    0.2s``, ``per_try_timeout: 0.05s``, 10 retries: a gRPC request (no grpc-timeout) gets
    DEADLINE_EXCEEDED and an HTTP request 504 with flag UT, each after 0.19-1.5 s, after several
    attempts, each cancelled upstream."""
    policy = retry(["5xx", "unavailable", "deadline-exceeded"], 10, per_try_timeout="0.05s")
    with FailingBackend("slow", Behaviour(hang=True)) as backend, H2FaultServer("slow-h2", delay=60) as plain:
        routes = [
            route("slow-h2", prefix="/plain", retry=policy, timeout="0.2s"),
            route("slow", retry=policy, timeout="0.2s"),
        ]
        clusters = [cluster("slow", backend.address), cluster("slow-h2", plain.address)]
        with sidecar(tmp_path, routes, clusters, request) as proxy:
            with H2Client(proxy.address) as client:
                client.grpc(timeout=5)  # warm-up: the connections up
                client.request("/plain/warm-up", timeout=5)
                warm = harness.poll_until(lambda: plain.counts()["cancelled"] == plain.counts()["requests"], 5)
                assert warm, f"the warm-up's attempts were not all cancelled upstream: {plain.counts()}"
                backend.reset()
                plain.reset()
                g = client.grpc(timeout=5)
                grpc_calls = backend.calls
                http = client.request("/plain", timeout=5)
            grpc_cancelled = harness.poll_until(lambda: backend.stats().cancelled == grpc_calls, 5)
            http_cancelled = harness.poll_until(lambda: plain.counts()["cancelled"] == plain.counts()["requests"], 5)
        http_counts = plain.counts()
    report(
        f"route timeout 200 ms, per-try 50 ms: gRPC grpc-status {g.grpc_status} after {g.elapsed * 1000:.0f} ms "
        f"({grpc_calls} attempts, all cancelled upstream: {grpc_cancelled}); HTTP {http.status} "
        f"{http.headers.get(FLAGS)} after {http.elapsed * 1000:.0f} ms ({http_counts['requests']} attempts, "
        f"{http_counts['cancelled']} cancelled upstream)"
    )
    assert g.status == 200 and g.grpc_status == "4", g
    assert 0.19 <= g.elapsed <= 1.5, g.elapsed
    assert grpc_calls > 1, f"{grpc_calls} attempt(s): the per-try timeout did not retry"
    assert http.status == 504 and http.headers.get(FLAGS) == "UT", http
    assert 0.19 <= http.elapsed <= 1.5, http.elapsed
    assert http_counts["requests"] > 1, http_counts
    assert grpc_cancelled and http_cancelled, (backend.stats(), http_counts)


def test_per_try_timeout_then_success_on_another_endpoint(tmp_path: Path, request: pytest.FixtureRequest):
    """Endpoint A hangs, endpoint B answers (round robin); ``per_try_timeout: 0.1s``, 2 retries.
    All 20 calls succeed, served by B; each request reached A at most once (the retry prefers
    another endpoint), and A's abandoned attempts were cancelled."""
    policy = retry(["unavailable", "5xx", "deadline-exceeded"], 2, per_try_timeout="0.1s")
    with FailingBackend("A", Behaviour(hang=True)) as a, FailingBackend("B") as b:
        clusters = [cluster("ab", a.address, b.address, lb_policy="ROUND_ROBIN")]
        with sidecar(tmp_path, [route("ab", retry=policy)], clusters, request) as proxy:
            with channel(proxy.address) as ch:
                outcomes = [call(ch, request_id=f"ab-{i}") for i in range(20)]
            cancelled = harness.poll_until(lambda: a.stats().cancelled == a.calls, 5)
        sa, sb = a.stats(), b.stats()
    slow = [o.elapsed for o in outcomes if o.elapsed >= 0.1]
    report(
        f"per-try timeout 100 ms, A hangs: {codes(outcomes)}, replies {Counter(o.reply for o in outcomes)}; "
        f"A saw {sa.calls} (cancelled {sa.cancelled}), B saw {sb.calls}; {len(slow)} calls took >= 100 ms"
    )
    assert codes(outcomes) == {"OK": 20} and all(o.reply == b"B" for o in outcomes), outcomes
    assert sb.calls == 20
    assert sa.calls >= 1, "A was never tried"
    ids = Counter(sa.request_ids())
    assert max(ids.values()) == 1, f"a request went back to the hanging endpoint: {ids.most_common(3)}"
    assert cancelled, (sa.calls, sa.cancelled)


def test_stream_idle_timeout(tmp_path: Path, request: pytest.FixtureRequest):
    """Listener ``stream_idle_timeout: 1s``, no route timeout, hanging upstreams. Before a
    response: a gRPC call gets DEADLINE_EXCEEDED and an HTTP request 408 with flag SI; after one
    (a server stream that sent one message and went quiet): the stream is reset (CANCEL), which a
    grpcio client reports as CANCELLED after its one message. Each after 1 s of silence, within
    2 s more (the proxy checks idleness periodically); the upstream streams are cancelled."""
    idle = 1.0
    with FailingBackend("quiet", Behaviour(hang=True)) as backend, H2FaultServer("quiet-h2", delay=60) as plain:
        routes = [route("quiet-h2", prefix="/plain"), route("quiet")]
        clusters = [cluster("quiet", backend.address), cluster("quiet-h2", plain.address)]
        with sidecar(tmp_path, routes, clusters, request, stream_idle_timeout=f"{idle}s") as proxy:
            backend.set(hang=True, stream_hang_after=1)  # Unary hangs at once; Stream after one message
            with channel(proxy.address) as ch, H2Client(proxy.address) as client:
                results: dict[str, object] = {}

                def unary() -> None:
                    results["before"] = call(ch, request_id="idle-before", timeout=TIMEOUT)

                def stream() -> None:
                    got: list[bytes] = []
                    start = time.monotonic()
                    try:
                        for message in ch.unary_stream(STREAM)(struct.pack(">I", 3), timeout=TIMEOUT):
                            got.append(message)
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                    results["after"] = (code, got, time.monotonic() - start)

                threads = [threading.Thread(target=unary), threading.Thread(target=stream)]
                for t in threads:
                    t.start()
                http = client.request("/plain/idle", timeout=TIMEOUT)  # meanwhile, on this thread
                for t in threads:
                    t.join(TIMEOUT)
            before: Outcome = results["before"]  # type: ignore[assignment]
            after_code, got, after_elapsed = results["after"]  # type: ignore[misc]
            cancelled = harness.poll_until(lambda: backend.stats().cancelled == backend.calls, 5)
    report(
        f"stream idle timeout {idle}s: gRPC before a response {before.code.name} after {before.elapsed:.2f}s; "
        f"stream after 1 message {after_code} ({len(got)} messages) after {after_elapsed:.2f}s; HTTP "
        f"{http.status} {http.headers.get(FLAGS)!r} after {http.elapsed:.2f}s"
    )
    assert before.code is grpc.StatusCode.DEADLINE_EXCEEDED, before
    assert idle - 0.05 <= before.elapsed <= idle + 2.0, before.elapsed
    assert (after_code, len(got)) == ("CANCELLED", 1), (after_code, got)
    assert idle - 0.05 <= after_elapsed <= idle + 2.0, after_elapsed
    assert http.status == 408 and http.headers.get(FLAGS) == "SI", http
    assert idle - 0.05 <= http.elapsed <= idle + 2.0, http.elapsed
    assert cancelled, backend.stats()


def test_connection_idle_timeout(tmp_path: Path, request: pytest.FixtureRequest):
    """Listener ``idle_timeout: 1s``: a downstream connection that has had no stream for 1 s is
    sent GOAWAY and closed (within 2 s more; the proxy checks idleness periodically)."""
    idle = 1.0
    with FailingBackend("idle") as backend:
        with sidecar(
            tmp_path, [route("idle")], [cluster("idle", backend.address)], request, idle_timeout=f"{idle}s"
        ) as proxy:
            with H2Client(proxy.address) as client:
                response = client.grpc()
                ended = time.monotonic()
                goaway = False
                buffer = bytearray()
                client.sock.settimeout(idle + 5)
                while True:  # read raw frames until the proxy closes (the h2 library stops at GOAWAY)
                    try:
                        data = client.sock.recv(65536)
                    except (TimeoutError, ConnectionError):
                        data = b""
                    if not data:
                        break
                    buffer += data
                    while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                        size, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                        goaway = goaway or kind == 0x7
                        if kind == 0x6 and not flags & 0x1:  # PING: ACK it, as any client would
                            with contextlib.suppress(OSError):
                                client.sock.sendall(b"\0\0\x08\x06\x01\0\0\0\0" + bytes(buffer[9 : 9 + size]))
                        del buffer[: 9 + size]
                closed_after = time.monotonic() - ended
    report(f"connection idle timeout {idle}s: GOAWAY {goaway}, closed {closed_after:.2f}s after the last stream")
    assert response.grpc_status == "0", response
    assert goaway, "no GOAWAY before the close"
    assert idle - 0.05 <= closed_after <= idle + 2.0, closed_after


# == 6. circuit breakers ===================================================================


def _metadata_flags(outcome: Outcome) -> set[str]:
    return set(filter(None, outcome.flags.split(",")))


def test_circuit_breaker_max_requests(tmp_path: Path, request: pytest.FixtureRequest):
    """``max_requests: 2`` and a hanging backend: with two calls in flight, a third gRPC call gets
    UNAVAILABLE at once with flag UO, and an HTTP request 503 with UO; the backend never sees
    them. Once the two end, calls go through again."""
    with FailingBackend("cb", Behaviour(hang=True)) as backend:
        clusters = [cluster("cb", backend.address, circuit_breakers={"max_requests": 2})]
        with sidecar(tmp_path, [route("cb")], clusters, request) as proxy:
            with channel(proxy.address) as ch:
                hung = [ch.unary_unary(UNARY).future(b"hang", timeout=TIMEOUT) for _ in range(2)]
                assert harness.poll_until(lambda: backend.calls == 2, 5), backend.calls
                over = call(ch, request_id="over")
                with H2Client(proxy.address) as client:
                    http = client.request("/over", timeout=5)
                seen = backend.calls
                for f in hung:
                    f.cancel()
                backend.set(Behaviour())
                assert harness.poll_until(lambda: backend.stats().cancelled == 2, 5), backend.stats()
                after = call(ch, request_id="after")
    report(
        f"max_requests 2: 3rd call {over.code.name} flags {over.flags!r} after {over.elapsed * 1000:.0f} ms; "
        f"HTTP {http.status} {http.headers.get(FLAGS)!r} after {http.elapsed * 1000:.0f} ms; "
        f"backend saw {seen}; after: {after.code.name}"
    )
    assert over.code is grpc.StatusCode.UNAVAILABLE and "UO" in _metadata_flags(over), over
    assert over.elapsed < 1.0, f"not at once: {over.elapsed:.2f}s"
    assert http.status == 503 and http.headers.get(FLAGS) == "UO", http
    assert seen == 2, f"the backend saw {seen} calls"
    assert after.ok, after


def test_circuit_breaker_max_retries(tmp_path: Path, request: pytest.FixtureRequest):
    """``max_retries: 1``; the backend fails the first attempt of each request (UNAVAILABLE) and
    answers retries after 0.5 s. Two calls at once: one retry is sent (and succeeds), the other
    is over the limit and its original failure is returned; the backend saw 3 calls."""
    with FailingBackend("mr", Behaviour(fail_first_attempt=True, delay=0.5)) as backend:
        clusters = [cluster("mr", backend.address, circuit_breakers={"max_retries": 1})]
        routes = [route("mr", retry=retry(["unavailable"], 2))]
        with sidecar(tmp_path, routes, clusters, request) as proxy:
            with channel(proxy.address) as ch:
                call(ch, request_id="warm-up")
                backend.reset()
                results: list[Outcome] = []
                threads = [
                    threading.Thread(target=lambda i=i: results.append(call(ch, request_id=f"mr-{i}")))
                    for i in range(2)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(TIMEOUT)
        calls = backend.calls
    report(f"max_retries 1, two failing calls at once: {codes(results)}, backend calls {calls}")
    assert codes(results) == {"OK": 1, "UNAVAILABLE": 1}, results
    assert calls == 3, calls
    failed = next(o for o in results if not o.ok)
    assert "injected failure" in failed.details, failed


def test_circuit_breaker_max_pending_requests(tmp_path: Path, request: pytest.FixtureRequest):
    """``max_connections: 1``, one stream per connection, ``max_pending_requests: 1`` and a
    hanging backend: the first call takes the only stream; the second waits for a connection
    (pending); the third is over the pending limit and gets UNAVAILABLE with UO at once. The
    backend sees one call. When the first call is cancelled by its client, its stream is free
    and the pending second call goes out and succeeds (or, if the connection limit itself
    answers at once, it had already failed with UO)."""
    with FailingBackend("pend", Behaviour(hang=True)) as backend:
        breakers = {"max_connections": 1, "max_pending_requests": 1}
        clusters = [
            cluster("pend", backend.address, max_concurrent_streams_per_connection=1, circuit_breakers=breakers)
        ]
        with sidecar(tmp_path, [route("pend")], clusters, request) as proxy:
            with channel(proxy.address) as ch:
                first = ch.unary_unary(UNARY).future(b"first", timeout=TIMEOUT)
                assert harness.poll_until(lambda: backend.calls == 1, 5), backend.calls
                second_box: list[Outcome] = []
                second_thread = threading.Thread(
                    target=lambda: second_box.append(call(ch, request_id="second", timeout=3))
                )
                second_thread.start()
                time.sleep(0.2)
                third = call(ch, request_id="third")
                seen = backend.calls
                backend.set(Behaviour())
                first.cancel()
                second_thread.join(TIMEOUT)
                second = second_box[0]
    report(
        f"max_pending 1: third {third.code.name} {third.flags!r} after {third.elapsed * 1000:.0f} ms; "
        f"second {second.code.name} {second.flags!r} {second.details!r} after {second.elapsed:.2f}s"
    )
    assert third.code is grpc.StatusCode.UNAVAILABLE and "UO" in _metadata_flags(third), third
    assert third.elapsed < 1.0, third.elapsed
    assert seen == 1, seen
    if not (second.code is grpc.StatusCode.UNAVAILABLE and "UO" in _metadata_flags(second)):
        assert second.ok, f"the pending request was not sent once the first call's stream was free: {second}"


# == 7. outlier detection ==================================================================


def test_outlier_ejection_and_return(tmp_path: Path, request: pytest.FixtureRequest):
    """Three endpoints (round robin), one failing every call with INTERNAL; ``consecutive_5xx: 3``,
    ``base_ejection_time: 1s``, ``interval: 0.25s``, ``max_ejection_percent: 34`` (one of three:
    100 x 1 <= 34 x 3). Calls one at a time, every 20 ms while it is out: the bad endpoint gets
    exactly 3 calls, then none while ejected; it comes back once its time is up, within one
    ``interval`` (how often ejections are checked for their end) plus 0.35 s of slack; it gets
    exactly 3 more calls and is ejected again, for 2 x 1 s unless a full interval of health has
    lowered the multiplier in between."""
    base, interval, slack = 1.0, 0.25, 0.35
    outlier = {
        "consecutive_5xx": 3,
        "interval": f"{interval}s",
        "base_ejection_time": f"{base}s",
        "max_ejection_time": "10s",
        "max_ejection_percent": 34,
    }
    with backends("good0", "good1") as goods, FailingBackend("bad", Behaviour(fail_every=1, status="INTERNAL")) as bad:
        addresses = [goods[0].address, bad.address, goods[1].address]
        clusters = [cluster("od", *addresses, lb_policy="ROUND_ROBIN", outlier_detection=outlier)]
        with sidecar(tmp_path, [route("od")], clusters, request) as proxy:
            with channel(proxy.address) as ch:
                timeline: list[tuple[float, int]] = []  # (time a call ended, the bad endpoint's calls by then)
                counter = itertools.count()

                def step(pause: float = 0.0) -> None:
                    call(ch, request_id=f"od-{next(counter)}")
                    timeline.append((time.monotonic(), bad.calls))
                    time.sleep(pause)

                def until_calls(target: int, limit: int = 30) -> float:
                    """Calls back to back until the bad endpoint has ``target`` calls; when it did."""
                    for _ in range(limit):
                        if bad.calls >= target:
                            break
                        step()
                    return timeline[-1][0]

                def until_back(since: float, calls: int, limit: float) -> tuple[float | None, int]:
                    """Calls every 20 ms until the bad endpoint gets one more than ``calls``."""
                    mark, made = len(timeline), 0
                    while bad.calls == calls and time.monotonic() - since < limit:
                        step(0.02)
                        made += 1
                    back = next((t for t, n in timeline[mark:] if n > calls), None)
                    return (None if back is None else back - since), made

                ejected_at = until_calls(3)
                first_run = bad.calls
                first, during = until_back(ejected_at, first_run, 6)
                returned_at = timeline[-1][0]
                second_ejected_at = until_calls(first_run + 3)
                second_run = bad.calls
                second, _ = until_back(second_ejected_at, second_run, 8)
    healthy_for = second_ejected_at - (ejected_at + base)
    report(
        f"outlier: ejected after {first_run} failures; {during} calls while ejected; back after "
        f"{first if first is None else f'{first:.2f}s'} (base {base}s, interval {interval}s); ejected again "
        f"after {second_run - first_run} more failures, {second_ejected_at - returned_at:.3f}s after its return; "
        f"second ejection lasted {second if second is None else f'{second:.2f}s'} (2 x base unless decayed)"
    )
    assert first_run == 3, f"the bad endpoint got {first_run} calls before its ejection"
    assert first is not None, "the ejected endpoint never came back"
    assert first >= base - 0.05, f"not ejected after 3 failures: it got a call {first:.2f}s later ({during} calls)"
    assert during >= 20, f"only {during} calls while ejected: too few to tell"
    assert first <= base + interval + slack, (
        f"came back after {first:.2f}s: more than base_ejection_time {base}s + interval {interval}s + {slack}s"
    )
    assert second_run - first_run == 3, f"{second_run - first_run} failures for the second ejection"
    assert second is not None, "never came back from the second ejection"
    if healthy_for < interval - 0.05:
        assert second >= 2 * base - 0.05, f"second ejection {second:.2f}s; expected 2 x {base}s"
    else:
        assert second >= base - 0.05, f"second ejection {second:.2f}s"
    assert second <= 2 * base + interval + slack, (
        f"second ejection {second:.2f}s: more than 2 x {base}s + interval {interval}s + {slack}s"
    )


@pytest.mark.parametrize("split", [False, True])
def test_outlier_ejection_by_resets(tmp_path: Path, request: pytest.FixtureRequest, split: bool):
    """Local-origin failures: one of three h2 endpoints resets every stream (round robin, no
    retry policy, 30 calls one at a time). Without ``split_external_local_origin_errors`` the
    resets count as 5xx and ``consecutive_5xx: 3`` ejects it after exactly 3; with the split
    they count only towards ``consecutive_local_origin_failures`` (unset: 5): exactly 5."""
    outlier = {
        "consecutive_5xx": 3,
        "split_external_local_origin_errors": split,
        "interval": "1s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 50,
    }
    with (
        H2FaultServer("ok0") as ok0,
        H2FaultServer("resets", action=lambda k: "reset") as bad,
        H2FaultServer("ok1") as ok1,
    ):
        clusters = [
            cluster("od", ok0.address, bad.address, ok1.address, lb_policy="ROUND_ROBIN", outlier_detection=outlier)
        ]
        with sidecar(tmp_path, [route("od")], clusters, request) as proxy:
            with channel(proxy.address) as ch:
                outcomes = [call(ch, request_id=f"reset-{i}") for i in range(30)]
        counts = bad.counts()
    expected = 5 if split else 3
    report(f"outlier by resets (split {split}): resetting endpoint got {counts['requests']} calls; {codes(outcomes)}")
    assert counts["requests"] == expected, f"{counts['requests']} resets before the ejection; expected {expected}"
    assert codes(outcomes) == {"OK": 30 - expected, "UNAVAILABLE": expected}, codes(outcomes)


def test_outlier_max_ejection_percent(tmp_path: Path, request: pytest.FixtureRequest):
    """The same with ``max_ejection_percent: 10`` (Envoy >= 1.27: the share after the ejection,
    33%, must not exceed it): the failing endpoint is never ejected and keeps its third of 30
    calls."""
    outlier = {"consecutive_5xx": 3, "interval": "0.1s", "base_ejection_time": "1s", "max_ejection_percent": 10}
    with backends("good0", "good1") as goods, FailingBackend("bad", Behaviour(fail_every=1, status="INTERNAL")) as bad:
        addresses = [goods[0].address, bad.address, goods[1].address]
        clusters = [cluster("od", *addresses, lb_policy="ROUND_ROBIN", outlier_detection=outlier)]
        with sidecar(tmp_path, [route("od")], clusters, request) as proxy:
            with channel(proxy.address) as ch:
                outcomes = [call(ch, request_id=f"pct-{i}") for i in range(30)]
        calls = bad.calls
    report(f"max_ejection_percent 10 of 3 endpoints: bad endpoint got {calls} of 30 calls, {codes(outcomes)}")
    assert calls == 10, calls


# == 8. fault injection ====================================================================


def test_fault_abort(tmp_path: Path, request: pytest.FixtureRequest):
    """``fault.abort.grpc_status: 14`` (percentage unset: 100): every gRPC call gets UNAVAILABLE
    (trailers-only) with flag FI and the backend sees nothing. ``http_status: 503`` at 30% over
    300 plain HTTP requests (to an h2 upstream) aborts a binomial share (5 sigma), each 503 with
    FI; the upstream sees exactly the others."""
    n = 300
    with FailingBackend("f") as backend, H2FaultServer("f-h2") as plain:
        routes = [
            route("f", case="grpc-abort", fault={"abort": {"grpc_status": 14}}),
            route("f-h2", case="http-abort", fault={"abort": {"http_status": 503, "percentage": 30}}),
        ]
        clusters = [cluster("f", backend.address), cluster("f-h2", plain.address)]
        with sidecar(tmp_path, routes, clusters, request) as proxy:
            with channel(proxy.address) as ch:
                aborted = [call(ch, case="grpc-abort") for _ in range(20)]
            with H2Client(proxy.address) as client:
                raw = client.grpc(extra=[("x-case", "grpc-abort")])
            grpc_seen = backend.calls
            statuses: Counter = Counter()
            with H2Client(proxy.address) as client:
                for batch in range(n // 20):
                    ids = [client.send(f"/fault/{batch}/{i}", headers=[("x-case", "http-abort")]) for i in range(20)]
                    for r in client.wait(ids):
                        statuses[(r.status, r.headers.get(FLAGS))] += 1
        http_seen = plain.counts()["requests"]
    low, high = binomial_bounds(n, 0.3)
    report(
        f"fault abort: gRPC 100% {codes(aborted)} flags {Counter(o.flags for o in aborted)}, backend saw {grpc_seen}; "
        f"HTTP 30% of {n}: {dict(statuses)} (expected {n * 0.3:.0f}, 5-sigma [{low:.0f}, {high:.0f}]), "
        f"upstream saw {http_seen}"
    )
    assert codes(aborted) == {"UNAVAILABLE": 20}, aborted
    assert all("FI" in _metadata_flags(o) for o in aborted), aborted
    trailers_only = raw.status == 200 and raw.headers.get("grpc-status") == "14" and not raw.body and not raw.trailers
    assert trailers_only, f"not a trailers-only grpc-status 14: {raw}"
    assert grpc_seen == 0
    aborted_http = statuses[(503, "FI")]
    assert low <= aborted_http <= high, statuses
    assert statuses == {(503, "FI"): aborted_http, (200, None): n - aborted_http}, statuses
    assert http_seen == n - aborted_http, (statuses, http_seen)


def test_fault_delay(tmp_path: Path, request: pytest.FixtureRequest):
    """``fault.delay.fixed_delay: 0.3s``: at 100% every call takes at least 0.3 s and succeeds; at
    50%, of 40 concurrent calls a binomial share (4 sigma) takes 0.3 s or more."""
    with FailingBackend("fd") as backend:
        routes = [
            route("fd", case="all", fault={"delay": {"fixed_delay": "0.3s"}}),
            route("fd", case="half", fault={"delay": {"fixed_delay": "0.3s", "percentage": 50}}),
        ]
        with sidecar(tmp_path, routes, [cluster("fd", backend.address)], request) as proxy:
            with channel(proxy.address) as ch:
                every = [call(ch, case="all") for _ in range(5)]
            half = load(proxy.address, 40, threads=40, prefix="half", case="half")
        calls = backend.calls
    delayed = sum(o.elapsed >= 0.3 for o in half)
    low, high = binomial_bounds(40, 0.5, 4)
    report(
        f"fault delay 0.3s: 100%: {codes(every)}, min {min(o.elapsed for o in every) * 1000:.0f} ms, flags "
        f"{Counter(o.flags for o in every)}; 50%: {delayed} of 40 delayed (4-sigma [{low:.0f}, {high:.0f}]), "
        f"{codes(half)}"
    )
    assert codes(every) == {"OK": 5} and all(o.elapsed >= 0.3 for o in every), every
    assert codes(half) == {"OK": 40}
    assert low <= delayed <= high, delayed
    assert calls == 45
