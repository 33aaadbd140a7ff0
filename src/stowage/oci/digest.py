"""OCI content digests: parsing, validation and computation.

Grammar (OCI image-spec, descriptor.md)::

    digest    := algorithm ":" encoded
    algorithm := [a-z0-9]+ ([.+_-] [a-z0-9]+)*
    encoded   := [a-zA-Z0-9=_-]+

Only algorithms we can verify are accepted by :meth:`Digest.parse`; a grammatically
valid digest with any other algorithm raises :class:`UnsupportedDigest` so callers can
tell "malformed" from "well-formed but not checkable".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["Digest", "InvalidDigest", "UnsupportedDigest", "is_digest"]

_GRAMMAR = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

# algorithm -> (hash constructor, exact lowercase-hex encoding). The spec registers
# sha256 and sha512 with exactly these encodings; anything looser would let two
# spellings of one digest address different blobs.
_SUPPORTED: dict[str, tuple[Callable[[], _Hash], re.Pattern[str], int]] = {
    "sha256": (hashlib.sha256, re.compile(r"[a-f0-9]{64}"), 64),
    "sha512": (hashlib.sha512, re.compile(r"[a-f0-9]{128}"), 128),
}

# Digests and references come from untrusted input (request paths, pod specs):
# keep the error messages that quote them bounded.
_MAX_QUOTED = 100


def quote_bounded(s: str) -> str:
    if len(s) > _MAX_QUOTED:
        return repr(s[:_MAX_QUOTED]) + f"... ({len(s)} characters)"
    return repr(s)


class InvalidDigest(ValueError):
    """A string is not a valid, verifiable digest."""


class UnsupportedDigest(InvalidDigest):
    """A grammatically valid digest whose algorithm we cannot verify."""


def is_digest(s: str) -> bool:
    """Whether ``s`` has digest shape (any algorithm), e.g. to tell ``@digest`` from a tag."""
    return ":" in s and _GRAMMAR.fullmatch(s) is not None


def _check(algorithm: str, encoded: str) -> None:
    text = f"{algorithm}:{encoded}"
    if not _GRAMMAR.fullmatch(text):
        if not algorithm:
            raise InvalidDigest(f"digest {quote_bounded(text)} has an empty algorithm")
        if not encoded:
            raise InvalidDigest(f"digest {quote_bounded(text)} has an empty encoded part")
        raise InvalidDigest(
            f"digest {quote_bounded(text)} does not match the OCI digest grammar algorithm:encoded"
        )
    spec = _SUPPORTED.get(algorithm)
    if spec is None:
        supported = ", ".join(sorted(_SUPPORTED))
        raise UnsupportedDigest(
            f"digest algorithm {quote_bounded(algorithm)} is not supported (supported: {supported})"
        )
    _, pattern, length = spec
    if not pattern.fullmatch(encoded):
        raise InvalidDigest(
            f"digest {quote_bounded(text)} is not {length} lowercase hex characters"
        )


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated digest of a supported algorithm; ``str()`` gives ``algorithm:hex``."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        # Validate on construction too, so every Digest instance is verifiable.
        _check(self.algorithm, self.hex)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> _Hash:
        """A fresh hash object of this digest's algorithm, for streaming verification."""
        return _SUPPORTED[self.algorithm][0]()

    @classmethod
    def parse(cls, s: str) -> Digest:
        """Parse ``algorithm:hex``; raises InvalidDigest (or UnsupportedDigest)."""
        if ":" not in s:
            raise InvalidDigest(
                f"digest {quote_bounded(s)} has no algorithm prefix (expected algo:hex)"
            )
        algorithm, _, encoded = s.partition(":")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data`` computed with ``algorithm``."""
        spec = _SUPPORTED.get(algorithm)
        if spec is None:
            supported = ", ".join(sorted(_SUPPORTED))
            raise UnsupportedDigest(
                f"digest algorithm {quote_bounded(algorithm)} is not supported "
                f"(supported: {supported})"
            )
        h = spec[0]()
        h.update(data)
        return cls(algorithm, h.hexdigest())
