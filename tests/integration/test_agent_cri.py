"""``CRIClient`` against a real containerd (Debian's 1.6, its CRI plugin on a private socket):
pulls through stowage, image listing and status, image filesystem, removal, and the guard
that keeps images used by containers."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc.aio
import pytest

from stowage.agent.cri import CRIClient, CRIError, ImageInUseError
from stowage.agent.criapi import api_pb2 as pb
from stowage.agent.criapi import api_pb2_grpc as rpc
from tests.conftest import SampleImages, StowageFactory
from tests.support.containerd import (
    Containerd,
    build_pause_layout,
    pods_unsupported,
    require_containerd,
)
from tests.support.images import push_layout
from tests.support.registry import Registry

pytestmark = pytest.mark.integration


@pytest.fixture
async def cri(containerd: Containerd) -> AsyncIterator[CRIClient]:
    async with CRIClient(containerd.cri_endpoint) as client:
        yield client


async def test_version(cri: CRIClient) -> None:
    version = await cri.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    assert version.runtime_version


async def test_pull_list_status_remove_through_stowage(
    cri: CRIClient,
    containerd: Containerd,
    registry: Registry,
    images: SampleImages,
    stowage_factory: StowageFactory,
) -> None:
    """Host-prefixed pull through stowage. No hosts.toml names stowage's host: containerd
    reaches a loopback registry over plain HTTP by default."""
    app = images.app
    stowage = stowage_factory(upstreams=[registry])
    name = f"{stowage.host}/{registry.path_prefix}/{app.repository}"
    ref = f"{name}:1"
    assert not (containerd.hosts_dir / stowage.host).exists()
    since = registry.checkpoint()

    image_id = await cri.pull_image(ref)

    # containerd's image id is the config digest; the repo digest is upstream's manifest's.
    assert image_id == app.config_digest
    listed = {i.id: i for i in await cri.list_images()}
    assert ref in listed[image_id].repo_tags
    assert f"{name}@{app.manifest_digest}" in listed[image_id].repo_digests
    assert listed[image_id].size > 0
    status = await cri.image_status(ref)
    assert status is not None and status.id == image_id
    assert await cri.image_status(f"{name}:absent") is None

    # Every byte came through stowage, which fetched each blob upstream once.
    stowage.settle()
    assert stowage.metric("stowage_requests_total", route="blobs", result="miss") == len(app.blobs)
    for digest, _ in app.blobs:
        assert registry.blob_gets(digest, since=since) == 1

    [fs] = await cri.image_fs_info()
    assert fs.mountpoint.startswith(f"{containerd.root}/")  # the snapshotter's directory
    assert fs.used_bytes >= 0
    assert fs.capacity_bytes is not None and fs.capacity_bytes > 0
    assert fs.available_bytes is not None and 0 <= fs.available_bytes <= fs.capacity_bytes
    assert fs.usage_fraction is not None and 0.0 <= fs.usage_fraction <= 1.0

    assert await cri.remove_image(ref) is True
    assert await cri.image_status(ref) is None
    assert image_id not in {i.id for i in await cri.list_images()}
    assert await cri.remove_image(ref) is False  # already gone: not an error


async def test_pull_failure_is_a_cri_error(cri: CRIClient, containerd: Containerd) -> None:
    with pytest.raises(CRIError) as caught:
        await cri.pull_image("127.0.0.1:1/library/nothing:1", deadline=30)
    assert caught.value.method == "PullImage"
    assert caught.value.endpoint == containerd.cri_endpoint
    assert str(containerd.cri_socket) in str(caught.value)


async def test_unreachable_socket_is_a_clear_error(tmp_path: Path) -> None:
    socket = tmp_path / "missing.sock"
    async with CRIClient(str(socket), call_timeout=5) as client:
        with pytest.raises(CRIError) as caught:
            await client.version()
    message = str(caught.value)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"unix://{socket}" in message
    assert "Version" in message and "UNAVAILABLE" in message
    assert "is the runtime running" in message


# --- images used by containers ------------------------------------------------------------


@pytest.fixture(scope="module")
def pause_image(registry: Registry) -> str:
    reason = pods_unsupported()
    if reason:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix="pause-layout-") as tmp:
        layout = build_pause_layout(Path(tmp) / "layout")
        push_layout(registry, layout, "1", "stowage-test/pause", "1")
    return f"{registry.host}/stowage-test/pause:1"


@pytest.fixture
def pod_containerd(tmp_path: Path, pause_image: str) -> Iterator[Containerd]:
    require_containerd()
    with Containerd(tmp_path / "containerd", sandbox_image=pause_image) as daemon:
        yield daemon
        print(f"--- containerd log tail ({daemon.log_file}) ---")
        print(daemon.log_tail())


async def test_images_in_use_are_never_removed(
    pod_containerd: Containerd, registry: Registry, images: SampleImages, tmp_path: Path
) -> None:
    """A created (never started) container in a host-network sandbox pins its image:
    ``images_in_use`` reports it and ``remove_image`` refuses until the container is gone."""
    app_ref = f"{registry.host}/{images.app.repository}:1"
    other_ref = f"{registry.host}/{images.dockerv2.repository}:1"
    sandbox_config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="agent-test", uid="agent-test-uid", namespace="t"),
        log_directory=str(tmp_path / "pod-logs"),
        linux=pb.LinuxPodSandboxConfig(
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE)
            )
        ),
    )
    async with (
        CRIClient(pod_containerd.cri_endpoint) as cri,
        grpc.aio.insecure_channel(pod_containerd.cri_endpoint) as channel,
    ):
        runtime = rpc.RuntimeServiceStub(channel)
        app_id = await cri.pull_image(app_ref)
        other_id = await cri.pull_image(other_ref)
        assert await cri.images_in_use() == set()

        sandbox = await runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config))
        try:
            created = await runtime.CreateContainer(
                pb.CreateContainerRequest(
                    pod_sandbox_id=sandbox.pod_sandbox_id,
                    sandbox_config=sandbox_config,
                    config=pb.ContainerConfig(
                        metadata=pb.ContainerMetadata(name="app"),
                        image=pb.ImageSpec(image=app_ref),
                        command=["/never-started"],
                        log_path="app.log",
                    ),
                )
            )
            [container] = await cri.list_containers()
            assert container.container_id == created.container_id
            assert container.state == "CONTAINER_CREATED"

            assert await cri.images_in_use() == {app_id}
            with pytest.raises(ImageInUseError) as caught:
                await cri.remove_image(app_ref)
            assert caught.value.image_id == app_id
            with pytest.raises(ImageInUseError):  # ids in use listed once by the caller
                await cri.remove_image(app_ref, in_use=await cri.images_in_use())
            assert await cri.image_status(app_ref) is not None
            assert await cri.remove_image(other_ref) is True  # unused: removed
            assert await cri.image_status(other_ref) is None

            await runtime.RemoveContainer(
                pb.RemoveContainerRequest(container_id=created.container_id)
            )
            assert await cri.images_in_use() == set()
            assert await cri.remove_image(app_ref) is True
            assert app_id not in {i.id for i in await cri.list_images()}
            assert other_id != app_id
        finally:
            await runtime.StopPodSandbox(
                pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.pod_sandbox_id)
            )
            await runtime.RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.pod_sandbox_id)
            )
