"""Mirror mode end to end: ``stowage.agent.mirror.install`` writes the hosts.toml files, the
CRI plugin of a real containerd (1.6, config_path = the test's hosts dir) pulls through
stowage, falls back to the registry when stowage is down, and ``uninstall`` restores the
original files."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from stowage.agent.cri import CRIClient
from stowage.agent.mirror import BACKUP_SUFFIX, install, managed_files, uninstall
from tests.conftest import SampleImages, StowageFactory
from tests.support.containerd import Containerd, write_hosts_toml
from tests.support.images import PushedImage
from tests.support.registry import Registry
from tests.support.stowage import Stowage

pytestmark = pytest.mark.integration

# Distribution's access log is in combined format; the last field is the User-Agent.
_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" \d{3} \S+ "[^"]*" "(?P<ua>[^"]*)"')


class AccessLog:
    """Who (by User-Agent) asked the registry for what, from a mark on."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.mark = len(self._lines())

    def _lines(self) -> list[str]:
        self.registry.requests()  # flushes the log up to now
        return self.registry.access_log.read_text(errors="replace").splitlines()

    def agents(self, uri_contains: str) -> list[str]:
        found = []
        for line in self._lines()[self.mark :]:
            m = _REQUEST.search(line)
            if m and uri_contains in m["uri"]:
                found.append(m["ua"])
        return found


def _request_logs(stowage: Stowage) -> list[dict[str, Any]]:
    out = []
    for line in stowage.log_text().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == "request":
            out.append(obj)
    return out


async def _pull(cri: CRIClient, ref: str, image: PushedImage, name: str) -> None:
    """CRI pull; the image is the upstream's: same config (id) and manifest digest."""
    image_id = await cri.pull_image(ref, deadline=60)
    assert image_id == image.config_digest
    [listed] = [i for i in await cri.list_images() if i.id == image_id]
    assert f"{name}@{image.manifest_digest}" in listed.repo_digests


async def test_cri_pull_goes_through_stowage_and_falls_back(
    containerd: Containerd,
    registry: Registry,
    images: SampleImages,
    stowage_factory: StowageFactory,
) -> None:
    hosts = containerd.hosts_dir
    # The node's own configuration for this registry, which stowage must give back.
    original = write_hosts_toml(hosts, registry.host)
    original_bytes = original.read_bytes()
    stowage = stowage_factory(upstreams=[registry])

    changes = install(hosts, [f"http://{registry.host}"], stowage.url)
    backup = original.with_name(original.name + BACKUP_SUFFIX)
    assert changes.backed_up == [backup]
    assert changes.written == [original]

    app = images.app
    app_name = f"{registry.host}/{app.repository}"
    log = AccessLog(registry)
    async with CRIClient(containerd.cri_endpoint) as cri:
        await _pull(cri, f"{app_name}:1", app, app_name)

        # containerd asked stowage, in mirror mode (?ns=<registry>) ...
        stowage.settle()
        served = [r for r in _request_logs(stowage) if r.get("ns") == registry.host]
        assert any(
            r["path"] == f"/v2/{app.repository}/manifests/1" and r["status"] == 200 for r in served
        )
        blobs = {r["path"].rsplit("/", 1)[1] for r in served if "/blobs/" in r["path"]}
        assert blobs == {d for d, _ in app.blobs}
        assert stowage.metric("stowage_requests_total", route="blobs", result="miss") == len(
            app.blobs
        )
        # ... and only stowage asked the registry, once per blob.
        agents = log.agents(f"/v2/{app.repository}/")
        assert agents and all("aiohttp" in ua for ua in agents), agents
        for digest, _ in app.blobs:
            assert log.agents(f"/blobs/{digest}") == [agents[-1]]

        # With stowage down, containerd falls back to the registry by itself, at once
        # (the refused connection fails fast; 1.6 ignores dial_timeout).
        stowage.stop()
        other = images.dockerv2
        other_name = f"{registry.host}/{other.repository}"
        log = AccessLog(registry)
        started = time.monotonic()
        await _pull(cri, f"{other_name}:1", other, other_name)
        assert time.monotonic() - started < 10
        agents = log.agents(f"/v2/{other.repository}/")
        assert agents and all(ua.startswith("containerd/") for ua in agents), agents

    undone = uninstall(hosts)
    assert undone.restored == [original]
    assert original.read_bytes() == original_bytes
    assert not backup.exists()
    assert managed_files(hosts) == []


async def test_default_mirror_covers_registries_without_their_own(
    containerd: Containerd,
    registry: Registry,
    images: SampleImages,
    stowage_factory: StowageFactory,
) -> None:
    """``_default`` has no ``server``: containerd falls back to its default for the
    registry (plain HTTP for a loopback one) and still names it in ``?ns=``."""
    stowage = stowage_factory(upstreams=[registry])
    install(containerd.hosts_dir, ["_default"], stowage.url)
    assert [p.parent.name for p in managed_files(containerd.hosts_dir)] == ["_default"]

    multi = images.multi
    name = f"{registry.host}/{multi.repository}"
    async with CRIClient(containerd.cri_endpoint) as cri:
        image_id = await cri.pull_image(f"{name}:1", deadline=60)
        [listed] = [i for i in await cri.list_images() if i.id == image_id]
        # The repo digest is the index's: nothing was converted or filtered on the way.
        assert f"{name}@{multi.manifest_digest}" in listed.repo_digests
    host_child = multi.child("linux/amd64")
    assert image_id == host_child.config_digest
    stowage.settle()
    index_requests = [
        r
        for r in _request_logs(stowage)
        if r.get("ns") == registry.host and r["path"] == f"/v2/{multi.repository}/manifests/1"
    ]
    assert index_requests and index_requests[0]["status"] == 200

    assert uninstall(containerd.hosts_dir).removed == [
        containerd.hosts_dir / "_default" / "hosts.toml"
    ]
    assert list(containerd.hosts_dir.iterdir()) == []


def test_hosts_dir_is_the_cri_config_path(containerd: Containerd) -> None:
    """The harness points the CRI plugin's registry.config_path at hosts_dir."""
    config = containerd.config_file.read_text()
    assert f'config_path = "{containerd.hosts_dir}"' in config
    assert Path(containerd.hosts_dir).is_dir()
