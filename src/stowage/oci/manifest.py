"""Manifest media types and the references a manifest holds (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_V1_SIGNED, DOCKER_V1})

# What stowage asks upstream for, whatever the client asked: the upstream's own
# form, so the cached bytes and digest are the image's identity for everyone.
UPSTREAM_ACCEPT = ", ".join(
    [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_V1_SIGNED + ";q=0.5"]
)

# Like containerd: a manifest is small; anything larger is refused.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


class InvalidManifest(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, value: str) -> Platform:
        parts = value.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {value!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: str
    size: int
    media_type: str
    kind: str  # "manifest" (child of an index), "config" or "layer"
    platform: Platform | None = None


def parse_manifest(body: bytes, content_type: str | None = None) -> tuple[str, list[Descriptor]]:
    """Return (media type, referenced descriptors) of a manifest or index.

    The media type comes from the document when present, else from the
    response's Content-Type, else from its shape (OCI allows omitting it).
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidManifest(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidManifest("manifest is not a JSON object")
    media_type = doc.get("mediaType") or _base_type(content_type)
    if not media_type:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    refs: list[Descriptor] = []
    try:
        for item in doc.get("manifests") or []:
            plat = item.get("platform")
            platform = (
                Platform(plat.get("os", ""), plat.get("architecture", ""), plat.get("variant"))
                if isinstance(plat, dict)
                else None
            )
            refs.append(_descriptor(item, "manifest", platform))
        if isinstance(doc.get("config"), dict):
            refs.append(_descriptor(doc["config"], "config"))
        for item in doc.get("layers") or []:
            refs.append(_descriptor(item, "layer"))
        for item in doc.get("fsLayers") or []:  # schema 1
            refs.append(Descriptor(str(item["blobSum"]), -1, "", "layer"))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidManifest(f"malformed descriptor in manifest: {exc}") from exc
    return str(media_type), refs


def _descriptor(item: dict[str, object], kind: str, platform: Platform | None = None) -> Descriptor:
    size = item.get("size", -1)
    return Descriptor(
        digest=str(item["digest"]),
        size=int(size) if isinstance(size, int) else -1,
        media_type=str(item.get("mediaType", "")),
        kind=kind,
        platform=platform,
    )


def _base_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    base = content_type.split(";", 1)[0].strip()
    return base if base and base not in ("application/json", "text/plain") else None


def select_platform(refs: list[Descriptor], want: Platform) -> Descriptor | None:
    """The index entry for a platform (variant matched only when asked for)."""
    for ref in refs:
        p = ref.platform
        if p is None or ref.kind != "manifest":
            continue
        if (
            p.os == want.os
            and p.architecture == want.architecture
            and (want.variant is None or p.variant == want.variant)
        ):
            return ref
    return None
