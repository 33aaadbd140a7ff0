"""containerd mirror mode: ``hosts.toml`` files that send pulls through the node's stowage.

containerd (1.5 and later; the CRI plugin's ``registry.config_path``, or ``ctr
--hosts-dir``) reads ``<config_path>/<registry host>/hosts.toml`` at every pull, falling
back to ``<config_path>/_default/hosts.toml`` when the registry has no directory; no restart
is needed. For each mirrored registry stowage writes::

    server = "https://registry-1.docker.io"      # the registry itself (none for _default)

    [host."http://127.0.0.1:7439"]               # the node's stowage, tried first
      capabilities = ["pull", "resolve"]
      dial_timeout = "2s"

containerd sends requests for the mirror host with ``?ns=<registry>`` appended (it does so
for any host entry whose host differs from the reference's registry), which is how stowage
knows the upstream; digests are untouched. When the mirror fails (refused, error status,
404), containerd tries the next host, finally ``server``. containerd 1.6 and 1.7.0 ignore
``dial_timeout`` (later releases honour it; 1.6 dials for up to 30 s): stowage listens on
loopback, so a stopped stowage refuses at once and the fallback is immediate either way.
A stowage that accepts connections but never answers stalls pulls instead: containerd 1.6
has no response timeout, so nothing makes it fall back.

``install`` is idempotent and reconciles: it writes the files for the given registries,
backs up a file it replaces once (``hosts.toml.stowage-backup``), and releases managed
files of registries no longer listed. ``uninstall`` restores the backups and deletes only
files stowage wrote. Files stowage wrote start with ``MANAGED_HEADER``. Writes are atomic
(temporary file, fsync, rename), so containerd never reads half a file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from stowage.oci.reference import DOCKER_HUB, api_host, is_valid_registry, normalize_registry

DEFAULT_PROXY_URL = "http://127.0.0.1:7439"
DEFAULT_DIAL_TIMEOUT = "2s"
DEFAULT_HOST = "_default"  # containerd's directory for registries without their own
HOSTS_FILE = "hosts.toml"
BACKUP_SUFFIX = ".stowage-backup"
MANAGED_HEADER = "# Managed by stowage"

# A Go duration as containerd parses it (time.ParseDuration), e.g. "2s", "500ms", "1m30s".


class MirrorConfigError(Exception):
    """Bad mirror configuration, or a file layout stowage refuses to touch."""


@dataclass(frozen=True)
class MirroredRegistry:
    """A registry whose pulls go through stowage: ``host`` is the directory containerd
    looks up (normalised registry host, or ``_default``), ``server`` the registry's own
    URL containerd falls back to (None for ``_default``: containerd's default per
    registry — https, plain HTTP for localhost, registry-1.docker.io for docker.io)."""

    host: str
    server: str | None

    @classmethod
    def parse(cls, spec: str) -> MirroredRegistry:
        """``docker.io``, ``ghcr.io``, ``registry.local:5000``, ``_default``; a scheme picks
        how containerd reaches the registry itself: ``http://10.0.0.5:5000`` (plain HTTP),
        ``https://…`` (the default). Raises MirrorConfigError."""
        text = spec.strip()
        if text == DEFAULT_HOST:
            return cls(DEFAULT_HOST, None)
        scheme = "https"
        if "://" in text:
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
                raise MirrorConfigError(
                    f"mirrored registry {spec!r}: expected HOST[:PORT], http://HOST[:PORT] "
                    "or https://HOST[:PORT]"
                )
            if parts.query or parts.fragment or parts.username or parts.password:
                raise MirrorConfigError(f"mirrored registry {spec!r}: only a scheme and host")
            scheme, text = parts.scheme, parts.netloc
        if not is_valid_registry(text):
            raise MirrorConfigError(f"mirrored registry {spec!r} is not a registry host")
        host = normalize_registry(text)
        if host == DOCKER_HUB and scheme == "http":
            raise MirrorConfigError("Docker Hub is only reached over HTTPS")
        return cls(host, f"{scheme}://{api_host(host)}")


@dataclass
class MirrorChanges:
    """What ``install``/``uninstall`` did, file by file."""

    written: list[Path] = field(default_factory=list)  # hosts.toml stowage (re)wrote
    unchanged: list[Path] = field(default_factory=list)  # already as wanted
    backed_up: list[Path] = field(default_factory=list)  # originals saved (backup paths)
    restored: list[Path] = field(default_factory=list)  # originals put back
    removed: list[Path] = field(default_factory=list)  # stowage's files deleted
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # left alone, and why

    @property
    def changed(self) -> bool:
        return bool(self.written or self.backed_up or self.restored or self.removed)


# --- rendering (pure) ---------------------------------------------------------------------


def render_hosts_toml(registry: MirroredRegistry, proxy_url: str = DEFAULT_PROXY_URL) -> str:
    """The ``hosts.toml`` that mirrors ``registry`` through ``proxy_url``."""
    proxy = validate_proxy_url(proxy_url)
    subject = (
        registry.host
        if registry.server is not None
        else "registries without a directory of their own"
    )
    lines = [
        f"{MANAGED_HEADER} (mirror mode). Do not edit: changes are overwritten.",
        f"# Pulls from {subject} try the node's stowage first;",
        "# containerd falls back to the registry when stowage does not answer. A file this one",
        f"# replaced is kept beside it as {HOSTS_FILE}{BACKUP_SUFFIX} and put back when the",
        "# mirror is uninstalled.",
    ]
    if registry.server is not None:
        lines += ["", f"server = {_toml_str(registry.server)}"]
    lines += [
        "",
        f"[host.{_toml_str(proxy)}]",
        '  capabilities = ["pull", "resolve"]',
        f"  dial_timeout = {_toml_str(DEFAULT_DIAL_TIMEOUT)}",
    ]
    return "\n".join(lines) + "\n"


