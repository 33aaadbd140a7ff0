"""The parent stowage's pure decisions: routing, which answers stand, back-off."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from stowage.proxy.routing import parse_route
from stowage.settings import ConfigError, http_url, load_settings
from stowage.upstream.parent import (
    EVERY_REGISTRY,
    Answer,
    Parent,
    classify,
    parent_path,
)

# --- routing: the parent must read the same registry and repository back -------------------


@pytest.mark.parametrize(
    ("registry", "repository", "path", "expected"),
    [
        (
            "docker.io",
            "library/nginx",
            "manifests/1.27",
            "/v2/docker.io/library/nginx/manifests/1.27",
        ),
        (
            "127.0.0.1:5000",
            "org/app",
            "blobs/sha256:ab",
            "/v2/127.0.0.1-5000/org/app/blobs/sha256:ab",
        ),
        ("localhost:5000", "app", "tags/list", "/v2/localhost-5000/app/tags/list"),
        ("ghcr.io", "o/a", "tags/list?n=2&last=b", "/v2/ghcr.io/o/a/tags/list?n=2&last=b"),
        # Dot-less hosts are routed host-prefixed only when configured: use ns instead.
        ("myreg:5000", "app", "manifests/1", "/v2/app/manifests/1?ns=myreg%3A5000"),
        ("myreg", "app", "tags/list?n=1", "/v2/app/tags/list?n=1&ns=myreg"),
        # "foo.bar-1" would decode as foo.bar:1.
        ("foo.bar-1", "app", "manifests/1", "/v2/app/manifests/1?ns=foo.bar-1"),
    ],
)
def test_parent_path(registry: str, repository: str, path: str, expected: str) -> None:
    assert parent_path(registry, repository, path) == expected


@pytest.mark.parametrize(
    ("registry", "repository"),
    [
        ("docker.io", "library/nginx"),
        ("registry.example:8443", "a/b/c"),
        ("127.0.0.1:5000", "library/app"),
        ("localhost", "app"),
        ("myreg:5000", "team/app"),
        ("foo.bar-1", "app"),
        ("quay.io", "org/manifests/app"),
    ],
)
def test_parent_routes_the_path_back_to_the_same_registry(registry: str, repository: str) -> None:
    """What the parent's router (with no configured registries) makes of the path."""
    for path, kind, ref in [
        ("manifests/1", "manifests", "1"),
        ("blobs/sha256:" + "a" * 64, "blobs", "sha256:" + "a" * 64),
        ("tags/list", "tags", ""),
    ]:
        full = parent_path(registry, repository, path)
        tail, _, query = full.removeprefix("/v2/").partition("?")
        ns = dict(p.split("=", 1) for p in query.split("&") if p).get("ns")
        ns = ns.replace("%3A", ":") if ns else None
        route = parse_route(tail, ns, "docker.io")
        assert (route.registry, route.repository, route.kind, route.reference) == (
            registry,
            repository,
            kind,
            ref,
        )


# --- which answers stand -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "registry_answer", "has_credentials", "answer"),
    [
        (200, True, False, Answer.USE),
        (206, True, True, Answer.USE),
        # The parent answers 404 only when the registry did, to an anonymous request.
        (404, True, False, Answer.USE),
        # With credentials the registry may show a private repository as 404 to anonymous.
        (404, True, True, Answer.PRIVATE),
        (401, True, False, Answer.PRIVATE),
        (403, True, True, Answer.PRIVATE),
        (429, True, False, Answer.FAILED),
        (500, True, False, Answer.FAILED),
        (502, True, False, Answer.FAILED),
        (400, True, False, Answer.FAILED),
        # Not a registry's answer (no Docker-Distribution-API-Version): never trusted.
        (200, False, False, Answer.FAILED),
        (404, False, False, Answer.FAILED),
        (401, False, False, Answer.FAILED),
    ],
)
def test_classify(
    status: int, registry_answer: bool, has_credentials: bool, answer: Answer
) -> None:
    assert classify(status, registry_answer, has_credentials) is answer


# --- back-off -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_for_one_registry_and_for_every_registry() -> None:
    clock = Clock()
    results: list[str] = []
    parent = Parent("http://parent:7439/", backoff=5.0, on_result=results.append, clock=clock)
    assert parent.url == "http://parent:7439"
    assert parent.usable("docker.io") and parent.usable("ghcr.io")

    parent.failed("ghcr.io", "answered 502")
    assert parent.usable("docker.io")
    assert not parent.usable("ghcr.io")
    clock.now += 5.0
    assert parent.usable("ghcr.io")

    parent.failed(EVERY_REGISTRY, "unreachable", "mismatch")
    assert not parent.usable("docker.io") and not parent.usable("ghcr.io")
    clock.now += 4.9
    assert not parent.usable("docker.io")
    clock.now += 0.1
    assert parent.usable("docker.io")
    assert results == ["fallback", "mismatch"]


def test_failure_is_logged_once_per_backoff() -> None:
    clock = Clock()
    parent = Parent("http://parent:7439", backoff=5.0, clock=clock)
    with capture_logs() as logs:
        parent.failed(EVERY_REGISTRY, "unreachable (refused)")
        parent.failed(EVERY_REGISTRY, "unreachable (refused)")  # a request already in flight
        clock.now += 6
        parent.failed(EVERY_REGISTRY, "timed out")
    failures = [e for e in logs if e["event"].startswith("parent failed")]
    assert [(e["parent"], e["reason"]) for e in failures] == [
        ("http://parent:7439", "unreachable (refused)"),
        ("http://parent:7439", "timed out"),
    ]


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://parent:7439", "https://stowage.cache.svc", "http://10.0.0.1:7439/"]
)
def test_parent_url_accepted(url: str) -> None:
    assert http_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "parent:7439",
        "ftp://parent",
        "http://",
        "http://user:pw@parent",
        "http://parent/v2",
        "http://parent?x=1",
        "http://parent:99999",
    ],
)
def test_parent_url_refused(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        http_url(url)


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STOWAGE_"):
            monkeypatch.delenv(key)


@pytest.mark.usefixtures("_clean_env")
def test_parent_setting_from_flag_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().parent is None
    cfg = tmp_path / "stowage.yaml"
    cfg.write_text("parent: http://file:7439/\n")
    assert load_settings(cfg).parent == "http://file:7439"
    monkeypatch.setenv("STOWAGE_PARENT", "https://env:7439")
    assert load_settings(cfg).parent == "https://env:7439"
    assert load_settings(cfg, parent="http://flag:1").parent == "http://flag:1"
    with pytest.raises(ConfigError, match="parent"):
        load_settings(parent="parent:7439")
