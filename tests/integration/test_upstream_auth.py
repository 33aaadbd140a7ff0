"""stowage against authenticating upstreams: TLS + htpasswd (Basic), Docker token auth
(Bearer, incl. refresh-token grants), and registries redirecting blobs to a CDN.

Pulls go through stowage with skopeo (a real client); the upstreams are CNCF Distribution
with the harness's token issuer, plus in-test aiohttp servers for the redirect case.
Throughout, credentials and tokens must never reach stowage's log.

Private repositories are served only to clients presenting credentials upstream accepts
(tested in depth in test_private_images.py): the clients here present CAROL's, a user other
than the one stowage authenticates as, so that stowage's own token requests stay countable.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import RegistryFactory, StowageFactory
from tests.support.appthread import Handler, ThreadedApp
from tests.support.images import PushedImage, build_image_layout, push_image
from tests.support.regclient import RegistryClient, Response, sha256_digest
from tests.support.registry import TOKEN_SERVICE, Registry, TokenIssuer, TokenUser
from tests.support.stowage import Stowage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ALICE, ALICE_PW = "alice", "alice-Secret-pw-7Qx"
BOB, BOB_PW = "bob", "bob-Secret-pw-3Kz"
CAROL, CAROL_PW = "carol", "carol-Secret-pw-5Wm"  # the client's own upstream account
SMALL = (512, 1024)  # layer sizes: content does not matter here, only the auth flow
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


# --- helpers ---------------------------------------------------------------------------------


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_auth_file(path: Path, entries: dict[str, dict[str, str]]) -> Path:
    """A docker ``config.json``: ``{"auths": {registry: entry}}``."""
    path.write_text(json.dumps({"auths": entries}, indent=2))
    return path


def skopeo_pull(
    stowage: Stowage, name: str, dest: Path, creds: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://<stowage>/<name> oci:<dest>``, anonymous towards stowage unless
    ``creds`` (user, password) are given, and isolated from the host's containers
    configuration. Does not raise on failure."""
    with tempfile.TemporaryDirectory(prefix="skopeo-pull-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "auth.json").write_text("{}")
        (tmpdir / "registries.conf").write_text("")
        argv = [
            shutil.which("skopeo") or "skopeo",
            "--insecure-policy",
            "--registries-conf",
            str(tmpdir / "registries.conf"),
            "copy",
            "--src-tls-verify=false",
            "--src-authfile",
            str(tmpdir / "auth.json"),
            *(["--src-creds", f"{creds[0]}:{creds[1]}"] if creds else []),
            f"docker://{stowage.host}/{name}",
            f"oci:{dest}:pulled",
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_pulled(
    stowage: Stowage,
    image: PushedImage,
    registry_prefix: str,
    dest: Path,
    creds: tuple[str, str] | None = (CAROL, CAROL_PW),
) -> None:
    """Pull ``image`` through stowage with skopeo and check the layout holds exactly it."""
    name = f"{registry_prefix}/{image.repository}:{image.tag}"
    proc = skopeo_pull(stowage, name, dest, creds)
    assert proc.returncode == 0, f"skopeo pull failed:\n{proc.stderr}\n{stowage.log_tail()}"
    index = json.loads((dest / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest_digest]
    for digest, size in [(image.manifest_digest, len(image.manifest_bytes)), *image.blobs]:
        blob = dest / "blobs" / "sha256" / digest.removeprefix("sha256:")
        data = blob.read_bytes()
        assert (len(data), sha256_digest(data)) == (size, digest)


def assert_oci_error(resp: Response, statuses: tuple[int, ...], *names: str) -> None:
    """An OCI error JSON with one of ``statuses`` (never 500) whose message names ``names``."""
    detail = f"{resp.status} {resp.body[:400]!r}"
    assert resp.status != 500, detail
    assert resp.status in statuses, detail
    assert (resp.header("Content-Type") or "").startswith("application/json"), detail
    errors = resp.json()["errors"]
    assert errors and all(isinstance(e.get("code"), str) for e in errors), detail
    message = " ".join(str(e.get("message", "")) for e in errors)
    for name in names:
        assert name in message, detail


def assert_no_secrets(stowage: Stowage, *secrets: str) -> None:
    log = stowage.log_text()
    assert log, "stowage wrote no log at all"
    assert "Traceback" not in log, log[-3000:]
    for secret in secrets:
        assert secret not in log, f"secret {secret[:6]}... appears in stowage's log"
    # Every JWT (bearer token) starts with the base64 of '{"': none may be logged.
    assert "eyJ" not in log


def as_carol() -> dict[str, str]:
    """Headers of a client presenting CAROL's credentials to stowage."""
    return {"Authorization": "Basic " + _b64(CAROL, CAROL_PW)}


def _blob_files(stowage: Stowage) -> list[Path]:
    return [p for p in (stowage.data_dir / "blobs").rglob("*") if p.is_file()]


# --- upstream fixtures ---------------------------------------------------------------------


@dataclass
class BasicUpstream:
    registry: Registry
    image: PushedImage  # private/app:1


@pytest.fixture(scope="module")
def basic_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BasicUpstream]:
    """TLS + htpasswd registry holding private/app:1 (alice may pull)."""
    _require("docker-registry", "skopeo", "htpasswd")
    with Registry(
        "basic",
        users={ALICE: ALICE_PW, CAROL: CAROL_PW},
        workdir=tmp_path_factory.mktemp("basic-upstream"),
    ) as reg:
        assert reg.tls
        yield BasicUpstream(reg, push_image(reg, "private/app", "1", layer_sizes=SMALL))


@dataclass
class TokenUpstream:
    registry: Registry
    public: PushedImage  # public/app:1, anonymous pull allowed
    private: PushedImage  # private/app:1, config + 4 layers; alice only
    other: PushedImage  # private/other:1; alice only

    @property
    def issuer(self) -> TokenIssuer:
        assert self.registry.token_issuer is not None
        return self.registry.token_issuer


@pytest.fixture(scope="module")
def token_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenUpstream]:
    _require("docker-registry", "skopeo")
    with Registry(
        "token",
        users={
            ALICE: TokenUser(ALICE_PW, {"private/*": ["pull"]}),
            BOB: TokenUser(BOB_PW, {"elsewhere/*": ["pull"]}),
            CAROL: TokenUser(CAROL_PW, {"private/*": ["pull"]}),
        },
        anonymous={"public/*": ["pull"]},
        workdir=tmp_path_factory.mktemp("token-upstream"),
    ) as reg:
        yield TokenUpstream(
            reg,
            public=push_image(reg, "public/app", "1", layer_sizes=SMALL),
            private=push_image(reg, "private/app", "1", layer_sizes=(256, 512, 768, 1024)),
            other=push_image(reg, "private/other", "1", layer_sizes=(256,)),
        )


# --- Basic auth over TLS -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["auth", "username-password"])
def test_basic_tls_upstream_with_credentials(
    basic_upstream: BasicUpstream,
    stowage_factory: StowageFactory,
    tmp_path: Path,
    form: str,
) -> None:
    reg = basic_upstream.registry
    entry = (
        {"auth": _b64(ALICE, ALICE_PW)}
        if form == "auth"
        else {"username": ALICE, "password": ALICE_PW}
    )
    auth = write_auth_file(tmp_path / "config.json", {reg.host: entry})
    # upstreams=[reg] makes the fixture pass the registry's CA in --ca-file.
    stowage = stowage_factory(upstreams=[reg], auth_file=auth)
    assert "--ca-file" in stowage.argv
    since = reg.checkpoint()

    assert_pulled(stowage, basic_upstream.image, reg.path_prefix, tmp_path / "pulled")

    # It really went upstream, and upstream accepted stowage's credentials.
    assert reg.count("GET", "/private/app/manifests/1", status=200, since=since) == 1
    for digest, _ in basic_upstream.image.blobs:
        assert reg.count("GET", f"/blobs/{digest}", status=200, since=since) == 1
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW), CAROL_PW, _b64(CAROL, CAROL_PW))


