"""Image references: the distribution/reference grammar with Docker's normalisation, plus
the host-prefixed path encoding used to route pulls through the proxy.

Grammar (github.com/distribution/reference)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component ( "/" path-component )*
    domain     := host [ ":" port ]
    host       := label ( "." label )* | "[" ipv6 "]"
    label      := [a-zA-Z0-9] | [a-zA-Z0-9] [a-zA-Z0-9-]* [a-zA-Z0-9]
    path-component := [a-z0-9]+ ( ( [._] | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}

Normalisation follows ``ParseNormalizedNamed``: the first path component is a registry
only if it contains '.' or ':', is ``localhost``, or has an uppercase letter; otherwise
the default registry (Docker Hub) applies and single-component Hub names get
``library/``. Registries are lowercased here (host names are case-insensitive), so one
upstream never ends up under two cache keys.

Host-prefixed form (as kube-image-keeper does): ``<proxy>/<encoded registry>/<repo>``,
where the registry's ``:port`` becomes ``-port`` because ':' cannot appear in a path
component.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from stowage.oci.digest import Digest, InvalidDigest
from stowage.oci.digest import quote_bounded as _quote

__all__ = [
    "DOCKER_HUB",
    "InvalidReference",
    "Reference",
    "api_host",
    "decode_registry_component",
    "encode_registry",
    "is_valid_registry",
    "is_valid_repository",
    "is_valid_tag",
    "normalize_registry",
    "normalize_repository",
    "parse_reference",
    "proxied_reference",
]

DOCKER_HUB = "docker.io"
# Docker Hub's name is not where its registry API lives.
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io"})
_LOCALHOST = "localhost"
_DEFAULT_TAG = "latest"
_NAME_MAX = 255
_PORT_MAX = 65535

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
# Explicit ASCII classes: Python's \w would also accept non-ASCII letters.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?")
_IPV6_LITERAL = re.compile(r"\[([a-fA-F0-9:]+)\]")
_PORT = re.compile(r"[0-9]{1,5}")
# A bare 64-hex string is an image ID to Docker, so it may not be used as a name.
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")


class InvalidReference(ValueError):
    """A string is not a valid image reference (or part of one)."""


# --- registries -------------------------------------------------------------------------


def normalize_registry(host: str) -> str:
    """Canonical spelling of a registry host: lowercase, Docker Hub aliases folded."""
    lowered = host.lower()
    return DOCKER_HUB if lowered in _DOCKER_HUB_ALIASES else lowered


def api_host(registry: str) -> str:
    """The host serving the registry API for ``registry``."""
    return _DOCKER_HUB_API if normalize_registry(registry) == DOCKER_HUB else registry


def _split_port(host: str) -> tuple[str, str | None]:
    # IPv6 literals contain ':' themselves; a port can only follow the closing bracket.
    if host.startswith("["):
        end = host.find("]")
        if end != -1 and host[end + 1 : end + 2] == ":":
            return host[: end + 1], host[end + 2 :]
        return host, None
    name, sep, port = host.partition(":")
    return (name, port) if sep else (host, None)


def _is_valid_port(port: str) -> bool:
    # The grammar allows any digits, but nothing above 65535 can ever be connected to.
    return _PORT.fullmatch(port) is not None and int(port) <= _PORT_MAX


def is_valid_registry(host: str) -> bool:
    """Whether ``host`` is a registry domain: host name, IPv4 or [IPv6], optional :port."""
    name, port = _split_port(host)
    if port is not None and not _is_valid_port(port):
        return False
    if name.startswith("["):
        match = _IPV6_LITERAL.fullmatch(name)
        if match is None:
            return False
        # The grammar's [hex and colons] also admits nonsense such as "[fd00123]".
        try:
            ipaddress.IPv6Address(match.group(1))
        except ValueError:
            return False
        return True
    # DNS limits (RFC 1035): labels of at most 63 characters, at most 253 in all.
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and all(len(label) <= 63 for label in labels)
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
    )


def _denotes_registry(component: str) -> bool:
    # Docker's heuristic for "is the first component of a name a registry?".
    return (
        "." in component
        or ":" in component
        or component == _LOCALHOST
        or any("A" <= c <= "Z" for c in component)
    )


# --- repositories and tags ------------------------------------------------------------


def _repository_problem(name: str) -> str | None:
    if not name:
        return "repository name is empty"
    if len(name) > _NAME_MAX:
        return f"repository name is {len(name)} characters, more than {_NAME_MAX}"
    for component in name.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            return (
                f"invalid path component {_quote(component)}: components are lowercase "
                "alphanumerics separated by '.', '_', '__' or dashes"
            )
    return None


def is_valid_repository(name: str) -> bool:
    """Whether ``name`` is a repository path (no registry), at most 255 characters."""
    return _repository_problem(name) is None


def is_valid_tag(tag: str) -> bool:
    """Whether ``tag`` is a valid tag: 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'."""
    return _TAG.fullmatch(tag) is not None


