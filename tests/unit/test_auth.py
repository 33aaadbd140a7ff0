import base64
import json
from pathlib import Path

import pytest

from stowage.upstream.auth import (
    AuthFileError,
    Credentials,
    load_auth_file,
    parse_challenge,
    registry_key,
)


def test_bearer_challenge_with_commas_in_scope() -> None:
    ch = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull,push"'
    )
    assert ch is not None
    assert ch.scheme == "bearer"
    assert ch.realm == "https://auth.docker.io/token"
    assert ch.params["service"] == "registry.docker.io"
    assert ch.params["scope"] == "repository:library/nginx:pull,push"


def test_basic_challenge_and_case() -> None:
    ch = parse_challenge('BASIC Realm="Registry Realm"')
    assert ch is not None
    assert ch.scheme == "basic"
    assert ch.params == {"realm": "Registry Realm"}


@pytest.mark.parametrize("header", ["", "   "])
def test_empty_challenge(header: str) -> None:
    assert parse_challenge(header) is None


def test_unquoted_values_and_garbage_items() -> None:
    ch = parse_challenge("Bearer realm=https://r/t, service=svc, junk")
    assert ch is not None
    assert ch.params == {"realm": "https://r/t", "service": "svc"}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
    ],
)
def test_registry_key(key: str, expected: str) -> None:
    assert registry_key(key) == expected


def test_auth_file_forms(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": base64.b64encode(b"alice:s3cr:et").decode()
                    },
                    "ghcr.io": {"username": "bob", "password": "pw"},
                    "quay.io": {"identitytoken": "tok"},
                    "empty.example": {},
                }
            }
        )
    )
    creds = load_auth_file(path)
    assert creds["docker.io"] == Credentials("alice", "s3cr:et")
    assert creds["ghcr.io"].basic() == "Basic " + base64.b64encode(b"bob:pw").decode()
    assert creds["quay.io"].identity_token == "tok"
    assert "empty.example" not in creds


def test_credentials_never_repr_secrets() -> None:
    text = repr(Credentials("alice", "hunter2", "idtok"))
    assert "hunter2" not in text and "idtok" not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not readable JSON"),
        ("[]", 'no "auths"'),
        ('{"auths": {"r": {"auth": "!!!"}}}', "not base64"),
        (
            '{"auths": {"r": {"auth": "' + base64.b64encode(b"nocolon").decode() + '"}}}',
            "not base64 of user:password",
        ),
        ('{"auths": {"r": 5}}', "not an object"),
    ],
)
def test_auth_file_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(AuthFileError, match=message):
        load_auth_file(path)


def test_missing_auth_file(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="does not exist"):
        load_auth_file(tmp_path / "nope.json")
