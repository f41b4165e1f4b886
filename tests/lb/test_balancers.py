"""Each balancer's behaviour on both twins: fairness, steering, peak-EWMA, consistent hashing, splits, availability."""

from __future__ import annotations

import heapq
from collections import Counter

import pytest

pytestmark = pytest.mark.lb

MS = 1_000_000
SEC = 1_000_000_000

# Chi-square critical values at p = 0.001 by degrees of freedom (from the
# chi-square table). The seeds are fixed, so these tests are deterministic;
# the bound says a fair balancer would fail them for only 1 seed in 1000, so a
# failure after a change means the distribution broke, not bad luck.
CHI2_999 = {4: 18.467, 9: 27.877}


def chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def tally(pick, picks: int, n: int) -> list[int]:
    got = Counter(pick() for _ in range(picks))
    return [got[i] for i in range(n)]


# --- round robin -------------------------------------------------------------


def test_round_robin_visits_each_endpoint_once_per_cycle(twin):
    rr = twin.balancer.RoundRobin(5, seed=3)
    first = [rr.pick() for _ in range(5)]
    assert sorted(first) == [0, 1, 2, 3, 4]
    assert [(first[0] + k) % 5 for k in range(5)] == first
    assert [rr.pick() for _ in range(10)] == first * 2


def test_round_robin_start_depends_on_the_seed(twin):
    starts = {twin.balancer.RoundRobin(16, seed=s).pick() for s in range(32)}
    assert len(starts) > 4


def test_round_robin_skips_unavailable(twin):
    rr = twin.balancer.RoundRobin(4, seed=0)
    rr.set_available(1, False)
    rr.set_available(2, False)
    assert set(rr.pick() for _ in range(8)) == {0, 3}


# --- random and the power of two choices -----------------------------------


def test_random_is_uniform(twin):
    counts = tally(twin.balancer.Random(5, seed=11).pick, 50_000, 5)
    assert chi_square(counts) < CHI2_999[4], counts


def test_random_is_uniform_over_available_endpoints(twin):
    r = twin.balancer.Random(10, seed=12)
    r.set_available(0, False)
    r.set_available(7, False)
    got = Counter(r.pick() for _ in range(40_000))
    assert set(got) == {1, 2, 3, 4, 5, 6, 8, 9}
    # 8 endpoints: 7 degrees of freedom; p = 0.001 critical value 24.322.
    assert chi_square(list(got.values())) < 24.322, got


def test_least_request_is_uniform_when_idle(twin):
    # Every pick finishes at once: all counts tie and the first drawn of two
    # distinct uniform draws wins, which is itself uniform.
    lr = twin.balancer.LeastRequest(10, seed=13)
    got = [0] * 10
    for _ in range(50_000):
        i = lr.pick()
        lr.start(i)
        lr.finish(i)
        got[i] += 1
    assert chi_square(got) < CHI2_999[9], got


def test_p2c_draws_two_distinct_endpoints(twin):
    # With one endpoint busy and every other idle, the busy one can only win
    # against itself: never, if the two draws are distinct.
    lr = twin.balancer.LeastRequest(3, seed=14)
    lr.start(2)
    assert 2 not in {lr.pick() for _ in range(5_000)}
    assert lr.outstanding(2) == 1


def test_least_request_prefers_fewer_outstanding(twin):
    lr = twin.balancer.LeastRequest(2, seed=15)
    lr.start(0)
    assert {lr.pick() for _ in range(100)} == {1}
    lr.start(1)
    lr.start(1)
    assert {lr.pick() for _ in range(100)} == {0}


def simulate(balancer, kind: str, n: int = 4, slow: int = 0, warmup: int = 1_000, measured: int = 10_000) -> list[int]:
    """Requests every 2 ms on a fake clock; endpoint ``slow`` answers in 100 ms, the others in 10 ms.

    Returns how many of the ``measured`` picks after ``warmup`` went to each endpoint.
    """
    b = balancer.PeakEwma(n, seed=7) if kind == "ewma" else balancer.LeastRequest(n, seed=7)
    in_flight: list[tuple[int, int, int]] = []
    picks = [0] * n
    now = 0
    for k in range(warmup + measured):
        now += 2 * MS
        while in_flight and in_flight[0][0] <= now:
            done, i, rtt = heapq.heappop(in_flight)
            if kind == "ewma":
                b.finish(i, rtt, done)
            else:
                b.finish(i)
        i = b.pick(now) if kind == "ewma" else b.pick()
        b.start(i)
        rtt = 100 * MS if i == slow else 10 * MS
        heapq.heappush(in_flight, (now + rtt, i, rtt))
        if k >= warmup:
            picks[i] += 1
    return picks