def normalize_repository(registry: str, repository: str) -> str:
    """Docker Hub's official images live under ``library/``; elsewhere names are as given."""
    if normalize_registry(registry) == DOCKER_HUB and "/" not in repository:
        return f"library/{repository}"
    return repository


# --- host-prefixed path encoding --------------------------------------------------------


def encode_registry(host: str) -> str:
    """The path component standing for ``host``: normalised, ``host:port`` → ``host-port``.

    Raises InvalidReference for hosts that are not valid or cannot be a path component
    (IPv6 literals).
    """
    if not is_valid_registry(host):
        raise InvalidReference(f"invalid registry host {_quote(host)}")
    if host.startswith("["):
        raise InvalidReference(
            f"registry {_quote(host)} is an IPv6 literal, which cannot be encoded as a path "
            "component"
        )
    return normalize_registry(host).replace(":", "-")


def decode_registry_component(component: str, known: Iterable[str] = ()) -> str | None:
    """The upstream registry that the first path component of a name stands for, if any.

    ``known`` (configured registries) is consulted first: it is the only way to route
    dot-less hosts such as ``myreg:5000``, and it settles the encoding's one ambiguity,
    a host whose last label ends in ``-<digits>`` (``foo.bar-1`` would otherwise decode
    as ``foo.bar:1``). Otherwise the component is a registry when, once a trailing
    ``-<digits>`` port is set aside, it contains '.' or is ``localhost``.
    """
    lowered = component.lower()
    for candidate in known:
        try:
            if encode_registry(candidate) == lowered:
                return normalize_registry(candidate)
        except InvalidReference:
            # A misconfigured entry must not make every lookup fail.
            continue
    host, sep, port = lowered.rpartition("-")
    if not (sep and port.isascii() and port.isdigit()):
        host, port = lowered, ""
    if "." not in host and host != _LOCALHOST:
        return None
    registry = f"{host}:{port}" if port else host
    if not is_valid_registry(registry):
        return None
    return normalize_registry(registry)


# --- references ----------------------------------------------------------------------


def _suffix(tag: str | None, digest: str | None) -> str:
    return (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest is not None else "")


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully qualified image reference; at least one of ``tag`` and ``digest`` is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        # Validate here as well as in parse_reference so that every instance renders to a
        # string that container runtimes accept.
        if not is_valid_registry(self.registry):
            raise InvalidReference(f"invalid registry host {_quote(self.registry)}")
        problem = _repository_problem(self.repository)
        if problem is not None:
            raise InvalidReference(f"invalid repository {_quote(self.repository)}: {problem}")
        if len(self.name) > _NAME_MAX:
            raise InvalidReference(
                f"name {_quote(self.name)} is {len(self.name)} characters, more than {_NAME_MAX}"
            )
        if self.tag is not None and not is_valid_tag(self.tag):
            raise InvalidReference(f"invalid tag {_quote(self.tag)}")
        if self.digest is not None:
            try:
                Digest.parse(self.digest)
            except InvalidDigest as e:
                raise InvalidReference(str(e)) from e
        if self.tag is None and self.digest is None:
            raise InvalidReference(f"reference to {_quote(self.name)} has neither tag nor digest")

    def __str__(self) -> str:
        return self.name + _suffix(self.tag, self.digest)

    @property
    def name(self) -> str:
        """``registry/repository``."""
        return f"{self.registry}/{self.repository}"

    @property
    def prefixed_name(self) -> str:
        """The name as stowage routes it host-prefixed: ``127.0.0.1-5000/library/app``."""
        return f"{encode_registry(self.registry)}/{self.repository}"

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None  # __post_init__ guarantees one of the two
        return self.tag


