"""``stowage bench IMAGE``: timed pulls directly and through a real stowage, against a real
Distribution registry."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.conftest import SampleImages, StowageFactory
from tests.support.images import PushedImage, push_image
from tests.support.registry import Registry
from tests.support.stowage import run_cli
from tests.support.util import free_port

pytestmark = pytest.mark.integration

LAYERS = (64 * 1024, 512 * 1024, 3 * 1024 * 1024)


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli("bench", *args, timeout=timeout)


def bench_json(*args: str) -> dict[str, Any]:
    proc = bench(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.fixture(scope="module")
def image(registry: Registry) -> PushedImage:
    return push_image(registry, "bench/cli", "1", layer_sizes=LAYERS)


def assert_layers_match(data: dict[str, Any], blobs: list[tuple[str, int]]) -> None:
    assert [(row["digest"], row["size"]) for row in data["layers"]] == blobs
    assert data["bytes"] == sum(size for _, size in blobs)


def test_cold_then_warm_json(
    registry: Registry, image: PushedImage, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(upstreams=[registry])
    since = registry.checkpoint()

    data = bench_json(image.ref, "--url", stowage.url, "--insecure", "--platform", "linux/amd64")

    assert data["state"] == "cold"
    assert data["cold_measured"] is True
    assert data["first_pass_blob_misses"] == len(image.blobs)
    assert data["manifest_digest"] == image.manifest_digest
    assert data["registry"] == registry.url
    assert data["stowage"] == stowage.url
    assert_layers_match(data, image.blobs)
    for row in data["layers"]:
        for key in ("direct_seconds", "cold_seconds", "warm_seconds"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
    for phase in ("direct", "cold", "warm"):
        assert data[phase]["seconds"] > 0
        assert data[phase]["seconds"] >= data[phase]["manifest_seconds"]
    assert data["speedup"]["cold"] > 0 and data["speedup"]["warm"] > 0

    # Exactly one direct GET and one fill per blob upstream: the warm pass came from cache.
    for digest, _ in image.blobs:
        assert registry.blob_gets(digest, since=since) == 2, digest
    assert stowage.metric("stowage_requests", route="blobs", result="hit") == len(image.blobs)
    assert stowage.metric("stowage_bytes_served", source="cache") >= data["bytes"]


def test_already_cached_image_is_reported_warm_only(
    registry: Registry, stowage_factory: StowageFactory
) -> None:
    pushed = push_image(registry, "bench/warm-only", "1", layer_sizes=(32 * 1024, 96 * 1024))
    stowage = stowage_factory(upstreams=[registry])
    first = bench_json(pushed.ref, "--url", stowage.url, "--insecure")
    assert first["state"] == "cold"

    again = bench_json(pushed.ref, "--url", stowage.url, "--insecure")

    assert again["state"] == "warm only"
    assert again["cold_measured"] is False
    assert again["cold"] is None
    assert again["first_pass_blob_misses"] == 0
    assert again["speedup"]["cold"] is None
    assert_layers_match(again, pushed.blobs)
    assert all(row["cold_seconds"] is None for row in again["layers"])
    assert all(row["warm_seconds"] > 0 for row in again["layers"])
    assert any("cold was not measured" in note for note in again["notes"])


def test_partly_cached_image(registry: Registry, stowage_factory: StowageFactory) -> None:
    # Two images sharing their first layer (same seed and size): after the first, the second
    # is only partly cold.
    shared = "bench-shared-seed"
    one = push_image(registry, "bench/part-a", "1", layer_sizes=(40 * 1024,), seed=shared)
    two = push_image(registry, "bench/part-b", "1", layer_sizes=(40 * 1024, 80 * 1024), seed=shared)
    assert one.layers[0] == two.layers[0]
    stowage = stowage_factory(upstreams=[registry])
    assert bench_json(one.ref, "--url", stowage.url, "--insecure")["state"] == "cold"

    data = bench_json(two.ref, "--url", stowage.url, "--insecure")

    assert data["state"] == "partly cached"
    assert data["cold_measured"] is False
    # config + second layer were misses; the shared layer was a hit.
    assert data["first_pass_blob_misses"] == len(two.blobs) - 1
    assert data["cold"] is not None
    assert_layers_match(data, two.blobs)


def test_index_platform_selects_child(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(upstreams=[registry])
    child = images.multi.child("linux/arm64")

    data = bench_json(
        images.multi.ref, "--url", stowage.url, "--insecure", "--platform", "linux/arm64"
    )

    assert data["platform"] == "linux/arm64"
    assert data["manifest_digest"] == child.manifest_digest
    assert_layers_match(data, child.blobs)
    assert data["state"] == "cold"


def test_table_output(
    registry: Registry, image: PushedImage, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(upstreams=[registry])

    proc = bench(image.ref, "--url", stowage.url, "--insecure")

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for heading in ("BLOB", "SIZE", "DIRECT", "COLD", "WARM"):
        assert heading in out
    for digest, _ in image.blobs:
        assert digest.removeprefix("sha256:")[:12] in out
    assert "3.0 MiB" in out  # the largest layer's size
    assert f"{image.ref} (linux/amd64)" in out.replace("\n", "")
    assert "cold through stowage" in out


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_stowage_unreachable(registry: Registry, image: PushedImage) -> None:
    port = free_port()
    since = registry.checkpoint()

    proc = bench(image.ref, "--url", f"http://127.0.0.1:{port}", "--insecure")

    assert_clean_failure(proc, f"cannot reach stowage at http://127.0.0.1:{port}")
    # Checked before anything is pulled.
    assert registry.count("GET", "/v2/bench/cli", since=since) == 0


def test_registry_unreachable(stowage_factory: StowageFactory) -> None:
    port = free_port()
    stowage = stowage_factory(insecure_registries=[f"127.0.0.1:{port}"])

    proc = bench(f"127.0.0.1:{port}/library/gone:1", "--url", stowage.url, "--insecure")

    assert_clean_failure(proc, f"cannot reach registry 127.0.0.1:{port} at http://127.0.0.1:{port}")


def test_plain_http_registry_without_insecure(
    registry: Registry, image: PushedImage, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(upstreams=[registry])

    proc = bench(image.ref, "--url", stowage.url)

    assert_clean_failure(proc, f"cannot reach registry {registry.host} at https://{registry.host}")


def test_unknown_image(registry: Registry, stowage_factory: StowageFactory) -> None:
    stowage = stowage_factory(upstreams=[registry])

    proc = bench(f"{registry.host}/bench/missing:1", "--url", stowage.url, "--insecure")

    assert_clean_failure(proc, f"direct pull from {registry.url} failed", "404")


def test_stowage_cannot_reach_upstream(
    registry: Registry, image: PushedImage, stowage_factory: StowageFactory
) -> None:
    # stowage runs but is not allowed plain HTTP to the registry: the direct pull works, the
    # pull through stowage fails, and the message names stowage.
    stowage = stowage_factory()

    proc = bench(image.ref, "--url", stowage.url, "--insecure")

    assert_clean_failure(proc, f"pull through stowage at {stowage.url} failed", "502")


def test_usage_errors(image: PushedImage) -> None:
    proc = bench(image.ref, "--platform", "amd64")
    assert proc.returncode == 2
    assert "os/arch" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = bench("Not A Reference!", "--insecure")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
