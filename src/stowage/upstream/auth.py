"""Upstream credentials and the registry auth challenge grammar.

No maintained Python library parses ``WWW-Authenticate`` challenges as
registries send them (scopes contain commas inside quotes), so this stays a
small, tested module built on the standard library's list parsers.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stowage.oci.reference import normalize_registry


class AuthFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None

    def basic(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        return f"Credentials(username={self.username!r}, secret=<redacted>)"


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` value such as
    ``Bearer realm="https://auth/token",service="reg",scope="repository:a/b:pull,push"``.
    Returns None for an unusable header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for item in urllib.request.parse_http_list(rest):
        key, sep, value = item.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        params[key.strip().lower()] = value
    return Challenge(scheme.lower(), params)


def registry_key(name: str) -> str:
    """Normalise an ``auths`` key: ``https://index.docker.io/v1/`` -> ``docker.io``."""
    host = name.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0]
    return normalize_registry(host)


def load_auth_file(path: Path) -> dict[str, Credentials]:
    """Read a docker ``config.json``-style file into credentials per registry."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AuthFileError(f"auth file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise AuthFileError(f"auth file {path} is not readable JSON: {exc}") from exc
    return parse_auth_config(doc, f"auth file {path}")


def parse_auth_config(doc: Any, where: str) -> dict[str, Credentials]:
    """Credentials per registry from a docker ``config.json`` document (``auths`` →
    ``auth`` base64 user:password, or ``username``/``password``, or ``identitytoken``).
    Raises AuthFileError naming ``where`` and the problem."""
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise AuthFileError(f'{where} has no "auths" object')
    result: dict[str, Credentials] = {}
    for name, entry in auths.items():
        if not isinstance(entry, dict):
            raise AuthFileError(f"{where}: entry for {name!r} is not an object")
        username = entry.get("username")
        password = entry.get("password")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise AuthFileError(
                    f"{where}: 'auth' for {name!r} is not base64 of user:password"
                ) from exc
            username, sep, password = decoded.partition(":")
            if not sep:
                raise AuthFileError(f"{where}: 'auth' for {name!r} is not base64 of user:password")
        token = entry.get("identitytoken") or None
        if username is None and token is None:
            continue
        result[registry_key(name)] = Credentials(username, password, token)
    return result