def parse_reference(s: str, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse and normalise an image reference as ``docker pull`` would.

    ``nginx`` → ``docker.io/library/nginx:latest``; a reference without tag or digest
    gets ``latest``; ``name:tag@digest`` keeps both. Raises InvalidReference.

    Caveat inherited from Docker's heuristic: a first component recognised as a registry
    only by its uppercase letters (``Foo/bar``) is lowercased, and ``foo/bar`` then reads
    as a Docker Hub name, so such references do not round-trip through ``str()``.
    """
    if not is_valid_registry(default_registry):
        raise InvalidReference(f"default registry {_quote(default_registry)} is not a valid host")
    if not s:
        raise InvalidReference("image reference is empty")
    q = _quote(s)
    if _IMAGE_ID.fullmatch(s):
        raise InvalidReference(
            f"image reference {q} is a 64-character hex image ID, not a repository name"
        )

    name_and_tag, at, digest_text = s.partition("@")
    digest: str | None = None
    if at:
        try:
            digest = str(Digest.parse(digest_text))
        except InvalidDigest as e:
            raise InvalidReference(f"image reference {q}: {e}") from e

    # A ':' after the last '/' starts the tag; any earlier ':' belongs to a registry port.
    tag: str | None = None
    colon = name_and_tag.rfind(":")
    if colon > name_and_tag.rfind("/"):
        name, tag = name_and_tag[:colon], name_and_tag[colon + 1 :]
        if not is_valid_tag(tag):
            raise InvalidReference(
                f"image reference {q}: invalid tag {_quote(tag)} (1-128 characters of "
                "[A-Za-z0-9_.-], not starting with '.' or '-')"
            )
    else:
        name = name_and_tag
    if not name:
        raise InvalidReference(f"image reference {q} has no repository name")

    first, slash, rest = name.partition("/")
    if slash and _denotes_registry(first):
        domain, remainder = first, rest
        if not is_valid_registry(domain):
            raise InvalidReference(f"image reference {q}: invalid registry host {_quote(domain)}")
    else:
        domain, remainder = default_registry, name

    if any("A" <= c <= "Z" for c in remainder):
        raise InvalidReference(
            f"image reference {q}: repository name {_quote(remainder)} must be lowercase"
        )
    problem = _repository_problem(remainder)
    if problem is not None:
        raise InvalidReference(f"image reference {q}: {problem}")

    registry = normalize_registry(domain)
    repository = normalize_repository(registry, remainder)
    full_name = f"{registry}/{repository}"
    if len(full_name) > _NAME_MAX:
        raise InvalidReference(
            f"image reference {q}: name {_quote(full_name)} is {len(full_name)} characters, "
            f"more than {_NAME_MAX}"
        )
    if tag is None and digest is None:
        tag = _DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def proxied_reference(ref: Reference, proxy: str) -> str:
    """``ref`` as pulled through ``proxy``: ``<proxy>/<encoded registry>/<repository>``.

    The proxy decodes the registry with decode_registry_component, so registries with
    neither '.' nor a port (other than localhost) must be among its configured ones.
    Raises InvalidReference when the result would not be a valid reference.
    """
    if not is_valid_registry(proxy):
        raise InvalidReference(f"proxy {_quote(proxy)} is not a valid registry host")
    if not _denotes_registry(proxy):
        # Runtimes would read a bare "myproxy/..." as a Docker Hub namespace.
        raise InvalidReference(
            f"proxy {_quote(proxy)} would be read as a Docker Hub namespace; "
            "give it a port or a dotted name"
        )
    name = f"{proxy}/{ref.prefixed_name}"
    if len(name) > _NAME_MAX:
        raise InvalidReference(
            f"proxied name {_quote(name)} is {len(name)} characters, more than {_NAME_MAX}"
        )
    return name + _suffix(ref.tag, ref.digest)