def test_basic_tls_upstream_without_or_with_wrong_credentials_is_denied(
    basic_upstream: BasicUpstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = basic_upstream.registry
    image = basic_upstream.image
    layer, _ = image.layers[0]
    wrong = write_auth_file(tmp_path / "wrong.json", {reg.host: {"auth": _b64(ALICE, "nope")}})
    for auth_file in (None, wrong):
        stowage = stowage_factory(upstreams=[reg], auth_file=auth_file)
        client = stowage.client()
        base = f"/v2/{reg.path_prefix}/private/app"
        for path in (f"{base}/manifests/1", f"{base}/blobs/{layer}", f"{base}/tags/list"):
            resp = client.raw("GET", path)
            assert_oci_error(resp, (401, 403), reg.host)
            head = client.raw("HEAD", path)
            assert head.status == resp.status
            assert head.body == b""
        proc = skopeo_pull(stowage, f"{reg.path_prefix}/private/app:1", tmp_path / "denied")
        assert proc.returncode != 0
        assert _blob_files(stowage) == []
        assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, "nope"))


def test_tls_upstream_without_ca_file_is_502_naming_it(
    basic_upstream: BasicUpstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = basic_upstream.registry
    auth = write_auth_file(tmp_path / "config.json", {reg.host: {"auth": _b64(ALICE, ALICE_PW)}})
    # No upstreams=[...]: stowage trusts only the system CAs, not the test CA.
    stowage = stowage_factory(auth_file=auth)
    assert "--ca-file" not in stowage.argv
    layer, _ = basic_upstream.image.layers[0]
    base = f"/v2/{reg.path_prefix}/private/app"
    for path in (f"{base}/manifests/1", f"{base}/blobs/{layer}", f"{base}/tags/list"):
        assert_oci_error(stowage.client().raw("GET", path), (502,), reg.host)
        head = stowage.client().raw("HEAD", path)
        assert (head.status, head.body) == (502, b"")
    assert stowage.metric("stowage_upstream_errors_total", registry=reg.host) >= 1
    assert _blob_files(stowage) == []
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW))


