"""A parent stowage, asked before the upstream registries (two tiers).

A node's stowage can name the cluster's stowage as its parent (``--parent URL``).
Every request the node would send upstream with its own identity goes to the
parent first, anonymously and routed the way stowage routes it
(``/v2/<registry as host-port>/<repository>/...``), so the parent downloads each
image once for the whole cluster. What the parent sends is checked as strictly
as what a registry sends; this module only decides whether to ask it and
whether its answer stands:

- 2xx: used.
- 404: used (authoritative) when the node has no credentials for the registry:
  the parent answers 404 only when the registry did, to an anonymous request,
  which is what the node itself would send. With credentials, a registry may
  hide a private repository from anonymous clients behind a 404, so the node
  asks the registry itself, with its credentials.
- 401, 403: the parent gates private images on the client's credentials, and
  the node never sends its upstream credentials to it: asked directly.
- Anything else (unreachable, timed out, 5xx, 429, other 4xx, an answer
  without ``Docker-Distribution-API-Version``, i.e. not a registry's): asked
  directly, and the parent is not asked again for ``backoff`` seconds -- for
  that registry when the parent answered as a registry (its upstream failed
  it), for every registry when it did not answer as one (it is down or
  something else). Content from the parent that fails verification (wrong
  digest, cut short) backs it off for every registry too.
"""

from __future__ import annotations

import enum
import functools
import time
import weakref
from collections.abc import Callable, Mapping
from urllib.parse import urlencode

import aiohttp
import structlog

from stowage.oci.reference import (
    InvalidReference,
    decode_registry_component,
    encode_registry,
    normalize_registry,
)

log = structlog.get_logger("stowage.parent")

# How long a failing parent is left alone before it is asked again.
PARENT_BACKOFF = 5.0
MAX_REDIRECTS = 5  # followed for one request (CDNs), by this and the upstream client
API_VERSION = "Docker-Distribution-API-Version"
EVERY_REGISTRY = ""  # back-off key: the whole parent
RESULTS = ("ok", "private", "fallback", "skipped", "mismatch")


class Answer(enum.Enum):
    USE = "ok"  # pass the parent's answer on
    PRIVATE = "private"  # not for anonymous clients: ask the registry with our credentials
    FAILED = "fallback"  # the parent is failing: ask the registry, back off


def classify(status: int, registry_answer: bool, has_credentials: bool) -> Answer:
    """What to make of the parent's answer ``status``.

    ``registry_answer``: it carried ``Docker-Distribution-API-Version``;
    ``has_credentials``: the node has credentials for the registry."""
    if not registry_answer:
        return Answer.FAILED
    if 200 <= status < 300:
        return Answer.USE
    if status == 404:
        return Answer.PRIVATE if has_credentials else Answer.USE
    if status in (401, 403):
        return Answer.PRIVATE
    return Answer.FAILED


def parent_path(registry: str, repository: str, path: str) -> str:
    """The parent's path for ``/v2/<repository>/<path>`` of ``registry``.

    Host-prefixed (``host:port`` written ``host-port``) when the parent decodes
    the prefix back to the same registry by itself; otherwise (hosts without a
    dot such as ``myreg:5000``, which only configured registries route, or
    IPv6 literals) in mirror mode, ``?ns=<registry>``, which is never ambiguous."""
    prefix, query = _routing(registry)
    if prefix is not None:
        return f"/v2/{prefix}/{repository}/{path}"
    sep = "&" if "?" in path else "?"
    return f"/v2/{repository}/{path}{sep}{query}"


@functools.lru_cache(maxsize=1024)
def _routing(registry: str) -> tuple[str | None, str]:
    """(host prefix, or None) and the ``ns=`` query for ``registry``: per registry, not
    per request (the checks behind them run regexes)."""
    registry = normalize_registry(registry)
    try:
        prefix: str | None = encode_registry(registry)
    except InvalidReference:
        prefix = None
    if prefix is not None and decode_registry_component(prefix) != registry:
        prefix = None
    return prefix, urlencode({"ns": registry})


