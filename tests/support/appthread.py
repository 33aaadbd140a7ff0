"""An in-test aiohttp server on 127.0.0.1 in its own thread and event loop, for upstreams
that misbehave on purpose (CDN redirects, oversized manifests, relays)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web

from tests.support.util import HarnessError, Service

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    path_qs: str
    headers: dict[str, str]


@dataclass
class ThreadedApp(Service):
    """Serves ``routes`` (method, path pattern, handler) on an ephemeral port and records
    every request it receives."""

    routes: Sequence[tuple[str, str, Handler]]
    name: str = "test-upstream"
    port: int = 0  # 0: an ephemeral port, known once started
    seen: list[SeenRequest] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, path_contains: str) -> int:
        return sum(1 for r in list(self.seen) if path_contains in r.path_qs)

    def start(self) -> Self:
        if self._thread is not None:
            return self
        started = threading.Event()
        error: list[BaseException] = []

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.seen.append(
                SeenRequest(request.method, request.path, request.path_qs, dict(request.headers))
            )
            return await handler(request)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application(middlewares=[record])
            for method, path, handler in self.routes:
                app.router.add_route(method, path, handler)
            # Short shutdown timeout: stop() must not hang on a handler that sleeps.
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
                loop.run_until_complete(site.start())
            except BaseException as exc:
                error.append(exc)
                loop.run_until_complete(runner.cleanup())
                loop.close()
                started.set()
                return
            self.port = int(runner.addresses[0][1])
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=self.name)
        self._thread.start()
        if not started.wait(10):
            raise HarnessError(f"{self.name} did not start within 10 s")
        if error:
            self._thread.join()
            self._thread = None
            raise HarnessError(f"{self.name} could not bind 127.0.0.1:{self.port}: {error[0]}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None
