"""The webhook's decisions (pure): which images are rewritten, to what, and the names of
CachedImages."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stowage.operator.names import cached_image_name
from stowage.operator.rewrite import (
    ORIGINAL_IMAGES,
    RewritePolicy,
    merged_annotation,
    plan,
    skip_reason,
    source_images,
)

PROXY = "localhost:7439"
POLICY = RewritePolicy.build(PROXY, ["kube-system"], exclude=[r"^docker\.io/library/skip:"])
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("nginx", "localhost:7439/docker.io/library/nginx:latest"),
        ("nginx:1.27", "localhost:7439/docker.io/library/nginx:1.27"),
        ("library/nginx:1.27", "localhost:7439/docker.io/library/nginx:1.27"),
        ("index.docker.io/user/app", "localhost:7439/docker.io/user/app:latest"),
        ("127.0.0.1:5000/app:1", "localhost:7439/127.0.0.1-5000/app:1"),
        ("ghcr.io/o/a@sha256:" + "b" * 64, "localhost:7439/ghcr.io/o/a@sha256:" + "b" * 64),
        (
            "quay.io/o/a:1@sha256:" + "c" * 64,
            "localhost:7439/quay.io/o/a:1@sha256:" + "c" * 64,
        ),
    ],
)
def test_rewrite(image: str, expected: str) -> None:
    rewrite = plan(POLICY, {"containers": [{"name": "c", "image": image}]})
    assert rewrite.images == {"containers": {0: expected}}
    assert rewrite.originals == {"c": image}


def test_left_alone_per_container() -> None:
    spec = {
        "initContainers": [{"name": "i", "image": "busybox"}],
        "containers": [
            {"name": "proxied", "image": "localhost:7439/docker.io/library/nginx:1"},
            {"name": "excluded", "image": "skip:1"},
            {"name": "invalid", "image": "nginx:bad tag"},
            {"name": "ok", "image": "nginx"},
        ],
    }
    rewrite = plan(POLICY, spec)
    assert rewrite.images == {
        "initContainers": {0: "localhost:7439/docker.io/library/busybox:latest"},
        "containers": {3: "localhost:7439/docker.io/library/nginx:latest"},
    }
    assert set(rewrite.originals) == {"i", "ok"}
    assert len(rewrite.skipped) == 2  # excluded and invalid say why; proxied is silent


def test_include_limits_and_skip_reasons() -> None:
    policy = RewritePolicy.build(PROXY, ["ns-a"], include=[r"^ghcr\.io/"])
    rewrite = plan(policy, {"containers": [{"name": "a", "image": "nginx"}]})
    assert not rewrite.changed
    assert plan(policy, {"containers": [{"name": "a", "image": "ghcr.io/o/a:1"}]}).changed
    assert skip_reason(policy, "ns-a", {}) == "namespace ns-a is ignored"
    assert "stowage.dev/image-caching" in skip_reason(
        policy, "other", {"stowage.dev/image-caching": "ignore"}
    )
    assert skip_reason(policy, "other", {"stowage.dev/image-caching": "yes"}) == ""


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="--exclude"):
        RewritePolicy.build(PROXY, exclude=["("])
    with pytest.raises(ValueError, match="--proxy-address"):
        RewritePolicy.build("myproxy")  # would read as a Docker Hub namespace


def test_annotation_keeps_first_originals() -> None:
    first = merged_annotation(None, {"a": "nginx"})
    again = merged_annotation(first, {"a": "localhost:7439/docker.io/library/nginx:latest"})
    assert json.loads(again) == {"a": "nginx"}
    assert json.loads(merged_annotation("not json", {"b": "x"})) == {"b": "x"}


def test_source_images_from_annotation_and_proxied_names() -> None:
    pod = {
        "metadata": {"annotations": {ORIGINAL_IMAGES: json.dumps({"a": "nginx"})}},
        "spec": {
            "containers": [
                {"name": "a", "image": "localhost:7439/docker.io/library/nginx:latest"},
                {"name": "b", "image": "localhost:7439/127.0.0.1-5000/app:1"},
                {"name": "c", "image": "redis"},  # not through the proxy: not ours
            ]
        },
    }
    assert source_images(POLICY, pod) == {
        "docker.io/library/nginx:latest",
        "127.0.0.1:5000/app:1",
    }


@given(st.text(min_size=1, max_size=300))
def test_cached_image_names_are_valid_and_stable(reference: str) -> None:
    name = cached_image_name(reference)
    assert len(name) <= 253
    assert DNS_SUBDOMAIN.fullmatch(name), name
    assert cached_image_name(reference) == name


def test_cached_image_names_read_well_and_do_not_collide() -> None:
    assert cached_image_name("docker.io/library/nginx:1.27").startswith(
        "docker.io-library-nginx-1.27-"
    )
    alike = ["docker.io/a/b:c", "docker.io/a-b:c", "docker.io/a/b-c"]
    assert len({cached_image_name(r) for r in alike}) == 3
    long = "registry.example.com/" + "x" * 240 + ":1"
    assert len(cached_image_name(long)) <= 253
