"""Pure parts of the CRI client: which images containers use, filesystem arithmetic,
endpoints and error messages. (The client itself is tested against containerd in
tests/integration/test_agent_cri.py.)"""

from __future__ import annotations

import grpc
import pytest

from stowage.agent.cri import (
    ContainerImage,
    CRIError,
    FsUsage,
    Image,
    image_ids_in_use,
    normalize_endpoint,
)

APP_ID = "sha256:" + "a" * 64
WEB_ID = "sha256:" + "b" * 64
IDLE_ID = "sha256:" + "c" * 64
GONE_ID = "sha256:" + "d" * 64
MANIFEST = "sha256:" + "e" * 64

IMAGES = [
    Image(APP_ID, ("reg.local/app:1", "reg.local/app:latest"), (f"reg.local/app@{MANIFEST}",), 10),
    Image(WEB_ID, ("docker.io/library/nginx:1.27",), (), 20),
    Image(IDLE_ID, ("reg.local/idle:1",), (), 30),
]


def _container(image: str = "", image_ref: str = "", image_id: str = "") -> ContainerImage:
    return ContainerImage("c1", image=image, image_ref=image_ref, image_id=image_id)


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        # containerd 1.6/1.7: image_ref is the image id, image the name it was created from.
        (_container("reg.local/app:1", APP_ID), {APP_ID}),
        # newer runtimes add image_id.
        (_container("reg.local/app:1", f"reg.local/app@{MANIFEST}", APP_ID), {APP_ID}),
        # CRI-O style: image_ref is a digested reference.
        (_container("", f"reg.local/app@{MANIFEST}"), {APP_ID}),
        # only a name, matching a tag
        (_container("docker.io/library/nginx:1.27"), {WEB_ID}),
        # an id of an image no longer listed is still reported
        (_container("", GONE_ID), {GONE_ID}),
        # a name matching nothing is not an id: nothing to report
        (_container("reg.local/unknown:1"), set()),
        (_container(), set()),
    ],
)
def test_image_ids_in_use(container: ContainerImage, expected: set[str]) -> None:
    assert image_ids_in_use([container], IMAGES) == expected


def test_image_ids_in_use_over_many_containers() -> None:
    containers = [
        ContainerImage("c1", "reg.local/app:latest", APP_ID, state="CONTAINER_EXITED"),
        ContainerImage("c2", "docker.io/library/nginx:1.27", WEB_ID, state="CONTAINER_RUNNING"),
        ContainerImage("c3", "reg.local/app:1", APP_ID, state="CONTAINER_CREATED"),
    ]
    assert image_ids_in_use(containers, IMAGES) == {APP_ID, WEB_ID}
    assert image_ids_in_use([], IMAGES) == set()


def test_usage_fraction() -> None:
    fs = FsUsage("/var/lib/containerd", 10, 1, capacity_bytes=1000, available_bytes=150)
    assert fs.usage_fraction == pytest.approx(0.85)
    assert FsUsage("/x", 10, None).usage_fraction is None
    assert FsUsage("/x", 10, None, capacity_bytes=0, available_bytes=0).usage_fraction is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/run/containerd/containerd.sock", "unix:///run/containerd/containerd.sock"),
        ("unix:///run/containerd/containerd.sock", "unix:///run/containerd/containerd.sock"),
        ("127.0.0.1:10010", "127.0.0.1:10010"),
    ],
)
def test_normalize_endpoint(given: str, expected: str) -> None:
    assert normalize_endpoint(given) == expected


def test_cri_error_message() -> None:
    err = CRIError(
        "unix:///run/containerd/containerd.sock",
        "ListImages",
        grpc.StatusCode.UNIMPLEMENTED,
        "unknown service runtime.v1.ImageService",
    )
    text = str(err)
    assert text.startswith(
        "CRI ListImages on unix:///run/containerd/containerd.sock failed: UNIMPLEMENTED: "
        "unknown service runtime.v1.ImageService"
    )
    assert "CRI plugin enabled" in text
    assert str(CRIError("unix:///x", "Version", None, "boom")) == (
        "CRI Version on unix:///x failed: ERROR: boom"
    )