class Parent:
    """Asks the parent stowage; remembers when it failed."""

    def __init__(
        self,
        url: str,
        *,
        backoff: float = PARENT_BACKOFF,
        on_result: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/")
        self.backoff = backoff
        self._on_result = on_result or (lambda result: None)
        self._clock = clock
        self._until: dict[str, float] = {}  # back-off key -> clock time to wait for
        self._sent: weakref.WeakSet[aiohttp.ClientResponse] = weakref.WeakSet()

    def usable(self, registry: str) -> bool:
        """Whether to ask the parent for ``registry`` now (not backing off)."""
        now = self._clock()
        return all(self._until.get(key, 0.0) <= now for key in (EVERY_REGISTRY, registry))

    def sent(self, resp: aiohttp.ClientResponse) -> bool:
        """Whether ``resp`` is an answer of the parent's that was passed on."""
        return resp in self._sent

    async def ask(
        self,
        session: aiohttp.ClientSession,
        method: str,
        registry: str,
        repository: str,
        path: str,
        headers: Mapping[str, str],
        has_credentials: bool,
    ) -> aiohttp.ClientResponse | None:
        """The parent's answer to pass on, or None: ask the registry directly.

        Sent anonymously: never the node's credentials, nor a client's."""
        if not self.usable(registry):
            self._on_result("skipped")
            return None
        url = self.url + parent_path(registry, repository, path)
        try:
            resp = await session.request(method, url, headers=headers, max_redirects=MAX_REDIRECTS)
        except TimeoutError as exc:
            late = (
                "no connection" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "no answer"
            )
            self.failed(EVERY_REGISTRY, f"timed out ({late} in time)")
            return None
        except aiohttp.ClientConnectorError as exc:
            self.failed(EVERY_REGISTRY, f"unreachable ({exc.os_error})")
            return None
        except aiohttp.ClientResponseError as exc:
            self.failed(EVERY_REGISTRY, f"unreadable answer ({' '.join(exc.message.split())})")
            return None
        except aiohttp.ClientError as exc:
            self.failed(EVERY_REGISTRY, f"request failed: {exc!r}")
            return None
        # A redirect (to a store holding the bytes) is judged by the parent's own answer.
        first = resp.history[0] if resp.history else resp
        registry_answer = API_VERSION in first.headers
        answer = classify(resp.status, registry_answer, has_credentials)
        if answer is Answer.USE:
            self._recovered(registry)
            self._on_result(answer.value)
            self._sent.add(resp)
            return resp
        resp.release()
        if answer is Answer.PRIVATE:
            self._on_result(answer.value)
            log.info(
                "parent did not serve it anonymously: asking the registry",
                parent=self.url,
                registry=registry,
                repository=repository,
                status=resp.status,
            )
        elif registry_answer:
            self.failed(registry, f"answered {resp.status}")
        else:
            self.failed(EVERY_REGISTRY, f"answered {resp.status}, not as a registry")
        return None

    def failed(self, key: str, reason: str, result: str = "fallback") -> None:
        """The parent failed (``key``: for one registry, or EVERY_REGISTRY): back off.
        Logged when the back-off starts, not for every request during it."""
        self._on_result(result)
        now = self._clock()
        if self._until.get(key, 0.0) <= now:
            log.warning(
                "parent failed: asking registries directly",
                parent=self.url,
                registry=key or "*",
                reason=reason,
                retry_in=self.backoff,
            )
        self._until[key] = now + self.backoff

    def _recovered(self, registry: str) -> None:
        now = self._clock()
        for key in (EVERY_REGISTRY, registry):
            until = self._until.get(key)
            # Only a back-off that ran out: one started meanwhile by another request stays.
            if until is not None and until <= now:
                del self._until[key]
                log.info("parent answers again", parent=self.url, registry=key or "*")
