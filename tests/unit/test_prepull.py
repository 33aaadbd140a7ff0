"""Pure parts of the agent's pre-pull: node selection, pull names, pull-secret lookup."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from stowage.agent.cri import Image
from stowage.agent.prepull import (
    Outcome,
    PrePuller,
    credentials_from_secret,
    pull_name,
    repo_digest,
    selects,
)
from stowage.oci.reference import parse_reference


def test_selects_needs_every_label() -> None:
    labels = {"zone": "a", "disk": "ssd"}
    assert selects(None, labels)
    assert selects({}, labels)
    assert selects({"zone": "a"}, labels)
    assert not selects({"zone": "a", "disk": "hdd"}, labels)
    assert not selects({"gpu": "yes"}, labels)


@pytest.mark.parametrize(
    ("image", "mirrored", "expected"),
    [
        ("nginx:1.27", set(), "localhost:7439/docker.io/library/nginx:1.27"),
        ("127.0.0.1:5000/app:1", set(), "localhost:7439/127.0.0.1-5000/app:1"),
        ("nginx:1.27", {"docker.io"}, "docker.io/library/nginx:1.27"),
        ("ghcr.io/o/a@sha256:" + "a" * 64, {"_default"}, "ghcr.io/o/a@sha256:" + "a" * 64),
        ("ghcr.io/o/a:1", {"docker.io"}, "localhost:7439/ghcr.io/o/a:1"),
    ],
)
def test_pull_name_is_what_pods_use(image: str, mirrored: set[str], expected: str) -> None:
    assert pull_name(parse_reference(image), mirrored, "localhost:7439") == expected


def test_repo_digest_is_the_first_digested_name() -> None:
    digest = "sha256:" + "a" * 64
    image = Image("sha256:" + "b" * 64, ("r/app:1",), ("r/app", f"r/app@{digest}"), 1)
    assert repo_digest(image) == digest
    assert repo_digest(Image("sha256:" + "b" * 64, ("r/app:1",), (), 1)) == ""
    assert repo_digest(None) == ""


def _secret(doc: object, key: str = ".dockerconfigjson") -> dict[str, object]:
    return {"data": {key: base64.b64encode(json.dumps(doc).encode()).decode()}}


def test_credentials_from_dockerconfigjson() -> None:
    auth = base64.b64encode(b"alice:s3cret").decode()
    secret = _secret(
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": auth},
                "ghcr.io": {"username": "bob", "password": "pw"},
            }
        }
    )
    assert credentials_from_secret(secret, "docker.io") == ("alice", "s3cret")
    assert credentials_from_secret(secret, "ghcr.io") == ("bob", "pw")
    assert credentials_from_secret(secret, "quay.io") is None


def test_credentials_from_legacy_dockercfg_and_garbage() -> None:
    legacy = _secret({"registry.local:5000": {"username": "u", "password": "p"}}, ".dockercfg")
    assert credentials_from_secret(legacy, "registry.local:5000") == ("u", "p")
    assert credentials_from_secret({"data": {".dockerconfigjson": "!!"}}, "docker.io") is None
    assert credentials_from_secret({}, "docker.io") is None


class _StatusAPI:
    """Refuses the first status patch (a 503 from the API server), then takes them."""

    def __init__(self) -> None:
        self.patches: list[dict[str, object]] = []
        self.refuse = 1

    async def patch_namespaced_custom_object_status(self, *args: object, **kw: object) -> None:
        if self.refuse:
            self.refuse -= 1
            raise k8s.ApiException(status=503, reason="Service Unavailable")
        self.patches.append(args[5])  # type: ignore[arg-type]


async def test_a_refused_status_write_is_made_again(tmp_path: Path) -> None:
    fake = _StatusAPI()

    class Puller(PrePuller):
        @property
        def objects(self) -> Any:
            return fake

    puller = Puller(
        k8s.ApiClient(),
        None,  # type: ignore[arg-type]  # no CRI call in _report
        node="node-a",
        proxy_address="localhost:7439",
        mirrored=set(),
        disk_threshold=0.9,
        state_dir=tmp_path,
    )
    name = "localhost:7439/docker.io/library/app:1"
    puller.outcomes[name] = Outcome("docker.io/library/app:1", "Pulled", at=1.0)
    cache = {"metadata": {"namespace": "ns", "name": "ic"}, "spec": {"images": ["app:1"]}}
    per_cache = {("ns", "ic"): [name]}
    await puller._report([cache], per_cache, [cache])  # refused
    assert fake.patches == []
    await puller._report([cache], per_cache, [cache])  # unchanged, but never written
    await puller._report([cache], per_cache, [cache])  # written: nothing more to say
    assert len(fake.patches) == 1
    (entry,) = fake.patches[0]["status"]["nodes"]["node-a"]["images"]  # type: ignore[index]
    assert (entry["image"], entry["state"]) == ("docker.io/library/app:1", "Pulled")
    await puller.api.close()
