"""The Kubernetes API client the operator and the agent share (kubernetes_asyncio)."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

MERGE_PATCH = "application/merge-patch+json"


class KubeConfigError(RuntimeError):
    """No usable Kubernetes configuration; the message names the problem."""


async def api_client(kubeconfig: Path | None) -> k8s.ApiClient:
    """A client for ``kubeconfig``, else in-cluster (service account), else the default
    kubeconfig. Also makes it the default configuration (kopf logs in with it)."""
    try:
        if kubeconfig is not None:
            await k8s_config.load_kube_config(config_file=str(kubeconfig))
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config()
    except (k8s_config.ConfigException, OSError) as exc:
        raise KubeConfigError(f"no Kubernetes configuration: {exc}") from None
    return k8s.ApiClient()


def describe(exc: BaseException) -> str:
    """An error for a log line: an API error as its status and reason (str() of one
    dumps its headers and body)."""
    if isinstance(exc, k8s.ApiException):
        return f"API error {exc.status} {exc.reason}"
    return str(exc) or repr(exc)
