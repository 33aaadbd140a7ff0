"""A request fuzzer against a running stowage: random paths (valid-looking, traversal,
percent-encoded, unicode, very long), methods, headers (``Range``, ``Accept``,
conditionals, credentials, huge values) and ``ns`` values, sent byte for byte over raw
sockets, some of them concurrently.

Bounded: ``STOWAGE_FUZZ_REQUESTS`` requests (default 1500) or ``STOWAGE_FUZZ_SECONDS``
(default 45), whichever comes first. Seeded: the seed is printed and in every failure
message; ``STOWAGE_FUZZ_SEED=<seed>`` replays a run (request ``i`` depends only on the seed
and ``i``, whatever the thread scheduling).

stowage's upstream is the session registry (also its default registry), so valid-looking
requests reach real images. Every request stays on loopback: one whose route would name any
other registry gets ``ns=<session registry>`` first in its query.

Asserted: never a 500 (nor any 5xx but 502/504 for an unreachable or silent upstream); a 200 for
content addressed by digest hashes to that digest, a 206 is as long as its Content-Range;
every 4xx/5xx stowage answers is OCI error JSON (the HTTP parser's own 400/431 for
requests that are not HTTP are told apart and allowed); no traceback or unhandled error in
stowage's log; stowage still ready at the end; no file created or changed outside its data
directory (its working directory, ``$HOME`` and the test's temporary tree are
snapshotted), and inside it nothing but ``blobs/`` (each file named by the digest of its
content), an empty ``tmp/`` and the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from stowage.proxy.errors import OCIError
from stowage.proxy.routing import parse_route
from tests.conftest import SampleImages
from tests.support.images import push_image
from tests.support.registry import Registry
from tests.support.stowage import Stowage
from tests.support.util import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REQUESTS = int(os.environ.get("STOWAGE_FUZZ_REQUESTS", "1500"))
TIME_CAP = float(os.environ.get("STOWAGE_FUZZ_SECONDS", "45"))
WORKERS = 6
SOCKET_TIMEOUT = 30.0
# aiohttp's parser limits (request line, one header field); beyond them it answers 400/431.
MAX_LINE = 8190
DATA_TOP_LEVEL = {"blobs", "tmp", "index.db", "index.db-wal", "index.db-shm", "index.db-journal"}


# --- the requests ---------------------------------------------------------------------------


@dataclass
class FuzzRequest:
    index: int
    method: str
    target: bytes  # request-target, exactly as sent
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    # Deliberately not HTTP/1.1 a server may parse (oversized line or field, control bytes):
    # answered by aiohttp's parser, whose plain-text 400/431 is allowed.
    malformed: bool = False
    # The digest a 200 must hash to: the target routes to a blob or manifest by digest.
    digest: str | None = None

    def raw(self) -> bytes:
        head = self.method.encode("latin-1") + b" " + self.target + b" HTTP/1.1\r\n"
        for name, value in self.headers:
            head += name + b": " + value + b"\r\n"
        if self.body:
            head += b"Content-Length: " + str(len(self.body)).encode() + b"\r\n"
        return head + b"Connection: close\r\n\r\n" + self.body

    def describe(self) -> str:
        target = self.target[:300] + (b"..." if len(self.target) > 300 else b"")
        headers = [(n[:40], v[:120] + (b"..." if len(v) > 120 else b"")) for n, v in self.headers]
        return f"#{self.index} {self.method} {target!r} headers={headers} body={len(self.body)}B"


@dataclass
class FuzzResponse:
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def send(host: str, request: FuzzRequest) -> FuzzResponse:
    name, _, port = host.rpartition(":")
    chunks: list[bytes] = []
    try:
        with socket.create_connection((name, int(port)), timeout=SOCKET_TIMEOUT) as sock:
            # Refused mid-request (huge headers)? The answer is still readable.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request.raw())
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
    except TimeoutError:
        return FuzzResponse(None, error=f"no complete answer within {SOCKET_TIMEOUT}s")
    except OSError as exc:
        return FuzzResponse(None, error=f"connection failed: {exc!r}")
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return FuzzResponse(None, error=f"no header block in {data[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return FuzzResponse(None, error=f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return FuzzResponse(status, headers, body)


@dataclass
class Context:
    stowage: Stowage
    registry: Registry
    images: SampleImages
    closed_host: str  # a loopback port nobody listens on: an unreachable upstream

    @property
    def upstream(self) -> str:
        return self.registry.host

    @property
    def known(self) -> frozenset[str]:
        return frozenset({self.upstream, self.closed_host})

    def real_repos(self) -> list[str]:
        images = (self.images.app, self.images.multi, self.images.dockerv2)
        return [image.repository for image in images]

    def manifest_digests(self) -> list[str]:
        out = [self.images.app.manifest_digest, self.images.dockerv2.manifest_digest]
        out += [self.images.multi.manifest_digest]
        out += [c.manifest_digest for c in self.images.multi.children]
        return out

    def blob_digests(self) -> list[str]:
        images = (self.images.app, self.images.multi, self.images.dockerv2)
        return [d for image in images for d, _ in image.all_blobs]


WEIRD = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2e",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%00",
    "%",
    "%zz",
    "%252f",
    "//",
    ";",
    ";x=1",
    "?",
    "#",
    "&",
    "~",
    "é",
    "%C3%A9",
    "\u202e",
    "😀",
    "\x7f",
    "%0d%0a",
    "A",
    "-",
    "_",
    ":",
    "@",
    "sha256:",
    "manifests",
    "blobs",
    "tags/list",
    "/manifests/",
    "/blobs/",
    "x" * 64,
]
BAD_DIGESTS = [
    "sha256:" + "0" * 64,
    "sha256:" + "f" * 63,
    "sha256:" + "F" * 64,
    "sha512:" + "0" * 128,
    "sha512:" + "1" * 64,
    "md5:" + "0" * 32,
    "sha256",
    "sha256:",
    ":" + "0" * 64,
    "sha256:../../index.db",
    "sha256:" + "0" * 62 + "%2f..",
]
RANGES = [
    "bytes=0-0",
    "bytes=0-9",
    "bytes=10-",
    "bytes=-1",
    "bytes=-0",
    "bytes=-100000000",
    "bytes=0-1,4-5",
    "bytes=5-2",
    "bytes=a-b",
    "bytes=",
    "bytes=-",
    "bytes=--5",
    "bytes=1-2-3",
    "items=0-5",
    "BYTES=0-3",
    "bytes = 0-3",
    "bytes=99999999999999999999999999-",
    "bytes=0-99999999999999999999999999",
    "bytes=184467440737095516160-184467440737095516161",
    "bytes=0-0," * 200,
    "bytes=\u00e9-1",
]
ACCEPTS = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json",
    "*/*",
    "text/html",
    "",
    ";;;,,,",
    "application/json;q=abc",
    "a/b;" * 500,
    "\u00e9/\u00e9",
]
CONDITIONALS = [
    ("If-None-Match", '"sha256:' + "0" * 64 + '"'),
    ("If-None-Match", "*"),
    ("If-Match", '"nope"'),
    ("If-Match", "*"),
    ("If-Modified-Since", "Thu, 01 Jan 2099 00:00:00 GMT"),
    ("If-Modified-Since", "garbage"),
    ("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ("If-Unmodified-Since", "not a date"),
    ("If-Range", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ("If-Range", '"etag"'),
]
AUTHS = [
    "Bearer abc",
    "Bearer " + "x" * 3000,
    "Basic !!!notbase64",
    "Basic " + "YTpi" * 10,
    "Basic",
    "Digest username=x",
    "",
]


def _mutate(rng: random.Random, text: str) -> str:
    """One random edit of ``text``."""
    if not text:
        return rng.choice(WEIRD)
    at = rng.randrange(len(text) + 1)
    op = rng.randrange(7)
    if op == 0:  # insert something interesting
        return text[:at] + rng.choice(WEIRD) + text[at:]
    if op == 1:  # delete a span
        return text[:at] + text[at + rng.randint(1, 8) :]
    if op == 2:  # percent-encode one character
        if at < len(text):
            return text[:at] + "".join(f"%{b:02X}" for b in text[at].encode()) + text[at + 1 :]
        return text + "%"
    if op == 3:  # duplicate a segment
        parts = text.split("/")
        i = rng.randrange(len(parts))
        return "/".join(parts[: i + 1] + parts[i:])
    if op == 4:  # case flip
        return text[:at] + text[at:].swapcase()
    if op == 5:  # replace a segment with a dot segment
        parts = text.split("/")
        parts[rng.randrange(len(parts))] = rng.choice(["..", ".", "", "%2e%2e"])
        return "/".join(parts)
    return text[:at]  # truncate


def _random_text(rng: random.Random, size: int) -> str:
    alphabet = "abcXYZ019-_.:/@%?&=#;~ \t\\\"'<>{}|^`" + "éß中😀\u202e\x00\x1b"
    return "".join(rng.choice(alphabet) for _ in range(size))


def _repo(rng: random.Random, ctx: Context) -> str:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(ctx.real_repos())
    if roll < 0.75:
        return rng.choice(["library/nope", "a/b/c/d", "org/manifests/app", "x", "a" * 300])
    return rng.choice(["Library/App", "library//app", "-x", "library/app/", "l" * 64])


def _reference(rng: random.Random, ctx: Context, kind: str) -> str:
    roll = rng.random()
    if kind == "blobs":
        if roll < 0.6:
            return rng.choice(ctx.blob_digests())
        return rng.choice([*BAD_DIGESTS, "latest", "1"])
    if roll < 0.35:
        return "1"
    if roll < 0.7:
        return rng.choice(ctx.manifest_digests())
    if roll < 0.8:
        return rng.choice(["latest", "no-such-tag", "v" * 128, "v" * 129, ".hidden", "-x"])
    if roll < 0.9:
        return rng.choice(BAD_DIGESTS)
    return _random_text(rng, rng.randint(1, 20))


def _path(rng: random.Random, ctx: Context) -> tuple[str, str | None]:
    """A path (without query) and an ``ns`` value (None: no ns)."""
    roll = rng.random()
    if roll < 0.05:
        return rng.choice(
            ["/", "/v2", "/v2/", "/metrics", "/healthz", "/readyz", "/v1/", "/V2/"]
        ), None
    if roll < 0.08:
        return "/" + _random_text(rng, rng.randint(0, 60)), None
    if roll < 0.1:
        return "/v2/" + "a/" * rng.randint(100, 3000) + "manifests/1", None
    kind = rng.choices(["manifests", "blobs", "tags"], weights=[5, 5, 1])[0]
    repo = _repo(rng, ctx)
    endpoint = "tags/list" if kind == "tags" else f"{kind}/{_reference(rng, ctx, kind)}"
    form = rng.random()
    ns: str | None = None
    if form < 0.45:
        prefix = ctx.registry.path_prefix
    elif form < 0.5:
        prefix = ctx.closed_host.replace(":", "-")
    elif form < 0.65:
        prefix = ""  # the default registry: the session registry
    else:
        prefix = ""
        ns = rng.choice(
            [ctx.upstream] * 6
            + [ctx.closed_host, "", "-bad-", "host:99999", "a b", "x" * 5000, "[::1]:1", "é.com"]
            + [_random_text(rng, rng.randint(1, 30))]
        )
    path = "/v2/" + (f"{prefix}/" if prefix else "") + f"{repo}/{endpoint}"
    for _ in range(rng.choice([0, 0, 0, 0, 0, 1, 1, 2, 3])):
        path = _mutate(rng, path)
    return path, ns


def _query(rng: random.Random, ns: str | None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if ns is not None:
        params.append(("ns", ns))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        key = rng.choice(["n", "last", "ns", "digest", "x", "", "%zz", "n" * 50])
        value = rng.choice(["1", "0", "-1", "abc", "", "99999999999999999999", "v1", "%"])
        params.append((key, value))
    return params


def _encode_query(params: list[tuple[str, str]], rng: random.Random) -> str:
    # Values are sent mostly raw: the point is what stowage makes of them.
    parts = []
    for key, value in params:
        if rng.random() < 0.5:
            value = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in value if ord(c) < 256)
        parts.append(f"{key}={value}")
    return "&".join(parts)


def _headers(rng: random.Random, ctx: Context) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    host_roll = rng.random()
    if host_roll < 0.9:
        headers.append((b"Host", ctx.stowage.host.encode()))
    elif host_roll < 0.95:
        headers.append((b"Host", _random_text(rng, 10).encode()))
    if rng.random() < 0.35:
        headers.append((b"Range", rng.choice(RANGES).encode()))
    if rng.random() < 0.4:
        headers.append((b"Accept", rng.choice(ACCEPTS).encode()))
    if rng.random() < 0.15:
        name, value = rng.choice(CONDITIONALS)
        headers.append((name.encode(), value.encode()))
    if rng.random() < 0.1:
        headers.append((b"Authorization", rng.choice(AUTHS).encode()))
    if rng.random() < 0.1:
        headers.append((b"Accept-Encoding", rng.choice([b"gzip, br", b"*", b"identity;q=0"])))
    if rng.random() < 0.08:
        size = rng.choice([100, 4000, 8000, MAX_LINE - 20, MAX_LINE + 100, 20_000])
        headers.append((b"X-Fuzz", b"v" * size))
    if rng.random() < 0.03:
        headers += [(f"X-Many-{i}".encode(), b"1") for i in range(rng.choice([50, 150]))]
    if rng.random() < 0.05:
        # Raw bytes: UTF-8, latin-1 or control characters in a header value.
        value = rng.choice([b"\xc3\xa9t\xc3\xa9", b"\xff\xfe", b"a\x00b", b"a\x1bb", b"\x7f"])
        headers.append((b"X-Bytes", value))
    if rng.random() < 0.02:
        headers.append((b"Bad Header", b"x"))  # space in a field name
    return headers


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"}


def _malformed(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request is not HTTP/1.1 that aiohttp's parser accepts."""

    def bad_byte(b: int) -> bool:
        return b <= 0x20 or b >= 0x7F

    return (
        method not in HTTP_METHODS
        or not target.startswith(b"/")
        or any(bad_byte(b) for b in target)
        or len(target) + len(method) + 10 > MAX_LINE
        or not any(name.lower() == b"host" for name, _ in headers)
        or len(headers) > 100
        or any(b" " in name or len(name) + len(value) + 2 > MAX_LINE for name, value in headers)
        or any(b < 0x20 or b == 0x7F for _, value in headers for b in value)
    )


