"""Deterministic test images: OCI layouts built in Python, pushed with skopeo, read back over HTTP.

Layers are tar+gzip of seeded pseudo-random bytes, so the same (seed, platform, size) always
yields the same digests, and random content keeps compressed size ~= requested size.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.support.regclient import (
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    sha256_digest,
)
from tests.support.registry import Registry
from tests.support.util import HarnessError

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_LAYER_SIZES: tuple[int, ...] = (4 * 1024, 16 * 1024)
MULTI_PLATFORMS: tuple[str, ...] = ("linux/amd64", "linux/arm64")

# Fixed timestamps keep configs (and so digests) reproducible.
_EPOCH = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"

Format = Literal["oci", "v2s2"]


@dataclass
class PushedImage:
    """What the registry actually holds for one manifest (or index), as read back over HTTP."""

    repository: str
    tag: str | None  # None for index children, which are addressed by digest
    manifest_digest: str
    media_type: str
    manifest_bytes: bytes
    blobs: list[tuple[str, int]]  # (digest, size): config first, then layers; empty for an index
    children: list[PushedImage] = field(default_factory=list)  # index/manifest-list entries
    platform: str | None = None  # "os/arch[/variant]" for index children
    registry_host: str = ""

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def config_digest(self) -> str | None:
        return self.blobs[0][0] if self.blobs else None

    @property
    def layers(self) -> list[tuple[str, int]]:
        return self.blobs[1:]

    @property
    def all_blobs(self) -> list[tuple[str, int]]:
        """Blobs of this manifest and of all children (deduplicated, stable order)."""
        seen: dict[str, int] = {}
        for digest, size in self.blobs:
            seen.setdefault(digest, size)
        for child in self.children:
            for digest, size in child.all_blobs:
                seen.setdefault(digest, size)
        return list(seen.items())

    @property
    def ref(self) -> str:
        """``HOST/REPO:TAG`` (or ``@digest`` without a tag), for pull tools."""
        suffix = f":{self.tag}" if self.tag else f"@{self.manifest_digest}"
        return f"{self.registry_host}/{self.repository}{suffix}"

    @property
    def digest_ref(self) -> str:
        return f"{self.registry_host}/{self.repository}@{self.manifest_digest}"

    def child(self, platform: str) -> PushedImage:
        for c in self.children:
            if c.platform == platform:
                return c
        raise KeyError(platform)


# --- building OCI layouts -----------------------------------------------------------------


def _layer_bytes(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _make_layer(name: str, payload: bytes) -> tuple[bytes, bytes]:
    """(gzipped tar, uncompressed tar) with fully fixed metadata."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = _EPOCH
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        tar.addfile(info, io.BytesIO(payload))
    raw = tar_buf.getvalue()
    gz_buf = io.BytesIO()
    # mtime=0 and no filename in the gzip header => byte-identical output for equal input.
    # Level 1: the payload is random, so higher levels only cost time on big layers.
    with gzip.GzipFile(fileobj=gz_buf, mode="wb", mtime=0, filename="", compresslevel=1) as gz:
        gz.write(raw)
    return gz_buf.getvalue(), raw


class _Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(self, data: bytes) -> str:
        digest = sha256_digest(data)
        (self.blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    def put_json(self, obj: Any) -> tuple[str, int]:
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        return self.put(data), len(data)

    def write_index(self, descriptor: dict[str, Any], tag: str) -> None:
        descriptor = {**descriptor, "annotations": {REF_NAME: tag}}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
        (self.root / "index.json").write_text(json.dumps(index))


def _platform_dict(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) > 2:
        out["variant"] = parts[2]
    return out


def _build_manifest(
    layout: _Layout, layer_sizes: Sequence[int], platform: str, seed: str
) -> dict[str, Any]:
    """Write layers, config and manifest blobs; return the manifest's descriptor."""
    layers: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        gz, raw = _make_layer(f"layer-{i}.bin", _layer_bytes(f"{seed}:{platform}:{i}", size))
        digest = layout.put(gz)
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(gz)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    plat = _platform_dict(platform)
    config = {
        **plat,
        "created": _CREATED,
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Labels": {"seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": _CREATED, "created_by": f"stowage-test layer {i}"}
            for i in range(len(layers))
        ],
    }
    config_digest, config_size = layout.put_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    digest, size = layout.put_json(manifest)
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": plat}


def build_image_layout(
    dest: Path,
    tag: str,
    *,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    platform: str = "linux/amd64",
    seed: str = "stowage-test",
) -> Path:
    """A single-platform OCI image layout at ``dest`` with ``tag`` in index.json."""
    layout = _Layout(dest)
    desc = _build_manifest(layout, layer_sizes, platform, seed)
    desc.pop("platform")
    layout.write_index(desc, tag)
    return dest


def build_index_layout(
    dest: Path,
    tag: str,
    *,
    platforms: Sequence[str] = MULTI_PLATFORMS,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    seed: str = "stowage-test-multi",
) -> Path:
    """A multi-platform OCI layout: an image index (one manifest + own layers per platform)."""
    layout = _Layout(dest)
    manifests = [_build_manifest(layout, layer_sizes, p, seed) for p in platforms]
    index_digest, index_size = layout.put_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    )
    layout.write_index({"mediaType": OCI_INDEX, "digest": index_digest, "size": index_size}, tag)
    return dest


