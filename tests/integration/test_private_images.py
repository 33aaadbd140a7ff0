"""Private images: an image whose upstream required credentials is served from the cache
only to clients whose credentials upstream accepts for that repository.

Upstream is CNCF Distribution with the harness's token issuer: ``private/*`` is readable by
stowage's own account (``--auth-file``) and by alice, not by bob (a valid account without
access) nor anonymously; ``public/*`` is readable anonymously. Clients are skopeo and raw
HTTP with Basic credentials, as containerd and skopeo send them to a registry (stowage).
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RegistryFactory, StowageFactory
from tests.support.images import PushedImage, push_image
from tests.support.regclient import ACCEPT_ALL_MANIFESTS, Response, sha256_digest
from tests.support.registry import Registry, TokenUser
from tests.support.stowage import Stowage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SVC, SVC_PW = "stowage-svc", "svc-Secret-pw-9Lp"  # stowage's own upstream account
ALICE, ALICE_PW = "alice", "alice-Secret-pw-7Qx"  # may pull private/app
BOB, BOB_PW = "bob", "bob-Secret-pw-3Kz"  # valid account, no access to private/*
USERS = {
    SVC: TokenUser(SVC_PW, {"private/*": ["pull"], "public/*": ["pull"]}),
    ALICE: TokenUser(ALICE_PW, {"private/app": ["pull"]}),
    BOB: TokenUser(BOB_PW, {"elsewhere/*": ["pull"]}),
}
ANONYMOUS = {"public/*": ["pull"]}
CHALLENGE = 'Basic realm="stowage"'


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": f"Basic {_b64(user, password)}"}


ANON: dict[str, str] = {}
AS_ALICE = basic(ALICE, ALICE_PW)
AS_BOB = basic(BOB, BOB_PW)


@dataclass
class Upstream:
    registry: Registry
    private: PushedImage  # private/app:1
    public: PushedImage  # public/app:1

    @property
    def prefix(self) -> str:
        return self.registry.path_prefix


def _seed(reg: Registry) -> Upstream:
    return Upstream(
        reg,
        private=push_image(reg, "private/app", "1", layer_sizes=(700, 1500)),
        public=push_image(reg, "public/app", "1", layer_sizes=(600, 1200)),
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A token-auth upstream shared by the tests that never stop it."""
    _require("docker-registry", "skopeo")
    with Registry(
        "token",
        users=USERS,
        anonymous=ANONYMOUS,
        workdir=tmp_path_factory.mktemp("private-upstream"),
    ) as reg:
        yield _seed(reg)


def start_stowage(factory: StowageFactory, up: Upstream, tmp_path: Path, *extra: str) -> Stowage:
    auth = tmp_path / "stowage-auth.json"
    auth.write_text(json.dumps({"auths": {up.registry.host: {"auth": _b64(SVC, SVC_PW)}}}))
    return factory(upstreams=[up.registry], auth_file=auth, extra_args=list(extra))


def get(stowage: Stowage, path: str, headers: dict[str, str], method: str = "GET") -> Response:
    return stowage.client().raw(method, path, {"Accept": ACCEPT_ALL_MANIFESTS, **headers})


def paths(up: Upstream, image: PushedImage) -> dict[str, tuple[str, bytes | None]]:
    """Request paths of an image -> (what, expected body or None when unknown here)."""
    base = f"/v2/{up.prefix}/{image.repository}"
    out: dict[str, tuple[str, bytes | None]] = {
        f"{base}/manifests/{image.tag}": ("manifest by tag", image.manifest_bytes),
        f"{base}/manifests/{image.manifest_digest}": ("manifest by digest", image.manifest_bytes),
    }
    for digest, _ in image.blobs:
        out[f"{base}/blobs/{digest}"] = ("blob", None)
    return out


