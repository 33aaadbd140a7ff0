"""The node agent against a real kube-apiserver and a real containerd (CRI): ImageCache
pre-pull through the node proxy, removal, disk threshold, start-up taint, mirror config."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stowage.agent.prepull import STATE_FILE
from tests.conftest import SampleImages, StowageFactory
from tests.support.agents import Agent
from tests.support.containerd import CRI_NAMESPACE, Containerd
from tests.support.kube import KubeAPI
from tests.support.operators import render_chart
from tests.support.registry import Registry
from tests.support.stowage import Stowage, run_cli
from tests.support.util import wait_until

pytestmark = pytest.mark.integration

IC = "/apis/stowage.dev/v1alpha1/namespaces/{ns}/imagecaches"
TAINT = {"key": "stowage.dev/not-ready", "effect": "NoSchedule"}
_nodes = itertools.count(1)


@pytest.fixture(scope="module")
def crds(kube: KubeAPI) -> None:
    docs = [
        d for d in render_chart("stowage", "stowage") if d["kind"] == "CustomResourceDefinition"
    ]
    kube.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(docs)
    )
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/imagecaches.stowage.dev"
    )


@pytest.fixture
def node(kube: KubeAPI) -> Iterator[str]:
    """A Node object (no kubelet behind it) with a label and the start-up taint."""
    name = f"node-{next(_nodes)}"
    kube.ok(
        "POST",
        "/api/v1/nodes",
        {
            # A label of its own: ImageCaches of earlier tests (namespaces are not emptied
            # here, there is no controller-manager) never select it.
            "metadata": {"name": name, "labels": {"stowage.dev/prepull": name}},
            "spec": {"taints": [TAINT, {"key": "other", "effect": "NoSchedule"}]},
        },
    )
    yield name
    kube.request("DELETE", f"/api/v1/nodes/{name}")


AgentFactory = Callable[..., Agent]


@pytest.fixture
def agent_factory(
    kube: KubeAPI, containerd: Containerd, tmp_path: Path, crds: None
) -> Iterator[AgentFactory]:
    started: list[Agent] = []

    def make(node: str, stowage: Stowage, *extra: str) -> Agent:
        agent = Agent(
            kube,
            tmp_path / f"agent-{len(started)}",
            node=node,
            cri_endpoint=containerd.cri_endpoint,
            proxy_address=stowage.host,
            proxy_url=stowage.url,
            config_path=containerd.hosts_dir,
            extra_args=extra,
        )
        started.append(agent)
        return agent.start()

    yield make
    for agent in started:
        agent.stop()
        print(f"--- agent log tail ---\n{agent.log_tail(40)}")


def _runtime_images(containerd: Containerd) -> set[str]:
    """Image names in the CRI's containerd namespace (what kubelet sees)."""
    out = containerd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE)
    return set(out.stdout.split())


def _image_cache(
    kube: KubeAPI,
    namespace: str,
    name: str,
    images: list[str],
    selector: dict[str, str],
    refresh: str = "1h",
) -> None:
    kube.ok(
        "POST",
        IC.format(ns=namespace),
        {
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "ImageCache",
            "metadata": {"name": name},
            "spec": {"images": images, "nodeSelector": selector, "refreshInterval": refresh},
        },
    )


def _node_status(kube: KubeAPI, namespace: str, name: str, node: str) -> list[dict[str, Any]]:
    ic = kube.ok("GET", f"{IC.format(ns=namespace)}/{name}")
    entry = ((ic.get("status") or {}).get("nodes") or {}).get(node) or {}
    return list(entry.get("images") or [])