_BY_DIGEST = re.compile(r"/(?:blobs|manifests)/(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


def _digest_of(method: str, target: str) -> str | None:
    """The digest the target addresses, as aiohttp decodes it (None: not by digest)."""
    try:
        match = _BY_DIGEST.search(make_mocked_request(method, target).path)
    except Exception:
        return None
    return match.group(1) if match else None


def _stays_local(ctx: Context, method: str, target: str) -> bool:
    """Whether stowage would route this request to the session registry or the closed port
    (or reject it before choosing an upstream), judged as aiohttp parses the target."""
    try:
        request = make_mocked_request(method, target)
        path = request.path
        ns = request.query.get("ns")
    except Exception:
        return False
    if not path.startswith("/v2/"):
        return True
    try:
        route = parse_route(path[len("/v2/") :], ns, ctx.upstream, ctx.known)
    except OCIError:
        return True
    return route.registry in ctx.known


def generate(seed: int, index: int, ctx: Context) -> FuzzRequest:
    rng = random.Random(f"{seed}:{index}")
    method = rng.choices(
        ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "get"],
        weights=[45, 30, 3, 3, 3, 2, 2, 1, 1, 1],
    )[0]
    path, ns = _path(rng, ctx)
    query = _encode_query(_query(rng, ns), rng)
    target = path + (f"?{query}" if query else "")
    # Keep it on loopback: ns=<session registry> first in the query (the path may hold a '?'
    # of its own), or, failing that, a plain request for a real image.
    at = target.find("?") + 1 or len(target) + 1
    for candidate in (
        target,
        f"{target[: at - 1]}?ns={ctx.upstream}&{target[at:]}",
        f"/v2/{ctx.registry.path_prefix}/library/app/manifests/1",
    ):
        if _stays_local(ctx, method, candidate):
            target = candidate
            break
    else:
        raise AssertionError("unreachable: the last candidate stays local")
    headers = _headers(rng, ctx)
    raw_target = target.encode("utf-8", "surrogatepass")
    malformed = _malformed(method, raw_target, headers)
    body = b""
    if method in ("POST", "PUT", "PATCH") and rng.random() < 0.5:
        body = rng.randbytes(rng.choice([0, 10, 70_000]))
    digest = _digest_of(method, target)
    return FuzzRequest(index, method, raw_target, headers, body, malformed, digest)


