"""The node's container runtime over the CRI: gRPC ``runtime.v1`` on a unix socket.

``CRIClient`` wraps the generated stubs (``stowage.agent.criapi``) with the few calls the
agent needs: what the runtime is, which images it holds, pulling and removing images, how
full the image filesystem is, and which images containers use (so that the agent never
removes one of those). Every gRPC failure becomes a ``CRIError`` naming the socket, the
call and the gRPC status: callers log one line, users never see a traceback.

Notes on the runtime's behaviour (checked against containerd 1.6's CRI plugin):

- ``RemoveImage`` removes the image under *every* name it has (all tags and digests), not
  just the reference given: this is the CRI's semantics.
- ``ImageFsInfo`` reports the bytes and inodes the runtime's snapshots use on the image
  filesystem, not the filesystem's size. ``image_fs_info`` adds capacity and free space
  from ``os.statvfs`` on the reported mountpoint, so the agent must see that path (a
  hostPath of containerd's root); when it does not, those fields are None.
- Credentials given to ``pull_image`` are offered to every host containerd tries for the
  reference, mirrors included (``hosts.toml`` mode; no ``server_address`` is set to restrict
  them): stowage uses them to prove access to private images.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio

from stowage.agent.criapi import api_pb2 as pb
from stowage.agent.criapi import api_pb2_grpc as rpc

DEFAULT_ENDPOINT = "unix:///run/containerd/containerd.sock"
CRI_VERSION = "v1"

# Deadline for every call but PullImage, which takes as long as the image needs.
CALL_TIMEOUT = 30.0
# ListImages/ListContainers on a busy node can exceed gRPC's 4 MiB default; kubelet's CRI
# client allows 16 MiB too.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_T = TypeVar("_T")


class CRIError(Exception):
    """A CRI call failed: which socket, which call, which gRPC status."""

    def __init__(
        self, endpoint: str, method: str, code: grpc.StatusCode | None, details: str
    ) -> None:
        self.endpoint = endpoint
        self.method = method
        self.code = code
        self.details = details
        status = code.name if code is not None else "ERROR"
        message = f"CRI {method} on {endpoint} failed: {status}: {details}"
        hint = _HINTS.get(code) if code is not None else None
        if hint:
            message += f" ({hint})"
        super().__init__(message)


_HINTS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "is the runtime running, and is its socket mounted here?",
    grpc.StatusCode.UNIMPLEMENTED: (
        "the runtime does not serve CRI runtime.v1: containerd needs 1.6 or later with "
        'its CRI plugin enabled (not in disabled_plugins = ["cri"])'
    ),
    grpc.StatusCode.PERMISSION_DENIED: "the agent needs access to the runtime's socket",
}


class ImageInUseError(Exception):
    """``remove_image`` refused: a container (in any state) uses the image."""

    def __init__(self, ref: str, image_id: str) -> None:
        self.ref = ref
        self.image_id = image_id
        super().__init__(f"image {ref} ({image_id}) is used by a container; not removed")


@dataclass(frozen=True)
class RuntimeVersion:
    runtime_name: str  # "containerd"
    runtime_version: str  # "1.6.20~ds1"
    runtime_api_version: str  # "v1"


@dataclass(frozen=True)
class Image:
    id: str  # the runtime's image id (containerd: the config digest, "sha256:…")
    repo_tags: tuple[str, ...]  # "127.0.0.1:5000/library/app:1"
    repo_digests: tuple[str, ...]  # "127.0.0.1:5000/library/app@sha256:…" (manifest/index)
    size: int  # bytes, as the runtime counts them
    pinned: bool = False  # the runtime asks that it be exempt from garbage collection


@dataclass(frozen=True)
class FsUsage:
    """One image filesystem: the runtime's usage plus the filesystem's size (statvfs)."""

    mountpoint: str
    used_bytes: int  # by the runtime's images (snapshots), per CRI ImageFsInfo
    inodes_used: int | None
    capacity_bytes: int | None = None  # statvfs; None when the mountpoint is not visible
    available_bytes: int | None = None  # to unprivileged users (f_bavail), as df reports

    @property
    def usage_fraction(self) -> float | None:
        """Share of the filesystem not available: ``1 - available / capacity``.

        This is the figure kubelet's image garbage collection compares to its thresholds
        (it counts everything on the filesystem, not only images). None when unknown.
        """
        if not self.capacity_bytes or self.available_bytes is None:
            return None
        return 1.0 - self.available_bytes / self.capacity_bytes


@dataclass(frozen=True)
class ContainerImage:
    """What ListContainers says about one container's image."""

    container_id: str
    image: str  # ImageSpec.image: what the container was created from (name or id)
    image_ref: str  # containerd: the image id; other runtimes: a digested reference
    image_id: str = ""  # newer runtimes: the image id, as PullImage returned it
    state: str = ""  # CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED, …


def image_ids_in_use(containers: Iterable[ContainerImage], images: Iterable[Image]) -> set[str]:
    """Ids of the images any of ``containers`` uses (pure).

    A container names its image in up to three ways, depending on the runtime and its
    version: an image id, a digested reference, the name it was created from. Each is
    matched against every image's id, tags and digests; an identifier that matches no
    listed image is kept as is when it looks like an id, so a caller comparing ids still
    sees it.
    """
    by_name: dict[str, str] = {}
    for image in images:
        by_name[image.id] = image.id
        for name in (*image.repo_tags, *image.repo_digests):
            by_name[name] = image.id
    used: set[str] = set()
    for container in containers:
        for name in (container.image_id, container.image_ref, container.image):
            if not name:
                continue
            if name in by_name:
                used.add(by_name[name])
            elif name.startswith("sha256:"):
                used.add(name)
    return used