# --- Bearer token auth ---------------------------------------------------------------------


def test_token_upstream_anonymous_pull(
    token_upstream: TokenUpstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = token_upstream.registry
    stowage = stowage_factory(upstreams=[reg])
    events_before = len(token_upstream.issuer.events())

    assert_pulled(stowage, token_upstream.public, reg.path_prefix, tmp_path / "public", None)
    new = token_upstream.issuer.events()[events_before:]
    assert new, "stowage never asked the token issuer"
    assert all(e["user"] is None for e in new)  # anonymous token requests

    # The private repository is not open to anonymous clients.
    resp = stowage.client().raw("GET", f"/v2/{reg.path_prefix}/private/app/manifests/1")
    assert_oci_error(resp, (401, 403), reg.host)
    assert_no_secrets(stowage)


@pytest.mark.parametrize("form", ["auth", "username-password"])
def test_token_upstream_private_repo_with_credentials(
    token_upstream: TokenUpstream, stowage_factory: StowageFactory, tmp_path: Path, form: str
) -> None:
    reg = token_upstream.registry
    entry = (
        {"auth": _b64(ALICE, ALICE_PW)}
        if form == "auth"
        else {"username": ALICE, "password": ALICE_PW}
    )
    auth = write_auth_file(tmp_path / "config.json", {reg.host: entry})
    stowage = stowage_factory(upstreams=[reg], auth_file=auth)
    events_before = len(token_upstream.issuer.events())

    assert_pulled(stowage, token_upstream.private, reg.path_prefix, tmp_path / "private")
    new = token_upstream.issuer.events()[events_before:]
    # stowage fetched as alice; its access gate asked anonymously (is the repository
    # private?) and checked the client's (carol's) credentials.
    assert {e["user"] for e in new} == {ALICE, CAROL, None}
    assert all(e["granted"] == [] for e in new if e["user"] is None)
    assert any(g["name"] == "private/app" for e in new if e["user"] == ALICE for g in e["granted"])
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW), CAROL_PW, _b64(CAROL, CAROL_PW))


