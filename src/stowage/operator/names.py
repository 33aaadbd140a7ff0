"""CachedImage names: readable, valid Kubernetes object names, one per reference (pure)."""

from __future__ import annotations

import hashlib
import re

# Object names are DNS subdomains (253 characters); stay well below so that the name reads
# in `kubectl get` and leaves room for the hash.
_READABLE_MAX = 100
_HASH_LEN = 10
_INVALID = re.compile(r"[^a-z0-9.-]+")
_RUNS = re.compile(r"[.-]{2,}")


def cached_image_name(reference: str) -> str:
    """``docker.io/library/nginx:1.27`` → ``docker.io-library-nginx-1.27-<hash>``.

    The readable part lowercases the reference and turns what names cannot hold into '-';
    the hash of the exact reference keeps two references that read alike (``a/b:c`` and
    ``a-b:c``, long names cut short, digests) from colliding.
    """
    digest = hashlib.sha256(reference.encode()).hexdigest()[:_HASH_LEN]
    name, at, pinned = reference.partition("@")
    readable = _clean(name)[:_READABLE_MAX]
    if at:  # a digest: its first hex digits tell pinned references apart at a glance
        readable = f"{readable}-{_clean(pinned.rpartition(':')[2])[:12]}"
    readable = readable.strip(".-")
    return f"{readable}-{digest}" if readable else digest


def _clean(text: str) -> str:
    """Lowercase, with runs of what object names cannot hold (or '.'/'-' runs) as one '-'."""
    text = _INVALID.sub("-", text.lower().replace(":", "-").replace("/", "-"))
    return _RUNS.sub("-", text).strip(".-")
