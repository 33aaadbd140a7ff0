"""The operator's configuration: flags > STOWAGE_* environment > YAML file > defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from stowage.oci.manifest import Platform
from stowage.settings import ClusterSettings, http_url, positive_duration, split_listen


def _own_namespace() -> str:
    return os.environ.get("POD_NAMESPACE") or "stowage"


class OperatorSettings(ClusterSettings):
    namespace: str = Field(
        default_factory=_own_namespace,
        description="The operator's own namespace (default $POD_NAMESPACE, else stowage).",
    )
    proxy_address: str = Field(
        "localhost:7439", description="Node proxy HOST:PORT that pod images are rewritten to."
    )
    cache_url: str = Field(
        "http://stowage-cache:7439",
        description="URL of the cluster cache (stowage serve) that CachedImages are "
        "prefetched through and tags checked against.",
    )
    cache_token_file: Path | None = Field(
        None,
        description="Admin token of the cluster cache (its --admin-token-file): CachedImages "
        "are pinned there while they exist and released when deleted.",
    )
    expiry: float = Field(
        "30d",  # parsed by _duration
        validate_default=True,
        description="How long a CachedImage no pod uses is kept (e.g. 30d, 12h, seconds).",
    )
    ignore_namespace: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["kube-system"],
        description="Namespace whose pods are never rewritten; repeatable (default "
        "kube-system; the operator's own namespace is always ignored).",
    )
    include: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Rewrite only images whose normalised reference matches this regex; "
        "repeatable (default: every image).",
    )
    exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Never rewrite images whose normalised reference matches this regex; "
        "repeatable.",
    )
    webhook_listen: str = Field("0.0.0.0:8443", description="HTTPS address of the webhook.")
    webhook_service: str = Field(
        "stowage-webhook", description="Service in front of the webhook (certificate names)."
    )
    webhook_config: str = Field(
        "stowage", description="MutatingWebhookConfiguration whose caBundle is kept current."
    )
    webhook_host: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra DNS name or IP address for the webhook certificate; repeatable.",
    )
    cert_secret: str = Field(
        "stowage-webhook-tls",
        description="Secret where the operator keeps its own CA and serving certificate.",
    )
    cert_dir: Path | None = Field(
        None,
        description="Use tls.crt/tls.key/ca.crt from this directory (e.g. cert-manager) "
        "instead of managing certificates.",
    )
    freshness_interval: float = Field(
        "1h",  # parsed by _duration
        validate_default=True,
        description="How often a cached tag is checked against upstream (HEAD).",
    )
    registry_pace: float = Field(
        0.2, ge=0, description="Minimum seconds between two tag checks against one registry."
    )
    platform: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["linux/amd64"],
        description="Platform prefetched from multi-platform images, OS/ARCH[/VARIANT]; "
        "repeatable (default linux/amd64).",
    )
    health_listen: str = Field(
        "0.0.0.0:8080", description="Address of the liveness endpoint (GET /healthz)."
    )
    metrics_listen: str = Field(
        "0.0.0.0:9090", description="Address of the Prometheus metrics endpoint (GET /metrics)."
    )
    peering: str = Field(
        "stowage", description="ClusterKopfPeering object the replicas elect a leader with."
    )
    peering_lifetime: int = Field(
        30, ge=5, description="Seconds a replica's peering record lives without renewal."
    )

    @field_validator("expiry", "freshness_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return positive_duration(value)

    @field_validator("webhook_listen", "health_listen", "metrics_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("platform")
    @classmethod
    def _platforms(cls, value: list[str]) -> list[str]:
        for p in value:
            Platform.parse(p)
        return value

    @field_validator("cache_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)

    @property
    def ignored_namespaces(self) -> list[str]:
        return sorted({*self.ignore_namespace, self.namespace})

    @property
    def platforms(self) -> list[Platform]:
        return [Platform.parse(p) for p in self.platform]