def test_token_upstream_user_without_access_is_denied(
    token_upstream: TokenUpstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = token_upstream.registry
    auth = write_auth_file(tmp_path / "config.json", {reg.host: {"auth": _b64(BOB, BOB_PW)}})
    stowage = stowage_factory(upstreams=[reg], auth_file=auth)
    events_before = len(token_upstream.issuer.events())
    layer, _ = token_upstream.private.layers[0]

    # The client (carol) may read private/app; stowage's own account (bob) may not.
    base = f"/v2/{reg.path_prefix}/private/app"
    for path in (f"{base}/manifests/1", f"{base}/blobs/{layer}"):
        assert_oci_error(stowage.client().raw("GET", path, as_carol()), (401, 403), reg.host)
    proc = skopeo_pull(
        stowage, f"{reg.path_prefix}/private/app:1", tmp_path / "denied", (CAROL, CAROL_PW)
    )
    assert proc.returncode != 0

    # Bob authenticated fine; the issuer just granted him nothing for private/app.
    new = token_upstream.issuer.events()[events_before:]
    bob = [e for e in new if e["user"] == BOB]
    assert bob and all(e["granted"] == [] for e in bob)
    assert _blob_files(stowage) == []
    assert_no_secrets(stowage, BOB_PW, _b64(BOB, BOB_PW))


def test_token_is_requested_once_per_scope_and_reused(
    token_upstream: TokenUpstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = token_upstream.registry
    issuer = token_upstream.issuer
    auth = write_auth_file(tmp_path / "config.json", {reg.host: {"auth": _b64(ALICE, ALICE_PW)}})
    stowage = stowage_factory(upstreams=[reg], auth_file=auth)
    client = stowage.client()
    private = token_upstream.private
    assert len(private.blobs) == 5
    events_before = len(issuer.events())
    since = reg.checkpoint()

    def alice_events() -> list[dict[str, Any]]:
        # stowage's own token requests (the access gate's are anonymous or carol's)
        return [e for e in issuer.events()[events_before:] if e["user"] == ALICE]

    base = f"/v2/{reg.path_prefix}/private/app"
    resp = client.raw("GET", f"{base}/manifests/1", as_carol())
    assert resp.status == 200 and resp.body == private.manifest_bytes
    for digest, size in private.blobs:  # 5 blob pulls of the same repository
        resp = client.raw("GET", f"{base}/blobs/{digest}", as_carol())
        assert resp.status == 200 and len(resp.body) == size
    # A tags list: same scope, same token.
    assert client.raw("GET", f"{base}/tags/list", as_carol()).status == 200

    new = alice_events()
    assert len(new) == 1, new
    assert new[0]["requested"] == [
        {"type": "repository", "name": "private/app", "actions": ["pull"]}
    ]
    # Every GET carried a valid token (only the gate's anonymous HEAD was refused).
    assert reg.count("GET", "/private/app/", status=401, since=since) == 0
    assert reg.count("GET", "/private/app/blobs/", status=200, since=since) == 5

    # Another repository is another scope: exactly one more token.
    resp = client.raw("GET", f"/v2/{reg.path_prefix}/private/other/manifests/1", as_carol())
    assert resp.status == 200 and resp.body == token_upstream.other.manifest_bytes
    for digest, _ in token_upstream.other.blobs:
        path = f"/v2/{reg.path_prefix}/private/other/blobs/{digest}"
        assert client.raw("GET", path, as_carol()).status == 200
    assert [e["requested"][0]["name"] for e in alice_events()] == ["private/app", "private/other"]
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW))


