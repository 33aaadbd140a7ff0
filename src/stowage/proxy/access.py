"""Private images: who may read what the cache holds.

A repository is *private* when upstream does not let anonymous clients read it.
stowage decides this when it first serves the repository: without credentials
for the registry everything it can fetch is public; with credentials (which
stowage always uses when it has them, so "did we authenticate" says nothing)
it asks upstream the same question anonymously (a HEAD of the requested
manifest or blob, with an anonymous token where the registry uses tokens).
The decision is kept in the index once the repository holds content (names
that never do, e.g. typos or probes of random names, leave no row), and asked
again at most once per recheck interval, when upstream answers.

Private content is served only to a request whose Basic credentials upstream
accepts for that repository: stowage asks for a ``repository:<repo>:pull``
token with them (or sends them as Basic) and HEADs the requested manifest or
blob. The verdict is cached per (registry, repository, credential hash) for
``--auth-cache-ttl`` seconds; when upstream is down, only credentials verified
within that time pass. Credentials are never logged; only their salted hash is
kept, in memory.

A blob or manifest requested by digest through a *public* repository is served
from the cache only if a public repository holds or references it; otherwise
upstream is asked whether anonymous clients may read it there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter

from stowage.oci.digest import is_digest
from stowage.oci.manifest import UPSTREAM_ACCEPT
from stowage.proxy.errors import OCIError
from stowage.proxy.routing import Route
from stowage.store.index import Index, RepoAccess
from stowage.upstream.auth import Credentials
from stowage.upstream.client import Upstream, UpstreamDenied, UpstreamError

log = structlog.get_logger("stowage.access")

REALM = "stowage"
CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
MIN_RECHECK = 60.0  # a repository's privacy is asked again at most this often
PROBE_RETRY = 30.0  # after upstream failed to answer a probe, wait this long to ask again
MAX_VERDICTS = 10_000
MAX_DECISIONS = 50_000  # repositories whose decision is kept in memory
MAX_PUBLIC_DIGESTS = 100_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class MalformedCredentials(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """Basic credentials a client presented to stowage."""

    username: str
    password: str = field(repr=False)

    def fingerprint(self, salt: bytes) -> str:
        """Salted SHA-256: the only form in which credentials are remembered."""
        raw = f"{self.username}:{self.password}".encode()
        return hashlib.sha256(salt + raw).hexdigest()

    def upstream(self) -> Credentials:
        return Credentials(self.username, self.password)


def parse_basic(header: str | None) -> ClientCredentials | None:
    """The credentials of an ``Authorization`` header; None when anonymous.

    Clients without credentials answer a Basic challenge with ``Basic Og==``
    (an empty user and password): that is anonymous too."""
    if header is None or not header.strip():
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise MalformedCredentials("only Basic credentials are accepted")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise MalformedCredentials("Basic credentials are not base64 of user:password") from exc
    username, sep, password = decoded.partition(":")
    if not sep:
        raise MalformedCredentials("Basic credentials are not base64 of user:password")
    if not username and not password:
        return None
    if not username:
        raise MalformedCredentials("Basic credentials without a user name")
    return ClientCredentials(username, password)


class Outcome(enum.Enum):
    """What upstream said to a request for one manifest or blob."""

    READABLE = "readable"  # 2xx
    ABSENT = "absent"  # 404: access granted, no such content
    REFUSED = "refused"  # 401/403, or the token service refused
    UNKNOWN = "unknown"  # down, timed out, 5xx, 429, anything else


def outcome_of(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.READABLE
    if status == 404:
        return Outcome.ABSENT
    if status in (401, 403):
        return Outcome.REFUSED
    return Outcome.UNKNOWN


def verdict_of(outcome: Outcome) -> bool | None:
    """Whether credentials give access to the repository; None: cannot tell."""
    if outcome in (Outcome.READABLE, Outcome.ABSENT):
        return True
    if outcome is Outcome.REFUSED:
        return False
    return None


class VerdictCache:
    """Verdicts on credentials, per (registry, repository, fingerprint), for ``ttl`` seconds."""

    def __init__(
        self,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_VERDICTS,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], tuple[bool, float]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> bool | None:
        """The verdict if it was reached within the TTL, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        allowed, when = entry
        if self.clock() - when >= self.ttl:
            del self._entries[key]
            return None
        return allowed

    def put(self, key: tuple[str, str, str], allowed: bool) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (allowed, self.clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class _SingleFlight(Generic[K, V]):
    """One running computation per key; every caller awaits the same result."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        fut = self._running.get(key)
        if fut is None:
            fut = asyncio.ensure_future(compute())
            self._running[key] = fut
            fut.add_done_callback(lambda f: self._finished(key, f))
        # Shielded: a client that leaves does not cancel the others' answer.
        return await asyncio.shield(fut)

    def _finished(self, key: K, fut: asyncio.Future[V]) -> None:
        self._running.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # retrieved here: every waiter may have gone


@dataclass(slots=True)
class _Decision:
    access: RepoAccess | None
    persisted: bool = False  # in the index (done once the repository holds content)
    retry_at: float = 0.0  # monotonic: no probe before (upstream failed to answer)
    reason: str = ""  # why upstream could not be asked


class AccessGate:
    def __init__(
        self,
        index: Index,
        upstream: Upstream,
        registry: CollectorRegistry,
        *,
        ttl: float = 300.0,
        recheck: float = MIN_RECHECK,
        timeout: float = 5.0,
    ) -> None:
        self.index = index
        self.upstream = upstream
        self.recheck = max(recheck, MIN_RECHECK)
        self.timeout = timeout
        self.verdicts = VerdictCache(ttl)
        self._salt = os.urandom(16)
        self._decisions: OrderedDict[tuple[str, str], _Decision] = OrderedDict()
        self._public: OrderedDict[str, None] = OrderedDict()  # digests anyone may read
        self._probes: _SingleFlight[tuple[str, ...], tuple[Outcome, str]] = _SingleFlight()
        self._checks: _SingleFlight[tuple[str, ...], tuple[bool | None, str]] = _SingleFlight()
        try:
            self._any_private = index.any_private()
        except Exception:  # an unreadable index: caching is off anyway
            self._any_private = False
        self.checks = Counter(
            "stowage_access_checks",
            "Requests for private repositories, by outcome (anonymous, malformed, "
            "verified, rejected, cached_allowed, cached_denied, unverifiable).",
            ["result"],
            registry=registry,
        )

    # -- the base route ------------------------------------------------------

    def challenge_ping(self, authorization: str | None) -> bool:
        """Whether ``GET /v2/`` answers 401: clients such as skopeo and docker
        send credentials only to a registry whose ping challenged them. Only
        when private images are possible (credentials configured, or private
        repositories cached); with the challenge, anonymous clients still pull
        public images (they answer with empty credentials)."""
        if authorization is not None:
            return False
        return self._any_private or bool(self.upstream.config.credentials)

    # -- the gate ------------------------------------------------------------

    async def authorize(self, route: Route, authorization: str | None) -> None:
        """Return if the request may be answered; raise the OCIError otherwise."""
        private, probed = await self._repository_private(route)
        if private is None:
            await self._require(route, authorization, undecided=True)
            return
        if private:
            await self._require(route, authorization)
            return
        # A public repository: its tags, and content a public repository holds.
        if route.kind == "tags" or not is_digest(route.reference):
            return
        digest = route.reference
        has_credentials = route.registry in self.upstream.config.credentials
        if not has_credentials and not self._any_private:
            return  # nothing private can be in the cache
        if self._publicly_held(digest):
            return
        if not has_credentials and not self.index.held_by(digest, private=True):
            return  # fetched anonymously: public
        # Content not known to be public, asked for through a public repository
        # (e.g. a private layer's digest under a public name): ask upstream.
        outcome = probed if probed is not None else (await self._probe(route))[0]
        if outcome is Outcome.READABLE:
            self._remember_public(digest)
            return
        if outcome is Outcome.ABSENT:
            code = "MANIFEST_UNKNOWN" if route.kind == "manifests" else "BLOB_UNKNOWN"
            raise OCIError(404, code, f"{_where(route)}: {digest} not found upstream")
        if outcome is Outcome.REFUSED:
            self._record(route, RepoAccess(True, "probe", time.time()))
        await self._require(route, authorization)

    # -- is the repository private? ------------------------------------------

    async def _repository_private(self, route: Route) -> tuple[bool | None, Outcome | None]:
        """(private, or None if undecided; the outcome of a probe made for it)."""
        decision = self._decision(route.registry, route.repository)
        known = decision.access
        has_credentials = route.registry in self.upstream.config.credentials
        if known is not None and not self._stale(known, has_credentials):
            return known.private, None
        if not has_credentials:
            self._record(route, RepoAccess(False, "anonymous", time.time()))
            return False, None
        if time.monotonic() < decision.retry_at:
            return (known.private if known else None), None
        outcome, reason = await self._probe(route)
        if outcome is Outcome.UNKNOWN:
            decision.retry_at = time.monotonic() + PROBE_RETRY
            decision.reason = reason
            return (known.private if known else None), None
        private = outcome is Outcome.REFUSED
        self._record(route, RepoAccess(private, "probe", time.time()))
        if known is None or known.private != private:
            log.info(
                "repository access decided",
                registry=route.registry,
                repository=route.repository,
                private=private,
            )
        return private, outcome

    def _stale(self, known: RepoAccess, has_credentials: bool) -> bool:
        if not has_credentials:
            return False
        # Decided when stowage had no credentials: it could not have known.
        return known.basis != "probe" or time.time() - known.decided > self.recheck

    def _decision(self, registry: str, repository: str) -> _Decision:
        key = (registry, repository)
        decision = self._decisions.get(key)
        if decision is None:
            stored = self.index.repo_access(registry, repository)
            decision = _Decision(stored, persisted=stored is not None)
            self._decisions[key] = decision
            while len(self._decisions) > MAX_DECISIONS:
                self._decisions.popitem(last=False)
        else:
            self._decisions.move_to_end(key)
        return decision

    def _record(self, route: Route, access: RepoAccess) -> None:
        decision = self._decision(route.registry, route.repository)
        decision.access, decision.retry_at, decision.reason = access, 0.0, ""
        if access.private:
            self._any_private = True
        if decision.persisted or self.index.has_repository(route.registry, route.repository):
            self._persist(route.registry, route.repository, decision)

    def holds_content(self, registry: str, repository: str) -> None:
        """A manifest of the repository was cached: keep its decision in the index."""
        decision = self._decisions.get((registry, repository))
        if decision is not None and not decision.persisted:
            self._persist(registry, repository, decision)

    def _persist(self, registry: str, repository: str, decision: _Decision) -> None:
        if decision.access is not None:
            self.index.set_repo_access(registry, repository, decision.access)
            decision.persisted = True

    async def _probe(self, route: Route) -> tuple[Outcome, str]:
        """Ask upstream anonymously for what the request names."""
        key = (route.registry, route.repository, route.kind, route.reference)
        return await self._probes.run(key, lambda: self._ask(route, None))

    async def _ask(self, route: Route, credentials: Credentials | None) -> tuple[Outcome, str]:
        """Request the route's manifest, blob or tag list upstream as ``credentials``
        (None: anonymously); HEAD where the API has it."""
        if route.kind == "tags":
            method, path, headers = "GET", "tags/list", {}
        elif route.kind == "manifests":
            method, path = "HEAD", f"manifests/{route.reference}"
            headers = {"Accept": UPSTREAM_ACCEPT}
        else:
            method, path, headers = "HEAD", f"blobs/{route.reference}", {}
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self.upstream.request(
                    method, route.registry, route.repository, path, headers, credentials
                )
                resp.release()
        except UpstreamDenied as exc:
            return Outcome.REFUSED, str(exc)
        except UpstreamError as exc:
            return Outcome.UNKNOWN, str(exc)
        except TimeoutError:
            return Outcome.UNKNOWN, f"upstream {route.registry}: no answer within {self.timeout}s"
        outcome = outcome_of(resp.status)
        return outcome, f"upstream {route.registry} answered {resp.status}"

    # -- content held by public repositories ---------------------------------

    def _publicly_held(self, digest: str) -> bool:
        if digest in self._public:
            return True
        if self.index.held_by(digest, private=False):
            self._remember_public(digest)
            return True
        return False

    def _remember_public(self, digest: str) -> None:
        self._public[digest] = None
        while len(self._public) > MAX_PUBLIC_DIGESTS:
            self._public.popitem(last=False)

    # -- credentials ---------------------------------------------------------

    async def _require(
        self, route: Route, authorization: str | None, undecided: bool = False
    ) -> None:
        """Pass only credentials upstream accepts for the repository."""
        where = _where(route)
        try:
            creds = parse_basic(authorization)
        except MalformedCredentials as exc:
            self.checks.labels("malformed").inc()
            raise OCIError(401, "UNAUTHORIZED", f"{where}: {exc}", CHALLENGE) from None
        if creds is None:
            self.checks.labels("anonymous").inc()
            if undecided:
                reason = self._decision(route.registry, route.repository).reason
                raise OCIError(
                    502,
                    "UNAVAILABLE",
                    f"{where}: cannot tell whether the repository is private ({reason}); "
                    "it is served only with credentials upstream accepts",
                )
            raise OCIError(
                401, "UNAUTHORIZED", f"{where} is private: authentication required", CHALLENGE
            )
        key = (route.registry, route.repository, creds.fingerprint(self._salt))
        verdict = self.verdicts.get(key)
        if verdict is not None:
            self.checks.labels("cached_allowed" if verdict else "cached_denied").inc()
        else:
            verdict, reason = await self._checks.run(key, lambda: self._verify(route, creds, key))
            if verdict is None:
                self.checks.labels("unverifiable").inc()
                raise OCIError(
                    401,
                    "UNAUTHORIZED",
                    f"{where} is private and the credentials could not be verified ({reason})",
                    CHALLENGE,
                )
        if not verdict:
            raise OCIError(403, "DENIED", f"{where}: access denied for these credentials")

    async def _verify(
        self, route: Route, creds: ClientCredentials, key: tuple[str, str, str]
    ) -> tuple[bool | None, str]:
        outcome, reason = await self._ask(route, creds.upstream())
        verdict = verdict_of(outcome)
        if verdict is not None:
            self.verdicts.put(key, verdict)
            self.checks.labels("verified" if verdict else "rejected").inc()
        log.info(
            "credentials checked upstream",
            registry=route.registry,
            repository=route.repository,
            user=creds.username,
            verdict={True: "allowed", False: "denied", None: "unverifiable"}[verdict],
            upstream=reason,
        )
        return verdict, reason


def _where(route: Route) -> str:
    return f"{route.registry}/{route.repository}"