@pytest.mark.parametrize("kind", ["least_request", "ewma"])
def test_p2c_steers_away_from_a_slow_endpoint(twin, kind):
    # A fair share would be 25%; the slow endpoint piles up requests in flight
    # (least request) or a 10x RTT estimate (peak EWMA), and loses most draws.
    picks = simulate(twin.balancer, kind)
    assert picks[0] < 0.20 * sum(picks), picks
    fast = picks[1:]
    assert max(fast) - min(fast) < 0.05 * sum(picks), picks


# --- peak EWMA ---------------------------------------------------------------


def test_peak_ewma_unsampled_endpoint_costs_the_default(twin):
    pe = twin.balancer.PeakEwma(3, default_rtt_ns=30 * MS, seed=1)
    assert pe.rtt_estimate(0, 10 * SEC) == 30 * MS
    pe.start(0)
    pe.start(0)
    assert pe.cost(0, 10 * SEC) == 3 * 30 * MS
    assert pe.outstanding(0) == 2


def test_peak_ewma_first_sample_replaces_the_default(twin):
    pe = twin.balancer.PeakEwma(2, default_rtt_ns=30 * MS, seed=1)
    pe.start(0)
    pe.finish(0, 5 * MS, SEC)
    assert pe.rtt_estimate(0, SEC) == 5 * MS


def test_peak_ewma_one_slow_sample_raises_the_cost_at_once(twin):
    pe = twin.balancer.PeakEwma(2, seed=2)
    now = SEC
    for _ in range(50):
        now += 10 * MS
        for i in (0, 1):
            pe.start(i)
            pe.finish(i, 10 * MS, now)
    assert {pe.pick(now) for _ in range(20)} == {0, 1}
    pe.start(0)
    pe.finish(0, 500 * MS, now)
    assert pe.rtt_estimate(0, now) == 500 * MS
    assert pe.cost(0, now) == 50 * pe.cost(1, now)
    assert {pe.pick(now) for _ in range(100)} == {1}


