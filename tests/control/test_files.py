"""control.sources.files: a directory of YAML into the store, and inotify following its changes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from control.sources.files import DirectorySource, read_file, read_text
from control.store import Store

pytestmark = pytest.mark.timeout(30)

#: How long a change may take to reach the store (inotify, then the settle delay).
DEADLINE_S = 2.0


def vs_doc(name: str, host: str = "reviews.local", ns: str = "default") -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{hosts: [{host}], http: [{{route: [{{destination: {{host: {host}}}}}]}}]}}\n"
    )


NS_DOC = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def names(store: Store) -> list[tuple[str, str]]:
    """(source, kind/name) of everything in the store, in snapshot order."""
    return [(src, f"{o['kind']}/{o['metadata']['name']}") for o, src in store.snapshot()[1]]


async def wait_for(predicate: Callable[[], bool], deadline_s: float = DEADLINE_S) -> float:
    """Poll ``predicate`` until it holds; the seconds it took. Fails after ``deadline_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > deadline_s:
            raise AssertionError(f"not within {deadline_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def write_and_rename(path: Path, text: str) -> None:
    """As editors (and kubectl cp, and atomic writers) do: a temporary file, then rename over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_in_place(path: Path, text: str) -> None:
    with open(path, "r+" if path.exists() else "w") as f:
        f.truncate(0)
        f.write(text)


# -- reading ------------------------------------------------------------------------------------


def test_read_text_multi_document_list_and_empty_documents():
    text = (
        "---\n"  # an empty first document
        + vs_doc("a")
        + "---\n"
        + "# only a comment\n"
        + "---\n"
        + "apiVersion: v1\nkind: List\nitems:\n"
        + "- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n"
        + "- {apiVersion: v1, kind: Namespace, metadata: {name: y}}\n"
    )
    objects, problems = read_text(text)
    assert problems == []
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("VirtualService", "a"),
        ("Namespace", "x"),
        ("Namespace", "y"),
    ]


def test_read_text_reports_unidentifiable_documents_and_keeps_the_rest():
    text = (
        vs_doc("a")
        + "---\napiVersion: v1\nkind: Namespace\nmetadata: {namespace: x}\n"
        + "---\n- just\n- a list\n"
        + "---\nkind: Namespace\nmetadata: {name: q}\n"
        + "---\n"
        + vs_doc("b")
    )
    objects, problems = read_text(text)
    assert [o["metadata"]["name"] for o in objects] == ["a", "b"]
    assert problems == [
        "document 2: metadata.name is missing",
        "document 3: not a mapping",
        "document 4: apiVersion is missing",
    ]


def test_read_file_syntax_error_raises(tmp_path):
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(yaml.YAMLError):
        read_file(p)


# -- load ---------------------------------------------------------------------------------------


def test_initial_load_skips_hidden_and_non_yaml(tmp_path):
    (tmp_path / "routes.yaml").write_text(vs_doc("a") + "---\n" + vs_doc("b", "ratings.local"))
    (tmp_path / "list.yml").write_text(
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n"
    )
    (tmp_path / "ns.json").write_text('{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}')
    (tmp_path / ".routes.yaml.swp").write_text(vs_doc("swap"))
    (tmp_path / ".hidden.yaml").write_text(vs_doc("hidden"))
    (tmp_path / "README.md").write_text(vs_doc("readme"))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / "nested.yaml").mkdir()
    (tmp_path / "nested.yaml" / "inner.yaml").write_text(vs_doc("inner"))
    (tmp_path / "..data").mkdir()
    calls = []
    store = Store(on_change=lambda: calls.append(1))
    source = DirectorySource(store, tmp_path)
    source.load()
    assert names(store) == [
        ("file:list.yml", "Namespace/shop"),
        ("file:ns.json", "Namespace/prod"),
        ("file:routes.yaml", "VirtualService/a"),
        ("file:routes.yaml", "VirtualService/b"),
    ]
    assert source.errors == {}
    assert (store.revision, len(calls)) == (3, 3)
    # loading again, nothing changed: no signal
    source.load()
    assert (store.revision, len(calls)) == (3, 3)


def test_document_without_name_is_reported_and_the_rest_applies(tmp_path):
    (tmp_path / "mixed.yaml").write_text(
        vs_doc("a") + "---\napiVersion: v1\nkind: Namespace\nmetadata: {}\n---\n" + vs_doc("b")
    )
    store = Store()
    source = DirectorySource(store, tmp_path)
    source.load()
    assert names(store) == [("file:mixed.yaml", "VirtualService/a"), ("file:mixed.yaml", "VirtualService/b")]
    assert source.errors == {"mixed.yaml": ["document 2: metadata.name is missing"]}


def test_syntax_error_keeps_the_last_good_content(tmp_path, caplog):
    path = tmp_path / "routes.yaml"
    path.write_text(vs_doc("a"))
    (tmp_path / "other.yaml").write_text(NS_DOC)
    store = Store()
    source = DirectorySource(store, tmp_path)
    source.load()
    before = store.snapshot()
    path.write_text(vs_doc("a") + "---\nspec: {hosts: [unclosed\n")
    source.load()
    assert store.snapshot() == before
    assert source.errors == {
        "routes.yaml": [
            "YAML syntax error at line 7, column 1: expected ',' or ']', but got '<stream end>' "
            "(its last good content stays in force)"
        ]
    }
    assert "routes.yaml: YAML syntax error" in caplog.text
    # fixed: the new content applies and the error is gone
    path.write_text(vs_doc("c"))
    source.load()
    assert names(store) == [("file:other.yaml", "Namespace/shop"), ("file:routes.yaml", "VirtualService/c")]
    assert source.errors == {}


def test_syntax_error_on_first_read_contributes_nothing(tmp_path):
    (tmp_path / "bad.yaml").write_text("kind: [\n")
    (tmp_path / "good.yaml").write_text(NS_DOC)
    store = Store()
    source = DirectorySource(store, tmp_path)
    source.load()
    assert names(store) == [("file:good.yaml", "Namespace/shop")]
    assert list(source.errors) == ["bad.yaml"]
    assert source.errors["bad.yaml"][0].startswith("YAML syntax error at line 2, column 1: ")


def test_undecodable_file_is_reported(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"kind: caf\xe9\n")
    source = DirectorySource(Store(), tmp_path)
    source.load()
    (message,) = source.errors["latin1.yaml"]
    assert message.startswith("cannot read: 'utf-8' codec can't decode byte 0xe9")
    assert message.endswith("(its last good content stays in force)")


def test_deleting_a_file_removes_its_objects(tmp_path):
    (tmp_path / "a.yaml").write_text(vs_doc("a"))
    (tmp_path / "b.yaml").write_text(vs_doc("b"))
    store = Store()
    source = DirectorySource(store, tmp_path)
    source.load()
    (tmp_path / "a.yaml").unlink()
    source.load()
    assert names(store) == [("file:b.yaml", "VirtualService/b")]
    assert store.sources() == ["file:b.yaml"]
    # a source that is not a file is left alone
    store.upsert("kube", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "k"}})
    (tmp_path / "b.yaml").unlink()
    source.load()
    assert store.sources() == ["kube"]


def test_load_of_a_missing_directory_raises(tmp_path):
    with pytest.raises(OSError):
        DirectorySource(Store(), tmp_path / "nope").load()


# -- the watcher --------------------------------------------------------------------------------


class Counting(DirectorySource):
    """Counts the re-reads, so a test can wait for one that must change nothing."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.loads = 0

    def load(self) -> None:
        self.loads += 1
        super().load()


def test_watcher_follows_edits(tmp_path):
    async def main() -> None:
        path = tmp_path / "routes.yaml"
        path.write_text(vs_doc("a"))
        store = Store()
        source = Counting(store, tmp_path)
        source.start()
        try:
            assert names(store) == [("file:routes.yaml", "VirtualService/a")]
            rev = store.revision

            # an editor's save: write a temporary file, rename it over
            write_and_rename(path, vs_doc("b"))
            await wait_for(lambda: store.revision > rev)
            assert names(store) == [("file:routes.yaml", "VirtualService/b")]
            rev = store.revision

            # an in-place write
            write_in_place(path, vs_doc("c") + "---\n" + NS_DOC)
            await wait_for(
                lambda: (
                    names(store) == [("file:routes.yaml", "Namespace/shop"), ("file:routes.yaml", "VirtualService/c")]
                )
            )
            rev = store.revision

            # a new file
            (tmp_path / "more.yaml").write_text(vs_doc("d"))
            await wait_for(lambda: ("file:more.yaml", "VirtualService/d") in names(store))
            rev = store.revision

            # touched, and rewritten with the same bytes: re-read, but the store does not change
            loads = source.loads
            os.utime(path)
            await wait_for(lambda: source.loads > loads)
            loads = source.loads
            write_and_rename(path, path.read_text())
            await wait_for(lambda: source.loads > loads)
            await asyncio.sleep(0.1)
            assert store.revision == rev

            # a broken save keeps the last good content; the error is reported
            loads = source.loads
            write_in_place(path, "spec: [\n")
            await wait_for(lambda: source.loads > loads and "routes.yaml" in source.errors)
            assert store.revision == rev
            assert ("file:routes.yaml", "VirtualService/c") in names(store)

            # deleted
            path.unlink()
            await wait_for(lambda: store.sources() == ["file:more.yaml"])
            assert source.errors == {}
        finally:
            await source.stop()

    asyncio.run(main())


def test_watcher_sees_a_change_made_right_after_start(tmp_path):
    """start() reads the directory, then the watch begins in a task: a write in between counts."""

    async def main() -> None:
        store = Store()
        source = DirectorySource(store, tmp_path)
        source.start()
        (tmp_path / "early.yaml").write_text(NS_DOC)  # before the task has had a chance to run
        try:
            await wait_for(lambda: store.sources() == ["file:early.yaml"])
        finally:
            await source.stop()

    asyncio.run(main())


def test_a_burst_of_writes_is_one_reread(tmp_path):
    async def main() -> None:
        store = Store()
        source = Counting(store, tmp_path)
        source.start()
        await asyncio.sleep(0.05)  # the watch is set up
        loads = source.loads
        for i in range(5):
            (tmp_path / f"f{i}.yaml").write_text(vs_doc(f"v{i}"))
        try:
            await wait_for(lambda: len(store.sources()) == 5)
            await asyncio.sleep(0.1)
            # five files written at once: far fewer re-reads than events (CREATE, MODIFY, CLOSE_WRITE each)
            assert 1 <= source.loads - loads <= 3
        finally:
            await source.stop()

    asyncio.run(main())


def test_stop_ends_the_watch(tmp_path):
    async def main() -> None:
        store = Store()
        source = DirectorySource(store, tmp_path)
        source.start()
        await asyncio.sleep(0.05)
        await source.stop()
        assert source._task.done()
        (tmp_path / "late.yaml").write_text(NS_DOC)
        await asyncio.sleep(0.2)
        assert store.sources() == []

    asyncio.run(main())
