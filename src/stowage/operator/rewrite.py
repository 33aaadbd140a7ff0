"""Which pod images the webhook rewrites to the node proxy, and how (pure, no I/O).

A rewritten image is the normalised reference, host-prefixed as ``stowage serve`` routes
it: ``nginx`` → ``localhost:7439/docker.io/library/nginx:latest``; a digest stays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stowage.oci.reference import (
    InvalidReference,
    Reference,
    decode_registry_component,
    parse_reference,
    proxied_reference,
)

ORIGINAL_IMAGES = "stowage.dev/original-images"
OPT_OUT_LABEL = "stowage.dev/image-caching"
OPT_OUT_VALUE = "ignore"
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class RewritePolicy:
    proxy: str  # HOST:PORT of the node proxy, as the kubelet's runtime reaches it
    ignored_namespaces: frozenset[str] = frozenset()
    include: tuple[re.Pattern[str], ...] = ()  # empty: every image
    exclude: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def build(
        cls,
        proxy: str,
        ignored_namespaces: Iterable[str] = (),
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ) -> RewritePolicy:
        """Raises ValueError naming a bad regex or proxy address."""
        patterns: list[tuple[re.Pattern[str], ...]] = []
        for kind, sources in (("include", include), ("exclude", exclude)):
            compiled = []
            for source in sources:
                try:
                    compiled.append(re.compile(source))
                except re.error as exc:
                    raise ValueError(
                        f"--{kind} {source!r} is not a regular expression: {exc}"
                    ) from None
            patterns.append(tuple(compiled))
        try:
            proxied_reference(parse_reference("probe"), proxy)
        except InvalidReference as exc:
            raise ValueError(f"--proxy-address: {exc}") from None
        return cls(proxy, frozenset(ignored_namespaces), patterns[0], patterns[1])

    def wanted(self, ref: Reference) -> bool:
        """Include/exclude regexes are searched in the normalised reference."""
        text = str(ref)
        if self.include and not any(p.search(text) for p in self.include):
            return False
        return not any(p.search(text) for p in self.exclude)

    def proxies(self, image: str) -> bool:
        """Whether ``image`` is already pulled through the proxy."""
        return image.startswith(self.proxy + "/")

    def source_of(self, image: str) -> Reference | None:
        """The upstream image an already-proxied ``image`` stands for, else None."""
        if not self.proxies(image):
            return None
        component, _, rest = image[len(self.proxy) + 1 :].partition("/")
        registry = decode_registry_component(component)
        if registry is None or not rest:
            return None
        try:
            return parse_reference(f"{registry}/{rest}")
        except InvalidReference:
            return None


@dataclass
class Rewrite:
    """What the webhook does to one pod: new images per container, and the annotation."""

    images: dict[str, dict[int, str]] = field(default_factory=dict)  # field → index → image
    originals: dict[str, str] = field(default_factory=dict)  # container name → image
    skipped: list[str] = field(default_factory=list)  # why containers were left alone

    @property
    def changed(self) -> bool:
        return bool(self.images)


def skip_reason(policy: RewritePolicy, namespace: str | None, labels: Mapping[str, str]) -> str:
    """Why the whole pod is left alone, or '' when it is not."""
    if namespace in policy.ignored_namespaces:
        return f"namespace {namespace} is ignored"
    if labels.get(OPT_OUT_LABEL) == OPT_OUT_VALUE:
        return f"labelled {OPT_OUT_LABEL}={OPT_OUT_VALUE}"
    return ""


def plan(
    policy: RewritePolicy, spec: Mapping[str, Any], fields: Sequence[str] = CONTAINER_FIELDS
) -> Rewrite:
    """The rewrite of the containers in ``fields`` of a pod ``spec``."""
    out = Rewrite()
    for fld in fields:
        for i, container in enumerate(spec.get(fld) or ()):
            image = container.get("image")
            name = container.get("name", f"{fld}[{i}]")
            if not isinstance(image, str) or not image:
                continue
            if policy.proxies(image):
                continue  # already through the proxy: idempotent, and reinvocation-safe
            try:
                ref = parse_reference(image)
            except InvalidReference as exc:
                # The runtime will refuse it with its own message; we must not guess.
                out.skipped.append(f"{name}: {exc}")
                continue
            if not policy.wanted(ref):
                out.skipped.append(f"{name}: {ref} not selected by include/exclude")
                continue
            try:
                new = proxied_reference(ref, policy.proxy)
            except InvalidReference as exc:
                out.skipped.append(f"{name}: {exc}")
                continue
            out.images.setdefault(fld, {})[i] = new
            out.originals[name] = image
    return out


def merged_annotation(existing: str | None, originals: Mapping[str, str]) -> str:
    """The original-images annotation with ``originals`` added; earlier entries win
    (a reinvoked webhook must not record a proxied image as an original)."""
    merged = _originals(existing)
    for name, image in originals.items():
        merged.setdefault(name, image)
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


def _originals(raw: str | None) -> dict[str, str]:
    """Container name → original image, from the annotation ({} when absent or unreadable)."""
    try:
        doc = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def source_images(policy: RewritePolicy, pod: Mapping[str, Any]) -> set[str]:
    """The upstream images (normalised references) a pod pulls through the proxy: the
    recorded originals of its rewritten containers, and images naming the proxy directly."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    originals = _originals((meta.get("annotations") or {}).get(ORIGINAL_IMAGES))
    out: set[str] = set()
    for fld in CONTAINER_FIELDS:
        for container in spec.get(fld) or ():
            image = container.get("image")
            if not isinstance(image, str) or not policy.proxies(image):
                continue
            original = originals.get(container.get("name", ""))
            ref: Reference | None = None
            if original:
                try:
                    ref = parse_reference(original)
                except InvalidReference:
                    ref = None
            if ref is None:
                ref = policy.source_of(image)
            if ref is not None:
                out.add(str(ref))
    return out
