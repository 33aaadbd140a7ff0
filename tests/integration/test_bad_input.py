"""Bad input never yields a 500: every malformed, hostile or unanswerable request gets the
OCI error JSON with the spec's status, and nothing is written outside the data directory.

One stowage (module scope) serves all cases; it knows the session registry, an in-test
upstream serving oversized manifests, and a closed local port as insecure registries.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import SampleImages
from tests.support.appthread import ThreadedApp
from tests.support.registry import Registry
from tests.support.stowage import Stowage
from tests.support.util import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BIG_MANIFEST_SIZE = 5 * 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ZERO_DIGEST = "sha256:" + "0" * 64


# --- local helpers ------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # exactly the bytes after the header block (de-chunked)

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def raw_request(
    host: str, method: str, path: str, timeout: float = 20.0, extra: bytes = b""
) -> RawResponse:
    """One HTTP/1.1 exchange over a bare socket: the path is sent byte for byte (no client
    normalisation of ``..`` or ``%2F``) and everything the server sends is read, so a body
    on a HEAD response would be seen. ``extra``: raw header lines, CRLF-terminated."""
    name, _, port = host.rpartition(":")
    request = (
        (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            "Accept: application/json\r\nContent-Length: 0\r\n"
        ).encode("latin-1")
        + extra
        + b"\r\n"
    )
    chunks: list[bytes] = []
    with socket.create_connection((name, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete header block in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def _big_manifest() -> bytes:
    """A syntactically fine OCI manifest, padded to 5 MiB with an annotation."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": ZERO_DIGEST,
            "size": 2,
        },
        "layers": [],
        "annotations": {"pad": ""},
    }
    base = len(json.dumps(doc).encode())
    doc["annotations"]["pad"] = "x" * (BIG_MANIFEST_SIZE - base)
    body = json.dumps(doc).encode()
    assert len(body) == BIG_MANIFEST_SIZE
    return body


def _big_upstream() -> ThreadedApp:
    body = _big_manifest()

    async def with_length(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, headers={"Content-Type": OCI_MANIFEST})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": OCI_MANIFEST})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method != "HEAD":
            for i in range(0, len(body), 256 * 1024):
                await resp.write(body[i : i + 256 * 1024])
        await resp.write_eof()
        return resp

    return ThreadedApp(
        [
            ("GET", "/v2/big/length/manifests/{ref}", with_length),
            ("HEAD", "/v2/big/length/manifests/{ref}", with_length),
            ("GET", "/v2/big/chunked/manifests/{ref}", chunked),
            ("HEAD", "/v2/big/chunked/manifests/{ref}", chunked),
        ]
    ).start()


@dataclass
class Env:
    stowage: Stowage
    registry: Registry
    images: SampleImages
    big: ThreadedApp
    closed_port: int
    root: Path  # the module's temp dir: parent of the data dir and the log

    @property
    def prefix(self) -> str:
        return self.registry.path_prefix

    def request(self, method: str, path: str) -> RawResponse:
        return raw_request(self.stowage.host, method, path)


def _tree(root: Path, *, exclude: Path | None = None) -> set[str]:
    """Every path under ``root`` (relative), skipping ``exclude`` and what is below it."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here == exclude:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            out.add(str((here / name).relative_to(root)))
    return out


@pytest.fixture(scope="module")
def env(
    registry: Registry, images: SampleImages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("bad-input")
    big = _big_upstream()
    closed_port = free_port()
    stowage = Stowage(
        root / "stowage" / "data",
        insecure_registries=[registry.host, big.host, f"127.0.0.1:{closed_port}"],
        log_file=root / "stowage.log",
        extra_args=["--connect-timeout", "3"],
    )
    stowage.start()
    try:
        yield Env(stowage, registry, images, big, closed_port, root)
    finally:
        stowage.stop()
        big.stop()
        print(f"--- stowage {stowage.host} log tail ---\n{stowage.log_tail()}")


def _check_error(
    env: Env,
    method: str,
    path: str,
    statuses: int | tuple[int, ...],
    codes: tuple[str, ...] = (),
) -> RawResponse:
    """Request ``path`` and assert an OCI error answer: one of ``statuses`` (never 500), a
    JSON ``errors`` list on GET (with a code among ``codes`` if given), no body on HEAD,
    and no traceback in stowage's log."""
    resp = env.request(method, path)
    allowed = (statuses,) if isinstance(statuses, int) else statuses
    where = f"{method} {path} -> {resp.status} {resp.body[:300]!r}"
    assert resp.status != 500, where
    assert resp.status in allowed, where
    if method == "HEAD":
        assert resp.body == b"", f"HEAD error response carries a body: {where}"
    else:
        assert resp.headers.get("content-type", "").startswith("application/json"), where
        doc = resp.json()
        errors = doc.get("errors")
        assert isinstance(errors, list) and errors, where
        for err in errors:
            assert isinstance(err.get("code"), str) and err["code"], where
            assert isinstance(err.get("message"), str), where
        if codes:
            assert errors[0]["code"] in codes, where
    log = env.stowage.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "unhandled error" not in log, log[-3000:]
    return resp


