"""Retries in the core, on both twins: ``RetryOn`` conditions tested without Python, the hook's say, and
``abandon`` for per-try timeouts. A retried attempt leaves nothing downstream, its upstream stream is
cancelled, and the request (body included, from the replay copy) goes out whole on the next link; a
response that does not qualify, or that the hook refuses, crosses as before."""

from __future__ import annotations

import h2.events
import pytest

from tests.conn import peers
from tests.conn.peers import CANCEL, GRPC, INTERNAL_ERROR, POST, RESPONSE, Pair, Proxy

TRAILERS_ONLY_14 = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14")]
BODY = b"\0\0\0\0\x05hello"


class Hook:
    """Records the core's questions and answers ``answer``."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.calls: list[tuple] = []

    def __call__(self, down, up, reason) -> bool:
        self.calls.append((down, up, reason))
        return self.answer


def retried(p: Proxy, down) -> bool:
    return any(ev[0] == peers.C.EV_RETRY and ev[1] is down for ev in p.down.conn.take_events() or [])


def server_reset(p: Proxy, sid: int) -> int | None:
    got = [e for e in p.up.peer_of(h2.events.StreamReset) if e.stream_id == sid]
    return got[-1].error_code if got else None


def again(p: Proxy, down, C):
    """The request sent on a fresh upstream connection (as the next attempt is)."""
    p.up = Pair(True, hold=True)
    p.up.pump()
    return p.forward(down)


@pytest.mark.parametrize(
    ("kw", "status", "grpc", "want"),
    [
        ({"on_5xx": True}, 500, -1, True),
        ({"on_5xx": True}, 599, -1, True),
        ({"on_5xx": True}, 499, -1, False),
        ({"on_gateway": True}, 502, -1, True),
        ({"on_gateway": True}, 504, -1, True),
        ({"on_gateway": True}, 500, -1, False),
        ({"on_gateway": True}, 505, -1, False),
        ({"statuses": (409, 503)}, 409, -1, True),
        ({"statuses": (409,)}, 503, -1, False),
        ({"grpc_statuses": (14, 1)}, 200, 14, True),
        ({"grpc_statuses": (14,)}, 200, 13, False),
        ({"grpc_statuses": (14,)}, 200, -1, False),
        ({}, 503, 14, False),
    ],
)
def test_conditions(C, kw, status, grpc, want):
    assert C.RetryOn(Hook(), **kw).matches(status, grpc) is want


def test_retry_on_refuses_bad_arguments(C):
    with pytest.raises(TypeError):
        C.RetryOn(None)
    with pytest.raises(ValueError):
        C.RetryOn(Hook(), grpc_statuses=(32,))


def test_a_qualifying_status_is_offered_and_retried_whole(C):
    p = Proxy()
    hook = Hook()
    sid, down = p.request(POST, body=BODY)
    down.retry = C.RetryOn(hook, on_gateway=True)
    up = p.forward(down)
    p.server.send_headers(up.id, [(b":status", b"503")], end_stream=False)
    p.pump()
    assert hook.calls == [(down, up, C.RETRY_STATUS)]
    assert retried(p, down)
    assert not p.client_events(h2.events.ResponseReceived, sid), "nothing of the failed attempt goes downstream"
    assert server_reset(p, up.id) == CANCEL
    assert down.attempts == 1 and down.state != "closed" and down.peer is None
    up2 = again(p, down, C)
    assert p.up.received(up2.id) == BODY, "the whole body, once"
    p.server.send_headers(up2.id, RESPONSE, end_stream=True)
    p.pump()
    assert dict(p.client_events(h2.events.ResponseReceived, sid)[0].headers)[b":status"] == b"200"


def test_a_trailers_only_grpc_status_is_retried_and_the_finished_stream_is_not_reset(C):
    p = Proxy()
    hook = Hook()
    _sid, down = p.request(GRPC, body=BODY)
    down.retry = C.RetryOn(hook, grpc_statuses=(14,))
    up = p.forward(down)
    p.server.send_headers(up.id, TRAILERS_ONLY_14, end_stream=True)
    p.pump()
    assert [c[2] for c in hook.calls] == [C.RETRY_STATUS] and retried(p, down)
    assert up.state == "closed" and server_reset(p, up.id) is None, "both ends were done: nothing to cancel"
    up2 = again(p, down, C)
    assert p.up.received(up2.id) == BODY


def test_the_hook_saying_no_lets_the_response_through(C):
    p = Proxy()
    hook = Hook(answer=False)
    sid, down = p.request(GRPC, body=BODY)
    down.retry = C.RetryOn(hook, grpc_statuses=(14,))
    up = p.forward(down)
    p.server.send_headers(up.id, TRAILERS_ONLY_14, end_stream=True)
    p.pump()
    assert len(hook.calls) == 1 and not retried(p, down)
    assert dict(p.client_events(h2.events.ResponseReceived, sid)[0].headers)[b"grpc-status"] == b"14"
    assert down.attempts == 0


def test_a_response_that_does_not_qualify_never_reaches_the_hook(C):
    p = Proxy()
    hook = Hook()
    sid, down = p.request(GRPC, body=BODY)
    down.retry = C.RetryOn(hook, on_5xx=True, grpc_statuses=(14,))
    up = p.forward(down)
    # A gRPC status in trailers comes after the headers went downstream: too late to retry.
    p.server.send_headers(up.id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    p.server.send_headers(up.id, [(b"grpc-status", b"14")], end_stream=True)
    p.pump()
    assert hook.calls == [] and not retried(p, down)
    assert p.client_events(h2.events.StreamEnded, sid)


@pytest.mark.parametrize("how", ["reset", "connection lost"])
def test_a_reset_before_the_response_is_offered_when_the_route_retries_resets(C, how):
    p = Proxy()
    hook = Hook()
    sid, down = p.request(POST, body=BODY)
    down.retry = C.RetryOn(hook, on_reset=True)
    up = p.forward(down)
    if how == "reset":
        p.server.reset_stream(up.id, INTERNAL_ERROR)
        p.pump()
    else:
        p.up.conn.connection_lost()
        p.pump()
    assert [c[2] for c in hook.calls] == [C.RETRY_RESET] and retried(p, down)
    assert not p.client_events(h2.events.ResponseReceived, sid)
    up2 = again(p, down, C)
    assert p.up.received(up2.id) == BODY


def test_a_reset_is_not_offered_without_on_reset(C):
    p = Proxy()
    hook = Hook()
    sid, down = p.request(GRPC, body=BODY)
    down.retry = C.RetryOn(hook, on_5xx=False, grpc_statuses=(14,))
    up = p.forward(down)
    p.server.reset_stream(up.id, INTERNAL_ERROR)
    p.pump()
    assert hook.calls == []
    assert dict(p.client_events(h2.events.ResponseReceived, sid)[0].headers)[b"grpc-status"] == b"14"


def test_a_body_over_the_replay_limit_is_not_retried(C):
    p = Proxy(down_settings={"initial_window_size": 1 << 20}, up_settings={"initial_window_size": 1 << 20})
    hook = Hook()
    sid, down = p.request(GRPC, end=False)
    down.retry = C.RetryOn(hook, grpc_statuses=(14,), on_reset=True)
    up = p.forward(down)
    body = b"x" * (65536 + 1)  # REPLAY_LIMIT, 64 KiB as Linkerd
    for i in range(0, len(body), 16384):
        p.client.send_data(sid, body[i : i + 16384], end_stream=i + 16384 >= len(body))
        p.pump()
    p.server.send_headers(up.id, TRAILERS_ONLY_14, end_stream=True)
    p.pump()
    assert hook.calls == [], "a request that cannot be sent again whole is not offered"
    assert dict(p.client_events(h2.events.ResponseReceived, sid)[0].headers)[b"grpc-status"] == b"14"


def test_a_request_still_streaming_is_retried_with_what_came_before_and_after(C):
    p = Proxy()
    hook = Hook()
    sid, down = p.request(GRPC, end=False)
    down.retry = C.RetryOn(hook, grpc_statuses=(14,))
    up = p.forward(down)
    p.client.send_data(sid, b"first")
    p.pump()
    p.server.send_headers(up.id, TRAILERS_ONLY_14, end_stream=True)
    p.pump()
    assert retried(p, down)
    p.client.send_data(sid, b"second", end_stream=True)  # arrives while no attempt is in flight: held
    p.pump()
    up2 = again(p, down, C)
    assert p.up.received(up2.id) == b"firstsecond"
    assert [e for e in p.up.peer_of(h2.events.StreamEnded) if e.stream_id == up2.id]


def test_abandon_cancels_the_attempt_and_keeps_the_request(C):
    p = Proxy()
    sid, down = p.request(POST, body=BODY)
    up = p.forward(down)
    assert C.abandon(down) is True
    p.pump()
    assert server_reset(p, up.id) == CANCEL and down.peer is None and down.attempts == 1
    assert not p.client_events(h2.events.ResponseReceived, sid)
    up2 = again(p, down, C)
    assert p.up.received(up2.id) == BODY
    # Once response headers are in, an attempt can no longer be abandoned.
    p.server.send_headers(up2.id, RESPONSE)
    p.pump()
    assert C.abandon(down) is False
    assert down.peer is up2


def test_abandon_without_an_attempt_changes_nothing(C):
    p = Proxy()
    _sid, down = p.request(POST, body=BODY)
    assert C.abandon(down) is False
    assert down.attempts == 0
