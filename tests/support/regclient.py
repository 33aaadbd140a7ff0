"""A small synchronous OCI distribution client (urllib) for the harness and for test assertions.

Deliberately independent of stowage's own upstream client, so tests never verify stowage with
stowage. Handles anonymous, Basic and Bearer-token (Docker token spec) auth.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
ACCEPT_ALL_MANIFESTS = ", ".join(ALL_MANIFEST_TYPES)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def ssl_context(ca_file: Path | str | None) -> ssl.SSLContext:
    if ca_file is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(ca_file))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects are surfaced as responses: tests may want to assert on them.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


@dataclass
class RegistryClient:
    base_url: str
    ca_file: Path | str | None = None
    username: str | None = None
    password: str | None = None
    follow_redirects: bool = True
    timeout: float = 30.0
    _tokens: dict[str, str] = field(default_factory=dict, repr=False)

    def _opener(self) -> urllib.request.OpenerDirector:
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=ssl_context(self.ca_file))
        ]
        if not self.follow_redirects:
            handlers.append(_NoRedirect())
        return urllib.request.build_opener(*handlers)

    def raw(
        self,
        method: str,
        url_or_path: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Response:
        """One HTTP exchange, no auth handling; non-2xx statuses are returned, not raised."""
        url = url_or_path if "://" in url_or_path else self.base_url.rstrip("/") + url_or_path
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        try:
            with self._opener().open(req, timeout=self.timeout) as resp:
                return Response(resp.status, resp.headers, resp.read(), resp.url)
        except urllib.error.HTTPError as e:
            body = e.read() if e.fp is not None else b""
            return Response(e.code, e.headers, body, url)

    def _basic(self) -> str | None:
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def fetch_token(self, realm: str, service: str | None, scopes: list[str]) -> Response:
        query: list[tuple[str, str]] = []
        if service:
            query.append(("service", service))
        query += [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        return self.raw("GET", url, headers)

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Response:
        """Like ``raw`` but answers a 401 challenge once (Basic or Bearer) and retries."""
        hdrs = dict(headers or {})
        cached = self._tokens.get(path)
        if cached:
            hdrs["Authorization"] = cached
        resp = self.raw(method, path, hdrs, data)
        if resp.status != 401:
            return resp
        challenge = resp.header("WWW-Authenticate")
        if not challenge:
            return resp
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            basic = self._basic()
            if basic is None:
                return resp
            auth = basic
        elif scheme == "bearer":
            scopes = [params["scope"]] if params.get("scope") else []
            token_resp = self.fetch_token(params["realm"], params.get("service"), scopes)
            if token_resp.status != 200:
                return resp
            body = token_resp.json()
            auth = "Bearer " + (body.get("token") or body["access_token"])
        else:
            return resp
        self._tokens[path] = auth
        hdrs["Authorization"] = auth
        return self.raw(method, path, hdrs, data)

    # --- registry helpers -----------------------------------------------------------------

    def ping(self) -> Response:
        return self.request("GET", "/v2/")

    def get_manifest(
        self,
        repository: str,
        reference: str,
        accept: str = ACCEPT_ALL_MANIFESTS,
        method: str = "GET",
    ) -> Response:
        return self.request(method, f"/v2/{repository}/manifests/{reference}", {"Accept": accept})

    def get_blob(self, repository: str, digest: str, method: str = "GET") -> Response:
        return self.request(method, f"/v2/{repository}/blobs/{digest}")

    def delete_manifest(self, repository: str, digest: str) -> Response:
        return self.request("DELETE", f"/v2/{repository}/manifests/{digest}")

    def list_tags(self, repository: str) -> Response:
        return self.request("GET", f"/v2/{repository}/tags/list")
