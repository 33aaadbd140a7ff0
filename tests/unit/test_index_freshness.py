"""The index's in-memory copy follows commits made by other connections (the CLI, the
collector), also when the server commits something of its own right after them."""

from __future__ import annotations

from pathlib import Path

from stowage.store.index import Index

DIGEST = "sha256:" + "1" * 64
BLOB = "sha256:" + "2" * 64


def test_a_removal_elsewhere_is_seen_after_an_own_write(tmp_path: Path) -> None:
    server, cli = Index(tmp_path / "index.db"), Index(tmp_path / "index.db")
    server.set_tag("docker.io", "library/app", "1", DIGEST)
    assert server.tag("docker.io", "library/app", "1") is not None  # now in memory

    cli.remove_image("docker.io", "library/app", "1", None)
    server.add_blob(BLOB, 10)  # the server writes before it next reads

    assert server.tag("docker.io", "library/app", "1") is None
    server.close()
    cli.close()
