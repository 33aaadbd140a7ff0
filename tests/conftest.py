"""Shared pytest fixtures: real registries, test images, stowage processes, containerd."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.containerd import Containerd, require_containerd
from tests.support.faults import FaultServer
from tests.support.images import PushedImage, push_image, push_index
from tests.support.kube import KubeAPI, missing_binaries
from tests.support.registry import Mode, Registry
from tests.support.stowage import Stowage


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (see the CI setup script)")


@dataclass(frozen=True)
class SampleImages:
    app: PushedImage  # library/app:1, single-arch OCI manifest
    multi: PushedImage  # library/multi:1, OCI index (linux/amd64 + linux/arm64)
    dockerv2: PushedImage  # library/dockerv2:1, Docker v2 schema2 manifest


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Session-wide plain-HTTP anonymous registry. Do not stop it in tests; use
    ``registry_factory`` for outage scenarios."""
    _require_tools("docker-registry")
    with Registry("plain", workdir=tmp_path_factory.mktemp("registry-plain")) as reg:
        yield reg


@pytest.fixture(scope="session")
def images(registry: Registry) -> SampleImages:
    _require_tools("skopeo")
    return SampleImages(
        app=push_image(registry, "library/app", "1"),
        multi=push_index(registry, "library/multi", "1"),
        dockerv2=push_image(registry, "library/dockerv2", "1", fmt="v2s2"),
    )


RegistryFactory = Callable[..., Registry]


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    """``registry_factory(mode="plain"|"basic"|"token", **Registry kwargs) -> started Registry``.

    Each gets its own storage; all are stopped at teardown.
    """
    _require_tools("docker-registry")
    started: list[Registry] = []
    counter = itertools.count()

    def make(mode: Mode = "plain", **kwargs: Any) -> Registry:
        kwargs.setdefault("workdir", tmp_path / f"registry-{mode}-{next(counter)}")
        reg = Registry(mode, **kwargs)
        started.append(reg)
        return reg.start()

    yield make
    for reg in started:
        reg.close()


StowageFactory = Callable[..., Stowage]


@pytest.fixture
def stowage_factory(tmp_path: Path) -> Iterator[StowageFactory]:
    """``stowage_factory(upstreams=[registry, ...], **Stowage kwargs) -> ready Stowage``.

    ``upstreams`` is a convenience: plain-HTTP registries become ``--insecure-registry`` and
    the CAs of TLS ones are bundled into one ``--ca-file``. Data dir and log live in tmp_path;
    every process is stopped at teardown and its log tail printed (shown on failure).
    """
    started: list[Stowage] = []
    counter = itertools.count()

    def make(*, upstreams: Sequence[Registry] = (), **kwargs: Any) -> Stowage:
        n = next(counter)
        insecure = list(kwargs.pop("insecure_registries", ()))
        insecure += [r.host for r in upstreams if not r.tls and r.host not in insecure]
        cas = [r.ca_file for r in upstreams if r.ca_file is not None]
        if kwargs.get("ca_file") is not None:
            cas.insert(0, kwargs["ca_file"])
        if cas:
            bundle = tmp_path / f"stowage-{n}-ca.pem"
            bundle.write_bytes(b"".join(Path(c).read_bytes() for c in cas))
            kwargs["ca_file"] = bundle
        kwargs.setdefault("log_file", tmp_path / f"stowage-{n}.log")
        instance = Stowage(
            tmp_path / f"stowage-{n}" / "data", insecure_registries=insecure, **kwargs
        )
        started.append(instance)
        return instance.start()

    yield make
    for instance in started:
        instance.stop()
        print(f"--- stowage {instance.host} log tail ({instance.log_file}) ---")
        print(instance.log_tail())


FaultFactory = Callable[..., FaultServer]


@pytest.fixture
def fault_server() -> Iterator[FaultFactory]:
    """``fault_server(port=None, status=500, headers=..., body=..., delay=...) -> started``."""
    started: list[FaultServer] = []

    def make(port: int | None = None, **kwargs: Any) -> FaultServer:
        server = FaultServer(port, **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A private containerd daemon (skips unless root with containerd/ctr installed)."""
    require_containerd()
    with Containerd(tmp_path / "containerd") as daemon:
        yield daemon
        print(f"--- containerd log tail ({daemon.log_file}) ---")
        print(daemon.log_tail())


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    """A real kube-apiserver + etcd on loopback for the whole session (admin kubeconfig)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/build-test-binaries.sh builds them)")
    with KubeAPI(tmp_path_factory.mktemp("kube")) as api:
        yield api


@pytest.fixture
def namespace(kube: KubeAPI) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (objects in it go with it)."""
    name = f"t-{next(_namespaces)}"
    kube.ok("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    # No controller-manager empties a deleted namespace here: delete its pods first
    # (unscheduled pods go at once, there is no kubelet to wait for).
    kube.request("DELETE", f"/api/v1/namespaces/{name}/pods")
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


_namespaces = itertools.count(1)
