"""The cache administration API the operator uses: pin, unpin, release (--admin-token-file)."""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import SampleImages, StowageFactory
from tests.integration.test_eviction import blob_path, indexed, pull
from tests.support.registry import Registry
from tests.support.stowage import Stowage, run_cli
from tests.support.util import wait_until

pytestmark = pytest.mark.integration

GRACE = 2  # --gc-grace: released content goes this long after its last use


def _call(st: Stowage, method: str, action: str, image: str, token: str | None) -> tuple[int, dict]:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    resp = st.client().raw(method, f"/_stowage/v1/{action}?image={image}", headers)
    return resp.status, json.loads(resp.body)


def _pins(st: Stowage, repository: str) -> list[tuple[str | None, bool]]:
    out = run_cli("cache", "ls", "--json", "--data", str(st.data_dir))
    assert out.returncode == 0, out.stderr
    return [
        (r["tag"], r["pinned"]) for r in json.loads(out.stdout) if r["repository"] == repository
    ]


@pytest.fixture
def token(tmp_path: Path) -> tuple[Path, str]:
    value = secrets.token_hex(24)
    path = tmp_path / "admin-token"
    path.write_text(value + "\n")
    return path, value


def test_admin_api_is_off_without_a_token_file(
    stowage_factory: StowageFactory, registry: Registry
) -> None:
    st = stowage_factory(upstreams=[registry])
    status, body = _call(st, "PUT", "pins", f"{registry.host}/library/app:1", "anything")
    assert status == 404
    assert "--admin-token-file" in body["errors"][0]["message"]


def test_admin_api_needs_the_token(
    stowage_factory: StowageFactory, registry: Registry, token: tuple[Path, str]
) -> None:
    st = stowage_factory(upstreams=[registry], extra_args=[f"--admin-token-file={token[0]}"])
    image = f"{registry.host}/library/app:1"
    for given in (None, "wrong-token-of-some-length", token[1] + "x"):
        status, body = _call(st, "PUT", "pins", image, given)
        assert status == 401, given
        assert body["errors"][0]["code"] == "UNAUTHORIZED"
    status, body = _call(st, "PUT", "pins", "UPPER/Case:tag", token[1])
    assert status == 400 and body["errors"][0]["code"] == "NAME_INVALID"


def test_pin_unpin_and_release(
    stowage_factory: StowageFactory,
    registry: Registry,
    images: SampleImages,
    token: tuple[Path, str],
) -> None:
    st = stowage_factory(
        upstreams=[registry],
        extra_args=[
            f"--admin-token-file={token[0]}",
            "--gc-interval=1",
            f"--gc-grace={GRACE}",
        ],
    )
    app = images.app
    pull(st, registry, app)
    image = f"{registry.host}/library/app:1"
    assert _pins(st, "library/app") == [("1", False)]

    assert _call(st, "PUT", "pins", image, token[1]) == (
        200,
        {"image": image, "pinned": True, "changed": True},
    )
    assert _call(st, "PUT", "pins", image, token[1])[1]["changed"] is False
    assert _pins(st, "library/app") == [("1", True)]
    assert _call(st, "DELETE", "pins", image, token[1])[1] == {
        "image": image,
        "pinned": False,
        "changed": True,
    }
    assert _pins(st, "library/app") == [("1", False)]

    # Released: the names go at once, the content once unused for the grace period.
    _call(st, "PUT", "pins", image, token[1])
    assert _call(st, "POST", "release", image, token[1]) == (
        200,
        {"image": image, "released": True},
    )
    assert _pins(st, "library/app") == []
    digests = [app.manifest_digest, *(d for d, _ in app.blobs)]
    wait_until(
        lambda: not set(digests) & set(indexed(st)),
        timeout=GRACE + 15,
        interval=0.2,
        describe=st.log_tail,
    )
    for digest, _ in app.blobs:
        assert not blob_path(st, digest).exists()
    # A pull after the release fetches it again and serves it right.
    pull(st, registry, app)


def test_a_locked_index_is_503_not_500(
    stowage_factory: StowageFactory, registry: Registry, token: tuple[Path, str]
) -> None:
    """An index write that cannot happen (here another process holds the write lock
    past the busy timeout; a full disk does the same) is a 503 naming it."""
    st = stowage_factory(upstreams=[registry], extra_args=[f"--admin-token-file={token[0]}"])
    image = f"{registry.host}/library/app:1"
    holder = sqlite3.connect(st.data_dir / "index.db", isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        answers = [
            _call(st, m, a, image, token[1]) for m, a in (("PUT", "pins"), ("POST", "release"))
        ]
    finally:
        holder.close()
    for status, body in answers:
        assert status == 503, body
        assert "cache index cannot be written now" in body["errors"][0]["message"]
        assert "locked" in body["errors"][0]["message"]
    status, body = _call(st, "PUT", "pins", image, token[1])  # the lock gone: it works
    assert (status, body["pinned"]) == (200, True), body
    assert "Traceback" not in st.log_text()