# --- pushing and reading back ---------------------------------------------------------------


def skopeo_binary() -> str:
    path = shutil.which("skopeo")
    if path is None:
        raise HarnessError("skopeo not found (apt-get install skopeo)")
    return path


def skopeo_copy(
    src: str,
    dest: str,
    *,
    registry: Registry,
    all_images: bool = False,
    fmt: Format = "oci",
    credentials: tuple[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy SRC DEST`` to ``registry``, isolated from host containers config."""
    with tempfile.TemporaryDirectory(prefix="skopeo-") as tmp:
        tmpdir = Path(tmp)
        # Empty auth file / registries.conf: the host's config must not influence the push.
        (tmpdir / "auth.json").write_text("{}")
        (tmpdir / "registries.conf").write_text("")
        argv = [
            skopeo_binary(),
            "--insecure-policy",
            "--registries-conf",
            str(tmpdir / "registries.conf"),
            "copy",
            "--retry-times",
            "2",
            "--dest-authfile",
            str(tmpdir / "auth.json"),
        ]
        if all_images:
            argv.append("--all")
        if fmt == "v2s2":
            argv += ["--format", "v2s2"]
        if registry.ca_file is not None:
            # skopeo trusts every *.crt in a cert dir.
            certs = tmpdir / "certs"
            certs.mkdir()
            shutil.copy(registry.ca_file, certs / "ca.crt")
            argv += ["--dest-cert-dir", str(certs)]
        else:
            argv.append("--dest-tls-verify=false")  # plain HTTP registry
        creds = credentials or registry.admin_credentials
        if creds is not None:
            argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        argv += [src, dest]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise HarnessError(
            f"skopeo copy failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout}{proc.stderr}"
        )
    return proc


def read_back(
    client: RegistryClient,
    repository: str,
    reference: str,
    *,
    registry_host: str = "",
) -> PushedImage:
    """Fetch a manifest (and index children) exactly as the registry serves it."""
    resp = client.get_manifest(repository, reference)
    if resp.status != 200:
        raise HarnessError(f"GET manifest {repository}:{reference} -> {resp.status} {resp.body!r}")
    body = resp.body
    digest = sha256_digest(body)
    header_digest = resp.header("Docker-Content-Digest")
    if header_digest and header_digest != digest:
        raise HarnessError(f"registry digest {header_digest} != computed {digest}")
    media_type = (resp.header("Content-Type") or "").split(";")[0].strip()
    doc = json.loads(body)
    is_tag = not reference.startswith("sha256:")
    image = PushedImage(
        repository=repository,
        tag=reference if is_tag else None,
        manifest_digest=digest,
        media_type=media_type or doc.get("mediaType", ""),
        manifest_bytes=body,
        blobs=[],
        registry_host=registry_host,
    )
    if image.is_index:
        for entry in doc["manifests"]:
            child = read_back(client, repository, entry["digest"], registry_host=registry_host)
            plat = entry.get("platform", {})
            child.platform = "/".join(
                p for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p
            )
            image.children.append(child)
    else:
        image.blobs.append((doc["config"]["digest"], int(doc["config"]["size"])))
        image.blobs += [(layer["digest"], int(layer["size"])) for layer in doc["layers"]]
    return image


def push_layout(
    registry: Registry,
    layout: Path,
    layout_tag: str,
    repository: str,
    tag: str,
    *,
    all_images: bool = False,
    fmt: Format = "oci",
) -> PushedImage:
    skopeo_copy(
        f"oci:{layout}:{layout_tag}",
        f"docker://{registry.host}/{repository}:{tag}",
        registry=registry,
        all_images=all_images,
        fmt=fmt,
    )
    return read_back(registry.client(), repository, tag, registry_host=registry.host)


def push_image(
    registry: Registry,
    repository: str,
    tag: str,
    *,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    platform: str = "linux/amd64",
    seed: str | None = None,
    fmt: Format = "oci",
) -> PushedImage:
    """Build and push a single-platform image. Default seed is the repo name, so different
    repositories get different layers unless a shared seed is passed explicitly."""
    with tempfile.TemporaryDirectory(prefix="oci-layout-") as tmp:
        layout = build_image_layout(
            Path(tmp) / "layout",
            tag,
            layer_sizes=layer_sizes,
            platform=platform,
            seed=seed if seed is not None else f"{repository}:{tag}",
        )
        return push_layout(registry, layout, tag, repository, tag, fmt=fmt)


def push_index(
    registry: Registry,
    repository: str,
    tag: str,
    *,
    platforms: Sequence[str] = MULTI_PLATFORMS,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    seed: str | None = None,
    fmt: Format = "oci",
) -> PushedImage:
    """Build and push a multi-platform index (``fmt="v2s2"`` gives a Docker manifest list)."""
    with tempfile.TemporaryDirectory(prefix="oci-layout-") as tmp:
        layout = build_index_layout(
            Path(tmp) / "layout",
            tag,
            platforms=platforms,
            layer_sizes=layer_sizes,
            seed=seed if seed is not None else f"{repository}:{tag}",
        )
        return push_layout(registry, layout, tag, repository, tag, all_images=True, fmt=fmt)
