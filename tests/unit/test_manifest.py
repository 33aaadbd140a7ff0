import json

import pytest

from stowage.oci.manifest import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    InvalidManifest,
    Platform,
    parse_manifest,
    select_platform,
)

D = "sha256:" + "a" * 64
E = "sha256:" + "b" * 64
F = "sha256:" + "c" * 64


def test_image_manifest_refs() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "x", "digest": D, "size": 10},
            "layers": [{"mediaType": "l", "digest": E, "size": 20}],
        }
    ).encode()
    media_type, refs = parse_manifest(body, "application/json")
    assert media_type == DOCKER_MANIFEST
    assert [(r.digest, r.kind, r.size) for r in refs] == [(D, "config", 10), (E, "layer", 20)]


def test_media_type_from_content_type_or_shape() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert parse_manifest(index, None)[0] == OCI_INDEX
    assert parse_manifest(index, OCI_MANIFEST + "; charset=utf-8")[0] == OCI_MANIFEST
    image = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    assert parse_manifest(image, "text/plain")[0] == OCI_MANIFEST


def test_index_platform_selection() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"digest": D, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
                {
                    "digest": E,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
                },
                {"digest": F, "size": 1},
            ],
        }
    ).encode()
    _, refs = parse_manifest(body)
    chosen = select_platform(refs, Platform.parse("linux/amd64"))
    assert chosen is not None and chosen.digest == D
    chosen = select_platform(refs, Platform.parse("linux/arm/v7"))
    assert chosen is not None and chosen.digest == E
    assert select_platform(refs, Platform.parse("linux/arm/v6")) is None
    assert select_platform(refs, Platform.parse("windows/amd64")) is None


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"layers": [{"size": 1}]}', b"\xff"])
def test_invalid_manifests(body: bytes) -> None:
    with pytest.raises(InvalidManifest):
        parse_manifest(body)


@pytest.mark.parametrize("value", ["linux", "linux/", "/amd64", "a/b/c/d"])
def test_invalid_platform(value: str) -> None:
    with pytest.raises(ValueError, match="os/arch"):
        Platform.parse(value)