def test_peak_ewma_decays_back_to_fast_samples(twin):
    decay = 10 * SEC
    pe = twin.balancer.PeakEwma(1, decay_ns=decay, seed=3)
    pe.start(0)
    pe.finish(0, SEC, 0)
    # A fast sample one tenth of a decay period later moves the estimate only
    # by 1 - exp(-0.1), about 10% of the way: it is an average, not a reset.
    pe.start(0)
    pe.finish(0, 10 * MS, decay // 10)
    assert 0.89 * SEC < pe.rtt_estimate(0, decay // 10) < 0.91 * SEC
    # Ten decay periods of fast samples: the slow one weighs exp(-10) of it.
    now = decay // 10
    for _ in range(99):
        now += decay // 10
        pe.start(0)
        pe.finish(0, 10 * MS, now)
    assert 10 * MS <= pe.rtt_estimate(0, now) < 10.1 * MS


def test_peak_ewma_idle_estimate_decays_towards_zero(twin):
    # An endpoint that lost every comparison is tried again once its old
    # estimate has faded below its rivals' (as in linkerd2-proxy).
    decay = 10 * SEC
    pe = twin.balancer.PeakEwma(2, decay_ns=decay, seed=4)
    pe.start(0)
    pe.finish(0, 400 * MS, 0)
    assert pe.rtt_estimate(0, 0) == 400 * MS
    assert pe.rtt_estimate(0, 2 * decay) == pytest.approx(400 * MS * 0.1353352832366127, rel=1e-12)
    # A clock that went backwards does not inflate the estimate.
    assert pe.rtt_estimate(0, -SEC) == 400 * MS
    # Endpoint 1 never sampled costs the default (30 ms): 0 is cheaper after 3 decay periods.
    assert {pe.pick(3 * decay) for _ in range(20)} == {0}


def test_peak_ewma_finish_checks_its_arguments(twin):
    pe = twin.balancer.PeakEwma(2, seed=5)
    with pytest.raises(ValueError, match="without a matching start"):
        pe.finish(0, MS, 0)
    pe.start(0)
    with pytest.raises(ValueError, match="rtt_ns"):
        pe.finish(0, -1, 0)
    with pytest.raises(ValueError, match="decay_ns"):
        twin.balancer.PeakEwma(2, decay_ns=0)


# --- ring hash ---------------------------------------------------------------

KEYS = [f"user-{k}".encode() for k in range(20_000)]


def test_hash_key_is_pinned(twin):
    # Ring positions must agree across sidecars, versions and twins: a change
    # here re-homes every session in the mesh.
    assert twin.balancer.hash_key(b"") == 0xF52A15E9A9B5E89B
    assert twin.balancer.hash_key(b"abc") == 0x0DD490490804B508
    assert twin.balancer.hash_key(b"user-1") == 0xC499B5F8A721DF58


def test_ring_hash_is_stable_and_spreads_keys(twin):
    ring = twin.balancer.RingHash(8)
    assert ring.points == 8 * 1024
    first = [ring.pick(k) for k in KEYS]
    again = twin.balancer.RingHash(8)
    assert [again.pick(k) for k in KEYS] == first
    # 1024 points each: every share within 15% of fair (about 5 standard
    # deviations of the arc lengths' sum).
    counts = Counter(first)
    assert all(abs(counts[i] - len(KEYS) / 8) < 0.15 * len(KEYS) / 8 for i in range(8)), counts


def test_ring_hash_adding_an_endpoint_moves_about_one_in_n(twin):
    before = twin.balancer.RingHash(10)
    after = twin.balancer.RingHash(11)
    moved = [(before.pick(k), after.pick(k)) for k in KEYS if before.pick(k) != after.pick(k)]
    # Existing points stay put: a key moves only if the new endpoint took it.
    assert {new for _, new in moved} == {10}
    assert 0.6 / 11 < len(moved) / len(KEYS) < 1.4 / 11


def test_ring_hash_unavailable_endpoint_moves_only_its_own_keys(twin):
    ring = twin.balancer.RingHash(6)
    first = [ring.pick(k) for k in KEYS]
    ring.set_available(2, False)
    second = [ring.pick(k) for k in KEYS]
    for a, b in zip(first, second, strict=True):
        assert b == a if a != 2 else b != 2
    ring.set_available(2, True)
    assert [ring.pick(k) for k in KEYS] == first


def test_ring_hash_weights(twin):
    ring = twin.balancer.RingHash(3, weights=[2, 1, 0])
    assert ring.points == 1024 + 512
    counts = Counter(ring.pick(k) for k in KEYS)
    assert 2 not in counts
    assert 0.6 < counts[0] / len(KEYS) < 0.73, counts
    # Weight 0 has no point on the ring: marking it available changes nothing.
    ring.set_available(2, True)
    assert not ring.is_available(2)
    with pytest.raises(ValueError, match="all ring weights are 0"):
        twin.balancer.RingHash(2, weights=[0, 0])
    with pytest.raises(ValueError, match="2 weights for 3 endpoints"):
        twin.balancer.RingHash(3, weights=[1, 1])


def test_ring_hash_takes_bytes_only(twin):
    ring = twin.balancer.RingHash(2)
    with pytest.raises(TypeError):
        ring.pick("text")  # type: ignore[arg-type]


# --- weighted split ----------------------------------------------------------


def test_split_80_20_is_exact_and_smooth(twin):
    split = twin.balancer.WeightedSplit([80, 20])
    seen = [0, 0]
    for k in range(1, 10_001):
        seen[split.pick()] += 1
        # Smooth: no prefix strays a whole pick from the ideal share.
        assert abs(seen[0] - 0.8 * k) < 1 + 1e-9, (k, seen)
    assert seen == [8_000, 2_000]


def test_split_is_exact_every_cycle(twin):
    weights = [5, 3, 0, 2]
    split = twin.balancer.WeightedSplit(weights)
    for _ in range(20):
        assert Counter(split.pick() for _ in range(10)) == {0: 5, 1: 3, 3: 2}


def test_split_interleaves(twin):
    # nginx's own example: weights 5, 1, 1 give a a b a c a a.
    split = twin.balancer.WeightedSplit([5, 1, 1])
    assert [split.pick() for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_split_prefix_bound_for_many_weights(twin):
    weights = [7, 5, 3, 2, 1]
    total = sum(weights)
    split = twin.balancer.WeightedSplit(weights)
    seen = [0] * len(weights)
    for k in range(1, 50 * total + 1):
        seen[split.pick()] += 1
        for i, w in enumerate(weights):
            assert abs(seen[i] - k * w / total) < len(weights), (k, seen)


def test_split_skips_unavailable_and_rejects_all_zero(twin):
    split = twin.balancer.WeightedSplit([3, 1, 1])
    split.set_available(0, False)
    assert Counter(split.pick() for _ in range(100)) == {1: 50, 2: 50}
    split.set_available(1, False)
    split.set_available(2, False)
    assert split.pick() == -1
    with pytest.raises(ValueError, match="all split weights are 0"):
        twin.balancer.WeightedSplit([0, 0])
    with pytest.raises(ValueError, match="at least one weight"):
        twin.balancer.WeightedSplit([])


# --- availability, shared by all --------------------------------------------


def every_balancer(balancer, n: int) -> list[tuple[str, object, object]]:
    """(name, balancer, pick-once function) for each kind, with ``n`` endpoints."""
    keys = iter(range(10**9))
    rr, rnd, lr = balancer.RoundRobin(n, seed=1), balancer.Random(n, seed=1), balancer.LeastRequest(n, seed=1)
    pe, ring, split = balancer.PeakEwma(n, seed=1), balancer.RingHash(n), balancer.WeightedSplit([1] * n)
    return [
        ("RoundRobin", rr, rr.pick),
        ("Random", rnd, rnd.pick),
        ("LeastRequest", lr, lr.pick),
        ("PeakEwma", pe, lambda: pe.pick(SEC)),
        ("RingHash", ring, lambda: ring.pick(b"k%d" % next(keys))),
        ("WeightedSplit", split, split.pick),
    ]


def test_unavailable_endpoints_are_never_picked(twin):
    for name, b, pick in every_balancer(twin.balancer, 6):
        assert len(b) == 6
        for i in (0, 3, 5):
            b.set_available(i, False)
        assert b.available == 3
        assert {pick() for _ in range(600)} == {1, 2, 4}, name
        b.set_available(3, True)
        b.set_available(3, True)  # idempotent
        assert b.available == 4
        assert {pick() for _ in range(600)} == {1, 2, 3, 4}, name


def test_pick_returns_minus_one_when_none_is_available(twin):
    for name, b, pick in every_balancer(twin.balancer, 3):
        for i in range(3):
            b.set_available(i, False)
            b.set_available(i, False)  # idempotent
        assert b.available == 0
        assert {pick() for _ in range(10)} == {-1}, name
        b.set_available(1, True)
        assert {pick() for _ in range(10)} == {1}, name


def test_single_endpoint(twin):
    for name, _b, pick in every_balancer(twin.balancer, 1):
        assert {pick() for _ in range(10)} == {0}, name


# --- argument checks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda m: m.RoundRobin(0), "n must be between 1"),
        (lambda m: m.Random(-1), "n must be between 1"),
        (lambda m: m.LeastRequest(0), "n must be between 1"),
        (lambda m: m.PeakEwma(0), "n must be between 1"),
        (lambda m: m.RingHash(0), "n must be between 1"),
        (lambda m: m.Random(2, seed=-1), "seed must be >= 0"),
        (lambda m: m.RingHash(2, weights=[1, -1]), "ring weight 1 is negative"),
        (lambda m: m.RingHash(2, ring_size=0), "ring_size must be between 1"),
        (lambda m: m.WeightedSplit([80, -20]), "split weight 1 is negative"),
        (lambda m: m.PeakEwma(2, default_rtt_ns=-1), "default_rtt_ns must be >= 0"),
        (lambda m: m.Random(2).set_available(2, False), "endpoint 2 out of range for 2 endpoints"),
        (lambda m: m.Random(2).set_available(-1, True), "endpoint -1 out of range"),
        (lambda m: m.Random(2).is_available(5), "endpoint 5 out of range"),
        (lambda m: m.LeastRequest(2).start(2), "endpoint 2 out of range"),
        (lambda m: m.LeastRequest(2).finish(0), "finish\\(0\\) without a matching start\\(0\\)"),
        (lambda m: m.PeakEwma(2).finish(3, 1, 1), "endpoint 3 out of range"),
        (lambda m: m.WeightedSplit([1]).set_available(1, True), "endpoint 1 out of range for 1 endpoints"),
    ],
)
def test_bad_arguments_raise_value_error(twin, make, reason):
    with pytest.raises(ValueError, match=reason) as info:
        make(twin.balancer)
    assert "\n" not in str(info.value)
