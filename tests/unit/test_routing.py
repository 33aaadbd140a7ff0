import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stowage.proxy.errors import OCIError
from stowage.proxy.routing import parse_route

DIGEST = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("tail", "ns", "expected"),
    [
        (
            "127.0.0.1-5000/library/app/manifests/1",
            None,
            ("127.0.0.1:5000", "library/app", "manifests", "1", False),
        ),
        (
            "docker.io/nginx/manifests/latest",
            None,
            ("docker.io", "library/nginx", "manifests", "latest", False),
        ),
        (
            "index.docker.io/library/nginx/manifests/latest",
            None,
            ("docker.io", "library/nginx", "manifests", "latest", False),
        ),
        (
            "registry-1.docker.io/nginx/manifests/latest",
            None,
            ("docker.io", "library/nginx", "manifests", "latest", False),
        ),
        ("ghcr.io/org/app/blobs/" + DIGEST, None, ("ghcr.io", "org/app", "blobs", DIGEST, False)),
        ("localhost-5000/app/tags/list", None, ("localhost:5000", "app", "tags", "", False)),
        (
            "library/app/manifests/1",
            "127.0.0.1:5000",
            ("127.0.0.1:5000", "library/app", "manifests", "1", True),
        ),
        ("nginx/manifests/1", "docker.io", ("docker.io", "library/nginx", "manifests", "1", True)),
        ("nginx/manifests/1", None, ("docker.io", "library/nginx", "manifests", "1", False)),
        ("org/app/manifests/1", None, ("docker.io", "org/app", "manifests", "1", False)),
        # a repository may itself contain "manifests"
        (
            "ghcr.io/a/manifests/b/manifests/2",
            None,
            ("ghcr.io", "a/manifests/b", "manifests", "2", False),
        ),
    ],
)
def test_routes(tail: str, ns: str | None, expected: tuple[str, str, str, str, bool]) -> None:
    r = parse_route(tail, ns, "docker.io")
    assert (r.registry, r.repository, r.kind, r.reference, r.mirror) == expected


def test_known_registry_without_dot() -> None:
    r = parse_route("myreg-5000/app/manifests/1", None, "docker.io", {"myreg:5000"})
    assert (r.registry, r.repository) == ("myreg:5000", "app")
    r = parse_route("myreg-5000/app/manifests/1", None, "docker.io")
    assert (r.registry, r.repository) == ("docker.io", "myreg-5000/app")


@pytest.mark.parametrize(
    ("tail", "ns", "status", "code"),
    [
        ("foo/bar", None, 404, "NAME_UNKNOWN"),
        ("/manifests/1", None, 400, "NAME_INVALID"),
        ("Upper/manifests/1", None, 400, "NAME_INVALID"),
        ("ghcr.io/../x/manifests/1", None, 400, "NAME_INVALID"),
        ("app/manifests/1", "not a host!", 400, "NAME_INVALID"),
        ("app/blobs/", None, 404, "NAME_UNKNOWN"),
    ],
)
def test_bad_routes(tail: str, ns: str | None, status: int, code: str) -> None:
    with pytest.raises(OCIError) as info:
        parse_route(tail, ns, "docker.io")
    assert (info.value.status, info.value.code) == (status, code)


@settings(max_examples=200)
@given(st.text(max_size=80), st.one_of(st.none(), st.text(max_size=20)))
def test_arbitrary_paths_give_a_route_or_an_oci_error(tail: str, ns: str | None) -> None:
    try:
        r = parse_route(tail, ns, "docker.io")
    except OCIError as exc:
        assert exc.status in (400, 404)
    else:
        assert r.kind in ("manifests", "blobs", "tags")
        assert ".." not in r.repository
