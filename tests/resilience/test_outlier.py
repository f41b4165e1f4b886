"""Outlier detection on both twins: the selector, sans-IO, Envoy's consecutive-failure rules, and twin parity."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy import resilience
from tests.twins import IO_MODULES, probe

pytestmark = pytest.mark.resilience

S = 1_000_000_000  # one second in ns
BASE = 30 * S  # the default base ejection time
PURE = resilience.pure()[1]


def failures(d, i: int, outcome: int, count: int, now_ns: int = 0) -> list[bool]:
    return [d.record(i, outcome, now_ns) for _ in range(count)]


# --- the twins and their selector --------------------------------------------


def test_both_twins_export_the_same_names(twin):
    assert sorted(twin.outlier.__all__) == sorted(PURE.__all__)
    for name in twin.outlier.__all__:
        assert hasattr(twin.outlier, name), f"{twin.outlier.__name__} lacks {name}"


def test_outcome_codes_are_the_same_in_both_twins(twin):
    codes = ("SUCCESS", "ERROR_5XX", "GATEWAY_ERROR", "LOCAL_ORIGIN_FAILURE")
    assert [getattr(twin.outlier, c) for c in codes] == [getattr(PURE, c) for c in codes]
    assert len({getattr(PURE, c) for c in codes}) == 4


def test_selector_honours_no_extensions():
    got = probe("meshproxy.resilience", ("outlier",), no_extensions=True)
    assert (got["outlier"], got["ext"]) == ("meshproxy.resilience.outlier_py", False)


def test_selector_prefers_the_compiled_twin():
    if os.environ.get("MESHPROXY_NO_EXTENSIONS"):
        pytest.skip("MESHPROXY_NO_EXTENSIONS is set: compiled twin not under test")
    got = probe("meshproxy.resilience", ("outlier",), no_extensions=False)
    assert (got["outlier"], got["ext"]) == ("meshproxy._fast.outlier", True)


@pytest.mark.parametrize("no_ext", ["", "1"])
def test_outlier_detection_is_sans_io(no_ext):
    loaded = set(probe("meshproxy.resilience", ("outlier",), no_extensions=bool(no_ext))["modules"])
    assert not loaded & IO_MODULES


def test_stub_declares_every_public_name():
    import meshproxy._fast

    stub = ast.parse(Path(meshproxy._fast.__file__).with_name("outlier.pyi").read_text())
    declared = {node.name for node in stub.body if isinstance(node, ast.ClassDef)}
    declared |= {node.target.id for node in stub.body if isinstance(node, ast.AnnAssign)}
    assert set(PURE.__all__) <= declared, f"outlier.pyi lacks {sorted(set(PURE.__all__) - declared)}"


# --- consecutive failures ----------------------------------------------------


def test_five_consecutive_5xx_eject_and_four_do_not(twin):
    m = twin.outlier
    d = m.OutlierDetector(10)
    assert failures(d, 3, m.ERROR_5XX, 4) == [False] * 4
    assert not d.is_ejected(3)
    assert d.record(3, m.ERROR_5XX, 0) is True
    assert d.is_ejected(3) and d.ejected() == 1
    assert (d.ejections_total, d.ejections_overflow, d.times_ejected(3)) == (1, 0, 1)
    assert [d.is_ejected(i) for i in range(10)].count(True) == 1


def test_a_success_resets_the_run(twin):
    m = twin.outlier
    d = m.OutlierDetector(10)
    failures(d, 0, m.ERROR_5XX, 4)
    assert d.record(0, m.SUCCESS, 0) is False
    assert failures(d, 0, m.ERROR_5XX, 4) == [False] * 4
    assert d.record(0, m.ERROR_5XX, 0) is True


def test_runs_are_per_endpoint(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, max_ejection_percent=100)
    for _ in range(4):
        d.record(0, m.ERROR_5XX, 0)
        d.record(1, m.ERROR_5XX, 0)
        d.record(2, m.SUCCESS, 0)
    assert d.ejected() == 0
    assert d.record(1, m.ERROR_5XX, 0) and d.is_ejected(1) and not d.is_ejected(0)


def test_gateway_errors_count_for_consecutive_5xx(twin):
    m = twin.outlier
    d = m.OutlierDetector(10)  # consecutive_gateway_errors off by default, as Istio
    assert failures(d, 0, m.GATEWAY_ERROR, 2) + failures(d, 0, m.ERROR_5XX, 2) == [False] * 4
    assert d.record(0, m.GATEWAY_ERROR, 0) is True


def test_consecutive_gateway_errors_when_enabled(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, consecutive_5xx=0, consecutive_gateway_errors=3, max_ejection_percent=100)
    assert failures(d, 0, m.GATEWAY_ERROR, 3) == [False, False, True]
    # A 5xx that is not a gateway error breaks a run of gateway errors.
    failures(d, 1, m.GATEWAY_ERROR, 2)
    d.record(1, m.ERROR_5XX, 0)
    assert failures(d, 1, m.GATEWAY_ERROR, 2) == [False, False]
    assert d.record(1, m.GATEWAY_ERROR, 0) is True
    # consecutive_5xx=0 turns the 5xx detector off.
    assert failures(d, 2, m.ERROR_5XX, 50) == [False] * 50


def test_gateway_errors_trip_the_lower_threshold_first(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, consecutive_5xx=5, consecutive_gateway_errors=2)
    assert failures(d, 0, m.GATEWAY_ERROR, 2) == [False, True]


def test_local_origin_failures_count_as_gateway_errors_unless_split(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, consecutive_local_origin_failures=100)
    assert failures(d, 0, m.LOCAL_ORIGIN_FAILURE, 2) + failures(d, 0, m.ERROR_5XX, 2) == [False] * 4
    assert d.record(0, m.LOCAL_ORIGIN_FAILURE, 0) is True
    d = m.OutlierDetector(10, consecutive_5xx=0, consecutive_gateway_errors=2, max_ejection_percent=100)
    assert failures(d, 0, m.LOCAL_ORIGIN_FAILURE, 2) == [False, True]


def test_split_local_origin_failures_have_their_own_run(twin):
    m = twin.outlier
    d = m.OutlierDetector(
        10, split_external_local_origin_errors=True, consecutive_local_origin_failures=3, max_ejection_percent=100
    )
    # They leave the 5xx run alone...
    failures(d, 0, m.ERROR_5XX, 4)
    failures(d, 0, m.LOCAL_ORIGIN_FAILURE, 2)
    assert d.record(0, m.ERROR_5XX, 0) is True
    # ...and any response from the endpoint, even a 5xx, breaks their run.
    failures(d, 1, m.LOCAL_ORIGIN_FAILURE, 2)
    d.record(1, m.GATEWAY_ERROR, 0)
    assert failures(d, 1, m.LOCAL_ORIGIN_FAILURE, 2) == [False, False]
    assert d.record(1, m.LOCAL_ORIGIN_FAILURE, 0) is True
    # 0 turns the local-origin detector off.
    d = m.OutlierDetector(10, split_external_local_origin_errors=True, consecutive_local_origin_failures=0)
    assert failures(d, 0, m.LOCAL_ORIGIN_FAILURE, 50) == [False] * 50


def test_results_of_an_ejected_endpoint_are_ignored(twin):
    m = twin.outlier
    d = m.OutlierDetector(10)
    failures(d, 0, m.ERROR_5XX, 5)
    assert failures(d, 0, m.ERROR_5XX, 20) == [False] * 20
    assert (d.ejections_total, d.ejections_overflow, d.times_ejected(0)) == (1, 0, 1)
    assert d.sweep(BASE) == [0]
    # It comes back with a clean run.
    assert failures(d, 0, m.ERROR_5XX, 4, BASE) == [False] * 4


# --- how long an ejection lasts ----------------------------------------------


def test_sweep_returns_the_endpoint_exactly_when_its_ejection_ends(twin):
    m = twin.outlier
    d = m.OutlierDetector(10)
    t0 = 7 * S
    failures(d, 4, m.ERROR_5XX, 5, t0)
    assert d.sweep(t0) == []
    assert d.sweep(t0 + BASE - 1) == []
    assert d.is_ejected(4)
    assert d.sweep(t0 + BASE) == [4]
    assert not d.is_ejected(4) and d.ejected() == 0
    assert d.sweep(t0 + BASE) == []


def test_sweep_returns_every_ended_ejection_in_index_order(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, max_ejection_percent=100)
    for i, t in ((7, 0), (2, S), (5, 2 * S)):
        failures(d, i, m.ERROR_5XX, 5, t)
    assert d.sweep(BASE + S) == [2, 7]
    assert d.ejected() == 1
    assert d.sweep(10 * BASE) == [5]


def test_ejection_time_is_base_times_ejections_capped(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, base_ejection_time_ns=10 * S, max_ejection_time_ns=35 * S)
    t = 0
    for expected in (10 * S, 20 * S, 30 * S, 35 * S, 35 * S):
        assert failures(d, 0, m.ERROR_5XX, 5, t)[-1] is True
        assert d.sweep(t + expected - 1) == []
        assert d.sweep(t + expected) == [0]
        t += expected  # fail again at once: no healthy interval, no decay
    assert d.times_ejected(0) == 5
    # The multiplier stopped where the duration reached the cap (4, not 5):
    # two healthy intervals bring it to 2, and the next ejection lasts 30 s.
    t += 2 * 10 * S
    failures(d, 0, m.ERROR_5XX, 5, t)
    assert d.sweep(t + 30 * S - 1) == [] and d.sweep(t + 30 * S) == [0]


def test_multiplier_decays_one_per_healthy_interval(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, base_ejection_time_ns=10 * S, interval_ns=5 * S)
    # Three ejections back to back: multiplier 3, the last lasting 30 s.
    t = 0
    for k in (1, 2, 3):
        failures(d, 0, m.ERROR_5XX, 5, t)
        t += k * 10 * S
        assert d.sweep(t - 1) == [] and d.sweep(t) == [0]
    # Healthy for two intervals and a bit: multiplier 3 - 2 = 1, so the next
    # ejection raises it to 2 and lasts 20 s.
    t += 2 * 5 * S + S
    failures(d, 0, m.ERROR_5XX, 5, t)
    assert d.sweep(t + 20 * S - 1) == [] and d.sweep(t + 20 * S) == [0]
    # A sweep long after the end changes nothing: decay counts from the end.
    t += 20 * S + 10 * 5 * S
    failures(d, 0, m.ERROR_5XX, 5, t)
    assert d.sweep(t + 10 * S - 1) == [] and d.sweep(t + 10 * S) == [0]


def test_multiplier_decay_does_not_depend_on_when_sweep_runs(twin):
    m = twin.outlier
    ends = []
    for late in (0, 7 * S):
        d = m.OutlierDetector(10, base_ejection_time_ns=10 * S, interval_ns=5 * S)
        failures(d, 0, m.ERROR_5XX, 5, 0)
        failures(d, 0, m.ERROR_5XX, 5, 0)  # ignored: already ejected
        assert d.sweep(10 * S + late) == [0]
        failures(d, 0, m.ERROR_5XX, 5, 12 * S)
        ends.append(next(t for t in range(12 * S, 60 * S, S) if d.sweep(t)))
    assert ends == [32 * S, 32 * S]


# --- max ejection percent ----------------------------------------------------


def test_ten_percent_of_ten_allows_one_and_refuses_the_second(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, max_ejection_percent=10)
    assert failures(d, 0, m.ERROR_5XX, 5)[-1] is True
    assert failures(d, 1, m.ERROR_5XX, 5) == [False] * 5
    assert (d.ejected(), d.ejections_total, d.ejections_overflow) == (1, 1, 1)
    assert not d.is_ejected(1) and d.times_ejected(1) == 0
    # The refused run was reset, as Envoy resets it after the attempt.
    assert failures(d, 1, m.ERROR_5XX, 4) == [False] * 4
    assert d.ejections_overflow == 1
    # Once the first is back, the second may go.
    assert d.sweep(BASE) == [0]
    assert d.record(1, m.ERROR_5XX, BASE) is True


def test_ten_percent_of_three_ejects_none(twin):
    # Envoy since 1.27 checks the share after the ejection (1/3 > 10%) and
    # no longer always ejects the first host.
    m = twin.outlier
    d = m.OutlierDetector(3)
    assert failures(d, 0, m.ERROR_5XX, 10) == [False] * 10
    assert (d.ejected(), d.ejections_total, d.ejections_overflow) == (0, 0, 2)


def test_always_eject_one_host_allows_the_first_only(twin):
    m = twin.outlier
    d = m.OutlierDetector(3, always_eject_one_host=True)
    assert failures(d, 0, m.ERROR_5XX, 5)[-1] is True
    assert failures(d, 1, m.ERROR_5XX, 5)[-1] is False
    assert (d.ejected(), d.ejections_overflow) == (1, 1)


def test_percent_counts_the_share_after_the_ejection(twin):
    m = twin.outlier
    d = m.OutlierDetector(3, max_ejection_percent=67)
    assert [failures(d, i, m.ERROR_5XX, 5)[-1] for i in range(3)] == [True, True, False]
    d = m.OutlierDetector(4, max_ejection_percent=50)
    assert [failures(d, i, m.ERROR_5XX, 5)[-1] for i in range(4)] == [True, True, False, False]
    d = m.OutlierDetector(2, max_ejection_percent=0, always_eject_one_host=False)
    assert failures(d, 0, m.ERROR_5XX, 5)[-1] is False


# --- resize, time, arguments -------------------------------------------------


def test_resize_keeps_the_state_of_remaining_endpoints(twin):
    m = twin.outlier
    d = m.OutlierDetector(4, max_ejection_percent=100)
    failures(d, 1, m.ERROR_5XX, 5, 0)  # ejected until BASE
    failures(d, 2, m.ERROR_5XX, 5, 0)  # ejected, then dropped
    failures(d, 3, m.ERROR_5XX, 4, 0)  # one failure from ejection
    d.resize([3, -1, 1])
    assert len(d) == 3
    assert [d.is_ejected(i) for i in range(3)] == [False, False, True]
    assert (d.ejected(), d.times_ejected(2), d.times_ejected(1), d.ejections_total) == (1, 1, 0, 2)
    assert d.record(0, m.ERROR_5XX, 0) is True  # the run of old 3 went with it
    assert failures(d, 1, m.ERROR_5XX, 4) == [False] * 4  # the new one starts clean
    assert d.sweep(BASE) == [0, 2]
    d.resize([])
    assert (len(d), d.ejected(), d.sweep(10 * BASE)) == (0, 0, [])


def test_resize_checks_the_mapping(twin):
    m = twin.outlier
    d = m.OutlierDetector(3)
    for bad, why in (
        ([0, 3], "mapping[1] = 3 is not -1 or an endpoint of 3"),
        ([0, -2], "mapping[1] = -2 is not -1 or an endpoint of 3"),
        ([1, 1], "mapping[1] = 1 maps endpoint 1 twice"),
        ([0, "1"], "mapping[1] must be an int, got '1'"),
    ):
        with pytest.raises(ValueError) as exc:
            d.resize(bad)
        assert str(exc.value) == why
    assert len(d) == 3


def test_time_going_backwards(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, base_ejection_time_ns=10 * S, interval_ns=S)
    failures(d, 0, m.ERROR_5XX, 5, 100 * S)
    assert d.sweep(0) == [] and d.sweep(-(2**62)) == []
    assert d.sweep(110 * S) == [0]
    # Ejected again at a time before the last one ended: no decay, multiplier 2.
    failures(d, 0, m.ERROR_5XX, 5, 50 * S)
    assert d.sweep(70 * S - 1) == [] and d.sweep(70 * S) == [0]
    assert d.record(0, m.ERROR_5XX, -(2**63)) is False


def test_decay_over_the_whole_int64_range(twin):
    m = twin.outlier
    d = m.OutlierDetector(10, base_ejection_time_ns=10 * S, interval_ns=S)
    t = -(2**63)
    for k in (1, 2):
        failures(d, 0, m.ERROR_5XX, 5, t)
        t += k * 10 * S
        assert d.sweep(t) == [0]
    # 2**62 - t overflows an int64: the multiplier must still decay to 0.
    failures(d, 0, m.ERROR_5XX, 5, 2**62)
    assert d.sweep(2**62 + 10 * S - 1) == [] and d.sweep(2**62 + 10 * S) == [0]


def test_the_end_of_an_ejection_saturates(twin):
    m = twin.outlier
    d = m.OutlierDetector(10)
    failures(d, 0, m.ERROR_5XX, 5, 2**63 - 2)
    assert d.sweep(2**63 - 2) == []
    assert d.sweep(2**63 - 1) == [0]


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"n": -1}, "n must be between 0 and 16777216, got -1"),
        ({"n": 1 << 25}, "n must be between 0 and 16777216, got 33554432"),
        ({"consecutive_5xx": -1}, "consecutive_5xx must be between 0 and 4294967295, got -1"),
        (
            {"consecutive_gateway_errors": 1 << 32},
            "consecutive_gateway_errors must be between 0 and 4294967295, got 4294967296",
        ),
        (
            {"consecutive_local_origin_failures": -5},
            "consecutive_local_origin_failures must be between 0 and 4294967295, got -5",
        ),
        ({"base_ejection_time_ns": 0}, "base_ejection_time_ns must be between 1 and 4611686018427387904, got 0"),
        ({"interval_ns": -1}, "interval_ns must be between 1 and 4611686018427387904, got -1"),
        (
            {"max_ejection_time_ns": 1 << 63},
            "max_ejection_time_ns must be between 1 and 4611686018427387904, got 9223372036854775808",
        ),
        ({"max_ejection_time_ns": S}, f"max_ejection_time_ns ({S}) is below base_ejection_time_ns ({BASE})"),
        ({"max_ejection_percent": 101}, "max_ejection_percent must be between 0 and 100, got 101"),
        ({"max_ejection_percent": -1}, "max_ejection_percent must be between 0 and 100, got -1"),
    ],
)
def test_bad_config_is_refused(twin, kwargs, why):
    kwargs = {"n": 10, **kwargs}
    with pytest.raises(ValueError) as exc:
        twin.outlier.OutlierDetector(kwargs.pop("n"), **kwargs)
    assert str(exc.value) == why


def test_bad_calls_are_refused(twin):
    m = twin.outlier
    d = m.OutlierDetector(2)
    for call, why in (
        (lambda: d.record(2, m.SUCCESS, 0), "endpoint 2 out of range for 2 endpoints"),
        (lambda: d.record(-1, m.ERROR_5XX, 0), "endpoint -1 out of range for 2 endpoints"),
        (lambda: d.record(0, 4, 0), "unknown outcome 4"),
        (lambda: d.record(0, -1, 0), "unknown outcome -1"),
        (lambda: d.is_ejected(5), "endpoint 5 out of range for 2 endpoints"),
        (lambda: d.times_ejected(-3), "endpoint -3 out of range for 2 endpoints"),
    ):
        with pytest.raises(ValueError) as exc:
            call()
        assert str(exc.value) == why
    with pytest.raises(TypeError):
        m.OutlierDetector(2, 5)  # the settings are keyword-only


# --- the twins decide alike --------------------------------------------------
#
# One random walk is replayed on the pure twin and on the twin under test;
# every result, error and counter must be identical. For [py] this checks
# that the walk is deterministic.

configs = st.fixed_dictionaries(
    {
        "consecutive_5xx": st.integers(0, 5),
        "consecutive_gateway_errors": st.integers(0, 4),
        "consecutive_local_origin_failures": st.integers(0, 4),
        "split_external_local_origin_errors": st.booleans(),
        # Times on a grid of 10 ns, so that sweeps land exactly on ends often.
        "base_ejection_time_ns": st.integers(1, 5).map(lambda t: 10 * t),
        "max_ejection_time_ns": st.integers(5, 40).map(lambda t: 10 * t),
        "max_ejection_percent": st.one_of(st.integers(0, 100), st.sampled_from([10, 34, 50, 100])),
        "always_eject_one_host": st.booleans(),
        "interval_ns": st.integers(1, 6).map(lambda t: 10 * t),
    }
)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(-1, 4), st.integers(-1, 4), st.integers(-2, 6).map(lambda t: 10 * t)),
        st.tuples(st.just("burst"), st.integers(0, 3), st.sampled_from([1, 1, 2, 3]), st.integers(1, 8)),
        st.tuples(st.just("mixed"), st.integers(0, 3), st.lists(st.integers(0, 3), min_size=1, max_size=12)),
        st.tuples(st.just("sweep"), st.integers(-2, 8).map(lambda t: 10 * t)),
        st.tuples(st.just("resize"), st.lists(st.integers(-1, 8), max_size=9)),
        st.tuples(st.just("remap"), st.lists(st.booleans(), min_size=1, max_size=9)),
    ),
    min_size=10,
    max_size=150,
)


def replay(mod, n: int, config: dict, walk: list[tuple]) -> list:
    d = mod.OutlierDetector(n, **config)
    out: list = []
    clock = 0
    for step in walk:
        try:
            if step[0] == "record":
                clock += step[3]
                out.append(d.record(step[1], step[2], clock))
            elif step[0] == "burst":  # a run of one failure, to reach the thresholds often
                out.append([d.record(step[1], step[2], clock) for _ in range(step[3])])
            elif step[0] == "mixed":  # interleaved outcomes on one endpoint
                out.append([d.record(step[1], outcome, clock) for outcome in step[2]])
            elif step[0] == "sweep":
                clock += step[1]
                out.append(d.sweep(clock))
            elif step[0] == "remap":  # a valid mapping: old endpoints reversed, some kept, some new
                n_old = len(d)
                d.resize([n_old - 1 - j if j < n_old and keep else -1 for j, keep in enumerate(step[1])])
            else:
                d.resize(step[1])
            out.append(
                (
                    len(d),
                    d.ejected(),
                    d.ejections_total,
                    d.ejections_overflow,
                    [(d.is_ejected(i), d.times_ejected(i)) for i in range(len(d))],
                )
            )
        except ValueError as exc:
            out.append(("ValueError", str(exc)))
    return out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 8), config=configs, walk=steps)
def test_twins_decide_alike(twin, n, config, walk):
    assert replay(twin.outlier, n, config, walk) == replay(PURE, n, config, walk)
