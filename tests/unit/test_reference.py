"""Unit tests for stowage.oci.reference.

Most tables are ported from github.com/distribution/reference (reference_test.go,
normalize_test.go, regexp_test.go). Expectations are those of ParseNormalizedNamed, i.e.
after Docker normalisation, with the fully qualified form (":latest" added when there is
neither tag nor digest). Where stowage deliberately differs, a comment says so.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stowage.oci.digest import Digest, InvalidDigest, UnsupportedDigest
from stowage.oci.reference import (
    DOCKER_HUB,
    InvalidReference,
    Reference,
    api_host,
    decode_registry_component,
    encode_registry,
    is_valid_registry,
    is_valid_repository,
    is_valid_tag,
    normalize_registry,
    normalize_repository,
    parse_reference,
    proxied_reference,
)

FAST = settings(max_examples=150, deadline=None)

F64 = "f" * 64
F128 = "f" * 128
SHA_F64 = f"sha256:{F64}"
BUSYBOX_DIGEST = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
REDIS_DIGEST = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
BE_DIGEST = "sha256:be178c0543eb17f5f3043021c9e5fcf30285e557a4fc309cce97ff9ca6182912"
E66_DIGEST = "sha256:e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582"


def _parts(s: str, default_registry: str = DOCKER_HUB) -> tuple[str, str, str | None, str | None]:
    r = parse_reference(s, default_registry)
    return r.registry, r.repository, r.tag, r.digest


def _ambiguous(registry: str) -> bool:
    # A registry Docker's heuristic would not recognise in front of a path (see
    # test_uppercase_only_registry_is_lowercased).
    return "." not in registry and ":" not in registry and registry != "localhost"


# --- reference_test.go: TestReferenceParse ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("test_com", "docker.io", "library/test_com", "latest", None),
        ("test.com:tag", "docker.io", "library/test.com", "tag", None),
        ("test.com:5000", "docker.io", "library/test.com", "5000", None),
        ("test.com/repo:tag", "test.com", "repo", "tag", None),
        ("test:5000/repo", "test:5000", "repo", "latest", None),
        ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
        (f"test:5000/repo@{SHA_F64}", "test:5000", "repo", None, SHA_F64),
        (f"test:5000/repo:tag@{SHA_F64}", "test:5000", "repo", "tag", SHA_F64),
        ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", None),
        ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", "latest", None),
        (
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            "sub-dom1.foo.com",
            "bar/baz/quux",
            "some-long-tag",
            None,
        ),
        (
            "b.gcr.io/test.example.com/my-app:test.example.com",
            "b.gcr.io",
            "test.example.com/my-app",
            "test.example.com",
            None,
        ),
        ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
        (
            f"xn--7o8h.com/myimage:xn--7o8h.com@sha512:{F128}",
            "xn--7o8h.com",
            "myimage",
            "xn--7o8h.com",
            f"sha512:{F128}",
        ),
        ("foo_bar.com:8080", "docker.io", "library/foo_bar.com", "8080", None),
        # Parse() reads "foo" as a domain; normalisation (no '.', ':') makes it Hub's.
        ("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", "8080", None),
        ("192.168.1.1", "docker.io", "library/192.168.1.1", "latest", None),
        ("192.168.1.1:tag", "docker.io", "library/192.168.1.1", "tag", None),
        ("192.168.1.1:5000", "docker.io", "library/192.168.1.1", "5000", None),
        ("192.168.1.1/repo", "192.168.1.1", "repo", "latest", None),
        ("192.168.1.1:5000/repo", "192.168.1.1:5000", "repo", "latest", None),
        ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
        ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", "latest", None),
        ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
        ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", "latest", None),
        ("[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000", "repo", "tag", None),
        (f"[2001:db8::1]:5000/repo@{SHA_F64}", "[2001:db8::1]:5000", "repo", None, SHA_F64),
        (f"[2001:db8::1]:5000/repo:tag@{SHA_F64}", "[2001:db8::1]:5000", "repo", "tag", SHA_F64),
        ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "latest", None),
        ("[::1]:5000/repo", "[::1]:5000", "repo", "latest", None),
        # Upstream's 127 "a/" case is too long once "docker.io/" is added; 122 fits 255.
        (
            "a/" * 122 + "a:tag-puts-this-over-max",
            "docker.io",
            "a/" * 122 + "a",
            "tag-puts-this-over-max",
            None,
        ),
    ],
)
def test_reference_parse_vectors(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert _parts(text) == (registry, repository, tag, digest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (":justtag", "no repository name"),
        (f"@{SHA_F64}", "no repository name"),
        ("repo@sha256:" + "f" * 34, "64 lowercase hex characters"),
        (f"validname@invaliddigest:{F64}", "'invaliddigest' is not supported"),
        ("Uppercase:tag", "must be lowercase"),
        ("test:5000/Uppercase/lowercase:tag", "must be lowercase"),
        ("a/" * 128 + "a:tag", "more than 255"),
        ("a/" * 127 + "a:tag-puts-this-over-max", "more than 255"),
        ("a/" * 123 + "a", "more than 255"),
        ("aa/asdf$$^/aa", "invalid path component"),
        ("[2001:db8::1]", None),
        ("[2001:db8::1]:5000", None),
        ("[2001:db8::1]:tag", None),
        ("[fe80::1%eth0]:5000/repo", "invalid registry host"),
        ("[fe80::1%@invalidzone]:5000/repo", None),
    ],
)
def test_reference_parse_invalid_vectors(text: str, message: str | None) -> None:
    with pytest.raises(InvalidReference, match=message):
        parse_reference(text)


def test_unsupported_digest_is_reported_as_invalid_reference() -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(f"validname@invaliddigest:{F64}")
    assert isinstance(info.value.__cause__, UnsupportedDigest)


def test_uppercase_message() -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference("test:5000/Uppercase/lowercase:tag")
    assert "repository name 'Uppercase/lowercase' must be lowercase" in str(info.value)


# --- reference_test.go: TestDomainAndPath, TestSerialization, TestWithTag, TestParseNamed ----


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("test.com/foo", "test.com", "foo", "latest", None),
        ("test_com/foo", "docker.io", "test_com/foo", "latest", None),
        ("test:8080/foo", "test:8080", "foo", "latest", None),
        ("test.com:8080/foo", "test.com:8080", "foo", "latest", None),
        ("test-com:8080/foo", "test-com:8080", "foo", "latest", None),
        ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", None),
        ("example.com:8000/named", "example.com:8000", "named", "latest", None),
        ("example.com:8000/named:tagged", "example.com:8000", "named", "tagged", None),
        (
            "other.com/named@sha256:"
            "1234567890098765432112345667890098765432112345667890098765432112",
            "other.com",
            "named",
            None,
            "sha256:1234567890098765432112345667890098765432112345667890098765432112",
        ),
        ("test.com/foo:tag", "test.com", "foo", "tag", None),
        ("foo:tag2", "docker.io", "library/foo", "tag2", None),
        ("test.com:8000/foo:tag4", "test.com:8000", "foo", "tag4", None),
        ("test.com:8000/foo:TAG5", "test.com:8000", "foo", "TAG5", None),
        ("docker.io/library/foo", "docker.io", "library/foo", "latest", None),
        # ParseNamed rejects these as not canonical; the normalising parser accepts them.
        ("library/foo", "docker.io", "library/foo", "latest", None),
        ("docker.io/foo", "docker.io", "library/foo", "latest", None),
        ("test.com", "docker.io", "library/test.com", "latest", None),
    ],
)
def test_domain_and_path_vectors(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert _parts(text) == (registry, repository, tag, digest)


def test_short_digests_from_with_digest_vectors_are_rejected() -> None:
    # WithDigest does not validate; stowage must be able to verify what it stores.
    with pytest.raises(InvalidReference, match="64 lowercase hex"):
        parse_reference("test.com:8000/foo:TAG5@sha256:1234567890098765432112345667890098765")


# --- normalize_test.go ----------------------------------------------------------------------

VALID_REPO_NAMES = [
    "docker/docker",
    "library/debian",
    "debian",
    "docker.io/docker/docker",
    "docker.io/library/debian",
    "docker.io/debian",
    "index.docker.io/docker/docker",
    "index.docker.io/library/debian",
    "index.docker.io/debian",
    "127.0.0.1:5000/docker/docker",
    "127.0.0.1:5000/library/debian",
    "127.0.0.1:5000/debian",
    "192.168.0.1",
    "192.168.0.1:80",
    "192.168.0.1:8/debian",
    "192.168.0.2:25000/debian",
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
    "[fc00::1]:5000/docker",
    "[fc00::1]:5000/docker/docker",
    "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
    "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
    "Docker/docker",
    "DOCKER/docker",
    # TestValidateRemoteName
    "docker-rules/docker",
    "docker---rules/docker",
    "doc/docker",
    "d/docker",
    "jess/t",
    "dock__er/docker",
]

INVALID_REPO_NAMES = [
    "https://github.com/docker/docker",
    "docker/Docker",
    "-docker",
    "-docker/docker",
    "-docker.io/docker/docker",
    "docker///docker",
    "docker.io/docker/Docker",
    "docker.io/docker///docker",
    "[fc00::1]",
    "[fc00::1]:5000",
    "fc00::1:5000/debian",
    "[fe80::1%eth0]:5000/debian",
    "[2001:db8:3:4::192.0.2.33]:5000/debian",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
    # TestValidateRemoteName
    "docker-/docker",
    "-docker-/docker",
    "____/____",
    "_docker/_docker",
    "dock..er/docker",
    "dock_.er/docker",
    "dock-.er/docker",
    "docker/",
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_"
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_"
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_"
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255/docker",
    # TestInvalidReferenceComponents
    "-foo",
]


@pytest.mark.parametrize("text", VALID_REPO_NAMES)
def test_valid_repo_names(text: str) -> None:
    ref = parse_reference(text)
    assert ref.digest is None
    if not _ambiguous(ref.registry):
        assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("text", INVALID_REPO_NAMES)
def test_invalid_repo_names(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_bare_image_id_is_rejected_with_explanation() -> None:
    with pytest.raises(InvalidReference, match="hex image ID"):
        parse_reference("1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a")


# TestParseRepositoryInfo: every spelling resolves to the same registry and path.
# Registries are lowercased by stowage ("Foo" -> "foo"), unlike distribution.
@pytest.mark.parametrize(
    ("spellings", "registry", "repository"),
    [
        (["fooo/bar", "docker.io/fooo/bar", "index.docker.io/fooo/bar"], "docker.io", "fooo/bar"),
        (["ubuntu", "docker.io/library/ubuntu", "library/ubuntu"], "docker.io", "library/ubuntu"),
        (["nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu"], "docker.io", "nonlibrary/ubuntu"),
        (["other/library", "docker.io/other/library"], "docker.io", "other/library"),
        (["127.0.0.1:8000/private/moonbase"], "127.0.0.1:8000", "private/moonbase"),
        (["127.0.0.1:8000/privatebase"], "127.0.0.1:8000", "privatebase"),
        (["example.com/private/moonbase"], "example.com", "private/moonbase"),
        (["example.com/privatebase"], "example.com", "privatebase"),
        (["example.com:8000/private/moonbase"], "example.com:8000", "private/moonbase"),
        (["example.com:8000/privatebasee"], "example.com:8000", "privatebasee"),
        (
            [
                "ubuntu-12.04-base",
                "docker.io/library/ubuntu-12.04-base",
                "index.docker.io/library/ubuntu-12.04-base",
            ],
            "docker.io",
            "library/ubuntu-12.04-base",
        ),
        (["foo", "docker.io/library/foo", "docker.io/foo"], "docker.io", "library/foo"),
        (["library/foo/bar", "docker.io/library/foo/bar"], "docker.io", "library/foo/bar"),
        (["store/foo/bar", "docker.io/store/foo/bar"], "docker.io", "store/foo/bar"),
        (["Foo/bar"], "foo", "bar"),
        (["FOO/bar"], "foo", "bar"),
    ],
)
def test_parse_repository_info(spellings: list[str], registry: str, repository: str) -> None:
    for text in spellings:
        ref = parse_reference(text)
        assert (ref.registry, ref.repository) == (registry, repository), text
        assert ref.name == f"{registry}/{repository}"


def test_parse_reference_with_tag_and_digest() -> None:
    ref = parse_reference(f"busybox:latest@{BUSYBOX_DIGEST}")
    assert str(ref) == f"docker.io/library/busybox:latest@{BUSYBOX_DIGEST}"
    assert ref.tag == "latest"
    assert ref.digest == BUSYBOX_DIGEST
    assert ref.ref == BUSYBOX_DIGEST


def test_invalid_reference_components() -> None:
    assert not is_valid_tag("-foo")
    with pytest.raises(InvalidReference):
        parse_reference("busybox:-foo")
    with pytest.raises(InvalidReference):
        parse_reference("busybox@foo")


# TestParseAnyReference (named cases) and TestParseDockerRef.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis", "docker.io/library/redis:latest"),
        ("redis:latest", "docker.io/library/redis:latest"),
        ("docker.io/library/redis:latest", "docker.io/library/redis:latest"),
        (f"redis@{REDIS_DIGEST}", f"docker.io/library/redis@{REDIS_DIGEST}"),
        (f"docker.io/library/redis@{REDIS_DIGEST}", f"docker.io/library/redis@{REDIS_DIGEST}"),
        ("dmcgowan/myapp", "docker.io/dmcgowan/myapp:latest"),
        ("dmcgowan/myapp:latest", "docker.io/dmcgowan/myapp:latest"),
        ("docker.io/mcgowan/myapp:latest", "docker.io/mcgowan/myapp:latest"),
        (f"dmcgowan/myapp@{REDIS_DIGEST}", f"docker.io/dmcgowan/myapp@{REDIS_DIGEST}"),
        (f"docker.io/dmcgowan/myapp@{REDIS_DIGEST}", f"docker.io/dmcgowan/myapp@{REDIS_DIGEST}"),
        (
            "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9",
            "docker.io/library/dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9"
            ":latest",
        ),
        ("dbcc1", "docker.io/library/dbcc1:latest"),
        # ParseAnyReference reads this as a digest; as a name it is library/sha256:<tag>.
        (REDIS_DIGEST, f"docker.io/library/{REDIS_DIGEST}"),
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:latest", "docker.io/library/busybox:latest"),
        (f"busybox@{E66_DIGEST}", f"docker.io/library/busybox@{E66_DIGEST}"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox:latest", "docker.io/library/busybox:latest"),
        ("library/busybox:latest", "docker.io/library/busybox:latest"),
        ("gcr.io/library/busybox", "gcr.io/library/busybox:latest"),
        # ParseDockerRef drops the tag here; stowage keeps both (the digest wins in `ref`).
        (
            f"gcr.io/library/busybox:latest@{E66_DIGEST}",
            f"gcr.io/library/busybox:latest@{E66_DIGEST}",
        ),
    ],
)
def test_fully_qualified_form(text: str, expected: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == expected
    assert parse_reference(expected) == ref


# TestNormalizedSplitHostname
@pytest.mark.parametrize(
    ("text", "registry", "repository"),
    [
        ("test.com/foo", "test.com", "foo"),
        ("test_com/foo", "docker.io", "test_com/foo"),
        ("docker/migrator", "docker.io", "docker/migrator"),
        ("test.com:8080/foo", "test.com:8080", "foo"),
        ("test-com:8080/foo", "test-com:8080", "foo"),
        ("foo", "docker.io", "library/foo"),
        ("xn--n3h.com/foo", "xn--n3h.com", "foo"),
        ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo"),
        ("docker.io/foo", "docker.io", "library/foo"),
        ("docker.io/library/foo", "docker.io", "library/foo"),
        ("docker.io/library/foo/bar", "docker.io", "library/foo/bar"),
    ],
)
def test_normalized_split_hostname(text: str, registry: str, repository: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository) == (registry, repository)


# --- regexp_test.go -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("test.com", True),
        ("test.com:10304", True),
        ("test.com:http", False),
        ("localhost", True),
        ("localhost:8080", True),
        ("a", True),
        ("a.b", True),
        ("ab.cd.com", True),
        ("a-b.com", True),
        ("-ab.com", False),
        ("ab-.com", False),
        ("ab.c-om", True),
        ("ab.-com", False),
        ("ab.com-", False),
        ("0101.com", True),
        ("001a.com", True),
        ("b.gbc.io:443", True),
        ("b.gbc.io", True),
        ("xn--n3h.com", True),
        ("Asdf.com", True),
        # Upstream's grammar accepts any digits and leaves ports to later validation;
        # stowage rejects ports above 65535 outright.
        ("192.168.1.1:75050", False),
        ("192.168.1.1:750050", False),
        ("192.168.1.1:7505", True),
        ("[fd00:1:2::3]:75050", False),
        ("[fd00:1:2::3]:7505", True),
        ("[fd00:1:2::3]75050", False),
        ("[fd00:1:2::3]::75050", False),
        ("[fd00:1:2::3%eth0]:75050", False),
        # Matches upstream's [hex:] pattern but is no IPv6 address.
        ("[fd00123123123]:7505", False),
        ("[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:7505", True),
        ("[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:750505", False),
        ("fd00:1:2::3:75050", False),
        # Additional edge cases.
        ("", False),
        (":5000", False),
        ("host:", False),
        ("host:5000:6000", False),
        ("a..b", False),
        (".a", False),
        ("a.", False),
        ("under_score.com", False),
        ("[::1]", True),
        ("[]", False),
        ("[::1", False),
        ("::1]", False),
        ("[::ffff:1.2.3.4]", False),
        ("host:0", True),
        ("host:65535", True),
        ("host:65536", False),
        ("host:١٢٣", False),  # non-ASCII digits
        ("hóst.com", False),
    ],
)
def test_is_valid_registry(host: str, valid: bool) -> None:
    assert is_valid_registry(host) is valid


# TestFullNameRegexp, as whole references through the normalising parser.
@pytest.mark.parametrize(
    ("text", "registry", "repository"),
    [
        ("short", "docker.io", "library/short"),
        ("simple/name", "docker.io", "simple/name"),
        ("library/ubuntu", "docker.io", "library/ubuntu"),
        ("docker/stevvooe/app", "docker.io", "docker/stevvooe/app"),
        (
            "aa/aa/aa/aa/aa/aa/aa/aa/aa/bb/bb/bb/bb/bb/bb",
            "docker.io",
            "aa/aa/aa/aa/aa/aa/aa/aa/aa/bb/bb/bb/bb/bb/bb",
        ),
        ("aa/aa/bb/bb/bb", "docker.io", "aa/aa/bb/bb/bb"),
        ("a/a/a/a", "docker.io", "a/a/a/a"),
        ("a", "docker.io", "library/a"),
        ("a/aa", "docker.io", "a/aa"),
        ("a/aa/a", "docker.io", "a/aa/a"),
        ("foo.com", "docker.io", "library/foo.com"),
        ("foo.com:8080/bar", "foo.com:8080", "bar"),
        ("foo.com/bar", "foo.com", "bar"),
        ("foo.com/bar/baz", "foo.com", "bar/baz"),
        ("localhost:8080/bar", "localhost:8080", "bar"),
        ("localhost/bar", "localhost", "bar"),
        ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux"),
        ("blog.foo.com/bar/baz", "blog.foo.com", "bar/baz"),
        ("aa-a/a", "docker.io", "aa-a/a"),
        ("foo_bar", "docker.io", "library/foo_bar"),
        ("foo_bar.com", "docker.io", "library/foo_bar.com"),
        ("foo.com/foo_bar", "foo.com", "foo_bar"),
        ("b.gcr.io/test.example.com/my-app", "b.gcr.io", "test.example.com/my-app"),
        ("xn--n3h.com/myimage", "xn--n3h.com", "myimage"),
        ("xn--7o8h.com/myimage", "xn--7o8h.com", "myimage"),
        ("example.com/xn--7o8h.com/myimage", "example.com", "xn--7o8h.com/myimage"),
        (
            "example.com/some_separator__underscore/myimage",
            "example.com",
            "some_separator__underscore/myimage",
        ),
        ("do__cker/docker", "docker.io", "do__cker/docker"),
        (
            "registry.io/foo/project--id.module--name.ver---sion--name",
            "registry.io",
            "foo/project--id.module--name.ver---sion--name",
        ),
        ("Asdf.com/foo/bar", "asdf.com", "foo/bar"),
    ],
)
def test_full_name_vectors(text: str, registry: str, repository: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, "latest")


@pytest.mark.parametrize(
    "text",
    [
        "a/a/a/a/",
        "a//a/a",
        "foo.com/",
        "foo.com:http/bar",
        "a^a",
        "asdf$$^/aa",
        "a-/a/a/a",
        "foo.com/a-/a/a",
        "-foo/bar",
        "foo/bar-",
        "foo-/bar",
        "foo/-bar",
        "_foo/bar",
        "foo_bar.com:8080/app",
        "docker_/docker_",
        "example.com/__underscore/myimage",
        "example.com/..dots/myimage",
        "example.com/.dots/myimage",
        "example.com/nodouble..dots/myimage",
        "docker./docker",
        ".docker/docker",
        "do..cker/docker",
        "do__cker:8080/docker",
        "Foo/FarB",
        # TestReferenceRegexp
        "registry.com:8080/myapp@sha256:badbadbadbad",
        "registry.com:8080/myapp:invalid~tag",
        "bad_hostname.com:8080/myapp:tag",
        f"localhost:http/name@{BE_DIGEST}",
        "registry.com:8080/myapp@bad",
        "registry.com:8080/myapp@2bad",
    ],
)
def test_invalid_name_vectors(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


# TestReferenceRegexp (valid cases)
@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("registry.com:8080/myapp:tag", "registry.com:8080", "myapp", "tag", None),
        (f"registry.com:8080/myapp@{BE_DIGEST}", "registry.com:8080", "myapp", None, BE_DIGEST),
        (
            f"registry.com:8080/myapp:tag2@{BE_DIGEST}",
            "registry.com:8080",
            "myapp",
            "tag2",
            BE_DIGEST,
        ),
        # "localhost" without a following path is a name, and 8080 its tag.
        (f"localhost:8080@{BE_DIGEST}", "docker.io", "library/localhost", "8080", BE_DIGEST),
        (f"localhost:8080/name@{BE_DIGEST}", "localhost:8080", "name", None, BE_DIGEST),
        (f"localhost@{BE_DIGEST}", "docker.io", "library/localhost", None, BE_DIGEST),
    ],
)
def test_reference_regexp_vectors(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert _parts(text) == (registry, repository, tag, digest)


# TestIdentifierRegexp: only a bare 64-char lowercase hex string is an image ID.
def test_identifier_vectors() -> None:
    ident = "da304e823d8ca2b9d863a3c897baeb852ba21ea9a9f1414736394ae7fcaf9821"
    with pytest.raises(InvalidReference, match="image ID"):
        parse_reference(ident)
    with pytest.raises(InvalidReference, match="must be lowercase"):
        parse_reference(ident.upper())
    assert parse_reference(ident[:60]).repository == f"library/{ident[:60]}"
    assert parse_reference(ident + "8482").repository == f"library/{ident}8482"
    assert parse_reference(f"{ident}:v1").repository == f"library/{ident}"
    assert parse_reference(f"docker.io/{ident}").repository == f"library/{ident}"


# --- registries --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("Docker.IO", "docker.io"),
        ("INDEX.docker.io", "docker.io"),
        ("GHCR.io", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
        ("[FC00::1]:5000", "[fc00::1]:5000"),
        ("quay.io", "quay.io"),
    ],
)
def test_normalize_registry(host: str, expected: str) -> None:
    assert normalize_registry(host) == expected


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("docker.io", "registry-1.docker.io"),
        ("index.docker.io", "registry-1.docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ],
)
def test_api_host(registry: str, expected: str) -> None:
    assert api_host(registry) == expected


@pytest.mark.parametrize(
    ("registry", "repository", "expected"),
    [
        ("docker.io", "nginx", "library/nginx"),
        ("index.docker.io", "nginx", "library/nginx"),
        ("docker.io", "library/nginx", "library/nginx"),
        ("docker.io", "bitnami/nginx", "bitnami/nginx"),
        ("ghcr.io", "nginx", "nginx"),
        ("localhost:5000", "app", "app"),
    ],
)
def test_normalize_repository(registry: str, repository: str, expected: str) -> None:
    assert normalize_repository(registry, repository) == expected


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("library/nginx", True),
        ("a", True),
        ("a/b/c/d", True),
        ("dock__er/x", True),
        ("a---b", True),
        ("a.b_c__d-e", True),
        ("a" * 255, True),
        ("a" * 256, False),
        ("a/" * 127 + "a", True),
        ("a/" * 128 + "a", False),
        ("", False),
        ("/a", False),
        ("a/", False),
        ("a//b", False),
        ("A", False),
        ("a___b", False),
        ("a..b", False),
        ("a._b", False),
        ("-a", False),
        ("a-", False),
        ("localhost:5000/a", False),
        ("é", False),
    ],
)
def test_is_valid_repository(name: str, valid: bool) -> None:
    assert is_valid_repository(name) is valid


@pytest.mark.parametrize(
    ("tag", "valid"),
    [
        ("latest", True),
        ("v1.2.3", True),
        ("1.25-alpine", True),
        ("_x", True),
        ("UPPER", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (".x", False),
        ("-x", False),
        ("a:b", False),
        ("a/b", False),
        ("a@b", False),
        ("ünicode", False),
        ("a\n", False),
    ],
)
def test_is_valid_tag(tag: str, valid: bool) -> None:
    assert is_valid_tag(tag) is valid


# --- host-prefixed encoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1:5000", "127.0.0.1-5000"),
        ("ghcr.io", "ghcr.io"),
        ("myreg:5000", "myreg-5000"),
        ("myreg", "myreg"),
        ("localhost:5000", "localhost-5000"),
        ("index.docker.io", "docker.io"),
        ("Quay.IO", "quay.io"),
        ("registry.example.com:443", "registry.example.com-443"),
    ],
)
def test_encode_registry(host: str, expected: str) -> None:
    assert encode_registry(host) == expected


@pytest.mark.parametrize("host", ["[::1]:5000", "[fc00::1]"])
def test_encode_registry_rejects_ipv6(host: str) -> None:
    with pytest.raises(InvalidReference, match="IPv6"):
        encode_registry(host)


@pytest.mark.parametrize("host", ["", "bad_host.com", "host:port", "a/b"])
def test_encode_registry_rejects_invalid(host: str) -> None:
    with pytest.raises(InvalidReference, match="invalid registry host"):
        encode_registry(host)


@pytest.mark.parametrize(
    ("component", "known", "expected"),
    [
        ("127.0.0.1-5000", (), "127.0.0.1:5000"),
        ("my-host.example.com", (), "my-host.example.com"),
        ("localhost-5000", (), "localhost:5000"),
        ("localhost", (), "localhost"),
        ("ghcr.io", (), "ghcr.io"),
        ("docker.io", (), "docker.io"),
        ("index.docker.io", (), "docker.io"),
        ("registry-1.docker.io", (), "docker.io"),
        ("registry.example.com-443", (), "registry.example.com:443"),
        ("library", (), None),
        ("foo-1", (), None),
        ("myreg-5000", (), None),
        ("myreg", (), None),
        ("foo-1", ("foo-1",), "foo-1"),
        ("myreg-5000", ("myreg:5000",), "myreg:5000"),
        ("myreg-5000", ("other:1", "MyReg:5000"), "myreg:5000"),
        ("myreg", ("myreg",), "myreg"),
        ("myreg", ("myreg:5000",), None),
        # The one ambiguity of the encoding, settled by configuration.
        ("foo.bar-1", (), "foo.bar:1"),
        ("foo.bar-1", ("foo.bar-1",), "foo.bar-1"),
        # Components that look like registries but are no valid host.
        ("a..b", (), None),
        (".-5000", (), None),
        ("-5000", (), None),
        ("host.com-99999", (), None),
        ("host.com-", (), None),
        ("", (), None),
        ("host.com-١٢", (), None),
        # Invalid configured entries are skipped, not fatal.
        ("myreg", ("[::1]:5000", "bad_host", "myreg"), "myreg"),
    ],
)
def test_decode_registry_component(
    component: str, known: tuple[str, ...], expected: str | None
) -> None:
    assert decode_registry_component(component, known) == expected


def test_decode_accepts_any_iterable() -> None:
    assert decode_registry_component("myreg-5000", iter(["myreg:5000"])) == "myreg:5000"
    assert decode_registry_component("myreg-5000", {"myreg:5000"}) == "myreg:5000"


# --- Reference -----------------------------------------------------------------------------


def test_reference_str_name_ref() -> None:
    tagged = Reference("docker.io", "library/nginx", "1.25", None)
    assert str(tagged) == "docker.io/library/nginx:1.25"
    assert tagged.name == "docker.io/library/nginx"
    assert tagged.ref == "1.25"

    pinned = Reference("ghcr.io", "org/app", None, SHA_F64)
    assert str(pinned) == f"ghcr.io/org/app@{SHA_F64}"
    assert pinned.ref == SHA_F64

    both = Reference("localhost:5000", "app", "v1", SHA_F64)
    assert str(both) == f"localhost:5000/app:v1@{SHA_F64}"
    assert both.ref == SHA_F64


def test_reference_is_frozen_and_hashable() -> None:
    ref = parse_reference("nginx")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "other"  # type: ignore[misc]
    assert {ref, parse_reference("docker.io/library/nginx:latest")} == {ref}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"registry": "bad_host", "repository": "a", "tag": "t"}, "invalid registry host"),
        ({"registry": "docker.io", "repository": "A", "tag": "t"}, "invalid repository"),
        ({"registry": "docker.io", "repository": "a", "tag": "-t"}, "invalid tag"),
        ({"registry": "docker.io", "repository": "a", "digest": "sha256:x"}, "64 lowercase"),
        ({"registry": "docker.io", "repository": "a"}, "neither tag nor digest"),
        ({"registry": "docker.io", "repository": "a/" * 123 + "a", "tag": "t"}, "more than 255"),
    ],
)
def test_reference_constructor_validates(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidReference, match=message):
        Reference(**kwargs)


def test_default_registry() -> None:
    assert _parts("foo/bar", "ghcr.io") == ("ghcr.io", "foo/bar", "latest", None)
    assert _parts("nginx", "ghcr.io") == ("ghcr.io", "nginx", "latest", None)
    assert _parts("nginx", "index.docker.io") == ("docker.io", "library/nginx", "latest", None)
    assert _parts("quay.io/foo", "ghcr.io") == ("quay.io", "foo", "latest", None)
    with pytest.raises(InvalidReference, match="default registry"):
        parse_reference("nginx", "not a host")


def test_error_message_is_bounded_for_huge_input() -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference("a" * 100_000 + "$")
    assert len(str(info.value)) < 500


def test_uppercase_only_registry_is_lowercased() -> None:
    # Distribution treats "Foo" as a host because of its uppercase letter. Host names are
    # case-insensitive, so stowage lowercases it; the price is that "foo/bar" then reads
    # as a Docker Hub name, which is why str() does not round-trip for this corner.
    ref = parse_reference("Foo/bar:1")
    assert (ref.registry, ref.repository) == ("foo", "bar")
    assert parse_reference(str(ref)).registry == DOCKER_HUB


# --- proxied_reference ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", "localhost:7439/docker.io/library/nginx:latest"),
        ("127.0.0.1:5000/app:1", "localhost:7439/127.0.0.1-5000/app:1"),
        ("ghcr.io/org/app:v2", "localhost:7439/ghcr.io/org/app:v2"),
        ("index.docker.io/bitnami/redis", "localhost:7439/docker.io/bitnami/redis:latest"),
        (f"nginx@{SHA_F64}", f"localhost:7439/docker.io/library/nginx@{SHA_F64}"),
        (f"nginx:1.25@{SHA_F64}", f"localhost:7439/docker.io/library/nginx:1.25@{SHA_F64}"),
        ("localhost:5000/app", "localhost:7439/localhost-5000/app:latest"),
    ],
)
def test_proxied_reference(text: str, expected: str) -> None:
    assert proxied_reference(parse_reference(text), "localhost:7439") == expected


def test_proxied_reference_parses_back_through_the_proxy() -> None:
    ref = parse_reference(f"127.0.0.1:5000/team/app:1@{SHA_F64}")
    through = parse_reference(proxied_reference(ref, "cache.internal:7439"))
    assert through.registry == "cache.internal:7439"
    first, _, rest = through.repository.partition("/")
    assert decode_registry_component(first) == ref.registry
    assert rest == ref.repository
    assert (through.tag, through.digest) == (ref.tag, ref.digest)


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        ("myproxy", "Docker Hub namespace"),
        ("bad_proxy:1", "not a valid registry host"),
        ("", "not a valid registry host"),
    ],
)
def test_proxied_reference_rejects_bad_proxy(proxy: str, message: str) -> None:
    with pytest.raises(InvalidReference, match=message):
        proxied_reference(parse_reference("nginx"), proxy)


def test_proxied_reference_rejects_ipv6_upstream() -> None:
    with pytest.raises(InvalidReference, match="IPv6"):
        proxied_reference(parse_reference("[::1]:5000/app"), "localhost:7439")


def test_proxied_reference_rejects_overlong_result() -> None:
    ref = parse_reference("ghcr.io/" + "a/" * 120 + "a:1")
    with pytest.raises(InvalidReference, match="more than 255"):
        proxied_reference(ref, "localhost:7439")


# --- property tests ---------------------------------------------------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
alnum_runs = st.text(ALNUM, min_size=1, max_size=6)
separators = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(alnum_runs)]
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        parts += [draw(separators), draw(alnum_runs)]
    return "".join(parts)


repositories = st.lists(path_components(), min_size=1, max_size=4).map("/".join)
labels = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
dotted_hosts = st.lists(labels, min_size=2, max_size=4).map(".".join)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str).filter(lambda a: "." not in a).map(lambda a: f"[{a}]")
ports = st.integers(min_value=0, max_value=65535).map(str)
# Hosts Docker's heuristic recognises as registries without help.
plain_hosts = st.one_of(dotted_hosts, ipv4_hosts, st.just("localhost"), st.just("docker.io"))


@st.composite
def with_optional_port(draw: st.DrawFn, hosts: st.SearchStrategy[str]) -> str:
    host = draw(hosts)
    port = draw(st.none() | ports)
    return host if port is None else f"{host}:{port}"


registries = with_optional_port(st.one_of(plain_hosts, ipv6_hosts))
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True)
digests = st.builds(
    lambda data, algorithm: str(Digest.of(data, algorithm)),
    st.binary(max_size=16),
    st.sampled_from(["sha256", "sha512"]),
)


@st.composite
def references(draw: st.DrawFn) -> Reference:
    registry = normalize_registry(draw(registries))
    repository = normalize_repository(registry, draw(repositories))
    assume(len(registry) + 1 + len(repository) <= 255)
    tag = draw(st.none() | tags)
    digest = draw(st.none() | digests)
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


@FAST
@given(references())
def test_references_round_trip_through_str(ref: Reference) -> None:
    text = str(ref)
    assert parse_reference(text) == ref
    # The default registry is irrelevant once the reference is fully qualified.
    assert parse_reference(text, default_registry="ghcr.io") == ref


@FAST
@given(repository=repositories, tag=st.none() | tags)
def test_familiar_hub_names_normalise(repository: str, tag: str | None) -> None:
    first, slash, _ = repository.partition("/")
    assume(not (slash and "." in first))  # that first component would be a registry
    text = repository if tag is None else f"{repository}:{tag}"
    ref = parse_reference(text)
    assert ref.registry == DOCKER_HUB
    assert ref.repository == normalize_repository(DOCKER_HUB, repository)
    assert ref.tag == (tag or "latest")
    assert parse_reference(f"docker.io/{text}") == ref
    assert parse_reference(f"index.docker.io/{text}") == ref


@FAST
@given(host=st.one_of(dotted_hosts, ipv4_hosts, st.just("localhost")), port=st.none() | ports)
def test_encode_decode_round_trip(host: str, port: str | None) -> None:
    registry = host if port is None else f"{host}:{port}"
    if port is None:
        # "foo.bar-1" reads as "foo.bar:1" unless configured; covered below.
        assume(re.search(r"-[0-9]+$", host) is None)
    encoded = encode_registry(registry)
    assert is_valid_repository(encoded)
    assert "/" not in encoded
    assert decode_registry_component(encoded) == normalize_registry(registry)


@FAST
@given(host=st.one_of(labels, dotted_hosts, ipv4_hosts), port=st.none() | ports)
def test_encode_decode_round_trip_with_known(host: str, port: str | None) -> None:
    # Any host, dotted or not, ambiguous or not, decodes once it is configured.
    registry = host if port is None else f"{host}:{port}"
    assert decode_registry_component(encode_registry(registry), [registry]) == (
        normalize_registry(registry)
    )


@FAST
@given(references(), st.sampled_from(["localhost:7439", "cache.example.com", "10.0.0.1:80"]))
def test_proxied_reference_round_trip(ref: Reference, proxy: str) -> None:
    assume(not ref.registry.startswith("["))  # IPv6 cannot be encoded; tested above
    encoded = encode_registry(ref.registry)
    # Too long once prefixed: covered by test_proxied_reference_rejects_overlong_result.
    assume(len(f"{proxy}/{encoded}/{ref.repository}") <= 255)
    proxied = proxied_reference(ref, proxy)
    through = parse_reference(proxied)
    assert through.registry == proxy
    first, _, rest = through.repository.partition("/")
    assert rest == ref.repository
    assert (through.tag, through.digest) == (ref.tag, ref.digest)
    if re.search(r"-[0-9]+$", ref.registry) is None:
        assert decode_registry_component(first) == ref.registry
    assert decode_registry_component(first, [ref.registry]) == ref.registry


fragments = st.sampled_from(
    [
        "a",
        "A",
        "z9",
        ":",
        "/",
        "@",
        ".",
        "_",
        "__",
        "-",
        "5000",
        "localhost",
        "docker.io",
        "index.docker.io",
        "library",
        "[",
        "]",
        "::1",
        "%",
        "sha256",
        SHA_F64,
        F64,
        "latest",
        "\n",
        "é",
    ]
)
referenceish_text = st.one_of(
    st.text(max_size=80),
    st.lists(fragments, max_size=10).map("".join),
)


@settings(max_examples=200, deadline=None)
@given(referenceish_text)
def test_arbitrary_text_only_raises_invalid_reference(text: str) -> None:
    for check in (is_valid_registry, is_valid_repository, is_valid_tag):
        assert isinstance(check(text), bool)
    decoded = decode_registry_component(text, ["myreg:5000", text])
    assert decoded is None or is_valid_registry(decoded)
    try:
        encoded = encode_registry(text)
    except InvalidReference:
        pass
    else:
        assert is_valid_repository(encoded)
        assert decode_registry_component(encoded, [text]) == normalize_registry(text)
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    except InvalidDigest as e:  # pragma: no cover - would be a bug
        raise AssertionError(f"digest error leaked for {text!r}") from e
    # Whatever is accepted renders to a reference that parses back to itself.
    if not _ambiguous(ref.registry):
        assert parse_reference(str(ref)) == ref
    assert len(ref.name) <= 255
