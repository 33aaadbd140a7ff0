"""``FaultServer``: stands in for a broken upstream on a given port.

Runs an aiohttp server on its own event loop in a background thread, so it works the same from
sync tests and from pytest-asyncio tests (whose loop it never touches). Typical use::

    registry.stop()
    with FaultServer(registry.port, status=503) as fault:
        ...  # stowage now sees 503 from "the registry"
    registry.start()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self

from aiohttp import web

from tests.support.appthread import ThreadedApp
from tests.support.util import Service, free_port


@dataclass(frozen=True)
class FaultRequest:
    method: str
    path_qs: str
    headers: dict[str, str]


class FaultServer(Service):
    def __init__(
        self,
        port: int | None = None,
        *,
        status: int = 500,
        headers: Mapping[str, str] | None = None,
        body: bytes | str = b"",
        delay: float = 0.0,
    ) -> None:
        """``delay`` seconds are waited before answering (for timeout tests)."""
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._requests: list[FaultRequest] = []
        self.set_response(status, headers=headers, body=body, delay=delay)
        self._app = ThreadedApp(
            [("*", "/{tail:.*}", self._handle)], name=f"FaultServer:{self.port}", port=self.port
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_response(
        self,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | str = b"",
        delay: float = 0.0,
    ) -> None:
        """Change the canned answer while running (e.g. 429 first, then 500)."""
        if status == 429 and headers is None:
            headers = {"Retry-After": "1"}
        with self._lock:
            self.status = status
            self.headers = dict(headers or {})
            self.body = body.encode() if isinstance(body, str) else body
            self.delay = delay

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._requests.append(
                FaultRequest(request.method, request.path_qs, dict(request.headers))
            )
            status, headers, body, delay = self.status, self.headers, self.body, self.delay
        if delay:
            await asyncio.sleep(delay)
        # HEAD responses must not carry a body.
        return web.Response(
            status=status, headers=headers, body=None if request.method == "HEAD" else body
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        self._app.start()
        return self

    def stop(self) -> None:
        self._app.stop()

    # --- observation ----------------------------------------------------------------------

    @property
    def requests(self) -> list[FaultRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def count(self, method: str = "*", path_contains: str = "") -> int:
        method = method.upper()
        return sum(
            1
            for r in self.requests
            if (method == "*" or r.method == method) and path_contains in r.path_qs
        )

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
