"""Per-try timeouts armed by the core, on both twins: ``open_forward`` arms each attempt of a stream whose
``RetryOn`` has ``per_try_ns`` in the worker's ``TryTimeouts``, the attempt's close disarms it, and
``expire`` returns exactly the attempts that ran out still waiting for response headers. The owner's
single timer is told when the earliest attempt armed is due (rounded up to a slot), and only that.

Time here is the argument of ``expire`` and the streams' ``t_open_ns``: no test waits for a clock."""

from __future__ import annotations

import random

import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy import conn_py
from tests.conn import peers
from tests.conn.conftest import COMPILED
from tests.conn.peers import CANCEL, POST, RESPONSE, Pair, Proxy

SLOT = 5_000_000
PER_TRY = 100_000_000
BODY = b"\0\0\0\0\x05hello"


class Timer:
    """The owner's timer: records every ``arm(at_ns)``."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, at_ns: int) -> None:
        self.calls.append(at_ns)

    @property
    def at(self) -> int:
        return self.calls[-1]


def no_hook(down, up, reason) -> bool:
    return False


def armed_proxy(C, per_try_ns: int = PER_TRY):
    timer = Timer()
    wheel = C.TryTimeouts(timer, SLOT)
    p = Proxy()
    return p, wheel, timer, C.RetryOn(no_hook, on_reset=True, per_try_ns=per_try_ns, timeouts=wheel)


def slot_end(t_ns: int) -> int:
    return (t_ns // SLOT + 1) * SLOT


def test_an_attempt_is_armed_when_forwarded_and_expires_once_due(C):
    p, wheel, timer, retry = armed_proxy(C)
    _sid, down = p.request(POST, body=BODY)
    down.retry = retry
    up = p.forward(down)
    due = up.t_open_ns + PER_TRY
    assert len(wheel) == 1
    assert timer.calls == [slot_end(due)] and wheel.timer_at_ns == slot_end(due), "the timer, rounded up to a slot"
    assert wheel.expire(due - 1) == [], "not before it is due"
    assert timer.calls[-1] == slot_end(due) and len(wheel) == 1, "an early timer is set again for the same time"
    assert wheel.expire(slot_end(due)) == [up]
    assert len(wheel) == 0 and wheel.timer_at_ns == 0


def test_response_headers_end_the_per_try_timeout(C):
    p, wheel, _timer, retry = armed_proxy(C)
    _sid, down = p.request(POST, body=BODY)
    down.retry = retry
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE, end_stream=False)
    p.pump()
    assert up.recv_headers and up.state != "closed"
    assert wheel.expire(up.t_open_ns + 10 * PER_TRY) == [], "after response headers the deadline governs"


def test_the_attempts_close_disarms_it_and_the_timer_skips_its_slot(C):
    p, wheel, timer, retry = armed_proxy(C)
    _sid, down = p.request(POST, body=BODY)
    down.retry = retry
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE, end_stream=True)
    p.pump()
    assert up.state == "closed" and len(wheel) == 0, "nothing is kept once the attempt ended"
    n = len(timer.calls)
    assert wheel.expire(wheel.timer_at_ns) == []
    assert len(timer.calls) == n and wheel.timer_at_ns == 0, "no timer for a wheel with nothing in it"


def test_no_per_try_timeout_arms_nothing(C):
    p, wheel, timer, _retry = armed_proxy(C)
    _sid, down = p.request(POST, body=BODY)
    down.retry = C.RetryOn(no_hook, on_reset=True)
    p.forward(down)
    assert len(wheel) == 0 and timer.calls == []


def test_a_retry_after_abandon_arms_the_new_attempt_only(C):
    p, wheel, _timer, retry = armed_proxy(C)
    _sid, down = p.request(POST, body=BODY)
    down.retry = retry
    up = p.forward(down)
    assert C.abandon(down) is True
    p.pump()
    assert up.state == "closed" and len(wheel) == 0
    p.up = Pair(True, hold=True)
    p.up.pump()
    up2 = p.forward(down)
    assert len(wheel) == 1
    assert wheel.expire(up2.t_open_ns + PER_TRY + SLOT) == [up2]


def test_a_reset_attempt_is_not_returned(C):
    p, wheel, _timer, retry = armed_proxy(C)
    _sid, down = p.request(POST, body=BODY)
    down.retry = retry
    up = p.forward(down)
    p.server.reset_stream(up.id, CANCEL)
    p.pump()
    assert up.state == "closed" and len(wheel) == 0
    assert wheel.expire(up.t_open_ns + 2 * PER_TRY) == []


def test_the_timer_follows_the_earliest_slot_holding_an_attempt(C):
    p, wheel, timer, _retry = armed_proxy(C)
    streams = [p.forward(p.request(POST, body=BODY)[1]) for _ in range(3)]
    base = 1_000 * SLOT
    wheel.add(streams[0], base + 10 * SLOT)
    wheel.add(streams[1], base + 20 * SLOT)
    assert timer.calls == [base + 11 * SLOT], "a later slot does not move the timer"
    wheel.add(streams[2], base + 2 * SLOT + 1)
    assert timer.at == base + 3 * SLOT, "an earlier one does"
    # The earliest slot's attempt ends (re-armed later here): the timer, once it fires, moves on past
    # the slot left empty to the next one that holds an attempt.
    wheel.add(streams[2], base + 30 * SLOT)
    assert wheel.expire(base + 4 * SLOT) == []
    assert timer.at == base + 11 * SLOT
    assert wheel.expire(base + 25 * SLOT) == [streams[0], streams[1]], "every due slot, earliest first"
    assert timer.at == base + 31 * SLOT and len(wheel) == 1


def test_attempts_come_back_earliest_first_and_in_arming_order_when_due_alike(C):
    p, wheel, _timer, _retry = armed_proxy(C)
    streams = [p.forward(p.request(POST, body=BODY)[1]) for _ in range(4)]
    base = 2_000 * SLOT
    for i, due in ((2, 5), (0, 1), (3, 5), (1, 3)):
        wheel.add(streams[i], base + due)
    assert wheel.expire(base + SLOT) == streams


def test_attempts_with_a_shorter_per_try_timeout_opened_later_expire_first(C):
    p, wheel, timer, long_retry = armed_proxy(C)
    short_retry = C.RetryOn(no_hook, per_try_ns=PER_TRY // 4, timeouts=wheel)
    _sid, d1 = p.request(POST, body=BODY)
    d1.retry = long_retry
    long_up = p.forward(d1)
    _sid, d2 = p.request(POST, body=BODY)
    d2.retry = short_retry
    short_up = p.forward(d2)
    short_due = short_up.t_open_ns + PER_TRY // 4
    assert short_due < long_up.t_open_ns + PER_TRY
    assert timer.at == slot_end(short_due), "the timer moves to the earlier one"
    assert wheel.expire(slot_end(short_due)) == [short_up]
    assert timer.at == slot_end(long_up.t_open_ns + PER_TRY) and len(wheel) == 1
    assert wheel.expire(long_up.t_open_ns + PER_TRY) == [long_up]


def test_bad_arguments_are_refused(C):
    with pytest.raises(TypeError):
        C.TryTimeouts(None)
    with pytest.raises(ValueError):
        C.TryTimeouts(Timer(), 0)
    wheel = C.TryTimeouts(Timer())
    assert wheel.slot_ns == SLOT, "5 ms slots unless told otherwise"
    with pytest.raises(ValueError, match="TryTimeouts"):
        C.RetryOn(no_hook, per_try_ns=PER_TRY)
    with pytest.raises(ValueError):
        C.RetryOn(no_hook, per_try_ns=-1, timeouts=wheel)
    with pytest.raises(TypeError):
        C.RetryOn(no_hook, per_try_ns=PER_TRY, timeouts=object())
    with pytest.raises(TypeError):
        wheel.add(None, 0)
    r = C.RetryOn(no_hook, per_try_ns=PER_TRY, timeouts=wheel)
    assert r.per_try_ns == PER_TRY and r.timeouts is wheel
    p = Proxy()
    _sid, down = p.request(POST, body=BODY)
    up = p.forward(down)
    p.server.send_headers(up.id, RESPONSE, end_stream=True)
    p.pump()
    with pytest.raises(ValueError, match="closed"):
        wheel.add(up, 0)


def _ops(draw_ops, C):
    """Replays ``draw_ops`` on ``C`` and returns what every expire returned and the timer saw (by index)."""
    saved, peers.C = peers.C, C  # the peers' twin (the fixture's job elsewhere)
    try:
        return _replay(draw_ops, C)
    finally:
        peers.C = saved


def _replay(draw_ops, C):
    timer = Timer()
    wheel = C.TryTimeouts(timer, SLOT)
    p = Proxy()
    streams = [p.forward(p.request(POST, body=BODY)[1]) for _ in range(6)]
    index = {id(s): i for i, s in enumerate(streams)}
    out = []
    for op, i, t in draw_ops:
        s = streams[i]
        if op == "add":
            if s.state != "closed":
                wheel.add(s, t)
        elif op == "close":
            if s.state != "closed":
                p.server.send_headers(s.id, RESPONSE, end_stream=True)
                p.pump()
        else:
            out.append(("expired", [index[id(x)] for x in wheel.expire(t)]))
        out.append(("len", len(wheel), "timer", wheel.timer_at_ns))
    return out, timer.calls


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "close", "expire"]),
            st.integers(0, 5),
            st.integers(0, 40 * SLOT),
        ),
        max_size=30,
    )
)
@pytest.mark.skipif(COMPILED is None, reason="the compiled twin is not built")
def test_the_twins_agree_with_each_other_and_with_a_model(ops):
    got_compiled = _ops(ops, COMPILED)
    got_pure = _ops(ops, conn_py)
    assert got_compiled == got_pure
    # The model: each open stream's due time; expire(t) returns those due by t.
    due: dict[int, int] = {}
    closed: set[int] = set()
    want = []
    for op, i, t in ops:
        if op == "add" and i not in closed:
            due[i] = t
        elif op == "close" and i not in closed:
            closed.add(i)
            due.pop(i, None)
        elif op == "expire":
            hit = [j for j, d in due.items() if d <= t]
            want.append(hit)
            for j in hit:
                del due[j]
    expired = [e[1] for e in got_compiled[0] if e[0] == "expired"]
    assert [sorted(x) for x in expired] == [sorted(x) for x in want]


def test_many_attempts_under_churn_leave_nothing_armed(C):
    """Thousands of attempts opened and ended in random order, as under load: the wheel ends empty,
    and the only ones it ever returns are those still open past their due time."""
    rng = random.Random(7)
    p, wheel, _timer, retry = armed_proxy(C)
    live = []
    for _ in range(2000):
        _sid, down = p.request(POST, body=BODY)
        down.retry = retry
        live.append(p.forward(down))
        if len(live) > 50:
            up = live.pop(rng.randrange(len(live)))
            p.server.send_headers(up.id, RESPONSE, end_stream=True)
    p.pump()
    assert len(wheel) == len(live)
    late = max(s.t_open_ns for s in live) + PER_TRY + SLOT
    assert sorted(s.id for s in wheel.expire(late)) == sorted(s.id for s in live)
    assert len(wheel) == 0 and wheel.timer_at_ns == 0
    assert not [e for e in p.up.peer_of(h2.events.StreamReset)], "expiring reports; it resets nothing itself"
