"""Test token issuer for Distribution's ``auth.token`` (Docker registry token spec).

Run standalone as a subprocess: ``python token_issuer.py --config issuer.json``. It must not
import anything from the test tree (it is executed by path, not as a package module).

Config JSON::

    {
      "listen": "127.0.0.1:PORT",
      "issuer": "stowage-test-issuer", "service": "stowage-test-registry",
      "signing_key": "token-signer.key", "signing_cert": "token-signer.pem",
      "tls_cert": null, "tls_key": null,            # serve HTTPS when both set
      "expires_in": 300,
      "events_file": "issuer-events.jsonl",         # one JSON line per token request
      "users": {"alice": {"password": "pw", "access": {"library/*": ["pull"]}}},
      "anonymous": {"public/*": ["pull"]}
    }

Access patterns are fnmatch globs over repository names; actions ``["*"]`` grant anything
requested. Like Docker Hub, a valid user asking for a scope it may not have still gets a
token, just without that access, so the registry is the one that denies (401).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import json
import logging
import secrets
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

# Combined log format (with placeholders for ident/user) so the harness parses it with the
# same regex as the registry's access log.
ACCESS_LOG_FORMAT = '%a - - %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"'


@dataclass
class Grant:
    type: str
    name: str
    actions: list[str]

    def to_claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": self.actions}


class Issuer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.users: dict[str, dict[str, Any]] = config.get("users", {})
        self.anonymous: dict[str, list[str]] = config.get("anonymous", {})
        self.expires_in = int(config.get("expires_in", 300))
        self.key = Path(config["signing_key"]).read_bytes()
        cert = x509.load_pem_x509_certificate(Path(config["signing_cert"]).read_bytes())
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.refresh_tokens: dict[str, str] = {}
        events = config.get("events_file")
        self.events_path = Path(events) if events else None

    # --- policy ---------------------------------------------------------------------------

    @staticmethod
    def _parse_scopes(values: list[str]) -> list[Grant]:
        grants = []
        for value in values:
            for scope in value.split():  # OAuth2 POST uses space-separated scopes
                typ, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")  # names may contain ':' (host:port)
                if typ and name:
                    grants.append(Grant(typ, name, [a for a in actions.split(",") if a]))
        return grants

    def _allowed(self, user: str | None, grant: Grant) -> list[str]:
        if grant.type != "repository":
            return []
        policy = self.anonymous if user is None else self.users[user].get("access", {})
        allowed: set[str] = set()
        for pattern, actions in policy.items():
            if fnmatch.fnmatchcase(grant.name, pattern):
                allowed.update(actions)
        if "*" in allowed:
            return list(grant.actions)
        return [a for a in grant.actions if a in allowed]

    def _check_password(self, user: str, password: str) -> bool:
        entry = self.users.get(user)
        return entry is not None and secrets.compare_digest(
            str(entry.get("password", "")).encode(), password.encode()
        )

    # --- token ------------------------------------------------------------------------------

    def _issue(self, user: str | None, service: str, requested: list[Grant]) -> dict[str, Any]:
        granted = []
        for g in requested:
            actions = self._allowed(user, g)
            if actions:
                granted.append(Grant(g.type, g.name, actions))
        now = int(time.time())
        claims = {
            "iss": self.config["issuer"],
            "sub": user or "",
            "aud": service or self.config["service"],
            "iat": now,
            # Small backdate: the registry rejects tokens whose nbf is in its future.
            "nbf": now - 10,
            "exp": now + self.expires_in,
            "jti": secrets.token_hex(16),
            "access": [g.to_claim() for g in granted],
        }
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"x5c": self.x5c})
        self._event(
            user=user,
            requested=[g.to_claim() for g in requested],
            granted=claims["access"],
        )
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }

    def _event(self, **fields: Any) -> None:
        if self.events_path is None:
            return
        with self.events_path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **fields}) + "\n")

    @staticmethod
    def _unauthorized(message: str) -> web.Response:
        body = {"errors": [{"code": "UNAUTHORIZED", "message": message}]}
        return web.json_response(
            body, status=401, headers={"WWW-Authenticate": 'Basic realm="stowage-test-issuer"'}
        )

    async def get_token(self, request: web.Request) -> web.Response:
        user: str | None = None
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return self._unauthorized("unsupported authorization scheme")
            try:
                name, _, password = base64.b64decode(value).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._unauthorized("malformed basic credentials")
            if not self._check_password(name, password):
                self._event(user=name, denied="bad credentials")
                return self._unauthorized("invalid username or password")
            user = name
        scopes = self._parse_scopes(request.query.getall("scope", []))
        body = self._issue(user, request.query.get("service", ""), scopes)
        if user is not None and request.query.get("offline_token") == "true":
            body["refresh_token"] = self._new_refresh(user)
        return web.json_response(body)

    def _new_refresh(self, user: str) -> str:
        token = secrets.token_urlsafe(24)
        self.refresh_tokens[token] = user
        return token

    async def post_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        service = str(form.get("service", ""))
        scopes = self._parse_scopes([str(s) for s in form.getall("scope", [])])
        refresh: str | None = None
        if grant_type == "password":
            user = str(form.get("username", ""))
            if not self._check_password(user, str(form.get("password", ""))):
                self._event(user=user, denied="bad credentials", grant_type=grant_type)
                return self._unauthorized("invalid username or password")
            if form.get("access_type") == "offline":
                refresh = self._new_refresh(user)
        elif grant_type == "refresh_token":
            refresh = str(form.get("refresh_token", ""))
            found = self.refresh_tokens.get(refresh)
            if found is None:
                self._event(denied="unknown refresh token", grant_type=grant_type)
                return self._unauthorized("invalid refresh token")
            user = found
        else:
            return web.json_response(
                {"error": "unsupported_grant_type", "grant_type": grant_type}, status=400
            )
        body = self._issue(user, service, scopes)
        body["scope"] = " ".join(
            f"{g['type']}:{g['name']}:{','.join(g['actions'])}"
            for g in jwt.decode(body["token"], options={"verify_signature": False})["access"]
        )
        if refresh is not None:
            body["refresh_token"] = refresh
        return web.json_response(body)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())

    # Access log to stdout, one line per request, flushed per record.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    issuer = Issuer(config)
    app = web.Application()
    app.router.add_get("/token", issuer.get_token)
    app.router.add_post("/token", issuer.post_token)
    app.router.add_get("/healthz", issuer.healthz)

    ssl_ctx = None
    if config.get("tls_cert") and config.get("tls_key"):
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(config["tls_cert"], config["tls_key"])
    host, _, port = config["listen"].rpartition(":")
    web.run_app(
        app,
        host=host,
        port=int(port),
        ssl_context=ssl_ctx,
        access_log_format=ACCESS_LOG_FORMAT,
        print=None,
        reuse_address=True,
    )


if __name__ == "__main__":
    main()
