"""Property-based tests of route parsing and digests, complementing test_reference.py and
test_routing.py: request paths built from valid parts parse back to exactly those parts,
in host-prefixed and mirror (``ns``) form, and no input makes ``parse_route`` raise
anything but an OCIError."""

from __future__ import annotations

import re

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from stowage.oci.digest import Digest, InvalidDigest, UnsupportedDigest, is_digest
from stowage.oci.reference import (
    InvalidReference,
    encode_registry,
    is_valid_registry,
    is_valid_repository,
    is_valid_tag,
    normalize_registry,
    normalize_repository,
    parse_reference,
    proxied_reference,
)
from stowage.proxy.errors import OCIError
from stowage.proxy.routing import Route, parse_route

FAST = settings(max_examples=150, deadline=None)
DEFAULT = "docker.io"

# --- strategies ---------------------------------------------------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
alnum_runs = st.text(ALNUM, min_size=1, max_size=6)
# Endpoint words are valid path components too, and make the best traps for the parser.
words = st.sampled_from(["manifests", "blobs", "tags", "list", "uploads", "v2", "library"])
separators = st.sampled_from([".", "_", "__", "-", "--"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(st.one_of(alnum_runs, words))]
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        parts += [draw(separators), draw(alnum_runs)]
    return "".join(parts)


repositories = st.lists(st.one_of(path_components(), words), min_size=1, max_size=5).map("/".join)
labels = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
dotted_hosts = st.lists(labels, min_size=2, max_size=4).map(".".join)
hosts = st.one_of(dotted_hosts, st.ip_addresses(v=4).map(str), st.just("localhost"))
ports = st.integers(min_value=1, max_value=65535).map(str)


@st.composite
def registries(draw: st.DrawFn) -> str:
    host, port = draw(hosts), draw(st.none() | ports)
    return host if port is None else f"{host}:{port}"


tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}", fullmatch=True)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
hex128 = st.text("0123456789abcdef", min_size=128, max_size=128)
digests = st.one_of(
    hex64.map(lambda h: Digest("sha256", h)), hex128.map(lambda h: Digest("sha512", h))
)


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[str, str, str]:
    """(kind, reference, path suffix) of a valid request."""
    kind = draw(st.sampled_from(["manifests", "blobs", "tags"]))
    if kind == "tags":
        return kind, "", "tags/list"
    references = digests.map(str) if kind == "blobs" else st.one_of(tags, digests.map(str))
    ref = draw(references)
    return kind, ref, f"{kind}/{ref}"


def _fits(registry: str, repository: str) -> bool:
    return len(repository) <= 255 and len(f"{registry}/{repository}") <= 255


# --- round trips ----------------------------------------------------------------------------


@FAST
@given(registry=registries(), repository=repositories, endpoint=endpoints())
@example(
    registry="ghcr.io",
    repository="org/manifests/app",
    endpoint=("blobs", "sha256:" + "0" * 64, "blobs/sha256:" + "0" * 64),
)
def test_host_prefixed_paths_round_trip(
    registry: str, repository: str, endpoint: tuple[str, str, str]
) -> None:
    assume(_fits(registry, repository))
    kind, reference, suffix = endpoint
    encoded = encode_registry(registry)
    tail = f"{encoded}/{repository}/{suffix}"
    expected = Route(
        normalize_registry(registry),
        normalize_repository(registry, repository),
        kind,
        reference,
        False,
    )
    # Configured registries always decode; the rest unless "-<digits>" reads as a port.
    assert parse_route(tail, None, DEFAULT, [registry]) == expected
    if ":" in registry or re.search(r"-[0-9]+$", registry) is None:
        assert parse_route(tail, None, DEFAULT) == expected
    # Spelled with capitals, the registry component means the same upstream.
    shouted = f"{encoded.upper()}/{repository}/{suffix}"
    assert parse_route(shouted, None, DEFAULT, [registry]) == expected


@FAST
@given(ns=registries(), repository=repositories, endpoint=endpoints())
def test_mirror_paths_round_trip(ns: str, repository: str, endpoint: tuple[str, str, str]) -> None:
    assume(_fits(ns, repository))
    kind, reference, suffix = endpoint
    route = parse_route(f"{repository}/{suffix}", ns, DEFAULT)
    assert route == Route(
        normalize_registry(ns), normalize_repository(ns, repository), kind, reference, True
    )


@FAST
@given(repository=repositories, endpoint=endpoints())
def test_unprefixed_paths_use_the_default_registry(
    repository: str, endpoint: tuple[str, str, str]
) -> None:
    first = repository.split("/")[0]
    assume("." not in first and first != "localhost")  # those would be registries
    kind, reference, suffix = endpoint
    for default in (DEFAULT, "registry.local:5000"):
        route = parse_route(f"{repository}/{suffix}", None, default)
        assert route == Route(
            default, normalize_repository(default, repository), kind, reference, False
        )


