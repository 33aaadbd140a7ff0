"""Real upstream registries: Debian's ``docker-registry`` (CNCF Distribution 2.8) on loopback.

Modes:
  * ``plain``  anonymous (HTTP by default, ``tls=True`` for HTTPS)
  * ``basic``  htpasswd (bcrypt) auth, HTTPS by default (credentials over plain HTTP are not
               what real registries do; ``tls=False`` is still possible)
  * ``token``  Docker token auth against ``token_issuer.py`` (HTTP by default, ``tls=True``
               puts both the registry and the issuer on HTTPS with the same CA)

Every request the registry serves is counted from its access log (see ``count``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import yaml

from tests.support import pki
from tests.support.regclient import RegistryClient
from tests.support.util import (
    AccessLogEntry,
    HarnessError,
    ManagedProcess,
    Service,
    count_entries,
    free_port,
    parse_access_log,
    port_open,
    wait_port_closed,
    wait_until,
)

Mode = Literal["plain", "basic", "token"]

# Push-capable account present in every auth mode, used by the harness to seed images.
ADMIN_USER = "harness-admin"
ADMIN_PASSWORD = "harness-admin-password"

TOKEN_ISSUER_NAME = "stowage-test-issuer"
TOKEN_SERVICE = "stowage-test-registry"

# Query marker for the log-sync request made by ``count``; excluded from counts.
_SYNC_MARKER = "harness-log-sync="

START_TIMEOUT = 20.0


def registry_binary() -> str:
    path = shutil.which("docker-registry") or shutil.which("registry")
    if path is None:
        raise HarnessError("docker-registry binary not found (apt-get install docker-registry)")
    return path


@dataclass
class TokenUser:
    """A token-mode user: password plus fnmatch repository globs -> allowed actions."""

    password: str
    access: dict[str, list[str]] = field(default_factory=lambda: {"*": ["*"]})


class TokenIssuer:
    """The ``token_issuer.py`` subprocess; normally owned by a token-mode ``Registry``."""

    script = Path(__file__).with_name("token_issuer.py")

    def __init__(
        self,
        workdir: Path,
        signing: pki.TokenSigningFiles,
        users: Mapping[str, TokenUser],
        anonymous: Mapping[str, list[str]],
        *,
        tls: pki.TLSFiles | None = None,
        expires_in: int = 300,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls
        self.access_log = workdir / "issuer-access.log"
        self.events_file = workdir / "issuer-events.jsonl"
        self.config_file = workdir / "issuer.json"
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "issuer": TOKEN_ISSUER_NAME,
            "service": TOKEN_SERVICE,
            "signing_key": str(signing.key_file),
            "signing_cert": str(signing.cert_file),
            "tls_cert": str(tls.cert_file) if tls else None,
            "tls_key": str(tls.key_file) if tls else None,
            "expires_in": expires_in,
            "events_file": str(self.events_file),
            "users": {n: {"password": u.password, "access": u.access} for n, u in users.items()},
            "anonymous": dict(anonymous),
        }
        self.config_file.write_text(json.dumps(config, indent=2))
        self.process = ManagedProcess(
            [sys.executable, str(self.script), "--config", str(self.config_file)],
            stdout_path=self.access_log,
            stderr_path=workdir / "issuer.log",
        )

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    def start(self) -> None:
        if self.process.running():
            return
        self.process.start()
        client = RegistryClient(self.url, ca_file=self.tls.ca_file if self.tls else None)

        def ready() -> bool:
            if not self.process.running():
                raise HarnessError(f"token issuer exited:\n{self.process.log_tail()}")
            if not port_open("127.0.0.1", self.port):
                return False
            return client.raw("GET", "/healthz").status == 200

        wait_until(ready, timeout=START_TIMEOUT, describe=self.process.log_tail)

    def stop(self) -> None:
        self.process.stop()

    def requests(self) -> list[AccessLogEntry]:
        return parse_access_log(self.access_log)

    def count(self, method: str = "*", path_contains: str = "/token") -> int:
        # aiohttp logs after the response is sent; a short settle avoids racing it.
        time.sleep(0.05)
        return count_entries(self.requests(), method, path_contains)

    def events(self) -> list[dict[str, Any]]:
        """Structured record of each token decision: user, requested and granted access."""
        if not self.events_file.exists():
            return []
        return [json.loads(line) for line in self.events_file.read_text().splitlines() if line]


class Registry(Service):
    """A Distribution registry subprocess on 127.0.0.1 with filesystem storage."""

    def __init__(
        self,
        mode: Mode = "plain",
        *,
        tls: bool | None = None,
        workdir: Path | None = None,
        port: int | None = None,
        users: Mapping[str, str | TokenUser] | None = None,
        anonymous: Mapping[str, list[str]] | None = None,
        token_expires_in: int = 300,
    ) -> None:
        """
        ``users``: basic mode -> {name: password}; token mode -> {name: password | TokenUser}
        (a bare password means full access). ``anonymous``: token mode repository globs that
        anonymous clients may access, e.g. ``{"public/*": ["pull"]}``.
        """
        self.mode: Mode = mode
        self.tls = (mode == "basic") if tls is None else tls
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"registry-{mode}-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.data_dir = workdir / "data"
        self.access_log = workdir / "access.log"  # registry stdout: combined-format access log
        self.log_file = workdir / "registry.log"  # registry stderr: logrus application log
        self.config_file = workdir / "config.yml"
        self.users: dict[str, str] = {ADMIN_USER: ADMIN_PASSWORD}
        self.token_issuer: TokenIssuer | None = None
        self.tls_files = pki.write_server_tls(workdir / "tls") if self.tls else None

        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},  # lets tests delete upstream manifests
                # Background purge would add log noise and timing variance.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                # Fixed secret: upload state stays valid across stop()/start().
                "secret": "stowage-harness-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.tls_files is not None:
            config["http"]["tls"] = {
                "certificate": str(self.tls_files.cert_file),
                "key": str(self.tls_files.key_file),
            }

        if mode == "basic":
            for name, pw in (users or {"alice": "alice-password"}).items():
                if isinstance(pw, TokenUser):
                    raise TypeError("basic mode takes {user: password}")
                self.users[name] = pw
            htpasswd = workdir / "htpasswd"
            htpasswd.write_text("".join(_htpasswd_line(n, p) for n, p in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "stowage-test", "path": str(htpasswd)}}
        elif mode == "token":
            token_users: dict[str, TokenUser] = {ADMIN_USER: TokenUser(ADMIN_PASSWORD)}
            for name, spec in (users or {}).items():
                token_users[name] = spec if isinstance(spec, TokenUser) else TokenUser(spec)
                self.users[name] = token_users[name].password
            signing = pki.write_token_signing(workdir / "token")
            self.token_issuer = TokenIssuer(
                workdir,
                signing,
                token_users,
                anonymous or {},
                tls=self.tls_files,
                expires_in=token_expires_in,
            )
            config["auth"] = {
                "token": {
                    "realm": self.token_issuer.realm,
                    "service": TOKEN_SERVICE,
                    "issuer": TOKEN_ISSUER_NAME,
                    "rootcertbundle": str(signing.root_bundle),
                }
            }
        elif mode != "plain":
            raise ValueError(f"unknown registry mode {mode!r}")

        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            [registry_binary(), "serve", str(self.config_file)],
            stdout_path=self.access_log,
            stderr_path=self.log_file,
        )

    # --- addressing -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def path_prefix(self) -> str:
        """Host in the form stowage uses as a route prefix: ``127.0.0.1-PORT``."""
        return self.host.replace(":", "-")

    @property
    def ca_file(self) -> Path | None:
        return self.tls_files.ca_file if self.tls_files else None

    @property
    def admin_credentials(self) -> tuple[str, str] | None:
        return None if self.mode == "plain" else (ADMIN_USER, ADMIN_PASSWORD)

    def client(self, username: str | None = None, password: str | None = None) -> RegistryClient:
        """HTTP client; defaults to admin credentials in auth modes, anonymous in plain mode."""
        if username is None and self.admin_credentials is not None:
            username, password = self.admin_credentials
        return RegistryClient(self.url, ca_file=self.ca_file, username=username, password=password)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start (or restart after stop/kill) on the same port with the same storage."""
        if self.token_issuer is not None:
            self.token_issuer.start()
        if self.process.running():
            return self
        if port_open("127.0.0.1", self.port):
            raise HarnessError(f"port {self.port} is busy; is a FaultServer still bound to it?")
        self.process.start()
        probe = RegistryClient(self.url, ca_file=self.ca_file, timeout=2)

        def ready() -> bool:
            if not self.process.running():
                raise HarnessError(f"docker-registry exited:\n{self.process.log_tail()}")
            if not port_open("127.0.0.1", self.port):
                return False
            try:
                # Any HTTP answer (200 anonymous, 401 with auth) means it's serving.
                return probe.raw("GET", f"/v2/?{_SYNC_MARKER}start").status in (200, 401)
            except OSError:
                return False

        wait_until(ready, timeout=START_TIMEOUT, describe=self.process.log_tail)
        return self

    def stop(self) -> None:
        """Graceful stop of the registry only (the token issuer keeps running)."""
        self.process.stop()
        wait_port_closed("127.0.0.1", self.port)

    def kill(self) -> None:
        self.process.kill()
        wait_port_closed("127.0.0.1", self.port)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop everything and remove the temp dir if we created it."""
        self.process.stop()
        if self.token_issuer is not None:
            self.token_issuer.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def running(self) -> bool:
        return self.process.running()

    # --- access log -----------------------------------------------------------------------

    def _sync_log(self) -> None:
        """Make sure lines for already-answered requests are on disk.

        The access logger writes its line after the handler returns, i.e. possibly after the
        client has read the full response. We send a marker request and wait until its line
        appears; earlier requests' lines were written before it. Skipped when not running.
        """
        if not self.process.running():
            return
        marker = f"{_SYNC_MARKER}{uuid.uuid4().hex}"
        try:
            RegistryClient(self.url, ca_file=self.ca_file, timeout=5).raw("GET", f"/v2/?{marker}")
        except OSError:
            time.sleep(0.1)
            return
        deadline = time.monotonic() + 5
        while marker not in self.access_log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise HarnessError("registry access log did not record the sync request")
            time.sleep(0.01)

    def requests(self, *, sync: bool = True) -> list[AccessLogEntry]:
        """All requests the registry received (across restarts), oldest first."""
        if sync:
            self._sync_log()
        return parse_access_log(self.access_log, ignore_uri_containing=_SYNC_MARKER)

    def checkpoint(self) -> int:
        """Number of requests so far; pass as ``since=`` to count only later ones."""
        return len(self.requests())

    def count(
        self, method: str, path_contains: str, *, status: int | None = None, since: int = 0
    ) -> int:
        """How many ``method`` requests (``"*"`` = any) whose URI contains ``path_contains``
        the registry actually received, optionally filtered by response status."""
        return count_entries(self.requests()[since:], method, path_contains, status)

    def blob_gets(self, digest: str, *, since: int = 0) -> int:
        return self.count("GET", f"/blobs/{digest}", since=since)

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)


def _htpasswd_line(user: str, password: str) -> str:
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise HarnessError("htpasswd not found (apt-get install apache2-utils)")
    # Distribution only accepts bcrypt entries.
    out = subprocess.run(
        [htpasswd, "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    return out.strip() + "\n"
