"""The operator as the e2e tests run it: the chart's cluster objects installed from its
rendered output, and `stowage operator` processes against the test apiserver."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from tests.support.kube import BIN, ROOT, KubeAPI
from tests.support.util import (
    HarnessError,
    ManagedProcess,
    Service,
    free_port,
    http_ok,
    port_open,
)
from tests.support.util import wait_until as _wait_until

CHART = ROOT / "deploy" / "helm" / "stowage"
GROUP, VERSION, PLURAL = "stowage.dev", "v1alpha1", "cachedimages"
CI_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


def create_cached_image(kube: KubeAPI, name: str, image: str, *, retain: bool = True) -> None:
    kube.ok(
        "POST",
        CI_PATH,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CachedImage",
            "metadata": {"name": name},
            "spec": {"sourceImage": image, "retain": retain},
        },
    )


def cached_images(kube: KubeAPI) -> dict[str, dict[str, Any]]:
    """The CachedImages by source image."""
    return {i["spec"]["sourceImage"]: i for i in kube.ok("GET", CI_PATH)["items"]}


def wait_cached_image(
    kube: KubeAPI,
    image: str,
    check: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 60,
    log: Callable[[], str] = lambda: "",
) -> dict[str, Any]:
    """The CachedImage of ``image`` once ``check`` holds for it."""

    def look() -> dict[str, Any] | None:
        ci = cached_images(kube).get(image)
        return ci if ci is not None and check(ci) else None

    return _wait_until(
        look,
        timeout=timeout,
        interval=0.2,
        describe=lambda: f"{image}: {cached_images(kube).get(image)}\n{log()}",
    )


def render_chart(
    release: str, namespace: str, values: Sequence[str] = (), *, crds: bool = True
) -> list[dict[str, Any]]:
    """``helm template`` of the chart, parsed."""
    argv = [str(BIN / "helm"), "template", release, str(CHART), "--namespace", namespace]
    if crds:
        argv.append("--include-crds")
    for value in values:
        argv += ["--set", value]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise HarnessError(f"helm template failed: {out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def install_cluster_objects(
    kube: KubeAPI, release: str, namespace: str, webhook_url: str
) -> dict[str, Any]:
    """Apply the chart's CRDs, webhook configuration and peering object (rendered by helm)
    to the test apiserver. There is no Service routing here, so the webhook's clientConfig
    is pointed at ``webhook_url`` (the operator process on loopback) instead.
    Returns the webhook configuration as applied."""
    docs = render_chart(release, namespace)
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    _apply(kube, crds)
    for crd in crds:
        kube.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}"
        )
    (webhook,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    for hook in webhook["webhooks"]:
        hook["clientConfig"] = {"url": webhook_url}
    peering = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    _apply(kube, [webhook, *peering])
    return webhook


def _apply(kube: KubeAPI, docs: Sequence[dict[str, Any]]) -> None:
    kube.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=stowage-tests",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
    )


class Operator(Service):
    """One `stowage operator` replica on loopback."""

    def __init__(
        self,
        kube: KubeAPI,
        workdir: Path,
        *,
        namespace: str,
        cache_url: str,
        webhook_config: str,
        peering: str,
        cert_secret: str,
        webhook_port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.kube = kube
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.webhook_port = webhook_port or free_port()
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.log_file = workdir / "operator.log"
        argv = [
            sys.executable,
            "-m",
            "stowage",
            "operator",
            f"--kubeconfig={kube.kubeconfig}",
            f"--namespace={namespace}",
            f"--cache-url={cache_url}",
            f"--webhook-listen=127.0.0.1:{self.webhook_port}",
            "--webhook-host=127.0.0.1",
            f"--webhook-config={webhook_config}",
            f"--cert-secret={cert_secret}",
            f"--health-listen=127.0.0.1:{self.health_port}",
            f"--metrics-listen=127.0.0.1:{self.metrics_port}",
            f"--peering={peering}",
            "--log-format=json",
            *extra_args,
        ]
        self.process = ManagedProcess(argv, stdout_path=self.log_file, cwd=workdir)

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}/mutate-pods"

    def start(self) -> Self:
        self.process.start()
        _wait_until(self._ready, timeout=60, interval=0.2, describe=self.log_tail)
        return self

    def _ready(self) -> bool:
        if not self.process.running():
            raise HarnessError("stowage operator exited:\n" + self.log_tail())
        if not port_open("127.0.0.1", self.webhook_port):
            return False
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        self.process.stop()

    def kill9(self) -> None:
        self.process.kill()

    def running(self) -> bool:
        return self.process.running()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