def test_prepull_through_the_proxy_status_and_removal(
    kube: KubeAPI,
    namespace: str,
    node: str,
    registry: Registry,
    images: SampleImages,
    containerd: Containerd,
    stowage_factory: StowageFactory,
    agent_factory: AgentFactory,
) -> None:
    stowage = stowage_factory(upstreams=[registry])
    agent = agent_factory(node, stowage, "--remove-taint")

    # The proxy answers /readyz: the start-up taint goes, other taints stay.
    def taints() -> set[str]:
        return {t["key"] for t in kube.ok("GET", f"/api/v1/nodes/{node}")["spec"]["taints"]}

    # (the apiserver itself adds node.kubernetes.io/not-ready to a new node)
    wait_until(
        lambda: "stowage.dev/not-ready" not in taints() and "other" in taints(),
        timeout=30,
        describe=lambda: str(kube.ok("GET", f"/api/v1/nodes/{node}")["spec"]),
    )

    app, v2 = images.app, images.dockerv2
    refs = [f"{registry.host}/library/app:1", f"{registry.host}/library/dockerv2:1"]
    since = registry.checkpoint()
    _image_cache(kube, namespace, "warm", refs, {"stowage.dev/prepull": node})
    _image_cache(kube, namespace, "elsewhere", refs[:1], {"stowage.dev/prepull": "no"})

    def pulled() -> list[dict[str, Any]] | None:
        entries = _node_status(kube, namespace, "warm", node)
        return entries if [e["state"] for e in entries] == ["Pulled", "Pulled"] else None

    entries = wait_until(pulled, timeout=60, interval=0.3)
    assert [(e["image"], e["digest"]) for e in entries] == [
        (refs[0], app.manifest_digest),
        (refs[1], v2.manifest_digest),
    ]
    # In the runtime under the name pods use through the proxy; through stowage, which
    # fetched each blob from upstream once.
    prefix = f"{stowage.host}/{registry.path_prefix}"
    present = _runtime_images(containerd)
    assert f"{prefix}/library/app:1" in present
    assert f"{prefix}/library/dockerv2:1" in present
    for digest, _ in app.blobs + v2.blobs:
        assert registry.blob_gets(digest, since=since) == 1
    # An ImageCache for other nodes gets no entry from this one.
    assert _node_status(kube, namespace, "elsewhere", node) == []
    out = kube.kubectl("get", "imagecaches", "-n", namespace).stdout
    assert out.split()[:5] == ["NAME", "IMAGES", "REFRESH", "AGE", "elsewhere"]

    # Dropped from the spec → removed from the runtime, and from the status.
    kube.ok(
        "PATCH",
        f"{IC.format(ns=namespace)}/warm",
        {"spec": {"images": refs[:1]}},
        content_type="application/merge-patch+json",
    )
    wait_until(
        lambda: f"{prefix}/library/dockerv2:1" not in _runtime_images(containerd), timeout=30
    )
    wait_until(lambda: len(_node_status(kube, namespace, "warm", node)) == 1, timeout=30)
    assert f"{prefix}/library/app:1" in _runtime_images(containerd)
    metrics = agent.metrics()
    assert 'stowage_agent_pulls_total{result="pulled"} 2.0' in metrics
    assert "stowage_agent_removals_total 1.0" in metrics


def test_tags_are_pulled_again_on_the_refresh_interval(
    kube: KubeAPI,
    namespace: str,
    node: str,
    registry: Registry,
    images: SampleImages,
    containerd: Containerd,
    stowage_factory: StowageFactory,
    agent_factory: AgentFactory,
) -> None:
    # The node proxy asks upstream on every tag request, so each pull reaches the registry.
    stowage = stowage_factory(upstreams=[registry], tag_ttl=0)
    agent_factory(node, stowage)
    image = f"{registry.host}/library/app:1"
    tag_path = "/library/app/manifests/1"
    since = registry.checkpoint()
    _image_cache(kube, namespace, "fresh", [image], {"stowage.dev/prepull": node}, "3s")
    wait_until(
        lambda: [e["state"] for e in _node_status(kube, namespace, "fresh", node)] == ["Pulled"],
        timeout=30,
        interval=0.3,
    )
    first = registry.count("*", tag_path, since=since)
    assert first >= 1
    # Pulled again after 3 s, and again: the tag is asked for each time.
    wait_until(lambda: registry.count("*", tag_path, since=since) >= first + 2, timeout=30)
    # The blobs were not fetched again (the runtime and the cache have them).
    for digest, _ in images.app.blobs:
        assert registry.blob_gets(digest, since=since) <= 1


def test_failed_pull_is_reported_and_retried_with_backoff(
    kube: KubeAPI,
    namespace: str,
    node: str,
    registry: Registry,
    stowage_factory: StowageFactory,
    agent_factory: AgentFactory,
) -> None:
    stowage = stowage_factory(upstreams=[registry])
    agent = agent_factory(node, stowage)
    image = f"{registry.host}/library/no-such-image:1"
    _image_cache(kube, namespace, "missing", [image], {"stowage.dev/prepull": node})
    [entry] = wait_until(
        lambda: _node_status(kube, namespace, "missing", node) or None, timeout=30, interval=0.3
    )
    assert entry["state"] == "Failed" and entry["image"] == image
    assert "not found" in entry["reason"].lower() or "404" in entry["reason"], entry
    # Not retried at every pass (2 s): the first retry waits about 10 s.
    time.sleep(5)
    assert 'stowage_agent_pulls_total{result="failed"} 1.0' in agent.metrics()
    wait_until(
        lambda: 'stowage_agent_pulls_total{result="failed"} 2.0' in agent.metrics(), timeout=20
    )


def test_disk_above_threshold_skips_with_reason(
    kube: KubeAPI,
    namespace: str,
    node: str,
    registry: Registry,
    images: SampleImages,
    containerd: Containerd,
    stowage_factory: StowageFactory,
    agent_factory: AgentFactory,
) -> None:
    stowage = stowage_factory(upstreams=[registry])
    agent_factory(node, stowage, "--disk-threshold=0.001")
    _image_cache(
        kube, namespace, "full", [f"{registry.host}/library/app:1"], {"stowage.dev/prepull": node}
    )
    [entry] = wait_until(
        lambda: _node_status(kube, namespace, "full", node) or None, timeout=30, interval=0.3
    )
    assert entry["state"] == "Skipped"
    assert "threshold" in entry["reason"] and "full" in entry["reason"]
    assert not any("library/app" in name for name in _runtime_images(containerd))