def validate_proxy_url(url: str) -> str:
    """``http(s)://HOST:PORT`` without path; returned without a trailing slash."""
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
        or not is_valid_registry(parts.netloc)
    ):
        raise MirrorConfigError(f"proxy URL {url!r}: expected http://HOST:PORT")
    return f"{parts.scheme}://{parts.netloc}"


def host_directory(config_path: Path, host: str) -> Path:
    """The directory containerd reads for ``host``.

    containerd tries ``host_port_`` before ``host:port`` (its Windows-safe spelling); when
    the former exists it is the one in use, so it is the one to write. Otherwise
    ``host:port`` is used, as containerd's documentation spells it.
    """
    idx = host.rfind(":")
    if idx > 0:
        alternate = config_path / f"{host[:idx]}_{host[idx + 1 :]}_"
        if alternate.is_dir():
            return alternate
    return config_path / host


def is_managed(content: bytes) -> bool:
    return content.startswith(MANAGED_HEADER.encode())


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# --- install / uninstall ------------------------------------------------------------------


def install(
    config_path: Path,
    registries: Iterable[MirroredRegistry | str],
    proxy_url: str = DEFAULT_PROXY_URL,
) -> MirrorChanges:
    """Mirror ``registries`` through ``proxy_url`` under containerd's ``config_path``.

    Idempotent. A file that is not stowage's is backed up once before it is replaced;
    when a backup already exists beside such a file (someone replaced stowage's file after
    an install) nothing is written at all and MirrorConfigError is raised: either copy
    could be the one to keep. Managed files of registries no longer listed are released
    as ``uninstall`` does.
    """
    wanted: dict[str, MirroredRegistry] = {}
    for item in registries:
        registry = MirroredRegistry.parse(item) if isinstance(item, str) else item
        previous = wanted.setdefault(registry.host, registry)
        if previous != registry:
            raise MirrorConfigError(
                f"registry {registry.host} listed twice: {previous.server} and {registry.server}"
            )

    plan: list[tuple[Path, bytes]] = []
    for host, registry in wanted.items():
        path = host_directory(config_path, host) / HOSTS_FILE
        text = render_hosts_toml(registry, proxy_url)
        plan.append((path, text.encode()))

    # Check every file before touching any, so a refusal leaves the directory as it was.
    for path, _ in plan:
        current = _read(path)
        backup = _read(_backup_path(path))
        if current is not None and not is_managed(current) and backup not in (None, current):
            raise MirrorConfigError(
                f"{path} is not stowage's and {_backup_path(path).name} beside it holds other "
                "content; refusing to overwrite either (move one away and retry)"
            )

    changes = MirrorChanges()
    for path, content in plan:
        current = _read(path)
        if current == content:
            changes.unchanged.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if current is not None and not is_managed(current):
            backup_path = _backup_path(path)
            if not backup_path.exists():
                _write_atomic(backup_path, current, _mode(path))
                changes.backed_up.append(backup_path)
        _write_atomic(path, content, 0o644)
        changes.written.append(path)

    keep = {path for path, _ in plan}
    for path in _hosts_files(config_path):
        if path not in keep:
            _release(path, changes)
    return changes


def uninstall(config_path: Path) -> MirrorChanges:
    """Undo ``install``: put backed-up files back, delete the other files stowage wrote.

    A file that is not stowage's is never touched (its backup, if any, is left too and
    reported in ``skipped``).
    """
    changes = MirrorChanges()
    for path in _hosts_files(config_path):
        _release(path, changes)
    return changes


def managed_files(config_path: Path) -> list[Path]:
    """The ``hosts.toml`` files under ``config_path`` that stowage wrote."""
    return [p for p in _hosts_files(config_path) if is_managed(_read(p) or b"")]


def _release(path: Path, changes: MirrorChanges) -> None:
    current = _read(path)
    backup = _backup_path(path)
    if current is not None and not is_managed(current):
        if backup.exists():
            changes.skipped.append((path, f"not stowage's; {backup.name} left in place"))
        return
    if backup.exists():
        # Ours (or deleted since): the original goes back, atomically.
        os.replace(backup, path)
        _fsync_dir(path.parent)
        changes.restored.append(path)
        return
    if current is None:
        return
    path.unlink()
    _fsync_dir(path.parent)
    changes.removed.append(path)
    # The directory goes only when nothing else is in it (containerd also reads
    # certificates from host directories, and someone else may have created it).
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _hosts_files(config_path: Path) -> list[Path]:
    """``<dir>/hosts.toml`` one level below config_path for every dir holding that file or
    its backup (the file itself may be missing)."""
    if not config_path.is_dir():
        return []
    found: set[Path] = set()
    for entry in config_path.iterdir():
        if not entry.is_dir():
            continue
        if (entry / HOSTS_FILE).is_file() or (entry / (HOSTS_FILE + BACKUP_SUFFIX)).is_file():
            found.add(entry / HOSTS_FILE)
    return sorted(found)


def _backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_atomic(path: Path, content: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