@FAST
@given(
    registry=registries(),
    repository=repositories,
    tag=st.none() | tags,
    digest=st.none() | digests.map(str),
)
def test_proxied_references_route_to_their_upstream(
    registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    """An image reference rewritten to go through the proxy reaches the proxy as a request
    path that routes back to the original registry, repository and reference."""
    assume(not re.search(r"-[0-9]+$", registry.split(":")[0]) or ":" in registry)
    proxy = "cache.example.com:7439"
    text = (
        f"{registry}/{repository}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    )
    try:
        ref = parse_reference(text)
        proxied = parse_reference(proxied_reference(ref, proxy))
    except InvalidReference:
        # Too long once prefixed: covered in test_reference.py.
        assume(False)
        return
    # What a runtime sends for this reference: GET /v2/<proxied repository>/manifests/<ref>.
    route = parse_route(f"{proxied.repository}/manifests/{proxied.ref}", None, DEFAULT)
    assert (route.registry, route.repository, route.reference) == (
        ref.registry,
        ref.repository,
        ref.ref,
    )


# --- arbitrary input -----------------------------------------------------------------------

fragments = st.sampled_from(
    [
        "a",
        "Z",
        "/",
        "//",
        ".",
        "..",
        "../",
        "-",
        "_",
        ":",
        "@",
        "%2f",
        "%2F",
        "%00",
        "\\",
        "\x00",
        "\n",
        " ",
        "é",
        "\u202e",
        "ghcr.io",
        "127.0.0.1-5000",
        "localhost-99999",
        "[::1]",
        "manifests",
        "/manifests/",
        "/blobs/",
        "/tags/list",
        "tags",
        "list",
        "latest",
        "sha256:",
        "sha256:" + "0" * 64,
        "md5:" + "0" * 32,
        "x" * 300,
    ]
)
pathish = st.one_of(st.text(max_size=120), st.lists(fragments, max_size=14).map("".join))
nsish = st.one_of(st.none(), st.text(max_size=30), st.lists(fragments, max_size=4).map("".join))
known_lists = st.lists(st.one_of(st.text(max_size=20), registries()), max_size=3)


@settings(max_examples=400, deadline=None)
@given(tail=pathish, ns=nsish, known=known_lists)
# Found by the request fuzzer: such hosts crashed the upstream lookup (a 500).
@example(tail="library/app/manifests/1", ns="x" * 5000, known=[])
@example(tail="a" * 64 + ".com/app/manifests/1", ns=None, known=[])
@example(tail="app/manifests/1", ns=".".join(["a" * 60] * 5), known=[])
def test_parse_route_raises_only_oci_errors(tail: str, ns: str | None, known: list[str]) -> None:
    try:
        route = parse_route(tail, ns, DEFAULT, known)
    except OCIError as exc:
        assert exc.status in (400, 404)
        assert exc.code in ("NAME_INVALID", "NAME_UNKNOWN")
        assert len(exc.message) < 1000  # bounded, whatever the input's size
        return
    # Whatever is accepted is well-formed: it can be handed to the upstream client as is.
    assert route.kind in ("manifests", "blobs", "tags")
    assert is_valid_registry(route.registry)
    assert route.registry == normalize_registry(route.registry)
    host = route.registry.partition(":")[0]  # no IPv6 here: "[" is not in a path component
    assert len(host) <= 253 and all(len(label) <= 63 for label in host.split("."))
    assert is_valid_repository(route.repository)
    assert "/" not in route.reference
    assert (route.kind == "tags") == (route.reference == "")
    assert route.mirror == (ns is not None)


# --- digests -------------------------------------------------------------------------------


@FAST
@given(digests)
def test_digests_round_trip_through_text(digest: Digest) -> None:
    text = str(digest)
    assert Digest.parse(text) == digest
    assert is_digest(text)
    # The one spelling: any other case is a different (invalid) string, never the same blob.
    upper = digest.algorithm + ":" + digest.hex.upper()
    if upper != text:
        try:
            Digest.parse(upper)
        except InvalidDigest as exc:
            assert not isinstance(exc, UnsupportedDigest)
        else:
            raise AssertionError(f"{upper} accepted")


@FAST
@given(digests, st.sampled_from(["manifests", "blobs"]))
def test_digests_in_paths_round_trip(digest: Digest, kind: str) -> None:
    route = parse_route(f"ghcr.io/org/app/{kind}/{digest}", None, DEFAULT)
    assert Digest.parse(route.reference) == digest


@FAST
@given(
    hex_=st.text("0123456789abcdef", max_size=140), algorithm=st.sampled_from(["sha256", "sha512"])
)
def test_digest_length_is_exact(hex_: str, algorithm: str) -> None:
    want = 64 if algorithm == "sha256" else 128
    try:
        d = Digest.parse(f"{algorithm}:{hex_}")
    except InvalidDigest as exc:
        assert not isinstance(exc, UnsupportedDigest)
        assert len(hex_) != want
    else:
        assert len(d.hex) == want == len(hex_)


@FAST
@given(st.one_of(tags, st.text(max_size=40)))
def test_tags_and_digests_are_told_apart(text: str) -> None:
    """A manifest reference is a tag or a digest, never both: tags cannot contain ':'."""
    assert not (is_valid_tag(text) and is_digest(text))