def assert_refused(resp: Response, status: int, secret_bodies: list[bytes], what: str) -> None:
    """An OCI error with ``status`` (401 carries stowage's Basic challenge), never content."""
    detail = f"{what}: {resp.status} {resp.body[:300]!r}"
    assert resp.status == status, detail
    for body in secret_bodies:
        assert body not in resp.body, detail
    if status == 401:
        assert resp.header("WWW-Authenticate") == CHALLENGE, detail
    if resp.body:  # GET: an OCI error document (HEAD: none)
        codes = {e["code"] for e in json.loads(resp.body)["errors"]}
        assert codes == {"UNAUTHORIZED" if status == 401 else "DENIED"}, detail


def blob_bytes(up: Upstream, image: PushedImage) -> list[bytes]:
    client = up.registry.client()
    return [client.get_blob(image.repository, d).body for d, _ in image.blobs]


def skopeo_pull(
    stowage: Stowage, name: str, dest: Path, creds: tuple[str, str] | None
) -> subprocess.CompletedProcess[str]:
    """skopeo copy from stowage, isolated from the host's containers configuration."""
    with tempfile.TemporaryDirectory(prefix="skopeo-private-") as tmp:
        (Path(tmp) / "auth.json").write_text("{}")
        (Path(tmp) / "registries.conf").write_text("")
        argv = [
            shutil.which("skopeo") or "skopeo",
            "--insecure-policy",
            "--registries-conf",
            f"{tmp}/registries.conf",
            "copy",
            "--src-tls-verify=false",
            "--src-authfile",
            f"{tmp}/auth.json",
            *(["--src-creds", f"{creds[0]}:{creds[1]}"] if creds else []),
            f"docker://{stowage.host}/{name}",
            f"oci:{dest}:pulled",
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_pulled_layout(dest: Path, image: PushedImage) -> None:
    index = json.loads((dest / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest_digest]
    for digest, size in [(image.manifest_digest, len(image.manifest_bytes)), *image.blobs]:
        data = (dest / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert (len(data), sha256_digest(data)) == (size, digest)


def assert_no_secrets(stowage: Stowage) -> None:
    log = stowage.log_text()
    assert "Traceback" not in log, log[-3000:]
    for user, password in ((SVC, SVC_PW), (ALICE, ALICE_PW), (BOB, BOB_PW)):
        assert password not in log and _b64(user, password) not in log
    assert "eyJ" not in log  # no bearer token (JWT)


def alice_checks(up: Upstream) -> int:
    issuer = up.registry.token_issuer
    assert issuer is not None
    return len([e for e in issuer.events() if e.get("user") == ALICE])


def repo_access_rows(stowage: Stowage) -> dict[str, int]:
    db = sqlite3.connect(stowage.data_dir / "index.db")
    try:
        rows = db.execute("SELECT repository, private FROM repo_access").fetchall()
    finally:
        db.close()
    return dict(rows)


# --- the gate ------------------------------------------------------------------------------


def test_private_image_only_for_credentials_upstream_accepts(
    upstream: Upstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    up, image = upstream, upstream.private
    stowage = start_stowage(stowage_factory, up, tmp_path)
    reg = up.registry
    secrets = [image.manifest_bytes, *blob_bytes(up, image)]
    name = f"{up.prefix}/private/app:1"

    # The ping challenges anonymous clients, so that skopeo and docker send credentials.
    ping = get(stowage, "/v2/", ANON)
    assert (ping.status, ping.header("WWW-Authenticate")) == (401, CHALLENGE)
    assert get(stowage, "/v2/", AS_BOB).status == 200

    # Anonymous before anything is cached: refused, and nothing fetched for it.
    since = reg.checkpoint()
    for path, (what, _) in paths(up, image).items():
        assert_refused(get(stowage, path, ANON), 401, secrets, what)
    assert reg.count("GET", "/private/app/", since=since) == 0
    assert [p for p in (stowage.data_dir / "blobs").rglob("*") if p.is_file()] == []
    assert repo_access_rows(stowage) == {}  # kept only for repositories with content

    # Alice pulls with skopeo (credentials sent after stowage's challenge)...
    proc = skopeo_pull(stowage, name, tmp_path / "alice", (ALICE, ALICE_PW))
    assert proc.returncode == 0, f"{proc.stderr}\n{stowage.log_tail()}"
    assert_pulled_layout(tmp_path / "alice", image)
    assert repo_access_rows(stowage) == {"private/app": 1}
    # ...and with raw HTTP Basic: every manifest and blob, GET and HEAD.
    checks = alice_checks(up)
    for path, (what, body) in paths(up, image).items():
        resp = get(stowage, path, AS_ALICE)
        assert resp.status == 200, f"{what}: {resp.status} {resp.body[:200]!r}"
        if body is not None:
            assert resp.body == body
        else:
            assert sha256_digest(resp.body) == path.rsplit("/", 1)[1]
        assert get(stowage, path, AS_ALICE, "HEAD").status == 200
    assert alice_checks(up) == checks, "a verdict within --auth-cache-ttl is reused"

    # Now cached: anonymous clients still get a challenge, never the bytes.
    since = reg.checkpoint()
    for path, (what, _) in paths(up, image).items():
        assert_refused(get(stowage, path, ANON), 401, secrets, what)
        assert_refused(get(stowage, path, ANON, "HEAD"), 401, secrets, what)
        # Empty credentials (what clients send after a challenge when they have none).
        assert_refused(get(stowage, path, basic("", "")), 401, secrets, what)
        # Bob's credentials are valid upstream, but not for private/app.
        assert_refused(get(stowage, path, AS_BOB), 403, secrets, what)
        assert_refused(get(stowage, path, basic(ALICE, "wrong")), 403, secrets, what)
        assert_refused(get(stowage, path, {"Authorization": "Basic %%%"}), 401, secrets, what)
        assert_refused(get(stowage, path, {"Authorization": "Bearer x"}), 401, secrets, what)
    # Refusals of cached content cost upstream nothing but the credential checks.
    assert reg.count("GET", "/private/app/", since=since) == 0
    tags = f"/v2/{up.prefix}/private/app/tags/list"
    assert_refused(get(stowage, tags, ANON), 401, [], "tags")
    assert get(stowage, tags, AS_ALICE).status == 200

    for creds in (None, (BOB, BOB_PW)):
        proc = skopeo_pull(stowage, name, tmp_path / f"denied-{creds}", creds)
        assert proc.returncode != 0, proc.stderr
    assert stowage.metric("stowage_access_checks_total", result="anonymous") > 0
    assert stowage.metric("stowage_access_checks_total", result="rejected") >= 2
    assert stowage.metric("stowage_access_checks_total", result="cached_allowed") > 0
    assert_no_secrets(stowage)


def test_public_image_needs_no_credentials_and_private_digests_do_not_leak(
    upstream: Upstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    up = upstream
    stowage = start_stowage(stowage_factory, up, tmp_path)
    reg = up.registry

    proc = skopeo_pull(stowage, f"{up.prefix}/public/app:1", tmp_path / "public", None)
    assert proc.returncode == 0, f"{proc.stderr}\n{stowage.log_tail()}"
    assert_pulled_layout(tmp_path / "public", up.public)
    for headers in (ANON, AS_BOB, AS_ALICE):  # credentials change nothing for public images
        for path, (what, body) in paths(up, up.public).items():
            resp = get(stowage, path, headers)
            assert resp.status == 200, f"{what}: {resp.status}"
            assert body is None or resp.body == body
    assert repo_access_rows(stowage) == {"public/app": 0}

    # Alice caches the private image; its digests asked for under the public name must
    # not be served from the cache (upstream has no such content in public/app).
    private_paths = paths(up, up.private)
    for path in private_paths:
        assert get(stowage, path, AS_ALICE).status == 200
    secrets = [up.private.manifest_bytes, *blob_bytes(up, up.private)]
    since = reg.checkpoint()
    for path, (what, _) in private_paths.items():
        if what == "manifest by tag":
            continue
        leaked = path.replace("/private/app/", "/public/app/")
        for headers in (ANON, AS_BOB):
            resp = get(stowage, leaked, headers)
            assert resp.status == 404, f"{what}: {resp.status} {resp.body[:200]!r}"
            assert all(s not in resp.body for s in secrets)
    assert reg.count("GET", "/public/app/", since=since) == 0  # only anonymous HEADs asked

    # Public content cached: served again without asking upstream anything.
    since = reg.checkpoint()
    for path in paths(up, up.public):
        assert get(stowage, path, ANON).status == 200
    assert reg.count("*", "/public/app/", since=since) == 0
    assert_no_secrets(stowage)


# --- upstream down -------------------------------------------------------------------------


def test_upstream_down_only_recently_verified_credentials_pass(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    _require("skopeo")
    ttl = 6.0
    reg = registry_factory("token", users=USERS, anonymous=ANONYMOUS)
    up = _seed(reg)
    stowage = start_stowage(stowage_factory, up, tmp_path, "--auth-cache-ttl", str(ttl))
    image = up.private
    secrets = [image.manifest_bytes, *blob_bytes(up, image)]
    private_paths = paths(up, image)
    public_paths = paths(up, up.public)
    for path in public_paths:
        assert get(stowage, path, ANON).status == 200

    verified = time.monotonic()
    for path in private_paths:
        assert get(stowage, path, AS_ALICE).status == 200
    for path, (what, _) in private_paths.items():
        assert_refused(get(stowage, path, AS_BOB), 403, secrets, what)
    last_verified = time.monotonic()  # bob's verdict, the later one
    reg.stop()
    assert reg.token_issuer is not None
    reg.token_issuer.stop()

    # Within the TTL of their verification: alice is served, bob still refused.
    for path, (what, body) in private_paths.items():
        resp = get(stowage, path, AS_ALICE)
        assert resp.status == 200, f"{what}: {resp.status} {resp.body[:200]!r}"
        assert body is None or resp.body == body
        assert_refused(get(stowage, path, AS_BOB), 403, secrets, what)
        assert_refused(get(stowage, path, ANON), 401, secrets, what)
        # Never verified (upstream cannot be asked): refused.
        assert_refused(get(stowage, path, basic(ALICE, "guess")), 401, secrets, what)
    assert time.monotonic() - verified < ttl, "too slow to observe the verdict cache"
    # Public images are served through the outage as before.
    for path in public_paths:
        assert get(stowage, path, ANON).status == 200

    # After the TTL, with upstream still down, alice is refused too (and bob).
    time.sleep(max(0.0, last_verified + ttl + 0.5 - time.monotonic()))
    for path, (what, _) in private_paths.items():
        assert_refused(get(stowage, path, AS_ALICE), 401, secrets, what)
        assert_refused(get(stowage, path, AS_BOB), 401, secrets, what)
    assert stowage.metric("stowage_access_checks_total", result="unverifiable") > 0

    # Privacy is in the index: a restarted stowage (upstream still down) refuses too,
    # and still serves the public image.
    stowage.restart()
    for path, (what, _) in private_paths.items():
        assert_refused(get(stowage, path, ANON), 401, secrets, what)
        assert_refused(get(stowage, path, AS_ALICE), 401, secrets, what)
    for path in public_paths:
        assert get(stowage, path, ANON).status == 200

    # Upstream back: alice is verified again and served from the cache.
    reg.start()
    since = reg.checkpoint()
    for path, (what, body) in private_paths.items():
        resp = get(stowage, path, AS_ALICE)
        assert resp.status == 200, f"{what}: {resp.status} {resp.body[:200]!r}"
        assert body is None or resp.body == body
    assert reg.count("GET", "/private/app/", since=since) == 0  # content from the cache
    assert_no_secrets(stowage)