class CRIClient:
    """Async CRI client on one gRPC channel. Use ``async with CRIClient(...) as cri``
    (or call ``close()``); create it inside the event loop that uses it."""

    def __init__(
        self, endpoint: str = DEFAULT_ENDPOINT, *, call_timeout: float = CALL_TIMEOUT
    ) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.call_timeout = call_timeout
        self._channel = grpc.aio.insecure_channel(
            self.endpoint,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._runtime = rpc.RuntimeServiceStub(self._channel)
        self._images = rpc.ImageServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            raise CRIError(self.endpoint, method, exc.code(), exc.details() or "") from None

    # --- runtime ------------------------------------------------------------------------

    async def version(self) -> RuntimeVersion:
        resp = await self._call(
            "Version",
            lambda: self._runtime.Version(
                pb.VersionRequest(version=CRI_VERSION), timeout=self.call_timeout
            ),
        )
        return RuntimeVersion(resp.runtime_name, resp.runtime_version, resp.runtime_api_version)

    async def list_containers(self) -> list[ContainerImage]:
        """Every container the runtime knows, in any state (created, running, exited)."""
        resp = await self._call(
            "ListContainers",
            lambda: self._runtime.ListContainers(
                pb.ListContainersRequest(), timeout=self.call_timeout
            ),
        )
        return [
            ContainerImage(
                container_id=c.id,
                image=c.image.image,
                image_ref=c.image_ref,
                image_id=c.image_id,
                state=pb.ContainerState.Name(c.state),
            )
            for c in resp.containers
        ]

    async def images_in_use(self) -> set[str]:
        """Ids of the images used by any container, in any state.

        Racy by nature: a container created after this call is not seen. Pod sandboxes'
        own (pause) image is not included; the agent never pulls that one.
        """
        containers = await self.list_containers()
        if not containers:
            return set()
        return image_ids_in_use(containers, await self.list_images())

    # --- images -------------------------------------------------------------------------

    async def list_images(self) -> list[Image]:
        resp = await self._call(
            "ListImages",
            lambda: self._images.ListImages(pb.ListImagesRequest(), timeout=self.call_timeout),
        )
        return [_image(i) for i in resp.images]

    async def image_status(self, ref: str) -> Image | None:
        """The image ``ref`` (a name, digested name or id) names, or None if not present."""
        resp = await self._call(
            "ImageStatus",
            lambda: self._images.ImageStatus(
                pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=self.call_timeout
            ),
        )
        return _image(resp.image) if resp.HasField("image") and resp.image.id else None

    async def pull_image(
        self,
        ref: str,
        auth: tuple[str, str] | None = None,
        *,
        deadline: float | None = None,
    ) -> str:
        """Pull ``ref``; return the image id the runtime reports (``PullImageResponse``).

        ``auth`` is (username, password). ``deadline`` (seconds) bounds the whole pull as
        a gRPC deadline, which the runtime sees and honours (default: none).
        """
        request = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
        if auth is not None:
            request.auth.CopyFrom(pb.AuthConfig(username=auth[0], password=auth[1]))
        resp = await self._call(
            "PullImage", lambda: self._images.PullImage(request, timeout=deadline)
        )
        return resp.image_ref

    async def remove_image(self, ref: str, *, in_use: Collection[str] | None = None) -> bool:
        """Remove the image ``ref`` names, under all its names (CRI semantics).

        Returns False when no such image is present. Raises ``ImageInUseError`` when a
        container (in any state) uses the image: one of ``in_use`` (ids, as
        ``images_in_use`` returns them) when given, so that a caller removing several
        images lists containers once, else asked of the runtime now.
        """
        image = await self.image_status(ref)
        if image is None:
            return False
        if in_use is None:
            in_use = await self.images_in_use()
        if image.id in in_use:
            raise ImageInUseError(ref, image.id)
        await self._call(
            "RemoveImage",
            lambda: self._images.RemoveImage(
                pb.RemoveImageRequest(image=pb.ImageSpec(image=image.id)),
                timeout=self.call_timeout,
            ),
        )
        return True

    async def image_fs_info(self) -> list[FsUsage]:
        """The runtime's image filesystems, with capacity from statvfs (see module doc)."""
        resp = await self._call(
            "ImageFsInfo",
            lambda: self._images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=self.call_timeout),
        )
        return [_fs_usage(fs) for fs in resp.image_filesystems]


def normalize_endpoint(endpoint: str) -> str:
    """``/run/x.sock`` or ``unix:///run/x.sock`` → ``unix:///run/x.sock``; other gRPC
    targets are returned unchanged."""
    if endpoint.startswith("/"):
        return "unix://" + endpoint
    return endpoint


def _image(image: pb.Image) -> Image:
    return Image(
        id=image.id,
        repo_tags=tuple(image.repo_tags),
        repo_digests=tuple(image.repo_digests),
        size=image.size,
        pinned=image.pinned,
    )


def _fs_usage(fs: pb.FilesystemUsage) -> FsUsage:
    mountpoint = fs.fs_id.mountpoint
    capacity: int | None = None
    available: int | None = None
    if mountpoint:
        try:
            st = os.statvfs(mountpoint)
        except OSError:
            pass
        else:
            capacity = st.f_blocks * st.f_frsize
            available = st.f_bavail * st.f_frsize
    return FsUsage(
        mountpoint=mountpoint,
        used_bytes=fs.used_bytes.value,
        inodes_used=fs.inodes_used.value if fs.HasField("inodes_used") else None,
        capacity_bytes=capacity,
        available_bytes=available,
    )
