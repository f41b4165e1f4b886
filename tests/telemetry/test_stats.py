"""The request and TCP counters: both twins give the same rows for the same records (Hypothesis walks), buckets
follow Prometheus' ``le`` (a value equal to a bound is counted in that bound's bucket), ``record`` reads the right
fields of real streams, and the selector picks a twin by the project's one rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy import conn, conn_py
from meshproxy.telemetry import stats, stats_py
from tests.conn import peers
from tests.conn.peers import GRPC, REQUEST, Proxy

COMPILED = stats.compiled()
BOTH = COMPILED is not None and not os.environ.get("MESHPROXY_NO_EXTENSIONS")
TWINS = [stats_py, COMPILED] if BOTH else [stats_py]
IDS = ["pure", "compiled"][: len(TWINS)]
needs_both = pytest.mark.skipif(not BOTH, reason="the compiled twin is not built or MESHPROXY_NO_EXTENSIONS is set")

N_DURATION = len(stats_py.DURATION_BOUNDS_MS) + 1
N_SIZE = len(stats_py.SIZE_BOUNDS) + 1


@pytest.fixture(params=TWINS, ids=IDS)
def S(request):
    return request.param


def row_of(snapshot: list[tuple], **key) -> tuple:
    names = ("base", "is_grpc", "status", "grpc_status", "flags")
    found = [r for r in snapshot if all(r[names.index(k)] == v for k, v in key.items())]
    assert len(found) == 1, (key, snapshot)
    return found[0]


def test_bounds_are_envoys_and_istios(S):
    assert S.DURATION_BOUNDS_MS == stats_py.DURATION_BOUNDS_MS
    assert S.DURATION_BOUNDS_MS[0] == 0.5 and S.DURATION_BOUNDS_MS[-1] == 3600000 and N_DURATION == 20
    assert S.SIZE_BOUNDS == tuple(10**i for i in range(8))


@pytest.mark.parametrize("i", range(len(stats_py.DURATION_BOUNDS_MS)))
def test_a_duration_equal_to_a_bound_is_in_that_bucket(S, i):
    bound = stats_py.DURATION_BOUNDS_MS[i]
    r = S.RequestStats()
    r.record_values(1, -1, False, 200, -1, "", int(bound * 1_000_000), 0, 0, 0, 0)  # exactly the bound
    r.record_values(1, -1, False, 200, -1, "", int(bound * 1_000_000) + 1, 0, 0, 0, 0)  # just above it
    buckets = row_of(r.snapshot(), base=1)[7]
    want = [0] * N_DURATION
    want[i] += 1
    want[i + 1] += 1
    assert list(buckets) == want


def test_durations_past_the_last_bound_and_below_zero(S):
    r = S.RequestStats()
    r.record_values(1, -1, False, 200, -1, "", 3_600_000 * 1_000_000 + 1, 0, 0, 0, 0)
    r.record_values(1, -1, False, 200, -1, "", -5, 0, 0, 0, 0)  # a clock gone backwards counts as 0
    row = row_of(r.snapshot(), base=1)
    assert row[7][-1] == 1 and row[7][0] == 1 and row[6] == 3_600_000.000001


@pytest.mark.parametrize("i", range(len(stats_py.SIZE_BOUNDS)))
def test_a_size_equal_to_a_bound_is_in_that_bucket(S, i):
    bound = stats_py.SIZE_BOUNDS[i]
    r = S.RequestStats()
    r.record_values(1, -1, False, 200, -1, "", 0, bound, bound + 1, 0, 0)
    row = row_of(r.snapshot(), base=1)
    assert row[8] == bound and row[9].index(1) == i
    assert row[10] == bound + 1 and row[11].index(1) == i + 1


def test_zero_bytes_are_in_the_first_bucket(S):
    r = S.RequestStats()
    r.record_values(1, -1, False, 200, -1, "", 0, 0, 0, 0, 0)
    row = row_of(r.snapshot(), base=1)
    assert row[9][0] == 1 and row[11][0] == 1


def test_slots_by_label_set_and_flags(S):
    r = S.RequestStats()
    r.record_values(7, 3, True, 200, 0, "", 2_000_000, 10, 20, 1, 2)
    r.record_values(7, 3, True, 200, 0, None, 3_000_000, 10, 20, 1, 5)
    r.record_values(7, 3, True, 200, 14, "URX,UO", 1_000_000, 0, 0, 0, 0)
    r.record_values(7, 3, False, 503, -1, "UH", 1_000_000, 0, 0, 0, 0)
    r.record_values(7, -1, False, 0, -1, "DC", 1_000_000, 0, 0, 0, 0)
    snap = r.snapshot()
    assert [row[:6] for row in snap] == [
        (7, True, 200, 0, "", 2),
        (7, True, 200, 14, "URX,UO", 1),
        (7, False, 503, -1, "UH", 1),
        (7, False, 0, -1, "DC", 1),
    ]
    ok = snap[0]
    assert ok[6] == 5.0 and ok[8] == 20 and ok[10] == 40 and (ok[12], ok[13]) == (2, 7)
    routes = r.route_snapshot()
    assert [(route, success, count) for route, success, count, _, _ in routes] == [(3, 1, 2), (3, 0, 2)]
    assert routes[0][3] == 5.0 and sum(routes[1][4]) == 2


@pytest.mark.parametrize(
    ("is_grpc", "status", "grpc_status", "success"),
    [
        (False, 200, -1, 1),
        (False, 404, -1, 1),
        (False, 499, -1, 1),
        (False, 500, -1, 0),
        (False, 0, -1, 0),
        (True, 200, 0, 1),
        (True, 200, 2, 0),
        (True, 200, -1, 0),
        (True, 503, -1, 0),
    ],
)
def test_route_success(S, is_grpc, status, grpc_status, success):
    r = S.RequestStats()
    r.record_values(1, 9, is_grpc, status, grpc_status, "", 0, 0, 0, 0, 0)
    assert [row[:3] for row in r.route_snapshot()] == [(9, success, 1)]


def test_keys_that_do_not_pack_still_count(S):
    r = S.RequestStats()
    for _ in range(2):
        r.record_values(2**40, -1, True, 200, 2**30, "", 0, 0, 0, 0, 0)
        r.record_values(-3, -1, False, 1200, -1, "", 0, 0, 0, 0, 0)
    assert [row[:6] for row in r.snapshot()] == [(2**40, True, 200, 2**30, "", 2), (-3, False, 1200, -1, "", 2)]


def test_many_flags_and_label_sets(S):
    # past the hash's first growth and past the flags codes that pack
    r = S.RequestStats()
    for i in range(9000):
        r.record_values(i % 300, i % 50, False, 200, -1, f"F{i}" if i >= 200 else "", 0, 1, 1, 0, 0)
        r.record_values(i % 300, i % 50, False, 200, -1, f"F{i}" if i >= 200 else "", 0, 1, 1, 0, 0)
    snap = r.snapshot()
    assert len(snap) == 9000 and all(row[5] == 2 for row in snap)
    assert sum(row[2] for row in r.route_snapshot()) == 18000


def test_counts_never_reset_on_snapshot(S):
    r = S.RequestStats()
    r.record_values(1, 1, False, 200, -1, "", 0, 0, 0, 0, 0)
    assert r.snapshot() == r.snapshot() and r.route_snapshot() == r.route_snapshot()
    r.record_values(1, 1, False, 200, -1, "", 0, 0, 0, 0, 0)
    assert r.snapshot()[0][5] == 2 and r.route_snapshot()[0][2] == 2


def test_flags_must_be_text(S):
    with pytest.raises(TypeError):
        S.RequestStats().record_values(1, -1, False, 200, -1, b"UH", 0, 0, 0, 0, 0)


def test_tcp_stats(S):
    t = S.TcpStats()
    t.opened(4)
    t.opened(4)
    t.add(4, 100, 50)
    t.closed(4, 10, 5)
    t.opened(-1)
    t.closed(-1, 0, 0)
    assert t.snapshot() == [(4, 2, 1, 110, 55), (-1, 1, 1, 0, 0)]


# -- record() reads the streams ---------------------------------------------------------------------------------


CONNS = [("pure", conn_py), ("compiled", conn.compiled())]


@pytest.fixture(params=[c for c in CONNS if c[1] is not None and (c[0] == "pure" or BOTH)], ids=lambda c: c[0])
def paired(request, monkeypatch):
    """The stats twin of the conn twin the proxy peers are built with."""
    name, mod = request.param
    monkeypatch.setattr(peers, "C", mod)
    return stats_py if name == "pure" else COMPILED


def test_record_reads_a_grpc_exchange(paired):
    S = paired
    p = Proxy()
    body = b"\0\0\0\0\x02hi" * 3
    _, down = p.request(GRPC, body=body)
    up = p.forward(down)
    p.server.send_headers(up.id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    p.server.send_data(up.id, b"\0\0\0\0\x01x" * 2)
    p.server.send_headers(up.id, [(b"grpc-status", b"5")], end_stream=True)
    p.pump()
    r = S.RequestStats()
    r.record(11, 2, down, up, "", down.t_open_ns + 7_000_000)
    row = r.snapshot()[0]
    assert row[:6] == (11, True, 200, 5, "", 1)
    assert row[6] == 7.0 and row[7][3] == 1  # 7 ms: in the le=10 bucket
    assert (row[8], row[10], row[12], row[13]) == (len(body), 12, 3, 2)
    assert r.route_snapshot()[0][:3] == (2, 0, 1)


def test_record_without_an_upstream(paired):
    S = paired
    p = Proxy()
    _, down = p.request(REQUEST)
    p.down.conn.respond(down, 404, [], b"nope")
    p.pump()
    r = S.RequestStats()
    r.record(1, -1, down, None, "NR", down.t_open_ns)
    assert r.snapshot()[0][:6] == (1, False, 404, -1, "NR", 1)
    assert r.snapshot()[0][10] == 4 and r.route_snapshot() == []


# -- the twins agree ------------------------------------------------------------------------------------------------

RECORD = st.tuples(
    st.integers(min_value=-2, max_value=40) | st.integers(min_value=0, max_value=2**40),  # base
    st.integers(min_value=-1, max_value=6),  # route
    st.booleans(),
    st.sampled_from([0, 200, 204, 404, 500, 503, 1000]),
    st.integers(min_value=-1, max_value=20) | st.just(2**31 - 1),
    st.sampled_from(["", "UH", "URX,UO", "NR", "DC"]),
    st.integers(min_value=-(10**6), max_value=4_000_000 * 10**6)
    | st.sampled_from([int(b * 1_000_000) for b in stats_py.DURATION_BOUNDS_MS]),
    st.integers(min_value=0, max_value=2 * 10**7) | st.sampled_from(stats_py.SIZE_BOUNDS),
    st.integers(min_value=0, max_value=2 * 10**7),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
)


@needs_both
@settings(max_examples=200, deadline=None)
@given(st.lists(RECORD, max_size=60))
def test_both_twins_give_the_same_rows(records):
    a, b = stats_py.RequestStats(), COMPILED.RequestStats()
    for rec in records:
        a.record_values(*rec)
        b.record_values(*rec)
    assert a.snapshot() == b.snapshot()
    assert a.route_snapshot() == b.route_snapshot()


@needs_both
@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["opened", "closed", "add"]),
            st.integers(min_value=-3, max_value=10),
            st.integers(min_value=-5, max_value=10**9),
            st.integers(min_value=-5, max_value=10**9),
        ),
        max_size=40,
    )
)
def test_both_tcp_twins_give_the_same_rows(ops):
    a, b = stats_py.TcpStats(), COMPILED.TcpStats()
    for op, base, sent, received in ops:
        for t in (a, b):
            if op == "opened":
                t.opened(base)
            else:
                getattr(t, op)(base, sent, received)
    assert a.snapshot() == b.snapshot()


@needs_both
def test_both_twins_export_the_same_names():
    assert sorted(stats_py.__all__) == sorted(COMPILED.__all__)
    for cls in ("RequestStats", "TcpStats"):
        pub = {n for n in dir(getattr(stats_py, cls)) if not n.startswith("_")}
        assert pub == {n for n in dir(getattr(COMPILED, cls)) if not n.startswith("_")}


def _selected(no_extensions: bool) -> dict:
    code = (
        "import json, sys\n"
        "from meshproxy.telemetry import stats\n"
        "print(json.dumps({'module': stats.RequestStats.__module__, 'tcp': stats.TcpStats.__module__,"
        " 'ext': stats.using_extensions}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MESHPROXY_NO_EXTENSIONS"}
    if no_extensions:
        env["MESHPROXY_NO_EXTENSIONS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_selector_honours_no_extensions():
    assert _selected(True) == {"module": stats_py.__name__, "tcp": stats_py.__name__, "ext": False}


@needs_both
def test_selector_prefers_the_compiled_twin():
    assert _selected(False) == {"module": "meshproxy._fast.stats", "tcp": "meshproxy._fast.stats", "ext": True}
