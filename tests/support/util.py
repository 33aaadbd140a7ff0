"""Process, port and log helpers shared by the harness modules."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeVar

T = TypeVar("T")


class Service:
    """Context-manager protocol for harness services: ``with X(...) as x``
    starts it and always tears it down (``close`` defaults to ``stop``)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class HarnessError(RuntimeError):
    """A harness process failed to start or behave; message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Racy by nature, but fine on an otherwise idle loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a plain-HTTP GET of ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def wait_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while port_open(host, port):
        if time.monotonic() > deadline:
            raise HarnessError(f"{host}:{port} still accepting connections after {timeout}s")
        time.sleep(0.05)


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.05,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``check`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting. {describe()}".strip())
        time.sleep(interval)


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "<no log>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# Processes still alive when the interpreter exits (e.g. a fixture crashed before teardown)
# get killed so they do not hold ports or leak into the next test run.
_live: set[ManagedProcess] = set()


@atexit.register
def _reap_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()


class ManagedProcess:
    """A child process whose stdout/stderr go to files (appended across restarts)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdout_path: Path,
        stderr_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.stdout_path = stdout_path
        # Default: both streams in one file, so error tails show everything in order.
        self.stderr_path = stderr_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running():
            raise HarnessError(f"already running: {self.argv[0]}")
        out = self.stdout_path.open("ab")
        self._files = [out]
        err: IO[bytes] | int = subprocess.STDOUT
        if self.stderr_path is not None:
            err_file = self.stderr_path.open("ab")
            self._files.append(err_file)
            err = err_file
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=self.cwd,
            # Own process group: a Ctrl-C aimed at pytest should not race our orderly shutdown.
            start_new_session=True,
        )
        _live.add(self)

    def _close_files(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files = []

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_files()
        _live.discard(self)
        return self.proc.returncode

    def kill(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(5)
        self._close_files()
        _live.discard(self)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        parts = [tail(self.stdout_path, lines)]
        if self.stderr_path is not None:
            parts.append(tail(self.stderr_path, lines))
        return "\n".join(parts)


# --- access logs --------------------------------------------------------------------------

# Apache "combined" format, written by Distribution's gorilla/handlers access logger (stdout)
# and by aiohttp's default access_log_format:
#   127.0.0.1 - - [22/Nov/2026:21:48:23 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_COMBINED = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]*)" (?P<status>\d{3}) (?P<size>\S+)'
)


@dataclass(frozen=True)
class AccessLogEntry:
    remote: str
    method: str
    uri: str  # path plus query string, as sent
    status: int
    size: int | None
    user: str  # "-" unless the server fills in the authenticated user


def parse_access_log(
    path: Path, *, ignore_uri_containing: str | None = None
) -> list[AccessLogEntry]:
    if not path.exists():
        return []
    entries: list[AccessLogEntry] = []
    for line in path.read_text(errors="replace").splitlines():
        m = _COMBINED.match(line)
        if not m:
            continue
        if ignore_uri_containing and ignore_uri_containing in m["uri"]:
            continue
        size = m["size"]
        entries.append(
            AccessLogEntry(
                remote=m["remote"],
                method=m["method"],
                uri=m["uri"],
                status=int(m["status"]),
                size=int(size) if size.isdigit() else None,
                user=m["user"],
            )
        )
    return entries


def count_entries(
    entries: Sequence[AccessLogEntry],
    method: str,
    path_contains: str,
    status: int | None = None,
) -> int:
    method = method.upper()
    return sum(
        1
        for e in entries
        if (method == "*" or e.method == method)
        and path_contains in e.uri
        and (status is None or e.status == status)
    )