def test_mirror_config_follows_the_proxy_and_is_uninstalled(
    kube: KubeAPI,
    node: str,
    registry: Registry,
    containerd: Containerd,
    stowage_factory: StowageFactory,
    agent_factory: AgentFactory,
) -> None:
    stowage = stowage_factory(upstreams=[registry])
    hosts = containerd.hosts_dir / registry.host / "hosts.toml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    original = 'server = "http://original"\n'
    hosts.write_text(original)
    agent = agent_factory(node, stowage, f"--mirror=http://{registry.host}")

    def mirrored() -> bool:
        text = hosts.read_text()
        return f'[host."{stowage.url}"]' in text and f'server = "http://{registry.host}"' in text

    wait_until(mirrored, timeout=20)
    assert 'capabilities = ["pull", "resolve"]' in hosts.read_text()
    # Proxy down: the config is withdrawn (a wedged proxy would stall containerd 1.6,
    # which never gives up on a mirror that accepts and does not answer).
    stowage.stop()
    wait_until(lambda: hosts.read_text() == original, timeout=40)
    stowage.start()
    wait_until(mirrored, timeout=20)

    agent.stop()
    out = run_cli("agent", "--uninstall", f"--containerd-config-path={containerd.hosts_dir}")
    assert out.returncode == 0, out.stderr
    assert "restored 1" in out.stdout
    assert hosts.read_text() == original

    # Mirror mode turned off (no --mirror): an agent restores containerd's files itself.
    agent = agent_factory(node, stowage, f"--mirror=http://{registry.host}")
    wait_until(mirrored, timeout=20)
    agent.stop()
    assert mirrored()  # stopping leaves it: containerd falls back from a refused mirror
    agent_factory(node, stowage)
    assert hosts.read_text() == original


def test_a_failing_side_task_stops_the_agent_with_its_error(
    kube: KubeAPI,
    node: str,
    registry: Registry,
    containerd: Containerd,
    stowage_factory: StowageFactory,
    tmp_path: Path,
) -> None:
    """A mirror config the agent must not touch (someone's file, and a backup beside it
    that differs): the mirror guard fails, and the agent exits non-zero naming it instead
    of running on without its mirror."""
    stowage = stowage_factory(upstreams=[registry])
    hosts = containerd.hosts_dir / registry.host / "hosts.toml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text('server = "http://mine"\n')
    backup = hosts.with_name("hosts.toml.stowage-backup")
    backup.write_text('server = "http://older"\n')
    agent = Agent(
        kube,
        tmp_path / "agent",
        node=node,
        cri_endpoint=containerd.cri_endpoint,
        proxy_address=stowage.host,
        proxy_url=stowage.url,
        config_path=containerd.hosts_dir,
        extra_args=[f"--mirror=http://{registry.host}"],
    )
    agent.process.start()
    try:
        wait_until(lambda: not agent.process.running(), timeout=30, describe=agent.log_tail)
    finally:
        code = agent.process.stop()
    log = agent.log_tail(80)
    assert code not in (0, None), log
    assert "agent task failed" in log and "mirror guard" in log, log
    assert "Traceback" not in log
    assert hosts.read_text() == 'server = "http://mine"\n'  # nothing touched
    assert backup.read_text() == 'server = "http://older"\n'


def test_an_image_pulled_by_someone_else_is_never_removed(
    kube: KubeAPI,
    namespace: str,
    node: str,
    registry: Registry,
    images: SampleImages,
    containerd: Containerd,
    stowage_factory: StowageFactory,
    agent_factory: AgentFactory,
) -> None:
    """A tag kubelet pulled before the agent was asked for it: the agent keeps it fresh,
    but dropping it from the ImageCache leaves it in the runtime (the agent removes only
    what it brought)."""
    stowage = stowage_factory(upstreams=[registry])
    name = f"{stowage.host}/{registry.path_prefix}/library/app:1"
    containerd.ctr("images", "pull", "--plain-http", name, namespace=CRI_NAMESPACE)
    agent = agent_factory(node, stowage)
    ref = f"{registry.host}/library/app:1"
    _image_cache(kube, namespace, "kubelets", [ref], {"stowage.dev/prepull": node})
    wait_until(
        lambda: [e["state"] for e in _node_status(kube, namespace, "kubelets", node)] == ["Pulled"],
        timeout=60,
        interval=0.3,
    )
    state = agent.workdir / "state" / STATE_FILE
    assert name in json.loads(state.read_text())  # kept fresh by the agent
    kube.ok("DELETE", f"{IC.format(ns=namespace)}/kubelets")
    wait_until(lambda: name not in json.loads(state.read_text()), timeout=30, interval=0.3)
    assert name in _runtime_images(containerd)
    assert "stowage_agent_removals_total 0.0" in agent.metrics()