# --- checks -----------------------------------------------------------------------------------


def check(request: FuzzRequest, response: FuzzResponse) -> str | None:
    """What is wrong with ``response`` to ``request``, if anything."""
    if response.status is None:
        return f"no answer: {response.error}"
    status = response.status
    where = f"-> {status} {response.headers.get('content-type')!r} {response.body[:300]!r}"
    if status >= 500 and status not in (502, 504):
        return f"server error {where}"
    if status < 400:
        return _check_content(request, response)
    content_type = response.headers.get("content-type", "")
    if request.malformed and status in (400, 413, 414, 431) and "json" not in content_type:
        return None  # refused by the HTTP parser, before stowage saw a request
    if not content_type.startswith("application/json"):
        return f"error without OCI JSON content type {where}"
    if request.method == "HEAD":
        return f"HEAD answered with a body {where}" if response.body else None
    try:
        doc = json.loads(response.body)
        errors = doc["errors"]
        assert isinstance(errors, list) and errors
        assert all(isinstance(e["code"], str) and isinstance(e["message"], str) for e in errors)
    except Exception as exc:
        return f"error body is not OCI error JSON ({exc!r}) {where}"
    return None


def _check_content(request: FuzzRequest, response: FuzzResponse) -> str | None:
    """A successful answer carries the right bytes: a whole blob or manifest addressed by
    digest hashes to it, and a part is as long as its Content-Range says."""
    if request.method != "GET":
        return None
    length = response.headers.get("content-length")
    if length is not None and int(length) != len(response.body):
        return f"{len(response.body)} bytes sent, Content-Length {length}"
    if response.status == 200 and request.digest is not None:
        algorithm, _, expected = request.digest.partition(":")
        if hashlib.new(algorithm, response.body).hexdigest() != expected:
            return f"200 for {request.digest} with other bytes: {response.body[:100]!r}"
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("content-range", ""))
        if match is None or int(match[2]) - int(match[1]) + 1 != len(response.body):
            return f"206 with Content-Range {response.headers.get('content-range')!r}"
    return None


