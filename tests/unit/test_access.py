"""The pure parts of private-image access: credential parsing, verdicts and their cache,
the index's repository-access records, and the gate's decisions against a scripted upstream
(the real upstream flow is in tests/integration/test_private_images.py)."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stowage.proxy.access import (
    CHALLENGE,
    AccessGate,
    ClientCredentials,
    MalformedCredentials,
    Outcome,
    VerdictCache,
    outcome_of,
    parse_basic,
    verdict_of,
)
from stowage.proxy.errors import OCIError
from stowage.proxy.routing import Route
from stowage.store.index import Index, RepoAccess
from stowage.upstream.auth import Credentials
from stowage.upstream.client import UpstreamDenied, UpstreamUnavailable

REG = "registry.test"
DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def _basic(raw: str) -> str:
    return "Basic " + base64.b64encode(raw.encode()).decode()


# --- credentials ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "  ", _basic(":"), "Basic Og=="])
def test_absent_or_empty_credentials_are_anonymous(header: str | None) -> None:
    assert parse_basic(header) is None


@pytest.mark.parametrize(
    ("header", "user", "password"),
    [
        (_basic("alice:pw"), "alice", "pw"),
        (_basic("alice:p:w:"), "alice", "p:w:"),  # the password may contain ':'
        (_basic("alice:"), "alice", ""),
        ("basic " + base64.b64encode(b"bob:x").decode(), "bob", "x"),
        (_basic("j\u00fcrgen:\u00e9t\u00e9"), "j\u00fcrgen", "\u00e9t\u00e9"),
    ],
)
def test_basic_credentials_are_parsed(header: str, user: str, password: str) -> None:
    assert parse_basic(header) == ClientCredentials(user, password)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer eyJabc",
        "Digest username=x",
        "Basic %%%",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        _basic(":only-a-password"),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
        "Basic",
    ],
)
def test_malformed_credentials_are_rejected(header: str) -> None:
    with pytest.raises(MalformedCredentials):
        parse_basic(header)


def test_fingerprint_is_salted_and_never_shows_the_secret() -> None:
    creds = ClientCredentials("alice", "s3cret-pw")
    one, two = creds.fingerprint(b"salt-1"), creds.fingerprint(b"salt-2")
    assert one != two and len(one) == 64
    assert one != ClientCredentials("alice", "other").fingerprint(b"salt-1")
    assert "s3cret-pw" not in repr(creds) and "s3cret-pw" not in one
    assert creds.upstream() == Credentials("alice", "s3cret-pw")


@pytest.mark.parametrize(
    ("status", "outcome", "verdict"),
    [
        (200, Outcome.READABLE, True),
        (206, Outcome.READABLE, True),
        (404, Outcome.ABSENT, True),
        (401, Outcome.REFUSED, False),
        (403, Outcome.REFUSED, False),
        (429, Outcome.UNKNOWN, None),
        (500, Outcome.UNKNOWN, None),
        (503, Outcome.UNKNOWN, None),
        (400, Outcome.UNKNOWN, None),
    ],
)
def test_status_outcomes_and_verdicts(status: int, outcome: Outcome, verdict: bool | None) -> None:
    assert outcome_of(status) is outcome
    assert verdict_of(outcome) is verdict


# --- verdict cache -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_verdicts_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = VerdictCache(10.0, clock)
    cache.put((REG, "a", "x"), True)
    cache.put((REG, "a", "y"), False)
    clock.now += 9.9
    assert cache.get((REG, "a", "x")) is True
    assert cache.get((REG, "a", "y")) is False
    assert cache.get((REG, "b", "x")) is None  # per repository
    clock.now += 0.1
    assert cache.get((REG, "a", "x")) is None
    assert cache.get((REG, "a", "y")) is None


def test_ttl_zero_caches_nothing_and_size_is_bounded() -> None:
    assert VerdictCache(0).get((REG, "a", "x")) is None
    zero = VerdictCache(0)
    zero.put((REG, "a", "x"), True)
    assert zero.get((REG, "a", "x")) is None
    small = VerdictCache(60, max_entries=2)
    for name in ("a", "b", "c"):
        small.put((REG, name, "x"), True)
    assert [small.get((REG, n, "x")) for n in ("a", "b", "c")] == [None, True, True]


# --- index ---------------------------------------------------------------------------------


def test_repo_access_round_trip_and_holders(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    assert index.repo_access(REG, "team/app") is None
    assert not index.any_private()
    index.add_manifest(REG, "team/app", DIGEST, "m", 10, [(OTHER, "layer")])
    # No decision yet: held by neither kind.
    assert not index.held_by(DIGEST, private=False) and not index.held_by(OTHER, private=True)
    index.set_repo_access(REG, "team/app", RepoAccess(True, "probe", 5.0))
    assert index.repo_access(REG, "team/app") == RepoAccess(True, "probe", 5.0)
    assert index.any_private()
    assert index.held_by(DIGEST, private=True) and index.held_by(OTHER, private=True)
    assert not index.held_by(OTHER, private=False)
    index.add_manifest(REG, "lib/base", "sha256:" + "c" * 64, "m", 10, [(OTHER, "layer")])
    index.set_repo_access(REG, "lib/base", RepoAccess(False, "anonymous", 6.0))
    assert index.held_by(OTHER, private=False)  # a public manifest references the layer
    assert not index.held_by(DIGEST, private=False)
    index.set_repo_access(REG, "team/app", RepoAccess(False, "probe", 7.0))  # now public
    assert index.repo_access(REG, "team/app") == RepoAccess(False, "probe", 7.0)
    assert not index.any_private()
    index.close()


def test_existing_index_without_the_access_table_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    old = Index(path)
    old.add_manifest(REG, "team/app", DIGEST, "m", 10, [(OTHER, "layer")])
    old.set_tag(REG, "team/app", "1", DIGEST)
    old.close()
    db = sqlite3.connect(path)  # as an index written before private images existed
    db.executescript(
        "DROP TABLE repo_access; DROP INDEX manifest_refs_child; DROP INDEX repo_manifests_digest;"
    )
    db.close()

    index = Index(path)
    assert index.tag(REG, "team/app", "1") is not None  # content kept
    assert index.repo_access(REG, "team/app") is None  # undecided: asked upstream on use
    index.set_repo_access(REG, "team/app", RepoAccess(True, "probe", 1.0))
    assert index.held_by(OTHER, private=True)
    index.close()


# --- the gate against a scripted upstream --------------------------------------------------


@dataclass
class FakeResponse:
    status: int

    def release(self) -> None:
        pass


@dataclass
class FakeConfig:
    credentials: dict[str, Credentials] = field(default_factory=dict)


class FakeUpstream:
    """Answers by identity: None (anonymous), or the user name of the credentials."""

    def __init__(self, answers: dict[str | None, int | Exception], creds: bool = True) -> None:
        self.answers = answers
        self.config = FakeConfig({REG: Credentials("svc", "pw")} if creds else {})
        self.calls: list[tuple[str, str | None]] = []
        self.delay = 0.0

    async def request(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        headers: Any = None,
        credentials: Credentials | None = None,
    ) -> FakeResponse:
        who = credentials.username if credentials else None
        self.calls.append((path, who))
        await asyncio.sleep(self.delay)
        answer = self.answers[who]
        if isinstance(answer, Exception):
            raise answer
        return FakeResponse(answer)


def gate(tmp_path: Path, upstream: FakeUpstream, ttl: float = 60.0) -> AccessGate:
    index = Index(tmp_path / "index.db")
    return AccessGate(index, upstream, CollectorRegistry(), ttl=ttl)  # type: ignore[arg-type]


def route(kind: str = "manifests", reference: str = "1", repo: str = "team/app") -> Route:
    return Route(REG, repo, kind, reference, False)


async def refused(g: AccessGate, r: Route, header: str | None) -> OCIError:
    with pytest.raises(OCIError) as info:
        await g.authorize(r, header)
    return info.value


ALICE = _basic("alice:pw")
BOB = _basic("bob:pw")


async def test_without_credentials_everything_is_public_and_upstream_is_not_asked(
    tmp_path: Path,
) -> None:
    up = FakeUpstream({}, creds=False)
    g = gate(tmp_path, up)
    assert not g.challenge_ping(None)
    for r in (route(), route("manifests", DIGEST), route("blobs", DIGEST), route("tags", "")):
        await g.authorize(r, None)
    assert up.calls == []
    # Decided in memory; kept in the index once the repository holds content.
    assert g.index.repo_access(REG, "team/app") is None
    g.index.add_manifest(REG, "team/app", DIGEST, "m", 1, [])
    g.holds_content(REG, "team/app")
    access = g.index.repo_access(REG, "team/app")
    assert access is not None and (access.private, access.basis) == (False, "anonymous")


async def test_private_repository_needs_accepted_credentials(tmp_path: Path) -> None:
    up = FakeUpstream({None: 401, "alice": 200, "bob": 403})
    g = gate(tmp_path, up)
    assert g.challenge_ping(None) and not g.challenge_ping("Basic Og==")

    err = await refused(g, route(), None)
    assert (err.status, err.code, err.headers) == (401, "UNAUTHORIZED", CHALLENGE)
    err = await refused(g, route("blobs", DIGEST), BOB)
    assert (err.status, err.code) == (403, "DENIED")
    err = await refused(g, route(), "Bearer abc")
    assert (err.status, err.headers) == (401, CHALLENGE)

    await g.authorize(route("blobs", DIGEST), ALICE)
    calls = len(up.calls)
    await g.authorize(route(), ALICE)  # the verdict is per repository, and cached
    await g.authorize(route("tags", ""), ALICE)
    err = await refused(g, route(), BOB)
    assert err.status == 403
    assert len(up.calls) == calls
    # Another repository is another verdict.
    await g.authorize(route(repo="team/other"), ALICE)
    assert len(up.calls) > calls


async def test_concurrent_requests_share_one_check(tmp_path: Path) -> None:
    up = FakeUpstream({None: 401, "alice": 200})
    g = gate(tmp_path, up)
    await refused(g, route(), None)
    up.delay = 0.05
    await asyncio.gather(*(g.authorize(route("blobs", DIGEST), ALICE) for _ in range(20)))
    assert [who for _, who in up.calls].count("alice") == 1


async def test_upstream_down_passes_only_fresh_verdicts(tmp_path: Path) -> None:
    up = FakeUpstream({None: 401, "alice": 200, "bob": 401})
    g = gate(tmp_path, up, ttl=60.0)
    clock = Clock()
    g.verdicts.clock = clock
    await refused(g, route(), None)
    await g.authorize(route(), ALICE)
    assert (await refused(g, route(), BOB)).status == 403
    down = UpstreamUnavailable(REG, "unreachable")
    up.answers = {None: down, "alice": down, "bob": down, "carol": down}
    await g.authorize(route(), ALICE)
    assert (await refused(g, route(), BOB)).status == 403
    assert (await refused(g, route(), _basic("carol:pw"))).status == 401
    assert (await refused(g, route(), None)).status == 401
    clock.now += 60
    assert (await refused(g, route(), ALICE)).status == 401
    assert (await refused(g, route(), BOB)).status == 401


async def test_token_service_refusal_is_a_denial(tmp_path: Path) -> None:
    up = FakeUpstream(
        {
            None: UpstreamDenied(REG, "authentication required"),
            "bob": UpstreamDenied(REG, "credentials rejected by token service", 401),
        }
    )
    g = gate(tmp_path, up)
    assert (await refused(g, route(), None)).status == 401  # anonymous refused: private
    assert (await refused(g, route(), BOB)).status == 403


async def test_undecided_repository_is_not_served_anonymously(tmp_path: Path) -> None:
    up = FakeUpstream({None: UpstreamUnavailable(REG, "unreachable"), "alice": 200})
    g = gate(tmp_path, up)
    err = await refused(g, route(), None)
    assert (err.status, err.code) == (502, "UNAVAILABLE") and REG in err.message
    assert g.index.repo_access(REG, "team/app") is None
    await g.authorize(route(), ALICE)  # verified credentials still pass
    # The failed probe is not repeated at once for every request.
    probes = len([c for c in up.calls if c[1] is None])
    await refused(g, route(), None)
    assert len([c for c in up.calls if c[1] is None]) == probes


async def test_public_repository_serves_only_public_content_by_digest(tmp_path: Path) -> None:
    up = FakeUpstream({None: 200})
    g = gate(tmp_path, up)
    await g.authorize(route(), None)  # probe: anonymous may read it
    assert up.calls == [("manifests/1", None)]
    # Content only a private repository holds, asked for under the public name.
    g.index.add_manifest(REG, "team/secret", OTHER, "m", 1, [(DIGEST, "layer")])
    g.index.set_repo_access(REG, "team/secret", RepoAccess(True, "probe", 1e12))
    up.answers[None] = 404
    err = await refused(g, route("blobs", DIGEST), None)
    assert (err.status, err.code) == (404, "BLOB_UNKNOWN")
    err = await refused(g, route("manifests", OTHER), _basic("x:y"))
    assert (err.status, err.code) == (404, "MANIFEST_UNKNOWN")
    # Once a public repository holds it, no question is asked.
    g.index.add_manifest(REG, "team/app", OTHER, "m", 1, [(DIGEST, "layer")])
    g.holds_content(REG, "team/app")  # as the proxy does after caching a manifest
    calls = len(up.calls)
    await g.authorize(route("blobs", DIGEST), None)
    await g.authorize(route("manifests", OTHER), None)
    assert len(up.calls) == calls