def _message(resp: RawResponse) -> str:
    return " ".join(e["message"] for e in resp.json()["errors"])


# --- malformed names, tags, digests ------------------------------------------------------

LONG_NAME = "/".join(["abcdefghij"] * 28)  # 307 characters of valid components
assert len(LONG_NAME) > 300

BAD_NAMES = {
    "uppercase": "Library/App",
    "empty-component": "library//app",
    "trailing-slash": "library/app/",
    "too-long": LONG_NAME,
    "leading-dash": "-library/app",
    "bad-separator": "library/app..x",
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_malformed_name_is_400_name_invalid(env: Env, name: str, method: str) -> None:
    since = env.registry.checkpoint()
    for endpoint in ("manifests/1", f"blobs/{ZERO_DIGEST}", "tags/list"):
        _check_error(env, method, f"/v2/{env.prefix}/{name}/{endpoint}", 400, ("NAME_INVALID",))
    # Mirror mode with the same name.
    _check_error(
        env, method, f"/v2/{name}/manifests/1?ns={env.registry.host}", 400, ("NAME_INVALID",)
    )
    # Rejected before anything is asked upstream.
    assert env.registry.count("*", "", since=since) == 0


def test_invalid_ns_registry_is_400(env: Env) -> None:
    for ns in ("-bad-", "bad_host", "host:99999"):
        _check_error(env, "GET", f"/v2/library/app/manifests/1?ns={ns}", 400, ("NAME_INVALID",))


BAD_TAGS = {
    "leading-dash": "-bad",
    "too-long": "a" * 200,
    "leading-dot": ".hidden",
    "bad-char": "v1+build",
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("tag", list(BAD_TAGS.values()), ids=list(BAD_TAGS))
def test_malformed_tag_is_400_tag_invalid(env: Env, tag: str, method: str) -> None:
    since = env.registry.checkpoint()
    _check_error(
        env, method, f"/v2/{env.prefix}/library/app/manifests/{tag}", 400, ("TAG_INVALID",)
    )
    assert env.registry.count("*", "", since=since) == 0


BAD_DIGESTS = {
    "short": "sha256:abc",
    "non-hex": "sha256:" + "g" * 64,
    "unknown-algorithm": "md5:d41d8cd98f00b204e9800998ecf8427e",
    "uppercase-hex": "sha256:" + "A" * 64,
    "too-long": "sha256:" + "0" * 65,
    "sha512-short": "sha512:" + "0" * 64,
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("digest", list(BAD_DIGESTS.values()), ids=list(BAD_DIGESTS))
def test_malformed_digest_is_400_digest_invalid(env: Env, digest: str, method: str) -> None:
    since = env.registry.checkpoint()
    for endpoint in ("blobs", "manifests"):
        _check_error(
            env,
            method,
            f"/v2/{env.prefix}/library/app/{endpoint}/{digest}",
            400,
            ("DIGEST_INVALID",),
        )
    assert env.registry.count("*", "", since=since) == 0


def test_blob_reference_must_be_a_digest(env: Env) -> None:
    for ref in ("latest", "sha256:", "sha256"):
        _check_error(
            env, "GET", f"/v2/{env.prefix}/library/app/blobs/{ref}", 400, ("DIGEST_INVALID",)
        )


# --- path traversal ------------------------------------------------------------------------


def test_path_traversal_is_refused_and_touches_nothing(env: Env) -> None:
    data = env.stowage.data_dir
    blobs = data / "blobs"
    layer, _ = env.images.app.layers[0]
    p = env.prefix
    paths = [
        "/v2/../../etc/passwd",
        "/v2/../../../../../../etc/passwd",
        f"/v2/{p}/..%2f..%2fetc/manifests/1",
        f"/v2/{p}/..%2F..%2F..%2Fetc%2Fpasswd/manifests/1",
        f"/v2/{p}/library%2Fapp/manifests/1",
        f"/v2/{p}/library%2fapp/blobs/{layer}",  # a real blob: decoding %2f would serve it
        f"/v2/{p}%2Flibrary/app/manifests/1",
        "/v2/x/blobs/sha256:../../..",
        f"/v2/{p}/library/app/blobs/sha256:../../../../etc/passwd",
        f"/v2/{p}/library/app/blobs/sha256:..%2f..%2f..%2f..%2fetc%2fpasswd",
        f"/v2/{p}/library/app/blobs/sha256%3A..%2F..%2Findex.db",
        f"/v2/{p}/library/app/manifests/..%2f..%2f..%2findex.db",
        f"/v2/{p}/library/../../../../etc/manifests/1",
        f"/v2/{p}/%2e%2e/%2e%2e/etc/manifests/1",
        f"/v2/{p}/library/app/manifests/%2e%2e",
        f"/v2/{p}/library/app/manifests/..",
        "/v2/..%5c..%5cetc/manifests/1",
        f"/v2/{p}/library\\..\\..\\etc/manifests/1",
        f"/v2/{p}/library/app/blobs/sha256:{'0' * 62}%2f..",
    ]
    root_parent = sorted(os.listdir(env.root.parent))
    outside = _tree(env.root, exclude=data)
    inside_blobs = _tree(blobs)
    since = env.registry.checkpoint()

    for path in paths:
        for method in ("GET", "HEAD"):
            resp = _check_error(env, method, path, (400, 404))
            assert b"root:" not in resp.body

    assert sorted(os.listdir(env.root.parent)) == root_parent
    assert _tree(env.root, exclude=data) == outside
    assert _tree(blobs) == inside_blobs
    assert list((data / "tmp").iterdir()) == []
    # None of it was turned into an upstream request either.
    assert env.registry.count("*", "", since=since) == 0


# --- unknown endpoints and wrong methods -------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_unknown_endpoints_are_404_json(env: Env, method: str) -> None:
    p = env.prefix
    for path in (
        "/v2/x/foo/bar",
        "/nope",
        "/v2x",
        f"/v2/{p}/library/app/foo/bar",
        f"/v2/{p}/library/app/manifests/",
        f"/v2/{p}/library/app/blobs/",
        f"/v2/{p}/library/app/_catalog",
        "/v2/_catalog",
    ):
        _check_error(env, method, path, 404)


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_write_methods_are_405_with_allow(env: Env, method: str) -> None:
    layer, _ = env.images.app.layers[0]
    p = env.prefix
    since = env.registry.checkpoint()
    for path in (
        f"/v2/{p}/library/app/manifests/1",
        f"/v2/{p}/library/app/manifests/{env.images.app.manifest_digest}",
        f"/v2/{p}/library/app/blobs/{layer}",
        f"/v2/{p}/library/app/blobs/uploads/",
        f"/v2/{p}/library/app/tags/list",
        f"/v2/library/app/manifests/1?ns={env.registry.host}",
        "/v2/",
    ):
        resp = _check_error(env, method, path, 405)
        allow = {m.strip().upper() for m in resp.headers.get("allow", "").split(",")}
        assert {"GET", "HEAD"} <= allow, (method, path, resp.headers)
        assert allow <= {"GET", "HEAD", "OPTIONS"}, (method, path, resp.headers)
    assert env.registry.count("*", "", since=since) == 0


def test_post_on_v2_base_is_405(env: Env) -> None:
    for path in ("/v2/", "/v2"):
        resp = _check_error(env, "POST", path, 405)
        assert "GET" in resp.headers.get("allow", "")


def test_wrong_method_on_operational_endpoints_is_405_with_allow(env: Env) -> None:
    # RFC 9110 15.5.6: a 405 response MUST carry Allow, whatever the endpoint.
    for path in ("/metrics", "/healthz", "/readyz"):
        resp = _check_error(env, "POST", path, 405)
        assert "GET" in resp.headers.get("allow", ""), (path, resp.headers)


# --- unknown or unreachable upstreams, unknown content ------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_unknown_registry_is_502_naming_it(env: Env, method: str) -> None:
    for endpoint in ("manifests/1", f"blobs/{ZERO_DIGEST}", "tags/list"):
        resp = _check_error(env, method, f"/v2/no-such-host.invalid/x/{endpoint}", 502)
        if method == "GET":
            assert "no-such-host.invalid" in _message(resp)
    assert env.stowage.running()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_unreachable_registry_is_502_naming_it(env: Env, method: str) -> None:
    host = f"127.0.0.1:{env.closed_port}"
    prefix = f"127.0.0.1-{env.closed_port}"
    for path in (
        f"/v2/{prefix}/library/app/manifests/1",
        f"/v2/{prefix}/library/app/blobs/{ZERO_DIGEST}",
        f"/v2/{prefix}/library/app/tags/list",
        f"/v2/library/app/manifests/1?ns={host}",
    ):
        resp = _check_error(env, method, path, 502)
        if method == "GET":
            assert host in _message(resp), path
    assert not any(env.stowage.data_dir.joinpath("tmp").iterdir())


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_unknown_content_on_real_upstream_is_404(env: Env, method: str) -> None:
    p = env.prefix
    blobs_before = _tree(env.stowage.data_dir / "blobs")
    cases = [
        (f"/v2/{p}/library/no-such-repo/manifests/1", "MANIFEST_UNKNOWN"),
        (f"/v2/{p}/library/app/manifests/no-such-tag", "MANIFEST_UNKNOWN"),
        (f"/v2/{p}/library/app/manifests/{ZERO_DIGEST}", "MANIFEST_UNKNOWN"),
        (f"/v2/{p}/library/app/blobs/{ZERO_DIGEST}", "BLOB_UNKNOWN"),
        (f"/v2/{p}/library/no-such-repo/blobs/{ZERO_DIGEST}", "BLOB_UNKNOWN"),
    ]
    for path, code in cases:
        _check_error(env, method, path, 404, (code,))
    _check_error(env, method, f"/v2/{p}/library/no-such-repo/tags/list", 404)
    assert _tree(env.stowage.data_dir / "blobs") == blobs_before
    assert not any(env.stowage.data_dir.joinpath("tmp").iterdir())


def test_non_utf8_header_with_ignored_range_on_cached_blob(env: Env) -> None:
    """A cached blob asked for with a Range stowage ignores (malformed) and a header whose
    value is not UTF-8 is answered whole (once a connection closed without an answer)."""
    p = env.prefix
    layer, size = env.images.app.layers[0]
    path = f"/v2/{p}/library/app/blobs/{layer}"
    assert env.request("GET", path).status == 200  # now cached
    for extra in (
        b"Range: bytes=--5\r\nX-Bytes: \xff\xfe\r\n",
        b"If-Match: \xff\r\nX-Bytes: \xc3\r\n",
    ):
        resp = raw_request(env.stowage.host, "GET", path, extra=extra)
        assert resp.status == 200, extra
        assert len(resp.body) == size
        assert "sha256:" + hashlib.sha256(resp.body).hexdigest() == layer
    assert "Traceback" not in env.stowage.log_text()


# --- oversized manifests -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["length", "chunked"])
def test_manifest_over_4mib_is_413_and_not_cached(env: Env, variant: str) -> None:
    data = env.stowage.data_dir
    prefix = env.big.host.replace(":", "-")
    path = f"/v2/{prefix}/big/{variant}/manifests/1"
    big_digest = "sha256:" + hashlib.sha256(_big_manifest()).hexdigest()
    blobs_before = _tree(data / "blobs")
    asked = env.big.count(f"/big/{variant}/manifests/")

    resp = _check_error(env, "GET", path, 413)
    assert "4 MiB" in _message(resp) or "4194304" in _message(resp)
    _check_error(env, "HEAD", path, 413)
    by_digest = f"/v2/{prefix}/big/{variant}/manifests/{big_digest}"
    _check_error(env, "GET", by_digest, 413)
    # Nothing was kept: asking again goes upstream again and fails the same way.
    _check_error(env, "GET", path, 413)
    assert env.big.count(f"/big/{variant}/manifests/") >= asked + 4

    assert _tree(data / "blobs") == blobs_before
    hexpart = big_digest.removeprefix("sha256:")
    assert not (data / "blobs" / "sha256" / hexpart[:2] / hexpart).exists()
    assert list((data / "tmp").iterdir()) == []
    assert env.stowage.running()
