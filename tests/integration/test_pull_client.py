"""The shared pull client (``stowage.pull``, behind ``cache warm``, ``bench`` and the
operator's prefetch) against an in-test registry that sends blobs a few KiB at a time:
every byte is hashed once, in order, whatever the read sizes, and a blob whose bytes do
not match its digest is an error."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from stowage.oci.manifest import Platform
from stowage.pull import PullError, pull
from tests.support.appthread import ThreadedApp

pytestmark = pytest.mark.integration

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WRITE = 7 * 1024  # small, uneven writes: reads on the client side return partial chunks


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class TrickleRegistry:
    """One image, ``repo:1``: a config and two layers (3 MiB and 1 MiB + 1 byte), sent
    in WRITE-sized pieces; ``corrupt`` flips a byte of the first layer on the wire."""

    def __init__(self) -> None:
        rng = random.Random(7)
        self.config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        self.layers = [rng.randbytes(3 * 1024 * 1024), rng.randbytes(1024 * 1024 + 1)]
        self.blobs = {digest_of(b): b for b in (self.config, *self.layers)}
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": digest_of(self.config),
                    "size": len(self.config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digest_of(layer),
                        "size": len(layer),
                    }
                    for layer in self.layers
                ],
            }
        ).encode()
        self.corrupt = False
        self.app = ThreadedApp(
            [
                ("GET", "/v2/repo/manifests/{ref}", self._manifest),
                ("GET", "/v2/repo/blobs/{digest}", self._blob),
            ],
            name="trickle-registry",
        )

    async def _manifest(self, request: web.Request) -> web.Response:
        return web.Response(body=self.manifest, headers={"Content-Type": OCI_MANIFEST})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs[request.match_info["digest"]]
        if self.corrupt and data is self.layers[0]:
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        for start in range(0, len(data), WRITE):
            await resp.write(data[start : start + WRITE])
            if start % (64 * WRITE) == 0:
                await asyncio.sleep(0)  # let the client read partial chunks
        return resp


@pytest.fixture
def trickle() -> Iterator[TrickleRegistry]:
    registry = TrickleRegistry()
    with registry.app:
        yield registry


async def _pull(registry: TrickleRegistry) -> tuple[list[tuple[str, int]], int]:
    received: list[int] = []
    async with aiohttp.ClientSession() as session:
        result = await pull(
            session,
            f"http://{registry.app.host}",
            "repo",
            "1",
            Platform("linux", "amd64"),
            on_bytes=received.append,
        )
    assert result.manifest_digest == digest_of(registry.manifest)
    return [(b.digest, b.size) for b in result.blobs], sum(received)


async def test_blobs_sent_in_small_pieces_are_verified_whole(trickle: TrickleRegistry) -> None:
    blobs, received = await _pull(trickle)
    assert sorted(blobs) == sorted((d, len(b)) for d, b in trickle.blobs.items())
    assert received == sum(len(b) for b in trickle.blobs.values())


async def test_a_blob_with_wrong_bytes_is_an_error(trickle: TrickleRegistry) -> None:
    trickle.corrupt = True
    with pytest.raises(PullError, match=f"blob {digest_of(trickle.layers[0])} arrived with"):
        await _pull(trickle)