def tree(root: Path, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """Path -> (size, mtime_ns) of everything under ``root`` (skipping ``exclude``)."""
    out: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here == exclude:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if exclude is not None and path == exclude:
                continue
            st = path.lstat()
            size = 0 if path.is_dir() else st.st_size
            out[str(path.relative_to(root))] = (size, 0 if path.is_dir() else st.st_mtime_ns)
    return out


def _under(base: Path, directory: Path) -> set[str]:
    prefix = str(directory.relative_to(base))
    return {p for p in tree(base) if p == prefix or p.startswith(prefix + os.sep)}


def check_data_dir(data: Path) -> None:
    top = {p.name for p in data.iterdir()}
    assert top <= DATA_TOP_LEVEL, (
        f"unexpected entries in the data directory: {top - DATA_TOP_LEVEL}"
    )
    blobs = data / "blobs"
    for path in blobs.rglob("*"):
        rel = path.relative_to(blobs).parts
        if path.is_dir():
            assert len(rel) <= 2, path
            continue
        assert len(rel) == 3, f"stray file in blobs/: {path}"
        algorithm, shard, hexpart = rel
        assert algorithm in ("sha256", "sha512") and hexpart[:2] == shard, path
        digest = hashlib.new(algorithm, path.read_bytes()).hexdigest()
        assert digest == hexpart, f"{path} holds bytes with digest {digest}"


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture
def context(
    registry: Registry, images: SampleImages, tmp_path: Path
) -> Iterator[tuple[Context, Path]]:
    closed_host = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "cwd"
    home = tmp_path / "home"
    for d in (workdir, home):
        d.mkdir()
        (d / "sentinel").write_text("untouched\n")
    stowage = Stowage(
        tmp_path / "stowage" / "data",
        insecure_registries=[registry.host, closed_host],
        default_registry=registry.host,
        log_file=tmp_path / "stowage.log",
        extra_args=["--connect-timeout", "2"],
        env={"HOME": str(home), "XDG_DATA_HOME": str(home / ".local" / "share")},
    )
    # Relative writes would land in the working directory: make it one we watch.
    stowage.process.cwd = workdir
    stowage.start()
    try:
        yield Context(stowage, registry, images, closed_host), tmp_path
    finally:
        stowage.stop()
        print(f"--- stowage log tail ({stowage.log_file}) ---\n{stowage.log_tail(40)}")


def test_request_fuzz(context: tuple[Context, Path]) -> None:
    ctx, root = context
    stowage = ctx.stowage
    data = stowage.data_dir
    seed = int(os.environ.get("STOWAGE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"request fuzz seed: {seed} (replay: STOWAGE_FUZZ_SEED={seed})")

    # Outside the data directory: nothing new anywhere in this session's temporary tree (the
    # registry's own files excepted), nothing changed in this test's directory, stowage's
    # working directory or $HOME (the log excepted).
    basetemp = root.parent
    session_before = set(tree(basetemp, exclude=data)) - _under(basetemp, ctx.registry.workdir)
    test_before = tree(root, exclude=data)
    test_before.pop(stowage.log_file.name, None)

    deadline = time.monotonic() + TIME_CAP
    problems: list[str] = []
    statuses: dict[int | None, int] = {}
    sent = verified = 0

    def run(index: int) -> tuple[FuzzRequest, FuzzResponse] | None:
        if time.monotonic() > deadline:
            return None
        request = generate(seed, index, ctx)
        return request, send(stowage.host, request)

    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        for result in pool.map(run, range(REQUESTS)):
            if result is None:
                continue
            request, response = result
            sent += 1
            statuses[response.status] = statuses.get(response.status, 0) + 1
            verified += response.status == 200 and request.digest is not None
            problem = check(request, response)
            if problem is not None:
                problems.append(f"{request.describe()}\n    {problem}")
    elapsed = time.monotonic() - start
    print(f"{sent} requests in {elapsed:.1f}s; statuses: {sorted(statuses.items(), key=str)}")
    print(f"{verified} answers by digest checked against their digest")

    header = f"seed {seed} (STOWAGE_FUZZ_SEED={seed} replays it)"
    if problems:
        (root / "problems.txt").write_text("\n".join(problems))
        header += f"; all problems in {root / 'problems.txt'}"
    assert not problems, f"{header}: {len(problems)} bad answers:\n" + "\n".join(problems[:25])
    assert sent >= min(REQUESTS, 300), f"{header}: only {sent} requests in {TIME_CAP}s"

    # Still serving, and still serving real content correctly.
    assert stowage.running(), f"{header}: stowage exited"
    assert stowage.get("/readyz").status == 200
    layer, size = ctx.images.app.layers[0]
    resp = stowage.client().get_blob(f"{ctx.registry.path_prefix}/library/app", layer)
    assert resp.status == 200 and len(resp.body) == size
    assert "sha256:" + hashlib.sha256(resp.body).hexdigest() == layer

    log = stowage.log_text()
    for needle in ("Traceback", "unhandled error", "Error handling request"):
        assert needle not in log, f"{header}: {needle!r} in stowage's log:\n{log[-4000:]}"

    session_after = set(tree(basetemp, exclude=data)) - _under(basetemp, ctx.registry.workdir)
    assert session_after == session_before, (
        f"{header}: paths created or removed outside the data directory: "
        f"{session_after ^ session_before}"
    )
    test_after = tree(root, exclude=data)
    test_after.pop(stowage.log_file.name, None)
    changed = {
        k for k in test_before.keys() | test_after.keys() if test_before.get(k) != test_after.get(k)
    }
    assert not changed, f"{header}: changed outside the data directory: {changed}"
    # Inside it: content-addressed blobs, the index, and no temporary file left behind.
    wait_until(
        lambda: not any((data / "tmp").iterdir()),
        timeout=30,
        describe=lambda: str(list((data / "tmp").iterdir())),
    )
    check_data_dir(data)


# --- what the fuzzer found, pinned -----------------------------------------------------------


def _request(ctx: Context, method: str, target: str, **headers: str) -> FuzzResponse:
    fields = [(b"Host", ctx.stowage.host.encode())]
    fields += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return send(ctx.stowage.host, FuzzRequest(0, method, target.encode(), fields))


def _oci_error(response: FuzzResponse, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers.get("content-type", "").startswith("application/json"), response
    assert json.loads(response.body)["errors"][0]["code"] == code, response


def test_fuzz_findings_stay_fixed(context: tuple[Context, Path]) -> None:
    ctx, _ = context
    prefix = ctx.registry.path_prefix

    # "/v2" without its slash reached the handler with no tail: a 500.
    for method in ("GET", "HEAD"):
        resp = _request(ctx, method, "/v2")
        assert resp.status == 200, resp
    assert json.loads(_request(ctx, "GET", "/v2").body) == {}

    # Host names DNS cannot carry crashed the upstream lookup: a 500, now a 400.
    too_long = [
        f"/v2/library/app/manifests/1?ns={'x' * 5000}",
        f"/v2/library/app/manifests/1?ns={'.'.join(['a' * 60] * 5)}",
        f"/v2/{'a' * 64}.com/library/app/manifests/1",
    ]
    for target in too_long:
        _oci_error(_request(ctx, "GET", target), 400, "NAME_INVALID")

    # A cached blob answered a bad Range, or a failed If-Match, with an empty body (and
    # differently from the same blob while it was being filled).
    layer, size = ctx.images.app.layers[0]
    blob = f"/v2/{prefix}/library/app/blobs/{layer}"
    assert _request(ctx, "GET", blob).status == 200
    hexpart = layer.removeprefix("sha256:")
    cached = ctx.stowage.data_dir / "blobs" / "sha256" / hexpart[:2] / hexpart
    wait_until(cached.exists, timeout=10)  # the fill releases the client before its rename
    for unsatisfiable in (f"bytes={size}-", "bytes=99999999999999999999-"):
        resp = _request(ctx, "GET", blob, Range=unsatisfiable)
        _oci_error(resp, 416, "BLOB_UNKNOWN")
        assert resp.headers.get("content-range") == f"bytes */{size}", resp
        head = _request(ctx, "HEAD", blob, Range=unsatisfiable)
        assert (head.status, head.body) == (416, b""), head
    for ignored in ("bytes=0-1,4-5", "bytes=a-b", "bytes=5-2", "items=0-1"):
        resp = _request(ctx, "GET", blob, Range=ignored)
        assert (resp.status, len(resp.body)) == (200, size), (ignored, resp)
    resp = _request(ctx, "GET", blob, Range="bytes=-5")
    assert (resp.status, len(resp.body)) == (206, 5), resp
    for name, value in (
        ("If-Match", '"nope"'),
        ("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ):
        resp = _request(ctx, "GET", blob, **{name.replace("-", "_"): value})
        assert resp.status == 200 and len(resp.body) == size, (name, resp)

    # Tag lists ignored n and last when upstream does (Distribution 2.8): the suite's check.
    for tag in ("b", "a", "c"):
        push_image(ctx.registry, "fuzz/paged", tag, layer_sizes=(64,))
    tags = f"/v2/{prefix}/fuzz/paged/tags/list"
    resp = _request(ctx, "GET", f"{tags}?n=2")
    assert (resp.status, json.loads(resp.body)["tags"]) == (200, ["a", "b"]), resp
    assert resp.headers.get("link") == f'<{tags}?n=2&last=b>; rel="next"', resp
    resp = _request(ctx, "GET", f"{tags}?n=2&last=b")
    assert (json.loads(resp.body)["tags"], resp.headers.get("link")) == (["c"], None), resp
    resp = _request(ctx, "GET", f"/v2/fuzz/paged/tags/list?last=a&ns={ctx.upstream}")
    assert json.loads(resp.body)["tags"] == ["b", "c"], resp

    # Requests aiohttp's parser refuses were logged as ERROR with a traceback.
    refused = send(ctx.stowage.host, FuzzRequest(0, "GET", b"/v2/", []))  # no Host
    assert refused.status == 400, refused
    resp = _request(ctx, "GET", "/v2/\u00e9")  # raw UTF-8 in the request line
    assert resp.status == 400, resp
    log = wait_until(
        lambda: (
            (text := ctx.stowage.log_text()).count("malformed HTTP request refused") >= 2 and text
        ),
        timeout=10,
    )
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