def test_token_is_renewed_after_expiry(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    lifetime = 2
    reg = registry_factory(
        "token",
        users={
            ALICE: TokenUser(ALICE_PW, {"private/*": ["pull"]}),
            CAROL: TokenUser(CAROL_PW, {"private/*": ["pull"]}),
        },
        token_expires_in=lifetime,
    )
    image = push_image(reg, "private/app", "1", layer_sizes=(256, 512))
    issuer = reg.token_issuer
    assert issuer is not None
    auth = write_auth_file(tmp_path / "config.json", {reg.host: {"auth": _b64(ALICE, ALICE_PW)}})
    stowage = stowage_factory(upstreams=[reg], auth_file=auth)
    client = stowage.client()
    base = f"/v2/{reg.path_prefix}/private/app"
    before = len([e for e in issuer.events() if e.get("user") == ALICE])

    def alice_tokens() -> int:
        return len([e for e in issuer.events() if e.get("user") == ALICE]) - before

    started = time.monotonic()
    assert client.raw("GET", f"{base}/manifests/1", as_carol()).status == 200
    config, layer = image.blobs[0][0], image.blobs[1][0]
    assert client.raw("GET", f"{base}/blobs/{config}", as_carol()).status == 200
    assert time.monotonic() - started < lifetime / 2, "too slow to observe token reuse"
    assert alice_tokens() == 1

    time.sleep(lifetime + 0.2)  # the token has now expired
    resp = client.raw("GET", f"{base}/blobs/{layer}", as_carol())
    assert resp.status == 200, resp.body
    assert sha256_digest(resp.body) == layer
    assert alice_tokens() == 2
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW))


