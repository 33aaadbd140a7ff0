"""Async client for upstream registries: auth, redirects, errors."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from stowage.oci.manifest import MAX_MANIFEST_SIZE, UPSTREAM_ACCEPT
from stowage.oci.reference import api_host
from stowage.upstream.auth import Challenge, Credentials, parse_challenge
from stowage.upstream.parent import EVERY_REGISTRY, MAX_REDIRECTS, Parent

READ_BUFSIZE = 256 * 1024
# Without a Retry-After, a 429 still pauses requests to that registry this long;
# with one, it is honoured up to the cap (a broken header must not stall us for days).
DEFAULT_BACKOFF = 5.0
MAX_BACKOFF = 600.0


class UpstreamError(Exception):
    """The upstream could not give us what we asked for."""

    def __init__(
        self,
        registry: str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"upstream {registry}: {message}")
        self.registry = registry
        self.status = status
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, 5xx or 429: a reason to serve stale content."""


class UpstreamTimeout(UpstreamUnavailable):
    """Connected late or not at all, or answered too slowly: a gateway timeout."""


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamDenied(UpstreamError):
    pass


class UpstreamInvalid(UpstreamError):
    """Upstream answered, but with something we must not pass on."""


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes
    content_type: str
    digest: str | None  # Docker-Content-Digest as upstream sent it
    via_parent: bool = False  # sent by the parent stowage, not the registry


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: str | None
    content_type: str
    size: int | None


@dataclass(slots=True)
class UpstreamConfig:
    insecure: frozenset[str] = frozenset()
    credentials: Mapping[str, Credentials] = field(default_factory=dict)
    ca_file: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    parent: str | None = None  # URL of a parent stowage, asked before the registries


RequestHook = Callable[[str, str], None]  # (registry, status or error kind)
ParentHook = Callable[[str], None]  # result of asking the parent


class _Configured:
    """Marker: authenticate with the credentials configured for the registry."""


CONFIGURED = _Configured()


