"""OCI distribution error responses."""

from __future__ import annotations

import json

from aiohttp import web

# Marks an answer as a registry's (as Distribution does), e.g. for a child stowage.
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


class OCIError(Exception):
    """An error answered as ``{"errors": [{"code", "message"}]}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        # aiohttp omits the body of a HEAD response and keeps its length.
        body = json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()
        headers = {**API_VERSION, **self.headers}
        return web.Response(
            status=self.status, body=body, content_type="application/json", headers=headers
        )