def test_identity_token_uses_refresh_grant(
    token_upstream: TokenUpstream, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = token_upstream.registry
    issuer = token_upstream.issuer
    # Obtain a refresh token the way `docker login` does against a token server.
    resp = RegistryClient(issuer.url, username=ALICE, password=ALICE_PW).fetch_token(
        issuer.realm + "?offline_token=true&client_id=stowage-test",
        TOKEN_SERVICE,
        ["repository:private/app:pull"],
    )
    assert resp.status == 200, resp.body
    refresh = resp.json()["refresh_token"]
    assert isinstance(refresh, str) and refresh

    auth = write_auth_file(tmp_path / "config.json", {reg.host: {"identitytoken": refresh}})
    stowage = stowage_factory(upstreams=[reg], auth_file=auth)
    posts, gets = issuer.count("POST", "/token"), issuer.count("GET", "/token")
    events_before = len(issuer.events())

    assert_pulled(stowage, token_upstream.private, reg.path_prefix, tmp_path / "pulled")
    assert issuer.count("POST", "/token") == posts + 1  # one refresh grant for the scope
    new = issuer.events()[events_before:]
    alice = [e for e in new if e["user"] == ALICE]
    assert len(alice) == 1 and alice[0]["granted"]
    # Never the Basic-auth GET flow for alice: the GETs are the access gate's (anonymous,
    # or checking the client's credentials).
    assert issuer.count("GET", "/token") == gets + len(new) - len(alice)
    assert_no_secrets(stowage, refresh, ALICE_PW)

    # A refresh token the issuer does not know: denied (not a 500), naming the upstream.
    bogus = write_auth_file(tmp_path / "bogus.json", {reg.host: {"identitytoken": "not-valid"}})
    denied = stowage_factory(upstreams=[reg], auth_file=bogus)
    resp = denied.client().raw("GET", f"/v2/{reg.path_prefix}/private/app/manifests/1")
    assert_oci_error(resp, (401, 403), reg.host)
    assert_no_secrets(denied, "not-valid")


# --- redirects to a CDN --------------------------------------------------------------------


@pytest.fixture
def threaded_apps() -> Iterator[Callable[[list[tuple[str, str, Handler]]], ThreadedApp]]:
    started: list[ThreadedApp] = []

    def make(routes: list[tuple[str, str, Handler]]) -> ThreadedApp:
        app = ThreadedApp(routes).start()
        started.append(app)
        return app

    yield make
    for app in started:
        app.stop()


def test_blob_redirect_to_cdn_does_not_leak_authorization(
    threaded_apps: Callable[[list[tuple[str, str, Handler]]], ThreadedApp],
    stowage_factory: StowageFactory,
    tmp_path: Path,
) -> None:
    _require("skopeo")
    layout = build_image_layout(tmp_path / "layout", "1", layer_sizes=SMALL, seed="cdn-test")
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    manifest = blob(manifest_digest)
    doc = json.loads(manifest)
    blobs = [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
    expected_auth = "Basic " + _b64(ALICE, ALICE_PW)
    challenge = {"WWW-Authenticate": 'Basic realm="in-test-registry"'}
    cdn_port: list[int] = []

    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization") == expected_auth

    async def serve_manifest(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers=challenge
            )
        if request.match_info["ref"] not in ("1", manifest_digest):
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(
            body=manifest,
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": manifest_digest},
        )

    async def redirect_blob(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers=challenge
            )
        digest = request.match_info["digest"]
        location = f"http://127.0.0.1:{cdn_port[0]}/cdn/{digest}?signature=abc123"
        return web.Response(status=307, headers={"Location": location})

    async def cdn_blob(request: web.Request) -> web.StreamResponse:
        # Like S3: a request carrying a second auth mechanism is refused.
        if "Authorization" in request.headers:
            return web.Response(status=400, text="only one auth mechanism allowed")
        return web.Response(
            body=blob(request.match_info["digest"]), content_type="application/octet-stream"
        )

    cdn = threaded_apps([("GET", "/cdn/{digest}", cdn_blob), ("HEAD", "/cdn/{digest}", cdn_blob)])
    cdn_port.append(cdn.port)
    upstream = threaded_apps(
        [
            ("GET", "/v2/{name:.+}/manifests/{ref}", serve_manifest),
            ("HEAD", "/v2/{name:.+}/manifests/{ref}", serve_manifest),
            ("GET", "/v2/{name:.+}/blobs/{digest}", redirect_blob),
            ("HEAD", "/v2/{name:.+}/blobs/{digest}", redirect_blob),
        ]
    )
    auth = write_auth_file(
        tmp_path / "config.json", {upstream.host: {"auth": _b64(ALICE, ALICE_PW)}}
    )
    stowage = stowage_factory(insecure_registries=[upstream.host], auth_file=auth)

    prefix = upstream.host.replace(":", "-")
    dest = tmp_path / "pulled"
    proc = skopeo_pull(stowage, f"{prefix}/team/app:1", dest, (ALICE, ALICE_PW))
    assert proc.returncode == 0, f"{proc.stderr}\n{stowage.log_tail()}"
    pulled = json.loads((dest / "index.json").read_text())
    assert pulled["manifests"][0]["digest"] == manifest_digest
    for digest in blobs:
        data = (dest / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert sha256_digest(data) == digest

    # The registry got credentials on the requests it served...
    blob_requests = [r for r in upstream.seen if "/blobs/" in r.path]
    assert {r.path.rsplit("/", 1)[1] for r in blob_requests} == set(blobs)
    assert any(r.headers.get("Authorization") == expected_auth for r in blob_requests)
    assert any(
        r.headers.get("Authorization") == expected_auth
        for r in upstream.seen
        if "/manifests/" in r.path
    )
    # ...the CDN served every blob and never saw an Authorization header.
    assert {r.path.rsplit("/", 1)[1] for r in cdn.seen} == set(blobs)
    assert all("Authorization" not in r.headers for r in cdn.seen), cdn.seen
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW))


# --- secrets in the log ----------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_secrets_never_logged_even_at_debug(
    basic_upstream: BasicUpstream,
    token_upstream: TokenUpstream,
    stowage_factory: StowageFactory,
    tmp_path: Path,
    log_format: str,
) -> None:
    basic, token = basic_upstream.registry, token_upstream.registry
    auth = write_auth_file(
        tmp_path / "config.json",
        {
            basic.host: {"auth": _b64(ALICE, ALICE_PW)},
            token.host: {"username": ALICE, "password": ALICE_PW},
        },
    )
    stowage = stowage_factory(
        upstreams=[basic, token],
        auth_file=auth,
        log_format=log_format,
        extra_args=["--log-level", "debug"],
    )
    assert_pulled(stowage, basic_upstream.image, basic.path_prefix, tmp_path / "basic")
    assert_pulled(stowage, token_upstream.private, token.path_prefix, tmp_path / "token")
    # A denied request too: error paths are where secrets tend to leak.
    resp = stowage.client().raw("GET", f"/v2/{token.path_prefix}/public/app/manifests/1")
    assert_oci_error(resp, (401, 403), token.host)

    log = stowage.log_text()
    assert "request" in log  # the log is really being written
    assert_no_secrets(stowage, ALICE_PW, _b64(ALICE, ALICE_PW), CAROL_PW, _b64(CAROL, CAROL_PW))
