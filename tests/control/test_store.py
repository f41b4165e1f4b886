"""control.store: the raw objects by source, and the one change signal."""

from __future__ import annotations

import copy
import re
import sys
import threading

import pytest

from control.store import Store, key_of


def obj(name: str, kind: str = "VirtualService", ns: str | None = "default", **spec) -> dict:
    meta = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    api = "networking.istio.io/v1" if kind != "Service" else "v1"
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": dict(spec)}


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def store() -> tuple[Store, Recorder]:
    rec = Recorder()
    return Store(on_change=rec), rec


# -- key_of -----------------------------------------------------------------------------------------


def test_key_of_grouped_and_core_and_cluster_scoped():
    assert key_of(obj("reviews")) == ("networking.istio.io", "VirtualService", "default", "reviews")
    assert key_of(obj("reviews", kind="Service")) == ("", "Service", "default", "reviews")
    assert key_of({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}) == (
        "",
        "Namespace",
        "",
        "prod",
    )
    # the version is not part of the identity: v1beta1 and v1 name the same object
    a = obj("r") | {"apiVersion": "networking.istio.io/v1beta1"}
    assert key_of(a) == key_of(obj("r"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "not a mapping"),
        ("text", "not a mapping"),
        ({"kind": "Service", "metadata": {"name": "a"}}, "apiVersion is missing"),
        ({"apiVersion": "", "kind": "Service", "metadata": {"name": "a"}}, "apiVersion is missing"),
        ({"apiVersion": 1, "kind": "Service", "metadata": {"name": "a"}}, "apiVersion is missing"),
        ({"apiVersion": "v1", "metadata": {"name": "a"}}, "kind is missing"),
        ({"apiVersion": "v1", "kind": "", "metadata": {"name": "a"}}, "kind is missing"),
        ({"apiVersion": "v1", "kind": "Service"}, "metadata.name is missing"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": []}, "metadata.name is missing"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": ""}}, "metadata.name is missing"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": 3}}, "metadata.name is missing"),
        (
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": ["x"]}},
            "metadata.namespace is not a string",
        ),
    ],
)
def test_key_of_errors(value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        key_of(value)


# -- replace ----------------------------------------------------------------------------------------


def test_replace_sets_and_signals(store):
    s, rec = store
    a, b = obj("a"), obj("b")
    s.replace("file:x.yaml", [b, a])
    assert (s.revision, rec.calls) == (1, 1)
    assert s.snapshot() == (1, [(a, "file:x.yaml"), (b, "file:x.yaml")])
    assert s.sources() == ["file:x.yaml"]


def test_replace_with_equal_content_does_not_signal(store):
    s, rec = store
    s.replace("src", [obj("a"), obj("b")])
    # equal content, other dict instances, other order: nothing changed
    s.replace("src", [copy.deepcopy(obj("b")), copy.deepcopy(obj("a"))])
    assert (s.revision, rec.calls) == (1, 1)


def test_replace_is_whole_drops_what_is_not_listed(store):
    s, rec = store
    s.replace("src", [obj("a"), obj("b")])
    s.replace("src", [obj("b")])
    assert (s.revision, rec.calls) == (2, 2)
    assert [o["metadata"]["name"] for o, _ in s.snapshot()[1]] == ["b"]


def test_replace_with_changed_content_signals(store):
    s, rec = store
    s.replace("src", [obj("a", hosts=["x"])])
    s.replace("src", [obj("a", hosts=["y"])])
    assert (s.revision, rec.calls) == (2, 2)
    assert s.snapshot()[1][0][0]["spec"] == {"hosts": ["y"]}


def test_replace_empty_removes_the_source_and_empty_on_unknown_source_is_silent(store):
    s, rec = store
    s.replace("nothing", [])
    assert (s.revision, rec.calls, s.sources()) == (0, 0, [])
    s.replace("src", [obj("a")])
    s.replace("src", [])
    assert (s.revision, rec.calls, s.sources(), s.snapshot()) == (2, 2, [], (2, []))
    s.replace("src", [])
    assert (s.revision, rec.calls) == (2, 2)


def test_replace_with_a_bad_object_raises_and_changes_nothing(store):
    s, rec = store
    s.replace("src", [obj("a")])
    with pytest.raises(ValueError, match=r"metadata\.name is missing"):
        s.replace("src", [obj("b"), {"apiVersion": "v1", "kind": "Service", "metadata": {}}])
    assert (s.revision, rec.calls) == (1, 1)
    assert [o["metadata"]["name"] for o, _ in s.snapshot()[1]] == ["a"]


def test_sources_are_independent(store):
    s, _ = store
    s.replace("file:a.yaml", [obj("same")])
    s.replace("file:b.yaml", [obj("same")])
    s.replace("file:a.yaml", [])
    assert s.snapshot()[1] == [(obj("same"), "file:b.yaml")]


# -- upsert / delete ----------------------------------------------------------------------------


def test_upsert_adds_replaces_and_ignores_equal(store):
    s, rec = store
    s.upsert("kube", obj("a", hosts=["1"]))
    s.upsert("kube", obj("a", hosts=["1"]))
    assert (s.revision, rec.calls) == (1, 1)
    s.upsert("kube", obj("a", hosts=["2"]))
    s.upsert("kube", obj("b"))
    assert (s.revision, rec.calls) == (3, 3)
    assert s.snapshot() == (3, [(obj("a", hosts=["2"]), "kube"), (obj("b"), "kube")])


def test_upsert_bad_object_raises_without_signal(store):
    s, rec = store
    with pytest.raises(ValueError, match="kind is missing"):
        s.upsert("kube", {"apiVersion": "v1", "metadata": {"name": "a"}})
    assert (s.revision, rec.calls, s.sources()) == (0, 0, [])


def test_delete(store):
    s, rec = store
    s.upsert("kube", obj("a"))
    s.upsert("kube", obj("b"))
    s.delete("kube", key_of(obj("a")))
    assert (s.revision, rec.calls) == (3, 3)
    assert s.snapshot()[1] == [(obj("b"), "kube")]
    # deleting what is not there: no signal
    s.delete("kube", key_of(obj("a")))
    s.delete("nowhere", key_of(obj("b")))
    assert (s.revision, rec.calls) == (3, 3)
    # deleting the last object of a source removes the source
    s.delete("kube", key_of(obj("b")))
    assert (s.revision, rec.calls, s.sources(), s.snapshot()) == (4, 4, [], (4, []))


def test_no_callback_is_fine():
    s = Store()
    s.upsert("kube", obj("a"))
    s.replace("src", [obj("b")])
    s.delete("kube", key_of(obj("a")))
    assert s.revision == 3


def test_on_change_is_called_after_the_lock_is_released():
    """The callback may read the store (it runs on the writing thread, outside the lock)."""
    seen = []
    s = Store()
    s.on_change = lambda: seen.append(s.snapshot())
    s.upsert("kube", obj("a"))
    assert seen == [(1, [(obj("a"), "kube")])]


# -- snapshot order -----------------------------------------------------------------------------


def test_snapshot_order_by_source_then_key(store):
    s, _ = store
    svc = obj("zeta", kind="Service")
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}
    vs_other = obj("alpha", ns="other")
    vs_default = obj("beta")
    s.replace("file:b.yaml", [vs_other, vs_default])
    s.replace("file:a.yaml", [svc, ns])
    s.upsert("kube", obj("k"))
    rev, pairs = s.snapshot()
    assert rev == 3
    assert pairs == [
        # file:a.yaml: ("", "Namespace", "", "prod") < ("", "Service", "default", "zeta")
        (ns, "file:a.yaml"),
        (svc, "file:a.yaml"),
        # file:b.yaml: namespace "default" < "other"
        (vs_default, "file:b.yaml"),
        (vs_other, "file:b.yaml"),
        (obj("k"), "kube"),
    ]
    assert s.sources() == ["file:a.yaml", "file:b.yaml", "kube"]


# -- threads ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_concurrent_writers():
    calls = []
    lock = threading.Lock()

    def on_change():
        with lock:
            calls.append(1)

    s = Store(on_change=on_change)
    threads, per_thread = 8, 200
    barrier = threading.Barrier(threads)

    def writer(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            s.upsert(f"src{t % 2}", obj(f"t{t}-{i}"))
            s.upsert(f"src{t % 2}", obj(f"t{t}-{i}"))  # equal: no change
            if i % 2:
                s.delete(f"src{t % 2}", key_of(obj(f"t{t}-{i}")))
            s.snapshot()

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    rev, pairs = s.snapshot()
    # every thread: per_thread upserts and per_thread / 2 deletes took effect, nothing else did
    assert rev == threads * per_thread * 3 // 2
    assert len(calls) == rev
    assert len(pairs) == threads * per_thread // 2
    names = sorted(o["metadata"]["name"] for o, _ in pairs)
    assert names == sorted(f"t{t}-{i}" for t in range(threads) for i in range(0, per_thread, 2))
    assert s.sources() == ["src0", "src1"]
