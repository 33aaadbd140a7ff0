"""containerd ``hosts.toml`` rendering and install/uninstall on a real directory tree."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from stowage.agent.mirror import (
    BACKUP_SUFFIX,
    DEFAULT_PROXY_URL,
    MANAGED_HEADER,
    MirrorConfigError,
    MirroredRegistry,
    host_directory,
    install,
    managed_files,
    render_hosts_toml,
    uninstall,
)

ORIGINAL = b'server = "https://registry.example"\n\n[host."https://other-mirror.example"]\n'


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: relative path -> (bytes, permission bits)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dirs(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


# --- parsing registries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "host", "server"),
    [
        ("docker.io", "docker.io", "https://registry-1.docker.io"),
        ("index.docker.io", "docker.io", "https://registry-1.docker.io"),
        ("https://registry-1.docker.io", "docker.io", "https://registry-1.docker.io"),
        ("ghcr.io", "ghcr.io", "https://ghcr.io"),
        ("Quay.IO", "quay.io", "https://quay.io"),
        ("registry.local:5000", "registry.local:5000", "https://registry.local:5000"),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://[fd00::1]:5000", "[fd00::1]:5000", "https://[fd00::1]:5000"),
        ("_default", "_default", None),
    ],
)
def test_parse_registry(spec: str, host: str, server: str | None) -> None:
    assert MirroredRegistry.parse(spec) == MirroredRegistry(host, server)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "ghcr.io/foo",
        "https://ghcr.io/v2",
        "ftp://ghcr.io",
        "https://user:pw@ghcr.io",
        "https://ghcr.io?x=1",
        "host:99999",
        "bad host",
        "http://docker.io",
        "../etc",
    ],
)
def test_parse_registry_rejects(spec: str) -> None:
    with pytest.raises(MirrorConfigError):
        MirroredRegistry.parse(spec)


# --- rendering ----------------------------------------------------------------------------


def test_render_mirrors_through_stowage_with_fallback_server() -> None:
    text = render_hosts_toml(MirroredRegistry.parse("docker.io"), "http://127.0.0.1:7439")
    assert text.startswith(MANAGED_HEADER)
    doc = tomllib.loads(text)
    assert doc == {
        "server": "https://registry-1.docker.io",
        "host": {
            "http://127.0.0.1:7439": {"capabilities": ["pull", "resolve"], "dial_timeout": "2s"}
        },
    }


def test_render_default_has_no_server() -> None:
    doc = tomllib.loads(render_hosts_toml(MirroredRegistry.parse("_default")))
    assert "server" not in doc
    assert list(doc["host"]) == [DEFAULT_PROXY_URL]


def test_render_options() -> None:
    registry = MirroredRegistry.parse("http://10.0.0.5:5000")
    doc = tomllib.loads(render_hosts_toml(registry, "https://stowage.local:8443/"))
    assert doc["server"] == "http://10.0.0.5:5000"
    assert doc["host"] == {
        "https://stowage.local:8443": {"capabilities": ["pull", "resolve"], "dial_timeout": "2s"}
    }


def test_render_escapes_toml_strings() -> None:
    weird = MirroredRegistry("reg.example", 'https://reg.example/"\\\n')
    assert tomllib.loads(render_hosts_toml(weird))["server"] == weird.server


@pytest.mark.parametrize(
    "proxy", ["127.0.0.1:7439", "ftp://127.0.0.1:7439", "http://127.0.0.1:7439/v2", "http://"]
)
def test_render_rejects_bad_proxy_url(proxy: str) -> None:
    with pytest.raises(MirrorConfigError):
        render_hosts_toml(MirroredRegistry.parse("ghcr.io"), proxy)


def test_host_directory_follows_containerd_lookup(tmp_path: Path) -> None:
    assert host_directory(tmp_path, "ghcr.io") == tmp_path / "ghcr.io"
    assert host_directory(tmp_path, "10.0.0.5:5000") == tmp_path / "10.0.0.5:5000"
    # containerd reads host_port_ before host:port when it exists.
    (tmp_path / "10.0.0.5_5000_").mkdir()
    assert host_directory(tmp_path, "10.0.0.5:5000") == tmp_path / "10.0.0.5_5000_"


# --- install / uninstall ------------------------------------------------------------------


def test_install_into_empty_dir_and_uninstall_leaves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "certs.d"
    changes = install(config, ["docker.io", "http://127.0.0.1:5000", "_default"])
    paths = {
        config / "docker.io" / "hosts.toml",
        config / "127.0.0.1:5000" / "hosts.toml",
        config / "_default" / "hosts.toml",
    }
    assert set(changes.written) == paths
    assert not changes.backed_up
    assert set(managed_files(config)) == paths
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        tomllib.loads(path.read_text())
    assert {p.name for p in config.rglob("*") if p.is_file()} == {"hosts.toml"}  # no temp files

    undone = uninstall(config)
    assert set(undone.removed) == paths
    assert not undone.restored
    assert list(config.iterdir()) == []


def test_install_is_idempotent(tmp_path: Path) -> None:
    install(tmp_path, ["docker.io", "ghcr.io"])
    before = _snapshot(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("hosts.toml")}
    again = install(tmp_path, ["ghcr.io", "docker.io", "index.docker.io"])
    assert not again.changed
    assert len(again.unchanged) == 2
    assert _snapshot(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("hosts.toml")} == mtimes


def test_backup_restore_round_trip(tmp_path: Path) -> None:
    original = tmp_path / "docker.io" / "hosts.toml"
    original.parent.mkdir()
    original.write_bytes(ORIGINAL)
    os.chmod(original, 0o600)
    (tmp_path / "docker.io" / "ca.crt").write_bytes(b"certificate")
    foreign = tmp_path / "quay.io" / "hosts.toml"
    foreign.parent.mkdir()
    foreign.write_bytes(b'server = "https://quay.io"\n')
    before = _snapshot(tmp_path)

    changes = install(tmp_path, ["docker.io"], "http://127.0.0.1:7439")
    backup = original.with_name("hosts.toml" + BACKUP_SUFFIX)
    assert changes.backed_up == [backup]
    assert changes.written == [original]
    assert backup.read_bytes() == ORIGINAL
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert original.read_bytes().startswith(MANAGED_HEADER.encode())
    assert foreign.read_bytes() == before["quay.io/hosts.toml"][0]  # not listed: untouched

    # Re-installing with another proxy rewrites stowage's file and keeps the first backup.
    changes = install(tmp_path, ["docker.io"], "http://127.0.0.1:7440")
    assert changes.written == [original] and not changes.backed_up
    assert backup.read_bytes() == ORIGINAL
    assert "127.0.0.1:7440" in original.read_text()

    undone = uninstall(tmp_path)
    assert undone.restored == [original]
    assert _snapshot(tmp_path) == before
    assert uninstall(tmp_path).changed is False  # nothing left to undo


def test_refuses_to_clobber_a_backup(tmp_path: Path) -> None:
    """A foreign file next to an older backup (someone replaced stowage's file): either
    could be the one to keep, so nothing at all is written."""
    path = tmp_path / "docker.io" / "hosts.toml"
    path.parent.mkdir()
    path.write_bytes(b'server = "https://edited-by-hand.example"\n')
    path.with_name("hosts.toml" + BACKUP_SUFFIX).write_bytes(ORIGINAL)
    before = _snapshot(tmp_path)
    dirs = _dirs(tmp_path)

    with pytest.raises(MirrorConfigError, match="refusing"):
        install(tmp_path, ["ghcr.io", "docker.io"])
    assert _snapshot(tmp_path) == before
    assert _dirs(tmp_path) == dirs  # ghcr.io was not written either

    # uninstall leaves the pair alone too, and says so.
    undone = uninstall(tmp_path)
    assert not undone.changed
    assert [p for p, _ in undone.skipped] == [path]
    assert _snapshot(tmp_path) == before


def test_install_resumes_after_a_crash_between_backup_and_write(tmp_path: Path) -> None:
    path = tmp_path / "ghcr.io" / "hosts.toml"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    path.with_name("hosts.toml" + BACKUP_SUFFIX).write_bytes(ORIGINAL)
    changes = install(tmp_path, ["ghcr.io"])
    assert changes.written == [path] and not changes.backed_up
    uninstall(tmp_path)
    assert _snapshot(tmp_path) == {"ghcr.io/hosts.toml": (ORIGINAL, 0o644)}


def test_install_releases_registries_no_longer_listed(tmp_path: Path) -> None:
    kept = tmp_path / "ghcr.io" / "hosts.toml"
    had_original = tmp_path / "docker.io" / "hosts.toml"
    had_original.parent.mkdir()
    had_original.write_bytes(ORIGINAL)
    install(tmp_path, ["docker.io", "ghcr.io", "quay.io"])

    changes = install(tmp_path, ["ghcr.io"])
    assert changes.restored == [had_original]
    assert changes.removed == [tmp_path / "quay.io" / "hosts.toml"]
    assert changes.unchanged == [kept]
    assert had_original.read_bytes() == ORIGINAL
    assert not (tmp_path / "quay.io").exists()
    assert managed_files(tmp_path) == [kept]


def test_uninstall_restores_a_backup_whose_file_was_deleted(tmp_path: Path) -> None:
    path = tmp_path / "docker.io" / "hosts.toml"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    install(tmp_path, ["docker.io"])
    path.unlink()
    assert uninstall(tmp_path).restored == [path]
    assert path.read_bytes() == ORIGINAL


def test_uninstall_keeps_directories_holding_other_files(tmp_path: Path) -> None:
    install(tmp_path, ["registry.local:5000"])
    cert = tmp_path / "registry.local:5000" / "ca.crt"
    cert.write_bytes(b"certificate")
    uninstall(tmp_path)
    assert _snapshot(tmp_path) == {"registry.local:5000/ca.crt": (b"certificate", 0o644)}


def test_install_rejects_conflicting_duplicates(tmp_path: Path) -> None:
    with pytest.raises(MirrorConfigError, match="twice"):
        install(tmp_path, ["http://10.0.0.5:5000", "https://10.0.0.5:5000"])
    assert not tmp_path.joinpath("10.0.0.5:5000").exists()


def test_install_writes_where_containerd_reads(tmp_path: Path) -> None:
    (tmp_path / "10.0.0.5_5000_").mkdir()
    changes = install(tmp_path, ["http://10.0.0.5:5000"])
    assert changes.written == [tmp_path / "10.0.0.5_5000_" / "hosts.toml"]


def test_uninstall_of_missing_dir_is_a_no_op(tmp_path: Path) -> None:
    assert not uninstall(tmp_path / "absent").changed
