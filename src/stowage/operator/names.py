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
    readable = reference.lower().split("@", 1)[0]
    readable = _RUNS.sub("-", _INVALID.sub("-", readable.replace(":", "-").replace("/", "-")))
    readable = readable[:_READABLE_MAX].strip(".-")
    if "@" in reference:
        readable = f"{readable}-{reference.rsplit(':', 1)[-1][:12]}".strip(".-")
    return f"{readable}-{digest}" if readable else digest
