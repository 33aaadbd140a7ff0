"""Cache administration over HTTP for the operator: pin an image, release it.

Off unless ``--admin-token-file`` is given; every call carries that token as a bearer
token. Routes (``image`` is a reference, normalised like ``docker pull`` does):

- ``PUT /_stowage/v1/pins?image=REF``: never evict REF (as ``stowage cache pin``).
- ``DELETE /_stowage/v1/pins?image=REF``: evictable again (as ``stowage cache unpin``).
- ``POST /_stowage/v1/release?image=REF``: unpin and drop REF's names; garbage collection
  reclaims what no other name reaches after ``--gc-grace``.
"""

from __future__ import annotations

import contextlib
import hmac
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from stowage.oci.reference import InvalidReference, Reference, parse_reference
from stowage.proxy.errors import OCIError
from stowage.store.gc import pin, unpin
from stowage.store.index import Index

PREFIX = "/_stowage/v1"


class AdminTokenError(ValueError):
    """The admin token file cannot be used; the message names the problem."""


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AdminTokenError(f"--admin-token-file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise AdminTokenError(f"--admin-token-file {path}: token shorter than 16 characters")
    return token


class Admin:
    def __init__(self, index: Index, token: str | None) -> None:
        self.index = index
        self.token = token

    def routes(self, app: web.Application) -> None:
        app.router.add_put(f"{PREFIX}/pins", self.pin)
        app.router.add_delete(f"{PREFIX}/pins", self.unpin)
        app.router.add_post(f"{PREFIX}/release", self.release)

    def _check(self, request: web.Request) -> Reference:
        if self.token is None:
            raise OCIError(404, "NOT_FOUND", "cache administration is off (--admin-token-file)")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise OCIError(
                401,
                "UNAUTHORIZED",
                "cache administration needs the admin token",
                headers={"WWW-Authenticate": 'Bearer realm="stowage-admin"'},
            )
        image = request.query.get("image", "")
        try:
            return parse_reference(image)
        except InvalidReference as exc:
            raise OCIError(400, "NAME_INVALID", f"image: {exc}") from None

    async def pin(self, request: web.Request) -> web.Response:
        ref = self._check(request)
        with _index_write():
            added = pin(self.index.db, ref.registry, ref.repository, ref.ref)
        return web.json_response({"image": str(ref), "pinned": True, "changed": added})

    async def unpin(self, request: web.Request) -> web.Response:
        ref = self._check(request)
        with _index_write():
            removed = unpin(self.index.db, ref.registry, ref.repository, ref.ref)
        return web.json_response({"image": str(ref), "pinned": False, "changed": removed})

    async def release(self, request: web.Request) -> web.Response:
        ref = self._check(request)
        with _index_write():
            unpin(self.index.db, ref.registry, ref.repository, ref.ref)
            self.index.release(ref.registry, ref.repository, ref.tag, ref.digest)
        return web.json_response({"image": str(ref), "released": True})


@contextlib.contextmanager
def _index_write() -> Iterator[None]:
    """A write the index refuses (disk full, locked past its timeout) is the caller's to
    retry: 503 with the reason, never a 500."""
    try:
        yield
    except sqlite3.Error as exc:
        raise OCIError(503, "UNAVAILABLE", f"cache index cannot be written now: {exc}") from None