class Upstream:
    def __init__(
        self,
        config: UpstreamConfig,
        on_request: RequestHook | None = None,
        on_parent: ParentHook | None = None,
    ) -> None:
        self.config = config
        self._on_request = on_request or (lambda registry, status: None)
        # Tried first for every request made with the configured identity (see parent.py).
        self.parent = Parent(config.parent, on_result=on_parent) if config.parent else None
        self._session: aiohttp.ClientSession | None = None
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str, str, str], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, str, str, str], asyncio.Lock] = {}
        self._backoff: dict[str, float] = {}  # registry -> monotonic time to wait for

    async def start(self) -> None:
        ctx = ssl.create_default_context()
        if self.config.ca_file:
            ctx.load_verify_locations(cafile=str(self.config.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=0, ttl_dns_cache=60),
            # Blobs must pass through byte for byte: never decode a body.
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            # Reads of up to this much: few trips through the parser, little memory per fill.
            read_bufsize=READ_BUFSIZE,
            timeout=self._timeout(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _timeout(self, total: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=total,
            connect=self.config.connect_timeout,
            sock_connect=self.config.connect_timeout,
            sock_read=self.config.read_timeout,
        )

    def base_url(self, registry: str) -> str:
        scheme = "http" if registry in self.config.insecure else "https"
        return f"{scheme}://{api_host(registry)}"

    # -- high-level operations -----------------------------------------------

    async def fetch_manifest(
        self, registry: str, repository: str, ref: str, parent: bool = True
    ) -> FetchedManifest:
        """``parent=False``: from the registry even with a parent configured."""
        resp = await self.request(
            "GET",
            registry,
            repository,
            f"manifests/{ref}",
            {"Accept": UPSTREAM_ACCEPT},
            parent=parent,
        )
        async with resp:
            self._raise_for(resp, registry, f"manifest {repository}:{ref}")
            if (resp.content_length or 0) > MAX_MANIFEST_SIZE:
                raise UpstreamInvalid(
                    registry, f"manifest {repository}:{ref} exceeds 4 MiB", status=413
                )
            body = await self._read_from(resp, registry)
            if body is not None:
                return FetchedManifest(
                    body,
                    resp.headers.get("Content-Type", ""),
                    resp.headers.get("Docker-Content-Digest"),
                    self.from_parent(resp),
                )
        return await self.fetch_manifest(registry, repository, ref, parent=False)

    async def head_manifest(self, registry: str, repository: str, ref: str) -> ManifestHead:
        resp = await self.request(
            "HEAD", registry, repository, f"manifests/{ref}", {"Accept": UPSTREAM_ACCEPT}
        )
        async with resp:
            self._raise_for(resp, registry, f"manifest {repository}:{ref}")
            return ManifestHead(
                resp.headers.get("Docker-Content-Digest"),
                resp.headers.get("Content-Type", ""),
                resp.content_length,
            )

    async def open_blob(
        self,
        registry: str,
        repository: str,
        digest: str,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Start a blob download; the caller reads and releases the response."""
        resp = await self.request(method, registry, repository, f"blobs/{digest}", headers)
        try:
            self._raise_for(resp, registry, f"blob {repository}@{digest}")
        except BaseException:
            resp.release()
            raise
        return resp

    async def tags(
        self, registry: str, repository: str, query: str, parent: bool = True
    ) -> tuple[int, str, bytes]:
        path = "tags/list" + (f"?{query}" if query else "")
        resp = await self.request("GET", registry, repository, path, parent=parent)
        async with resp:
            self._raise_for(resp, registry, f"tags of {repository}")
            body = await self._read_from(resp, registry)
            if body is not None:
                return resp.status, resp.headers.get("Content-Type", "application/json"), body
        return await self.tags(registry, repository, query, parent=False)

    async def _read_from(self, resp: aiohttp.ClientResponse, registry: str) -> bytes | None:
        """A manifest's or tag list's body; None when the parent broke off sending it
        (it is backed off, and the caller asks the registry)."""
        try:
            return await self._read_limited(resp, registry, MAX_MANIFEST_SIZE)
        except UpstreamUnavailable as exc:
            if not self.blame_if_parent(resp, str(exc)):
                raise
            return None

    # -- the parent stowage ----------------------------------------------------

    def from_parent(self, resp: aiohttp.ClientResponse) -> bool:
        """Whether ``resp`` came from the parent stowage rather than the registry."""
        return self.parent is not None and self.parent.sent(resp)

    def blame_parent(self, reason: str, mismatch: bool = False) -> None:
        """Content from the parent was bad (``mismatch``: wrong digest) or cut short:
        leave the parent alone for a while, so the next attempt asks the registry."""
        if self.parent is not None:
            self.parent.failed(EVERY_REGISTRY, reason, "mismatch" if mismatch else "fallback")

    def blame_if_parent(
        self, resp: aiohttp.ClientResponse, reason: str, mismatch: bool = False
    ) -> bool:
        """``blame_parent`` if ``resp`` came from the parent; whether it did."""
        if not self.from_parent(resp):
            return False
        self.blame_parent(reason, mismatch)
        return True

    # -- plumbing ------------------------------------------------------------

    async def request(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        credentials: Credentials | _Configured | None = CONFIGURED,
        parent: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send a request to ``/v2/<repository>/<path>``, authenticating as
        the upstream demands. Network failures raise UpstreamUnavailable.

        ``credentials`` overrides the configured ones: None asks anonymously,
        others (a client's, being verified) get fresh tokens that are not cached.
        With the configured ones, the parent stowage (if any, and unless
        ``parent`` is False) is asked first, and its answer returned if it
        stands (see parent.py); otherwise the registry is asked."""
        if parent and self.parent is not None and isinstance(credentials, _Configured):
            assert self._session is not None, "Upstream.start() not called"
            resp = await self.parent.ask(
                self._session,
                method,
                registry,
                repository,
                path,
                headers or {},
                has_credentials=registry in self.config.credentials,
            )
            if resp is not None:
                return resp
        url = f"{self.base_url(registry)}/v2/{repository}/{path}"
        hdrs = CIMultiDict(headers or {})
        auth = await self._authorization(
            registry, repository, self._challenges.get(registry), credentials
        )
        resp = await self._send(method, registry, url, hdrs, auth)
        if resp.status != 401:
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        resp.release()
        if challenge is None:
            raise UpstreamDenied(registry, "401 without a usable auth challenge", status=401)
        self._challenges[registry] = challenge
        auth = await self._authorization(registry, repository, challenge, credentials, fresh=True)
        if auth is None:
            raise UpstreamDenied(registry, "authentication required", status=401)
        return await self._send(method, registry, url, hdrs, auth)

    async def _send(
        self, method: str, registry: str, url: str, headers: CIMultiDict[str], auth: str | None
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "Upstream.start() not called"
        wait = self._backoff.get(registry, 0.0) - time.monotonic()
        if wait > 0:
            # Honour the registry's Retry-After: no retry storm against a rate limit.
            raise UpstreamUnavailable(
                registry, "answered 429 (rate limited)", status=429, retry_after=wait
            )
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = CIMultiDict(headers)
            # Credentials go only to the registry's own origin, never to a CDN.
            if auth and _origin(url) == origin:
                hdrs["Authorization"] = auth
            try:
                resp = await self._session.request(method, url, headers=hdrs, allow_redirects=False)
            except TimeoutError as exc:
                self._on_request(registry, "timeout")
                raise UpstreamTimeout(registry, self._timed_out(exc)) from exc
            except aiohttp.ClientConnectorError as exc:
                self._on_request(registry, "unreachable")
                raise UpstreamUnavailable(registry, f"unreachable ({exc.os_error})") from exc
            except aiohttp.ClientError as exc:
                self._on_request(registry, "error")
                raise UpstreamUnavailable(registry, f"request failed: {exc}") from exc
            self._on_request(registry, str(resp.status))
            if resp.status == 429:
                delay = _retry_after(resp.headers.get("Retry-After"))
                self._backoff[registry] = time.monotonic() + min(delay, MAX_BACKOFF)
            location = resp.headers.get("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                resp.release()
                url = urljoin(url, location)
                if resp.status == 303:
                    method = "GET"
                continue
            return resp
        raise UpstreamInvalid(registry, f"more than {MAX_REDIRECTS} redirects", status=502)

    def _timed_out(self, exc: TimeoutError) -> str:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"timed out: no connection within {self.config.connect_timeout:g}s"
        return f"timed out: no answer within {self.config.read_timeout:g}s"

    async def _authorization(
        self,
        registry: str,
        repository: str,
        challenge: Challenge | None,
        credentials: Credentials | _Configured | None = CONFIGURED,
        fresh: bool = False,
    ) -> str | None:
        if isinstance(credentials, _Configured):
            configured, creds = True, self.config.credentials.get(registry)
        else:
            configured, creds = False, credentials
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return creds.basic() if creds else None
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        scope = f"repository:{repository}:pull"
        service = challenge.params.get("service", "")
        if creds is not None and not configured:
            # A client's credentials being checked: never cached (the key would
            # not include the password).
            token, _ = await self._fetch_token(registry, challenge.realm, service, scope, creds)
            return f"Bearer {token}"
        # Anonymous tokens and the configured identity's never share an entry.
        who = "anonymous" if creds is None else f"configured:{creds.username or ''}"
        key = (challenge.realm, service, scope, who)
        async with self._token_locks.setdefault(key, asyncio.Lock()):
            cached = self._tokens.get(key)
            if cached and cached[1] > time.monotonic() and not fresh:
                return f"Bearer {cached[0]}"
            token, lifetime = await self._fetch_token(
                registry, challenge.realm, service, scope, creds
            )
            # Renew a little early so a token never expires in flight.
            self._tokens[key] = (token, time.monotonic() + max(lifetime - 10, lifetime / 2))
            return f"Bearer {token}"

    async def _fetch_token(
        self, registry: str, realm: str, service: str, scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        assert self._session is not None
        params = {"scope": scope, **({"service": service} if service else {})}
        try:
            if creds and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "stowage",
                    **params,
                }
                resp = await self._session.post(realm, data=form)
            else:
                basic = creds.basic() if creds else None
                resp = await self._session.get(
                    realm, params=params, headers={"Authorization": basic} if basic else {}
                )
            async with resp:
                self._on_request(registry, str(resp.status))
                if resp.status in (401, 403):
                    raise UpstreamDenied(registry, "credentials rejected by token service", 401)
                if resp.status >= 400:
                    raise UpstreamUnavailable(
                        registry, f"token service answered {resp.status}", status=resp.status
                    )
                doc: dict[str, Any] = await resp.json(content_type=None)
        except TimeoutError as exc:
            raise UpstreamTimeout(registry, "token service timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(registry, f"token service unreachable: {exc}") from exc
        except ValueError as exc:
            raise UpstreamInvalid(registry, "token service sent invalid JSON") from exc
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamInvalid(registry, "token service sent no token")
        lifetime = doc.get("expires_in")
        return token, float(lifetime) if isinstance(
            lifetime, int | float
        ) and lifetime > 0 else 60.0

    @staticmethod
    def _raise_for(resp: aiohttp.ClientResponse, registry: str, what: str) -> None:
        status = resp.status
        if status < 300:
            return
        if status == 404:
            raise UpstreamNotFound(registry, f"{what} not found", status=404)
        if status in (401, 403):
            raise UpstreamDenied(registry, f"access to {what} denied ({status})", status=status)
        if status == 429 or status >= 500:
            retry = resp.headers.get("Retry-After")
            raise UpstreamUnavailable(
                registry,
                f"answered {status} for {what}",
                status=status,
                retry_after=_retry_after(retry) if retry else None,
            )
        raise UpstreamInvalid(registry, f"answered {status} for {what}", status=status)

    @staticmethod
    async def _read_limited(resp: aiohttp.ClientResponse, registry: str, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in resp.content.iter_any():
                total += len(chunk)
                if total > limit:
                    raise UpstreamInvalid(registry, "response exceeds 4 MiB", status=413)
                chunks.append(chunk)
        except TimeoutError as exc:
            raise UpstreamTimeout(registry, "timed out reading the response") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(registry, f"response cut short: {exc}") from exc
        return b"".join(chunks)


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_BACKOFF
        return max(0.0, when.timestamp() - time.time())
    return DEFAULT_BACKOFF


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
