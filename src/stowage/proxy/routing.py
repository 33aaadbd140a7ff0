"""Map a request path to (upstream registry, repository, endpoint, reference)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stowage.oci.digest import quote_bounded
from stowage.oci.reference import (
    decode_registry_component,
    is_valid_registry,
    is_valid_repository,
    normalize_registry,
    normalize_repository,
)
from stowage.proxy.errors import OCIError


@dataclass(frozen=True, slots=True)
class Route:
    registry: str
    repository: str
    kind: str  # "manifests", "blobs" or "tags"
    reference: str  # tag or digest; "" for tags/list
    mirror: bool  # reached through ?ns= (containerd mirror mode)


ENDPOINTS = ("/manifests/", "/blobs/")


def parse_route(
    tail: str, ns: str | None, default_registry: str, known: Iterable[str] = ()
) -> Route:
    """Parse the part of the path after ``/v2/``.

    ``<registry>/<repo>/…`` is host-prefixed (``host-port`` for a port);
    ``<repo>/…?ns=<registry>`` is mirror mode; neither means the default
    registry.
    """
    if tail.endswith("/tags/list"):
        name, kind, reference = tail[: -len("/tags/list")], "tags", ""
    else:
        # The last endpoint marker wins: a repository may contain "manifests" or "blobs"
        # components ("org/manifests/app/blobs/<digest>").
        at, marker = max((tail.rfind(m), m) for m in ENDPOINTS)
        if at < 0:
            raise OCIError(
                404, "NAME_UNKNOWN", "no such endpoint; expected manifests, blobs or tags"
            )
        name, kind, reference = tail[:at], marker.strip("/"), tail[at + len(marker) :]
        if not reference or "/" in reference:
            raise OCIError(404, "NAME_UNKNOWN", "no such endpoint")
    if not name:
        raise OCIError(400, "NAME_INVALID", "repository name is empty")

    mirror = ns is not None
    if ns is not None:
        registry = normalize_registry(ns)
        if not is_valid_registry(registry):
            raise OCIError(400, "NAME_INVALID", f"invalid ns registry {quote_bounded(ns)}")
        repository = name
    else:
        first, _, rest = name.partition("/")
        decoded = decode_registry_component(first, known) if rest else None
        if decoded is not None:
            registry, repository = decoded, rest
        elif rest and "." in first:
            # Shaped like a host (as docker reads names) but not a valid one,
            # e.g. a label over 63 characters: not a repository of the default.
            raise OCIError(400, "NAME_INVALID", f"invalid registry {quote_bounded(first)}")
        else:
            registry, repository = default_registry, name
    if not is_valid_repository(repository):
        raise OCIError(400, "NAME_INVALID", f"invalid repository name {quote_bounded(repository)}")
    return Route(registry, normalize_repository(registry, repository), kind, reference, mirror)
