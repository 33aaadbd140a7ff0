"""Integrity logic on real files and a real SQLite index: classifying files as manifests when
rebuilding, telling a corrupt index from a missing one, rebuilding in place, verifying."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stowage.oci.digest import Digest
from stowage.oci.manifest import DOCKER_V1_SIGNED, OCI_INDEX, OCI_MANIFEST
from stowage.store.blobs import BlobStore
from stowage.store.index import Index
from stowage.store.reindex import (
    CorruptManifest,
    inspect_index,
    move_aside,
    read_manifest,
    rebuild,
    reindex,
)
from stowage.store.verify import verify

LAYER = "sha256:" + "ab" * 32
CONFIG = "sha256:" + "cd" * 32


def manifest_doc(**extra: object) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": CONFIG,
            "size": 2,
        },
        "layers": [{"mediaType": "x", "digest": LAYER, "size": 3}],
        **extra,
    }


def put(store: BlobStore, body: bytes) -> Digest:
    digest = Digest.of(body)
    store.write(digest, body)
    return digest


def classify(store: BlobStore, body: bytes, known: str | None = None) -> object:
    digest = put(store, body)
    return read_manifest(store.path(digest), digest, len(body), known)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path)


def test_manifests_and_indexes_are_recognised_with_their_references(store: BlobStore) -> None:
    assert classify(store, json.dumps(manifest_doc()).encode()) == (
        OCI_MANIFEST,
        [(CONFIG, "config"), (LAYER, "layer")],
    )
    child = "sha256:" + "ef" * 32
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"digest": child, "size": 9}],
    }
    assert classify(store, json.dumps(index).encode()) == (OCI_INDEX, [(child, "manifest")])
    # OCI allows omitting mediaType: the shape decides.
    bare = manifest_doc()
    del bare["mediaType"]
    assert classify(store, b"  \n" + json.dumps(bare).encode()) == (
        OCI_MANIFEST,
        [(CONFIG, "config"), (LAYER, "layer")],
    )
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": LAYER}], "signatures": []}
    assert classify(store, json.dumps(schema1).encode()) == (DOCKER_V1_SIGNED, [(LAYER, "layer")])


def test_other_content_is_a_blob(store: BlobStore) -> None:
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
    assert classify(store, json.dumps(config).encode()) is None
    assert classify(store, random.Random(1).randbytes(4096)) is None
    assert classify(store, b'{"mediaType": "application/vnd.example+json"}') is None
    assert classify(store, b"[1, 2]") is None
    assert classify(store, b"{not json") is None
    # What the old index recorded as a manifest stays one, whatever its shape.
    odd = b'{"mediaType": "application/vnd.example+json"}'
    assert classify(store, odd, "application/vnd.example+json") == (
        "application/vnd.example+json",
        [],
    )


def test_a_manifest_that_does_not_match_its_digest_is_corrupt(store: BlobStore) -> None:
    body = json.dumps(manifest_doc()).encode()
    digest = put(store, body)
    store.path(digest).write_bytes(body.replace(b"ab", b"ac", 1))
    with pytest.raises(CorruptManifest):
        read_manifest(store.path(digest), digest, len(body))


def test_inspect_index_tells_missing_corrupt_and_ok_apart(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    assert inspect_index(path)[0] == "missing"
    path.write_bytes(b"")
    assert inspect_index(path)[0] == "missing"  # an empty file holds no index
    path.write_bytes(random.Random(2).randbytes(8192))
    state, detail = inspect_index(path)
    assert state == "corrupt" and detail
    path.unlink()
    Index(path).close()
    assert inspect_index(path) == ("ok", "")
    # The first page intact, the rest gone: SQLite sees a malformed image.
    content = path.read_bytes()
    path.write_bytes(content[:100] + b"\xff" * 4000)
    assert inspect_index(path)[0] == "corrupt"


def test_move_aside_takes_the_wal_along_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    for n in range(2):
        path.write_bytes(b"bad %d" % n)
        (tmp_path / "index.db-wal").write_bytes(b"wal %d" % n)
        moved = move_aside(path)
        assert moved.read_bytes() == b"bad %d" % n
        assert (tmp_path / f"{moved.name}-wal").read_bytes() == b"wal %d" % n
        assert not path.exists() and not (tmp_path / "index.db-wal").exists()
    assert len(list(tmp_path.glob("index.db.corrupt-*"))) == 4


def test_rebuild_in_place_keeps_tags_and_access_times_of_what_is_on_disk(
    tmp_path: Path, store: BlobStore
) -> None:
    body = json.dumps(manifest_doc()).encode()
    kept = put(store, body)
    gone = Digest.of(b"a manifest whose file was lost")
    layer = put(store, b"layer bytes")
    index = Index(tmp_path / "index.db")
    index.add_manifest("r.io", "app", str(kept), "application/custom+json", len(body), [])
    index.add_manifest("r.io", "app", str(gone), OCI_MANIFEST, 10, [])
    index.set_tag("r.io", "app", "1", str(kept))
    index.set_tag("r.io", "app", "2", str(gone))
    index.db.execute("UPDATE manifests SET last_access=42, created=41")

    report = rebuild(store, index)
    assert (report.blobs, report.manifests, report.tags_kept, report.tags_dropped) == (1, 1, 1, 1)
    rows = index.db.execute("SELECT digest, media_type, created, last_access FROM manifests")
    # The media type upstream gave is kept; so are the access times.
    assert rows.fetchall() == [(str(kept), "application/custom+json", 41, 42)]
    assert index.tag("r.io", "app", "1") is not None
    assert index.tag("r.io", "app", "2") is None
    assert index.db.execute("SELECT digest FROM blobs").fetchall() == [(str(layer),)]
    refs = index.db.execute("SELECT child, kind FROM manifest_refs WHERE parent=?", (str(kept),))
    assert sorted(refs.fetchall()) == sorted([(CONFIG, "config"), (LAYER, "layer")])
    index.close()


def test_reindex_of_a_corrupt_index_starts_from_the_files(tmp_path: Path, store: BlobStore) -> None:
    manifest = put(store, json.dumps(manifest_doc()).encode())
    layer = put(store, b"some layer")
    (tmp_path / "index.db").write_bytes(b"garbage" * 1000)
    report = reindex(tmp_path)
    assert report.moved_aside is not None and report.moved_aside.exists()
    assert report.reason
    assert (report.blobs, report.manifests, report.tags_kept) == (1, 1, 0)
    index = Index(tmp_path / "index.db")
    assert index.manifest(str(manifest)) is not None
    assert index.db.execute("SELECT digest FROM blobs").fetchall() == [(str(layer),)]
    index.close()


def test_verify_removes_corrupt_files_and_rows_without_files(
    tmp_path: Path, store: BlobStore
) -> None:
    index = Index(tmp_path / "index.db")
    good = put(store, b"good blob")
    bad = put(store, b"bad blob")
    body = json.dumps(manifest_doc()).encode()
    manifest = put(store, body)
    missing = put(store, b"soon missing")
    for digest in (good, bad, missing):
        index.add_blob(str(digest), store.size(digest) or 0)
    index.add_manifest("r.io", "app", str(manifest), OCI_MANIFEST, len(body), [])
    index.set_tag("r.io", "app", "1", str(manifest))
    assert verify(store, index).clean

    store.path(bad).write_bytes(b"bad blub")
    store.path(manifest).write_bytes(body[:-1] + b" ")
    store.remove(missing)
    report = verify(store, index)
    found = {(f.digest, f.kind, f.problem, f.tags) for f in report.findings}
    assert found == {
        (str(bad), "blob", "corrupt", ()),
        (str(manifest), "manifest", "corrupt", ("r.io/app:1",)),
        (str(missing), "blob", "missing", ()),
    }
    assert report.files == 3
    assert store.size(bad) is None and store.size(manifest) is None
    assert store.size(good) is not None
    assert index.tag("r.io", "app", "1") is None
    rows = index.db.execute("SELECT digest FROM blobs UNION SELECT digest FROM manifests")
    assert rows.fetchall() == [(str(good),)]
    assert verify(store, index).clean
    index.close()
